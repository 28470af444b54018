/*
 * kvf_peer_wait() readies the path to the peer it found (kvferry.h, "Peers"): once it returned,
 * the engine's async threads run and the peer's path is being opened in the background, so the
 * first transfer does not pay for either. Best effort: a peer that is not there is waited for,
 * and failed, exactly as before.
 *
 * CTest runs every case three times (KVFERRY_TRANSPORT unset: the in-process loop path; tcp;
 * shm, whose notifications take a tcp connection).
 */
#include "test_util.h"

#include <dirent.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ASYNC_THREADS 3u
#define OPEN_WAIT_MS  5000u

/* Threads of this process named @name. */
static unsigned threads_named(const char *name)
{
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    unsigned n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char path[300], comm[32] = "";
        snprintf(path, sizeof(path), "/proc/self/task/%s/comm", de->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue; /* ended meanwhile */
        if (fgets(comm, sizeof(comm), f))
            comm[strcspn(comm, "\n")] = '\0';
        fclose(f);
        n += strcmp(comm, name) == 0;
    }
    closedir(d);
    return n;
}

/* Established IPv4 TCP connections of this process's network namespace to 127.0.0.1:@port. The
 * address counts too: a port is shared by sockets on different addresses, and a raw client of a
 * test running alongside (bound to 127.0.0.2:0) may hold @port; the server end of its connection
 * then has @port as its remote port (test_many_peers.c). */
static unsigned tcp_established_to(unsigned port)
{
    FILE *f = fopen("/proc/net/tcp", "r");
    assert_non_null(f);
    char line[512];
    unsigned n = 0;
    if (!fgets(line, sizeof(line), f)) /* the header */
        line[0] = '\0';
    while (fgets(line, sizeof(line), f)) {
        unsigned sl, laddr, lport, raddr, rport, st;
        if (sscanf(line, " %u: %x:%x %x:%x %x", &sl, &laddr, &lport, &raddr, &rport, &st) == 6 &&
            raddr == htonl(INADDR_LOOPBACK) && rport == port && st == 1 /* TCP_ESTABLISHED */)
            n++;
    }
    fclose(f);
    return n;
}

static unsigned port_of(const char *sid)
{
    const char *colon = strrchr(sid, ':');
    assert_non_null(colon);
    return (unsigned)strtoul(colon + 1, NULL, 10);
}

static uint64_t stats_connections(kvf_engine_t *e)
{
    kvf_stats_t s;
    assert_kvf_ok(kvf_engine_stats(e, &s));
    uint64_t n = s.connections;
    kvf_stats_free(&s);
    return n;
}

static void nap_ms(unsigned ms)
{
    struct timespec ts = {0, (long)ms * 1000000L};
    nanosleep(&ts, NULL);
}

typedef struct {
    kvf_store_server_t *srv;
    const char *url;
    kvf_engine_t *pre, *dec;
} fx_t;

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    fx->srv = kvf_test_store_start();
    fx->url = kvf_store_server_url(fx->srv);
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    c.op_timeout_ms = 10000;
    c.async_threads = ASYNC_THREADS;
    fx->dec = kvf_test_engine(fx->url, KVF_ROLE_DECODE, &c);
    fx->pre = kvf_test_engine(fx->url, KVF_ROLE_PREFILL, &c);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_engine_destroy(fx->pre);
    kvf_engine_destroy(fx->dec);
    kvf_store_server_stop(fx->srv);
    free(fx);
    return 0;
}

/* The async threads are started by kvf_peer_wait() once it found the peer, not by the first
 * submit; a wait that found nobody starts none. */
