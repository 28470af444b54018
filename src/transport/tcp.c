/*
 * The TCP transport: the data path between engines on different hosts. The wire protocol is
 * specified in docs/protocol.md ("Transfer protocol").
 *
 * Target side. One accept thread; one serving thread per accepted connection. A serving thread
 * reads a fixed 40-byte header, validates it, takes a reference on the registered region the
 * request falls in, and then recv()s a WRITE's payload straight into that memory (or sends a
 * READ's answer straight from it) with blocking calls: no staging buffer, no event loop between
 * the socket and the destination. It serves its connection's requests one at a time, in order,
 * and holds a region reference only while it moves that request's payload, never while it waits
 * for the next header (so unregistering a region is never held up by an idle connection).
 *
 * Initiator side. A peer handle owns conns_per_peer connections, opened lazily. The thread that
 * calls transfer() sends its own requests (header and payload in one sendmsg() straight from the
 * caller's memory; runs of small writes gathered into one WRITEV) and then waits for the
 * answers. Whoever holds a connection's reader role reads them and completes requests by req_id,
 * receiving a READ's payload straight into the caller's buffer: normally the connection's
 * receiver thread, which wakes the waiting callers; but a caller whose whole batch is one request
 * reads its own answer (see tcp_reader_t), which saves a wake-up on small transfers.
 *
 * Locking on the initiator side. peer->mu protects every connection's state, its in-flight
 * slot table and every batch's counters. conn->send_mu serialises frames on one socket and is
 * taken before peer->mu when both are needed. conn->fd and conn->gen change only with both held,
 * so a sender that holds send_mu and sees the generation it posted under knows the fd is the one
 * its request belongs to (and still open). A connection's fd is closed only after its receiver
 * thread has been joined, so shutdown() by any thread that sees the fd under the lock is safe.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/net.h"
#include "common/url.h"
#include "common/wire.h"
#include "common/regions.h"
#include "transport/transport.h"

#define TCP_LOG "tcp"

/* ---------------------------------------------------------------------------------------------
 * Wire format and limits (docs/protocol.md, "Transfer protocol")
 * ------------------------------------------------------------------------------------------- */

#define KVF_TCP_MAGIC   0x5446564Bu /* "KVFT" as bytes on the wire */
#define KVF_TCP_VERSION 1
#define KVF_TCP_HDR_LEN 40

#define KVF_TCP_HELLO  1
#define KVF_TCP_WRITE  2
#define KVF_TCP_READ   3
#define KVF_TCP_RESP   4
#define KVF_TCP_NOTIFY 5
#define KVF_TCP_WRITEV 6

/* Largest `len` of one WRITE or READ (and of a READ's answer). Longer elements are split. */
#define KVF_TCP_MAX_CHUNK (64u << 20)
/* Largest HELLO payload (session id) and error-message payload of a RESP. */
#define KVF_TCP_MAX_MSG 1024u
/* Segments of one WRITEV: a gathered write of several small elements (addr = the count, len =
 * their total bytes, at most KVF_TCP_MAX_CHUNK). */
#define KVF_TCP_MAX_SEGS 256u
#define KVF_TCP_SEG_LEN  16u
/* Elements up to this size are gathered into WRITEVs by the initiator. */
#define TCP_GATHER_ELEM_MAX (256u << 10)
/* Requests one initiator keeps outstanding on one connection (a power of two: the slot index
 * is the low bits of req_id). A target needs no such limit: it serves one request at a time and
 * TCP flow control holds back the rest. */
#define KVF_TCP_MAX_INFLIGHT 128u
#define TCP_SLOT_BITS        7
/* Connections one target serves at once; more are accepted and closed at once. */
#define KVF_TCP_MAX_CONNS 1024u
/* Longest a target waits for progress on a frame it has started to receive or send; a client
 * that stops in the middle of a frame is disconnected after this (its region reference is
 * released). */
#define KVF_TCP_STALL_TIMEOUT_MS 30000u
/* A frame's payload must also arrive at no less than KVF_TCP_MIN_RATE_BYTES_PER_MS after a base
 * allowance, so that a client cannot hold a region reference for ever by trickling bytes (which
 * restarts the stall timer): with the largest frame a reference is held at most
 * 2 s + 64 MiB / 10 MB/s, about 8.7 s, well under the operation timeout an unregister waits. */
#define KVF_TCP_FRAME_BASE_MS         2000u
#define KVF_TCP_MIN_RATE_BYTES_PER_MS 10000u
/* A new connection must complete its HELLO within this, so idle sockets cannot fill
 * KVF_TCP_MAX_CONNS and lock real peers out. */
#define KVF_TCP_HELLO_TIMEOUT_MS 5000u
/* Connections an initiator may open to one peer. */
#define KVF_TCP_MAX_CONNS_PER_PEER 64u

#define TCP_DEFAULT_CONNS      2u
#define TCP_DEFAULT_CHUNK      (4u << 20)
#define TCP_DEFAULT_CONNECT_MS 3000u
/* Blocking sends wake up this often to check a transfer's deadline (SO_SNDTIMEO). */
#define TCP_CLIENT_SLICE_MS 50
/* Serving threads wake up this often to check for stalls and shutdown (SO_RCVTIMEO/SNDTIMEO). */
#define TCP_SERVER_SLICE_MS 1000
/* Size of the buffer a refused WRITE's payload (or an unwanted answer) is drained into. */
#define TCP_SCRATCH_LEN (64u << 10)
#define TCP_ERRMSG_LEN  (KVF_TCP_MAX_MSG + 512)
#define TCP_ADDR_LEN    KVF_SESSION_ID_MAX

_Static_assert((1u << TCP_SLOT_BITS) == KVF_TCP_MAX_INFLIGHT, "slot index bits");

typedef struct {
    uint32_t magic;
    uint8_t version;
    uint8_t type;
    uint16_t flags;
    uint32_t status;
    uint32_t reserved;
    uint64_t req_id;
    uint64_t addr;
    uint64_t len;
} tcp_hdr_t;

static void tcp_hdr_encode(uint8_t *b, uint8_t type, uint32_t status, uint64_t req_id,
                           uint64_t addr, uint64_t len)
{
    kvf__put_le32(b, KVF_TCP_MAGIC);
    b[4] = KVF_TCP_VERSION;
    b[5] = type;
    kvf__put_le16(b + 6, 0);
    kvf__put_le32(b + 8, status);
    kvf__put_le32(b + 12, 0);
    kvf__put_le64(b + 16, req_id);
    kvf__put_le64(b + 24, addr);
    kvf__put_le64(b + 32, len);
}

static void tcp_hdr_decode(const uint8_t *b, tcp_hdr_t *h)
{
    h->magic = kvf__get_le32(b);
    h->version = b[4];
    h->type = b[5];
    h->flags = kvf__get_le16(b + 6);
    h->status = kvf__get_le32(b + 8);
    h->reserved = kvf__get_le32(b + 12);
    h->req_id = kvf__get_le64(b + 16);
    h->addr = kvf__get_le64(b + 24);
    h->len = kvf__get_le64(b + 32);
}

/* Checks shared by both directions. Returns false with a reason made of numbers only (received
 * bytes are never echoed into logs). */
static bool tcp_hdr_common_ok(const tcp_hdr_t *h, char *why, size_t whylen)
{
    if (h->magic != KVF_TCP_MAGIC)
        snprintf(why, whylen, "bad magic 0x%08" PRIx32, h->magic);
    else if (h->version != KVF_TCP_VERSION)
        snprintf(why, whylen, "unsupported version %u", (unsigned)h->version);
    else if (h->flags != 0)
        snprintf(why, whylen, "non-zero flags 0x%04x", (unsigned)h->flags);
    else if (h->reserved != 0)
        snprintf(why, whylen, "non-zero reserved field 0x%08" PRIx32, h->reserved);
    else
        return true;
    return false;
}

/* ---------------------------------------------------------------------------------------------
 * Socket helpers
 * ------------------------------------------------------------------------------------------- */

static void tcp_set_timeout(int fd, int opt, unsigned ms)
{
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000u),
                         .tv_usec = (suseconds_t)(ms % 1000u) * 1000};
    setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof(tv));
}

static void tcp_sockaddr_format(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        port = ntohs(a->sin_port);
        snprintf(buf, len, "%s:%u", host, port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        port = ntohs(a->sin6_port);
        snprintf(buf, len, "[%s]:%u", host, port);
    } else {
        snprintf(buf, len, "?");
    }
}

/* Drop the first @n bytes of an iovec array (a partial send). */
static void tcp_iov_advance(struct iovec **iov, int *cnt, size_t n)
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

/*
 * Send all of @iov on a blocking socket that has SO_SNDTIMEO set to a short slice, so that a
 * peer that stops reading is noticed: at @deadline_ms (kvf__now_ms clock, 0 = none), or when
 * nothing moved for @stall_ms (0 = no limit). The array is consumed.
 * Returns 0, -KVF_ETIMEDOUT or -errno.
 */
static int tcp_sendv(int fd, struct iovec *iov, int cnt, uint64_t deadline_ms, uint32_t stall_ms)
{
    uint64_t last = stall_ms ? kvf__now_ms() : 0;
    tcp_iov_advance(&iov, &cnt, 0);
    while (cnt > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w > 0) {
            tcp_iov_advance(&iov, &cnt, (size_t)w);
            if (stall_ms)
                last = kvf__now_ms();
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            uint64_t now = kvf__now_ms();
            if (deadline_ms && now >= deadline_ms)
                return -KVF_ETIMEDOUT;
            if (stall_ms && now - last >= stall_ms)
                return -KVF_ETIMEDOUT;
            continue;
        }
        return w < 0 ? -errno : -EPIPE;
    }
    return 0;
}

/* Receive exactly @len bytes on a blocking socket without a receive timeout (the initiator's
 * reader: the receiver thread is woken by shutdown()). @deadline_ms: 0 for none, else the
 * receive gives up then (a caller reading its own answer). Returns 0, -EPIPE at end of stream,
 * -KVF_ETIMEDOUT at the deadline, or -errno. */
static int tcp_recv_full(int fd, void *buf, size_t len, uint64_t deadline_ms)
{
    size_t got = 0;
    while (got < len) {
        /* With a deadline, take what is there and sleep in poll() only when nothing is. */
        ssize_t r =
            recv(fd, (uint8_t *)buf + got, len - got, deadline_ms ? MSG_DONTWAIT : MSG_WAITALL);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0)
            return -EPIPE;
        if (errno == EINTR || (errno == EAGAIN && !deadline_ms))
            continue;
        if (errno != EAGAIN)
            return -errno;
        uint64_t now = kvf__now_ms();
        if (now >= deadline_ms)
            return -KVF_ETIMEDOUT;
        uint64_t left = deadline_ms - now;
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, left > INT32_MAX ? INT32_MAX : (int)left) < 0 && errno != EINTR)
            return -errno;
    }
    return 0;
}

