/*
 * The transport interface: how the core moves bytes to and from one peer, whatever carries
 * them. Each transport fills a `static const struct kvf_transport_ops` (like a libfabric
 * provider); ops it does not have point at the kvf__transport_* stubs below, so the core never
 * tests for NULL.
 *
 * A transport instance belongs to one engine. It serves incoming requests against the engine's
 * region table (the target's check is authoritative: a request whose range is not entirely
 * inside one registered region is answered with an error and never touches memory), and it
 * carries the engine's outgoing batches to peers.
 *
 * The transports form one table, kvf__transports (transport.c), in the order the core tries
 * them for a peer when none is forced: loop, shm, tcp. The core knows them only through that
 * table: what sets one apart (whether it listens, what a peer needs to open it, whose check of
 * a remote range counts, whether it carries notifications) is said by its @caps and @check, so
 * adding one (RDMA) is one more table entry and one more file of this folder.
 */
#ifndef KVF_TRANSPORT_H
#define KVF_TRANSPORT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/auth.h"
#include "common/tls.h"
#include "common/url.h"
#include "common/host.h"
#include "common/regions.h"
#include "kvferry.h"

typedef struct kvf_transport kvf_transport_t; /* one per engine and transport kind */
typedef struct kvf_tpeer kvf_tpeer_t;         /* a transport's connections to one peer */

/* Bytes of an abstract Unix socket name (sun_path less its leading NUL), with a NUL here. */
#define KVF_SHM_SOCK_MAX 100

/* What the core knows about a peer when it opens a transport handle to it, from the peer's
 * session record. Same-host transports need the host identity; tcp only the address. */
typedef struct {
    const char *sid;         /* the peer's session id, for logs */
    kvf_hostport_t addr;     /* where it listens */
    int32_t pid;             /* its process id; 0 = not published */
    char boot_id[KVF_HOST_ID_MAX]; /* /proc/sys/kernel/random/boot_id of its host;
                                      "" = not published */
    char net_ns[KVF_HOST_ID_MAX];  /* its network namespace, "net:[inode]"; "" = not
                                      published */
    bool offers_shm;         /* "shm" is among the transports it offers */
    char memfd_sock[KVF_SHM_SOCK_MAX]; /* abstract Unix socket that hands out the fds of its
                                          kvf_mem_alloc memory, without the leading NUL;
                                          "" = not offered */
} kvf_tpeer_desc_t;

/*
 * The word a target engine keeps in its own memory for same-host senders. The store is a
 * directory, not an authority, and holds no address of it: a sender believes nothing of the
 * session record until it has verified, from the kernel, that the pid it names holds the
 * listening socket of the session's port; it then learns the word's address from that pid's shm
 * socket (SO_PEERCRED-checked), with its fence slot, and requires the word there to name the
 * session. (From then on a shm sender reads the generation and the table from the shared table
 * that came with its fence slot, src/transport/shm.h, not from the word; the word keeps naming
 * them for a reader with process_vm_readv, e.g. a debugger.)
 * @nonce:  random, chosen at engine create (the regions record's "inc" too); not compared by
 *          senders any more.
 * @seq:    a seqlock: odd while the target changes @gen, @table and @count, so a reader that
 *          sees it odd, or changed across its read of the table, reads again.
 * @gen:    the generation of the region table; newer than the sender's copy = (un)registered.
 * @table:  the address of the target's sorted, non-overlapping kvf_region_t[@count]: the
 *          regions it has registered, the only ones a sender may touch.
 * @sid:    the session id this engine serves.
 */
#define KVF_SHM_WORD_MAGIC 0x32776d6873667663ull /* "cvfshmw2" little-endian */
/* Regions a sender reads from one target's table at most. */
#define KVF_SHM_MAX_REGIONS (1u << 20)
typedef struct {
    uint64_t magic;
    uint64_t nonce;
    uint64_t seq;
    uint64_t gen;
    uint64_t table;
    uint64_t count;
    char sid[KVF_SESSION_ID_MAX];
} kvf_shm_word_t;

/* The target's side of the seqlock: publish @n regions @rs of generation @gen in @w. The caller
 * serialises calls and keeps @rs alive until the next call has returned (a reader that copies
 * an old table after that sees @seq moved and reads again). */
static inline void kvf__shm_word_set(kvf_shm_word_t *w, const kvf_region_t *rs, size_t n,
                                     uint64_t gen)
{
    uint64_t s = __atomic_load_n(&w->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&w->seq, s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&w->table, (uint64_t)(uintptr_t)rs, __ATOMIC_RELAXED);
    __atomic_store_n(&w->count, (uint64_t)n, __ATOMIC_RELAXED);
    __atomic_store_n(&w->gen, gen, __ATOMIC_RELAXED);
    __atomic_store_n(&w->seq, s + 2, __ATOMIC_RELEASE);
}

