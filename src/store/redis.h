/*
 * Internals of the Redis backend (redis://[user:password@]host:port[/db]), shared by its files;
 * not part of the API.
 *
 * Requests go through hiredis on a small pool of blocking connections (one per concurrent
 * caller), each authenticated and on the URL's database; a connection that fails is dropped and
 * the request retried on a new one until request_timeout_ms has passed, so a Redis restart costs
 * a failed attempt, not an error. CAS is one Lua script (atomic on the server), add is INCRBY.
 *
 * Leases are the lease keeper's (ext.h) and live on the client: a key set under a lease is set
 * with a TTL (PX) and kept alive by PEXPIRE every ttl/3; a PEXPIRE that finds its key gone (Redis
 * restarted without persistence, or evicted it) re-publishes every key of that lease. Revoking
 * deletes them.
 *
 * Every write is a Lua script that publishes what it did (key and value) on a channel of the
 * database, atomically with the write; watches and the wait of a get-with-wait subscribe to it,
 * so they see every value in order. Expiries come from keyspace notifications
 * (notify-keyspace-events must hold K and x; the client adds them with CONFIG SET when it may,
 * and says what to put in redis.conf when it may not). Writes made by other Redis clients are not
 * reported to watches. Each watch has its own subscriber connection and thread. Pub/sub
 * loses what happens while a subscriber is disconnected, so after a reconnect a watch re-lists
 * its prefix and reports the differences with what it knew (puts for new or changed keys,
 * deletes for vanished ones): no change is lost, though several changes to one key during the
 * outage arrive as one.
 *
 *   redis.c        the operations, leases, the ops table
 *   redis_conn.c   connections, one command with retries, GET, list
 *   redis_watch.c  watches and the get-with-wait
 */
#ifndef KVF_STORE_REDIS_H
#define KVF_STORE_REDIS_H

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/url.h"
#include "kvferry.h"
#include "store/ext.h"
#include "store/store.h"

#define REDIS_POOL_MAX 8
#define REDIS_SCAN_COUNT 1000
#define REDIS_BACKOFF_MIN_MS 20u
#define REDIS_BACKOFF_MAX_MS 500u
#define REDIS_CONNECT_MAX_MS 1000u

typedef struct redis_watch redis_watch_t;

typedef struct kvf_redis {
    kvf_store_base_t base; /* first: see store.h */
    char *url;             /* as shown: the password replaced by "***" */
    kvf_store_opts_t opts;
    kvf_store_url_t addr;

    pthread_mutex_t pool_mu;
    redisContext *pool[REDIS_POOL_MAX];
    unsigned npool;

    ext_keeper_t keeper;
    bool notify_ok; /* keyspace notifications checked (and enabled) once */

    pthread_mutex_t wmu;
    pthread_cond_t wcond; /* a watch subscribed */
    redis_watch_t *watches, *dead;
    uint64_t next_wid;
} redis_t;

/* A connected, authenticated context on the URL's database, or NULL with @why filled. */
redisContext *kvf__redis_connect(redis_t *r, uint32_t timeout_ms, char *why, size_t wn);
/* Run one command (binary-safe argv) with retries on new connections until request_timeout_ms;
 * 0 with *@out (freeReplyObject it; it may be an error reply), or -KVF_ESTOREDOWN. */
int kvf__redis_cmd(redis_t *r, const char *what, int argc, const char **argv, const size_t *lens,
                   redisReply **out);
/* Make sure keyspace notifications (K$gx) are on: 0, or an error naming what to configure. */
int kvf__redis_need_notify(redis_t *r, const char *what);
/* The channel every write of this backend publishes on (per database): "kvferry:events:<db>". */
#define KVF__REDIS_CHANNEL_MAX 40
void kvf__redis_channel(const redis_t *r, char *buf, size_t n);
/* @s with the glob characters of Redis patterns escaped, malloc'ed; NULL when out of memory. */
char *kvf__redis_glob_escape(const char *s);

int kvf__redis_watch(redis_t *r, const char *prefix, kvf_store_watch_cb cb, void *arg,
                     uint64_t *watch_id);
int kvf__redis_unwatch(redis_t *r, uint64_t watch_id);
void kvf__redis_watch_stop_all(redis_t *r);
/* Wait until @key exists, until @deadline_ms: 0 with its value; -KVF_ETIMEDOUT; or an error. */
int kvf__redis_wait_key(redis_t *r, const char *key, uint64_t deadline_ms, const char *what,
                        void **val, size_t *len);
/* GET @key: 0 with its value, 1 when absent, or an error. */
int kvf__redis_get(redis_t *r, const char *what, const char *key, void **val, size_t *len);
/* kvf_store_list() on Redis. */
int kvf__redis_list(redis_t *r, const char *prefix, kvf_store_kv_t **out, size_t *count);

#endif /* KVF_STORE_REDIS_H */
