/*
 * Internals of the built-in config store server (tcp://), shared by its files; not part of the
 * API. The server is an in-memory key-value map served by one thread running a single-threaded,
 * level-triggered epoll loop. The wire protocol is in proto.h and docs/protocol.md.
 *
 * Everything but the public functions runs on the loop thread only, so nothing needs a lock.
 * Three rules keep the loop safe:
 *  - Every byte from a socket is untrusted. A frame header is validated before anything is
 *    allocated for its body; a violation closes that one connection.
 *  - A connection is only closed ("killed") at a safe point: while reading its own input, in the
 *    timer pass, or while flushing output. Handlers that append answers or events to other
 *    connections never close anything, because they may be iterating a list (watches, waiters)
 *    that closing would change. Such an append that would take the connection's unsent output
 *    past opts.max_output_bytes is dropped and flags the connection ("overflow"); the flush
 *    pass closes it.
 *  - Output bounds: a connection's own requests stop being executed (and read) while more than
 *    SRV_OUT_PAUSE_READ of its output is unsent; they resume from the flush path as it drains.
 *    So unsent output is at most opts.max_output_bytes, plus one answer. Watch events
 *    and woken answers share one copy of their tail (srv_shared), counted in full per connection.
 *  - A killed connection's fd is closed and its waiters and watches are detached at once, but its
 *    memory lives until the end of the loop iteration ("zombie"), because later events returned
 *    by the same epoll_wait() may still point at it.
 *
 * The server is layered in files, each calling only the ones below it:
 *
 *   server.c        the loop thread; start, stop and the public kvf_store_server_* functions
 *   server_conn.c   connections: accept, read, parse and dispatch, flush, close
 *   server_ops.c    one handler per opcode: decode the request, act, answer
 *   server_kv.c     the data: key-value map, leases, get-with-wait waiters, watches
 *   server_reply.c  frames appended to a connection's output (answers and events)
 *   server_quota.c  the quotas: clients (source addresses), what is charged to them, the options
 *   server_timer.c  the min-heap of deadlines (waiters, leases, partial frames, idle connections)
 *
 * The defaults and limits are in limits.h.
 */
#ifndef KVF_STORE_SERVER_H
#define KVF_STORE_SERVER_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "common/auth.h"
#include "common/common.h"
#include "common/tls.h"
#include "common/url.h"
#include "common/wire.h"
#include "store/limits.h"
#include "store/proto.h"

#define SRV_LOG "store"

#define SRV_CONTAINER(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

/* ---- intrusive doubly-linked lists ----------------------------------------------------------- */

struct srv_link {
    struct srv_link *prev, *next;
};

static inline void link_init(struct srv_link *h)
{
    h->prev = h->next = h;
}

static inline bool link_empty(const struct srv_link *h)
{
    return h->next == h;
}

static inline void link_add_tail(struct srv_link *h, struct srv_link *n)
{
    n->prev = h->prev;
    n->next = h;
    h->prev->next = n;
    h->prev = n;
}

static inline void link_del(struct srv_link *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = n;
}

/* ---- data structures ------------------------------------------------------------------------- */

/* A key as the tsearch() comparators see it. It is the first member of every struct kept in a
 * key-ordered tree, so a pointer to such a struct is also a pointer to its srv_keyref. */
struct srv_keyref {
    const uint8_t *key;
    uint32_t klen;
};

enum srv_timer_kind {
    SRV_TIMER_WAITER,  /* get-with-wait deadline */
    SRV_TIMER_LEASE,   /* lease expiry */
    SRV_TIMER_PARTIAL, /* partial-frame timeout of a connection */
    SRV_TIMER_QUIET,   /* idle timeout of a connection (checked lazily, see conn_quiet_check) */
    SRV_TIMER_AUTH,    /* the handshakes' deadline: TLS (KVF_TLS_HANDSHAKE_MS from the accept),
                          then the secret's (KVF_AUTH_TIMEOUT_MS from the end of TLS, or from
                          the accept without TLS) */
};

