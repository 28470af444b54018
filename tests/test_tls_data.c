/*
 * TLS 1.3 on the data path (kvf_config_t.data_tls, docs/security.md): engines that transfer
 * with TLS and mutual TLS (with and without the cluster secret), every byte checked; and each
 * misconfiguration failing at once with the message the Prefill's user reads, nothing written
 * into the Decode's memory: TLS on one side only (either way), a wrong CA on either side, a
 * revoked Prefill certificate, a certificate that does not name the peer's address (and the
 * server name that fixes it), an engine without its certificate. A raw socket that speaks plain
 * to a TLS engine gets KVF_ETLS in its own protocol, garbage after a TLS record header and a
 * connection that never starts its handshake are closed, and the engine goes on serving.
 * Certificates come from tests/tls_certs.sh (the openssl command), made for each case.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "test_util.h"
#include "transport/tcp_proto.h"

#define AT_ONCE_MS 3000u /* "at once": far below the connect timeout (10 s) */
#define BUF_LEN    (4u << 20)

typedef struct {
    char dir[64];
    kvf_store_server_t *srv;
    kvf_engine_t *decode;
    uint8_t *dst; /* registered by decode, filled with pattern 1 */
} fx_t;

static char path_buf[16][128];
static unsigned path_next;

/* A file of the certificate directory (a rotating set of buffers, valid for a few calls). */
static const char *P(const fx_t *f, const char *name)
{
    char *b = path_buf[path_next++ % 16];
    snprintf(b, sizeof(path_buf[0]), "%s/%s", f->dir, name);
    return b;
}

/* TLS options with @cert (its .pem and .key; NULL: none) and the CA file @ca (NULL: none). */
static kvf_tls_opts_t opts(fx_t *f, const char *cert, const char *ca)
{
    kvf_tls_opts_t o;
    kvf_tls_opts_init(&o);
    o.enable = 1;
    if (cert) {
        char n[64];
        snprintf(n, sizeof(n), "%s.pem", cert);
        o.cert_file = P(f, n);
        snprintf(n, sizeof(n), "%s.key", cert);
        o.key_file = P(f, n);
    }
    o.ca_file = ca ? P(f, ca) : NULL;
    return o;
}

static void fx_init(fx_t *f)
{
    memset(f, 0, sizeof(*f));
    kvf_test_tls_certs(KVF_TEST_SRC_DIR, f->dir, sizeof(f->dir));
    f->srv = kvf_test_store_start();
}

/* The Decode: tcp only, with @tls as its data TLS (NULL: none) and @key (NULL: none). */
static void fx_decode(fx_t *f, const kvf_tls_opts_t *tls, const char *key)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    cfg.data_tls = tls;
    cfg.auth_key_file = key;
    f->decode = kvf_test_engine(kvf_store_server_url(f->srv), KVF_ROLE_DECODE, &cfg);
    f->dst = malloc(BUF_LEN);
    assert_non_null(f->dst);
    kvf_test_pattern(f->dst, BUF_LEN, 1);
    assert_kvf_ok(kvf_mem_register(f->decode, f->dst, BUF_LEN));
}

static kvf_engine_t *fx_prefill(fx_t *f, const kvf_tls_opts_t *tls, const char *key)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    cfg.data_tls = tls;
    cfg.auth_key_file = key;
    cfg.init_timeout_ms = 10000;
    return kvf_test_engine(kvf_store_server_url(f->srv), KVF_ROLE_PREFILL, &cfg);
}

static void fx_fini(fx_t *f)
{
    kvf_engine_destroy(f->decode);
    kvf_store_server_stop(f->srv);
    free(f->dst);
    char *argv[] = {"/bin/rm", "-rf", f->dir, NULL};
    char out[256];
    kvf_test_run(argv, out, sizeof(out), 10000);
}

/* Writes of several sizes (a gathered run of small ones, one over a chunk), a read back, and a
 * notification, from @pre into the Decode: every byte where it belongs. */
