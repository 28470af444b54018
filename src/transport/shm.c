/*
 * The shm transport: peers on the same host. The sender copies straight between its memory and
 * the target process's registered memory with process_vm_writev / process_vm_readv: one copy,
 * done by the kernel on the sender's thread, with nothing running in the target.
 *
 * Because the target's CPU takes no part, there is no target-side bounds check. The sender's
 * check is therefore the authoritative one, so it is made against the target's own region table,
 * read from the target (never from the store, which any client may rewrite). The target publishes
 * that table, with its generation, in a sealed memfd that each sender maps read-only when it
 * takes its fence slot (shm.h, shm_table.c); it replaces the table there before its unregister
 * returns. Before every transfer the core asks this transport for the live generation (a load
 * from that mapping, no syscall) and re-reads the table if its copy is older (a seqlocked copy
 * from the mapping). So once kvf_mem_unregister() has returned on the target, no transfer that
 * starts afterwards can reach the region; and a transfer that read the generation before it is
 * waited out by the unregister, through the fence (shm.h, shm_fence.c): the core brackets the
 * generation check, the table check and the copy with guard_enter/guard_leave, which count the
 * transfer in this sender's slot of the target's fence page, and the target's unregister drains
 * those counts after replacing its table. A sender without a slot does not use shm at all. The
 * same check proves that the target is still the engine verified: the table holds a robust
 * mutex that the target's memfd socket thread holds while it serves, which the kernel marks
 * dead when that thread or the process ends (before a pid can be reused), and its magic is
 * cleared when the engine is destroyed.
 *
 * Memory from kvf_mem_alloc() is a memfd that a sender maps and copies into with memcpy instead
 * (shm_memfd.c; large copies are shared by the pool of shm_copy.c).
 *
 * Opening a peer is the handshake: same boot id and network namespace and the pid visible from
 * here (kill(pid, 0)), all from the session record, then the proof that the pid is the engine of
 * the session (it holds the session port's listening socket), a fence slot, the shared table and
 * the word's address from that pid's socket, and the word there (kvf_shm_word_t, transport.h, one
 * process_vm_readv) naming the session. Any failure is -KVF_ENOTSUP with the reason, which the
 * core logs once and answers by falling back to tcp (or reports, when shm was forced).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/host.h"
#include "transport/shm.h"

/* The kernel's UIO_MAXIOV: iovecs per side of one process_vm_* call. */
#define SHM_IOV_MAX 1024
/* Elements described on the stack; longer runs use a heap array of SHM_IOV_MAX. */
#define SHM_IOV_STACK 16
/* Test hook: when set (non-empty, not "0"), every probe fails, so a same-host pair must fall
 * back to tcp. Documented in docs/architecture.md. */
#define SHM_PROBE_FAIL_ENV "KVFERRY_SHM_PROBE_FAIL"
/* Test hook, read when the engine is created: its transfers stay inside the fence this many ms
 * after their copy, so a test can see a target's unregister time out on one. Documented in
 * docs/operations.md. */
#define SHM_HOLD_ENV "KVFERRY_SHM_TEST_HOLD_MS"

static int shm_create(const kvf_transport_params_t *p, kvf_transport_t **out)
{
    struct shm_transport *t = calloc(1, sizeof(*t));
    if (!t)
        return kvf__err(-KVF_ENOMEM, "shm transport: out of memory");
    snprintf(t->local_sid, sizeof(t->local_sid), "%s", p && p->local_sid ? p->local_sid : "");
    t->regions = p ? p->regions : NULL;
    t->word_addr = p ? (uint64_t)(uintptr_t)p->shm_word : 0;
    t->lfd = t->wake = -1;
    pthread_mutex_init(&t->exp_lock, NULL);
    t->copy_threads = shm_copy_threads_conf(t->local_sid);
    const char *hold = getenv(SHM_HOLD_ENV); /* read once: not on every transfer */
    t->test_hold_ms = hold ? strtol(hold, NULL, 10) : 0;
    pthread_mutex_init(&t->job_lock, NULL);
    pthread_mutex_init(&t->pool_lock, NULL);
    pthread_cond_init(&t->work_cv, NULL);
    pthread_cond_init(&t->done_cv, NULL);
    shm_warm_init(t);
    if (p && p->memfd_sock && t->regions && t->word_addr)
        shm_fd_listen(t, p->memfd_sock);
    *out = (kvf_transport_t *)(void *)t;
    return 0;
}

