/*
 * Fuzz target: the authentication handshake a server reads before the peer proved the key
 * (common/auth.h), as the engine port and the store run it. The input is a stream of handshake
 * messages fed to a server with a fixed key: each header through kvf__auth_hdr_parse(), each
 * accepted message through kvf__auth_srv_step(). Invariants: no input authenticates (the server's
 * nonce is fresh, so no byte string can carry a valid proof without the key); every answer fits
 * KVF_AUTH_MAX_MSG and is itself a well-formed message; an accepted body is within its type's
 * limit; once the server refused, it accepts nothing more.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/auth.h"
#include "common/wire.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool quiet;
    if (!quiet) {
        kvf_log_set_level(KVF_LOG_ERROR);
        quiet = true;
    }
    kvf_auth_key_t key = {.len = 32};
    memset(key.bytes, 0x42, key.len);
    kvf_auth_srv_t s;
    kvf__auth_srv_init(&s, &key, "127.0.0.1:50051");
    size_t pos = 0;
    bool failed = false;
    while (size - pos >= KVF_AUTH_HDR_LEN) {
        uint8_t type;
        size_t blen;
        char why[160];
        if (!kvf__auth_hdr_parse(data + pos, &type, &blen, why, sizeof(why)))
            break;
        KVF_FUZZ_CHECK(blen <= KVF_AUTH_MAX_BODY, "body of %zu bytes accepted", blen);
        pos += KVF_AUTH_HDR_LEN;
        if (size - pos < blen)
            break;
        uint8_t out[KVF_AUTH_MAX_MSG];
        size_t out_len = 0;
        int rc = kvf__auth_srv_step(&s, type, data + pos, blen, out, &out_len, why, sizeof(why));
        pos += blen;
        KVF_FUZZ_CHECK(rc != 1, "a handshake without the key authenticated");
        KVF_FUZZ_CHECK(!failed || rc < 0, "a refused handshake went on (rc %d)", rc);
        KVF_FUZZ_CHECK(out_len <= KVF_AUTH_MAX_MSG, "answer of %zu bytes", out_len);
        if (out_len) {
            uint8_t t2;
            size_t b2;
            KVF_FUZZ_CHECK(kvf__auth_hdr_parse(out, &t2, &b2, why, sizeof(why)) &&
                               b2 + KVF_AUTH_HDR_LEN == out_len,
                           "malformed answer: %s", why);
        }
        if (rc < 0)
            failed = true;
    }
    kvf__auth_srv_fini(&s);
    return 0;
}

void kvf_fuzz_seeds(kvf_fuzz_add_fn add)
{
    uint8_t buf[3 * KVF_AUTH_MAX_MSG];
    uint8_t nonce[KVF_AUTH_NONCE_LEN], mac[KVF_AUTH_MAC_LEN];
    memset(nonce, 7, sizeof(nonce));
    memset(mac, 9, sizeof(mac));
    const char *id = "127.0.0.1:40000";
    /* A hello alone; a hello and a proof; a proof out of turn; a refusal; a long identity. */
    size_t n = kvf__auth_encode(buf, KVF_AUTH_HELLO, nonce, sizeof(nonce), id, strlen(id));
    add(buf, n);
    n += kvf__auth_encode(buf + n, KVF_AUTH_PROOF, mac, sizeof(mac), NULL, 0);
    add(buf, n);
    n = kvf__auth_encode(buf, KVF_AUTH_PROOF, mac, sizeof(mac), NULL, 0);
    add(buf, n);
    n = kvf__auth_encode(buf, KVF_AUTH_REFUSED, "no", 2, NULL, 0);
    add(buf, n);
    char longid[KVF_AUTH_MAX_ID];
    memset(longid, 'a', sizeof(longid));
    n = kvf__auth_encode(buf, KVF_AUTH_HELLO, nonce, sizeof(nonce), longid, sizeof(longid));
    n += kvf__auth_encode(buf + n, KVF_AUTH_PROOF, mac, sizeof(mac), NULL, 0);
    n += kvf__auth_encode(buf + n, KVF_AUTH_HELLO, nonce, sizeof(nonce), id, strlen(id));
    add(buf, n);
}

int kvf_fuzz_final(void)
{
    return 0;
}
