/*
 * Connections of the store server: accepting them, reading and validating frames, dispatching
 * requests to the op handlers, flushing output, pausing a client that does not read, and closing
 * (at the safe points described in server.h).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "store/server.h"

/* ---- connections ----------------------------------------------------------------------------- */

/* Close @c now: its fd, waiters and watches go at once; its memory at the end of the loop
 * iteration (see the comment at the top of server.h). */
void kvf__srv_conn_kill(struct kvf_store_server *srv, struct srv_conn *c)
{
    if (c->dead)
        return;
    while (!link_empty(&c->waiters))
        kvf__srv_waiter_free(srv, SRV_CONTAINER(c->waiters.next, struct srv_waiter, conn_link),
                             true);
    while (!link_empty(&c->watches))
        kvf__srv_watch_free(srv, SRV_CONTAINER(c->watches.next, struct srv_watch, conn_link));
    kvf__srv_timer_disarm(srv, &c->partial);
    kvf__srv_timer_disarm(srv, &c->quiet);
    kvf__srv_timer_disarm(srv, &c->auth_timer);
    if (c->auth) {
        kvf__auth_srv_fini(c->auth);
        free(c->auth);
        c->auth = NULL;
    }
    if (c->dirty) {
        link_del(&c->dirty_link);
        c->dirty = false;
    }
    if (c->tls_ready) {
        link_del(&c->ready_link);
        c->tls_ready = false;
    }
    kvf__tls_free(c->tls);
    c->tls = NULL;
    epoll_ctl(srv->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->dead = true;
    kvf__srv_out_account(srv, c);
    link_del(&c->link);
    link_add_tail(&srv->zombies, &c->link);
    srv->nconns--;
    c->client->conns--;
    kvf__srv_client_maybe_free(srv, c->client);
    c->client = NULL;
    SRV_STAT_SUB(srv, clients, 1);
}

/* Log why @c is being closed (warn level: a client broke a rule or a resource ran out) and close
 * it. Reasons are built from numbers and fixed text only, never from received bytes. */
void kvf__srv_conn_close_warn(struct kvf_store_server *srv, struct srv_conn *c, const char *fmt,
                              ...)
{
    char reason[SRV_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    KVF_WARN_RATELIMITED(SRV_LOG, "closing connection from %s: %s", c->peer, reason);
    kvf__srv_conn_kill(srv, c);
}

void kvf__srv_zombies_free(struct kvf_store_server *srv)
{
    while (!link_empty(&srv->zombies)) {
        struct srv_conn *c = SRV_CONTAINER(srv->zombies.next, struct srv_conn, link);
        link_del(&c->link);
        free(c->ident);
        free(c->in);
        kvf__srv_out_release(srv, c);
        free(c);
    }
}

/* Set @c's epoll interest from its state: read unless too much output is waiting, write while
 * any is. The partial-frame timer only runs while we read: a frame we stopped reading is our
 * doing, not the client's. */
static void conn_update_events(struct kvf_store_server *srv, struct srv_conn *c)
{
    bool reading = !conn_paused(c);
    uint32_t want = (reading ? EPOLLIN : 0u) | (conn_pending_out(c) ? EPOLLOUT : 0u);
    if (c->tls) {
        /* A TLS read may wait for room to send (a key update answered). */
        kvf_stream_t s = {.fd = c->fd, .tls = c->tls};
        if (reading && kvf__stream_wants(&s, false) == POLLOUT)
            want |= EPOLLOUT;
    }
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        if (epoll_ctl(srv->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
            kvf__srv_conn_close_warn(srv, c, "epoll_ctl: %s", strerror(errno));
            return;
        }
        c->events = want;
    }
    if (!reading)
        kvf__srv_timer_disarm(srv, &c->partial);
    else if (c->in_len && !timer_armed(&c->partial) &&
             kvf__srv_timer_arm(srv, &c->partial, srv->now_ms + srv->partial_timeout_ms) < 0)
        kvf__srv_conn_close_warn(srv, c, "out of memory");
}

/* Send as much pending output as the socket takes now. */
static void conn_parse(struct kvf_store_server *srv, struct srv_conn *c);

/* Gather @c's unsent output, owned bytes and shared tails in order, into @iov (at most @max). */
static int conn_out_iov(const struct srv_conn *c, struct iovec *iov, int max)
{
    int n = 0;
    size_t pos = c->out_off;
    for (size_t i = c->mark_head; i < c->mark_len && n < max; i++) {
        const struct srv_mark *m = &c->marks[i];
        if (m->pos > pos) {
            iov[n++] = (struct iovec){c->out.data + pos, m->pos - pos};
            pos = m->pos;
            if (n == max)
                return n;
        }
        iov[n++] = (struct iovec){m->sh->data + m->sent, m->sh->len - m->sent};
    }
    if (n < max && c->out.len > pos)
        iov[n++] = (struct iovec){c->out.data + pos, c->out.len - pos};
    return n;
}

/* One TLS write of @c's unsent output, gathered into one record's worth. A write that must be
 * retried is retried with the same first bytes, as OpenSSL requires: output is only appended. */
static ssize_t conn_tls_send(struct srv_conn *c, const struct iovec *iov, int niov)
{
    uint8_t buf[SRV_TLS_RECORD];
    size_t len = 0;
    for (int i = 0; i < niov && len < sizeof(buf); i++) {
        size_t k = iov[i].iov_len < sizeof(buf) - len ? iov[i].iov_len : sizeof(buf) - len;
        memcpy(buf + len, iov[i].iov_base, k);
        len += k;
    }
    kvf_stream_t s = {.fd = c->fd, .tls = c->tls};
    ssize_t n = kvf__stream_send(&s, buf, len, NULL, 0);
    if (n < 0)
        errno = n == -EAGAIN ? EAGAIN : (int)-n;
    return n < 0 ? -1 : n;
}

static void conn_flush(struct kvf_store_server *srv, struct srv_conn *c)
{
    while (conn_pending_out(c)) {
        struct iovec iov[SRV_FLUSH_IOV];
        struct msghdr mh = {.msg_iov = iov,
                            .msg_iovlen = (size_t)conn_out_iov(c, iov, SRV_FLUSH_IOV)};
        ssize_t n = c->tls ? conn_tls_send(c, iov, (int)mh.msg_iovlen)
                           : sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            kvf__srv_out_advance(srv, c, (size_t)n);
            SRV_STAT_ADD(srv, bytes_out, n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        /* The peer went away; that is routine, not worth a warning. */
        KVF_DEBUG(SRV_LOG, "closing connection from %s: send: %s", c->peer,
                  n < 0 ? strerror(errno) : "no progress");
        kvf__srv_conn_kill(srv, c);
        return;
    }
    if (c->out_off == c->out.len && c->mark_head == c->mark_len) {
        c->out.len = 0;
        c->out_off = 0;
        c->mark_head = c->mark_len = 0;
        if (c->out.cap > SRV_OUT_KEEP)
            kvf__buf_free(&c->out);
    } else if (c->out_off >= SRV_IN_KEEP && c->out_off >= c->out.len / 2) {
        /* Reclaim the sent part once it is at least half the buffer: amortised O(1) per byte. */
        kvf__buf_consume(&c->out, c->out_off);
        for (size_t i = c->mark_head; i < c->mark_len; i++)
            c->marks[i].pos -= c->out_off;
        c->out_off = 0;
    }
    /* Resume the requests held by the output pause. A safe point: we are flushing @c. Their
     * answers mark @c dirty again, so the flush pass of this iteration sends them. */
    if (c->held && !conn_paused(c) && !srv->stopping) {
        c->held = false;
        conn_parse(srv, c);
        if (c->dead)
            return;
        conn_tls_ready_check(srv, c);
    }
    conn_update_events(srv, c);
}

/* Flush every connection that got output in this iteration, closing those that overflowed. */
void kvf__srv_dirty_flush(struct kvf_store_server *srv)
{
    while (!link_empty(&srv->dirty)) {
        struct srv_conn *c = SRV_CONTAINER(srv->dirty.next, struct srv_conn, dirty_link);
        link_del(&c->dirty_link);
        c->dirty = false;
        if (c->out.oom || c->marks_oom) {
            kvf__srv_conn_close_warn(srv, c, "out of memory for its output");
            continue;
        }
        if (c->overflow) {
            kvf__srv_conn_close_warn(srv, c,
                                     "unread output (%zu bytes) plus a watch event or wait answer "
                                     "would exceed max_output_bytes (%" PRIu64
                                     ") or max_output_bytes_total (%" PRIu64 ", %zu in use)",
                                     conn_pending_out(c), srv->opts.max_output_bytes,
                                     srv->opts.max_output_bytes_total, srv->out_total);
            continue;
        }
        if (conn_pending_out(c) > srv->opts.max_output_bytes) {
            kvf__srv_conn_close_warn(
                srv, c, "%zu bytes of unread output exceed max_output_bytes (%" PRIu64 ")",
                conn_pending_out(c), srv->opts.max_output_bytes);
            continue;
        }
        conn_flush(srv, c);
    }
}

/* Check a frame header. Returns NULL if it is acceptable, else a reason (fixed text with
 * numbers) written into @why. */
static const char *header_problem(const uint8_t *h, char *why, size_t whylen)
{
    uint32_t magic = kvf__get_le32(h);
    uint8_t version = h[4], op = h[5];
    uint16_t status = kvf__get_le16(h + 6);
    uint32_t body_len = kvf__get_le32(h + 12);

    if (magic != KVF_STORE_MAGIC)
        snprintf(why, whylen, "bad magic 0x%08" PRIx32, magic);
    else if (version != KVF_STORE_PROTO_VERSION)
        snprintf(why, whylen, "unsupported protocol version %u (want %u)", (unsigned)version,
                 KVF_STORE_PROTO_VERSION);
    else if (op >= KVF__ARRAY_SIZE(kvf__srv_ops) || !kvf__srv_ops[op])
        snprintf(why, whylen, "unknown opcode %u", (unsigned)op);
    else if (status != 0)
        snprintf(why, whylen, "status %u in a request", (unsigned)status);
    else if (body_len > KVF_STORE_MAX_REQUEST_LEN)
        snprintf(why, whylen, "body of %" PRIu32 " bytes exceeds the longest request (%u)",
                 body_len, KVF_STORE_MAX_REQUEST_LEN);
    else
        return NULL;
    return why;
}

static void conn_dispatch(struct kvf_store_server *srv, struct srv_conn *c, const uint8_t *h)
{
    struct srv_req rq = {.op = h[5], .req_id = kvf__get_le32(h + 8)};
    kvf_rd_t rd;
    kvf__rd_init(&rd, h + KVF_STORE_HDR_LEN, kvf__get_le32(h + 12));
    SRV_STAT_ADD(srv, ops, 1);
    kvf__srv_ops[rq.op](srv, c, &rq, &rd);
}

/* Send what is queued for @c at once and close it: a refusal of the handshake. */
static void conn_refuse_auth(struct kvf_store_server *srv, struct srv_conn *c, const char *why)
{
    conn_flush(srv, c);
    if (!c->dead)
        kvf__srv_conn_close_warn(srv, c, "authentication failed: %s", why);
}

/*
 * The handshake messages at the start of @c's input (server with a key; common/auth.h). Returns
 * the bytes consumed; sets c->auth NULL once the client proved the key, and closes @c on a
 * failure. A client without a key speaks the store protocol at once: its first request is
 * answered with KVF_STORE_ST_AUTH, so its call fails with -KVF_EAUTH and a message, and @c ends.
 */
static size_t conn_parse_auth(struct kvf_store_server *srv, struct srv_conn *c)
{
    size_t pos = 0;
    char why[160];
    while (c->auth && c->in_len - pos >= KVF_AUTH_HDR_LEN) {
        const uint8_t *h = c->in + pos;
        uint8_t type;
        size_t blen;
        if (!kvf__auth_is_magic(h)) {
            if (!c->tls && tls_client_hello(h)) {
                kvf__srv_conn_close_warn(srv, c, SRV_TLS_UNEXPECTED);
                return pos;
            }
            if (kvf__get_le32(h) != KVF_STORE_MAGIC) {
                kvf__srv_conn_close_warn(srv, c, "authentication failed: no handshake");
                return pos;
            }
            if (c->in_len - pos < KVF_STORE_HDR_LEN)
                return pos;
            kvf__srv_reply_err_to(srv, c, h[5], kvf__get_le32(h + 8), KVF_STORE_ST_AUTH,
                                  "this store requires the cluster secret and this client has no "
                                  "auth key (set an auth key file, e.g. KVFERRY_AUTH_KEY_FILE)");
            conn_refuse_auth(srv, c, "the client has no auth key (it sent a request)");
            return pos;
        }
        if (!kvf__auth_hdr_parse(h, &type, &blen, why, sizeof(why))) {
            uint8_t out[KVF_AUTH_MAX_MSG];
            size_t n = kvf__auth_encode(out, KVF_AUTH_REFUSED, "malformed message", 17, NULL, 0);
            kvf__buf_put(&c->out, out, n);
            kvf__srv_out_account(srv, c);
            conn_refuse_auth(srv, c, why);
            return pos;
        }
        if (c->in_len - pos < KVF_AUTH_HDR_LEN + blen)
            return pos;
        uint8_t out[KVF_AUTH_MAX_MSG];
        size_t out_len = 0;
        int rc = kvf__auth_srv_step(c->auth, type, h + KVF_AUTH_HDR_LEN, blen, out, &out_len, why,
                                    sizeof(why));
        pos += KVF_AUTH_HDR_LEN + blen;
        if (out_len) {
            kvf__buf_put(&c->out, out, out_len);
            kvf__srv_out_account(srv, c);
            kvf__srv_conn_mark_dirty(srv, c);
        }
        if (rc < 0) {
            conn_refuse_auth(srv, c, why);
            return pos;
        }
        if (rc == 1) {
            KVF_DEBUG(SRV_LOG, "%s (%s) proved the %s", c->peer, c->auth->peer_id,
                      c->auth->admin ? "admin key" : "cluster secret");
            c->ident = strdup(c->auth->peer_id);
            c->admin = c->auth->admin;
            if (!c->ident) {
                kvf__srv_conn_close_warn(srv, c, "out of memory");
                return pos;
            }
            kvf__auth_srv_fini(c->auth);
            free(c->auth);
            c->auth = NULL;
            kvf__srv_timer_disarm(srv, &c->auth_timer);
        }
    }
    return pos;
}

/* Run the complete frames in @c's input, then size the buffer for what is left. Stops early,
 * setting c->held, while @c's unsent output is above SRV_OUT_PAUSE_READ; conn_flush() resumes. */
static void conn_parse(struct kvf_store_server *srv, struct srv_conn *c)
{
    size_t pos = 0;
    bool completed = false;
    char why[128];

    c->held = false;
    if (c->auth) {
        pos = conn_parse_auth(srv, c);
        if (c->dead)
            return;
        completed = pos > 0;
    }
    while (!c->auth && c->in_len - pos >= KVF_STORE_HDR_LEN) {
        if (conn_paused(c)) {
            c->held = true;
            break;
        }
        const uint8_t *h = c->in + pos;
        if (kvf__auth_is_magic(h)) {
            /* A client with a key, and none here: tell it so in its handshake's words. */
            uint8_t out[KVF_AUTH_MAX_MSG];
            const char *r = "this store has no auth key: the cluster secret is not configured on "
                            "both sides";
            size_t n = kvf__auth_encode(out, KVF_AUTH_REFUSED, r, strlen(r), NULL, 0);
            kvf__buf_put(&c->out, out, n);
            kvf__srv_out_account(srv, c);
            conn_refuse_auth(srv, c, "the client has an auth key, this store none");
            return;
        }
        if (!c->tls && tls_client_hello(h)) {
            kvf__srv_conn_close_warn(srv, c, SRV_TLS_UNEXPECTED);
            return;
        }
        if (header_problem(h, why, sizeof(why))) {
            kvf__srv_conn_close_warn(srv, c, "%s", why);
            return;
        }
        size_t frame_len = KVF_STORE_HDR_LEN + (size_t)kvf__get_le32(h + 12);
        if (c->in_len - pos < frame_len)
            break;
        conn_dispatch(srv, c, h);
        pos += frame_len;
        completed = true;
    }
    if (pos) {
        memmove(c->in, c->in + pos, c->in_len - pos);
        c->in_len -= pos;
    }

    /* The partial-frame clock starts when the first byte of a frame arrives. It does not run
     * while held: input we do not look at is our doing, not a stalled client. */
    if (c->in_len == 0 || c->held)
        kvf__srv_timer_disarm(srv, &c->partial);
    else if ((completed || !timer_armed(&c->partial)) &&
             kvf__srv_timer_arm(srv, &c->partial, srv->now_ms + srv->partial_timeout_ms) < 0) {
        kvf__srv_conn_close_warn(srv, c, "out of memory");
        return;
    }

    /* Held: the frames left are kept as they are (their headers are not validated yet, so their
     * lengths cannot size anything); nothing is read until they have run. */
    if (c->held)
        return;

    /* Give back a large buffer once what is left fits a small one. It grows again, as bytes
     * arrive, in conn_read(). */
    if (c->in_cap > SRV_IN_KEEP && c->in_len <= SRV_IN_KEEP / 2) {
        size_t cap = c->in_len > SRV_IN_MIN ? c->in_len : SRV_IN_MIN;
        uint8_t *p = realloc(c->in, cap);
        if (p) {
            c->in = p;
            c->in_cap = cap;
        }
    }
}

/* Room for more input: the buffer doubles (up to the frame being received, whose header has been
 * validated) only when it is full, so memory follows the bytes that actually arrived, never the
 * length a header announces. Returns false when no more is wanted now, or after closing @c. */
static bool conn_in_room(struct kvf_store_server *srv, struct srv_conn *c)
{
    if (c->in_len < c->in_cap)
        return true;
    size_t frame = SRV_IN_MIN;
    if (c->in_len >= KVF_STORE_HDR_LEN)
        frame = KVF_STORE_HDR_LEN + (size_t)kvf__get_le32(c->in + 12);
    if (c->in_len >= frame)
        return false; /* complete frames not run yet (held) */
    size_t cap = 2 * c->in_cap < frame ? 2 * c->in_cap : frame;
    uint8_t *p = realloc(c->in, cap);
    if (!p) {
        kvf__srv_conn_close_warn(srv, c, "out of memory for a frame of %zu bytes", frame);
        return false;
    }
    c->in = p;
    c->in_cap = cap;
    return true;
}

static void conn_read(struct kvf_store_server *srv, struct srv_conn *c)
{
    if (!c->in) {
        c->in = malloc(SRV_IN_MIN);
        if (!c->in) {
            kvf__srv_conn_close_warn(srv, c, "out of memory");
            return;
        }
        c->in_cap = SRV_IN_MIN;
    }
    /* While paused (or holding requests) nothing is read: the input stays bounded by one buffer,
     * and the socket's own buffers push back on the client. */
    for (int i = 0; i < SRV_READS_PER_EVENT && !c->dead && !c->held && !conn_paused(c); i++) {
        if (!conn_in_room(srv, c))
            break;
        size_t room = c->in_cap - c->in_len;
        kvf_stream_t s = {.fd = c->fd, .tls = c->tls};
        char why[160] = "";
        ssize_t n = kvf__stream_recv(&s, c->in + c->in_len, room, why, sizeof(why));
        if (n < 0) {
            errno = n == -EAGAIN ? EAGAIN : n == -KVF_ETLS ? EPROTO : (int)-n;
            if (n == -KVF_ETLS) {
                kvf__srv_conn_close_warn(srv, c, "%s", why);
                return;
            }
            n = -1;
        }
        if (n > 0) {
            c->in_len += (size_t)n;
            c->last_active_ms = srv->now_ms;
            SRV_STAT_ADD(srv, bytes_in, n);
            conn_parse(srv, c);
            if ((size_t)n < room)
                break; /* drained; level-triggered epoll reports more */
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n == 0) {
            if (c->in_len)
                KVF_LOG_RATELIMITED(KVF_LOG_INFO, SRV_LOG,
                                    "%s closed the connection in the middle of a frame", c->peer);
            else
                KVF_DEBUG(SRV_LOG, "%s disconnected", c->peer);
            /* Answers to its last requests may still get out if it only shut down writing. */
            if (!c->out.oom)
                conn_flush(srv, c);
        } else {
            KVF_DEBUG(SRV_LOG, "closing connection from %s: recv: %s", c->peer, strerror(errno));
        }
        kvf__srv_conn_kill(srv, c);
        return;
    }
    conn_tls_ready_check(srv, c);
}

/* Answer a plain client of this TLS store in its own protocol (best effort: one non-blocking
 * send of a short message), log and close. Its first bytes are at @h (@n of them). */
static void conn_tls_refuse_plain(struct kvf_store_server *srv, struct srv_conn *c,
                                  const uint8_t *h, size_t n)
{
    const char *msg = "this store requires TLS: connect with TLS options (a CA file, "
                      "--tls-ca-file) or set_conf_store_tls()";
    uint8_t out[KVF_AUTH_MAX_MSG];
    size_t len = 0;
    if (n >= KVF_STORE_HDR_LEN && kvf__get_le32(h) == KVF_STORE_MAGIC) {
        size_t ml = strlen(msg);
        kvf__put_le32(out, KVF_STORE_MAGIC);
        out[4] = KVF_STORE_PROTO_VERSION;
        out[5] = h[5];
        kvf__put_le16(out + 6, KVF_STORE_ST_TLS);
        memcpy(out + 8, h + 8, 4);
        kvf__put_le32(out + 12, (uint32_t)(4 + ml));
        kvf__put_le32(out + 16, (uint32_t)ml);
        memcpy(out + 20, msg, ml);
        len = 20 + ml;
    } else if (n >= KVF_AUTH_HDR_LEN && kvf__auth_is_magic(h)) {
        len = kvf__auth_encode(out, KVF_AUTH_REFUSED, msg, strlen(msg), NULL, 0);
    }
    /* Consume what it sent (one request), so that the close is a FIN after the answer, not a
     * reset that could destroy the answer before the client reads it. */
    uint8_t sink[4096];
    for (int i = 0; i < 4 && recv(c->fd, sink, sizeof(sink), MSG_DONTWAIT) > 0; i++)
        ;
    if (len && send(c->fd, out, len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
        KVF_DEBUG(SRV_LOG, "%s: send: %s", c->peer, strerror(errno));
    kvf__srv_conn_close_warn(srv, c, "TLS required: the client sent plain text (no TLS options?)");
}

/*
 * A TLS connection before its data phase: look at the first bytes (a ClientHello, or a plain
 * client to answer), then run the handshake as the socket allows. Returns true once the
 * connection is in its data phase (and @events still to be handled), false otherwise.
 */
static bool conn_tls_start(struct kvf_store_server *srv, struct srv_conn *c)
{
    char why[200];
    if (!c->tls_sniffed) {
        uint8_t h[KVF_STORE_HDR_LEN];
        ssize_t n = recv(c->fd, h, sizeof(h), MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return false;
        if (n <= 0) {
            KVF_DEBUG(SRV_LOG, "%s disconnected before TLS", c->peer);
            kvf__srv_conn_kill(srv, c);
            return false;
        }
        /* The first byte decides: waiting for a second would spin the level-triggered loop
         * on a client that sent one byte. */
        if (h[0] != KVF_TLS_RECORD_HANDSHAKE) {
            conn_tls_refuse_plain(srv, c, h, (size_t)n);
            return false;
        }
        c->tls_sniffed = true;
        c->tls_hs = true;
    }
    int rc = kvf__tls_handshake_step(c->tls, why, sizeof(why));
    if (rc < 0) {
        kvf__srv_conn_close_warn(srv, c, "TLS handshake failed: %s", why);
        return false;
    }
    uint32_t want = rc ? EPOLLIN : (kvf__tls_wants(c->tls) == POLLOUT ? EPOLLOUT : EPOLLIN);
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        if (epoll_ctl(srv->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
            kvf__srv_conn_close_warn(srv, c, "epoll_ctl: %s", strerror(errno));
            return false;
        }
        c->events = want;
    }
    if (rc == 0)
        return false;
    c->tls_hs = false;
    c->last_active_ms = srv->now_ms;
    kvf__srv_timer_disarm(srv, &c->auth_timer);
    if (c->auth && kvf__srv_timer_arm(srv, &c->auth_timer, srv->now_ms + KVF_AUTH_TIMEOUT_MS) < 0) {
        kvf__srv_conn_close_warn(srv, c, "out of memory");
        return false;
    }
    KVF_DEBUG(SRV_LOG, "%s: TLS handshake done", c->peer);
    return true;
}

void kvf__srv_tls_ready_run(struct kvf_store_server *srv)
{
    while (!link_empty(&srv->tls_ready)) {
        struct srv_conn *c = SRV_CONTAINER(srv->tls_ready.next, struct srv_conn, ready_link);
        link_del(&c->ready_link);
        c->tls_ready = false;
        conn_read(srv, c);
    }
}

void kvf__srv_conn_on_events(struct kvf_store_server *srv, struct srv_conn *c, uint32_t events)
{
    if (c->dead)
        return;
    if (c->tls && (!c->tls_sniffed || c->tls_hs)) {
        if (!conn_tls_start(srv, c))
            return;
        events |= EPOLLIN; /* application bytes may have come with the handshake's last ones */
    }
    if (c->tls && (events & EPOLLOUT) && !(events & EPOLLIN)) {
        kvf_stream_t s = {.fd = c->fd, .tls = c->tls};
        if (kvf__stream_wants(&s, false) == POLLOUT)
            events |= EPOLLIN; /* the read that waited for room to send */
    }
    if ((events & EPOLLIN) || ((events & (EPOLLHUP | EPOLLERR)) && (c->events & EPOLLIN)))
        conn_read(srv, c);
    if (!c->dead && (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)))
        conn_flush(srv, c);
}

void kvf__srv_sockaddr_format(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    kvf_hostport_t hp;
    memset(&hp, 0, sizeof(hp));
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &sin->sin_addr, hp.host, sizeof(hp.host));
        hp.kind = KVF_HOST_IPV4;
        hp.port = ntohs(sin->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, hp.host, sizeof(hp.host));
        hp.kind = KVF_HOST_IPV6;
        hp.port = ntohs(sin6->sin6_port);
    } else {
        snprintf(buf, len, "?");
        return;
    }
    kvf__hostport_format(&hp, buf, len);
}

/* A connection that brought nothing for the idle timeout, and waits for nothing (no parked
 * get-with-wait, no watch), is closed. The timer is armed once per timeout, not moved on every
 * read: when it fires early it is armed again for the real deadline. */
void kvf__srv_conn_quiet(struct kvf_store_server *srv, struct srv_conn *c)
{
    uint64_t idle = srv->opts.idle_timeout_ms;
    uint64_t due = c->last_active_ms + idle;
    if (c->nwaiters || c->nwatches || c->dirty)
        due = srv->now_ms + idle;
    if (due > srv->now_ms) {
        if (kvf__srv_timer_arm(srv, &c->quiet, due) < 0)
            kvf__srv_conn_close_warn(srv, c, "out of memory");
        return;
    }
    KVF_LOG_RATELIMITED(KVF_LOG_INFO, SRV_LOG,
                        "closing connection from %s: idle for %" PRIu64 " ms (idle_timeout_ms)",
                        c->peer, srv->now_ms - c->last_active_ms);
    kvf__srv_conn_kill(srv, c);
}

/* Close a connection just accepted, saying why (rate-limited: a flood of refusals must not flood
 * the log). */
static void refuse(int fd, const char *peer, const char *why)
{
    KVF_WARN_RATELIMITED(SRV_LOG, "refusing connection from %s: %s", peer, why);
    close(fd);
}

static void conn_new(struct kvf_store_server *srv, int fd, const struct sockaddr_storage *ss)
{
    char peer[KVF_SESSION_ID_MAX];
    kvf__srv_sockaddr_format(ss, peer, sizeof(peer));
    char why[128];
    if (srv->nconns >= srv->opts.max_clients) {
        snprintf(why, sizeof(why), "max_clients (%u) connections open", srv->opts.max_clients);
        refuse(fd, peer, why);
        return;
    }
    struct srv_client *cl = kvf__srv_client_get(srv, ss);
    if (!cl) {
        refuse(fd, peer, "out of memory");
        return;
    }
    if (cl->conns >= srv->opts.max_clients_per_addr) {
        snprintf(why, sizeof(why), "max_clients_per_addr (%u) connections open from that address",
                 srv->opts.max_clients_per_addr);
        refuse(fd, peer, why);
        return;
    }

    int one = 1;
    /* Requests and answers are small and latency-bound. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    struct srv_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        kvf__srv_client_maybe_free(srv, cl);
        refuse(fd, peer, "out of memory");
        return;
    }
    c->fd = fd;
    snprintf(c->peer, sizeof(c->peer), "%s", peer);
    kvf__buf_init(&c->out);
    timer_init(&c->partial, SRV_TIMER_PARTIAL);
    timer_init(&c->quiet, SRV_TIMER_QUIET);
    timer_init(&c->auth_timer, SRV_TIMER_AUTH);
    link_init(&c->waiters);
    link_init(&c->watches);
    link_init(&c->dirty_link);
    link_init(&c->ready_link);
    c->last_active_ms = srv->now_ms;
    c->events = EPOLLIN;
    struct epoll_event ev = {.events = c->events, .data.ptr = c};
    if (srv->auth_key.len) {
        c->auth = malloc(sizeof(*c->auth));
        if (c->auth) {
            kvf__auth_srv_init(c->auth, &srv->auth_key, KVF_AUTH_STORE_ID);
            if (srv->admin_key.len)
                kvf__auth_srv_set_admin(c->auth, &srv->admin_key);
        }
    }
    if (srv->tls_ctx)
        c->tls = kvf__tls_new(srv->tls_ctx, fd);
    if ((srv->auth_key.len && !c->auth) || (srv->tls_ctx && !c->tls) ||
        ((c->auth || c->tls) &&
         kvf__srv_timer_arm(srv, &c->auth_timer,
                            srv->now_ms + (c->tls ? KVF_TLS_HANDSHAKE_MS : KVF_AUTH_TIMEOUT_MS)) <
             0) ||
        kvf__srv_timer_arm(srv, &c->quiet, srv->now_ms + srv->opts.idle_timeout_ms) < 0 ||
        epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        KVF_WARN_RATELIMITED(SRV_LOG, "refusing connection from %s: %s", c->peer,
                             timer_armed(&c->quiet) ? strerror(errno) : "out of memory");
        kvf__srv_timer_disarm(srv, &c->quiet);
        kvf__srv_timer_disarm(srv, &c->auth_timer);
        if (c->auth)
            kvf__auth_srv_fini(c->auth);
        free(c->auth);
        kvf__tls_free(c->tls);
        kvf__srv_client_maybe_free(srv, cl);
        close(fd);
        free(c);
        return;
    }
    c->client = cl;
    cl->conns++;
    link_add_tail(&srv->conns, &c->link);
    srv->nconns++;
    SRV_STAT_ADD(srv, clients, 1);
    KVF_DEBUG(SRV_LOG, "connection from %s", c->peer);
}

void kvf__srv_accept_pause(struct kvf_store_server *srv, bool pause)
{
    struct epoll_event ev = {.events = pause ? 0u : EPOLLIN, .data.ptr = &srv->listen_fd};
    epoll_ctl(srv->epfd, EPOLL_CTL_MOD, srv->listen_fd, &ev);
    srv->accept_paused = pause;
    srv->accept_resume_ms = srv->now_ms + SRV_ACCEPT_PAUSE_MS;
}

void kvf__srv_accept_all(struct kvf_store_server *srv)
{
    for (int i = 0; i < SRV_ACCEPTS_PER_EVENT; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(srv->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                KVF_WARN_RATELIMITED(SRV_LOG, "accept: %s; not accepting for %u ms",
                                     strerror(errno), SRV_ACCEPT_PAUSE_MS);
                kvf__srv_accept_pause(srv, true);
                return;
            }
            /* EINTR, ECONNABORTED and the network errors Linux passes on from a dead pending
             * connection concern that one connection only. */
            continue;
        }
        conn_new(srv, fd, &ss);
    }
}
