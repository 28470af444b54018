/*
 * The registered-region table (see regions.h).
 *
 * Layout: a sorted array of slots {addr, len, region*} under a pthread rwlock. Lookups take the
 * read lock and binary-search the array, which holds the bounds inline so that a search touches
 * only the array, not the regions. Each region is a separate allocation whose address never
 * changes, so a reference can point at it while the array is grown or shifted.
 *
 * Draining: every region has one atomic word holding its reference count and two flags. Acquire
 * increments it under the read lock, only for a region it found in the array; remove unlinks the
 * region and sets REGION_REMOVED under the write lock. The rwlock therefore orders every
 * successful acquire before the removal, and the atomic word alone tells the last releaser that
 * it must wake the remover (or, if the remover gave up, free the region itself).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/regions.h"

#define SUBSYS "regions"

/* The region state word: a reference count in the low bits and two flags above it. The count can
 * never come near bit 62: each reference is an operation in flight. */
#define REGION_REFS_MASK ((UINT64_C(1) << 62) - 1)
/* Unlinked from the table: no new reference can be taken. Set once, under the write lock. */
#define REGION_REMOVED (UINT64_C(1) << 62)
/* The remover timed out and returned, so whoever drops the last reference frees the region. */
#define REGION_ORPHANED (UINT64_C(1) << 63)

/* First capacity of the slot array; it doubles as it fills. */
#define SLOTS_MIN_CAP 16

/* "[0x1000, +4096)": how every message prints a range, so logs can be searched for one form. */
#define RANGE_FMT "[0x%" PRIx64 ", +%" PRIu64 ")"

struct region {
    uint64_t addr;
    uint64_t len;
    uint64_t gen;
    _Atomic uint64_t state;
    /* Set by the last releaser of a removed region, under the table's drain_lock, for the remover
     * waiting on drain_cond. Kept apart from @state so that the remover frees the region only
     * after the releaser has stopped touching it (it holds drain_lock until then). */
    bool drained;
};

/* addr must stay the first member: upper_bound() reads it at offset 0. */
struct slot {
    uint64_t addr;
    uint64_t len;
    struct region *r;
};

struct kvf_region_table {
    pthread_rwlock_t lock;
    struct slot *slots; /* sorted by addr, no overlaps; under lock */
    size_t n;
    size_t cap;
    uint64_t gen; /* table generation, also the source of region generations; under lock */

    /* Removers wait here for their region's last reference. One condition variable for the
     * whole table is enough: removal is rare, and each remover re-checks its own region. */
    pthread_mutex_t drain_lock;
    pthread_cond_t drain_cond;
};

/* A copy of a slot's bounds, taken under the lock so that messages are formatted outside it. */
struct span {
    bool valid;
    uint64_t addr;
    uint64_t len;
};

static const char *plural(uint64_t n)
{
    return n == 1 ? "" : "s";
}

/* NULL when [addr, addr+len) is a usable range, else why not. The end is checked as "last byte
 * addr+len-1 fits in 64 bits", so a range that ends exactly at 2^64 is accepted and no end value
 * ever has to be represented. */
static const char *range_invalid(uint64_t addr, uint64_t len)
{
    if (len == 0)
        return "length is 0";
    if (len - 1 > UINT64_MAX - addr)
        return "range runs past the end of the 64-bit address space";
    return NULL;
}

/* Whether [addr, addr+len) lies inside [r_addr, r_addr+r_len). Written with offsets only, so
 * nothing wraps even for hostile values (kvf__regions_check() gets its array from the network). */
static inline bool span_contains(uint64_t r_addr, uint64_t r_len, uint64_t addr, uint64_t len)
{
    return addr >= r_addr && addr - r_addr < r_len && len <= r_len - (addr - r_addr);
}

/* Index of the first element that starts after @addr (0..n) in an array sorted by start, whose
 * elements are @stride bytes and begin with their uint64_t start; the element before it, if any,
 * is the only one that can contain @addr. One search serves the table's slots and the
 * kvf_region_t arrays that kvf__regions_check() gets from peers. */
