/*
 * The cluster secret (docs/security.md) and the handshake that proves it (docs/protocol.md,
 * "Authentication handshake").
 *
 * With a key configured, every engine and store connection starts with a mutual challenge-
 * response before any other frame is read: the client sends a fresh nonce and its identity, the
 * server a fresh nonce and its identity, the client proves it holds the key with
 * HMAC-SHA256(key, "client" transcript), and only then does the server prove it with the
 * "server" transcript. The transcript binds both nonces and both identities, so a proof is good
 * for one connection only (a replay meets a new server nonce) and for the identities it names
 * (the authenticated client identity is what the server believes; a later HELLO must match it).
 * The client proves first so that a stranger learns nothing computed with the key.
 *
 * The codec and the server's state machine are free of I/O, so the store's event loop drives
 * them and the fuzz target feeds them bytes; kvf__auth_client()/kvf__auth_server() drive them
 * over a blocking or non-blocking socket within a deadline (tcp transport, store client).
 */
#ifndef KVF_COMMON_AUTH_H
#define KVF_COMMON_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/common.h"
#include "common/tls.h"

/* "KVFA" as bytes on the wire; the first 4 bytes of every handshake message. */
#define KVF_AUTH_MAGIC   0x4146564Bu
#define KVF_AUTH_VERSION 1
/* magic (4), version (1), type (1), body length (2, little-endian). */
#define KVF_AUTH_HDR_LEN 8

#define KVF_AUTH_NONCE_LEN 32u
#define KVF_AUTH_MAC_LEN   32u
/* Longest identity (a session id, "kvferry-info", "kvferry-store", ...) and REFUSED reason. */
#define KVF_AUTH_MAX_ID 256u
/* Largest body and message: the pre-auth byte limit. Nothing longer is read before the peer
 * proved the key. */
#define KVF_AUTH_MAX_BODY (KVF_AUTH_NONCE_LEN + KVF_AUTH_MAX_ID)
#define KVF_AUTH_MAX_MSG  (KVF_AUTH_HDR_LEN + KVF_AUTH_MAX_BODY)
/* The whole handshake must be over within this, counted from the connection's start. */
#define KVF_AUTH_TIMEOUT_MS 3000u

/* Key bytes (the key file holds them as hex). */
#define KVF_AUTH_KEY_MIN 16u
#define KVF_AUTH_KEY_MAX 64u
#define KVF_AUTH_KEY_GEN 32u /* what kvf_auth_keygen() writes */

/* Message types. */
#define KVF_AUTH_HELLO     1 /* client: nonce, identity */
#define KVF_AUTH_CHALLENGE 2 /* server: nonce, identity */
#define KVF_AUTH_PROOF     3 /* client: HMAC of the client transcript, one per key (1 or 2) */
#define KVF_AUTH_OK        4 /* server: HMAC of the server transcript */
#define KVF_AUTH_REFUSED   5 /* either: a reason (printable text); the connection then ends */

/* The environment variable read when no key file is configured. */
#define KVF_AUTH_KEY_ENV "KVFERRY_AUTH_KEY_FILE"
/* The same for the store's admin key (an operator's identity; docs/security.md). */
#define KVF_AUTH_ADMIN_KEY_ENV "KVFERRY_ADMIN_KEY_FILE"
/* A client identity starting with this proves the admin key instead of the cluster's. */
#define KVF_AUTH_ADMIN_ID "kvferry-admin"
/* The built-in store's identity. */
#define KVF_AUTH_STORE_ID "kvferry-store"
/* A store client that speaks for an engine: this prefix and the engine's session id. With a key,
 * only such a client (or an admin) may change the session's records (docs/security.md). */
#define KVF_AUTH_SESSION_ID "kvferry-session/"

/* A key file's keys: the current one, which this side proves and accepts, and during a rotation
 * the previous one, which it accepts and also proves (a client sends one proof per key, so that
 * a server that has only the previous key yet accepts it too). */
typedef struct {
    uint8_t bytes[KVF_AUTH_KEY_MAX];
    size_t len; /* 0: no key */
    uint8_t prev[KVF_AUTH_KEY_MAX];
    size_t prev_len; /* 0: no previous key */
} kvf_auth_key_t;

/*
 * kvf__auth_key_resolve - load the key from @path, or when @path is NULL or "" from the file
 * $KVFERRY_AUTH_KEY_FILE names. Leaves @key->len 0 when neither is set.
 * The file (a symlink to one is followed) holds one key of 32..128 hex digits (16..64 bytes), or
 * two separated by white space (the current key, then the previous one during a rotation), and
 * lines starting with '#'. A key whose bytes are all the same is refused. The file must be owned
 * by this user or root, writable by neither group nor others and not readable by others (group
 * read is allowed: a key shared with a service group).
 * Returns 0, or -KVF_EINVAL / -errno with a message naming the file and what is wrong.
 */
int kvf__auth_key_resolve(const char *path, kvf_auth_key_t *key);
/* The same with $KVFERRY_ADMIN_KEY_FILE as the fallback. */
int kvf__auth_admin_key_resolve(const char *path, kvf_auth_key_t *key);

/* Overwrite the key's bytes (OPENSSL_cleanse, which the compiler may not drop). */
void kvf__auth_key_wipe(kvf_auth_key_t *key);

/* Whether the 4 bytes at @b are KVF_AUTH_MAGIC. */
bool kvf__auth_is_magic(const uint8_t *b);

