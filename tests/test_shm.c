/*
 * The shm transport and the choice of transport. Engines of one process take the loop path, so
 * the data tests run the Decode in a child process (this binary re-executed with --shm-child)
 * to exercise real process_vm_writev/readv. The child answers commands on stdin, so the test can
 * check the bytes in the target's memory with a checksum computed there, not only by reading
 * them back through the same transport.
 */
#include "test_util.h"

#include <jansson.h>

#include "common/host.h"
#include "core/core.h"
#include "transport/shm.h"
#include "transport/transport.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_ARG "--shm-child"

/* ---- helpers ------------------------------------------------------------------------------- */

static kvf_config_t quick_config(kvf_transport_kind_t tr)
{
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    c.op_timeout_ms = 10000;
    c.transport = tr;
    return c;
}

static kvf_engine_t *engine(const char *url, kvf_role_t role, kvf_transport_kind_t tr)
{
    kvf_config_t c = quick_config(tr);
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(url, "127.0.0.1:0", role, 0, &c, &e));
    return e;
}

static void fill(uint8_t *p, size_t n, uint32_t seed)
{
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (uint8_t)x;
    }
}

static uint8_t *alloc_filled(size_t n, uint32_t seed)
{
    uint8_t *p = malloc(n);
    assert_non_null(p);
    fill(p, n, seed);
    return p;
}

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void assert_via(kvf_engine_t *e, const char *peer, const char *want)
{
    const char *got = NULL;
    assert_kvf_ok(kvf_engine_peer_transport(e, peer, &got));
    assert_string_equal(got, want);
}

/* ---- the child Decode ---------------------------------------------------------------------- */

/* Registers @size bytes (page-aligned, zeroed; from kvf_mem_alloc when @memfd, which also
 * registers @size bytes of ordinary memory beside it), prints "ready <sid> <addr> [<plain>]",
 * then serves commands: "sum OFF LEN" → "sum <fnv hex>" ("psum" for the ordinary memory),
 * "unreg" → "ok <rc>", "free" → "ok <rc>" (kvf_mem_free), "quit" (or end of input), and
 * "arm": zero the buffer, answer "armed", wait (up to 10 s) until a write has landed (its first,
 * middle or last byte is non-zero), unregister, zero the buffer at once, answer
 * "ok <rc> <message>". SHM_CHILD_OP_TIMEOUT_MS sets its op_timeout_ms. */
static void child_arm(kvf_engine_t *e, uint8_t *buf, size_t size)
{
    volatile const uint8_t *b = buf;
    memset(buf, 0, size);
    printf("armed\n");
    fflush(stdout);
    uint64_t deadline = kvf_test_now_ms() + 10000;
    while (!b[0] && !b[size / 2] && !b[size - 1] && kvf_test_now_ms() < deadline)
        ;
    int rc = kvf_mem_unregister(e, buf);
    memset(buf, 0, size); /* the application reuses the memory */
    printf("ok %d %s\n", rc, rc ? kvf_last_error() : "");
}

static int child_main(const char *url, size_t size, const char *sid, bool memfd)
{
    kvf_engine_t *e;
    kvf_config_t c = quick_config(KVF_TRANSPORT_AUTO);
    const char *op = getenv("SHM_CHILD_OP_TIMEOUT_MS");
    if (op)
        c.op_timeout_ms = (uint32_t)strtoul(op, NULL, 10);
    if (kvf_engine_create(url, sid, KVF_ROLE_DECODE, 0, &c, &e) < 0) {
        printf("error %s\n", kvf_last_error());
        return 1;
    }
    uint8_t *buf = NULL, *plain = NULL;
    if (memfd) {
        void *m = NULL;
        plain = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (kvf_mem_alloc(e, size, &m) < 0 || plain == MAP_FAILED ||
            kvf_mem_register(e, plain, size) < 0) {
            printf("error %s\n", kvf_last_error());
            return 1;
        }
        buf = m;
    } else {
        buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (buf == MAP_FAILED || kvf_mem_register(e, buf, size) < 0) {
            printf("error %s\n", kvf_last_error());
            return 1;
        }
    }
    if (memfd)
        printf("ready %s %p %p\n", kvf_engine_session_id(e), (void *)buf, (void *)plain);
    else
        printf("ready %s %p\n", kvf_engine_session_id(e), (void *)buf);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof(line), stdin)) {
        unsigned long long off, len;
        if (sscanf(line, "sum %llu %llu", &off, &len) == 2 && off + len <= size)
            printf("sum %016" PRIx64 "\n", fnv(buf + off, len));
        else if (sscanf(line, "psum %llu %llu", &off, &len) == 2 && plain && off + len <= size)
            printf("sum %016" PRIx64 "\n", fnv(plain + off, len));
        else if (!strncmp(line, "arm", 3))
            child_arm(e, buf, size);
        else if (!strncmp(line, "unreg", 5))
            printf("ok %d\n", kvf_mem_unregister(e, buf));
        else if (!strncmp(line, "free", 4) && memfd)
            printf("ok %d\n", kvf_mem_free(e, buf));
        else if (!strncmp(line, "quit", 4))
            break;
        else
            printf("error bad command %s", line);
        fflush(stdout);
    }
    kvf_engine_destroy(e); /* frees kvf_mem_alloc memory not yet freed */
    munmap(memfd ? plain : buf, size);
    return 0;
}

typedef struct {
    pid_t pid;
    int in, out; /* write commands to in, read answers from out */
    char sid[512];
    uint64_t addr;
    uint64_t plain; /* memfd mode: the ordinary registered memory beside it */
} child_t;

/* Start the child Decode, inside network namespace @netns when not NULL (listening on @sid). */
static void child_start_mode(const char *netns, const char *sid, const char *url, size_t size,
                             bool memfd, child_t *c)
{
    char path[4096], sz[32];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    assert_true(n > 0);
    path[n] = '\0';
    snprintf(sz, sizeof(sz), "%zu", size);
    int to[2], from[2];
    assert_int_equal(pipe2(to, O_CLOEXEC), 0);
    assert_int_equal(pipe2(from, O_CLOEXEC), 0);
    c->pid = kvf_test_fork();
    assert_true(c->pid >= 0);
    if (c->pid == 0) {
        dup2(to[0], 0);
        dup2(from[1], 1);
        char *argv[] = {path, CHILD_ARG, (char *)url, sz, (char *)sid, memfd ? "memfd" : NULL,
                        NULL};
        char *nargv[] = {"ip", "netns", "exec", (char *)netns, path, CHILD_ARG, (char *)url, sz,
                         (char *)sid, NULL};
        if (netns)
            execvp("ip", nargv);
        else
            execv(path, argv);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    c->in = to[1];
    c->out = from[0];
    char line[512], *end;
    assert_true(kvf_test_read_line(c->out, line, sizeof(line), 10000) > 0);
    if (strncmp(line, "ready ", 6) != 0)
        fail_msg("shm child: %s", line);
    char *sp = strchr(line + 6, ' ');
    assert_non_null(sp);
    *sp = '\0';
    snprintf(c->sid, sizeof(c->sid), "%s", line + 6);
    c->addr = strtoull(sp + 1, &end, 16);
    c->plain = *end == ' ' ? strtoull(end + 1, NULL, 16) : 0;
}

static void child_start_in(const char *netns, const char *sid, const char *url, size_t size,
                           child_t *c)
{
    child_start_mode(netns, sid, url, size, false, c);
}

static void child_start(const char *url, size_t size, child_t *c)
{
    child_start_in(NULL, "127.0.0.1:0", url, size, c);
}

/* The child Decode's memory comes from kvf_mem_alloc (a memfd). */
static void child_start_memfd(const char *url, size_t size, child_t *c)
{
    child_start_mode(NULL, "127.0.0.1:0", url, size, true, c);
}

/* How many memfd mappings of kvferry's this process has (/proc/self/maps names them
 * "/memfd:kvferry (deleted)"): proves a write went through a mapping, and that it went away. */
static int memfd_mappings(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[1024];
    int n = 0;
    assert_non_null(f);
    while (fgets(line, sizeof(line), f))
        n += strstr(line, "/memfd:kvferry") != NULL;
    fclose(f);
    return n;
}

static void warm_wait(kvf_engine_t *e);

static void child_cmd(child_t *c, const char *cmd, char *ans, size_t len)
{
    assert_int_equal(write(c->in, cmd, strlen(cmd)), (ssize_t)strlen(cmd));
    assert_true(kvf_test_read_line(c->out, ans, len, 10000) > 0);
}

/* The checksum of the child's bytes [off, off+len). */
static uint64_t child_sum_of(child_t *c, const char *what, size_t off, size_t len)
{
    char cmd[96], ans[128];
    snprintf(cmd, sizeof(cmd), "%s %zu %zu\n", what, off, len);
    child_cmd(c, cmd, ans, sizeof(ans));
    if (strncmp(ans, "sum ", 4) != 0)
        fail_msg("shm child: %s", ans);
    return strtoull(ans + 4, NULL, 16);
}

static uint64_t child_sum(child_t *c, size_t off, size_t len)
{
    return child_sum_of(c, "sum", off, len);
}

static void child_stop(child_t *c)
{
    if (c->pid > 0) {
        (void)!write(c->in, "quit\n", 5);
        assert_int_equal(kvf_test_reap(c->pid, 10000), 0);
    }
    close(c->in);
    close(c->out);
    c->pid = 0;
}

typedef struct {
    kvf_store_server_t *srv;
    const char *url;
} fx_t;

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    fx->srv = kvf_test_store_start();
    fx->url = kvf_store_server_url(fx->srv);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_store_server_stop(fx->srv);
    free(fx);
    return 0;
}

