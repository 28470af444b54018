/*
 * The memfd socket of the shm transport, both ends.
 *
 * Memory from kvf_mem_alloc() is a memfd. The target serves its fds on an abstract Unix socket
 * (named in its session record, see docs/protocol.md): a sender asks once per region, when it
 * learns the region (the warmer, shm_warm.c) or on the first transfer into it if that comes
 * first, receives the fd with SCM_RIGHTS, maps it MAP_SHARED and from then
 * on copies with a plain memcpy (elements of SHM_COPY_MT_MIN bytes or more split over a small
 * pool of copy threads, see shm_copy()). The bounds stay the same: the core has checked every
 * element against the current published list before it reaches the transport, and a mapping
 * is used only while its region (address, length and generation, as the target answered) is
 * still in that list; regions_changed() unmaps the others. Both ends check the other's
 * credentials on the socket: the target answers only its own uid (or root), the sender accepts
 * fds only from the pid it validated with the word, so a process squatting on the name gets and
 * gives nothing.
 *
 * The same socket hands out slots of the target's fence page (shm.h, shm_fence.c): a sender asks
 * once per peer and keeps that connection open for as long as it holds the slot; the serving
 * thread watches those connections and frees a slot when its connection ends.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/thread.h"
#include "common/touch.h"
#include "transport/shm.h"

/* The memfd socket's one request and one answer (docs/protocol.md, "memfd exchange"). */
#define SHM_FD_MAGIC   0x6466766bu /* "kvfd" little-endian */
#define SHM_FD_VERSION 3u /* 3: a fence answer carries the shared region table's fd too */
/* Bound on each read and write of the exchange, both ends: a silent peer costs at most this. */
#define SHM_FD_IO_TIMEOUT_MS 1000
enum { SHM_REQ_MEMFD = 0, SHM_REQ_FENCE = 1 };
typedef struct {
    uint32_t magic;
    uint32_t version;
    uint64_t addr; /* SHM_REQ_MEMFD: an address inside the region whose fd is wanted */
    uint32_t kind; /* SHM_REQ_* */
    uint32_t zero;
    char sid[KVF_SESSION_ID_MAX]; /* SHM_REQ_FENCE: the asker's session id, for messages */
} shm_fd_req_t;
typedef struct {
    uint32_t magic;
    int32_t status; /* 0 (one fd attached), -KVF_ENOTREG, -KVF_ENOTFOUND (not kvf_mem_alloc
                       memory), -KVF_EBUSY (no fence slot free), -KVF_EAUTH (another uid),
                       -KVF_EPROTO */
    uint64_t base;  /* MEMFD: the region: its address, length and generation; FENCE: the slot, */
    uint64_t len;   /* the page's size */
    uint64_t gen;   /* and the address of the target's kvf_shm_word_t; FENCE: two fds come,
                       the page's and the shared region table's */
} shm_fd_ans_t;

/* ---- the target: serving the fds of exported memory ----------------------------------------- */

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

int shm_mem_export(kvf_transport_t *tt, void *addr, size_t len, int fd)
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

void shm_mem_unexport(kvf_transport_t *tt, void *addr)
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

const char *shm_mem_sock(const kvf_transport_t *tt)
{
    const struct shm_transport *t = (const struct shm_transport *)(const void *)tt;
    return t && t->lfd >= 0 ? t->sock : "";
}

/* Send @a with @nfd (0..2) fds @fds. */
static int shm_send_answer_fds(int c, const shm_fd_ans_t *a, const int *fds, size_t nfd)
{
    struct iovec iov = {.iov_base = (void *)a, .iov_len = sizeof(*a)};
    union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfd > 0) {
        memset(&u, 0, sizeof(u));
        m.msg_control = u.buf;
        m.msg_controllen = CMSG_SPACE(nfd * sizeof(int));
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(nfd * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, nfd * sizeof(int));
    }
    return sendmsg(c, &m, MSG_NOSIGNAL) == (ssize_t)sizeof(*a) ? 0 : -errno;
}

static int shm_send_answer(int c, const shm_fd_ans_t *a, int fd)
{
    return shm_send_answer_fds(c, a, &fd, fd >= 0 ? 1 : 0);
}

/* A fence request from @pid: a slot, and the page's fd with it. Returns true when the slot was
 * given, so the connection is now the holder's. */
