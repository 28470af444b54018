/*
 * Asynchronous batches, notifications and peer events: the parts of the engine that sit on top
 * of the synchronous data path (kvf__eng_transfer) and of the store.
 *
 * Batches. kvf_transfer_submit() copies the elements into a kvf_batch and queues it on the
 * engine's FIFO; config.async_threads threads (started on the first submit) take batches in
 * order and run each through the same path as kvf_transfer_sync(), with a per-element status
 * array and a cancel flag the transports honour between chunks. At most config.max_batches are
 * in flight (submitted and not complete): beyond that submit fails with -KVF_EBUSY or waits.
 *
 * Notifications. A notification goes out only after its batch's last element completed: over
 * tcp as a NOTIFY frame answered once the target queued it; for shm peers over a tcp handle to
 * the same peer (the data went by process_vm_writev or a shared mapping and is in place when
 * the call returned); for engines of this process straight into the target's queue. Order: each
 * batch with a notification draws a number from the peer's eng_order_t when it is submitted (or,
 * for sync calls, started); it may send only when every lower number is settled (sent, or
 * skipped because its batch failed or was cancelled). Several threads run batches at once, so
 * a later batch that finishes first waits for its turn.
 *
 * Lock order: batch->mu before async.lock; async.lock before order_lock; the engine's
 * busy_lock (closing) is taken inside async.lock, nlock and plock, never the other way round.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/url.h"
#include "core/engine_internal.h"

#define BATCH_LOG "batch"
/* How long a target holds a notification for room in a full queue before refusing it. */
#define NOTIFY_ROOM_WAIT_MS 2000u
#define ERRMSG_MAX 1024

struct kvf_batch {
    kvf_engine_t *e;
    struct kvf_batch *next; /* in the queue, under async.lock */
    bool running;           /* taken by a thread; under async.lock */
    char peer[KVF_SESSION_ID_MAX];
    kvf_xfer_t *x; /* x, status and msg live in the same allocation, after the struct */
    size_t n;
    int *status;
    bool has_msg;
    size_t msg_len;
    unsigned char *msg;
    eng_order_t *order; /* with has_msg */
    uint64_t seq;
    atomic_bool cancel;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool settled; /* result recorded, about to leave the engine's count; under mu */
    bool done;    /* under mu */
    int rc;
    char err[ERRMSG_MAX];
};

/* ---- waiting -------------------------------------------------------------------------------- */

static uint64_t deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? UINT64_MAX : kvf__now_ms() + (uint64_t)timeout_ms;
}

/* ---- notification order --------------------------------------------------------------------- */

