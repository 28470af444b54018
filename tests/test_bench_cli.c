/*
 * `kvferry bench` as a user runs it, with tiny sizes and iteration counts: the JSON it writes
 * (every required key, sane values), the kv workload's shape, bad flags, verification catching a
 * corrupted byte (through the documented test hook KVFERRY_BENCH_TEST_CORRUPT), a target started
 * separately, and `kvferry bench store`. Timing is never asserted. Every child is reaped; the
 * bench's own target process dies with it (PR_SET_PDEATHSIG).
 */
#include "test_util.h"

#include <jansson.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RUN_MS 90000u

static char out[65536];
static char json_path[256];
static pid_t kids[4];
static int nkids;

static int setup(void **state)
{
    (void)state;
    snprintf(json_path, sizeof(json_path), "/tmp/kvf-test-bench-%d.json", (int)getpid());
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < nkids; i++) {
        if (kids[i] > 0) {
            kill(kids[i], SIGKILL);
            kvf_test_reap(kids[i], 5000);
        }
    }
    nkids = 0;
    unlink(json_path);
    return 0;
}

/* Run `kvferry bench ARGS...` (NULL-terminated) into `out`; returns the exit status. */
static int bench(const char *first, ...)
{
    char *argv[40];
    int n = 0;
    va_list ap;
    argv[n++] = (char *)kvf_test_cli_path();
    argv[n++] = "bench";
    va_start(ap, first);
    for (const char *a = first; a && n < 39; a = va_arg(ap, const char *))
        argv[n++] = (char *)a;
    va_end(ap);
    argv[n] = NULL;
    return kvf_test_run(argv, out, sizeof(out), RUN_MS);
}

static json_t *load_json(void)
{
    json_error_t err;
    json_t *root = json_load_file(json_path, 0, &err);
    if (!root)
        fail_msg("%s: %s (line %d); output:\n%s", json_path, err.text, err.line, out);
    return root;
}

static double num(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    if (!json_is_number(v))
        fail_msg("key \"%s\" missing or not a number", key);
    return json_number_value(v);
}

/* Every run has the keys scripts outside the project read, with sane values. */
static void check_runs(json_t *root, size_t want_runs, const char *transport)
{
    json_t *runs = json_object_get(root, "runs");
    assert_true(json_is_array(runs));
    assert_int_equal(json_array_size(runs), want_runs);
    json_t *machine = json_object_get(root, "machine");
    assert_true(num(machine, "cores") >= 1);
    assert_non_null(json_string_value(json_object_get(machine, "kernel")));
    assert_string_equal(json_string_value(json_object_get(root, "transport")), transport);
    size_t i;
    json_t *r;
    json_array_foreach(runs, i, r)
    {
        assert_string_equal(json_string_value(json_object_get(r, "transport")), transport);
        assert_non_null(json_string_value(json_object_get(r, "op")));
        assert_true(num(r, "block_size") > 0);
        assert_true(num(r, "batch") >= 1);
        assert_true(num(r, "threads") >= 1);
        double gbps = num(r, "gbps"), p50 = num(r, "p50_us"), p99 = num(r, "p99_us");
        double max = num(r, "max_us");
        if (!(gbps > 0) || !(p50 > 0) || !(p50 <= p99) || !(p99 <= max))
            fail_msg("run %zu: gbps %f, p50 %f, p99 %f, max %f", i, gbps, p50, p99, max);
        assert_true(num(r, "first_transfer_us") > 0);
        assert_true(num(r, "cpu_s_per_gb") >= 0);
        assert_true(json_is_true(json_object_get(r, "verified")));
    }
    /* The bars of DESIGN.md §4 without a baseline: ready time, memory and threads of both
     * sides (the target here is local), before and after the runs. */
    double ready = num(root, "ready_ms");
    if (!(ready > 0 && ready < 60000))
        fail_msg("ready_ms %f", ready);
    json_t *rss = json_object_get(root, "rss_kib"), *thr = json_object_get(root, "threads");
    const char *side[] = {"initiator", "target"};
    for (int k = 0; k < 2; k++) {
        json_t *rs = json_object_get(rss, side[k]), *ts = json_object_get(thr, side[k]);
        if (!(num(rs, "before") > 0 && num(rs, "after") > 0 && num(ts, "before") >= 1 &&
              num(ts, "after") >= 1))
            fail_msg("rss_kib or threads of the %s missing", side[k]);
        /* The engine's figure is VmRSS less shared memory and the bench's buffers (anonymous,
         * faulted in): the binary and libraries (RssFile) are a part of it, never more. */
        double eb = num(rs, "engine_before"), ea = num(rs, "engine_after");
        double fb = num(rs, "file_before"), fa = num(rs, "file_after");
        if (!(fb > 0 && fa > 0 && fb <= eb && fa <= ea && ea < num(rs, "after")))
            fail_msg("%s: engine %.0f -> %.0f KiB, of it file %.0f -> %.0f KiB, VmRSS %.0f KiB",
                     side[k], eb, ea, fb, fa, num(rs, "after"));
    }
    assert_true(num(rss, "initiator_buffers_kib") > 0);
    assert_true(num(rss, "target_buffer_kib") > 0);
}

