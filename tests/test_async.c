/*
 * Asynchronous batches, notifications and peer events, as a user relies on them (kvferry.h,
 * "Asynchronous batches and notifications" and "Peers"): async batches move the same bytes as
 * sync ones; a thousand of them may be in flight; max_batches, timeouts and cancel behave as
 * documented; a failed element fails only its own batch; a notification is never visible before
 * every byte of its batch, arrives in submission order, and never comes from a batch that failed,
 * was cancelled or whose sender died; peers joining and leaving are reported.
 *
 * CTest runs every case three times (KVFERRY_TRANSPORT unset, tcp, shm). Engines of one process
 * take the loop path unless the transport is forced, so the data-and-notification cases also run
 * a peer in a child process (this binary re-executed with --async-child): there the default picks
 * shm, and the forced runs pick tcp or shm. Batches that must stay pending are aimed at a session
 * id nobody serves yet: a batch waits up to init_timeout_ms for its peer to appear.
 */
#include "test_util.h"

#include "core/core.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHILD_ARG "--async-child"
#define MIB ((size_t)1 << 20)

/* ---- helpers ------------------------------------------------------------------------------- */

static kvf_config_t quick_config(void)
{
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    c.op_timeout_ms = 10000;
    return c;
}

/* A config whose batches wait long enough for an absent peer that a case can watch them pend. */
static kvf_config_t pending_config(void)
{
    kvf_config_t c = quick_config();
    c.init_timeout_ms = 8000;
    return c;
}

static void nap_ms(unsigned ms)
{
    struct timespec ts = {(time_t)(ms / 1000u), (long)(ms % 1000u) * 1000000L};
    nanosleep(&ts, NULL);
}

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A pattern that depends on @seed and on the position: word k of it is mix64(seed * C + k). Every
 * round or batch of a case uses its own seed, so bytes left from an earlier one never pass. */
static void pat_fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t base = seed * 0xd6e8feb86659fd93ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w = mix64(base + i / 8);
        memcpy(p + i, &w, 8);
    }
    if (i < n) {
        uint64_t w = mix64(base + i / 8);
        memcpy(p + i, &w, n - i);
    }
}

/* The offset of the first byte of [p, p+n) that differs from pat_fill(@seed), or SIZE_MAX. */
static size_t pat_check(const uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t base = seed * 0xd6e8feb86659fd93ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w = mix64(base + i / 8), got;
        memcpy(&got, p + i, 8);
        if (got != w)
            for (size_t k = 0; k < 8; k++)
                if (p[i + k] != ((const uint8_t *)&w)[k])
                    return i + k;
    }
    if (i < n) {
        uint64_t w = mix64(base + i / 8);
        for (size_t k = 0; i + k < n; k++)
            if (p[i + k] != ((const uint8_t *)&w)[k])
                return i + k;
    }
    return SIZE_MAX;
}

#define assert_pattern(p, n, seed)                                                                \
    do {                                                                                          \
        size_t bad_ = pat_check((p), (n), (seed));                                                \
        if (bad_ != SIZE_MAX)                                                                     \
            fail_msg("%s: byte %zu of %zu differs from pattern %" PRIu64, #p, bad_,              \
                     (size_t)(n), (uint64_t)(seed));                                              \
    } while (0)

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Zeroed, page-aligned memory (a Decode's buffer). */
static uint8_t *map_zeroed(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    return p;
}

/* A session id nobody serves right now, for a peer that must be named before it exists. */
static void absent_sid(char *sid, size_t len)
{
    /* Below the ephemeral range: no other test's outgoing connection or engine on port 0 takes
     * it, so it stays absent (or free for the engine a test starts on it later). */
    snprintf(sid, len, "127.0.0.1:%u", kvf_test_free_port());
}

/* Wait (bounded) for an atomic flag to reach @want. Returns whether it did. */
static bool flag_wait(atomic_int *f, int want, unsigned ms)
{
    uint64_t deadline = kvf_test_now_ms() + ms;
    while (atomic_load(f) != want) {
        if (kvf_test_now_ms() >= deadline)
            return false;
        nap_ms(1);
    }
    return true;
}

/* A notification's message as a C string (every message these tests send is text). */
static const char *note_text(const kvf_notify_t *n, char *buf, size_t len)
{
    size_t k = n->len < len - 1 ? n->len : len - 1;
    memcpy(buf, n->msg, k);
    buf[k] = '\0';
    return buf;
}

/* ---- child processes ----------------------------------------------------------------------- */

typedef struct {
    pid_t pid;
    int in, out; /* its stdin (close it to make the child finish) and stdout */
    char sid[KVF_SESSION_ID_MAX];
    uint64_t addr;
} child_t;

/* Every child a case starts, so that the teardown can kill and reap what a failed case left. */
#define MAX_KIDS 8
static child_t kids[MAX_KIDS];

static child_t *child_spawn(char *const args[])
{
    child_t *c = NULL;
    for (int i = 0; i < MAX_KIDS && !c; i++)
        if (kids[i].pid == 0)
            c = &kids[i];
    assert_non_null(c);
    char path[4096];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    assert_true(n > 0);
    path[n] = '\0';
    char *argv[16];
    int k = 0;
    argv[k++] = path;
    argv[k++] = CHILD_ARG;
    for (; *args && k < 15; args++)
        argv[k++] = *args;
    argv[k] = NULL;
    int to[2], from[2];
    assert_int_equal(pipe2(to, O_CLOEXEC), 0);
    assert_int_equal(pipe2(from, O_CLOEXEC), 0);
    pid_t pid = kvf_test_fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(to[0], 0);
        dup2(from[1], 1);
        execv(path, argv);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    memset(c, 0, sizeof(*c));
    c->pid = pid;
    c->in = to[1];
    c->out = from[0];
    return c;
}

static void child_line(child_t *c, char *line, size_t len, unsigned ms, const char *what)
{
    if (kvf_test_read_line(c->out, line, len, ms) < 0)
        fail_msg("child %d: no %s line within %u ms", (int)c->pid, what, ms);
}

/* Read the child's "ready <sid> [<addr>]" line. */
static void child_ready(child_t *c)
{
    char line[512];
    child_line(c, line, sizeof(line), 10000, "ready");
    char sid[KVF_SESSION_ID_MAX];
    unsigned long long addr = 0;
    if (sscanf(line, "ready %263s %llx", sid, &addr) < 1)
        fail_msg("child %d: %s", (int)c->pid, line);
    snprintf(c->sid, sizeof(c->sid), "%s", sid);
    c->addr = addr;
}

static void child_close_fds(child_t *c)
{
    if (c->in >= 0)
        close(c->in);
    if (c->out >= 0)
        close(c->out);
    c->in = c->out = -1;
}

/* Close its stdin (it finishes) and reap it. Returns its exit status, -1 if it had to be killed. */
static int child_end(child_t *c, unsigned ms)
{
    close(c->in);
    c->in = -1;
    int rc = kvf_test_reap(c->pid, ms);
    c->pid = 0;
    child_close_fds(c);
    return rc;
}

static void child_kill(child_t *c)
{
    kill(c->pid, SIGKILL);
    kvf_test_reap(c->pid, 5000);
    c->pid = 0;
    child_close_fds(c);
}

/* ---- fixture ------------------------------------------------------------------------------- */

#define MAX_EXTRA 6

typedef struct {
    kvf_store_server_t *srv;
    const char *url;
    kvf_engine_t *dec; /* the target: registers memory, receives notifications */
    kvf_engine_t *pre; /* the sender */
    kvf_engine_t *extra[MAX_EXTRA];
} fx_t;

/* Helper threads a case starts; the teardown shuts the engines down first (which releases any
 * thread blocked in the engine), then joins them. */
#define MAX_THREADS 4
static pthread_t threads[MAX_THREADS];
static int nthreads;

static void thread_start(void *(*fn)(void *), void *arg)
{
    assert_true(nthreads < MAX_THREADS);
    assert_int_equal(pthread_create(&threads[nthreads], NULL, fn, arg), 0);
    nthreads++;
}

/* Join every helper thread (each is bounded by the engine calls it makes). */
static void threads_join(void)
{
    for (int i = 0; i < nthreads; i++)
        pthread_join(threads[i], NULL);
    nthreads = 0;
}

static kvf_engine_t *engine_sid(const char *url, const char *sid, kvf_role_t role,
                                const kvf_config_t *c)
{
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(url, sid, role, 0, c, &e));
    return e;
}

/* One more engine, destroyed by the teardown unless the case destroys it (and says so with
 * fx_forget()). */
static kvf_engine_t *fx_engine(fx_t *fx, const char *sid, kvf_role_t role, const kvf_config_t *c)
{
    for (int i = 0; i < MAX_EXTRA; i++)
        if (!fx->extra[i])
            return fx->extra[i] = engine_sid(fx->url, sid, role, c);
    fail_msg("too many engines");
    return NULL;
}

static void fx_forget(fx_t *fx, kvf_engine_t *e)
{
    for (int i = 0; i < MAX_EXTRA; i++)
        if (fx->extra[i] == e)
            fx->extra[i] = NULL;
}

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    fx->srv = kvf_test_store_start();
    fx->url = kvf_store_server_url(fx->srv);
    kvf_config_t c = quick_config();
    fx->dec = engine_sid(fx->url, "127.0.0.1:0", KVF_ROLE_DECODE, &c);
    fx->pre = engine_sid(fx->url, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    for (int i = 0; i < MAX_KIDS; i++)
        if (kids[i].pid > 0)
            child_kill(&kids[i]);
    kvf_engine_shutdown(fx->pre);
    kvf_engine_shutdown(fx->dec);
    for (int i = 0; i < MAX_EXTRA; i++)
        kvf_engine_shutdown(fx->extra[i]);
    threads_join();
    for (int i = 0; i < MAX_EXTRA; i++)
        kvf_engine_destroy(fx->extra[i]);
    kvf_engine_destroy(fx->pre);
    kvf_engine_destroy(fx->dec);
    kvf_store_server_stop(fx->srv);
    free(fx);
    return 0;
}

/* Wait (bounded) for @b to be DONE, failing with its error otherwise. */
static void batch_done(kvf_batch_t *b, int ms)
{
    int rc = kvf_batch_wait(b, ms);
    if (rc != KVF_BATCH_DONE)
        fail_msg("batch: %d (%s): %s", rc, rc < 0 ? kvf_err_name(rc) : "pending",
                 kvf_last_error());
}

/* ---- 1. async batches move the same bytes as sync ones ------------------------------------- */

enum { MIX_N = 16 };

/* Element i of the mixed batch: even elements write, odd ones read; sizes from 1 byte to 3 MiB,
 * at unaligned offsets. @region is 1 of 2 equal target areas. */
static size_t mix_layout(size_t off[MIX_N + 1])
{
    static const size_t len[MIX_N] = {1,     4096, 3 * MIB, 7,         65536, 1000, MIB + 1, 3,
                                      12345, 2,    8192,    2 * MIB, 1,     333,  4095,    MIB};
    off[0] = 0;
    for (int i = 0; i < MIX_N; i++)
        off[i + 1] = off[i] + len[i] + (size_t)(i % 3);
    return off[MIX_N];
}

static void mix_xfers(kvf_xfer_t x[MIX_N], const size_t off[MIX_N + 1], uint8_t *src,
                      uint8_t *back, uint64_t remote)
{
    for (int i = 0; i < MIX_N; i++) {
        size_t len = off[i + 1] - off[i] - (size_t)(i % 3);
        x[i] = (kvf_xfer_t){.op = i % 2 ? KVF_OP_READ : KVF_OP_WRITE,
                            .local = i % 2 ? back + off[i] : src + off[i],
                            .remote = remote + off[i],
                            .len = len};
    }
}

