/*
 * Fuzz targets for every parser of untrusted bytes: the tcp transfer protocol's target side, the
 * config store server, peers' records and the URL / session-id parsers, and the authentication
 * handshake read before a peer proved the key.
 *
 * Each target defines LLVMFuzzerTestOneInput() and kvf_fuzz_seeds(). Built with clang and
 * -fsanitize=fuzzer (cmake -DKVF_FUZZ=ON, `make fuzz`) it is a libFuzzer binary; otherwise it is
 * linked with driver.c, which feeds it its seeds and a bounded number of seeded random mutations
 * of them, so `make test` (and the ASan+UBSan build) exercises every target on every run.
 * A target aborts (with a message) when an invariant breaks: bytes written outside a registered
 * region, a server that stopped serving, a parser that accepted what it must refuse.
 */
#ifndef KVF_FUZZ_H
#define KVF_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Hand @add the target's seed inputs: well-formed messages that reach the interesting paths. */
typedef void (*kvf_fuzz_add_fn)(const uint8_t *data, size_t size);
void kvf_fuzz_seeds(kvf_fuzz_add_fn add);

/* After the last input (driver only): check the target still works; returns 0 or prints why and
 * returns 1. */
int kvf_fuzz_final(void);

/* Abort with a message: an invariant broke. */
#define KVF_FUZZ_CHECK(cond, ...)                                                                 \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "fuzz: invariant broken: " __VA_ARGS__);                              \
            fputc('\n', stderr);                                                                  \
            abort();                                                                              \
        }                                                                                         \
    } while (0)

#endif /* KVF_FUZZ_H */
