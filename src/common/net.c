/* Socket helpers shared by the store server and the transports (see net.h). */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/common.h"
#include "common/net.h"

int kvf__tcp_listen(const kvf_hostport_t *hp, const char **why)
{
    struct addrinfo hints, *res = NULL;
    char port[8];
    int err = EADDRNOTAVAIL, fd = -1;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV | (hp->kind != KVF_HOST_NAME ? AI_NUMERICHOST : 0);
    snprintf(port, sizeof(port), "%u", (unsigned)hp->port);
    int g = getaddrinfo(hp->host, port, &hints, &res);
    if (g) {
        *why = g == EAI_SYSTEM ? strerror(errno) : gai_strerror(g);
        return g == EAI_SYSTEM ? -errno : -KVF_EINVAL;
    }
    for (int pass = 0; pass < 2 && fd < 0; pass++) {
        for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
            if ((ai->ai_family == AF_INET) != (pass == 0))
                continue;
            int s = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                           ai->ai_protocol);
            if (s < 0) {
                err = errno;
                continue;
            }
            int one = 1;
            setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
            if (bind(s, ai->ai_addr, ai->ai_addrlen) < 0 || listen(s, 1024) < 0) {
                err = errno;
                close(s);
                continue;
            }
            fd = s;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) {
        *why = strerror(err);
        return -err;
    }
    return fd;
}

/* A poll for @events on @fd until @deadline_ms; returns 0 (ready, or interrupted: try again),
 * -KVF_ETIMEDOUT, or -errno. */
static int wait_fd(int fd, short events, uint64_t deadline_ms)
{
    uint64_t now = kvf__now_ms();
    if (now >= deadline_ms)
        return -KVF_ETIMEDOUT;
    uint64_t left = deadline_ms - now;
    struct pollfd pf = {.fd = fd, .events = events};
    if (poll(&pf, 1, left > INT32_MAX ? INT32_MAX : (int)left) < 0 && errno != EINTR)
        return -errno;
    return 0;
}

int kvf__nb_io(int fd, void *buf, size_t len, bool out, uint64_t deadline_ms)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = out ? send(fd, (uint8_t *)buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT)
                        : recv(fd, (uint8_t *)buf + done, len - done, MSG_DONTWAIT);
        if (r > 0) {
            done += (size_t)r;
            continue;
        }
        if (r == 0)
            return -EPIPE;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        int rc = wait_fd(fd, out ? POLLOUT : POLLIN, deadline_ms);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int kvf__nb_connect(const struct addrinfo *ai, uint64_t deadline_ms)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0)
        return -errno;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
        return fd;
    int rc = errno == EINPROGRESS ? 0 : -errno;
    while (rc == 0) {
        struct pollfd pf = {.fd = fd, .events = POLLOUT};
        if (poll(&pf, 1, 0) > 0) {
            int err = 0;
            socklen_t el = sizeof(err);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (!err)
                return fd;
            rc = -err;
            break;
        }
        rc = wait_fd(fd, POLLOUT, deadline_ms);
    }
    close(fd);
    return rc;
}

int kvf__nb_connect_hp(const kvf_hostport_t *hp, uint64_t deadline_ms, const char **why)
{
    char port[8];
    snprintf(port, sizeof(port), "%u", (unsigned)hp->port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    hints.ai_flags = AI_NUMERICSERV | (hp->kind != KVF_HOST_NAME ? AI_NUMERICHOST : 0);
    int g = getaddrinfo(hp->host, port, &hints, &res);
    if (g) {
        *why = g == EAI_SYSTEM ? strerror(errno) : gai_strerror(g);
        return -KVF_EINVAL;
    }
    int fd = -ENOENT;
    for (struct addrinfo *ai = res; ai && fd < 0 && fd != -KVF_ETIMEDOUT; ai = ai->ai_next)
        fd = kvf__nb_connect(ai, deadline_ms);
    freeaddrinfo(res);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    return fd;
}
