/*
 * The store client's public operations (set, cas, get, del, add, list, watch, unwatch, leases,
 * ping): each checks its arguments, encodes its request, makes one call (client_call.c) and
 * hands back the result. kvf_store_open() and kvf_store_close() are in client.c.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "store/client.h"

static void cli_what(char *what, size_t n, const char *op, const char *key)
{
    char shown[80];
    snprintf(what, n, "%s \"%s\"", op, kvf__cli_show(shown, sizeof(shown), key, strlen(key)));
}

int kvf__builtin_set(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease)
{
    char what[CLI_WHAT_MAX];
    int rc = kvf__cli_check_handle(st, "set");
    if (rc == 0)
        rc = kvf__cli_check_key(st, "set", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "set", key);
    rc = kvf__cli_check_value(st, what, "value", val, len);
    if (rc < 0)
        return rc;
    return kvf__cli_put(st, what, key, false, NULL, 0, val, len, lease);
}

int kvf__builtin_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
                  const void *val, size_t len, uint64_t lease)
{
    char what[CLI_WHAT_MAX];
    int rc = kvf__cli_check_handle(st, "cas");
    if (rc == 0)
        rc = kvf__cli_check_key(st, "cas", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "cas", key);
    if (expected)
        rc = kvf__cli_check_value(st, what, "expected value", expected, expected_len);
    if (rc == 0)
        rc = kvf__cli_check_value(st, what, "value", val, len);
    if (rc < 0)
        return rc;
    return kvf__cli_put(st, what, key, true, expected, expected_len, val, len, lease);
}

int kvf__builtin_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "get");
    if (rc == 0)
        rc = kvf__cli_check_key(st, "get", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "get", key);
    if (!val || !len)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", st->url, what);
    *val = NULL;
    *len = 0;
    if (wait_ms > KVF_STORE_MAX_WAIT_MS)
        return kvf__err(-KVF_EINVAL, "store %s: %s: wait of %u ms exceeds the %u ms limit", st->url,
                        what, wait_ms, KVF_STORE_MAX_WAIT_MS);

    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_GET, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_GET);
    kvf__buf_put_blob(&f, key, strlen(key));
    kvf__buf_put_u32(&f, wait_ms);
    if (kvf__cli_frame_end(&f) < 0) {
        rc = kvf__cli_nomem(st, what);
        goto out_free;
    }
    rc = kvf__cli_call(st, &rq, &f, (uint64_t)wait_ms + st->opts.request_timeout_ms, true, what);
    if (rc == -KVF_ENOTFOUND) {
        rc = kvf__err(rc, "store %s: %s: not found", st->url, what);
    } else if (rc == -KVF_ETIMEDOUT && rq) {
        /* The store answered that the key is still absent (rq is NULL when it did not answer). */
        rc = kvf__err(rc, "store %s: %s: still absent after waiting %u ms", st->url, what, wait_ms);
    } else if (rc == 0) {
        *val = rq->val;
        *len = rq->val_len;
        rq->val = NULL;
    }
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

int kvf__builtin_del(kvf_store_t *st, const char *key)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "del");
    if (rc == 0)
        rc = kvf__cli_check_key(st, "del", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "del", key);
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_DEL, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_DEL);
    kvf__buf_put_blob(&f, key, strlen(key));
    rq->key = strdup(key);
    if (kvf__cli_frame_end(&f) < 0 || !rq->key) {
        rc = kvf__cli_nomem(st, what);
        goto out_free;
    }
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == -KVF_ENOTFOUND)
        rc = kvf__err(rc, "store %s: %s: not found", st->url, what);
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

int kvf__builtin_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "add");
    if (rc == 0)
        rc = kvf__cli_check_key(st, "add", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "add", key);
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_ADD, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_ADD);
    kvf__buf_put_blob(&f, key, strlen(key));
    kvf__buf_put_u64(&f, (uint64_t)delta);
    if (kvf__cli_frame_end(&f) < 0) {
        rc = kvf__cli_nomem(st, what);
        goto out_free;
    }
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0 && result) {
        /* Two's complement on the wire; convert without relying on implementation-defined
         * unsigned-to-signed conversion. */
        uint64_t u = rq->u64;
        *result = u <= (uint64_t)INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
    }
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

int kvf__builtin_list_page(kvf_store_t *st, const char *prefix, const char *after, size_t max,
                           unsigned flags, kvf_store_kv_t **out, size_t *count, int *more)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "list");
    if (rc < 0)
        return rc;
    if (!prefix)
        prefix = "";
    if (!after)
        after = "";
    rc = kvf__cli_check_key(st, "list", prefix, true);
    if (rc == 0 && *after)
        rc = kvf__cli_check_key(st, "list (after)", after, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "list", prefix);
    if (!out || !count)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", st->url, what);
    if (flags & ~KVF_STORE_LIST_KEYS_ONLY)
        return kvf__err(-KVF_EINVAL, "store %s: %s: unknown flags 0x%x", st->url, what, flags);
    *out = NULL;
    *count = 0;
    if (more)
        *more = 0;
    if (max == 0 || max > KVF_STORE_LIST_PAGE_MAX)
        max = KVF_STORE_LIST_PAGE_MAX;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LIST_PAGE, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_LIST_PAGE);
    kvf__buf_put_blob(&f, prefix, strlen(prefix));
    kvf__buf_put_blob(&f, after, strlen(after));
    kvf__buf_put_u32(&f, (uint32_t)max);
    kvf__buf_put_u8(&f, (uint8_t)flags);
    if (kvf__cli_frame_end(&f) < 0) {
        rc = kvf__cli_nomem(st, what);
        goto out_free;
    }
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0) {
        *out = rq->kvs;
        *count = rq->nkvs;
        if (more)
            *more = rq->u64 != 0;
        rq->kvs = NULL;
        rq->nkvs = 0;
    }
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

