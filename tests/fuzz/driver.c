/*
 * The fuzz driver for builds without libFuzzer: runs a target on its seeds and on seeded random
 * mutations of them (bit flips, byte sets to boundary values, inserted, deleted and repeated
 * runs, splices of two seeds, little-endian length fields set to edge values), bounded by a
 * count and a time limit, and replays files given on the command line (a crash found by
 * libFuzzer, for instance).
 *
 *   fuzz_<target> [--runs N] [--seconds S] [--min-runs M] [--seed X] [--write-seeds DIR] [FILE...]
 *
 * The seed differs on every run (time and pid) unless --seed or $KVF_FUZZ_SEED gives it; it is
 * printed first and again when the target aborts, so a failure can be replayed with it. A run
 * the time limit stopped before --min-runs inputs fails: a slow build must not pass on a handful.
 */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fuzz.h"

#define MAX_SEEDS 64
#define MAX_INPUT (64u << 10)

static uint8_t *seeds[MAX_SEEDS];
static size_t seed_len[MAX_SEEDS];
static size_t nseeds;

static void add_seed(const uint8_t *d, size_t n)
{
    if (nseeds == MAX_SEEDS || n > MAX_INPUT)
        return;
    seeds[nseeds] = malloc(n ? n : 1);
    if (!seeds[nseeds])
        return;
    memcpy(seeds[nseeds], d, n);
    seed_len[nseeds++] = n;
}

static uint64_t rng;
static char seed_line[96]; /* "fuzz: seed 0x... (replay with --seed 0x...)\n" */

/* On abort (an invariant, a sanitizer): the seed again, next to the message. */
static void on_abort(int sig)
{
    ssize_t w = write(2, seed_line, strlen(seed_line));
    (void)w;
    signal(sig, SIG_DFL);
    raise(sig);
}

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static size_t below(size_t n)
{
    return n ? (size_t)(next() % n) : 0;
}

/* One mutation of @b (length *@n, room MAX_INPUT). */
static void mutate(uint8_t *b, size_t *n)
{
    static const uint64_t edges[] = {0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x10000, 0x7fffffff,
                                     0x80000000u, 0xffffffffu, 4096, 4097, 65536, 1u << 26,
                                     (1u << 26) + 1, UINT64_MAX, UINT64_MAX / 2};
    switch (next() % 7) {
    case 0: /* flip a bit */
        if (*n)
            b[below(*n)] ^= (uint8_t)(1u << (next() % 8));
        break;
    case 1: /* a byte to a boundary value */
        if (*n)
            b[below(*n)] = (uint8_t)edges[below(5)];
        break;
    case 2: /* an 8- or 4-byte little-endian field to an edge value */
        if (*n >= 8) {
            size_t at = below(*n - 7);
            uint64_t v = edges[below(sizeof(edges) / sizeof(edges[0]))];
            size_t w = next() % 2 ? 8 : 4;
            for (size_t i = 0; i < w; i++)
                b[at + i] = (uint8_t)(v >> (8 * i));
        }
        break;
    case 3: /* delete a run */
        if (*n) {
            size_t at = below(*n), len = 1 + below(*n - at);
            if (len > 64)
                len = 1 + below(64);
            if (at + len > *n)
                len = *n - at;
            memmove(b + at, b + at + len, *n - at - len);
            *n -= len;
        }
        break;
    case 4: /* insert random bytes */
    {
        size_t len = 1 + below(32);
        if (*n + len <= MAX_INPUT) {
            size_t at = below(*n + 1);
            memmove(b + at + len, b + at, *n - at);
            for (size_t i = 0; i < len; i++)
                b[at + i] = (uint8_t)next();
            *n += len;
        }
        break;
    }
    case 5: /* repeat a run (a second frame, pipelined) */
        if (*n) {
            size_t at = below(*n), len = 1 + below(*n - at);
            if (*n + len <= MAX_INPUT) {
                memmove(b + *n, b + at, len);
                *n += len;
            }
        }
        break;
    default: /* splice another seed on the end */
        if (nseeds) {
            size_t s = below(nseeds);
            if (*n + seed_len[s] <= MAX_INPUT) {
                memcpy(b + *n, seeds[s], seed_len[s]);
                *n += seed_len[s];
            }
        }
        break;
    }
}

