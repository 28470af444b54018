/*
 * Statistics snapshots as data: kvf_stats_free(), the JSON and Prometheus renderings, and the
 * binary encoding of a STATS answer (docs/protocol.md).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/stats.h"
#include "common/wire.h"

const uint64_t kvf__stats_lat_bound_us[KVF_STATS_LAT_BUCKETS] = {
    10,    25,    50,     100,    250,    500,     1000,    2500,    5000,     10000,
    25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, UINT64_MAX,
};

unsigned kvf__stats_lat_bucket(uint64_t us)
{
    unsigned i = 0;
    while (i + 1 < KVF_STATS_LAT_BUCKETS && us > kvf__stats_lat_bound_us[i])
        i++;
    return i;
}

void kvf_stats_free(kvf_stats_t *s)
{
    if (!s)
        return;
    free(s->peers);
    s->peers = NULL;
    s->npeers = 0;
}

/* ---- text output ---------------------------------------------------------------------------- */

static void put_str(kvf_buf_t *b, const char *s)
{
    kvf__buf_put(b, s, strlen(s));
}

static void KVF__PRINTF(2, 3) put_fmt(kvf_buf_t *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0)
        kvf__buf_put(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* A JSON string (or, with @prom, a Prometheus label value): quotes, backslashes and control
 * bytes escaped; bytes above ASCII (never in a session id) become '?'. */
static void put_quoted(kvf_buf_t *b, const char *s, int prom)
{
    kvf__buf_put_u8(b, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            kvf__buf_put_u8(b, '\\');
            kvf__buf_put_u8(b, *p);
        } else if (*p == '\n') {
            put_str(b, "\\n");
        } else if (*p < 0x20 || *p >= 0x7f) {
            if (prom)
                kvf__buf_put_u8(b, '?');
            else
                put_fmt(b, "\\u%04x", *p < 0x20 ? *p : '?');
        } else {
            kvf__buf_put_u8(b, *p);
        }
    }
    kvf__buf_put_u8(b, '"');
}

/* Hand the buffer out as a NUL-terminated string. */
static int buf_finish(kvf_buf_t *b, char **out, size_t *len, const char *what)
{
    kvf__buf_put_u8(b, 0);
    if (b->oom) {
        kvf__buf_free(b);
        return kvf__err(-KVF_ENOMEM, "%s: out of memory", what);
    }
    *out = (char *)b->data;
    if (len)
        *len = b->len - 1;
    return 0;
}

static const char *const count_names[] = {"write_bytes", "read_bytes", "write_ops",
                                          "read_ops",    "calls",      "failed"};

static void counts_values(const kvf_stats_counts_t *c, uint64_t v[6])
{
    v[0] = c->write_bytes;
    v[1] = c->read_bytes;
    v[2] = c->write_ops;
    v[3] = c->read_ops;
    v[4] = c->calls;
    v[5] = c->failed;
}

static void json_counts(kvf_buf_t *b, const kvf_stats_counts_t *c)
{
    uint64_t v[6];
    counts_values(c, v);
    for (size_t i = 0; i < 6; i++)
        put_fmt(b, "%s\"%s\":%" PRIu64, i ? "," : "", count_names[i], v[i]);
}

/* The name of error slot @i: "KVF_ETIMEDOUT", or "system" for slot 0. */
static const char *err_slot_name(size_t i)
{
    return i ? kvf_err_name(-(int)(KVF_ERRNO_OFFSET + i)) : "system";
}

