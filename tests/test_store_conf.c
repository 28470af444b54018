/*
 * The config-store conformance suite: the same cases against every backend (built-in, etcd,
 * redis; KVF_TEST_STORE, see tests/test_stores.h), each on a store of its own started for the
 * case. They check what a user of kvf_store_* relies on whatever the store: the bytes read back,
 * the error codes and messages, get-with-wait, prefix lists in byte order, watches, leases that
 * expire, are revoked, and survive the store losing them (a restart without data).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "test_stores.h"
#include "test_util.h"

#define EVENT_TIMEOUT_MS 10000u

typedef struct {
    kvf_test_backend_t b;
    kvf_store_t *st;
} fx_t;

static kvf_store_t *open_client(const char *url)
{
    kvf_store_t *st = NULL;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 5000;
    o.request_timeout_ms = 3000;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    return st;
}

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    kvf_test_backend_start(&fx->b, kvf_test_store_kind());
    fx->st = open_client(fx->b.url);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_store_close(fx->st);
    kvf_test_backend_stop(&fx->b);
    free(fx);
    return 0;
}

static void assert_value(kvf_store_t *st, const char *key, const void *want, size_t len)
{
    void *val = NULL;
    size_t got = 0;
    assert_kvf_ok(kvf_store_get(st, key, 0, &val, &got));
    if (got != len)
        fail_msg("key \"%s\": got %zu bytes, want %zu", key, got, len);
    assert_memory_equal(val, want, len);
    assert_int_equal(((char *)val)[len], '\0');
    free(val);
}

static void assert_absent(kvf_store_t *st, const char *key)
{
    void *val = (void *)1;
    size_t len = 1;
    assert_kvf_err(kvf_store_get(st, key, 0, &val, &len), -KVF_ENOTFOUND);
    assert_null(val);
}

/* Poll (bounded) until @key is absent; returns the ms it took, or fails. */
static uint64_t wait_absent(kvf_store_t *st, const char *key, unsigned timeout_ms)
{
    uint64_t t0 = kvf_test_now_ms();
    for (;;) {
        void *val = NULL;
        size_t len = 0;
        int rc = kvf_store_get(st, key, 0, &val, &len);
        free(val);
        if (rc == -KVF_ENOTFOUND)
            return kvf_test_now_ms() - t0;
        if (kvf_test_now_ms() - t0 > timeout_ms)
            fail_msg("%s still present after %u ms (rc %d)", key, timeout_ms, rc);
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* ---- watch recorder -------------------------------------------------------------------------- */

#define REC_MAX 64
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n;
    int type[REC_MAX];
    char key[REC_MAX][64];
    char val[REC_MAX][64];
    kvf_store_t *st;   /* for the unwatch-from-callback case */
    uint64_t self_id;
} rec_t;

static void rec_init(rec_t *r)
{
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->mu, NULL);
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cv, &a);
    pthread_condattr_destroy(&a);
}

static void rec_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    rec_t *r = arg;
    pthread_mutex_lock(&r->mu);
    if (r->n < REC_MAX) {
        r->type[r->n] = (int)type;
        snprintf(r->key[r->n], 64, "%s", kv->key);
        snprintf(r->val[r->n], 64, "%.*s", kv->val ? (int)kv->val_len : 0,
                 kv->val ? (const char *)kv->val : "");
    }
    r->n++;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static int rec_wait(rec_t *r, int n, unsigned timeout_ms)
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

static void assert_event(rec_t *r, int i, int type, const char *key, const char *val)
{
    pthread_mutex_lock(&r->mu);
    int t = r->type[i];
    char k[64], v[64];
    memcpy(k, r->key[i], 64);
    memcpy(v, r->val[i], 64);
    pthread_mutex_unlock(&r->mu);
    if (t != type || strcmp(k, key) != 0 || strcmp(v, val) != 0)
        fail_msg("event %d: got %d \"%s\"=\"%s\", want %d \"%s\"=\"%s\"", i, t, k, v, type, key,
                 val);
}

/* ---- cases ----------------------------------------------------------------------------------- */

