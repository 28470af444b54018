/*
 * `kvferry bench`: kvferry's throughput and latency, beside baselines measured in the same run.
 *
 * Unless pointed at a running target (--target), it starts what it needs on 127.0.0.1: a config
 * store in this process and a target process (this binary re-executed as `kvferry bench --serve`,
 * a real second process, so shm is exercised and not the in-process path). The target registers
 * one buffer and publishes its address, size and pid in the store (bench_serve.c).
 *
 * Each run moves one layout (BATCH blocks of BLOCK bytes, or the kv workload) per
 * kvf_transfer_sync call, from THREADS threads at once, each into its own slice of the target
 * buffer, for --duration seconds or --iterations calls (each bounded by the other, or by
 * BENCH_ITER_CAP_S). Every call is timed; the first call of each thread is made before the clock
 * starts (connections, peer lookup, mappings) and reported apart as first_transfer_us (thread
 * 0's). After the timed part one more call per thread moves a fresh pattern and the target checks
 * a sample of its blocks (for reads: the target writes the pattern, this process checks), so a
 * fast wrong transport cannot pass. 1 GB = 10^9 bytes.
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
#include <strings.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "clock.h"

#define CMD                     "bench"
#define BENCH_MAX_SIZES         16
#define BENCH_ITER_CAP_S        300.0         /* bound on an --iterations run without --duration */
#define BENCH_CALL_CAP          1000000000ull /* bound on calls in a --duration run */
#define BENCH_MAX_THREADS       64u
#define BENCH_MAX_REPS          21u
#define BENCH_MAX_LOCAL         (16ull << 30) /* bytes of the local (and target) buffer */
#define BENCH_VERIFY_BLOCKS     16u           /* blocks checked per thread after each run */
#define BENCH_START_TIMEOUT_MS  30000u        /* the target process reporting ready */
#define BENCH_ANSWER_TIMEOUT_MS 60000u        /* the target answering a verification request */
#define BENCH_PINGPONG_MAX      (64u << 10) /* calls up to this size also get a ping-pong baseline */
#define BENCH_KV_LAYERS         61u         /* DeepSeek-R1 */
#define BENCH_KV_BIG            (128u << 10)
#define BENCH_KV_SMALL          (16u << 10)
#define BENCH_PAGE              4096u

typedef struct {
    kvf_transport_kind_t transport;
    kvf_op_t op;
    size_t sizes[BENCH_MAX_SIZES];
    size_t nsizes;
    uint64_t batch, threads, iterations, reps, window;
    double duration; /* 0 = not given */
    bool alloc;      /* target memory from kvf_mem_alloc */
    bool kv;
    bool baseline;
    size_t working_set;
    const char *target;
    const char *store_url;
    const char *session_id;
    const char *ns;
    const char *json_path;
    bool quiet;
} bench_args_t;

typedef struct {
    const char *name, *label;
    uint64_t calls, samples;
    double seconds, gbps, ops_per_s, calls_per_s;
    double p50_us, p99_us, max_us, mean_us, first_us;
    int rc;
    char err[320]; /* "thread N: " and the worker's message */
} bench_stats_t;

typedef struct {
    bench_args_t a;
    kvf_store_server_t *srv;
    kvf_store_t *st;
    const char *store_url;
    kvf_engine_t *e;
    char peer[KVF_SESSION_ID_MAX];
    pid_t child;
    uint64_t target_addr, target_len;
    pid_t target_pid;
    char target_memory[16];
    uint8_t *local, *scratch;
    size_t local_len, slice;
    const char *transport_used;
    json_t *runs;
    bool tty;
    unsigned run_no;
} bench_t;

