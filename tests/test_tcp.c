/*
 * The TCP transport: two transports in one process on 127.0.0.1, each with its own region
 * table, plus raw-socket clients and servers that speak the wire protocol of docs/protocol.md
 * ("Transfer protocol") by hand to send what a well-behaved peer never would.
 */
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/wire.h"
#include "common/regions.h"
#include "test_util.h"
#include "transport/tcp.h"
#include "transport/tcp_proto.h"
#include "transport/transport.h"

#define MiB (1u << 20)

static const struct kvf_transport_ops *ops = &kvf__tcp_ops;

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    kvf_region_table_t *rt;
    kvf_transport_t *t;
    uint16_t port;
} node_t;

/* The parameters of a transport of @n on 127.0.0.1:@port. */
static kvf_transport_params_t node_params(node_t *n, uint16_t port, uint32_t conns, uint32_t chunk)
{
    kvf_transport_params_t p;
    memset(&p, 0, sizeof(p));
    p.local_sid = "127.0.0.1:0";
    snprintf(p.listen.host, sizeof(p.listen.host), "127.0.0.1");
    p.listen.kind = KVF_HOST_IPV4;
    p.listen.port = port;
    p.regions = n->rt;
    p.conns_per_peer = conns;
    p.chunk_bytes = chunk;
    p.connect_timeout_ms = 2000;
    return p;
}

static void node_create(node_t *n, const kvf_transport_params_t *p)
{
    assert_kvf_ok(ops->create(p, &n->t));
    n->port = ops->port(n->t);
    assert_true(n->port != 0);
}

static void node_listen(node_t *n, uint16_t port, uint32_t conns, uint32_t chunk)
{
    kvf_transport_params_t p = node_params(n, port, conns, chunk);
    node_create(n, &p);
}

static void node_start(node_t *n, uint32_t conns, uint32_t chunk)
{
    assert_kvf_ok(kvf__regions_create(&n->rt));
    node_listen(n, 0, conns, chunk);
}

static void node_stop(node_t *n)
{
    if (n->t)
        ops->destroy(n->t);
    n->t = NULL;
    kvf__regions_destroy(n->rt);
    n->rt = NULL;
}

static kvf_tpeer_t *peer_to(node_t *from, uint16_t port)
{
    kvf_tpeer_desc_t d;
    memset(&d, 0, sizeof(d));
    snprintf(d.addr.host, sizeof(d.addr.host), "127.0.0.1");
    d.addr.kind = KVF_HOST_IPV4;
    d.addr.port = port;
    char sid[32];
    snprintf(sid, sizeof(sid), "127.0.0.1:%u", (unsigned)port);
    d.sid = sid;
    kvf_tpeer_t *p = NULL;
    assert_kvf_ok(ops->peer_open(from->t, &d, &p));
    return p;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    assert_non_null(p);
    return p;
}

/* A reproducible pseudo-random pattern, 8 bytes per step. */
static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    for (; i < n; i++)
        p[i] = (uint8_t)(x >> (8 * (i & 7)));
}

static void assert_bytes_eq(const uint8_t *a, const uint8_t *b, size_t n)
{
    if (memcmp(a, b, n) != 0) {
        size_t i = 0;
        while (a[i] == b[i])
            i++;
        fail_msg("buffers of %zu bytes differ first at offset %zu (0x%02x vs 0x%02x)", n, i, a[i],
                 b[i]);
    }
}

static void assert_all(const uint8_t *p, size_t n, uint8_t v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            fail_msg("byte %zu of %zu is 0x%02x, want 0x%02x", i, n, p[i], v);
}

static uint64_t dl(uint64_t ms)
{
    return kvf__now_ms() + ms;
}

static int xfer1(kvf_tpeer_t *p, kvf_op_t op, void *local, const void *remote, size_t len,
                 uint64_t timeout_ms)
{
    kvf_xfer_t x = {.op = op, .local = local, .remote = (uint64_t)(uintptr_t)remote, .len = len};
    return ops->transfer(p, &x, 1, dl(timeout_ms), NULL);
}

/* ---------------------------------------------------------------------------------------------
 * Raw protocol helpers
 * ------------------------------------------------------------------------------------------- */

static void w_hdr(uint8_t *b, uint32_t magic, uint8_t version, uint8_t type, uint32_t status,
                  uint64_t req, uint64_t addr, uint64_t len)
{
    kvf__put_le32(b, magic);
    b[4] = version;
    b[5] = type;
    kvf__put_le16(b + 6, 0);
    kvf__put_le32(b + 8, status);
    kvf__put_le32(b + 12, 0);
    kvf__put_le64(b + 16, req);
    kvf__put_le64(b + 24, addr);
    kvf__put_le64(b + 32, len);
}

static void set_rcvtimeo(int fd, unsigned ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static int raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {
        .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    set_rcvtimeo(fd, 5000);
    return fd;
}

static void send_all(int fd, const void *b, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = send(fd, (const uint8_t *)b + done, n - done, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            fail_msg("send: %s", strerror(errno));
        done += (size_t)w;
    }
}

/* Receive exactly @n bytes; false on end of stream or error (including the 5 s timeout). */
static bool recv_all(int fd, void *b, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, (uint8_t *)b + got, n - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        got += (size_t)r;
    }
    return true;
}

/* Read a RESP: returns its status; @msg receives an error message (NUL-terminated). */
static uint32_t raw_resp(int fd, uint64_t want_req, char *msg, size_t msglen)
{
    uint8_t h[KVF_TCP_HDR_LEN];
    assert_true(recv_all(fd, h, sizeof(h)));
    assert_int_equal(kvf__get_le32(h), KVF_TCP_MAGIC);
    assert_int_equal(h[5], KVF_TCP_RESP);
    assert_int_equal(kvf__get_le64(h + 16), want_req);
    uint32_t status = kvf__get_le32(h + 8);
    uint64_t len = kvf__get_le64(h + 32);
    if (status != 0) {
        assert_true(len < msglen);
        assert_true(recv_all(fd, msg, (size_t)len));
        msg[len] = '\0';
    } else if (msg) {
        msg[0] = '\0';
    }
    if (status == 0)
        assert_int_equal(len, 0);
    return status;
}

static void raw_hello(int fd)
{
    uint8_t f[KVF_TCP_HDR_LEN + 7];
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_HELLO, 0, 1, 0, 7);
    memcpy(f + KVF_TCP_HDR_LEN, "rawtest", 7);
    send_all(fd, f, sizeof(f));
    assert_int_equal(raw_resp(fd, 1, NULL, 0), 0);
}

/* The target must close the connection: end of stream or a reset, within 5 s. */
static void raw_expect_closed(int fd)
{
    uint8_t b[256];
    for (int i = 0; i < 100000; i++) {
        ssize_t r = recv(fd, b, sizeof(b), 0);
        if (r == 0 || (r < 0 && errno == ECONNRESET))
            return;
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            fail_msg("connection not closed by the target: %s", strerror(errno));
    }
    fail_msg("connection not closed by the target");
}

/* A raw listener on 127.0.0.1 driven by a script in its own thread; the test steps it along
 * through a pipe. */
typedef enum {
    RAW_STALL,     /* answer HELLO, then never read again */
    RAW_READ_HALF, /* answer a READ with half its payload, stall, then send the rest on "go" */
    RAW_READ_LATE, /* answer a READ only after "go", then answer a second READ at once */
    RAW_FORGED,    /* read nreq READs, then send the test's forged answer (forge()) */
} raw_mode_t;

typedef struct {
    raw_mode_t mode;
    int lfd;
    uint16_t port;
    int ctl[2]; /* test -> listener: one byte per step */
    pthread_t th;
    uint64_t req_len; /* READ length the test asks for */
    unsigned nreq;    /* RAW_FORGED: READs to read first */
    /* RAW_FORGED: writes the answer into @out (room for 8 KiB) for the first READ (@req, @len);
     * returns its length */
    size_t (*forge)(uint8_t *out, uint64_t req, uint64_t len);
    bool close_after; /* RAW_FORGED: close the connection after the answer */
} rawsrv_t;

static bool rawsrv_step(rawsrv_t *r)
{
    struct pollfd pf = {.fd = r->ctl[0], .events = POLLIN};
    char c;
    return poll(&pf, 1, 20000) == 1 && read(r->ctl[0], &c, 1) == 1;
}

static void rawsrv_go(rawsrv_t *r)
{
    char c = 1;
    assert_int_equal(write(r->ctl[1], &c, 1), 1);
}

