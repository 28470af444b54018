/*
 * The data of the store server: the key-value map, leases with the keys bound to them, the
 * get-with-wait requests parked on absent keys, and prefix watches. A change to the map wakes
 * the waiters of its key and sends an event to each matching watch (server_reply.c appends the
 * frames).
 */
#include <errno.h>
#include <stdint.h>
#include <inttypes.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>

#include "store/server.h"

/* ---- comparators ----------------------------------------------------------------------------- */

static int srv_key_cmp(const void *a, const void *b)
{
    const struct srv_keyref *x = a, *y = b;
    uint32_t n = x->klen < y->klen ? x->klen : y->klen;
    int c = n ? memcmp(x->key, y->key, n) : 0;
    if (c)
        return c;
    return (x->klen > y->klen) - (x->klen < y->klen);
}

int kvf__srv_lease_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* ---- waiters and watches --------------------------------------------------------------------- */

/* Unlink @w from its key and connection and free it. When it was the key's last waiter and
 * @free_empty_key is set, the waitkey is removed from the tree and freed too. */
/* Register a get-with-wait of @c for @key until @deadline_ms. Returns 0 or -ENOMEM. */
int kvf__srv_waiter_add(struct kvf_store_server *srv, struct srv_conn *c, uint32_t req_id,
                        const uint8_t *key, uint32_t klen, uint64_t deadline_ms)
{
    struct srv_keyref probe = {key, klen};
    struct srv_waitkey *wk = NULL;
    void **slot;
    int rc = -ENOMEM;

    struct srv_waiter *w = calloc(1, sizeof(*w));
    if (!w)
        return rc;
    timer_init(&w->timer, SRV_TIMER_WAITER);
    if (kvf__srv_timer_arm(srv, &w->timer, deadline_ms) < 0)
        goto out_free_waiter;
    slot = tfind(&probe, &srv->waitkey_root, srv_key_cmp);
    if (slot) {
        wk = *slot;
    } else {
        wk = malloc(sizeof(*wk) + klen);
        if (!wk)
            goto out_disarm;
        memcpy(wk->key, key, klen);
        wk->k.key = wk->key;
        wk->k.klen = klen;
        link_init(&wk->waiters);
        if (!tsearch(wk, &srv->waitkey_root, srv_key_cmp))
            goto out_free_waitkey;
    }
    w->conn = c;
    w->req_id = req_id;
    w->wk = wk;
    link_add_tail(&wk->waiters, &w->key_link);
    link_add_tail(&c->waiters, &w->conn_link);
    c->nwaiters++;
    atomic_fetch_add(&srv->nwaiters, 1u);
    return 0;

out_free_waitkey:
    free(wk);
out_disarm:
    kvf__srv_timer_disarm(srv, &w->timer);
out_free_waiter:
    free(w);
    return rc;
}

void kvf__srv_waiter_free(struct kvf_store_server *srv, struct srv_waiter *w, bool free_empty_key)
{
    struct srv_waitkey *wk = w->wk;
    link_del(&w->key_link);
    link_del(&w->conn_link);
    w->conn->nwaiters--;
    /* The idle timeout starts again once the wait is over (and its answer on its way). */
    w->conn->last_active_ms = srv->now_ms;
    atomic_fetch_sub(&srv->nwaiters, 1u);
    kvf__srv_timer_disarm(srv, &w->timer);
    free(w);
    if (free_empty_key && link_empty(&wk->waiters)) {
        tdelete(wk, &srv->waitkey_root, srv_key_cmp);
        free(wk);
    }
}

/* Answer every get-with-wait pending on @e's key with its new value. */
static void waiters_wake(struct kvf_store_server *srv, const struct srv_entry *e)
{
    void **slot = tfind(&e->k, &srv->waitkey_root, srv_key_cmp);
    if (!slot)
        return;
    struct srv_waitkey *wk = *slot;
    /* Take the key out of the tree first: kvf__srv_waiter_free() must not free it while we
     * iterate. */
    tdelete(wk, &srv->waitkey_root, srv_key_cmp);
    /* Every waiter's answer shares one copy of the value (see srv_shared). */
    struct srv_shared *sh = kvf__srv_shared_new(4u + e->vlen);
    if (sh) {
        kvf__put_le32(sh->data, e->vlen);
        if (e->vlen)
            memcpy(sh->data + 4, e->val, e->vlen);
    }
    while (!link_empty(&wk->waiters)) {
        struct srv_waiter *w = SRV_CONTAINER(wk->waiters.next, struct srv_waiter, key_link);
        /* Triggered by another client: capped here (an overflowing waiter's connection is
         * closed by the flush pass, so the dropped answer is never missed silently). */
        if (!sh) {
            w->conn->marks_oom = true;
            kvf__srv_conn_mark_dirty(srv, w->conn);
        } else if (kvf__srv_conn_room_for(srv, w->conn, (size_t)KVF_STORE_HDR_LEN + sh->len)) {
            kvf__srv_frame_shared(srv, w->conn, KVF_STORE_OP_GET, w->req_id, NULL, 0, sh);
        }
        kvf__srv_waiter_free(srv, w, false);
    }
    kvf__srv_shared_put(sh);
    free(wk);
}

