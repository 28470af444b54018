/*
 * The tcp transport's private header: the objects its files share, the rules for locking them,
 * and what one tcp file offers another. The files, each calling only files listed before it:
 *
 *   tcp_proto.h   the wire format and its limits (also included by the tests)
 *   tcp_io.c      socket helpers: whole sends bounded by deadlines, receives that never block
 *   tcp_stats.c   kvf_engine_stats_fetch(): a short-lived connection asking a target for its
 *                 statistics (STATS)
 *   tcp_p2p.c     the target's answer to a P2P record request (common/p2p.h): a connection
 *                 whose first bytes are that request, instead of a HELLO
 *   tcp_sc_io.c   a served connection's bytes, plain or TLS, its TLS handshake, its timers and
 *                 its placement on an I/O thread
 *   tcp_target.c  the target side: one served connection as a state machine over a
 *                 non-blocking socket, and the authoritative checks of every request against
 *                 the region table
 *   tcp_pool.c    the transport's threads: the accept thread (caps, eviction of the oldest
 *                 unauthenticated connection) and two fixed sets of I/O threads over epoll: one
 *                 serves the target's connections, the other watches the initiator's
 *                 (tcp_watch_*)
 *   tcp_conn.c    one initiator connection: its slots, how a request ends, breaking it
 *   tcp_rx.c      reading an initiator connection's answers: a resumable state machine run by
 *                 an I/O thread, or by the caller that waits for them
 *   tcp_connect.c (re)opening an initiator connection: connect, TLS, handshake, HELLO, and
 *                 handing its socket to an I/O thread
 *   tcp_peer.c    a peer handle: its connections, opened and closed
 *   tcp_xfer.c    transfer() and notify(): posting chunks, gathering small writes, batches,
 *                 waiting for their answers
 *   tcp.c         the transport: create, destroy, the ops table
 *
 * Initiator side. A peer handle owns conns_per_peer connections, opened lazily. The thread that
 * calls transfer() sends its own requests (header and payload in one sendmsg() straight from the
 * caller's memory; runs of small writes gathered into one WRITEV) and then waits for the
 * answers. Whoever holds a connection's reader role reads them and completes requests by req_id,
 * receiving a READ's payload straight into the caller's buffer: normally one of the transport's
 * initiator I/O threads, which wakes the waiting callers; but a caller whose whole batch is one request
 * reads its own answer (see tcp_reader_t), which saves a wake-up on small transfers. No thread
 * belongs to a connection: however many peers, the I/O threads are the same few. Reading never
 * blocks (tcp_rx.c keeps a half-read answer in the connection), so a stalled peer holds up no
 * other connection, and the role can pass between threads in the middle of an answer.
 *
 * Locking on the initiator side. peer->mu protects every connection's state, its in-flight
 * slot table and every batch's counters. conn->send_mu serialises frames on one socket and is
 * taken before peer->mu when both are needed. conn->fd and conn->gen change only with both held,
 * so a sender that holds send_mu and sees the generation it posted under knows the fd is the one
 * its request belongs to (and still open). A connection's fd is closed only after its watch was
 * deleted (no I/O thread runs its handler any more) and no caller reads it (inline_active), so
 * shutdown() by any thread that sees the fd under the lock is safe. A posted batch
 * (tcp_post_batch) ends under peer->mu: its done callback runs there (the engine completes the
 * batch, or queues it to run again, which may start an async thread), so nothing it calls may
 * take a peer's mu. The posted batches' timer (tcp_posted_expire) takes the transport's mu, then
 * each peer's mu; nothing takes them the other way round.
 *
 * The functions below that are not static inline are the tcp files' private interface; none
 * leaves the library (hidden visibility).
 */
#ifndef KVF_TCP_H
#define KVF_TCP_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common/common.h"
#include "common/url.h"
#include "common/regions.h"
#include "common/tls.h"
#include "transport/transport.h"
#include "transport/tcp_proto.h"

#define TCP_LOG "tcp"

/* ---------------------------------------------------------------------------------------------
 * Limits and defaults of this implementation (the wire's own are in tcp_proto.h)
 * ------------------------------------------------------------------------------------------- */

/* A call of one element at least this large is spread over the peer's connections, in parts
 * that are a multiple of TCP_SPLIT_ALIGN (tcp_xfer.c). */
#define TCP_SPLIT_MIN   (512u << 10)
#define TCP_SPLIT_ALIGN (64u << 10)
/* A batch of at most this many bytes in one request may be posted: sent by the thread that
 * submits it, its answer completing it where it is read (tcp_post_batch). */
