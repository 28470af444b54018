/*
 * Reading an initiator connection's answers (tcp.h): a state machine over the socket that never
 * blocks, run by whoever holds the connection's reader role. That is its I/O thread (tcp_pool.c
 * runs tcp_rx_event() when the connection's watch fires), or the caller whose whole batch is one
 * request and who reads its own answer. A half-read answer stays in the connection, so the role
 * can pass from one to the other at any byte, and a peer that stops in the middle of an answer
 * holds up nobody but the callers waiting for it.
 *
 * Which events the watch waits for follows the role: always the peer closing the connection
 * (EPOLLRDHUP; an idle connection the target closed is marked broken at once), and answers
 * (EPOLLIN) from when the I/O thread takes the role until a caller takes it, so that a caller
 * reading its own answer is not raced by a woken I/O thread. The watch is edge-triggered: whoever reads goes on until the
 * socket (and the TLS session) has nothing more, and a role handed to the I/O thread re-arms the
 * watch, which fires at once for bytes already there. The locking rules are in tcp.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>

#include "common/thread.h"
#include "transport/tcp.h"

/* What rx_step() returns besides -1 (the connection must be broken, the reason in @why). */
#define RX_AGAIN 0 /* nothing more to read now */
#define RX_FRAME 1 /* an answer was handled: a request may have ended */
#define RX_ON    2 /* (inside rx_step) go on reading */
#define RX_YIELD 3 /* the turn's budget is spent, bytes may be left: the I/O thread's others go first */

/* Bytes the I/O thread reads from one connection before it lets the others' events go first
 * (as a served connection's turn, tcp_pool.c). */
#define RX_TURN_BYTES (4u << 20)

/* Make @c's watch wait for the peer closing, and for answers when @in. A watch re-armed this way
 * fires at once for what is already there. Under peer->mu. */
static void rx_arm(struct tcp_conn *c, bool in)
{
    if (c->watch && tcp_watch_mod(c->watch, EPOLLRDHUP | EPOLLET | (in ? EPOLLIN : 0u)))
        c->ep_in = in;
}

/* Receive up to @len bytes on @c without blocking, counted against the turn's budget. */
static ssize_t rx_recv(struct tcp_conn *c, void *buf, size_t len)
{
    ssize_t r = tcp_conn_recv_some(c, buf, len);
    if (r > 0)
        c->rx_turn_left -= (size_t)r < c->rx_turn_left ? (size_t)r : c->rx_turn_left;
    return r;
}

/* Why reading stopped: @r from tcp_conn_recv_some() (0, or a code other than -EAGAIN). */
static int rx_broken(ssize_t r, const char *where, char *why, size_t whylen)
{
    snprintf(why, whylen, "%s%s",
             r == 0 || r == -EPIPE ? "connection closed by the peer" : kvf_strerror((int)r), where);
    return -1;
}

