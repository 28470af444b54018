/*
 * The P2P record request: its codec (both ends) and the asking side (p2p.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/common.h"
#include "common/net.h"
#include "common/p2p.h"
#include "common/wire.h"

/* Request: magic u32, version u8, op u8, flags u16 (0), key_len u32, 28 reserved bytes (0). */
void kvf__p2p_req_encode(uint8_t *b, uint32_t key_len)
{
    memset(b, 0, KVF_P2P_REQ_LEN);
    kvf__put_le32(b, KVF_P2P_MAGIC);
    b[4] = KVF_P2P_VERSION;
    b[5] = KVF_P2P_OP_GET;
    kvf__put_le32(b + 8, key_len);
}

bool kvf__p2p_req_decode(const uint8_t *b, uint32_t *key_len, char *why, size_t whylen)
{
    uint32_t magic = kvf__get_le32(b), klen = kvf__get_le32(b + 8);
    size_t i = 12;
    while (i < KVF_P2P_REQ_LEN && b[i] == 0)
        i++;
    if (magic != KVF_P2P_MAGIC)
        snprintf(why, whylen, "bad magic 0x%08" PRIx32, magic);
    else if (b[4] != KVF_P2P_VERSION)
        snprintf(why, whylen, "unsupported P2P version %u", (unsigned)b[4]);
    else if (b[5] != KVF_P2P_OP_GET)
        snprintf(why, whylen, "P2P request op %u, want GET (%u)", (unsigned)b[5],
                 KVF_P2P_OP_GET);
    else if (kvf__get_le16(b + 6) != 0)
        snprintf(why, whylen, "non-zero P2P flags 0x%04x", (unsigned)kvf__get_le16(b + 6));
    else if (klen == 0 || klen > KVF_P2P_MAX_KEY)
        snprintf(why, whylen, "P2P key length %" PRIu32 ", want 1..KVF_P2P_MAX_KEY (%u)", klen,
                 KVF_P2P_MAX_KEY);
    else if (i < KVF_P2P_REQ_LEN)
        snprintf(why, whylen, "non-zero reserved byte %zu in a P2P request", i);
    else {
        *key_len = klen;
        return true;
    }
    return false;
}

bool kvf__p2p_key_ok(const char *key, size_t len)
{
    if (len == 0 || len > KVF_P2P_MAX_KEY)
        return false;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)key[i] < 0x21 || (unsigned char)key[i] > 0x7e)
            return false;
    return true;
}

/* Answer: magic u32, version u8, op u8, flags u16 (0), status u32, len u32. */
void kvf__p2p_ans_encode(uint8_t *b, uint32_t status, uint32_t len)
{
    kvf__put_le32(b, KVF_P2P_MAGIC);
    b[4] = KVF_P2P_VERSION;
    b[5] = KVF_P2P_OP_ANS;
    kvf__put_le16(b + 6, 0);
    kvf__put_le32(b + 8, status);
    kvf__put_le32(b + 12, len);
}

bool kvf__p2p_ans_decode(const uint8_t *b, uint32_t *status, uint32_t *len, char *why,
                         size_t whylen)
{
    uint32_t magic = kvf__get_le32(b), st = kvf__get_le32(b + 8), n = kvf__get_le32(b + 12);
    if (magic != KVF_P2P_MAGIC)
        snprintf(why, whylen, "bad magic 0x%08" PRIx32, magic);
    else if (b[4] != KVF_P2P_VERSION || b[5] != KVF_P2P_OP_ANS || kvf__get_le16(b + 6) != 0)
        snprintf(why, whylen, "version %u, op %u, flags 0x%04x: want %u, %u, 0", (unsigned)b[4],
                 (unsigned)b[5], (unsigned)kvf__get_le16(b + 6), KVF_P2P_VERSION, KVF_P2P_OP_ANS);
    else if (st != 0 && !kvf__is_kvf_code(st))
        snprintf(why, whylen, "status %" PRIu32 " is no kvferry error code", st);
    else if (st == 0 && n > KVF_P2P_MAX_VALUE)
        snprintf(why, whylen, "value of %" PRIu32 " bytes over KVF_P2P_MAX_VALUE (%u)", n,
                 KVF_P2P_MAX_VALUE);
    else if (st != 0 && n > KVF_P2P_MAX_MSG)
        snprintf(why, whylen, "message of %" PRIu32 " bytes over KVF_P2P_MAX_MSG (%u)", n,
                 KVF_P2P_MAX_MSG);
    else {
        *status = st;
        *len = n;
        return true;
    }
    return false;
}

int kvf__p2p_sid_of_key(const char *key, kvf_hostport_t *hp)
{
    const char *slash = key ? strrchr(key, '/') : NULL;
    if (!slash || !slash[1])
        return -KVF_EINVAL;
    int rc = kvf__session_id_parse(slash + 1, hp);
    if (rc < 0 || hp->port == 0)
        return -KVF_EINVAL;
    return 0;
}

