/*
 * Quotas of the store server. A client is a source IP address: connections, watches, the keys
 * (with their bytes) it wrote last and the leases it granted are charged to it, so that one
 * address cannot fill the store however many connections it opens. The server's totals bound
 * every client together. Also the server's options: defaults and checks.
 */
#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/server.h"

/* ---- options --------------------------------------------------------------------------------- */

void kvf__srv_opts_default(kvf_store_server_opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->size = sizeof(*o);
    o->max_clients = KVF_STORE_MAX_CLIENTS;
    o->max_clients_per_addr = SRV_DEFAULT_MAX_CLIENTS_PER_ADDR;
    o->idle_timeout_ms = SRV_DEFAULT_IDLE_TIMEOUT_MS;
    o->max_keys = SRV_DEFAULT_MAX_KEYS;
    o->max_keys_per_client = SRV_DEFAULT_MAX_KEYS_PER_CLIENT;
    o->max_bytes = SRV_DEFAULT_MAX_BYTES;
    o->max_bytes_per_client = SRV_DEFAULT_MAX_BYTES_PER_CLIENT;
    o->max_leases = SRV_DEFAULT_MAX_LEASES;
    o->max_leases_per_client = SRV_DEFAULT_MAX_LEASES_PER_CLIENT;
    o->max_watches = SRV_DEFAULT_MAX_WATCHES;
    o->max_watches_per_client = SRV_DEFAULT_MAX_WATCHES_PER_CLIENT;
    o->max_output_bytes = KVF_STORE_MAX_OUTPUT_BYTES;
    o->max_output_bytes_total = SRV_DEFAULT_MAX_OUTPUT_TOTAL;
}

int kvf__srv_opts_check(const kvf_store_server_opts_t *o)
{
    if (o->size < sizeof(*o))
        return kvf__err(-KVF_EINVAL,
                        "store server options: size %zu is not sizeof(kvf_store_server_opts_t) "
                        "(%zu); fill them with kvf_store_server_opts_init()",
                        o->size, sizeof(*o));
    const struct {
        const char *name;
        uint64_t v, lo, hi;
    } f[] = {
        {"max_clients", o->max_clients, 1, UINT32_MAX},
        {"max_clients_per_addr", o->max_clients_per_addr, 1, UINT32_MAX},
        {"idle_timeout_ms", o->idle_timeout_ms, SRV_MIN_IDLE_TIMEOUT_MS, SRV_MAX_IDLE_TIMEOUT_MS},
        {"max_keys", o->max_keys, 1, UINT64_MAX},
        {"max_keys_per_client", o->max_keys_per_client, 1, UINT64_MAX},
        {"max_bytes", o->max_bytes, 1, UINT64_MAX},
        {"max_bytes_per_client", o->max_bytes_per_client, 1, UINT64_MAX},
        {"max_leases", o->max_leases, 1, UINT32_MAX},
        {"max_leases_per_client", o->max_leases_per_client, 1, UINT32_MAX},
        {"max_watches", o->max_watches, 1, UINT32_MAX},
        {"max_watches_per_client", o->max_watches_per_client, 1, UINT32_MAX},
        {"max_output_bytes", o->max_output_bytes, 1, UINT64_MAX},
        {"max_output_bytes_total", o->max_output_bytes_total, 1, UINT64_MAX},
    };
    for (size_t i = 0; i < KVF__ARRAY_SIZE(f); i++)
        if (f[i].v < f[i].lo || f[i].v > f[i].hi)
            return kvf__err(-KVF_EINVAL,
                            "store server options: %s is %" PRIu64 ", not in %" PRIu64 "..%" PRIu64,
                            f[i].name, f[i].v, f[i].lo, f[i].hi);
    return 0;
}

/* ---- clients --------------------------------------------------------------------------------- */

static int client_cmp(const void *a, const void *b)
{
    const struct srv_client *x = a, *y = b;
    if (x->ip_len != y->ip_len)
        return x->ip_len < y->ip_len ? -1 : 1;
    return memcmp(x->ip, y->ip, x->ip_len);
}