static inline size_t upper_bound(const void *base, size_t n, size_t stride, uint64_t addr)
{
    const unsigned char *b = base;
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint64_t start;
        memcpy(&start, b + mid * stride, sizeof(start));
        if (start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static inline size_t slots_upper_bound(const struct slot *s, size_t n, uint64_t addr)
{
    return upper_bound(s, n, sizeof(*s), addr);
}

static inline size_t regions_upper_bound(const kvf_region_t *s, size_t n, uint64_t addr)
{
    return upper_bound(s, n, sizeof(*s), addr);
}

/*
 * The -KVF_ENOTREG answer for a range that is not inside one region. @below is the region with
 * the greatest start <= addr, @next the one after it (either may be invalid). Shared by acquire
 * and check so that the sender's fast-fail and the target say the same thing.
 */
static int not_inside_err(uint64_t addr, uint64_t len, const struct span *below,
                          const struct span *next)
{
    if (below->valid && addr - below->addr < below->len) {
        /* Starts inside @below, so it runs past its end. (addr - below) + (len - 1) cannot wrap:
         * the range was validated, so addr + len - 1 fits in 64 bits. */
        uint64_t over = (addr - below->addr) + (len - 1) - (below->len - 1);
        bool into_next = next->valid && next->addr - below->addr == below->len;
        return kvf__err(-KVF_ENOTREG,
                        RANGE_FMT " runs %" PRIu64 " byte%s past the end of registered region "
                        RANGE_FMT "%s",
                        addr, len, over, plural(over), below->addr, below->len,
                        into_next ? " (into the adjacent region; a range may not span two regions)"
                                  : "");
    }
    if (next->valid && next->addr - addr < len) {
        /* Starts in a gap but reaches a region: say how far the region is, since an off-by-some
         * start address is the usual cause. */
        uint64_t gap = next->addr - addr;
        return kvf__err(-KVF_ENOTREG,
                        RANGE_FMT " starts outside every registered region (registered region "
                        RANGE_FMT " starts %" PRIu64 " byte%s later)",
                        addr, len, next->addr, next->len, gap, plural(gap));
    }
    return kvf__err(-KVF_ENOTREG, RANGE_FMT " starts outside every registered region", addr, len);
}

/*
 * Whether [addr, addr+len) (already validated) may be added to @s: 0, -KVF_EEXIST for exactly a
 * registered range, -KVF_EINVAL for an overlap. @with receives the conflicting region and *@pos
 * the index the new slot belongs at.
 */
static int find_conflict(const struct slot *s, size_t n, uint64_t addr, uint64_t len,
                         struct span *with, size_t *pos)
{
    size_t i = slots_upper_bound(s, n, addr);

    *pos = i;
    /* The table has no overlaps, so only the last region starting at or before @addr and the
     * first one starting after it can overlap the new range. */
    if (i > 0 && addr - s[i - 1].addr < s[i - 1].len) {
        *with = (struct span){true, s[i - 1].addr, s[i - 1].len};
        return s[i - 1].addr == addr && s[i - 1].len == len ? -KVF_EEXIST : -KVF_EINVAL;
    }
    if (i < n && s[i].addr - addr < len) {
        *with = (struct span){true, s[i].addr, s[i].len};
        return -KVF_EINVAL;
    }
    return 0;
}

static int conflict_err(int rc, const char *what, uint64_t addr, uint64_t len,
                        const struct span *with)
{
    if (rc == -KVF_EEXIST)
        return kvf__err(rc, "%s" RANGE_FMT ": already registered", what, addr, len);
    return kvf__err(rc, "%s" RANGE_FMT ": overlaps registered region " RANGE_FMT, what, addr, len,
                    with->addr, with->len);
}

/* Make room for @need slots. Called under the write lock: readers never see the array move. */
static int slots_reserve(kvf_region_table_t *t, size_t need)
{
    size_t cap = t->cap ? t->cap : SLOTS_MIN_CAP;
    struct slot *s;

    if (need <= t->cap)
        return 0;
    if (need > SIZE_MAX / 2 / sizeof(*s))
        return kvf__err(-KVF_ENOMEM, "register: %zu regions is more than can be addressed", need);
    while (cap < need)
        cap *= 2;
    s = realloc(t->slots, cap * sizeof(*s));
    if (!s)
        return kvf__err(-KVF_ENOMEM, "register: out of memory growing the region table to %zu",
                        cap);
    t->slots = s;
    t->cap = cap;
    return 0;
}

/* Give memory back after many removals. Failing to shrink is harmless, so it is not an error. */
static void slots_maybe_shrink(kvf_region_table_t *t)
{
    size_t cap = t->cap / 2;
    struct slot *s;

    if (t->cap <= SLOTS_MIN_CAP || t->n > t->cap / 4)
        return;
    s = realloc(t->slots, cap * sizeof(*s));
    if (s) {
        t->slots = s;
        t->cap = cap;
    }
}

static struct region *region_new(uint64_t addr, uint64_t len)
{
    struct region *r = malloc(sizeof(*r));
    if (!r)
        return NULL;
    r->addr = addr;
    r->len = len;
    r->gen = 0;
    atomic_init(&r->state, 0);
    r->drained = false;
    return r;
}

int kvf__regions_create(kvf_region_table_t **out)
{
    pthread_rwlockattr_t attr;
    kvf_region_table_t *t;
    int rc;

    t = calloc(1, sizeof(*t));
    if (!t)
        return kvf__err(-KVF_ENOMEM, "region table: out of memory");

    rc = -pthread_rwlockattr_init(&attr);
    if (rc)
        goto out_free;
    /* glibc's default rwlock prefers readers: with transfers acquiring from several threads
     * back to back, a register or unregister could wait for ever. Prefer the writer. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    rc = -pthread_rwlock_init(&t->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (rc)
        goto out_free;
    rc = -pthread_mutex_init(&t->drain_lock, NULL);
    if (rc)
        goto out_destroy_rwlock;
    rc = kvf__cond_init_monotonic(&t->drain_cond);
    if (rc)
        goto out_destroy_mutex;

    *out = t;
    return 0;

out_destroy_mutex:
    pthread_mutex_destroy(&t->drain_lock);
out_destroy_rwlock:
    pthread_rwlock_destroy(&t->lock);
out_free:
    free(t);
    return kvf__err(rc, "region table: pthread initialisation failed: %s", kvf_strerror(rc));
}

void kvf__regions_destroy(kvf_region_table_t *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->n; i++) {
        struct region *r = t->slots[i].r;
        uint64_t refs = atomic_load_explicit(&r->state, memory_order_acquire) & REGION_REFS_MASK;
        if (refs)
            KVF_WARN(SUBSYS, "destroy: region " RANGE_FMT " still has %" PRIu64
                             " operation%s in flight (caller bug)",
                     r->addr, r->len, refs, plural(refs));
        free(r);
    }
    free(t->slots);
    pthread_cond_destroy(&t->drain_cond);
    pthread_mutex_destroy(&t->drain_lock);
    pthread_rwlock_destroy(&t->lock);
    free(t);
}

int kvf__regions_add(kvf_region_table_t *t, uint64_t addr, uint64_t len, uint64_t *gen)
{
    const char *why = range_invalid(addr, len);
    struct span with = {0};
    struct region *r;
    uint64_t g;
    size_t pos;
    int rc;

    if (why)
        return kvf__err(-KVF_EINVAL, "register " RANGE_FMT ": %s", addr, len, why);
    /* Allocate before taking the write lock, which stalls every transfer while held. */
    r = region_new(addr, len);
    if (!r)
        return kvf__err(-KVF_ENOMEM, "register " RANGE_FMT ": out of memory", addr, len);

    pthread_rwlock_wrlock(&t->lock);
    rc = find_conflict(t->slots, t->n, addr, len, &with, &pos);
    if (rc)
        goto out_unlock;
    rc = slots_reserve(t, t->n + 1);
    if (rc)
        goto out_unlock;
    memmove(&t->slots[pos + 1], &t->slots[pos], (t->n - pos) * sizeof(t->slots[0]));
    t->slots[pos] = (struct slot){addr, len, r};
    t->n++;
    g = r->gen = ++t->gen;
    pthread_rwlock_unlock(&t->lock);

    KVF_DEBUG(SUBSYS, "registered " RANGE_FMT " gen %" PRIu64, addr, len, g);
    if (gen)
        *gen = g;
    return 0;

out_unlock:
    pthread_rwlock_unlock(&t->lock);
    free(r);
    if (rc == -KVF_ENOMEM)
        return rc; /* slots_reserve() already wrote the message */
    return conflict_err(rc, "register ", addr, len, &with);
}

/* A batch element, sorted by address to check the batch against itself in one pass. */
struct batch_ent {
    uint64_t addr;
    uint64_t len;
    size_t idx; /* position in the caller's arrays, for messages and generations */
    struct region *r;
};

static int batch_ent_cmp(const void *a, const void *b)
{
    const struct batch_ent *x = a, *y = b;
    if (x->addr != y->addr)
        return x->addr < y->addr ? -1 : 1;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

int kvf__regions_add_batch(kvf_region_table_t *t, const uint64_t *addrs, const uint64_t *lens,
                           size_t n)
{
    struct batch_ent *e;
    struct span with = {0};
    size_t allocated = 0, bad = 0, pos;
    uint64_t first_gen;
    int rc = 0;

    if (n == 0)
        return 0;
    if (!addrs || !lens)
        return kvf__err(-KVF_EINVAL, "register batch of %zu: NULL address or length array", n);

    e = calloc(n, sizeof(*e));
    if (!e)
        return kvf__err(-KVF_ENOMEM, "register batch of %zu: out of memory", n);
    for (size_t i = 0; i < n; i++) {
        const char *why = range_invalid(addrs[i], lens[i]);
        if (why) {
            rc = kvf__err(-KVF_EINVAL, "register batch element %zu " RANGE_FMT ": %s", i,
                          addrs[i], lens[i], why);
            goto out_free_entries;
        }
        e[i] = (struct batch_ent){addrs[i], lens[i], i, NULL};
    }

    /* Sorted by address, a batch overlaps itself if and only if two neighbours overlap: a range
     * that covers a later start also covers every start in between. */
    qsort(e, n, sizeof(*e), batch_ent_cmp);
    for (size_t i = 0; i + 1 < n; i++) {
        const struct batch_ent *a = &e[i], *b = &e[i + 1];
        if (b->addr - a->addr >= a->len)
            continue;
        if (a->addr == b->addr && a->len == b->len)
            rc = kvf__err(-KVF_EEXIST,
                          "register batch element %zu " RANGE_FMT ": same range as element %zu",
                          b->idx, b->addr, b->len, a->idx);
        else
            rc = kvf__err(-KVF_EINVAL,
                          "register batch element %zu " RANGE_FMT
                          ": overlaps batch element %zu " RANGE_FMT,
                          b->idx, b->addr, b->len, a->idx, a->addr, a->len);
        goto out_free_entries;
    }

    for (; allocated < n; allocated++) {
        e[allocated].r = region_new(e[allocated].addr, e[allocated].len);
        if (!e[allocated].r) {
            rc = kvf__err(-KVF_ENOMEM, "register batch of %zu: out of memory", n);
            goto out_free_regions;
        }
    }

    pthread_rwlock_wrlock(&t->lock);
    for (size_t i = 0; i < n; i++) {
        rc = find_conflict(t->slots, t->n, e[i].addr, e[i].len, &with, &pos);
        if (rc) {
            bad = i;
            goto out_unlock;
        }
    }
    rc = slots_reserve(t, t->n + n);
    if (rc)
        goto out_unlock;

    /* Merge from the back, in place: one pass over the array instead of a memmove per element,
     * so registering 100,000 regions in one batch is linear, not quadratic. */
    first_gen = t->gen + 1;
    {
        size_t old = t->n, add = n, w = t->n + n;
        while (add > 0) {
            const struct batch_ent *b = &e[add - 1];
            if (old > 0 && t->slots[old - 1].addr > b->addr) {
                t->slots[--w] = t->slots[--old];
            } else {
                /* Generations follow the caller's order, so element 0 gets the lowest. */
                b->r->gen = first_gen + b->idx;
                t->slots[--w] = (struct slot){b->addr, b->len, b->r};
                add--;
            }
        }
    }
    t->n += n;
    t->gen += n;
    pthread_rwlock_unlock(&t->lock);

    KVF_DEBUG(SUBSYS, "registered a batch of %zu regions, gens %" PRIu64 "..%" PRIu64, n,
              first_gen, first_gen + n - 1);
    free(e);
    return 0;

out_unlock:
    pthread_rwlock_unlock(&t->lock);
    if (rc != -KVF_ENOMEM) {
        char what[64];
        snprintf(what, sizeof(what), "register batch element %zu ", e[bad].idx);
        rc = conflict_err(rc, what, e[bad].addr, e[bad].len, &with);
    }
out_free_regions:
    for (size_t i = 0; i < allocated; i++)
        free(e[i].r);
out_free_entries:
    free(e);
    return rc;
}

int kvf__regions_acquire(kvf_region_table_t *t, uint64_t addr, uint64_t len, kvf_region_ref_t *ref)
{
    struct span below = {0}, next = {0};
    const char *why = range_invalid(addr, len);
    size_t i;

    if (why)
        return kvf__err(-KVF_EINVAL, RANGE_FMT ": %s", addr, len, why);

    pthread_rwlock_rdlock(&t->lock);
    i = slots_upper_bound(t->slots, t->n, addr);
    if (i > 0 && span_contains(t->slots[i - 1].addr, t->slots[i - 1].len, addr, len)) {
        struct region *r = t->slots[i - 1].r;
        /* Relaxed is enough: the region cannot be unlinked while we hold the read lock, and the
         * unlock orders this increment before the remover's flag update. */
        atomic_fetch_add_explicit(&r->state, 1, memory_order_relaxed);
        pthread_rwlock_unlock(&t->lock);
        ref->opaque = r;
        return 0;
    }
    if (i > 0)
        below = (struct span){true, t->slots[i - 1].addr, t->slots[i - 1].len};
    if (i < t->n)
        next = (struct span){true, t->slots[i].addr, t->slots[i].len};
    pthread_rwlock_unlock(&t->lock);

    ref->opaque = NULL;
    return not_inside_err(addr, len, &below, &next);
}

void kvf__regions_release(kvf_region_table_t *t, kvf_region_ref_t *ref)
{
    struct region *r = ref->opaque;
    uint64_t prev;

    if (!r)
        return;
    ref->opaque = NULL;
    /* acq_rel: whoever frees the region must see every use of it by the holders. */
    prev = atomic_fetch_sub_explicit(&r->state, 1, memory_order_acq_rel);
    if ((prev & REGION_REFS_MASK) != 1 || !(prev & REGION_REMOVED))
        return;

    /* Last reference to a removed region. The flags in the same word we just decremented tell
     * us, without a race, whether the remover is still waiting for us. */
    if (prev & REGION_ORPHANED) {
        KVF_DEBUG(SUBSYS, "last operation on unregistered " RANGE_FMT " finished; freed",
                  r->addr, r->len);
        free(r);
        return;
    }
    pthread_mutex_lock(&t->drain_lock);
    r->drained = true;
    pthread_cond_broadcast(&t->drain_cond);
    pthread_mutex_unlock(&t->drain_lock);
}

int kvf__regions_remove(kvf_region_table_t *t, uint64_t addr, uint32_t timeout_ms)
{
    /* The deadline counts from the call, in nanoseconds, so the wait is never shorter than
     * asked (a millisecond deadline would round the start down). */
    uint64_t deadline_ns = kvf__now_ns() + (uint64_t)timeout_ms * 1000000u;
    struct timespec ts = {.tv_sec = (time_t)(deadline_ns / 1000000000u),
                          .tv_nsec = (long)(deadline_ns % 1000000000u)};
    struct span below = {0};
    struct region *r;
    uint64_t prev, len, gen;
    size_t i;

    pthread_rwlock_wrlock(&t->lock);
    i = slots_upper_bound(t->slots, t->n, addr);
    if (i == 0 || t->slots[i - 1].addr != addr) {
        if (i > 0)
            below = (struct span){true, t->slots[i - 1].addr, t->slots[i - 1].len};
        pthread_rwlock_unlock(&t->lock);
        if (below.valid && addr - below.addr < below.len)
            return kvf__err(-KVF_ENOTREG,
                            "unregister 0x%" PRIx64 ": no registered region starts there (it is "
                            "%" PRIu64 " bytes into registered region " RANGE_FMT ")",
                            addr, addr - below.addr, below.addr, below.len);
        return kvf__err(-KVF_ENOTREG, "unregister 0x%" PRIx64 ": no registered region starts there",
                        addr);
    }
    r = t->slots[i - 1].r;
    memmove(&t->slots[i - 1], &t->slots[i], (t->n - i) * sizeof(t->slots[0]));
    t->n--;
    t->gen++;
    slots_maybe_shrink(t);
    /* Under the write lock, so no acquire is between its search and its increment. From here on
     * the reference count can only go down. */
    prev = atomic_fetch_or_explicit(&r->state, REGION_REMOVED, memory_order_acq_rel);
    pthread_rwlock_unlock(&t->lock);

    /* Copies: once the region is orphaned below, its last releaser may free it at any moment. */
    len = r->len;
    gen = r->gen;
    if ((prev & REGION_REFS_MASK) == 0)
        goto out_free;

    KVF_DEBUG(SUBSYS, "unregister " RANGE_FMT ": waiting for %" PRIu64 " operation%s in flight",
              addr, len, prev & REGION_REFS_MASK, plural(prev & REGION_REFS_MASK));
    pthread_mutex_lock(&t->drain_lock);
    while (!r->drained) {
        if (pthread_cond_timedwait(&t->drain_cond, &t->drain_lock, &ts) == ETIMEDOUT)
            break;
    }
    if (!r->drained) {
        prev = atomic_fetch_or_explicit(&r->state, REGION_ORPHANED, memory_order_acq_rel);
        if (prev & REGION_REFS_MASK) {
            uint64_t refs = prev & REGION_REFS_MASK;
            pthread_mutex_unlock(&t->drain_lock);
            KVF_WARN(SUBSYS, "unregister " RANGE_FMT ": %" PRIu64 " operation%s still in flight "
                             "after %" PRIu32 " ms; the memory must stay valid until they end",
                     addr, len, refs, plural(refs), timeout_ms);
            return kvf__err(-KVF_ETIMEDOUT,
                            "unregister " RANGE_FMT ": %" PRIu64 " operation%s still in flight "
                            "after %" PRIu32 " ms (new ones are refused; the region is released "
                            "when they finish)",
                            addr, len, refs, plural(refs), timeout_ms);
        }
        /* The last reference went between the timeout and the flag: its releaser saw no
         * ORPHANED flag and is about to take drain_lock to set r->drained. Freeing now would let
         * it write freed memory, so wait the few instructions it needs. */
        while (!r->drained)
            pthread_cond_wait(&t->drain_cond, &t->drain_lock);
    }
    pthread_mutex_unlock(&t->drain_lock);

out_free:
    free(r);
    KVF_DEBUG(SUBSYS, "unregistered " RANGE_FMT " gen %" PRIu64, addr, len, gen);
    return 0;
}

int kvf__regions_snapshot(kvf_region_table_t *t, kvf_region_t **out, size_t *n,
                          uint64_t *table_gen)
{
    kvf_region_t *a = NULL;
    size_t count;
    uint64_t g;

    pthread_rwlock_rdlock(&t->lock);
    count = t->n;
    g = t->gen;
    if (count) {
        a = malloc(count * sizeof(*a));
        if (!a) {
            pthread_rwlock_unlock(&t->lock);
            return kvf__err(-KVF_ENOMEM, "region snapshot of %zu: out of memory", count);
        }
        for (size_t i = 0; i < count; i++)
            a[i] = (kvf_region_t){t->slots[i].addr, t->slots[i].len, t->slots[i].r->gen};
    }
    pthread_rwlock_unlock(&t->lock);

    *out = a;
    *n = count;
    if (table_gen)
        *table_gen = g;
    return 0;
}

bool kvf__regions_holds(const kvf_region_t *sorted, size_t n, uint64_t addr, uint64_t len)
{
    if (range_invalid(addr, len))
        return false;
    size_t i = regions_upper_bound(sorted, n, addr);
    return i > 0 && span_contains(sorted[i - 1].addr, sorted[i - 1].len, addr, len);
}

int kvf__regions_check(const kvf_region_t *sorted, size_t n, uint64_t addr, uint64_t len)
{
    struct span below = {0}, next = {0};
    const char *why = range_invalid(addr, len);
    size_t i;

    if (why)
        return kvf__err(-KVF_EINVAL, RANGE_FMT ": %s", addr, len, why);
    if (kvf__regions_holds(sorted, n, addr, len))
        return 0;
    i = regions_upper_bound(sorted, n, addr);
    if (i > 0)
        below = (struct span){true, sorted[i - 1].addr, sorted[i - 1].len};
    if (i < n)
        next = (struct span){true, sorted[i].addr, sorted[i].len};
    return not_inside_err(addr, len, &below, &next);
}