/* Serve HELLO; returns false when the client misbehaved. */
static bool rawsrv_hello(int fd)
{
    uint8_t h[KVF_TCP_HDR_LEN + 1024];
    if (!recv_all(fd, h, KVF_TCP_HDR_LEN))
        return false;
    uint64_t len = kvf__get_le64(h + 32);
    if (h[5] != KVF_TCP_HELLO || len > 1024 || !recv_all(fd, h + KVF_TCP_HDR_LEN, (size_t)len))
        return false;
    uint8_t resp[KVF_TCP_HDR_LEN];
    w_hdr(resp, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, kvf__get_le64(h + 16), 0, 0);
    return send(fd, resp, sizeof(resp), MSG_NOSIGNAL) == (ssize_t)sizeof(resp);
}

static bool rawsrv_read_req(int fd, uint64_t *req, uint64_t *len)
{
    uint8_t h[KVF_TCP_HDR_LEN];
    if (!recv_all(fd, h, sizeof(h)) || h[5] != KVF_TCP_READ)
        return false;
    *req = kvf__get_le64(h + 16);
    *len = kvf__get_le64(h + 32);
    return true;
}

/* Send @n bytes of value @v after an optional RESP header; errors are ignored (the client may
 * have cut the connection, which is the point of some tests). */
static void rawsrv_send_fill(int fd, const uint8_t *hdr, uint8_t v, size_t n)
{
    if (hdr && send(fd, hdr, KVF_TCP_HDR_LEN, MSG_NOSIGNAL) != KVF_TCP_HDR_LEN)
        return;
    uint8_t *b = xmalloc(n);
    memset(b, v, n);
    size_t done = 0;
    while (done < n) {
        ssize_t w = send(fd, b + done, n - done, MSG_NOSIGNAL);
        if (w <= 0)
            break;
        done += (size_t)w;
    }
    free(b);
}

static void *rawsrv_main(void *arg)
{
    rawsrv_t *r = arg;
    struct pollfd pf = {.fd = r->lfd, .events = POLLIN};
    if (poll(&pf, 1, 20000) != 1)
        return NULL;
    int fd = accept(r->lfd, NULL, NULL);
    if (fd < 0)
        return NULL;
    set_rcvtimeo(fd, 5000);
    uint64_t req, len;
    uint8_t h[KVF_TCP_HDR_LEN];
    if (!rawsrv_hello(fd))
        goto out;
    switch (r->mode) {
    case RAW_STALL:
        break;
    case RAW_READ_HALF:
        if (!rawsrv_read_req(fd, &req, &len))
            goto out;
        w_hdr(h, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req, 0, len);
        rawsrv_send_fill(fd, h, 0x22, (size_t)len / 2);
        if (!rawsrv_step(r))
            goto out;
        rawsrv_send_fill(fd, NULL, 0x33, (size_t)(len - len / 2));
        break;
    case RAW_FORGED: {
        uint64_t req0 = 0, len0 = 0;
        for (unsigned k = 0; k < r->nreq; k++) {
            if (!rawsrv_read_req(fd, &req, &len))
                goto out;
            if (k == 0)
                req0 = req, len0 = len;
        }
        static uint8_t forged[8192];
        size_t n = r->forge(forged, req0, len0);
        if (send(fd, forged, n, MSG_NOSIGNAL) != (ssize_t)n || r->close_after)
            goto out;
        break;
    }
    case RAW_READ_LATE:
        if (!rawsrv_read_req(fd, &req, &len) || !rawsrv_step(r))
            goto out;
        w_hdr(h, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req, 0, len);
        rawsrv_send_fill(fd, h, 0x33, (size_t)len);
        if (!rawsrv_read_req(fd, &req, &len))
            goto out;
        w_hdr(h, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req, 0, len);
        rawsrv_send_fill(fd, h, 0x44, (size_t)len);
        break;
    }
    rawsrv_step(r); /* hold the connection open until the test is done with it */
out:
    close(fd);
    return NULL;
}

static void rawsrv_start(rawsrv_t *r, raw_mode_t mode)
{
    memset(r, 0, sizeof(*r));
    r->mode = mode;
    r->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(r->lfd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(r->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(r->lfd, 4), 0);
    socklen_t sl = sizeof(a);
    assert_int_equal(getsockname(r->lfd, (struct sockaddr *)&a, &sl), 0);
    r->port = ntohs(a.sin_port);
    assert_int_equal(pipe(r->ctl), 0);
    if (mode != RAW_FORGED) /* its script is set first: rawsrv_start_forged() */
        assert_int_equal(pthread_create(&r->th, NULL, rawsrv_main, r), 0);
}

static void rawsrv_start_forged(rawsrv_t *r, size_t (*forge)(uint8_t *, uint64_t, uint64_t),
                                unsigned nreq, bool close_after)
{
    rawsrv_start(r, RAW_FORGED);
    r->forge = forge;
    r->nreq = nreq;
    r->close_after = close_after;
    assert_int_equal(pthread_create(&r->th, NULL, rawsrv_main, r), 0);
}

static void rawsrv_stop(rawsrv_t *r)
{
    /* Enough steps for any script; the thread only reads what it needs. */
    for (int i = 0; i < 3; i++)
        rawsrv_go(r);
    pthread_join(r->th, NULL);
    close(r->ctl[0]);
    close(r->ctl[1]);
    close(r->lfd);
}

/* ---------------------------------------------------------------------------------------------
 * Data tests
 * ------------------------------------------------------------------------------------------- */

/* Sizes 1 B .. 64 MiB: write, compare, read back, compare. */
static void test_sizes(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 2, 4 * MiB);
    node_start(&b, 2, 4 * MiB);
    const size_t max = 64 * MiB;
    uint8_t *dst = xmalloc(max + 64), *src = xmalloc(max), *back = xmalloc(max);
    memset(dst, 0, max + 64);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)dst, max, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);

    const size_t sizes[] = {1, 4096, MiB + 1, 64 * MiB};
    for (size_t i = 0; i < KVF__ARRAY_SIZE(sizes); i++) {
        size_t n = sizes[i];
        fill(src, n, i + 1);
        assert_kvf_ok(xfer1(p, KVF_OP_WRITE, src, dst, n, 15000));
        assert_bytes_eq(dst, src, n);
        memset(back, 0, n);
        assert_kvf_ok(xfer1(p, KVF_OP_READ, back, dst, n, 15000));
        assert_bytes_eq(back, src, n);
    }
    /* Nothing past the region was touched. */
    assert_all(dst + max, 64, 0);

    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(dst);
    free(src);
    free(back);
}

/* 1,000 elements of mixed sizes in one batch, writes then reads, then a mixed batch. */
static void test_batch_mixed(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 2, 256 * 1024);
    node_start(&b, 2, 256 * 1024);
    enum { N = 1000 };
    static kvf_xfer_t x[N];
    size_t off[N + 1];
    off[0] = 0;
    for (int i = 0; i < N; i++) {
        size_t len = (size_t)((i * 7919u) % 70000u) + 1;
        if (i % 100 == 0)
            len = MiB + (size_t)i; /* a few that are chunked */
        off[i + 1] = off[i] + len;
    }
    size_t total = off[N];
    uint8_t *dst = xmalloc(total), *src = xmalloc(total), *back = xmalloc(total);
    memset(dst, 0, total);
    fill(src, total, 77);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)dst, total, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);

    for (int i = 0; i < N; i++)
        x[i] = (kvf_xfer_t){KVF_OP_WRITE, src + off[i], (uint64_t)(uintptr_t)(dst + off[i]),
                            off[i + 1] - off[i]};
    assert_kvf_ok(ops->transfer(p, x, N, dl(20000), NULL));
    assert_bytes_eq(dst, src, total);

    memset(back, 0, total);
    for (int i = 0; i < N; i++) {
        x[i].op = KVF_OP_READ;
        x[i].local = back + off[i];
    }
    assert_kvf_ok(ops->transfer(p, x, N, dl(20000), NULL));
    assert_bytes_eq(back, src, total);

    /* Mixed: even elements write new bytes, odd ones read what is there. */
    fill(src, total, 78);
    memset(back, 0, total);
    for (int i = 0; i < N; i++) {
        bool w = i % 2 == 0;
        x[i].op = w ? KVF_OP_WRITE : KVF_OP_READ;
        x[i].local = (w ? src : back) + off[i];
    }
    assert_kvf_ok(ops->transfer(p, x, N, dl(20000), NULL));
    for (int i = 0; i < N; i++) {
        size_t len = off[i + 1] - off[i];
        if (i % 2 == 0)
            assert_bytes_eq(dst + off[i], src + off[i], len);
        else
            assert_bytes_eq(back + off[i], dst + off[i], len);
    }

    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(dst);
    free(src);
    free(back);
}

