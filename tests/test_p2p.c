/*
 * Store-less discovery ("p2p://"): engines with no config store find each other by session id
 * alone, asking each peer for its records on its session port (common/p2p.h). Run once per
 * forced transport (tcp, shm): the bytes land, a peer that registers later is found, a peer
 * that starts later is waited for, a wrong namespace is named, peer events say they need a
 * store; and the request itself, spoken with raw sockets: a good one is answered, malformed ones
 * close that one connection and the engine serves on.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/common.h"
#include "common/p2p.h"
#include "common/wire.h"
#include "test_util.h"

#define P2P "p2p://"

static kvf_engine_t *p2p_engine(kvf_role_t role, const char *ns)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.init_timeout_ms = 3000;
    if (ns)
        cfg.ns = ns;
    return kvf_test_engine(P2P, role, &cfg);
}

static void p2p_url_parses(void **state)
{
    (void)state;
    const char *scheme = NULL;
    char host[64] = "x";
    uint16_t port = 1;
    assert_kvf_ok(kvf_store_url_parse("p2p://", &scheme, host, sizeof(host), &port));
    assert_string_equal(scheme, "p2p");
    assert_string_equal(host, "");
    assert_int_equal(port, 0);
    assert_kvf_err(kvf_store_url_parse("p2p://127.0.0.1:8000", NULL, NULL, 0, NULL), -KVF_EINVAL);
    assert_last_error_contains("p2p:// takes nothing after '://'");
    assert_kvf_err(kvf_store_url_parse("P2P://", NULL, NULL, 0, NULL), -KVF_EINVAL);
    assert_last_error_contains("must be lowercase (p2p://)");
}

/* Write and read back between two engines without any store, bytes compared. */
static void p2p_write_read_bytes(void **state)
{
    (void)state;
    kvf_engine_t *dec = p2p_engine(KVF_ROLE_DECODE, NULL);
    kvf_engine_t *pre = p2p_engine(KVF_ROLE_PREFILL, NULL);
    size_t n = 1u << 20;
    uint8_t *dst = calloc(1, n), *src = malloc(n), *back = calloc(1, n);
    assert_non_null(dst);
    assert_non_null(src);
    assert_non_null(back);
    kvf_test_pattern(src, n, 14);
    assert_kvf_ok(kvf_mem_register(dec, dst, n));
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(dec));
    assert_kvf_ok(kvf_write(pre, sid, src, (uintptr_t)dst, n));
    assert_memory_equal(dst, src, n);
    assert_kvf_ok(kvf_read(pre, sid, back, (uintptr_t)dst + 4096, n - 4096));
    assert_memory_equal(back, src + 4096, n - 4096);
    assert_kvf_ok(kvf_peer_check(pre, sid));

    /* A region registered after the peer's first look is found: the refresh asks again. */
    uint8_t *dst2 = calloc(1, 65536);
    assert_non_null(dst2);
    assert_kvf_ok(kvf_mem_register(dec, dst2, 65536));
    assert_kvf_ok(kvf_write(pre, sid, src, (uintptr_t)dst2, 65536));
    assert_memory_equal(dst2, src, 65536);

    /* Gone: the next look-up asks a port nobody answers on, and fails naming the peer. */
    kvf_engine_destroy(dec);
    int rc = kvf_write(pre, sid, src, (uintptr_t)dst, 4096);
    assert_true(rc < 0);
    assert_last_error_contains(sid);
    kvf_engine_destroy(pre);
    free(dst);
    free(dst2);
    free(src);
    free(back);
}

struct waiter {
    kvf_engine_t *e;
    char sid[KVF_SESSION_ID_MAX];
    int rc;
    uint64_t took_ms;
};

static void *wait_main(void *arg)
{
    struct waiter *w = arg;
    uint64_t t0 = kvf_test_now_ms();
    w->rc = kvf_peer_wait(w->e, w->sid, 10000);
    w->took_ms = kvf_test_now_ms() - t0;
    return NULL;
}

