/*
 * Client/server integration tests of the built-in config store: the kvf_store_* client against
 * an in-process kvf_store_server. Every test compares the values it reads back, not only return
 * codes. Waits are bounded condition-variable waits or blocking calls with timeouts; the only
 * delays are the ones a scenario is about (a store that starts late, a server stopped while a
 * request is blocked).
 */
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"

#include "common/wire.h"
#include "store/proto.h"
#include "store/server_internal.h"

/* Bound on waits for something that should happen promptly; generous for sanitizer builds. */
#define EVENT_TIMEOUT_MS 5000u

/* ---- helpers --------------------------------------------------------------------------------- */

static void nap_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static kvf_store_t *open_client(const char *url)
{
    kvf_store_t *st = NULL;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 5000;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    assert_non_null(st);
    return st;
}

/* Assert that @key holds exactly @len bytes @want. */
static void assert_value(kvf_store_t *st, const char *key, const void *want, size_t len)
{
    void *val = NULL;
    size_t got = 0;
    assert_kvf_ok(kvf_store_get(st, key, 0, &val, &got));
    assert_non_null(val);
    if (got != len)
        fail_msg("key \"%s\": got %zu bytes, want %zu", key, got, len);
    assert_memory_equal(val, want, len);
    assert_int_equal(((char *)val)[len], '\0'); /* NUL appended, not counted */
    free(val);
}

static void assert_str_value(kvf_store_t *st, const char *key, const char *want)
{
    assert_value(st, key, want, strlen(want));
}

static void assert_absent(kvf_store_t *st, const char *key)
{
    void *val = (void *)1;
    size_t len = 1;
    assert_kvf_err(kvf_store_get(st, key, 0, &val, &len), -KVF_ENOTFOUND);
    assert_null(val);
    assert_int_equal(len, 0);
}

/* Poll (every 2 ms, for at most @timeout_ms) until @n get-with-wait requests are parked on
 * @srv. Returns whether they were. */
static bool wait_parked(const kvf_store_server_t *srv, unsigned n, unsigned timeout_ms)
{
    uint64_t deadline = kvf_test_now_ms() + timeout_ms;
    for (;;) {
        if (kvf__store_server_waiters(srv) == n)
            return true;
        if (kvf_test_now_ms() >= deadline)
            return false;
        nap_ms(2);
    }
}

/* A URL on 127.0.0.1 with a port that was free a moment ago (nothing listens on it). */
static void free_port_url(char *url, size_t n)
{
    kvf_store_server_t *srv = kvf_test_store_start();
    snprintf(url, n, "%s", kvf_store_server_url(srv));
    kvf_store_server_stop(srv);
}

/* ---- watch event recorder -------------------------------------------------------------------- */

#define REC_MAX 64

typedef struct {
    int type;
    char key[128];
    char val[128];
    size_t val_len;
    bool val_null;
} rec_event_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n;
    rec_event_t ev[REC_MAX];
} recorder_t;

static void rec_init(recorder_t *r)
{
    memset(r, 0, sizeof(*r));
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cv, &a);
    pthread_condattr_destroy(&a);
    pthread_mutex_init(&r->mu, NULL);
}

static void rec_destroy(recorder_t *r)
{
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
}

static void rec_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    recorder_t *r = arg;
    pthread_mutex_lock(&r->mu);
    if (r->n < REC_MAX) {
        rec_event_t *e = &r->ev[r->n];
        e->type = (int)type;
        snprintf(e->key, sizeof(e->key), "%s", kv->key);
        e->val_null = kv->val == NULL;
        e->val_len = kv->val_len;
        if (kv->val)
            snprintf(e->val, sizeof(e->val), "%.*s", (int)kv->val_len, (const char *)kv->val);
    }
    r->n++;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* Wait until at least @n events arrived or @timeout_ms passed; returns the count seen. */
static int rec_wait(recorder_t *r, int n, unsigned timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&r->mu);
    while (r->n < n && pthread_cond_timedwait(&r->cv, &r->mu, &ts) == 0)
        ;
    int got = r->n;
    pthread_mutex_unlock(&r->mu);
    return got;
}

static void assert_event(recorder_t *r, int i, int type, const char *key, const char *val)
{
    pthread_mutex_lock(&r->mu);
    rec_event_t e = r->ev[i];
    pthread_mutex_unlock(&r->mu);
    if (e.type != type || strcmp(e.key, key) != 0)
        fail_msg("event %d: got type %d key \"%s\", want type %d key \"%s\"", i, e.type, e.key,
                 type, key);
    if (val) {
        assert_false(e.val_null);
        assert_int_equal(e.val_len, strlen(val));
        assert_string_equal(e.val, val);
    } else {
        assert_true(e.val_null);
        assert_int_equal(e.val_len, 0);
    }
}

/* ---- fixture: one server and one client per test --------------------------------------------- */

typedef struct {
    kvf_store_server_t *srv;
    char url[128];
    kvf_store_t *st;
} fx_t;

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    fx->srv = kvf_test_store_start();
    snprintf(fx->url, sizeof(fx->url), "%s", kvf_store_server_url(fx->srv));
    fx->st = open_client(fx->url);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_store_close(fx->st);
    kvf_store_server_stop(fx->srv);
    free(fx);
    return 0;
}

/* ---- basic operations ------------------------------------------------------------------------ */

static void set_get_round_trip(void **state)
{
    fx_t *fx = *state;
    assert_kvf_ok(kvf_store_set(fx->st, "alpha", "one", 3, 0));
    assert_str_value(fx->st, "alpha", "one");
    assert_kvf_ok(kvf_store_set(fx->st, "alpha", "second value", 12, 0));
    assert_str_value(fx->st, "alpha", "second value");
    assert_string_equal(kvf_store_url(fx->st), fx->url);

    /* A second client sees what the first wrote. */
    kvf_store_t *other = open_client(fx->url);
    assert_str_value(other, "alpha", "second value");
    assert_kvf_ok(kvf_store_del(other, "alpha"));
    assert_absent(fx->st, "alpha");
    assert_kvf_err(kvf_store_del(fx->st, "alpha"), -KVF_ENOTFOUND);
    assert_last_error_contains("\"alpha\"");
    assert_kvf_ok(kvf_store_ping(other));
    kvf_store_close(other);
}

static void bad_arguments_rejected(void **state)
{
    fx_t *fx = *state;
    void *val;
    size_t len;

    assert_kvf_err(kvf_store_set(fx->st, "", "x", 1, 0), -KVF_EINVAL);
    assert_last_error_contains("key is empty");
    assert_last_error_contains(fx->url);
    assert_kvf_err(kvf_store_set(fx->st, NULL, "x", 1, 0), -KVF_EINVAL);
    assert_last_error_contains("key is NULL");
    assert_kvf_err(kvf_store_get(fx->st, "", 0, &val, &len), -KVF_EINVAL);
    assert_last_error_contains("key is empty");

    char *long_key = malloc(KVF_STORE_MAX_KEY_LEN + 2);
    assert_non_null(long_key);
    memset(long_key, 'k', KVF_STORE_MAX_KEY_LEN + 1);
    long_key[KVF_STORE_MAX_KEY_LEN + 1] = '\0';
    assert_kvf_err(kvf_store_set(fx->st, long_key, "x", 1, 0), -KVF_ETOOBIG);
    assert_last_error_contains("1025 bytes");
    /* Exactly the limit is fine. */
    long_key[KVF_STORE_MAX_KEY_LEN] = '\0';
    assert_kvf_ok(kvf_store_set(fx->st, long_key, "x", 1, 0));
    assert_str_value(fx->st, long_key, "x");
    free(long_key);

    /* The length alone is checked: nothing is read from the (tiny) buffer. */
    assert_kvf_err(kvf_store_set(fx->st, "big", "x", KVF_STORE_MAX_VALUE_LEN + 1u, 0),
                   -KVF_ETOOBIG);
    assert_last_error_contains("16777217 bytes");
    assert_kvf_err(kvf_store_set(fx->st, "nullval", NULL, 5, 0), -KVF_EINVAL);
    assert_kvf_err(kvf_store_get(fx->st, "k", KVF_STORE_MAX_WAIT_MS + 1, &val, &len),
                   -KVF_EINVAL);
    uint64_t lease;
    assert_kvf_err(kvf_store_lease_grant(fx->st, 0, &lease), -KVF_EINVAL);
    assert_last_error_contains("ttl");
    assert_kvf_err(kvf_store_set(fx->st, "k", "v", 1, 4242), -KVF_ENOTFOUND);
    assert_last_error_contains("lease 4242");
    assert_kvf_err(kvf_store_unwatch(fx->st, 777), -KVF_ENOTFOUND);
    assert_kvf_err(kvf_store_lease_revoke(fx->st, 4242), -KVF_ENOTFOUND);
    assert_kvf_err(kvf_store_lease_keepalive_stop(fx->st, 4242), -KVF_ENOTFOUND);
    /* None of it reached the store or broke the connection. */
    assert_absent(fx->st, "big");
    assert_absent(fx->st, "k");
    assert_kvf_ok(kvf_store_ping(fx->st));
}

