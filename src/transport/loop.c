/*
 * The loop transport: source and target are engines of the same process. A transfer is a
 * memmove to or from the target engine's memory, each element under a reference on the target's
 * region, taken from the target's own table (the same authoritative check and unregister drain
 * as a remote target's). A notification goes straight to the target's callback.
 *
 * Every started loop transport of this process is in one registry, so that a sender finds its
 * target by session id. The registry's mutex is held only to find a target and count a use of
 * it; the transfer or notification runs on that use, outside the mutex, so that a long copy or a
 * notification waiting up to 2 s for room in one target holds up no other engine's start or
 * stop. stop() unlinks the target (no new use can find it) and waits for its uses to end.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/regions.h"
#include "transport/transport.h"

/* A transfer into a target, for the message of an unregister that times out (holders()). */
struct loop_hold {
    struct loop_hold *next;
    const char *sid;            /* the sender */
    _Atomic uint64_t lo, hi;    /* the element being copied: [lo, hi); hi 0: none */
};

struct loop_transport {
    struct loop_transport *next; /* in loop_all, once started */
    bool linked;                 /* under loop_all_mu */
    unsigned uses;               /* transfers and notifications into it now; loop_all_mu */
    char sid[KVF_SESSION_ID_MAX];
    kvf_region_table_t *regions;
    kvf_notify_cb notify_cb;
    void *notify_arg;
    pthread_mutex_t hold_mu; /* holds */
    struct loop_hold *holds;
};

/* A handle on a target: only its session id, looked up again on every call, so that a target
 * destroyed meanwhile is noticed (-KVF_EPEERGONE) instead of touched. */
struct loop_peer {
    char sid[KVF_SESSION_ID_MAX];
    char local_sid[KVF_SESSION_ID_MAX]; /* the sender, as notifications name it */
};

static pthread_mutex_t loop_all_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t loop_unused = PTHREAD_COND_INITIALIZER; /* a use ended */
static struct loop_transport *loop_all;

static struct loop_transport *loop_of(kvf_transport_t *t)
{
    return (struct loop_transport *)(void *)t;
}

static struct loop_peer *loop_peer_of(kvf_tpeer_t *p)
{
    return (struct loop_peer *)(void *)p;
}

/* The started transport of @sid, or NULL. loop_all_mu held. */
static struct loop_transport *loop_find_locked(const char *sid)
{
    for (struct loop_transport *x = loop_all; x; x = x->next)
        if (!strcmp(x->sid, sid))
            return x;
    return NULL;
}

/* The started transport of @sid with one more use (end it with loop_unuse()), or NULL. */
static struct loop_transport *loop_use(const char *sid)
{
    pthread_mutex_lock(&loop_all_mu);
    struct loop_transport *t = loop_find_locked(sid);
    if (t)
        t->uses++;
    pthread_mutex_unlock(&loop_all_mu);
    return t;
}

static void loop_unuse(struct loop_transport *t)
{
    pthread_mutex_lock(&loop_all_mu);
    if (--t->uses == 0 && !t->linked)
        pthread_cond_broadcast(&loop_unused);
    pthread_mutex_unlock(&loop_all_mu);
}

/* Whether @sid is a started transport of this process. */
static bool loop_here(const char *sid)
{
    pthread_mutex_lock(&loop_all_mu);
    bool here = loop_find_locked(sid) != NULL;
    pthread_mutex_unlock(&loop_all_mu);
    return here;
}

static int loop_create(const kvf_transport_params_t *p, kvf_transport_t **out)
{
    if (!p || !out)
        return kvf__err(-KVF_EINVAL, "loop create: missing parameters");
    struct loop_transport *t = malloc(sizeof(*t));
    if (!t)
        return kvf__err(-KVF_ENOMEM, "loop transport: out of memory");
    *t = (struct loop_transport){
        .regions = p->regions, .notify_cb = p->notify_cb, .notify_arg = p->notify_arg};
    pthread_mutex_init(&t->hold_mu, NULL);
    snprintf(t->sid, sizeof(t->sid), "%s", p->local_sid ? p->local_sid : "");
    *out = (kvf_transport_t *)(void *)t;
    return 0;
}

