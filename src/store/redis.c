/*
 * The Redis backend (redis://[user:password@]host:port[/db]): the store operations, its leases
 * and its ops table. redis.h describes how it works.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/tls.h"
#include "store/limits.h"
#include "store/redis.h"

#define REDIS(st) ((redis_t *)(void *)(st))

/*
 * Every write is a Lua script that also publishes what it did on the client's event channel
 * (kvf__redis_channel()), atomically with the write and in its order: "P" key NUL value for a
 * put, "D" key for a delete. Watches read these, so they report every value exactly; expiries,
 * which no client performs, come from keyspace notifications.
 *
 * SET: KEYS[1] the key; ARGV: the value, the TTL in ms ("0": none), the channel.
 * CAS: ARGV: "1" when an expected value is given, the expected value, the new value, the TTL,
 *      the channel. Returns 0 when the compare failed.
 * DEL: ARGV: the channel. Returns the keys deleted.
 * ADD: ARGV: the delta, the channel. INCRBY keeps the key's TTL (its lease), as the built-in
 *      store does; the new value is returned as text (Lua numbers are doubles).
 */
static const char SET_SCRIPT[] =
    "if ARGV[2] ~= '0' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) "
    "else redis.call('SET', KEYS[1], ARGV[1]) end "
    "redis.call('PUBLISH', ARGV[3], 'P' .. KEYS[1] .. '\\0' .. ARGV[1]) "
    "return 1";
static const char CAS_SCRIPT[] =
    "local cur = redis.call('GET', KEYS[1]) "
    "if ARGV[1] == '1' then if cur ~= ARGV[2] then return 0 end "
    "elseif cur then return 0 end "
    "if ARGV[4] ~= '0' then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) "
    "else redis.call('SET', KEYS[1], ARGV[3]) end "
    "redis.call('PUBLISH', ARGV[5], 'P' .. KEYS[1] .. '\\0' .. ARGV[3]) "
    "return 1";
static const char DEL_SCRIPT[] =
    "local n = redis.call('DEL', KEYS[1]) "
    "if n > 0 then redis.call('PUBLISH', ARGV[1], 'D' .. KEYS[1]) end "
    "return n";
static const char ADD_SCRIPT[] =
    "redis.call('INCRBY', KEYS[1], ARGV[1]) "
    "local v = redis.call('GET', KEYS[1]) "
    "redis.call('PUBLISH', ARGV[2], 'P' .. KEYS[1] .. '\\0' .. v) "
    "return v";