/* The cold-start probe: for each of 3 new target regions, the first write of @bytes into it, the
 * repeated one, a warm write before them and one after 200 ms asleep; first_over_repeat is the
 * median of first / repeat over the probes. */
static void check_fresh_region(json_t *root, double bytes)
{
    json_t *fr = json_object_get(root, "fresh_region");
    if (!json_is_object(fr) || json_object_get(fr, "error"))
        fail_msg("fresh_region: %s", json_dumps(fr, JSON_COMPACT));
    assert_true(num(fr, "bytes") == bytes);
    assert_int_equal((int)num(fr, "idle_ms"), 200);
    static const char *keys[] = {"first_us", "repeat_us", "warm_us", "after_idle_us"};
    double ratio[3];
    for (int k = 0; k < 4; k++) {
        json_t *a = json_object_get(fr, keys[k]);
        if (json_array_size(a) != 3)
            fail_msg("fresh_region.%s: want 3 samples", keys[k]);
        for (size_t i = 0; i < 3; i++)
            if (!(json_number_value(json_array_get(a, i)) > 0))
                fail_msg("fresh_region.%s[%zu] is not a time", keys[k], i);
    }
    for (size_t i = 0; i < 3; i++)
        ratio[i] = json_number_value(json_array_get(json_object_get(fr, "first_us"), i)) /
                   json_number_value(json_array_get(json_object_get(fr, "repeat_us"), i));
    /* The median of three. */
    double lo = ratio[0] < ratio[1] ? ratio[0] : ratio[1], hi = ratio[0] < ratio[1] ? ratio[1] : ratio[0];
    double med = ratio[2] < lo ? lo : ratio[2] > hi ? hi : ratio[2];
    double got = num(fr, "first_over_repeat");
    if (got < med * 0.999 || got > med * 1.001)
        fail_msg("first_over_repeat %f, the median of first / repeat is %f", got, med);
}

static void json_run(const char *transport)
{
    int rc =
        bench("--transport", transport, "--block-size", "4K,64K", "--batch", "2", "--threads", "2",
              "--iterations", "20", "--working-set", "1M", "--quiet", "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    assert_non_null(strstr(out, "GB/s"));
    json_t *root = load_json();
    check_runs(root, 2, transport);
    json_t *r0 = json_array_get(json_object_get(root, "runs"), 0);
    assert_int_equal((int)num(r0, "block_size"), 4096);
    assert_int_equal((int)num(r0, "batch"), 2);
    assert_int_equal((int)num(r0, "threads"), 2);
    check_fresh_region(root, 4096);
    assert_non_null(strstr(out, "new region, 4096 bytes"));
    json_decref(root);
}

static void json_tcp(void **state)
{
    (void)state;
    json_run("tcp");
}

static void json_shm(void **state)
{
    (void)state;
    json_run("shm");
}

static void read_op(void **state)
{
    (void)state;
    int rc = bench("--op", "read", "--transport", "tcp", "--block-size", "16K", "--iterations",
                   "10", "--working-set", "1M", "--quiet", "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    json_t *root = load_json();
    check_runs(root, 1, "tcp");
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(json_object_get(root, "runs"), 0), "op")),
        "read");
    json_decref(root);
}