static bool shm_fence_answer(struct shm_transport *t, int c, pid_t pid, shm_fd_req_t *q)
{
    shm_fd_ans_t a = {.magic = SHM_FD_MAGIC};
    char sid[KVF_SESSION_ID_MAX];
    kvf__printable(sid, sizeof(sid), q->sid, strnlen(q->sid, sizeof(q->sid)));
    int slot = shm_fence_admit(t, c, pid, sid);
    if (slot < 0) {
        a.status = slot;
        KVF_WARN_RATELIMITED(SHM_LOG, "%s: fence slot refused to pid %d: all %u are held",
                             t->local_sid, (int)pid, SHM_FENCE_SLOTS);
        shm_send_answer(c, &a, -1);
        return false;
    }
    a.base = (uint64_t)slot;
    a.len = sizeof(shm_fence_page_t);
    a.gen = t->word_addr;
    int fds[2] = {t->fence_fd, t->table_fd};
    if (shm_send_answer_fds(c, &a, fds, t->table_fd >= 0 ? 2 : 1) < 0) {
        shm_fence_release(t, (unsigned)slot); /* closes @c */
        return true;
    }
    KVF_DEBUG(SHM_LOG, "%s: fence slot %d to pid %d (%s)", t->local_sid, slot, (int)pid, sid);
    return true;
}

/* Answer one request on connection @c: the fd of the kvf_mem_alloc region containing the
 * address, if that region is registered now and the asker runs as our uid (or root); or a fence
 * slot. Returns true when the connection was kept (a fence slot's) or closed already. */
static bool shm_fd_answer(struct shm_transport *t, int c)
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
        KVF_WARN_RATELIMITED(SHM_LOG, "%s: memfd request from pid %d refused: uid %u is not ours",
                             t->local_sid, (int)cr.pid, (unsigned)cr.uid);
        shm_send_answer(c, &a, -1);
        return false;
    }
    if (recv(c, &q, sizeof(q), MSG_WAITALL) != (ssize_t)sizeof(q) || q.magic != SHM_FD_MAGIC ||
        q.version != SHM_FD_VERSION || q.kind > SHM_REQ_FENCE) {
        KVF_DEBUG(SHM_LOG, "%s: malformed memfd request from pid %d", t->local_sid, (int)cr.pid);
        shm_send_answer(c, &a, -1);
        return false;
    }
    if (q.kind == SHM_REQ_FENCE)
        return shm_fence_answer(t, c, cr.pid, &q);
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
    return false;
}

/* One request at a time: each is short and bounded by SHM_FD_IO_TIMEOUT_MS, and a sender asks
 * once per region and once per peer for a fence slot. Between requests, the connections of the
 * fence slots are watched: a holder says nothing on it, so anything (EOF included) ends it. */