/*
 * kvf__auth_hdr_parse - check a message header against the limits of its type: magic, version,
 * a known type, and the body length the type allows (HELLO/CHALLENGE: a nonce and a 1..256 byte
 * identity; PROOF: one or two MACs; OK: one MAC; REFUSED: 0..256 bytes of text).
 * Returns true with *@type and *@body_len set, or false with a reason of numbers only in @why.
 */
bool kvf__auth_hdr_parse(const uint8_t hdr[KVF_AUTH_HDR_LEN], uint8_t *type, size_t *body_len,
                         char *why, size_t whylen);

/* Write a message of @type with body @a[@alen] then @b[@blen] into @out (KVF_AUTH_MAX_MSG bytes).
 * Returns its length. The caller keeps alen + blen within the type's limit. */
size_t kvf__auth_encode(uint8_t *out, uint8_t type, const void *a, size_t alen, const void *b,
                        size_t blen);

/* The server's half, free of I/O. */
typedef struct {
    int state; /* SRV_WANT_HELLO, SRV_WANT_PROOF, SRV_DONE, SRV_FAILED (auth.c) */
    kvf_auth_key_t key;
    char my_id[KVF_AUTH_MAX_ID + 1];
    char peer_id[KVF_AUTH_MAX_ID + 1]; /* the client's identity, proven once state is done */
    kvf_auth_key_t admin_key; /* len 0: no admin identity is accepted */
    bool admin;               /* the client proved the admin key (valid once state is done) */
    uint8_t cn[KVF_AUTH_NONCE_LEN];
    uint8_t sn[KVF_AUTH_NONCE_LEN];
} kvf_auth_srv_t;

/* Start a server handshake with @key (copied) as @my_id. */
void kvf__auth_srv_init(kvf_auth_srv_t *s, const kvf_auth_key_t *key, const char *my_id);
/* Also accept clients whose identity starts with KVF_AUTH_ADMIN_ID when they prove @admin_key
 * (copied); without this such a client is refused. */
void kvf__auth_srv_set_admin(kvf_auth_srv_t *s, const kvf_auth_key_t *admin_key);
/* Wipe the copy of the key. */
void kvf__auth_srv_fini(kvf_auth_srv_t *s);

/*
 * kvf__auth_srv_step - feed the server one message whose header kvf__auth_hdr_parse() accepted.
 * Writes the message to send back into @out (KVF_AUTH_MAX_MSG bytes), its length in *@out_len
 * (0: nothing to send).
 * Returns 0 (send @out, wait for the next message), 1 (authenticated: send @out, then the
 * connection carries its own protocol; s->peer_id is the proven identity), or -KVF_EAUTH /
 * -KVF_EPROTO with a reason in @why (send @out if any, then close).
 */
int kvf__auth_srv_step(kvf_auth_srv_t *s, uint8_t type, const uint8_t *body, size_t len,
                       uint8_t *out, size_t *out_len, char *why, size_t whylen);

/*
 * kvf__auth_client - run the client's half on @fd (blocking or not: it polls) before
 * @deadline_ms (kvf__now_ms() clock), as @my_id, with the server that @expect_id names.
 * @expect_id: the identity the server must claim (an engine's session id, KVF_AUTH_STORE_ID);
 *             checked before this side proves anything, so that a party without the key that
 *             passes the handshake on to another server (a relay) gets no proof it could use
 *             there: the proof covers the claimed identity, and another server's is refused.
 * Returns 0; -KVF_EAUTH (wrong key on either side, refused by the server, or the server is not
 * @expect_id: the reason is in @why, prefixed "refused by the peer: " when it came from the
 * server); -KVF_EPROTO (the peer does not speak the handshake); -KVF_ETIMEDOUT; -EPIPE (closed);
 * -errno.
 */
int kvf__auth_client(int fd, const kvf_auth_key_t *key, const char *my_id, uint64_t deadline_ms,
                     const char *expect_id, char *why, size_t whylen);
/* The same on a stream (the store client's, inside TLS when it uses TLS). */
int kvf__auth_client_stream(kvf_stream_t *s, const kvf_auth_key_t *key, const char *my_id,
                            uint64_t deadline_ms, const char *expect_id, char *why, size_t whylen);

/*
 * kvf__auth_server - run the server's half on @fd before @deadline_ms, as @my_id.
 * @peer_id: receives the client's proven identity (KVF_AUTH_MAX_ID + 1 bytes).
 * @first:   receives the first KVF_AUTH_HDR_LEN bytes the client sent, so that a caller whose
 *           client spoke its own protocol instead (no key there) can answer it in that protocol;
 *           *@first_len says how many arrived.
 * Returns 0; -KVF_EPROTO when the first bytes are not a handshake (nothing was sent; @first
 * holds them); -KVF_EAUTH with a reason (a REFUSED was sent); -KVF_ETIMEDOUT; -EPIPE; -errno.
 */
int kvf__auth_server(int fd, const kvf_auth_key_t *key, const char *my_id, uint64_t deadline_ms,
                     char *peer_id, uint8_t first[KVF_AUTH_HDR_LEN], size_t *first_len, char *why,
                     size_t whylen);

/* Send a REFUSED with @reason on @fd (best effort, before @deadline_ms): the answer of a server
 * without a key to a client that starts a handshake. */
void kvf__auth_send_refused(int fd, const char *reason, uint64_t deadline_ms);

/* Whole sends and receives on @fd before @deadline_ms, polling (any socket mode). Returns 0,
 * -KVF_ETIMEDOUT, -EPIPE (closed before @len bytes), -errno. */
int kvf__auth_io(int fd, void *buf, size_t len, bool out, uint64_t deadline_ms);

#endif /* KVF_COMMON_AUTH_H */
