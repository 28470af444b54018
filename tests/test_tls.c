/*
 * TLS 1.3 for the built-in store (docs/security.md): the seed's two-process flow over TLS,
 * mutual TLS and TLS with the cluster secret; and every misconfiguration a user can make (a
 * wrong CA, an expired or revoked certificate, no client certificate for a mutual-TLS store, a
 * wrong key password, a plain client of a TLS store and a TLS client of a plain store, a name or
 * fingerprint that does not match) failing at once, with the message the user reads on the
 * client's side and the store's log line on the other. Certificates come from tests/tls_certs.sh
 * (the openssl command), made afresh for each case in a temporary directory. And etcd:// over
 * https (a real etcd started with TLS): the same options, server name and fingerprint included,
 * for requests, watch streams and an engine pair, and their refusals at once.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"

#define AT_ONCE_MS 3000u /* "at once": far below every connect timeout (10 s) */

typedef struct {
    char dir[64];
    char log[128];
    char url[128];
    pid_t store;
} fx_t;

static char path_buf[16][256];
static int path_next;

/* A file of the certificate directory (a rotating set of buffers, valid for a few calls). */
static const char *P(const fx_t *f, const char *name)
{
    char *b = path_buf[path_next++ % 16];
    snprintf(b, 256, "%s/%s", f->dir, name);
    return b;
}

static void certs_make(fx_t *f)
{
    memset(f, 0, sizeof(*f));
    kvf_test_tls_certs(KVF_TEST_SRC_DIR, f->dir, sizeof(f->dir));
}

static void fx_cleanup(fx_t *f)
{
    if (f->store > 0) {
        kill(f->store, SIGTERM);
        kvf_test_reap(f->store, 5000);
        f->store = 0;
    }
    char *argv[] = {"/bin/rm", "-rf", f->dir, NULL};
    char out[256];
    kvf_test_run(argv, out, sizeof(out), 10000);
}

static size_t file_read(const char *path, char *buf, size_t len)
{
    FILE *fp = fopen(path, "r");
    if (!fp) {
        buf[0] = '\0';
        return 0;
    }
    size_t n = fread(buf, 1, len - 1, fp);
    buf[n] = '\0';
    fclose(fp);
    return n;
}

/* Wait (polling, bounded) until the store's log holds @needle; fail with the log otherwise. */
static void log_wait(const fx_t *f, const char *needle)
{
    static char text[65536];
    uint64_t end = kvf_test_now_ms() + 10000;
    for (;;) {
        file_read(f->log, text, sizeof(text));
        if (strstr(text, needle))
            return;
        if (kvf_test_now_ms() > end)
            fail_msg("the store's log has no \"%s\":\n%s", needle, text);
        usleep(20000);
    }
}

/* `kvferry store --listen tcp://127.0.0.1:0 ARGS...` with its output in a log; sets f->url. */
static void store_start(fx_t *f, const char *const *args)
{
    char *argv[32];
    int n = 0;
    argv[n++] = (char *)kvf_test_cli_path();
    argv[n++] = "store";
    argv[n++] = "--listen";
    argv[n++] = "tcp://127.0.0.1:0";
    argv[n++] = "--log-level";
    argv[n++] = "2";
    for (; args && *args; args++)
        argv[n++] = (char *)*args;
    argv[n] = NULL;
    static int nstores;
    snprintf(f->log, sizeof(f->log), "%s/store%d.log", f->dir, nstores++);
    f->store = kvf_test_spawn(argv, f->log);
    static char text[8192];
    const char *tag = "listening on ";
    uint64_t end = kvf_test_now_ms() + 10000;
    while (!file_read(f->log, text, sizeof(text)) || !strstr(text, tag)) {
        if (kvf_test_now_ms() > end)
            fail_msg("kvferry store did not start:\n%s", text);
        usleep(10000);
    }
    sscanf(strstr(text, tag) + strlen(tag), "%127s", f->url);
}

