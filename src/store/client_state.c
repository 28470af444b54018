/*
 * Leases and watches of the store client, kept in step with the store: grants, keep-alives and
 * watch registrations sent by the I/O thread, re-publication of a lease's keys after it was
 * re-granted, and the table updates that follow each answer (see client.h).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "store/client.h"

/* ---------------------------------------------------------------------------------------------
 * Grants, keep-alives, watches and re-publication (I/O thread)
 * ------------------------------------------------------------------------------------------- */

void kvf__cli_send_grant_locked(kvf_store_t *st, cli_lease_t *l, bool restore)
{
    kvf_buf_t f;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LEASE_GRANT, CLI_OWNER_IO);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_LEASE_GRANT);
    kvf__buf_put_u32(&f, l->ttl_ms);
    if (!rq || kvf__cli_frame_end(&f) < 0) {
        kvf__buf_free(&f);
        free(rq);
        KVF_WARN_RATELIMITED("store", "%s: out of memory re-granting lease %" PRIu64, st->url,
                             l->cid);
        l->state = CLI_LEASE_NEED_GRANT;
        l->due_ms = kvf__now_ms() + CLI_REGRANT_RETRY_MS;
        return;
    }
    rq->lease_cid = l->cid;
    rq->restore = restore;
    l->state = CLI_LEASE_REGRANTING;
    kvf__cli_send_internal_locked(st, rq, &f);
    /* A re-grant on a live connection holds user requests back, as after a reconnect, until it
     * is answered and the keys are re-published: otherwise a user's set or delete of one of
     * those keys, sent after the grant but before its answer, would be overwritten by the
     * re-published old value. */
    if (restore && st->state == CLI_READY)
        st->state = CLI_RESTORING;
}

void kvf__cli_send_keepalive_locked(kvf_store_t *st, cli_lease_t *l)
{
    kvf_buf_t f;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LEASE_KEEPALIVE, CLI_OWNER_IO);
    if (!rq || kvf__cli_frame_u64(&f, KVF_STORE_OP_LEASE_KEEPALIVE, l->sid) < 0) {
        if (rq)
            kvf__buf_free(&f);
        free(rq);
        KVF_WARN_RATELIMITED("store", "%s: out of memory sending a keep-alive for lease %" PRIu64,
                             st->url, l->cid);
        return;
    }
    rq->lease_cid = l->cid;
    rq->lease_sid = l->sid;
    kvf__cli_send_internal_locked(st, rq, &f);
}

void kvf__cli_send_watch_locked(kvf_store_t *st, cli_watch_t *w)
{
    kvf_buf_t f;
    cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_WATCH, CLI_OWNER_IO);
    kvf__cli_frame_begin(&f, KVF_STORE_OP_WATCH);
    kvf__buf_put_blob(&f, w->prefix, w->prefix_len);
    if (!rq || kvf__cli_frame_end(&f) < 0) {
        kvf__buf_free(&f);
        free(rq);
        KVF_WARN_RATELIMITED("store", "%s: out of memory re-registering watch %" PRIu64, st->url,
                             w->cid);
        return;
    }
    rq->watch_cid = w->cid;
    rq->restore = true;
    kvf__cli_send_internal_locked(st, rq, &f);
}

/* The store has a fresh lease for @l: put back every key this client set under it. */
static void cli_republish_locked(kvf_store_t *st, cli_lease_t *l)
{
    for (cli_key_t *k = l->keys; k; k = k->next) {
        kvf_buf_t f;
        cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_SET, CLI_OWNER_IO);
        if (!rq || kvf__cli_frame_set(&f, k->key, strlen(k->key), k->val, k->len, l->sid) < 0) {
            if (rq)
                kvf__buf_free(&f);
            free(rq);
            KVF_WARN_RATELIMITED("store", "%s: out of memory re-publishing a key of lease %" PRIu64,
                                 st->url, l->cid);
            continue;
        }
        rq->lease_cid = l->cid;
        kvf__cli_send_internal_locked(st, rq, &f);
    }
}

