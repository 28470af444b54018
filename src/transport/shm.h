/*
 * The shm transport's private header, shared by its files:
 *
 *   shm_copy.c   the pool of copy threads that share one large memcpy
 *   shm_memfd.c  the memfd socket: the target serving the fds of its kvf_mem_alloc memory, and
 *                the sender mapping them, per peer region
 *   shm.c        the ops: create/destroy, the handshake (peer_open), process_vm transfers
 *
 * shm.c calls the other two, which call neither each other nor shm.c.
 */
#ifndef KVF_TRANSPORT_SHM_H
#define KVF_TRANSPORT_SHM_H

#include <pthread.h>
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

typedef struct {
    uint64_t addr;
    uint64_t len;
    int fd;
} shm_export_t;

struct shm_transport {
    char local_sid[KVF_SESSION_ID_MAX];
    kvf_region_table_t *regions;
    /* kvf_mem_alloc memory, by address. Held while an fd is being sent, so the engine's close
     * after mem_unexport() never races with a send. */
    pthread_mutex_t exp_lock;
    shm_export_t *exps;
    size_t nexps;
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
};

/* What the sender knows about one of the target's published regions. */
enum { SHM_R_UNKNOWN, SHM_R_PLAIN, SHM_R_MAPPED };
typedef struct {
    kvf_region_t r;
    int state;
    uint8_t *map; /* SHM_R_MAPPED: the target's memfd mapped here, map_len bytes */
    size_t map_len;
} shm_rmap_t;

struct shm_peer {
    struct shm_transport *t; /* for the copy pool */
    char sid[KVF_SESSION_ID_MAX];
    pid_t pid;
    uint64_t word_addr;
    uint64_t nonce;
    char sock[KVF_SHM_SOCK_MAX]; /* "" = the target serves no memfds */
    /* The published regions as last given to regions_changed(), with their mappings. Held
     * shared for the whole of a transfer (so a mapping is never unmapped under a memcpy) and
     * exclusive to change the list. Writer preference keeps a change from starving. */
    pthread_rwlock_t map_lock;
    shm_rmap_t *rmaps;
    size_t nrmaps;
    /* One memfd request at a time per peer: concurrent first writes ask once. */
    pthread_mutex_t ask_lock;
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
/* The regions_changed op (transport.h). */
void shm_regions_changed(kvf_tpeer_t *pp, const kvf_region_t *rs, size_t n);
/* Learn, once per region, whether the region containing @x is kvf_mem_alloc memory, and map it
 * if so. Called without map_lock. */
void shm_resolve(struct shm_peer *p, const kvf_xfer_t *x);
/* Where @x's remote range is mapped here, or NULL (use process_vm). map_lock held. */
uint8_t *shm_mapped(struct shm_peer *p, const kvf_xfer_t *x);

#endif /* KVF_TRANSPORT_SHM_H */
