/*
 * `kvferry bench --serve`: the target of a benchmark. It registers a buffer (kvf_mem_alloc
 * memory, or ordinary memory registered with kvf_mem_register), publishes where it is, and then
 * answers the initiator's verification requests through the config store until SIGINT or SIGTERM:
 *
 *   kvferry/v1/<ns>/bench/<sid>/info     {"addr": A, "len": L, "pid": P, "memory": "alloc"}
 *   kvferry/v1/<ns>/bench/<sid>/seq      counter; an initiator takes the next request number n
 *   kvferry/v1/<ns>/bench/<sid>/req/<n>  {"cmd": "verify"|"fill", "seed": S,
 *                                         "blocks": [[thread, block, offset, len], ...]}
 *                                        or {"cmd": "alloc", "len": L}
 *   kvferry/v1/<ns>/bench/<sid>/ans/<n>  {"ok": true} ("alloc": {"ok": true, "addr": A}) or
 *                                        {"ok": false, "error": "..."}
 *
 * "verify" compares the given ranges of the buffer with the pattern for S (after a write), "fill"
 * writes the pattern there (before a read). "alloc" makes a new region of L bytes of the
 * target's kind of memory (kvf_mem_alloc, or mapped and registered), kept until the target
 * stops: the initiator times its first transfer into a region it has never seen
 * (docs/performance.md, "Cold start"). The target handles requests in number order.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"

#define CMD           "bench --serve"
#define SERVE_POLL_MS 250u /* how often the request wait looks at the stop flag */
#define SERVE_ALLOCS  16u  /* regions "alloc" may add */
#define SERVE_ALLOC_MAX (256ull << 20) /* bytes of one */

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* What the requests work on: the buffer, and the regions "alloc" added. */
typedef struct {
    kvf_engine_t *e;
    bool alloc; /* kvf_mem_alloc memory, else mapped and registered */
    uint8_t *buf;
    size_t len;
    void *extra[SERVE_ALLOCS];
    size_t extra_len[SERVE_ALLOCS];
    unsigned nextra;    /* slots in use */
    unsigned next_free; /* when all are: the next to free and reuse */
} serve_mem_t;

typedef struct {
    const char *store_url;
    const char *session_id;
    const char *ns;
    size_t size;
    bool alloc;
    kvf_transport_kind_t transport;
} serve_args_t;

static void serve_usage(FILE *f)
{
    fprintf(f,
            "usage: kvferry bench --serve --store-url tcp://IP:PORT [--session-id IP:PORT]\n"
            "                     [--size BYTES] [--memory alloc|registered]\n"
            "                     [--transport auto|tcp|shm] [--ns NAME] [--log-level N]\n\n"
            "The target of `kvferry bench --target SESSION`: registers --size bytes (default\n"
            "1G) and serves until SIGINT or SIGTERM. Prints \"" BENCH_READY_FMT "\".\n",
            "IP:PORT");
}

/* "alloc": a new region of @len bytes, registered, kept in @m. Returns its address, or 0
 * with the reason in @err. */
static uint64_t serve_alloc(serve_mem_t *m, json_int_t len, char *err, size_t errlen)
{
    if (len <= 0 || (uint64_t)len > SERVE_ALLOC_MAX) {
        snprintf(err, errlen, "alloc of %lld bytes: want 1 to %llu", (long long)len,
                 (unsigned long long)SERVE_ALLOC_MAX);
        return 0;
    }
    /* A long-lived target serves many runs: the oldest region, written by a run that is over,
     * makes room. */
    unsigned slot = m->nextra < SERVE_ALLOCS ? m->nextra : m->next_free++ % SERVE_ALLOCS;
    if (m->nextra == SERVE_ALLOCS) {
        if (m->alloc) {
            kvf_mem_free(m->e, m->extra[slot]);
        } else {
            kvf_mem_unregister(m->e, m->extra[slot]);
            munmap(m->extra[slot], m->extra_len[slot]);
        }
        m->extra[slot] = NULL;
    }
    void *p = NULL;
    int rc;
    if (m->alloc) {
        rc = kvf_mem_alloc(m->e, (size_t)len, &p);
    } else {
        p = bench_map((size_t)len);
        rc = p ? kvf_mem_register(m->e, p, (size_t)len) : -errno;
        if (rc < 0 && p)
            munmap(p, (size_t)len);
    }
    if (rc < 0) {
        snprintf(err, errlen, "alloc of %lld bytes: %s", (long long)len, kvf_last_error());
        return 0;
    }
    m->extra[slot] = p;
    m->extra_len[slot] = (size_t)len;
    if (m->nextra < SERVE_ALLOCS)
        m->nextra++;
    return (uint64_t)(uintptr_t)p;
}