static void transfers_work(fx_t *f, kvf_engine_t *pre)
{
    const char *peer = kvf_engine_session_id(f->decode);
    uint8_t *src = malloc(BUF_LEN), *back = malloc(BUF_LEN);
    assert_non_null(src);
    assert_non_null(back);
    kvf_test_pattern(src, BUF_LEN, 2);
    assert_kvf_ok(kvf_mem_register(pre, src, BUF_LEN));
    uintptr_t d = (uintptr_t)f->dst;
    kvf_xfer_t x[4] = {
        {.op = KVF_OP_WRITE, .local = src, .remote = d, .len = 100},
        {.op = KVF_OP_WRITE, .local = src + 4096, .remote = d + 8192, .len = 4096},
        {.op = KVF_OP_WRITE, .local = src + 65536, .remote = d + 65536, .len = 3u << 20},
        {.op = KVF_OP_WRITE, .local = src + 200, .remote = d + 40000, .len = 20000},
    };
    assert_kvf_ok(kvf_transfer_sync_notify(pre, peer, x, 4, "tls", 3));
    uint8_t *want = malloc(BUF_LEN);
    assert_non_null(want);
    kvf_test_pattern(want, BUF_LEN, 1);
    for (size_t i = 0; i < 4; i++)
        memcpy(want + (x[i].remote - d), x[i].local, x[i].len);
    assert_memory_equal(f->dst, want, BUF_LEN);
    kvf_notify_t n;
    assert_int_equal(kvf_notify_wait(f->decode, &n, 1, 5000), 1);
    assert_string_equal(n.sender, kvf_engine_session_id(pre));
    assert_int_equal(n.len, 3);
    assert_memory_equal(n.msg, "tls", 3);
    /* A read of the whole region, and an async batch of reads of its pieces. */
    assert_kvf_ok(kvf_read(pre, peer, back, d, BUF_LEN));
    assert_memory_equal(back, want, BUF_LEN);
    memset(back, 0, BUF_LEN);
    kvf_xfer_t r[3] = {
        {.op = KVF_OP_READ, .local = back, .remote = d + 1, .len = 7},
        {.op = KVF_OP_READ, .local = back + 100, .remote = d + 65536, .len = 1u << 20},
        {.op = KVF_OP_READ, .local = back + (2u << 20), .remote = d + 8192, .len = 4096},
    };
    kvf_batch_t *b = NULL;
    assert_kvf_ok(kvf_transfer_submit(pre, peer, r, 3, NULL, 0, &b));
    assert_kvf_ok(kvf_batch_wait(b, 10000));
    kvf_batch_free(b);
    for (size_t i = 0; i < 3; i++)
        assert_memory_equal(r[i].local, want + (r[i].remote - d), r[i].len);
    free(want);
    free(back);
    assert_kvf_ok(kvf_mem_unregister(pre, src));
    free(src);
}

/* A write from @pre fails at once with @code and a message holding @want, and the Decode's
 * memory is as it was. */
static void write_fails(fx_t *f, kvf_engine_t *pre, int code, const char *want)
{
    uint8_t *src = malloc(1u << 20);
    assert_non_null(src);
    kvf_test_pattern(src, 1u << 20, 9);
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_write(pre, kvf_engine_session_id(f->decode), src, (uintptr_t)f->dst,
                             1u << 20),
                   code);
    assert_last_error_contains(want);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took > AT_ONCE_MS)
        fail_msg("the failure took %llu ms", (unsigned long long)took);
    uint8_t *was = malloc(BUF_LEN);
    assert_non_null(was);
    kvf_test_pattern(was, BUF_LEN, 1);
    assert_memory_equal(f->dst, was, BUF_LEN);
    free(was);
    free(src);
}

/* ---- working configurations ------------------------------------------------------------------ */

static void tls_transfers_work(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    /* The Decode has no CA, so it asks for no certificate (every engine has one all the same:
     * it is the server of the connections peers open to it). */
    kvf_tls_opts_t d = opts(&f, "server", NULL), p = opts(&f, "client", "ca.pem");
    fx_decode(&f, &d, NULL);
    kvf_engine_t *pre = fx_prefill(&f, &p, NULL);
    transfers_work(&f, pre);
    kvf_engine_destroy(pre);
    fx_fini(&f);
}

static void mutual_tls_with_secret_works(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    char key[128];
    snprintf(key, sizeof(key), "%s/cluster.key", f.dir);
    assert_kvf_ok(kvf_auth_keygen(key));
    kvf_store_server_stop(f.srv);
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.auth_key_file = key;
    assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &f.srv));
    /* Each engine presents its certificate and requires the other's, with the CRL checked; the
     * secret's handshake runs inside TLS. */
    kvf_tls_opts_t o = opts(&f, "server", "ca.pem");
    o.crl_file = P(&f, "crl.pem");
    fx_decode(&f, &o, key);
    kvf_engine_t *pre = fx_prefill(&f, &o, key);
    transfers_work(&f, pre);
    kvf_engine_destroy(pre);
    fx_fini(&f);
}

