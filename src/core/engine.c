/*
 * The transfer engine: one node of the cluster. It owns the listening transport, the region
 * table, the peer cache and the store client, and publishes two keys bound to its lease:
 *
 *   kvferry/v1/<ns>/sessions/<sid>  the session record (JSON: role, device, pid, boot id,
 *                                   network namespace, transports offered, the shm word's
 *                                   address and nonce)
 *   kvferry/v1/<ns>/regions/<sid>   its registered regions (JSON, with the table generation)
 *
 * Each peer is reached by one of the transports of kvf__transports, chosen on first use by
 * walking that table in order (loop → shm → tcp), or forced by config.transport /
 * KVFERRY_TRANSPORT: "loop" when the peer is an engine of this process (memcpy under the
 * target's own region references), "shm" when it is on this host and its memory is reachable
 * with process_vm_writev, "tcp" otherwise.
 *
 * A session id is "ip:port" and is also the address peers connect to, so a peer needs the store
 * only to learn that a session exists and which regions it has; transfers between peers that
 * already know each other go on while the store is down.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include "common/common.h"
#include "common/host.h"
#include "common/thread.h"
#include "common/url.h"
#include "common/regions.h"
#include "transport/transport.h"
#include "core/engine_internal.h"

/* One kvf_mem_alloc() allocation: a memfd mapped MAP_SHARED at @addr. @len is what the caller
 * asked for and what is registered; @map_len is rounded up to the page size. @kept: its
 * unregister timed out in kvf_mem_free(), so it stays mapped until destroy. */
typedef struct eng_mem {
    struct eng_mem *next;
    void *addr;
    size_t len;
    size_t map_len;
    int fd;
    bool huge;
    bool kept;
} eng_mem_t;

/* ---- small public helpers ------------------------------------------------------------------- */

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

void kvf_config_init(kvf_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->init_timeout_ms = 10000;
    cfg->op_timeout_ms = 30000;
    cfg->lease_ttl_ms = 5000;
    cfg->tcp_conns_per_peer = 2;
    cfg->tcp_chunk_bytes = 4u << 20;
    cfg->transport = KVF_TRANSPORT_AUTO;
    cfg->ns = "default";
    cfg->max_batches = 4096;
    cfg->submit_blocks = 0;
    cfg->async_threads = 4;
    cfg->notify_queue_max = 65536;
}

const char *kvf_engine_session_id(const kvf_engine_t *e)
{
    return e ? e->sid : "";
}

uint16_t kvf_engine_port(const kvf_engine_t *e)
{
    return e ? kvf__transports[e->listener]->port(e->tr[e->listener]) : 0;
}

/* ---- configuration -------------------------------------------------------------------------- */

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

