/*
 * The store client's connection: connecting (each resolved address, within a deadline, with the
 * dead-peer socket options), reconnecting with backoff, and the state changes when it comes up
 * (leases and watches are restored) or goes down (requests in flight fail).
 */
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/common.h"
#include "store/client.h"

/* ---------------------------------------------------------------------------------------------
 * Connection state (I/O thread, or kvf_store_open() before the thread exists)
 * ------------------------------------------------------------------------------------------- */

void kvf__cli_conn_up_locked(kvf_store_t *st, int fd, kvf_tls_t *tls)
{
    st->fd = fd;
    st->tls = tls;
    st->state = CLI_RESTORING;
    st->broken = false;
    st->conn_gen++;
    st->restore_pending = 0;
    st->last_io_ms = kvf__now_ms();
    st->last_send_ms = st->last_io_ms;
    for (cli_lease_t *l = st->leases; l; l = l->next)
        if (l->state == CLI_LEASE_NEED_GRANT)
            kvf__cli_send_grant_locked(st, l, true);
    for (cli_watch_t *w = st->watches; w; w = w->next)
        if (w->active)
            kvf__cli_send_watch_locked(st, w);
    if (st->restore_pending == 0)
        st->state = CLI_READY;
    pthread_cond_broadcast(&st->cond);
}

/* Close the connection and fail every request in flight with @err / @why. */
void kvf__cli_conn_down_locked(kvf_store_t *st, int err, const char *why)
{
    kvf__tls_free(st->tls);
    st->tls = NULL;
    if (st->fd >= 0) {
        close(st->fd);
        st->fd = -1;
    }
    st->state = CLI_DOWN;
    st->broken = false;
    st->restore_pending = 0;
    st->io_head = st->io_tail = NULL; /* freed with the table below */
    st->probe_wanted = false;
    st->out.len = 0;
    st->out_off = 0;
    if (st->out.cap > CLI_BUF_KEEP_MAX)
        kvf__buf_free(&st->out);
    st->rx.len = 0;
    if (st->rx.cap > CLI_BUF_KEEP_MAX)
        kvf__buf_free(&st->rx);

    for (unsigned b = 0; b < CLI_REQ_BUCKETS; b++) {
        while (st->reqs[b]) {
            cli_req_t *rq = st->reqs[b];
            st->reqs[b] = rq->next;
            rq->next = NULL;
            if (rq->owner == CLI_OWNER_CALLER) {
                rq->err = err;
                snprintf(rq->msg, sizeof(rq->msg), "%s", why);
                rq->done = true;
                pthread_cond_signal(&rq->cond);
            } else {
                kvf__cli_req_free(rq);
            }
        }
    }
    /* Server ids die with the connection. Stopped leases are left to expire; the others are
     * re-granted by kvf__cli_conn_up_locked(). GRANTING leases belong to a caller who is being told
     * its grant failed and removes them. */
    for (cli_watch_t *w = st->watches; w; w = w->next)
        w->sid = 0;
    for (cli_lease_t **pp = &st->leases; *pp;) {
        cli_lease_t *l = *pp;
        if (l->state == CLI_LEASE_STOPPED) {
            *pp = l->next;
            kvf__cli_lease_free(l);
            continue;
        }
        if (l->state != CLI_LEASE_GRANTING) {
            l->state = CLI_LEASE_NEED_GRANT;
            l->sid = 0;
            l->due_ms = 0;
        }
        pp = &l->next;
    }
    pthread_cond_broadcast(&st->cond);
}

/*
 * Let the kernel notice a store host that vanished without FIN or RST: data unacknowledged for
 * request_timeout_ms (at least CLI_TCP_USER_TIMEOUT_MIN_MS, so that one lost segment on a slow
 * link does not kill the connection) aborts it, and an idle connection is probed with TCP
 * keep-alives after about the same time. Requests and keep-alives left unanswered on a
 * connection the kernel still thinks fine are caught by cli_check_alive_locked(). Failures are
 * not fatal: these only speed up detection.
 */