static int replay(const char *path, uint8_t *buf)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fuzz: %s: %s\n", path, strerror(errno));
        return 1;
    }
    size_t n = fread(buf, 1, MAX_INPUT, f);
    fclose(f);
    LLVMFuzzerTestOneInput(buf, n);
    printf("fuzz: replayed %s (%zu bytes)\n", path, n);
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    unsigned long runs = 2000, min_runs = 0;
    double seconds = 20;
    const char *dump = NULL;
    const char *env_seed = getenv("KVF_FUZZ_SEED");
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    rng = env_seed && *env_seed ? strtoull(env_seed, NULL, 0)
                                : ((uint64_t)now.tv_sec * 1000000007ull) ^ (uint64_t)now.tv_nsec ^
                                      ((uint64_t)getpid() << 40);
    int first_file = argc;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--min-runs") && i + 1 < argc)
            min_runs = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            rng = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--write-seeds") && i + 1 < argc)
            dump = argv[++i];
        else if (argv[i][0] == '-') {
            fprintf(stderr, "usage: %s [--runs N] [--seconds S] [--min-runs M] [--seed X] "
                            "[--write-seeds DIR] [FILE...]\n",
                    argv[0]);
            return 2;
        } else {
            first_file = i;
            break;
        }
    }
    rng |= 1; /* xorshift never leaves 0 */
    snprintf(seed_line, sizeof(seed_line), "fuzz: seed 0x%016llx (replay with --seed 0x%016llx)\n",
             (unsigned long long)rng, (unsigned long long)rng);
    signal(SIGABRT, on_abort);
    uint8_t *buf = malloc(2 * MAX_INPUT);
    if (!buf)
        return 1;
    kvf_fuzz_seeds(add_seed);
    if (dump) {
        for (size_t s = 0; s < nseeds; s++) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/seed-%02zu", dump, s);
            FILE *f = fopen(path, "wb");
            if (!f || fwrite(seeds[s], 1, seed_len[s], f) != seed_len[s]) {
                fprintf(stderr, "fuzz: %s: %s\n", path, strerror(errno));
                return 1;
            }
            fclose(f);
        }
        printf("fuzz: wrote %zu seeds to %s\n", nseeds, dump);
        return 0;
    }
    if (first_file < argc) {
        for (int i = first_file; i < argc; i++)
            if (replay(argv[i], buf))
                return 1;
        return kvf_fuzz_final();
    }

    fputs(seed_line, stdout);
    fflush(stdout);
    double t0 = now_s();
    unsigned long done = 0;
    for (size_t s = 0; s < nseeds; s++, done++)
        LLVMFuzzerTestOneInput(seeds[s], seed_len[s]);
    while (done < runs && now_s() - t0 < seconds && nseeds) {
        size_t s = below(nseeds), n = seed_len[s];
        memcpy(buf, seeds[s], n);
        for (unsigned m = 1 + (unsigned)below(4); m > 0; m--)
            mutate(buf, &n);
        LLVMFuzzerTestOneInput(buf, n);
        done++;
    }
    printf("fuzz: %lu inputs (%zu seeds) in %.1f s\n", done, nseeds, now_s() - t0);
    int rc = kvf_fuzz_final();
    if (rc != 0)
        fputs(seed_line, stderr);
    if (done < min_runs && done < runs) {
        fprintf(stderr, "fuzz: only %lu inputs within the %.1f s limit, want at least %lu\n",
                done, seconds, min_runs);
        rc = 1;
    }
    for (size_t s = 0; s < nseeds; s++)
        free(seeds[s]);
    free(buf);
    return rc;
}
