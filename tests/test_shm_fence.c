/*
 * The shm target's fence page (src/transport/shm_fence.c): a memfd the target shares read-write
 * with every sender holding one of its slots, which the sender touches before and after every
 * copy. Shrunk under a sender's mapping, it would make that sender's next count a SIGBUS, so the
 * target seals it and a sender refuses a page without the seal. One process, shm forced for the
 * sender: the test holds the target engine, so it can hand out a fence page as a hostile target
 * would.
 */
#include "test_util.h"

#include "core/core.h"
#include "transport/shm.h"
#include "transport/transport.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

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

static kvf_engine_t *engine(const char *url, kvf_role_t role, kvf_transport_kind_t tr)
{
    kvf_config_t c;
    kvf_config_init(&c);
    c.init_timeout_ms = 3000;
    c.op_timeout_ms = 10000;
    c.transport = tr;
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

static void assert_via(kvf_engine_t *e, const char *peer, const char *want)
{
    const char *got = NULL;
    assert_kvf_ok(kvf_engine_peer_transport(e, peer, &got));
    assert_string_equal(got, want);
}

/* The shm transport of engine @e, which serves the fence. */
static struct shm_transport *shm_transport_of(kvf_engine_t *e)
{
    for (size_t i = 0; kvf__transports[i]; i++)
        if (kvf__transports[i] == &kvf__shm_ops) {
            struct shm_transport *t = shm_of(e->tr[i]);
            assert_non_null(t->fence);
            assert_true(t->fence_fd >= 0);
            return t;
        }
    fail_msg("no shm transport in the table");
    return NULL;
}

/* The target's fence page is sealed against shrinking, growing and further seals (nobody, the
 * target included, can truncate it, and no sender can add F_SEAL_FUTURE_WRITE to keep the next
 * ones from mapping it writable), and not against writes: a sender counts itself in it, and
 * its write through shm lands. */
static void fence_page_sealed(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *dec = engine(fx->url, KVF_ROLE_DECODE, KVF_TRANSPORT_AUTO);
    struct shm_transport *t = shm_transport_of(dec);
    int seals = fcntl(t->fence_fd, F_GET_SEALS);
    assert_true(seals >= 0);
    assert_int_equal(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
                     F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    assert_int_equal(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE), 0);
    assert_int_equal(ftruncate(t->fence_fd, 0), -1);
    assert_int_equal(errno, EPERM);
    assert_int_equal(ftruncate(t->fence_fd, 2 * (off_t)sizeof(shm_fence_page_t)), -1);
    assert_int_equal(errno, EPERM);
    assert_int_equal(fcntl(t->fence_fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE), -1);
    assert_int_equal(errno, EPERM);

    kvf_engine_t *pre = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_SHM);
    const char *peer = kvf_engine_session_id(dec);
    uint8_t *dst = calloc(1, 4096), *src = malloc(4096);
    assert_true(dst && src);
    fill(src, 4096, 81);
    assert_kvf_ok(kvf_mem_register(dec, dst, 4096));
    assert_kvf_ok(kvf_write(pre, peer, src, (uintptr_t)dst, 4096));
    assert_memory_equal(dst, src, 4096);
    assert_via(pre, peer, "shm");
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
    free(dst);
    free(src);
}

/* A target that hands out a fence page it could still shrink (a memfd without F_SEAL_SHRINK,
 * otherwise a valid page: its size, its magic) is refused before the sender maps it: forced shm
 * fails with KVF_ENOTSUP naming the peer and the missing seal, and no byte is written. With the
 * target's own page again, a new sender writes through shm. */
static void unsealed_fence_refused(void **state)
{
    fx_t *fx = *state;
    kvf_engine_t *dec = engine(fx->url, KVF_ROLE_DECODE, KVF_TRANSPORT_AUTO);
    const char *peer = kvf_engine_session_id(dec);
    uint8_t *dst = calloc(1, 4096), *src = malloc(4096);
    assert_true(dst && src);
    fill(src, 4096, 82);
    assert_kvf_ok(kvf_mem_register(dec, dst, 4096));

    /* The shm socket thread reads fence_fd only to answer a fence request, and no sender asks
     * before the engine below is created (after this store). */
    struct shm_transport *t = shm_transport_of(dec);
    int real = t->fence_fd;
    int bad = memfd_create("hostile-fence", MFD_CLOEXEC);
    assert_true(bad >= 0);
    assert_int_equal(ftruncate(bad, sizeof(shm_fence_page_t)), 0);
    uint64_t magic = SHM_FENCE_MAGIC;
    assert_int_equal(pwrite(bad, &magic, sizeof(magic), 0), (ssize_t)sizeof(magic));
    t->fence_fd = bad;

    kvf_engine_t *pre = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_SHM);
    assert_kvf_err(kvf_write(pre, peer, src, (uintptr_t)dst, 4096), -KVF_ENOTSUP);
    char want[400];
    snprintf(want, sizeof(want),
             "peer %s: fence slot: the fence page's memfd is not sealed against shrinking", peer);
    assert_last_error_contains(want);
    for (size_t i = 0; i < 4096; i++)
        assert_int_equal(dst[i], 0);
    kvf_engine_destroy(pre);

    t->fence_fd = real;
    close(bad);
    pre = engine(fx->url, KVF_ROLE_PREFILL, KVF_TRANSPORT_SHM);
    assert_kvf_ok(kvf_write(pre, peer, src, (uintptr_t)dst, 4096));
    assert_memory_equal(dst, src, 4096);
    assert_via(pre, peer, "shm");
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
    free(dst);
    free(src);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(fence_page_sealed, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(unsealed_fence_refused, fx_setup, fx_teardown),
};

KVF_TEST_MAIN(tests)
