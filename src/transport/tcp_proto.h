/*
 * The tcp transport's wire format (docs/protocol.md, "Transfer protocol"): the frame header, the
 * frame types, and every limit a peer's bytes are checked against. The tcp files include it, and
 * so do the tests and the fuzz target that speak the protocol by hand, so that there is one
 * definition of each value.
 */
#ifndef KVF_TCP_PROTO_H
#define KVF_TCP_PROTO_H

#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/limits.h"
#include "common/wire.h"

/* The header's magic and version, and its length. */
#define KVF_TCP_MAGIC   0x5446564Bu /* "KVFT" as bytes on the wire */
#define KVF_TCP_VERSION 1
#define KVF_TCP_HDR_LEN 40

/* Frame types (the header's `type`). */
#define KVF_TCP_HELLO  1
#define KVF_TCP_WRITE  2
#define KVF_TCP_READ   3
#define KVF_TCP_RESP   4
#define KVF_TCP_NOTIFY 5
#define KVF_TCP_WRITEV 6
#define KVF_TCP_STATS  7 /* a request for the target's statistics (len 0); the RESP carries them */

/* Largest `len` of one WRITE or READ (and of a READ's answer): the engine's largest chunk (64
 * MiB), since one chunk travels as one frame. Longer elements are split. */
#define KVF_TCP_MAX_CHUNK KVF_MAX_CHUNK
/* Largest HELLO payload (session id) and error-message payload of a RESP. */
#define KVF_TCP_MAX_MSG 1024u
/* Segments of one WRITEV: a gathered write of several small elements (addr = the count, len =
 * their total bytes, at most KVF_TCP_MAX_CHUNK). */
#define KVF_TCP_MAX_SEGS 256u
#define KVF_TCP_SEG_LEN  16u
/* Requests one initiator keeps outstanding on one connection (a power of two: the slot index
 * is the low bits of req_id). A target needs no such limit: it serves one request at a time and
 * TCP flow control holds back the rest. */
#define KVF_TCP_MAX_INFLIGHT 128u
/* Connections past their HELLO one target serves at once; more are accepted and closed at
 * once. */
#define KVF_TCP_MAX_CONNS 1024u
/* Connections one target serves at once from one remote IP address (a share of
 * KVF_TCP_MAX_CONNS, so that one flooding address cannot lock the others out); more are
 * accepted and closed at once. 128 = 8 engines on one host with the most connections per peer
 * (KVF_MAX_CONNS_PER_PEER, 16) each. */
#define KVF_TCP_MAX_CONNS_PER_ADDR 128u
/* Connections one target holds at once that have not finished their HELLO (and, with a cluster
 * secret, the authentication handshake before it): a share apart from KVF_TCP_MAX_CONNS, so that
 * unauthenticated sockets cannot take the places of authenticated ones. One more evicts the
 * oldest of them (the oldest from its address when that address holds
 * KVF_TCP_MAX_PREAUTH_PER_ADDR). Such a connection costs a socket and a few KiB, no thread; the
 * per-address share is as large as a host's legitimate burst: 64 engines of one host connecting
 * at once (each opens its connections one after the other). */
#define KVF_TCP_MAX_PREAUTH          256u
#define KVF_TCP_MAX_PREAUTH_PER_ADDR 64u
/* Longest a target waits for progress on a frame it has started to receive or send; a client
 * that stops in the middle of a frame is disconnected after this (its region reference is
 * released). */
#define KVF_TCP_STALL_TIMEOUT_MS 30000u
/* A frame's payload must also arrive at no less than KVF_TCP_MIN_RATE_BYTES_PER_MS after a base
 * allowance, so that a client cannot hold a region reference for ever by trickling bytes (which
 * restarts the stall timer): with the largest frame a reference is held at most
 * 2 s + 64 MiB / 10 MB/s, about 8.7 s, well under the operation timeout an unregister waits. */
#define KVF_TCP_FRAME_BASE_MS         2000u
#define KVF_TCP_MIN_RATE_BYTES_PER_MS 10000u
/* A new connection must complete its HELLO within this, so idle sockets cannot fill
 * KVF_TCP_MAX_CONNS and lock real peers out. After the HELLO, a connection that brings no request
 * for the target's idle timeout (kvf_config_t.tcp_idle_timeout_ms) is closed. Both are checked
 * every TCP_SERVER_SLICE_MS. */
#define KVF_TCP_HELLO_TIMEOUT_MS 5000u
/* Largest payload of the RESP to a STATS request (the encoding of common/stats.h). */
#define KVF_TCP_MAX_STATS (2u << 20)
/* Connections an initiator may open to one peer. */
#define KVF_TCP_MAX_CONNS_PER_PEER 64u

/* A frame header, decoded; on the wire it is KVF_TCP_HDR_LEN bytes, little-endian, laid out as
 * tcp_hdr_encode() writes it. */