static void async_matches_sync_mixed(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    size_t off[MIX_N + 1];
    size_t total = mix_layout(off);
    /* Two target areas: A for the async batch, B for the same batch run synchronously. The odd
     * (read) ranges of both hold the same pre-filled bytes. */
    uint8_t *dst = map_zeroed(2 * total);
    uint8_t *src = malloc(total), *back_a = calloc(1, total), *back_b = calloc(1, total);
    assert_non_null(src);
    pat_fill(src, total, 11);
    for (int i = 1; i < MIX_N; i += 2) {
        pat_fill(dst + off[i], off[i + 1] - off[i], 100 + (uint64_t)i);
        pat_fill(dst + total + off[i], off[i + 1] - off[i], 100 + (uint64_t)i);
    }
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 2 * total));

    kvf_xfer_t xa[MIX_N], xb[MIX_N];
    mix_xfers(xa, off, src, back_a, (uintptr_t)dst);
    mix_xfers(xb, off, src, back_b, (uintptr_t)(dst + total));
    kvf_batch_t *b = NULL;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, xa, MIX_N, NULL, 0, &b));
    assert_non_null(b);
    assert_int_equal(kvf_batch_size(b), MIX_N);
    /* The element array was copied: scribbling over ours changes nothing. */
    memset(xa, 0, sizeof(xa));
    batch_done(b, 20000);
    int st[MIX_N];
    for (int i = 0; i < MIX_N; i++)
        st[i] = 12345;
    assert_int_equal(kvf_batch_status(b, st, MIX_N), KVF_BATCH_DONE);
    for (int i = 0; i < MIX_N; i++)
        if (st[i] != 0)
            fail_msg("element %d status %d (%s)", i, st[i], kvf_err_name(st[i]));
    /* Fewer statuses than elements: only those are written. */
    int st3[4] = {7, 7, 7, 7};
    assert_int_equal(kvf_batch_status(b, st3, 3), KVF_BATCH_DONE);
    assert_int_equal(st3[0], 0);
    assert_int_equal(st3[2], 0);
    assert_int_equal(st3[3], 7);
    assert_int_equal(kvf_batch_status(b, NULL, 0), KVF_BATCH_DONE);
    assert_int_equal(kvf_batch_wait(b, 0), KVF_BATCH_DONE);
    kvf_batch_free(b);

    assert_kvf_ok(kvf_transfer_sync(fx->pre, peer, xb, MIX_N));
    for (int i = 0; i < MIX_N; i++) {
        size_t len = off[i + 1] - off[i] - (size_t)(i % 3);
        if (i % 2 == 0) {
            /* Written: the target holds the source bytes, in both areas, and nothing past them. */
            assert_memory_equal(dst + off[i], src + off[i], len);
            assert_memory_equal(dst + total + off[i], src + off[i], len);
            assert_true(all_zero(dst + off[i] + len, (size_t)(i % 3)));
        } else {
            assert_pattern(back_a + off[i], len, 100 + (uint64_t)i);
            assert_memory_equal(back_a + off[i], back_b + off[i], len);
        }
    }
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, 2 * total);
    free(src);
    free(back_a);
    free(back_b);
}

/* ---- 2. many batches in flight; max_batches --------------------------------------------------- */

static void thousand_batches_in_flight(void **state)
{
    fx_t *fx = *state;
    enum { N = 1000 };
    kvf_config_t c = quick_config();
    c.max_batches = 1024;
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    const char *peer = kvf_engine_session_id(fx->dec);
    size_t off[N + 1];
    off[0] = 0;
    for (int i = 0; i < N; i++)
        off[i + 1] = off[i] + 1 + (size_t)((i * 7919) % 30000);
    size_t total = off[N];
    uint8_t *dst = map_zeroed(total), *src = malloc(total);
    assert_non_null(src);
    for (int i = 0; i < N; i++)
        pat_fill(src + off[i], off[i + 1] - off[i], 1000 + (uint64_t)i);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, total));
    kvf_batch_t **b = calloc(N, sizeof(*b));
    for (int i = 0; i < N; i++) {
        kvf_xfer_t x = {KVF_OP_WRITE, src + off[i], (uintptr_t)(dst + off[i]), off[i + 1] - off[i]};
        int rc = kvf_transfer_submit(pre, peer, &x, 1, NULL, 0, &b[i]);
        if (rc < 0)
            fail_msg("submit %d of %d: %s: %s", i, N, kvf_err_name(rc), kvf_last_error());
    }
    for (int i = 0; i < N; i++) {
        batch_done(b[i], 20000);
        int st = 1;
        assert_int_equal(kvf_batch_status(b[i], &st, 1), KVF_BATCH_DONE);
        assert_int_equal(st, 0);
    }
    for (int i = 0; i < N; i++) {
        assert_pattern(dst + off[i], off[i + 1] - off[i], 1000 + (uint64_t)i);
        kvf_batch_free(b[i]);
    }
    free(b);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, total);
    free(src);
}

/* Submit @n one-element batches to @absent (a session nobody serves yet): they stay pending. */
static void submit_pending(kvf_engine_t *e, const char *absent, uint8_t *src, kvf_batch_t **b,
                           int n)
{
    for (int i = 0; i < n; i++) {
        kvf_xfer_t x = {KVF_OP_WRITE, src, 0x100000, 64};
        assert_kvf_ok(kvf_transfer_submit(e, absent, &x, 1, NULL, 0, &b[i]));
    }
    for (int i = 0; i < n; i++) {
        int st = 0;
        assert_int_equal(kvf_batch_status(b[i], &st, 1), KVF_BATCH_PENDING);
        assert_int_equal(st, KVF_XFER_PENDING);
    }
}

static void max_batches_busy_at_once(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    c.max_batches = 4;
    c.submit_blocks = 0;
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    char absent[64];
    absent_sid(absent, sizeof(absent));
    uint8_t src[4096];
    pat_fill(src, sizeof(src), 5);
    uint8_t *dst = map_zeroed(4096);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 4096));
    const char *peer = kvf_engine_session_id(fx->dec);
    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, sizeof(src)};

    kvf_batch_t *b[4], *fifth = NULL;
    submit_pending(pre, absent, src, b, 4);
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_transfer_submit(pre, peer, &x, 1, NULL, 0, &fifth), -KVF_EBUSY);
    assert_true(kvf_test_now_ms() - t0 < 1000);
    /* The whole message, as docs/operations.md ("Troubleshooting") quotes it. */
    char want[256];
    snprintf(want, sizeof(want),
             "submit to %s: 4 batches in flight on engine %s (config.max_batches 4)", peer,
             kvf_engine_session_id(pre));
    assert_string_equal(kvf_last_error(), want);
    assert_null(fifth);

    /* One completes (cancelled): there is room again. */
    assert_kvf_ok(kvf_batch_cancel(b[0]));
    assert_kvf_err(kvf_batch_wait(b[0], 2000), -KVF_ECANCELED);
    assert_kvf_ok(kvf_transfer_submit(pre, peer, &x, 1, NULL, 0, &fifth));
    batch_done(fifth, 10000);
    assert_memory_equal(dst, src, sizeof(src));
    for (int i = 0; i < 4; i++)
        kvf_batch_free(b[i]); /* pending ones are cancelled and waited for */
    kvf_batch_free(fifth);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, 4096);
}

/* Batches waiting for a peer that has not appeared take no thread away from batches to live
 * peers: with every configured thread waiting, a batch to a live peer still completes at once,
 * long before the absent peer's init timeout. */
static void live_peer_not_behind_absent_peer(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    c.async_threads = 2;
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    char absent[64];
    absent_sid(absent, sizeof(absent));
    uint8_t src[4096];
    pat_fill(src, sizeof(src), 6);
    uint8_t *dst = map_zeroed(4096);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 4096));
    const char *peer = kvf_engine_session_id(fx->dec);

    enum { WAITING = 6 };
    kvf_batch_t *b[WAITING], *live = NULL;
    submit_pending(pre, absent, src, b, WAITING);
    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, sizeof(src)};
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_transfer_submit(pre, peer, &x, 1, NULL, 0, &live));
    batch_done(live, 4000);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took >= 4000)
        fail_msg("a batch to a live peer took %" PRIu64 " ms behind batches waiting for %s", took,
                 absent);
    assert_memory_equal(dst, src, sizeof(src));
    for (int i = 0; i < WAITING; i++) {
        assert_int_equal(kvf_batch_status(b[i], NULL, 0), KVF_BATCH_PENDING);
        kvf_batch_free(b[i]);
    }
    kvf_batch_free(live);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, 4096);
}

typedef struct {
    kvf_engine_t *e;
    const char *peer;
    kvf_xfer_t x;
    kvf_batch_t *b;
    atomic_int started, finished;
    int rc;
    uint64_t returned_ms;
} submitter_t;

static void *submit_main(void *p)
{
    submitter_t *s = p;
    atomic_store(&s->started, 1);
    s->rc = kvf_transfer_submit(s->e, s->peer, &s->x, 1, NULL, 0, &s->b);
    s->returned_ms = kvf_test_now_ms();
    atomic_store(&s->finished, 1);
    return NULL;
}

static void max_batches_submit_blocks(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    c.max_batches = 4;
    c.submit_blocks = 1;
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    char absent[64];
    absent_sid(absent, sizeof(absent));
    uint8_t src[4096];
    pat_fill(src, sizeof(src), 6);
    uint8_t *dst = map_zeroed(4096);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 4096));

    kvf_batch_t *b[4];
    submit_pending(pre, absent, src, b, 4);
    static submitter_t s;
    memset(&s, 0, sizeof(s));
    s.e = pre;
    s.peer = kvf_engine_session_id(fx->dec);
    s.x = (kvf_xfer_t){KVF_OP_WRITE, src, (uintptr_t)dst, sizeof(src)};
    thread_start(submit_main, &s);
    assert_true(flag_wait(&s.started, 1, 5000));
    /* Four are pending and none can complete: the fifth submit must still be waiting after
     * 300 ms (it may wait up to op_timeout_ms, 10 s). */
    assert_false(flag_wait(&s.finished, 1, 300));
    uint64_t cancelled_ms = kvf_test_now_ms();
    assert_kvf_ok(kvf_batch_cancel(b[0]));
    assert_true(flag_wait(&s.finished, 1, 5000));
    threads_join();
    assert_kvf_ok(s.rc);
    assert_true(s.returned_ms >= cancelled_ms);
    batch_done(s.b, 10000);
    assert_memory_equal(dst, src, sizeof(src));
    assert_kvf_err(kvf_batch_status(b[0], NULL, 0), -KVF_ECANCELED);
    for (int i = 0; i < 4; i++)
        kvf_batch_free(b[i]);
    kvf_batch_free(s.b);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, 4096);
}

/* ---- 3. kvf_batch_wait honours its timeout ------------------------------------------------- */

static void batch_wait_timeout_honoured(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    char absent[64];
    absent_sid(absent, sizeof(absent));
    uint8_t src[64] = {1};
    kvf_batch_t *b;
    submit_pending(pre, absent, src, &b, 1);
    const int waits[] = {300, 50};
    for (size_t i = 0; i < sizeof(waits) / sizeof(waits[0]); i++) {
        uint64_t t0 = kvf_test_now_ms();
        int rc = kvf_batch_wait(b, waits[i]);
        uint64_t took = kvf_test_now_ms() - t0;
        assert_int_equal(rc, KVF_BATCH_PENDING);
        /* No earlier than asked, and nowhere near the peer wait (8 s). */
        if (took < (uint64_t)waits[i] || took > (uint64_t)waits[i] + 1500)
            fail_msg("kvf_batch_wait(%d ms) returned after %llu ms", waits[i],
                     (unsigned long long)took);
    }
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(kvf_batch_wait(b, 0), KVF_BATCH_PENDING);
    assert_true(kvf_test_now_ms() - t0 < 200);
    kvf_batch_free(b);
}

/* ---- 4. cancel ------------------------------------------------------------------------------ */

static void cancel_pending_batch(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    char absent[64];
    absent_sid(absent, sizeof(absent));
    enum { N = 3 };
    const size_t len = 256 * 1024;
    uint8_t *dst = map_zeroed(N * len), *src = malloc(N * len);
    assert_non_null(src);
    pat_fill(src, N * len, 7);
    kvf_xfer_t x[N];
    for (int i = 0; i < N; i++)
        x[i] = (kvf_xfer_t){KVF_OP_WRITE, src + i * len, (uintptr_t)(dst + i * len), len};
    kvf_batch_t *b;
    assert_kvf_ok(kvf_transfer_submit(pre, absent, x, N, "cancelled", 9, &b));
    assert_int_equal(kvf_batch_status(b, NULL, 0), KVF_BATCH_PENDING);

    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_batch_cancel(b));
    /* A batch still waiting for its peer completes at once, and says why it delivers no
     * notification, in one of the lines docs/operations.md ("Troubleshooting") quotes: the cancel
     * came while the batch was queued, as an async thread took it, or while it looked the peer
     * up. */
    assert_kvf_err(kvf_batch_wait(b, 2000), -KVF_ECANCELED);
    assert_true(kvf_test_now_ms() - t0 < 1000);
    char queued[128], taken[128], lookup[256];
    snprintf(queued, sizeof(queued), "batch of %d element(s) to %s: cancelled before it started", N,
             absent);
    snprintf(taken, sizeof(taken), "batch to %s cancelled before it started", absent);
    snprintf(lookup, sizeof(lookup),
             "looking up peer session %s: cancelled while waiting for "
             "kvferry/v1/default/regions/%s",
             absent, absent);
    const char *msg = kvf_last_error();
    if (strcmp(msg, queued) && strcmp(msg, taken) && strcmp(msg, lookup))
        fail_msg("a cancelled batch says \"%s\", want \"%s\", \"%s\" or \"%s\"", msg, queued, taken,
                 lookup);
    int st[N] = {0, 0, 0};
    assert_kvf_err(kvf_batch_status(b, st, N), -KVF_ECANCELED);
    for (int i = 0; i < N; i++)
        assert_kvf_err(st[i], -KVF_ECANCELED);
    assert_kvf_ok(kvf_batch_cancel(b)); /* twice is fine */
    assert_kvf_err(kvf_batch_status(b, NULL, 0), -KVF_ECANCELED);

    /* Now the peer appears with the target memory registered. Notifications from one engine to
     * one peer keep submission order, so had the cancelled batch delivered its notification it
     * would come before "after". */
    kvf_config_t qc = quick_config();
    kvf_engine_t *late = fx_engine(fx, absent, KVF_ROLE_DECODE, &qc);
    assert_kvf_ok(kvf_mem_register(late, dst, N * len));
    assert_kvf_ok(kvf_notify_send(pre, absent, "after", 5));
    kvf_notify_t *n = malloc(sizeof(*n));
    char text[64];
    assert_int_equal(kvf_notify_wait(late, n, 1, 10000), 1);
    assert_string_equal(note_text(n, text, sizeof(text)), "after");
    assert_int_equal(kvf_notify_wait(late, n, 1, 200), 0);
    assert_true(all_zero(dst, N * len));
    kvf_batch_free(b);
    assert_kvf_ok(kvf_mem_unregister(late, dst));
    free(n);
    munmap(dst, N * len);
    free(src);
}

