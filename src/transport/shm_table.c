/*
 * The shared region table of the shm transport (the layout is in shm.h): the target publishes
 * its region table and generation in a sealed memfd that every sender holding a fence slot maps
 * read-only, so a sender's check before each transfer is a load from shared memory and a
 * refresh is a seqlock copy, with no process_vm_readv of the target's word. Whether the target
 * is still there is a load too: the table's magic (cleared when the engine goes) and the futex
 * word of its alive mutex (marked dead by the kernel when the serving thread ends); only once
 * those say it is gone does a poll of its pidfd tell an exited process from a withdrawn engine.
 *
 * The sender treats the mapping as hostile input: the count is bounded by what its own mapping
 * holds (from fstat at open, never from the page), every read is a bounded number of tries, and
 * a copy is used only when the seqlock was even and unmoved across it and the entries are sorted
 * and non-overlapping.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/futex.h>
#include <pthread.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "transport/shm.h"

/* Tries of a table read that keeps meeting the target's updates (or an odd seqlock) before
 * giving up with -KVF_EBUSY. */
#define SHM_TABLE_TRIES 100

/* ---- the target ------------------------------------------------------------------------------ */

int shm_table_create(struct shm_transport *t)
{
    t->table_fd = memfd_create("kvf-regions", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (t->table_fd < 0)
        return -errno;
    void *m = MAP_FAILED;
    if (ftruncate(t->table_fd, (off_t)SHM_TABLE_BYTES) == 0)
        m = mmap(NULL, SHM_TABLE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, t->table_fd, 0);
    if (m == MAP_FAILED) {
        int rc = -errno;
        close(t->table_fd);
        t->table_fd = -1;
        return rc;
    }
    /* Senders may neither write the table (they map it from an fd that forbids new writable
     * mappings) nor shrink it under one another's mappings, and the seals are final (as the
     * fence page's). FUTURE_WRITE needs Linux 5.1. */
    if (fcntl(t->table_fd, F_ADD_SEALS,
              F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) < 0 &&
        fcntl(t->table_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int rc = -errno;
        munmap(m, SHM_TABLE_BYTES);
        close(t->table_fd);
        t->table_fd = -1;
        return rc;
    }
    t->table = m;
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(&t->table->alive.m, &ma);
    pthread_mutexattr_destroy(&ma);
    if (rc != 0) {
        munmap(m, SHM_TABLE_BYTES);
        close(t->table_fd);
        t->table = NULL;
        t->table_fd = -1;
        return -rc;
    }
    __atomic_store_n(&t->table->magic, SHM_TABLE_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

void shm_table_hold(struct shm_transport *t)
{
    if (t->table)
        pthread_mutex_lock(&t->table->alive.m); /* never held before: no EOWNERDEAD */
}

void shm_table_release(struct shm_transport *t)
{
    if (t->table)
        pthread_mutex_unlock(&t->table->alive.m);
}

void shm_table_destroy(struct shm_transport *t)
{
    if (!t->table)
        return;
    /* A sender that checks after this finds no engine here. */
    __atomic_store_n(&t->table->magic, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_destroy(&t->table->alive.m); /* the serving thread released it, or never ran */
    munmap(t->table, SHM_TABLE_BYTES);
    close(t->table_fd);
    t->table = NULL;
    t->table_fd = -1;
}

void shm_table_set(shm_table_t *h, size_t cap, const kvf_region_t *rs, size_t n, uint64_t gen)
{
    uint64_t s = __atomic_load_n(&h->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&h->seq, s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (size_t i = 0; i < n && i < cap; i++) {
        __atomic_store_n(&h->r[i].addr, rs[i].addr, __ATOMIC_RELAXED);
        __atomic_store_n(&h->r[i].len, rs[i].len, __ATOMIC_RELAXED);
        __atomic_store_n(&h->r[i].gen, rs[i].gen, __ATOMIC_RELAXED);
    }
    /* More than fit: the count says so, and senders refuse the table (as they refused one of
     * more than KVF_SHM_MAX_REGIONS entries read from the word). */
    __atomic_store_n(&h->count, (uint64_t)n, __ATOMIC_RELAXED);
    __atomic_store_n(&h->gen, gen, __ATOMIC_RELAXED);
    __atomic_store_n(&h->seq, s + 2, __ATOMIC_RELEASE);
}

void shm_regions_published(kvf_transport_t *tt, const kvf_region_t *rs, size_t n, uint64_t gen)
{
    struct shm_transport *t = shm_of(tt);
    if (t->table)
        shm_table_set(t->table, SHM_TABLE_CAP, rs, n, gen);
}

/* ---- the sender ------------------------------------------------------------------------------ */

/* Does a thread still hold the table's alive mutex? The kernel clears the owner's TID from the
 * futex word (and sets FUTEX_OWNER_DIED) when that thread ends without unlocking it. (glibc's
 * pthread_mutex_t keeps the futex word in __data.__lock, the TID of its owner.) */
static bool table_held(const shm_table_t *h)
{
    int w = __atomic_load_n(&h->alive.m.__data.__lock, __ATOMIC_ACQUIRE);
    return (w & FUTEX_TID_MASK) != 0 && !(w & FUTEX_OWNER_DIED);
}

int shm_table_map(struct shm_peer *p, int fd, char *why, size_t whylen)
{
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size < (off_t)sizeof(shm_table_t) ||
        (uint64_t)st.st_size > SHM_TABLE_BYTES) {
        snprintf(why, whylen, "the region table's fd is not a table of at most %zu bytes",
                 (size_t)SHM_TABLE_BYTES);
        return -1;
    }
    /* Unsealed, the target could shrink it under our mapping, and a load there is a SIGBUS. */
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        snprintf(why, whylen, "the region table's memfd is not sealed against shrinking");
        return -1;
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        snprintf(why, whylen, "mmap of the region table: %s", strerror(errno));
        return -1;
    }
    if (__atomic_load_n(&((const shm_table_t *)m)->magic, __ATOMIC_ACQUIRE) != SHM_TABLE_MAGIC ||
        !table_held(m)) {
        munmap(m, (size_t)st.st_size);
        snprintf(why, whylen, "the region table has no magic, or no thread serves it");
        return -1;
    }
    p->table = m;
    p->table_len = (size_t)st.st_size;
    p->table_cap = (p->table_len - sizeof(shm_table_t)) / sizeof(kvf_region_t);
    return 0;
}

void shm_table_unmap(struct shm_peer *p)
{
    if (p->table)
        munmap((void *)p->table, p->table_len);
    p->table = NULL;
    p->table_len = p->table_cap = 0;
}

/* Has the target process exited? From its pidfd (or kill(), without one). */
static bool target_exited(const struct shm_peer *p)
{
    if (p->pidfd >= 0) {
        struct pollfd pf = {.fd = p->pidfd, .events = POLLIN};
        return poll(&pf, 1, 0) > 0;
    }
    return kill(p->pid, 0) < 0 && errno == ESRCH;
}

int shm_table_alive(struct shm_peer *p)
{
    bool withdrawn = __atomic_load_n(&p->table->magic, __ATOMIC_ACQUIRE) != SHM_TABLE_MAGIC;
    if (!withdrawn && table_held(p->table))
        return 0;
    if (target_exited(p))
        return kvf__err(-KVF_EPEERGONE, "peer %s: process %d is gone", p->sid, (int)p->pid);
    return kvf__err(-KVF_EPEERGONE, "peer %s: pid %d no longer holds its engine (%s)", p->sid,
                    (int)p->pid,
                    withdrawn ? "its region table was withdrawn" : "its shm socket thread ended");
}

int shm_table_gen(struct shm_peer *p, uint64_t *gen)
{
    int rc = shm_table_alive(p);
    if (rc == 0)
        *gen = __atomic_load_n(&p->table->gen, __ATOMIC_ACQUIRE);
    return rc;
}

int shm_table_read(struct shm_peer *p, kvf_region_t **out, size_t *n, uint64_t *gen)
{
    const shm_table_t *h = p->table;
    kvf_region_t *rs = NULL;
    size_t have = 0; /* entries rs holds room for */
    int rc;

    for (int tries = 0; tries < SHM_TABLE_TRIES; tries++) {
        rc = shm_table_alive(p);
        if (rc < 0)
            goto out_free;
        uint64_t s = __atomic_load_n(&h->seq, __ATOMIC_ACQUIRE);
        if (s & 1) {
            sched_yield();
            continue;
        }
        uint64_t count = __atomic_load_n(&h->count, __ATOMIC_RELAXED);
        uint64_t g = __atomic_load_n(&h->gen, __ATOMIC_RELAXED);
        if (count > p->table_cap) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(&h->seq, __ATOMIC_RELAXED) != s)
                continue; /* torn: the count is of no table */
            rc = kvf__err(-KVF_EPROTO,
                          "peer %s: its region table has %" PRIu64
                          " entries, more than %zu (what its shared table holds)",
                          p->sid, count, p->table_cap);
            goto out_free;
        }
        if (count > have) {
            kvf_region_t *bigger = realloc(rs, (size_t)count * sizeof(*rs));
            if (!bigger) {
                rc = kvf__err(-KVF_ENOMEM, "peer %s: out of memory for %" PRIu64 " regions", p->sid,
                              count);
                goto out_free;
            }
            rs = bigger;
            have = (size_t)count;
        }
        for (size_t i = 0; i < count; i++) {
            rs[i].addr = __atomic_load_n(&h->r[i].addr, __ATOMIC_RELAXED);
            rs[i].len = __atomic_load_n(&h->r[i].len, __ATOMIC_RELAXED);
            rs[i].gen = __atomic_load_n(&h->r[i].gen, __ATOMIC_RELAXED);
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&h->seq, __ATOMIC_RELAXED) != s)
            continue; /* changed under us: whatever was copied is not to be used */
        for (size_t i = 0; i < count; i++) {
            bool wraps = rs[i].len == 0 || rs[i].addr + rs[i].len < rs[i].addr;
            if (wraps || (i && rs[i].addr < rs[i - 1].addr + rs[i - 1].len)) {
                rc = kvf__err(-KVF_EPROTO,
                              "peer %s: its region table is not sorted and "
                              "non-overlapping at entry %zu",
                              p->sid, i);
                goto out_free;
            }
        }
        if (count == 0) {
            free(rs);
            rs = NULL;
        }
        *out = rs;
        *n = (size_t)count;
        *gen = g;
        return 0;
    }
    rc = kvf__err(-KVF_EBUSY, "peer %s: its region table kept changing during %d reads", p->sid,
                  SHM_TABLE_TRIES);
out_free:
    free(rs);
    return rc;
}