/* Write @n bytes at offset @off of the child's region, check them there, read them back. */
static void write_check_read(kvf_engine_t *e, child_t *c, size_t off, size_t n, uint32_t seed)
{
    uint8_t *src = alloc_filled(n, seed), *back = calloc(1, n);
    assert_non_null(back);
    assert_kvf_ok(kvf_write(e, c->sid, src, c->addr + off, n));
    assert_int_equal(child_sum(c, off, n), fnv(src, n));
    assert_kvf_ok(kvf_read(e, c->sid, back, c->addr + off, n));
    assert_memory_equal(back, src, n);
    free(src);
    free(back);
}

/* ---- two processes: real process_vm_writev ------------------------------------------------- */

static void two_process_sizes(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, (64u << 20) + 4096, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    assert_kvf_err(kvf_engine_peer_transport(e, c.sid, &(const char *){NULL}), -KVF_ENOTFOUND);
    write_check_read(e, &c, 7, 1, 1);
    assert_via(e, c.sid, "shm"); /* a same-host pair picks shm on its own */
    write_check_read(e, &c, 4096, 4096, 2);
    write_check_read(e, &c, 3, (1u << 20) + 1, 3);
    write_check_read(e, &c, 0, 64u << 20, 4);
    write_check_read(e, &c, 4096, 64u << 20, 5); /* exactly to the region's last byte */
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void two_process_batches(void **state)
{
    fx_t *fx = *state;
    enum { W = 3000, M = 1000 }; /* W > IOV_MAX: several syscalls for one batch */
    size_t off[W + 1];
    off[0] = 0;
    for (int i = 0; i < W; i++)
        off[i + 1] = off[i] + 1 + (size_t)((i * 7919) % 9000);
    size_t total = off[W];
    child_t c;
    child_start(fx->url, total, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *a = alloc_filled(total, 10), *b = alloc_filled(total, 11), *back = calloc(1, total);
    kvf_xfer_t *x = calloc(W, sizeof(*x));

    /* 3,000 writes in reverse order (no two neighbours adjacent in the call's iovecs). */
    for (int i = 0; i < W; i++) {
        int k = W - 1 - i;
        x[i] = (kvf_xfer_t){.op = KVF_OP_WRITE, .local = a + off[k],
                            .remote = c.addr + off[k], .len = off[k + 1] - off[k]};
    }
    assert_kvf_ok(kvf_transfer_sync(e, c.sid, x, W));
    assert_via(e, c.sid, "shm");
    assert_int_equal(child_sum(&c, 0, total), fnv(a, total));

    /* 1,000 mixed: even elements write b, odd ones read back a; alternating ops. */
    for (int i = 0; i < M; i++)
        x[i] = (kvf_xfer_t){.op = i % 2 ? KVF_OP_READ : KVF_OP_WRITE,
                            .local = i % 2 ? back + off[i] : b + off[i],
                            .remote = c.addr + off[i],
                            .len = off[i + 1] - off[i]};
    assert_kvf_ok(kvf_transfer_sync(e, c.sid, x, M));
    uint8_t *want = malloc(total);
    memcpy(want, a, total);
    for (int i = 0; i < M; i += 2)
        memcpy(want + off[i], b + off[i], off[i + 1] - off[i]);
    for (int i = 1; i < M; i += 2)
        assert_memory_equal(back + off[i], a + off[i], off[i + 1] - off[i]);
    assert_int_equal(child_sum(&c, 0, total), fnv(want, total));

    free(want);
    free(x);
    free(a);
    free(b);
    free(back);
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void forced_tcp_by_config(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 1u << 20, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_TCP);
    write_check_read(e, &c, 0, 1u << 20, 20);
    assert_via(e, c.sid, "tcp");
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void forced_tcp_by_env(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 1u << 20, &c);
    setenv("KVFERRY_TRANSPORT", "tcp", 1);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    unsetenv("KVFERRY_TRANSPORT");
    write_check_read(e, &c, 5, 4096, 21);
    assert_via(e, c.sid, "tcp");
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void probe_refused_falls_back_to_tcp(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 4u << 20, &c);
    setenv("KVFERRY_SHM_PROBE_FAIL", "1", 1);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    write_check_read(e, &c, 1, (4u << 20) - 1, 22);
    assert_via(e, c.sid, "tcp");

    /* Forced shm to the same peer: a clear error, nothing written. */
    kvf_engine_t *f = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_SHM);
    uint64_t before = child_sum(&c, 0, 4096);
    uint8_t *src = alloc_filled(4096, 23);
    assert_kvf_err(kvf_write(f, c.sid, src, c.addr, 4096), -KVF_ENOTSUP);
    assert_last_error_contains("shm is forced");
    assert_last_error_contains("probe refused");
    assert_int_equal(child_sum(&c, 0, 4096), before);
    unsetenv("KVFERRY_SHM_PROBE_FAIL");
    free(src);
    kvf_engine_destroy(f);
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void write_past_region_refused(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 8192, &c); /* the mapping is 8192 bytes: a write past would fit */
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(8193, 30);
    uint64_t zero = child_sum(&c, 0, 8192);
    assert_kvf_err(kvf_write(e, c.sid, src, c.addr, 8193), -KVF_ENOTREG);
    assert_last_error_contains(c.sid);
    assert_last_error_contains("1 byte");
    assert_kvf_err(kvf_write(e, c.sid, src, c.addr + 8192, 1), -KVF_ENOTREG);
    assert_kvf_err(kvf_write(e, c.sid, src, c.addr - 1, 2), -KVF_ENOTREG);
    assert_int_equal(child_sum(&c, 0, 8192), zero);
    /* The exact region still works, and the peer was reached by shm. */
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 8192));
    assert_via(e, c.sid, "shm");
    assert_int_equal(child_sum(&c, 0, 8192), fnv(src, 8192));
    free(src);
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void write_after_unregister_refused(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 4096, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(4096, 40), *other = alloc_filled(4096, 41);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
    assert_via(e, c.sid, "shm");
    char ans[64];
    child_cmd(&c, "unreg\n", ans, sizeof(ans));
    assert_string_equal(ans, "ok 0");
    /* No wait: the unregister has returned in the target, so this write must see it. */
    assert_kvf_err(kvf_write(e, c.sid, other, c.addr, 4096), -KVF_ENOTREG);
    assert_kvf_err(kvf_read(e, c.sid, other, c.addr, 1), -KVF_ENOTREG);
    assert_int_equal(child_sum(&c, 0, 4096), fnv(src, 4096));
    free(src);
    free(other);
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void killed_peer_clear_error(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 1u << 20, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(1u << 20, 50);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 1u << 20));
    assert_via(e, c.sid, "shm");
    kill(c.pid, SIGKILL);
    kvf_test_reap(c.pid, 5000);
    c.pid = 0;
    uint64_t t0 = kvf_test_now_ms();
    int rc = kvf_write(e, c.sid, src, c.addr, 1u << 20);
    assert_true(rc == -KVF_EPEERGONE || rc == -ECONNREFUSED);
    assert_last_error_contains(c.sid);
    assert_true(kvf_test_now_ms() - t0 < 5000);
    free(src);
    kvf_engine_destroy(e);
    child_stop(&c);
}

/* ---- one process: loop, and forced shm to ourselves ---------------------------------------- */

static void one_process_loop_and_self(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *dec = engine(fx->url, KVF_ROLE_DECODE, KVF_TRANSPORT_AUTO);
    kvf_engine_t *pre = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    const char *peer = kvf_engine_session_id(dec);
    size_t n = (1u << 20) + 1;
    uint8_t *dst = calloc(1, n), *src = alloc_filled(n, 60);
    assert_kvf_ok(kvf_mem_register(dec, dst, n));
    assert_kvf_ok(kvf_write(pre, peer, src, (uintptr_t)dst, n));
    assert_memory_equal(dst, src, n);
    assert_via(pre, peer, "loop");
    assert_kvf_err(kvf_write(pre, peer, src, (uintptr_t)dst, n + 1), -KVF_ENOTREG);
    /* An engine writing into its own memory. */
    assert_kvf_ok(kvf_write(dec, peer, src + 1, (uintptr_t)dst, n - 1));
    assert_memory_equal(dst, src + 1, n - 1);
    assert_via(dec, peer, "loop");
    assert_kvf_ok(kvf_mem_unregister(dec, dst));
    assert_kvf_err(kvf_write(pre, peer, src, (uintptr_t)dst, 1), -KVF_ENOTREG);
    free(dst);
    free(src);
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
}

