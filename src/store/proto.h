/*
 * The built-in config store's wire protocol (tcp://). docs/protocol.md is the prose version of
 * this file; keep them in step.
 *
 * Every message is a frame: a 16-byte little-endian header, then `body_len` bytes of body.
 *
 *   offset size field
 *   0      4    magic     KVF_STORE_MAGIC ("KVFS" read as bytes)
 *   4      1    version   KVF_STORE_PROTO_VERSION
 *   5      1    opcode    enum kvf_store_op
 *   6      2    status    0 in requests; enum kvf_store_status in responses
 *   8      4    req_id    chosen by the client, echoed in the response; 0 in EVENT frames
 *   12     4    body_len  <= KVF_STORE_MAX_FRAME_LEN
 *
 * Body fields are u8/u32/u64 little-endian integers and "blobs" (u32 length + bytes).
 * A response carries the request's opcode and req_id. A response with a non-zero status has
 * a body of one blob: a human-readable message (may be empty). Requests on one connection may be
 * pipelined; responses come in any order (a get-with-wait answers late), matched by req_id.
 */
#ifndef KVF_STORE_PROTO_H
#define KVF_STORE_PROTO_H

#include <errno.h>
#include <stdint.h>

#include "kvferry.h"
/* The protocol's own limits (partial-frame timeout, output bound, longest wait) are there, with
 * the store's other defaults and limits; the public ones are in kvferry.h. */
#include "store/limits.h"

#define KVF_STORE_MAGIC         0x5346564Bu /* bytes 'K' 'V' 'F' 'S' */
#define KVF_STORE_PROTO_VERSION 1u
#define KVF_STORE_HDR_LEN       16u
/* Keys and values in one LIST_PAGE answer, about (one pair may take it past). */
#define KVF_STORE_LIST_PAGE_BYTES (4u << 20)
/* The longest request body: a CAS with the longest key, expected value and new value. A frame
 * header announcing more is refused before anything is read or allocated for it. */
#define KVF_STORE_MAX_REQUEST_LEN (KVF_STORE_MAX_KEY_LEN + 2u * KVF_STORE_MAX_VALUE_LEN + 64u)

enum kvf_store_op {
    /* body: empty.  answer: empty. */
    KVF_STORE_OP_PING = 1,
    /* body: blob key, blob value, u64 lease (0 = none).  answer: empty.
     * status LEASE_NOT_FOUND when the lease does not exist. */
    KVF_STORE_OP_SET = 2,
    /* body: blob key, u32 wait_ms (0 = answer at once).  answer: blob value.
     * status NOT_FOUND (wait_ms 0) or TIMEOUT (still absent after wait_ms). */
    KVF_STORE_OP_GET = 3,
    /* body: blob key.  answer: empty; status NOT_FOUND when absent. */
    KVF_STORE_OP_DEL = 4,
    /* body: blob key, u8 expect_present, blob expected (empty when !expect_present),
     *       blob new value, u64 lease.
     * answer: empty on success; status CAS_MISMATCH with body: blob message (the current value
     * is not returned). */
    KVF_STORE_OP_CAS = 5,
    /* body: blob key, u64 delta (two's complement int64).  answer: u64 new value (int64).
     * status BAD_VALUE when the stored value is not a decimal int64, OUT_OF_RANGE on overflow. */
    KVF_STORE_OP_ADD = 6,
    /* body: blob prefix.  answer: u32 count, then count × (blob key, blob value), in byte order
     * of keys. status TOO_BIG when the answer would exceed KVF_STORE_MAX_FRAME_LEN or
     * KVF_STORE_MAX_LIST_KEYS. */
    KVF_STORE_OP_LIST = 7,
    /* body: blob prefix.  answer: u64 watch_id (unique per connection, never 0). */
    KVF_STORE_OP_WATCH = 8,
    /* body: u64 watch_id.  answer: empty; status NOT_FOUND for an unknown id. After the answer
     * no more events of that watch are sent. */
    KVF_STORE_OP_UNWATCH = 9,
    /* body: u32 ttl_ms (1..KVF_STORE_MAX_LEASE_TTL_MS).  answer: u64 lease_id (never 0). */
    KVF_STORE_OP_LEASE_GRANT = 10,
    /* body: u64 lease_id.  answer: empty; status LEASE_NOT_FOUND if it expired or never existed.
     * Resets the lease's deadline to now + ttl. */
    KVF_STORE_OP_LEASE_KEEPALIVE = 11,
    /* body: u64 lease_id.  answer: empty; status LEASE_NOT_FOUND. Deletes the lease's keys. */
    KVF_STORE_OP_LEASE_REVOKE = 12,
    /* body: blob prefix, blob after (exclusive; empty = from the first key), u32 max_pairs
     *       (0 or above KVF_STORE_LIST_PAGE_MAX = KVF_STORE_LIST_PAGE_MAX), u8 flags (bit 0:
     *       keys only, values sent empty; other bits 0).
     * answer: u8 more (1 when keys after this page match), u32 count, then count × (blob key,
     * blob value), in byte order of keys. A page stops at max_pairs or once it holds
     * KVF_STORE_LIST_PAGE_BYTES of keys and values, but holds at least one pair when one
     * matches. The next page starts after the last key of this one. */
    KVF_STORE_OP_LIST_PAGE = 13,
    /* Server to client only, req_id 0, status 0.
     * body: u64 watch_id, u8 type (1 put, 2 delete), blob key, blob value (empty for delete). */
    KVF_STORE_OP_EVENT = 64,
};

