/*
 * The built-in config store server (tcp://): the loop thread, start and stop, and the public
 * kvf_store_server_* functions. server.h describes the files below this one and the rules that
 * keep the loop safe.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <search.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/net.h"
#include "common/thread.h"
#include "store/server.h"
#include "store/server_internal.h"

/* ---- the loop -------------------------------------------------------------------------------- */

static void timers_run(struct kvf_store_server *srv)
{
    while (srv->heap_len && srv->heap[0]->deadline_ms <= srv->now_ms) {
        struct srv_timer *t = srv->heap[0];
        kvf__srv_timer_disarm(srv, t);
        switch (t->kind) {
        case SRV_TIMER_WAITER: {
            struct srv_waiter *w = SRV_CONTAINER(t, struct srv_waiter, timer);
            kvf__srv_reply_err_to(srv, w->conn, KVF_STORE_OP_GET, w->req_id, KVF_STORE_ST_TIMEOUT,
                                  "key still absent after the wait");
            kvf__srv_waiter_free(srv, w, true);
            break;
        }
        case SRV_TIMER_LEASE: {
            struct srv_lease *lease = SRV_CONTAINER(t, struct srv_lease, timer);
            KVF_DEBUG(SRV_LOG, "lease %" PRIu64 " expired", lease->id);
            kvf__srv_lease_end(srv, lease);
            break;
        }
        case SRV_TIMER_PARTIAL: {
            struct srv_conn *c = SRV_CONTAINER(t, struct srv_conn, partial);
            kvf__srv_conn_close_warn(
                srv, c, "partial frame (%zu bytes) not completed within %" PRIu64 " ms", c->in_len,
                srv->partial_timeout_ms);
            break;
        }
        case SRV_TIMER_QUIET:
            kvf__srv_conn_quiet(srv, SRV_CONTAINER(t, struct srv_conn, quiet));
            break;
        case SRV_TIMER_AUTH: {
            struct srv_conn *c = SRV_CONTAINER(t, struct srv_conn, auth_timer);
            if (c->tls && (c->tls_hs || !c->tls_sniffed))
                kvf__srv_conn_close_warn(srv, c, "TLS handshake failed: not done within %u ms",
                                         KVF_TLS_HANDSHAKE_MS);
            else
                kvf__srv_conn_close_warn(srv, c, "authentication failed: no handshake within %u ms",
                                         KVF_AUTH_TIMEOUT_MS);
            break;
        }
        }
    }
    if (srv->accept_paused && srv->accept_resume_ms <= srv->now_ms)
        kvf__srv_accept_pause(srv, false);
}

/* epoll_wait() timeout: until the nearest deadline, or forever. */
static int loop_timeout(struct kvf_store_server *srv)
{
    uint64_t next = UINT64_MAX;
    if (srv->heap_len)
        next = srv->heap[0]->deadline_ms;
    if (srv->accept_paused && srv->accept_resume_ms < next)
        next = srv->accept_resume_ms;
    if (!link_empty(&srv->tls_ready))
        return 0;
    if (next == UINT64_MAX)
        return -1;
    uint64_t now = kvf__now_ms();
    if (next <= now)
        return 0;
    return next - now > INT32_MAX ? INT32_MAX : (int)(next - now);
}

/* Shutdown: answer pending get-with-wait requests with SHUTTING_DOWN, push out what the sockets
 * take without blocking, then close every connection. */
static void conns_close_all(struct kvf_store_server *srv)
{
    srv->stopping = true;
    for (struct srv_link *l = srv->conns.next; l != &srv->conns; l = l->next) {
        struct srv_conn *c = SRV_CONTAINER(l, struct srv_conn, link);
        while (!link_empty(&c->waiters)) {
            struct srv_waiter *w = SRV_CONTAINER(c->waiters.next, struct srv_waiter, conn_link);
            kvf__srv_reply_err_to(srv, c, KVF_STORE_OP_GET, w->req_id, KVF_STORE_ST_SHUTTING_DOWN,
                                  "store server is shutting down");
            kvf__srv_waiter_free(srv, w, true);
        }
    }
    kvf__srv_dirty_flush(srv);
    while (!link_empty(&srv->conns))
        kvf__srv_conn_kill(srv, SRV_CONTAINER(srv->conns.next, struct srv_conn, link));
    kvf__srv_zombies_free(srv);
}

