/*
 * Namespaces (kvf_config_t.ns): engines of one store in different namespaces cannot see or
 * reach each other — a transfer fails as one to an unknown session does, kvf_peer_wait() and
 * kvf_peer_events() do not report them — while the same pair in one namespace works. Their
 * records are kept under kvferry/v1/<ns>/. Run on every transport (tests/CMakeLists.txt).
 */
#include "test_util.h"

#include <stdlib.h>
#include <string.h>

/* How long a transfer waits for a peer to appear; short, since the test waits it out. */
#define NS_INIT_TIMEOUT_MS 300u
#define NS_BYTES           (256u << 10)

static int store_setup(void **state)
{
    *state = kvf_test_store_start();
    return 0;
}

static int store_teardown(void **state)
{
    kvf_store_server_stop(*state);
    return 0;
}

static kvf_config_t ns_config(const char *ns)
{
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = NS_INIT_TIMEOUT_MS;
    c.op_timeout_ms = 10000;
    c.ns = ns;
    return c;
}

static void assert_zero_bytes(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            fail_msg("byte %zu is 0x%02x, want 0: a transfer reached the memory", i, p[i]);
}

/* A transfer to @peer from @e fails with -KVF_ENOTFOUND after waiting init_timeout_ms for it,
 * naming it, and touches nothing. */
static void assert_unknown_session(kvf_engine_t *e, const char *url, const char *peer,
                                   const uint8_t *src, uint8_t *dst, size_t n)
{
    /* The whole message (after the operation's prefix), as docs/operations.md
     * ("Troubleshooting") quotes it. */
    char want[512];
    snprintf(want, sizeof(want),
             "peer session %s did not appear in the store %s within 300 ms (is it running, with "
             "the same --store-url?)",
             peer, url);
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_write(e, peer, src, (uintptr_t)dst, n), -KVF_ENOTFOUND);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_last_error_contains(want);
    if (took < NS_INIT_TIMEOUT_MS || took > NS_INIT_TIMEOUT_MS + 1500)
        fail_msg("a write to %s failed after %llu ms, want %u..%u", peer,
                 (unsigned long long)took, NS_INIT_TIMEOUT_MS, NS_INIT_TIMEOUT_MS + 1500);
    assert_zero_bytes(dst, n);
}

/* A Decode in namespace "alpha" is written to and read from by a Prefill of "alpha"; a Prefill of
 * "beta" on the same store fails exactly as it does for a session that does not exist. */
static void other_namespace_unreachable(void **state)
{
    const char *url = kvf_store_server_url(*state);
    kvf_config_t ca = ns_config("alpha"), cb = ns_config("beta");
    kvf_engine_t *dec = kvf_test_engine(url, KVF_ROLE_DECODE, &ca);
    kvf_engine_t *pre_a = kvf_test_engine(url, KVF_ROLE_PREFILL, &ca);
    kvf_engine_t *pre_b = kvf_test_engine(url, KVF_ROLE_PREFILL, &cb);
    const char *peer = kvf_engine_session_id(dec);
    uint8_t *dst = calloc(1, NS_BYTES), *src = malloc(NS_BYTES), *back = calloc(1, NS_BYTES);
    kvf_test_pattern(src, NS_BYTES, 1);
    assert_kvf_ok(kvf_mem_register(dec, dst, NS_BYTES));

    /* The other namespace first, while the memory is still all zeros. */
    assert_unknown_session(pre_b, url, peer, src, dst, NS_BYTES);
    /* ... which is what a session nobody runs gives. */
    uint8_t none[16] = {0};
    assert_unknown_session(pre_b, url, "127.0.0.1:9", none, none, sizeof(none));
    kvf_region_info_t *rs = NULL;
    size_t nrs = 0;
    assert_kvf_err(kvf_peer_regions(pre_b, peer, &rs, &nrs), -KVF_ENOTFOUND);
    assert_last_error_contains(peer);
    assert_null(rs);

    /* The same namespace: every byte written, and read back. */
    assert_kvf_ok(kvf_write(pre_a, peer, src, (uintptr_t)dst, NS_BYTES));
    assert_memory_equal(dst, src, NS_BYTES);
    assert_kvf_ok(kvf_read(pre_a, peer, back, (uintptr_t)dst, NS_BYTES));
    assert_memory_equal(back, src, NS_BYTES);
    /* Having a working pair in "alpha" changes nothing for "beta": no cached path leaks over. */
    memset(back, 0xA5, NS_BYTES);
    assert_kvf_err(kvf_read(pre_b, peer, back, (uintptr_t)dst, NS_BYTES), -KVF_ENOTFOUND);
    assert_last_error_contains(peer);
    for (size_t i = 0; i < NS_BYTES; i++)
        if (back[i] != 0xA5)
            fail_msg("a read from another namespace changed local byte %zu", i);

    assert_kvf_ok(kvf_mem_unregister(dec, dst));
    kvf_engine_destroy(pre_b);
    kvf_engine_destroy(pre_a);
    kvf_engine_destroy(dec);
    free(dst);
    free(src);
    free(back);
}