/* A whole header is in c->rx_hbuf: check it and find what follows. Without peer->mu. */
static int rx_header(struct tcp_conn *c, char *why, size_t whylen)
{
    struct tcp_peer *p = c->peer;
    tcp_hdr_t *h = &c->rx_h;
    char bad[160];
    tcp_hdr_decode(c->rx_hbuf, h);
    c->rx_got = 0;
    if (!tcp_hdr_common_ok(h, bad, sizeof(bad)) || h->type != KVF_TCP_RESP) {
        if (h->type != KVF_TCP_RESP && h->magic == KVF_TCP_MAGIC)
            snprintf(bad, sizeof(bad), "frame type %u where an answer was expected",
                     (unsigned)h->type);
        snprintf(why, whylen, "bad frame from the peer: %s", bad);
        return -1;
    }
    if (h->status != 0 && h->len > KVF_TCP_MAX_MSG) {
        snprintf(why, whylen,
                 "bad frame from the peer: error message of %" PRIu64 " bytes over KVF_TCP_MAX_MSG",
                 h->len);
        return -1;
    }
    if (h->len > KVF_TCP_MAX_CHUNK) {
        snprintf(why, whylen, "bad frame from the peer: length %" PRIu64 " over KVF_TCP_MAX_CHUNK",
                 h->len);
        return -1;
    }
    if (h->status != 0) {
        c->rx_state = TCP_RX_MSG; /* the refusal's message, then the request */
        return RX_ON;
    }

    unsigned idx = (unsigned)(h->req_id & (KVF_TCP_MAX_INFLIGHT - 1));
    struct tcp_slot *s = &c->slots[idx];
    pthread_mutex_lock(&p->mu);
    if (s->req_id != h->req_id) {
        /* Its request was given up (timed out): drop the answer. */
        pthread_mutex_unlock(&p->mu);
        if (h->len == 0)
            return RX_FRAME;
        c->rx_left = h->len;
        c->rx_state = TCP_RX_DRAIN;
        return RX_ON;
    }
    uint64_t want = s->op == KVF_TCP_READ ? s->len : 0;
    if (h->len != want) {
        uint8_t op = s->op;
        pthread_mutex_unlock(&p->mu);
        snprintf(why, whylen,
                 "bad frame from the peer: answer of %" PRIu64 " bytes to a %s of %" PRIu64,
                 h->len, tcp_op_name(op), want);
        return -1;
    }
    if (want == 0) {
        tcp_slot_finish(c, idx);
        pthread_mutex_unlock(&p->mu);
        return RX_FRAME;
    }
    c->rx_idx = idx;
    c->rx_req = h->req_id;
    c->rx_state = TCP_RX_DATA;
    pthread_mutex_unlock(&p->mu);
    return RX_ON;
}

/* A refusal's whole message is in c->rx_msg: fail its request, unless it was given up. */
static void rx_refusal(struct tcp_conn *c)
{
    struct tcp_peer *p = c->peer;
    const tcp_hdr_t *h = &c->rx_h;
    char text[KVF_TCP_MAX_MSG + 1], m2[TCP_ERRMSG_LEN];
    kvf__printable(text, sizeof(text), c->rx_msg, (size_t)h->len);
    snprintf(m2, sizeof(m2), "refused by the target: %s", text);
    int code = h->status < 65536 ? -(int)h->status : -KVF_EPROTO;
    unsigned idx = (unsigned)(h->req_id & (KVF_TCP_MAX_INFLIGHT - 1));
    struct tcp_slot *s = &c->slots[idx];
    pthread_mutex_lock(&p->mu);
    if (s->req_id == h->req_id) {
        if (s->op == KVF_TCP_WRITEV && h->addr < s->nelem)
            s->refused = (uint32_t)h->addr;
        tcp_slot_fail(c, idx, code, m2);
    }
    pthread_mutex_unlock(&p->mu);
}

/* Receive part of a READ answer's payload straight into its caller's buffer. */
static int rx_data(struct tcp_conn *c, char *why, size_t whylen)
{
    struct tcp_peer *p = c->peer;
    pthread_mutex_lock(&p->mu);
    struct tcp_slot *s = &c->slots[c->rx_idx];
    if (s->req_id != c->rx_req) {
        /* Given up since its header came: the rest is nobody's. */
        pthread_mutex_unlock(&p->mu);
        c->rx_left = c->rx_h.len - c->rx_got;
        c->rx_state = TCP_RX_DRAIN;
        return RX_ON;
    }
    /* rx_active tells a caller that gives up on this request to cut the connection and wait
     * for us, rather than return while we may still write into its memory. */
    c->rx_active = (int)c->rx_idx;
    uint8_t *dst = s->local + c->rx_got;
    size_t want = (size_t)(c->rx_h.len - c->rx_got);
    pthread_mutex_unlock(&p->mu);
    ssize_t r = rx_recv(c, dst, want);
    pthread_mutex_lock(&p->mu);
    c->rx_active = -1;
    /* A break while we were in recv() skipped this request (rx_active): failing it is ours. */
    bool done = false, broken = c->state != TCP_CONN_UP;
    if (r > 0) {
        c->rx_got += (size_t)r;
        done = c->rx_got == c->rx_h.len;
        if (done) {
            tcp_slot_finish(c, c->rx_idx);
            c->rx_state = TCP_RX_HDR;
            c->rx_got = 0;
        }
    }
    if (c->waiters)
        pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&p->mu);
    if (r == -EAGAIN && broken)
        return rx_broken(0, " in the middle of a read answer", why, whylen);
    if (r == -EAGAIN)
        return RX_AGAIN;
    if (r <= 0)
        return rx_broken(r, " in the middle of a read answer", why, whylen);
    return done ? RX_FRAME : RX_ON;
}

