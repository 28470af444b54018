/*
 * TLS 1.3 over OpenSSL (see tls.h): the options and the context (read and checked once, with
 * errors naming the file or value). The sessions and kvf_stream_t are in tls_session.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "common/common.h"
#include "common/tls.h"
#include "common/tls_private.h"

#define TLS_LIST_MAX 16 /* files in one comma-separated list */

bool kvf__tls_on(const kvf_tls_opts_t *o)
{
    return o && o->enable;
}

const kvf_tls_opts_t *kvf__tls_opts_resolve(const kvf_tls_opts_t *o, kvf_tls_opts_t *env)
{
    if (o)
        return o->enable ? o : NULL;
    kvf_tls_opts_init(env);
    static const struct {
        const char *name;
        size_t off;
    } vars[] = {
        {"KVFERRY_TLS_CA_FILE", offsetof(kvf_tls_opts_t, ca_file)},
        {"KVFERRY_TLS_CA_PATH", offsetof(kvf_tls_opts_t, ca_path)},
        {"KVFERRY_TLS_CERT", offsetof(kvf_tls_opts_t, cert_file)},
        {"KVFERRY_TLS_KEY", offsetof(kvf_tls_opts_t, key_file)},
        {"KVFERRY_TLS_KEY_PASSWORD_FILE", offsetof(kvf_tls_opts_t, key_password_file)},
        {"KVFERRY_TLS_CRL_FILE", offsetof(kvf_tls_opts_t, crl_file)},
        {"KVFERRY_TLS_CRL_PATH", offsetof(kvf_tls_opts_t, crl_path)},
        {"KVFERRY_TLS_SERVER_NAME", offsetof(kvf_tls_opts_t, server_name)},
        {"KVFERRY_TLS_FINGERPRINT", offsetof(kvf_tls_opts_t, fingerprint)},
    };
    const char *on = getenv("KVFERRY_TLS");
    env->enable = on && *on && strcmp(on, "0") != 0;
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        const char *v = getenv(vars[i].name);
        if (v && *v) {
            *(const char **)(void *)((char *)env + vars[i].off) = v;
            env->enable = 1;
        }
    }
    return env->enable ? env : NULL;
}

int kvf__tls_data_resolve(const kvf_tls_opts_t *data, const kvf_tls_opts_t *store,
                          kvf_tls_opts_t *env, const kvf_tls_opts_t **out)
{
    *out = NULL;
    if (data) {
        *out = data->enable ? data : NULL;
        return 0;
    }
    const char *on = getenv("KVFERRY_TLS_DATA");
    if (!on || !*on || strcmp(on, "0") == 0)
        return 0;
    *out = kvf__tls_opts_resolve(store, env);
    if (!*out)
        return kvf__err(-KVF_EINVAL,
                        "KVFERRY_TLS_DATA=%s asks for TLS on data connections, but no TLS options "
                        "are set (config.tls or the KVFERRY_TLS_* variables: --tls-cert, "
                        "--tls-key, --tls-ca-file)",
                        on);
    return 0;
}

void kvf_tls_opts_init(kvf_tls_opts_t *opts)
{
    if (!opts)
        return;
    memset(opts, 0, sizeof(*opts));
    opts->size = sizeof(*opts);
}

static bool set(const char *s)
{
    return s && *s;
}

/* OpenSSL's reason for the last failure on this thread ("bad decrypt"), the queue cleared. */
void kvf__tls_ossl_reason(char *buf, size_t n)
{
    unsigned long e, last = 0;
    while ((e = ERR_get_error()) != 0)
        last = e;
    const char *r = last ? ERR_reason_error_string(last) : NULL;
    snprintf(buf, n, "%s", r ? r : "unknown OpenSSL error");
}

/* ---- the context ------------------------------------------------------------------------------ */

/* Check that @path names a readable file (or directory, @dir). */
static int path_check(const char *what, const char *path, bool dir)
{
    struct stat sb;
    if (stat(path, &sb) < 0)
        return kvf__err(-errno, "TLS %s %s: %s", what, path, strerror(errno));
    if (dir != !!S_ISDIR(sb.st_mode))
        return kvf__err(-KVF_EINVAL, "TLS %s %s: not a %s", what, path,
                        dir ? "directory" : "regular file");
    if (access(path, dir ? (R_OK | X_OK) : R_OK) < 0)
        return kvf__err(-errno, "TLS %s %s: %s", what, path, strerror(errno));
    return 0;
}

