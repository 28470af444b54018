/*
 * The tcp transport's target side: the engine whose registered memory peers write and read.
 *
 * One served connection is a state machine over a non-blocking socket, driven by the I/O thread
 * that owns it (tcp_pool.c) whenever the socket is ready and once a second for its timers. It
 * reads a fixed 40-byte header, validates it, takes a reference on the registered region the
 * request falls in, and then receives a WRITE's payload straight into that memory (or sends a
 * READ's answer straight from it): no staging buffer, whatever the number of EAGAINs between the
 * first byte and the last (sc->rp/rcnt and sc->wp/wcnt say what is left). It serves its
 * connection's requests one at a time, in order: while an answer is being sent nothing more is
 * read, so answers leave in request order and TCP flow control holds the next requests back. A
 * region reference is held only while that request's payload moves, never while the connection
 * waits for the next header (so unregistering a region is never held up by an idle connection).
 *
 * Nothing is held without bound (docs/operations.md, "Limits of the engine port"): a connection
 * must finish the handshake within KVF_AUTH_TIMEOUT_MS and its HELLO within
 * KVF_TCP_HELLO_TIMEOUT_MS, is closed once it brought no request for the idle timeout, and a
 * frame it started must progress (KVF_TCP_STALL_TIMEOUT_MS) and end by its rate deadline.
 *
 * The checks here are the authoritative ones (docs/protocol.md, "When the target closes a
 * connection"): every length and count is checked against tcp_proto.h's limits before anything
 * is allocated or written, and every range against the region table.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common/wire.h"
#include "common/p2p.h"
#include "transport/tcp.h"

/* Bytes one connection may move in one turn before its I/O thread serves the others. */
#define SC_TURN_BYTES (4u << 20)

/* When a frame of @len payload bytes, starting now, must be complete. */
static uint64_t tcp_frame_deadline(uint64_t len)
{
    return kvf__now_ms() + KVF_TCP_FRAME_BASE_MS + len / KVF_TCP_MIN_RATE_BYTES_PER_MS;
}

/* Say which range this connection's request holds now (hi 0: none). */
static void sc_hold(struct tcp_sconn *sc, uint64_t lo, uint64_t hi)
{
    atomic_store_explicit(&sc->hold_lo, lo, memory_order_relaxed);
    atomic_store_explicit(&sc->hold_hi, hi, memory_order_relaxed);
}

/* ---------------------------------------------------------------------------------------------
 * Receiving and answering
 * ------------------------------------------------------------------------------------------- */

/* Receive into @cnt iovecs (consumed as bytes arrive) for @step. */
static void sc_recv_iov(struct tcp_sconn *sc, tcp_sc_step_t step, struct iovec *iov, int cnt)
{
    sc->step = step;
    sc->got = 0;
    sc->rp = iov;
    sc->rcnt = cnt;
    tcp_iov_advance(&sc->rp, &sc->rcnt, 0);
}

static void sc_recv(struct tcp_sconn *sc, tcp_sc_step_t step, void *buf, size_t len)
{
    sc->rio[0] = (struct iovec){buf, len};
    sc_recv_iov(sc, step, sc->rio, 1);
}

/* Wait for the next frame header (between frames: the idle timeout applies). */
static void sc_next_hdr(struct tcp_sconn *sc)
{
    sc->deadline_ms = 0;
    sc_recv(sc, SC_HDR, sc->hbuf, KVF_TCP_HDR_LEN);
}

/* Send @a[@alen] then @b[@blen]; nothing is read until both are out. */
static void sc_send(struct tcp_sconn *sc, const void *a, size_t alen, const void *b, size_t blen)
{
    sc->wio[0] = (struct iovec){(void *)a, alen};
    sc->wio[1] = (struct iovec){(void *)b, blen};
    sc->wp = sc->wio;
    sc->wcnt = 2;
    tcp_iov_advance(&sc->wp, &sc->wcnt, 0);
    sc->want_out = true;
}

/* Answer the current request with status 0, echoing @addr, with @body (@len bytes). */
static void sc_answer(struct tcp_sconn *sc, uint64_t addr, const void *body, size_t len)
{
    tcp_hdr_encode(sc->obuf, KVF_TCP_RESP, 0, sc->h.req_id, addr, len);
    sc_send(sc, sc->obuf, KVF_TCP_HDR_LEN, body, len);
}