/* ---- failures -------------------------------------------------------------------------------- */

static void tls_on_one_side_fails_at_once(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    kvf_tls_opts_t d = opts(&f, "server", NULL), p = opts(&f, "client", "ca.pem");
    fx_decode(&f, &d, NULL);
    kvf_engine_t *pre = fx_prefill(&f, NULL, NULL);
    write_fails(&f, pre, -KVF_ETLS,
                "requires TLS on data connections: this side has none for them (set "
                "kvf_config_t.data_tls, --tls-data or KVFERRY_TLS_DATA=1)");
    kvf_engine_destroy(pre);
    kvf_engine_destroy(f.decode);
    free(f.dst);
    /* The reverse: a TLS Prefill, a plain Decode. */
    fx_decode(&f, NULL, NULL);
    pre = fx_prefill(&f, &p, NULL);
    write_fails(&f, pre, -KVF_ETLS,
                "TLS: the engine closed the connection during the TLS handshake (does the engine "
                "use TLS?)");
    kvf_engine_destroy(pre);
    fx_fini(&f);
}

static void wrong_ca_fails_at_once(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    kvf_tls_opts_t d = opts(&f, "server", "ca.pem");
    fx_decode(&f, &d, NULL);
    /* The Prefill trusts another CA: the Decode's certificate fails its check. */
    kvf_tls_opts_t p = opts(&f, "client", "wrongca.pem");
    kvf_engine_t *pre = fx_prefill(&f, &p, NULL);
    write_fails(&f, pre, -KVF_ETLS,
                "the server certificate failed verification: unable to get local issuer "
                "certificate");
    kvf_engine_destroy(pre);
    /* The Prefill's certificate is from another CA: the Decode refuses it. */
    p = opts(&f, "wrongserver", "ca.pem");
    pre = fx_prefill(&f, &p, NULL);
    write_fails(&f, pre, -KVF_ETLS, "the engine refused this client: tlsv1 alert unknown ca");
    kvf_engine_destroy(pre);
    fx_fini(&f);
}

static void revoked_prefill_fails_at_once(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    kvf_tls_opts_t d = opts(&f, "server", "ca.pem");
    d.crl_file = P(&f, "crl.pem");
    fx_decode(&f, &d, NULL);
    kvf_tls_opts_t p = opts(&f, "revoked", "ca.pem");
    kvf_engine_t *pre = fx_prefill(&f, &p, NULL);
    write_fails(&f, pre, -KVF_ETLS, "the engine refused this client: sslv3 alert certificate revoked");
    kvf_engine_destroy(pre);
    fx_fini(&f);
}

/* The Decode's certificate names other.example, not 127.0.0.1: refused, unless the Prefill is
 * told that name (server_name: one name for every engine). */
static void peer_name_checked(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    kvf_tls_opts_t d = opts(&f, "otherhost", NULL);
    fx_decode(&f, &d, NULL);
    kvf_tls_opts_t p = opts(&f, "client", "ca.pem");
    kvf_engine_t *pre = fx_prefill(&f, &p, NULL);
    write_fails(&f, pre, -KVF_ETLS,
                "the server certificate failed verification: IP address mismatch");
    kvf_engine_destroy(pre);
    p.server_name = "other.example";
    pre = fx_prefill(&f, &p, NULL);
    transfers_work(&f, pre);
    kvf_engine_destroy(pre);
    fx_fini(&f);
}

