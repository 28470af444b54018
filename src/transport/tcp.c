/*
 * The TCP transport: the data path between engines on different hosts. The wire protocol is
 * specified in docs/protocol.md ("Transfer protocol"); its constants are in tcp_proto.h. tcp.h
 * lists the transport's files and says how its objects are locked.
 *
 * This file holds the transport object: create (the listening socket and the accept thread),
 * destroy, and the ops table; and, until they get files of their own, the initiator side's
 * connections, peer handles and transfers.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/net.h"
#include "common/thread.h"
#include "common/url.h"
#include "common/wire.h"
#include "transport/tcp.h"

/* ---------------------------------------------------------------------------------------------
 * Target side: create / destroy
 * ------------------------------------------------------------------------------------------- */

static int tcp_listen(struct tcp_transport *t, const kvf_hostport_t *hp)
{
    const char *why;
    int fd = kvf__tcp_listen(hp, &why);
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

static void tcp_peer_detach_all(struct tcp_transport *t);

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
    snprintf(t->local_sid, sizeof(t->local_sid), "%s", p->local_sid ? p->local_sid : "");
    kvf__hostport_format(&p->listen, t->listen_str, sizeof(t->listen_str));
    t->conns_per_peer = p->conns_per_peer ? p->conns_per_peer : TCP_DEFAULT_CONNS;
    if (t->conns_per_peer > KVF_TCP_MAX_CONNS_PER_PEER)
        t->conns_per_peer = KVF_TCP_MAX_CONNS_PER_PEER;
    t->chunk = p->chunk_bytes ? p->chunk_bytes : TCP_DEFAULT_CHUNK;
    if (t->chunk > KVF_TCP_MAX_CHUNK)
        t->chunk = KVF_TCP_MAX_CHUNK;
    t->connect_timeout_ms = p->connect_timeout_ms ? p->connect_timeout_ms : TCP_DEFAULT_CONNECT_MS;
    t->notify_cb = p->notify_cb;
    t->notify_arg = p->notify_arg;
    atomic_init(&t->stopping, false);

    rc = -pthread_mutex_init(&t->mu, NULL);
    if (rc) {
        rc = kvf__err(rc, "tcp create: mutex: %s", strerror(-rc));
        goto out_free;
    }
    rc = tcp_listen(t, &p->listen);
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
    rc = kvf__thread_start(&t->accept_thread, "kvf-tcp-accept", 0, tcp_accept_main, t);
    if (rc) {
        rc = kvf__err(rc, "tcp create: accept thread: %s", strerror(-rc));
        goto out_wake;
    }
    KVF_INFO(TCP_LOG, "listening on %s", t->listen_str);
    *out = (kvf_transport_t *)(void *)t;
    return 0;

out_wake:
    close(t->wake_fd);
out_listen:
    close(t->listen_fd);
out_mutex:
    pthread_mutex_destroy(&t->mu);
out_free:
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
    pthread_join(t->accept_thread, NULL);
    close(t->listen_fd);
    close(t->wake_fd);

    /* Cut every served connection: a thread blocked in recv() or send() returns at once, gives
     * back any region reference, and ends. Only then may the engine destroy the region table. */
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn *sc = t->sconns; sc; sc = sc->next)
        shutdown(sc->fd, SHUT_RDWR);
    pthread_mutex_unlock(&t->mu);
    tcp_reap_sconns(t, true);

    tcp_peer_detach_all(t);
    pthread_mutex_destroy(&t->mu);
    KVF_DEBUG(TCP_LOG, "stopped listening on %s", t->listen_str);
    free(t);
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: slots and batches (all under peer->mu)
 * ------------------------------------------------------------------------------------------- */

static void tcp_batch_fail(struct tcp_batch *b, int code, const char *fmt, ...) KVF__PRINTF(3, 4);

static void tcp_batch_fail(struct tcp_batch *b, int code, const char *fmt, ...)
{
    if (atomic_load_explicit(&b->rc, memory_order_relaxed) != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->msg, sizeof(b->msg), fmt, ap);
    va_end(ap);
    atomic_store(&b->rc, code);
}

/* Give a slot back and count its chunk as done for its batch (whose error, if any, the caller
 * recorded already). */
static void tcp_slot_finish(struct tcp_conn *c, unsigned idx)
{
    struct tcp_slot *s = &c->slots[idx];
    struct tcp_batch *b = s->batch;
    for (size_t k = s->elem; b->left && k < s->elem + s->nelem; k++)
        if (--b->left[k] == 0 && b->status[k] == KVF_XFER_PENDING)
            b->status[k] = 0;
    s->req_id = 0;
    s->batch = NULL;
    c->free_slots[c->nfree++] = (uint16_t)idx;
    if (c->waiters)
        pthread_cond_broadcast(&c->cv);
    if (--b->outstanding == 0 && b->waiting)
        pthread_cond_signal(&b->cv);
}

