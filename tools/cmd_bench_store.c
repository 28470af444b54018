/*
 * `kvferry bench store`: config-store operations per second and get-with-wait wake-up latency.
 *
 * Without --store-url it starts a store in this process on 127.0.0.1. Phases, each --seconds
 * long: set, then get, from one client and from N clients (each client a thread with its own
 * connection and key, one request at a time); a raw TCP ping-pong of a similar frame size on one
 * loopback connection as the ceiling of any request/response protocol; then get-with-wait wake-up
 * latency: one client waits on a key, another sets it, and the time from the start of the set to
 * the waiter's return is measured (--rounds times); then what an engine waits for from the
 * store: registration (kvf_mem_register of a 4 KiB buffer, which publishes the engine's regions
 * record) and lookup (kvf_peer_regions of that engine from a second one, a fresh read of its
 * records), --rounds times each.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "clock.h"

#define CMD          "bench store"
#define WAKE_WAIT_MS 5000u
/* The store says nothing when a get-with-wait has been registered, so the setter gives the
 * waiter's request this long to reach the store before it sets the key. */
#define WAKE_HEADSTART_US 200u

typedef enum { OP_SET, OP_GET } store_op_t;

typedef struct {
    const char *url;
    int id;
    store_op_t op;
    uint64_t deadline_ns;
    uint64_t ops;
    int failed;
    char err[256];
} client_t;

static void *client_main(void *p)
{
    client_t *c = p;
    kvf_store_t *st;
    char key[64], val[64];
    int rc = kvf_store_open(c->url, NULL, &st);
    if (rc < 0) {
        snprintf(c->err, sizeof(c->err), "open: %s", kvf_last_error());
        c->failed = 1;
        return NULL;
    }
    snprintf(key, sizeof(key), "bench/store/%d/%d", (int)getpid(), c->id);
    int vlen = snprintf(val, sizeof(val), "value-of-client-%d", c->id);
    rc = kvf_store_set(st, key, val, (size_t)vlen, 0);
    while (rc == 0 && cli_now_ns() < c->deadline_ns) {
        if (c->op == OP_SET) {
            rc = kvf_store_set(st, key, val, (size_t)vlen, 0);
        } else {
            void *got;
            size_t glen;
            rc = kvf_store_get(st, key, 0, &got, &glen);
            if (rc == 0 && (glen != (size_t)vlen || memcmp(got, val, glen) != 0)) {
                snprintf(c->err, sizeof(c->err), "get %s returned the wrong value", key);
                c->failed = 1;
            }
            if (rc == 0)
                free(got);
        }
        if (rc == 0 && !c->failed)
            c->ops++;
        if (c->failed)
            break;
    }
    if (rc < 0) {
        snprintf(c->err, sizeof(c->err), "%s %s: %s (%s)", c->op == OP_SET ? "set" : "get", key,
                 kvf_last_error(), kvf_err_name(rc));
        c->failed = 1;
    }
    kvf_store_del(st, key);
    kvf_store_close(st);
    return NULL;
}

/* Operations per second of @n clients doing @op for @seconds. Returns -1 after saying why. */
static double run_clients(const char *url, int n, store_op_t op, double seconds)
{
    pthread_t *th = calloc((size_t)n, sizeof(*th));
    client_t *c = calloc((size_t)n, sizeof(*c));
    double rate = -1;
    int started = 0;
    if (!th || !c)
        goto out;
    uint64_t t0 = cli_now_ns();
    for (; started < n; started++) {
        c[started] = (client_t){
            .url = url, .id = started, .op = op, .deadline_ns = t0 + (uint64_t)(seconds * 1e9)};
        if (pthread_create(&th[started], NULL, client_main, &c[started]) != 0)
            break;
    }
    uint64_t ops = 0;
    int failed = started < n;
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        ops += c[i].ops;
        if (c[i].failed && !failed) {
            fprintf(stderr, "kvferry " CMD ": client %d: %s\n", i, c[i].err);
            failed = 1;
        }
    }
    if (!failed)
        rate = (double)ops / ((double)(cli_now_ns() - t0) / 1e9);
out:
    free(th);
    free(c);
    return rate;
}

/* ---- raw ping-pong: 48-byte request, 24-byte answer, one at a time ------------------------- */

static void *echo_server(void *p)
{
    int fd = *(int *)p;
    char req[48], ans[24] = {0};
    while (bench_recv_all(fd, req, sizeof(req)) == 1)
        if (bench_send_all(fd, ans, sizeof(ans)) < 0)
            break;
    return NULL;
}