static void cli_set_dead_peer_opts(const kvf_store_t *st, int fd)
{
    uint32_t rt = st->opts.request_timeout_ms;
    int one = 1;
    unsigned user_timeout = rt > CLI_TCP_USER_TIMEOUT_MIN_MS ? rt : CLI_TCP_USER_TIMEOUT_MIN_MS;
    int idle =
        (int)(user_timeout / 1000 > 0 ? (user_timeout / 1000 < 3600 ? user_timeout / 1000 : 3600)
                                      : 1);
    int intvl = 1, cnt = 3;
    if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout)) < 0)
        KVF_DEBUG("store", "%s: setting TCP keep-alive options: %s", st->url, kvf_strerror(-errno));
}

/* Connect to one resolved address within @deadline_ms. Returns the socket or a negative code;
 * -KVF_ECLOSED when @interruptible and the client is closing. */
static int cli_connect_addr(kvf_store_t *st, const struct addrinfo *ai, uint64_t deadline_ms,
                            bool interruptible, kvf_tls_t **tlsp, char *why, size_t whylen)
{
    kvf_tls_t *tls = NULL;
    char hp[KVF_SESSION_ID_MAX];
    kvf__hostport_format(&st->addr.hosts[0], hp, sizeof(hp));
    int rc = -KVF_ESTOREDOWN;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, whylen, "socket: %s", kvf_strerror(-errno));
        return rc;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS && errno != EINTR) {
            snprintf(why, whylen, "connect %.120s: %s", hp, kvf_strerror(-errno));
            goto out_close;
        }
        for (;;) {
            /* Poll at least once even at the deadline: a refusal may already be there, and it
             * says more than "no answer". */
            uint64_t now = kvf__now_ms();
            uint64_t left = deadline_ms > now ? deadline_ms - now : 0;
            struct pollfd p[2] = {{.fd = fd, .events = POLLOUT},
                                  {.fd = interruptible ? st->wake_fd : -1, .events = POLLIN}};
            int n = poll(p, 2, left > INT_MAX ? INT_MAX : (int)left);
            if (n < 0 && errno != EINTR) {
                snprintf(why, whylen, "poll: %s", kvf_strerror(-errno));
                goto out_close;
            }
            if (n == 0 && left == 0) {
                snprintf(why, whylen, "connect %.120s: no answer in time", hp);
                goto out_close;
            }
            if (n <= 0)
                continue;
            if (p[1].revents & POLLIN) {
                cli_drain_wake(st);
                if (cli_is_closing(st)) {
                    rc = -KVF_ECLOSED;
                    goto out_close;
                }
            }
            if (p[0].revents)
                break;
        }
        int err = 0;
        socklen_t elen = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
            err = errno;
        if (err) {
            snprintf(why, whylen, "connect %.120s: %s", hp, kvf_strerror(-err));
            goto out_close;
        }
    }
    /* Requests are small and latency-bound: never let Nagle hold one back. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    cli_set_dead_peer_opts(st, fd);
    if (st->tls_ctx) {
        char reason[CLI_MSG_MAX - 32];
        uint64_t tdl = kvf__now_ms() + KVF_TLS_HANDSHAKE_MS;
        tls = kvf__tls_new(st->tls_ctx, fd);
        if (!tls) {
            snprintf(why, whylen, "TLS: out of memory");
            goto out_close;
        }
        int trc = kvf__tls_connect(tls, tdl < deadline_ms ? tdl : deadline_ms, reason,
                                   sizeof(reason));
        if (trc) {
            snprintf(why, whylen, "TLS handshake with %.120s failed: %s", hp, reason);
            /* A refusal or a failed check is final; only running out of time is not. */
            rc = trc == -KVF_ETIMEDOUT ? -KVF_ESTOREDOWN : -KVF_ETLS;
            goto out_close;
        }
    }
    if (st->auth.len) {
        char reason[160];
        uint64_t adl = kvf__now_ms() + KVF_AUTH_TIMEOUT_MS;
        kvf_stream_t s = {.fd = fd, .tls = tls};
        int arc = kvf__auth_client_stream(&s, &st->auth, st->ident,
                                          adl < deadline_ms ? adl : deadline_ms, KVF_AUTH_STORE_ID,
                                          reason, sizeof(reason));
        if (arc) {
            snprintf(why, whylen, "authentication: %s", reason);
            /* A cut or foreign answer to the handshake is a refusal too, unless time ran out. */
            rc = arc == -KVF_ETIMEDOUT ? -KVF_ESTOREDOWN : -KVF_EAUTH;
            goto out_close;
        }
    }
    *tlsp = tls;
    return fd;

