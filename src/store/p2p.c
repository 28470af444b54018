/*
 * The p2p:// backend: no store at all. What this process sets is kept here, in memory (an
 * engine's own session and regions records, which its tcp target answers to peers that ask);
 * a get of a key this handle does not hold is asked of the engine the key names (the session id
 * after its last '/') with the P2P record request of common/p2p.h, on that engine's session
 * port. A get-with-wait asks again until the engine answers or the wait ends, so an engine that
 * starts later is found as it would be through a store.
 *
 * What a directory would give and this cannot: watch (there is nothing to watch: -KVF_ENOTSUP,
 * which the engine's peer events report), and list, del, cas and add see this handle's own keys
 * only. Leases are local: revoking one deletes its keys here; nothing expires, since nobody else
 * holds the keys (a peer that dies simply stops answering).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/common.h"
#include "common/p2p.h"
#include "store/ext.h"
#include "store/store.h"

#define P2P_LOG "p2p"
/* Between two asks of an engine that is not up yet (a get-with-wait). */
#define P2P_RETRY_MS 20u
/* Keys this handle holds: an engine sets two. */
#define P2P_MAX_KEYS 4096u

typedef struct p2p_kv {
    struct p2p_kv *next;
    char *key;
    void *val;
    size_t len;
    uint64_t lease;
} p2p_kv_t;

typedef struct {
    kvf_store_base_t base;
    char *url;
    uint32_t connect_timeout_ms;
    uint32_t request_timeout_ms;
    kvf_auth_key_t auth;                  /* the cluster secret the asks prove (len 0: none) */
    kvf_tls_ctx_t *tls;                   /* TLS to the engines asked (opts->tls), or NULL */
    char ident[KVF_AUTH_MAX_ID + 1];      /* the session this handle speaks for, or "" */
    pthread_mutex_t mu; /* keys, nkeys, next_lease */
    p2p_kv_t *keys;
    size_t nkeys;
    uint64_t next_lease;
} p2p_store_t;

static p2p_store_t *p2p_of(kvf_store_t *st)
{
    return (p2p_store_t *)(void *)st;
}

static int p2p_open(const char *url, const kvf_store_url_t *addr, const kvf_store_opts_t *opts,
                    kvf_store_t **out)
{
    (void)addr;
    p2p_store_t *s = calloc(1, sizeof(*s));
    if (!s || !(s->url = strdup(url))) {
        free(s);
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    }
    s->base.ops = &kvf__store_p2p_ops;
    s->base.url = s->url;
    s->connect_timeout_ms = opts->connect_timeout_ms;
    s->request_timeout_ms = opts->request_timeout_ms;
    s->next_lease = 1;
    /* The engines asked have the cluster secret when this one has: asks prove it, as this
     * session (the engine answering sees whom it answers; nothing is decided by it). */
    int rc = kvf__auth_key_resolve(opts->auth_key_file, &s->auth);
    if (rc < 0) {
        kvf__err_wrap(rc, "store %s", url);
        free(s->url);
        free(s);
        return rc;
    }
    /* The asks go to the engines' data ports: with TLS options they are TLS, as the engines'
     * data connections (kvf_config_t.data_tls, which an engine gives its p2p:// store). */
    if (kvf__tls_on(opts->tls)) {
        rc = kvf__tls_ctx_new(opts->tls, false, NULL, &s->tls);
        if (rc < 0) {
            kvf__err_wrap(rc, "store %s", url);
            kvf__auth_key_wipe(&s->auth);
            free(s->url);
            free(s);
            return rc;
        }
        kvf__tls_ctx_set_peer(s->tls, "engine");
    }
    if (opts->session_id && strlen(opts->session_id) < sizeof(s->ident))
        snprintf(s->ident, sizeof(s->ident), "%s", opts->session_id);
    pthread_mutex_init(&s->mu, NULL);
    *out = (kvf_store_t *)(void *)s;
    return 0;
}