/* One element of 10 MiB + 3 split into 1 MiB chunks over two connections. */
static void test_chunked_two_conns(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 2, MiB);
    node_start(&b, 2, MiB);
    const size_t n = 10 * MiB + 3;
    uint8_t *dst = xmalloc(n), *src = xmalloc(n), *back = xmalloc(n);
    memset(dst, 0, n);
    fill(src, n, 5);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)dst, n, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);
    for (int round = 0; round < 3; round++) {
        fill(src, n, 5 + (uint64_t)round);
        assert_kvf_ok(xfer1(p, KVF_OP_WRITE, src, dst, n, 15000));
        assert_bytes_eq(dst, src, n);
        memset(back, 0, n);
        assert_kvf_ok(xfer1(p, KVF_OP_READ, back, dst, n, 15000));
        assert_bytes_eq(back, src, n);
    }
    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(dst);
    free(src);
    free(back);
}

/* Established connections of this process to 127.0.0.1:@port, counted at the connecting end
 * (/proc/self/net/tcp: remote address 0100007F:<port>, state 01). */
static int conns_to(uint16_t port)
{
    FILE *f = fopen("/proc/self/net/tcp", "r");
    char line[512];
    int n = 0;
    assert_non_null(f);
    while (fgets(line, sizeof(line), f)) {
        unsigned rip, rport, st;
        if (sscanf(line, " %*u: %*x:%*x %x:%x %x", &rip, &rport, &st) == 3)
            n += rip == 0x0100007Fu && rport == port && st == 1;
    }
    fclose(f);
    return n;
}

/* The first write to a peer opens all of its connections, so that the first call routed to
 * another one pays no connect, hello and start of serving (issue 17, cold start). */
static void test_first_write_opens_every_connection(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 3, MiB);
    node_start(&b, 3, MiB);
    uint8_t *dst = xmalloc(4096), *src = xmalloc(4096);
    fill(src, 4096, 9);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)dst, 4096, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);
    assert_int_equal(conns_to(b.port), 0);
    assert_kvf_ok(xfer1(p, KVF_OP_WRITE, src, dst, 4096, 15000));
    assert_bytes_eq(dst, src, 4096);
    assert_int_equal(conns_to(b.port), 3);
    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(dst);
    free(src);
}

typedef struct {
    kvf_tpeer_t *p;
    uint8_t *dst;
    size_t len;
    unsigned id;
    unsigned rounds;
    uint64_t max_ms;   /* the longest call */
    int rc;
    char err[512];
} writer_t;

static void *writer_main(void *arg)
{
    writer_t *w = arg;
    uint8_t *src = malloc(w->len);
    w->rc = -ENOMEM;
    if (!src)
        return NULL;
    for (unsigned r = 0; r < w->rounds; r++) {
        fill(src, w->len, w->id * 100 + r);
        uint64_t t0 = kvf_test_now_ms();
        w->rc = xfer1(w->p, KVF_OP_WRITE, src, w->dst, w->len, 15000);
        if (kvf_test_now_ms() - t0 > w->max_ms)
            w->max_ms = kvf_test_now_ms() - t0;
        if (w->rc) {
            snprintf(w->err, sizeof(w->err), "%s", kvf_last_error());
            break;
        }
        if (memcmp(w->dst, src, w->len) != 0) {
            w->rc = -KVF_EPROTO;
            snprintf(w->err, sizeof(w->err), "thread %u round %u: bytes differ", w->id, r);
            break;
        }
    }
    free(src);
    return NULL;
}

enum { WRITERS = 4 };

/* WRITERS threads each write @rounds calls of one @each-byte block into a slice of their own,
 * from a transport with @chunk-byte chunks over two connections, through one peer handle at
 * once; every byte is checked. Returns the longest call in ms. */
static uint64_t run_writers(size_t each, uint32_t chunk, unsigned rounds)
{
    node_t a = {0}, b = {0};
    node_start(&a, 2, chunk);
    node_start(&b, 2, chunk);
    uint8_t *dst = xmalloc(each * WRITERS);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)dst, each * WRITERS, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);
    writer_t w[WRITERS];
    pthread_t th[WRITERS];
    for (unsigned i = 0; i < WRITERS; i++) {
        w[i] = (writer_t){.p = p, .dst = dst + i * each, .len = each, .id = i, .rounds = rounds};
        assert_int_equal(pthread_create(&th[i], NULL, writer_main, &w[i]), 0);
    }
    uint64_t longest = 0;
    for (unsigned i = 0; i < WRITERS; i++)
        pthread_join(th[i], NULL);
    for (unsigned i = 0; i < WRITERS; i++) {
        if (w[i].rc)
            fail_msg("writer %u: %d (%s): %s", i, w[i].rc, kvf_err_name(w[i].rc), w[i].err);
        longest = w[i].max_ms > longest ? w[i].max_ms : longest;
    }
    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(dst);
    return longest;
}

/* Four threads write disjoint ranges of several chunks each through one peer handle at once. */
static void test_threads(void **state)
{
    (void)state;
    run_writers(3 * MiB + 17, MiB, 8);
}

/* Four threads write one 1 MiB block per call through one peer handle at once: each call is
 * spread over the two connections, whose answers its caller reads itself only when it reads
 * every one of them (another thread may hold a connection's reader role). Every byte lands, and
 * no call waits for its 15 s deadline. */
static void test_threads_split_blocks(void **state)
{
    (void)state;
    uint64_t longest = run_writers(MiB, 4 * MiB, 50);
    print_message("longest call %" PRIu64 " ms\n", longest);
    assert_true(longest < 10000);
}

/* ---------------------------------------------------------------------------------------------
 * The target's bounds check
 * ------------------------------------------------------------------------------------------- */

/* A write that ends 1 byte past a registered region: refused by the target, message passed on,
 * destination unchanged; the connection stays usable. */
static void test_write_past_region(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 1, MiB);
    node_start(&b, 1, MiB);
    uint8_t *mem = xmalloc(8192), *src = xmalloc(8192);
    memset(mem, 0xAA, 8192);
    fill(src, 8192, 9);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)mem, 4096, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);

    assert_kvf_err(xfer1(p, KVF_OP_WRITE, src, mem, 4097, 5000), -KVF_ENOTREG);
    assert_last_error_contains("element 0");
    char want[96];
    snprintf(want, sizeof(want), "write [%p, +4097) is not inside one registered region",
             (void *)mem);
    assert_last_error_contains(want);
    /* Issue 12: the peer is told what was refused, not the bounds of the target's region. */
    assert_null(strstr(kvf_last_error(), "+4096"));
    assert_all(mem, 8192, 0xAA);

    /* A read that runs past the end is refused as well. */
    assert_kvf_err(xfer1(p, KVF_OP_READ, src, mem + 4000, 200, 5000), -KVF_ENOTREG);
    assert_last_error_contains("read [");
    assert_last_error_contains("+200) is not inside one registered region");
    assert_null(strstr(kvf_last_error(), "+4096"));

    /* Same connection, still in step. */
    assert_kvf_ok(xfer1(p, KVF_OP_WRITE, src, mem, 4096, 5000));
    assert_bytes_eq(mem, src, 4096);
    assert_all(mem + 4096, 4096, 0xAA);

    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(mem);
    free(src);
}

/* The same from a raw client that skips every sender-side check. */
static void test_raw_write_outside(void **state)
{
    (void)state;
    node_t b = {0};
    node_start(&b, 1, MiB);
    uint8_t *mem = xmalloc(8192);
    memset(mem, 0xAA, 8192);
    uint64_t base = (uint64_t)(uintptr_t)mem;
    assert_kvf_ok(kvf__regions_add(b.rt, base, 4096, NULL));

    int fd = raw_connect(b.port);
    raw_hello(fd);
    uint8_t f[KVF_TCP_HDR_LEN + 4097];
    char msg[2048];
    memset(f + KVF_TCP_HDR_LEN, 0x55, 4097);

    /* 1 byte past the end. */
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 2, base, 4097);
    send_all(fd, f, KVF_TCP_HDR_LEN + 4097);
    assert_int_equal(raw_resp(fd, 2, msg, sizeof(msg)), KVF_ENOTREG);
    /* What was refused, not the region's bounds (issue 12): "+4096" would give them away. */
    if (!strstr(msg, "+4097) is not inside one registered region") || strstr(msg, "+4096"))
        fail_msg("message \"%s\"", msg);
    /* Entirely outside every region (just past it). */
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 3, base + 4096, 16);
    send_all(fd, f, KVF_TCP_HDR_LEN + 16);
    assert_int_equal(raw_resp(fd, 3, msg, sizeof(msg)), KVF_ENOTREG);
    /* Length 0 is invalid, answered, not fatal. */
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 4, base, 0);
    send_all(fd, f, KVF_TCP_HDR_LEN);
    assert_int_equal(raw_resp(fd, 4, msg, sizeof(msg)), KVF_EINVAL);
    /* A READ outside. */
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_READ, 0, 5, base + 100, 4000);
    send_all(fd, f, KVF_TCP_HDR_LEN);
    assert_int_equal(raw_resp(fd, 5, msg, sizeof(msg)), KVF_ENOTREG);
    assert_all(mem, 8192, 0xAA);

    /* The stream is still in step: a good write lands. */
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 6, base + 10, 100);
    send_all(fd, f, KVF_TCP_HDR_LEN + 100);
    assert_int_equal(raw_resp(fd, 6, msg, sizeof(msg)), 0);
    assert_all(mem, 10, 0xAA);
    assert_all(mem + 10, 100, 0x55);
    assert_all(mem + 110, 8192 - 110, 0xAA);

    close(fd);
    node_stop(&b);
    free(mem);
}

