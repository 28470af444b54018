/*
 * The op handlers of the store server, one per opcode: each decodes its request body, checks it
 * against the limits, acts on the data (server_kv.c) and answers (server_reply.c). A body that
 * does not decode gets BAD_REQUEST; the connection stays.
 */
#include <errno.h>
#include <inttypes.h>
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "store/server.h"

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

/*
 * Store ownership (with a key; docs/security.md): a lease, and every key bound to it, belongs to
 * the identity that granted it. Only that identity, or one that proved the admin key, may use
 * the lease, keep it alive, revoke it, or change or delete its keys. Without a key there are no
 * identities and nothing is checked.
 */
static bool may_use_lease(const struct srv_conn *c, const struct srv_lease *lease)
{
    return !lease || !lease->holder || c->admin || (c->ident && !strcmp(c->ident, lease->holder));
}

/* Whether @c may change @e (NULL: absent, anyone may create it); answers FORBIDDEN when not. */
static bool may_change(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                       const struct srv_entry *e)
{
    if (!e || may_use_lease(c, e->lease))
        return true;
    KVF_LOG_RATELIMITED(KVF_LOG_INFO, SRV_LOG, "%s: %s refused: key bound to another client's lease",
                        c->peer, kvf__srv_op_name(rq->op));
    kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_FORBIDDEN,
                       "the key is bound to another client's lease: only that client or an "
                       "operator with the admin key may change or delete it");
    return false;
}

/*
 * The session a key belongs to (with a key; docs/security.md): an engine's records are
 * "<prefix><ns>/sessions/<sid>" and "<prefix><ns>/regions/<sid>" (core/records.c), whatever the
 * prefix and namespace, so a key whose next-to-last segment is "sessions" or "regions" and whose
 * last segment is a session id is that session's. Points *@sid at that segment, of *@n bytes.
 */
static bool key_session(const uint8_t *key, uint32_t klen, const char **sid, size_t *n)
{
    uint32_t last = klen;
    while (last > 0 && key[last - 1] != '/')
        last--;
    if (last == 0 || last == klen || klen - last >= KVF_SESSION_ID_MAX)
        return false;
    uint32_t kind = last - 1;
    while (kind > 0 && key[kind - 1] != '/')
        kind--;
    size_t kl = last - 1 - kind;
    if (!(kl == 8 && !memcmp(key + kind, "sessions", 8)) &&
        !(kl == 7 && !memcmp(key + kind, "regions", 7)))
        return false;
    char text[KVF_SESSION_ID_MAX];
    kvf_hostport_t hp;
    memcpy(text, key + last, klen - last);
    text[klen - last] = '\0';
    if (memchr(text, '\0', klen - last) || kvf__session_id_parse(text, &hp) < 0)
        return false;
    *sid = (const char *)key + last;
    *n = klen - last;
    return true;
}

/* Whether @c may change the key @key: a session's key only by the client that proved that
 * session (KVF_AUTH_SESSION_ID + sid) or an admin. Answers FORBIDDEN when not. */
static bool may_write_key(struct kvf_store_server *srv, struct srv_conn *c,
                          const struct srv_req *rq, const uint8_t *key, uint32_t klen)
{
    const char *sid;
    size_t n;
    const size_t pl = strlen(KVF_AUTH_SESSION_ID);
    if (!c->ident || c->admin || !key_session(key, klen, &sid, &n))
        return true;
    if (strlen(c->ident) == pl + n && !strncmp(c->ident, KVF_AUTH_SESSION_ID, pl) &&
        !memcmp(c->ident + pl, sid, n))
        return true;
    KVF_LOG_RATELIMITED(KVF_LOG_INFO, SRV_LOG, "%s (%s): %s refused: a key of session %.*s",
                        c->peer, c->ident, kvf__srv_op_name(rq->op), (int)n, sid);
    kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_FORBIDDEN,
                       "the key belongs to session %.*s: only that engine or an operator with "
                       "the admin key may change or delete it",
                       (int)n, sid);
    return false;
}

/* Resolve the lease field of SET/CAS. Returns false after answering LEASE_NOT_FOUND (or
 * FORBIDDEN for another client's lease). */
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
    if (!may_use_lease(c, *out)) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_FORBIDDEN,
                           "lease %" PRIu64 " belongs to another client", id);
        return false;
    }
    return true;
}

static void reply_oom(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq)
{
    KVF_WARN_RATELIMITED(SRV_LOG, "%s: %s: out of memory", c->peer, kvf__srv_op_name(rq->op));
    kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BUSY, "store server out of memory");
}

/* A quota refused the request: answer BUSY with the quota's name and value (and log it, at info
 * level and rate-limited, so that an operator sees who runs into what). */
static void reply_quota(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                        const char *why)
{
    KVF_LOG_RATELIMITED(KVF_LOG_INFO, SRV_LOG, "%s: %s refused: %s", c->peer,
                        kvf__srv_op_name(rq->op), why);
    kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BUSY, "%s", why);
}

