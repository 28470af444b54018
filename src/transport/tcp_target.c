/*
 * The tcp transport's target side: the engine whose registered memory peers write and read.
 *
 * One accept thread; one serving thread per accepted connection. A serving thread reads a fixed
 * 40-byte header, validates it, takes a reference on the registered region the request falls
 * in, and then recv()s a WRITE's payload straight into that memory (or sends a READ's answer
 * straight from it) with blocking calls: no staging buffer, no event loop between the socket and
 * the destination. It serves its connection's requests one at a time, in order, and holds a
 * region reference only while it moves that request's payload, never while it waits for the next
 * header (so unregistering a region is never held up by an idle connection).
 *
 * Nothing is held without bound (docs/operations.md, "Limits of the engine port"): a connection
 * must send its HELLO within KVF_TCP_HELLO_TIMEOUT_MS and is closed once it brought no request
 * for the idle timeout; at most KVF_TCP_MAX_CONNS are served, at most KVF_TCP_MAX_CONNS_PER_ADDR
 * of them from one address. When accept() runs out of file descriptors the accept thread stops
 * polling the listening socket for a while instead of spinning, and a serving thread that ends
 * wakes it to join the thread and close its fd, whether or not anything new is accepted.
 *
 * The checks here are the authoritative ones (docs/protocol.md, "When the target closes a
 * connection"): every length and count is checked against tcp_proto.h's limits before anything
 * is allocated or written, and every range against the region table.
 */
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/thread.h"
#include "common/wire.h"
#include "common/p2p.h"
#include "transport/tcp.h"

/* ---------------------------------------------------------------------------------------------
 * Target side: serving one connection
 * ------------------------------------------------------------------------------------------- */

/* When a frame of @len payload bytes, starting now, must be complete. */
static uint64_t tcp_frame_deadline(uint64_t len)
{
    return kvf__now_ms() + KVF_TCP_FRAME_BASE_MS + len / KVF_TCP_MIN_RATE_BYTES_PER_MS;
}

/*
 * Receive exactly @len bytes on a serving socket (SO_RCVTIMEO = TCP_SERVER_SLICE_MS).
 * @idle_ok: the connection may sit idle before the first byte (waiting for a header), up to the
 *           transport's idle timeout.
 * @deadline_ms: absolute kvf__now_ms() bound on the whole receive, 0 for none (checked every
 *               TCP_SERVER_SLICE_MS).
 * Returns 0; 1 for an orderly end of stream before the first byte when @idle_ok; -EPIPE when the
 * stream ends in the middle; -KVF_ETIMEDOUT when a started transfer stalls, the deadline passes,
 * or (nothing received, *@got_out 0) the connection was idle too long; -KVF_ECLOSED when the
 * transport is stopping; -errno.
 */