/* Non-blocking I/O bounded by @deadline_ms, for the connect-time hello. */
static int tcp_nb_io(int fd, void *buf, size_t len, bool out, uint64_t deadline_ms)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = out ? send(fd, (uint8_t *)buf + done, len - done, MSG_NOSIGNAL)
                        : recv(fd, (uint8_t *)buf + done, len - done, 0);
        if (r > 0) {
            done += (size_t)r;
            continue;
        }
        if (r == 0)
            return -EPIPE;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        uint64_t now = kvf__now_ms();
        if (now >= deadline_ms)
            return -KVF_ETIMEDOUT;
        struct pollfd pf = {.fd = fd, .events = out ? POLLOUT : POLLIN};
        if (poll(&pf, 1, (int)(deadline_ms - now)) < 0 && errno != EINTR)
            return -errno;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Objects
 * ------------------------------------------------------------------------------------------- */

struct tcp_transport;

/* One accepted connection on the target side. */
struct tcp_sconn {
    struct tcp_sconn *next;
    struct tcp_transport *t;
    int fd; /* shut down by the thread when it ends; closed only after it is joined */
    pthread_t thread;
    atomic_bool done;
    char addr[TCP_ADDR_LEN];
    char peer_sid[KVF_SESSION_ID_MAX]; /* as the HELLO gave it: the sender of its notifications */
    uint8_t *scratch;                  /* drain buffer for refused writes, allocated on first use */
    uint8_t *segs;                     /* a WRITEV's segment table, allocated on first use */
    kvf_region_ref_t *refs;            /* and the region references of its segments */
    struct iovec *iov;
};

/* A batch: the completion shared by every chunk one transfer() call posts. */
struct tcp_batch {
    const kvf_xfer_t *x;
    int *status;        /* per element (kvf_xfer_ctl_t), or NULL; under peer->mu */
    uint32_t *left;     /* per element, chunks not yet answered, when status is kept */
    size_t outstanding; /* posted chunks not yet answered or failed; under peer->mu */
    _Atomic int rc;     /* first error; written under peer->mu, read anywhere */
    bool waiting;       /* the owner sleeps on cv */
    pthread_cond_t cv;
    char msg[TCP_ERRMSG_LEN];
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

/* Who reads a connection's answers. Normally its receiver thread; but a caller whose whole batch
 * is one request reads its own answer (saving the receiver's wake-up of the caller, the larger
 * part of small-transfer latency), and hands the role on if other requests are still pending. */
typedef enum {
    TCP_READER_NONE,   /* nothing to read: the receiver only watches for the peer closing */
    TCP_READER_RX,     /* the receiver thread */
    TCP_READER_INLINE, /* the caller that owns inline_b */
} tcp_reader_t;

typedef enum {
    TCP_CONN_DOWN,       /* no socket */
    TCP_CONN_CONNECTING, /* a transfer thread is (re)connecting it */
    TCP_CONN_UP,
    TCP_CONN_BROKEN, /* failed; its receiver may still run; the next transfer reconnects */
} tcp_conn_state_t;

struct tcp_peer;

struct tcp_conn {
    struct tcp_peer *peer;
    unsigned idx;
    /* All below under peer->mu; fd and gen also under send_mu. */
    tcp_conn_state_t state;
    int fd;
    uint64_t gen; /* changes whenever fd does */
    uint64_t seq;
    bool rx_started;
    pthread_t rx_thread;
    uint64_t rx_gen; /* the generation the receiver serves; set before it starts */
    int rx_active;   /* slot the reader is filling without the lock (READ answer), or -1 */
    tcp_reader_t reader;
    struct tcp_batch *inline_b; /* the batch whose caller reads, when reader is INLINE */
    bool inline_active;         /* that caller is reading without the lock: fd must stay open */
    int wake_fd;                /* eventfd: wakes the receiver thread (role change, break) */
    unsigned waiters;           /* threads sleeping on cv */
    pthread_cond_t cv;          /* state changes, freed slots, rx_active cleared */
    pthread_mutex_t send_mu;
    uint8_t *scratch; /* receiver's drain buffer */
    unsigned nfree;
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
    pthread_mutex_t mu;
    pthread_cond_t cv; /* active reaching 0 while closing */
    bool closing;
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
    kvf_notify_cb notify_cb;
    void *notify_arg;
    int listen_fd;
    int wake_fd; /* eventfd: wakes the accept thread for shutdown */
    uint16_t port;
    pthread_t accept_thread;
    atomic_bool stopping;
    pthread_mutex_t mu; /* sconns, nsconns, peers */
    struct tcp_sconn *sconns;
    unsigned nsconns;
    struct tcp_peer *peers;
};

static struct tcp_transport *tcp_of(kvf_transport_t *t)
{
    return (struct tcp_transport *)(void *)t;
}

static struct tcp_peer *tcp_peer_of(kvf_tpeer_t *p)
{
    return (struct tcp_peer *)(void *)p;
}

static const char *tcp_op_name(uint8_t op)
{
    return op == KVF_TCP_READ ? "read" : op == KVF_TCP_NOTIFY ? "notification" : "write";
}

/* The iovecs of a WRITEV frame: header, segment table, then each element's bytes. */
#define TCP_WRITEV_IOV (2 + KVF_TCP_MAX_SEGS)

/* ---------------------------------------------------------------------------------------------
 * Target side: serving one connection
 * ------------------------------------------------------------------------------------------- */

/*
 * Receive exactly @len bytes on a serving socket (SO_RCVTIMEO = TCP_SERVER_SLICE_MS).
 * @idle_ok: the connection may sit idle before the first byte (waiting for a header).
 * @deadline_ms: absolute kvf__now_ms() bound on the whole receive, 0 for none (checked every
 *               TCP_SERVER_SLICE_MS).
 * Returns 0; 1 for an orderly end of stream before the first byte when @idle_ok; -EPIPE when the
 * stream ends in the middle; -KVF_ETIMEDOUT when a started transfer stalls; -KVF_ECLOSED when the
 * transport is stopping; -errno.
 */
/* When a frame of @len payload bytes, starting now, must be complete. */
static uint64_t tcp_frame_deadline(uint64_t len)
{
    return kvf__now_ms() + KVF_TCP_FRAME_BASE_MS + len / KVF_TCP_MIN_RATE_BYTES_PER_MS;
}

static int tcp_srv_recvv(struct tcp_sconn *sc, struct iovec *iov, int cnt, bool idle_ok,
                         uint64_t deadline_ms, size_t *got_out)
{
    size_t got = 0;
    uint64_t last = kvf__now_ms();
    int rc = 0;
    tcp_iov_advance(&iov, &cnt, 0);
    while (cnt > 0) {
        /* Checked before every receive, not only after an idle slice: a trickling client makes
         * each slice return a few bytes. */
        if (deadline_ms && kvf__now_ms() >= deadline_ms) {
            rc = -KVF_ETIMEDOUT;
            break;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t r = recvmsg(sc->fd, &mh, MSG_WAITALL);
        if (r > 0) {
            got += (size_t)r;
            tcp_iov_advance(&iov, &cnt, (size_t)r);
            last = kvf__now_ms();
            continue;
        }
        if (r == 0) {
            rc = (got == 0 && idle_ok) ? 1 : -EPIPE;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            rc = -errno;
            break;
        }
        if (atomic_load(&sc->t->stopping)) {
            rc = -KVF_ECLOSED;
            break;
        }
        if (got == 0 && idle_ok)
            last = kvf__now_ms();
        else if (kvf__now_ms() - last >= KVF_TCP_STALL_TIMEOUT_MS) {
            rc = -KVF_ETIMEDOUT;
            break;
        }
    }
    if (got_out)
        *got_out = got;
    return rc;
}

static int tcp_srv_recv(struct tcp_sconn *sc, void *buf, size_t len, bool idle_ok,
                        uint64_t deadline_ms, size_t *got_out)
{
    struct iovec iov = {buf, len};
    return tcp_srv_recvv(sc, &iov, 1, idle_ok, deadline_ms, got_out);
}

static int tcp_srv_drain(struct tcp_sconn *sc, uint64_t len)
{
    uint64_t deadline = tcp_frame_deadline(len);
    if (!sc->scratch) {
        sc->scratch = malloc(TCP_SCRATCH_LEN);
        if (!sc->scratch)
            return -ENOMEM;
    }
    while (len > 0) {
        size_t n = len < TCP_SCRATCH_LEN ? (size_t)len : TCP_SCRATCH_LEN;
        int rc = tcp_srv_recv(sc, sc->scratch, n, false, deadline, NULL);
        if (rc)
            return rc;
        len -= n;
    }
    return 0;
}

static int tcp_srv_send(struct tcp_sconn *sc, struct iovec *iov, int cnt)
{
    return tcp_sendv(sc->fd, iov, cnt, 0, KVF_TCP_STALL_TIMEOUT_MS);
}

/* Answer @h with status @code (a negative kvferry code) and this thread's last-error message. */
static int tcp_srv_send_error(struct tcp_sconn *sc, const tcp_hdr_t *h, int code)
{
    uint8_t hdr[KVF_TCP_HDR_LEN];
    const char *msg = kvf_last_error();
    size_t mlen = strnlen(msg, KVF_TCP_MAX_MSG);
    uint32_t status = code < 0 ? (uint32_t)-code : (uint32_t)KVF_EPROTO;
    tcp_hdr_encode(hdr, KVF_TCP_RESP, status, h->req_id, h->addr, mlen);
    struct iovec iov[2] = {{hdr, sizeof(hdr)}, {(void *)msg, mlen}};
    return tcp_srv_send(sc, iov, 2);
}

/* Validate a request header. Returns NULL, or a reason for closing the connection. */
static const char *tcp_srv_check(const tcp_hdr_t *h, bool hello_done, char *why, size_t whylen)
{
    if (!tcp_hdr_common_ok(h, why, whylen))
        return why;
    if (h->type < KVF_TCP_HELLO || h->type > KVF_TCP_WRITEV || h->type == KVF_TCP_RESP)
        snprintf(why, whylen, "bad frame type %u", (unsigned)h->type);
    else if (!hello_done && h->type != KVF_TCP_HELLO)
        snprintf(why, whylen, "first frame is type %u, not HELLO", (unsigned)h->type);
    else if (hello_done && h->type == KVF_TCP_HELLO)
        snprintf(why, whylen, "second HELLO");
    else if (h->status != 0)
        snprintf(why, whylen, "non-zero status %" PRIu32 " in a request", h->status);
    else if (h->type == KVF_TCP_HELLO && h->len > KVF_TCP_MAX_MSG)
        snprintf(why, whylen, "HELLO length %" PRIu64 " over KVF_TCP_MAX_MSG (%u)", h->len,
                 KVF_TCP_MAX_MSG);
    else if (h->type == KVF_TCP_WRITEV && (h->addr == 0 || h->addr > KVF_TCP_MAX_SEGS))
        snprintf(why, whylen, "WRITEV of %" PRIu64 " segments: want 1..KVF_TCP_MAX_SEGS (%u)",
                 h->addr, KVF_TCP_MAX_SEGS);
    else if (h->type == KVF_TCP_NOTIFY && h->len > KVF_NOTIFY_MAX)
        snprintf(why, whylen, "NOTIFY length %" PRIu64 " over KVF_NOTIFY_MAX (%u)", h->len,
                 KVF_NOTIFY_MAX);
    else if (h->len > KVF_TCP_MAX_CHUNK)
        snprintf(why, whylen, "length %" PRIu64 " over KVF_TCP_MAX_CHUNK (%u)", h->len,
                 KVF_TCP_MAX_CHUNK);
    else
        return NULL;
    return why;
}

/*
 * Serve a WRITEV: its segment table, then each segment's bytes straight into the region it lies
 * in, under references on all of them. Either every segment is inside a registered region and
 * all are written, or none is: the payload is drained and the answer names the first refused
 * segment in `addr`. Returns 0, a negative I/O code, or 1 with @why set when the frame is
 * malformed (the connection is then closed).
 */
static int tcp_srv_writev(struct tcp_sconn *sc, const tcp_hdr_t *h, char *why, size_t whylen)
{
    struct tcp_transport *t = sc->t;
    unsigned n = (unsigned)h->addr;
    if (!sc->segs) {
        sc->segs = malloc(KVF_TCP_MAX_SEGS * KVF_TCP_SEG_LEN);
        sc->refs = calloc(KVF_TCP_MAX_SEGS, sizeof(*sc->refs));
        sc->iov = malloc(KVF_TCP_MAX_SEGS * sizeof(*sc->iov));
        if (!sc->segs || !sc->refs || !sc->iov)
            return -ENOMEM;
    }
    uint64_t deadline = tcp_frame_deadline(h->len);
    int rc = tcp_srv_recv(sc, sc->segs, (size_t)n * KVF_TCP_SEG_LEN, false, deadline, NULL);
    if (rc)
        return rc;
    uint64_t total = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t addr = kvf__get_le64(sc->segs + (size_t)i * KVF_TCP_SEG_LEN);
        uint64_t len = kvf__get_le64(sc->segs + (size_t)i * KVF_TCP_SEG_LEN + 8);
        if (len == 0 || len > h->len - total) {
            snprintf(why, whylen,
                     "WRITEV segment %u: length %" PRIu64 " where %" PRIu64
                     " of the frame's %" PRIu64 " bytes are left",
                     i, len, h->len - total, h->len);
            return 1;
        }
        total += len;
        sc->iov[i].iov_base = (void *)(uintptr_t)addr;
        sc->iov[i].iov_len = (size_t)len;
    }
    if (total != h->len) {
        snprintf(why, whylen, "WRITEV segments total %" PRIu64 " bytes, the frame says %" PRIu64,
                 total, h->len);
        return 1;
    }
    unsigned k = 0;
    int arc = 0;
    for (; k < n; k++) {
        arc = kvf__regions_acquire(t->regions, (uintptr_t)sc->iov[k].iov_base, sc->iov[k].iov_len,
                                   &sc->refs[k]);
        if (arc)
            break;
    }
    if (arc) {
        for (unsigned j = 0; j < k; j++)
            kvf__regions_release(t->regions, &sc->refs[j]);
        KVF_DEBUG(TCP_LOG, "gathered write from %s refused at segment %u: %s", sc->addr, k,
                  kvf_last_error());
        rc = tcp_srv_drain(sc, h->len);
        if (rc == 0) {
            tcp_hdr_t e = *h;
            e.addr = k;
            rc = tcp_srv_send_error(sc, &e, arc);
        }
        return rc;
    }
    rc = tcp_srv_recvv(sc, sc->iov, (int)n, false, deadline, NULL);
    for (unsigned j = 0; j < n; j++)
        kvf__regions_release(t->regions, &sc->refs[j]);
    if (rc == 0) {
        uint8_t resp[KVF_TCP_HDR_LEN];
        tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h->req_id, n, 0);
        struct iovec iov = {resp, sizeof(resp)};
        rc = tcp_srv_send(sc, &iov, 1);
    }
    return rc;
}