static void one_process_forced_shm(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *dec = engine(fx->url, KVF_ROLE_DECODE, KVF_TRANSPORT_AUTO);
    kvf_engine_t *pre = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_SHM);
    const char *peer = kvf_engine_session_id(dec);
    size_t n = 4u << 20;
    uint8_t *dst = calloc(1, n), *src = alloc_filled(n, 70), *back = calloc(1, n);
    assert_kvf_ok(kvf_mem_register(dec, dst, n));
    assert_kvf_ok(kvf_write(pre, peer, src, (uintptr_t)dst, n));
    assert_via(pre, peer, "shm");
    assert_memory_equal(dst, src, n);
    assert_kvf_ok(kvf_read(pre, peer, back, (uintptr_t)dst + 1, n - 1));
    assert_memory_equal(back, src + 1, n - 1);
    memset(dst, 0, n);
    assert_kvf_ok(kvf_mem_unregister(dec, dst));
    assert_kvf_err(kvf_write(pre, peer, src, (uintptr_t)dst, n), -KVF_ENOTREG);
    for (size_t i = 0; i < n; i += 4096)
        assert_int_equal(dst[i], 0);
    free(dst);
    free(src);
    free(back);
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
}

/* (A hostile region table, as the target publishes it to its shm senders: test_shm_table.) */

static void bad_transport_env_refused(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *e = NULL;
    setenv("KVFERRY_TRANSPORT", "rdma", 1);
    assert_kvf_err(kvf_engine_create(fx->url, "127.0.0.1:0", KVF_ROLE_PREFILL, 0, NULL, &e),
                   -KVF_EINVAL);
    assert_last_error_contains("KVFERRY_TRANSPORT=rdma");
    unsetenv("KVFERRY_TRANSPORT");
    assert_null(e);
}

/* ---- the target is the authority: nothing in the store widens what shm may touch ----------- */

/* The store key of @kind ("sessions", "regions") for @sid in the default namespace. */
static void record_key(char *key, size_t len, const char *kind, const char *sid)
{
    snprintf(key, len, "kvferry/v1/default/%s/%s", kind, sid);
}

/* Overwrite a record as any store client can (no lease: it stays). */
static void forge(const char *url, const char *kind, const char *sid, const char *text)
{
    kvf_store_t *st;
    char key[600];
    record_key(key, sizeof(key), kind, sid);
    assert_kvf_ok(kvf_store_open(url, NULL, &st));
    assert_kvf_ok(kvf_store_set(st, key, text, strlen(text), 0));
    kvf_store_close(st);
}

/* A record as the store holds it, NUL-terminated (free() it). */
static char *record_read(const char *url, const char *kind, const char *sid)
{
    kvf_store_t *st;
    char key[600];
    void *val;
    size_t len;
    record_key(key, sizeof(key), kind, sid);
    assert_kvf_ok(kvf_store_open(url, NULL, &st));
    assert_kvf_ok(kvf_store_get(st, key, 0, &val, &len));
    kvf_store_close(st);
    char *text = malloc(len + 1);
    assert_non_null(text);
    memcpy(text, val, len);
    text[len] = '\0';
    free(val);
    return text;
}

/* Reproduced in issue 12: a regions record rewritten to list the Decode's unregistered memory
 * made a same-host Prefill write there with rc 0. The list must come from the target. */
static void forged_regions_record_cannot_widen(void **state)
{
    fx_t *fx = *state;
    child_t c;
    char ans[64], rec[256];
    child_start(fx->url, 4096, &c);
    child_cmd(&c, "unreg\n", ans, sizeof(ans));
    assert_string_equal(ans, "ok 0");
    uint64_t before = child_sum(&c, 0, 4096);
    snprintf(rec, sizeof(rec),
             "{\"gen\": 1000000, \"regions\": [{\"addr\": \"0x%" PRIx64 "\", \"len\": 4096, "
             "\"gen\": 999999}]}",
             c.addr);
    forge(fx->url, "regions", c.sid, rec);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(4096, 50), *back = calloc(1, 4096);
    assert_non_null(back);
    assert_kvf_err(kvf_write(e, c.sid, src, c.addr, 4096), -KVF_ENOTREG);
    assert_last_error_contains(c.sid);
    assert_kvf_err(kvf_read(e, c.sid, back, c.addr, 4096), -KVF_ENOTREG);
    assert_via(e, c.sid, "shm"); /* the path was shm: its own check refused the forgery */
    assert_int_equal(child_sum(&c, 0, 4096), before);
    free(src);
    free(back);
    kvf_engine_destroy(e);
    child_stop(&c);
}

/* Reproduced in issue 12: the Prefill's own session record copied onto the Decode's name made
 * the Prefill accept itself as the Decode. The record's pid and word must prove to be the
 * engine of that session; here they do not, so the write goes over tcp to the real Decode. */
static void own_session_record_under_peer_name_refused(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 4096, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    char *own = record_read(fx->url, "sessions", kvf_engine_session_id(e));
    forge(fx->url, "sessions", c.sid, own);
    free(own);
    uint8_t *src = alloc_filled(4096, 51);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
    assert_int_equal(child_sum(&c, 0, 4096), fnv(src, 4096));
    assert_via(e, c.sid, "tcp");
    free(src);
    kvf_engine_destroy(e);
    child_stop(&c);
}

/* A process that imitates an engine's word (magic, session id, a region table) in its own memory
 * and forges the session record to name its pid does not become that engine: it does not hold
 * the session's listening socket (nor its shm socket, which tells the word's address). */
static void imitated_word_refused(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 4096, &c);
    static kvf_shm_word_t fake;
    static kvf_region_t fake_region;
    fake_region = (kvf_region_t){.addr = c.addr, .len = 4096, .gen = 1};
    fake.magic = KVF_SHM_WORD_MAGIC;
    fake.nonce = 1;
    fake.gen = 1;
    fake.table = (uintptr_t)&fake_region;
    fake.count = 1;
    memcpy(fake.sid, c.sid, strnlen(c.sid, sizeof(fake.sid) - 1));
    char *text = record_read(fx->url, "sessions", c.sid);
    json_t *doc = json_loads(text, 0, NULL);
    assert_non_null(doc);
    json_object_set_new(doc, "pid", json_integer(getpid()));
    char *forged = json_dumps(doc, JSON_COMPACT);
    forge(fx->url, "sessions", c.sid, forged);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(4096, 52);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
    assert_int_equal(child_sum(&c, 0, 4096), fnv(src, 4096));
    assert_via(e, c.sid, "tcp");
    free(src);
    free(forged);
    json_decref(doc);
    free(text);
    kvf_engine_destroy(e);
    child_stop(&c);
}

/* The word's nonce tells a reused pid apart; it stays in the process (a sender reads it from the
 * verified process), so the store gives a forger nothing to copy. Nor does the record publish
 * the word's heap address (issue 12: "the store no longer publishes heap addresses"): a sender
 * learns it from the verified pid's shm socket. No value of the record is an address. */
static void session_record_publishes_no_nonce(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 4096, &c);
    char *text = record_read(fx->url, "sessions", c.sid);
    json_t *doc = json_loads(text, 0, NULL);
    assert_non_null(doc);
    assert_null(json_object_get(doc, "shm_nonce"));
    assert_null(json_object_get(doc, "shm_word"));
    const char *key;
    json_t *v;
    json_object_foreach(doc, key, v)
    {
        if (json_is_string(v) && !strncmp(json_string_value(v), "0x", 2))
            fail_msg("the session record publishes an address: %s = %s", key,
                     json_string_value(v));
    }
    json_decref(doc);
    free(text);
    child_stop(&c);
}

/* ---- kvf_mem_alloc memory: the memfd mapped by the sender ----------------------------------- */

/* The checksum of @n zero bytes. */
static uint64_t fnv_zero(size_t n)
{
    uint8_t *z = calloc(1, n);
    assert_non_null(z);
    uint64_t h = fnv(z, n);
    free(z);
    return h;
}

/* ---- unregister drains same-host senders ---------------------------------------------------- */

#define DRAIN_LEN (64u << 20)

typedef struct {
    kvf_engine_t *e;
    const char *peer;
    const uint8_t *src;
    uint64_t dst;
    size_t len;
    int rc;
} drain_write_t;