/* Keep the lease and watch tables in step with an answer that just arrived. */
void kvf__cli_apply_answer_locked(kvf_store_t *st, cli_req_t *rq)
{
    cli_lease_t *l;
    switch (rq->op) {
    case KVF_STORE_OP_SET:
    case KVF_STORE_OP_CAS:
        if (rq->err < 0) {
            if (rq->owner == CLI_OWNER_IO)
                KVF_WARN_RATELIMITED("store",
                                     "%s: re-publishing a key of lease %" PRIu64 " failed: %s (%s)",
                                     st->url, rq->lease_cid, kvf_strerror(rq->err), rq->msg);
            break;
        }
        if (!rq->key)
            break; /* a re-publication: the key is already tracked */
        kvf__cli_forget_key_locked(st, rq->key);
        l = rq->lease_cid ? kvf__cli_lease_find_locked(st, rq->lease_cid) : NULL;
        if (l) {
            cli_key_t *k = calloc(1, sizeof(*k));
            if (!k) {
                KVF_WARN_RATELIMITED("store",
                                     "%s: out of memory: a key of lease %" PRIu64
                                     " will not be re-published",
                                     st->url, l->cid);
                break;
            }
            k->key = rq->key;
            k->val = rq->rec_val;
            k->len = rq->rec_len;
            rq->key = NULL;
            rq->rec_val = NULL;
            k->next = l->keys;
            l->keys = k;
        }
        break;
    case KVF_STORE_OP_DEL:
        if ((rq->err == 0 || rq->err == -KVF_ENOTFOUND) && rq->key)
            kvf__cli_forget_key_locked(st, rq->key);
        break;
    case KVF_STORE_OP_LEASE_GRANT:
        l = kvf__cli_lease_find_locked(st, rq->lease_cid);
        if (rq->err == 0) {
            if (l && (l->state == CLI_LEASE_GRANTING || l->state == CLI_LEASE_REGRANTING)) {
                bool regrant = l->state == CLI_LEASE_REGRANTING;
                l->sid = rq->u64;
                l->state = CLI_LEASE_LIVE;
                l->lost = false;
                l->due_ms = kvf__now_ms() + cli_keepalive_interval(l);
                if (regrant) {
                    KVF_INFO("store", "%s: lease %" PRIu64 " re-granted", st->url, l->cid);
                    cli_republish_locked(st, l);
                }
                pthread_cond_broadcast(&st->cond);
            } else {
                /* Its caller gave up, or it was revoked meanwhile: nobody will keep it. */
                kvf__cli_send_u64_locked(st, KVF_STORE_OP_LEASE_REVOKE, rq->u64);
            }
        } else if (l && l->state == CLI_LEASE_REGRANTING) {
            KVF_WARN_RATELIMITED("store",
                                 "%s: re-granting lease %" PRIu64 " failed: %s (%s); retrying",
                                 st->url, l->cid, kvf_strerror(rq->err), rq->msg);
            l->state = CLI_LEASE_NEED_GRANT;
            l->due_ms = kvf__now_ms() + CLI_REGRANT_RETRY_MS;
        }
        break;
    case KVF_STORE_OP_LEASE_KEEPALIVE:
        l = kvf__cli_lease_find_locked(st, rq->lease_cid);
        if (rq->err == -KVF_ENOTFOUND && l && l->state == CLI_LEASE_LIVE &&
            l->sid == rq->lease_sid) {
            KVF_INFO("store", "%s: the store lost lease %" PRIu64 "; re-granting it", st->url,
                     l->cid);
            l->state = CLI_LEASE_NEED_GRANT;
            l->sid = 0;
            l->due_ms = 0;
            l->lost = true;
            cli_wake(st); /* the timer pass re-grants it */
        } else if (rq->err < 0) {
            KVF_DEBUG("store", "%s: keep-alive of lease %" PRIu64 ": %s", st->url, rq->lease_cid,
                      kvf_strerror(rq->err));
        }
        break;
    case KVF_STORE_OP_WATCH: {
        cli_watch_t *w = NULL;
        for (w = st->watches; w && w->cid != rq->watch_cid; w = w->next)
            ;
        if (rq->err == 0) {
            if (w && w->sid == 0) {
                w->sid = rq->u64;
                w->active = true;
            } else {
                kvf__cli_send_u64_locked(st, KVF_STORE_OP_UNWATCH, rq->u64);
            }
        } else if (w && w->active) {
            char shown[80];
            KVF_WARN_RATELIMITED("store", "%s: re-registering the watch on \"%s\" failed: %s (%s)",
                                 st->url,
                                 kvf__cli_show(shown, sizeof(shown), w->prefix, w->prefix_len),
                                 kvf_strerror(rq->err), rq->msg);
        }
        break;
    }
    default:
        break;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Entries created by a user's grant or watch
 * ------------------------------------------------------------------------------------------- */

/* The user's grant or watch failed: drop the entry it created (the answer, if it still comes,
 * finds nothing and the I/O thread revokes or unwatches what the store created). */
void kvf__cli_drop_entries_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->op == KVF_STORE_OP_LEASE_GRANT && rq->lease_cid) {
        cli_lease_t *l = kvf__cli_lease_find_locked(st, rq->lease_cid);
        if (l && l->state == CLI_LEASE_GRANTING)
            kvf__cli_lease_free(kvf__cli_lease_unlink_locked(st, rq->lease_cid));
    } else if (rq->op == KVF_STORE_OP_WATCH && rq->watch_cid) {
        cli_watch_t *w;
        for (w = st->watches; w && w->cid != rq->watch_cid; w = w->next)
            ;
        if (w && !w->active)
            kvf__cli_watch_free(kvf__cli_watch_unlink_locked(st, rq->watch_cid));
    }
}

/* Link the entry a user's grant or watch creates, just before the request goes out, so that
 * the I/O thread finds it when the answer arrives. */
void kvf__cli_link_entries_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->new_lease) {
        rq->new_lease->cid = ++st->next_lease_cid;
        rq->lease_cid = rq->new_lease->cid;
        rq->new_lease->next = st->leases;
        st->leases = rq->new_lease;
        rq->new_lease = NULL;
    }
    if (rq->new_watch) {
        rq->new_watch->cid = ++st->next_watch_cid;
        rq->watch_cid = rq->new_watch->cid;
        rq->new_watch->next = st->watches;
        st->watches = rq->new_watch;
        rq->new_watch = NULL;
    }
}
