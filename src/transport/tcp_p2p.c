/*
 * The target's half of the P2P record request (common/p2p.h, docs/protocol.md): an engine
 * without a config store is asked for its session or regions record on its session port. The
 * served connection (tcp_target.c) finds the request's magic where a HELLO would be, receives
 * the key, and sends the answer built here; one request is answered and the connection closed.
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

int tcp_p2p_key_len(const uint8_t *hdr, char *why, size_t whylen)
{
    uint32_t klen;
    if (!kvf__p2p_req_decode(hdr, &klen, why, whylen))
        return -1;
    return (int)klen;
}

int tcp_p2p_answer(struct tcp_transport *t, const char *addr, char *key, size_t klen, uint8_t **out,
                   size_t *out_len, char *why, size_t whylen)
{
    if (!kvf__p2p_key_ok(key, klen)) {
        snprintf(why, whylen, "P2P key of %zu bytes holds a byte outside 0x21..0x7e", klen);
        return -1;
    }
    key[klen] = '\0';

    void *val = NULL;
    size_t len = 0;
    int rc = t->record_cb
                 ? t->record_cb(t->record_arg, key, &val, &len)
                 : kvf__err(-KVF_ENOTSUP, "%s answers no P2P record requests", t->local_sid);
    if (rc == 0 && len > KVF_P2P_MAX_VALUE) {
        free(val);
        val = NULL;
        rc = kvf__err(-KVF_ETOOBIG, "record %s of %zu bytes exceeds KVF_P2P_MAX_VALUE", key, len);
    }
    const void *body = val;
    uint8_t ans[KVF_P2P_ANS_LEN];
    if (rc < 0) {
        const char *msg = kvf_last_error();
        size_t mlen = strnlen(msg, KVF_P2P_MAX_MSG);
        int code = rc < 0 && kvf__is_kvf_code((uint32_t)-rc) ? -rc : KVF_EPROTO;
        kvf__p2p_ans_encode(ans, (uint32_t)code, (uint32_t)mlen);
        body = msg;
        len = mlen;
    } else {
        kvf__p2p_ans_encode(ans, 0, (uint32_t)len);
    }
    KVF_DEBUG(TCP_LOG, "P2P record request from %s for %s: %s", addr, key,
              rc < 0 ? kvf_strerror(rc) : "answered");
    *out = malloc(sizeof(ans) + len);
    if (!*out) {
        free(val);
        snprintf(why, whylen, "P2P answer: out of memory");
        return -1;
    }
    memcpy(*out, ans, sizeof(ans));
    if (len)
        memcpy(*out + sizeof(ans), body, len);
    *out_len = sizeof(ans) + len;
    free(val);
    return 0;
}

size_t tcp_p2p_refusal(const struct tcp_transport *t, bool tls, uint8_t *out)
{
    int n = snprintf((char *)out + KVF_P2P_ANS_LEN, KVF_P2P_MAX_MSG,
                     tls ? "engine %s requires TLS on data connections: this side has none for "
                           "them (give the store options the engine's data TLS options)"
                         : "engine %s requires the cluster secret: this side has no auth key (set "
                           "an auth key file, e.g. KVFERRY_AUTH_KEY_FILE)",
                     t->local_sid);
    size_t len = n < 0 ? 0 : (size_t)n < KVF_P2P_MAX_MSG ? (size_t)n : KVF_P2P_MAX_MSG - 1;
    kvf__p2p_ans_encode(out, tls ? KVF_ETLS : KVF_EAUTH, (uint32_t)len);
    return KVF_P2P_ANS_LEN + len;
}
