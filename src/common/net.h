/* Socket helpers shared by the store server and the transports. */
#ifndef KVF_NET_H
#define KVF_NET_H

#include "common/url.h"

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

#endif /* KVF_NET_H */
