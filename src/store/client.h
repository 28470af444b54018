/*
 * Internals of the client of the built-in config store (tcp://), shared by its files; not part of
 * the API.
 *
 * One TCP connection per client carries every request, each tagged with a req_id, and one
 * background I/O thread owns that connection: it reads and validates every frame, hands answers
 * to the threads waiting for them, runs watch callbacks, keeps leases alive and reconnects with
 * backoff when the connection drops.
 *
 * A caller thread encodes its request without any lock, then under `mu` gives it an id, enters it
 * in the table of requests in flight and sends it with a non-blocking send (when the socket is
 * full, or earlier output is still queued, the rest goes to `out` and the I/O thread flushes it),
 * and finally sleeps on the request's own condition variable until the answer, its deadline or the
 * loss of the connection. Nothing ever blocks on the socket while holding `mu`.
 *
 * Server-side ids (leases, watches) are only meaningful on the connection that obtained them: a
 * restarted store hands out the same small numbers to other clients. Users therefore only see
 * client ids; the lease and watch tables map them to the current server ids, and after every
 * reconnect the I/O thread re-grants the leases, re-publishes the keys set under them and
 * re-registers the watches before user requests flow again (the connection is "restoring" until
 * those answers are in). A lease re-granted on a live connection (the store lost it) likewise
 * holds user requests back until its keys are re-published.
 *
 * A store that vanished without closing the connection is noticed by the kernel (TCP keep-alives
 * and TCP_USER_TIMEOUT) and by the I/O thread: an internal request (keep-alive, re-grant, or the
 * PING probe sent when a caller's request timed out) left unanswered for request_timeout_ms
 * drops the connection, and the client reconnects.
 *
 * The client is layered in files, each calling only the ones below it:
 *
 *   client.c        kvf_store_open() and kvf_store_close(): the client's life
 *   client_ops.c    the other public kvf_store_* functions: check, encode, call, decode
 *   client_call.c   one call: send a request and wait for its answer, or its deadline
 *   client_io.c     the I/O thread: reading and dispatching answers and events, timers,
 *                   dead-peer detection
 *   client_conn.c   connecting, reconnecting with backoff, connection up and down
 *   client_state.c  leases and watches kept in step with the store: grants, keep-alives,
 *                   re-registration and re-publication after a reconnect
 *   client_req.c    the records (requests, leases, keys, watches), frames, and sending
 *
 * This header holds the structures they share. The defaults and limits are in limits.h.
 */
#ifndef KVF_STORE_CLIENT_H
#define KVF_STORE_CLIENT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#include "common/auth.h"
#include "common/tls.h"
#include "common/url.h"
#include "common/wire.h"
#include "kvferry.h"
#include "store/limits.h"
#include "store/proto.h"
#include "store/store.h"

typedef enum {
    CLI_DOWN,      /* no connection; the I/O thread is reconnecting */
    CLI_RESTORING, /* connected; leases and watches are being re-established */
    CLI_READY,     /* connected; user requests may be sent */
} cli_conn_state_t;

typedef enum {
    CLI_OWNER_CALLER,    /* a user thread waits for it and frees it */
    CLI_OWNER_ABANDONED, /* its caller timed out; the I/O thread frees it when it ends */
    CLI_OWNER_IO,        /* sent by the I/O thread (keep-alive, restore); freed by it */
} cli_owner_t;

typedef enum {
    CLI_LEASE_GRANTING,   /* the user's grant is in flight; no server id yet */
    CLI_LEASE_LIVE,       /* granted on the current connection and kept alive */
    CLI_LEASE_NEED_GRANT, /* the store lost it, or the connection dropped: re-grant it */
    CLI_LEASE_REGRANTING, /* the I/O thread's re-grant is in flight */
    CLI_LEASE_STOPPED,    /* keep-alives stopped: it expires on the server; never re-granted */
} cli_lease_state_t;

/* A key set through this client under a lease, re-published when the lease is re-granted. */
typedef struct cli_key {
    struct cli_key *next;
    char *key;
    uint8_t *val;
    size_t len;
} cli_key_t;

typedef struct cli_lease {
    struct cli_lease *next;
    uint64_t cid; /* the id the user holds */
    uint64_t sid; /* the server's id on the current connection; 0 when none */
    uint32_t ttl_ms;
    cli_lease_state_t state;
    uint64_t due_ms; /* next keep-alive (LIVE) or re-grant attempt (NEED_GRANT) */
    bool lost;       /* the store answered a keep-alive "not found": it has no keys of this lease
                        until a re-grant succeeds */
    cli_key_t *keys;
} cli_lease_t;

