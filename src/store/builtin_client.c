/*
 * Client of the built-in config store (tcp://).
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
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/url.h"
#include "common/wire.h"
#include "store/limits.h"
#include "store/proto.h"

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
    char *key;          /* SET, CAS, DEL: a copy of the key */
    uint8_t *rec_val;   /* SET, CAS under a lease: a copy of the value, to re-publish */
    size_t rec_len;
    uint64_t lease_cid; /* SET, CAS: lease to bind (0 none); GRANT, KEEPALIVE: the lease */
    uint64_t lease_sid; /* KEEPALIVE: the server id it refreshed */
    uint64_t watch_cid; /* WATCH */
    uint64_t sid_gen;   /* REVOKE by a user: connection on which its server id is valid */
    cli_lease_t *new_lease; /* GRANT by a user: entry linked into the table when sent */
    cli_watch_t *new_watch; /* WATCH by a user: likewise */
} cli_req_t;

struct kvf_store {
    char *url;
    kvf_store_url_t addr;
    kvf_store_opts_t opts;
    int wake_fd; /* eventfd: wakes the I/O thread out of poll() */
    pthread_t io;
    bool io_started;

    pthread_mutex_t mu;
    pthread_cond_t cond; /* connection state, lease states, callbacks ending, closing */
    /* Everything below is protected by mu. `fd` is only changed by the I/O thread, which may
     * therefore read it without the lock. */
    int fd;
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
    uint64_t last_io_ms; /* last time input arrived or queued output drained (I/O thread) */
    bool probe_wanted;   /* a caller's request timed out: the I/O thread sends a PING probe */

    /* I/O thread only. */
    kvf_buf_t rx;
    uint32_t backoff_ms;
};

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */

/* A key or prefix as shown in messages: at most 64 bytes, non-printable bytes as '?'. */
static const char *cli_show(char *buf, size_t n, const char *s, size_t len)
{
    size_t max = n - 4 < 64 ? n - 4 : 64;
    size_t o = strlen(kvf__printable(buf, max + 1, s, len));
    if (o < len) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

static void cli_what(char *what, size_t n, const char *op, const char *key)
{
    char shown[80];
    snprintf(what, n, "%s \"%s\"", op, cli_show(shown, sizeof(shown), key, strlen(key)));
}

static void cli_wake(kvf_store_t *st)
{
    uint64_t one = 1;
    /* EAGAIN means the counter is already non-zero: the thread is going to wake anyway. */
    ssize_t w = write(st->wake_fd, &one, sizeof(one));
    (void)w;
}

static void cli_drain_wake(kvf_store_t *st)
{
    uint64_t v;
    ssize_t r = read(st->wake_fd, &v, sizeof(v));
    (void)r;
}

static bool cli_on_io_thread(const kvf_store_t *st)
{
    return st->io_started && pthread_equal(pthread_self(), st->io);
}

static bool cli_is_closing(kvf_store_t *st)
{
    pthread_mutex_lock(&st->mu);
    bool c = st->closing;
    pthread_mutex_unlock(&st->mu);
    return c;
}

static uint64_t cli_keepalive_interval(const cli_lease_t *l)
{
    return l->ttl_ms / 3 ? l->ttl_ms / 3 : 1;
}

/* ---------------------------------------------------------------------------------------------
 * Frames
 * ------------------------------------------------------------------------------------------- */

static void cli_frame_begin(kvf_buf_t *b, uint8_t op)
{
    kvf__buf_init(b);
    kvf__buf_put_u32(b, KVF_STORE_MAGIC);
    kvf__buf_put_u8(b, KVF_STORE_PROTO_VERSION);
    kvf__buf_put_u8(b, op);
    kvf__buf_put_u16(b, 0);
    kvf__buf_put_u32(b, 0); /* req_id, filled in when the frame is sent */
    kvf__buf_put_u32(b, 0); /* body_len, filled in by cli_frame_end() */
}

static int cli_frame_end(kvf_buf_t *b)
{
    if (b->oom)
        return -KVF_ENOMEM;
    kvf__put_le32(b->data + 12, (uint32_t)(b->len - KVF_STORE_HDR_LEN));
    return 0;
}

/* A frame whose body is one u64 (KEEPALIVE, REVOKE, UNWATCH). */
static int cli_frame_u64(kvf_buf_t *b, uint8_t op, uint64_t v)
{
    cli_frame_begin(b, op);
    kvf__buf_put_u64(b, v);
    return cli_frame_end(b);
}

/* SET: blob key, blob value, u64 lease. The lease is the last 8 bytes, patched when sent. */
static int cli_frame_set(kvf_buf_t *b, const char *key, size_t klen, const void *val, size_t len,
                         uint64_t lease_sid)
{
    cli_frame_begin(b, KVF_STORE_OP_SET);
    kvf__buf_put_blob(b, key, klen);
    kvf__buf_put_blob(b, val, len);
    kvf__buf_put_u64(b, lease_sid);
    return cli_frame_end(b);
}

/* ---------------------------------------------------------------------------------------------
 * Requests, leases and watches
 * ------------------------------------------------------------------------------------------- */

static cli_req_t *cli_req_new(uint8_t op, cli_owner_t owner)
{
    cli_req_t *rq = calloc(1, sizeof(*rq));
    if (!rq)
        return NULL;
    rq->op = op;
    rq->owner = owner;
    if (owner == CLI_OWNER_CALLER) {
        if (kvf__cond_init_monotonic(&rq->cond) < 0) {
            free(rq);
            return NULL;
        }
        rq->has_cond = true;
    }
    return rq;
}

static void cli_key_free(cli_key_t *k)
{
    free(k->key);
    free(k->val);
    free(k);
}

static void cli_lease_free(cli_lease_t *l)
{
    if (!l)
        return;
    while (l->keys) {
        cli_key_t *k = l->keys;
        l->keys = k->next;
        cli_key_free(k);
    }
    free(l);
}

static void cli_watch_free(cli_watch_t *w)
{
    if (!w)
        return;
    free(w->prefix);
    free(w);
}

static void cli_req_free(cli_req_t *rq)
{
    if (!rq)
        return;
    free(rq->val);
    kvf_store_kv_free(rq->kvs, rq->nkvs);
    free(rq->key);
    free(rq->rec_val);
    cli_lease_free(rq->new_lease);
    cli_watch_free(rq->new_watch);
    if (rq->has_cond)
        pthread_cond_destroy(&rq->cond);
    free(rq);
}

static cli_req_t *cli_req_find_locked(kvf_store_t *st, uint32_t id)
{
    for (cli_req_t *rq = st->reqs[id % CLI_REQ_BUCKETS]; rq; rq = rq->next)
        if (rq->id == id)
            return rq;
    return NULL;
}

static void cli_req_unlink_locked(kvf_store_t *st, cli_req_t *rq)
{
    for (cli_req_t **pp = &st->reqs[rq->id % CLI_REQ_BUCKETS]; *pp; pp = &(*pp)->next) {
        if (*pp == rq) {
            *pp = rq->next;
            rq->next = NULL;
            return;
        }
    }
}

static cli_lease_t *cli_lease_find_locked(kvf_store_t *st, uint64_t cid)
{
    for (cli_lease_t *l = st->leases; l; l = l->next)
        if (l->cid == cid)
            return l;
    return NULL;
}

static cli_lease_t *cli_lease_unlink_locked(kvf_store_t *st, uint64_t cid)
{
    for (cli_lease_t **pp = &st->leases; *pp; pp = &(*pp)->next) {
        if ((*pp)->cid == cid) {
            cli_lease_t *l = *pp;
            *pp = l->next;
            l->next = NULL;
            return l;
        }
    }
    return NULL;
}

static cli_watch_t *cli_watch_unlink_locked(kvf_store_t *st, uint64_t cid)
{
    for (cli_watch_t **pp = &st->watches; *pp; pp = &(*pp)->next) {
        if ((*pp)->cid == cid) {
            cli_watch_t *w = *pp;
            *pp = w->next;
            w->next = NULL;
            return w;
        }
    }
    return NULL;
}

/* Stop tracking @key under any lease: it was deleted, or set again with another lease or none. */
static void cli_forget_key_locked(kvf_store_t *st, const char *key)
{
    for (cli_lease_t *l = st->leases; l; l = l->next) {
        for (cli_key_t **pp = &l->keys; *pp;) {
            cli_key_t *k = *pp;
            if (!strcmp(k->key, key)) {
                *pp = k->next;
                cli_key_free(k);
            } else {
                pp = &k->next;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Sending
 * ------------------------------------------------------------------------------------------- */

/* Ask the I/O thread to drop the connection (callers may not close the fd it polls). */
static void cli_mark_broken_locked(kvf_store_t *st, const char *why)
{
    if (!st->broken) {
        st->broken = true;
        snprintf(st->broken_why, sizeof(st->broken_why), "%s", why);
    }
    cli_wake(st);
}

/* Send @n bytes now as far as the socket takes them, queueing the rest for the I/O thread.
 * Output is never reordered: once anything is queued, later frames queue behind it. */
static void cli_send_locked(kvf_store_t *st, const uint8_t *p, size_t n)
{
    if (st->broken || st->fd < 0)
        return; /* the request is failed when the I/O thread drops the connection */
    if (st->out.len == st->out_off) {
        while (n > 0) {
            ssize_t w = send(st->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                char why[CLI_MSG_MAX];
                snprintf(why, sizeof(why), "send: %s", kvf_strerror(-errno));
                cli_mark_broken_locked(st, why);
                return;
            }
            p += w;
            n -= (size_t)w;
        }
        if (n == 0)
            return;
    }
    bool was_empty = st->out.len == st->out_off;
    kvf__buf_put(&st->out, p, n);
    if (st->out.oom) {
        /* Part of a frame may already be on the wire: the stream cannot continue. */
        cli_mark_broken_locked(st, "out of memory queueing a request");
        return;
    }
    if (was_empty)
        cli_wake(st); /* so that it polls for POLLOUT */
}

/* Give @rq an id, enter it in the table and send @frame. The connection must be up. */
static void cli_submit_locked(kvf_store_t *st, cli_req_t *rq, kvf_buf_t *frame)
{
    do {
        rq->id = st->next_req_id++;
    } while (rq->id == 0 || cli_req_find_locked(st, rq->id));
    kvf__put_le32(frame->data + 8, rq->id);
    rq->next = st->reqs[rq->id % CLI_REQ_BUCKETS];
    st->reqs[rq->id % CLI_REQ_BUCKETS] = rq;
    cli_send_locked(st, frame->data, frame->len);
}

/* Send a request owned by the I/O thread, whose answer nobody waits for. Consumes @frame.
 * It joins the list of internal requests that must be answered within request_timeout_ms. */
static void cli_send_internal_locked(kvf_store_t *st, cli_req_t *rq, kvf_buf_t *frame)
{
    cli_submit_locked(st, rq, frame);
    if (rq->restore)
        st->restore_pending++;
    rq->sent_ms = kvf__now_ms();
    rq->io_next = NULL;
    rq->io_prev = st->io_tail;
    if (st->io_tail)
        st->io_tail->io_next = rq;
    else
        st->io_head = rq;
    st->io_tail = rq;
    kvf__buf_free(frame);
}

static void cli_io_unlink_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->io_prev)
        rq->io_prev->io_next = rq->io_next;
    else if (st->io_head == rq)
        st->io_head = rq->io_next;
    if (rq->io_next)
        rq->io_next->io_prev = rq->io_prev;
    else if (st->io_tail == rq)
        st->io_tail = rq->io_prev;
    rq->io_prev = rq->io_next = NULL;
}

/* Fire-and-forget request with a u64 body: used for revoking or unwatching server ids that
 * nobody owns any more. Failure only costs a lease that expires or a watch whose events are
 * ignored, so it is logged, not reported. */
static void cli_send_u64_locked(kvf_store_t *st, uint8_t op, uint64_t v)
{
    kvf_buf_t f;
    cli_req_t *rq = cli_req_new(op, CLI_OWNER_IO);
    if (!rq || cli_frame_u64(&f, op, v) < 0) {
        if (rq)
            kvf__buf_free(&f);
        free(rq);
        KVF_WARN("store", "%s: out of memory sending opcode %u for server id %" PRIu64, st->url,
                 op, v);
        return;
    }
    cli_send_internal_locked(st, rq, &f);
}

static void cli_send_grant_locked(kvf_store_t *st, cli_lease_t *l, bool restore)
{
    kvf_buf_t f;
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_LEASE_GRANT, CLI_OWNER_IO);
    cli_frame_begin(&f, KVF_STORE_OP_LEASE_GRANT);
    kvf__buf_put_u32(&f, l->ttl_ms);
    if (!rq || cli_frame_end(&f) < 0) {
        kvf__buf_free(&f);
        free(rq);
        KVF_WARN("store", "%s: out of memory re-granting lease %" PRIu64, st->url, l->cid);
        l->state = CLI_LEASE_NEED_GRANT;
        l->due_ms = kvf__now_ms() + CLI_REGRANT_RETRY_MS;
        return;
    }
    rq->lease_cid = l->cid;
    rq->restore = restore;
    l->state = CLI_LEASE_REGRANTING;
    cli_send_internal_locked(st, rq, &f);
    /* A re-grant on a live connection holds user requests back, as after a reconnect, until it
     * is answered and the keys are re-published: otherwise a user's set or delete of one of
     * those keys, sent after the grant but before its answer, would be overwritten by the
     * re-published old value. */
    if (restore && st->state == CLI_READY)
        st->state = CLI_RESTORING;
}

static void cli_send_keepalive_locked(kvf_store_t *st, cli_lease_t *l)
{
    kvf_buf_t f;
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_LEASE_KEEPALIVE, CLI_OWNER_IO);
    if (!rq || cli_frame_u64(&f, KVF_STORE_OP_LEASE_KEEPALIVE, l->sid) < 0) {
        if (rq)
            kvf__buf_free(&f);
        free(rq);
        KVF_WARN("store", "%s: out of memory sending a keep-alive for lease %" PRIu64, st->url,
                 l->cid);
        return;
    }
    rq->lease_cid = l->cid;
    rq->lease_sid = l->sid;
    cli_send_internal_locked(st, rq, &f);
}

static void cli_send_watch_locked(kvf_store_t *st, cli_watch_t *w)
{
    kvf_buf_t f;
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_WATCH, CLI_OWNER_IO);
    cli_frame_begin(&f, KVF_STORE_OP_WATCH);
    kvf__buf_put_blob(&f, w->prefix, w->prefix_len);
    if (!rq || cli_frame_end(&f) < 0) {
        kvf__buf_free(&f);
        free(rq);
        KVF_WARN("store", "%s: out of memory re-registering watch %" PRIu64, st->url, w->cid);
        return;
    }
    rq->watch_cid = w->cid;
    rq->restore = true;
    cli_send_internal_locked(st, rq, &f);
}

