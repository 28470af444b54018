/*
 * The engine's configuration: kvf_config_init() and the check of a caller's config, the role
 * names, and which transports an engine offers to others (it follows from the config).
 */
#include <ctype.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/core.h"

static const char *const role_names[] = {"Prefill", "Decode", "Both"};

int kvf_role_parse(const char *s, kvf_role_t *out)
{
    if (!out)
        return kvf__err(-KVF_EINVAL, "role: the output pointer is NULL");
    for (size_t i = 0; s && i < KVF__ARRAY_SIZE(role_names); i++) {
        if (strcasecmp(s, role_names[i]) == 0) {
            *out = (kvf_role_t)i;
            return 0;
        }
    }
    return kvf__err(-KVF_EINVAL, "role %s%s%s: want Prefill, Decode or Both", s ? "\"" : "",
                    s ? s : "(null)", s ? "\"" : "");
}

const char *kvf_role_name(kvf_role_t role)
{
    return (unsigned)role < KVF__ARRAY_SIZE(role_names) ? role_names[role] : "?";
}

/* The defaults (src/common/limits.h). Static storage: its padding is zero too, as memset left
 * it before. */
static const kvf_config_t config_defaults = {
    .size = sizeof(kvf_config_t),
    .init_timeout_ms = KVF_DEFAULT_INIT_TIMEOUT_MS,
    .op_timeout_ms = KVF_DEFAULT_OP_TIMEOUT_MS,
    .lease_ttl_ms = KVF_DEFAULT_LEASE_TTL_MS,
    .tcp_conns_per_peer = KVF_DEFAULT_CONNS_PER_PEER,
    .tcp_chunk_bytes = KVF_DEFAULT_CHUNK,
    .transport = KVF_TRANSPORT_AUTO,
    .ns = "default",
    .max_batches = KVF_DEFAULT_MAX_BATCHES,
    .submit_blocks = 0,
    .async_threads = KVF_DEFAULT_ASYNC_THREADS,
    .notify_queue_max = KVF_DEFAULT_NOTIFY_QUEUE,
    .tcp_idle_timeout_ms = KVF_DEFAULT_TCP_IDLE_TIMEOUT_MS,
    .listen_fd = -1,
};

void kvf_config_init(kvf_config_t *cfg)
{
    memcpy(cfg, &config_defaults, sizeof(*cfg));
}

/* config.key_prefix, or $KVFERRY_KEY_PREFIX when it is NULL, or the default. */
static int check_prefix(kvf_config_t *c)
{
    const char *what = "config.key_prefix";
    if (!c->key_prefix) {
        const char *env = getenv("KVFERRY_KEY_PREFIX");
        c->key_prefix = env && *env ? env : "kvferry/v1/";
        what = env && *env ? "KVFERRY_KEY_PREFIX" : what;
    }
    size_t n = strlen(c->key_prefix);
    if (n == 0 || n > ENG_PREFIX_MAX)
        return kvf__err(-KVF_EINVAL, "%s \"%s\": want 1..%d characters", what, c->key_prefix,
                        ENG_PREFIX_MAX);
    for (size_t i = 0; i < n; i++) {
        char ch = c->key_prefix[i];
        if (!isalnum((unsigned char)ch) && !strchr("_.:/-", ch))
            return kvf__err(-KVF_EINVAL,
                            "%s \"%s\": only letters, digits, '_', '.', ':', '/', '-'", what,
                            c->key_prefix);
    }
    return 0;
}

