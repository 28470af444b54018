/* Socket helpers shared by the store server and the transports. */
#ifndef KVF_NET_H
#define KVF_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/url.h"

struct addrinfo;

/*
 * kvf__tcp_listen - resolve @hp and return a bound, listening, non-blocking, close-on-exec TCP
 * socket (SO_REUSEADDR, so a restarted process can bind while old connections sit in
 * TIME_WAIT). IPv4 addresses are tried first, so that a name such as "localhost" that resolves
 * to ::1 first is still reachable as 127.0.0.1.
 * Returns the fd, or a negative code with *why (static text) saying what failed:
 * -KVF_EINVAL when the name does not resolve, -errno from socket/bind/listen.
 * Sets no last-error message: the callers name the object that was listening.
 */
int kvf__tcp_listen(const kvf_hostport_t *hp, const char **why);

/*
 * kvf__nb_io - move all of @buf on @fd (@out: send, else receive) before @deadline_ms
 * (kvf__now_ms() clock), polling; each call is MSG_DONTWAIT, so @fd may be blocking or not.
 * Returns 0, -EPIPE (end of stream before @len bytes), -KVF_ETIMEDOUT or -errno.
 */
int kvf__nb_io(int fd, void *buf, size_t len, bool out, uint64_t deadline_ms);

/*
 * kvf__nb_connect - a non-blocking, close-on-exec socket for @ai, connected before @deadline_ms.
 * Returns the fd, or -KVF_ETIMEDOUT / -errno (the socket closed).
 */
int kvf__nb_connect(const struct addrinfo *ai, uint64_t deadline_ms);

/*
 * kvf__nb_connect_hp - resolve @hp (a name only when it is one) and connect to the first of its
 * addresses that answers before @deadline_ms, as kvf__nb_connect(); TCP_NODELAY is set (the
 * callers' requests are small and latency-bound).
 * Returns the fd; -KVF_EINVAL when @hp does not resolve (*why: the resolver's text);
 * -KVF_ETIMEDOUT; -errno of the last address tried.
 */
int kvf__nb_connect_hp(const kvf_hostport_t *hp, uint64_t deadline_ms, const char **why);

#endif /* KVF_NET_H */