/* Answer the current request with status @code (negative) and the message in sc->small, which
 * sc_keep_error() filled, echoing @addr. */
static void sc_answer_error(struct tcp_sconn *sc, int code, uint64_t addr)
{
    size_t mlen = strnlen((const char *)sc->small, KVF_TCP_MAX_MSG);
    uint32_t status = code < 0 ? (uint32_t)-code : (uint32_t)KVF_EPROTO;
    tcp_hdr_encode(sc->obuf, KVF_TCP_RESP, status, sc->h.req_id, addr, mlen);
    sc_send(sc, sc->obuf, KVF_TCP_HDR_LEN, sc->small, mlen);
}

/* Keep this thread's last-error message for an answer sent later (the thread serves others
 * meanwhile). */
static void sc_keep_error(struct tcp_sconn *sc)
{
    snprintf((char *)sc->small, KVF_TCP_MAX_MSG + 1, "%s", kvf_last_error());
}

/*
 * A request whose range [@addr, +@len) the region table refused with @code: the message. The
 * table's reason names the exact bounds of the registered region nearby; that stays in this
 * engine's debug log, and the peer learns only which of its own ranges was refused: a peer is
 * not told the layout of this engine's memory.
 */
static void sc_refusal(struct tcp_sconn *sc, int code, const char *op, uint64_t addr, uint64_t len)
{
    KVF_DEBUG(TCP_LOG, "%s from %s refused: %s", op, sc->addr, kvf_last_error());
    if (code == -KVF_ENOTREG)
        kvf__err(code, "%s [0x%" PRIx64 ", +%" PRIu64 ") is not inside one registered region", op,
                 addr, len);
    sc_keep_error(sc);
}

/* Drop the current frame's payload (sc->drain_left bytes), then answer sc->refuse_code. */
static int sc_drain(struct tcp_sconn *sc)
{
    if (sc->drain_left == 0) {
        sc_next_hdr(sc);
        sc_answer_error(sc, sc->refuse_code, sc->refuse_addr);
        return 0;
    }
    if (!sc->scratch) {
        sc->scratch = malloc(TCP_SCRATCH_LEN);
        if (!sc->scratch)
            return -ENOMEM;
    }
    size_t n = sc->drain_left < TCP_SCRATCH_LEN ? (size_t)sc->drain_left : TCP_SCRATCH_LEN;
    sc->drain_left -= n;
    sc_recv(sc, SC_DRAIN, sc->scratch, n);
    return 0;
}

/* Close with @reason after the answer now queued has gone out. */
static void sc_close_after(struct tcp_sconn *sc, const char *reason)
{
    snprintf(sc->close_why, sizeof(sc->close_why), "%s", reason);
    sc->close_after = true;
}

/* ---------------------------------------------------------------------------------------------
 * The handshake (engines with a key) and the mismatched configurations
 * ------------------------------------------------------------------------------------------- */

/* Start the protocol proper (after the TLS handshake, with data TLS): the handshake of the
 * secret, or the HELLO. A plain client of an engine with data TLS is read as far as its first
 * message's header, to be refused in its protocol (sc_auth_hdr). */
static void sc_start(struct tcp_sconn *sc)
{
    sc->deadline_ms = 0;
    if (sc->need_tls) {
        sc_recv(sc, SC_AUTH_HDR, sc->hbuf, KVF_AUTH_HDR_LEN);
    } else if (sc->t->auth.len) {
        sc->auth = malloc(sizeof(*sc->auth));
        if (sc->auth)
            kvf__auth_srv_init(sc->auth, &sc->t->auth, sc->t->local_sid);
        /* Without memory for it the first message fails the connection (SC_AUTH_HDR). */
        sc_recv(sc, SC_AUTH_HDR, sc->hbuf, KVF_AUTH_HDR_LEN);
    } else {
        sc_next_hdr(sc);
    }
}

