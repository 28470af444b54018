/*
 * Statistics: a known sequence of transfers gives exact counts (per transport, per peer, errors
 * by code, notifications, regions); the snapshot asked over the engine's port (STATS) equals the
 * local one; the encoding refuses hostile answers; the metrics endpoint answers GET /metrics and
 * holds its bounds against a misbehaving client (size, count, time).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/stats.h"
#include "test_util.h"

typedef struct {
    kvf_store_server_t *srv;
    const char *url;
    kvf_engine_t *dec, *pre;
    uint8_t *buf; /* the Decode's registered region */
} fx_t;

#define REGION (1u << 20)

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    fx->srv = kvf_test_store_start();
    fx->url = kvf_store_server_url(fx->srv);
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    c.metrics_listen = "127.0.0.1:0";
    fx->dec = kvf_test_engine(fx->url, KVF_ROLE_DECODE, &c);
    fx->pre = kvf_test_engine(fx->url, KVF_ROLE_PREFILL, &c);
    fx->buf = aligned_alloc(4096, REGION);
    memset(fx->buf, 0, REGION);
    assert_kvf_ok(kvf_mem_register(fx->dec, fx->buf, REGION));
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_engine_destroy(fx->pre);
    kvf_engine_destroy(fx->dec);
    kvf_store_server_stop(fx->srv);
    free(fx->buf);
    free(fx);
    return 0;
}

/* The known sequence: 3 single writes of 4096 bytes, one batch of two writes (1000, 2000) and a
 * read (500), one write outside the region (refused), one notification alone. */
static void run_sequence(fx_t *fx)
{
    const char *dsid = kvf_engine_session_id(fx->dec);
    uint64_t base = (uintptr_t)fx->buf;
    static uint8_t src[8192], dst[512];
    kvf_test_pattern(src, sizeof(src), 7);
    for (int i = 0; i < 3; i++)
        assert_kvf_ok(kvf_write(fx->pre, dsid, src, base + (uint64_t)i * 4096, 4096));
    kvf_xfer_t x[3] = {
        {.op = KVF_OP_WRITE, .local = src, .remote = base + 65536, .len = 1000},
        {.op = KVF_OP_WRITE, .local = src + 1000, .remote = base + 70000, .len = 2000},
        {.op = KVF_OP_READ, .local = dst, .remote = base, .len = 500},
    };
    assert_kvf_ok(kvf_transfer_sync(fx->pre, dsid, x, 3));
    assert_memory_equal(dst, src, 500);
    assert_kvf_err(kvf_write(fx->pre, dsid, src, base + REGION - 10, 100), -KVF_ENOTREG);
    assert_kvf_ok(kvf_notify_send(fx->pre, dsid, "kv", 2));
}

static const kvf_stats_transport_t *transport_of(const kvf_stats_t *s, const char *name)
{
    for (size_t i = 0; i < s->ntransports; i++)
        if (!strcmp(s->transports[i].name, name))
            return &s->transports[i];
    fail_msg("no transport %s in the snapshot", name);
    return NULL;
}

static void assert_counts(const kvf_stats_counts_t *c)
{
    assert_int_equal(c->write_bytes, 3 * 4096 + 3000);
    assert_int_equal(c->write_ops, 5);
    assert_int_equal(c->read_bytes, 500);
    assert_int_equal(c->read_ops, 1);
    assert_int_equal(c->calls, 4);
    assert_int_equal(c->failed, 1);
}