static void cancel_after_done_keeps_done(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    uint8_t *dst = map_zeroed(MIB), *src = malloc(MIB);
    assert_non_null(src);
    pat_fill(src, MIB, 8);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, MIB));
    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, MIB};
    kvf_batch_t *b;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, &x, 1, "done", 4, &b));
    batch_done(b, 10000);
    assert_kvf_ok(kvf_batch_cancel(b));
    int st = 1;
    assert_int_equal(kvf_batch_status(b, &st, 1), KVF_BATCH_DONE);
    assert_int_equal(st, 0);
    assert_int_equal(kvf_batch_wait(b, 100), KVF_BATCH_DONE);
    assert_memory_equal(dst, src, MIB);
    /* Its notification was delivered (DONE includes it) and stays delivered. */
    kvf_notify_t *n = malloc(sizeof(*n));
    char text[64];
    assert_int_equal(kvf_notify_poll(fx->dec, n, 1), 1);
    assert_string_equal(note_text(n, text, sizeof(text)), "done");
    kvf_batch_free(b);
    free(n);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, MIB);
    free(src);
}

/*
 * Cancel while running: elements not yet started are not sent, the batch fails with
 * -KVF_ECANCELED (unless it had already finished) and delivers no notification. Every element
 * reported done (status 0) has its bytes in place whatever happened to the others.
 */
static void cancel_running_batch(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    enum { N = 64 };
    const size_t len = 4 * MIB;
    uint8_t *dst = map_zeroed(N * len), *src = malloc(N * len);
    assert_non_null(src);
    kvf_xfer_t x[N];
    for (int i = 0; i < N; i++) {
        pat_fill(src + i * len, len, 700 + (uint64_t)i);
        x[i] = (kvf_xfer_t){KVF_OP_WRITE, src + i * len, (uintptr_t)(dst + i * len), len};
    }
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, N * len));
    kvf_batch_t *b;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, x, N, "cancelled while running", 23, &b));
    /* Cancel once the first bytes have landed (bounded poll). */
    volatile uint8_t *first = dst;
    uint64_t deadline = kvf_test_now_ms() + 10000;
    while (*first == 0 && kvf_batch_status(b, NULL, 0) == KVF_BATCH_PENDING) {
        assert_true(kvf_test_now_ms() < deadline);
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    assert_kvf_ok(kvf_batch_cancel(b));
    int rc = kvf_batch_wait(b, 15000);
    int st[N];
    int rc2 = kvf_batch_status(b, st, N);
    assert_int_equal(rc2, rc);
    int done = 0, cancelled = 0;
    for (int i = 0; i < N; i++) {
        if (st[i] == 0) {
            assert_pattern(dst + i * len, len, 700 + (uint64_t)i);
            done++;
        } else if (st[i] == -KVF_ECANCELED) {
            cancelled++;
        } else {
            fail_msg("element %d: %d (%s)", i, st[i], kvf_err_name(st[i]));
        }
    }
    print_message("cancel while running: %s, %d elements done, %d cancelled\n",
                  rc == KVF_BATCH_DONE ? "done first" : kvf_err_name(rc), done, cancelled);
    kvf_notify_t *n = malloc(sizeof(*n));
    char text[64];
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "after", 5));
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 5000), 1);
    if (rc == KVF_BATCH_DONE) {
        assert_int_equal(done, N);
        assert_string_equal(note_text(n, text, sizeof(text)), "cancelled while running");
        assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 5000), 1);
    } else {
        /* Possibly with every element done: the notification had not gone yet, and now never
         * will. */
        assert_kvf_err(rc, -KVF_ECANCELED);
    }
    assert_string_equal(note_text(n, text, sizeof(text)), "after");
    kvf_batch_free(b);
    free(n);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, N * len);
    free(src);
}

/* The target process dies while a batch with a notification is writing into it: the batch fails
 * (or had finished) within the operation timeout; it never stays pending. */
static void batch_fails_when_target_dies(void **state)
{
    fx_t *fx = *state;
    enum { N = 64 };
    const size_t len = 4 * MIB;
    char size[32];
    snprintf(size, sizeof(size), "%zu", N * len);
    char *args[] = {"notes", (char *)fx->url, size, "1000000", NULL};
    child_t *c = child_spawn(args);
    child_ready(c);
    uint8_t *src = malloc(N * len);
    assert_non_null(src);
    pat_fill(src, N * len, 800);
    kvf_xfer_t x[N];
    for (int i = 0; i < N; i++)
        x[i] = (kvf_xfer_t){KVF_OP_WRITE, src + i * len, c->addr + i * len, len};
    /* A first batch opens the path, so the second is moving data when the target dies. */
    kvf_batch_t *b;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, c->sid, x, 1, NULL, 0, &b));
    batch_done(b, 10000);
    kvf_batch_free(b);
    assert_kvf_ok(kvf_transfer_submit(fx->pre, c->sid, x, N, "never", 5, &b));
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s", c->sid);
    child_kill(c);
    uint64_t t0 = kvf_test_now_ms();
    int rc = kvf_batch_wait(b, 15000);
    uint64_t took = kvf_test_now_ms() - t0;
    print_message("batch to a dead target: %d (%s) after %llu ms: %s\n", rc,
                  rc < 0 ? kvf_err_name(rc) : "", (unsigned long long)took,
                  rc < 0 ? kvf_last_error() : "");
    if (rc == KVF_BATCH_PENDING)
        fail_msg("batch still pending 15 s after its target died");
    /* op_timeout_ms is 10 s; a dead peer is noticed by the broken connection well before. */
    assert_true(took < 10000 + 1000);
    if (rc < 0)
        assert_last_error_contains(sid);
    kvf_batch_free(b);
    free(src);
}

/* ---- 5. a failed element fails only its batch ----------------------------------------------- */

static void failed_element_fails_only_its_batch(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    const size_t len = 64 * 1024;
    uint8_t *dst = map_zeroed(4 * len), *src = malloc(4 * len);
    assert_non_null(src);
    pat_fill(src, 4 * len, 9);
    /* Region A = the first two blocks; B = the last; the third block is not registered. */
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 2 * len));
    assert_kvf_ok(kvf_mem_register(fx->dec, dst + 3 * len, len));
    kvf_xfer_t bad[3] = {
        {KVF_OP_WRITE, src, (uintptr_t)dst, len},
        /* Runs from the end of region A into the unregistered block. */
        {KVF_OP_WRITE, src + len, (uintptr_t)(dst + len + len / 2), len},
        {KVF_OP_WRITE, src + 2 * len, (uintptr_t)(dst + 3 * len), len},
    };
    kvf_xfer_t good[2] = {
        {KVF_OP_WRITE, src + 3 * len, (uintptr_t)(dst + len), len},
        {KVF_OP_WRITE, src + 2 * len, (uintptr_t)(dst + 3 * len), len},
    };
    kvf_batch_t *bb, *gb;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, bad, 3, "bad", 3, &bb));
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, good, 2, "good", 4, &gb));

    kvf_last_error_clear();
    int rc = kvf_batch_wait(bb, 10000);
    if (rc != -KVF_ENOTREG)
        fail_msg("bad batch: %d (%s), want KVF_ENOTREG: %s", rc, kvf_err_name(rc),
                 kvf_last_error());
    assert_last_error_contains("element 1");
    int st[3] = {7, 7, 7};
    assert_kvf_err(kvf_batch_status(bb, st, 3), -KVF_ENOTREG);
    assert_kvf_err(st[1], -KVF_ENOTREG);
    /* The others either ran or were never started; none is left pending. */
    for (int i = 0; i < 3; i += 2)
        if (st[i] != 0 && st[i] != -KVF_ECANCELED)
            fail_msg("element %d of the failed batch: %d (%s)", i, st[i], kvf_err_name(st[i]));

    batch_done(gb, 10000);
    int gs[2] = {7, 7};
    assert_int_equal(kvf_batch_status(gb, gs, 2), KVF_BATCH_DONE);
    assert_int_equal(gs[0], 0);
    assert_int_equal(gs[1], 0);
    assert_memory_equal(dst + len, src + 3 * len, len);
    assert_memory_equal(dst + 3 * len, src + 2 * len, len);
    assert_true(all_zero(dst + 2 * len, len));

    /* Only the good batch's notification arrives. */
    kvf_notify_t *n = malloc(sizeof(*n));
    char text[64];
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 5000), 1);
    assert_string_equal(note_text(n, text, sizeof(text)), "good");
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 300), 0);
    free(n);
    kvf_batch_free(bb);
    kvf_batch_free(gb);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst + 3 * len));
    munmap(dst, 4 * len);
    free(src);
}

/* ---- 6. a notification is never visible before its data ------------------------------------ */

/*
 * Rounds: round r writes 4 elements (up to 8 MiB, the largest last) into slot r % NR_SLOTS of
 * the receiver's buffer with the notification "round r slot s salt t". The receiver takes each
 * notification with kvf_notify_wait and, at that moment, checks every byte of that round against
 * the round's own pattern; it answers "ok r" (or what was wrong) on a pipe. The sender reuses a
 * slot only after the receiver answered for the round that last used it.
 */
#define NR_SLOTS 4
#define SLOT_BYTES (9 * MIB)
#define NR_ELEMS 4
#define NR_ROUNDS 200
#define ROUNDS_BUDGET_MS 5000
#define MIN_ROUNDS 20

static void round_elems(uint32_t r, size_t len[NR_ELEMS], size_t off[NR_ELEMS])
{
    len[0] = 1 + (r * 37u) % 4093u;
    len[1] = 4096u * (1 + r % 16u);
    len[2] = 1 + r % 100u;
    len[3] = r % 3u == 0 ? (size_t)(1 + r % 8u) * MIB : 64u * 1024u + r;
    size_t o = 0;
    for (int i = 0; i < NR_ELEMS; i++) {
        off[i] = o;
        o += len[i];
    }
}

static uint64_t round_seed(uint32_t salt, uint32_t r, unsigned i)
{
    return ((uint64_t)salt << 40) ^ ((uint64_t)r << 8) ^ i ^ 0x5bd1e995u;
}

typedef struct {
    kvf_engine_t *e;
    uint8_t *base;
    int fd; /* where to write "ok r" lines */
    char sender[KVF_SESSION_ID_MAX];
    int rc;
} receiver_t;

/* The receiving side, in a child process or a thread. Returns 0 after "end". */
static int receive_rounds(receiver_t *rv)
{
    kvf_notify_t *n = malloc(sizeof(*n));
    uint32_t want = 1;
    char text[128];
    int rc = 1;
    for (;;) {
        int k = kvf_notify_wait(rv->e, n, 1, 20000);
        if (k != 1) {
            dprintf(rv->fd, "error kvf_notify_wait: %d (%s) %s\n", k, k < 0 ? kvf_err_name(k) : "",
                    k < 0 ? kvf_last_error() : "no notification in 20 s");
            break;
        }
        note_text(n, text, sizeof(text));
        if (strcmp(n->sender, rv->sender) != 0) {
            dprintf(rv->fd, "error notification \"%s\" from %s, want %s\n", text, n->sender,
                    rv->sender);
            break;
        }
        if (!strcmp(text, "end")) {
            dprintf(rv->fd, "end %u\n", want - 1);
            rc = 0;
            break;
        }
        unsigned r, s, salt;
        if (sscanf(text, "round %u slot %u salt %u", &r, &s, &salt) != 3 || s >= NR_SLOTS) {
            dprintf(rv->fd, "error bad notification \"%s\"\n", text);
            break;
        }
        if (r != want) {
            dprintf(rv->fd, "error round %u arrived, want round %u (order)\n", r, want);
            break;
        }
        size_t len[NR_ELEMS], off[NR_ELEMS];
        round_elems(r, len, off);
        bool ok = true;
        for (unsigned i = 0; i < NR_ELEMS && ok; i++) {
            size_t bad = pat_check(rv->base + (size_t)s * SLOT_BYTES + off[i], len[i],
                                   round_seed(salt, r, i));
            if (bad != SIZE_MAX) {
                dprintf(rv->fd, "error round %u: notification before data: element %u (%zu "
                                "bytes) differs at byte %zu\n", r, i, len[i], bad);
                ok = false;
            }
        }
        if (!ok)
            break;
        dprintf(rv->fd, "ok %u\n", r);
        want++;
    }
    free(n);
    return rc;
}