static void loop_start(kvf_transport_t *tt)
{
    struct loop_transport *t = loop_of(tt);
    pthread_mutex_lock(&loop_all_mu);
    if (!t->linked) {
        t->next = loop_all;
        loop_all = t;
        t->linked = true;
    }
    pthread_mutex_unlock(&loop_all_mu);
}

/* Unlinked, so that no new transfer from another engine of this process can find it; then wait
 * for those running into it to leave. */
static void loop_stop(kvf_transport_t *tt)
{
    struct loop_transport *t = loop_of(tt);
    pthread_mutex_lock(&loop_all_mu);
    for (struct loop_transport **pp = &loop_all; t->linked && *pp; pp = &(*pp)->next) {
        if (*pp == t) {
            *pp = t->next;
            t->linked = false;
            break;
        }
    }
    while (t->uses)
        pthread_cond_wait(&loop_unused, &loop_all_mu);
    pthread_mutex_unlock(&loop_all_mu);
}

static void loop_destroy(kvf_transport_t *tt)
{
    loop_stop(tt);
    pthread_mutex_destroy(&loop_of(tt)->hold_mu);
    free(loop_of(tt));
}

static void loop_hold_link(struct loop_transport *t, struct loop_hold *h)
{
    pthread_mutex_lock(&t->hold_mu);
    h->next = t->holds;
    t->holds = h;
    pthread_mutex_unlock(&t->hold_mu);
}

static void loop_hold_unlink(struct loop_transport *t, struct loop_hold *h)
{
    pthread_mutex_lock(&t->hold_mu);
    for (struct loop_hold **pp = &t->holds; *pp; pp = &(*pp)->next) {
        if (*pp == h) {
            *pp = h->next;
            break;
        }
    }
    pthread_mutex_unlock(&t->hold_mu);
}

static size_t loop_holders(kvf_transport_t *tt, uint64_t addr, uint64_t len, char *buf,
                           size_t buflen)
{
    struct loop_transport *t = loop_of(tt);
    size_t n = 0;
    pthread_mutex_lock(&t->hold_mu);
    for (struct loop_hold *h = t->holds; h; h = h->next) {
        if (atomic_load(&h->hi) <= addr || atomic_load(&h->lo) >= addr + len)
            continue;
        char what[KVF_SESSION_ID_MAX + 32];
        snprintf(what, sizeof(what), "peer %s (this process)", h->sid);
        kvf__holders_add(buf, buflen, what);
        n++;
    }
    pthread_mutex_unlock(&t->hold_mu);
    return n;
}

/* Reachable only when the peer is a started engine of this process. */
static int loop_peer_open(kvf_transport_t *tt, const kvf_tpeer_desc_t *d, kvf_tpeer_t **out)
{
    if (!tt || !d || !d->sid || !out)
        return kvf__err(-KVF_EINVAL, "loop peer open: missing argument");
    if (!loop_here(d->sid))
        return kvf__err(-KVF_ENOTSUP, "peer %s is not an engine of this process", d->sid);
    struct loop_peer *p = calloc(1, sizeof(*p));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "loop peer open %s: out of memory", d->sid);
    snprintf(p->sid, sizeof(p->sid), "%s", d->sid);
    snprintf(p->local_sid, sizeof(p->local_sid), "%s", loop_of(tt)->sid);
    *out = (kvf_tpeer_t *)(void *)p;
    return 0;
}

static void loop_peer_close(kvf_tpeer_t *p)
{
    free(loop_peer_of(p));
}

/* A memcpy to or from an engine of this process, each element under a reference on the target's
 * region, taken from its own table (authoritative, and unregister drains it). */
