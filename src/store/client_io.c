/*
 * The store client's I/O thread: it reads and validates every frame, hands answers to the
 * threads waiting for them, runs watch callbacks, flushes queued output, sends keep-alives and
 * re-grants when due, notices a store that stopped answering, and reconnects (see client.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/common.h"
#include "store/client.h"

/* ---------------------------------------------------------------------------------------------
 * Receiving (I/O thread)
 * ------------------------------------------------------------------------------------------- */

static char *cli_dup_nul(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);
    if (!s)
        return NULL;
    if (n)
        memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

/* Decode an answer body into @rq. Returns 0, or -KVF_EPROTO with @why when the body breaks the
 * protocol (the connection is then dropped). Runs without the lock: until @rq is marked done only
 * the I/O thread touches these fields. */
static int cli_decode_answer(cli_req_t *rq, uint16_t status, const uint8_t *body, size_t n,
                             char *why, size_t whylen)
{
    kvf_rd_t r;
    kvf__rd_init(&r, body, n);
    const uint8_t *p;
    size_t len;

    if (status != KVF_STORE_ST_OK) {
        if (!kvf__rd_blob(&r, n, &p, &len) || r.left) {
            snprintf(why, whylen, "error answer (status %u) to opcode %u is not one blob", status,
                     rq->op);
            return -KVF_EPROTO;
        }
        kvf__printable(rq->msg, sizeof(rq->msg), p, len);
        rq->err = kvf__store_status_to_err(status);
        return 0;
    }

    switch (rq->op) {
    case KVF_STORE_OP_GET:
        if (!kvf__rd_blob(&r, KVF_STORE_MAX_VALUE_LEN, &p, &len))
            break;
        if (r.left)
            break;
        rq->val = (uint8_t *)cli_dup_nul(p, len);
        rq->val_len = len;
        if (!rq->val) {
            rq->err = -KVF_ENOMEM;
            snprintf(rq->msg, sizeof(rq->msg), "out of memory for a %zu-byte value", len);
        }
        return 0;
    case KVF_STORE_OP_ADD:
    case KVF_STORE_OP_WATCH:
    case KVF_STORE_OP_LEASE_GRANT:
        if (!kvf__rd_u64(&r, &rq->u64) || r.left)
            break;
        if (rq->op != KVF_STORE_OP_ADD && rq->u64 == 0) {
            snprintf(why, whylen, "server id 0 in the answer to opcode %u", rq->op);
            return -KVF_EPROTO;
        }
        return 0;
    case KVF_STORE_OP_LIST:
    case KVF_STORE_OP_LIST_PAGE: {
        uint32_t count;
        uint8_t more = 0;
        if (rq->op == KVF_STORE_OP_LIST_PAGE && (!kvf__rd_u8(&r, &more) || more > 1))
            break;
        rq->u64 = more;
        if (!kvf__rd_u32(&r, &count))
            break;
        /* Each pair takes at least 8 bytes: bound the count before allocating for it. */
        if (count > KVF_STORE_MAX_LIST_KEYS || count > r.left / 8) {
            snprintf(why, whylen, "list answer claims %u pairs in %zu bytes", count, r.left);
            return -KVF_EPROTO;
        }
        rq->kvs = calloc(count ? count : 1, sizeof(*rq->kvs));
        if (!rq->kvs)
            goto out_nomem;
        for (uint32_t i = 0; i < count; i++) {
            const uint8_t *kp, *vp;
            size_t klen, vlen;
            if (!kvf__rd_blob(&r, KVF_STORE_MAX_KEY_LEN, &kp, &klen) ||
                !kvf__rd_blob(&r, KVF_STORE_MAX_VALUE_LEN, &vp, &vlen))
                break;
            kvf_store_kv_t *kv = &rq->kvs[rq->nkvs++];
            kv->key = cli_dup_nul(kp, klen);
            kv->val = cli_dup_nul(vp, vlen);
            kv->val_len = vlen;
            if (!kv->key || !kv->val)
                goto out_nomem;
        }
        if (r.bad || r.left)
            break;
        return 0;
    }
    default: /* every other answer has an empty body */
        if (n == 0)
            return 0;
        break;
    }
    snprintf(why, whylen, "answer to opcode %u: malformed %zu-byte body", rq->op, n);
    kvf_store_kv_free(rq->kvs, rq->nkvs);
    rq->kvs = NULL;
    rq->nkvs = 0;
    return -KVF_EPROTO;

out_nomem:
    kvf_store_kv_free(rq->kvs, rq->nkvs);
    rq->kvs = NULL;
    rq->nkvs = 0;
    rq->err = -KVF_ENOMEM;
    snprintf(rq->msg, sizeof(rq->msg), "out of memory decoding a list answer");
    return 0;
}

