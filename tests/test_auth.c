/*
 * The cluster secret (docs/security.md): key files, the handshake on the engine port and on the
 * built-in store, and what a client without the key, with a wrong one, or with a captured
 * handshake gets: refused before any byte of registered memory is written or read, and before
 * any store request runs, with KVF_EAUTH and a message saying why.
 */
#include <arpa/inet.h>
#include <pthread.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/auth.h"
#include "common/url.h"
#include "common/wire.h"
#include "store/proto.h"
#include "test_util.h"
#include "transport/tcp_proto.h"

#define BUF_LEN (1u << 20)

typedef struct {
    char dir[64];
    char key_a[96], key_b[96];
    kvf_store_server_t *srv;
    kvf_engine_t *decode;
    uint8_t *buf; /* registered by decode, filled with pattern 7 */
    uint16_t port;
} fixture_t;

static void write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    assert_int_equal(chmod(path, mode), 0);
}

static void fixture_keys(fixture_t *f)
{
    snprintf(f->dir, sizeof(f->dir), "/tmp/kvf-auth-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->key_a, sizeof(f->key_a), "%s/a.key", f->dir);
    snprintf(f->key_b, sizeof(f->key_b), "%s/b.key", f->dir);
    assert_kvf_ok(kvf_auth_keygen(f->key_a));
    assert_kvf_ok(kvf_auth_keygen(f->key_b));
}

/* A store and a Decode that both require @key (NULL: none), with BUF_LEN registered bytes. */
static void fixture_start(fixture_t *f, const char *key)
{
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.auth_key_file = key;
    assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &f->srv));
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = key;
    cfg.transport = KVF_TRANSPORT_TCP;
    f->decode = kvf_test_engine(kvf_store_server_url(f->srv), KVF_ROLE_DECODE, &cfg);
    f->buf = malloc(BUF_LEN);
    assert_non_null(f->buf);
    kvf_test_pattern(f->buf, BUF_LEN, 7);
    assert_kvf_ok(kvf_mem_register(f->decode, f->buf, BUF_LEN));
    f->port = kvf_engine_port(f->decode);
}

static void fixture_stop(fixture_t *f)
{
    kvf_engine_destroy(f->decode);
    kvf_store_server_stop(f->srv);
    free(f->buf);
    unlink(f->key_a);
    unlink(f->key_b);
    rmdir(f->dir);
}

/* The registered bytes are still pattern 7: nothing was written. */
static void assert_untouched(const fixture_t *f)
{
    uint8_t *want = malloc(BUF_LEN);
    assert_non_null(want);
    kvf_test_pattern(want, BUF_LEN, 7);
    assert_memory_equal(f->buf, want, BUF_LEN);
    free(want);
}

static int raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    return fd;
}

/* Bytes the peer sends until it closes (or 5 s pass), at most @cap. */
static size_t read_to_close(int fd, uint8_t *out, size_t cap)
{
    size_t got = 0;
    for (;;) {
        ssize_t r = recv(fd, out + got, cap - got, 0);
        if (r <= 0 || (got += (size_t)r) == cap)
            return got;
    }
}

/* A WRITE of 64 bytes of 0xEE at the start of the registered buffer, then a READ of it. */
static size_t frames_write_read(const fixture_t *f, uint8_t *out)
{
    tcp_hdr_encode(out, KVF_TCP_WRITE, 0, 2, (uintptr_t)f->buf, 64);
    memset(out + KVF_TCP_HDR_LEN, 0xEE, 64);
    tcp_hdr_encode(out + KVF_TCP_HDR_LEN + 64, KVF_TCP_READ, 0, 3, (uintptr_t)f->buf, 64);
    return 2 * KVF_TCP_HDR_LEN + 64;
}

static size_t frame_hello(uint8_t *out, const char *sid)
{
    tcp_hdr_encode(out, KVF_TCP_HELLO, 0, 1, 0, strlen(sid));
    memcpy(out + KVF_TCP_HDR_LEN, sid, strlen(sid));
    return KVF_TCP_HDR_LEN + strlen(sid);
}