/* Client options: a CA, optionally a client certificate. */
static kvf_tls_opts_t client_opts(const fx_t *f, const char *ca, const char *cert)
{
    kvf_tls_opts_t o;
    kvf_tls_opts_init(&o);
    o.enable = 1;
    o.ca_file = ca ? P(f, ca) : NULL;
    if (cert) {
        char name[64];
        snprintf(name, sizeof(name), "%s.pem", cert);
        o.cert_file = P(f, name);
        snprintf(name, sizeof(name), "%s.key", cert);
        o.key_file = P(f, name);
    }
    return o;
}

/* kvf_store_open() with @tls fails at once with @code and a message holding @want. */
static void open_fails(const fx_t *f, const kvf_tls_opts_t *tls, int code, const char *want)
{
    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    so.tls = tls;
    kvf_store_t *st = NULL;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_store_open(f->url, &so, &st), code);
    assert_null(st);
    assert_last_error_contains(want);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took > AT_ONCE_MS)
        fail_msg("the failure took %llu ms", (unsigned long long)took);
}

/* The store answers @tls with a set and a get. */
static void open_works(const fx_t *f, const kvf_tls_opts_t *tls)
{
    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    so.tls = tls;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(f->url, &so, &st));
    assert_kvf_ok(kvf_store_set(st, "tls/k", "v1", 2, 0));
    void *v = NULL;
    size_t len = 0;
    assert_kvf_ok(kvf_store_get(st, "tls/k", 0, &v, &len));
    assert_int_equal(len, 2);
    assert_memory_equal(v, "v1", 2);
    free(v);
    kvf_store_close(st);
}

/* ---- the seed's flow ------------------------------------------------------------------------ */

/* `kvferry transfer` Decode and Prefill with @tls_args (and the key @key, or none), one round:
 * the Decode verified every byte. */
static void two_process_flow(const fx_t *f, const char *const *tls_args)
{
    char *common[24];
    int n = 0;
    for (; tls_args && *tls_args; tls_args++)
        common[n++] = (char *)*tls_args;
    common[n] = NULL;
    char *dargv[40], *pargv[40];
    int dn = 0, pn = 0;
    const char *base[] = {kvf_test_cli_path(), "transfer", "--store-url", f->url, "--npu-id", "0",
                          "--log-level", "2", "--iterations", "1", "--timeout", "20",
                          "--src-session-id", "127.0.0.1:0", NULL};
    for (int i = 0; base[i]; i++)
        dargv[dn++] = pargv[pn++] = (char *)base[i];
    for (int i = 0; common[i]; i++)
        dargv[dn++] = pargv[pn++] = common[i];
    dargv[dn++] = "--role";
    dargv[dn++] = "Decode";
    dargv[dn] = NULL;
    int dfd;
    pid_t decode = kvf_test_spawn_pipe(dargv, &dfd);
    char line[512], sid[256] = "";
    uint64_t end = kvf_test_now_ms() + 20000;
    while (!sid[0]) {
        if (kvf_test_read_line(dfd, line, sizeof(line), 20000) < 0 || kvf_test_now_ms() > end)
            fail_msg("the Decode never got ready (last line: %s)", line);
        const char *p = strstr(line, "decode session ");
        if (p)
            sscanf(p, "decode session %255s ready", sid);
    }
    pargv[pn++] = "--role";
    pargv[pn++] = "Prefill";
    pargv[pn++] = "--dst-session-id";
    pargv[pn++] = sid;
    pargv[pn] = NULL;
    static char pout[65536];
    int prc = kvf_test_run(pargv, pout, sizeof(pout), 30000);
    static char dout[65536];
    size_t got = 0;
    while (got + 1 < sizeof(dout)) {
        int r = kvf_test_read_line(dfd, dout + got, sizeof(dout) - got - 1, 20000);
        if (r < 0)
            break;
        got += (size_t)r;
        dout[got++] = '\n';
    }
    dout[got] = '\0';
    close(dfd);
    int drc = kvf_test_reap(decode, 10000);
    if (prc != 0 || drc != 0 || !strstr(dout, "decode done: 1 rounds verified") ||
        !strstr(pout, "prefill done: 1 rounds"))
        fail_msg("Decode exit %d, Prefill exit %d\n--- Decode:\n%s--- Prefill:\n%s", drc, prc,
                 dout, pout);
}