/* Small writes travel gathered (WRITEV). A segment outside the target's regions refuses that whole
 * frame: nothing of it is written, the element named by the target fails, the others of the frame
 * never started; the transport's caller learns all that from the per-element status. */
static void test_gather_refused_segment(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 1, MiB);
    node_start(&b, 1, MiB);
    enum { N = 10, LEN = 1000 };
    uint8_t *mem = xmalloc(N * LEN), *src = xmalloc(N * LEN);
    memset(mem, 0xAA, N * LEN);
    fill(src, N * LEN, 21);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)mem, N * LEN, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);

    kvf_xfer_t x[N];
    int st[N];
    for (int i = 0; i < N; i++) {
        x[i] = (kvf_xfer_t){KVF_OP_WRITE, src + i * LEN, (uint64_t)(uintptr_t)(mem + i * LEN), LEN};
        st[i] = KVF_XFER_PENDING;
    }
    x[6].remote += N * LEN; /* past the region */
    kvf_xfer_ctl_t ctl = {.status = st, .cancel = NULL};
    assert_kvf_err(ops->transfer(p, x, N, dl(5000), &ctl), -KVF_ENOTREG);
    assert_last_error_contains("element 6");
    for (int i = 0; i < N; i++)
        assert_int_equal(st[i], i == 6 ? -KVF_ENOTREG : -KVF_ECANCELED);
    assert_all(mem, N * LEN, 0xAA);

    /* Fixed, the same batch lands whole, and every status says done. */
    x[6].remote -= N * LEN;
    for (int i = 0; i < N; i++)
        st[i] = KVF_XFER_PENDING;
    assert_kvf_ok(ops->transfer(p, x, N, dl(5000), &ctl));
    for (int i = 0; i < N; i++)
        assert_int_equal(st[i], 0);
    assert_bytes_eq(mem, src, N * LEN);

    /* Cancelled before it starts: nothing is sent. */
    atomic_bool cancel;
    atomic_init(&cancel, true);
    memset(mem, 0xAA, N * LEN);
    for (int i = 0; i < N; i++)
        st[i] = KVF_XFER_PENDING;
    ctl.cancel = &cancel;
    assert_kvf_err(ops->transfer(p, x, N, dl(5000), &ctl), -KVF_ECANCELED);
    for (int i = 0; i < N; i++)
        assert_int_equal(st[i], KVF_XFER_PENDING);
    assert_all(mem, N * LEN, 0xAA);

    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(mem);
    free(src);
}

/* WRITEV and NOTIFY from a raw client: a refused segment is named in the answer's addr and the
 * stream stays in step; malformed frames close only their own connection. */
static void test_raw_writev_and_notify(void **state)
{
    (void)state;
    node_t b = {0};
    node_start(&b, 1, MiB);
    uint8_t *mem = xmalloc(8192);
    memset(mem, 0xAA, 8192);
    uint64_t base = (uint64_t)(uintptr_t)mem;
    assert_kvf_ok(kvf__regions_add(b.rt, base, 4096, NULL));

    int fd = raw_connect(b.port);
    raw_hello(fd);
    uint8_t f[KVF_TCP_HDR_LEN + 3 * KVF_TCP_SEG_LEN + 300];
    char msg[2048];
    /* Three segments: 100 bytes at +0, 100 at +1000, 100 at +4000 (past the end). */
    uint64_t at[3] = {base, base + 1000, base + 4000};
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITEV, 0, 2, 3, 300);
    for (int i = 0; i < 3; i++) {
        kvf__put_le64(f + KVF_TCP_HDR_LEN + i * KVF_TCP_SEG_LEN, at[i]);
        kvf__put_le64(f + KVF_TCP_HDR_LEN + i * KVF_TCP_SEG_LEN + 8, 100);
    }
    memset(f + KVF_TCP_HDR_LEN + 3 * KVF_TCP_SEG_LEN, 0x55, 300);
    send_all(fd, f, sizeof(f));
    uint8_t h[KVF_TCP_HDR_LEN];
    assert_true(recv_all(fd, h, sizeof(h)));
    assert_int_equal(kvf__get_le32(h + 8), KVF_ENOTREG);
    assert_int_equal(kvf__get_le64(h + 24), 2); /* the refused segment */
    uint64_t mlen = kvf__get_le64(h + 32);
    assert_true(mlen < sizeof(msg) && recv_all(fd, msg, (size_t)mlen));
    assert_all(mem, 8192, 0xAA);

    /* In step: the first two segments alone land. */
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITEV, 0, 3, 2, 200);
    memmove(f + KVF_TCP_HDR_LEN + 2 * KVF_TCP_SEG_LEN, f + KVF_TCP_HDR_LEN + 3 * KVF_TCP_SEG_LEN,
            200);
    send_all(fd, f, KVF_TCP_HDR_LEN + 2 * KVF_TCP_SEG_LEN + 200);
    assert_int_equal(raw_resp(fd, 3, msg, sizeof(msg)), 0);
    assert_all(mem, 100, 0x55);
    assert_all(mem + 100, 900, 0xAA);
    assert_all(mem + 1000, 100, 0x55);
    assert_all(mem + 1100, 8192 - 1100, 0xAA);

    /* A notification to a transport that takes none is answered, not fatal. */
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_NOTIFY, 0, 4, 0, 5);
    memcpy(f + KVF_TCP_HDR_LEN, "hello", 5);
    send_all(fd, f, KVF_TCP_HDR_LEN + 5);
    assert_int_equal(raw_resp(fd, 4, msg, sizeof(msg)), KVF_ENOTSUP);
    close(fd);

    enum { ZERO_SEGS, MANY_SEGS, SUM_SHORT, SEG_ZERO_LEN, NOTIFY_TOO_LONG, NCASES };
    for (int c = 0; c < NCASES; c++) {
        fd = raw_connect(b.port);
        raw_hello(fd);
        size_t n = KVF_TCP_HDR_LEN;
        switch (c) {
        case ZERO_SEGS:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITEV, 0, 2, 0, 100);
            break;
        case MANY_SEGS:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITEV, 0, 2, 257, 257 * 16);
            break;
        case SUM_SHORT: /* segments of 100 + 100 in a frame that says 300 */
        case SEG_ZERO_LEN:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITEV, 0, 2, 2, c == SUM_SHORT ? 300 : 100);
            kvf__put_le64(f + KVF_TCP_HDR_LEN, base);
            kvf__put_le64(f + KVF_TCP_HDR_LEN + 8, c == SUM_SHORT ? 100 : 0);
            kvf__put_le64(f + KVF_TCP_HDR_LEN + KVF_TCP_SEG_LEN, base + 200);
            kvf__put_le64(f + KVF_TCP_HDR_LEN + KVF_TCP_SEG_LEN + 8, 100);
            n += 2 * KVF_TCP_SEG_LEN;
            break;
        case NOTIFY_TOO_LONG:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_NOTIFY, 0, 2, 0, 4097);
            break;
        }
        send_all(fd, f, n);
        raw_expect_closed(fd);
        close(fd);
    }
    assert_all(mem, 100, 0x55);
    assert_all(mem + 1100, 8192 - 1100, 0xAA);
    node_stop(&b);
    free(mem);
}

/* What a notify callback saw. */
typedef struct {
    pthread_mutex_t mu;
    char sender[KVF_SESSION_ID_MAX];
    char msg[KVF_NOTIFY_MAX + 1];
    size_t len;
    int calls;
    int answer;
} notes_t;

static int notes_cb(void *arg, const char *sender, const void *msg, size_t len)
{
    notes_t *nt = arg;
    pthread_mutex_lock(&nt->mu);
    snprintf(nt->sender, sizeof(nt->sender), "%s", sender);
    memcpy(nt->msg, msg, len);
    nt->len = len;
    nt->calls++;
    int rc = nt->answer;
    pthread_mutex_unlock(&nt->mu);
    return rc ? kvf__err(rc, "queue full (test)") : 0;
}

/* The notify op: the target's callback gets the message and the sender's session id with its
 * real port; its refusal comes back as the op's error with the target's message. */