static void *receiver_main(void *p)
{
    receiver_t *rv = p;
    rv->rc = receive_rounds(rv);
    return NULL;
}

static void read_ack(int fd, uint32_t *acked)
{
    char line[512];
    if (kvf_test_read_line(fd, line, sizeof(line), 20000) < 0)
        fail_msg("receiver: no answer for round %u within 20 s", *acked + 1);
    unsigned r;
    if (sscanf(line, "ok %u", &r) != 1 || r != *acked + 1)
        fail_msg("receiver, after round %u: %s", *acked, line);
    (*acked)++;
}

/* The sending side: rounds until NR_ROUNDS or the time budget, then "end". */
static void send_rounds(kvf_engine_t *pre, const char *peer, uint64_t base, int fd, bool async,
                        uint32_t salt)
{
    uint8_t *src = malloc(NR_SLOTS * SLOT_BYTES);
    assert_non_null(src);
    kvf_batch_t *b[NR_SLOTS] = {NULL};
    uint32_t acked = 0, r;
    uint64_t deadline = kvf_test_now_ms() + ROUNDS_BUDGET_MS;
    for (r = 1; r <= NR_ROUNDS && kvf_test_now_ms() < deadline; r++) {
        unsigned s = r % NR_SLOTS;
        if (b[s]) {
            batch_done(b[s], 20000);
            kvf_batch_free(b[s]);
            b[s] = NULL;
        }
        while (acked + NR_SLOTS < r)
            read_ack(fd, &acked);
        size_t len[NR_ELEMS], off[NR_ELEMS];
        round_elems(r, len, off);
        kvf_xfer_t x[NR_ELEMS];
        for (unsigned i = 0; i < NR_ELEMS; i++) {
            uint8_t *p = src + (size_t)s * SLOT_BYTES + off[i];
            pat_fill(p, len[i], round_seed(salt, r, i));
            x[i] = (kvf_xfer_t){KVF_OP_WRITE, p, base + (size_t)s * SLOT_BYTES + off[i], len[i]};
        }
        char msg[96];
        int ml = snprintf(msg, sizeof(msg), "round %u slot %u salt %u", r, s, salt);
        if (async)
            assert_kvf_ok(kvf_transfer_submit(pre, peer, x, NR_ELEMS, msg, (size_t)ml, &b[s]));
        else
            assert_kvf_ok(kvf_transfer_sync_notify(pre, peer, x, NR_ELEMS, msg, (size_t)ml));
    }
    uint32_t last = r - 1;
    for (unsigned s = 0; s < NR_SLOTS; s++)
        if (b[s]) {
            batch_done(b[s], 20000);
            kvf_batch_free(b[s]);
        }
    while (acked < last)
        read_ack(fd, &acked);
    assert_kvf_ok(kvf_notify_send(pre, peer, "end", 3));
    char line[512], want[32];
    if (kvf_test_read_line(fd, line, sizeof(line), 20000) < 0)
        fail_msg("receiver did not answer \"end\"");
    snprintf(want, sizeof(want), "end %u", last);
    assert_string_equal(line, want);
    if (last < MIN_ROUNDS)
        fail_msg("only %u rounds in %u ms", last, ROUNDS_BUDGET_MS);
    print_message("%u rounds verified (%s)\n", last, async ? "submit" : "sync_notify");
    free(src);
}

static void notify_rounds_in_process(fx_t *fx, bool async)
{
    static receiver_t rv;
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    uint8_t *buf = map_zeroed(NR_SLOTS * SLOT_BYTES);
    assert_kvf_ok(kvf_mem_register(fx->dec, buf, NR_SLOTS * SLOT_BYTES));
    memset(&rv, 0, sizeof(rv));
    rv.e = fx->dec;
    rv.base = buf;
    rv.fd = p[1];
    rv.rc = -1;
    snprintf(rv.sender, sizeof(rv.sender), "%s", kvf_engine_session_id(fx->pre));
    thread_start(receiver_main, &rv);
    send_rounds(fx->pre, kvf_engine_session_id(fx->dec), (uintptr_t)buf, p[0], async, 1);
    threads_join();
    assert_int_equal(rv.rc, 0);
    close(p[0]);
    close(p[1]);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, buf));
    munmap(buf, NR_SLOTS * SLOT_BYTES);
}

static void notify_rounds_child(fx_t *fx, bool async)
{
    char *args[] = {"recv", (char *)fx->url, (char *)kvf_engine_session_id(fx->pre), NULL};
    child_t *c = child_spawn(args);
    child_ready(c);
    send_rounds(fx->pre, c->sid, c->addr, c->out, async, 2);
    const char *via = NULL;
    assert_kvf_ok(kvf_engine_peer_transport(fx->pre, c->sid, &via));
    print_message("rounds to a child process over %s\n", via);
    assert_string_not_equal(via, "loop");
    assert_int_equal(child_end(c, 10000), 0);
}

static void notify_after_data_sync_in_process(void **state)
{
    notify_rounds_in_process(*state, false);
}

static void notify_after_data_async_in_process(void **state)
{
    notify_rounds_in_process(*state, true);
}

static void notify_after_data_sync_child(void **state)
{
    notify_rounds_child(*state, false);
}

static void notify_after_data_async_child(void **state)
{
    notify_rounds_child(*state, true);
}

/* ---- 7. notifications keep submission order ------------------------------------------------- */

/*
 * ORDER_N batches, every tenth one 2 MiB and the others 4 KiB, so that with several async threads
 * the small ones behind a large one finish first; after batch i with i % 100 == 50 a
 * kvf_notify_send "send i". Expected: "seq 0" ... in exactly that order.
 */
#define ORDER_N 500
#define ORDER_BIG (2 * MIB)
#define ORDER_SMALL 4096

static size_t order_len(int i)
{
    return i % 10 == 0 ? ORDER_BIG : ORDER_SMALL;
}

static size_t order_layout(size_t off[ORDER_N + 1])
{
    off[0] = 0;
    for (int i = 0; i < ORDER_N; i++)
        off[i + 1] = off[i] + order_len(i);
    return off[ORDER_N];
}

/* The expected sequence of messages; returns how many. */
static int order_expected(char (*want)[32])
{
    int k = 0;
    for (int i = 0; i < ORDER_N; i++) {
        snprintf(want[k++], 32, "seq %d", i);
        if (i % 100 == 50)
            snprintf(want[k++], 32, "send %d", i);
    }
    return k;
}

/* Submit the ORDER_N batches (and the interleaved kvf_notify_send calls) to @peer, whose buffer
 * is at @remote, and wait for all of them. */
static void order_send(kvf_engine_t *pre, const char *peer, uint64_t remote, uint8_t *src,
                       const size_t off[ORDER_N + 1])
{
    kvf_batch_t **b = calloc(ORDER_N, sizeof(*b));
    for (int i = 0; i < ORDER_N; i++) {
        kvf_xfer_t x = {KVF_OP_WRITE, src + off[i], remote + off[i], order_len(i)};
        char msg[32];
        int ml = snprintf(msg, sizeof(msg), "seq %d", i);
        assert_kvf_ok(kvf_transfer_submit(pre, peer, &x, 1, msg, (size_t)ml, &b[i]));
        if (i % 100 == 50) {
            ml = snprintf(msg, sizeof(msg), "send %d", i);
            assert_kvf_ok(kvf_notify_send(pre, peer, msg, (size_t)ml));
        }
    }
    for (int i = 0; i < ORDER_N; i++) {
        batch_done(b[i], 20000);
        kvf_batch_free(b[i]);
    }
    free(b);
}

static kvf_engine_t *order_sender(fx_t *fx)
{
    kvf_config_t c = quick_config();
    c.async_threads = 4;
    return fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
}

static void notify_order_in_process(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *pre = order_sender(fx);
    static size_t off[ORDER_N + 1];
    static char want[ORDER_N + 16][32];
    size_t total = order_layout(off);
    int nwant = order_expected(want);
    uint8_t *dst = map_zeroed(total), *src = malloc(total);
    assert_non_null(src);
    for (int i = 0; i < ORDER_N; i++)
        pat_fill(src + off[i], order_len(i), 5000 + (uint64_t)i);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, total));
    const char *peer = kvf_engine_session_id(fx->dec);
    order_send(pre, peer, (uintptr_t)dst, src, off);

    kvf_notify_t *n = malloc(64 * sizeof(*n));
    char text[64];
    int got = 0;
    uint64_t deadline = kvf_test_now_ms() + 10000;
    while (got < nwant) {
        uint64_t now = kvf_test_now_ms();
        if (now >= deadline)
            fail_msg("%d of %d notifications within 10 s", got, nwant);
        int k = kvf_notify_wait(fx->dec, n, 64, (int)(deadline - now));
        assert_kvf_ok(k);
        for (int j = 0; j < k; j++, got++) {
            if (got >= nwant)
                fail_msg("more than %d notifications: \"%s\"", nwant,
                         note_text(&n[j], text, sizeof(text)));
            if (strcmp(note_text(&n[j], text, sizeof(text)), want[got]) != 0)
                fail_msg("notification %d is \"%s\", want \"%s\"", got, text, want[got]);
            assert_string_equal(n[j].sender, kvf_engine_session_id(pre));
        }
    }
    assert_int_equal(kvf_notify_poll(fx->dec, n, 64), 0);
    for (int i = 0; i < ORDER_N; i++)
        assert_pattern(dst + off[i], order_len(i), 5000 + (uint64_t)i);
    free(n);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, total);
    free(src);
}

static void notify_order_child(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *pre = order_sender(fx);
    static size_t off[ORDER_N + 1];
    static char want[ORDER_N + 16][32];
    size_t total = order_layout(off);
    int nwant = order_expected(want);
    uint8_t *src = malloc(total);
    assert_non_null(src);
    for (int i = 0; i < ORDER_N; i++)
        pat_fill(src + off[i], order_len(i), 6000 + (uint64_t)i);
    char size[32], count[16];
    snprintf(size, sizeof(size), "%zu", total);
    snprintf(count, sizeof(count), "%d", nwant);
    char *args[] = {"notes", (char *)fx->url, size, count, NULL};
    child_t *c = child_spawn(args);
    child_ready(c);
    order_send(pre, c->sid, c->addr, src, off);
    char line[512], note[KVF_SESSION_ID_MAX + 64];
    for (int i = 0; i < nwant; i++) {
        child_line(c, line, sizeof(line), 20000, "note");
        snprintf(note, sizeof(note), "note %s %.31s", kvf_engine_session_id(pre), want[i]);
        if (strcmp(line, note) != 0)
            fail_msg("notification %d: \"%s\", want \"%s\"", i, line, note);
    }
    assert_int_equal(child_end(c, 10000), 0);
    free(src);
}

/* ---- 8. a killed sender's partial batch never yields a notification ------------------------- */

#define KILL_NELEM 32768
#define KILL_ELEM 4096

