/*
 * TLS 1.3 for the store's connections over OpenSSL (see tls.h): the context (options read and
 * checked once, with errors naming the file or value), the sessions, and kvf_stream_t.
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

#define TLS_LIST_MAX 16 /* files in one comma-separated list */

struct kvf_tls_ctx {
    SSL_CTX *ctx;
    bool server;
    bool has_ca;
    bool has_fp;
    bool name_is_ip;
    uint8_t fp[32];
    char name[256]; /* client: the name the server's certificate must carry ("" none) */
};

struct kvf_tls {
    SSL *ssl;
    kvf_tls_ctx_t *ctx;
    short wants;       /* the handshake's wait */
    short rwants;      /* a read's wait after -EAGAIN (0: POLLIN) */
    short wwants;      /* a write's wait after -EAGAIN (0: POLLOUT) */
    bool confirmed;    /* client: the server's first post-handshake message arrived */
    char fp_why[200];  /* client: why the fingerprint check failed */
};

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
static void ossl_reason(char *buf, size_t n)
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

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int fp_parse(const char *s, uint8_t out[32])
{
    const char *p = s;
    if (strncasecmp(p, "sha256:", 7) == 0)
        p += 7;
    size_t nib = 0;
    for (; *p; p++) {
        if (*p == ':')
            continue;
        int v = hexval((unsigned char)*p);
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
        ossl_reason(reason, sizeof(reason));
        rc = kvf__err(-KVF_ETLS, "TLS private key %s: %s", what, reason);
        goto out_wipe;
    }
    pw_arg_t arg = {.pw = have_pw ? pw : NULL, .asked = false};
    ERR_clear_error();
    EVP_PKEY *pk = PEM_read_bio_PrivateKey(bio, NULL, pw_cb, &arg);
    BIO_free(bio);
    if (!pk) {
        ossl_reason(reason, sizeof(reason));
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
        ossl_reason(reason, sizeof(reason));
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

static int verify_cb(int ok, X509_STORE_CTX *xs)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
    kvf_tls_t *t = ssl ? SSL_get_app_data(ssl) : NULL;
    if (!t || !t->ctx->has_fp)
        return ok;
    if (!ok && !t->ctx->has_ca && !chain_error(X509_STORE_CTX_get_error(xs)))
        return 0;
    if (X509_STORE_CTX_get_error_depth(xs) > 0)
        return t->ctx->has_ca ? ok : 1;
    X509 *cert = X509_STORE_CTX_get_current_cert(xs);
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    if (!cert || X509_digest(cert, EVP_sha256(), md, &n) != 1 || n != 32 ||
        CRYPTO_memcmp(md, t->ctx->fp, 32) != 0) {
        char hex[65] = "?";
        for (unsigned i = 0; i < n && i < 32; i++)
            snprintf(hex + 2 * i, 3, "%02x", md[i]);
        snprintf(t->fp_why, sizeof(t->fp_why),
                 "the server certificate's SHA-256 fingerprint %s is not the one configured", hex);
        X509_STORE_CTX_set_error(xs, X509_V_ERR_APPLICATION_VERIFICATION);
        return 0;
    }
    if (!t->ctx->has_ca)
        X509_STORE_CTX_set_error(xs, X509_V_OK);
    return t->ctx->has_ca ? ok : 1;
}

static int ctx_setup(kvf_tls_ctx_t *c, const kvf_tls_opts_t *o)
{
    SSL_CTX *ctx = c->ctx;
    char buf[4096], reason[160];
    const char *items[TLS_LIST_MAX];
    int rc, n;

    if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1)
        return kvf__err(-KVF_ETLS, "TLS: cannot require TLS 1.3");
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
                ossl_reason(reason, sizeof(reason));
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
            ossl_reason(reason, sizeof(reason));
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
                ossl_reason(reason, sizeof(reason));
                return kvf__err(-KVF_ETLS, "TLS CRL file %s: no PEM CRL in it (%s)", items[i],
                                reason);
            }
        }
    }
    if (set(o->crl_path)) {
        if ((rc = path_check("CRL directory", o->crl_path, true)) < 0)
            return rc;
        if (X509_STORE_load_path(store, o->crl_path) != 1) {
            ossl_reason(reason, sizeof(reason));
            return kvf__err(-KVF_ETLS, "TLS CRL directory %s: %s", o->crl_path, reason);
        }
    }
    if (set(o->crl_file) || set(o->crl_path))
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);

    if (set(o->cert_file)) {
        if ((rc = path_check("certificate", o->cert_file, false)) < 0)
            return rc;
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert_file) != 1) {
            ossl_reason(reason, sizeof(reason));
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
        if ((rc = fp_parse(o->fingerprint, c->fp)) < 0)
            return rc;
        c->has_fp = true;
    }
    if (!c->has_ca && !c->has_fp && SSL_CTX_set_default_verify_paths(ctx) != 1) {
        ossl_reason(reason, sizeof(reason));
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

/* ---- sessions ------------------------------------------------------------------------------- */

/* Sends never raise SIGPIPE: OpenSSL's socket BIO with send(MSG_NOSIGNAL) for writing. */
static BIO_METHOD *nosig_method;
static pthread_once_t nosig_once = PTHREAD_ONCE_INIT;

static int nosig_write(BIO *b, const char *buf, int n)
{
    int fd = -1;
    BIO_get_fd(b, &fd);
    BIO_clear_retry_flags(b);
    ssize_t w = send(fd, buf, (size_t)(n > 0 ? n : 0), MSG_NOSIGNAL);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_write(b);
    return (int)w;
}

static void nosig_init(void)
{
    const BIO_METHOD *s = BIO_s_socket();
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                                 "kvferry socket");
    if (!m)
        return;
    if (BIO_meth_set_write(m, nosig_write) != 1 ||
        BIO_meth_set_read(m, BIO_meth_get_read(s)) != 1 ||
        BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(s)) != 1 ||
        BIO_meth_set_create(m, BIO_meth_get_create(s)) != 1 ||
        BIO_meth_set_destroy(m, BIO_meth_get_destroy(s)) != 1) {
        BIO_meth_free(m);
        return;
    }
    nosig_method = m;
}

