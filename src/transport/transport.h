/*
 * The transport interface: how the core moves bytes to and from one peer, whatever carries
 * them. Each transport fills a `static const struct kvf_transport_ops` (like a libfabric
 * provider); ops it does not have point at kvf__transport_enotsup-style stubs, so the core never
 * tests for NULL.
 *
 * A transport instance belongs to one engine. It serves incoming requests against the engine's
 * region table (the target's check is authoritative: a request whose range is not entirely
 * inside one registered region is answered with an error and never touches memory), and it
 * carries the engine's outgoing batches to peers.
 */
#ifndef KVF_TRANSPORT_H
#define KVF_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#include "common/url.h"
#include "core/regions.h"
#include "kvferry.h"

typedef struct kvf_transport kvf_transport_t; /* one per engine and transport kind */
typedef struct kvf_tpeer kvf_tpeer_t;         /* a transport's connections to one peer */

typedef struct {
    const char *local_sid;          /* for logs and the hello */
    kvf_hostport_t listen;          /* address to listen on; port 0 = any free port */
    kvf_region_table_t *regions;    /* the engine's regions, checked for every incoming request */
    uint32_t conns_per_peer;        /* connections opened to each peer */
    uint32_t chunk_bytes;           /* elements longer than this are split */
    uint32_t connect_timeout_ms;    /* bound on connecting + hello to a peer */
} kvf_transport_params_t;

struct kvf_transport_ops {
    size_t size;
    const char *name;

    /* Bind, listen and start serving. Errors: -errno from bind/listen with a message naming the
     * address (e.g. "session id 127.0.0.1:50051 is already in use"). */
    int (*create)(const kvf_transport_params_t *p, kvf_transport_t **out);
    /* The port actually listened on. */
    uint16_t (*port)(const kvf_transport_t *t);
    /* Stop serving, close every connection, free. Outgoing transfers still running fail with
     * -KVF_ECLOSED; waits for them to leave. Incoming requests in progress are finished or cut
     * off before it returns, so the region table may be destroyed afterwards. */
    void (*destroy)(kvf_transport_t *t);

    /* A handle for talking to @peer_sid at @addr. May connect lazily; a peer that restarted at
     * the same address is reconnected on the next transfer. */
    int (*peer_open)(kvf_transport_t *t, const char *peer_sid, const kvf_hostport_t *addr,
                     kvf_tpeer_t **out);
    /* Close a peer handle; no transfer may be running on it. */
    void (*peer_close)(kvf_tpeer_t *p);

    /*
     * Run @n elements against the peer and wait until every one is complete or failed, or until
     * @deadline_ms (kvf__now_ms() clock). Returns 0 only when every byte is in place. On failure
     * returns the first error with a message naming the element index and range:
     * -KVF_ENOTREG / -KVF_EINVAL as answered by the target (its message is passed on),
     * -KVF_EPEERGONE when a connection broke, -KVF_ETIMEDOUT at the deadline.
     * Before it returns, nothing will touch the elements' local memory any more (a late answer to
     * a timed-out read must not land in a buffer the caller reuses).
     * Thread-safe: many threads may call it on the same peer at once.
     */
    int (*transfer)(kvf_tpeer_t *p, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms);
};

extern const struct kvf_transport_ops kvf__tcp_ops;

#endif /* KVF_TRANSPORT_H */