static void kv_free(p2p_kv_t *kv)
{
    free(kv->key);
    free(kv->val);
    free(kv);
}

static void p2p_close(kvf_store_t *st)
{
    p2p_store_t *s = p2p_of(st);
    while (s->keys) {
        p2p_kv_t *kv = s->keys;
        s->keys = kv->next;
        kv_free(kv);
    }
    pthread_mutex_destroy(&s->mu);
    kvf__auth_key_wipe(&s->auth);
    kvf__tls_ctx_free(s->tls);
    free(s->url);
    free(s);
}

/* The entry for @key, under mu; @prev receives the link that points at it. */
static p2p_kv_t *find(p2p_store_t *s, const char *key, p2p_kv_t ***prev)
{
    p2p_kv_t **pp = &s->keys;
    for (; *pp; pp = &(*pp)->next)
        if (!strcmp((*pp)->key, key))
            break;
    if (prev)
        *prev = pp;
    return *pp;
}

/* Set @key to @val under mu (insert or replace). */
static int put_locked(p2p_store_t *s, const char *key, const void *val, size_t len,
                      uint64_t lease)
{
    void *copy = kvf__ext_dup(val, len);
    if (!copy)
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory for %s", s->url, key);
    p2p_kv_t *kv = find(s, key, NULL);
    if (!kv) {
        if (s->nkeys >= P2P_MAX_KEYS) {
            free(copy);
            return kvf__err(-KVF_ETOOBIG, "store %s: this process already holds %u keys", s->url,
                            P2P_MAX_KEYS);
        }
        kv = calloc(1, sizeof(*kv));
        if (!kv || !(kv->key = strdup(key))) {
            free(kv);
            free(copy);
            return kvf__err(-KVF_ENOMEM, "store %s: out of memory for %s", s->url, key);
        }
        kv->next = s->keys;
        s->keys = kv;
        s->nkeys++;
    }
    free(kv->val);
    kv->val = copy;
    kv->len = len;
    kv->lease = lease;
    return 0;
}

static int p2p_set(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease)
{
    p2p_store_t *s = p2p_of(st);
    int rc = kvf__ext_check_key(s->url, "set", key, false);
    if (rc == 0)
        rc = kvf__ext_check_value(s->url, "set", "value", val, len);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&s->mu);
    rc = put_locked(s, key, val, len, lease);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* A copy of what this handle holds for @key: 0, or -KVF_ENOTFOUND (no message). */