#define TCP_POST_MAX (128u << 10)
/* Elements up to this size are gathered into WRITEVs by the initiator. */
#define TCP_GATHER_ELEM_MAX (256u << 10)
/* A connection idle at least this long is checked for the target's close (a FIN already
 * received) before a request goes out on it; below KVF_MIN_TCP_IDLE_TIMEOUT_MS, so that a
 * target's idle close is always seen, and long enough to cost the hot path nothing. */
#define TCP_IDLE_CHECK_MS 50u
/* A req_id's low bits are the index of its slot (KVF_TCP_MAX_INFLIGHT of them). */
#define TCP_SLOT_BITS 7
/* Default of a zero connect_timeout_ms in kvf_transport_params_t (zero conns_per_peer and
 * chunk_bytes take the engine's defaults, KVF_DEFAULT_CONNS_PER_PEER and KVF_DEFAULT_CHUNK). */
#define TCP_DEFAULT_CONNECT_MS 3000u
/* Blocking sends wake up this often to check a transfer's deadline (SO_SNDTIMEO). */
#define TCP_CLIENT_SLICE_MS 50
/* The I/O threads check their connections' timers (stalls, rate deadlines, idleness) this
 * often. */
#define TCP_SERVER_SLICE_MS 1000
/* The I/O threads: kvf_transport_params_t.io_threads, else KVFERRY_IO_THREADS=N
 * (1..KVF_MAX_IO_THREADS), else min(online CPUs, KVF_DEFAULT_IO_THREADS); documented in
 * docs/operations.md. */
#define TCP_IO_THREADS_ENV "KVFERRY_IO_THREADS"
/* The accept thread stops polling the listening socket for this long when accept() fails for
 * want of a file descriptor or memory (or until a served connection ends and frees one), rather
 * than spin on a socket that stays readable. */
#define TCP_ACCEPT_PAUSE_MS 100
/* Test hook: see tcp_transport.test_close_left; documented in docs/operations.md. */
#define TCP_TEST_CLOSE_ENV "KVFERRY_TCP_TEST_CLOSE_REQUESTS"
/* The plaintext of one TLS record: what the initiator gathers small pieces of frames into. */
#define TCP_TLS_RECORD (16u << 10)
/* Size of the buffer a refused WRITE's payload (or an unwanted answer) is drained into. */
#define TCP_SCRATCH_LEN (64u << 10)
#define TCP_ERRMSG_LEN  (KVF_TCP_MAX_MSG + 512)
#define TCP_ADDR_LEN    KVF_SESSION_ID_MAX

_Static_assert((1u << TCP_SLOT_BITS) == KVF_TCP_MAX_INFLIGHT, "slot index bits");

/* ---------------------------------------------------------------------------------------------
 * Objects
 * ------------------------------------------------------------------------------------------- */

struct tcp_transport;

/* What the bytes a served connection is receiving now complete (tcp_target.c). */
typedef enum {
    SC_TLS,         /* the TLS handshake (an engine with data TLS): a first byte that is not a
                       TLS record makes it a plain client, answered KVF_ETLS (need_tls) */
    SC_AUTH_HDR,    /* an authentication message's header */
    SC_AUTH_BODY,   /* its body */
    SC_PLAIN_HDR,   /* the rest of a plain HELLO's header, sent to an engine with a key */
    SC_PLAIN_SID,   /* and its payload: then a RESP KVF_EAUTH, and close */
    SC_AUTH_REST,   /* the rest of an auth HELLO sent to an engine without a key: REFUSED */
    SC_HDR,         /* a frame header */
    SC_HELLO,       /* a HELLO's payload */
    SC_NOTIFY,      /* a NOTIFY's payload */
    SC_WRITE,       /* a WRITE's payload, straight into the region (reference held) */
    SC_WRITEV_SEGS, /* a WRITEV's segment table */
    SC_WRITEV_DATA, /* its data, straight into the segments (references held) */
    SC_DRAIN,       /* a refused write's payload, into scratch: then the refusal */
    SC_P2P_KEY,     /* a P2P record request's key: then the answer, and close */
    SC_P2P_BARE,    /* the rest of a P2P request's header sent to an engine with a key without
                       the handshake: then its key (SC_P2P_KEY), answered KVF_EAUTH */
} tcp_sc_step_t;

/* One accepted connection on the target side. Owned by one I/O thread (tcp_pool.c), which alone
 * touches its state; the fields marked "t->mu" are also read by the accept thread and
 * tcp_holders(). */
