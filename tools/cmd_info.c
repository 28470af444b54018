/*
 * `kvferry info`: what the config store knows, for a person (or, with --json, a program): every
 * session with its role, address, transports, age, lease TTL and regions; with --session, that
 * engine's live statistics, asked at its own port (kvf_engine_stats_fetch). Reads only: it
 * creates no engine and writes no key.
 */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "kvferry.h"

/* --key-prefix, or NULL: the engines' default. */
static const char *key_prefix_flag;

static const char *info_prefix(void)
{
    return kvf_cli_key_prefix(key_prefix_flag);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvferry info --store-url URL [--session SID] [--ns NAME] [--json]\n"
               "                    [--verbose] [--timeout MS] [--key-prefix P]\n\n"
               "Shows what the config store knows: every session (engine) with its role, host,\n"
               "pid, transports, age, lease TTL and registered regions (count and bytes; each\n"
               "range with --verbose). With --session, that engine's live statistics too, asked\n"
               "at its own port: bytes and operations by transport and peer, errors, transfer\n"
               "times, calls in flight, notifications.\n\n"
               "  --store-url URL   the config store, e.g. tcp://127.0.0.1:8000\n"
               "  --session SID     also show the live statistics of this engine (ip:port)\n"
               "  --ns NAME         only this namespace (default: every namespace)\n"
               "  --json            one JSON object instead of text (docs/operations.md)\n"
               "  --verbose         list every registered range\n"
               "  --timeout MS      how long to wait for the store and the engine (default 3000)\n"
               "  --key-prefix P    the engines' store key prefix (default $KVFERRY_KEY_PREFIX,\n"
               "                    else kvferry/v1/)\n"
               "  --auth-key-file F  the cluster secret (`kvferry keygen`); default\n"
               "                    $KVFERRY_AUTH_KEY_FILE\n"
               "  --log-level N     0 debug, 1 info, 2 warn (default), 3 error\n\n"
               "Exit status: 0 done, 1 the store or the engine could not be reached (a message\n"
               "says which and why), 2 usage error.\n");
    fprintf(f, "\nTLS to the store (docs/security.md):\n%s", kvf_cli_tls_usage);
}

typedef struct {
    const char *url, *session, *ns;
    bool json, verbose;
    uint64_t timeout_ms;
} info_args_t;

/* One session as read from the store: its record and regions records, parsed. */
typedef struct {
    char ns[80];
    char sid[KVF_SESSION_ID_MAX];
    json_t *record;  /* the session record, or NULL */
    json_t *regions; /* the regions record, or NULL */
} info_sess_t;

static uint64_t unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Split "kvferry/v1/<ns>/<kind>/<sid>"; false for any other key. */
static bool split_key(const char *key, char *ns, size_t nslen, const char **kind, const char **sid)
{
    const char *prefix = info_prefix();
    if (strncmp(key, prefix, strlen(prefix)) != 0)
        return false;
    const char *p = key + strlen(prefix), *slash = strchr(p, '/');
    if (!slash || (size_t)(slash - p) >= nslen)
        return false;
    memcpy(ns, p, (size_t)(slash - p));
    ns[slash - p] = '\0';
    *kind = slash + 1;
    const char *s2 = strchr(*kind, '/');
    if (!s2)
        return false;
    *sid = s2 + 1;
    return **sid != '\0';
}

static info_sess_t *sess_get(info_sess_t **all, size_t *n, const char *ns, const char *sid)
{
    for (size_t i = 0; i < *n; i++)
        if (!strcmp((*all)[i].ns, ns) && !strcmp((*all)[i].sid, sid))
            return &(*all)[i];
    info_sess_t *grown = realloc(*all, (*n + 1) * sizeof(**all));
    if (!grown)
        return NULL;
    *all = grown;
    info_sess_t *s = &grown[(*n)++];
    memset(s, 0, sizeof(*s));
    snprintf(s->ns, sizeof(s->ns), "%s", ns);
    snprintf(s->sid, sizeof(s->sid), "%s", sid);
    return s;
}

/* Regions of @s: count, bytes, and (ranges != NULL) each range as {"addr", "len"}. */
static void regions_sum(const info_sess_t *s, uint64_t *count, uint64_t *bytes, json_t *ranges)
{
    json_t *list = s->regions ? json_object_get(s->regions, "regions") : NULL, *r;
    size_t i;
    *count = *bytes = 0;
    json_array_foreach(list, i, r)
    {
        json_t *len = json_object_get(r, "len");
        const char *addr = json_string_value(json_object_get(r, "addr"));
        if (!json_is_integer(len) || !addr)
            continue;
        (*count)++;
        *bytes += (uint64_t)json_integer_value(len);
        if (ranges)
            json_array_append_new(
                ranges, json_pack("{s:s, s:I}", "addr", addr, "len", json_integer_value(len)));
    }
}

