/*
 * Abuse of the built-in config store (issue 12, "Nothing held without bound"): floods of idle
 * connections, one client filling the store, 150,000 keys under the sessions prefix, never-read
 * watches multiplying every SET, and frame headers announcing bodies that never come. Each case
 * replays the attack against a real server with raw sockets, on loopback only (127.0.0.x sources),
 * bounded in count and time, and closes every socket and reaps every process it made. Where the
 * finding is about memory, it is measured in /proc (VmRSS, VmSize).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/wire.h"
#include "store/proto.h"
#include "test_util.h"

#define IO_MS (KVF_TEST_SANITIZED ? 20000u : 5000u)

/* ---------------------------------------------------------------------------------------------
 * A server, raw sockets and frames
 * ------------------------------------------------------------------------------------------- */

static kvf_store_server_t *server_start(const kvf_store_server_opts_t *o)
{
    kvf_store_server_t *srv = NULL;
    int rc = kvf_store_server_start_opts("tcp://127.0.0.1:0", o, &srv);
    if (rc < 0)
        fail_msg("kvf_store_server_start_opts: %s: %s", kvf_err_name(rc), kvf_last_error());
    return srv;
}

static uint16_t server_port(kvf_store_server_t *srv)
{
    const char *url = kvf_store_server_url(srv);
    return (uint16_t)strtoul(strrchr(url, ':') + 1, NULL, 10);
}

/* A socket from 127.0.0.@src to 127.0.0.1:@port, or -1 when the connect fails. @nonblock: return
 * with the connect in progress. */
static int raw_connect(unsigned src, uint16_t port, bool nonblock)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000000u | src)};
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
        fail_msg("bind to 127.0.0.%u: %s", src, strerror(errno));
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 && !(nonblock && errno == EINPROGRESS)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Append a request frame of opcode @op with @body (may be NULL) to @b. */
static void frame_put(kvf_buf_t *b, uint8_t op, uint32_t id, const kvf_buf_t *body)
{
    uint8_t h[KVF_STORE_HDR_LEN];
    kvf__put_le32(h, KVF_STORE_MAGIC);
    h[4] = KVF_STORE_PROTO_VERSION;
    h[5] = op;
    kvf__put_le16(h + 6, 0);
    kvf__put_le32(h + 8, id);
    kvf__put_le32(h + 12, body ? (uint32_t)body->len : 0u);
    kvf__buf_put(b, h, sizeof(h));
    if (body)
        kvf__buf_put(b, body->data, body->len);
    assert_false(b->oom);
}

static void put_set(kvf_buf_t *b, uint32_t id, const char *key, const void *val, size_t vlen)
{
    kvf_buf_t body;
    kvf__buf_init(&body);
    kvf__buf_put_blob(&body, key, strlen(key));
    kvf__buf_put_blob(&body, val, vlen);
    kvf__buf_put_u64(&body, 0);
    frame_put(b, KVF_STORE_OP_SET, id, &body);
    kvf__buf_free(&body);
}

static void put_blob_op(kvf_buf_t *b, uint8_t op, uint32_t id, const char *s)
{
    kvf_buf_t body;
    kvf__buf_init(&body);
    kvf__buf_put_blob(&body, s, strlen(s));
    frame_put(b, op, id, &body);
    kvf__buf_free(&body);
}

static void put_u32_op(kvf_buf_t *b, uint8_t op, uint32_t id, uint32_t v)
{
    kvf_buf_t body;
    kvf__buf_init(&body);
    kvf__buf_put_u32(&body, v);
    frame_put(b, op, id, &body);
    kvf__buf_free(&body);
}

static void send_all(int fd, const void *p, size_t n)
{
    const uint8_t *c = p;
    while (n) {
        ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            fail_msg("send: %s", k < 0 ? strerror(errno) : "no progress");
        c += k;
        n -= (size_t)k;
    }
}

static bool recv_all(int fd, void *p, size_t n)
{
    uint8_t *c = p;
    while (n) {
        ssize_t k = recv(fd, c, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return false;
        c += k;
        n -= (size_t)k;
    }
    return true;
}

/* One answer: its status, and its first error message (NUL-terminated, cut at 255 bytes). */
typedef struct {
    uint8_t op;
    uint16_t status;
    uint32_t id;
    uint8_t *body;
    uint32_t len;
} answer_t;

static void answer_read(int fd, answer_t *a)
{
    uint8_t h[KVF_STORE_HDR_LEN];
    if (!recv_all(fd, h, sizeof(h)))
        fail_msg("no answer from the store: %s", strerror(errno));
    a->op = h[5];
    a->status = kvf__get_le16(h + 6);
    a->id = kvf__get_le32(h + 8);
    a->len = kvf__get_le32(h + 12);
    a->body = malloc(a->len + 1u);
    assert_non_null(a->body);
    if (!recv_all(fd, a->body, a->len))
        fail_msg("answer body cut short");
    a->body[a->len] = 0;
}

/* The message of an error answer (a blob), NUL-terminated in place. */
static const char *answer_msg(answer_t *a)
{
    if (a->len < 4)
        return "";
    return (const char *)a->body + 4;
}

/* Send the @n requests in @reqs, @batch at a time, reading the answers of each batch before the
 * next (so neither side's buffers fill). Returns how many were answered OK; the first failure's
 * status and message go to @st and @msg. */
static unsigned pipeline(int fd, const kvf_buf_t *reqs, unsigned n, unsigned batch, uint16_t *st,
                         char *msg, size_t msglen)
{
    unsigned ok = 0, done = 0;
    size_t off = 0;
    *st = 0;
    msg[0] = 0;
    while (done < n) {
        unsigned k = n - done < batch ? n - done : batch;
        size_t end = off;
        for (unsigned i = 0; i < k; i++)
            end += KVF_STORE_HDR_LEN + kvf__get_le32(reqs->data + end + 12);
        send_all(fd, reqs->data + off, end - off);
        off = end;
        for (unsigned i = 0; i < k; i++) {
            answer_t a;
            answer_read(fd, &a);
            if (a.status == 0) {
                ok++;
            } else if (*st == 0) {
                *st = a.status;
                snprintf(msg, msglen, "%s", answer_msg(&a));
            }
            free(a.body);
        }
        done += k;
    }
    return ok;
}

/* Wait up to @ms for the peer to close @fd, discarding what arrives; true when it did. */
static bool wait_closed(int fd, unsigned ms)
{
    static uint8_t junk[1 << 16];
    uint64_t until = kvf_test_now_ms() + ms;
    while (kvf_test_now_ms() < until) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, 50) <= 0)
            continue;
        ssize_t r = recv(fd, junk, sizeof(junk), MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
            return true;
    }
    return false;
}