void tcp_sc_begin(struct tcp_sconn *sc)
{
    uint64_t now = kvf__now_ms();
    sc->start_ms = now;
    sc->last_ms = now;
    sc->idle_since = now;
    if (sc->t->tls_srv) {
        sc->step = SC_TLS;
        sc->deadline_ms = now + KVF_TLS_HANDSHAKE_MS;
    } else {
        sc_start(sc);
    }
}

/* Send the handshake message @type with @reason as its body, then close with @why. */
static void sc_auth_refuse(struct tcp_sconn *sc, const char *reason, const char *why)
{
    size_t rl = strnlen(reason, KVF_AUTH_MAX_ID);
    size_t n = kvf__auth_encode(sc->small, KVF_AUTH_REFUSED, reason, rl, NULL, 0);
    sc_send(sc, sc->small, n, NULL, 0);
    sc_close_after(sc, why);
}

/* Whether the first bytes in sc->hbuf are a TLS client's, to an engine without data TLS. */
static bool sc_tls_client(const struct tcp_sconn *sc, const char **reason)
{
    if (sc->hbuf[0] != KVF_TLS_RECORD_HANDSHAKE || sc->hbuf[1] != KVF_TLS_RECORD_MAJOR)
        return false;
    *reason = "the client speaks TLS and this engine has no TLS on data connections";
    return true;
}

static int sc_auth_hdr(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    bool first = sc->auth_msgs++ == 0;
    if (!sc->auth && !sc->need_tls) {
        *reason = "authentication failed: out of memory";
        return -1;
    }
    if (first && sc->need_tls && kvf__auth_is_magic(sc->hbuf)) {
        sc_auth_refuse(sc, "this engine requires TLS on data connections, and this side has none",
                       "a client without TLS, and this engine requires TLS on data connections");
        return 0;
    }
    if (first && (sc->need_tls || !kvf__auth_is_magic(sc->hbuf))) {
        if (kvf__get_le32(sc->hbuf) == KVF_P2P_MAGIC) {
            /* A P2P asker without a key: read its request, so that it reads the refusal. */
            sc->deadline_ms = sc->start_ms + KVF_AUTH_TIMEOUT_MS;
            sc_recv(sc, SC_P2P_BARE, sc->hbuf + KVF_AUTH_HDR_LEN,
                    KVF_TCP_HDR_LEN - KVF_AUTH_HDR_LEN);
            return 0;
        }
        if (kvf__get_le32(sc->hbuf) == KVF_TCP_MAGIC) {
            /* A plain HELLO (the client has no key): read the rest of it, so that closing sends
             * a FIN the client reads after the answer and not a reset that would hide it. */
            sc->deadline_ms = sc->start_ms + KVF_AUTH_TIMEOUT_MS;
            sc_recv(sc, SC_PLAIN_HDR, sc->hbuf + KVF_AUTH_HDR_LEN,
                    KVF_TCP_HDR_LEN - KVF_AUTH_HDR_LEN);
            return 0;
        }
        if (sc->need_tls)
            *reason = "a client without TLS (not a kvferry client?), and this engine requires TLS "
                      "on data connections";
        else if (!sc_tls_client(sc, reason))
            *reason = "authentication failed: no authentication handshake: the client has no key";
        return -1;
    }
    size_t len;
    char r[128];
    if (!kvf__auth_hdr_parse(sc->hbuf, &sc->auth_type, &len, r, sizeof(r))) {
        snprintf(why, whylen, "authentication failed: %s", r);
        sc_auth_refuse(sc, "malformed message", why);
        return 0;
    }
    atomic_store_explicit(&sc->stage, 1, memory_order_relaxed);
    sc_recv(sc, SC_AUTH_BODY, sc->small, len);
    return 0;
}