/* Copy the caller's config over the defaults, check it, and apply KVFERRY_TRANSPORT. */
static int config_load(const kvf_config_t *in, kvf_config_t *c)
{
    kvf_config_init(c);
    if (in) {
        if (in->size < sizeof(in->size) || in->size > sizeof(*c))
            return kvf__err(-KVF_EINVAL,
                            "config.size is %zu; fill the config with kvf_config_init()",
                            in->size);
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
    if (c->init_timeout_ms == 0 || c->op_timeout_ms == 0 || c->lease_ttl_ms == 0)
        return kvf__err(-KVF_EINVAL, "config: init_timeout_ms (%u), op_timeout_ms (%u) and "
                                     "lease_ttl_ms (%u) must be > 0",
                        c->init_timeout_ms, c->op_timeout_ms, c->lease_ttl_ms);
    if (c->lease_ttl_ms > KVF_STORE_MAX_LEASE_TTL_MS)
        return kvf__err(-KVF_EINVAL, "config.lease_ttl_ms %u exceeds %u", c->lease_ttl_ms,
                        KVF_STORE_MAX_LEASE_TTL_MS);
    if (c->tcp_conns_per_peer < 1 || c->tcp_conns_per_peer > ENG_MAX_CONNS_PER_PEER)
        return kvf__err(-KVF_EINVAL, "config.tcp_conns_per_peer %u: want 1..%u",
                        c->tcp_conns_per_peer, ENG_MAX_CONNS_PER_PEER);
    if (c->tcp_chunk_bytes < ENG_MIN_CHUNK || c->tcp_chunk_bytes > ENG_MAX_CHUNK)
        return kvf__err(-KVF_EINVAL, "config.tcp_chunk_bytes %u: want %u..%u", c->tcp_chunk_bytes,
                        ENG_MIN_CHUNK, ENG_MAX_CHUNK);
    if (c->max_batches < 1 || c->max_batches > ENG_MAX_BATCHES)
        return kvf__err(-KVF_EINVAL, "config.max_batches %u: want 1..%u", c->max_batches,
                        ENG_MAX_BATCHES);
    if (c->submit_blocks > 1)
        return kvf__err(-KVF_EINVAL, "config.submit_blocks %u: want 0 or 1", c->submit_blocks);
    if (c->async_threads < 1 || c->async_threads > ENG_MAX_ASYNC_THREADS)
        return kvf__err(-KVF_EINVAL, "config.async_threads %u: want 1..%u", c->async_threads,
                        ENG_MAX_ASYNC_THREADS);
    if (c->notify_queue_max < 1 || c->notify_queue_max > ENG_MAX_NOTIFY_QUEUE)
        return kvf__err(-KVF_EINVAL, "config.notify_queue_max %u: want 1..%u",
                        c->notify_queue_max, ENG_MAX_NOTIFY_QUEUE);
    if (!c->ns)
        c->ns = "default";
    return check_ns(c->ns);
}

/* The name of the transport config.transport forces, or NULL (auto). */
static const char *forced_name(const kvf_config_t *c)
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
static bool offered(const kvf_engine_t *e, const struct kvf_transport_ops *o)
{
    const char *forced = forced_name(&e->cfg);
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

/* ---- store records -------------------------------------------------------------------------- */

void kvf__eng_make_key(char *buf, size_t len, const char *ns, const char *kind, const char *sid)
{
    snprintf(buf, len, "kvferry/v1/%s/%s/%s", ns, kind, sid);
}

/* Set @key to the JSON text of @doc under the engine's lease; steals the reference to @doc. */
static int store_put_json(kvf_engine_t *e, const char *key, json_t *doc)
{
    if (!doc)
        return kvf__err(-KVF_ENOMEM, "engine %s: out of memory building %s", e->sid, key);
    char *text = json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    if (!text)
        return kvf__err(-KVF_ENOMEM, "engine %s: out of memory encoding %s", e->sid, key);
    int rc = kvf_store_set(e->store, key, text, strlen(text), e->lease);
    free(text);
    return rc;
}

static json_t *hex_u64(uint64_t v)
{
    char buf[24];
    snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
    return json_string(buf);
}

/* The session record: among others, the transports it offers (see offered()) and the socket
 * its kvf_mem_alloc memory is served on. */
static int publish_session(kvf_engine_t *e)
{
    char host[256] = "";
    const char *memfd_sock = "";
    gethostname(host, sizeof(host) - 1);
    json_t *tr = json_array();
    for (size_t i = 0; tr && kvf__transports[i]; i++) {
        const struct kvf_transport_ops *o = kvf__transports[i];
        if (offered(e, o) && json_array_append_new(tr, json_string(o->name)) < 0) {
            json_decref(tr);
            tr = NULL;
        }
        if (!*memfd_sock)
            memfd_sock = o->mem_sock(e->tr[i]);
    }
    json_t *doc = json_pack("{s:i, s:s, s:s, s:i, s:i, s:s, s:s, s:o, s:s, s:s, s:o, s:o, s:s}",
                            "version", ENG_RECORD_VERSION, "session", e->sid, "role",
                            kvf_role_name(e->role), "device_id", e->device_id, "pid",
                            (int)getpid(), "hostname", host, "kvferry", KVF_VERSION_STRING,
                            "transports", tr, "boot_id", kvf__host_boot_id(), "net_ns",
                            kvf__host_net_ns(), "shm_word", hex_u64((uintptr_t)&e->shm_word),
                            "shm_nonce", hex_u64(e->shm_word.nonce), "memfd_socket",
                            memfd_sock);
    return store_put_json(e, e->session_key, doc);
}

/* Parse a session record into what a transport needs. Untrusted input: anything missing or
 * malformed is left empty, which only means shm is not offered (tcp needs the sid alone). */
void kvf__eng_parse_session(const void *text, size_t len, kvf_tpeer_desc_t *d)
{
    json_t *doc = json_loadb(text, len, 0, NULL);
    if (!doc)
        return;
    json_t *pid = json_object_get(doc, "pid");
    if (json_is_integer(pid) && json_integer_value(pid) > 0 && json_integer_value(pid) < INT32_MAX)
        d->pid = (int32_t)json_integer_value(pid);
    const char *boot = json_string_value(json_object_get(doc, "boot_id"));
    if (boot && strlen(boot) < sizeof(d->boot_id))
        snprintf(d->boot_id, sizeof(d->boot_id), "%s", boot);
    const char *net = json_string_value(json_object_get(doc, "net_ns"));
    if (net && strlen(net) < sizeof(d->net_ns))
        snprintf(d->net_ns, sizeof(d->net_ns), "%s", net);
    json_t *tr = json_object_get(doc, "transports"), *t;
    size_t i;
    json_array_foreach(tr, i, t)
    {
        if (json_is_string(t) && !strcmp(json_string_value(t), "shm"))
            d->offers_shm = true;
    }
    const char *sock = json_string_value(json_object_get(doc, "memfd_socket"));
    if (sock && strlen(sock) < sizeof(d->memfd_sock))
        snprintf(d->memfd_sock, sizeof(d->memfd_sock), "%s", sock);
    const char *w = json_string_value(json_object_get(doc, "shm_word"));
    const char *nonce = json_string_value(json_object_get(doc, "shm_nonce"));
    char *end;
    if (w && nonce) {
        errno = 0;
        uint64_t wa = strtoull(w, &end, 16);
        bool ok = !*end && !errno;
        uint64_t nv = strtoull(nonce, &end, 16);
        if (ok && !*end && !errno) {
            d->shm_word_addr = wa;
            d->shm_nonce = nv;
        }
    }
    json_decref(doc);
}

/* Publish the current region table. Holding publish_lock across snapshot and set keeps the
 * published generation monotonic when several threads register at once. */
static int publish_regions(kvf_engine_t *e)
{
    kvf_region_t *rs;
    size_t n;
    uint64_t gen;
    int rc;

    pthread_mutex_lock(&e->publish_lock);
    rc = kvf__regions_snapshot(e->regions, &rs, &n, &gen);
    if (rc < 0)
        goto out_unlock;
    json_t *list = json_array();
    for (size_t i = 0; list && i < n; i++) {
        json_t *r = json_pack("{s:o, s:I, s:I}", "addr", hex_u64(rs[i].addr), "len",
                              (json_int_t)rs[i].len, "gen", (json_int_t)rs[i].gen);
        if (!r || json_array_append_new(list, r) < 0) {
            json_decref(list);
            list = NULL;
        }
    }
    free(rs);
    json_t *doc = list ? json_pack("{s:I, s:o}", "gen", (json_int_t)gen, "regions", list) : NULL;
    rc = store_put_json(e, e->regions_key, doc);
    if (rc < 0)
        kvf__err_wrap(rc, "engine %s: publishing its regions", e->sid);
    /* Only now may shm senders learn the generation: one that sees it refreshes from the store
     * and finds this list (or a newer one). If the store set failed the word still moves, so
     * shm senders fail closed (their refresh finds an older list) instead of writing into a
     * region unregistered locally but not yet unpublished. */
    __atomic_store_n(&e->shm_word.gen, gen, __ATOMIC_RELEASE);
out_unlock:
    pthread_mutex_unlock(&e->publish_lock);
    return rc;
}

/* Parse a regions record into a sorted array. Untrusted input (anyone may write the store):
 * malformed records are refused, never half-used. */
int kvf__eng_parse_regions(const char *sid, const void *text, size_t len, kvf_region_t **out,
                           size_t *n, uint64_t *gen)
{
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, 0, &jerr);
    json_t *list = doc ? json_object_get(doc, "regions") : NULL;
    json_t *g = doc ? json_object_get(doc, "gen") : NULL;
    kvf_region_t *rs = NULL;
    size_t count, i;
    int rc = 0;

    if (!doc || !json_is_array(list) || !json_is_integer(g)) {
        rc = kvf__err(-KVF_EPROTO, "peer %s: malformed regions record%s%s", sid,
                      doc ? "" : ": ", doc ? "" : jerr.text);
        goto out;
    }
    count = json_array_size(list);
    rs = calloc(count ? count : 1, sizeof(*rs));
    if (!rs) {
        rc = kvf__err(-KVF_ENOMEM, "peer %s: out of memory for %zu regions", sid, count);
        goto out;
    }
    for (i = 0; i < count; i++) {
        json_t *r = json_array_get(list, i);
        json_t *a = json_object_get(r, "addr");
        json_t *l = json_object_get(r, "len");
        char *end;
        const char *as = json_string_value(a);
        errno = 0;
        unsigned long long addr = as ? strtoull(as, &end, 16) : 0;
        /* Sorted, non-overlapping, and no range wrapping past 2^64 (checked by subtraction). */
        if (!as || *end || errno || !json_is_integer(l) || json_integer_value(l) <= 0 ||
            (uint64_t)json_integer_value(l) - 1 > UINT64_MAX - addr ||
            (i > 0 && (addr < rs[i - 1].addr || addr - rs[i - 1].addr < rs[i - 1].len))) {
            rc = kvf__err(-KVF_EPROTO, "peer %s: malformed region %zu in its regions record",
                          sid, i);
            goto out;
        }
        rs[i].addr = addr;
        rs[i].len = (uint64_t)json_integer_value(l);
        json_t *rg = json_object_get(r, "gen");
        rs[i].gen = json_is_integer(rg) ? (uint64_t)json_integer_value(rg) : 0;
    }
    *out = rs;
    *n = count;
    *gen = (uint64_t)json_integer_value(g);
    rs = NULL;
out:
    free(rs);
    json_decref(doc);
    return rc;
}

bool kvf__eng_closing(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->busy_lock);
    bool closing = e->closing;
    pthread_mutex_unlock(&e->busy_lock);
    return closing;
}