static void *loop_main(void *arg)
{
    struct kvf_store_server *srv = arg;
    struct epoll_event evs[SRV_EPOLL_EVENTS];
    bool stop = false;
    int rc = 0;

    while (!stop) {
        int n = epoll_wait(srv->epfd, evs, SRV_EPOLL_EVENTS, loop_timeout(srv));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            KVF_ERROR(SRV_LOG, "%s: epoll_wait: %s; stopping", srv->url, strerror(errno));
            break;
        }
        srv->now_ms = kvf__now_ms();
        for (int i = 0; i < n; i++) {
            void *tag = evs[i].data.ptr;
            if (tag == &srv->listen_fd)
                kvf__srv_accept_all(srv);
            else if (tag == &srv->evfd)
                stop = true;
            else
                kvf__srv_conn_on_events(srv, tag, evs[i].events);
        }
        kvf__srv_tls_ready_run(srv);
        timers_run(srv);
        kvf__srv_dirty_flush(srv);
        kvf__srv_zombies_free(srv);
    }
    conns_close_all(srv);
    KVF_INFO(SRV_LOG, "%s stopped", srv->url);

    pthread_mutex_lock(&srv->mu);
    srv->done = true;
    srv->loop_rc = rc;
    pthread_cond_broadcast(&srv->cond);
    pthread_mutex_unlock(&srv->mu);
    return NULL;
}

/* ---- start and stop -------------------------------------------------------------------------- */

static uint64_t partial_timeout_from_env(void)
{
    const char *s = getenv(SRV_PARTIAL_TIMEOUT_ENV);
    if (!s || !*s)
        return KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || s[0] < '0' || s[0] > '9' || v < 1 || v > SRV_PARTIAL_TIMEOUT_MAX_MS) {
        KVF_WARN(SRV_LOG, "ignoring %s: not a number of ms in 1..%u; using %u",
                 SRV_PARTIAL_TIMEOUT_ENV, SRV_PARTIAL_TIMEOUT_MAX_MS,
                 KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS);
        return KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS;
    }
    return v;
}

static uint64_t random_u64(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) == (ssize_t)sizeof(v))
        return v;
    /* No entropy yet (early boot): the clock still differs from a previous run. */
    uint64_t pid = (uint64_t)(unsigned)getpid();
    return (kvf__now_ns() * UINT64_C(0x9E3779B97F4A7C15)) ^ pid;
}

/* Bind and listen on @hp. Returns the listening fd or -errno (last-error set). */
static int listen_on(const char *url, const kvf_hostport_t *hp)
{
    const char *why;
    int fd = kvf__tcp_listen(hp, &why);
    if (fd < 0)
        return kvf__err(fd, "store listen %s: %s", url, why);
    return fd;
}

static int url_from_socket(struct kvf_store_server *srv, const char *url)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char hp[KVF_SESSION_ID_MAX];

    if (getsockname(srv->listen_fd, (struct sockaddr *)&ss, &sl) < 0)
        return kvf__err(-errno, "store listen %s: getsockname: %s", url, strerror(errno));
    kvf__srv_sockaddr_format(&ss, hp, sizeof(hp));
    snprintf(srv->url, sizeof(srv->url), "tcp://%s", hp);
    return 0;
}

static int epoll_add(int epfd, int fd, void *tag)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = tag};
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

void kvf_store_server_opts_init(kvf_store_server_opts_t *opts)
{
    if (opts)
        kvf__srv_opts_default(opts);
}

int kvf_store_server_start(const char *listen_url, kvf_store_server_t **out)
{
    return kvf_store_server_start_opts(listen_url, NULL, out);
}