int kvf_stats_json(const kvf_stats_t *s, char **out, size_t *len)
{
    if (!s || !out)
        return kvf__err(-KVF_EINVAL, "stats json: NULL argument");
    kvf_buf_t b;
    kvf__buf_init(&b);
    put_str(&b, "{\"session_id\":");
    put_quoted(&b, s->session_id, 0);
    put_str(&b, ",\"role\":");
    put_quoted(&b, s->role, 0);
    put_fmt(&b,
            ",\"uptime_ms\":%" PRIu64 ",\"in_flight\":%" PRIu64 ",\"regions\":%" PRIu64
            ",\"region_bytes\":%" PRIu64 ",\"connections\":%" PRIu64,
            s->uptime_ms, s->in_flight, s->regions, s->region_bytes, s->connections);
    put_fmt(&b,
            ",\"notify\":{\"sent\":%" PRIu64 ",\"received\":%" PRIu64 ",\"queued\":%" PRIu64 "}",
            s->notify_sent, s->notify_received, s->notify_queued);
    put_str(&b, ",\"errors\":{");
    int first = 1;
    for (size_t i = 0; i < KVF_STATS_ERR_SLOTS; i++) {
        if (!s->errors[i])
            continue;
        put_fmt(&b, "%s\"%s\":%" PRIu64, first ? "" : ",", err_slot_name(i), s->errors[i]);
        first = 0;
    }
    put_str(&b, "},\"latency_bounds_us\":[");
    for (size_t i = 0; i < KVF_STATS_LAT_BUCKETS; i++) {
        if (s->lat_bound_us[i] == UINT64_MAX)
            put_fmt(&b, "%snull", i ? "," : "");
        else
            put_fmt(&b, "%s%" PRIu64, i ? "," : "", s->lat_bound_us[i]);
    }
    put_str(&b, "],\"transports\":{");
    for (size_t t = 0; t < s->ntransports && t < KVF_STATS_MAX_TRANSPORTS; t++) {
        const kvf_stats_transport_t *tr = &s->transports[t];
        if (t)
            put_str(&b, ",");
        put_quoted(&b, tr->name, 0);
        put_str(&b, ":{");
        json_counts(&b, &tr->c);
        put_str(&b, ",\"latency_counts\":[");
        for (size_t i = 0; i < KVF_STATS_LAT_BUCKETS; i++)
            put_fmt(&b, "%s%" PRIu64, i ? "," : "", tr->lat_count[i]);
        put_fmt(&b, "],\"latency_sum_us\":%" PRIu64 "}", tr->lat_sum_us);
    }
    put_str(&b, "},\"peers\":[");
    for (size_t p = 0; p < s->npeers; p++) {
        const kvf_stats_peer_t *pe = &s->peers[p];
        put_str(&b, p ? ",{\"session_id\":" : "{\"session_id\":");
        put_quoted(&b, pe->sid, 0);
        put_str(&b, ",\"transport\":");
        put_quoted(&b, pe->transport, 0);
        put_str(&b, ",");
        json_counts(&b, &pe->c);
        put_fmt(&b, ",\"in_flight\":%" PRIu64 "}", pe->in_flight);
    }
    put_str(&b, "]}");
    return buf_finish(&b, out, len, "stats json");
}

/* ---- Prometheus text format 0.0.4 ----------------------------------------------------------- */