static int tcp_srv_recvv(struct tcp_sconn *sc, struct iovec *iov, int cnt, bool idle_ok,
                         uint64_t deadline_ms, size_t *got_out)
{
    size_t got = 0;
    uint64_t last = kvf__now_ms();
    int rc = 0;
    tcp_iov_advance(&iov, &cnt, 0);
    while (cnt > 0) {
        /* Checked before every receive, not only after an idle slice: a trickling client makes
         * each slice return a few bytes. */
        if (deadline_ms && kvf__now_ms() >= deadline_ms) {
            rc = -KVF_ETIMEDOUT;
            break;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t r = recvmsg(sc->fd, &mh, MSG_WAITALL);
        if (r > 0) {
            got += (size_t)r;
            tcp_iov_advance(&iov, &cnt, (size_t)r);
            last = kvf__now_ms();
            continue;
        }
        if (r == 0) {
            rc = (got == 0 && idle_ok) ? 1 : -EPIPE;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            rc = -errno;
            break;
        }
        if (atomic_load(&sc->t->stopping)) {
            rc = -KVF_ECLOSED;
            break;
        }
        /* Only a receive that timed out gets here (once per slice), so the idle check costs a
         * request nothing. */
        uint64_t limit = got == 0 && idle_ok ? sc->t->idle_timeout_ms : KVF_TCP_STALL_TIMEOUT_MS;
        if (kvf__now_ms() - last >= limit) {
            rc = -KVF_ETIMEDOUT;
            break;
        }
    }
    if (got_out)
        *got_out = got;
    return rc;
}

static int tcp_srv_recv(struct tcp_sconn *sc, void *buf, size_t len, bool idle_ok,
                        uint64_t deadline_ms, size_t *got_out)
{
    struct iovec iov = {buf, len};
    return tcp_srv_recvv(sc, &iov, 1, idle_ok, deadline_ms, got_out);
}

static int tcp_srv_drain(struct tcp_sconn *sc, uint64_t len)
{
    uint64_t deadline = tcp_frame_deadline(len);
    if (!sc->scratch) {
        sc->scratch = malloc(TCP_SCRATCH_LEN);
        if (!sc->scratch)
            return -ENOMEM;
    }
    while (len > 0) {
        size_t n = len < TCP_SCRATCH_LEN ? (size_t)len : TCP_SCRATCH_LEN;
        int rc = tcp_srv_recv(sc, sc->scratch, n, false, deadline, NULL);
        if (rc)
            return rc;
        len -= n;
    }
    return 0;
}

/* Send a frame. @deadline_ms: when all of it must be out (0: only the stall timeout bounds it);
 * a READ's answer, which holds a region reference while it goes, gets the same rate deadline as
 * a received payload, so a reader that drains it slowly cannot stall an unregister. */
static int tcp_srv_send(struct tcp_sconn *sc, struct iovec *iov, int cnt, uint64_t deadline_ms)
{
    return tcp_sendv(sc->fd, iov, cnt, deadline_ms, KVF_TCP_STALL_TIMEOUT_MS);
}

/* Answer @h with status @code (a negative kvferry code) and this thread's last-error message. */
static int tcp_srv_send_error(struct tcp_sconn *sc, const tcp_hdr_t *h, int code);

/*
 * Answer a request whose range [@addr, +@len) the region table refused with @code. The table's
 * reason names the exact bounds of the registered region nearby; that stays in this engine's
 * debug log, and the peer learns only which of its own ranges was refused: a peer is not told
 * the layout of this engine's memory.
 */
static int tcp_srv_refuse(struct tcp_sconn *sc, const tcp_hdr_t *h, int code, const char *op,
                          uint64_t addr, uint64_t len)
{
    if (code == -KVF_ENOTREG)
        kvf__err(code, "%s [0x%" PRIx64 ", +%" PRIu64 ") is not inside one registered region", op,
                 addr, len);
    return tcp_srv_send_error(sc, h, code);
}

static int tcp_srv_send_error(struct tcp_sconn *sc, const tcp_hdr_t *h, int code)
{
    uint8_t hdr[KVF_TCP_HDR_LEN];
    const char *msg = kvf_last_error();
    size_t mlen = strnlen(msg, KVF_TCP_MAX_MSG);
    uint32_t status = code < 0 ? (uint32_t)-code : (uint32_t)KVF_EPROTO;
    tcp_hdr_encode(hdr, KVF_TCP_RESP, status, h->req_id, h->addr, mlen);
    struct iovec iov[2] = {{hdr, sizeof(hdr)}, {(void *)msg, mlen}};
    return tcp_srv_send(sc, iov, 2, 0);
}

/* Validate a request header. Returns NULL, or a reason for closing the connection. */
static const char *tcp_srv_check(const tcp_hdr_t *h, bool hello_done, char *why, size_t whylen)
{
    if (!tcp_hdr_common_ok(h, why, whylen))
        return why;
    if (h->type < KVF_TCP_HELLO || h->type > KVF_TCP_STATS || h->type == KVF_TCP_RESP)
        snprintf(why, whylen, "bad frame type %u", (unsigned)h->type);
    else if (!hello_done && h->type != KVF_TCP_HELLO)
        snprintf(why, whylen, "first frame is type %u, not HELLO", (unsigned)h->type);
    else if (hello_done && h->type == KVF_TCP_HELLO)
        snprintf(why, whylen, "second HELLO");
    else if (h->status != 0)
        snprintf(why, whylen, "non-zero status %" PRIu32 " in a request", h->status);
    else if (h->type == KVF_TCP_HELLO && h->len > KVF_TCP_MAX_MSG)
        snprintf(why, whylen, "HELLO length %" PRIu64 " over KVF_TCP_MAX_MSG (%u)", h->len,
                 KVF_TCP_MAX_MSG);
    else if (h->type == KVF_TCP_WRITEV && (h->addr == 0 || h->addr > KVF_TCP_MAX_SEGS))
        snprintf(why, whylen, "WRITEV of %" PRIu64 " segments: want 1..KVF_TCP_MAX_SEGS (%u)",
                 h->addr, KVF_TCP_MAX_SEGS);
    else if (h->type == KVF_TCP_NOTIFY && h->len > KVF_NOTIFY_MAX)
        snprintf(why, whylen, "NOTIFY length %" PRIu64 " over KVF_NOTIFY_MAX (%u)", h->len,
                 KVF_NOTIFY_MAX);
    else if (h->type == KVF_TCP_STATS && (h->len != 0 || h->addr != 0))
        snprintf(why, whylen, "STATS with length %" PRIu64 " and address %" PRIu64 ", want 0 and 0",
                 h->len, h->addr);
    else if (h->len > KVF_TCP_MAX_CHUNK)
        snprintf(why, whylen, "length %" PRIu64 " over KVF_TCP_MAX_CHUNK (%u)", h->len,
                 KVF_TCP_MAX_CHUNK);
    else
        return NULL;
    return why;
}

/* Say which range this connection's request holds now (hi 0: none). */
static void sc_hold(struct tcp_sconn *sc, uint64_t lo, uint64_t hi)
{
    atomic_store_explicit(&sc->hold_lo, lo, memory_order_relaxed);
    atomic_store_explicit(&sc->hold_hi, hi, memory_order_relaxed);
}

size_t tcp_holders(kvf_transport_t *tt, uint64_t addr, uint64_t len, char *buf, size_t buflen)
{
    struct tcp_transport *t = tcp_of(tt);
    size_t n = 0;
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn *sc = t->sconns; sc; sc = sc->next) {
        uint64_t lo = atomic_load_explicit(&sc->hold_lo, memory_order_relaxed);
        uint64_t hi = atomic_load_explicit(&sc->hold_hi, memory_order_relaxed);
        if (atomic_load(&sc->done) || hi <= addr || lo >= addr + len)
            continue;
        char what[KVF_SESSION_ID_MAX + TCP_ADDR_LEN + 16];
        snprintf(what, sizeof(what), "peer %s (%s)", sc->peer_sid[0] ? sc->peer_sid : "?",
                 sc->addr);
        kvf__holders_add(buf, buflen, what);
        n++;
    }
    pthread_mutex_unlock(&t->mu);
    return n;
}