/* Fail one slot with @code, naming its element and @why. */
static void tcp_slot_fail(struct tcp_conn *c, unsigned idx, int code, const char *why)
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

/* Wake the receiver thread (after a role change or a break). */
static void tcp_rx_wake(struct tcp_conn *c)
{
    uint64_t one = 1;
    if (c->wake_fd >= 0 && write(c->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        KVF_DEBUG(TCP_LOG, "connection %u: waking the receiver: %s", c->idx, strerror(errno));
}

/*
 * Mark the connection broken (if @gen is still current), shut its socket down so that its
 * receiver and any sender return, and fail every request on it except the one the receiver is
 * filling (the receiver fails that one itself once its recv() returns). Under peer->mu.
 */
static void tcp_conn_break_locked(struct tcp_conn *c, uint64_t gen, int code, const char *why)
{
    if (c->gen != gen)
        return;
    if (c->state == TCP_CONN_UP) {
        c->state = TCP_CONN_BROKEN;
        /* An idle connection closed by a peer that shut down is routine; a break that fails
         * requests in flight is worth a warning. */
        unsigned pending = 0;
        for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++)
            pending += c->slots[i].req_id != 0;
        if (code == -KVF_ECLOSED)
            KVF_DEBUG(TCP_LOG, "connection %u to %s closed", c->idx, c->peer->sid);
        else if (pending == 0)
            KVF_INFO(TCP_LOG, "connection %u to %s closed while idle: %s", c->idx, c->peer->sid,
                     why);
        else
            KVF_WARN(TCP_LOG, "connection %u to %s broke with %u request(s) in flight: %s", c->idx,
                     c->peer->sid, pending, why);
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
        int rc = tcp_recv_full(c->fd, c->scratch, n, 0);
        if (rc)
            return rc;
        len -= n;
    }
    return 0;
}

/*
 * Read and handle one frame on @c (an answer): complete or fail its request, or drop it when its
 * request was given up. Called by whichever thread holds the connection's reader role, without
 * peer->mu. A caller reading for itself passes its batch as @self and its deadline: the answer
 * to its own request is received no later than that (the receiver thread passes NULL and 0;
 * other requests' answers are bounded by their owners, whose timeout cuts the connection).
 * Returns 0, or -1 with @why set when the connection must be broken.
 */
static int tcp_rx_one(struct tcp_conn *c, char *why, size_t whylen, const struct tcp_batch *self,
                      uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    uint8_t hbuf[KVF_TCP_HDR_LEN];
    char msg[KVF_TCP_MAX_MSG + 1];
    int rc;

    tcp_hdr_t h;
    rc = tcp_recv_full(c->fd, hbuf, sizeof(hbuf), deadline_ms);
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
        rc = tcp_recv_full(c->fd, msg, (size_t)h.len, deadline_ms);
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
    rc = tcp_recv_full(c->fd, dst, (size_t)want, dl);
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
 * The receiver thread of one connection. While it holds the reader role it reads answers; when
 * nothing is pending it only watches the socket for the peer closing it (so an idle connection
 * to a peer that went away is marked broken, and the next transfer reconnects), and its eventfd
 * for role changes. It ends when the connection breaks or is replaced.
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
        bool watch = c->reader == TCP_READER_NONE;
        pthread_mutex_unlock(&p->mu);
        struct pollfd pf[2] = {{wfd, POLLIN, 0}, {fd, POLLRDHUP, 0}};
        int pr = poll(pf, watch ? 2 : 1, -1);
        uint64_t v;
        if (pr > 0 && (pf[0].revents & POLLIN) && read(wfd, &v, sizeof(v)) < 0)
            v = 0;
        pthread_mutex_lock(&p->mu);
        /* The peer closed, reset, or sent something unasked: read what is there. */
        if (watch && pr > 0 && pf[1].revents && c->reader == TCP_READER_NONE)
            c->reader = TCP_READER_RX;
    }
    tcp_conn_break_locked(c, gen, p->closing ? -KVF_ECLOSED : -KVF_EPEERGONE, why);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: connecting
 * ------------------------------------------------------------------------------------------- */

/* Connect to one address and exchange HELLO/RESP, all before @deadline_ms. Returns the fd, or a
 * negative code with @why filled in. */
static int tcp_connect_addr(struct tcp_peer *p, const struct addrinfo *ai, uint64_t deadline_ms,
                            char *why, size_t whylen)
{
    int rc;
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
        snprintf(why, whylen, "socket: %s", strerror(errno));
        return -errno;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS) {
            rc = -errno;
            snprintf(why, whylen, "connect: %s", strerror(errno));
            goto out_close;
        }
        for (;;) {
            uint64_t now = kvf__now_ms();
            if (now >= deadline_ms) {
                snprintf(why, whylen, "connect: no answer in time");
                rc = -KVF_ETIMEDOUT;
                goto out_close;
            }
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            int n = poll(&pf, 1, (int)(deadline_ms - now));
            if (n > 0)
                break;
            if (n < 0 && errno != EINTR) {
                rc = -errno;
                snprintf(why, whylen, "poll: %s", strerror(errno));
                goto out_close;
            }
        }
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            rc = -err;
            snprintf(why, whylen, "connect: %s", strerror(err));
            goto out_close;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    uint8_t frame[KVF_TCP_HDR_LEN + KVF_TCP_MAX_MSG];
    size_t sl = strnlen(p->local_sid, KVF_TCP_MAX_MSG);
    tcp_hdr_encode(frame, KVF_TCP_HELLO, 0, 1, 0, sl);
    memcpy(frame + KVF_TCP_HDR_LEN, p->local_sid, sl);
    rc = tcp_nb_io(fd, frame, KVF_TCP_HDR_LEN + sl, true, deadline_ms);
    if (rc == 0)
        rc = tcp_nb_io(fd, frame, KVF_TCP_HDR_LEN, false, deadline_ms);
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
    if (!tcp_hdr_common_ok(&h, bad, sizeof(bad)) || h.type != KVF_TCP_RESP || h.req_id != 1 ||
        h.status != 0 || h.len != 0) {
        snprintf(why, whylen, "hello: unexpected answer (%s)",
                 h.magic != KVF_TCP_MAGIC ? "not a kvferry tcp endpoint" : "bad RESP");
        rc = -KVF_EPROTO;
        goto out_close;
    }
    /* From here on blocking I/O: senders wake every slice to check their deadline; the
     * receiver blocks until data or shutdown(). */
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    tcp_set_timeout(fd, SO_SNDTIMEO, TCP_CLIENT_SLICE_MS);
    return fd;

out_close:
    close(fd);
    return rc;
}