static void *drain_writer(void *arg)
{
    drain_write_t *w = arg;
    w->rc = kvf_write(w->e, w->peer, w->src, w->dst, w->len);
    return NULL;
}

/* Send "arm" and wait for "armed"; then the child unregisters once our write lands. */
static void child_arm_cmd(child_t *c)
{
    char ans[256];
    child_cmd(c, "arm\n", ans, sizeof(ans));
    assert_string_equal(ans, "armed");
}

/* The child's "ok <rc> <message>" after its armed unregister; returns rc, message in @msg. */
static int child_unreg_answer(child_t *c, char *msg, size_t len)
{
    char ans[1024];
    assert_true(kvf_test_read_line(c->out, ans, sizeof(ans), 20000) > 0);
    int rc = 1, at = 0;
    if (sscanf(ans, "ok %d %n", &rc, &at) < 1)
        fail_msg("shm child: %s", ans);
    snprintf(msg, len, "%s", ans + at);
    return rc;
}

/* A 64 MiB write is landing in the child's buffer when the child unregisters it and at once
 * zeroes it, as an application reusing the memory would: no byte of the write may appear
 * afterwards (found by a review: the last 64 KiB were overwritten in 2 of 5 runs, up to 12 ms
 * after the unregister returned). The write either completed before the unregister returned or
 * was refused. Several rounds, each a new child. */
static void unregister_drains_on(const char *url, bool memfd)
{
    kvf_engine_t *e = engine(url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(DRAIN_LEN, 7);
    src[0] = src[DRAIN_LEN / 2] = src[DRAIN_LEN - 1] = 0xA5; /* what the child watches */
    uint64_t zero = fnv_zero(DRAIN_LEN);
    for (int round = 0; round < 3; round++) {
        child_t c;
        char msg[512];
        child_start_mode(NULL, "127.0.0.1:0", url, DRAIN_LEN, memfd, &c);
        /* The path (and the mapping, warmed, so that the timed write is a copy through it) first,
         * so the timed write is shm from its first byte. */
        assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
        assert_via(e, c.sid, "shm");
        if (memfd)
            warm_wait(e);
        child_arm_cmd(&c);
        drain_write_t w = {.e = e, .peer = c.sid, .src = src, .dst = c.addr, .len = DRAIN_LEN};
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, drain_writer, &w), 0);
        int rc = child_unreg_answer(&c, msg, sizeof(msg));
        assert_int_equal(pthread_join(th, NULL), 0);
        if (rc != 0)
            fail_msg("round %d: the child's unregister returned %d: %s", round, rc, msg);
        if (w.rc != 0 && w.rc != -KVF_ENOTREG)
            fail_msg("round %d: the write returned %d (%s)", round, w.rc, kvf_last_error());
        if (child_sum(&c, 0, DRAIN_LEN) != zero)
            fail_msg("round %d (%s): bytes of the write landed after unregister returned "
                     "(write rc %d)",
                     round, memfd ? "memfd" : "process_vm_writev", w.rc);
        child_stop(&c);
    }
    free(src);
    kvf_engine_destroy(e);
}

static void unregister_drains_shm_write(void **state)
{
    fx_t *fx = *state;
    unregister_drains_on(fx->url, false);
}

static void unregister_drains_memfd_write(void **state)
{
    fx_t *fx = *state;
    unregister_drains_on(fx->url, true);
}

/* A sender that stays in the middle of a transfer longer than the target's op_timeout_ms (a
 * test hook holds it there): the unregister fails with -KVF_ETIMEDOUT naming that sender's pid
 * and session, after about op_timeout_ms, instead of saying "done". */
static void unregister_timeout_names_sender(void **state)
{
    fx_t *fx = *state;
    child_t c;
    char msg[512], want[128];
    setenv("SHM_CHILD_OP_TIMEOUT_MS", "200", 1);
    child_start(fx->url, 1u << 20, &c);
    unsetenv("SHM_CHILD_OP_TIMEOUT_MS");
    /* The hook is read when the engine is created (the warm-up write below is held too). */
    setenv("KVFERRY_SHM_TEST_HOLD_MS", "1500", 1);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    unsetenv("KVFERRY_SHM_TEST_HOLD_MS");
    uint8_t *src = alloc_filled(1u << 20, 8);
    src[0] = 0x5A;
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
    assert_via(e, c.sid, "shm");
    child_arm_cmd(&c);
    drain_write_t w = {.e = e, .peer = c.sid, .src = src, .dst = c.addr, .len = 1u << 20};
    pthread_t th;
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(pthread_create(&th, NULL, drain_writer, &w), 0);
    int rc = child_unreg_answer(&c, msg, sizeof(msg));
    uint64_t took = kvf_test_now_ms() - t0;
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(rc, -KVF_ETIMEDOUT);
    snprintf(want, sizeof(want), "sender pid %d (session %s) is still copying", (int)getpid(),
             kvf_engine_session_id(e));
    if (!strstr(msg, want))
        fail_msg("the message \"%s\" does not name the sender (%s)", msg, want);
    assert_true(strstr(msg, "op_timeout_ms (200 ms)") != NULL);
    if (took >= 1500)
        fail_msg("the unregister waited for the sender (%llu ms) instead of timing out",
                 (unsigned long long)took);
    assert_kvf_ok(w.rc);
    /* The range is unregistered all the same: later writes are refused. */
    assert_kvf_err(kvf_write(e, c.sid, src, c.addr, 4096), -KVF_ENOTREG);
    free(src);
    kvf_engine_destroy(e);
    child_stop(&c);
}

/* ---- the fence socket under abuse -------------------------------------------------------- */

#define FENCE_SLOTS 256 /* SHM_FENCE_SLOTS: what a target hands out at most */

/* One raw fence request (docs/protocol.md, "memfd exchange", kind 1) on a new connection to
 * @sock; returns the connection and the answer's status (the fds that came with it, the fence
 * page's and the region table's, are closed). */
static int raw_fence_request(const char *sock, int32_t *status)
{
    struct {
        uint32_t magic, version;
        uint64_t addr;
        uint32_t kind, zero;
        char sid[KVF_SESSION_ID_MAX];
    } q = {.magic = 0x6466766bu, .version = 3, .kind = 1};
    struct {
        uint32_t magic;
        int32_t status;
        uint64_t base, len, gen;
    } a;
    _Static_assert(sizeof(q) == 288 && sizeof(a) == 32, "the documented sizes");
    snprintf(q.sid, sizeof(q.sid), "raw");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t n = strlen(sock);
    memcpy(sa.sun_path + 1, sock, n);
    int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(c >= 0);
    assert_int_equal(connect(c, (struct sockaddr *)&sa,
                             (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n)),
                     0);
    assert_int_equal(send(c, &q, sizeof(q), MSG_NOSIGNAL), (ssize_t)sizeof(q));
    union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = &a, .iov_len = sizeof(a)};
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf)};
    assert_int_equal(recvmsg(c, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC), (ssize_t)sizeof(a));
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
        size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfd; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(fd));
            close(fd);
        }
    }
    *status = a.status;
    return c;
}

/* A process of the same user that takes every fence slot of a target (256, each on a
 * connection it keeps) gets KVF_EBUSY for the next one and costs senders only shm: a new engine
 * reaches the target over tcp, bytes verified. A holder that sends anything on its connection
 * loses its slot, and once one is free a new engine is back on shm. */
