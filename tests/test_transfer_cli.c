/*
 * `kvferry transfer` and `kvferry demo` as a user runs them: the seed's two-process flow with
 * either side first, the demo, and bad input. Children are waited on through their output lines
 * and their exit, never through sleeps, and the teardown kills and reaps any a failed case left.
 */
#include "test_util.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Generous against the children's own --timeout, well inside CTest's 180 s. */
#define CHILD_TIMEOUT "20"
#define WAIT_MS 50000u

/* Every child a case starts, so that the teardown can reap what a failed assertion left. */
#define MAX_KIDS 8
static pid_t kids[MAX_KIDS];
static int kid_fds[MAX_KIDS];
static int nkids;

/* Output of one child, kept whole for the assertions. */
typedef struct {
    char text[65536];
    size_t used;
} output_t;

static output_t out_a, out_b;
static char run_out[65536];

static pid_t spawn(char *const argv[], int *fd)
{
    assert_true(nkids < MAX_KIDS);
    pid_t pid = kvf_test_spawn_pipe(argv, fd);
    kids[nkids] = pid;
    kid_fds[nkids++] = *fd;
    return pid;
}

static pid_t store_process(char *url, size_t len)
{
    assert_true(nkids < MAX_KIDS);
    pid_t pid = kvf_test_store_process(url, len);
    kids[nkids] = pid;
    kid_fds[nkids++] = -1;
    return pid;
}

/* Reap @pid (killing it after @timeout_ms) and forget it. Returns its exit status or -1. */
static int reap(pid_t pid, unsigned timeout_ms)
{
    int rc = kvf_test_reap(pid, timeout_ms);
    for (int i = 0; i < nkids; i++)
        if (kids[i] == pid)
            kids[i] = 0;
    return rc;
}

static int reap_children(void **state)
{
    (void)state;
    for (int i = 0; i < nkids; i++) {
        if (kids[i] > 0) {
            kill(kids[i], SIGKILL);
            kvf_test_reap(kids[i], 5000);
        }
        if (kid_fds[i] >= 0)
            close(kid_fds[i]);
    }
    nkids = 0;
    out_a.used = out_b.used = 0;
    out_a.text[0] = out_b.text[0] = '\0';
    return 0;
}

static void append(output_t *o, const char *s, size_t n)
{
    if (n > sizeof(o->text) - 1 - o->used)
        n = sizeof(o->text) - 1 - o->used;
    memcpy(o->text + o->used, s, n);
    o->used += n;
    o->text[o->used] = '\0';
}

/* Read lines into @o until one contains @needle; returns a copy of that line in @line, or fails
 * the test (printing what was read) on end of file or timeout. */
static void wait_line(int fd, output_t *o, const char *needle, char *line, size_t len)
{
    uint64_t deadline = kvf_test_now_ms() + WAIT_MS;
    for (;;) {
        uint64_t now = kvf_test_now_ms();
        int n = now < deadline ? kvf_test_read_line(fd, line, len, (unsigned)(deadline - now))
                               : -1;
        if (n < 0)
            fail_msg("no line containing \"%s\"; output so far:\n%s", needle, o->text);
        append(o, line, (size_t)n);
        append(o, "\n", 1);
        if (strstr(line, needle))
            return;
    }
}

/* Read everything up to end of file into @o. */
static void drain(int fd, output_t *o)
{
    uint64_t deadline = kvf_test_now_ms() + WAIT_MS;
    for (;;) {
        uint64_t now = kvf_test_now_ms();
        if (now >= deadline)
            fail_msg("no end of output within %u ms; output so far:\n%s", WAIT_MS, o->text);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(deadline - now));
        if (r < 0 && errno == EINTR)
            continue;
        assert_true(r > 0);
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n <= 0)
            return;
        append(o, buf, (size_t)n);
    }
}

static unsigned count(const char *hay, const char *needle)
{
    unsigned n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

/* The "<word> buffer success I, sum=S" lines of @o, in order, as "I=S;" items. */
static void sums(const output_t *o, const char *word, char *list, size_t len)
{
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "%s buffer success ", word);
    size_t used = 0;
    list[0] = '\0';
    for (const char *p = o->text; (p = strstr(p, prefix)); p++) {
        unsigned i;
        char sum[64];
        if (sscanf(p + strlen(prefix), "%u, sum=%63s", &i, sum) == 2)
            used += (size_t)snprintf(list + used, len - used, "%u=%s;", i, sum);
        assert_true(used < len);
    }
}