/* None of @got's bytes is a READ answer carrying registered memory: no RESP with a payload of
 * the registered bytes. Every answer is an error RESP or a handshake refusal. */
static void assert_no_data_answer(const fixture_t *f, const uint8_t *got, size_t n)
{
    for (size_t i = 0; i + 64 <= n; i++)
        assert_false(memcmp(got + i, f->buf, 64) == 0);
}

static kvf_auth_key_t load_key(const char *path)
{
    kvf_auth_key_t k;
    assert_kvf_ok(kvf__auth_key_resolve(path, &k));
    assert_int_equal(k.len, KVF_AUTH_KEY_GEN);
    return k;
}

/* ---- key files ------------------------------------------------------------------------------- */

static void keygen_writes_a_private_key(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    struct stat sb;
    assert_int_equal(stat(f.key_a, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    assert_int_equal(sb.st_size, 65);
    kvf_auth_key_t a = load_key(f.key_a), b = load_key(f.key_b);
    assert_false(memcmp(a.bytes, b.bytes, a.len) == 0);
    /* Never overwritten. */
    assert_kvf_err(kvf_auth_keygen(f.key_a), -EEXIST);
    assert_last_error_contains("never overwritten");
    kvf_auth_key_t again = load_key(f.key_a);
    assert_memory_equal(again.bytes, a.bytes, a.len);

    char bad[128];
    kvf_auth_key_t k;
    snprintf(bad, sizeof(bad), "%s/open.key", f.dir);
    write_file(bad, "00112233445566778899aabbccddeeff\n", 0644);
    assert_kvf_err(kvf__auth_key_resolve(bad, &k), -KVF_EINVAL);
    assert_last_error_contains("mode 0644 lets others use it; chmod 600 it");
    unlink(bad);
    write_file(bad, "0011223344\n", 0600);
    assert_kvf_err(kvf__auth_key_resolve(bad, &k), -KVF_EINVAL);
    assert_last_error_contains("10 characters");
    unlink(bad);
    write_file(bad, "0011223344556677889aabbccddeeffx\n", 0600);
    assert_kvf_err(kvf__auth_key_resolve(bad, &k), -KVF_EINVAL);
    assert_last_error_contains("not a hex digit");
    unlink(bad);
    /* A missing file named by the environment is an error, not "no key". */
    setenv(KVF_AUTH_KEY_ENV, bad, 1);
    assert_kvf_err(kvf__auth_key_resolve(NULL, &k), -ENOENT);
    assert_last_error_contains(bad);
    unsetenv(KVF_AUTH_KEY_ENV);
    assert_kvf_ok(kvf__auth_key_resolve(NULL, &k));
    assert_int_equal(k.len, 0);
    unlink(f.key_a);
    unlink(f.key_b);
    rmdir(f.dir);
}

/* ---- engines --------------------------------------------------------------------------------- */

/* The seed's flow with the secret on every connection: bytes land, the notification names the
 * proven sender. */
static void secret_transfer_works(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = f.key_a;
    cfg.transport = KVF_TRANSPORT_TCP;
    kvf_engine_t *pre = kvf_test_engine(kvf_store_server_url(f.srv), KVF_ROLE_PREFILL, &cfg);
    uint8_t *src = malloc(BUF_LEN);
    assert_non_null(src);
    kvf_test_pattern(src, BUF_LEN, 9);
    kvf_xfer_t x = {.op = KVF_OP_WRITE, .local = src, .remote = (uintptr_t)f.buf, .len = BUF_LEN};
    assert_kvf_ok(kvf_transfer_sync_notify(pre, kvf_engine_session_id(f.decode), &x, 1, "kv", 2));
    assert_memory_equal(f.buf, src, BUF_LEN);
    kvf_notify_t n;
    assert_int_equal(kvf_notify_wait(f.decode, &n, 1, 5000), 1);
    assert_string_equal(n.sender, kvf_engine_session_id(pre));
    kvf_engine_destroy(pre);
    free(src);
    fixture_stop(&f);
}

/* An engine whose key the store does not share fails at create, at once, with KVF_EAUTH. */
static void wrong_or_missing_key_fails_at_once(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = f.key_b;
    kvf_engine_t *e = NULL;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_engine_create(kvf_store_server_url(f.srv), "127.0.0.1:0", KVF_ROLE_PREFILL,
                                     0, &cfg, &e),
                   -KVF_EAUTH);
    assert_last_error_contains("wrong key: the proof does not match this side's key");
    cfg.auth_key_file = NULL;
    assert_kvf_err(kvf_engine_create(kvf_store_server_url(f.srv), "127.0.0.1:0", KVF_ROLE_PREFILL,
                                     0, &cfg, &e),
                   -KVF_EAUTH);
    assert_last_error_contains(
        "this store requires the cluster secret and this client has no auth key");
    /* "At once": well under the 10 s connect timeout the store client would otherwise retry. */
    assert_true(kvf_test_now_ms() - t0 < 3000);
    fixture_stop(&f);
}

/* A client with a key and a store without one: refused, and told why. */
static void key_against_plain_store_fails(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, NULL);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.auth_key_file = f.key_a;
    kvf_store_t *st = NULL;
    assert_kvf_err(kvf_store_open(kvf_store_server_url(f.srv), &o, &st), -KVF_EAUTH);
    assert_last_error_contains("this store has no auth key: the cluster secret is not configured on");
    fixture_stop(&f);
}