/* The JSON form of one session (also the source of the text form). */
static json_t *sess_json(const info_sess_t *s, bool verbose, uint64_t now)
{
    json_t *rec = s->record;
    json_t *o = json_pack("{s:s, s:s}", "namespace", s->ns, "session_id", s->sid);
    const char *fields[] = {"role", "hostname", "kvferry"};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        const char *v = rec ? json_string_value(json_object_get(rec, fields[i])) : NULL;
        json_object_set_new(o, fields[i], v ? json_string(v) : json_null());
    }
    const char *ints[] = {"pid", "device_id", "lease_ttl_ms"};
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        json_t *v = rec ? json_object_get(rec, ints[i]) : NULL;
        json_object_set_new(o, ints[i], json_is_integer(v) ? json_copy(v) : json_null());
    }
    json_t *tr = rec ? json_object_get(rec, "transports") : NULL;
    json_object_set_new(o, "transports", json_is_array(tr) ? json_deep_copy(tr) : json_array());
    json_t *started = rec ? json_object_get(rec, "started_unix_ms") : NULL;
    if (json_is_integer(started) && (uint64_t)json_integer_value(started) <= now)
        json_object_set_new(
            o, "age_ms", json_integer((json_int_t)(now - (uint64_t)json_integer_value(started))));
    else
        json_object_set_new(o, "age_ms", json_null());
    uint64_t count, bytes;
    json_t *ranges = verbose ? json_array() : NULL;
    regions_sum(s, &count, &bytes, ranges);
    json_t *g = s->regions ? json_object_get(s->regions, "gen") : NULL;
    json_t *reg =
        json_pack("{s:I, s:I, s:o}", "count", (json_int_t)count, "bytes", (json_int_t)bytes,
                  "generation", json_is_integer(g) ? json_copy(g) : json_null());
    if (ranges)
        json_object_set_new(reg, "ranges", ranges);
    json_object_set_new(o, "regions", reg);
    json_object_set_new(o, "record", json_boolean(rec != NULL));
    return o;
}

static const char *str_or(json_t *o, const char *k, const char *dflt)
{
    const char *v = json_string_value(json_object_get(o, k));
    return v ? v : dflt;
}

static void print_session(json_t *o, bool verbose)
{
    char transports[64] = "";
    json_t *t, *tr = json_object_get(o, "transports");
    size_t i;
    json_array_foreach(tr, i, t)
    {
        size_t l = strlen(transports);
        snprintf(transports + l, sizeof(transports) - l, "%s%s", i ? "," : "",
                 json_string_value(t) ? json_string_value(t) : "?");
    }
    char age[32] = "-", lease[32] = "-", pid[16] = "-";
    json_t *a = json_object_get(o, "age_ms"), *l = json_object_get(o, "lease_ttl_ms"),
           *p = json_object_get(o, "pid");
    if (json_is_integer(a))
        snprintf(age, sizeof(age), "%.1fs", (double)json_integer_value(a) / 1e3);
    if (json_is_integer(l))
        snprintf(lease, sizeof(lease), "%" JSON_INTEGER_FORMAT "ms", json_integer_value(l));
    if (json_is_integer(p))
        snprintf(pid, sizeof(pid), "%" JSON_INTEGER_FORMAT, json_integer_value(p));
    json_t *reg = json_object_get(o, "regions");
    printf("%-22s %-8s %-10s %-12s %-8s %-9s %-8s %7" JSON_INTEGER_FORMAT " %14" JSON_INTEGER_FORMAT
           "\n",
           str_or(o, "session_id", "?"), str_or(o, "role", "?"), str_or(o, "namespace", "?"),
           str_or(o, "hostname", "?"), pid, transports[0] ? transports : "-", age,
           json_integer_value(json_object_get(reg, "count")),
           json_integer_value(json_object_get(reg, "bytes")));
    (void)lease;
    if (!json_is_true(json_object_get(o, "record")))
        printf("    (regions record only: the session record is gone or was never written)\n");
    if (verbose) {
        printf("    lease TTL %s, kvferry %s, device %s\n", lease, str_or(o, "kvferry", "?"),
               json_is_integer(json_object_get(o, "device_id")) ? "id published" : "-");
        json_t *r, *ranges = json_object_get(reg, "ranges");
        json_array_foreach(ranges, i, r)
        {
            json_int_t len = json_integer_value(json_object_get(r, "len"));
            printf("    region [%s, +%" JSON_INTEGER_FORMAT ")\n", str_or(r, "addr", "?"), len);
        }
    }
}

