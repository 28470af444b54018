/*
 * Asynchronous batches: the part of the engine that sits on top of the synchronous data path
 * (kvf__eng_transfer) and of the notifications (notify.c).
 *
 * kvf_transfer_submit() copies the elements into a kvf_batch and queues it on the engine's FIFO;
 * config.async_threads threads (started on the first submit, or when kvf_peer_wait() found a
 * peer) take batches in order and run each
 * through the same path as kvf_transfer_sync(), with a per-element status array and a cancel
 * flag the transports honour between chunks (and the peer lookup while it waits for the peer
 * to appear). At most config.max_batches are in flight (submitted and not complete): beyond that
 * submit fails with -KVF_EBUSY or waits. A batch with a notification sends it after its data, in
 * the order of submission (see notify.c).
 *
 * A small write batch may be posted instead (batch_post, kvf__eng_post): sent from the
 * submitting thread and ended by whoever reads its answer, with no async thread; only when no
 * batch is queued (they still start in submission order) and with more than one async thread.
 *
 * Lock order: a tcp peer's mu (a posted batch ends under it) before batch->mu; batch->mu before
 * batches.lock; batches.lock before notify.order_lock; the engine's busy_lock (closing) is taken
 * inside batches.lock, never the other way round.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/thread.h"
#include "core/core.h"

#define BATCH_LOG  "batch"
#define ERRMSG_MAX 1024

struct kvf_batch {
    kvf_engine_t *e;
    struct kvf_batch *next; /* in the queue, under batches.lock */
    bool running;           /* taken by a thread; under batches.lock */
    bool open_only;         /* no owner, not counted in flight: opens the path to peer */
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
    eng_post_t post;   /* posted from the submitting thread (batch_post) */
    uint64_t deadline; /* a posted batch's, from its submit (kept if it runs again); else 0 */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool settled; /* result recorded, about to leave the engine's count; under mu */
    bool done;    /* under mu */
    int rc;
    char err[ERRMSG_MAX];
};

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
    eng_batches_t *a = &b->e->batches;
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
    if (b->open_only) {
        batch_destroy(b);
        return;
    }
    if (b->has_msg)
        kvf__notify_order_settle(b->e, b->order, b->seq);
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
    eng_batches_t *a = &e->batches;
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
    pthread_mutex_lock(&e->batches.lock);
    e->batches.waiting_peer--;
    pthread_mutex_unlock(&e->batches.lock);
}

static bool peer_wait_begin(kvf_batch_t *b);
static void peer_wait_end(kvf_engine_t *e);

/*
 * An open-only job (kvf__batch_open_peer): look the peer up, choose and open its path, and
 * connect what the path connects on first use (tcp: a connection; shm: the tcp connection its
 * notifications take), each bounded by init_timeout_ms as the first transfer's would be. A
 * failure is left for that transfer to meet and report.
 */
static void batch_open_run(kvf_batch_t *b)
{
    kvf_engine_t *e = b->e;
    eng_peer_t *p;
    if (kvf__eng_busy_enter(e) == 0) {
        bool waits = peer_wait_begin(b);
        int rc = kvf__peer_enter(e, b->peer, "opening the path", &b->cancel, &p);
        if (waits)
            peer_wait_end(e);
        if (rc == 0) {
            uint64_t deadline = kvf__now_ms() + e->cfg.init_timeout_ms;
            rc = p->tops->peer_alive(p->tp, deadline);
            if (rc == 0 && p->ntp)
                rc = p->nops->peer_alive(p->ntp, deadline);
            rc = kvf__peer_leave(p, rc, "opening the path");
        }
        if (rc < 0)
            KVF_DEBUG(BATCH_LOG, "engine %s: opening the path to %s ahead of a transfer: %s",
                      e->sid, b->peer, kvf_last_error());
        kvf__eng_busy_leave(e);
    }
    batch_destroy(b);
}