static void tls_transfer_works(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           NULL};
    store_start(&f, sargs);
    const char *cargs[] = {"--tls-ca-file", P(&f, "ca.pem"), NULL};
    two_process_flow(&f, cargs);
    fx_cleanup(&f);
}

static void mutual_tls_transfer_works(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert",    P(&f, "server.pem"), "--tls-key",
                           P(&f, "server.key"), "--tls-ca-file", P(&f, "ca.pem"),
                           "--tls-crl-file", P(&f, "crl.pem"), NULL};
    store_start(&f, sargs);
    const char *cargs[] = {"--tls-ca-file", P(&f, "ca.pem"), "--tls-cert", P(&f, "client.pem"),
                           "--tls-key", P(&f, "client.key"), NULL};
    two_process_flow(&f, cargs);
    fx_cleanup(&f);
}

/* The seed's two processes forced onto tcp with --tls-data: the data connections run mutual TLS
 * too (each engine presents the test certificate and checks the other's against the CA and its
 * address), beside the mutual-TLS store. */
static void data_tls_transfer_works(void **state)
{
    (void)state;
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           "--tls-ca-file", P(&f, "ca.pem"), NULL};
    store_start(&f, sargs);
    const char *cargs[] = {"--tls-ca-file", P(&f, "ca.pem"), "--tls-cert", P(&f, "server.pem"),
                           "--tls-key", P(&f, "server.key"), "--tls-data", "--transport", "tcp",
                           NULL};
    two_process_flow(&f, cargs);
    fx_cleanup(&f);
}

/* TLS and the cluster secret together: the secret's handshake runs inside TLS, and a client
 * with TLS but no key is still refused by the secret. */
static void tls_and_secret_transfer_works(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *key = P(&f, "cluster.key");
    char keypath[256];
    snprintf(keypath, sizeof(keypath), "%s", key);
    assert_kvf_ok(kvf_auth_keygen(keypath));
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           "--auth-key-file", keypath, NULL};
    store_start(&f, sargs);
    const char *cargs[] = {"--tls-ca-file", P(&f, "ca.pem"), "--auth-key-file", keypath, NULL};
    two_process_flow(&f, cargs);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    open_fails(&f, &o, -KVF_EAUTH,
               "this store requires the cluster secret and this client has no auth key");
    log_wait(&f, "authentication failed: the client has no auth key");
    fx_cleanup(&f);
}

/* ---- failures ------------------------------------------------------------------------------- */

static void wrong_ca_fails_at_once(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           NULL};
    store_start(&f, sargs);
    kvf_tls_opts_t o = client_opts(&f, "wrongca.pem", NULL);
    open_fails(&f, &o, -KVF_ETLS,
               "failed: the server certificate failed verification: unable to get local issuer "
               "certificate");
    log_wait(&f, "TLS handshake failed: tlsv1 alert unknown ca");
    /* The right CA works against the same store. */
    o = client_opts(&f, "ca.pem", NULL);
    open_works(&f, &o);
    fx_cleanup(&f);
}

static void expired_cert_fails_at_once(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "expired.pem"), "--tls-key", P(&f, "expired.key"),
                           NULL};
    store_start(&f, sargs);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    open_fails(&f, &o, -KVF_ETLS, "the server certificate failed verification: certificate has expired");
    log_wait(&f, "TLS handshake failed: sslv3 alert certificate expired");
    fx_cleanup(&f);
}

/* A client certificate on the CRL is refused by a store that checks the CRL. */
static void revoked_cert_fails_at_once(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert",    P(&f, "server.pem"), "--tls-key",
                           P(&f, "server.key"), "--tls-ca-file", P(&f, "ca.pem"),
                           "--tls-crl-file", P(&f, "crl.pem"), NULL};
    store_start(&f, sargs);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", "revoked");
    open_fails(&f, &o, -KVF_ETLS, "the store refused this client: sslv3 alert certificate revoked");
    log_wait(&f, "TLS handshake failed: the client certificate failed verification: certificate "
                 "revoked");
    /* And a store whose own certificate is revoked, for a client that checks the CRL. */
    kill(f.store, SIGTERM);
    assert_int_equal(kvf_test_reap(f.store, 5000), 0);
    const char *s2[] = {"--tls-cert", P(&f, "revserver.pem"), "--tls-key", P(&f, "revserver.key"),
                        NULL};
    store_start(&f, s2);
    o = client_opts(&f, "ca.pem", NULL);
    o.crl_file = P(&f, "crl.pem");
    open_fails(&f, &o, -KVF_ETLS,
               "the server certificate failed verification: certificate revoked");
    fx_cleanup(&f);
}