static double raw_pingpong_per_s(double seconds)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    int one = 1, c = -1, s = -1;
    double rate = -1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 1) < 0 ||
        getsockname(ls, (struct sockaddr *)&sa, &sl) < 0)
        goto out;
    c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        goto out;
    s = accept(ls, NULL, NULL);
    if (s < 0)
        goto out;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    pthread_t th;
    if (pthread_create(&th, NULL, echo_server, &s) != 0)
        goto out;
    char req[48] = {0}, ans[24];
    uint64_t n = 0, t0 = cli_now_ns(), end = t0 + (uint64_t)(seconds * 1e9);
    while (cli_now_ns() < end) {
        if (bench_send_all(c, req, sizeof(req)) < 0 || bench_recv_all(c, ans, sizeof(ans)) != 1)
            break;
        n++;
    }
    rate = (double)n / ((double)(cli_now_ns() - t0) / 1e9);
    shutdown(c, SHUT_RDWR);
    pthread_join(th, NULL);
out:
    if (c >= 0)
        close(c);
    if (s >= 0)
        close(s);
    if (ls >= 0)
        close(ls);
    return rate;
}

/* ---- get-with-wait wake-up ----------------------------------------------------------------- */

typedef struct {
    const char *url;
    unsigned rounds;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned announced; /* rounds whose get the waiter is about to send */
    unsigned returned;  /* rounds whose get has returned */
    uint64_t *ret_ns;
    int failed;
    char err[256];
} wake_t;

static void wake_key(unsigned r, char *key, size_t len)
{
    snprintf(key, len, "bench/wake/%d/%u", (int)getpid(), r);
}

static void *waiter_main(void *p)
{
    wake_t *w = p;
    kvf_store_t *st;
    char key[64];
    int rc = kvf_store_open(w->url, NULL, &st);
    for (unsigned r = 0; r < w->rounds; r++) {
        pthread_mutex_lock(&w->mu);
        w->announced = r + 1;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
        void *val = NULL;
        size_t len;
        wake_key(r, key, sizeof(key));
        if (rc == 0)
            rc = kvf_store_get(st, key, WAKE_WAIT_MS, &val, &len);
        uint64_t now = cli_now_ns();
        free(val);
        pthread_mutex_lock(&w->mu);
        w->ret_ns[r] = now;
        w->returned = r + 1;
        if (rc < 0 && !w->failed) {
            w->failed = 1;
            snprintf(w->err, sizeof(w->err), "get-with-wait %s: %s (%s)", key, kvf_last_error(),
                     kvf_err_name(rc));
        }
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
        if (rc < 0)
            break;
    }
    pthread_mutex_lock(&w->mu);
    w->returned = w->rounds;
    w->announced = w->rounds;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    kvf_store_close(st);
    return NULL;
}

/* Fills @lat_ns[0..rounds) (sorted); returns 0 or -1 after saying why. */
static int wake_latency(const char *url, unsigned rounds, uint64_t *lat_ns)
{
    wake_t w = {.url = url, .rounds = rounds};
    kvf_store_t *st;
    char key[64];
    pthread_t th;
    int rc = kvf_store_open(url, NULL, &st);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "cannot reach %s", url);
        return -1;
    }
    w.ret_ns = calloc(rounds, sizeof(uint64_t));
    pthread_mutex_init(&w.mu, NULL);
    cli_cond_init(&w.cv);
    if (!w.ret_ns || pthread_create(&th, NULL, waiter_main, &w) != 0) {
        kvf_store_close(st);
        free(w.ret_ns);
        return -1;
    }
    for (unsigned r = 0; r < rounds && rc == 0; r++) {
        pthread_mutex_lock(&w.mu);
        while (w.announced < r + 1)
            pthread_cond_wait(&w.cv, &w.mu);
        bool stop = w.failed;
        pthread_mutex_unlock(&w.mu);
        if (stop)
            break;
        struct timespec ts = {0, WAKE_HEADSTART_US * 1000};
        nanosleep(&ts, NULL);
        wake_key(r, key, sizeof(key));
        uint64_t t0 = cli_now_ns();
        rc = kvf_store_set(st, key, "1", 1, 0);
        pthread_mutex_lock(&w.mu);
        while (w.returned < r + 1)
            pthread_cond_wait(&w.cv, &w.mu);
        lat_ns[r] = w.ret_ns[r] - t0;
        pthread_mutex_unlock(&w.mu);
        kvf_store_del(st, key);
    }
    pthread_join(th, NULL);
    int status = 0;
    if (rc < 0 || w.failed) {
        fprintf(stderr, "kvferry " CMD ": wake-up: %s\n", w.failed ? w.err : kvf_last_error());
        status = -1;
    }
    qsort(lat_ns, rounds, sizeof(uint64_t), bench_cmp_u64);
    pthread_cond_destroy(&w.cv);
    pthread_mutex_destroy(&w.mu);
    free(w.ret_ns);
    kvf_store_close(st);
    return status;
}