static void *shm_fd_serve(void *arg)
{
    struct shm_transport *t = arg;
    struct pollfd pf[2 + SHM_FENCE_SLOTS];
    int fds[SHM_FENCE_SLOTS];
    unsigned slots[SHM_FENCE_SLOTS];
    shm_table_hold(t); /* until it stops serving, or dies: senders see the difference */
    for (;;) {
        size_t nh = shm_fence_conns(t, fds, slots, SHM_FENCE_SLOTS);
        pf[0] = (struct pollfd){.fd = t->lfd, .events = POLLIN};
        pf[1] = (struct pollfd){.fd = t->wake, .events = POLLIN};
        for (size_t i = 0; i < nh; i++)
            pf[2 + i] = (struct pollfd){.fd = fds[i], .events = POLLIN};
        if (poll(pf, (nfds_t)(2 + nh), -1) < 0) {
            if (errno == EINTR)
                continue;
            KVF_ERROR(SHM_LOG, "%s: memfd socket poll: %s", t->local_sid, strerror(errno));
            break;
        }
        if (pf[1].revents)
            break;
        for (size_t i = 0; i < nh; i++)
            if (pf[2 + i].revents)
                shm_fence_release(t, slots[i]);
        if (!pf[0].revents)
            continue;
        int c = accept4(t->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        if (!shm_fd_answer(t, c))
            close(c);
    }
    shm_table_release(t);
    return NULL;
}

/* Start serving on @name, with the fence page. A failure is not fatal: peers then reach this
 * engine over tcp (a sender uses shm only with a fence slot). */
void shm_fd_listen(struct shm_transport *t, const char *name)
{
    struct sockaddr_un sa;
    if (strlen(name) >= sizeof(t->sock)) {
        KVF_INFO(SHM_LOG,
                 "%s: memfd socket name %s is too long: kvf_mem_alloc memory is written "
                 "with process_vm_writev",
                 t->local_sid, name);
        return;
    }
    snprintf(t->sock, sizeof(t->sock), "%s", name);
    int frc = shm_fence_create(t);
    if (frc < 0) {
        KVF_WARN(SHM_LOG, "%s: cannot create the shm fence page (%s): peers will use tcp",
                 t->local_sid, strerror(-frc));
        shm_fence_destroy(t);
        return;
    }
    t->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    t->wake = eventfd(0, EFD_CLOEXEC);
    if (t->lfd < 0 || t->wake < 0 ||
        bind(t->lfd, (struct sockaddr *)&sa, shm_sock_addr(name, &sa)) < 0 ||
        listen(t->lfd, 64) < 0 ||
        kvf__thread_start(&t->thread, "kvf-shm-fd", 0, shm_fd_serve, t) != 0) {
        KVF_WARN(SHM_LOG, "%s: cannot serve the shm socket @%s (%s): peers will use tcp",
                 t->local_sid, name, strerror(errno));
        if (t->lfd >= 0)
            close(t->lfd);
        if (t->wake >= 0)
            close(t->wake);
        t->lfd = t->wake = -1;
        shm_fence_destroy(t);
    }
}

/* ---- the sender: the peer's regions, mapped when they are memfds ---------------------------- */

void shm_rmaps_free(shm_rmap_t *m, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (m[i].state == SHM_R_MAPPED)
            munmap(m[i].map, m[i].map_len);
    free(m);
}

shm_rmap_t *shm_rmap_find(struct shm_peer *p, uint64_t addr, uint64_t len)
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
 * then use process_vm_writev, which needs no list here. Unmapping takes map_lock exclusively,
 * which the warmer holds (shared) while it touches a mapping. */
bool shm_regions_changed(kvf_tpeer_t *pp, const kvf_region_t *rs, size_t n)
{
    struct shm_peer *p = shm_peer_of(pp);
    shm_rmap_t *nm = n ? calloc(n, sizeof(*nm)) : NULL;
    bool todo = false;
    pthread_rwlock_wrlock(&p->map_lock);
    for (size_t i = 0; nm && i < n; i++) {
        nm[i].r = rs[i];
        shm_rmap_t *o = shm_rmap_find(p, rs[i].addr, 1);
        if (o && o->r.addr == rs[i].addr && o->r.len == rs[i].len && o->r.gen == rs[i].gen) {
            nm[i].warm_done = o->warm_done;
            nm[i].ready = o->ready;
            if (o->state != SHM_R_UNKNOWN) {
                nm[i].state = o->state;
                nm[i].map = o->map;
                nm[i].map_len = o->map_len;
                o->state = SHM_R_UNKNOWN; /* moved, not to be unmapped below */
            }
        }
        todo |= !nm[i].warm_done;
    }
    shm_rmaps_free(p->rmaps, p->nrmaps);
    p->rmaps = nm;
    p->nrmaps = nm ? n : 0;
    pthread_rwlock_unlock(&p->map_lock);
    return todo;
}

/*
 * Send @q to the peer's socket and receive the answer @a and the fd that came with it (@fd, -1
 * if none). Returns the connected socket (the caller closes it), or -1 with the reason in @why.
 * Only the process validated with the word may answer.
 */
static int shm_ask_fds(struct shm_peer *p, const shm_fd_req_t *q, shm_fd_ans_t *a, int *fd,
                       size_t nfds, char *why, size_t whylen)
{
    struct sockaddr_un sa;
    struct ucred cr = {.pid = 0};
    socklen_t crl = sizeof(cr);
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = a, .iov_len = sizeof(*a)};
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf)};

    for (size_t i = 0; i < nfds; i++)
        fd[i] = -1;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        snprintf(why, whylen, "socket: %s", strerror(errno));
        return -1;
    }
    shm_sock_timeouts(s);
    if (connect(s, (struct sockaddr *)&sa, shm_sock_addr(p->sock, &sa)) < 0) {
        snprintf(why, whylen, "connect @%s: %s", p->sock, strerror(errno));
        goto out_close;
    }
    /* Only the process we validated may hand us memory to write our data into. */
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cr, &crl) < 0 || cr.pid != p->pid) {
        snprintf(why, whylen, "@%s is held by pid %d, not the peer's pid %d", p->sock, (int)cr.pid,
                 (int)p->pid);
        goto out_close;
    }
    if (send(s, q, sizeof(*q), MSG_NOSIGNAL) != (ssize_t)sizeof(*q)) {
        snprintf(why, whylen, "send: %s", strerror(errno));
        goto out_close;
    }
    memset(&u, 0, sizeof(u));
    ssize_t got = recvmsg(s, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC);
    /* Take every fd that came, so that none leaks whatever the answer says: the first @nfds in
     * order, the rest closed. */
    size_t took = 0;
    for (struct cmsghdr *cm = got >= 0 ? CMSG_FIRSTHDR(&m) : NULL; cm; cm = CMSG_NXTHDR(&m, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfd; i++) {
            int f;
            memcpy(&f, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            if (took < nfds)
                fd[took++] = f;
            else
                close(f);
        }
    }
    if (got == (ssize_t)sizeof(*a) && a->magic == SHM_FD_MAGIC)
        return s;
    snprintf(why, whylen, "malformed answer (%zd bytes)", got);
    for (size_t i = 0; i < nfds; i++) {
        if (fd[i] >= 0)
            close(fd[i]);
        fd[i] = -1;
    }
out_close:
    close(s);
    return -1;
}

