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
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bench_run.h"
#include "cli.h"
#include "clock.h"

/* The repetition of method @m with the median GB/s. */
static bench_stats_t *median_rep(bench_stats_t (*all)[1 + BENCH_MAX_BASE], unsigned reps,
                                 size_t m)
{
    /* Zeroed only to quiet GCC's maybe-uninitialized: reps >= 1 entries are always set. */
    unsigned idx[BENCH_MAX_REPS] = {0};
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
static int run_layout(bench_t *b, const bench_layout_t *l)
{
    bench_stats_t s, bs[BENCH_MAX_BASE], all[BENCH_MAX_REPS][1 + BENCH_MAX_BASE];
    const bench_method_t *base[BENCH_MAX_BASE];
    size_t nbase = 0;
    unsigned reps = (unsigned)b->a.reps;
    char what[128], block[32], err[512];
    int checked = 0;
    bool shm = false, latency = false;

    if (b->a.workload != BENCH_WL_BLOCKS)
        snprintf(block, sizeof(block), "%s workload", bench_workload_name(b->a.workload));
    else
        bench_size_name(l->len[0], block, sizeof(block));
    /* Repetitions alternate kvferry and its baselines, so that a burst of load from elsewhere
     * on the machine hits both alike; each method's figures are from its median repetition. */
    for (unsigned rep = 0; rep < reps; rep++) {
        snprintf(what, sizeof(what), "kvferry %s x %zu, %" PRIu64 " thread%s, rep %u/%u", block,
                 l->n, b->a.threads, b->a.threads > 1 ? "s" : "", rep + 1, reps);
        bench_run_method(b, l, bench_kvferry_method((unsigned)b->a.window), what, &all[rep][0]);
        if (!b->transport_used && kvf_engine_peer_transport(b->e, b->peer, &b->transport_used) < 0)
            b->transport_used = "?";
        if (all[rep][0].rc) {
            fprintf(stderr, "kvferry " BENCH_CMD ": %s: %s\n", what, all[rep][0].err);
            return 1;
        }
        /* Before any baseline writes into the target (process_vm_writev does). */
        if (rep + 1 == reps) {
            checked = bench_verify_run(b, l, err, sizeof(err));
            if (checked < 0) {
                fprintf(stderr, "kvferry " BENCH_CMD ": verification failed after %s: %s\n", what, err);
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
                if (l->n > 1)
                    base[nbase++] = &bench_raw_tcp_gather;
            }
            latency = !shm && l->bytes <= BENCH_PINGPONG_MAX;
            /* Now known for this layout (the guess was one baseline). */
            b->runs_total += (unsigned)((nbase - 1) * reps);
        }
        for (size_t i = 0; i < nbase; i++) {
            snprintf(what, sizeof(what), "%s %s x %zu, rep %u/%u", base[i]->label, block, l->n,
                     rep + 1, reps);
            bench_run_method(b, l, base[i], what, &all[rep][1 + i]);
            if (all[rep][1 + i].rc) {
                fprintf(stderr, "kvferry " BENCH_CMD ": baseline %s: %s\n", base[i]->label,
                        all[rep][1 + i].err);
                return 1;
            }
        }
    }
    json_t *reps_json[1 + BENCH_MAX_BASE];
    for (size_t m = 0; m < 1 + nbase; m++) {
        bench_stats_t *pick = median_rep(all, reps, m);
        bench_stats_t *dst = m == 0 ? &s : &bs[m - 1];
        *dst = *pick;
        dst->first_us = all[0][m].first_us;
        reps_json[m] = json_array();
        for (unsigned rep = 0; rep < reps; rep++)
            json_array_append_new(reps_json[m], json_real(all[rep][m].gbps));
    }
    bench_print_run(b, l, &s);
    for (size_t i = 0; i < nbase; i++)
        bench_print_baseline(&s, &bs[i], latency && base[i] == &bench_tcp_pingpong);
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
        bench_workload_name(b->a.workload), "block_size", (json_int_t)(l->bytes / l->n), "batch",
        (json_int_t)l->n, "blocks", (json_int_t)l->n, "bytes_per_call", (json_int_t)l->bytes,
        "threads", (json_int_t)b->a.threads, "calls", (json_int_t)s.calls, "bytes",
        (json_int_t)(s.calls * l->bytes), "seconds", s.seconds, "gbps", s.gbps, "ops_per_s",
        s.ops_per_s, "calls_per_s", s.calls_per_s, "p50_us", s.p50_us, "p99_us", s.p99_us, "max_us",
        s.max_us, "mean_us", s.mean_us, "first_transfer_us", s.first_us, "latency_samples",
        (json_int_t)s.samples, "verified", 1, "verified_blocks", checked);
    json_object_set_new(run, "cpu_s_per_gb",
                        s.cpu_s_per_gb >= 0 ? json_real(s.cpu_s_per_gb) : json_null());
    json_object_set_new(run, "t_start_ns", json_integer((json_int_t)s.t_start_ns));
    json_object_set_new(run, "t_end_ns", json_integer((json_int_t)s.t_end_ns));
    json_object_set_new(run, "reps", json_integer((json_int_t)reps));
    json_object_set_new(run, "window", json_integer((json_int_t)b->a.window));
    json_object_set_new(run, "gbps_reps", reps_json[0]);
    json_t *bl = json_array();
    for (size_t i = 0; i < nbase; i++) {
        json_t *j = bench_stats_json(&bs[i]);
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

static void bench_sample(bench_t *b, int when);

int bench_setup_target(bench_t *b, size_t need)
{
    int rc;
    if (!b->a.store_url) {
        rc = kvf_store_server_start("tcp://127.0.0.1:0", &b->srv);
        if (rc < 0) {
            kvf_cli_fail(BENCH_CMD, rc, "cannot start a config store on 127.0.0.1");
            return -1;
        }
        b->store_url = kvf_store_server_url(b->srv);
    } else {
        b->store_url = b->a.store_url;
    }
    rc = kvf_store_open(b->store_url, NULL, &b->st);
    if (rc < 0) {
        kvf_cli_fail(BENCH_CMD, rc, "cannot reach the config store at %s", b->store_url);
        return -1;
    }
    if (b->a.target) {
        char host[KVF_SESSION_ID_MAX];
        uint16_t port;
        /* The engine's spelling of the id, the one the target publishes its records under. */
        if (kvf_session_id_parse(b->a.target, host, sizeof(host), &port) < 0 ||
            kvf_session_id_format(host, port, b->peer, sizeof(b->peer)) < 0) {
            fprintf(stderr, "kvferry " BENCH_CMD ": --target: %s\n", kvf_last_error());
            return -1;
        }
    } else if (bench_target_spawn(b, need) < 0) {
        return -1;
    }
    if (bench_target_info(b) < 0)
        return -1;
    if (b->target_len < need) {
        fprintf(stderr,
                "kvferry " BENCH_CMD ": the target %s has %" PRIu64 " bytes; this run needs %zu "
                "(%" PRIu64 " threads x %zu); start it with --size %zu or more\n",
                b->peer, b->target_len, need, b->a.threads, b->slice, need);
        return -1;
    }
    return 0;
}

/* The store, this process's engine and the target. Returns 0 or -1 after saying why. */
static int bench_setup(bench_t *b, size_t need)
{
    int rc = bench_setup_target(b, need);
    if (rc < 0)
        return rc;
    char sid[KVF_SESSION_ID_MAX];
    if (b->a.session_id) {
        snprintf(sid, sizeof(sid), "%s", b->a.session_id);
    } else {
        char host[KVF_SESSION_ID_MAX];
        if (kvf_store_url_parse(b->store_url, NULL, host, sizeof(host), NULL) < 0 ||
            kvf_session_id_format(host, 0, sid, sizeof(sid)) < 0) {
            fprintf(stderr, "kvferry " BENCH_CMD ": --store-url: %s\n", kvf_last_error());
            return -1;
        }
    }
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = b->a.transport;
    cfg.ns = b->a.ns;
    uint64_t t0 = cli_now_ns();
    rc = kvf_engine_create(b->store_url, sid, KVF_ROLE_PREFILL, 0, &cfg, &b->e);
    if (rc < 0) {
        kvf_cli_fail(BENCH_CMD, rc, "cannot start an engine at %s", sid);
        return -1;
    }
    bench_sample(b, 0);
    /* Ready: create → the first write the target accepted (DESIGN.md §4, <= 200 ms). The runs
     * rewrite these bytes before anything is verified. */
    rc = kvf_write(b->e, b->peer, b->local, b->target_addr, b->local_len < 4096 ? b->local_len : 4096);
    if (rc < 0) {
        kvf_cli_fail(BENCH_CMD, rc, "the first write to %s", b->peer);
        return -1;
    }
    b->ready_ms = (double)(cli_now_ns() - t0) / 1e6;
    /* The source registered too, as the frameworks register their KV cache on the Prefill side
     * (batch_register_memory): registration is where its pages are first touched by the kernel,
     * not the first timed call (docs/performance.md, "Cold start"). */
    rc = kvf_mem_register(b->e, b->local, b->local_len);
    if (rc < 0) {
        kvf_cli_fail(BENCH_CMD, rc, "registering the initiator's %zu-byte buffer", b->local_len);
        return -1;
    }
    return 0;
}

/* RSS and threads of this process and of a target started here, into slot @when (0 before the
 * runs, 1 after). */
static void bench_sample(bench_t *b, int when)
{
    bench_proc_status(0, &b->rss_kib[0][when], &b->shmem_kib[0][when], &b->file_kib[0][when],
                      &b->nthreads[0][when]);
    if (b->child > 0)
        bench_proc_status(b->child, &b->rss_kib[1][when], &b->shmem_kib[1][when],
                          &b->file_kib[1][when], &b->nthreads[1][when]);
    else
        b->rss_kib[1][when] = b->shmem_kib[1][when] = b->file_kib[1][when] =
            b->nthreads[1][when] = -1;
}

/* Under --procs: say "ready" on the READY pipe, then wait for the GO pipe to close, which the
 * parent does once every process is ready, so that their timed parts overlap. Returns 0 or -1
 * after saying why. */
static int bench_sync_start(bench_t *b)
{
    if (b->a.ready_fd < 0)
        return 0;
    char ch = 'r';
    bool ok = write(b->a.ready_fd, &ch, 1) == 1;
    close(b->a.ready_fd);
    uint64_t deadline = cli_now_ms() + BENCH_PROCS_READY_MS;
    while (ok) {
        uint64_t now = cli_now_ms();
        struct pollfd p = {.fd = b->a.go_fd, .events = POLLIN};
        int r = now < deadline ? poll(&p, 1, (int)(deadline - now)) : 0;
        if (r < 0 && errno == EINTR)
            continue;
        ssize_t got = r > 0 ? read(b->a.go_fd, &ch, 1) : -1;
        if (got == 0)
            break; /* closed: go */
        ok = got > 0;
    }
    close(b->a.go_fd);
    if (!ok)
        fprintf(stderr, "kvferry " BENCH_CMD ": --sync-fds: no start within %u s\n",
                BENCH_PROCS_READY_MS / 1000u);
    return ok ? 0 : -1;
}

static void bench_teardown(bench_t *b)
{
    kvf_engine_destroy(b->e);
    bench_target_stop(b);
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
    int rc = bench_args_parse(argc, argv, &b->a);
    if (rc != KVF_CLI_RUN)
        return rc;
    signal(SIGPIPE, SIG_IGN);
    b->tty = !b->a.quiet && isatty(2);

    static bench_layout_t layouts[BENCH_MAX_SIZES];
    size_t nlay = b->a.workload != BENCH_WL_BLOCKS ? 1 : b->a.nsizes;
    for (size_t i = 0; i < nlay; i++) {
        if (b->a.workload == BENCH_WL_KV)
            bench_layout_kv(&layouts[i], b->a.working_set);
        else if (b->a.workload == BENCH_WL_PAGES)
            bench_layout_pages(&layouts[i], b->a.working_set);
        else
            bench_layout_blocks(&layouts[i], b->a.sizes[i], b->a.batch, b->a.working_set);
        if (bench_layout_slice(&layouts[i]) > b->slice)
            b->slice = bench_layout_slice(&layouts[i]);
    }
    if (b->slice > BENCH_MAX_LOCAL / b->a.threads) {
        fprintf(stderr,
                "kvferry " BENCH_CMD ": --block-size x --batch x --threads needs %zu MiB per "
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
        fprintf(stderr, "kvferry " BENCH_CMD ": cannot map %zu bytes: %s\n", b->local_len,
                strerror(errno));
        bench_teardown(b);
        return 1;
    }
    /* The timed calls carry this pattern; the verification call a different one. */
    bench_pattern_fill(b->local, 0, b->local_len, 1);
    if (b->a.nprocs) {
        uint64_t most = 0;
        for (size_t i = 0; i < b->a.nprocs; i++)
            most = b->a.procs[i] > most ? b->a.procs[i] : most;
        int status = bench_setup_target(b, (size_t)most * b->local_len) < 0
                         ? 1
                         : bench_procs_run(b, &layouts[0], argc, argv);
        bench_teardown(b);
        return status;
    }
    b->base_off = (size_t)b->a.slice_index * b->local_len;
    if (bench_setup(b, b->base_off + b->local_len) < 0 || bench_sync_start(b) < 0) {
        bench_teardown(b);
        return 1;
    }

    int status = 0;
    /* One baseline per run is a guess until the first run shows the transport. */
    b->runs_total = (unsigned)(nlay * (size_t)b->a.reps * (b->a.baseline ? 2u : 1u));
    bench_print_header();
    for (size_t i = 0; i < nlay && status == 0; i++)
        status = run_layout(b, &layouts[i]);
    bench_sample(b, 1);
    /* After the memory sample: the target's new regions are not the engine's memory. Not in a
     * --procs child (its parent's run is about many processes, not this). */
    if (status == 0 && b->a.ready_fd < 0) {
        size_t len = layouts[0].len[0];
        bench_region_probe(b, len < BENCH_REGION_MAX ? len : BENCH_REGION_MAX);
    }
    if (status == 0 && b->tty)
        fprintf(stderr,
                "all runs verified (a sample of every run's blocks compared at the "
                "%s)\n",
                b->a.op == KVF_OP_WRITE ? "target" : "initiator");
    if (b->a.json_path && bench_write_json(b, argc, argv, status == 0) < 0 && status == 0)
        status = 1;
    bench_teardown(b);
    return status;
}