static eng_order_t *order_get(kvf_engine_t *e, const char *peer)
{
    eng_async_t *a = &e->async;
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

static uint64_t order_take(kvf_engine_t *e, eng_order_t *o)
{
    pthread_mutex_lock(&e->async.order_lock);
    uint64_t seq = o->next_seq++;
    pthread_mutex_unlock(&e->async.order_lock);
    return seq;
}

/* Number @seq will send nothing more (sent, or skipped): let the next one go. */
static void order_settle(kvf_engine_t *e, eng_order_t *o, uint64_t seq)
{
    eng_async_t *a = &e->async;
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
                order_settle(e, o, seq);
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
    eng_async_t *a = &e->async;
    int rc = 0;
    pthread_mutex_lock(&a->order_lock);
    while (o->done + 1 != seq) {
        if (!kvf__cond_wait_until(&a->order_cond, &a->order_lock, deadline_ms)) {
            rc = kvf__err(-KVF_ETIMEDOUT, "notification to %s: an earlier notification to it "
                                          "was still pending at the deadline",
                          o->sid);
            break;
        }
    }
    pthread_mutex_unlock(&a->order_lock);
    return rc;
}

/* After the data of a batch with a notification: send it in its turn (only if @rc is 0 and the
 * batch was not cancelled), then settle its number either way. */
static int notify_in_order(kvf_engine_t *e, eng_order_t *o, uint64_t seq, int rc,
                           const atomic_bool *cancel, const char *peer, const void *msg,
                           size_t len, uint64_t deadline_ms)
{
    if (rc == 0 && cancel && atomic_load(cancel))
        rc = kvf__err(-KVF_ECANCELED, "batch to %s cancelled before its notification was sent",
                      peer);
    if (rc == 0)
        rc = order_wait_turn(e, o, seq, deadline_ms);
    if (rc == 0)
        rc = kvf__eng_notify(e, peer, msg, len, deadline_ms);
    order_settle(e, o, seq);
    return rc;
}

/* ---- argument checks ------------------------------------------------------------------------ */

static int check_notify_args(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
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
    int rc = check_notify_args(e, peer, x, n, msg, msg_len, true);
    if (rc < 0)
        return rc;
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    eng_order_t *o = order_get(e, peer);
    if (!o) {
        kvf__eng_busy_leave(e);
        return -KVF_ENOMEM;
    }
    uint64_t seq = order_take(e, o);
    uint64_t deadline = kvf__now_ms() + e->cfg.op_timeout_ms;
    rc = n ? kvf__eng_transfer(e, peer, x, n, deadline, NULL) : 0;
    rc = notify_in_order(e, o, seq, rc, NULL, peer, msg, msg_len, deadline);
    kvf__eng_busy_leave(e);
    return rc;
}

int kvf_notify_send(kvf_engine_t *e, const char *peer, const void *msg, size_t msg_len)
{
    return kvf_transfer_sync_notify(e, peer, NULL, 0, msg, msg_len);
}

/* ---- batches -------------------------------------------------------------------------------- */

static void batch_destroy(kvf_batch_t *b)
{
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    free(b);
}

/* Count the batch out of the engine, then record the result and wake its waiters: whoever sees
 * it complete also finds its place free for the next submit. The engine is not touched once the
 * count is down (destroy waits for it to reach 0), and the batch not once it is marked done (its
 * owner may free it at once). */
static void batch_complete(kvf_batch_t *b, int rc, const char *err)
{
    eng_async_t *a = &b->e->async;
    for (size_t i = 0; i < b->n; i++)
        if (b->status[i] == KVF_XFER_PENDING)
            b->status[i] = rc == 0 ? 0 : -KVF_ECANCELED;
    pthread_mutex_lock(&b->mu);
    b->rc = rc;
    if (rc < 0)
        snprintf(b->err, sizeof(b->err), "%s", err);
    b->settled = true;
    pthread_mutex_unlock(&b->mu);

    pthread_mutex_lock(&a->lock);
    a->inflight--;
    pthread_cond_signal(&a->room);
    if (a->inflight == 0)
        pthread_cond_broadcast(&a->idle);
    pthread_mutex_unlock(&a->lock);

    pthread_mutex_lock(&b->mu);
    b->done = true;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

/* A batch that never ran (cancelled in the queue, or the engine is closing). */
static void batch_drop(kvf_batch_t *b, int rc, const char *why)
{
    if (b->has_msg)
        order_settle(b->e, b->order, b->seq);
    char err[ERRMSG_MAX];
    snprintf(err, sizeof(err), "batch of %zu element(s) to %s: %s", b->n, b->peer, why);
    kvf__err(rc, "%s", err);
    batch_complete(b, rc, err);
}

static int thread_add(kvf_engine_t *e);

/*
 * A batch to a peer that has not appeared yet waits for it (up to init_timeout_ms) on its thread.
 * So that batches to live peers do not queue behind it, a thread that starts such a wait adds a
 * thread when none would be left to run the queue, and so does a submit that finds every thread
 * waiting (up to ENG_MAX_ASYNC_THREADS in all).
 */
static bool peer_wait_begin(kvf_batch_t *b)
{
    kvf_engine_t *e = b->e;
    if (kvf__eng_peer_known(e, b->peer))
        return false;
    eng_async_t *a = &e->async;
    pthread_mutex_lock(&a->lock);
    a->waiting_peer++;
    if (a->waiting_peer >= a->nthreads && a->head && !a->stopping &&
        a->nthreads < ENG_MAX_ASYNC_THREADS && thread_add(e) == 0)
        KVF_DEBUG(BATCH_LOG, "engine %s: %u async threads (%u waiting for peers)", e->sid,
                  a->nthreads, a->waiting_peer);
    pthread_mutex_unlock(&a->lock);
    return true;
}

static void peer_wait_end(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->async.lock);
    e->async.waiting_peer--;
    pthread_mutex_unlock(&e->async.lock);
}

static void batch_run(kvf_batch_t *b)
{
    kvf_engine_t *e = b->e;
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0) {
        batch_drop(b, rc, "engine is being destroyed");
        return;
    }
    uint64_t deadline = kvf__now_ms() + e->cfg.op_timeout_ms;
    kvf_xfer_ctl_t ctl = {.status = b->status, .cancel = &b->cancel};
    if (atomic_load(&b->cancel))
        rc = kvf__err(-KVF_ECANCELED, "batch to %s cancelled before it started", b->peer);
    else if (b->n) {
        bool waits = peer_wait_begin(b);
        rc = kvf__eng_transfer(e, b->peer, b->x, b->n, deadline, &ctl);
        if (waits)
            peer_wait_end(e);
    }
    if (b->has_msg)
        rc = notify_in_order(e, b->order, b->seq, rc, &b->cancel, b->peer, b->msg, b->msg_len,
                             deadline);
    kvf__eng_busy_leave(e);
    batch_complete(b, rc, rc < 0 ? kvf_last_error() : "");
}