/* Slice of a long get-with-wait: destroy sets `closing`, and a caller waiting for a peer to
 * appear notices within this instead of holding destroy up for the whole init timeout. */
#define ENG_WAIT_SLICE_MS 200u

_Thread_local const atomic_bool *kvf__eng_cancel_flag;

int kvf__eng_store_get_wait(kvf_engine_t *e, const char *key, uint32_t wait_ms, void **val,
                            size_t *len)
{
    uint64_t deadline = kvf__now_ms() + wait_ms;
    for (;;) {
        uint64_t now = kvf__now_ms();
        uint32_t slice = 0;
        if (now < deadline)
            slice = deadline - now < ENG_WAIT_SLICE_MS ? (uint32_t)(deadline - now)
                                                       : ENG_WAIT_SLICE_MS;
        int rc = kvf_store_get(e->store, key, slice, val, len);
        if (rc != -KVF_ETIMEDOUT || kvf__now_ms() >= deadline)
            return rc;
        if (kvf__eng_closing(e))
            return kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
        if (kvf__eng_cancel_flag && atomic_load(kvf__eng_cancel_flag))
            return kvf__err(-KVF_ECANCELED, "cancelled while waiting for %s", key);
    }
}

/* Fetch @sid's regions from the store, waiting up to @wait_ms for the record to appear. */
static int fetch_regions(kvf_engine_t *e, const char *sid, uint32_t wait_ms, kvf_region_t **out,
                         size_t *n, uint64_t *gen)
{
    char key[ENG_KEY_MAX];
    void *val;
    size_t len;

    kvf__eng_make_key(key, sizeof(key), e->ns, "regions", sid);
    int rc = kvf__eng_store_get_wait(e, key, wait_ms, &val, &len);
    if (rc == -KVF_ETIMEDOUT || rc == -KVF_ENOTFOUND)
        return kvf__err(-KVF_ENOTFOUND,
                        "peer session %s did not appear in the store %s within %u ms "
                        "(is it running, with the same --store-url?)",
                        sid, kvf_store_url(e->store), wait_ms);
    if (rc < 0)
        return kvf__err_wrap(rc, "looking up peer session %s", sid);
    rc = kvf__eng_parse_regions(sid, val, len, out, n, gen);
    free(val);
    return rc;
}

/* ---- peers ---------------------------------------------------------------------------------- */

static void peer_free(eng_peer_t *p)
{
    if (p->tp)
        p->tops->peer_close(p->tp);
    if (p->ntp)
        p->nops->peer_close(p->ntp);
    pthread_rwlock_destroy(&p->sel);
    pthread_mutex_destroy(&p->lock);
    free(p->regions);
    free(p);
}

static eng_peer_t *peer_find_locked(kvf_engine_t *e, const char *sid)
{
    for (eng_peer_t *p = e->peers; p; p = p->next)
        if (!strcmp(p->sid, sid))
            return p;
    return NULL;
}

/* What the peer's session record says about reaching it. The record is published right after
 * the regions record, so it may lag by a moment: wait for it up to @wait_ms. A peer without one
 * (or with a malformed one) is still reachable over tcp. */
static void fetch_session(kvf_engine_t *e, const char *sid, uint32_t wait_ms, kvf_tpeer_desc_t *d)
{
    char key[ENG_KEY_MAX];
    void *val;
    size_t len;

    kvf__eng_make_key(key, sizeof(key), e->ns, "sessions", sid);
    if (kvf__eng_store_get_wait(e, key, wait_ms, &val, &len) == 0) {
        kvf__eng_parse_session(val, len, d);
        free(val);
    }
}

/* Open a handle for notifications to @p when its path cannot carry them: on the next transport
 * of the table after the path's (@i) that can (shm: tcp, which connects on first use). */
static int peer_open_notify(kvf_engine_t *e, eng_peer_t *p, size_t i, const kvf_tpeer_desc_t *d)
{
    int rc = -KVF_ENOTSUP;
    for (size_t j = i + 1; kvf__transports[j]; j++) {
        const struct kvf_transport_ops *o = kvf__transports[j];
        if (!(o->caps & KVF_TCAP_NOTIFY))
            continue;
        rc = o->peer_open(e->tr[j], d, &p->ntp);
        if (rc == 0)
            p->nops = o;
        if (rc != -KVF_ENOTSUP)
            return rc;
    }
    return kvf__err(rc, "no transport carries notifications to peer %s over %s", p->sid,
                    kvf__transports[i]->name);
}

/*
 * Choose the path to @p and open it: the first transport of kvf__transports (loop, shm, tcp)
 * whose peer_open() does not answer -KVF_ENOTSUP, or only the one config.transport forces
 * (tcp: loop and shm are skipped; shm: loop is skipped). Forcing a transport that cannot reach
 * the peer is an error naming the reason; in auto mode the reason a transport the peers offer
 * could not be used is logged once at info level. Called with @p->sel held exclusive (or before
 * @p is shared).
 */