#define SRV_TIMER_IDLE SIZE_MAX

/* An entry of the deadline min-heap, embedded in the object it times. */
struct srv_timer {
    uint64_t deadline_ms;
    size_t idx; /* position in the heap, SRV_TIMER_IDLE when not armed */
    enum srv_timer_kind kind;
};

/* A client in the quotas' sense: one source IP address. It lives while anything is charged to it
 * (connections, keys, bytes, leases, watches); see server_quota.c. */
struct srv_client {
    uint8_t ip[16]; /* first members: the client tree compares ip_len, then ip */
    uint8_t ip_len; /* 4 or 16 */
    char name[48];  /* the address, for messages */
    unsigned conns;
    uint64_t keys, bytes;
    uint32_t leases, watches;
};

/* One copy of a frame's tail shared by every connection it is sent to (watch events, woken
 * get-with-wait answers): each connection's output holds only its own header and a mark. */
struct srv_shared {
    unsigned refs;
    uint32_t len;
    uint8_t data[];
};

/* A shared tail in a connection's output: it goes out after the owned bytes before @pos. */
struct srv_mark {
    size_t pos;  /* offset in srv_conn.out at which it is inserted */
    size_t sent; /* bytes of it already sent */
    struct srv_shared *sh;
};

struct srv_lease {
    uint64_t id; /* first member: the lease tree compares ids */
    uint32_t ttl_ms;
    struct srv_client *owner; /* charged with it */
    char *holder;             /* with a key: the proven identity of the client that granted it,
                                 the only one (besides an admin) that may use it or change its
                                 keys; NULL without a key */
    struct srv_timer timer;
    struct srv_link keys; /* srv_entry.lease_link */
};

struct srv_entry {
    struct srv_keyref k; /* first member, see srv_keyref */
    uint8_t *val;        /* NULL when vlen is 0 */
    uint32_t vlen;
    struct srv_lease *lease;
    struct srv_link lease_link;
    struct srv_client *owner; /* charged with it: the client that wrote it last */
    uint8_t key[];
};

struct srv_conn;

/* The get-with-wait requests pending on one absent key. */
struct srv_waitkey {
    struct srv_keyref k;     /* first member, see srv_keyref */
    struct srv_link waiters; /* srv_waiter.key_link */
    uint8_t key[];
};

struct srv_waiter {
    struct srv_conn *conn;
    uint32_t req_id;
    struct srv_timer timer;
    struct srv_waitkey *wk;
    struct srv_link key_link;
    struct srv_link conn_link;
};

struct srv_watch {
    uint64_t id;
    struct srv_conn *conn;
    struct srv_link all_link;  /* kvf_store_server.watches */
    struct srv_link conn_link; /* srv_conn.watches */
    uint32_t plen;
    uint8_t prefix[];
};

struct srv_conn {
    int fd;
    bool dead;
    bool dirty;      /* on the server's dirty list: has output to flush */
    bool overflow;   /* an event or woken answer was dropped: over the output cap; close it */
    bool held;       /* conn_parse stopped on SRV_OUT_PAUSE_READ; resume when output drains */
    uint32_t events; /* current epoll interest */
    char peer[KVF_SESSION_ID_MAX];

    struct srv_client *client; /* its address, for the quotas */

