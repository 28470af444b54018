/*
 * A three-member etcd cluster on loopback, as an operator runs it: kill -9 the leader while
 * engines register and transfer and a watcher follows a prefix. Registrations and transfers go
 * on through the other members, the watch resumes where it was (every put seen once, in order),
 * and the killed member, restarted on its data, rejoins: the cluster then survives losing
 * another member, and the rejoined one serves every key.
 */
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"

#define MEMBERS 3
#define KEYS 60
#define START_TIMEOUT_MS 30000u

typedef struct {
    char dir[128];
    uint16_t port[MEMBERS], peer[MEMBERS];
    pid_t pid[MEMBERS];
    char url[256];
} cluster_t;

static uint16_t free_port(void)
{
    static uint16_t used[16];
    static int nused;
    for (;;) {
        uint16_t p = kvf_test_free_port(); /* below the ephemeral range */
        bool dup = false;
        for (int i = 0; i < nused; i++)
            dup |= used[i] == p;
        if (!dup && nused < 16) {
            used[nused++] = p;
            return p;
        }
    }
}

static void start_member(cluster_t *c, int i, bool fresh)
{
    char name[16], data[200], client[64], peer[64], cluster[512] = "", log[200];
    snprintf(name, sizeof(name), "m%d", i);
    snprintf(data, sizeof(data), "%s/%s", c->dir, name);
    snprintf(log, sizeof(log), "%s/%s.log", c->dir, name);
    snprintf(client, sizeof(client), "http://127.0.0.1:%u", c->port[i]);
    snprintf(peer, sizeof(peer), "http://127.0.0.1:%u", c->peer[i]);
    for (int j = 0; j < MEMBERS; j++) {
        size_t n = strlen(cluster);
        snprintf(cluster + n, sizeof(cluster) - n, "%sm%d=http://127.0.0.1:%u", j ? "," : "", j,
                 c->peer[j]);
    }
    char *argv[] = {"/usr/bin/etcd", "--name", name, "--data-dir", data,
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", cluster, "--initial-cluster-token", "kvf-test",
                    "--initial-cluster-state", fresh ? "new" : "existing",
                    "--heartbeat-interval", "50", "--election-timeout", "500",
                    "--log-level", "error", NULL};
    if (access(argv[0], X_OK) != 0)
        fail_msg("etcd is not installed; run `make deps` (Debian package etcd-server)");
    c->pid[i] = kvf_test_spawn(argv, log);
}

/* A member's view, from its /v3/maintenance/status: its id and its leader's. False when it does
 * not answer. */
typedef struct {
    char *p;
    size_t n;
} buf_t;

static size_t on_data(char *p, size_t s, size_t m, void *arg)
{
    buf_t *b = arg;
    char *q = realloc(b->p, b->n + s * m + 1);
    if (!q)
        return 0;
    memcpy(q + b->n, p, s * m);
    b->n += s * m;
    q[b->n] = '\0';
    b->p = q;
    return s * m;
}

static bool member_status(cluster_t *c, int i, char *self, char *leader, size_t n)
{
    char url[96];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/v3/maintenance/status", c->port[i]);
    CURL *h = curl_easy_init();
    buf_t b = {0};
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, "{}");
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 1000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    bool ok = curl_easy_perform(h) == CURLE_OK;
    curl_easy_cleanup(h);
    json_t *j = ok && b.p ? json_loads(b.p, 0, NULL) : NULL;
    free(b.p);
    const char *s = json_string_value(json_object_get(json_object_get(j, "header"), "member_id"));
    const char *l = json_string_value(json_object_get(j, "leader"));
    ok = s && l;
    if (ok) {
        snprintf(self, n, "%s", s);
        snprintf(leader, n, "%s", l);
    }
    json_decref(j);
    return ok;
}

