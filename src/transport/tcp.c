/*
 * The TCP transport: the data path between engines on different hosts. The wire protocol is
 * specified in docs/protocol.md ("Transfer protocol"); its constants are in tcp_proto.h. tcp.h
 * lists the transport's files and says how its objects are locked.
 *
 * This file holds the transport object: create (the listening socket and the target's threads),
 * destroy, and the ops table.
 */
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/net.h"
#include "common/thread.h"
#include "common/url.h"
#include "transport/tcp.h"

/* ---------------------------------------------------------------------------------------------
 * Create / destroy
 * ------------------------------------------------------------------------------------------- */

/* Data TLS from @o: a server context for the connections peers open (this engine's certificate
 * is required) and a client context for those it opens. */
static int tcp_tls_setup(struct tcp_transport *t, const kvf_tls_opts_t *o)
{
    if (!o->cert_file || !*o->cert_file)
        return kvf__err(-KVF_EINVAL,
                        "data TLS of engine %s needs this engine's certificate and its key "
                        "(cert_file and key_file, --tls-cert and --tls-key): it is the server of "
                        "the connections its peers open",
                        t->local_sid);
    int rc = kvf__tls_ctx_new(o, true, NULL, &t->tls_srv);
    if (rc == 0)
        rc = kvf__tls_ctx_new(o, false, NULL, &t->tls_cli);
    if (rc < 0)
        return kvf__err_wrap(rc, "data TLS of engine %s", t->local_sid);
    kvf__tls_ctx_set_peer(t->tls_srv, "engine");
    kvf__tls_ctx_set_peer(t->tls_cli, "engine");
    return 0;
}

static void tcp_tls_free(struct tcp_transport *t)
{
    kvf__tls_ctx_free(t->tls_srv);
    kvf__tls_ctx_free(t->tls_cli);
    t->tls_srv = t->tls_cli = NULL;
}

/* Listen on a duplicate of the caller's bound socket @given, whose port must be @hp's (any, when
 * that is 0). Returns the new fd or a negative code with the message set. */
static int tcp_listen_given(struct tcp_transport *t, const kvf_hostport_t *hp, int given)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int type = 0;
    socklen_t tl = sizeof(type);
    if (getsockname(given, (struct sockaddr *)&ss, &sl) < 0 ||
        getsockopt(given, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_STREAM ||
        (ss.ss_family != AF_INET && ss.ss_family != AF_INET6))
        return kvf__err(-KVF_EINVAL, "config.listen_fd %d is not a bound TCP socket", given);
    uint16_t port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                   : ((struct sockaddr_in *)&ss)->sin_port);
    if (port == 0 || (hp->port != 0 && port != hp->port))
        return kvf__err(-KVF_EINVAL,
                        "config.listen_fd %d is bound to port %u, but the session id %s names "
                        "port %u",
                        given, (unsigned)port, t->local_sid, (unsigned)hp->port);
    int fd = fcntl(given, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return kvf__err(-errno, "config.listen_fd %d: dup: %s", given, strerror(errno));
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || listen(fd, 1024) < 0) {
        int err = errno;
        close(fd);
        return kvf__err(-err, "config.listen_fd %d: listen: %s", given, strerror(err));
    }
    return fd;
}

static int tcp_listen(struct tcp_transport *t, const kvf_hostport_t *hp, const int *given)
{
    const char *why = "";
    int fd = given ? tcp_listen_given(t, hp, *given) : kvf__tcp_listen(hp, &why);
    if (given && fd < 0)
        return fd;
    if (fd == -EADDRINUSE)
        return kvf__err(fd, "session id %s is already in use (tcp listen on %s: %s)", t->local_sid,
                        t->listen_str, why);
    if (fd < 0)
        return kvf__err(fd, "tcp listen on %s: %s", t->listen_str, why);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        t->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
        tcp_sockaddr_format(&ss, t->listen_str, sizeof(t->listen_str));
    }
    t->listen_fd = fd;
    return 0;
}

