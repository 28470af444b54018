/*
 * Notifications, sent and received.
 *
 * Sent. A notification goes out only after its batch's last element completed: over tcp as a
 * NOTIFY frame answered once the target queued it; for shm peers over a tcp handle to the same
 * peer (the data went by process_vm_writev or a shared mapping and is in place when the call
 * returned); for engines of this process straight into the target's queue (loop). Order: each
 * batch with a notification draws a number from the peer's eng_order_t when it is submitted (or,
 * for sync calls, started); it may send only when every lower number is settled (sent, or
 * skipped because its batch failed or was cancelled). Several threads run batches at once, so
 * a later batch that finishes first waits for its turn.
 *
 * Received. The transports hand what arrives to kvf__notify_deliver(), which queues it (up to
 * config.notify_queue_max) for kvf_notify_poll()/kvf_notify_wait(). One sender may hold at most
 * half of the queue (at least one notification), so a peer that floods the queue leaves the
 * other half to the rest: what each sender has queued is counted in a tree keyed by its
 * session id (senders come from the network: a lookup must not be linear in their number).
 *
 * Lock order: order_lock and nlock are never held together; the engine's busy_lock (closing) is
 * taken inside nlock, never the other way round.
 */
#include <pthread.h>
#include <search.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/thread.h"
#include "core/core.h"

#define NOTIFY_LOG "notify"
/* How long a target holds a notification for room in a full queue before refusing it. */
#define NOTIFY_ROOM_WAIT_MS 2000u

/* What one sender has queued. */
typedef struct {
    size_t count;
    char sid[KVF_SESSION_ID_MAX];
} eng_sender_t;

/* ---- sending -------------------------------------------------------------------------------- */

/* Deliver a notification to @peer over its path, or over the path's notification handle when
 * the path cannot carry one (loop: straight into its queue; tcp: a NOTIFY frame; shm: a NOTIFY
 * frame over a tcp handle), and wait for it to be queued. Inside a busy section. */
static int notify_send(kvf_engine_t *e, const char *peer, const void *msg, size_t len,
                       uint64_t deadline, const atomic_bool *cancel)
{
    eng_peer_t *p;
    int rc = kvf__peer_enter(e, peer, "notification", cancel, &p);
    if (rc < 0)
        return rc;
    if (p->ntp)
        rc = p->nops->notify(p->ntp, msg, len, deadline);
    else
        rc = p->tops->notify(p->tp, msg, len, deadline);
    if (rc == 0)
        eng_count_add(&e->stats.notify_sent, 1);
    return kvf__peer_leave(p, rc, "notification");
}

/* ---- order ---------------------------------------------------------------------------------- */

eng_order_t *kvf__notify_order_get(kvf_engine_t *e, const char *peer)
{
    eng_notify_t *a = &e->notify;
    eng_order_t *o;
    pthread_mutex_lock(&a->order_lock);
    for (o = a->orders; o; o = o->next)
        if (!strcmp(o->sid, peer))
            break;
    if (!o) {
        o = calloc(1, sizeof(*o));
        if (o) {
            snprintf(o->sid, sizeof(o->sid), "%s", peer);
            o->next_seq = 1;
            o->next = a->orders;
            a->orders = o;
        }
    }
    pthread_mutex_unlock(&a->order_lock);
    if (!o)
        kvf__err(-KVF_ENOMEM, "notification to %s: out of memory", peer);
    return o;
}

uint64_t kvf__notify_order_take(kvf_engine_t *e, eng_order_t *o)
{
    pthread_mutex_lock(&e->notify.order_lock);
    uint64_t seq = o->next_seq++;
    pthread_mutex_unlock(&e->notify.order_lock);
    return seq;
}

