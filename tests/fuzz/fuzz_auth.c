/*
 * Fuzz target: the authentication handshake's parsers of bytes read before the peer proved the
 * key (common/auth.h). The first input byte picks what the rest is fed to (mod 3):
 *
 *  0. the server's state machine, as the engine port runs it: a stream of handshake messages,
 *     each header through kvf__auth_hdr_parse(), each accepted message through
 *     kvf__auth_srv_step(). Invariants: no input authenticates (the server's nonce is fresh, so
 *     no byte string can carry a valid proof without the key); every answer fits
 *     KVF_AUTH_MAX_MSG and is itself a well-formed message; an accepted body is within its
 *     type's limit; once the server refused, it accepts nothing more.
 *  1. the client's side, kvf__auth_client(): the rest is what a server answers (CHALLENGE, OK,
 *     REFUSED, or anything), on a socket pair that then ends. Invariants: the client never
 *     authenticates (the server's proof covers the client's fresh nonce), returns within its
 *     deadline, with one of its documented codes and a printable reason.
 *  2. a built-in store with a key (server_conn.c's conn_parse_auth), through a real loopback
 *     connection: the rest is a client's whole byte stream. Invariants: everything the store
 *     sends back is a handshake message or one AUTH refusal, never the answer to a request; the
 *     store keeps serving a client with the key.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/auth.h"
#include "common/url.h"
#include "common/wire.h"
#include "fuzz.h"
#include "store/proto.h"

#define SERVER_ID "127.0.0.1:50051"

static kvf_store_server_t *srv;
static uint16_t srv_port;
static char key_path[64];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void key_unlink(void)
{
    unlink(key_path);
}

/* The store for mode 2, with a key made for it (the file goes at exit; libFuzzer never calls
 * kvf_fuzz_final()). */
static void setup(void)
{
    kvf_log_set_level(KVF_LOG_ERROR);
    snprintf(key_path, sizeof(key_path), "/tmp/kvf-fuzz-auth-%d.key", (int)getpid());
    unlink(key_path);
    KVF_FUZZ_CHECK(kvf_auth_keygen(key_path) == 0, "keygen: %s", kvf_last_error());
    atexit(key_unlink);
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.auth_key_file = key_path;
    KVF_FUZZ_CHECK(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &srv) == 0,
                   "store start: %s", kvf_last_error());
    kvf_store_url_t u;
    KVF_FUZZ_CHECK(kvf__store_url_parse(kvf_store_server_url(srv), 1, &u) == 0, "url");
    srv_port = u.hosts[0].port;
}

