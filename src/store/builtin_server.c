/*
 * The built-in config store server (tcp://): op handlers, connections, the loop, start and stop.
 * The structures and the files below this one are described in server.h.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <search.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/net.h"
#include "common/thread.h"
#include "store/server.h"
#include "store/server_internal.h"

/* ---- request decoding helpers ---------------------------------------------------------------- */

/* Blobs are read without a length limit (the frame bounds them); each op then checks its own
 * limits so that an oversized key or value gets TOO_BIG rather than BAD_REQUEST. */
static bool rd_blob32(kvf_rd_t *rd, const uint8_t **p, uint32_t *n)
{
    size_t len = 0;
    if (!kvf__rd_blob(rd, KVF_STORE_MAX_FRAME_LEN, p, &len))
        return false;
    *n = (uint32_t)len;
    return true;
}

/* After the last field: true if the body decoded exactly, else answer BAD_REQUEST. */
static bool decode_done(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                        const kvf_rd_t *rd)
{
    if (rd->bad) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BAD_REQUEST, "malformed %s request body",
                           kvf__srv_op_name(rq->op));
        return false;
    }
    if (rd->left) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BAD_REQUEST,
                           "%zu unexpected bytes after the %s request", rd->left,
                           kvf__srv_op_name(rq->op));
        return false;
    }
    return true;
}

static bool check_key(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                      uint32_t klen)
{
    if (klen == 0) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BAD_REQUEST, "key is empty");
        return false;
    }
    if (klen > KVF_STORE_MAX_KEY_LEN) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_TOO_BIG, "key of %" PRIu32 " bytes exceeds %u",
                           klen, KVF_STORE_MAX_KEY_LEN);
        return false;
    }
    return true;
}

static bool check_prefix(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                         uint32_t plen)
{
    if (plen > KVF_STORE_MAX_KEY_LEN) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_TOO_BIG,
                           "prefix of %" PRIu32 " bytes exceeds %u", plen, KVF_STORE_MAX_KEY_LEN);
        return false;
    }
    return true;
}

static bool check_value(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                        uint32_t vlen)
{
    if (vlen > KVF_STORE_MAX_VALUE_LEN) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_TOO_BIG,
                           "value of %" PRIu32 " bytes exceeds %u", vlen, KVF_STORE_MAX_VALUE_LEN);
        return false;
    }
    return true;
}

/* Resolve the lease field of SET/CAS. Returns false after answering LEASE_NOT_FOUND. */
static bool resolve_lease(struct kvf_store_server *srv, struct srv_conn *c,
                          const struct srv_req *rq, uint64_t id, struct srv_lease **out)
{
    *out = NULL;
    if (id == 0)
        return true;
    *out = kvf__srv_lease_find(srv, id);
    if (!*out) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_LEASE_NOT_FOUND, "lease %" PRIu64 " not found",
                           id);
        return false;
    }
    return true;
}

static void reply_oom(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq)
{
    KVF_WARN(SRV_LOG, "%s: %s: out of memory", c->peer, kvf__srv_op_name(rq->op));
    kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BUSY, "store server out of memory");
}

/* Strict decimal int64: an optional '-', then one or more digits; nothing else. */
static bool parse_i64(const uint8_t *p, uint32_t n, int64_t *out)
{
    uint32_t i = 0;
    bool neg = false;
    int64_t v = 0;
    if (n && p[0] == '-') {
        neg = true;
        i = 1;
    }
    if (i == n)
        return false;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        int d = p[i] - '0';
        /* Accumulate with the final sign so that INT64_MIN parses. */
        if (__builtin_mul_overflow(v, 10, &v))
            return false;
        if (neg ? __builtin_sub_overflow(v, d, &v) : __builtin_add_overflow(v, d, &v))
            return false;
    }
    *out = v;
    return true;
}

/* ---- ops ------------------------------------------------------------------------------------- */

static void op_ping(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                    kvf_rd_t *rd)
{
    if (decode_done(srv, c, rq, rd))
        kvf__srv_reply_empty(srv, c, rq);
}

static void op_set(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                   kvf_rd_t *rd)
{
    const uint8_t *key = NULL, *val = NULL;
    uint32_t klen = 0, vlen = 0;
    uint64_t lease_id = 0;
    struct srv_lease *lease;

    rd_blob32(rd, &key, &klen);
    rd_blob32(rd, &val, &vlen);
    kvf__rd_u64(rd, &lease_id);
    if (!decode_done(srv, c, rq, rd) || !check_key(srv, c, rq, klen) ||
        !check_value(srv, c, rq, vlen) || !resolve_lease(srv, c, rq, lease_id, &lease))
        return;
    if (kvf__srv_kv_put(srv, key, klen, val, vlen, true, lease) < 0) {
        reply_oom(srv, c, rq);
        return;
    }
    kvf__srv_reply_empty(srv, c, rq);
}

