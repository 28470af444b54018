/*
 * Statistics snapshots (kvf_stats_t) as data: the histogram's bucket bounds, the renderers
 * (JSON, Prometheus text) and the binary encoding a STATS frame carries (docs/protocol.md). Pure
 * functions of a snapshot; the engine (src/core/stats.c) takes the snapshot.
 */
#ifndef KVF_COMMON_STATS_H
#define KVF_COMMON_STATS_H

#include <stddef.h>
#include <stdint.h>

#include "kvferry.h"

/* Version of the binary encoding; a decoder refuses any other. */
#define KVF_STATS_WIRE_VERSION 1
/* Peers one encoding carries at most (the rest are left out, the count says how many were). */
#define KVF_STATS_WIRE_MAX_PEERS 4096u
/* Bytes of one encoding at most: what the peer limit above needs, rounded up. */
#define KVF_STATS_WIRE_MAX (2u << 20)

/* Upper bounds of the latency buckets in microseconds, the last UINT64_MAX. */
extern const uint64_t kvf__stats_lat_bound_us[KVF_STATS_LAT_BUCKETS];

/* The bucket of a duration of @us microseconds. */
unsigned kvf__stats_lat_bucket(uint64_t us);

/* Encode @s (at most KVF_STATS_WIRE_MAX_PEERS peers) into a malloc'ed buffer. 0 or -KVF_ENOMEM. */
int kvf__stats_encode(const kvf_stats_t *s, uint8_t **out, size_t *len);

/* Decode what kvf__stats_encode() wrote (untrusted: from the network) into @s, which is
 * overwritten; its peers array is allocated. Returns 0 or -KVF_EPROTO with a message. */
int kvf__stats_decode(const void *buf, size_t len, kvf_stats_t *s);

#endif /* KVF_COMMON_STATS_H */