struct tcp_sconn {
    struct tcp_sconn *next;  /* in t->sconns (t->mu) */
    struct tcp_sconn *tnext; /* in its I/O thread's list (that thread only; or its incoming list,
                                under t->mu) */
    struct tcp_transport *t;
    struct tcp_iothr *io;   /* the I/O thread that drives it now */
    struct tcp_iothr *home; /* t->mu: the one it is counted on; at its HELLO the one it should
                               be on (tcp_sc_place_locked()), and it moves there */
    bool placed;            /* t->mu: its HELLO placed it (peer_sid is set for good) */
    bool begun;             /* tcp_sc_begin() ran: an adoption after a move only watches it */
    int fd; /* closed by its I/O thread after unlinking it from t->sconns, so anyone holding t->mu
               may shutdown() it */
    bool preauth; /* t->mu: has not finished its HELLO (and handshake), counted in t->npreauth */
    bool evicted; /* t->mu: shut down by the accept thread as the oldest pre-auth connection */
    /* How far its handshake got (read by the accept thread to choose whom to evict): 0 nothing
     * complete, 1 a handshake message's header accepted, 2 proven (HELLO awaited). */
    _Atomic uint8_t stage;
    uint64_t born_ms;
    uint8_t ip[16]; /* remote address for the per-address caps: 4 bytes (IPv4, IPv4-mapped) or 16 */
    uint8_t ip_len;
    char addr[TCP_ADDR_LEN];
    char peer_sid[KVF_SESSION_ID_MAX]; /* as the HELLO (or the auth proof) gave it: the sender
                                          of its notifications; written under t->mu, read by its
                                          thread or under t->mu */
    /* The range of the request holding region references now ([lo, hi); hi 0: none), for the
     * message of an unregister that times out (holders()). */
    _Atomic uint64_t hold_lo, hold_hi;

    /* The state machine (tcp_target.c); its I/O thread only. */
    bool hello_done;
    bool need_tls;     /* a plain client of an engine with data TLS: refused in its protocol */
    bool tls_out;      /* the TLS session waits for the socket to take bytes (EPOLLOUT) */
    bool want_out;     /* an answer is being sent: wait for EPOLLOUT, read nothing */
    bool ep_out;       /* what its epoll registration waits for (EPOLLOUT, else EPOLLIN) */
    bool close_after;  /* close once the answer is out */
    bool out_release;  /* the answer is a READ's: release ref once it is out */
    bool ref_held;     /* ref is held (a WRITE's payload or a READ's answer is moving) */
    uint8_t auth_msgs; /* handshake messages received */
    uint8_t auth_type; /* the one whose body is being received */
    tcp_sc_step_t step;
    uint64_t start_ms;    /* the connection's start, for the HELLO and handshake deadlines */
    uint64_t idle_since;  /* the last answer went out (between frames) */
    uint64_t last_ms;     /* the last byte moved, for the stall timeout */
    uint64_t deadline_ms; /* the current frame's (0: none) */
    size_t got;           /* bytes of the current step received */
    struct iovec *rp;     /* what is left to receive */
    int rcnt;
    struct iovec rio[2];
    struct iovec *wp; /* what is left to send */
    int wcnt;
    struct iovec wio[2];
    tcp_hdr_t h;                       /* the request being served */
    kvf_region_ref_t ref;              /* a WRITE's or READ's region reference */
    uint64_t drain_left;               /* SC_DRAIN: payload bytes still to drop */
    int refuse_code;                   /* SC_DRAIN: the answer's status once drained */
    uint64_t refuse_addr;              /* and its addr field */
    unsigned nrefs;                    /* SC_WRITEV_DATA: references held in refs */
    kvf_auth_srv_t *auth;              /* the handshake in progress, or NULL */
    kvf_tls_t *tls;                    /* its TLS session (data TLS), or NULL: plain */
    char close_why[160];               /* why it is closed once the answer is out ("" quiet) */
    uint8_t hbuf[KVF_TCP_HDR_LEN];     /* a frame header (or an auth or P2P request's start) */
    uint8_t obuf[KVF_TCP_HDR_LEN];     /* an answer's header */
    uint8_t *obody;                    /* an answer body to free once sent (STATS, P2P), or NULL */
    uint8_t small[KVF_NOTIFY_MAX + 8]; /* HELLO, NOTIFY and auth payloads; error messages out */
    uint8_t *scratch;                  /* drain buffer for refused writes, allocated on first use */
    uint8_t *segs;                     /* a WRITEV's segment table, allocated on first use */
    kvf_region_ref_t *refs;            /* and the region references of its segments */
    struct iovec *iov;
};

/* One I/O thread: an epoll set over its share of the served connections and of the initiator
 * connections' watches. */
