/*
 * `kvferry info` as a user runs it, against a known pair of engines in this process: the text
 * and JSON forms of what the store knows and of an engine's live statistics, and clear failures
 * (exit 1, a message naming what could not be reached) when the store or the engine is not there.
 */
#include "test_util.h"

#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char out[1 << 17];

typedef struct {
    kvf_store_server_t *srv;
    const char *url;
    kvf_engine_t *dec, *pre;
    uint8_t *big, *small;
    const char *path; /* the Prefill's path to the Decode */
} fx_t;

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    fx->srv = kvf_test_store_start();
    fx->url = kvf_store_server_url(fx->srv);
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    fx->dec = kvf_test_engine(fx->url, KVF_ROLE_DECODE, &c);
    fx->pre = kvf_test_engine(fx->url, KVF_ROLE_PREFILL, &c);
    fx->big = aligned_alloc(4096, 65536);
    fx->small = aligned_alloc(4096, 4096);
    assert_kvf_ok(kvf_mem_register(fx->dec, fx->big, 65536));
    assert_kvf_ok(kvf_mem_register(fx->dec, fx->small, 4096));
    static uint8_t src[4096];
    assert_kvf_ok(
        kvf_write(fx->pre, kvf_engine_session_id(fx->dec), src, (uintptr_t)fx->big, sizeof(src)));
    assert_kvf_ok(kvf_engine_peer_transport(fx->pre, kvf_engine_session_id(fx->dec), &fx->path));
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_engine_destroy(fx->pre);
    kvf_engine_destroy(fx->dec);
    kvf_store_server_stop(fx->srv);
    free(fx->big);
    free(fx->small);
    free(fx);
    return 0;
}

/* `kvferry info --store-url URL [a0 [a1 [a2]]]`; output in `out`. */
static int info(const char *url, const char *a0, const char *a1, const char *a2)
{
    char *argv[] = {(char *)kvf_test_cli_path(),
                    "info",
                    "--store-url",
                    (char *)url,
                    (char *)a0,
                    (char *)a1,
                    (char *)a2,
                    NULL};
    return kvf_test_run(argv, out, sizeof(out), 15000);
}

/* The output line starting with @prefix (copied into @line), or fail. */
static void line_of(const char *prefix, char *line, size_t len)
{
    for (const char *p = out; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (!strncmp(p, prefix, strlen(prefix))) {
            const char *e = strchr(p, '\n');
            size_t n = e ? (size_t)(e - p) : strlen(p);
            snprintf(line, len, "%.*s", (int)(n < len ? n : len - 1), p);
            return;
        }
    }
    fail_msg("no line starting with \"%s\" in:\n%s", prefix, out);
}

static void info_text_known_pair(void **state)
{
    fx_t *fx = *state;
    const char *dsid = kvf_engine_session_id(fx->dec), *psid = kvf_engine_session_id(fx->pre);
    char want[256], line[512], sid[KVF_SESSION_ID_MAX], role[16], ns[32], host[64], pid[16], tr[32],
        age[32];
    unsigned long long nreg, bytes;

    assert_int_equal(info(fx->url, NULL, NULL, NULL), 0);
    snprintf(want, sizeof(want), "store %s: 2 sessions\n", fx->url);
    assert_non_null(strstr(out, want));
    assert_non_null(strstr(out, "SESSION "));
    line_of(dsid, line, sizeof(line));
    assert_int_equal(sscanf(line, "%263s %15s %31s %63s %15s %31s %31s %llu %llu", sid, role, ns,
                            host, pid, tr, age, &nreg, &bytes),
                     9);
    assert_string_equal(role, "Decode");
    assert_string_equal(ns, "default");
    assert_int_equal(atoi(pid), getpid());
    const char *forced = getenv("KVFERRY_TRANSPORT");
    assert_string_equal(tr, forced && !strcmp(forced, "tcp") ? "tcp" : "shm,tcp");
    assert_int_equal(nreg, 2);
    assert_int_equal(bytes, 65536 + 4096);
    line_of(psid, line, sizeof(line));
    assert_int_equal(sscanf(line, "%263s %15s %31s %63s %15s %31s %31s %llu %llu", sid, role, ns,
                            host, pid, tr, age, &nreg, &bytes),
                     9);
    assert_string_equal(role, "Prefill");
    assert_int_equal(nreg, 0);

    assert_int_equal(info(fx->url, "--verbose", NULL, NULL), 0);
    snprintf(want, sizeof(want), "    region [0x%llx, +65536)\n",
             (unsigned long long)(uintptr_t)fx->big);
    assert_non_null(strstr(out, want));
    snprintf(want, sizeof(want), "    region [0x%llx, +4096)\n",
             (unsigned long long)(uintptr_t)fx->small);
    assert_non_null(strstr(out, want));
    assert_non_null(strstr(out, "lease TTL 5000ms"));

    /* Live statistics, asked at the Prefill's port. */
    assert_int_equal(info(fx->url, "--session", psid, NULL), 0);
    snprintf(want, sizeof(want), "store %s: 1 session\n", fx->url);
    assert_non_null(strstr(out, want));
    snprintf(want, sizeof(want), "live statistics of %s (Prefill, up ", psid);
    assert_non_null(strstr(out, want));
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "  %s ", fx->path);
    line_of(prefix, line, sizeof(line));
    unsigned long long v[6];
    assert_int_equal(sscanf(line + strlen(prefix), "%llu %llu %llu %llu %llu %llu", &v[0], &v[1],
                            &v[2], &v[3], &v[4], &v[5]),
                     6);
    assert_int_equal(v[0], 4096); /* written */
    assert_int_equal(v[1], 1);
    assert_int_equal(v[2], 0);
    assert_int_equal(v[4], 1); /* calls */
    assert_int_equal(v[5], 0);
    snprintf(want, sizeof(want), "  %s (%s) ", dsid, fx->path);
    line_of(want, line, sizeof(line));
    assert_non_null(strstr(out, "  errors: none\n"));
}