static void batch_run(kvf_batch_t *b)
{
    kvf_engine_t *e = b->e;
    if (b->open_only) {
        batch_open_run(b);
        return;
    }
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0) {
        batch_drop(b, rc, "engine is being destroyed");
        return;
    }
    uint64_t deadline = b->deadline ? b->deadline : kvf__now_ms() + e->cfg.op_timeout_ms;
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
        rc = kvf__notify_in_order(e, b->order, b->seq, rc, &b->cancel, b->peer, b->msg, b->msg_len,
                                  b->n > 0, deadline);
    kvf__eng_busy_leave(e);
    batch_complete(b, rc, rc < 0 ? kvf_last_error() : "");
}

static void *batch_thread(void *arg)
{
    kvf_engine_t *e = arg;
    eng_batches_t *a = &e->batches;
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
        batch_run(b);
        pthread_mutex_lock(&a->lock);
    }
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

/* One more async thread. Under batches.lock. */
static int thread_add(kvf_engine_t *e)
{
    eng_batches_t *a = &e->batches;
    int rc = kvf__thread_start(&a->threads[a->nthreads], "kvf-batch", KVF_THREAD_SMALL_STACK,
                               batch_thread, e);
    if (rc)
        return kvf__err(rc, "engine %s: async thread: %s", e->sid, strerror(-rc));
    a->nthreads++;
    return 0;
}

/* Start the threads on the first submit or kvf__batch_open_peer() (an engine that does neither
 * has none). Under batches.lock. */