static void test_notify_op(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    notes_t nt = {.mu = PTHREAD_MUTEX_INITIALIZER};
    node_start(&a, 1, MiB);
    assert_kvf_ok(kvf__regions_create(&b.rt));
    kvf_transport_params_t pb;
    memset(&pb, 0, sizeof(pb));
    pb.local_sid = "127.0.0.1:0";
    snprintf(pb.listen.host, sizeof(pb.listen.host), "127.0.0.1");
    pb.listen.kind = KVF_HOST_IPV4;
    pb.regions = b.rt;
    pb.notify_cb = notes_cb;
    pb.notify_arg = &nt;
    assert_kvf_ok(ops->create(&pb, &b.t));
    b.port = ops->port(b.t);
    kvf_tpeer_t *p = peer_to(&a, b.port);

    char big[KVF_NOTIFY_MAX];
    fill((uint8_t *)big, sizeof(big), 5);
    assert_kvf_ok(ops->notify(p, big, sizeof(big), dl(5000)));
    char want[32];
    snprintf(want, sizeof(want), "127.0.0.1:%u", (unsigned)a.port);
    assert_string_equal(nt.sender, want);
    assert_int_equal(nt.len, KVF_NOTIFY_MAX);
    assert_memory_equal(nt.msg, big, sizeof(big));

    assert_kvf_ok(ops->notify(p, NULL, 0, dl(5000)));
    assert_int_equal(nt.len, 0);
    assert_int_equal(nt.calls, 2);

    nt.answer = -KVF_EBUSY;
    assert_kvf_err(ops->notify(p, "x", 1, dl(5000)), -KVF_EBUSY);
    assert_last_error_contains("queue full (test)");
    assert_kvf_err(ops->notify(p, big, KVF_NOTIFY_MAX + 1, dl(5000)), -KVF_ETOOBIG);
    assert_int_equal(nt.calls, 3);

    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
}

/* Malformed frames close only their own connection; a good peer keeps transferring. */
static void test_malformed_frames(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 1, MiB);
    node_start(&b, 1, MiB);
    uint8_t *mem = xmalloc(4096), *src = xmalloc(4096);
    uint64_t base = (uint64_t)(uintptr_t)mem;
    assert_kvf_ok(kvf__regions_add(b.rt, base, 4096, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);
    int good = raw_connect(b.port);
    raw_hello(good);

    enum {
        BAD_MAGIC,
        BAD_VERSION,
        TOO_LONG,
        NO_HELLO,
        BAD_TYPE,
        BAD_STATUS,
        BAD_FLAGS,
        HELLO_TOO_LONG,
        TRUNC_HEADER,
        TRUNC_PAYLOAD,
        NCASES
    };
    for (int c = 0; c < NCASES; c++) {
        int fd = raw_connect(b.port);
        uint8_t f[KVF_TCP_HDR_LEN];
        if (c != NO_HELLO && c != HELLO_TOO_LONG)
            raw_hello(fd);
        switch (c) {
        case BAD_MAGIC:
            w_hdr(f, 0x50545448, 1, KVF_TCP_WRITE, 0, 2, base, 16);
            break;
        case BAD_VERSION:
            w_hdr(f, KVF_TCP_MAGIC, 2, KVF_TCP_WRITE, 0, 2, base, 16);
            break;
        case TOO_LONG:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 2, base, (uint64_t)KVF_TCP_MAX_CHUNK + 1);
            break;
        case NO_HELLO:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 2, base, 16);
            break;
        case BAD_TYPE:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, 2, base, 0);
            break;
        case BAD_STATUS:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_READ, 7, 2, base, 16);
            break;
        case BAD_FLAGS:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_READ, 0, 2, base, 16);
            kvf__put_le16(f + 6, 1);
            break;
        case HELLO_TOO_LONG:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_HELLO, 0, 1, 0, 1025);
            break;
        case TRUNC_HEADER:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 2, base, 16);
            break;
        case TRUNC_PAYLOAD:
            w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 2, base, 64);
            break;
        }
        if (c == TRUNC_HEADER) {
            send_all(fd, f, 20);
            shutdown(fd, SHUT_WR);
        } else if (c == TRUNC_PAYLOAD) {
            send_all(fd, f, KVF_TCP_HDR_LEN);
            send_all(fd, src, 10);
            shutdown(fd, SHUT_WR);
        } else {
            send_all(fd, f, KVF_TCP_HDR_LEN);
        }
        raw_expect_closed(fd);
        close(fd);

        fill(src, 4096, (uint64_t)c);
        assert_kvf_ok(xfer1(p, KVF_OP_WRITE, src, mem, 4096, 5000));
        assert_bytes_eq(mem, src, 4096);
    }

    /* The raw connection opened before all this is still served. */
    uint8_t f[KVF_TCP_HDR_LEN + 8];
    w_hdr(f, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 9, base, 8);
    memset(f + KVF_TCP_HDR_LEN, 0x5A, 8);
    send_all(good, f, sizeof(f));
    assert_int_equal(raw_resp(good, 9, NULL, 0), 0);
    assert_all(mem, 8, 0x5A);
    close(good);

    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(mem);
    free(src);
}

/* After unregistering, writes are refused. */
static void test_unregister(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 2, MiB);
    node_start(&b, 2, MiB);
    uint8_t *mem = xmalloc(MiB), *src = xmalloc(MiB);
    fill(src, MiB, 3);
    memset(mem, 0, MiB);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)mem, MiB, NULL));
    kvf_tpeer_t *p = peer_to(&a, b.port);
    assert_kvf_ok(xfer1(p, KVF_OP_WRITE, src, mem, MiB, 5000));
    assert_bytes_eq(mem, src, MiB);
    assert_kvf_ok(kvf__regions_remove(b.rt, (uint64_t)(uintptr_t)mem, 1000));
    memset(mem, 0, MiB);
    assert_kvf_err(xfer1(p, KVF_OP_WRITE, src, mem, MiB, 5000), -KVF_ENOTREG);
    assert_last_error_contains("is not inside one registered region");
    assert_all(mem, MiB, 0);
    ops->peer_close(p);
    node_stop(&a);
    node_stop(&b);
    free(mem);
    free(src);
}

/* ---------------------------------------------------------------------------------------------
 * Failures: dead, restarted and stalled peers
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    kvf_tpeer_t *p;
    uint8_t *src, *dst;
    size_t len;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned done; /* transfers completed */
    int rc;
    uint64_t fail_ms;
} looper_t;

static void *looper_main(void *arg)
{
    looper_t *l = arg;
    for (unsigned i = 0; i < 2000; i++) {
        int rc = xfer1(l->p, KVF_OP_WRITE, l->src, l->dst, l->len, 15000);
        pthread_mutex_lock(&l->mu);
        if (rc) {
            l->rc = rc;
            l->fail_ms = kvf__now_ms();
        } else {
            l->done++;
        }
        pthread_cond_broadcast(&l->cv);
        pthread_mutex_unlock(&l->mu);
        if (rc)
            break;
    }
    return NULL;
}

/* The target's transport is destroyed while 64 MiB writes are running: the writer fails fast
 * with -KVF_EPEERGONE (or -KVF_ETIMEDOUT); a new transport on the same port is then reached
 * through the same peer handle. */
static void test_peer_destroyed_mid_transfer(void **state)
{
    (void)state;
    node_t a = {0}, b = {0};
    node_start(&a, 2, 4 * MiB);
    node_start(&b, 2, 4 * MiB);
    const size_t n = 64 * MiB;
    looper_t l = {.len = n};
    l.src = xmalloc(n);
    l.dst = xmalloc(n);
    fill(l.src, n, 1);
    memset(l.dst, 0, n);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)l.dst, n, NULL));
    l.p = peer_to(&a, b.port);
    pthread_mutex_init(&l.mu, NULL);
    kvf__cond_init_monotonic(&l.cv);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, looper_main, &l), 0);

    /* Wait for a first complete transfer, so that the next one is running. */
    struct timespec ts;
    kvf__deadline_ts(&ts, dl(15000));
    pthread_mutex_lock(&l.mu);
    while (l.done < 1 && l.rc == 0)
        if (pthread_cond_timedwait(&l.cv, &l.mu, &ts) == ETIMEDOUT)
            break;
    unsigned done = l.done;
    int early = l.rc;
    pthread_mutex_unlock(&l.mu);
    assert_int_equal(early, 0);
    assert_true(done >= 1);

    uint64_t t0 = kvf__now_ms();
    ops->destroy(b.t);
    b.t = NULL;
    pthread_join(th, NULL);
    if (l.rc != -KVF_EPEERGONE && l.rc != -KVF_ETIMEDOUT)
        fail_msg("writer ended with %d (%s)", l.rc, kvf_err_name(l.rc));
    uint64_t took = l.fail_ms > t0 ? l.fail_ms - t0 : 0;
    if (took > 5000)
        fail_msg("writer took %" PRIu64 " ms to fail after the peer went away", took);

    /* Restart on the same port with the same regions; the same handle reconnects. */
    uint16_t port = b.port;
    node_listen(&b, port, 2, 4 * MiB);
    assert_int_equal(b.port, port);
    fill(l.src, n, 2);
    assert_kvf_ok(xfer1(l.p, KVF_OP_WRITE, l.src, l.dst, n, 15000));
    assert_bytes_eq(l.dst, l.src, n);

    ops->peer_close(l.p);
    pthread_mutex_destroy(&l.mu);
    pthread_cond_destroy(&l.cv);
    node_stop(&a);
    node_stop(&b);
    free(l.src);
    free(l.dst);
}

