/*
 * kvferry as a method of `kvferry bench`, timed by the same harness as the baselines: one
 * kvf_transfer_sync call per layout, or with --window N the same calls as asynchronous batches.
 */
#include <stdio.h>

#include "bench.h"

/* The layout's blocks at @base as transfer elements, in w->x. */
static void fill_xfers(bench_worker_t *w, size_t base)
{
    const bench_layout_t *l = w->lay;
    for (size_t i = 0; i < l->n; i++) {
        size_t o = base + l->off[i];
        w->x[i] = (kvf_xfer_t){
            .op = w->op, .local = w->local + o, .remote = w->remote + o, .len = l->len[i]};
    }
}

static int kvf_call(bench_worker_t *w, size_t base)
{
    const bench_layout_t *l = w->lay;
    fill_xfers(w, base);
    int rc = kvf_transfer_sync(w->engine, w->peer, w->x, l->n);
    if (rc < 0)
        snprintf(w->err, sizeof(w->err), "kvf_transfer_sync: %s (%s)", kvf_last_error(),
                 kvf_err_name(rc));
    return rc;
}

static const bench_method_t kvferry_sync = {
    .name = "kvferry",
    .label = "kvferry",
    .call = kvf_call,
};

/* --window N: the same calls as asynchronous batches, N in flight per thread. A call submits
 * one and, with N already in flight, first waits for the oldest; so the timed figures count
 * completed transfers, and finish() waits for the rest. The first (untimed) call completes
 * before it returns, so first_transfer_us means the same as without a window. */
static int kvf_async_wait_oldest(bench_worker_t *w)
{
    kvf_batch_t *bt = w->ring[w->head];
    w->head = (w->head + 1) % w->window;
    w->inflight--;
    int rc = kvf_batch_wait(bt, -1);
    if (rc != KVF_BATCH_DONE)
        snprintf(w->err, sizeof(w->err), "batch: %s (%s)", kvf_last_error(),
                 rc < 0 ? kvf_err_name(rc) : "still pending");
    kvf_batch_free(bt);
    return rc == KVF_BATCH_DONE ? 0 : rc < 0 ? rc : -KVF_ETIMEDOUT;
}

static int kvf_async_finish(bench_worker_t *w)
{
    int rc = 0;
    while (w->inflight > 0) {
        int r = kvf_async_wait_oldest(w);
        if (rc == 0)
            rc = r;
    }
    return rc;
}

static int kvf_async_call(bench_worker_t *w, size_t base)
{
    const bench_layout_t *l = w->lay;
    fill_xfers(w, base);
    if (w->inflight == w->window) {
        int rc = kvf_async_wait_oldest(w);
        if (rc < 0)
            return rc;
    }
    kvf_batch_t *bt;
    int rc = kvf_transfer_submit(w->engine, w->peer, w->x, l->n, NULL, 0, &bt);
    if (rc < 0) {
        snprintf(w->err, sizeof(w->err), "kvf_transfer_submit: %s (%s)", kvf_last_error(),
                 kvf_err_name(rc));
        return rc;
    }
    w->ring[(w->head + w->inflight++) % w->window] = bt;
    if (!w->warmed) {
        w->warmed = true;
        return kvf_async_finish(w);
    }
    return 0;
}

static void kvf_async_cleanup(bench_worker_t *w)
{
    while (w->inflight > 0) {
        kvf_batch_free(w->ring[w->head]);
        w->head = (w->head + 1) % w->window;
        w->inflight--;
    }
}

static const bench_method_t kvferry_async = {
    .name = "kvferry",
    .label = "kvferry",
    .call = kvf_async_call,
    .finish = kvf_async_finish,
    .cleanup = kvf_async_cleanup,
};

const bench_method_t *bench_kvferry_method(unsigned window)
{
    return window > 1 ? &kvferry_async : &kvferry_sync;
}