static void cli_complete_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->restore && st->restore_pending > 0 && --st->restore_pending == 0 &&
        st->state == CLI_RESTORING) {
        st->state = CLI_READY;
        pthread_cond_broadcast(&st->cond);
    }
    if (rq->owner == CLI_OWNER_CALLER) {
        rq->done = true;
        pthread_cond_signal(&rq->cond);
    } else {
        if (rq->owner == CLI_OWNER_IO)
            kvf__cli_io_unlink_locked(st, rq);
        kvf__cli_req_free(rq);
    }
}

static int cli_on_answer(kvf_store_t *st, uint8_t op, uint16_t status, uint32_t id,
                         const uint8_t *body, size_t n, char *why, size_t whylen)
{
    pthread_mutex_lock(&st->mu);
    cli_req_t *rq = id ? kvf__cli_req_find_locked(st, id) : NULL;
    pthread_mutex_unlock(&st->mu);
    /* Only this thread completes or frees requests in the table, so @rq stays valid. */
    if (!rq) {
        snprintf(why, whylen, "answer (opcode %u) to unknown request id %u", op, id);
        return -KVF_EPROTO;
    }
    if (rq->op != op) {
        snprintf(why, whylen, "answer to request %u has opcode %u, sent %u", id, op, rq->op);
        return -KVF_EPROTO;
    }
    if (status > KVF_STORE_ST_TLS) {
        snprintf(why, whylen, "answer to request %u has unknown status %u", id, status);
        return -KVF_EPROTO;
    }
    int rc = cli_decode_answer(rq, status, body, n, why, whylen);
    if (rc < 0)
        return rc; /* still in the table: failed with the connection */
    pthread_mutex_lock(&st->mu);
    kvf__cli_req_unlink_locked(st, rq);
    kvf__cli_apply_answer_locked(st, rq);
    cli_complete_locked(st, rq);
    pthread_mutex_unlock(&st->mu);
    return 0;
}

static int cli_on_event(kvf_store_t *st, uint16_t status, uint32_t id, const uint8_t *body,
                        size_t n, char *why, size_t whylen)
{
    kvf_rd_t r;
    uint64_t wid;
    uint8_t type;
    const uint8_t *kp, *vp;
    size_t klen, vlen;
    kvf__rd_init(&r, body, n);
    if (id != 0 || status != 0) {
        snprintf(why, whylen, "event frame with req_id %u, status %u", id, status);
        return -KVF_EPROTO;
    }
    if (!kvf__rd_u64(&r, &wid) || !kvf__rd_u8(&r, &type) ||
        !kvf__rd_blob(&r, KVF_STORE_MAX_KEY_LEN, &kp, &klen) ||
        !kvf__rd_blob(&r, KVF_STORE_MAX_VALUE_LEN, &vp, &vlen) || r.left ||
        (type != KVF_STORE_EVENT_PUT && type != KVF_STORE_EVENT_DELETE) || klen == 0) {
        snprintf(why, whylen, "malformed %zu-byte event", n);
        return -KVF_EPROTO;
    }

    pthread_mutex_lock(&st->mu);
    cli_watch_t *w;
    for (w = st->watches; w && !(w->active && w->sid == wid); w = w->next)
        ;
    if (!w) {
        /* A watch just unwatched, or abandoned by its caller: events may precede the answer. */
        pthread_mutex_unlock(&st->mu);
        return 0;
    }
    kvf_store_watch_cb cb = w->cb;
    void *arg = w->arg;
    /* kvf_store_unwatch() waits while this is set, so the callback never outlives the watch. */
    st->cb_watch_cid = w->cid;
    pthread_mutex_unlock(&st->mu);

    kvf_store_kv_t kv = {.key = cli_dup_nul(kp, klen), .val = NULL, .val_len = 0};
    if (type == KVF_STORE_EVENT_PUT) {
        kv.val = cli_dup_nul(vp, vlen);
        kv.val_len = vlen;
    }
    if (!kv.key || (type == KVF_STORE_EVENT_PUT && !kv.val))
        KVF_WARN_RATELIMITED(
            "store", "%s: out of memory delivering a %zu-byte watch event; dropped", st->url, vlen);
    else
        cb(arg, (kvf_store_event_type_t)type, &kv);
    free(kv.key);
    free(kv.val);

    pthread_mutex_lock(&st->mu);
    st->cb_watch_cid = 0;
    pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->mu);
    return 0;
}

