/*
 * The shm transport: peers on the same host. The sender copies straight between its memory and
 * the target process's registered memory with process_vm_writev / process_vm_readv: one copy,
 * done by the kernel on the sender's thread, with nothing running in the target.
 *
 * Because the target's CPU takes no part, there is no target-side bounds check. The sender's
 * check against the target's published regions is therefore the authoritative one, and it must
 * be made against a current list. The target keeps a small kvf_shm_word_t in its own memory
 * (magic, nonce, region generation; its address and the nonce are in the session record) and
 * stores the generation there only after the region list of that generation is in the store.
 * Before every transfer the core asks this transport for the live generation (one
 * process_vm_readv of 24 bytes) and refreshes its cached list if it is older. So once
 * kvf_mem_unregister() has returned on the target, no transfer that starts afterwards can reach
 * the region. The window that remains: a transfer that read the word before the unregister
 * published may still be copying while, or just after, unregister returns (the kernel copy is
 * not fenced against the target's unregister as the tcp target's region reference is). Reading
 * the word also proves, each time, that the pid still belongs to the engine we validated: a
 * restarted or reused pid has no matching magic and nonce at that address.
 *
 * Memory from kvf_mem_alloc() is a memfd. The target serves its fds on an abstract Unix socket
 * (named in its session record, see docs/protocol.md): a sender asks once per region, lazily on
 * the first transfer into it, receives the fd with SCM_RIGHTS, maps it MAP_SHARED and from then
 * on copies with a plain memcpy (elements of SHM_COPY_MT_MIN bytes or more split over a small
 * pool of copy threads, see shm_copy()). The bounds stay the same: the core has checked every element
 * against the current published list before it reaches this file, and a mapping is used only
 * while its region (address, length and generation, as the target answered) is still in that
 * list; regions_changed() unmaps the others. Both ends check the other's credentials on the
 * socket: the target answers only its own uid (or root), the sender accepts fds only from the
 * pid it validated with the word, so a process squatting on the name gets and gives nothing.
 *
 * Opening a peer is the handshake: same boot id and network namespace, the pid visible from here (kill(pid, 0)), and a
 * probe read of the word that must succeed and match. Any failure is -KVF_ENOTSUP with the
 * reason, which the core logs once and answers by falling back to tcp (or reports, when shm
 * was forced).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/common.h"
#include "common/host.h"
#include "common/thread.h"
#include "transport/transport.h"

#define SHM_LOG "shm"
/* The kernel's UIO_MAXIOV: iovecs per side of one process_vm_* call. */
#define SHM_IOV_MAX 1024
/* Elements described on the stack; longer runs use a heap array of SHM_IOV_MAX. */
#define SHM_IOV_STACK 16
/* Test hook: when set (non-empty, not "0"), every probe fails, so a same-host pair must fall
 * back to tcp. Documented in docs/architecture.md. */
#define SHM_PROBE_FAIL_ENV "KVFERRY_SHM_PROBE_FAIL"
/* Copies through a memfd mapping of at least this many bytes (per element) are split over the
 * copy pool; smaller ones are one memcpy on the caller's thread. */
#define SHM_COPY_MT_MIN (8u << 20)
/* Threads that share one large copy, the caller included: KVFERRY_SHM_COPY_THREADS=N (1 turns
 * the pool off), else min(SHM_COPY_DEFAULT_MAX, online CPUs) when at least
 * SHM_COPY_DEFAULT_MIN_CPUS are online, else 1. On a quiet 2-CPU host two copiers measured
 * 1.3x (16 MiB) to 1.9x (64 MiB) one memcpy (`kvferry bench --baseline`), and about 1.0x when
 * the host was busy, so the pool is on from 2 CPUs. */
#define SHM_COPY_THREADS_ENV "KVFERRY_SHM_COPY_THREADS"
#define SHM_COPY_DEFAULT_MAX 4
#define SHM_COPY_DEFAULT_MIN_CPUS 2
#define SHM_COPY_MAX 8