static void shm_destroy(kvf_transport_t *tt)
{
    struct shm_transport *t = shm_of(tt);
    if (t->lfd >= 0) {
        uint64_t one = 1;
        (void)!write(t->wake, &one, sizeof(one));
        pthread_join(t->thread, NULL);
        close(t->lfd);
        close(t->wake);
        shm_fence_destroy(t);
    }
    shm_pool_stop(t);
    shm_warm_stop(t);
    pthread_mutex_destroy(&t->exp_lock);
    free(t->exps);
    free(t);
}

/* Read @len bytes at @addr of @pid. Returns 0, or -errno of process_vm_readv (-ESRCH: no such
 * process; -EFAULT: not mapped there). */
static int shm_peek(pid_t pid, uint64_t addr, void *buf, size_t len)
{
    struct iovec l = {.iov_base = buf, .iov_len = len};
    struct iovec r = {.iov_base = (void *)(uintptr_t)addr, .iov_len = len};
    for (;;) {
        ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n == (ssize_t)len)
            return 0;
        if (n >= 0)
            return -EFAULT;
        if (errno != EINTR)
            return -errno;
    }
}

static int shm_word_read(pid_t pid, uint64_t addr, kvf_shm_word_t *w)
{
    return shm_peek(pid, addr, w, sizeof(*w));
}

/*
 * Prove that @d's pid is the engine of session @d->sid, from the kernel, never from the record
 * (anyone may write the store): the pid must hold the listening socket of the session's port,
 * which only that engine can.
 */
static int shm_verify_pid(const kvf_tpeer_desc_t *d, const char *sid)
{
    bool self = d->pid == getpid();
    int rc = kvf__host_pid_listens(d->pid, d->addr.port);
    if (rc < 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s: the sockets of pid %d cannot be read (%s)", sid,
                        (int)d->pid, strerror(-rc));
    if (rc == 0)
        return kvf__err(-KVF_ENOTSUP,
                        "peer %s: its session record names pid %d%s, which does not listen on "
                        "port %u: not the engine of that session (a stale or forged record)",
                        sid, (int)d->pid, self ? " (this process)" : "", d->addr.port);
    return 0;
}

/* The verified pid told @p->word_addr (shm_fence_open): a word naming the session must be
 * there. Fills @w on success. */
static int shm_verify_word(struct shm_peer *p, kvf_shm_word_t *w)
{
    int rc = shm_word_read(p->pid, p->word_addr, w);
    if (rc == -EPERM)
        return kvf__err(-KVF_ENOTSUP, "peer %s: process_vm_readv of pid %d not permitted "
                                      "(ptrace access: same user, Yama ptrace_scope, or "
                                      "CAP_SYS_PTRACE)",
                        p->sid, (int)p->pid);
    if (rc < 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s: probe of pid %d failed: %s", p->sid, (int)p->pid,
                        strerror(-rc));
    if (w->magic != KVF_SHM_WORD_MAGIC || strncmp(w->sid, p->sid, sizeof(w->sid)) != 0)
        return kvf__err(-KVF_ENOTSUP,
                        "peer %s: pid %d keeps no word of that session where its shm socket "
                        "says (another kvferry version?)",
                        p->sid, (int)p->pid);
    return 0;
}

static const char *shm_probe_fail_hook(void)
{
    const char *v = getenv(SHM_PROBE_FAIL_ENV);
    return v && *v && strcmp(v, "0") != 0 ? v : NULL;
}

static void shm_peer_close(kvf_tpeer_t *pp);

