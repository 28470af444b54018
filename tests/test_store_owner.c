/*
 * Store ownership on a built-in store with the cluster secret (docs/security.md, "Store
 * ownership"): a lease and the keys bound to it belong to the client that granted it; another
 * authenticated client may read them but not change, delete, keep alive or revoke them; an
 * operator with the admin key may. Lease ids are random. An engine's records (the keys of its
 * session id) are its own, whoever's lease they are bound to, and a restarted engine takes its
 * session over at once.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <jansson.h>

#include "common/auth.h"
#include "common/url.h"
#include "common/wire.h"
#include "core/core.h"
#include "store/client.h"
#include "store/proto.h"
#include "test_util.h"

typedef struct {
    char dir[64];
    char key[96], admin[96];
    kvf_store_server_t *srv;
    const char *url;
    uint16_t port;
} fixture_t;

static void fixture_start(fixture_t *f, bool with_admin)
{
    snprintf(f->dir, sizeof(f->dir), "/tmp/kvf-owner-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->key, sizeof(f->key), "%s/cluster.key", f->dir);
    snprintf(f->admin, sizeof(f->admin), "%s/admin.key", f->dir);
    assert_kvf_ok(kvf_auth_keygen(f->key));
    assert_kvf_ok(kvf_auth_keygen(f->admin));
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.auth_key_file = f->key;
    so.admin_key_file = with_admin ? f->admin : NULL;
    assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &f->srv));
    f->url = kvf_store_server_url(f->srv);
    kvf_hostport_t hp;
    assert_kvf_ok(kvf__session_id_parse(f->url + strlen("tcp://"), &hp));
    f->port = hp.port;
}

static void fixture_stop(fixture_t *f)
{
    kvf_store_server_stop(f->srv);
    unlink(f->key);
    unlink(f->admin);
    rmdir(f->dir);
}

/* A client proving @key (or, with @admin, the admin key), speaking for session @sid if any. */
static kvf_store_t *client_as(const fixture_t *f, bool admin, const char *sid)
{
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.auth_key_file = f->key;
    o.admin_key_file = admin ? f->admin : NULL;
    o.session_id = sid;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(f->url, &o, &st));
    return st;
}

static kvf_store_t *client(const fixture_t *f, bool admin)
{
    return client_as(f, admin, NULL);
}

/* The server's id of the lease @cid of @st. */
static uint64_t server_lease_id(kvf_store_t *st, uint64_t cid)
{
    uint64_t sid = 0;
    pthread_mutex_lock(&st->mu);
    for (cli_lease_t *l = st->leases; l; l = l->next)
        if (l->cid == cid)
            sid = l->sid;
    pthread_mutex_unlock(&st->mu);
    assert_true(sid != 0);
    return sid;
}

/* A raw connection that proved @keyfile as @ident. */
static int raw_client(const fixture_t *f, const char *keyfile, const char *ident)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(f->port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    kvf_auth_key_t k;
    assert_kvf_ok(kvf__auth_key_resolve(keyfile, &k));
    char why[160];
    int rc = kvf__auth_client(fd, &k, ident, kvf__now_ms() + 5000, KVF_AUTH_STORE_ID, why,
                              sizeof(why));
    if (rc)
        fail_msg("handshake: %s", why);
    kvf__auth_key_wipe(&k);
    return fd;
}

/* One request with a u64 body (LEASE_GRANT's u32 when @u32); returns the answer's status and
 * its u64 body in *@out when there is one. */
