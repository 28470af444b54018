/*
 * The shm sender's warmer: maps a peer's kvf_mem_alloc regions when their list is learned, and
 * warms the new mappings, on a thread of its own instead of in the first transfer.
 *
 * Why: on a guest under shadow paging (docs/performance.md, "Cold start") the first store into
 * each page through a new mapping costs about 5 us per 4 KiB page, even with MAP_POPULATE, and a
 * mapping made by the first transfer into a region made that transfer pay it page by page (the
 * first 64 KiB call of a bench run was 17-23 x the run's p50). Warming the whole mapping inside
 * the first transfer only moved the cost there. So the regions are handed to this thread when
 * shm_regions_changed() learns them (at the peer's open, and whenever its table changes): it
 * asks the target for each region's fd and maps it as a transfer would (shm_resolve_region),
 * then stores an atomic OR 0 into one byte of each page of the first SHM_WARM_MAX bytes (for at
 * most SHM_WARM_REGIONS_MAX regions per peer: the rest are asked about by a transfer). The
 * stores change no byte, even against the target's or another sender's concurrent writes.
 *
 * What a transfer sees meanwhile: nothing to wait for. A region the warmer has taken, or will
 * take, is written and read with process_vm_writev/readv until its mapping is made and warmed
 * (shm_rmap_t.ready): those calls reach the target's pages through the kernel, which touched
 * them at registration, so a first transfer into a new region costs about what a repeated one
 * over process_vm does, where waiting for the fd request (a round trip to the target's socket
 * thread, 0.2-0.35 ms on the machine measured) and copying through the cold mapping (about 7 us
 * per page: 17-20 ms for 9 MiB) made it 15-50 x a repeated one. The warmer touches a mapping only under map_lock (shared), in
 * chunks of SHM_WARM_CHUNK pages, after finding the region still published with the same
 * address, generation and mapping: regions_changed() (unregister, free) and peer_close() take
 * the lock exclusively before unmapping, so the warmer never touches unmapped memory, and a
 * change waits at most one chunk. peer_close() takes the peer out of the queue, or cancels and
 * waits out the warmer's work on it; destroy stops and joins the thread. The pages the warmer
 * touches are the peer's shared pages, already counted in the mapping: it allocates nothing in
 * proportion to them. It does not enter the target's fence: until this sender learns that the
 * target unregistered a region (its next transfer to the peer reads the new generation), the
 * warmer may still store into that memory, which is harmless because its stores change no byte.
 *
 * One thread per transport, started by the first region to warm; KVFERRY_NO_WARM=1 turns the
 * warmer off (regions are then mapped by their first transfer, unwarmed, as before).
 */
#include <pthread.h>
#include <stdatomic.h>

#include "common/thread.h"
#include "common/touch.h"
#include "transport/shm.h"

/* Pages warmed per hold of map_lock: about 80 us on the machine measured, the longest a region
 * change or a peer close waits for the warmer. */
#define SHM_WARM_CHUNK 16u
#define SHM_WARM_PAGE  4096u /* the smallest page; a huge page is touched several times */
/* The warmer's stack: it calls no deep code. */
#define SHM_WARM_STACK (128u << 10)

void shm_warm_init(struct shm_transport *t)
{
    pthread_mutex_init(&t->warm_lock, NULL);
    kvf__cond_init_monotonic(&t->warm_cv);
    atomic_init(&t->warm_cancel, false);
    atomic_init(&t->warm_regions, 0);
    atomic_init(&t->warm_pages, 0);
    atomic_init(&t->xfer_maps, 0);
    atomic_init(&t->xfer_unwarmed, 0);
}

/* The next region of @p still to warm, marked as taken, into @r; false when there is none, or
 * when the warmer already took SHM_WARM_REGIONS_MAX of this peer's. */
static bool warm_take(struct shm_peer *p, kvf_region_t *r)
{
    bool found = false;
    pthread_rwlock_wrlock(&p->map_lock);
    for (size_t i = 0; i < p->nrmaps && !found && p->warm_taken < SHM_WARM_REGIONS_MAX; i++) {
        if (!p->rmaps[i].warm_done) {
            p->rmaps[i].warm_done = true;
            p->warm_taken++;
            *r = p->rmaps[i].r;
            found = true;
        }
    }
    pthread_rwlock_unlock(&p->map_lock);
    return found;
}

/* Store into one byte of every page of [@a, @a+@len): an atomic OR 0, which changes nothing. */
static void warm_touch(uint8_t *a, size_t len)
{
    for (size_t off = 0; off < len; off += SHM_WARM_PAGE)
        atomic_fetch_or_explicit((_Atomic unsigned char *)(void *)(a + off), 0,
                                 memory_order_relaxed);
}

/* Warm the first SHM_WARM_MAX bytes of @r's mapping, a chunk per hold of map_lock, while it is
 * still published as mapped and nobody cancels. Returns whether it warmed them all. */