/* Handle every complete frame in rx. Returns 0 or a negative code with @why. */
static int cli_process_input(kvf_store_t *st, char *why, size_t whylen)
{
    size_t off = 0;
    int rc = 0;
    while (st->rx.len - off >= KVF_STORE_HDR_LEN) {
        const uint8_t *h = st->rx.data + off;
        uint32_t magic = kvf__get_le32(h);
        uint8_t version = h[4], op = h[5];
        uint16_t status = kvf__get_le16(h + 6);
        uint32_t id = kvf__get_le32(h + 8), blen = kvf__get_le32(h + 12);
        if (magic != KVF_STORE_MAGIC || version != KVF_STORE_PROTO_VERSION) {
            snprintf(why, whylen, "bad frame header (magic 0x%08x, version %u)", magic, version);
            rc = -KVF_EPROTO;
            break;
        }
        if (blen > KVF_STORE_MAX_FRAME_LEN) {
            snprintf(why, whylen, "frame body of %u bytes exceeds the %u-byte limit", blen,
                     KVF_STORE_MAX_FRAME_LEN);
            rc = -KVF_EPROTO;
            break;
        }
        if (st->rx.len - off - KVF_STORE_HDR_LEN < blen)
            break;
        const uint8_t *body = h + KVF_STORE_HDR_LEN;
        if (op == KVF_STORE_OP_EVENT)
            rc = cli_on_event(st, status, id, body, blen, why, whylen);
        else
            rc = cli_on_answer(st, op, status, id, body, blen, why, whylen);
        if (rc < 0)
            break;
        st->backoff_ms = 0; /* a store that answers properly resets the reconnect backoff */
        off += KVF_STORE_HDR_LEN + blen;
    }
    /* Only compact after consuming a frame, so a large frame arriving in pieces is not moved
     * again on every read. */
    if (off)
        kvf__buf_consume(&st->rx, off);
    if (st->rx.len == 0 && st->rx.cap > CLI_BUF_KEEP_MAX)
        kvf__buf_free(&st->rx);
    return rc;
}

/* Read what the socket has and handle it. Returns 0 or a negative code with @why. */
static int cli_read_input(kvf_store_t *st, char *why, size_t whylen)
{
    for (int round = 0; round < CLI_READ_ROUNDS; round++) {
        size_t want = CLI_READ_CHUNK;
        if (st->rx.len >= KVF_STORE_HDR_LEN) {
            /* The header was validated when it arrived; read the rest of this frame at once. */
            size_t total = KVF_STORE_HDR_LEN + kvf__get_le32(st->rx.data + 12);
            if (total > st->rx.len && total - st->rx.len > want)
                want = total - st->rx.len;
        }
        uint8_t *p = kvf__buf_reserve(&st->rx, want);
        if (!p) {
            snprintf(why, whylen, "out of memory for %zu bytes of input", want);
            return -KVF_ENOMEM;
        }
        /* A TLS session is shared with the callers' sends, which hold mu: so does a read. A
         * plain read needs no lock (only this thread changes fd). */
        kvf_stream_t s = {.fd = st->fd, .tls = NULL};
        bool locked = st->tls != NULL;
        if (locked) {
            pthread_mutex_lock(&st->mu);
            s = cli_stream(st);
        }
        ssize_t n = kvf__stream_recv(&s, p, want, why, whylen);
        if (locked)
            pthread_mutex_unlock(&st->mu);
        if (n == 0) {
            snprintf(why, whylen, "the server closed the connection");
            return -KVF_ESTOREDOWN;
        }
        if (n == -EAGAIN)
            return 0;
        if (n < 0)
            return -KVF_ESTOREDOWN;
        st->rx.len += (size_t)n;
        st->last_io_ms = kvf__now_ms();
        int rc = cli_process_input(st, why, whylen);
        if (rc < 0)
            return rc;
        if ((size_t)n < want)
            return 0;
    }
    return 0;
}

