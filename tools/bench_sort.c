/*
 * Sorting `kvferry bench`'s latency samples without the heap.
 *
 * glibc's qsort() mallocs a temporary array as large as the samples (8 MiB for a run's 2^20).
 * Freeing the first such block, which malloc had mmapped, raises glibc's mmap threshold to its
 * size, so the next one comes from the heap, and its trim threshold (twice that) keeps it
 * resident after free(): the initiator's RSS grew by 8 MiB over a --baseline run (whose memcpy
 * baseline fills the sample arrays), counted as the engine's memory. This sorts in a scratch
 * array mapped for the call and unmapped after, so nothing of it stays in the process.
 */
#include <string.h>
#include <sys/mman.h>

#include "bench.h"

/* LSD radix sort, a byte per pass; a pass whose byte is the same in every sample (the high
 * bytes of nanosecond latencies) is skipped. */
int bench_sort_u64(uint64_t *a, size_t n)
{
    if (n < 2)
        return 0;
    uint64_t *tmp =
        mmap(NULL, n * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tmp == MAP_FAILED)
        return -1;
    uint64_t *src = a, *dst = tmp;
    for (unsigned shift = 0; shift < 64; shift += 8) {
        size_t count[256] = {0};
        for (size_t i = 0; i < n; i++)
            count[(src[i] >> shift) & 0xffu]++;
        if (count[(src[0] >> shift) & 0xffu] == n)
            continue;
        size_t pos = 0;
        for (unsigned d = 0; d < 256; d++) {
            size_t c = count[d];
            count[d] = pos;
            pos += c;
        }
        for (size_t i = 0; i < n; i++)
            dst[count[(src[i] >> shift) & 0xffu]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof(uint64_t));
    munmap(tmp, n * sizeof(uint64_t));
    return 0;
}
