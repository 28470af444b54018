/*
 * Client of the built-in config store (tcp://): calls and the public kvf_store_* functions.
 * client.h describes how the client works and the files below this one.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/url.h"
#include "store/client.h"

/* ---------------------------------------------------------------------------------------------
 * Calls
 * ------------------------------------------------------------------------------------------- */

/*
 * Send @frame as the request @*rqp and wait for its answer, at most @timeout_ms in all (waiting
 * for a reconnection included). @wait_connect false fails at once when disconnected.
 * On success the results are in *rqp, which the caller frees. On failure the last-error message
 * is set ("store URL: WHAT: reason"); if the request was abandoned *rqp is set to NULL, as the
 * I/O thread now owns it.
 */
int kvf__cli_call(kvf_store_t *st, cli_req_t **rqp, kvf_buf_t *frame, uint64_t timeout_ms,
                  bool wait_connect, const char *what)
{
    cli_req_t *rq = *rqp;
    uint64_t start = kvf__now_ms();
    uint64_t deadline = start + timeout_ms;
    struct timespec ts;
    int rc = 0;

    kvf__deadline_ts(&ts, deadline);
    pthread_mutex_lock(&st->mu);
    if (st->closing) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ECLOSED, "store %s: %s: the client is closing", st->url, what);
    }
    st->active_calls++;

    /* Wait until the connection is ready and, for a set under a lease, the lease is granted on
     * it (it is re-granted after the store lost it). */
    for (;;) {
        if (st->closing) {
            rc = kvf__err(-KVF_ECLOSED, "store %s: %s: the client is closing", st->url, what);
            goto out_unlock;
        }
        if (st->state == CLI_READY && !st->broken) {
            if (rq->sid_gen && rq->sid_gen != st->conn_gen) {
                /* The server id is meaningless on this connection: it cannot be sent. */
                rc = kvf__err(-KVF_ESTOREDOWN,
                              "store %s: %s: the connection it was granted on was lost before "
                              "the request could be sent",
                              st->url, what);
                goto out_unlock;
            }
            if (!rq->lease_cid || rq->op == KVF_STORE_OP_LEASE_GRANT)
                break;
            cli_lease_t *l = kvf__cli_lease_find_locked(st, rq->lease_cid);
            if (!l) {
                rc = kvf__err(-KVF_ENOTFOUND,
                              "store %s: %s: lease %" PRIu64 " is not held by this client "
                              "(revoked, expired or never granted)",
                              st->url, what, rq->lease_cid);
                goto out_unlock;
            }
            if (l->state == CLI_LEASE_LIVE || l->state == CLI_LEASE_STOPPED) {
                kvf__put_le64(frame->data + frame->len - 8, l->sid);
                break;
            }
        } else if (!wait_connect && st->state == CLI_DOWN) {
            rc = kvf__err(-KVF_ESTOREDOWN, "store %s: %s: not connected to the store (%s)", st->url,
                          what, st->last_conn_err);
            goto out_unlock;
        }
        if (kvf__now_ms() >= deadline) {
            if (st->state != CLI_READY)
                rc = kvf__err(-KVF_ESTOREDOWN,
                              "store %s: %s: no connection to the store within %" PRIu64 " ms (%s)",
                              st->url, what, timeout_ms,
                              st->last_conn_err[0] ? st->last_conn_err : "connection lost");
            else
                rc = kvf__err(-KVF_ETIMEDOUT,
                              "store %s: %s: lease %" PRIu64 " was not re-granted within %" PRIu64
                              " ms",
                              st->url, what, rq->lease_cid, timeout_ms);
            goto out_unlock;
        }
        pthread_cond_timedwait(&st->cond, &st->mu, &ts);
    }

    kvf__cli_link_entries_locked(st, rq);
    kvf__cli_submit_locked(st, rq, frame);
    while (!rq->done) {
        if (pthread_cond_timedwait(&rq->cond, &st->mu, &ts) == ETIMEDOUT && !rq->done) {
            rq->owner = CLI_OWNER_ABANDONED;
            kvf__cli_drop_entries_locked(st, rq);
            /* The store may be gone without the connection knowing: have it probed. */
            st->probe_wanted = true;
            cli_wake(st);
            *rqp = NULL;
            rc = kvf__err(-KVF_ETIMEDOUT, "store %s: %s: timed out after %" PRIu64 " ms", st->url,
                          what, timeout_ms);
            goto out_unlock;
        }
    }
    rc = rq->err;
    if (rc < 0) {
        kvf__cli_drop_entries_locked(st, rq);
        rc = kvf__err(rc, "store %s: %s: %s", st->url, what,
                      rq->msg[0] ? rq->msg : kvf_strerror(rc));
    }

