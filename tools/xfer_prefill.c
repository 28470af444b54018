/*
 * The Prefill of `kvferry transfer` (the protocol is described in cmd_transfer.c): it finds the
 * Decode's buffer, writes each round into it slice by slice, and waits for the Decode to confirm
 * the round before overwriting it.
 */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "clock.h"
#include "progress.h"
#include "transfer.h"

/*
 * Find the Decode's 48,000,000-byte buffer among its published regions. kvf_peer_regions()
 * waits for the Decode's session to appear; its buffer follows within milliseconds (the Decode
 * registers right after it starts), which is the only gap the short retries below cover.
 */
static int find_decode_buffer(const xfer_args_t *a, kvf_engine_t *e, uint64_t *addr)
{
    uint64_t deadline = cli_now_ms() + a->timeout_ms;
    unsigned backoff_ms = 1;
    /* Say what is awaited when it is not there yet, rather than wait in silence. Waiting with
     * kvf_peer_wait() (not only in kvf_peer_regions() below) is what a Prefill does before it
     * transfers: the engine then opens the path to the Decode while the first round is being
     * prepared, not on that round's clock. */
    if (kvf_peer_wait(e, a->dst_sid, 0) < 0) {
        printf("waiting up to %u s for Decode %s to appear in the store %s\n",
               a->timeout_ms / 1000u, a->dst_sid, a->store_url);
        fflush(stdout);
        int rc = kvf_peer_wait(e, a->dst_sid, a->timeout_ms);
        if (rc < 0) {
            kvf_cli_fail(XFER_CMD, rc,
                         "Decode %s (--dst-session-id) did not appear in the store "
                         "within %u s",
                         a->dst_sid, a->timeout_ms / 1000u);
            return KVF_CLI_EXIT_FAIL;
        }
    }
    for (;;) {
        kvf_region_info_t *regs;
        size_t n;
        int rc = kvf_peer_regions(e, a->dst_sid, &regs, &n);
        if (rc < 0) {
            kvf_cli_fail(XFER_CMD, rc,
                         "Decode %s (--dst-session-id) did not appear in the store "
                         "within %u s",
                         a->dst_sid, a->timeout_ms / 1000u);
            return KVF_CLI_EXIT_FAIL;
        }
        /* The exact size first, else any region large enough. */
        bool found = false;
        for (size_t i = 0; i < n && !found; i++)
            if (regs[i].len == XFER_BYTES)
                *addr = regs[i].addr, found = true;
        for (size_t i = 0; i < n && !found; i++)
            if (regs[i].len > XFER_BYTES)
                *addr = regs[i].addr, found = true;
        free(regs);
        if (found)
            return 0;
        if (cli_now_ms() >= deadline) {
            fprintf(stderr,
                    "kvferry " XFER_CMD ": Decode %s has registered no region of %zu bytes "
                    "within %u s (%zu regions)\n",
                    a->dst_sid, XFER_BYTES, a->timeout_ms / 1000u, n);
            return KVF_CLI_EXIT_FAIL;
        }
        struct timespec ts = {0, (long)backoff_ms * 1000000L};
        nanosleep(&ts, NULL);
        if (backoff_ms < 50)
            backoff_ms *= 2;
    }
}

/* Wait for the Decode's acknowledgement of @round. Returns 0 or an exit code. */
static int prefill_wait_ack(const xfer_args_t *a, kvf_engine_t *e, kvf_notify_t *note,
                            uint64_t round)
{
    uint64_t deadline = cli_now_ms() + a->timeout_ms;
    for (;;) {
        uint64_t now = cli_now_ms();
        /* Fails at once (within ~1 s) if the Decode goes away: its acknowledgement would never
         * come. */
        int n = now < deadline ? kvf_notify_wait_peer(e, a->dst_sid, note, 1, (int)(deadline - now))
                               : 0;
        if (n == -KVF_EPEERGONE) {
            kvf_cli_fail(XFER_CMD, n, "Decode %s went away before it confirmed round %" PRIu64,
                         a->dst_sid, round);
            return KVF_CLI_EXIT_FAIL;
        }
        if (n < 0) {
            kvf_cli_fail(XFER_CMD, n, "waiting for Decode %s to confirm round %" PRIu64, a->dst_sid,
                         round);
            return KVF_CLI_EXIT_FAIL;
        }
        if (n == 0) {
            fprintf(stderr,
                    "kvferry " XFER_CMD ": Decode %s did not confirm round %" PRIu64
                    " within %u s\n",
                    a->dst_sid, round, a->timeout_ms / 1000u);
            return KVF_CLI_EXIT_FAIL;
        }
        uint64_t acked;
        char excerpt[64];
        if (xfer_ack_parse(note->msg, note->len, &acked) < 0) {
            /* Not the Decode's: nothing else is expected here, but nothing else should stop
             * the transfer either. */
            fprintf(stderr, "kvferry " XFER_CMD ": ignoring notification \"%s\" from %s\n",
                    xfer_note_excerpt(note, excerpt, sizeof(excerpt)), note->sender);
            continue;
        }
        if (acked != round) {
            fprintf(stderr,
                    "kvferry " XFER_CMD ": Decode %s acknowledged round %" PRIu64
                    ", want round %" PRIu64 "\n",
                    note->sender, acked, round);
            return KVF_CLI_EXIT_FAIL;
        }
        return 0;
    }
}

/* Cancel (if still running) and free @n batches. */
static void batches_free(kvf_batch_t **b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kvf_batch_free(b[i]);
}

/*
 * Write one round: each slice is its own batch carrying that slice's notification, so the
 * Decode can check slice i while later ones are still on their way. All ten are submitted at
 * once and run on the engine's async threads; notifications keep submission order. Returns 0,
 * or an exit code after a message.
 */