/* Split the comma-separated @list into @items (copies in @buf); returns their count or an error. */
static int list_split(const char *what, const char *list, char *buf, size_t buflen,
                      const char **items)
{
    if (strlen(list) >= buflen)
        return kvf__err(-KVF_EINVAL, "TLS %s list of %zu characters is too long", what,
                        strlen(list));
    memcpy(buf, list, strlen(list) + 1);
    int n = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ')
            tok++;
        if (!*tok)
            continue;
        if (n == TLS_LIST_MAX)
            return kvf__err(-KVF_EINVAL, "TLS %s list %s: more than %d files", what, list,
                            TLS_LIST_MAX);
        items[n++] = tok;
    }
    if (n == 0)
        return kvf__err(-KVF_EINVAL, "TLS %s list \"%s\" names no file", what, list);
    return n;
}

int kvf__tls_fp_parse(const char *s, uint8_t out[32])
{
    const char *p = s;
    if (strncasecmp(p, "sha256:", 7) == 0)
        p += 7;
    size_t nib = 0;
    for (; *p; p++) {
        if (*p == ':')
            continue;
        int v = kvf__hexval((unsigned char)*p);
        if (v < 0 || nib == 64)
            goto bad;
        out[nib / 2] = (uint8_t)(nib % 2 ? (out[nib / 2] << 4) | v : v);
        nib++;
    }
    if (nib == 64)
        return 0;
bad:
    return kvf__err(-KVF_EINVAL,
                    "TLS fingerprint %.100s: not a SHA-256 fingerprint (64 hex digits, colons "
                    "allowed)",
                    s);
}

typedef struct {
    const char *pw;
    bool asked;
} pw_arg_t;

static int pw_cb(char *buf, int size, int rwflag, void *u)
{
    pw_arg_t *a = u;
    a->asked = true;
    if (!a->pw)
        return -1;
    size_t n = strlen(a->pw);
    if (n >= (size_t)size)
        return -1;
    memcpy(buf, a->pw, n);
    return (int)n;
}

/* The key's password from the options: key_password, or the first line of key_password_file. */
static int password_load(const kvf_tls_opts_t *o, char *pw, size_t n, bool *have)
{
    *have = false;
    if (set(o->key_password)) {
        if (strlen(o->key_password) >= n)
            return kvf__err(-KVF_EINVAL, "TLS key password of %zu bytes is too long",
                            strlen(o->key_password));
        memcpy(pw, o->key_password, strlen(o->key_password) + 1);
        *have = true;
        return 0;
    }
    if (!set(o->key_password_file))
        return 0;
    int rc = path_check("key password file", o->key_password_file, false);
    if (rc < 0)
        return rc;
    FILE *f = fopen(o->key_password_file, "re");
    if (!f)
        return kvf__err(-errno, "TLS key password file %s: %s", o->key_password_file,
                        strerror(errno));
    if (!fgets(pw, (int)n, f))
        pw[0] = '\0';
    fclose(f);
    pw[strcspn(pw, "\r\n")] = '\0';
    *have = true;
    return 0;
}

static int key_load(SSL_CTX *ctx, const kvf_tls_opts_t *o)
{
    char pw[1024], reason[160];
    bool have_pw;
    const char *what = set(o->key_file) ? o->key_file : "(given as PEM text)";
    int rc = password_load(o, pw, sizeof(pw), &have_pw);
    if (rc < 0)
        return rc;
    BIO *bio;
    if (set(o->key_file)) {
        rc = path_check("private key", o->key_file, false);
        if (rc < 0)
            goto out_wipe;
        bio = BIO_new_file(o->key_file, "r");
    } else {
        bio = BIO_new_mem_buf(o->key_pem, -1);
    }
    if (!bio) {
        kvf__tls_ossl_reason(reason, sizeof(reason));
        rc = kvf__err(-KVF_ETLS, "TLS private key %s: %s", what, reason);
        goto out_wipe;
    }
    pw_arg_t arg = {.pw = have_pw ? pw : NULL, .asked = false};
    ERR_clear_error();
    EVP_PKEY *pk = PEM_read_bio_PrivateKey(bio, NULL, pw_cb, &arg);
    BIO_free(bio);
    if (!pk) {
        kvf__tls_ossl_reason(reason, sizeof(reason));
        if (arg.asked && !have_pw)
            rc = kvf__err(-KVF_ETLS,
                          "TLS private key %s is encrypted and no password is set "
                          "(key_password_file, --tls-key-password-file)",
                          what);
        else if (arg.asked)
            rc = kvf__err(-KVF_ETLS, "wrong password for the TLS private key %s (%s)", what,
                          reason);
        else
            rc = kvf__err(-KVF_ETLS, "TLS private key %s: no PEM private key in it (%s)", what,
                          reason);
        goto out_wipe;
    }
    if (SSL_CTX_use_PrivateKey(ctx, pk) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
        kvf__tls_ossl_reason(reason, sizeof(reason));
        rc = kvf__err(-KVF_ETLS, "TLS private key %s does not match the certificate %s (%s)", what,
                      o->cert_file, reason);
    }
    EVP_PKEY_free(pk);
out_wipe:
    OPENSSL_cleanse(pw, sizeof(pw));
    return rc;
}

