/*
 * Many initiator processes writing into one target at once (issue 17): 16 processes, each an
 * engine with 4 tcp connections to the target (64 connections), every byte they wrote checked in
 * the target's memory, and the target (this process) runs no more threads with its 64
 * connections than before the first one came: its I/O threads are fixed. Speed is not asserted
 * here; `kvferry bench --procs N` measures it.
 *
 * The writers are this binary re-executed with --writer (a fork of a process that already runs
 * engine threads could inherit a lock held by one of them).
 */
#include "test_util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define WRITER_ARG  "--writer"
#define PROCS       16u
#define CONNS       4u
#define SLICE       (1u << 20) /* bytes each writer owns in the target buffer */
#define ELEMS       8u         /* elements per call: 128 KiB each, two 64 KiB chunks */
#define ROUNDS      4u         /* calls per writer; the last one's pattern must be what remains */
#define WAIT_MS     60000u     /* bound on a writer reporting, on a loaded machine */

/* The byte at offset @off of writer @w's slice in round @r. */
static uint8_t pattern(unsigned w, unsigned r, size_t off)
{
    uint64_t h = ((uint64_t)w << 40) ^ ((uint64_t)r << 32) ^ off;
    h *= 0x9e3779b97f4a7c15ull;
    return (uint8_t)(h >> 56);
}

/* A writer: argv is URL TARGET_SID TARGET_ADDR INDEX. Prints "done" after its last call, or
 * "error ..." and exits 1; then waits for stdin to close, so that the parent can look at the
 * connections while every writer still holds its own. */
static int writer_main(const char *url, const char *peer, uint64_t addr, unsigned w)
{
    kvf_config_t c;
    kvf_config_init(&c);
    c.transport = KVF_TRANSPORT_TCP;
    c.tcp_conns_per_peer = CONNS;
    c.tcp_chunk_bytes = 64u << 10;
    c.init_timeout_ms = WAIT_MS;
    c.op_timeout_ms = WAIT_MS;
    kvf_engine_t *e = NULL;
    uint8_t *src = malloc(SLICE);
    int rc = src ? kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_PREFILL, 0, &c, &e) : -ENOMEM;
    for (unsigned r = 0; rc == 0 && r < ROUNDS; r++) {
        kvf_xfer_t x[ELEMS];
        for (size_t i = 0; i < SLICE; i++)
            src[i] = pattern(w, r, i);
        for (unsigned k = 0; k < ELEMS; k++)
            x[k] = (kvf_xfer_t){.op = KVF_OP_WRITE,
                                .local = src + (size_t)k * (SLICE / ELEMS),
                                .remote = addr + (uint64_t)w * SLICE + (uint64_t)k * (SLICE / ELEMS),
                                .len = SLICE / ELEMS};
        rc = kvf_transfer_sync(e, peer, x, ELEMS);
    }
    if (rc < 0)
        printf("error writer %u: %s (%s)\n", w, kvf_last_error(), kvf_err_name(rc));
    else
        printf("done\n");
    fflush(stdout);
    char ch;
    while (read(0, &ch, 1) > 0) {
    }
    kvf_engine_destroy(e);
    free(src);
    return rc < 0 ? 1 : 0;
}

/*
 * Counting the target's connections. /proc/net/tcp lists every IPv4 socket of the network
 * namespace, so a socket of another process can carry the target's port: the target holds
 * 127.0.0.1:P, and a bind() to 127.0.0.2:0 (as test_pool, test_abuse_tcp, test_abuse_store and
 * test_auth_log do for their raw clients, while ctest -j runs them next to this test) may be
 * given P as well, since a port is shared by sockets on different addresses. So the target's
 * ends are matched on its whole address, 127.0.0.1:P, and each is traced to the socket at its
 * other end and the writer that holds it. The listing itself is not a snapshot either: it is
 * read a page at a time, and while other tests open and close sockets a row can appear twice
 * (seen: 65, one writer's connection listed twice with the same inode, every writer's engine
 * having opened exactly 4) or be skipped. Rows are counted once per inode, and a look that does
 * not add up is repeated.
 */
struct tcp_row {
    unsigned laddr, raddr; /* as /proc/net/tcp prints them: the s_addr value, read as a number */
    unsigned lport, rport, state;
    unsigned long ino;
};

#define TCP_ESTABLISHED_STATE 0x01u

/* The IPv4 sockets of this namespace, into *@out (malloc'd); their number. */
static size_t tcp_rows(struct tcp_row **out)
{
    FILE *fp = fopen("/proc/net/tcp", "re");
    assert_non_null(fp);
    struct tcp_row *rows = NULL;
    size_t n = 0, cap = 0;
    char line[512];
    while (fgets(line, sizeof(line), fp)) {
        struct tcp_row r;
        if (sscanf(line, " %*u: %x:%x %x:%x %x %*s %*s %*s %*s %*s %lu", &r.laddr, &r.lport,
                   &r.raddr, &r.rport, &r.state, &r.ino) != 6)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 256;
            rows = realloc(rows, cap * sizeof(*rows));
            assert_non_null(rows);
        }
        rows[n++] = r;
    }
    fclose(fp);
    *out = rows;
    return n;
}