static const char *tcp_io_reason(int rc, char *buf, size_t len)
{
    if (rc == -EPIPE)
        return "connection closed in the middle of a frame";
    if (rc == -KVF_ETIMEDOUT)
        return "frame too slow (no progress for KVF_TCP_STALL_TIMEOUT_MS, below the minimum "
               "rate, or no hello within KVF_TCP_HELLO_TIMEOUT_MS)";
    snprintf(buf, len, "%s", kvf_strerror(rc));
    return buf;
}

static void *tcp_sconn_main(void *arg)
{
    struct tcp_sconn *sc = arg;
    struct tcp_transport *t = sc->t;
    uint8_t hbuf[KVF_TCP_HDR_LEN];
    char why[160];
    const char *reason = NULL;
    bool hello_done = false;
    uint64_t hello_deadline = kvf__now_ms() + KVF_TCP_HELLO_TIMEOUT_MS;
    int rc;

    for (;;) {
        size_t got = 0;
        tcp_hdr_t h;
        /* Before the HELLO an idle connection has a deadline; afterwards it may idle for ever. */
        rc = tcp_srv_recv(sc, hbuf, sizeof(hbuf), true, hello_done ? 0 : hello_deadline, &got);
        if (rc == 1 || rc == -KVF_ECLOSED) {
            KVF_DEBUG(TCP_LOG, "connection from %s closed", sc->addr);
            break;
        }
        if (rc) {
            if (rc == -EPIPE) {
                snprintf(why, sizeof(why), "truncated header (%zu of %u bytes)", got,
                         KVF_TCP_HDR_LEN);
                reason = why;
            } else {
                reason = tcp_io_reason(rc, why, sizeof(why));
            }
            break;
        }
        tcp_hdr_decode(hbuf, &h);
        reason = tcp_srv_check(&h, hello_done, why, sizeof(why));
        if (reason)
            break;

        if (h.type == KVF_TCP_HELLO) {
            char sid[KVF_TCP_MAX_MSG + 1];
            rc = tcp_srv_recv(sc, sid, (size_t)h.len, false, hello_deadline, NULL);
            if (rc) {
                reason = tcp_io_reason(rc, why, sizeof(why));
                break;
            }
            /* The session id is for the log only; keep it printable. */
            kvf__printable(sid, (size_t)h.len + 1, sid, (size_t)h.len);
            KVF_DEBUG(TCP_LOG, "hello from %s at %s", sid, sc->addr);
            /* A longer one is no session id; it is kept cut (for the log) all the same. */
            size_t keep = strnlen(sid, sizeof(sc->peer_sid) - 1);
            memcpy(sc->peer_sid, sid, keep);
            sc->peer_sid[keep] = '\0';
            hello_done = true;
            uint8_t resp[KVF_TCP_HDR_LEN];
            tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, 0, 0);
            struct iovec iov = {resp, sizeof(resp)};
            rc = tcp_srv_send(sc, &iov, 1);
        } else if (h.type == KVF_TCP_WRITEV) {
            rc = tcp_srv_writev(sc, &h, why, sizeof(why));
            if (rc == 1) {
                reason = why;
                break;
            }
        } else if (h.type == KVF_TCP_NOTIFY) {
            /* The sender sends it only once every request of its batch has been answered, so
             * that batch's data is in place before the notification is queued. */
            uint8_t nbuf[KVF_NOTIFY_MAX];
            rc = tcp_srv_recv(sc, nbuf, (size_t)h.len, false, tcp_frame_deadline(h.len), NULL);
            if (rc == 0) {
                int nrc = t->notify_cb
                              ? t->notify_cb(t->notify_arg, sc->peer_sid, nbuf, (size_t)h.len)
                              : kvf__err(-KVF_ENOTSUP, "%s takes no notifications", t->local_sid);
                if (nrc == 0) {
                    uint8_t resp[KVF_TCP_HDR_LEN];
                    tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, 0, 0);
                    struct iovec iov = {resp, sizeof(resp)};
                    rc = tcp_srv_send(sc, &iov, 1);
                } else {
                    rc = tcp_srv_send_error(sc, &h, nrc);
                }
            }
        } else if (h.type == KVF_TCP_WRITE) {
            kvf_region_ref_t ref = {0};
            int arc = kvf__regions_acquire(t->regions, h.addr, h.len, &ref);
            if (arc == 0) {
                /* Straight into the registered memory: the region reference keeps it registered
                 * until the last byte is in. */
                rc = tcp_srv_recv(sc, (void *)(uintptr_t)h.addr, (size_t)h.len, false,
                                  tcp_frame_deadline(h.len), NULL);
                kvf__regions_release(t->regions, &ref);
                if (rc == 0) {
                    uint8_t resp[KVF_TCP_HDR_LEN];
                    tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, h.addr, 0);
                    struct iovec iov = {resp, sizeof(resp)};
                    rc = tcp_srv_send(sc, &iov, 1);
                }
            } else {
                KVF_DEBUG(TCP_LOG, "write from %s refused: %s", sc->addr, kvf_last_error());
                rc = tcp_srv_drain(sc, h.len);
                if (rc == 0)
                    rc = tcp_srv_send_error(sc, &h, arc);
            }
        } else {
            kvf_region_ref_t ref = {0};
            int arc = kvf__regions_acquire(t->regions, h.addr, h.len, &ref);
            if (arc == 0) {
                uint8_t resp[KVF_TCP_HDR_LEN];
                tcp_hdr_encode(resp, KVF_TCP_RESP, 0, h.req_id, h.addr, h.len);
                struct iovec iov[2] = {{resp, sizeof(resp)},
                                       {(void *)(uintptr_t)h.addr, (size_t)h.len}};
                rc = tcp_srv_send(sc, iov, 2);
                kvf__regions_release(t->regions, &ref);
            } else {
                KVF_DEBUG(TCP_LOG, "read from %s refused: %s", sc->addr, kvf_last_error());
                rc = tcp_srv_send_error(sc, &h, arc);
            }
        }
        if (rc) {
            if (rc != -KVF_ECLOSED)
                reason = tcp_io_reason(rc, why, sizeof(why));
            break;
        }
    }

    /* A connection cut by destroy() is not the peer's fault: no warning for it. */
    if (reason && !atomic_load(&t->stopping))
        KVF_WARN(TCP_LOG, "closing connection from %s: %s", sc->addr, reason);
    /* The fd stays open (only shut down) until the thread is joined, so destroy() may call
     * shutdown() on it at any time without racing a reuse of the number. */
    shutdown(sc->fd, SHUT_RDWR);
    free(sc->scratch);
    sc->scratch = NULL;
    free(sc->segs);
    free(sc->refs);
    free(sc->iov);
    sc->segs = NULL;
    sc->refs = NULL;
    sc->iov = NULL;
    atomic_store(&sc->done, true);
    return NULL;
}

