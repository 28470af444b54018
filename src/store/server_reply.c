/*
 * Output of the store server: frames appended to a connection's buffer (answers, error answers,
 * watch events) and the bounds on what may be appended. Nothing here sends or closes: the flush
 * pass in server_conn.c does (see the rules in server.h).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/server.h"

const char *kvf__srv_op_name(unsigned op)
{
    static const char *const names[] = {
        [KVF_STORE_OP_PING] = "ping",
        [KVF_STORE_OP_SET] = "set",
        [KVF_STORE_OP_GET] = "get",
        [KVF_STORE_OP_DEL] = "del",
        [KVF_STORE_OP_CAS] = "cas",
        [KVF_STORE_OP_ADD] = "add",
        [KVF_STORE_OP_LIST] = "list",
        [KVF_STORE_OP_WATCH] = "watch",
        [KVF_STORE_OP_UNWATCH] = "unwatch",
        [KVF_STORE_OP_LEASE_GRANT] = "lease_grant",
        [KVF_STORE_OP_LEASE_KEEPALIVE] = "lease_keepalive",
        [KVF_STORE_OP_LEASE_REVOKE] = "lease_revoke",
        [KVF_STORE_OP_LIST_PAGE] = "list_page",
    };
    if (op < KVF__ARRAY_SIZE(names) && names[op])
        return names[op];
    return "?";
}

/* ---- output: frames appended to a connection's buffer ---------------------------------------- */

void kvf__srv_conn_mark_dirty(struct kvf_store_server *srv, struct srv_conn *c)
{
    if (c->dirty || c->dead)
        return;
    c->dirty = true;
    link_add_tail(&srv->dirty, &c->dirty_link);
}

/* For a frame of @frame_len bytes that @c did not just ask for (a watch event, the answer to a
 * parked get-with-wait): true if it fits under the connection's output bound, and under the
 * server's total unless @c is already behind (a connection that has read everything is not the
 * one filling the server). Otherwise latch c->overflow, for the flush pass to close @c (never
 * closed here, see the top of server.h), and the caller appends nothing. */
bool kvf__srv_conn_room_for(struct kvf_store_server *srv, struct srv_conn *c, size_t frame_len)
{
    if (c->overflow || c->dead)
        return false;
    uint64_t pending = conn_pending_out(c);
    uint64_t max = srv->opts.max_output_bytes, total = srv->opts.max_output_bytes_total;
    if (frame_len > max || pending > max - frame_len ||
        (pending && (frame_len > total || srv->out_total > total - frame_len))) {
        c->overflow = true;
        kvf__srv_conn_mark_dirty(srv, c);
        return false;
    }
    return true;
}

/* Start a frame in @c's output; returns the header's offset for kvf__srv_frame_end(). An allocation
 * failure latches c->out.oom, which the flush turns into closing the connection. */
size_t kvf__srv_frame_begin(struct srv_conn *c, uint8_t op, uint16_t status, uint32_t req_id)
{
    size_t off = c->out.len;
    uint8_t *h = kvf__buf_reserve(&c->out, KVF_STORE_HDR_LEN);
    if (!h)
        return off;
    kvf__put_le32(h, KVF_STORE_MAGIC);
    h[4] = KVF_STORE_PROTO_VERSION;
    h[5] = op;
    kvf__put_le16(h + 6, status);
    kvf__put_le32(h + 8, req_id);
    kvf__put_le32(h + 12, 0);
    c->out.len += KVF_STORE_HDR_LEN;
    return off;
}

void kvf__srv_frame_end(struct kvf_store_server *srv, struct srv_conn *c, size_t off)
{
    if (!c->out.oom)
        kvf__put_le32(c->out.data + off + 12, (uint32_t)(c->out.len - off - KVF_STORE_HDR_LEN));
    kvf__srv_out_account(srv, c);
    kvf__srv_conn_mark_dirty(srv, c);
}

/* ---- shared tails ---------------------------------------------------------------------------- */

struct srv_shared *kvf__srv_shared_new(size_t len)
{
    struct srv_shared *sh = malloc(sizeof(*sh) + len);
    if (!sh)
        return NULL;
    sh->refs = 1;
    sh->len = (uint32_t)len;
    return sh;
}

void kvf__srv_shared_put(struct srv_shared *sh)
{
    if (sh && --sh->refs == 0)
        free(sh);
}