typedef struct cli_watch {
    struct cli_watch *next;
    uint64_t cid;
    uint64_t sid; /* the server's id on the current connection; 0 = not registered there */
    bool active;  /* false until the user's WATCH has been answered */
    char *prefix;
    size_t prefix_len;
    kvf_store_watch_cb cb;
    void *arg;
} cli_watch_t;

typedef struct cli_req {
    struct cli_req *next; /* hash chain in kvf_store.reqs */
    /* CLI_OWNER_IO only: list of internal requests in flight, oldest first (they all have the
     * same deadline, request_timeout_ms after sent_ms), so that an unanswered one is noticed. */
    struct cli_req *io_prev, *io_next;
    uint64_t sent_ms;
    uint32_t id;
    uint8_t op;
    cli_owner_t owner;
    bool done;
    bool restore; /* counted in kvf_store.restore_pending */
    bool has_cond;
    pthread_cond_t cond; /* CLI_OWNER_CALLER only */
    int err;
    char msg[CLI_MSG_MAX];
    /* Results, written by the I/O thread before `done`. */
    uint8_t *val;
    size_t val_len;
    uint64_t u64;
    kvf_store_kv_t *kvs;
    size_t nkvs;
    /* Context, so the I/O thread can keep the lease and watch tables in step with the store. */
    char *key;        /* SET, CAS, DEL: a copy of the key */
    uint8_t *rec_val; /* SET, CAS under a lease: a copy of the value, to re-publish */
    size_t rec_len;
    uint64_t lease_cid;     /* SET, CAS: lease to bind (0 none); GRANT, KEEPALIVE: the lease */
    uint64_t lease_sid;     /* KEEPALIVE: the server id it refreshed */
    uint64_t watch_cid;     /* WATCH */
    uint64_t sid_gen;       /* REVOKE by a user: connection on which its server id is valid */
    cli_lease_t *new_lease; /* GRANT by a user: entry linked into the table when sent */
    cli_watch_t *new_watch; /* WATCH by a user: likewise */
} cli_req_t;

struct kvf_store {
    kvf_store_base_t base; /* first: the backend table (store.h) */
    char *url;
    kvf_store_url_t addr;
    kvf_store_opts_t opts;
    kvf_auth_key_t auth; /* the cluster secret, or the admin key (len 0: none), proven on every
                            (re)connection */
    char ident[KVF_AUTH_MAX_ID + 1]; /* the identity it proves: "kvferry-session/<sid>" for an
                            engine's client (opts.session_id), else "kvferry-store-client/<random>"
                            (or "kvferry-admin/<random>"), the same on every reconnection, so that
                            the leases it granted stay its own */
    kvf_tls_ctx_t *tls_ctx; /* TLS for every (re)connection; NULL: plain */
    int wake_fd; /* eventfd: wakes the I/O thread out of poll() */
    pthread_t io;
    bool io_started;

    pthread_mutex_t mu;
    pthread_cond_t cond; /* connection state, lease states, callbacks ending, closing */
    /* Everything below is protected by mu. `fd` is only changed by the I/O thread, which may
     * therefore read it without the lock. */
    int fd;
    kvf_tls_t *tls; /* the connection's TLS session (NULL: plain); used under mu only */
    cli_conn_state_t state;
    uint64_t conn_gen;
    bool broken; /* a caller's send failed: the I/O thread must drop the connection */
    char broken_why[CLI_MSG_MAX];
    bool closing;
    unsigned active_calls;
    unsigned restore_pending;
    uint32_t next_req_id;
    cli_req_t *reqs[CLI_REQ_BUCKETS];
    kvf_buf_t out; /* bytes the socket did not take yet; out_off of them are sent */
    size_t out_off;
    cli_lease_t *leases;
    uint64_t next_lease_cid;
    cli_watch_t *watches;
    uint64_t next_watch_cid;
    uint64_t cb_watch_cid; /* the watch whose callback runs right now; 0 if none */
    char last_conn_err[CLI_MSG_MAX];
    /* Dead-peer detection. Internal requests (keep-alives, re-grants, probes...) in flight,
     * oldest first; one unanswered for request_timeout_ms means the store is gone even if the
     * connection looks fine (a host that vanished without FIN or RST). */
    cli_req_t *io_head, *io_tail;
    uint64_t last_io_ms;   /* last time input arrived or queued output drained (I/O thread) */
    uint64_t last_send_ms; /* last time a frame was sent or queued: a quiet connection pings */
    bool probe_wanted;     /* a caller's request timed out: the I/O thread sends a PING probe */

    /* I/O thread only. */
    kvf_buf_t rx;
    uint32_t backoff_ms;
};

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */

static inline void cli_wake(kvf_store_t *st)
{
    uint64_t one = 1;
    /* EAGAIN means the counter is already non-zero: the thread is going to wake anyway. */
    ssize_t w = write(st->wake_fd, &one, sizeof(one));
    (void)w;
}