static void *batch_thread(void *arg)
{
    kvf_engine_t *e = arg;
    eng_async_t *a = &e->async;
    pthread_mutex_lock(&a->lock);
    for (;;) {
        while (!a->head && !a->stopping)
            pthread_cond_wait(&a->work, &a->lock);
        kvf_batch_t *b = a->head;
        if (!b)
            break;
        a->head = b->next;
        if (!a->head)
            a->tail = NULL;
        b->next = NULL;
        b->running = true;
        pthread_mutex_unlock(&a->lock);
        /* A cancel (the only other reader of this thread's flag) points the store waits of
         * this batch's peer lookup at it. */
        kvf__eng_cancel_flag = &b->cancel;
        batch_run(b);
        kvf__eng_cancel_flag = NULL;
        pthread_mutex_lock(&a->lock);
    }
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

/* One more async thread. Under async.lock. */
static int thread_add(kvf_engine_t *e)
{
    eng_async_t *a = &e->async;
    int rc = kvf__thread_start(&a->threads[a->nthreads], "kvf-batch", KVF_THREAD_SMALL_STACK,
                               batch_thread, e);
    if (rc)
        return kvf__err(rc, "engine %s: async thread: %s", e->sid, strerror(-rc));
    a->nthreads++;
    return 0;
}

/* Start the threads on the first submit (an engine that never submits has none). Under
 * async.lock. */
static int threads_start(kvf_engine_t *e)
{
    eng_async_t *a = &e->async;
    a->threads = calloc(ENG_MAX_ASYNC_THREADS, sizeof(*a->threads));
    if (!a->threads)
        return kvf__err(-KVF_ENOMEM, "engine %s: out of memory for async threads", e->sid);
    for (unsigned i = 0; i < e->cfg.async_threads; i++) {
        int rc = thread_add(e);
        if (rc && a->nthreads == 0) {
            free(a->threads);
            a->threads = NULL;
            return rc;
        }
        if (rc)
            break; /* run with fewer */
    }
    return 0;
}

/* One allocation holds the batch, its copy of the elements, their statuses and the message
 * (n <= ENG_MAX_BATCH, checked by the caller, so the size cannot overflow). */
static int batch_new(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                     const void *msg, size_t msg_len, kvf_batch_t **out)
{
    size_t size = sizeof(kvf_batch_t) + n * sizeof(kvf_xfer_t) + n * sizeof(int) + msg_len;
    kvf_batch_t *b = calloc(1, size);
    if (!b)
        return kvf__err(-KVF_ENOMEM, "submit to %s: out of memory for %zu elements", peer, n);
    int rc = kvf__cond_init_monotonic(&b->cv);
    if (rc) {
        free(b);
        return kvf__err(rc, "submit to %s: condition variable: %s", peer, kvf_strerror(rc));
    }
    pthread_mutex_init(&b->mu, NULL);
    b->e = e;
    snprintf(b->peer, sizeof(b->peer), "%s", peer);
    b->n = n;
    b->x = (kvf_xfer_t *)(b + 1);
    b->status = (int *)(b->x + n);
    b->msg = (unsigned char *)(b->status + n);
    b->has_msg = msg != NULL;
    b->msg_len = msg_len;
    atomic_init(&b->cancel, false);
    if (n)
        memcpy(b->x, x, n * sizeof(*x));
    for (size_t i = 0; i < n; i++)
        b->status[i] = KVF_XFER_PENDING;
    if (msg_len)
        memcpy(b->msg, msg, msg_len);
    *out = b;
    return 0;
}

int kvf_transfer_submit(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                        const void *msg, size_t msg_len, kvf_batch_t **out)
{
    kvf_batch_t *b = NULL;
    if (!out)
        return kvf__err(-KVF_EINVAL, "submit: the output pointer is NULL");
    *out = NULL;
    int rc = check_notify_args(e, peer, x, n, msg, msg_len, msg != NULL);
    if (rc < 0)
        return rc;
    if (kvf__eng_closing(e))
        return kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
    rc = batch_new(e, peer, x, n, msg, msg_len, &b);
    if (rc < 0)
        return rc;
    if (b->has_msg) {
        b->order = order_get(e, peer);
        if (!b->order) {
            batch_destroy(b);
            return -KVF_ENOMEM;
        }
    }

    eng_async_t *a = &e->async;
    uint64_t deadline = kvf__now_ms() + e->cfg.op_timeout_ms;
    pthread_mutex_lock(&a->lock);
    while (!a->stopping && !kvf__eng_closing(e) && a->inflight >= e->cfg.max_batches) {
        if (!e->cfg.submit_blocks || !kvf__cond_wait_until(&a->room, &a->lock, deadline)) {
            pthread_mutex_unlock(&a->lock);
            batch_destroy(b);
            return kvf__err(-KVF_EBUSY,
                            "submit to %s: %u batches in flight on engine %s "
                            "(config.max_batches %u)%s",
                            peer, e->cfg.max_batches, e->sid, e->cfg.max_batches,
                            e->cfg.submit_blocks ? ", still after op_timeout_ms" : "");
        }
    }
    if (a->stopping || kvf__eng_closing(e)) {
        pthread_mutex_unlock(&a->lock);
        batch_destroy(b);
        return kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
    }
    if (a->nthreads == 0) {
        rc = threads_start(e);
        if (rc < 0) {
            pthread_mutex_unlock(&a->lock);
            batch_destroy(b);
            return rc;
        }
    }
    /* Numbered under the queue lock, so numbers follow queue (= start) order. */
    if (b->has_msg)
        b->seq = order_take(e, b->order);
    a->inflight++;
    if (a->tail)
        a->tail->next = b;
    else
        a->head = b;
    a->tail = b;
    /* Every thread waits for a peer that has not appeared: one more for this batch. */
    if (a->waiting_peer >= a->nthreads && a->nthreads < ENG_MAX_ASYNC_THREADS)
        thread_add(e);
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->lock);
    *out = b;
    return 0;
}