static void engine_without_certificate_refused(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    kvf_tls_opts_t p = opts(&f, NULL, "ca.pem");
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.data_tls = &p;
    kvf_engine_t *e = NULL;
    assert_kvf_err(kvf_engine_create(kvf_store_server_url(f.srv), "127.0.0.1:0",
                                     KVF_ROLE_PREFILL, 0, &cfg, &e),
                   -KVF_EINVAL);
    assert_null(e);
    assert_last_error_contains("needs this engine's certificate and its key (cert_file and "
                               "key_file, --tls-cert and --tls-key)");
    /* KVFERRY_TLS_DATA=1 with no TLS options anywhere. */
    cfg.data_tls = NULL;
    setenv("KVFERRY_TLS_DATA", "1", 1);
    int rc = kvf_engine_create(kvf_store_server_url(f.srv), "127.0.0.1:0", KVF_ROLE_PREFILL, 0,
                               &cfg, &e);
    unsetenv("KVFERRY_TLS_DATA");
    assert_kvf_err(rc, -KVF_EINVAL);
    assert_last_error_contains("KVFERRY_TLS_DATA=1 asks for TLS on data connections, but no TLS "
                               "options are set");
    kvf_store_server_stop(f.srv);
    f.srv = NULL;
    char *argv[] = {"/bin/rm", "-rf", f.dir, NULL};
    char out[256];
    kvf_test_run(argv, out, sizeof(out), 10000);
}

/* A raw socket speaking plain to a TLS engine: a HELLO gets KVF_ETLS in the tcp protocol, bytes
 * of no protocol and a broken handshake are cut off, a silent connection is closed at the
 * handshake's deadline, and the engine goes on serving TLS peers. */
