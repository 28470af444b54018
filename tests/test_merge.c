/*
 * Coalescing of adjacent elements (src/core/xfer.c): the frameworks pass thousands of pages per
 * call, and elements adjacent on both sides travel merged. Run per transport (tcp, shm) by
 * CTest: what lands must be exactly what the caller asked for, a merge never crosses from one
 * registered region into the next, per-element results are the caller's, and a failure names
 * the caller's elements behind a merged one.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#define PAGE 4096u

typedef struct {
    kvf_store_server_t *srv;
    kvf_engine_t *dec; /* registers memory */
    kvf_engine_t *pre; /* moves it */
    const char *peer;
} fx_t;

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    c.op_timeout_ms = 10000;
    fx->srv = kvf_test_store_start();
    const char *url = kvf_store_server_url(fx->srv);
    assert_kvf_ok(kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, &c, &fx->dec));
    assert_kvf_ok(kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_PREFILL, 0, &c, &fx->pre));
    fx->peer = kvf_engine_session_id(fx->dec);
    *state = fx;
    return 0;
}

/* As fx_setup, with a sender that does not watch its peers' regions records, so that its
 * cache stays as the first transfer read it (what a stale cache does over tcp). */
static int fx_setup_stale(void **state)
{
    setenv("KVFERRY_NO_REGIONS_WATCH", "1", 1);
    int rc = fx_setup(state);
    unsetenv("KVFERRY_NO_REGIONS_WATCH");
    return rc;
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

static uint8_t *filled(size_t n, uint32_t seed)
{
    uint8_t *p = malloc(n);
    assert_non_null(p);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (uint8_t)x;
    }
    return p;
}

/* Element @i: PAGE bytes from @src page @sp to @dst page @dp, op @op. */
static kvf_xfer_t page(kvf_op_t op, uint8_t *src, size_t sp, uint8_t *dst, size_t dp)
{
    return (kvf_xfer_t){.op = op, .local = src + sp * PAGE, .remote = (uintptr_t)(dst + dp * PAGE),
                        .len = PAGE};
}

/* Runs of adjacent pages (merged), pages adjacent on one side only (not merged), a write run
 * followed by an adjacent read run (never merged across ops), in one call: every page lands
 * where its own element said, and the reads bring back what the target holds. */
static void runs_land_where_each_element_says(void **state)
{
    fx_t *fx = *state;
    enum { NP = 96 };
    uint8_t *dst = filled(NP * PAGE, 1), *src = filled(NP * PAGE, 2);
    uint8_t *want = malloc(NP * PAGE), *back = calloc(NP, PAGE);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, NP * PAGE));
    memcpy(want, dst, NP * PAGE);

    kvf_xfer_t x[NP];
    size_t n = 0;
    for (size_t k = 0; k < 32; k++) /* a run of 32: src 0..31 -> dst 0..31 */
        x[n++] = page(KVF_OP_WRITE, src, k, dst, k);
    for (size_t k = 0; k < 16; k++) /* adjacent locally, every other page remotely */
        x[n++] = page(KVF_OP_WRITE, src, 32 + k, dst, 32 + 2 * k);
    for (size_t k = 0; k < 8; k++) /* adjacent remotely, reversed locally */
        x[n++] = page(KVF_OP_WRITE, src, 71 - k, dst, 64 + k);
    for (size_t k = 0; k < 8; k++) /* the run continues on both sides, but reads */
        x[n++] = page(KVF_OP_READ, back, k, dst, 72 + k);
    for (size_t k = 0; k < 32; k++)
        memcpy(want + k * PAGE, src + k * PAGE, PAGE);
    for (size_t k = 0; k < 16; k++)
        memcpy(want + (32 + 2 * k) * PAGE, src + (32 + k) * PAGE, PAGE);
    for (size_t k = 0; k < 8; k++)
        memcpy(want + (64 + k) * PAGE, src + (71 - k) * PAGE, PAGE);

    assert_kvf_ok(kvf_transfer_sync(fx->pre, fx->peer, x, n));
    assert_memory_equal(dst, want, NP * PAGE);
    assert_memory_equal(back, want + 72 * PAGE, 8 * PAGE);

    /* Adjacent reads merge too: read the whole run back page by page. */
    uint8_t *all = calloc(NP, PAGE);
    for (size_t k = 0; k < NP; k++)
        x[k] = page(KVF_OP_READ, all, k, dst, k);
    assert_kvf_ok(kvf_transfer_sync(fx->pre, fx->peer, x, NP));
    assert_memory_equal(all, want, NP * PAGE);

    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    free(all);
    free(back);
    free(want);
    free(src);
    free(dst);
}