static void fence_slots_bounded_and_released(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start(fx->url, 4096, &c);
    char *text = record_read(fx->url, "sessions", c.sid);
    json_t *doc = json_loads(text, 0, NULL);
    assert_non_null(doc);
    char sock[128];
    snprintf(sock, sizeof(sock), "%s", json_string_value(json_object_get(doc, "memfd_socket")));
    json_decref(doc);
    free(text);
    assert_true(sock[0] != '\0');

    int held[FENCE_SLOTS];
    int32_t st;
    for (int i = 0; i < FENCE_SLOTS; i++) {
        held[i] = raw_fence_request(sock, &st);
        assert_int_equal(st, 0);
    }
    int extra = raw_fence_request(sock, &st);
    assert_int_equal(st, -KVF_EBUSY);
    close(extra);

    uint8_t *src = alloc_filled(4096, 61);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
    assert_via(e, c.sid, "tcp");
    assert_int_equal(child_sum(&c, 0, 4096), fnv(src, 4096));
    kvf_engine_destroy(e);

    /* A holder that speaks loses its slot: the target frees it when it reads the byte. */
    assert_int_equal(send(held[0], "x", 1, MSG_NOSIGNAL), 1);
    char b;
    struct timeval tv = {.tv_sec = 5};
    setsockopt(held[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ssize_t r = recv(held[0], &b, 1, 0); /* closed by the target (reset: our byte was unread) */
    if (!(r == 0 || (r < 0 && errno == ECONNRESET)))
        fail_msg("the target kept the slot of a holder that spoke: recv %zd (%s)", r,
                 r < 0 ? strerror(errno) : "data");
    close(held[0]);
    fill(src, 4096, 62);
    e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
    assert_via(e, c.sid, "shm");
    assert_int_equal(child_sum(&c, 0, 4096), fnv(src, 4096));
    kvf_engine_destroy(e);
    for (int i = 1; i < FENCE_SLOTS; i++)
        close(held[i]);
    free(src);
    child_stop(&c);
}

/* ---- a dead peer is noticed at once --------------------------------------------------------- */

/* Reproduced in issue 12: a Prefill waiting for its Decode's answer waited out its whole timeout
 * after the Decode was killed. kvf_notify_wait_peer() returns -KVF_EPEERGONE naming the peer
 * within about a second of a SIGKILL, over shm (the pid is gone) and over tcp (the connections
 * broke and a new one is refused); kvf_peer_check() says the same. */
static void peer_killed_noticed_at_once(void **state)
{
    fx_t *fx = *state;
    const kvf_transport_kind_t kinds[] = {KVF_TRANSPORT_AUTO, KVF_TRANSPORT_TCP};
    const char *via[] = {"shm", "tcp"};
    for (size_t k = 0; k < 2; k++) {
        child_t c;
        kvf_notify_t note;
        child_start(fx->url, 4096, &c);
        kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, kinds[k]);
        uint8_t src[64];
        fill(src, sizeof(src), 11);
        assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, sizeof(src)));
        assert_via(e, c.sid, via[k]);
        assert_kvf_ok(kvf_peer_check(e, c.sid));
        /* Alive and silent: the wait runs to its timeout, checking all along. */
        uint64_t t0 = kvf_test_now_ms();
        assert_int_equal(kvf_notify_wait_peer(e, c.sid, &note, 1, 500), 0);
        assert_true(kvf_test_now_ms() - t0 >= 500);

        pid_t dead = c.pid;
        assert_int_equal(kill(c.pid, SIGKILL), 0);
        assert_int_equal(kvf_test_reap(c.pid, 10000), -1); /* killed */
        c.pid = 0;
        t0 = kvf_test_now_ms();
        assert_kvf_err(kvf_notify_wait_peer(e, c.sid, &note, 1, 20000), -KVF_EPEERGONE);
        uint64_t took = kvf_test_now_ms() - t0;
        /* The lines docs/operations.md ("Troubleshooting") quotes: over shm the pid is gone,
         * over tcp the connection broke and a new one is refused. */
        char want[2048];
        if (k == 0)
            snprintf(want, sizeof(want), "peer %s: process %d is gone", c.sid, (int)dead);
        else
            snprintf(want, sizeof(want),
                     "peer %s is gone: no connection to it is up and a new one failed (tcp "
                     "connect to %s (%s): connect: Connection refused)",
                     c.sid, c.sid, c.sid);
        assert_last_error_contains(want);
        if (took > 2000)
            fail_msg("%s: the dead peer was noticed after %llu ms", via[k],
                     (unsigned long long)took);
        assert_kvf_err(kvf_peer_check(e, c.sid), -KVF_EPEERGONE);
        assert_last_error_contains(c.sid);
        /* A notification alone moved no data: its failure does not say data landed. */
        assert_true(kvf_notify_send(e, c.sid, "x", 1) < 0);
        if (strstr(kvf_last_error(), "landed"))
            fail_msg("a lone notification's failure says: %s", kvf_last_error());
        kvf_engine_destroy(e);
        child_stop(&c);
    }
}

/* A target whose kvf_mem_alloc memory this sender writes through a mapping is killed: the copy
 * itself would still succeed (the mapping outlives the process), so the check before it must
 * say the peer is gone, from the target's shared table (its alive mutex, released by the
 * kernel) and pidfd: -KVF_EPEERGONE with "process N is gone", at once, and no write. */
static void killed_memfd_peer_gone(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start_memfd(fx->url, 4096, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_SHM);
    uint8_t *src = alloc_filled(4096, 63);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096));
    assert_via(e, c.sid, "shm");
    warm_wait(e);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 4096)); /* through the mapping now */
    assert_int_equal(child_sum(&c, 0, 4096), fnv(src, 4096));
    pid_t dead = c.pid;
    assert_int_equal(kill(c.pid, SIGKILL), 0);
    assert_int_equal(kvf_test_reap(c.pid, 10000), -1);
    c.pid = 0;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_write(e, c.sid, src, c.addr, 4096), -KVF_EPEERGONE);
    char want[600];
    snprintf(want, sizeof(want), "peer %s: process %d is gone", c.sid, (int)dead);
    assert_last_error_contains(want);
    assert_true(kvf_test_now_ms() - t0 < 2000);
    free(src);
    kvf_engine_destroy(e);
    child_stop(&c);
}

/* A peer whose engine was destroyed (its records withdrawn) and one that never started are gone
 * too, with a message that says so; a malformed session id is a usage error. */
