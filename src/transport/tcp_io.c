/*
 * Socket helpers of the tcp transport (tcp.h): an initiator connection's whole sends, bounded by
 * a deadline or a stall limit so that a peer that stops reading is noticed, and its receives,
 * which never block; plain (blocking socket, receives with MSG_DONTWAIT) or TLS (non-blocking
 * socket, every call on the session under the connection's tls_mu).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <string.h>
#include <unistd.h>
#include <netdb.h>

#include "transport/tcp.h"

void tcp_set_timeout(int fd, int opt, unsigned ms)
{
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000u),
                         .tv_usec = (suseconds_t)(ms % 1000u) * 1000};
    setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof(tv));
}

void tcp_sockaddr_format(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        port = ntohs(a->sin_port);
        snprintf(buf, len, "%s:%u", host, port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        port = ntohs(a->sin6_port);
        snprintf(buf, len, "[%s]:%u", host, port);
    } else {
        snprintf(buf, len, "?");
    }
}

/* Wait for @ev on @fd until @deadline_ms (0: none). Returns 0 (ready, or interrupted) or
 * -KVF_ETIMEDOUT. */
static int tcp_wait(int fd, short ev, uint64_t deadline_ms)
{
    int ms = -1;
    if (deadline_ms) {
        uint64_t now = kvf__now_ms();
        if (now >= deadline_ms)
            return -KVF_ETIMEDOUT;
        ms = deadline_ms - now > INT32_MAX ? INT32_MAX : (int)(deadline_ms - now);
    }
    struct pollfd pf = {fd, ev, 0};
    if (poll(&pf, 1, ms) < 0 && errno != EINTR)
        return -errno;
    return 0;
}

/* One call on @c's TLS session under its lock: a send (@out) or a receive of up to @n bytes. */
static ssize_t tcp_tls_io(struct tcp_conn *c, void *buf, size_t n, bool out, short *wants)
{
    kvf_stream_t s = {c->fd, c->tls};
    pthread_mutex_lock(&c->tls_mu);
    ssize_t r = out ? kvf__stream_send(&s, buf, n, NULL, 0) : kvf__stream_recv(&s, buf, n, NULL, 0);
    *wants = kvf__stream_wants(&s, out);
    pthread_mutex_unlock(&c->tls_mu);
    return r;
}

/*
 * TLS: records of up to TCP_TLS_RECORD bytes. Pieces smaller than a record (a header, small
 * writes, the start of a large payload after a header) are gathered into c->tls_buf so that they
 * travel in one record; the rest of a large piece is encrypted straight from the caller's memory.
 */
static int tcp_tls_sendv(struct tcp_conn *c, struct iovec *iov, int cnt, uint64_t deadline_ms,
                         uint32_t stall_ms)
{
    uint64_t last = kvf__now_ms();
    size_t len = 0, off = 0; /* staged in tls_buf, of which sent */
    tcp_iov_advance(&iov, &cnt, 0);
    while (cnt > 0 || off < len) {
        if (off == len) {
            len = off = 0;
            while (cnt > 0 && len < TCP_TLS_RECORD && (len || iov->iov_len < TCP_TLS_RECORD)) {
                size_t n = iov->iov_len < TCP_TLS_RECORD - len ? iov->iov_len
                                                               : TCP_TLS_RECORD - len;
                memcpy(c->tls_buf + len, iov->iov_base, n);
                len += n;
                tcp_iov_advance(&iov, &cnt, n);
            }
        }
        bool staged = off < len;
        short ev;
        ssize_t w = staged ? tcp_tls_io(c, c->tls_buf + off, len - off, true, &ev)
                           : tcp_tls_io(c, iov->iov_base, iov->iov_len, true, &ev);
        if (w > 0) {
            if (staged)
                off += (size_t)w;
            else
                tcp_iov_advance(&iov, &cnt, (size_t)w);
            last = kvf__now_ms();
            if (deadline_ms && last >= deadline_ms && (cnt > 0 || off < len))
                return -KVF_ETIMEDOUT;
            continue;
        }
        if (w != -EAGAIN)
            return w == 0 ? -EPIPE : (int)w;
        uint64_t dl = deadline_ms;
        if (stall_ms && (!dl || last + stall_ms < dl))
            dl = last + stall_ms;
        int rc = tcp_wait(c->fd, ev, dl);
        if (rc)
            return rc;
    }
    return 0;
}

int tcp_conn_sendv(struct tcp_conn *c, struct iovec *iov, int cnt, uint64_t deadline_ms,
                   uint32_t stall_ms)
{
    if (c->tls)
        return tcp_tls_sendv(c, iov, cnt, deadline_ms, stall_ms);
    int fd = c->fd;
    uint64_t last = stall_ms ? kvf__now_ms() : 0;
    tcp_iov_advance(&iov, &cnt, 0);
    while (cnt > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w > 0) {
            tcp_iov_advance(&iov, &cnt, (size_t)w);
            if (cnt == 0 || (!stall_ms && !deadline_ms))
                continue;
            /* Progress alone does not extend the deadline: a peer that takes a few bytes at a
             * time must not keep a frame (and what it holds) going for ever. */
            last = kvf__now_ms();
            if (deadline_ms && last >= deadline_ms)
                return -KVF_ETIMEDOUT;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            uint64_t now = kvf__now_ms();
            if (deadline_ms && now >= deadline_ms)
                return -KVF_ETIMEDOUT;
            if (stall_ms && now - last >= stall_ms)
                return -KVF_ETIMEDOUT;
            continue;
        }
        return w < 0 ? -errno : -EPIPE;
    }
    return 0;
}

ssize_t tcp_conn_recv_some(struct tcp_conn *c, void *buf, size_t len)
{
    short ev;
    if (c->tls)
        return tcp_tls_io(c, buf, len, false, &ev);
    kvf_stream_t s = {c->fd, NULL};
    return kvf__stream_recv(&s, buf, len, NULL, 0);
}