static int shm_peer_open(kvf_transport_t *tt, const kvf_tpeer_desc_t *d, kvf_tpeer_t **out)
{
    const char *sid = d && d->sid ? d->sid : "?";
    const char *boot = kvf__host_boot_id();
    kvf_shm_word_t w;
    int rc;

    if (!tt || !d || !out)
        return kvf__err(-KVF_EINVAL, "shm peer open: missing argument");
    if (!d->offers_shm)
        return kvf__err(-KVF_ENOTSUP, "peer %s does not offer shm (it runs with transport tcp)",
                        sid);
    if (!*boot)
        return kvf__err(-KVF_ENOTSUP, "this host's boot id cannot be read");
    if (strcmp(boot, d->boot_id) != 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s is on another host (boot id %s, ours %s)", sid,
                        d->boot_id[0] ? d->boot_id : "unpublished", boot);
    if (strcmp(kvf__host_net_ns(), d->net_ns) != 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s is in another network namespace (%s, ours %s): "
                                      "treated as another host",
                        sid, d->net_ns[0] ? d->net_ns : "unpublished", kvf__host_net_ns());
    if (d->pid <= 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s published no pid", sid);
    /* EPERM means the pid exists but belongs to someone we may not signal, and so (under the
     * same credential rules) may not write either. */
    if (kill(d->pid, 0) < 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s: pid %d is %s", sid, (int)d->pid,
                        errno == EPERM ? "not ours to access (another user)"
                                       : "not visible from here (another pid namespace, or gone)");
    if (shm_probe_fail_hook())
        return kvf__err(-KVF_ENOTSUP, "peer %s: probe refused by the test hook %s", sid,
                        SHM_PROBE_FAIL_ENV);
    rc = shm_verify_pid(d, sid);
    if (rc < 0)
        return rc;

    struct shm_peer *p = calloc(1, sizeof(*p));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "shm peer open %s: out of memory", sid);
    p->t = shm_of(tt);
    snprintf(p->sid, sizeof(p->sid), "%s", sid);
    p->pid = d->pid;
    /* The process verified below (a pid reused meanwhile leaves this pidfd on the old process,
     * readable: gone); it names the cause once the shared table says the target is gone. */
    p->pidfd = (int)syscall(SYS_pidfd_open, d->pid, 0);
    snprintf(p->sock, sizeof(p->sock), "%s", d->memfd_sock);
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&p->map_lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&p->ask_lock, NULL);
    /* A target's unregister can wait only for the copies it can count; the slot comes with
     * the word's address, from the verified pid's own socket. */
    rc = shm_fence_open(p, shm_of(tt)->local_sid);
    if (rc == 0)
        rc = shm_verify_word(p, &w);
    if (rc < 0) {
        shm_peer_close((kvf_tpeer_t *)(void *)p);
        return rc;
    }
    KVF_DEBUG(SHM_LOG, "%s: peer %s reachable by shm (pid %d)", shm_of(tt)->local_sid, sid,
              (int)d->pid);
    *out = (kvf_tpeer_t *)(void *)p;
    return 0;
}

static void shm_peer_close(kvf_tpeer_t *pp)
{
    struct shm_peer *p = shm_peer_of(pp);
    shm_warm_forget(p); /* before the mappings go: the warmer may be touching one */
    shm_fence_close(p);
    if (p->pidfd >= 0)
        close(p->pidfd);
    shm_rmaps_free(p->rmaps, p->nrmaps);
    pthread_rwlock_destroy(&p->map_lock);
    pthread_mutex_destroy(&p->ask_lock);
    free(p);
}

/* Is the target still there? Loads from its shared table (shm_table.c), no syscall. */
static int shm_peer_alive(kvf_tpeer_t *pp, uint64_t deadline_ms)
{
    (void)deadline_ms;
    return shm_table_alive(shm_peer_of(pp));
}

/* The regions_changed op: the new list, and the warmer told of regions it has not taken. This is
 * where a region is first learned (the peer's open, a refresh after a change of its table). */
static void shm_regions_learned(kvf_tpeer_t *pp, const kvf_region_t *rs, size_t n)
{
    if (shm_regions_changed(pp, rs, n))
        shm_warm_queue(shm_peer_of(pp));
}

