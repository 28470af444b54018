/*
 * The Decode of `kvferry transfer` (the protocol is described in cmd_transfer.c): it registers
 * the tensor, announces itself, and checks every slice the moment its notification arrives.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "progress.h"
#include "transfer.h"

/* decode_wait_note()'s answer when the Prefill of the round in progress went away. */
#define DECODE_PREFILL_GONE 100

/*
 * Wait for the next notification. In forever mode (--iterations 0) the Decode waits for a
 * Prefill as long as it takes, like the seed; within a round, or with --iterations, a silence
 * longer than --timeout is an error. Within a round the Prefill (@from) is watched: if it goes
 * away, this returns DECODE_PREFILL_GONE at once in forever mode (after a line), or fails.
 * Returns 0 or an exit code.
 */
static int decode_wait_note(const xfer_args_t *a, kvf_engine_t *e, kvf_notify_t *note,
                            uint64_t round, unsigned next, const char *from)
{
    for (;;) {
        int n = next ? kvf_notify_wait_peer(e, from, note, 1, (int)a->timeout_ms)
                     : kvf_notify_wait(e, note, 1, (int)a->timeout_ms);
        if (n == 1)
            return 0;
        if (n == -KVF_EPEERGONE && a->iterations == 0) {
            fprintf(stderr,
                    "kvferry " XFER_CMD ": round %" PRIu64 " from %s stopped after %u of %u "
                    "slices: %s; waiting for the next Prefill\n",
                    round, from, next, XFER_SLICES, kvf_last_error());
            return DECODE_PREFILL_GONE;
        }
        if (n == -KVF_EPEERGONE) {
            kvf_cli_fail(XFER_CMD, n,
                         "round %" PRIu64 ": the Prefill %s went away after %u of %u "
                         "slices",
                         round, from, next, XFER_SLICES);
            return KVF_CLI_EXIT_FAIL;
        }
        if (n < 0) {
            kvf_cli_fail(XFER_CMD, n, "waiting for the Prefill's notifications");
            return KVF_CLI_EXIT_FAIL;
        }
        if (next == 0 && a->iterations == 0)
            continue;
        if (next == 0)
            fprintf(stderr, "kvferry " XFER_CMD ": no Prefill wrote to this Decode within %u s\n",
                    a->timeout_ms / 1000u);
        else
            fprintf(stderr,
                    "kvferry " XFER_CMD ": round %" PRIu64 ": slice %u from %s did not "
                    "arrive within %u s\n",
                    round, next, from, a->timeout_ms / 1000u);
        return KVF_CLI_EXIT_FAIL;
    }
}