static void mutual_without_client_cert_fails_at_once(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           "--tls-ca-file", P(&f, "ca.pem"), NULL};
    store_start(&f, sargs);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    open_fails(&f, &o, -KVF_ETLS, "the store refused this client: tlsv13 alert certificate required");
    log_wait(&f, "TLS handshake failed: peer did not return a certificate");
    /* A client certificate of another CA is refused too. */
    o = client_opts(&f, "ca.pem", "wrongserver");
    open_fails(&f, &o, -KVF_ETLS, "the store refused this client: tlsv1 alert unknown ca");
    log_wait(&f, "the client certificate failed verification: unable to get local issuer "
                 "certificate");
    fx_cleanup(&f);
}

/* An encrypted key: the right password works, a wrong or missing one fails before connecting,
 * on a client and on `kvferry store`. */
static void key_password(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert",  P(&f, "server.pem"), "--tls-key", P(&f, "server-enc.key"),
                           "--tls-key-password-file", P(&f, "key.pw"), NULL};
    store_start(&f, sargs);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    open_works(&f, &o);
    /* Mutual TLS with the same encrypted key as the client's, password given directly. */
    o.cert_file = P(&f, "server.pem");
    o.key_file = P(&f, "server-enc.key");
    o.key_password = "wrong horse";
    open_fails(&f, &o, -KVF_ETLS, "wrong password for the TLS private key");
    o.key_password = NULL;
    open_fails(&f, &o, -KVF_ETLS, "is encrypted and no password is set");
    o.key_password = "correct horse";
    open_works(&f, &o);

    char *argv[] = {(char *)kvf_test_cli_path(), "store", "--listen", "tcp://127.0.0.1:0",
                    "--tls-cert", (char *)P(&f, "server.pem"), "--tls-key",
                    (char *)P(&f, "server-enc.key"), "--tls-key-password-file",
                    (char *)P(&f, "wrong.pw"), NULL};
    static char out[4096];
    assert_int_equal(kvf_test_run(argv, out, sizeof(out), 10000), 1);
    if (!strstr(out, "wrong password for the TLS private key ") || !strstr(out, "server-enc.key"))
        fail_msg("kvferry store said: %s", out);
    fx_cleanup(&f);
}

/* Files that are not there, or not what they should be: named in the message. */
static void bad_files_are_named(void **state)
{
    fx_t f;
    certs_make(&f);
    kvf_tls_opts_t o = client_opts(&f, "nosuch-ca.pem", NULL);
    assert_kvf_err(kvf_tls_opts_check(&o, 0), -ENOENT);
    assert_last_error_contains("TLS CA file ");
    assert_last_error_contains("nosuch-ca.pem: No such file or directory");
    o = client_opts(&f, "key.pw", NULL);
    assert_kvf_err(kvf_tls_opts_check(&o, 0), -KVF_ETLS);
    assert_last_error_contains("key.pw: no PEM certificate in it");
    o = client_opts(&f, "ca.pem", "client");
    o.key_file = P(&f, "server.key");
    assert_kvf_err(kvf_tls_opts_check(&o, 0), -KVF_ETLS);
    assert_last_error_contains("does not match the certificate");
    o = client_opts(&f, "ca.pem", NULL);
    o.fingerprint = "12:34";
    assert_kvf_err(kvf_tls_opts_check(&o, 0), -KVF_EINVAL);
    assert_last_error_contains("TLS fingerprint 12:34: not a SHA-256 fingerprint");
    kvf_tls_opts_t s = client_opts(&f, NULL, NULL);
    assert_kvf_err(kvf_tls_opts_check(&s, 1), -KVF_EINVAL);
    assert_last_error_contains("a TLS store server needs a certificate and its key");
    /* The store server says the same, naming the store. */
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.tls = &o;
    o.fingerprint = NULL;
    o.cert_file = P(&f, "server.pem");
    o.key_file = P(&f, "missing.key");
    kvf_store_server_t *srv = NULL;
    assert_kvf_err(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &srv), -ENOENT);
    assert_last_error_contains("TLS private key ");
    assert_last_error_contains("missing.key: No such file or directory");
    fx_cleanup(&f);
}

