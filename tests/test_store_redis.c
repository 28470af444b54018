/*
 * What only the Redis backend has: credentials and a database in the URL, a clear error when
 * keyspace notifications are off and the client may not turn them on, and the password never
 * shown. And the rule of every backend's tests: a missing server binary fails, never skips.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_stores.h"
#include "test_util.h"

static kvf_store_t *open_ok(const char *url)
{
    kvf_store_t *st = NULL;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 10000;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    return st;
}

static void auth_db_and_hidden_password(void **state)
{
    (void)state;
    const char *extra[] = {"--requirepass", "s3cret", NULL};
    kvf_test_backend_t b;
    kvf_test_backend_start_with(&b, "redis", extra, false);
    char url[256], bad[256], db3[256];
    snprintf(url, sizeof(url), "redis://:s3cret@127.0.0.1:%u", b.port);
    snprintf(bad, sizeof(bad), "redis://:wrong@127.0.0.1:%u", b.port);
    snprintf(db3, sizeof(db3), "redis://default:s3cret@127.0.0.1:%u/3", b.port);
    kvf_store_t *st = open_ok(url);
    char shown[64];
    snprintf(shown, sizeof(shown), "redis://***@127.0.0.1:%u", b.port);
    assert_string_equal(kvf_store_url(st), shown);
    assert_kvf_ok(kvf_store_set(st, "k", "db0", 3, 0));
    /* An ACL user with the password, on database 3: a key space of its own. */
    kvf_store_t *st3 = open_ok(db3);
    void *v = NULL;
    size_t n = 0;
    assert_kvf_err(kvf_store_get(st3, "k", 0, &v, &n), -KVF_ENOTFOUND);
    assert_last_error_contains("redis://default:***@127.0.0.1");
    assert_last_error_contains("/3");
    if (strstr(kvf_last_error(), "s3cret"))
        fail_msg("the password is shown: %s", kvf_last_error());
    assert_kvf_ok(kvf_store_set(st3, "k", "db3", 3, 0));
    assert_kvf_ok(kvf_store_get(st, "k", 0, &v, &n));
    assert_memory_equal(v, "db0", 3);
    free(v);
    kvf_store_close(st3);
    kvf_store_close(st);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 2000;
    assert_kvf_err(kvf_store_open(bad, &o, &st), -KVF_EAUTH);
    assert_last_error_contains("AUTH refused");
    if (strstr(kvf_last_error(), "wrong"))
        fail_msg("the password is shown: %s", kvf_last_error());
    kvf_test_backend_stop(&b);
}

static void cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    (void)arg;
    (void)type;
    (void)kv;
}

static void notifications_off_is_a_clear_error(void **state)
{
    (void)state;
    /* CONFIG renamed away, as hosted Redis services do; notifications off (the default). */
    const char *extra[] = {"--rename-command", "CONFIG", "", NULL};
    kvf_test_backend_t b;
    kvf_test_backend_start_with(&b, "redis", extra, true);
    kvf_store_t *st = open_ok(b.url);
    uint64_t id;
    assert_kvf_err(kvf_store_watch(st, "p/", cb, NULL, &id), -KVF_ENOTSUP);
    assert_last_error_contains("notify-keyspace-events");
    assert_last_error_contains("redis.conf");
    /* Everything else works. */
    assert_kvf_ok(kvf_store_set(st, "p/a", "1", 1, 0));
    kvf_store_close(st);
    kvf_test_backend_stop(&b);
}

static void missing_server_binary_fails(void **state)
{
    (void)state;
    char self[512];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    assert_true(n > 0);
    self[n] = '\0';
    const char *kinds[] = {"etcd", "redis"};
    for (int i = 0; i < 2; i++) {
        char out[4096];
        setenv("KVF_TEST_ETCD", "/nonexistent/etcd", 1);
        setenv("KVF_TEST_REDIS", "/nonexistent/redis-server", 1);
        setenv("KVF_TEST_STORE", kinds[i], 1);
        char *argv[] = {self, "run_one_backend_case", NULL};
        int rc = kvf_test_run(argv, out, sizeof(out), 30000);
        unsetenv("KVF_TEST_ETCD");
        unsetenv("KVF_TEST_REDIS");
        unsetenv("KVF_TEST_STORE");
        if (rc == 0 || rc == KVF_TEST_SKIP_CODE || !strstr(out, "is not installed"))
            fail_msg("%s missing: exit %d, want a failure saying so; output:\n%s", kinds[i], rc,
                     out);
    }
}

/* Run by missing_server_binary_fails() in a child: start the backend named by KVF_TEST_STORE. */
static void run_one_backend_case(void **state)
{
    (void)state;
    kvf_test_backend_t b;
    kvf_test_backend_start(&b, kvf_test_store_kind());
    kvf_test_backend_stop(&b);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(auth_db_and_hidden_password),
    cmocka_unit_test(notifications_off_is_a_clear_error),
    cmocka_unit_test(missing_server_binary_fails),
    cmocka_unit_test(run_one_backend_case),
};

KVF_TEST_MAIN(tests)