/* STATS over the engine port: refused without the key, served with it. */
static void stats_fetch_needs_the_key(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    kvf_stats_t s;
    memset(&s, 0, sizeof(s));
    s.size = sizeof(s);
    unsetenv(KVF_AUTH_KEY_ENV);
    assert_kvf_err(kvf_engine_stats_fetch(kvf_engine_session_id(f.decode), 3000, &s), -KVF_EAUTH);
    assert_last_error_contains("requires the cluster secret");
    setenv(KVF_AUTH_KEY_ENV, f.key_b, 1);
    assert_kvf_err(kvf_engine_stats_fetch(kvf_engine_session_id(f.decode), 3000, &s), -KVF_EAUTH);
    assert_last_error_contains("wrong key");
    setenv(KVF_AUTH_KEY_ENV, f.key_a, 1);
    assert_kvf_ok(kvf_engine_stats_fetch(kvf_engine_session_id(f.decode), 3000, &s));
    kvf_stats_free(&s);
    unsetenv(KVF_AUTH_KEY_ENV);
    fixture_stop(&f);
}

/* ---- raw sockets against an engine with a key ------------------------------------------------ */

/* No handshake: the HELLO is answered with KVF_EAUTH and a message, the WRITE and READ behind it
 * are never served. */
static void raw_skip_handshake_refused(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    uint8_t out[512], got[4096];
    size_t n = frame_hello(out, "127.0.0.1:1");
    n += frames_write_read(&f, out + n);
    int fd = raw_connect(f.port);
    assert_int_equal(send(fd, out, n, MSG_NOSIGNAL), (ssize_t)n);
    size_t g = read_to_close(fd, got, sizeof(got) - 1);
    close(fd);
    assert_true(g >= KVF_TCP_HDR_LEN);
    tcp_hdr_t h;
    tcp_hdr_decode(got, &h);
    assert_int_equal(h.type, KVF_TCP_RESP);
    assert_int_equal(h.status, KVF_EAUTH);
    assert_int_equal(g, KVF_TCP_HDR_LEN + h.len); /* that answer and nothing after it */
    got[g] = '\0';
    assert_non_null(strstr((char *)got + KVF_TCP_HDR_LEN, "requires the cluster secret"));
    assert_untouched(&f);
    fixture_stop(&f);
}