static int new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
    kvf_tls_t *t = SSL_get_app_data(ssl);
    if (t)
        t->confirmed = true;
    return 0; /* not kept: sessions are never resumed */
}

/* Chain errors a pinned fingerprint makes irrelevant (no CA is configured to build a chain). */
static bool chain_error(int err)
{
    return err == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY ||
           err == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT ||
           err == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT ||
           err == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN ||
           err == X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE || err == X509_V_ERR_CERT_UNTRUSTED;
}

int kvf__tls_pin_verify(int ok, struct x509_store_ctx_st *xs, bool has_ca, const uint8_t fp[32],
                        char *why, size_t whylen)
{
    if (!ok && !has_ca && !chain_error(X509_STORE_CTX_get_error(xs)))
        return 0;
    if (X509_STORE_CTX_get_error_depth(xs) > 0)
        return has_ca ? ok : 1;
    X509 *cert = X509_STORE_CTX_get_current_cert(xs);
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    if (!cert || X509_digest(cert, EVP_sha256(), md, &n) != 1 || n != 32 ||
        CRYPTO_memcmp(md, fp, 32) != 0) {
        char hex[65] = "?";
        for (unsigned i = 0; i < n && i < 32; i++)
            snprintf(hex + 2 * i, 3, "%02x", md[i]);
        snprintf(why, whylen,
                 "the server certificate's SHA-256 fingerprint %s is not the one configured", hex);
        X509_STORE_CTX_set_error(xs, X509_V_ERR_APPLICATION_VERIFICATION);
        return 0;
    }
    if (!has_ca)
        X509_STORE_CTX_set_error(xs, X509_V_OK);
    return has_ca ? ok : 1;
}

static int verify_cb(int ok, X509_STORE_CTX *xs)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
    kvf_tls_t *t = ssl ? SSL_get_app_data(ssl) : NULL;
    if (!t || !t->ctx->has_fp)
        return ok;
    return kvf__tls_pin_verify(ok, xs, t->ctx->has_ca, t->ctx->fp, t->fp_why, sizeof(t->fp_why));
}

static int ctx_setup(kvf_tls_ctx_t *c, const kvf_tls_opts_t *o)
{
    SSL_CTX *ctx = c->ctx;
    char buf[4096], reason[160];
    const char *items[TLS_LIST_MAX];
    int rc, n;

    if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1)
        return kvf__err(-KVF_ETLS, "TLS: cannot require TLS 1.3");
    /* AES-128-GCM first: as safe for this use and faster (AES-NI) than OpenSSL's default first
     * choice, AES-256-GCM; the data path's cost is mostly this cipher (docs/performance.md). */
    if (SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                      "TLS_CHACHA20_POLY1305_SHA256") != 1)
        return kvf__err(-KVF_ETLS, "TLS: cannot set the TLS 1.3 cipher suites");
    /* Read what the socket has (up to 64 KiB) in one system call, not each record's 5-byte
     * header and then its body: kvf__tls_pending() tells the callers. */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, 64u << 10);
    /* No automatic chain: a root is never sent (the peer must trust it already), so a client
     * with another CA is told "unable to get local issuer certificate". */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_NO_AUTO_CHAIN);
    /* The protocols are length-framed, so an end without close_notify truncates nothing. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);

    if (set(o->ca_file)) {
        if ((n = list_split("CA file", o->ca_file, buf, sizeof(buf), items)) < 0)
            return n;
        for (int i = 0; i < n; i++) {
            if ((rc = path_check("CA file", items[i], false)) < 0)
                return rc;
            if (SSL_CTX_load_verify_locations(ctx, items[i], NULL) != 1) {
                kvf__tls_ossl_reason(reason, sizeof(reason));
                return kvf__err(-KVF_ETLS, "TLS CA file %s: no PEM certificate in it (%s)",
                                items[i], reason);
            }
        }
        c->has_ca = true;
    }
    if (set(o->ca_path)) {
        if ((rc = path_check("CA directory", o->ca_path, true)) < 0)
            return rc;
        if (SSL_CTX_load_verify_locations(ctx, NULL, o->ca_path) != 1) {
            kvf__tls_ossl_reason(reason, sizeof(reason));
            return kvf__err(-KVF_ETLS, "TLS CA directory %s: %s", o->ca_path, reason);
        }
        c->has_ca = true;
    }
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    if (set(o->crl_file)) {
        if ((n = list_split("CRL file", o->crl_file, buf, sizeof(buf), items)) < 0)
            return n;
        X509_LOOKUP *lk = X509_STORE_add_lookup(store, X509_LOOKUP_file());
        for (int i = 0; i < n; i++) {
            if ((rc = path_check("CRL file", items[i], false)) < 0)
                return rc;
            if (!lk || X509_load_crl_file(lk, items[i], X509_FILETYPE_PEM) <= 0) {
                kvf__tls_ossl_reason(reason, sizeof(reason));
                return kvf__err(-KVF_ETLS, "TLS CRL file %s: no PEM CRL in it (%s)", items[i],
                                reason);
            }
        }
    }
    if (set(o->crl_path)) {
        if ((rc = path_check("CRL directory", o->crl_path, true)) < 0)
            return rc;
        if (X509_STORE_load_path(store, o->crl_path) != 1) {
            kvf__tls_ossl_reason(reason, sizeof(reason));
            return kvf__err(-KVF_ETLS, "TLS CRL directory %s: %s", o->crl_path, reason);
        }
    }
    if (set(o->crl_file) || set(o->crl_path))
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);

    if (set(o->cert_file)) {
        if ((rc = path_check("certificate", o->cert_file, false)) < 0)
            return rc;
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert_file) != 1) {
            kvf__tls_ossl_reason(reason, sizeof(reason));
            return kvf__err(-KVF_ETLS, "TLS certificate %s: %s", o->cert_file, reason);
        }
        if (!set(o->key_file) && !set(o->key_pem))
            return kvf__err(-KVF_EINVAL, "TLS certificate %s is set without its private key "
                                         "(key_file, --tls-key)",
                            o->cert_file);
        if ((rc = key_load(ctx, o)) < 0)
            return rc;
    } else if (set(o->key_file) || set(o->key_pem)) {
        return kvf__err(-KVF_EINVAL, "TLS private key %s is set without its certificate "
                                     "(cert_file, --tls-cert)",
                        set(o->key_file) ? o->key_file : "(PEM text)");
    }

    if (c->server) {
        if (!set(o->cert_file))
            return kvf__err(-KVF_EINVAL, "a TLS store server needs a certificate and its key "
                                         "(cert_file and key_file, --tls-cert and --tls-key)");
        SSL_CTX_set_verify(ctx, c->has_ca ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
                                          : SSL_VERIFY_NONE,
                           NULL);
        /* One ticket after the handshake: the message that tells a client it was accepted. */
        SSL_CTX_set_num_tickets(ctx, 1);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        return 0;
    }
    if (set(o->fingerprint)) {
        if ((rc = kvf__tls_fp_parse(o->fingerprint, c->fp)) < 0)
            return rc;
        c->has_fp = true;
    }
    if (!c->has_ca && !c->has_fp && SSL_CTX_set_default_verify_paths(ctx) != 1) {
        kvf__tls_ossl_reason(reason, sizeof(reason));
        return kvf__err(-KVF_ETLS, "TLS: cannot load the system's CA certificates (%s)", reason);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, verify_cb);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, new_session_cb);
    return 0;
}