/* The memfd socket's one request and one answer (docs/protocol.md, "memfd exchange"). */
#define SHM_FD_MAGIC 0x6466766bu /* "kvfd" little-endian */
#define SHM_FD_VERSION 1u
/* Bound on each read and write of the exchange, both ends: a silent peer costs at most this. */
#define SHM_FD_IO_TIMEOUT_MS 1000
typedef struct {
    uint32_t magic;
    uint32_t version;
    uint64_t addr; /* an address inside the region whose fd is wanted */
} shm_fd_req_t;
typedef struct {
    uint32_t magic;
    int32_t status; /* 0 (one fd attached), -KVF_ENOTREG, -KVF_ENOTFOUND (not kvf_mem_alloc
                       memory), -KVF_EAUTH (another uid), -KVF_EPROTO */
    uint64_t base;  /* the region: its address, length and generation */
    uint64_t len;
    uint64_t gen;
} shm_fd_ans_t;

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

static struct shm_transport *shm_of(kvf_transport_t *t)
{
    return (struct shm_transport *)(void *)t;
}

static struct shm_peer *shm_peer_of(kvf_tpeer_t *p)
{
    return (struct shm_peer *)(void *)p;
}

/* ---- the memfd socket: target side ------------------------------------------------------- */

static void shm_sock_timeouts(int fd)
{
    struct timeval tv = {.tv_sec = SHM_FD_IO_TIMEOUT_MS / 1000,
                         .tv_usec = (SHM_FD_IO_TIMEOUT_MS % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static socklen_t shm_sock_addr(const char *name, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    size_t n = strlen(name);
    memcpy(sa->sun_path + 1, name, n); /* sun_path[0] = '\0': the abstract namespace */
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

static int shm_mem_export(kvf_transport_t *tt, void *addr, size_t len, int fd)
{
    struct shm_transport *t = shm_of(tt);
    pthread_mutex_lock(&t->exp_lock);
    shm_export_t *a = realloc(t->exps, (t->nexps + 1) * sizeof(*a));
    if (a) {
        t->exps = a;
        a[t->nexps++] = (shm_export_t){.addr = (uintptr_t)addr, .len = len, .fd = fd};
    }
    pthread_mutex_unlock(&t->exp_lock);
    return a ? 0 : kvf__err(-KVF_ENOMEM, "shm export: out of memory");
}

static void shm_mem_unexport(kvf_transport_t *tt, void *addr)
{
    struct shm_transport *t = shm_of(tt);
    pthread_mutex_lock(&t->exp_lock);
    for (size_t i = 0; i < t->nexps; i++) {
        if (t->exps[i].addr == (uintptr_t)addr) {
            t->exps[i] = t->exps[--t->nexps];
            break;
        }
    }
    pthread_mutex_unlock(&t->exp_lock);
}

static const char *shm_mem_sock(const kvf_transport_t *tt)
{
    const struct shm_transport *t = (const struct shm_transport *)(const void *)tt;
    return t && t->lfd >= 0 ? t->sock : "";
}

static int shm_send_answer(int c, const shm_fd_ans_t *a, int fd)
{
    struct iovec iov = {.iov_base = (void *)a, .iov_len = sizeof(*a)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&u, 0, sizeof(u));
        m.msg_control = u.buf;
        m.msg_controllen = sizeof(u.buf);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    }
    return sendmsg(c, &m, MSG_NOSIGNAL) == (ssize_t)sizeof(*a) ? 0 : -errno;
}

/* Answer one request on connection @c: the fd of the kvf_mem_alloc region containing the
 * address, if that region is registered now and the asker runs as our uid (or root). */
static void shm_fd_answer(struct shm_transport *t, int c)
{
    shm_fd_req_t q;
    shm_fd_ans_t a = {.magic = SHM_FD_MAGIC, .status = -KVF_EPROTO};
    struct ucred cr = {.pid = 0};
    socklen_t crl = sizeof(cr);
    kvf_region_t *rs = NULL;
    size_t n = 0;

    shm_sock_timeouts(c);
    if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cr, &crl) < 0 ||
        (cr.uid != geteuid() && cr.uid != 0)) {
        a.status = -KVF_EAUTH;
        KVF_WARN(SHM_LOG, "%s: memfd request from pid %d refused: uid %u is not ours",
                 t->local_sid, (int)cr.pid, (unsigned)cr.uid);
        shm_send_answer(c, &a, -1);
        return;
    }
    if (recv(c, &q, sizeof(q), MSG_WAITALL) != (ssize_t)sizeof(q) || q.magic != SHM_FD_MAGIC ||
        q.version != SHM_FD_VERSION) {
        KVF_DEBUG(SHM_LOG, "%s: malformed memfd request from pid %d", t->local_sid, (int)cr.pid);
        shm_send_answer(c, &a, -1);
        return;
    }
    a.status = -KVF_ENOTREG;
    if (kvf__regions_snapshot(t->regions, &rs, &n, NULL) == 0) {
        for (size_t i = 0; i < n; i++) {
            if (q.addr >= rs[i].addr && q.addr - rs[i].addr < rs[i].len) {
                a.base = rs[i].addr;
                a.len = rs[i].len;
                a.gen = rs[i].gen;
                a.status = -KVF_ENOTFOUND;
                break;
            }
        }
    }
    free(rs);
    pthread_mutex_lock(&t->exp_lock);
    int fd = -1;
    for (size_t i = 0; a.status == -KVF_ENOTFOUND && i < t->nexps; i++) {
        if (t->exps[i].addr == a.base && t->exps[i].len == a.len) {
            fd = t->exps[i].fd;
            a.status = 0;
        }
    }
    shm_send_answer(c, &a, fd);
    pthread_mutex_unlock(&t->exp_lock);
    KVF_DEBUG(SHM_LOG, "%s: memfd request for 0x%" PRIx64 " from pid %d: %s", t->local_sid, q.addr,
              (int)cr.pid, a.status ? kvf_strerror(a.status) : "fd sent");
}

/* One connection at a time: each is one short request bounded by SHM_FD_IO_TIMEOUT_MS, and a
 * sender asks once per region. */
static void *shm_fd_serve(void *arg)
{
    struct shm_transport *t = arg;
    for (;;) {
        struct pollfd pf[2] = {{.fd = t->lfd, .events = POLLIN}, {.fd = t->wake, .events = POLLIN}};
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            KVF_ERROR(SHM_LOG, "%s: memfd socket poll: %s", t->local_sid, strerror(errno));
            break;
        }
        if (pf[1].revents)
            break;
        int c = accept4(t->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        shm_fd_answer(t, c);
        close(c);
    }
    return NULL;
}

/* Start serving on @name. A failure is not fatal: senders then use process_vm_writev for all
 * memory, which is only slower. */
static void shm_fd_listen(struct shm_transport *t, const char *name)
{
    struct sockaddr_un sa;
    if (strlen(name) >= sizeof(t->sock)) {
        KVF_INFO(SHM_LOG, "%s: memfd socket name %s is too long: kvf_mem_alloc memory is written "
                          "with process_vm_writev",
                 t->local_sid, name);
        return;
    }
    snprintf(t->sock, sizeof(t->sock), "%s", name);
    t->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    t->wake = eventfd(0, EFD_CLOEXEC);
    if (t->lfd < 0 || t->wake < 0 ||
        bind(t->lfd, (struct sockaddr *)&sa, shm_sock_addr(name, &sa)) < 0 ||
        listen(t->lfd, 64) < 0 ||
        kvf__thread_start(&t->thread, "kvf-shm-fd", 0, shm_fd_serve, t) != 0) {
        KVF_WARN(SHM_LOG, "%s: cannot serve memfds on @%s (%s): kvf_mem_alloc memory is written "
                          "with process_vm_writev",
                 t->local_sid, name, strerror(errno));
        if (t->lfd >= 0)
            close(t->lfd);
        if (t->wake >= 0)
            close(t->wake);
        t->lfd = t->wake = -1;
    }
}

/* ---- the copy pool ------------------------------------------------------------------------- */

static unsigned shm_copy_threads_conf(const char *sid)
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

/* Copy @len bytes from @s to @d: split over the pool when large enough and the pool is free,
 * else one memcpy. Returns when every byte is copied. */
static void shm_copy(struct shm_transport *t, void *d, const void *s, size_t len)
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

static void shm_pool_stop(struct shm_transport *t)
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

/* ---- transport ------------------------------------------------------------------------------ */

static int shm_create(const kvf_transport_params_t *p, kvf_transport_t **out)
{
    struct shm_transport *t = calloc(1, sizeof(*t));
    if (!t)
        return kvf__err(-KVF_ENOMEM, "shm transport: out of memory");
    snprintf(t->local_sid, sizeof(t->local_sid), "%s", p && p->local_sid ? p->local_sid : "");
    t->regions = p ? p->regions : NULL;
    t->lfd = t->wake = -1;
    pthread_mutex_init(&t->exp_lock, NULL);
    t->copy_threads = shm_copy_threads_conf(t->local_sid);
    pthread_mutex_init(&t->job_lock, NULL);
    pthread_mutex_init(&t->pool_lock, NULL);
    pthread_cond_init(&t->work_cv, NULL);
    pthread_cond_init(&t->done_cv, NULL);
    if (p && p->memfd_sock && t->regions)
        shm_fd_listen(t, p->memfd_sock);
    *out = (kvf_transport_t *)(void *)t;
    return 0;
}

/* Nothing listens: a same-host sender needs only the pid and word from the session record. */
static uint16_t shm_port(const kvf_transport_t *t)
{
    (void)t;
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
    }
    shm_pool_stop(t);
    pthread_mutex_destroy(&t->exp_lock);
    free(t->exps);
    free(t);
}

