/*
 * The copy pool of the shm transport: copies through a memfd mapping of SHM_COPY_MT_MIN bytes or
 * more are split into page-aligned shares over a few persistent threads (copy_threads - 1
 * workers, started on the first large copy, joined in destroy); the caller copies one share and
 * waits for the rest. One such copy at a time: a concurrent one copies alone.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/thread.h"
#include "transport/shm.h"

/* Copies through a memfd mapping of at least this many bytes (per element) are split over the
 * copy pool; smaller ones are one memcpy on the caller's thread. */
#define SHM_COPY_MT_MIN (8u << 20)
/* Threads that share one large copy, the caller included: KVFERRY_SHM_COPY_THREADS=N (1 turns
 * the pool off), else min(SHM_COPY_DEFAULT_MAX, online CPUs) when at least
 * SHM_COPY_DEFAULT_MIN_CPUS are online, else 1. On a quiet 2-CPU host two copiers measured
 * 1.3x (16 MiB) to 1.9x (64 MiB) one memcpy (`kvferry bench --baseline`), and about 1.0x when
 * the host was busy, so the pool is on from 2 CPUs. */
#define SHM_COPY_THREADS_ENV      "KVFERRY_SHM_COPY_THREADS"
#define SHM_COPY_DEFAULT_MAX      4
#define SHM_COPY_DEFAULT_MIN_CPUS 2

unsigned shm_copy_threads_conf(const char *sid)
{
    const char *v = getenv(SHM_COPY_THREADS_ENV);
    if (v && *v) {
        char *end;
        unsigned long n = strtoul(v, &end, 10);
        if (*end == '\0' && n >= 1)
            return n > SHM_COPY_MAX ? SHM_COPY_MAX : (unsigned)n;
        KVF_WARN(SHM_LOG, "%s: %s=%s is not a count >= 1: ignored", sid, SHM_COPY_THREADS_ENV, v);
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < SHM_COPY_DEFAULT_MIN_CPUS)
        return 1;
    return cpus < SHM_COPY_DEFAULT_MAX ? (unsigned)cpus : SHM_COPY_DEFAULT_MAX;
}

/* Share @k of the current job: its destination, source and length. pool_lock held. */
static void shm_share(const struct shm_transport *t, unsigned k, uint8_t **d, const uint8_t **s,
                      size_t *len)
{
    size_t off = (size_t)k * t->job_share;
    *d = t->job_dst + off;
    *s = t->job_src + off;
    *len = k + 1 == t->job_nshares ? t->job_len - off : t->job_share;
}

/* Take and copy shares of the current job until none is left. pool_lock held (dropped around
 * each memcpy); signals done_cv after the last one. */
static void shm_copy_shares(struct shm_transport *t)
{
    while (t->job_next < t->job_nshares) {
        uint8_t *d;
        const uint8_t *s;
        size_t len;
        shm_share(t, t->job_next++, &d, &s, &len);
        pthread_mutex_unlock(&t->pool_lock);
        memcpy(d, s, len);
        pthread_mutex_lock(&t->pool_lock);
        if (--t->job_pending == 0)
            pthread_cond_signal(&t->done_cv);
    }
}

static void *shm_copy_worker(void *arg)
{
    struct shm_transport *t = arg;
    pthread_mutex_lock(&t->pool_lock);
    uint64_t seen = t->job_seq;
    for (;;) {
        while (!t->stop && t->job_seq == seen)
            pthread_cond_wait(&t->work_cv, &t->pool_lock);
        if (t->stop)
            break;
        seen = t->job_seq;
        shm_copy_shares(t);
    }
    pthread_mutex_unlock(&t->pool_lock);
    return NULL;
}

/* Start the workers if not yet done. job_lock held. Returns the threads a copy may use. */
static unsigned shm_pool_start(struct shm_transport *t)
{
    pthread_mutex_lock(&t->pool_lock);
    while (!t->pool_failed && t->nworkers + 1 < t->copy_threads) {
        int rc = kvf__thread_start(&t->workers[t->nworkers], "kvf-shm-copy", 0, shm_copy_worker, t);
        if (rc != 0) {
            t->pool_failed = true;
            KVF_WARN(SHM_LOG, "%s: copy thread: pthread_create: %s (copying with %u threads)",
                     t->local_sid, strerror(-rc), t->nworkers + 1);
            break;
        }
        t->nworkers++;
    }
    unsigned n = t->nworkers + 1;
    pthread_mutex_unlock(&t->pool_lock);
    return n;
}

void shm_copy(struct shm_transport *t, void *d, const void *s, size_t len)
{
    if (!t || t->copy_threads < 2 || len < SHM_COPY_MT_MIN ||
        pthread_mutex_trylock(&t->job_lock) != 0) {
        memcpy(d, s, len);
        return;
    }
    unsigned n = shm_pool_start(t);
    if (n < 2) {
        pthread_mutex_unlock(&t->job_lock);
        memcpy(d, s, len);
        return;
    }
    pthread_mutex_lock(&t->pool_lock);
    t->job_dst = d;
    t->job_src = s;
    t->job_len = len;
    t->job_share = (len / n + 4095) & ~(size_t)4095; /* page-sized shares: no shared lines */
    t->job_nshares = (unsigned)((len + t->job_share - 1) / t->job_share);
    t->job_next = 0;
    t->job_pending = t->job_nshares;
    t->job_seq++;
    pthread_cond_broadcast(&t->work_cv);
    shm_copy_shares(t); /* the caller copies too: at least one share */
    while (t->job_pending > 0)
        pthread_cond_wait(&t->done_cv, &t->pool_lock);
    pthread_mutex_unlock(&t->pool_lock);
    pthread_mutex_unlock(&t->job_lock);
}

void shm_pool_stop(struct shm_transport *t)
{
    pthread_mutex_lock(&t->pool_lock);
    t->stop = true;
    pthread_cond_broadcast(&t->work_cv);
    pthread_mutex_unlock(&t->pool_lock);
    for (unsigned i = 0; i < t->nworkers; i++)
        pthread_join(t->workers[i], NULL);
    pthread_mutex_destroy(&t->job_lock);
    pthread_mutex_destroy(&t->pool_lock);
    pthread_cond_destroy(&t->work_cv);
    pthread_cond_destroy(&t->done_cv);
}