/* A PING on @fd answered within the socket's timeout. */
static bool ping_ok(int fd, uint32_t id)
{
    kvf_buf_t b;
    kvf__buf_init(&b);
    frame_put(&b, KVF_STORE_OP_PING, id, NULL);
    bool ok = send(fd, b.data, b.len, MSG_NOSIGNAL) == (ssize_t)b.len;
    kvf__buf_free(&b);
    uint8_t h[KVF_STORE_HDR_LEN];
    return ok && recv_all(fd, h, sizeof(h)) && h[5] == KVF_STORE_OP_PING &&
           kvf__get_le32(h + 8) == id && kvf__get_le16(h + 6) == 0;
}

/* "VmRSS" or "VmSize" of this process, in bytes. */
static uint64_t vm_bytes(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    assert_non_null(f);
    char line[256];
    uint64_t kb = 0;
    size_t fl = strlen(field);
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, field, fl) == 0 && line[fl] == ':')
            kb = strtoull(line + fl + 1, NULL, 10);
    fclose(f);
    assert_true(kb > 0);
    return kb << 10;
}

/* A client library handle on @srv, failing fast. */
static kvf_store_t *client_open(kvf_store_server_t *srv, uint32_t connect_ms)
{
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = connect_ms;
    kvf_store_t *st = NULL;
    int rc = kvf_store_open(kvf_store_server_url(srv), &o, &st);
    if (rc < 0) {
        print_message("kvf_store_open: %s: %s\n", kvf_err_name(rc), kvf_last_error());
        return NULL;
    }
    return st;
}

/* stderr redirected to a file while the server logs what a test checks. */
typedef struct {
    char path[64];
    int saved;
} logcap_t;

static void logcap_start(logcap_t *lc)
{
    snprintf(lc->path, sizeof(lc->path), "/tmp/kvf-abuse-store-XXXXXX");
    int fd = mkstemp(lc->path);
    assert_true(fd >= 0);
    fflush(stderr);
    lc->saved = dup(STDERR_FILENO);
    assert_true(lc->saved >= 0);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);
    close(fd);
}

/* Restore stderr; returns the lines captured that contain @needle, and all lines in @lines. */
static unsigned logcap_stop(logcap_t *lc, const char *needle, unsigned *lines)
{
    fflush(stderr);
    dup2(lc->saved, STDERR_FILENO);
    close(lc->saved);
    FILE *f = fopen(lc->path, "r");
    assert_non_null(f);
    char line[4096];
    unsigned n = 0, hit = 0;
    while (fgets(line, sizeof(line), f)) {
        n++;
        hit += strstr(line, needle) != NULL;
    }
    fclose(f);
    unlink(lc->path);
    if (lines)
        *lines = n;
    return hit;
}

/* ---------------------------------------------------------------------------------------------
 * 1. Idle connections
 * ------------------------------------------------------------------------------------------- */

/*
 * Reproduced in issue 12: 4,096 idle connections locked every new client out. At full scale and
 * with the default limits, they come from one address (127.0.0.2); a client from 127.0.0.1 (the
 * library) and a raw one from 127.0.0.3 are served during the flood, which holds at most
 * max_clients_per_addr of them.
 */