/* A made-up proof: refused ("wrong key"), the frames behind it are never served. */
static void raw_forged_proof_refused(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    uint8_t out[KVF_AUTH_MAX_MSG + 512], got[4096], nonce[KVF_AUTH_NONCE_LEN] = {1, 2, 3};
    const char *id = "127.0.0.1:1";
    int fd = raw_connect(f.port);
    size_t n = kvf__auth_encode(out, KVF_AUTH_HELLO, nonce, sizeof(nonce), id, strlen(id));
    assert_int_equal(send(fd, out, n, MSG_NOSIGNAL), (ssize_t)n);
    uint8_t hdr[KVF_AUTH_HDR_LEN], body[KVF_AUTH_MAX_BODY];
    assert_int_equal(recv(fd, hdr, sizeof(hdr), MSG_WAITALL), (ssize_t)sizeof(hdr));
    uint8_t type;
    size_t blen;
    char why[128];
    assert_true(kvf__auth_hdr_parse(hdr, &type, &blen, why, sizeof(why)));
    assert_int_equal(type, KVF_AUTH_CHALLENGE);
    assert_int_equal(recv(fd, body, blen, MSG_WAITALL), (ssize_t)blen);
    uint8_t mac[KVF_AUTH_MAC_LEN];
    memset(mac, 0x5A, sizeof(mac));
    n = kvf__auth_encode(out, KVF_AUTH_PROOF, mac, sizeof(mac), NULL, 0);
    n += frame_hello(out + n, id);
    n += frames_write_read(&f, out + n);
    assert_int_equal(send(fd, out, n, MSG_NOSIGNAL), (ssize_t)n);
    size_t g = read_to_close(fd, got, sizeof(got) - 1);
    close(fd);
    assert_true(g >= KVF_AUTH_HDR_LEN);
    assert_true(kvf__auth_hdr_parse(got, &type, &blen, why, sizeof(why)));
    assert_int_equal(type, KVF_AUTH_REFUSED);
    assert_int_equal(g, KVF_AUTH_HDR_LEN + blen);
    got[g] = '\0';
    assert_non_null(strstr((char *)got + KVF_AUTH_HDR_LEN, "wrong key"));
    assert_no_data_answer(&f, got, g);
    assert_untouched(&f);
    fixture_stop(&f);
}

/* Record every byte a real client with the key sends (handshake, HELLO, WRITE), check that it
 * worked, then replay the recording on a new connection: the server's fresh nonce makes the old
 * proof worthless, and nothing lands. */