/* Answer one request; fills @err (empty when all went well) and, for "alloc", @addr. */
static void serve_request(serve_mem_t *m, const char *req, bool corrupt, uint64_t *addr,
                          char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loads(req, 0, &jerr);
    const char *cmd = json_string_value(json_object_get(root, "cmd"));
    json_t *blocks = json_object_get(root, "blocks");
    uint64_t seed = (uint64_t)json_integer_value(json_object_get(root, "seed"));
    uint8_t *buf = m->buf;
    size_t len = m->len;
    size_t i;
    json_t *b;

    err[0] = '\0';
    *addr = 0;
    if (root && cmd && !strcmp(cmd, "alloc")) {
        *addr = serve_alloc(m, json_integer_value(json_object_get(root, "len")), err, errlen);
        goto out;
    }
    if (!root || !cmd || !json_is_array(blocks) ||
        (strcmp(cmd, "verify") != 0 && strcmp(cmd, "fill") != 0)) {
        snprintf(err, errlen, "malformed request: %.100s", req);
        goto out;
    }
    json_array_foreach(blocks, i, b)
    {
        json_int_t t = json_integer_value(json_array_get(b, 0));
        json_int_t k = json_integer_value(json_array_get(b, 1));
        json_int_t off = json_integer_value(json_array_get(b, 2));
        json_int_t n = json_integer_value(json_array_get(b, 3));
        if (off < 0 || n <= 0 || (uint64_t)off > len || (uint64_t)n > len - (uint64_t)off) {
            snprintf(err, errlen, "block [%lld, +%lld) is outside the %zu-byte buffer",
                     (long long)off, (long long)n, len);
            goto out;
        }
        uint8_t *p = buf + off;
        if (!strcmp(cmd, "fill")) {
            bench_pattern_fill(p, (uint64_t)off, (size_t)n, seed);
            if (corrupt && i == 0)
                p[0] ^= 0xffu;
            continue;
        }
        if (corrupt && i == 0)
            p[0] ^= 0xffu;
        uint8_t got, want;
        ssize_t bad = bench_pattern_check(p, (uint64_t)off, (size_t)n, seed, &got, &want);
        if (bad >= 0) {
            snprintf(err, errlen,
                     "thread %lld block %lld (target offset %lld, %lld bytes): byte %zd is "
                     "0x%02x, want 0x%02x",
                     (long long)t, (long long)k, (long long)off, (long long)n, bad, got, want);
            goto out;
        }
    }
out:
    json_decref(root);
}

static int serve_loop(kvf_store_t *st, const char *ns, const char *sid, serve_mem_t *m)
{
    bool corrupt = getenv(BENCH_CORRUPT_ENV) && !strcmp(getenv(BENCH_CORRUPT_ENV), "1");
    char key[BENCH_KEY_MAX], sub[64], err[512];
    for (uint64_t n = 1; !stop_requested;) {
        void *val;
        size_t vlen;
        snprintf(sub, sizeof(sub), "req/%" PRIu64, n);
        snprintf(key, sizeof(key), BENCH_KEY_FMT, ns, sid, sub);
        int rc = kvf_store_get(st, key, SERVE_POLL_MS, &val, &vlen);
        if (rc == -KVF_ETIMEDOUT)
            continue;
        if (rc < 0) {
            kvf_cli_fail("bench", rc, "target: waiting for request %" PRIu64, n);
            return 1;
        }
        uint64_t addr;
        serve_request(m, val, corrupt, &addr, err, sizeof(err));
        free(val);
        kvf_store_del(st, key);
        json_t *ans = err[0] ? json_pack("{s:b,s:s}", "ok", 0, "error", err)
                      : addr ? json_pack("{s:b,s:I}", "ok", 1, "addr", (json_int_t)addr)
                             : json_pack("{s:b}", "ok", 1);
        char *text = json_dumps(ans, JSON_COMPACT);
        json_decref(ans);
        snprintf(sub, sizeof(sub), "ans/%" PRIu64, n);
        snprintf(key, sizeof(key), BENCH_KEY_FMT, ns, sid, sub);
        rc = text ? kvf_store_set(st, key, text, strlen(text), 0) : -KVF_ENOMEM;
        free(text);
        if (rc < 0) {
            kvf_cli_fail("bench", rc, "target: answering request %" PRIu64, n);
            return 1;
        }
        n++;
    }
    return 0;
}