/* ---------------------------------------------------------------------------------------------
 * Arguments
 * ------------------------------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kvferry bench [--transport auto|tcp|shm] [--op write|read]\n"
        "                     [--block-size SIZE[,SIZE...]] [--batch N] [--window N]\n"
        "                     [--threads N]\n"
        "                     [--duration SEC | --iterations N] [--memory alloc|registered]\n"
        "                     [--workload kv] [--baseline] [--reps N] [--working-set SIZE]\n"
        "                     [--target SESSION --store-url URL] [--json FILE] [--quiet]\n"
        "       kvferry bench --serve --store-url URL [--session-id IP:PORT] [--size SIZE]\n"
        "                     [--memory alloc|registered] [--transport T] [--ns NAME]\n"
        "       kvferry bench store [--clients N] [--seconds S] [--store-url URL] [--json FILE]\n\n"
        "Moves blocks into (or out of) a target's registered memory and reports GB/s\n"
        "(1 GB = 10^9 bytes), operations (blocks) per second and the latency of each\n"
        "kvf_transfer_sync call. Without --target it starts a store and a target process on\n"
        "127.0.0.1. Data is verified after each timed run.\n\n"
        "  --transport T       auto (default; shm to this host's target), tcp or shm\n"
        "  --op OP             write (default) into the target, or read from it\n"
        "  --block-size S      bytes per block, K/M/G suffixes (binary), a comma list or the\n"
        "                      flag repeated; one run each. Default 64K,1M,4M\n"
        "  --batch N           blocks per kvf_transfer_sync call, 1..%u, default 1\n"
        "  --window N          keep N calls in flight per thread as asynchronous batches\n"
        "                      (kvf_transfer_submit), 1..%u; default 1: kvf_transfer_sync.\n"
        "                      Latencies are then the intervals between completions\n"
        "  --threads N         initiator threads, each with its own slice, 1..%u, default 1\n"
        "  --duration SEC      seconds per run (default 2), 0.01..3600\n"
        "  --iterations N      calls per thread per run instead (bounded by --duration, else\n"
        "                      %.0f s)\n"
        "  --memory M          target memory: alloc (kvf_mem_alloc, default) or registered\n"
        "                      (ordinary memory passed to kvf_mem_register)\n"
        "  --workload kv       the DeepSeek-R1 layout: 61 x 128 KiB + 61 x 16 KiB discrete\n"
        "                      blocks in one call (replaces --block-size and --batch)\n"
        "  --baseline          also move the same blocks without kvferry, in this run: raw TCP\n"
        "                      send/recv (and a ping-pong for calls up to 64 KiB) for tcp;\n"
        "                      memcpy and process_vm_writev/readv for shm. Local target only\n"
        "  --reps N            repeat each run N times (1..%u, default 1), alternating with\n"
        "                      the baselines; figures are from the median repetition\n"
        "  --working-set S     bytes each thread cycles through, default 64M (at least one call)\n"
        "  --target SESSION    bench against a target started with `kvferry bench --serve`\n"
        "  --store-url URL     the store of --target (default: one in this process)\n"
        "  --session-id ID     this engine's session id, default the store's IP with port 0\n"
        "  --ns NAME           store namespace of the engines, default \"default\"\n"
        "  --json FILE         write every figure and the machine's description to FILE\n"
        "  --quiet             no progress line\n"
        "  --log-level N       0 debug, 1 info, 2 warn (default), 3 error\n\n"
        "Exit status: 0 all runs done and verified, 1 failure (a message says why), 2 usage.\n",
        BENCH_MAX_BLOCKS, BENCH_MAX_WINDOW, BENCH_MAX_THREADS, BENCH_ITER_CAP_S, BENCH_MAX_REPS);
}

static int parse_op(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    if (strcasecmp(value, "write") && strcasecmp(value, "read")) {
        fprintf(stderr, "kvferry %s: --op %s: want write or read\n", cmd, value);
        return -1;
    }
    *(kvf_op_t *)o->dst = strcasecmp(value, "write") ? KVF_OP_READ : KVF_OP_WRITE;
    return 0;
}

/* --block-size: a comma list, or the flag repeated; the sizes add up. */
static int parse_block_sizes(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    bench_args_t *a = o->dst;
    char *list = strdup(value), *save = NULL;
    int bad = list ? 0 : -1;
    for (char *tok = strtok_r(list, ",", &save); !bad && tok; tok = strtok_r(NULL, ",", &save)) {
        if (a->nsizes == BENCH_MAX_SIZES) {
            fprintf(stderr, "kvferry %s: --block-size: at most %d sizes\n", cmd, BENCH_MAX_SIZES);
            bad = -1;
        } else {
            bad = bench_parse_size(cmd, "--block-size", tok, o->max, &a->sizes[a->nsizes++]);
        }
    }
    free(list);
    return bad;
}

static int parse_duration(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    double *duration = o->dst;
    char *end;
    errno = 0;
    *duration = strtod(value, &end);
    if (end == value || *end || errno || !(*duration >= 0.01 && *duration <= 3600)) {
        fprintf(stderr, "kvferry %s: --duration %s: want seconds from 0.01 to 3600\n", cmd, value);
        return -1;
    }
    return 0;
}

static int parse_workload(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    if (strcasecmp(value, "kv")) {
        fprintf(stderr, "kvferry %s: --workload %s: the only workload is kv\n", cmd, value);
        return -1;
    }
    *(bool *)o->dst = true;
    return 0;
}