static void set_get_binary_empty_overwrite(void **state)
{
    fx_t *fx = *state;
    const uint8_t bin[] = {0, 1, 2, 0xff, 0xfe, 0, '\n', 0x80};
    assert_kvf_ok(kvf_store_set(fx->st, "k/bin", bin, sizeof(bin), 0));
    assert_value(fx->st, "k/bin", bin, sizeof(bin));
    assert_kvf_ok(kvf_store_set(fx->st, "k/empty", "", 0, 0));
    assert_value(fx->st, "k/empty", "", 0);
    assert_kvf_ok(kvf_store_set(fx->st, "k/bin", "second", 6, 0));
    assert_value(fx->st, "k/bin", "second", 6);
    size_t big = 256 * 1024;
    uint8_t *p = malloc(big);
    kvf_test_pattern(p, big, 7);
    assert_kvf_ok(kvf_store_set(fx->st, "k/big", p, big, 0));
    assert_value(fx->st, "k/big", p, big);
    free(p);
    assert_kvf_ok(kvf_store_del(fx->st, "k/bin"));
    assert_absent(fx->st, "k/bin");
    assert_kvf_err(kvf_store_del(fx->st, "k/bin"), -KVF_ENOTFOUND);
    assert_last_error_contains("del \"k/bin\": not found");
    assert_last_error_contains(fx->b.url);
    assert_string_equal(kvf_store_url(fx->st), fx->b.url);
    assert_kvf_ok(kvf_store_ping(fx->st));
}

static void bad_arguments_same_messages(void **state)
{
    fx_t *fx = *state;
    void *v = NULL;
    size_t n = 0;
    assert_kvf_err(kvf_store_set(fx->st, "", "x", 1, 0), -KVF_EINVAL);
    assert_last_error_contains("set: key is empty");
    char longkey[KVF_STORE_MAX_KEY_LEN + 2];
    memset(longkey, 'a', sizeof(longkey) - 1);
    longkey[sizeof(longkey) - 1] = '\0';
    assert_kvf_err(kvf_store_set(fx->st, longkey, "x", 1, 0), -KVF_ETOOBIG);
    assert_last_error_contains("exceeds the");
    assert_kvf_err(kvf_store_get(fx->st, "k", 3600u * 1000u + 1, &v, &n), -KVF_EINVAL);
    assert_last_error_contains("exceeds the");
    assert_kvf_err(kvf_store_set(fx->st, "k", NULL, 3, 0), -KVF_EINVAL);
    assert_last_error_contains("value is NULL with length 3");
    assert_kvf_err(kvf_store_set(fx->st, "k", "x", 1, 4242), -KVF_ENOTFOUND);
    assert_last_error_contains("lease 4242 is not held by this client");
    uint64_t l;
    assert_kvf_err(kvf_store_lease_grant(fx->st, 0, &l), -KVF_EINVAL);
    assert_last_error_contains("ttl must be 1..");
    assert_kvf_err(kvf_store_lease_revoke(fx->st, 999), -KVF_ENOTFOUND);
    assert_kvf_err(kvf_store_unwatch(fx->st, 999), -KVF_ENOTFOUND);
    assert_kvf_err(kvf_store_set(NULL, "k", "x", 1, 0), -KVF_EINVAL);
    assert_last_error_contains("the client handle is NULL");
}

typedef struct {
    kvf_store_t *st;
    unsigned delay_ms;
} late_set_t;

static void *late_set(void *arg)
{
    late_set_t *a = arg;
    struct timespec ts = {0, (long)a->delay_ms * 1000000L};
    nanosleep(&ts, NULL);
    kvf_store_set(a->st, "w/key", "arrived", 7, 0);
    return NULL;
}

static void get_wait_sees_a_later_set(void **state)
{
    fx_t *fx = *state;
    kvf_store_t *other = open_client(fx->b.url);
    late_set_t a = {other, 300};
    pthread_t th;
    pthread_create(&th, NULL, late_set, &a);
    void *v = NULL;
    size_t n = 0;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_store_get(fx->st, "w/key", 8000, &v, &n));
    uint64_t took = kvf_test_now_ms() - t0;
    pthread_join(th, NULL);
    assert_int_equal(n, 7);
    assert_memory_equal(v, "arrived", 7);
    free(v);
    if (took > 5000)
        fail_msg("get-with-wait returned %" PRIu64 " ms after the call, the set came at 300", took);
    /* Absent and not set: times out after about the wait, with its message. */
    t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_get(fx->st, "w/never", 400, &v, &n), -KVF_ETIMEDOUT);
    took = kvf_test_now_ms() - t0;
    assert_last_error_contains("still absent after waiting 400 ms");
    assert_true(took >= 390 && took < 4000);
    assert_kvf_err(kvf_store_get(fx->st, "w/never", 0, &v, &n), -KVF_ENOTFOUND);
    kvf_store_close(other);
}