/* kvf_peer_wait() and kvf_peer_events() report only sessions of the engine's own namespace:
 * those present when it subscribes and those that come later. */
static void peer_wait_and_events_stay_in_namespace(void **state)
{
    const char *url = kvf_store_server_url(*state);
    kvf_config_t ca = ns_config("alpha"), cb = ns_config("beta");
    kvf_engine_t *a1 = kvf_test_engine(url, KVF_ROLE_DECODE, &ca);
    kvf_engine_t *a2 = kvf_test_engine(url, KVF_ROLE_PREFILL, &ca);
    kvf_engine_t *b1 = kvf_test_engine(url, KVF_ROLE_PREFILL, &cb);
    const char *sid_a1 = kvf_engine_session_id(a1);

    assert_kvf_ok(kvf_peer_wait(a2, sid_a1, 2000));
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_peer_wait(b1, sid_a1, 200), -KVF_ETIMEDOUT);
    uint64_t took = kvf_test_now_ms() - t0;
    char want[256];
    snprintf(want, sizeof(want), "peer %s did not appear in namespace beta within 200 ms", sid_a1);
    assert_last_error_contains(want);
    if (took < 200 || took > 1700)
        fail_msg("kvf_peer_wait(200 ms) returned after %llu ms", (unsigned long long)took);

    /* Subscribing lists what is there: a1 for a2, nothing for b1 (a1 and a2 are in "alpha"). */
    kvf_peer_event_t ev[8];
    assert_int_equal(kvf_peer_events(a2, ev, 8, 2000), 1);
    assert_int_equal(ev[0].type, KVF_PEER_JOINED);
    assert_string_equal(ev[0].sid, sid_a1);
    assert_int_equal(kvf_peer_events(b1, ev, 8, 0), 0);

    /* Later joins: one in "alpha", then one in "beta". b1's first event must be the beta one:
     * the store sends its watch events in the order the records were written, so an alpha
     * event that reached b1 would come first. */
    kvf_engine_t *a3 = kvf_test_engine(url, KVF_ROLE_DECODE, &ca);
    kvf_engine_t *b2 = kvf_test_engine(url, KVF_ROLE_DECODE, &cb);
    assert_int_equal(kvf_peer_events(b1, ev, 8, 5000), 1);
    assert_int_equal(ev[0].type, KVF_PEER_JOINED);
    assert_string_equal(ev[0].sid, kvf_engine_session_id(b2));
    assert_int_equal(kvf_peer_events(a2, ev, 8, 5000), 1);
    assert_int_equal(ev[0].type, KVF_PEER_JOINED);
    assert_string_equal(ev[0].sid, kvf_engine_session_id(a3));

    /* Leaves likewise: a3 goes, then b2; b1 hears of b2 only. */
    char sid_b2[KVF_SESSION_ID_MAX];
    snprintf(sid_b2, sizeof(sid_b2), "%s", kvf_engine_session_id(b2));
    kvf_engine_destroy(a3);
    kvf_engine_destroy(b2);
    assert_int_equal(kvf_peer_events(b1, ev, 8, 5000), 1);
    assert_int_equal(ev[0].type, KVF_PEER_LEFT);
    assert_string_equal(ev[0].sid, sid_b2);

    kvf_engine_destroy(b1);
    kvf_engine_destroy(a2);
    kvf_engine_destroy(a1);
}

/* The key of an engine's record of @kind in @ns. */
static void ns_key(char *buf, size_t n, const char *ns, const char *kind, kvf_engine_t *e)
{
    snprintf(buf, n, "kvferry/v1/%s/%s/%s", ns, kind, kvf_engine_session_id(e));
}

