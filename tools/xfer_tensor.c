/*
 * The seed's tensor of `kvferry transfer`: a (10, 50, 40, 20, 60) float16 buffer registered with
 * the engine, the random values the Prefill fills it with, and the sums and checksums both sides
 * compute over its slices.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cli.h"
#include "transfer.h"

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        /* Zero or subnormal: mant * 2^-24, exact in float. */
        float v = (float)mant * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31)
        bits = sign | 0x7f800000u | (mant << 13); /* inf or NaN */
    else
        bits = sign | ((exp - 15u + 127u) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* float -> float16 for values that are exactly representable as normal float16 numbers, or 0. */
static uint16_t float_to_half_exact(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    if ((bits & 0x7fffffffu) == 0)
        return sign;
    uint32_t exp = (bits >> 23) & 0xffu;
    return (uint16_t)(sign | ((exp - 127u + 15u) << 10) | ((bits >> 13) & 0x3ffu));
}

/* Every float16 bit pattern as a float: summing 24 million halves by lookup is several times
 * faster than converting each one. */
static float half_table[65536];
/* The 1024 values (2k + 1)/1024 - 1, k = 0..1023: a uniform grid over (-1, 1), symmetric about
 * 0 (so slice sums stay near 0, like the seed's random tensors) and all exact in float16. */
static uint16_t fill_table[1024];

void xfer_tables_init(void)
{
    for (uint32_t h = 0; h < 65536u; h++)
        half_table[h] = half_to_float((uint16_t)h);
    for (uint32_t k = 0; k < 1024u; k++)
        fill_table[k] = float_to_half_exact((float)(2u * k + 1u) / 1024.0f - 1.0f);
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void xfer_fill_random_halves(void *buf, size_t n, uint64_t *seed)
{
    uint64_t *w = buf;
    for (size_t i = 0; i < n / 8; i++) {
        uint64_t r = splitmix64(seed);
        w[i] = (uint64_t)fill_table[r & 1023u] | (uint64_t)fill_table[(r >> 16) & 1023u] << 16 |
               (uint64_t)fill_table[(r >> 32) & 1023u] << 32 |
               (uint64_t)fill_table[(r >> 48) & 1023u] << 48;
    }
}

double xfer_sum_halves(const void *buf, size_t n)
{
    const uint16_t *h = buf;
    double sum = 0;
    for (size_t i = 0; i < n / 2; i++)
        sum += half_table[h[i]];
    return sum;
}

/* FNV-1a, 64-bit, fed 8-byte little-endian words instead of single bytes (then the tail bytes):
 * eight times fewer multiplies, and still every bit of every byte changes the result. */
uint64_t xfer_checksum(const void *buf, size_t n)
{
    const unsigned char *p = buf;
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, sizeof(w));
        h = (h ^ w) * 0x100000001b3ull;
    }
    for (; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* 48,000,000 bytes, page-aligned (64-byte alignment is all the seed's tensor promises) and
 * faulted in now, so that no round pays for first-touch page faults. */
static void *buffer_alloc(void)
{
    void *p = mmap(NULL, XFER_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    memset(p, 0, XFER_BYTES);
    return p;
}

int xfer_tensor_open(kvf_engine_t *e, xfer_tensor_t *t)
{
    t->buf = buffer_alloc();
    t->note = malloc(sizeof(*t->note));
    if (!t->buf || !t->note) {
        fprintf(stderr, "kvferry " XFER_CMD ": cannot allocate %zu bytes: %s\n", XFER_BYTES,
                strerror(errno));
        goto out_free;
    }
    int rc = kvf_mem_register(e, t->buf, XFER_BYTES);
    if (rc < 0) {
        kvf_cli_fail(XFER_CMD, rc, "register %zu bytes at %p", XFER_BYTES, t->buf);
        goto out_free;
    }
    return KVF_CLI_EXIT_OK;
out_free:
    free(t->note);
    if (t->buf)
        munmap(t->buf, XFER_BYTES);
    return KVF_CLI_EXIT_FAIL;
}

int xfer_tensor_close(kvf_engine_t *e, xfer_tensor_t *t, int code)
{
    int rc = kvf_mem_unregister(e, t->buf);
    if (rc < 0) {
        kvf_cli_fail(XFER_CMD, rc, "unregister %p", t->buf);
        code = KVF_CLI_EXIT_FAIL;
    }
    free(t->note);
    munmap(t->buf, XFER_BYTES);
    return code;
}
