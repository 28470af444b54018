/*
 * Registration hardening (issue 12): memory that is not mapped in this process is refused at
 * registration, with the range named, instead of being accepted and killing the process at the
 * first peer write into it.
 */
#include "test_util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    kvf_store_server_t *srv;
    kvf_engine_t *e;
    size_t page;
} fx_t;

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));
    fx->srv = kvf_test_store_start();
    fx->page = (size_t)sysconf(_SC_PAGESIZE);
    fx->e = kvf_test_engine(kvf_store_server_url(fx->srv), KVF_ROLE_DECODE, NULL);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    kvf_engine_destroy(fx->e);
    kvf_store_server_stop(fx->srv);
    free(fx);
    return 0;
}

/* Three pages with the middle one unmapped: the whole range is refused, each mapped page alone
 * is accepted. */
static void register_range_with_hole_refused(void **state)
{
    fx_t *fx = *state;
    uint8_t *m = mmap(NULL, 3 * fx->page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    assert_true(m != MAP_FAILED);
    assert_int_equal(munmap(m + fx->page, fx->page), 0);
    assert_kvf_err(kvf_mem_register(fx->e, m, 3 * fx->page), -EFAULT);
    assert_last_error_contains("not mapped");
    char want[64];
    snprintf(want, sizeof(want), "[%p, +%zu)", (void *)m, 3 * fx->page);
    assert_last_error_contains(want);
    /* Off by one byte into the hole is refused too. */
    assert_kvf_err(kvf_mem_register(fx->e, m, fx->page + 1), -EFAULT);
    assert_kvf_ok(kvf_mem_register(fx->e, m, fx->page));
    assert_kvf_ok(kvf_mem_register(fx->e, m + 2 * fx->page, fx->page));
    assert_kvf_ok(kvf_mem_unregister(fx->e, m));
    assert_kvf_ok(kvf_mem_unregister(fx->e, m + 2 * fx->page));
    munmap(m, fx->page);
    munmap(m + 2 * fx->page, fx->page);
}

/* Freed memory is refused; a batch with one such element registers nothing. */
static void register_freed_memory_refused(void **state)
{
    fx_t *fx = *state;
    uint8_t *ok = mmap(NULL, fx->page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *gone = mmap(NULL, fx->page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                         0);
    assert_true(ok != MAP_FAILED && gone != MAP_FAILED);
    assert_int_equal(munmap(gone, fx->page), 0);
    assert_kvf_err(kvf_mem_register(fx->e, gone, 16), -EFAULT);
    void *addrs[] = {ok, gone};
    size_t lens[] = {fx->page, 16};
    assert_kvf_err(kvf_mem_register_batch(fx->e, addrs, lens, 2), -EFAULT);
    assert_last_error_contains("element 1");
    /* Nothing of the batch stayed registered: the good element registers afresh. */
    assert_kvf_ok(kvf_mem_register(fx->e, ok, fx->page));
    assert_kvf_ok(kvf_mem_unregister(fx->e, ok));
    munmap(ok, fx->page);
}

/* Read-only memory is mapped: registering it (a source peers only read) still works. */
static void register_read_only_memory_accepted(void **state)
{
    fx_t *fx = *state;
    uint8_t *m = mmap(NULL, fx->page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(m != MAP_FAILED);
    assert_kvf_ok(kvf_mem_register(fx->e, m, fx->page));
    assert_kvf_ok(kvf_mem_unregister(fx->e, m));
    munmap(m, fx->page);
}

/* Registration warms the pages for the first transfer (the kernel reads a byte of each, common/
 * touch.h) and changes none of them: a pattern over several pages, an unaligned start and a
 * read-only range (with warming on; KVFERRY_NO_WARM is not set in the tests) read back intact. */
static void register_keeps_contents(void **state)
{
    fx_t *fx = *state;
    size_t len = 16 * fx->page;
    uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(m != MAP_FAILED);
    for (size_t i = 0; i < len; i++)
        m[i] = (uint8_t)(i * 131u + 7u);
    assert_kvf_ok(kvf_mem_register(fx->e, m + 3, len - 3));
    for (size_t i = 0; i < len; i++)
        if (m[i] != (uint8_t)(i * 131u + 7u))
            fail_msg("byte %zu changed by register: %u, want %u", i, m[i],
                     (uint8_t)(i * 131u + 7u));
    assert_kvf_ok(kvf_mem_unregister(fx->e, m + 3));
    assert_int_equal(mprotect(m, len, PROT_READ), 0);
    assert_kvf_ok(kvf_mem_register(fx->e, m, len));
    for (size_t i = 0; i < len; i++)
        if (m[i] != (uint8_t)(i * 131u + 7u))
            fail_msg("byte %zu of read-only memory changed: %u", i, m[i]);
    assert_kvf_ok(kvf_mem_unregister(fx->e, m));
    munmap(m, len);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(register_keeps_contents, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(register_range_with_hole_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(register_freed_memory_refused, fx_setup, fx_teardown),
    cmocka_unit_test_setup_teardown(register_read_only_memory_accepted, fx_setup, fx_teardown),
};

KVF_TEST_MAIN(tests)