/* kvf__srv_kv_put() for request @rq of @c; answers a failure. Returns true when it was stored. */
static bool put_for(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                    const uint8_t *key, uint32_t klen, const uint8_t *val, uint32_t vlen,
                    bool set_lease, struct srv_lease *lease)
{
    char why[SRV_ERRMSG_MAX];
    int rc =
        kvf__srv_kv_put(srv, c->client, key, klen, val, vlen, set_lease, lease, why, sizeof(why));
    if (rc == -EDQUOT)
        reply_quota(srv, c, rq, why);
    else if (rc < 0)
        reply_oom(srv, c, rq);
    return rc == 0;
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
        !check_value(srv, c, rq, vlen) || !may_write_key(srv, c, rq, key, klen) ||
        !resolve_lease(srv, c, rq, lease_id, &lease) ||
        !may_change(srv, c, rq, kvf__srv_kv_find(srv, key, klen)))
        return;
    if (put_for(srv, c, rq, key, klen, val, vlen, true, lease))
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
    if (!decode_done(srv, c, rq, rd) || !check_key(srv, c, rq, klen) ||
        !may_write_key(srv, c, rq, key, klen))
        return;
    struct srv_entry *e = kvf__srv_kv_find(srv, key, klen);
    if (!e) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_NOT_FOUND, "key not found");
        return;
    }
    if (!may_change(srv, c, rq, e))
        return;
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
    if (!check_value(srv, c, rq, vlen) || !may_write_key(srv, c, rq, key, klen) ||
        !resolve_lease(srv, c, rq, lease_id, &lease))
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
    if (!may_change(srv, c, rq, e))
        return;
    if (put_for(srv, c, rq, key, klen, val, vlen, true, lease))
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
    if (!decode_done(srv, c, rq, rd) || !check_key(srv, c, rq, klen) ||
        !may_write_key(srv, c, rq, key, klen))
        return;
    memcpy(&delta, &udelta, sizeof(delta)); /* two's complement on the wire and in the host */
    struct srv_entry *e = kvf__srv_kv_find(srv, key, klen);
    if (!may_change(srv, c, rq, e))
        return;
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
    if (put_for(srv, c, rq, key, klen, (const uint8_t *)text, (uint32_t)n, false, NULL))
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

/* LIST_PAGE: one walk (twalk_r cannot start at a key either), writing the pairs after @after
 * straight into the answer until the page is full; the rest of the walk only notes that more
 * keys match. */
struct page_walk {
    const uint8_t *prefix, *after;
    uint32_t plen, alen;
    uint32_t max, count;
    bool keys_only, more;
    size_t bytes;
    kvf_buf_t *out;
};

static void page_visit(const void *nodep, VISIT which, void *closure)
{
    if (which != postorder && which != leaf)
        return;
    const struct srv_entry *e = *(const struct srv_entry *const *)nodep;
    struct page_walk *pw = closure;
    if (pw->more)
        return;
    if (pw->plen > e->k.klen || (pw->plen && memcmp(e->key, pw->prefix, pw->plen) != 0))
        return;
    if (pw->alen) {
        uint32_t n = pw->alen < e->k.klen ? pw->alen : e->k.klen;
        int cmp = memcmp(e->key, pw->after, n);
        if (cmp < 0 || (cmp == 0 && e->k.klen <= pw->alen))
            return;
    }
    uint32_t vlen = pw->keys_only ? 0 : e->vlen;
    if (pw->count == pw->max ||
        (pw->count && pw->bytes + e->k.klen + vlen > KVF_STORE_LIST_PAGE_BYTES)) {
        pw->more = true;
        return;
    }
    kvf__buf_put_blob(pw->out, e->key, e->k.klen);
    kvf__buf_put_blob(pw->out, e->val, vlen);
    pw->bytes += 8u + e->k.klen + vlen;
    pw->count++;
}