out_unlock:
    st->active_calls--;
    if (st->closing)
        pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int kvf__cli_check_handle(const kvf_store_t *st, const char *op)
{
    if (!st)
        return kvf__err(-KVF_EINVAL, "store %s: the client handle is NULL", op);
    return 0;
}

/* Validate a key (or a prefix when @prefix) before anything reaches the wire. */
int kvf__cli_check_key(const kvf_store_t *st, const char *op, const char *key, bool prefix)
{
    const char *noun = prefix ? "prefix" : "key";
    if (!key)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL", st->url, op, noun);
    size_t n = strlen(key);
    if (n == 0 && !prefix)
        return kvf__err(-KVF_EINVAL, "store %s: %s: key is empty", st->url, op);
    if (n > KVF_STORE_MAX_KEY_LEN) {
        char shown[80];
        return kvf__err(
            -KVF_ETOOBIG, "store %s: %s \"%s\": %s of %zu bytes exceeds the %u-byte limit", st->url,
            op, kvf__cli_show(shown, sizeof(shown), key, n), noun, n, KVF_STORE_MAX_KEY_LEN);
    }
    return 0;
}

int kvf__cli_check_value(const kvf_store_t *st, const char *what, const char *name, const void *val,
                         size_t len)
{
    if (!val && len)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL with length %zu", st->url, what,
                        name, len);
    if (len > KVF_STORE_MAX_VALUE_LEN)
        return kvf__err(-KVF_ETOOBIG, "store %s: %s: %s of %zu bytes exceeds the %u-byte limit",
                        st->url, what, name, len, KVF_STORE_MAX_VALUE_LEN);
    return 0;
}

int kvf__cli_nomem(const kvf_store_t *st, const char *what)
{
    return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", st->url, what);
}

/* SET and CAS: encode, remember what to track under the lease, call. */
int kvf__cli_put(kvf_store_t *st, const char *what, const char *key, bool cas, const void *expected,
                 size_t expected_len, const void *val, size_t len, uint64_t lease)
{
    uint8_t op = cas ? KVF_STORE_OP_CAS : KVF_STORE_OP_SET;
    size_t klen = strlen(key);
    kvf_buf_t f;
    int rc = -KVF_ENOMEM;
    cli_req_t *rq = kvf__cli_req_new(op, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    if (cas) {
        kvf__cli_frame_begin(&f, op);
        kvf__buf_put_blob(&f, key, klen);
        kvf__buf_put_u8(&f, expected ? 1 : 0);
        kvf__buf_put_blob(&f, expected, expected ? expected_len : 0);
        kvf__buf_put_blob(&f, val, len);
        kvf__buf_put_u64(&f, 0); /* lease: filled in by kvf__cli_call() */
        rc = kvf__cli_frame_end(&f);
    } else {
        rc = kvf__cli_frame_set(&f, key, klen, val, len, 0);
    }
    if (rc < 0)
        goto out_nomem;
    rq->key = strdup(key);
    if (!rq->key)
        goto out_nomem;
    rq->lease_cid = lease;
    if (lease && len) {
        rq->rec_val = malloc(len);
        if (!rq->rec_val)
            goto out_nomem;
        memcpy(rq->rec_val, val, len);
        rq->rec_len = len;
    }
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    goto out_free;

out_nomem:
    rc = kvf__cli_nomem(st, what);
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

static void cli_what(char *what, size_t n, const char *op, const char *key)
{
    char shown[80];
    snprintf(what, n, "%s \"%s\"", op, kvf__cli_show(shown, sizeof(shown), key, strlen(key)));
}

int kvf_store_set(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease)
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

int kvf_store_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
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

int kvf_store_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len)
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

int kvf_store_del(kvf_store_t *st, const char *key)
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

int kvf_store_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result)
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

int kvf_store_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = kvf__cli_check_handle(st, "list");
    if (rc < 0)
        return rc;
    if (!prefix)
        prefix = "";
    rc = kvf__cli_check_key(st, "list", prefix, true);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "list", prefix);
    if (!out || !count)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", st->url, what);
    *out = NULL;
    *count = 0;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LIST, CLI_OWNER_CALLER);
    if (!rq)
        return kvf__cli_nomem(st, what);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_LIST);
    kvf__buf_put_blob(&f, prefix, strlen(prefix));
    if (kvf__cli_frame_end(&f) < 0) {
        rc = kvf__cli_nomem(st, what);
        goto out_free;
    }
    rc = kvf__cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0) {
        *out = rq->kvs;
        *count = rq->nkvs;
        rq->kvs = NULL;
        rq->nkvs = 0;
    }
