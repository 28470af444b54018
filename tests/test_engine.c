/*
 * The transfer engine as a user drives it: create/destroy and the session record, registration,
 * writes and reads between engines (bytes compared after every transfer), errors with the value
 * named, a killed peer, a store that goes away.
 */
#include "test_util.h"

#include "core/core.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "store/server_internal.h"

#define CHILD_ARG "--decode-child"

typedef struct {
    kvf_store_server_t *srv;
    const char *url;
    kvf_engine_t *dec; /* the target: registers memory */
    kvf_engine_t *pre; /* the sender */
} fx_t;

static kvf_config_t quick_config(void)
{
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    c.op_timeout_ms = 10000;
    return c;
}

static kvf_engine_t *engine(const char *url, kvf_role_t role, const kvf_config_t *c)
{
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(url, "127.0.0.1:0", role, 0, c, &e));
    return e;
}

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    fx->srv = kvf_test_store_start();
    fx->url = kvf_store_server_url(fx->srv);
    kvf_config_t c = quick_config();
    fx->dec = engine(fx->url, KVF_ROLE_DECODE, &c);
    fx->pre = engine(fx->url, KVF_ROLE_PREFILL, &c);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_engine_destroy(fx->pre);
    kvf_engine_destroy(fx->dec);
    kvf_store_server_stop(fx->srv);
    free(fx);
    return 0;
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

/*
 * Where bytes a transfer still owed would be if it returned before its payload landed (an early
 * ack): the end of the buffer and of every chunk. Probed the moment the call returned, before any
 * whole-buffer comparison: memcmp from offset 0 gives a late tail the time to arrive.
 */
#define PROBE_TAIL   (256u << 10) /* the last bytes, compared whole */
#define PROBE_STRIDE (64u << 10)  /* the smallest tcp_chunk_bytes (KVF_MIN_CHUNK) */
#define PROBE_BYTES  64u          /* compared at the end of each stride */

/* The offset of the first probed byte of @got that differs from @want (the tail, then every
 * stride's end from the last), or -1. Thread-safe: no cmocka call. */
static long long probe_mismatch(const uint8_t *got, const uint8_t *want, size_t n)
{
    /* The very last bytes first, then each stride's end from the last back, then the tail. */
    for (size_t end = n; end > 0;) {
        size_t k = end < PROBE_BYTES ? end : PROBE_BYTES;
        for (size_t i = end; i-- > end - k;)
            if (got[i] != want[i])
                return (long long)i;
        end = (end - 1) / PROBE_STRIDE * PROBE_STRIDE;
    }
    size_t tail = n < PROBE_TAIL ? n : PROBE_TAIL;
    for (size_t i = n; i-- > n - tail;)
        if (got[i] != want[i])
            return (long long)i;
    return -1;
}

/* The @n bytes a transfer that just returned put at @got are @want: tail and chunk ends first,
 * at once, then every byte. */
static void assert_landed(const uint8_t *got, const uint8_t *want, size_t n, const char *what)
{
    long long bad = probe_mismatch(got, want, n);
    if (bad >= 0)
        fail_msg("%s: byte %lld of %zu is 0x%02x, want 0x%02x, right after the call returned",
                 what, bad, n, got[bad], want[bad]);
    assert_memory_equal(got, want, n);
}

static uint8_t *alloc_filled(size_t n, uint32_t seed)
{
    uint8_t *p = malloc(n);
    assert_non_null(p);
    fill(p, n, seed);
    return p;
}

/* ---- lifecycle ----------------------------------------------------------------------------- */

static void create_publishes_session_record(void **state)
{
    fx_t *fx = *state;
    const char *sid = kvf_engine_session_id(fx->dec);
    char want[64];
    snprintf(want, sizeof(want), "127.0.0.1:%u", kvf_engine_port(fx->dec));
    assert_string_equal(sid, want);
    assert_true(kvf_engine_port(fx->dec) != 0);

    kvf_store_t *st;
    assert_kvf_ok(kvf_store_open(fx->url, NULL, &st));
    char key[128];
    snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", sid);
    void *val;
    size_t len;
    assert_kvf_ok(kvf_store_get(st, key, 0, &val, &len));
    assert_non_null(strstr(val, "\"role\":\"Decode\""));
    assert_non_null(strstr(val, sid));
    free(val);

    /* Destroy withdraws the record at once. */
    kvf_engine_destroy(fx->dec);
    fx->dec = NULL;
    assert_kvf_err(kvf_store_get(st, key, 0, &val, &len), -KVF_ENOTFOUND);
    kvf_store_close(st);
}

