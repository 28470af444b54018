/*
 * The shm transport's private header, shared by its files:
 *
 *   shm_copy.c   the pool of copy threads that share one large memcpy
 *   shm_fence.c  the fence that lets a target's unregister wait out the senders' copies: the
 *                page of per-sender counters, its slots, the drain, enter and leave
 *   shm_memfd.c  the memfd socket: the target serving the fds of its kvf_mem_alloc memory and
 *                of its fence page, and the sender mapping them
 *   shm_warm.c   the sender's warmer: maps a peer's kvf_mem_alloc regions when they are learned
 *                and warms the mappings, off the transfer path
 *   shm_table.c  the region table the target publishes in shared memory, and the sender's
 *                reads of it (its generation, its entries, whether the target is still there)
 *   shm.c        the ops: create/destroy, the handshake (peer_open), process_vm transfers
 *
 * shm.c calls the other five; shm_warm.c calls shm_memfd.c; shm_memfd.c calls shm_fence.c and
 * shm_table.c; nothing calls back up.
 */
#ifndef KVF_TRANSPORT_SHM_H
#define KVF_TRANSPORT_SHM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/common.h"
#include "common/regions.h"
#include "transport/transport.h"

#define SHM_LOG "shm"

/* Most threads one copy may use, the caller included (see shm_copy.c). */
#define SHM_COPY_MAX 8
/* Bytes of each mapped region the warmer warms (shm_warm.c), from its start: at about 5 us per
 * page where warming matters, 256 MiB is about 0.3 s of one core, off the transfer path. */
#define SHM_WARM_MAX ((size_t)256 << 20)
/* Regions of one peer the warmer asks the target about (one memfd request each, answered by the
 * target's one socket thread); regions past it are asked about by their first transfer. */
#define SHM_WARM_REGIONS_MAX 256u

typedef struct {
    uint64_t addr;
    uint64_t len;
    int fd;
} shm_export_t;

/*
 * The fence (shm_fence.c). A target's CPU takes no part in a shm copy, so its unregister cannot
 * take a reference the copy holds, as tcp's and loop's do. Instead each sender engine holds a
 * slot of a page the target shares with it (a memfd sealed against shrinking, growing and new
 * seals, handed over the memfd socket; a sender refuses one that could be shrunk under its
 * mapping), and counts its transfers in and out there, each under the epoch it entered in:
 *
 *   sender:  e = epoch; count[e & 1]++; if epoch != e: count[e & 1]--, again   (enter)
 *            load the generation (and copy the table) from the shared table,
 *            check, copy                                                        (the transfer)
 *            count[e & 1]--                                                     (leave)
 *   target:  publish the new table; e = epoch++; wait until every live slot's count[e & 1]
 *            is 0                                                               (drain)
 *
 * All sequentially consistent. A sender counted under e before the bump is waited for; one that
 * counts itself after the bump, or whose re-check sees the new epoch, reads the table after it
 * was replaced and so cannot touch the unregistered range. Drains run one at a time, so each
 * waits out exactly the parity its own bump closed. A slot is the target's while its holder's
 * connection is open; a holder that exited (pidfd readable) holds nothing up.
 */
#define SHM_FENCE_SLOTS 256
#define SHM_FENCE_MAGIC 0x65636e6566666b76ull /* "vkffence" little-endian */
typedef struct {
    _Atomic uint64_t count[2];
    uint64_t pad[6]; /* one cache line per slot: senders do not share lines */
} shm_fence_slot_t;
typedef struct {
    uint64_t magic;
    _Atomic uint64_t epoch;
    uint64_t pad[6];
    shm_fence_slot_t slot[SHM_FENCE_SLOTS];
} shm_fence_page_t;