static int peer_select(kvf_engine_t *e, eng_peer_t *p)
{
    const char *forced = forced_name(&e->cfg);
    const struct kvf_transport_ops *o = NULL;
    kvf_tpeer_desc_t d;
    bool have_record = false;
    char why[512] = "";
    size_t i, wl = 0;
    int rc;

    if (p->tp)
        p->tops->peer_close(p->tp);
    if (p->ntp)
        p->nops->peer_close(p->ntp);
    p->tp = NULL;
    p->ntp = NULL;
    p->tops = NULL;
    p->nops = NULL;
    memset(&d, 0, sizeof(d));
    d.sid = p->sid;
    rc = kvf__session_id_parse(p->sid, &d.addr);
    if (rc < 0)
        return rc;

    rc = -KVF_ENOTSUP;
    for (i = 0; kvf__transports[i]; i++) {
        o = kvf__transports[i];
        if (forced && strcmp(o->name, forced) != 0)
            continue;
        if ((o->caps & KVF_TCAP_RECORD) && !have_record) {
            fetch_session(e, p->sid, e->cfg.init_timeout_ms, &d);
            have_record = true;
        }
        rc = o->peer_open(e->tr[i], &d, &p->tp);
        if (rc != -KVF_ENOTSUP)
            break;
        if (forced)
            return kvf__err_wrap(rc, "transport %s is forced (config.transport or "
                                     "KVFERRY_TRANSPORT) but cannot reach peer %s",
                                 o->name, p->sid);
        /* A transport peers offer that cannot reach this one is worth a line: the user may have
         * expected it. One that reaches only some peers by nature (loop) is not. */
        if ((o->caps & KVF_TCAP_OFFER) && wl < sizeof(why))
            wl += (size_t)snprintf(why + wl, sizeof(why) - wl, "%snot %s: %s", wl ? "; " : "",
                                   o->name, kvf_last_error());
    }
    if (!kvf__transports[i])
        return kvf__err(rc, "no transport reaches peer %s", p->sid);
    if (rc < 0)
        return rc;
    if (!(o->caps & KVF_TCAP_NOTIFY)) {
        rc = peer_open_notify(e, p, i, &d);
        if (rc < 0) {
            o->peer_close(p->tp);
            p->tp = NULL;
            return rc;
        }
    }
    if (why[0] && !p->fallback_logged)
        KVF_INFO(ENG_LOG, "engine %s: peer %s over %s, %s", e->sid, p->sid, o->name, why);
    p->fallback_logged |= why[0] != 0;
    p->via = o->name;
    p->tops = o;
    pthread_mutex_lock(&p->lock);
    p->tops->regions_changed(p->tp, p->regions, p->nregions);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

/*
 * The cached peer for @sid, or a new one after its regions record appeared in the store (waiting
 * up to init_timeout_ms). The lookup runs without peers_lock so that a slow peer does not hold up
 * transfers to others; if two threads race, the first insert wins and the other is discarded.
 */
static int peer_get(kvf_engine_t *e, const char *sid, eng_peer_t **out)
{
    kvf_hostport_t addr;
    eng_peer_t *p;
    int rc;

    pthread_mutex_lock(&e->peers_lock);
    p = peer_find_locked(e, sid);
    pthread_mutex_unlock(&e->peers_lock);
    if (p) {
        *out = p;
        return 0;
    }
    rc = kvf__session_id_parse(sid, &addr);
    if (rc < 0)
        return rc;
    if (addr.port == 0)
        return kvf__err(-KVF_EINVAL, "peer session id %s: port 0 names no peer", sid);
    p = calloc(1, sizeof(*p));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "peer %s: out of memory", sid);
    snprintf(p->sid, sizeof(p->sid), "%s", sid);
    pthread_mutex_init(&p->lock, NULL);
    /* Writer preference: a re-selection must not starve behind a stream of transfers. */
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&p->sel, &ra);
    pthread_rwlockattr_destroy(&ra);
    atomic_init(&p->reselect, false);
    rc = fetch_regions(e, sid, e->cfg.init_timeout_ms, &p->regions, &p->nregions, &p->gen);
    if (rc < 0)
        goto out_free;
    rc = peer_select(e, p);
    if (rc < 0)
        goto out_free;

    pthread_mutex_lock(&e->peers_lock);
    eng_peer_t *other = peer_find_locked(e, sid);
    if (!other) {
        p->next = e->peers;
        e->peers = p;
    }
    pthread_mutex_unlock(&e->peers_lock);
    if (other) {
        peer_free(p);
        p = other;
    }
    KVF_DEBUG(ENG_LOG, "engine %s: peer %s found with %zu regions, via %s", e->sid, sid,
              p->nregions, p->via);
    *out = p;
    return 0;

out_free:
    peer_free(p);
    return rc;
}

/* Re-read the peer's regions from the store (no wait: it exists, or existed). A list older than
 * the cached one (two refreshes racing) is dropped, so the cache never goes back in time. */
static int peer_refresh(kvf_engine_t *e, eng_peer_t *p)
{
    kvf_region_t *rs;
    size_t n;
    uint64_t gen;
    int rc = fetch_regions(e, p->sid, 0, &rs, &n, &gen);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&p->lock);
    if (gen >= p->gen) {
        free(p->regions);
        p->regions = rs;
        p->nregions = n;
        p->gen = gen;
        rs = NULL;
        if (p->tp)
            p->tops->regions_changed(p->tp, p->regions, p->nregions);
    }
    pthread_mutex_unlock(&p->lock);
    free(rs);
    return 0;
}

/* The peer process went away (or restarted under the same session id): forget its regions and
 * choose its path again, once, by whichever transfer comes first. */
static int peer_reselect(kvf_engine_t *e, eng_peer_t *p)
{
    int rc = 0;
    pthread_rwlock_wrlock(&p->sel);
    if (atomic_load(&p->reselect)) {
        pthread_mutex_lock(&p->lock);
        p->gen = 0;
        pthread_mutex_unlock(&p->lock);
        rc = peer_refresh(e, p);
        if (rc == 0)
            rc = peer_select(e, p);
        if (rc == 0)
            atomic_store(&p->reselect, false);
    }
    pthread_rwlock_unlock(&p->sel);
    return rc;
}

/* The sender's fast-fail: every element must lie inside one of the peer's published regions.
 * Returns 0 or -KVF_ENOTREG naming the first element that does not. */
static int peer_check(eng_peer_t *p, const kvf_xfer_t *x, size_t n, size_t *bad)
{
    int rc = 0;
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = kvf__regions_check(p->regions, p->nregions, x[i].remote, x[i].len);
        if (rc < 0) {
            kvf__err_wrap(rc, "element %zu (%s)", i, x[i].op == KVF_OP_WRITE ? "write" : "read");
            *bad = i;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

/*
 * For shm the sender's check is the only one, so make the cached list current first: read the
 * target's live generation and refresh if the cache is older. Once a target's unregister has
 * returned, its word carries the new generation and the store the list without the region.
 */
static int peer_make_current(kvf_engine_t *e, eng_peer_t *p)
{
    uint64_t live;
    int rc = p->tops->regions_gen(p->tp, &live);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&p->lock);
    bool stale = live > p->gen;
    pthread_mutex_unlock(&p->lock);
    if (!stale)
        return 0;
    rc = peer_refresh(e, p);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&p->lock);
    uint64_t have = p->gen;
    pthread_mutex_unlock(&p->lock);
    if (live > have)
        return kvf__err(-KVF_ESTALE, "peer %s: its regions record in the store (generation %" PRIu64
                                     ") is older than its live generation %" PRIu64
                                     "; refusing to write unchecked",
                        p->sid, have, live);
    return 0;
}

bool kvf__eng_peer_known(kvf_engine_t *e, const char *sid)
{
    pthread_mutex_lock(&e->peers_lock);
    bool known = peer_find_locked(e, sid) != NULL;
    pthread_mutex_unlock(&e->peers_lock);
    return known;
}

int kvf_engine_peer_transport(kvf_engine_t *e, const char *peer, const char **name)
{
    if (!e || !peer || !name)
        return kvf__err(-KVF_EINVAL, "peer transport: NULL argument");
    pthread_mutex_lock(&e->peers_lock);
    eng_peer_t *p = peer_find_locked(e, peer);
    if (p) {
        pthread_rwlock_rdlock(&p->sel);
        *name = p->via;
        pthread_rwlock_unlock(&p->sel);
    }
    pthread_mutex_unlock(&e->peers_lock);
    return p ? 0 : kvf__err(-KVF_ENOTFOUND, "engine %s has not transferred to peer %s", e->sid,
                            peer);
}

/* ---- create / destroy ----------------------------------------------------------------------- */