static void session_in_use_refused(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *e = NULL;
    const char *sid = kvf_engine_session_id(fx->dec);
    assert_kvf_err(kvf_engine_create(fx->url, sid, KVF_ROLE_DECODE, 0, NULL, &e), -EADDRINUSE);
    assert_null(e);
    /* The whole message, as docs/operations.md ("Troubleshooting") quotes it. */
    char want[256];
    snprintf(want, sizeof(want),
             "session id %s is already in use: another engine or process holds port %s on this "
             "host",
             sid, strrchr(sid, ':') + 1);
    assert_string_equal(kvf_last_error(), want);
}

static void dead_record_taken_over(void **state)
{
    fx_t *fx = *state;
    char sid[64], key[128];
    snprintf(sid, sizeof(sid), "127.0.0.1:%u", kvf_test_free_port());
    snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", sid);
    kvf_store_t *st;
    assert_kvf_ok(kvf_store_open(fx->url, NULL, &st));
    const char *stale = "{\"session\":\"stale\",\"pid\":1}";
    assert_kvf_ok(kvf_store_set(st, key, stale, strlen(stale), 0));

    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(fx->url, sid, KVF_ROLE_DECODE, 0, NULL, &e));
    assert_string_equal(kvf_engine_session_id(e), sid);
    void *val;
    size_t len;
    assert_kvf_ok(kvf_store_get(st, key, 0, &val, &len));
    char pid[32];
    snprintf(pid, sizeof(pid), "\"pid\":%d", (int)getpid());
    assert_non_null(strstr(val, pid));
    free(val);
    kvf_engine_destroy(e);
    kvf_store_close(st);
}

static void create_bad_arguments(void **state)
{
    (void)state;
    kvf_engine_t *e = NULL;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_engine_create("tcp://192.168.1.1000:8000", "127.0.0.1:0",
                                     KVF_ROLE_PREFILL, 0, NULL, &e),
                   -KVF_EINVAL);
    assert_last_error_contains("192.168.1.1000 is not a valid IPv4 address");
    assert_kvf_err(kvf_engine_create("tcp://127.0.0.1:1", "127.0.0.1:50x", KVF_ROLE_PREFILL, 0,
                                     NULL, &e),
                   -KVF_EINVAL);
    assert_last_error_contains("127.0.0.1:50x");
    assert_kvf_err(kvf_engine_create("tcp://127.0.0.1:1", "127.0.0.1:0", (kvf_role_t)7, 0, NULL,
                                     &e),
                   -KVF_EINVAL);
    assert_last_error_contains("role 7");
    assert_kvf_err(kvf_engine_create("tcp://127.0.0.1:1", "127.0.0.1:0", KVF_ROLE_DECODE, -1,
                                     NULL, &e),
                   -KVF_EINVAL);
    assert_last_error_contains("device id -1");
    assert_true(kvf_test_now_ms() - t0 < 500);
    assert_null(e);

    kvf_role_t r;
    assert_kvf_ok(kvf_role_parse("decode", &r));
    assert_int_equal(r, KVF_ROLE_DECODE);
    assert_kvf_err(kvf_role_parse("Bogus", &r), -KVF_EINVAL);
    assert_last_error_contains("Bogus");
}

static void create_store_unreachable(void **state)
{
    (void)state;
    kvf_config_t c = quick_config();
    c.init_timeout_ms = 300;
    kvf_engine_t *e = NULL;
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_engine_create("tcp://127.0.0.1:1", "127.0.0.1:0", KVF_ROLE_PREFILL, 0, &c,
                                     &e),
                   -KVF_ESTOREDOWN);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(took >= 300 && took < 3000);
    assert_last_error_contains("tcp://127.0.0.1:1");
}

/* ---- registration -------------------------------------------------------------------------- */

static void register_errors_name_ranges(void **state)
{
    fx_t *fx = *state;
    uint8_t *buf = malloc(8192);
    assert_kvf_ok(kvf_mem_register(fx->dec, buf, 4096));
    assert_kvf_err(kvf_mem_register(fx->dec, buf + 2048, 4096), -KVF_EINVAL);
    char a[32], b[32];
    snprintf(a, sizeof(a), "%p", (void *)(buf + 2048));
    snprintf(b, sizeof(b), "%p", (void *)buf);
    assert_last_error_contains(a);
    assert_last_error_contains(b);
    assert_kvf_err(kvf_mem_register(fx->dec, buf + 4096, 0), -KVF_EINVAL);
    assert_kvf_err(kvf_mem_register(fx->dec, buf, 4096), -KVF_EEXIST);
    assert_kvf_err(kvf_mem_unregister(fx->dec, buf + 1), -KVF_ENOTREG);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, buf));
    free(buf);
}