/* Join and free the connections whose threads have ended (all of them with @all). Called with
 * t->mu NOT held; takes it to unlink. */
static void tcp_reap_sconns(struct tcp_transport *t, bool all)
{
    struct tcp_sconn *dead = NULL;
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn **pp = &t->sconns; *pp;) {
        struct tcp_sconn *sc = *pp;
        if (all || atomic_load(&sc->done)) {
            *pp = sc->next;
            sc->next = dead;
            dead = sc;
            t->nsconns--;
        } else {
            pp = &sc->next;
        }
    }
    pthread_mutex_unlock(&t->mu);
    while (dead) {
        struct tcp_sconn *sc = dead;
        dead = sc->next;
        pthread_join(sc->thread, NULL);
        close(sc->fd);
        free(sc);
    }
}

static void tcp_accept_one(struct tcp_transport *t)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = accept4(t->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
            KVF_WARN(TCP_LOG, "accept on %s: %s", t->listen_str, strerror(errno));
        return;
    }
    tcp_reap_sconns(t, false);

    struct tcp_sconn *sc = calloc(1, sizeof(*sc));
    char addr[TCP_ADDR_LEN];
    tcp_sockaddr_format(&ss, addr, sizeof(addr));
    if (!sc) {
        KVF_WARN(TCP_LOG, "refusing connection from %s: out of memory", addr);
        goto out_close;
    }
    sc->t = t;
    sc->fd = fd;
    snprintf(sc->addr, sizeof(sc->addr), "%s", addr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    tcp_set_timeout(fd, SO_RCVTIMEO, TCP_SERVER_SLICE_MS);
    tcp_set_timeout(fd, SO_SNDTIMEO, TCP_SERVER_SLICE_MS);

    pthread_mutex_lock(&t->mu);
    if (t->nsconns >= KVF_TCP_MAX_CONNS) {
        pthread_mutex_unlock(&t->mu);
        KVF_WARN(TCP_LOG, "refusing connection from %s: KVF_TCP_MAX_CONNS (%u) reached", addr,
                 KVF_TCP_MAX_CONNS);
        goto out_free;
    }
    int rc = kvf__thread_start(&sc->thread, "kvf-tcp-serve", KVF_THREAD_SMALL_STACK,
                               tcp_sconn_main, sc);
    if (rc) {
        pthread_mutex_unlock(&t->mu);
        KVF_WARN(TCP_LOG, "refusing connection from %s: thread: %s", addr, strerror(-rc));
        goto out_free;
    }
    sc->next = t->sconns;
    t->sconns = sc;
    t->nsconns++;
    pthread_mutex_unlock(&t->mu);
    KVF_DEBUG(TCP_LOG, "accepted connection from %s on %s", addr, t->listen_str);
    return;

out_free:
    free(sc);
out_close:
    close(fd);
}