static void values_empty_large_binary(void **state)
{
    fx_t *fx = *state;
    assert_kvf_ok(kvf_store_set(fx->st, "empty", "", 0, 0));
    assert_value(fx->st, "empty", "", 0);
    assert_kvf_ok(kvf_store_set(fx->st, "empty-null", NULL, 0, 0));
    assert_value(fx->st, "empty-null", "", 0);

    const uint8_t bin[] = {0, 1, 0, 0xff, 'a', 0, 0x80, 0};
    assert_kvf_ok(kvf_store_set(fx->st, "binary", bin, sizeof(bin), 0));
    assert_value(fx->st, "binary", bin, sizeof(bin));

    size_t big_len = 1u << 20;
    uint8_t *big = malloc(big_len);
    assert_non_null(big);
    for (size_t i = 0; i < big_len; i++)
        big[i] = (uint8_t)(i * 131u + (i >> 9));
    assert_kvf_ok(kvf_store_set(fx->st, "big", big, big_len, 0));
    assert_value(fx->st, "big", big, big_len);

    /* The list answer carries the same bytes. */
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_list(fx->st, "b", &kvs, &n));
    assert_int_equal(n, 2);
    assert_string_equal(kvs[0].key, "big");
    assert_int_equal(kvs[0].val_len, big_len);
    assert_memory_equal(kvs[0].val, big, big_len);
    assert_string_equal(kvs[1].key, "binary");
    assert_int_equal(kvs[1].val_len, sizeof(bin));
    assert_memory_equal(kvs[1].val, bin, sizeof(bin));
    kvf_store_kv_free(kvs, n);
    free(big);
}

/* ---- get with wait --------------------------------------------------------------------------- */

typedef struct {
    const char *url;
    const kvf_store_server_t *srv;
    const char *key;
    const char *val;
    bool parked; /* the reader's GET was parked on the server when the key was set */
    int rc;
} setter_t;

static void *setter_main(void *arg)
{
    setter_t *s = arg;
    kvf_store_t *st = NULL;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    s->rc = kvf_store_open(s->url, &o, &st);
    if (s->rc < 0)
        return NULL;
    /* The scenario: the key appears once the reader is waiting for it on the server. */
    s->parked = wait_parked(s->srv, 1, EVENT_TIMEOUT_MS);
    s->rc = kvf_store_set(st, s->key, s->val, strlen(s->val), 0);
    kvf_store_close(st);
    return NULL;
}

static void get_wait_blocks_until_set(void **state)
{
    fx_t *fx = *state;
    assert_absent(fx->st, "late");
    assert_int_equal(kvf__store_server_waiters(fx->srv), 0);
    setter_t s = {.url = fx->url, .srv = fx->srv, .key = "late", .val = "here at last"};
    pthread_t t;
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(pthread_create(&t, NULL, setter_main, &s), 0);
    void *val = NULL;
    size_t len = 0;
    int rc = kvf_store_get(fx->st, "late", 10000, &val, &len);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_kvf_ok(s.rc);
    if (!s.parked)
        fail_msg("the get-with-wait was not parked on the server within %u ms", EVENT_TIMEOUT_MS);
    assert_kvf_ok(rc);
    assert_int_equal(len, strlen("here at last"));
    assert_string_equal(val, "here at last");
    free(val);
    /* The key was set only once the GET was parked: it was answered by the set, not by its
     * 10 s wait running out. */
    if (took > 5000)
        fail_msg("get-with-wait returned after %" PRIu64 " ms", took);
    assert_int_equal(kvf__store_server_waiters(fx->srv), 0);
}

static void get_wait_times_out(void **state)
{
    fx_t *fx = *state;
    void *val = (void *)1;
    size_t len = 1;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_get(fx->st, "never", 400, &val, &len), -KVF_ETIMEDOUT);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_null(val);
    assert_int_equal(len, 0);
    assert_last_error_contains("\"never\"");
    if (took < 400 || took > 600)
        fail_msg("a 400 ms wait returned after %" PRIu64 " ms", took);
    /* The connection is still fine. */
    assert_kvf_ok(kvf_store_set(fx->st, "never", "now", 3, 0));
    assert_str_value(fx->st, "never", "now");
}

static void get_wait_zero_missing(void **state)
{
    fx_t *fx = *state;
    void *val;
    size_t len;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_get(fx->st, "missing", 0, &val, &len), -KVF_ENOTFOUND);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_last_error_contains("get \"missing\": not found");
    if (took >= 100)
        fail_msg("wait 0 on a missing key took %" PRIu64 " ms", took);
}

/* ---- add and cas ----------------------------------------------------------------------------- */

static void add_counter(void **state)
{
    fx_t *fx = *state;
    int64_t v = 0;
    assert_kvf_ok(kvf_store_add(fx->st, "ctr", 1, &v));
    assert_int_equal(v, 1);
    assert_kvf_ok(kvf_store_add(fx->st, "ctr", 1, &v));
    assert_int_equal(v, 2);
    assert_str_value(fx->st, "ctr", "2");
    assert_kvf_ok(kvf_store_add(fx->st, "ctr", -5, &v));
    assert_int_equal(v, -3);
    assert_str_value(fx->st, "ctr", "-3");
    assert_kvf_ok(kvf_store_add(fx->st, "ctr", 0, NULL));
    assert_str_value(fx->st, "ctr", "-3");

    /* Near the top of the range. */
    const int64_t half = INT64_MAX / 2;
    assert_kvf_ok(kvf_store_add(fx->st, "big", half, &v));
    assert_true(v == half);
    assert_kvf_ok(kvf_store_add(fx->st, "big", half, &v));
    assert_true(v == INT64_MAX - 1);
    assert_kvf_ok(kvf_store_add(fx->st, "big", 1, &v));
    assert_true(v == INT64_MAX);
    assert_str_value(fx->st, "big", "9223372036854775807");
    assert_kvf_err(kvf_store_add(fx->st, "big", 1, &v), -KVF_ERANGE);
    assert_last_error_contains("\"big\"");
    assert_str_value(fx->st, "big", "9223372036854775807");

    /* And the bottom. */
    assert_kvf_ok(kvf_store_add(fx->st, "neg", INT64_MIN, &v));
    assert_true(v == INT64_MIN);
    assert_str_value(fx->st, "neg", "-9223372036854775808");
    assert_kvf_err(kvf_store_add(fx->st, "neg", -1, &v), -KVF_ERANGE);
    assert_str_value(fx->st, "neg", "-9223372036854775808");
    assert_kvf_ok(kvf_store_add(fx->st, "neg", INT64_MAX, &v));
    assert_int_equal(v, -1);

    /* A value that is not a number. */
    assert_kvf_ok(kvf_store_set(fx->st, "text", "abc", 3, 0));
    assert_kvf_err(kvf_store_add(fx->st, "text", 1, &v), -KVF_EBADVALUE);
    assert_str_value(fx->st, "text", "abc");
}

