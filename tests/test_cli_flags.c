/*
 * Flags of the long-running tools. Progress: what `kvferry transfer` prints over many rounds
 * (quiet by default, the seed's per-slice lines and every round's line behind -v; the first and
 * the last round and one line per --progress-interval in a log; a status line with rounds,
 * bytes, rate and ETA on a terminal), and `kvferry bench`'s run and ETA on a terminal.
 * --key-prefix: `kvferry transfer` and `kvferry info` under another store key prefix.
 */
#include "test_util.h"

#include <errno.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WAIT_MS 60000u

static char dout[65536], pout[65536];

static unsigned count(const char *hay, const char *needle)
{
    unsigned n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

/* Read @fd until end of file (or EIO, a terminal whose other side closed) into @out. */
static void drain(int fd, char *out, size_t len)
{
    size_t used = 0;
    uint64_t deadline = kvf_test_now_ms() + WAIT_MS;
    for (;;) {
        uint64_t now = kvf_test_now_ms();
        if (now >= deadline)
            fail_msg("no end of output within %u ms; so far:\n%.*s", WAIT_MS, (int)used, out);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(deadline - now));
        if (r < 0 && errno == EINTR)
            continue;
        assert_true(r > 0);
        ssize_t n = read(fd, out + used, len - 1 - used);
        if (n <= 0)
            break;
        used += (size_t)n;
        assert_true(used < len - 1);
    }
    out[used] = '\0';
}

static pid_t spawn_pty(char *const argv[], int *fd);

/* Start `kvferry transfer` with @extra flags; its output on a pipe, or on a terminal (the slave
 * side of a pty, whose master *@fd receives) when @tty. */
static pid_t transfer(const char *role, const char *url, const char *dst, const char *const *extra,
                      bool tty, int *fd)
{
    char *argv[32];
    int n = 0;
    argv[n++] = (char *)kvf_test_cli_path();
    argv[n++] = "transfer";
    argv[n++] = "--role";
    argv[n++] = (char *)role;
    argv[n++] = "--src-session-id";
    argv[n++] = "127.0.0.1:0";
    argv[n++] = "--store-url";
    argv[n++] = (char *)url;
    argv[n++] = "--timeout";
    argv[n++] = "20";
    if (dst) {
        argv[n++] = "--dst-session-id";
        argv[n++] = (char *)dst;
    }
    for (; *extra; extra++)
        argv[n++] = (char *)*extra;
    argv[n] = NULL;
    return tty ? spawn_pty(argv, fd) : kvf_test_spawn_pipe(argv, fd);
}

/* Start @argv with stdout and stderr on a terminal (the slave side of a new pty); *@fd receives
 * the master side. */
static pid_t spawn_pty(char *const argv[], int *fd)
{
    int master, slave;
    assert_int_equal(openpty(&master, &slave, NULL, NULL, NULL), 0);
    pid_t pid = kvf_test_fork();
    if (pid == 0) {
        dup2(slave, STDOUT_FILENO);
        dup2(slave, STDERR_FILENO);
        close(master);
        close(slave);
        execv(argv[0], argv);
        _exit(127);
    }
    close(slave);
    *fd = master;
    return pid;
}

/* Read the Decode's "decode session SID ready" line from @fd into @sid; the rest of its output
 * goes on into dout. */
static void decode_sid(int fd, char *sid, size_t len)
{
    char line[512];
    for (;;) {
        int n = kvf_test_read_line(fd, line, sizeof(line), WAIT_MS);
        if (n < 0)
            fail_msg("the Decode never said it was ready");
        if (sscanf(line, "decode session %255s ready", sid) == 1 && strlen(sid) < len)
            return;
    }
}

/* A Decode (output on a terminal when @tty) and a Prefill run @rounds rounds with @flags; both
 * must exit 0. Their outputs land in dout and pout. */
