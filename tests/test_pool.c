/*
 * The fixed set of I/O threads (issue 17): however many connections arrive, the target runs the
 * same threads, and however many peers an initiator writes to, so does it; a connection that stalls in the middle of a frame does not hold up the
 * others served by the same I/O thread; and unauthenticated connections have their own small
 * share (KVF_TCP_MAX_PREAUTH, KVF_TCP_MAX_PREAUTH_PER_ADDR) with the oldest evicted, so a flood
 * of them does not lock a keyed Prefill out. Raw sockets on 127.0.0.x only, bounded in count and
 * time; every socket is closed.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/common.h"
#include "common/regions.h"
#include "common/url.h"
#include "test_util.h"
#include "transport/tcp.h"
#include "transport/tcp_proto.h"
#include "transport/transport.h"

static const struct kvf_transport_ops *ops = &kvf__tcp_ops;

typedef struct {
    kvf_transport_t *t;
    uint16_t port;
    kvf_region_table_t *rt;
} node_t;

/* A transport on 127.0.0.1, any port, with @key (NULL: none). */
static void node_start(node_t *n, const kvf_auth_key_t *key)
{
    /* A Prefill may wait behind a flood in the listen backlog (slowly under ASan): its connect
     * gets the writes' 10 s. */
    kvf_transport_params_t p = {
        .local_sid = "127.0.0.1:0", .conns_per_peer = 1, .connect_timeout_ms = 10000, .auth = key};
    assert_kvf_ok(kvf__session_id_parse(p.local_sid, &p.listen));
    assert_kvf_ok(kvf__regions_create(&n->rt));
    p.regions = n->rt;
    assert_kvf_ok(ops->create(&p, &n->t));
    n->port = ops->port(n->t);
}

static void node_stop(node_t *n)
{
    ops->destroy(n->t);
    kvf__regions_destroy(n->rt);
    memset(n, 0, sizeof(*n));
}

/* Threads of this process. */
static unsigned threads_now(void)
{
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    unsigned n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        n += de->d_name[0] != '.';
    closedir(d);
    return n;
}

/* Connections the target holds, and how many of them are before their HELLO. */
static unsigned served(node_t *n, unsigned *preauth)
{
    struct tcp_transport *t = tcp_of(n->t);
    pthread_mutex_lock(&t->mu);
    unsigned k = t->nsconns;
    if (preauth)
        *preauth = t->npreauth;
    pthread_mutex_unlock(&t->mu);
    return k;
}

/* A blocking socket from 127.0.0.@src to 127.0.0.1:@port (I/O bounded by 2 s), or -1. */
static int raw_connect(unsigned src, uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000000u | src)};
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
        fail_msg("bind to 127.0.0.%u: %s", src, strerror(errno));
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Send a HELLO and read its answer: true when accepted. */
static bool raw_hello(int fd, const char *sid)
{
    uint8_t f[KVF_TCP_HDR_LEN + 64];
    size_t sl = strlen(sid);
    tcp_hdr_encode(f, KVF_TCP_HELLO, 0, 1, 0, sl);
    memcpy(f + KVF_TCP_HDR_LEN, sid, sl);
    if (send(fd, f, KVF_TCP_HDR_LEN + sl, MSG_NOSIGNAL) != (ssize_t)(KVF_TCP_HDR_LEN + sl))
        return false;
    uint8_t b[KVF_TCP_HDR_LEN];
    if (recv(fd, b, sizeof(b), MSG_WAITALL) != (ssize_t)sizeof(b))
        return false;
    tcp_hdr_t h;
    tcp_hdr_decode(b, &h);
    return h.type == KVF_TCP_RESP && h.status == 0 && h.req_id == 1;
}

/* A peer handle to @port whose session id is its address. */
static kvf_tpeer_t *peer_open_to(node_t *from, uint16_t port)
{
    char sid[32];
    snprintf(sid, sizeof(sid), "127.0.0.1:%u", (unsigned)port);
    kvf_tpeer_desc_t d = {.sid = sid};
    assert_kvf_ok(kvf__session_id_parse(sid, &d.addr));
    kvf_tpeer_t *p = NULL;
    assert_kvf_ok(ops->peer_open(from->t, &d, &p));
    return p;
}