static void *tcp_accept_main(void *arg)
{
    struct tcp_transport *t = arg;
    while (!atomic_load(&t->stopping)) {
        struct pollfd pf[2] = {{.fd = t->listen_fd, .events = POLLIN},
                               {.fd = t->wake_fd, .events = POLLIN}};
        int n = poll(pf, 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            KVF_ERROR(TCP_LOG, "poll on %s: %s", t->listen_str, strerror(errno));
            break;
        }
        if (pf[1].revents)
            break;
        if (pf[0].revents)
            tcp_accept_one(t);
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Target side: create / destroy
 * ------------------------------------------------------------------------------------------- */

static int tcp_listen(struct tcp_transport *t, const kvf_hostport_t *hp)
{
    const char *why;
    int fd = kvf__tcp_listen(hp, &why);
    if (fd == -EADDRINUSE)
        return kvf__err(fd, "session id %s is already in use (tcp listen on %s: %s)", t->local_sid,
                        t->listen_str, why);
    if (fd < 0)
        return kvf__err(fd, "tcp listen on %s: %s", t->listen_str, why);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        t->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
        tcp_sockaddr_format(&ss, t->listen_str, sizeof(t->listen_str));
    }
    t->listen_fd = fd;
    return 0;
}

static void tcp_peer_detach_all(struct tcp_transport *t);

static int tcp_create(const kvf_transport_params_t *p, kvf_transport_t **out)
{
    struct tcp_transport *t;
    int rc;

    if (!p || !out || !p->regions)
        return kvf__err(-KVF_EINVAL, "tcp create: missing parameters or region table");
    t = calloc(1, sizeof(*t));
    if (!t)
        return kvf__err(-KVF_ENOMEM, "tcp create: out of memory");
    t->regions = p->regions;
    t->listen_fd = -1;
    t->wake_fd = -1;
    snprintf(t->local_sid, sizeof(t->local_sid), "%s", p->local_sid ? p->local_sid : "");
    kvf__hostport_format(&p->listen, t->listen_str, sizeof(t->listen_str));
    t->conns_per_peer = p->conns_per_peer ? p->conns_per_peer : TCP_DEFAULT_CONNS;
    if (t->conns_per_peer > KVF_TCP_MAX_CONNS_PER_PEER)
        t->conns_per_peer = KVF_TCP_MAX_CONNS_PER_PEER;
    t->chunk = p->chunk_bytes ? p->chunk_bytes : TCP_DEFAULT_CHUNK;
    if (t->chunk > KVF_TCP_MAX_CHUNK)
        t->chunk = KVF_TCP_MAX_CHUNK;
    t->connect_timeout_ms = p->connect_timeout_ms ? p->connect_timeout_ms : TCP_DEFAULT_CONNECT_MS;
    t->notify_cb = p->notify_cb;
    t->notify_arg = p->notify_arg;
    atomic_init(&t->stopping, false);

    rc = -pthread_mutex_init(&t->mu, NULL);
    if (rc) {
        rc = kvf__err(rc, "tcp create: mutex: %s", strerror(-rc));
        goto out_free;
    }
    rc = tcp_listen(t, &p->listen);
    if (rc)
        goto out_mutex;
    /* A session id created with port 0 is known to peers by the port chosen here: that is
     * the name the hello (and so a notification's sender) must carry. */
    kvf_hostport_t me;
    if (kvf__session_id_parse(t->local_sid, &me) == 0 && me.port == 0) {
        me.port = t->port;
        kvf__hostport_format(&me, t->local_sid, sizeof(t->local_sid));
    }
    t->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (t->wake_fd < 0) {
        rc = kvf__err(-errno, "tcp create: eventfd: %s", strerror(errno));
        goto out_listen;
    }
    rc = kvf__thread_start(&t->accept_thread, "kvf-tcp-accept", 0, tcp_accept_main, t);
    if (rc) {
        rc = kvf__err(rc, "tcp create: accept thread: %s", strerror(-rc));
        goto out_wake;
    }
    KVF_INFO(TCP_LOG, "listening on %s", t->listen_str);
    *out = (kvf_transport_t *)(void *)t;
    return 0;

out_wake:
    close(t->wake_fd);
out_listen:
    close(t->listen_fd);
out_mutex:
    pthread_mutex_destroy(&t->mu);
out_free:
    free(t);
    return rc;
}

static uint16_t tcp_port(const kvf_transport_t *t)
{
    return ((const struct tcp_transport *)(const void *)t)->port;
}

static void tcp_destroy(kvf_transport_t *tt)
{
    struct tcp_transport *t = tcp_of(tt);
    if (!t)
        return;
    atomic_store(&t->stopping, true);
    uint64_t one = 1;
    if (write(t->wake_fd, &one, sizeof(one)) < 0)
        KVF_WARN(TCP_LOG, "destroy %s: eventfd: %s", t->listen_str, strerror(errno));
    pthread_join(t->accept_thread, NULL);
    close(t->listen_fd);
    close(t->wake_fd);

    /* Cut every served connection: a thread blocked in recv() or send() returns at once, gives
     * back any region reference, and ends. Only then may the engine destroy the region table. */
    pthread_mutex_lock(&t->mu);
    for (struct tcp_sconn *sc = t->sconns; sc; sc = sc->next)
        shutdown(sc->fd, SHUT_RDWR);
    pthread_mutex_unlock(&t->mu);
    tcp_reap_sconns(t, true);

    tcp_peer_detach_all(t);
    pthread_mutex_destroy(&t->mu);
    KVF_DEBUG(TCP_LOG, "stopped listening on %s", t->listen_str);
    free(t);
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: slots and batches (all under peer->mu)
 * ------------------------------------------------------------------------------------------- */

static void tcp_batch_fail(struct tcp_batch *b, int code, const char *fmt, ...) KVF__PRINTF(3, 4);

static void tcp_batch_fail(struct tcp_batch *b, int code, const char *fmt, ...)
{
    if (atomic_load_explicit(&b->rc, memory_order_relaxed) != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->msg, sizeof(b->msg), fmt, ap);
    va_end(ap);
    atomic_store(&b->rc, code);
}

/* Give a slot back and count its chunk as done for its batch (whose error, if any, the caller
 * recorded already). */
static void tcp_slot_finish(struct tcp_conn *c, unsigned idx)
{
    struct tcp_slot *s = &c->slots[idx];
    struct tcp_batch *b = s->batch;
    for (size_t k = s->elem; b->left && k < s->elem + s->nelem; k++)
        if (--b->left[k] == 0 && b->status[k] == KVF_XFER_PENDING)
            b->status[k] = 0;
    s->req_id = 0;
    s->batch = NULL;
    c->free_slots[c->nfree++] = (uint16_t)idx;
    if (c->waiters)
        pthread_cond_broadcast(&c->cv);
    if (--b->outstanding == 0 && b->waiting)
        pthread_cond_signal(&b->cv);
}

/* Fail one slot with @code, naming its element and @why. */
static void tcp_slot_fail(struct tcp_conn *c, unsigned idx, int code, const char *why)
{
    struct tcp_slot *s = &c->slots[idx];
    struct tcp_batch *b = s->batch;
    /* A refused WRITEV wrote none of its elements: the one the target named failed, the others
     * never started. Any other failure applies to all the slot carries. */
    size_t bad = s->refused < s->nelem ? s->elem + s->refused : s->elem;
    const kvf_xfer_t *x = &b->x[bad];
    tcp_batch_fail(b, code, "tcp %s to %s, element %zu [0x%" PRIx64 ", +%zu): %s",
                   tcp_op_name(s->op), c->peer->sid, bad, x->remote, x->len, why);
    for (size_t k = s->elem; b->status && k < s->elem + s->nelem; k++)
        if (b->status[k] >= 0)
            b->status[k] = s->refused < s->nelem && k != bad ? -KVF_ECANCELED : code;
    tcp_slot_finish(c, idx);
}

/* Wake the receiver thread (after a role change or a break). */
static void tcp_rx_wake(struct tcp_conn *c)
{
    uint64_t one = 1;
    if (c->wake_fd >= 0 && write(c->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        KVF_DEBUG(TCP_LOG, "connection %u: waking the receiver: %s", c->idx, strerror(errno));
}

/* Requests registered on @c and not yet answered or failed. Under peer->mu. */
static unsigned tcp_conn_busy(const struct tcp_conn *c)
{
    return KVF_TCP_MAX_INFLIGHT - c->nfree;
}

/*
 * Mark the connection broken (if @gen is still current), shut its socket down so that its
 * receiver and any sender return, and fail every request on it except the one the receiver is
 * filling (the receiver fails that one itself once its recv() returns). Under peer->mu.
 */
static void tcp_conn_break_locked(struct tcp_conn *c, uint64_t gen, int code, const char *why)
{
    if (c->gen != gen)
        return;
    if (c->state == TCP_CONN_UP) {
        c->state = TCP_CONN_BROKEN;
        /* An idle connection closed by a peer that shut down is routine; a break that fails
         * requests in flight is worth a warning. */
        unsigned pending = 0;
        for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++)
            pending += c->slots[i].req_id != 0;
        if (code == -KVF_ECLOSED)
            KVF_DEBUG(TCP_LOG, "connection %u to %s closed", c->idx, c->peer->sid);
        else if (pending == 0)
            KVF_INFO(TCP_LOG, "connection %u to %s closed while idle: %s", c->idx, c->peer->sid,
                     why);
        else
            KVF_WARN(TCP_LOG, "connection %u to %s broke with %u request(s) in flight: %s", c->idx,
                     c->peer->sid, pending, why);
    }
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    tcp_rx_wake(c);
    char msg[TCP_ERRMSG_LEN];
    /* A long reason is cut; the start names the connection and the peer. */
    if (snprintf(msg, sizeof(msg), "connection %u to %s broke: %s", c->idx, c->peer->addr_str,
                 why) >= (int)sizeof(msg))
        KVF_DEBUG(TCP_LOG, "connection %u: break reason cut to %zu bytes", c->idx, sizeof(msg) - 1);
    for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++)
        if (c->slots[i].req_id && (int)i != c->rx_active)
            tcp_slot_fail(c, i, code, msg);
    pthread_cond_broadcast(&c->cv);
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: the receiver thread of one connection
 * ------------------------------------------------------------------------------------------- */

/* Read and drop @len bytes (an answer nobody waits for any more: its request timed out). */
static int tcp_rx_drain(struct tcp_conn *c, uint64_t len)
{
    while (len > 0) {
        size_t n = len < TCP_SCRATCH_LEN ? (size_t)len : TCP_SCRATCH_LEN;
        int rc = tcp_recv_full(c->fd, c->scratch, n, 0);
        if (rc)
            return rc;
        len -= n;
    }
    return 0;
}

/*
 * Read and handle one frame on @c (an answer): complete or fail its request, or drop it when its
 * request was given up. Called by whichever thread holds the connection's reader role, without
 * peer->mu. A caller reading for itself passes its batch as @self and its deadline: the answer
 * to its own request is received no later than that (the receiver thread passes NULL and 0;
 * other requests' answers are bounded by their owners, whose timeout cuts the connection).
 * Returns 0, or -1 with @why set when the connection must be broken.
 */
static int tcp_rx_one(struct tcp_conn *c, char *why, size_t whylen, const struct tcp_batch *self,
                      uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    uint8_t hbuf[KVF_TCP_HDR_LEN];
    char msg[KVF_TCP_MAX_MSG + 1];
    int rc;

    tcp_hdr_t h;
    rc = tcp_recv_full(c->fd, hbuf, sizeof(hbuf), deadline_ms);
    if (rc) {
        snprintf(why, whylen, "%s",
                 rc == -EPIPE ? "connection closed by the peer" : kvf_strerror(rc));
        return -1;
    }
    tcp_hdr_decode(hbuf, &h);
    if (!tcp_hdr_common_ok(&h, msg, sizeof(msg)) || h.type != KVF_TCP_RESP) {
        if (h.type != KVF_TCP_RESP && h.magic == KVF_TCP_MAGIC)
            snprintf(msg, sizeof(msg), "frame type %u where an answer was expected",
                     (unsigned)h.type);
        snprintf(why, whylen, "bad frame from the peer: %s", msg);
        return -1;
    }
    if (h.status != 0 && h.len > KVF_TCP_MAX_MSG) {
        snprintf(why, whylen,
                 "bad frame from the peer: error message of %" PRIu64 " bytes over KVF_TCP_MAX_MSG",
                 h.len);
        return -1;
    }
    if (h.len > KVF_TCP_MAX_CHUNK) {
        snprintf(why, whylen, "bad frame from the peer: length %" PRIu64 " over KVF_TCP_MAX_CHUNK",
                 h.len);
        return -1;
    }

    unsigned idx = (unsigned)(h.req_id & (KVF_TCP_MAX_INFLIGHT - 1));
    struct tcp_slot *s = &c->slots[idx];

    if (h.status != 0) {
        /* The message first, without the lock; then find the request again (it may have
         * been given up meanwhile: its req_id is then free or different). */
        rc = tcp_recv_full(c->fd, msg, (size_t)h.len, deadline_ms);
        if (rc) {
            snprintf(why, whylen, "%s", kvf_strerror(rc));
            return -1;
        }
        kvf__printable(msg, (size_t)h.len + 1, msg, (size_t)h.len);
        int code = h.status < 65536 ? -(int)h.status : -KVF_EPROTO;
        pthread_mutex_lock(&p->mu);
        if (s->req_id == h.req_id) {
            char m2[TCP_ERRMSG_LEN];
            if (s->op == KVF_TCP_WRITEV && h.addr < s->nelem)
                s->refused = (uint32_t)h.addr;
            snprintf(m2, sizeof(m2), "refused by the target: %s", msg);
            tcp_slot_fail(c, idx, code, m2);
        }
        pthread_mutex_unlock(&p->mu);
        return 0;
    }

    pthread_mutex_lock(&p->mu);
    if (s->req_id != h.req_id) {
        pthread_mutex_unlock(&p->mu);
        rc = tcp_rx_drain(c, h.len);
        if (rc) {
            snprintf(why, whylen, "%s", kvf_strerror(rc));
            return -1;
        }
        return 0;
    }
    uint8_t op = s->op;
    uint64_t want = op == KVF_TCP_READ ? s->len : 0;
    if (h.len != want) {
        pthread_mutex_unlock(&p->mu);
        snprintf(why, whylen,
                 "bad frame from the peer: answer of %" PRIu64 " bytes to a %s of %" PRIu64, h.len,
                 tcp_op_name(op), want);
        return -1;
    }
    if (want == 0) {
        tcp_slot_finish(c, idx);
        pthread_mutex_unlock(&p->mu);
        return 0;
    }
    /* A READ answer goes straight into the caller's buffer, outside the lock. rx_active tells
     * a caller that gives up on this request to cut the connection and wait for us, rather
     * than return while we may still write into its memory. */
    c->rx_active = (int)idx;
    uint8_t *dst = s->local;
    uint64_t dl = s->batch == self ? deadline_ms : 0;
    pthread_mutex_unlock(&p->mu);
    rc = tcp_recv_full(c->fd, dst, (size_t)want, dl);
    pthread_mutex_lock(&p->mu);
    c->rx_active = -1;
    if (rc) {
        snprintf(why, whylen, "%s in the middle of a read answer",
                 rc == -EPIPE           ? "connection closed"
                 : rc == -KVF_ETIMEDOUT ? "timed out"
                                        : kvf_strerror(rc));
        tcp_slot_fail(c, idx, rc == -KVF_ETIMEDOUT ? rc : -KVF_EPEERGONE, why);
    } else {
        tcp_slot_finish(c, idx);
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&p->mu);
    if (rc)
        return -1;
    return 0;
}

/*
 * The receiver thread of one connection. While it holds the reader role it reads answers; when
 * nothing is pending it only watches the socket for the peer closing it (so an idle connection
 * to a peer that went away is marked broken, and the next transfer reconnects), and its eventfd
 * for role changes. It ends when the connection breaks or is replaced.
 */
static void *tcp_rx_main(void *arg)
{
    struct tcp_conn *c = arg;
    struct tcp_peer *p = c->peer;
    const uint64_t gen = c->rx_gen;
    const int fd = c->fd, wfd = c->wake_fd; /* both stay open until this thread is joined */
    char why[TCP_ERRMSG_LEN];

    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (c->gen != gen || c->state != TCP_CONN_UP) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        if (c->reader == TCP_READER_RX) {
            pthread_mutex_unlock(&p->mu);
            int rc = tcp_rx_one(c, why, sizeof(why), NULL, 0);
            pthread_mutex_lock(&p->mu);
            if (rc)
                break;
            if (c->reader == TCP_READER_RX && tcp_conn_busy(c) == 0)
                c->reader = TCP_READER_NONE;
            continue;
        }
        bool watch = c->reader == TCP_READER_NONE;
        pthread_mutex_unlock(&p->mu);
        struct pollfd pf[2] = {{wfd, POLLIN, 0}, {fd, POLLRDHUP, 0}};
        int pr = poll(pf, watch ? 2 : 1, -1);
        uint64_t v;
        if (pr > 0 && (pf[0].revents & POLLIN) && read(wfd, &v, sizeof(v)) < 0)
            v = 0;
        pthread_mutex_lock(&p->mu);
        /* The peer closed, reset, or sent something unasked: read what is there. */
        if (watch && pr > 0 && pf[1].revents && c->reader == TCP_READER_NONE)
            c->reader = TCP_READER_RX;
    }
    tcp_conn_break_locked(c, gen, p->closing ? -KVF_ECLOSED : -KVF_EPEERGONE, why);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: connecting
 * ------------------------------------------------------------------------------------------- */

/* Connect to one address and exchange HELLO/RESP, all before @deadline_ms. Returns the fd, or a
 * negative code with @why filled in. */
static int tcp_connect_addr(struct tcp_peer *p, const struct addrinfo *ai, uint64_t deadline_ms,
                            char *why, size_t whylen)
{
    int rc;
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
        snprintf(why, whylen, "socket: %s", strerror(errno));
        return -errno;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS) {
            rc = -errno;
            snprintf(why, whylen, "connect: %s", strerror(errno));
            goto out_close;
        }
        for (;;) {
            uint64_t now = kvf__now_ms();
            if (now >= deadline_ms) {
                snprintf(why, whylen, "connect: no answer in time");
                rc = -KVF_ETIMEDOUT;
                goto out_close;
            }
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            int n = poll(&pf, 1, (int)(deadline_ms - now));
            if (n > 0)
                break;
            if (n < 0 && errno != EINTR) {
                rc = -errno;
                snprintf(why, whylen, "poll: %s", strerror(errno));
                goto out_close;
            }
        }
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            rc = -err;
            snprintf(why, whylen, "connect: %s", strerror(err));
            goto out_close;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    uint8_t frame[KVF_TCP_HDR_LEN + KVF_TCP_MAX_MSG];
    size_t sl = strnlen(p->local_sid, KVF_TCP_MAX_MSG);
    tcp_hdr_encode(frame, KVF_TCP_HELLO, 0, 1, 0, sl);
    memcpy(frame + KVF_TCP_HDR_LEN, p->local_sid, sl);
    rc = tcp_nb_io(fd, frame, KVF_TCP_HDR_LEN + sl, true, deadline_ms);
    if (rc == 0)
        rc = tcp_nb_io(fd, frame, KVF_TCP_HDR_LEN, false, deadline_ms);
    if (rc) {
        snprintf(why, whylen, "hello: %s",
                 rc == -KVF_ETIMEDOUT ? "no answer in time"
                 : rc == -EPIPE       ? "connection closed by the peer"
                                      : kvf_strerror(rc));
        goto out_close;
    }
    tcp_hdr_t h;
    tcp_hdr_decode(frame, &h);
    char bad[96];
    if (!tcp_hdr_common_ok(&h, bad, sizeof(bad)) || h.type != KVF_TCP_RESP || h.req_id != 1 ||
        h.status != 0 || h.len != 0) {
        snprintf(why, whylen, "hello: unexpected answer (%s)",
                 h.magic != KVF_TCP_MAGIC ? "not a kvferry tcp endpoint" : "bad RESP");
        rc = -KVF_EPROTO;
        goto out_close;
    }
    /* From here on blocking I/O: senders wake every slice to check their deadline; the
     * receiver blocks until data or shutdown(). */
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    tcp_set_timeout(fd, SO_SNDTIMEO, TCP_CLIENT_SLICE_MS);
    return fd;

out_close:
    close(fd);
    return rc;
}

/*
 * (Re)open connection @c. Called with peer->mu held and c->state DOWN or BROKEN; returns with it
 * held, the state UP (0) or DOWN (error, message set), and waiters woken.
 */
static int tcp_conn_open_locked(struct tcp_conn *c, uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    char why[TCP_ADDR_LEN + 128] = "";
    int rc, fd = -1;

    c->state = TCP_CONN_CONNECTING;
    bool join = c->rx_started;
    c->rx_started = false;
    pthread_mutex_unlock(&p->mu);

    /* A broken connection's receiver has been woken by shutdown(); let it finish before its fd is
     * closed. */
    if (join)
        pthread_join(c->rx_thread, NULL);
    pthread_mutex_lock(&c->send_mu);
    pthread_mutex_lock(&p->mu);
    /* A caller reading its own answer uses the fd without the lock; the break that got us here
     * shut the socket down, so it is on its way out. */
    while (c->inline_active)
        pthread_cond_wait(&c->cv, &p->mu);
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
        c->gen++;
    }
    if (c->wake_fd >= 0) {
        close(c->wake_fd);
        c->wake_fd = -1;
    }
    c->reader = TCP_READER_NONE;
    c->inline_b = NULL;
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&c->send_mu);

    uint64_t cdl = kvf__now_ms() + p->connect_timeout_ms;
    bool by_deadline = deadline_ms < cdl;
    if (by_deadline)
        cdl = deadline_ms;

    char port[8];
    snprintf(port, sizeof(port), "%u", (unsigned)p->addr.port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (p->addr.kind != KVF_HOST_NAME ? AI_NUMERICHOST : 0);
    int g = getaddrinfo(p->addr.host, port, &hints, &res);
    if (g) {
        snprintf(why, sizeof(why), "resolving %s: %s", p->addr.host,
                 g == EAI_SYSTEM ? strerror(errno) : gai_strerror(g));
        rc = -KVF_EPEERGONE;
    } else {
        rc = -KVF_EPEERGONE;
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
            rc = tcp_connect_addr(p, ai, cdl, why, sizeof(why));
            if (rc >= 0 || rc == -KVF_ETIMEDOUT)
                break;
        }
        freeaddrinfo(res);
    }
    if (rc >= 0) {
        fd = rc;
        rc = 0;
    } else if (rc == -KVF_ETIMEDOUT && !by_deadline) {
        /* The peer did not answer within connect_timeout_ms: it is not there (as opposed to the
         * transfer running out of time). */
        rc = -KVF_EPEERGONE;
    } else if (rc != -KVF_ETIMEDOUT) {
        rc = -KVF_EPEERGONE;
    }

    pthread_mutex_lock(&c->send_mu);
    pthread_mutex_lock(&p->mu);
    if (rc == 0 && p->closing) {
        snprintf(why, sizeof(why), "transport is closing");
        rc = -KVF_ECLOSED;
    }
    if (rc == 0) {
        c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (c->wake_fd < 0) {
            snprintf(why, sizeof(why), "eventfd: %s", strerror(errno));
            rc = -errno;
        }
    }
    if (rc == 0) {
        c->fd = fd;
        c->gen++;
        c->rx_gen = c->gen;
        c->rx_active = -1;
        c->reader = TCP_READER_NONE;
        c->inline_b = NULL;
        int prc = kvf__thread_start(&c->rx_thread, "kvf-tcp-rx", KVF_THREAD_SMALL_STACK,
                                    tcp_rx_main, c);
        if (prc) {
            snprintf(why, sizeof(why), "receiver thread: %s", strerror(-prc));
            rc = prc;
            c->fd = -1;
            c->gen++;
            close(c->wake_fd);
            c->wake_fd = -1;
        } else {
            c->rx_started = true;
        }
    }
    if (rc && fd >= 0 && c->fd != fd)
        close(fd);
    c->state = rc ? TCP_CONN_DOWN : TCP_CONN_UP;
    pthread_mutex_unlock(&c->send_mu);
    pthread_cond_broadcast(&c->cv);
    if (rc)
        return kvf__err(rc, "tcp connect to %s (%s): %s", p->sid, p->addr_str, why);
    KVF_DEBUG(TCP_LOG, "connection %u to %s (%s) up", c->idx, p->sid, p->addr_str);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: peers
 * ------------------------------------------------------------------------------------------- */

static int tcp_conn_init(struct tcp_peer *p, struct tcp_conn *c, unsigned idx)
{
    int rc;
    c->peer = p;
    c->idx = idx;
    c->fd = -1;
    c->wake_fd = -1;
    c->rx_active = -1;
    c->state = TCP_CONN_DOWN;
    for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++)
        c->free_slots[i] = (uint16_t)(KVF_TCP_MAX_INFLIGHT - 1 - i);
    c->nfree = KVF_TCP_MAX_INFLIGHT;
    c->scratch = malloc(TCP_SCRATCH_LEN);
    if (!c->scratch)
        return -KVF_ENOMEM;
    rc = kvf__cond_init_monotonic(&c->cv);
    if (rc)
        goto out_scratch;
    rc = -pthread_mutex_init(&c->send_mu, NULL);
    if (rc)
        goto out_cv;
    return 0;

out_cv:
    pthread_cond_destroy(&c->cv);
out_scratch:
    free(c->scratch);
    return rc;
}

