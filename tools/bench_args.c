/* The flags of `kvferry bench`, checked before anything starts. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bench_run.h"
#include "cli.h"

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kvferry bench [--transport auto|tcp|shm] [--op write|read]\n"
        "                     [--block-size SIZE[,SIZE...]] [--batch N] [--window N]\n"
        "                     [--threads N]\n"
        "                     [--duration SEC | --iterations N] [--memory alloc|registered]\n"
        "                     [--workload kv|pages] [--baseline] [--reps N] [--working-set SIZE]\n"
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
        "  --workload pages    a paged KV cache as SGLang and vLLM send it: 61 layers x 2 (K, V)\n"
        "                      x 16 pages of 16 KiB, no two adjacent, 1,952 blocks in one call\n"
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
        "  --procs N[,N...]    N initiator processes (1..%u) into one local target at once,\n"
        "                      a run for each N: aggregate GB/s, each process's p50/p99, the\n"
        "                      target's threads and RSS; one --block-size, --working-set\n"
        "                      default 8M. (Its processes get --slice-index and --sync-fds.)\n"
        "  --json FILE         write every figure and the machine's description to FILE\n"
        "  --quiet             no progress line\n"
        "  --auth-key-file F  the cluster secret (`kvferry keygen`); default\n"
        "                    $KVFERRY_AUTH_KEY_FILE\n"
        "  --log-level N       0 debug, 1 info, 2 warn (default), 3 error\n\n"
        "Exit status: 0 all runs done and verified, 1 failure (a message says why), 2 usage.\n",
        BENCH_MAX_BATCH, BENCH_MAX_WINDOW, BENCH_MAX_THREADS, BENCH_ITER_CAP_S, BENCH_MAX_REPS,
        BENCH_MAX_PROCS);
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
    bench_workload_t *w = o->dst;
    if (!strcasecmp(value, "kv")) {
        *w = BENCH_WL_KV;
    } else if (!strcasecmp(value, "pages")) {
        *w = BENCH_WL_PAGES;
    } else {
        fprintf(stderr, "kvferry %s: --workload %s: want kv or pages\n", cmd, value);
        return -1;
    }
    return 0;
}

/* --procs: a comma list of process counts, 1..BENCH_MAX_PROCS. */
static int parse_procs(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    bench_args_t *a = o->dst;
    char *list = strdup(value), *save = NULL;
    int bad = list ? 0 : -1;
    for (char *tok = strtok_r(list, ",", &save); !bad && tok; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(tok, &end, 10);
        if (end == tok || *end || errno || v < 1 || v > BENCH_MAX_PROCS ||
            a->nprocs == BENCH_MAX_PROCS_RUNS) {
            fprintf(stderr, "kvferry %s: --procs %s: want up to %u counts of 1 to %u\n", cmd,
                    value, BENCH_MAX_PROCS_RUNS, BENCH_MAX_PROCS);
            bad = -1;
        } else {
            a->procs[a->nprocs++] = v;
        }
    }
    free(list);
    return bad;
}

/* --sync-fds GO,READY (set by --procs for its processes). */
static int parse_sync_fds(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    bench_args_t *a = o->dst;
    if (sscanf(value, "%d,%d", &a->go_fd, &a->ready_fd) != 2 || a->go_fd < 0 || a->ready_fd < 0) {
        fprintf(stderr, "kvferry %s: --sync-fds %s: want two descriptors GO,READY\n", cmd, value);
        return -1;
    }
    return 0;
}

