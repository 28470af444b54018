/*
 * kvf_engine_stats_fetch(): ask an engine for its statistics over its tcp port, as `kvferry
 * info --session` does. A connection of its own, opened, used for one HELLO and one STATS
 * request, and closed; it shares nothing with the transport's peer connections, so it needs no
 * engine on the asking side. Every wait is bounded by the caller's timeout, and the answer is
 * checked against KVF_TCP_MAX_STATS before anything is allocated.
 */
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/net.h"
#include "common/stats.h"
#include "transport/tcp.h"

#define STATS_DEFAULT_TIMEOUT_MS 5000u
#define STATS_HELLO              "kvferry-info"

/* One request of @type on @fd and the header of its answer, which must be a RESP to @req_id. */
static int stats_ask(kvf_stream_t *st, uint8_t type, uint64_t req_id, const void *payload, size_t plen,
                     uint64_t deadline, tcp_hdr_t *h)
{
    uint8_t frame[KVF_TCP_HDR_LEN + 64];
    tcp_hdr_encode(frame, type, 0, req_id, 0, plen);
    if (plen)
        memcpy(frame + KVF_TCP_HDR_LEN, payload, plen);
    int rc = kvf__stream_io(st, frame, KVF_TCP_HDR_LEN + plen, true, deadline);
    if (rc == 0)
        rc = kvf__stream_io(st, frame, KVF_TCP_HDR_LEN, false, deadline);
    if (rc)
        return rc;
    char why[96];
    tcp_hdr_decode(frame, h);
    if (!tcp_hdr_common_ok(h, why, sizeof(why)) || h->type != KVF_TCP_RESP || h->req_id != req_id)
        return -KVF_EPROTO;
    return 0;
}

static int stats_exchange(kvf_stream_t *st, const char *sid, uint64_t deadline, kvf_stats_t *out)
{
    tcp_hdr_t h;
    kvf_auth_key_t key;
    int rc = kvf__auth_key_resolve(NULL, &key);
    if (rc < 0)
        return kvf__err_wrap(rc, "statistics of %s", sid);
    if (key.len) {
        char why[160];
        rc = kvf__auth_client_stream(st, &key, STATS_HELLO, deadline, sid, why, sizeof(why));
        kvf__auth_key_wipe(&key);
        if (rc)
            return kvf__err(rc == -KVF_ETIMEDOUT ? rc : -KVF_EAUTH,
                            "statistics of %s: authentication: %s", sid, why);
    }
    rc = stats_ask(st, KVF_TCP_HELLO, 1, STATS_HELLO, strlen(STATS_HELLO), deadline, &h);
    if (rc == 0 && (h.status == KVF_EAUTH || h.status == KVF_ETLS)) {
        char msg[KVF_TCP_MAX_MSG + 1], text[KVF_TCP_MAX_MSG + 1];
        size_t n = h.len <= KVF_TCP_MAX_MSG ? (size_t)h.len : 0;
        if (kvf__stream_io(st, msg, n, false, deadline))
            n = 0;
        kvf__printable(text, sizeof(text), msg, n);
        return kvf__err(-(int)h.status, "statistics of %s: %s: refused by the peer: %s", sid,
                        h.status == KVF_ETLS ? "TLS" : "authentication", text);
    }
    if (rc == 0 && (h.status != 0 || h.len != 0))
        rc = -KVF_EPROTO;
    if (rc == -KVF_EPROTO || rc == -EPIPE || rc == -ECONNRESET)
        return kvf__err(-KVF_EPROTO,
                        "statistics of %s: what answers there is not a kvferry engine (it %s our "
                        "hello)",
                        sid, rc == -KVF_EPROTO ? "gave a malformed answer to" : "hung up on");
    if (rc == 0)
        rc = stats_ask(st, KVF_TCP_STATS, 2, NULL, 0, deadline, &h);
    if (rc == -EPIPE || rc == -ECONNRESET)
        return kvf__err(-KVF_EPROTO,
                        "statistics of %s: the engine closed the connection on a STATS request "
                        "(a kvferry older than this one?)",
                        sid);
    if (rc == -KVF_ETIMEDOUT)
        return kvf__err(rc, "statistics of %s: no answer in time", sid);
    if (rc == -KVF_EPROTO)
        return kvf__err(rc, "statistics of %s: malformed answer", sid);
    if (rc)
        return kvf__err(rc, "statistics of %s: %s", sid, kvf_strerror(rc));
    if (h.status != 0) {
        char msg[KVF_TCP_MAX_MSG + 1], text[KVF_TCP_MAX_MSG + 1];
        size_t n = h.len < KVF_TCP_MAX_MSG ? (size_t)h.len : 0;
        if (h.len > KVF_TCP_MAX_MSG || kvf__stream_io(st, msg, n, false, deadline))
            n = 0;
        kvf__printable(text, sizeof(text), msg, n);
        int code = h.status < KVF_ERRNO_OFFSET + 100 ? -(int)h.status : -KVF_EPROTO;
        return kvf__err(code, "statistics of %s: refused: %s", sid, text);
    }
    if (h.len > KVF_TCP_MAX_STATS)
        return kvf__err(-KVF_EPROTO,
                        "statistics of %s: answer of %" PRIu64 " bytes exceeds "
                        "KVF_TCP_MAX_STATS (%u)",
                        sid, h.len, KVF_TCP_MAX_STATS);
    uint8_t *body = malloc(h.len ? (size_t)h.len : 1);
    if (!body)
        return kvf__err(-KVF_ENOMEM, "statistics of %s: out of memory", sid);
    rc = kvf__stream_io(st, body, (size_t)h.len, false, deadline);
    if (rc)
        rc = kvf__err(rc == -EPIPE ? -KVF_EPROTO : rc, "statistics of %s: answer cut short (%s)",
                      sid, kvf_strerror(rc));
    else if ((rc = kvf__stats_decode(body, (size_t)h.len, out)) < 0)
        kvf__err_wrap(rc, "statistics of %s", sid);
    free(body);
    return rc;
}