static void info_json_known_pair(void **state)
{
    fx_t *fx = *state;
    const char *dsid = kvf_engine_session_id(fx->dec), *psid = kvf_engine_session_id(fx->pre);
    assert_int_equal(info(fx->url, "--json", "--verbose", NULL), 0);
    json_error_t err;
    json_t *doc = json_loads(out, 0, &err);
    if (!doc)
        fail_msg("not JSON (%s at line %d):\n%s", err.text, err.line, out);
    assert_string_equal(json_string_value(json_object_get(doc, "store")), fx->url);
    json_t *ss = json_object_get(doc, "sessions"), *s;
    assert_int_equal(json_array_size(ss), 2);
    assert_null(json_object_get(doc, "stats"));
    size_t i;
    int seen = 0;
    json_array_foreach(ss, i, s)
    {
        const char *sid = json_string_value(json_object_get(s, "session_id"));
        json_t *reg = json_object_get(s, "regions");
        assert_int_equal(json_integer_value(json_object_get(s, "pid")), getpid());
        assert_int_equal(json_integer_value(json_object_get(s, "lease_ttl_ms")), 5000);
        json_int_t age = json_integer_value(json_object_get(s, "age_ms"));
        assert_true(age >= 0 && age < 60000);
        if (!strcmp(sid, dsid)) {
            seen |= 1;
            assert_string_equal(json_string_value(json_object_get(s, "role")), "Decode");
            assert_int_equal(json_integer_value(json_object_get(reg, "count")), 2);
            assert_int_equal(json_integer_value(json_object_get(reg, "bytes")), 65536 + 4096);
            json_t *r0 = json_array_get(json_object_get(reg, "ranges"), 0);
            char addr[32];
            uintptr_t lo = (uintptr_t)fx->big < (uintptr_t)fx->small ? (uintptr_t)fx->big
                                                                     : (uintptr_t)fx->small;
            snprintf(addr, sizeof(addr), "0x%llx", (unsigned long long)lo);
            assert_string_equal(json_string_value(json_object_get(r0, "addr")), addr);
        } else {
            seen |= 2;
            assert_string_equal(sid, psid);
            assert_int_equal(json_integer_value(json_object_get(reg, "count")), 0);
        }
    }
    assert_int_equal(seen, 3);
    json_decref(doc);

    assert_int_equal(info(fx->url, "--json", "--session", psid), 0);
    doc = json_loads(out, 0, &err);
    if (!doc)
        fail_msg("not JSON (%s at line %d):\n%s", err.text, err.line, out);
    assert_int_equal(json_array_size(json_object_get(doc, "sessions")), 1);
    json_t *st = json_object_get(doc, "stats");
    assert_string_equal(json_string_value(json_object_get(st, "session_id")), psid);
    json_t *t = json_object_get(json_object_get(st, "transports"), fx->path);
    assert_int_equal(json_integer_value(json_object_get(t, "write_bytes")), 4096);
    assert_int_equal(json_integer_value(json_object_get(t, "calls")), 1);
    json_t *p0 = json_array_get(json_object_get(st, "peers"), 0);
    assert_string_equal(json_string_value(json_object_get(p0, "session_id")), dsid);
    assert_int_equal(json_integer_value(json_object_get(p0, "write_ops")), 1);
    assert_int_equal(json_object_size(json_object_get(st, "errors")), 0);
    json_decref(doc);
}

static uint16_t refused_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    socklen_t al = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &al);
    close(fd);
    return ntohs(a.sin_port);
}

static void info_unreachable(void **state)
{
    fx_t *fx = *state;
    char url[64], sid[64], want[512];
    snprintf(url, sizeof(url), "tcp://127.0.0.1:%u", refused_port());
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(info(url, "--timeout", "1000", NULL), 1);
    assert_true(kvf_test_now_ms() - t0 < 5000);
    /* The whole lines, as docs/operations.md ("Troubleshooting") quotes them. */
    snprintf(want, sizeof(want),
             "kvferry info: store %s: store %s: cannot connect within 1000 ms: connect %s: "
             "Connection refused (KVF_ESTOREDOWN)\n",
             url, url, url + strlen("tcp://"));
    if (!strstr(out, want))
        fail_msg("no \"%s\" in:\n%s", want, out);

    snprintf(sid, sizeof(sid), "127.0.0.1:%u", refused_port());
    assert_int_equal(info(fx->url, "--session", sid, NULL), 1);
    snprintf(want, sizeof(want),
             "kvferry info: engine %s (and the store has no session of that id): statistics of "
             "%s: cannot connect: Connection refused (no engine listens there) (ECONNREFUSED)\n",
             sid, sid);
    if (!strstr(out, want))
        fail_msg("no \"%s\" in:\n%s", want, out);

    assert_int_equal(info(fx->url, "--session", "127.0.0.1:99999", NULL), 2);
    assert_non_null(strstr(out, "99999"));
    assert_int_equal(info(fx->url, "--bogus", NULL, NULL), 2);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(info_text_known_pair, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(info_json_known_pair, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(info_unreachable, fx_setup, fx_teardown),
};

KVF_TEST_MAIN(tests)