static void op_list_page(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                         kvf_rd_t *rd)
{
    struct page_walk pw = {0};
    uint8_t flags = 0;

    rd_blob32(rd, &pw.prefix, &pw.plen);
    rd_blob32(rd, &pw.after, &pw.alen);
    kvf__rd_u32(rd, &pw.max);
    kvf__rd_u8(rd, &flags);
    if (!decode_done(srv, c, rq, rd) || !check_prefix(srv, c, rq, pw.plen))
        return;
    if (pw.alen > KVF_STORE_MAX_KEY_LEN) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_TOO_BIG,
                           "after-key of %" PRIu32 " bytes exceeds %u", pw.alen,
                           KVF_STORE_MAX_KEY_LEN);
        return;
    }
    if (flags & ~1u) {
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_BAD_REQUEST, "unknown list flags 0x%x",
                           (unsigned)flags);
        return;
    }
    if (pw.max == 0 || pw.max > KVF_STORE_LIST_PAGE_MAX)
        pw.max = KVF_STORE_LIST_PAGE_MAX;
    pw.keys_only = flags & 1u;
    size_t off = kvf__srv_frame_begin(c, rq->op, KVF_STORE_ST_OK, rq->req_id);
    size_t more_at = c->out.len;
    kvf__buf_put_u8(&c->out, 0);
    kvf__buf_put_u32(&c->out, 0);
    pw.out = &c->out;
    twalk_r(srv->kv_root, page_visit, &pw);
    if (!c->out.oom) {
        c->out.data[more_at] = pw.more ? 1 : 0;
        kvf__put_le32(c->out.data + more_at + 1, pw.count);
    }
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
    char why[SRV_ERRMSG_MAX];
    if (!kvf__srv_quota_watch(srv, c->client, why, sizeof(why))) {
        reply_quota(srv, c, rq, why);
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
    c->client->watches++;
    srv->nwatches++;
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
            kvf__srv_watch_free(srv, w);
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
    char why[SRV_ERRMSG_MAX];
    if (!kvf__srv_quota_lease(srv, c->client, why, sizeof(why))) {
        reply_quota(srv, c, rq, why);
        return;
    }
    struct srv_lease *lease = malloc(sizeof(*lease));
    if (!lease)
        goto out_oom;
    /* Random ids: one client cannot guess another's lease from its own (and an id is unlikely
     * to equal one a client still holds from a previous server on the same port). The counter,
     * from a random base, only backs up a random source that failed or a collision. */
    do {
        if (getrandom(&lease->id, sizeof(lease->id), GRND_NONBLOCK) != (ssize_t)sizeof(lease->id))
            lease->id = srv->next_lease_id++;
    } while (lease->id == 0 || kvf__srv_lease_find(srv, lease->id));
    lease->holder = NULL;
    if (c->ident && !(lease->holder = strdup(c->ident)))
        goto out_free_lease;
    lease->ttl_ms = ttl_ms;
    link_init(&lease->keys);
    timer_init(&lease->timer, SRV_TIMER_LEASE);
    if (kvf__srv_timer_arm(srv, &lease->timer, srv->now_ms + ttl_ms) < 0)
        goto out_free_lease;
    if (!tsearch(lease, &srv->lease_root, kvf__srv_lease_cmp))
        goto out_disarm;
    lease->owner = c->client;
    c->client->leases++;
    srv->nleases++;
    SRV_STAT_ADD(srv, leases, 1);
    kvf__srv_reply_u64(srv, c, rq, lease->id);
    return;

out_disarm:
    kvf__srv_timer_disarm(srv, &lease->timer);
out_free_lease:
    free(lease->holder);
    free(lease);
out_oom:
    reply_oom(srv, c, rq);
}

/* Decode a request whose body is one lease id and find that lease; NULL once a malformed body
 * or an unknown lease has been answered. */
static struct srv_lease *decode_lease(struct kvf_store_server *srv, struct srv_conn *c,
                                      const struct srv_req *rq, kvf_rd_t *rd)
{
    uint64_t id = 0;

    kvf__rd_u64(rd, &id);
    if (!decode_done(srv, c, rq, rd))
        return NULL;
    struct srv_lease *lease = kvf__srv_lease_find(srv, id);
    if (!lease)
        kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_LEASE_NOT_FOUND, "lease %" PRIu64 " not found",
                           id);
    return lease;
}

/* @c may keep alive or revoke @lease; answers FORBIDDEN when not. */
static bool may_hold(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                     const struct srv_lease *lease)
{
    if (may_use_lease(c, lease))
        return true;
    KVF_LOG_RATELIMITED(KVF_LOG_INFO, SRV_LOG, "%s: %s refused: another client's lease", c->peer,
                        kvf__srv_op_name(rq->op));
    kvf__srv_reply_err(srv, c, rq, KVF_STORE_ST_FORBIDDEN,
                       "lease %" PRIu64 " belongs to another client: only that client or an "
                       "operator with the admin key may keep it alive or revoke it",
                       lease->id);
    return false;
}

static void op_lease_keepalive(struct kvf_store_server *srv, struct srv_conn *c,
                               const struct srv_req *rq, kvf_rd_t *rd)
{
    struct srv_lease *lease = decode_lease(srv, c, rq, rd);
    if (!lease || !may_hold(srv, c, rq, lease))
        return;
    /* Moving an armed timer cannot fail. */
    kvf__srv_timer_arm(srv, &lease->timer, srv->now_ms + lease->ttl_ms);
    kvf__srv_reply_empty(srv, c, rq);
}

static void op_lease_revoke(struct kvf_store_server *srv, struct srv_conn *c,
                            const struct srv_req *rq, kvf_rd_t *rd)
{
    struct srv_lease *lease = decode_lease(srv, c, rq, rd);
    if (!lease || !may_hold(srv, c, rq, lease))
        return;
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
    [KVF_STORE_OP_LIST_PAGE] = op_list_page,
};
