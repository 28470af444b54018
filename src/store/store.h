/*
 * The store backend interface: what a config-store client does, whatever store serves it. Each
 * backend fills a `static const kvf_store_ops_t` (like the transports' ops tables); the public
 * kvf_store_* functions (store.c) check nothing but the handle and call through the table of the
 * handle they are given. The backends:
 *
 *   tcp://    the built-in store's client (client*.c), kvf__store_builtin_ops
 *   etcd://   etcd v3 through its JSON gateway (etcd*.c), kvf__store_etcd_ops
 *   redis://  Redis through hiredis (redis*.c), kvf__store_redis_ops
 *   p2p://    no store: this handle's own keys in memory, others asked of the engine they name
 *             (p2p.c, common/p2p.h), kvf__store_p2p_ops
 *
 * Every backend gives the same semantics, which tests/test_store_conf.c checks on all three:
 * set/get/del/cas/add on binary values, get-with-wait that misses no set between its read and
 * its wait, list by prefix in byte order, prefix watches whose callbacks run on a thread of the
 * client and never after unwatch returns (unless unwatched from the callback), leases kept alive
 * in the background by the client, and, after the store lost them (restart, failover), re-granted
 * with every key set under them re-published. The error codes and the "store URL: what: why"
 * messages are the same too.
 *
 * Each backend's private handle struct starts with a kvf_store_base_t, so a kvf_store_t pointer
 * converts to it; nothing else of the handle is known outside the backend.
 */
#ifndef KVF_STORE_STORE_H
#define KVF_STORE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/url.h"
#include "kvferry.h"

typedef struct kvf_store_ops kvf_store_ops_t;

/* The first member of every backend's handle. */
typedef struct {
    const kvf_store_ops_t *ops;
    const char *url; /* the URL it was opened with, owned by the backend */
} kvf_store_base_t;

static inline kvf_store_base_t *kvf__store_base(const kvf_store_t *st)
{
    return (kvf_store_base_t *)(void *)st;
}

struct kvf_store_ops {
    size_t size;
    const char *name; /* "builtin", "etcd", "redis" */
    /* @url as given, @addr parsed from it, @opts complete (size checked, defaults filled). Same
     * contract as kvf_store_open(). */
    int (*open)(const char *url, const kvf_store_url_t *addr, const kvf_store_opts_t *opts,
                kvf_store_t **out);
    void (*close)(kvf_store_t *st);
    int (*set)(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease);
    int (*get)(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len);
    int (*del)(kvf_store_t *st, const char *key);
    int (*cas)(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
               const void *val, size_t len, uint64_t lease);
    int (*add)(kvf_store_t *st, const char *key, int64_t delta, int64_t *result);
    int (*list)(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count);
    /* kvf_store_list_page(); NULL: store.c cuts the page from list()'s result (a backend whose
     * list already fetches in pages of its own). */
    int (*list_page)(kvf_store_t *st, const char *prefix, const char *after, size_t max,
                     unsigned flags, kvf_store_kv_t **out, size_t *count, int *more);
    int (*watch)(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                 uint64_t *watch_id);
    int (*unwatch)(kvf_store_t *st, uint64_t watch_id);
    int (*lease_grant)(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease);
    int (*lease_keepalive_stop)(kvf_store_t *st, uint64_t lease);
    int (*lease_revoke)(kvf_store_t *st, uint64_t lease);
    int (*ping)(kvf_store_t *st);
};

extern const kvf_store_ops_t kvf__store_builtin_ops;
extern const kvf_store_ops_t kvf__store_etcd_ops;
extern const kvf_store_ops_t kvf__store_redis_ops;
extern const kvf_store_ops_t kvf__store_p2p_ops;

#endif /* KVF_STORE_STORE_H */