/* Destroy the transports created, in the reverse order of their creation (the listener last). */
static void transports_destroy(kvf_engine_t *e)
{
    size_t n = 0;
    while (kvf__transports[n])
        n++;
    for (size_t i = n; i-- > 0;)
        if (i != e->listener && e->tr[i])
            kvf__transports[i]->destroy(e->tr[i]);
    if (e->tr[e->listener])
        kvf__transports[e->listener]->destroy(e->tr[e->listener]);
}

int kvf_engine_create(const char *store_url, const char *session_id, kvf_role_t role,
                      int device_id, const kvf_config_t *cfg, kvf_engine_t **out)
{
    kvf_hostport_t listen;
    kvf_store_url_t surl;
    kvf_engine_t *e;
    int rc;

    if (!out)
        return kvf__err(-KVF_EINVAL, "engine create: the output pointer is NULL");
    *out = NULL;
    if (!store_url)
        return kvf__err(-KVF_EINVAL, "engine create: the store URL is NULL");
    rc = kvf__store_url_parse(store_url, 0, &surl);
    if (rc < 0)
        return rc;
    if (!session_id)
        return kvf__err(-KVF_EINVAL, "engine create: the session id is NULL");
    rc = kvf__session_id_parse(session_id, &listen);
    if (rc < 0)
        return rc;
    if ((unsigned)role > KVF_ROLE_BOTH)
        return kvf__err(-KVF_EINVAL, "engine create: role %d: want Prefill (0), Decode (1) or "
                                     "Both (2)",
                        (int)role);
    if (device_id < 0)
        return kvf__err(-KVF_EINVAL, "engine create: device id %d: want >= 0", device_id);

    e = calloc(1, sizeof(*e));
    if (!e)
        return kvf__err(-KVF_ENOMEM, "engine create: out of memory");
    rc = config_load(cfg, &e->cfg);
    if (rc < 0)
        goto out_free;
    snprintf(e->ns, sizeof(e->ns), "%s", e->cfg.ns);
    e->cfg.ns = e->ns;
    e->role = role;
    e->device_id = device_id;
    while (kvf__transports[e->listener] &&
           !(kvf__transports[e->listener]->caps & KVF_TCAP_LISTEN))
        e->listener++;
    /* The nonce tells this engine's word apart from whatever another process (a restart, a
     * reused pid) keeps at the same address. */
    e->shm_word.magic = KVF_SHM_WORD_MAGIC;
    if (getrandom(&e->shm_word.nonce, sizeof(e->shm_word.nonce), GRND_NONBLOCK) !=
        (ssize_t)sizeof(e->shm_word.nonce))
        e->shm_word.nonce = kvf__now_ms() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)e;
    pthread_mutex_init(&e->publish_lock, NULL);
    pthread_mutex_init(&e->peers_lock, NULL);
    pthread_mutex_init(&e->busy_lock, NULL);
    pthread_mutex_init(&e->mem_lock, NULL);
    rc = kvf__cond_init_monotonic(&e->busy_cond);
    if (rc < 0)
        goto out_destroy_locks;
    KVF_DEBUG(ENG_LOG, "device id %d: host memory (no device memory kinds are built)", device_id);

    rc = kvf__async_init(e);
    if (rc < 0)
        goto out_destroy_cond;
    rc = kvf__regions_create(&e->regions);
    if (rc < 0)
        goto out_async;

    /* Listen first: the port is the session's identity, and holding it proves that no live
     * engine on this host owns the session id, so a record left in the store is a dead one's. */
    kvf_transport_params_t tp = {
        .local_sid = session_id,
        .listen = listen,
        .regions = e->regions,
        .conns_per_peer = e->cfg.tcp_conns_per_peer,
        .chunk_bytes = e->cfg.tcp_chunk_bytes,
        .connect_timeout_ms = e->cfg.init_timeout_ms,
        .notify_cb = kvf__notify_deliver,
        .notify_arg = e,
    };
    rc = kvf__transports[e->listener]->create(&tp, &e->tr[e->listener]);
    if (rc == -EADDRINUSE) {
        rc = kvf__err(rc, "session id %s is already in use: another engine or process holds "
                          "port %u on this host",
                      session_id, listen.port);
        goto out_regions;
    }
    if (rc == -EADDRNOTAVAIL) {
        rc = kvf__err(rc, "session id %s: %s is not an address of this host", session_id,
                      listen.host);
        goto out_regions;
    }
    if (rc < 0)
        goto out_regions;
    listen.port = kvf_engine_port(e);
    kvf__hostport_format(&listen, e->sid, sizeof(e->sid));
    kvf__eng_make_key(e->session_key, sizeof(e->session_key), e->ns, "sessions", e->sid);
    kvf__eng_make_key(e->regions_key, sizeof(e->regions_key), e->ns, "regions", e->sid);
    /* The memfd socket is named after the session (unique on the host while the port is held);
     * an engine forced to tcp offers no shm and so serves no memfds. */
    char sock[ENG_KEY_MAX];
    snprintf(sock, sizeof(sock), "kvferry/%s/%s", e->ns, e->sid);
    tp.local_sid = e->sid;
    for (size_t i = 0; kvf__transports[i]; i++) {
        if (i == e->listener)
            continue;
        tp.memfd_sock = offered(e, kvf__transports[i]) ? sock : NULL;
        rc = kvf__transports[i]->create(&tp, &e->tr[i]);
        if (rc < 0)
            goto out_transport;
    }

    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    so.connect_timeout_ms = e->cfg.init_timeout_ms;
    rc = kvf_store_open(store_url, &so, &e->store);
    if (rc < 0)
        goto out_transport;
    rc = kvf_store_lease_grant(e->store, e->cfg.lease_ttl_ms, &e->lease);
    if (rc < 0)
        goto out_store;

    void *old;
    size_t old_len;
    if (kvf_store_get(e->store, e->session_key, 0, &old, &old_len) == 0) {
        KVF_INFO(ENG_LOG, "session %s: taking over the record of an engine that is gone", e->sid);
        free(old);
    }
    /* Regions first: a peer that sees the session record can then always find its regions. */
    rc = publish_regions(e);
    if (rc < 0)
        goto out_store;
    rc = publish_session(e);
    if (rc < 0)
        goto out_store;
    for (size_t i = 0; kvf__transports[i]; i++)
        kvf__transports[i]->start(e->tr[i]);
    KVF_INFO(ENG_LOG, "engine %s (%s) ready, store %s", e->sid, kvf_role_name(role), store_url);
    *out = e;
    return 0;

out_store:
    kvf__err_wrap(rc, "engine %s: store %s", e->sid, store_url);
    kvf_store_close(e->store);
out_transport:
    transports_destroy(e);
out_regions:
    kvf__regions_destroy(e->regions);
out_async:
    kvf__async_fini(e);
out_destroy_cond:
    pthread_cond_destroy(&e->busy_cond);
out_destroy_locks:
    pthread_mutex_destroy(&e->mem_lock);
    pthread_mutex_destroy(&e->busy_lock);
    pthread_mutex_destroy(&e->peers_lock);
    pthread_mutex_destroy(&e->publish_lock);
out_free:
    free(e);
    return rc;
}