static int shm_ask(struct shm_peer *p, const shm_fd_req_t *q, shm_fd_ans_t *a, int *fd, char *why,
                   size_t whylen)
{
    return shm_ask_fds(p, q, a, fd, 1, why, whylen);
}

/* Ask the target for the fd of region @r and map it. Returns the mapping (and its length) or
 * NULL with the reason in @why; never fails the transfer, which then uses process_vm_writev. */
static uint8_t *shm_fd_fetch(struct shm_peer *p, const kvf_region_t *r, size_t *map_len, char *why,
                             size_t whylen)
{
    shm_fd_req_t q = {.magic = SHM_FD_MAGIC,
                      .version = SHM_FD_VERSION,
                      .addr = r->addr,
                      .kind = SHM_REQ_MEMFD};
    shm_fd_ans_t a;
    uint8_t *map = NULL;
    int fd;
    struct stat st;

    int s = shm_ask(p, &q, &a, &fd, why, whylen);
    if (s < 0)
        return NULL;
    if (a.status != 0) {
        snprintf(why, whylen, "%s",
                 a.status == -KVF_ENOTFOUND ? "not kvf_mem_alloc memory" : kvf_strerror(a.status));
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
    close(s);
    return map;
}

int shm_fence_open(struct shm_peer *p, const char *local_sid)
{
    shm_fd_req_t q = {.magic = SHM_FD_MAGIC, .version = SHM_FD_VERSION, .kind = SHM_REQ_FENCE};
    shm_fd_ans_t a;
    char why[200] = "";
    struct stat st;
    void *map = MAP_FAILED;
    int fds[2], fd, seals;

    p->fence_conn = -1;
    if (!p->sock[0])
        return kvf__err(-KVF_ENOTSUP, "peer %s serves no shm socket (so no fence that its "
                                      "unregister could wait on)",
                        p->sid);
    snprintf(q.sid, sizeof(q.sid), "%s", local_sid);
    int s = shm_ask_fds(p, &q, &a, fds, 2, why, sizeof(why));
    if (s < 0)
        return kvf__err(-KVF_ENOTSUP, "peer %s: fence slot: %s", p->sid, why);
    fd = fds[0];
    if (a.status != 0 || fd < 0 || a.base >= SHM_FENCE_SLOTS || a.len != sizeof(shm_fence_page_t) ||
        a.gen == 0) {
        snprintf(why, sizeof(why), "%s",
                 a.status == -KVF_EBUSY ? "all its fence slots are held"
                 : a.status            ? kvf_strerror(a.status)
                                       : "malformed answer");
    } else if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
               st.st_size < (off_t)sizeof(shm_fence_page_t)) {
        snprintf(why, sizeof(why), "the fd is not a fence page");
    } else if ((seals = fcntl(fd, F_GET_SEALS)) < 0 || !(seals & F_SEAL_SHRINK)) {
        /* Unsealed, the target could shrink it under our mapping: a SIGBUS on the next enter. */
        snprintf(why, sizeof(why), "the fence page's memfd is not sealed against shrinking");
    } else {
        map = mmap(NULL, sizeof(shm_fence_page_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED)
            snprintf(why, sizeof(why), "mmap: %s", strerror(errno));
        else if (((shm_fence_page_t *)map)->magic != SHM_FENCE_MAGIC)
            snprintf(why, sizeof(why), "the page has no fence magic");
        else if (fds[1] < 0)
            snprintf(why, sizeof(why), "no region table came with the fence page");
        else
            (void)shm_table_map(p, fds[1], why, sizeof(why));
    }
    if (fd >= 0)
        close(fd);
    if (fds[1] >= 0)
        close(fds[1]);
    if (why[0]) {
        shm_table_unmap(p);
        if (map != MAP_FAILED)
            munmap(map, sizeof(shm_fence_page_t));
        close(s);
        return kvf__err(-KVF_ENOTSUP, "peer %s: fence slot: %s", p->sid, why);
    }
    p->fence = map;
    p->fence_slot = (unsigned)a.base;
    p->fence_conn = s;
    p->word_addr = a.gen;
    return 0;
}

void shm_fence_close(struct shm_peer *p)
{
    shm_table_unmap(p);
    if (p->fence)
        munmap(p->fence, sizeof(*p->fence));
    if (p->fence_conn >= 0)
        close(p->fence_conn);
    p->fence = NULL;
    p->fence_conn = -1;
}

bool shm_resolve_region(struct shm_peer *p, const kvf_region_t *r, _Atomic uint64_t *made,
                        bool ready)
{
    pthread_mutex_lock(&p->ask_lock);
    pthread_rwlock_rdlock(&p->map_lock);
    shm_rmap_t *e = shm_rmap_find(p, r->addr, r->len);
    bool ask = e && e->state == SHM_R_UNKNOWN && e->r.addr == r->addr && e->r.gen == r->gen;
    bool mapped = e && e->state == SHM_R_MAPPED && e->r.addr == r->addr && e->r.gen == r->gen;
    pthread_rwlock_unlock(&p->map_lock);
    if (ask) {
        char why[200] = "";
        size_t map_len = 0;
        uint8_t *map = shm_fd_fetch(p, r, &map_len, why, sizeof(why));
        pthread_rwlock_wrlock(&p->map_lock);
        e = shm_rmap_find(p, r->addr, r->len);
        if (e && e->state == SHM_R_UNKNOWN && e->r.addr == r->addr && e->r.gen == r->gen) {
            e->state = map ? SHM_R_MAPPED : SHM_R_PLAIN;
            e->map = map;
            e->map_len = map_len;
            e->ready = ready;
            mapped = map != NULL;
            if (mapped)
                atomic_fetch_add(made, 1);
            map = NULL;
        }
        pthread_rwlock_unlock(&p->map_lock);
        if (map)
            munmap(map, map_len);
        KVF_DEBUG(SHM_LOG, "peer %s: region [0x%" PRIx64 ", +%" PRIu64 "): %s", p->sid, r->addr,
                  r->len, why[0] ? why : "memfd mapped");
    }
    pthread_mutex_unlock(&p->ask_lock);
    return mapped;
}

/* Will the warmer (shm_warm.c) map @e, a region of @p it has not taken yet? It runs, and takes
 * @e before it reaches SHM_WARM_REGIONS_MAX of @p's: it takes them in list order. map_lock
 * held. */
static bool warm_will_take(struct shm_peer *p, const shm_rmap_t *e)
{
    struct shm_transport *t = p->t;
    if (!kvf__touch_enabled() || !p->sock[0])
        return false;
    size_t ahead = p->warm_taken;
    for (const shm_rmap_t *m = p->rmaps; m < e && ahead < SHM_WARM_REGIONS_MAX; m++)
        ahead += !m->warm_done;
    if (ahead >= SHM_WARM_REGIONS_MAX)
        return false;
    pthread_mutex_lock(&t->warm_lock);
    bool on = t->warm_started && !t->warm_failed && !t->warm_stop;
    pthread_mutex_unlock(&t->warm_lock);
    return on;
}

void shm_resolve(struct shm_peer *p, const kvf_xfer_t *x)
{
    kvf_region_t r;
    pthread_rwlock_rdlock(&p->map_lock);
    shm_rmap_t *e = shm_rmap_find(p, x->remote, x->len);
    /* Unknown and not the warmer's to map (it is off, or has no room for it): ask, and wait for
     * another transfer's request under way on ask_lock. A region the warmer has or will take is
     * not waited for: the transfer uses process_vm until the mapping is made and warmed. */
    bool ask = e && e->state == SHM_R_UNKNOWN && !e->warm_done && !warm_will_take(p, e);
    if (ask)
        r = e->r;
    pthread_rwlock_unlock(&p->map_lock);
    if (ask)
        (void)shm_resolve_region(p, &r, &p->t->xfer_maps, true);
}

uint8_t *shm_mapped(struct shm_peer *p, const kvf_xfer_t *x, bool *pending)
{
    shm_rmap_t *e = p->nrmaps ? shm_rmap_find(p, x->remote, x->len) : NULL;
    if (e && e->state == SHM_R_MAPPED && e->ready)
        return e->map + (x->remote - e->r.addr);
    /* Mapped but not warm yet, or unknown with the warmer to ask (a transfer asks first
     * otherwise, in shm_resolve, so unknown here means the warmer's). */
    if (pending)
        *pending = e && p->sock[0] && (e->state == SHM_R_MAPPED || e->state == SHM_R_UNKNOWN);
    return NULL;
}