/*
 * Read what @c's socket holds, without blocking, until an answer was handled (RX_FRAME) or
 * nothing more is there (RX_AGAIN); -1 with @why when the connection must be broken. By the
 * holder of the reader role, without peer->mu.
 */
static int rx_step(struct tcp_conn *c, char *why, size_t whylen)
{
    for (;;) {
        ssize_t r;
        int rc;
        if (c->rx_turn_left == 0)
            return RX_YIELD;
        switch (c->rx_state) {
        case TCP_RX_HDR:
            r = rx_recv(c, c->rx_hbuf + c->rx_got, KVF_TCP_HDR_LEN - c->rx_got);
            if (r == -EAGAIN)
                return RX_AGAIN;
            if (r <= 0)
                return rx_broken(r, "", why, whylen);
            c->rx_got += (size_t)r;
            if (c->rx_got < KVF_TCP_HDR_LEN)
                continue;
            rc = rx_header(c, why, whylen);
            if (rc != RX_ON)
                return rc;
            continue;
        case TCP_RX_MSG:
            if (c->rx_got < c->rx_h.len) {
                r = rx_recv(c, c->rx_msg + c->rx_got, (size_t)c->rx_h.len - c->rx_got);
                if (r == -EAGAIN)
                    return RX_AGAIN;
                if (r <= 0)
                    return rx_broken(r, "", why, whylen);
                c->rx_got += (size_t)r;
                if (c->rx_got < c->rx_h.len)
                    continue;
            }
            rx_refusal(c);
            c->rx_state = TCP_RX_HDR;
            c->rx_got = 0;
            return RX_FRAME;
        case TCP_RX_DATA:
            rc = rx_data(c, why, whylen);
            if (rc != RX_ON)
                return rc;
            continue;
        case TCP_RX_DRAIN:
            r = rx_recv(c, c->scratch,
                        c->rx_left < TCP_SCRATCH_LEN ? (size_t)c->rx_left : TCP_SCRATCH_LEN);
            if (r == -EAGAIN)
                return RX_AGAIN;
            if (r <= 0)
                return rx_broken(r, "", why, whylen);
            c->rx_left -= (uint64_t)r;
            if (c->rx_left > 0)
                continue;
            c->rx_state = TCP_RX_HDR;
            c->rx_got = 0;
            return RX_FRAME;
        }
    }
}

void tcp_rx_claim_locked(struct tcp_conn *c, struct tcp_batch *b, bool mine)
{
    if (c->reader != TCP_READER_NONE) {
        /* Someone else reads this answer and wakes the caller through b->cv, which a caller
         * reading its other answers in poll() would not notice: it leaves them all to the I/O
         * threads (tcp_rx_inline_locked). */
        if (c->reader != TCP_READER_INLINE || c->inline_b != b)
            b->shared = true;
        return;
    }
    if (mine) {
        c->reader = TCP_READER_INLINE;
        c->inline_b = b;
        if (c->ep_in)
            rx_arm(c, false);
    } else {
        c->reader = TCP_READER_IO;
        if (!c->ep_in)
            rx_arm(c, true);
    }
}

