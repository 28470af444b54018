/*
 * What tls.c (the context) and tls_session.c (sessions and streams) share; nothing else includes
 * this.
 */
#ifndef KVF_COMMON_TLS_PRIVATE_H
#define KVF_COMMON_TLS_PRIVATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "common/tls.h"

struct kvf_tls_ctx {
    SSL_CTX *ctx;
    bool server;
    bool has_ca;
    bool has_fp;
    bool name_is_ip;
    uint8_t fp[32];
    char name[256]; /* client: the name the server's certificate must carry ("" none) */
    char peer[16];  /* what the other end is, for messages: "store" (default) or "engine" */
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

/* OpenSSL's reason for the last failure on this thread ("bad decrypt"), the queue cleared. */
void kvf__tls_ossl_reason(char *buf, size_t n);

#endif /* KVF_COMMON_TLS_PRIVATE_H */