static int sc_auth_body(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    uint8_t out[KVF_AUTH_MAX_MSG];
    size_t out_len = 0;
    char r[128];
    int rc = kvf__auth_srv_step(sc->auth, sc->auth_type, sc->small, sc->got, out, &out_len, r,
                                sizeof(r));
    if (rc == 1) {
        size_t keep = strnlen(sc->auth->peer_id, sizeof(sc->peer_sid) - 1);
        pthread_mutex_lock(&sc->t->mu); /* tcp_holders() reads peer_sid under it */
        memcpy(sc->peer_sid, sc->auth->peer_id, keep);
        sc->peer_sid[keep] = '\0';
        pthread_mutex_unlock(&sc->t->mu);
        kvf__auth_srv_fini(sc->auth);
        free(sc->auth);
        sc->auth = NULL;
        KVF_DEBUG(TCP_LOG, "%s at %s proved the cluster secret", sc->peer_sid, sc->addr);
        atomic_store_explicit(&sc->stage, 2, memory_order_relaxed);
        sc_next_hdr(sc);
    } else if (rc == 0) {
        sc_recv(sc, SC_AUTH_HDR, sc->hbuf, KVF_AUTH_HDR_LEN);
    } else {
        snprintf(why, whylen, "authentication failed: %s", r);
        if (!out_len) {
            *reason = why;
            return -1;
        }
        sc_close_after(sc, why);
    }
    if (out_len) {
        memcpy(sc->small, out, out_len);
        sc_send(sc, sc->small, out_len, NULL, 0);
    }
    return 0;
}

/* A plain HELLO to an engine with a key (KVF_EAUTH) or with data TLS (KVF_ETLS): answer it in
 * its protocol. */