/* ---- an engine's registration and lookup ------------------------------------------------- */

static int engine_latency(const char *url, unsigned rounds, uint64_t *reg_ns, uint64_t *look_ns)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    kvf_engine_t *dec = NULL, *pre = NULL;
    void *buf = NULL;
    int rc = kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, &cfg, &dec);
    if (rc == 0)
        rc = kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_PREFILL, 0, &cfg, &pre);
    if (rc == 0 && posix_memalign(&buf, 4096, 4096) != 0)
        rc = -KVF_ENOMEM;
    for (unsigned r = 0; r < rounds && rc == 0; r++) {
        kvf_region_info_t *regs = NULL;
        size_t n = 0;
        uint64_t t0 = cli_now_ns();
        rc = kvf_mem_register(dec, buf, 4096);
        uint64_t t1 = cli_now_ns();
        if (rc == 0)
            rc = kvf_peer_regions(pre, kvf_engine_session_id(dec), &regs, &n);
        uint64_t t2 = cli_now_ns();
        free(regs);
        if (rc == 0 && n != 1)
            rc = -KVF_EPROTO; /* the lookup must see the region just registered */
        if (rc == 0)
            rc = kvf_mem_unregister(dec, buf);
        reg_ns[r] = t1 - t0;
        look_ns[r] = t2 - t1;
    }
    if (rc < 0)
        kvf_cli_fail(CMD, rc, "engine registration and lookup at %s", url);
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
    free(buf);
    qsort(reg_ns, rounds, sizeof(uint64_t), bench_cmp_u64);
    qsort(look_ns, rounds, sizeof(uint64_t), bench_cmp_u64);
    return rc < 0 ? -1 : 0;
}

/* p50 and p99 of @n sorted samples, in microseconds. */
static void percentiles(const uint64_t *ns, uint64_t n, double *p50, double *p99)
{
    *p50 = (double)ns[(n - 1) / 2] / 1e3;
    *p99 = (double)ns[(n * 99 + 99) / 100 - 1] / 1e3;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvferry bench store [--clients N] [--seconds S] [--rounds N]\n"
               "                           [--store-url URL] [--json FILE]\n\n"
               "Config-store set and get operations per second from 1 and N clients, beside a\n"
               "raw TCP ping-pong on one loopback connection, get-with-wait wake-up latency, and\n"
               "an engine's registration (kvf_mem_register) and lookup (kvf_peer_regions).\n"
               "Without --store-url a store is started in this process on 127.0.0.1.\n\n"
               "  --clients N     clients of the second phase, 1..1000, default 8\n"
               "  --seconds S     length of each phase, 0.1..60, default 1\n"
               "  --rounds N      wake-up, registration and lookup rounds, 1..100000,\n"
               "                  default 200\n"
               "  --store-url URL a running store instead: tcp://, etcd:// or redis://\n"
               "  --json FILE     write the figures to FILE\n");
    fprintf(f, "\nTLS to the store (docs/security.md):\n%s", kvf_cli_tls_usage);
}

/* --seconds: the length of each phase. */
static int parse_seconds(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    char *end;
    double *seconds = o->dst;
    *seconds = strtod(value, &end);
    if (end == value || *end || !(*seconds >= 0.1 && *seconds <= 60)) {
        fprintf(stderr, "kvferry %s: --seconds %s: want 0.1 to 60\n", cmd, value);
        return -1;
    }
    return 0;
}