static void op_get(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                   kvf_rd_t *rd)
{
    const uint8_t *key = NULL;
    uint32_t klen = 0, wait_ms = 0;

    rd_blob32(rd, &key, &klen);
    kvf__rd_u32(rd, &wait_ms);
    if (!decode_done(srv, c, rq, rd) || !check_key(srv, c, rq, klen))
        return;
    struct srv_entry *e = kvf__srv_kv_find(srv, key, klen);
    if (e) {
        kvf__srv_reply_blob(srv, c, rq->op, rq->req_id, e->val, e->vlen);
        return;
    }
    if (wait_ms == 0) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_NOT_FOUND, "key not found");
        return;
    }
    if (c->nwaiters >= KVF_STORE_MAX_WAITERS_PER_CLIENT) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BUSY,
                           "%u get-with-wait requests already pending",
                           KVF_STORE_MAX_WAITERS_PER_CLIENT);
        return;
    }
    if (wait_ms > KVF_STORE_MAX_WAIT_MS)
        wait_ms = KVF_STORE_MAX_WAIT_MS;
    /* The answer comes later: from kvf__srv_kv_put() via waiters_wake(), or from the timer. */
    if (kvf__srv_waiter_add(srv, c, rq->req_id, key, klen, srv->now_ms + wait_ms) < 0)
        reply_oom(srv, c, rq);
}

static void op_del(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                   kvf_rd_t *rd)
{
    const uint8_t *key = NULL;
    uint32_t klen = 0;

    rd_blob32(rd, &key, &klen);
    if (!decode_done(srv, c, rq, rd) || !check_key(srv, c, rq, klen))
        return;
    struct srv_entry *e = kvf__srv_kv_find(srv, key, klen);
    if (!e) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_NOT_FOUND, "key not found");
        return;
    }
    kvf__srv_kv_delete(srv, e);
    kvf__srv_reply_empty(srv, c, rq);
}

static void op_cas(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                   kvf_rd_t *rd)
{
    const uint8_t *key = NULL, *expected = NULL, *val = NULL;
    uint32_t klen = 0, elen = 0, vlen = 0;
    uint8_t expect_present = 0;
    uint64_t lease_id = 0;
    struct srv_lease *lease;

    rd_blob32(rd, &key, &klen);
    kvf__rd_u8(rd, &expect_present);
    rd_blob32(rd, &expected, &elen);
    rd_blob32(rd, &val, &vlen);
    kvf__rd_u64(rd, &lease_id);
    if (!decode_done(srv, c, rq, rd) || !check_key(srv, c, rq, klen))
        return;
    if (expect_present > 1 || (!expect_present && elen)) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BAD_REQUEST,
                           "expect_present must be 0 (with an empty expected value) or 1");
        return;
    }
    if (!check_value(srv, c, rq, vlen) || !resolve_lease(srv, c, rq, lease_id, &lease))
        return;
    struct srv_entry *e = kvf__srv_kv_find(srv, key, klen);
    if (!expect_present && e) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_CAS_MISMATCH, "key exists");
        return;
    }
    if (expect_present && !e) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_CAS_MISMATCH, "key is absent");
        return;
    }
    if (expect_present && (e->vlen != elen || (elen && memcmp(e->val, expected, elen) != 0))) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_CAS_MISMATCH,
                           "value differs from the expected one");
        return;
    }
    if (kvf__srv_kv_put(srv, key, klen, val, vlen, true, lease) < 0) {
        reply_oom(srv, c, rq);
        return;
    }
    kvf__srv_reply_empty(srv, c, rq);
}

static void op_add(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                   kvf_rd_t *rd)
{
    const uint8_t *key = NULL;
    uint32_t klen = 0;
    uint64_t udelta = 0;
    int64_t cur = 0, delta, sum;
    char text[24];

    rd_blob32(rd, &key, &klen);
    kvf__rd_u64(rd, &udelta);
    if (!decode_done(srv, c, rq, rd) || !check_key(srv, c, rq, klen))
        return;
    memcpy(&delta, &udelta, sizeof(delta)); /* two's complement on the wire and in the host */
    struct srv_entry *e = kvf__srv_kv_find(srv, key, klen);
    if (e && !parse_i64(e->val, e->vlen, &cur)) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BAD_VALUE,
                           "value of %" PRIu32 " bytes is not a decimal int64", e->vlen);
        return;
    }
    if (__builtin_add_overflow(cur, delta, &sum)) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_OUT_OF_RANGE,
                           "%" PRId64 " + %" PRId64 " overflows int64", cur, delta);
        return;
    }
    int n = snprintf(text, sizeof(text), "%" PRId64, sum);
    /* ADD has no lease field: an existing key keeps its lease, a new one has none. */
    if (kvf__srv_kv_put(srv, key, klen, (const uint8_t *)text, (uint32_t)n, false, NULL) < 0) {
        reply_oom(srv, c, rq);
        return;
    }
    kvf__srv_reply_u64(srv, c, rq, (uint64_t)sum);
}