/* The store has a fresh lease for @l: put back every key this client set under it. */
static void cli_republish_locked(kvf_store_t *st, cli_lease_t *l)
{
    for (cli_key_t *k = l->keys; k; k = k->next) {
        kvf_buf_t f;
        cli_req_t *rq = cli_req_new(KVF_STORE_OP_SET, CLI_OWNER_IO);
        if (!rq || cli_frame_set(&f, k->key, strlen(k->key), k->val, k->len, l->sid) < 0) {
            if (rq)
                kvf__buf_free(&f);
            free(rq);
            KVF_WARN("store", "%s: out of memory re-publishing a key of lease %" PRIu64, st->url,
                     l->cid);
            continue;
        }
        rq->lease_cid = l->cid;
        cli_send_internal_locked(st, rq, &f);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Connection state (I/O thread, or kvf_store_open() before the thread exists)
 * ------------------------------------------------------------------------------------------- */

static void cli_conn_up_locked(kvf_store_t *st, int fd)
{
    st->fd = fd;
    st->state = CLI_RESTORING;
    st->broken = false;
    st->conn_gen++;
    st->restore_pending = 0;
    st->last_io_ms = kvf__now_ms();
    for (cli_lease_t *l = st->leases; l; l = l->next)
        if (l->state == CLI_LEASE_NEED_GRANT)
            cli_send_grant_locked(st, l, true);
    for (cli_watch_t *w = st->watches; w; w = w->next)
        if (w->active)
            cli_send_watch_locked(st, w);
    if (st->restore_pending == 0)
        st->state = CLI_READY;
    pthread_cond_broadcast(&st->cond);
}

/* Close the connection and fail every request in flight with @err / @why. */
static void cli_conn_down_locked(kvf_store_t *st, int err, const char *why)
{
    if (st->fd >= 0) {
        close(st->fd);
        st->fd = -1;
    }
    st->state = CLI_DOWN;
    st->broken = false;
    st->restore_pending = 0;
    st->io_head = st->io_tail = NULL; /* freed with the table below */
    st->probe_wanted = false;
    st->out.len = 0;
    st->out_off = 0;
    if (st->out.cap > CLI_BUF_KEEP_MAX)
        kvf__buf_free(&st->out);
    st->rx.len = 0;
    if (st->rx.cap > CLI_BUF_KEEP_MAX)
        kvf__buf_free(&st->rx);

    for (unsigned b = 0; b < CLI_REQ_BUCKETS; b++) {
        while (st->reqs[b]) {
            cli_req_t *rq = st->reqs[b];
            st->reqs[b] = rq->next;
            rq->next = NULL;
            if (rq->owner == CLI_OWNER_CALLER) {
                rq->err = err;
                snprintf(rq->msg, sizeof(rq->msg), "%s", why);
                rq->done = true;
                pthread_cond_signal(&rq->cond);
            } else {
                cli_req_free(rq);
            }
        }
    }
    /* Server ids die with the connection. Stopped leases are left to expire; the others are
     * re-granted by cli_conn_up_locked(). GRANTING leases belong to a caller who is being told
     * its grant failed and removes them. */
    for (cli_watch_t *w = st->watches; w; w = w->next)
        w->sid = 0;
    for (cli_lease_t **pp = &st->leases; *pp;) {
        cli_lease_t *l = *pp;
        if (l->state == CLI_LEASE_STOPPED) {
            *pp = l->next;
            cli_lease_free(l);
            continue;
        }
        if (l->state != CLI_LEASE_GRANTING) {
            l->state = CLI_LEASE_NEED_GRANT;
            l->sid = 0;
            l->due_ms = 0;
        }
        pp = &l->next;
    }
    pthread_cond_broadcast(&st->cond);
}

/*
 * Let the kernel notice a store host that vanished without FIN or RST: data unacknowledged for
 * request_timeout_ms (at least CLI_TCP_USER_TIMEOUT_MIN_MS, so that one lost segment on a slow
 * link does not kill the connection) aborts it, and an idle connection is probed with TCP
 * keep-alives after about the same time. Requests and keep-alives left unanswered on a
 * connection the kernel still thinks fine are caught by cli_check_alive_locked(). Failures are
 * not fatal: these only speed up detection.
 */
static void cli_set_dead_peer_opts(const kvf_store_t *st, int fd)
{
    uint32_t rt = st->opts.request_timeout_ms;
    int one = 1;
    unsigned user_timeout = rt > CLI_TCP_USER_TIMEOUT_MIN_MS ? rt : CLI_TCP_USER_TIMEOUT_MIN_MS;
    int idle = (int)(user_timeout / 1000 > 0 ? (user_timeout / 1000 < 3600 ? user_timeout / 1000
                                                                          : 3600)
                                             : 1);
    int intvl = 1, cnt = 3;
    if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout)) < 0)
        KVF_DEBUG("store", "%s: setting TCP keep-alive options: %s", st->url,
                  kvf_strerror(-errno));
}

