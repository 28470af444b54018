/*
 * `kvferry bench --procs N[,N...]`: N initiator processes writing into one target at once, the
 * shape of a Decode that serves many Prefills. Each process is this binary run as an ordinary
 * `kvferry bench --target SID` with its own slice of the target buffer (--slice-index) and its
 * own engine; they set up (engine, first write), say so on a pipe, and start their timed part
 * together when this process closes the other pipe (--sync-fds). Each verifies its own blocks as
 * any run does and writes its JSON; this process adds them up: aggregate GB/s over the span from
 * the first start to the last end (their clocks are the same CLOCK_MONOTONIC), each process's
 * p50/p99, and the target's threads and RSS sampled every SAMPLE_MS while they run.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_run.h"
#include "cli.h"
#include "clock.h"

#define SAMPLE_MS 50u

typedef struct {
    pid_t pid;
    char json[64];
    int status;
    bool reaped;
} proc_t;

/* Start initiator @k of @n; its argv is this command's flags that apply to one process, plus
 * what ties it to the run. Returns the pid or -1. */
static pid_t proc_start(const bench_t *b, const bench_layout_t *l, unsigned k, int go, int ready,
                        const char *json)
{
    char idx[16], fds[32], bs[32], batch[32], win[32], thr[32], dur[32], iters[32], ws[32];
    char *argv[40];
    int n = 0;
    snprintf(idx, sizeof(idx), "%u", k);
    snprintf(fds, sizeof(fds), "%d,%d", go, ready);
    snprintf(bs, sizeof(bs), "%zu", l->len[0]);
    snprintf(batch, sizeof(batch), "%zu", l->n);
    snprintf(win, sizeof(win), "%" PRIu64, b->a.window);
    snprintf(thr, sizeof(thr), "%" PRIu64, b->a.threads);
    snprintf(dur, sizeof(dur), "%g", b->a.duration);
    snprintf(iters, sizeof(iters), "%" PRIu64, b->a.iterations);
    snprintf(ws, sizeof(ws), "%zu", b->a.working_set);
    argv[n++] = "kvferry";
    argv[n++] = "bench";
    argv[n++] = "--target";
    argv[n++] = (char *)b->peer;
    argv[n++] = "--store-url";
    argv[n++] = (char *)b->store_url;
    argv[n++] = "--ns";
    argv[n++] = (char *)b->a.ns;
    argv[n++] = "--transport";
    argv[n++] = (char *)kvf_cli_transport_name(b->a.transport);
    argv[n++] = "--block-size";
    argv[n++] = bs;
    argv[n++] = "--batch";
    argv[n++] = batch;
    argv[n++] = "--window";
    argv[n++] = win;
    argv[n++] = "--threads";
    argv[n++] = thr;
    argv[n++] = "--working-set";
    argv[n++] = ws;
    if (b->a.duration > 0) {
        argv[n++] = "--duration";
        argv[n++] = dur;
    }
    if (b->a.iterations) {
        argv[n++] = "--iterations";
        argv[n++] = iters;
    }
    argv[n++] = "--slice-index";
    argv[n++] = idx;
    argv[n++] = "--sync-fds";
    argv[n++] = fds;
    argv[n++] = "--json";
    argv[n++] = (char *)json;
    argv[n++] = "--quiet";
    argv[n] = NULL;

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        /* Only these two pipe ends cross the exec; the table goes nowhere. */
        fcntl(go, F_SETFD, 0);
        fcntl(ready, F_SETFD, 0);
        int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (devnull >= 0)
            dup2(devnull, 1);
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    return pid;
}

/* The target's threads and RSS now, into the maxima. */
static void sample_target(const bench_t *b, long *threads_max, long *rss_max)
{
    long rss, shmem, thr;
    bench_proc_status(b->child, &rss, &shmem, NULL, &thr);
    if (thr > *threads_max)
        *threads_max = thr;
    if (rss > *rss_max)
        *rss_max = rss;
}

/* Reap whatever has ended, without waiting. Returns how many are still running. */
static unsigned reap_some(proc_t *p, unsigned n)
{
    unsigned running = 0;
    for (unsigned k = 0; k < n; k++) {
        if (p[k].reaped || p[k].pid <= 0)
            continue;
        pid_t r = waitpid(p[k].pid, &p[k].status, WNOHANG);
        if (r == p[k].pid || (r < 0 && errno == ECHILD))
            p[k].reaped = true;
        else
            running++;
    }
    return running;
}

