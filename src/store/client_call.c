/*
 * One call of the store client: a caller's request sent once the connection (and the lease it
 * names) is ready, then waited for until its answer, its deadline or the loss of the
 * connection; and the argument checks the public functions share.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/common.h"
#include "common/thread.h"
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