/*
 * (Re)open connection @c. Called with peer->mu held and c->state DOWN or BROKEN; returns with it
 * held, the state UP (0) or DOWN (error, message set), and waiters woken.
 */
static int tcp_conn_open_locked(struct tcp_conn *c, uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    char why[TCP_ADDR_LEN + 128] = "";
    int rc, fd = -1;

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
        close(c->fd);
        c->fd = -1;
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
            rc = tcp_connect_addr(p, ai, cdl, why, sizeof(why));
            if (rc >= 0 || rc == -KVF_ETIMEDOUT)
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
    } else if (rc != -KVF_ETIMEDOUT) {
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
    if (rc == 0) {
        c->fd = fd;
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
            c->gen++;
            close(c->wake_fd);
            c->wake_fd = -1;
        } else {
            c->rx_started = true;
        }
    }
    if (rc && fd >= 0 && c->fd != fd)
        close(fd);
    c->state = rc ? TCP_CONN_DOWN : TCP_CONN_UP;
    pthread_mutex_unlock(&c->send_mu);
    pthread_cond_broadcast(&c->cv);
    if (rc)
        return kvf__err(rc, "tcp connect to %s (%s): %s", p->sid, p->addr_str, why);
    KVF_DEBUG(TCP_LOG, "connection %u to %s (%s) up", c->idx, p->sid, p->addr_str);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: peers
 * ------------------------------------------------------------------------------------------- */

static int tcp_conn_init(struct tcp_peer *p, struct tcp_conn *c, unsigned idx)
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
    return 0;

out_cv:
    pthread_cond_destroy(&c->cv);
out_scratch:
    free(c->scratch);
    return rc;
}

static void tcp_conn_fini(struct tcp_conn *c)
{
    pthread_mutex_destroy(&c->send_mu);
    pthread_cond_destroy(&c->cv);
    free(c->scratch);
}