/* A port nothing listens on right now, for a node that must be named before it starts. */
static unsigned free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* Start `kvferry transfer` as @role; @dst only for the Prefill. */
static pid_t transfer(const char *role, const char *src, const char *url, const char *dst,
                      const char *iterations, int *fd)
{
    char *argv[20];
    int n = 0;
    argv[n++] = (char *)kvf_test_cli_path();
    argv[n++] = "transfer";
    argv[n++] = "--role";
    argv[n++] = (char *)role;
    argv[n++] = "--src-session-id";
    argv[n++] = (char *)src;
    argv[n++] = "--store-url";
    argv[n++] = (char *)url;
    argv[n++] = "--npu-id";
    argv[n++] = "0";
    argv[n++] = "--log-level";
    argv[n++] = "2";
    argv[n++] = "--iterations";
    argv[n++] = (char *)iterations;
    argv[n++] = "--timeout";
    argv[n++] = CHILD_TIMEOUT;
    if (dst) {
        argv[n++] = "--dst-session-id";
        argv[n++] = (char *)dst;
    }
    argv[n] = NULL;
    return spawn(argv, fd);
}

/* Both nodes have run: each exited 0 after two rounds, the Decode printed the seed's lines and
 * verified both rounds, and both sides saw the same per-slice sums. */
static void check_two_rounds(pid_t decode, int dfd, pid_t prefill, int pfd)
{
    drain(pfd, &out_b);
    int prc = reap(prefill, 10000);
    drain(dfd, &out_a);
    int drc = reap(decode, 10000);
    if (prc != 0 || drc != 0)
        fail_msg("Decode exit %d, Prefill exit %d\n--- Decode:\n%s--- Prefill:\n%s", drc, prc,
                 out_a.text, out_b.text);
    assert_non_null(strstr(out_a.text, "register success"));
    assert_non_null(strstr(out_b.text, "register success"));
    assert_int_equal(count(out_a.text, "get buffer success "), 20);
    assert_int_equal(count(out_a.text, ": verified 10 slices, 48000000 bytes"), 2);
    assert_non_null(strstr(out_a.text, "decode done: 2 rounds verified"));
    assert_int_equal(count(out_b.text, ": wrote 48000000 bytes in "), 2);
    assert_non_null(strstr(out_b.text, "prefill done: 2 rounds"));
    static char dsums[4096], psums[4096];
    sums(&out_a, "get", dsums, sizeof(dsums));
    sums(&out_b, "set", psums, sizeof(psums));
    assert_string_equal(dsums, psums);
}

/* The ready line's session id: "decode session 127.0.0.1:40123 ready". */
static void ready_sid(const char *line, const char *role, char *sid, size_t len)
{
    char fmt[64];
    snprintf(fmt, sizeof(fmt), "%s session %%255s ready", role);
    char tmp[256];
    if (sscanf(strstr(line, role), fmt, tmp) != 1)
        fail_msg("cannot read a session id from \"%s\"", line);
    snprintf(sid, len, "%s", tmp);
}

static void transfer_decode_first(void **state)
{
    (void)state;
    char url[128], line[512], sid[256];
    pid_t store = store_process(url, sizeof(url));
    int dfd, pfd;
    pid_t decode = transfer("Decode", "127.0.0.1:0", url, NULL, "2", &dfd);
    wait_line(dfd, &out_a, "decode session ", line, sizeof(line));
    ready_sid(line, "decode", sid, sizeof(sid));
    pid_t prefill = transfer("Prefill", "127.0.0.1:0", url, sid, "2", &pfd);
    check_two_rounds(decode, dfd, prefill, pfd);
    kill(store, SIGTERM);
    assert_int_equal(reap(store, 5000), 0);
}