void tcp_rx_event(void *arg, uint32_t events)
{
    (void)events; /* what fired is found by reading */
    struct tcp_conn *c = arg;
    struct tcp_peer *p = c->peer;
    char why[TCP_ERRMSG_LEN];
    pthread_mutex_lock(&p->mu);
    if (c->state != TCP_CONN_UP) {
        pthread_mutex_unlock(&p->mu);
        return;
    }
    if (c->reader == TCP_READER_INLINE) {
        /* The caller reading meets a close itself; if it stops before, it re-arms the watch. */
        c->rx_missed = true;
        pthread_mutex_unlock(&p->mu);
        return;
    }
    /* Answers, or (nothing to read) the peer closing or sending something unasked. */
    c->reader = TCP_READER_IO;
    /* TLS: bytes a session read ahead would not fire the re-armed watch; it reads to the end. */
    c->rx_turn_left = c->tls ? SIZE_MAX : RX_TURN_BYTES;
    int rc;
    do {
        pthread_mutex_unlock(&p->mu);
        rc = rx_step(c, why, sizeof(why));
        pthread_mutex_lock(&p->mu);
    } while (rc == RX_FRAME && c->state == TCP_CONN_UP);
    if (rc < 0) {
        tcp_conn_break_locked(c, c->gen, p->closing ? -KVF_ECLOSED : -KVF_EPEERGONE, why);
    } else if (c->state == TCP_CONN_UP) {
        if (rc == RX_YIELD)
            rx_arm(c, true); /* fires again at once, after the events already waiting */
        else if (tcp_conn_busy(c) == 0)
            c->reader = TCP_READER_NONE;
        else if (!c->ep_in)
            rx_arm(c, true);
    }
    pthread_mutex_unlock(&p->mu);
}

/* Hand the reader role @c's caller held on: to the I/O thread if requests are still pending,
 * else to nobody. Under peer->mu. */
static void rx_release(struct tcp_conn *c)
{
    c->inline_b = NULL;
    if (c->state == TCP_CONN_UP && tcp_conn_busy(c) > 0) {
        c->reader = TCP_READER_IO;
        rx_arm(c, true);
    } else {
        c->reader = TCP_READER_NONE;
        /* The I/O thread saw an event while we read: the peer may have closed after the last
         * answer we took. Re-arming lets it find out now. */
        if (c->state == TCP_CONN_UP && c->rx_missed)
            rx_arm(c, c->ep_in);
    }
    c->rx_missed = false;
}

void tcp_rx_release_locked(struct tcp_peer *p, const struct tcp_batch *b)
{
    for (unsigned i = 0; i < p->nconns; i++)
        if (p->conns[i].reader == TCP_READER_INLINE && p->conns[i].inline_b == b)
            rx_release(&p->conns[i]);
}

/* Whether the caller of @b still reads @c, as it did at generation @gen. Under peer->mu. */
static bool rx_held(const struct tcp_conn *c, const struct tcp_batch *b, uint64_t gen)
{
    return c->reader == TCP_READER_INLINE && c->inline_b == b && c->gen == gen &&
           c->state == TCP_CONN_UP;
}

/*
 * One turn of the caller's reading of the @k connections @cs: without the lock, wait until one
 * of them has bytes (@wait; not past @deadline_ms), then run rx_step() on each that has (each of
 * them, without @wait); a connection that fails is broken at once. Returns RX_FRAME when an answer was handled, else
 * RX_AGAIN, with *@late when the deadline came first. Called and returns with peer->mu held.
 */
