/* Socket helpers shared by the store server and the transports (see net.h). */
#include <errno.h>
#include <netdb.h>
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