static void transfer_prefill_first_store_process(void **state)
{
    (void)state;
    char url[128], line[512], dsid[64];
    pid_t store = store_process(url, sizeof(url));
    snprintf(dsid, sizeof(dsid), "127.0.0.1:%u", free_port());
    int dfd, pfd;
    pid_t prefill = transfer("Prefill", "127.0.0.1:0", url, dsid, "2", &pfd);
    /* The Prefill is up and looking for a Decode that does not exist yet. */
    wait_line(pfd, &out_b, "prefill session ", line, sizeof(line));
    assert_null(strstr(out_b.text, "serving it in this process"));
    pid_t decode = transfer("Decode", dsid, url, NULL, "2", &dfd);
    check_two_rounds(decode, dfd, prefill, pfd);
    assert_non_null(strstr(out_a.text, dsid));
    kill(store, SIGTERM);
    assert_int_equal(reap(store, 5000), 0);
}

static void transfer_prefill_first_own_store(void **state)
{
    (void)state;
    char url[128], line[512], dsid[64];
    /* Nothing serves this URL: the Prefill starts the store itself, like the seed's. */
    snprintf(url, sizeof(url), "tcp://127.0.0.1:%u", free_port());
    snprintf(dsid, sizeof(dsid), "127.0.0.1:%u", free_port());
    int dfd, pfd;
    pid_t prefill = transfer("Prefill", "127.0.0.1:0", url, dsid, "2", &pfd);
    wait_line(pfd, &out_b, "prefill session ", line, sizeof(line));
    assert_non_null(strstr(out_b.text, "serving it in this process"));
    pid_t decode = transfer("Decode", dsid, url, NULL, "2", &dfd);
    check_two_rounds(decode, dfd, prefill, pfd);
}

/* The seed's own order: the Decode starts first, before any store exists, and waits for it; the
 * Prefill then finds nothing at the store URL and serves the store itself. */
static void transfer_seed_order_prefill_hosts_store(void **state)
{
    (void)state;
    char url[128], line[512], dsid[64];
    snprintf(url, sizeof(url), "tcp://127.0.0.1:%u", free_port());
    snprintf(dsid, sizeof(dsid), "127.0.0.1:%u", free_port());
    int dfd, pfd;
    pid_t decode = transfer("Decode", dsid, url, NULL, "2", &dfd);
    wait_line(dfd, &out_a, "waiting up to " CHILD_TIMEOUT " s for the config store", line,
              sizeof(line));
    pid_t prefill = transfer("Prefill", "127.0.0.1:0", url, dsid, "2", &pfd);
    check_two_rounds(decode, dfd, prefill, pfd);
    assert_non_null(strstr(out_b.text, "serving it in this process"));
}

/* A round record whose checksums do not match the Decode's buffer (no Prefill wrote to it here)
 * makes the Decode fail, naming the slice; a record that is not what it should be is refused. */
static void decode_detects_mismatch(void **state)
{
    (void)state;
    char url[128], line[512], sid[256], key[512];
    pid_t store = store_process(url, sizeof(url));
    kvf_store_t *st;
    assert_kvf_ok(kvf_store_open(url, NULL, &st));

    int dfd;
    pid_t decode = transfer("Decode", "127.0.0.1:0", url, NULL, "1", &dfd);
    wait_line(dfd, &out_a, "decode session ", line, sizeof(line));
    ready_sid(line, "decode", sid, sizeof(sid));
    snprintf(key, sizeof(key), "kvferry/v1/default/transfer/%s/round", sid);
    const char *rec = "{\"round\":1,\"prefill\":\"test\",\"bytes\":48000000,\"slices\":10,"
                      "\"hash\":\"fnv1a64w\",\"checksums\":[\"0000000000000000\","
                      "\"0000000000000000\",\"0000000000000000\",\"0000000000000000\","
                      "\"0000000000000000\",\"0000000000000000\",\"0000000000000000\","
                      "\"0000000000000000\",\"0000000000000000\",\"0000000000000000\"]}";
    assert_kvf_ok(kvf_store_set(st, key, rec, strlen(rec), 0));
    drain(dfd, &out_a);
    assert_int_equal(reap(decode, 10000), 1);
    if (!strstr(out_a.text, "round 1: slice 0 (bytes 0..4799999) differs"))
        fail_msg("no mismatch reported for slice 0:\n%s", out_a.text);

    decode = transfer("Decode", "127.0.0.1:0", url, NULL, "1", &dfd);
    out_a.used = 0;
    wait_line(dfd, &out_a, "decode session ", line, sizeof(line));
    ready_sid(line, "decode", sid, sizeof(sid));
    snprintf(key, sizeof(key), "kvferry/v1/default/transfer/%s/round", sid);
    rec = "{\"round\":1,\"bytes\":1,\"slices\":10}";
    assert_kvf_ok(kvf_store_set(st, key, rec, strlen(rec), 0));
    drain(dfd, &out_a);
    assert_int_equal(reap(decode, 10000), 1);
    if (!strstr(out_a.text, "bad round record"))
        fail_msg("malformed record not refused:\n%s", out_a.text);

    kvf_store_close(st);
    kill(store, SIGTERM);
    assert_int_equal(reap(store, 5000), 0);
}