static void peer_sees_regions_at_once(void **state)
{
    fx_t *fx = *state;
    uint8_t *a = malloc(4096), *b = malloc(100);
    void *addrs[] = {a, b};
    size_t lens[] = {4096, 100};
    assert_kvf_ok(kvf_mem_register_batch(fx->dec, addrs, lens, 2));
    kvf_region_info_t *rs;
    size_t n;
    assert_kvf_ok(kvf_peer_regions(fx->pre, kvf_engine_session_id(fx->dec), &rs, &n));
    assert_int_equal(n, 2);
    size_t ia = (uintptr_t)a < (uintptr_t)b ? 0 : 1;
    assert_int_equal(rs[ia].addr, (uintptr_t)a);
    assert_int_equal(rs[ia].len, 4096);
    assert_int_equal(rs[1 - ia].addr, (uintptr_t)b);
    assert_int_equal(rs[1 - ia].len, 100);
    free(rs);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, a));
    assert_kvf_ok(kvf_peer_regions(fx->pre, kvf_engine_session_id(fx->dec), &rs, &n));
    assert_int_equal(n, 1);
    assert_int_equal(rs[0].addr, (uintptr_t)b);
    free(rs);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, b));
    free(a);
    free(b);
}

/* ---- transfers ----------------------------------------------------------------------------- */

static void write_read_size(fx_t *fx, size_t n, uint32_t seed)
{
    const char *peer = kvf_engine_session_id(fx->dec);
    uint8_t *dst = calloc(1, n), *src = alloc_filled(n, seed), *back = calloc(1, n);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, n));
    assert_kvf_ok(kvf_write(fx->pre, peer, src, (uintptr_t)dst, n));
    assert_landed(dst, src, n, "write");
    assert_kvf_ok(kvf_read(fx->pre, peer, back, (uintptr_t)dst, n));
    assert_landed(back, src, n, "read");
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    free(dst);
    free(src);
    free(back);
}

static void write_read_sizes(void **state)
{
    fx_t *fx = *state;
    write_read_size(fx, 1, 1);
    write_read_size(fx, 4096, 2);
    /* The large ones a few times each: the bytes a call returned too early for land within
     * microseconds, so each round is one more chance to see them missing. */
    for (uint32_t round = 0; round < 4; round++) {
        write_read_size(fx, (1u << 20) + 1, 3 + round);
        write_read_size(fx, (4u << 20) + 1, 13 + round);
    }
    write_read_size(fx, 64u << 20, 4);
}

static void batch_of_1000_mixed(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    enum { N = 1000 };
    size_t off[N + 1];
    kvf_xfer_t x[N];
    off[0] = 0;
    for (int i = 0; i < N; i++)
        off[i + 1] = off[i] + 1 + (size_t)((i * 7919) % 20000);
    size_t total = off[N];
    uint8_t *dst = calloc(1, total), *src = alloc_filled(total, 9), *back = calloc(1, total);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, total));
    /* Odd elements written, even ones read (pre-filled on the target): the batch ends with a
     * write, whose bytes must be in place when it returns. */
    for (int i = 0; i < N; i++)
        if (i % 2 == 0)
            memcpy(dst + off[i], src + off[i], off[i + 1] - off[i]);
    for (int i = 0; i < N; i++)
        x[i] = (kvf_xfer_t){.op = i % 2 ? KVF_OP_WRITE : KVF_OP_READ,
                            .local = i % 2 ? src + off[i] : back + off[i],
                            .remote = (uintptr_t)(dst + off[i]),
                            .len = off[i + 1] - off[i]};
    assert_kvf_ok(kvf_transfer_sync(fx->pre, peer, x, N));
    /* At once, from the last element back: each element's tail where it landed (the target's
     * memory for writes, ours for reads). */
    for (int i = N - 1; i >= 0; i--) {
        size_t len = off[i + 1] - off[i], tail = len < PROBE_BYTES ? len : PROBE_BYTES;
        const uint8_t *got = (i % 2 ? dst : back) + off[i + 1] - tail;
        if (memcmp(got, src + off[i + 1] - tail, tail) != 0)
            fail_msg("element %d (%s, %zu bytes): its last %zu bytes differ right after the "
                     "batch returned",
                     i, i % 2 ? "write" : "read", len, tail);
    }
    for (int i = 0; i < N; i++)
        if (i % 2)
            memcpy(back + off[i], dst + off[i], off[i + 1] - off[i]);
    assert_memory_equal(back, src, total);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    free(dst);
    free(src);
    free(back);
}

typedef struct {
    kvf_engine_t *e;
    const char *peer;
    uint8_t *src;
    uint64_t dst;
    size_t len;
    int rc;
    long long bad; /* probe_mismatch() right after the last write returned */
} writer_t;