/* Connect to one resolved address within @deadline_ms. Returns the socket or a negative code;
 * -KVF_ECLOSED when @interruptible and the client is closing. */
static int cli_connect_addr(kvf_store_t *st, const struct addrinfo *ai, uint64_t deadline_ms,
                            bool interruptible, char *why, size_t whylen)
{
    char hp[KVF_SESSION_ID_MAX];
    kvf__hostport_format(&st->addr.hosts[0], hp, sizeof(hp));
    int rc = -KVF_ESTOREDOWN;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, whylen, "socket: %s", kvf_strerror(-errno));
        return rc;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS && errno != EINTR) {
            snprintf(why, whylen, "connect %.120s: %s", hp, kvf_strerror(-errno));
            goto out_close;
        }
        for (;;) {
            /* Poll at least once even at the deadline: a refusal may already be there, and it
             * says more than "no answer". */
            uint64_t now = kvf__now_ms();
            uint64_t left = deadline_ms > now ? deadline_ms - now : 0;
            struct pollfd p[2] = {{.fd = fd, .events = POLLOUT},
                                  {.fd = interruptible ? st->wake_fd : -1, .events = POLLIN}};
            int n = poll(p, 2, left > INT_MAX ? INT_MAX : (int)left);
            if (n < 0 && errno != EINTR) {
                snprintf(why, whylen, "poll: %s", kvf_strerror(-errno));
                goto out_close;
            }
            if (n == 0 && left == 0) {
                snprintf(why, whylen, "connect %.120s: no answer in time", hp);
                goto out_close;
            }
            if (n <= 0)
                continue;
            if (p[1].revents & POLLIN) {
                cli_drain_wake(st);
                if (cli_is_closing(st)) {
                    rc = -KVF_ECLOSED;
                    goto out_close;
                }
            }
            if (p[0].revents)
                break;
        }
        int err = 0;
        socklen_t elen = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
            err = errno;
        if (err) {
            snprintf(why, whylen, "connect %.120s: %s", hp, kvf_strerror(-err));
            goto out_close;
        }
    }
    /* Requests are small and latency-bound: never let Nagle hold one back. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    cli_set_dead_peer_opts(st, fd);
    return fd;

out_close:
    close(fd);
    return rc;
}

/* One attempt to connect to the store: resolve its host and try each address. */
static int cli_connect_once(kvf_store_t *st, uint64_t deadline_ms, bool interruptible, char *why,
                            size_t whylen)
{
    const kvf_hostport_t *hp = &st->addr.hosts[0];
    char port[8];
    snprintf(port, sizeof(port), "%u", (unsigned)hp->port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (hp->kind != KVF_HOST_NAME ? AI_NUMERICHOST : 0);
    struct addrinfo *res = NULL;
    int g = getaddrinfo(hp->host, port, &hints, &res);
    if (g != 0) {
        snprintf(why, whylen, "resolve %.120s: %s", hp->host,
                 g == EAI_SYSTEM ? kvf_strerror(-errno) : gai_strerror(g));
        return -KVF_ESTOREDOWN;
    }
    int rc = -KVF_ESTOREDOWN;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        rc = cli_connect_addr(st, ai, deadline_ms, interruptible, why, whylen);
        if (rc >= 0 || rc == -KVF_ECLOSED)
            break;
    }
    freeaddrinfo(res);
    return rc;
}

/* Sleep @ms on the wake eventfd; returns false when the client is closing. */
static bool cli_backoff_sleep(kvf_store_t *st, uint32_t ms)
{
    uint64_t deadline = kvf__now_ms() + ms;
    for (;;) {
        if (cli_is_closing(st))
            return false;
        uint64_t now = kvf__now_ms();
        if (now >= deadline)
            return true;
        struct pollfd p = {.fd = st->wake_fd, .events = POLLIN};
        if (poll(&p, 1, (int)(deadline - now)) > 0)
            cli_drain_wake(st);
    }
}

/* Reconnect with backoff until connected (returns the fd) or closing (returns -1). */
static int cli_reconnect(kvf_store_t *st)
{
    for (;;) {
        uint32_t wait = st->backoff_ms;
        st->backoff_ms = wait ? (wait * 2 > CLI_BACKOFF_MAX_MS ? CLI_BACKOFF_MAX_MS : wait * 2)
                              : CLI_BACKOFF_MIN_MS;
        if (wait && !cli_backoff_sleep(st, wait))
            return -1;
        char why[CLI_MSG_MAX];
        int fd = cli_connect_once(st, kvf__now_ms() + CLI_ATTEMPT_MAX_MS, true, why, sizeof(why));
        if (fd >= 0)
            return fd;
        if (fd == -KVF_ECLOSED)
            return -1;
        KVF_DEBUG("store", "%s: reconnect failed: %s (next try in %u ms)", st->url, why,
                  st->backoff_ms);
        pthread_mutex_lock(&st->mu);
        snprintf(st->last_conn_err, sizeof(st->last_conn_err), "%s", why);
        pthread_mutex_unlock(&st->mu);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Receiving (I/O thread)
 * ------------------------------------------------------------------------------------------- */

static char *cli_dup_nul(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);
    if (!s)
        return NULL;
    if (n)
        memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

/* Decode an answer body into @rq. Returns 0, or -KVF_EPROTO with @why when the body breaks the
 * protocol (the connection is then dropped). Runs without the lock: until @rq is marked done only
 * the I/O thread touches these fields. */
static int cli_decode_answer(cli_req_t *rq, uint16_t status, const uint8_t *body, size_t n,
                             char *why, size_t whylen)
{
    kvf_rd_t r;
    kvf__rd_init(&r, body, n);
    const uint8_t *p;
    size_t len;

    if (status != KVF_STORE_ST_OK) {
        if (!kvf__rd_blob(&r, n, &p, &len) || r.left) {
            snprintf(why, whylen, "error answer (status %u) to opcode %u is not one blob", status,
                     rq->op);
            return -KVF_EPROTO;
        }
        kvf__printable(rq->msg, sizeof(rq->msg), p, len);
        rq->err = kvf__store_status_to_err(status);
        return 0;
    }

    switch (rq->op) {
    case KVF_STORE_OP_GET:
        if (!kvf__rd_blob(&r, KVF_STORE_MAX_VALUE_LEN, &p, &len))
            break;
        if (r.left)
            break;
        rq->val = (uint8_t *)cli_dup_nul(p, len);
        rq->val_len = len;
        if (!rq->val) {
            rq->err = -KVF_ENOMEM;
            snprintf(rq->msg, sizeof(rq->msg), "out of memory for a %zu-byte value", len);
        }
        return 0;
    case KVF_STORE_OP_ADD:
    case KVF_STORE_OP_WATCH:
    case KVF_STORE_OP_LEASE_GRANT:
        if (!kvf__rd_u64(&r, &rq->u64) || r.left)
            break;
        if (rq->op != KVF_STORE_OP_ADD && rq->u64 == 0) {
            snprintf(why, whylen, "server id 0 in the answer to opcode %u", rq->op);
            return -KVF_EPROTO;
        }
        return 0;
    case KVF_STORE_OP_LIST: {
        uint32_t count;
        if (!kvf__rd_u32(&r, &count))
            break;
        /* Each pair takes at least 8 bytes: bound the count before allocating for it. */
        if (count > KVF_STORE_MAX_LIST_KEYS || count > r.left / 8) {
            snprintf(why, whylen, "list answer claims %u pairs in %zu bytes", count, r.left);
            return -KVF_EPROTO;
        }
        rq->kvs = calloc(count ? count : 1, sizeof(*rq->kvs));
        if (!rq->kvs)
            goto out_nomem;
        for (uint32_t i = 0; i < count; i++) {
            const uint8_t *kp, *vp;
            size_t klen, vlen;
            if (!kvf__rd_blob(&r, KVF_STORE_MAX_KEY_LEN, &kp, &klen) ||
                !kvf__rd_blob(&r, KVF_STORE_MAX_VALUE_LEN, &vp, &vlen))
                break;
            kvf_store_kv_t *kv = &rq->kvs[rq->nkvs++];
            kv->key = cli_dup_nul(kp, klen);
            kv->val = cli_dup_nul(vp, vlen);
            kv->val_len = vlen;
            if (!kv->key || !kv->val)
                goto out_nomem;
        }
        if (r.bad || r.left)
            break;
        return 0;
    }
    default: /* every other answer has an empty body */
        if (n == 0)
            return 0;
        break;
    }
    snprintf(why, whylen, "answer to opcode %u: malformed %zu-byte body", rq->op, n);
    kvf_store_kv_free(rq->kvs, rq->nkvs);
    rq->kvs = NULL;
    rq->nkvs = 0;
    return -KVF_EPROTO;

out_nomem:
    kvf_store_kv_free(rq->kvs, rq->nkvs);
    rq->kvs = NULL;
    rq->nkvs = 0;
    rq->err = -KVF_ENOMEM;
    snprintf(rq->msg, sizeof(rq->msg), "out of memory decoding a list answer");
    return 0;
}

/* Keep the lease and watch tables in step with an answer that just arrived. */
static void cli_apply_answer_locked(kvf_store_t *st, cli_req_t *rq)
{
    cli_lease_t *l;
    switch (rq->op) {
    case KVF_STORE_OP_SET:
    case KVF_STORE_OP_CAS:
        if (rq->err < 0) {
            if (rq->owner == CLI_OWNER_IO)
                KVF_WARN("store", "%s: re-publishing a key of lease %" PRIu64 " failed: %s (%s)",
                         st->url, rq->lease_cid, kvf_strerror(rq->err), rq->msg);
            break;
        }
        if (!rq->key)
            break; /* a re-publication: the key is already tracked */
        cli_forget_key_locked(st, rq->key);
        l = rq->lease_cid ? cli_lease_find_locked(st, rq->lease_cid) : NULL;
        if (l) {
            cli_key_t *k = calloc(1, sizeof(*k));
            if (!k) {
                KVF_WARN("store", "%s: out of memory: a key of lease %" PRIu64
                         " will not be re-published", st->url, l->cid);
                break;
            }
            k->key = rq->key;
            k->val = rq->rec_val;
            k->len = rq->rec_len;
            rq->key = NULL;
            rq->rec_val = NULL;
            k->next = l->keys;
            l->keys = k;
        }
        break;
    case KVF_STORE_OP_DEL:
        if ((rq->err == 0 || rq->err == -KVF_ENOTFOUND) && rq->key)
            cli_forget_key_locked(st, rq->key);
        break;
    case KVF_STORE_OP_LEASE_GRANT:
        l = cli_lease_find_locked(st, rq->lease_cid);
        if (rq->err == 0) {
            if (l && (l->state == CLI_LEASE_GRANTING || l->state == CLI_LEASE_REGRANTING)) {
                bool regrant = l->state == CLI_LEASE_REGRANTING;
                l->sid = rq->u64;
                l->state = CLI_LEASE_LIVE;
                l->lost = false;
                l->due_ms = kvf__now_ms() + cli_keepalive_interval(l);
                if (regrant) {
                    KVF_INFO("store", "%s: lease %" PRIu64 " re-granted", st->url, l->cid);
                    cli_republish_locked(st, l);
                }
                pthread_cond_broadcast(&st->cond);
            } else {
                /* Its caller gave up, or it was revoked meanwhile: nobody will keep it. */
                cli_send_u64_locked(st, KVF_STORE_OP_LEASE_REVOKE, rq->u64);
            }
        } else if (l && l->state == CLI_LEASE_REGRANTING) {
            KVF_WARN("store", "%s: re-granting lease %" PRIu64 " failed: %s (%s); retrying",
                     st->url, l->cid, kvf_strerror(rq->err), rq->msg);
            l->state = CLI_LEASE_NEED_GRANT;
            l->due_ms = kvf__now_ms() + CLI_REGRANT_RETRY_MS;
        }
        break;
    case KVF_STORE_OP_LEASE_KEEPALIVE:
        l = cli_lease_find_locked(st, rq->lease_cid);
        if (rq->err == -KVF_ENOTFOUND && l && l->state == CLI_LEASE_LIVE &&
            l->sid == rq->lease_sid) {
            KVF_INFO("store", "%s: the store lost lease %" PRIu64 "; re-granting it", st->url,
                     l->cid);
            l->state = CLI_LEASE_NEED_GRANT;
            l->sid = 0;
            l->due_ms = 0;
            l->lost = true;
            cli_wake(st); /* the timer pass re-grants it */
        } else if (rq->err < 0) {
            KVF_DEBUG("store", "%s: keep-alive of lease %" PRIu64 ": %s", st->url, rq->lease_cid,
                      kvf_strerror(rq->err));
        }
        break;
    case KVF_STORE_OP_WATCH: {
        cli_watch_t *w = NULL;
        for (w = st->watches; w && w->cid != rq->watch_cid; w = w->next)
            ;
        if (rq->err == 0) {
            if (w && w->sid == 0) {
                w->sid = rq->u64;
                w->active = true;
            } else {
                cli_send_u64_locked(st, KVF_STORE_OP_UNWATCH, rq->u64);
            }
        } else if (w && w->active) {
            char shown[80];
            KVF_WARN("store", "%s: re-registering the watch on \"%s\" failed: %s (%s)", st->url,
                     cli_show(shown, sizeof(shown), w->prefix, w->prefix_len),
                     kvf_strerror(rq->err), rq->msg);
        }
        break;
    }
    default:
        break;
    }
}

static void cli_complete_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->restore && st->restore_pending > 0 && --st->restore_pending == 0 &&
        st->state == CLI_RESTORING) {
        st->state = CLI_READY;
        pthread_cond_broadcast(&st->cond);
    }
    if (rq->owner == CLI_OWNER_CALLER) {
        rq->done = true;
        pthread_cond_signal(&rq->cond);
    } else {
        if (rq->owner == CLI_OWNER_IO)
            cli_io_unlink_locked(st, rq);
        cli_req_free(rq);
    }
}