static void tcp_conn_fini(struct tcp_conn *c)
{
    pthread_mutex_destroy(&c->send_mu);
    pthread_cond_destroy(&c->cv);
    free(c->scratch);
}

static int tcp_peer_open(kvf_transport_t *tt, const kvf_tpeer_desc_t *d, kvf_tpeer_t **out)
{
    struct tcp_transport *t = tcp_of(tt);
    const char *peer_sid = d ? d->sid : NULL;
    const kvf_hostport_t *addr = d ? &d->addr : NULL;
    int rc;
    if (!t || !addr || !out)
        return kvf__err(-KVF_EINVAL, "tcp peer open: missing argument");
    unsigned n = t->conns_per_peer;
    struct tcp_peer *p = calloc(1, sizeof(*p) + n * sizeof(struct tcp_conn));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "tcp peer open: out of memory");
    p->t = t;
    p->addr = *addr;
    kvf__hostport_format(addr, p->addr_str, sizeof(p->addr_str));
    snprintf(p->sid, sizeof(p->sid), "%s", peer_sid ? peer_sid : p->addr_str);
    snprintf(p->local_sid, sizeof(p->local_sid), "%s", t->local_sid);
    p->chunk = t->chunk;
    p->connect_timeout_ms = t->connect_timeout_ms;
    p->nconns = 0;
    atomic_init(&p->rr, 0);
    rc = -pthread_mutex_init(&p->mu, NULL);
    if (rc)
        goto out_free;
    rc = kvf__cond_init_monotonic(&p->cv);
    if (rc)
        goto out_mu;
    for (; p->nconns < n; p->nconns++) {
        rc = tcp_conn_init(p, &p->conns[p->nconns], p->nconns);
        if (rc)
            goto out_conns;
    }
    pthread_mutex_lock(&t->mu);
    p->next = t->peers;
    t->peers = p;
    pthread_mutex_unlock(&t->mu);
    *out = (kvf_tpeer_t *)(void *)p;
    return 0;

out_conns:
    while (p->nconns > 0)
        tcp_conn_fini(&p->conns[--p->nconns]);
    pthread_cond_destroy(&p->cv);
out_mu:
    pthread_mutex_destroy(&p->mu);
out_free:
    free(p);
    return kvf__err(rc, "tcp peer open %s: %s", peer_sid ? peer_sid : "?", kvf_strerror(rc));
}

/* Stop a peer's connections: fail what is pending with -KVF_ECLOSED, refuse new transfers, wait
 * for the running ones to return, then join the receivers. */