static void run_pair(const char *rounds, const char *const *flags, bool tty)
{
    char url[128], sid[256];
    pid_t store = kvf_test_store_process(url, sizeof(url));
    const char *dflags[16] = {"--iterations", rounds}, *pflags[16] = {"--iterations", rounds};
    for (int i = 0; flags[i]; i++)
        dflags[2 + i] = pflags[2 + i] = flags[i];
    int dfd, pfd;
    pid_t decode = transfer("Decode", url, NULL, dflags, tty, &dfd);
    decode_sid(dfd, sid, sizeof(sid));
    pid_t prefill = transfer("Prefill", url, sid, pflags, false, &pfd);
    drain(pfd, pout, sizeof(pout));
    drain(dfd, dout, sizeof(dout));
    close(pfd);
    close(dfd);
    int prc = kvf_test_reap(prefill, 20000), drc = kvf_test_reap(decode, 20000);
    kill(store, SIGTERM);
    kvf_test_reap(store, 5000);
    if (prc != 0 || drc != 0)
        fail_msg("Decode exit %d, Prefill exit %d\n--- Decode:\n%s--- Prefill:\n%s", drc, prc, dout,
                 pout);
}

/* In a log (not a terminal) with a long interval: the first and the last round's lines only, no
 * per-slice line, no terminal control characters, and the totals at the end. */
static void quiet_by_default_in_a_log(void **state)
{
    (void)state;
    const char *flags[] = {"--progress-interval", "3600", NULL};
    run_pair("4", flags, false);
    assert_int_equal(count(pout, "buffer success"), 0);
    assert_int_equal(count(dout, "buffer success"), 0);
    assert_int_equal(count(pout, ": wrote 48000000 bytes in "), 2);
    assert_non_null(strstr(pout, "round 1: wrote 48000000 bytes in "));
    assert_non_null(strstr(pout, "round 4: wrote 48000000 bytes in "));
    assert_int_equal(count(dout, ": verified 10 slices, 48000000 bytes"), 2);
    assert_non_null(strstr(dout, "round 1: verified 10 slices"));
    assert_non_null(strstr(dout, "round 4: verified 10 slices"));
    assert_non_null(strstr(pout, "prefill done: 4 rounds, 192000000 bytes"));
    assert_non_null(strstr(dout, "decode done: 4 rounds verified"));
    assert_null(strchr(pout, '\r'));
    assert_null(strchr(dout, '\r'));
}

/* -v: every round's line and the seed's ten per-slice lines a round, on both sides. */
static void verbose_prints_every_slice(void **state)
{
    (void)state;
    const char *flags[] = {"-v", "--progress-interval", "3600", NULL};
    run_pair("3", flags, false);
    assert_int_equal(count(pout, "set buffer success "), 30);
    assert_int_equal(count(dout, "get buffer success "), 30);
    assert_int_equal(count(pout, ": wrote 48000000 bytes in "), 3);
    assert_int_equal(count(dout, ": verified 10 slices, 48000000 bytes"), 3);
}

/* --progress-interval 0: every round's line, still without the per-slice ones. */
static void interval_zero_prints_every_round(void **state)
{
    (void)state;
    const char *flags[] = {"--progress-interval", "0", NULL};
    run_pair("3", flags, false);
    assert_int_equal(count(pout, ": wrote 48000000 bytes in "), 3);
    assert_int_equal(count(dout, ": verified 10 slices, 48000000 bytes"), 3);
    assert_int_equal(count(dout, "buffer success"), 0);
}

/* On a terminal the rounds between the first and the last show as a status line, rewritten in
 * place, with the count, the bytes, the rate and the time left; it is cleared before the last
 * round's line. */
static void terminal_shows_status_line(void **state)
{
    (void)state;
    const char *flags[] = {"--progress-interval", "3600", NULL};
    run_pair("4", flags, true);
    /* Round 2 is the first one without its own line: its status is always drawn. */
    const char *status = strstr(dout, "\r\033[K2/4 rounds verified, 0.10 GB, ");
    if (!status)
        fail_msg("no status line for round 2 on the terminal:\n%s", dout);
    assert_non_null(strstr(status, " GB/s, ETA "));
    /* Cleared, then the last round's own line. */
    const char *last = strstr(dout, "round 4: verified 10 slices");
    assert_non_null(last);
    assert_true(last > status);
    assert_int_equal(count(dout, ": verified 10 slices"), 2);
}