static void cas_semantics(void **state)
{
    fx_t *fx = *state;
    /* Absent: only a NULL expectation matches. */
    assert_kvf_err(kvf_store_cas(fx->st, "c", "x", 1, "v0", 2, 0), -KVF_ECASMISMATCH);
    assert_last_error_contains("\"c\"");
    assert_absent(fx->st, "c");
    assert_kvf_ok(kvf_store_cas(fx->st, "c", NULL, 0, "v1", 2, 0));
    assert_str_value(fx->st, "c", "v1");
    /* Present: NULL no longer matches, nor does another value, nor a prefix of it. */
    assert_kvf_err(kvf_store_cas(fx->st, "c", NULL, 0, "v2", 2, 0), -KVF_ECASMISMATCH);
    assert_str_value(fx->st, "c", "v1");
    assert_kvf_err(kvf_store_cas(fx->st, "c", "v9", 2, "v2", 2, 0), -KVF_ECASMISMATCH);
    assert_str_value(fx->st, "c", "v1");
    assert_kvf_err(kvf_store_cas(fx->st, "c", "v", 1, "v2", 2, 0), -KVF_ECASMISMATCH);
    assert_str_value(fx->st, "c", "v1");
    assert_kvf_ok(kvf_store_cas(fx->st, "c", "v1", 2, "v2", 2, 0));
    assert_str_value(fx->st, "c", "v2");
    /* Empty values compare too. */
    assert_kvf_ok(kvf_store_cas(fx->st, "c", "v2", 2, "", 0, 0));
    assert_value(fx->st, "c", "", 0);
    assert_kvf_ok(kvf_store_cas(fx->st, "c", "", 0, "v3", 2, 0));
    assert_str_value(fx->st, "c", "v3");
}

/* ---- list ------------------------------------------------------------------------------------ */

static void list_prefix(void **state)
{
    fx_t *fx = *state;
    const char *keys[] = {"pre/b", "pre/a", "prefix2", "pr", "pre/c/d", "other", "pre"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        char v[32];
        snprintf(v, sizeof(v), "val-%s", keys[i]);
        assert_kvf_ok(kvf_store_set(fx->st, keys[i], v, strlen(v), 0));
    }
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;

    assert_kvf_ok(kvf_store_list(fx->st, "pre/", &kvs, &n));
    const char *want1[] = {"pre/a", "pre/b", "pre/c/d"};
    assert_int_equal(n, 3);
    for (size_t i = 0; i < n; i++) {
        char v[32];
        snprintf(v, sizeof(v), "val-%s", want1[i]);
        assert_string_equal(kvs[i].key, want1[i]);
        assert_int_equal(kvs[i].val_len, strlen(v));
        assert_string_equal(kvs[i].val, v);
    }
    kvf_store_kv_free(kvs, n);

    assert_kvf_ok(kvf_store_list(fx->st, "pre", &kvs, &n));
    const char *want2[] = {"pre", "pre/a", "pre/b", "pre/c/d", "prefix2"};
    assert_int_equal(n, 5);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(kvs[i].key, want2[i]);
    kvf_store_kv_free(kvs, n);

    assert_kvf_ok(kvf_store_list(fx->st, "prefix2", &kvs, &n));
    assert_int_equal(n, 1);
    assert_string_equal(kvs[0].key, "prefix2");
    assert_string_equal(kvs[0].val, "val-prefix2");
    kvf_store_kv_free(kvs, n);

    assert_kvf_ok(kvf_store_list(fx->st, "nothing", &kvs, &n));
    assert_int_equal(n, 0);
    kvf_store_kv_free(kvs, n);

    assert_kvf_ok(kvf_store_list(fx->st, "", &kvs, &n));
    const char *want3[] = {"other", "pr", "pre", "pre/a", "pre/b", "pre/c/d", "prefix2"};
    assert_int_equal(n, 7);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(kvs[i].key, want3[i]);
    kvf_store_kv_free(kvs, n);
}

/* ---- watch ----------------------------------------------------------------------------------- */

static void watch_put_delete_unwatch(void **state)
{
    fx_t *fx = *state;
    recorder_t r;
    rec_init(&r);
    uint64_t wid = 0;
    assert_kvf_ok(kvf_store_watch(fx->st, "w/", rec_cb, &r, &wid));
    assert_true(wid != 0);

    kvf_store_t *writer = open_client(fx->url);
    assert_kvf_ok(kvf_store_set(writer, "w/x", "1", 1, 0));
    assert_kvf_ok(kvf_store_set(writer, "wx", "not watched", 11, 0));
    assert_kvf_ok(kvf_store_set(writer, "w/y", "", 0, 0));
    assert_kvf_ok(kvf_store_del(writer, "w/x"));
    assert_int_equal(rec_wait(&r, 3, EVENT_TIMEOUT_MS), 3);
    assert_event(&r, 0, KVF_STORE_EVENT_PUT, "w/x", "1");
    assert_event(&r, 1, KVF_STORE_EVENT_PUT, "w/y", "");
    assert_event(&r, 2, KVF_STORE_EVENT_DELETE, "w/x", NULL);

    assert_kvf_ok(kvf_store_unwatch(fx->st, wid));
    assert_kvf_err(kvf_store_unwatch(fx->st, wid), -KVF_ENOTFOUND);
    assert_kvf_ok(kvf_store_set(writer, "w/z", "after", 5, 0));
    /* The store sends events before later answers on the same connection, so after this round
     * trip any event for w/z would already have been delivered. */
    assert_kvf_ok(kvf_store_ping(fx->st));
    assert_int_equal(rec_wait(&r, 4, 100), 3);

    kvf_store_close(writer);
    rec_destroy(&r);
}

typedef struct {
    kvf_store_t *st;
    uint64_t wid;
    int calls;
    int unwatch_rc;
} self_unwatch_t;

static void self_unwatch_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    (void)type;
    (void)kv;
    self_unwatch_t *s = arg;
    s->calls++;
    s->unwatch_rc = kvf_store_unwatch(s->st, s->wid);
}

static void watch_unwatch_from_callback(void **state)
{
    fx_t *fx = *state;
    self_unwatch_t s = {.st = fx->st};
    recorder_t r;
    rec_init(&r);
    uint64_t wid2;
    /* s.wid is written before any event can be sent: nothing is set under "s/" yet. */
    assert_kvf_ok(kvf_store_watch(fx->st, "s/", self_unwatch_cb, &s, &s.wid));
    assert_kvf_ok(kvf_store_watch(fx->st, "s/", rec_cb, &r, &wid2));
    assert_kvf_ok(kvf_store_set(fx->st, "s/1", "a", 1, 0));
    assert_kvf_ok(kvf_store_set(fx->st, "s/2", "b", 1, 0));
    /* The recorder sees both; by then the self-unwatching callback has run exactly once. */
    assert_int_equal(rec_wait(&r, 2, EVENT_TIMEOUT_MS), 2);
    assert_kvf_ok(kvf_store_unwatch(fx->st, wid2));
    assert_int_equal(s.calls, 1);
    assert_kvf_ok(s.unwatch_rc);
    rec_destroy(&r);
}

/* ---- leases ---------------------------------------------------------------------------------- */

static void lease_expires_without_keepalive(void **state)
{
    fx_t *fx = *state;
    recorder_t r;
    rec_init(&r);
    uint64_t wid, dying, kept;
    kvf_store_t *watcher = open_client(fx->url);
    assert_kvf_ok(kvf_store_watch(watcher, "l/", rec_cb, &r, &wid));

    assert_kvf_ok(kvf_store_lease_grant(fx->st, 300, &dying));
    assert_kvf_ok(kvf_store_lease_grant(fx->st, 300, &kept));
    assert_true(dying != kept);
    assert_kvf_ok(kvf_store_set(fx->st, "l/dying", "d", 1, dying));
    assert_kvf_ok(kvf_store_set(fx->st, "l/kept", "k", 1, kept));
    assert_int_equal(rec_wait(&r, 2, EVENT_TIMEOUT_MS), 2);
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_store_lease_keepalive_stop(fx->st, dying));

    /* The watcher is told when the lease expires. */
    assert_int_equal(rec_wait(&r, 3, EVENT_TIMEOUT_MS), 3);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_event(&r, 2, KVF_STORE_EVENT_DELETE, "l/dying", NULL);
    if (took > 3000)
        fail_msg("a 300 ms lease took %" PRIu64 " ms to expire", took);
    assert_absent(fx->st, "l/dying");
    assert_absent(watcher, "l/dying");
    /* The other lease, kept alive in the background, outlived its TTL with its key. */
    assert_str_value(watcher, "l/kept", "k");
    assert_kvf_err(kvf_store_set(fx->st, "l/again", "x", 1, dying), -KVF_ENOTFOUND);
    assert_absent(fx->st, "l/again");

    kvf_store_close(watcher);
    rec_destroy(&r);
}