static uint16_t raw_call(int fd, uint8_t op, uint64_t arg, bool u32, uint64_t *out)
{
    uint8_t f[KVF_STORE_HDR_LEN + 8];
    kvf__put_le32(f, KVF_STORE_MAGIC);
    f[4] = KVF_STORE_PROTO_VERSION;
    f[5] = op;
    kvf__put_le16(f + 6, 0);
    kvf__put_le32(f + 8, 9);
    kvf__put_le32(f + 12, u32 ? 4 : 8);
    if (u32)
        kvf__put_le32(f + KVF_STORE_HDR_LEN, (uint32_t)arg);
    else
        kvf__put_le64(f + KVF_STORE_HDR_LEN, arg);
    size_t n = KVF_STORE_HDR_LEN + (u32 ? 4 : 8);
    assert_int_equal(send(fd, f, n, MSG_NOSIGNAL), (ssize_t)n);
    uint8_t h[KVF_STORE_HDR_LEN], body[1024];
    assert_int_equal(recv(fd, h, sizeof(h), MSG_WAITALL), (ssize_t)sizeof(h));
    uint32_t blen = kvf__get_le32(h + 12);
    assert_true(blen <= sizeof(body));
    if (blen)
        assert_int_equal(recv(fd, body, blen, MSG_WAITALL), (ssize_t)blen);
    if (out && blen >= 8)
        *out = kvf__get_le64(body);
    return kvf__get_le16(h + 6);
}

/* A second client reads another's leased key but cannot overwrite, delete, swap, add to, keep
 * alive or revoke it; the owner and the operator can. */
static void other_client_cannot_touch_a_lease(void **state)
{
    fixture_t f;
    fixture_start(&f, true);
    kvf_store_t *a = client_as(&f, false, "127.0.0.1:7000"), *b = client(&f, false);
    uint64_t lease;
    assert_kvf_ok(kvf_store_lease_grant(a, 5000, &lease));
    const char *key = "app/owned/by-a";
    assert_kvf_ok(kvf_store_set(a, key, "mine", 4, lease));

    void *v = NULL;
    size_t vl = 0;
    assert_kvf_ok(kvf_store_get(b, key, 0, &v, &vl));
    assert_int_equal(vl, 4);
    free(v);
    assert_kvf_err(kvf_store_set(b, key, "evil", 4, 0), -EACCES);
    assert_last_error_contains("the key is bound to another client's lease: only that client or an ");
    /* The lease's id is not told: it is the owner's to keep. */
    const char *tail = strstr(kvf_last_error(), "the key is bound");
    if (strpbrk(tail, "0123456789"))
        fail_msg("the refusal tells a number: %s", kvf_last_error());
    assert_last_error_contains("admin key");
    assert_kvf_err(kvf_store_del(b, key), -EACCES);
    assert_kvf_err(kvf_store_cas(b, key, "mine", 4, "evil", 4, 0), -EACCES);
    assert_kvf_err(kvf_store_add(b, key, 1, NULL), -EACCES);

    uint64_t sid = server_lease_id(a, lease);
    int fd = raw_client(&f, f.key, "kvferry-store-client/intruder");
    assert_int_equal(raw_call(fd, KVF_STORE_OP_LEASE_KEEPALIVE, sid, false, NULL),
                     KVF_STORE_ST_FORBIDDEN);
    assert_int_equal(raw_call(fd, KVF_STORE_OP_LEASE_REVOKE, sid, false, NULL),
                     KVF_STORE_ST_FORBIDDEN);
    close(fd);
    /* The key and its value are as the owner left them. */
    assert_kvf_ok(kvf_store_get(b, key, 0, &v, &vl));
    assert_memory_equal(v, "mine", 4);
    free(v);
    /* The owner may. */
    assert_kvf_ok(kvf_store_set(a, key, "mine2", 5, lease));

    /* The operator may revoke it (and with it the key) and delete what it likes. */
    kvf_store_t *op = client(&f, true);
    assert_kvf_ok(kvf_store_set(a, "kvferry/v1/default/regions/127.0.0.1:7000", "r", 1, lease));
    assert_kvf_ok(kvf_store_del(op, "kvferry/v1/default/regions/127.0.0.1:7000"));
    assert_kvf_ok(kvf_store_set(a, key, "mine3", 5, lease));
    fd = raw_client(&f, f.admin, "kvferry-admin/test");
    assert_int_equal(raw_call(fd, KVF_STORE_OP_LEASE_REVOKE, sid, false, NULL), KVF_STORE_ST_OK);
    close(fd);
    assert_kvf_err(kvf_store_get(b, key, 0, &v, &vl), -KVF_ENOTFOUND);
    /* Keys with no lease stay open to every authenticated client. */
    assert_kvf_ok(kvf_store_set(a, "shared", "1", 1, 0));
    assert_kvf_ok(kvf_store_set(b, "shared", "2", 1, 0));
    assert_kvf_ok(kvf_store_del(b, "shared"));
    kvf_store_close(op);
    kvf_store_close(b);
    kvf_store_close(a);
    fixture_stop(&f);
}