static void idle_flood_leaves_other_clients_served(void **state)
{
    (void)state;
    const unsigned n = KVF_STORE_MAX_CLIENTS;
    kvf_test_need_fds("a flood of 4,096 connections", 2 * n + 256);
    kvf_store_server_t *srv = server_start(NULL);
    uint16_t port = server_port(srv);
    int *fds = calloc(n, sizeof(*fds));
    assert_non_null(fds);
    for (unsigned i = 0; i < n; i++)
        fds[i] = raw_connect(2, port, false);
    /* Every connection the server kept answers a PING; those it refused are closed. */
    unsigned held = 0;
    for (unsigned base = 0; base < n; base += 256) {
        for (unsigned i = base; i < base + 256 && i < n; i++) {
            kvf_buf_t b;
            kvf__buf_init(&b);
            frame_put(&b, KVF_STORE_OP_PING, i + 1, NULL);
            if (fds[i] >= 0 && send(fds[i], b.data, b.len, MSG_NOSIGNAL) != (ssize_t)b.len) {
                close(fds[i]);
                fds[i] = -1;
            }
            kvf__buf_free(&b);
        }
        for (unsigned i = base; i < base + 256 && i < n; i++) {
            uint8_t h[KVF_STORE_HDR_LEN];
            if (fds[i] >= 0 && recv_all(fds[i], h, sizeof(h)))
                held++;
        }
    }
    print_message("flood: %u of %u connections from 127.0.0.2 held\n", held, n);

    int other = raw_connect(3, port, false);
    bool other_ok = other >= 0 && ping_ok(other, 7);
    kvf_store_t *st = client_open(srv, 3000);
    int rc = st ? kvf_store_set(st, "k", "v", 1, 0) : -KVF_ESTOREDOWN;
    if (other >= 0)
        close(other);
    kvf_store_close(st);
    for (unsigned i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(fds);
    kvf_store_server_stop(srv);
    if (!other_ok || rc != 0)
        fail_msg("during a flood of %u idle connections from 127.0.0.2 (%u held): a raw client "
                 "from 127.0.0.3 was %s, the library client from 127.0.0.1 got %s",
                 n, held, other_ok ? "served" : "NOT served", kvf_err_name(rc));
    assert_in_range(held, 1, SRV_DEFAULT_MAX_CLIENTS_PER_ADDR);
}

#define TEST_IDLE_MS 300u

/* A connection that sends nothing is closed after idle_timeout_ms; one that waits for a
 * get-with-wait, or holds a watch, is not idle and stays. */
static void idle_connection_closed_busy_ones_kept(void **state)
{
    (void)state;
    kvf_store_server_opts_t o;
    kvf_store_server_opts_init(&o);
    o.idle_timeout_ms = TEST_IDLE_MS;
    kvf_store_server_t *srv = server_start(&o);
    uint16_t port = server_port(srv);

    int idle = raw_connect(2, port, false);
    int waiter = raw_connect(2, port, false);
    int watcher = raw_connect(2, port, false);
    assert_true(idle >= 0 && waiter >= 0 && watcher >= 0);
    kvf_buf_t b;
    kvf__buf_init(&b);
    kvf_buf_t body;
    kvf__buf_init(&body);
    kvf__buf_put_blob(&body, "late", 4);
    kvf__buf_put_u32(&body, 4 * TEST_IDLE_MS);
    frame_put(&b, KVF_STORE_OP_GET, 1, &body);
    send_all(waiter, b.data, b.len);
    b.len = 0;
    put_blob_op(&b, KVF_STORE_OP_WATCH, 1, "w/");
    send_all(watcher, b.data, b.len);
    answer_t a;
    answer_read(watcher, &a);
    assert_int_equal(a.status, 0);
    free(a.body);

    uint64_t t0 = kvf_test_now_ms();
    bool closed = wait_closed(idle, 3000);
    uint64_t took = kvf_test_now_ms() - t0;
    print_message("idle connection closed after %" PRIu64 " ms\n", took);
    if (!closed)
        fail_msg("a connection that sent nothing was open 3 s later (idle_timeout_ms %u)",
                 TEST_IDLE_MS);
    assert_true(took + 50 >= TEST_IDLE_MS);

    /* The get-with-wait is answered (timeout status) after 4 × the idle timeout: its connection
     * was kept; the watcher still answers a PING after that. */
    answer_read(waiter, &a);
    assert_int_equal(a.op, KVF_STORE_OP_GET);
    assert_int_equal(a.status, KVF_STORE_ST_TIMEOUT);
    free(a.body);
    assert_true(ping_ok(watcher, 2));

    kvf__buf_free(&b);
    kvf__buf_free(&body);
    close(idle);
    close(waiter);
    close(watcher);
    kvf_store_server_stop(srv);
}

/* The library client pings when quiet, so a server's idle timeout never costs it a request; and
 * a client whose connection was closed anyway reconnects on its own. */
static void library_client_survives_idle_timeout(void **state)
{
    (void)state;
    kvf_store_server_opts_t o;
    kvf_store_server_opts_init(&o);
    o.idle_timeout_ms = TEST_IDLE_MS;
    kvf_store_server_t *srv = server_start(&o);
    kvf_store_t *st = client_open(srv, 3000);
    assert_non_null(st);
    for (int i = 0; i < 3; i++) {
        char v[16];
        snprintf(v, sizeof(v), "%d", i);
        /* Sleeping is the scenario here (a client quiet for longer than the timeout), not a
         * synchronisation. */
        usleep(2 * TEST_IDLE_MS * 1000);
        int rc = kvf_store_set(st, "k", v, strlen(v), 0);
        if (rc == -KVF_ESTOREDOWN) /* the close and the request met: the next one is served */
            rc = kvf_store_set(st, "k", v, strlen(v), 0);
        assert_kvf_ok(rc);
    }
    kvf_store_close(st);
    kvf_store_server_stop(srv);
}

/* Connections from four addresses fill max_clients; the idle ones are reaped, so a new client is
 * served within about the idle timeout rather than never. */
static void full_server_frees_slots_by_idle_timeout(void **state)
{
    (void)state;
    kvf_store_server_opts_t o;
    kvf_store_server_opts_init(&o);
    o.max_clients = 64;
    o.max_clients_per_addr = 16;
    o.idle_timeout_ms = TEST_IDLE_MS;
    kvf_store_server_t *srv = server_start(&o);
    uint16_t port = server_port(srv);
    int fds[64];
    for (unsigned i = 0; i < 64; i++) {
        fds[i] = raw_connect(2 + i / 16, port, false);
        assert_true(fds[i] >= 0);
        assert_true(ping_ok(fds[i], i + 1));
    }
    /* A 65th from one more address is refused now ... */
    int extra = raw_connect(6, port, false);
    assert_true(extra >= 0);
    assert_true(wait_closed(extra, 3000));
    close(extra);
    /* ... and served once the idle ones are gone (each attempt is refused at once while the
     * server is full, so the loop is bounded by time). */
    uint64_t t0 = kvf_test_now_ms();
    bool served = false;
    while (!served && kvf_test_now_ms() < t0 + 5000) {
        int fd = raw_connect(6, port, false);
        served = fd >= 0 && ping_ok(fd, 1);
        if (fd >= 0)
            close(fd);
        if (!served)
            usleep(20000);
    }
    uint64_t took = kvf_test_now_ms() - t0;
    print_message("client served %" PRIu64 " ms after the server was full\n", took);
    if (!served)
        fail_msg("a client was still refused 5 s after %u idle connections filled the server "
                 "(idle_timeout_ms %u)",
                 64, TEST_IDLE_MS);
    for (unsigned i = 0; i < 64; i++)
        close(fds[i]);
    kvf_store_server_stop(srv);
}

/* The store process for fd_exhaustion: its RLIMIT_NOFILE lowered, stderr to @log_path; sends its
 * port on @out and serves until @in closes. */
static void exhaust_child(int out, int in, const char *log_path)
{
    int lfd = open(log_path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (lfd < 0 || dup2(lfd, STDERR_FILENO) < 0)
        _exit(10);
    close(lfd);
    struct rlimit rl = {64, 64};
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        _exit(11);
    kvf_log_set_level(KVF_LOG_WARN);
    kvf_store_server_t *srv = NULL;
    if (kvf_store_server_start("tcp://127.0.0.1:0", &srv) < 0)
        _exit(12);
    uint32_t port = server_port(srv);
    if (write(out, &port, sizeof(port)) != (ssize_t)sizeof(port))
        _exit(13);
    char c;
    while (read(in, &c, 1) > 0)
        ;
    kvf_store_server_stop(srv);
    _exit(0);
}

static unsigned long cpu_ms_of(pid_t pid)
{
    char path[64], line[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(line, sizeof(line), f));
    fclose(f);
    const char *s = strrchr(line, ')');
    assert_non_null(s);
    unsigned long ut = 0, stime = 0;
    assert_int_equal(
        sscanf(s + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &stime), 2);
    return (ut + stime) * 1000u / (unsigned long)sysconf(_SC_CLK_TCK);
}

/* A store limited to 64 descriptors gets 120 connections: while out of descriptors it does not
 * spin and its log stays short; once the attacker leaves it serves again. */
static void fd_exhaustion_pauses_and_recovers(void **state)
{
    (void)state;
    char log_path[] = "/tmp/kvf-abuse-store-XXXXXX";
    int lf = mkstemp(log_path);
    assert_true(lf >= 0);
    close(lf);
    int up[2], down[2];
    assert_int_equal(pipe2(up, O_CLOEXEC), 0);
    assert_int_equal(pipe2(down, O_CLOEXEC), 0);
    fflush(NULL);
    pid_t pid = kvf_test_fork();
    if (pid == 0) {
        close(up[0]);
        close(down[1]);
        exhaust_child(up[1], down[0], log_path);
    }
    close(up[1]);
    close(down[0]);
    uint32_t port = 0;
    assert_int_equal(read(up[0], &port, sizeof(port)), (ssize_t)sizeof(port));

    int fds[120];
    for (unsigned i = 0; i < 120; i++)
        fds[i] = raw_connect(2 + i % 4, (uint16_t)port, true);
    for (unsigned i = 0; i < 120; i++) {
        struct pollfd pf = {.fd = fds[i], .events = POLLOUT};
        if (fds[i] >= 0)
            poll(&pf, 1, 1000);
    }
    usleep(300000); /* the scenario: connections wait in the backlog */
    unsigned long c0 = cpu_ms_of(pid);
    uint64_t t0 = kvf_test_now_ms();
    usleep(1000000);
    unsigned long cpu = cpu_ms_of(pid) - c0;
    uint64_t ms = kvf_test_now_ms() - t0;
    for (unsigned i = 0; i < 120; i++)
        if (fds[i] >= 0)
            close(fds[i]);

    /* The attacker left: a client is served within a bounded time. */
    bool served = false;
    uint64_t until = kvf_test_now_ms() + 3000;
    while (!served && kvf_test_now_ms() < until) {
        int fd = raw_connect(1, (uint16_t)port, false);
        served = fd >= 0 && ping_ok(fd, 1);
        if (fd >= 0)
            close(fd);
        if (!served)
            usleep(50000);
    }
    close(down[1]);
    int rc = kvf_test_reap(pid, 5000);
    close(up[0]);
    FILE *f = fopen(log_path, "r");
    assert_non_null(f);
    char line[4096];
    unsigned lines = 0;
    while (fgets(line, sizeof(line), f))
        lines++;
    fclose(f);
    unlink(log_path);
    print_message("out of descriptors: %lu ms of CPU in %" PRIu64 " ms, %u log lines\n", cpu, ms,
                  lines);
    if (cpu > 300 || lines > 100 || !served)
        fail_msg("out of descriptors the store used %lu ms of CPU in %" PRIu64
                 " ms (want <= 300), logged %u lines (want <= 100); afterwards a client was %s",
                 cpu, ms, lines, served ? "served" : "NOT served");
    assert_int_equal(rc, 0);
}

/* ---------------------------------------------------------------------------------------------
 * 2. Quotas
 * ------------------------------------------------------------------------------------------- */

/* Reproduced in issue 12: one client stored 512 MiB in 32 values. With the default quota the
 * fourth 16 MiB value is refused (-KVF_EBUSY, the message names max_bytes_per_client and its
 * value) and the store's memory stays near 64 MiB. */
static void one_client_cannot_store_512_mib(void **state)
{
    (void)state;
    kvf_store_server_t *srv = server_start(NULL);
    kvf_store_t *st = client_open(srv, 3000);
    assert_non_null(st);
    const size_t vlen = KVF_STORE_MAX_VALUE_LEN;
    uint8_t *v = malloc(vlen);
    assert_non_null(v);
    memset(v, 0x5a, vlen);
    uint64_t rss0 = vm_bytes("VmRSS");
    unsigned stored = 0;
    int first_err = 0;
    char msg[512] = "";
    for (unsigned i = 0; i < 32; i++) {
        char key[32];
        snprintf(key, sizeof(key), "big/%02u", i);
        int rc = kvf_store_set(st, key, v, vlen, 0);
        if (rc == 0) {
            stored++;
        } else if (!first_err) {
            first_err = rc;
            snprintf(msg, sizeof(msg), "%s", kvf_last_error());
        }
    }
    uint64_t grew = vm_bytes("VmRSS") - rss0;
    print_message("stored %u of 32 values of 16 MiB; RSS +%" PRIu64 " MiB; first refusal: %s\n",
                  stored, grew >> 20, msg);
    free(v);
    /* Deleting frees the quota again. */
    assert_kvf_ok(kvf_store_del(st, "big/00"));
    uint8_t small[1024] = {0};
    assert_kvf_ok(kvf_store_set(st, "small", small, sizeof(small), 0));
    kvf_store_close(st);
    kvf_store_server_stop(srv);
    if (stored != 3 || first_err != -KVF_EBUSY || !strstr(msg, "max_bytes_per_client (67108864)"))
        fail_msg("one client stored %u values of 16 MiB (want 3); first error %s: %s", stored,
                 kvf_err_name(first_err), msg);
    if (!KVF_TEST_SANITIZED && grew > (160u << 20))
        fail_msg("RSS grew by %" PRIu64 " MiB", grew >> 20);
}

/* Reproduced in issue 12: 150,000 keys and 100,000 leases from one client. Key 100,001 and lease
 * 10,001 are refused, each with a message naming the quota; another address is still served. */
static void one_client_cannot_hold_150000_keys_or_100000_leases(void **state)
{
    (void)state;
    kvf_store_server_t *srv = server_start(NULL);
    uint16_t port = server_port(srv);
    int fd = raw_connect(2, port, false);
    assert_true(fd >= 0);
    const unsigned nkeys = 150000, nleases = 100000;
    kvf_buf_t reqs;
    kvf__buf_init(&reqs);
    for (unsigned i = 0; i < nkeys; i++) {
        char key[32];
        snprintf(key, sizeof(key), "junk/%06u", i);
        put_set(&reqs, i + 1, key, "x", 1);
    }
    uint16_t st = 0;
    char msg[256];
    unsigned keys = pipeline(fd, &reqs, nkeys, 5000, &st, msg, sizeof(msg));
    print_message("keys: %u of %u stored; refusal %u: %s\n", keys, nkeys, st, msg);
    bool keys_ok = keys == SRV_DEFAULT_MAX_KEYS_PER_CLIENT && st == KVF_STORE_ST_BUSY &&
                   strstr(msg, "max_keys_per_client (100000)") != NULL;

    reqs.len = 0;
    for (unsigned i = 0; i < nleases; i++)
        put_u32_op(&reqs, KVF_STORE_OP_LEASE_GRANT, i + 1, 600000);
    unsigned leases = pipeline(fd, &reqs, nleases, 5000, &st, msg, sizeof(msg));
    print_message("leases: %u of %u granted; refusal %u: %s\n", leases, nleases, st, msg);
    bool leases_ok = leases == SRV_DEFAULT_MAX_LEASES_PER_CLIENT && st == KVF_STORE_ST_BUSY &&
                     strstr(msg, "max_leases_per_client (10000)") != NULL;

    /* Another address has its own quota. */
    int other = raw_connect(3, port, false);
    reqs.len = 0;
    put_set(&reqs, 1, "mine", "y", 1);
    unsigned other_ok = pipeline(other, &reqs, 1, 1, &st, msg, sizeof(msg));
    kvf__buf_free(&reqs);
    close(other);
    close(fd);
    kvf_store_server_stop(srv);
    if (!keys_ok || !leases_ok || other_ok != 1)
        fail_msg("one client stored %u keys (want 100000) and got %u leases (want 10000); "
                 "another address %s",
                 keys, leases, other_ok ? "was served" : "was NOT served");
}

static void ignore_event(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    (void)arg;
    (void)type;
    (void)kv;
}

/* Watches count against a quota per address (over all its connections) and in total; the
 * library reports the refusal as -KVF_EBUSY with the quota in kvf_last_error(). */
static void watch_quota_per_address(void **state)
{
    (void)state;
    kvf_store_server_opts_t o;
    kvf_store_server_opts_init(&o);
    o.max_watches_per_client = 8;
    kvf_store_server_t *srv = server_start(&o);
    uint16_t port = server_port(srv);
    int a = raw_connect(1, port, false), b = raw_connect(1, port, false);
    kvf_buf_t reqs;
    kvf__buf_init(&reqs);
    for (unsigned i = 0; i < 5; i++)
        put_blob_op(&reqs, KVF_STORE_OP_WATCH, i + 1, "w/");
    uint16_t st;
    char msg[256];
    assert_int_equal(pipeline(a, &reqs, 5, 5, &st, msg, sizeof(msg)), 5);
    unsigned got = pipeline(b, &reqs, 5, 5, &st, msg, sizeof(msg));
    assert_int_equal(got, 3);
    assert_int_equal(st, KVF_STORE_ST_BUSY);
    assert_non_null(strstr(msg, "max_watches_per_client (8) reached: 127.0.0.1 holds 8 watches"));

    kvf_store_t *cl = client_open(srv, 3000);
    assert_non_null(cl);
    uint64_t id = 0;
    int rc = kvf_store_watch(cl, "x/", ignore_event, NULL, &id);
    assert_kvf_err(rc, -KVF_EBUSY);
    assert_last_error_contains("max_watches_per_client (8)");
    /* Closing a connection releases its watches. */
    close(a);
    uint64_t until = kvf_test_now_ms() + IO_MS;
    do
        rc = kvf_store_watch(cl, "x/", ignore_event, NULL, &id);
    while (rc == -KVF_EBUSY && kvf_test_now_ms() < until);
    assert_kvf_ok(rc);
    kvf_store_close(cl);
    kvf__buf_free(&reqs);
    close(b);
    kvf_store_server_stop(srv);
}

/* Options out of range are refused, naming the field. */
static void server_options_checked(void **state)
{
    (void)state;
    kvf_store_server_opts_t o;
    kvf_store_server_opts_init(&o);
    assert_int_equal(o.idle_timeout_ms, 60000);
    assert_int_equal(o.max_bytes_per_client, 64u << 20);
    o.idle_timeout_ms = 99;
    kvf_store_server_t *srv = NULL;
    assert_kvf_err(kvf_store_server_start_opts("tcp://127.0.0.1:0", &o, &srv), -KVF_EINVAL);
    assert_last_error_contains("idle_timeout_ms is 99, not in 100..86400000");
    assert_null(srv);
    kvf_store_server_opts_init(&o);
    o.max_keys = 0;
    assert_kvf_err(kvf_store_server_start_opts("tcp://127.0.0.1:0", &o, &srv), -KVF_EINVAL);
    assert_last_error_contains("max_keys is 0");
}

/* ---------------------------------------------------------------------------------------------
 * 3. Listing 150,000 sessions
 * ------------------------------------------------------------------------------------------- */

#define SESSIONS_PREFIX "kvferry/v1/default/sessions/"

/* Reproduced in issue 12: 150,000 keys under the sessions prefix made every engine's
 * kvf_peer_events() fail ("too many to list"). Listing pages now: kvf_store_list() returns all
 * of them, kvf_store_list_page() walks them in order, and an engine subscribes and sees a peer
 * that joins afterwards. */
static void list_and_peer_events_with_150000_sessions(void **state)
{
    (void)state;
    const unsigned n = 150000;
    kvf_store_server_opts_t o;
    kvf_store_server_opts_init(&o);
    o.max_keys_per_client = 2 * n;
    kvf_store_server_t *srv = server_start(&o);
    int fd = raw_connect(2, server_port(srv), false);
    kvf_buf_t reqs;
    kvf__buf_init(&reqs);
    for (unsigned i = 0; i < n; i++) {
        char key[80];
        snprintf(key, sizeof(key), SESSIONS_PREFIX "10.%u.%u.%u:%u", i >> 16, (i >> 8) & 255,
                 i & 255, 1000 + i % 50000);
        put_set(&reqs, i + 1, key, "{}", 2);
    }
    uint16_t st;
    char msg[256];
    assert_int_equal(pipeline(fd, &reqs, n, 5000, &st, msg, sizeof(msg)), n);
    kvf__buf_free(&reqs);
    close(fd);

    kvf_store_t *cl = client_open(srv, 3000);
    assert_non_null(cl);
    kvf_store_kv_t *kvs = NULL;
    size_t count = 0;
    uint64_t t0 = kvf_test_now_ms();
    int rc = kvf_store_list(cl, SESSIONS_PREFIX, &kvs, &count);
    uint64_t list_ms = kvf_test_now_ms() - t0;
    if (rc < 0)
        fail_msg("kvf_store_list of %u keys: %s: %s", n, kvf_err_name(rc), kvf_last_error());
    assert_int_equal(count, n);
    for (size_t i = 1; i < count; i++)
        assert_true(strcmp(kvs[i - 1].key, kvs[i].key) < 0);
    assert_string_equal(kvs[0].val, "{}");
    kvf_store_kv_free(kvs, count);

    /* Pages: in order, without overlap, keys only. */
    size_t total = 0, pages = 0;
    char after[128] = "";
    for (int more = 1; more; pages++) {
        assert_kvf_ok(kvf_store_list_page(cl, SESSIONS_PREFIX, after, 4096,
                                          KVF_STORE_LIST_KEYS_ONLY, &kvs, &count, &more));
        assert_in_range(count, 1, 4096);
        assert_true(strcmp(kvs[0].key, after) > 0);
        assert_int_equal(kvs[0].val_len, 0);
        snprintf(after, sizeof(after), "%s", kvs[count - 1].key);
        total += count;
        kvf_store_kv_free(kvs, count);
    }
    assert_int_equal(total, n);
    assert_int_equal(pages, (n + 4095) / 4096);
    kvf_store_close(cl);

    /* An engine's peer events: the subscription lists them all, and a peer that joins later is
     * reported. */
    kvf_engine_t *e = kvf_test_engine(kvf_store_server_url(srv), KVF_ROLE_DECODE, NULL);
    kvf_peer_event_t evs[64];
    t0 = kvf_test_now_ms();
    int k = kvf_peer_events(e, evs, 64, 0);
    uint64_t sub_ms = kvf_test_now_ms() - t0;
    if (k < 0)
        fail_msg("kvf_peer_events with %u sessions: %s: %s", n, kvf_err_name(k), kvf_last_error());
    print_message("list of %u keys: %" PRIu64 " ms; peer-event subscription: %" PRIu64 " ms\n", n,
                  list_ms, sub_ms);
    kvf_engine_t *peer = kvf_test_engine(kvf_store_server_url(srv), KVF_ROLE_PREFILL, NULL);
    const char *psid = kvf_engine_session_id(peer);
    bool seen = false;
    uint64_t until = kvf_test_now_ms() + IO_MS;
    while (!seen && kvf_test_now_ms() < until) {
        k = kvf_peer_events(e, evs, 64, 200);
        assert_true(k >= 0);
        for (int i = 0; i < k; i++)
            seen |= evs[i].type == KVF_PEER_JOINED && strcmp(evs[i].sid, psid) == 0;
    }
    assert_true(seen);
    kvf_engine_destroy(peer);
    kvf_engine_destroy(e);
    kvf_store_server_stop(srv);
}

/* ---------------------------------------------------------------------------------------------
 * 4. Watch fan-out and unread output
 * ------------------------------------------------------------------------------------------- */

/* Register @n watches on "" on @fd and read their answers. */
static void watch_many(int fd, unsigned n)
{
    kvf_buf_t reqs;
    kvf__buf_init(&reqs);
    for (unsigned i = 0; i < n; i++)
        put_blob_op(&reqs, KVF_STORE_OP_WATCH, i + 1, "");
    uint16_t st;
    char msg[256];
    unsigned ok = pipeline(fd, &reqs, n, n, &st, msg, sizeof(msg));
    if (ok != n)
        fail_msg("%u of %u watches registered: status %u: %s", ok, n, st, msg);
    kvf__buf_free(&reqs);
}

/*
 * Reproduced in issue 12: 2 connections with 1,024 never-read watches each turned every 64 KiB SET
 * into +128 MiB of store memory. Events share one copy of the key and value: three SETs now cost
 * about three copies plus a few bytes per watch.
 */
static void watch_fanout_shares_one_copy(void **state)
{
    (void)state;
    kvf_store_server_t *srv = server_start(NULL);
    uint16_t port = server_port(srv);
    int w1 = raw_connect(2, port, false), w2 = raw_connect(2, port, false);
    int setter = raw_connect(3, port, false);
    watch_many(w1, KVF_STORE_MAX_WATCHES_PER_CLIENT);
    watch_many(w2, KVF_STORE_MAX_WATCHES_PER_CLIENT);
    const size_t vlen = 64u << 10;
    uint8_t *v = malloc(vlen);
    assert_non_null(v);
    memset(v, 0x33, vlen);
    uint64_t rss0 = vm_bytes("VmRSS");
    kvf_buf_t reqs;
    kvf__buf_init(&reqs);
    for (unsigned i = 0; i < 3; i++) {
        char key[16];
        snprintf(key, sizeof(key), "fan/%u", i);
        put_set(&reqs, i + 1, key, v, vlen);
    }
    uint16_t st;
    char msg[256];
    assert_int_equal(pipeline(setter, &reqs, 3, 1, &st, msg, sizeof(msg)), 3);
    assert_true(ping_ok(setter, 9)); /* the fan-out is done before this is answered */
    uint64_t grew = vm_bytes("VmRSS") - rss0;
    print_message("3 SETs of 64 KiB to 2 x 1024 watches: RSS +%" PRIu64 " KiB\n", grew >> 10);
    /* The watchers were kept (under max_output_bytes) and receive events when they read. */
    answer_t a;
    answer_read(w1, &a);
    assert_int_equal(a.op, KVF_STORE_OP_EVENT);
    assert_int_equal(a.len, 8 + 1 + 4 + 5 + 4 + vlen);
    assert_memory_equal(a.body + 8 + 1 + 4 + 5 + 4, v, vlen);
    free(a.body);
    free(v);
    kvf__buf_free(&reqs);
    close(w1);
    close(w2);
    close(setter);
    kvf_store_server_stop(srv);
    if (grew > (32u << 20))
        fail_msg("3 SETs of 64 KiB to 2,048 unread watches grew the store by %" PRIu64
                 " MiB (one copy per watch would be 384 MiB)",
                 grew >> 20);
}

/* A connection that does not read its events is closed once they pass max_output_bytes, with a
 * log line naming the limit; the writer is served throughout. */
static void unread_output_closes_connection_with_log(void **state)
{
    (void)state;
    kvf_store_server_opts_t o;
    kvf_store_server_opts_init(&o);
    o.max_output_bytes = 1u << 20;
    kvf_store_server_t *srv = server_start(&o);
    uint16_t port = server_port(srv);
    int watcher = raw_connect(2, port, false);
    int setter = raw_connect(3, port, false);
    watch_many(watcher, 4);
    const size_t vlen = 64u << 10;
    uint8_t *v = calloc(1, vlen);
    assert_non_null(v);
    kvf_buf_t reqs;
    kvf__buf_init(&reqs);
    logcap_t lc;
    logcap_start(&lc);
    unsigned sets = 0;
    bool closed = false;
    for (; sets < 400 && !closed; sets++) {
        reqs.len = 0;
        put_set(&reqs, sets + 1, "ev", v, vlen);
        uint16_t st;
        char msg[256];
        assert_int_equal(pipeline(setter, &reqs, 1, 1, &st, msg, sizeof(msg)), 1);
        struct pollfd pf = {.fd = watcher, .events = POLLRDHUP};
        closed = poll(&pf, 1, 0) == 1 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR));
    }
    closed = closed || wait_closed(watcher, 3000);
    unsigned lines = 0;
    unsigned hits = logcap_stop(&lc, "max_output_bytes (1048576)", &lines);
    print_message("%u SETs of 64 KiB x 4 watches sent; %u log lines, %u naming "
                  "the limit\n",
                  sets, lines, hits);
    assert_true(ping_ok(setter, 999));
    free(v);
    kvf__buf_free(&reqs);
    close(watcher);
    close(setter);
    kvf_store_server_stop(srv);
    assert_true(closed);
    assert_int_equal(hits, 1);
}

