/*
 * The core's private header: the engine object and what the files of src/core share. Not
 * installed.
 *
 * The files, each calling only files listed above it, so that no two call each other:
 *
 *   config.c   kvf_config_init(), the check of a caller's config, role names, which transports
 *              the engine offers
 *   stats.c    kvf_engine_stats(): a snapshot of the counters below (counting is inline, here)
 *   busy.c     the busy sections destroy waits for, and whether the engine is closing
 *   records.c  the engine's records in the store: keys, publication, fetching and parsing
 *   peers.c    the peer cache, the choice of a path (a walk over kvf__transports), the
 *              sender's checks against a peer's regions
 *   mem.c      registration, and kvf_mem_alloc() memory
 *   xfer.c     synchronous transfers
 *   notify.c   notifications: sent in order, and received
 *   batch.c    asynchronous batches
 *   events.c   peer joins and leaves
 *   engine.c   create, shutdown and destroy
 *
 * The core reaches transports only through kvf__transports (transport/transport.h), and the
 * store only through the public API.
 */
#ifndef KVF_CORE_H
#define KVF_CORE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/common.h"
#include "common/limits.h"
#include "common/regions.h"
#include "common/thread.h"
#include "common/url.h"
#include "kvferry.h"
#include "transport/transport.h"

#define ENG_LOG     "engine"
#define ENG_NS_MAX  64
#define ENG_PREFIX_MAX 128
#define ENG_KEY_MAX (KVF_SESSION_ID_MAX + ENG_NS_MAX + ENG_PREFIX_MAX + 64)
/* Elements in one batch: a batch is described in memory the caller owns, but the engine and the
 * transport walk it several times; a bound keeps a mistaken count from running for hours. */
#define ENG_MAX_BATCH         (1u << 20)
#define ENG_MAX_BATCHES       (1u << 20)
#define ENG_MAX_ASYNC_THREADS 64u
#define ENG_MAX_NOTIFY_QUEUE  (1u << 20)
#define ENG_RECORD_VERSION    1
/* The huge page size kvf_mem_alloc() rounds to when asked for huge pages (the x86-64 and arm64
 * default); where the default differs, the huge mapping fails and normal pages are used. */
#define ENG_HUGE_PAGE  (2u << 20)
#define ENG_EVENTS_MAX 4096u
/* A target-checked path (tcp) sends a batch whose elements miss the cached regions by at most
 * this many bytes without asking the store first: the miss may only mean a region registered
 * since the cache was filled, and the target's check answers in one round trip where a refresh
 * costs a store round trip first. Above it the refresh comes first, so while the store answers
 * a wrong address moves at most this much data before it is refused. */
#define ENG_SEND_ON_MISS_MAX (4u << 20)

/* Counters of calls (kvf_stats_counts_t's fields, same order), added with relaxed atomics: a
 * reader needs each value, not an order between them. */
enum { EC_WBYTES, EC_RBYTES, EC_WOPS, EC_ROPS, EC_CALLS, EC_FAILED, EC_N };
typedef struct {
    _Atomic uint64_t v[EC_N];
} eng_counts_t;

/* One transport's call-duration histogram. */
typedef struct {
    _Atomic uint64_t lat[KVF_STATS_LAT_BUCKETS];
    _Atomic uint64_t lat_sum_us;
} eng_tstats_t;

/* The engine's counters (stats.c reads them; xfer.c and notify.c count). Bytes and operations
 * are counted only per peer and transport (eng_peer_t.counts), and summed by the snapshot, so
 * that a call costs seven atomic additions, not twelve (peers stay cached until destroy). */
typedef struct {
    uint64_t created_ms;
    eng_tstats_t tr[KVF_TRANSPORTS_MAX];
    _Atomic uint64_t errors[KVF_STATS_ERR_SLOTS];
    _Atomic uint64_t notify_sent, notify_received;
} eng_stats_t;