    uint8_t *in; /* received bytes not yet consumed: complete frames, then at most one partial */
    size_t in_len, in_cap;
    kvf_buf_t out; /* answers and events; bytes [out_off, out.len) are unsent */
    size_t out_off;
    struct srv_mark *marks; /* shared tails in out, in order; [mark_head, mark_len) unsent */
    size_t mark_head, mark_len, mark_cap;
    size_t shared_pending; /* unsent bytes of the marks */
    size_t out_counted;    /* this connection's share of kvf_store_server.out_total */
    bool marks_oom;        /* a mark could not be stored: close it */
    struct srv_timer partial;
    struct srv_timer quiet;
    /* With a key: the server's half of the handshake until the client proved it, then NULL.
     * While it is set nothing but handshake messages is read from the connection. */
    kvf_auth_srv_t *auth;
    struct srv_timer auth_timer;
    /* With TLS: the session, and the handshake's progress. Until the first bytes show a TLS
     * ClientHello (tls_sniffed) nothing is given to OpenSSL, so that a plain client can be
     * answered in its own protocol. */
    kvf_tls_t *tls;
    bool tls_sniffed;
    bool tls_hs;                /* the TLS handshake is in progress */
    bool tls_ready;             /* on kvf_store_server.tls_ready */
    struct srv_link ready_link; /* kvf_store_server.tls_ready */
    char *ident; /* the identity the client proved (NULL without a key) */
    bool admin;  /* it proved the admin key */
    uint64_t last_active_ms; /* last time bytes arrived or a get-with-wait of it ended */

    struct srv_link waiters; /* srv_waiter.conn_link */
    unsigned nwaiters;
    struct srv_link watches; /* srv_watch.conn_link */
    unsigned nwatches;
    uint64_t last_watch_id;

    struct srv_link link;       /* kvf_store_server.conns, or .zombies once dead */
    struct srv_link dirty_link; /* kvf_store_server.dirty */
};

struct kvf_store_server {
    char url[KVF_HOST_MAX + 16];
    int listen_fd;
    int epfd;
    int evfd; /* written by kvf_store_server_shutdown() */
    pthread_t thread;

    pthread_mutex_t mu; /* guards done and loop_rc, for kvf_store_server_wait() */
    pthread_cond_t cond;
    bool done;
    int loop_rc;

    kvf_store_server_opts_t opts;
    kvf_auth_key_t auth_key;  /* the cluster secret (len 0: none); read-only after start */
    kvf_auth_key_t admin_key; /* the operators' key (len 0: none); read-only after start */
    kvf_tls_ctx_t *tls_ctx;   /* TLS for every connection (NULL: none); read-only after start */

    /* Loop-thread state from here on. */
    uint64_t now_ms; /* refreshed after every epoll_wait() */
    uint64_t partial_timeout_ms;

    void *client_root; /* tsearch tree of srv_client, by address */
    uint64_t nkeys, nbytes;
    uint32_t nleases, nwatches;
    size_t out_total; /* unsent output of every connection */

    void *kv_root;      /* tsearch tree of srv_entry, byte order of keys */
    void *waitkey_root; /* tsearch tree of srv_waitkey */
    void *lease_root;   /* tsearch tree of srv_lease, by id */
    uint64_t next_lease_id;

    struct srv_timer **heap;
    size_t heap_len, heap_cap;

    struct srv_link conns;
    struct srv_link zombies;
    struct srv_link dirty;
    struct srv_link watches; /* every watch of every connection */
    struct srv_link tls_ready; /* connections whose TLS session holds decrypted input that
                                  epoll cannot report: read again before the next wait */
    unsigned nconns;
    bool stopping;             /* closing every connection: held requests are not resumed */
    _Atomic unsigned nwaiters; /* get-with-wait requests parked, all connections */

    bool accept_paused;
    uint64_t accept_resume_ms;
    /* For kvf_store_server_stats(): written by the loop thread only (relaxed), read by any. */
    struct {
        uint64_t started_ms;
        _Atomic uint64_t clients, keys, leases, ops, bytes_in, bytes_out;
    } stats;
};

/* Count @v into a stats field of the server (loop thread; relaxed, read by any thread). */
#define SRV_STAT_ADD(srv, field, v)                                                                \
    atomic_fetch_add_explicit(&(srv)->stats.field, (uint64_t)(v), memory_order_relaxed)
#define SRV_STAT_SUB(srv, field, v)                                                                \
    atomic_fetch_sub_explicit(&(srv)->stats.field, (uint64_t)(v), memory_order_relaxed)