/* Flush queued output as far as the socket takes it. */
static void cli_flush_locked(kvf_store_t *st)
{
    if (!st->broken) {
        st->out_off +=
            kvf__cli_send_now_locked(st, st->out.data + st->out_off, st->out.len - st->out_off);
        if (st->broken)
            return;
    }
    if (st->out_off == st->out.len) {
        st->out.len = 0;
        st->out_off = 0;
        st->last_io_ms = kvf__now_ms();
        if (st->out.cap > CLI_BUF_KEEP_MAX)
            kvf__buf_free(&st->out);
    } else if (st->out_off > st->out.len / 2) {
        kvf__buf_consume(&st->out, st->out_off);
        st->out_off = 0;
    }
}

/* A PING whose only purpose is to learn whether the store still answers. */
static void cli_send_probe_locked(kvf_store_t *st)
{
    kvf_buf_t f;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_PING, CLI_OWNER_IO);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_PING);
    if (!rq || kvf__cli_frame_end(&f) < 0) {
        kvf__buf_free(&f);
        free(rq);
        return; /* the next timed-out request asks again */
    }
    kvf__cli_send_internal_locked(st, rq, &f);
}

/* Drop the connection when the oldest internal request has gone unanswered for
 * request_timeout_ms. Time spent with output still queued does not count (the kernel's
 * TCP_USER_TIMEOUT covers a peer that stops acknowledging), nor does time before the last input
 * (a large answer may still be arriving). Returns the ms until the check is due, or UINT64_MAX. */
static uint64_t cli_check_alive_locked(kvf_store_t *st, uint64_t now)
{
    if (st->probe_wanted) {
        st->probe_wanted = false;
        if (!st->io_head)
            cli_send_probe_locked(st); /* otherwise the request in flight serves as the probe */
    }
    cli_req_t *rq = st->io_head;
    if (!rq || st->broken || st->out_off < st->out.len)
        return UINT64_MAX;
    uint64_t since = rq->sent_ms > st->last_io_ms ? rq->sent_ms : st->last_io_ms;
    uint64_t due = since + st->opts.request_timeout_ms;
    if (now < due)
        return due - now;
    char why[CLI_MSG_MAX];
    snprintf(why, sizeof(why), "no answer to an internal request (opcode %u) within %u ms", rq->op,
             st->opts.request_timeout_ms);
    kvf__cli_mark_broken_locked(st, why);
    return UINT64_MAX;
}

/* Send due keep-alives and re-grants, and check that the store still answers. Returns the poll
 * timeout until the next timer (-1: none). */
static int cli_run_timers_locked(kvf_store_t *st)
{
    if (st->state == CLI_DOWN)
        return -1;
    uint64_t now = kvf__now_ms();
    uint64_t next = UINT64_MAX;
    for (cli_lease_t *l = st->leases; l; l = l->next) {
        if (l->state != CLI_LEASE_LIVE && l->state != CLI_LEASE_NEED_GRANT)
            continue;
        if (now >= l->due_ms) {
            if (l->state == CLI_LEASE_NEED_GRANT) {
                kvf__cli_send_grant_locked(st, l, true);
                continue;
            }
            kvf__cli_send_keepalive_locked(st, l);
            l->due_ms = now + cli_keepalive_interval(l);
        }
        if (l->due_ms - now < next)
            next = l->due_ms - now;
    }
    /* A connection that carried nothing for CLI_QUIET_PING_MS pings, so that the server's idle
     * timeout never closes a live client (an internal request in flight counts as traffic). */
    if (st->state == CLI_READY && !st->io_head && !st->broken) {
        if (now >= st->last_send_ms + CLI_QUIET_PING_MS)
            cli_send_probe_locked(st);
        uint64_t due = st->last_send_ms + CLI_QUIET_PING_MS;
        if (due > now && due - now < next)
            next = due - now;
    }
    uint64_t alive = cli_check_alive_locked(st, now);
    if (alive < next)
        next = alive;
    if (next == UINT64_MAX)
        return -1;
    return next > INT_MAX ? INT_MAX : (int)next;
}