int bench_args_parse(int argc, char **argv, bench_args_t *a)
{
    memset(a, 0, sizeof(*a));
    a->op = KVF_OP_WRITE;
    a->window = 1;
    a->threads = 1;
    a->reps = 1;
    a->alloc = true;
    a->working_set = 64u << 20;
    a->ns = "default";
    a->go_fd = a->ready_fd = -1;
    /* a->batch stays 0 unless --batch is given: --workload kv refuses it. */
    const kvf_cli_opt_t opts[] = {
        KVF_CLI_OPT_TRANSPORT(&a->transport),
        {"op", KVF_CLI_CUSTOM, &a->op, 0, 0, parse_op},
        {"block-size", KVF_CLI_CUSTOM, a, 0, 1ull << 30, parse_block_sizes},
        {"batch", KVF_CLI_U64, &a->batch, 1, BENCH_MAX_BATCH, NULL},
        {"window", KVF_CLI_U64, &a->window, 1, BENCH_MAX_WINDOW, NULL},
        {"threads", KVF_CLI_U64, &a->threads, 1, BENCH_MAX_THREADS, NULL},
        {"duration", KVF_CLI_CUSTOM, &a->duration, 0, 0, parse_duration},
        {"iterations", KVF_CLI_U64, &a->iterations, 1, 1000000000, NULL},
        {"memory", KVF_CLI_CUSTOM, &a->alloc, 0, 0, bench_opt_memory},
        {"workload", KVF_CLI_CUSTOM, &a->workload, 0, 0, parse_workload},
        {"baseline", KVF_CLI_FLAG, &a->baseline, 0, 0, NULL},
        {"working-set", KVF_CLI_CUSTOM, &a->working_set, 0, 4ull << 30, bench_opt_size},
        {"reps", KVF_CLI_U64, &a->reps, 1, BENCH_MAX_REPS, NULL},
        {"target", KVF_CLI_STR, &a->target, 0, 0, NULL},
        KVF_CLI_OPT_STORE_URL(&a->store_url),
        {"session-id", KVF_CLI_STR, &a->session_id, 0, 0, NULL},
        {"ns", KVF_CLI_STR, &a->ns, 0, 0, NULL},
        {"json", KVF_CLI_STR, &a->json_path, 0, 0, NULL},
        {"quiet", KVF_CLI_FLAG, &a->quiet, 0, 0, NULL},
        {"procs", KVF_CLI_CUSTOM, a, 0, 0, parse_procs},
        {"slice-index", KVF_CLI_U64, &a->slice_index, 0, BENCH_MAX_PROCS - 1, NULL},
        {"sync-fds", KVF_CLI_CUSTOM, a, 0, 0, parse_sync_fds},
    };
    const kvf_cli_t cli = {BENCH_CMD, usage, opts, KVF_CLI_NOPTS(opts), .log_level = true};
    int rc = kvf_cli_parse(&cli, argc, argv, NULL);
    if (rc != KVF_CLI_RUN)
        return rc;
    bool batch_given = a->batch != 0;
    if (!batch_given)
        a->batch = 1;
    if (a->workload != BENCH_WL_BLOCKS && (a->nsizes || batch_given)) {
        fprintf(stderr,
                "kvferry " BENCH_CMD ": --workload %s sets the blocks and the batch; drop "
                "--block-size and --batch\n",
                bench_workload_name(a->workload));
        return KVF_CLI_EXIT_USAGE;
    }
    if (a->workload == BENCH_WL_BLOCKS && a->nsizes == 0 && a->nprocs) {
        a->sizes[a->nsizes++] = 1u << 20;
    } else if (a->workload == BENCH_WL_BLOCKS && a->nsizes == 0) {
        a->sizes[a->nsizes++] = 64u << 10;
        a->sizes[a->nsizes++] = 1u << 20;
        a->sizes[a->nsizes++] = 4u << 20;
    }
    if (a->target && !a->store_url) {
        fprintf(stderr, "kvferry " BENCH_CMD ": --target needs --store-url, the store the target "
                        "was started with\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (a->target && a->baseline) {
        fprintf(stderr, "kvferry " BENCH_CMD ": --baseline needs the local target (it writes into "
                        "the target process with process_vm_writev); drop --target\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (a->nprocs && (a->target || a->baseline || a->workload != BENCH_WL_BLOCKS || a->nsizes > 1 || a->op != KVF_OP_WRITE)) {
        fprintf(stderr, "kvferry " BENCH_CMD ": --procs runs writes of one --block-size into "
                        "the local target; drop --target, --baseline, --workload and --op\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (a->nprocs) {
        bool ws_given = false;
        for (int i = 1; i < argc; i++)
            ws_given |= !strcmp(argv[i], "--working-set") || !strncmp(argv[i], "--working-set=", 14);
        if (!ws_given)
            a->working_set = BENCH_PROCS_WORKING_SET;
    }
    if (!a->iterations && a->duration == 0)
        a->duration = 2.0;
    return KVF_CLI_RUN;
}
