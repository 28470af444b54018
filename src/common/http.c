/*
 * The metrics endpoint: a minimal HTTP/1.x responder for Prometheus scrapes (GET /metrics), one
 * thread, one poll() loop, no blocking call on any client's socket. It is meant to be reachable
 * from a network an attacker shares, so everything it holds is bounded: KVF_METRICS_MAX_CONNS
 * connections (a further one is accepted and closed at once, so the backlog cannot fill), a
 * request of KVF_METRICS_MAX_REQUEST bytes at most (larger: 431), and KVF_METRICS_TIMEOUT_MS for
 * a whole exchange from accept to the last byte sent (then the connection is closed). One
 * request per connection (Connection: close); bodies and other methods are not read (405).
 * The body is rendered by the owner's callback only for a complete, valid GET /metrics.
 */
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/common.h"
#include "common/net.h"
#include "common/thread.h"
#include "common/url.h"

#define HTTP_LOG "metrics"

typedef struct {
    int fd; /* -1: free */
    uint64_t deadline;
    size_t got;
    char req[KVF_METRICS_MAX_REQUEST];
    char *out; /* the answer, once the request is complete */
    size_t out_len, sent;
} http_conn_t;

struct kvf_metrics_server {
    int lfd;
    int wake_fd;
    pthread_t thread;
    kvf_metrics_render_cb render;
    void *arg;
    char addr[KVF_SESSION_ID_MAX];
    http_conn_t conns[KVF_METRICS_MAX_CONNS];
};

static void conn_close(http_conn_t *c)
{
    close(c->fd);
    c->fd = -1;
    free(c->out);
    c->out = NULL;
    c->got = c->out_len = c->sent = 0;
}

/* Make the answer: the status line, the headers and @body (@blen bytes). */
static void conn_answer(http_conn_t *c, const char *status, const char *ctype, const char *body,
                        size_t blen)
{
    char head[256];
    int hl = snprintf(head, sizeof(head),
                      "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                      "Connection: close\r\n\r\n",
                      status, ctype, blen);
    c->out = malloc((size_t)hl + blen);
    if (!c->out) {
        c->out_len = 0;
        return;
    }
    memcpy(c->out, head, (size_t)hl);
    if (blen)
        memcpy(c->out + hl, body, blen);
    c->out_len = (size_t)hl + blen;
    c->sent = 0;
}

static void conn_error(http_conn_t *c, const char *status)
{
    char body[96];
    int n = snprintf(body, sizeof(body), "%s\n", status);
    conn_answer(c, status, "text/plain; charset=utf-8", body, (size_t)n);
}

/* The request is complete (its head ended): answer it. */
static void conn_request(kvf_metrics_server_t *m, http_conn_t *c)
{
    /* Request line: METHOD SP TARGET SP HTTP/1.x */
    char *eol = memchr(c->req, '\r', c->got);
    char *sp1 = memchr(c->req, ' ', c->got);
    char *sp2 = sp1 && eol && sp1 < eol ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
    if (!sp2 || (size_t)(eol - sp2 - 1) != 8 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        conn_error(c, "400 Bad Request");
        return;
    }
    if ((size_t)(sp1 - c->req) != 3 || memcmp(c->req, "GET", 3) != 0) {
        conn_error(c, "405 Method Not Allowed");
        return;
    }
    size_t tlen = (size_t)(sp2 - sp1 - 1);
    const char *target = sp1 + 1;
    bool metrics = (tlen == 8 && memcmp(target, "/metrics", 8) == 0) ||
                   (tlen > 8 && memcmp(target, "/metrics?", 9) == 0);
    if (!metrics) {
        conn_error(c, "404 Not Found");
        return;
    }
    char *body = NULL;
    size_t blen = 0;
    int rc = m->render(m->arg, &body, &blen);
    if (rc < 0) {
        KVF_WARN_RATELIMITED(HTTP_LOG, "metrics %s: rendering failed: %s", m->addr,
                             kvf_last_error());
        conn_error(c, "500 Internal Server Error");
    } else {
        conn_answer(c, "200 OK", "text/plain; version=0.0.4; charset=utf-8", body, blen);
    }
    free(body);
}

static void conn_read(kvf_metrics_server_t *m, http_conn_t *c)
{
    ssize_t r = recv(c->fd, c->req + c->got, sizeof(c->req) - c->got, MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        conn_close(c);
        return;
    }
    if (r < 0)
        return;
    size_t from = c->got > 3 ? c->got - 3 : 0;
    c->got += (size_t)r;
    for (size_t i = from; i + 4 <= c->got; i++) {
        if (memcmp(c->req + i, "\r\n\r\n", 4) == 0) {
            conn_request(m, c);
            goto answered;
        }
    }
    if (c->got < sizeof(c->req))
        return;
    conn_error(c, "431 Request Header Fields Too Large");
answered:
    if (!c->out)
        conn_close(c);
}

