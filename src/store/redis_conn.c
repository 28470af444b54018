/*
 * Connections and requests of the Redis backend: connecting (AUTH, SELECT), one command with
 * retries, GET, list by prefix (SCAN + MGET), and the keyspace-notification check. See redis.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/common.h"
#include "store/redis.h"

static struct timeval tv_of(uint32_t ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (long)(ms % 1000) * 1000};
    return tv;
}

redisContext *kvf__redis_connect(redis_t *r, uint32_t timeout_ms, char *why, size_t wn)
{
    const kvf_hostport_t *h = &r->addr.hosts[0];
    uint32_t ct = timeout_ms < REDIS_CONNECT_MAX_MS ? timeout_ms : REDIS_CONNECT_MAX_MS;
    redisContext *c = redisConnectWithTimeout(h->host, h->port, tv_of(ct ? ct : 1));
    if (!c || c->err) {
        snprintf(why, wn, "%s", c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv_of(r->opts.request_timeout_ms));
    redisEnableKeepAlive(c);
    redisReply *rep = NULL;
    if (r->addr.password[0]) {
        rep = r->addr.user[0]
                  ? redisCommand(c, "AUTH %s %s", r->addr.user, r->addr.password)
                  : redisCommand(c, "AUTH %s", r->addr.password);
        if (!rep || rep->type == REDIS_REPLY_ERROR) {
            snprintf(why, wn, "AUTH refused: %s", rep ? rep->str : c->errstr);
            goto fail;
        }
        freeReplyObject(rep);
    }
    if (r->addr.db) {
        rep = redisCommand(c, "SELECT %u", r->addr.db);
        if (!rep || rep->type == REDIS_REPLY_ERROR) {
            snprintf(why, wn, "SELECT %u refused: %s", r->addr.db, rep ? rep->str : c->errstr);
            goto fail;
        }
        freeReplyObject(rep);
    }
    return c;
fail:
    if (rep)
        freeReplyObject(rep);
    redisFree(c);
    return NULL;
}

static redisContext *pool_get(redis_t *r)
{
    redisContext *c = NULL;
    pthread_mutex_lock(&r->pool_mu);
    if (r->npool)
        c = r->pool[--r->npool];
    pthread_mutex_unlock(&r->pool_mu);
    return c;
}

static void pool_put(redis_t *r, redisContext *c)
{
    pthread_mutex_lock(&r->pool_mu);
    if (r->npool < REDIS_POOL_MAX) {
        r->pool[r->npool++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&r->pool_mu);
    if (c)
        redisFree(c);
}

static void nap_ms(uint64_t ms)
{
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int kvf__redis_cmd(redis_t *r, const char *what, int argc, const char **argv, const size_t *lens,
                   redisReply **out)
{
    uint64_t deadline = kvf__now_ms() + r->opts.request_timeout_ms;
    uint32_t backoff = REDIS_BACKOFF_MIN_MS;
    char why[EXT_MSG_MAX] = "";
    *out = NULL;
    for (;;) {
        redisContext *c = pool_get(r);
        bool pooled = c != NULL;
        uint64_t now = kvf__now_ms();
        if (!c)
            c = kvf__redis_connect(r, (uint32_t)(deadline > now ? deadline - now : 1), why,
                                   sizeof(why));
        if (c) {
            redisReply *rep = redisCommandArgv(c, argc, argv, lens);
            if (rep && !c->err) {
                if (rep->type == REDIS_REPLY_ERROR &&
                    (strncmp(rep->str, "LOADING", 7) == 0 || strncmp(rep->str, "BUSY", 4) == 0)) {
                    snprintf(why, sizeof(why), "%s", rep->str);
                    freeReplyObject(rep);
                    pool_put(r, c);
                } else {
                    pool_put(r, c);
                    *out = rep;
                    return 0;
                }
            } else {
                snprintf(why, sizeof(why), "%s", c->errstr[0] ? c->errstr : "connection lost");
                if (rep)
                    freeReplyObject(rep);
                redisFree(c);
                /* A pooled connection may simply be stale (Redis restarted): retry at once. */
                if (pooled && kvf__now_ms() < deadline)
                    continue;
            }
        }
        now = kvf__now_ms();
        if (now >= deadline)
            break;
        nap_ms(deadline - now < backoff ? deadline - now : backoff);
        backoff = backoff * 2 > REDIS_BACKOFF_MAX_MS ? REDIS_BACKOFF_MAX_MS : backoff * 2;
    }
    return kvf__err(-KVF_ESTOREDOWN, "store %s: %s: Redis did not answer within %u ms (%s)", r->url,
                    what, r->opts.request_timeout_ms, why[0] ? why : "no connection");
}

