/*
 * The P2P record request (docs/protocol.md, "P2P record request"): how an engine without a
 * config store (store URL "p2p://") reads a peer's session or regions record from the peer
 * itself, on the peer's session port. The asker sends one fixed header and the key; the engine
 * answers with one fixed header and the value (or an error message) and closes the connection.
 *
 * The request header is as long as a tcp frame header (KVF_TCP_HDR_LEN), so that a tcp target,
 * which reads that many bytes before it looks at them, tells the two apart by the magic alone.
 *
 * The codec and the asking side live here (L0), so that the store's p2p backend (which asks) and
 * the tcp transport (which answers) share one definition without reaching each other. Every
 * length read from the network is checked against the limits below before anything is
 * allocated; the fuzz target tests/fuzz/fuzz_p2p.c drives both decoders.
 */
#ifndef KVF_P2P_H
#define KVF_P2P_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/auth.h"
#include "common/url.h"
#include "kvferry.h"

#define KVF_P2P_MAGIC   0x5046564Bu /* "KVFP" as bytes on the wire */
#define KVF_P2P_VERSION 1
#define KVF_P2P_REQ_LEN 40u /* == KVF_TCP_HDR_LEN (checked in tcp_p2p.c) */
#define KVF_P2P_ANS_LEN 16u
#define KVF_P2P_OP_GET  1
#define KVF_P2P_OP_ANS  2
/* Longest key asked for, longest value answered, longest error message answered. */
#define KVF_P2P_MAX_KEY   KVF_STORE_MAX_KEY_LEN
#define KVF_P2P_MAX_VALUE KVF_STORE_MAX_VALUE_LEN
#define KVF_P2P_MAX_MSG   1024u
/* How long a target waits for the key after the header, and an asker that is given no deadline
 * of its own waits for the whole exchange. */
#define KVF_P2P_REQ_TIMEOUT_MS 2000u

/* Write a GET request header for a key of @key_len bytes into @b (KVF_P2P_REQ_LEN bytes). */
void kvf__p2p_req_encode(uint8_t *b, uint32_t key_len);

/* Check a received request header (KVF_P2P_REQ_LEN bytes). Returns true with the key's length
 * (1..KVF_P2P_MAX_KEY), or false with a reason made of numbers only in @why. */
bool kvf__p2p_req_decode(const uint8_t *b, uint32_t *key_len, char *why, size_t whylen);

/* Whether @len bytes of @key (from the network) are a key: printable ASCII, no NUL. */
bool kvf__p2p_key_ok(const char *key, size_t len);

/* Write an answer header: @status 0 (then @len is the value's length) or a positive kvferry
 * code (then @len is the length of the error message that follows). */
void kvf__p2p_ans_encode(uint8_t *b, uint32_t status, uint32_t len);

/* Check a received answer header (KVF_P2P_ANS_LEN bytes). Returns true with the status (0 or a
 * kvferry code KVF_EINVAL..) and the length of what follows (checked against KVF_P2P_MAX_VALUE
 * or KVF_P2P_MAX_MSG), or false with a reason in @why. */
bool kvf__p2p_ans_decode(const uint8_t *b, uint32_t *status, uint32_t *len, char *why,
                         size_t whylen);

/* The session id a record key names: the text after its last '/', parsed into @hp. Returns 0 or
 * -KVF_EINVAL (no '/', not a session id, port 0). */
int kvf__p2p_sid_of_key(const char *key, kvf_hostport_t *hp);

/* The identity an asker that speaks for no session proves (common/auth.h). */
#define KVF_P2P_ASKER_ID "kvferry-p2p-asker"

/*
 * kvf__p2p_fetch - ask the engine at @hp for the value of @key, once, on a connection of its
 * own that is closed before returning. @sid names the engine in messages.
 * @auth:        the cluster secret (len 0: none). With one, the asker runs the handshake first
 *               as @my_id, with the engine's session id (@hp formatted) as the server it expects,
 *               so an engine with a key answers it, and a relay or another engine is refused.
 * @tls:         a client context of common/tls.h (data TLS: the engine answers on its data
 *               port), or NULL: the request runs inside TLS, the engine's certificate checked
 *               against @hp's host (or the context's server name or fingerprint).
 * @deadline_ms: kvf__now_ms() bound on connecting and the whole exchange.
 * Returns 0 with a malloc'ed, NUL-terminated copy of the value in *@val and its length in *@len;
 * -KVF_ENOTFOUND when the engine answered that it holds no such record; -ECONNREFUSED (nobody
 * listens there), -KVF_ETIMEDOUT, -KVF_EPROTO (what answered is no kvferry engine), -KVF_EAUTH
 * (the keys differ, one side has none, or another server answered), -KVF_ETLS (TLS on one side
 * only, or a certificate refused), or another negative code,
 * each with a last-error message naming @sid.
 */
int kvf__p2p_fetch(const kvf_hostport_t *hp, const char *sid, const kvf_auth_key_t *auth,
                   kvf_tls_ctx_t *tls, const char *my_id, const char *key, uint64_t deadline_ms,
                   void **val, size_t *len);

#endif /* KVF_P2P_H */
