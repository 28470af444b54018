/*
 * `kvferry bench` (the initiator side): what its files share.
 *
 *   cmd_bench.c      the runs: setup, each layout against its baselines, teardown
 *   bench_args.c     flags
 *   bench_layout.c   the blocks of one call
 *   bench_kvferry.c  kvferry as a method: kvf_transfer_sync, or --window N asynchronous batches
 *   bench_harness.c  THREADS threads moving a layout again and again, timed
 *   bench_target.c   the target: started here or elsewhere, asked to verify or fill
 *   bench_verify.c   the check after each timed run
 *   bench_report.c   the table and the JSON
 *
 * bench.h has what the target (bench_serve.c), the baselines and `bench store` share as well.
 */
#ifndef KVF_CLI_BENCH_RUN_H
#define KVF_CLI_BENCH_RUN_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "bench.h"

#define BENCH_CMD               "bench"
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
#define BENCH_MAX_BASE          3u /* baselines of one layout */
#define BENCH_PAGES_PER_LAYER   16u         /* --workload pages: pages of K and of V per layer */
#define BENCH_PAGE_BYTES        (16u << 10) /* --workload pages: one KV page */
#define BENCH_MAX_PROCS_RUNS    8u            /* values of --procs */
#define BENCH_MAX_PROCS         64u           /* initiator processes of one --procs run */
#define BENCH_PROCS_WORKING_SET (8u << 20)  /* --working-set default under --procs */
#define BENCH_PROCS_READY_MS    120000u     /* bound on N processes setting up, loaded machine */
#define BENCH_REGION_PROBES     3u          /* new regions the cold-start probe writes into */
#define BENCH_REGION_MAX        (16u << 20) /* bytes the probe writes, at most */
#define BENCH_IDLE_MS           200u        /* the probe's sleep before its after-idle write */

/* --workload: what one call moves. */
typedef enum {
    BENCH_WL_BLOCKS, /* --batch blocks of --block-size, adjacent */
    BENCH_WL_KV,     /* the DeepSeek-R1 layer layout */
    BENCH_WL_PAGES,  /* a paged KV cache, 1,952 discrete 16 KiB pages */
} bench_workload_t;

typedef struct {
    kvf_transport_kind_t transport;
    kvf_op_t op;
    size_t sizes[BENCH_MAX_SIZES];
    size_t nsizes;
    uint64_t batch, threads, iterations, reps, window;
    double duration; /* 0 = not given */
    bool alloc;      /* target memory from kvf_mem_alloc */
    bench_workload_t workload;
    bool baseline;
    size_t working_set;
    const char *target;
    const char *store_url;
    const char *session_id;
    const char *ns;
    const char *json_path;
    bool quiet;
    /* --procs N[,N...]: that many initiator processes into one local target, one run each. */
    uint64_t procs[BENCH_MAX_PROCS_RUNS];
    size_t nprocs;
    /* Set by --procs in its children: which slice of the target is theirs, and the two pipe
     * ends that start them together (--sync-fds GO,READY; -1 when not given). */
    uint64_t slice_index;
    int go_fd, ready_fd;
} bench_args_t;

typedef struct {
    const char *name, *label;
    uint64_t calls, samples;
    double seconds, gbps, ops_per_s, calls_per_s;
    double p50_us, p99_us, max_us, mean_us, first_us;
    /* CPU seconds of this process and of a target started here, from the threads' start to
     * their end (first calls included), per 10^9 bytes moved in that time. */
    double cpu_s, cpu_s_per_gb;
    uint64_t t_start_ns, t_end_ns; /* the timed part, CLOCK_MONOTONIC (--procs adds them up) */
    int rc;
    char err[320]; /* "thread N: " and the worker's message */
} bench_stats_t;

/* The cold-start probe (bench_region.c): microseconds of each write, per new region. */
typedef struct {
    size_t bytes;
    unsigned n; /* probes done */
    double warm_us[BENCH_REGION_PROBES], first_us[BENCH_REGION_PROBES];
    double repeat_us[BENCH_REGION_PROBES], idle_us[BENCH_REGION_PROBES];
    double first_over_repeat; /* median of first_us / repeat_us over the probes */
    char why[320];            /* why it stopped early, "" if it did not */
} bench_region_probe_t;

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
    /* kvf_engine_create() to the first write the target accepted (one 4 KiB block), ms. */
    double ready_ms;
    /* VmRSS (KiB) and threads of [0] this process and [1] a target started here (-1: unknown,
     * a --target elsewhere), [0] after the engine was created, before any transfer, and [1]
     * after the last run. */
    long rss_kib[2][2], shmem_kib[2][2], file_kib[2][2], nthreads[2][2];
    /* Where this process's slices start in the target buffer (--slice-index x local_len). */
    size_t base_off;
    bool tty;
    unsigned run_no;
    /* Timed runs done and expected in all (the baselines' number is known after the first). */
    unsigned runs_done, runs_total;
    bench_region_probe_t probe;
} bench_t;