static void lease_revoke_deletes_keys(void **state)
{
    fx_t *fx = *state;
    uint64_t lease;
    assert_kvf_ok(kvf_store_lease_grant(fx->st, 10000, &lease));
    assert_kvf_ok(kvf_store_set(fx->st, "r/1", "one", 3, lease));
    assert_kvf_ok(kvf_store_cas(fx->st, "r/2", NULL, 0, "two", 3, lease));
    assert_kvf_ok(kvf_store_set(fx->st, "r/3", "three", 5, 0));
    assert_str_value(fx->st, "r/1", "one");
    assert_str_value(fx->st, "r/2", "two");
    assert_kvf_ok(kvf_store_lease_revoke(fx->st, lease));
    assert_absent(fx->st, "r/1");
    assert_absent(fx->st, "r/2");
    assert_str_value(fx->st, "r/3", "three");
    assert_kvf_err(kvf_store_set(fx->st, "r/1", "x", 1, lease), -KVF_ENOTFOUND);
    assert_kvf_err(kvf_store_lease_revoke(fx->st, lease), -KVF_ENOTFOUND);
}

/* A revoke that cannot reach the store still ends the lease in the client (no more keep-alives,
 * no re-grant after a reconnect) and says that the store was not reached. */
static void lease_revoke_while_disconnected(void **state)
{
    fx_t *fx = *state;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = 300;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(fx->url, &o, &st));
    uint64_t lease;
    assert_kvf_ok(kvf_store_lease_grant(st, 2000, &lease));
    assert_kvf_ok(kvf_store_set(st, "rd/key", "v", 1, lease));

    kvf_store_server_stop(fx->srv);
    fx->srv = NULL;
    /* Once a request has failed, the client knows that it is disconnected. */
    assert_kvf_err(kvf_store_ping(st), -KVF_ESTOREDOWN);
    assert_kvf_err(kvf_store_lease_revoke(st, lease), -KVF_ESTOREDOWN);
    assert_last_error_contains("not connected to the store");
    assert_last_error_contains("expires on the store within its TTL of 2000 ms");
    /* It is forgotten all the same. */
    assert_kvf_err(kvf_store_lease_revoke(st, lease), -KVF_ENOTFOUND);
    assert_kvf_err(kvf_store_lease_keepalive_stop(st, lease), -KVF_ENOTFOUND);

    /* The store comes back: the lease is not re-granted nor its key re-published. */
    kvf_store_server_t *srv2 = NULL;
    assert_kvf_ok(kvf_store_server_start(fx->url, &srv2));
    fx->srv = srv2;
    uint64_t deadline = kvf_test_now_ms() + EVENT_TIMEOUT_MS;
    int rc;
    while ((rc = kvf_store_ping(st)) < 0 && kvf_test_now_ms() < deadline)
        ;
    assert_kvf_ok(rc);
    assert_absent(st, "rd/key");
    assert_kvf_err(kvf_store_set(st, "rd/other", "x", 1, lease), -KVF_ENOTFOUND);
    assert_absent(st, "rd/other");
    kvf_store_close(st);
}

/* Stalls the client's I/O thread once, longer than the lease TTL, as a paused process would. */
static void stall_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    (void)type;
    (void)kv;
    nap_ms(*(unsigned *)arg);
}

/* The store lost a lease the client still wants (its keep-alives stalled past the TTL): the next
 * keep-alive is answered "lease not found", and the client re-grants it and re-publishes its
 * keys under the same user-visible lease id. */
static void lease_regranted_after_store_lost_it(void **state)
{
    fx_t *fx = *state;
    recorder_t r;
    rec_init(&r);
    unsigned stall_ms = 900;
    uint64_t lease, wid_stall, wid_rec;
    kvf_store_t *other = open_client(fx->url);
    assert_kvf_ok(kvf_store_watch(other, "g/", rec_cb, &r, &wid_rec));
    assert_kvf_ok(kvf_store_lease_grant(fx->st, 300, &lease));
    assert_kvf_ok(kvf_store_set(fx->st, "g/key", "mine", 4, lease));
    assert_int_equal(rec_wait(&r, 1, EVENT_TIMEOUT_MS), 1);
    assert_kvf_ok(kvf_store_watch(fx->st, "stall/", stall_cb, &stall_ms, &wid_stall));
    assert_kvf_ok(kvf_store_set(other, "stall/now", "", 0, 0));

    /* put, delete (expired during the stall), put (re-published). */
    assert_int_equal(rec_wait(&r, 3, EVENT_TIMEOUT_MS), 3);
    assert_event(&r, 0, KVF_STORE_EVENT_PUT, "g/key", "mine");
    assert_event(&r, 1, KVF_STORE_EVENT_DELETE, "g/key", NULL);
    assert_event(&r, 2, KVF_STORE_EVENT_PUT, "g/key", "mine");
    assert_str_value(other, "g/key", "mine");
    /* The same lease id keeps working and is kept alive again: still there after 2 TTLs. */
    assert_kvf_ok(kvf_store_set(fx->st, "g/two", "2", 1, lease));
    void *val = NULL;
    size_t len;
    assert_kvf_err(kvf_store_get(other, "g/never", 600, &val, &len), -KVF_ETIMEDOUT);
    assert_str_value(other, "g/key", "mine");
    assert_str_value(other, "g/two", "2");
    assert_kvf_ok(kvf_store_unwatch(fx->st, wid_stall));
    assert_kvf_ok(kvf_store_lease_revoke(fx->st, lease));
    assert_absent(other, "g/key");
    assert_absent(other, "g/two");
    kvf_store_close(other);
    rec_destroy(&r);
}

/* Leases still alive at close are revoked, so their keys vanish at once. */
static void close_revokes_leases(void **state)
{
    fx_t *fx = *state;
    kvf_store_t *st = open_client(fx->url);
    uint64_t lease;
    assert_kvf_ok(kvf_store_lease_grant(st, 60000, &lease));
    assert_kvf_ok(kvf_store_set(st, "c/1", "v", 1, lease));
    assert_str_value(fx->st, "c/1", "v");
    kvf_store_close(st);
    assert_absent(fx->st, "c/1");
}

/* ---- server stop, restart, late start -------------------------------------------------------- */

typedef struct {
    kvf_store_server_t *srv;
    bool parked;
    _Atomic uint64_t stopped_at;
} stopper_t;

static void *stopper_main(void *arg)
{
    stopper_t *s = arg;
    /* The scenario: the server goes away while a request is parked in it. */
    s->parked = wait_parked(s->srv, 1, EVENT_TIMEOUT_MS);
    atomic_store(&s->stopped_at, kvf_test_now_ms());
    kvf_store_server_stop(s->srv);
    return NULL;
}