/*
 * Serve a WRITEV: its segment table, then each segment's bytes straight into the region it lies
 * in, under references on all of them. Either every segment is inside a registered region and
 * all are written, or none is: the payload is drained and the answer names the first refused
 * segment in `addr`. Returns 0, a negative I/O code, or 1 with @why set when the frame is
 * malformed (the connection is then closed).
 */
static int tcp_srv_writev(struct tcp_sconn *sc, const tcp_hdr_t *h, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    unsigned n = (unsigned)h->addr;
    if (!sc->segs) {
        sc->segs = malloc(KVF_TCP_MAX_SEGS * KVF_TCP_SEG_LEN);
        sc->refs = calloc(KVF_TCP_MAX_SEGS, sizeof(*sc->refs));
        sc->iov = malloc(KVF_TCP_MAX_SEGS * sizeof(*sc->iov));
        if (!sc->segs || !sc->refs || !sc->iov)
            return -ENOMEM;
    }
    uint64_t deadline = tcp_frame_deadline(h->len);
    int rc = tcp_srv_recv(sc, sc->segs, (size_t)n * KVF_TCP_SEG_LEN, false, deadline, NULL);
    if (rc)
        return rc;
    uint64_t total = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t addr = kvf__get_le64(sc->segs + (size_t)i * KVF_TCP_SEG_LEN);
        uint64_t len = kvf__get_le64(sc->segs + (size_t)i * KVF_TCP_SEG_LEN + 8);
        if (len == 0 || len > h->len - total) {
            snprintf(why, whylen,
                     "WRITEV segment %u: length %" PRIu64 " where %" PRIu64
                     " of the frame's %" PRIu64 " bytes are left",
                     i, len, h->len - total, h->len);
            return 1;
        }
        total += len;
        sc->iov[i].iov_base = (void *)(uintptr_t)addr;
        sc->iov[i].iov_len = (size_t)len;
    }
    if (total != h->len) {
        snprintf(why, whylen, "WRITEV segments total %" PRIu64 " bytes, the frame says %" PRIu64,
                 total, h->len);
        return 1;
    }
    uint64_t lo = UINT64_MAX, hi = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t a = (uintptr_t)sc->iov[i].iov_base;
        lo = a < lo ? a : lo;
        hi = a + sc->iov[i].iov_len > hi ? a + sc->iov[i].iov_len : hi;
    }
    sc_hold(sc, lo, hi);
    unsigned k = 0;
    int arc = 0;
    for (; k < n; k++) {
        arc = kvf__regions_acquire(t->regions, (uintptr_t)sc->iov[k].iov_base, sc->iov[k].iov_len,
                                   &sc->refs[k]);
        if (arc)
            break;
    }
    if (arc) {
        for (unsigned j = 0; j < k; j++)
            kvf__regions_release(t->regions, &sc->refs[j]);
        sc_hold(sc, 0, 0);
        KVF_DEBUG(TCP_LOG, "gathered write from %s refused at segment %u: %s", sc->addr, k,
                  kvf_last_error());
        rc = tcp_srv_drain(sc, h->len);
        if (rc == 0) {
            tcp_hdr_t e = *h;
            e.addr = k;
            rc = tcp_srv_refuse(sc, &e, arc, "write", (uintptr_t)sc->iov[k].iov_base,
                                sc->iov[k].iov_len);
        }
        return rc;
    }
    rc = tcp_srv_recvv(sc, sc->iov, (int)n, false, deadline, NULL);
    for (unsigned j = 0; j < n; j++)
        kvf__regions_release(t->regions, &sc->refs[j]);
    sc_hold(sc, 0, 0);
    if (rc == 0) {
        uint8_t resp[KVF_TCP_HDR_LEN];
        tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h->req_id, n, 0);
        struct iovec iov = {resp, sizeof(resp)};
        rc = tcp_srv_send(sc, &iov, 1, 0);
    }
    return rc;
}