int xfer_decode_run(const xfer_args_t *a, kvf_engine_t *e, const char *sid)
{
    int code = KVF_CLI_EXIT_FAIL, rc;
    xfer_tensor_t t;

    if (xfer_tensor_open(e, &t) != 0)
        return KVF_CLI_EXIT_FAIL;
    void *buf = t.buf;
    kvf_notify_t *note = t.note;
    printf("register success: %zu bytes at %p, %u slices of %u bytes (float16 (10, 50, 40, 20, "
           "60))\n",
           XFER_BYTES, buf, XFER_SLICES, XFER_SLICE_BYTES);
    printf(KVF_CLI_DECODE_READY_FMT "\n", sid);
    cli_progress_t pg;
    cli_progress_init(&pg, stdout, a->iterations, "rounds verified", (double)a->progress_s,
                      a->verbose);

    /* Each slice is checked the moment its notification arrives: the engine delivers it only
     * once every byte of that slice is in this buffer, and the Prefill writes the next round
     * only after this Decode's acknowledgement. */
    char from[KVF_SESSION_ID_MAX] = "";
    uint64_t round = 0;
    unsigned next = 0; /* the slice expected next; 0 between rounds */
    for (uint64_t done = 0; a->iterations == 0 || done < a->iterations;) {
        xfer_slice_note_t s;
        char err[160], excerpt[64];

        int w = decode_wait_note(a, e, note, round, next, from);
        if (w == DECODE_PREFILL_GONE) {
            next = 0;
            continue;
        }
        if (w != 0)
            goto out_unregister;
        if (xfer_slice_note_parse(note->msg, note->len, &s, err, sizeof(err)) < 0) {
            fprintf(stderr, "kvferry " XFER_CMD ": bad slice notification from %s (\"%s\"): %s\n",
                    note->sender, xfer_note_excerpt(note, excerpt, sizeof(excerpt)), err);
            goto out_unregister;
        }
        if (s.slice == 0) {
            /* A new round; one left incomplete means its Prefill went away (a batch that
             * fails never notifies), and a restarted one begins again. */
            if (next != 0)
                fprintf(stderr,
                        "kvferry " XFER_CMD ": round %" PRIu64 " from %s stopped after %u of "
                        "%u slices; round %" PRIu64 " from %s begins\n",
                        round, from, next, XFER_SLICES, s.round, note->sender);
            round = s.round;
            snprintf(from, sizeof(from), "%s", note->sender);
            if (a->verbose || done == 0)
                printf("round %" PRIu64 ": %zu bytes from %s\n", round, XFER_BYTES, from);
        } else if (s.slice != next || s.round != round || strcmp(note->sender, from) != 0) {
            fprintf(stderr,
                    "kvferry " XFER_CMD ": slice %u of round %" PRIu64 " from %s arrived, "
                    "want slice %u of round %" PRIu64 " from %s\n",
                    s.slice, s.round, note->sender, next, round, from);
            goto out_unregister;
        }
        const char *slice = (const char *)buf + (size_t)s.slice * XFER_SLICE_BYTES;
        if (a->verbose)
            printf("get buffer success %u, sum=%.4f\n", s.slice,
                   xfer_sum_halves(slice, XFER_SLICE_BYTES));
        uint64_t got = xfer_checksum(slice, XFER_SLICE_BYTES);
        if (got != s.checksum) {
            fprintf(stderr,
                    "kvferry " XFER_CMD ": round %" PRIu64 ": slice %u (bytes %zu..%zu) "
                    "differs from what the Prefill sent: checksum %016" PRIx64 ", want %016" PRIx64
                    "\n",
                    round, s.slice, (size_t)s.slice * XFER_SLICE_BYTES,
                    (size_t)(s.slice + 1) * XFER_SLICE_BYTES - 1, got, s.checksum);
            goto out_unregister;
        }
        if (++next < XFER_SLICES)
            continue;
        next = 0;
        done++;
        if (cli_progress_tick(&pg, done, done * XFER_BYTES))
            printf(KVF_CLI_DECODE_VERIFIED_FMT "\n", round, XFER_SLICES, XFER_BYTES);

        xfer_no_ack_hook(round);
        char ack[48];
        int len = snprintf(ack, sizeof(ack), "{\"ack\":%" PRIu64 "}", round);
        rc = kvf_notify_send(e, from, ack, (size_t)len);
        if (rc < 0 && a->iterations == 0) {
            /* Serving for ever, like a server: a Prefill that went away (interrupted, or done
             * with us) costs its acknowledgement, not the Decode. The round was verified. */
            fprintf(stderr,
                    "kvferry " XFER_CMD ": could not acknowledge round %" PRIu64 " to %s (%s: "
                    "%s); waiting for the next Prefill\n",
                    round, from, kvf_err_name(rc), kvf_last_error());
            continue;
        }
        if (rc < 0) {
            kvf_cli_fail(XFER_CMD, rc, "acknowledging round %" PRIu64 " to %s", round, from);
            goto out_unregister;
        }
    }
    cli_progress_clear(&pg);
    printf("decode done: %" PRIu64 " rounds verified\n", a->iterations);
    code = KVF_CLI_EXIT_OK;
out_unregister:
    cli_progress_clear(&pg);
    return xfer_tensor_close(e, &t, code);
}