static void tcp_peer_shut(struct tcp_peer *p)
{
    pthread_mutex_lock(&p->mu);
    p->closing = true;
    for (unsigned i = 0; i < p->nconns; i++) {
        struct tcp_conn *c = &p->conns[i];
        tcp_conn_break_locked(c, c->gen, -KVF_ECLOSED, "transport is closing");
    }
    while (p->active > 0)
        pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->nconns; i++) {
        struct tcp_conn *c = &p->conns[i];
        if (c->rx_started) {
            pthread_join(c->rx_thread, NULL);
            c->rx_started = false;
        }
        if (c->fd >= 0) {
            close(c->fd);
            c->fd = -1;
        }
        if (c->wake_fd >= 0) {
            close(c->wake_fd);
            c->wake_fd = -1;
        }
    }
}

static void tcp_peer_detach_all(struct tcp_transport *t)
{
    pthread_mutex_lock(&t->mu);
    struct tcp_peer *list = t->peers;
    t->peers = NULL;
    pthread_mutex_unlock(&t->mu);
    for (struct tcp_peer *p = list; p; p = p->next) {
        tcp_peer_shut(p);
        p->t = NULL;
    }
}

static void tcp_peer_close(kvf_tpeer_t *pp)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    if (!p)
        return;
    struct tcp_transport *t = p->t;
    if (t) {
        pthread_mutex_lock(&t->mu);
        for (struct tcp_peer **q = &t->peers; *q; q = &(*q)->next) {
            if (*q == p) {
                *q = p->next;
                break;
            }
        }
        pthread_mutex_unlock(&t->mu);
        tcp_peer_shut(p);
    }
    for (unsigned i = 0; i < p->nconns; i++)
        tcp_conn_fini(&p->conns[i]);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* ---------------------------------------------------------------------------------------------
 * Initiator side: transfer
 * ------------------------------------------------------------------------------------------- */

/* Lock a connection's send mutex, giving up at @deadline_ms: a sender stalled on a peer that
 * stopped reading holds it until its own deadline, which may be later than ours. */
static int tcp_send_lock(struct tcp_conn *c, uint64_t deadline_ms)
{
    struct timespec ts;
#if defined(__SANITIZE_THREAD__)
    /* ThreadSanitizer does not know pthread_mutex_clocklock() and would report every unlock as
     * unbalanced; give it the CLOCK_REALTIME variant it does intercept. */
    uint64_t now = kvf__now_ms(), left = deadline_ms > now ? deadline_ms - now : 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(left / 1000u);
    ts.tv_nsec += (long)(left % 1000u) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return pthread_mutex_timedlock(&c->send_mu, &ts);
#else
    kvf__deadline_ts(&ts, deadline_ms);
    return pthread_mutex_clocklock(&c->send_mu, CLOCK_MONOTONIC, &ts);
#endif
}

/*
 * Post one chunk: find a usable connection and a free slot on it, register the request in the
 * slot (so the receiver can complete it), and send its frame from the caller's memory.
 * Returns 0 when the frame was sent (its completion comes later), or a negative code with the
 * batch's error recorded; a request that was registered is then failed or finished already.
 */
static int tcp_post(struct tcp_peer *p, struct tcp_batch *b, uint8_t op, size_t elem,
                    uint32_t nelem, uint64_t off, uint64_t len, bool only, uint64_t deadline_ms)
{
    const kvf_xfer_t *x = &b->x[elem];
    unsigned ci = atomic_fetch_add_explicit(&p->rr, 1, memory_order_relaxed) % p->nconns;
    struct tcp_conn *c = &p->conns[ci];
    int rc = 0;

    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (p->closing) {
            tcp_batch_fail(b, -KVF_ECLOSED, "tcp %s to %s, element %zu: transport is closing",
                           tcp_op_name(op), p->sid, elem);
            rc = -KVF_ECLOSED;
            goto out_unlock;
        }
        if (c->state == TCP_CONN_UP && c->nfree > 0)
            break;
        if (c->state == TCP_CONN_DOWN || c->state == TCP_CONN_BROKEN) {
            rc = tcp_conn_open_locked(c, deadline_ms);
            if (rc) {
                tcp_batch_fail(b, rc, "tcp %s to %s, element %zu: %s", tcp_op_name(op), p->sid,
                               elem, kvf_last_error());
                goto out_unlock;
            }
            continue;
        }
        /* Connecting by another thread, or every slot in use: wait for a change. */
        c->waiters++;
        bool more = kvf__cond_wait_until(&c->cv, &p->mu, deadline_ms);
        c->waiters--;
        if (!more) {
            tcp_batch_fail(b, -KVF_ETIMEDOUT,
                           "tcp %s to %s, element %zu: timed out waiting for connection %u (%s)",
                           tcp_op_name(op), p->sid, elem, c->idx,
                           c->state == TCP_CONN_UP ? "all requests in flight" : "connecting");
            rc = -KVF_ETIMEDOUT;
            goto out_unlock;
        }
    }

    unsigned idx = c->free_slots[--c->nfree];
    struct tcp_slot *s = &c->slots[idx];
    uint64_t req_id = (++c->seq << TCP_SLOT_BITS) | idx;
    s->req_id = req_id;
    s->batch = b;
    s->elem = elem;
    s->nelem = nelem;
    s->refused = UINT32_MAX;
    s->op = op;
    /* Someone must read the answer: the caller itself when this is its batch's only request and
     * nobody reads this connection now, else the receiver thread. */
    if (c->reader == TCP_READER_NONE) {
        if (only) {
            c->reader = TCP_READER_INLINE;
            c->inline_b = b;
        } else {
            c->reader = TCP_READER_RX;
            tcp_rx_wake(c);
        }
    }
    s->local = (uint8_t *)x->local + off;
    s->remote = x->remote + off;
    s->len = len;
    b->outstanding++;
    uint64_t gen = c->gen;
    pthread_mutex_unlock(&p->mu);

    uint8_t hdr[KVF_TCP_HDR_LEN];
    uint8_t segs[KVF_TCP_MAX_SEGS * KVF_TCP_SEG_LEN];
    struct iovec iov[TCP_WRITEV_IOV];
    int niov = op == KVF_TCP_READ ? 1 : 2;
    iov[0] = (struct iovec){hdr, sizeof(hdr)};
    if (op == KVF_TCP_WRITEV) {
        tcp_hdr_encode(hdr, op, 0, req_id, nelem, len);
        iov[1] = (struct iovec){segs, (size_t)nelem * KVF_TCP_SEG_LEN};
        for (uint32_t k = 0; k < nelem; k++) {
            kvf__put_le64(segs + (size_t)k * KVF_TCP_SEG_LEN, x[k].remote);
            kvf__put_le64(segs + (size_t)k * KVF_TCP_SEG_LEN + 8, x[k].len);
            iov[niov++] = (struct iovec){x[k].local, x[k].len};
        }
    } else {
        tcp_hdr_encode(hdr, op, 0, req_id, s->remote, len);
        iov[1] = (struct iovec){s->local, (size_t)len};
    }

    int lrc = tcp_send_lock(c, deadline_ms);
    if (lrc) {
        /* Never sent: take the request back ourselves (unless the connection broke and failed
         * it meanwhile). */
        pthread_mutex_lock(&p->mu);
        if (c->gen == gen && s->req_id == req_id)
            tcp_slot_fail(c, idx, -KVF_ETIMEDOUT, "timed out waiting to send");
        pthread_mutex_unlock(&p->mu);
        return -KVF_ETIMEDOUT;
    }
    if (c->gen != gen) {
        /* The connection was replaced: this request was failed with it. */
        pthread_mutex_unlock(&c->send_mu);
        return -KVF_EPEERGONE;
    }
    rc = tcp_sendv(c->fd, iov, niov, deadline_ms, 0);
    pthread_mutex_unlock(&c->send_mu);
    if (rc == 0)
        return 0;

    /* A frame may have gone out in part: the stream is out of step, so the connection is done
     * for. Record this batch's own reason first; the break fails every request on it. */
    char why[160];
    pthread_mutex_lock(&p->mu);
    if (rc == -KVF_ETIMEDOUT) {
        tcp_batch_fail(b, rc,
                       "tcp %s to %s, element %zu [0x%" PRIx64 ", +%zu): timed out "
                       "sending (the peer stopped reading)",
                       tcp_op_name(op), p->sid, elem, x->remote, x->len);
        snprintf(why, sizeof(why), "send stalled until a transfer's deadline");
    } else {
        snprintf(why, sizeof(why), "send: %s", kvf_strerror(rc));
        rc = -KVF_EPEERGONE;
    }
    tcp_conn_break_locked(c, gen, -KVF_EPEERGONE, why);
out_unlock:
    if (rc && b->status && b->status[elem] >= 0)
        b->status[elem] = rc;
    pthread_mutex_unlock(&p->mu);
    return rc;
}

/*
 * Give up on every request of @b still in flight (its deadline passed), so that nothing touches
 * the caller's buffers after transfer() returns. Under peer->mu. A request the receiver is filling
 * right now (a READ answer) cannot be withdrawn: its connection is cut so that the receiver's
 * recv() returns, and we wait for the receiver to let go of the buffer.
 */
static void tcp_batch_abort(struct tcp_peer *p, struct tcp_batch *b)
{
    for (unsigned ci = 0; ci < p->nconns; ci++) {
        struct tcp_conn *c = &p->conns[ci];
        for (unsigned i = 0; i < KVF_TCP_MAX_INFLIGHT; i++) {
            if (!c->slots[i].req_id || c->slots[i].batch != b)
                continue;
            if (c->rx_active == (int)i) {
                tcp_conn_break_locked(c, c->gen, -KVF_EPEERGONE,
                                      "a read timed out while its answer was arriving");
                c->waiters++;
                for (unsigned waited = 0; c->rx_active == (int)i; waited++) {
                    /* shutdown() makes the recv() return at once; this only logs if it does not. */
                    struct timespec ts;
                    kvf__deadline_ts(&ts, kvf__now_ms() + 1000);
                    if (pthread_cond_timedwait(&c->cv, &p->mu, &ts) == ETIMEDOUT)
                        KVF_ERROR(TCP_LOG,
                                  "waiting %u s for the receiver of connection %u to %s "
                                  "to leave a timed-out read's buffer",
                                  waited + 1, c->idx, p->sid);
                }
                c->waiters--;
            }
            if (c->slots[i].req_id && c->slots[i].batch == b) {
                if (b->status && b->status[c->slots[i].elem] >= 0)
                    b->status[c->slots[i].elem] = -KVF_ETIMEDOUT;
                tcp_slot_finish(c, i);
            }
        }
    }
}

