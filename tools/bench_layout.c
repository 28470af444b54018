/*
 * The layouts of `kvferry bench`: the blocks of one call, at offsets inside a span, and how many
 * spans a thread's slice holds so that consecutive calls cycle through --working-set bytes.
 */
#include "bench_run.h"

static size_t page_up(size_t n)
{
    return (n + BENCH_PAGE - 1) & ~(size_t)(BENCH_PAGE - 1);
}

static void layout_finish(bench_layout_t *l, size_t end, size_t working_set)
{
    l->span = page_up(end);
    l->copies = working_set > l->span ? working_set / l->span : 1;
}

void bench_layout_blocks(bench_layout_t *l, size_t block, size_t batch, size_t working_set)
{
    l->n = batch;
    for (size_t i = 0; i < batch; i++) {
        l->off[i] = i * block;
        l->len[i] = block;
    }
    l->bytes = block * batch;
    layout_finish(l, l->bytes, working_set);
}

/* The DeepSeek-R1 per-layer layout: per layer a 128 KiB and a 16 KiB block, each page-aligned
 * with a page of gap after it, so no two blocks are adjacent and none can be merged. */
void bench_layout_kv(bench_layout_t *l, size_t working_set)
{
    size_t pos = 0;
    l->n = 0;
    l->bytes = 0;
    for (unsigned layer = 0; layer < BENCH_KV_LAYERS; layer++) {
        for (unsigned k = 0; k < 2; k++) {
            size_t len = k ? BENCH_KV_SMALL : BENCH_KV_BIG;
            l->off[l->n] = pos;
            l->len[l->n++] = len;
            l->bytes += len;
            pos = page_up(pos + len) + BENCH_PAGE;
        }
    }
    layout_finish(l, pos, working_set);
}

void bench_layout_pages(bench_layout_t *l, size_t working_set)
{
    size_t pos = 0;
    l->n = 0;
    l->bytes = 0;
    for (unsigned layer = 0; layer < BENCH_KV_LAYERS; layer++) {
        for (unsigned page = 0; page < 2 * BENCH_PAGES_PER_LAYER; page++) {
            l->off[l->n] = pos;
            l->len[l->n++] = BENCH_PAGE_BYTES;
            l->bytes += BENCH_PAGE_BYTES;
            pos += BENCH_PAGE_BYTES + BENCH_PAGE;
        }
    }
    layout_finish(l, pos, working_set);
}

const char *bench_workload_name(bench_workload_t w)
{
    return w == BENCH_WL_KV ? "kv" : w == BENCH_WL_PAGES ? "pages" : "blocks";
}

size_t bench_layout_slice(const bench_layout_t *l)
{
    return l->span * l->copies;
}