kvf_tls_t *kvf__tls_new(kvf_tls_ctx_t *c, int fd)
{
    pthread_once(&nosig_once, nosig_init);
    kvf_tls_t *t = calloc(1, sizeof(*t));
    if (!t || !nosig_method)
        goto out_free;
    t->ctx = c;
    t->ssl = SSL_new(c->ctx);
    BIO *bio = BIO_new(nosig_method);
    if (!t->ssl || !bio) {
        BIO_free(bio);
        goto out_free;
    }
    BIO_set_fd(bio, fd, BIO_NOCLOSE);
    SSL_set_bio(t->ssl, bio, bio);
    SSL_set_app_data(t->ssl, t);
    if (c->server) {
        SSL_set_accept_state(t->ssl);
        return t;
    }
    SSL_set_connect_state(t->ssl);
    if (c->name[0] && !c->name_is_ip && SSL_set_tlsext_host_name(t->ssl, c->name) != 1)
        goto out_free;
    if (c->name[0] && !c->has_fp) {
        int ok = c->name_is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), c->name)
                               : SSL_set1_host(t->ssl, c->name);
        if (ok != 1)
            goto out_free;
    }
    return t;

out_free:
    kvf__tls_free(t);
    return NULL;
}

void kvf__tls_free(kvf_tls_t *t)
{
    if (!t)
        return;
    SSL_free(t->ssl);
    free(t);
}

/* Why the handshake failed, from this side's certificate check, the fingerprint, or OpenSSL. */
static void hs_reason(kvf_tls_t *t, int ret, char *why, size_t whylen)
{
    long vr = SSL_get_verify_result(t->ssl);
    unsigned long e = ERR_peek_last_error();
    if (t->fp_why[0]) {
        snprintf(why, whylen, "%s", t->fp_why);
    } else if (vr != X509_V_OK && ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        snprintf(why, whylen, "the %s certificate failed verification: %s",
                 t->ctx->server ? "client" : "server", X509_verify_cert_error_string(vr));
    } else if (e) {
        char reason[160];
        ossl_reason(reason, sizeof(reason));
        snprintf(why, whylen, "%s%s", reason,
                 strstr(reason, "wrong version number") || strstr(reason, "http request") ||
                         strstr(reason, "record layer failure")
                     ? " (the peer does not speak TLS)"
                     : "");
    } else if (ret == 0 || SSL_get_error(t->ssl, ret) == SSL_ERROR_ZERO_RETURN ||
               SSL_get_error(t->ssl, ret) == SSL_ERROR_SYSCALL) {
        snprintf(why, whylen, "the %s closed the connection during the TLS handshake%s",
                 t->ctx->server ? "client" : "store",
                 t->ctx->server ? "" : " (does the store use TLS?)");
    } else {
        snprintf(why, whylen, "TLS error %d", SSL_get_error(t->ssl, ret));
    }
    ERR_clear_error();
}

int kvf__tls_handshake_step(kvf_tls_t *t, char *why, size_t whylen)
{
    ERR_clear_error();
    int r = SSL_do_handshake(t->ssl);
    if (r == 1)
        return 1;
    int e = SSL_get_error(t->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        t->wants = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        return 0;
    }
    hs_reason(t, r, why, whylen);
    return -KVF_ETLS;
}

static int wait_for(int fd, short ev, uint64_t deadline_ms)
{
    for (;;) {
        uint64_t now = kvf__now_ms();
        if (now >= deadline_ms)
            return -KVF_ETIMEDOUT;
        uint64_t left = deadline_ms - now;
        struct pollfd p = {.fd = fd, .events = ev};
        int n = poll(&p, 1, left > INT_MAX ? INT_MAX : (int)left);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return -errno;
    }
}

