/*
 * The harness of `kvferry bench`: THREADS threads each moving the layout again and again, timed.
 * The first call of each thread is made before the clock starts and reported apart; then every
 * call's latency is kept (up to BENCH_LAT_MAX per thread) for the percentiles.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bench_run.h"
#include "clock.h"

typedef struct {
    bench_worker_t w;
    pthread_barrier_t *go;
    atomic_int *failed;
    atomic_uint *done;
    uint64_t iterations;
    uint64_t limit_ns;
    uint64_t *lat;
    uint64_t nlat, sum_ns, max_ns, first_ns;
    _Atomic uint64_t calls;
    uint64_t t_start, t_end;
    int rc;
} bench_thread_t;

static void *bench_thread_main(void *arg)
{
    bench_thread_t *t = arg;
    bench_worker_t *w = &t->w;
    const bench_layout_t *l = w->lay;
    int rc = w->m->start ? w->m->start(w) : 0;
    if (rc == 0) {
        uint64_t a = cli_now_ns();
        rc = w->m->call(w, 0);
        t->first_ns = cli_now_ns() - a;
    }
    if (rc)
        atomic_store(t->failed, 1);
    pthread_barrier_wait(t->go);

    uint64_t start = cli_now_ns(), prev = start, deadline = start + t->limit_ns, i = 0;
    t->t_start = start;
    while (rc == 0 && !atomic_load_explicit(t->failed, memory_order_relaxed) && i < t->iterations &&
           prev < deadline) {
        rc = w->m->call(w, ((i + 1) % l->copies) * l->span);
        uint64_t now = cli_now_ns(), d = now - prev;
        prev = now;
        if (t->nlat < BENCH_LAT_MAX)
            t->lat[t->nlat++] = d;
        t->sum_ns += d;
        if (d > t->max_ns)
            t->max_ns = d;
        atomic_store_explicit(&t->calls, ++i, memory_order_relaxed);
    }
    if (rc == 0 && w->m->finish)
        rc = w->m->finish(w);
    t->t_end = cli_now_ns();
    if (rc) {
        t->rc = rc;
        atomic_store(t->failed, 1);
    }
    atomic_fetch_add(t->done, 1);
    return NULL;
}

/* Room for @n latency samples, mapped rather than malloc'd: glibc keeps a freed block of
 * megabytes in its heap, resident, and the RSS report would count it as the engine's. */