static int tcp_create(const kvf_transport_params_t *p, kvf_transport_t **out)
{
    struct tcp_transport *t;
    int rc;

    if (!p || !out || !p->regions)
        return kvf__err(-KVF_EINVAL, "tcp create: missing parameters or region table");
    t = calloc(1, sizeof(*t));
    if (!t)
        return kvf__err(-KVF_ENOMEM, "tcp create: out of memory");
    t->regions = p->regions;
    t->listen_fd = -1;
    t->wake_fd = -1;
    t->reap_fd = -1;
    snprintf(t->local_sid, sizeof(t->local_sid), "%s", p->local_sid ? p->local_sid : "");
    kvf__hostport_format(&p->listen, t->listen_str, sizeof(t->listen_str));
    t->conns_per_peer = p->conns_per_peer ? p->conns_per_peer : KVF_DEFAULT_CONNS_PER_PEER;
    if (t->conns_per_peer > KVF_TCP_MAX_CONNS_PER_PEER)
        t->conns_per_peer = KVF_TCP_MAX_CONNS_PER_PEER;
    t->chunk = p->chunk_bytes ? p->chunk_bytes : KVF_DEFAULT_CHUNK;
    if (t->chunk > KVF_TCP_MAX_CHUNK)
        t->chunk = KVF_TCP_MAX_CHUNK;
    t->connect_timeout_ms = p->connect_timeout_ms ? p->connect_timeout_ms : TCP_DEFAULT_CONNECT_MS;
    t->idle_timeout_ms = p->idle_timeout_ms ? p->idle_timeout_ms : KVF_DEFAULT_TCP_IDLE_TIMEOUT_MS;
    t->io_threads = p->io_threads;
    t->on_tick = tcp_posted_expire;
    if (p->auth)
        t->auth = *p->auth;
    t->notify_cb = p->notify_cb;
    t->notify_arg = p->notify_arg;
    t->stats_cb = p->stats_cb;
    t->stats_arg = p->stats_arg;
    t->record_cb = p->record_cb;
    t->record_arg = p->record_arg;
    atomic_init(&t->stopping, false);
    atomic_init(&t->io_stopping, false);
    const char *tc = getenv(TCP_TEST_CLOSE_ENV);
    atomic_init(&t->test_close_left, tc ? atoi(tc) : 0);

    rc = -pthread_mutex_init(&t->mu, NULL);
    if (rc) {
        rc = kvf__err(rc, "tcp create: mutex: %s", strerror(-rc));
        goto out_free;
    }
    if (p->tls && p->tls->enable) {
        rc = tcp_tls_setup(t, p->tls);
        if (rc)
            goto out_mutex;
    }
    rc = tcp_listen(t, &p->listen, p->listen_fd);
    if (rc)
        goto out_mutex;
    /* A session id created with port 0 is known to peers by the port chosen here: that is
     * the name the hello (and so a notification's sender) must carry. */
    kvf_hostport_t me;
    if (kvf__session_id_parse(t->local_sid, &me) == 0 && me.port == 0) {
        me.port = t->port;
        kvf__hostport_format(&me, t->local_sid, sizeof(t->local_sid));
    }
    t->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (t->wake_fd < 0) {
        rc = kvf__err(-errno, "tcp create: eventfd: %s", strerror(errno));
        goto out_listen;
    }
    t->reap_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (t->reap_fd < 0) {
        rc = kvf__err(-errno, "tcp create: eventfd: %s", strerror(errno));
        goto out_wake;
    }
    rc = tcp_pool_start(t);
    if (rc)
        goto out_reap;
    KVF_INFO(TCP_LOG, "listening on %s%s%s", t->listen_str, t->tls_srv ? " (TLS 1.3)" : "",
             t->auth.len ? " (peers must prove the cluster secret)" : "");
    if (!t->auth.len && !kvf__hostport_is_loopback(&p->listen))
        KVF_WARN(TCP_LOG,
                 "engine %s listens on %s without an auth key: anyone who can reach this port "
                 "can write and read its registered memory (set an auth key file: "
                 "docs/security.md)",
                 t->local_sid, t->listen_str);
    *out = (kvf_transport_t *)(void *)t;
    return 0;

out_reap:
    close(t->reap_fd);
out_wake:
    close(t->wake_fd);
out_listen:
    close(t->listen_fd);
out_mutex:
    tcp_tls_free(t);
    pthread_mutex_destroy(&t->mu);
out_free:
    kvf__auth_key_wipe(&t->auth);
    free(t);
    return rc;
}

static uint16_t tcp_port(const kvf_transport_t *t)
{
    return ((const struct tcp_transport *)(const void *)t)->port;
}

static void tcp_destroy(kvf_transport_t *tt)
{
    struct tcp_transport *t = tcp_of(tt);
    if (!t)
        return;
    atomic_store(&t->stopping, true);
    uint64_t one = 1;
    if (write(t->wake_fd, &one, sizeof(one)) < 0)
        KVF_WARN(TCP_LOG, "destroy %s: eventfd: %s", t->listen_str, strerror(errno));
    /* The peers go first: their connections' watches live on the I/O threads. */
    tcp_peer_detach_all(t);
    /* The I/O threads cut every served connection, giving back its region references, before
     * they end: only then may the engine destroy the region table. */
    tcp_pool_stop(t);
    close(t->listen_fd);
    close(t->wake_fd);
    close(t->reap_fd);

    tcp_tls_free(t);
    pthread_mutex_destroy(&t->mu);
    KVF_DEBUG(TCP_LOG, "stopped listening on %s", t->listen_str);
    kvf__auth_key_wipe(&t->auth);
    free(t);
}

/* peer_open and peer_close are in tcp_peer.c, transfer and notify in tcp_xfer.c. */
const struct kvf_transport_ops kvf__tcp_ops = {
    .size = sizeof(struct kvf_transport_ops),
    .name = "tcp",
    .caps = KVF_TCAP_LISTEN | KVF_TCAP_OFFER | KVF_TCAP_NOTIFY,
    .check = KVF_CHECK_TARGET,
    .create = tcp_create,
    .port = tcp_port,
    .destroy = tcp_destroy,
    .start = kvf__transport_nop,
    .stop = kvf__transport_nop,
    .peer_open = tcp_peer_open,
    .peer_close = tcp_peer_close,
    .transfer = tcp_transfer,
    .post = tcp_post_batch,
    .peer_alive = tcp_peer_alive,
    .notify = tcp_notify,
    .regions_gen = kvf__transport_enotsup_gen,
    .regions_read = kvf__transport_enotsup_regions,
    .regions_changed = kvf__transport_nop_regions,
    .regions_published = kvf__transport_nop_published,
    .mem_export = kvf__transport_nop_export,
    .mem_unexport = kvf__transport_nop_unexport,
    .mem_sock = kvf__transport_no_sock,
    .guard_enter = kvf__transport_no_guard_enter,
    .guard_leave = kvf__transport_no_guard_leave,
    .drain = kvf__transport_no_drain,
    .holders = tcp_holders,
};