out_close:
    kvf__tls_free(tls);
    close(fd);
    return rc;
}

/* One attempt to connect to the store: resolve its host and try each address. */
int kvf__cli_connect_once(kvf_store_t *st, uint64_t deadline_ms, bool interruptible,
                          kvf_tls_t **tls, char *why, size_t whylen)
{
    *tls = NULL;
    const kvf_hostport_t *hp = &st->addr.hosts[0];
    char port[8];
    snprintf(port, sizeof(port), "%u", (unsigned)hp->port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (hp->kind != KVF_HOST_NAME ? AI_NUMERICHOST : 0);
    struct addrinfo *res = NULL;
    int g = getaddrinfo(hp->host, port, &hints, &res);
    if (g != 0) {
        snprintf(why, whylen, "resolve %.120s: %s", hp->host,
                 g == EAI_SYSTEM ? kvf_strerror(-errno) : gai_strerror(g));
        return -KVF_ESTOREDOWN;
    }
    int rc = -KVF_ESTOREDOWN;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        rc = cli_connect_addr(st, ai, deadline_ms, interruptible, tls, why, whylen);
        if (rc >= 0 || rc == -KVF_ECLOSED || rc == -KVF_EAUTH || rc == -KVF_ETLS)
            break;
    }
    freeaddrinfo(res);
    return rc;
}

/* Sleep @ms on the wake eventfd; returns false when the client is closing. */
static bool cli_backoff_sleep(kvf_store_t *st, uint32_t ms)
{
    uint64_t deadline = kvf__now_ms() + ms;
    for (;;) {
        if (cli_is_closing(st))
            return false;
        uint64_t now = kvf__now_ms();
        if (now >= deadline)
            return true;
        struct pollfd p = {.fd = st->wake_fd, .events = POLLIN};
        if (poll(&p, 1, (int)(deadline - now)) > 0)
            cli_drain_wake(st);
    }
}

/* Reconnect with backoff until connected (returns the fd) or closing (returns -1). */
int kvf__cli_reconnect(kvf_store_t *st, kvf_tls_t **tls)
{
    for (;;) {
        uint32_t wait = st->backoff_ms;
        st->backoff_ms = wait ? (wait * 2 > CLI_BACKOFF_MAX_MS ? CLI_BACKOFF_MAX_MS : wait * 2)
                              : CLI_BACKOFF_MIN_MS;
        if (wait && !cli_backoff_sleep(st, wait))
            return -1;
        char why[CLI_MSG_MAX];
        int fd = kvf__cli_connect_once(st, kvf__now_ms() + CLI_ATTEMPT_MAX_MS, true, tls, why,
                                       sizeof(why));
        if (fd >= 0)
            return fd;
        if (fd == -KVF_ECLOSED)
            return -1;
        KVF_DEBUG("store", "%s: reconnect failed: %s (next try in %u ms)", st->url, why,
                  st->backoff_ms);
        pthread_mutex_lock(&st->mu);
        snprintf(st->last_conn_err, sizeof(st->last_conn_err), "%s", why);
        pthread_mutex_unlock(&st->mu);
    }
}