static int get_local(p2p_store_t *s, const char *key, void **val, size_t *len)
{
    int rc = -KVF_ENOTFOUND;
    pthread_mutex_lock(&s->mu);
    p2p_kv_t *kv = find(s, key, NULL);
    if (kv) {
        *val = kvf__ext_dup(kv->val, kv->len);
        *len = kv->len;
        rc = *val ? 0 : kvf__err(-KVF_ENOMEM, "store %s: out of memory", s->url);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static void sleep_ms(uint64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000u), (long)(ms % 1000u) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static int p2p_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len)
{
    p2p_store_t *s = p2p_of(st);
    if (!val || !len)
        return kvf__err(-KVF_EINVAL, "store %s: get: the output pointers are NULL", s->url);
    int rc = kvf__ext_check_key(s->url, "get", key, false);
    if (rc < 0)
        return rc;
    *val = NULL;
    *len = 0;
    rc = get_local(s, key, val, len);
    if (rc != -KVF_ENOTFOUND)
        return rc;
    kvf_hostport_t hp;
    if (kvf__p2p_sid_of_key(key, &hp) < 0) {
        if (wait_ms)
            return kvf__err(-KVF_ETIMEDOUT, "store %s: get \"%s\": this process does not hold it "
                            "and it names no session to ask", s->url, key);
        return kvf__err(-KVF_ENOTFOUND, "store %s: get \"%s\": not found", s->url, key);
    }
    const char *sid = strrchr(key, '/') + 1;
    uint64_t now = kvf__now_ms();
    uint64_t end = now + wait_ms;
    /* What the engine itself last answered ("holds no record ..."): the reason a failed wait
     * gives, even when the ask that the wait's end cut short only timed out. */
    char answered[512] = "";
    for (;;) {
        /* One ask gets the request timeout (an engine that accepted but does not answer), but
         * never runs past the end of a wait that is longer. */
        uint64_t bound = now + (s->request_timeout_ms ? s->request_timeout_ms
                                                      : KVF_P2P_REQ_TIMEOUT_MS);
        rc = kvf__p2p_fetch(&hp, sid, &s->auth, s->tls, s->ident, key,
                            wait_ms && end > now && end < bound ? end : bound, val, len);
        /* Only "not up yet" and "holds no such record yet" are asked again. */
        bool again = rc == -ECONNREFUSED || rc == -KVF_ENOTFOUND || rc == -KVF_ETIMEDOUT ||
                     rc == -ECONNRESET;
        now = kvf__now_ms();
        if (rc == 0 || !again)
            return rc;
        if (rc == -KVF_ENOTFOUND)
            snprintf(answered, sizeof(answered), "%s", kvf_last_error());
        if (now >= end) {
            const char *why = answered[0] ? answered : kvf_last_error();
            if (!wait_ms)
                return kvf__err(-KVF_ENOTFOUND, "store %s: get \"%s\": %s", s->url, key, why);
            return kvf__err(-KVF_ETIMEDOUT, "store %s: get \"%s\": not there within %u ms: %s",
                            s->url, key, wait_ms, why);
        }
        sleep_ms(end - now < P2P_RETRY_MS ? end - now : P2P_RETRY_MS);
        now = kvf__now_ms();
    }
}

static int p2p_del(kvf_store_t *st, const char *key)
{
    p2p_store_t *s = p2p_of(st);
    int rc = kvf__ext_check_key(s->url, "del", key, false);
    if (rc < 0)
        return rc;
    p2p_kv_t **prev;
    pthread_mutex_lock(&s->mu);
    p2p_kv_t *kv = find(s, key, &prev);
    if (kv) {
        *prev = kv->next;
        kv_free(kv);
        s->nkeys--;
    }
    pthread_mutex_unlock(&s->mu);
    return kv ? 0 : kvf__err(-KVF_ENOTFOUND, "store %s: del \"%s\": not found", s->url, key);
}

static int p2p_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
                   const void *val, size_t len, uint64_t lease)
{
    p2p_store_t *s = p2p_of(st);
    int rc = kvf__ext_check_key(s->url, "cas", key, false);
    if (rc == 0)
        rc = kvf__ext_check_value(s->url, "cas", "value", val, len);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&s->mu);
    p2p_kv_t *kv = find(s, key, NULL);
    if (expected ? !kv || kv->len != expected_len || memcmp(kv->val, expected, expected_len)
                 : kv != NULL)
        rc = kvf__err(-KVF_ECASMISMATCH, "store %s: cas \"%s\": the value is not the expected one",
                      s->url, key);
    else
        rc = put_locked(s, key, val, len, lease);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int p2p_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result)
{
    p2p_store_t *s = p2p_of(st);
    int rc = kvf__ext_check_key(s->url, "add", key, false);
    if (rc < 0)
        return rc;
    int64_t v = 0;
    pthread_mutex_lock(&s->mu);
    p2p_kv_t *kv = find(s, key, NULL);
    if (kv)
        rc = kvf__ext_parse_counter(kv->val, kv->len, &v);
    if (rc == 0 && ((delta > 0 && v > INT64_MAX - delta) || (delta < 0 && v < INT64_MIN - delta)))
        rc = kvf__err(-KVF_ERANGE, "store %s: add \"%s\": overflow", s->url, key);
    if (rc == 0) {
        char text[24];
        v += delta;
        snprintf(text, sizeof(text), "%lld", (long long)v);
        rc = put_locked(s, key, text, strlen(text), kv ? kv->lease : 0);
    }
    pthread_mutex_unlock(&s->mu);
    if (rc == 0 && result)
        *result = v;
    return rc;
}