enum kvf_store_status {
    KVF_STORE_ST_OK = 0,
    KVF_STORE_ST_NOT_FOUND = 1,
    KVF_STORE_ST_TIMEOUT = 2,
    KVF_STORE_ST_CAS_MISMATCH = 3,
    KVF_STORE_ST_BAD_REQUEST = 4, /* malformed body, empty key, bad ttl: the connection stays */
    KVF_STORE_ST_TOO_BIG = 5,
    KVF_STORE_ST_BAD_VALUE = 6,
    KVF_STORE_ST_OUT_OF_RANGE = 7,
    KVF_STORE_ST_LEASE_NOT_FOUND = 8,
    KVF_STORE_ST_BUSY = 9,           /* a limit (watches, waiters per connection) or a quota
                                        (keys, bytes, leases, watches) reached; the message names
                                        it and its value */
    KVF_STORE_ST_SHUTTING_DOWN = 10, /* server stopping: pending get-with-wait answered with this */
    KVF_STORE_ST_AUTH = 11,          /* the server requires the cluster secret and the client sent
                                        a request without the handshake; the connection ends */
    KVF_STORE_ST_FORBIDDEN = 12,     /* the key is bound to, or the lease is, another client's
                                        lease (with a key: docs/security.md, "Store ownership") */
    KVF_STORE_ST_TLS = 13,           /* the server requires TLS and the client sent a plain
                                        request; the connection ends (-KVF_ETLS) */
};

/*
 * What the server does with input that breaks framing (it closes that one connection, after
 * logging why at warn level): bad magic, unsupported version, unknown opcode, status != 0 in a
 * request, body_len above KVF_STORE_MAX_FRAME_LEN, a partial frame older than
 * KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS. A well-framed request whose body does not decode gets
 * status BAD_REQUEST and the connection stays open.
 */

/* Map a wire status to a kvferry error code (0 for OK). */
static inline int kvf__store_status_to_err(uint16_t st)
{
    switch (st) {
    case KVF_STORE_ST_OK:
        return 0;
    case KVF_STORE_ST_NOT_FOUND:
        return -KVF_ENOTFOUND;
    case KVF_STORE_ST_TIMEOUT:
        return -KVF_ETIMEDOUT;
    case KVF_STORE_ST_CAS_MISMATCH:
        return -KVF_ECASMISMATCH;
    case KVF_STORE_ST_BAD_REQUEST:
        return -KVF_EINVAL;
    case KVF_STORE_ST_TOO_BIG:
        return -KVF_ETOOBIG;
    case KVF_STORE_ST_BAD_VALUE:
        return -KVF_EBADVALUE;
    case KVF_STORE_ST_OUT_OF_RANGE:
        return -KVF_ERANGE;
    case KVF_STORE_ST_LEASE_NOT_FOUND:
        return -KVF_ENOTFOUND;
    case KVF_STORE_ST_BUSY:
        return -KVF_EBUSY;
    case KVF_STORE_ST_AUTH:
        return -KVF_EAUTH;
    case KVF_STORE_ST_FORBIDDEN:
        return -EACCES;
    case KVF_STORE_ST_TLS:
        return -KVF_ETLS;
    case KVF_STORE_ST_SHUTTING_DOWN:
        return -KVF_ESTOREDOWN;
    default:
        return -KVF_EPROTO;
    }
}

#endif /* KVF_STORE_PROTO_H */