struct tcp_iothr {
    struct tcp_transport *t;
    unsigned idx;
    int ep;      /* epoll fd */
    int wake_fd; /* eventfd: new connections in incoming, or stopping */
    pthread_t thread;
    bool started;
    unsigned nconns;            /* t->mu: connections whose home it is (for the choices) */
    bool retired;               /* t->mu: stopping, it adopts no more connections */
    struct tcp_sconn *incoming; /* t->mu: handed over (by the accept thread, or moved here by
                                   another I/O thread at its HELLO), not yet in ep */
    struct tcp_sconn *conns;    /* this thread only */
    bool wmu_init;              /* wmu and wcv are initialised */
    pthread_mutex_t wmu;        /* the watches' dead and busy flags, and dead */
    pthread_cond_t wcv;         /* a watch's handler returned */
    struct tcp_watch *dead;     /* deleted watches, freed by the thread between epoll_wait()s */
};

/* A watch's handler, run by its I/O thread with the epoll events that fired. */
typedef void (*tcp_watch_fn)(void *arg, uint32_t events);

/* A batch: the completion shared by every chunk one transfer() call posts. */
struct tcp_batch {
    const kvf_xfer_t *x;
    int *status;        /* per element (kvf_xfer_ctl_t), or NULL; under peer->mu */
    uint32_t *left;     /* per element, chunks not yet answered, when status is kept */
    size_t outstanding; /* posted chunks not yet answered or failed; under peer->mu */
    _Atomic int rc;     /* first error; written under peer->mu, read anywhere */
    bool waiting;       /* the owner sleeps on cv */
    bool shared;        /* an answer is read by another (its connection's reader was busy):
                           the owner waits on cv for all of them; under peer->mu */
    pthread_cond_t cv;
    char msg[TCP_ERRMSG_LEN];
    /* A posted batch (tcp_post_batch): nobody waits on cv; whoever ends its last request (an
     * answer's reader, a break, the expiry sweep) calls done and frees it, once the poster has
     * let go (posting false). Under peer->mu. */
    kvf_post_done_fn done;
    void *done_arg;
    bool posting;
    uint64_t deadline_ms;
};

/* One request in flight on a connection. req_id 0 = free. */
struct tcp_slot {
    uint64_t req_id;
    struct tcp_batch *batch;
    size_t elem;
    uint32_t nelem;   /* elements elem.. it carries: 1, or more for a WRITEV */
    uint32_t refused; /* a refused WRITEV: the segment the target named, else UINT32_MAX */
    uint8_t *local;
    uint64_t remote;
    uint64_t len;
    uint8_t op;
};

/* Who reads a connection's answers. Normally an I/O thread; but a caller whose whole batch is
 * one request reads its own answer (saving the I/O thread's wake-up of the caller, the larger
 * part of small-transfer latency), and hands the role on if other requests are still pending. */
typedef enum {
    TCP_READER_NONE,   /* nothing to read: its I/O thread only watches for the peer closing */
    TCP_READER_IO,     /* its I/O thread (the socket's epoll interest includes EPOLLIN) */
    TCP_READER_INLINE, /* the caller that owns inline_b */
} tcp_reader_t;

typedef enum {
    TCP_CONN_DOWN,       /* no socket */
    TCP_CONN_CONNECTING, /* a transfer thread is (re)connecting it */
    TCP_CONN_UP,
    TCP_CONN_BROKEN, /* failed; the next transfer reconnects */
} tcp_conn_state_t;

/* What the bytes an initiator connection is receiving now complete (tcp_rx.c). */
typedef enum {
    TCP_RX_HDR,   /* an answer's header */
    TCP_RX_MSG,   /* a refusal's message */
    TCP_RX_DATA,  /* a READ answer's payload, straight into the caller's buffer */
    TCP_RX_DRAIN, /* an answer nobody waits for any more (its request was given up) */
} tcp_rx_state_t;

struct tcp_peer;
struct tcp_watch;