/* Answer a STATS request with the engine's statistics (or the error the callback gave). */
static int tcp_srv_stats(struct tcp_sconn *sc, const tcp_hdr_t *h)
{
    struct tcp_transport *t = sc->t;
    uint8_t *body = NULL;
    size_t len = 0;
    int rc = t->stats_cb ? t->stats_cb(t->stats_arg, &body, &len)
                         : kvf__err(-KVF_ENOTSUP, "%s gives no statistics", t->local_sid);
    if (rc == 0 && len > KVF_TCP_MAX_STATS)
        rc = kvf__err(-KVF_ETOOBIG, "statistics of %zu bytes exceed KVF_TCP_MAX_STATS", len);
    if (rc < 0) {
        free(body);
        return tcp_srv_send_error(sc, h, rc);
    }
    uint8_t resp[KVF_TCP_HDR_LEN];
    tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h->req_id, 0, len);
    struct iovec iov[2] = {{resp, sizeof(resp)}, {body, len}};
    rc = tcp_srv_send(sc, iov, 2, tcp_frame_deadline(len));
    free(body);
    return rc;
}

static const char *tcp_io_reason(int rc, char *buf, size_t len)
{
    if (rc == -EPIPE)
        return "connection closed in the middle of a frame";
    if (rc == -KVF_ETIMEDOUT)
        return "frame too slow (no progress for KVF_TCP_STALL_TIMEOUT_MS, below the minimum "
               "rate, or no hello within KVF_TCP_HELLO_TIMEOUT_MS)";
    snprintf(buf, len, "%s", kvf_strerror(rc));
    return buf;
}

/* The answer of an engine with a key to a client that sent a plain HELLO (it has no key): the
 * rest of that HELLO is read, so that closing sends a FIN the client reads after the answer and
 * not a reset that would hide it, and a RESP with KVF_EAUTH says what is missing. */
static void tcp_srv_refuse_plain(struct tcp_sconn *sc, const uint8_t first[KVF_AUTH_HDR_LEN],
                                 uint64_t deadline_ms)
{
    uint8_t hbuf[KVF_TCP_HDR_LEN], drain[KVF_TCP_MAX_MSG];
    memcpy(hbuf, first, KVF_AUTH_HDR_LEN);
    if (kvf__auth_io(sc->fd, hbuf + KVF_AUTH_HDR_LEN, KVF_TCP_HDR_LEN - KVF_AUTH_HDR_LEN, false,
                     deadline_ms))
        return;
    tcp_hdr_t h;
    tcp_hdr_decode(hbuf, &h);
    if (h.type != KVF_TCP_HELLO || h.len > KVF_TCP_MAX_MSG ||
        kvf__auth_io(sc->fd, drain, (size_t)h.len, false, deadline_ms))
        return;
    kvf__err(-KVF_EAUTH, "engine %s requires the cluster secret: this side has no auth key "
                         "(set an auth key file, e.g. KVFERRY_AUTH_KEY_FILE)",
             sc->t->local_sid);
    uint8_t hdr[KVF_TCP_HDR_LEN];
    const char *msg = kvf_last_error();
    size_t mlen = strnlen(msg, KVF_TCP_MAX_MSG);
    tcp_hdr_encode(hdr, KVF_TCP_RESP, KVF_EAUTH, h.req_id, 0, mlen);
    uint8_t out[KVF_TCP_HDR_LEN + KVF_TCP_MAX_MSG];
    memcpy(out, hdr, sizeof(hdr));
    memcpy(out + sizeof(hdr), msg, mlen);
    (void)kvf__auth_io(sc->fd, out, sizeof(hdr) + mlen, true, deadline_ms);
}