static void *writer_main(void *p)
{
    writer_t *w = p;
    for (int i = 0; i < 20 && w->rc == 0; i++)
        w->rc = kvf_write(w->e, w->peer, w->src, w->dst, w->len);
    w->bad = w->rc == 0 ? probe_mismatch((const uint8_t *)(uintptr_t)w->dst, w->src, w->len) : -1;
    return NULL;
}

static void four_threads_one_peer(void **state)
{
    fx_t *fx = *state;
    enum { T = 4 };
    const size_t each = 3u << 20;
    uint8_t *dst = calloc(1, T * each);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, T * each));
    pthread_t th[T];
    writer_t w[T];
    for (int i = 0; i < T; i++) {
        w[i] = (writer_t){fx->pre, kvf_engine_session_id(fx->dec), alloc_filled(each, 20 + i),
                          (uintptr_t)(dst + i * each), each, 0, -1};
        assert_int_equal(pthread_create(&th[i], NULL, writer_main, &w[i]), 0);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        assert_kvf_ok(w[i].rc);
        if (w[i].bad >= 0)
            fail_msg("thread %d: byte %lld of its %zu differed right after its write returned", i,
                     w[i].bad, each);
        assert_memory_equal(dst + i * each, w[i].src, each);
        free(w[i].src);
    }
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    free(dst);
}

static void write_past_region_refused(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    uint8_t *dst = calloc(1, 8192), *src = alloc_filled(4097, 5);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 4096));
    assert_kvf_err(kvf_write(fx->pre, peer, src, (uintptr_t)dst, 4097), -KVF_ENOTREG);
    assert_last_error_contains(peer);
    assert_last_error_contains("1 byte");
    for (size_t i = 0; i < 8192; i++)
        assert_int_equal(dst[i], 0);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    free(dst);
    free(src);
}

/*
 * A pair whose sender has cached the target's regions (one 4 KiB region, written once), on a store
 * that counts the requests it serves; the engines' leases are long, so no keepalive falls
 * between two counts. @watch false: the sender does not watch its peers' regions records.
 */
typedef struct {
    kvf_store_server_t *srv;
    kvf_engine_t *dec, *pre;
    const char *peer;
    uint8_t *first;
} counted_t;

static void counted_open(counted_t *k, bool watch)
{
    if (!watch)
        setenv("KVFERRY_NO_REGIONS_WATCH", "1", 1);
    k->srv = kvf_test_store_start();
    kvf_config_t c = quick_config();
    c.lease_ttl_ms = 3600u * 1000u;
    k->dec = engine(kvf_store_server_url(k->srv), KVF_ROLE_DECODE, &c);
    k->pre = engine(kvf_store_server_url(k->srv), KVF_ROLE_PREFILL, &c);
    unsetenv("KVFERRY_NO_REGIONS_WATCH");
    k->peer = kvf_engine_session_id(k->dec);
    k->first = calloc(1, 4096);
    assert_kvf_ok(kvf_mem_register(k->dec, k->first, 4096));
    assert_kvf_ok(kvf_write(k->pre, k->peer, k->first, (uintptr_t)k->first, 4096));
}

/* Write @len bytes of @src at @dst, which must land, and fail if that asked the store. */
static void counted_write_no_store(counted_t *k, const uint8_t *src, uint8_t *dst, size_t len)
{
    kvf_store_server_stats_t before, after;
    assert_kvf_ok(kvf_store_server_stats(k->srv, &before));
    assert_kvf_ok(kvf_write(k->pre, k->peer, src, (uintptr_t)dst, len));
    assert_kvf_ok(kvf_store_server_stats(k->srv, &after));
    assert_landed(dst, src, len, "write into a region registered after the cache was filled");
    if (after.ops != before.ops)
        fail_msg("the write into the new region made %llu store request(s)",
                 (unsigned long long)(after.ops - before.ops));
}

static void counted_close(counted_t *k)
{
    assert_kvf_ok(kvf_mem_unregister(k->dec, k->first));
    kvf_engine_destroy(k->pre);
    kvf_engine_destroy(k->dec);
    kvf_store_server_stop(k->srv);
    free(k->first);
}

/*
 * A region the target registers after this engine cached its list (and which no regions watch
 * reported) is written at once, without a store request: over tcp the target's own check
 * decides, over shm the target's live table.
 */
static void new_region_written_without_the_store(void **state)
{
    (void)state;
    const size_t small = 64u << 10;
    counted_t k;
    counted_open(&k, false); /* the watch could tell the sender first: tcp_peer_regions_watched */
    uint8_t *fresh = calloc(1, small + 4096), *src = alloc_filled(small, 21);
    assert_kvf_ok(kvf_mem_register(k.dec, fresh, small));
    counted_write_no_store(&k, src, fresh, small);
    for (size_t i = small; i < small + 4096; i++)
        assert_int_equal(fresh[i], 0);
    assert_kvf_ok(kvf_mem_unregister(k.dec, fresh));
    counted_close(&k);
    free(fresh);
    free(src);
}