static void prom_head(kvf_buf_t *b, const char *name, const char *type, const char *help)
{
    put_fmt(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static const struct {
    const char *name; /* after kvferry_ / kvferry_peer_ */
    const char *help;
} prom_counts[] = {
    {"tx_bytes_total", "Bytes written to peers by calls that succeeded."},
    {"rx_bytes_total", "Bytes read from peers by calls that succeeded."},
    {"tx_ops_total", "Write elements of calls that succeeded."},
    {"rx_ops_total", "Read elements of calls that succeeded."},
    {"xfer_calls_total", "Transfer calls (sync calls and async batches) that succeeded."},
    {"xfer_failed_total", "Transfer calls that failed."},
};

/* @v units of 1/@per_second s (10^6: microseconds, 10^3: milliseconds) as decimal seconds,
 * exactly, without trailing zeros. */
static void prom_seconds(kvf_buf_t *b, uint64_t v, uint64_t per_second)
{
    uint64_t whole = v / per_second, frac = v % per_second;
    if (!frac) {
        put_fmt(b, "%" PRIu64, whole);
        return;
    }
    char digits[24]; /* any uint64_t in decimal */
    int w = per_second == 1000000u ? 6 : 3;
    snprintf(digits, sizeof(digits), "%0*" PRIu64, w, frac);
    for (int i = w - 1; i > 0 && digits[i] == '0'; i--)
        digits[i] = '\0';
    put_fmt(b, "%" PRIu64 ".%s", whole, digits);
}

/* A plain uint64_t field of a statistics struct, exported under @name. */
typedef struct {
    const char *name, *type, *help;
    size_t off;
} prom_scalar_t;

/* Each field of @f[@n] read from @base, with its HELP and TYPE lines. */
static void prom_scalars(kvf_buf_t *b, const prom_scalar_t *f, size_t n, const void *base)
{
    for (size_t k = 0; k < n; k++) {
        uint64_t v;
        memcpy(&v, (const char *)base + f[k].off, sizeof(v));
        prom_head(b, f[k].name, f[k].type, f[k].help);
        put_fmt(b, "%s %" PRIu64 "\n", f[k].name, v);
    }
}

/* A gauge of @ms milliseconds, in seconds. */
static void prom_uptime(kvf_buf_t *b, const char *name, const char *help, uint64_t ms)
{
    prom_head(b, name, "gauge", help);
    put_fmt(b, "%s ", name);
    prom_seconds(b, ms, 1000u);
    put_str(b, "\n");
}

int kvf_stats_prometheus(const kvf_stats_t *s, char **out, size_t *len)
{
    if (!s || !out)
        return kvf__err(-KVF_EINVAL, "stats prometheus: NULL argument");
    kvf_buf_t b;
    kvf__buf_init(&b);
    size_t nt =
        s->ntransports < KVF_STATS_MAX_TRANSPORTS ? s->ntransports : KVF_STATS_MAX_TRANSPORTS;
    prom_head(&b, "kvferry_engine_info", "gauge", "The engine's session id and role (always 1).");
    put_str(&b, "kvferry_engine_info{session=");
    put_quoted(&b, s->session_id, 1);
    put_str(&b, ",role=");
    put_quoted(&b, s->role, 1);
    put_str(&b, "} 1\n");
    for (size_t k = 0; k < KVF__ARRAY_SIZE(prom_counts); k++) {
        char name[96];
        snprintf(name, sizeof(name), "kvferry_%s", prom_counts[k].name);
        prom_head(&b, name, "counter", prom_counts[k].help);
        for (size_t t = 0; t < nt; t++) {
            uint64_t v[6];
            counts_values(&s->transports[t].c, v);
            put_fmt(&b, "%s{transport=", name);
            put_quoted(&b, s->transports[t].name, 1);
            put_fmt(&b, "} %" PRIu64 "\n", v[k]);
        }
    }
    for (size_t k = 0; k < KVF__ARRAY_SIZE(prom_counts); k++) {
        char name[96];
        snprintf(name, sizeof(name), "kvferry_peer_%s", prom_counts[k].name);
        prom_head(&b, name, "counter", prom_counts[k].help);
        for (size_t p = 0; p < s->npeers; p++) {
            uint64_t v[6];
            counts_values(&s->peers[p].c, v);
            put_fmt(&b, "%s{peer=", name);
            put_quoted(&b, s->peers[p].sid, 1);
            put_str(&b, ",transport=");
            put_quoted(&b, s->peers[p].transport, 1);
            put_fmt(&b, "} %" PRIu64 "\n", v[k]);
        }
    }
    prom_head(&b, "kvferry_xfer_time_seconds", "histogram",
              "Duration of transfer calls, from the peer's lookup to the last byte.");
    for (size_t t = 0; t < nt; t++) {
        const kvf_stats_transport_t *tr = &s->transports[t];
        uint64_t cum = 0;
        for (size_t i = 0; i < KVF_STATS_LAT_BUCKETS; i++) {
            cum += tr->lat_count[i];
            put_str(&b, "kvferry_xfer_time_seconds_bucket{transport=");
            put_quoted(&b, tr->name, 1);
            put_str(&b, ",le=\"");
            if (s->lat_bound_us[i] == UINT64_MAX)
                put_str(&b, "+Inf");
            else
                prom_seconds(&b, s->lat_bound_us[i], 1000000u);
            put_fmt(&b, "\"} %" PRIu64 "\n", cum);
        }
        put_str(&b, "kvferry_xfer_time_seconds_sum{transport=");
        put_quoted(&b, tr->name, 1);
        put_str(&b, "} ");
        prom_seconds(&b, tr->lat_sum_us, 1000000u);
        put_str(&b, "\nkvferry_xfer_time_seconds_count{transport=");
        put_quoted(&b, tr->name, 1);
        put_fmt(&b, "} %" PRIu64 "\n", cum);
    }
    prom_head(&b, "kvferry_errors_total", "counter", "Failed transfer calls by error code.");
    for (size_t i = 0; i < KVF_STATS_ERR_SLOTS; i++)
        if (s->errors[i])
            put_fmt(&b, "kvferry_errors_total{code=\"%s\"} %" PRIu64 "\n", err_slot_name(i),
                    s->errors[i]);
    static const prom_scalar_t scalars[] = {
        {"kvferry_in_flight", "gauge", "Transfer calls running now.",
         offsetof(kvf_stats_t, in_flight)},
        {"kvferry_regions", "gauge", "Memory regions registered now.",
         offsetof(kvf_stats_t, regions)},
        {"kvferry_region_bytes", "gauge", "Bytes of the regions registered now.",
         offsetof(kvf_stats_t, region_bytes)},
        {"kvferry_connections", "gauge", "Peers with a path open.",
         offsetof(kvf_stats_t, connections)},
        {"kvferry_notify_sent_total", "counter", "Notifications peers accepted from this engine.",
         offsetof(kvf_stats_t, notify_sent)},
        {"kvferry_notify_received_total", "counter", "Notifications peers queued here.",
         offsetof(kvf_stats_t, notify_received)},
        {"kvferry_notify_queued", "gauge", "Notifications received and not yet taken.",
         offsetof(kvf_stats_t, notify_queued)},
    };
    prom_scalars(&b, scalars, KVF__ARRAY_SIZE(scalars), s);
    prom_uptime(&b, "kvferry_uptime_seconds", "Seconds since the engine was created.",
                s->uptime_ms);
    return buf_finish(&b, out, len, "stats prometheus");
}

int kvf_store_server_stats_prometheus(const kvf_store_server_stats_t *s, char **out, size_t *len)
{
    if (!s || !out)
        return kvf__err(-KVF_EINVAL, "store stats prometheus: NULL argument");
    static const prom_scalar_t f[] = {
        {"kvferry_store_clients", "gauge", "Client connections open now.",
         offsetof(kvf_store_server_stats_t, clients)},
        {"kvferry_store_keys", "gauge", "Keys held now.", offsetof(kvf_store_server_stats_t, keys)},
        {"kvferry_store_leases", "gauge", "Leases alive now.",
         offsetof(kvf_store_server_stats_t, leases)},
        {"kvferry_store_waiters", "gauge", "Get-with-wait requests parked now.",
         offsetof(kvf_store_server_stats_t, waiters)},
        {"kvferry_store_ops_total", "counter", "Requests served.",
         offsetof(kvf_store_server_stats_t, ops)},
        {"kvferry_store_rx_bytes_total", "counter", "Bytes received from clients.",
         offsetof(kvf_store_server_stats_t, bytes_in)},
        {"kvferry_store_tx_bytes_total", "counter", "Bytes sent to clients.",
         offsetof(kvf_store_server_stats_t, bytes_out)},
    };
    kvf_buf_t b;
    kvf__buf_init(&b);
    prom_scalars(&b, f, KVF__ARRAY_SIZE(f), s);
    prom_uptime(&b, "kvferry_store_uptime_seconds", "Seconds since the store started.",
                s->uptime_ms);
    return buf_finish(&b, out, len, "store stats prometheus");
}

/* ---- binary encoding ------------------------------------------------------------------------ */

static void enc_counts(kvf_buf_t *b, const kvf_stats_counts_t *c)
{
    uint64_t v[6];
    counts_values(c, v);
    for (size_t i = 0; i < 6; i++)
        kvf__buf_put_u64(b, v[i]);
}

static void dec_counts(kvf_rd_t *r, kvf_stats_counts_t *c)
{
    kvf__rd_u64(r, &c->write_bytes);
    kvf__rd_u64(r, &c->read_bytes);
    kvf__rd_u64(r, &c->write_ops);
    kvf__rd_u64(r, &c->read_ops);
    kvf__rd_u64(r, &c->calls);
    kvf__rd_u64(r, &c->failed);
}

static void enc_str(kvf_buf_t *b, const char *s, size_t max)
{
    kvf__buf_put_blob(b, s, strnlen(s, max - 1));
}

/* A string of fewer than @max bytes into @dst, made printable. */
static bool dec_str(kvf_rd_t *r, char *dst, size_t max)
{
    const uint8_t *p;
    size_t n;
    if (!kvf__rd_blob(r, max - 1, &p, &n))
        return false;
    kvf__printable(dst, max, p, n);
    return true;
}

int kvf__stats_encode(const kvf_stats_t *s, uint8_t **out, size_t *len)
{
    kvf_buf_t b;
    kvf__buf_init(&b);
    size_t np = s->npeers < KVF_STATS_WIRE_MAX_PEERS ? s->npeers : KVF_STATS_WIRE_MAX_PEERS;
    size_t nt =
        s->ntransports < KVF_STATS_MAX_TRANSPORTS ? s->ntransports : KVF_STATS_MAX_TRANSPORTS;
    kvf__buf_put_u32(&b, KVF_STATS_WIRE_VERSION);
    enc_str(&b, s->session_id, sizeof(s->session_id));
    enc_str(&b, s->role, sizeof(s->role));
    const uint64_t scalars[] = {s->uptime_ms,       s->in_flight,    s->regions,
                                s->region_bytes,    s->connections,  s->notify_sent,
                                s->notify_received, s->notify_queued};
    for (size_t i = 0; i < KVF__ARRAY_SIZE(scalars); i++)
        kvf__buf_put_u64(&b, scalars[i]);
    kvf__buf_put_u32(&b, KVF_STATS_ERR_SLOTS);
    for (size_t i = 0; i < KVF_STATS_ERR_SLOTS; i++)
        kvf__buf_put_u64(&b, s->errors[i]);
    kvf__buf_put_u32(&b, KVF_STATS_LAT_BUCKETS);
    kvf__buf_put_u32(&b, (uint32_t)nt);
    for (size_t t = 0; t < nt; t++) {
        enc_str(&b, s->transports[t].name, KVF_STATS_NAME_MAX);
        enc_counts(&b, &s->transports[t].c);
        for (size_t i = 0; i < KVF_STATS_LAT_BUCKETS; i++)
            kvf__buf_put_u64(&b, s->transports[t].lat_count[i]);
        kvf__buf_put_u64(&b, s->transports[t].lat_sum_us);
    }
    kvf__buf_put_u32(&b, (uint32_t)np);
    for (size_t p = 0; p < np; p++) {
        enc_str(&b, s->peers[p].sid, KVF_SESSION_ID_MAX);
        enc_str(&b, s->peers[p].transport, KVF_STATS_NAME_MAX);
        enc_counts(&b, &s->peers[p].c);
        kvf__buf_put_u64(&b, s->peers[p].in_flight);
    }
    if (b.oom) {
        kvf__buf_free(&b);
        return kvf__err(-KVF_ENOMEM, "stats: out of memory");
    }
    *out = b.data;
    *len = b.len;
    return 0;
}

int kvf__stats_decode(const void *buf, size_t len, kvf_stats_t *s)
{
    kvf_rd_t r;
    uint32_t ver = 0, nerr = 0, nbuck = 0, nt = 0, np = 0;
    memset(s, 0, sizeof(*s));
    s->size = sizeof(*s);
    memcpy(s->lat_bound_us, kvf__stats_lat_bound_us, sizeof(s->lat_bound_us));
    if (len > KVF_STATS_WIRE_MAX)
        return kvf__err(-KVF_EPROTO, "stats: %zu bytes exceed KVF_STATS_WIRE_MAX", len);
    kvf__rd_init(&r, buf, len);
    if (!kvf__rd_u32(&r, &ver) || ver != KVF_STATS_WIRE_VERSION)
        return kvf__err(-KVF_EPROTO, "stats: encoding version %" PRIu32 ", want %u", ver,
                        KVF_STATS_WIRE_VERSION);
    dec_str(&r, s->session_id, sizeof(s->session_id));
    dec_str(&r, s->role, sizeof(s->role));
    uint64_t *scalars[] = {&s->uptime_ms,       &s->in_flight,    &s->regions,
                           &s->region_bytes,    &s->connections,  &s->notify_sent,
                           &s->notify_received, &s->notify_queued};
    for (size_t i = 0; i < KVF__ARRAY_SIZE(scalars); i++)
        kvf__rd_u64(&r, scalars[i]);
    if (!kvf__rd_u32(&r, &nerr) || nerr != KVF_STATS_ERR_SLOTS)
        return kvf__err(-KVF_EPROTO, "stats: %" PRIu32 " error slots, want %u", nerr,
                        KVF_STATS_ERR_SLOTS);
    for (size_t i = 0; i < KVF_STATS_ERR_SLOTS; i++)
        kvf__rd_u64(&r, &s->errors[i]);
    if (!kvf__rd_u32(&r, &nbuck) || nbuck != KVF_STATS_LAT_BUCKETS)
        return kvf__err(-KVF_EPROTO, "stats: %" PRIu32 " latency buckets, want %u", nbuck,
                        KVF_STATS_LAT_BUCKETS);
    if (!kvf__rd_u32(&r, &nt) || nt > KVF_STATS_MAX_TRANSPORTS)
        return kvf__err(-KVF_EPROTO, "stats: %" PRIu32 " transports, at most %u", nt,
                        KVF_STATS_MAX_TRANSPORTS);
    s->ntransports = nt;
    for (size_t t = 0; t < nt; t++) {
        dec_str(&r, s->transports[t].name, KVF_STATS_NAME_MAX);
        dec_counts(&r, &s->transports[t].c);
        for (size_t i = 0; i < KVF_STATS_LAT_BUCKETS; i++)
            kvf__rd_u64(&r, &s->transports[t].lat_count[i]);
        kvf__rd_u64(&r, &s->transports[t].lat_sum_us);
    }
    if (!kvf__rd_u32(&r, &np) || np > KVF_STATS_WIRE_MAX_PEERS ||
        (size_t)np * (4 + 4 + 7 * 8) > r.left)
        return kvf__err(-KVF_EPROTO,
                        "stats: %" PRIu32 " peers: at most %u, and no more than the "
                        "answer holds",
                        np, KVF_STATS_WIRE_MAX_PEERS);
    if (np) {
        s->peers = calloc(np, sizeof(*s->peers));
        if (!s->peers)
            return kvf__err(-KVF_ENOMEM, "stats: out of memory for %" PRIu32 " peers", np);
    }
    s->npeers = np;
    for (size_t p = 0; p < np; p++) {
        dec_str(&r, s->peers[p].sid, KVF_SESSION_ID_MAX);
        dec_str(&r, s->peers[p].transport, KVF_STATS_NAME_MAX);
        dec_counts(&r, &s->peers[p].c);
        kvf__rd_u64(&r, &s->peers[p].in_flight);
    }
    if (r.bad || r.left) {
        kvf_stats_free(s);
        return kvf__err(-KVF_EPROTO, "stats: answer is %s", r.bad ? "truncated" : "too long");
    }
    return 0;
}