/* The exchange on @fd, inside TLS when KVFERRY_TLS_DATA and the KVFERRY_TLS_* variables (or
 * --tls-data and the --tls-* flags) say the engines' data connections are TLS. */
static int stats_tls(int fd, const char *sid, const kvf_hostport_t *hp, uint64_t deadline,
                     kvf_stats_t *out)
{
    kvf_tls_opts_t env;
    const kvf_tls_opts_t *o;
    kvf_tls_ctx_t *ctx = NULL;
    kvf_stream_t st = {fd, NULL};
    int rc = kvf__tls_data_resolve(NULL, NULL, &env, &o);
    if (rc == 0 && o && (rc = kvf__tls_ctx_new(o, false, NULL, &ctx)) == 0) {
        char why[200];
        kvf__tls_ctx_set_peer(ctx, "engine");
        st.tls = kvf__tls_new_for(ctx, fd, hp->host);
        rc = st.tls ? kvf__tls_connect(st.tls, deadline, why, sizeof(why)) : -KVF_ENOMEM;
        if (rc)
            kvf__err(rc, "statistics of %s: TLS: %s", sid, st.tls ? why : "out of memory");
    } else if (rc) {
        kvf__err_wrap(rc, "statistics of %s", sid);
    }
    if (rc == 0)
        rc = stats_exchange(&st, sid, deadline, out);
    kvf__tls_free(st.tls);
    kvf__tls_ctx_free(ctx);
    return rc;
}

int kvf_engine_stats_fetch(const char *sid, uint32_t timeout_ms, kvf_stats_t *out)
{
    kvf_hostport_t hp;
    if (!sid || !out)
        return kvf__err(-KVF_EINVAL, "engine stats fetch: NULL argument");
    int rc = kvf__session_id_parse(sid, &hp);
    if (rc < 0)
        return rc;
    if (hp.port == 0)
        return kvf__err(-KVF_EINVAL, "session id %s: port 0 names no engine to ask", sid);
    uint64_t deadline = kvf__now_ms() + (timeout_ms ? timeout_ms : STATS_DEFAULT_TIMEOUT_MS);

    const char *why = "";
    int fd = kvf__nb_connect_hp(&hp, deadline, &why);
    if (fd == -KVF_EINVAL)
        return kvf__err(fd, "session id %s: cannot resolve %s: %s", sid, hp.host, why);
    if (fd == -KVF_ETIMEDOUT)
        return kvf__err(fd, "statistics of %s: no answer to connect in time", sid);
    if (fd < 0)
        return kvf__err(fd, "statistics of %s: cannot connect: %s%s", sid, strerror(-fd),
                        fd == -ECONNREFUSED ? " (no engine listens there)" : "");
    rc = stats_tls(fd, sid, &hp, deadline, out);
    close(fd);
    return rc;
}