/*
 * The handshake of an engine with a key, before any frame is read: on success sc->peer_sid is
 * the client's proven identity, which its HELLO must repeat. Returns NULL, or the reason the
 * connection is closed (the client has been told, in its protocol, where it can be).
 */
static const char *tcp_srv_auth(struct tcp_sconn *sc, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    uint64_t deadline = kvf__now_ms() + KVF_AUTH_TIMEOUT_MS;
    char id[KVF_AUTH_MAX_ID + 1];
    uint8_t first[KVF_AUTH_HDR_LEN];
    size_t first_len = 0;
    char reason[128];
    int rc = kvf__auth_server(sc->fd, &t->auth, t->local_sid, deadline, id, first, &first_len,
                              reason, sizeof(reason));
    if (rc == 0) {
        size_t keep = strnlen(id, sizeof(sc->peer_sid) - 1);
        memcpy(sc->peer_sid, id, keep);
        sc->peer_sid[keep] = '\0';
        KVF_DEBUG(TCP_LOG, "%s at %s proved the cluster secret", sc->peer_sid, sc->addr);
        return NULL;
    }
    if (rc == -KVF_EPROTO && first_len == KVF_AUTH_HDR_LEN &&
        kvf__get_le32(first) == KVF_TCP_MAGIC)
        tcp_srv_refuse_plain(sc, first, deadline);
    else if (rc == -KVF_EPROTO && first_len == KVF_AUTH_HDR_LEN &&
             kvf__get_le32(first) == KVF_P2P_MAGIC)
        tcp_p2p_refuse(t, sc->fd, first, deadline); /* a P2P asker without a key */
    snprintf(why, whylen, "authentication failed: %s", reason);
    return why;
}

