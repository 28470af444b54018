/*
 * One initiator connection of the tcp transport (struct tcp_conn, tcp.h): the slot table of its
 * requests in flight and how a request ends (answered, failed, given up), breaking the
 * connection, its receiver thread and the reading of answers (by whoever holds the reader
 * role), and (re)connecting it with a HELLO. The locking rules are in tcp.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/net.h"
#include "common/tls.h"
#include "common/thread.h"
#include "transport/tcp.h"

/* ---------------------------------------------------------------------------------------------
 * Initiator side: slots and batches (all under peer->mu)
 * ------------------------------------------------------------------------------------------- */

void tcp_batch_fail(struct tcp_batch *b, int code, const char *fmt, ...)
{
    if (atomic_load_explicit(&b->rc, memory_order_relaxed) != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->msg, sizeof(b->msg), fmt, ap);
    va_end(ap);
    atomic_store(&b->rc, code);
}

void tcp_slot_finish(struct tcp_conn *c, unsigned idx)
{
    struct tcp_slot *s = &c->slots[idx];
    struct tcp_batch *b = s->batch;
    for (size_t k = s->elem; b->left && k < s->elem + s->nelem; k++)
        if (--b->left[k] == 0 && b->status[k] == KVF_XFER_PENDING)
            b->status[k] = 0;
    s->req_id = 0;
    s->batch = NULL;
    c->free_slots[c->nfree++] = (uint16_t)idx;
    if (c->nfree == KVF_TCP_MAX_INFLIGHT)
        c->idle_since_ms = kvf__now_ms();
    if (c->waiters)
        pthread_cond_broadcast(&c->cv);
    if (--b->outstanding == 0 && b->waiting)
        pthread_cond_signal(&b->cv);
}

void tcp_slot_fail(struct tcp_conn *c, unsigned idx, int code, const char *why)
{
    struct tcp_slot *s = &c->slots[idx];
    struct tcp_batch *b = s->batch;
    /* A refused WRITEV wrote none of its elements: the one the target named failed, the others
     * never started. Any other failure applies to all the slot carries. */
    size_t bad = s->refused < s->nelem ? s->elem + s->refused : s->elem;
    const kvf_xfer_t *x = &b->x[bad];
    tcp_batch_fail(b, code, "tcp %s to %s, element %zu [0x%" PRIx64 ", +%zu): %s",
                   tcp_op_name(s->op), c->peer->sid, bad, x->remote, x->len, why);
    for (size_t k = s->elem; b->status && k < s->elem + s->nelem; k++)
        if (b->status[k] >= 0)
            b->status[k] = s->refused < s->nelem && k != bad ? -KVF_ECANCELED : code;
    tcp_slot_finish(c, idx);
}

void tcp_rx_wake(struct tcp_conn *c)
{
    uint64_t one = 1;
    if (c->wake_fd >= 0 && write(c->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        KVF_DEBUG(TCP_LOG, "connection %u: waking the receiver: %s", c->idx, strerror(errno));
}

/*
 * Reset @fd at once: its send queue is dropped and an RST sent. shutdown() alone would send the
 * queue, then a FIN: after a transfer timed out (a cut link, a stalled target) the target could
 * still receive, and write into its memory, bytes of a call that has returned with an error,
 * whenever the path comes back. connect(AF_UNSPEC) disconnects a TCP socket while it stays open
 * (the receiver may still be in recv() on it); SO_LINGER 0 makes the final close() a reset too.
 */
void tcp_fd_abort(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    struct sockaddr sa = {.sa_family = AF_UNSPEC};
    if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) < 0)
        KVF_DEBUG(TCP_LOG, "SO_LINGER 0: %s", strerror(errno));
    if (connect(fd, &sa, sizeof(sa)) < 0)
        KVF_DEBUG(TCP_LOG, "disconnect (connect AF_UNSPEC): %s", strerror(errno));
}

