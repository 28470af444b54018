/*
 * One initiator connection of the tcp transport (struct tcp_conn, tcp.h): the slot table of its
 * requests in flight and how a request ends (answered, failed, given up), breaking the
 * connection, and its set-up and tear-down. Reading its answers is tcp_rx.c's, opening it
 * tcp_connect.c's. The locking rules are in tcp.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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
    if (--b->outstanding > 0)
        return;
    if (b->waiting)
        pthread_cond_signal(&b->cv);
    else if (b->done && !b->posting)
        tcp_posted_end_locked(c->peer, b);
}

void tcp_posted_end_locked(struct tcp_peer *p, struct tcp_batch *b)
{
    if (--p->active == 0 && p->closing)
        pthread_cond_broadcast(&p->cv);
    int rc = atomic_load(&b->rc);
    b->done(b->done_arg, rc, rc ? b->msg : "");
    free(b);
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

/*
 * Reset @fd at once: its send queue is dropped and an RST sent. shutdown() alone would send the
 * queue, then a FIN: after a transfer timed out (a cut link, a stalled target) the target could
 * still receive, and write into its memory, bytes of a call that has returned with an error,
 * whenever the path comes back. connect(AF_UNSPEC) disconnects a TCP socket while it stays open
 * (a reader may still be using it); SO_LINGER 0 makes the final close() a reset too.
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
 * Initiator side: a connection's lifetime
 * ------------------------------------------------------------------------------------------- */

int tcp_conn_init(struct tcp_peer *p, struct tcp_conn *c, unsigned idx)
{
    int rc;
    c->peer = p;
    c->idx = idx;
    c->fd = -1;
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