static int rx_turn(struct tcp_conn **cs, unsigned k, bool wait, uint64_t deadline_ms, bool *late)
{
    struct tcp_peer *p = cs[0]->peer;
    struct pollfd pf[KVF_TCP_MAX_CONNS_PER_PEER];
    uint64_t gen[KVF_TCP_MAX_CONNS_PER_PEER];
    char why[TCP_ERRMSG_LEN];
    for (unsigned i = 0; i < k; i++) {
        cs[i]->inline_active = true; /* the fd stays open until we are done with it */
        pf[i] = (struct pollfd){cs[i]->fd, POLLIN, 0};
        gen[i] = cs[i]->gen;
    }
    pthread_mutex_unlock(&p->mu);
    int pr = (int)k, rc = RX_AGAIN;
    uint64_t now = kvf__now_ms();
    if (now >= deadline_ms) {
        pr = 0;
    } else if (wait) {
        /* After RX_AGAIN nothing complete waits in a socket or a TLS session (a partial record
         * may: its rest comes through the socket). */
        uint64_t left = deadline_ms - now;
        pr = poll(pf, k, left > INT32_MAX ? INT32_MAX : (int)left);
    }
    for (unsigned i = 0; i < k && pr > 0; i++) {
        if (wait && !pf[i].revents)
            continue;
        cs[i]->rx_turn_left = SIZE_MAX; /* a caller reads for itself: no one waits behind it */
        int r = rx_step(cs[i], why, sizeof(why));
        if (r == RX_FRAME)
            rc = RX_FRAME;
        if (r < 0) {
            pthread_mutex_lock(&p->mu);
            tcp_conn_break_locked(cs[i], gen[i], p->closing ? -KVF_ECLOSED : -KVF_EPEERGONE, why);
            pthread_mutex_unlock(&p->mu);
        }
    }
    pthread_mutex_lock(&p->mu);
    for (unsigned i = 0; i < k; i++) {
        cs[i]->inline_active = false;
        if (cs[i]->waiters)
            pthread_cond_broadcast(&cs[i]->cv);
    }
    *late = pr == 0;
    return rc;
}

bool tcp_rx_inline_locked(struct tcp_peer *p, struct tcp_batch *b, uint64_t deadline_ms)
{
    struct tcp_conn *mine[KVF_TCP_MAX_CONNS_PER_PEER], *live[KVF_TCP_MAX_CONNS_PER_PEER];
    uint64_t gen[KVF_TCP_MAX_CONNS_PER_PEER];
    unsigned k = 0;
    for (unsigned i = 0; i < p->nconns && k < KVF_TCP_MAX_CONNS_PER_PEER; i++) {
        struct tcp_conn *c = &p->conns[i];
        if (c->reader == TCP_READER_INLINE && c->inline_b == b) {
            gen[k] = c->gen;
            mine[k++] = c;
        }
    }
    if (k == 0)
        return false;
    if (b->shared) {
        for (unsigned i = 0; i < k; i++)
            rx_release(mine[i]);
        return false;
    }
    /* Plain: the answer cannot be there yet, wait for it. TLS: a record the session read ahead
     * may hold it, where poll() does not look: read first. */
    bool wait = true, late = false;
    for (unsigned i = 0; i < k; i++)
        wait &= !mine[i]->tls;
    while (b->outstanding > 0 && !late) {
        unsigned n = 0;
        for (unsigned i = 0; i < k; i++)
            if (rx_held(mine[i], b, gen[i]))
                live[n++] = mine[i];
        if (n == 0)
            break;
        /* after an answer, more may be there already */
        wait = rx_turn(live, n, wait, deadline_ms, &late) == RX_AGAIN;
    }
    /* TLS: records a session read ahead are invisible to the watch; read them before the I/O
     * thread takes over. */
    for (unsigned i = 0; i < k; i++) {
        struct tcp_conn *c = mine[i];
        while (c->tls && rx_held(c, b, gen[i]) && tcp_conn_busy(c) > 0 &&
               rx_turn(&c, 1, false, deadline_ms, &late) == RX_FRAME) {
        }
    }
    for (unsigned i = 0; i < k; i++)
        if (mine[i]->reader == TCP_READER_INLINE && mine[i]->inline_b == b)
            rx_release(mine[i]);
    return true;
}