void kvf_engine_shutdown(kvf_engine_t *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->busy_lock);
    e->closing = true;
    pthread_mutex_unlock(&e->busy_lock);
    kvf__async_wake(e);
}

void kvf_engine_destroy(kvf_engine_t *e)
{
    if (!e)
        return;
    /* Stopped first: this waits for loop transfers from other engines of this process into
     * this one to leave, and no new one can find it. */
    for (size_t i = 0; kvf__transports[i]; i++)
        kvf__transports[i]->stop(e->tr[i]);
    /* New calls are refused from here on; running transfers are bounded by op_timeout_ms, and
     * those waiting for a peer notice `closing` within ENG_WAIT_SLICE_MS. */
    kvf_engine_shutdown(e);
    /* Queued batches fail with -KVF_ECLOSED; running ones end within op_timeout_ms. */
    kvf__async_stop(e);
    pthread_mutex_lock(&e->busy_lock);
    while (e->busy)
        pthread_cond_wait(&e->busy_cond, &e->busy_lock);
    pthread_mutex_unlock(&e->busy_lock);

    /* Closing the store client revokes the lease, which withdraws both records at once instead
     * of letting them linger for a TTL. Best effort and bounded: with the store down they
     * expire on their own. */
    kvf_store_close(e->store);

    for (eng_peer_t *p = e->peers, *next; p; p = next) {
        next = p->next;
        peer_free(p);
    }
    transports_destroy(e);
    kvf__regions_destroy(e->regions);
    /* No transport delivers notifications and no batch is left. */
    kvf__async_fini(e);
    /* Nothing serves or transfers any more: what kvf_mem_alloc() handed out goes now. */
    for (eng_mem_t *m = e->mems, *next; m; m = next) {
        next = m->next;
        munmap(m->addr, m->map_len);
        close(m->fd);
        free(m);
    }
    pthread_mutex_destroy(&e->mem_lock);
    pthread_cond_destroy(&e->busy_cond);
    pthread_mutex_destroy(&e->busy_lock);
    pthread_mutex_destroy(&e->peers_lock);
    pthread_mutex_destroy(&e->publish_lock);
    KVF_INFO(ENG_LOG, "engine %s destroyed", e->sid);
    free(e);
}

/* ---- in-flight calls ------------------------------------------------------------------------ */

int kvf__eng_busy_enter(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->busy_lock);
    bool closing = e->closing;
    if (!closing)
        e->busy++;
    pthread_mutex_unlock(&e->busy_lock);
    return closing ? kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid) : 0;
}

void kvf__eng_busy_leave(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->busy_lock);
    if (--e->busy == 0)
        pthread_cond_broadcast(&e->busy_cond);
    pthread_mutex_unlock(&e->busy_lock);
}

/* ---- registration --------------------------------------------------------------------------- */

/* Fault the pages in now, so that the first transfer into them runs at memory speed instead of
 * page-fault speed. MADV_POPULATE_WRITE (Linux 5.14) does it without touching the contents; for
 * read-only memory (a source that peers only read) MADV_POPULATE_READ does what can be done.
 * Nothing here ever stores to the range: it may be read-only, and a store could race with the
 * application's own writes. Where neither advice exists the first transfer pays the faults. */
static void prefault(void *addr, size_t len)
{
    long psz = sysconf(_SC_PAGESIZE);
    uintptr_t page = (uintptr_t)(psz > 0 ? psz : 4096);
    uintptr_t start = (uintptr_t)addr & ~(page - 1);
    uintptr_t end = (uintptr_t)addr + len;
#if defined(MADV_POPULATE_WRITE) && defined(MADV_POPULATE_READ)
    if (madvise((void *)start, end - start, MADV_POPULATE_WRITE) == 0 ||
        madvise((void *)start, end - start, MADV_POPULATE_READ) == 0)
        return;
    KVF_DEBUG(ENG_LOG, "prefault [%p, +%zu): %s", addr, len, strerror(errno));
#else
    (void)start;
    (void)end;
#endif
}

int kvf_mem_register(kvf_engine_t *e, void *addr, size_t len)
{
    if (!e)
        return kvf__err(-KVF_EINVAL, "register: the engine is NULL");
    return kvf_mem_register_batch(e, &addr, &len, 1);
}

int kvf_mem_register_batch(kvf_engine_t *e, void *const *addrs, const size_t *lens, size_t n)
{
    uint64_t *a, *l;
    int rc;

    if (!e)
        return kvf__err(-KVF_EINVAL, "register: the engine is NULL");
    if (n == 0 || !addrs || !lens)
        return kvf__err(-KVF_EINVAL, "register: %s", n ? "NULL address or length array"
                                                      : "empty batch");
    for (size_t i = 0; i < n; i++)
        if (!addrs[i])
            return kvf__err(-KVF_EINVAL, "register: element %zu: address is NULL", i);
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    a = malloc(n * sizeof(*a));
    l = malloc(n * sizeof(*l));
    if (!a || !l) {
        rc = kvf__err(-KVF_ENOMEM, "register: out of memory for %zu ranges", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        a[i] = (uintptr_t)addrs[i];
        l[i] = lens[i];
    }
    rc = kvf__regions_add_batch(e->regions, a, l, n);
    if (rc < 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        prefault(addrs[i], lens[i]);
    rc = publish_regions(e);
    if (rc < 0) {
        /* Peers could not learn of the ranges: undo, so that the caller's view and theirs agree. */
        for (size_t i = 0; i < n; i++)
            kvf__regions_remove(e->regions, a[i], e->cfg.op_timeout_ms);
        goto out;
    }
    KVF_DEBUG(ENG_LOG, "engine %s: registered %zu range(s), first [%p, +%zu)", e->sid, n,
              addrs[0], lens[0]);
out:
    free(a);
    free(l);
    kvf__eng_busy_leave(e);
    return rc;
}

int kvf_mem_unregister(kvf_engine_t *e, void *addr)
{
    if (!e)
        return kvf__err(-KVF_EINVAL, "unregister: the engine is NULL");
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    rc = kvf__regions_remove(e->regions, (uintptr_t)addr, e->cfg.op_timeout_ms);
    /* Publish even after a drain timeout: the region is gone for new requests either way. A
     * failed publication does not fail the call: the target's own table already refuses the
     * range, and the next successful publication carries the change. */
    if (rc == 0 || rc == -KVF_ETIMEDOUT) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", kvf_last_error());
        if (publish_regions(e) < 0) {
            KVF_WARN(ENG_LOG, "engine %s: unregistered %p, but publishing the change failed: %s",
                     e->sid, addr, kvf_last_error());
            kvf__err(rc, "%s", msg);
        }
    }
    kvf__eng_busy_leave(e);
    return rc;
}

/* ---- kvf_mem_alloc memory ------------------------------------------------------------------- */

/* A memfd of @map_len bytes mapped shared, huge pages when @huge. The huge attempt faults the
 * pages in here: with no huge pages left, a later first touch would be SIGBUS, while
 * MADV_POPULATE_WRITE fails cleanly. Returns 0 or -errno of the step that failed. */
static int mem_map(size_t map_len, bool huge, eng_mem_t *m)
{
    unsigned flags = MFD_CLOEXEC;
    int rc;
    if (huge) {
#if defined(MFD_HUGETLB) && defined(MADV_POPULATE_WRITE)
        flags |= MFD_HUGETLB;
#else
        return -ENOTSUP;
#endif
    }
    m->fd = memfd_create("kvferry", flags);
    if (m->fd < 0)
        return -errno;
    if (ftruncate(m->fd, (off_t)map_len) < 0) {
        rc = -errno;
        goto out_close;
    }
    m->addr = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, m->fd, 0);
    if (m->addr == MAP_FAILED) {
        rc = -errno;
        goto out_close;
    }
#ifdef MADV_POPULATE_WRITE
    if (huge && madvise(m->addr, map_len, MADV_POPULATE_WRITE) < 0) {
        rc = -errno;
        munmap(m->addr, map_len);
        goto out_close;
    }
#endif
    m->map_len = map_len;
    m->huge = huge;
    return 0;
out_close:
    close(m->fd);
    m->fd = -1;
    return rc;
}