static void raw_replayed_handshake_refused(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    kvf_auth_key_t key = load_key(f.key_a);
    const char *id = "127.0.0.1:1";
    int sp[2];
    /* The client runs its half over one end of a socket pair; this test relays both ways and
     * keeps what the client sent. */
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sp), 0);
    int fd = raw_connect(f.port);
    uint8_t rec[KVF_AUTH_MAX_MSG * 4 + 512];
    size_t rlen = 0;
    pid_t pid = kvf_test_fork();
    if (pid == 0) {
        char why[128];
        close(sp[0]);
        _exit(kvf__auth_client(sp[1], &key, id, kvf__now_ms() + 5000,
                                   kvf_engine_session_id(f.decode), why, sizeof(why))
                  ? 1
                  : 0);
    }
    close(sp[1]);
    /* Two messages each way: HELLO → CHALLENGE, PROOF → OK. */
    for (int round = 0; round < 2; round++) {
        uint8_t m[KVF_AUTH_MAX_MSG];
        assert_int_equal(recv(sp[0], m, KVF_AUTH_HDR_LEN, MSG_WAITALL), KVF_AUTH_HDR_LEN);
        size_t bl = kvf__get_le16(m + 6);
        assert_int_equal(recv(sp[0], m + KVF_AUTH_HDR_LEN, bl, MSG_WAITALL), (ssize_t)bl);
        memcpy(rec + rlen, m, KVF_AUTH_HDR_LEN + bl);
        rlen += KVF_AUTH_HDR_LEN + bl;
        assert_int_equal(send(fd, m, KVF_AUTH_HDR_LEN + bl, MSG_NOSIGNAL),
                         (ssize_t)(KVF_AUTH_HDR_LEN + bl));
        assert_int_equal(recv(fd, m, KVF_AUTH_HDR_LEN, MSG_WAITALL), KVF_AUTH_HDR_LEN);
        bl = kvf__get_le16(m + 6);
        assert_int_equal(recv(fd, m + KVF_AUTH_HDR_LEN, bl, MSG_WAITALL), (ssize_t)bl);
        assert_int_equal(send(sp[0], m, KVF_AUTH_HDR_LEN + bl, MSG_NOSIGNAL),
                         (ssize_t)(KVF_AUTH_HDR_LEN + bl));
    }
    assert_int_equal(kvf_test_reap(pid, 5000), 0);
    close(sp[0]);
    size_t tail = frame_hello(rec + rlen, id);
    tcp_hdr_encode(rec + rlen + tail, KVF_TCP_WRITE, 0, 2, (uintptr_t)f.buf, 64);
    memset(rec + rlen + tail + KVF_TCP_HDR_LEN, 0xEE, 64);
    tail += KVF_TCP_HDR_LEN + 64;
    assert_int_equal(send(fd, rec + rlen, tail, MSG_NOSIGNAL), (ssize_t)tail);
    rlen += tail;
    /* The captured session wrote: the recording is a good one. */
    uint8_t ans[2 * KVF_TCP_HDR_LEN];
    assert_int_equal(recv(fd, ans, sizeof(ans), MSG_WAITALL), (ssize_t)sizeof(ans));
    tcp_hdr_t h;
    tcp_hdr_decode(ans + KVF_TCP_HDR_LEN, &h);
    assert_int_equal(h.status, 0);
    assert_int_equal(f.buf[0], 0xEE);
    close(fd);
    kvf_test_pattern(f.buf, BUF_LEN, 7);

    fd = raw_connect(f.port);
    assert_int_equal(send(fd, rec, rlen, MSG_NOSIGNAL), (ssize_t)rlen);
    uint8_t got[4096];
    size_t g = read_to_close(fd, got, sizeof(got) - 1);
    close(fd);
    /* A new challenge, then the refusal of the old proof, and nothing else. */
    uint8_t type;
    size_t blen;
    char why[128];
    assert_true(kvf__auth_hdr_parse(got, &type, &blen, why, sizeof(why)));
    assert_int_equal(type, KVF_AUTH_CHALLENGE);
    size_t off = KVF_AUTH_HDR_LEN + blen;
    assert_true(g > off);
    assert_true(kvf__auth_hdr_parse(got + off, &type, &blen, why, sizeof(why)));
    assert_int_equal(type, KVF_AUTH_REFUSED);
    assert_int_equal(g, off + KVF_AUTH_HDR_LEN + blen);
    assert_untouched(&f);
    kvf__auth_key_wipe(&key);
    fixture_stop(&f);
}

/* A client that proved the key as one session id may not say HELLO as another: refused with
 * KVF_EAUTH, and the WRITE behind it never lands. */