/*
 * The shared region table (shm_table.c): the target's region table and its generation, in a
 * memfd the target maps read-write and seals (no shrinking or growing, and no new writable
 * mapping where the kernel has F_SEAL_FUTURE_WRITE), handed with the fence page to every sender,
 * which maps it read-only. A seqlock, as the word's was: @seq is odd while the target rewrites
 * @gen, @count and the entries, so a reader that sees it odd, or moved across its copy, reads
 * again (a bounded number of times). @count may exceed what the mapping holds (the target has
 * more regions than fit): senders then refuse the table. @magic is cleared when the engine's
 * transport is destroyed. The entries are sorted and non-overlapping, as kvf__regions_snapshot
 * gives them; a sender checks that too.
 */
#define SHM_TABLE_MAGIC 0x656c6261746b7662ull /* "bvktable" little-endian */
typedef struct {
    uint64_t magic;
    uint64_t seq;
    uint64_t gen;
    uint64_t count;
    uint64_t pad[4];
    /* A robust, process-shared mutex that the target's memfd socket thread holds for as long
     * as it serves. When that thread ends, or the process dies or execs, the kernel marks its
     * futex word (its owner's TID) dead, with no help from the target: a sender's load of that
     * word tells a dead target apart without a syscall. */
    union {
        pthread_mutex_t m;
        uint64_t pad[8];
    } alive;
    kvf_region_t r[];
} shm_table_t;
_Static_assert(sizeof(pthread_mutex_t) <= 64, "shm_table_t.alive holds a pthread_mutex_t");
/* Entries the target's table holds: as many as a sender ever accepted from the word. */
#define SHM_TABLE_CAP ((size_t)KVF_SHM_MAX_REGIONS)
#define SHM_TABLE_BYTES (sizeof(shm_table_t) + SHM_TABLE_CAP * sizeof(kvf_region_t))

/* The target's record of a slot's holder, in its private memory. */
typedef struct {
    int conn;  /* the holder's connection to the memfd socket; -1 = slot free */
    int pidfd; /* readable once the holder exited; -1 when pidfd_open failed */
    pid_t pid;
    char sid[KVF_SESSION_ID_MAX]; /* as the holder named itself: for messages only */
} shm_fence_holder_t;

struct shm_transport {
    char local_sid[KVF_SESSION_ID_MAX];
    long test_hold_ms; /* KVFERRY_SHM_TEST_HOLD_MS at create (shm.c) */
    uint64_t word_addr; /* the engine's kvf_shm_word_t, told to senders with their fence slot */
    kvf_region_table_t *regions;
    /* kvf_mem_alloc memory, by address. Held while an fd is being sent, so the engine's close
     * after mem_unexport() never races with a send. */
    pthread_mutex_t exp_lock;
    shm_export_t *exps;
    size_t nexps;
    /* The fence page (NULL when not serving: then no sender may use shm), the holders of its
     * slots (under fence_lock), and drain_lock, which runs drains one at a time. */
    shm_fence_page_t *fence;
    int fence_fd;
    pthread_mutex_t fence_lock;
    pthread_mutex_t drain_lock;
    shm_fence_holder_t holders[SHM_FENCE_SLOTS];
    /* The shared region table (NULL when not serving), created and destroyed with the fence. */
    shm_table_t *table;
    int table_fd;
    /* The memfd socket: -1 when not serving. */
    char sock[KVF_SHM_SOCK_MAX];
    int lfd;
    int wake; /* eventfd: tells the serving thread to stop */
    pthread_t thread;
    /* The copy pool: copy_threads - 1 workers, started on the first large copy. One job at a
     * time (job_lock; a caller that finds it taken copies alone); the job's fields, the share
     * counters and the workers' lifecycle are under pool_lock. */
    unsigned copy_threads;
    pthread_mutex_t job_lock;
    pthread_mutex_t pool_lock;
    pthread_cond_t work_cv; /* a job was posted, or stop */
    pthread_cond_t done_cv; /* the last share of a job finished */
    pthread_t workers[SHM_COPY_MAX - 1];
    unsigned nworkers; /* started */
    bool pool_failed;  /* starting a worker failed once: no more attempts */
    bool stop;
    uint64_t job_seq;
    uint8_t *job_dst;
    const uint8_t *job_src;
    size_t job_len, job_share;
    unsigned job_nshares, job_next, job_pending;
    /* The warmer (shm_warm.c): one thread, started by the first region to warm; its queue of
     * peers with regions to map and warm (linked by warm_next), the peer it works on, and the
     * flags, all under warm_lock. warm_cancel asks it to leave warm_cur at the next chunk. */
    pthread_mutex_t warm_lock;
    pthread_cond_t warm_cv; /* work queued, stop, or the warmer left a peer */
    pthread_t warm_thread;
    bool warm_started, warm_failed, warm_stop;
    struct shm_peer *warm_head, *warm_cur;
    atomic_bool warm_cancel;
    /* Counters, for tests and debugging: regions mapped by the warmer, pages it warmed, regions
     * mapped by a transfer (the warmer is off, or will not take them), and elements a transfer
     * moved with process_vm while the warmer had their region still to map or warm. */
    _Atomic uint64_t warm_regions, warm_pages, xfer_maps, xfer_unwarmed;
    /* Test hook: called by the warmer after it warmed each chunk, without locks. */
    void (*test_warm_hook)(void *arg);
    void *test_warm_arg;
};