static void exact_counts(void **state)
{
    fx_t *fx = *state;
    run_sequence(fx);
    const char *path;
    assert_kvf_ok(kvf_engine_peer_transport(fx->pre, kvf_engine_session_id(fx->dec), &path));

    kvf_stats_t s;
    assert_kvf_ok(kvf_engine_stats(fx->pre, &s));
    assert_string_equal(s.session_id, kvf_engine_session_id(fx->pre));
    assert_string_equal(s.role, "Prefill");
    assert_true(s.ntransports >= 3);
    uint64_t lat = 0;
    for (size_t i = 0; i < s.ntransports; i++) {
        const kvf_stats_transport_t *t = &s.transports[i];
        if (strcmp(t->name, path) != 0) {
            assert_int_equal(t->c.calls + t->c.failed + t->c.write_bytes + t->c.read_bytes, 0);
            continue;
        }
        assert_counts(&t->c);
        for (size_t b = 0; b < KVF_STATS_LAT_BUCKETS; b++)
            lat += t->lat_count[b];
        assert_true(t->lat_sum_us > 0);
    }
    assert_int_equal(lat, 5);
    assert_int_equal(s.lat_bound_us[KVF_STATS_LAT_BUCKETS - 1], UINT64_MAX);
    for (size_t i = 0; i < KVF_STATS_ERR_SLOTS; i++)
        assert_int_equal(s.errors[i], i == KVF_ENOTREG - KVF_ERRNO_OFFSET ? 1 : 0);
    assert_int_equal(s.npeers, 1);
    assert_string_equal(s.peers[0].sid, kvf_engine_session_id(fx->dec));
    assert_string_equal(s.peers[0].transport, path);
    assert_counts(&s.peers[0].c);
    assert_int_equal(s.peers[0].in_flight, 0);
    assert_int_equal(s.in_flight, 0);
    assert_int_equal(s.connections, 1);
    assert_int_equal(s.notify_sent, 1);
    assert_int_equal(s.regions, 0);
    kvf_stats_free(&s);

    /* The target: its region, the notification queued until taken. */
    assert_kvf_ok(kvf_engine_stats(fx->dec, &s));
    assert_int_equal(s.regions, 1);
    assert_int_equal(s.region_bytes, REGION);
    assert_int_equal(s.notify_received, 1);
    assert_int_equal(s.notify_queued, 1);
    assert_int_equal(transport_of(&s, path)->c.calls, 0);
    kvf_stats_free(&s);
    kvf_notify_t n;
    assert_int_equal(kvf_notify_poll(fx->dec, &n, 1), 1);
    assert_kvf_ok(kvf_engine_stats(fx->dec, &s));
    assert_int_equal(s.notify_queued, 0);
    assert_int_equal(s.notify_received, 1);
    kvf_stats_free(&s);
}

/* What `kvferry info --session` reads over the port is the snapshot the engine takes itself. */
static void fetch_over_port(void **state)
{
    fx_t *fx = *state;
    run_sequence(fx);
    kvf_stats_t local, remote;
    assert_kvf_ok(kvf_engine_stats_fetch(kvf_engine_session_id(fx->pre), 3000, &remote));
    assert_kvf_ok(kvf_engine_stats(fx->pre, &local));
    assert_string_equal(remote.session_id, local.session_id);
    assert_string_equal(remote.role, "Prefill");
    assert_int_equal(remote.ntransports, local.ntransports);
    for (size_t i = 0; i < local.ntransports; i++) {
        assert_string_equal(remote.transports[i].name, local.transports[i].name);
        assert_memory_equal(&remote.transports[i].c, &local.transports[i].c,
                            sizeof(kvf_stats_counts_t));
        assert_memory_equal(remote.transports[i].lat_count, local.transports[i].lat_count,
                            sizeof(local.transports[i].lat_count));
    }
    assert_memory_equal(remote.errors, local.errors, sizeof(local.errors));
    assert_int_equal(remote.npeers, 1);
    assert_string_equal(remote.peers[0].sid, local.peers[0].sid);
    assert_counts(&remote.peers[0].c);
    kvf_stats_free(&remote);
    kvf_stats_free(&local);
}

/* Nothing listening, something that is no engine, a malformed id: each said plainly. */
static void fetch_errors(void **state)
{
    fx_t *fx = *state;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    socklen_t al = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &al);
    char sid[64];
    snprintf(sid, sizeof(sid), "127.0.0.1:%u", ntohs(a.sin_port));
    close(fd); /* bound, never listened: the port refuses */
    kvf_stats_t s;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_engine_stats_fetch(sid, 3000, &s), -ECONNREFUSED);
    assert_last_error_contains(sid);
    assert_last_error_contains("no engine listens there");
    assert_true(kvf_test_now_ms() - t0 < 1000);

    /* The store speaks another protocol. */
    const char *url = fx->url + strlen("tcp://");
    assert_kvf_err(kvf_engine_stats_fetch(url, 3000, &s), -KVF_EPROTO);
    /* The whole message, as docs/operations.md ("Troubleshooting") quotes it. */
    char want[256];
    snprintf(want, sizeof(want),
             "statistics of %s: what answers there is not a kvferry engine (it hung up on our "
             "hello)",
             url);
    assert_string_equal(kvf_last_error(), want);
    assert_kvf_err(kvf_engine_stats_fetch("127.0.0.1:99999", 1000, &s), -KVF_EINVAL);
    assert_last_error_contains("99999");
}