static inline void cli_drain_wake(kvf_store_t *st)
{
    uint64_t v;
    ssize_t r = read(st->wake_fd, &v, sizeof(v));
    (void)r;
}

/* The current connection as a stream (st->mu held, or the I/O thread for fd alone). */
static inline kvf_stream_t cli_stream(const kvf_store_t *st)
{
    return (kvf_stream_t){.fd = st->fd, .tls = st->tls};
}

static inline bool cli_on_io_thread(const kvf_store_t *st)
{
    return st->io_started && pthread_equal(pthread_self(), st->io);
}

static inline bool cli_is_closing(kvf_store_t *st)
{
    pthread_mutex_lock(&st->mu);
    bool c = st->closing;
    pthread_mutex_unlock(&st->mu);
    return c;
}

static inline uint64_t cli_keepalive_interval(const cli_lease_t *l)
{
    return l->ttl_ms / 3 ? l->ttl_ms / 3 : 1;
}

/* ---------------------------------------------------------------------------------------------
 * Records, frames and sending (client_req.c)
 * ------------------------------------------------------------------------------------------- */

/* @s (@len bytes) as shown in messages, written into @buf of @n bytes: at most 64 bytes,
 * non-printable ones as '?', "..." when cut. Returns @buf. */
const char *kvf__cli_show(char *buf, size_t n, const char *s, size_t len);

/* Frames: begin one of opcode @op in @b (a fresh buffer), append its body with kvf__buf_put_*(),
 * then kvf__cli_frame_end() fills in the length; it returns 0 or -KVF_ENOMEM (then free @b).
 * kvf__cli_frame_u64() and kvf__cli_frame_set() build a whole frame of one u64, or of a SET. */
void kvf__cli_frame_begin(kvf_buf_t *b, uint8_t op);
int kvf__cli_frame_end(kvf_buf_t *b);
int kvf__cli_frame_u64(kvf_buf_t *b, uint8_t op, uint64_t v);
int kvf__cli_frame_set(kvf_buf_t *b, const char *key, size_t klen, const void *val, size_t len,
                       uint64_t lease_sid);

/* A new request of opcode @op owned by @owner, or NULL when out of memory. */
cli_req_t *kvf__cli_req_new(uint8_t op, cli_owner_t owner);
/* Free a request, lease (with its keys) or watch and all it holds; NULL is ignored. */
void kvf__cli_req_free(cli_req_t *rq);
void kvf__cli_lease_free(cli_lease_t *l);
void kvf__cli_watch_free(cli_watch_t *w);

/* The tables (st->mu held): find or unlink a request by id, a lease or a watch by client id
 * (NULL when absent); stop tracking @key under any lease. */
cli_req_t *kvf__cli_req_find_locked(kvf_store_t *st, uint32_t id);
void kvf__cli_req_unlink_locked(kvf_store_t *st, cli_req_t *rq);
cli_lease_t *kvf__cli_lease_find_locked(kvf_store_t *st, uint64_t cid);
cli_lease_t *kvf__cli_lease_unlink_locked(kvf_store_t *st, uint64_t cid);
cli_watch_t *kvf__cli_watch_unlink_locked(kvf_store_t *st, uint64_t cid);
void kvf__cli_forget_key_locked(kvf_store_t *st, const char *key);

/* Sending (st->mu held). kvf__cli_mark_broken_locked() has the I/O thread drop the connection.
 * kvf__cli_submit_locked() gives @rq an id, enters it in the table and sends @frame.
 * kvf__cli_send_internal_locked() does the same for a request of the I/O thread (CLI_OWNER_IO),
 * which it tracks for dead-peer detection, and frees @frame; kvf__cli_io_unlink_locked() takes such
 * a request off that list. kvf__cli_send_u64_locked() sends a fire-and-forget request with a u64
 * body. */
void kvf__cli_mark_broken_locked(kvf_store_t *st, const char *why);
/* Send up to @n bytes of @p without blocking, as far as the socket takes them; a send error
 * marks the connection broken. Returns the bytes sent. */
size_t kvf__cli_send_now_locked(kvf_store_t *st, const uint8_t *p, size_t n);
void kvf__cli_submit_locked(kvf_store_t *st, cli_req_t *rq, kvf_buf_t *frame);
void kvf__cli_send_internal_locked(kvf_store_t *st, cli_req_t *rq, kvf_buf_t *frame);
void kvf__cli_io_unlink_locked(kvf_store_t *st, cli_req_t *rq);
void kvf__cli_send_u64_locked(kvf_store_t *st, uint8_t op, uint64_t v);

/* ---------------------------------------------------------------------------------------------
 * Leases and watches (client_state.c), st->mu held
 * ------------------------------------------------------------------------------------------- */