/* Offer @m to every transport that serves memory (shm), or to none. */
static int mem_export(kvf_engine_t *e, const eng_mem_t *m)
{
    for (size_t i = 0; kvf__transports[i]; i++) {
        int rc = kvf__transports[i]->mem_export(e->tr[i], m->addr, m->len, m->fd);
        if (rc < 0) {
            while (i-- > 0)
                kvf__transports[i]->mem_unexport(e->tr[i], m->addr);
            return rc;
        }
    }
    return 0;
}

static void mem_unexport(kvf_engine_t *e, void *addr)
{
    for (size_t i = 0; kvf__transports[i]; i++)
        kvf__transports[i]->mem_unexport(e->tr[i], addr);
}

int kvf_mem_alloc(kvf_engine_t *e, size_t len, void **out)
{
    long psz = sysconf(_SC_PAGESIZE);
    size_t page = psz > 0 ? (size_t)psz : 4096;
    eng_mem_t *m;
    int rc;

    if (!e)
        return kvf__err(-KVF_EINVAL, "mem alloc: the engine is NULL");
    if (!out)
        return kvf__err(-KVF_EINVAL, "mem alloc: the output pointer is NULL");
    *out = NULL;
    if (len == 0)
        return kvf__err(-KVF_EINVAL, "mem alloc: length is 0; want at least 1 byte");
    if (len > (SIZE_MAX >> 2))
        return kvf__err(-KVF_EINVAL, "mem alloc: length %zu is larger than any memory", len);
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    m = calloc(1, sizeof(*m));
    if (!m) {
        rc = kvf__err(-KVF_ENOMEM, "mem alloc: out of memory");
        goto out;
    }
    m->len = len;
    rc = -ENOTSUP;
    if (e->cfg.mem_huge_pages) {
        rc = mem_map((len + ENG_HUGE_PAGE - 1) & ~(size_t)(ENG_HUGE_PAGE - 1), true, m);
        if (rc < 0)
            KVF_INFO(ENG_LOG, "engine %s: mem alloc of %zu bytes: no huge pages (%s), using "
                              "normal pages",
                     e->sid, len, strerror(-rc));
    }
    if (rc < 0)
        rc = mem_map((len + page - 1) & ~(page - 1), false, m);
    if (rc < 0) {
        rc = kvf__err(rc, "mem alloc of %zu bytes: memfd: %s", len, strerror(-rc));
        goto out_free;
    }
    /* Exported before it is registered: the memfd socket answers only for registered regions,
     * and a sender asking as soon as the region is published must get the fd. */
    rc = mem_export(e, m);
    if (rc < 0)
        goto out_unmap;
    rc = kvf_mem_register(e, m->addr, len); /* faults the pages in */
    if (rc < 0)
        goto out_unexport;
    pthread_mutex_lock(&e->mem_lock);
    m->next = e->mems;
    e->mems = m;
    pthread_mutex_unlock(&e->mem_lock);
    KVF_DEBUG(ENG_LOG, "engine %s: mem alloc [%p, +%zu), %s pages", e->sid, m->addr, len,
              m->huge ? "huge" : "normal");
    *out = m->addr;
    goto out;

out_unexport:
    mem_unexport(e, m->addr);
out_unmap:
    munmap(m->addr, m->map_len);
    close(m->fd);
out_free:
    free(m);
out:
    kvf__eng_busy_leave(e);
    return rc;
}

int kvf_mem_free(kvf_engine_t *e, void *ptr)
{
    eng_mem_t *m = NULL;
    int rc;

    if (!e)
        return kvf__err(-KVF_EINVAL, "mem free: the engine is NULL");
    if (!ptr)
        return kvf__err(-KVF_EINVAL, "mem free: the pointer is NULL");
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&e->mem_lock);
    for (eng_mem_t **pp = &e->mems; *pp; pp = &(*pp)->next) {
        if ((*pp)->addr == ptr && !(*pp)->kept) {
            m = *pp;
            *pp = m->next;
            break;
        }
    }
    pthread_mutex_unlock(&e->mem_lock);
    if (!m) {
        rc = kvf__err(-KVF_EINVAL, "mem free: %p was not returned by kvf_mem_alloc() on engine "
                                   "%s (or is already freed)",
                      ptr, e->sid);
        goto out;
    }
    /* Unregister first: from its return no new transfer can reach the memory (shm senders see
     * the generation move and unmap), and the memfd socket no longer hands the fd out. */
    rc = kvf_mem_unregister(e, ptr);
    if (rc == -KVF_ETIMEDOUT) {
        /* Transfers still write into it: it must stay mapped, so it is kept until destroy. */
        m->kept = true;
        pthread_mutex_lock(&e->mem_lock);
        m->next = e->mems;
        e->mems = m;
        pthread_mutex_unlock(&e->mem_lock);
        kvf__err(rc, "mem free %p: transfers into it did not end within %u ms; it stays "
                     "allocated until kvf_engine_destroy()",
                 ptr, e->cfg.op_timeout_ms);
        goto out;
    }
    /* -KVF_ENOTREG: the caller unregistered it already; freeing is still right. */
    rc = 0;
    mem_unexport(e, ptr);
    munmap(m->addr, m->map_len);
    close(m->fd);
    free(m);
out:
    kvf__eng_busy_leave(e);
    return rc;
}

/* ---- transfers ------------------------------------------------------------------------------ */

int kvf__eng_check_xfers(const char *peer, const kvf_xfer_t *x, size_t n)
{
    if (!x || n == 0)
        return kvf__err(-KVF_EINVAL, "transfer to %s: %s", peer, x ? "empty batch" : "NULL batch");
    if (n > ENG_MAX_BATCH)
        return kvf__err(-KVF_EINVAL, "transfer to %s: %zu elements exceed %u", peer, n,
                        ENG_MAX_BATCH);
    for (size_t i = 0; i < n; i++) {
        if (x[i].op != KVF_OP_WRITE && x[i].op != KVF_OP_READ)
            return kvf__err(-KVF_EINVAL, "transfer to %s: element %zu: op %d is neither write "
                                         "nor read",
                            peer, i, (int)x[i].op);
        if (x[i].len == 0)
            return kvf__err(-KVF_EINVAL, "transfer to %s: element %zu: length is 0", peer, i);
        if (!x[i].local)
            return kvf__err(-KVF_EINVAL, "transfer to %s: element %zu: local address is NULL",
                            peer, i);
        if (x[i].remote + x[i].len < x[i].remote)
            return kvf__err(-KVF_EINVAL, "transfer to %s: element %zu: [0x%" PRIx64 ", +%zu) "
                                         "wraps around the address space",
                            peer, i, x[i].remote, x[i].len);
    }
    return 0;
}