static int reply_err(const redis_t *r, const char *what, redisReply *rep)
{
    int rc = kvf__err(-KVF_EPROTO, "store %s: %s: %s", r->url, what,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
    freeReplyObject(rep);
    return rc;
}

/* The SET script, or the CAS script when @cas. 0, 1 when the CAS compare failed, or an error. */
static int put_raw(redis_t *r, const char *what, const char *key, bool cas, const void *expected,
                   size_t expected_len, const void *val, size_t len, uint32_t ttl_ms)
{
    char ttl[16], chan[KVF__REDIS_CHANNEL_MAX];
    snprintf(ttl, sizeof(ttl), "%u", ttl_ms);
    kvf__redis_channel(r, chan, sizeof(chan));
    redisReply *rep;
    int rc;
    if (cas) {
        const char *argv[] = {"EVAL", CAS_SCRIPT, "1", key, expected ? "1" : "0",
                              expected ? expected : "", val ? val : "", ttl, chan};
        size_t lens[] = {4, sizeof(CAS_SCRIPT) - 1, 1, strlen(key), 1,
                         expected ? expected_len : 0, len, strlen(ttl), strlen(chan)};
        rc = kvf__redis_cmd(r, what, 9, argv, lens, &rep);
    } else {
        const char *argv[] = {"EVAL", SET_SCRIPT, "1", key, val ? val : "", ttl, chan};
        size_t lens[] = {4, sizeof(SET_SCRIPT) - 1, 1, strlen(key), len, strlen(ttl),
                         strlen(chan)};
        rc = kvf__redis_cmd(r, what, 7, argv, lens, &rep);
    }
    if (rc < 0)
        return rc;
    if (rep->type != REDIS_REPLY_INTEGER)
        return reply_err(r, what, rep);
    rc = rep->integer == 0 ? 1 : 0;
    freeReplyObject(rep);
    return rc;
}

static int put_leased(redis_t *r, const char *what, const char *key, bool cas,
                      const void *expected, size_t expected_len, const void *val, size_t len,
                      uint64_t lease)
{
    ext_lease_t *l;
    int rc = kvf__ext_put_begin(&r->keeper, what, lease, &l);
    if (rc < 0)
        return rc;
    rc = put_raw(r, what, key, cas, expected, expected_len, val, len, l ? l->ttl_ms : 0);
    if (rc == 1)
        rc = kvf__err(-KVF_ECASMISMATCH, "store %s: %s: %s", r->url, what,
                      expected ? "the current value differs" : "the key exists");
    kvf__ext_put_end(&r->keeper, rc, key, val, len, l);
    return rc;
}

static int redis_set(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease)
{
    redis_t *r = REDIS(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(r->url, "set", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "set", key);
    rc = kvf__ext_check_value(r->url, what, "value", val, len);
    if (rc < 0)
        return rc;
    return put_leased(r, what, key, false, NULL, 0, val, len, lease);
}

static int redis_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
                     const void *val, size_t len, uint64_t lease)
{
    redis_t *r = REDIS(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(r->url, "cas", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "cas", key);
    if (expected)
        rc = kvf__ext_check_value(r->url, what, "expected value", expected, expected_len);
    if (rc == 0)
        rc = kvf__ext_check_value(r->url, what, "value", val, len);
    if (rc < 0)
        return rc;
    return put_leased(r, what, key, true, expected, expected_len, val, len, lease);
}

static int redis_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len)
{
    redis_t *r = REDIS(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(r->url, "get", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "get", key);
    if (!val || !len)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", r->url, what);
    *val = NULL;
    *len = 0;
    if (wait_ms > KVF_STORE_MAX_WAIT_MS)
        return kvf__err(-KVF_EINVAL, "store %s: %s: wait of %u ms exceeds the %u ms limit", r->url,
                        what, wait_ms, KVF_STORE_MAX_WAIT_MS);
    uint64_t deadline = kvf__now_ms() + wait_ms;
    rc = kvf__redis_get(r, what, key, val, len);
    if (rc <= 0)
        return rc;
    if (wait_ms == 0)
        return kvf__err(-KVF_ENOTFOUND, "store %s: %s: not found", r->url, what);
    rc = kvf__redis_wait_key(r, key, deadline, what, val, len);
    if (rc == -KVF_ETIMEDOUT)
        rc = kvf__err(rc, "store %s: %s: still absent after waiting %u ms", r->url, what, wait_ms);
    return rc;
}

static int redis_del(kvf_store_t *st, const char *key)
{
    redis_t *r = REDIS(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(r->url, "del", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "del", key);
    kvf__ext_forget_key(&r->keeper, key);
    char chan[KVF__REDIS_CHANNEL_MAX];
    kvf__redis_channel(r, chan, sizeof(chan));
    const char *argv[] = {"EVAL", DEL_SCRIPT, "1", key, chan};
    size_t lens[] = {4, sizeof(DEL_SCRIPT) - 1, 1, strlen(key), strlen(chan)};
    redisReply *rep;
    rc = kvf__redis_cmd(r, what, 5, argv, lens, &rep);
    if (rc < 0)
        return rc;
    if (rep->type != REDIS_REPLY_INTEGER)
        return reply_err(r, what, rep);
    rc = rep->integer ? 0 : kvf__err(-KVF_ENOTFOUND, "store %s: %s: not found", r->url, what);
    freeReplyObject(rep);
    return rc;
}

static int redis_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result)
{
    redis_t *r = REDIS(st);
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(r->url, "add", key, false);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "add", key);
    char d[24];
    snprintf(d, sizeof(d), "%" PRId64, delta);
    char chan[KVF__REDIS_CHANNEL_MAX];
    kvf__redis_channel(r, chan, sizeof(chan));
    const char *argv[] = {"EVAL", ADD_SCRIPT, "1", key, d, chan};
    size_t lens[] = {4, sizeof(ADD_SCRIPT) - 1, 1, strlen(key), strlen(d), strlen(chan)};
    redisReply *rep;
    rc = kvf__redis_cmd(r, what, 6, argv, lens, &rep);
    if (rc < 0)
        return rc;
    if (rep->type == REDIS_REPLY_ERROR) {
        bool overflow = strstr(rep->str, "overflow") != NULL;
        rc = kvf__err(overflow ? -KVF_ERANGE : -KVF_EBADVALUE, "store %s: %s: %s", r->url, what,
                      overflow ? "the sum overflows int64" : "the value is not a decimal int64");
        freeReplyObject(rep);
        return rc;
    }
    int64_t sum = 0;
    if (rep->type != REDIS_REPLY_STRING || kvf__ext_parse_counter(rep->str, rep->len, &sum) < 0)
        return reply_err(r, what, rep);
    if (result)
        *result = sum;
    freeReplyObject(rep);
    kvf__ext_forget_key(&r->keeper, key);
    return 0;
}

static int redis_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    return kvf__redis_list(REDIS(st), prefix ? prefix : "", out, count);
}