/* Whether process @pid holds socket inode @ino among its descriptors. */
static bool holds_socket(pid_t pid, unsigned long ino)
{
    char dir[64], want[64];
    snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)pid);
    snprintf(want, sizeof(want), "socket:[%lu]", ino);
    DIR *d = opendir(dir);
    if (!d)
        return false;
    bool found = false;
    struct dirent *de;
    while (!found && (de = readdir(d))) {
        char link[64];
        ssize_t k = readlinkat(dirfd(d), de->d_name, link, sizeof(link) - 1);
        if (k > 0) {
            link[k] = '\0';
            found = strcmp(link, want) == 0;
        }
    }
    closedir(d);
    return found;
}

/*
 * One look at the target's ends of ESTABLISHED connections (local address 127.0.0.1:@port): how
 * many, into *@ends, and how many of them writer w holds the other end of, into @per[w]. Sockets
 * of other addresses that carry @port are not the target's; *@decoy_seen says whether one
 * ESTABLISHED socket on 127.0.0.2:@port was among them. Returns false, with @why, when a target
 * end's other end is held by no writer.
 */
static bool target_connections(uint16_t port, const pid_t *pid, unsigned per[PROCS],
                               unsigned *ends, bool *decoy_seen, char *why, size_t whylen)
{
    struct tcp_row *rows;
    size_t n = tcp_rows(&rows);
    unsigned lo = htonl(INADDR_LOOPBACK), lo2 = htonl(INADDR_LOOPBACK + 1);
    bool ok = true;
    memset(per, 0, PROCS * sizeof(*per));
    *ends = 0;
    *decoy_seen = false;
    for (size_t i = 0; i < n && ok; i++) {
        const struct tcp_row *r = &rows[i];
        if (r->state != TCP_ESTABLISHED_STATE || r->lport != port)
            continue;
        if (r->laddr == lo2)
            *decoy_seen = true;
        if (r->laddr != lo)
            continue;
        /* The kernel lists the table a page at a time, and sockets other tests open and close
         * meanwhile can make a row appear twice: count each socket once. */
        bool again = false;
        for (size_t j = 0; j < i && !again; j++)
            again = rows[j].ino == r->ino && rows[j].lport == port && rows[j].laddr == lo;
        if (again)
            continue;
        (*ends)++;
        /* The other end: its local endpoint is this one's remote, and the reverse. */
        const struct tcp_row *o = NULL;
        for (size_t j = 0; j < n && !o; j++)
            if (rows[j].laddr == r->raddr && rows[j].lport == r->rport && rows[j].raddr == lo &&
                rows[j].rport == port)
                o = &rows[j];
        unsigned w = PROCS;
        for (unsigned k = 0; o && k < PROCS && w == PROCS; k++)
            if (holds_socket(pid[k], o->ino))
                w = k;
        if (w == PROCS) {
            snprintf(why, whylen,
                     "the target holds a connection from port %u that no writer holds (other end "
                     "%s)",
                     r->rport, o ? "held by another process" : "not found");
            ok = false;
        } else {
            per[w]++;
        }
    }
    free(rows);
    return ok;
}

/*
 * Check that the target's ends are exactly PROCS * CONNS and that writer w holds the other end
 * of exactly CONNS of them. A look that also skipped a row (the same listing's other flaw) is
 * repeated, up to five looks.
 */
static void check_target_connections(uint16_t port, const pid_t *pid, bool *decoy_seen)
{
    char why[256] = "";
    for (unsigned look = 0; look < 5; look++) {
        unsigned per[PROCS], ends;
        if (!target_connections(port, pid, per, &ends, decoy_seen, why, sizeof(why)))
            continue;
        char each[PROCS * 8] = "";
        bool even = ends == PROCS * CONNS;
        for (unsigned w = 0; w < PROCS; w++) {
            snprintf(each + strlen(each), sizeof(each) - strlen(each), " %u", per[w]);
            even &= per[w] == CONNS;
        }
        if (even)
            return;
        snprintf(why, sizeof(why),
                 "the target holds %u established connections on 127.0.0.1:%u, want %u, %u from "
                 "each writer; from each:%s",
                 ends, port, PROCS * CONNS, CONNS, each);
    }
    fail_msg("%s", why);
}

/* Threads of this process. */
static unsigned threads_now(void)
{
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    unsigned n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        n += de->d_name[0] != '.';
    closedir(d);
    return n;
}