/* Two regions registered back to back: a run of pages that crosses from one into the other
 * must not become one element that spans both (the target would refuse it). */
static void run_across_two_regions_lands(void **state)
{
    fx_t *fx = *state;
    enum { NP = 32 };
    uint8_t *dst = calloc(NP, PAGE), *src = filled(NP * PAGE, 3);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, NP / 2 * PAGE));
    assert_kvf_ok(kvf_mem_register(fx->dec, dst + NP / 2 * PAGE, NP / 2 * PAGE));
    kvf_xfer_t x[NP];
    for (size_t k = 0; k < NP; k++)
        x[k] = page(KVF_OP_WRITE, src, k, dst, k);
    assert_kvf_ok(kvf_transfer_sync(fx->pre, fx->peer, x, NP));
    assert_memory_equal(dst, src, NP * PAGE);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst + NP / 2 * PAGE));
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    free(src);
    free(dst);
}

/* An asynchronous batch reports a status for each of the caller's elements, merged or not. */
static void async_status_per_element(void **state)
{
    fx_t *fx = *state;
    enum { NP = 48 };
    uint8_t *dst = calloc(NP, PAGE), *src = filled(NP * PAGE, 4);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, NP * PAGE));
    kvf_xfer_t x[NP];
    for (size_t k = 0; k < NP; k++)
        x[k] = page(KVF_OP_WRITE, src, k, dst, k);
    kvf_batch_t *b = NULL;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, fx->peer, x, NP, NULL, 0, &b));
    assert_int_equal(kvf_batch_wait(b, 20000), KVF_BATCH_DONE);
    int st[NP];
    memset(st, 0x7f, sizeof(st));
    assert_int_equal(kvf_batch_status(b, st, NP), KVF_BATCH_DONE);
    for (size_t k = 0; k < NP; k++)
        assert_int_equal(st[k], 0);
    kvf_batch_free(b);
    assert_memory_equal(dst, src, NP * PAGE);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));
    free(src);
    free(dst);
}

/* The target unregistered the memory after the sender cached its table (and no regions watch
 * told it since): the merged run is refused, nothing lands, and the message names the caller's
 * elements, not the merged one. */
static void refused_run_names_callers_elements(void **state)
{
    fx_t *fx = *state;
    enum { NP = 16 };
    uint8_t *dst = calloc(NP + 1, PAGE), *src = filled((NP + 1) * PAGE, 5);
    assert_kvf_ok(kvf_mem_register(fx->dec, dst, (NP + 1) * PAGE));
    /* The sender learns the table. */
    assert_kvf_ok(kvf_write(fx->pre, fx->peer, src, (uintptr_t)dst, PAGE));
    memset(dst, 0, (NP + 1) * PAGE);
    assert_kvf_ok(kvf_mem_unregister(fx->dec, dst));

    kvf_xfer_t x[NP + 1];
    x[0] = page(KVF_OP_WRITE, src, 0, dst, NP); /* alone: not adjacent to what follows */
    for (size_t k = 0; k < NP; k++)
        x[1 + k] = page(KVF_OP_WRITE, src, 1 + k, dst, k);
    assert_kvf_err(kvf_transfer_sync(fx->pre, fx->peer, x + 1, NP), -KVF_ENOTREG);
    const char *path = NULL;
    assert_kvf_ok(kvf_engine_peer_transport(fx->pre, fx->peer, &path));
    if (strcmp(path, "loop")) {
        assert_last_error_contains("(element 0 as sent is elements 0..15 of the call, merged "
                                   "because they are adjacent)");
        assert_last_error_contains("+65536)");
    } else {
        /* The in-process path checks each element itself and merges nothing. */
        assert_last_error_contains("element 0");
    }
    for (size_t i = 0; i < (NP + 1) * PAGE; i++)
        assert_int_equal(dst[i], 0);

    kvf_batch_t *b = NULL;
    assert_kvf_ok(kvf_transfer_submit(fx->pre, fx->peer, x, NP + 1, NULL, 0, &b));
    assert_int_equal(kvf_batch_wait(b, 20000), -KVF_ENOTREG);
    assert_last_error_contains(fx->peer);
    int st[NP + 1];
    assert_int_equal(kvf_batch_status(b, st, NP + 1), -KVF_ENOTREG);
    kvf_batch_free(b);
    for (size_t i = 0; i < (NP + 1) * PAGE; i++)
        assert_int_equal(dst[i], 0);
    free(src);
    free(dst);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(runs_land_where_each_element_says, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(run_across_two_regions_lands, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(async_status_per_element, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(refused_run_names_callers_elements, fx_setup_stale,
                                    fx_teardown),
};

KVF_TEST_MAIN(tests)