static int cli_on_answer(kvf_store_t *st, uint8_t op, uint16_t status, uint32_t id,
                         const uint8_t *body, size_t n, char *why, size_t whylen)
{
    pthread_mutex_lock(&st->mu);
    cli_req_t *rq = id ? cli_req_find_locked(st, id) : NULL;
    pthread_mutex_unlock(&st->mu);
    /* Only this thread completes or frees requests in the table, so @rq stays valid. */
    if (!rq) {
        snprintf(why, whylen, "answer (opcode %u) to unknown request id %u", op, id);
        return -KVF_EPROTO;
    }
    if (rq->op != op) {
        snprintf(why, whylen, "answer to request %u has opcode %u, sent %u", id, op, rq->op);
        return -KVF_EPROTO;
    }
    if (status > KVF_STORE_ST_SHUTTING_DOWN) {
        snprintf(why, whylen, "answer to request %u has unknown status %u", id, status);
        return -KVF_EPROTO;
    }
    int rc = cli_decode_answer(rq, status, body, n, why, whylen);
    if (rc < 0)
        return rc; /* still in the table: failed with the connection */
    pthread_mutex_lock(&st->mu);
    cli_req_unlink_locked(st, rq);
    cli_apply_answer_locked(st, rq);
    cli_complete_locked(st, rq);
    pthread_mutex_unlock(&st->mu);
    return 0;
}

static int cli_on_event(kvf_store_t *st, uint16_t status, uint32_t id, const uint8_t *body,
                        size_t n, char *why, size_t whylen)
{
    kvf_rd_t r;
    uint64_t wid;
    uint8_t type;
    const uint8_t *kp, *vp;
    size_t klen, vlen;
    kvf__rd_init(&r, body, n);
    if (id != 0 || status != 0) {
        snprintf(why, whylen, "event frame with req_id %u, status %u", id, status);
        return -KVF_EPROTO;
    }
    if (!kvf__rd_u64(&r, &wid) || !kvf__rd_u8(&r, &type) ||
        !kvf__rd_blob(&r, KVF_STORE_MAX_KEY_LEN, &kp, &klen) ||
        !kvf__rd_blob(&r, KVF_STORE_MAX_VALUE_LEN, &vp, &vlen) || r.left ||
        (type != KVF_STORE_EVENT_PUT && type != KVF_STORE_EVENT_DELETE) || klen == 0) {
        snprintf(why, whylen, "malformed %zu-byte event", n);
        return -KVF_EPROTO;
    }

    pthread_mutex_lock(&st->mu);
    cli_watch_t *w;
    for (w = st->watches; w && !(w->active && w->sid == wid); w = w->next)
        ;
    if (!w) {
        /* A watch just unwatched, or abandoned by its caller: events may precede the answer. */
        pthread_mutex_unlock(&st->mu);
        return 0;
    }
    kvf_store_watch_cb cb = w->cb;
    void *arg = w->arg;
    /* kvf_store_unwatch() waits while this is set, so the callback never outlives the watch. */
    st->cb_watch_cid = w->cid;
    pthread_mutex_unlock(&st->mu);

    kvf_store_kv_t kv = {.key = cli_dup_nul(kp, klen), .val = NULL, .val_len = 0};
    if (type == KVF_STORE_EVENT_PUT) {
        kv.val = cli_dup_nul(vp, vlen);
        kv.val_len = vlen;
    }
    if (!kv.key || (type == KVF_STORE_EVENT_PUT && !kv.val))
        KVF_WARN("store", "%s: out of memory delivering a %zu-byte watch event; dropped", st->url,
                 vlen);
    else
        cb(arg, (kvf_store_event_type_t)type, &kv);
    free(kv.key);
    free(kv.val);

    pthread_mutex_lock(&st->mu);
    st->cb_watch_cid = 0;
    pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->mu);
    return 0;
}

/* Handle every complete frame in rx. Returns 0 or a negative code with @why. */
static int cli_process_input(kvf_store_t *st, char *why, size_t whylen)
{
    size_t off = 0;
    int rc = 0;
    while (st->rx.len - off >= KVF_STORE_HDR_LEN) {
        const uint8_t *h = st->rx.data + off;
        uint32_t magic = kvf__get_le32(h);
        uint8_t version = h[4], op = h[5];
        uint16_t status = kvf__get_le16(h + 6);
        uint32_t id = kvf__get_le32(h + 8), blen = kvf__get_le32(h + 12);
        if (magic != KVF_STORE_MAGIC || version != KVF_STORE_PROTO_VERSION) {
            snprintf(why, whylen, "bad frame header (magic 0x%08x, version %u)", magic, version);
            rc = -KVF_EPROTO;
            break;
        }
        if (blen > KVF_STORE_MAX_FRAME_LEN) {
            snprintf(why, whylen, "frame body of %u bytes exceeds the %u-byte limit", blen,
                     KVF_STORE_MAX_FRAME_LEN);
            rc = -KVF_EPROTO;
            break;
        }
        if (st->rx.len - off - KVF_STORE_HDR_LEN < blen)
            break;
        const uint8_t *body = h + KVF_STORE_HDR_LEN;
        if (op == KVF_STORE_OP_EVENT)
            rc = cli_on_event(st, status, id, body, blen, why, whylen);
        else
            rc = cli_on_answer(st, op, status, id, body, blen, why, whylen);
        if (rc < 0)
            break;
        st->backoff_ms = 0; /* a store that answers properly resets the reconnect backoff */
        off += KVF_STORE_HDR_LEN + blen;
    }
    /* Only compact after consuming a frame, so a large frame arriving in pieces is not moved
     * again on every read. */
    if (off)
        kvf__buf_consume(&st->rx, off);
    if (st->rx.len == 0 && st->rx.cap > CLI_BUF_KEEP_MAX)
        kvf__buf_free(&st->rx);
    return rc;
}