/* Every record is under kvferry/v1/<its engine's namespace>/, read with the public store API. */
static void records_under_namespace_prefix(void **state)
{
    const char *url = kvf_store_server_url(*state);
    kvf_config_t ca = ns_config("alpha"), cb = ns_config("beta.2-x_Y");
    kvf_engine_t *a = kvf_test_engine(url, KVF_ROLE_DECODE, &ca);
    kvf_engine_t *b = kvf_test_engine(url, KVF_ROLE_PREFILL, &cb);
    uint8_t *mem = calloc(1, 8192);
    assert_kvf_ok(kvf_mem_register(a, mem, 8192));

    char want[4][128];
    ns_key(want[0], sizeof(want[0]), "alpha", "regions", a);
    ns_key(want[1], sizeof(want[1]), "alpha", "sessions", a);
    ns_key(want[2], sizeof(want[2]), "beta.2-x_Y", "regions", b);
    ns_key(want[3], sizeof(want[3]), "beta.2-x_Y", "sessions", b);
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(url, NULL, &st));
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_list(st, "", &kvs, &n));
    /* Byte order: "kvferry/v1/alpha/..." before "kvferry/v1/beta...", regions before sessions. */
    if (n != 4) {
        for (size_t i = 0; i < n; i++)
            print_message("key %zu: %s\n", i, kvs[i].key);
        fail_msg("the store holds %zu keys, want the 4 records of two engines", n);
    }
    for (size_t i = 0; i < 4; i++)
        assert_string_equal(kvs[i].key, want[i]);
    /* The alpha regions record names the registered range; beta's names none. */
    char addr[32];
    snprintf(addr, sizeof(addr), "\"0x%llx\"", (unsigned long long)(uintptr_t)mem);
    if (!strstr(kvs[0].val, addr))
        fail_msg("regions record %s = %s does not name address %s", kvs[0].key,
                 (const char *)kvs[0].val, addr);
    if (strstr(kvs[2].val, addr))
        fail_msg("regions record %s = %s names the other namespace's region", kvs[2].key,
                 (const char *)kvs[2].val);
    kvf_store_kv_free(kvs, n);

    /* Destroy withdraws them from their own namespace only. */
    kvf_engine_destroy(b);
    assert_kvf_ok(kvf_store_list(st, "kvferry/v1/", &kvs, &n));
    assert_int_equal(n, 2);
    assert_string_equal(kvs[0].key, want[0]);
    assert_string_equal(kvs[1].key, want[1]);
    kvf_store_kv_free(kvs, n);

    assert_kvf_ok(kvf_mem_unregister(a, mem));
    kvf_engine_destroy(a);
    kvf_store_close(st);
    free(mem);
}

/* A malformed namespace is refused at create, naming it; the default is "default". */
static void namespace_validated(void **state)
{
    const char *url = kvf_store_server_url(*state);
    static const struct {
        const char *ns;
        const char *msg;
    } bad[] = {
        {"", "namespace \"\": want 1..64 characters"},
        {"a/b", "namespace \"a/b\": only letters, digits, '_', '.', '-'"},
        {"has space", "namespace \"has space\": only letters, digits, '_', '.', '-'"},
        {"x12345678901234567890123456789012345678901234567890123456789012345",
         "want 1..64 characters"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        kvf_config_t c = ns_config(bad[i].ns);
        kvf_engine_t *e = NULL;
        assert_kvf_err(kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_BOTH, 0, &c, &e),
                       -KVF_EINVAL);
        assert_last_error_contains(bad[i].msg);
        assert_null(e);
    }
    /* 64 characters is the longest accepted. */
    char longest[65];
    memset(longest, 'n', 64);
    longest[64] = '\0';
    kvf_config_t c = ns_config(longest);
    kvf_engine_t *e = kvf_test_engine(url, KVF_ROLE_BOTH, &c);
    kvf_config_t d = ns_config(NULL);
    kvf_engine_t *f = kvf_test_engine(url, KVF_ROLE_BOTH, &d);
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(url, NULL, &st));
    char key[512];
    void *val;
    size_t len;
    ns_key(key, sizeof(key), longest, "sessions", e);
    assert_kvf_ok(kvf_store_get(st, key, 0, &val, &len));
    free(val);
    ns_key(key, sizeof(key), "default", "sessions", f);
    assert_kvf_ok(kvf_store_get(st, key, 0, &val, &len));
    free(val);
    kvf_store_close(st);
    kvf_engine_destroy(f);
    kvf_engine_destroy(e);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(other_namespace_unreachable, store_setup, store_teardown),
    cmocka_unit_test_setup_teardown(peer_wait_and_events_stay_in_namespace, store_setup, store_teardown),
    cmocka_unit_test_setup_teardown(records_under_namespace_prefix, store_setup, store_teardown),
    cmocka_unit_test_setup_teardown(namespace_validated, store_setup, store_teardown),
};

KVF_TEST_MAIN(tests)
