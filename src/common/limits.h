/*
 * The defaults and limits more than one layer uses: the engine's config (kvf_config_init() and
 * its checks) and the transports that fall back to the same values when a parameter is 0 or
 * bound it on the wire. One name each, so that the two sides cannot drift apart. Private.
 *
 * Limits used by one file only stay in that file (or in its folder's private header).
 */
#ifndef KVF_COMMON_LIMITS_H
#define KVF_COMMON_LIMITS_H

/* config.tcp_chunk_bytes: elements longer than this are split into chunks of it. The maximum is
 * also the largest `len` of one tcp WRITE or READ on the wire. */
#define KVF_DEFAULT_CHUNK (4u << 20)
#define KVF_MIN_CHUNK     (64u << 10)
#define KVF_MAX_CHUNK     (64u << 20)

/* config.tcp_conns_per_peer: connections opened to each peer. */
#define KVF_DEFAULT_CONNS_PER_PEER 2u
#define KVF_MAX_CONNS_PER_PEER     16u

/* config.tcp_idle_timeout_ms: a target closes a served tcp connection that brought no request for
 * this long (the initiator reconnects on its next transfer). Long enough that a peer's
 * connection survives the pause between bursts; short enough that idle sockets cannot pile up. */
#define KVF_DEFAULT_TCP_IDLE_TIMEOUT_MS 60000u
#define KVF_MIN_TCP_IDLE_TIMEOUT_MS     100u
#define KVF_MAX_TCP_IDLE_TIMEOUT_MS     86400000u

/* config.io_threads: the tcp transport's I/O threads (0: $KVFERRY_IO_THREADS, else
 * min(online CPUs, KVF_DEFAULT_IO_THREADS)). */
#define KVF_DEFAULT_IO_THREADS 4u
#define KVF_MAX_IO_THREADS     64u

/* The other defaults of kvf_config_init() (include/kvferry.h documents each field). */
#define KVF_DEFAULT_INIT_TIMEOUT_MS 10000u
#define KVF_DEFAULT_OP_TIMEOUT_MS   30000u
#define KVF_DEFAULT_LEASE_TTL_MS    5000u
/* The shortest config.lease_ttl_ms: a lease must outlive the store round trips of create and of
 * its own keep-alives (sent every TTL/3). */
#define KVF_MIN_LEASE_TTL_MS 100u
#define KVF_DEFAULT_MAX_BATCHES     4096u
#define KVF_DEFAULT_ASYNC_THREADS   4u
#define KVF_DEFAULT_NOTIFY_QUEUE    65536u

#endif /* KVF_COMMON_LIMITS_H */