static int tcp_peer_open(kvf_transport_t *tt, const kvf_tpeer_desc_t *d, kvf_tpeer_t **out)
{
    struct tcp_transport *t = tcp_of(tt);
    const char *peer_sid = d ? d->sid : NULL;
    const kvf_hostport_t *addr = d ? &d->addr : NULL;
    int rc;
    if (!t || !addr || !out)
        return kvf__err(-KVF_EINVAL, "tcp peer open: missing argument");
    unsigned n = t->conns_per_peer;
    struct tcp_peer *p = calloc(1, sizeof(*p) + n * sizeof(struct tcp_conn));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "tcp peer open: out of memory");
    p->t = t;
    p->addr = *addr;
    kvf__hostport_format(addr, p->addr_str, sizeof(p->addr_str));
    snprintf(p->sid, sizeof(p->sid), "%s", peer_sid ? peer_sid : p->addr_str);
    snprintf(p->local_sid, sizeof(p->local_sid), "%s", t->local_sid);
    p->chunk = t->chunk;
    p->connect_timeout_ms = t->connect_timeout_ms;
    p->nconns = 0;
    atomic_init(&p->rr, 0);
    rc = -pthread_mutex_init(&p->mu, NULL);
    if (rc)
        goto out_free;
    rc = kvf__cond_init_monotonic(&p->cv);
    if (rc)
        goto out_mu;
    for (; p->nconns < n; p->nconns++) {
        rc = tcp_conn_init(p, &p->conns[p->nconns], p->nconns);
        if (rc)
            goto out_conns;
    }
    pthread_mutex_lock(&t->mu);
    p->next = t->peers;
    t->peers = p;
    pthread_mutex_unlock(&t->mu);
    *out = (kvf_tpeer_t *)(void *)p;
    return 0;

out_conns:
    while (p->nconns > 0)
        tcp_conn_fini(&p->conns[--p->nconns]);
    pthread_cond_destroy(&p->cv);
out_mu:
    pthread_mutex_destroy(&p->mu);
out_free:
    free(p);
    return kvf__err(rc, "tcp peer open %s: %s", peer_sid ? peer_sid : "?", kvf_strerror(rc));
}

/* Stop a peer's connections: fail what is pending with -KVF_ECLOSED, refuse new transfers, wait
 * for the running ones to return, then join the receivers. */
static void tcp_peer_shut(struct tcp_peer *p)
{
    pthread_mutex_lock(&p->mu);
    p->closing = true;
    for (unsigned i = 0; i < p->nconns; i++) {
        struct tcp_conn *c = &p->conns[i];
        tcp_conn_break_locked(c, c->gen, -KVF_ECLOSED, "transport is closing");
    }
    while (p->active > 0)
        pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->nconns; i++) {
        struct tcp_conn *c = &p->conns[i];
        if (c->rx_started) {
            pthread_join(c->rx_thread, NULL);
            c->rx_started = false;
        }
        if (c->fd >= 0) {
            close(c->fd);
            c->fd = -1;
        }
        if (c->wake_fd >= 0) {
            close(c->wake_fd);
            c->wake_fd = -1;
        }
    }
}

static void tcp_peer_detach_all(struct tcp_transport *t)
{
    pthread_mutex_lock(&t->mu);
    struct tcp_peer *list = t->peers;
    t->peers = NULL;
    pthread_mutex_unlock(&t->mu);
    for (struct tcp_peer *p = list; p; p = p->next) {
        tcp_peer_shut(p);
        p->t = NULL;
    }
}

static void tcp_peer_close(kvf_tpeer_t *pp)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    if (!p)
        return;
    struct tcp_transport *t = p->t;
    if (t) {
        pthread_mutex_lock(&t->mu);
        for (struct tcp_peer **q = &t->peers; *q; q = &(*q)->next) {
            if (*q == p) {
                *q = p->next;
                break;
            }
        }
        pthread_mutex_unlock(&t->mu);
        tcp_peer_shut(p);
    }
    for (unsigned i = 0; i < p->nconns; i++)
        tcp_conn_fini(&p->conns[i]);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: transfer
 * ------------------------------------------------------------------------------------------- */

/* Lock a connection's send mutex, giving up at @deadline_ms: a sender stalled on a peer that
 * stopped reading holds it until its own deadline, which may be later than ours. */
static int tcp_send_lock(struct tcp_conn *c, uint64_t deadline_ms)
{
    struct timespec ts;
#if defined(__SANITIZE_THREAD__)
    /* ThreadSanitizer does not know pthread_mutex_clocklock() and would report every unlock as
     * unbalanced; give it the CLOCK_REALTIME variant it does intercept. */
    uint64_t now = kvf__now_ms(), left = deadline_ms > now ? deadline_ms - now : 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(left / 1000u);
    ts.tv_nsec += (long)(left % 1000u) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return pthread_mutex_timedlock(&c->send_mu, &ts);
#else
    kvf__deadline_ts(&ts, deadline_ms);
    return pthread_mutex_clocklock(&c->send_mu, CLOCK_MONOTONIC, &ts);
#endif
}

