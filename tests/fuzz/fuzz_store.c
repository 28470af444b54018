/*
 * Fuzz target: the built-in config store server (src/store/server*.c), through a real
 * loopback connection. Each input is one client's whole byte stream; the client then shuts its
 * write side and reads until the server closes (or 2 s pass: a get-with-wait may be parked). The
 * server must survive everything and still serve a well-behaved client at the end.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/url.h"
#include "common/wire.h"
#include "fuzz.h"
#include "store/proto.h"

static kvf_store_server_t *srv;
static uint16_t port;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void setup(void)
{
    kvf_log_set_level(KVF_LOG_ERROR);
    KVF_FUZZ_CHECK(kvf_store_server_start("tcp://127.0.0.1:0", &srv) == 0, "store start: %s",
                   kvf_last_error());
    kvf_store_url_t u;
    KVF_FUZZ_CHECK(kvf__store_url_parse(kvf_store_server_url(srv), 1, &u) == 0, "url");
    port = u.hosts[0].port;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pthread_once(&once, setup);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    KVF_FUZZ_CHECK(fd >= 0, "socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    KVF_FUZZ_CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "connect");
    struct timeval tv = {.tv_sec = 2};
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
    uint8_t sink[16384];
    for (;;) {
        ssize_t n = recv(fd, sink, sizeof(sink), 0);
        if (n <= 0)
            break;
    }
    close(fd);
    return 0;
}

/* A request frame: header, then @body. */
static size_t frame(uint8_t *b, uint8_t op, uint32_t req, const uint8_t *body, size_t n)
{
    kvf__put_le32(b, KVF_STORE_MAGIC);
    b[4] = KVF_STORE_PROTO_VERSION;
    b[5] = op;
    kvf__put_le16(b + 6, 0);
    kvf__put_le32(b + 8, req);
    kvf__put_le32(b + 12, (uint32_t)n);
    memcpy(b + KVF_STORE_HDR_LEN, body, n);
    return KVF_STORE_HDR_LEN + n;
}

static size_t blob(uint8_t *b, const char *s)
{
    size_t n = strlen(s);
    kvf__put_le32(b, (uint32_t)n);
    memcpy(b + 4, s, n);
    return 4 + n;
}

void kvf_fuzz_seeds(kvf_fuzz_add_fn add)
{
    uint8_t body[256] = {0}, f[512], all[4096];
    size_t n, m, total = 0;
#define SEED(op, req)                                                                             \
    do {                                                                                          \
        m = frame(f, op, req, body, n);                                                           \
        add(f, m);                                                                                \
        memcpy(all + total, f, m);                                                                \
        total += m;                                                                               \
    } while (0)
    n = 0;
    SEED(KVF_STORE_OP_PING, 1);
    n = blob(body, "k");
    n += blob(body + n, "v");
    kvf__put_le64(body + n, 0);
    n += 8;
    SEED(KVF_STORE_OP_SET, 2);
    n = blob(body, "k");
    kvf__put_le32(body + n, 0);
    n += 4;
    SEED(KVF_STORE_OP_GET, 3);
    n = blob(body, "k");
    body[n++] = 1;
    n += blob(body + n, "v");
    n += blob(body + n, "w");
    kvf__put_le64(body + n, 0);
    n += 8;
    SEED(KVF_STORE_OP_CAS, 4);
    n = blob(body, "n");
    kvf__put_le64(body + n, 5);
    n += 8;
    SEED(KVF_STORE_OP_ADD, 5);
    n = blob(body, "");
    SEED(KVF_STORE_OP_LIST, 6);
    n = blob(body, "k");
    SEED(KVF_STORE_OP_WATCH, 7);
    kvf__put_le64(body, 1);
    n = 8;
    SEED(KVF_STORE_OP_UNWATCH, 8);
    kvf__put_le32(body, 1000);
    n = 4;
    SEED(KVF_STORE_OP_LEASE_GRANT, 9);
    kvf__put_le64(body, 1);
    n = 8;
    SEED(KVF_STORE_OP_LEASE_KEEPALIVE, 10);
    SEED(KVF_STORE_OP_LEASE_REVOKE, 11);
    n = blob(body, "k");
    SEED(KVF_STORE_OP_DEL, 12);
    n = blob(body, "");
    n += blob(body + n, "k");
    kvf__put_le32(body + n, 2);
    n += 4;
    body[n++] = 1;
    SEED(KVF_STORE_OP_LIST_PAGE, 13);
    add(all, total); /* all of them pipelined on one connection */
#undef SEED
}

int kvf_fuzz_final(void)
{
    pthread_once(&once, setup);
    kvf_store_t *st;
    int rc = kvf_store_open(kvf_store_server_url(srv), NULL, &st);
    void *v = NULL;
    size_t len = 0;
    if (rc == 0)
        rc = kvf_store_set(st, "fuzz/final", "ok", 2, 0);
    if (rc == 0)
        rc = kvf_store_get(st, "fuzz/final", 0, &v, &len);
    bool ok = rc == 0 && len == 2 && !memcmp(v, "ok", 2);
    free(v);
    if (st && rc != -KVF_ESTOREDOWN)
        kvf_store_close(st);
    printf("fuzz_store: server %s%s%s\n", ok ? "still serves" : "STOPPED SERVING: ",
           ok ? "" : kvf_strerror(rc), "");
    kvf_store_server_stop(srv);
    return ok ? 0 : 1;
}