void tcp_conn_break_locked(struct tcp_conn *c, uint64_t gen, int code, const char *why)
{
    if (c->gen != gen)
        return;
    unsigned in_flight = 0;
    for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++)
        in_flight += c->slots[i].req_id != 0;
    /* Requests in flight: nothing of theirs may arrive after they are failed. */
    if (in_flight && c->fd >= 0)
        tcp_fd_abort(c->fd);
    if (c->state == TCP_CONN_UP) {
        c->state = TCP_CONN_BROKEN;
        /* An idle connection closed by a peer that shut down is routine; a break that fails
         * requests in flight is worth a warning. */
        if (code == -KVF_ECLOSED)
            KVF_DEBUG(TCP_LOG, "connection %u to %s closed", c->idx, c->peer->sid);
        else if (in_flight == 0)
            KVF_INFO(TCP_LOG, "connection %u to %s closed while idle: %s", c->idx, c->peer->sid,
                     why);
        else
            KVF_WARN_RATELIMITED(TCP_LOG,
                                 "connection %u to %s broke with %u request(s) in flight: %s",
                                 c->idx, c->peer->sid, in_flight, why);
    }
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    tcp_rx_wake(c);
    char msg[TCP_ERRMSG_LEN];
    /* A long reason is cut; the start names the connection and the peer. */
    if (snprintf(msg, sizeof(msg), "connection %u to %s broke: %s", c->idx, c->peer->addr_str,
                 why) >= (int)sizeof(msg))
        KVF_DEBUG(TCP_LOG, "connection %u: break reason cut to %zu bytes", c->idx, sizeof(msg) - 1);
    for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++)
        if (c->slots[i].req_id && (int)i != c->rx_active)
            tcp_slot_fail(c, i, code, msg);
    pthread_cond_broadcast(&c->cv);
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: the receiver thread of one connection
 * ------------------------------------------------------------------------------------------- */

/* Read and drop @len bytes (an answer nobody waits for any more: its request timed out). */
static int tcp_rx_drain(struct tcp_conn *c, uint64_t len)
{
    while (len > 0) {
        size_t n = len < TCP_SCRATCH_LEN ? (size_t)len : TCP_SCRATCH_LEN;
        int rc = tcp_conn_recv(c, c->scratch, n, 0);
        if (rc)
            return rc;
        len -= n;
    }
    return 0;
}

int tcp_rx_one(struct tcp_conn *c, char *why, size_t whylen, const struct tcp_batch *self,
               uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    uint8_t hbuf[KVF_TCP_HDR_LEN];
    char msg[KVF_TCP_MAX_MSG + 1];
    int rc;

    tcp_hdr_t h;
    rc = tcp_conn_recv(c, hbuf, sizeof(hbuf), deadline_ms);
    if (rc) {
        snprintf(why, whylen, "%s",
                 rc == -EPIPE ? "connection closed by the peer" : kvf_strerror(rc));
        return -1;
    }
    tcp_hdr_decode(hbuf, &h);
    if (!tcp_hdr_common_ok(&h, msg, sizeof(msg)) || h.type != KVF_TCP_RESP) {
        if (h.type != KVF_TCP_RESP && h.magic == KVF_TCP_MAGIC)
            snprintf(msg, sizeof(msg), "frame type %u where an answer was expected",
                     (unsigned)h.type);
        snprintf(why, whylen, "bad frame from the peer: %s", msg);
        return -1;
    }
    if (h.status != 0 && h.len > KVF_TCP_MAX_MSG) {
        snprintf(why, whylen,
                 "bad frame from the peer: error message of %" PRIu64 " bytes over KVF_TCP_MAX_MSG",
                 h.len);
        return -1;
    }
    if (h.len > KVF_TCP_MAX_CHUNK) {
        snprintf(why, whylen, "bad frame from the peer: length %" PRIu64 " over KVF_TCP_MAX_CHUNK",
                 h.len);
        return -1;
    }

    unsigned idx = (unsigned)(h.req_id & (KVF_TCP_MAX_INFLIGHT - 1));
    struct tcp_slot *s = &c->slots[idx];

    if (h.status != 0) {
        /* The message first, without the lock; then find the request again (it may have
         * been given up meanwhile: its req_id is then free or different). */
        rc = tcp_conn_recv(c, msg, (size_t)h.len, deadline_ms);
        if (rc) {
            snprintf(why, whylen, "%s", kvf_strerror(rc));
            return -1;
        }
        kvf__printable(msg, (size_t)h.len + 1, msg, (size_t)h.len);
        int code = h.status < 65536 ? -(int)h.status : -KVF_EPROTO;
        pthread_mutex_lock(&p->mu);
        if (s->req_id == h.req_id) {
            char m2[TCP_ERRMSG_LEN];
            if (s->op == KVF_TCP_WRITEV && h.addr < s->nelem)
                s->refused = (uint32_t)h.addr;
            snprintf(m2, sizeof(m2), "refused by the target: %s", msg);
            tcp_slot_fail(c, idx, code, m2);
        }
        pthread_mutex_unlock(&p->mu);
        return 0;
    }

    pthread_mutex_lock(&p->mu);
    if (s->req_id != h.req_id) {
        pthread_mutex_unlock(&p->mu);
        rc = tcp_rx_drain(c, h.len);
        if (rc) {
            snprintf(why, whylen, "%s", kvf_strerror(rc));
            return -1;
        }
        return 0;
    }
    uint8_t op = s->op;
    uint64_t want = op == KVF_TCP_READ ? s->len : 0;
    if (h.len != want) {
        pthread_mutex_unlock(&p->mu);
        snprintf(why, whylen,
                 "bad frame from the peer: answer of %" PRIu64 " bytes to a %s of %" PRIu64, h.len,
                 tcp_op_name(op), want);
        return -1;
    }
    if (want == 0) {
        tcp_slot_finish(c, idx);
        pthread_mutex_unlock(&p->mu);
        return 0;
    }
    /* A READ answer goes straight into the caller's buffer, outside the lock. rx_active tells
     * a caller that gives up on this request to cut the connection and wait for us, rather
     * than return while we may still write into its memory. */
    c->rx_active = (int)idx;
    uint8_t *dst = s->local;
    uint64_t dl = s->batch == self ? deadline_ms : 0;
    pthread_mutex_unlock(&p->mu);
    rc = tcp_conn_recv(c, dst, (size_t)want, dl);
    pthread_mutex_lock(&p->mu);
    c->rx_active = -1;
    if (rc) {
        snprintf(why, whylen, "%s in the middle of a read answer",
                 rc == -EPIPE           ? "connection closed"
                 : rc == -KVF_ETIMEDOUT ? "timed out"
                                        : kvf_strerror(rc));
        tcp_slot_fail(c, idx, rc == -KVF_ETIMEDOUT ? rc : -KVF_EPEERGONE, why);
    } else {
        tcp_slot_finish(c, idx);
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&p->mu);
    if (rc)
        return -1;
    return 0;
}