/* A peer that starts after the asker began to wait is found within the wait; one that never
 * starts times out with the peer named, within its bound. */
static void p2p_peer_wait(void **state)
{
    (void)state;
    kvf_engine_t *pre = p2p_engine(KVF_ROLE_PREFILL, NULL);
    /* A free port below the ephemeral range: one an engine picked and gave back could be taken
     * by another test's outgoing connection before the Decode below binds it. */
    struct waiter w = {.e = pre};
    snprintf(w.sid, sizeof(w.sid), "127.0.0.1:%u", kvf_test_free_port());

    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_peer_wait(pre, w.sid, 300), -KVF_ETIMEDOUT);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(took >= 250 && took < 3000);
    assert_last_error_contains(w.sid);

    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, wait_main, &w), 0);
    kvf_engine_t *dec = NULL;
    assert_kvf_ok(kvf_engine_create(P2P, w.sid, KVF_ROLE_DECODE, 0, NULL, &dec));
    pthread_join(th, NULL);
    assert_kvf_ok(w.rc);
    assert_true(w.took_ms < 10000);
    kvf_engine_destroy(dec);
    kvf_engine_destroy(pre);
}

/* A peer of another namespace answers that it holds no such record: the transfer fails after
 * the init timeout, naming the peer. Peer events say they need a store. */
static void p2p_namespace_and_events(void **state)
{
    (void)state;
    kvf_engine_t *dec = p2p_engine(KVF_ROLE_DECODE, "blue");
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    /* Long enough for the answer on a loaded machine (400 ms was not, nor was 2 s once under
     * ASan with a full suite beside it): the write waits it out. */
    cfg.init_timeout_ms = 5000;
    cfg.ns = "green";
    kvf_engine_t *pre = kvf_test_engine(P2P, KVF_ROLE_PREFILL, &cfg);
    uint8_t buf[64] = {0};
    assert_kvf_ok(kvf_mem_register(dec, buf, sizeof(buf)));
    assert_kvf_err(kvf_write(pre, kvf_engine_session_id(dec), buf, (uintptr_t)buf, 8),
                   -KVF_ENOTFOUND);
    assert_last_error_contains(kvf_engine_session_id(dec));
    assert_last_error_contains("holds no record");

    kvf_peer_event_t ev[4];
    assert_kvf_err(kvf_peer_events(pre, ev, 4, 0), -KVF_ENOTSUP);
    assert_last_error_contains("p2p://");
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
}

/* ---- the request by hand ------------------------------------------------------------------- */

static int raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

static void send_all(int fd, const void *p, size_t n)
{
    assert_int_equal(send(fd, p, n, MSG_NOSIGNAL), (ssize_t)n);
}

/* The connection ends without an answer: EOF (or reset) before any byte, within 5 s. */
static void expect_closed(int fd)
{
    uint8_t b[64];
    ssize_t r = recv(fd, b, sizeof(b), 0);
    if (r != 0 && !(r < 0 && errno == ECONNRESET))
        fail_msg("recv = %zd (errno %d), want the connection closed without an answer", r, errno);
    close(fd);
}

/* Ask @key with a well-formed request; the answer's status and body. */
static uint32_t ask(uint16_t port, const char *key, char *body, size_t cap)
{
    int fd = raw_connect(port);
    uint8_t hdr[KVF_P2P_REQ_LEN], ans[KVF_P2P_ANS_LEN];
    kvf__p2p_req_encode(hdr, (uint32_t)strlen(key));
    send_all(fd, hdr, sizeof(hdr));
    send_all(fd, key, strlen(key));
    assert_int_equal(recv(fd, ans, sizeof(ans), MSG_WAITALL), (ssize_t)sizeof(ans));
    uint32_t st, len;
    char why[128];
    if (!kvf__p2p_ans_decode(ans, &st, &len, why, sizeof(why)))
        fail_msg("answer: %s", why);
    assert_true(len < cap);
    assert_int_equal(recv(fd, body, len, MSG_WAITALL), (ssize_t)len);
    body[len] = '\0';
    expect_closed(fd);
    return st;
}