struct srv_client *kvf__srv_client_get(struct kvf_store_server *srv,
                                       const struct sockaddr_storage *ss)
{
    struct srv_client probe;
    memset(&probe, 0, sizeof(probe));
    if (ss->ss_family == AF_INET) {
        memcpy(probe.ip, &((const struct sockaddr_in *)(const void *)ss)->sin_addr, 4);
        probe.ip_len = 4;
    } else {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)(const void *)ss)->sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a6)) {
            memcpy(probe.ip, a6->s6_addr + 12, 4);
            probe.ip_len = 4;
        } else {
            memcpy(probe.ip, a6->s6_addr, 16);
            probe.ip_len = 16;
        }
    }
    void **slot = tfind(&probe, &srv->client_root, client_cmp);
    if (slot)
        return *slot;
    struct srv_client *cl = malloc(sizeof(*cl));
    if (!cl)
        return NULL;
    *cl = probe;
    inet_ntop(cl->ip_len == 4 ? AF_INET : AF_INET6, cl->ip, cl->name, sizeof(cl->name));
    if (!tsearch(cl, &srv->client_root, client_cmp)) {
        free(cl);
        return NULL;
    }
    return cl;
}

void kvf__srv_client_maybe_free(struct kvf_store_server *srv, struct srv_client *cl)
{
    if (!cl || cl->conns || cl->keys || cl->bytes || cl->leases || cl->watches)
        return;
    tdelete(cl, &srv->client_root, client_cmp);
    free(cl);
}

/* ---- quotas ---------------------------------------------------------------------------------- */

static uint64_t add_signed(uint64_t v, int64_t d)
{
    return d >= 0 ? v + (uint64_t)d : v - (uint64_t)(-d);
}

bool kvf__srv_quota_kv(struct kvf_store_server *srv, const struct srv_client *cl, int64_t keys,
                       int64_t bytes, char *why, size_t whylen)
{
    const kvf_store_server_opts_t *o = &srv->opts;
    /* Only growth is checked: replacing a value by a shorter one is always let through. */
    if (keys > 0 && add_signed(cl->keys, keys) > o->max_keys_per_client)
        snprintf(why, whylen,
                 "quota max_keys_per_client (%" PRIu64 ") reached: %s holds %" PRIu64 " keys",
                 o->max_keys_per_client, cl->name, cl->keys);
    else if (keys > 0 && add_signed(srv->nkeys, keys) > o->max_keys)
        snprintf(why, whylen,
                 "quota max_keys (%" PRIu64 ") reached: the store holds %" PRIu64 " keys",
                 o->max_keys, srv->nkeys);
    else if (bytes > 0 && add_signed(cl->bytes, bytes) > o->max_bytes_per_client)
        snprintf(why, whylen,
                 "quota max_bytes_per_client (%" PRIu64 ") reached: %s holds %" PRIu64
                 " bytes and this needs %" PRId64 " more",
                 o->max_bytes_per_client, cl->name, cl->bytes, bytes);
    else if (bytes > 0 && add_signed(srv->nbytes, bytes) > o->max_bytes)
        snprintf(why, whylen,
                 "quota max_bytes (%" PRIu64 ") reached: the store holds %" PRIu64
                 " bytes and this needs %" PRId64 " more",
                 o->max_bytes, srv->nbytes, bytes);
    else
        return true;
    return false;
}

void kvf__srv_charge_kv(struct kvf_store_server *srv, struct srv_client *cl, int64_t keys,
                        int64_t bytes)
{
    cl->keys = add_signed(cl->keys, keys);
    cl->bytes = add_signed(cl->bytes, bytes);
    srv->nkeys = add_signed(srv->nkeys, keys);
    srv->nbytes = add_signed(srv->nbytes, bytes);
}

bool kvf__srv_quota_lease(struct kvf_store_server *srv, const struct srv_client *cl, char *why,
                          size_t whylen)
{
    const kvf_store_server_opts_t *o = &srv->opts;
    if (cl->leases >= o->max_leases_per_client)
        snprintf(why, whylen,
                 "quota max_leases_per_client (%" PRIu32 ") reached: %s holds %" PRIu32 " leases",
                 o->max_leases_per_client, cl->name, cl->leases);
    else if (srv->nleases >= o->max_leases)
        snprintf(why, whylen, "quota max_leases (%" PRIu32 ") reached: %" PRIu32 " leases alive",
                 o->max_leases, srv->nleases);
    else
        return true;
    return false;
}

bool kvf__srv_quota_watch(struct kvf_store_server *srv, const struct srv_client *cl, char *why,
                          size_t whylen)
{
    const kvf_store_server_opts_t *o = &srv->opts;
    if (cl->watches >= o->max_watches_per_client)
        snprintf(why, whylen,
                 "quota max_watches_per_client (%" PRIu32 ") reached: %s holds %" PRIu32 " watches",
                 o->max_watches_per_client, cl->name, cl->watches);
    else if (srv->nwatches >= o->max_watches)
        snprintf(why, whylen,
                 "quota max_watches (%" PRIu32 ") reached: %" PRIu32 " watches registered",
                 o->max_watches, srv->nwatches);
    else
        return true;
    return false;
}