/* ---- bench_args.c ------------------------------------------------------------------------ */

/* Returns KVF_CLI_RUN to run, or the exit code (0 after --help, 2 after a usage error). */
int bench_args_parse(int argc, char **argv, bench_args_t *a);

/* ---- bench_layout.c ---------------------------------------------------------------------- */

/* BATCH adjacent blocks of BLOCK bytes. */
void bench_layout_blocks(bench_layout_t *l, size_t block, size_t batch, size_t working_set);
/* The DeepSeek-R1 per-layer layout (--workload kv). */
void bench_layout_kv(bench_layout_t *l, size_t working_set);
/* A paged KV cache as the frameworks send it (--workload pages): per layer 16 K pages and 16 V
 * pages of 16 KiB, no two adjacent. */
void bench_layout_pages(bench_layout_t *l, size_t working_set);
/* The workload's name in reports and JSON: "blocks", "kv" or "pages". */
const char *bench_workload_name(bench_workload_t w);
/* Bytes of a thread's slice: every copy of the span. */
size_t bench_layout_slice(const bench_layout_t *l);

/* ---- bench_harness.c --------------------------------------------------------------------- */

/* Run @m over @l from every thread; fill @st (st->rc and st->err say whether it failed). */
void bench_run_method(bench_t *b, const bench_layout_t *l, const bench_method_t *m,
                      const char *what, bench_stats_t *st);

/* ---- bench_target.c ---------------------------------------------------------------------- */

/* Start `kvferry bench --serve` as a child with @size bytes and learn its session id. Returns 0
 * or -1 after saying why. */
int bench_target_spawn(bench_t *b, size_t size);
/* Stop the local target, if any, and reap it. */
void bench_target_stop(bench_t *b);
/* Read the target's published buffer into @b. Returns 0 or -1 after saying why. */
int bench_target_info(bench_t *b);
/* Ask the target to "verify" or "fill" @blocks for @seed. Returns 0, or -1 with the reason in
 * @err. */
int bench_target_request(bench_t *b, const char *cmd, uint64_t seed, json_t *blocks, char *err,
                         size_t errlen);
/* Ask the target for a new region of @len bytes of its kind of memory (kvf_mem_alloc, or
 * ordinary memory it registers), registered now; its address in @addr. Returns 0, or -1 with the
 * reason in @err (an older target answers that the request is malformed). */
int bench_target_alloc(bench_t *b, size_t len, uint64_t *addr, char *err, size_t errlen);

/* ---- bench_verify.c ---------------------------------------------------------------------- */

/* After the timed part of a run: the number of blocks checked, or -1 with the reason in @err. */
int bench_verify_run(bench_t *b, const bench_layout_t *l, char *err, size_t errlen);

/* ---- cmd_bench.c --------------------------------------------------------------------------- */

/* The store (started here unless --store-url) and the target (started here unless --target),
 * its buffer at least @need bytes. Returns 0 or -1 after saying why. */
int bench_setup_target(bench_t *b, size_t need);

/* ---- bench_region.c ---------------------------------------------------------------------- */

/* The cold-start probe, after the runs: BENCH_REGION_PROBES new regions of the target, the
 * first write of @len bytes into each against the repeated one, and a warm write after
 * BENCH_IDLE_MS asleep, into @b->probe (probe.n < BENCH_REGION_PROBES and probe.why say why it
 * stopped). Prints one line. */
void bench_region_probe(bench_t *b, size_t len);

/* ---- bench_procs.c ----------------------------------------------------------------------- */

/* --procs: for each N, N initiator processes (this binary, with --target, --slice-index and
 * --sync-fds) started together against the local target; aggregate GB/s, each process's
 * p50/p99, and the target's threads and RSS sampled while they run. @b has its store and
 * target. Returns 0 or 1. */
int bench_procs_run(bench_t *b, const bench_layout_t *l, int argc, char **argv);

/* ---- bench_report.c ---------------------------------------------------------------------- */

json_t *bench_stats_json(const bench_stats_t *s);
void bench_print_header(void);
void bench_print_run(const bench_t *b, const bench_layout_t *l, const bench_stats_t *s);
/* One baseline's line under its run; with @latency also the p50 ratio. */
void bench_print_baseline(const bench_stats_t *kvf, const bench_stats_t *s, bool latency);
/* Write every figure and the machine's description to --json. Returns 0 or -1 after saying
 * why. */
int bench_write_json(const bench_t *b, int argc, char **argv, bool ok);

#endif /* KVF_CLI_BENCH_RUN_H */