static int sc_plain(struct tcp_sconn *sc, const char **reason)
{
    static const char failed[] =
        "authentication failed: no authentication handshake: the client has no key";
    if (sc->step == SC_PLAIN_HDR) {
        tcp_hdr_decode(sc->hbuf, &sc->h);
        if (sc->h.type != KVF_TCP_HELLO || sc->h.len > KVF_TCP_MAX_MSG) {
            *reason = failed;
            return -1;
        }
        sc_recv(sc, SC_PLAIN_SID, sc->small, (size_t)sc->h.len);
        return 0;
    }
    /* Without TLS to an engine with data TLS; else without a key to an engine with one. */
    int code = sc->need_tls ? -KVF_ETLS : -KVF_EAUTH;
    if (sc->need_tls)
        kvf__err(code,
                 "engine %s requires TLS on data connections: this side has none for them (set "
                 "kvf_config_t.data_tls, --tls-data or KVFERRY_TLS_DATA=1)",
                 sc->t->local_sid);
    else
        kvf__err(code,
                 "engine %s requires the cluster secret: this side has no auth key "
                 "(set an auth key file, e.g. KVFERRY_AUTH_KEY_FILE)",
                 sc->t->local_sid);
    sc_keep_error(sc);
    sc_answer_error(sc, code, 0);
    sc_close_after(sc, sc->need_tls ? "a client without TLS, and this engine requires TLS on "
                                      "data connections"
                                    : failed);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Requests
 * ------------------------------------------------------------------------------------------- */

/* A header has arrived: validate it and start serving its request. */
static int sc_header(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    tcp_hdr_t *h = &sc->h;
    if (!sc->hello_done && kvf__get_le32(sc->hbuf) == KVF_P2P_MAGIC) {
        /* A P2P record request instead of a HELLO: answered, then the connection ends. */
        int klen = tcp_p2p_key_len(sc->hbuf, why, whylen);
        if (klen < 0) {
            *reason = why;
            return -1;
        }
        sc->deadline_ms = kvf__now_ms() + KVF_P2P_REQ_TIMEOUT_MS;
        sc_recv(sc, SC_P2P_KEY, sc->small, (size_t)klen);
        return 0;
    }
    tcp_hdr_decode(sc->hbuf, h);
    if (!sc->hello_done && sc_tls_client(sc, reason))
        return -1;
    if (!sc->hello_done && h->magic == KVF_AUTH_MAGIC) {
        /* A client with a key, and none here: tell it so in its protocol. The rest of its hello
         * is read first, so that it reads the answer and not a reset. */
        size_t blen = kvf__get_le16(sc->hbuf + 6);
        size_t rest = blen + KVF_AUTH_HDR_LEN > KVF_TCP_HDR_LEN && blen <= KVF_AUTH_MAX_BODY
                          ? blen + KVF_AUTH_HDR_LEN - KVF_TCP_HDR_LEN
                          : 0;
        sc_recv(sc, SC_AUTH_REST, sc->small, rest);
        return 0;
    }
    *reason = tcp_req_hdr_check(h, sc->hello_done, why, whylen);
    if (*reason)
        return -1;
    if (h->type != KVF_TCP_HELLO && h->type != KVF_TCP_NOTIFY &&
        atomic_load(&t->test_close_left) > 0 && atomic_fetch_sub(&t->test_close_left, 1) > 0) {
        KVF_INFO(TCP_LOG, "closing connection from %s at its request (%s)", sc->addr,
                 TCP_TEST_CLOSE_ENV);
        return 1;
    }
    switch (h->type) {
    case KVF_TCP_HELLO:
        sc_recv(sc, SC_HELLO, sc->small, (size_t)h->len);
        return 0;
    case KVF_TCP_NOTIFY:
        sc->deadline_ms = tcp_frame_deadline(h->len);
        sc_recv(sc, SC_NOTIFY, sc->small, (size_t)h->len);
        return 0;
    case KVF_TCP_WRITEV:
        if (!sc->segs) {
            sc->segs = malloc(KVF_TCP_MAX_SEGS * KVF_TCP_SEG_LEN);
            sc->refs = calloc(KVF_TCP_MAX_SEGS, sizeof(*sc->refs));
            sc->iov = malloc(KVF_TCP_MAX_SEGS * sizeof(*sc->iov));
            if (!sc->segs || !sc->refs || !sc->iov) {
                *reason = "out of memory";
                return -1;
            }
        }
        sc->deadline_ms = tcp_frame_deadline(h->len);
        sc_recv(sc, SC_WRITEV_SEGS, sc->segs, (size_t)h->addr * KVF_TCP_SEG_LEN);
        return 0;
    case KVF_TCP_STATS: {
        uint8_t *body = NULL;
        size_t len = 0;
        int rc = t->stats_cb ? t->stats_cb(t->stats_arg, &body, &len)
                             : kvf__err(-KVF_ENOTSUP, "%s gives no statistics", t->local_sid);
        if (rc == 0 && len > KVF_TCP_MAX_STATS)
            rc = kvf__err(-KVF_ETOOBIG, "statistics of %zu bytes exceed KVF_TCP_MAX_STATS", len);
        sc_next_hdr(sc);
        if (rc < 0) {
            free(body);
            sc_keep_error(sc);
            sc_answer_error(sc, rc, h->addr);
            return 0;
        }
        sc->obody = body;
        sc->deadline_ms = tcp_frame_deadline(len);
        sc_answer(sc, 0, body, len);
        return 0;
    }
    case KVF_TCP_WRITE: {
        sc_hold(sc, h->addr, h->addr + h->len);
        int arc = kvf__regions_acquire(t->regions, h->addr, h->len, &sc->ref);
        if (arc == 0) {
            /* Straight into the registered memory: the region reference keeps it registered
             * until the last byte is in. */
            sc->ref_held = true;
            sc->deadline_ms = tcp_frame_deadline(h->len);
            sc_recv(sc, SC_WRITE, (void *)(uintptr_t)h->addr, (size_t)h->len);
            return 0;
        }
        sc_hold(sc, 0, 0);
        sc_refusal(sc, arc, "write", h->addr, h->len);
        sc->refuse_code = arc;
        sc->refuse_addr = h->addr;
        sc->drain_left = h->len;
        sc->deadline_ms = tcp_frame_deadline(h->len);
        return sc_drain(sc);
    }
    default: { /* READ */
        sc_hold(sc, h->addr, h->addr + h->len);
        int arc = kvf__regions_acquire(t->regions, h->addr, h->len, &sc->ref);
        sc_next_hdr(sc);
        if (arc == 0) {
            /* Straight from the registered memory, under the reference until the last byte is
             * out, within the rate deadline (a slow reader cannot stall an unregister). */
            sc->ref_held = true;
            sc->out_release = true;
            sc->deadline_ms = tcp_frame_deadline(h->len);
            sc_answer(sc, h->addr, (void *)(uintptr_t)h->addr, (size_t)h->len);
            return 0;
        }
        sc_hold(sc, 0, 0);
        sc_refusal(sc, arc, "read", h->addr, h->len);
        sc_answer_error(sc, arc, h->addr);
        return 0;
    }
    }
}

static int sc_hello(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    char *sid = (char *)sc->small;
    size_t len = (size_t)sc->h.len;
    if (t->auth.len && (len != strlen(sc->peer_sid) || memcmp(sid, sc->peer_sid, len))) {
        /* The proven identity is the only one: a HELLO may not claim another. */
        kvf__err(-KVF_EAUTH, "HELLO claims another session id than the one %s proved",
                 sc->peer_sid);
        sc_keep_error(sc);
        sc_answer_error(sc, -KVF_EAUTH, 0);
        snprintf(why, whylen,
                 "authentication failed: HELLO claims another session id than the proven %.64s",
                 sc->peer_sid);
        sc_close_after(sc, why);
        return 0;
    }
    /* Without a key the session id is for the log only; keep it printable. */
    char pr[KVF_TCP_MAX_MSG + 1];
    kvf__printable(pr, len + 1, sid, len);
    KVF_DEBUG(TCP_LOG, "hello from %s at %s", pr, sc->addr);
    /* A longer one is no session id; it is kept cut (for the log) all the same. Written under
     * t->mu, where tcp_holders() reads it. */
    size_t keep = strnlen(pr, sizeof(sc->peer_sid) - 1);
    unsigned from = 0, all = 0;
    pthread_mutex_lock(&t->mu);
    memcpy(sc->peer_sid, pr, keep);
    sc->peer_sid[keep] = '\0';

    /* Authenticated now: out of the pre-auth share, into the caps of served connections, and
     * onto the I/O thread its peer's connections call for. */
    if (sc->preauth) {
        sc->preauth = false;
        t->npreauth--;
    }
    for (const struct tcp_sconn *o = t->sconns; o; o = o->next) {
        if (o->preauth || o->evicted || o == sc)
            continue;
        all++;
        from += o->ip_len == sc->ip_len && memcmp(o->ip, sc->ip, sc->ip_len) == 0;
    }
    if (all >= KVF_TCP_MAX_CONNS) {
        snprintf(why, whylen, "KVF_TCP_MAX_CONNS (%u) reached", KVF_TCP_MAX_CONNS);
    } else if (from >= KVF_TCP_MAX_CONNS_PER_ADDR) {
        snprintf(why, whylen,
                 "KVF_TCP_MAX_CONNS_PER_ADDR (%u) connections from that address are open",
                 KVF_TCP_MAX_CONNS_PER_ADDR);
    } else {
        tcp_sc_place_locked(t, sc);
        why = NULL;
    }
    pthread_mutex_unlock(&t->mu);
    if (why) {
        *reason = why;
        return -1;
    }
    sc->hello_done = true;
    sc_next_hdr(sc);
    sc_answer(sc, 0, NULL, 0);
    return 0;
}

/* A WRITEV's segment table has arrived: check it, take a reference on every segment's region
 * and receive the data straight into them; or, if one is refused, drop the data and name it. */
static int sc_writev(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    const tcp_hdr_t *h = &sc->h;
    unsigned n = (unsigned)h->addr;
    uint64_t total = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t addr = kvf__get_le64(sc->segs + (size_t)i * KVF_TCP_SEG_LEN);
        uint64_t len = kvf__get_le64(sc->segs + (size_t)i * KVF_TCP_SEG_LEN + 8);
        if (len == 0 || len > h->len - total) {
            snprintf(why, whylen,
                     "WRITEV segment %u: length %" PRIu64 " where %" PRIu64
                     " of the frame's %" PRIu64 " bytes are left",
                     i, len, h->len - total, h->len);
            *reason = why;
            return -1;
        }
        total += len;
        sc->iov[i].iov_base = (void *)(uintptr_t)addr;
        sc->iov[i].iov_len = (size_t)len;
    }
    if (total != h->len) {
        snprintf(why, whylen, "WRITEV segments total %" PRIu64 " bytes, the frame says %" PRIu64,
                 total, h->len);
        *reason = why;
        return -1;
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
        KVF_DEBUG(TCP_LOG, "gathered write from %s refused at segment %u", sc->addr, k);
        sc_refusal(sc, arc, "write", (uintptr_t)sc->iov[k].iov_base, sc->iov[k].iov_len);
        sc->refuse_code = arc;
        sc->refuse_addr = k;
        sc->drain_left = h->len;
        return sc_drain(sc);
    }
    sc->nrefs = n;
    sc_recv_iov(sc, SC_WRITEV_DATA, sc->iov, (int)n);
    return 0;
}