/*
 * Over tcp the sender watches the regions record of each peer it talks to: a region the target
 * registers later reaches the sender's cache without any transfer, and a transfer into it then
 * neither asks the store nor goes unchecked. 5 MiB is above the bytes a miss may send unchecked,
 * so without the watch this write would refresh from the store first.
 */
static void tcp_peer_regions_watched(void **state)
{
    (void)state;
    const char *forced = getenv("KVFERRY_TRANSPORT");
    if (!forced || strcmp(forced, "tcp") != 0)
        skip(); /* shm checks the target's live table; in-process peers need no check */
    const size_t big = 5u << 20;
    counted_t k;
    counted_open(&k, true);
    uint8_t *fresh = calloc(1, big), *src = alloc_filled(big, 22);
    assert_kvf_ok(kvf_mem_register(k.dec, fresh, big));
    uint64_t deadline = kvf_test_now_ms() + 5000;
    while (!kvf__peer_knows(k.pre, k.peer, (uintptr_t)fresh, big) &&
           kvf_test_now_ms() < deadline) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    if (!kvf__peer_knows(k.pre, k.peer, (uintptr_t)fresh, big))
        fail_msg("the sender's cache did not learn the new region within 5 s: %s",
                 kvf_last_error());
    counted_write_no_store(&k, src, fresh, big);
    assert_kvf_ok(kvf_mem_unregister(k.dec, fresh));
    counted_close(&k);
    free(fresh);
    free(src);
}

/*
 * The Decode restarts under the same session id: its new engine counts region generations from 1
 * again, below what the sender cached from the old one. The sender must take the new engine's
 * list (it names its incarnation) and write into its memory, also above the bytes a miss may
 * send unchecked. Regression: the sender refused every such write with KVF_ENOTREG, pinned to
 * the old engine's generation.
 */
static void restarted_peer_case(bool watch)
{
    const size_t big = 5u << 20;
    if (!watch)
        setenv("KVFERRY_NO_REGIONS_WATCH", "1", 1);
    kvf_store_server_t *srv = kvf_test_store_start();
    kvf_config_t c = quick_config();
    /* The Decode restarts on its port: one below the ephemeral range, which no other test's
     * outgoing connection takes while it is free. */
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "127.0.0.1:%u", kvf_test_free_port());
    kvf_engine_t *dec = NULL;
    assert_kvf_ok(kvf_engine_create(kvf_store_server_url(srv), sid, KVF_ROLE_DECODE, 0, &c, &dec));
    kvf_engine_t *pre = engine(kvf_store_server_url(srv), KVF_ROLE_PREFILL, &c);
    unsetenv("KVFERRY_NO_REGIONS_WATCH");
    uint8_t *a = calloc(1, 4096), *b = calloc(1, big), *d = calloc(1, big);
    uint8_t *src = alloc_filled(big, 23);
    assert_kvf_ok(kvf_mem_register(dec, a, 4096));
    assert_kvf_ok(kvf_write(pre, sid, src, (uintptr_t)a, 4096));
    /* Generations the new engine will not reach, each learned by the sender (by the watch, or
     * by the refresh a miss of more than 4 MiB makes). */
    for (int i = 0; i < 3; i++) {
        assert_kvf_ok(kvf_mem_register(dec, b, big));
        assert_kvf_ok(kvf_write(pre, sid, src, (uintptr_t)b, big));
        assert_kvf_ok(kvf_mem_unregister(dec, b));
    }
    kvf_engine_destroy(dec);

    assert_kvf_ok(kvf_engine_create(kvf_store_server_url(srv), sid, KVF_ROLE_DECODE, 0, &c, &dec));
    assert_kvf_ok(kvf_mem_register(dec, d, big));
    /* The first write may meet the old connection broken: the peer is then looked up again. */
    int rc = kvf_write(pre, sid, src, (uintptr_t)d, big);
    if (rc == -KVF_EPEERGONE)
        rc = kvf_write(pre, sid, src, (uintptr_t)d, big);
    if (rc < 0)
        fail_msg("write into the restarted peer's memory: %s (%s)", kvf_err_name(rc),
                 kvf_last_error());
    assert_landed(d, src, big, "write into the restarted peer's memory");

    assert_kvf_ok(kvf_mem_unregister(dec, d));
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
    kvf_store_server_stop(srv);
    free(a);
    free(b);
    free(d);
    free(src);
}

static void restarted_peer_new_generations(void **state)
{
    (void)state;
    restarted_peer_case(true);
}

static void restarted_peer_new_generations_unwatched(void **state)
{
    (void)state;
    restarted_peer_case(false);
}