/* The admin key is no cluster key, and the cluster key no admin key. */
static void admin_identity_needs_the_admin_key(void **state)
{
    fixture_t f;
    fixture_start(&f, false);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.admin_key_file = f.admin;
    kvf_store_t *st = NULL;
    assert_kvf_err(kvf_store_open(f.url, &o, &st), -KVF_EAUTH);
    assert_last_error_contains("no admin key is configured here");
    kvf_store_server_stop(f.srv);
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.auth_key_file = f.key;
    so.admin_key_file = f.admin;
    assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &f.srv));
    f.url = kvf_store_server_url(f.srv);
    /* Claiming the admin identity with the cluster key. */
    o.admin_key_file = f.key;
    assert_kvf_err(kvf_store_open(f.url, &o, &st), -KVF_EAUTH);
    assert_last_error_contains("wrong key");
    /* An admin key without a cluster key is refused at start. */
    kvf_store_server_t *bad = NULL;
    so.auth_key_file = NULL;
    unsetenv(KVF_AUTH_KEY_ENV);
    assert_kvf_err(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &bad), -KVF_EINVAL);
    assert_last_error_contains("an admin key needs an auth key");
    fixture_stop(&f);
}

/* Lease ids are random 64-bit values, not a count another client could continue. */
static void lease_ids_are_random(void **state)
{
    fixture_t f;
    fixture_start(&f, false);
    int fd = raw_client(&f, f.key, "kvferry-store-client/ids");
    uint64_t ids[8];
    unsigned high = 0;
    for (unsigned i = 0; i < 8; i++) {
        assert_int_equal(raw_call(fd, KVF_STORE_OP_LEASE_GRANT, 5000, true, &ids[i]),
                         KVF_STORE_ST_OK);
        high += ids[i] >> 40 != 0;
        for (unsigned j = 0; j < i; j++) {
            uint64_t d = ids[i] > ids[j] ? ids[i] - ids[j] : ids[j] - ids[i];
            /* A counter would make neighbours; 8 random ids are this close once in 2^40 runs. */
            if (d < (UINT64_C(1) << 20))
                fail_msg("lease ids %#" PRIx64 " and %#" PRIx64 " are neighbours", ids[i], ids[j]);
        }
    }
    assert_true(high >= 7);
    close(fd);
    fixture_stop(&f);
}

/* An engine's records are its own: another client cannot delete its session record. When the
 * engine dies (no revoke), a new engine on the same session id (the same store identity) takes
 * its records over at once, without waiting for the old lease to end. */
static void engine_records_owned_and_taken_over(void **state)
{
    fixture_t f;
    fixture_start(&f, false);
    setenv(KVF_AUTH_KEY_ENV, f.key, 1);
    /* The new engine takes the port over: one below the ephemeral range, which no other
     * test's outgoing connection takes while it is free. */
    char want[64];
    snprintf(want, sizeof(want), "127.0.0.1:%u", kvf_test_free_port());
    char *argv[] = {(char *)kvf_test_cli_path(), "transfer", "--role", "Decode",
                    "--src-session-id", want, "--store-url", (char *)f.url,
                    "--iterations", "0", NULL};
    int out = -1;
    pid_t pid = kvf_test_spawn_pipe(argv, &out);
    unsetenv(KVF_AUTH_KEY_ENV);
    char line[512], sid[KVF_SESSION_ID_MAX] = "";
    for (int i = 0; i < 50 && !sid[0]; i++) {
        assert_true(kvf_test_read_line(out, line, sizeof(line), 10000) >= 0);
        sscanf(line, "decode session %255s ready", sid);
    }
    assert_true(sid[0] != '\0');
    char key[512];
    snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", sid);
    kvf_store_t *b = client(&f, false);
    assert_kvf_err(kvf_store_del(b, key), -EACCES);

    kill(pid, SIGKILL);
    kvf_test_reap(pid, 5000);
    close(out);
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = f.key;
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(f.url, sid, KVF_ROLE_DECODE, 0, &cfg, &e));
    void *v = NULL;
    size_t vl = 0;
    assert_kvf_ok(kvf_store_get(b, key, 0, &v, &vl));
    /* The record is the new engine's. */
    json_t *doc = json_loadb(v, vl, 0, NULL);
    assert_non_null(doc);
    assert_int_equal(json_integer_value(json_object_get(doc, "pid")), getpid());
    json_decref(doc);
    free(v);
    kvf_engine_destroy(e);
    kvf_store_close(b);
    fixture_stop(&f);
}

