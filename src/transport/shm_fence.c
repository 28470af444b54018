/*
 * The fence of the shm transport (the protocol is in shm.h): the target's page of per-sender
 * counters, its slots and the drain that unregister and destroy wait on; the sender's enter and
 * leave around each transfer.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "transport/shm.h"

/* Tries of an enter that keeps meeting drains (each try needs a drain to move the epoch). */
#define SHM_FENCE_ENTER_TRIES 1000
/* A drain polls the counters: first at once, then backing off up to this many microseconds. */
#define SHM_FENCE_POLL_MAX_US 1000

/* ---- the target ------------------------------------------------------------------------------ */

int shm_fence_create(struct shm_transport *t)
{
    for (unsigned i = 0; i < SHM_FENCE_SLOTS; i++)
        t->holders[i] = (shm_fence_holder_t){.conn = -1, .pidfd = -1};
    pthread_mutex_init(&t->fence_lock, NULL);
    pthread_mutex_init(&t->drain_lock, NULL);
    t->table_fd = -1;
    t->fence_fd = memfd_create("kvf-fence", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (t->fence_fd < 0)
        return -errno;
    void *m = MAP_FAILED;
    if (ftruncate(t->fence_fd, sizeof(shm_fence_page_t)) == 0)
        m = mmap(NULL, sizeof(shm_fence_page_t), PROT_READ | PROT_WRITE, MAP_SHARED, t->fence_fd,
                 0);
    /* Senders map the page read-write (they count themselves in it), so it is not sealed
     * against writes; it is sealed against shrinking, under a sender's mapping a SIGBUS on its
     * fence (shm_fence_open refuses a page without that seal), against growing, as the region
     * table is, and against further seals, so that no sender can add F_SEAL_FUTURE_WRITE and
     * keep the next ones from mapping it. */
    if (m != MAP_FAILED &&
        fcntl(t->fence_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int rc = -errno;
        munmap(m, sizeof(shm_fence_page_t));
        close(t->fence_fd);
        t->fence_fd = -1;
        return rc;
    }
    if (m == MAP_FAILED) {
        int rc = -errno;
        close(t->fence_fd);
        t->fence_fd = -1;
        return rc;
    }
    t->fence = m;
    t->fence->magic = SHM_FENCE_MAGIC;
    return shm_table_create(t);
}

static void holder_clear(struct shm_transport *t, unsigned i)
{
    shm_fence_holder_t *h = &t->holders[i];
    if (h->conn >= 0)
        close(h->conn);
    if (h->pidfd >= 0)
        close(h->pidfd);
    *h = (shm_fence_holder_t){.conn = -1, .pidfd = -1};
    atomic_store(&t->fence->slot[i].count[0], 0);
    atomic_store(&t->fence->slot[i].count[1], 0);
}

void shm_fence_destroy(struct shm_transport *t)
{
    shm_table_destroy(t);
    if (!t->fence)
        return;
    for (unsigned i = 0; i < SHM_FENCE_SLOTS; i++)
        if (t->holders[i].conn >= 0)
            holder_clear(t, i);
    munmap(t->fence, sizeof(*t->fence));
    close(t->fence_fd);
    t->fence = NULL;
    t->fence_fd = -1;
    pthread_mutex_destroy(&t->fence_lock);
    pthread_mutex_destroy(&t->drain_lock);
}

int shm_fence_admit(struct shm_transport *t, int conn, pid_t pid, const char *sid)
{
    int slot = -KVF_EBUSY;
    pthread_mutex_lock(&t->fence_lock);
    for (unsigned i = 0; i < SHM_FENCE_SLOTS; i++) {
        shm_fence_holder_t *h = &t->holders[i];
        if (h->conn >= 0)
            continue;
        /* Counters left by a previous holder are not this one's. */
        atomic_store(&t->fence->slot[i].count[0], 0);
        atomic_store(&t->fence->slot[i].count[1], 0);
        h->conn = conn;
        h->pid = pid;
        h->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        snprintf(h->sid, sizeof(h->sid), "%s", sid);
        slot = (int)i;
        break;
    }
    pthread_mutex_unlock(&t->fence_lock);
    return slot;
}

void shm_fence_release(struct shm_transport *t, unsigned slot)
{
    pthread_mutex_lock(&t->fence_lock);
    if (slot < SHM_FENCE_SLOTS && t->holders[slot].conn >= 0)
        holder_clear(t, slot);
    pthread_mutex_unlock(&t->fence_lock);
}

size_t shm_fence_conns(struct shm_transport *t, int *fds, unsigned *slots, size_t max)
{
    size_t n = 0;
    pthread_mutex_lock(&t->fence_lock);
    for (unsigned i = 0; i < SHM_FENCE_SLOTS && n < max; i++) {
        if (t->holders[i].conn >= 0) {
            fds[n] = t->holders[i].conn;
            slots[n++] = i;
        }
    }
    pthread_mutex_unlock(&t->fence_lock);
    return n;
}

/* Has the holder's process exited? Without a pidfd, kill(pid, 0) (a reused pid reads alive,
 * which only makes the drain wait for its own deadline). */
static bool holder_exited(const shm_fence_holder_t *h)
{
    if (h->pidfd >= 0) {
        struct pollfd pf = {.fd = h->pidfd, .events = POLLIN};
        return poll(&pf, 1, 0) > 0;
    }
    return kill(h->pid, 0) < 0 && errno == ESRCH;
}

/* The first slot, from @from on, whose live holder is still counted under @parity; -1 if none.
 * Fills @who with the holder for a message. */
static int drain_busy_slot(struct shm_transport *t, unsigned parity, unsigned from,
                           shm_fence_holder_t *who)
{
    int busy = -1;
    pthread_mutex_lock(&t->fence_lock);
    for (unsigned i = from; i < SHM_FENCE_SLOTS && busy < 0; i++) {
        const shm_fence_holder_t *h = &t->holders[i];
        if (h->conn < 0 || atomic_load(&t->fence->slot[i].count[parity]) == 0)
            continue;
        if (holder_exited(h))
            continue; /* a process that exited copies nothing any more */
        busy = (int)i;
        *who = *h;
    }
    pthread_mutex_unlock(&t->fence_lock);
    return busy;
}

int shm_fence_drain(kvf_transport_t *tt, uint64_t deadline_ms)
{
    struct shm_transport *t = shm_of(tt);
    if (!t->fence)
        return 0; /* no fence, no shm senders: peers refuse shm to a target without one */
    shm_fence_holder_t who;
    unsigned wait_us = 0;
    int rc = 0;

    pthread_mutex_lock(&t->drain_lock);
    unsigned parity = (unsigned)(atomic_fetch_add(&t->fence->epoch, 1) & 1);
    unsigned from = 0;
    for (;;) {
        int busy = drain_busy_slot(t, parity, from, &who);
        if (busy < 0)
            break;
        from = (unsigned)busy; /* the slots before it were done: they cannot count here again */
        if (kvf__now_ms() >= deadline_ms) {
            rc = kvf__err(-KVF_ETIMEDOUT,
                          "same-host sender pid %d (session %s) is still copying into this "
                          "engine's memory",
                          (int)who.pid, who.sid[0] ? who.sid : "unnamed");
            break;
        }
        if (wait_us == 0) {
            sched_yield();
            wait_us = 10;
        } else {
            struct timespec ts = {0, (long)wait_us * 1000L};
            nanosleep(&ts, NULL);
            if (wait_us < SHM_FENCE_POLL_MAX_US)
                wait_us *= 2;
        }
    }
    pthread_mutex_unlock(&t->drain_lock);
    return rc;
}

/* ---- the sender ------------------------------------------------------------------------------ */

int shm_fence_enter(kvf_tpeer_t *pp, uint64_t *token)
{
    struct shm_peer *p = shm_peer_of(pp);
    shm_fence_slot_t *s = &p->fence->slot[p->fence_slot];
    for (int tries = 0; tries < SHM_FENCE_ENTER_TRIES; tries++) {
        uint64_t e = atomic_load(&p->fence->epoch);
        atomic_fetch_add(&s->count[e & 1], 1);
        if (atomic_load(&p->fence->epoch) == e) {
            *token = e & 1;
            return 0;
        }
        atomic_fetch_sub(&s->count[e & 1], 1);
    }
    return kvf__err(-KVF_EBUSY, "peer %s: its unregistrations kept the fence moving for %d tries",
                    p->sid, SHM_FENCE_ENTER_TRIES);
}

void shm_fence_leave(kvf_tpeer_t *pp, uint64_t token)
{
    struct shm_peer *p = shm_peer_of(pp);
    atomic_fetch_sub(&p->fence->slot[p->fence_slot].count[token & 1], 1);
}