static void raw_claimed_other_id_refused(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    kvf_auth_key_t key = load_key(f.key_a);
    int fd = raw_connect(f.port);
    char why[128];
    assert_kvf_ok(kvf__auth_client(fd, &key, "127.0.0.1:1111", kvf__now_ms() + 5000,
                                   kvf_engine_session_id(f.decode), why,
                                   sizeof(why)));
    uint8_t out[512], got[4096];
    size_t n = frame_hello(out, "127.0.0.1:2222");
    n += frames_write_read(&f, out + n);
    assert_int_equal(send(fd, out, n, MSG_NOSIGNAL), (ssize_t)n);
    size_t g = read_to_close(fd, got, sizeof(got) - 1);
    close(fd);
    tcp_hdr_t h;
    assert_true(g >= KVF_TCP_HDR_LEN);
    tcp_hdr_decode(got, &h);
    assert_int_equal(h.status, KVF_EAUTH);
    assert_int_equal(g, KVF_TCP_HDR_LEN + h.len);
    got[g] = '\0';
    assert_non_null(strstr((char *)got + KVF_TCP_HDR_LEN, "127.0.0.1:1111"));
    assert_untouched(&f);

    /* The same id in both: served, and a notification carries the proven id. */
    fd = raw_connect(f.port);
    assert_kvf_ok(kvf__auth_client(fd, &key, "127.0.0.1:1111", kvf__now_ms() + 5000,
                                   kvf_engine_session_id(f.decode), why,
                                   sizeof(why)));
    n = frame_hello(out, "127.0.0.1:1111");
    tcp_hdr_encode(out + n, KVF_TCP_NOTIFY, 0, 2, 0, 2);
    memcpy(out + n + KVF_TCP_HDR_LEN, "hi", 2);
    n += KVF_TCP_HDR_LEN + 2;
    assert_int_equal(send(fd, out, n, MSG_NOSIGNAL), (ssize_t)n);
    assert_int_equal(recv(fd, got, 2 * KVF_TCP_HDR_LEN, MSG_WAITALL), 2 * KVF_TCP_HDR_LEN);
    kvf_notify_t note;
    assert_int_equal(kvf_notify_wait(f.decode, &note, 1, 5000), 1);
    assert_string_equal(note.sender, "127.0.0.1:1111");
    close(fd);
    kvf__auth_key_wipe(&key);
    fixture_stop(&f);
}

/* Pre-auth limits: an oversized hello is refused at its header, a silent client is cut at the
 * handshake's deadline. */
static void raw_preauth_limits(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    uint8_t out[KVF_AUTH_HDR_LEN], got[512];
    kvf__put_le32(out, KVF_AUTH_MAGIC);
    out[4] = KVF_AUTH_VERSION;
    out[5] = KVF_AUTH_HELLO;
    kvf__put_le16(out + 6, 60000);
    int fd = raw_connect(f.port);
    assert_int_equal(send(fd, out, sizeof(out), MSG_NOSIGNAL), (ssize_t)sizeof(out));
    size_t g = read_to_close(fd, got, sizeof(got) - 1);
    close(fd);
    uint8_t type;
    size_t blen;
    char why[128];
    assert_true(kvf__auth_hdr_parse(got, &type, &blen, why, sizeof(why)));
    assert_int_equal(type, KVF_AUTH_REFUSED);
    assert_int_equal(g, KVF_AUTH_HDR_LEN + blen);

    fd = raw_connect(f.port);
    uint64_t t0 = kvf_test_now_ms();
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    assert_int_equal(recv(fd, got, sizeof(got), 0), 0);
    uint64_t took = kvf_test_now_ms() - t0;
    close(fd);
    assert_true(took >= KVF_AUTH_TIMEOUT_MS - 100);
    assert_true(took < KVF_AUTH_TIMEOUT_MS + 3000);
    assert_untouched(&f);
    fixture_stop(&f);
}

/* The reverse: a client with a key and an engine without one. */
static void raw_key_against_plain_engine_refused(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, NULL);
    kvf_auth_key_t key = load_key(f.key_a);
    int fd = raw_connect(f.port);
    char why[160];
    assert_kvf_err(kvf__auth_client(fd, &key, "127.0.0.1:1", kvf__now_ms() + 5000,
                                   kvf_engine_session_id(f.decode), why,
                                    sizeof(why)),
                   -KVF_EAUTH);
    if (!strstr(why, "this engine has no auth key"))
        fail_msg("why: %s", why);
    close(fd);
    kvf__auth_key_wipe(&key);
    fixture_stop(&f);
}

/* ---- raw sockets against a store with a key -------------------------------------------------- */