void kvf__notify_order_settle(kvf_engine_t *e, eng_order_t *o, uint64_t seq)
{
    eng_notify_t *a = &e->notify;
    pthread_mutex_lock(&a->order_lock);
    if (seq == o->done + 1) {
        o->done = seq;
        size_t k = 0;
        while (k < o->nlater && o->later[k] == o->done + 1)
            o->done = o->later[k++];
        if (k) {
            memmove(o->later, o->later + k, (o->nlater - k) * sizeof(*o->later));
            o->nlater -= k;
        }
        pthread_cond_broadcast(&a->order_cond);
    } else {
        if (o->nlater == o->cap) {
            size_t cap = o->cap ? 2 * o->cap : 16;
            uint64_t *nl = realloc(o->later, cap * sizeof(*nl));
            if (!nl) {
                /* Cannot record it: spin it in as soon as its turn comes instead. */
                while (o->done + 1 != seq)
                    pthread_cond_wait(&a->order_cond, &a->order_lock);
                pthread_mutex_unlock(&a->order_lock);
                kvf__notify_order_settle(e, o, seq);
                return;
            }
            o->later = nl;
            o->cap = cap;
        }
        size_t i = o->nlater;
        while (i > 0 && o->later[i - 1] > seq) {
            o->later[i] = o->later[i - 1];
            i--;
        }
        o->later[i] = seq;
        o->nlater++;
    }
    pthread_mutex_unlock(&a->order_lock);
}

/* Wait until every number below @seq is settled. */
static int order_wait_turn(kvf_engine_t *e, eng_order_t *o, uint64_t seq, uint64_t deadline_ms)
{
    eng_notify_t *a = &e->notify;
    int rc = 0;
    pthread_mutex_lock(&a->order_lock);
    while (o->done + 1 != seq) {
        if (!kvf__cond_wait_until(&a->order_cond, &a->order_lock, deadline_ms)) {
            rc = kvf__err(-KVF_ETIMEDOUT,
                          "notification to %s: an earlier notification to it "
                          "was still pending at the deadline",
                          o->sid);
            break;
        }
    }
    pthread_mutex_unlock(&a->order_lock);
    return rc;
}

int kvf__notify_in_order(kvf_engine_t *e, eng_order_t *o, uint64_t seq, int rc,
                         const atomic_bool *cancel, const char *peer, const void *msg, size_t len,
                         bool data, uint64_t deadline_ms)
{
    if (rc == 0 && cancel && atomic_load(cancel))
        rc = kvf__err(-KVF_ECANCELED, "batch to %s cancelled before its notification was sent",
                      peer);
    if (rc == 0)
        rc = order_wait_turn(e, o, seq, deadline_ms);
    if (rc == 0) {
        rc = notify_send(e, peer, msg, len, deadline_ms, cancel);
        /* The caller sees a failed batch; say that its bytes are where they should be, so that
         * it does not send them again (or assume them lost) for want of a notification. */
        if (rc < 0 && data)
            kvf__err_wrap(rc, "every byte of the batch to %s landed; only its notification was "
                              "refused",
                          peer);
    }
    kvf__notify_order_settle(e, o, seq);
    return rc;
}

/* ---- argument checks ------------------------------------------------------------------------ */

int kvf__notify_check_args(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                           const void *msg, size_t msg_len, bool has_msg)
{
    kvf_hostport_t hp;
    if (!e)
        return kvf__err(-KVF_EINVAL, "transfer: the engine is NULL");
    if (!peer)
        return kvf__err(-KVF_EINVAL, "transfer: the peer session id is NULL");
    int rc = kvf__session_id_parse(peer, &hp);
    if (rc < 0)
        return rc;
    if (has_msg && msg_len > KVF_NOTIFY_MAX)
        return kvf__err(-KVF_ETOOBIG, "notification to %s: %zu bytes exceed KVF_NOTIFY_MAX (%u)",
                        peer, msg_len, KVF_NOTIFY_MAX);
    if (has_msg && msg_len && !msg)
        return kvf__err(-KVF_EINVAL, "notification to %s: message is NULL with length %zu", peer,
                        msg_len);
    if (n == 0 && has_msg)
        return 0;
    return kvf__eng_check_xfers(peer, x, n);
}

/* ---- synchronous notifications -------------------------------------------------------------- */

int kvf_transfer_sync_notify(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                             const void *msg, size_t msg_len)
{
    int rc = kvf__notify_check_args(e, peer, x, n, msg, msg_len, true);
    if (rc < 0)
        return rc;
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    eng_order_t *o = kvf__notify_order_get(e, peer);
    if (!o) {
        kvf__eng_busy_leave(e);
        return -KVF_ENOMEM;
    }
    uint64_t seq = kvf__notify_order_take(e, o);
    uint64_t deadline = kvf__now_ms() + e->cfg.op_timeout_ms;
    rc = n ? kvf__eng_transfer(e, peer, x, n, deadline, NULL) : 0;
    rc = kvf__notify_in_order(e, o, seq, rc, NULL, peer, msg, msg_len, n > 0, deadline);
    kvf__eng_busy_leave(e);
    return rc;
}

