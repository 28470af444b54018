/*
 * Engines over every store backend (KVF_TEST_STORE, see tests/test_stores.h): two engines find
 * each other through the store and transfer over TCP; the store dies and comes back empty while
 * a thread keeps transferring (every write checked), and they re-publish their records, so a
 * Prefill that never met the Decode finds it and writes into its regions, and the transfers
 * between engines that know each other go on without one failure.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "test_stores.h"
#include "test_util.h"

#define N (1u << 20)

typedef struct {
    kvf_test_backend_t b;
    kvf_engine_t *dec, *pre;
    uint8_t *dst, *src;
} fx_t;

static kvf_engine_t *engine(const char *url, kvf_role_t role)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    cfg.lease_ttl_ms = 2000;
    cfg.init_timeout_ms = 15000;
    return kvf_test_engine(url, role, &cfg);
}

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    kvf_test_backend_start(&fx->b, kvf_test_store_kind());
    fx->dec = engine(fx->b.url, KVF_ROLE_DECODE);
    fx->pre = engine(fx->b.url, KVF_ROLE_PREFILL);
    fx->dst = calloc(1, N);
    fx->src = malloc(N);
    assert_non_null(fx->dst);
    assert_non_null(fx->src);
    assert_kvf_ok(kvf_mem_register(fx->dec, fx->dst, N));
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_engine_destroy(fx->pre);
    kvf_engine_destroy(fx->dec);
    kvf_test_backend_stop(&fx->b);
    free(fx->dst);
    free(fx->src);
    free(fx);
    return 0;
}

static void write_and_check(kvf_engine_t *pre, fx_t *fx, uint32_t seed)
{
    kvf_test_pattern(fx->src, N, seed);
    assert_kvf_ok(kvf_write(pre, kvf_engine_session_id(fx->dec), fx->src, (uintptr_t)fx->dst, N));
    assert_memory_equal(fx->dst, fx->src, N);
}

static void engines_find_each_other_and_transfer(void **state)
{
    fx_t *fx = *state;
    write_and_check(fx->pre, fx, 1);
    /* The records are where docs/architecture.md says, readable with the store's own tools. */
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(fx->b.url, NULL, &st));
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_list(st, "kvferry/v1/default/sessions/", &kvs, &n));
    assert_int_equal(n, 2);
    kvf_store_kv_free(kvs, n);
    char key[256];
    snprintf(key, sizeof(key), "kvferry/v1/default/regions/%s", kvf_engine_session_id(fx->dec));
    void *v = NULL;
    size_t len = 0;
    assert_kvf_ok(kvf_store_get(st, key, 0, &v, &len));
    free(v);
    kvf_store_close(st);
    /* A Decode that goes away is noticed through the store: its records vanish. */
    kvf_engine_t *late = engine(fx->b.url, KVF_ROLE_DECODE);
    char sid[128];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(late));
    kvf_engine_destroy(late);
    assert_kvf_ok(kvf_store_open(fx->b.url, NULL, &st));
    snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", sid);
    assert_kvf_err(kvf_store_get(st, key, 0, &v, &len), -KVF_ENOTFOUND);
    kvf_store_close(st);
}

/* Transfers that run through a store outage: a thread writes into the Decode's second region
 * over and over, each write checked byte for byte, until told to stop. */
typedef struct {
    fx_t *fx;
    uint8_t *dst, *src;
    atomic_uint done;
    atomic_bool stop;
    int failed_rc;
    unsigned failed_at;
} mover_t;

static void *mover_main(void *arg)
{
    mover_t *m = arg;
    const char *peer = kvf_engine_session_id(m->fx->dec);
    for (unsigned i = 0; !atomic_load(&m->stop) && i < 100000; i++) {
        kvf_test_pattern(m->src, N, 1000 + i);
        int rc = kvf_write(m->fx->pre, peer, m->src, (uintptr_t)m->dst, N);
        if (rc < 0 || memcmp(m->dst, m->src, N) != 0) {
            m->failed_rc = rc < 0 ? rc : 1;
            m->failed_at = i;
            return NULL;
        }
        atomic_fetch_add(&m->done, 1);
    }
    return NULL;
}