static void blocked_get_fails_when_server_stops(void **state)
{
    fx_t *fx = *state;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = 400;
    kvf_store_t *quick = NULL;
    assert_kvf_ok(kvf_store_open(fx->url, &o, &quick));
    stopper_t s = {.srv = fx->srv};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, stopper_main, &s), 0);
    void *val = NULL;
    size_t len = 0;
    int rc = kvf_store_get(fx->st, "blocked", 20000, &val, &len);
    uint64_t end = kvf_test_now_ms();
    assert_int_equal(pthread_join(t, NULL), 0);
    fx->srv = NULL; /* stopped and freed by the thread */
    if (!s.parked)
        fail_msg("the get-with-wait was not parked on the server within %u ms", EVENT_TIMEOUT_MS);
    assert_null(val);
    if (rc != -KVF_ESTOREDOWN)
        fail_msg("blocked get returned %d (%s), want KVF_ESTOREDOWN: %s", rc, kvf_err_name(rc),
                 kvf_last_error());
    assert_last_error_contains("\"blocked\"");
    uint64_t after = end - atomic_load(&s.stopped_at);
    if (after > 1000)
        fail_msg("blocked get returned %" PRIu64 " ms after the server stopped", after);
    /* A request issued while the store is down waits for it, then fails within its timeout.
     * The first one may still go out on the dying connection (and fail at once); once it has
     * failed, the client knows the store is down and the second takes the waiting path. */
    assert_kvf_err(kvf_store_ping(quick), -KVF_ESTOREDOWN);
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_ping(quick), -KVF_ESTOREDOWN);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_last_error_contains("no connection to the store within 400 ms");
    if (took < 400 || took > 1000)
        fail_msg("a ping with a 400 ms timeout failed after %" PRIu64 " ms", took);
    kvf_store_close(quick);
}

static void reconnect_after_restart_republishes(void **state)
{
    fx_t *fx = *state;
    recorder_t r;
    rec_init(&r);
    uint64_t lease, wid;
    assert_kvf_ok(kvf_store_lease_grant(fx->st, 5000, &lease));
    assert_kvf_ok(kvf_store_set(fx->st, "sess/a", "record-a", 8, lease));
    assert_kvf_ok(kvf_store_set(fx->st, "sess/b", "old-b", 5, lease));
    assert_kvf_ok(kvf_store_set(fx->st, "sess/b", "record-b", 8, lease));
    assert_kvf_ok(kvf_store_set(fx->st, "sess/gone", "x", 1, lease));
    assert_kvf_ok(kvf_store_del(fx->st, "sess/gone"));
    assert_kvf_ok(kvf_store_set(fx->st, "sess/unbound", "u", 1, lease));
    assert_kvf_ok(kvf_store_set(fx->st, "sess/unbound", "plain", 5, 0)); /* no lease any more */
    assert_kvf_ok(kvf_store_watch(fx->st, "ev/", rec_cb, &r, &wid));

    kvf_store_server_stop(fx->srv);
    fx->srv = NULL;
    kvf_store_server_t *srv2 = NULL;
    assert_kvf_ok(kvf_store_server_start(fx->url, &srv2));
    fx->srv = srv2;
    assert_string_equal(kvf_store_server_url(srv2), fx->url);

    /* A fresh client waits for the re-published key. */
    kvf_store_t *fresh = open_client(fx->url);
    void *val = NULL;
    size_t len = 0;
    assert_kvf_ok(kvf_store_get(fresh, "sess/a", 10000, &val, &len));
    assert_int_equal(len, 8);
    assert_string_equal(val, "record-a");
    free(val);
    assert_kvf_ok(kvf_store_get(fresh, "sess/b", 5000, &val, &len));
    assert_string_equal(val, "record-b");
    free(val);
    /* Deleted and re-bound keys are not re-published; plain keys died with the old store. */
    assert_absent(fresh, "sess/gone");
    assert_absent(fresh, "sess/unbound");

    /* The watch was re-registered (it went out before the re-published keys). */
    assert_kvf_ok(kvf_store_set(fresh, "ev/1", "after restart", 13, 0));
    assert_int_equal(rec_wait(&r, 1, EVENT_TIMEOUT_MS), 1);
    assert_event(&r, 0, KVF_STORE_EVENT_PUT, "ev/1", "after restart");

    /* The user's lease id still works, and its keys still go with it. */
    assert_kvf_ok(kvf_store_set(fx->st, "sess/c", "record-c", 8, lease));
    assert_str_value(fresh, "sess/c", "record-c");
    assert_kvf_ok(kvf_store_lease_revoke(fx->st, lease));
    assert_absent(fresh, "sess/a");
    assert_absent(fresh, "sess/c");

    assert_kvf_ok(kvf_store_unwatch(fx->st, wid));
    kvf_store_close(fresh);
    rec_destroy(&r);
}

typedef struct {
    char url[128];
    unsigned delay_ms;
    kvf_store_server_t *srv;
    int rc;
} late_start_t;

static void *late_start_main(void *arg)
{
    late_start_t *s = arg;
    /* The scenario: the store comes up after the node started connecting to it. */
    nap_ms(s->delay_ms);
    s->rc = kvf_store_server_start(s->url, &s->srv);
    return NULL;
}

static void open_waits_for_late_store(void **state)
{
    (void)state;
    late_start_t s = {.delay_ms = 300};
    free_port_url(s.url, sizeof(s.url));
    pthread_t t;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 10000;
    kvf_store_t *st = NULL;
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(pthread_create(&t, NULL, late_start_main, &s), 0);
    int rc = kvf_store_open(s.url, &o, &st);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_kvf_ok(s.rc);
    assert_kvf_ok(rc);
    if (took < 250 || took > 5000)
        fail_msg("open took %" PRIu64 " ms for a store started after 300 ms", took);
    assert_kvf_ok(kvf_store_set(st, "k", "v", 1, 0));
    assert_str_value(st, "k", "v");
    kvf_store_close(st);
    kvf_store_server_stop(s.srv);
}

static void open_fails_when_nothing_listens(void **state)
{
    (void)state;
    char url[128];
    free_port_url(url, sizeof(url));
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 400;
    kvf_store_t *st = (kvf_store_t *)1;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_open(url, &o, &st), -KVF_ESTOREDOWN);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_null(st);
    /* The whole line, as docs/operations.md ("Troubleshooting") quotes it. */
    char want[512];
    snprintf(want, sizeof(want),
             "store %s: cannot connect within 400 ms: connect %s: Connection refused", url,
             url + strlen("tcp://"));
    assert_string_equal(kvf_last_error(), want);
    if (took < 400 || took > 1400)
        fail_msg("open with a 400 ms connect timeout failed after %" PRIu64 " ms", took);

    /* connect_timeout_ms 0: a single attempt. */
    o.connect_timeout_ms = 0;
    t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_open(url, &o, &st), -KVF_ESTOREDOWN);
    took = kvf_test_now_ms() - t0;
    if (took > 200)
        fail_msg("open with no connect timeout failed after %" PRIu64 " ms", took);
}

static void open_bad_urls(void **state)
{
    (void)state;
    kvf_store_t *st = NULL;
    uint64_t t0 = kvf_test_now_ms();
    /* The seed's own typo. */
    assert_kvf_err(kvf_store_open("tcp://192.168.1.1000:8000", NULL, &st), -KVF_EINVAL);
    assert_last_error_contains("192.168.1.1000");
    assert_null(st);
    assert_kvf_err(kvf_store_open("tcp://127.0.0.1", NULL, &st), -KVF_EINVAL);
    assert_kvf_err(kvf_store_open("tcp://127.0.0.1:0", NULL, &st), -KVF_EINVAL);
    assert_kvf_err(kvf_store_open("", NULL, &st), -KVF_EINVAL);
    assert_kvf_err(kvf_store_open(NULL, NULL, &st), -KVF_EINVAL);
    int rc = kvf_store_open("http://127.0.0.1:8000", NULL, &st);
    if (rc != -KVF_EINVAL && rc != -KVF_ENOTSUP)
        fail_msg("unknown scheme: %d (%s): %s", rc, kvf_err_name(rc), kvf_last_error());
    assert_last_error_contains("http");
    /* etcd:// and redis:// are served (tests/test_store_conf.c); malformed ones fail at once. */
    assert_kvf_err(kvf_store_open("etcd://127.0.0.1:2379,", NULL, &st), -KVF_EINVAL);
    assert_last_error_contains("empty endpoint");
    assert_kvf_err(kvf_store_open("redis://127.0.0.1:6379/x", NULL, &st), -KVF_EINVAL);
    assert_last_error_contains("database 'x' is not a number");
    assert_null(st);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took > 100)
        fail_msg("malformed URLs took %" PRIu64 " ms to reject", took);
}

