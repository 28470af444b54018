/*
 * The etcd backend (etcd://host:port[,host:port...]): the store operations on etcd v3's JSON
 * gateway, and the backend's ops table. etcd.h describes how it works.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/tls.h"
#include "store/etcd.h"
#include "store/limits.h"

#define ETCD(st) ((etcd_t *)(void *)(st))
/* Attempts of an add() whose read-modify-write loses a race, before it gives up (-KVF_EBUSY). */
#define ETCD_ADD_ATTEMPTS 64

static uint64_t req_ms(const etcd_t *e)
{
    return e->opts.request_timeout_ms;
}

/* {"key": base64(key)}, plus more fields by the caller; NULL when out of memory. */
static json_t *key_obj(const char *key)
{
    char *k = kvf__etcd_b64(key, strlen(key));
    json_t *o = k ? json_object() : NULL;
    if (o && json_object_set_new(o, "key", json_string(k)) < 0) {
        json_decref(o);
        o = NULL;
    }
    free(k);
    return o;
}

static int set_b64(json_t *o, const char *field, const void *p, size_t n)
{
    char *b = kvf__etcd_b64(p ? p : "", p ? n : 0);
    int rc = b ? json_object_set_new(o, field, json_string(b)) : -1;
    free(b);
    return rc;
}

static int nomem(const etcd_t *e, const char *what)
{
    return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
}

/* The value of the first kv of a range answer; 1 when there is none. */
static int first_value(const etcd_t *e, const char *what, json_t *resp, void **val, size_t *len,
                       int64_t *mod_rev)
{
    json_t *kv = json_array_get(json_object_get(resp, "kvs"), 0);
    if (!kv)
        return 1;
    const char *v = json_string_value(json_object_get(kv, "value"));
    if (mod_rev)
        *mod_rev = kvf__etcd_get_num(kv, "mod_revision");
    int rc = kvf__etcd_unb64(v ? v : "", val, len);
    if (rc < 0)
        return kvf__err(rc, "store %s: %s: the gateway sent a value that is not base64", e->url,
                        what);
    return 0;
}

/* ---- puts ------------------------------------------------------------------------------------ */

/* A put of @key (under etcd lease @sid when non-zero). */
static int put_raw(etcd_t *e, const char *what, const char *key, const void *val, size_t len,
                   uint64_t sid)
{
    json_t *b = key_obj(key);
    if (!b || set_b64(b, "value", val, len) < 0 ||
        (sid && json_object_set_new(b, "lease", kvf__etcd_num((int64_t)sid)) < 0)) {
        json_decref(b);
        return nomem(e, what);
    }
    json_t *r = NULL;
    int rc = kvf__etcd_post(e, "/v3/kv/put", b, what, req_ms(e), &r);
    json_decref(r);
    return rc;
}

/* A compare-and-put: 0 when swapped, 1 when the compare failed. */
static int cas_raw(etcd_t *e, const char *what, const char *key, const void *expected,
                   size_t expected_len, const void *val, size_t len, uint64_t sid)
{
    json_t *cmp = key_obj(key), *put = key_obj(key), *body = json_object();
    json_t *rp = json_object();
    int bad = !cmp || !put || !body || !rp;
    if (!bad && expected) {
        bad |= json_object_set_new(cmp, "target", json_string("VALUE")) < 0;
        bad |= set_b64(cmp, "value", expected, expected_len) < 0;
    } else if (!bad) {
        bad |= json_object_set_new(cmp, "target", json_string("CREATE")) < 0;
        bad |= json_object_set_new(cmp, "create_revision", kvf__etcd_num(0)) < 0;
    }
    if (!bad) {
        bad |= json_object_set_new(cmp, "result", json_string("EQUAL")) < 0;
        bad |= set_b64(put, "value", val, len) < 0;
        if (sid)
            bad |= json_object_set_new(put, "lease", kvf__etcd_num((int64_t)sid)) < 0;
        bad |= json_object_set_new(rp, "request_put", put) < 0;
        put = NULL;
        bad |= json_object_set_new(body, "compare", json_pack("[o]", cmp)) < 0;
        cmp = NULL;
        bad |= json_object_set_new(body, "success", json_pack("[o]", rp)) < 0;
        rp = NULL;
    }
    json_decref(cmp);
    json_decref(put);
    json_decref(rp);
    if (bad) {
        json_decref(body);
        return nomem(e, what);
    }
    json_t *r = NULL;
    int rc = kvf__etcd_post(e, "/v3/kv/txn", body, what, req_ms(e), &r);
    if (rc == 0)
        rc = json_is_true(json_object_get(r, "succeeded")) ? 0 : 1;
    json_decref(r);
    return rc;
}