static int serve_parse(int argc, char **argv, serve_args_t *a)
{
    memset(a, 0, sizeof(*a));
    a->session_id = "127.0.0.1:0";
    a->ns = "default";
    a->size = 1ull << 30;
    a->alloc = true;
    const kvf_cli_opt_t opts[] = {
        {"serve", KVF_CLI_IGNORE, NULL, 0, 0, NULL},
        KVF_CLI_OPT_STORE_URL(&a->store_url),
        {"session-id", KVF_CLI_STR, &a->session_id, 0, 0, NULL},
        {"ns", KVF_CLI_STR, &a->ns, 0, 0, NULL},
        {"size", KVF_CLI_CUSTOM, &a->size, 0, 1ull << 36, bench_opt_size},
        {"memory", KVF_CLI_CUSTOM, &a->alloc, 0, 0, bench_opt_memory},
        KVF_CLI_OPT_TRANSPORT(&a->transport),
    };
    const kvf_cli_t cli = {CMD, serve_usage, opts, KVF_CLI_NOPTS(opts), .log_level = true};
    int rc = kvf_cli_parse(&cli, argc, argv, NULL);
    if (rc != KVF_CLI_RUN)
        return rc;
    if (!a->store_url) {
        fprintf(stderr, "kvferry " CMD ": --store-url is required\n");
        return KVF_CLI_EXIT_USAGE;
    }
    return KVF_CLI_RUN;
}

int bench_serve_main(int argc, char **argv)
{
    serve_args_t a;
    int rc = serve_parse(argc, argv, &a);
    if (rc != KVF_CLI_RUN)
        return rc;
    kvf_cli_on_stop_signals(on_signal);

    int status = 1;
    kvf_config_t cfg;
    kvf_engine_t *e = NULL;
    kvf_store_t *st = NULL;
    uint8_t *buf = NULL;
    serve_mem_t mem = {0};
    uint64_t lease = 0;
    char key[BENCH_KEY_MAX];

    kvf_config_init(&cfg);
    cfg.transport = a.transport;
    cfg.ns = a.ns;
    rc = kvf_engine_create(a.store_url, a.session_id, KVF_ROLE_DECODE, 0, &cfg, &e);
    if (rc < 0) {
        kvf_cli_fail("bench", rc, "target: cannot start an engine at %s", a.session_id);
        return 1;
    }
    const char *sid = kvf_engine_session_id(e);
    if (a.alloc) {
        void *p;
        rc = kvf_mem_alloc(e, a.size, &p);
        buf = p;
    } else {
        buf = bench_map(a.size);
        rc = buf ? kvf_mem_register(e, buf, a.size) : -errno;
    }
    if (rc < 0) {
        kvf_cli_fail("bench", rc, "target: cannot %s %zu bytes",
                     a.alloc ? "kvf_mem_alloc" : "map and register", a.size);
        goto out_free;
    }
    rc = kvf_store_open(a.store_url, NULL, &st);
    if (rc == 0)
        rc = kvf_store_lease_grant(st, 5000, &lease);
    if (rc < 0) {
        kvf_cli_fail("bench", rc, "target: cannot use the store at %s", a.store_url);
        goto out_free;
    }
    /* Requests and answers of an earlier target with this session id would be taken for ours. */
    kvf_store_kv_t *old = NULL;
    size_t nold = 0;
    snprintf(key, sizeof(key), BENCH_KEY_FMT "/", a.ns, sid, "");
    if (kvf_store_list(st, key, &old, &nold) == 0) {
        for (size_t i = 0; i < nold; i++)
            kvf_store_del(st, old[i].key);
        kvf_store_kv_free(old, nold);
    }
    json_t *info = json_pack("{s:I,s:I,s:i,s:s}", "addr", (json_int_t)(uintptr_t)buf, "len",
                             (json_int_t)a.size, "pid", (int)getpid(), "memory",
                             a.alloc ? "alloc" : "registered");
    char *text = json_dumps(info, JSON_COMPACT);
    json_decref(info);
    snprintf(key, sizeof(key), BENCH_KEY_FMT, a.ns, sid, "info");
    rc = text ? kvf_store_set(st, key, text, strlen(text), lease) : -KVF_ENOMEM;
    free(text);
    if (rc < 0) {
        kvf_cli_fail("bench", rc, "target: cannot publish %s", key);
        goto out_free;
    }
    mem = (serve_mem_t){.e = e, .alloc = a.alloc, .buf = buf, .len = a.size};
    printf(BENCH_READY_FMT ": %zu bytes of %s memory\n", sid, a.size,
           a.alloc ? "kvf_mem_alloc" : "registered");
    fflush(stdout);
    status = serve_loop(st, a.ns, sid, &mem);
    kvf_store_del(st, key);

out_free:
    if (lease)
        kvf_store_lease_revoke(st, lease);
    kvf_store_close(st);
    if (buf && a.alloc)
        kvf_mem_free(e, buf);
    for (unsigned i = 0; a.alloc && i < mem.nextra; i++)
        if (mem.extra[i])
            kvf_mem_free(e, mem.extra[i]);
    /* Registered memory is unmapped only once no engine can write into it. */
    kvf_engine_destroy(e);
    if (buf && !a.alloc)
        munmap(buf, a.size);
    for (unsigned i = 0; !a.alloc && i < mem.nextra; i++)
        if (mem.extra[i])
            munmap(mem.extra[i], mem.extra_len[i]);
    return status;
}