/* Read what the socket has and handle it. Returns 0 or a negative code with @why. */
static int cli_read_input(kvf_store_t *st, char *why, size_t whylen)
{
    for (int round = 0; round < CLI_READ_ROUNDS; round++) {
        size_t want = CLI_READ_CHUNK;
        if (st->rx.len >= KVF_STORE_HDR_LEN) {
            /* The header was validated when it arrived; read the rest of this frame at once. */
            size_t total = KVF_STORE_HDR_LEN + kvf__get_le32(st->rx.data + 12);
            if (total > st->rx.len && total - st->rx.len > want)
                want = total - st->rx.len;
        }
        uint8_t *p = kvf__buf_reserve(&st->rx, want);
        if (!p) {
            snprintf(why, whylen, "out of memory for %zu bytes of input", want);
            return -KVF_ENOMEM;
        }
        ssize_t n = recv(st->fd, p, want, MSG_DONTWAIT);
        if (n == 0) {
            snprintf(why, whylen, "the server closed the connection");
            return -KVF_ESTOREDOWN;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            snprintf(why, whylen, "recv: %s", kvf_strerror(-errno));
            return -KVF_ESTOREDOWN;
        }
        st->rx.len += (size_t)n;
        st->last_io_ms = kvf__now_ms();
        int rc = cli_process_input(st, why, whylen);
        if (rc < 0)
            return rc;
        if ((size_t)n < want)
            return 0;
    }
    return 0;
}

/* Flush queued output as far as the socket takes it. */
static void cli_flush_locked(kvf_store_t *st)
{
    while (st->out_off < st->out.len && !st->broken) {
        ssize_t w = send(st->fd, st->out.data + st->out_off, st->out.len - st->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            char why[CLI_MSG_MAX];
            snprintf(why, sizeof(why), "send: %s", kvf_strerror(-errno));
            cli_mark_broken_locked(st, why);
            return;
        }
        st->out_off += (size_t)w;
    }
    if (st->out_off == st->out.len) {
        st->out.len = 0;
        st->out_off = 0;
        st->last_io_ms = kvf__now_ms();
        if (st->out.cap > CLI_BUF_KEEP_MAX)
            kvf__buf_free(&st->out);
    } else if (st->out_off > st->out.len / 2) {
        kvf__buf_consume(&st->out, st->out_off);
        st->out_off = 0;
    }
}

/* A PING whose only purpose is to learn whether the store still answers. */
static void cli_send_probe_locked(kvf_store_t *st)
{
    kvf_buf_t f;
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_PING, CLI_OWNER_IO);
    cli_frame_begin(&f, KVF_STORE_OP_PING);
    if (!rq || cli_frame_end(&f) < 0) {
        kvf__buf_free(&f);
        free(rq);
        return; /* the next timed-out request asks again */
    }
    cli_send_internal_locked(st, rq, &f);
}

/* Drop the connection when the oldest internal request has gone unanswered for
 * request_timeout_ms. Time spent with output still queued does not count (the kernel's
 * TCP_USER_TIMEOUT covers a peer that stops acknowledging), nor does time before the last input
 * (a large answer may still be arriving). Returns the ms until the check is due, or UINT64_MAX. */
static uint64_t cli_check_alive_locked(kvf_store_t *st, uint64_t now)
{
    if (st->probe_wanted) {
        st->probe_wanted = false;
        if (!st->io_head)
            cli_send_probe_locked(st); /* otherwise the request in flight serves as the probe */
    }
    cli_req_t *rq = st->io_head;
    if (!rq || st->broken || st->out_off < st->out.len)
        return UINT64_MAX;
    uint64_t since = rq->sent_ms > st->last_io_ms ? rq->sent_ms : st->last_io_ms;
    uint64_t due = since + st->opts.request_timeout_ms;
    if (now < due)
        return due - now;
    char why[CLI_MSG_MAX];
    snprintf(why, sizeof(why), "no answer to an internal request (opcode %u) within %u ms",
             rq->op, st->opts.request_timeout_ms);
    cli_mark_broken_locked(st, why);
    return UINT64_MAX;
}

/* Send due keep-alives and re-grants, and check that the store still answers. Returns the poll
 * timeout until the next timer (-1: none). */
static int cli_run_timers_locked(kvf_store_t *st)
{
    if (st->state == CLI_DOWN)
        return -1;
    uint64_t now = kvf__now_ms();
    uint64_t next = UINT64_MAX;
    for (cli_lease_t *l = st->leases; l; l = l->next) {
        if (l->state != CLI_LEASE_LIVE && l->state != CLI_LEASE_NEED_GRANT)
            continue;
        if (now >= l->due_ms) {
            if (l->state == CLI_LEASE_NEED_GRANT) {
                cli_send_grant_locked(st, l, true);
                continue;
            }
            cli_send_keepalive_locked(st, l);
            l->due_ms = now + cli_keepalive_interval(l);
        }
        if (l->due_ms - now < next)
            next = l->due_ms - now;
    }
    uint64_t alive = cli_check_alive_locked(st, now);
    if (alive < next)
        next = alive;
    if (next == UINT64_MAX)
        return -1;
    return next > INT_MAX ? INT_MAX : (int)next;
}

static void *cli_io_main(void *arg)
{
    kvf_store_t *st = arg;
    char why[CLI_MSG_MAX];

    pthread_mutex_lock(&st->mu);
    while (!st->closing) {
        if (st->fd < 0) {
            pthread_mutex_unlock(&st->mu);
            int fd = cli_reconnect(st);
            pthread_mutex_lock(&st->mu);
            if (fd < 0)
                continue; /* closing */
            if (st->closing) {
                close(fd);
                break;
            }
            KVF_INFO("store", "%s: reconnected", st->url);
            cli_conn_up_locked(st, fd);
            continue;
        }
        if (st->broken) {
            snprintf(why, sizeof(why), "%s", st->broken_why);
            KVF_WARN("store", "%s: connection lost: %s; reconnecting", st->url, why);
            char msg[CLI_MSG_MAX];
            snprintf(msg, sizeof(msg), "the store connection was lost (%.200s)", why);
            cli_conn_down_locked(st, -KVF_ESTOREDOWN, msg);
            continue;
        }
        int timeout = cli_run_timers_locked(st);
        struct pollfd p[2] = {
            {.fd = st->fd, .events = (short)(POLLIN | (st->out.len > st->out_off ? POLLOUT : 0))},
            {.fd = st->wake_fd, .events = POLLIN},
        };
        pthread_mutex_unlock(&st->mu);

        int n = poll(p, 2, timeout);
        int rc = 0;
        if (n < 0 && errno != EINTR) {
            snprintf(why, sizeof(why), "poll: %s", kvf_strerror(-errno));
            rc = -KVF_ESTOREDOWN;
        }
        if (n > 0 && (p[1].revents & POLLIN))
            cli_drain_wake(st);
        if (n > 0 && (p[0].revents & POLLOUT)) {
            pthread_mutex_lock(&st->mu);
            cli_flush_locked(st);
            pthread_mutex_unlock(&st->mu);
        }
        if (rc == 0 && n > 0 && (p[0].revents & (POLLIN | POLLHUP | POLLERR)))
            rc = cli_read_input(st, why, sizeof(why));

        pthread_mutex_lock(&st->mu);
        if (rc < 0) {
            char msg[CLI_MSG_MAX + 64];
            if (rc == -KVF_EPROTO) {
                KVF_WARN("store", "%s: protocol error from the store: %s; reconnecting", st->url,
                         why);
                snprintf(msg, sizeof(msg), "protocol error from the store (%.200s)", why);
            } else {
                KVF_WARN("store", "%s: connection lost: %s; reconnecting", st->url, why);
                snprintf(msg, sizeof(msg), "the store connection was lost (%.200s)", why);
            }
            cli_conn_down_locked(st, rc == -KVF_EPROTO ? -KVF_EPROTO : -KVF_ESTOREDOWN, msg);
        }
    }
    cli_conn_down_locked(st, -KVF_ECLOSED, "the client was closed");
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Calls
 * ------------------------------------------------------------------------------------------- */

/* The user's grant or watch failed: drop the entry it created (the answer, if it still comes,
 * finds nothing and the I/O thread revokes or unwatches what the store created). */
static void cli_drop_entries_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->op == KVF_STORE_OP_LEASE_GRANT && rq->lease_cid) {
        cli_lease_t *l = cli_lease_find_locked(st, rq->lease_cid);
        if (l && l->state == CLI_LEASE_GRANTING)
            cli_lease_free(cli_lease_unlink_locked(st, rq->lease_cid));
    } else if (rq->op == KVF_STORE_OP_WATCH && rq->watch_cid) {
        cli_watch_t *w;
        for (w = st->watches; w && w->cid != rq->watch_cid; w = w->next)
            ;
        if (w && !w->active)
            cli_watch_free(cli_watch_unlink_locked(st, rq->watch_cid));
    }
}

/* Link the entry a user's grant or watch creates, just before the request goes out, so that
 * the I/O thread finds it when the answer arrives. */
static void cli_link_entries_locked(kvf_store_t *st, cli_req_t *rq)
{
    if (rq->new_lease) {
        rq->new_lease->cid = ++st->next_lease_cid;
        rq->lease_cid = rq->new_lease->cid;
        rq->new_lease->next = st->leases;
        st->leases = rq->new_lease;
        rq->new_lease = NULL;
    }
    if (rq->new_watch) {
        rq->new_watch->cid = ++st->next_watch_cid;
        rq->watch_cid = rq->new_watch->cid;
        rq->new_watch->next = st->watches;
        st->watches = rq->new_watch;
        rq->new_watch = NULL;
    }
}

