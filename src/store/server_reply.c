/*
 * Output of the store server: frames appended to a connection's buffer (answers, error answers,
 * watch events) and the bounds on what may be appended. Nothing here sends or closes: the flush
 * pass in server_conn.c does (see the rules in server.h).
 */
#include <inttypes.h>
#include <stdio.h>

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
 * parked get-with-wait): true if it fits under KVF_STORE_MAX_OUTPUT_BYTES. Otherwise latch
 * c->overflow, for the flush pass to close @c (never closed here, see the top of server.h), and
 * the caller appends nothing. */
bool kvf__srv_conn_room_for(struct kvf_store_server *srv, struct srv_conn *c, size_t frame_len)
{
    if (c->overflow || c->dead)
        return false;
    if (frame_len > KVF_STORE_MAX_OUTPUT_BYTES ||
        conn_pending_out(c) > KVF_STORE_MAX_OUTPUT_BYTES - frame_len) {
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
    kvf__srv_conn_mark_dirty(srv, c);
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