/* Encoding round trip; truncated, padded and inflated answers are refused, never trusted. */
static void encoding_refuses_hostile(void **state)
{
    fx_t *fx = *state;
    run_sequence(fx);
    kvf_stats_t s, d;
    uint8_t *enc;
    size_t len;
    assert_kvf_ok(kvf_engine_stats(fx->pre, &s));
    assert_kvf_ok(kvf__stats_encode(&s, &enc, &len));
    assert_kvf_ok(kvf__stats_decode(enc, len, &d));
    assert_counts(&d.peers[0].c);
    kvf_stats_free(&d);
    for (size_t cut = 0; cut < len; cut += 7) {
        assert_kvf_err(kvf__stats_decode(enc, cut, &d), -KVF_EPROTO);
        assert_null(d.peers);
    }
    uint8_t *pad = malloc(len + 1);
    memcpy(pad, enc, len);
    pad[len] = 0;
    assert_kvf_err(kvf__stats_decode(pad, len + 1, &d), -KVF_EPROTO);
    assert_last_error_contains("too long");
    /* A peer count far above what the bytes hold allocates nothing. */
    size_t np_off =
        len - s.npeers * (4 + strlen(s.peers[0].sid) + 4 + strlen(s.peers[0].transport) + 56) - 4;
    pad[np_off] = 0xff;
    pad[np_off + 1] = 0x0f;
    assert_kvf_err(kvf__stats_decode(pad, len, &d), -KVF_EPROTO);
    assert_last_error_contains("peers");
    pad[0] = 2; /* another version */
    assert_kvf_err(kvf__stats_decode(pad, len, &d), -KVF_EPROTO);
    assert_last_error_contains("version");
    free(pad);
    free(enc);
    kvf_stats_free(&s);
}

/* ---- the metrics endpoint ---------------------------------------------------------------- */

static int connect_to(const char *addr)
{
    char host[64];
    uint16_t port;
    assert_kvf_ok(kvf_session_id_parse(addr, host, sizeof(host), &port));
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    return fd;
}

/* Read until the server closes (bounded by @ms); returns the bytes read, -1 on timeout. */
static ssize_t read_all(int fd, char *buf, size_t cap, unsigned ms)
{
    size_t got = 0;
    uint64_t end = kvf_test_now_ms() + ms;
    for (;;) {
        uint64_t now = kvf_test_now_ms();
        if (now >= end)
            return -1;
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, (int)(end - now)) <= 0)
            continue;
        ssize_t r = recv(fd, buf + got, cap - 1 - got, 0);
        if (r <= 0) {
            buf[got] = 0;
            return (ssize_t)got;
        }
        got += (size_t)r;
        if (got == cap - 1)
            return (ssize_t)got;
    }
}

static void http_get(const char *addr, const char *req, char *out, size_t cap)
{
    int fd = connect_to(addr);
    assert_int_equal(send(fd, req, strlen(req), MSG_NOSIGNAL), (ssize_t)strlen(req));
    assert_true(read_all(fd, out, cap, 5000) >= 0);
    close(fd);
}