/*
 * Called by a transport when a peer's notification arrived (tcp: a NOTIFY frame, after every
 * request that peer sent on that connection before it; loop: on the sender's thread). @sender
 * is the session id the peer gave in its hello (loop: the sending engine's). Returns 0 once
 * queued, or a negative code (e.g. -KVF_EBUSY with the last-error message set) that is answered
 * to the sender. May block briefly (a full queue).
 */
typedef int (*kvf_notify_cb)(void *arg, const char *sender, const void *msg, size_t len);

/*
 * Called by tcp when a peer asks for this engine's statistics (a STATS frame): a malloc'ed
 * encoding (common/stats.h) in *@out, which the transport sends and frees. Returns 0 or a
 * negative code, answered to the asker.
 */
typedef int (*kvf_stats_cb)(void *arg, uint8_t **out, size_t *len);

/*
 * Called by tcp when a peer asks for one of this engine's records (a P2P record request,
 * common/p2p.h): @key as asked (printable, NUL-terminated). A malloc'ed copy of the value in
 * *@val, which the transport sends and frees; or -KVF_ENOTFOUND (with a message) for a key that
 * is not one of this engine's records. Other codes are answered too.
 */
typedef int (*kvf_record_cb)(void *arg, const char *key, void **val, size_t *len);

/*
 * Per-call controls of transfer(), both optional.
 * @status: NULL, or one entry per element, which the caller sets to KVF_XFER_PENDING first. The
 *          transport sets entry i to 0 when element i is entirely in place, or to a negative code
 *          when it failed; it leaves the entries of elements it never finished (not started:
 *          cancelled or stopped after an error) as they were.
 * @cancel: NULL, or a flag; once it is true, no further element (tcp: chunk) is started and
 *          transfer() returns -KVF_ECANCELED after what was started has ended.
 */
typedef struct {
    int *status;
    const atomic_bool *cancel;
} kvf_xfer_ctl_t;

/* How a posted batch (kvf_transport_ops.post) ends: @rc 0, or its first error and @msg. */
typedef void (*kvf_post_done_fn)(void *arg, int rc, const char *msg);

typedef struct {
    const char *local_sid;          /* for logs and the hello; tcp replaces a port 0 in it with
                                       the port it listens on */
    kvf_hostport_t listen;          /* address to listen on; port 0 = any free port */
    const int *listen_fd;           /* tcp: NULL, or a socket already bound to listen's port (or
                                       to a free one when that is 0) to listen on a duplicate
                                       of (kvf_config_t.listen_fd) */
    kvf_region_table_t *regions;    /* the engine's regions, checked for every incoming request */
    uint32_t conns_per_peer;        /* connections opened to each peer */
    uint32_t chunk_bytes;           /* elements longer than this are split */
    uint32_t connect_timeout_ms;    /* bound on connecting + hello to a peer */
    const char *memfd_sock;         /* shm: serve kvf_mem_alloc fds on this abstract socket name;
                                       NULL = do not (the engine does not offer this transport) */
    kvf_notify_cb notify_cb;        /* tcp, loop: where incoming notifications go; NULL = refuse
                                       them */
    void *notify_arg;
    kvf_stats_cb stats_cb;          /* tcp: answers STATS frames; NULL = refuse them */
    void *stats_arg;
    kvf_record_cb record_cb;        /* tcp: answers P2P record requests; NULL = refuse them */
    void *record_arg;
    uint32_t idle_timeout_ms;       /* tcp: a served connection that brings no request for this
                                       long is closed; 0 = KVF_DEFAULT_TCP_IDLE_TIMEOUT_MS */
    const kvf_shm_word_t *shm_word; /* shm: the engine's word, whose address a sender that took
                                       a fence slot is told (never published in the store) */
    const kvf_auth_key_t *auth;     /* tcp: the cluster secret (copied); NULL or len 0 = none.
                                       With one, every connection in either direction starts
                                       with the handshake of common/auth.h */
    uint32_t io_threads;            /* tcp: its I/O threads (kvf_config_t.io_threads); 0 =
                                       $KVFERRY_IO_THREADS, else min(online CPUs, 4) */
    const kvf_tls_opts_t *tls;      /* tcp: data TLS (kvf_config_t.data_tls, resolved); NULL =
                                       none. With it every connection in either direction is
                                       TLS 1.3 first (then the secret's handshake, if any) */
} kvf_transport_params_t;