int kvf_store_server_start_opts(const char *listen_url, const kvf_store_server_opts_t *opts,
                                kvf_store_server_t **out)
{
    kvf_store_url_t u;
    struct kvf_store_server *srv;
    int rc;

    if (!out)
        return kvf__err(-KVF_EINVAL, "store listen: no output handle");
    *out = NULL;
    if (!listen_url)
        return kvf__err(-KVF_EINVAL, "store listen: URL is NULL");
    if (opts) {
        rc = kvf__srv_opts_check(opts);
        if (rc < 0)
            return rc;
    }
    rc = kvf__store_url_parse(listen_url, 1, &u);
    if (rc < 0)
        return rc;
    if (u.scheme != KVF_STORE_SCHEME_TCP)
        return kvf__err(-KVF_EINVAL, "store listen %s: the built-in store serves tcp:// URLs only",
                        listen_url);

    srv = calloc(1, sizeof(*srv));
    if (!srv)
        return kvf__err(-KVF_ENOMEM, "store listen %s: out of memory", listen_url);
    srv->epfd = -1;
    srv->evfd = -1;
    link_init(&srv->conns);
    link_init(&srv->zombies);
    link_init(&srv->dirty);
    link_init(&srv->watches);
    link_init(&srv->tls_ready);
    if (opts)
        srv->opts = *opts;
    else
        kvf__srv_opts_default(&srv->opts);
    srv->opts.size = sizeof(srv->opts);
    srv->partial_timeout_ms = partial_timeout_from_env();
    srv->next_lease_id = random_u64();
    srv->now_ms = kvf__now_ms();
    srv->stats.started_ms = srv->now_ms;
    rc = kvf__auth_key_resolve(srv->opts.auth_key_file, &srv->auth_key);
    if (rc == 0)
        rc = kvf__auth_admin_key_resolve(srv->opts.admin_key_file, &srv->admin_key);
    kvf_tls_opts_t tls_env;
    const kvf_tls_opts_t *tls = kvf__tls_opts_resolve(srv->opts.tls, &tls_env);
    if (rc == 0 && tls)
        rc = kvf__tls_ctx_new(tls, true, NULL, &srv->tls_ctx);
    srv->opts.auth_key_file = NULL; /* the caller's strings; not kept */
    srv->opts.admin_key_file = NULL;
    srv->opts.tls = NULL;
    if (rc == 0 && srv->admin_key.len && !srv->auth_key.len)
        rc = kvf__err(-KVF_EINVAL, "an admin key needs an auth key: without the cluster secret "
                                   "nothing is authenticated and there is nothing to administer");
    if (rc < 0) {
        kvf__err_wrap(rc, "store listen %s", listen_url);
        goto out_free;
    }

    rc = listen_on(listen_url, &u.hosts[0]);
    if (rc < 0)
        goto out_free;
    srv->listen_fd = rc;
    rc = url_from_socket(srv, listen_url);
    if (rc < 0)
        goto out_close_listen;

    srv->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (srv->epfd < 0) {
        rc = kvf__err(-errno, "store listen %s: epoll_create1: %s", listen_url, strerror(errno));
        goto out_close_listen;
    }
    srv->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (srv->evfd < 0) {
        rc = kvf__err(-errno, "store listen %s: eventfd: %s", listen_url, strerror(errno));
        goto out_close_epoll;
    }
    rc = epoll_add(srv->epfd, srv->listen_fd, &srv->listen_fd);
    if (rc == 0)
        rc = epoll_add(srv->epfd, srv->evfd, &srv->evfd);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: epoll_ctl: %s", listen_url, strerror(-rc));
        goto out_close_eventfd;
    }

    rc = -pthread_mutex_init(&srv->mu, NULL);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: pthread_mutex_init: %s", listen_url, strerror(-rc));
        goto out_close_eventfd;
    }
    rc = -pthread_cond_init(&srv->cond, NULL);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: pthread_cond_init: %s", listen_url, strerror(-rc));
        goto out_destroy_mutex;
    }

    /* The loop thread blocks every signal, so that SIGINT/SIGTERM reach the application's
     * handler (which may call kvf_store_server_shutdown()) on its own threads. */
    rc = kvf__thread_start(&srv->thread, "kvf-store-srv", 0, loop_main, srv);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: pthread_create: %s", listen_url, strerror(-rc));
        goto out_destroy_cond;
    }

    KVF_INFO(SRV_LOG, "listening on %s%s%s", srv->url, srv->tls_ctx ? " with TLS" : "",
             srv->auth_key.len ? " (clients must prove the cluster secret)" : "");
    if (!srv->auth_key.len && !kvf__hostport_is_loopback(&u.hosts[0]))
        KVF_WARN(SRV_LOG,
                 "store %s listens on a non-loopback address without an auth key: anyone who "
                 "can reach it can read, change and delete every record (set an auth key file: "
                 "docs/security.md)",
                 srv->url);
    *out = srv;
    return 0;