/* A SET without the handshake is answered with KVF_STORE_ST_AUTH and never runs. */
static void raw_store_request_without_handshake_refused(void **state)
{
    fixture_t f;
    fixture_keys(&f);
    fixture_start(&f, f.key_a);
    kvf_hostport_t hp;
    assert_kvf_ok(kvf__session_id_parse(kvf_store_server_url(f.srv) + 6, &hp));
    int fd = raw_connect(hp.port);
    kvf_buf_t b;
    kvf__buf_init(&b);
    kvf__buf_put_u32(&b, KVF_STORE_MAGIC);
    kvf__buf_put_u8(&b, KVF_STORE_PROTO_VERSION);
    kvf__buf_put_u8(&b, KVF_STORE_OP_SET);
    kvf__buf_put_u16(&b, 0);
    kvf__buf_put_u32(&b, 5);
    kvf__buf_put_u32(&b, 0);
    size_t body = b.len;
    kvf__buf_put_blob(&b, "owned", 5);
    kvf__buf_put_blob(&b, "x", 1);
    kvf__buf_put_u64(&b, 0);
    kvf__put_le32(b.data + 12, (uint32_t)(b.len - body));
    assert_int_equal(send(fd, b.data, b.len, MSG_NOSIGNAL), (ssize_t)b.len);
    kvf__buf_free(&b);
    uint8_t got[1024];
    size_t g = read_to_close(fd, got, sizeof(got) - 1);
    close(fd);
    assert_true(g >= KVF_STORE_HDR_LEN);
    assert_int_equal(kvf__get_le16(got + 6), KVF_STORE_ST_AUTH);
    assert_int_equal(kvf__get_le32(got + 8), 5);
    got[g] = '\0';
    assert_non_null(memmem(got, g, "requires the cluster secret", 27));
    /* The key was never set. */
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.auth_key_file = f.key_a;
    kvf_store_t *st;
    assert_kvf_ok(kvf_store_open(kvf_store_server_url(f.srv), &o, &st));
    void *v;
    size_t vl;
    assert_kvf_err(kvf_store_get(st, "owned", 0, &v, &vl), -KVF_ENOTFOUND);
    kvf_store_close(st);
    fixture_stop(&f);
}

/* ---- a relay: a party without the key between an honest client and another server -------- */

typedef struct {
    const char *key_file;
    uint16_t port; /* where the client connects: the relay's */
    bool store;    /* a store client (kvf_store_open); else an engine's data connection */
    int rc;
    char why[256];
} relay_client_t;

static void *relay_client_main(void *arg)
{
    relay_client_t *c = arg;
    if (c->store) {
        char url[64];
        snprintf(url, sizeof(url), "tcp://127.0.0.1:%u", c->port);
        kvf_store_opts_t so;
        kvf_store_opts_init(&so);
        so.auth_key_file = c->key_file;
        so.connect_timeout_ms = 2000;
        kvf_store_t *st = NULL;
        c->rc = kvf_store_open(url, &so, &st);
        snprintf(c->why, sizeof(c->why), "%s", kvf_last_error());
        if (c->rc == 0)
            kvf_store_close(st);
        return NULL;
    }
    /* An engine that means the peer at the relay's address ("127.0.0.1:<port>"). */
    kvf_auth_key_t key;
    c->rc = kvf__auth_key_resolve(c->key_file, &key);
    int fd = c->rc == 0 ? raw_connect(c->port) : -1;
    char peer[32];
    snprintf(peer, sizeof(peer), "127.0.0.1:%u", c->port);
    if (fd >= 0)
        c->rc = kvf__auth_client(fd, &key, "127.0.0.1:4444", kvf__now_ms() + 5000, peer, c->why,
                                 sizeof(c->why));
    if (fd >= 0)
        close(fd);
    kvf__auth_key_wipe(&key);
    return NULL;
}

/* One handshake message from @fd into @m (KVF_AUTH_MAX_MSG bytes); its length, 0 at close. */
static size_t relay_msg(int fd, uint8_t *m)
{
    if (recv(fd, m, KVF_AUTH_HDR_LEN, MSG_WAITALL) != KVF_AUTH_HDR_LEN)
        return 0;
    size_t bl = kvf__get_le16(m + 6);
    if (bl > KVF_AUTH_MAX_MSG - KVF_AUTH_HDR_LEN ||
        (bl && recv(fd, m + KVF_AUTH_HDR_LEN, bl, MSG_WAITALL) != (ssize_t)bl))
        return 0;
    return KVF_AUTH_HDR_LEN + bl;
}