/* Read the peer's word. Returns 0, or -errno of process_vm_readv (-ESRCH: no such process). */
static int shm_word_read(pid_t pid, uint64_t addr, kvf_shm_word_t *w)
{
    struct iovec l = {.iov_base = w, .iov_len = sizeof(*w)};
    struct iovec r = {.iov_base = (void *)(uintptr_t)addr, .iov_len = sizeof(*w)};
    for (;;) {
        ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n == (ssize_t)sizeof(*w))
            return 0;
        if (n >= 0)
            return -EFAULT;
        if (errno != EINTR)
            return -errno;
    }
}

static const char *shm_probe_fail_hook(void)
{
    const char *v = getenv(SHM_PROBE_FAIL_ENV);
    return v && *v && strcmp(v, "0") != 0 ? v : NULL;
}

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
    if (d->pid <= 0 || d->shm_word_addr == 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s published no pid or shm word", sid);
    /* EPERM means the pid exists but belongs to someone we may not signal, and so (under the
     * same credential rules) may not write either. */
    if (kill(d->pid, 0) < 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s: pid %d is %s", sid, (int)d->pid,
                        errno == EPERM ? "not ours to access (another user)"
                                       : "not visible from here (another pid namespace, or gone)");
    if (shm_probe_fail_hook())
        return kvf__err(-KVF_ENOTSUP, "peer %s: probe refused by the test hook %s", sid,
                        SHM_PROBE_FAIL_ENV);
    rc = shm_word_read(d->pid, d->shm_word_addr, &w);
    if (rc == -EPERM)
        return kvf__err(-KVF_ENOTSUP, "peer %s: process_vm_readv of pid %d not permitted "
                                      "(ptrace access: same user, Yama ptrace_scope, or "
                                      "CAP_SYS_PTRACE)",
                        sid, (int)d->pid);
    if (rc < 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s: probe of pid %d failed: %s", sid, (int)d->pid,
                        strerror(-rc));
    if (w.magic != KVF_SHM_WORD_MAGIC || w.nonce != d->shm_nonce)
        return kvf__err(-KVF_ENOTSUP, "peer %s: pid %d here is another process (different pid "
                                      "namespace?)",
                        sid, (int)d->pid);

    struct shm_peer *p = calloc(1, sizeof(*p));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "shm peer open %s: out of memory", sid);
    p->t = shm_of(tt);
    snprintf(p->sid, sizeof(p->sid), "%s", sid);
    p->pid = d->pid;
    p->word_addr = d->shm_word_addr;
    p->nonce = d->shm_nonce;
    snprintf(p->sock, sizeof(p->sock), "%s", d->memfd_sock);
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&p->map_lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&p->ask_lock, NULL);
    KVF_DEBUG(SHM_LOG, "%s: peer %s reachable by shm (pid %d)", shm_of(tt)->local_sid, sid,
              (int)d->pid);
    *out = (kvf_tpeer_t *)(void *)p;
    return 0;
}