out_destroy_cond:
    pthread_cond_destroy(&srv->cond);
out_destroy_mutex:
    pthread_mutex_destroy(&srv->mu);
out_close_eventfd:
    close(srv->evfd);
out_close_epoll:
    close(srv->epfd);
out_close_listen:
    close(srv->listen_fd);
out_free:
    kvf__auth_key_wipe(&srv->auth_key);
    kvf__auth_key_wipe(&srv->admin_key);
    kvf__tls_ctx_free(srv->tls_ctx);
    free(srv);
    return rc;
}

const char *kvf_store_server_url(const kvf_store_server_t *srv)
{
    return srv ? srv->url : "";
}

void kvf_store_server_shutdown(kvf_store_server_t *srv)
{
    if (!srv)
        return;
    /* Only write(2) here: this runs in signal handlers. errno is restored for the interrupted
     * code. */
    int saved = errno;
    uint64_t one = 1;
    ssize_t n = write(srv->evfd, &one, sizeof(one));
    (void)n;
    errno = saved;
}

int kvf_store_server_wait(kvf_store_server_t *srv)
{
    if (!srv)
        return kvf__err(-KVF_EINVAL, "store server is NULL");
    pthread_mutex_lock(&srv->mu);
    while (!srv->done)
        pthread_cond_wait(&srv->cond, &srv->mu);
    int rc = srv->loop_rc;
    pthread_mutex_unlock(&srv->mu);
    return rc;
}

void kvf_store_server_stop(kvf_store_server_t *srv)
{
    if (!srv)
        return;
    kvf_store_server_shutdown(srv);
    pthread_join(srv->thread, NULL);

    /* The loop closed every connection (and with them every waiter and watch) before exiting;
     * what is left is the data. */
    tdestroy(srv->kv_root, kvf__srv_entry_free);
    tdestroy(srv->lease_root, kvf__srv_lease_free);
    tdestroy(srv->waitkey_root, free); /* empty: waiters went with their connections */
    tdestroy(srv->client_root, free);
    free(srv->heap);
    close(srv->evfd);
    close(srv->epfd);
    close(srv->listen_fd);
    pthread_cond_destroy(&srv->cond);
    pthread_mutex_destroy(&srv->mu);
    kvf__auth_key_wipe(&srv->auth_key);
    kvf__auth_key_wipe(&srv->admin_key);
    kvf__tls_ctx_free(srv->tls_ctx);
    free(srv);
}

unsigned kvf__store_server_waiters(const kvf_store_server_t *srv)
{
    return srv ? atomic_load(&srv->nwaiters) : 0u;
}

int kvf_store_server_stats(const kvf_store_server_t *srv, kvf_store_server_stats_t *out)
{
    if (!srv || !out)
        return kvf__err(-KVF_EINVAL, "store server stats: NULL argument");
    kvf_store_server_stats_t *o = out;
    struct kvf_store_server *s = (struct kvf_store_server *)srv;
    memset(o, 0, sizeof(*o));
    o->size = sizeof(*o);
    o->uptime_ms = kvf__now_ms() - s->stats.started_ms;
    o->clients = atomic_load_explicit(&s->stats.clients, memory_order_relaxed);
    o->keys = atomic_load_explicit(&s->stats.keys, memory_order_relaxed);
    o->leases = atomic_load_explicit(&s->stats.leases, memory_order_relaxed);
    o->waiters = atomic_load(&s->nwaiters);
    o->ops = atomic_load_explicit(&s->stats.ops, memory_order_relaxed);
    o->bytes_in = atomic_load_explicit(&s->stats.bytes_in, memory_order_relaxed);
    o->bytes_out = atomic_load_explicit(&s->stats.bytes_out, memory_order_relaxed);
    return 0;
}
