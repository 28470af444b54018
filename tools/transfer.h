/*
 * `kvferry transfer`: the parts shared by its files.
 *
 *   cmd_transfer.c   flags, and the run: store, engine, then the Decode or the Prefill
 *   xfer_store.c     reaching the config store (or serving it, as the seed's Prefill does)
 *   xfer_tensor.c    the seed's tensor: its buffer, random float16 values, sums and checksums
 *   xfer_note.c      the notifications the two sides exchange, written and checked
 *   xfer_decode.c    the Decode: receives and verifies each round
 *   xfer_prefill.c   the Prefill: writes each round and waits for its acknowledgement
 *
 * The protocol between the two sides is described at the top of cmd_transfer.c.
 */
#ifndef KVF_CLI_TRANSFER_H
#define KVF_CLI_TRANSFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvferry.h"

#define XFER_CMD "transfer"

/* The seed's tensor: shape (10, 50, 40, 20, 60), float16. */
#define XFER_SLICES      10u
#define XFER_SLICE_ELEMS (50u * 40u * 20u * 60u)
#define XFER_SLICE_BYTES (XFER_SLICE_ELEMS * 2u)
#define XFER_BYTES       ((size_t)XFER_SLICES * XFER_SLICE_BYTES)

/* A test hook only: when set to a slice number, the Prefill flips one byte of that slice in round
 * 1 after computing its checksum, so that tests can see the Decode catch a corrupt slice. */
#define XFER_CORRUPT_ENV "KVFERRY_TRANSFER_TEST_CORRUPT"
/* A test hook only: when set (non-empty), the node kills itself (SIGKILL) at the acknowledgement
 * of its first round, as one interrupted then would: the Prefill right after its last slice, the
 * Decode instead of sending the acknowledgement. */
#define XFER_NO_ACK_ENV "KVFERRY_TRANSFER_TEST_NO_ACK"

#define XFER_KEY_MAX       (KVF_SESSION_ID_MAX + 192) /* a 128-byte prefix, the namespace */
#define XFER_MAX_TIMEOUT_S 3600u /* an hour, the longest wait the store allows */
#define XFER_HASH_NAME     "fnv1a64w"
/* Bound on the Prefill's wait for the Decode's engine to withdraw its records before the store
 * this process hosts goes away with it. */
#define XFER_STORE_LINGER_MS 3000u
/* Default longest gap between two round lines (--progress-interval). */
#define XFER_PROGRESS_S 10u

typedef struct {
    kvf_role_t role;
    const char *store_url;
    bool store_is_tcp;                   /* a built-in store (tcp://) */
    char store_host[KVF_SESSION_ID_MAX]; /* the store URL's (first) host */
    char src_sid[KVF_SESSION_ID_MAX];
    char dst_sid[KVF_SESSION_ID_MAX]; /* "" for the Decode */
    int npu_id;
    uint64_t iterations; /* 0 = forever */
    uint32_t timeout_ms;
    kvf_transport_kind_t transport;
    const char *metrics_listen; /* --metrics-listen, or NULL */
    const char *key_prefix;     /* --key-prefix, or NULL (the engine's default) */
    bool verbose;               /* -v: every slice's and every round's line */
    uint64_t progress_s;        /* --progress-interval: the longest gap between round lines */
} xfer_args_t;

/* ---- xfer_store.c ------------------------------------------------------------------------ */

/* Connect to the store; a Prefill that finds nothing at a local --store-url serves it itself and
 * *@srv receives that server. Returns 0 or an exit code after a message. */
int xfer_store_connect(const xfer_args_t *a, kvf_store_t **st, kvf_store_server_t **srv);

/* Wait up to @ms for @key to be deleted. Best effort: used only to let the Decode withdraw its
 * records before the store hosted by this Prefill goes away. */
void xfer_wait_key_gone(kvf_store_t *st, const char *key, uint32_t ms);

/* ---- xfer_tensor.c ----------------------------------------------------------------------- */

/* The tensor's buffer, registered with the engine, and room for one notification. */
typedef struct {
    void *buf;          /* XFER_BYTES */
    kvf_notify_t *note; /* where notifications are received */
} xfer_tensor_t;

/* Fill the float16 lookup tables; once, before anything below. */
void xfer_tables_init(void);

/* Allocate the buffer (faulted in) and the notification, and register the buffer with @e.
 * Returns 0, or 1 after a message with nothing left allocated. */
int xfer_tensor_open(kvf_engine_t *e, xfer_tensor_t *t);

/* Unregister and free. Returns @code, or 1 after a message when unregistering failed. */
int xfer_tensor_close(kvf_engine_t *e, xfer_tensor_t *t, int code);

/* Fill @n bytes (a multiple of 8, 8-byte aligned) with random finite float16 values. */
void xfer_fill_random_halves(void *buf, size_t n, uint64_t *seed);

/* The sum of the @n / 2 float16 values at @buf. */
double xfer_sum_halves(const void *buf, size_t n);

/* FNV-1a over 8-byte words (XFER_HASH_NAME) of @n bytes. */
uint64_t xfer_checksum(const void *buf, size_t n);

/* ---- xfer_note.c ------------------------------------------------------------------------- */

/* The XFER_NO_ACK_ENV test hook: when it is set, say so and SIGKILL this process (at the
 * acknowledgement of @round). */
void xfer_no_ack_hook(uint64_t round);

/* A slice notification, parsed. */
typedef struct {
    uint64_t round;
    unsigned slice;
    uint64_t checksum;
} xfer_slice_note_t;

/* Write the notification of slice @slice of @round; returns its length, as snprintf() does. */
int xfer_slice_note_format(char *buf, size_t len, uint64_t round, unsigned slice,
                           uint64_t checksum);

/* Parse a slice notification. Returns 0 or -1 with a message in @err. */
int xfer_slice_note_parse(const unsigned char *msg, size_t len, xfer_slice_note_t *s, char *err,
                          size_t errlen);

/* Parse an acknowledgement {"ack": r}. Returns 0 or -1. */
int xfer_ack_parse(const unsigned char *msg, size_t len, uint64_t *round);

/* The first @max bytes of a notification, for a message: printable ASCII, others as '.'. */
const char *xfer_note_excerpt(const kvf_notify_t *n, char *buf, size_t max);

/* ---- xfer_decode.c, xfer_prefill.c ------------------------------------------------------- */

/* Run the node as engine @e, known as @sid. Return the exit code. */
int xfer_decode_run(const xfer_args_t *a, kvf_engine_t *e, const char *sid);
int xfer_prefill_run(const xfer_args_t *a, kvf_engine_t *e, const char *sid);

#endif /* KVF_CLI_TRANSFER_H */
