/*
 * TLS of the etcd backend (https to every endpoint): the store's TLS options checked and copied
 * at open, then set on each curl handle before a request or a watch stream. A pinned fingerprint
 * is checked by an OpenSSL verify callback installed on curl's SSL_CTX (so libcurl must use the
 * OpenSSL kvferry links with; checked at open); a server name becomes the host of the request's
 * URL (curl's SNI and name check) while CURLOPT_CONNECT_TO sends the connection to the endpoint's
 * own address. The meaning is the built-in store's (include/kvferry.h, kvf_tls_opts_t). See
 * etcd.h.
 */
#include <curl/curl.h>
#include <openssl/opensslv.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/tls.h"
#include "store/etcd.h"

static bool set(const char *s)
{
    return s && *s;
}

static int tls_dup(char **dst, const char *src)
{
    if (!set(src))
        return 0;
    *dst = strdup(src);
    return *dst ? 0 : -KVF_ENOMEM;
}

/* ---- the pinned fingerprint ------------------------------------------------------------------ */

/* The SSL_CTX slot that carries a request's etcd_tls_call_t to the verify callback. */
static pthread_once_t g_slot_once = PTHREAD_ONCE_INIT;
static int g_slot = -1;

static void slot_init(void)
{
    g_slot = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

/* Why libcurl's SSL_CTX cannot take kvferry's verify callback, into @buf; NULL when it can: it
 * must be OpenSSL, of the major version kvferry runs with (the same library, in practice). */
static const char *curl_not_openssl(char *buf, size_t n)
{
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
    const char *s = v && v->ssl_version ? v->ssl_version : "";
    if (strncmp(s, "OpenSSL/", 8) != 0) {
        snprintf(buf, n, "libcurl is built with %s, not OpenSSL, and only OpenSSL lets kvferry "
                         "check the certificate itself",
                 *s ? s : "no TLS library");
        return buf;
    }
    unsigned long mine = OpenSSL_version_num() >> 28;
    if (strtoul(s + 8, NULL, 10) != mine) {
        snprintf(buf, n, "libcurl uses %s but kvferry runs with OpenSSL %lu.x", s, mine);
        return buf;
    }
    return NULL;
}

/* OpenSSL's verify callback with a pin (common/tls.h, as the built-in store's client checks
 * one): the handshake ends at a certificate without the pinned SHA-256, and the call says why. */
static int pin_verify(int ok, X509_STORE_CTX *xs)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
    etcd_tls_call_t *call = ssl ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), g_slot) : NULL;
    if (!call)
        return 0; /* never skip the pin */
    return kvf__tls_pin_verify(ok, xs, call->e->tls_has_ca, call->e->tls_fp, call->why,
                               sizeof(call->why));
}

/* CURLOPT_SSL_CTX_FUNCTION: called on each new connection, before its handshake, with a fresh
 * SSL_CTX; @arg is the request's etcd_tls_call_t, alive until its perform returns (a connection
 * is verified only during the perform that opened it). */
static CURLcode on_ssl_ctx(CURL *curl, void *ssl_ctx, void *arg)
{
    (void)curl;
    SSL_CTX *ctx = ssl_ctx;
    if (g_slot < 0 || SSL_CTX_set_ex_data(ctx, g_slot, arg) != 1)
        return CURLE_OUT_OF_MEMORY;
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, pin_verify);
    return CURLE_OK;
}

/* ---- setup ----------------------------------------------------------------------------------- */

int kvf__etcd_tls_setup(etcd_t *e, const kvf_tls_opts_t *o, const char *host)
{
    kvf_tls_ctx_t *ctx = NULL;
    int rc = kvf__tls_ctx_new(o, false, host, &ctx);
    kvf__tls_ctx_free(ctx);
    if (rc < 0)
        return kvf__err_wrap(rc, "store %s", e->url);
    const char *no = set(o->crl_path)                          ? "a CRL directory (--tls-crl-path)"
                     : o->ca_file && strchr(o->ca_file, ',')   ? "several CA files"
                     : o->crl_file && strchr(o->crl_file, ',') ? "several CRL files"
                                                               : NULL;
    if (no)
        return kvf__err(-KVF_ENOTSUP,
                        "store %s: etcd over https does not take %s: give one CA file (or a CA "
                        "directory) and at most one CRL file",
                        e->url, no);
    if (set(o->fingerprint)) {
        char why[200];
        if (curl_not_openssl(why, sizeof(why)))
            return kvf__err(-KVF_ENOTSUP,
                            "store %s: etcd over https cannot pin a fingerprint "
                            "(--tls-fingerprint): %s",
                            e->url, why);
        if ((rc = kvf__tls_fp_parse(o->fingerprint, e->tls_fp)) < 0)
            return kvf__err_wrap(rc, "store %s", e->url);
        pthread_once(&g_slot_once, slot_init);
        if (g_slot < 0)
            return kvf__err(-KVF_ENOMEM, "store %s: out of memory", e->url);
        e->tls_pin = true;
    }
    char pw[1024] = "";
    if (set(o->key_password)) {
        snprintf(pw, sizeof(pw), "%s", o->key_password);
    } else if (set(o->key_password_file)) {
        FILE *f = fopen(o->key_password_file, "re");
        if (f) {
            if (!fgets(pw, sizeof(pw), f))
                pw[0] = '\0';
            fclose(f);
        }
        pw[strcspn(pw, "\r\n")] = '\0';
    }
    e->tls = true;
    e->tls_has_ca = set(o->ca_file) || set(o->ca_path);
    if (tls_dup(&e->tls_ca, o->ca_file) || tls_dup(&e->tls_capath, o->ca_path) ||
        tls_dup(&e->tls_cert, o->cert_file) || tls_dup(&e->tls_key, o->key_file) ||
        tls_dup(&e->tls_key_pem, o->key_pem) || tls_dup(&e->tls_key_pw, pw) ||
        tls_dup(&e->tls_crl, o->crl_file) || tls_dup(&e->tls_name, o->server_name))
        rc = kvf__err(-KVF_ENOMEM, "store %s: out of memory", e->url);
    explicit_bzero(pw, sizeof(pw));
    return rc;
}

