/*
 * The notifications of `kvferry transfer` (see cmd_transfer.c): the Prefill's announcement of
 * each slice and the Decode's acknowledgement of each round, written and parsed. They are input
 * from another process, so every field is checked.
 */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>

#include "transfer.h"

int xfer_slice_note_format(char *buf, size_t len, uint64_t round, unsigned slice, uint64_t checksum)
{
    return snprintf(buf, len,
                    "{\"round\":%" PRIu64 ",\"slice\":%u,\"slices\":%u,\"bytes\":%u,"
                    "\"hash\":\"" XFER_HASH_NAME "\",\"checksum\":\"%016" PRIx64 "\"}",
                    round, slice, XFER_SLICES, XFER_SLICE_BYTES, checksum);
}

/* Parse a slice notification. Returns 0 or -1 with a message in @err. Notifications are input
 * from another process: every field is checked. */
int xfer_slice_note_parse(const unsigned char *msg, size_t len, xfer_slice_note_t *s, char *err,
                          size_t errlen)
{
    json_error_t je;
    json_t *root = json_loadb((const char *)msg, len, 0, &je);
    int rc = -1;
    if (!root) {
        snprintf(err, errlen, "not JSON: %.100s", je.text);
        return -1;
    }
    json_t *r = json_object_get(root, "round");
    json_t *slice = json_object_get(root, "slice");
    json_t *slices = json_object_get(root, "slices");
    json_t *bytes = json_object_get(root, "bytes");
    json_t *hash = json_object_get(root, "hash");
    json_t *sum = json_object_get(root, "checksum");
    if (!json_is_integer(r) || json_integer_value(r) < 1) {
        snprintf(err, errlen, "\"round\" is not a positive integer");
        goto out;
    }
    if (!json_is_integer(slice) || json_integer_value(slice) < 0 ||
        json_integer_value(slice) >= (json_int_t)XFER_SLICES) {
        snprintf(err, errlen, "\"slice\" is not an integer in 0..%u", XFER_SLICES - 1);
        goto out;
    }
    if (!json_is_integer(bytes) || json_integer_value(bytes) != (json_int_t)XFER_SLICE_BYTES ||
        !json_is_integer(slices) || json_integer_value(slices) != (json_int_t)XFER_SLICES) {
        snprintf(err, errlen, "want \"bytes\": %u and \"slices\": %u", XFER_SLICE_BYTES,
                 XFER_SLICES);
        goto out;
    }
    if (!json_is_string(hash) || strcmp(json_string_value(hash), XFER_HASH_NAME) != 0) {
        snprintf(err, errlen, "want \"hash\": \"%s\"", XFER_HASH_NAME);
        goto out;
    }
    const char *hex = json_string_value(sum);
    if (!hex || strlen(hex) != 16 || strspn(hex, "0123456789abcdef") != 16) {
        snprintf(err, errlen, "\"checksum\" is not 16 lowercase hex digits");
        goto out;
    }
    s->round = (uint64_t)json_integer_value(r);
    s->slice = (unsigned)json_integer_value(slice);
    s->checksum = strtoull(hex, NULL, 16);
    rc = 0;
out:
    json_decref(root);
    return rc;
}

/* Parse an acknowledgement {"ack": r}. Returns 0 or -1. */
int xfer_ack_parse(const unsigned char *msg, size_t len, uint64_t *round)
{
    json_t *root = json_loadb((const char *)msg, len, 0, NULL);
    json_t *r = json_object_get(root, "ack");
    int rc = -1;
    if (json_is_integer(r) && json_integer_value(r) >= 1) {
        *round = (uint64_t)json_integer_value(r);
        rc = 0;
    }
    json_decref(root);
    return rc;
}

/* The first @max bytes of a notification, for a message: printable ASCII, others as '.'. */
const char *xfer_note_excerpt(const kvf_notify_t *n, char *buf, size_t max)
{
    size_t k = n->len < max - 1 ? n->len : max - 1;
    for (size_t i = 0; i < k; i++)
        buf[i] = n->msg[i] >= 0x20 && n->msg[i] < 0x7f ? (char)n->msg[i] : '.';
    buf[k] = '\0';
    return buf;
}

void xfer_no_ack_hook(uint64_t round)
{
    const char *no_ack = getenv(XFER_NO_ACK_ENV);
    if (!no_ack || !*no_ack)
        return;
    printf("killed before the acknowledgement of round %" PRIu64 " (%s)\n", round,
           XFER_NO_ACK_ENV);
    fflush(stdout);
    raise(SIGKILL);
}