static void killed_sender_no_notification(void **state)
{
    fx_t *fx = *state;
    const size_t total = (size_t)KILL_NELEM * KILL_ELEM; /* 128 MiB in 32,768 elements */
    uint8_t *dst = map_zeroed(total);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, total));
    const char *dsid = kvf_engine_session_id(fx->dec);
    char addr[32], nelem[16], elem[16], salt[16], msg[64];
    snprintf(addr, sizeof(addr), "%" PRIx64, (uint64_t)(uintptr_t)dst);
    snprintf(nelem, sizeof(nelem), "%d", KILL_NELEM);
    snprintf(elem, sizeof(elem), "%d", KILL_ELEM);
    kvf_notify_t *n = malloc(sizeof(*n));
    char text[128];

    /* The kill must land while the batch is partly written. Where the copy is fast it may beat
     * the kill; such an attempt proves nothing (its notification is legitimate), so try again. */
    char killed_msg[64] = "", complete_msgs[3][64] = {"", "", ""};
    for (int attempt = 1; attempt <= 3 && !killed_msg[0]; attempt++) {
        memset(dst, 0, total);
        snprintf(salt, sizeof(salt), "%d", 300 + attempt);
        snprintf(msg, sizeof(msg), "killed sender attempt %d", attempt);
        char *args[] = {"send", (char *)fx->url, (char *)dsid, addr, nelem, elem, salt, msg, NULL};
        child_t *c = child_spawn(args);
        child_ready(c);
        /* Kill as soon as the first element's first word has landed. */
        uint64_t first;
        uint8_t w[8];
        pat_fill(w, 8, round_seed((uint32_t)(300 + attempt), 0, 0));
        memcpy(&first, w, 8);
        volatile uint64_t *word = (volatile uint64_t *)dst;
        uint64_t deadline = kvf_test_now_ms() + 15000;
        while (*word != first) {
            if (kvf_test_now_ms() >= deadline)
                fail_msg("no byte of the sender's batch landed within 15 s");
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
        kill(c->pid, SIGKILL);
        kvf_test_reap(c->pid, 5000);
        c->pid = 0;
        child_close_fds(c);
        bool complete = true;
        for (int i = KILL_NELEM - 1; i >= 0 && complete; i--)
            complete = pat_check(dst + (size_t)i * KILL_ELEM, KILL_ELEM,
                                 round_seed((uint32_t)(300 + attempt), 0, (unsigned)i)) ==
                       SIZE_MAX;
        if (complete) {
            print_message("attempt %d: the whole batch landed before the kill; again\n",
                          attempt);
            snprintf(complete_msgs[attempt - 1], 64, "%s", msg);
        } else {
            snprintf(killed_msg, sizeof(killed_msg), "%s", msg);
        }
    }
    if (!killed_msg[0])
        fail_msg("could not kill the sender while its batch was partly written (3 attempts)");

    /* Bounded wait: nothing from the partial batch. */
    uint64_t deadline = kvf_test_now_ms() + 1500;
    for (uint64_t now; (now = kvf_test_now_ms()) < deadline;) {
        int k = kvf_notify_wait(fx->dec, n, 1, (int)(deadline - now));
        assert_kvf_ok(k);
        if (k == 0)
            break;
        note_text(n, text, sizeof(text));
        bool allowed = false;
        for (int i = 0; i < 3; i++)
            allowed |= complete_msgs[i][0] && !strcmp(text, complete_msgs[i]);
        if (!allowed)
            fail_msg("notification \"%s\" from %s after its sender was killed mid-batch", text,
                     n->sender);
    }

    /* A healthy sender afterwards: its notification arrives, after its bytes. */
    memset(dst, 0, 4 * MIB);
    char *args[] = {"send", (char *)fx->url, (char *)dsid, addr, "4", "1048576", "400",
                    "healthy", NULL};
    child_t *c = child_spawn(args);
    child_ready(c);
    char line[256];
    child_line(c, line, sizeof(line), 10000, "submitted");
    assert_string_equal(line, "submitted");
    child_line(c, line, sizeof(line), 20000, "done");
    assert_string_equal(line, "done 1");
    for (;;) {
        assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 10000), 1);
        note_text(n, text, sizeof(text));
        bool stale = false;
        for (int i = 0; i < 3; i++)
            stale |= complete_msgs[i][0] && !strcmp(text, complete_msgs[i]);
        if (!stale)
            break;
    }
    assert_string_equal(text, "healthy");
    assert_string_equal(n->sender, c->sid);
    for (unsigned i = 0; i < 4; i++)
        assert_pattern(dst + i * MIB, MIB, round_seed(400, 0, i));
    assert_int_equal(child_end(c, 10000), 0);
    free(n);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, total);
}

/* ---- 9. notification limits ----------------------------------------------------------------- */

static void notify_max_len(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    const char *me = kvf_engine_session_id(fx->pre);
    unsigned char *msg = malloc(KVF_NOTIFY_MAX + 1);
    for (size_t i = 0; i <= KVF_NOTIFY_MAX; i++)
        msg[i] = (unsigned char)(i * 7 + 3); /* every byte value, NULs included */
    kvf_notify_t *n = malloc(sizeof(*n));

    assert_kvf_ok(kvf_notify_send(fx->pre, peer, msg, KVF_NOTIFY_MAX));
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 5000), 1);
    assert_int_equal(n->len, KVF_NOTIFY_MAX);
    assert_memory_equal(n->msg, msg, KVF_NOTIFY_MAX);
    assert_string_equal(n->sender, me);

    /* With data, synchronously. */
    uint8_t *dst = map_zeroed(65536), *src = malloc(65536);
    pat_fill(src, 65536, 12);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 65536));
    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, 65536};
    assert_kvf_ok(kvf_transfer_sync_notify(fx->pre, peer, &x, 1, msg + 1, KVF_NOTIFY_MAX));
    assert_int_equal(kvf_notify_poll(fx->dec, n, 1), 1);
    assert_int_equal(n->len, KVF_NOTIFY_MAX);
    assert_memory_equal(n->msg, msg + 1, KVF_NOTIFY_MAX);
    assert_string_equal(n->sender, me);
    assert_memory_equal(dst, src, 65536);

    /* Empty notifications exist too. */
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, NULL, 0));
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 5000), 1);
    assert_int_equal(n->len, 0);
    assert_string_equal(n->sender, me);

    /* One byte too many: refused at once by every call that sends one, naming the length. */
    assert_kvf_err(kvf_notify_send(fx->pre, peer, msg, KVF_NOTIFY_MAX + 1), -KVF_ETOOBIG);
    assert_last_error_contains("4097");
    assert_kvf_err(kvf_transfer_sync_notify(fx->pre, peer, &x, 1, msg, KVF_NOTIFY_MAX + 1),
                   -KVF_ETOOBIG);
    assert_last_error_contains("4097");
    kvf_batch_t *b = NULL;
    assert_kvf_err(kvf_transfer_submit(fx->pre, peer, &x, 1, msg, KVF_NOTIFY_MAX + 1, &b),
                   -KVF_ETOOBIG);
    assert_last_error_contains("4097");
    assert_null(b);
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 200), 0);

    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, 65536);
    free(src);
    free(n);
    free(msg);
}

/* One sender may hold half of a target's queue (here 2 of 4): past that it waits about 2 s for
 * the application to read, then is refused. */
static void notify_queue_full_busy(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = quick_config();
    c.notify_queue_max = 4;
    kvf_engine_t *dec = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_DECODE, &c);
    const char *peer = kvf_engine_session_id(dec);
    kvf_notify_t *n = malloc(2 * sizeof(*n));
    char text[64];

    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "q1", 2));
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "q2", 2));
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_notify_send(fx->pre, peer, "q3", 2), -KVF_EBUSY);
    uint64_t took = kvf_test_now_ms() - t0;
    /* The sender waited about 2 s for room. */
    if (took < 1500 || took > 6000)
        fail_msg("the third notification failed after %llu ms, want about 2000",
                 (unsigned long long)took);
    char want[512];
    snprintf(want, sizeof(want),
             "%s already has 2 notifications queued at %s, its share (half of "
             "config.notify_queue_max 4), and they were not read for 2000 ms",
             kvf_engine_session_id(fx->pre), peer);
    assert_last_error_contains(want);

    assert_int_equal(kvf_notify_poll(dec, n, 2), 2);
    assert_string_equal(note_text(&n[0], text, sizeof(text)), "q1");
    assert_string_equal(note_text(&n[1], text, sizeof(text)), "q2");
    /* The refused one was not delivered late; the queue works again. */
    assert_int_equal(kvf_notify_wait(dec, n, 2, 200), 0);
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "q4", 2));
    assert_int_equal(kvf_notify_wait(dec, n, 2, 5000), 1);
    assert_string_equal(note_text(&n[0], text, sizeof(text)), "q4");

    /* A batch whose notification finds the queue full fails with -KVF_EBUSY. */
    uint8_t *dst = map_zeroed(4096), src[4096];
    pat_fill(src, sizeof(src), 13);
    assert_kvf_ok(kvf_mem_register(dec, dst, 4096));
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "q5", 2));
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "q6", 2));
    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, sizeof(src)};
    kvf_batch_t *b;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, &x, 1, "q7", 2, &b));
    assert_kvf_err(kvf_batch_wait(b, 10000), -KVF_EBUSY);
    /* The failure says the data is there, and it is. */
    snprintf(want, sizeof(want),
             "every byte of the batch to %s landed; only its notification was refused", peer);
    assert_last_error_contains(want);
    assert_memory_equal(dst, src, sizeof(src));
    kvf_batch_free(b);
    assert_int_equal(kvf_notify_poll(dec, n, 2), 2);
    assert_string_equal(note_text(&n[0], text, sizeof(text)), "q5");
    assert_string_equal(note_text(&n[1], text, sizeof(text)), "q6");
    assert_int_equal(kvf_notify_wait(dec, n, 2, 200), 0);
    assert_kvf_ok(kvf_mem_unregister(dec, dst));
    munmap(dst, 4096);
    free(n);
}

/* A queue of one is full with one unread notification: the next sender waits about 2 s for room,
 * then is refused with the message docs/operations.md ("Troubleshooting") quotes, naming the
 * target and the limit. */
static void notify_queue_full_names_the_queue(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = quick_config();
    c.notify_queue_max = 1;
    kvf_engine_t *dec = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_DECODE, &c);
    const char *peer = kvf_engine_session_id(dec);
    kvf_notify_t *n = malloc(sizeof(*n));
    char text[64];

    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "q1", 2));
    assert_kvf_err(kvf_notify_send(fx->pre, peer, "q2", 2), -KVF_EBUSY);
    char want[256];
    snprintf(want, sizeof(want),
             "the notification queue of %s is full (1 queued, config.notify_queue_max) and was "
             "not read for 2000 ms",
             peer);
    assert_last_error_contains(want);
    /* Read, the queue takes the next one. */
    assert_int_equal(kvf_notify_poll(dec, n, 1), 1);
    assert_string_equal(note_text(n, text, sizeof(text)), "q1");
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "q3", 2));
    assert_int_equal(kvf_notify_wait(dec, n, 1, 5000), 1);
    assert_string_equal(note_text(n, text, sizeof(text)), "q3");
    free(n);
}

/* A notification waiting (up to 2 s) for room in one target's queue, on another thread. */
typedef struct {
    kvf_engine_t *e;
    const char *peer;
    atomic_int tid;
    int rc;
    uint64_t done_ms;
} waiting_note_t;

static void *send_waiting_note(void *arg)
{
    waiting_note_t *w = arg;
    atomic_store(&w->tid, (int)gettid());
    w->rc = kvf_notify_send(w->e, w->peer, "q2", 2);
    w->done_ms = kvf_test_now_ms();
    return NULL;
}

/* Whether thread @tid of this process is asleep ('S' in /proc/self/task/TID/stat). */
static bool thread_sleeps(int tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *end = strrchr(buf, ')'); /* the name may hold spaces and parentheses */
    return end && end[1] == ' ' && end[2] == 'S';
}

/* Found in review: on the loop path a notification waiting for room held the process-wide
 * registry of loop engines shared for its whole 2 s wait, so starting or destroying any other
 * engine of the process (which takes it exclusive) waited too. Now an engine starts and is
 * destroyed while the notification waits. */
static void waiting_notification_holds_up_no_other_engine(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = quick_config();
    c.notify_queue_max = 2; /* one sender may hold one */
    kvf_engine_t *dec = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_DECODE, &c);
    waiting_note_t w = {.e = fx->pre, .peer = kvf_engine_session_id(dec)};
    assert_kvf_ok(kvf_notify_send(fx->pre, w.peer, "q1", 2));
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, send_waiting_note, &w), 0);
    /* Bounded: the sender is asleep once it waits for room (or for the target's answer). */
    uint64_t t0 = kvf_test_now_ms();
    while (!(atomic_load(&w.tid) && thread_sleeps(atomic_load(&w.tid))) &&
           kvf_test_now_ms() - t0 < 5000)
        sched_yield();
    kvf_config_t qc = quick_config();
    kvf_engine_t *other = engine_sid(fx->url, "127.0.0.1:0", KVF_ROLE_PREFILL, &qc);
    kvf_engine_destroy(other);
    uint64_t started = kvf_test_now_ms();
    pthread_join(t, NULL);
    assert_int_equal(w.rc, -KVF_EBUSY);
    if (started >= w.done_ms)
        fail_msg("another engine's start and destroy waited for the notification: done %llu ms "
                 "after it, the notification %llu ms",
                 (unsigned long long)(started - t0), (unsigned long long)(w.done_ms - t0));
}

/* Reproduced in issue 12: unsolicited notifications from one peer filled a target's queue, and
 * a legitimate batch whose data had landed was then refused. One sender holds at most half of
 * the queue: another is still served, promptly. */
static void notify_flood_leaves_room_for_others(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = quick_config();
    c.notify_queue_max = 8;
    kvf_engine_t *dec = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_DECODE, &c);
    kvf_engine_t *other = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, NULL);
    const char *peer = kvf_engine_session_id(dec);
    kvf_notify_t *n = malloc(8 * sizeof(*n));
    char text[64];

    for (int i = 0; i < 4; i++)
        assert_kvf_ok(kvf_notify_send(fx->pre, peer, "flood", 5));
    /* The flooder is at its share; the other sender's batch is served at once. */
    uint8_t *dst = map_zeroed(4096), src[4096];
    pat_fill(src, sizeof(src), 21);
    assert_kvf_ok(kvf_mem_register(dec, dst, 4096));
    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, sizeof(src)};
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_transfer_sync_notify(other, peer, &x, 1, "legit", 5));
    if (kvf_test_now_ms() - t0 > 1000)
        fail_msg("the other sender waited %llu ms", (unsigned long long)(kvf_test_now_ms() - t0));
    /* The flooder gets no more. */
    assert_kvf_err(kvf_notify_send(fx->pre, peer, "flood", 5), -KVF_EBUSY);
    assert_last_error_contains("share");
    assert_int_equal(kvf_notify_poll(dec, n, 8), 5);
    int legit = 0;
    for (int i = 0; i < 5; i++)
        legit += !strcmp(note_text(&n[i], text, sizeof(text)), "legit") &&
                 !strcmp(n[i].sender, kvf_engine_session_id(other));
    assert_int_equal(legit, 1);
    assert_memory_equal(dst, src, sizeof(src));
    assert_kvf_ok(kvf_mem_unregister(dec, dst));
    munmap(dst, 4096);
    free(n);
}