static void shm_rmaps_free(shm_rmap_t *m, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (m[i].state == SHM_R_MAPPED)
            munmap(m[i].map, m[i].map_len);
    free(m);
}

static void shm_peer_close(kvf_tpeer_t *pp)
{
    struct shm_peer *p = shm_peer_of(pp);
    shm_rmaps_free(p->rmaps, p->nrmaps);
    pthread_rwlock_destroy(&p->map_lock);
    pthread_mutex_destroy(&p->ask_lock);
    free(p);
}

/* The entry for the region that contains all of [@addr, @addr+@len), or NULL. map_lock held. */
static shm_rmap_t *shm_rmap_find(struct shm_peer *p, uint64_t addr, uint64_t len)
{
    size_t lo = 0, hi = p->nrmaps;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (p->rmaps[mid].r.addr <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    shm_rmap_t *m = &p->rmaps[lo - 1];
    uint64_t off = addr - m->r.addr;
    return off < m->r.len && len <= m->r.len - off ? m : NULL;
}

/* The new published list: keep what is known about regions that are still in it (same address,
 * length and generation), unmap the rest. If memory runs out, forget everything: transfers
 * then use process_vm_writev, which needs no list here. */
static void shm_regions_changed(kvf_tpeer_t *pp, const kvf_region_t *rs, size_t n)
{
    struct shm_peer *p = shm_peer_of(pp);
    shm_rmap_t *nm = n ? calloc(n, sizeof(*nm)) : NULL;
    pthread_rwlock_wrlock(&p->map_lock);
    for (size_t i = 0; nm && i < n; i++) {
        nm[i].r = rs[i];
        shm_rmap_t *o = shm_rmap_find(p, rs[i].addr, 1);
        if (o && o->r.addr == rs[i].addr && o->r.len == rs[i].len && o->r.gen == rs[i].gen &&
            o->state != SHM_R_UNKNOWN) {
            nm[i].state = o->state;
            nm[i].map = o->map;
            nm[i].map_len = o->map_len;
            o->state = SHM_R_UNKNOWN; /* moved, not to be unmapped below */
        }
    }
    shm_rmaps_free(p->rmaps, p->nrmaps);
    p->rmaps = nm;
    p->nrmaps = nm ? n : 0;
    pthread_rwlock_unlock(&p->map_lock);
}

/* ---- the memfd socket: sender side ------------------------------------------------------- */

/* Ask the target for the fd of region @r and map it. Returns the mapping (and its length) or
 * NULL with the reason in @why; never fails the transfer, which then uses process_vm_writev. */
static uint8_t *shm_fd_fetch(struct shm_peer *p, const kvf_region_t *r, size_t *map_len,
                             char *why, size_t whylen)
{
    struct sockaddr_un sa;
    struct ucred cr = {.pid = 0};
    socklen_t crl = sizeof(cr);
    shm_fd_req_t q = {.magic = SHM_FD_MAGIC, .version = SHM_FD_VERSION, .addr = r->addr};
    shm_fd_ans_t a;
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = &a, .iov_len = sizeof(a)};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                       .msg_controllen = sizeof(u.buf)};
    uint8_t *map = NULL;
    int fd = -1;
    struct stat st;

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        snprintf(why, whylen, "socket: %s", strerror(errno));
        return NULL;
    }
    shm_sock_timeouts(s);
    if (connect(s, (struct sockaddr *)&sa, shm_sock_addr(p->sock, &sa)) < 0) {
        snprintf(why, whylen, "connect @%s: %s", p->sock, strerror(errno));
        goto out_close;
    }
    /* Only the process we validated may hand us memory to write our data into. */
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cr, &crl) < 0 || cr.pid != p->pid) {
        snprintf(why, whylen, "@%s is held by pid %d, not the peer's pid %d", p->sock,
                 (int)cr.pid, (int)p->pid);
        goto out_close;
    }
    if (send(s, &q, sizeof(q), MSG_NOSIGNAL) != (ssize_t)sizeof(q)) {
        snprintf(why, whylen, "send: %s", strerror(errno));
        goto out_close;
    }
    memset(&u, 0, sizeof(u));
    ssize_t got = recvmsg(s, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC);
    /* Take every fd that came, so that none leaks whatever the answer says. */
    for (struct cmsghdr *cm = got >= 0 ? CMSG_FIRSTHDR(&m) : NULL; cm; cm = CMSG_NXTHDR(&m, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfd; i++) {
            int f;
            memcpy(&f, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            if (fd < 0)
                fd = f;
            else
                close(f);
        }
    }
    if (got != (ssize_t)sizeof(a) || a.magic != SHM_FD_MAGIC) {
        snprintf(why, whylen, "malformed answer (%zd bytes)", got);
        goto out_close_fd;
    }
    if (a.status != 0) {
        snprintf(why, whylen, "%s", a.status == -KVF_ENOTFOUND ? "not kvf_mem_alloc memory"
                                                                : kvf_strerror(a.status));
        goto out_close_fd;
    }
    /* The region must be the one the core checked against; a different answer means it was
     * freed and replaced meanwhile, and the next list tells us about the new one. */
    if (fd < 0 || a.base != r->addr || a.len != r->len || a.gen != r->gen) {
        snprintf(why, whylen, "the answer names another region (or no fd came)");
        goto out_close_fd;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size < 0 ||
        (uint64_t)st.st_size < r->len) {
        snprintf(why, whylen, "the fd is not a memfd of at least %" PRIu64 " bytes", r->len);
        goto out_close_fd;
    }
    /* MAP_POPULATE: the page tables are built now, not by the first copy. */
    map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (map == MAP_FAILED) {
        map = NULL;
        snprintf(why, whylen, "mmap: %s", strerror(errno));
        goto out_close_fd;
    }
    *map_len = (size_t)st.st_size;
out_close_fd:
    if (fd >= 0)
        close(fd);
out_close:
    close(s);
    return map;
}