/* LIST walks the whole tree (twalk_r cannot start at the prefix); it is the one op allowed to
 * be O(n). A first pass sizes the answer so that an oversized one is refused before any byte of
 * it is written. */
struct list_walk {
    const uint8_t *prefix;
    uint32_t plen;
    size_t count;
    size_t bytes;   /* body bytes of the answer */
    kvf_buf_t *out; /* NULL in the sizing pass */
};

static void list_visit(const void *nodep, VISIT which, void *closure)
{
    if (which != postorder && which != leaf)
        return;
    const struct srv_entry *e = *(const struct srv_entry *const *)nodep;
    struct list_walk *lw = closure;
    if (lw->plen > e->k.klen || (lw->plen && memcmp(e->key, lw->prefix, lw->plen) != 0))
        return;
    if (lw->out) {
        kvf__buf_put_blob(lw->out, e->key, e->k.klen);
        kvf__buf_put_blob(lw->out, e->val, e->vlen);
    } else if (lw->count <= KVF_STORE_MAX_LIST_KEYS && lw->bytes <= KVF_STORE_MAX_FRAME_LEN) {
        lw->bytes += 8u + e->k.klen + e->vlen;
    }
    lw->count++;
}

static void op_list(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                    kvf_rd_t *rd)
{
    struct list_walk lw = {0};

    rd_blob32(rd, &lw.prefix, &lw.plen);
    if (!decode_done(srv, c, rq, rd) || !check_prefix(srv, c, rq, lw.plen))
        return;
    lw.bytes = 4;
    twalk_r(srv->kv_root, list_visit, &lw);
    if (lw.count > KVF_STORE_MAX_LIST_KEYS) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_TOO_BIG, "%zu keys match, more than %u",
                           lw.count, KVF_STORE_MAX_LIST_KEYS);
        return;
    }
    if (lw.bytes > KVF_STORE_MAX_FRAME_LEN) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_TOO_BIG, "answer of %zu bytes exceeds %u",
                           lw.bytes, KVF_STORE_MAX_FRAME_LEN);
        return;
    }
    size_t off = kvf__srv_frame_begin(c, rq->op, KVF_STORE_ST_OK, rq->req_id);
    kvf__buf_put_u32(&c->out, (uint32_t)lw.count);
    lw.count = 0;
    lw.out = &c->out;
    twalk_r(srv->kv_root, list_visit, &lw);
    kvf__srv_frame_end(srv, c, off);
}

static void op_watch(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                     kvf_rd_t *rd)
{
    const uint8_t *prefix = NULL;
    uint32_t plen = 0;

    rd_blob32(rd, &prefix, &plen);
    if (!decode_done(srv, c, rq, rd) || !check_prefix(srv, c, rq, plen))
        return;
    if (c->nwatches >= KVF_STORE_MAX_WATCHES_PER_CLIENT) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BUSY,
                           "%u watches already active on this connection",
                           KVF_STORE_MAX_WATCHES_PER_CLIENT);
        return;
    }
    struct srv_watch *w = malloc(sizeof(*w) + plen);
    if (!w) {
        reply_oom(srv, c, rq);
        return;
    }
    w->id = ++c->last_watch_id;
    w->conn = c;
    w->plen = plen;
    if (plen)
        memcpy(w->prefix, prefix, plen);
    link_add_tail(&srv->watches, &w->all_link);
    link_add_tail(&c->watches, &w->conn_link);
    c->nwatches++;
    kvf__srv_reply_u64(srv, c, rq, w->id);
}

static void op_unwatch(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                       kvf_rd_t *rd)
{
    uint64_t id = 0;

    kvf__rd_u64(rd, &id);
    if (!decode_done(srv, c, rq, rd))
        return;
    for (struct srv_link *l = c->watches.next; l != &c->watches; l = l->next) {
        struct srv_watch *w = SRV_CONTAINER(l, struct srv_watch, conn_link);
        if (w->id == id) {
            kvf__srv_watch_free(w);
            kvf__srv_reply_empty(srv, c, rq);
            return;
        }
    }
    kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_NOT_FOUND, "watch %" PRIu64 " not found", id);
}