static void add_counter_and_errors(void **state)
{
    fx_t *fx = *state;
    int64_t v = 0;
    assert_kvf_ok(kvf_store_add(fx->st, "ctr", 5, &v));
    assert_int_equal(v, 5);
    assert_kvf_ok(kvf_store_add(fx->st, "ctr", -7, &v));
    assert_int_equal(v, -2);
    assert_value(fx->st, "ctr", "-2", 2);
    assert_kvf_ok(kvf_store_set(fx->st, "big", "9223372036854775807", 19, 0));
    assert_kvf_err(kvf_store_add(fx->st, "big", 1, &v), -KVF_ERANGE);
    assert_last_error_contains("\"big\"");
    assert_value(fx->st, "big", "9223372036854775807", 19);
    assert_kvf_ok(kvf_store_set(fx->st, "text", "12x", 3, 0));
    assert_kvf_err(kvf_store_add(fx->st, "text", 1, &v), -KVF_EBADVALUE);
    assert_last_error_contains("\"text\"");
}

typedef struct {
    kvf_store_t *st;
    int n;
} adder_t;

static void *adder(void *arg)
{
    adder_t *a = arg;
    for (int i = 0; i < a->n; i++)
        assert_kvf_ok(kvf_store_add(a->st, "race", 1, NULL));
    return NULL;
}

static void add_is_atomic_across_clients(void **state)
{
    fx_t *fx = *state;
    kvf_store_t *other = open_client(fx->b.url);
    adder_t a = {fx->st, 50}, b = {other, 50};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, adder, &a);
    pthread_create(&tb, NULL, adder, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    assert_value(fx->st, "race", "100", 3);
    kvf_store_close(other);
}

static void cas_semantics(void **state)
{
    fx_t *fx = *state;
    assert_kvf_ok(kvf_store_cas(fx->st, "c", NULL, 0, "v1", 2, 0));
    assert_value(fx->st, "c", "v1", 2);
    assert_kvf_err(kvf_store_cas(fx->st, "c", NULL, 0, "v2", 2, 0), -KVF_ECASMISMATCH);
    assert_last_error_contains("\"c\"");
    assert_kvf_err(kvf_store_cas(fx->st, "c", "v9", 2, "v2", 2, 0), -KVF_ECASMISMATCH);
    assert_kvf_err(kvf_store_cas(fx->st, "c", "v", 1, "v2", 2, 0), -KVF_ECASMISMATCH);
    assert_kvf_err(kvf_store_cas(fx->st, "absent", "v1", 2, "v2", 2, 0), -KVF_ECASMISMATCH);
    assert_absent(fx->st, "absent");
    assert_kvf_ok(kvf_store_cas(fx->st, "c", "v1", 2, "v2", 2, 0));
    assert_value(fx->st, "c", "v2", 2);
}

static void list_prefix_in_byte_order(void **state)
{
    fx_t *fx = *state;
    const char *keys[] = {"p/b", "p/a", "p/c/d", "q/x", "p", "p/\xff"};
    for (size_t i = 0; i < 6; i++)
        assert_kvf_ok(kvf_store_set(fx->st, keys[i], keys[i], strlen(keys[i]), 0));
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_list(fx->st, "p/", &kvs, &n));
    assert_int_equal(n, 4);
    assert_string_equal(kvs[0].key, "p/a");
    assert_string_equal(kvs[1].key, "p/b");
    assert_string_equal(kvs[2].key, "p/c/d");
    assert_string_equal(kvs[3].key, "p/\xff");
    assert_int_equal(kvs[2].val_len, 5);
    assert_memory_equal(kvs[2].val, "p/c/d", 5);
    kvf_store_kv_free(kvs, n);
    assert_kvf_ok(kvf_store_list(fx->st, "", &kvs, &n));
    assert_int_equal(n, 6);
    assert_string_equal(kvs[0].key, "p");
    kvf_store_kv_free(kvs, n);
    assert_kvf_ok(kvf_store_list(fx->st, "none/", &kvs, &n));
    assert_int_equal(n, 0);
    kvf_store_kv_free(kvs, n);
}