static int exchange(kvf_stream_t *st, const char *sid, const char *key, uint64_t deadline,
                    void **val, size_t *len)
{
    size_t klen = strlen(key);
    uint8_t hdr[KVF_P2P_REQ_LEN];
    kvf__p2p_req_encode(hdr, (uint32_t)klen);
    int rc = kvf__stream_io(st, hdr, sizeof(hdr), true, deadline);
    if (rc == 0)
        rc = kvf__stream_io(st, (void *)key, klen, true, deadline);
    if (rc == 0)
        rc = kvf__stream_io(st, hdr, KVF_P2P_ANS_LEN, false, deadline);
    if (rc == -KVF_ETIMEDOUT)
        return kvf__err(rc, "peer %s: no answer to the P2P record request in time", sid);
    if (rc == -EPIPE || rc == -ECONNRESET)
        return kvf__err(-KVF_EPROTO,
                        "peer %s hung up on the P2P record request (not a kvferry engine, or "
                        "one older than this)",
                        sid);
    if (rc)
        return kvf__err(rc, "peer %s: P2P record request: %s", sid, kvf_strerror(rc));
    uint32_t status, n;
    char why[128];
    if (!kvf__p2p_ans_decode(hdr, &status, &n, why, sizeof(why)))
        return kvf__err(-KVF_EPROTO, "peer %s: malformed P2P answer: %s", sid, why);
    char *body = malloc((size_t)n + 1);
    if (!body)
        return kvf__err(-KVF_ENOMEM, "peer %s: out of memory for a record of %" PRIu32 " bytes",
                        sid, n);
    rc = kvf__stream_io(st, body, n, false, deadline);
    if (rc) {
        free(body);
        return kvf__err(rc == -EPIPE ? -KVF_EPROTO : rc, "peer %s: P2P answer cut short (%s)",
                        sid, kvf_strerror(rc));
    }
    body[n] = '\0';
    if (status != 0) {
        char text[KVF_P2P_MAX_MSG + 1];
        kvf__printable(text, sizeof(text), body, n);
        free(body);
        return kvf__err(-(int)status, "peer %s: %s", sid, text);
    }
    *val = body;
    *len = n;
    return 0;
}

int kvf__p2p_fetch(const kvf_hostport_t *hp, const char *sid, const kvf_auth_key_t *auth,
                   kvf_tls_ctx_t *tls, const char *my_id, const char *key, uint64_t deadline_ms,
                   void **val, size_t *len)
{
    if (!kvf__p2p_key_ok(key, strlen(key)))
        return kvf__err(-KVF_EINVAL, "peer %s: key %.64s is not a record key", sid, key);
    const char *why = "";
    int fd = kvf__nb_connect_hp(hp, deadline_ms, &why);
    if (fd == -KVF_EINVAL)
        return kvf__err(fd, "peer %s: cannot resolve %s: %s", sid, hp->host, why);
    if (fd == -KVF_ETIMEDOUT)
        return kvf__err(fd, "peer %s: no answer to connect in time", sid);
    if (fd < 0)
        return kvf__err(fd, "peer %s: cannot connect: %s%s", sid, strerror(-fd),
                        fd == -ECONNREFUSED ? " (no engine listens there yet)" : "");
    int rc = 0;
    kvf_stream_t st = {fd, NULL};
    if (tls) {
        char reason[200];
        st.tls = kvf__tls_new_for(tls, fd, hp->host);
        rc = st.tls ? kvf__tls_connect(st.tls, deadline_ms, reason, sizeof(reason)) : -KVF_ENOMEM;
        if (rc)
            rc = kvf__err(rc, "peer %s: P2P record request: TLS: %s", sid,
                          st.tls ? reason : "out of memory");
    }
    if (rc == 0 && auth && auth->len) {
        /* The engine with a key reads nothing before the handshake; the server expected is the
         * engine the key names, spelled as it spells itself. */
        char want[KVF_SESSION_ID_MAX], reason[400];
        kvf__hostport_format(hp, want, sizeof(want));
        rc = kvf__auth_client_stream(&st, auth, my_id && *my_id ? my_id : KVF_P2P_ASKER_ID,
                                     deadline_ms, want, reason, sizeof(reason));
        if (rc == -KVF_ETIMEDOUT)
            rc = kvf__err(rc, "peer %s: P2P record request: authentication: %s", sid, reason);
        else if (rc == -EPIPE || rc == -ECONNRESET)
            /* An engine of this version answers a handshake, even one without a key. */
            rc = kvf__err(-KVF_EAUTH, "peer %s: P2P record request: authentication: %s", sid,
                          reason);
        else if (rc)
            rc = kvf__err(rc == -KVF_EPROTO ? -KVF_EPROTO : -KVF_EAUTH,
                          "peer %s: P2P record request: authentication: %s", sid, reason);
    }
    if (rc == 0)
        rc = exchange(&st, sid, key, deadline_ms, val, len);
    kvf__tls_free(st.tls);
    close(fd);
    return rc;
}