static void op_lease_grant(struct kvf_store_server *srv, struct srv_conn *c,
                           const struct srv_req *rq, kvf_rd_t *rd)
{
    uint32_t ttl_ms = 0;

    kvf__rd_u32(rd, &ttl_ms);
    if (!decode_done(srv, c, rq, rd))
        return;
    if (ttl_ms < 1 || ttl_ms > KVF_STORE_MAX_LEASE_TTL_MS) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BAD_REQUEST,
                           "lease ttl %" PRIu32 " ms is not in 1..%u", ttl_ms,
                           KVF_STORE_MAX_LEASE_TTL_MS);
        return;
    }
    struct srv_lease *lease = malloc(sizeof(*lease));
    if (!lease)
        goto out_oom;
    /* Ids count up from a random base: unique for this server's lifetime, and unlikely to equal
     * an id a client still holds from a previous server on the same port. */
    do
        lease->id = srv->next_lease_id++;
    while (lease->id == 0);
    lease->ttl_ms = ttl_ms;
    link_init(&lease->keys);
    timer_init(&lease->timer, SRV_TIMER_LEASE);
    if (kvf__srv_timer_arm(srv, &lease->timer, srv->now_ms + ttl_ms) < 0)
        goto out_free_lease;
    if (!tsearch(lease, &srv->lease_root, kvf__srv_lease_cmp))
        goto out_disarm;
    kvf__srv_reply_u64(srv, c, rq, lease->id);
    return;

out_disarm:
    kvf__srv_timer_disarm(srv, &lease->timer);
out_free_lease:
    free(lease);
out_oom:
    reply_oom(srv, c, rq);
}

static void op_lease_keepalive(struct kvf_store_server *srv, struct srv_conn *c,
                               const struct srv_req *rq, kvf_rd_t *rd)
{
    uint64_t id = 0;

    kvf__rd_u64(rd, &id);
    if (!decode_done(srv, c, rq, rd))
        return;
    struct srv_lease *lease = kvf__srv_lease_find(srv, id);
    if (!lease) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_LEASE_NOT_FOUND, "lease %" PRIu64 " not found",
                           id);
        return;
    }
    /* Moving an armed timer cannot fail. */
    kvf__srv_timer_arm(srv, &lease->timer, srv->now_ms + lease->ttl_ms);
    kvf__srv_reply_empty(srv, c, rq);
}

static void op_lease_revoke(struct kvf_store_server *srv, struct srv_conn *c,
                            const struct srv_req *rq, kvf_rd_t *rd)
{
    uint64_t id = 0;

    kvf__rd_u64(rd, &id);
    if (!decode_done(srv, c, rq, rd))
        return;
    struct srv_lease *lease = kvf__srv_lease_find(srv, id);
    if (!lease) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_LEASE_NOT_FOUND, "lease %" PRIu64 " not found",
                           id);
        return;
    }
    kvf__srv_lease_end(srv, lease);
    kvf__srv_reply_empty(srv, c, rq);
}

const srv_op_fn kvf__srv_ops[] = {
    [KVF_STORE_OP_PING] = op_ping,
    [KVF_STORE_OP_SET] = op_set,
    [KVF_STORE_OP_GET] = op_get,
    [KVF_STORE_OP_DEL] = op_del,
    [KVF_STORE_OP_CAS] = op_cas,
    [KVF_STORE_OP_ADD] = op_add,
    [KVF_STORE_OP_LIST] = op_list,
    [KVF_STORE_OP_WATCH] = op_watch,
    [KVF_STORE_OP_UNWATCH] = op_unwatch,
    [KVF_STORE_OP_LEASE_GRANT] = op_lease_grant,
    [KVF_STORE_OP_LEASE_KEEPALIVE] = op_lease_keepalive,
    [KVF_STORE_OP_LEASE_REVOKE] = op_lease_revoke,
};

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
        kvf__srv_watch_free(SRV_CONTAINER(c->watches.next, struct srv_watch, conn_link));
    kvf__srv_timer_disarm(srv, &c->partial);
    if (c->dirty) {
        link_del(&c->dirty_link);
        c->dirty = false;
    }
    epoll_ctl(srv->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->dead = true;
    link_del(&c->link);
    link_add_tail(&srv->zombies, &c->link);
    srv->nconns--;
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
    KVF_WARN(SRV_LOG, "closing connection from %s: %s", c->peer, reason);
    kvf__srv_conn_kill(srv, c);
}