static void peer_check_withdrawn_and_unknown(void **state)
{
    fx_t *fx = *state;
    child_t c;
    kvf_notify_t note;
    child_start(fx->url, 4096, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    char sid[sizeof(c.sid)];
    snprintf(sid, sizeof(sid), "%s", c.sid);
    assert_kvf_ok(kvf_peer_check(e, sid)); /* never reached before: looked up and reached */
    child_stop(&c);                        /* destroys its engine */
    assert_kvf_err(kvf_notify_wait_peer(e, sid, &note, 1, 20000), -KVF_EPEERGONE);
    assert_last_error_contains(sid);
    assert_kvf_err(kvf_peer_check(e, "127.0.0.1:1"), -KVF_EPEERGONE);
    assert_last_error_contains("peer 127.0.0.1:1 has no session record in namespace default: it "
                               "is gone, or never started");
    assert_kvf_err(kvf_peer_check(e, "no-port"), -KVF_EINVAL);
    assert_kvf_err(kvf_notify_wait_peer(e, NULL, &note, 1, 0), -KVF_EINVAL);
    kvf_engine_destroy(e);
}

static void memfd_write_sizes(void **state)
{
    fx_t *fx = *state;
    static const size_t sizes[] = {4096, (16u << 20) + 3};
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    for (size_t k = 0; k < 2; k++) {
        size_t n = sizes[k];
        child_t c;
        child_start_memfd(fx->url, n, &c);
        int before = memfd_mappings();
        /* The whole allocation, then a piece at an odd offset, each checked in the child and
         * read back byte for byte. */
        write_check_read(e, &c, 0, n, 90 + (uint32_t)k);
        assert_via(e, c.sid, "shm");
        /* The first write went over process_vm while the warmer mapped and warmed the region;
         * the next ones are copies through the mapping. */
        warm_wait(e);
        assert_int_equal(memfd_mappings(), before + 1);
        write_check_read(e, &c, 1, n - 1, 92 + (uint32_t)k);
        write_check_read(e, &c, n / 2, n - n / 2, 94 + (uint32_t)k);
        /* The bounds are the allocation's exact length, not the mapping's page-rounded one. */
        uint8_t *src = alloc_filled(n + 1, 96);
        uint64_t sum = child_sum(&c, 0, n);
        assert_kvf_err(kvf_write(e, c.sid, src, c.addr, n + 1), -KVF_ENOTREG);
        /* The page-rounded tail of the mapping (16 MiB + 3) is not registered; at 4 KiB the
         * next byte may be the child's ordinary region, which is a legal target. */
        if (c.plain != c.addr + n)
            assert_kvf_err(kvf_write(e, c.sid, src, c.addr + n, 1), -KVF_ENOTREG);
        assert_int_equal(child_sum(&c, 0, n), sum);
        assert_int_equal(child_sum_of(&c, "psum", 0, n), fnv_zero(n));
        free(src);
        child_stop(&c);
    }
    kvf_engine_destroy(e);
    assert_int_equal(memfd_mappings(), 0); /* the peer handles unmapped on destroy */
}

/* One batch across kvf_mem_alloc memory (memcpy through the mapping) and ordinary registered
 * memory (process_vm_writev), interleaved, then read back the same way. */
static void memfd_batch_mixed(void **state)
{
    fx_t *fx = *state;
    enum { W = 64 };
    size_t n = 1u << 20, piece = n / (W / 2);
    child_t c;
    child_start_memfd(fx->url, n, &c);
    assert_true(c.plain != 0);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(2 * n, 97), *back = calloc(1, 2 * n);
    /* The peer opened and its kvf_mem_alloc region mapped and warmed first, so that the batch's
     * elements into it are copies through the mapping. */
    assert_kvf_ok(kvf_read(e, c.sid, back, c.plain, 1));
    warm_wait(e);
    kvf_xfer_t x[W];
    for (int i = 0; i < W; i++) {
        size_t off = (size_t)(i / 2) * piece;
        x[i] = (kvf_xfer_t){.op = KVF_OP_WRITE, .local = src + (i % 2) * n + off,
                            .remote = (i % 2 ? c.plain : c.addr) + off, .len = piece};
    }
    assert_kvf_ok(kvf_transfer_sync(e, c.sid, x, W));
    assert_int_equal(memfd_mappings(), 1);
    assert_int_equal(child_sum(&c, 0, n), fnv(src, n));
    assert_int_equal(child_sum_of(&c, "psum", 0, n), fnv(src + n, n));
    for (int i = 0; i < W; i++) {
        x[i].op = KVF_OP_READ;
        x[i].local = back + ((uint8_t *)x[i].local - src);
    }
    assert_kvf_ok(kvf_transfer_sync(e, c.sid, x, W));
    assert_memory_equal(back, src, 2 * n);
    free(src);
    free(back);
    kvf_engine_destroy(e);
    child_stop(&c);
}

/* Threads of this process (/proc/self/task). */
static int task_count(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int n = -1;
    while (f && fgets(line, sizeof(line), f))
        if (!strncmp(line, "Threads:", 8))
            n = atoi(line + 8);
    if (f)
        fclose(f);
    return n;
}

/* With KVFERRY_SHM_COPY_THREADS=2, an element of 32 MiB + 5 through the memfd mapping is split
 * over the copy pool (one worker, started on that copy), written and read back exactly, also at
 * an odd offset; an element just below the threshold (8 MiB) is copied without the pool. */
static void memfd_copy_threads(void **state)
{
    fx_t *fx = *state;
    size_t n = (32u << 20) + 5, below = (8u << 20) - 1;
    child_t c;
    child_start_memfd(fx->url, n, &c);
    int base = task_count();
    setenv("KVFERRY_SHM_COPY_THREADS", "2", 1);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    unsetenv("KVFERRY_SHM_COPY_THREADS");
    write_check_read(e, &c, 3, below, 110);
    assert_via(e, c.sid, "shm");
    warm_wait(e); /* the copies below go through the mapping */
    assert_int_equal(memfd_mappings(), 1);
    int before = task_count();
    write_check_read(e, &c, 7, below, 111);
    assert_int_equal(task_count(), before); /* below the threshold: no copy thread */
    write_check_read(e, &c, 0, n, 112);
    assert_int_equal(task_count(), before + 1); /* the one worker, started lazily */
    write_check_read(e, &c, 1, n - 1, 113);
    assert_int_equal(task_count(), before + 1); /* persistent: not one per copy */
    assert_int_equal(child_sum_of(&c, "psum", 0, n), fnv_zero(n));
    kvf_engine_destroy(e);
    assert_int_equal(task_count(), base); /* the worker was joined with the transport */
    child_stop(&c);
}

typedef struct {
    kvf_engine_t *e;
    const char *sid;
    const uint8_t *src;
    uint64_t remote;
    size_t len;
    int rc;
} memfd_writer_t;

static void *memfd_writer(void *arg)
{
    memfd_writer_t *w = arg;
    w->rc = kvf_write(w->e, w->sid, w->src, w->remote, w->len);
    return NULL;
}

/* ---- the warmer: mapping when a region is learned ------------------------------------------ */

/* The shm transport of engine @e (tests see the engine's internals). */
static struct shm_transport *shm_transport_of(kvf_engine_t *e)
{
    for (size_t i = 0; kvf__transports[i]; i++)
        if (kvf__transports[i] == &kvf__shm_ops)
            return shm_of(e->tr[i]);
    fail_msg("no shm transport in the table");
    return NULL;
}

static uint64_t ld64(_Atomic uint64_t *c)
{
    return atomic_load(c);
}

/* Until the warmer of @e has mapped and warmed what it was given. */
static void warm_wait(kvf_engine_t *e)
{
    assert_kvf_ok(shm_warm_idle(shm_transport_of(e), kvf_test_now_ms() + 10000));
}

/* The peer is opened by a 1-byte read of the child's ordinary memory, which learns the child's
 * regions: the warmer maps the kvf_mem_alloc region and warms every page of it before any
 * transfer goes there. The first write into it then maps nothing. */
static void memfd_mapped_when_learned(void **state)
{
    fx_t *fx = *state;
    size_t n = 2u << 20;
    child_t c;
    child_start_memfd(fx->url, n, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    struct shm_transport *t = shm_transport_of(e);
    uint8_t one;
    assert_kvf_ok(kvf_read(e, c.sid, &one, c.plain, 1));
    assert_via(e, c.sid, "shm");
    assert_kvf_ok(shm_warm_idle(t, kvf_test_now_ms() + 10000));
    assert_int_equal(memfd_mappings(), 1);
    assert_int_equal(ld64(&t->warm_regions), 1);
    assert_int_equal(ld64(&t->warm_pages), n / 4096);
    assert_int_equal(ld64(&t->xfer_maps), 0);
    uint8_t *src = alloc_filled(n, 120);
    uint64_t unwarmed = ld64(&t->xfer_unwarmed); /* the read above: its region not asked yet */
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, n));
    assert_int_equal(child_sum(&c, 0, n), fnv(src, n));
    assert_int_equal(ld64(&t->xfer_maps), 0); /* the write found the mapping made */
    assert_int_equal(ld64(&t->xfer_unwarmed), unwarmed); /* and warm: a copy through it */
    assert_int_equal(memfd_mappings(), 1);
    free(src);
    kvf_engine_destroy(e);
    assert_int_equal(memfd_mappings(), 0);
    child_stop(&c);
}

/* A gate the warmer's test hook stops at after its first chunk: until the test releases it, or
 * (when @until_cancel) until the transport asks the warmer to leave the peer. Bounded: 10 s. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct shm_transport *t;
    int entered;
    bool release, until_cancel, saw_cancel;
} warm_gate_t;

static void warm_gate_hook(void *arg)
{
    warm_gate_t *g = arg;
    uint64_t deadline = kvf_test_now_ms() + 10000;
    pthread_mutex_lock(&g->mu);
    bool first = g->entered++ == 0;
    pthread_cond_broadcast(&g->cv);
    while (first && !g->release && kvf_test_now_ms() < deadline) {
        if (g->until_cancel && atomic_load(&g->t->warm_cancel)) {
            g->saw_cancel = true;
            break;
        }
        /* The cancel flag is set without a signal to this gate: look at it every few ms. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 2000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    }
    pthread_mutex_unlock(&g->mu);
}

/* Let the warmer held by @g go on. */
static void warm_gate_release(warm_gate_t *g)
{
    pthread_mutex_lock(&g->mu);
    g->release = true;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void warm_gate_wait_entered(warm_gate_t *g)
{
    uint64_t deadline = kvf_test_now_ms() + 10000;
    pthread_mutex_lock(&g->mu);
    while (!g->entered && kvf_test_now_ms() < deadline) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    }
    int entered = g->entered;
    pthread_mutex_unlock(&g->mu);
    assert_true(entered > 0);
}

/* Engine @e with the gate on its warmer; the peer opened (its regions learned) and the warmer
 * held after its first chunk of the child's kvf_mem_alloc region. */
static void warm_gate_start(kvf_engine_t *e, child_t *c, warm_gate_t *g, bool until_cancel)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->t = shm_transport_of(e);
    g->until_cancel = until_cancel;
    g->t->test_warm_hook = warm_gate_hook;
    g->t->test_warm_arg = g;
    uint8_t one;
    assert_kvf_ok(kvf_read(e, c->sid, &one, c->plain, 1));
    assert_via(e, c->sid, "shm");
    warm_gate_wait_entered(g);
    assert_int_equal(memfd_mappings(), 1);
}

/* A child with an @n-byte kvf_mem_alloc region, a Prefill engine of it, and @g on the engine's
 * warmer, held inside the region (warm_gate_start()). Returns the engine. */