static int p2p_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    p2p_store_t *s = p2p_of(st);
    if (!out || !count)
        return kvf__err(-KVF_EINVAL, "store %s: list: the output pointers are NULL", s->url);
    if (!prefix)
        prefix = "";
    size_t pl = strlen(prefix), n = 0;
    int rc = 0;
    pthread_mutex_lock(&s->mu);
    kvf_store_kv_t *a = calloc(s->nkeys ? s->nkeys : 1, sizeof(*a));
    for (p2p_kv_t *kv = s->keys; a && kv; kv = kv->next) {
        if (strncmp(kv->key, prefix, pl))
            continue;
        a[n].key = strdup(kv->key);
        a[n].val = kvf__ext_dup(kv->val, kv->len);
        a[n].val_len = kv->len;
        n++;
        if (!a[n - 1].key || !a[n - 1].val) {
            rc = -KVF_ENOMEM;
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    if (!a || rc) {
        if (a)
            kvf_store_kv_free(a, n);
        return kvf__err(-KVF_ENOMEM, "store %s: list: out of memory", s->url);
    }
    /* Byte order, as every backend lists. */
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(a[j - 1].key, a[j].key) > 0; j--) {
            kvf_store_kv_t t = a[j];
            a[j] = a[j - 1];
            a[j - 1] = t;
        }
    *out = a;
    *count = n;
    return 0;
}

static int p2p_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                     uint64_t *watch_id)
{
    (void)prefix;
    (void)cb;
    (void)arg;
    (void)watch_id;
    return kvf__err(-KVF_ENOTSUP,
                    "store %s: no store, so nothing tells of sessions coming and going; use a "
                    "store (tcp://, etcd://, redis://) to watch",
                    p2p_of(st)->url);
}

static int p2p_unwatch(kvf_store_t *st, uint64_t watch_id)
{
    return kvf__err(-KVF_ENOTFOUND, "store %s: unwatch: no watch %llu", p2p_of(st)->url,
                    (unsigned long long)watch_id);
}

static int p2p_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease)
{
    p2p_store_t *s = p2p_of(st);
    int rc = kvf__ext_check_ttl(s->url, ttl_ms, lease);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&s->mu);
    *lease = s->next_lease++;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static int p2p_lease_keepalive_stop(kvf_store_t *st, uint64_t lease)
{
    (void)st;
    (void)lease;
    return 0;
}

static int p2p_lease_revoke(kvf_store_t *st, uint64_t lease)
{
    p2p_store_t *s = p2p_of(st);
    pthread_mutex_lock(&s->mu);
    for (p2p_kv_t **pp = &s->keys; *pp;) {
        p2p_kv_t *kv = *pp;
        if (lease && kv->lease == lease) {
            *pp = kv->next;
            kv_free(kv);
            s->nkeys--;
        } else {
            pp = &kv->next;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static int p2p_ping(kvf_store_t *st)
{
    (void)st;
    return 0;
}

const kvf_store_ops_t kvf__store_p2p_ops = {
    .size = sizeof(kvf_store_ops_t),
    .name = "p2p",
    .open = p2p_open,
    .close = p2p_close,
    .set = p2p_set,
    .get = p2p_get,
    .del = p2p_del,
    .cas = p2p_cas,
    .add = p2p_add,
    .list = p2p_list,
    .list_page = NULL,
    .watch = p2p_watch,
    .unwatch = p2p_unwatch,
    .lease_grant = p2p_lease_grant,
    .lease_keepalive_stop = p2p_lease_keepalive_stop,
    .lease_revoke = p2p_lease_revoke,
    .ping = p2p_ping,
};