/*
 * Post one chunk: find a usable connection and a free slot on it, register the request in the
 * slot (so the receiver can complete it), and send its frame from the caller's memory.
 * Returns 0 when the frame was sent (its completion comes later), or a negative code with the
 * batch's error recorded; a request that was registered is then failed or finished already.
 */
static int tcp_post(struct tcp_peer *p, struct tcp_batch *b, uint8_t op, size_t elem,
                    uint32_t nelem, uint64_t off, uint64_t len, bool only, uint64_t deadline_ms)
{
    const kvf_xfer_t *x = &b->x[elem];
    unsigned ci = atomic_fetch_add_explicit(&p->rr, 1, memory_order_relaxed) % p->nconns;
    struct tcp_conn *c = &p->conns[ci];
    int rc = 0;

    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (p->closing) {
            tcp_batch_fail(b, -KVF_ECLOSED, "tcp %s to %s, element %zu: transport is closing",
                           tcp_op_name(op), p->sid, elem);
            rc = -KVF_ECLOSED;
            goto out_unlock;
        }
        if (c->state == TCP_CONN_UP && c->nfree > 0)
            break;
        if (c->state == TCP_CONN_DOWN || c->state == TCP_CONN_BROKEN) {
            rc = tcp_conn_open_locked(c, deadline_ms);
            if (rc) {
                tcp_batch_fail(b, rc, "tcp %s to %s, element %zu: %s", tcp_op_name(op), p->sid,
                               elem, kvf_last_error());
                goto out_unlock;
            }
            continue;
        }
        /* Connecting by another thread, or every slot in use: wait for a change. */
        c->waiters++;
        bool more = kvf__cond_wait_until(&c->cv, &p->mu, deadline_ms);
        c->waiters--;
        if (!more) {
            tcp_batch_fail(b, -KVF_ETIMEDOUT,
                           "tcp %s to %s, element %zu: timed out waiting for connection %u (%s)",
                           tcp_op_name(op), p->sid, elem, c->idx,
                           c->state == TCP_CONN_UP ? "all requests in flight" : "connecting");
            rc = -KVF_ETIMEDOUT;
            goto out_unlock;
        }
    }

    unsigned idx = c->free_slots[--c->nfree];
    struct tcp_slot *s = &c->slots[idx];
    uint64_t req_id = (++c->seq << TCP_SLOT_BITS) | idx;
    s->req_id = req_id;
    s->batch = b;
    s->elem = elem;
    s->nelem = nelem;
    s->refused = UINT32_MAX;
    s->op = op;
    /* Someone must read the answer: the caller itself when this is its batch's only request and
     * nobody reads this connection now, else the receiver thread. */
    if (c->reader == TCP_READER_NONE) {
        if (only) {
            c->reader = TCP_READER_INLINE;
            c->inline_b = b;
        } else {
            c->reader = TCP_READER_RX;
            tcp_rx_wake(c);
        }
    }
    s->local = (uint8_t *)x->local + off;
    s->remote = x->remote + off;
    s->len = len;
    b->outstanding++;
    uint64_t gen = c->gen;
    pthread_mutex_unlock(&p->mu);

    uint8_t hdr[KVF_TCP_HDR_LEN];
    uint8_t segs[KVF_TCP_MAX_SEGS * KVF_TCP_SEG_LEN];
    struct iovec iov[TCP_WRITEV_IOV];
    int niov = op == KVF_TCP_READ ? 1 : 2;
    iov[0] = (struct iovec){hdr, sizeof(hdr)};
    if (op == KVF_TCP_WRITEV) {
        tcp_hdr_encode(hdr, op, 0, req_id, nelem, len);
        iov[1] = (struct iovec){segs, (size_t)nelem * KVF_TCP_SEG_LEN};
        for (uint32_t k = 0; k < nelem; k++) {
            kvf__put_le64(segs + (size_t)k * KVF_TCP_SEG_LEN, x[k].remote);
            kvf__put_le64(segs + (size_t)k * KVF_TCP_SEG_LEN + 8, x[k].len);
            iov[niov++] = (struct iovec){x[k].local, x[k].len};
        }
    } else {
        tcp_hdr_encode(hdr, op, 0, req_id, s->remote, len);
        iov[1] = (struct iovec){s->local, (size_t)len};
    }

    int lrc = tcp_send_lock(c, deadline_ms);
    if (lrc) {
        /* Never sent: take the request back ourselves (unless the connection broke and failed
         * it meanwhile). */
        pthread_mutex_lock(&p->mu);
        if (c->gen == gen && s->req_id == req_id)
            tcp_slot_fail(c, idx, -KVF_ETIMEDOUT, "timed out waiting to send");
        pthread_mutex_unlock(&p->mu);
        return -KVF_ETIMEDOUT;
    }
    if (c->gen != gen) {
        /* The connection was replaced: this request was failed with it. */
        pthread_mutex_unlock(&c->send_mu);
        return -KVF_EPEERGONE;
    }
    rc = tcp_sendv(c->fd, iov, niov, deadline_ms, 0);
    pthread_mutex_unlock(&c->send_mu);
    if (rc == 0)
        return 0;

    /* A frame may have gone out in part: the stream is out of step, so the connection is done
     * for. Record this batch's own reason first; the break fails every request on it. */
    char why[160];
    pthread_mutex_lock(&p->mu);
    if (rc == -KVF_ETIMEDOUT) {
        tcp_batch_fail(b, rc,
                       "tcp %s to %s, element %zu [0x%" PRIx64 ", +%zu): timed out "
                       "sending (the peer stopped reading)",
                       tcp_op_name(op), p->sid, elem, x->remote, x->len);
        snprintf(why, sizeof(why), "send stalled until a transfer's deadline");
    } else {
        snprintf(why, sizeof(why), "send: %s", kvf_strerror(rc));
        rc = -KVF_EPEERGONE;
    }
    tcp_conn_break_locked(c, gen, -KVF_EPEERGONE, why);