/* The same across processes (the notification travels as a frame the target refuses). */
static void notify_queue_full_busy_child(void **state)
{
    fx_t *fx = *state;
    char *args[] = {"peer", (char *)fx->url, "5000", "4", NULL};
    child_t *c = child_spawn(args);
    child_ready(c);
    assert_kvf_ok(kvf_notify_send(fx->pre, c->sid, "q1", 2));
    assert_kvf_ok(kvf_notify_send(fx->pre, c->sid, "q2", 2));
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_notify_send(fx->pre, c->sid, "q3", 2), -KVF_EBUSY);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took < 1500 || took > 6000)
        fail_msg("the third notification failed after %llu ms, want about 2000",
                 (unsigned long long)took);
    assert_last_error_contains(c->sid);
    assert_int_equal(child_end(c, 10000), 0);
}

static void notify_wait_timeout(void **state)
{
    fx_t *fx = *state;
    kvf_notify_t *n = malloc(sizeof(*n));
    uint64_t t0 = kvf_test_now_ms();
    assert_int_equal(kvf_notify_poll(fx->dec, n, 1), 0);
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 0), 0);
    assert_true(kvf_test_now_ms() - t0 < 200);
    t0 = kvf_test_now_ms();
    assert_int_equal(kvf_notify_wait(fx->dec, n, 1, 300), 0);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took < 300 || took > 2000)
        fail_msg("kvf_notify_wait(300 ms) returned after %llu ms", (unsigned long long)took);
    free(n);
}

/* ---- 10. peers -------------------------------------------------------------------------------- */

/* Events taken from the engine but not yet matched, so that a later expectation finds them. */
static kvf_peer_event_t ev_queue[256];
static int ev_count;

static void ev_take(kvf_engine_t *e, int timeout_ms)
{
    kvf_peer_event_t ev[32];
    int n = kvf_peer_events(e, ev, 32, timeout_ms);
    assert_kvf_ok(n);
    for (int i = 0; i < n; i++) {
        if (!strcmp(ev[i].sid, kvf_engine_session_id(e)))
            fail_msg("kvf_peer_events reported the engine itself (%s)", ev[i].sid);
        if (ev[i].type != KVF_PEER_JOINED && ev[i].type != KVF_PEER_LEFT)
            fail_msg("event of type %d for %s", (int)ev[i].type, ev[i].sid);
        if (ev_count < 256)
            ev_queue[ev_count++] = ev[i];
    }
}

/* Take (and remove) the first queued @type event for @sid; false if none. */
static bool ev_find(kvf_peer_event_type_t type, const char *sid)
{
    for (int i = 0; i < ev_count; i++)
        if (ev_queue[i].type == type && !strcmp(ev_queue[i].sid, sid)) {
            memmove(&ev_queue[i], &ev_queue[i + 1], (size_t)(ev_count - i - 1) * sizeof(ev_queue[0]));
            ev_count--;
            return true;
        }
    return false;
}

static uint64_t ev_expect(kvf_engine_t *e, kvf_peer_event_type_t type, const char *sid,
                          unsigned ms)
{
    uint64_t t0 = kvf_test_now_ms(), deadline = t0 + ms;
    while (!ev_find(type, sid)) {
        uint64_t now = kvf_test_now_ms();
        if (now >= deadline)
            fail_msg("no %s event for %s within %u ms", type == KVF_PEER_JOINED ? "JOINED" : "LEFT",
                     sid, ms);
        ev_take(e, (int)(deadline - now));
    }
    return kvf_test_now_ms() - t0;
}

static void peer_events_join_leave(void **state)
{
    fx_t *fx = *state;
    ev_count = 0;
    /* The first call reports the peers already there, at once: the Decode, not the caller. */
    uint64_t t0 = kvf_test_now_ms();
    ev_take(fx->pre, 5000);
    assert_true(kvf_test_now_ms() - t0 < 2000);
    if (!ev_find(KVF_PEER_JOINED, kvf_engine_session_id(fx->dec)))
        fail_msg("the first kvf_peer_events call did not report %s as JOINED (%d events)",
                 kvf_engine_session_id(fx->dec), ev_count);

    kvf_config_t c = quick_config();
    kvf_engine_t *e = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_DECODE, &c);
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(e));
    ev_expect(fx->pre, KVF_PEER_JOINED, sid, 5000);
    fx_forget(fx, e);
    kvf_engine_destroy(e);
    ev_expect(fx->pre, KVF_PEER_LEFT, sid, 5000);

    /* Nothing else is pending; a wait with no change times out with 0. */
    t0 = kvf_test_now_ms();
    kvf_peer_event_t ev[4];
    int k = kvf_peer_events(fx->pre, ev, 4, 300);
    assert_int_equal(k, 0);
    assert_true(kvf_test_now_ms() - t0 >= 300);
}

static void peer_events_killed_peer_leaves(void **state)
{
    fx_t *fx = *state;
    ev_count = 0;
    ev_take(fx->pre, 5000);
    char *args[] = {"peer", (char *)fx->url, "1000", NULL};
    child_t *c = child_spawn(args);
    child_ready(c);
    ev_expect(fx->pre, KVF_PEER_JOINED, c->sid, 5000);
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s", c->sid);
    child_kill(c);
    /* Its lease (1 s) runs out; the store deletes its record; watchers see it leave. */
    uint64_t took = ev_expect(fx->pre, KVF_PEER_LEFT, sid, 10000);
    print_message("killed peer reported LEFT after %llu ms\n", (unsigned long long)took);
}

typedef struct {
    const char *url;
    char sid[64];
    kvf_engine_t *e;
    int rc;
} starter_t;

static void *start_engine_main(void *p)
{
    starter_t *s = p;
    kvf_config_t c = quick_config();
    s->rc = kvf_engine_create(s->url, s->sid, KVF_ROLE_DECODE, 0, &c, &s->e);
    return NULL;
}

static void peer_wait_appears(void **state)
{
    fx_t *fx = *state;
    /* Already there: at once. */
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_peer_wait(fx->pre, kvf_engine_session_id(fx->dec), 5000));
    assert_true(kvf_test_now_ms() - t0 < 1000);

    /* Started concurrently. */
    static starter_t s;
    memset(&s, 0, sizeof(s));
    s.url = fx->url;
    absent_sid(s.sid, sizeof(s.sid));
    thread_start(start_engine_main, &s);
    t0 = kvf_test_now_ms();
    int rc = kvf_peer_wait(fx->pre, s.sid, 10000);
    uint64_t took = kvf_test_now_ms() - t0;
    threads_join();
    assert_kvf_ok(s.rc);
    fx->extra[MAX_EXTRA - 1] = s.e;
    assert_kvf_ok(rc);
    assert_true(took < 5000);
}

static void peer_wait_timeout_and_bad_id(void **state)
{
    fx_t *fx = *state;
    char sid[64];
    absent_sid(sid, sizeof(sid));
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_peer_wait(fx->pre, sid, 500), -KVF_ETIMEDOUT);
    uint64_t took = kvf_test_now_ms() - t0;
    if (took < 500 || took > 3000)
        fail_msg("kvf_peer_wait(500 ms) returned after %llu ms", (unsigned long long)took);
    assert_last_error_contains(sid);

    t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_peer_wait(fx->pre, "1.2.3:9", 5000), -KVF_EINVAL);
    assert_true(kvf_test_now_ms() - t0 < 1000);
    assert_last_error_contains("1.2.3:9");
}

/* ---- 11. shutting down ---------------------------------------------------------------------- */

typedef struct {
    kvf_batch_t *b;
    atomic_int started, finished;
    int rc;
} waiter_t;

static void *batch_wait_main(void *p)
{
    waiter_t *w = p;
    atomic_store(&w->started, 1);
    w->rc = kvf_batch_wait(w->b, -1);
    atomic_store(&w->finished, 1);
    return NULL;
}

static bool closed_or_cancelled(int rc)
{
    return rc == -KVF_ECLOSED || rc == -KVF_ECANCELED;
}

static void destroy_completes_pending_batches(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    const char *peer = kvf_engine_session_id(fx->dec);
    char absent[64];
    absent_sid(absent, sizeof(absent));
    uint8_t *dst = map_zeroed(65536), *src = malloc(65536);
    pat_fill(src, 65536, 14);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 65536));

    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, 65536};
    kvf_batch_t *done, *pending[3];
    assert_kvf_ok(kvf_transfer_submit(pre, peer, &x, 1, NULL, 0, &done));
    batch_done(done, 10000);
    submit_pending(pre, absent, src, pending, 3);

    static waiter_t w;
    memset(&w, 0, sizeof(w));
    w.b = pending[0];
    thread_start(batch_wait_main, &w);
    assert_true(flag_wait(&w.started, 1, 5000));
    uint64_t t0 = kvf_test_now_ms();
    fx_forget(fx, pre);
    kvf_engine_destroy(pre);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(flag_wait(&w.finished, 1, 5000));
    threads_join();
    if (!closed_or_cancelled(w.rc))
        fail_msg("kvf_batch_wait during destroy: %d (%s)", w.rc, kvf_err_name(w.rc));
    /* Batches waiting for a peer give up within 200 ms of destroy. */
    if (took > 2000)
        fail_msg("kvf_engine_destroy with pending batches took %llu ms",
                 (unsigned long long)took);

    /* Every batch is complete now: read the outcome, then free them. */
    for (int i = 1; i < 3; i++) {
        int st = 1, rc = kvf_batch_status(pending[i], &st, 1);
        if (!closed_or_cancelled(rc) || !closed_or_cancelled(st))
            fail_msg("pending batch %d after destroy: %d (%s), element %d (%s)", i, rc,
                     kvf_err_name(rc), st, kvf_err_name(st));
    }
    assert_int_equal(kvf_batch_status(done, NULL, 0), KVF_BATCH_DONE);
    for (int i = 0; i < 3; i++)
        kvf_batch_free(pending[i]);
    kvf_batch_free(done);
    assert_memory_equal(dst, src, 65536);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, 65536);
    free(src);
}

static void free_pending_batch_after_destroy(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    char absent[64];
    absent_sid(absent, sizeof(absent));
    uint8_t src[64] = {0};
    kvf_batch_t *b[2];
    submit_pending(pre, absent, src, b, 2);
    fx_forget(fx, pre);
    kvf_engine_destroy(pre);
    /* Freed without a look at them first: nothing leaks, nothing is touched twice (ASan). */
    kvf_batch_free(b[0]);
    kvf_batch_free(b[1]);
    kvf_batch_free(NULL);
}

typedef struct {
    kvf_engine_t *e;
    atomic_int started, finished;
    int notify_rc, peer_rc;
} closer_t;

typedef struct {
    kvf_engine_t *e;
    char absent[64];
    atomic_int started, finished;
    int rc;
} peer_waiter_t;

static void *peer_wait_main(void *p)
{
    peer_waiter_t *w = p;
    atomic_store(&w->started, 1);
    w->rc = kvf_peer_wait(w->e, w->absent, 20000);
    atomic_store(&w->finished, 1);
    return NULL;
}

/* Blocked in kvf_peer_wait (documented: -KVF_ECLOSED when the engine is being destroyed) and in
 * a blocking kvf_transfer_submit (-KVF_ECLOSED while it is being destroyed): shutdown releases
 * both promptly. */