out_free:
    kvf__buf_free(&f);
    kvf__cli_req_free(rq);
    return rc;
}

int kvf_store_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
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

int kvf_store_unwatch(kvf_store_t *st, uint64_t watch_id)
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

int kvf_store_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease)
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

int kvf_store_lease_keepalive_stop(kvf_store_t *st, uint64_t lease)
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

int kvf_store_lease_revoke(kvf_store_t *st, uint64_t lease)
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

int kvf_store_ping(kvf_store_t *st)
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

/* ---------------------------------------------------------------------------------------------
 * Public API
 * ------------------------------------------------------------------------------------------- */

void kvf_store_opts_init(kvf_store_opts_t *opts)
{
    if (!opts)
        return;
    memset(opts, 0, sizeof(*opts));
    opts->size = sizeof(*opts);
    opts->connect_timeout_ms = CLI_DEFAULT_CONNECT_TIMEOUT_MS;
    opts->request_timeout_ms = CLI_DEFAULT_REQUEST_TIMEOUT_MS;
}

static void cli_free(kvf_store_t *st)
{
    while (st->leases) {
        cli_lease_t *l = st->leases;
        st->leases = l->next;
        kvf__cli_lease_free(l);
    }
    while (st->watches) {
        cli_watch_t *w = st->watches;
        st->watches = w->next;
        kvf__cli_watch_free(w);
    }
    kvf__buf_free(&st->out);
    kvf__buf_free(&st->rx);
    pthread_cond_destroy(&st->cond);
    pthread_mutex_destroy(&st->mu);
    close(st->wake_fd);
    free(st->url);
    free(st);
}

