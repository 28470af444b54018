/*
 * Transfers of the tcp transport (the ops transfer and notify): a batch's elements are posted as
 * chunks, or gathered into WRITEVs, each sent by the calling thread from the caller's memory on
 * one of the peer's connections; then the caller waits for the answers, reading them itself when
 * its batch is one request (the reader role, tcp.h). The locking rules are in tcp.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/sockios.h>
#include <time.h>

#include "common/thread.h"
#include "common/wire.h"
#include "transport/tcp.h"

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
 * Did the target close @c while it was idle (its idle timeout)? Its FIN is then waiting on the
 * socket: sending on it anyway would fail the request as "closed by the peer", so look first
 * (a non-blocking peek, only on a connection idle for TCP_IDLE_CHECK_MS). Under peer->mu.
 */
static bool tcp_idle_closed_locked(struct tcp_conn *c)
{
    if (c->nfree != KVF_TCP_MAX_INFLIGHT || c->reader != TCP_READER_NONE ||
        kvf__now_ms() - c->idle_since_ms < TCP_IDLE_CHECK_MS)
        return false;
    char byte;
    ssize_t n = recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/*
 * The first connection to a peer opens the others too, so that the first call whose chunk is
 * routed to another connection does not pay a connect, a hello (and a handshake) and the
 * target's start of serving it (docs/performance.md, "Cold start"). A connection that fails
 * here is opened again by the call that needs it. Under peer->mu (dropped while connecting).
 */
static void tcp_open_others_locked(struct tcp_peer *p, const struct tcp_conn *first,
                                   uint64_t deadline_ms)
{
    if (p->all_opened)
        return;
    p->all_opened = true;
    for (unsigned i = 0; i < p->nconns && !p->closing; i++) {
        struct tcp_conn *o = &p->conns[i];
        if (o != first && o->state == TCP_CONN_DOWN && tcp_conn_open_locked(o, deadline_ms))
            KVF_DEBUG(TCP_LOG, "opening connection %u to %s ahead of use: %s", i, p->sid,
                      kvf_last_error());
    }
}

/*
 * Register a request in a free slot of @c (there is one): @len bytes at @off of element @elem
 * of @b, or the WRITEV of elements elem..elem+nelem-1. Someone must read its answer: the caller
 * itself (@mine) when its batch's requests each have a connection and nobody reads this one
 * now, else the I/O thread. Returns its req_id, its slot in *@idx. Under peer->mu.
 */
static uint64_t tcp_slot_take_locked(struct tcp_conn *c, struct tcp_batch *b, uint8_t op,
                                     size_t elem, uint32_t nelem, uint64_t off, uint64_t len,
                                     bool mine, unsigned *idx)
{
    const kvf_xfer_t *x = &b->x[elem];
    *idx = c->free_slots[--c->nfree];
    struct tcp_slot *s = &c->slots[*idx];
    uint64_t req_id = (++c->seq << TCP_SLOT_BITS) | *idx;
    s->req_id = req_id;
    s->batch = b;
    s->elem = elem;
    s->nelem = nelem;
    s->refused = UINT32_MAX;
    s->op = op;
    tcp_rx_claim_locked(c, b, mine);
    s->local = (uint8_t *)x->local + off;
    s->remote = x->remote + off;
    s->len = len;
    b->outstanding++;
    return req_id;
}

/* A request's frame, sent from the caller's memory: header, WRITEV segments, payload. */
typedef struct {
    uint8_t hdr[KVF_TCP_HDR_LEN];
    uint8_t segs[KVF_TCP_MAX_SEGS * KVF_TCP_SEG_LEN];
    struct iovec iov[TCP_WRITEV_IOV];
} tcp_frame_t;

/* Fill @f for request @req_id (as tcp_slot_take_locked() registered it, @x its first element);
 * returns the number of iovecs. */
static int tcp_frame_build(tcp_frame_t *f, uint8_t op, uint64_t req_id, const kvf_xfer_t *x,
                           uint32_t nelem, uint64_t off, uint64_t len)
{
    int niov = op == KVF_TCP_READ ? 1 : 2;
    f->iov[0] = (struct iovec){f->hdr, sizeof(f->hdr)};
    if (op == KVF_TCP_WRITEV) {
        tcp_hdr_encode(f->hdr, op, 0, req_id, nelem, len);
        f->iov[1] = (struct iovec){f->segs, (size_t)nelem * KVF_TCP_SEG_LEN};
        for (uint32_t k = 0; k < nelem; k++) {
            kvf__put_le64(f->segs + (size_t)k * KVF_TCP_SEG_LEN, x[k].remote);
            kvf__put_le64(f->segs + (size_t)k * KVF_TCP_SEG_LEN + 8, x[k].len);
            f->iov[niov++] = (struct iovec){x[k].local, x[k].len};
        }
    } else {
        tcp_hdr_encode(f->hdr, op, 0, req_id, x->remote + off, len);
        f->iov[1] = (struct iovec){(uint8_t *)x->local + off, (size_t)len};
    }
    return niov;
}

/*
 * Post one chunk: find a usable connection and a free slot on it, register the request in the
 * slot (so that its reader can complete it), and send its frame from the caller's memory.
 * Returns 0 when the frame was sent (its completion comes later), or a negative code with the
 * batch's error recorded; a request that was registered is then failed or finished already.
 */
static int tcp_post(struct tcp_peer *p, struct tcp_batch *b, uint8_t op, size_t elem,
                    uint32_t nelem, uint64_t off, uint64_t len, bool mine, uint64_t deadline_ms)
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
        if (c->state == TCP_CONN_UP && c->nfree > 0) {
            if (tcp_idle_closed_locked(c)) {
                tcp_conn_break_locked(c, c->gen, -KVF_EPEERGONE,
                                      "closed by the peer while idle (found before sending)");
                continue;
            }
            break;
        }
        if (c->state == TCP_CONN_DOWN || c->state == TCP_CONN_BROKEN) {
            rc = tcp_conn_open_locked(c, deadline_ms);
            if (rc) {
                tcp_batch_fail(b, rc, "tcp %s to %s, element %zu: %s", tcp_op_name(op), p->sid,
                               elem, kvf_last_error());
                goto out_unlock;
            }
            tcp_open_others_locked(p, c, deadline_ms);
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

    unsigned idx;
    uint64_t req_id = tcp_slot_take_locked(c, b, op, elem, nelem, off, len, mine, &idx);
    uint64_t gen = c->gen;
    pthread_mutex_unlock(&p->mu);

    tcp_frame_t f;
    int niov = tcp_frame_build(&f, op, req_id, x, nelem, off, len);

    int lrc = tcp_send_lock(c, deadline_ms);
    if (lrc) {
        /* Never sent: take the request back ourselves (unless the connection broke and failed
         * it meanwhile). */
        pthread_mutex_lock(&p->mu);
        if (c->gen == gen && c->slots[idx].req_id == req_id)
            tcp_slot_fail(c, idx, -KVF_ETIMEDOUT, "timed out waiting to send");
        pthread_mutex_unlock(&p->mu);
        return -KVF_ETIMEDOUT;
    }
    if (c->gen != gen) {
        /* The connection was replaced: this request was failed with it. */
        pthread_mutex_unlock(&c->send_mu);
        return -KVF_EPEERGONE;
    }
    rc = tcp_conn_sendv(c, f.iov, niov, deadline_ms, 0);
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
 * the caller's buffers after transfer() returns. Under peer->mu. A request whose READ payload a
 * reader is receiving right now cannot be withdrawn: its connection is cut, and we wait for the
 * reader to let go of the buffer (its recv() does not block). A reader that comes back to it
 * later finds it given up and drops the rest of its answer.
 */
static void tcp_batch_abort(struct tcp_peer *p, struct tcp_batch *b)
{
    for (unsigned ci = 0; ci < p->nconns; ci++) {
        struct tcp_conn *c = &p->conns[ci];
        bool cut = false;
        for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++) {
            if (!c->slots[i].req_id || c->slots[i].batch != b)
                continue;
            if (c->rx_active == (int)i) {
                tcp_conn_break_locked(c, c->gen, -KVF_EPEERGONE,
                                      "a read timed out while its answer was arriving");
                c->waiters++;
                for (unsigned waited = 0; c->rx_active == (int)i; waited++) {
                    /* The recv() does not block; this only logs if it somehow does. */
                    struct timespec ts;
                    kvf__deadline_ts(&ts, kvf__now_ms() + 1000);
                    if (pthread_cond_timedwait(&c->cv, &p->mu, &ts) == ETIMEDOUT)
                        KVF_ERROR(TCP_LOG,
                                  "waiting %u s for the reader of connection %u to %s "
                                  "to leave a timed-out read's buffer",
                                  waited + 1, c->idx, p->sid);
                }
                c->waiters--;
            }
            if (c->slots[i].req_id && c->slots[i].batch == b) {
                if (b->status && b->status[c->slots[i].elem] >= 0)
                    b->status[c->slots[i].elem] = -KVF_ETIMEDOUT;
                cut |= c->slots[i].op != KVF_TCP_READ;
                tcp_slot_finish(c, i);
            }
        }
        /* A withdrawn write may still be on its way (in this kernel's send queue, or behind a
         * cut link): the connection is aborted, so that none of it lands after we return. */
        if (cut && c->state == TCP_CONN_UP) {
            tcp_fd_abort(c->fd);
            tcp_conn_break_locked(c, c->gen, -KVF_EPEERGONE,
                                  "a write timed out: its unanswered bytes are cut off");
        }
    }
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
        if (tcp_rx_inline_locked(p, b, deadline_ms))
            continue;
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
    tcp_rx_release_locked(p, b);
    if (--p->active == 0 && p->closing)
        pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_cond_destroy(&b->cv);

    int rc = atomic_load(&b->rc);
    if (rc)
        return kvf__err(rc, "%s", b->msg);
    return 0;
}

/*
 * The chunk size of element @x of a batch of @n. A call that moves one large element spreads it
 * over the peer's connections in equal parts (at most p->chunk each), so that the target's I/O
 * threads receive the parts at once rather than one after the other, and the caller reads each
 * part's answer itself (docs/performance.md, "tcp, one block per call").
 */
static uint64_t tcp_step(const struct tcp_peer *p, const kvf_xfer_t *x, size_t n)
{
    uint64_t step = p->chunk;
    if (n == 1 && p->nconns > 1 && x->len >= TCP_SPLIT_MIN) {
        uint64_t part = (x->len + p->nconns - 1) / p->nconns;
        part = (part + TCP_SPLIT_ALIGN - 1) & ~(uint64_t)(TCP_SPLIT_ALIGN - 1);
        if (part < step)
            step = part;
    }
    return step;
}

int tcp_transfer(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
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
        for (size_t i = 0; i < n; i++) {
            uint64_t step = tcp_step(p, &x[i], n);
            left[i] = (uint32_t)((x[i].len + step - 1) / step);
        }
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
        /* The caller reads the answers itself when each goes to a connection of its own. */
        uint64_t step = tcp_step(p, &x[i], n);
        bool mine = n == 1 && (x[i].len + step - 1) / step <= p->nconns;
        for (uint64_t off = 0; off < x[i].len; off += step) {
            if (off && cancel && atomic_load_explicit(cancel, memory_order_relaxed)) {
                pthread_mutex_lock(&p->mu);
                tcp_batch_fail(&b, -KVF_ECANCELED,
                               "tcp transfer to %s: cancelled at element %zu (offset %" PRIu64 ")",
                               p->sid, i, off);
                pthread_mutex_unlock(&p->mu);
                break;
            }
            uint64_t len = x[i].len - off < step ? x[i].len - off : step;
            if (tcp_post(p, &b, op, i, 1, off, len, mine, deadline_ms))
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

int tcp_notify(kvf_tpeer_t *pp, const void *msg, size_t len, uint64_t deadline_ms)
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

/* ---------------------------------------------------------------------------------------------
 * Initiator side: posted batches (the op post)
 * ------------------------------------------------------------------------------------------- */

/* Whether @c's send buffer takes @len more bytes at once. Only half of SO_SNDBUF counts: the
 * kernel charges a segment's overhead to the buffer as well. The buffer's size is kept per
 * socket and read again only when the frame does not fit what was read last (autotuning grows
 * it), so a post costs one ioctl. Under peer->mu and send_mu. */
static bool tcp_sock_room(struct tcp_conn *c, size_t len)
{
    int queued = 0;
    if (ioctl(c->fd, SIOCOUTQ, &queued) < 0 || queued < 0)
        return false;
    if (c->sndbuf_gen != c->gen || (size_t)queued + len > (size_t)c->sndbuf / 2) {
        int sndbuf = 0;
        socklen_t sl = sizeof(sndbuf);
        if (getsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &sl) < 0 || sndbuf <= 0)
            return false;
        c->sndbuf = sndbuf;
        c->sndbuf_gen = c->gen;
    }
    return (size_t)queued + len <= (size_t)c->sndbuf / 2;
}

/* Whether a frame of @len bytes can go out on @c without waiting: it is up and not found closed
 * by the target, a slot is free, nobody sends on it and its socket has room. Then send_mu is
 * held. Under peer->mu (send_mu only tried, so the lock order does not matter). */
static bool tcp_conn_take_now_locked(struct tcp_conn *c, size_t len)
{
    if (c->state != TCP_CONN_UP || c->nfree == 0 || tcp_idle_closed_locked(c))
        return false;
    if (pthread_mutex_trylock(&c->send_mu) != 0)
        return false;
    if (tcp_sock_room(c, len))
        return true;
    pthread_mutex_unlock(&c->send_mu);
    return false;
}

int tcp_post_batch(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                   int *status, kvf_post_done_fn done, void *arg)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    if (!p || !x || n == 0 || n > KVF_TCP_MAX_SEGS || !done)
        return 1;
    /* One request of writes only, as transfer() would send it: one element, or a WRITEV of
     * small ones (a read's payload would land in the caller's memory after it stopped waiting).
     * Up to TCP_POST_MAX bytes: a larger batch goes faster spread over the async threads and
     * the peer's connections. Anything else takes transfer(). */
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (x[i].op != KVF_OP_WRITE || x[i].len == 0 || !x[i].local ||
            x[i].remote + x[i].len < x[i].remote)
            return 1;
        total += x[i].len;
    }
    if (total > TCP_POST_MAX || total > p->chunk)
        return 1;
    uint8_t op = n > 1 ? KVF_TCP_WRITEV : KVF_TCP_WRITE;

    struct tcp_batch *b = calloc(1, sizeof(*b) + n * sizeof(uint32_t));
    if (!b)
        return 1;
    b->x = x;
    b->status = status;
    b->left = (uint32_t *)(void *)(b + 1);
    for (size_t i = 0; i < n; i++)
        b->left[i] = 1;
    atomic_init(&b->rc, 0);
    b->done = done;
    b->done_arg = arg;
    b->posting = true;
    b->deadline_ms = deadline_ms;

    struct tcp_conn *c = NULL;
    pthread_mutex_lock(&p->mu);
    unsigned start = atomic_fetch_add_explicit(&p->rr, 1, memory_order_relaxed);
    for (unsigned j = 0; j < p->nconns && !c && !p->closing; j++) {
        c = &p->conns[(start + j) % p->nconns];
        if (!tcp_conn_take_now_locked(c, (size_t)total + KVF_TCP_HDR_LEN + n * KVF_TCP_SEG_LEN))
            c = NULL;
    }
    if (!c) {
        pthread_mutex_unlock(&p->mu);
        free(b);
        return 1;
    }
    unsigned idx;
    uint64_t req_id = tcp_slot_take_locked(c, b, op, 0, (uint32_t)n, 0, total, false, &idx);
    uint64_t gen = c->gen;
    p->active++;
    pthread_mutex_unlock(&p->mu);

    tcp_frame_t f;
    int niov = tcp_frame_build(&f, op, req_id, x, (uint32_t)n, 0, total);
    int rc = tcp_conn_sendv(c, f.iov, niov, deadline_ms, 0);
    pthread_mutex_unlock(&c->send_mu);

    pthread_mutex_lock(&p->mu);
    if (rc) {
        /* As in tcp_post(): a frame may have gone out in part, so the connection is done for,
         * and its break fails this request with every other on it. */
        tcp_batch_fail(b, rc == -KVF_ETIMEDOUT ? rc : -KVF_EPEERGONE,
                       "tcp %s to %s, element 0 [0x%" PRIx64 ", +%zu): %s", tcp_op_name(op),
                       p->sid, x->remote, x->len,
                       rc == -KVF_ETIMEDOUT ? "timed out sending (the peer stopped reading)"
                                            : kvf_strerror(rc));
        tcp_conn_break_locked(c, gen, -KVF_EPEERGONE, "send of a posted batch failed");
    }
    b->posting = false;
    if (b->outstanding == 0)
        tcp_posted_end_locked(p, b);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* Time out the posted requests on @p whose batch's deadline passed. A write that timed out may
 * still be on its way, so its connection is cut (as tcp_batch_abort() does), which fails the
 * other requests on it as a broken connection. Under peer->mu. */
static void tcp_posted_expire_peer_locked(struct tcp_peer *p, uint64_t now_ms)
{
    for (unsigned ci = 0; ci < p->nconns; ci++) {
        struct tcp_conn *c = &p->conns[ci];
        bool cut = false;
        for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++) {
            struct tcp_batch *b = c->slots[i].batch;
            if (!c->slots[i].req_id || !b || !b->done || b->deadline_ms > now_ms)
                continue;
            tcp_slot_fail(c, i, -KVF_ETIMEDOUT, "timed out unanswered");
            cut = true;
        }
        if (cut && c->state == TCP_CONN_UP) {
            tcp_fd_abort(c->fd);
            tcp_conn_break_locked(c, c->gen, -KVF_EPEERGONE,
                                  "a posted write timed out: its unanswered bytes are cut off");
        }
    }
}

void tcp_posted_expire(struct tcp_transport *t, uint64_t now_ms)
{
    pthread_mutex_lock(&t->mu);
    for (struct tcp_peer *p = t->peers; p; p = p->next) {
        pthread_mutex_lock(&p->mu);
        tcp_posted_expire_peer_locked(p, now_ms);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_mutex_unlock(&t->mu);
}
