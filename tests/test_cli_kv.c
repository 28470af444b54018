/* `kvferry store` and `kvferry kv` as a user runs them: separate processes, exit codes, output. */
#include "test_util.h"

#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "store/server_internal.h"

static char out[65536];

/* Run `kvferry kv --store-url URL ARGS...` (NULL ends the arguments) and return its exit code;
 * output lands in `out`. */
static int kv(const char *url, const char *a0, const char *a1, const char *a2, const char *a3)
{
    char *argv[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", (char *)url,
                    (char *)a0, (char *)a1, (char *)a2, (char *)a3, NULL};
    return kvf_test_run(argv, out, sizeof(out), 10000);
}

static void cli_kv_round_trip(void **state)
{
    (void)state;
    char url[128];
    pid_t store = kvf_test_store_process(url, sizeof(url));

    assert_int_equal(kv(url, "set", "cluster/a", "hello world", NULL), 0);
    assert_int_equal(kv(url, "get", "cluster/a", NULL, NULL), 0);
    assert_string_equal(out, "hello world\n");
    assert_int_equal(kv(url, "set", "cluster/b", "2", NULL), 0);
    assert_int_equal(kv(url, "set", "clusterX", "outside", NULL), 0);
    assert_int_equal(kv(url, "list", "cluster/", NULL, NULL), 0);
    assert_string_equal(out, "cluster/a\thello world\ncluster/b\t2\n");
    assert_int_equal(kv(url, "add", "cluster/b", "-5", NULL), 0);
    assert_string_equal(out, "-3\n");
    /* A delta that does not fit in 64 bits is a usage error, not a silently clamped add. */
    assert_int_equal(kv(url, "add", "cluster/b", "99999999999999999999", NULL), 2);
    assert_non_null(strstr(out, "99999999999999999999"));
    assert_int_equal(kv(url, "get", "cluster/b", NULL, NULL), 0);
    assert_string_equal(out, "-3\n");
    assert_int_equal(kv(url, "del", "cluster/a", NULL, NULL), 0);
    assert_int_equal(kv(url, "get", "cluster/a", NULL, NULL), 1);
    assert_non_null(strstr(out, "not found"));
    assert_non_null(strstr(out, "cluster/a"));
    assert_int_equal(kv(url, "del", "cluster/a", NULL, NULL), 1);

    kill(store, SIGTERM);
    assert_int_equal(kvf_test_reap(store, 5000), 0);
}