void kvf__srv_frame_shared(struct kvf_store_server *srv, struct srv_conn *c, uint8_t op,
                           uint32_t req_id, const void *prefix, size_t plen, struct srv_shared *sh)
{
    if (c->mark_len == c->mark_cap) {
        if (c->mark_head > 0 && c->mark_head >= c->mark_len / 2) {
            memmove(c->marks, c->marks + c->mark_head,
                    (c->mark_len - c->mark_head) * sizeof(*c->marks));
            c->mark_len -= c->mark_head;
            c->mark_head = 0;
        } else {
            size_t cap = c->mark_cap ? 2 * c->mark_cap : 16;
            struct srv_mark *m = realloc(c->marks, cap * sizeof(*m));
            if (!m) {
                c->marks_oom = true;
                kvf__srv_conn_mark_dirty(srv, c);
                return;
            }
            c->marks = m;
            c->mark_cap = cap;
        }
    }
    size_t off = kvf__srv_frame_begin(c, op, KVF_STORE_ST_OK, req_id);
    if (plen)
        kvf__buf_put(&c->out, prefix, plen);
    if (c->out.oom) {
        kvf__srv_conn_mark_dirty(srv, c);
        return;
    }
    kvf__put_le32(c->out.data + off + 12, (uint32_t)(plen + sh->len));
    sh->refs++;
    c->marks[c->mark_len++] = (struct srv_mark){.pos = c->out.len, .sent = 0, .sh = sh};
    c->shared_pending += sh->len;
    kvf__srv_out_account(srv, c);
    kvf__srv_conn_mark_dirty(srv, c);
}

void kvf__srv_out_account(struct kvf_store_server *srv, struct srv_conn *c)
{
    size_t now = c->dead ? 0 : conn_pending_out(c);
    srv->out_total = srv->out_total - c->out_counted + now;
    c->out_counted = now;
}

void kvf__srv_out_advance(struct kvf_store_server *srv, struct srv_conn *c, size_t n)
{
    while (n) {
        struct srv_mark *m = c->mark_head < c->mark_len ? &c->marks[c->mark_head] : NULL;
        if (m && c->out_off == m->pos) {
            size_t take = m->sh->len - m->sent < n ? m->sh->len - m->sent : n;
            m->sent += take;
            c->shared_pending -= take;
            n -= take;
            if (m->sent == m->sh->len) {
                kvf__srv_shared_put(m->sh);
                c->mark_head++;
            }
            continue;
        }
        size_t limit = m ? m->pos : c->out.len;
        size_t take = limit - c->out_off < n ? limit - c->out_off : n;
        c->out_off += take;
        n -= take;
    }
    /* Marks at the current position with nothing left (none are empty, but be exact). */
    while (c->mark_head < c->mark_len && c->marks[c->mark_head].pos == c->out_off &&
           c->marks[c->mark_head].sent == c->marks[c->mark_head].sh->len) {
        kvf__srv_shared_put(c->marks[c->mark_head].sh);
        c->mark_head++;
    }
    if (c->mark_head == c->mark_len)
        c->mark_head = c->mark_len = 0;
    kvf__srv_out_account(srv, c);
}

void kvf__srv_out_release(struct kvf_store_server *srv, struct srv_conn *c)
{
    for (size_t i = c->mark_head; i < c->mark_len; i++)
        kvf__srv_shared_put(c->marks[i].sh);
    free(c->marks);
    c->marks = NULL;
    c->mark_head = c->mark_len = c->mark_cap = 0;
    c->shared_pending = 0;
    kvf__buf_free(&c->out);
    c->out_off = 0;
    kvf__srv_out_account(srv, c);
}

void kvf__srv_reply_empty(struct kvf_store_server *srv, struct srv_conn *c,
                          const struct srv_req *rq)
{
    kvf__srv_frame_end(srv, c, kvf__srv_frame_begin(c, rq->op, KVF_STORE_ST_OK, rq->req_id));
}

void kvf__srv_reply_u64(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                        uint64_t v)
{
    size_t off = kvf__srv_frame_begin(c, rq->op, KVF_STORE_ST_OK, rq->req_id);
    kvf__buf_put_u64(&c->out, v);
    kvf__srv_frame_end(srv, c, off);
}

void kvf__srv_reply_blob(struct kvf_store_server *srv, struct srv_conn *c, uint8_t op,
                         uint32_t req_id, const void *p, size_t n)
{
    size_t off = kvf__srv_frame_begin(c, op, KVF_STORE_ST_OK, req_id);
    kvf__buf_put_blob(&c->out, p, n);
    kvf__srv_frame_end(srv, c, off);
}

static void reply_errv(struct kvf_store_server *srv, struct srv_conn *c, uint8_t op,
                       uint32_t req_id, uint16_t status, const char *fmt, va_list ap)
{
    char msg[SRV_ERRMSG_MAX];
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t len = n < 0 ? 0 : (size_t)n >= sizeof(msg) ? sizeof(msg) - 1 : (size_t)n;
    KVF_DEBUG(SRV_LOG, "%s: %s req %" PRIu32 ": status %u: %.*s", c->peer, kvf__srv_op_name(op),
              req_id, (unsigned)status, (int)len, msg);
    size_t off = kvf__srv_frame_begin(c, op, status, req_id);
    kvf__buf_put_blob(&c->out, msg, len);
    kvf__srv_frame_end(srv, c, off);
}

/* Answer @rq with a non-zero @status and a message body. */
void kvf__srv_reply_err(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                        uint16_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    reply_errv(srv, c, rq->op, rq->req_id, status, fmt, ap);
    va_end(ap);
}

void kvf__srv_reply_err_to(struct kvf_store_server *srv, struct srv_conn *c, uint8_t op,
                           uint32_t req_id, uint16_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    reply_errv(srv, c, op, req_id, status, fmt, ap);
    va_end(ap);
}