static void print_counts_row(const char *name, const kvf_stats_counts_t *c, const char *extra)
{
    printf("  %-22s %14" PRIu64 " %8" PRIu64 " %14" PRIu64 " %8" PRIu64 " %8" PRIu64 " %7" PRIu64
           "%s\n",
           name, c->write_bytes, c->write_ops, c->read_bytes, c->read_ops, c->calls, c->failed,
           extra);
}

static void print_stats(const kvf_stats_t *s)
{
    printf("\nlive statistics of %s (%s, up %.1f s), asked at its port:\n", s->session_id, s->role,
           (double)s->uptime_ms / 1e3);
    printf("  in flight %" PRIu64 ", regions %" PRIu64 " (%" PRIu64 " bytes), connections %" PRIu64
           ", notifications sent %" PRIu64 " received %" PRIu64 " queued %" PRIu64 "\n",
           s->in_flight, s->regions, s->region_bytes, s->connections, s->notify_sent,
           s->notify_received, s->notify_queued);
    printf("  %-22s %14s %8s %14s %8s %8s %7s %s\n", "transport", "written B", "ops", "read B",
           "ops", "calls", "failed", "mean call");
    for (size_t i = 0; i < s->ntransports; i++) {
        const kvf_stats_transport_t *t = &s->transports[i];
        uint64_t n = 0;
        for (size_t b = 0; b < KVF_STATS_LAT_BUCKETS; b++)
            n += t->lat_count[b];
        char mean[32] = "  -";
        if (n)
            snprintf(mean, sizeof(mean), "  %.3f ms", (double)t->lat_sum_us / 1e3 / (double)n);
        print_counts_row(t->name, &t->c, mean);
    }
    if (s->npeers) {
        printf("  %-22s\n", "peer (via)");
        for (size_t i = 0; i < s->npeers; i++) {
            char name[KVF_SESSION_ID_MAX + 24], extra[48];
            snprintf(name, sizeof(name), "%s (%s)", s->peers[i].sid,
                     s->peers[i].transport[0] ? s->peers[i].transport : "-");
            snprintf(extra, sizeof(extra), "  %" PRIu64 " in flight", s->peers[i].in_flight);
            print_counts_row(name, &s->peers[i].c, extra);
        }
    }
    bool any = false;
    for (size_t i = 0; i < KVF_STATS_ERR_SLOTS; i++) {
        if (!s->errors[i])
            continue;
        printf("%s %s %" PRIu64,
               any ? "," : "  errors:", i ? kvf_err_name(-(int)(KVF_ERRNO_OFFSET + i)) : "system",
               s->errors[i]);
        any = true;
    }
    printf(any ? "\n" : "  errors: none\n");
}

/* Read every session of the store (of @ns, or all). */
static int read_sessions(kvf_store_t *st, const char *ns, info_sess_t **out, size_t *nout)
{
    kvf_store_kv_t *kvs;
    size_t count;
    char prefix[256];
    snprintf(prefix, sizeof(prefix), "%s%s%s", info_prefix(), ns ? ns : "", ns ? "/" : "");
    int rc = kvf_store_list(st, prefix, &kvs, &count);
    if (rc < 0)
        return rc;
    info_sess_t *all = NULL;
    size_t n = 0;
    for (size_t i = 0; i < count; i++) {
        char kns[80];
        const char *kind, *sid;
        if (!split_key(kvs[i].key, kns, sizeof(kns), &kind, &sid))
            continue;
        bool is_sess = !strncmp(kind, "sessions/", 9), is_reg = !strncmp(kind, "regions/", 8);
        if (!is_sess && !is_reg)
            continue;
        info_sess_t *s = sess_get(&all, &n, kns, sid);
        if (!s)
            break;
        json_t *doc = json_loadb(kvs[i].val, kvs[i].val_len, 0, NULL);
        if (is_sess) {
            json_decref(s->record);
            s->record = json_is_object(doc) ? json_incref(doc) : NULL;
        } else {
            json_decref(s->regions);
            s->regions = json_is_object(doc) ? json_incref(doc) : NULL;
        }
        json_decref(doc);
    }
    kvf_store_kv_free(kvs, count);
    *out = all;
    *nout = n;
    return 0;
}