int kvf_notify_send(kvf_engine_t *e, const char *peer, const void *msg, size_t msg_len)
{
    return kvf_transfer_sync_notify(e, peer, NULL, 0, msg, msg_len);
}

/* ---- notifications received ----------------------------------------------------------------- */

static int sender_cmp(const void *a, const void *b)
{
    return strcmp(((const eng_sender_t *)a)->sid, ((const eng_sender_t *)b)->sid);
}

/* The notifications @sid has queued. Under nlock. */
static size_t sender_count(eng_notify_t *a, const char *sid)
{
    eng_sender_t key;
    snprintf(key.sid, sizeof(key.sid), "%s", sid);
    void **slot = tfind(&key, &a->senders, sender_cmp);
    return slot ? (*(eng_sender_t **)slot)->count : 0;
}

/* Count one more (@d = 1) or one fewer (@d = -1) notification of @sid; an entry whose count
 * reaches 0 goes. Under nlock. Returns 0, or -KVF_ENOMEM for a new sender. */
static int sender_add(eng_notify_t *a, const char *sid, int d)
{
    eng_sender_t key;
    snprintf(key.sid, sizeof(key.sid), "%s", sid);
    void **slot = tfind(&key, &a->senders, sender_cmp);
    eng_sender_t *s = slot ? *(eng_sender_t **)slot : NULL;
    if (!s) {
        if (d < 0)
            return 0;
        s = calloc(1, sizeof(*s));
        if (!s || !tsearch(s, &a->senders, sender_cmp)) {
            free(s);
            return -KVF_ENOMEM;
        }
        memcpy(s->sid, key.sid, sizeof(s->sid));
    }
    s->count = d > 0 ? s->count + 1 : s->count - 1;
    if (s->count == 0) {
        tdelete(s, &a->senders, sender_cmp);
        free(s);
    }
    return 0;
}

int kvf__notify_deliver(void *engine, const char *sender, const void *msg, size_t len)
{
    kvf_engine_t *e = engine;
    eng_notify_t *a = &e->notify;
    if (len > KVF_NOTIFY_MAX)
        return kvf__err(-KVF_ETOOBIG, "notification of %zu bytes exceeds KVF_NOTIFY_MAX", len);
    eng_notif_t *nt = malloc(sizeof(*nt) + (len ? len : 1));
    if (!nt)
        return kvf__err(-KVF_ENOMEM, "engine %s: out of memory for a notification", e->sid);
    snprintf(nt->sender, sizeof(nt->sender), "%s", sender);
    nt->len = len;
    if (len)
        memcpy(nt->msg, msg, len);
    nt->next = NULL;

    uint64_t deadline = kvf__now_ms() + NOTIFY_ROOM_WAIT_MS;
    size_t share = e->cfg.notify_queue_max / 2 ? e->cfg.notify_queue_max / 2 : 1;
    size_t held = 0;
    pthread_mutex_lock(&a->nlock);
    while (a->ncount >= e->cfg.notify_queue_max || (held = sender_count(a, nt->sender)) >= share) {
        if (kvf__eng_closing(e) || !kvf__cond_wait_until(&a->nroom, &a->nlock, deadline)) {
            bool full = a->ncount >= e->cfg.notify_queue_max;
            pthread_mutex_unlock(&a->nlock);
            free(nt);
            if (kvf__eng_closing(e))
                return kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
            if (!full)
                return kvf__err(-KVF_EBUSY,
                                "%s already has %zu notifications queued at %s, its share (half "
                                "of config.notify_queue_max %u), and they were not read for %u ms",
                                sender, held, e->sid, e->cfg.notify_queue_max,
                                NOTIFY_ROOM_WAIT_MS);
            return kvf__err(-KVF_EBUSY,
                            "the notification queue of %s is full (%u queued, "
                            "config.notify_queue_max) and was not read for %u ms",
                            e->sid, e->cfg.notify_queue_max, NOTIFY_ROOM_WAIT_MS);
        }
    }
    if (sender_add(a, nt->sender, 1) < 0) {
        pthread_mutex_unlock(&a->nlock);
        free(nt);
        return kvf__err(-KVF_ENOMEM, "engine %s: out of memory for a notification", e->sid);
    }
    if (a->ntail)
        a->ntail->next = nt;
    else
        a->nhead = nt;
    a->ntail = nt;
    a->ncount++;
    eng_count_add(&e->stats.notify_received, 1);
    pthread_cond_broadcast(&a->ncond);
    pthread_mutex_unlock(&a->nlock);
    KVF_DEBUG(NOTIFY_LOG, "engine %s: notification of %zu bytes from %s", e->sid, len, sender);
    return 0;
}

