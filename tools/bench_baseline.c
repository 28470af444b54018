/*
 * The baselines of `kvferry bench --baseline`: the same layout moved without kvferry, in the
 * same process run, timed by the same harness.
 *
 *   memcpy             each block copied from this thread's slice to a second local buffer
 *   process_vm_writev  one call per layout, an iovec per block, into the target process's buffer
 *                      (process_vm_readv for --op read)
 *   raw_tcp            one loopback connection per thread, plain send() of every block, a
 *                      receiver thread doing recv() into the second buffer; no framing at all
 *   tcp_pingpong       the same, but each layout is answered with an 8-byte ack before the next
 *                      is sent: the latency floor of a request over TCP
 *   raw_tcp_gather     the raw_tcp stream, each layout sent with writev and received with readv
 *                      (IOV_MAX blocks per call): the best one connection does with scattered blocks
 */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "bench.h"

/* ---- memcpy -------------------------------------------------------------------------------- */

static int memcpy_call(bench_worker_t *w, size_t base)
{
    const bench_layout_t *l = w->lay;
    for (size_t i = 0; i < l->n; i++) {
        size_t o = base + l->off[i];
        memcpy(w->scratch + o, w->local + o, l->len[i]);
    }
    return 0;
}

const bench_method_t bench_memcpy = {
    .name = "memcpy",
    .label = "memcpy",
    .call = memcpy_call,
};

/* ---- process_vm_writev / readv ------------------------------------------------------------- */

/* One call per layout, or per IOV_MAX blocks of a layout that has more. */
static int pvm_call(bench_worker_t *w, size_t base)
{
    const bench_layout_t *l = w->lay;
    size_t want = 0;
    for (size_t i = 0; i < l->n; i++) {
        size_t o = base + l->off[i];
        w->liov[i] = (struct iovec){.iov_base = w->local + o, .iov_len = l->len[i]};
        w->riov[i] =
            (struct iovec){.iov_base = (void *)(uintptr_t)(w->remote + o), .iov_len = l->len[i]};
    }
    for (size_t i = 0; i < l->n; i += IOV_MAX) {
        unsigned long k = l->n - i < IOV_MAX ? l->n - i : IOV_MAX;
        want = 0;
        for (size_t j = i; j < i + k; j++)
            want += l->len[j];
        ssize_t n = w->op == KVF_OP_WRITE
                        ? process_vm_writev(w->target_pid, w->liov + i, k, w->riov + i, k, 0)
                        : process_vm_readv(w->target_pid, w->liov + i, k, w->riov + i, k, 0);
        if (n != (ssize_t)want) {
            snprintf(w->err, sizeof(w->err),
                     "process_vm_%sv into pid %d moved %zd of %zu bytes: %s",
                     w->op == KVF_OP_WRITE ? "write" : "read", (int)w->target_pid, n, want,
                     n < 0 ? strerror(errno) : "short");
            return -1;
        }
    }
    return 0;
}

const bench_method_t bench_pvm_write = {
    .name = "process_vm_writev",
    .label = "process_vm_writev",
    .call = pvm_call,
};

const bench_method_t bench_pvm_read = {
    .name = "process_vm_readv",
    .label = "process_vm_readv",
    .call = pvm_call,
};

/* ---- raw TCP ------------------------------------------------------------------------------- */

int bench_send_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int bench_recv_all(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(fd, p + got, len - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 && got == 0)
            return 0;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return 1;
}

/* Move all of @iov (@n entries, changed on the way) with writev or readv, IOV_MAX at a time.
 * Returns 1 when done, 0 at end of stream before the first byte, -1 on error. */
static int iov_all(int fd, struct iovec *iov, size_t n, bool out)
{
    size_t moved = 0;
    while (n) {
        int k = n < IOV_MAX ? (int)n : IOV_MAX;
        ssize_t r = out ? writev(fd, iov, k) : readv(fd, iov, k);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0 && !out && moved == 0)
            return 0;
        if (r <= 0)
            return -1;
        moved += (size_t)r;
        for (size_t got = (size_t)r; got;) {
            size_t step = got < iov->iov_len ? got : iov->iov_len;
            iov->iov_base = (uint8_t *)iov->iov_base + step;
            iov->iov_len -= step;
            got -= step;
            if (iov->iov_len == 0) {
                iov++;
                n--;
            }
        }
        while (n && iov->iov_len == 0) {
            iov++;
            n--;
        }
    }
    return 1;
}

/* The receiving side: the layout's blocks in order, each at its place in the scratch slice,
 * cycling through the spans like the sender; in ping-pong mode an ack after each layout. */