static void p2p_raw_requests(void **state)
{
    (void)state;
    kvf_engine_t *dec = p2p_engine(KVF_ROLE_DECODE, NULL);
    uint16_t port = kvf_engine_port(dec);
    const char *sid = kvf_engine_session_id(dec);
    char key[256], body[8192];

    snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", sid);
    assert_int_equal(ask(port, key, body, sizeof(body)), 0);
    assert_non_null(strstr(body, "\"role\":\"Decode\""));
    assert_non_null(strstr(body, sid));
    snprintf(key, sizeof(key), "kvferry/v1/default/regions/%s", sid);
    assert_int_equal(ask(port, key, body, sizeof(body)), 0);
    assert_non_null(strstr(body, "\"regions\":[]"));
    assert_int_equal(ask(port, "kvferry/v1/other/sessions/x:1", body, sizeof(body)),
                     KVF_ENOTFOUND);
    assert_non_null(strstr(body, "holds no record"));

    /* Malformed requests: each closes its connection, nothing more. */
    uint8_t hdr[KVF_P2P_REQ_LEN];
    static const struct {
        size_t at;
        uint8_t val;
    } bad[] = {
        {4, 2},  /* version */
        {5, 9},  /* op */
        {6, 1},  /* flags */
        {20, 1}, /* a reserved byte */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int fd = raw_connect(port);
        kvf__p2p_req_encode(hdr, 4);
        hdr[bad[i].at] = bad[i].val;
        send_all(fd, hdr, sizeof(hdr));
        send_all(fd, "abcd", 4);
        expect_closed(fd);
    }
    int fd = raw_connect(port); /* key length 0 */
    kvf__p2p_req_encode(hdr, 0);
    send_all(fd, hdr, sizeof(hdr));
    expect_closed(fd);
    fd = raw_connect(port); /* key length over the limit: refused before anything is read */
    kvf__p2p_req_encode(hdr, KVF_P2P_MAX_KEY + 1);
    send_all(fd, hdr, sizeof(hdr));
    expect_closed(fd);
    fd = raw_connect(port); /* a key with a space and a NUL in it */
    kvf__p2p_req_encode(hdr, 6);
    send_all(fd, hdr, sizeof(hdr));
    send_all(fd, "a b\0cd", 6);
    expect_closed(fd);
    fd = raw_connect(port); /* a key that never comes: closed at KVF_P2P_REQ_TIMEOUT_MS */
    kvf__p2p_req_encode(hdr, 10);
    send_all(fd, hdr, sizeof(hdr));
    send_all(fd, "abc", 3);
    uint64_t t0 = kvf_test_now_ms();
    expect_closed(fd);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(took >= KVF_P2P_REQ_TIMEOUT_MS - 100 && took < KVF_P2P_REQ_TIMEOUT_MS + 2500);

    /* Still serving. */
    snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", sid);
    assert_int_equal(ask(port, key, body, sizeof(body)), 0);
    kvf_engine_destroy(dec);
}

/* What answers on the port is not a kvferry engine (it hangs up): the asker says so. */
static void p2p_fetch_from_non_engine(void **state)
{
    (void)state;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    assert_int_equal(bind(lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(lfd, 4), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&a, &al), 0);
    char sid[64];
    snprintf(sid, sizeof(sid), "127.0.0.1:%u", (unsigned)ntohs(a.sin_port));
    kvf_hostport_t hp;
    assert_kvf_ok(kvf__session_id_parse(sid, &hp));

    /* A listener that answers with garbage of the answer's size. */
    pid_t pid = kvf_test_fork();
    if (pid == 0) {
        /* The whole request is read first and the asker's close awaited after the junk, so
         * that no unread byte turns the close into a reset before the junk is read. */
        int c = accept(lfd, NULL, NULL);
        uint8_t req[KVF_P2P_REQ_LEN + 64], junk[KVF_P2P_ANS_LEN];
        memset(junk, 'x', sizeof(junk));
        size_t want = KVF_P2P_REQ_LEN + strlen("kvferry/v1/default/sessions/a:1");
        if (c >= 0 && recv(c, req, want, MSG_WAITALL) == (ssize_t)want &&
            send(c, junk, sizeof(junk), MSG_NOSIGNAL) > 0)
            (void)recv(c, req, 1, 0);
        _exit(0);
    }
    void *val = NULL;
    size_t len = 0;
    assert_kvf_err(kvf__p2p_fetch(&hp, sid, NULL, NULL, NULL, "kvferry/v1/default/sessions/a:1",
                                  kvf__now_ms() + 3000, &val, &len),
                   -KVF_EPROTO);
    assert_last_error_contains("malformed P2P answer");
    assert_int_equal(kvf_test_reap(pid, 5000), 0);
    close(lfd);
}