/* A client that speaks another protocol (here HTTP, as a browser or a scraper pointed at the wrong
 * port would) is closed, and the server logs the one warning line docs/operations.md
 * ("Troubleshooting") quotes, naming the client's address and what was wrong. */
static void foreign_protocol_closed_with_log(void **state)
{
    (void)state;
    kvf_store_server_t *srv = server_start(NULL);
    uint16_t port = server_port(srv);
    int fd = raw_connect(2, port, false);
    assert_true(fd >= 0);
    struct sockaddr_in me;
    socklen_t mel = sizeof(me);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &mel), 0);
    char want[128];
    /* "GET " read as the little-endian magic is 0x20544547. */
    snprintf(want, sizeof(want),
             "store: closing connection from 127.0.0.2:%u: bad magic 0x20544547",
             (unsigned)ntohs(me.sin_port));
    logcap_t lc;
    logcap_start(&lc);
    static const char req[] = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    send_all(fd, req, sizeof(req) - 1);
    bool closed = wait_closed(fd, IO_MS);
    unsigned lines = 0;
    unsigned hits = logcap_stop(&lc, want, &lines);
    close(fd);
    /* Only that connection: the server still answers another client. */
    int other = raw_connect(3, port, false);
    assert_true(ping_ok(other, 1));
    close(other);
    kvf_store_server_stop(srv);
    assert_true(closed);
    if (hits != 1)
        fail_msg("%u of %u log lines say \"%s\"", hits, lines, want);
}