/* A regions record is untrusted: a negative generation, which would read as the largest and pin
 * every later list out, or a malformed incarnation is refused; a good one gives both. */
static void regions_record_generation_checked(void **state)
{
    (void)state;
    kvf_region_t *rs = NULL;
    size_t n;
    uint64_t gen, inc;
    const char *neg = "{\"gen\": -1, \"regions\": []}";
    assert_kvf_err(kvf__eng_parse_regions("p:1", neg, strlen(neg), &rs, &n, &gen, &inc),
                   -KVF_EPROTO);
    assert_last_error_contains("malformed regions record");
    const char *badinc = "{\"gen\": 2, \"inc\": \"12zz\", \"regions\": []}";
    assert_kvf_err(kvf__eng_parse_regions("p:1", badinc, strlen(badinc), &rs, &n, &gen, &inc),
                   -KVF_EPROTO);
    const char *good = "{\"gen\": 2, \"inc\": \"fedcba9876543210\", \"regions\": "
                       "[{\"addr\": \"1000\", \"len\": 4096}]}";
    assert_kvf_ok(kvf__eng_parse_regions("p:1", good, strlen(good), &rs, &n, &gen, &inc));
    assert_int_equal(n, 1);
    assert_int_equal(rs[0].addr, 0x1000);
    assert_int_equal(gen, 2);
    assert_true(inc == 0xfedcba9876543210ull);
    free(rs);
}

static void write_after_unregister_fails(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    uint8_t *dst = calloc(1, 4096), *src = alloc_filled(4096, 6);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 4096));
    assert_kvf_ok(kvf_write(fx->pre, peer, src, (uintptr_t)dst, 4096));
    memset(dst, 0, 4096);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    assert_kvf_err(kvf_write(fx->pre, peer, src, (uintptr_t)dst, 4096), -KVF_ENOTREG);
    for (size_t i = 0; i < 4096; i++)
        assert_int_equal(dst[i], 0);
    free(dst);
    free(src);
}

static void unknown_session_fails_after_init_timeout(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = quick_config();
    c.init_timeout_ms = 400;
    kvf_engine_t *e = engine(fx->url, KVF_ROLE_PREFILL, &c);
    uint8_t b[16] = {0};
    uint64_t t0 = kvf_test_now_ms();
    assert_kvf_err(kvf_write(e, "127.0.0.1:9", b, 0x1000, sizeof(b)), -KVF_ENOTFOUND);
    uint64_t took = kvf_test_now_ms() - t0;
    assert_true(took >= 400 && took < 2000);
    assert_last_error_contains("127.0.0.1:9");
    kvf_engine_destroy(e);
}

static void bad_transfer_arguments(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    uint8_t b[16];
    assert_kvf_err(kvf_write(fx->pre, peer, b, 0x1000, 0), -KVF_EINVAL);
    assert_last_error_contains("length is 0");
    assert_kvf_err(kvf_write(fx->pre, peer, NULL, 0x1000, 16), -KVF_EINVAL);
    assert_kvf_err(kvf_transfer_sync(fx->pre, peer, NULL, 0), -KVF_EINVAL);
    assert_kvf_err(kvf_write(fx->pre, "not a session", b, 0x1000, 16), -KVF_EINVAL);
    assert_last_error_contains("not a session");
    /* An address the peer never registered: refused before anything is sent. */
    assert_kvf_err(kvf_write(fx->pre, peer, b, 0x1000, 16), -KVF_ENOTREG);
    assert_last_error_contains("0x1000");
}

static void store_down_transfers_continue(void **state)
{
    fx_t *fx = *state;
    const char *peer = kvf_engine_session_id(fx->dec);
    uint8_t *dst = calloc(1, 1 << 20), *src = alloc_filled(1 << 20, 7);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, 1 << 20));
    assert_kvf_ok(kvf_write(fx->pre, peer, src, (uintptr_t)dst, 1 << 20));
    kvf_store_server_stop(fx->srv);
    fx->srv = NULL;
    fill(src, 1 << 20, 8);
    assert_kvf_ok(kvf_write(fx->pre, peer, src, (uintptr_t)dst, 1 << 20));
    assert_landed(dst, src, 1 << 20, "write with the store down");
    /* Unregister works locally and says so, although its publication fails while the store is
     * down; the target refuses the range from now on. */
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    uint8_t *after = alloc_filled(1 << 20, 12);
    int rc = kvf_write(fx->pre, peer, after, (uintptr_t)dst, 1 << 20);
    /* tcp: the target refuses the range. shm: the sender sees that the target's regions changed
     * and, with the store down, cannot learn how: it refuses to guess. Either way no byte lands. */
    if (rc != -KVF_ENOTREG && rc != -KVF_ESTALE && rc != -KVF_ESTOREDOWN)
        fail_msg("write after unregister: %s (%s)", kvf_err_name(rc), kvf_last_error());
    assert_memory_equal(dst, src, 1 << 20);
    free(after);
    free(dst);
    free(src);
}