/* `kvferry kv` for an operator: with the admin key it deletes an engine's record; with only the
 * cluster secret it is refused, naming the reason. */
static void kv_tool_with_admin_key(void **state)
{
    fixture_t f;
    fixture_start(&f, true);
    kvf_store_t *a = client(&f, false);
    uint64_t lease;
    assert_kvf_ok(kvf_store_lease_grant(a, 5000, &lease));
    assert_kvf_ok(kvf_store_set(a, "kvferry/v1/default/sessions/x", "r", 1, lease));
    char out[4096];
    char *member[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", (char *)f.url,
                      "--auth-key-file", f.key, "del", "kvferry/v1/default/sessions/x", NULL};
    assert_int_equal(kvf_test_run(member, out, sizeof(out), 10000), 1);
    if (!strstr(out, "only that client or an operator with the admin key"))
        fail_msg("output: %s", out);
    char *op[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", (char *)f.url,
                  "--admin-key-file", f.admin, "del", "kvferry/v1/default/sessions/x", NULL};
    assert_int_equal(kvf_test_run(op, out, sizeof(out), 10000), 0);
    void *v;
    size_t vl;
    assert_kvf_err(kvf_store_get(a, "kvferry/v1/default/sessions/x", 0, &v, &vl), -KVF_ENOTFOUND);
    /* Without any key the store says what is missing. */
    char *none[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", (char *)f.url, "get", "k",
                    NULL};
    unsetenv(KVF_AUTH_KEY_ENV);
    assert_int_equal(kvf_test_run(none, out, sizeof(out), 10000), 1);
    if (!strstr(out, "requires the cluster secret"))
        fail_msg("output: %s", out);
    kvf_store_close(a);
    fixture_stop(&f);
}

/* `kvferry store` on every address without a key warns once that anyone may change it; with a
 * key it does not. By default it listens on 127.0.0.1 only. */
static void store_tool_warns_without_key(void **state)
{
    fixture_t f;
    fixture_start(&f, false);
    for (int with_key = 0; with_key < 2; with_key++) {
        char *argv[] = {(char *)kvf_test_cli_path(), "store", "--listen", "tcp://0.0.0.0:0",
                        with_key ? "--auth-key-file" : NULL, f.key, NULL};
        int fd = -1;
        pid_t pid = kvf_test_spawn_pipe(argv, &fd);
        char line[1024];
        bool warned = false, listening = false;
        while (!listening && kvf_test_read_line(fd, line, sizeof(line), 10000) >= 0) {
            warned |= strstr(line, "without an auth key: anyone who can reach it") != NULL;
            listening = strstr(line, "kvferry store listening on") != NULL;
        }
        assert_true(listening);
        assert_int_equal(warned, !with_key);
        kill(pid, SIGTERM);
        assert_int_equal(kvf_test_reap(pid, 10000), 0);
        close(fd);
    }
    char out[4096];
    char *help[] = {(char *)kvf_test_cli_path(), "store", "--help", NULL};
    assert_int_equal(kvf_test_run(help, out, sizeof(out), 10000), 0);
    assert_non_null(strstr(out, "default tcp://127.0.0.1:8000"));
    fixture_stop(&f);
}

/* Found in review: a store client took the admin key from $KVFERRY_ADMIN_KEY_FILE, and every
 * kvferry command exported that variable, so an engine started where an operator's variables
 * were set acted as the operator and ownership was off. Now only a client that names the admin
 * key (kvferry kv) proves it; an engine's store client with the variable set is a member. */