/*
 * Send @frame as the request @*rqp and wait for its answer, at most @timeout_ms in all (waiting
 * for a reconnection included). @wait_connect false fails at once when disconnected.
 * On success the results are in *rqp, which the caller frees. On failure the last-error message
 * is set ("store URL: WHAT: reason"); if the request was abandoned *rqp is set to NULL, as the
 * I/O thread now owns it.
 */
static int cli_call(kvf_store_t *st, cli_req_t **rqp, kvf_buf_t *frame, uint64_t timeout_ms,
                    bool wait_connect, const char *what)
{
    cli_req_t *rq = *rqp;
    uint64_t start = kvf__now_ms();
    uint64_t deadline = start + timeout_ms;
    struct timespec ts;
    int rc = 0;

    kvf__deadline_ts(&ts, deadline);
    pthread_mutex_lock(&st->mu);
    if (st->closing) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ECLOSED, "store %s: %s: the client is closing", st->url, what);
    }
    st->active_calls++;

    /* Wait until the connection is ready and, for a set under a lease, the lease is granted on
     * it (it is re-granted after the store lost it). */
    for (;;) {
        if (st->closing) {
            rc = kvf__err(-KVF_ECLOSED, "store %s: %s: the client is closing", st->url, what);
            goto out_unlock;
        }
        if (st->state == CLI_READY && !st->broken) {
            if (rq->sid_gen && rq->sid_gen != st->conn_gen) {
                /* The server id is meaningless on this connection: it cannot be sent. */
                rc = kvf__err(-KVF_ESTOREDOWN,
                              "store %s: %s: the connection it was granted on was lost before "
                              "the request could be sent",
                              st->url, what);
                goto out_unlock;
            }
            if (!rq->lease_cid || rq->op == KVF_STORE_OP_LEASE_GRANT)
                break;
            cli_lease_t *l = cli_lease_find_locked(st, rq->lease_cid);
            if (!l) {
                rc = kvf__err(-KVF_ENOTFOUND,
                              "store %s: %s: lease %" PRIu64 " is not held by this client "
                              "(revoked, expired or never granted)",
                              st->url, what, rq->lease_cid);
                goto out_unlock;
            }
            if (l->state == CLI_LEASE_LIVE || l->state == CLI_LEASE_STOPPED) {
                kvf__put_le64(frame->data + frame->len - 8, l->sid);
                break;
            }
        } else if (!wait_connect && st->state == CLI_DOWN) {
            rc = kvf__err(-KVF_ESTOREDOWN, "store %s: %s: not connected to the store (%s)",
                          st->url, what, st->last_conn_err);
            goto out_unlock;
        }
        if (kvf__now_ms() >= deadline) {
            if (st->state != CLI_READY)
                rc = kvf__err(-KVF_ESTOREDOWN,
                              "store %s: %s: no connection to the store within %" PRIu64
                              " ms (%s)",
                              st->url, what, timeout_ms,
                              st->last_conn_err[0] ? st->last_conn_err : "connection lost");
            else
                rc = kvf__err(-KVF_ETIMEDOUT,
                              "store %s: %s: lease %" PRIu64 " was not re-granted within %" PRIu64
                              " ms",
                              st->url, what, rq->lease_cid, timeout_ms);
            goto out_unlock;
        }
        pthread_cond_timedwait(&st->cond, &st->mu, &ts);
    }

    cli_link_entries_locked(st, rq);
    cli_submit_locked(st, rq, frame);
    while (!rq->done) {
        if (pthread_cond_timedwait(&rq->cond, &st->mu, &ts) == ETIMEDOUT && !rq->done) {
            rq->owner = CLI_OWNER_ABANDONED;
            cli_drop_entries_locked(st, rq);
            /* The store may be gone without the connection knowing: have it probed. */
            st->probe_wanted = true;
            cli_wake(st);
            *rqp = NULL;
            rc = kvf__err(-KVF_ETIMEDOUT, "store %s: %s: timed out after %" PRIu64 " ms", st->url,
                          what, timeout_ms);
            goto out_unlock;
        }
    }
    rc = rq->err;
    if (rc < 0) {
        cli_drop_entries_locked(st, rq);
        rc = kvf__err(rc, "store %s: %s: %s", st->url, what,
                      rq->msg[0] ? rq->msg : kvf_strerror(rc));
    }

out_unlock:
    st->active_calls--;
    if (st->closing)
        pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static int cli_check_handle(const kvf_store_t *st, const char *op)
{
    if (!st)
        return kvf__err(-KVF_EINVAL, "store %s: the client handle is NULL", op);
    return 0;
}

/* Validate a key (or a prefix when @prefix) before anything reaches the wire. */
static int cli_check_key(const kvf_store_t *st, const char *op, const char *key, bool prefix)
{
    const char *noun = prefix ? "prefix" : "key";
    if (!key)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL", st->url, op, noun);
    size_t n = strlen(key);
    if (n == 0 && !prefix)
        return kvf__err(-KVF_EINVAL, "store %s: %s: key is empty", st->url, op);
    if (n > KVF_STORE_MAX_KEY_LEN) {
        char shown[80];
        return kvf__err(-KVF_ETOOBIG,
                        "store %s: %s \"%s\": %s of %zu bytes exceeds the %u-byte limit", st->url,
                        op, cli_show(shown, sizeof(shown), key, n), noun, n,
                        KVF_STORE_MAX_KEY_LEN);
    }
    return 0;
}

static int cli_check_value(const kvf_store_t *st, const char *what, const char *name,
                           const void *val, size_t len)
{
    if (!val && len)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL with length %zu", st->url, what,
                        name, len);
    if (len > KVF_STORE_MAX_VALUE_LEN)
        return kvf__err(-KVF_ETOOBIG, "store %s: %s: %s of %zu bytes exceeds the %u-byte limit",
                        st->url, what, name, len, KVF_STORE_MAX_VALUE_LEN);
    return 0;
}

static int cli_nomem(const kvf_store_t *st, const char *what)
{
    return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", st->url, what);
}