/* Every page, appended to one array. */
int kvf__builtin_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    if (out)
        *out = NULL;
    if (count)
        *count = 0;
    if (st && (!out || !count))
        return kvf__err(-KVF_EINVAL, "store %s: list: the output pointers are NULL", st->url);
    kvf_store_kv_t *all = NULL;
    size_t n = 0, cap = 0;
    int more = 1, rc = 0;
    while (more) {
        kvf_store_kv_t *page;
        size_t k;
        rc = kvf__builtin_list_page(st, prefix, n ? all[n - 1].key : NULL, 0, 0, &page, &k,
                                    &more);
        if (rc < 0)
            break;
        if (k == 0) {
            kvf_store_kv_free(page, 0);
            break;
        }
        if (n + k > cap) {
            size_t ncap = cap ? cap : 64;
            while (ncap < n + k)
                ncap *= 2;
            kvf_store_kv_t *grown = realloc(all, ncap * sizeof(*all));
            if (!grown) {
                kvf_store_kv_free(page, k);
                rc = kvf__cli_nomem(st, "list");
                break;
            }
            all = grown;
            cap = ncap;
        }
        memcpy(all + n, page, k * sizeof(*page));
        n += k;
        free(page); /* its keys and values now belong to @all */
    }
    if (rc < 0) {
        kvf_store_kv_free(all, n);
        return rc;
    }
    if (!all) {
        all = calloc(1, sizeof(*all));
        if (!all)
            return kvf__cli_nomem(st, "list");
    }
    *out = all;
    *count = n;
    return 0;
}

int kvf__builtin_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                       uint64_t *watch_id)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "watch");
    if (rc == 0)
        rc = kvf__cli_check_key(st, "watch", prefix, true);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "watch", prefix);
    if (!cb || !watch_id)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL", st->url, what,
                        cb ? "watch_id" : "the callback");
    *watch_id = 0;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_WATCH, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_WATCH);
    kvf__buf_put_blob(&f, prefix, strlen(prefix));
    rq->new_watch = calloc(1, sizeof(*rq->new_watch));
    if (kvf__cli_frame_end(&f) < 0 || !rq->new_watch)
        goto out_nomem;
    rq->new_watch->prefix = strdup(prefix);
    if (!rq->new_watch->prefix)
        goto out_nomem;
    rq->new_watch->prefix_len = strlen(prefix);
    rq->new_watch->cb = cb;
    rq->new_watch->arg = arg;
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0)
        *watch_id = rq->watch_cid;
    goto out_free;

out_nomem:
    rc = kvf__cli_nomem(st, what);
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

int kvf__builtin_unwatch(kvf_store_t *st, uint64_t watch_id)
{
    int rc = kvf__cli_check_handle(st, "unwatch");
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&st->mu);
    cli_watch_t *w;
    for (w = st->watches; w && !(w->active && w->cid == watch_id); w = w->next)
        ;
    if (!w) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: unwatch %" PRIu64 ": no such watch", st->url,
                        watch_id);
    }
    kvf__cli_watch_unlink_locked(st, watch_id);
    /* Events of an unknown watch are ignored, so the store's answer need not be awaited; this
     * also lets the callback itself unwatch without waiting for its own thread. */
    if (w->sid && st->state != CLI_DOWN && !st->broken)
        kvf__cli_send_u64_locked(st, KVF_STORE_OP_UNWATCH, w->sid);
    if (!cli_on_io_thread(st)) {
        st->active_calls++;
        while (st->cb_watch_cid == watch_id)
            pthread_cond_wait(&st->cond, &st->mu);
        st->active_calls--;
        if (st->closing)
            pthread_cond_broadcast(&st->cond);
    }
    pthread_mutex_unlock(&st->mu);
    kvf__cli_watch_free(w);
    return 0;
}