/* ---- a peer in another process, killed mid-transfer ----------------------------------------- */

/* Child mode: a Decode engine with @size registered bytes; prints "ready <sid> <addr>" and serves
 * until SIGTERM. */
static int decode_child(const char *url, const char *sid, size_t size)
{
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    /* Blocked before any engine thread exists, so every thread inherits the mask and sigwait()
     * below is the only taker. */
    pthread_sigmask(SIG_BLOCK, &term, NULL);
    kvf_engine_t *e;
    if (kvf_engine_create(url, sid, KVF_ROLE_DECODE, 0, NULL, &e) < 0) {
        printf("error %s\n", kvf_last_error());
        return 1;
    }
    uint8_t *buf = calloc(1, size);
    if (kvf_mem_register(e, buf, size) < 0) {
        printf("error %s\n", kvf_last_error());
        return 1;
    }
    printf("ready %s %p\n", kvf_engine_session_id(e), (void *)buf);
    fflush(stdout);
    int sig;
    sigwait(&term, &sig);
    kvf_engine_destroy(e);
    free(buf);
    return 0;
}

static pid_t start_decode_child(const char *url, const char *sid, size_t size, int *out_fd,
                                char *got_sid, uint64_t *addr)
{
    char path[4096], sz[32];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    assert_true(n > 0);
    path[n] = '\0';
    snprintf(sz, sizeof(sz), "%zu", size);
    char *argv[] = {path, CHILD_ARG, (char *)url, (char *)sid, sz, NULL};
    pid_t pid = kvf_test_spawn_pipe(argv, out_fd);
    char line[512], *end;
    assert_true(kvf_test_read_line(*out_fd, line, sizeof(line), 10000) > 0);
    if (strncmp(line, "ready ", 6) != 0)
        fail_msg("decode child: %s", line);
    char *sp = strchr(line + 6, ' ');
    assert_non_null(sp);
    *sp = '\0';
    strcpy(got_sid, line + 6);
    *addr = strtoull(sp + 1, &end, 16);
    return pid;
}

typedef struct {
    kvf_engine_t *e;
    const char *peer;
    uint8_t *src;
    uint64_t dst;
    size_t len;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done_ok; /* writes that succeeded, under mu */
    int rc;
    uint64_t fail_ms; /* how long the failing call took */
    char msg[1024];   /* its last-error message (thread-local there) */
} killer_t;

static void *keep_writing(void *p)
{
    killer_t *k = p;
    for (int i = 0; i < 1000; i++) {
        uint64_t t0 = kvf_test_now_ms();
        int rc = kvf_write(k->e, k->peer, k->src, k->dst, k->len);
        pthread_mutex_lock(&k->mu);
        if (rc < 0) {
            k->rc = rc;
            k->fail_ms = kvf_test_now_ms() - t0;
            snprintf(k->msg, sizeof(k->msg), "%s", kvf_last_error());
        } else {
            k->done_ok++;
        }
        pthread_cond_broadcast(&k->cv);
        pthread_mutex_unlock(&k->mu);
        if (rc < 0)
            break;
    }
    return NULL;
}

static void killed_peer_fails_then_restart_works(void **state)
{
    fx_t *fx = *state;
    const size_t size = 64u << 20;
    char sid[128];
    uint64_t addr;
    int fd;
    /* The Decode restarts on its port: one below the ephemeral range (see restarted_peer_case). */
    char want[64];
    snprintf(want, sizeof(want), "127.0.0.1:%u", kvf_test_free_port());
    pid_t child = start_decode_child(fx->url, want, size, &fd, sid, &addr);

    killer_t k = {.e = fx->pre, .peer = sid, .src = alloc_filled(size, 11), .dst = addr,
                  .len = size};
    pthread_mutex_init(&k.mu, NULL);
    pthread_cond_init(&k.cv, NULL);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, keep_writing, &k), 0);
    /* Kill once one 64 MiB write has landed, so the next is (about to be) in flight. */
    pthread_mutex_lock(&k.mu);
    while (k.done_ok == 0 && k.rc == 0)
        pthread_cond_wait(&k.cv, &k.mu);
    int first_rc = k.rc;
    pthread_mutex_unlock(&k.mu);
    assert_kvf_ok(first_rc);
    kill(child, SIGKILL);
    kvf_test_reap(child, 5000);
    close(fd);
    pthread_join(th, NULL);
    /* The connection breaks: the failing call ends at once with "peer gone", far inside the
     * operation timeout (10 s), not by timing out. */
    if (k.rc != -KVF_EPEERGONE)
        fail_msg("write failed with %s (%s), want KVF_EPEERGONE", kvf_err_name(k.rc), k.msg);
    assert_true(k.fail_ms < 3000);
    assert_non_null(strstr(k.msg, sid));

    /* A Decode restarted with the same session id is written to by the same engine. */
    char sid2[128];
    child = start_decode_child(fx->url, sid, size, &fd, sid2, &addr);
    assert_string_equal(sid2, sid);
    assert_kvf_ok(kvf_write(fx->pre, sid, k.src, addr, 4096));
    /* The bytes are in the new Decode's (zeroed) buffer: read back through the engine. */
    uint8_t *back = calloc(1, 4096);
    assert_kvf_ok(kvf_read(fx->pre, sid, back, addr, 4096));
    assert_memory_equal(back, k.src, 4096);
    free(back);
    kill(child, SIGTERM);
    assert_int_equal(kvf_test_reap(child, 10000), 0);
    close(fd);
    free(k.src);
    pthread_cond_destroy(&k.cv);
    pthread_mutex_destroy(&k.mu);
}