static void sc_release_all(struct tcp_sconn *sc)
{
    if (sc->ref_held)
        kvf__regions_release(sc->t->regions, &sc->ref);
    for (unsigned j = 0; j < sc->nrefs; j++)
        kvf__regions_release(sc->t->regions, &sc->refs[j]);
    sc->ref_held = false;
    sc->nrefs = 0;
    sc_hold(sc, 0, 0);
}

/* The bytes of the current step are all in: act on them. Returns as tcp_sc_run(). */
static int sc_step_done(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    switch (sc->step) {
    case SC_TLS: /* handled by tcp_sc_run() */
        break;
    case SC_AUTH_HDR:
        return sc_auth_hdr(sc, reason, why, whylen);
    case SC_AUTH_BODY:
        return sc_auth_body(sc, reason, why, whylen);
    case SC_PLAIN_HDR:
    case SC_PLAIN_SID:
        return sc_plain(sc, reason);
    case SC_AUTH_REST:
        sc_auth_refuse(sc,
                       "this engine has no auth key: the cluster secret is not configured on "
                       "both sides",
                       "authentication failed: the client has an auth key, this engine none");
        return 0;
    case SC_HDR:
        return sc_header(sc, reason, why, whylen);
    case SC_HELLO:
        return sc_hello(sc, reason, why, whylen);
    case SC_NOTIFY: {
        /* The sender sends it only once every request of its batch has been answered, so that
         * batch's data is in place before the notification is queued. */
        int nrc = t->notify_cb
                      ? t->notify_cb(t->notify_arg, sc->peer_sid, sc->small, (size_t)sc->h.len)
                      : kvf__err(-KVF_ENOTSUP, "%s takes no notifications", t->local_sid);
        sc_next_hdr(sc);
        if (nrc == 0) {
            sc_answer(sc, 0, NULL, 0);
        } else {
            sc_keep_error(sc);
            sc_answer_error(sc, nrc, sc->h.addr);
        }
        return 0;
    }
    case SC_WRITE:
        /* Every byte is in the region: only now is the reference dropped and the write
         * acknowledged. */
        sc_release_all(sc);
        sc_next_hdr(sc);
        sc_answer(sc, sc->h.addr, NULL, 0);
        return 0;
    case SC_WRITEV_SEGS:
        return sc_writev(sc, reason, why, whylen);
    case SC_WRITEV_DATA:
        sc_release_all(sc);
        sc_next_hdr(sc);
        sc_answer(sc, sc->h.addr, NULL, 0);
        return 0;
    case SC_DRAIN:
        if (sc_drain(sc)) {
            *reason = "out of memory";
            return -1;
        }
        return 0;
    case SC_P2P_BARE: /* its whole header: read the key as for any P2P request */
        return sc_header(sc, reason, why, whylen);
    case SC_P2P_KEY: {
        size_t len = 0;
        if (sc->auth || sc->need_tls) { /* keyed, and the asker skipped the handshake */
            _Static_assert(sizeof(sc->small) >= KVF_P2P_ANS_LEN + KVF_P2P_MAX_MSG, "refusal");
            sc_send(sc, sc->small, tcp_p2p_refusal(t, sc->need_tls, sc->small), NULL, 0);
            sc_close_after(sc, sc->need_tls ? "a P2P record request without TLS, and this engine "
                                              "requires TLS on data connections"
                                            : "authentication failed: a P2P record request "
                                              "without the handshake: the asker has no key");
            return 0;
        }
        if (tcp_p2p_answer(t, sc->addr, (char *)sc->small, sc->got, &sc->obody, &len, why, whylen) <
            0) {
            *reason = why;
            return -1;
        }
        sc->deadline_ms = kvf__now_ms() + KVF_P2P_REQ_TIMEOUT_MS;
        sc_send(sc, sc->obody, len, NULL, 0);
        sc_close_after(sc, "");
        return 0;
    }
    }
    *reason = "internal: unknown state";
    return -1;
}