/* Connect for kvf_store_open(): retry with backoff until connect_timeout_ms has passed. */
static int cli_open_connect(kvf_store_t *st)
{
    uint64_t start = kvf__now_ms();
    uint32_t ct = st->opts.connect_timeout_ms;
    uint64_t deadline = start + ct;
    uint32_t backoff = CLI_BACKOFF_MIN_MS;
    char why[CLI_MSG_MAX] = "";
    for (;;) {
        /* With no connect timeout a single attempt is still bounded, by the request timeout. */
        uint64_t attempt_deadline = ct ? deadline : start + st->opts.request_timeout_ms;
        int fd = kvf__cli_connect_once(st, attempt_deadline, false, why, sizeof(why));
        if (fd >= 0)
            return fd;
        uint64_t now = kvf__now_ms();
        if (ct == 0 || now >= deadline)
            break;
        KVF_DEBUG("store", "%s: %s; retrying in %u ms", st->url, why, backoff);
        uint64_t nap = deadline - now < backoff ? deadline - now : backoff;
        struct timespec ts = {.tv_sec = (time_t)(nap / 1000),
                              .tv_nsec = (long)(nap % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
        backoff = backoff * 2 > CLI_BACKOFF_MAX_MS ? CLI_BACKOFF_MAX_MS : backoff * 2;
    }
    if (ct == 0)
        return kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect: %s", st->url, why);
    return kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect within %u ms: %s", st->url, ct, why);
}

int kvf_store_open(const char *url, const kvf_store_opts_t *opts, kvf_store_t **out)
{
    kvf_store_opts_t o;
    kvf_store_url_t addr;
    int rc;

    if (!out)
        return kvf__err(-KVF_EINVAL, "store open: the output pointer is NULL");
    *out = NULL;
    if (!url)
        return kvf__err(-KVF_EINVAL, "store open: the URL is NULL");
    rc = kvf__store_url_parse(url, 0, &addr);
    if (rc < 0)
        return rc;
    if (addr.scheme != KVF_STORE_SCHEME_TCP)
        return kvf__err(-KVF_ENOTSUP,
                        "store %s: the %s backend is not built yet (only tcp:// is served)", url,
                        addr.scheme == KVF_STORE_SCHEME_ETCD ? "etcd" : "redis");
    kvf_store_opts_init(&o);
    if (opts) {
        if (opts->size < sizeof(opts->size) + sizeof(uint32_t) * 2 || opts->size > sizeof(o))
            return kvf__err(-KVF_EINVAL,
                            "store %s: opts.size is %zu; fill the options with "
                            "kvf_store_opts_init()",
                            url, opts->size);
        memcpy(&o, opts, opts->size);
        o.size = sizeof(o);
    }
    if (o.request_timeout_ms == 0)
        return kvf__err(-KVF_EINVAL, "store %s: request_timeout_ms is 0; it must be positive", url);

    kvf_store_t *st = calloc(1, sizeof(*st));
    if (!st)
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    st->fd = -1;
    st->opts = o;
    st->addr = addr;
    st->next_req_id = 1;
    st->url = strdup(url);
    if (!st->url) {
        rc = kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
        goto out_free_st;
    }
    st->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (st->wake_fd < 0) {
        rc = kvf__err(-errno, "store %s: eventfd: %s", url, kvf_strerror(-errno));
        goto out_free_url;
    }
    pthread_mutex_init(&st->mu, NULL);
    rc = kvf__cond_init_monotonic(&st->cond);
    if (rc < 0) {
        rc = kvf__err(rc, "store %s: pthread_cond_init: %s", url, kvf_strerror(rc));
        goto out_close_wake;
    }

    int fd = cli_open_connect(st);
    if (fd < 0) {
        rc = fd;
        goto out_free_all;
    }
    pthread_mutex_lock(&st->mu);
    kvf__cli_conn_up_locked(st, fd);
    pthread_mutex_unlock(&st->mu);

    /* The I/O thread takes no signals: they belong to the application's threads. */
    rc = kvf__thread_start(&st->io, "kvf-store-io", 0, kvf__cli_io_main, st);
    if (rc < 0) {
        rc = kvf__err(rc, "store %s: cannot start the I/O thread: %s", url, kvf_strerror(rc));
        pthread_mutex_lock(&st->mu);
        kvf__cli_conn_down_locked(st, -KVF_ECLOSED, "the client was closed");
        pthread_mutex_unlock(&st->mu);
        goto out_free_all;
    }
    st->io_started = true;

    /* Something accepted the connection; make sure it is a store that answers. */
    rc = kvf_store_ping(st);
    if (rc < 0) {
        rc = kvf__err_wrap(-KVF_ESTOREDOWN, "store %s: the store does not answer", url);
        kvf_store_close(st);
        return rc;
    }
    KVF_DEBUG("store", "%s: connected", url);
    *out = st;
    return 0;

out_free_all:
    cli_free(st);
    return rc;
out_close_wake:
    pthread_mutex_destroy(&st->mu);
    close(st->wake_fd);
out_free_url:
    free(st->url);
out_free_st:
    free(st);
    return rc;
}

/* Revoke every live lease, all within CLI_CLOSE_REVOKE_MS, without waiting for a reconnection. */
static void cli_revoke_all(kvf_store_t *st)
{
    uint64_t deadline = kvf__now_ms() + CLI_CLOSE_REVOKE_MS;
    for (;;) {
        pthread_mutex_lock(&st->mu);
        cli_lease_t *l;
        for (l = st->leases; l && l->state != CLI_LEASE_LIVE; l = l->next)
            ;
        /* While a re-grant is being restored, kvf__cli_call() waits for it (within the
         * deadline). */
        if (!l || st->state == CLI_DOWN) {
            pthread_mutex_unlock(&st->mu);
            return;
        }
        uint64_t sid = l->sid, cid = l->cid, gen = st->conn_gen;
        kvf__cli_lease_free(kvf__cli_lease_unlink_locked(st, cid));
        pthread_mutex_unlock(&st->mu);

        uint64_t now = kvf__now_ms();
        if (now >= deadline)
            return;
        char what[64];
        snprintf(what, sizeof(what), "lease revoke %" PRIu64, cid);
        kvf_buf_t f;
        cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LEASE_REVOKE, CLI_OWNER_CALLER);
        if (!rq)
            return;
        if (kvf__cli_frame_u64(&f, KVF_STORE_OP_LEASE_REVOKE, sid) < 0) {
            kvf__buf_free(&f);
            kvf__cli_req_free(rq);
            return;
        }
        rq->sid_gen = gen;
        if (kvf__cli_call(st, &rq, &f, deadline - now, false, what) < 0)
            KVF_DEBUG("store", "%s: on close: %s", st->url, kvf_last_error());
        kvf__buf_free(&f);
        kvf__cli_req_free(rq);
    }
}

void kvf_store_close(kvf_store_t *st)
{
    if (!st)
        return;
    if (cli_on_io_thread(st)) {
        KVF_ERROR("store", "%s: kvf_store_close() called from a watch callback; ignored", st->url);
        return;
    }
    cli_revoke_all(st);
    pthread_mutex_lock(&st->mu);
    st->closing = true;
    pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->mu);
    cli_wake(st);
    pthread_join(st->io, NULL);
    /* The I/O thread failed every request on its way out; wait for their callers to leave. */
    pthread_mutex_lock(&st->mu);
    while (st->active_calls > 0)
        pthread_cond_wait(&st->cond, &st->mu);
    pthread_mutex_unlock(&st->mu);
    KVF_DEBUG("store", "%s: closed", st->url);
    cli_free(st);
}

const char *kvf_store_url(const kvf_store_t *st)
{
    return st ? st->url : "";
}