void kvf__etcd_tls_free(etcd_t *e)
{
    char **all[] = {&e->tls_ca,      &e->tls_capath, &e->tls_cert, &e->tls_key,
                    &e->tls_key_pem, &e->tls_key_pw, &e->tls_crl,  &e->tls_name};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        if (*all[i])
            explicit_bzero(*all[i], strlen(*all[i]));
        free(*all[i]);
        *all[i] = NULL;
    }
}

/* ---- per request ----------------------------------------------------------------------------- */

static void curl_tls(etcd_t *e, CURL *c, etcd_tls_call_t *call)
{
    curl_easy_setopt(c, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    /* A pin without a CA: the chain is not curl's to check (pin_verify checks the rest). A pin
     * makes the name irrelevant, as for the built-in store. */
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, e->tls_pin && !e->tls_has_ca ? 0L : 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, e->tls_pin ? 0L : 2L);
    if (e->tls_pin) {
        curl_easy_setopt(c, CURLOPT_SSL_CTX_FUNCTION, on_ssl_ctx);
        curl_easy_setopt(c, CURLOPT_SSL_CTX_DATA, call);
    }
    if (e->tls_ca)
        curl_easy_setopt(c, CURLOPT_CAINFO, e->tls_ca);
    if (e->tls_capath)
        curl_easy_setopt(c, CURLOPT_CAPATH, e->tls_capath);
    if (e->tls_cert)
        curl_easy_setopt(c, CURLOPT_SSLCERT, e->tls_cert);
    if (e->tls_key)
        curl_easy_setopt(c, CURLOPT_SSLKEY, e->tls_key);
    if (e->tls_key_pem) {
        struct curl_blob blob = {.data = e->tls_key_pem,
                                 .len = strlen(e->tls_key_pem),
                                 .flags = CURL_BLOB_COPY};
        curl_easy_setopt(c, CURLOPT_SSLKEY_BLOB, &blob);
    }
    if (e->tls_key_pw)
        curl_easy_setopt(c, CURLOPT_KEYPASSWD, e->tls_key_pw);
    if (e->tls_crl)
        curl_easy_setopt(c, CURLOPT_CRLFILE, e->tls_crl);
}

void kvf__etcd_curl_target(etcd_t *e, void *curl, const char *end, const char *path,
                           etcd_tls_call_t *call)
{
    CURL *c = curl;
    char url[2 * KVF_HOST_MAX + 64];
    memset(call, 0, sizeof(*call));
    call->e = e;
    if (e->tls_name) {
        /* https://NAME:PORT/path, connected to the endpoint's HOST:PORT. */
        const char *hp = strstr(end, "://");
        hp = hp ? hp + 3 : end;
        const char *port = strrchr(hp, ':');
        bool v6 = strchr(e->tls_name, ':') != NULL;
        snprintf(url, sizeof(url), "https://%s%s%s%s%s", v6 ? "[" : "", e->tls_name,
                 v6 ? "]" : "", port ? port : "", path);
        snprintf(call->conn_to, sizeof(call->conn_to), "::%s", hp);
        call->conn.data = call->conn_to;
        call->conn.next = NULL;
        curl_easy_setopt(c, CURLOPT_CONNECT_TO, &call->conn);
    } else {
        snprintf(url, sizeof(url), "%s%s", end, path);
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    if (e->tls)
        curl_tls(e, c, call);
}

const char *kvf__etcd_tls_why(const etcd_tls_call_t *call, const char *curl_says)
{
    return call->why[0] ? call->why : curl_says;
}

bool kvf__etcd_curl_tls_error(int code)
{
    switch (code) {
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_ENGINE_INITFAILED:
        return true;
    default:
        return false;
    }
}