static void fuzz_client(const uint8_t *data, size_t size)
{
    int sv[2];
    KVF_FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    /* The server's bytes are all there before the client starts, then the end: nothing waits. */
    size_t off = 0;
    while (off < size) {
        ssize_t n = send(sv[1], data + off, size - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n <= 0)
            break;
        off += (size_t)n;
    }
    shutdown(sv[1], SHUT_WR);
    kvf_auth_key_t key = {.len = 32, .prev_len = 16};
    memset(key.bytes, 0x42, key.len);
    memset(key.prev, 0x43, key.prev_len);
    char why[512];
    why[0] = '\0';
    uint64_t t0 = kvf__now_ms();
    int rc = kvf__auth_client(sv[0], &key, "127.0.0.1:40000", t0 + 2000, SERVER_ID, why,
                              sizeof(why));
    KVF_FUZZ_CHECK(rc != 0, "a server without the key authenticated");
    KVF_FUZZ_CHECK(rc == -KVF_EAUTH || rc == -KVF_EPROTO || rc == -EPIPE ||
                       rc == -ECONNRESET,
                   "client returned %d (%s)", rc, why);
    KVF_FUZZ_CHECK(kvf__now_ms() - t0 < 1500, "the client waited on a closed peer");
    KVF_FUZZ_CHECK(memchr(why, '\0', sizeof(why)) && why[0], "no reason");
    for (const char *p = why; *p; p++)
        KVF_FUZZ_CHECK((unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f,
                       "unprintable reason: %s", why);
    close(sv[0]);
    close(sv[1]);
}

static void fuzz_store_conn(const uint8_t *data, size_t size)
{
    pthread_once(&once, setup);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    KVF_FUZZ_CHECK(fd >= 0, "socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(srv_port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    KVF_FUZZ_CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "connect");
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    size_t off = 0;
    while (off < size) {
        ssize_t n = send(fd, data + off, size - off, MSG_NOSIGNAL);
        if (n <= 0)
            break;
        off += (size_t)n;
    }
    shutdown(fd, SHUT_WR);
    static uint8_t got[64 << 10];
    size_t n = 0;
    for (;;) {
        ssize_t r = recv(fd, got + n, sizeof(got) - n, 0);
        if (r <= 0 || (n += (size_t)r) == sizeof(got))
            break;
    }
    close(fd);
    /* Handshake messages, then at most one store frame, and that one is an AUTH refusal. */
    for (size_t pos = 0; pos < n;) {
        uint8_t type;
        size_t blen;
        char why[160];
        if (n - pos >= KVF_AUTH_HDR_LEN && kvf__auth_is_magic(got + pos)) {
            KVF_FUZZ_CHECK(kvf__auth_hdr_parse(got + pos, &type, &blen, why, sizeof(why)),
                           "the store sent a malformed handshake message: %s", why);
            KVF_FUZZ_CHECK(type == KVF_AUTH_CHALLENGE || type == KVF_AUTH_REFUSED,
                           "the store sent handshake message type %u", (unsigned)type);
            pos += KVF_AUTH_HDR_LEN + blen;
            continue;
        }
        KVF_FUZZ_CHECK(n - pos >= KVF_STORE_HDR_LEN && kvf__get_le32(got + pos) == KVF_STORE_MAGIC,
                       "the store sent %zu bytes that are neither a handshake message nor a "
                       "frame",
                       n - pos);
        KVF_FUZZ_CHECK(kvf__get_le16(got + pos + 6) == KVF_STORE_ST_AUTH,
                       "the store answered a request with status %u before the key was proven",
                       (unsigned)kvf__get_le16(got + pos + 6));
        break;
    }
}

static void fuzz_server(const uint8_t *data, size_t size)
{
    kvf_auth_key_t key = {.len = 32};
    memset(key.bytes, 0x42, key.len);
    kvf_auth_srv_t s;
    kvf__auth_srv_init(&s, &key, SERVER_ID);
    size_t pos = 0;
    bool failed = false;
    while (size - pos >= KVF_AUTH_HDR_LEN) {
        uint8_t type;
        size_t blen;
        char why[160];
        if (!kvf__auth_hdr_parse(data + pos, &type, &blen, why, sizeof(why)))
            break;
        KVF_FUZZ_CHECK(blen <= KVF_AUTH_MAX_BODY, "body of %zu bytes accepted", blen);
        pos += KVF_AUTH_HDR_LEN;
        if (size - pos < blen)
            break;
        uint8_t out[KVF_AUTH_MAX_MSG];
        size_t out_len = 0;
        int rc = kvf__auth_srv_step(&s, type, data + pos, blen, out, &out_len, why, sizeof(why));
        pos += blen;
        KVF_FUZZ_CHECK(rc != 1, "a handshake without the key authenticated");
        KVF_FUZZ_CHECK(!failed || rc < 0, "a refused handshake went on (rc %d)", rc);
        KVF_FUZZ_CHECK(out_len <= KVF_AUTH_MAX_MSG, "answer of %zu bytes", out_len);
        if (out_len) {
            uint8_t t2;
            size_t b2;
            KVF_FUZZ_CHECK(kvf__auth_hdr_parse(out, &t2, &b2, why, sizeof(why)) &&
                               b2 + KVF_AUTH_HDR_LEN == out_len,
                           "malformed answer: %s", why);
        }
        if (rc < 0)
            failed = true;
    }
    kvf__auth_srv_fini(&s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool quiet;
    if (!quiet) {
        kvf_log_set_level(KVF_LOG_ERROR);
        quiet = true;
    }
    if (size == 0)
        return 0;
    switch (data[0] % 3) {
    case 0:
        fuzz_server(data + 1, size - 1);
        break;
    case 1:
        fuzz_client(data + 1, size - 1);
        break;
    default:
        fuzz_store_conn(data + 1, size - 1);
        break;
    }
    return 0;
}

/* @add with the mode byte @mode before @n bytes of @b. */
static void add_mode(kvf_fuzz_add_fn add, uint8_t mode, const uint8_t *b, size_t n)
{
    static uint8_t buf[4 * KVF_AUTH_MAX_MSG + 64];
    buf[0] = mode;
    memcpy(buf + 1, b, n);
    add(buf, n + 1);
}

void kvf_fuzz_seeds(kvf_fuzz_add_fn add)
{
    uint8_t buf[3 * KVF_AUTH_MAX_MSG];
    uint8_t nonce[KVF_AUTH_NONCE_LEN], mac[2 * KVF_AUTH_MAC_LEN];
    memset(nonce, 7, sizeof(nonce));
    memset(mac, 9, sizeof(mac));
    const char *id = "127.0.0.1:40000";
    /* 0, the server: a hello alone; a hello and a proof (one MAC, two); a proof out of turn; a
     * refusal; a long identity. */
    size_t n = kvf__auth_encode(buf, KVF_AUTH_HELLO, nonce, sizeof(nonce), id, strlen(id));
    add_mode(add, 0, buf, n);
    size_t h = n;
    n += kvf__auth_encode(buf + n, KVF_AUTH_PROOF, mac, KVF_AUTH_MAC_LEN, NULL, 0);
    add_mode(add, 0, buf, n);
    n = h + kvf__auth_encode(buf + h, KVF_AUTH_PROOF, mac, sizeof(mac), NULL, 0);
    add_mode(add, 0, buf, n);
    n = kvf__auth_encode(buf, KVF_AUTH_PROOF, mac, KVF_AUTH_MAC_LEN, NULL, 0);
    add_mode(add, 0, buf, n);
    n = kvf__auth_encode(buf, KVF_AUTH_REFUSED, "no", 2, NULL, 0);
    add_mode(add, 0, buf, n);
    char longid[KVF_AUTH_MAX_ID];
    memset(longid, 'a', sizeof(longid));
    n = kvf__auth_encode(buf, KVF_AUTH_HELLO, nonce, sizeof(nonce), longid, sizeof(longid));
    n += kvf__auth_encode(buf + n, KVF_AUTH_PROOF, mac, KVF_AUTH_MAC_LEN, NULL, 0);
    n += kvf__auth_encode(buf + n, KVF_AUTH_HELLO, nonce, sizeof(nonce), id, strlen(id));
    add_mode(add, 0, buf, n);

    /* 1, the client: a challenge from the server it expects, then an OK (a forged proof); the
     * same then a refusal; a challenge from another server; a refusal at once; a store frame. */
    n = kvf__auth_encode(buf, KVF_AUTH_CHALLENGE, nonce, sizeof(nonce), SERVER_ID,
                         strlen(SERVER_ID));
    h = n;
    n += kvf__auth_encode(buf + n, KVF_AUTH_OK, mac, KVF_AUTH_MAC_LEN, NULL, 0);
    add_mode(add, 1, buf, n);
    n = h + kvf__auth_encode(buf + h, KVF_AUTH_REFUSED, "wrong key", 9, NULL, 0);
    add_mode(add, 1, buf, n);
    n = kvf__auth_encode(buf, KVF_AUTH_CHALLENGE, nonce, sizeof(nonce), "kvferry-store", 13);
    add_mode(add, 1, buf, n);
    n = kvf__auth_encode(buf, KVF_AUTH_REFUSED, "this engine has no auth key", 27, NULL, 0);
    add_mode(add, 1, buf, n);
    memset(buf, 0, KVF_STORE_HDR_LEN);
    kvf__put_le32(buf, KVF_STORE_MAGIC);
    add_mode(add, 1, buf, KVF_STORE_HDR_LEN);

    /* 2, the store: a hello as a store client, then a forged proof and a PING behind it; a PING
     * with no handshake; an admin identity; a hello cut short. */
    const char *cid = "kvferry-store-client/0123456789abcdef";
    n = kvf__auth_encode(buf, KVF_AUTH_HELLO, nonce, sizeof(nonce), cid, strlen(cid));
    h = n;
    n += kvf__auth_encode(buf + n, KVF_AUTH_PROOF, mac, KVF_AUTH_MAC_LEN, NULL, 0);
    memset(buf + n, 0, KVF_STORE_HDR_LEN);
    kvf__put_le32(buf + n, KVF_STORE_MAGIC);
    buf[n + 4] = KVF_STORE_PROTO_VERSION;
    buf[n + 5] = KVF_STORE_OP_PING;
    kvf__put_le32(buf + n + 8, 1);
    add_mode(add, 2, buf, n + KVF_STORE_HDR_LEN);
    add_mode(add, 2, buf + n, KVF_STORE_HDR_LEN);
    n = kvf__auth_encode(buf, KVF_AUTH_HELLO, nonce, sizeof(nonce), "kvferry-admin/x", 15);
    add_mode(add, 2, buf, n);
    add_mode(add, 2, buf, h - 5);
}

int kvf_fuzz_final(void)
{
    if (!srv)
        return 0;
    /* The store still serves a client with the key. */
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.auth_key_file = key_path;
    kvf_store_t *st = NULL;
    int rc = kvf_store_open(kvf_store_server_url(srv), &o, &st);
    if (rc == 0)
        rc = kvf_store_set(st, "fuzz_auth", "ok", 2, 0);
    kvf_store_close(st);
    kvf_store_server_stop(srv);
    if (rc) {
        fprintf(stderr, "fuzz_auth: the store no longer serves a client with the key: %s\n",
                kvf_last_error());
        return 1;
    }
    return 0;
}