int kvf__builtin_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease)
{
    char what[64];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "lease grant");
    if (rc < 0)
        return rc;
    snprintf(what, sizeof(what), "lease grant (ttl %u ms)", ttl_ms);
    if (!lease)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointer is NULL", st->url, what);
    *lease = 0;
    if (ttl_ms == 0 || ttl_ms > KVF_STORE_MAX_LEASE_TTL_MS)
        return kvf__err(-KVF_EINVAL, "store %s: %s: ttl must be 1..%u ms", st->url, what,
                        KVF_STORE_MAX_LEASE_TTL_MS);
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LEASE_GRANT, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_LEASE_GRANT);
    kvf__buf_put_u32(&f, ttl_ms);
    rq->new_lease = calloc(1, sizeof(*rq->new_lease));
    if (kvf__cli_frame_end(&f) < 0 || !rq->new_lease) {
        rc = kvf__cli_nomem(st, what);
        goto out_free;
    }
    rq->new_lease->ttl_ms = ttl_ms;
    rq->new_lease->state = CLI_LEASE_GRANTING;
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0)
        *lease = rq->lease_cid;
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

int kvf__builtin_lease_keepalive_stop(kvf_store_t *st, uint64_t lease)
{
    int rc = kvf__cli_check_handle(st, "lease keepalive stop");
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&st->mu);
    cli_lease_t *l = kvf__cli_lease_find_locked(st, lease);
    if (!l || l->state == CLI_LEASE_GRANTING) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: lease keepalive stop %" PRIu64 ": no such lease",
                        st->url, lease);
    }
    if (l->state == CLI_LEASE_LIVE) {
        l->state = CLI_LEASE_STOPPED;
    } else if (l->state != CLI_LEASE_STOPPED) {
        /* Not granted on the current connection: there is nothing on the store to let expire.
         * A re-grant in flight finds no entry when answered and revokes what it got. */
        kvf__cli_lease_free(kvf__cli_lease_unlink_locked(st, lease));
    }
    pthread_mutex_unlock(&st->mu);
    return 0;
}

int kvf__builtin_lease_revoke(kvf_store_t *st, uint64_t lease)
{
    char what[64];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "lease revoke");
    if (rc < 0)
        return rc;
    snprintf(what, sizeof(what), "lease revoke %" PRIu64, lease);

    /* Whatever happens below, the lease is no longer kept alive nor re-granted: it ends either
     * now on the store, or when its TTL runs out there. */
    pthread_mutex_lock(&st->mu);
    cli_lease_t *l = kvf__cli_lease_find_locked(st, lease);
    if (!l || l->state == CLI_LEASE_GRANTING) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: %s: no such lease", st->url, what);
    }
    /* A server id is only meaningful on the connection that obtained it; remember which. */
    bool on_store = (l->state == CLI_LEASE_LIVE || l->state == CLI_LEASE_STOPPED) &&
                    st->state != CLI_DOWN && !st->broken;
    /* The store told us it no longer has the lease (and so none of its keys), and no re-grant
     * has been answered since: a re-grant in flight finds no entry and revokes what it got. */
    bool gone = !on_store && l->lost;
    uint64_t sid = l->sid, gen = st->conn_gen;
    uint32_t ttl = l->ttl_ms;
    char conn_err[CLI_MSG_MAX];
    snprintf(conn_err, sizeof(conn_err), "%s",
             st->state == CLI_DOWN ? (st->last_conn_err[0] ? st->last_conn_err : "connection lost")
                                   : "");
    bool down = st->state == CLI_DOWN || st->broken;
    kvf__cli_lease_free(kvf__cli_lease_unlink_locked(st, lease));
    pthread_mutex_unlock(&st->mu);
    if (gone)
        return 0;
    if (!on_store) {
        if (down)
            return kvf__err(-KVF_ESTOREDOWN,
                            "store %s: %s: not connected to the store (%s), so it could not be "
                            "revoked there; it is no longer kept alive and expires on the store "
                            "within its TTL of %u ms, deleting its keys then",
                            st->url, what, conn_err[0] ? conn_err : "connection lost", ttl);
        return kvf__err(-KVF_ESTOREDOWN,
                        "store %s: %s: the connection it was granted on was lost and it was not "
                        "re-granted yet, so it could not be revoked on the store; it is no "
                        "longer kept alive and expires there within its TTL of %u ms, deleting "
                        "its keys then",
                        st->url, what, ttl);
    }

    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LEASE_REVOKE, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    if (kvf__cli_frame_u64(&f, KVF_STORE_OP_LEASE_REVOKE, sid) < 0) {
        rc = kvf__cli_nomem(st, what);
        goto out_free;
    }
    rq->sid_gen = gen;
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc < 0 && rc != -KVF_ENOTFOUND) { /* ENOTFOUND: it already expired, keys and all */
        char cause[CLI_MSG_MAX * 2];
        snprintf(cause, sizeof(cause), "%s", kvf_last_error());
        rc = kvf__err(rc == -KVF_ETIMEDOUT ? rc : -KVF_ESTOREDOWN,
                      "%s; the lease is no longer kept alive and, unless the store did revoke "
                      "it, expires there within its TTL of %u ms, deleting its keys then",
                      cause, ttl);
    }
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

int kvf__builtin_ping(kvf_store_t *st)
{
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "ping");
    if (rc < 0)
        return rc;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_PING, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, "ping");
    kvf__cli_frame_begin(&f, KVF_STORE_OP_PING);
    if (kvf__cli_frame_end(&f) < 0)
        rc = kvf__cli_nomem(st, "ping");
    else
        rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, "ping");
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}