/* The answer is out: release what it held and go on reading (or close). */
static int sc_sent(struct tcp_sconn *sc, const char **reason)
{
    if (sc->out_release) {
        sc->out_release = false;
        sc_release_all(sc);
    }
    free(sc->obody);
    sc->obody = NULL;
    sc->want_out = false;
    if (sc->step == SC_HDR)
        sc->deadline_ms = 0;
    uint64_t now = kvf__now_ms();
    sc->idle_since = now;
    sc->last_ms = now;
    if (sc->close_after) {
        *reason = sc->close_why;
        return sc->close_why[0] ? -1 : 1;
    }
    return 0;
}

/* A frame past its rate deadline moves no more bytes (checked before every receive and send, not
 * only by the timer: bytes a trickling or long-stalled client sends late never land). */
static bool sc_late(const struct tcp_sconn *sc, const char **reason)
{
    if (!sc->deadline_ms || kvf__now_ms() < sc->deadline_ms)
        return false;
    *reason = tcp_sc_slow;
    return true;
}

/* The end of the stream while receiving: why the connection closes (1: quietly). */
static int sc_eof(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    bool between = sc->got == 0 && (sc->step == SC_HDR || sc->step == SC_AUTH_HDR);
    if (between && sc->step == SC_HDR) {
        KVF_DEBUG(TCP_LOG, "connection from %s closed", sc->addr);
        return 1;
    }
    if (between) {
        *reason = "authentication failed: connection closed";
    } else if (sc->step == SC_HDR) {
        snprintf(why, whylen, "truncated header (%zu of %u bytes)", sc->got, KVF_TCP_HDR_LEN);
        *reason = why;
    } else {
        *reason = "connection closed in the middle of a frame";
    }
    return -1;
}