/* A peer that answers HELLO and then never reads: -KVF_ETIMEDOUT, not before the deadline and
 * within 1 s after it. */
static void test_stalled_peer(void **state)
{
    (void)state;
    node_t a = {0};
    node_start(&a, 1, 4 * MiB);
    rawsrv_t r;
    rawsrv_start(&r, RAW_STALL);
    kvf_tpeer_t *p = peer_to(&a, r.port);
    const size_t n = 64 * MiB;
    uint8_t *src = xmalloc(n);
    memset(src, 1, n);
    uint64_t deadline = dl(1000);
    kvf_xfer_t x = {KVF_OP_WRITE, src, 0x10000, n};
    assert_kvf_err(ops->transfer(p, &x, 1, deadline, NULL), -KVF_ETIMEDOUT);
    uint64_t now = kvf__now_ms();
    if (now < deadline || now > deadline + 1000)
        fail_msg("returned %" PRId64 " ms after the deadline", (int64_t)(now - deadline));

    /* A small write that fits in the socket buffers times out waiting for its answer. */
    deadline = dl(300);
    x.len = 100;
    int rc = ops->transfer(p, &x, 1, deadline, NULL);
    now = kvf__now_ms();
    /* The first timeout broke the connection; reconnecting to the raw listener (which accepts
     * only once) either times out or fails: either way within the bound. */
    if (rc != -KVF_ETIMEDOUT && rc != -KVF_EPEERGONE)
        fail_msg("second transfer: %d (%s): %s", rc, kvf_err_name(rc), kvf_last_error());
    assert_true(now <= deadline + 1000);

    ops->peer_close(p);
    rawsrv_stop(&r);
    node_stop(&a);
    free(src);
}

/* A read whose answer stops half-way: -KVF_ETIMEDOUT, and the rest of the answer, sent after
 * transfer() returned, never lands in the buffer. */
static void test_read_timeout_mid_answer(void **state)
{
    (void)state;
    node_t a = {0};
    node_start(&a, 1, 4 * MiB);
    rawsrv_t r;
    rawsrv_start(&r, RAW_READ_HALF);
    kvf_tpeer_t *p = peer_to(&a, r.port);
    const size_t n = MiB;
    uint8_t *buf = xmalloc(n);
    memset(buf, 0x11, n);
    uint64_t deadline = dl(500);
    kvf_xfer_t x = {KVF_OP_READ, buf, 0x10000, n};
    assert_kvf_err(ops->transfer(p, &x, 1, deadline, NULL), -KVF_ETIMEDOUT);
    assert_true(kvf__now_ms() >= deadline);
    rawsrv_go(&r); /* the listener now sends the second half */
    rawsrv_stop(&r);
    for (size_t i = 0; i < n; i++)
        if (buf[i] != 0x11 && buf[i] != 0x22)
            fail_msg("byte %zu is 0x%02x after the read returned", i, buf[i]);
    ops->peer_close(p);
    node_stop(&a);
    free(buf);
}

/* A read answered only after its deadline: the late answer is dropped and the connection keeps
 * serving the next request. */
static void test_read_timeout_late_answer(void **state)
{
    (void)state;
    node_t a = {0};
    node_start(&a, 1, 4 * MiB);
    rawsrv_t r;
    rawsrv_start(&r, RAW_READ_LATE);
    kvf_tpeer_t *p = peer_to(&a, r.port);
    const size_t n = 256 * 1024;
    uint8_t *buf = xmalloc(n), *buf2 = xmalloc(n);
    memset(buf, 0x11, n);
    memset(buf2, 0x11, n);
    kvf_xfer_t x = {KVF_OP_READ, buf, 0x10000, n};
    assert_kvf_err(ops->transfer(p, &x, 1, dl(300), NULL), -KVF_ETIMEDOUT);
    rawsrv_go(&r); /* the late answer (0x33) goes out now */
    x.local = buf2;
    assert_kvf_ok(ops->transfer(p, &x, 1, dl(5000), NULL));
    assert_all(buf2, n, 0x44);
    assert_all(buf, n, 0x11);
    ops->peer_close(p);
    rawsrv_stop(&r);
    node_stop(&a);
    free(buf);
    free(buf2);
}

/* Forged answers of a target to a READ of @len (request @req): each must break the connection,
 * failing the read with -KVF_EPEERGONE and the reason, and write nothing into the buffer. */
static size_t forge_type(uint8_t *o, uint64_t req, uint64_t len)
{
    w_hdr(o, KVF_TCP_MAGIC, 1, KVF_TCP_HELLO, 0, req, 0, len);
    return KVF_TCP_HDR_LEN;
}

static size_t forge_magic(uint8_t *o, uint64_t req, uint64_t len)
{
    w_hdr(o, 0x12345678, 1, KVF_TCP_RESP, 0, req, 0, len);
    return KVF_TCP_HDR_LEN;
}

static size_t forge_huge(uint8_t *o, uint64_t req, uint64_t len)
{
    (void)len;
    w_hdr(o, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req, 0, (uint64_t)KVF_TCP_MAX_CHUNK + 1);
    return KVF_TCP_HDR_LEN;
}

static size_t forge_long_refusal(uint8_t *o, uint64_t req, uint64_t len)
{
    (void)len;
    w_hdr(o, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, KVF_ENOTREG, req, 0, KVF_TCP_MAX_MSG + 1);
    return KVF_TCP_HDR_LEN;
}

static size_t forge_short(uint8_t *o, uint64_t req, uint64_t len)
{
    w_hdr(o, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req, 0, len - 1);
    return KVF_TCP_HDR_LEN;
}

/* Not forged but truncated: half a header, then the end of the stream (close_after). */
static size_t forge_truncated(uint8_t *o, uint64_t req, uint64_t len)
{
    w_hdr(o, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req, 0, len);
    return KVF_TCP_HDR_LEN / 2;
}

/* An answer to a request nobody made (with 100 bytes), then the true one: the first is dropped,
 * the read succeeds. */
static size_t forge_unasked_first(uint8_t *o, uint64_t req, uint64_t len)
{
    w_hdr(o, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req + (1000u << TCP_SLOT_BITS), 0, 100);
    memset(o + KVF_TCP_HDR_LEN, 0x66, 100);
    w_hdr(o + KVF_TCP_HDR_LEN + 100, KVF_TCP_MAGIC, 1, KVF_TCP_RESP, 0, req, 0, len);
    memset(o + 2 * KVF_TCP_HDR_LEN + 100, 0x77, (size_t)len);
    return 2 * KVF_TCP_HDR_LEN + 100 + (size_t)len;
}

/* A target's forged, truncated or unasked answers reach the initiator's reader: read by the
 * caller (one READ) and by the I/O thread (two READs). Each forged one breaks the connection
 * with its reason and writes nothing into the caller's buffer; an unasked answer is dropped. */
static void test_forged_answers(void **state)
{
    (void)state;
    static const struct {
        size_t (*forge)(uint8_t *, uint64_t, uint64_t);
        const char *why;
        bool close_after;
    } cases[] = {
        {forge_type, "frame type 1 where an answer was expected", false},
        {forge_magic, "bad frame from the peer", false},
        {forge_huge, "over KVF_TCP_MAX_CHUNK", false},
        {forge_long_refusal, "error message of 1025 bytes over KVF_TCP_MAX_MSG", false},
        {forge_short, "answer of 4095 bytes to a read of 4096", false},
        {forge_truncated, "connection closed by the peer", true},
        {forge_unasked_first, NULL, false},
    };
    node_t a = {0};
    node_start(&a, 1, 4 * MiB);
    uint8_t buf[2 * 4096];
    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        for (unsigned nreq = 1; nreq <= 2; nreq++) {
            rawsrv_t r;
            rawsrv_start_forged(&r, cases[i].forge, nreq, cases[i].close_after);
            kvf_tpeer_t *p = peer_to(&a, r.port);
            memset(buf, 0x11, sizeof(buf));
            kvf_xfer_t x[2] = {{KVF_OP_READ, buf, 0x10000, 4096},
                               {KVF_OP_READ, buf + 4096, 0x20000, 4096}};
            int rc = ops->transfer(p, x, nreq, dl(cases[i].why ? 5000 : 1000), NULL);
            if (!cases[i].why) {
                /* The true answer came for the first READ; a second one is never answered. */
                assert_int_equal(rc, nreq == 1 ? 0 : -KVF_ETIMEDOUT);
                assert_all(buf, 4096, 0x77);
            } else {
                if (rc != -KVF_EPEERGONE || !strstr(kvf_last_error(), cases[i].why))
                    fail_msg("case %zu, %u request(s): %d (%s): %s; want KVF_EPEERGONE and "
                             "\"%s\"",
                             i, nreq, rc, kvf_err_name(rc), kvf_last_error(), cases[i].why);
                assert_all(buf, 4096, 0x11);
            }
            assert_all(buf + 4096, 4096, 0x11);
            ops->peer_close(p);
            rawsrv_stop(&r);
        }
    }
    node_stop(&a);
}