/* A write of @len bytes from @from to @dst on the transport at @port, checked byte for byte. */
static void prefill_write(node_t *from, uint16_t port, uint8_t *dst, size_t len, unsigned seed)
{
    uint8_t *src = malloc(len);
    assert_non_null(src);
    for (size_t i = 0; i < len; i++)
        src[i] = (uint8_t)(i * 131u + seed);
    kvf_tpeer_t *p = peer_open_to(from, port);
    kvf_xfer_t x = {.op = KVF_OP_WRITE, .local = src, .remote = (uintptr_t)dst, .len = len};
    assert_kvf_ok(ops->transfer(p, &x, 1, kvf_test_now_ms() + 10000, NULL));
    ops->peer_close(p);
    assert_memory_equal(dst, src, len);
    free(src);
}

/* ---------------------------------------------------------------------------------------------
 * Threads are fixed
 * ------------------------------------------------------------------------------------------- */

#define FLOOD_N 1000u

/* 1,000 raw connections from 127.0.0.2..9, each sending nothing or a third of a header, add no
 * thread to the target; the unauthenticated ones are held to their share, and a Prefill still
 * writes. */
static void flood_adds_no_threads(void **state)
{
    (void)state;
    kvf_test_need_fds("a flood of 1,000 connections", 2 * FLOOD_N + 256);
    node_t a = {0}, b = {0};
    node_start(&a, NULL);
    node_start(&b, NULL);
    static uint8_t dst[64 << 10];
    assert_kvf_ok(kvf__regions_add(a.rt, (uint64_t)(uintptr_t)dst, sizeof(dst), NULL));
    unsigned before = threads_now();

    int *fds = calloc(FLOOD_N, sizeof(*fds));
    assert_non_null(fds);
    uint8_t part[KVF_TCP_HDR_LEN / 3];
    memset(part, 0x4b, sizeof(part));
    unsigned connected = 0;
    for (unsigned i = 0; i < FLOOD_N; i++) {
        fds[i] = raw_connect(2 + i % 8, a.port);
        connected += fds[i] >= 0;
        if (fds[i] >= 0 && i % 2)
            (void)send(fds[i], part, sizeof(part), MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    unsigned during = threads_now(), pre = 0, held = served(&a, &pre);
    print_message("flood: %u connected; threads %u before, %u during; target holds %u (%u "
                  "pre-auth)\n",
                  connected, before, during, held, pre);
    assert_true(connected > FLOOD_N / 2);
    assert_int_equal(during, before);
    assert_in_range(pre, 0, KVF_TCP_MAX_PREAUTH);
    prefill_write(&b, a.port, dst, sizeof(dst), 3);
    assert_int_equal(threads_now(), before);

    for (unsigned i = 0; i < FLOOD_N; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(fds);
    node_stop(&b);
    node_stop(&a);
}

#define IDLE_PEERS 200u

/* 200 connections past their HELLO, sitting idle (200 peers of a Decode), cost no thread. */
static void idle_peers_keep_thread_count(void **state)
{
    (void)state;
    kvf_test_need_fds("200 idle peers", 2 * IDLE_PEERS + 256);
    node_t a = {0}, b = {0};
    node_start(&a, NULL);
    node_start(&b, NULL);
    static uint8_t dst[64 << 10];
    assert_kvf_ok(kvf__regions_add(a.rt, (uint64_t)(uintptr_t)dst, sizeof(dst), NULL));
    unsigned before = threads_now();
    int fds[IDLE_PEERS];
    for (unsigned i = 0; i < IDLE_PEERS; i++) {
        char sid[32];
        /* Two source addresses: KVF_TCP_MAX_CONNS_PER_ADDR is 128. */
        fds[i] = raw_connect(2 + i % 2, a.port);
        assert_true(fds[i] >= 0);
        snprintf(sid, sizeof(sid), "127.0.0.%u:%u", 2 + i % 2, 1000 + i);
        if (!raw_hello(fds[i], sid))
            fail_msg("peer %u: no answer to its HELLO", i);
    }
    assert_int_equal(served(&a, NULL), IDLE_PEERS);
    unsigned during = threads_now();
    print_message("threads: %u before, %u with %u idle peers\n", before, during, IDLE_PEERS);
    assert_int_equal(during, before);
    prefill_write(&b, a.port, dst, sizeof(dst), 5);
    for (unsigned i = 0; i < IDLE_PEERS; i++)
        close(fds[i]);
    node_stop(&b);
    node_stop(&a);
}

/* An initiator with 200 peers, each with an open connection that wrote and now sits idle, runs
 * the threads it ran with none: no thread belongs to a connection on this side either. Two
 * targets, 100 peers each (KVF_TCP_MAX_CONNS_PER_ADDR is 128 from one address). */
static void initiator_peers_keep_thread_count(void **state)
{
    (void)state;
    kvf_test_need_fds("200 initiator peers", 4 * IDLE_PEERS + 256);
    node_t tg[2] = {{0}, {0}}, b = {0};
    static uint8_t dst[2][IDLE_PEERS / 2][64];
    for (unsigned k = 0; k < 2; k++) {
        node_start(&tg[k], NULL);
        assert_kvf_ok(
            kvf__regions_add(tg[k].rt, (uint64_t)(uintptr_t)dst[k], sizeof(dst[k]), NULL));
    }
    node_start(&b, NULL);
    unsigned before = threads_now();
    kvf_tpeer_t *peers[IDLE_PEERS];
    for (unsigned i = 0; i < IDLE_PEERS; i++) {
        uint8_t src[64];
        for (unsigned j = 0; j < sizeof(src); j++)
            src[j] = (uint8_t)(i * 7u + j);
        uint8_t *to = dst[i % 2][i / 2];
        peers[i] = peer_open_to(&b, tg[i % 2].port);
        kvf_xfer_t x = {.op = KVF_OP_WRITE, .local = src, .remote = (uintptr_t)to, .len = 64};
        assert_kvf_ok(ops->transfer(peers[i], &x, 1, kvf_test_now_ms() + 10000, NULL));
        assert_memory_equal(to, src, sizeof(src));
    }
    assert_int_equal(served(&tg[0], NULL) + served(&tg[1], NULL), IDLE_PEERS);
    unsigned during = threads_now();
    print_message("initiator: threads %u before, %u with %u peers\n", before, during, IDLE_PEERS);
    assert_int_equal(during, before);
    for (unsigned i = 0; i < IDLE_PEERS; i++)
        ops->peer_close(peers[i]);
    node_stop(&b);
    node_stop(&tg[1]);
    node_stop(&tg[0]);
}

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

/* kvf_config_t.io_threads sizes the pool, before $KVFERRY_IO_THREADS; out of range it is refused
 * with its value named; 0 leaves it to the environment. */
static void io_threads_from_config(void **state)
{
    (void)state;
    setenv("KVFERRY_IO_THREADS", "1", 1);
    kvf_config_t c;
    kvf_config_init(&c);
    assert_int_equal(c.io_threads, 0);
    c.io_threads = 65;
    kvf_engine_t *e = NULL;
    assert_kvf_err(kvf_engine_create("p2p://", "127.0.0.1:0", KVF_ROLE_DECODE, 0, &c, &e),
                   -KVF_EINVAL);
    assert_last_error_contains("config.io_threads 65");
    assert_null(e);
    unsigned before = threads_named("kvf-tcp-io");
    c.io_threads = 3;
    e = kvf_test_engine("p2p://", KVF_ROLE_DECODE, &c);
    assert_int_equal(threads_named("kvf-tcp-io") - before, 3);
    kvf_engine_destroy(e);
    c.io_threads = 0;
    e = kvf_test_engine("p2p://", KVF_ROLE_DECODE, &c);
    assert_int_equal(threads_named("kvf-tcp-io") - before, 1);
    kvf_engine_destroy(e);
    unsetenv("KVFERRY_IO_THREADS");
    assert_int_equal(threads_named("kvf-tcp-io"), before);
}

/* ---------------------------------------------------------------------------------------------
 * A stalled connection does not hold up its I/O thread
 * ------------------------------------------------------------------------------------------- */

/* With one I/O thread, a peer that sends half a header and stalls, and one that sends a WRITE's
 * header and half its payload and stalls, leave a Prefill's writes on the same thread served. */
static void slow_loris_does_not_block_others(void **state)
{
    (void)state;
    setenv("KVFERRY_IO_THREADS", "1", 1);
    node_t a = {0}, b = {0};
    node_start(&a, NULL);
    unsetenv("KVFERRY_IO_THREADS");
    node_start(&b, NULL);
    assert_int_equal(tcp_of(a.t)->nio, 1);
    static uint8_t dst[256 << 10];
    assert_kvf_ok(kvf__regions_add(a.rt, (uint64_t)(uintptr_t)dst, sizeof(dst), NULL));

    int half_hdr = raw_connect(2, a.port);
    assert_true(half_hdr >= 0);
    assert_true(raw_hello(half_hdr, "127.0.0.2:1"));
    uint8_t h[KVF_TCP_HDR_LEN];
    tcp_hdr_encode(h, KVF_TCP_WRITE, 0, 2, (uintptr_t)dst, 4096);
    assert_int_equal(send(half_hdr, h, sizeof(h) / 2, MSG_NOSIGNAL), (ssize_t)sizeof(h) / 2);

    int half_body = raw_connect(3, a.port);
    assert_true(half_body >= 0);
    assert_true(raw_hello(half_body, "127.0.0.3:1"));
    tcp_hdr_encode(h, KVF_TCP_WRITE, 0, 2, (uintptr_t)dst + (128 << 10), 64 << 10);
    uint8_t body[32 << 10];
    memset(body, 0xee, sizeof(body));
    assert_int_equal(send(half_body, h, sizeof(h), MSG_NOSIGNAL), (ssize_t)sizeof(h));
    assert_int_equal(send(half_body, body, sizeof(body), MSG_NOSIGNAL), (ssize_t)sizeof(body));

    /* Both stall; the Prefill's writes go through the same thread, each well within its own
     * deadline and long before the stalled frames' rate deadlines (2 s and more). */
    for (unsigned round = 0; round < 5; round++) {
        uint64_t t0 = kvf_test_now_ms();
        prefill_write(&b, a.port, dst, 64 << 10, round);
        uint64_t took = kvf_test_now_ms() - t0;
        if (took >= KVF_TCP_FRAME_BASE_MS)
            fail_msg("round %u: a write beside two stalled connections took %" PRIu64 " ms", round,
                     took);
    }
    /* The stalled connections are still open: nothing closed them to let the others through. */
    char c;
    assert_int_equal(recv(half_hdr, &c, 1, MSG_DONTWAIT), -1);
    assert_int_equal(recv(half_body, &c, 1, MSG_DONTWAIT), -1);
    close(half_hdr);
    close(half_body);
    node_stop(&b);
    node_stop(&a);
}

/* ---------------------------------------------------------------------------------------------
 * A peer's connections share one I/O thread, the peers are spread over them
 * ------------------------------------------------------------------------------------------- */

/* The I/O thread driving each served connection of @sid, into @idx (up to 4); returns how many
 * connections @sid has. */
static unsigned threads_of(node_t *n, const char *sid, unsigned idx[4])
{
    struct tcp_transport *t = tcp_of(n->t);
    unsigned k = 0;
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn *sc = t->sconns; sc; sc = sc->next)
        if (strcmp(sc->peer_sid, sid) == 0 && k < 4)
            idx[k++] = sc->io->idx;
    pthread_mutex_unlock(&t->mu);
    return k;
}

/* A WRITE frame's header and @len payload bytes from @src, whose first @first bytes are sent
 * after @pre (a HELLO to pipeline before it, or none) and the rest only once @pre's answer is
 * read: the answer to the write is then read and checked. */
static void raw_write_split(int fd, const char *hello_sid, uint64_t dst, const uint8_t *src,
                            size_t len, size_t first)
{
    static uint8_t buf[KVF_TCP_HDR_LEN * 2 + 64 + (256 << 10)];
    size_t n = 0, sl = hello_sid ? strlen(hello_sid) : 0;
    assert_true(first <= len && KVF_TCP_HDR_LEN * 2 + sl + first <= sizeof(buf));
    if (hello_sid) {
        tcp_hdr_encode(buf, KVF_TCP_HELLO, 0, 1, 0, sl);
        memcpy(buf + KVF_TCP_HDR_LEN, hello_sid, sl);
        n = KVF_TCP_HDR_LEN + sl;
    }
    tcp_hdr_encode(buf + n, KVF_TCP_WRITE, 0, 2, dst, len);
    n += KVF_TCP_HDR_LEN;
    memcpy(buf + n, src, first);
    n += first;
    assert_int_equal(send(fd, buf, n, MSG_NOSIGNAL), (ssize_t)n);
    uint8_t b[KVF_TCP_HDR_LEN];
    tcp_hdr_t h;
    if (hello_sid) {
        assert_int_equal(recv(fd, b, sizeof(b), MSG_WAITALL), (ssize_t)sizeof(b));
        tcp_hdr_decode(b, &h);
        assert_true(h.type == KVF_TCP_RESP && h.status == 0 && h.req_id == 1);
    }
    assert_int_equal(send(fd, src + first, len - first, MSG_NOSIGNAL), (ssize_t)(len - first));
    assert_int_equal(recv(fd, b, sizeof(b), MSG_WAITALL), (ssize_t)sizeof(b));
    tcp_hdr_decode(b, &h);
    assert_true(h.type == KVF_TCP_RESP && h.req_id == 2);
    assert_int_equal(h.status, 0);
}

/* All of a peer's connections are served by one I/O thread, whichever threads the accept thread
 * gave them, and the peers by different threads: a call split over the connections then waits
 * for one thread's turn whoever sends it. (With the accept thread's choice alone, of 16
 * processes writing 1 MiB calls over two connections each, those whose connections shared a
 * thread moved 1.3-2.9 x the bytes of those split over two.) Accepted in the order A, A, B, B, the
 * second A lands on thread 1 and is moved to the first, here with a WRITE pipelined behind its
 * HELLO and half its payload still to come: every byte lands. */
static void peer_connections_share_one_io_thread(void **state)
{
    (void)state;
    setenv("KVFERRY_IO_THREADS", "2", 1);
    node_t a = {0};
    node_start(&a, NULL);
    unsetenv("KVFERRY_IO_THREADS");
    struct tcp_transport *t = tcp_of(a.t);
    assert_int_equal(t->nio, 2);
    enum { LEN = 256 << 10 };
    static uint8_t dst[4][LEN], src[4][LEN];
    assert_kvf_ok(kvf__regions_add(a.rt, (uint64_t)(uintptr_t)dst, sizeof(dst), NULL));
    for (unsigned k = 0; k < 4; k++)
        for (size_t i = 0; i < LEN; i++)
            src[k][i] = (uint8_t)(i * 31u + k * 7u + 1);

    const char *sid[4] = {"127.0.0.2:1", "127.0.0.2:1", "127.0.0.2:2", "127.0.0.2:2"};
    int fd[4];
    for (unsigned k = 0; k < 4; k++) {
        fd[k] = raw_connect(2, a.port);
        assert_true(fd[k] >= 0);
        if (k % 2 == 0)
            assert_true(raw_hello(fd[k], sid[k]));
        else
            raw_write_split(fd[k], sid[k], (uintptr_t)dst[k], src[k], LEN, LEN / 2);
    }
    /* Every connection writes once more (and the first of each peer for the first time), each
     * write answered after the connection reached the thread it stays on. */
    for (unsigned k = 0; k < 4; k++) {
        if (k % 2 == 0)
            raw_write_split(fd[k], NULL, (uintptr_t)dst[k], src[k], LEN, 0);
        assert_memory_equal(dst[k], src[k], LEN);
        memset(dst[k], 0, LEN);
        raw_write_split(fd[k], NULL, (uintptr_t)dst[k], src[k], LEN, LEN / 3);
        assert_memory_equal(dst[k], src[k], LEN);
    }
    unsigned on[2];
    for (unsigned p = 0; p < 2; p++) {
        unsigned idx[4];
        assert_int_equal(threads_of(&a, sid[2 * p], idx), 2);
        print_message("%s: I/O threads %u and %u\n", sid[2 * p], idx[0], idx[1]);
        assert_int_equal(idx[0], idx[1]);
        on[p] = idx[0];
    }
    assert_int_not_equal(on[0], on[1]);
    pthread_mutex_lock(&t->mu);
    unsigned on0 = t->io[0].nconns, on1 = t->io[1].nconns;
    pthread_mutex_unlock(&t->mu);
    assert_int_equal(on0, 2);
    assert_int_equal(on1, 2);
    for (unsigned k = 0; k < 4; k++)
        close(fd[k]);
    node_stop(&a);
}

/* ---------------------------------------------------------------------------------------------
 * Unauthenticated connections have their own share
 * ------------------------------------------------------------------------------------------- */

#define PREAUTH_FLOOD    400u
#define PREAUTH_FLOOD_MS 4000u

typedef struct {
    uint16_t port;
    atomic_bool stop;
    unsigned opened;
} flood_t;

/* Opens raw connections from 127.0.0.1 (the Prefill's own address) and 127.0.0.2 that send
 * half an auth header and nothing else, keeping up to PREAUTH_FLOOD open, replacing the ones the
 * target closed, until told to stop or PREAUTH_FLOOD_MS passed. */
static void *flood_main(void *arg)
{
    flood_t *f = arg;
    int fds[PREAUTH_FLOOD];
    for (unsigned i = 0; i < PREAUTH_FLOOD; i++)
        fds[i] = -1;
    uint8_t half[4];
    kvf__put_le32(half, KVF_AUTH_MAGIC);
    uint64_t until = kvf_test_now_ms() + PREAUTH_FLOOD_MS;
    while (!atomic_load(&f->stop) && kvf_test_now_ms() < until) {
        unsigned opened = 0;
        for (unsigned i = 0; i < PREAUTH_FLOOD && !atomic_load(&f->stop); i++) {
            if (fds[i] >= 0) {
                char c;
                ssize_t r = recv(fds[i], &c, 1, MSG_DONTWAIT);
                if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                    continue;
                close(fds[i]);
            }
            fds[i] = raw_connect(1 + i % 2, f->port);
            if (fds[i] >= 0) {
                (void)send(fds[i], half, 2, MSG_NOSIGNAL | MSG_DONTWAIT);
                f->opened++;
                opened++;
            }
        }
        if (opened == 0)
            usleep(2000);
    }
    for (unsigned i = 0; i < PREAUTH_FLOOD; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return NULL;
}

/* A keyed target under a flood of connections that never finish the handshake, from the
 * Prefill's own address too: the pre-auth share stays within its cap, no thread is added, and a
 * keyed Prefill connects and writes, several times, during the flood. */
static void preauth_flood_does_not_lock_out_keyed_prefill(void **state)
{
    (void)state;
    kvf_test_need_fds("a flood of 400 connections", 2 * PREAUTH_FLOOD + 256);
    kvf_auth_key_t key = {.len = 32};
    for (unsigned i = 0; i < key.len; i++)
        key.bytes[i] = (uint8_t)(i * 7 + 1);
    node_t a = {0}, b = {0};
    node_start(&a, &key);
    node_start(&b, &key);
    static uint8_t dst[64 << 10];
    assert_kvf_ok(kvf__regions_add(a.rt, (uint64_t)(uintptr_t)dst, sizeof(dst), NULL));
    unsigned before = threads_now();

    /* Static: should an assertion below end the case early, the flood thread (which stops by
     * itself within PREAUTH_FLOOD_MS) must not read a dead stack frame. */
    static flood_t f;
    f.port = a.port;
    atomic_store(&f.stop, false);
    f.opened = 0;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, flood_main, &f), 0);
    unsigned max_pre = 0;
    uint64_t t0 = kvf_test_now_ms();
    while (served(&a, NULL) < 2 * KVF_TCP_MAX_PREAUTH_PER_ADDR && kvf_test_now_ms() - t0 < 2000)
        usleep(5000);
    for (unsigned round = 0; round < 5; round++) {
        unsigned pre = 0;
        served(&a, &pre);
        max_pre = pre > max_pre ? pre : max_pre;
        prefill_write(&b, a.port, dst, sizeof(dst), round + 11);
    }
    unsigned during = threads_now() - 1; /* the flood thread */
    atomic_store(&f.stop, true);
    pthread_join(th, NULL);
    print_message("flood: %u connections opened; pre-auth at most %u; threads %u before, %u "
                  "during\n",
                  f.opened, max_pre, before, during);
    /* The flood went past its two addresses' share, so connections were evicted meanwhile. */
    assert_true(f.opened > 2 * KVF_TCP_MAX_PREAUTH_PER_ADDR);
    assert_in_range(max_pre, 0, 2 * KVF_TCP_MAX_PREAUTH_PER_ADDR);
    assert_int_equal(during, before);
    node_stop(&b);
    node_stop(&a);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(flood_adds_no_threads),
    cmocka_unit_test(idle_peers_keep_thread_count),
    cmocka_unit_test(initiator_peers_keep_thread_count),
    cmocka_unit_test(io_threads_from_config),
    cmocka_unit_test(slow_loris_does_not_block_others),
    cmocka_unit_test(peer_connections_share_one_io_thread),
    cmocka_unit_test(preauth_flood_does_not_lock_out_keyed_prefill),
};

KVF_TEST_MAIN(tests)