out_unlock:
    if (rc && b->status && b->status[elem] >= 0)
        b->status[elem] = rc;
    pthread_mutex_unlock(&p->mu);
    return rc;
}

/*
 * Give up on every request of @b still in flight (its deadline passed), so that nothing touches
 * the caller's buffers after transfer() returns. Under peer->mu. A request the receiver is filling
 * right now (a READ answer) cannot be withdrawn: its connection is cut so that the receiver's
 * recv() returns, and we wait for the receiver to let go of the buffer.
 */
static void tcp_batch_abort(struct tcp_peer *p, struct tcp_batch *b)
{
    for (unsigned ci = 0; ci < p->nconns; ci++) {
        struct tcp_conn *c = &p->conns[ci];
        for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++) {
            if (!c->slots[i].req_id || c->slots[i].batch != b)
                continue;
            if (c->rx_active == (int)i) {
                tcp_conn_break_locked(c, c->gen, -KVF_EPEERGONE,
                                      "a read timed out while its answer was arriving");
                c->waiters++;
                for (unsigned waited = 0; c->rx_active == (int)i; waited++) {
                    /* shutdown() makes the recv() return at once; this only logs if it does not. */
                    struct timespec ts;
                    kvf__deadline_ts(&ts, kvf__now_ms() + 1000);
                    if (pthread_cond_timedwait(&c->cv, &p->mu, &ts) == ETIMEDOUT)
                        KVF_ERROR(TCP_LOG,
                                  "waiting %u s for the receiver of connection %u to %s "
                                  "to leave a timed-out read's buffer",
                                  waited + 1, c->idx, p->sid);
                }
                c->waiters--;
            }
            if (c->slots[i].req_id && c->slots[i].batch == b) {
                if (b->status && b->status[c->slots[i].elem] >= 0)
                    b->status[c->slots[i].elem] = -KVF_ETIMEDOUT;
                tcp_slot_finish(c, i);
            }
        }
    }
}

/* The connection whose answers @b's caller reads itself, or NULL. Under peer->mu. */
static struct tcp_conn *tcp_inline_conn(struct tcp_peer *p, const struct tcp_batch *b)
{
    for (unsigned i = 0; i < p->nconns; i++)
        if (p->conns[i].reader == TCP_READER_INLINE && p->conns[i].inline_b == b)
            return &p->conns[i];
    return NULL;
}

/* Give the reader role up: to the receiver thread if requests are still pending, else to
 * nobody. Under peer->mu. */
static void tcp_inline_release(struct tcp_conn *c, const struct tcp_batch *b)
{
    if (c->reader != TCP_READER_INLINE || c->inline_b != b)
        return;
    c->inline_b = NULL;
    if (c->state == TCP_CONN_UP && tcp_conn_busy(c) > 0) {
        c->reader = TCP_READER_RX;
        tcp_rx_wake(c);
    } else {
        c->reader = TCP_READER_NONE;
    }
}

/*
 * Read answers on @c in the caller's thread until @b is complete, the connection breaks, or
 * @deadline_ms; then give the role up. Answers to other callers' requests that arrive first are
 * handled as the receiver would. Called and returns with peer->mu held.
 */