static void shutdown_releases_peer_wait_and_submit(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = pending_config();
    c.max_batches = 1;
    c.submit_blocks = 1;
    c.op_timeout_ms = 20000;
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &c);
    static peer_waiter_t w;
    memset(&w, 0, sizeof(w));
    w.e = pre;
    absent_sid(w.absent, sizeof(w.absent));
    uint8_t src[64] = {0};
    kvf_batch_t *b;
    submit_pending(pre, w.absent, src, &b, 1);
    static submitter_t s;
    memset(&s, 0, sizeof(s));
    s.e = pre;
    s.peer = w.absent;
    s.x = (kvf_xfer_t){KVF_OP_WRITE, src, 0x100000, sizeof(src)};
    thread_start(peer_wait_main, &w);
    thread_start(submit_main, &s);
    assert_true(flag_wait(&w.started, 1, 5000));
    assert_true(flag_wait(&s.started, 1, 5000));
    assert_false(flag_wait(&s.finished, 1, 300));
    assert_int_equal(atomic_load(&w.finished), 0);
    uint64_t t0 = kvf_test_now_ms();
    kvf_engine_shutdown(pre);
    bool peer_back = flag_wait(&w.finished, 1, 3000);
    bool submit_back = flag_wait(&s.finished, 1, 3000);
    uint64_t took = kvf_test_now_ms() - t0;
    if (!peer_back || !submit_back)
        fail_msg("after kvf_engine_shutdown: kvf_peer_wait %s, blocked kvf_transfer_submit %s "
                 "(%llu ms)", peer_back ? "returned" : "still blocked",
                 submit_back ? "returned" : "still blocked", (unsigned long long)took);
    threads_join();
    assert_kvf_err(w.rc, -KVF_ECLOSED);
    /* Known failure against 0aab3df (reported): the submit wakes when shutdown completes the
     * pending batch, finds room, and queues a batch on the closing engine, returning 0; that
     * batch then fails with -KVF_ECLOSED. The header promises -KVF_ECLOSED from the submit. */
    if (s.rc != -KVF_ECLOSED) {
        int brc = s.b ? kvf_batch_wait(s.b, 5000) : 0;
        kvf_batch_free(s.b);
        kvf_batch_free(b);
        fail_msg("a kvf_transfer_submit blocked on max_batches returned %d (%s) after "
                 "kvf_engine_shutdown, want KVF_ECLOSED; the batch it queued: %d (%s)", s.rc,
                 kvf_err_name(s.rc), brc, kvf_err_name(brc));
    }
    assert_null(s.b);
    assert_true(closed_or_cancelled(kvf_batch_wait(b, 5000)));
    kvf_batch_free(b);
}

static void *notify_wait_main(void *p)
{
    closer_t *w = p;
    kvf_notify_t *n = malloc(sizeof(*n));
    atomic_store(&w->started, 1);
    w->notify_rc = kvf_notify_wait(w->e, n, 1, -1);
    free(n);
    atomic_store(&w->finished, 1);
    return NULL;
}

static void notify_wait_closed_on_shutdown(void **state)
{
    fx_t *fx = *state;
    static closer_t w;
    memset(&w, 0, sizeof(w));
    w.e = fx->dec;
    thread_start(notify_wait_main, &w);
    assert_true(flag_wait(&w.started, 1, 5000));
    /* Waiting for ever with nothing to come: it must still be waiting. */
    assert_false(flag_wait(&w.finished, 1, 300));
    uint64_t t0 = kvf_test_now_ms();
    kvf_engine_shutdown(fx->dec);
    assert_true(flag_wait(&w.finished, 1, 2000));
    assert_true(kvf_test_now_ms() - t0 < 1000);
    threads_join();
    assert_kvf_err(w.notify_rc, -KVF_ECLOSED);
    kvf_notify_t *n = malloc(sizeof(*n));
    assert_kvf_err(kvf_notify_wait(fx->dec, n, 1, 1000), -KVF_ECLOSED);
    assert_kvf_err(kvf_peer_wait(fx->dec, kvf_engine_session_id(fx->pre), 1000), -KVF_ECLOSED);
    free(n);
}

/* ---- 12. posted batches: submit sends a small write batch itself (tcp) ---------------------- */

/* The cases of this section are about tcp's posted batches (kvf_transfer_submit() sending a
 * small write batch from the caller's thread, its answer completing it on the I/O thread that
 * reads it); other paths run every batch on the async threads. */
static bool posts(void)
{
    const char *t = getenv("KVFERRY_TRANSPORT");
    return t && !strcmp(t, "tcp");
}

/* SIGSTOP @c and return once it is stopped (kill() only sends the signal: the child may still
 * answer a request in between). */
static void child_stop(child_t *c)
{
    assert_int_equal(kill(c->pid, SIGSTOP), 0);
    char path[64], stat[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)c->pid);
    for (uint64_t t0 = kvf_test_now_ms(); kvf_test_now_ms() - t0 < 5000; sched_yield()) {
        FILE *f = fopen(path, "r");
        assert_non_null(f);
        size_t n = fread(stat, 1, sizeof(stat) - 1, f);
        fclose(f);
        stat[n] = '\0';
        const char *paren = strrchr(stat, ')'); /* "pid (comm) S ...": comm may hold spaces */
        if (paren && paren[1] == ' ' && paren[2] == 'T')
            return;
    }
    fail_msg("child %d not stopped 5 s after SIGSTOP", (int)c->pid);
}

/* A Decode child with @size bytes registered and a new Prefill (@cfg) whose path to it is open
 * (one sync write of @src's first bytes): the set-up of the cases that stop the child. */
static child_t *child_with_open_path(fx_t *fx, size_t size, const kvf_config_t *cfg,
                                     const uint8_t *src, kvf_engine_t **pre)
{
    char sz[32];
    snprintf(sz, sizeof(sz), "%zu", size);
    char *args[] = {"notes", (char *)fx->url, sz, "0", NULL};
    child_t *c = child_spawn(args);
    child_ready(c);
    *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, cfg);
    kvf_xfer_t x = {KVF_OP_WRITE, (void *)src, c->addr, 4096};
    assert_kvf_ok(kvf_transfer_sync(*pre, c->sid, &x, 1));
    return c;
}

/* Posted batches of one element and of gathered small writes land every byte, report every
 * element done, and mix with sync calls on the same connections. */
static void posted_batches_land_every_byte(void **state)
{
    fx_t *fx = *state;
    if (!posts())
        skip();
    const char *peer = kvf_engine_session_id(fx->dec);
    enum { N = 48, SMALL = 8 };
    const size_t len = 64 * 1024, small = 4096;
    const size_t size = N * len;
    uint8_t *dst = map_zeroed(size), *src = malloc(size);
    assert_non_null(src);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, size));
    pat_fill(src, size, 1201);
    /* A sync write opens the path and fills the sender's cache of the peer's regions. */
    assert_kvf_ok(kvf_write(fx->pre, peer, src, (uintptr_t)dst, len));
    uint64_t posted0 = kvf__batch_posted(fx->pre);

    kvf_batch_t *b[N];
    kvf_xfer_t xs[N][SMALL];
    for (int i = 1; i < N; i++) {
        size_t off = (size_t)i * len;
        size_t n = i % 2 ? 1 : SMALL; /* odd: one 64 KiB element; even: a WRITEV of 4 KiB ones */
        for (size_t k = 0; k < n; k++) {
            size_t o = off + k * (n == 1 ? 0 : small);
            xs[i][k] = (kvf_xfer_t){KVF_OP_WRITE, src + o, (uintptr_t)(dst + o), n == 1 ? len : small};
        }
        assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, xs[i], n, NULL, 0, &b[i]));
        if (i % 8 == 0) /* and a sync call among them */
            assert_kvf_ok(kvf_write(fx->pre, peer, src, (uintptr_t)dst, len));
    }
    for (int i = 1; i < N; i++) {
        int st[SMALL];
        batch_done(b[i], 10000);
        size_t n = i % 2 ? 1 : SMALL;
        assert_int_equal(kvf_batch_status(b[i], st, n), KVF_BATCH_DONE);
        for (size_t k = 0; k < n; k++)
            assert_int_equal(st[k], 0);
        kvf_batch_free(b[i]);
        size_t got = i % 2 ? len : SMALL * small;
        assert_memory_equal(dst + (size_t)i * len, src + (size_t)i * len, got);
        assert_true(all_zero(dst + (size_t)i * len + got, len - got));
    }
    /* Each was posted unless its connection was busy sending at that moment. */
    uint64_t posted = kvf__batch_posted(fx->pre) - posted0;
    print_message("%llu of %d batches posted\n", (unsigned long long)posted, N - 1);
    /* Under load every one can have met a queued batch (once the first found its connection
     * busy, the rest queue behind it until an async thread runs): then batches submitted alone,
     * onto idle connections, are. */
    for (int tries = 0; posted == 0 && tries < 20; tries++) {
        assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, xs[1], 1, NULL, 0, &b[0]));
        batch_done(b[0], 10000);
        kvf_batch_free(b[0]);
        posted = kvf__batch_posted(fx->pre) - posted0;
    }
    assert_true(posted >= 1);
    /* Reads and larger batches are never posted. */
    posted0 = kvf__batch_posted(fx->pre);
    kvf_xfer_t big = {KVF_OP_WRITE, src, (uintptr_t)dst, 4 * len};
    kvf_xfer_t rd = {KVF_OP_READ, src, (uintptr_t)dst, len};
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, &big, 1, NULL, 0, &b[0]));
    batch_done(b[0], 10000);
    kvf_batch_free(b[0]);
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, &rd, 1, NULL, 0, &b[0]));
    batch_done(b[0], 10000);
    kvf_batch_free(b[0]);
    assert_int_equal(kvf__batch_posted(fx->pre), posted0);
    /* A batch the cache does not hold is queued (and fails there): its submit succeeds and
     * leaves the caller's last error alone. */
    assert_kvf_err(kvf_batch_wait(NULL, 0), -KVF_EINVAL);
    char before[256];
    snprintf(before, sizeof(before), "%s", kvf_last_error());
    kvf_xfer_t miss = {KVF_OP_WRITE, src, (uintptr_t)dst + size, len};
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, &miss, 1, NULL, 0, &b[0]));
    assert_string_equal(kvf_last_error(), before);
    assert_int_equal(kvf_batch_wait(b[0], 10000), -KVF_ENOTREG);
    kvf_batch_free(b[0]);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, size);
    free(src);
}

/* A posted batch whose target stops answering (SIGSTOP) fails with -KVF_ETIMEDOUT at its
 * deadline, not later than one timer tick after it, with the element's status and a message
 * naming the peer; and destroy with a posted batch in flight returns once it timed out. */
static void posted_batch_times_out_on_stopped_target(void **state)
{
    fx_t *fx = *state;
    if (!posts())
        skip();
    enum { OP_MS = 1500, TICK_MS = 1000 };
    const size_t len = 64 * 1024;
    kvf_config_t cfg = quick_config();
    cfg.op_timeout_ms = OP_MS;
    uint8_t *src = malloc(len);
    assert_non_null(src);
    pat_fill(src, len, 1202);
    kvf_engine_t *pre;
    child_t *c = child_with_open_path(fx, 4 * len, &cfg, src, &pre);
    kvf_xfer_t x = {KVF_OP_WRITE, src, c->addr, len};

    child_stop(c);
    uint64_t posted0 = kvf__batch_posted(pre);
    kvf_batch_t *b;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_transfer_submit(pre, c->sid, &x, 1, NULL, 0, &b));
    assert_int_equal(kvf__batch_posted(pre), posted0 + 1);
    int rc = kvf_batch_wait(b, OP_MS + 3 * TICK_MS);
    uint64_t took = kvf_test_now_ms() - t0;
    print_message("posted batch to a stopped target: %d after %llu ms: %s\n", rc,
                  (unsigned long long)took, rc < 0 ? kvf_last_error() : "");
    if (rc == KVF_BATCH_PENDING)
        fail_msg("posted batch still pending %u ms after its %u ms deadline", 3 * TICK_MS, OP_MS);
    assert_int_equal(rc, -KVF_ETIMEDOUT);
    assert_last_error_contains(c->sid);
    assert_last_error_contains("timed out");
    assert_true(took >= OP_MS - 10 && took <= OP_MS + 2 * TICK_MS);
    int st = 0;
    assert_int_equal(kvf_batch_status(b, &st, 1), -KVF_ETIMEDOUT);
    assert_int_equal(st, -KVF_ETIMEDOUT);
    kvf_batch_free(b);

    /* Destroy waits for a posted batch (bounded by its deadline), which then reads timed out;
     * the path is reopened first (the timeout cut the connection), so this one is posted too. */
    assert_int_equal(kill(c->pid, SIGCONT), 0);
    assert_kvf_ok(kvf_transfer_sync(pre, c->sid, &x, 1));
    child_stop(c);
    posted0 = kvf__batch_posted(pre);
    assert_kvf_ok(kvf_transfer_submit(pre, c->sid, &x, 1, NULL, 0, &b));
    assert_int_equal(kvf__batch_posted(pre), posted0 + 1);
    t0 = kvf_test_now_ms();
    fx_forget(fx, pre);
    kvf_engine_destroy(pre);
    took = kvf_test_now_ms() - t0;
    assert_true(took <= OP_MS + 2 * TICK_MS);
    assert_int_equal(kvf_batch_wait(b, 0), -KVF_ETIMEDOUT);
    kvf_batch_free(b);
    kill(c->pid, SIGCONT);
    child_kill(c);
    free(src);
}

/* A posted batch whose connection the target closes unanswered (as an idle close crossing it
 * would; the target's test hook) runs once more on a new connection, as a sync call does, and
 * lands. */