static void admin_key_only_when_named(void **state)
{
    (void)state;
    fixture_t f;
    fixture_start(&f, true);
    kvf_store_t *a = client_as(&f, false, "127.0.0.1:7001");
    uint64_t lease;
    assert_kvf_ok(kvf_store_lease_grant(a, 5000, &lease));
    const char *key = "kvferry/v1/default/sessions/127.0.0.1:7001";
    assert_kvf_ok(kvf_store_set(a, key, "mine", 4, lease));

    setenv("KVFERRY_ADMIN_KEY_FILE", f.admin, 1);
    kvf_store_t *member = client(&f, false);
    assert_kvf_err(kvf_store_set(member, key, "evil", 4, 0), -EACCES);
    kvf_store_close(member);
    /* An engine in the same environment: its records are an ordinary member's. */
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = f.key;
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(f.url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, &cfg, &e));
    char ekey[128];
    snprintf(ekey, sizeof(ekey), "kvferry/v1/default/sessions/%s", kvf_engine_session_id(e));
    assert_kvf_err(kvf_store_set(a, ekey, "evil", 4, 0), -EACCES); /* owned by the engine */
    kvf_engine_destroy(e);
    unsetenv("KVFERRY_ADMIN_KEY_FILE");

    kvf_store_t *op = client(&f, true); /* names the admin key */
    assert_kvf_ok(kvf_store_set(op, key, "fixed", 5, 0));
    kvf_store_close(op);
    kvf_store_close(a);
    fixture_stop(&f);
}

/* Ownership per session (review finding 4): an engine's records are the keys ".../sessions/<sid>"
 * and ".../regions/<sid>", and only the store client that proved that session (the engine) or an
 * operator may create, change or delete them or revoke the engine's lease. Another member
 * cannot squat on a session's keys before the engine starts either, and the engine keeps
 * publishing through every attempt. */