static void tcp_read_inline(struct tcp_conn *c, struct tcp_batch *b, uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    const uint64_t gen = c->gen;
    char why[TCP_ERRMSG_LEN];
    while (b->outstanding > 0 && c->reader == TCP_READER_INLINE && c->inline_b == b &&
           c->gen == gen && c->state == TCP_CONN_UP) {
        int fd = c->fd;
        c->inline_active = true;
        pthread_mutex_unlock(&p->mu);
        uint64_t now = kvf__now_ms();
        uint64_t left = deadline_ms > now ? deadline_ms - now : 0;
        struct pollfd pf = {fd, POLLIN, 0};
        int pr = poll(&pf, 1, left > INT32_MAX ? INT32_MAX : (int)left);
        int rc = pr > 0 ? tcp_rx_one(c, why, sizeof(why), b, deadline_ms) : 0;
        pthread_mutex_lock(&p->mu);
        c->inline_active = false;
        pthread_cond_broadcast(&c->cv);
        if (rc) {
            tcp_conn_break_locked(c, gen, p->closing ? -KVF_ECLOSED : -KVF_EPEERGONE, why);
            break;
        }
        if (pr == 0)
            break; /* the deadline: the caller gives up */
    }
    tcp_inline_release(c, b);
}

/* Enter a batch on @p: refused once the peer handle is closing. */
static int tcp_batch_begin(struct tcp_peer *p, struct tcp_batch *b, const kvf_xfer_t *x)
{
    memset(b, 0, sizeof(*b));
    b->x = x;
    atomic_init(&b->rc, 0);
    int rc = kvf__cond_init_monotonic(&b->cv);
    if (rc)
        return kvf__err(rc, "tcp transfer: condition variable: %s", kvf_strerror(rc));
    pthread_mutex_lock(&p->mu);
    if (p->closing) {
        pthread_mutex_unlock(&p->mu);
        pthread_cond_destroy(&b->cv);
        return kvf__err(-KVF_ECLOSED, "tcp transfer to %s: transport is closing", p->sid);
    }
    p->active++;
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* Wait for every posted request of @b (giving up on them at @deadline_ms), leave the peer, and
 * return the batch's result. */
static int tcp_batch_end(struct tcp_peer *p, struct tcp_batch *b, uint64_t deadline_ms)
{
    pthread_mutex_lock(&p->mu);
    b->waiting = true;
    while (b->outstanding > 0) {
        struct tcp_conn *ic = tcp_inline_conn(p, b);
        if (ic) {
            tcp_read_inline(ic, b, deadline_ms);
            continue;
        }
        if (!kvf__cond_wait_until(&b->cv, &p->mu, deadline_ms)) {
            tcp_batch_fail(b, -KVF_ETIMEDOUT,
                           "tcp transfer to %s: timed out with %zu "
                           "request(s) unanswered",
                           p->sid, b->outstanding);
            tcp_batch_abort(p, b);
            break;
        }
    }
    b->waiting = false;
    /* A request that failed before its answer could be read leaves the role with us. */
    struct tcp_conn *ic = tcp_inline_conn(p, b);
    if (ic)
        tcp_inline_release(ic, b);
    if (--p->active == 0 && p->closing)
        pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_cond_destroy(&b->cv);

    int rc = atomic_load(&b->rc);
    if (rc)
        return kvf__err(rc, "%s", b->msg);
    return 0;
}

static int tcp_transfer(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                        const kvf_xfer_ctl_t *ctl)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    struct tcp_batch b;
    uint32_t *left = NULL;
    int rc;

    if (!p || (n && !x))
        return kvf__err(-KVF_EINVAL, "tcp transfer: missing argument");
    for (size_t i = 0; i < n; i++) {
        if (x[i].op != KVF_OP_WRITE && x[i].op != KVF_OP_READ)
            return kvf__err(-KVF_EINVAL, "tcp transfer to %s, element %zu: bad op %d", p->sid, i,
                            (int)x[i].op);
        if (x[i].len == 0 || !x[i].local)
            return kvf__err(-KVF_EINVAL, "tcp transfer to %s, element %zu: %s", p->sid, i,
                            x[i].len == 0 ? "length 0" : "no local buffer");
        if (x[i].remote + x[i].len < x[i].remote)
            return kvf__err(-KVF_EINVAL,
                            "tcp transfer to %s, element %zu: [0x%" PRIx64
                            ", +%zu) runs past the end of the address space",
                            p->sid, i, x[i].remote, x[i].len);
    }
    if (n == 0)
        return 0;
    if (ctl && ctl->status) {
        /* An element is done when its last chunk is answered. */
        left = malloc(n * sizeof(*left));
        if (!left)
            return kvf__err(-KVF_ENOMEM, "tcp transfer to %s: out of memory for %zu elements",
                            p->sid, n);
        for (size_t i = 0; i < n; i++)
            left[i] = (uint32_t)((x[i].len + p->chunk - 1) / p->chunk);
    }
    rc = tcp_batch_begin(p, &b, x);
    if (rc) {
        free(left);
        return rc;
    }
    b.status = left ? ctl->status : NULL;
    b.left = left;

    /* Post every request, sending each from this thread; stop at the first error, or when the
     * caller cancels (what was sent is still waited for). Runs of small writes go as one WRITEV
     * each (one frame, one answer); other elements as chunks of at most p->chunk bytes. */
    const atomic_bool *cancel = ctl ? ctl->cancel : NULL;
    for (size_t i = 0; i < n && !atomic_load_explicit(&b.rc, memory_order_relaxed);) {
        if (cancel && atomic_load_explicit(cancel, memory_order_relaxed)) {
            pthread_mutex_lock(&p->mu);
            tcp_batch_fail(&b, -KVF_ECANCELED, "tcp transfer to %s: cancelled at element %zu",
                           p->sid, i);
            pthread_mutex_unlock(&p->mu);
            break;
        }
        size_t j = i;
        uint64_t total = 0;
        while (j < n && j - i < KVF_TCP_MAX_SEGS && x[j].op == KVF_OP_WRITE &&
               x[j].len <= TCP_GATHER_ELEM_MAX && total + x[j].len <= p->chunk)
            total += x[j++].len;
        if (j - i >= 2) {
            if (tcp_post(p, &b, KVF_TCP_WRITEV, i, (uint32_t)(j - i), 0, total, j - i == n,
                         deadline_ms))
                break;
            i = j;
            continue;
        }
        uint8_t op = x[i].op == KVF_OP_READ ? KVF_TCP_READ : KVF_TCP_WRITE;
        for (uint64_t off = 0; off < x[i].len; off += p->chunk) {
            if (off && cancel && atomic_load_explicit(cancel, memory_order_relaxed)) {
                pthread_mutex_lock(&p->mu);
                tcp_batch_fail(&b, -KVF_ECANCELED,
                               "tcp transfer to %s: cancelled at element %zu (offset %" PRIu64 ")",
                               p->sid, i, off);
                pthread_mutex_unlock(&p->mu);
                break;
            }
            uint64_t len = x[i].len - off < p->chunk ? x[i].len - off : p->chunk;
            if (tcp_post(p, &b, op, i, 1, off, len, n == 1 && len == x[i].len, deadline_ms))
                break;
            if (atomic_load_explicit(&b.rc, memory_order_relaxed))
                break;
        }
        i++;
    }
    rc = tcp_batch_end(p, &b, deadline_ms);
    free(left);
    return rc;
}