struct tcp_conn {
    struct tcp_peer *peer;
    unsigned idx;
    /* All below under peer->mu; fd and gen also under send_mu. */
    tcp_conn_state_t state;
    int fd;
    kvf_tls_t *tls; /* fd's TLS session (data TLS), or NULL; changes with fd. Every call on it
                       is made under tls_mu (a reader and a sender use it at once) */
    uint64_t gen;   /* changes whenever fd does */
    uint64_t seq;
    struct tcp_watch *watch; /* fd's registration with an I/O thread, while fd is open */
    bool ep_in;              /* watch includes EPOLLIN (set whenever reader is IO) */
    bool rx_missed;          /* the I/O thread had an event while a caller read (INLINE) */
    int rx_active; /* slot whose READ payload the reader is receiving without the lock, or -1 */
    tcp_reader_t reader;
    struct tcp_batch *inline_b; /* the batch whose caller reads, when reader is INLINE */
    bool inline_active;         /* that caller is reading without the lock: fd must stay open */
    unsigned waiters;           /* threads sleeping on cv */
    pthread_cond_t cv;          /* state changes, freed slots, rx_active cleared */
    pthread_mutex_t send_mu;
    pthread_mutex_t tls_mu;
    uint8_t *tls_buf; /* TLS: small pieces of frames gathered into one record (send_mu) */
    uint8_t *scratch; /* drain buffer for answers nobody waits for */
    /* The answer being received (tcp_rx.c): by the holder of the reader role only. */
    tcp_rx_state_t rx_state;
    size_t rx_turn_left; /* bytes this reader may still take before it lets others go first */
    size_t rx_got;     /* bytes of the current part received */
    uint64_t rx_left;  /* TCP_RX_DRAIN: bytes still to drop */
    unsigned rx_idx;   /* TCP_RX_DATA: the slot, and its request */
    uint64_t rx_req;
    tcp_hdr_t rx_h;
    uint8_t rx_hbuf[KVF_TCP_HDR_LEN];
    char rx_msg[KVF_TCP_MAX_MSG + 1];
    unsigned nfree;
    uint64_t idle_since_ms; /* when it opened or its last request ended (nfree was full) */
    int sndbuf;             /* SO_SNDBUF of fd at generation sndbuf_gen, as last read by a post */
    uint64_t sndbuf_gen;
    uint16_t free_slots[KVF_TCP_MAX_INFLIGHT];
    struct tcp_slot slots[KVF_TCP_MAX_INFLIGHT];
};

struct tcp_peer {
    struct tcp_transport *t; /* NULL once the transport was destroyed */
    struct tcp_peer *next;   /* in t->peers, under t->mu */
    char sid[TCP_ADDR_LEN];
    char addr_str[TCP_ADDR_LEN];
    kvf_hostport_t addr;
    char local_sid[TCP_ADDR_LEN];
    uint32_t chunk;
    uint32_t connect_timeout_ms;
    kvf_auth_key_t auth; /* the transport's key, copied (len 0: none); read-only after open */
    kvf_tls_ctx_t *tls;  /* the transport's data TLS client context, or NULL (the transport frees
                            it after it shut its peers down) */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* active reaching 0 while closing */
    bool closing;
    bool all_opened; /* every connection was opened once (on the first one's opening) */
    unsigned active; /* transfer() calls inside */
    atomic_uint rr;
    unsigned nconns;
    struct tcp_conn conns[];
};

struct tcp_transport {
    kvf_region_table_t *regions;
    char local_sid[TCP_ADDR_LEN];
    char listen_str[TCP_ADDR_LEN];
    uint32_t conns_per_peer;
    uint32_t chunk;
    uint32_t connect_timeout_ms;
    uint32_t idle_timeout_ms; /* a served connection idle this long after a request is closed */
    uint32_t io_threads;      /* kvf_transport_params_t.io_threads (0: the environment's) */
    kvf_auth_key_t auth;      /* the cluster secret (len 0: none); read-only after create */
    kvf_tls_ctx_t *tls_srv;   /* data TLS (both NULL: none): served connections */
    kvf_tls_ctx_t *tls_cli;   /* and the connections to peers, each verified against the peer's
                                 address unless the options name a server or a fingerprint */
    kvf_notify_cb notify_cb;
    void *notify_arg;
    kvf_stats_cb stats_cb;
    void *stats_arg;
    kvf_record_cb record_cb;
    void *record_arg;
    int listen_fd;
    int wake_fd; /* eventfd: wakes the accept thread for shutdown */
    int reap_fd; /* eventfd: a served connection was closed (an fd is free again) */
    uint16_t port;
    pthread_t accept_thread;
    atomic_bool stopping;    /* destroy: the accept thread ends (then the I/O threads) */
    atomic_bool io_stopping; /* the I/O threads end, after the accept thread was joined: a
                                connection it handed over late is still adopted and closed */
    /* Test hook (KVFERRY_TCP_TEST_CLOSE_REQUESTS=N): the next N data requests are answered by
     * closing their connection, as an idle close that crossed the request would. */
    atomic_int test_close_left;
    pthread_mutex_t mu; /* sconns, nsconns, npreauth, each connection's home and placed, the I/O
                           threads' nconns, incoming and retired, peers */
    struct tcp_sconn *sconns;
    unsigned nsconns;  /* all served connections */
    unsigned npreauth; /* of which before their HELLO (and handshake) */
    unsigned nio;         /* I/O threads serving connections: io[0, nio) */
    unsigned nrx;         /* and watching the initiator's: io[nio, nio + nrx) */
    struct tcp_iothr *io;
    atomic_uint watch_rr; /* spreads the initiator connections' watches over the I/O threads */
    struct tcp_peer *peers;
    /* Run by the first initiator I/O thread on every timer tick (tcp_posted_expire), set by
     * create: a call up the file order that tcp_pool.c cannot make directly. */
    void (*on_tick)(struct tcp_transport *t, uint64_t now_ms);
};

