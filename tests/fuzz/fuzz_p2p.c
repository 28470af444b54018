/*
 * Fuzz target: the P2P record request (common/p2p.h), both ends. The input's first
 * KVF_P2P_REQ_LEN bytes are a request header and the rest what follows it on the connection: a
 * real tcp transport's tcp_p2p_key_len() and tcp_p2p_answer() check them and answer, as a
 * served connection does for a peer. The same bytes go to the asker's answer decoder and, as text,
 * to the key and session-id checks. Invariants: a request is answered only when its header and key
 * are well-formed, and the answer then decodes; an accepted answer header's length is within its
 * limit; a decoded request length is within 1..KVF_P2P_MAX_KEY and encodes back the same.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/p2p.h"
#include "fuzz.h"
#include "transport/tcp.h"

#define FUZZ_KEY "kvferry/v1/default/sessions/127.0.0.1:1"

static int fake_record(void *arg, const char *key, void **val, size_t *len)
{
    (void)arg;
    if (strcmp(key, FUZZ_KEY))
        return kvf__err(-KVF_ENOTFOUND, "no record %s", key);
    *val = strdup("{\"role\":\"Decode\"}");
    *len = strlen(*val);
    return 0;
}

static kvf_transport_t *target(void)
{
    static kvf_transport_t *t;
    static kvf_region_table_t *rt;
    if (t)
        return t;
    kvf_transport_params_t p = {.local_sid = "127.0.0.1:0",
                                .conns_per_peer = 1,
                                .connect_timeout_ms = 1000,
                                .record_cb = fake_record};
    if (kvf__session_id_parse(p.local_sid, &p.listen) || kvf__regions_create(&rt))
        abort();
    p.regions = rt;
    if (kvf__tcp_ops.create(&p, &t))
        abort();
    return t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool quiet;
    if (!quiet) {
        kvf_log_set_level(KVF_LOG_ERROR);
        quiet = true;
    }
    uint8_t hdr[KVF_P2P_REQ_LEN] = {0};
    memcpy(hdr, data, size < sizeof(hdr) ? size : sizeof(hdr));
    const uint8_t *rest = data + (size < sizeof(hdr) ? size : sizeof(hdr));
    size_t rlen = size - (size_t)(rest - data);

    uint32_t klen = 0;
    char why[160];
    bool req_ok = kvf__p2p_req_decode(hdr, &klen, why, sizeof(why));
    if (req_ok) {
        KVF_FUZZ_CHECK(klen >= 1 && klen <= KVF_P2P_MAX_KEY, "key length %u accepted", klen);
        uint8_t again[KVF_P2P_REQ_LEN];
        kvf__p2p_req_encode(again, klen);
        KVF_FUZZ_CHECK(!memcmp(again, hdr, sizeof(hdr)), "accepted header does not re-encode");
    }

    /* The target's side: the key length the header gives, then the answer to the key that
     * follows (a served connection receives exactly that many bytes before answering). */
    struct tcp_transport *t = (struct tcp_transport *)(void *)target();
    int kl = tcp_p2p_key_len(hdr, why, sizeof(why));
    KVF_FUZZ_CHECK((kl >= 0) == req_ok, "key length %d, but header well-formed %d", kl, req_ok);
    int rc = -1;
    uint8_t *out = NULL;
    size_t olen = 0;
    if (kl >= 0 && rlen >= (size_t)kl) {
        char key[KVF_P2P_MAX_KEY + 1];
        memcpy(key, rest, (size_t)kl);
        rc = tcp_p2p_answer(t, "fuzz", key, (size_t)kl, &out, &olen, why, sizeof(why));
    }
    bool key_ok = req_ok && rlen >= klen && kvf__p2p_key_ok((const char *)rest, klen);
    KVF_FUZZ_CHECK((rc == 0) == key_ok, "served %d, but request well-formed %d", rc, key_ok);
    if (rc == 0) {
        uint32_t st, len;
        KVF_FUZZ_CHECK(olen >= KVF_P2P_ANS_LEN, "no answer");
        KVF_FUZZ_CHECK(kvf__p2p_ans_decode(out, &st, &len, why, sizeof(why)),
                       "own answer refused: %s", why);
        KVF_FUZZ_CHECK(len == olen - KVF_P2P_ANS_LEN, "answer says %u bytes, carries %zu", len,
                       olen - KVF_P2P_ANS_LEN);
        bool want = klen == strlen(FUZZ_KEY) && !memcmp(rest, FUZZ_KEY, klen);
        KVF_FUZZ_CHECK((st == 0) == want, "status %u for a key that is %sthe record", st,
                       want ? "" : "not ");
    }
    free(out);

    /* The asker's side. */
    uint8_t ans[KVF_P2P_ANS_LEN] = {0};
    memcpy(ans, data, size < sizeof(ans) ? size : sizeof(ans));
    uint32_t st = 0, len = 0;
    if (kvf__p2p_ans_decode(ans, &st, &len, why, sizeof(why)))
        KVF_FUZZ_CHECK(st == 0 ? len <= KVF_P2P_MAX_VALUE
                               : len <= KVF_P2P_MAX_MSG && st > KVF_ERRNO_OFFSET,
                       "answer status %u length %u accepted", st, len);

    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';
    kvf_hostport_t hp;
    if (kvf__p2p_sid_of_key(s, &hp) == 0)
        KVF_FUZZ_CHECK(hp.port != 0 && memchr(hp.host, '\0', sizeof(hp.host)), "bad session id");
    free(s);
    return 0;
}

static void add_req(kvf_fuzz_add_fn add, const char *key, size_t klen_field)
{
    uint8_t b[KVF_P2P_REQ_LEN + 256];
    size_t n = strlen(key);
    kvf__p2p_req_encode(b, (uint32_t)klen_field);
    memcpy(b + KVF_P2P_REQ_LEN, key, n);
    add(b, KVF_P2P_REQ_LEN + n);
}

void kvf_fuzz_seeds(kvf_fuzz_add_fn add)
{
    add_req(add, FUZZ_KEY, strlen(FUZZ_KEY));
    add_req(add, "kvferry/v1/default/regions/127.0.0.1:1", 38);
    add_req(add, "kvferry/v1/x/sessions/[::1]:9", 29);
    add_req(add, "short", 10);
    add_req(add, "a b", 3);
    uint8_t a[KVF_P2P_ANS_LEN + 8];
    kvf__p2p_ans_encode(a, 0, 8);
    memcpy(a + KVF_P2P_ANS_LEN, "{\"x\":1}", 8);
    add(a, sizeof(a));
    kvf__p2p_ans_encode(a, KVF_ENOTFOUND, 4);
    add(a, KVF_P2P_ANS_LEN + 4);
}

int kvf_fuzz_final(void)
{
    return 0;
}