/* Found in review: clients did not check which server answered, so a party without the key that
 * accepted a keyed client's connection (at an address the client meant for its store, or for a
 * peer that had died) could pass the handshake on to a Decode, receive its OK, and write into its
 * memory. Now the client refuses a server that is not the one it meant before it proves anything:
 * the relay has no proof to pass on, and the Decode's memory is untouched. */
static void relayed_handshake_gives_no_access(void **state)
{
    for (int store = 0; store < 2; store++) {
        fixture_t f;
        fixture_keys(&f);
        fixture_start(&f, f.key_a);
        int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t al = sizeof(a);
        assert_int_equal(bind(lfd, (struct sockaddr *)&a, sizeof(a)), 0);
        assert_int_equal(listen(lfd, 4), 0);
        assert_int_equal(getsockname(lfd, (struct sockaddr *)&a, &al), 0);
        relay_client_t c = {.key_file = f.key_a, .port = ntohs(a.sin_port), .store = store};
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, relay_client_main, &c), 0);
        int cfd = accept(lfd, NULL, NULL);
        assert_true(cfd >= 0);
        struct timeval tv = {.tv_sec = 5};
        setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        int dfd = raw_connect(f.port);
        uint8_t m[KVF_AUTH_MAX_MSG];
        size_t n = relay_msg(cfd, m); /* the client's HELLO, on to the Decode */
        assert_true(n > 0 && m[5] == KVF_AUTH_HELLO);
        assert_int_equal(send(dfd, m, n, MSG_NOSIGNAL), (ssize_t)n);
        n = relay_msg(dfd, m); /* the Decode's CHALLENGE, back to the client */
        assert_true(n > 0 && m[5] == KVF_AUTH_CHALLENGE);
        assert_int_equal(send(cfd, m, n, MSG_NOSIGNAL), (ssize_t)n);
        n = relay_msg(cfd, m); /* the client's answer: a refusal, never a proof */
        bool proof = n > 0 && m[5] == KVF_AUTH_PROOF;
        if (proof) {
            /* What the attack did with it: the Decode accepts, and a WRITE lands. */
            send(dfd, m, n, MSG_NOSIGNAL);
            relay_msg(dfd, m);
            uint8_t out[1024];
            size_t k = frame_hello(out, "127.0.0.1:4444");
            k += frames_write_read(&f, out + k);
            send(dfd, out, k, MSG_NOSIGNAL);
            uint8_t got[4096];
            read_to_close(dfd, got, sizeof(got));
        }
        close(cfd);
        close(dfd);
        pthread_join(th, NULL);
        close(lfd);
        if (proof)
            fail_msg("the %s client proved the key to a server it did not mean",
                     store ? "store" : "engine");
        assert_int_equal(c.rc, -KVF_EAUTH);
        char want[96];
        snprintf(want, sizeof(want), "the peer here is %s, not %s", kvf_engine_session_id(f.decode),
                 store ? "kvferry-store" : "127.0.0.1:");
        if (!strstr(c.why, want))
            fail_msg("the %s client says: %s (want \"%s\")", store ? "store" : "engine", c.why,
                     want);
        assert_untouched(&f);
        fixture_stop(&f);
    }
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(keygen_writes_a_private_key),
    cmocka_unit_test(secret_transfer_works),
    cmocka_unit_test(wrong_or_missing_key_fails_at_once),
    cmocka_unit_test(key_against_plain_store_fails),
    cmocka_unit_test(stats_fetch_needs_the_key),
    cmocka_unit_test(raw_skip_handshake_refused),
    cmocka_unit_test(raw_forged_proof_refused),
    cmocka_unit_test(raw_replayed_handshake_refused),
    cmocka_unit_test(raw_claimed_other_id_refused),
    cmocka_unit_test(relayed_handshake_gives_no_access),
    cmocka_unit_test(raw_preauth_limits),
    cmocka_unit_test(raw_key_against_plain_engine_refused),
    cmocka_unit_test(raw_store_request_without_handshake_refused),
};

KVF_TEST_MAIN(tests)