static void posted_batch_runs_again_after_unanswered_close(void **state)
{
    fx_t *fx = *state;
    if (!posts())
        skip();
    const size_t len = 16 * 1024;
    setenv("KVFERRY_TCP_TEST_CLOSE_REQUESTS", "1", 1);
    kvf_config_t cfg = quick_config();
    kvf_engine_t *dec = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_DECODE, &cfg);
    unsetenv("KVFERRY_TCP_TEST_CLOSE_REQUESTS");
    const char *peer = kvf_engine_session_id(dec);
    uint8_t *dst = map_zeroed(len), *src = malloc(len);
    assert_non_null(src);
    pat_fill(src, len, 1203);
    assert_kvf_ok(kvf_mem_register(dec, dst, len));
    /* Open the path and its connections without a data request (which would meet the hook):
     * a notification does both. */
    assert_kvf_ok(kvf_notify_send(fx->pre, peer, "open", 4));
    kvf_xfer_t x = {KVF_OP_WRITE, src, (uintptr_t)dst, len};
    uint64_t posted0 = kvf__batch_posted(fx->pre);
    kvf_batch_t *b = NULL;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, peer, &x, 1, NULL, 0, &b));
    assert_int_equal(kvf__batch_posted(fx->pre), posted0 + 1);
    batch_done(b, 10000);
    kvf_batch_free(b);
    assert_memory_equal(dst, src, len);
    assert_kvf_ok(kvf_mem_unregister(dec, dst));
    munmap(dst, len);
    free(src);
}

/* A posted batch that a break fails (here: another posted batch's expiry cuts the connection
 * they share) runs again only within its own deadline, counted from its submit: the call ends
 * by op_timeout_ms plus the timer's tick, not after a second op_timeout_ms. */
static void posted_rerun_keeps_its_deadline(void **state)
{
    fx_t *fx = *state;
    if (!posts())
        skip();
    enum { OP_MS = 4000, TICK_MS = 1000, GAP_MS = 1100 };
    const size_t len = 16 * 1024;
    kvf_config_t cfg = quick_config();
    cfg.op_timeout_ms = OP_MS;
    cfg.tcp_conns_per_peer = 1;
    uint8_t *src = malloc(2 * len);
    assert_non_null(src);
    pat_fill(src, 2 * len, 1301);
    kvf_engine_t *pre;
    child_t *c = child_with_open_path(fx, 4 * len, &cfg, src, &pre);
    kvf_xfer_t xa = {KVF_OP_WRITE, src, c->addr, len};
    kvf_xfer_t xb = {KVF_OP_WRITE, src + len, c->addr + len, len};
    child_stop(c);
    uint64_t posted0 = kvf__batch_posted(pre);
    kvf_batch_t *a, *b;
    assert_kvf_ok(kvf_transfer_submit(pre, c->sid, &xa, 1, NULL, 0, &a));
    /* B's deadline comes GAP_MS after A's (more than a tick): A's expiry breaks B first. */
    nap_ms(GAP_MS);
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_ok(kvf_transfer_submit(pre, c->sid, &xb, 1, NULL, 0, &b));
    assert_int_equal(kvf__batch_posted(pre), posted0 + 2);
    assert_int_equal(kvf_batch_wait(a, 3 * OP_MS), -KVF_ETIMEDOUT);
    int rb = kvf_batch_wait(b, 3 * OP_MS);
    uint64_t took = kvf_test_now_ms() - t0;
    print_message("B: %d after %llu ms (op_timeout_ms %u): %s\n", rb, (unsigned long long)took,
                  OP_MS, rb < 0 ? kvf_last_error() : "");
    /* As a sync call would end: timed out, or the peer unanswering on a new connection. */
    assert_true(rb == -KVF_ETIMEDOUT || rb == -KVF_EPEERGONE);
    assert_true(took <= OP_MS + 2 * TICK_MS);
    kvf_batch_free(a);
    kvf_batch_free(b);
    kill(c->pid, SIGCONT);
    child_kill(c);
    free(src);
}

/* With one async thread batches run one at a time in submission order, so nothing is posted: a
 * small write submitted after a large one (too large to post) to the same place lands after it,
 * every time. */
static void one_async_thread_keeps_order(void **state)
{
    fx_t *fx = *state;
    kvf_config_t cfg = quick_config();
    cfg.async_threads = 1;
    kvf_engine_t *pre = fx_engine(fx, "127.0.0.1:0", KVF_ROLE_PREFILL, &cfg);
    const char *peer = kvf_engine_session_id(fx->dec);
    const size_t big = 256 * 1024, small = 4096;
    uint8_t *dst = map_zeroed(big), *s1 = malloc(big), *s2 = malloc(small);
    assert_true(s1 && s2);
    pat_fill(s1, big, 1401);
    pat_fill(s2, small, 1402);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, big));
    assert_kvf_ok(kvf_write(pre, peer, s2, (uintptr_t)dst + big - small, small)); /* open */
    kvf_xfer_t xa = {KVF_OP_WRITE, s1, (uintptr_t)dst, big};
    kvf_xfer_t xb = {KVF_OP_WRITE, s2, (uintptr_t)dst, small};
    uint64_t posted0 = kvf__batch_posted(pre);
    for (int r = 0; r < 50; r++) {
        kvf_batch_t *a, *b;
        assert_kvf_ok(kvf_transfer_submit(pre, peer, &xa, 1, NULL, 0, &a));
        assert_kvf_ok(kvf_transfer_submit(pre, peer, &xb, 1, NULL, 0, &b));
        batch_done(a, 10000);
        batch_done(b, 10000);
        kvf_batch_free(a);
        kvf_batch_free(b);
        if (memcmp(dst, s2, small) != 0)
            fail_msg("round %d: the later batch's bytes were overwritten by the earlier one's", r);
    }
    assert_int_equal(kvf__batch_posted(pre), posted0);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    munmap(dst, big);
    free(s1);
    free(s2);
}

/* ---- child processes' side --------------------------------------------------------------- */

static void wait_stdin_eof(void)
{
    char b[64];
    while (read(0, b, sizeof(b)) > 0)
        ;
}

static kvf_engine_t *child_engine(const char *url, kvf_role_t role, const kvf_config_t *c)
{
    kvf_engine_t *e = NULL;
    if (kvf_engine_create(url, "127.0.0.1:0", role, 0, c, &e) < 0) {
        printf("error kvf_engine_create: %s\n", kvf_last_error());
        exit(1);
    }
    return e;
}

/* "recv URL SENDER": a Decode with the rounds buffer; answers each round on stdout. */
static int child_recv(char **argv)
{
    kvf_config_t c = quick_config();
    kvf_engine_t *e = child_engine(argv[1], KVF_ROLE_DECODE, &c);
    uint8_t *buf = mmap(NULL, NR_SLOTS * SLOT_BYTES, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED || kvf_mem_register(e, buf, NR_SLOTS * SLOT_BYTES) < 0) {
        printf("error register: %s\n", kvf_last_error());
        return 1;
    }
    printf("ready %s %p\n", kvf_engine_session_id(e), (void *)buf);
    fflush(stdout);
    receiver_t rv = {.e = e, .base = buf, .fd = 1};
    snprintf(rv.sender, sizeof(rv.sender), "%s", argv[2]);
    int rc = receive_rounds(&rv);
    wait_stdin_eof();
    kvf_engine_destroy(e);
    munmap(buf, NR_SLOTS * SLOT_BYTES);
    return rc;
}

/* "notes URL SIZE COUNT": a Decode with SIZE registered bytes; prints "note <sender> <msg>" for
 * COUNT notifications. */
static int child_notes(char **argv)
{
    kvf_config_t c = quick_config();
    kvf_engine_t *e = child_engine(argv[1], KVF_ROLE_DECODE, &c);
    size_t size = strtoull(argv[2], NULL, 10);
    int count = atoi(argv[3]);
    uint8_t *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED || kvf_mem_register(e, buf, size) < 0) {
        printf("error register: %s\n", kvf_last_error());
        return 1;
    }
    printf("ready %s %p\n", kvf_engine_session_id(e), (void *)buf);
    fflush(stdout);
    kvf_notify_t *n = malloc(64 * sizeof(*n));
    char text[128];
    int rc = 0;
    for (int got = 0; got < count && rc == 0;) {
        int k = kvf_notify_wait(e, n, 64, 20000);
        if (k <= 0) {
            printf("error kvf_notify_wait: %d %s\n", k, kvf_last_error());
            rc = 1;
        }
        for (int j = 0; j < k; j++, got++)
            printf("note %s %s\n", n[j].sender, note_text(&n[j], text, sizeof(text)));
        fflush(stdout);
    }
    free(n);
    wait_stdin_eof();
    kvf_engine_destroy(e);
    munmap(buf, size);
    return rc;
}

/* "send URL PEER ADDR NELEM ELEM SALT MSG": one batch of NELEM writes of ELEM bytes to PEER's
 * ADDR (hex) with notification MSG, element i filled with round_seed(SALT, 0, i). Prints "ready
 * <sid>", "submitted", "done <status>". */
static int child_send(char **argv)
{
    kvf_config_t c = quick_config();
    kvf_engine_t *e = child_engine(argv[1], KVF_ROLE_PREFILL, &c);
    const char *peer = argv[2];
    uint64_t addr = strtoull(argv[3], NULL, 16);
    size_t nelem = strtoull(argv[4], NULL, 10), elem = strtoull(argv[5], NULL, 10);
    uint32_t salt = (uint32_t)strtoul(argv[6], NULL, 10);
    uint8_t *src = malloc(nelem * elem);
    kvf_xfer_t *x = calloc(nelem, sizeof(*x));
    for (size_t i = 0; i < nelem; i++) {
        pat_fill(src + i * elem, elem, round_seed(salt, 0, (unsigned)i));
        x[i] = (kvf_xfer_t){KVF_OP_WRITE, src + i * elem, addr + i * elem, elem};
    }
    printf("ready %s\n", kvf_engine_session_id(e));
    fflush(stdout);
    kvf_batch_t *b;
    if (kvf_transfer_submit(e, peer, x, nelem, argv[7], strlen(argv[7]), &b) < 0) {
        printf("error kvf_transfer_submit: %s\n", kvf_last_error());
        return 1;
    }
    printf("submitted\n");
    fflush(stdout);
    int rc = kvf_batch_wait(b, -1);
    printf("done %d\n", rc);
    fflush(stdout);
    kvf_batch_free(b);
    wait_stdin_eof();
    kvf_engine_destroy(e);
    free(x);
    free(src);
    return rc == KVF_BATCH_DONE ? 0 : 1;
}

/* "peer URL LEASE_MS [QUEUE_MAX]": an engine with a short lease (and notification queue), up
 * until stdin closes (or SIGKILL). */
static int child_peer(int argc, char **argv)
{
    kvf_config_t c = quick_config();
    c.lease_ttl_ms = (uint32_t)strtoul(argv[2], NULL, 10);
    if (argc >= 4)
        c.notify_queue_max = (uint32_t)strtoul(argv[3], NULL, 10);
    kvf_engine_t *e = child_engine(argv[1], KVF_ROLE_DECODE, &c);
    printf("ready %s\n", kvf_engine_session_id(e));
    fflush(stdout);
    wait_stdin_eof();
    kvf_engine_destroy(e);
    return 0;
}

static int child_main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && !strcmp(argv[0], "recv"))
        return child_recv(argv);
    if (argc >= 4 && !strcmp(argv[0], "notes"))
        return child_notes(argv);
    if (argc >= 8 && !strcmp(argv[0], "send"))
        return child_send(argv);
    if (argc >= 3 && !strcmp(argv[0], "peer"))
        return child_peer(argc, argv);
    printf("error unknown child mode\n");
    return 2;
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(async_matches_sync_mixed, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(thousand_batches_in_flight, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(max_batches_busy_at_once, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(max_batches_submit_blocks, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(live_peer_not_behind_absent_peer, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(batch_wait_timeout_honoured, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(cancel_pending_batch, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(cancel_after_done_keeps_done, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(cancel_running_batch, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(batch_fails_when_target_dies, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(failed_element_fails_only_its_batch, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_after_data_sync_in_process, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_after_data_async_in_process, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_after_data_sync_child, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_after_data_async_child, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_order_in_process, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_order_child, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(killed_sender_no_notification, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_max_len, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_queue_full_busy, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_queue_full_names_the_queue, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_flood_leaves_room_for_others, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(waiting_notification_holds_up_no_other_engine, fx_setup,
                                    fx_teardown),
    cmocka_unit_test_setup_teardown(notify_queue_full_busy_child, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_wait_timeout, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(peer_events_join_leave, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(peer_events_killed_peer_leaves, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(peer_wait_appears, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(peer_wait_timeout_and_bad_id, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(destroy_completes_pending_batches, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(free_pending_batch_after_destroy, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(notify_wait_closed_on_shutdown, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(shutdown_releases_peer_wait_and_submit, fx_setup,
                                    fx_teardown),
    cmocka_unit_test_setup_teardown(posted_batches_land_every_byte, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(posted_batch_times_out_on_stopped_target, fx_setup,
                                    fx_teardown),
    cmocka_unit_test_setup_teardown(posted_batch_runs_again_after_unanswered_close, fx_setup,
                                    fx_teardown),
    cmocka_unit_test_setup_teardown(posted_rerun_keeps_its_deadline, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(one_async_thread_keeps_order, fx_setup, fx_teardown),
};

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], CHILD_ARG))
        return child_main(argc - 2, argv + 2);
    signal(SIGPIPE, SIG_IGN);
    return KVF_TEST_RUN(tests, argc, argv);
}