int kvf_batch_status(kvf_batch_t *b, int *elem_status, size_t n)
{
    if (!b)
        return kvf__err(-KVF_EINVAL, "batch status: the batch is NULL");
    pthread_mutex_lock(&b->mu);
    bool done = b->done;
    int rc = b->rc;
    if (elem_status)
        for (size_t i = 0; i < n && i < b->n; i++)
            elem_status[i] = done ? b->status[i] : KVF_XFER_PENDING;
    if (done && rc < 0)
        kvf__err(rc, "%s", b->err);
    pthread_mutex_unlock(&b->mu);
    if (!done)
        return KVF_BATCH_PENDING;
    return rc < 0 ? rc : KVF_BATCH_DONE;
}

int kvf_batch_wait(kvf_batch_t *b, int timeout_ms)
{
    if (!b)
        return kvf__err(-KVF_EINVAL, "batch wait: the batch is NULL");
    uint64_t deadline = deadline_of(timeout_ms);
    pthread_mutex_lock(&b->mu);
    while (!b->done && kvf__cond_wait_until(&b->cv, &b->mu, deadline))
        ;
    pthread_mutex_unlock(&b->mu);
    return kvf_batch_status(b, NULL, 0);
}

int kvf_batch_cancel(kvf_batch_t *b)
{
    if (!b)
        return kvf__err(-KVF_EINVAL, "batch cancel: the batch is NULL");
    pthread_mutex_lock(&b->mu);
    if (b->settled) {
        pthread_mutex_unlock(&b->mu);
        return 0;
    }
    atomic_store(&b->cancel, true);
    /* Not settled, so the engine is still there (destroy waits for every batch to leave its
     * count, which batch_complete() does only after settling under this lock). */
    eng_async_t *a = &b->e->async;
    bool unlinked = false;
    pthread_mutex_lock(&a->lock);
    if (!b->running) {
        for (kvf_batch_t **pp = &a->head, *prev = NULL; *pp; prev = *pp, pp = &(*pp)->next) {
            if (*pp == b) {
                *pp = b->next;
                if (a->tail == b)
                    a->tail = prev;
                unlinked = true;
                break;
            }
        }
    }
    pthread_mutex_unlock(&a->lock);
    pthread_mutex_unlock(&b->mu);
    if (unlinked)
        batch_drop(b, -KVF_ECANCELED, "cancelled before it started");
    return 0;
}