/* Learn, once per region, whether the region containing @x is kvf_mem_alloc memory, and map it
 * if so. Called without map_lock. */
static void shm_resolve(struct shm_peer *p, const kvf_xfer_t *x)
{
    kvf_region_t r;
    pthread_rwlock_rdlock(&p->map_lock);
    shm_rmap_t *e = shm_rmap_find(p, x->remote, x->len);
    bool ask = e && e->state == SHM_R_UNKNOWN;
    if (ask)
        r = e->r;
    pthread_rwlock_unlock(&p->map_lock);
    if (!ask)
        return;

    pthread_mutex_lock(&p->ask_lock);
    pthread_rwlock_rdlock(&p->map_lock);
    e = shm_rmap_find(p, r.addr, r.len);
    ask = e && e->state == SHM_R_UNKNOWN && e->r.gen == r.gen;
    pthread_rwlock_unlock(&p->map_lock);
    if (ask) {
        char why[200] = "";
        size_t map_len = 0;
        uint8_t *map = shm_fd_fetch(p, &r, &map_len, why, sizeof(why));
        pthread_rwlock_wrlock(&p->map_lock);
        e = shm_rmap_find(p, r.addr, r.len);
        if (e && e->state == SHM_R_UNKNOWN && e->r.addr == r.addr && e->r.gen == r.gen) {
            e->state = map ? SHM_R_MAPPED : SHM_R_PLAIN;
            e->map = map;
            e->map_len = map_len;
            map = NULL;
        }
        pthread_rwlock_unlock(&p->map_lock);
        if (map)
            munmap(map, map_len);
        KVF_DEBUG(SHM_LOG, "peer %s: region [0x%" PRIx64 ", +%" PRIu64 "): %s", p->sid, r.addr,
                  r.len, why[0] ? why : "memfd mapped");
    }
    pthread_mutex_unlock(&p->ask_lock);
}