/* set and cas, under the lease keeper's lock so that a re-grant does not run in between. */
static int put_leased(etcd_t *e, const char *what, const char *key, bool cas, const void *expected,
                      size_t expected_len, const void *val, size_t len, uint64_t lease)
{
    ext_lease_t *l;
    int rc = kvf__ext_put_begin(&e->keeper, what, lease, &l);
    if (rc < 0)
        return rc;
    for (int attempt = 0;; attempt++) {
        uint64_t sid = l ? l->sid : 0;
        rc = cas ? cas_raw(e, what, key, expected, expected_len, val, len, sid)
                 : put_raw(e, what, key, val, len, sid);
        /* "requested lease not found": etcd lost the lease before the keeper noticed. */
        if (rc != -KVF_ENOTFOUND || !l || attempt > 0)
            break;
        rc = kvf__ext_regrant_locked(&e->keeper, l);
        if (rc < 0)
            break;
    }
    if (rc == 1)
        rc = kvf__err(-KVF_ECASMISMATCH, "store %s: %s: %s", e->url, what,
                      expected ? "the current value differs" : "the key exists");
    kvf__ext_put_end(&e->keeper, rc, key, val, len, l);
    return rc;
}

static int etcd_set(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease)
{
    etcd_t *e = ETCD(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(e->url, "set", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "set", key);
    rc = kvf__ext_check_value(e->url, what, "value", val, len);
    if (rc < 0)
        return rc;
    return put_leased(e, what, key, false, NULL, 0, val, len, lease);
}

static int etcd_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
                    const void *val, size_t len, uint64_t lease)
{
    etcd_t *e = ETCD(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(e->url, "cas", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "cas", key);
    if (expected)
        rc = kvf__ext_check_value(e->url, what, "expected value", expected, expected_len);
    if (rc == 0)
        rc = kvf__ext_check_value(e->url, what, "value", val, len);
    if (rc < 0)
        return rc;
    return put_leased(e, what, key, true, expected, expected_len, val, len, lease);
}

/* ---- reads ----------------------------------------------------------------------------------- */

static int etcd_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len)
{
    etcd_t *e = ETCD(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(e->url, "get", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "get", key);
    if (!val || !len)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", e->url, what);
    *val = NULL;
    *len = 0;
    if (wait_ms > KVF_STORE_MAX_WAIT_MS)
        return kvf__err(-KVF_EINVAL, "store %s: %s: wait of %u ms exceeds the %u ms limit", e->url,
                        what, wait_ms, KVF_STORE_MAX_WAIT_MS);
    uint64_t deadline = kvf__now_ms() + wait_ms;
    json_t *b = key_obj(key), *r = NULL;
    if (!b)
        return nomem(e, what);
    rc = kvf__etcd_post(e, "/v3/kv/range", b, what, req_ms(e), &r);
    if (rc < 0)
        return rc;
    rc = first_value(e, what, r, val, len, NULL);
    json_decref(r);
    if (rc <= 0)
        return rc;
    if (wait_ms == 0)
        return kvf__err(-KVF_ENOTFOUND, "store %s: %s: not found", e->url, what);
    /* A watch, then a read once it is in place: no put is missed. */
    rc = kvf__etcd_wait_put(e, key, deadline, what, val, len);
    if (rc == -KVF_ETIMEDOUT)
        rc = kvf__err(rc, "store %s: %s: still absent after waiting %u ms", e->url, what, wait_ms);
    return rc;
}

static int etcd_del(kvf_store_t *st, const char *key)
{
    etcd_t *e = ETCD(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(e->url, "del", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "del", key);
    json_t *b = key_obj(key), *r = NULL;
    if (!b)
        return nomem(e, what);
    kvf__ext_forget_key(&e->keeper, key);
    rc = kvf__etcd_post(e, "/v3/kv/deleterange", b, what, req_ms(e), &r);
    if (rc == 0 && kvf__etcd_get_num(r, "deleted") == 0)
        rc = kvf__err(-KVF_ENOTFOUND, "store %s: %s: not found", e->url, what);
    json_decref(r);
    return rc;
}

static int etcd_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result)
{
    etcd_t *e = ETCD(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(e->url, "add", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "add", key);
    /* Read, add, and write back only if nobody wrote in between (same mod revision; 0 = still
     * absent); an existing key keeps its lease (ignore_lease). */
    for (int attempt = 0; attempt < ETCD_ADD_ATTEMPTS; attempt++) {
        json_t *b = key_obj(key), *r = NULL;
        if (!b)
            return nomem(e, what);
        rc = kvf__etcd_post(e, "/v3/kv/range", b, what, req_ms(e), &r);
        if (rc < 0)
            return rc;
        void *v = NULL;
        size_t vlen = 0;
        int64_t mod = 0, cur = 0, sum;
        rc = first_value(e, what, r, &v, &vlen, &mod);
        json_decref(r);
        if (rc < 0)
            return rc;
        if (rc == 0) {
            int prc = kvf__ext_parse_counter(v, vlen, &cur);
            free(v);
            if (prc < 0)
                return kvf__err(-KVF_EBADVALUE, "store %s: %s: value of %zu bytes is not a "
                                "decimal int64", e->url, what, vlen);
        }
        if (__builtin_add_overflow(cur, delta, &sum))
            return kvf__err(-KVF_ERANGE, "store %s: %s: %" PRId64 " + %" PRId64 " overflows int64",
                            e->url, what, cur, delta);
        char text[24];
        int n = snprintf(text, sizeof(text), "%" PRId64, sum);
        json_t *cmp = key_obj(key), *put = key_obj(key), *body = json_object();
        if (!cmp || !put || !body) {
            json_decref(cmp);
            json_decref(put);
            json_decref(body);
            return nomem(e, what);
        }
        json_object_set_new(cmp, "target", json_string("MOD"));
        json_object_set_new(cmp, "result", json_string("EQUAL"));
        json_object_set_new(cmp, "mod_revision", kvf__etcd_num(mod));
        set_b64(put, "value", text, (size_t)n);
        if (mod)
            json_object_set_new(put, "ignore_lease", json_true());
        json_object_set_new(body, "compare", json_pack("[o]", cmp));
        json_object_set_new(body, "success", json_pack("[{s:o}]", "request_put", put));
        rc = kvf__etcd_post(e, "/v3/kv/txn", body, what, req_ms(e), &r);
        if (rc < 0)
            return rc;
        bool ok = json_is_true(json_object_get(r, "succeeded"));
        json_decref(r);
        if (ok) {
            kvf__ext_forget_key(&e->keeper, key);
            if (result)
                *result = sum;
            return 0;
        }
    }
    return kvf__err(-KVF_EBUSY, "store %s: %s: lost the race to other writers %d times", e->url,
                    what, ETCD_ADD_ATTEMPTS);
}

static int etcd_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    return kvf__etcd_list(ETCD(st), prefix, out, count);
}

/* ---- leases ---------------------------------------------------------------------------------- */

static int lk_grant(void *be, uint32_t ttl_ms, uint64_t *sid)
{
    etcd_t *e = be;
    json_t *r = NULL;
    int64_t secs = ((int64_t)ttl_ms + 999) / 1000;
    int rc = kvf__etcd_post(e, "/v3/lease/grant", json_pack("{s:o}", "TTL", kvf__etcd_num(secs)),
                            "lease grant", req_ms(e), &r);
    if (rc == 0) {
        *sid = (uint64_t)kvf__etcd_get_num(r, "ID");
        if (!*sid)
            rc = kvf__err(-KVF_EPROTO, "store %s: lease grant: no lease id in the answer", e->url);
    }
    json_decref(r);
    return rc;
}

static int lk_keepalive(void *be, const ext_lease_t *l)
{
    etcd_t *e = be;
    json_t *r = NULL;
    int rc = kvf__etcd_post(e, "/v3/lease/keepalive",
                            json_pack("{s:o}", "ID", kvf__etcd_num((int64_t)l->sid)),
                            "lease keepalive", req_ms(e), &r);
    /* A lease etcd does not have is answered with TTL 0 (left out of the JSON). */
    if (rc == 0 && kvf__etcd_get_num(r, "TTL") <= 0)
        rc = -KVF_ENOTFOUND;
    json_decref(r);
    return rc;
}

static int lk_revoke(void *be, const ext_lease_t *l)
{
    etcd_t *e = be;
    json_t *r = NULL;
    char what[64];
    snprintf(what, sizeof(what), "lease revoke %" PRIu64, l->cid);
    /* On close, all within a short time, as the built-in client does. */
    int rc = kvf__etcd_post(e, "/v3/lease/revoke",
                            json_pack("{s:o}", "ID", kvf__etcd_num((int64_t)l->sid)), what,
                            e->keeper.closing ? CLI_CLOSE_REVOKE_MS : req_ms(e), &r);
    json_decref(r);
    return rc;
}

static int lk_put(void *be, const char *key, const void *val, size_t len, const ext_lease_t *l)
{
    return put_raw(be, "re-publish", key, val, len, l->sid);
}

static const ext_lease_ops_t etcd_lease_ops = {
    .grant = lk_grant, .keepalive = lk_keepalive, .revoke = lk_revoke, .put = lk_put,
};

static int etcd_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease)
{
    return kvf__ext_lease_grant(&ETCD(st)->keeper, ttl_ms, lease);
}