size_t kvf_batch_size(const kvf_batch_t *b)
{
    return b ? b->n : 0;
}

void kvf_batch_free(kvf_batch_t *b)
{
    if (!b)
        return;
    kvf_batch_cancel(b);
    kvf_batch_wait(b, -1);
    batch_destroy(b);
}

/* ---- notifications received ----------------------------------------------------------------- */

int kvf__notify_deliver(void *engine, const char *sender, const void *msg, size_t len)
{
    kvf_engine_t *e = engine;
    eng_async_t *a = &e->async;
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
    pthread_mutex_lock(&a->nlock);
    while (a->ncount >= e->cfg.notify_queue_max) {
        if (kvf__eng_closing(e) || !kvf__cond_wait_until(&a->nroom, &a->nlock, deadline)) {
            pthread_mutex_unlock(&a->nlock);
            free(nt);
            if (kvf__eng_closing(e))
                return kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
            return kvf__err(-KVF_EBUSY,
                            "the notification queue of %s is full (%u queued, "
                            "config.notify_queue_max) and was not read for %u ms",
                            e->sid, e->cfg.notify_queue_max, NOTIFY_ROOM_WAIT_MS);
        }
    }
    if (a->ntail)
        a->ntail->next = nt;
    else
        a->nhead = nt;
    a->ntail = nt;
    a->ncount++;
    pthread_cond_broadcast(&a->ncond);
    pthread_mutex_unlock(&a->nlock);
    KVF_DEBUG(BATCH_LOG, "engine %s: notification of %zu bytes from %s", e->sid, len, sender);
    return 0;
}