int kvf_cli_bench_store(int argc, char **argv)
{
    uint64_t clients = 8, rounds = 200;
    double seconds = 1.0;
    const char *url = NULL, *json_path = NULL;
    const kvf_cli_opt_t opts[] = {
        {"clients", KVF_CLI_U64, &clients, 1, 1000, NULL},
        {"seconds", KVF_CLI_CUSTOM, &seconds, 0, 0, parse_seconds},
        {"rounds", KVF_CLI_U64, &rounds, 1, 100000, NULL},
        KVF_CLI_OPT_STORE_URL(&url),
        {"json", KVF_CLI_STR, &json_path, 0, 0, NULL},
    };
    const kvf_cli_t cli = {CMD, usage, opts, KVF_CLI_NOPTS(opts), .log_level = false};
    int code = kvf_cli_parse(&cli, argc, argv, NULL);
    if (code != KVF_CLI_RUN)
        return code;
    signal(SIGPIPE, SIG_IGN);
    kvf_store_server_t *srv = NULL;
    if (!url) {
        int rc = kvf_store_server_start("tcp://127.0.0.1:0", &srv);
        if (rc < 0) {
            kvf_cli_fail(CMD, rc, "cannot start a store on 127.0.0.1");
            return 1;
        }
        url = kvf_store_server_url(srv);
    }
    int status = 1;
    uint64_t *lat = calloc(rounds, sizeof(uint64_t));
    uint64_t *reg = calloc(rounds, sizeof(uint64_t)), *look = calloc(rounds, sizeof(uint64_t));
    double raw = raw_pingpong_per_s(seconds);
    double set1 = run_clients(url, 1, OP_SET, seconds);
    double get1 = set1 >= 0 ? run_clients(url, 1, OP_GET, seconds) : -1;
    double setn = get1 >= 0 ? run_clients(url, (int)clients, OP_SET, seconds) : -1;
    double getn = setn >= 0 ? run_clients(url, (int)clients, OP_GET, seconds) : -1;
    if (getn < 0 || !lat || !reg || !look || wake_latency(url, (unsigned)rounds, lat) < 0 ||
        engine_latency(url, (unsigned)rounds, reg, look) < 0)
        goto out;

    double p50, p99, max = (double)lat[rounds - 1] / 1e3, reg50, reg99, look50, look99;
    percentiles(lat, rounds, &p50, &p99);
    percentiles(reg, rounds, &reg50, &reg99);
    percentiles(look, rounds, &look50, &look99);
    printf("%-34s %8s %12s %10s\n", "what", "clients", "ops/s", "vs raw");
    printf("%-34s %8d %12.0f %10s\n", "raw TCP ping-pong (48 B / 24 B)", 1, raw, "1.00");
    printf("%-34s %8d %12.0f %10.2f\n", "store set", 1, set1, raw > 0 ? set1 / raw : 0);
    printf("%-34s %8d %12.0f %10.2f\n", "store get", 1, get1, raw > 0 ? get1 / raw : 0);
    printf("%-34s %8" PRIu64 " %12.0f %10s\n", "store set", clients, setn, "");
    printf("%-34s %8" PRIu64 " %12.0f %10s\n", "store get", clients, getn, "");
    printf("get-with-wait wake-up (set -> waiter returns), %" PRIu64
           " rounds: p50 %.1f us, p99 %.1f us, max %.1f us\n",
           rounds, p50, p99, max);
    printf("engine registration (kvf_mem_register, 4 KiB), %" PRIu64
           " rounds: p50 %.1f us, p99 %.1f us\n",
           rounds, reg50, reg99);
    printf("engine lookup (kvf_peer_regions from another engine), %" PRIu64
           " rounds: p50 %.1f us, p99 %.1f us\n",
           rounds, look50, look99);
    status = 0;
    if (json_path) {
        json_t *root =
            json_pack("{s:s,s:s,s:f,s:I,s:f,s:f,s:f,s:f,s:f,s:{s:I,s:f,s:f,s:f}}", "tool",
                      "kvferry bench store", "version", KVF_VERSION_STRING, "seconds", seconds,
                      "clients", (json_int_t)clients, "raw_pingpong_per_s", raw, "set_per_s_1",
                      set1, "get_per_s_1", get1, "set_per_s_n", setn, "get_per_s_n", getn, "wake",
                      "rounds", (json_int_t)rounds, "p50_us", p50, "p99_us", p99, "max_us", max);
        json_object_set_new(root, "register",
                            json_pack("{s:f,s:f}", "p50_us", reg50, "p99_us", reg99));
        json_object_set_new(root, "lookup",
                            json_pack("{s:f,s:f}", "p50_us", look50, "p99_us", look99));
        if (json_dump_file(root, json_path, JSON_INDENT(2)) < 0) {
            fprintf(stderr, "kvferry " CMD ": cannot write %s: %s\n", json_path, strerror(errno));
            status = 1;
        }
        json_decref(root);
    }
out:
    free(lat);
    free(reg);
    free(look);
    kvf_store_server_stop(srv);
    return status;
}