static void metrics_get(void **state)
{
    fx_t *fx = *state;
    run_sequence(fx);
    const char *addr = kvf_engine_metrics_addr(fx->pre);
    assert_true(strncmp(addr, "127.0.0.1:", 10) == 0);
    static char out[1 << 16];
    http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", out, sizeof(out));
    assert_non_null(strstr(out, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(out, "Content-Type: text/plain; version=0.0.4"));
    char want[128];
    const char *path;
    assert_kvf_ok(kvf_engine_peer_transport(fx->pre, kvf_engine_session_id(fx->dec), &path));
    snprintf(want, sizeof(want), "\nkvferry_tx_bytes_total{transport=\"%s\"} %u\n", path,
             3 * 4096 + 3000);
    if (!strstr(out, want))
        fail_msg("no line %s in\n%s", want, out);
    assert_non_null(strstr(out, "kvferry_errors_total{code=\"KVF_ENOTREG\"} 1\n"));
    /* Content-Length matches the body. */
    const char *cl = strstr(out, "Content-Length: ");
    const char *body = strstr(out, "\r\n\r\n");
    assert_non_null(cl);
    assert_non_null(body);
    assert_int_equal(strtoul(cl + 16, NULL, 10), strlen(body + 4));

    http_get(addr, "GET / HTTP/1.1\r\n\r\n", out, sizeof(out));
    assert_non_null(strstr(out, "HTTP/1.1 404 Not Found"));
    http_get(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", out, sizeof(out));
    assert_non_null(strstr(out, "HTTP/1.1 405"));
    http_get(addr, "garbage\r\n\r\n", out, sizeof(out));
    assert_non_null(strstr(out, "HTTP/1.1 400"));
}

/* A request head larger than KVF_METRICS_MAX_REQUEST is answered 431 and closed. */
static void metrics_request_too_large(void **state)
{
    fx_t *fx = *state;
    const char *addr = kvf_engine_metrics_addr(fx->pre);
    size_t n = KVF_METRICS_MAX_REQUEST + 100;
    char *req = malloc(n + 1);
    memcpy(req, "GET /metrics HTTP/1.1\r\nX: ", 26);
    memset(req + 26, 'a', n - 26);
    req[n] = 0;
    int fd = connect_to(addr);
    send(fd, req, n, MSG_NOSIGNAL); /* may be cut short by the close */
    char out[512];
    assert_true(read_all(fd, out, sizeof(out), 5000) >= 0);
    assert_non_null(strstr(out, "HTTP/1.1 431"));
    close(fd);
    free(req);
}

/* KVF_METRICS_MAX_CONNS silent clients: one more is closed at once, scrapes work again as soon
 * as the silent ones go, and a silent client is cut off after KVF_METRICS_TIMEOUT_MS. */
static void metrics_connection_cap_and_timeout(void **state)
{
    fx_t *fx = *state;
    const char *addr = kvf_engine_metrics_addr(fx->pre);
    int fds[KVF_METRICS_MAX_CONNS];
    uint64_t t0 = kvf_test_now_ms();
    for (unsigned i = 0; i < KVF_METRICS_MAX_CONNS; i++)
        fds[i] = connect_to(addr);
    /* The server accepts in backlog order, so the extra one is the one beyond the cap. */
    int extra = connect_to(addr);
    char out[256];
    ssize_t r = read_all(extra, out, sizeof(out), 3000);
    assert_int_equal(r, 0); /* closed with nothing sent */
    close(extra);
    /* The silent ones are cut off at the timeout, not before. */
    r = read_all(fds[0], out, sizeof(out), KVF_METRICS_TIMEOUT_MS + 3000);
    assert_int_equal(r, 0);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(took >= KVF_METRICS_TIMEOUT_MS - 100);
    for (unsigned i = 0; i < KVF_METRICS_MAX_CONNS; i++)
        close(fds[i]);
    static char page[1 << 16];
    http_get(addr, "GET /metrics HTTP/1.0\r\n\r\n", page, sizeof(page));
    assert_non_null(strstr(page, "HTTP/1.1 200 OK"));
}

static void metrics_listen_refused(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c;
    kvf_config_init(&c);
    c.metrics_listen = kvf_engine_metrics_addr(fx->pre); /* taken */
    kvf_engine_t *e = NULL;
    int rc = kvf_engine_create(fx->url, "127.0.0.1:0", KVF_ROLE_BOTH, 0, &c, &e);
    assert_int_equal(rc, -EADDRINUSE);
    assert_last_error_contains("metrics listen address");
    c.metrics_listen = "127.0.0.1:notaport";
    assert_kvf_err(kvf_engine_create(fx->url, "127.0.0.1:0", KVF_ROLE_BOTH, 0, &c, &e),
                   -KVF_EINVAL);
    assert_last_error_contains("notaport");
}

/* The store's own counts: two engines hold a session and a regions record each under one lease
 * each; a destroyed engine's go with its lease. */
static void store_server_counts(void **state)
{
    fx_t *fx = *state;
    kvf_store_server_stats_t s;
    assert_kvf_ok(kvf_store_server_stats(fx->srv, &s));
    assert_int_equal(s.keys, 4);
    assert_int_equal(s.leases, 2);
    assert_int_equal(s.clients, 2);
    assert_int_equal(s.waiters, 0);
    assert_true(s.ops >= 8 && s.bytes_in > 0 && s.bytes_out > 0);
    uint64_t ops = s.ops;
    kvf_engine_destroy(fx->pre);
    fx->pre = NULL;
    assert_kvf_ok(kvf_store_server_stats(fx->srv, &s));
    assert_int_equal(s.keys, 2);
    assert_int_equal(s.leases, 1);
    assert_true(s.ops > ops);
    /* The closed connection is seen by the server's loop a moment later (bounded wait). */
    uint64_t end = kvf_test_now_ms() + 5000;
    while (s.clients != 1 && kvf_test_now_ms() < end) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
        assert_kvf_ok(kvf_store_server_stats(fx->srv, &s));
    }
    assert_int_equal(s.clients, 1);
    char *text;
    assert_kvf_ok(kvf_store_server_stats_prometheus(&s, &text, NULL));
    assert_non_null(strstr(text, "# TYPE kvferry_store_keys gauge\nkvferry_store_keys 2\n"));
    assert_non_null(strstr(text, "# TYPE kvferry_store_ops_total counter\n"));
    free(text);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(store_server_counts, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(exact_counts, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(fetch_over_port, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(fetch_errors, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(encoding_refuses_hostile, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(metrics_get, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(metrics_request_too_large, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(metrics_connection_cap_and_timeout, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(metrics_listen_refused, fx_setup, fx_teardown),
};

KVF_TEST_MAIN(tests)