static int loop_transfer(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                         const kvf_xfer_ctl_t *ctl)
{
    const char *sid = loop_peer_of(pp)->sid;
    int rc = 0;
    (void)deadline_ms;
    struct loop_hold hold = {.sid = loop_peer_of(pp)->local_sid};
    struct loop_transport *t = loop_use(sid);
    if (!t)
        rc = kvf__err(-KVF_EPEERGONE, "engine %s is no longer in this process", sid);
    else
        loop_hold_link(t, &hold);
    for (size_t i = 0; t && i < n && rc == 0; i++) {
        kvf_region_ref_t ref;
        if (ctl && ctl->cancel && atomic_load(ctl->cancel)) {
            rc = kvf__err(-KVF_ECANCELED, "cancelled before element %zu", i);
            break;
        }
        atomic_store(&hold.lo, x[i].remote);
        atomic_store(&hold.hi, x[i].remote + x[i].len);
        rc = kvf__regions_acquire(t->regions, x[i].remote, x[i].len, &ref);
        if (rc < 0) {
            kvf__err_wrap(rc, "element %zu (%s)", i, x[i].op == KVF_OP_WRITE ? "write" : "read");
            if (ctl && ctl->status)
                ctl->status[i] = rc;
            break;
        }
        void *remote = (void *)(uintptr_t)x[i].remote;
        /* memmove: in one address space the caller may name overlapping ranges. */
        if (x[i].op == KVF_OP_WRITE)
            memmove(remote, x[i].local, x[i].len);
        else
            memmove(x[i].local, remote, x[i].len);
        kvf__regions_release(t->regions, &ref);
        if (ctl && ctl->status)
            ctl->status[i] = 0;
    }
    if (t) {
        loop_hold_unlink(t, &hold);
        loop_unuse(t);
    }
    return rc;
}

static int loop_peer_alive(kvf_tpeer_t *pp, uint64_t deadline_ms)
{
    const char *sid = loop_peer_of(pp)->sid;
    (void)deadline_ms;
    return loop_here(sid) ? 0 : kvf__err(-KVF_EPEERGONE, "engine %s is no longer in this process", sid);
}

/* Straight into the target's queue: the data of every transfer this thread made into it is in
 * place already (the memmoves returned). */
static int loop_notify(kvf_tpeer_t *pp, const void *msg, size_t len, uint64_t deadline_ms)
{
    struct loop_peer *p = loop_peer_of(pp);
    int rc;
    (void)deadline_ms;
    struct loop_transport *t = loop_use(p->sid);
    if (!t)
        return kvf__err(-KVF_EPEERGONE, "engine %s is no longer in this process", p->sid);
    if (!t->notify_cb)
        rc = kvf__err(-KVF_ENOTSUP, "%s takes no notifications", t->sid);
    else
        rc = t->notify_cb(t->notify_arg, p->local_sid, msg, len);
    loop_unuse(t);
    return rc;
}

const struct kvf_transport_ops kvf__loop_ops = {
    .size = sizeof(struct kvf_transport_ops),
    .name = "loop",
    .caps = KVF_TCAP_NOTIFY,
    .check = KVF_CHECK_DIRECT,
    .create = loop_create,
    .port = kvf__transport_no_port, /* engines of this process find each other in the registry */
    .destroy = loop_destroy,
    .start = loop_start,
    .stop = loop_stop,
    .peer_open = loop_peer_open,
    .peer_close = loop_peer_close,
    .transfer = loop_transfer,
    .post = kvf__transport_no_post,
    .peer_alive = loop_peer_alive,
    .notify = loop_notify,
    .regions_gen = kvf__transport_enotsup_gen,
    .regions_read = kvf__transport_enotsup_regions,
    .regions_changed = kvf__transport_nop_regions,
    .regions_published = kvf__transport_nop_published,
    .mem_export = kvf__transport_nop_export,
    .mem_unexport = kvf__transport_nop_unexport,
    .mem_sock = kvf__transport_no_sock,
    .guard_enter = kvf__transport_no_guard_enter,
    .guard_leave = kvf__transport_no_guard_leave,
    .drain = kvf__transport_no_drain,
    .holders = loop_holders,
};