/* Returns KVF_CLI_RUN to run, or the exit code (0 after --help, 2 after a usage error). */
static int parse_args(int argc, char **argv, bench_args_t *a)
{
    memset(a, 0, sizeof(*a));
    a->op = KVF_OP_WRITE;
    a->window = 1;
    a->threads = 1;
    a->reps = 1;
    a->alloc = true;
    a->working_set = 64u << 20;
    a->ns = "default";
    /* a->batch stays 0 unless --batch is given: --workload kv refuses it. */
    const kvf_cli_opt_t opts[] = {
        KVF_CLI_OPT_TRANSPORT(&a->transport),
        {"op", KVF_CLI_CUSTOM, &a->op, 0, 0, parse_op},
        {"block-size", KVF_CLI_CUSTOM, a, 0, 1ull << 30, parse_block_sizes},
        {"batch", KVF_CLI_U64, &a->batch, 1, BENCH_MAX_BLOCKS, NULL},
        {"window", KVF_CLI_U64, &a->window, 1, BENCH_MAX_WINDOW, NULL},
        {"threads", KVF_CLI_U64, &a->threads, 1, BENCH_MAX_THREADS, NULL},
        {"duration", KVF_CLI_CUSTOM, &a->duration, 0, 0, parse_duration},
        {"iterations", KVF_CLI_U64, &a->iterations, 1, 1000000000, NULL},
        {"memory", KVF_CLI_CUSTOM, &a->alloc, 0, 0, bench_opt_memory},
        {"workload", KVF_CLI_CUSTOM, &a->kv, 0, 0, parse_workload},
        {"baseline", KVF_CLI_FLAG, &a->baseline, 0, 0, NULL},
        {"working-set", KVF_CLI_CUSTOM, &a->working_set, 0, 4ull << 30, bench_opt_size},
        {"reps", KVF_CLI_U64, &a->reps, 1, BENCH_MAX_REPS, NULL},
        {"target", KVF_CLI_STR, &a->target, 0, 0, NULL},
        KVF_CLI_OPT_STORE_URL(&a->store_url),
        {"session-id", KVF_CLI_STR, &a->session_id, 0, 0, NULL},
        {"ns", KVF_CLI_STR, &a->ns, 0, 0, NULL},
        {"json", KVF_CLI_STR, &a->json_path, 0, 0, NULL},
        {"quiet", KVF_CLI_FLAG, &a->quiet, 0, 0, NULL},
        KVF_CLI_OPT_LOG_LEVEL,
        KVF_CLI_OPT_END,
    };
    const kvf_cli_t cli = {.cmd = CMD, .usage = usage, .opts = opts};
    int rc = kvf_cli_parse(&cli, argc, argv, NULL);
    if (rc != KVF_CLI_RUN)
        return rc;
    bool batch_given = a->batch != 0;
    if (!batch_given)
        a->batch = 1;
    if (a->kv && (a->nsizes || batch_given)) {
        fprintf(stderr, "kvferry " CMD ": --workload kv sets the blocks and the batch; drop "
                        "--block-size and --batch\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (!a->kv && a->nsizes == 0) {
        a->sizes[a->nsizes++] = 64u << 10;
        a->sizes[a->nsizes++] = 1u << 20;
        a->sizes[a->nsizes++] = 4u << 20;
    }
    if (a->target && !a->store_url) {
        fprintf(stderr, "kvferry " CMD ": --target needs --store-url, the store the target "
                        "was started with\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (a->target && a->baseline) {
        fprintf(stderr, "kvferry " CMD ": --baseline needs the local target (it writes into "
                        "the target process with process_vm_writev); drop --target\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (!a->iterations && a->duration == 0)
        a->duration = 2.0;
    return KVF_CLI_RUN;
}

/* ---------------------------------------------------------------------------------------------
 * Layouts
 * ------------------------------------------------------------------------------------------- */

static size_t page_up(size_t n)
{
    return (n + BENCH_PAGE - 1) & ~(size_t)(BENCH_PAGE - 1);
}

static void layout_finish(bench_layout_t *l, size_t end, size_t working_set)
{
    l->span = page_up(end);
    l->copies = working_set > l->span ? working_set / l->span : 1;
}

/* BATCH adjacent blocks of BLOCK bytes. */
static void layout_blocks(bench_layout_t *l, size_t block, size_t batch, size_t working_set)
{
    l->n = batch;
    for (size_t i = 0; i < batch; i++) {
        l->off[i] = i * block;
        l->len[i] = block;
    }
    l->bytes = block * batch;
    layout_finish(l, l->bytes, working_set);
}

/* The DeepSeek-R1 per-layer layout: per layer a 128 KiB and a 16 KiB block, each page-aligned
 * with a page of gap after it, so no two blocks are adjacent and none can be merged. */
static void layout_kv(bench_layout_t *l, size_t working_set)
{
    size_t pos = 0;
    l->n = 0;
    l->bytes = 0;
    for (unsigned layer = 0; layer < BENCH_KV_LAYERS; layer++) {
        for (unsigned k = 0; k < 2; k++) {
            size_t len = k ? BENCH_KV_SMALL : BENCH_KV_BIG;
            l->off[l->n] = pos;
            l->len[l->n++] = len;
            l->bytes += len;
            pos = page_up(pos + len) + BENCH_PAGE;
        }
    }
    layout_finish(l, pos, working_set);
}

static size_t layout_slice(const bench_layout_t *l)
{
    return l->span * l->copies;
}

/* ---------------------------------------------------------------------------------------------
 * The harness: THREADS threads each moving the layout again and again, timed
 * ------------------------------------------------------------------------------------------- */

static int kvf_call(bench_worker_t *w, size_t base)
{
    const bench_layout_t *l = w->lay;
    for (size_t i = 0; i < l->n; i++) {
        size_t o = base + l->off[i];
        w->x[i] = (kvf_xfer_t){
            .op = w->op, .local = w->local + o, .remote = w->remote + o, .len = l->len[i]};
    }
    int rc = kvf_transfer_sync(w->engine, w->peer, w->x, l->n);
    if (rc < 0)
        snprintf(w->err, sizeof(w->err), "kvf_transfer_sync: %s (%s)", kvf_last_error(),
                 kvf_err_name(rc));
    return rc;
}

static const bench_method_t bench_kvferry = {
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
    for (size_t i = 0; i < l->n; i++) {
        size_t o = base + l->off[i];
        w->x[i] = (kvf_xfer_t){
            .op = w->op, .local = w->local + o, .remote = w->remote + o, .len = l->len[i]};
    }
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

static const bench_method_t bench_kvferry_async = {
    .name = "kvferry",
    .label = "kvferry",
    .call = kvf_async_call,
    .finish = kvf_async_finish,
    .cleanup = kvf_async_cleanup,
};

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
    fprintf(stderr, "\r\033[K  %s: %.1f s, %" PRIu64 " calls, %.2f GB/s", what, s, calls,
            s > 0 ? (double)calls * (double)l->bytes / s / 1e9 : 0.0);
}

/* Run @m over @l from every thread; fill @st. */
static void run_method(bench_t *b, const bench_layout_t *l, const bench_method_t *m,
                       const char *what, bench_stats_t *st)
{
    unsigned n = (unsigned)b->a.threads;
    bench_thread_t *th = calloc(n, sizeof(*th));
    pthread_t *tid = calloc(n, sizeof(*tid));
    pthread_barrier_t go;
    atomic_int failed = 0;
    atomic_uint done = 0;
    unsigned started = 0;

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
            .remote = b->target_addr + i * b->slice,
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
        t->lat = malloc(BENCH_LAT_MAX * sizeof(uint64_t));
        if (!t->lat) {
            st->rc = -ENOMEM;
            snprintf(st->err, sizeof(st->err), "out of memory");
            goto out_threads;
        }
    }
    uint64_t t0 = cli_now_ns();
    for (; started < n; started++) {
        if (pthread_create(&tid[started], NULL, bench_thread_main, &th[started]) != 0) {
            /* The barrier needs every thread; without them all, none can run. */
            fprintf(stderr, "kvferry " CMD ": cannot start thread %u\n", started);
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

out_threads:
    for (unsigned i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
    pthread_barrier_destroy(&go);
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
    uint64_t *all = nlat ? malloc(nlat * sizeof(uint64_t)) : NULL;
    uint64_t k = 0;
    for (unsigned i = 0; all && i < started; i++) {
        memcpy(all + k, th[i].lat, th[i].nlat * sizeof(uint64_t));
        k += th[i].nlat;
    }
    if (all)
        qsort(all, nlat, sizeof(uint64_t), bench_cmp_u64);
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
    free(all);
    for (unsigned i = 0; i < started; i++)
        if (m->cleanup)
            m->cleanup(&th[i].w);
out:
    if (th)
        for (unsigned i = 0; i < n; i++)
            free(th[i].lat);
    free(th);
    free(tid);
}

/* ---------------------------------------------------------------------------------------------
 * The target: a local process, or one started elsewhere
 * ------------------------------------------------------------------------------------------- */

static void bench_key(const bench_t *b, const char *sub, char *key, size_t len)
{
    snprintf(key, len, BENCH_KEY_FMT, b->a.ns, b->peer, sub);
}

/* Start `kvferry bench --serve` as a child with @size bytes and read its session id from its
 * ready line. Returns 0 or -1 after saying why (the child, if any, is killed and reaped by
 * target_stop()). */
static int target_spawn(bench_t *b, size_t size)
{
    char sizes[32], *argv[20];
    int n = 0, pfd[2];
    snprintf(sizes, sizeof(sizes), "%zu", size);
    argv[n++] = "kvferry";
    argv[n++] = "bench";
    argv[n++] = "--serve";
    argv[n++] = "--store-url";
    argv[n++] = (char *)b->store_url;
    argv[n++] = "--session-id";
    argv[n++] = "127.0.0.1:0";
    argv[n++] = "--size";
    argv[n++] = sizes;
    argv[n++] = "--memory";
    argv[n++] = b->a.alloc ? "alloc" : "registered";
    argv[n++] = "--transport";
    argv[n++] = (char *)kvf_cli_transport_name(b->a.transport);
    argv[n++] = "--ns";
    argv[n++] = (char *)b->a.ns;
    argv[n] = NULL;

    if (pipe2(pfd, O_CLOEXEC) < 0) {
        fprintf(stderr, "kvferry " CMD ": pipe: %s\n", strerror(errno));
        return -1;
    }
    pid_t parent = getpid();
    b->child = fork();
    if (b->child < 0) {
        fprintf(stderr, "kvferry " CMD ": fork: %s\n", strerror(errno));
        close(pfd[0]);
        close(pfd[1]);
        return -1;
    }
    if (b->child == 0) {
        /* The target must not outlive this process, however it ends. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        dup2(pfd[1], 1);
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    close(pfd[1]);

    char line[512];
    size_t used = 0;
    uint64_t deadline = cli_now_ms() + BENCH_START_TIMEOUT_MS;
    int rc = -1;
    while (used + 1 < sizeof(line)) {
        uint64_t now = cli_now_ms();
        if (now >= deadline)
            break;
        struct pollfd p = {.fd = pfd[0], .events = POLLIN};
        int r = poll(&p, 1, (int)(deadline - now));
        if (r < 0 && errno == EINTR)
            continue;
        char ch;
        if (r <= 0 || read(pfd[0], &ch, 1) != 1)
            break;
        if (ch == '\n') {
            rc = 0;
            break;
        }
        line[used++] = ch;
    }
    close(pfd[0]);
    line[used] = '\0';
    const char *prefix = "bench target ";
    char *end = strstr(line, " ready");
    if (rc < 0 || strncmp(line, prefix, strlen(prefix)) || !end ||
        (size_t)(end - line) - strlen(prefix) >= sizeof(b->peer)) {
        fprintf(stderr,
                "kvferry " CMD ": the target process did not report ready within %u s%s%s\n",
                BENCH_START_TIMEOUT_MS / 1000u, used ? "; it said: " : "", line);
        return -1;
    }
    *end = '\0';
    memcpy(b->peer, line + strlen(prefix), (size_t)(end - line) - strlen(prefix) + 1);
    return 0;
}

/* Stop the local target (SIGTERM, then SIGKILL after 5 s) and reap it. */
static void target_stop(bench_t *b)
{
    if (b->child <= 0)
        return;
    kill(b->child, SIGTERM);
    uint64_t deadline = cli_now_ms() + 5000;
    int status;
    for (;;) {
        pid_t r = waitpid(b->child, &status, WNOHANG);
        if (r == b->child || (r < 0 && errno != EINTR))
            break;
        if (cli_now_ms() >= deadline) {
            kill(b->child, SIGKILL);
            waitpid(b->child, &status, 0);
            break;
        }
        poll(NULL, 0, 10);
    }
    b->child = 0;
}

/* Read the target's published buffer. */
static int target_info(bench_t *b)
{
    char key[BENCH_KEY_MAX];
    void *val;
    size_t len;
    bench_key(b, "info", key, sizeof(key));
    int rc = kvf_store_get(b->st, key, BENCH_START_TIMEOUT_MS, &val, &len);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "no target published %s", key);
        return -1;
    }
    json_t *info = json_loads(val, 0, NULL);
    free(val);
    json_int_t addr = json_integer_value(json_object_get(info, "addr"));
    json_int_t size = json_integer_value(json_object_get(info, "len"));
    const char *mem = json_string_value(json_object_get(info, "memory"));
    b->target_pid = (pid_t)json_integer_value(json_object_get(info, "pid"));
    if (!info || addr <= 0 || size <= 0 || !mem) {
        fprintf(stderr, "kvferry " CMD ": %s is not a bench target's record\n", key);
        json_decref(info);
        return -1;
    }
    b->target_addr = (uint64_t)addr;
    b->target_len = (uint64_t)size;
    snprintf(b->target_memory, sizeof(b->target_memory), "%s", mem);
    json_decref(info);
    return 0;
}

/* Send a verify or fill request to the target and wait for its answer. Returns 0, or -1 with
 * the reason in @err. */
static int target_request(bench_t *b, const char *cmd, uint64_t seed, json_t *blocks, char *err,
                          size_t errlen)
{
    char key[BENCH_KEY_MAX], sub[64];
    int64_t n;
    void *val = NULL;
    size_t len;
    bench_key(b, "seq", key, sizeof(key));
    int rc = kvf_store_add(b->st, key, 1, &n);
    if (rc == 0) {
        json_t *req =
            json_pack("{s:s,s:I,s:O}", "cmd", cmd, "seed", (json_int_t)seed, "blocks", blocks);
        char *text = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        snprintf(sub, sizeof(sub), "req/%" PRId64, n);
        bench_key(b, sub, key, sizeof(key));
        rc = text ? kvf_store_set(b->st, key, text, strlen(text), 0) : -KVF_ENOMEM;
        free(text);
    }
    if (rc == 0) {
        snprintf(sub, sizeof(sub), "ans/%" PRId64, n);
        bench_key(b, sub, key, sizeof(key));
        rc = kvf_store_get(b->st, key, BENCH_ANSWER_TIMEOUT_MS, &val, &len);
    }
    if (rc < 0) {
        snprintf(err, errlen, "asking the target to %s: %s (%s)", cmd, kvf_last_error(),
                 kvf_err_name(rc));
        return -1;
    }
    kvf_store_del(b->st, key);
    json_t *ans = json_loads(val, 0, NULL);
    free(val);
    int ok = json_is_true(json_object_get(ans, "ok"));
    if (!ok)
        snprintf(err, errlen, "%s",
                 json_string_value(json_object_get(ans, "error"))
                     ? json_string_value(json_object_get(ans, "error"))
                     : "the target sent a malformed answer");
    json_decref(ans);
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------------------------------------
 * Verification
 * ------------------------------------------------------------------------------------------- */

/* After the timed part: one more call per thread with a pattern no earlier call carried, then a
 * sample of its blocks compared where they landed. Returns the number of blocks checked, or -1
 * with the reason in @err. */
static int verify_run(bench_t *b, const bench_layout_t *l, char *err, size_t errlen)
{
    uint64_t seed = 0x5eed0000u + ++b->run_no;
    bool spread = l->n > BENCH_VERIFY_BLOCKS; /* else every block is checked */
    json_t *blocks = json_array();
    int checked = 0, rc = 0;
    kvf_xfer_t *x = calloc(l->n, sizeof(*x));

    if (!x || !blocks) {
        snprintf(err, errlen, "out of memory");
        rc = -1;
        goto out;
    }
    for (unsigned t = 0; t < b->a.threads; t++) {
        for (size_t k = 0; k < BENCH_VERIFY_BLOCKS && k < l->n; k++) {
            size_t i = spread ? k * (l->n - 1) / (BENCH_VERIFY_BLOCKS - 1) : k;
            json_array_append_new(blocks, json_pack("[i,I,I,I]", (int)t, (json_int_t)i,
                                                    (json_int_t)(t * b->slice + l->off[i]),
                                                    (json_int_t)l->len[i]));
        }
    }
    if (b->a.op == KVF_OP_READ && target_request(b, "fill", seed, blocks, err, errlen) < 0) {
        rc = -1;
        goto out;
    }
    for (unsigned t = 0; t < b->a.threads; t++) {
        uint8_t *local = b->local + t * b->slice;
        for (size_t i = 0; i < l->n; i++) {
            if (b->a.op == KVF_OP_WRITE)
                bench_pattern_fill(local + l->off[i], t * b->slice + l->off[i], l->len[i], seed);
            x[i] = (kvf_xfer_t){.op = b->a.op,
                                .local = local + l->off[i],
                                .remote = b->target_addr + t * b->slice + l->off[i],
                                .len = l->len[i]};
        }
        int r = kvf_transfer_sync(b->e, b->peer, x, l->n);
        if (r < 0) {
            snprintf(err, errlen, "the verification call of thread %u: %s (%s)", t,
                     kvf_last_error(), kvf_err_name(r));
            rc = -1;
            goto out;
        }
    }
    if (b->a.op == KVF_OP_WRITE) {
        if (target_request(b, "verify", seed, blocks, err, errlen) < 0) {
            rc = -1;
            goto out;
        }
    } else {
        size_t idx;
        json_t *blk;
        json_array_foreach(blocks, idx, blk)
        {
            json_int_t t = json_integer_value(json_array_get(blk, 0));
            json_int_t i = json_integer_value(json_array_get(blk, 1));
            uint64_t off = (uint64_t)json_integer_value(json_array_get(blk, 2));
            uint8_t got, want;
            ssize_t bad = bench_pattern_check(b->local + off, off, l->len[i], seed, &got, &want);
            if (bad >= 0) {
                snprintf(err, errlen,
                         "thread %lld block %lld (target offset %" PRIu64 ", %zu bytes): byte %zd "
                         "is 0x%02x, want 0x%02x",
                         (long long)t, (long long)i, off, l->len[i], bad, got, want);
                rc = -1;
                goto out;
            }
        }
    }
    checked = (int)json_array_size(blocks);
out:
    json_decref(blocks);
    free(x);
    return rc < 0 ? -1 : checked;
}

/* ---------------------------------------------------------------------------------------------
 * Output
 * ------------------------------------------------------------------------------------------- */

static json_t *stats_json(const bench_stats_t *s)
{
    return json_pack("{s:s,s:s,s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f}", "name", s->name, "label",
                     s->label, "calls", (json_int_t)s->calls, "seconds", s->seconds, "gbps",
                     s->gbps, "ops_per_s", s->ops_per_s, "calls_per_s", s->calls_per_s, "p50_us",
                     s->p50_us, "p99_us", s->p99_us, "max_us", s->max_us, "mean_us", s->mean_us,
                     "first_transfer_us", s->first_us);
}

static void print_header(void)
{
    printf("%-9s %-5s %-9s %5s %3s %8s %11s %9s %9s %9s %10s\n", "transport", "op", "block",
           "batch", "thr", "GB/s", "ops/s", "p50 us", "p99 us", "max us", "first us");
}

static void print_run(const bench_t *b, const bench_layout_t *l, const bench_stats_t *s)
{
    char block[32];
    if (b->a.kv)
        snprintf(block, sizeof(block), "kv");
    else
        bench_size_name(l->len[0], block, sizeof(block));
    printf("%-9s %-5s %-9s %5zu %3" PRIu64 " %8.2f %11.0f %9.1f %9.1f %9.1f %10.1f\n",
           b->transport_used, b->a.op == KVF_OP_WRITE ? "write" : "read", block, l->n, b->a.threads,
           s->gbps, s->ops_per_s, s->p50_us, s->p99_us, s->max_us, s->first_us);
}

static void print_baseline(const bench_stats_t *kvf, const bench_stats_t *s, bool latency)
{
    printf("  vs %-20s %8.2f GB/s  ratio %5.2f   p50 %8.1f us", s->label, s->gbps,
           s->gbps > 0 ? kvf->gbps / s->gbps : 0, s->p50_us);
    if (latency)
        printf("  p50 ratio %5.2f", s->p50_us > 0 ? kvf->p50_us / s->p50_us : 0);
    printf("\n");
}

static json_t *machine_json(void)
{
    struct utsname u;
    char model[256] = "unknown", host[256] = "";
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    while (f && fgets(line, sizeof(line), f)) {
        char *colon = strchr(line, ':');
        if (!strncmp(line, "model name", 10) && colon) {
            snprintf(model, sizeof(model), "%s", colon + 2);
            model[strcspn(model, "\n")] = '\0';
            break;
        }
    }
    if (f)
        fclose(f);
    uname(&u);
    gethostname(host, sizeof(host) - 1);
    return json_pack("{s:i,s:s,s:s,s:s,s:I}", "cores", (int)sysconf(_SC_NPROCESSORS_ONLN), "kernel",
                     u.release, "cpu_model", model, "hostname", host, "memory_bytes",
                     (json_int_t)sysconf(_SC_PHYS_PAGES) * (json_int_t)sysconf(_SC_PAGESIZE));
}

static int write_json(const bench_t *b, int argc, char **argv, bool ok)
{
    json_t *cmd = json_array();
    for (int i = 0; i < argc; i++)
        json_array_append_new(cmd, json_string(argv[i]));
    char when[64];
    time_t now = time(NULL);
    struct tm tm;
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
    json_t *root = json_pack(
        "{s:s,s:s,s:s,s:o,s:O,s:s,s:s,s:s,s:s,s:b,s:o,s:O}", "tool", "kvferry bench", "version",
        KVF_VERSION_STRING, "time", when, "machine", machine_json(), "command", cmd, "transport",
        b->transport_used ? b->transport_used : "none", "transport_requested",
        kvf_cli_transport_name(b->a.transport), "target", b->a.target ? b->a.target : "local",
        "target_memory", b->target_memory, "verified", ok, "runs_count",
        json_integer((json_int_t)json_array_size(b->runs)), "runs", b->runs);
    json_decref(cmd);
    int rc = json_dump_file(root, b->a.json_path, JSON_INDENT(2));
    json_decref(root);
    if (rc < 0) {
        fprintf(stderr, "kvferry " CMD ": cannot write %s: %s\n", b->a.json_path, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Runs
 * ------------------------------------------------------------------------------------------- */

/* The repetition of method @m with the median GB/s. */
static bench_stats_t *median_rep(bench_stats_t (*all)[3], unsigned reps, size_t m)
{
    unsigned idx[BENCH_MAX_REPS];
    for (unsigned i = 0; i < reps; i++)
        idx[i] = i;
    for (unsigned i = 1; i < reps; i++)
        for (unsigned j = i; j > 0 && all[idx[j]][m].gbps < all[idx[j - 1]][m].gbps; j--) {
            unsigned t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
    return &all[idx[reps / 2]][m];
}

/* One layout: REPS times kvferry then its baselines, verification after the last kvferry
 * repetition. Returns 0 or 1. */
static int bench_layout(bench_t *b, const bench_layout_t *l)
{
    bench_stats_t s, bs[2], all[BENCH_MAX_REPS][3];
    const bench_method_t *base[2];
    size_t nbase = 0;
    unsigned reps = (unsigned)b->a.reps;
    char what[128], block[32], err[512];
    int checked = 0;
    bool shm = false, latency = false;

    if (b->a.kv)
        snprintf(block, sizeof(block), "kv workload");
    else
        bench_size_name(l->len[0], block, sizeof(block));
    /* Repetitions alternate kvferry and its baselines, so that a burst of load from elsewhere
     * on the machine hits both alike; each method's figures are from its median repetition. */
    for (unsigned rep = 0; rep < reps; rep++) {
        snprintf(what, sizeof(what), "kvferry %s x %zu, %" PRIu64 " thread%s, rep %u/%u", block,
                 l->n, b->a.threads, b->a.threads > 1 ? "s" : "", rep + 1, reps);
        run_method(b, l, b->a.window > 1 ? &bench_kvferry_async : &bench_kvferry, what,
                   &all[rep][0]);
        if (!b->transport_used && kvf_engine_peer_transport(b->e, b->peer, &b->transport_used) < 0)
            b->transport_used = "?";
        if (all[rep][0].rc) {
            fprintf(stderr, "kvferry " CMD ": %s: %s\n", what, all[rep][0].err);
            return 1;
        }
        /* Before any baseline writes into the target (process_vm_writev does). */
        if (rep + 1 == reps) {
            checked = verify_run(b, l, err, sizeof(err));
            if (checked < 0) {
                fprintf(stderr, "kvferry " CMD ": verification failed after %s: %s\n", what, err);
                return 1;
            }
        }
        if (rep == 0 && b->a.baseline) {
            shm = !strcmp(b->transport_used, "shm");
            if (shm) {
                base[nbase++] = &bench_memcpy;
                base[nbase++] = b->a.op == KVF_OP_WRITE ? &bench_pvm_write : &bench_pvm_read;
            } else {
                base[nbase++] = &bench_raw_tcp;
                if (l->bytes <= BENCH_PINGPONG_MAX)
                    base[nbase++] = &bench_tcp_pingpong;
            }
            latency = !shm && l->bytes <= BENCH_PINGPONG_MAX;
        }
        for (size_t i = 0; i < nbase; i++) {
            snprintf(what, sizeof(what), "%s %s x %zu, rep %u/%u", base[i]->label, block, l->n,
                     rep + 1, reps);
            run_method(b, l, base[i], what, &all[rep][1 + i]);
            if (all[rep][1 + i].rc) {
                fprintf(stderr, "kvferry " CMD ": baseline %s: %s\n", base[i]->label,
                        all[rep][1 + i].err);
                return 1;
            }
        }
    }
    json_t *reps_json[3];
    for (size_t m = 0; m < 1 + nbase; m++) {
        bench_stats_t *pick = median_rep(all, reps, m);
        bench_stats_t *dst = m == 0 ? &s : &bs[m - 1];
        *dst = *pick;
        dst->first_us = all[0][m].first_us;
        reps_json[m] = json_array();
        for (unsigned rep = 0; rep < reps; rep++)
            json_array_append_new(reps_json[m], json_real(all[rep][m].gbps));
    }
    print_run(b, l, &s);
    for (size_t i = 0; i < nbase; i++)
        print_baseline(&s, &bs[i], latency && base[i] == &bench_tcp_pingpong);
    fflush(stdout);

    /* The primary baseline: what the transport is held against in DESIGN.md §4. */
    const bench_stats_t *primary = NULL, *lat = NULL;
    if (nbase)
        primary = shm && !b->a.alloc ? &bs[1] : &bs[0];
    if (latency)
        lat = &bs[1];
    else if (shm && nbase)
        lat = &bs[1];
    json_t *run = json_pack(
        "{s:s,s:s,s:s,s:s,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,"
        "s:I,s:b,s:i}",
        "transport", b->transport_used, "transport_requested", kvf_cli_transport_name(b->a.transport), "op",
        b->a.op == KVF_OP_WRITE ? "write" : "read", "memory", b->target_memory, "workload",
        b->a.kv ? "kv" : "blocks", "block_size", (json_int_t)(l->bytes / l->n), "batch",
        (json_int_t)l->n, "blocks", (json_int_t)l->n, "bytes_per_call", (json_int_t)l->bytes,
        "threads", (json_int_t)b->a.threads, "calls", (json_int_t)s.calls, "bytes",
        (json_int_t)(s.calls * l->bytes), "seconds", s.seconds, "gbps", s.gbps, "ops_per_s",
        s.ops_per_s, "calls_per_s", s.calls_per_s, "p50_us", s.p50_us, "p99_us", s.p99_us, "max_us",
        s.max_us, "mean_us", s.mean_us, "first_transfer_us", s.first_us, "latency_samples",
        (json_int_t)s.samples, "verified", 1, "verified_blocks", checked);
    json_object_set_new(run, "reps", json_integer((json_int_t)reps));
    json_object_set_new(run, "window", json_integer((json_int_t)b->a.window));
    json_object_set_new(run, "gbps_reps", reps_json[0]);
    json_t *bl = json_array();
    for (size_t i = 0; i < nbase; i++) {
        json_t *j = stats_json(&bs[i]);
        json_object_set_new(j, "gbps_reps", reps_json[1 + i]);
        json_object_set_new(j, "ratio", json_real(bs[i].gbps > 0 ? s.gbps / bs[i].gbps : 0));
        json_object_set_new(j, "p50_ratio",
                            json_real(bs[i].p50_us > 0 ? s.p50_us / bs[i].p50_us : 0));
        json_array_append_new(bl, j);
    }
    json_object_set_new(run, "baselines", bl);
    json_object_set_new(run, "baseline", primary ? json_string(primary->name) : json_null());
    json_object_set_new(run, "base_gbps", primary ? json_real(primary->gbps) : json_null());
    json_object_set_new(run, "ratio",
                        primary && primary->gbps > 0 ? json_real(s.gbps / primary->gbps)
                                                     : json_null());
    json_object_set_new(run, "latency_baseline", lat ? json_string(lat->name) : json_null());
    json_object_set_new(run, "base_p50_us", lat ? json_real(lat->p50_us) : json_null());
    json_object_set_new(run, "p50_ratio",
                        lat && lat->p50_us > 0 ? json_real(s.p50_us / lat->p50_us) : json_null());
    json_array_append_new(b->runs, run);
    return 0;
}

/* The store, this process's engine and the target. Returns 0 or -1 after saying why. */
static int bench_setup(bench_t *b, size_t need)
{
    int rc;
    if (!b->a.store_url) {
        rc = kvf_store_server_start("tcp://127.0.0.1:0", &b->srv);
        if (rc < 0) {
            kvf_cli_fail(CMD, rc, "cannot start a config store on 127.0.0.1");
            return -1;
        }
        b->store_url = kvf_store_server_url(b->srv);
    } else {
        b->store_url = b->a.store_url;
    }
    rc = kvf_store_open(b->store_url, NULL, &b->st);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "cannot reach the config store at %s", b->store_url);
        return -1;
    }
    if (b->a.target) {
        char host[KVF_SESSION_ID_MAX];
        uint16_t port;
        /* The engine's spelling of the id, the one the target publishes its records under. */
        if (kvf_session_id_parse(b->a.target, host, sizeof(host), &port) < 0 ||
            kvf_session_id_format(host, port, b->peer, sizeof(b->peer)) < 0) {
            fprintf(stderr, "kvferry " CMD ": --target: %s\n", kvf_last_error());
            return -1;
        }
    } else if (target_spawn(b, need) < 0) {
        return -1;
    }
    if (target_info(b) < 0)
        return -1;
    if (b->target_len < need) {
        fprintf(stderr,
                "kvferry " CMD ": the target %s has %" PRIu64 " bytes; this run needs %zu "
                "(%" PRIu64 " threads x %zu); start it with --size %zu or more\n",
                b->peer, b->target_len, need, b->a.threads, b->slice, need);
        return -1;
    }
    char sid[KVF_SESSION_ID_MAX];
    if (b->a.session_id) {
        snprintf(sid, sizeof(sid), "%s", b->a.session_id);
    } else {
        char host[KVF_SESSION_ID_MAX];
        if (kvf_store_url_parse(b->store_url, NULL, host, sizeof(host), NULL) < 0 ||
            kvf_session_id_format(host, 0, sid, sizeof(sid)) < 0) {
            fprintf(stderr, "kvferry " CMD ": --store-url: %s\n", kvf_last_error());
            return -1;
        }
    }
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = b->a.transport;
    cfg.ns = b->a.ns;
    rc = kvf_engine_create(b->store_url, sid, KVF_ROLE_PREFILL, 0, &cfg, &b->e);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "cannot start an engine at %s", sid);
        return -1;
    }
    return 0;
}

static void bench_teardown(bench_t *b)
{
    kvf_engine_destroy(b->e);
    target_stop(b);
    kvf_store_close(b->st);
    kvf_store_server_stop(b->srv);
    if (b->local)
        munmap(b->local, b->local_len);
    if (b->scratch)
        munmap(b->scratch, b->local_len);
    json_decref(b->runs);
}

int kvf_cli_bench(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "store"))
        return kvf_cli_bench_store(argc - 1, argv + 1);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--serve"))
            return bench_serve_main(argc, argv);

    static bench_t bench;
    bench_t *b = &bench;
    int rc = parse_args(argc, argv, &b->a);
    if (rc != KVF_CLI_RUN)
        return rc;
    signal(SIGPIPE, SIG_IGN);
    b->tty = !b->a.quiet && isatty(2);

    static bench_layout_t layouts[BENCH_MAX_SIZES];
    size_t nlay = b->a.kv ? 1 : b->a.nsizes;
    for (size_t i = 0; i < nlay; i++) {
        if (b->a.kv)
            layout_kv(&layouts[i], b->a.working_set);
        else
            layout_blocks(&layouts[i], b->a.sizes[i], b->a.batch, b->a.working_set);
        if (layout_slice(&layouts[i]) > b->slice)
            b->slice = layout_slice(&layouts[i]);
    }
    if (b->slice > BENCH_MAX_LOCAL / b->a.threads) {
        fprintf(stderr,
                "kvferry " CMD ": --block-size x --batch x --threads needs %zu MiB per "
                "thread; at most %llu MiB in all\n",
                b->slice >> 20, (unsigned long long)(BENCH_MAX_LOCAL >> 20));
        return 2;
    }
    b->local_len = b->slice * b->a.threads;
    b->runs = json_array();
    b->local = bench_map(b->local_len);
    if (b->a.baseline)
        b->scratch = bench_map(b->local_len);
    if (!b->local || (b->a.baseline && !b->scratch)) {
        fprintf(stderr, "kvferry " CMD ": cannot map %zu bytes: %s\n", b->local_len,
                strerror(errno));
        bench_teardown(b);
        return 1;
    }
    /* The timed calls carry this pattern; the verification call a different one. */
    bench_pattern_fill(b->local, 0, b->local_len, 1);
    if (bench_setup(b, b->local_len) < 0) {
        bench_teardown(b);
        return 1;
    }

    int status = 0;
    print_header();
    for (size_t i = 0; i < nlay && status == 0; i++)
        status = bench_layout(b, &layouts[i]);
    if (status == 0 && b->tty)
        fprintf(stderr,
                "all runs verified (a sample of every run's blocks compared at the "
                "%s)\n",
                b->a.op == KVF_OP_WRITE ? "target" : "initiator");
    if (b->a.json_path && write_json(b, argc, argv, status == 0) < 0 && status == 0)
        status = 1;
    bench_teardown(b);
    return status;
}