/* The request being answered. */
struct srv_req {
    uint8_t op;
    uint32_t req_id;
};

/* ---- timers (server_timer.c) ---------------------------------------------------------------- */

static inline void timer_init(struct srv_timer *t, enum srv_timer_kind kind)
{
    t->deadline_ms = 0;
    t->idx = SRV_TIMER_IDLE;
    t->kind = kind;
}

static inline bool timer_armed(const struct srv_timer *t)
{
    return t->idx != SRV_TIMER_IDLE;
}

/* Arm @t to fire at @deadline_ms, or move its deadline if it is armed. Returns 0, or -ENOMEM when
 * the heap cannot grow (only possible when @t was not armed). */
int kvf__srv_timer_arm(struct kvf_store_server *srv, struct srv_timer *t, uint64_t deadline_ms);
/* Take @t out of the heap; nothing when it is not armed. */
void kvf__srv_timer_disarm(struct kvf_store_server *srv, struct srv_timer *t);

/* ---- output (server_reply.c) ---------------------------------------------------------------- */

static inline size_t conn_pending_out(const struct srv_conn *c)
{
    return c->out.len - c->out_off + c->shared_pending;
}

/* Output pause: while true, @c's requests are neither executed nor read. */
static inline bool conn_paused(const struct srv_conn *c)
{
    return conn_pending_out(c) > SRV_OUT_PAUSE_READ;
}

/* Queue @c for another read before the next epoll wait when its TLS session holds decrypted
 * input (epoll only sees the socket) and it is reading. */
static inline void conn_tls_ready_check(struct kvf_store_server *srv, struct srv_conn *c)
{
    kvf_stream_t s = {.fd = c->fd, .tls = c->tls};
    if (c->dead || c->tls_ready || c->held || conn_paused(c) || !kvf__stream_pending(&s))
        return;
    link_add_tail(&srv->tls_ready, &c->ready_link);
    c->tls_ready = true;
}

/* The name of opcode @op for messages ("?" when unknown). */
const char *kvf__srv_op_name(unsigned op);
/* Put @c on the list of connections the loop flushes at the end of this iteration. */
void kvf__srv_conn_mark_dirty(struct kvf_store_server *srv, struct srv_conn *c);
/* Whether an unrequested frame of @frame_len bytes (event, woken answer) may be appended to @c;
 * when not, @c is flagged to be closed by the flush pass and nothing may be appended. */
bool kvf__srv_conn_room_for(struct kvf_store_server *srv, struct srv_conn *c, size_t frame_len);
/* Begin a frame in @c's output; returns its offset, to pass to kvf__srv_frame_end() once the body
 * is appended to c->out. */
size_t kvf__srv_frame_begin(struct srv_conn *c, uint8_t op, uint16_t status, uint32_t req_id);
/* Finish the frame begun at @off (fill in its body length) and mark @c dirty. */
void kvf__srv_frame_end(struct kvf_store_server *srv, struct srv_conn *c, size_t off);
/* Answer @rq with status OK and an empty body, one u64, or one blob. */
void kvf__srv_reply_empty(struct kvf_store_server *srv, struct srv_conn *c,
                          const struct srv_req *rq);
void kvf__srv_reply_u64(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                        uint64_t v);
void kvf__srv_reply_blob(struct kvf_store_server *srv, struct srv_conn *c, uint8_t op,
                         uint32_t req_id, const void *p, size_t n);
/* A shared tail of @len bytes (refs 1, contents to fill in), or NULL when out of memory. */
struct srv_shared *kvf__srv_shared_new(size_t len);
/* Drop one reference to @sh; the last frees it. */
void kvf__srv_shared_put(struct srv_shared *sh);
/* Append a frame whose body is @prefix (@plen bytes, at most 8) followed by @sh to @c's output;
 * @c holds a reference to @sh until it is sent. The caller checked kvf__srv_conn_room_for(). */
void kvf__srv_frame_shared(struct kvf_store_server *srv, struct srv_conn *c, uint8_t op,
                           uint32_t req_id, const void *prefix, size_t plen, struct srv_shared *sh);