/* What the sender knows about one of the target's published regions. */
enum { SHM_R_UNKNOWN, SHM_R_PLAIN, SHM_R_MAPPED };
typedef struct {
    kvf_region_t r;
    int state;
    uint8_t *map; /* SHM_R_MAPPED: the target's memfd mapped here, map_len bytes */
    size_t map_len;
    bool warm_done; /* the warmer has taken this region (kept while the region is) */
    /* Transfers may copy through the mapping: it was made by a transfer, or the warmer has
     * warmed it. Until then they use process_vm_writev/readv, whose pages are warm already
     * (registration touched them), rather than wait for the fd or copy through cold pages. */
    bool ready;
} shm_rmap_t;

struct shm_peer {
    struct shm_transport *t; /* for the copy pool */
    char sid[KVF_SESSION_ID_MAX];
    pid_t pid;
    uint64_t word_addr;
    char sock[KVF_SHM_SOCK_MAX]; /* "" = the target serves no memfds */
    /* The published regions as last given to regions_changed(), with their mappings. Held
     * shared for the whole of a transfer (so a mapping is never unmapped under a memcpy) and
     * exclusive to change the list. Writer preference keeps a change from starving. */
    pthread_rwlock_t map_lock;
    shm_rmap_t *rmaps;
    size_t nrmaps;
    /* One memfd request at a time per peer: concurrent first writes ask once. */
    pthread_mutex_t ask_lock;
    /* Our slot of the target's fence page, held while fence_conn is open. */
    shm_fence_page_t *fence;
    unsigned fence_slot;
    int fence_conn;
    /* The target's shared region table, mapped read-only with table_cap entries (from the
     * mapping's size); and the target's pidfd, readable once it exited (-1 when pidfd_open
     * failed), which names the cause once the table says the target is gone. */
    const shm_table_t *table;
    size_t table_len, table_cap;
    int pidfd;
    /* In the warmer's queue (under the transport's warm_lock); regions it took (map_lock). */
    struct shm_peer *warm_next;
    bool warm_queued;
    unsigned warm_taken;
};

static inline struct shm_transport *shm_of(kvf_transport_t *t)
{
    return (struct shm_transport *)(void *)t;
}

static inline struct shm_peer *shm_peer_of(kvf_tpeer_t *p)
{
    return (struct shm_peer *)(void *)p;
}

/* ---- shm_copy.c ----------------------------------------------------------------------------- */

/* The threads one large copy may use, the caller included (KVFERRY_SHM_COPY_THREADS or the
 * CPUs online); @sid names the engine in a warning about a malformed setting. */