/* ---- a store that does not behave ------------------------------------------------------------ */

/* A listener that accepts connections but never answers (the kernel completes the handshake). */
static int silent_listener(char *url, size_t n)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(fd, 16), 0);
    socklen_t alen = sizeof(a);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    snprintf(url, n, "tcp://127.0.0.1:%u", (unsigned)ntohs(a.sin_port));
    return fd;
}

static void open_to_silent_listener_times_out(void **state)
{
    (void)state;
    char url[64];
    int lfd = silent_listener(url, sizeof(url));
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 1000;
    o.request_timeout_ms = 300;
    kvf_store_t *st = NULL;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_open(url, &o, &st), -KVF_ESTOREDOWN);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_null(st);
    assert_last_error_contains("does not answer");
    assert_last_error_contains("timed out after 300 ms");
    if (took < 300 || took > 1500)
        fail_msg("open to a silent listener failed after %" PRIu64 " ms", took);
    close(lfd);
}

/* A fake store: answers the first request (the open's ping) properly, then sends garbage. */
typedef struct {
    int lfd;
    int rc;
} fake_store_t;

static int read_full(int fd, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int read_request(int fd, uint8_t hdr[KVF_STORE_HDR_LEN])
{
    static uint8_t body[4096];
    if (read_full(fd, hdr, KVF_STORE_HDR_LEN) < 0)
        return -1;
    uint32_t blen = kvf__get_le32(hdr + 12);
    if (blen > sizeof(body))
        return -1;
    return read_full(fd, body, blen);
}

static void *fake_store_main(void *arg)
{
    fake_store_t *f = arg;
    uint8_t hdr[KVF_STORE_HDR_LEN];
    f->rc = -1;
    int c = accept(f->lfd, NULL, NULL);
    if (c < 0)
        return NULL;
    if (read_request(c, hdr) == 0) {
        /* The ping: echo its header as an OK answer with an empty body. */
        if (send(c, hdr, sizeof(hdr), MSG_NOSIGNAL) == (ssize_t)sizeof(hdr) &&
            read_request(c, hdr) == 0) {
            hdr[0] ^= 0xff; /* bad magic */
            if (send(c, hdr, sizeof(hdr), MSG_NOSIGNAL) == (ssize_t)sizeof(hdr))
                f->rc = 0;
        }
    }
    /* Wait for the client to drop the connection, then close ours. */
    uint8_t b;
    while (recv(c, &b, 1, 0) > 0)
        ;
    close(c);
    return NULL;
}

static void protocol_error_drops_connection(void **state)
{
    (void)state;
    char url[64];
    fake_store_t f = {.lfd = silent_listener(url, sizeof(url))};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, fake_store_main, &f), 0);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = 3000;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    void *val;
    size_t len;
    assert_kvf_err(kvf_store_get(st, "k", 0, &val, &len), -KVF_EPROTO);
    assert_last_error_contains("protocol error");
    assert_last_error_contains("magic");
    /* The fake store closes only when the client dropped the connection. */
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(f.rc, 0);
    kvf_store_close(st);
    close(f.lfd);
}

/* A store that answers the first @answer requests (the open's confirming ping, then a lease
 * grant), then goes silent without closing: its host vanished, or it hangs. It reads and drops
 * what the client sends, so the kernel acknowledges everything. It records when the client
 * connects again, having given up on the silent connection. */
typedef struct {
    int lfd;
    int answer;
    _Atomic uint64_t reconnect_at; /* 0 until a second connection was accepted */
} mute_store_t;

static void *mute_store_main(void *arg)
{
    mute_store_t *m = arg;
    int c = accept(m->lfd, NULL, NULL);
    if (c < 0)
        return NULL;
    int polled = c, answered = 0;
    uint64_t deadline = kvf_test_now_ms() + 20000;
    while (kvf_test_now_ms() < deadline) {
        struct pollfd p[2] = {{.fd = polled, .events = POLLIN}, {.fd = m->lfd, .events = POLLIN}};
        if (poll(p, 2, 50) <= 0)
            continue;
        if (p[1].revents & POLLIN) {
            int c2 = accept(m->lfd, NULL, NULL);
            atomic_store(&m->reconnect_at, kvf_test_now_ms());
            if (c2 >= 0)
                close(c2);
            break;
        }
        if (!(p[0].revents & (POLLIN | POLLHUP | POLLERR)))
            continue;
        uint8_t hdr[KVF_STORE_HDR_LEN + 8];
        if (read_request(polled, hdr) < 0) {
            polled = -1; /* the client dropped it: only the listener is left to watch */
            continue;
        }
        if (answered++ >= m->answer)
            continue; /* silent from now on */
        /* Echo the header as an OK answer: empty body, or a lease id for a grant. */
        uint32_t blen = hdr[5] == KVF_STORE_OP_LEASE_GRANT ? 8 : 0;
        kvf__put_le32(hdr + 12, blen);
        kvf__put_le64(hdr + KVF_STORE_HDR_LEN, 7);
        if (send(c, hdr, KVF_STORE_HDR_LEN + blen, MSG_NOSIGNAL) < 0)
            break;
    }
    close(c);
    return NULL;
}

/* Start a mute store answering @answer requests on its own thread (*@t) and open a client of
 * it with @request_timeout_ms. */
static kvf_store_t *mute_store_open(mute_store_t *m, int answer, pthread_t *t,
                                    uint32_t request_timeout_ms)
{
    char url[64];
    m->answer = answer;
    m->lfd = silent_listener(url, sizeof(url));
    assert_int_equal(pthread_create(t, NULL, mute_store_main, m), 0);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = request_timeout_ms;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    return st;
}

/* Wait (polling, bounded) for the mute store to see the client connect again; returns when it
 * did, 0 if it did not within @timeout_ms. */
static uint64_t wait_reconnect(mute_store_t *m, unsigned timeout_ms)
{
    uint64_t deadline = kvf_test_now_ms() + timeout_ms;
    uint64_t at;
    while ((at = atomic_load(&m->reconnect_at)) == 0 && kvf_test_now_ms() < deadline)
        nap_ms(5);
    return at;
}

/* A store that stops answering without closing the connection is given up on: a request that
 * times out has the connection probed, and when the probe is not answered within the request
 * timeout either, the client drops the connection and reconnects. */
static void silent_store_after_request_timeout(void **state)
{
    (void)state;
    mute_store_t m = {.answer = 1};
    char url[64];
    m.lfd = silent_listener(url, sizeof(url));
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, mute_store_main, &m), 0);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = 300;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_ping(st), -KVF_ETIMEDOUT);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took < 300 || took > 1500)
        fail_msg("a ping with a 300 ms timeout failed after %" PRIu64 " ms", took);
    uint64_t at = wait_reconnect(&m, EVENT_TIMEOUT_MS);
    if (!at)
        fail_msg("the client did not reconnect within %u ms of a silent store", EVENT_TIMEOUT_MS);
    /* Request timeout, then the probe's: about 600 ms. */
    if (at - t0 > 3000)
        fail_msg("the client reconnected %" PRIu64 " ms after its request", at - t0);
    kvf_store_close(st);
    assert_int_equal(pthread_join(t, NULL), 0);
    close(m.lfd);
}

/* Likewise with no user request at all: an unanswered lease keep-alive gives the store up. */
static void silent_store_after_keepalive(void **state)
{
    (void)state;
    mute_store_t m = {.answer = 2};
    char url[64];
    m.lfd = silent_listener(url, sizeof(url));
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, mute_store_main, &m), 0);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = 300;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    uint64_t lease;
    assert_kvf_ok(kvf_store_lease_grant(st, 600, &lease));
    uint64_t t0 = kvf_test_now_ms();
    uint64_t at = wait_reconnect(&m, EVENT_TIMEOUT_MS);
    if (!at)
        fail_msg("the client did not reconnect within %u ms of a silent store", EVENT_TIMEOUT_MS);
    /* First keep-alive after 200 ms, unanswered for 300 ms: about 500 ms. */
    if (at - t0 > 3000)
        fail_msg("the client reconnected %" PRIu64 " ms after the grant", at - t0);
    kvf_store_close(st);
    assert_int_equal(pthread_join(t, NULL), 0);
    close(m.lfd);
}