static void list_of_many_keys_is_complete(void **state)
{
    fx_t *fx = *state;
    /* More than one page of every backend that pages (etcd: 1000 keys a request). */
    enum { N = 2500 };
    char key[32];
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "m/%05d", i);
        assert_kvf_ok(kvf_store_set(fx->st, key, key, strlen(key), 0));
    }
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_list(fx->st, "m/", &kvs, &n));
    assert_int_equal(n, N);
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "m/%05d", i);
        assert_string_equal(kvs[i].key, key);
        assert_memory_equal(kvs[i].val, key, strlen(key));
    }
    kvf_store_kv_free(kvs, n);
}

/* kvf_store_list_page() on every backend: pages of @max in byte order, each starting after the
 * last key of the one before, `more` set on all but the last, keys only when asked. */
static void list_page_walks_in_order(void **state)
{
    fx_t *fx = *state;
    enum { N = 25 };
    char key[32], after[32] = "";
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "lp/%03d", i);
        assert_kvf_ok(kvf_store_set(fx->st, key, key, strlen(key), 0));
    }
    assert_kvf_ok(kvf_store_set(fx->st, "lq/other", "x", 1, 0));
    int seen = 0, pages = 0, more = 1;
    while (more) {
        kvf_store_kv_t *kvs = NULL;
        size_t n = 0;
        unsigned flags = pages == 1 ? KVF_STORE_LIST_KEYS_ONLY : 0;
        assert_kvf_ok(kvf_store_list_page(fx->st, "lp/", after, 10, flags, &kvs, &n, &more));
        assert_true(pages < 3);
        assert_int_equal(n, pages < 2 ? 10 : 5);
        assert_int_equal(more, pages < 2);
        for (size_t i = 0; i < n; i++, seen++) {
            snprintf(key, sizeof(key), "lp/%03d", seen);
            assert_string_equal(kvs[i].key, key);
            if (flags)
                assert_int_equal(kvs[i].val_len, 0);
            else
                assert_memory_equal(kvs[i].val, key, strlen(key));
        }
        snprintf(after, sizeof(after), "%s", kvs[n - 1].key);
        kvf_store_kv_free(kvs, n);
        pages++;
    }
    assert_int_equal(seen, N);
    kvf_store_kv_t *kvs = NULL;
    size_t n = 1;
    assert_kvf_ok(kvf_store_list_page(fx->st, "lp/", "lp/024", 0, 0, &kvs, &n, &more));
    assert_int_equal(n, 0);
    assert_int_equal(more, 0);
    kvf_store_kv_free(kvs, n);
    assert_kvf_err(kvf_store_list_page(fx->st, "lp/", NULL, 10, 0x80, &kvs, &n, NULL),
                   -KVF_EINVAL);
    assert_last_error_contains("unknown flags 0x80");
}

static void watch_put_delete_unwatch(void **state)
{
    fx_t *fx = *state;
    rec_t r;
    rec_init(&r);
    uint64_t id = 0;
    assert_kvf_ok(kvf_store_watch(fx->st, "wp/", rec_cb, &r, &id));
    kvf_store_t *other = open_client(fx->b.url);
    assert_kvf_ok(kvf_store_set(other, "wp/a", "1", 1, 0));
    assert_kvf_ok(kvf_store_set(other, "other", "x", 1, 0));
    assert_kvf_ok(kvf_store_set(other, "wp/a", "2", 1, 0));
    assert_kvf_ok(kvf_store_del(other, "wp/a"));
    assert_int_equal(rec_wait(&r, 3, EVENT_TIMEOUT_MS), 3);
    assert_event(&r, 0, KVF_STORE_EVENT_PUT, "wp/a", "1");
    assert_event(&r, 1, KVF_STORE_EVENT_PUT, "wp/a", "2");
    assert_event(&r, 2, KVF_STORE_EVENT_DELETE, "wp/a", "");
    assert_kvf_ok(kvf_store_unwatch(fx->st, id));
    assert_kvf_ok(kvf_store_set(other, "wp/b", "3", 1, 0));
    /* A marker after the unwatched put, seen by a second watch, bounds the wait. */
    rec_t r2;
    rec_init(&r2);
    uint64_t id2 = 0;
    assert_kvf_ok(kvf_store_watch(fx->st, "wp/", rec_cb, &r2, &id2));
    assert_kvf_ok(kvf_store_set(other, "wp/marker", "m", 1, 0));
    assert_int_equal(rec_wait(&r2, 1, EVENT_TIMEOUT_MS), 1);
    assert_event(&r2, 0, KVF_STORE_EVENT_PUT, "wp/marker", "m");
    assert_int_equal(rec_wait(&r, 4, 0), 3);
    assert_kvf_ok(kvf_store_unwatch(fx->st, id2));
    kvf_store_close(other);
}