void kvf__srv_zombies_free(struct kvf_store_server *srv)
{
    while (!link_empty(&srv->zombies)) {
        struct srv_conn *c = SRV_CONTAINER(srv->zombies.next, struct srv_conn, link);
        link_del(&c->link);
        free(c->in);
        kvf__buf_free(&c->out);
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

static void conn_flush(struct kvf_store_server *srv, struct srv_conn *c)
{
    while (c->out_off < c->out.len) {
        ssize_t n = send(c->fd, c->out.data + c->out_off, c->out.len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_off += (size_t)n;
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
    if (c->out_off == c->out.len) {
        c->out.len = 0;
        c->out_off = 0;
        if (c->out.cap > SRV_OUT_KEEP)
            kvf__buf_free(&c->out);
    } else if (c->out_off >= SRV_IN_KEEP && c->out_off >= c->out.len / 2) {
        /* Reclaim the sent part once it is at least half the buffer: amortised O(1) per byte. */
        kvf__buf_consume(&c->out, c->out_off);
        c->out_off = 0;
    }
    /* Resume the requests held by the output pause. A safe point: we are flushing @c. Their
     * answers mark @c dirty again, so the flush pass of this iteration sends them. */
    if (c->held && !conn_paused(c) && !srv->stopping) {
        c->held = false;
        conn_parse(srv, c);
        if (c->dead)
            return;
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
        if (c->out.oom) {
            kvf__srv_conn_close_warn(srv, c, "out of memory for its output");
            continue;
        }
        if (c->overflow) {
            kvf__srv_conn_close_warn(srv, c,
                                     "unread output (%zu bytes) plus a watch event or wait answer "
                                     "would exceed %u",
                                     conn_pending_out(c), KVF_STORE_MAX_OUTPUT_BYTES);
            continue;
        }
        if (conn_pending_out(c) > KVF_STORE_MAX_OUTPUT_BYTES) {
            kvf__srv_conn_close_warn(srv, c, "%zu bytes of unread output exceed %u",
                                     conn_pending_out(c), KVF_STORE_MAX_OUTPUT_BYTES);
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
    else if (body_len > KVF_STORE_MAX_FRAME_LEN)
        snprintf(why, whylen, "body of %" PRIu32 " bytes exceeds %u", body_len,
                 KVF_STORE_MAX_FRAME_LEN);
    else
        return NULL;
    return why;
}

static void conn_dispatch(struct kvf_store_server *srv, struct srv_conn *c, const uint8_t *h)
{
    struct srv_req rq = {.op = h[5], .req_id = kvf__get_le32(h + 8)};
    kvf_rd_t rd;
    kvf__rd_init(&rd, h + KVF_STORE_HDR_LEN, kvf__get_le32(h + 12));
    kvf__srv_ops[rq.op](srv, c, &rq, &rd);
}

/* Run the complete frames in @c's input, then size the buffer for what is left. Stops early,
 * setting c->held, while @c's unsent output is above SRV_OUT_PAUSE_READ; conn_flush() resumes. */
static void conn_parse(struct kvf_store_server *srv, struct srv_conn *c)
{
    size_t pos = 0;
    bool completed = false;
    char why[128];

    c->held = false;
    while (c->in_len - pos >= KVF_STORE_HDR_LEN) {
        if (conn_paused(c)) {
            c->held = true;
            break;
        }
        const uint8_t *h = c->in + pos;
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

    /* The header of a partial frame is validated above, so its length can be trusted now. */
    size_t need = SRV_IN_MIN;
    if (c->in_len >= KVF_STORE_HDR_LEN && KVF_STORE_HDR_LEN + kvf__get_le32(c->in + 12) > need)
        need = KVF_STORE_HDR_LEN + (size_t)kvf__get_le32(c->in + 12);
    if (c->in_cap < need || (c->in_cap > SRV_IN_KEEP && c->in_cap > need)) {
        uint8_t *p = realloc(c->in, need);
        if (p) {
            c->in = p;
            c->in_cap = need;
        } else if (c->in_cap < need) {
            kvf__srv_conn_close_warn(srv, c, "out of memory for a frame of %zu bytes", need);
        }
    }
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
        size_t room = c->in_cap - c->in_len;
        if (room == 0)
            break;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT);
        if (n > 0) {
            c->in_len += (size_t)n;
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
                KVF_INFO(SRV_LOG, "%s closed the connection in the middle of a frame", c->peer);
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
}

void kvf__srv_conn_on_events(struct kvf_store_server *srv, struct srv_conn *c, uint32_t events)
{
    if (c->dead)
        return;
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

static void conn_new(struct kvf_store_server *srv, int fd, const struct sockaddr_storage *ss)
{
    int one = 1;
    /* Requests and answers are small and latency-bound. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    struct srv_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        KVF_WARN(SRV_LOG, "refusing a connection: out of memory");
        close(fd);
        return;
    }
    c->fd = fd;
    kvf__srv_sockaddr_format(ss, c->peer, sizeof(c->peer));
    kvf__buf_init(&c->out);
    timer_init(&c->partial, SRV_TIMER_PARTIAL);
    link_init(&c->waiters);
    link_init(&c->watches);
    link_init(&c->dirty_link);
    c->events = EPOLLIN;
    struct epoll_event ev = {.events = c->events, .data.ptr = c};
    if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        KVF_WARN(SRV_LOG, "refusing connection from %s: epoll_ctl: %s", c->peer, strerror(errno));
        close(fd);
        free(c);
        return;
    }
    link_add_tail(&srv->conns, &c->link);
    srv->nconns++;
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
                KVF_WARN(SRV_LOG, "accept: %s; not accepting for %u ms", strerror(errno),
                         SRV_ACCEPT_PAUSE_MS);
                kvf__srv_accept_pause(srv, true);
                return;
            }
            /* EINTR, ECONNABORTED and the network errors Linux passes on from a dead pending
             * connection concern that one connection only. */
            continue;
        }
        if (srv->nconns >= KVF_STORE_MAX_CLIENTS) {
            /* One warning per second at most: a flood of refusals must not flood the log. */
            srv->refused_since_log++;
            if (srv->now_ms >= srv->refused_log_ms + 1000) {
                char peer[KVF_SESSION_ID_MAX];
                kvf__srv_sockaddr_format(&ss, peer, sizeof(peer));
                KVF_WARN(SRV_LOG, "refusing connection from %s: %u clients connected (%u refused)",
                         peer, KVF_STORE_MAX_CLIENTS, srv->refused_since_log);
                srv->refused_log_ms = srv->now_ms;
                srv->refused_since_log = 0;
            }
            close(fd);
            continue;
        }
        conn_new(srv, fd, &ss);
    }
}

/* ---- the loop -------------------------------------------------------------------------------- */

static void timers_run(struct kvf_store_server *srv)
{
    while (srv->heap_len && srv->heap[0]->deadline_ms <= srv->now_ms) {
        struct srv_timer *t = srv->heap[0];
        kvf__srv_timer_disarm(srv, t);
        switch (t->kind) {
        case SRV_TIMER_WAITER: {
            struct srv_waiter *w = SRV_CONTAINER(t, struct srv_waiter, timer);
            kvf__srv_reply_err_to(srv, w->conn, KVF_STORE_OP_GET, w->req_id, KVF_STORE_ST_TIMEOUT,
                                  "key still absent after the wait");
            kvf__srv_waiter_free(srv, w, true);
            break;
        }
        case SRV_TIMER_LEASE: {
            struct srv_lease *lease = SRV_CONTAINER(t, struct srv_lease, timer);
            KVF_DEBUG(SRV_LOG, "lease %" PRIu64 " expired", lease->id);
            kvf__srv_lease_end(srv, lease);
            break;
        }
        case SRV_TIMER_PARTIAL: {
            struct srv_conn *c = SRV_CONTAINER(t, struct srv_conn, partial);
            kvf__srv_conn_close_warn(
                srv, c, "partial frame (%zu bytes) not completed within %" PRIu64 " ms", c->in_len,
                srv->partial_timeout_ms);
            break;
        }
        }
    }
    if (srv->accept_paused && srv->accept_resume_ms <= srv->now_ms)
        kvf__srv_accept_pause(srv, false);
}

/* epoll_wait() timeout: until the nearest deadline, or forever. */
static int loop_timeout(struct kvf_store_server *srv)
{
    uint64_t next = UINT64_MAX;
    if (srv->heap_len)
        next = srv->heap[0]->deadline_ms;
    if (srv->accept_paused && srv->accept_resume_ms < next)
        next = srv->accept_resume_ms;
    if (next == UINT64_MAX)
        return -1;
    uint64_t now = kvf__now_ms();
    if (next <= now)
        return 0;
    return next - now > INT32_MAX ? INT32_MAX : (int)(next - now);
}

/* Shutdown: answer pending get-with-wait requests with SHUTTING_DOWN, push out what the sockets
 * take without blocking, then close every connection. */
static void conns_close_all(struct kvf_store_server *srv)
{
    srv->stopping = true;
    for (struct srv_link *l = srv->conns.next; l != &srv->conns; l = l->next) {
        struct srv_conn *c = SRV_CONTAINER(l, struct srv_conn, link);
        while (!link_empty(&c->waiters)) {
            struct srv_waiter *w = SRV_CONTAINER(c->waiters.next, struct srv_waiter, conn_link);
            kvf__srv_reply_err_to(srv, c, KVF_STORE_OP_GET, w->req_id, KVF_STORE_ST_SHUTTING_DOWN,
                                  "store server is shutting down");
            kvf__srv_waiter_free(srv, w, true);
        }
    }
    kvf__srv_dirty_flush(srv);
    while (!link_empty(&srv->conns))
        kvf__srv_conn_kill(srv, SRV_CONTAINER(srv->conns.next, struct srv_conn, link));
    kvf__srv_zombies_free(srv);
}

static void *loop_main(void *arg)
{
    struct kvf_store_server *srv = arg;
    struct epoll_event evs[SRV_EPOLL_EVENTS];
    bool stop = false;
    int rc = 0;

    while (!stop) {
        int n = epoll_wait(srv->epfd, evs, SRV_EPOLL_EVENTS, loop_timeout(srv));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            KVF_ERROR(SRV_LOG, "%s: epoll_wait: %s; stopping", srv->url, strerror(errno));
            break;
        }
        srv->now_ms = kvf__now_ms();
        for (int i = 0; i < n; i++) {
            void *tag = evs[i].data.ptr;
            if (tag == &srv->listen_fd)
                kvf__srv_accept_all(srv);
            else if (tag == &srv->evfd)
                stop = true;
            else
                kvf__srv_conn_on_events(srv, tag, evs[i].events);
        }
        timers_run(srv);
        kvf__srv_dirty_flush(srv);
        kvf__srv_zombies_free(srv);
    }
    conns_close_all(srv);
    KVF_INFO(SRV_LOG, "%s stopped", srv->url);

    pthread_mutex_lock(&srv->mu);
    srv->done = true;
    srv->loop_rc = rc;
    pthread_cond_broadcast(&srv->cond);
    pthread_mutex_unlock(&srv->mu);
    return NULL;
}

/* ---- start and stop -------------------------------------------------------------------------- */

static uint64_t partial_timeout_from_env(void)
{
    const char *s = getenv(SRV_PARTIAL_TIMEOUT_ENV);
    if (!s || !*s)
        return KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || s[0] < '0' || s[0] > '9' || v < 1 || v > SRV_PARTIAL_TIMEOUT_MAX_MS) {
        KVF_WARN(SRV_LOG, "ignoring %s: not a number of ms in 1..%u; using %u",
                 SRV_PARTIAL_TIMEOUT_ENV, SRV_PARTIAL_TIMEOUT_MAX_MS,
                 KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS);
        return KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS;
    }
    return v;
}

static uint64_t random_u64(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) == (ssize_t)sizeof(v))
        return v;
    /* No entropy yet (early boot): the clock still differs from a previous run. */
    uint64_t pid = (uint64_t)(unsigned)getpid();
    return (kvf__now_ns() * UINT64_C(0x9E3779B97F4A7C15)) ^ pid;
}

/* Bind and listen on @hp. Returns the listening fd or -errno (last-error set). */
static int listen_on(const char *url, const kvf_hostport_t *hp)
{
    const char *why;
    int fd = kvf__tcp_listen(hp, &why);
    if (fd < 0)
        return kvf__err(fd, "store listen %s: %s", url, why);
    return fd;
}

static int url_from_socket(struct kvf_store_server *srv, const char *url)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char hp[KVF_SESSION_ID_MAX];

    if (getsockname(srv->listen_fd, (struct sockaddr *)&ss, &sl) < 0)
        return kvf__err(-errno, "store listen %s: getsockname: %s", url, strerror(errno));
    kvf__srv_sockaddr_format(&ss, hp, sizeof(hp));
    snprintf(srv->url, sizeof(srv->url), "tcp://%s", hp);
    return 0;
}

static int epoll_add(int epfd, int fd, void *tag)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = tag};
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int kvf_store_server_start(const char *listen_url, kvf_store_server_t **out)
{
    kvf_store_url_t u;
    struct kvf_store_server *srv;
    int rc;

    if (!out)
        return kvf__err(-KVF_EINVAL, "store listen: no output handle");
    *out = NULL;
    if (!listen_url)
        return kvf__err(-KVF_EINVAL, "store listen: URL is NULL");
    rc = kvf__store_url_parse(listen_url, 1, &u);
    if (rc < 0)
        return rc;
    if (u.scheme != KVF_STORE_SCHEME_TCP)
        return kvf__err(-KVF_EINVAL, "store listen %s: the built-in store serves tcp:// URLs only",
                        listen_url);

    srv = calloc(1, sizeof(*srv));
    if (!srv)
        return kvf__err(-KVF_ENOMEM, "store listen %s: out of memory", listen_url);
    srv->epfd = -1;
    srv->evfd = -1;
    link_init(&srv->conns);
    link_init(&srv->zombies);
    link_init(&srv->dirty);
    link_init(&srv->watches);
    srv->partial_timeout_ms = partial_timeout_from_env();
    srv->next_lease_id = random_u64();
    srv->now_ms = kvf__now_ms();

    rc = listen_on(listen_url, &u.hosts[0]);
    if (rc < 0)
        goto out_free;
    srv->listen_fd = rc;
    rc = url_from_socket(srv, listen_url);
    if (rc < 0)
        goto out_close_listen;

    srv->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (srv->epfd < 0) {
        rc = kvf__err(-errno, "store listen %s: epoll_create1: %s", listen_url, strerror(errno));
        goto out_close_listen;
    }
    srv->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (srv->evfd < 0) {
        rc = kvf__err(-errno, "store listen %s: eventfd: %s", listen_url, strerror(errno));
        goto out_close_epoll;
    }
    rc = epoll_add(srv->epfd, srv->listen_fd, &srv->listen_fd);
    if (rc == 0)
        rc = epoll_add(srv->epfd, srv->evfd, &srv->evfd);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: epoll_ctl: %s", listen_url, strerror(-rc));
        goto out_close_eventfd;
    }

    rc = -pthread_mutex_init(&srv->mu, NULL);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: pthread_mutex_init: %s", listen_url, strerror(-rc));
        goto out_close_eventfd;
    }
    rc = -pthread_cond_init(&srv->cond, NULL);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: pthread_cond_init: %s", listen_url, strerror(-rc));
        goto out_destroy_mutex;
    }

    /* The loop thread blocks every signal, so that SIGINT/SIGTERM reach the application's
     * handler (which may call kvf_store_server_shutdown()) on its own threads. */
    rc = kvf__thread_start(&srv->thread, "kvf-store-srv", 0, loop_main, srv);
    if (rc < 0) {
        rc = kvf__err(rc, "store listen %s: pthread_create: %s", listen_url, strerror(-rc));
        goto out_destroy_cond;
    }

    KVF_INFO(SRV_LOG, "listening on %s", srv->url);
    *out = srv;
    return 0;