static void raw_plain_socket_refused(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    kvf_tls_opts_t d = opts(&f, "server", NULL), p = opts(&f, "client", "ca.pem");
    fx_decode(&f, &d, NULL);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(kvf_engine_port(f.decode))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    uint8_t frame[KVF_TCP_HDR_LEN + 16];
    tcp_hdr_encode(frame, KVF_TCP_HELLO, 0, 1, 0, 11);
    memcpy(frame + KVF_TCP_HDR_LEN, "127.0.0.1:1", 11);
    assert_int_equal(send(fd, frame, KVF_TCP_HDR_LEN + 11, MSG_NOSIGNAL), KVF_TCP_HDR_LEN + 11);
    struct pollfd pf = {fd, POLLIN, 0};
    uint8_t ans[KVF_TCP_HDR_LEN + KVF_TCP_MAX_MSG + 1];
    size_t got = 0;
    while (poll(&pf, 1, 5000) == 1) {
        ssize_t r = recv(fd, ans + got, sizeof(ans) - 1 - got, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    assert_true(got > KVF_TCP_HDR_LEN);
    tcp_hdr_t h;
    tcp_hdr_decode(ans, &h);
    assert_int_equal(h.type, KVF_TCP_RESP);
    assert_int_equal(h.status, KVF_ETLS);
    ans[got] = '\0';
    assert_non_null(strstr((char *)ans + KVF_TCP_HDR_LEN, "requires TLS on data connections"));

    /* Bytes of no protocol: the connection is closed. */
    fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    memset(frame, 'G', sizeof(frame));
    assert_int_equal(send(fd, frame, sizeof(frame), MSG_NOSIGNAL), (ssize_t)sizeof(frame));
    pf.fd = fd;
    assert_int_equal(poll(&pf, 1, 5000), 1);
    assert_true(recv(fd, ans, sizeof(ans), 0) <= 0);
    close(fd);

    /* A TLS record header followed by garbage: the handshake fails, the connection is closed. */
    fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    memset(frame, 0xee, sizeof(frame));
    frame[0] = 0x16;
    frame[1] = 0x03;
    frame[2] = 0x01;
    assert_int_equal(send(fd, frame, sizeof(frame), MSG_NOSIGNAL), (ssize_t)sizeof(frame));
    pf.fd = fd;
    bool closed = false;
    for (int i = 0; i < 10 && !closed && poll(&pf, 1, 5000) == 1; i++)
        closed = recv(fd, ans, sizeof(ans), 0) <= 0; /* an alert first, then the end */
    assert_true(closed);
    close(fd);

    /* A connection that never starts its handshake is closed at KVF_TLS_HANDSHAKE_MS (the I/O
     * threads check their timers once a second). */
    fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    uint64_t t0 = kvf_test_now_ms();
    pf.fd = fd;
    assert_int_equal(poll(&pf, 1, 10000), 1);
    assert_true(recv(fd, ans, sizeof(ans), 0) <= 0);
    uint64_t took = kvf_test_now_ms() - t0;
    close(fd);
    if (took < 2900 || took > 6000)
        fail_msg("a silent connection was closed after %llu ms, want about 3000 (+ 1 s tick)",
                 (unsigned long long)took);

    kvf_engine_t *pre = fx_prefill(&f, &p, NULL);
    transfers_work(&f, pre);
    kvf_engine_destroy(pre);
    fx_fini(&f);
}

/* `kvferry info --session` (kvf_engine_stats_fetch) of a TLS engine: refused with KVF_ETLS
 * without TLS, answered with the KVFERRY_TLS_DATA and KVFERRY_TLS_* variables. */
static void stats_over_tls(void **state)
{
    (void)state;
    fx_t f;
    fx_init(&f);
    kvf_tls_opts_t d = opts(&f, "server", NULL);
    fx_decode(&f, &d, NULL);
    const char *sid = kvf_engine_session_id(f.decode);
    kvf_stats_t st;
    assert_kvf_err(kvf_engine_stats_fetch(sid, 3000, &st), -KVF_ETLS);
    assert_last_error_contains("TLS: refused by the peer: engine ");
    assert_last_error_contains("requires TLS on data connections");
    setenv("KVFERRY_TLS_DATA", "1", 1);
    setenv("KVFERRY_TLS_CA_FILE", P(&f, "wrongca.pem"), 1);
    assert_kvf_err(kvf_engine_stats_fetch(sid, 3000, &st), -KVF_ETLS);
    assert_last_error_contains("TLS: the server certificate failed verification");
    setenv("KVFERRY_TLS_CA_FILE", P(&f, "ca.pem"), 1);
    int rc = kvf_engine_stats_fetch(sid, 3000, &st);
    unsetenv("KVFERRY_TLS_DATA");
    unsetenv("KVFERRY_TLS_CA_FILE");
    assert_kvf_ok(rc);
    assert_string_equal(st.session_id, sid);
    kvf_stats_free(&st);
    fx_fini(&f);
}

static kvf_engine_t *p2p_engine(kvf_role_t role, const kvf_tls_opts_t *tls)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    cfg.data_tls = tls;
    return kvf_test_engine("p2p://", role, &cfg);
}

/* p2p:// (no store): the record request goes to the Decode's data port, so it is TLS too; a
 * Prefill without TLS is refused there with KVF_ETLS, saying what is missing. */
static void p2p_over_tls(void **state)
{
    (void)state;
    fx_t f;
    memset(&f, 0, sizeof(f));
    kvf_test_tls_certs(KVF_TEST_SRC_DIR, f.dir, sizeof(f.dir));
    kvf_tls_opts_t o = opts(&f, "server", "ca.pem");
    kvf_engine_t *dec = p2p_engine(KVF_ROLE_DECODE, &o), *pre = p2p_engine(KVF_ROLE_PREFILL, &o);
    size_t n = 1u << 20;
    uint8_t *dst = calloc(1, n), *src = malloc(n);
    assert_non_null(dst);
    assert_non_null(src);
    kvf_test_pattern(src, n, 5);
    assert_kvf_ok(kvf_mem_register(dec, dst, n));
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(dec));
    assert_kvf_ok(kvf_write(pre, sid, src, (uintptr_t)dst, n));
    assert_memory_equal(dst, src, n);
    kvf_engine_destroy(pre);

    memset(dst, 0, n);
    pre = p2p_engine(KVF_ROLE_PREFILL, NULL);
    assert_kvf_err(kvf_write(pre, sid, src, (uintptr_t)dst, n), -KVF_ETLS);
    assert_last_error_contains("requires TLS on data connections: this side has none for them");
    kvf_engine_destroy(pre);
    uint8_t zero[64] = {0};
    assert_memory_equal(dst, zero, sizeof(zero));
    kvf_engine_destroy(dec);
    free(dst);
    free(src);
    char *argv[] = {"/bin/rm", "-rf", f.dir, NULL};
    char out[256];
    kvf_test_run(argv, out, sizeof(out), 10000);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(tls_transfers_work),
        cmocka_unit_test(mutual_tls_with_secret_works),
        cmocka_unit_test(tls_on_one_side_fails_at_once),
        cmocka_unit_test(wrong_ca_fails_at_once),
        cmocka_unit_test(revoked_prefill_fails_at_once),
        cmocka_unit_test(peer_name_checked),
        cmocka_unit_test(engine_without_certificate_refused),
        cmocka_unit_test(raw_plain_socket_refused),
        cmocka_unit_test(p2p_over_tls),
        cmocka_unit_test(stats_over_tls),
    };
    return KVF_TEST_RUN(tests, argc, argv);
}
