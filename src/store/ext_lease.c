/*
 * The lease keeper of the external store backends (ext.h): leases by the user's id, kept alive
 * by one thread, re-granted with their keys re-published when the store lost them.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/thread.h"
#include "store/ext.h"

static uint64_t ka_interval(const ext_lease_t *l)
{
    return l->ttl_ms / 3 ? l->ttl_ms / 3 : 1;
}

static void key_free(ext_key_t *k)
{
    free(k->key);
    free(k->val);
    free(k);
}

static void lease_free(ext_lease_t *l)
{
    while (l->keys) {
        ext_key_t *k = l->keys;
        l->keys = k->next;
        key_free(k);
    }
    free(l);
}

static ext_lease_t *find_locked(ext_keeper_t *k, uint64_t cid)
{
    ext_lease_t *l;
    for (l = k->leases; l && l->cid != cid; l = l->next)
        ;
    return l;
}

static ext_lease_t *unlink_locked(ext_keeper_t *k, uint64_t cid)
{
    for (ext_lease_t **pp = &k->leases; *pp; pp = &(*pp)->next) {
        if ((*pp)->cid == cid) {
            ext_lease_t *l = *pp;
            *pp = l->next;
            return l;
        }
    }
    return NULL;
}

/* Drop @key from every lease's key list, so a later loss of that lease does not bring it back. */
static void forget_locked(ext_keeper_t *k, const char *key)
{
    for (ext_lease_t *l = k->leases; l; l = l->next) {
        for (ext_key_t **pp = &l->keys; *pp; pp = &(*pp)->next) {
            if (strcmp((*pp)->key, key) == 0) {
                ext_key_t *d = *pp;
                *pp = d->next;
                key_free(d);
                break;
            }
        }
    }
}

/* The store lost @l: grant a new lease and re-publish its keys under it (mu held). */
static void regrant_locked(ext_keeper_t *k, ext_lease_t *l, uint64_t now)
{
    uint64_t sid = 0;
    int rc = k->ops->grant(k->be, l->ttl_ms, &sid);
    if (rc < 0) {
        KVF_DEBUG("store", "%s: re-grant of lease %" PRIu64 ": %s", k->url, l->cid,
                  kvf_last_error());
        l->due_ms = now + EXT_RETRY_MS;
        return;
    }
    l->sid = sid;
    l->lost = false;
    for (ext_key_t *e = l->keys; e; e = e->next) {
        rc = k->ops->put(k->be, e->key, e->val, e->len, l);
        if (rc < 0) {
            KVF_DEBUG("store", "%s: re-publish of %s: %s", k->url, e->key, kvf_last_error());
            l->lost = true; /* try the whole lease again */
            l->due_ms = now + EXT_RETRY_MS;
            return;
        }
    }
    KVF_INFO("store", "%s: lease %" PRIu64 " re-granted, %s keys re-published", k->url, l->cid,
             l->keys ? "its" : "no");
    l->due_ms = kvf__now_ms() + ka_interval(l);
}

static void *keeper_main(void *arg)
{
    ext_keeper_t *k = arg;
    pthread_mutex_lock(&k->mu);
    while (!k->closing) {
        uint64_t now = kvf__now_ms(), next = now + 1000;
        for (ext_lease_t *l = k->leases; l && !k->closing; l = l->next) {
            if (l->stopped)
                continue;
            if (l->due_ms <= now) {
                if (l->lost) {
                    regrant_locked(k, l, now);
                } else {
                    int rc = k->ops->keepalive(k->be, l);
                    now = kvf__now_ms();
                    if (rc == -KVF_ENOTFOUND) {
                        KVF_INFO("store", "%s: the store lost lease %" PRIu64 "; re-granting",
                                 k->url, l->cid);
                        l->lost = true;
                        regrant_locked(k, l, now);
                    } else {
                        /* Unreachable: retry soon, well within the TTL. */
                        l->due_ms = now + (rc < 0 ? (ka_interval(l) < EXT_RETRY_MS
                                                          ? ka_interval(l)
                                                          : EXT_RETRY_MS)
                                                   : ka_interval(l));
                    }
                }
                now = kvf__now_ms();
            }
            if (!l->stopped && l->due_ms < next)
                next = l->due_ms;
        }
        if (k->closing)
            break;
        struct timespec ts;
        kvf__deadline_ts(&ts, next);
        pthread_cond_timedwait(&k->cond, &k->mu, &ts);
    }
    pthread_mutex_unlock(&k->mu);
    return NULL;
}