static bool warm_region(struct shm_transport *t, struct shm_peer *p, const kvf_region_t *r)
{
    size_t cap = r->len < SHM_WARM_MAX ? (size_t)r->len : SHM_WARM_MAX;
    size_t chunk = (size_t)SHM_WARM_CHUNK * SHM_WARM_PAGE;
    for (size_t off = 0; off < cap && !atomic_load(&t->warm_cancel); off += chunk) {
        size_t len = cap - off < chunk ? cap - off : chunk;
        pthread_rwlock_rdlock(&p->map_lock);
        shm_rmap_t *e = shm_rmap_find(p, r->addr, r->len);
        bool live = e && e->r.addr == r->addr && e->r.gen == r->gen && e->state == SHM_R_MAPPED;
        if (live)
            warm_touch(e->map + off, len);
        pthread_rwlock_unlock(&p->map_lock);
        if (!live)
            return false;
        atomic_fetch_add(&t->warm_pages, (len + SHM_WARM_PAGE - 1) / SHM_WARM_PAGE);
        if (t->test_warm_hook)
            t->test_warm_hook(t->test_warm_arg);
    }
    return !atomic_load(&t->warm_cancel);
}

/* @r is warm: transfers may copy through its mapping from now on. */
static void warm_ready(struct shm_peer *p, const kvf_region_t *r)
{
    pthread_rwlock_wrlock(&p->map_lock);
    shm_rmap_t *e = shm_rmap_find(p, r->addr, r->len);
    if (e && e->r.addr == r->addr && e->r.gen == r->gen && e->state == SHM_R_MAPPED)
        e->ready = true;
    pthread_rwlock_unlock(&p->map_lock);
}

static void *warm_main(void *arg)
{
    struct shm_transport *t = arg;
    pthread_mutex_lock(&t->warm_lock);
    for (;;) {
        while (!t->warm_stop && !t->warm_head)
            pthread_cond_wait(&t->warm_cv, &t->warm_lock);
        if (t->warm_stop)
            break;
        struct shm_peer *p = t->warm_head;
        t->warm_head = p->warm_next;
        p->warm_next = NULL;
        p->warm_queued = false;
        t->warm_cur = p;
        pthread_mutex_unlock(&t->warm_lock);

        kvf_region_t r;
        while (!atomic_load(&t->warm_cancel) && warm_take(p, &r)) {
            if (shm_resolve_region(p, &r, &t->warm_regions, false) && warm_region(t, p, &r))
                warm_ready(p, &r);
        }

        pthread_mutex_lock(&t->warm_lock);
        t->warm_cur = NULL;
        atomic_store(&t->warm_cancel, t->warm_stop);
        pthread_cond_broadcast(&t->warm_cv); /* peer_close and shm_warm_idle wait on it */
    }
    pthread_mutex_unlock(&t->warm_lock);
    return NULL;
}

void shm_warm_queue(struct shm_peer *p)
{
    struct shm_transport *t = p->t;
    if (!kvf__touch_enabled() || !p->sock[0])
        return;
    pthread_mutex_lock(&t->warm_lock);
    if (!t->warm_started && !t->warm_failed && !t->warm_stop) {
        if (kvf__thread_start(&t->warm_thread, "kvf-shm-warm", SHM_WARM_STACK, warm_main, t) == 0) {
            t->warm_started = true;
        } else {
            t->warm_failed = true; /* first transfers map their regions, as without a warmer */
            KVF_DEBUG(SHM_LOG, "%s: cannot start the warmer thread: first transfers map",
                      t->local_sid);
        }
    }
    /* Queued again even while it is being worked on: the warmer may have looked for work on it
     * just before this change, and looks again at a queued peer. */
    if (t->warm_started && !t->warm_stop && !p->warm_queued) {
        struct shm_peer **tail = &t->warm_head;
        while (*tail)
            tail = &(*tail)->warm_next;
        *tail = p;
        p->warm_next = NULL;
        p->warm_queued = true;
        pthread_cond_broadcast(&t->warm_cv);
    }
    pthread_mutex_unlock(&t->warm_lock);
}

void shm_warm_forget(struct shm_peer *p)
{
    struct shm_transport *t = p->t;
    pthread_mutex_lock(&t->warm_lock);
    if (p->warm_queued) {
        for (struct shm_peer **q = &t->warm_head; *q; q = &(*q)->warm_next) {
            if (*q == p) {
                *q = p->warm_next;
                break;
            }
        }
        p->warm_queued = false;
        p->warm_next = NULL;
    }
    /* Bounded: the warmer looks at the flag between chunks and between regions; a fd request
     * under way ends within the socket timeouts. */
    while (t->warm_cur == p) {
        atomic_store(&t->warm_cancel, true);
        pthread_cond_wait(&t->warm_cv, &t->warm_lock);
    }
    pthread_mutex_unlock(&t->warm_lock);
}

void shm_warm_stop(struct shm_transport *t)
{
    pthread_mutex_lock(&t->warm_lock);
    t->warm_stop = true;
    atomic_store(&t->warm_cancel, true);
    pthread_cond_broadcast(&t->warm_cv);
    bool join = t->warm_started;
    pthread_mutex_unlock(&t->warm_lock);
    if (join)
        pthread_join(t->warm_thread, NULL);
    pthread_mutex_destroy(&t->warm_lock);
    pthread_cond_destroy(&t->warm_cv);
}

int shm_warm_idle(struct shm_transport *t, uint64_t deadline_ms)
{
    int rc = 0;
    pthread_mutex_lock(&t->warm_lock);
    while ((t->warm_head || t->warm_cur) && rc == 0)
        if (!kvf__cond_wait_until(&t->warm_cv, &t->warm_lock, deadline_ms))
            rc = -KVF_ETIMEDOUT;
    pthread_mutex_unlock(&t->warm_lock);
    return rc;
}
