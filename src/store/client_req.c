/*
 * The store client's records and how requests go out: requests in flight, leases with the keys
 * set under them, watches (allocation, lookup, freeing), the frames that carry requests, and the
 * non-blocking send path shared by callers and the I/O thread (see client.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/common.h"
#include "common/thread.h"
#include "store/client.h"

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */

/* A key or prefix as shown in messages: at most 64 bytes, non-printable bytes as '?'. */
const char *kvf__cli_show(char *buf, size_t n, const char *s, size_t len)
{
    size_t max = n - 4 < 64 ? n - 4 : 64;
    size_t o = strlen(kvf__printable(buf, max + 1, s, len));
    if (o < len) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

/* ---------------------------------------------------------------------------------------------
 * Frames
 * ------------------------------------------------------------------------------------------- */

void kvf__cli_frame_begin(kvf_buf_t *b, uint8_t op)
{
    kvf__buf_init(b);
    kvf__buf_put_u32(b, KVF_STORE_MAGIC);
    kvf__buf_put_u8(b, KVF_STORE_PROTO_VERSION);
    kvf__buf_put_u8(b, op);
    kvf__buf_put_u16(b, 0);
    kvf__buf_put_u32(b, 0); /* req_id, filled in when the frame is sent */
    kvf__buf_put_u32(b, 0); /* body_len, filled in by kvf__cli_frame_end() */
}

int kvf__cli_frame_end(kvf_buf_t *b)
{
    if (b->oom)
        return -KVF_ENOMEM;
    kvf__put_le32(b->data + 12, (uint32_t)(b->len - KVF_STORE_HDR_LEN));
    return 0;
}

/* A frame whose body is one u64 (KEEPALIVE, REVOKE, UNWATCH). */
int kvf__cli_frame_u64(kvf_buf_t *b, uint8_t op, uint64_t v)
{
    kvf__cli_frame_begin(b, op);
    kvf__buf_put_u64(b, v);
    return kvf__cli_frame_end(b);
}

/* SET: blob key, blob value, u64 lease. The lease is the last 8 bytes, patched when sent. */
int kvf__cli_frame_set(kvf_buf_t *b, const char *key, size_t klen, const void *val, size_t len,
                       uint64_t lease_sid)
{
    kvf__cli_frame_begin(b, KVF_STORE_OP_SET);
    kvf__buf_put_blob(b, key, klen);
    kvf__buf_put_blob(b, val, len);
    kvf__buf_put_u64(b, lease_sid);
    return kvf__cli_frame_end(b);
}

/* ---------------------------------------------------------------------------------------------
 * Requests, leases and watches
 * ------------------------------------------------------------------------------------------- */

cli_req_t *kvf__cli_req_new(uint8_t op, cli_owner_t owner)
{
    cli_req_t *rq = calloc(1, sizeof(*rq));
    if (!rq)
        return NULL;
    rq->op = op;
    rq->owner = owner;
    if (owner == CLI_OWNER_CALLER) {
        if (kvf__cond_init_monotonic(&rq->cond) < 0) {
            free(rq);
            return NULL;
        }
        rq->has_cond = true;
    }
    return rq;
}

static void cli_key_free(cli_key_t *k)
{
    free(k->key);
    free(k->val);
    free(k);
}

void kvf__cli_lease_free(cli_lease_t *l)
{
    if (!l)
        return;
    while (l->keys) {
        cli_key_t *k = l->keys;
        l->keys = k->next;
        cli_key_free(k);
    }
    free(l);
}

void kvf__cli_watch_free(cli_watch_t *w)
{
    if (!w)
        return;
    free(w->prefix);
    free(w);
}

void kvf__cli_req_free(cli_req_t *rq)
{
    if (!rq)
        return;
    free(rq->val);
    kvf_store_kv_free(rq->kvs, rq->nkvs);
    free(rq->key);
    free(rq->rec_val);
    kvf__cli_lease_free(rq->new_lease);
    kvf__cli_watch_free(rq->new_watch);
    if (rq->has_cond)
        pthread_cond_destroy(&rq->cond);
    free(rq);
}

cli_req_t *kvf__cli_req_find_locked(kvf_store_t *st, uint32_t id)
{
    for (cli_req_t *rq = st->reqs[id % CLI_REQ_BUCKETS]; rq; rq = rq->next)
        if (rq->id == id)
            return rq;
    return NULL;
}

void kvf__cli_req_unlink_locked(kvf_store_t *st, cli_req_t *rq)
{
    for (cli_req_t **pp = &st->reqs[rq->id % CLI_REQ_BUCKETS]; *pp; pp = &(*pp)->next) {
        if (*pp == rq) {
            *pp = rq->next;
            rq->next = NULL;
            return;
        }
    }
}

cli_lease_t *kvf__cli_lease_find_locked(kvf_store_t *st, uint64_t cid)
{
    for (cli_lease_t *l = st->leases; l; l = l->next)
        if (l->cid == cid)
            return l;
    return NULL;
}

cli_lease_t *kvf__cli_lease_unlink_locked(kvf_store_t *st, uint64_t cid)
{
    for (cli_lease_t **pp = &st->leases; *pp; pp = &(*pp)->next) {
        if ((*pp)->cid == cid) {
            cli_lease_t *l = *pp;
            *pp = l->next;
            l->next = NULL;
            return l;
        }
    }
    return NULL;
}

cli_watch_t *kvf__cli_watch_unlink_locked(kvf_store_t *st, uint64_t cid)
{
    for (cli_watch_t **pp = &st->watches; *pp; pp = &(*pp)->next) {
        if ((*pp)->cid == cid) {
            cli_watch_t *w = *pp;
            *pp = w->next;
            w->next = NULL;
            return w;
        }
    }
    return NULL;
}

/* Stop tracking @key under any lease: it was deleted, or set again with another lease or none. */
void kvf__cli_forget_key_locked(kvf_store_t *st, const char *key)
{
    for (cli_lease_t *l = st->leases; l; l = l->next) {
        for (cli_key_t **pp = &l->keys; *pp;) {
            cli_key_t *k = *pp;
            if (!strcmp(k->key, key)) {
                *pp = k->next;
                cli_key_free(k);
            } else {
                pp = &k->next;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Sending
 * ------------------------------------------------------------------------------------------- */

/* Ask the I/O thread to drop the connection (callers may not close the fd it polls). */
void kvf__cli_mark_broken_locked(kvf_store_t *st, const char *why)
{
    if (!st->broken) {
        st->broken = true;
        snprintf(st->broken_why, sizeof(st->broken_why), "%s", why);
    }
    cli_wake(st);
}

size_t kvf__cli_send_now_locked(kvf_store_t *st, const uint8_t *p, size_t n)
{
    size_t sent = 0;
    kvf_stream_t s = cli_stream(st);
    while (sent < n && !st->broken) {
        char why[CLI_MSG_MAX];
        ssize_t w = kvf__stream_send(&s, p + sent, n - sent, why, sizeof(why));
        if (w == -EAGAIN)
            break;
        if (w <= 0) {
            kvf__cli_mark_broken_locked(st, why);
            break;
        }
        sent += (size_t)w;
    }
    return sent;
}

/* Send @n bytes now as far as the socket takes them, queueing the rest for the I/O thread.
 * Output is never reordered: once anything is queued, later frames queue behind it. */
static void cli_send_locked(kvf_store_t *st, const uint8_t *p, size_t n)
{
    if (st->broken || st->fd < 0)
        return; /* the request is failed when the I/O thread drops the connection */
    st->last_send_ms = kvf__now_ms();
    if (st->out.len == st->out_off) {
        size_t sent = kvf__cli_send_now_locked(st, p, n);
        if (st->broken || sent == n)
            return;
        p += sent;
        n -= sent;
    }
    bool was_empty = st->out.len == st->out_off;
    kvf__buf_put(&st->out, p, n);
    if (st->out.oom) {
        /* Part of a frame may already be on the wire: the stream cannot continue. */
        kvf__cli_mark_broken_locked(st, "out of memory queueing a request");
        return;
    }
    if (was_empty)
        cli_wake(st); /* so that it polls for POLLOUT */
}

/* Give @rq an id, enter it in the table and send @frame. The connection must be up. */
void kvf__cli_submit_locked(kvf_store_t *st, cli_req_t *rq, kvf_buf_t *frame)
{
    do {
        rq->id = st->next_req_id++;
    } while (rq->id == 0 || kvf__cli_req_find_locked(st, rq->id));
    kvf__put_le32(frame->data + 8, rq->id);
    rq->next = st->reqs[rq->id % CLI_REQ_BUCKETS];
    st->reqs[rq->id % CLI_REQ_BUCKETS] = rq;
    cli_send_locked(st, frame->data, frame->len);
}

/* Send a request owned by the I/O thread, whose answer nobody waits for. Consumes @frame.
 * It joins the list of internal requests that must be answered within request_timeout_ms. */
void kvf__cli_send_internal_locked(kvf_store_t *st, cli_req_t *rq, kvf_buf_t *frame)
{
    kvf__cli_submit_locked(st, rq, frame);
    if (rq->restore)
        st->restore_pending++;
    rq->sent_ms = kvf__now_ms();
    rq->io_next = NULL;
    rq->io_prev = st->io_tail;
    if (st->io_tail)
        st->io_tail->io_next = rq;
    else
        st->io_head = rq;
    st->io_tail = rq;
    kvf__buf_free(frame);
}

void kvf__cli_io_unlink_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->io_prev)
        rq->io_prev->io_next = rq->io_next;
    else if (st->io_head == rq)
        st->io_head = rq->io_next;
    if (rq->io_next)
        rq->io_next->io_prev = rq->io_prev;
    else if (st->io_tail == rq)
        st->io_tail = rq->io_prev;
    rq->io_prev = rq->io_next = NULL;
}

/* Fire-and-forget request with a u64 body: used for revoking or unwatching server ids that
 * nobody owns any more. Failure only costs a lease that expires or a watch whose events are
 * ignored, so it is logged, not reported. */
void kvf__cli_send_u64_locked(kvf_store_t *st, uint8_t op, uint64_t v)
{
    kvf_buf_t f;
    cli_req_t *rq = kvf__cli_req_new(op, CLI_OWNER_IO);
    if (!rq || kvf__cli_frame_u64(&f, op, v) < 0) {
        if (rq)
            kvf__buf_free(&f);
        free(rq);
        KVF_WARN_RATELIMITED("store", "%s: out of memory sending opcode %u for server id %" PRIu64,
                             st->url, op, v);
        return;
    }
    kvf__cli_send_internal_locked(st, rq, &f);
}

/* Public, and here at the bottom because requests and the I/O thread free lists with it too. */
void kvf_store_kv_free(kvf_store_kv_t *kvs, size_t count)
{
    if (!kvs)
        return;
    for (size_t i = 0; i < count; i++) {
        free(kvs[i].key);
        free(kvs[i].val);
    }
    free(kvs);
}
