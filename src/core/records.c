/*
 * The engine's records in the store, both bound to its lease:
 *
 *   kvferry/v1/<ns>/sessions/<sid>  (the prefix is config.key_prefix) the session record (JSON: role, device, pid, boot id,
 *                                   network namespace, transports offered, the shm word's
 *                                   address: hints a same-host sender verifies)
 *   kvferry/v1/<ns>/regions/<sid>   its registered regions (JSON, with the table generation)
 *
 * Publishing this engine's, and fetching and parsing a peer's (untrusted input: anyone may write
 * the store).
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/host.h"
#include "core/core.h"

void kvf__eng_make_key(char *buf, size_t len, const kvf_engine_t *e, const char *kind,
                       const char *sid)
{
    snprintf(buf, len, "%s%s/%s/%s", e->prefix, e->ns, kind, sid);
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

/* The session record: among others, the transports it offers (see kvf__eng_offered()) and the
 * socket its kvf_mem_alloc memory is served on. */
int kvf__eng_publish_session(kvf_engine_t *e)
{
    char host[256] = "";
    const char *memfd_sock = "";
    gethostname(host, sizeof(host) - 1);
    json_t *tr = json_array();
    for (size_t i = 0; tr && kvf__transports[i]; i++) {
        const struct kvf_transport_ops *o = kvf__transports[i];
        if (kvf__eng_offered(e, o) && json_array_append_new(tr, json_string(o->name)) < 0) {
            json_decref(tr);
            tr = NULL;
        }
        if (!*memfd_sock)
            memfd_sock = o->mem_sock(e->tr[i]);
    }
    json_t *doc =
        json_pack("{s:i, s:s, s:s, s:i, s:i, s:s, s:s, s:o, s:s, s:s, s:s, s:I, s:I}", "version",
                  ENG_RECORD_VERSION, "session", e->sid, "role", kvf_role_name(e->role),
                  "device_id", e->device_id, "pid", (int)getpid(), "hostname", host, "kvferry",
                  KVF_VERSION_STRING, "transports", tr, "boot_id", kvf__host_boot_id(), "net_ns",
                  kvf__host_net_ns(), "memfd_socket", memfd_sock, "started_unix_ms",
                  (json_int_t)e->started_unix_ms, "lease_ttl_ms", (json_int_t)e->cfg.lease_ttl_ms);
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
    json_decref(doc);
}

/* Give the table to the transports whose senders read it from this process (shm). Under
 * publish_lock. */
static void publish_to_transports(kvf_engine_t *e, const kvf_region_t *rs, size_t n, uint64_t gen)
{
    for (size_t i = 0; kvf__transports[i]; i++)
        if (e->tr[i])
            kvf__transports[i]->regions_published(e->tr[i], rs, n, gen);
}

/* Publish the current region table. Holding publish_lock across snapshot and set keeps the
 * published generation monotonic when several threads register at once. */
int kvf__eng_publish_regions(kvf_engine_t *e)
{
    kvf_region_t *rs;
    size_t n;
    uint64_t gen;
    int rc;

    pthread_mutex_lock(&e->publish_lock);
    rc = kvf__regions_snapshot(e->regions, &rs, &n, &gen);
    if (rc < 0)
        goto out_unlock;
    /* Same-host senders read the table from this process, not from the store (from the shm
     * transport's shared table; the word keeps naming it too): they see the change from now
     * on, before any store round trip. The previous table goes once the word no longer names
     * it (a reader still copying it sees the seqlock move and reads again). */
    kvf__shm_word_set(&e->shm_word, rs, n, gen);
    publish_to_transports(e, rs, n, gen);
    free(e->shm_table);
    e->shm_table = rs;
    json_t *list = json_array();
    for (size_t i = 0; list && i < n; i++) {
        json_t *r = json_pack("{s:o, s:I, s:I}", "addr", hex_u64(rs[i].addr), "len",
                              (json_int_t)rs[i].len, "gen", (json_int_t)rs[i].gen);
        if (!r || json_array_append_new(list, r) < 0) {
            json_decref(list);
            list = NULL;
        }
    }
    /* "inc" tells this engine's records from those of an earlier engine under the same session
     * id, whose generations counted from 1 too (see kvf__eng_parse_regions). */
    json_t *doc = list ? json_pack("{s:I, s:o, s:o}", "gen", (json_int_t)gen, "inc",
                                   hex_u64(e->shm_word.nonce), "regions", list)
                       : NULL;
    rc = store_put_json(e, e->regions_key, doc);
    if (rc < 0)
        kvf__err_wrap(rc, "engine %s: publishing its regions", e->sid);
out_unlock:
    pthread_mutex_unlock(&e->publish_lock);
    return rc;
}

int kvf__eng_drain(kvf_engine_t *e, uint64_t deadline_ms)
{
    int rc = 0;
    for (size_t i = 0; kvf__transports[i] && rc == 0; i++)
        rc = kvf__transports[i]->drain(e->tr[i], deadline_ms);
    return rc;
}

void kvf__eng_withdraw_regions(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->publish_lock);
    uint64_t gen = __atomic_load_n(&e->shm_word.gen, __ATOMIC_RELAXED);
    kvf__shm_word_set(&e->shm_word, NULL, 0, gen + 1);
    publish_to_transports(e, NULL, 0, gen + 1);
    free(e->shm_table);
    e->shm_table = NULL;
    pthread_mutex_unlock(&e->publish_lock);
    int rc = kvf__eng_drain(e, kvf__now_ms() + e->cfg.op_timeout_ms);
    if (rc < 0)
        KVF_WARN(ENG_LOG, "engine %s: destroyed while a sender still copied: %s", e->sid,
                 kvf_last_error());
}