/* Where @x's remote range is mapped here, or NULL (use process_vm). map_lock held. */
static uint8_t *shm_mapped(struct shm_peer *p, const kvf_xfer_t *x)
{
    shm_rmap_t *e = p->nrmaps ? shm_rmap_find(p, x->remote, x->len) : NULL;
    return e && e->state == SHM_R_MAPPED ? e->map + (x->remote - e->r.addr) : NULL;
}

static int shm_regions_gen(kvf_tpeer_t *pp, uint64_t *gen)
{
    struct shm_peer *p = shm_peer_of(pp);
    kvf_shm_word_t w;
    int rc = shm_word_read(p->pid, p->word_addr, &w);
    if (rc == -ESRCH)
        return kvf__err(-KVF_EPEERGONE, "peer %s: process %d is gone", p->sid, (int)p->pid);
    if (rc < 0 || w.magic != KVF_SHM_WORD_MAGIC || w.nonce != p->nonce)
        return kvf__err(-KVF_EPEERGONE, "peer %s: pid %d no longer holds its engine (%s)",
                        p->sid, (int)p->pid, rc < 0 ? strerror(-rc) : "word mismatch");
    *gen = w.gen;
    return 0;
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
        uint8_t *m = shm_mapped(p, &x[i]);
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
        while (end < n && x[end].op == x[i].op && !shm_mapped(p, &x[end]))
            end++;
        rc = shm_run(p, x, i, end, x[i].op == KVF_OP_WRITE, deadline_ms, liov, riov, cap,
                     status);
        i = end;
    }
    pthread_rwlock_unlock(&p->map_lock);
    /* The copies through a mapping are complete when memcpy returns: the target's pages are these
     * pages. The fence orders them before whatever the caller does to announce completion. */
    atomic_thread_fence(memory_order_release);
    free(heap);
    return rc;
}

const struct kvf_transport_ops kvf__shm_ops = {
    .size = sizeof(struct kvf_transport_ops),
    .name = "shm",
    .caps = KVF_TCAP_OFFER | KVF_TCAP_RECORD,
    .check = KVF_CHECK_SENDER,
    .create = shm_create,
    .port = shm_port,
    .destroy = shm_destroy,
    .start = kvf__transport_nop,
    .stop = kvf__transport_nop,
    .peer_open = shm_peer_open,
    .peer_close = shm_peer_close,
    .transfer = shm_transfer,
    .notify = kvf__transport_enotsup_notify,
    .regions_gen = shm_regions_gen,
    .regions_changed = shm_regions_changed,
    .mem_export = shm_mem_export,
    .mem_unexport = shm_mem_unexport,
    .mem_sock = shm_mem_sock,
};