/* Take up to @max queued notifications. Under nlock. */
static size_t notify_take(eng_async_t *a, kvf_notify_t *out, size_t max)
{
    size_t k = 0;
    while (k < max && a->nhead) {
        eng_notif_t *nt = a->nhead;
        a->nhead = nt->next;
        if (!a->nhead)
            a->ntail = NULL;
        a->ncount--;
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
        return kvf__err(-KVF_EINVAL, "notify wait: %s", !e ? "the engine is NULL"
                                                          : !out ? "the output array is NULL"
                                                                 : "max is 0");
    if (max > INT32_MAX)
        max = INT32_MAX;
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    eng_async_t *a = &e->async;
    uint64_t deadline = deadline_of(timeout_ms);
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

/* ---- peers ---------------------------------------------------------------------------------- */

int kvf_peer_wait(kvf_engine_t *e, const char *peer, uint32_t timeout_ms)
{
    kvf_hostport_t hp;
    if (!e || !peer)
        return kvf__err(-KVF_EINVAL, "peer wait: %s is NULL", !e ? "the engine" : "the peer");
    int rc = kvf__session_id_parse(peer, &hp);
    if (rc < 0)
        return rc;
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    char key[ENG_KEY_MAX];
    void *val;
    size_t len;
    kvf__eng_make_key(key, sizeof(key), e->ns, "sessions", peer);
    rc = kvf__eng_store_get_wait(e, key, timeout_ms, &val, &len);
    if (rc == 0)
        free(val);
    else if (rc == -KVF_ETIMEDOUT || rc == -KVF_ENOTFOUND)
        rc = kvf__err(-KVF_ETIMEDOUT, "peer %s did not appear in namespace %s within %u ms",
                      peer, e->ns, timeout_ms);
    kvf__eng_busy_leave(e);
    return rc;
}

/* Record a join or leave if it changes what is known. Under plock. */
static void peer_event_push(kvf_engine_t *e, kvf_peer_event_type_t type, const char *sid)
{
    eng_async_t *a = &e->async;
    eng_known_t **pp = &a->known;
    while (*pp && strcmp((*pp)->sid, sid))
        pp = &(*pp)->next;
    if (type == KVF_PEER_JOINED) {
        if (*pp)
            return; /* a re-publication (lease re-granted, record updated) */
        eng_known_t *k = calloc(1, sizeof(*k));
        if (!k) {
            KVF_WARN(BATCH_LOG, "engine %s: out of memory recording peer %s", e->sid, sid);
            return;
        }
        snprintf(k->sid, sizeof(k->sid), "%s", sid);
        k->next = a->known;
        a->known = k;
    } else {
        if (!*pp)
            return;
        eng_known_t *k = *pp;
        *pp = k->next;
        free(k);
    }
    if (a->ev_count == ENG_EVENTS_MAX) {
        KVF_WARN(BATCH_LOG, "engine %s: %u peer events unread; dropping the oldest", e->sid,
                 ENG_EVENTS_MAX);
        a->ev_head = (a->ev_head + 1) % ENG_EVENTS_MAX;
        a->ev_count--;
    }
    kvf_peer_event_t *ev = &a->events[(a->ev_head + a->ev_count) % ENG_EVENTS_MAX];
    ev->type = type;
    snprintf(ev->sid, sizeof(ev->sid), "%s", sid);
    a->ev_count++;
    pthread_cond_broadcast(&a->pcond);
}

/* The session id in a sessions key, or NULL for this engine's own or a foreign key. */
static const char *session_of(kvf_engine_t *e, const char *key)
{
    char prefix[ENG_KEY_MAX];
    kvf__eng_make_key(prefix, sizeof(prefix), e->ns, "sessions", "");
    size_t pl = strlen(prefix);
    if (strncmp(key, prefix, pl) || !key[pl] || !strcmp(key + pl, e->sid))
        return NULL;
    return key + pl;
}

static void peer_watch_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    kvf_engine_t *e = arg;
    const char *sid = session_of(e, kv->key);
    if (!sid)
        return;
    pthread_mutex_lock(&e->async.plock);
    peer_event_push(e, type == KVF_STORE_EVENT_PUT ? KVF_PEER_JOINED : KVF_PEER_LEFT, sid);
    pthread_mutex_unlock(&e->async.plock);
}

/* Watch first, then list: a session that appears in between is reported once. */
static int peer_subscribe(kvf_engine_t *e)
{
    eng_async_t *a = &e->async;
    char prefix[ENG_KEY_MAX];
    kvf__eng_make_key(prefix, sizeof(prefix), e->ns, "sessions", "");
    a->events = calloc(ENG_EVENTS_MAX, sizeof(*a->events));
    if (!a->events)
        return kvf__err(-KVF_ENOMEM, "engine %s: out of memory for peer events", e->sid);
    int rc = kvf_store_watch(e->store, prefix, peer_watch_cb, e, &a->watch_id);
    if (rc < 0)
        return kvf__err_wrap(rc, "engine %s: watching %s", e->sid, prefix);
    kvf_store_kv_t *kvs;
    size_t count;
    rc = kvf_store_list(e->store, prefix, &kvs, &count);
    if (rc < 0) {
        kvf_store_unwatch(e->store, a->watch_id);
        return kvf__err_wrap(rc, "engine %s: listing %s", e->sid, prefix);
    }
    pthread_mutex_lock(&a->plock);
    for (size_t i = 0; i < count; i++) {
        const char *sid = session_of(e, kvs[i].key);
        if (sid)
            peer_event_push(e, KVF_PEER_JOINED, sid);
    }
    a->subscribed = true;
    pthread_mutex_unlock(&a->plock);
    kvf_store_kv_free(kvs, count);
    return 0;
}

int kvf_peer_events(kvf_engine_t *e, kvf_peer_event_t *out, size_t max, int timeout_ms)
{
    if (!e || !out || max == 0)
        return kvf__err(-KVF_EINVAL, "peer events: %s", !e ? "the engine is NULL"
                                                           : !out ? "the output array is NULL"
                                                                  : "max is 0");
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    eng_async_t *a = &e->async;
    /* One subscriber at a time; the watch callback takes only plock, so this lock may be held
     * across the store calls. */
    pthread_mutex_lock(&a->sublock);
    pthread_mutex_lock(&a->plock);
    bool sub = a->subscribed;
    pthread_mutex_unlock(&a->plock);
    if (!sub)
        rc = peer_subscribe(e);
    pthread_mutex_unlock(&a->sublock);
    if (rc < 0) {
        kvf__eng_busy_leave(e);
        return rc;
    }

    uint64_t deadline = deadline_of(timeout_ms);
    size_t k = 0;
    pthread_mutex_lock(&a->plock);
    for (;;) {
        while (k < max && a->ev_count > 0) {
            out[k++] = a->events[a->ev_head];
            a->ev_head = (a->ev_head + 1) % ENG_EVENTS_MAX;
            a->ev_count--;
        }
        if (k)
            break;
        if (kvf__eng_closing(e)) {
            rc = kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
            break;
        }
        if (!kvf__cond_wait_until(&a->pcond, &a->plock, deadline))
            break;
    }
    pthread_mutex_unlock(&a->plock);
    kvf__eng_busy_leave(e);
    return rc < 0 ? rc : (int)k;
}

/* ---- lifetime ------------------------------------------------------------------------------- */

int kvf__async_init(kvf_engine_t *e)
{
    eng_async_t *a = &e->async;
    pthread_cond_t *conds[] = {&a->work, &a->room, &a->idle, &a->order_cond,
                               &a->ncond, &a->nroom, &a->pcond};
    size_t made = 0;
    int rc = 0;
    for (; made < KVF__ARRAY_SIZE(conds); made++) {
        rc = kvf__cond_init_monotonic(conds[made]);
        if (rc)
            break;
    }
    if (rc) {
        while (made > 0)
            pthread_cond_destroy(conds[--made]);
        return kvf__err(rc, "engine: condition variable: %s", kvf_strerror(rc));
    }
    pthread_mutex_init(&a->lock, NULL);
    pthread_mutex_init(&a->order_lock, NULL);
    pthread_mutex_init(&a->nlock, NULL);
    pthread_mutex_init(&a->plock, NULL);
    pthread_mutex_init(&a->sublock, NULL);
    return 0;
}

void kvf__async_wake(kvf_engine_t *e)
{
    eng_async_t *a = &e->async;
    pthread_mutex_lock(&a->lock);
    pthread_cond_broadcast(&a->room);
    pthread_mutex_unlock(&a->lock);
    pthread_mutex_lock(&a->nlock);
    pthread_cond_broadcast(&a->ncond);
    pthread_cond_broadcast(&a->nroom);
    pthread_mutex_unlock(&a->nlock);
    pthread_mutex_lock(&a->plock);
    pthread_cond_broadcast(&a->pcond);
    pthread_mutex_unlock(&a->plock);
}

void kvf__async_stop(kvf_engine_t *e)
{
    eng_async_t *a = &e->async;
    pthread_mutex_lock(&a->lock);
    a->stopping = true;
    kvf_batch_t *q = a->head;
    a->head = a->tail = NULL;
    pthread_cond_broadcast(&a->work);
    pthread_cond_broadcast(&a->room);
    pthread_mutex_unlock(&a->lock);
    /* In queue order, so that notification numbers settle in order. */
    while (q) {
        kvf_batch_t *next = q->next;
        batch_drop(q, -KVF_ECLOSED, "engine is being destroyed");
        q = next;
    }
    for (unsigned i = 0; i < a->nthreads; i++)
        pthread_join(a->threads[i], NULL);
    free(a->threads);
    a->threads = NULL;
    a->nthreads = 0;
    /* A batch a caller is cancelling right now may still be counted: wait for it. */
    pthread_mutex_lock(&a->lock);
    while (a->inflight)
        pthread_cond_wait(&a->idle, &a->lock);
    pthread_mutex_unlock(&a->lock);
}

void kvf__async_fini(kvf_engine_t *e)
{
    eng_async_t *a = &e->async;
    for (eng_order_t *o = a->orders, *next; o; o = next) {
        next = o->next;
        free(o->later);
        free(o);
    }
    for (eng_notif_t *nt = a->nhead, *next; nt; nt = next) {
        next = nt->next;
        free(nt);
    }
    for (eng_known_t *k = a->known, *next; k; k = next) {
        next = k->next;
        free(k);
    }
    free(a->events);
    pthread_cond_destroy(&a->work);
    pthread_cond_destroy(&a->room);
    pthread_cond_destroy(&a->idle);
    pthread_cond_destroy(&a->order_cond);
    pthread_cond_destroy(&a->ncond);
    pthread_cond_destroy(&a->nroom);
    pthread_cond_destroy(&a->pcond);
    pthread_mutex_destroy(&a->lock);
    pthread_mutex_destroy(&a->order_lock);
    pthread_mutex_destroy(&a->nlock);
    pthread_mutex_destroy(&a->plock);
    pthread_mutex_destroy(&a->sublock);
    memset(a, 0, sizeof(*a));
}
