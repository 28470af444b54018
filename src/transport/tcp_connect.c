/*
 * Opening an initiator connection of the tcp transport (tcp.h): connect to the peer's address,
 * run the TLS handshake (data TLS) and the secret's handshake (a key), exchange HELLO/RESP, and
 * hand the socket to an I/O thread's watch. A connection being replaced first loses its watch
 * (so that no I/O thread touches the old socket) and then its socket.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/net.h"
#include "common/tls.h"
#include "common/thread.h"
#include "transport/tcp.h"

/* ---------------------------------------------------------------------------------------------
 * Initiator side: connecting
 * ------------------------------------------------------------------------------------------- */

/* Connect to one address and exchange HELLO/RESP (after the TLS handshake, with data TLS, and
 * the secret's handshake, with a key), all before @deadline_ms. Returns the fd, with its TLS
 * session in *@tls (or NULL), or a negative code with @why filled in. */
static int tcp_connect_addr(struct tcp_peer *p, const struct addrinfo *ai, uint64_t deadline_ms,
                            kvf_tls_t **tls, char *why, size_t whylen)
{
    int rc;
    *tls = NULL;
    int fd = kvf__nb_connect(ai, deadline_ms);
    if (fd < 0) {
        snprintf(why, whylen, "connect: %s",
                 fd == -KVF_ETIMEDOUT ? "no answer in time" : strerror(-fd));
        return fd;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    kvf_stream_t st = {fd, NULL};

    if (p->tls) {
        char reason[200];
        uint64_t tdl = kvf__now_ms() + KVF_TLS_HANDSHAKE_MS;
        /* The peer's certificate must name the address its session id gives, unless the
         * options name a server (one name for every engine) or pin a fingerprint. */
        st.tls = kvf__tls_new_for(p->tls, fd, p->addr.host);
        rc = st.tls ? kvf__tls_connect(st.tls, tdl < deadline_ms ? tdl : deadline_ms, reason,
                                       sizeof(reason))
                    : -KVF_ENOMEM;
        if (rc) {
            snprintf(why, whylen, "TLS: %s", st.tls ? reason : "out of memory");
            if (rc != -KVF_ETIMEDOUT)
                rc = rc == -KVF_ENOMEM ? rc : -KVF_ETLS;
            goto out_close;
        }
    }
    if (p->auth.len) {
        char reason[160];
        uint64_t adl = kvf__now_ms() + KVF_AUTH_TIMEOUT_MS;
        rc = kvf__auth_client_stream(&st, &p->auth, p->local_sid,
                                     adl < deadline_ms ? adl : deadline_ms, p->sid, reason,
                                     sizeof(reason));
        if (rc) {
            snprintf(why, whylen, "authentication: %s", reason);
            /* A handshake that was cut or answered in another protocol is as much a refusal of
             * the key as a wrong proof, unless time ran out. */
            if (rc != -KVF_ETIMEDOUT)
                rc = -KVF_EAUTH;
            goto out_close;
        }
    }

    uint8_t frame[KVF_TCP_HDR_LEN + KVF_TCP_MAX_MSG];
    size_t sl = strnlen(p->local_sid, KVF_TCP_MAX_MSG);
    tcp_hdr_encode(frame, KVF_TCP_HELLO, 0, 1, 0, sl);
    memcpy(frame + KVF_TCP_HDR_LEN, p->local_sid, sl);
    rc = kvf__stream_io(&st, frame, KVF_TCP_HDR_LEN + sl, true, deadline_ms);
    if (rc == 0)
        rc = kvf__stream_io(&st, frame, KVF_TCP_HDR_LEN, false, deadline_ms);
    if (rc) {
        snprintf(why, whylen, "hello: %s",
                 rc == -KVF_ETIMEDOUT ? "no answer in time"
                 : rc == -EPIPE       ? "connection closed by the peer"
                                      : kvf_strerror(rc));
        goto out_close;
    }
    tcp_hdr_t h;
    tcp_hdr_decode(frame, &h);
    char bad[96];
    if (kvf__auth_is_magic(frame) || (tcp_hdr_common_ok(&h, bad, sizeof(bad)) &&
                                      h.type == KVF_TCP_RESP && h.status == KVF_EAUTH)) {
        /* The peer wants the cluster secret (its RESP says so), or has one and answered our plain
         * hello with its handshake's refusal. */
        char msg[KVF_TCP_MAX_MSG + 1] = "", text[KVF_TCP_MAX_MSG + 1];
        size_t n = 0;
        if (!kvf__auth_is_magic(frame) && h.len <= KVF_TCP_MAX_MSG &&
            kvf__stream_io(&st, msg, (size_t)h.len, false, deadline_ms) == 0)
            n = (size_t)h.len;
        kvf__printable(text, sizeof(text), msg, n);
        snprintf(why, whylen, "authentication: refused by the peer: %.300s",
                 n ? text : "it requires the cluster secret and this side has no auth key");
        rc = -KVF_EAUTH;
        goto out_close;
    }
    if (tcp_hdr_common_ok(&h, bad, sizeof(bad)) && h.type == KVF_TCP_RESP &&
        h.status == KVF_ETLS) {
        /* The peer wants TLS on data connections, and this side has none for them. */
        char msg[KVF_TCP_MAX_MSG + 1] = "", text[KVF_TCP_MAX_MSG + 1];
        size_t n = h.len <= KVF_TCP_MAX_MSG &&
                           kvf__stream_io(&st, msg, (size_t)h.len, false, deadline_ms) == 0
                       ? (size_t)h.len
                       : 0;
        kvf__printable(text, sizeof(text), msg, n);
        snprintf(why, whylen, "refused by the peer: %.300s", n ? text : "it requires TLS");
        rc = -KVF_ETLS;
        goto out_close;
    }
    if (!tcp_hdr_common_ok(&h, bad, sizeof(bad)) || h.type != KVF_TCP_RESP || h.req_id != 1 ||
        h.status != 0 || h.len != 0) {
        snprintf(why, whylen, "hello: unexpected answer (%s)",
                 h.magic != KVF_TCP_MAGIC ? "not a kvferry tcp endpoint" : "bad RESP");
        rc = -KVF_EPROTO;
        goto out_close;
    }
    /* From here on blocking sends: senders wake every slice to check their deadline; readers
     * never block (MSG_DONTWAIT). A TLS session stays non-blocking: its calls are
     * made under a lock that a blocked send must not hold (tcp_io.c). */
    if (!st.tls) {
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
        tcp_set_timeout(fd, SO_SNDTIMEO, TCP_CLIENT_SLICE_MS);
    }
    *tls = st.tls;
    return fd;

out_close:
    kvf__tls_free(st.tls);
    close(fd);
    return rc;
}

int tcp_conn_open_locked(struct tcp_conn *c, uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    char why[TCP_ADDR_LEN + 128] = "";
    int rc, fd = -1;
    kvf_tls_t *tls = NULL;

    c->state = TCP_CONN_CONNECTING;
    struct tcp_watch *w = c->watch;
    c->watch = NULL;
    pthread_mutex_unlock(&p->mu);

    /* The old socket's handler may be running on its I/O thread; once its watch is deleted it
     * never runs again, and the fd may be closed. */
    tcp_watch_del(w);
    pthread_mutex_lock(&c->send_mu);
    pthread_mutex_lock(&p->mu);
    /* A caller reading its own answer uses the fd without the lock; the break that got us here
     * shut the socket down, so it is on its way out. */
    c->waiters++; /* whoever clears inline_active wakes counted waiters only */
    while (c->inline_active)
        pthread_cond_wait(&c->cv, &p->mu);
    c->waiters--;
    if (c->fd >= 0) {
        tcp_conn_close_fd(c);
        c->gen++;
    }
    c->reader = TCP_READER_NONE;
    c->inline_b = NULL;
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&c->send_mu);

    uint64_t cdl = kvf__now_ms() + p->connect_timeout_ms;
    bool by_deadline = deadline_ms < cdl;
    if (by_deadline)
        cdl = deadline_ms;

    char port[8];
    snprintf(port, sizeof(port), "%u", (unsigned)p->addr.port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (p->addr.kind != KVF_HOST_NAME ? AI_NUMERICHOST : 0);
    int g = getaddrinfo(p->addr.host, port, &hints, &res);
    if (g) {
        snprintf(why, sizeof(why), "resolving %s: %s", p->addr.host,
                 g == EAI_SYSTEM ? strerror(errno) : gai_strerror(g));
        rc = -KVF_EPEERGONE;
    } else {
        rc = -KVF_EPEERGONE;
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
            rc = tcp_connect_addr(p, ai, cdl, &tls, why, sizeof(why));
            if (rc >= 0 || rc == -KVF_ETIMEDOUT || rc == -KVF_EAUTH || rc == -KVF_ETLS)
                break;
        }
        freeaddrinfo(res);
    }
    if (rc >= 0) {
        fd = rc;
        rc = 0;
    } else if (rc == -KVF_ETIMEDOUT && !by_deadline) {
        /* The peer did not answer within connect_timeout_ms: it is not there (as opposed to the
         * transfer running out of time). */
        rc = -KVF_EPEERGONE;
    } else if (rc != -KVF_ETIMEDOUT && rc != -KVF_EAUTH && rc != -KVF_ETLS) {
        rc = -KVF_EPEERGONE;
    }

    pthread_mutex_lock(&c->send_mu);
    pthread_mutex_lock(&p->mu);
    if (rc == 0 && p->closing) {
        snprintf(why, sizeof(why), "transport is closing");
        rc = -KVF_ECLOSED;
    }
    if (rc == 0 && tls && !c->tls_buf && !(c->tls_buf = malloc(TCP_TLS_RECORD))) {
        snprintf(why, sizeof(why), "out of memory");
        rc = -KVF_ENOMEM;
    }
    if (rc == 0) {
        c->fd = fd;
        c->tls = tls;
        c->gen++;
        c->rx_active = -1;
        c->reader = TCP_READER_NONE;
        c->inline_b = NULL;
        c->ep_in = false;
        c->rx_missed = false;
        c->rx_state = TCP_RX_HDR;
        c->rx_got = 0;
        /* An I/O thread watches it from now on: for the peer closing it while idle, and for
         * answers whenever it holds the reader role. */
        int wrc = tcp_watch_add(p->t, fd, EPOLLRDHUP | EPOLLET, tcp_rx_event, c, &c->watch);
        if (wrc) {
            snprintf(why, sizeof(why), "watching the socket: %s", kvf_strerror(wrc));
            rc = wrc;
            c->fd = -1;
            c->tls = NULL;
            c->gen++;
        }
    }
    if (rc && fd >= 0 && c->fd != fd) {
        kvf__tls_free(tls);
        close(fd);
    }
    c->state = rc ? TCP_CONN_DOWN : TCP_CONN_UP;
    c->idle_since_ms = kvf__now_ms();
    pthread_mutex_unlock(&c->send_mu);
    pthread_cond_broadcast(&c->cv);
    if (rc)
        return kvf__err(rc, "tcp connect to %s (%s): %s", p->sid, p->addr_str, why);
    KVF_DEBUG(TCP_LOG, "connection %u to %s (%s) up", c->idx, p->sid, p->addr_str);
    return 0;
}
