/*
 * What only the etcd backend has: a cluster with authentication on. The client authenticates with
 * the URL's user and password, renews its token when etcd lets it expire, and never shows the
 * password; a client without credentials is told what to add.
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "test_stores.h"
#include "test_util.h"

/* POST @body to @path on the etcd of @b, as an operator would with curl; fails the case unless
 * it answers 200. */
static void admin_post(const kvf_test_backend_t *b, const char *path, const char *body)
{
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u%s", b->port, path);
    CURL *c = curl_easy_init();
    FILE *null = fopen("/dev/null", "w");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, null);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 5000L);
    CURLcode cc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    fclose(null);
    if (cc != CURLE_OK || status != 200)
        fail_msg("POST %s: %s, HTTP %ld", path, curl_easy_strerror(cc), status);
}

static int events;
static void count(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    (void)arg;
    (void)type;
    (void)kv;
    __atomic_add_fetch(&events, 1, __ATOMIC_SEQ_CST);
}

static void authentication_and_token_renewal(void **state)
{
    (void)state;
    /* Tokens live 1 s without use, so the case sees them expire. */
    const char *extra[] = {"--auth-token-ttl", "1", NULL};
    kvf_test_backend_t b;
    kvf_test_backend_start_with(&b, "etcd", extra, true);
    admin_post(&b, "/v3/auth/user/add", "{\"name\":\"root\",\"password\":\"s3cret\"}");
    admin_post(&b, "/v3/auth/user/grant", "{\"user\":\"root\",\"role\":\"root\"}");
    admin_post(&b, "/v3/auth/enable", "{}");

    char url[128], bad[128], shown[128];
    snprintf(url, sizeof(url), "etcd://root:s3cret@127.0.0.1:%u", b.port);
    snprintf(bad, sizeof(bad), "etcd://root:wrong@127.0.0.1:%u", b.port);
    snprintf(shown, sizeof(shown), "etcd://root:***@127.0.0.1:%u", b.port);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 3000;
    kvf_store_t *st = NULL, *anon = NULL;
    assert_kvf_ok(kvf_store_open(url, &o, &st));
    assert_string_equal(kvf_store_url(st), shown);
    uint64_t wid, lease;
    assert_kvf_ok(kvf_store_watch(st, "a/", count, NULL, &wid));
    assert_kvf_ok(kvf_store_lease_grant(st, 3000, &lease));
    assert_kvf_ok(kvf_store_set(st, "a/1", "x", 1, lease));
    /* Let the token expire (etcd checks every 500 ms), then use the client again. */
    struct timespec ts = {2, 500 * 1000 * 1000};
    nanosleep(&ts, NULL);
    assert_kvf_ok(kvf_store_set(st, "a/2", "y", 1, 0));
    void *v = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_get(st, "a/1", 0, &v, &n)); /* kept alive through the expiry */
    free(v);
    kvf_store_kv_t *kvs;
    assert_kvf_ok(kvf_store_list(st, "a/", &kvs, &n));
    assert_int_equal(n, 2);
    kvf_store_kv_free(kvs, n);
    uint64_t t0 = kvf_test_now_ms();
    while (__atomic_load_n(&events, __ATOMIC_SEQ_CST) < 2 && kvf_test_now_ms() - t0 < 10000)
        nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
    assert_int_equal(__atomic_load_n(&events, __ATOMIC_SEQ_CST), 2);
    assert_kvf_ok(kvf_store_unwatch(st, wid));

    /* Wrong password: refused at open, the password never shown. */
    assert_kvf_err(kvf_store_open(bad, &o, &anon), -KVF_EAUTH);
    assert_last_error_contains("authentication failed");
    if (strstr(kvf_last_error(), "wrong"))
        fail_msg("the password is shown: %s", kvf_last_error());
    /* No credentials: every request says what is missing. */
    assert_kvf_ok(kvf_store_open(b.url, &o, &anon));
    assert_kvf_err(kvf_store_get(anon, "a/1", 0, &v, &n), -KVF_EAUTH);
    assert_last_error_contains("etcd://user:password@host:port");
    kvf_store_close(anon);
    kvf_store_close(st);
    kvf_test_backend_stop(&b);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(authentication_and_token_renewal),
};

KVF_TEST_MAIN(tests)