/* A port reserved before the engine exists (the frameworks' get_rpc_port() before initialize):
 * a socket bound to the wildcard address, not listening; the engine listens on it, so the port
 * is never free in between. A socket bound to another port is refused, naming both. */
static void reserved_port_used_by_engine(void **state)
{
    (void)state;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t al = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &al), 0);
    uint16_t port = ntohs(a.sin_port);
    char sid[64], other[64];
    snprintf(sid, sizeof(sid), "127.0.0.1:%u", (unsigned)port);
    snprintf(other, sizeof(other), "127.0.0.1:%u", (unsigned)(port == 65535 ? 1 : port + 1));

    kvf_config_t cfg;
    kvf_config_init(&cfg);
    assert_int_equal(cfg.listen_fd, -1);
    cfg.listen_fd = fd;
    kvf_engine_t *dec = NULL;
    assert_kvf_err(kvf_engine_create(P2P, other, KVF_ROLE_DECODE, 0, &cfg, &dec), -KVF_EINVAL);
    assert_last_error_contains("is bound to port");
    assert_last_error_contains(other);
    cfg.listen_fd = -2;
    assert_kvf_err(kvf_engine_create(P2P, sid, KVF_ROLE_DECODE, 0, &cfg, &dec), -KVF_EINVAL);
    assert_last_error_contains("config.listen_fd -2");
    cfg.listen_fd = fd;
    assert_kvf_ok(kvf_engine_create(P2P, sid, KVF_ROLE_DECODE, 0, &cfg, &dec));
    assert_int_equal(kvf_engine_port(dec), port);
    assert_string_equal(kvf_engine_session_id(dec), sid);
    close(fd); /* the caller's copy: the engine keeps listening on its own */

    kvf_engine_t *pre = p2p_engine(KVF_ROLE_PREFILL, NULL);
    uint8_t src[4096], dst[4096] = {0};
    kvf_test_pattern(src, sizeof(src), 2);
    assert_kvf_ok(kvf_mem_register(dec, dst, sizeof(dst)));
    assert_kvf_ok(kvf_write(pre, sid, src, (uintptr_t)dst, sizeof(src)));
    assert_memory_equal(dst, src, sizeof(src));
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
}

/* An engine on p2p:// forced to tcp, proving @key (NULL: none). */
static kvf_engine_t *p2p_keyed(kvf_role_t role, const char *key)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.init_timeout_ms = 3000;
    cfg.auth_key_file = key;
    cfg.transport = KVF_TRANSPORT_TCP;
    return kvf_test_engine(P2P, role, &cfg);
}

/* p2p:// with the cluster secret: the record request runs the handshake first, so engines with
 * the same key find each other and move bytes; an asker with another key, or none, is refused
 * with KVF_EAUTH saying why (and learns no record); an asker with a key meets an engine
 * without one and is told so. */