/* 61 x 128 KiB + 61 x 16 KiB = 8,994,816 bytes in 122 blocks, one call. */
static void kv_workload(void **state)
{
    (void)state;
    int rc = bench("--workload", "kv", "--memory", "registered", "--iterations", "3", "--quiet",
                   "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    json_t *root = load_json();
    json_t *r = json_array_get(json_object_get(root, "runs"), 0);
    assert_non_null(r);
    assert_string_equal(json_string_value(json_object_get(r, "workload")), "kv");
    assert_int_equal((int)num(r, "blocks"), 122);
    assert_int_equal((int)num(r, "batch"), 122);
    assert_int_equal((long long)num(r, "bytes_per_call"), 61LL * (128 << 10) + 61LL * (16 << 10));
    assert_string_equal(json_string_value(json_object_get(r, "memory")), "registered");
    json_decref(root);
}

/* 61 layers x 2 x 16 pages of 16 KiB, none adjacent, over tcp: verified, and held against the
 * same blocks as a raw stream both ways (a send per block, and writev/readv). */
static void pages_workload_with_gathered_baseline(void **state)
{
    (void)state;
    int rc = bench("--workload", "pages", "--transport", "tcp", "--iterations", "2", "--baseline",
                   "--quiet", "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    assert_non_null(strstr(out, "raw TCP writev/readv"));
    json_t *root = load_json();
    json_t *r = json_array_get(json_object_get(root, "runs"), 0);
    assert_non_null(r);
    assert_string_equal(json_string_value(json_object_get(r, "workload")), "pages");
    assert_int_equal((int)num(r, "blocks"), 61 * 2 * 16);
    assert_int_equal((long long)num(r, "bytes_per_call"), 61LL * 2 * 16 * (16 << 10));
    assert_true(num(r, "verified_blocks") > 0);
    json_t *bl = json_object_get(r, "baselines");
    assert_int_equal(json_array_size(bl), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(bl, 0), "name")),
                        "raw_tcp");
    assert_string_equal(json_string_value(json_object_get(json_array_get(bl, 1), "name")),
                        "raw_tcp_gather");
    assert_true(num(json_array_get(bl, 1), "gbps") > 0);
    json_decref(root);
}