static inline void eng_count_add(_Atomic uint64_t *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

typedef struct eng_peer {
    struct eng_peer *next;
    char sid[KVF_SESSION_ID_MAX];
    /* The path to the peer. Transfers hold @sel shared while they use @tops/@tp/@nops/@ntp;
     * choosing the path again (after the peer process went away, see @reselect) holds it
     * exclusive, so a handle is never closed under a running transfer. */
    pthread_rwlock_t sel;
    const char *via; /* the name of the transport chosen last (kept if a new choice fails) */
    const struct kvf_transport_ops *tops;
    kvf_tpeer_t *tp;
    /* A handle for notifications when @tp cannot carry them (shm: on tcp), else NULL. */
    const struct kvf_transport_ops *nops;
    kvf_tpeer_t *ntp;
    atomic_bool reselect;
    bool fallback_logged; /* the info line about a transport it offers not reaching it, once */
    /* The peer's published regions, refreshed from the store on a miss. */
    pthread_mutex_t lock;
    kvf_region_t *regions;
    size_t nregions;
    uint64_t gen;
    /* On a target-checked path (tcp) the engine's regions watch (eng_rwatch_t) copies each new
     * regions record of the peer into @pending (under @lock), and the next check, which holds
     * @sel shared, parses it and takes it in: a region registered later is usually known before
     * the first transfer into it. */
    uint64_t inc; /* the incarnation the cached list came from (kvf__eng_parse_regions) */
    char *pending; /* the newest record text the watch saw (NUL-terminated), parsed by the check */
    size_t npending;
    /* What this engine did with the peer, by transport index (stats.c). */
    eng_counts_t counts[KVF_TRANSPORTS_MAX];
    _Atomic uint64_t in_flight;
} eng_peer_t;

/*
 * One store watch on the namespace's regions records, started with the first peer on a
 * target-checked path (tcp), and the peers it feeds. Its callback runs on the store client's
 * thread and takes only @lock, then a listed peer's lock: never peers_lock or a peer's sel,
 * which are held around store calls that need that thread.
 */
enum { RWATCH_OFF, RWATCH_STARTING, RWATCH_ON, RWATCH_DISABLED };
typedef struct {
    pthread_mutex_t lock;
    eng_peer_t **peers; /* tcp peers, which live until destroy; under @lock */
    size_t n, cap;
    atomic_int state; /* RWATCH_*; DISABLED with KVFERRY_NO_REGIONS_WATCH=1 */
    uint64_t id;
    char prefix[ENG_KEY_MAX];
} eng_rwatch_t;

/* The order in which this engine's notifications to one peer go out (see notify.c). */
typedef struct eng_order {
    struct eng_order *next;
    uint64_t next_seq; /* the next batch's number */
    uint64_t done;     /* every number up to this one is settled (sent or skipped) */
    uint64_t *later;   /* numbers above done + 1 already settled, sorted */
    size_t nlater, cap;
    char sid[KVF_SESSION_ID_MAX];
} eng_order_t;

/* A notification received, waiting for kvf_notify_poll(). */
typedef struct eng_notif {
    struct eng_notif *next;
    char sender[KVF_SESSION_ID_MAX];
    size_t len;
    unsigned char msg[];
} eng_notif_t;

/* A session known to the peer-event watch. */
typedef struct eng_known {
    char sid[KVF_SESSION_ID_MAX];
} eng_known_t;

/* Batches (batch.c): a FIFO run by @nthreads threads started on the first submit. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t work; /* a batch was queued, or stopping */
    pthread_cond_t room; /* inflight fell below max_batches */
    pthread_cond_t idle; /* inflight reached 0 */
    struct kvf_batch *head, *tail;
    unsigned inflight; /* submitted and not complete */
    bool stopping;
    unsigned nthreads;
    unsigned waiting_peer; /* threads whose batch waits for its peer to appear */
    pthread_t *threads;    /* room for ENG_MAX_ASYNC_THREADS */
    atomic_uint_fast64_t posted; /* batches submit posted (kvf__eng_post), for the tests */
} eng_batches_t;

