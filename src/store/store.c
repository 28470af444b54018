/*
 * The public config-store client functions: kvf_store_open() parses the URL and the options and
 * opens the backend its scheme names; every other kvf_store_* function checks the handle and
 * calls through its backend's ops table (store.h).
 */
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/url.h"
#include "store/limits.h"
#include "store/store.h"

void kvf_store_opts_init(kvf_store_opts_t *opts)
{
    if (!opts)
        return;
    memset(opts, 0, sizeof(*opts));
    opts->size = sizeof(*opts);
    opts->connect_timeout_ms = CLI_DEFAULT_CONNECT_TIMEOUT_MS;
    opts->request_timeout_ms = CLI_DEFAULT_REQUEST_TIMEOUT_MS;
}

static const kvf_store_ops_t *backend_of(kvf_store_scheme_t scheme)
{
    switch (scheme) {
    case KVF_STORE_SCHEME_TCP:
        return &kvf__store_builtin_ops;
    case KVF_STORE_SCHEME_ETCD:
        return &kvf__store_etcd_ops;
    case KVF_STORE_SCHEME_REDIS:
        return &kvf__store_redis_ops;
    case KVF_STORE_SCHEME_P2P:
        return &kvf__store_p2p_ops;
    }
    return NULL;
}

int kvf_store_open(const char *url, const kvf_store_opts_t *opts, kvf_store_t **out)
{
    kvf_store_opts_t o;
    kvf_store_url_t addr;

    if (!out)
        return kvf__err(-KVF_EINVAL, "store open: the output pointer is NULL");
    *out = NULL;
    if (!url)
        return kvf__err(-KVF_EINVAL, "store open: the URL is NULL");
    int rc = kvf__store_url_parse(url, 0, &addr);
    if (rc < 0)
        return rc;
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
    const kvf_store_ops_t *ops = backend_of(addr.scheme);
    if (!ops)
        return kvf__err(-KVF_EINVAL, "store %s: unknown scheme", url);
    return ops->open(url, &addr, &o, out);
}

/* Every call below goes through the handle's table; a NULL handle is refused here, in the words
 * the backends use for their other arguments. */
#define OPS(st, op)                                                                               \
    do {                                                                                          \
        if (!(st))                                                                                \
            return kvf__err(-KVF_EINVAL, "store %s: the client handle is NULL", (op));            \
    } while (0)

void kvf_store_close(kvf_store_t *st)
{
    if (st)
        kvf__store_base(st)->ops->close(st);
}

const char *kvf_store_url(const kvf_store_t *st)
{
    return st ? kvf__store_base(st)->url : "";
}

int kvf_store_set(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease)
{
    OPS(st, "set");
    return kvf__store_base(st)->ops->set(st, key, val, len, lease);
}

int kvf_store_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len)
{
    OPS(st, "get");
    return kvf__store_base(st)->ops->get(st, key, wait_ms, val, len);
}

int kvf_store_del(kvf_store_t *st, const char *key)
{
    OPS(st, "del");
    return kvf__store_base(st)->ops->del(st, key);
}

int kvf_store_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
                  const void *val, size_t len, uint64_t lease)
{
    OPS(st, "cas");
    return kvf__store_base(st)->ops->cas(st, key, expected, expected_len, val, len, lease);
}

int kvf_store_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result)
{
    OPS(st, "add");
    return kvf__store_base(st)->ops->add(st, key, delta, result);
}

int kvf_store_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    OPS(st, "list");
    return kvf__store_base(st)->ops->list(st, prefix, out, count);
}

/* A page cut from the whole list, for backends without a paged list of their own: the pairs
 * after @after, at most @max, values dropped for KVF_STORE_LIST_KEYS_ONLY. */
static int list_page_of_list(kvf_store_t *st, const char *prefix, const char *after, size_t max,
                             unsigned flags, kvf_store_kv_t **out, size_t *count, int *more)
{
    kvf_store_kv_t *all;
    size_t n;
    if (!out || !count)
        return kvf__err(-KVF_EINVAL, "store: list: the output pointers are NULL");
    if (flags & ~KVF_STORE_LIST_KEYS_ONLY)
        return kvf__err(-KVF_EINVAL, "store: list: unknown flags 0x%x", flags);
    *out = NULL;
    *count = 0;
    if (more)
        *more = 0;
    if (max == 0 || max > KVF_STORE_LIST_PAGE_MAX)
        max = KVF_STORE_LIST_PAGE_MAX;
    int rc = kvf__store_base(st)->ops->list(st, prefix, &all, &n);
    if (rc < 0)
        return rc;
    size_t from = 0;
    while (after && *after && from < n && strcmp(all[from].key, after) <= 0)
        from++;
    size_t k = n - from < max ? n - from : max;
    for (size_t i = 0; i < n; i++) {
        if (i >= from && i < from + k)
            continue;
        free(all[i].key);
        free(all[i].val);
    }
    if (k && from)
        memmove(all, all + from, k * sizeof(*all));
    for (size_t i = 0; (flags & KVF_STORE_LIST_KEYS_ONLY) && i < k; i++) {
        if (all[i].val)
            ((char *)all[i].val)[0] = '\0';
        all[i].val_len = 0;
    }
    if (more)
        *more = from + k < n;
    *out = all;
    *count = k;
    return 0;
}

int kvf_store_list_page(kvf_store_t *st, const char *prefix, const char *after, size_t max,
                        unsigned flags, kvf_store_kv_t **out, size_t *count, int *more)
{
    OPS(st, "list");
    const kvf_store_ops_t *o = kvf__store_base(st)->ops;
    if (o->list_page)
        return o->list_page(st, prefix, after, max, flags, out, count, more);
    return list_page_of_list(st, prefix, after, max, flags, out, count, more);
}

int kvf_store_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                    uint64_t *watch_id)
{
    OPS(st, "watch");
    return kvf__store_base(st)->ops->watch(st, prefix, cb, arg, watch_id);
}

int kvf_store_unwatch(kvf_store_t *st, uint64_t watch_id)
{
    OPS(st, "unwatch");
    return kvf__store_base(st)->ops->unwatch(st, watch_id);
}

int kvf_store_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease)
{
    OPS(st, "lease grant");
    return kvf__store_base(st)->ops->lease_grant(st, ttl_ms, lease);
}

int kvf_store_lease_keepalive_stop(kvf_store_t *st, uint64_t lease)
{
    OPS(st, "lease keepalive stop");
    return kvf__store_base(st)->ops->lease_keepalive_stop(st, lease);
}

int kvf_store_lease_revoke(kvf_store_t *st, uint64_t lease)
{
    OPS(st, "lease revoke");
    return kvf__store_base(st)->ops->lease_revoke(st, lease);
}

int kvf_store_ping(kvf_store_t *st)
{
    OPS(st, "ping");
    return kvf__store_base(st)->ops->ping(st);
}