static void *tcp_receiver(void *arg)
{
    bench_worker_t *w = arg;
    const bench_layout_t *l = w->lay;
    uint64_t ack = 0;
    for (size_t c = 0;; c++) {
        size_t base = (c % l->copies) * l->span;
        if (w->gather) {
            for (size_t i = 0; i < l->n; i++)
                w->riov[i] = (struct iovec){w->scratch + base + l->off[i], l->len[i]};
            int r = iov_all(w->rx_fd, w->riov, l->n, false);
            if (r == 0)
                return NULL;
            if (r < 0) {
                w->rx_failed = 1;
                return NULL;
            }
            w->rx_bytes += l->bytes;
            continue;
        }
        for (size_t i = 0; i < l->n; i++) {
            int r = bench_recv_all(w->rx_fd, w->scratch + base + l->off[i], l->len[i]);
            if (r == 0 && i == 0)
                return NULL;
            if (r <= 0) {
                w->rx_failed = 1;
                return NULL;
            }
            w->rx_bytes += l->len[i];
        }
        if (w->pingpong && bench_send_all(w->rx_fd, &ack, sizeof(ack)) < 0) {
            w->rx_failed = 1;
            return NULL;
        }
    }
}

static int tcp_start(bench_worker_t *w, bool pingpong, bool gather)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    w->fd = w->rx_fd = -1;
    w->pingpong = pingpong;
    w->gather = gather;
    w->rx_bytes = 0;
    w->rx_failed = 0;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 1) < 0 ||
        getsockname(ls, (struct sockaddr *)&a, &alen) < 0)
        goto fail;
    w->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (w->fd < 0 || connect(w->fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        goto fail;
    w->rx_fd = accept(ls, NULL, NULL);
    if (w->rx_fd < 0)
        goto fail;
    close(ls);
    ls = -1;
    /* As kvferry's data connections do: without it, the sub-MSS tail of a block can wait for
     * the receiver's delayed ACK (Nagle), which costs a stream of 16 KiB blocks most of its
     * bandwidth and a ping-pong milliseconds. */
    setsockopt(w->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(w->rx_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (pthread_create(&w->rx_thread, NULL, tcp_receiver, w) != 0)
        goto fail;
    w->rx_started = true;
    return 0;
fail:
    snprintf(w->err, sizeof(w->err), "loopback TCP connection: %s", strerror(errno));
    if (ls >= 0)
        close(ls);
    return -1;
}

static int raw_tcp_start(bench_worker_t *w)
{
    return tcp_start(w, false, false);
}

static int pingpong_start(bench_worker_t *w)
{
    return tcp_start(w, true, false);
}

static int gather_start(bench_worker_t *w)
{
    return tcp_start(w, false, true);
}

static int tcp_call(bench_worker_t *w, size_t base)
{
    const bench_layout_t *l = w->lay;
    if (w->gather) {
        for (size_t i = 0; i < l->n; i++)
            w->liov[i] = (struct iovec){w->local + base + l->off[i], l->len[i]};
        if (iov_all(w->fd, w->liov, l->n, true) < 0) {
            snprintf(w->err, sizeof(w->err), "writev: %s", strerror(errno));
            return -1;
        }
        return 0;
    }
    for (size_t i = 0; i < l->n; i++) {
        if (bench_send_all(w->fd, w->local + base + l->off[i], l->len[i]) < 0) {
            snprintf(w->err, sizeof(w->err), "send: %s", strerror(errno));
            return -1;
        }
    }
    if (w->pingpong) {
        uint64_t ack;
        if (bench_recv_all(w->fd, &ack, sizeof(ack)) != 1) {
            snprintf(w->err, sizeof(w->err), "receiving the ack: %s", strerror(errno));
            return -1;
        }
    }
    return 0;
}

/* Timed: the stream ends when the receiver has every byte, not when the last send returned. */
static int tcp_finish(bench_worker_t *w)
{
    shutdown(w->fd, SHUT_WR);
    pthread_join(w->rx_thread, NULL);
    w->rx_started = false;
    if (w->rx_failed) {
        snprintf(w->err, sizeof(w->err), "the raw TCP receiver failed after %llu bytes",
                 (unsigned long long)w->rx_bytes);
        return -1;
    }
    return 0;
}

static void tcp_cleanup(bench_worker_t *w)
{
    if (w->rx_started) {
        shutdown(w->fd, SHUT_RDWR);
        shutdown(w->rx_fd, SHUT_RDWR);
        pthread_join(w->rx_thread, NULL);
        w->rx_started = false;
    }
    if (w->fd >= 0)
        close(w->fd);
    if (w->rx_fd >= 0)
        close(w->rx_fd);
    w->fd = w->rx_fd = -1;
}

const bench_method_t bench_raw_tcp = {
    .name = "raw_tcp",
    .label = "raw TCP send/recv",
    .start = raw_tcp_start,
    .call = tcp_call,
    .finish = tcp_finish,
    .cleanup = tcp_cleanup,
};

const bench_method_t bench_tcp_pingpong = {
    .name = "tcp_pingpong",
    .label = "raw TCP ping-pong",
    .start = pingpong_start,
    .call = tcp_call,
    .finish = tcp_finish,
    .cleanup = tcp_cleanup,
};

/* The same stream, but each layout sent with writev and received with readv, IOV_MAX blocks
 * per system call: the best one plain connection does with scattered blocks. */
const bench_method_t bench_raw_tcp_gather = {
    .name = "raw_tcp_gather",
    .label = "raw TCP writev/readv",
    .start = gather_start,
    .call = tcp_call,
    .finish = tcp_finish,
    .cleanup = tcp_cleanup,
};