/* Wait (bounded) until the mover has finished @more writes after @from; false if it stopped. */
static bool mover_advance(mover_t *m, unsigned from, unsigned more)
{
    uint64_t t0 = kvf_test_now_ms();
    while (atomic_load(&m->done) < from + more) {
        if (m->failed_rc || kvf_test_now_ms() - t0 > 20000)
            return false;
        sched_yield();
    }
    return true;
}

static void store_restart_engines_republish(void **state)
{
    fx_t *fx = *state;
    mover_t m = {.fx = fx, .dst = calloc(1, N), .src = malloc(N)};
    assert_non_null(m.dst);
    assert_non_null(m.src);
    assert_kvf_ok(kvf_mem_register(fx->dec, m.dst, N));
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, mover_main, &m), 0);

    write_and_check(fx->pre, fx, 2);
    assert_true(mover_advance(&m, 0, 3));
    kvf_test_backend_kill(&fx->b, true);
    /* With the store down (its data gone), peers that know each other go on. */
    unsigned at_kill = atomic_load(&m.done);
    write_and_check(fx->pre, fx, 3);
    bool during = mover_advance(&m, at_kill, 5);
    kvf_test_backend_restart(&fx->b);
    /* A Prefill that never met the Decode finds it: its records were published again. */
    kvf_engine_t *fresh = engine(fx->b.url, KVF_ROLE_PREFILL);
    write_and_check(fresh, fx, 4);
    write_and_check(fx->pre, fx, 5);
    unsigned at_restart = atomic_load(&m.done);
    bool after = mover_advance(&m, at_restart, 3);
    atomic_store(&m.stop, true);
    pthread_join(t, NULL);
    if (m.failed_rc)
        fail_msg("write %u of the transfers through the outage failed: %d %s", m.failed_at,
                 m.failed_rc, kvf_last_error());
    assert_true(during);
    assert_true(after);
    /* Both sessions of the fixture and the new one are in the store again. */
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(fx->b.url, NULL, &st));
    uint64_t t0 = kvf_test_now_ms();
    size_t n = 0;
    for (;;) {
        kvf_store_kv_t *kvs = NULL;
        assert_kvf_ok(kvf_store_list(st, "kvferry/v1/default/sessions/", &kvs, &n));
        kvf_store_kv_free(kvs, n);
        if (n == 3 || kvf_test_now_ms() - t0 > 10000)
            break;
        void *v = NULL;
        size_t len = 0;
        kvf_store_get(st, "test/never", 100, &v, &len); /* a bounded pause the store serves */
    }
    assert_int_equal(n, 3);
    kvf_store_close(st);
    kvf_engine_destroy(fresh);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, m.dst));
    free(m.dst);
    free(m.src);
}

/* config.key_prefix (and KVFERRY_KEY_PREFIX) moves every record; engines of another prefix are
 * not seen. */
static void key_prefix_moves_records(void **state)
{
    fx_t *fx = *state;
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    cfg.init_timeout_ms = 300;
    cfg.key_prefix = "mooncake/";
    kvf_engine_t *other = kvf_test_engine(fx->b.url, KVF_ROLE_PREFILL, &cfg);
    kvf_test_pattern(fx->src, N, 9);
    assert_kvf_err(kvf_write(other, kvf_engine_session_id(fx->dec), fx->src, (uintptr_t)fx->dst, N),
                   -KVF_ENOTFOUND);
    assert_last_error_contains("did not appear");
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(fx->b.url, NULL, &st));
    char key[256];
    snprintf(key, sizeof(key), "mooncake/default/sessions/%s", kvf_engine_session_id(other));
    void *v = NULL;
    size_t len = 0;
    assert_kvf_ok(kvf_store_get(st, key, 0, &v, &len));
    free(v);
    kvf_engine_destroy(other);
    cfg.key_prefix = "bad prefix";
    kvf_engine_t *e = NULL;
    assert_kvf_err(kvf_engine_create(fx->b.url, "127.0.0.1:0", KVF_ROLE_PREFILL, 0, &cfg, &e),
                   -KVF_EINVAL);
    assert_last_error_contains("config.key_prefix \"bad prefix\"");
    kvf_store_close(st);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(engines_find_each_other_and_transfer, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(store_restart_engines_republish, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(key_prefix_moves_records, fx_setup, fx_teardown),
};

KVF_TEST_MAIN(tests)