/* The live generation: a load from the target's shared table, after the check that it is still
 * there. */
static int shm_regions_gen(kvf_tpeer_t *pp, uint64_t *gen)
{
    return shm_table_gen(shm_peer_of(pp), gen);
}

/* The target's region table: a seqlocked copy of its shared table (shm_table.c). */
static int shm_regions_read(kvf_tpeer_t *pp, kvf_region_t **out, size_t *n, uint64_t *gen)
{
    return shm_table_read(shm_peer_of(pp), out, n, gen);
}

/* Map a failed process_vm_* call to the transport's error contract. */
static int shm_io_error(struct shm_peer *p, int err, bool write, size_t elem, const kvf_xfer_t *x)
{
    const char *op = write ? "write" : "read";
    if (err == ESRCH)
        return kvf__err(-KVF_EPEERGONE, "shm %s to %s: process %d is gone (element %zu)", op,
                        p->sid, (int)p->pid, elem);
    if (err == EFAULT)
        return kvf__err(-EFAULT, "shm %s to %s: element %zu [0x%" PRIx64 ", +%zu) is not mapped "
                                 "in pid %d (freed without unregistering?) or the local buffer "
                                 "%p is invalid",
                        op, p->sid, elem, x->remote, x->len, (int)p->pid, x->local);
    return kvf__err(-err, "shm %s to %s: element %zu: process_vm_%sv: %s", op, p->sid, elem,
                    write ? "write" : "read", strerror(err));
}

/*
 * Move elements [@i, @end) (all of one op) with as few syscalls as possible: up to SHM_IOV_MAX
 * element pairs per call (local and remote pieces of an element have equal lengths, so the two
 * iovec arrays stay in step). The kernel may stop short (at a fault, or at MAX_RW_COUNT bytes
 * per call): the loop resumes from the byte it reached.
 */
static int shm_run(struct shm_peer *p, const kvf_xfer_t *x, size_t i, size_t end, bool write,
                   uint64_t deadline_ms, struct iovec *liov, struct iovec *riov, size_t cap,
                   int *status)
{
    size_t off = 0; /* bytes of element i already moved */
    while (i < end) {
        size_t cnt = 0;
        for (size_t j = i; j < end && cnt < cap; j++, cnt++) {
            size_t skip = j == i ? off : 0;
            liov[cnt].iov_base = (uint8_t *)x[j].local + skip;
            riov[cnt].iov_base = (void *)(uintptr_t)(x[j].remote + skip);
            liov[cnt].iov_len = riov[cnt].iov_len = x[j].len - skip;
        }
        ssize_t n = write ? process_vm_writev(p->pid, liov, cnt, riov, cnt, 0)
                          : process_vm_readv(p->pid, liov, cnt, riov, cnt, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            int rc = shm_io_error(p, n < 0 ? errno : EFAULT, write, i, &x[i]);
            if (status)
                status[i] = rc;
            return rc;
        }
        size_t moved = (size_t)n;
        while (moved > 0) {
            size_t left = x[i].len - off;
            if (moved < left) {
                off += moved;
                break;
            }
            moved -= left;
            off = 0;
            if (status)
                status[i] = 0;
            i++;
        }
        if (i < end && kvf__now_ms() >= deadline_ms) {
            if (status)
                status[i] = -KVF_ETIMEDOUT;
            return kvf__err(-KVF_ETIMEDOUT, "shm %s to %s: deadline reached at element %zu",
                            write ? "write" : "read", p->sid, i);
        }
    }
    return 0;
}

static bool shm_cancelled(const kvf_xfer_ctl_t *ctl)
{
    return ctl && ctl->cancel && atomic_load_explicit(ctl->cancel, memory_order_relaxed);
}