/* Poll (bounded) until member @i answers with a leader; returns whether it leads. */
static bool wait_member(cluster_t *c, int i)
{
    uint64_t deadline = kvf_test_now_ms() + START_TIMEOUT_MS;
    char self[32], leader[32];
    for (;;) {
        if (member_status(c, i, self, leader, sizeof(self)) && strcmp(leader, "0") != 0)
            return strcmp(self, leader) == 0;
        if (kvf_test_now_ms() >= deadline)
            fail_msg("etcd member m%d did not answer with a leader within %u ms", i,
                     START_TIMEOUT_MS);
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static int cluster_leader(cluster_t *c)
{
    for (int i = 0; i < MEMBERS; i++)
        if (c->pid[i] && wait_member(c, i))
            return i;
    fail_msg("no member leads");
    return -1;
}

static void cluster_start(cluster_t *c)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->dir, sizeof(c->dir), "%s/kvf-etcd3-XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    if (!mkdtemp(c->dir))
        fail_msg("mkdtemp: %s", strerror(errno));
    size_t n = 0;
    n += (size_t)snprintf(c->url, sizeof(c->url), "etcd://");
    for (int i = 0; i < MEMBERS; i++) {
        c->port[i] = free_port();
        c->peer[i] = free_port();
        n += (size_t)snprintf(c->url + n, sizeof(c->url) - n, "%s127.0.0.1:%u", i ? "," : "",
                              c->port[i]);
    }
    for (int i = 0; i < MEMBERS; i++)
        start_member(c, i, true);
    for (int i = 0; i < MEMBERS; i++)
        wait_member(c, i);
}

static void member_kill(cluster_t *c, int i)
{
    kill(c->pid[i], SIGKILL);
    kvf_test_reap(c->pid[i], 10000);
    c->pid[i] = 0;
}

static void cluster_stop(cluster_t *c)
{
    for (int i = 0; i < MEMBERS; i++)
        if (c->pid[i])
            member_kill(c, i);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", c->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "%s failed\n", cmd);
}

/* ---- the watcher ----------------------------------------------------------------------------- */

typedef struct {
    pthread_mutex_t mu;
    int seen[KEYS];
    int order_errors;
    int last;
    int n;
} watcher_t;

static void on_event(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    watcher_t *w = arg;
    int k;
    if (type != KVF_STORE_EVENT_PUT || sscanf(kv->key, "reg/%d", &k) != 1 || k < 0 || k >= KEYS)
        return;
    pthread_mutex_lock(&w->mu);
    w->seen[k]++;
    if (k != w->last + 1)
        w->order_errors++;
    w->last = k;
    w->n++;
    pthread_mutex_unlock(&w->mu);
}

static void leader_killed_nothing_lost(void **state)
{
    (void)state;
    cluster_t c;
    cluster_start(&c);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = 10000;
    kvf_store_t *st = NULL, *wst = NULL;
    assert_kvf_ok(kvf_store_open(c.url, &o, &st));
    assert_kvf_ok(kvf_store_open(c.url, &o, &wst));
    watcher_t w = {.last = -1};
    pthread_mutex_init(&w.mu, NULL);
    uint64_t wid;
    assert_kvf_ok(kvf_store_watch(wst, "reg/", on_event, &w, &wid));

    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    cfg.lease_ttl_ms = 3000;
    cfg.init_timeout_ms = 20000;
    kvf_engine_t *dec = kvf_test_engine(c.url, KVF_ROLE_DECODE, &cfg);
    kvf_engine_t *pre = kvf_test_engine(c.url, KVF_ROLE_PREFILL, &cfg);
    enum { SZ = 1 << 16 };
    uint8_t *dst = calloc(1, SZ), *src = malloc(SZ);
    assert_kvf_ok(kvf_mem_register(dec, dst, SZ));

    int killed = -1;
    for (int k = 0; k < KEYS; k++) {
        if (k == KEYS / 3) {
            killed = cluster_leader(&c);
            member_kill(&c, killed);
        }
        char key[32], val[32];
        snprintf(key, sizeof(key), "reg/%03d", k);
        snprintf(val, sizeof(val), "v%d", k);
        assert_kvf_ok(kvf_store_set(st, key, val, strlen(val), 0));
        kvf_test_pattern(src, SZ, (uint32_t)k);
        assert_kvf_ok(kvf_write(pre, kvf_engine_session_id(dec), src, (uintptr_t)dst, SZ));
        assert_memory_equal(dst, src, SZ);
    }
    /* Registration goes on without the old leader: a new Prefill finds the Decode. */
    kvf_engine_t *late = kvf_test_engine(c.url, KVF_ROLE_PREFILL, &cfg);
    assert_kvf_ok(kvf_write(late, kvf_engine_session_id(dec), src, (uintptr_t)dst, SZ));
    kvf_engine_destroy(late);

    /* Every put seen exactly once, in order. */
    uint64_t t0 = kvf_test_now_ms();
    for (;;) {
        pthread_mutex_lock(&w.mu);
        int n = w.n;
        pthread_mutex_unlock(&w.mu);
        if (n >= KEYS || kvf_test_now_ms() - t0 > 15000)
            break;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    assert_kvf_ok(kvf_store_unwatch(wst, wid));
    for (int k = 0; k < KEYS; k++)
        if (w.seen[k] != 1)
            fail_msg("reg/%03d seen %d times by the watch", k, w.seen[k]);
    assert_int_equal(w.order_errors, 0);

    /* The killed member rejoins on its data: then the cluster survives losing another one, and
     * the rejoined member serves every key. */
    start_member(&c, killed, false);
    wait_member(&c, killed);
    int other = (killed + 1) % MEMBERS;
    member_kill(&c, other);
    assert_kvf_ok(kvf_store_set(st, "reg/after", "x", 1, 0));
    char one[64];
    snprintf(one, sizeof(one), "etcd://127.0.0.1:%u", c.port[killed]);
    kvf_store_t *only = NULL;
    assert_kvf_ok(kvf_store_open(one, &o, &only));
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_list(only, "reg/", &kvs, &n));
    assert_int_equal(n, KEYS + 1);
    kvf_store_kv_free(kvs, n);
    kvf_store_close(only);

    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
    kvf_store_close(st);
    kvf_store_close(wst);
    free(dst);
    free(src);
    cluster_stop(&c);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(leader_killed_nothing_lost),
};

KVF_TEST_MAIN(tests)