/* Notifications (notify.c): the order of those sent, the queue of those received. */
typedef struct {
    pthread_mutex_t order_lock;
    pthread_cond_t order_cond;
    eng_order_t *orders;

    pthread_mutex_t nlock;
    pthread_cond_t ncond; /* one arrived, or shutdown */
    pthread_cond_t nroom; /* one was taken */
    eng_notif_t *nhead, *ntail;
    size_t ncount;
    void *senders; /* tsearch tree of eng_sender_t: what each sender has queued (notify.c) */
} eng_notify_t;

/* Peer events (events.c), once subscribed. */
typedef struct {
    pthread_mutex_t sublock; /* serialises the first kvf_peer_events() call's subscription */
    pthread_mutex_t plock;
    pthread_cond_t pcond;
    bool subscribed;
    uint64_t watch_id;
    void *known;              /* tsearch tree of eng_known_t, by sid */
    kvf_peer_event_t *events; /* ring of ENG_EVENTS_MAX */
    size_t ev_head, ev_count;
} eng_events_t;

struct kvf_engine {
    char sid[KVF_SESSION_ID_MAX];
    char ns[ENG_NS_MAX + 1];
    char prefix[ENG_PREFIX_MAX + 1];
    char session_key[ENG_KEY_MAX];
    char regions_key[ENG_KEY_MAX];
    kvf_role_t role;
    int device_id;
    kvf_config_t cfg;

    kvf_store_t *store;
    uint64_t lease;
    /* Set once both records are published (create), before which the tcp transport's accept
     * thread may already serve a P2P record request: it is then answered "not yet". */
    atomic_bool records_ready;
    kvf_region_table_t *regions;
    /* One instance of each transport of kvf__transports, same index; @listener is the one
     * with KVF_TCAP_LISTEN, whose port is the engine's. */
    kvf_transport_t *tr[KVF_TRANSPORTS_MAX];
    size_t listener;
    /* Read by same-host senders with process_vm_readv (see transport.h): the region table they
     * check against (@shm_table, replaced under publish_lock before the regions record is
     * set, so a sender never has to trust the store). */
    kvf_shm_word_t shm_word;
    kvf_region_t *shm_table;

    /* Serialises region publication so that an older snapshot never overwrites a newer one. */
    pthread_mutex_t publish_lock;

    /* Whether kvf_transfer_submit() may post a batch from the caller's thread (kvf__eng_post);
     * off with KVFERRY_SUBMIT_QUEUE=1, read at create. */
    bool submit_posts;

    pthread_mutex_t peers_lock;
    eng_peer_t *peers;
    eng_rwatch_t rwatch;
    /* First lookups in progress (peer_get), each node on its resolver's stack, and the condition
     * the others wait on: a burst of first transfers to one peer (the async threads of ten
     * batches) runs one store lookup and opens one path instead of one each. Under peers_lock. */
    struct eng_resolving *resolving;
    pthread_cond_t peers_cv;

    /* Transfers in progress, so that destroy can wait for them to leave. */
    pthread_mutex_t busy_lock;
    pthread_cond_t busy_cond;
    unsigned busy;
    bool closing;

    /* Memory from kvf_mem_alloc(), freed by kvf_mem_free() or destroy (mem.c). */
    pthread_mutex_t mem_lock;
    struct eng_mem *mems;

    eng_batches_t batches;
    eng_notify_t notify;
    eng_events_t events;
    eng_stats_t stats;
    uint64_t started_unix_ms;      /* wall clock at create, published for `kvferry info` */
    kvf_metrics_server_t *metrics; /* config.metrics_listen's endpoint, or NULL */
};

/* kvf_notify_wait_peer() asks the peer's path whether it is still there this often: the bound
 * on noticing a peer gone while waiting. */
#define ENG_PEER_CHECK_MS 200u

/* The deadline of a wait of @timeout_ms (kvf__now_ms() clock); negative waits forever. */
static inline uint64_t eng_deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? UINT64_MAX : kvf__now_ms() + (uint64_t)timeout_ms;
}

/* ---- config.c ------------------------------------------------------------------------------- */

/* Copy the caller's config (NULL: the defaults) into @c, check it, and apply KVFERRY_TRANSPORT.
 * Returns 0 or -KVF_EINVAL naming the field. */