/* SET and CAS: encode, remember what to track under the lease, call. */
static int cli_put(kvf_store_t *st, const char *what, const char *key, bool cas,
                   const void *expected, size_t expected_len, const void *val, size_t len,
                   uint64_t lease)
{
    uint8_t op = cas ? KVF_STORE_OP_CAS : KVF_STORE_OP_SET;
    size_t klen = strlen(key);
    kvf_buf_t f;
    int rc = -KVF_ENOMEM;
    cli_req_t *rq = cli_req_new(op, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    if (cas) {
        cli_frame_begin(&f, op);
        kvf__buf_put_blob(&f, key, klen);
        kvf__buf_put_u8(&f, expected ? 1 : 0);
        kvf__buf_put_blob(&f, expected, expected ? expected_len : 0);
        kvf__buf_put_blob(&f, val, len);
        kvf__buf_put_u64(&f, 0); /* lease: filled in by cli_call() */
        rc = cli_frame_end(&f);
    } else {
        rc = cli_frame_set(&f, key, klen, val, len, 0);
    }
    if (rc < 0)
        goto out_nomem;
    rq->key = strdup(key);
    if (!rq->key)
        goto out_nomem;
    rq->lease_cid = lease;
    if (lease && len) {
        rq->rec_val = malloc(len);
        if (!rq->rec_val)
            goto out_nomem;
        memcpy(rq->rec_val, val, len);
        rq->rec_len = len;
    }
    rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    goto out_free;

out_nomem:
    rc = cli_nomem(st, what);
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Public API
 * ------------------------------------------------------------------------------------------- */

void kvf_store_opts_init(kvf_store_opts_t *opts)
{
    if (!opts)
        return;
    memset(opts, 0, sizeof(*opts));
    opts->size = sizeof(*opts);
    opts->connect_timeout_ms = CLI_DEFAULT_CONNECT_TIMEOUT_MS;
    opts->request_timeout_ms = CLI_DEFAULT_REQUEST_TIMEOUT_MS;
}

static void cli_free(kvf_store_t *st)
{
    while (st->leases) {
        cli_lease_t *l = st->leases;
        st->leases = l->next;
        cli_lease_free(l);
    }
    while (st->watches) {
        cli_watch_t *w = st->watches;
        st->watches = w->next;
        cli_watch_free(w);
    }
    kvf__buf_free(&st->out);
    kvf__buf_free(&st->rx);
    pthread_cond_destroy(&st->cond);
    pthread_mutex_destroy(&st->mu);
    close(st->wake_fd);
    free(st->url);
    free(st);
}

/* Connect for kvf_store_open(): retry with backoff until connect_timeout_ms has passed. */
static int cli_open_connect(kvf_store_t *st)
{
    uint64_t start = kvf__now_ms();
    uint32_t ct = st->opts.connect_timeout_ms;
    uint64_t deadline = start + ct;
    uint32_t backoff = CLI_BACKOFF_MIN_MS;
    char why[CLI_MSG_MAX] = "";
    for (;;) {
        /* With no connect timeout a single attempt is still bounded, by the request timeout. */
        uint64_t attempt_deadline = ct ? deadline : start + st->opts.request_timeout_ms;
        int fd = cli_connect_once(st, attempt_deadline, false, why, sizeof(why));
        if (fd >= 0)
            return fd;
        uint64_t now = kvf__now_ms();
        if (ct == 0 || now >= deadline)
            break;
        KVF_DEBUG("store", "%s: %s; retrying in %u ms", st->url, why, backoff);
        uint64_t nap = deadline - now < backoff ? deadline - now : backoff;
        struct timespec ts = {.tv_sec = (time_t)(nap / 1000),
                              .tv_nsec = (long)(nap % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
        backoff = backoff * 2 > CLI_BACKOFF_MAX_MS ? CLI_BACKOFF_MAX_MS : backoff * 2;
    }
    if (ct == 0)
        return kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect: %s", st->url, why);
    return kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect within %u ms: %s", st->url, ct,
                    why);
}

int kvf_store_open(const char *url, const kvf_store_opts_t *opts, kvf_store_t **out)
{
    kvf_store_opts_t o;
    kvf_store_url_t addr;
    int rc;

    if (!out)
        return kvf__err(-KVF_EINVAL, "store open: the output pointer is NULL");
    *out = NULL;
    if (!url)
        return kvf__err(-KVF_EINVAL, "store open: the URL is NULL");
    rc = kvf__store_url_parse(url, 0, &addr);
    if (rc < 0)
        return rc;
    if (addr.scheme != KVF_STORE_SCHEME_TCP)
        return kvf__err(-KVF_ENOTSUP,
                        "store %s: the %s backend is not built yet (only tcp:// is served)", url,
                        addr.scheme == KVF_STORE_SCHEME_ETCD ? "etcd" : "redis");
    kvf_store_opts_init(&o);
    if (opts) {
        if (opts->size < sizeof(opts->size) + sizeof(uint32_t) * 2 || opts->size > sizeof(o))
            return kvf__err(-KVF_EINVAL,
                            "store %s: opts.size is %zu; fill the options with "
                            "kvf_store_opts_init()",
                            url, opts->size);
        memcpy(&o, opts, opts->size);
        o.size = sizeof(o);
    }
    if (o.request_timeout_ms == 0)
        return kvf__err(-KVF_EINVAL, "store %s: request_timeout_ms is 0; it must be positive",
                        url);

    kvf_store_t *st = calloc(1, sizeof(*st));
    if (!st)
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    st->fd = -1;
    st->opts = o;
    st->addr = addr;
    st->next_req_id = 1;
    st->url = strdup(url);
    if (!st->url) {
        rc = kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
        goto out_free_st;
    }
    st->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (st->wake_fd < 0) {
        rc = kvf__err(-errno, "store %s: eventfd: %s", url, kvf_strerror(-errno));
        goto out_free_url;
    }
    pthread_mutex_init(&st->mu, NULL);
    rc = kvf__cond_init_monotonic(&st->cond);
    if (rc < 0) {
        rc = kvf__err(rc, "store %s: pthread_cond_init: %s", url, kvf_strerror(rc));
        goto out_close_wake;
    }

    int fd = cli_open_connect(st);
    if (fd < 0) {
        rc = fd;
        goto out_free_all;
    }
    pthread_mutex_lock(&st->mu);
    cli_conn_up_locked(st, fd);
    pthread_mutex_unlock(&st->mu);

    /* The I/O thread takes no signals: they belong to the application's threads. */
    rc = kvf__thread_start(&st->io, "kvf-store-io", 0, cli_io_main, st);
    if (rc < 0) {
        rc = kvf__err(rc, "store %s: cannot start the I/O thread: %s", url, kvf_strerror(rc));
        pthread_mutex_lock(&st->mu);
        cli_conn_down_locked(st, -KVF_ECLOSED, "the client was closed");
        pthread_mutex_unlock(&st->mu);
        goto out_free_all;
    }
    st->io_started = true;

    /* Something accepted the connection; make sure it is a store that answers. */
    rc = kvf_store_ping(st);
    if (rc < 0) {
        rc = kvf__err_wrap(-KVF_ESTOREDOWN, "store %s: the store does not answer", url);
        kvf_store_close(st);
        return rc;
    }
    KVF_DEBUG("store", "%s: connected", url);
    *out = st;
    return 0;

out_free_all:
    cli_free(st);
    return rc;
out_close_wake:
    pthread_mutex_destroy(&st->mu);
    close(st->wake_fd);
out_free_url:
    free(st->url);
out_free_st:
    free(st);
    return rc;
}

/* Revoke every live lease, all within CLI_CLOSE_REVOKE_MS, without waiting for a reconnection. */
static void cli_revoke_all(kvf_store_t *st)
{
    uint64_t deadline = kvf__now_ms() + CLI_CLOSE_REVOKE_MS;
    for (;;) {
        pthread_mutex_lock(&st->mu);
        cli_lease_t *l;
        for (l = st->leases; l && l->state != CLI_LEASE_LIVE; l = l->next)
            ;
        /* While a re-grant is being restored, cli_call() waits for it (within the deadline). */
        if (!l || st->state == CLI_DOWN) {
            pthread_mutex_unlock(&st->mu);
            return;
        }
        uint64_t sid = l->sid, cid = l->cid, gen = st->conn_gen;
        cli_lease_free(cli_lease_unlink_locked(st, cid));
        pthread_mutex_unlock(&st->mu);

        uint64_t now = kvf__now_ms();
        if (now >= deadline)
            return;
        char what[64];
        snprintf(what, sizeof(what), "lease revoke %" PRIu64, cid);
        kvf_buf_t f;
        cli_req_t *rq = cli_req_new(KVF_STORE_OP_LEASE_REVOKE, CLI_OWNER_CALLER);
        if (!rq)
            return;
        if (cli_frame_u64(&f, KVF_STORE_OP_LEASE_REVOKE, sid) < 0) {
            kvf__buf_free(&f);
            cli_req_free(rq);
            return;
        }
        rq->sid_gen = gen;
        if (cli_call(st, &rq, &f, deadline - now, false, what) < 0)
            KVF_DEBUG("store", "%s: on close: %s", st->url, kvf_last_error());
        kvf__buf_free(&f);
        cli_req_free(rq);
    }
}

void kvf_store_close(kvf_store_t *st)
{
    if (!st)
        return;
    if (cli_on_io_thread(st)) {
        KVF_ERROR("store", "%s: kvf_store_close() called from a watch callback; ignored",
                  st->url);
        return;
    }
    cli_revoke_all(st);
    pthread_mutex_lock(&st->mu);
    st->closing = true;
    pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->mu);
    cli_wake(st);
    pthread_join(st->io, NULL);
    /* The I/O thread failed every request on its way out; wait for their callers to leave. */
    pthread_mutex_lock(&st->mu);
    while (st->active_calls > 0)
        pthread_cond_wait(&st->cond, &st->mu);
    pthread_mutex_unlock(&st->mu);
    KVF_DEBUG("store", "%s: closed", st->url);
    cli_free(st);
}

const char *kvf_store_url(const kvf_store_t *st)
{
    return st ? st->url : "";
}

int kvf_store_set(kvf_store_t *st, const char *key, const void *val, size_t len, uint64_t lease)
{
    char what[CLI_WHAT_MAX];
    int rc = cli_check_handle(st, "set");
    if (rc == 0)
        rc = cli_check_key(st, "set", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "set", key);
    rc = cli_check_value(st, what, "value", val, len);
    if (rc < 0)
        return rc;
    return cli_put(st, what, key, false, NULL, 0, val, len, lease);
}

int kvf_store_cas(kvf_store_t *st, const char *key, const void *expected, size_t expected_len,
                  const void *val, size_t len, uint64_t lease)
{
    char what[CLI_WHAT_MAX];
    int rc = cli_check_handle(st, "cas");
    if (rc == 0)
        rc = cli_check_key(st, "cas", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "cas", key);
    if (expected)
        rc = cli_check_value(st, what, "expected value", expected, expected_len);
    if (rc == 0)
        rc = cli_check_value(st, what, "value", val, len);
    if (rc < 0)
        return rc;
    return cli_put(st, what, key, true, expected, expected_len, val, len, lease);
}

int kvf_store_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val, size_t *len)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = cli_check_handle(st, "get");
    if (rc == 0)
        rc = cli_check_key(st, "get", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "get", key);
    if (!val || !len)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", st->url,
                        what);
    *val = NULL;
    *len = 0;
    if (wait_ms > KVF_STORE_MAX_WAIT_MS)
        return kvf__err(-KVF_EINVAL, "store %s: %s: wait of %u ms exceeds the %u ms limit",
                        st->url, what, wait_ms, KVF_STORE_MAX_WAIT_MS);

    cli_req_t *rq = cli_req_new(KVF_STORE_OP_GET, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    cli_frame_begin(&f, KVF_STORE_OP_GET);
    kvf__buf_put_blob(&f, key, strlen(key));
    kvf__buf_put_u32(&f, wait_ms);
    if (cli_frame_end(&f) < 0) {
        rc = cli_nomem(st, what);
        goto out_free;
    }
    rc = cli_call(st, &rq, &f, (uint64_t)wait_ms + st->opts.request_timeout_ms, true, what);
    if (rc == -KVF_ENOTFOUND) {
        rc = kvf__err(rc, "store %s: %s: not found", st->url, what);
    } else if (rc == -KVF_ETIMEDOUT && rq) {
        /* The store answered that the key is still absent (rq is NULL when it did not answer). */
        rc = kvf__err(rc, "store %s: %s: still absent after waiting %u ms", st->url, what,
                      wait_ms);
    } else if (rc == 0) {
        *val = rq->val;
        *len = rq->val_len;
        rq->val = NULL;
    }
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

int kvf_store_del(kvf_store_t *st, const char *key)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = cli_check_handle(st, "del");
    if (rc == 0)
        rc = cli_check_key(st, "del", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "del", key);
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_DEL, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    cli_frame_begin(&f, KVF_STORE_OP_DEL);
    kvf__buf_put_blob(&f, key, strlen(key));
    rq->key = strdup(key);
    if (cli_frame_end(&f) < 0 || !rq->key) {
        rc = cli_nomem(st, what);
        goto out_free;
    }
    rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == -KVF_ENOTFOUND)
        rc = kvf__err(rc, "store %s: %s: not found", st->url, what);
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

int kvf_store_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = cli_check_handle(st, "add");
    if (rc == 0)
        rc = cli_check_key(st, "add", key, false);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "add", key);
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_ADD, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    cli_frame_begin(&f, KVF_STORE_OP_ADD);
    kvf__buf_put_blob(&f, key, strlen(key));
    kvf__buf_put_u64(&f, (uint64_t)delta);
    if (cli_frame_end(&f) < 0) {
        rc = cli_nomem(st, what);
        goto out_free;
    }
    rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0 && result) {
        /* Two's complement on the wire; convert without relying on implementation-defined
         * unsigned-to-signed conversion. */
        uint64_t u = rq->u64;
        *result = u <= (uint64_t)INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
    }
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

