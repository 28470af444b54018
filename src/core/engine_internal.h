/*
 * The engine's private parts shared by engine.c (create/destroy, regions, peers, the
 * synchronous data path) and batch.c (asynchronous batches, notifications, peer events).
 * Not installed.
 */
#ifndef KVF_ENGINE_INTERNAL_H
#define KVF_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/url.h"
#include "common/regions.h"
#include "kvferry.h"
#include "transport/transport.h"

#define ENG_LOG "engine"
#define ENG_NS_MAX 64
#define ENG_KEY_MAX (KVF_SESSION_ID_MAX + ENG_NS_MAX + 64)
/* Elements in one batch: a batch is described in memory the caller owns, but the engine and the
 * transport walk it several times; a bound keeps a mistaken count from running for hours. */
#define ENG_MAX_BATCH (1u << 20)
#define ENG_MAX_CONNS_PER_PEER 16u
#define ENG_MAX_BATCHES (1u << 20)
#define ENG_MAX_ASYNC_THREADS 64u
#define ENG_MAX_NOTIFY_QUEUE (1u << 20)
#define ENG_MIN_CHUNK (64u << 10)
#define ENG_MAX_CHUNK (64u << 20)
#define ENG_RECORD_VERSION 1
/* The huge page size kvf_mem_alloc() rounds to when asked for huge pages (the x86-64 and arm64
 * default); where the default differs, the huge mapping fails and normal pages are used. */
#define ENG_HUGE_PAGE (2u << 20)

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
} eng_peer_t;

/* The order in which this engine's notifications to one peer go out (see batch.c). */
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
    struct eng_known *next;
    char sid[KVF_SESSION_ID_MAX];
} eng_known_t;

#define ENG_EVENTS_MAX 4096u

typedef struct {
    /* Batches: a FIFO run by @nthreads threads started on the first submit. */
    pthread_mutex_t lock;
    pthread_cond_t work;  /* a batch was queued, or stopping */
    pthread_cond_t room;  /* inflight fell below max_batches */
    pthread_cond_t idle;  /* inflight reached 0 */
    struct kvf_batch *head, *tail;
    unsigned inflight;    /* submitted and not complete */
    bool stopping;
    unsigned nthreads;
    unsigned waiting_peer; /* threads whose batch waits for its peer to appear */
    pthread_t *threads;    /* room for ENG_MAX_ASYNC_THREADS */

    pthread_mutex_t order_lock;
    pthread_cond_t order_cond;
    eng_order_t *orders;

    /* Notifications received. */
    pthread_mutex_t nlock;
    pthread_cond_t ncond; /* one arrived, or shutdown */
    pthread_cond_t nroom; /* one was taken */
    eng_notif_t *nhead, *ntail;
    size_t ncount;

    /* Peer events, once subscribed. */
    pthread_mutex_t sublock; /* serialises the first kvf_peer_events() call's subscription */
    pthread_mutex_t plock;
    pthread_cond_t pcond;
    bool subscribed;
    uint64_t watch_id;
    eng_known_t *known;
    kvf_peer_event_t *events; /* ring of ENG_EVENTS_MAX */
    size_t ev_head, ev_count;
} eng_async_t;

struct kvf_engine {
    char sid[KVF_SESSION_ID_MAX];
    char ns[ENG_NS_MAX + 1];
    char session_key[ENG_KEY_MAX];
    char regions_key[ENG_KEY_MAX];
    kvf_role_t role;
    int device_id;
    kvf_config_t cfg;

    kvf_store_t *store;
    uint64_t lease;
    kvf_region_table_t *regions;
    /* One instance of each transport of kvf__transports, same index; @listener is the one
     * with KVF_TCAP_LISTEN, whose port is the engine's. */
    kvf_transport_t *tr[KVF_TRANSPORTS_MAX];
    size_t listener;
    /* Read by same-host senders with process_vm_readv (see transport.h): its generation is
     * stored, under publish_lock, only after the regions record of that generation is set. */
    kvf_shm_word_t shm_word;