int kvf__tls_connect(kvf_tls_t *t, uint64_t deadline_ms, char *why, size_t whylen)
{
    int fd = SSL_get_fd(t->ssl);
    int rc;
    while ((rc = kvf__tls_handshake_step(t, why, whylen)) == 0)
        if ((rc = wait_for(fd, t->wants, deadline_ms)) < 0)
            goto out_wait;
    if (rc < 0)
        return rc;
    /* TLS 1.3 ends the client's handshake before the server has checked the client's
     * certificate. The server's ticket says it accepted; an alert says why it did not. */
    while (!t->confirmed) {
        uint8_t b;
        ERR_clear_error();
        int r = SSL_peek(t->ssl, &b, 1);
        if (r > 0)
            break; /* the server spoke: it accepted this client */
        int e = SSL_get_error(t->ssl, r);
        if (t->confirmed)
            break;
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            if ((rc = wait_for(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline_ms)) < 0)
                goto out_wait;
            continue;
        }
        char reason[160];
        if (ERR_peek_last_error()) {
            ossl_reason(reason, sizeof(reason));
            snprintf(why, whylen, "the store refused this client: %s", reason);
        } else {
            snprintf(why, whylen, "the store closed the connection after the TLS handshake");
        }
        return -KVF_ETLS;
    }
    return 0;

out_wait:
    snprintf(why, whylen, "%s",
             rc == -KVF_ETIMEDOUT ? "no TLS handshake within the time limit" : kvf_strerror(rc));
    return rc == -KVF_ETIMEDOUT ? rc : -KVF_ETLS;
}

short kvf__tls_wants(const kvf_tls_t *t)
{
    return t->wants ? t->wants : POLLIN;
}

bool kvf__tls_pending(const kvf_tls_t *t)
{
    return SSL_pending(t->ssl) > 0;
}

/* ---- streams -------------------------------------------------------------------------------- */

static ssize_t tls_io(kvf_stream_t *s, void *buf, size_t n, bool out, char *why, size_t whylen)
{
    kvf_tls_t *t = s->tls;
    size_t done = 0;
    ERR_clear_error();
    short *w = out ? &t->wwants : &t->rwants;
    int r = out ? SSL_write_ex(t->ssl, buf, n, &done) : SSL_read_ex(t->ssl, buf, n, &done);
    if (r == 1) {
        *w = 0;
        return (ssize_t)done;
    }
    int e = SSL_get_error(t->ssl, 0);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        *w = POLLIN;
        return -EAGAIN;
    case SSL_ERROR_WANT_WRITE:
        *w = POLLOUT;
        return -EAGAIN;
    case SSL_ERROR_ZERO_RETURN:
        if (out && why)
            snprintf(why, whylen, "send: the peer closed the TLS session");
        return out ? -EPIPE : 0;
    case SSL_ERROR_SYSCALL: {
        int err = errno ? errno : EPIPE;
        if (why)
            snprintf(why, whylen, "%s: %s", out ? "send" : "recv", strerror(err));
        ERR_clear_error();
        return err == ECONNRESET ? -EPIPE : -err;
    }
    default:
        if (why) {
            char reason[160];
            ossl_reason(reason, sizeof(reason));
            snprintf(why, whylen, "TLS: %s", reason);
        }
        ERR_clear_error();
        return -KVF_ETLS;
    }
}

ssize_t kvf__stream_recv(kvf_stream_t *s, void *buf, size_t n, char *why, size_t whylen)
{
    if (s->tls)
        return tls_io(s, buf, n, false, why, whylen);
    for (;;) {
        ssize_t r = recv(s->fd, buf, n, MSG_DONTWAIT);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno == EWOULDBLOCK)
            return -EAGAIN;
        if (why)
            snprintf(why, whylen, "recv: %s", strerror(errno));
        return -errno;
    }
}

ssize_t kvf__stream_send(kvf_stream_t *s, const void *buf, size_t n, char *why, size_t whylen)
{
    if (s->tls)
        return tls_io(s, (void *)buf, n, true, why, whylen);
    for (;;) {
        ssize_t w = send(s->fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w >= 0)
            return w;
        if (errno == EINTR)
            continue;
        if (errno == EWOULDBLOCK)
            return -EAGAIN;
        if (why)
            snprintf(why, whylen, "send: %s", strerror(errno));
        return -errno;
    }
}

short kvf__stream_wants(const kvf_stream_t *s, bool out)
{
    short w = s->tls ? (out ? s->tls->wwants : s->tls->rwants) : 0;
    return w ? w : (out ? POLLOUT : POLLIN);
}

bool kvf__stream_pending(const kvf_stream_t *s)
{
    return s->tls && kvf__tls_pending(s->tls);
}

int kvf__stream_io(kvf_stream_t *s, void *buf, size_t len, bool out, uint64_t deadline_ms)
{
    uint8_t *p = buf;
    size_t done = 0;
    while (done < len) {
        ssize_t r = out ? kvf__stream_send(s, p + done, len - done, NULL, 0)
                        : kvf__stream_recv(s, p + done, len - done, NULL, 0);
        if (r > 0) {
            done += (size_t)r;
            continue;
        }
        if (r == 0)
            return -EPIPE;
        if (r != -EAGAIN)
            return r == -ECONNRESET ? -EPIPE : (int)r;
        int rc = wait_for(s->fd, kvf__stream_wants(s, out), deadline_ms);
        if (rc < 0)
            return rc;
    }
    return 0;
}