static int run(const info_args_t *a)
{
    kvf_store_t *st = NULL;
    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    so.connect_timeout_ms = (uint32_t)a->timeout_ms;
    so.request_timeout_ms = (uint32_t)a->timeout_ms;
    int rc = kvf_store_open(a->url, &so, &st);
    if (rc < 0) {
        kvf_cli_fail("info", rc, "store %s", a->url);
        return KVF_CLI_EXIT_FAIL;
    }
    info_sess_t *all = NULL;
    size_t n = 0;
    rc = read_sessions(st, a->ns, &all, &n);
    kvf_store_close(st);
    if (rc < 0) {
        kvf_cli_fail("info", rc, "listing the sessions of store %s", a->url);
        return KVF_CLI_EXIT_FAIL;
    }
    uint64_t now = unix_ms();
    json_t *sessions = json_array();
    for (size_t i = 0; i < n; i++) {
        if (!a->session || !strcmp(all[i].sid, a->session))
            json_array_append_new(sessions, sess_json(&all[i], a->verbose, now));
        json_decref(all[i].record);
        json_decref(all[i].regions);
    }
    free(all);

    int code = KVF_CLI_EXIT_OK;
    kvf_stats_t stats;
    bool have_stats = false;
    if (a->session) {
        rc = kvf_engine_stats_fetch(a->session, (uint32_t)a->timeout_ms, &stats);
        if (rc < 0) {
            kvf_cli_fail("info", rc, "engine %s%s", a->session,
                         json_array_size(sessions) ? ""
                                                   : " (and the store has no session of that id)");
            code = KVF_CLI_EXIT_FAIL;
        } else {
            have_stats = true;
        }
    }
    if (a->json) {
        json_t *doc = json_pack("{s:s, s:o}", "store", a->url, "sessions", sessions);
        if (have_stats) {
            char *text;
            if (kvf_stats_json(&stats, &text, NULL) == 0) {
                json_object_set_new(doc, "stats", json_loads(text, 0, NULL));
                free(text);
            }
        }
        char *out = json_dumps(doc, JSON_INDENT(2));
        if (out)
            puts(out);
        free(out);
        json_decref(doc);
    } else {
        size_t k = json_array_size(sessions);
        printf("store %s: %zu session%s%s%s\n", a->url, k, k == 1 ? "" : "s",
               a->ns ? " in namespace " : "", a->ns ? a->ns : "");
        if (k) {
            printf("%-22s %-8s %-10s %-12s %-8s %-9s %-8s %7s %14s\n", "SESSION", "ROLE",
                   "NAMESPACE", "HOST", "PID", "TRANSPORT", "AGE", "REGIONS", "BYTES");
            json_t *o;
            size_t i;
            json_array_foreach(sessions, i, o) print_session(o, a->verbose);
        }
        if (have_stats)
            print_stats(&stats);
        json_decref(sessions);
    }
    if (have_stats)
        kvf_stats_free(&stats);
    fflush(stdout);
    return code;
}

int kvf_cli_info(int argc, char **argv)
{
    info_args_t a = {.timeout_ms = 3000};
    const kvf_cli_opt_t opts[] = {
        KVF_CLI_OPT_STORE_URL(&a.url),
        {"session", KVF_CLI_STR, &a.session, 0, 0, NULL},
        {"ns", KVF_CLI_STR, &a.ns, 0, 0, NULL},
        {"json", KVF_CLI_FLAG, &a.json, 0, 0, NULL},
        {"verbose", KVF_CLI_FLAG, &a.verbose, 0, 0, NULL},
        {"timeout", KVF_CLI_U64, &a.timeout_ms, 1, 3600000, NULL},
        KVF_CLI_OPT_KEY_PREFIX(&key_prefix_flag),
    };
    const kvf_cli_t cli = {"info", usage, opts, KVF_CLI_NOPTS(opts), .log_level = true};
    int code = kvf_cli_parse(&cli, argc, argv, NULL);
    if (code != KVF_CLI_RUN)
        return code;
    if (!a.url) {
        fprintf(stderr, "kvferry info: --store-url is required (e.g. tcp://127.0.0.1:8000)\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (a.session && kvf_session_id_parse(a.session, NULL, 0, NULL) < 0) {
        fprintf(stderr, "kvferry info: --session %s: %s\n", a.session, kvf_last_error());
        return KVF_CLI_EXIT_USAGE;
    }
    return run(&a);
}
