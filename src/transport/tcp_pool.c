/*
 * The tcp transport's threads: one accept thread and two fixed sets of I/O threads, however many
 * connections are served or opened to peers (docs/architecture.md, "Threads").
 *
 * The accept thread accepts, applies the caps and hands each connection to the I/O thread that
 * serves the fewest; that thread adds it to its epoll set and drives its state machine
 * (tcp_target.c) whenever the socket is ready, and checks every connection's timers once per
 * TCP_SERVER_SLICE_MS. At its HELLO the connection is placed (tcp_sc_place_locked(): all of a
 * peer's connections on one thread, the peers spread over them) and, if that is another thread,
 * moved there between two turns (io_move()). A connection is owned by one I/O thread at a time:
 * only that thread touches its state, releases its region references and closes its fd (after
 * unlinking it from t->sconns, so anyone holding t->mu may shutdown() it).
 *
 * Caps (docs/protocol.md, "Limits"). Connections that have not finished their HELLO (and, with a
 * key, the handshake before it) are *pre-auth*: at most KVF_TCP_MAX_PREAUTH of them, at most
 * KVF_TCP_MAX_PREAUTH_PER_ADDR from one address; a new one beyond either evicts the oldest
 * pre-auth connection (of that address, for the per-address cap), so silent or slow sockets can
 * neither lock a real peer out nor hold more than that share. Past its HELLO a connection counts
 * against KVF_TCP_MAX_CONNS and KVF_TCP_MAX_CONNS_PER_ADDR, checked at accept and again at the
 * HELLO. When accept() runs out of file descriptors the accept thread stops polling the listening
 * socket for a while instead of spinning, and a closed connection wakes it.
 *
 * A second set of as many I/O threads, the same loop, watches the connections this engine opens
 * to its peers (tcp_watch_*): the connection's owner adds its socket to one thread's epoll set
 * with a handler (tcp_rx.c), and deletes it before it closes the socket. Kept apart from the
 * serving threads, which may wait on the engine's callbacks (a notification's room in a full
 * queue), so that serving peers never holds up the answers to this engine's own transfers.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/thread.h"
#include "transport/tcp.h"

/* Events one epoll_wait() takes. */
#define TCP_IO_EVENTS 64

/* An initiator connection's socket, watched by one I/O thread. Its epoll entry carries the
 * watch's address with the low bit set (a served connection's carries its own, the eventfd's
 * NULL). A deleted watch is freed by its thread after the epoll_wait() whose events may still
 * name it. */
struct tcp_watch {
    struct tcp_iothr *io;
    int fd;
    tcp_watch_fn fn;
    void *arg;
    bool dead;              /* io->wmu: deleted; its handler is not run again */
    bool busy;              /* io->wmu: its handler runs now */
    struct tcp_watch *next; /* in io->dead */
};

size_t tcp_holders(kvf_transport_t *tt, uint64_t addr, uint64_t len, char *buf, size_t buflen)
{
    struct tcp_transport *t = tcp_of(tt);
    size_t n = 0;
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn *sc = t->sconns; sc; sc = sc->next) {
        uint64_t lo = atomic_load_explicit(&sc->hold_lo, memory_order_relaxed);
        uint64_t hi = atomic_load_explicit(&sc->hold_hi, memory_order_relaxed);
        if (hi <= addr || lo >= addr + len)
            continue;
        char what[KVF_SESSION_ID_MAX + TCP_ADDR_LEN + 16];
        snprintf(what, sizeof(what), "peer %s (%s)", sc->peer_sid[0] ? sc->peer_sid : "?",
                 sc->addr);
        kvf__holders_add(buf, buflen, what);
        n++;
    }
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * I/O threads
 * ------------------------------------------------------------------------------------------- */

/* The configured count (1..KVF_MAX_IO_THREADS), else KVFERRY_IO_THREADS=N, else
 * min(online CPUs, KVF_DEFAULT_IO_THREADS). */