    /* Serialises region publication so that an older snapshot never overwrites a newer one. */
    pthread_mutex_t publish_lock;

    pthread_mutex_t peers_lock;
    eng_peer_t *peers;

    /* Transfers in progress, so that destroy can wait for them to leave. */
    pthread_mutex_t busy_lock;
    pthread_cond_t busy_cond;
    unsigned busy;
    bool closing;

    /* Memory from kvf_mem_alloc(), freed by kvf_mem_free() or destroy. */
    pthread_mutex_t mem_lock;
    struct eng_mem *mems;

    eng_async_t async; /* batches, notifications, peer events (batch.c) */
};


/* Whether @sid is in the peer cache (a transfer to it will not wait for it to appear). */
bool kvf__eng_peer_known(kvf_engine_t *e, const char *sid);

/* Enter/leave a public call that destroy must wait for; enter fails with -KVF_ECLOSED once
 * destroy (or shutdown) has begun. */
int kvf__eng_busy_enter(kvf_engine_t *e);
void kvf__eng_busy_leave(kvf_engine_t *e);
bool kvf__eng_closing(kvf_engine_t *e);

/* Validate a batch's elements (the messages of kvf_transfer_sync). */
int kvf__eng_check_xfers(const char *peer, const kvf_xfer_t *x, size_t n);

/* The data path of kvf_transfer_sync() inside a busy section: look the peer up, choose its path,
 * run @x with @ctl (NULL, or per-element status and cancel flag) until @deadline_ms. */
int kvf__eng_transfer(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                      uint64_t deadline_ms, const kvf_xfer_ctl_t *ctl);

/* Deliver a notification to @peer over its path, or over the path's notification handle when
 * the path cannot carry one (loop: straight into its queue; tcp: a NOTIFY frame; shm: a NOTIFY
 * frame over a tcp handle), and wait for it to be queued. Inside a busy section. */
int kvf__eng_notify(kvf_engine_t *e, const char *peer, const void *msg, size_t len,
                    uint64_t deadline_ms);

/* kvf_store_get() waiting up to @wait_ms in slices, given up (-KVF_ECLOSED) when the engine is
 * being destroyed, or (-KVF_ECANCELED) when this thread's batch is cancelled. */
int kvf__eng_store_get_wait(kvf_engine_t *e, const char *key, uint32_t wait_ms, void **val,
                            size_t *len);
/* The flag kvf__eng_store_get_wait() checks on this thread (an async batch's cancel), or NULL. */
extern _Thread_local const atomic_bool *kvf__eng_cancel_flag;

/* Peers' records as read from the store (untrusted: fuzzed by tests/fuzz/fuzz_records.c).
 * parse_session fills what it understands of @d and ignores the rest; parse_regions returns
 * 0 with a sorted, non-overlapping, non-wrapping list (malloc'ed, @n may be 0) or -KVF_EPROTO. */
void kvf__eng_parse_session(const void *text, size_t len, kvf_tpeer_desc_t *d);
int kvf__eng_parse_regions(const char *sid, const void *text, size_t len, kvf_region_t **out,
                           size_t *n, uint64_t *gen);

/* "kvferry/v1/<ns>/<kind>/<sid>" */
void kvf__eng_make_key(char *buf, size_t len, const char *ns, const char *kind, const char *sid);

/* batch.c: set up and tear down e->async. init fails only on resources. fini runs in destroy
 * after shutdown: completes queued batches, joins the threads, frees the queues. wake tells
 * waiters in kvf_notify_wait/kvf_peer_events that shutdown began. */
int kvf__async_init(kvf_engine_t *e);
void kvf__async_stop(kvf_engine_t *e);
void kvf__async_wake(kvf_engine_t *e);
void kvf__async_fini(kvf_engine_t *e);
/* Queue a notification that arrived from @sender (the tcp transport's and loop's callback). */
int kvf__notify_deliver(void *engine, const char *sender, const void *msg, size_t len);

#endif /* KVF_ENGINE_INTERNAL_H */