int kvf_store_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = cli_check_handle(st, "list");
    if (rc < 0)
        return rc;
    if (!prefix)
        prefix = "";
    rc = cli_check_key(st, "list", prefix, true);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "list", prefix);
    if (!out || !count)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", st->url,
                        what);
    *out = NULL;
    *count = 0;
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_LIST, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    cli_frame_begin(&f, KVF_STORE_OP_LIST);
    kvf__buf_put_blob(&f, prefix, strlen(prefix));
    if (cli_frame_end(&f) < 0) {
        rc = cli_nomem(st, what);
        goto out_free;
    }
    rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0) {
        *out = rq->kvs;
        *count = rq->nkvs;
        rq->kvs = NULL;
        rq->nkvs = 0;
    }
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

void kvf_store_kv_free(kvf_store_kv_t *kvs, size_t count)
{
    if (!kvs)
        return;
    for (size_t i = 0; i < count; i++) {
        free(kvs[i].key);
        free(kvs[i].val);
    }
    free(kvs);
}

int kvf_store_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                    uint64_t *watch_id)
{
    char what[CLI_WHAT_MAX];
    kvf_buf_t f;
    int rc = cli_check_handle(st, "watch");
    if (rc == 0)
        rc = cli_check_key(st, "watch", prefix, true);
    if (rc < 0)
        return rc;
    cli_what(what, sizeof(what), "watch", prefix);
    if (!cb || !watch_id)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL", st->url, what,
                        cb ? "watch_id" : "the callback");
    *watch_id = 0;
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_WATCH, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    cli_frame_begin(&f, KVF_STORE_OP_WATCH);
    kvf__buf_put_blob(&f, prefix, strlen(prefix));
    rq->new_watch = calloc(1, sizeof(*rq->new_watch));
    if (cli_frame_end(&f) < 0 || !rq->new_watch)
        goto out_nomem;
    rq->new_watch->prefix = strdup(prefix);
    if (!rq->new_watch->prefix)
        goto out_nomem;
    rq->new_watch->prefix_len = strlen(prefix);
    rq->new_watch->cb = cb;
    rq->new_watch->arg = arg;
    rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0)
        *watch_id = rq->watch_cid;
    goto out_free;

out_nomem:
    rc = cli_nomem(st, what);
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

int kvf_store_unwatch(kvf_store_t *st, uint64_t watch_id)
{
    int rc = cli_check_handle(st, "unwatch");
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&st->mu);
    cli_watch_t *w;
    for (w = st->watches; w && !(w->active && w->cid == watch_id); w = w->next)
        ;
    if (!w) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: unwatch %" PRIu64 ": no such watch", st->url,
                        watch_id);
    }
    cli_watch_unlink_locked(st, watch_id);
    /* Events of an unknown watch are ignored, so the store's answer need not be awaited; this
     * also lets the callback itself unwatch without waiting for its own thread. */
    if (w->sid && st->state != CLI_DOWN && !st->broken)
        cli_send_u64_locked(st, KVF_STORE_OP_UNWATCH, w->sid);
    if (!cli_on_io_thread(st)) {
        st->active_calls++;
        while (st->cb_watch_cid == watch_id)
            pthread_cond_wait(&st->cond, &st->mu);
        st->active_calls--;
        if (st->closing)
            pthread_cond_broadcast(&st->cond);
    }
    pthread_mutex_unlock(&st->mu);
    cli_watch_free(w);
    return 0;
}

int kvf_store_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease)
{
    char what[64];
    kvf_buf_t f;
    int rc = cli_check_handle(st, "lease grant");
    if (rc < 0)
        return rc;
    snprintf(what, sizeof(what), "lease grant (ttl %u ms)", ttl_ms);
    if (!lease)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointer is NULL", st->url, what);
    *lease = 0;
    if (ttl_ms == 0 || ttl_ms > KVF_STORE_MAX_LEASE_TTL_MS)
        return kvf__err(-KVF_EINVAL, "store %s: %s: ttl must be 1..%u ms", st->url, what,
                        KVF_STORE_MAX_LEASE_TTL_MS);
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_LEASE_GRANT, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    cli_frame_begin(&f, KVF_STORE_OP_LEASE_GRANT);
    kvf__buf_put_u32(&f, ttl_ms);
    rq->new_lease = calloc(1, sizeof(*rq->new_lease));
    if (cli_frame_end(&f) < 0 || !rq->new_lease) {
        rc = cli_nomem(st, what);
        goto out_free;
    }
    rq->new_lease->ttl_ms = ttl_ms;
    rq->new_lease->state = CLI_LEASE_GRANTING;
    rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc == 0)
        *lease = rq->lease_cid;
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

int kvf_store_lease_keepalive_stop(kvf_store_t *st, uint64_t lease)
{
    int rc = cli_check_handle(st, "lease keepalive stop");
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&st->mu);
    cli_lease_t *l = cli_lease_find_locked(st, lease);
    if (!l || l->state == CLI_LEASE_GRANTING) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ENOTFOUND,
                        "store %s: lease keepalive stop %" PRIu64 ": no such lease", st->url,
                        lease);
    }
    if (l->state == CLI_LEASE_LIVE) {
        l->state = CLI_LEASE_STOPPED;
    } else if (l->state != CLI_LEASE_STOPPED) {
        /* Not granted on the current connection: there is nothing on the store to let expire.
         * A re-grant in flight finds no entry when answered and revokes what it got. */
        cli_lease_free(cli_lease_unlink_locked(st, lease));
    }
    pthread_mutex_unlock(&st->mu);
    return 0;
}

int kvf_store_lease_revoke(kvf_store_t *st, uint64_t lease)
{
    char what[64];
    kvf_buf_t f;
    int rc = cli_check_handle(st, "lease revoke");
    if (rc < 0)
        return rc;
    snprintf(what, sizeof(what), "lease revoke %" PRIu64, lease);

    /* Whatever happens below, the lease is no longer kept alive nor re-granted: it ends either
     * now on the store, or when its TTL runs out there. */
    pthread_mutex_lock(&st->mu);
    cli_lease_t *l = cli_lease_find_locked(st, lease);
    if (!l || l->state == CLI_LEASE_GRANTING) {
        pthread_mutex_unlock(&st->mu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: %s: no such lease", st->url, what);
    }
    /* A server id is only meaningful on the connection that obtained it; remember which. */
    bool on_store = (l->state == CLI_LEASE_LIVE || l->state == CLI_LEASE_STOPPED) &&
                    st->state != CLI_DOWN && !st->broken;
    /* The store told us it no longer has the lease (and so none of its keys), and no re-grant
     * has been answered since: a re-grant in flight finds no entry and revokes what it got. */
    bool gone = !on_store && l->lost;
    uint64_t sid = l->sid, gen = st->conn_gen;
    uint32_t ttl = l->ttl_ms;
    char conn_err[CLI_MSG_MAX];
    snprintf(conn_err, sizeof(conn_err), "%s",
             st->state == CLI_DOWN ? (st->last_conn_err[0] ? st->last_conn_err : "connection lost")
                                   : "");
    bool down = st->state == CLI_DOWN || st->broken;
    cli_lease_free(cli_lease_unlink_locked(st, lease));
    pthread_mutex_unlock(&st->mu);
    if (gone)
        return 0;
    if (!on_store) {
        if (down)
            return kvf__err(-KVF_ESTOREDOWN,
                            "store %s: %s: not connected to the store (%s), so it could not be "
                            "revoked there; it is no longer kept alive and expires on the store "
                            "within its TTL of %u ms, deleting its keys then",
                            st->url, what, conn_err[0] ? conn_err : "connection lost", ttl);
        return kvf__err(-KVF_ESTOREDOWN,
                        "store %s: %s: the connection it was granted on was lost and it was not "
                        "re-granted yet, so it could not be revoked on the store; it is no "
                        "longer kept alive and expires there within its TTL of %u ms, deleting "
                        "its keys then",
                        st->url, what, ttl);
    }

    cli_req_t *rq = cli_req_new(KVF_STORE_OP_LEASE_REVOKE, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, what);
    if (cli_frame_u64(&f, KVF_STORE_OP_LEASE_REVOKE, sid) < 0) {
        rc = cli_nomem(st, what);
        goto out_free;
    }
    rq->sid_gen = gen;
    rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, what);
    if (rc < 0 && rc != -KVF_ENOTFOUND) { /* ENOTFOUND: it already expired, keys and all */
        char cause[CLI_MSG_MAX * 2];
        snprintf(cause, sizeof(cause), "%s", kvf_last_error());
        rc = kvf__err(rc == -KVF_ETIMEDOUT ? rc : -KVF_ESTOREDOWN,
                      "%s; the lease is no longer kept alive and, unless the store did revoke "
                      "it, expires there within its TTL of %u ms, deleting its keys then",
                      cause, ttl);
    }
out_free:
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}

int kvf_store_ping(kvf_store_t *st)
{
    kvf_buf_t f;
    int rc = cli_check_handle(st, "ping");
    if (rc < 0)
        return rc;
    cli_req_t *rq = cli_req_new(KVF_STORE_OP_PING, CLI_OWNER_CALLER);
    if (!rq)
        return cli_nomem(st, "ping");
    cli_frame_begin(&f, KVF_STORE_OP_PING);
    if (cli_frame_end(&f) < 0)
        rc = cli_nomem(st, "ping");
    else
        rc = cli_call(st, &rq, &f, st->opts.request_timeout_ms, true, "ping");
    kvf__buf_free(&f);
    cli_req_free(rq);
    return rc;
}
