/*
 * The sort `kvferry bench` uses for its latency samples (tools/bench_sort.c): it orders them as
 * qsort() does, and it leaves nothing on the heap. The second is what the bench's memory report
 * relies on: with glibc's qsort() the temporary array of a run's samples stayed resident (8 MiB
 * over a --baseline run) and was counted as the engine's memory.
 */
#include "test_util.h"

#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

/* A run keeps up to 2^20 samples per thread (BENCH_LAT_MAX). */
#define N_BIG (1u << 20)

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Samples shaped like latencies (many equal, a few huge), and full 64-bit values. */
static void orders_as_qsort(void **state)
{
    (void)state;
    static const size_t sizes[] = {0, 1, 2, 3, 255, 256, 257, 10000, 100003};
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
        for (int shape = 0; shape < 4; shape++) {
            size_t n = sizes[s];
            uint64_t *a = malloc((n ? n : 1) * sizeof(uint64_t));
            uint64_t *b = malloc((n ? n : 1) * sizeof(uint64_t));
            assert_non_null(a);
            assert_non_null(b);
            for (size_t i = 0; i < n; i++) {
                uint64_t v = next();
                if (shape == 0)
                    v = 4000 + v % 64; /* ns of a 4 KiB copy: few distinct values */
                else if (shape == 1)
                    v = v % 16 == 0 ? v % 300000000000ull : 50000 + v % 5000; /* outliers */
                else if (shape == 2)
                    v = n - i; /* descending */
                a[i] = b[i] = v;
            }
            assert_int_equal(bench_sort_u64(a, n), 0);
            qsort(b, n, sizeof(uint64_t), cmp);
            if (n && memcmp(a, b, n * sizeof(uint64_t)) != 0) {
                for (size_t i = 0; i < n; i++)
                    if (a[i] != b[i])
                        fail_msg("n %zu shape %d: [%zu] = %llu, want %llu", n, shape, i,
                                 (unsigned long long)a[i], (unsigned long long)b[i]);
            }
            free(a);
            free(b);
        }
    }
}

/* Two runs' worth of samples sorted one after the other, the second a little smaller (as the
 * next repetition's): afterwards the heap holds no more than it did. qsort() fails this on
 * glibc: it mallocs the first temporary array with mmap, and freeing it raises the mmap and trim
 * thresholds, so the second comes from the heap and stays there, 8 MiB. */
static void leaves_nothing_on_the_heap(void **state)
{
    (void)state;
    if (KVF_TEST_SANITIZED)
        kvf_test_skip("ASan's allocator is not glibc's; mallinfo2() does not describe it");
    uint64_t *a = malloc(N_BIG * sizeof(uint64_t));
    assert_non_null(a);
    struct mallinfo2 m0 = mallinfo2();
    for (int round = 0; round < 3; round++) {
        size_t n = N_BIG - (size_t)round * 1000u;
        for (size_t i = 0; i < n; i++)
            a[i] = 1000 + next() % 1000000;
        assert_int_equal(bench_sort_u64(a, n), 0);
        for (size_t i = 1; i < n; i++)
            if (a[i - 1] > a[i])
                fail_msg("round %d: [%zu] %llu > [%zu] %llu", round, i - 1,
                         (unsigned long long)a[i - 1], i, (unsigned long long)a[i]);
    }
    struct mallinfo2 m1 = mallinfo2();
    free(a);
    /* arena: bytes the heap took from the system; hblkhd: bytes in mmapped blocks in use. */
    size_t before = m0.arena + m0.hblkhd, after = m1.arena + m1.hblkhd;
    if (after > before + (256u << 10))
        fail_msg("the heap grew from %zu to %zu bytes (arena %zu -> %zu, mmapped %zu -> %zu)",
                 before, after, m0.arena, m1.arena, m0.hblkhd, m1.hblkhd);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(orders_as_qsort),
        cmocka_unit_test(leaves_nothing_on_the_heap),
    };
    return KVF_TEST_RUN(tests, argc, argv);
}