static int redis_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                       uint64_t *watch_id)
{
    return kvf__redis_watch(REDIS(st), prefix, cb, arg, watch_id);
}

static int redis_unwatch(kvf_store_t *st, uint64_t watch_id)
{
    return kvf__redis_unwatch(REDIS(st), watch_id);
}

static int redis_ping(kvf_store_t *st)
{
    redis_t *r = REDIS(st);
    const char *argv[] = {"PING"};
    size_t lens[] = {4};
    redisReply *rep;
    int rc = kvf__redis_cmd(r, "ping", 1, argv, lens, &rep);
    if (rc == 0 && rep->type == REDIS_REPLY_ERROR)
        return reply_err(r, "ping", rep);
    if (rc == 0)
        freeReplyObject(rep);
    return rc;
}

/* ---- leases: TTLs on the keys, kept alive by the client -------------------------------------- */

static int lk_grant(void *be, uint32_t ttl_ms, uint64_t *sid)
{
    (void)be;
    (void)ttl_ms;
    *sid = 0; /* nothing on the server until a key is set under it */
    return 0;
}

static int lk_keepalive(void *be, const ext_lease_t *l)
{
    redis_t *r = be;
    char ttl[16];
    snprintf(ttl, sizeof(ttl), "%u", l->ttl_ms);
    for (ext_key_t *k = l->keys; k; k = k->next) {
        const char *argv[] = {"PEXPIRE", k->key, ttl};
        size_t lens[] = {7, strlen(k->key), strlen(ttl)};
        redisReply *rep;
        int rc = kvf__redis_cmd(r, "lease keepalive", 3, argv, lens, &rep);
        if (rc < 0)
            return rc;
        bool gone = rep->type == REDIS_REPLY_INTEGER && rep->integer == 0;
        freeReplyObject(rep);
        if (gone)
            return -KVF_ENOTFOUND; /* re-publish them all */
    }
    return 0;
}

static int lk_revoke(void *be, const ext_lease_t *l)
{
    redis_t *r = be;
    char chan[KVF__REDIS_CHANNEL_MAX];
    kvf__redis_channel(r, chan, sizeof(chan));
    for (ext_key_t *k = l->keys; k; k = k->next) {
        const char *argv[] = {"EVAL", DEL_SCRIPT, "1", k->key, chan};
        size_t lens[] = {4, sizeof(DEL_SCRIPT) - 1, 1, strlen(k->key), strlen(chan)};
        redisReply *rep;
        int rc = kvf__redis_cmd(r, "lease revoke", 5, argv, lens, &rep);
        if (rc < 0)
            return rc;
        freeReplyObject(rep);
    }
    return 0;
}

static int lk_put(void *be, const char *key, const void *val, size_t len, const ext_lease_t *l)
{
    return put_raw(be, "re-publish", key, false, NULL, 0, val, len, l->ttl_ms);
}

static const ext_lease_ops_t redis_lease_ops = {
    .grant = lk_grant, .keepalive = lk_keepalive, .revoke = lk_revoke, .put = lk_put,
};

static int redis_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease)
{
    return kvf__ext_lease_grant(&REDIS(st)->keeper, ttl_ms, lease);
}

static int redis_lease_keepalive_stop(kvf_store_t *st, uint64_t lease)
{
    return kvf__ext_lease_keepalive_stop(&REDIS(st)->keeper, lease);
}

static int redis_lease_revoke(kvf_store_t *st, uint64_t lease)
{
    return kvf__ext_lease_revoke(&REDIS(st)->keeper, lease);
}

/* ---- life ------------------------------------------------------------------------------------ */

static void redis_free(redis_t *r)
{
    while (r->npool)
        redisFree(r->pool[--r->npool]);
    pthread_cond_destroy(&r->wcond);
    pthread_mutex_destroy(&r->wmu);
    pthread_mutex_destroy(&r->pool_mu);
    free(r->url);
    free(r);
}