/* Bring kvf_store_server.out_total in step with @c's unsent output (@c's share is 0 once it is
 * dead). */
void kvf__srv_out_account(struct kvf_store_server *srv, struct srv_conn *c);
/* Advance @c's output past @n sent bytes (owned bytes and marks, in order). */
void kvf__srv_out_advance(struct kvf_store_server *srv, struct srv_conn *c, size_t n);
/* Release @c's output: its buffer and the references of its marks. */
void kvf__srv_out_release(struct kvf_store_server *srv, struct srv_conn *c);
/* Answer @rq, or request @req_id of opcode @op, with a non-zero @status and a formatted message. */
void kvf__srv_reply_err(struct kvf_store_server *srv, struct srv_conn *c, const struct srv_req *rq,
                        uint16_t status, const char *fmt, ...) KVF__PRINTF(5, 6);
void kvf__srv_reply_err_to(struct kvf_store_server *srv, struct srv_conn *c, uint8_t op,
                           uint32_t req_id, uint16_t status, const char *fmt, ...)
    KVF__PRINTF(6, 7);

/* ---- quotas (server_quota.c) ---------------------------------------------------------------- */

/* The client of the peer address @ss, created if new; NULL when out of memory. */
struct srv_client *kvf__srv_client_get(struct kvf_store_server *srv,
                                       const struct sockaddr_storage *ss);
/* Free @cl if nothing is charged to it any more. */
void kvf__srv_client_maybe_free(struct kvf_store_server *srv, struct srv_client *cl);
/* Whether @cl may hold @keys more keys and @bytes more bytes (either may be negative: a value
 * replaced by a shorter one). Returns true, or false with the limit and value in @why. */
bool kvf__srv_quota_kv(struct kvf_store_server *srv, const struct srv_client *cl, int64_t keys,
                       int64_t bytes, char *why, size_t whylen);
/* Charge @cl with @keys keys and @bytes bytes (negative: release). */
void kvf__srv_charge_kv(struct kvf_store_server *srv, struct srv_client *cl, int64_t keys,
                        int64_t bytes);
/* Whether @cl may hold one more lease / watch; false with the limit in @why. */
bool kvf__srv_quota_lease(struct kvf_store_server *srv, const struct srv_client *cl, char *why,
                          size_t whylen);
bool kvf__srv_quota_watch(struct kvf_store_server *srv, const struct srv_client *cl, char *why,
                          size_t whylen);
/* Fill @o with the defaults; check @o, returning 0 or -KVF_EINVAL naming the field. */
void kvf__srv_opts_default(kvf_store_server_opts_t *o);
int kvf__srv_opts_check(const kvf_store_server_opts_t *o);

/* ---- the data (server_kv.c) ----------------------------------------------------------------- */

/* Orders leases by id, for the lease tree (tsearch). */
int kvf__srv_lease_cmp(const void *a, const void *b);
/* Park a get-with-wait of @c (request @req_id) on @key until @deadline_ms. Returns 0 or -ENOMEM. */
int kvf__srv_waiter_add(struct kvf_store_server *srv, struct srv_conn *c, uint32_t req_id,
                        const uint8_t *key, uint32_t klen, uint64_t deadline_ms);
/* Drop waiter @w without answering it; with @free_empty_key also its key's entry once empty. */
void kvf__srv_waiter_free(struct kvf_store_server *srv, struct srv_waiter *w, bool free_empty_key);
/* Drop watch @w from the server's and its connection's lists, uncharge it and free it. */
void kvf__srv_watch_free(struct kvf_store_server *srv, struct srv_watch *w);
/* The entry of @key, or NULL. */
struct srv_entry *kvf__srv_kv_find(struct kvf_store_server *srv, const uint8_t *key, uint32_t klen);
/* Set @key to @val for client @by (waking its waiters, notifying watches); see the definition for
 * @set_lease. Returns 0, -ENOMEM, or -EDQUOT with the quota in @why. */
