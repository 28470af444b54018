/*
 * The registered-region table: the set of [addr, addr+len) ranges this engine has registered,
 * with exact byte bounds and no overlaps. Private to kvferry.
 *
 * The target side checks every incoming write or read against this table before touching memory
 * (the authoritative bounds check), and holds a reference on the region for as long as the
 * operation runs, so that unregistering a region can wait for the operations already inside it
 * and refuse every later one.
 *
 * Threading: every function may be called from any thread at any time, except
 * kvf__regions_destroy(), which requires that no other call on the table is running and no
 * reference is held. kvf__regions_acquire() and kvf__regions_release() are the hot path: they take
 * a shared lock and touch one atomic counter, and never allocate.
 */
#ifndef KVF_COMMON_REGIONS_H
#define KVF_COMMON_REGIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvf_region_table kvf_region_table_t;

/* One registered range. @gen is unique within a table and increases with every registration, so
 * a peer that cached a region can tell it apart from a later one at the same address. */
typedef struct {
    uint64_t addr;
    uint64_t len;
    uint64_t gen;
} kvf_region_t;

/* A held region: the region an in-flight operation is using. Filled by kvf__regions_acquire(),
 * given back by kvf__regions_release(). */
typedef struct {
    void *opaque;
} kvf_region_ref_t;

/*
 * kvf__regions_create - make an empty table.
 * Returns 0, or -KVF_ENOMEM / -errno from pthread initialisation.
 */
int kvf__regions_create(kvf_region_table_t **out);

/* kvf__regions_destroy - free the table and every region still in it. No reference may be held
 * and no other call may be running. NULL is a no-op. */
void kvf__regions_destroy(kvf_region_table_t *t);

/*
 * kvf__regions_add - register [@addr, @addr+@len).
 * @gen: receives the new region's generation; may be NULL.
 * Returns 0; -KVF_EINVAL for @len 0, a range that runs past 2^64, or one that overlaps a
 * registered region (the message names both ranges); -KVF_EEXIST when exactly this range is
 * already registered; -KVF_ENOMEM.
 */
int kvf__regions_add(kvf_region_table_t *t, uint64_t addr, uint64_t len, uint64_t *gen);

/*
 * kvf__regions_add_batch - register @n ranges as one operation: either all are added or none.
 * The ranges are checked against the table and against each other first; the message of a
 * failure names the batch element(s) involved. Returns as kvf__regions_add(). @n 0 is a no-op.
 */
int kvf__regions_add_batch(kvf_region_table_t *t, const uint64_t *addrs, const uint64_t *lens,
                           size_t n);

/*
 * kvf__regions_remove - unregister the region that starts at @addr.
 * From the moment of the call, new acquires of the region fail with -KVF_ENOTREG; the call then
 * waits up to @timeout_ms for every reference held on it to be released.
 * Returns 0 once nothing holds the region (it is freed); -KVF_ENOTREG if no region starts at
 * @addr; -KVF_ETIMEDOUT if references are still held at the deadline, in which case the region
 * stays unregistered and is freed by the release of its last reference.
 */
int kvf__regions_remove(kvf_region_table_t *t, uint64_t addr, uint32_t timeout_ms);

/*
 * kvf__regions_acquire - find the region that contains all of [@addr, @addr+@len) and take a
 * reference on it, which must be given back with kvf__regions_release().
 * Returns 0; -KVF_EINVAL for @len 0 or a range past 2^64; -KVF_ENOTREG when the range is not
 * inside one registered region (the message says whether it starts outside every region or by
 * how many bytes it runs past the end of the region it starts in).
 * Hot path: a shared lock, a binary search and one atomic add; no allocation.
 */
int kvf__regions_acquire(kvf_region_table_t *t, uint64_t addr, uint64_t len, kvf_region_ref_t *ref);

/* kvf__regions_release - give back a reference taken by kvf__regions_acquire() and clear @ref.
 * A cleared (NULL) reference is a no-op. Hot path: one atomic subtract unless the region is
 * being unregistered and this was its last reference. */
void kvf__regions_release(kvf_region_table_t *t, kvf_region_ref_t *ref);

/*
 * kvf__regions_snapshot - copy the registered regions, sorted by address.
 * @out: receives a malloc'ed array (free() it; NULL when there are none); @n its length.
 * @table_gen: receives the table's generation, which increases on every add and remove; may be
 *             NULL. Publishing it with the list lets a peer tell which list is newer.
 * Returns 0 or -KVF_ENOMEM.
 */
int kvf__regions_snapshot(kvf_region_table_t *t, kvf_region_t **out, size_t *n,
                          uint64_t *table_gen);

/*
 * kvf__regions_check - the same question as kvf__regions_acquire() asked of a sorted array such
 * as a snapshot or a peer's published region list, without taking anything.
 * Returns 0 when [@addr, @addr+@len) lies inside one element, else -KVF_EINVAL / -KVF_ENOTREG
 * with the same messages as kvf__regions_acquire(). The array may come from the network: an
 * unsorted or overlapping one gives wrong answers but never undefined behaviour, which is
 * acceptable because this is only the sender's fast-fail; the target's check is authoritative.
 */
int kvf__regions_check(const kvf_region_t *sorted, size_t n, uint64_t addr, uint64_t len);

/* kvf__regions_check()'s answer alone: whether [@addr, @addr+@len) is a valid range inside one
 * element of @sorted. Sets no error message (for callers to whom a miss is no error). */
bool kvf__regions_holds(const kvf_region_t *sorted, size_t n, uint64_t addr, uint64_t len);

#endif /* KVF_COMMON_REGIONS_H */
