/*
 * TLS 1.3 for the store's connections and the engines' data connections (docs/security.md),
 * over OpenSSL: a context built from the public kvf_tls_opts_t (certificates, key, CA, CRL, name
 * or fingerprint checks), one TLS session per connection driven without blocking, and
 * kvf_stream_t, the tiny I/O interface the store client, the store server, the tcp transport and
 * the authentication handshake use, so that a connection is plain or TLS without any #ifdef or
 * branch in their code.
 *
 * A TLS session is not safe for concurrent use: the callers serialise every call on one
 * session (the store client under its `mu`, the store server on its loop thread, a tcp
 * connection under its tls_mu or on its I/O thread).
 */
#ifndef KVF_COMMON_TLS_H
#define KVF_COMMON_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "kvferry.h"

/* The whole TLS handshake (and the client's wait for the server's acceptance) must be over
 * within this, as the secret's handshake is. */
#define KVF_TLS_HANDSHAKE_MS 3000u

/* The first byte of a TLS record carrying a handshake message (a ClientHello), and the major
 * version byte that follows it: how a plain server recognises a TLS client. */
#define KVF_TLS_RECORD_HANDSHAKE 0x16
#define KVF_TLS_RECORD_MAJOR     0x03

typedef struct kvf_tls_ctx kvf_tls_ctx_t;
typedef struct kvf_tls kvf_tls_t;

/* Whether @o asks for TLS (non-NULL with enable set). */
bool kvf__tls_on(const kvf_tls_opts_t *o);

/*
 * kvf__tls_opts_resolve - the options to use: @o when the caller gave some, else those of the
 * KVFERRY_TLS_* variables (KVFERRY_TLS=1, _CA_FILE, _CA_PATH, _CERT, _KEY, _KEY_PASSWORD_FILE,
 * _CRL_FILE, _CRL_PATH, _SERVER_NAME, _FINGERPRINT; any of them turns TLS on), filled into @env.
 * Returns the options, or NULL when TLS is off.
 */
const kvf_tls_opts_t *kvf__tls_opts_resolve(const kvf_tls_opts_t *o, kvf_tls_opts_t *env);

/*
 * kvf__tls_data_resolve - an engine's data TLS: @data when the caller gave it, else, when
 * KVFERRY_TLS_DATA is set (and not "0"), the store's options @store (or the KVFERRY_TLS_*
 * variables, into @env). Returns the options (NULL: no data TLS) in *@out, or -KVF_EINVAL when
 * KVFERRY_TLS_DATA asks for TLS that no option describes.
 */
int kvf__tls_data_resolve(const kvf_tls_opts_t *data, const kvf_tls_opts_t *store,
                          kvf_tls_opts_t *env, const kvf_tls_opts_t **out);

/* Parse a SHA-256 fingerprint (64 hex digits, colons and a "sha256:" prefix allowed) into
 * @out. Returns 0, or -KVF_EINVAL with a message naming it. */
int kvf__tls_fp_parse(const char *s, uint8_t out[32]);

/*
 * kvf__tls_pin_verify - the body of an OpenSSL verify callback for a pinned certificate (for
 * a context of this file, and for libcurl's, which etcd's client configures itself): the usual
 * checks, the chain to a root only when @has_ca, and the server's own certificate must have the
 * SHA-256 @fp, else @why says which fingerprint it has. Returns what the callback returns.
 */
struct x509_store_ctx_st;
int kvf__tls_pin_verify(int ok, struct x509_store_ctx_st *xs, bool has_ca, const uint8_t fp[32],
                        char *why, size_t whylen);

/*
 * kvf__tls_ctx_new - a context for clients (@server false) or a server from @o, which must be on.
 * @host: a client's default name to verify (the store URL's host); ignored for a server.
 * Everything is read and checked here, so a bad file or password fails now, naming it.
 * Returns 0 with *@out set, or a negative code with the last-error set (without a prefix: the
 * caller wraps it with the object it belongs to).
 */
int kvf__tls_ctx_new(const kvf_tls_opts_t *o, bool server, const char *host, kvf_tls_ctx_t **out);
void kvf__tls_ctx_free(kvf_tls_ctx_t *c);
/* What the other end of @c's connections is called in messages: "store" (the default) or
 * "engine" (at most 15 characters). */
void kvf__tls_ctx_set_peer(kvf_tls_ctx_t *c, const char *peer);

/* A TLS session over the connected socket @fd (not owned); NULL when out of memory. */
kvf_tls_t *kvf__tls_new(kvf_tls_ctx_t *c, int fd);
/* The same, for a client context, with @name (an IP address or a host name) as the name the
 * server's certificate must carry and the SNI, for this session only, unless the context has a
 * name of its own (server_name): an engine's data connections verify each peer against its own
 * address. */
kvf_tls_t *kvf__tls_new_for(kvf_tls_ctx_t *c, int fd, const char *name);
void kvf__tls_free(kvf_tls_t *t);

/*
 * kvf__tls_handshake_step - advance a server's handshake without blocking.
 * Returns 1 when done, 0 when it must be called again once kvf__tls_wants() is ready, or
 * -KVF_ETLS with the reason in @why (the peer's certificate check, OpenSSL's reason, or "the
 * client closed the connection").
 */
int kvf__tls_handshake_step(kvf_tls_t *t, char *why, size_t whylen);

/*
 * kvf__tls_connect - a client's whole handshake before @deadline_ms (kvf__now_ms() clock),
 * including the wait for the server to accept this client (its certificate, in mutual TLS): the
 * server's first post-handshake message proves it, an alert refutes it. @fd may be blocking or
 * not (this polls).
 * Returns 0; -KVF_ETLS with the reason in @why; -KVF_ETIMEDOUT.
 */
int kvf__tls_connect(kvf_tls_t *t, uint64_t deadline_ms, char *why, size_t whylen);

/* POLLIN or POLLOUT: what the last call that answered -EAGAIN is waiting for. */
short kvf__tls_wants(const kvf_tls_t *t);
/* Whether received bytes wait in the session, decrypted or not (poll() does not see them). */
bool kvf__tls_pending(const kvf_tls_t *t);

/* ---- kvf_stream_t: a connection, plain or TLS ----------------------------------------------- */

typedef struct {
    int fd;
    kvf_tls_t *tls; /* NULL: plain */
} kvf_stream_t;

/*
 * kvf__stream_recv / kvf__stream_send - one non-blocking receive or send (send never raises
 * SIGPIPE). Return the bytes moved (> 0), 0 at the end of the stream (receive), -EAGAIN (then
 * poll for kvf__stream_wants()), or a negative code (-errno, -KVF_ETLS) with a reason in @why
 * when @why is not NULL.
 */
ssize_t kvf__stream_recv(kvf_stream_t *s, void *buf, size_t n, char *why, size_t whylen);
ssize_t kvf__stream_send(kvf_stream_t *s, const void *buf, size_t n, char *why, size_t whylen);
/* The poll events to wait for after -EAGAIN from @out (send) or not. */
short kvf__stream_wants(const kvf_stream_t *s, bool out);
/* Whether received bytes wait inside the stream that poll() cannot see. */
bool kvf__stream_pending(const kvf_stream_t *s);

/* Move all of @buf before @deadline_ms, polling (any socket mode). Returns 0, -EPIPE (end of
 * stream, or reset), -KVF_ETIMEDOUT, -KVF_ETLS, -errno. */
int kvf__stream_io(kvf_stream_t *s, void *buf, size_t len, bool out, uint64_t deadline_ms);

#endif /* KVF_COMMON_TLS_H */