static void unwatch_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    rec_t *r = arg;
    /* Recorded after the unwatch, so the case's wait also waits for the unwatch. */
    assert_kvf_ok(kvf_store_unwatch(r->st, r->self_id));
    rec_cb(arg, type, kv);
}

static void watch_unwatch_from_callback(void **state)
{
    fx_t *fx = *state;
    rec_t r;
    rec_init(&r);
    r.st = fx->st;
    pthread_mutex_lock(&r.mu);
    assert_kvf_ok(kvf_store_watch(fx->st, "u/", unwatch_cb, &r, &r.self_id));
    pthread_mutex_unlock(&r.mu);
    assert_kvf_ok(kvf_store_set(fx->st, "u/1", "a", 1, 0));
    assert_int_equal(rec_wait(&r, 1, EVENT_TIMEOUT_MS), 1);
    assert_kvf_ok(kvf_store_set(fx->st, "u/2", "b", 1, 0));
    assert_kvf_err(kvf_store_unwatch(fx->st, r.self_id), -KVF_ENOTFOUND);
    /* No event after the unwatch: a second watch sees a marker set after u/2, the first not. */
    rec_t r2;
    rec_init(&r2);
    uint64_t id2;
    assert_kvf_ok(kvf_store_watch(fx->st, "u/", rec_cb, &r2, &id2));
    assert_kvf_ok(kvf_store_set(fx->st, "u/marker", "m", 1, 0));
    assert_int_equal(rec_wait(&r2, 1, EVENT_TIMEOUT_MS), 1);
    assert_int_equal(rec_wait(&r, 2, 0), 1);
    assert_event(&r, 0, KVF_STORE_EVENT_PUT, "u/1", "a");
}

static void lease_expires_without_keepalive(void **state)
{
    fx_t *fx = *state;
    uint64_t l = 0, id;
    rec_t r;
    rec_init(&r);
    assert_kvf_ok(kvf_store_watch(fx->st, "ls/", rec_cb, &r, &id));
    assert_kvf_ok(kvf_store_lease_grant(fx->st, 1000, &l));
    assert_kvf_ok(kvf_store_set(fx->st, "ls/a", "x", 1, l));
    /* Kept alive: still there after three TTLs. */
    struct timespec ts = {3, 0};
    nanosleep(&ts, NULL);
    assert_value(fx->st, "ls/a", "x", 1);
    assert_kvf_ok(kvf_store_lease_keepalive_stop(fx->st, l));
    /* etcd rounds TTLs up to whole seconds and checks expiry every 500 ms. */
    wait_absent(fx->st, "ls/a", 6000);
    /* Watchers see the expiry as a delete (Redis: a keyspace notification), and the keep-alives
     * before it as nothing. */
    assert_int_equal(rec_wait(&r, 2, EVENT_TIMEOUT_MS), 2);
    assert_event(&r, 0, KVF_STORE_EVENT_PUT, "ls/a", "x");
    assert_event(&r, 1, KVF_STORE_EVENT_DELETE, "ls/a", "");
    assert_int_equal(rec_wait(&r, 3, 0), 2);
    assert_kvf_ok(kvf_store_unwatch(fx->st, id));
}

static void lease_revoke_deletes_keys(void **state)
{
    fx_t *fx = *state;
    rec_t r;
    rec_init(&r);
    uint64_t id, l;
    assert_kvf_ok(kvf_store_watch(fx->st, "lr/", rec_cb, &r, &id));
    assert_kvf_ok(kvf_store_lease_grant(fx->st, 5000, &l));
    assert_kvf_ok(kvf_store_set(fx->st, "lr/a", "x", 1, l));
    assert_kvf_ok(kvf_store_cas(fx->st, "lr/b", NULL, 0, "y", 1, l));
    assert_kvf_ok(kvf_store_lease_revoke(fx->st, l));
    assert_absent(fx->st, "lr/a");
    assert_absent(fx->st, "lr/b");
    assert_int_equal(rec_wait(&r, 4, EVENT_TIMEOUT_MS), 4);
    assert_event(&r, 0, KVF_STORE_EVENT_PUT, "lr/a", "x");
    assert_event(&r, 1, KVF_STORE_EVENT_PUT, "lr/b", "y");
    assert_event(&r, 2, KVF_STORE_EVENT_DELETE, r.key[2], "");
    assert_event(&r, 3, KVF_STORE_EVENT_DELETE, r.key[3], "");
    assert_true(strcmp(r.key[2], r.key[3]) != 0);
    assert_kvf_err(kvf_store_set(fx->st, "lr/c", "z", 1, l), -KVF_ENOTFOUND);
    assert_kvf_ok(kvf_store_unwatch(fx->st, id));
}