static void peer_wait_starts_async_threads(void **state)
{
    fx_t *fx = *state;
    const char *dec = kvf_engine_session_id(fx->dec);
    assert_int_equal(threads_named("kvf-batch"), 0);

    assert_kvf_err(kvf_peer_wait(fx->pre, "127.0.0.1:1", 0), -KVF_ETIMEDOUT);
    assert_last_error_contains("127.0.0.1:1");
    assert_int_equal(threads_named("kvf-batch"), 0);

    assert_kvf_ok(kvf_peer_wait(fx->pre, dec, 1000));
    /* At least config.async_threads (one more may be added while the open waits for the
     * peer's lookup), and all of them the Prefill's: the Decode never submitted. */
    unsigned n = threads_named("kvf-batch");
    if (n < ASYNC_THREADS || n > ASYNC_THREADS + 1)
        fail_msg("%u kvf-batch threads after kvf_peer_wait, want %u (or one more)", n,
                 ASYNC_THREADS);
}

/* After kvf_peer_wait() the path to the peer is opened without a transfer: the peer is in the
 * engine's cache with its path chosen, and over tcp (also shm: its notifications' connection)
 * a connection to the peer is up. Then the first transfer works and opens nothing more. */
static void peer_wait_opens_the_path(void **state)
{
    fx_t *fx = *state;
    const char *dec = kvf_engine_session_id(fx->dec);
    const char *forced = getenv("KVFERRY_TRANSPORT");
    bool wants_tcp = forced && (!strcmp(forced, "tcp") || !strcmp(forced, "shm"));
    unsigned port = port_of(dec);
    const char *via;

    assert_int_equal(stats_connections(fx->pre), 0);
    assert_kvf_err(kvf_engine_peer_transport(fx->pre, dec, &via), -KVF_ENOTFOUND);
    assert_int_equal(tcp_established_to(port), 0);

    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_peer_wait(fx->pre, dec, 1000));
    /* The open runs in the background: poll what it leaves behind, bounded. */
    bool open = false;
    while (!open && kvf_test_now_ms() - t0 < OPEN_WAIT_MS) {
        open = stats_connections(fx->pre) == 1 && (!wants_tcp || tcp_established_to(port) >= 1);
        if (!open)
            nap_ms(1);
    }
    if (!open)
        fail_msg("%u ms after kvf_peer_wait: %llu peers with a path, %u tcp connections to %s",
                 OPEN_WAIT_MS, (unsigned long long)stats_connections(fx->pre),
                 tcp_established_to(port), dec);
    assert_kvf_ok(kvf_engine_peer_transport(fx->pre, dec, &via));
    if (forced && *forced)
        assert_string_equal(via, forced);
    else
        assert_string_equal(via, "loop");

    /* The first transfer runs over that path. */
    size_t len = 64 * 1024;
    void *dst = NULL, *src = calloc(1, len);
    assert_non_null(src);
    assert_kvf_ok(kvf_mem_alloc(fx->dec, len, &dst));
    kvf_test_pattern(src, len, 17);
    unsigned before = tcp_established_to(port);
    assert_kvf_ok(kvf_transfer_sync_notify(fx->pre, dec,
                                           &(kvf_xfer_t){.op = KVF_OP_WRITE,
                                                         .local = src,
                                                         .remote = (uint64_t)(uintptr_t)dst,
                                                         .len = len},
                                           1, "n", 1));
    assert_memory_equal(dst, src, len);
    assert_int_equal(stats_connections(fx->pre), 1);
    if (wants_tcp && !strcmp(forced, "shm"))
        assert_int_equal(tcp_established_to(port), before); /* the notification's is up */
    free(src);
}

/* An open still running (or queued) when the engine is destroyed does not hold destroy up. */
static void destroy_right_after_peer_wait(void **state)
{
    fx_t *fx = *state;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_peer_wait(fx->pre, kvf_engine_session_id(fx->dec), 1000));
    kvf_engine_destroy(fx->pre);
    fx->pre = NULL;
    uint64_t took = kvf_test_now_ms() - t0;
    if (took > 2000)
        fail_msg("kvf_peer_wait then destroy took %llu ms", (unsigned long long)took);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(peer_wait_starts_async_threads, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(peer_wait_opens_the_path, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(destroy_right_after_peer_wait, fx_setup, fx_teardown),
    };
    return KVF_TEST_RUN(tests, argc, argv);
}