static void demo_verifies(void **state)
{
    (void)state;
    char *argv[] = {(char *)kvf_test_cli_path(), "demo", "--iterations", "2", NULL};
    int rc = kvf_test_run(argv, run_out, sizeof(run_out), 100000);
    if (rc != 0)
        fail_msg("kvferry demo exited %d:\n%s", rc, run_out);
    assert_non_null(strstr(run_out, "verified: yes"));
    assert_non_null(strstr(run_out, "bytes moved: 96000000"));
    assert_non_null(strstr(run_out, "GB/s"));
    assert_int_equal(count(run_out, "[decode]  get buffer success "), 20);
}

/* Run `kvferry transfer ARGS...` to completion; returns its exit status, output in run_out. */
static int run_transfer(char **args, unsigned timeout_ms)
{
    char *argv[24];
    int n = 0;
    argv[n++] = (char *)kvf_test_cli_path();
    argv[n++] = "transfer";
    for (; *args; args++)
        argv[n++] = *args;
    argv[n] = NULL;
    return kvf_test_run(argv, run_out, sizeof(run_out), timeout_ms);
}

#define ASSERT_OUT_HAS(s)                                                                         \
    do {                                                                                          \
        if (!strstr(run_out, (s)))                                                                \
            fail_msg("output does not mention \"%s\":\n%s", (s), run_out);                        \
    } while (0)

static void bad_role(void **state)
{
    (void)state;
    char *a[] = {"--role", "Bogus", "--store-url", "tcp://127.0.0.1:8000", NULL};
    assert_int_equal(run_transfer(a, 5000), 2);
    ASSERT_OUT_HAS("--role Bogus");
    char *b[] = {"--store-url", "tcp://127.0.0.1:8000", NULL};
    assert_int_equal(run_transfer(b, 5000), 2);
    ASSERT_OUT_HAS("--role is required");
}

static void bad_src_session_id(void **state)
{
    (void)state;
    char *a[] = {"--role", "Decode", "--store-url", "tcp://127.0.0.1:8000", "--src-session-id",
                 "192.168.1.100", NULL};
    assert_int_equal(run_transfer(a, 5000), 2);
    ASSERT_OUT_HAS("--src-session-id: session id 192.168.1.100: missing port");
    char *b[] = {"--role", "Decode", "--store-url", "tcp://127.0.0.1:8000", "--src-session-id",
                 "127.0.0.1:70000", NULL};
    assert_int_equal(run_transfer(b, 5000), 2);
    ASSERT_OUT_HAS("70000");
}

static void bad_store_url_seed_typo(void **state)
{
    (void)state;
    /* The seed's own Prefill command, typo included: refused at once, naming the address. */
    char *a[] = {"--role", "Prefill", "--src-session-id", "192.168.1.100:50052", "--store-url",
                 "tcp://192.168.1.1000:8000", "--npu-id", "1", "--dst-session-id",
                 "192.168.1.100:50051", "--log-level", "1", NULL};
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(run_transfer(a, 5000), 2);
    assert_true(kvf_test_now_ms() - t0 < 2000);
    ASSERT_OUT_HAS("192.168.1.1000 is not a valid IPv4 address");
    char *b[] = {"--role", "Decode", NULL};
    assert_int_equal(run_transfer(b, 5000), 2);
    ASSERT_OUT_HAS("--store-url is required");
}