int kvf__tls_ctx_new(const kvf_tls_opts_t *o, bool server, const char *host, kvf_tls_ctx_t **out)
{
    *out = NULL;
    if (o->size < sizeof(kvf_tls_opts_t))
        return kvf__err(-KVF_EINVAL, "TLS options: size %zu, expected %zu (use kvf_tls_opts_init)",
                        o->size, sizeof(kvf_tls_opts_t));
    kvf_tls_ctx_t *c = calloc(1, sizeof(*c));
    if (!c)
        return kvf__err(-KVF_ENOMEM, "TLS: out of memory");
    c->server = server;
    snprintf(c->peer, sizeof(c->peer), "store");
    const char *name = set(o->server_name) ? o->server_name : host;
    if (!server && name) {
        if (strlen(name) >= sizeof(c->name)) {
            free(c);
            return kvf__err(-KVF_EINVAL, "TLS server name of %zu characters is too long",
                            strlen(name));
        }
        snprintf(c->name, sizeof(c->name), "%s", name);
        uint8_t a[16];
        c->name_is_ip =
            inet_pton(AF_INET, name, a) == 1 || inet_pton(AF_INET6, name, a) == 1;
    }
    ERR_clear_error();
    c->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    int rc = c->ctx ? ctx_setup(c, o) : kvf__err(-KVF_ENOMEM, "TLS: out of memory");
    if (rc < 0) {
        kvf__tls_ctx_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void kvf__tls_ctx_set_peer(kvf_tls_ctx_t *c, const char *peer)
{
    snprintf(c->peer, sizeof(c->peer), "%s", peer);
}

void kvf__tls_ctx_free(kvf_tls_ctx_t *c)
{
    if (!c)
        return;
    SSL_CTX_free(c->ctx);
    free(c);
}

int kvf_tls_opts_check(const kvf_tls_opts_t *opts, int server)
{
    if (!kvf__tls_on(opts))
        return 0;
    kvf_tls_ctx_t *c;
    int rc = kvf__tls_ctx_new(opts, server != 0, NULL, &c);
    kvf__tls_ctx_free(c);
    return rc;
}