static int prefill_write_round(const xfer_args_t *a, kvf_engine_t *e, void *buf, uint64_t remote,
                               uint64_t round, const uint64_t *sums)
{
    kvf_batch_t *b[XFER_SLICES];
    size_t nb = 0;
    int rc;

    for (unsigned i = 0; i < XFER_SLICES; i++) {
        size_t off = (size_t)i * XFER_SLICE_BYTES;
        kvf_xfer_t x = {.op = KVF_OP_WRITE,
                        .local = (char *)buf + off,
                        .remote = remote + off,
                        .len = XFER_SLICE_BYTES};
        char msg[256];
        int len = xfer_slice_note_format(msg, sizeof(msg), round, i, sums[i]);
        rc = kvf_transfer_submit(e, a->dst_sid, &x, 1, msg, (size_t)len, &b[nb]);
        if (rc < 0) {
            kvf_cli_fail(XFER_CMD, rc, "round %" PRIu64 ": slice %u: write to %s", round, i,
                         a->dst_sid);
            goto out_free;
        }
        nb++;
    }
    for (unsigned i = 0; i < XFER_SLICES; i++) {
        rc = kvf_batch_wait(b[i], -1); /* bounded by op_timeout_ms (--timeout) */
        if (rc != KVF_BATCH_DONE) {
            kvf_cli_fail(XFER_CMD, rc < 0 ? rc : -KVF_ETIMEDOUT,
                         "round %" PRIu64 ": slice %u: "
                         "write to %s",
                         round, i, a->dst_sid);
            goto out_free;
        }
    }
    rc = 0;
out_free:
    batches_free(b, nb);
    return rc < 0 ? 1 : 0;
}

int xfer_prefill_run(const xfer_args_t *a, kvf_engine_t *e, const char *sid)
{
    uint64_t seed, remote;
    int code = KVF_CLI_EXIT_FAIL;
    xfer_tensor_t t;

    if (getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed))
        seed = cli_now_ns() ^ ((uint64_t)getpid() << 32);

    /* Registered like the seed's Prefill does; the engine also needs no more for a write. */
    if (xfer_tensor_open(e, &t) != 0)
        return KVF_CLI_EXIT_FAIL;
    void *buf = t.buf;
    kvf_notify_t *note = t.note;
    cli_progress_t pg = {.out = stdout}; /* started with the first round */
    printf("register success: %zu bytes at %p\n", XFER_BYTES, buf);
    printf(KVF_CLI_PREFILL_READY_FMT "\n", sid);

    if (find_decode_buffer(a, e, &remote) != 0)
        goto out_unregister;
    printf("decode %s: buffer of %zu bytes at 0x%" PRIx64 "\n", a->dst_sid, XFER_BYTES, remote);

    const char *corrupt_env = getenv(XFER_CORRUPT_ENV);
    long corrupt = corrupt_env && *corrupt_env ? strtol(corrupt_env, NULL, 10) : -1;
    uint64_t total_bytes = 0;
    double total_ms = 0;
    cli_progress_init(&pg, stdout, a->iterations, "rounds", (double)a->progress_s, a->verbose);
    for (uint64_t round = 1; a->iterations == 0 || round <= a->iterations; round++) {
        xfer_fill_random_halves(buf, XFER_BYTES, &seed);
        /* The slices' checksums (for the notifications) are computed before the clock starts:
         * hashing 48 MB takes longer than moving it. */
        uint64_t sums[XFER_SLICES];
        for (unsigned i = 0; i < XFER_SLICES; i++)
            sums[i] = xfer_checksum((char *)buf + (size_t)i * XFER_SLICE_BYTES, XFER_SLICE_BYTES);
        if (round == 1 && corrupt >= 0 && corrupt < (long)XFER_SLICES)
            ((unsigned char *)buf)[(size_t)corrupt * XFER_SLICE_BYTES + XFER_SLICE_BYTES / 2] ^= 1;
        uint64_t t0 = cli_now_ns();
        if (prefill_write_round(a, e, buf, remote, round, sums) != 0)
            goto out_unregister;
        double ms = (double)(cli_now_ns() - t0) / 1e6;
        const char *via;
        total_bytes += XFER_BYTES;
        total_ms += ms;
        if (!cli_progress_tick(&pg, round, total_bytes))
            goto ack;
        if (round == 1 && kvf_engine_peer_transport(e, a->dst_sid, &via) == 0)
            printf("transport to %s: %s\n", a->dst_sid, via);
        for (unsigned i = 0; a->verbose && i < XFER_SLICES; i++)
            printf("set buffer success %u, sum=%.4f\n", i,
                   xfer_sum_halves((char *)buf + (size_t)i * XFER_SLICE_BYTES, XFER_SLICE_BYTES));
        printf(KVF_CLI_PREFILL_ROUND_FMT "\n", round, XFER_BYTES, ms,
               (double)XFER_BYTES / (ms * 1e6));
    ack:

        xfer_no_ack_hook(round);
        /* The Decode checks each slice as its notification arrives; its buffer may be
         * overwritten only once it confirmed the whole round. */
        if (prefill_wait_ack(a, e, note, round) != 0)
            goto out_unregister;
    }
    cli_progress_clear(&pg);
    printf("prefill done: %" PRIu64 " rounds, %" PRIu64 " bytes in %.3f ms, %.2f GB/s\n",
           a->iterations, total_bytes, total_ms,
           total_ms > 0 ? (double)total_bytes / (total_ms * 1e6) : 0.0);
    code = KVF_CLI_EXIT_OK;
out_unregister:
    cli_progress_clear(&pg);
    return xfer_tensor_close(e, &t, code);
}