static inline struct tcp_transport *tcp_of(kvf_transport_t *t)
{
    return (struct tcp_transport *)(void *)t;
}

static inline struct tcp_peer *tcp_peer_of(kvf_tpeer_t *p)
{
    return (struct tcp_peer *)(void *)p;
}

static inline const char *tcp_op_name(uint8_t op)
{
    return op == KVF_TCP_READ ? "read" : op == KVF_TCP_NOTIFY ? "notification" : "write";
}

/* The iovecs of a WRITEV frame: header, segment table, then each element's bytes. */
#define TCP_WRITEV_IOV (2 + KVF_TCP_MAX_SEGS)

/* Drop the first @n bytes of an iovec array (a partial send). */
static inline void tcp_iov_advance(struct iovec **iov, int *cnt, size_t n)
{
    while (n > 0 && *cnt > 0) {
        if (n >= (*iov)->iov_len) {
            n -= (*iov)->iov_len;
            (*iov)++;
            (*cnt)--;
        } else {
            (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
            (*iov)->iov_len -= n;
            n = 0;
        }
    }
    while (*cnt > 0 && (*iov)->iov_len == 0) {
        (*iov)++;
        (*cnt)--;
    }
}

/* Requests registered on @c and not yet answered or failed. Under peer->mu. */
static inline unsigned tcp_conn_busy(const struct tcp_conn *c)
{
    return KVF_TCP_MAX_INFLIGHT - c->nfree;
}

/* ---------------------------------------------------------------------------------------------
 * tcp_io.c: socket helpers
 * ------------------------------------------------------------------------------------------- */

/* Set SO_RCVTIMEO or SO_SNDTIMEO (@opt) of @fd to @ms. */
void tcp_set_timeout(int fd, int opt, unsigned ms);

/* "host:port" or "[host]:port" of an IPv4 or IPv6 socket address, for logs. */
void tcp_sockaddr_format(const struct sockaddr_storage *ss, char *buf, size_t len);

/*
 * Send all of @iov on @c's socket (blocking, with SO_SNDTIMEO set to a short slice; or its TLS
 * session), so that a peer that stops reading is noticed: at @deadline_ms (kvf__now_ms clock,
 * 0 = none), or when nothing moved for @stall_ms (0 = no limit). The array is consumed. Under
 * c->send_mu. Returns 0, -KVF_ETIMEDOUT or -errno (-KVF_ETLS).
 */
int tcp_conn_sendv(struct tcp_conn *c, struct iovec *iov, int cnt, uint64_t deadline_ms,
                   uint32_t stall_ms);

/* Receive up to @len bytes on @c without blocking (by the holder of its reader role). Returns
 * the count (> 0), 0 at the end of the stream, -EAGAIN when nothing is there (nor inside its TLS
 * session), or -errno (-KVF_ETLS). */
ssize_t tcp_conn_recv_some(struct tcp_conn *c, void *buf, size_t len);

/* ---------------------------------------------------------------------------------------------
 * tcp_p2p.c: the P2P record request
 * ------------------------------------------------------------------------------------------- */

/* The key length of the P2P record request whose KVF_P2P_REQ_LEN-byte header is @hdr, or -1
 * with @why set when the header is malformed. */
int tcp_p2p_key_len(const uint8_t *hdr, char *why, size_t whylen);

/* The answer to a P2P request for @key (@klen bytes, received) from @addr: into *@out (malloc'd,
 * the caller frees it) and *@out_len. Returns 0, or -1 with @why set when the key is malformed
 * (the connection is then closed without an answer). */
int tcp_p2p_answer(struct tcp_transport *t, const char *addr, char *key, size_t klen, uint8_t **out,
                   size_t *out_len, char *why, size_t whylen);

/* The answer of an engine with a key to a P2P record request that came without the handshake
 * (the asker has no key), or (@tls) of an engine with data TLS to one that came without TLS:
 * KVF_EAUTH or KVF_ETLS and a message saying what is missing, into @out (room for
 * KVF_P2P_ANS_LEN + KVF_P2P_MAX_MSG bytes). Returns its length. */
size_t tcp_p2p_refusal(const struct tcp_transport *t, bool tls, uint8_t *out);

/* ---------------------------------------------------------------------------------------------
 * tcp_sc_io.c: a served connection's bytes, its TLS handshake, its timers
 * ------------------------------------------------------------------------------------------- */

/* Under t->mu, at @sc's HELLO (peer_sid set): choose its home, the I/O thread to serve it (the
 * thread it is on moves it there once its current turn ends, tcp_pool.c): the one serving the
 * most of the same peer's connections, then the fewest placed connections in all, then the one
 * it is on. */
void tcp_sc_place_locked(struct tcp_transport *t, struct tcp_sconn *sc);

/* Why a frame is closed for being too slow. */
extern const char tcp_sc_slow[];

/* Move bytes of @sc's answer being sent (@out) or of its current step's receive, as many as
 * one call takes without blocking. Returns the bytes moved (> 0), 0 at the end of the stream
 * (receive), -EAGAIN (sc->tls_out says whether the socket must take bytes first), or another
 * negative code with the reason in @why. */
ssize_t tcp_sc_io(struct tcp_sconn *sc, bool out, char *why, size_t whylen);

/* Whether received bytes wait inside @sc's TLS session, which the socket does not show. */
bool tcp_sc_pending(const struct tcp_sconn *sc);

/* Advance @sc's TLS handshake (step SC_TLS). Returns 1 when done, or when the client turned out
 * to be plain (sc->need_tls set); 0 to be called again when the socket is ready (sc->tls_out);
 * -1 with *@reason. */
int tcp_sc_tls_accept(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen);

/* ---------------------------------------------------------------------------------------------
 * tcp_target.c: serving one connection, a state machine over a non-blocking socket
 * ------------------------------------------------------------------------------------------- */

/* Set up a new connection's state (its fields are zero; t, fd and addr are set). */
void tcp_sc_begin(struct tcp_sconn *sc);

/*
 * Move @sc's bytes as far as the socket allows without blocking: receive, validate and serve
 * requests, send answers. Returns 0 (sc->want_out says whether it waits to send or to receive),
 * 1 when the connection is to be closed quietly (end of stream, a P2P request answered), or -1
 * when it is to be closed with *@reason (a violation, logged by the caller as a warning; an
 * idle close is logged by tcp_sc_tick()).
 */
int tcp_sc_run(struct tcp_sconn *sc, const char **reason, char *why, size_t whylen);

/* Check @sc's timers at @now: HELLO and handshake deadlines, the idle timeout, a frame's rate
 * deadline and the stall timeout. Returns 0, 1 (close quietly: idle, logged here) or -1 with
 * *@reason. */
int tcp_sc_tick(struct tcp_sconn *sc, uint64_t now, const char **reason, char *why, size_t whylen);

/* Release what @sc holds (region references, buffers, the handshake); before closing it. */
void tcp_sc_end(struct tcp_sconn *sc);

/* ---------------------------------------------------------------------------------------------
 * tcp_pool.c: the accept thread and the I/O threads
 * ------------------------------------------------------------------------------------------- */

/* Start @t's I/O threads (t->nio of them, KVFERRY_IO_THREADS or min(CPUs, 4)) and its accept
 * thread. Returns 0 or a negative code with the message set (nothing left running). */
int tcp_pool_start(struct tcp_transport *t);

/* Stop the accept thread, then every I/O thread (each closes its connections, releasing their
 * region references), and join them. t->stopping is set and t->wake_fd written by the caller;
 * every watch was deleted (the peers were shut down). */
void tcp_pool_stop(struct tcp_transport *t);

/*
 * Watch @fd (an initiator connection's socket) on one of @t's initiator I/O threads (the second
 * set, kvf-tcp-rx): @fn(@arg, events)
 * runs on that thread whenever @events (epoll flags) fire. Returns 0 with the watch in *@out,
 * or a negative code (message not set). Handlers of one watch never run at once.
 */
int tcp_watch_add(struct tcp_transport *t, int fd, uint32_t events, tcp_watch_fn fn, void *arg,
                  struct tcp_watch **out);

/* Change what @w waits for (EPOLL_CTL_MOD: an edge-triggered watch fires at once if the new
 * events are ready). Any thread; @w's fd is open. Returns false (logged) when that failed. */
bool tcp_watch_mod(struct tcp_watch *w, uint32_t events);

/* Delete @w (NULL: nothing): once this returns its handler is not running and never runs again,
 * so its fd may be closed and its argument freed. Not from its own handler, nor holding a lock
 * the handler takes. */
void tcp_watch_del(struct tcp_watch *w);

/* The holders op: the served connections whose request holds part of [addr, addr+len). */
size_t tcp_holders(kvf_transport_t *tt, uint64_t addr, uint64_t len, char *buf, size_t buflen);

/* ---------------------------------------------------------------------------------------------
 * tcp_conn.c: one initiator connection (slots and batches all under peer->mu)
 * ------------------------------------------------------------------------------------------- */

/* Record @code and a message as @b's error, unless it has one already. Under peer->mu. */
void tcp_batch_fail(struct tcp_batch *b, int code, const char *fmt, ...) KVF__PRINTF(3, 4);

/* Give a slot back and count its chunk as done for its batch (whose error, if any, the caller
 * recorded already). */
void tcp_slot_finish(struct tcp_conn *c, unsigned idx);
/* End posted batch @b, whose last request ended: leave the peer, call its done, free it. Under
 * peer->mu. */
void tcp_posted_end_locked(struct tcp_peer *p, struct tcp_batch *b);

/* Fail one slot with @code, naming its element and @why. */
void tcp_slot_fail(struct tcp_conn *c, unsigned idx, int code, const char *why);

/* Reset @fd at once, dropping its send queue (SO_LINGER 0, connect(AF_UNSPEC)); the fd stays
 * valid for a reader still using it. */
void tcp_fd_abort(int fd);

/*
 * Mark the connection broken (if @gen is still current), shut its socket down so that its
 * reader and any sender return, and fail every request on it except the one whose READ payload
 * is being received (rx_active: its reader fails it once its recv() returns). Under peer->mu.
 */
void tcp_conn_break_locked(struct tcp_conn *c, uint64_t gen, int code, const char *why);

/* Set up connection @idx of peer @p, down, with its slots free. Returns 0 or a negative code. */
int tcp_conn_init(struct tcp_peer *p, struct tcp_conn *c, unsigned idx);

/* Free what tcp_conn_init() set up (the connection is down, its fd closed). */
void tcp_conn_fini(struct tcp_conn *c);

/* Close @c's socket and free its TLS session (fd >= 0; its watch deleted, nobody reading it;
 * the caller sets gen as its locking requires). */
void tcp_conn_close_fd(struct tcp_conn *c);

/* ---------------------------------------------------------------------------------------------
 * tcp_rx.c: reading an initiator connection's answers
 * ------------------------------------------------------------------------------------------- */

/* A request was registered on @c (UP) for @b: make sure someone will read its answer. @b's
 * caller does when @mine (its batch puts at most one request on each connection: one element,
 * in parts) and nobody else reads @c now; else the I/O thread (or the caller already reading
 * @c). Under peer->mu. */
void tcp_rx_claim_locked(struct tcp_conn *c, struct tcp_batch *b, bool mine);

/* If @b's caller holds the reader role of every connection its answers come on, read them until
 * @b is complete, the connections break, or @deadline_ms, then hand the roles on; returns true.
 * Else hands on any it holds and returns false (the I/O threads read @b's answers and wake its
 * caller). Called and returns with peer->mu held. */
bool tcp_rx_inline_locked(struct tcp_peer *p, struct tcp_batch *b, uint64_t deadline_ms);

/* Give up the reader role @b's caller holds, if any (its requests failed before their answers
 * were read). Under peer->mu. */
void tcp_rx_release_locked(struct tcp_peer *p, const struct tcp_batch *b);

/* The I/O thread's handler of a connection's watch (@arg: the struct tcp_conn). */
void tcp_rx_event(void *arg, uint32_t events);

/* ---------------------------------------------------------------------------------------------
 * tcp_connect.c: (re)opening an initiator connection
 * ------------------------------------------------------------------------------------------- */

/*
 * (Re)open connection @c. Called with peer->mu held and c->state DOWN or BROKEN; returns with it
 * held, the state UP (0) or DOWN (error, message set), and waiters woken.
 */
int tcp_conn_open_locked(struct tcp_conn *c, uint64_t deadline_ms);

/* ---------------------------------------------------------------------------------------------
 * tcp_peer.c: peer handles (the ops peer_open and peer_close)
 * ------------------------------------------------------------------------------------------- */

int tcp_peer_open(kvf_transport_t *tt, const kvf_tpeer_desc_t *d, kvf_tpeer_t **out);
void tcp_peer_close(kvf_tpeer_t *pp);
/* The peer_alive op: no I/O while a connection is up, else one connect. */
int tcp_peer_alive(kvf_tpeer_t *pp, uint64_t deadline_ms);

/* Shut every peer handle of @t down and detach it (destroy(): the handles stay valid, and
 * refuse transfers, until the engine closes them). */
void tcp_peer_detach_all(struct tcp_transport *t);

/* ---------------------------------------------------------------------------------------------
 * tcp_xfer.c: the ops transfer and notify
 * ------------------------------------------------------------------------------------------- */

int tcp_transfer(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                 const kvf_xfer_ctl_t *ctl);
int tcp_notify(kvf_tpeer_t *pp, const void *msg, size_t len, uint64_t deadline_ms);
int tcp_post_batch(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                   int *status, kvf_post_done_fn done, void *arg);
/* Time out the posted batches of @t's peers whose deadline passed (the I/O threads' timer). */
void tcp_posted_expire(struct tcp_transport *t, uint64_t now_ms);

#endif /* KVF_TCP_H */