static int etcd_lease_keepalive_stop(kvf_store_t *st, uint64_t lease)
{
    return kvf__ext_lease_keepalive_stop(&ETCD(st)->keeper, lease);
}

static int etcd_lease_revoke(kvf_store_t *st, uint64_t lease)
{
    return kvf__ext_lease_revoke(&ETCD(st)->keeper, lease);
}

static int etcd_ping(kvf_store_t *st)
{
    etcd_t *e = ETCD(st);
    json_t *r = NULL;
    int rc = kvf__etcd_post(e, "/v3/maintenance/status", json_object(), "ping", req_ms(e), &r);
    json_decref(r);
    return rc;
}

static int etcd_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                      uint64_t *watch_id)
{
    return kvf__etcd_watch(ETCD(st), prefix, cb, arg, watch_id);
}

static int etcd_unwatch(kvf_store_t *st, uint64_t watch_id)
{
    return kvf__etcd_unwatch(ETCD(st), watch_id);
}

/* ---- life ------------------------------------------------------------------------------------ */

static void etcd_free(etcd_t *e)
{
    kvf__etcd_pool_free(e);
    kvf__etcd_tls_free(e);
    for (unsigned i = 0; i < e->nends; i++)
        free(e->ends[i]);
    pthread_cond_destroy(&e->wcond);
    pthread_mutex_destroy(&e->wmu);
    pthread_mutex_destroy(&e->pool_mu);
    free(e->url);
    free(e);
}