void *kvf__cli_io_main(void *arg)
{
    kvf_store_t *st = arg;
    char why[CLI_MSG_MAX];

    pthread_mutex_lock(&st->mu);
    while (!st->closing) {
        if (st->fd < 0) {
            pthread_mutex_unlock(&st->mu);
            kvf_tls_t *tls = NULL;
            int fd = kvf__cli_reconnect(st, &tls);
            pthread_mutex_lock(&st->mu);
            if (fd < 0)
                continue; /* closing */
            if (st->closing) {
                kvf__tls_free(tls);
                close(fd);
                break;
            }
            KVF_INFO("store", "%s: reconnected", st->url);
            kvf__cli_conn_up_locked(st, fd, tls);
            continue;
        }
        if (st->broken) {
            snprintf(why, sizeof(why), "%s", st->broken_why);
            KVF_WARN_RATELIMITED("store", "%s: connection lost: %s; reconnecting", st->url, why);
            char msg[CLI_MSG_MAX];
            snprintf(msg, sizeof(msg), "the store connection was lost (%.200s)", why);
            kvf__cli_conn_down_locked(st, -KVF_ESTOREDOWN, msg);
            continue;
        }
        int timeout = cli_run_timers_locked(st);
        kvf_stream_t s = cli_stream(st);
        /* TLS: a read may wait for the socket to take output (a key update answered), and
         * decrypted bytes already read from the socket do not wake poll(). */
        bool pending = kvf__stream_pending(&s);
        struct pollfd p[2] = {
            {.fd = st->fd,
             .events = (short)(POLLIN | (st->out.len > st->out_off ? POLLOUT : 0) |
                               (st->tls ? kvf__stream_wants(&s, false) : 0))},
            {.fd = st->wake_fd, .events = POLLIN},
        };
        pthread_mutex_unlock(&st->mu);

        int n = poll(p, 2, pending ? 0 : timeout);
        if (pending && n >= 0) {
            p[0].revents |= POLLIN;
            n++;
        }
        int rc = 0;
        if (n < 0 && errno != EINTR) {
            snprintf(why, sizeof(why), "poll: %s", kvf_strerror(-errno));
            rc = -KVF_ESTOREDOWN;
        }
        if (n > 0 && (p[1].revents & POLLIN))
            cli_drain_wake(st);
        if (n > 0 && (p[0].revents & POLLOUT)) {
            pthread_mutex_lock(&st->mu);
            cli_flush_locked(st);
            pthread_mutex_unlock(&st->mu);
        }
        if (rc == 0 && n > 0 && (p[0].revents & (POLLIN | POLLOUT | POLLHUP | POLLERR)))
            rc = cli_read_input(st, why, sizeof(why));

        pthread_mutex_lock(&st->mu);
        if (rc < 0) {
            char msg[CLI_MSG_MAX + 64];
            if (rc == -KVF_EPROTO) {
                KVF_WARN_RATELIMITED("store", "%s: protocol error from the store: %s; reconnecting",
                                     st->url, why);
                snprintf(msg, sizeof(msg), "protocol error from the store (%.200s)", why);
            } else {
                KVF_WARN_RATELIMITED("store", "%s: connection lost: %s; reconnecting", st->url,
                                     why);
                snprintf(msg, sizeof(msg), "the store connection was lost (%.200s)", why);
            }
            kvf__cli_conn_down_locked(st, rc == -KVF_EPROTO ? -KVF_EPROTO : -KVF_ESTOREDOWN, msg);
        }
    }
    kvf__cli_conn_down_locked(st, -KVF_ECLOSED, "the client was closed");
    pthread_mutex_unlock(&st->mu);
    return NULL;
}