unsigned shm_copy_threads_conf(const char *sid);
/* Copy @len bytes from @s to @d: split over the pool when large enough and the pool is free,
 * else one memcpy. Returns when every byte is copied. @t may be NULL (one memcpy). */
void shm_copy(struct shm_transport *t, void *d, const void *s, size_t len);
/* Stop and join the pool's workers and destroy its locks (destroy). */
void shm_pool_stop(struct shm_transport *t);

/* ---- shm_fence.c: the target ---------------------------------------------------------------- */

/* Create the fence page (t->fence, t->fence_fd), its locks and the shared region table
 * (shm_table_create). Returns 0 or -errno. */
int shm_fence_create(struct shm_transport *t);
/* Destroy the shared region table, close every holder's connection and unmap the page. No
 * drain may be running. */
void shm_fence_destroy(struct shm_transport *t);
/* Give a slot to the process @pid (from SO_PEERCRED) on connection @conn, which it keeps open
 * while it holds the slot; @sid is its claim, for messages. Returns the slot, or -KVF_EBUSY when
 * all are taken. */
int shm_fence_admit(struct shm_transport *t, int conn, pid_t pid, const char *sid);
/* The holder of @slot closed its connection (or broke the protocol): close it, free the slot. */
void shm_fence_release(struct shm_transport *t, unsigned slot);
/* The connections of the slots in use, for the serving thread's poll: fills up to @max entries
 * of @fds and @slots, returns how many. */
size_t shm_fence_conns(struct shm_transport *t, int *fds, unsigned *slots, size_t max);
/* The drain op (transport.h). */
int shm_fence_drain(kvf_transport_t *tt, uint64_t deadline_ms);

/* ---- shm_fence.c: the sender ---------------------------------------------------------------- */

/* The guard_enter and guard_leave ops (transport.h). */
int shm_fence_enter(kvf_tpeer_t *pp, uint64_t *token);
void shm_fence_leave(kvf_tpeer_t *pp, uint64_t token);

/* ---- shm_memfd.c: the target ---------------------------------------------------------------- */

/* Start serving the fds of exported memory on the abstract socket @name; a failure is logged
 * and leaves t->lfd at -1 (senders then use process_vm_writev). */
void shm_fd_listen(struct shm_transport *t, const char *name);
/* The mem_export, mem_unexport and mem_sock ops (transport.h). */
int shm_mem_export(kvf_transport_t *tt, void *addr, size_t len, int fd);
void shm_mem_unexport(kvf_transport_t *tt, void *addr);
const char *shm_mem_sock(const kvf_transport_t *tt);

/* ---- shm_memfd.c: the sender ---------------------------------------------------------------- */

/* Unmap the mapped entries of @m and free it. */
void shm_rmaps_free(shm_rmap_t *m, size_t n);
/* The regions_changed op (transport.h); returns whether a region is left for the warmer. */
bool shm_regions_changed(kvf_tpeer_t *pp, const kvf_region_t *rs, size_t n);
/* The entry for the region that contains all of [@addr, @addr+@len), or NULL. map_lock held. */
shm_rmap_t *shm_rmap_find(struct shm_peer *p, uint64_t addr, uint64_t len);
/* Take a slot of the target's fence page (p->fence, fence_slot, fence_conn), map its shared
 * region table (p->table) and learn the address of its word (p->word_addr), from the process
 * p->pid only. Returns 0, or -KVF_ENOTSUP
 * with the reason (the target serves no socket, is full, answered wrongly, or its page is not
 * sealed against shrinking): without a slot,
 * shm must not be used to that target. */
int shm_fence_open(struct shm_peer *p, const char *local_sid);
/* Give the slot back (close the connection) and unmap the page. */
void shm_fence_close(struct shm_peer *p);
/* Learn, once per region, whether the region containing @x is kvf_mem_alloc memory, and map it
 * if so. Called without map_lock. */