static void *tcp_sconn_main(void *arg)
{
    struct tcp_sconn *sc = arg;
    struct tcp_transport *t = sc->t;
    uint8_t hbuf[KVF_TCP_HDR_LEN];
    char why[160];
    const char *reason = NULL;
    bool hello_done = false;
    uint64_t hello_deadline = kvf__now_ms() + KVF_TCP_HELLO_TIMEOUT_MS;
    int rc;

    /* With a key, nothing but the handshake is read until the client proved it. */
    if (t->auth.len)
        reason = tcp_srv_auth(sc, why, sizeof(why));
    for (; !reason;) {
        size_t got = 0;
        tcp_hdr_t h;
        /* Before the HELLO a connection has a deadline; afterwards it may idle for the idle
         * timeout between requests. */
        rc = tcp_srv_recv(sc, hbuf, sizeof(hbuf), true, hello_done ? 0 : hello_deadline, &got);
        if (rc == 1 || rc == -KVF_ECLOSED) {
            KVF_DEBUG(TCP_LOG, "connection from %s closed", sc->addr);
            break;
        }
        if (rc == -KVF_ETIMEDOUT && got == 0 && hello_done) {
            /* Routine: the initiator reconnects on its next transfer. */
            KVF_LOG_RATELIMITED(KVF_LOG_INFO, TCP_LOG,
                                "closing connection from %s (%s): no request for %u ms "
                                "(idle timeout)",
                                sc->addr, sc->peer_sid, t->idle_timeout_ms);
            break;
        }
        if (rc == -KVF_ETIMEDOUT && got == 0) {
            snprintf(why, sizeof(why), "no HELLO within %u ms",
                     t->idle_timeout_ms < KVF_TCP_HELLO_TIMEOUT_MS ? t->idle_timeout_ms
                                                                   : KVF_TCP_HELLO_TIMEOUT_MS);
            reason = why;
            break;
        }
        if (rc) {
            if (rc == -EPIPE) {
                snprintf(why, sizeof(why), "truncated header (%zu of %u bytes)", got,
                         KVF_TCP_HDR_LEN);
                reason = why;
            } else {
                reason = tcp_io_reason(rc, why, sizeof(why));
            }
            break;
        }
        if (!hello_done && kvf__get_le32(hbuf) == KVF_P2P_MAGIC) {
            /* A P2P record request instead of a HELLO: answered, then the connection ends. */
            if (tcp_p2p_serve(t, sc->fd, sc->addr, hbuf, why, sizeof(why)) < 0)
                reason = why;
            break;
        }
        tcp_hdr_decode(hbuf, &h);
        if (!hello_done && h.magic == KVF_AUTH_MAGIC) {
            /* A client with a key, and none here: tell it so in its protocol. The rest of its
             * hello is read first, so that it reads the answer and not a reset. */
            uint8_t rest[KVF_AUTH_MAX_MSG];
            size_t blen = kvf__get_le16(hbuf + 6);
            if (blen + KVF_AUTH_HDR_LEN > KVF_TCP_HDR_LEN && blen <= KVF_AUTH_MAX_BODY)
                (void)kvf__auth_io(sc->fd, rest, blen + KVF_AUTH_HDR_LEN - KVF_TCP_HDR_LEN,
                                   false, hello_deadline);
            kvf__auth_send_refused(sc->fd,
                                   "this engine has no auth key: the cluster secret is not "
                                   "configured on both sides",
                                   hello_deadline);
            reason = "authentication failed: the client has an auth key, this engine none";
            break;
        }
        reason = tcp_srv_check(&h, hello_done, why, sizeof(why));
        if (reason)
            break;
        if (h.type != KVF_TCP_HELLO && h.type != KVF_TCP_NOTIFY &&
            atomic_load(&t->test_close_left) > 0 && atomic_fetch_sub(&t->test_close_left, 1) > 0) {
            KVF_INFO(TCP_LOG, "closing connection from %s at its request (%s)", sc->addr,
                     TCP_TEST_CLOSE_ENV);
            break;
        }

        if (h.type == KVF_TCP_HELLO) {
            char sid[KVF_TCP_MAX_MSG + 1];
            rc = tcp_srv_recv(sc, sid, (size_t)h.len, false, hello_deadline, NULL);
            if (rc) {
                reason = tcp_io_reason(rc, why, sizeof(why));
                break;
            }
            if (t->auth.len &&
                (h.len != strlen(sc->peer_sid) || memcmp(sid, sc->peer_sid, (size_t)h.len))) {
                /* The proven identity is the only one: a HELLO may not claim another. */
                kvf__err(-KVF_EAUTH, "HELLO claims another session id than the one %s proved",
                         sc->peer_sid);
                (void)tcp_srv_send_error(sc, &h, -KVF_EAUTH);
                snprintf(why, sizeof(why),
                         "authentication failed: HELLO claims another session id than the "
                         "proven %.64s",
                         sc->peer_sid);
                reason = why;
                break;
            }
            /* Without a key the session id is for the log only; keep it printable. */
            kvf__printable(sid, (size_t)h.len + 1, sid, (size_t)h.len);
            KVF_DEBUG(TCP_LOG, "hello from %s at %s", sid, sc->addr);
            /* A longer one is no session id; it is kept cut (for the log) all the same. */
            size_t keep = strnlen(sid, sizeof(sc->peer_sid) - 1);
            memcpy(sc->peer_sid, sid, keep);
            sc->peer_sid[keep] = '\0';
            hello_done = true;
            uint8_t resp[KVF_TCP_HDR_LEN];
            tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, 0, 0);
            struct iovec iov = {resp, sizeof(resp)};
            rc = tcp_srv_send(sc, &iov, 1, 0);
        } else if (h.type == KVF_TCP_WRITEV) {
            rc = tcp_srv_writev(sc, &h, why, sizeof(why));
            if (rc == 1) {
                reason = why;
                break;
            }
        } else if (h.type == KVF_TCP_STATS) {
            rc = tcp_srv_stats(sc, &h);
        } else if (h.type == KVF_TCP_NOTIFY) {
            /* The sender sends it only once every request of its batch has been answered, so
             * that batch's data is in place before the notification is queued. */
            uint8_t nbuf[KVF_NOTIFY_MAX];
            rc = tcp_srv_recv(sc, nbuf, (size_t)h.len, false, tcp_frame_deadline(h.len), NULL);
            if (rc == 0) {
                int nrc = t->notify_cb
                              ? t->notify_cb(t->notify_arg, sc->peer_sid, nbuf, (size_t)h.len)
                              : kvf__err(-KVF_ENOTSUP, "%s takes no notifications", t->local_sid);
                if (nrc == 0) {
                    uint8_t resp[KVF_TCP_HDR_LEN];
                    tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, 0, 0);
                    struct iovec iov = {resp, sizeof(resp)};
                    rc = tcp_srv_send(sc, &iov, 1, 0);
                } else {
                    rc = tcp_srv_send_error(sc, &h, nrc);
                }
            }
        } else if (h.type == KVF_TCP_WRITE) {
            kvf_region_ref_t ref = {0};
            sc_hold(sc, h.addr, h.addr + h.len);
            int arc = kvf__regions_acquire(t->regions, h.addr, h.len, &ref);
            if (arc == 0) {
                /* Straight into the registered memory: the region reference keeps it registered
                 * until the last byte is in. */
                rc = tcp_srv_recv(sc, (void *)(uintptr_t)h.addr, (size_t)h.len, false,
                                  tcp_frame_deadline(h.len), NULL);
                kvf__regions_release(t->regions, &ref);
                sc_hold(sc, 0, 0);
                if (rc == 0) {
                    uint8_t resp[KVF_TCP_HDR_LEN];
                    tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, h.addr, 0);
                    struct iovec iov = {resp, sizeof(resp)};
                    rc = tcp_srv_send(sc, &iov, 1, 0);
                }
            } else {
                sc_hold(sc, 0, 0);
                KVF_DEBUG(TCP_LOG, "write from %s refused: %s", sc->addr, kvf_last_error());
                rc = tcp_srv_drain(sc, h.len);
                if (rc == 0)
                    rc = tcp_srv_refuse(sc, &h, arc, "write", h.addr, h.len);
            }
        } else {
            kvf_region_ref_t ref = {0};
            sc_hold(sc, h.addr, h.addr + h.len);
            int arc = kvf__regions_acquire(t->regions, h.addr, h.len, &ref);
            if (arc == 0) {
                uint8_t resp[KVF_TCP_HDR_LEN];
                tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, h.addr, h.len);
                struct iovec iov[2] = {{resp, sizeof(resp)},
                                       {(void *)(uintptr_t)h.addr, (size_t)h.len}};
                rc = tcp_srv_send(sc, iov, 2, tcp_frame_deadline(h.len));
                kvf__regions_release(t->regions, &ref);
                sc_hold(sc, 0, 0);
            } else {
                sc_hold(sc, 0, 0);
                KVF_DEBUG(TCP_LOG, "read from %s refused: %s", sc->addr, kvf_last_error());
                rc = tcp_srv_refuse(sc, &h, arc, "read", h.addr, h.len);
            }
        }
        if (rc) {
            if (rc != -KVF_ECLOSED)
                reason = tcp_io_reason(rc, why, sizeof(why));
            break;
        }
    }

    /* A connection cut by destroy() is not the peer's fault: no warning for it. */
    if (reason && !atomic_load(&t->stopping))
        KVF_WARN_RATELIMITED(TCP_LOG, "closing connection from %s: %s", sc->addr, reason);
    /* The fd stays open (only shut down) until the thread is joined, so destroy() may call
     * shutdown() on it at any time without racing a reuse of the number. */
    shutdown(sc->fd, SHUT_RDWR);
    free(sc->scratch);
    sc->scratch = NULL;
    free(sc->segs);
    free(sc->refs);
    free(sc->iov);
    sc->segs = NULL;
    sc->refs = NULL;
    sc->iov = NULL;
    atomic_store(&sc->done, true);
    /* The last use of anything the thread shares: the accept thread may free sc once it sees
     * done, but t lives until every serving thread has been joined. */
    uint64_t one = 1;
    if (write(t->reap_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        KVF_DEBUG(TCP_LOG, "serving thread: waking the accept thread: %s", strerror(errno));
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Target side: accepting connections
 * ------------------------------------------------------------------------------------------- */

void tcp_reap_sconns(struct tcp_transport *t, bool all)
{
    struct tcp_sconn *dead = NULL;
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn **pp = &t->sconns; *pp;) {
        struct tcp_sconn *sc = *pp;
        if (all || atomic_load(&sc->done)) {
            *pp = sc->next;
            sc->next = dead;
            dead = sc;
            t->nsconns--;
        } else {
            pp = &sc->next;
        }
    }
    pthread_mutex_unlock(&t->mu);
    while (dead) {
        struct tcp_sconn *sc = dead;
        dead = sc->next;
        pthread_join(sc->thread, NULL);
        close(sc->fd);
        free(sc);
    }
}

/* The remote IP of @ss into @ip: 4 bytes for IPv4 (and IPv4-mapped IPv6), else 16. */
static uint8_t tcp_sockaddr_ip(const struct sockaddr_storage *ss, uint8_t ip[16])
{
    if (ss->ss_family == AF_INET) {
        memcpy(ip, &((const struct sockaddr_in *)(const void *)ss)->sin_addr, 4);
        return 4;
    }
    const struct in6_addr *a6 = &((const struct sockaddr_in6 *)(const void *)ss)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a6)) {
        memcpy(ip, a6->s6_addr + 12, 4);
        return 4;
    }
    memcpy(ip, a6->s6_addr, 16);
    return 16;
}