static void sixteen_processes_64_connections_every_byte(void **state)
{
    (void)state;
    kvf_test_need_fds("64 connections and their writers' pipes", 512);
    kvf_store_server_t *srv = kvf_test_store_start();
    const char *url = kvf_store_server_url(srv);
    kvf_config_t c;
    kvf_config_init(&c);
    c.transport = KVF_TRANSPORT_TCP;
    kvf_engine_t *t = NULL;
    assert_kvf_ok(kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, &c, &t));
    size_t len = (size_t)PROCS * SLICE;
    uint8_t *dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(dst != MAP_FAILED);
    assert_kvf_ok(kvf_mem_register(t, dst, len));
    const char *sid = kvf_engine_session_id(t);
    const char *colon = strrchr(sid, ':');
    assert_non_null(colon);
    uint16_t port = (uint16_t)strtoul(colon + 1, NULL, 10);

    /* Every thread this process will run is started (engine, store server, I/O threads). */
    unsigned threads_before = threads_now();

    char path[4096], addr[32], idx[PROCS][8];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    assert_true(n > 0);
    path[n] = '\0';
    snprintf(addr, sizeof(addr), "%" PRIu64, (uint64_t)(uintptr_t)dst);
    pid_t pid[PROCS];
    int in[PROCS], out[PROCS];
    for (unsigned w = 0; w < PROCS; w++) {
        int to[2], from[2];
        assert_int_equal(pipe2(to, O_CLOEXEC), 0);
        assert_int_equal(pipe2(from, O_CLOEXEC), 0);
        snprintf(idx[w], sizeof(idx[w]), "%u", w);
        pid[w] = kvf_test_fork();
        if (pid[w] == 0) {
            dup2(to[0], 0);
            dup2(from[1], 1);
            char *argv[] = {path, WRITER_ARG, (char *)url, (char *)sid, addr, idx[w], NULL};
            execv(path, argv);
            _exit(127);
        }
        close(to[0]);
        close(from[1]);
        in[w] = to[1];
        out[w] = from[0];
    }
    for (unsigned w = 0; w < PROCS; w++) {
        char line[512];
        if (kvf_test_read_line(out[w], line, sizeof(line), WAIT_MS) <= 0)
            fail_msg("writer %u said nothing within %u ms", w, WAIT_MS);
        if (strcmp(line, "done") != 0)
            fail_msg("writer %u: %s", w, line);
    }
    /* Every writer is done and still connected: the target holds all 64 connections, 4 from
     * each writer, and nothing else. A socket of another process on 127.0.0.2 that carries the
     * target's port, as another test's bind() may be given, is not one of them: one is made
     * here, connected to a listener that never accepts (the handshake completes in the
     * backlog). */
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int decoy = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(lfd >= 0 && decoy >= 0);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t lal = sizeof(la);
    assert_int_equal(bind(lfd, (struct sockaddr *)&la, sizeof(la)), 0);
    assert_int_equal(listen(lfd, 1), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&la, &lal), 0);
    struct sockaddr_in da = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1),
                             .sin_port = htons(port)};
    /* Another test's raw client may hold 127.0.0.2:P already: then that one is the decoy. */
    bool own_decoy = bind(decoy, (struct sockaddr *)&da, sizeof(da)) == 0;
    if (!own_decoy && errno != EADDRINUSE)
        fail_msg("bind to 127.0.0.2:%u: %s", port, strerror(errno));
    if (own_decoy)
        assert_int_equal(connect(decoy, (struct sockaddr *)&la, sizeof(la)), 0);
    bool decoy_seen;
    check_target_connections(port, pid, &decoy_seen);
    assert_true(decoy_seen || !own_decoy);
    close(decoy);
    close(lfd);
    unsigned threads_during = threads_now();
    if (threads_during != threads_before)
        fail_msg("the target runs %u threads with %u connections, %u before any", threads_during,
                 PROCS * CONNS, threads_before);
    for (unsigned w = 0; w < PROCS; w++) {
        for (size_t i = 0; i < SLICE; i++) {
            uint8_t want = pattern(w, ROUNDS - 1, i);
            if (dst[(size_t)w * SLICE + i] != want)
                fail_msg("writer %u, byte %zu of its slice: 0x%02x, want 0x%02x", w, i,
                         dst[(size_t)w * SLICE + i], want);
        }
    }
    for (unsigned w = 0; w < PROCS; w++) {
        close(in[w]);
        int st = kvf_test_reap(pid[w], WAIT_MS);
        if (st != 0)
            fail_msg("writer %u ended with status %d", w, st);
        close(out[w]);
    }
    assert_kvf_ok(kvf_mem_unregister(t, dst));
    munmap(dst, len);
    kvf_engine_destroy(t);
    kvf_store_server_stop(srv);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(sixteen_processes_64_connections_every_byte),
};

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], WRITER_ARG) == 0)
        return writer_main(argv[2], argv[3], strtoull(argv[4], NULL, 10),
                           (unsigned)strtoul(argv[5], NULL, 10));
    signal(SIGPIPE, SIG_IGN);
    unsetenv("KVFERRY_TRANSPORT");
    return KVF_TEST_RUN(tests, argc, argv);
}