/* Send a grant for lease @l (a re-grant when @restore: user requests wait for its answer). */
void kvf__cli_send_grant_locked(kvf_store_t *st, cli_lease_t *l, bool restore);
/* Send a keep-alive for lease @l. */
void kvf__cli_send_keepalive_locked(kvf_store_t *st, cli_lease_t *l);
/* Register watch @w again on a new connection. */
void kvf__cli_send_watch_locked(kvf_store_t *st, cli_watch_t *w);
/* Bring the lease and watch tables in step with the answer to @rq (the I/O thread). */
void kvf__cli_apply_answer_locked(kvf_store_t *st, cli_req_t *rq);
/* Link the lease or watch entry a user's grant or watch @rq creates (just before it is sent),
 * or drop it again when the request failed. */
void kvf__cli_link_entries_locked(kvf_store_t *st, cli_req_t *rq);
void kvf__cli_drop_entries_locked(kvf_store_t *st, cli_req_t *rq);

/* ---------------------------------------------------------------------------------------------
 * The connection (client_conn.c)
 * ------------------------------------------------------------------------------------------- */

/* The connection @fd (with TLS session @tls, or NULL) is up (st->mu held): re-grant leases,
 * re-register watches. */
void kvf__cli_conn_up_locked(kvf_store_t *st, int fd, kvf_tls_t *tls);
/* Close the connection and fail every request in flight with @err / @why (st->mu held). */
void kvf__cli_conn_down_locked(kvf_store_t *st, int err, const char *why);
/* One attempt to connect before @deadline_ms; returns the socket (its TLS session in *@tls, NULL
 * without TLS) or a negative code (with @why): -KVF_EAUTH, -KVF_ETLS when the store refused this
 * client, -KVF_ECLOSED when @interruptible and the client is closing. */
int kvf__cli_connect_once(kvf_store_t *st, uint64_t deadline_ms, bool interruptible,
                          kvf_tls_t **tls, char *why, size_t whylen);
/* Reconnect with backoff (the I/O thread); the socket (and *@tls), or -1 when closing. */
int kvf__cli_reconnect(kvf_store_t *st, kvf_tls_t **tls);

/* ---------------------------------------------------------------------------------------------
 * The I/O thread (client_io.c)
 * ------------------------------------------------------------------------------------------- */

/* The I/O thread's body; @arg is the kvf_store_t. */
void *kvf__cli_io_main(void *arg);

/* ---------------------------------------------------------------------------------------------
 * Calls (client_call.c)
 * ------------------------------------------------------------------------------------------- */

/* Send @frame as request @*rqp and wait for the answer; see the definition. */
int kvf__cli_call(kvf_store_t *st, cli_req_t **rqp, kvf_buf_t *frame, uint64_t timeout_ms,
                  bool wait_connect, const char *what);
/* Argument checks of the public functions: 0, or a negative code with the last-error set. */
int kvf__cli_check_handle(const kvf_store_t *st, const char *op);
int kvf__cli_check_key(const kvf_store_t *st, const char *op, const char *key, bool prefix);
int kvf__cli_check_value(const kvf_store_t *st, const char *what, const char *name, const void *val,
                         size_t len);
/* -KVF_ENOMEM, with the last-error set for @what. */
int kvf__cli_nomem(const kvf_store_t *st, const char *what);
/* SET (or CAS when @cas) of @key, under lease @lease when non-zero. */
int kvf__cli_put(kvf_store_t *st, const char *what, const char *key, bool cas, const void *expected,
                 size_t expected_len, const void *val, size_t len, uint64_t lease);

/* ---------------------------------------------------------------------------------------------
 * The backend's operations (client_ops.c; open and close in client.c), kvf__store_builtin_ops
 * ------------------------------------------------------------------------------------------- */

int kvf__builtin_set(kvf_store_t *st, const char *key, const void *val, size_t len,
                     uint64_t lease);
int kvf__builtin_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len);
int kvf__builtin_del(kvf_store_t *st, const char *key);
int kvf__builtin_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
                     const void *val, size_t len, uint64_t lease);
int kvf__builtin_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result);
int kvf__builtin_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count);
int kvf__builtin_list_page(kvf_store_t *st, const char *prefix, const char *after, size_t max,
                           unsigned flags, kvf_store_kv_t **out, size_t *count, int *more);
int kvf__builtin_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                       uint64_t *watch_id);
int kvf__builtin_unwatch(kvf_store_t *st, uint64_t watch_id);
int kvf__builtin_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease);
int kvf__builtin_lease_keepalive_stop(kvf_store_t *st, uint64_t lease);
int kvf__builtin_lease_revoke(kvf_store_t *st, uint64_t lease);
int kvf__builtin_ping(kvf_store_t *st);

#endif