static void plain_client_of_tls_store_fails_at_once(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           NULL};
    store_start(&f, sargs);
    kvf_tls_opts_t off;
    kvf_tls_opts_init(&off);
    open_fails(&f, &off, -KVF_ETLS,
               "this store requires TLS: connect with TLS options (a CA file, --tls-ca-file) or "
               "set_conf_store_tls()");
    log_wait(&f, "TLS required: the client sent plain text (no TLS options?)");
    /* An engine: refused at create, nothing published. */
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.tls = &off;
    kvf_engine_t *e = NULL;
    assert_kvf_err(kvf_engine_create(f.url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, &cfg, &e),
                   -KVF_ETLS);
    assert_last_error_contains("this store requires TLS");
    fx_cleanup(&f);
}

static void tls_client_of_plain_store_fails_at_once(void **state)
{
    fx_t f;
    certs_make(&f);
    store_start(&f, NULL);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    open_fails(&f, &o, -KVF_ETLS,
               "the store closed the connection during the TLS handshake (does the store use "
               "TLS?)");
    log_wait(&f, "closing connection from 127.0.0.1:");
    log_wait(&f, "the client speaks TLS and this store does not use TLS (start it with a "
                 "certificate and key, --tls-cert and --tls-key, or connect without TLS options)");
    fx_cleanup(&f);
}

static void name_and_fingerprint(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           NULL};
    store_start(&f, sargs);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    o.server_name = "other.example";
    open_fails(&f, &o, -KVF_ETLS, "the server certificate failed verification: hostname mismatch");
    o.server_name = "localhost";
    open_works(&f, &o);
    /* Pinned by fingerprint, no CA at all. */
    char fp[160];
    file_read(P(&f, "server.fp"), fp, sizeof(fp));
    fp[strcspn(fp, "\n")] = '\0';
    kvf_tls_opts_t p = client_opts(&f, NULL, NULL);
    p.fingerprint = fp;
    open_works(&f, &p);
    fp[0] = fp[0] == '0' ? '1' : '0';
    open_fails(&f, &p, -KVF_ETLS, "fingerprint");
    assert_last_error_contains("is not the one configured");
    fx_cleanup(&f);
}

/* Garbage to a TLS store, raw: each connection is closed, and the store keeps serving. */
static void raw_garbage_closed_store_serves(void **state)
{
    fx_t f;
    certs_make(&f);
    const char *sargs[] = {"--tls-cert", P(&f, "server.pem"), "--tls-key", P(&f, "server.key"),
                           NULL};
    store_start(&f, sargs);
    uint16_t port = (uint16_t)atoi(strrchr(f.url, ':') + 1);
    uint8_t junk[4096];
    for (int round = 0; round < 6; round++) {
        kvf_test_pattern(junk, sizeof(junk), (uint32_t)round);
        if (round % 2 == 0) {
            junk[0] = 0x16; /* looks like a ClientHello record, is not one */
            junk[1] = 0x03;
        }
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(fd >= 0);
        struct timeval tv = {.tv_sec = 5};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
        (void)send(fd, junk, (size_t)(64 << round) > sizeof(junk) ? sizeof(junk) : 64u << round,
                   MSG_NOSIGNAL);
        uint8_t b[256];
        ssize_t r;
        uint64_t t0 = kvf_test_now_ms();
        while ((r = recv(fd, b, sizeof(b), 0)) > 0)
            ;
        if (r < 0 && errno != ECONNRESET)
            fail_msg("round %d: the store did not close the connection: %s", round,
                     strerror(errno));
        /* A stream that looks like a record still coming is cut at the handshake's deadline. */
        assert_true(kvf_test_now_ms() - t0 < 3000 + 2000);
        close(fd);
    }
    /* One byte of a plain frame ("K" of KVFS): refused at once, not waited on. */
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(send(fd, "K", 1, MSG_NOSIGNAL), 1);
    uint64_t t0 = kvf_test_now_ms();
    uint8_t b[64];
    while (recv(fd, b, sizeof(b), 0) > 0)
        ;
    assert_true(kvf_test_now_ms() - t0 < 1000);
    close(fd);
    log_wait(&f, "closing connection from 127.0.0.1:");
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    open_works(&f, &o);
    fx_cleanup(&f);
}