static void baseline_tcp(void **state)
{
    (void)state;
    int rc =
        bench("--transport", "tcp", "--block-size", "4K", "--iterations", "50", "--working-set",
              "1M", "--baseline", "--reps", "2", "--quiet", "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    assert_non_null(strstr(out, "raw TCP send/recv"));
    assert_non_null(strstr(out, "raw TCP ping-pong"));
    json_t *root = load_json();
    json_t *r = json_array_get(json_object_get(root, "runs"), 0);
    assert_string_equal(json_string_value(json_object_get(r, "baseline")), "raw_tcp");
    assert_true(num(r, "ratio") > 0);
    assert_true(num(r, "p50_ratio") > 0);
    assert_int_equal(json_array_size(json_object_get(r, "baselines")), 2);
    /* Two repetitions each, alternating; the figures are the median one's. */
    assert_int_equal((int)num(r, "reps"), 2);
    assert_int_equal(json_array_size(json_object_get(r, "gbps_reps")), 2);
    json_decref(root);
}

static void baseline_shm(void **state)
{
    (void)state;
    int rc =
        bench("--transport", "shm", "--memory", "registered", "--block-size", "64K", "--iterations",
              "50", "--working-set", "1M", "--baseline", "--quiet", "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    json_t *root = load_json();
    json_t *r = json_array_get(json_object_get(root, "runs"), 0);
    /* Into registered memory the bar is process_vm_writev; memcpy is reported beside it. */
    assert_string_equal(json_string_value(json_object_get(r, "baseline")), "process_vm_writev");
    assert_true(num(r, "base_gbps") > 0);
    assert_int_equal(json_array_size(json_object_get(r, "baselines")), 2);
    json_decref(root);
}

static void expect_usage_error(const char *flag, const char *value, const char *needle)
{
    int rc = bench(flag, value, NULL);
    if (rc != 2 || !strstr(out, needle))
        fail_msg("%s %s: exit %d, want 2 and \"%s\"; output:\n%s", flag, value, rc, needle, out);
}

static void bad_flags(void **state)
{
    (void)state;
    expect_usage_error("--block-size", "12Q", "--block-size 12Q");
    expect_usage_error("--block-size", "0", "--block-size 0");
    expect_usage_error("--block-size", "2G", "--block-size 2G");
    expect_usage_error("--transport", "foo", "--transport foo");
    expect_usage_error("--batch", "0", "--batch 0");
    expect_usage_error("--threads", "65", "--threads 65");
    expect_usage_error("--duration", "-1", "--duration -1");
    expect_usage_error("--op", "copy", "--op copy");
    expect_usage_error("--memory", "gpu", "--memory gpu");
    expect_usage_error("--workload", "llama", "--workload llama");
    expect_usage_error("--reps", "0", "--reps 0");
    expect_usage_error("--window", "0", "--window 0");
    expect_usage_error("--window", "65", "--window 65");
    expect_usage_error("--target", "127.0.0.1:1", "--target needs --store-url");
    int rc = bench("--workload", "kv", "--block-size", "4K", NULL);
    assert_int_equal(rc, 2);
    assert_non_null(strstr(out, "--workload kv"));
}

/* --window: calls as asynchronous batches, several in flight per thread; the run completes,
 * every figure is sane, the data is verified, and the JSON says how many were in flight. */
static void window_async(void **state)
{
    (void)state;
    int rc = bench("--transport", "tcp", "--block-size", "64K", "--batch", "2", "--window", "4",
                   "--threads", "2", "--iterations", "30", "--working-set", "1M", "--quiet",
                   "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    json_t *root = load_json();
    check_runs(root, 1, "tcp");
    json_t *r0 = json_array_get(json_object_get(root, "runs"), 0);
    assert_int_equal((int)num(r0, "window"), 4);
    assert_int_equal((int)num(r0, "calls"), 2 * 30);
    json_decref(root);
}

/* --procs: N initiator processes into one target, one run per N, each process's blocks
 * verified; the figures of every run and of every process. */
static void procs_runs(void **state)
{
    (void)state;
    int rc = bench("--procs", "1,3", "--transport", "tcp", "--block-size", "64K", "--iterations",
                   "20", "--quiet", "--json", json_path, NULL);
    if (rc != 0)
        fail_msg("exit %d; output:\n%s", rc, out);
    json_t *root = load_json();
    json_t *runs = json_object_get(root, "procs_runs");
    assert_int_equal(json_array_size(runs), 2);
    for (size_t i = 0; i < 2; i++) {
        json_t *r = json_array_get(runs, i);
        int n = (int)num(r, "procs");
        assert_int_equal(n, i == 0 ? 1 : 3);
        assert_int_equal(json_array_size(json_object_get(r, "each")), (size_t)n);
        if (!(num(r, "gbps") > 0 && num(r, "p99_us_min") > 0 &&
              num(r, "p99_us_min") <= num(r, "p99_us_max") && num(r, "target_threads_max") >= 1 &&
              num(r, "target_rss_kib_max") > 0))
            fail_msg("procs run %zu: implausible figures; output:\n%s", i, out);
    }
    json_decref(root);
    assert_int_equal(bench("--procs", "2", "--baseline", "--quiet", NULL), 2);
    assert_non_null(strstr(out, "--procs"));
    assert_int_equal(bench("--procs", "65", "--quiet", NULL), 2);
}

/* A process of --procs whose verification fails fails the whole run. */
static void procs_verification_fails(void **state)
{
    (void)state;
    setenv("KVFERRY_BENCH_TEST_CORRUPT", "1", 1);
    int rc = bench("--procs", "2", "--transport", "tcp", "--block-size", "4K", "--iterations", "5",
                   "--quiet", NULL);
    unsetenv("KVFERRY_BENCH_TEST_CORRUPT");
    if (rc != 1 || !strstr(out, "verification failed") || !strstr(out, "failed (status"))
        fail_msg("exit %d, want 1 naming the failed process; output:\n%s", rc, out);
}

/* The test hook makes the target flip the first byte of the first block it verifies (after a
 * write) or fills (before a read): the run must fail, naming the block. */
static void corrupt(const char *op, const char *transport)
{
    setenv("KVFERRY_BENCH_TEST_CORRUPT", "1", 1);
    int rc = bench("--op", op, "--transport", transport, "--block-size", "4K", "--batch", "4",
                   "--iterations", "5", "--working-set", "1M", "--quiet", NULL);
    unsetenv("KVFERRY_BENCH_TEST_CORRUPT");
    if (rc != 1 || !strstr(out, "verification failed") || !strstr(out, "block 0"))
        fail_msg("exit %d, want 1 and a message naming block 0; output:\n%s", rc, out);
}

static void verify_catches_corrupt_write(void **state)
{
    (void)state;
    corrupt("write", "shm");
}

static void verify_catches_corrupt_read(void **state)
{
    (void)state;
    corrupt("read", "tcp");
}

/* A target started on its own with --serve, benched with --target, then stopped by SIGTERM. */
static void remote_target(void **state)
{
    (void)state;
    char url[128], line[512], sid[300];
    kids[nkids++] = kvf_test_store_process(url, sizeof(url));
    char *argv[] = {(char *)kvf_test_cli_path(),
                    "bench",
                    "--serve",
                    "--store-url",
                    url,
                    "--size",
                    "4M",
                    "--memory",
                    "registered",
                    NULL};
    int fd;
    pid_t serve = kvf_test_spawn_pipe(argv, &fd);
    kids[nkids++] = serve;
    if (kvf_test_read_line(fd, line, sizeof(line), 30000) < 0 ||
        sscanf(line, "bench target %299s ready", sid) != 1)
        fail_msg("the target did not report ready: \"%s\"", line);
    close(fd);
    /* Six runs against one target: the probe's 18 new regions go past the 16 a target keeps,
     * so the oldest are freed to make room, and every run still gets its three. */
    for (int run = 0; run < 6; run++) {
        int rc = bench("--target", sid, "--store-url", url, "--block-size", "4K", "--threads",
                       "2", "--iterations", "10", "--working-set", "64K", "--quiet", "--json",
                       json_path, NULL);
        if (rc != 0)
            fail_msg("run %d: exit %d; output:\n%s", run, rc, out);
        json_t *root = load_json();
        check_fresh_region(root, 4096);
        json_decref(root);
    }
    int rc;
    /* A target too small for the run is refused, naming its size. */
    rc = bench("--target", sid, "--store-url", url, "--block-size", "4M", "--threads", "2",
               "--iterations", "1", "--quiet", NULL);
    if (rc != 1 || !strstr(out, "--size"))
        fail_msg("exit %d, want 1 and a hint about --size; output:\n%s", rc, out);
    kill(serve, SIGTERM);
    assert_int_equal(kvf_test_reap(serve, 10000), 0);
    kids[1] = 0;
}

static void store_bench(void **state)
{
    (void)state;
    char *argv[] = {(char *)kvf_test_cli_path(),
                    "bench",
                    "store",
                    "--seconds",
                    "0.2",
                    "--clients",
                    "3",
                    "--rounds",
                    "20",
                    "--json",
                    json_path,
                    NULL};
    int rc = kvf_test_run(argv, out, sizeof(out), RUN_MS);
    if (rc != 0 || !strstr(out, "ops/s") || !strstr(out, "wake-up"))
        fail_msg("exit %d; output:\n%s", rc, out);
    json_t *root = load_json();
    assert_true(num(root, "set_per_s_1") > 0);
    assert_true(num(root, "get_per_s_n") > 0);
    json_t *wake = json_object_get(root, "wake");
    assert_true(num(wake, "p50_us") <= num(wake, "max_us"));
    /* An engine's registration and lookup went through the store, each 20 times. */
    assert_non_null(strstr(out, "engine registration (kvf_mem_register, 4 KiB), 20 rounds: p50 "));
    assert_non_null(strstr(out, "engine lookup (kvf_peer_regions from another engine), 20 rounds"));
    for (int i = 0; i < 2; i++) {
        json_t *o = json_object_get(root, i ? "lookup" : "register");
        assert_true(num(o, "p50_us") > 0);
        assert_true(num(o, "p50_us") <= num(o, "p99_us"));
    }
    json_decref(root);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(json_tcp, setup, teardown),
        cmocka_unit_test_setup_teardown(json_shm, setup, teardown),
        cmocka_unit_test_setup_teardown(read_op, setup, teardown),
        cmocka_unit_test_setup_teardown(kv_workload, setup, teardown),
        cmocka_unit_test_setup_teardown(pages_workload_with_gathered_baseline, setup, teardown),
        cmocka_unit_test_setup_teardown(baseline_tcp, setup, teardown),
        cmocka_unit_test_setup_teardown(baseline_shm, setup, teardown),
        cmocka_unit_test_setup_teardown(bad_flags, setup, teardown),
        cmocka_unit_test_setup_teardown(window_async, setup, teardown),
        cmocka_unit_test_setup_teardown(verify_catches_corrupt_write, setup, teardown),
        cmocka_unit_test_setup_teardown(verify_catches_corrupt_read, setup, teardown),
        cmocka_unit_test_setup_teardown(remote_target, setup, teardown),
        cmocka_unit_test_setup_teardown(procs_runs, setup, teardown),
        cmocka_unit_test_setup_teardown(procs_verification_fails, setup, teardown),
        cmocka_unit_test_setup_teardown(store_bench, setup, teardown),
    };
    return KVF_TEST_RUN(tests, argc, argv);
}
