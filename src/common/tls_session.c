/*
 * TLS 1.3 over OpenSSL (see tls.h): one session per connection (a socket BIO that never raises
 * SIGPIPE, the handshake driven without blocking, the client's wait for the server's acceptance)
 * and kvf_stream_t, a connection plain or TLS behind one interface.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <arpa/inet.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "common/common.h"
#include "common/tls.h"
#include "common/tls_private.h"

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
    return kvf__tls_new_for(c, fd, NULL);
}

kvf_tls_t *kvf__tls_new_for(kvf_tls_ctx_t *c, int fd, const char *name)
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
    bool is_ip = c->name_is_ip;
    if (name && *name && !c->name[0]) {
        uint8_t a[16];
        is_ip = inet_pton(AF_INET, name, a) == 1 || inet_pton(AF_INET6, name, a) == 1;
    } else {
        name = c->name;
    }
    if (name[0] && !is_ip && SSL_set_tlsext_host_name(t->ssl, name) != 1)
        goto out_free;
    if (name[0] && !c->has_fp) {
        int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), name)
                       : SSL_set1_host(t->ssl, name);
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
        kvf__tls_ossl_reason(reason, sizeof(reason));
        snprintf(why, whylen, "%s%s", reason,
                 strstr(reason, "wrong version number") || strstr(reason, "http request") ||
                         strstr(reason, "record layer failure")
                     ? " (the peer does not speak TLS)"
                     : "");
    } else if (ret == 0 || SSL_get_error(t->ssl, ret) == SSL_ERROR_ZERO_RETURN ||
               SSL_get_error(t->ssl, ret) == SSL_ERROR_SYSCALL) {
        snprintf(why, whylen, "the %s closed the connection during the TLS handshake%s%s%s",
                 t->ctx->server ? "client" : t->ctx->peer, t->ctx->server ? "" : " (does the ",
                 t->ctx->server ? "" : t->ctx->peer, t->ctx->server ? "" : " use TLS?)");
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
            kvf__tls_ossl_reason(reason, sizeof(reason));
            snprintf(why, whylen, "the %s refused this client: %s", t->ctx->peer, reason);
        } else {
            snprintf(why, whylen, "the %s closed the connection after the TLS handshake",
                     t->ctx->peer);
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
    /* Read ahead, the session may hold whole records not yet decrypted, which SSL_pending()
     * does not count. */
    return SSL_has_pending(t->ssl) == 1;
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
            kvf__tls_ossl_reason(reason, sizeof(reason));
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