static uint64_t *lat_map(size_t n)
{
    void *p = mmap(NULL, n * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void lat_unmap(uint64_t *p, size_t n)
{
    if (p)
        munmap(p, n * sizeof(uint64_t));
}

/* Nearest rank: the smallest sample with at least @p of them at or below it. */
static double percentile_us(const uint64_t *s, uint64_t n, double p)
{
    if (n == 0)
        return 0;
    uint64_t rank = (uint64_t)(p * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)s[rank - 1] / 1e3;
}

static void progress(bench_t *b, const char *what, bench_thread_t *th, unsigned n, uint64_t t0,
                     const bench_layout_t *l)
{
    uint64_t calls = 0;
    for (unsigned i = 0; i < n; i++)
        calls += atomic_load_explicit(&th[i].calls, memory_order_relaxed);
    double s = (double)(cli_now_ns() - t0) / 1e9;
    if (b->a.duration > 0 && s > b->a.duration)
        s = b->a.duration;
    /* Every run lasts --duration (a bound with --iterations): the time left is the rest of this
     * one and the runs still to come. */
    double eta = (double)(b->runs_total - b->runs_done - 1) * b->a.duration + b->a.duration - s;
    fprintf(stderr, "\r\033[K  run %u/%u, %s: %.1f s, %" PRIu64 " calls, %.2f GB/s",
            b->runs_done + 1, b->runs_total, what, s, calls,
            s > 0 ? (double)calls * (double)l->bytes / s / 1e9 : 0.0);
    if (b->a.duration > 0 && b->runs_total > b->runs_done)
        fprintf(stderr, ", ETA %.0f s", eta);
}

void bench_run_method(bench_t *b, const bench_layout_t *l, const bench_method_t *m,
                      const char *what, bench_stats_t *st)
{
    unsigned n = (unsigned)b->a.threads;
    bench_thread_t *th = calloc(n, sizeof(*th));
    pthread_t *tid = calloc(n, sizeof(*tid));
    pthread_barrier_t go;
    atomic_int failed = 0;
    atomic_uint done = 0;
    unsigned started = 0;
    pid_t target = b->child > 0 ? b->child : 0;
    double cpu0 = -1, tcpu0 = -1;

    memset(st, 0, sizeof(*st));
    st->name = m->name;
    st->label = m->label;
    if (!th || !tid) {
        st->rc = -ENOMEM;
        snprintf(st->err, sizeof(st->err), "out of memory");
        goto out;
    }
    pthread_barrier_init(&go, NULL, n);
    double limit = b->a.duration > 0 ? b->a.duration : BENCH_ITER_CAP_S;
    for (unsigned i = 0; i < n; i++) {
        bench_thread_t *t = &th[i];
        t->w = (bench_worker_t){
            .lay = l,
            .m = m,
            .idx = i,
            .op = b->a.op,
            .local = b->local + i * b->slice,
            .scratch = b->scratch ? b->scratch + i * b->slice : NULL,
            .remote = b->target_addr + b->base_off + i * b->slice,
            .engine = b->e,
            .window = (unsigned)b->a.window,
            .peer = b->peer,
            .target_pid = b->target_pid,
            .fd = -1,
            .rx_fd = -1,
        };
        t->go = &go;
        t->failed = &failed;
        t->done = &done;
        t->iterations = b->a.iterations ? b->a.iterations : BENCH_CALL_CAP;
        t->limit_ns = (uint64_t)(limit * 1e9);
        t->lat = lat_map(BENCH_LAT_MAX);
        if (!t->lat) {
            st->rc = -ENOMEM;
            snprintf(st->err, sizeof(st->err), "out of memory");
            goto out_threads;
        }
    }
    cpu0 = bench_proc_cpu_s(0);
    tcpu0 = target ? bench_proc_cpu_s(target) : 0;
    uint64_t t0 = cli_now_ns();
    for (; started < n; started++) {
        if (pthread_create(&tid[started], NULL, bench_thread_main, &th[started]) != 0) {
            /* The barrier needs every thread; without them all, none can run. */
            fprintf(stderr, "kvferry " BENCH_CMD ": cannot start thread %u\n", started);
            abort();
        }
    }
    /* Poll for the progress line only; completion is the join below. */
    while (b->tty && atomic_load(&done) < n) {
        poll(NULL, 0, 250);
        progress(b, what, th, n, t0, l);
    }
    if (b->tty)
        fprintf(stderr, "\r\033[K");
    b->runs_done++;

out_threads:
    for (unsigned i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
    pthread_barrier_destroy(&go);
    double cpu1 = bench_proc_cpu_s(0), tcpu1 = target ? bench_proc_cpu_s(target) : 0;
    st->cpu_s = cpu0 >= 0 && cpu1 >= 0 ? cpu1 - cpu0 : -1;
    if (st->cpu_s >= 0 && target && tcpu0 >= 0 && tcpu1 >= 0)
        st->cpu_s += tcpu1 - tcpu0;
    uint64_t tmin = UINT64_MAX, tmax = 0, total = 0, nlat = 0, sum = 0, max = 0;
    for (unsigned i = 0; i < started; i++) {
        bench_thread_t *t = &th[i];
        if (t->rc && !st->rc) {
            st->rc = t->rc;
            snprintf(st->err, sizeof(st->err), "thread %u: %s", i, t->w.err);
        }
        if (t->t_start < tmin)
            tmin = t->t_start;
        if (t->t_end > tmax)
            tmax = t->t_end;
        total += atomic_load(&t->calls);
        nlat += t->nlat;
        sum += t->sum_ns;
        if (t->max_ns > max)
            max = t->max_ns;
    }
    uint64_t *all = nlat ? lat_map(nlat) : NULL;
    uint64_t k = 0;
    for (unsigned i = 0; all && i < started; i++) {
        memcpy(all + k, th[i].lat, th[i].nlat * sizeof(uint64_t));
        k += th[i].nlat;
    }
    /* Not qsort(): see bench_sort.c. */
    if (nlat && (!all || bench_sort_u64(all, nlat) < 0)) {
        if (!st->rc) {
            st->rc = -ENOMEM;
            snprintf(st->err, sizeof(st->err), "cannot map %" PRIu64 " bytes to sort latencies",
                     nlat * (uint64_t)sizeof(uint64_t));
        }
        lat_unmap(all, nlat);
        all = NULL;
        nlat = 0;
    }
    st->calls = total;
    st->samples = nlat;
    st->seconds = tmax > tmin ? (double)(tmax - tmin) / 1e9 : 0;
    if (st->seconds > 0) {
        st->gbps = (double)total * (double)l->bytes / st->seconds / 1e9;
        st->calls_per_s = (double)total / st->seconds;
        st->ops_per_s = st->calls_per_s * (double)l->n;
    }
    st->p50_us = percentile_us(all, nlat, 0.50);
    st->p99_us = percentile_us(all, nlat, 0.99);
    st->max_us = (double)max / 1e3;
    st->mean_us = total ? (double)sum / (double)total / 1e3 : 0;
    st->first_us = started ? (double)th[0].first_ns / 1e3 : 0;
    st->t_start_ns = tmin == UINT64_MAX ? 0 : tmin;
    st->t_end_ns = tmax;
    /* Every thread's first call ran inside the CPU window too. */
    double moved = (double)(total + started) * (double)l->bytes / 1e9;
    st->cpu_s_per_gb = st->cpu_s >= 0 && moved > 0 ? st->cpu_s / moved : -1;
    lat_unmap(all, nlat);
    for (unsigned i = 0; i < started; i++)
        if (m->cleanup)
            m->cleanup(&th[i].w);
out:
    if (th)
        for (unsigned i = 0; i < n; i++)
            lat_unmap(th[i].lat, BENCH_LAT_MAX);
    free(th);
    free(tid);
}