/* What sets a transport apart for the core (kvf_transport_ops.caps). */
/* It listens on the session id's address: the engine creates it first and its port() is the
 * engine's port (exactly one transport of the table has it). */
#define KVF_TCAP_LISTEN 0x1u
/* Peers of other processes reach this engine through it: it is named in the session record's
 * "transports" (loop is not: only engines of this process can use it). */
#define KVF_TCAP_OFFER 0x2u
/* peer_open() needs the host identity of the peer's session record, so the core waits for that
 * record first (shm). Without it the session id is enough (loop, tcp). */
#define KVF_TCAP_RECORD 0x4u
/* It carries notifications itself (notify()). For a peer whose path lacks this, the core opens
 * a second handle on the next transport of the table that has it (shm: tcp). */
#define KVF_TCAP_NOTIFY 0x8u

/* Whose check of a remote range the core relies on (kvf_transport_ops.check). */
typedef enum {
    /* The target checks every request when it arrives (tcp). The core's check against its cached
     * copy of the peer's regions is a fast-fail that saves a round trip: a miss refreshes the
     * copy from the store before refusing, and a range the target refuses although the copy
     * allowed it refreshes the copy and retries once. */
    KVF_CHECK_TARGET,
    /* The target's CPU takes no part (shm): the core's check is the only one, so before every
     * transfer it makes its copy current with regions_gen() and refuses what the copy lacks. */
    KVF_CHECK_SENDER,
    /* The target's own region table is checked on the caller's thread (loop): exact, current and
     * as cheap as the copy, which is not consulted. */
    KVF_CHECK_DIRECT,
} kvf_check_t;

struct kvf_transport_ops {
    size_t size;
    const char *name;
    unsigned caps;     /* KVF_TCAP_* */
    kvf_check_t check; /* whose check of a remote range counts */

    /* Bind, listen and start serving. Errors: -errno from bind/listen with a message naming the
     * address (e.g. "session id 127.0.0.1:50051 is already in use"). */
    int (*create)(const kvf_transport_params_t *p, kvf_transport_t **out);
    /* The port actually listened on. */
    uint16_t (*port)(const kvf_transport_t *t);
    /* Stop serving, close every connection, free. Outgoing transfers still running fail with
     * -KVF_ECLOSED; waits for them to leave. Incoming requests in progress are finished or cut
     * off before it returns, so the region table may be destroyed afterwards. */
    void (*destroy)(kvf_transport_t *t);

    /* The engine's records are in the store: begin serving peers that find this engine without
     * the store (loop: engines of this process find it from now on). Called once, last in
     * create. Transports that serve from create() on use kvf__transport_nop. */
    void (*start)(kvf_transport_t *t);
    /* The engine is being destroyed: stop serving what start() began, waiting for requests
     * already running into this engine to leave (loop: no engine of this process finds it any
     * more). Called first in destroy, long before destroy(); outgoing transfers go on. */
    void (*stop)(kvf_transport_t *t);

    /* A handle for talking to the peer @d describes. May connect lazily; a peer that restarted
     * at the same address is reconnected on the next transfer. A transport that cannot reach
     * this peer at all (shm: another host, pid not visible, probe refused) fails with
     * -KVF_ENOTSUP and a message saying why, so the core can fall back or report it. */
    int (*peer_open)(kvf_transport_t *t, const kvf_tpeer_desc_t *d, kvf_tpeer_t **out);
    /* Close a peer handle; no transfer may be running on it. */
    void (*peer_close)(kvf_tpeer_t *p);

    /*
     * Run @n elements against the peer and wait until every one is complete or failed, or until
     * @deadline_ms (kvf__now_ms() clock). Returns 0 only when every byte is in place. On failure
     * returns the first error with a message naming the element index and range:
     * -KVF_ENOTREG / -KVF_EINVAL as answered by the target (its message is passed on),
     * -KVF_EPEERGONE when a connection broke, -KVF_ETIMEDOUT at the deadline.
     * Before it returns, nothing will touch the elements' local memory any more (a late answer to
     * a timed-out read must not land in a buffer the caller reuses).
     * Thread-safe: many threads may call it on the same peer at once.
     * @ctl: NULL, or per-element status and a cancel flag (see kvf_xfer_ctl_t).
     */
    int (*transfer)(kvf_tpeer_t *p, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                    const kvf_xfer_ctl_t *ctl);