/* Parse a regions record into a sorted array. Untrusted input (anyone may write the store):
 * malformed records are refused, never half-used. A record without "inc" (an older engine's)
 * has incarnation 0. */
int kvf__eng_parse_regions(const char *sid, const void *text, size_t len, kvf_region_t **out,
                           size_t *n, uint64_t *gen, uint64_t *inc)
{
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, 0, &jerr);
    json_t *list = doc ? json_object_get(doc, "regions") : NULL;
    json_t *g = doc ? json_object_get(doc, "gen") : NULL;
    json_t *ij = doc ? json_object_get(doc, "inc") : NULL;
    const char *is = json_string_value(ij);
    kvf_region_t *rs = NULL;
    size_t count, i;
    int rc = 0;
    char *iend = NULL;
    errno = 0;
    unsigned long long incv = is ? strtoull(is, &iend, 16) : 0;

    if (!doc || !json_is_array(list) || !json_is_integer(g) || json_integer_value(g) < 0 ||
        (ij && (!is || !*is || *iend || errno))) {
        rc = kvf__err(-KVF_EPROTO, "peer %s: malformed regions record%s%s", sid, doc ? "" : ": ",
                      doc ? "" : jerr.text);
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
            rc = kvf__err(-KVF_EPROTO, "peer %s: malformed region %zu in its regions record", sid,
                          i);
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
    if (inc)
        *inc = incv;
    rs = NULL;
out:
    free(rs);
    json_decref(doc);
    return rc;
}

/* The tcp transport's record callback: a P2P record request for @key (common/p2p.h). Only this
 * engine's two records are answered, as the store holds them (with p2p:// that is the copy the
 * engine's own handle keeps). Inside a busy section, so that destroy, which closes the store,
 * waits for an answer being read. */
int kvf__eng_record_answer(void *arg, const char *key, void **val, size_t *len)
{
    kvf_engine_t *e = arg;
    /* The accept thread runs before create has filled the keys and the store: until then,
     * nothing of the engine is read here (the asker asks again). */
    if (!atomic_load(&e->records_ready))
        return kvf__err(-KVF_ENOTFOUND, "that engine is starting: its records are not "
                                        "published yet");
    if (strcmp(key, e->session_key) && strcmp(key, e->regions_key))
        return kvf__err(-KVF_ENOTFOUND,
                        "engine %s holds no record %s (another namespace or key prefix?)", e->sid,
                        key);
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    rc = kvf_store_get(e->store, key, 0, val, len);
    kvf__eng_busy_leave(e);
    return rc;
}

/* Slice of a long get-with-wait: destroy sets `closing`, and a caller waiting for a peer to
 * appear notices within this instead of holding destroy up for the whole init timeout. */
#define ENG_WAIT_SLICE_MS 200u

int kvf__eng_store_get_wait(kvf_engine_t *e, const char *key, uint32_t wait_ms,
                            const atomic_bool *cancel, void **val, size_t *len)
{
    uint64_t deadline = kvf__now_ms() + wait_ms;
    for (;;) {
        uint64_t now = kvf__now_ms();
        uint32_t slice = 0;
        if (now < deadline)
            slice =
                deadline - now < ENG_WAIT_SLICE_MS ? (uint32_t)(deadline - now) : ENG_WAIT_SLICE_MS;
        int rc = kvf_store_get(e->store, key, slice, val, len);
        if (rc != -KVF_ETIMEDOUT || kvf__now_ms() >= deadline)
            return rc;
        if (kvf__eng_closing(e))
            return kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
        if (cancel && atomic_load(cancel))
            return kvf__err(-KVF_ECANCELED, "cancelled while waiting for %s", key);
    }
}

/* Fetch @sid's regions from the store, waiting up to @wait_ms for the record to appear. */
int kvf__eng_fetch_regions(kvf_engine_t *e, const char *sid, uint32_t wait_ms,
                           const atomic_bool *cancel, kvf_region_t **out, size_t *n, uint64_t *gen,
                           uint64_t *inc)
{
    char key[ENG_KEY_MAX];
    void *val;
    size_t len;

    kvf__eng_make_key(key, sizeof(key), e, "regions", sid);
    int rc = kvf__eng_store_get_wait(e, key, wait_ms, cancel, &val, &len);
    if (rc == -KVF_ETIMEDOUT || rc == -KVF_ENOTFOUND) {
        /* The store's own words say why (with p2p://, what the peer answered, or that nobody
         * listens on its port). */
        char why[512];
        snprintf(why, sizeof(why), "%s", kvf_last_error());
        return kvf__err(-KVF_ENOTFOUND,
                        "peer session %s did not appear in the store %s within %u ms "
                        "(is it running, with the same --store-url?): %s",
                        sid, kvf_store_url(e->store), wait_ms, why);
    }
    if (rc < 0)
        return kvf__err_wrap(rc, "looking up peer session %s", sid);
    rc = kvf__eng_parse_regions(sid, val, len, out, n, gen, inc);
    free(val);
    return rc;
}

/* What the peer's session record says about reaching it. The record is published right after
 * the regions record, so it may lag by a moment: wait for it up to @wait_ms. A peer without one
 * (or with a malformed one) is still reachable over tcp. */
void kvf__eng_fetch_session(kvf_engine_t *e, const char *sid, uint32_t wait_ms,
                            const atomic_bool *cancel, kvf_tpeer_desc_t *d)
{
    char key[ENG_KEY_MAX];
    void *val;
    size_t len;

    kvf__eng_make_key(key, sizeof(key), e, "sessions", sid);
    if (kvf__eng_store_get_wait(e, key, wait_ms, cancel, &val, &len) == 0) {
        kvf__eng_parse_session(val, len, d);
        free(val);
    }
}