typedef struct {
    kvf_tpeer_t *p;
    uint8_t *buf;
    size_t len;
    int rc;
    atomic_bool returned;
} stalled_read_t;

static void *stalled_read_main(void *arg)
{
    stalled_read_t *r = arg;
    /* Two elements: two requests, whose answers the I/O thread reads. */
    kvf_xfer_t x[2] = {{KVF_OP_READ, r->buf, 0x10000, r->len / 2},
                       {KVF_OP_READ, r->buf + r->len / 2, 0x90000, r->len / 2}};
    r->rc = ops->transfer(r->p, x, 2, dl(4000), NULL);
    atomic_store(&r->returned, true);
    return NULL;
}

/* With one I/O thread reading every connection's answers, a peer that stops in the middle of an
 * answer holds up no other peer: another peer's batches (read by the same thread) complete while
 * the stalled read waits for its deadline, which then fails it with -KVF_ETIMEDOUT. */
static void test_stalled_answer_holds_up_no_other_peer(void **state)
{
    (void)state;
    setenv("KVFERRY_IO_THREADS", "1", 1);
    node_t a = {0}, b = {0};
    node_start(&a, 1, 4 * MiB);
    unsetenv("KVFERRY_IO_THREADS");
    assert_int_equal(tcp_of(a.t)->nio, 1);
    node_start(&b, 1, 4 * MiB);
    const size_t n = MiB;
    uint8_t *dst = xmalloc(n), *src = xmalloc(n);
    memset(dst, 0, n);
    fill(src, n, 7);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)dst, n, NULL));

    rawsrv_t r;
    rawsrv_start(&r, RAW_READ_HALF);
    stalled_read_t sr = {.p = peer_to(&a, r.port), .buf = xmalloc(n), .len = n};
    memset(sr.buf, 0x11, n);
    atomic_init(&sr.returned, false);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, stalled_read_main, &sr), 0);
    /* The first half of the first answer lands, then the peer stalls. */
    uint64_t until = kvf_test_now_ms() + 3000;
    while (((volatile uint8_t *)sr.buf)[0] != 0x22 && kvf_test_now_ms() < until)
        sched_yield();
    assert_int_equal(sr.buf[0], 0x22);

    kvf_tpeer_t *p = peer_to(&a, b.port);
    for (unsigned round = 0; round < 4; round++) {
        kvf_xfer_t x[4];
        for (unsigned k = 0; k < 4; k++)
            x[k] = (kvf_xfer_t){KVF_OP_WRITE, src + k * (n / 4), (uintptr_t)dst + k * (n / 4),
                                n / 4};
        assert_kvf_ok(ops->transfer(p, x, 4, dl(2000), NULL));
    }
    assert_bytes_eq(dst, src, n);
    assert_false(atomic_load(&sr.returned));

    pthread_join(th, NULL);
    assert_int_equal(sr.rc, -KVF_ETIMEDOUT);
    rawsrv_stop(&r);
    ops->peer_close(p);
    ops->peer_close(sr.p);
    node_stop(&b);
    node_stop(&a);
    free(sr.buf);
    free(src);
    free(dst);
}

/* A notification callback that blocks until the test lets it go, as an engine's delivery waits
 * up to 2 s for room in a full queue. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool entered, release;
} gate_t;

static gate_t notify_gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, false};

static int gated_notify(void *arg, const char *sender, const void *msg, size_t len)
{
    (void)arg, (void)sender, (void)msg, (void)len;
    gate_t *g = &notify_gate;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10; /* bound: the test releases it long before */
    pthread_mutex_lock(&g->mu);
    g->entered = true;
    pthread_cond_broadcast(&g->cv);
    while (!g->release)
        if (pthread_cond_timedwait(&g->cv, &g->mu, &ts) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&g->mu);
    return 0;
}

typedef struct {
    kvf_tpeer_t *p;
    int rc;
} notifier_t;

static void *notifier_main(void *arg)
{
    notifier_t *n = arg;
    n->rc = ops->notify(n->p, "hi", 2, dl(15000));
    return NULL;
}

/* An engine's own transfers are not held up by serving its peers: while its (one) serving I/O
 * thread waits in the notification callback, a batch of two reads from another engine, whose
 * answers its initiator I/O thread reads, completes well within its 1 s deadline. */
static void test_own_answers_not_held_by_serving(void **state)
{
    (void)state;
    setenv("KVFERRY_IO_THREADS", "1", 1);
    node_t a = {0}, b = {0};
    assert_kvf_ok(kvf__regions_create(&a.rt));
    kvf_transport_params_t pa = node_params(&a, 0, 1, 4 * MiB);
    pa.notify_cb = gated_notify;
    node_create(&a, &pa);
    unsetenv("KVFERRY_IO_THREADS");
    node_start(&b, 1, 4 * MiB);
    uint8_t *src = xmalloc(MiB), *dst = xmalloc(MiB);
    fill(src, MiB, 3);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)src, MiB, NULL));
    kvf_tpeer_t *ab = peer_to(&a, b.port), *ba = peer_to(&b, a.port);

    notifier_t n = {.p = ba};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, notifier_main, &n), 0);
    pthread_mutex_lock(&notify_gate.mu);
    while (!notify_gate.entered)
        pthread_cond_wait(&notify_gate.cv, &notify_gate.mu);
    pthread_mutex_unlock(&notify_gate.mu);

    kvf_xfer_t x[2] = {{KVF_OP_READ, dst, (uintptr_t)src, MiB / 2},
                       {KVF_OP_READ, dst + MiB / 2, (uintptr_t)src + MiB / 2, MiB / 2}};
    assert_kvf_ok(ops->transfer(ab, x, 2, dl(1000), NULL));
    assert_bytes_eq(dst, src, MiB);

    pthread_mutex_lock(&notify_gate.mu);
    notify_gate.release = true;
    pthread_cond_broadcast(&notify_gate.cv);
    pthread_mutex_unlock(&notify_gate.mu);
    pthread_join(th, NULL);
    assert_kvf_ok(n.rc);
    ops->peer_close(ab);
    ops->peer_close(ba);
    node_stop(&b);
    node_stop(&a);
    free(src);
    free(dst);
}

/* A TCP proxy that forwards both ways but lets only @cut bytes through from the target. */
typedef struct {
    int lfd, cfd, sfd;
    uint16_t port, target;
    size_t cut, down;
    int stop[2]; /* the test writes a byte: the proxy ends */
    pthread_t th;
} cutproxy_t;

static void *cutproxy_main(void *arg)
{
    static uint8_t buf[64 << 10];
    cutproxy_t *x = arg;
    struct pollfd lp[2] = {{x->lfd, POLLIN, 0}, {x->stop[0], POLLIN, 0}};
    if (poll(lp, 2, 20000) != 1 || !lp[0].revents)
        return NULL;
    x->cfd = accept(x->lfd, NULL, NULL);
    x->sfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(x->target),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (x->cfd < 0 || connect(x->sfd, (struct sockaddr *)&a, sizeof(a)) < 0)
        x->down = SIZE_MAX; /* said by the test's check */
    for (unsigned turns = 0; turns < 2000 && x->down != SIZE_MAX; turns++) {
        struct pollfd pf[3] = {{x->cfd, POLLIN, 0}, {x->sfd, x->down < x->cut ? POLLIN : 0, 0},
                               {x->stop[0], POLLIN, 0}};
        if (poll(pf, 3, 10) <= 0)
            continue;
        if (pf[2].revents)
            break;
        int from = pf[0].revents ? x->cfd : x->sfd, to = from == x->cfd ? x->sfd : x->cfd;
        size_t room = from == x->sfd ? x->cut - x->down : sizeof(buf);
        ssize_t r = recv(from, buf, room < sizeof(buf) ? room : sizeof(buf), 0);
        if (r <= 0 || send(to, buf, (size_t)r, MSG_NOSIGNAL) != r)
            break;
        if (from == x->sfd)
            x->down += (size_t)r;
    }
    close(x->cfd);
    close(x->sfd);
    x->cfd = x->sfd = -1;
    return NULL;
}