/* The URL as shown in messages and by kvf_store_url(): the password never is. */
static char *shown_url(const char *url, const kvf_store_url_t *addr)
{
    if (!addr->password[0])
        return strdup(url);
    const char *at = strrchr(url, '@');
    size_t n = strlen(addr->user) + strlen(at) + 16;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "etcd://%s:***%s", addr->user, at);
    return s;
}

static int etcd_open(const char *url, const kvf_store_url_t *addr, const kvf_store_opts_t *opts,
                     kvf_store_t **out)
{
    if (kvf__etcd_curl_global() < 0)
        return kvf__err(-KVF_ENOMEM, "store %s: libcurl failed to initialise", url);
    etcd_t *e = calloc(1, sizeof(*e));
    if (!e)
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    e->url = shown_url(url, addr);
    e->opts = *opts;
    snprintf(e->user, sizeof(e->user), "%s", addr->user);
    snprintf(e->password, sizeof(e->password), "%s", addr->password);
    e->base.ops = &kvf__store_etcd_ops;
    e->base.url = e->url;
    e->next_wid = 1;
    pthread_mutex_init(&e->pool_mu, NULL);
    pthread_mutex_init(&e->wmu, NULL);
    kvf__cond_init_monotonic(&e->wcond);
    kvf_tls_opts_t tls_env;
    const kvf_tls_opts_t *to = kvf__tls_opts_resolve(opts->tls, &tls_env);
    e->opts.tls = NULL; /* the caller's; what is needed is copied */
    if (to && e->url) {
        int trc = kvf__etcd_tls_setup(e, to, addr->hosts[0].host);
        if (trc < 0) {
            etcd_free(e);
            return trc;
        }
    }
    for (unsigned i = 0; i < addr->nhosts; i++) {
        const kvf_hostport_t *h = &addr->hosts[i];
        char buf[KVF_HOST_MAX + 32];
        snprintf(buf, sizeof(buf), h->kind == KVF_HOST_IPV6 ? "%s://[%s]:%u" : "%s://%s:%u",
                 e->tls ? "https" : "http", h->host, (unsigned)h->port);
        e->ends[e->nends] = strdup(buf);
        if (e->ends[e->nends])
            e->nends++;
    }
    if (!e->url || e->nends != addr->nhosts) {
        etcd_free(e);
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    }
    /* Wait for the cluster like the built-in client waits for its store. */
    uint32_t ct = opts->connect_timeout_ms;
    json_t *r = NULL;
    int rc = kvf__etcd_post(e, "/v3/maintenance/status", json_object(), "open",
                            ct ? ct : opts->request_timeout_ms, &r);
    json_decref(r);
    if (rc == -KVF_ESTOREDOWN) {
        char cause[EXT_MSG_MAX * 2];
        snprintf(cause, sizeof(cause), "%s", kvf_last_error());
        const char *why = strstr(cause, "(last: ");
        rc = ct ? kvf__err(rc, "store %s: cannot connect within %u ms: %s", url, ct,
                           why ? why + 7 : cause)
                : kvf__err(rc, "store %s: cannot connect: %s", url, why ? why + 7 : cause);
        size_t n = strlen(kvf_last_error());
        if (n && kvf_last_error()[n - 1] == ')') /* drop the ")" of "(last: ...)" */
            kvf__err(rc, "%.*s", (int)(n - 1), kvf_last_error());
    }
    /* Credentials are checked now, not at the first request (status needs none). */
    if (rc == 0 && e->user[0])
        rc = kvf__etcd_authenticate(e, opts->request_timeout_ms);
    if (rc == 0)
        rc = kvf__ext_keeper_start(&e->keeper, &etcd_lease_ops, e, e->url);
    if (rc < 0) {
        etcd_free(e);
        return rc;
    }
    KVF_DEBUG("store", "%s: connected", url);
    *out = (kvf_store_t *)(void *)e;
    return 0;
}

static void etcd_close(kvf_store_t *st)
{
    etcd_t *e = ETCD(st);
    kvf__etcd_watch_stop_all(e);
    kvf__ext_keeper_stop(&e->keeper, true);
    KVF_DEBUG("store", "%s: closed", e->url);
    etcd_free(e);
}

const kvf_store_ops_t kvf__store_etcd_ops = {
    .size = sizeof(kvf_store_ops_t),
    .name = "etcd",
    .open = etcd_open,
    .close = etcd_close,
    .set = etcd_set,
    .get = etcd_get,
    .del = etcd_del,
    .cas = etcd_cas,
    .add = etcd_add,
    .list = etcd_list,
    .watch = etcd_watch,
    .unwatch = etcd_unwatch,
    .lease_grant = etcd_lease_grant,
    .lease_keepalive_stop = etcd_lease_keepalive_stop,
    .lease_revoke = etcd_lease_revoke,
    .ping = etcd_ping,
};
