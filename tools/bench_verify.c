/* The check after each timed run of `kvferry bench`: a fresh pattern, compared where it landed. */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

#include "bench_run.h"

/* After the timed part: one more call per thread with a pattern no earlier call carried, then a
 * sample of its blocks compared where they landed. Returns the number of blocks checked, or -1
 * with the reason in @err. */
int bench_verify_run(bench_t *b, const bench_layout_t *l, char *err, size_t errlen)
{
    uint64_t seed = 0x5eed0000u + ++b->run_no;
    bool spread = l->n > BENCH_VERIFY_BLOCKS; /* else every block is checked */
    json_t *blocks = json_array();
    int checked = 0, rc = 0;
    kvf_xfer_t *x = calloc(l->n, sizeof(*x));

    if (!x || !blocks) {
        snprintf(err, errlen, "out of memory");
        rc = -1;
        goto out;
    }
    for (unsigned t = 0; t < b->a.threads; t++) {
        for (size_t k = 0; k < BENCH_VERIFY_BLOCKS && k < l->n; k++) {
            size_t i = spread ? k * (l->n - 1) / (BENCH_VERIFY_BLOCKS - 1) : k;
            json_array_append_new(blocks, json_pack("[i,I,I,I]", (int)t, (json_int_t)i,
                                                    (json_int_t)(b->base_off + t * b->slice +
                                                                 l->off[i]),
                                                    (json_int_t)l->len[i]));
        }
    }
    if (b->a.op == KVF_OP_READ && bench_target_request(b, "fill", seed, blocks, err, errlen) < 0) {
        rc = -1;
        goto out;
    }
    for (unsigned t = 0; t < b->a.threads; t++) {
        uint8_t *local = b->local + t * b->slice;
        for (size_t i = 0; i < l->n; i++) {
            if (b->a.op == KVF_OP_WRITE)
                bench_pattern_fill(local + l->off[i], b->base_off + t * b->slice + l->off[i],
                                   l->len[i], seed);
            x[i] = (kvf_xfer_t){.op = b->a.op,
                                .local = local + l->off[i],
                                .remote = b->target_addr + b->base_off + t * b->slice + l->off[i],
                                .len = l->len[i]};
        }
        int r = kvf_transfer_sync(b->e, b->peer, x, l->n);
        if (r < 0) {
            snprintf(err, errlen, "the verification call of thread %u: %s (%s)", t,
                     kvf_last_error(), kvf_err_name(r));
            rc = -1;
            goto out;
        }
    }
    if (b->a.op == KVF_OP_WRITE) {
        if (bench_target_request(b, "verify", seed, blocks, err, errlen) < 0) {
            rc = -1;
            goto out;
        }
    } else {
        size_t idx;
        json_t *blk;
        json_array_foreach(blocks, idx, blk)
        {
            json_int_t t = json_integer_value(json_array_get(blk, 0));
            json_int_t i = json_integer_value(json_array_get(blk, 1));
            uint64_t off = (uint64_t)json_integer_value(json_array_get(blk, 2));
            uint8_t got, want;
            ssize_t bad = bench_pattern_check(b->local + (off - b->base_off), off, l->len[i], seed,
                                              &got, &want);
            if (bad >= 0) {
                snprintf(err, errlen,
                         "thread %lld block %lld (target offset %" PRIu64 ", %zu bytes): byte %zd "
                         "is 0x%02x, want 0x%02x",
                         (long long)t, (long long)i, off, l->len[i], bad, got, want);
                rc = -1;
                goto out;
            }
        }
    }
    checked = (int)json_array_size(blocks);
out:
    json_decref(blocks);
    free(x);
    return rc < 0 ? -1 : checked;
}