int kvf__eng_config_load(const kvf_config_t *in, kvf_config_t *c);

/* The name of the transport @c forces (config.transport / KVFERRY_TRANSPORT), or NULL (auto). */
const char *kvf__eng_forced_name(const kvf_config_t *c);

/* Whether engine @e offers transport @o to peers of other processes (the session record's
 * "transports", and shm's memfd socket). */
bool kvf__eng_offered(const kvf_engine_t *e, const struct kvf_transport_ops *o);

/* ---- stats.c -------------------------------------------------------------------------------- */

/* A transfer call to @p (NULL: no path was chosen; it failed before) over transport index @ti
 * ended with @rc after @us microseconds; @x/@n its elements. Counts per transport, per peer and
 * by error code (xfer.c). */
void kvf__stats_call(kvf_engine_t *e, eng_peer_t *p, size_t ti, const kvf_xfer_t *x, size_t n,
                     int rc, uint64_t us);

/* The transports' stats callback: a snapshot of engine @arg, encoded for a STATS answer. */
int kvf__stats_encoded(void *arg, uint8_t **out, size_t *len);

/* The metrics endpoint's render callback: engine @arg's snapshot as Prometheus text. */
int kvf__stats_render(void *arg, char **out, size_t *len);

/* ---- busy.c --------------------------------------------------------------------------------- */

/* Enter/leave a public call that destroy must wait for; enter fails with -KVF_ECLOSED once
 * destroy (or shutdown) has begun. */
int kvf__eng_busy_enter(kvf_engine_t *e);
void kvf__eng_busy_leave(kvf_engine_t *e);
bool kvf__eng_closing(kvf_engine_t *e);

/* ---- records.c ------------------------------------------------------------------------------ */

/* "<prefix><ns>/<kind>/<sid>" (the prefix is "kvferry/v1/" by default) */
void kvf__eng_make_key(char *buf, size_t len, const kvf_engine_t *e, const char *kind,
                       const char *sid);

/* Publish the engine's session record / its current region table under its lease. */
int kvf__eng_publish_session(kvf_engine_t *e);
int kvf__eng_publish_regions(kvf_engine_t *e);
/* Every transport's drain (transport.h): after the table senders read was replaced, wait until
 * no sender that checked against an older one is still copying, or @deadline_ms. */
int kvf__eng_drain(kvf_engine_t *e, uint64_t deadline_ms);
/* Destroy: same-host senders find an empty table from now on, and those still copying are
 * waited out (up to op_timeout_ms, then a warning). No registration may follow. */
void kvf__eng_withdraw_regions(kvf_engine_t *e);

/* The tcp transport's record callback (kvf_record_cb): this engine's session or regions record
 * for a peer's P2P record request; -KVF_ENOTFOUND for any other key. */
int kvf__eng_record_answer(void *arg, const char *key, void **val, size_t *len);

/* kvf_store_get() waiting up to @wait_ms in slices, given up (-KVF_ECLOSED) when the engine is
 * being destroyed, or (-KVF_ECANCELED) once @cancel (NULL: none; an async batch's flag) is set. */
int kvf__eng_store_get_wait(kvf_engine_t *e, const char *key, uint32_t wait_ms,
                            const atomic_bool *cancel, void **val, size_t *len);

/* Fetch @sid's regions from the store, waiting up to @wait_ms (given up as above) for the record
 * to appear: 0 with a sorted list (malloc'ed), -KVF_ENOTFOUND naming the store, or the error.
 * @inc (may be NULL): the publishing engine's incarnation (kvf__eng_parse_regions). */
int kvf__eng_fetch_regions(kvf_engine_t *e, const char *sid, uint32_t wait_ms,
                           const atomic_bool *cancel, kvf_region_t **out, size_t *n, uint64_t *gen,
                           uint64_t *inc);

/* Fill @d from @sid's session record, waiting up to @wait_ms for it; a missing or malformed
 * record leaves @d as it was. */
void kvf__eng_fetch_session(kvf_engine_t *e, const char *sid, uint32_t wait_ms,
                            const atomic_bool *cancel, kvf_tpeer_desc_t *d);

