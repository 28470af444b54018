/*
 * A served connection's bytes (tcp.h, struct tcp_sconn): moved plain, with one recvmsg() or
 * sendmsg() over what is left of the current step, or through its TLS session (data TLS), one
 * record at a time straight into or out of the step's buffers; the TLS handshake that starts
 * such a connection; the connection's timers, checked by its I/O thread; and, at its HELLO,
 * which I/O thread is to serve it.
 *
 * A TLS session holds bytes it decrypted and the caller has not taken yet, which the socket's
 * readiness does not show: tcp_sc_run() goes on reading while tcp_sc_pending() says so.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "transport/tcp.h"

const char tcp_sc_slow[] = "frame too slow (no progress for KVF_TCP_STALL_TIMEOUT_MS, below the "
                           "minimum rate, or no hello within KVF_TCP_HELLO_TIMEOUT_MS)";

ssize_t tcp_sc_io(struct tcp_sconn *sc, bool out, char *why, size_t whylen)
{
    if (sc->tls) {
        kvf_stream_t s = {sc->fd, sc->tls};
        struct iovec *v = out ? sc->wp : sc->rp;
        ssize_t r = out ? kvf__stream_send(&s, v->iov_base, v->iov_len, why, whylen)
                        : kvf__stream_recv(&s, v->iov_base, v->iov_len, why, whylen);
        sc->tls_out = r == -EAGAIN && kvf__stream_wants(&s, out) == POLLOUT;
        return r;
    }
    struct msghdr mh = {.msg_iov = out ? sc->wp : sc->rp,
                        .msg_iovlen = (size_t)(out ? sc->wcnt : sc->rcnt)};
    for (;;) {
        ssize_t r = out ? sendmsg(sc->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT)
                        : recvmsg(sc->fd, &mh, MSG_DONTWAIT);
        if (r > 0 || (r == 0 && !out))
            return r;
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return -EAGAIN;
        int err = r < 0 ? errno : EPIPE;
        snprintf(why, whylen, "%s", strerror(err));
        return -err;
    }
}

bool tcp_sc_pending(const struct tcp_sconn *sc)
{
    return sc->tls && kvf__tls_pending(sc->tls);
}

int tcp_sc_tls_accept(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    if (!sc->tls) {
        /* A TLS client's first bytes are a handshake record; anything else is a plain client,
         * answered in its own protocol (need_tls) rather than cut off. */
        uint8_t b;
        ssize_t r = recv(sc->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return 0;
        if (r <= 0) {
            snprintf(why, whylen, "TLS handshake failed: %s",
                     r == 0 ? "the client closed the connection" : strerror(errno));
            *reason = why;
            return -1;
        }
        if (b != KVF_TLS_RECORD_HANDSHAKE) {
            sc->need_tls = true;
            return 1;
        }
        sc->tls = kvf__tls_new(sc->t->tls_srv, sc->fd);
        if (!sc->tls) {
            *reason = "TLS handshake failed: out of memory";
            return -1;
        }
    }
    char r[200];
    int rc = kvf__tls_handshake_step(sc->tls, r, sizeof(r));
    sc->tls_out = rc == 0 && kvf__tls_wants(sc->tls) == POLLOUT;
    if (rc >= 0)
        return rc;
    snprintf(why, whylen, "TLS handshake failed: %s", r);
    *reason = why;
    return -1;
}

/* The HELLO must have arrived within this of the connection's start. */
static uint32_t sc_hello_ms(const struct tcp_sconn *sc)
{
    return sc->t->idle_timeout_ms < KVF_TCP_HELLO_TIMEOUT_MS ? sc->t->idle_timeout_ms
                                                             : KVF_TCP_HELLO_TIMEOUT_MS;
}

int tcp_sc_tick(struct tcp_sconn *sc, uint64_t now, const char **reason, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    bool between = !sc->want_out && sc->step == SC_HDR && sc->got == 0;
    *reason = NULL;
    if (sc->auth && now - sc->start_ms >= KVF_AUTH_TIMEOUT_MS) {
        snprintf(why, whylen, "authentication failed: not done within KVF_AUTH_TIMEOUT_MS (%u ms)",
                 KVF_AUTH_TIMEOUT_MS);
        *reason = why;
        return -1;
    }
    if (!sc->hello_done && now - sc->start_ms >= sc_hello_ms(sc)) {
        if (between) {
            snprintf(why, whylen, "no HELLO within %u ms", sc_hello_ms(sc));
            *reason = why;
        } else {
            *reason = tcp_sc_slow;
        }
        return -1;
    }
    if (between) {
        if (sc->hello_done && now - sc->idle_since >= t->idle_timeout_ms) {
            /* Routine: the initiator reconnects on its next transfer. */
            KVF_LOG_RATELIMITED(KVF_LOG_INFO, TCP_LOG,
                                "closing connection from %s (%s): no request for %u ms "
                                "(idle timeout)",
                                sc->addr, sc->peer_sid, t->idle_timeout_ms);
            return 1;
        }
        return 0;
    }
    if ((sc->deadline_ms && now >= sc->deadline_ms) ||
        now - sc->last_ms >= KVF_TCP_STALL_TIMEOUT_MS) {
        *reason = tcp_sc_slow;
        return -1;
    }
    return 0;
}

void tcp_sc_place_locked(struct tcp_transport *t, struct tcp_sconn *sc)
{
    /* All of a peer's connections on one thread, the peers spread over the threads: a call split
     * over the connections then waits for one thread's turn, whoever sends it (a peer served by
     * one thread while another's calls waited for two got a multiple of its share), and no call
     * waits for two threads. The peer's first connection goes to the thread serving the fewest
     * placed connections, then stays where it is. */
    unsigned mine[KVF_MAX_IO_THREADS] = {0}, load[KVF_MAX_IO_THREADS] = {0};
    for (const struct tcp_sconn *o = t->sconns; o; o = o->next) {
        if (o == sc || !o->placed)
            continue;
        load[o->home->idx]++;
        mine[o->home->idx] += strcmp(o->peer_sid, sc->peer_sid) == 0;
    }
    struct tcp_iothr *best = sc->home;
    for (unsigned i = 0; i < t->nio; i++) {
        unsigned b = best->idx;
        if (mine[i] > mine[b] || (mine[i] == mine[b] && load[i] < load[b]))
            best = &t->io[i];
    }
    sc->home->nconns--;
    best->nconns++;
    sc->home = best;
    sc->placed = true;
}