void kvf__srv_watch_free(struct kvf_store_server *srv, struct srv_watch *w)
{
    link_del(&w->all_link);
    link_del(&w->conn_link);
    w->conn->nwatches--;
    w->conn->client->watches--;
    srv->nwatches--;
    free(w);
}

/* The part of an EVENT body every watcher shares: u8 type, blob key, blob value. */
static struct srv_shared *event_tail(uint8_t type, const uint8_t *key, uint32_t klen,
                                     const uint8_t *val, uint32_t vlen)
{
    struct srv_shared *sh = kvf__srv_shared_new(1u + 4u + klen + 4u + vlen);
    if (!sh)
        return NULL;
    uint8_t *p = sh->data;
    *p++ = type;
    kvf__put_le32(p, klen);
    memcpy(p + 4, key, klen);
    p += 4 + klen;
    kvf__put_le32(p, vlen);
    if (vlen)
        memcpy(p + 4, val, vlen);
    return sh;
}

/* Send an EVENT frame to every watch whose prefix matches @key. Scans the watch list: there are
 * few watches per session, and matching is a memcmp. The key and value are copied once, into a
 * tail every matching watch's frame shares; each connection holds only a header, the watch id
 * and a reference (so N watchers cost N × ~50 bytes, not N copies of the value). */
static void watches_notify(struct kvf_store_server *srv, uint8_t type, const uint8_t *key,
                           uint32_t klen, const uint8_t *val, uint32_t vlen)
{
    struct srv_shared *sh = NULL;
    bool oom = false;
    for (struct srv_link *l = srv->watches.next; l != &srv->watches; l = l->next) {
        struct srv_watch *w = SRV_CONTAINER(l, struct srv_watch, all_link);
        if (w->plen > klen || (w->plen && memcmp(w->prefix, key, w->plen) != 0))
            continue;
        struct srv_conn *c = w->conn;
        if (!sh && !oom) {
            sh = event_tail(type, key, klen, val, vlen);
            oom = !sh;
        }
        if (oom) {
            /* The event cannot be delivered: close the watcher rather than miss it silently. */
            c->marks_oom = true;
            kvf__srv_conn_mark_dirty(srv, c);
            continue;
        }
        if (!kvf__srv_conn_room_for(srv, c, (size_t)KVF_STORE_HDR_LEN + 8 + sh->len))
            continue;
        uint8_t id[8];
        kvf__put_le64(id, w->id);
        kvf__srv_frame_shared(srv, c, KVF_STORE_OP_EVENT, 0, id, sizeof(id), sh);
    }
    kvf__srv_shared_put(sh);
}

/* ---- the key-value map ----------------------------------------------------------------------- */

struct srv_entry *kvf__srv_kv_find(struct kvf_store_server *srv, const uint8_t *key, uint32_t klen)
{
    struct srv_keyref probe = {key, klen};
    void **slot = tfind(&probe, &srv->kv_root, srv_key_cmp);
    return slot ? *slot : NULL;
}

static void entry_set_lease(struct srv_entry *e, struct srv_lease *lease)
{
    if (e->lease == lease)
        return;
    if (e->lease)
        link_del(&e->lease_link);
    e->lease = lease;
    if (lease)
        link_add_tail(&lease->keys, &e->lease_link);
}

/*
 * Store @val under @key for client @by, then wake its waiters and notify watches. With
 * @set_lease the key is bound to @lease (NULL detaches it from any lease); without, an existing
 * binding is kept (ADD). The key and its bytes are charged to @by (taken from the client that
 * wrote it before). Returns 0, -ENOMEM, or -EDQUOT with the quota in @why; nothing changed then.
 */