    /*
     * Start @n write elements without waiting for them, when that costs the caller no wait:
     * the path is open, a connection is free to send on at once and its socket has room for the
     * whole frame. Returns 0 when the batch was posted: @done(@arg, rc, msg) is then called
     * exactly once, from whichever thread reads the last answer (or times the batch out at
     * @deadline_ms, or closes the peer), with rc 0 or the batch's first error as transfer()
     * would return it and its message, and @status (per element, as kvf_xfer_ctl_t's) filled;
     * @done may run before post returns, and must not call into this peer. Returns 1 when
     * nothing was posted (the batch is not one the transport starts this way, or it would have
     * to wait): the caller runs it with transfer(). Transports without such a path use
     * kvf__transport_no_post.
     */
    int (*post)(kvf_tpeer_t *p, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                int *status, kvf_post_done_fn done, void *arg);

    /*
     * Is the peer still there? 0: alive as far as its path can tell; -KVF_EPEERGONE with a
     * message naming it when the path says it is gone: shm: its process exited, or its pid no
     * longer holds its engine; tcp: no connection to it is up and a new one (tried now, bounded
     * by @deadline_ms and the connect timeout) is refused or unanswered; loop: the engine is
     * no longer in this process. Cheap while the path is up (no I/O for tcp, loads from the
     * target's shared table for shm). Thread-safe.
     */
    int (*peer_alive)(kvf_tpeer_t *p, uint64_t deadline_ms);

    /*
     * Deliver a notification of @len (<= KVF_NOTIFY_MAX) bytes to the peer and wait until it
     * has queued it, or @deadline_ms. Requests this thread completed on the peer before the
     * call are complete at the target before it reads the notification. Errors as transfer(),
     * plus what the target answered (-KVF_EBUSY: its queue stayed full). Transports without a
     * control channel (shm) return -KVF_ENOTSUP; the core then notifies over tcp.
     */
    int (*notify)(kvf_tpeer_t *p, const void *msg, size_t len, uint64_t deadline_ms);

    /*
     * For transports where the target's CPU takes no part (shm), the sender's check against the
     * target's regions is the only one, so it must use a current list: this reads the target's
     * live region generation (@gen), which the core compares with its cached list before every
     * transfer. Transports whose target checks each request itself return -KVF_ENOTSUP.
     * Errors: -KVF_EPEERGONE when the peer process is gone (or its pid now names another).
     */
    int (*regions_gen)(kvf_tpeer_t *p, uint64_t *gen);

    /*
     * The same transports: the target's own region table, read from the target itself and
     * never from the store (the store may be forged), with its generation: @out (malloc'ed,
     * sorted, non-overlapping; NULL when @n is 0). Others return -KVF_ENOTSUP. Errors as
     * regions_gen(), and -KVF_EPROTO for a table that is not sorted and non-overlapping.
     */
    int (*regions_read)(kvf_tpeer_t *p, kvf_region_t **out, size_t *n, uint64_t *gen);

    /*
     * The core's cached list of the peer's regions was replaced by @rs (sorted, @n entries; not
     * kept after the call). shm uses it to drop mappings of kvf_mem_alloc memory whose region
     * (address, length, generation) is no longer published, and to hand regions it has not seen
     * to its warmer thread, which maps them off the transfer path. Called with the core's peer
     * lock held; must not block or call back into the core. Transports with nothing to drop
     * ignore it.
     */
    void (*regions_changed)(kvf_tpeer_t *p, const kvf_region_t *rs, size_t n);

    /*
     * The target's side: the engine's region table is now @rs (@n entries, sorted, generation
     * @gen; not kept after the call), published before a kvf_mem_register returns and before
     * an unregister drains. shm copies it into the table its senders map (shm_table.c).
     * Called with the engine's publish lock held, so calls never overlap; must not block.
     * Transports whose target checks each request use kvf__transport_nop_published.
     */
    void (*regions_published)(kvf_transport_t *t, const kvf_region_t *rs, size_t n,
                              uint64_t gen);

    /*
     * Memory from kvf_mem_alloc() (a memfd), offered to same-host senders (shm): once exported,
     * a sender that asks over this transport's memfd socket for an address inside
     * [@addr, @addr+@len) receives @fd (SCM_RIGHTS) and maps it. The fd stays owned by the
     * caller. mem_export returns 0 or -KVF_ENOMEM; mem_unexport removes the entry starting at
     * @addr (no-op if none), after which no sender receives the fd any more. Transports that
     * serve no memory export nothing and return 0.
     */
    int (*mem_export)(kvf_transport_t *t, void *addr, size_t len, int fd);
    void (*mem_unexport)(kvf_transport_t *t, void *addr);
    /* The abstract socket name exported memory is served on (the session record's
     * memfd_socket), "" when this transport serves none. */
    const char *(*mem_sock)(const kvf_transport_t *t);