/* A lease revoke the store does not answer: -KVF_ETIMEDOUT within request_timeout_ms, saying
 * that the lease expires on the store after its TTL; the client forgets the lease all the same. */
static void lease_revoke_times_out(void **state)
{
    (void)state;
    mute_store_t m = {0};
    pthread_t t;
    /* It answers the open's ping and the grant. */
    kvf_store_t *st = mute_store_open(&m, 2, &t, 300);
    uint64_t lease;
    /* A long TTL: no keep-alive (every ttl/3) goes out during the test. */
    assert_kvf_ok(kvf_store_lease_grant(st, 60000, &lease));
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_lease_revoke(st, lease), -KVF_ETIMEDOUT);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_last_error_contains("timed out after 300 ms");
    assert_last_error_contains("expires there within its TTL of 60000 ms");
    if (took < 300 || took > 1500)
        fail_msg("a revoke with a 300 ms request timeout failed after %" PRIu64 " ms", took);
    assert_kvf_err(kvf_store_lease_revoke(st, lease), -KVF_ENOTFOUND);
    assert_kvf_err(kvf_store_lease_keepalive_stop(st, lease), -KVF_ENOTFOUND);
    if (!wait_reconnect(&m, EVENT_TIMEOUT_MS))
        fail_msg("the client did not give up the silent store within %u ms", EVENT_TIMEOUT_MS);
    kvf_store_close(st);
    assert_int_equal(pthread_join(t, NULL), 0);
    close(m.lfd);
}

typedef struct {
    kvf_store_t *st;
    char key[32];
    int rc;
    void *val;
    uint64_t end_ms;
    char msg[512];
} pending_get_t;

static void *pending_get_main(void *arg)
{
    pending_get_t *p = arg;
    size_t len = 0;
    p->rc = kvf_store_get(p->st, p->key, 20000, &p->val, &len);
    p->end_ms = kvf_test_now_ms();
    snprintf(p->msg, sizeof(p->msg), "%s", kvf_last_error());
    return NULL;
}

/* kvf_store_close() while other threads wait in get-with-wait requests: each fails with
 * -KVF_ECLOSED at once (not after its 20 s wait), and close returns promptly. */
static void close_fails_pending_requests(void **state)
{
    fx_t *fx = *state;
    enum { N = 2 };
    kvf_store_t *st = open_client(fx->url);
    pending_get_t p[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
        p[i] = (pending_get_t){.st = st, .rc = 1};
        snprintf(p[i].key, sizeof(p[i].key), "pending/%d", i);
        assert_int_equal(pthread_create(&t[i], NULL, pending_get_main, &p[i]), 0);
    }
    if (!wait_parked(fx->srv, N, EVENT_TIMEOUT_MS))
        fail_msg("%d get-with-wait requests were not parked within %u ms", N, EVENT_TIMEOUT_MS);
    uint64_t t0 = kvf_test_now_ms();
    kvf_store_close(st);
    uint64_t closed = kvf_test_now_ms();
    for (int i = 0; i < N; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        if (p[i].rc != -KVF_ECLOSED)
            fail_msg("pending get %d returned %d (%s), want KVF_ECLOSED: %s", i, p[i].rc,
                     kvf_err_name(p[i].rc), p[i].msg);
        assert_null(p[i].val);
        if (!strstr(p[i].msg, p[i].key) || !strstr(p[i].msg, "closed"))
            fail_msg("pending get %d: message \"%s\" names neither its key nor the close", i,
                     p[i].msg);
        if (p[i].end_ms - t0 > 1000)
            fail_msg("pending get %d returned %" PRIu64 " ms after close began", i,
                     p[i].end_ms - t0);
    }
    if (closed - t0 > 1000)
        fail_msg("kvf_store_close took %" PRIu64 " ms with requests pending", closed - t0);
    /* The server dropped the waiters with the connection. */
    assert_true(wait_parked(fx->srv, 0, EVENT_TIMEOUT_MS));
}

/* ---- one client, many threads --------------------------------------------------------------- */

#define SHARED_THREADS 8
#define SHARED_OPS 300

typedef struct {
    kvf_store_t *st;
    int id;
    int failures;
    char err[256];
} shared_t;

static void *shared_main(void *arg)
{
    shared_t *s = arg;
    for (int i = 0; i < SHARED_OPS; i++) {
        char key[32], want[64];
        snprintf(key, sizeof(key), "t%d/%d", s->id, i % 16);
        snprintf(want, sizeof(want), "thread %d op %d", s->id, i);
        void *val = NULL;
        size_t len = 0;
        int rc = kvf_store_set(s->st, key, want, strlen(want), 0);
        if (rc == 0)
            rc = kvf_store_get(s->st, key, 0, &val, &len);
        if (rc == 0 && (len != strlen(want) || memcmp(val, want, len) != 0))
            rc = -KVF_EBADVALUE;
        free(val);
        if (rc < 0 && s->failures++ == 0)
            snprintf(s->err, sizeof(s->err), "%s: %s: %s", key, kvf_err_name(rc),
                     kvf_last_error());
    }
    return NULL;
}