static int tcp_notify(kvf_tpeer_t *pp, const void *msg, size_t len, uint64_t deadline_ms)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    struct tcp_batch b;
    static const uint8_t empty[1];

    if (!p || (len && !msg))
        return kvf__err(-KVF_EINVAL, "tcp notify: missing argument");
    if (len > KVF_NOTIFY_MAX)
        return kvf__err(-KVF_ETOOBIG, "tcp notify to %s: %zu bytes over KVF_NOTIFY_MAX (%u)",
                        p->sid, len, KVF_NOTIFY_MAX);
    /* The frame travels like a one-chunk write to address 0: header, then the message. */
    const kvf_xfer_t x = {
        .op = KVF_OP_WRITE, .local = len ? (void *)msg : (void *)empty, .remote = 0, .len = len};
    int rc = tcp_batch_begin(p, &b, &x);
    if (rc)
        return rc;
    tcp_post(p, &b, KVF_TCP_NOTIFY, 0, 1, 0, len, true, deadline_ms);
    return tcp_batch_end(p, &b, deadline_ms);
}

const struct kvf_transport_ops kvf__tcp_ops = {
    .size = sizeof(struct kvf_transport_ops),
    .name = "tcp",
    .create = tcp_create,
    .port = tcp_port,
    .destroy = tcp_destroy,
    .peer_open = tcp_peer_open,
    .peer_close = tcp_peer_close,
    .transfer = tcp_transfer,
    .notify = tcp_notify,
    .regions_gen = kvf__transport_enotsup_gen,
    .regions_changed = kvf__transport_nop_regions,
};