/* `kvferry bench` on a terminal: which run of how many, its rate and the time left. */
static void bench_shows_run_and_eta(void **state)
{
    (void)state;
    char *argv[] = {(char *)kvf_test_cli_path(),
                    "bench",
                    "--transport",
                    "tcp",
                    "--block-size",
                    "64K",
                    "--duration",
                    "1",
                    NULL};
    int fd;
    pid_t pid = spawn_pty(argv, &fd);
    drain(fd, dout, sizeof(dout));
    close(fd);
    int rc = kvf_test_reap(pid, 20000);
    if (rc != 0)
        fail_msg("kvferry bench exited %d:\n%s", rc, dout);
    const char *line = strstr(dout, "\r\033[K  run 1/1, kvferry 64 KiB x 1, 1 thread, rep 1/1: ");
    if (!line)
        fail_msg("no progress line on the terminal:\n%s", dout);
    const char *end = strchr(line + 1, '\r');
    assert_non_null(end);
    char shown[256];
    snprintf(shown, sizeof(shown), "%.*s", (int)(end - line), line);
    assert_non_null(strstr(shown, " GB/s, ETA "));
}

/* Start `kvferry info --store-url URL ARGS` and return its exit status, output in pout. */
static int info(const char *url, const char *a0, const char *a1)
{
    char *argv[] = {(char *)kvf_test_cli_path(), "info", "--store-url", (char *)url, (char *)a0,
                    (char *)a1, NULL};
    return kvf_test_run(argv, pout, sizeof(pout), 20000);
}

/* Engines under --key-prefix see only each other: a Prefill with the default prefix does not
 * find the Decode, one with the same prefix transfers to it; `kvferry info` lists the Decode
 * only under its prefix. A bad prefix is a usage error naming it. */
static void key_prefix_separates_clusters(void **state)
{
    (void)state;
    char url[128], sid[256];
    pid_t store = kvf_test_store_process(url, sizeof(url));
    const char *pfx[] = {"--iterations", "1", "--key-prefix", "team-a/kv/", NULL};
    int dfd, pfd;
    pid_t decode = transfer("Decode", url, NULL, pfx, false, &dfd);
    decode_sid(dfd, sid, sizeof(sid));

    assert_int_equal(info(url, "--key-prefix", "team-a/kv/"), 0);
    assert_non_null(strstr(pout, sid));
    assert_int_equal(info(url, NULL, NULL), 0);
    if (strstr(pout, sid))
        fail_msg("the Decode is listed under the default prefix:\n%s", pout);

    const char *other[] = {"--iterations", "1", "--timeout", "1", NULL};
    pid_t lost = transfer("Prefill", url, sid, other, false, &pfd);
    drain(pfd, pout, sizeof(pout));
    close(pfd);
    assert_int_equal(kvf_test_reap(lost, 20000), 1);
    if (!strstr(pout, "did not appear in the store"))
        fail_msg("a Prefill under another prefix found the Decode:\n%s", pout);

    pid_t prefill = transfer("Prefill", url, sid, pfx, false, &pfd);
    drain(pfd, pout, sizeof(pout));
    close(pfd);
    int prc = kvf_test_reap(prefill, 20000);
    drain(dfd, dout, sizeof(dout));
    close(dfd);
    int drc = kvf_test_reap(decode, 20000);
    if (prc != 0 || drc != 0)
        fail_msg("Decode exit %d, Prefill exit %d\n--- Decode:\n%s--- Prefill:\n%s", drc, prc,
                 dout, pout);
    assert_non_null(strstr(dout, "decode done: 1 rounds verified"));

    assert_int_equal(info(url, "--key-prefix", "a b"), 2);
    assert_non_null(strstr(pout, "kvferry info: --key-prefix a b: want 1..128 letters"));
    kill(store, SIGTERM);
    kvf_test_reap(store, 5000);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(quiet_by_default_in_a_log),
    cmocka_unit_test(verbose_prints_every_slice),
    cmocka_unit_test(interval_zero_prints_every_round),
    cmocka_unit_test(terminal_shows_status_line),
    cmocka_unit_test(bench_shows_run_and_eta),
    cmocka_unit_test(key_prefix_separates_clusters),
};

KVF_TEST_MAIN(tests)