static void register_read_only_memory(void **state)
{
    fx_t *fx = *state;
    const size_t n = 1u << 20;
    /* A source peers only read may be mapped read-only: registering it must not store to it. */
    uint8_t *ro = mmap(NULL, n, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(ro != MAP_FAILED);
    assert_kvf_ok(kvf_mem_register(fx->dec, ro, n));
    uint8_t *back = malloc(n);
    memset(back, 0xEE, n);
    assert_kvf_ok(kvf_read(fx->pre, kvf_engine_session_id(fx->dec), back, (uintptr_t)ro, n));
    for (size_t i = 0; i < n; i++)
        assert_int_equal(back[i], 0);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, ro));
    munmap(ro, n);
    free(back);
}

typedef struct {
    kvf_engine_t *e;
    int rc;
} waiter_t;

static void *write_to_absent_peer(void *p)
{
    waiter_t *w = p;
    uint8_t b[16] = {0};
    w->rc = kvf_write(w->e, "127.0.0.1:9", b, 0x1000, sizeof(b));
    return NULL;
}

static void destroy_releases_transfer_waiting_for_peer(void **state)
{
    fx_t *fx = *state;
    kvf_config_t c = quick_config();
    c.init_timeout_ms = 8000;
    waiter_t w = {.e = engine(fx->url, KVF_ROLE_PREFILL, &c)};
    unsigned before = kvf__store_server_waiters(fx->srv);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, write_to_absent_peer, &w), 0);
    /* Wait (bounded) until the transfer is parked on the store waiting for the peer. */
    uint64_t deadline = kvf_test_now_ms() + 5000;
    while (kvf__store_server_waiters(fx->srv) <= before && kvf_test_now_ms() < deadline) {
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    assert_true(kvf__store_server_waiters(fx->srv) > before);
    uint64_t t0 = kvf_test_now_ms();
    kvf_engine_destroy(w.e);
    uint64_t took = kvf_test_now_ms() - t0;
    pthread_join(th, NULL);
    assert_kvf_err(w.rc, -KVF_ECLOSED);
    assert_true(took < 1500);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(create_publishes_session_record, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(session_in_use_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(dead_record_taken_over, fx_setup, fx_teardown),
    cmocka_unit_test(create_bad_arguments),
    cmocka_unit_test(create_store_unreachable),
    cmocka_unit_test_setup_teardown(register_errors_name_ranges, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(peer_sees_regions_at_once, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(write_read_sizes, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(batch_of_1000_mixed, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(four_threads_one_peer, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(write_past_region_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(write_after_unregister_fails, fx_setup, fx_teardown),
    cmocka_unit_test(new_region_written_without_the_store),
    cmocka_unit_test(tcp_peer_regions_watched),
    cmocka_unit_test(restarted_peer_new_generations),
    cmocka_unit_test(restarted_peer_new_generations_unwatched),
    cmocka_unit_test(regions_record_generation_checked),
    cmocka_unit_test_setup_teardown(unknown_session_fails_after_init_timeout, fx_setup,
                                    fx_teardown),
    cmocka_unit_test_setup_teardown(bad_transfer_arguments, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(store_down_transfers_continue, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(killed_peer_fails_then_restart_works, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(register_read_only_memory, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(destroy_releases_transfer_waiting_for_peer, fx_setup,
                                    fx_teardown),
};

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], CHILD_ARG) == 0)
        return decode_child(argv[2], argv[3], strtoull(argv[4], NULL, 10));
    signal(SIGPIPE, SIG_IGN);
    return KVF_TEST_RUN(tests, argc, argv);
}