/* An in-process TLS store: large values (many TLS records per frame), a watch, and many
 * requests in flight, all intact. */
static void in_process_large_values(void **state)
{
    fx_t f;
    certs_make(&f);
    kvf_tls_opts_t so_tls;
    kvf_tls_opts_init(&so_tls);
    so_tls.enable = 1;
    so_tls.cert_file = P(&f, "server.pem");
    so_tls.key_file = P(&f, "server.key");
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.tls = &so_tls;
    kvf_store_server_t *srv = NULL;
    assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &srv));
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", NULL);
    kvf_store_opts_t co;
    kvf_store_opts_init(&co);
    co.tls = &o;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(kvf_store_server_url(srv), &co, &st));
    size_t big = 8u << 20;
    uint8_t *v = malloc(big);
    assert_non_null(v);
    for (uint32_t i = 0; i < 4; i++) {
        char key[32];
        snprintf(key, sizeof(key), "big/%u", i);
        kvf_test_pattern(v, big, i);
        assert_kvf_ok(kvf_store_set(st, key, v, big - i * 12345, 0));
    }
    for (uint32_t i = 0; i < 4; i++) {
        char key[32];
        snprintf(key, sizeof(key), "big/%u", i);
        kvf_test_pattern(v, big, i);
        void *got = NULL;
        size_t len = 0;
        assert_kvf_ok(kvf_store_get(st, key, 0, &got, &len));
        assert_int_equal(len, big - i * 12345);
        assert_memory_equal(got, v, len);
        free(got);
    }
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    assert_kvf_ok(kvf_store_list(st, "big/", &kvs, &n));
    assert_int_equal(n, 4);
    kvf_store_kv_free(kvs, n);
    free(v);
    kvf_store_close(st);
    kvf_store_server_stop(srv);
    fx_cleanup(&f);
}

/* ---- etcd over https ------------------------------------------------------------------------ */

static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* etcd serving https with the test CA's certificate @cert ("server": 127.0.0.1 and localhost),
 * requiring client certificates; @name: the server name to reach it by (NULL: 127.0.0.1). */
static void etcd_tls_start(fx_t *f, const char *cert, const char *name)
{
    const char *bin = getenv("KVF_TEST_ETCD") ? getenv("KVF_TEST_ETCD") : "/usr/bin/etcd";
    if (access(bin, X_OK) != 0)
        fail_msg("%s is missing: install etcd-server (make deps)", bin);
    uint16_t port = free_port(), pport = free_port();
    char client[64], peer[64], cluster[96], data[160], pem[32], key[32];
    snprintf(pem, sizeof(pem), "%s.pem", cert);
    snprintf(key, sizeof(key), "%s.key", cert);
    snprintf(client, sizeof(client), "https://127.0.0.1:%u", port);
    snprintf(peer, sizeof(peer), "http://127.0.0.1:%u", pport);
    snprintf(cluster, sizeof(cluster), "t=%s", peer);
    snprintf(data, sizeof(data), "%s/etcd", f->dir);
    char *argv[] = {(char *)bin, "--name", "t", "--data-dir", data, "--listen-client-urls", client,
                    "--advertise-client-urls", client, "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer, "--initial-cluster", cluster,
                    "--heartbeat-interval", "10", "--election-timeout", "100", "--log-level",
                    "error", "--cert-file", (char *)P(f, pem), "--key-file", (char *)P(f, key),
                    "--trusted-ca-file", (char *)P(f, "ca.pem"),
                    "--client-cert-auth", NULL};
    snprintf(f->log, sizeof(f->log), "%s/etcd.log", f->dir);
    f->store = kvf_test_spawn(argv, f->log);
    snprintf(f->url, sizeof(f->url), "etcd://127.0.0.1:%u", port);
    kvf_tls_opts_t o = client_opts(f, "ca.pem", "client");
    o.server_name = name;
    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    so.tls = &o;
    so.connect_timeout_ms = 0;
    so.request_timeout_ms = 500;
    uint64_t end = kvf_test_now_ms() + 20000;
    for (;;) {
        kvf_store_t *st = NULL;
        if (kvf_store_open(f->url, &so, &st) == 0) {
            kvf_store_close(st);
            return;
        }
        if (kill(f->store, 0) < 0 || kvf_test_now_ms() > end)
            fail_msg("etcd with TLS did not answer: %s", kvf_last_error());
        usleep(20000);
    }
}