static unsigned tcp_io_threads_conf(const struct tcp_transport *t)
{
    if (t->io_threads)
        return t->io_threads > KVF_MAX_IO_THREADS ? KVF_MAX_IO_THREADS : t->io_threads;
    const char *sid = t->local_sid;
    const char *v = getenv(TCP_IO_THREADS_ENV);
    if (v && *v) {
        char *end;
        unsigned long n = strtoul(v, &end, 10);
        if (*end == '\0' && n >= 1)
            return n > KVF_MAX_IO_THREADS ? KVF_MAX_IO_THREADS : (unsigned)n;
        KVF_WARN(TCP_LOG, "%s: %s=%s is not a count >= 1: ignored", sid, TCP_IO_THREADS_ENV, v);
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 1)
        cpus = 1;
    return cpus < KVF_DEFAULT_IO_THREADS ? (unsigned)cpus : KVF_DEFAULT_IO_THREADS;
}

/* Whether @sc waits for its socket to take bytes (an answer, or its TLS session's). */
static bool io_wants_out(const struct tcp_sconn *sc)
{
    return sc->want_out || sc->tls_out;
}

static void io_watch(struct tcp_sconn *sc)
{
    struct epoll_event ev = {.events = io_wants_out(sc) ? EPOLLOUT : EPOLLIN, .data.ptr = sc};
    if (epoll_ctl(sc->io->ep, EPOLL_CTL_MOD, sc->fd, &ev) == 0)
        sc->ep_out = io_wants_out(sc);
}

/* Close @sc (its thread's list keeps it, marked dead, until io_sweep()). @rc and @reason: what
 * tcp_sc_run() or tcp_sc_tick() said. */