static void kill_all(proc_t *p, unsigned n)
{
    for (unsigned k = 0; k < n; k++)
        if (!p[k].reaped && p[k].pid > 0)
            kill(p[k].pid, SIGKILL);
    for (unsigned k = 0; k < n; k++)
        if (!p[k].reaped && p[k].pid > 0) {
            waitpid(p[k].pid, &p[k].status, 0);
            p[k].reaped = true;
        }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One run of @n processes. Returns its JSON object, or NULL after saying why. */
static json_t *procs_one(bench_t *b, const bench_layout_t *l, unsigned n, const char *dir)
{
    proc_t *p = calloc(n, sizeof(*p));
    int go[2] = {-1, -1}, ready[2] = {-1, -1};
    json_t *out = NULL;
    long thr_idle, rss_idle, shmem_idle, thr_max = -1, rss_max = -1;
    bench_proc_status(b->child, &rss_idle, &shmem_idle, NULL, &thr_idle);

    if (!p || pipe2(go, O_CLOEXEC) < 0 || pipe2(ready, O_CLOEXEC) < 0) {
        fprintf(stderr, "kvferry " BENCH_CMD ": --procs: %s\n", strerror(errno));
        goto out;
    }
    for (unsigned k = 0; k < n; k++) {
        snprintf(p[k].json, sizeof(p[k].json), "%s/p%u-%u.json", dir, n, k);
        p[k].pid = proc_start(b, l, k, go[0], ready[1], p[k].json);
        if (p[k].pid < 0) {
            fprintf(stderr, "kvferry " BENCH_CMD ": --procs: fork: %s\n", strerror(errno));
            goto out;
        }
    }
    close(go[0]);
    close(ready[1]);
    go[0] = ready[1] = -1;
    /* Every process says ready once set up; one that fails first closes its end early. */
    uint64_t deadline = cli_now_ms() + BENCH_PROCS_READY_MS;
    for (unsigned got = 0; got < n;) {
        uint64_t now = cli_now_ms();
        struct pollfd pf = {.fd = ready[0], .events = POLLIN};
        int r = now < deadline ? poll(&pf, 1, (int)(deadline - now)) : 0;
        if (r < 0 && errno == EINTR)
            continue;
        char buf[64];
        ssize_t k = r > 0 ? read(ready[0], buf, sizeof(buf)) : 0;
        if (k <= 0) {
            fprintf(stderr,
                    "kvferry " BENCH_CMD ": --procs %u: %u of the processes were ready within "
                    "%u s\n",
                    n, got, BENCH_PROCS_READY_MS / 1000u);
            goto out;
        }
        got += (unsigned)k;
    }
    sample_target(b, &thr_max, &rss_max);
    close(go[1]); /* start */
    go[1] = -1;
    double limit = (b->a.duration > 0 ? b->a.duration : BENCH_ITER_CAP_S) + 120.0;
    deadline = cli_now_ms() + (uint64_t)(limit * 1000.0);
    while (reap_some(p, n) > 0) {
        if (cli_now_ms() >= deadline) {
            fprintf(stderr, "kvferry " BENCH_CMD ": --procs %u: processes still running after "
                            "%.0f s\n", n, limit);
            goto out;
        }
        sample_target(b, &thr_max, &rss_max);
        poll(NULL, 0, SAMPLE_MS);
    }

    uint64_t t0 = UINT64_MAX, t1 = 0, bytes = 0;
    double *p50 = calloc(n, sizeof(double)), *p99 = calloc(n, sizeof(double));
    json_t *each = json_array();
    bool ok = p50 && p99;
    for (unsigned k = 0; ok && k < n; k++) {
        if (!WIFEXITED(p[k].status) || WEXITSTATUS(p[k].status) != 0) {
            fprintf(stderr, "kvferry " BENCH_CMD ": --procs %u: process %u failed (status 0x%x)\n",
                    n, k, p[k].status);
            ok = false;
            break;
        }
        json_t *root = json_load_file(p[k].json, 0, NULL);
        json_t *run = json_array_get(json_object_get(root, "runs"), 0);
        if (!run) {
            fprintf(stderr, "kvferry " BENCH_CMD ": --procs %u: no run in %s\n", n, p[k].json);
            json_decref(root);
            ok = false;
            break;
        }
        uint64_t s = (uint64_t)json_integer_value(json_object_get(run, "t_start_ns"));
        uint64_t e = (uint64_t)json_integer_value(json_object_get(run, "t_end_ns"));
        t0 = s < t0 ? s : t0;
        t1 = e > t1 ? e : t1;
        bytes += (uint64_t)json_integer_value(json_object_get(run, "bytes"));
        p50[k] = json_real_value(json_object_get(run, "p50_us"));
        p99[k] = json_real_value(json_object_get(run, "p99_us"));
        json_array_append_new(
            each, json_pack("{s:i,s:f,s:f,s:f}", "proc", (int)k, "gbps",
                            json_real_value(json_object_get(run, "gbps")), "p50_us", p50[k],
                            "p99_us", p99[k]));
        json_decref(root);
        unlink(p[k].json);
    }
    if (ok && t1 > t0) {
        qsort(p50, n, sizeof(double), cmp_double);
        qsort(p99, n, sizeof(double), cmp_double);
        double gbps = (double)bytes / ((double)(t1 - t0) / 1e9) / 1e9;
        double spread = p99[0] > 0 ? p99[n - 1] / p99[0] : 0;
        printf("procs %3u  %8.2f GB/s aggregate  p50 %9.1f us (median)  p99 %9.1f..%9.1f us "
               "(x%.2f)  target %ld threads, %ld MiB RSS (idle before: %ld, %ld MiB)\n",
               n, gbps, p50[n / 2], p99[0], p99[n - 1], spread, thr_max, rss_max / 1024,
               thr_idle, rss_idle / 1024);
        fflush(stdout);
        out = json_pack("{s:i,s:I,s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:I,s:I,s:I,s:I,s:o}", "procs",
                        (int)n, "block_size", (json_int_t)l->len[0], "batch", (json_int_t)l->n,
                        "gbps", gbps, "seconds", (double)(t1 - t0) / 1e9, "p50_us_median",
                        p50[n / 2], "p99_us_min", p99[0], "p99_us_max", p99[n - 1], "p99_spread",
                        spread, "target_threads_max", (json_int_t)thr_max, "target_rss_kib_max",
                        (json_int_t)rss_max, "target_threads_idle", (json_int_t)thr_idle,
                        "target_rss_kib_idle", (json_int_t)rss_idle, "each", each);
        each = NULL;
    }
    json_decref(each);
    free(p50);
    free(p99);
out:
    if (p)
        kill_all(p, n);
    for (int i = 0; i < 2; i++) {
        if (go[i] >= 0)
            close(go[i]);
        if (ready[i] >= 0)
            close(ready[i]);
    }
    if (p)
        for (unsigned k = 0; k < n; k++)
            unlink(p[k].json);
    free(p);
    return out;
}

int bench_procs_run(bench_t *b, const bench_layout_t *l, int argc, char **argv)
{
    char dir[] = "/tmp/kvferry-procs-XXXXXX";
    if (!mkdtemp(dir)) {
        fprintf(stderr, "kvferry " BENCH_CMD ": --procs: mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    int status = 0;
    json_t *all = json_array();
    for (size_t i = 0; i < b->a.nprocs && status == 0; i++) {
        json_t *r = procs_one(b, l, (unsigned)b->a.procs[i], dir);
        if (!r)
            status = 1;
        else
            json_array_append_new(all, r);
    }
    rmdir(dir);
    if (status == 0 && b->a.json_path) {
        json_t *cmd = json_array();
        for (int i = 0; i < argc; i++)
            json_array_append_new(cmd, json_string(argv[i]));
        json_t *root = json_pack("{s:s,s:s,s:o,s:s,s:O}", "tool", "kvferry bench --procs",
                                 "version", KVF_VERSION_STRING, "command", cmd, "transport",
                                 kvf_cli_transport_name(b->a.transport), "procs_runs", all);
        if (json_dump_file(root, b->a.json_path, JSON_INDENT(2)) < 0) {
            fprintf(stderr, "kvferry " BENCH_CMD ": cannot write %s: %s\n", b->a.json_path,
                    strerror(errno));
            status = 1;
        }
        json_decref(root);
    }
    json_decref(all);
    return status;
}
