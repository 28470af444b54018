/*
 * Session ids that cannot work are refused or made exact, since ids are compared as written: the
 * unspecified address is refused with a message (engine and transfer tool), a host name is
 * resolved to the address the engine is then known by, and the transfer tool resolves a
 * --dst-session-id name the same way.
 */
#include <stdio.h>
#include <string.h>

#include "test_util.h"

static char out[8192];

static void unspecified_address_refused(void **state)
{
    (void)state;
    kvf_store_server_t *srv = kvf_test_store_start();
    kvf_engine_t *e = NULL;
    assert_kvf_err(
        kvf_engine_create(kvf_store_server_url(srv), "0.0.0.0:0", KVF_ROLE_DECODE, 0, NULL, &e),
        -KVF_EINVAL);
    assert_last_error_contains("session id 0.0.0.0:0: 0.0.0.0 listens on every address but "
                               "names none a peer can reach");
    assert_null(e);
    assert_kvf_err(
        kvf_engine_create(kvf_store_server_url(srv), "[::]:0", KVF_ROLE_DECODE, 0, NULL, &e),
        -KVF_EINVAL);
    assert_last_error_contains(":: listens on every address");
    kvf_store_server_stop(srv);
}

static void host_name_resolved(void **state)
{
    (void)state;
    kvf_store_server_t *srv = kvf_test_store_start();
    kvf_engine_t *e = NULL;
    assert_kvf_ok(
        kvf_engine_create(kvf_store_server_url(srv), "localhost:0", KVF_ROLE_DECODE, 0, NULL, &e));
    const char *sid = kvf_engine_session_id(e);
    if (strncmp(sid, "127.0.0.1:", 10) != 0 && strncmp(sid, "[::1]:", 6) != 0)
        fail_msg("localhost:0 became %s, not an address", sid);
    /* Another engine reaches it by the published address. */
    kvf_engine_t *p = kvf_test_engine(kvf_store_server_url(srv), KVF_ROLE_PREFILL, NULL);
    static uint8_t buf[4096], src[4096] = {1, 2, 3};
    assert_kvf_ok(kvf_mem_register(e, buf, sizeof(buf)));
    assert_kvf_ok(kvf_write(p, sid, src, (uintptr_t)buf, sizeof(src)));
    assert_memory_equal(buf, src, sizeof(src));
    kvf_engine_destroy(p);
    kvf_engine_destroy(e);
    kvf_store_server_stop(srv);
}

static void transfer_tool_refuses_unspecified(void **state)
{
    (void)state;
    char *pre[] = {
        (char *)kvf_test_cli_path(), "transfer",         "--role",       "Prefill", "--store-url",
        "tcp://127.0.0.1:1",         "--dst-session-id", "0.0.0.0:5000", NULL};
    assert_int_equal(kvf_test_run(pre, out, sizeof(out), 10000), 2);
    assert_non_null(strstr(out, "kvferry transfer: --dst-session-id 0.0.0.0:5000: 0.0.0.0 names "
                                "no address a peer can reach"));
    char *dec[] = {(char *)kvf_test_cli_path(), "transfer", "--role", "Decode", "--store-url",
                   "tcp://0.0.0.0:1",           NULL};
    assert_int_equal(kvf_test_run(dec, out, sizeof(out), 10000), 2);
    assert_non_null(strstr(out, "--src-session-id (by default the store's host) 0.0.0.0:0: "
                                "0.0.0.0 names no address"));
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(unspecified_address_refused),
    cmocka_unit_test(host_name_resolved),
    cmocka_unit_test(transfer_tool_refuses_unspecified),
};

KVF_TEST_MAIN(tests)