static void io_close(struct tcp_sconn *sc, int rc, const char *reason)
{
    struct tcp_transport *t = sc->t;
    epoll_ctl(sc->io->ep, EPOLL_CTL_DEL, sc->fd, NULL);
    /* Its region references go first, then the peer is told (FIN), then it stops being counted:
     * a peer that sees the close may unregister at once, and whoever sees it gone may rely on
     * the peer being able to see it too. */
    tcp_sc_end(sc);
    shutdown(sc->fd, SHUT_RDWR);
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn **pp = &t->sconns; *pp; pp = &(*pp)->next) {
        if (*pp == sc) {
            *pp = sc->next;
            break;
        }
    }
    t->nsconns--;
    if (sc->preauth)
        t->npreauth--;
    sc->home->nconns--;
    bool evicted = sc->evicted;
    pthread_mutex_unlock(&t->mu);
    /* A connection cut by destroy() or evicted (logged then) is not reported again. */
    if (rc < 0 && reason && !evicted && !atomic_load(&t->stopping))
        KVF_WARN_RATELIMITED(TCP_LOG, "closing connection from %s: %s", sc->addr, reason);
    close(sc->fd);
    sc->fd = -1;
    /* An fd is free again: wake an accept thread that paused for want of one. */
    uint64_t one = 1;
    if (write(t->reap_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        KVF_DEBUG(TCP_LOG, "waking the accept thread: %s", strerror(errno));
}

/* Free the connections closed since the last sweep. */
static void io_sweep(struct tcp_iothr *io)
{
    for (struct tcp_sconn **pp = &io->conns; *pp;) {
        struct tcp_sconn *sc = *pp;
        if (sc->fd < 0) {
            *pp = sc->tnext;
            free(sc);
        } else {
            pp = &sc->tnext;
        }
    }
}

/* Take the connections handed over: new ones from the accept thread, and ones another I/O
 * thread moved here at their HELLO. @last: stopping, none is handed over after these. */
static void io_adopt(struct tcp_iothr *io, bool last)
{
    uint64_t v;
    if (read(io->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        KVF_DEBUG(TCP_LOG, "I/O thread eventfd: %s", strerror(errno));
    pthread_mutex_lock(&io->t->mu);
    struct tcp_sconn *in = io->incoming;
    io->incoming = NULL;
    io->retired = last;
    pthread_mutex_unlock(&io->t->mu);
    while (in) {
        struct tcp_sconn *sc = in;
        in = sc->tnext;
        sc->tnext = io->conns;
        io->conns = sc;
        if (!sc->begun) {
            tcp_sc_begin(sc);
            sc->begun = true;
        }
        /* Level-triggered: bytes that arrived during a move wake this thread at once. */
        struct epoll_event ev = {.events = io_wants_out(sc) ? EPOLLOUT : EPOLLIN, .data.ptr = sc};
        sc->ep_out = io_wants_out(sc);
        if (epoll_ctl(io->ep, EPOLL_CTL_ADD, sc->fd, &ev) < 0) {
            char why[96];
            snprintf(why, sizeof(why), "epoll: %s", strerror(errno));
            io_close(sc, -1, why);
        }
    }
}

/* Put @sc on @to's hand-over list, release t->mu (held by the caller) and wake @to. From then
 * on @to owns @sc and may close and free it. */
static void io_hand_over_unlock(struct tcp_transport *t, struct tcp_iothr *to,
                                struct tcp_sconn *sc)
{
    sc->tnext = to->incoming;
    to->incoming = sc;
    pthread_mutex_unlock(&t->mu);
    uint64_t v = 1;
    if (write(to->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        KVF_WARN(TCP_LOG, "waking I/O thread %u: %s", to->idx, strerror(errno));
}

/* Move @sc, between two turns, from its thread (the caller) to its home. A home that no longer
 * adopts (stopping) keeps it here. */
static void io_move(struct tcp_iothr *io, struct tcp_sconn *sc)
{
    struct tcp_transport *t = io->t;
    pthread_mutex_lock(&t->mu);
    struct tcp_iothr *to = sc->home;
    if (to->retired) {
        to->nconns--;
        io->nconns++;
        sc->home = io;
        pthread_mutex_unlock(&t->mu);
        return;
    }
    epoll_ctl(io->ep, EPOLL_CTL_DEL, sc->fd, NULL);
    for (struct tcp_sconn **pp = &io->conns; *pp; pp = &(*pp)->tnext) {
        if (*pp == sc) {
            *pp = sc->tnext;
            break;
        }
    }
    /* Once it is on the other list, that thread may close and free it: told before. */
    KVF_DEBUG(TCP_LOG, "connection from %s (%s) moves from I/O thread %u to %u", sc->addr,
              sc->peer_sid, io->idx, to->idx);
    sc->io = to;
    io_hand_over_unlock(t, to, sc);
}

int tcp_watch_add(struct tcp_transport *t, int fd, uint32_t events, tcp_watch_fn fn, void *arg,
                  struct tcp_watch **out)
{
    struct tcp_watch *w = calloc(1, sizeof(*w));
    if (!w)
        return -KVF_ENOMEM;
    unsigned i = atomic_fetch_add_explicit(&t->watch_rr, 1, memory_order_relaxed) % t->nrx;
    *w = (struct tcp_watch){.io = &t->io[t->nio + i], .fd = fd, .fn = fn, .arg = arg};
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(uintptr_t)w | 1u};
    if (epoll_ctl(w->io->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int rc = -errno;
        free(w);
        return rc;
    }
    *out = w;
    return 0;
}

bool tcp_watch_mod(struct tcp_watch *w, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(uintptr_t)w | 1u};
    if (epoll_ctl(w->io->ep, EPOLL_CTL_MOD, w->fd, &ev) == 0)
        return true;
    KVF_WARN(TCP_LOG, "epoll_ctl MOD of an initiator connection: %s", strerror(errno));
    return false;
}

void tcp_watch_del(struct tcp_watch *w)
{
    if (!w)
        return;
    struct tcp_iothr *io = w->io;
    pthread_mutex_lock(&io->wmu);
    epoll_ctl(io->ep, EPOLL_CTL_DEL, w->fd, NULL);
    w->dead = true;
    while (w->busy)
        pthread_cond_wait(&io->wcv, &io->wmu);
    w->next = io->dead;
    io->dead = w;
    pthread_mutex_unlock(&io->wmu);
}

/* Run @w's handler, unless it was deleted since epoll_wait() returned its events. */
static void io_watch_run(struct tcp_watch *w, uint32_t events)
{
    struct tcp_iothr *io = w->io;
    pthread_mutex_lock(&io->wmu);
    bool dead = w->dead;
    w->busy = !dead;
    pthread_mutex_unlock(&io->wmu);
    if (dead)
        return;
    w->fn(w->arg, events);
    pthread_mutex_lock(&io->wmu);
    w->busy = false;
    if (w->dead)
        pthread_cond_broadcast(&io->wcv);
    pthread_mutex_unlock(&io->wmu);
}

/* Free the watches deleted so far: no event of a later epoll_wait() names them. */
static void io_watch_sweep(struct tcp_iothr *io)
{
    pthread_mutex_lock(&io->wmu);
    struct tcp_watch *d = io->dead;
    io->dead = NULL;
    pthread_mutex_unlock(&io->wmu);
    while (d) {
        struct tcp_watch *next = d->next;
        free(d);
        d = next;
    }
}

static void *tcp_io_main(void *arg)
{
    struct tcp_iothr *io = arg;
    struct tcp_transport *t = io->t;
    struct epoll_event evs[TCP_IO_EVENTS];
    char why[256];
    const char *reason;
    uint64_t next_tick = kvf__now_ms() + TCP_SERVER_SLICE_MS;
    while (!atomic_load(&t->io_stopping)) {
        uint64_t now = kvf__now_ms();
        int timeout = now >= next_tick ? 0 : (int)(next_tick - now);
        int n = epoll_wait(io->ep, evs, TCP_IO_EVENTS, timeout);
        if (n < 0 && errno != EINTR) {
            KVF_ERROR(TCP_LOG, "epoll_wait on %s: %s", t->listen_str, strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 & 1u) {
                io_watch_run((struct tcp_watch *)(uintptr_t)(evs[i].data.u64 & ~(uint64_t)1u),
                             evs[i].events);
                continue;
            }
            struct tcp_sconn *sc = evs[i].data.ptr;
            if (!sc) {
                io_adopt(io, false);
                continue;
            }
            if (sc->fd < 0)
                continue;
            int rc = tcp_sc_run(sc, &reason, why, sizeof(why));
            if (rc)
                io_close(sc, rc, reason);
            else if (sc->home != io)
                io_move(io, sc);
            else if (io_wants_out(sc) != sc->ep_out)
                io_watch(sc);
        }
        now = kvf__now_ms();
        if (now >= next_tick) {
            next_tick = now + TCP_SERVER_SLICE_MS;
            for (struct tcp_sconn *sc = io->conns; sc; sc = sc->tnext) {
                if (sc->fd < 0)
                    continue;
                int rc = tcp_sc_tick(sc, now, &reason, why, sizeof(why));
                if (rc)
                    io_close(sc, rc, reason);
            }
            if (io->idx == t->nio && t->on_tick)
                t->on_tick(t, now);
        }
        io_sweep(io);
        io_watch_sweep(io);
    }
    /* Stopping: cut every connection, giving back its region references, before the engine
     * destroys the region table. Connections still handed over are adopted first. */
    io_adopt(io, true);
    for (struct tcp_sconn *sc = io->conns; sc; sc = sc->tnext)
        if (sc->fd >= 0)
            io_close(sc, 1, NULL);
    io_sweep(io);
    io_watch_sweep(io);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Accepting connections
 * ------------------------------------------------------------------------------------------- */

/* The remote IP of @ss into @ip: 4 bytes for IPv4 (and IPv4-mapped IPv6), else 16. */
static uint8_t tcp_sockaddr_ip(const struct sockaddr_storage *ss, uint8_t ip[16])
{
    if (ss->ss_family == AF_INET) {
        memcpy(ip, &((const struct sockaddr_in *)(const void *)ss)->sin_addr, 4);
        return 4;
    }
    const struct in6_addr *a6 = &((const struct sockaddr_in6 *)(const void *)ss)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a6)) {
        memcpy(ip, a6->s6_addr + 12, 4);
        return 4;
    }
    memcpy(ip, a6->s6_addr, 16);
    return 16;
}

/* accept() failed for want of a file descriptor or memory: retrying at once cannot succeed. */
static bool tcp_accept_starved(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

static bool same_ip(const struct tcp_sconn *a, const struct tcp_sconn *b)
{
    return a->ip_len == b->ip_len && memcmp(a->ip, b->ip, a->ip_len) == 0;
}

/* Pre-auth connections from @sc's address (with @sc when it is in the list). Under t->mu. */
static unsigned preauth_from(const struct tcp_transport *t, const struct tcp_sconn *sc)
{
    unsigned n = 0;
    for (const struct tcp_sconn *o = t->sconns; o; o = o->next)
        n += o->preauth && same_ip(o, sc);
    return n;
}

/*
 * Whom to evict for a new pre-auth connection from @sc's address: when that address holds
 * KVF_TCP_MAX_PREAUTH_PER_ADDR, one of its own; else, when KVF_TCP_MAX_PREAUTH are held, one of
 * the address holding the most (so a flood from other addresses never evicts a peer's lone
 * connection). Within the address, the one whose handshake got least far (a whole first message
 * waiting to be read counts), the oldest of those: a client proving the key is evicted only after
 * every silent or half-sent socket of its address. Under t->mu.
 */
static struct tcp_sconn *preauth_victim(struct tcp_transport *t, const struct tcp_sconn *sc,
                                        unsigned *held)
{
    const struct tcp_sconn *from = NULL;
    *held = preauth_from(t, sc);
    if (*held >= KVF_TCP_MAX_PREAUTH_PER_ADDR) {
        from = sc;
    } else if (t->npreauth >= KVF_TCP_MAX_PREAUTH) {
        /* The pre-auth connections only (at most KVF_TCP_MAX_PREAUTH), counted pairwise. */
        const struct tcp_sconn *pre[KVF_TCP_MAX_PREAUTH];
        unsigned np = 0;
        for (const struct tcp_sconn *o = t->sconns; o && np < KVF_TCP_MAX_PREAUTH; o = o->next)
            if (o->preauth)
                pre[np++] = o;
        *held = 0;
        for (unsigned i = 0; i < np; i++) {
            unsigned n = 0;
            for (unsigned j = 0; j < np; j++)
                n += same_ip(pre[i], pre[j]);
            if (n > *held) {
                *held = n;
                from = pre[i];
            }
        }
    }
    if (!from)
        return NULL;
    struct tcp_sconn *victim = NULL;
    unsigned least = UINT32_MAX;
    /* The list is newest first: among equals the last one seen is the oldest. */
    for (struct tcp_sconn *o = t->sconns; o; o = o->next) {
        if (!o->preauth || !same_ip(o, from))
            continue;
        /* Progress: the handshake's stage, and whether a whole first message is waiting for its
         * I/O thread (a client that connected just now, before its hello was read). */
        int pending = 0;
        unsigned st = 2u * atomic_load_explicit(&o->stage, memory_order_relaxed);
        if (st == 0 && ioctl(o->fd, FIONREAD, &pending) == 0 &&
            (unsigned)pending >=
                (t->auth.len ? KVF_AUTH_HDR_LEN + KVF_AUTH_NONCE_LEN + 1 : KVF_TCP_HDR_LEN))
            st = 1;
        if (st <= least) {
            least = st;
            victim = o;
        }
    }
    return victim;
}

/*
 * Admit @sc under the caps, evicting a pre-auth connection when the pre-auth share is full.
 * Under t->mu. Returns NULL, or why @sc is refused (the caps of authenticated connections).
 */
static const char *tcp_admit(struct tcp_transport *t, struct tcp_sconn *sc, char *why,
                             size_t whylen)
{
    unsigned all = 0, from = 0;
    for (struct tcp_sconn *o = t->sconns; o; o = o->next) {
        if (o->evicted || o->preauth)
            continue;
        all++;
        from += same_ip(o, sc);
    }
    if (all >= KVF_TCP_MAX_CONNS) {
        snprintf(why, whylen, "KVF_TCP_MAX_CONNS (%u) reached", KVF_TCP_MAX_CONNS);
        return why;
    }
    if (from >= KVF_TCP_MAX_CONNS_PER_ADDR) {
        snprintf(why, whylen,
                 "KVF_TCP_MAX_CONNS_PER_ADDR (%u) connections from that address are open",
                 KVF_TCP_MAX_CONNS_PER_ADDR);
        return why;
    }
    unsigned held;
    struct tcp_sconn *victim = preauth_victim(t, sc, &held);
    if (victim) {
        KVF_WARN_RATELIMITED(TCP_LOG,
                             "closing connection from %s: not authenticated, %u such from its "
                             "address and %u in all (KVF_TCP_MAX_PREAUTH_PER_ADDR %u, "
                             "KVF_TCP_MAX_PREAUTH %u); room for one from %s",
                             victim->addr, held, t->npreauth, KVF_TCP_MAX_PREAUTH_PER_ADDR,
                             KVF_TCP_MAX_PREAUTH, sc->addr);
        victim->evicted = true;
        victim->preauth = false;
        t->npreauth--;
        shutdown(victim->fd, SHUT_RDWR);
    }
    return NULL;
}

/* Accept one connection and hand it to an I/O thread. Returns 0, or the errno of a failed
 * accept(). Every refusal is logged at most KVF_LOG_RATELIMIT_BURST times a second. */
static int tcp_accept_one(struct tcp_transport *t)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = accept4(t->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
        int err = errno;
        if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR && err != ECONNABORTED)
            KVF_WARN_RATELIMITED(
                TCP_LOG, "accept on %s: %s%s", t->listen_str, strerror(err),
                tcp_accept_starved(err) ? " (pausing; raise ulimit -n if this persists)" : "");
        return err;
    }
    char addr[TCP_ADDR_LEN];
    tcp_sockaddr_format(&ss, addr, sizeof(addr));
    struct tcp_sconn *sc = calloc(1, sizeof(*sc));
    if (!sc) {
        KVF_WARN_RATELIMITED(TCP_LOG, "refusing connection from %s: out of memory", addr);
        close(fd);
        return 0;
    }
    sc->t = t;
    sc->fd = fd;
    sc->ip_len = tcp_sockaddr_ip(&ss, sc->ip);
    snprintf(sc->addr, sizeof(sc->addr), "%s", addr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    char why[160];
    pthread_mutex_lock(&t->mu);
    const char *refused = tcp_admit(t, sc, why, sizeof(why));
    if (refused) {
        pthread_mutex_unlock(&t->mu);
        KVF_WARN_RATELIMITED(TCP_LOG, "refusing connection from %s: %s", addr, refused);
        free(sc);
        close(fd);
        return 0;
    }
    struct tcp_iothr *io = &t->io[0];
    for (unsigned i = 1; i < t->nio; i++)
        if (t->io[i].nconns < io->nconns)
            io = &t->io[i];
    sc->io = sc->home = io;
    sc->preauth = true;
    sc->next = t->sconns;
    t->sconns = sc;
    t->nsconns++;
    t->npreauth++;
    io->nconns++;
    io_hand_over_unlock(t, io, sc);
    KVF_DEBUG(TCP_LOG, "accepted connection from %s on %s (I/O thread %u)", addr, t->listen_str,
              io->idx);
    return 0;
}

static void *tcp_accept_main(void *arg)
{
    struct tcp_transport *t = arg;
    uint64_t paused_until = 0; /* kvf__now_ms() until which the listening socket is not polled */
    while (!atomic_load(&t->stopping)) {
        int timeout = -1;
        if (paused_until) {
            uint64_t now = kvf__now_ms();
            if (now < paused_until)
                timeout = (int)(paused_until - now);
            else
                paused_until = 0;
        }
        struct pollfd pf[3] = {{.fd = t->wake_fd, .events = POLLIN},
                               {.fd = t->reap_fd, .events = POLLIN},
                               {.fd = t->listen_fd, .events = POLLIN}};
        int n = poll(pf, paused_until ? 2 : 3, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            KVF_ERROR(TCP_LOG, "poll on %s: %s", t->listen_str, strerror(errno));
            break;
        }
        if (pf[0].revents)
            break;
        if (pf[1].revents) {
            uint64_t v;
            if (read(t->reap_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                KVF_DEBUG(TCP_LOG, "reap eventfd on %s: %s", t->listen_str, strerror(errno));
            /* Descriptors were freed: try accepting again at once. */
            paused_until = 0;
        }
        if (!paused_until && pf[2].revents) {
            int err = tcp_accept_one(t);
            /* The listening socket stays readable while connections wait: polling it again
             * would spin. Wait for a served connection to end, or a short pause. */
            if (tcp_accept_starved(err))
                paused_until = kvf__now_ms() + TCP_ACCEPT_PAUSE_MS;
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Start and stop
 * ------------------------------------------------------------------------------------------- */

/* Stop the I/O threads; the accept thread has ended (or never started), so their last adoption
 * takes every connection it handed over, and none is left on an incoming list. */
static void tcp_io_stop_all(struct tcp_transport *t)
{
    atomic_store(&t->io_stopping, true);
    for (unsigned i = 0; i < t->nio + t->nrx; i++) {
        uint64_t one = 1;
        if (t->io[i].started && write(t->io[i].wake_fd, &one, sizeof(one)) < 0)
            KVF_WARN(TCP_LOG, "stopping I/O thread %u: %s", i, strerror(errno));
    }
    /* Every thread joined before any thread's descriptors close: a running one may still be
     * waking another (a connection moved at its HELLO) after that one ended. */
    for (unsigned i = 0; i < t->nio + t->nrx; i++)
        if (t->io[i].started)
            pthread_join(t->io[i].thread, NULL);
    for (unsigned i = 0; i < t->nio + t->nrx; i++) {
        struct tcp_iothr *io = &t->io[i];
        if (io->ep >= 0)
            close(io->ep);
        if (io->wake_fd >= 0)
            close(io->wake_fd);
        if (io->wmu_init) {
            pthread_cond_destroy(&io->wcv);
            pthread_mutex_destroy(&io->wmu);
        }
    }
    free(t->io);
    t->io = NULL;
    t->nio = t->nrx = 0;
}

int tcp_pool_start(struct tcp_transport *t)
{
    /* As many threads again watch the connections this engine opens to its peers, so that
     * what serving its own peers may wait for (a notification's room in a full queue, a record
     * answer) never holds up the answers to its own transfers. */
    unsigned nio = tcp_io_threads_conf(t);
    t->io = calloc(2 * nio, sizeof(*t->io));
    if (!t->io)
        return kvf__err(-KVF_ENOMEM, "tcp create: out of memory");
    t->nio = t->nrx = nio;
    for (unsigned i = 0; i < 2 * nio; i++)
        t->io[i].ep = t->io[i].wake_fd = -1;
    int rc = 0;
    for (unsigned i = 0; i < 2 * nio; i++) {
        struct tcp_iothr *io = &t->io[i];
        io->t = t;
        io->idx = i;
        if (kvf__cond_init_monotonic(&io->wcv) == 0) {
            if (pthread_mutex_init(&io->wmu, NULL) == 0)
                io->wmu_init = true;
            else
                pthread_cond_destroy(&io->wcv);
        }
        if (!io->wmu_init) {
            rc = kvf__err(-KVF_ENOMEM, "tcp create: I/O thread %u: mutex", i);
            break;
        }
        io->ep = epoll_create1(EPOLL_CLOEXEC);
        io->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        if (io->ep < 0 || io->wake_fd < 0 ||
            epoll_ctl(io->ep, EPOLL_CTL_ADD, io->wake_fd, &ev) < 0) {
            rc = kvf__err(-errno, "tcp create: I/O thread %u: %s", i, strerror(errno));
            break;
        }
        rc = kvf__thread_start(&io->thread, i < nio ? "kvf-tcp-io" : "kvf-tcp-rx",
                               KVF_THREAD_SMALL_STACK, tcp_io_main, io);
        if (rc) {
            rc = kvf__err(rc, "tcp create: I/O thread %u: %s", i, strerror(-rc));
            break;
        }
        io->started = true;
    }
    if (rc == 0) {
        rc = kvf__thread_start(&t->accept_thread, "kvf-tcp-accept", 0, tcp_accept_main, t);
        if (rc)
            rc = kvf__err(rc, "tcp create: accept thread: %s", strerror(-rc));
    }
    if (rc) {
        tcp_io_stop_all(t);
        atomic_store(&t->io_stopping, false);
    }
    return rc;
}

void tcp_pool_stop(struct tcp_transport *t)
{
    pthread_join(t->accept_thread, NULL);
    tcp_io_stop_all(t);
}