static kvf_engine_t *warm_gate_case(fx_t *fx, size_t n, child_t *c, warm_gate_t *g,
                                    bool until_cancel)
{
    child_start_memfd(fx->url, n, c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    warm_gate_start(e, c, g, until_cancel);
    return e;
}

/* Free what warm_gate_start() set up in @g (its engine destroyed). */
static void warm_gate_fini(warm_gate_t *g)
{
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
}

/* The target frees its kvf_mem_alloc region while the warmer is inside it: the next transfer
 * learns the new table and unmaps the region (the warmer holds no lock between chunks), the
 * warmer finds it gone at its next chunk and stops there, and the engine goes on. */
static void memfd_warm_cut_by_free(void **state)
{
    fx_t *fx = *state;
    size_t n = 8u << 20;
    child_t c;
    warm_gate_t g = {0};
    kvf_engine_t *e = warm_gate_case(fx, n, &c, &g, false);
    char ans[64];
    child_cmd(&c, "free\n", ans, sizeof(ans));
    assert_string_equal(ans, "ok 0");
    uint8_t *src = alloc_filled(4096, 121);
    int rc = kvf_write(e, c.sid, src, c.addr, 4096);
    assert_true(rc == -KVF_ENOTREG || rc == -KVF_ESTALE);
    assert_int_equal(memfd_mappings(), 0); /* unmapped while the warmer was held inside it */
    warm_gate_release(&g);
    assert_kvf_ok(shm_warm_idle(g.t, kvf_test_now_ms() + 10000));
    assert_int_equal(g.entered, 1);
    assert_int_equal(ld64(&g.t->warm_pages), 16); /* one chunk, then it found the region gone */
    /* The ordinary memory is still written, over shm. */
    assert_kvf_ok(kvf_write(e, c.sid, src, c.plain, 4096));
    assert_int_equal(child_sum_of(&c, "psum", 0, 4096), fnv(src, 4096));
    free(src);
    kvf_engine_destroy(e);
    warm_gate_fini(&g);
    child_stop(&c);
}

/* A write into a region the warmer is still warming neither waits for it nor copies through the
 * cold mapping: it goes over process_vm_writev (counted), its bytes arrive, and the transfer
 * maps nothing itself. Once the warmer is done, writes are copies through the mapping. */
static void memfd_first_write_while_warming(void **state)
{
    fx_t *fx = *state;
    size_t n = 8u << 20;
    child_t c;
    warm_gate_t g = {0};
    kvf_engine_t *e = warm_gate_case(fx, n, &c, &g, false);
    uint8_t *src = alloc_filled(n, 122);
    uint64_t unwarmed = ld64(&g.t->xfer_unwarmed), t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr + 4096, 65536));
    /* Not held up by the gate (which holds the warmer up to 10 s): it did not wait. */
    assert_true(kvf_test_now_ms() - t0 < 5000);
    assert_int_equal(child_sum(&c, 4096, 65536), fnv(src, 65536));
    assert_int_equal(ld64(&g.t->xfer_unwarmed), unwarmed + 1);
    assert_int_equal(ld64(&g.t->xfer_maps), 0);
    pthread_mutex_lock(&g.mu);
    assert_int_equal(g.entered, 1); /* the warmer is still held after its first chunk */
    pthread_mutex_unlock(&g.mu);
    warm_gate_release(&g);
    warm_wait(e);
    assert_int_equal(ld64(&g.t->warm_pages), n / 4096);
    write_check_read(e, &c, 0, n, 123);
    assert_int_equal(ld64(&g.t->xfer_unwarmed), unwarmed + 1); /* the mapping, warm now */
    assert_int_equal(memfd_mappings(), 1);
    free(src);
    kvf_engine_destroy(e);
    warm_gate_fini(&g);
    child_stop(&c);
}

/* The engine is destroyed while the warmer is inside a mapping: closing the peer cancels the
 * warmer and waits for it to leave before unmapping (the gate returns on that cancel, not on its
 * 10 s bound), and destroy returns with nothing mapped. */
static void memfd_warm_cut_by_destroy(void **state)
{
    fx_t *fx = *state;
    size_t n = 8u << 20;
    child_t c;
    warm_gate_t g = {0};
    kvf_engine_t *e = warm_gate_case(fx, n, &c, &g, true);
    uint64_t t0 = kvf_test_now_ms();
    kvf_engine_destroy(e);
    assert_true(g.saw_cancel);
    assert_true(kvf_test_now_ms() - t0 < 9000); /* not the gate's own bound */
    assert_int_equal(g.entered, 1);              /* no chunk after the cancel */
    assert_int_equal(memfd_mappings(), 0);
    warm_gate_fini(&g);
    /* The child is alive, and the warmer's stores changed no byte of its zeroed region. */
    assert_int_equal(child_sum(&c, 0, n), fnv_zero(n));
    child_stop(&c);
}

/* Four threads make their first writes into one region at once: it is asked for and mapped
 * once, and every byte arrives. */
static void memfd_concurrent_first_writes(void **state)
{
    fx_t *fx = *state;
    enum { T = 4 };
    size_t n = 4u << 20, q = n / T;
    child_t c;
    child_start_memfd(fx->url, n, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(n, 100);
    /* The peer is looked up first, so the threads race on the region, not on the lookup. */
    assert_kvf_ok(kvf_read(e, c.sid, src, c.addr, 1));
    fill(src, n, 100);
    pthread_t th[T];
    memfd_writer_t w[T];
    for (int i = 0; i < T; i++) {
        w[i] = (memfd_writer_t){.e = e, .sid = c.sid, .src = src + (size_t)i * q,
                                .remote = c.addr + (size_t)i * q, .len = q, .rc = 1};
        assert_int_equal(pthread_create(&th[i], NULL, memfd_writer, &w[i]), 0);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        assert_kvf_ok(w[i].rc);
    }
    warm_wait(e);
    assert_int_equal(memfd_mappings(), 1);
    assert_int_equal(child_sum(&c, 0, n), fnv(src, n));
    free(src);
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void memfd_write_after_free_refused(void **state)
{
    fx_t *fx = *state;
    child_t c;
    child_start_memfd(fx->url, 1u << 20, &c);
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    uint8_t *src = alloc_filled(1u << 20, 98);
    assert_kvf_ok(kvf_write(e, c.sid, src, c.addr, 1u << 20));
    assert_via(e, c.sid, "shm");
    warm_wait(e);
    assert_int_equal(memfd_mappings(), 1);
    char ans[64];
    child_cmd(&c, "free\n", ans, sizeof(ans));
    assert_string_equal(ans, "ok 0");
    /* No wait: kvf_mem_free has returned in the target, so the sender sees the generation
     * move, refuses, and drops its mapping. */
    int rc = kvf_write(e, c.sid, src, c.addr, 1u << 20);
    assert_true(rc == -KVF_ENOTREG || rc == -KVF_ESTALE);
    assert_last_error_contains(c.sid);
    assert_kvf_err(kvf_read(e, c.sid, src, c.addr, 1), -KVF_ENOTREG);
    assert_int_equal(memfd_mappings(), 0);
    /* The child is alive and answers. */
    child_cmd(&c, "unreg\n", ans, sizeof(ans));
    assert_string_equal(ans, "ok -1006"); /* -KVF_ENOTREG: nothing is registered any more */
    free(src);
    kvf_engine_destroy(e);
    child_stop(&c);
}

static void mem_alloc_arguments(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_DECODE, KVF_TRANSPORT_AUTO);
    void *p = (void *)1;
    assert_kvf_err(kvf_mem_alloc(e, 0, &p), -KVF_EINVAL);
    assert_last_error_contains("length is 0");
    assert_null(p);
    assert_kvf_err(kvf_mem_alloc(e, 4096, NULL), -KVF_EINVAL);
    assert_last_error_contains("output pointer is NULL");
    assert_kvf_err(kvf_mem_alloc(NULL, 4096, &p), -KVF_EINVAL);
    assert_last_error_contains("engine is NULL");
    assert_kvf_err(kvf_mem_alloc(e, SIZE_MAX, &p), -KVF_EINVAL);
    assert_last_error_contains("larger than any memory");
    assert_kvf_err(kvf_mem_free(e, NULL), -KVF_EINVAL);
    assert_last_error_contains("pointer is NULL");
    uint8_t other[16];
    assert_kvf_err(kvf_mem_free(e, other), -KVF_EINVAL);
    assert_last_error_contains("not returned by kvf_mem_alloc");

    /* A good one: page-aligned, zeroed, registered with its exact length, freed once. */
    assert_kvf_ok(kvf_mem_alloc(e, 5000, &p));
    assert_int_equal((uintptr_t)p % 4096, 0);
    for (size_t i = 0; i < 5000; i++)
        assert_int_equal(((uint8_t *)p)[i], 0);
    assert_kvf_err(kvf_mem_register(e, p, 5000), -KVF_EEXIST);
    kvf_region_info_t *ri;
    size_t nr;
    assert_kvf_ok(kvf_peer_regions(e, kvf_engine_session_id(e), &ri, &nr));
    assert_int_equal(nr, 1);
    assert_int_equal(ri[0].addr, (uintptr_t)p);
    assert_int_equal(ri[0].len, 5000);
    free(ri);
    assert_kvf_ok(kvf_mem_free(e, p));
    assert_kvf_err(kvf_mem_free(e, p), -KVF_EINVAL);
    assert_last_error_contains("already freed");
    assert_kvf_ok(kvf_peer_regions(e, kvf_engine_session_id(e), &ri, &nr));
    assert_int_equal(nr, 0);
    free(ri);
    /* Not freed: destroy frees it. */
    assert_kvf_ok(kvf_mem_alloc(e, 1, &p));
    kvf_engine_destroy(e);
}

static void mem_alloc_huge_pages_or_fallback(void **state)
{
    fx_t *fx = *state;
    kvf_config_t cfg = quick_config(KVF_TRANSPORT_AUTO);
    cfg.mem_huge_pages = 1;
    kvf_engine_t *dec = NULL;
    assert_kvf_ok(kvf_engine_create(fx->url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, &cfg, &dec));
    kvf_engine_t *pre = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_AUTO);
    void *p;
    size_t n = (3u << 20) + 1;
    /* Huge pages when the host has some reserved, normal pages otherwise: it works either way. */
    assert_kvf_ok(kvf_mem_alloc(dec, n, &p));
    uint8_t *src = alloc_filled(n, 99);
    assert_kvf_ok(kvf_write(pre, kvf_engine_session_id(dec), src, (uintptr_t)p, n));
    assert_via(pre, kvf_engine_session_id(dec), "loop");
    assert_memory_equal(p, src, n);
    assert_kvf_ok(kvf_mem_free(dec, p));
    assert_kvf_err(kvf_write(pre, kvf_engine_session_id(dec), src, (uintptr_t)p, 1),
                   -KVF_ENOTREG);
    free(src);
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
}