int kvf__ext_keeper_start(ext_keeper_t *k, const ext_lease_ops_t *ops, void *be, const char *url)
{
    memset(k, 0, sizeof(*k));
    k->ops = ops;
    k->be = be;
    k->url = url;
    k->next_cid = 1;
    pthread_mutex_init(&k->mu, NULL);
    int rc = kvf__cond_init_monotonic(&k->cond);
    if (rc < 0) {
        pthread_mutex_destroy(&k->mu);
        return kvf__err(rc, "store %s: pthread_cond_init: %s", url, kvf_strerror(rc));
    }
    rc = kvf__thread_start(&k->th, "kvf-store-lease", 0, keeper_main, k);
    if (rc < 0) {
        pthread_cond_destroy(&k->cond);
        pthread_mutex_destroy(&k->mu);
        return kvf__err(rc, "store %s: cannot start the lease thread: %s", url, kvf_strerror(rc));
    }
    k->started = true;
    return 0;
}

void kvf__ext_keeper_stop(ext_keeper_t *k, bool revoke)
{
    if (!k->started)
        return;
    pthread_mutex_lock(&k->mu);
    k->closing = true;
    pthread_cond_broadcast(&k->cond);
    pthread_mutex_unlock(&k->mu);
    pthread_join(k->th, NULL);
    while (k->leases) {
        ext_lease_t *l = k->leases;
        k->leases = l->next;
        if (revoke && !l->lost && !l->stopped && k->ops->revoke(k->be, l) < 0)
            KVF_DEBUG("store", "%s: on close: %s", k->url, kvf_last_error());
        lease_free(l);
    }
    pthread_cond_destroy(&k->cond);
    pthread_mutex_destroy(&k->mu);
    k->started = false;
}

int kvf__ext_lease_grant(ext_keeper_t *k, uint32_t ttl_ms, uint64_t *cid)
{
    int rc = kvf__ext_check_ttl(k->url, ttl_ms, cid);
    if (rc < 0)
        return rc;
    ext_lease_t *l = calloc(1, sizeof(*l));
    if (!l)
        return kvf__err(-KVF_ENOMEM, "store %s: lease grant (ttl %u ms): out of memory", k->url,
                        ttl_ms);
    l->ttl_ms = ttl_ms;
    pthread_mutex_lock(&k->mu);
    rc = k->ops->grant(k->be, ttl_ms, &l->sid);
    if (rc < 0) {
        pthread_mutex_unlock(&k->mu);
        free(l);
        return rc;
    }
    l->cid = k->next_cid++;
    l->due_ms = kvf__now_ms() + ka_interval(l);
    l->next = k->leases;
    k->leases = l;
    *cid = l->cid;
    pthread_cond_broadcast(&k->cond);
    pthread_mutex_unlock(&k->mu);
    return 0;
}

int kvf__ext_lease_keepalive_stop(ext_keeper_t *k, uint64_t cid)
{
    pthread_mutex_lock(&k->mu);
    ext_lease_t *l = find_locked(k, cid);
    if (!l) {
        pthread_mutex_unlock(&k->mu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: lease keepalive stop %" PRIu64 ": no such lease",
                        k->url, cid);
    }
    if (l->lost)
        lease_free(unlink_locked(k, cid)); /* nothing of it on the store to let expire */
    else
        l->stopped = true;
    pthread_mutex_unlock(&k->mu);
    return 0;
}