/* The connection whose answers @b's caller reads itself, or NULL. Under peer->mu. */
static struct tcp_conn *tcp_inline_conn(struct tcp_peer *p, const struct tcp_batch *b)
{
    for (unsigned i = 0; i < p->nconns; i++)
        if (p->conns[i].reader == TCP_READER_INLINE && p->conns[i].inline_b == b)
            return &p->conns[i];
    return NULL;
}

/* Give the reader role up: to the receiver thread if requests are still pending, else to
 * nobody. Under peer->mu. */
static void tcp_inline_release(struct tcp_conn *c, const struct tcp_batch *b)
{
    if (c->reader != TCP_READER_INLINE || c->inline_b != b)
        return;
    c->inline_b = NULL;
    if (c->state == TCP_CONN_UP && tcp_conn_busy(c) > 0) {
        c->reader = TCP_READER_RX;
        tcp_rx_wake(c);
    } else {
        c->reader = TCP_READER_NONE;
    }
}

/*
 * Read answers on @c in the caller's thread until @b is complete, the connection breaks, or
 * @deadline_ms; then give the role up. Answers to other callers' requests that arrive first are
 * handled as the receiver would. Called and returns with peer->mu held.
 */
static void tcp_read_inline(struct tcp_conn *c, struct tcp_batch *b, uint64_t deadline_ms)
{
    struct tcp_peer *p = c->peer;
    const uint64_t gen = c->gen;
    char why[TCP_ERRMSG_LEN];
    while (b->outstanding > 0 && c->reader == TCP_READER_INLINE && c->inline_b == b &&
           c->gen == gen && c->state == TCP_CONN_UP) {
        int fd = c->fd;
        c->inline_active = true;
        pthread_mutex_unlock(&p->mu);
        uint64_t now = kvf__now_ms();
        uint64_t left = deadline_ms > now ? deadline_ms - now : 0;
        struct pollfd pf = {fd, POLLIN, 0};
        int pr = poll(&pf, 1, left > INT32_MAX ? INT32_MAX : (int)left);
        int rc = pr > 0 ? tcp_rx_one(c, why, sizeof(why), b, deadline_ms) : 0;
        pthread_mutex_lock(&p->mu);
        c->inline_active = false;
        pthread_cond_broadcast(&c->cv);
        if (rc) {
            tcp_conn_break_locked(c, gen, p->closing ? -KVF_ECLOSED : -KVF_EPEERGONE, why);
            break;
        }
        if (pr == 0)
            break; /* the deadline: the caller gives up */
    }
    tcp_inline_release(c, b);
}

/* Enter a batch on @p: refused once the peer handle is closing. */
static int tcp_batch_begin(struct tcp_peer *p, struct tcp_batch *b, const kvf_xfer_t *x)
{
    memset(b, 0, sizeof(*b));
    b->x = x;
    atomic_init(&b->rc, 0);
    int rc = kvf__cond_init_monotonic(&b->cv);
    if (rc)
        return kvf__err(rc, "tcp transfer: condition variable: %s", kvf_strerror(rc));
    pthread_mutex_lock(&p->mu);
    if (p->closing) {
        pthread_mutex_unlock(&p->mu);
        pthread_cond_destroy(&b->cv);
        return kvf__err(-KVF_ECLOSED, "tcp transfer to %s: transport is closing", p->sid);
    }
    p->active++;
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* Wait for every posted request of @b (giving up on them at @deadline_ms), leave the peer, and
 * return the batch's result. */
static int tcp_batch_end(struct tcp_peer *p, struct tcp_batch *b, uint64_t deadline_ms)
{
    pthread_mutex_lock(&p->mu);
    b->waiting = true;
    while (b->outstanding > 0) {
        struct tcp_conn *ic = tcp_inline_conn(p, b);
        if (ic) {
            tcp_read_inline(ic, b, deadline_ms);
            continue;
        }
        if (!kvf__cond_wait_until(&b->cv, &p->mu, deadline_ms)) {
            tcp_batch_fail(b, -KVF_ETIMEDOUT,
                           "tcp transfer to %s: timed out with %zu "
                           "request(s) unanswered",
                           p->sid, b->outstanding);
            tcp_batch_abort(p, b);
            break;
        }
    }
    b->waiting = false;
    /* A request that failed before its answer could be read leaves the role with us. */
    struct tcp_conn *ic = tcp_inline_conn(p, b);
    if (ic)
        tcp_inline_release(ic, b);
    if (--p->active == 0 && p->closing)
        pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_cond_destroy(&b->cv);

    int rc = atomic_load(&b->rc);
    if (rc)
        return kvf__err(rc, "%s", b->msg);
    return 0;
}

static int tcp_transfer(kvf_tpeer_t *pp, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                        const kvf_xfer_ctl_t *ctl)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    struct tcp_batch b;
    uint32_t *left = NULL;
    int rc;

    if (!p || (n && !x))
        return kvf__err(-KVF_EINVAL, "tcp transfer: missing argument");
    for (size_t i = 0; i < n; i++) {
        if (x[i].op != KVF_OP_WRITE && x[i].op != KVF_OP_READ)
            return kvf__err(-KVF_EINVAL, "tcp transfer to %s, element %zu: bad op %d", p->sid, i,
                            (int)x[i].op);
        if (x[i].len == 0 || !x[i].local)
            return kvf__err(-KVF_EINVAL, "tcp transfer to %s, element %zu: %s", p->sid, i,
                            x[i].len == 0 ? "length 0" : "no local buffer");
        if (x[i].remote + x[i].len < x[i].remote)
            return kvf__err(-KVF_EINVAL,
                            "tcp transfer to %s, element %zu: [0x%" PRIx64
                            ", +%zu) runs past the end of the address space",
                            p->sid, i, x[i].remote, x[i].len);
    }
    if (n == 0)
        return 0;
    if (ctl && ctl->status) {
        /* An element is done when its last chunk is answered. */
        left = malloc(n * sizeof(*left));
        if (!left)
            return kvf__err(-KVF_ENOMEM, "tcp transfer to %s: out of memory for %zu elements",
                            p->sid, n);
        for (size_t i = 0; i < n; i++)
            left[i] = (uint32_t)((x[i].len + p->chunk - 1) / p->chunk);
    }
    rc = tcp_batch_begin(p, &b, x);
    if (rc) {
        free(left);
        return rc;
    }
    b.status = left ? ctl->status : NULL;
    b.left = left;

    /* Post every request, sending each from this thread; stop at the first error, or when the
     * caller cancels (what was sent is still waited for). Runs of small writes go as one WRITEV
     * each (one frame, one answer); other elements as chunks of at most p->chunk bytes. */
    const atomic_bool *cancel = ctl ? ctl->cancel : NULL;
    for (size_t i = 0; i < n && !atomic_load_explicit(&b.rc, memory_order_relaxed);) {
        if (cancel && atomic_load_explicit(cancel, memory_order_relaxed)) {
            pthread_mutex_lock(&p->mu);
            tcp_batch_fail(&b, -KVF_ECANCELED, "tcp transfer to %s: cancelled at element %zu",
                           p->sid, i);
            pthread_mutex_unlock(&p->mu);
            break;
        }
        size_t j = i;
        uint64_t total = 0;
        while (j < n && j - i < KVF_TCP_MAX_SEGS && x[j].op == KVF_OP_WRITE &&
               x[j].len <= TCP_GATHER_ELEM_MAX && total + x[j].len <= p->chunk)
            total += x[j++].len;
        if (j - i >= 2) {
            if (tcp_post(p, &b, KVF_TCP_WRITEV, i, (uint32_t)(j - i), 0, total, j - i == n,
                         deadline_ms))
                break;
            i = j;
            continue;
        }
        uint8_t op = x[i].op == KVF_OP_READ ? KVF_TCP_READ : KVF_TCP_WRITE;
        for (uint64_t off = 0; off < x[i].len; off += p->chunk) {
            if (off && cancel && atomic_load_explicit(cancel, memory_order_relaxed)) {
                pthread_mutex_lock(&p->mu);
                tcp_batch_fail(&b, -KVF_ECANCELED,
                               "tcp transfer to %s: cancelled at element %zu (offset %" PRIu64 ")",
                               p->sid, i, off);
                pthread_mutex_unlock(&p->mu);
                break;
            }
            uint64_t len = x[i].len - off < p->chunk ? x[i].len - off : p->chunk;
            if (tcp_post(p, &b, op, i, 1, off, len, n == 1 && len == x[i].len, deadline_ms))
                break;
            if (atomic_load_explicit(&b.rc, memory_order_relaxed))
                break;
        }
        i++;
    }
    rc = tcp_batch_end(p, &b, deadline_ms);
    free(left);
    return rc;
}

static int tcp_notify(kvf_tpeer_t *pp, const void *msg, size_t len, uint64_t deadline_ms)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    struct tcp_batch b;
    static const uint8_t empty[1];

    if (!p || (len && !msg))
        return kvf__err(-KVF_EINVAL, "tcp notify: missing argument");
    if (len > KVF_NOTIFY_MAX)
        return kvf__err(-KVF_ETOOBIG, "tcp notify to %s: %zu bytes over KVF_NOTIFY_MAX (%u)",
                        p->sid, len, KVF_NOTIFY_MAX);
    /* The frame travels like a one-chunk write to address 0: header, then the message. */
    const kvf_xfer_t x = {
        .op = KVF_OP_WRITE, .local = len ? (void *)msg : (void *)empty, .remote = 0, .len = len};
    int rc = tcp_batch_begin(p, &b, &x);
    if (rc)
        return rc;
    tcp_post(p, &b, KVF_TCP_NOTIFY, 0, 1, 0, len, true, deadline_ms);
    return tcp_batch_end(p, &b, deadline_ms);
}

const struct kvf_transport_ops kvf__tcp_ops = {
    .size = sizeof(struct kvf_transport_ops),
    .name = "tcp",
    .caps = KVF_TCAP_LISTEN | KVF_TCAP_OFFER | KVF_TCAP_NOTIFY,
    .check = KVF_CHECK_TARGET,
    .create = tcp_create,
    .port = tcp_port,
    .destroy = tcp_destroy,
    .start = kvf__transport_nop,
    .stop = kvf__transport_nop,
    .peer_open = tcp_peer_open,
    .peer_close = tcp_peer_close,
    .transfer = tcp_transfer,
    .notify = tcp_notify,
    .regions_gen = kvf__transport_enotsup_gen,
    .regions_changed = kvf__transport_nop_regions,
    .mem_export = kvf__transport_nop_export,
    .mem_unexport = kvf__transport_nop_unexport,
    .mem_sock = kvf__transport_no_sock,
};