void shm_resolve(struct shm_peer *p, const kvf_xfer_t *x);
/* The same for the published region @r: asks the target unless the region is known already (or
 * no longer published as @r); counts a mapping it made in @made; a mapping it makes is ready
 * for transfers at once when @ready (a transfer's), else once the warmer marks it. Returns
 * whether @r is mapped. Called without map_lock. */
bool shm_resolve_region(struct shm_peer *p, const kvf_region_t *r, _Atomic uint64_t *made,
                        bool ready);

/* ---- shm_table.c ---------------------------------------------------------------------------- */

/* The target: create the table (t->table, t->table_fd), empty with generation 0; destroy it
 * (clears its magic first). shm_table_create returns 0 or -errno. */
int shm_table_create(struct shm_transport *t);
void shm_table_destroy(struct shm_transport *t);
/* The memfd socket thread, first and last: hold the table's alive mutex while serving. */
void shm_table_hold(struct shm_transport *t);
void shm_table_release(struct shm_transport *t);
/* Publish @n regions @rs (sorted) of generation @gen in @h, which holds @cap entries. The caller
 * serialises calls. Also what a test uses to forge a table. */
void shm_table_set(shm_table_t *h, size_t cap, const kvf_region_t *rs, size_t n, uint64_t gen);
/* The regions_published op (transport.h). */
void shm_regions_published(kvf_transport_t *tt, const kvf_region_t *rs, size_t n, uint64_t gen);
/* The sender: map the table from @fd (p->table, table_len, table_cap). Returns 0, or -1 with the
 * reason in @why (not a sealed table of sane size, or no magic). */
int shm_table_map(struct shm_peer *p, int fd, char *why, size_t whylen);
void shm_table_unmap(struct shm_peer *p);
/* Is the target still there (the table's magic set and its alive mutex held: loads, no
 * syscall)? 0, or -KVF_EPEERGONE naming it ("process N is gone" once its pidfd says so).
 * p->table is set. */
int shm_table_alive(struct shm_peer *p);
/* The live generation (after shm_table_alive), a load from the mapping. */
int shm_table_gen(struct shm_peer *p, uint64_t *gen);
/* A consistent copy of the table (regions_read, transport.h): -KVF_EPROTO for a count past the
 * mapping or entries not sorted and non-overlapping, -KVF_EBUSY when the seqlock stayed odd or
 * kept moving for a bounded number of tries. */
int shm_table_read(struct shm_peer *p, kvf_region_t **out, size_t *n, uint64_t *gen);

/* ---- shm_warm.c: the sender's warmer -------------------------------------------------------- */

/* Create the warmer's lock and counters (create); no thread runs until shm_warm_queue(). */
void shm_warm_init(struct shm_transport *t);
/* @p has regions the warmer has not taken: queue it (starting the thread the first time). Does
 * nothing when KVFERRY_NO_WARM=1 or the target serves no memfds. Cheap; takes no map_lock. */
void shm_warm_queue(struct shm_peer *p);
/* @p is being closed: take it out of the queue, or cancel the warmer's work on it and wait until
 * the warmer has left it (at most one chunk, or a fd request's socket timeouts). */
void shm_warm_forget(struct shm_peer *p);
/* Stop and join the thread, destroy the lock (destroy; every peer is closed). */
void shm_warm_stop(struct shm_transport *t);
/* For tests: wait until the queue is empty and the warmer idle, or @deadline_ms (kvf__now_ms()
 * clock). Returns 0 or -KVF_ETIMEDOUT. */
int shm_warm_idle(struct shm_transport *t, uint64_t deadline_ms);
/* Where @x's remote range is mapped here and ready, or NULL (use process_vm); with @pending,
 * whether it is NULL because the warmer is still to map or warm the region. map_lock held. */
uint8_t *shm_mapped(struct shm_peer *p, const kvf_xfer_t *x, bool *pending);


#endif /* KVF_TRANSPORT_SHM_H */