out_destroy_cond:
    pthread_cond_destroy(&srv->cond);
out_destroy_mutex:
    pthread_mutex_destroy(&srv->mu);
out_close_eventfd:
    close(srv->evfd);
out_close_epoll:
    close(srv->epfd);
out_close_listen:
    close(srv->listen_fd);
out_free:
    free(srv);
    return rc;
}

const char *kvf_store_server_url(const kvf_store_server_t *srv)
{
    return srv ? srv->url : "";
}

void kvf_store_server_shutdown(kvf_store_server_t *srv)
{
    if (!srv)
        return;
    /* Only write(2) here: this runs in signal handlers. errno is restored for the interrupted
     * code. */
    int saved = errno;
    uint64_t one = 1;
    ssize_t n = write(srv->evfd, &one, sizeof(one));
    (void)n;
    errno = saved;
}

int kvf_store_server_wait(kvf_store_server_t *srv)
{
    if (!srv)
        return kvf__err(-KVF_EINVAL, "store server is NULL");
    pthread_mutex_lock(&srv->mu);
    while (!srv->done)
        pthread_cond_wait(&srv->cond, &srv->mu);
    int rc = srv->loop_rc;
    pthread_mutex_unlock(&srv->mu);
    return rc;
}

void kvf_store_server_stop(kvf_store_server_t *srv)
{
    if (!srv)
        return;
    kvf_store_server_shutdown(srv);
    pthread_join(srv->thread, NULL);

    /* The loop closed every connection (and with them every waiter and watch) before exiting;
     * what is left is the data. */
    tdestroy(srv->kv_root, kvf__srv_entry_free);
    tdestroy(srv->lease_root, kvf__srv_lease_free);
    tdestroy(srv->waitkey_root, free); /* empty: waiters went with their connections */
    free(srv->heap);
    close(srv->evfd);
    close(srv->epfd);
    close(srv->listen_fd);
    pthread_cond_destroy(&srv->cond);
    pthread_mutex_destroy(&srv->mu);
    free(srv);
}

unsigned kvf__store_server_waiters(const kvf_store_server_t *srv)
{
    return srv ? atomic_load(&srv->nwaiters) : 0u;
}