    /*
     * For transports whose target takes no part in a copy (shm, KVF_CHECK_SENDER): the sender's
     * side of the target's drain. The core calls guard_enter before it makes its copy of the
     * target's regions current and checks the batch against it, and guard_leave (with the
     * token enter gave) after transfer() returned; in between, the target's drain() waits for
     * it. Errors: -KVF_EBUSY (the target's unregistrations never let it in). Others use
     * kvf__transport_no_guard_enter/leave.
     */
    int (*guard_enter)(kvf_tpeer_t *p, uint64_t *token);
    void (*guard_leave)(kvf_tpeer_t *p, uint64_t token);
    /*
     * The target's side: the engine's region table has just been replaced (kvf_mem_unregister,
     * destroy); return once no sender that may have checked against an older table is still
     * copying, or at @deadline_ms with -KVF_ETIMEDOUT and a message naming the sender that
     * holds it. Transports whose target holds a reference on the region for every copy (tcp,
     * loop: kvf__regions_remove waits for them) use kvf__transport_no_drain.
     */
    int (*drain)(kvf_transport_t *t, uint64_t deadline_ms);
    /*
     * An unregister of the region [@addr, @addr+@len) timed out: who is still holding it
     * through this transport, as "peer SID (ADDRESS)" entries joined by ", " in @buf (cut to
     * @buflen). Returns how many were found. Transports whose target holds nothing (shm: its
     * drain names its senders itself) use kvf__transport_no_holders.
     */
    size_t (*holders)(kvf_transport_t *t, uint64_t addr, uint64_t len, char *buf, size_t buflen);
};

/* Append "@what" to the ", "-joined list in @buf (cut to @len), for holders(). */
static inline void kvf__holders_add(char *buf, size_t len, const char *what)
{
    size_t at = strnlen(buf, len);
    if (at + 1 < len)
        snprintf(buf + at, len - at, "%s%s", at ? ", " : "", what);
}

/* Stubs for ops a transport does not have (stub.c). */
int kvf__transport_enotsup_gen(kvf_tpeer_t *p, uint64_t *gen);
int kvf__transport_enotsup_regions(kvf_tpeer_t *p, kvf_region_t **out, size_t *n, uint64_t *gen);
int kvf__transport_enotsup_notify(kvf_tpeer_t *p, const void *msg, size_t len,
                                  uint64_t deadline_ms);
void kvf__transport_nop_regions(kvf_tpeer_t *p, const kvf_region_t *rs, size_t n);
void kvf__transport_nop_published(kvf_transport_t *t, const kvf_region_t *rs, size_t n,
                                 uint64_t gen);
uint16_t kvf__transport_no_port(const kvf_transport_t *t); /* for transports that do not listen */
void kvf__transport_nop(kvf_transport_t *t);
int kvf__transport_nop_export(kvf_transport_t *t, void *addr, size_t len, int fd);
void kvf__transport_nop_unexport(kvf_transport_t *t, void *addr);
const char *kvf__transport_no_sock(const kvf_transport_t *t);
int kvf__transport_no_guard_enter(kvf_tpeer_t *p, uint64_t *token);
void kvf__transport_no_guard_leave(kvf_tpeer_t *p, uint64_t token);
int kvf__transport_no_drain(kvf_transport_t *t, uint64_t deadline_ms);
int kvf__transport_no_post(kvf_tpeer_t *p, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                           int *status, kvf_post_done_fn done, void *arg);
size_t kvf__transport_no_holders(kvf_transport_t *t, uint64_t addr, uint64_t len, char *buf,
                                 size_t buflen);

/*
 * The transports, in the order the core tries them for a peer when none is forced (transport.c),
 * ending with NULL; at most KVF_TRANSPORTS_MAX. The core uses this table and nothing else of a
 * transport; the entries are declared below for the table and for the transports' own tests.
 */
#define KVF_TRANSPORTS_MAX 8
extern const struct kvf_transport_ops *const kvf__transports[];

/* Engines of this process: memcpy under the target engine's own region references (loop.c). */
extern const struct kvf_transport_ops kvf__loop_ops;
/* Same-host peers: process_vm_writev/readv into the target's registered memory (shm.c). */
extern const struct kvf_transport_ops kvf__shm_ops;
/* Everything else: the target serves requests on the session id's port (tcp.c). */
extern const struct kvf_transport_ops kvf__tcp_ops;

#endif /* KVF_TRANSPORT_H */