static void p2p_with_secret(void **state)
{
    (void)state;
    char dir[] = "/tmp/kvf-p2pkey-XXXXXX", ka[64], kb[64];
    assert_non_null(mkdtemp(dir));
    snprintf(ka, sizeof(ka), "%s/a.key", dir);
    snprintf(kb, sizeof(kb), "%s/b.key", dir);
    assert_kvf_ok(kvf_auth_keygen(ka));
    assert_kvf_ok(kvf_auth_keygen(kb));
    unsetenv("KVFERRY_AUTH_KEY_FILE");

    kvf_engine_t *dec = p2p_keyed(KVF_ROLE_DECODE, ka), *pre = p2p_keyed(KVF_ROLE_PREFILL, ka);
    size_t n = 1u << 20;
    uint8_t *dst = calloc(1, n), *src = malloc(n);
    assert_non_null(dst);
    assert_non_null(src);
    kvf_test_pattern(src, n, 15);
    assert_kvf_ok(kvf_mem_register(dec, dst, n));
    char sid[KVF_SESSION_ID_MAX], want[400];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(dec));
    assert_kvf_ok(kvf_write(pre, sid, src, (uintptr_t)dst, n));
    assert_memory_equal(dst, src, n);

    /* Another key: refused at the record request. */
    memset(dst, 0, n);
    kvf_engine_t *other = p2p_keyed(KVF_ROLE_PREFILL, kb);
    assert_kvf_err(kvf_write(other, sid, src, (uintptr_t)dst, n), -KVF_EAUTH);
    assert_last_error_contains("P2P record request: authentication: refused by the peer: wrong "
                               "key: the proof does not match this side's key");
    kvf_engine_destroy(other);
    /* No key: the engine answers the bare request with KVF_EAUTH and what is missing. */
    kvf_engine_t *bare = p2p_keyed(KVF_ROLE_PREFILL, NULL);
    assert_kvf_err(kvf_write(bare, sid, src, (uintptr_t)dst, n), -KVF_EAUTH);
    snprintf(want, sizeof(want),
             "engine %s requires the cluster secret: this side has no auth key (set an auth key "
             "file, e.g. KVFERRY_AUTH_KEY_FILE)",
             sid);
    assert_last_error_contains(want);
    kvf_engine_destroy(bare);
    uint8_t zero[64] = {0};
    assert_memory_equal(dst, zero, sizeof(zero));
    /* The same bare request spoken directly: no record, the reason instead. */
    kvf_hostport_t hp;
    assert_kvf_ok(kvf__session_id_parse(sid, &hp));
    char key[300];
    snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", sid);
    void *val = NULL;
    size_t len = 0;
    assert_kvf_err(kvf__p2p_fetch(&hp, sid, NULL, NULL, NULL, key, kvf__now_ms() + 3000, &val, &len),
                   -KVF_EAUTH);
    assert_last_error_contains(want);
    assert_null(val);
    /* With the key the same request is answered. */
    kvf_auth_key_t k;
    assert_kvf_ok(kvf__auth_key_resolve(ka, &k));
    assert_kvf_ok(kvf__p2p_fetch(&hp, sid, &k, NULL, NULL, key, kvf__now_ms() + 3000, &val, &len));
    assert_non_null(strstr(val, "\"session\""));
    free(val);
    kvf_engine_destroy(dec);

    /* An asker with a key and an engine without one. */
    dec = p2p_keyed(KVF_ROLE_DECODE, NULL);
    assert_kvf_ok(kvf_mem_register(dec, dst, n));
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(dec));
    assert_kvf_err(kvf_write(pre, sid, src, (uintptr_t)dst, n), -KVF_EAUTH);
    assert_last_error_contains("refused by the peer: this engine has no auth key");
    kvf__auth_key_wipe(&k);
    kvf_engine_destroy(dec);
    kvf_engine_destroy(pre);
    free(dst);
    free(src);
    unlink(ka);
    unlink(kb);
    rmdir(dir);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(p2p_with_secret),
    cmocka_unit_test(reserved_port_used_by_engine),
    cmocka_unit_test(p2p_url_parses),
    cmocka_unit_test(p2p_write_read_bytes),
    cmocka_unit_test(p2p_peer_wait),
    cmocka_unit_test(p2p_namespace_and_events),
    cmocka_unit_test(p2p_raw_requests),
    cmocka_unit_test(p2p_fetch_from_non_engine),
};

KVF_TEST_MAIN(tests)