static void conn_write(http_conn_t *c)
{
    ssize_t r = send(c->fd, c->out + c->sent, c->out_len - c->sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (r <= 0) {
        conn_close(c);
        return;
    }
    c->sent += (size_t)r;
    if (c->sent == c->out_len) {
        shutdown(c->fd, SHUT_WR);
        conn_close(c);
    }
}

static void accept_all(kvf_metrics_server_t *m)
{
    for (int k = 0; k < 64; k++) {
        int fd = accept4(m->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        http_conn_t *c = NULL;
        for (size_t i = 0; i < KVF_METRICS_MAX_CONNS && !c; i++)
            if (m->conns[i].fd < 0)
                c = &m->conns[i];
        if (!c) {
            KVF_WARN_RATELIMITED(HTTP_LOG,
                                 "metrics %s: %u connections already open "
                                 "(KVF_METRICS_MAX_CONNS): closing a new one",
                                 m->addr, KVF_METRICS_MAX_CONNS);
            close(fd);
            continue;
        }
        c->fd = fd;
        c->got = 0;
        c->deadline = kvf__now_ms() + KVF_METRICS_TIMEOUT_MS;
    }
}

static void *metrics_main(void *arg)
{
    kvf_metrics_server_t *m = arg;
    struct pollfd pf[KVF_METRICS_MAX_CONNS + 2];
    http_conn_t *who[KVF_METRICS_MAX_CONNS + 2];
    for (;;) {
        uint64_t now = kvf__now_ms(), next = now + 1000;
        nfds_t n = 0;
        pf[n++] = (struct pollfd){.fd = m->wake_fd, .events = POLLIN};
        pf[n++] = (struct pollfd){.fd = m->lfd, .events = POLLIN};
        for (size_t i = 0; i < KVF_METRICS_MAX_CONNS; i++) {
            http_conn_t *c = &m->conns[i];
            if (c->fd < 0)
                continue;
            if (now >= c->deadline) {
                KVF_LOG_RATELIMITED(KVF_LOG_INFO, HTTP_LOG,
                                    "metrics %s: closing a connection that took over %u ms",
                                    m->addr, KVF_METRICS_TIMEOUT_MS);
                conn_close(c);
                continue;
            }
            if (c->deadline < next)
                next = c->deadline;
            who[n] = c;
            pf[n++] = (struct pollfd){.fd = c->fd, .events = c->out ? POLLOUT : POLLIN};
        }
        int r = poll(pf, n, (int)(next - now));
        if (r < 0 && errno != EINTR)
            break;
        if (r <= 0)
            continue;
        if (pf[0].revents)
            break;
        for (nfds_t i = 2; i < n; i++) {
            if (!pf[i].revents)
                continue;
            if (who[i]->out)
                conn_write(who[i]);
            else
                conn_read(m, who[i]);
        }
        if (pf[1].revents)
            accept_all(m);
    }
    return NULL;
}

int kvf_metrics_server_start(const char *listen, kvf_metrics_render_cb render, void *arg,
                             kvf_metrics_server_t **out)
{
    kvf_hostport_t hp;
    const char *why = "";
    if (!listen || !render || !out)
        return kvf__err(-KVF_EINVAL, "metrics server: NULL argument");
    int rc = kvf__session_id_parse(listen, &hp);
    if (rc < 0)
        return kvf__err_wrap(rc, "metrics listen address");
    kvf_metrics_server_t *m = calloc(1, sizeof(*m));
    if (!m)
        return kvf__err(-KVF_ENOMEM, "metrics server: out of memory");
    for (size_t i = 0; i < KVF_METRICS_MAX_CONNS; i++)
        m->conns[i].fd = -1;
    m->render = render;
    m->arg = arg;
    m->lfd = kvf__tcp_listen(&hp, &why);
    if (m->lfd < 0) {
        rc = kvf__err(m->lfd, "metrics listen address %s: %s", listen, why);
        goto out_free;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    getsockname(m->lfd, (struct sockaddr *)&ss, &sl);
    hp.port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
    kvf__hostport_format(&hp, m->addr, sizeof(m->addr));
    m->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (m->wake_fd < 0) {
        rc = kvf__err(-errno, "metrics server: eventfd: %s", strerror(errno));
        goto out_close;
    }
    rc = kvf__thread_start(&m->thread, "kvf-metrics", 0, metrics_main, m);
    if (rc < 0) {
        kvf__err(rc, "metrics server: starting its thread: %s", strerror(-rc));
        goto out_wake;
    }
    KVF_INFO(HTTP_LOG, "serving metrics on http://%s/metrics", m->addr);
    *out = m;
    return 0;

out_wake:
    close(m->wake_fd);
out_close:
    close(m->lfd);
out_free:
    free(m);
    return rc;
}

const char *kvf_metrics_server_addr(const kvf_metrics_server_t *m)
{
    return m ? m->addr : "";
}

void kvf_metrics_server_stop(kvf_metrics_server_t *m)
{
    if (!m)
        return;
    uint64_t one = 1;
    if (write(m->wake_fd, &one, sizeof(one)) < 0)
        KVF_DEBUG(HTTP_LOG, "metrics %s: waking the thread: %s", m->addr, strerror(errno));
    pthread_join(m->thread, NULL);
    for (size_t i = 0; i < KVF_METRICS_MAX_CONNS; i++)
        if (m->conns[i].fd >= 0)
            conn_close(&m->conns[i]);
    close(m->wake_fd);
    close(m->lfd);
    free(m);
}