typedef struct {
    uint32_t magic;
    uint8_t version;
    uint8_t type;
    uint16_t flags;
    uint32_t status;
    uint32_t reserved;
    uint64_t req_id;
    uint64_t addr;
    uint64_t len;
} tcp_hdr_t;

static inline void tcp_hdr_encode(uint8_t *b, uint8_t type, uint32_t status, uint64_t req_id,
                                  uint64_t addr, uint64_t len)
{
    kvf__put_le32(b, KVF_TCP_MAGIC);
    b[4] = KVF_TCP_VERSION;
    b[5] = type;
    kvf__put_le16(b + 6, 0);
    kvf__put_le32(b + 8, status);
    kvf__put_le32(b + 12, 0);
    kvf__put_le64(b + 16, req_id);
    kvf__put_le64(b + 24, addr);
    kvf__put_le64(b + 32, len);
}

static inline void tcp_hdr_decode(const uint8_t *b, tcp_hdr_t *h)
{
    h->magic = kvf__get_le32(b);
    h->version = b[4];
    h->type = b[5];
    h->flags = kvf__get_le16(b + 6);
    h->status = kvf__get_le32(b + 8);
    h->reserved = kvf__get_le32(b + 12);
    h->req_id = kvf__get_le64(b + 16);
    h->addr = kvf__get_le64(b + 24);
    h->len = kvf__get_le64(b + 32);
}

/* Checks shared by both directions. Returns false with a reason made of numbers only (received
 * bytes are never echoed into logs). */
static inline bool tcp_hdr_common_ok(const tcp_hdr_t *h, char *why, size_t whylen)
{
    if (h->magic != KVF_TCP_MAGIC)
        snprintf(why, whylen, "bad magic 0x%08" PRIx32, h->magic);
    else if (h->version != KVF_TCP_VERSION)
        snprintf(why, whylen, "unsupported version %u", (unsigned)h->version);
    else if (h->flags != 0)
        snprintf(why, whylen, "non-zero flags 0x%04x", (unsigned)h->flags);
    else if (h->reserved != 0)
        snprintf(why, whylen, "non-zero reserved field 0x%08" PRIx32, h->reserved);
    else
        return true;
    return false;
}

/* The target's check of a request header (docs/protocol.md, "When the target closes a
 * connection"), before anything is acquired or read for it; @hello_done: the connection's HELLO
 * was served. Returns NULL, or a reason made of numbers only for closing the connection. */
static inline const char *tcp_req_hdr_check(const tcp_hdr_t *h, bool hello_done, char *why,
                                            size_t whylen)
{
    if (!tcp_hdr_common_ok(h, why, whylen))
        return why;
    if (h->type < KVF_TCP_HELLO || h->type > KVF_TCP_STATS || h->type == KVF_TCP_RESP)
        snprintf(why, whylen, "bad frame type %u", (unsigned)h->type);
    else if (!hello_done && h->type != KVF_TCP_HELLO)
        snprintf(why, whylen, "first frame is type %u, not HELLO", (unsigned)h->type);
    else if (hello_done && h->type == KVF_TCP_HELLO)
        snprintf(why, whylen, "second HELLO");
    else if (h->status != 0)
        snprintf(why, whylen, "non-zero status %" PRIu32 " in a request", h->status);
    else if (h->type == KVF_TCP_HELLO && h->len > KVF_TCP_MAX_MSG)
        snprintf(why, whylen, "HELLO length %" PRIu64 " over KVF_TCP_MAX_MSG (%u)", h->len,
                 KVF_TCP_MAX_MSG);
    else if (h->type == KVF_TCP_WRITEV && (h->addr == 0 || h->addr > KVF_TCP_MAX_SEGS))
        snprintf(why, whylen, "WRITEV of %" PRIu64 " segments: want 1..KVF_TCP_MAX_SEGS (%u)",
                 h->addr, KVF_TCP_MAX_SEGS);
    else if (h->type == KVF_TCP_NOTIFY && h->len > KVF_NOTIFY_MAX)
        snprintf(why, whylen, "NOTIFY length %" PRIu64 " over KVF_NOTIFY_MAX (%u)", h->len,
                 KVF_NOTIFY_MAX);
    else if (h->type == KVF_TCP_STATS && (h->len != 0 || h->addr != 0))
        snprintf(why, whylen, "STATS with length %" PRIu64 " and address %" PRIu64 ", want 0 and 0",
                 h->len, h->addr);
    else if (h->len > KVF_TCP_MAX_CHUNK)
        snprintf(why, whylen, "length %" PRIu64 " over KVF_TCP_MAX_CHUNK (%u)", h->len,
                 KVF_TCP_MAX_CHUNK);
    else
        return NULL;
    return why;
}

#endif /* KVF_TCP_PROTO_H */