/* accept() failed for want of a file descriptor or memory: retrying at once cannot succeed. */
static bool tcp_accept_starved(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

/* Connections served from @sc's address. Under t->mu. */
static unsigned tcp_conns_from(const struct tcp_transport *t, const struct tcp_sconn *sc)
{
    unsigned n = 0;
    for (const struct tcp_sconn *o = t->sconns; o; o = o->next)
        n += o->ip_len == sc->ip_len && memcmp(o->ip, sc->ip, sc->ip_len) == 0;
    return n;
}

/* Accept one connection and start its serving thread. Returns 0, or the errno of a failed
 * accept(). Every refusal is logged at most KVF_LOG_RATELIMIT_BURST times a second. */
static int tcp_accept_one(struct tcp_transport *t)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = accept4(t->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR && err != ECONNABORTED)
            KVF_WARN_RATELIMITED(
                TCP_LOG, "accept on %s: %s%s", t->listen_str, strerror(err),
                tcp_accept_starved(err) ? " (pausing; raise ulimit -n if this persists)" : "");
        return err;
    }
    tcp_reap_sconns(t, false);

    struct tcp_sconn *sc = calloc(1, sizeof(*sc));
    char addr[TCP_ADDR_LEN];
    tcp_sockaddr_format(&ss, addr, sizeof(addr));
    if (!sc) {
        KVF_WARN_RATELIMITED(TCP_LOG, "refusing connection from %s: out of memory", addr);
        goto out_close;
    }
    sc->t = t;
    sc->fd = fd;
    sc->ip_len = tcp_sockaddr_ip(&ss, sc->ip);
    snprintf(sc->addr, sizeof(sc->addr), "%s", addr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    tcp_set_timeout(fd, SO_RCVTIMEO, TCP_SERVER_SLICE_MS);
    tcp_set_timeout(fd, SO_SNDTIMEO, TCP_SERVER_SLICE_MS);

    pthread_mutex_lock(&t->mu);
    if (t->nsconns >= KVF_TCP_MAX_CONNS) {
        pthread_mutex_unlock(&t->mu);
        KVF_WARN_RATELIMITED(TCP_LOG, "refusing connection from %s: KVF_TCP_MAX_CONNS (%u) reached",
                             addr, KVF_TCP_MAX_CONNS);
        goto out_free;
    }
    if (tcp_conns_from(t, sc) >= KVF_TCP_MAX_CONNS_PER_ADDR) {
        pthread_mutex_unlock(&t->mu);
        KVF_WARN_RATELIMITED(TCP_LOG,
                             "refusing connection from %s: KVF_TCP_MAX_CONNS_PER_ADDR (%u) "
                             "connections from that address are open",
                             addr, KVF_TCP_MAX_CONNS_PER_ADDR);
        goto out_free;
    }
    int rc =
        kvf__thread_start(&sc->thread, "kvf-tcp-serve", KVF_THREAD_SMALL_STACK, tcp_sconn_main, sc);
    if (rc) {
        pthread_mutex_unlock(&t->mu);
        KVF_WARN_RATELIMITED(TCP_LOG, "refusing connection from %s: thread: %s", addr,
                             strerror(-rc));
        goto out_free;
    }
    sc->next = t->sconns;
    t->sconns = sc;
    t->nsconns++;
    pthread_mutex_unlock(&t->mu);
    KVF_DEBUG(TCP_LOG, "accepted connection from %s on %s", addr, t->listen_str);
    return 0;

out_free:
    free(sc);
out_close:
    close(fd);
    return 0;
}

