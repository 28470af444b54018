/*
 * The target's half of the P2P record request (common/p2p.h, docs/protocol.md): an engine
 * without a config store is asked for its session or regions record on its session port. The
 * serving thread that accepted the connection finds the request's magic where a HELLO would be
 * and hands the connection here; one request is answered and the connection is closed.
 *
 * Untrusted input: the header is checked before the key is read, the key's length against
 * KVF_P2P_MAX_KEY, its bytes against the key alphabet, and the whole request must arrive within
 * KVF_P2P_REQ_TIMEOUT_MS. Anything else closes the connection (the caller logs why). The engine
 * answers only its own records (the callback refuses other keys), so the request reveals nothing
 * a store would not.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/p2p.h"
#include "transport/tcp.h"

_Static_assert(KVF_P2P_REQ_LEN == KVF_TCP_HDR_LEN,
               "a P2P request is told from a tcp frame by the header's first bytes");

int tcp_p2p_serve(struct tcp_transport *t, int fd, const char *addr, const uint8_t *hdr,
                  char *why, size_t whylen)
{
    uint32_t klen;
    if (!kvf__p2p_req_decode(hdr, &klen, why, whylen))
        return -1;
    char key[KVF_P2P_MAX_KEY + 1];
    uint64_t deadline = kvf__now_ms() + KVF_P2P_REQ_TIMEOUT_MS;
    int rc = tcp_recv_full(fd, key, klen, deadline);
    if (rc) {
        snprintf(why, whylen, "P2P key of %" PRIu32 " bytes not received (%s)", klen,
                 rc == -KVF_ETIMEDOUT ? "not within KVF_P2P_REQ_TIMEOUT_MS" : kvf_strerror(rc));
        return -1;
    }
    if (!kvf__p2p_key_ok(key, klen)) {
        snprintf(why, whylen, "P2P key of %" PRIu32 " bytes holds a byte outside 0x21..0x7e",
                 klen);
        return -1;
    }
    key[klen] = '\0';

    void *val = NULL;
    size_t len = 0;
    rc = t->record_cb ? t->record_cb(t->record_arg, key, &val, &len)
                      : kvf__err(-KVF_ENOTSUP, "%s answers no P2P record requests", t->local_sid);
    if (rc == 0 && len > KVF_P2P_MAX_VALUE) {
        free(val);
        val = NULL;
        rc = kvf__err(-KVF_ETOOBIG, "record %s of %zu bytes exceeds KVF_P2P_MAX_VALUE", key, len);
    }
    uint8_t ans[KVF_P2P_ANS_LEN];
    struct iovec iov[2] = {{ans, sizeof(ans)}, {val, len}};
    if (rc < 0) {
        const char *msg = kvf_last_error();
        size_t mlen = strnlen(msg, KVF_P2P_MAX_MSG);
        int code = -rc > KVF_ERRNO_OFFSET && -rc <= KVF_ENOMEM ? -rc : KVF_EPROTO;
        kvf__p2p_ans_encode(ans, (uint32_t)code, (uint32_t)mlen);
        iov[1].iov_base = (void *)msg;
        iov[1].iov_len = mlen;
    } else {
        kvf__p2p_ans_encode(ans, 0, (uint32_t)len);
    }
    KVF_DEBUG(TCP_LOG, "P2P record request from %s for %s: %s", addr, key,
              rc < 0 ? kvf_strerror(rc) : "answered");
    rc = tcp_sendv(fd, iov, 2, kvf__now_ms() + KVF_P2P_REQ_TIMEOUT_MS, KVF_TCP_STALL_TIMEOUT_MS);
    free(val);
    if (rc) {
        snprintf(why, whylen, "P2P answer not sent (%s)", kvf_strerror(rc));
        return -1;
    }
    return 0;
}

void tcp_p2p_refuse(struct tcp_transport *t, int fd, const uint8_t *first, uint64_t deadline_ms)
{
    uint8_t hdr[KVF_P2P_REQ_LEN];
    char key[KVF_P2P_MAX_KEY], why[128];
    uint32_t klen;
    memcpy(hdr, first, KVF_AUTH_HDR_LEN);
    if (kvf__auth_io(fd, hdr + KVF_AUTH_HDR_LEN, sizeof(hdr) - KVF_AUTH_HDR_LEN, false,
                     deadline_ms) ||
        !kvf__p2p_req_decode(hdr, &klen, why, sizeof(why)) ||
        kvf__auth_io(fd, key, klen, false, deadline_ms))
        return;
    char msg[KVF_P2P_MAX_MSG];
    int n = snprintf(msg, sizeof(msg),
                     "engine %s requires the cluster secret: this side has no auth key (set an "
                     "auth key file, e.g. KVFERRY_AUTH_KEY_FILE)",
                     t->local_sid);
    uint8_t ans[KVF_P2P_ANS_LEN];
    kvf__p2p_ans_encode(ans, KVF_EAUTH, (uint32_t)n);
    struct iovec iov[2] = {{ans, sizeof(ans)}, {msg, (size_t)n}};
    (void)tcp_sendv(fd, iov, 2, deadline_ms, KVF_TCP_STALL_TIMEOUT_MS);
}