static int shm_transfer(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                        const kvf_xfer_ctl_t *ctl)
{
    int *status = ctl ? ctl->status : NULL;
    struct shm_peer *p = shm_peer_of(pp);
    struct iovec sl[SHM_IOV_STACK], sr[SHM_IOV_STACK];
    struct iovec *liov = sl, *riov = sr, *heap = NULL;
    size_t cap = SHM_IOV_STACK;
    int rc = 0;

    /* Small batches (the latency path) stay off the heap. */
    if (n > SHM_IOV_STACK) {
        cap = n < SHM_IOV_MAX ? n : SHM_IOV_MAX;
        heap = malloc(2 * cap * sizeof(*heap));
        if (!heap)
            return kvf__err(-KVF_ENOMEM, "shm transfer to %s: out of memory for %zu iovecs",
                            p->sid, 2 * cap);
        liov = heap;
        riov = heap + cap;
    }
    if (p->sock[0])
        for (size_t i = 0; i < n; i++)
            shm_resolve(p, &x[i]);
    /* Held across the copies: regions_changed() cannot unmap a mapping under a memcpy. Elements
     * into mapped kvf_mem_alloc memory are plain copies; runs of consecutive other elements with
     * the same op go in one process_vm call each, in batch order. */
    pthread_rwlock_rdlock(&p->map_lock);
    for (size_t i = 0; i < n && rc == 0;) {
        if (shm_cancelled(ctl)) {
            rc = kvf__err(-KVF_ECANCELED, "shm transfer to %s: cancelled before element %zu",
                          p->sid, i);
            break;
        }
        bool pending = false;
        uint8_t *m = shm_mapped(p, &x[i], &pending);
        if (pending)
            atomic_fetch_add_explicit(&p->t->xfer_unwarmed, 1, memory_order_relaxed);
        if (m) {
            if (x[i].op == KVF_OP_WRITE)
                shm_copy(p->t, m, x[i].local, x[i].len);
            else
                shm_copy(p->t, x[i].local, m, x[i].len);
            if (status)
                status[i] = 0;
            i++;
            continue;
        }
        size_t end = i + 1;
        while (end < n && x[end].op == x[i].op && !shm_mapped(p, &x[end], &pending)) {
            if (pending)
                atomic_fetch_add_explicit(&p->t->xfer_unwarmed, 1, memory_order_relaxed);
            end++;
        }
        rc = shm_run(p, x, i, end, x[i].op == KVF_OP_WRITE, deadline_ms, liov, riov, cap,
                     status);
        i = end;
    }
    pthread_rwlock_unlock(&p->map_lock);
    /* The copies through a mapping are complete when memcpy returns: the target's pages are these
     * pages. The fence orders them before whatever the caller does to announce completion. */
    atomic_thread_fence(memory_order_release);
    free(heap);
    if (p->t->test_hold_ms > 0) {
        struct timespec ts = {p->t->test_hold_ms / 1000, (p->t->test_hold_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    return rc;
}

const struct kvf_transport_ops kvf__shm_ops = {
    .size = sizeof(struct kvf_transport_ops),
    .name = "shm",
    .caps = KVF_TCAP_OFFER | KVF_TCAP_RECORD,
    .check = KVF_CHECK_SENDER,
    .create = shm_create,
    /* Nothing listens: a same-host sender needs only the pid and word from the session record. */
    .port = kvf__transport_no_port,
    .destroy = shm_destroy,
    .start = kvf__transport_nop,
    .stop = kvf__transport_nop,
    .peer_open = shm_peer_open,
    .peer_close = shm_peer_close,
    .transfer = shm_transfer,
    .post = kvf__transport_no_post,
    .peer_alive = shm_peer_alive,
    .notify = kvf__transport_enotsup_notify,
    .regions_gen = shm_regions_gen,
    .regions_read = shm_regions_read,
    .regions_changed = shm_regions_learned,
    .regions_published = shm_regions_published,
    .mem_export = shm_mem_export,
    .mem_unexport = shm_mem_unexport,
    .mem_sock = shm_mem_sock,
    .guard_enter = shm_fence_enter,
    .guard_leave = shm_fence_leave,
    .drain = shm_fence_drain,
    .holders = kvf__transport_no_holders,
};