/* The URL as shown in messages and by kvf_store_url(): the password is never shown. */
static char *shown_url(const kvf_store_url_t *a)
{
    char buf[KVF_HOST_MAX + KVF_URL_CRED_MAX + 64], db[16] = "";
    const kvf_hostport_t *h = &a->hosts[0];
    if (a->db)
        snprintf(db, sizeof(db), "/%u", a->db);
    snprintf(buf, sizeof(buf), h->kind == KVF_HOST_IPV6 ? "redis://%s%s[%s]:%u%s"
                                                        : "redis://%s%s%s:%u%s",
             a->user, a->password[0] ? (a->user[0] ? ":***@" : "***@") : "", h->host,
             (unsigned)h->port, db);
    return strdup(buf);
}

static int redis_open(const char *url, const kvf_store_url_t *addr, const kvf_store_opts_t *opts,
                      kvf_store_t **out)
{
    redis_t *r = calloc(1, sizeof(*r));
    if (!r)
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    r->url = shown_url(addr);
    r->opts = *opts;
    r->addr = *addr;
    r->base.ops = &kvf__store_redis_ops;
    r->base.url = r->url;
    r->next_wid = 1;
    pthread_mutex_init(&r->pool_mu, NULL);
    pthread_mutex_init(&r->wmu, NULL);
    kvf__cond_init_monotonic(&r->wcond);
    if (!r->url) {
        redis_free(r);
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    }
    kvf_tls_opts_t tls_env;
    if (kvf__tls_opts_resolve(opts->tls, &tls_env)) {
        int rc = kvf__err(-KVF_ENOTSUP,
                          "store %s: TLS to Redis is not supported: Debian's hiredis (0.14) is "
                          "built without TLS; use the built-in store or etcd with TLS, or reach "
                          "Redis through a TLS tunnel (docs/operations.md)",
                          r->url);
        redis_free(r);
        return rc;
    }
    /* Wait for Redis like the built-in client waits for its store. */
    uint32_t ct = opts->connect_timeout_ms;
    uint64_t deadline = kvf__now_ms() + (ct ? ct : opts->request_timeout_ms);
    char why[EXT_MSG_MAX] = "";
    redisContext *c = NULL;
    uint32_t backoff = REDIS_BACKOFF_MIN_MS;
    for (;;) {
        uint64_t now = kvf__now_ms();
        c = kvf__redis_connect(r, (uint32_t)(deadline > now ? deadline - now : 1), why,
                               sizeof(why));
        if (c || ct == 0 || kvf__now_ms() >= deadline || strstr(why, "refused:"))
            break;
        struct timespec ts = {0, (long)backoff * 1000000L};
        nanosleep(&ts, NULL);
        backoff = backoff * 2 > REDIS_BACKOFF_MAX_MS ? REDIS_BACKOFF_MAX_MS : backoff * 2;
    }
    int rc;
    if (!c) {
        rc = strstr(why, "refused:") ? kvf__err(-KVF_EAUTH, "store %s: %s", r->url, why)
             : ct ? kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect within %u ms: %s", r->url,
                             ct, why)
                  : kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect: %s", r->url, why);
        redis_free(r);
        return rc;
    }
    r->pool[r->npool++] = c;
    rc = kvf__ext_keeper_start(&r->keeper, &redis_lease_ops, r, r->url);
    if (rc < 0) {
        redis_free(r);
        return rc;
    }
    KVF_DEBUG("store", "%s: connected", r->url);
    *out = (kvf_store_t *)(void *)r;
    return 0;
}

static void redis_close(kvf_store_t *st)
{
    redis_t *r = REDIS(st);
    kvf__redis_watch_stop_all(r);
    /* Revokes on close are bounded like the built-in client's. */
    if (r->opts.request_timeout_ms > CLI_CLOSE_REVOKE_MS)
        r->opts.request_timeout_ms = CLI_CLOSE_REVOKE_MS;
    kvf__ext_keeper_stop(&r->keeper, true);
    KVF_DEBUG("store", "%s: closed", r->url);
    redis_free(r);
}

const kvf_store_ops_t kvf__store_redis_ops = {
    .size = sizeof(kvf_store_ops_t),
    .name = "redis",
    .open = redis_open,
    .close = redis_close,
    .set = redis_set,
    .get = redis_get,
    .del = redis_del,
    .cas = redis_cas,
    .add = redis_add,
    .list = redis_list,
    .watch = redis_watch,
    .unwatch = redis_unwatch,
    .lease_grant = redis_lease_grant,
    .lease_keepalive_stop = redis_lease_keepalive_stop,
    .lease_revoke = redis_lease_revoke,
    .ping = redis_ping,
};