int kvf__srv_kv_put(struct kvf_store_server *srv, struct srv_client *by, const uint8_t *key,
                    uint32_t klen, const uint8_t *val, uint32_t vlen, bool set_lease,
                    struct srv_lease *lease, char *why, size_t whylen)
{
    struct srv_entry *e = kvf__srv_kv_find(srv, key, klen);
    int64_t new_bytes = (int64_t)klen + vlen;
    int64_t keys = 1, bytes = new_bytes;
    if (e && e->owner == by) {
        keys = 0;
        bytes = new_bytes - ((int64_t)klen + e->vlen);
    }
    if (!kvf__srv_quota_kv(srv, by, keys, bytes, why, whylen))
        return -EDQUOT;

    uint8_t *copy = NULL;
    if (vlen) {
        copy = malloc(vlen);
        if (!copy)
            return -ENOMEM;
        memcpy(copy, val, vlen);
    }
    if (e) {
        kvf__srv_charge_kv(srv, e->owner, -1, -((int64_t)klen + e->vlen));
        if (e->owner != by)
            kvf__srv_client_maybe_free(srv, e->owner);
        free(e->val);
    } else {
        e = malloc(sizeof(*e) + klen);
        if (!e) {
            free(copy);
            return -ENOMEM;
        }
        memcpy(e->key, key, klen);
        e->k.key = e->key;
        e->k.klen = klen;
        e->lease = NULL;
        link_init(&e->lease_link);
        if (!tsearch(e, &srv->kv_root, srv_key_cmp)) {
            free(e);
            free(copy);
            return -ENOMEM;
        }
        SRV_STAT_ADD(srv, keys, 1);
    }
    e->owner = by;
    kvf__srv_charge_kv(srv, by, 1, new_bytes);
    e->val = copy;
    e->vlen = vlen;
    if (set_lease)
        entry_set_lease(e, lease);
    waiters_wake(srv, e);
    watches_notify(srv, KVF_STORE_EVENT_PUT, e->key, e->k.klen, e->val, e->vlen);
    return 0;
}

/* Remove @e, notify watches of the delete, uncharge its client and free it. */
void kvf__srv_kv_delete(struct kvf_store_server *srv, struct srv_entry *e)
{
    tdelete(e, &srv->kv_root, srv_key_cmp);
    SRV_STAT_SUB(srv, keys, 1);
    entry_set_lease(e, NULL);
    watches_notify(srv, KVF_STORE_EVENT_DELETE, e->key, e->k.klen, NULL, 0);
    kvf__srv_charge_kv(srv, e->owner, -1, -((int64_t)e->k.klen + e->vlen));
    kvf__srv_client_maybe_free(srv, e->owner);
    free(e->val);
    free(e);
}

void kvf__srv_entry_free(void *p)
{
    struct srv_entry *e = p;
    free(e->val);
    free(e);
}

/* ---- leases ---------------------------------------------------------------------------------- */

/* End @lease (expiry or revoke): delete its keys, with delete events, and free it. */
void kvf__srv_lease_end(struct kvf_store_server *srv, struct srv_lease *lease)
{
    kvf__srv_timer_disarm(srv, &lease->timer);
    tdelete(&lease->id, &srv->lease_root, kvf__srv_lease_cmp);
    SRV_STAT_SUB(srv, leases, 1);
    while (!link_empty(&lease->keys))
        kvf__srv_kv_delete(srv, SRV_CONTAINER(lease->keys.next, struct srv_entry, lease_link));
    lease->owner->leases--;
    srv->nleases--;
    kvf__srv_client_maybe_free(srv, lease->owner);
    free(lease->holder);
    free(lease);
}

/* The live lease @id, or NULL. A lease past its deadline whose timer has not run yet (it is due
 * in this same loop iteration) is ended here, so that it is never found alive after its TTL. */
struct srv_lease *kvf__srv_lease_find(struct kvf_store_server *srv, uint64_t id)
{
    if (id == 0)
        return NULL;
    void **slot = tfind(&id, &srv->lease_root, kvf__srv_lease_cmp);
    if (!slot)
        return NULL;
    struct srv_lease *lease = *slot;
    if (lease->timer.deadline_ms <= srv->now_ms) {
        KVF_DEBUG(SRV_LOG, "lease %" PRIu64 " expired", lease->id);
        kvf__srv_lease_end(srv, lease);
        return NULL;
    }
    return lease;
}

void kvf__srv_lease_free(void *p)
{
    free(((struct srv_lease *)p)->holder);
    free(p);
}