/* An engine pair whose store is etcd over https with @tls: a transfer lands. */
static void etcd_pair_works(const fx_t *f, const kvf_tls_opts_t *tls)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.tls = tls;
    cfg.transport = KVF_TRANSPORT_TCP;
    kvf_engine_t *d = kvf_test_engine(f->url, KVF_ROLE_DECODE, &cfg);
    kvf_engine_t *p = kvf_test_engine(f->url, KVF_ROLE_PREFILL, &cfg);
    static uint8_t dst[65536], src[65536];
    memset(dst, 0, sizeof(dst));
    kvf_test_pattern(src, sizeof(src), 11);
    assert_kvf_ok(kvf_mem_register(d, dst, sizeof(dst)));
    kvf_xfer_t x = {.op = KVF_OP_WRITE, .local = src, .remote = (uintptr_t)dst, .len = sizeof(src)};
    assert_kvf_ok(kvf_transfer_sync(p, kvf_engine_session_id(d), &x, 1));
    assert_memory_equal(dst, src, sizeof(src));
    kvf_engine_destroy(p);
    kvf_engine_destroy(d);
}

static void on_put(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    if (type == KVF_STORE_EVENT_PUT && strcmp(kv->key, "watched/k") == 0)
        atomic_store((atomic_int *)arg, 1);
}

/* A watch over etcd's streaming https (etcd_watch.c) with @tls sees a put. */
static void etcd_watch_works(const fx_t *f, const kvf_tls_opts_t *tls)
{
    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    so.tls = tls;
    kvf_store_t *st = NULL;
    assert_kvf_ok(kvf_store_open(f->url, &so, &st));
    atomic_int seen = 0;
    uint64_t id = 0;
    assert_kvf_ok(kvf_store_watch(st, "watched/", on_put, &seen, &id));
    assert_kvf_ok(kvf_store_set(st, "watched/k", "w", 1, 0));
    uint64_t end = kvf_test_now_ms() + 10000;
    while (!atomic_load(&seen) && kvf_test_now_ms() < end)
        usleep(10000);
    assert_kvf_ok(kvf_store_unwatch(st, id));
    kvf_store_close(st);
    if (!atomic_load(&seen))
        fail_msg("the watch saw no put within 10 s");
}

/* etcd:// with TLS options: https with mutual TLS through libcurl; refusals at once, saying
 * why; and a Redis URL with TLS options refused, saying so. */
static void etcd_over_tls(void **state)
{
    fx_t f;
    certs_make(&f);
    etcd_tls_start(&f, "server", NULL);
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", "client");
    open_works(&f, &o);
    /* An engine pair through it: the records and the lease live in etcd over https. */
    etcd_pair_works(&f, &o);

    o = client_opts(&f, "wrongca.pem", "client");
    open_fails(&f, &o, -KVF_ETLS, "unable to get local issuer certificate");
    o = client_opts(&f, "ca.pem", NULL);
    open_fails(&f, &o, -KVF_ETLS, "etcd closed the connection after the handshake: it refused this client's certificate (none is set");
    o = client_opts(&f, "ca.pem", "client");
    o.fingerprint = "00";
    open_fails(&f, &o, -KVF_EINVAL, "not a SHA-256 fingerprint");
    o.fingerprint = NULL;
    /* The server name, not the URL's host (127.0.0.1, in the certificate), is checked. */
    o.server_name = "other.example";
    open_fails(&f, &o, -KVF_ETLS, "(server name other.example) failed: SSL: no alternative "
                                  "certificate subject name matches target host name "
                                  "'other.example'");
    o.server_name = "localhost";
    open_works(&f, &o);

    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    o = client_opts(&f, "ca.pem", NULL);
    so.tls = &o;
    kvf_store_t *st = NULL;
    assert_kvf_err(kvf_store_open("redis://127.0.0.1:9", &so, &st), -KVF_ENOTSUP);
    assert_last_error_contains("TLS to Redis is not supported: Debian's hiredis (0.14) is built "
                               "without TLS");
    fx_cleanup(&f);
}