int kvf__redis_get(redis_t *r, const char *what, const char *key, void **val, size_t *len)
{
    const char *argv[] = {"GET", key};
    size_t lens[] = {3, strlen(key)};
    redisReply *rep;
    int rc = kvf__redis_cmd(r, what, 2, argv, lens, &rep);
    if (rc < 0)
        return rc;
    if (rep->type == REDIS_REPLY_NIL) {
        rc = 1;
    } else if (rep->type == REDIS_REPLY_STRING) {
        *val = kvf__ext_dup(rep->str, rep->len);
        *len = rep->len;
        rc = *val ? 0 : kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", r->url, what);
    } else {
        rc = kvf__err(-KVF_EPROTO, "store %s: %s: %s", r->url, what,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
    }
    freeReplyObject(rep);
    return rc;
}

void kvf__redis_channel(const redis_t *r, char *buf, size_t n)
{
    snprintf(buf, n, "kvferry:events:%u", r->addr.db);
}

char *kvf__redis_glob_escape(const char *s)
{
    char *o = malloc(strlen(s) * 2 + 1), *w = o;
    if (!o)
        return NULL;
    for (; *s; s++) {
        if (strchr("*?[]\\", *s))
            *w++ = '\\';
        *w++ = *s;
    }
    *w = '\0';
    return o;
}

/* Does the notify-keyspace-events value @v give keyspace events of expiries? ('A' is
 * "g$lshzxetd".) */
static bool flags_ok(const char *v)
{
    return strchr(v, 'K') && (strchr(v, 'A') || strchr(v, 'x'));
}

int kvf__redis_need_notify(redis_t *r, const char *what)
{
    if (__atomic_load_n(&r->notify_ok, __ATOMIC_ACQUIRE))
        return 0;
    const char *get[] = {"CONFIG", "GET", "notify-keyspace-events"};
    size_t gl[] = {6, 3, 22};
    redisReply *rep;
    int rc = kvf__redis_cmd(r, what, 3, get, gl, &rep);
    if (rc < 0)
        return rc;
    char cur[64] = "";
    bool known = rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
                 rep->element[1]->type == REDIS_REPLY_STRING;
    if (known)
        snprintf(cur, sizeof(cur), "%s", rep->element[1]->str);
    char err[EXT_MSG_MAX];
    snprintf(err, sizeof(err), "%s", rep->type == REDIS_REPLY_ERROR ? rep->str : "");
    freeReplyObject(rep);
    if (known && flags_ok(cur)) {
        __atomic_store_n(&r->notify_ok, true, __ATOMIC_RELEASE);
        return 0;
    }
    char want[80];
    snprintf(want, sizeof(want), "%s%s", cur, "Kxe");
    const char *set[] = {"CONFIG", "SET", "notify-keyspace-events", want};
    size_t sl[] = {6, 3, 22, strlen(want)};
    rc = kvf__redis_cmd(r, what, 4, set, sl, &rep);
    if (rc < 0)
        return rc;
    bool ok = rep->type != REDIS_REPLY_ERROR;
    if (!ok)
        snprintf(err, sizeof(err), "%s", rep->str);
    freeReplyObject(rep);
    if (!ok)
        return kvf__err(-KVF_ENOTSUP,
                        "store %s: %s: Redis keyspace notifications are off (notify-keyspace-events "
                        "\"%s\") and the client may not turn them on (%s); add "
                        "\"notify-keyspace-events Kxe\" to redis.conf",
                        r->url, what, cur, err);
    KVF_INFO("store", "%s: turned on keyspace notifications (notify-keyspace-events %s)", r->url,
             want);
    __atomic_store_n(&r->notify_ok, true, __ATOMIC_RELEASE);
    return 0;
}

static int kv_cmp(const void *a, const void *b)
{
    const kvf_store_kv_t *x = a, *y = b;
    return strcmp(x->key, y->key); /* strcmp compares as unsigned char: byte order */
}

int kvf__redis_list(redis_t *r, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(r->url, "list", prefix, true);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "list", prefix);
    if (!out || !count)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", r->url, what);
    *out = NULL;
    *count = 0;
    char *esc = kvf__redis_glob_escape(prefix);
    char *pat = esc ? malloc(strlen(esc) + 2) : NULL;
    if (!pat) {
        free(esc);
        return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", r->url, what);
    }
    sprintf(pat, "%s*", esc);
    free(esc);
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0, cap = 0;
    char cursor[32] = "0", cnt[16];
    snprintf(cnt, sizeof(cnt), "%d", REDIS_SCAN_COUNT);
    /* SCAN pages through the keys (a key present throughout is returned at least once; one that
     * comes or goes meanwhile may or may not be); MGET reads each page's values. */
    do {
        const char *argv[] = {"SCAN", cursor, "MATCH", pat, "COUNT", cnt};
        size_t lens[] = {4, strlen(cursor), 5, strlen(pat), 5, strlen(cnt)};
        redisReply *rep;
        rc = kvf__redis_cmd(r, what, 6, argv, lens, &rep);
        if (rc < 0)
            break;
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
            rep->element[1]->type != REDIS_REPLY_ARRAY) {
            rc = kvf__err(-KVF_EPROTO, "store %s: %s: %s", r->url, what,
                          rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected SCAN reply");
            freeReplyObject(rep);
            break;
        }
        snprintf(cursor, sizeof(cursor), "%s", rep->element[0]->str);
        redisReply *keys = rep->element[1];
        if (keys->elements) {
            size_t m = keys->elements;
            const char **av = malloc((m + 1) * sizeof(*av));
            size_t *al = malloc((m + 1) * sizeof(*al));
            redisReply *vals = NULL;
            if (av && al) {
                av[0] = "MGET";
                al[0] = 4;
                for (size_t i = 0; i < m; i++) {
                    av[i + 1] = keys->element[i]->str;
                    al[i + 1] = keys->element[i]->len;
                }
                rc = kvf__redis_cmd(r, what, (int)m + 1, av, al, &vals);
            } else {
                rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", r->url, what);
            }
            for (size_t i = 0; rc == 0 && vals && vals->type == REDIS_REPLY_ARRAY && i < m &&
                               i < vals->elements; i++) {
                redisReply *v = vals->element[i];
                if (v->type != REDIS_REPLY_STRING)
                    continue; /* deleted since the SCAN, or not a string */
                if (n == cap) {
                    size_t nc = cap ? cap * 2 : 64;
                    kvf_store_kv_t *g = realloc(kvs, nc * sizeof(*g));
                    if (!g) {
                        rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", r->url, what);
                        break;
                    }
                    kvs = g;
                    cap = nc;
                }
                kvs[n].key = kvf__ext_dup(keys->element[i]->str, keys->element[i]->len);
                kvs[n].val = kvf__ext_dup(v->str, v->len);
                kvs[n].val_len = v->len;
                if (!kvs[n].key || !kvs[n].val) {
                    free(kvs[n].key);
                    free(kvs[n].val);
                    rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", r->url, what);
                    break;
                }
                n++;
            }
            if (vals)
                freeReplyObject(vals);
            free(av);
            free(al);
        }
        freeReplyObject(rep);
    } while (rc == 0 && strcmp(cursor, "0") != 0);
    free(pat);
    if (rc < 0) {
        kvf_store_kv_free(kvs, n);
        return rc;
    }
    /* SCAN may return a key twice; sort, then drop repeats. */
    if (n)
        qsort(kvs, n, sizeof(*kvs), kv_cmp);
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        if (w && strcmp(kvs[w - 1].key, kvs[i].key) == 0) {
            free(kvs[i].key);
            free(kvs[i].val);
            continue;
        }
        kvs[w++] = kvs[i];
    }
    *out = kvs;
    *count = w;
    return 0;
}