int kvf__ext_lease_revoke(ext_keeper_t *k, uint64_t cid)
{
    pthread_mutex_lock(&k->mu);
    ext_lease_t *l = unlink_locked(k, cid);
    if (!l) {
        pthread_mutex_unlock(&k->mu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: lease revoke %" PRIu64 ": no such lease", k->url,
                        cid);
    }
    int rc = 0;
    if (!l->lost) {
        rc = k->ops->revoke(k->be, l);
        if (rc == -KVF_ENOTFOUND) {
            rc = 0; /* it already expired, keys and all */
        } else if (rc < 0) {
            char cause[EXT_MSG_MAX * 2];
            snprintf(cause, sizeof(cause), "%s", kvf_last_error());
            rc = kvf__err(rc == -KVF_ETIMEDOUT ? rc : -KVF_ESTOREDOWN,
                          "%s; the lease is no longer kept alive and, unless the store did revoke "
                          "it, expires there within its TTL of %u ms, deleting its keys then",
                          cause, l->ttl_ms);
        }
    }
    pthread_mutex_unlock(&k->mu);
    lease_free(l);
    return rc;
}

int kvf__ext_put_begin(ext_keeper_t *k, const char *what, uint64_t cid, ext_lease_t **l)
{
    *l = NULL;
    if (!cid)
        return 0; /* no lease: nothing to keep in step, writes run in parallel */
    pthread_mutex_lock(&k->mu);
    *l = find_locked(k, cid);
    if (!*l) {
        pthread_mutex_unlock(&k->mu);
        return kvf__err(-KVF_ENOTFOUND,
                        "store %s: %s: lease %" PRIu64 " is not held by this client "
                        "(revoked, expired or never granted)",
                        k->url, what, cid);
    }
    if ((*l)->lost) {
        /* Not on the store now: re-grant it first so that the key is bound to a live lease. */
        regrant_locked(k, *l, kvf__now_ms());
        if ((*l)->lost) {
            char cause[EXT_MSG_MAX * 2];
            snprintf(cause, sizeof(cause), "%s", kvf_last_error());
            pthread_mutex_unlock(&k->mu);
            return kvf__err(-KVF_ESTOREDOWN, "store %s: %s: lease %" PRIu64
                            " could not be re-granted: %s", k->url, what, cid, cause);
        }
    }
    return 0;
}

void kvf__ext_put_end(ext_keeper_t *k, int rc, const char *key, const void *val, size_t len,
                      ext_lease_t *l)
{
    if (!l)
        pthread_mutex_lock(&k->mu);
    if (rc == 0) {
        forget_locked(k, key);
        ext_key_t *e = l ? calloc(1, sizeof(*e)) : NULL;
        if (e) {
            e->key = strdup(key);
            e->val = kvf__ext_dup(val, len);
            e->len = len;
            if (!e->key || !e->val) {
                KVF_WARN("store", "%s: out of memory: %s will not be re-published", k->url, key);
                key_free(e);
            } else {
                e->next = l->keys;
                l->keys = e;
            }
        } else if (l) {
            KVF_WARN("store", "%s: out of memory: %s will not be re-published", k->url, key);
        }
    }
    pthread_mutex_unlock(&k->mu);
}

int kvf__ext_regrant_locked(ext_keeper_t *k, ext_lease_t *l)
{
    l->lost = true;
    regrant_locked(k, l, kvf__now_ms());
    if (l->lost)
        return kvf__err(-KVF_ESTOREDOWN, "store %s: lease %" PRIu64 " was lost by the store and "
                        "could not be re-granted", k->url, l->cid);
    return 0;
}

void kvf__ext_forget_key(ext_keeper_t *k, const char *key)
{
    pthread_mutex_lock(&k->mu);
    forget_locked(k, key);
    pthread_mutex_unlock(&k->mu);
}