static void dst_session_id_rules(void **state)
{
    (void)state;
    char *a[] = {"--role", "Prefill", "--store-url", "tcp://127.0.0.1:8000", NULL};
    assert_int_equal(run_transfer(a, 5000), 2);
    ASSERT_OUT_HAS("--dst-session-id");
    char *b[] = {"--role", "Decode", "--store-url", "tcp://127.0.0.1:8000", "--dst-session-id",
                 "127.0.0.1:50051", NULL};
    assert_int_equal(run_transfer(b, 5000), 2);
    ASSERT_OUT_HAS("--dst-session-id is for the Prefill");
    char *c[] = {"--role", "Prefill", "--store-url", "tcp://127.0.0.1:8000", "--dst-session-id",
                 "127.0.0.1:0", NULL};
    assert_int_equal(run_transfer(c, 5000), 2);
    ASSERT_OUT_HAS("port 0");
    char *d[] = {"--role", "Prefill", "--store-url", "tcp://127.0.0.1:8000", "--dst-session-id",
                 "127.0.0.1:50051", "--timeout", "0", NULL};
    assert_int_equal(run_transfer(d, 5000), 2);
    ASSERT_OUT_HAS("--timeout 0");
    char *e[] = {"--help", NULL};
    assert_int_equal(run_transfer(e, 5000), 0);
    ASSERT_OUT_HAS("usage: kvferry transfer");
}

static void demo_usage(void **state)
{
    (void)state;
    char *help[] = {(char *)kvf_test_cli_path(), "demo", "--help", NULL};
    assert_int_equal(kvf_test_run(help, run_out, sizeof(run_out), 5000), 0);
    ASSERT_OUT_HAS("usage: kvferry demo");
    char *bad[] = {(char *)kvf_test_cli_path(), "demo", "--iterations", "0", NULL};
    assert_int_equal(kvf_test_run(bad, run_out, sizeof(run_out), 5000), 2);
    ASSERT_OUT_HAS("--iterations 0");
}

static void unknown_dst_session_id(void **state)
{
    (void)state;
    char url[128], dsid[64];
    pid_t store = store_process(url, sizeof(url));
    snprintf(dsid, sizeof(dsid), "127.0.0.1:%u", free_port());
    char *a[] = {"--role", "Prefill", "--src-session-id", "127.0.0.1:0", "--store-url", url,
                 "--dst-session-id", dsid, "--iterations", "1", "--timeout", "1", NULL};
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(run_transfer(a, 10000), 1);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took >= 3000)
        fail_msg("took %llu ms:\n%s", (unsigned long long)took, run_out);
    ASSERT_OUT_HAS(dsid);
    kill(store, SIGTERM);
    assert_int_equal(reap(store, 5000), 0);
}

static void unreachable_store(void **state)
{
    (void)state;
    /* Port 1 on loopback: nothing listens, every connect is refused; the Decode gives up after
     * its --timeout, naming the store. */
    char *a[] = {"--role", "Decode", "--src-session-id", "127.0.0.1:0", "--store-url",
                 "tcp://127.0.0.1:1", "--timeout", "1", NULL};
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(run_transfer(a, 10000), 1);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took >= 4000)
        fail_msg("took %llu ms:\n%s", (unsigned long long)took, run_out);
    ASSERT_OUT_HAS("tcp://127.0.0.1:1");
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_teardown(transfer_decode_first, reap_children),
    cmocka_unit_test_teardown(transfer_prefill_first_store_process, reap_children),
    cmocka_unit_test_teardown(transfer_prefill_first_own_store, reap_children),
    cmocka_unit_test_teardown(transfer_seed_order_prefill_hosts_store, reap_children),
    cmocka_unit_test_teardown(decode_detects_mismatch, reap_children),
    cmocka_unit_test_teardown(demo_verifies, reap_children),
    cmocka_unit_test_teardown(bad_role, reap_children),
    cmocka_unit_test_teardown(bad_src_session_id, reap_children),
    cmocka_unit_test_teardown(bad_store_url_seed_typo, reap_children),
    cmocka_unit_test_teardown(dst_session_id_rules, reap_children),
    cmocka_unit_test_teardown(demo_usage, reap_children),
    cmocka_unit_test_teardown(unknown_dst_session_id, reap_children),
    cmocka_unit_test_teardown(unreachable_store, reap_children),
};

KVF_TEST_MAIN(tests)