static int threads_start(kvf_engine_t *e)
{
    eng_batches_t *a = &e->batches;
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

/* Add @b to the queue (at its head when @front, else its tail) and wake a thread; when every
 * thread waits for a peer that has not appeared, one more for this batch. Under batches.lock. */
static void queue_push_locked(kvf_engine_t *e, kvf_batch_t *b, bool front)
{
    eng_batches_t *a = &e->batches;
    if (front) {
        b->next = a->head;
        a->head = b;
        if (!a->tail)
            a->tail = b;
    } else {
        if (a->tail)
            a->tail->next = b;
        else
            a->head = b;
        a->tail = b;
    }
    if (a->waiting_peer >= a->nthreads && a->nthreads < ENG_MAX_ASYNC_THREADS)
        thread_add(e);
    pthread_cond_signal(&a->work);
}

/* Queue @b (counted in flight, not in the queue) after all, for the async threads: at the head,
 * since it was posted when nothing was queued, so whatever is queued now came after it. Dropped
 * when the engine is being destroyed (which may have emptied the queue already). */
static void batch_requeue(kvf_engine_t *e, kvf_batch_t *b)
{
    eng_batches_t *a = &e->batches;
    pthread_mutex_lock(&a->lock);
    if (a->stopping) {
        pthread_mutex_unlock(&a->lock);
        batch_drop(b, -KVF_ECLOSED, "engine is being destroyed");
        return;
    }
    b->running = false;
    queue_push_locked(e, b, true);
    pthread_mutex_unlock(&a->lock);
}

/* A posted batch ended (kvf__eng_post; on the thread that read its last answer, under its
 * transport's locks). An error the data path would have retried itself runs the batch again on
 * an async thread, as a queued batch, unless the caller cancelled it. */
static void batch_post_done(void *arg, int rc, const char *msg)
{
    kvf_batch_t *b = arg;
    if (rc < 0 && kvf__eng_post_rerun(rc) && !atomic_load(&b->cancel) &&
        kvf__now_ms() < b->deadline) {
        KVF_DEBUG(BATCH_LOG, "engine %s: posted batch to %s: %s; running it again", b->e->sid,
                  b->peer, msg);
        for (size_t i = 0; i < b->n; i++)
            b->status[i] = KVF_XFER_PENDING;
        batch_requeue(b->e, b);
        return;
    }
    char err[ERRMSG_MAX];
    if (rc < 0)
        snprintf(err, sizeof(err), "transfer to %s: %s", b->peer, msg);
    batch_complete(b, rc, rc < 0 ? err : "");
}

/*
 * Start @b (counted in flight) from the submitting thread when its path can take it at once
 * (kvf__eng_post): no hop to an async thread, and its answers complete it where they are read.
 * Otherwise it is queued for the async threads.
 */
static void batch_post(kvf_engine_t *e, kvf_batch_t *b)
{
    int rc = 1;
    if (kvf__eng_busy_enter(e) == 0) {
        b->post = (eng_post_t){.done = batch_post_done, .arg = b};
        b->deadline = kvf__now_ms() + e->cfg.op_timeout_ms;
        rc = kvf__eng_post(e, b->peer, b->x, b->n, b->deadline, b->status, &b->post);
        if (rc == 0)
            atomic_fetch_add_explicit(&e->batches.posted, 1, memory_order_relaxed);
        kvf__eng_busy_leave(e);
    }
    /* Posted, @b may be complete and freed by now. */
    if (rc != 0)
        batch_requeue(e, b);
}

uint64_t kvf__batch_posted(kvf_engine_t *e)
{
    return atomic_load_explicit(&e->batches.posted, memory_order_relaxed);
}

int kvf_transfer_submit(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                        const void *msg, size_t msg_len, kvf_batch_t **out)
{
    kvf_batch_t *b = NULL;
    if (!out)
        return kvf__err(-KVF_EINVAL, "submit: the output pointer is NULL");
    *out = NULL;
    int rc = kvf__notify_check_args(e, peer, x, n, msg, msg_len, msg != NULL);
    if (rc < 0)
        return rc;
    if (kvf__eng_closing(e))
        return kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
    rc = batch_new(e, peer, x, n, msg, msg_len, &b);
    if (rc < 0)
        return rc;
    if (b->has_msg) {
        b->order = kvf__notify_order_get(e, peer);
        if (!b->order) {
            batch_destroy(b);
            return -KVF_ENOMEM;
        }
    }

    eng_batches_t *a = &e->batches;
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
        b->seq = kvf__notify_order_take(e, b->order);
    /* Posted only when nothing is queued, so that batches still start in submission order,
     * and not with one async thread, where batches run one at a time, in order. */
    bool post = !b->has_msg && e->submit_posts && e->cfg.async_threads > 1 && !a->head;
    a->inflight++;
    if (!post) {
        queue_push_locked(e, b, false);
        pthread_mutex_unlock(&a->lock);
    } else {
        b->running = true; /* not in the queue, for kvf_batch_cancel */
        pthread_mutex_unlock(&a->lock);
        batch_post(e, b);
    }
    *out = b;
    return 0;
}

void kvf__batch_open_peer(kvf_engine_t *e, const char *peer)
{
    if (kvf__eng_peer_known(e, peer))
        return;
    kvf_batch_t *b = NULL;
    if (batch_new(e, peer, NULL, 0, NULL, 0, &b) < 0)
        return;
    b->open_only = true;
    eng_batches_t *a = &e->batches;
    pthread_mutex_lock(&a->lock);
    if (a->stopping || kvf__eng_closing(e) || (a->nthreads == 0 && threads_start(e) < 0)) {
        pthread_mutex_unlock(&a->lock);
        batch_destroy(b);
        return;
    }
    /* Queued like a batch, so a transfer submitted right after runs behind it and finds the
     * peer being looked up (it waits for that lookup rather than starting its own). */
    queue_push_locked(e, b, false);
    pthread_mutex_unlock(&a->lock);
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
    uint64_t deadline = eng_deadline_of(timeout_ms);
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
    eng_batches_t *a = &b->e->batches;
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

/* ---- lifetime ------------------------------------------------------------------------------- */
void kvf__batch_stop(kvf_engine_t *e)
{
    eng_batches_t *a = &e->batches;
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