/* Peers' records as read from the store (untrusted: fuzzed by tests/fuzz/fuzz_records.c).
 * parse_session fills what it understands of @d and ignores the rest; parse_regions returns
 * 0 with a sorted, non-overlapping, non-wrapping list (malloc'ed, @n may be 0), its generation
 * (never negative) and, in @inc (may be NULL), the publishing engine's incarnation (a random
 * number per engine, 0 for a record without one): a restarted engine counts generations from 1
 * again, so generations compare only within one incarnation. -KVF_EPROTO for anything else. */
void kvf__eng_parse_session(const void *text, size_t len, kvf_tpeer_desc_t *d);
int kvf__eng_parse_regions(const char *sid, const void *text, size_t len, kvf_region_t **out,
                           size_t *n, uint64_t *gen, uint64_t *inc);

/* ---- peers.c -------------------------------------------------------------------------------- */

/* The peer, looked up (waiting for it to appear, given up once @cancel is set) and its path
 * chosen again if its process went away, with its path held shared (@p->sel) on success. @what
 * names the operation for errors. */
int kvf__peer_enter(kvf_engine_t *e, const char *peer, const char *what, const atomic_bool *cancel,
                    eng_peer_t **out);
/* Leave what kvf__peer_enter() entered, passing @rc on (wrapped with @what and the peer). */
int kvf__peer_leave(eng_peer_t *p, int rc, const char *what);
/* kvf__peer_enter() when it costs no wait: @peer is in the cache, its path needs no new choice
 * and nobody is choosing it now. NULL otherwise. Leave with kvf__peer_leave(). */
eng_peer_t *kvf__peer_enter_now(kvf_engine_t *e, const char *peer);
/* kvf_peer_check() without the argument checks and busy count. */
int kvf__eng_peer_check(kvf_engine_t *e, const char *peer);

/* Re-read the peer's regions from the store (no wait); the cache never goes back in time. */
int kvf__peer_refresh(kvf_engine_t *e, eng_peer_t *p);
/* The sender's fast-fail: every element must lie inside one of the peer's published regions.
 * Returns 0 or -KVF_ENOTREG naming the first element (@bad) that does not. */
int kvf__peer_check(eng_peer_t *p, const kvf_xfer_t *x, size_t n, size_t *bad);
/* Whether the peer's cached regions hold every element, without an error message on a miss. */
bool kvf__peer_holds(eng_peer_t *p, const kvf_xfer_t *x, size_t n);
/* The bytes of the elements outside the peer's cached regions, or SIZE_MAX when one of them is
 * not a valid range at all (which no refresh can change). Sets no error. */
size_t kvf__peer_missed_bytes(eng_peer_t *p, const kvf_xfer_t *x, size_t n);
/* For tests: whether this engine's cache of @sid's regions (or the list its regions watch left)
 * holds [@addr, +@len). Sets the last error (a miss's reason) when it does not. */
bool kvf__peer_knows(kvf_engine_t *e, const char *sid, uint64_t addr, uint64_t len);
/* KVF_CHECK_SENDER paths: make the cached list current with the target's live generation. */
int kvf__peer_make_current(kvf_engine_t *e, eng_peer_t *p);

/* Whether @sid is in the peer cache (a transfer to it will not wait for it to appear). */
bool kvf__eng_peer_known(kvf_engine_t *e, const char *sid);

/* Close and free every cached peer (destroy, once nothing transfers). */
void kvf__peers_fini(kvf_engine_t *e);

/* ---- mem.c ---------------------------------------------------------------------------------- */

/* Free what kvf_mem_alloc() handed out and kvf_mem_free() did not take back (destroy, once
 * nothing serves or transfers any more). */
void kvf__mem_fini(kvf_engine_t *e);

/* ---- xfer.c --------------------------------------------------------------------------------- */

/* Validate a batch's elements (the messages of kvf_transfer_sync). */
int kvf__eng_check_xfers(const char *peer, const kvf_xfer_t *x, size_t n);