static void cli_kv_get_waits_for_key(void **state)
{
    (void)state;
    /* In-process store, so the test can see when the getter's request is parked on it. */
    kvf_store_server_t *srv = kvf_test_store_start();
    const char *url = kvf_store_server_url(srv);
    char *argv[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", (char *)url, "get", "late",
                    "5000", NULL};
    int fd;
    pid_t getter = kvf_test_spawn_pipe(argv, &fd);
    /* Polling a condition (bounded), not sleeping a fixed time: the key is set only once the
     * getter is really waiting for it, so the test fails if get-with-wait does not wait. */
    uint64_t deadline = kvf_test_now_ms() + 5000;
    while (kvf__store_server_waiters(srv) != 1 && kvf_test_now_ms() < deadline) {
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(kvf__store_server_waiters(srv), 1);
    assert_int_equal(kv(url, "set", "late", "arrived", NULL), 0);
    char line[128];
    assert_true(kvf_test_read_line(fd, line, sizeof(line), 6000) >= 0);
    assert_string_equal(line, "arrived");
    assert_int_equal(kvf_test_reap(getter, 5000), 0);
    assert_int_equal(kvf__store_server_waiters(srv), 0);
    close(fd);
    kvf_store_server_stop(srv);
}

static void cli_kv_bad_url_fails_at_once(void **state)
{
    (void)state;
    /* The seed's own typo: rejected by the parser, before any connection attempt. */
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(kv("tcp://192.168.1.1000:8000", "get", "x", NULL, NULL), 1);
    assert_true(kvf_test_now_ms() - t0 < 2000);
    assert_non_null(strstr(out, "192.168.1.1000 is not a valid IPv4 address"));

    assert_int_equal(kv("http://127.0.0.1:8000", "get", "x", NULL, NULL), 1);
    assert_non_null(strstr(out, "http"));
}

static void cli_kv_refused_store_fails_at_once(void **state)
{
    (void)state;
    /* Port 1 on loopback: nothing listens there, so the connect is refused; that is said at
     * once, not after the default --timeout (5 s) of retries. */
    char *argv[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", "tcp://127.0.0.1:1", "get",
                    "x", NULL};
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(kvf_test_run(argv, out, sizeof(out), 10000), 1);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(took < 1000);
    /* The whole line, as docs/operations.md ("Troubleshooting") quotes it. */
    assert_string_equal(out, "kvferry kv: cannot reach the store: store tcp://127.0.0.1:1: cannot "
                             "connect: connect 127.0.0.1:1: Connection refused (KVF_ESTOREDOWN)\n");
}

static void cli_usage_errors(void **state)
{
    (void)state;
    char *no_url[] = {(char *)kvf_test_cli_path(), "kv", "get", "x", NULL};
    assert_int_equal(kvf_test_run(no_url, out, sizeof(out), 5000), 2);
    assert_non_null(strstr(out, "--store-url is required"));
    char *bogus[] = {(char *)kvf_test_cli_path(), "frobnicate", NULL};
    assert_int_equal(kvf_test_run(bogus, out, sizeof(out), 5000), 2);
    assert_non_null(strstr(out, "unknown command \"frobnicate\""));
    char *help[] = {(char *)kvf_test_cli_path(), "store", "--help", NULL};
    assert_int_equal(kvf_test_run(help, out, sizeof(out), 5000), 0);
    assert_non_null(strstr(out, "usage: kvferry store"));
    char *level[] = {(char *)kvf_test_cli_path(), "store", "--log-level", "7", NULL};
    assert_int_equal(kvf_test_run(level, out, sizeof(out), 5000), 2);
    assert_non_null(strstr(out, "--log-level 7"));
}

static void cli_store_port_in_use(void **state)
{
    (void)state;
    char url[128];
    pid_t store = kvf_test_store_process(url, sizeof(url));
    char *argv[] = {(char *)kvf_test_cli_path(), "store", "--listen", url, NULL};
    assert_int_equal(kvf_test_run(argv, out, sizeof(out), 5000), 1);
    /* The whole line, as docs/operations.md ("Troubleshooting") quotes it. */
    char want[512];
    snprintf(want, sizeof(want),
             "kvferry store: cannot listen on %s: store listen %s: Address already in use "
             "(EADDRINUSE)\n",
             url, url);
    assert_string_equal(out, want);
    kill(store, SIGINT);
    assert_int_equal(kvf_test_reap(store, 5000), 0);
}

/* `kvferry store --max-keys-per-client 2`: the third key of one address is refused, and
 * `kvferry kv set` exits 1 with the store's message naming the quota and its value. */
static void cli_store_quota_flag_and_refusal(void **state)
{
    (void)state;
    char *argv[] = {(char *)kvf_test_cli_path(), "store", "--listen", "tcp://127.0.0.1:0",
                    "--max-keys-per-client", "2", NULL};
    int fd;
    pid_t store = kvf_test_spawn_pipe(argv, &fd);
    char line[256], url[128];
    const char *tag = "listening on ";
    assert_true(kvf_test_read_line(fd, line, sizeof(line), 10000) >= 0);
    assert_non_null(strstr(line, tag));
    snprintf(url, sizeof(url), "%s", strstr(line, tag) + strlen(tag));
    close(fd);

    assert_int_equal(kv(url, "set", "q/1", "a", NULL), 0);
    assert_int_equal(kv(url, "set", "q/2", "b", NULL), 0);
    assert_int_equal(kv(url, "set", "q/3", "c", NULL), 1);
    assert_non_null(strstr(out, "quota max_keys_per_client (2) reached: 127.0.0.1 holds 2 keys"));
    /* Replacing a key of its own needs no new quota. */
    assert_int_equal(kv(url, "set", "q/2", "bb", NULL), 0);
    kill(store, SIGTERM);
    assert_int_equal(kvf_test_reap(store, 5000), 0);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(cli_store_quota_flag_and_refusal),
    cmocka_unit_test(cli_kv_round_trip),
    cmocka_unit_test(cli_kv_get_waits_for_key),
    cmocka_unit_test(cli_kv_bad_url_fails_at_once),
    cmocka_unit_test(cli_kv_refused_store_fails_at_once),
    cmocka_unit_test(cli_usage_errors),
    cmocka_unit_test(cli_store_port_in_use),
};

KVF_TEST_MAIN(tests)