/* ---------------------------------------------------------------------------------------------
 * 5. Frames announced and never sent
 * ------------------------------------------------------------------------------------------- */

#define ANNOUNCERS 256u

/*
 * Reproduced in issue 12: header-only frames announcing 64 MiB grew virtual memory to 13 GB. A
 * header announcing more than the longest request is refused at once; 256 connections announcing
 * 32 MiB each (allowed) and sending 64 KiB of it cost what arrived, not 8 GiB of reservations; and
 * a real 16 MiB SET still goes through.
 */
static void announced_frames_reserve_nothing(void **state)
{
    (void)state;
    kvf_test_need_fds("256 announcing connections", 2 * ANNOUNCERS + 256);
    kvf_store_server_t *srv = server_start(NULL);
    uint16_t port = server_port(srv);

    /* More than any request: closed at once. */
    int big = raw_connect(2, port, false);
    uint8_t h[KVF_STORE_HDR_LEN];
    kvf__put_le32(h, KVF_STORE_MAGIC);
    h[4] = KVF_STORE_PROTO_VERSION;
    h[5] = KVF_STORE_OP_SET;
    kvf__put_le16(h + 6, 0);
    kvf__put_le32(h + 8, 1);
    kvf__put_le32(h + 12, KVF_STORE_MAX_FRAME_LEN);
    send_all(big, h, sizeof(h));
    assert_true(wait_closed(big, IO_MS));
    close(big);

    uint64_t vm0 = vm_bytes("VmSize");
    int fds[ANNOUNCERS];
    static uint8_t some[64u << 10];
    kvf__put_le32(h + 12, 32u << 20);
    for (unsigned i = 0; i < ANNOUNCERS; i++) {
        fds[i] = raw_connect(2 + i % 4, port, false);
        assert_true(fds[i] >= 0);
        send_all(fds[i], h, sizeof(h));
        send_all(fds[i], some, sizeof(some));
    }
    /* The server reads them as they come: watch its virtual memory for a second (bounded; a
     * buffer sized by the announcement shows at once, as 32 MiB per connection). */
    int probe = raw_connect(6, port, false);
    assert_true(ping_ok(probe, 1));
    uint64_t grew = 0;
    for (uint64_t until = kvf_test_now_ms() + 1000; kvf_test_now_ms() < until;) {
        uint64_t v = vm_bytes("VmSize"), g = v > vm0 ? v - vm0 : 0;
        grew = g > grew ? g : grew;
        if (grew > (256u << 20))
            break;
        poll(NULL, 0, 20);
    }
    print_message("%u connections announcing 32 MiB, 64 KiB sent: VmSize +%" PRIu64 " MiB\n",
                  ANNOUNCERS, grew >> 20);
    for (unsigned i = 0; i < ANNOUNCERS; i++)
        close(fds[i]);

    /* A full-size value still arrives, the buffer growing as it comes. */
    kvf_store_t *st = client_open(srv, 3000);
    assert_non_null(st);
    uint8_t *v = malloc(KVF_STORE_MAX_VALUE_LEN);
    assert_non_null(v);
    memset(v, 0x77, KVF_STORE_MAX_VALUE_LEN);
    assert_kvf_ok(kvf_store_set(st, "full", v, KVF_STORE_MAX_VALUE_LEN, 0));
    void *back = NULL;
    size_t blen = 0;
    assert_kvf_ok(kvf_store_get(st, "full", 0, &back, &blen));
    assert_int_equal(blen, KVF_STORE_MAX_VALUE_LEN);
    assert_memory_equal(back, v, blen);
    free(back);
    free(v);
    kvf_store_close(st);
    close(probe);
    kvf_store_server_stop(srv);
    if (grew > (256u << 20))
        fail_msg("%u connections announcing 32 MiB grew virtual memory by %" PRIu64 " MiB",
                 ANNOUNCERS, grew >> 20);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(idle_flood_leaves_other_clients_served),
    cmocka_unit_test(idle_connection_closed_busy_ones_kept),
    cmocka_unit_test(library_client_survives_idle_timeout),
    cmocka_unit_test(full_server_frees_slots_by_idle_timeout),
    cmocka_unit_test(fd_exhaustion_pauses_and_recovers),
    cmocka_unit_test(one_client_cannot_store_512_mib),
    cmocka_unit_test(one_client_cannot_hold_150000_keys_or_100000_leases),
    cmocka_unit_test(watch_quota_per_address),
    cmocka_unit_test(server_options_checked),
    cmocka_unit_test(list_and_peer_events_with_150000_sessions),
    cmocka_unit_test(watch_fanout_shares_one_copy),
    cmocka_unit_test(unread_output_closes_connection_with_log),
    cmocka_unit_test(foreign_protocol_closed_with_log),
    cmocka_unit_test(announced_frames_reserve_nothing),
};

KVF_TEST_MAIN(tests)