/* etcd whose certificate names only other.example, reached at 127.0.0.1: the server name
 * (SNI and the name checked) and a pinned fingerprint work for requests, watches and an engine
 * pair, as they do for the built-in store; a wrong one fails at once, saying which. */
static void etcd_name_and_fingerprint(void **state)
{
    fx_t f;
    certs_make(&f);
    etcd_tls_start(&f, "otherhost", "other.example");
    kvf_tls_opts_t o = client_opts(&f, "ca.pem", "client");
    open_fails(&f, &o, -KVF_ETLS, "SSL: no alternative certificate subject name matches target "
                                  "host name '127.0.0.1'");
    o.server_name = "other.example";
    open_works(&f, &o);
    etcd_watch_works(&f, &o);
    etcd_pair_works(&f, &o);
    o.server_name = "localhost";
    open_fails(&f, &o, -KVF_ETLS, "TLS with https://127.0.0.1:");
    assert_last_error_contains("(server name localhost) failed: SSL: no alternative certificate "
                               "subject name matches target host name 'localhost'");

    /* Pinned, no CA: the name is not checked (127.0.0.1 is not in the certificate). */
    char fp[160];
    file_read(P(&f, "otherhost.fp"), fp, sizeof(fp));
    fp[strcspn(fp, "\n")] = '\0';
    kvf_tls_opts_t p = client_opts(&f, NULL, "client");
    p.fingerprint = fp;
    open_works(&f, &p);
    etcd_watch_works(&f, &p);
    etcd_pair_works(&f, &p);
    /* Pinned with a CA: both checked. */
    p = client_opts(&f, "ca.pem", "client");
    p.fingerprint = fp;
    open_works(&f, &p);
    p = client_opts(&f, "wrongca.pem", "client");
    p.fingerprint = fp;
    open_fails(&f, &p, -KVF_ETLS, "unable to get local issuer certificate");
    /* Another certificate's fingerprint, with or without a CA. */
    char other[160];
    file_read(P(&f, "server.fp"), other, sizeof(other));
    other[strcspn(other, "\n")] = '\0';
    p = client_opts(&f, NULL, "client");
    p.fingerprint = other;
    open_fails(&f, &p, -KVF_ETLS, "failed: the server certificate's SHA-256 fingerprint ");
    assert_last_error_contains("is not the one configured");
    p = client_opts(&f, "ca.pem", "client");
    p.fingerprint = other;
    open_fails(&f, &p, -KVF_ETLS, "is not the one configured");
    fx_cleanup(&f);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(tls_transfer_works),
        cmocka_unit_test(mutual_tls_transfer_works),
        cmocka_unit_test(tls_and_secret_transfer_works),
        cmocka_unit_test(data_tls_transfer_works),
        cmocka_unit_test(wrong_ca_fails_at_once),
        cmocka_unit_test(expired_cert_fails_at_once),
        cmocka_unit_test(revoked_cert_fails_at_once),
        cmocka_unit_test(mutual_without_client_cert_fails_at_once),
        cmocka_unit_test(key_password),
        cmocka_unit_test(bad_files_are_named),
        cmocka_unit_test(plain_client_of_tls_store_fails_at_once),
        cmocka_unit_test(tls_client_of_plain_store_fails_at_once),
        cmocka_unit_test(name_and_fingerprint),
        cmocka_unit_test(raw_garbage_closed_store_serves),
        cmocka_unit_test(in_process_large_values),
        cmocka_unit_test(etcd_over_tls),
        cmocka_unit_test(etcd_name_and_fingerprint),
    };
    return KVF_TEST_RUN(tests, argc, argv);
}