/* Take up to @max queued notifications. Under nlock. */
static size_t notify_take(eng_notify_t *a, kvf_notify_t *out, size_t max)
{
    size_t k = 0;
    while (k < max && a->nhead) {
        eng_notif_t *nt = a->nhead;
        a->nhead = nt->next;
        if (!a->nhead)
            a->ntail = NULL;
        a->ncount--;
        sender_add(a, nt->sender, -1);
        snprintf(out[k].sender, sizeof(out[k].sender), "%s", nt->sender);
        out[k].len = nt->len;
        memcpy(out[k].msg, nt->msg, nt->len);
        free(nt);
        k++;
    }
    if (k)
        pthread_cond_broadcast(&a->nroom);
    return k;
}

int kvf_notify_poll(kvf_engine_t *e, kvf_notify_t *out, size_t max)
{
    return kvf_notify_wait(e, out, max, 0);
}

int kvf_notify_wait(kvf_engine_t *e, kvf_notify_t *out, size_t max, int timeout_ms)
{
    if (!e || !out || max == 0)
        return kvf__err(-KVF_EINVAL, "notify wait: %s",
                        !e     ? "the engine is NULL"
                        : !out ? "the output array is NULL"
                               : "max is 0");
    if (max > INT32_MAX)
        max = INT32_MAX;
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    eng_notify_t *a = &e->notify;
    uint64_t deadline = eng_deadline_of(timeout_ms);
    pthread_mutex_lock(&a->nlock);
    size_t k;
    for (;;) {
        k = notify_take(a, out, max);
        if (k)
            break;
        if (kvf__eng_closing(e)) {
            rc = kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
            break;
        }
        if (!kvf__cond_wait_until(&a->ncond, &a->nlock, deadline))
            break;
    }
    pthread_mutex_unlock(&a->nlock);
    kvf__eng_busy_leave(e);
    return rc < 0 ? rc : (int)k;
}

int kvf_notify_wait_peer(kvf_engine_t *e, const char *peer, kvf_notify_t *out, size_t max,
                         int timeout_ms)
{
    kvf_hostport_t hp;
    if (!peer)
        return kvf__err(-KVF_EINVAL, "notify wait: the peer is NULL");
    int rc = kvf__session_id_parse(peer, &hp);
    if (rc < 0)
        return rc;
    uint64_t deadline = eng_deadline_of(timeout_ms);
    for (;;) {
        uint64_t now = kvf__now_ms();
        uint64_t slice = deadline > now ? deadline - now : 0;
        if (slice > ENG_PEER_CHECK_MS)
            slice = ENG_PEER_CHECK_MS;
        int n = kvf_notify_wait(e, out, max, (int)slice);
        if (n != 0)
            return n;
        if (kvf__now_ms() >= deadline)
            return 0;
        rc = kvf__eng_busy_enter(e);
        if (rc < 0)
            return rc;
        rc = kvf__eng_peer_check(e, peer);
        kvf__eng_busy_leave(e);
        if (rc == -KVF_EPEERGONE)
            return rc;
    }
}

/* ---- lifetime ------------------------------------------------------------------------------- */
void kvf__notify_fini(kvf_engine_t *e)
{
    eng_notify_t *a = &e->notify;
    for (eng_order_t *o = a->orders, *next; o; o = next) {
        next = o->next;
        free(o->later);
        free(o);
    }
    for (eng_notif_t *nt = a->nhead, *next; nt; nt = next) {
        next = nt->next;
        free(nt);
    }
    tdestroy(a->senders, free);
    a->senders = NULL;
}