int kvf__srv_kv_put(struct kvf_store_server *srv, struct srv_client *by, const uint8_t *key,
                    uint32_t klen, const uint8_t *val, uint32_t vlen, bool set_lease,
                    struct srv_lease *lease, char *why, size_t whylen);
/* Delete entry @e, notifying watches. */
void kvf__srv_kv_delete(struct kvf_store_server *srv, struct srv_entry *e);
/* tdestroy() callbacks for the key-value and lease trees at server stop. */
void kvf__srv_entry_free(void *p);
void kvf__srv_lease_free(void *p);
/* End @lease now: delete its keys (with events) and free it. */
void kvf__srv_lease_end(struct kvf_store_server *srv, struct srv_lease *lease);
/* The live lease @id, or NULL (ending it first if its TTL has passed). */
struct srv_lease *kvf__srv_lease_find(struct kvf_store_server *srv, uint64_t id);

/* ---- op handlers (server_ops.c) ------------------------------------------------------------- */

/* Handles request @rq of @c, whose body @rd reads; always answers, or parks the request. */
typedef void (*srv_op_fn)(struct kvf_store_server *, struct srv_conn *, const struct srv_req *,
                          kvf_rd_t *);
/* The handler of each opcode, NULL for an opcode that is not a request. */
extern const srv_op_fn kvf__srv_ops[KVF_STORE_OP_LIST_PAGE + 1];

/* ---- connections (server_conn.c) ------------------------------------------------------------ */

/* Why a store without TLS closes a client whose first bytes are a TLS record. */
#define SRV_TLS_UNEXPECTED                                                                         \
    "the client speaks TLS and this store does not use TLS (start it with a certificate and key, " \
    "--tls-cert and --tls-key, or connect without TLS options)"

/* Whether @h (2 bytes) starts a TLS record carrying a handshake: a TLS client's first bytes. */
static inline bool tls_client_hello(const uint8_t *h)
{
    return h[0] == KVF_TLS_RECORD_HANDSHAKE && h[1] == KVF_TLS_RECORD_MAJOR;
}

/* Close @c at once (fd, waiters, watches); its memory goes in kvf__srv_zombies_free(). */
void kvf__srv_conn_kill(struct kvf_store_server *srv, struct srv_conn *c);
/* Log at warn level why @c is closed (numbers and fixed text only), then close it. */
void kvf__srv_conn_close_warn(struct kvf_store_server *srv, struct srv_conn *c, const char *fmt,
                              ...) KVF__PRINTF(3, 4);
/* Free the memory of the connections closed in this loop iteration. */
void kvf__srv_zombies_free(struct kvf_store_server *srv);
/* Flush every connection with new output, closing those over their output limit. */
void kvf__srv_dirty_flush(struct kvf_store_server *srv);
/* Handle the epoll @events of connection @c: read and run its requests, flush its output. */
void kvf__srv_conn_on_events(struct kvf_store_server *srv, struct srv_conn *c, uint32_t events);
/* Write @ss as "host:port" (or "[v6]:port") into @buf. */
void kvf__srv_sockaddr_format(const struct sockaddr_storage *ss, char *buf, size_t len);
/* Stop (@pause) or resume accepting; a pause lasts SRV_ACCEPT_PAUSE_MS, see timers_run(). */
void kvf__srv_accept_pause(struct kvf_store_server *srv, bool pause);
/* The idle timer of @c fired: close it if it has been idle long enough, else re-arm it. */
void kvf__srv_conn_quiet(struct kvf_store_server *srv, struct srv_conn *c);
/* Accept the pending connections (at most SRV_ACCEPTS_PER_EVENT). */
void kvf__srv_accept_all(struct kvf_store_server *srv);
/* Read the connections of kvf_store_server.tls_ready (their input waits inside TLS). */
void kvf__srv_tls_ready_run(struct kvf_store_server *srv);

#endif