/* With data TLS, a single read whose answer stops in the middle of a TLS record fails with
 * -KVF_ETIMEDOUT at its deadline: the caller reading its own answer waits in poll() for the
 * rest of the record, neither spinning nor waiting past the deadline. */
static void test_tls_answer_stalled_mid_record(void **state)
{
    (void)state;
    char dir[64], cert[128], key[128], ca[128];
    kvf_test_tls_certs(KVF_TEST_SRC_DIR, dir, sizeof(dir));
    snprintf(cert, sizeof(cert), "%s/server.pem", dir);
    snprintf(key, sizeof(key), "%s/server.key", dir);
    snprintf(ca, sizeof(ca), "%s/ca.pem", dir);
    kvf_tls_opts_t o;
    kvf_tls_opts_init(&o);
    o.enable = 1;
    o.cert_file = cert;
    o.key_file = key;
    o.ca_file = ca;
    node_t a = {0}, b = {0};
    assert_kvf_ok(kvf__regions_create(&a.rt));
    assert_kvf_ok(kvf__regions_create(&b.rt));
    kvf_transport_params_t p = node_params(&a, 0, 1, 4 * MiB);
    p.tls = &o;
    node_create(&a, &p);
    p = node_params(&b, 0, 1, 4 * MiB);
    p.tls = &o;
    node_create(&b, &p);
    const size_t n = 2 * MiB;
    uint8_t *src = xmalloc(n), *dst = xmalloc(n);
    memset(src, 0x5a, n);
    assert_kvf_ok(kvf__regions_add(b.rt, (uint64_t)(uintptr_t)src, n, NULL));

    cutproxy_t x = {.target = b.port, .cut = 700001}; /* mid-answer, mid-record */
    x.lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    assert_int_equal(bind(x.lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(x.lfd, 4), 0);
    assert_int_equal(getsockname(x.lfd, (struct sockaddr *)&sa, &sl), 0);
    x.port = ntohs(sa.sin_port);
    x.cfd = x.sfd = -1;
    assert_int_equal(pipe(x.stop), 0);
    assert_int_equal(pthread_create(&x.th, NULL, cutproxy_main, &x), 0);

    /* The proxy's address, under a session id whose address the certificate names. */
    kvf_tpeer_desc_t d;
    memset(&d, 0, sizeof(d));
    snprintf(d.addr.host, sizeof(d.addr.host), "127.0.0.1");
    d.addr.kind = KVF_HOST_IPV4;
    d.addr.port = x.port;
    d.sid = "127.0.0.1:1";
    kvf_tpeer_t *pr = NULL;
    assert_kvf_ok(ops->peer_open(a.t, &d, &pr));
    kvf_xfer_t xf = {KVF_OP_READ, dst, (uintptr_t)src, n};
    struct timespec c0, c1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(ops->transfer(pr, &xf, 1, dl(1500), NULL), -KVF_ETIMEDOUT);
    uint64_t took = kvf_test_now_ms() - t0;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    double cpu = (double)(c1.tv_sec - c0.tv_sec) + (double)(c1.tv_nsec - c0.tv_nsec) / 1e9;
    assert_int_equal(write(x.stop[1], "x", 1), 1);
    pthread_join(x.th, NULL);
    print_message("stalled TLS read: %" PRIu64 " ms, %.3f s of CPU; the proxy let %zu bytes "
                  "through\n", took, cpu, x.down);
    assert_true(x.down == x.cut);
    assert_true(took >= 1400 && took < 3000);
    assert_true(cpu < 0.5); /* it waited, it did not spin */
    ops->peer_close(pr);
    close(x.lfd);
    close(x.stop[0]);
    close(x.stop[1]);
    node_stop(&b);
    node_stop(&a);
    free(src);
    free(dst);
}

/* Nobody listens: a clear error at once, not a hang. */
static void test_connect_refused(void **state)
{
    (void)state;
    node_t a = {0};
    node_start(&a, 2, MiB);
    /* A port that was just free: bound, never listened on, closed. */
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&sa, &sl), 0);
    close(s);
    kvf_tpeer_t *p = peer_to(&a, ntohs(sa.sin_port));
    uint8_t b[16] = {0};
    uint64_t t0 = kvf__now_ms();
    assert_kvf_err(xfer1(p, KVF_OP_WRITE, b, (void *)0x10000, sizeof(b), 5000), -KVF_EPEERGONE);
    assert_last_error_contains("Connection refused");
    assert_true(kvf__now_ms() - t0 < 2000);
    ops->peer_close(p);
    node_stop(&a);
}

/* A client that trickles a WRITE payload (each byte restarts the no-progress timer) is cut off
 * once the frame falls below the minimum rate, so it cannot pin the region for ever. */
static void test_trickling_writer_cut_off(void **state)
{
    (void)state;
    node_t b = {0};
    node_start(&b, 1, MiB);
    uint8_t *mem = xmalloc(MiB);
    uint64_t base = (uint64_t)(uintptr_t)mem;
    assert_kvf_ok(kvf__regions_add(b.rt, base, MiB, NULL));

    int fd = raw_connect(b.port);
    raw_hello(fd);
    uint8_t h[KVF_TCP_HDR_LEN];
    w_hdr(h, KVF_TCP_MAGIC, 1, KVF_TCP_WRITE, 0, 2, base, MiB);
    uint64_t t0 = kvf_test_now_ms();
    send_all(fd, h, sizeof(h));
    bool closed = false;
    /* One byte per 100 ms: the sending pace is the scenario. Bounded at 15 s. */
    for (int i = 0; i < 150 && !closed; i++) {
        uint8_t byte = 0x55;
        if (send(fd, &byte, 1, MSG_NOSIGNAL) != 1)
            break;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 100) > 0) {
            uint8_t junk[64];
            ssize_t r = recv(fd, junk, sizeof(junk), MSG_DONTWAIT);
            closed = r == 0 || (r < 0 && errno == ECONNRESET);
        }
    }
    uint64_t took = kvf_test_now_ms() - t0;
    if (!closed)
        raw_expect_closed(fd);
    /* 1 MiB at 10 MB/s after a 2 s allowance: about 2.1 s, checked once a second. */
    assert_true(took >= 2000);
    assert_true(took < 5000);
    /* The reference was released with the connection: unregister does not wait. */
    assert_kvf_ok(kvf__regions_remove(b.rt, base, 0));
    close(fd);
    node_stop(&b);
    free(mem);
}

/* A connection that never says HELLO is closed after KVF_TCP_HELLO_TIMEOUT_MS (5 s), so idle
 * sockets cannot fill the target's connection limit. */
static void test_no_hello_cut_off(void **state)
{
    (void)state;
    node_t b = {0};
    node_start(&b, 1, MiB);
    int fd = raw_connect(b.port);
    set_rcvtimeo(fd, 9000);
    uint64_t t0 = kvf_test_now_ms();
    raw_expect_closed(fd);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(took >= 4900);
    assert_true(took < 8000);
    close(fd);
    node_stop(&b);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_sizes),
    cmocka_unit_test(test_batch_mixed),
    cmocka_unit_test(test_chunked_two_conns),
    cmocka_unit_test(test_first_write_opens_every_connection),
    cmocka_unit_test(test_threads),
    cmocka_unit_test(test_threads_split_blocks),
    cmocka_unit_test(test_write_past_region),
    cmocka_unit_test(test_raw_write_outside),
    cmocka_unit_test(test_malformed_frames),
    cmocka_unit_test(test_gather_refused_segment),
    cmocka_unit_test(test_raw_writev_and_notify),
    cmocka_unit_test(test_notify_op),
    cmocka_unit_test(test_unregister),
    cmocka_unit_test(test_peer_destroyed_mid_transfer),
    cmocka_unit_test(test_stalled_peer),
    cmocka_unit_test(test_read_timeout_mid_answer),
    cmocka_unit_test(test_read_timeout_late_answer),
    cmocka_unit_test(test_forged_answers),
    cmocka_unit_test(test_stalled_answer_holds_up_no_other_peer),
    cmocka_unit_test(test_own_answers_not_held_by_serving),
    cmocka_unit_test(test_tls_answer_stalled_mid_record),
    cmocka_unit_test(test_connect_refused),
    cmocka_unit_test(test_trickling_writer_cut_off),
    cmocka_unit_test(test_no_hello_cut_off),
};

KVF_TEST_MAIN(tests)
