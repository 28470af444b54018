/*
 * Socket helpers of the tcp transport (tcp.h): whole sends and receives on blocking or
 * non-blocking sockets, each bounded by a deadline or a stall limit so that a peer that stops
 * reading or sending is noticed.
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

int tcp_sendv(int fd, struct iovec *iov, int cnt, uint64_t deadline_ms, uint32_t stall_ms)
{
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

int tcp_recv_full(int fd, void *buf, size_t len, uint64_t deadline_ms)
{
    size_t got = 0;
    while (got < len) {
        /* With a deadline, take what is there and sleep in poll() only when nothing is. */
        ssize_t r =
            recv(fd, (uint8_t *)buf + got, len - got, deadline_ms ? MSG_DONTWAIT : MSG_WAITALL);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0)
            return -EPIPE;
        if (errno == EINTR || (errno == EAGAIN && !deadline_ms))
            continue;
        if (errno != EAGAIN)
            return -errno;
        uint64_t now = kvf__now_ms();
        if (now >= deadline_ms)
            return -KVF_ETIMEDOUT;
        uint64_t left = deadline_ms - now;
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, left > INT32_MAX ? INT32_MAX : (int)left) < 0 && errno != EINTR)
            return -errno;
    }
    return 0;
}