int tcp_sc_run(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen)
{
    size_t moved = 0;
    *reason = NULL;
    /* A turn ends at EAGAIN or after SC_TURN_BYTES (the socket stays ready, so the I/O thread
     * comes back to it after the others; bytes a TLS session holds are read first), never
     * between a step's last byte and its handling. */
    for (;;) {
        if (sc->step == SC_TLS) {
            int rc = sc_late(sc, reason) ? -1 : tcp_sc_tls_accept(sc, reason, why, whylen);
            if (rc <= 0)
                return rc;
            sc_start(sc);
            continue;
        }
        bool out = sc->want_out;
        if (out && sc->wcnt == 0) {
            int rc = sc_sent(sc, reason);
            if (rc)
                return rc;
            continue;
        }
        if (!out && sc->rcnt == 0) {
            int rc = sc_step_done(sc, reason, why, whylen);
            if (rc)
                return rc;
            continue;
        }
        if (moved >= SC_TURN_BYTES && (out || !tcp_sc_pending(sc)))
            return 0;
        if (sc_late(sc, reason))
            return -1;
        ssize_t r = tcp_sc_io(sc, out, why, whylen);
        if (r > 0) {
            if (out) {
                tcp_iov_advance(&sc->wp, &sc->wcnt, (size_t)r);
            } else {
                tcp_iov_advance(&sc->rp, &sc->rcnt, (size_t)r);
                sc->got += (size_t)r;
            }
            sc->last_ms = kvf__now_ms();
            moved += (size_t)r;
            continue;
        }
        if (r == -EAGAIN)
            return 0;
        if (r == 0)
            return sc_eof(sc, reason, why, whylen);
        *reason = why;
        return -1;
    }
}

void tcp_sc_end(struct tcp_sconn *sc)
{
    sc_release_all(sc);
    kvf__tls_free(sc->tls);
    sc->tls = NULL;
    if (sc->auth) {
        kvf__auth_srv_fini(sc->auth);
        free(sc->auth);
        sc->auth = NULL;
    }
    free(sc->obody);
    free(sc->scratch);
    free(sc->segs);
    free(sc->refs);
    free(sc->iov);
    sc->obody = sc->scratch = sc->segs = NULL;
    sc->refs = NULL;
    sc->iov = NULL;
}