static void close_revokes_leases(void **state)
{
    fx_t *fx = *state;
    kvf_store_t *other = open_client(fx->b.url);
    uint64_t l;
    assert_kvf_ok(kvf_store_lease_grant(other, 30000, &l));
    assert_kvf_ok(kvf_store_set(other, "cl/a", "x", 1, l));
    assert_kvf_ok(kvf_store_set(other, "cl/keep", "y", 1, 0));
    kvf_store_close(other);
    wait_absent(fx->st, "cl/a", 3000);
    assert_value(fx->st, "cl/keep", "y", 1);
}

/* The store dies and comes back empty: leases are re-granted and their keys re-published, plain
 * keys are gone, watches resume and see the re-published keys. */
static void restart_without_data_republishes(void **state)
{
    fx_t *fx = *state;
    uint64_t l, id;
    rec_t r;
    rec_init(&r);
    assert_kvf_ok(kvf_store_lease_grant(fx->st, 1500, &l));
    assert_kvf_ok(kvf_store_set(fx->st, "rs/sess", "alive", 5, l));
    assert_kvf_ok(kvf_store_watch(fx->st, "rs/", rec_cb, &r, &id));
    kvf_test_backend_kill(&fx->b, true);
    kvf_test_backend_restart(&fx->b);
    kvf_store_t *other = open_client(fx->b.url);
    void *v = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_get(other, "rs/sess", 10000, &v, &n));
    assert_int_equal(n, 5);
    assert_memory_equal(v, "alive", 5);
    free(v);
    /* The watch works again: a put after the restart reaches it. */
    uint64_t t0 = kvf_test_now_ms();
    for (;;) {
        assert_kvf_ok(kvf_store_set(other, "rs/after", "1", 1, 0));
        pthread_mutex_lock(&r.mu);
        bool seen = false;
        for (int i = 0; i < r.n && i < REC_MAX; i++)
            seen |= strcmp(r.key[i], "rs/after") == 0;
        pthread_mutex_unlock(&r.mu);
        if (seen)
            break;
        if (kvf_test_now_ms() - t0 > EVENT_TIMEOUT_MS)
            fail_msg("the watch saw no event after the restart");
        rec_wait(&r, r.n + 1, 200);
    }
    /* And the lease still works: the key vanishes with it. */
    assert_kvf_ok(kvf_store_lease_revoke(fx->st, l));
    wait_absent(other, "rs/sess", 3000);
    assert_kvf_ok(kvf_store_unwatch(fx->st, id));
    kvf_store_close(other);
}

static void open_fails_when_nothing_listens(void **state)
{
    (void)state;
    const char *kind = kvf_test_store_kind();
    /* A port that was free a moment ago: nothing listens there. */
    kvf_store_server_t *srv = kvf_test_store_start();
    const char *su = kvf_store_server_url(srv);
    char url[64];
    snprintf(url, sizeof(url), "%s://127.0.0.1:%s", strcmp(kind, "builtin") ? kind : "tcp",
             strrchr(su, ':') + 1);
    kvf_store_server_stop(srv);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 300;
    kvf_store_t *st = NULL;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_open(url, &o, &st), -KVF_ESTOREDOWN);
    assert_true(kvf_test_now_ms() - t0 < 3000);
    assert_null(st);
    assert_last_error_contains(url);
    assert_last_error_contains("cannot connect within 300 ms");
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(set_get_binary_empty_overwrite, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(bad_arguments_same_messages, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(get_wait_sees_a_later_set, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(add_counter_and_errors, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(add_is_atomic_across_clients, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(cas_semantics, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(list_prefix_in_byte_order, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(list_of_many_keys_is_complete, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(list_page_walks_in_order, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(watch_put_delete_unwatch, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(watch_unwatch_from_callback, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(lease_expires_without_keepalive, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(lease_revoke_deletes_keys, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(close_revokes_leases, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(restart_without_data_republishes, fx_setup, fx_teardown),
    cmocka_unit_test(open_fails_when_nothing_listens),
};

KVF_TEST_MAIN(tests)