/* The data path of kvf_transfer_sync() inside a busy section: look the peer up, choose its path,
 * run @x with @ctl (NULL, or per-element status and cancel flag, which also gives up waiting
 * for the peer to appear) until @deadline_ms. */
int kvf__eng_transfer(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                      uint64_t deadline_ms, const kvf_xfer_ctl_t *ctl);

/* A batch posted by kvf__eng_post(): where it went, and whom to tell when it ends. */
typedef struct {
    kvf_engine_t *e;
    eng_peer_t *p;
    size_t ti; /* p's path, for the statistics */
    uint64_t t0_ns;
    const kvf_xfer_t *x;
    size_t n;
    kvf_post_done_fn done;
    void *arg;
} eng_post_t;

/*
 * Start @x on @peer's path without waiting for it (kvf_transport_ops.post), inside a busy
 * section, when that costs the caller no wait: the peer is cached with its path open, its
 * cached regions hold every element, and the transport can send the batch at once. Returns 0
 * when it was posted: @ps->done(@ps->arg, rc, msg) is then called once, on any thread, with the
 * call counted in the statistics (unless kvf__eng_post_rerun(rc)). Returns 1 when nothing was
 * posted: run the batch with kvf__eng_transfer(). @ps must stay valid until done was called.
 */
int kvf__eng_post(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                  uint64_t deadline_ms, int *status, eng_post_t *ps);
/* Whether a posted batch that ended with @rc should run again as kvf__eng_transfer() would: the
 * errors that path retries itself (a connection the target closed, regions re-registered,
 * the path closed under a new choice). */
bool kvf__eng_post_rerun(int rc);

/* ---- notify.c ------------------------------------------------------------------------------- */

/* Check the arguments of a transfer with (@has_msg) or without a notification. */
int kvf__notify_check_args(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                           const void *msg, size_t msg_len, bool has_msg);

/* The notification order to @peer (created on first use), or NULL (-KVF_ENOMEM, message set);
 * the next number in it. */
eng_order_t *kvf__notify_order_get(kvf_engine_t *e, const char *peer);
uint64_t kvf__notify_order_take(kvf_engine_t *e, eng_order_t *o);
/* Number @seq will send nothing more (sent, or skipped): let the next one go. */
void kvf__notify_order_settle(kvf_engine_t *e, eng_order_t *o, uint64_t seq);

/* After the data of a batch with a notification: send it in its turn (only if @rc is 0 and
 * @cancel, which also gives up waiting for the peer, is not set), then settle its number. @data:
 * the batch moved bytes, so a failed notification's message says they landed. */
int kvf__notify_in_order(kvf_engine_t *e, eng_order_t *o, uint64_t seq, int rc,
                         const atomic_bool *cancel, const char *peer, const void *msg, size_t len,
                         bool data, uint64_t deadline_ms);

/* Queue a notification that arrived from @sender (the transports' notify callback). */
int kvf__notify_deliver(void *engine, const char *sender, const void *msg, size_t len);

/* Free the notification orders and the notifications still queued (destroy, once no transport
 * delivers and no batch is left; engine.c owns the locks of e->notify). */
void kvf__notify_fini(kvf_engine_t *e);

/* ---- batch.c -------------------------------------------------------------------------------- */

/* Runs in destroy after shutdown: completes queued batches (-KVF_ECLOSED), joins the threads
 * and waits until no batch is counted. */
void kvf__batch_stop(kvf_engine_t *e);
/* Open the path to @peer on an async thread (starting them if need be), so that the first
 * transfer to it does not: best effort, returns at once, nothing is reported. */
void kvf__batch_open_peer(kvf_engine_t *e, const char *peer);
/* For tests: how many batches kvf_transfer_submit() posted from the caller's thread. */
uint64_t kvf__batch_posted(kvf_engine_t *e);

/* ---- events.c ------------------------------------------------------------------------------- */

/* Free what the peer-event watch recorded (destroy; engine.c owns the locks of e->events). */
void kvf__events_fini(kvf_engine_t *e);

#endif /* KVF_CORE_H */