/* ---- two "hosts": engines in two network namespaces -------------------------------------- */

static char ns_a[32], ns_b[32], veth_a[16], veth_b[16];

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int netns_teardown(void **state)
{
    (void)state;
    if (ns_a[0])
        sh("ip netns del %s 2>/dev/null", ns_a);
    if (ns_b[0])
        sh("ip netns del %s 2>/dev/null", ns_b);
    return 0;
}

/* Two namespaces joined by a veth pair, 10.213.7.1 (A, this process) and 10.213.7.2 (B, the
 * child): same boot id and pid namespace, but another network namespace counts as another host,
 * so the pair must choose tcp. Only these private addresses, inside our own namespaces, are
 * contacted. */
static void two_hosts_netns_pick_tcp(void **state)
{
    (void)state;
    snprintf(ns_a, sizeof(ns_a), "kvfshmA%d", (int)getpid());
    snprintf(ns_b, sizeof(ns_b), "kvfshmB%d", (int)getpid());
    snprintf(veth_a, sizeof(veth_a), "kvfa%d", (int)getpid() % 1000000);
    snprintf(veth_b, sizeof(veth_b), "kvfb%d", (int)getpid() % 1000000);
    if (sh("ip netns add %s 2>/dev/null", ns_a) != 0) {
        ns_a[0] = '\0';
        kvf_test_skip("network namespaces cannot be created here (`ip netns add` failed; it "
                      "needs root and iproute2): two-hosts test skipped");
    }
    if (sh("ip netns add %s", ns_b) || sh("ip link add %s type veth peer name %s", veth_a, veth_b) ||
        sh("ip link set %s netns %s", veth_a, ns_a) || sh("ip link set %s netns %s", veth_b, ns_b) ||
        sh("ip -n %s addr add 10.213.7.1/24 dev %s", ns_a, veth_a) ||
        sh("ip -n %s addr add 10.213.7.2/24 dev %s", ns_b, veth_b) ||
        sh("ip -n %s link set %s up", ns_a, veth_a) || sh("ip -n %s link set %s up", ns_b, veth_b) ||
        sh("ip -n %s link set lo up", ns_a) || sh("ip -n %s link set lo up", ns_b))
        fail_msg("setting up namespaces %s and %s failed", ns_a, ns_b);
    char path[64];
    snprintf(path, sizeof(path), "/run/netns/%s", ns_a);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    /* Before any thread exists, so the store's and the engine's threads are in A too. */
    assert_int_equal(setns(fd, CLONE_NEWNET), 0);
    close(fd);

    kvf_store_server_t *srv;
    assert_kvf_ok(kvf_store_server_start("tcp://10.213.7.1:0", &srv));
    const char *url = kvf_store_server_url(srv);
    child_t c;
    child_start_in(ns_b, "10.213.7.2:0", url, 1u << 20, &c);
    kvf_config_t cfg = quick_config(KVF_TRANSPORT_AUTO);
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(url, "10.213.7.1:0", KVF_ROLE_PREFILL, 0, &cfg, &e));
    write_check_read(e, &c, 3, (1u << 20) - 3, 80);
    assert_via(e, c.sid, "tcp");
    /* Forced shm names the reason. */
    kvf_engine_t *f = NULL;
    cfg.transport = KVF_TRANSPORT_SHM;
    assert_kvf_ok(kvf_engine_create(url, "10.213.7.1:0", KVF_ROLE_PREFILL, 0, &cfg, &f));
    uint8_t b[8] = {0};
    assert_kvf_err(kvf_write(f, c.sid, b, c.addr, sizeof(b)), -KVF_ENOTSUP);
    assert_last_error_contains("network namespace");
    kvf_engine_destroy(f);
    kvf_engine_destroy(e);
    child_stop(&c);
    kvf_store_server_stop(srv);
}

/* The check that a pid is a session's engine (it holds the port's listening socket), now asked
 * of the kernel's socket diagnostics: yes for this process's listeners on 127.0.0.1 and ::1, no
 * for a port this process only connects from, no for another process (the parent). */
static void pid_listens_on_port(void **state)
{
    (void)state;
    int l4 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(a4);
    assert_true(l4 >= 0);
    assert_int_equal(bind(l4, (struct sockaddr *)&a4, sizeof(a4)), 0);
    assert_int_equal(listen(l4, 4), 0);
    assert_int_equal(getsockname(l4, (struct sockaddr *)&a4, &sl), 0);
    uint16_t port4 = ntohs(a4.sin_port);
    assert_int_equal(kvf__host_pid_listens(getpid(), port4), 1);
    assert_int_equal(kvf__host_pid_listens(getppid(), port4), 0);

    /* The client end of a connection holds a port too, but does not listen on it. */
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in ca;
    socklen_t cl = sizeof(ca);
    assert_true(c >= 0);
    assert_int_equal(connect(c, (struct sockaddr *)&a4, sizeof(a4)), 0);
    assert_int_equal(getsockname(c, (struct sockaddr *)&ca, &cl), 0);
    assert_int_equal(kvf__host_pid_listens(getpid(), ntohs(ca.sin_port)), 0);
    close(c);
    close(l4);

    int l6 = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l6 < 0)
        return; /* no IPv6 here: the IPv4 half above is the check */
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    socklen_t sl6 = sizeof(a6);
    if (bind(l6, (struct sockaddr *)&a6, sizeof(a6)) == 0) {
        assert_int_equal(listen(l6, 4), 0);
        assert_int_equal(getsockname(l6, (struct sockaddr *)&a6, &sl6), 0);
        assert_int_equal(kvf__host_pid_listens(getpid(), ntohs(a6.sin6_port)), 1);
    }
    close(l6);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(pid_listens_on_port),
    cmocka_unit_test_setup_teardown(two_process_sizes, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(two_process_batches, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(forced_tcp_by_config, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(forced_tcp_by_env, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(probe_refused_falls_back_to_tcp, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(write_past_region_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(write_after_unregister_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(killed_peer_clear_error, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(forged_regions_record_cannot_widen, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(own_session_record_under_peer_name_refused, fx_setup,
                                    fx_teardown),
    cmocka_unit_test_setup_teardown(imitated_word_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(session_record_publishes_no_nonce, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(one_process_loop_and_self, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(one_process_forced_shm, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(bad_transport_env_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(fence_slots_bounded_and_released, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(peer_killed_noticed_at_once, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(killed_memfd_peer_gone, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(peer_check_withdrawn_and_unknown, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(unregister_drains_shm_write, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(unregister_drains_memfd_write, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(unregister_timeout_names_sender, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_write_sizes, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_batch_mixed, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_concurrent_first_writes, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_copy_threads, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_mapped_when_learned, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_warm_cut_by_free, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_first_write_while_warming, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_warm_cut_by_destroy, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(memfd_write_after_free_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(mem_alloc_arguments, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(mem_alloc_huge_pages_or_fallback, fx_setup, fx_teardown),
    cmocka_unit_test_teardown(two_hosts_netns_pick_tcp, netns_teardown),
};

int main(int argc, char **argv)
{
    if ((argc == 5 || argc == 6) && strcmp(argv[1], CHILD_ARG) == 0)
        return child_main(argv[2], strtoull(argv[3], NULL, 10), argv[4],
                          argc == 6 && !strcmp(argv[5], "memfd"));
    signal(SIGPIPE, SIG_IGN);
    /* The suite chooses transports itself; an inherited setting would change what it tests. */
    unsetenv("KVFERRY_TRANSPORT");
    unsetenv("KVFERRY_SHM_PROBE_FAIL");
    unsetenv("KVFERRY_SHM_COPY_THREADS");
    unsetenv("KVFERRY_SHM_TEST_HOLD_MS");
    return KVF_TEST_RUN(tests, argc, argv);
}