/* Forget element results before running the batch again. */
static void status_reset(const kvf_xfer_ctl_t *ctl, size_t n)
{
    if (ctl && ctl->status)
        for (size_t i = 0; i < n; i++)
            ctl->status[i] = KVF_XFER_PENDING;
}

/* The element the sender's own check refused: its status says so; the others never started. */
static void status_refused(const kvf_xfer_ctl_t *ctl, int rc, size_t bad)
{
    if (ctl && ctl->status)
        ctl->status[bad] = rc;
}

/* Peer path already held (@p->sel shared): run the batch, checked as its transport's @check
 * says (see kvf_check_t). */
static int peer_transfer(kvf_engine_t *e, eng_peer_t *p, const kvf_xfer_t *x, size_t n,
                         uint64_t deadline, const kvf_xfer_ctl_t *ctl)
{
    size_t bad = 0;
    int rc;
    if (p->tops->check == KVF_CHECK_DIRECT)
        return p->tops->transfer(p->tp, x, n, deadline, ctl);
    if (p->tops->check == KVF_CHECK_SENDER) {
        rc = peer_make_current(e, p);
        if (rc == 0) {
            rc = peer_check(p, x, n, &bad);
            if (rc < 0)
                status_refused(ctl, rc, bad);
        }
        if (rc == 0)
            rc = p->tops->transfer(p->tp, x, n, deadline, ctl);
        return rc;
    }
    /* A miss in the cached regions may only mean the cache is old: refresh once and re-check. */
    rc = peer_check(p, x, n, &bad);
    if (rc == -KVF_ENOTREG && peer_refresh(e, p) == 0)
        rc = peer_check(p, x, n, &bad);
    if (rc < 0) {
        status_refused(ctl, rc, bad);
        return rc;
    }
    rc = p->tops->transfer(p->tp, x, n, deadline, ctl);
    /* The target's check is authoritative. If it refused a range our cache allowed, the peer
     * re-registered since we looked: refresh, and retry once if the range is still published. */
    if (rc == -KVF_ENOTREG && kvf__now_ms() < deadline && peer_refresh(e, p) == 0 &&
        peer_check(p, x, n, &bad) == 0) {
        status_reset(ctl, n);
        rc = p->tops->transfer(p->tp, x, n, deadline, ctl);
    }
    return rc;
}

/* The peer, looked up (waiting for it to appear) and its path chosen again if its process went
 * away, with its path held shared (@p->sel) on success. @what names the operation for errors. */
static int peer_enter(kvf_engine_t *e, const char *peer, const char *what, eng_peer_t **out)
{
    eng_peer_t *p;
    int rc = peer_get(e, peer, &p);
    if (rc < 0)
        return rc;
    if (atomic_load(&p->reselect)) {
        rc = peer_reselect(e, p);
        if (rc < 0)
            return kvf__err_wrap(rc, "%s to %s", what, peer);
    }
    pthread_rwlock_rdlock(&p->sel);
    *out = p;
    return 0;
}

/* Leave what peer_enter() entered. The process behind the peer is gone: the next call looks it
 * up again, since it may have restarted under the same session id (another pid, other memory,
 * maybe another host). */
static int peer_leave(eng_peer_t *p, int rc, const char *what)
{
    pthread_rwlock_unlock(&p->sel);
    if (rc == -KVF_EPEERGONE)
        atomic_store(&p->reselect, true);
    if (rc < 0)
        kvf__err_wrap(rc, "%s to %s", what, p->sid);
    return rc;
}

int kvf__eng_transfer(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                      uint64_t deadline, const kvf_xfer_ctl_t *ctl)
{
    eng_peer_t *p;
    int rc = peer_enter(e, peer, "transfer", &p);
    if (rc < 0)
        return rc;
    return peer_leave(p, peer_transfer(e, p, x, n, deadline, ctl), "transfer");
}

int kvf__eng_notify(kvf_engine_t *e, const char *peer, const void *msg, size_t len,
                    uint64_t deadline)
{
    eng_peer_t *p;
    int rc = peer_enter(e, peer, "notification", &p);
    if (rc < 0)
        return rc;
    if (p->ntp)
        rc = p->nops->notify(p->ntp, msg, len, deadline);
    else
        rc = p->tops->notify(p->tp, msg, len, deadline);
    return peer_leave(p, rc, "notification");
}

int kvf_transfer_sync(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n)
{
    if (!e)
        return kvf__err(-KVF_EINVAL, "transfer: the engine is NULL");
    if (!peer)
        return kvf__err(-KVF_EINVAL, "transfer: the peer session id is NULL");
    int rc = kvf__eng_check_xfers(peer, x, n);
    if (rc < 0)
        return rc;
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    rc = kvf__eng_transfer(e, peer, x, n, kvf__now_ms() + e->cfg.op_timeout_ms, NULL);
    kvf__eng_busy_leave(e);
    return rc;
}

int kvf_write(kvf_engine_t *e, const char *peer, const void *local, uint64_t remote, size_t len)
{
    kvf_xfer_t x = {.op = KVF_OP_WRITE, .local = (void *)local, .remote = remote, .len = len};
    return kvf_transfer_sync(e, peer, &x, 1);
}

int kvf_read(kvf_engine_t *e, const char *peer, void *local, uint64_t remote, size_t len)
{
    kvf_xfer_t x = {.op = KVF_OP_READ, .local = local, .remote = remote, .len = len};
    return kvf_transfer_sync(e, peer, &x, 1);
}

int kvf_peer_regions(kvf_engine_t *e, const char *peer, kvf_region_info_t **out, size_t *n)
{
    kvf_region_t *rs;
    size_t count;
    uint64_t gen;

    if (!e || !peer || !out || !n)
        return kvf__err(-KVF_EINVAL, "peer regions: NULL argument");
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    rc = fetch_regions(e, peer, e->cfg.init_timeout_ms, &rs, &count, &gen);
    if (rc < 0)
        goto out;
    kvf_region_info_t *info = calloc(count ? count : 1, sizeof(*info));
    if (!info) {
        free(rs);
        rc = kvf__err(-KVF_ENOMEM, "peer %s: out of memory", peer);
        goto out;
    }
    for (size_t i = 0; i < count; i++)
        info[i] = (kvf_region_info_t){.addr = rs[i].addr, .len = rs[i].len};
    free(rs);
    *out = info;
    *n = count;
out:
    kvf__eng_busy_leave(e);
    return rc;
}