static int check_ns(const char *ns)
{
    size_t n = ns ? strlen(ns) : 0;
    if (n == 0 || n > ENG_NS_MAX)
        return kvf__err(-KVF_EINVAL, "namespace \"%s\": want 1..%d characters", ns ? ns : "",
                        ENG_NS_MAX);
    for (size_t i = 0; i < n; i++) {
        char c = ns[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return kvf__err(-KVF_EINVAL, "namespace \"%s\": only letters, digits, '_', '.', '-'",
                            ns);
    }
    return 0;
}

int kvf__eng_config_load(const kvf_config_t *in, kvf_config_t *c)
{
    kvf_config_init(c);
    if (in) {
        if (in->size < sizeof(in->size) || in->size > sizeof(*c))
            return kvf__err(-KVF_EINVAL,
                            "config.size is %zu; fill the config with kvf_config_init()", in->size);
        memcpy(c, in, in->size);
        c->size = sizeof(*c);
    }
    const char *env = getenv("KVFERRY_TRANSPORT");
    if (env && *env) {
        if (!strcasecmp(env, "tcp"))
            c->transport = KVF_TRANSPORT_TCP;
        else if (!strcasecmp(env, "shm"))
            c->transport = KVF_TRANSPORT_SHM;
        else if (!strcasecmp(env, "auto"))
            c->transport = KVF_TRANSPORT_AUTO;
        else
            return kvf__err(-KVF_EINVAL, "KVFERRY_TRANSPORT=%s: want auto, tcp or shm", env);
    }
    if (c->transport != KVF_TRANSPORT_AUTO && c->transport != KVF_TRANSPORT_TCP &&
        c->transport != KVF_TRANSPORT_SHM)
        return kvf__err(-KVF_EINVAL, "config.transport %d: want KVF_TRANSPORT_AUTO, _TCP or _SHM",
                        (int)c->transport);
    if (c->listen_fd < -1)
        return kvf__err(-KVF_EINVAL, "config.listen_fd %d: want -1 (none) or a socket",
                        c->listen_fd);
    if (c->init_timeout_ms == 0 || c->op_timeout_ms == 0 || c->lease_ttl_ms == 0)
        return kvf__err(-KVF_EINVAL,
                        "config: init_timeout_ms (%u), op_timeout_ms (%u) and "
                        "lease_ttl_ms (%u) must be > 0",
                        c->init_timeout_ms, c->op_timeout_ms, c->lease_ttl_ms);
    if (c->lease_ttl_ms < KVF_MIN_LEASE_TTL_MS)
        return kvf__err(-KVF_EINVAL,
                        "config.lease_ttl_ms %u is below %u: so short a lease can expire "
                        "before the engine has published its records",
                        c->lease_ttl_ms, KVF_MIN_LEASE_TTL_MS);
    if (c->lease_ttl_ms > KVF_STORE_MAX_LEASE_TTL_MS)
        return kvf__err(-KVF_EINVAL, "config.lease_ttl_ms %u exceeds %u", c->lease_ttl_ms,
                        KVF_STORE_MAX_LEASE_TTL_MS);
    if (c->tcp_conns_per_peer < 1 || c->tcp_conns_per_peer > KVF_MAX_CONNS_PER_PEER)
        return kvf__err(-KVF_EINVAL, "config.tcp_conns_per_peer %u: want 1..%u",
                        c->tcp_conns_per_peer, KVF_MAX_CONNS_PER_PEER);
    if (c->tcp_chunk_bytes < KVF_MIN_CHUNK || c->tcp_chunk_bytes > KVF_MAX_CHUNK)
        return kvf__err(-KVF_EINVAL, "config.tcp_chunk_bytes %u: want %u..%u", c->tcp_chunk_bytes,
                        KVF_MIN_CHUNK, KVF_MAX_CHUNK);
    if (c->max_batches < 1 || c->max_batches > ENG_MAX_BATCHES)
        return kvf__err(-KVF_EINVAL, "config.max_batches %u: want 1..%u", c->max_batches,
                        ENG_MAX_BATCHES);
    if (c->submit_blocks > 1)
        return kvf__err(-KVF_EINVAL, "config.submit_blocks %u: want 0 or 1", c->submit_blocks);
    if (c->async_threads < 1 || c->async_threads > ENG_MAX_ASYNC_THREADS)
        return kvf__err(-KVF_EINVAL, "config.async_threads %u: want 1..%u", c->async_threads,
                        ENG_MAX_ASYNC_THREADS);
    if (c->notify_queue_max < 1 || c->notify_queue_max > ENG_MAX_NOTIFY_QUEUE)
        return kvf__err(-KVF_EINVAL, "config.notify_queue_max %u: want 1..%u", c->notify_queue_max,
                        ENG_MAX_NOTIFY_QUEUE);
    if (c->tcp_idle_timeout_ms < KVF_MIN_TCP_IDLE_TIMEOUT_MS ||
        c->tcp_idle_timeout_ms > KVF_MAX_TCP_IDLE_TIMEOUT_MS)
        return kvf__err(-KVF_EINVAL, "config.tcp_idle_timeout_ms %u: want %u..%u",
                        c->tcp_idle_timeout_ms, KVF_MIN_TCP_IDLE_TIMEOUT_MS,
                        KVF_MAX_TCP_IDLE_TIMEOUT_MS);
    if (c->io_threads > KVF_MAX_IO_THREADS)
        return kvf__err(-KVF_EINVAL, "config.io_threads %u: want 1..%u, or 0 for the default",
                        c->io_threads, KVF_MAX_IO_THREADS);
    if (!c->ns)
        c->ns = "default";
    int rc = check_ns(c->ns);
    if (rc < 0)
        return rc;
    return check_prefix(c);
}

const char *kvf__eng_forced_name(const kvf_config_t *c)
{
    switch (c->transport) {
    case KVF_TRANSPORT_TCP:
        return "tcp";
    case KVF_TRANSPORT_SHM:
        return "shm";
    default:
        return NULL;
    }
}

/* Whether the engine offers transport @o to peers of other processes. An engine forced to a
 * transport whose target checks every request (tcp) offers none whose target takes no part
 * (shm): it asked that nobody reach into its memory from outside the target's checks. */
bool kvf__eng_offered(const kvf_engine_t *e, const struct kvf_transport_ops *o)
{
    const char *forced = kvf__eng_forced_name(&e->cfg);
    const struct kvf_transport_ops *f = NULL;
    for (size_t i = 0; forced && kvf__transports[i]; i++)
        if (!strcmp(kvf__transports[i]->name, forced))
            f = kvf__transports[i];
    if (!(o->caps & KVF_TCAP_OFFER))
        return false;
    if (!f || f->check != KVF_CHECK_TARGET)
        return true;
    return o->check == KVF_CHECK_TARGET;
}