static void session_keys_belong_to_their_engine(void **state)
{
    (void)state;
    fixture_t f;
    fixture_start(&f, true);
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = f.key;
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(f.url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, &cfg, &e));
    const char *sid = kvf_engine_session_id(e);
    char skey[160], rkey[160], want[256];
    snprintf(skey, sizeof(skey), "kvferry/v1/default/sessions/%s", sid);
    snprintf(rkey, sizeof(rkey), "kvferry/v1/default/regions/%s", sid);
    snprintf(want, sizeof(want),
             "the key belongs to session %s: only that engine or an operator with the admin key "
             "may change or delete it",
             sid);

    /* An anonymous member, and one speaking for another session. */
    kvf_store_t *b = client(&f, false), *c = client_as(&f, false, "127.0.0.1:7002");
    kvf_store_t *who[2] = {b, c};
    for (int i = 0; i < 2; i++) {
        uint64_t lease;
        assert_kvf_ok(kvf_store_lease_grant(who[i], 5000, &lease));
        assert_kvf_err(kvf_store_set(who[i], skey, "fake", 4, lease), -EACCES);
        assert_last_error_contains(want);
        assert_kvf_err(kvf_store_set(who[i], rkey, "fake", 4, 0), -EACCES);
        assert_last_error_contains(want);
        assert_kvf_err(kvf_store_del(who[i], skey), -EACCES);
        assert_last_error_contains(want);
        assert_kvf_err(kvf_store_cas(who[i], rkey, NULL, 0, "x", 1, 0), -EACCES);
        assert_last_error_contains(want);
        assert_kvf_err(kvf_store_add(who[i], rkey, 1, NULL), -EACCES);
        assert_last_error_contains(want);
    }
    /* Squatting: the keys of a session that has not started yet cannot be created either. */
    assert_kvf_err(kvf_store_set(b, "kvferry/v1/ns2/regions/127.0.0.1:7003", "fake", 4, 0),
                   -EACCES);
    assert_last_error_contains("the key belongs to session 127.0.0.1:7003: only that engine");
    /* ... whatever the prefix and namespace, IPv6 included. */
    assert_kvf_err(kvf_store_set(b, "other/prefix/x/sessions/[::1]:7004", "fake", 4, 0), -EACCES);
    /* What is not a session's record stays open to every member. */
    assert_kvf_ok(kvf_store_set(b, "kvferry/v1/default/sessions/not-a-session", "v", 1, 0));
    assert_kvf_ok(kvf_store_set(b, "kvferry/v1/default/notes/127.0.0.1:7003", "v", 1, 0));
    assert_kvf_ok(kvf_store_set(c, "kvferry/v1/default/regions/127.0.0.1:7002", "v", 1, 0));

    /* The engine's lease is its own. */
    uint64_t lid = server_lease_id(e->store, e->lease);
    int fd = raw_client(&f, f.key, "kvferry-store-client/intruder");
    assert_int_equal(raw_call(fd, KVF_STORE_OP_LEASE_REVOKE, lid, false, NULL),
                     KVF_STORE_ST_FORBIDDEN);
    close(fd);
    fd = raw_client(&f, f.key, "kvferry-session/127.0.0.1:7002");
    assert_int_equal(raw_call(fd, KVF_STORE_OP_LEASE_REVOKE, lid, false, NULL),
                     KVF_STORE_ST_FORBIDDEN);
    close(fd);

    /* The engine still publishes: a registration lands in its regions record. */
    static uint8_t buf[4096];
    assert_kvf_ok(kvf_mem_register(e, buf, sizeof(buf)));
    void *v = NULL;
    size_t vl = 0;
    assert_kvf_ok(kvf_store_get(b, rkey, 0, &v, &vl));
    json_t *doc = json_loadb(v, vl, 0, NULL);
    free(v);
    assert_non_null(doc);
    assert_int_equal(json_array_size(json_object_get(doc, "regions")), 1);
    json_decref(doc);
    assert_kvf_ok(kvf_store_get(b, skey, 0, &v, &vl));
    doc = json_loadb(v, vl, 0, NULL);
    free(v);
    assert_non_null(doc);
    assert_int_equal(json_integer_value(json_object_get(doc, "pid")), getpid());
    json_decref(doc);

    /* The operator may: `kvferry kv` with the admin key deletes the regions record (a member's
     * `kvferry kv` is refused with the reason), and an admin connection revokes the lease. */
    char out[4096];
    char *member[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", (char *)f.url,
                      "--auth-key-file", f.key, "del", rkey, NULL};
    assert_int_equal(kvf_test_run(member, out, sizeof(out), 10000), 1);
    if (!strstr(out, want))
        fail_msg("output: %s", out);
    char *op[] = {(char *)kvf_test_cli_path(), "kv", "--store-url", (char *)f.url,
                  "--admin-key-file", f.admin, "del", rkey, NULL};
    assert_int_equal(kvf_test_run(op, out, sizeof(out), 10000), 0);
    assert_kvf_err(kvf_store_get(b, rkey, 0, &v, &vl), -KVF_ENOTFOUND);
    fd = raw_client(&f, f.admin, "kvferry-admin/test");
    assert_int_equal(raw_call(fd, KVF_STORE_OP_LEASE_REVOKE, lid, false, NULL), KVF_STORE_ST_OK);
    close(fd);
    assert_kvf_err(kvf_store_get(b, skey, 0, &v, &vl), -KVF_ENOTFOUND);
    kvf_store_close(c);
    kvf_store_close(b);
    kvf_engine_destroy(e);
    fixture_stop(&f);
}

/* A store client's session id is checked like any session id. */
static void session_id_option_checked(void **state)
{
    (void)state;
    fixture_t f;
    fixture_start(&f, false);
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.auth_key_file = f.key;
    o.session_id = "no port here";
    kvf_store_t *st = NULL;
    assert_kvf_err(kvf_store_open(f.url, &o, &st), -KVF_EINVAL);
    assert_last_error_contains("opts.session_id \"no port here\" is not a session id");
    fixture_stop(&f);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(session_keys_belong_to_their_engine),
    cmocka_unit_test(session_id_option_checked),
    cmocka_unit_test(kv_tool_with_admin_key),
    cmocka_unit_test(store_tool_warns_without_key),
    cmocka_unit_test(other_client_cannot_touch_a_lease),
    cmocka_unit_test(admin_key_only_when_named),
    cmocka_unit_test(admin_identity_needs_the_admin_key),
    cmocka_unit_test(lease_ids_are_random),
    cmocka_unit_test(engine_records_owned_and_taken_over),
};

KVF_TEST_MAIN(tests)