/*
 * The receiver thread of one connection. While it holds the reader role it reads answers;
 * otherwise it watches the socket for the peer closing it (so an idle connection the peer closed,
 * for its idle timeout or because it went away, is marked broken and the next transfer
 * reconnects), and its eventfd for role changes. It ends when the connection breaks or is
 * replaced.
 *
 * It watches while a caller reads for itself (INLINE) too: that caller gives the role back
 * without waking it (no system call per transfer), so a receiver that stopped watching then
 * would miss a close until the next transfer failed on it. A close seen while a caller reads is
 * that caller's to read; the receiver waits for the role to change.
 */
static void *tcp_rx_main(void *arg)
{
    struct tcp_conn *c = arg;
    struct tcp_peer *p = c->peer;
    const uint64_t gen = c->rx_gen;
    const int fd = c->fd, wfd = c->wake_fd; /* both stay open until this thread is joined */
    char why[TCP_ERRMSG_LEN];

    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (c->gen != gen || c->state != TCP_CONN_UP) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        if (c->reader == TCP_READER_RX) {
            pthread_mutex_unlock(&p->mu);
            int rc = tcp_rx_one(c, why, sizeof(why), NULL, 0);
            pthread_mutex_lock(&p->mu);
            if (rc)
                break;
            if (c->reader == TCP_READER_RX && tcp_conn_busy(c) == 0)
                c->reader = TCP_READER_NONE;
            continue;
        }
        pthread_mutex_unlock(&p->mu);
        struct pollfd pf[2] = {{wfd, POLLIN, 0}, {fd, POLLRDHUP, 0}};
        int pr = poll(pf, 2, -1);
        uint64_t v;
        if (pr > 0 && (pf[0].revents & POLLIN) && read(wfd, &v, sizeof(v)) < 0)
            v = 0;
        pthread_mutex_lock(&p->mu);
        if (pr <= 0 || !pf[1].revents)
            continue;
        /* The peer closed, reset, or sent something unasked: read what is there. */
        if (c->reader == TCP_READER_NONE) {
            c->reader = TCP_READER_RX;
            continue;
        }
        /* A caller is reading: it meets the close itself, or gives the role back (its reads
         * broadcast cv). The close stays pending on the socket, so polling again now would
         * spin; the timeout only bounds a missed wake-up. */
        c->waiters++;
        while (c->reader == TCP_READER_INLINE && c->gen == gen && c->state == TCP_CONN_UP)
            if (!kvf__cond_wait_until(&c->cv, &p->mu, kvf__now_ms() + 100))
                break;
        c->waiters--;
    }
    tcp_conn_break_locked(c, gen, p->closing ? -KVF_ECLOSED : -KVF_EPEERGONE, why);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

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
    /* From here on blocking I/O: senders wake every slice to check their deadline; the
     * receiver blocks until data or shutdown(). A TLS session stays non-blocking: its calls are
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
    bool join = c->rx_started;
    c->rx_started = false;
    pthread_mutex_unlock(&p->mu);

    /* A broken connection's receiver has been woken by shutdown(); let it finish before its fd is
     * closed. */
    if (join)
        pthread_join(c->rx_thread, NULL);
    pthread_mutex_lock(&c->send_mu);
    pthread_mutex_lock(&p->mu);
    /* A caller reading its own answer uses the fd without the lock; the break that got us here
     * shut the socket down, so it is on its way out. */
    while (c->inline_active)
        pthread_cond_wait(&c->cv, &p->mu);
    if (c->fd >= 0) {
        tcp_conn_close_fd(c);
        c->gen++;
    }
    if (c->wake_fd >= 0) {
        close(c->wake_fd);
        c->wake_fd = -1;
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
    if (rc == 0) {
        c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (c->wake_fd < 0) {
            snprintf(why, sizeof(why), "eventfd: %s", strerror(errno));
            rc = -errno;
        }
    }
    if (rc == 0 && tls && !c->tls_buf && !(c->tls_buf = malloc(TCP_TLS_RECORD))) {
        snprintf(why, sizeof(why), "out of memory");
        rc = -KVF_ENOMEM;
    }
    if (rc == 0) {
        c->fd = fd;
        c->tls = tls;
        c->gen++;
        c->rx_gen = c->gen;
        c->rx_active = -1;
        c->reader = TCP_READER_NONE;
        c->inline_b = NULL;
        int prc =
            kvf__thread_start(&c->rx_thread, "kvf-tcp-rx", KVF_THREAD_SMALL_STACK, tcp_rx_main, c);
        if (prc) {
            snprintf(why, sizeof(why), "receiver thread: %s", strerror(-prc));
            rc = prc;
            c->fd = -1;
            c->tls = NULL;
            c->gen++;
            close(c->wake_fd);
            c->wake_fd = -1;
        } else {
            c->rx_started = true;
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

/* ---------------------------------------------------------------------------------------------
 * Initiator side: a connection's lifetime
 * ------------------------------------------------------------------------------------------- */

int tcp_conn_init(struct tcp_peer *p, struct tcp_conn *c, unsigned idx)
{
    int rc;
    c->peer = p;
    c->idx = idx;
    c->fd = -1;
    c->wake_fd = -1;
    c->rx_active = -1;
    c->state = TCP_CONN_DOWN;
    for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++)
        c->free_slots[i] = (uint16_t)(KVF_TCP_MAX_INFLIGHT - 1 - i);
    c->nfree = KVF_TCP_MAX_INFLIGHT;
    c->scratch = malloc(TCP_SCRATCH_LEN);
    if (!c->scratch)
        return -KVF_ENOMEM;
    rc = kvf__cond_init_monotonic(&c->cv);
    if (rc)
        goto out_scratch;
    rc = -pthread_mutex_init(&c->send_mu, NULL);
    if (rc)
        goto out_cv;
    rc = -pthread_mutex_init(&c->tls_mu, NULL);
    if (rc)
        goto out_send;
    return 0;

out_send:
    pthread_mutex_destroy(&c->send_mu);
out_cv:
    pthread_cond_destroy(&c->cv);
out_scratch:
    free(c->scratch);
    return rc;
}

void tcp_conn_close_fd(struct tcp_conn *c)
{
    kvf__tls_free(c->tls);
    c->tls = NULL;
    close(c->fd);
    c->fd = -1;
}

void tcp_conn_fini(struct tcp_conn *c)
{
    free(c->tls_buf);
    pthread_mutex_destroy(&c->tls_mu);
    pthread_mutex_destroy(&c->send_mu);
    pthread_cond_destroy(&c->cv);
    free(c->scratch);
}
