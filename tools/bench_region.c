/*
 * The cold-start probe of `kvferry bench` (issue 17's bar: the first transfer into a region at
 * most 1.5 x a repeated one). After the runs, BENCH_REGION_PROBES times: the target makes a new
 * region of its kind of memory (a "alloc" request), and this process, on its main thread, writes
 * one block of the first layout's size
 *
 *   twice into the run's buffer        warm_us: the path warm on this thread, the last of the two
 *   into the new region                first_us: learning the region and the first transfer
 *   into the new region again          repeat_us
 *   after BENCH_IDLE_MS of sleep, into the run's buffer
 *                                      after_idle_us: a warm region and path after the thread
 *                                      slept, which is what a bench thread's first call also is
 *
 * so that the first transfer into a region is timed apart from a new thread's first call
 * (first_transfer_us of each run) and from a call after idle time.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_run.h"
#include "clock.h"

/* One timed write of @len bytes from the start of the local buffer to @remote; -1 on failure
 * (the reason in kvf_last_error()). */
static double timed_write(bench_t *b, uint64_t remote, size_t len)
{
    uint64_t t0 = cli_now_ns();
    int rc = kvf_write(b->e, b->peer, b->local, remote, len);
    return rc < 0 ? -1 : (double)(cli_now_ns() - t0) / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median of @n values (the upper one of an even count). */
static double median(const double *v, unsigned n)
{
    double s[BENCH_REGION_PROBES];
    memcpy(s, v, n * sizeof(double));
    qsort(s, n, sizeof(double), cmp_double);
    return s[n / 2];
}

void bench_region_probe(bench_t *b, size_t len)
{
    bench_region_probe_t *r = &b->probe;
    char err[320];
    memset(r, 0, sizeof(*r));
    r->bytes = len;
    for (unsigned k = 0; k < BENCH_REGION_PROBES; k++) {
        uint64_t addr;
        if (bench_target_alloc(b, len, &addr, err, sizeof(err)) < 0) {
            snprintf(r->why, sizeof(r->why), "%s", err);
            return;
        }
        double w = timed_write(b, b->target_addr + b->base_off, len);
        if (w >= 0)
            w = timed_write(b, b->target_addr + b->base_off, len);
        double f = w >= 0 ? timed_write(b, addr, len) : -1;
        double s = f >= 0 ? timed_write(b, addr, len) : -1;
        struct timespec idle = {BENCH_IDLE_MS / 1000u, (long)(BENCH_IDLE_MS % 1000u) * 1000000L};
        if (s >= 0)
            nanosleep(&idle, NULL);
        double i = s >= 0 ? timed_write(b, b->target_addr + b->base_off, len) : -1;
        if (i < 0) {
            snprintf(r->why, sizeof(r->why), "writing %zu bytes: %s", len, kvf_last_error());
            return;
        }
        r->warm_us[k] = w;
        r->first_us[k] = f;
        r->repeat_us[k] = s;
        r->idle_us[k] = i;
        r->n = k + 1;
    }
    double ratio[BENCH_REGION_PROBES];
    for (unsigned k = 0; k < r->n; k++)
        ratio[k] = r->repeat_us[k] > 0 ? r->first_us[k] / r->repeat_us[k] : 0;
    r->first_over_repeat = median(ratio, r->n);
    printf("new region, %zu bytes (median of %u): first write %.1f us, repeated %.1f us "
           "(first / repeated %.2f); a warm write after %u ms idle %.1f us, without %.1f us\n",
           len, r->n, median(r->first_us, r->n), median(r->repeat_us, r->n), r->first_over_repeat,
           BENCH_IDLE_MS, median(r->idle_us, r->n), median(r->warm_us, r->n));
    fflush(stdout);
}