/* Requests of many threads share one connection; each gets its own answer. */
static void shared_client_many_threads(void **state)
{
    fx_t *fx = *state;
    shared_t sh[SHARED_THREADS];
    pthread_t t[SHARED_THREADS];
    uint64_t t0 = kvf_test_now_ms();
    for (int i = 0; i < SHARED_THREADS; i++) {
        sh[i] = (shared_t){.st = fx->st, .id = i};
        assert_int_equal(pthread_create(&t[i], NULL, shared_main, &sh[i]), 0);
    }
    for (int i = 0; i < SHARED_THREADS; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
    uint64_t took = kvf_test_now_ms() - t0;
    for (int i = 0; i < SHARED_THREADS; i++)
        if (sh[i].failures)
            fail_msg("thread %d: %d failures, first: %s", i, sh[i].failures, sh[i].err);
    print_message("%d threads x %d set+get on one client: %" PRIu64 " ms\n", SHARED_THREADS,
                  SHARED_OPS, took);

    /* One thread, back to back: the per-request round trip. */
    const int n = 2000;
    t0 = kvf_test_now_ms();
    for (int i = 0; i < n; i++)
        assert_kvf_ok(kvf_store_set(fx->st, "seq", "v", 1, 0));
    took = kvf_test_now_ms() - t0;
    print_message("%d sequential sets: %" PRIu64 " ms (%.0f per second)\n", n, took,
                  took ? n * 1000.0 / (double)took : 0.0);
}

/* ---- many clients ---------------------------------------------------------------------------- */

#define MANY_CLIENTS 1000
#define MANY_THREADS 4

typedef struct {
    const char *url;
    int first;
    int count;
    kvf_store_t **clients;
    int failures;
    char err[256];
} many_slice_t;

static void *many_open_main(void *arg)
{
    many_slice_t *s = arg;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 10000;
    o.request_timeout_ms = 10000;
    for (int i = s->first; i < s->first + s->count; i++) {
        int rc = kvf_store_open(s->url, &o, &s->clients[i]);
        if (rc < 0 && s->failures++ == 0)
            snprintf(s->err, sizeof(s->err), "open %d: %s", i, kvf_last_error());
    }
    return NULL;
}

/* All the per-client threads start together, so that the requests are really in flight at
 * once. A start gate rather than a pthread_barrier: it still opens, and the test fails cleanly,
 * if a thread could not be created. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int waiting;
    bool open;
    atomic_int in_flight;
    atomic_int max_in_flight;
} many_gate_t;

typedef struct {
    many_gate_t *gate;
    kvf_store_t *st;
    int id;
    int rc;
    char err[200];
} many_one_t;

static void *many_one_main(void *arg)
{
    many_one_t *c = arg;
    many_gate_t *g = c->gate;
    pthread_mutex_lock(&g->mu);
    g->waiting++;
    pthread_cond_broadcast(&g->cv);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);

    char key[32], want[48];
    snprintf(key, sizeof(key), "many/%04d", c->id);
    snprintf(want, sizeof(want), "value of client %d", c->id);
    void *val = NULL;
    size_t len = 0;
    int n = atomic_fetch_add(&g->in_flight, 1) + 1;
    int m = atomic_load(&g->max_in_flight);
    while (n > m && !atomic_compare_exchange_weak(&g->max_in_flight, &m, n))
        ;
    int rc = kvf_store_set(c->st, key, want, strlen(want), 0);
    if (rc == 0)
        rc = kvf_store_get(c->st, key, 0, &val, &len);
    atomic_fetch_sub(&g->in_flight, 1);
    if (rc == 0 && (len != strlen(want) || memcmp(val, want, len) != 0))
        snprintf(c->err, sizeof(c->err), "read back %zu bytes \"%.*s\"", len,
                 (int)(len < 64 ? len : 64), (const char *)val), rc = -KVF_EBADVALUE;
    else if (rc < 0)
        snprintf(c->err, sizeof(c->err), "%s: %s", kvf_err_name(rc), kvf_last_error());
    c->rc = rc;
    free(val);
    return NULL;
}

/* Every client used by its own thread (small stacks), all released at once: MANY_CLIENTS
 * set+get pairs in flight together. Returns the number of failures. */
static int run_one_thread_per_client(kvf_store_t **clients, int *max_in_flight)
{
    many_gate_t g = {.waiting = 0, .open = false};
    pthread_mutex_init(&g.mu, NULL);
    pthread_cond_init(&g.cv, NULL);
    atomic_init(&g.in_flight, 0);
    atomic_init(&g.max_in_flight, 0);
    many_one_t *c = calloc(MANY_CLIENTS, sizeof(*c));
    pthread_t *t = calloc(MANY_CLIENTS, sizeof(*t));
    assert_non_null(c);
    assert_non_null(t);
    pthread_attr_t attr;
    assert_int_equal(pthread_attr_init(&attr), 0);
    assert_int_equal(pthread_attr_setstacksize(&attr, 64u << 10), 0);
    int created = 0, failures = 0, create_err = 0;
    for (int i = 0; i < MANY_CLIENTS; i++) {
        c[i] = (many_one_t){.gate = &g, .st = clients[i], .id = i};
        if (!clients[i]) {
            failures++; /* its open failed, already reported */
            continue;
        }
        int e = pthread_create(&t[created], &attr, many_one_main, &c[i]);
        if (e) {
            create_err = e;
            break;
        }
        created++;
    }
    pthread_attr_destroy(&attr);
    pthread_mutex_lock(&g.mu);
    while (g.waiting < created)
        pthread_cond_wait(&g.cv, &g.mu);
    g.open = true;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    for (int i = 0; i < created; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
    for (int i = 0; i < MANY_CLIENTS; i++) {
        if (clients[i] && c[i].rc < 0 && failures++ == 0)
            print_message("client %d: %s\n", i, c[i].err);
    }
    *max_in_flight = atomic_load(&g.max_in_flight);
    free(c);
    free(t);
    pthread_cond_destroy(&g.cv);
    pthread_mutex_destroy(&g.mu);
    if (create_err)
        fail_msg("only %d of %d client threads could be created: %s", created, MANY_CLIENTS,
                 strerror(create_err));
    return failures;
}

static void *many_close_main(void *arg)
{
    many_slice_t *s = arg;
    for (int i = s->first; i < s->first + s->count; i++)
        kvf_store_close(s->clients[i]);
    return NULL;
}

static void run_slices(many_slice_t *sl, void *(*fn)(void *))
{
    pthread_t t[MANY_THREADS];
    for (int i = 0; i < MANY_THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, fn, &sl[i]), 0);
    for (int i = 0; i < MANY_THREADS; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
}

static void thousand_clients(void **state)
{
    fx_t *fx = *state;
    /* Each client holds a socket and an eventfd, the server one socket per client. */
    kvf_test_need_fds("thousand_clients", 3 * MANY_CLIENTS + 200);
    struct rlimit rl;
    /* Two threads per client: its I/O thread and the one that drives it. */
    const rlim_t need_threads = 2 * MANY_CLIENTS + 100;
    assert_int_equal(getrlimit(RLIMIT_NPROC, &rl), 0);
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need_threads)
        kvf_test_skip("thousand_clients needs %lu threads; RLIMIT_NPROC's hard limit is %lu",
                      (unsigned long)need_threads, (unsigned long)rl.rlim_max);
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        assert_int_equal(setrlimit(RLIMIT_NPROC, &rl), 0);
    }

    kvf_store_t **clients = calloc(MANY_CLIENTS, sizeof(*clients));
    assert_non_null(clients);
    many_slice_t sl[MANY_THREADS];
    for (int i = 0; i < MANY_THREADS; i++)
        sl[i] = (many_slice_t){.url = fx->url,
                               .first = i * (MANY_CLIENTS / MANY_THREADS),
                               .count = MANY_CLIENTS / MANY_THREADS,
                               .clients = clients};
    uint64_t t0 = kvf_test_now_ms();
    run_slices(sl, many_open_main);
    uint64_t t_open = kvf_test_now_ms();

    int failures = 0;
    for (int i = 0; i < MANY_THREADS; i++) {
        if (sl[i].failures)
            print_message("slice %d: %d open failures, first: %s\n", i, sl[i].failures,
                          sl[i].err);
    }
    int max_in_flight = 0;
    failures = run_one_thread_per_client(clients, &max_in_flight);
    uint64_t t_io = kvf_test_now_ms();

    /* All of them are connected at once: the store saw every key. */
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    if (failures == 0) {
        assert_kvf_ok(kvf_store_list(fx->st, "many/", &kvs, &n));
        assert_int_equal(n, MANY_CLIENTS);
        for (size_t i = 0; i < n; i++) {
            char key[32], want[48];
            snprintf(key, sizeof(key), "many/%04zu", i);
            snprintf(want, sizeof(want), "value of client %zu", i);
            assert_string_equal(kvs[i].key, key);
            assert_string_equal(kvs[i].val, want);
        }
        kvf_store_kv_free(kvs, n);
    }
    run_slices(sl, many_close_main);
    free(clients);
    print_message("%d clients: open %" PRIu64 " ms, set+get from %d threads %" PRIu64
                  " ms (up to %d in flight), close %" PRIu64 " ms\n",
                  MANY_CLIENTS, t_open - t0, MANY_CLIENTS, t_io - t_open, max_in_flight,
                  kvf_test_now_ms() - t_io);
    assert_int_equal(failures, 0);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(set_get_round_trip, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(bad_arguments_rejected, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(values_empty_large_binary, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(get_wait_blocks_until_set, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(get_wait_times_out, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(get_wait_zero_missing, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(add_counter, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(cas_semantics, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(list_prefix, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(watch_put_delete_unwatch, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(watch_unwatch_from_callback, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(lease_expires_without_keepalive, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(lease_revoke_deletes_keys, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(lease_revoke_while_disconnected, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(lease_regranted_after_store_lost_it, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(close_revokes_leases, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(blocked_get_fails_when_server_stops, fx_setup,
                                    fx_teardown),
    cmocka_unit_test_setup_teardown(reconnect_after_restart_republishes, fx_setup,
                                    fx_teardown),
    cmocka_unit_test(open_waits_for_late_store),
    cmocka_unit_test(open_fails_when_nothing_listens),
    cmocka_unit_test(open_bad_urls),
    cmocka_unit_test(open_to_silent_listener_times_out),
    cmocka_unit_test(protocol_error_drops_connection),
    cmocka_unit_test(silent_store_after_request_timeout),
    cmocka_unit_test(silent_store_after_keepalive),
    cmocka_unit_test(lease_revoke_times_out),
    cmocka_unit_test_setup_teardown(close_fails_pending_requests, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(shared_client_many_threads, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(thousand_clients, fx_setup, fx_teardown),
};

KVF_TEST_MAIN(tests)