void *tcp_accept_main(void *arg)
{
    struct tcp_transport *t = arg;
    uint64_t paused_until = 0; /* kvf__now_ms() until which the listening socket is not polled */
    while (!atomic_load(&t->stopping)) {
        int timeout = -1;
        if (paused_until) {
            uint64_t now = kvf__now_ms();
            if (now < paused_until)
                timeout = (int)(paused_until - now);
            else
                paused_until = 0;
        }
        struct pollfd pf[3] = {{.fd = t->wake_fd, .events = POLLIN},
                               {.fd = t->reap_fd, .events = POLLIN},
                               {.fd = t->listen_fd, .events = POLLIN}};
        int n = poll(pf, paused_until ? 2 : 3, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            KVF_ERROR(TCP_LOG, "poll on %s: %s", t->listen_str, strerror(errno));
            break;
        }
        if (pf[0].revents)
            break;
        if (pf[1].revents) {
            uint64_t v;
            if (read(t->reap_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                KVF_DEBUG(TCP_LOG, "reap eventfd on %s: %s", t->listen_str, strerror(errno));
            tcp_reap_sconns(t, false);
            /* Descriptors were freed: try accepting again at once. */
            paused_until = 0;
        }
        if (!paused_until && pf[2].revents) {
            int err = tcp_accept_one(t);
            /* The listening socket stays readable while connections wait: polling it again
             * would spin. Wait for a served connection to end, or a short pause. */
            if (tcp_accept_starved(err))
                paused_until = kvf__now_ms() + TCP_ACCEPT_PAUSE_MS;
        }
    }
    return NULL;
}
