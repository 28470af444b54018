/*
 * The cluster secret: its key file, the handshake codec, the server's state machine and the two
 * socket drivers (auth.h says what each does; docs/protocol.md has the bytes).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "common/auth.h"
#include "common/net.h"
#include "common/wire.h"

enum { SRV_WANT_HELLO, SRV_WANT_PROOF, SRV_DONE, SRV_FAILED };

/* A key file is a few hex digits; anything longer than this is not one. */
#define KEY_FILE_MAX 1024

/* ---- the key file ---------------------------------------------------------------------------- */

/* Decode one key of @n hex digits at @text into @out (KVF_AUTH_KEY_MAX bytes); @which names it
 * in messages ("", or " (its second key)"). Returns its length in bytes or a negative code. */
static int key_decode(const char *path, const char *which, const char *text, size_t n,
                      uint8_t *out)
{
    if (n % 2 || n < 2 * KVF_AUTH_KEY_MIN || n > 2 * KVF_AUTH_KEY_MAX)
        return kvf__err(-KVF_EINVAL,
                        "auth key file %s%s: %zu characters; a key is %u..%u hex digits (an even "
                        "count; make one with `kvferry keygen`)",
                        path, which, n, 2 * KVF_AUTH_KEY_MIN, 2 * KVF_AUTH_KEY_MAX);
    uint8_t same = 0;
    for (size_t i = 0; i < n / 2; i++) {
        int h = kvf__hexval((unsigned char)text[2 * i]);
        int l = kvf__hexval((unsigned char)text[2 * i + 1]);
        if (h < 0 || l < 0)
            return kvf__err(-KVF_EINVAL,
                            "auth key file %s%s: character %zu is not a hex digit (make a key "
                            "with `kvferry keygen`)",
                            path, which, 2 * i + (h < 0 ? 0 : 1) + 1);
        out[i] = (uint8_t)(h << 4 | l);
        same |= (uint8_t)(out[i] ^ out[0]);
    }
    if (!same)
        /* A placeholder (all zeros, all ff), never a key anyone generated. */
        return kvf__err(-KVF_EINVAL,
                        "auth key file %s%s: every byte is 0x%02x: a placeholder, not a random "
                        "key (make one with `kvferry keygen`)",
                        path, which, out[0]);
    return (int)(n / 2);
}

/*
 * Whether the key file's owner and mode keep it private: owned by this user or root (a file
 * another user owns, or a symlink to one, could be swapped for a key of theirs), never writable
 * by group or others, never readable by others. Group read is allowed: a key shared with a
 * service group (0640, or 0440 from a Kubernetes Secret with fsGroup) is a common deployment.
 */
static int key_perms(const char *path, const struct stat *sb)
{
    unsigned mode = (unsigned)(sb->st_mode & 07777);
    if (sb->st_uid != geteuid() && sb->st_uid != 0)
        return kvf__err(-KVF_EINVAL,
                        "auth key file %s: owned by uid %u, not by this user (uid %u) or root",
                        path, (unsigned)sb->st_uid, (unsigned)geteuid());
    if (sb->st_mode & (S_IWGRP | S_IWOTH))
        return kvf__err(-KVF_EINVAL,
                        "auth key file %s: mode %04o lets group or others write it; chmod 600 "
                        "it (640 to share it with a group)",
                        path, mode);
    if (sb->st_mode & S_IRWXO)
        return kvf__err(-KVF_EINVAL,
                        "auth key file %s: mode %04o lets others use it; chmod 600 it (640 to "
                        "share it with a group; in Kubernetes, defaultMode 0400, or 0440 with "
                        "fsGroup)",
                        path, mode);
    return 0;
}

static int key_load(const char *path, kvf_auth_key_t *key)
{
    char text[KEY_FILE_MAX + 1];
    int rc = 0;
    /* Symlinks are followed (a Kubernetes Secret is a symlink into ..data/); what is checked is
     * the file actually opened. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return kvf__err(-errno, "auth key file %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        rc = kvf__err(-errno, "auth key file %s: %s", path, strerror(errno));
        goto out_close;
    }
    if (!S_ISREG(sb.st_mode)) {
        rc = kvf__err(-KVF_EINVAL, "auth key file %s: not a regular file", path);
        goto out_close;
    }
    rc = key_perms(path, &sb);
    if (rc < 0)
        goto out_close;
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, text + n, sizeof(text) - 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = kvf__err(-errno, "auth key file %s: %s", path, strerror(errno));
            goto out_close;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n == sizeof(text) - 1) {
            rc = kvf__err(-KVF_EINVAL, "auth key file %s: longer than %d bytes: not a key file",
                          path, KEY_FILE_MAX);
            goto out_wipe;
        }
    }
    /* One key, or two: the current one, then the previous one still accepted during a rotation
     * (docs/security.md). Lines starting with '#' are comments. */
    const char *word[3];
    size_t wlen[3], nwords = 0;
    for (size_t i = 0; i < n;) {
        if (strchr(" \t\r\n", text[i]) && text[i]) {
            i++;
            continue;
        }
        if (text[i] == '#') {
            while (i < n && text[i] != '\n')
                i++;
            continue;
        }
        size_t j = i;
        while (j < n && !(strchr(" \t\r\n", text[j]) && text[j]))
            j++;
        if (nwords == 3)
            break;
        word[nwords] = text + i;
        wlen[nwords++] = j - i;
        i = j;
    }
    if (nwords == 0 || nwords > 2) {
        rc = kvf__err(-KVF_EINVAL,
                      "auth key file %s: holds %s keys; it holds one (make it with `kvferry "
                      "keygen`), or two during a rotation: the current one, then the previous one",
                      path, nwords ? "more than two" : "no");
        goto out_wipe;
    }
    rc = key_decode(path, "", word[0], wlen[0], key->bytes);
    if (rc >= 0) {
        key->len = (size_t)rc;
        rc = 0;
    }
    if (rc == 0 && nwords == 2) {
        rc = key_decode(path, " (its second key, the previous one)", word[1], wlen[1], key->prev);
        if (rc >= 0) {
            key->prev_len = (size_t)rc;
            rc = 0;
        }
    }
    if (rc < 0)
        kvf__auth_key_wipe(key);
out_wipe:
    OPENSSL_cleanse(text, sizeof(text));
out_close:
    close(fd);
    return rc;
}

static int key_resolve(const char *path, const char *env, kvf_auth_key_t *key)
{
    memset(key, 0, sizeof(*key));
    if (!path || !*path)
        path = getenv(env);
    if (!path || !*path)
        return 0;
    return key_load(path, key);
}

int kvf__auth_key_resolve(const char *path, kvf_auth_key_t *key)
{
    return key_resolve(path, KVF_AUTH_KEY_ENV, key);
}

int kvf__auth_admin_key_resolve(const char *path, kvf_auth_key_t *key)
{
    return key_resolve(path, KVF_AUTH_ADMIN_KEY_ENV, key);
}

void kvf__auth_key_wipe(kvf_auth_key_t *key)
{
    OPENSSL_cleanse(key, sizeof(*key));
}

int kvf_auth_keygen(const char *path)
{
    if (!path || !*path)
        return kvf__err(-KVF_EINVAL, "auth keygen: no file named");
    uint8_t raw[KVF_AUTH_KEY_GEN];
    char hex[2 * KVF_AUTH_KEY_GEN + 2];
    if (RAND_bytes(raw, (int)sizeof(raw)) != 1)
        return kvf__err(-KVF_ENOMEM, "auth keygen: the random generator failed");
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(hex + 2 * i, 3, "%02x", raw[i]);
    hex[2 * KVF_AUTH_KEY_GEN] = '\n';
    OPENSSL_cleanse(raw, sizeof(raw));
    int rc = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        rc = kvf__err(-errno, "auth key file %s: %s%s", path, strerror(errno),
                      errno == EEXIST ? " (a key is never overwritten; remove it first)" : "");
        goto out;
    }
    size_t len = 2 * KVF_AUTH_KEY_GEN + 1, off = 0;
    while (off < len) {
        ssize_t w = write(fd, hex + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            rc = kvf__err(-errno, "auth key file %s: %s", path, strerror(errno));
            break;
        }
        off += (size_t)w;
    }
    if (rc == 0 && fsync(fd) < 0)
        rc = kvf__err(-errno, "auth key file %s: %s", path, strerror(errno));
    close(fd);
    if (rc)
        unlink(path);
out:
    OPENSSL_cleanse(hex, sizeof(hex));
    return rc;
}

/* ---- the codec ------------------------------------------------------------------------------- */

bool kvf__auth_is_magic(const uint8_t *b)
{
    return kvf__get_le32(b) == KVF_AUTH_MAGIC;
}

bool kvf__auth_hdr_parse(const uint8_t hdr[KVF_AUTH_HDR_LEN], uint8_t *type, size_t *body_len,
                         char *why, size_t whylen)
{
    uint8_t t = hdr[5];
    size_t len = kvf__get_le16(hdr + 6);
    if (!kvf__auth_is_magic(hdr))
        snprintf(why, whylen, "not an authentication message (magic 0x%08x)",
                 (unsigned)kvf__get_le32(hdr));
    else if (hdr[4] != KVF_AUTH_VERSION)
        snprintf(why, whylen, "authentication version %u (want %u)", (unsigned)hdr[4],
                 KVF_AUTH_VERSION);
    else if (t < KVF_AUTH_HELLO || t > KVF_AUTH_REFUSED)
        snprintf(why, whylen, "authentication message type %u", (unsigned)t);
    else if ((t == KVF_AUTH_HELLO || t == KVF_AUTH_CHALLENGE) &&
             (len <= KVF_AUTH_NONCE_LEN || len > KVF_AUTH_MAX_BODY))
        snprintf(why, whylen, "authentication message type %u of %zu bytes (want %u..%u)",
                 (unsigned)t, len, KVF_AUTH_NONCE_LEN + 1, KVF_AUTH_MAX_BODY);
    else if (t == KVF_AUTH_OK && len != KVF_AUTH_MAC_LEN)
        snprintf(why, whylen, "authentication message type %u of %zu bytes (want %u)",
                 (unsigned)t, len, KVF_AUTH_MAC_LEN);
    else if (t == KVF_AUTH_PROOF && len != KVF_AUTH_MAC_LEN && len != 2 * KVF_AUTH_MAC_LEN)
        snprintf(why, whylen, "authentication message type %u of %zu bytes (want %u or %u)",
                 (unsigned)t, len, KVF_AUTH_MAC_LEN, 2 * KVF_AUTH_MAC_LEN);
    else if (t == KVF_AUTH_REFUSED && len > KVF_AUTH_MAX_ID)
        snprintf(why, whylen, "authentication refusal of %zu bytes (at most %u)", len,
                 KVF_AUTH_MAX_ID);
    else {
        *type = t;
        *body_len = len;
        return true;
    }
    return false;
}

size_t kvf__auth_encode(uint8_t *out, uint8_t type, const void *a, size_t alen, const void *b,
                        size_t blen)
{
    kvf__put_le32(out, KVF_AUTH_MAGIC);
    out[4] = KVF_AUTH_VERSION;
    out[5] = type;
    kvf__put_le16(out + 6, (uint16_t)(alen + blen));
    if (alen)
        memcpy(out + KVF_AUTH_HDR_LEN, a, alen);
    if (blen)
        memcpy(out + KVF_AUTH_HDR_LEN + alen, b, blen);
    return KVF_AUTH_HDR_LEN + alen + blen;
}

/* An identity is 1..KVF_AUTH_MAX_ID printable ASCII bytes without spaces. */
static bool id_ok(const uint8_t *p, size_t len)
{
    if (len == 0 || len > KVF_AUTH_MAX_ID)
        return false;
    for (size_t i = 0; i < len; i++)
        if (p[i] <= 0x20 || p[i] >= 0x7f)
            return false;
    return true;
}

/*
 * HMAC-SHA256(key, "kvferry-auth-v1 <role>" NUL cn sn len(cid) cid len(sid) sid), lengths as 2
 * bytes little-endian: every field fixed-size or length-prefixed, so no two transcripts encode
 * alike, and the role label keeps a client proof from ever serving as a server proof.
 */
static bool transcript_mac(const uint8_t *kb, size_t kl, const char *role, const uint8_t *cn,
                           const uint8_t *sn, const char *cid, const char *sid,
                           uint8_t mac[KVF_AUTH_MAC_LEN])
{
    uint8_t t[32 + 2 * KVF_AUTH_NONCE_LEN + 4 + 2 * KVF_AUTH_MAX_ID];
    size_t n = (size_t)snprintf((char *)t, 32, "kvferry-auth-v1 %s", role) + 1;
    size_t cl = strlen(cid), sl = strlen(sid);
    memcpy(t + n, cn, KVF_AUTH_NONCE_LEN);
    n += KVF_AUTH_NONCE_LEN;
    memcpy(t + n, sn, KVF_AUTH_NONCE_LEN);
    n += KVF_AUTH_NONCE_LEN;
    kvf__put_le16(t + n, (uint16_t)cl);
    memcpy(t + n + 2, cid, cl);
    n += 2 + cl;
    kvf__put_le16(t + n, (uint16_t)sl);
    memcpy(t + n + 2, sid, sl);
    n += 2 + sl;
    unsigned int ml = 0;
    return HMAC(EVP_sha256(), kb, (int)kl, t, n, mac, &ml) && ml == KVF_AUTH_MAC_LEN;
}

/* ---- the server's state machine ------------------------------------------------------------ */

void kvf__auth_srv_init(kvf_auth_srv_t *s, const kvf_auth_key_t *key, const char *my_id)
{
    memset(s, 0, sizeof(*s));
    s->key = *key;
    snprintf(s->my_id, sizeof(s->my_id), "%s", my_id);
    s->state = SRV_WANT_HELLO;
}

void kvf__auth_srv_set_admin(kvf_auth_srv_t *s, const kvf_auth_key_t *admin_key)
{
    s->admin_key = *admin_key;
}

void kvf__auth_srv_fini(kvf_auth_srv_t *s)
{
    kvf__auth_key_wipe(&s->key);
    kvf__auth_key_wipe(&s->admin_key);
}

static int srv_fail(kvf_auth_srv_t *s, int code, const char *refusal, uint8_t *out,
                    size_t *out_len, char *why, size_t whylen, const char *reason)
{
    s->state = SRV_FAILED;
    *out_len = kvf__auth_encode(out, KVF_AUTH_REFUSED, refusal, strlen(refusal), NULL, 0);
    snprintf(why, whylen, "%s", reason);
    return code;
}

int kvf__auth_srv_step(kvf_auth_srv_t *s, uint8_t type, const uint8_t *body, size_t len,
                       uint8_t *out, size_t *out_len, char *why, size_t whylen)
{
    *out_len = 0;
    if (s->state == SRV_WANT_HELLO && type == KVF_AUTH_HELLO) {
        if (!id_ok(body + KVF_AUTH_NONCE_LEN, len - KVF_AUTH_NONCE_LEN))
            return srv_fail(s, -KVF_EPROTO, "malformed identity", out, out_len, why, whylen,
                            "authentication hello with a malformed identity");
        memcpy(s->cn, body, KVF_AUTH_NONCE_LEN);
        memcpy(s->peer_id, body + KVF_AUTH_NONCE_LEN, len - KVF_AUTH_NONCE_LEN);
        s->peer_id[len - KVF_AUTH_NONCE_LEN] = '\0';
        if (!strcmp(s->peer_id, s->my_id))
            /* Nothing connects to itself: this is this server's own handshake reflected. */
            return srv_fail(s, -KVF_EAUTH, "an identity that is this server's own", out, out_len,
                            why, whylen, "a client claiming this server's own identity");
        if (!strncmp(s->peer_id, KVF_AUTH_ADMIN_ID, strlen(KVF_AUTH_ADMIN_ID))) {
            /* An operator: the proof must come from the admin key, the cluster's is no good. */
            if (!s->admin_key.len)
                return srv_fail(s, -KVF_EAUTH, "no admin key is configured here", out, out_len,
                                why, whylen, "an admin identity, and no admin key is configured");
            s->key = s->admin_key;
            s->admin = true;
        }
        if (RAND_bytes(s->sn, (int)sizeof(s->sn)) != 1)
            return srv_fail(s, -KVF_EAUTH, "server error", out, out_len, why, whylen,
                            "the random generator failed");
        *out_len = kvf__auth_encode(out, KVF_AUTH_CHALLENGE, s->sn, KVF_AUTH_NONCE_LEN, s->my_id,
                                    strlen(s->my_id));
        s->state = SRV_WANT_PROOF;
        return 0;
    }
    if (s->state == SRV_WANT_PROOF && type == KVF_AUTH_PROOF) {
        /* Each of this side's keys (current, previous) against each of the client's proofs
         * (its current key's, then its previous key's): during a rotation the two sides share
         * one of them. Every pair is compared, in constant time, whatever matched before. */
        const uint8_t *kb[2] = {s->key.bytes, s->key.prev};
        size_t kl[2] = {s->key.len, s->key.prev_len};
        int match = -1;
        for (int k = 0; k < 2; k++) {
            uint8_t want[KVF_AUTH_MAC_LEN];
            if (!kl[k])
                continue;
            if (!transcript_mac(kb[k], kl[k], "client", s->cn, s->sn, s->peer_id, s->my_id, want))
                return srv_fail(s, -KVF_EAUTH, "server error", out, out_len, why, whylen,
                                "HMAC failed");
            for (size_t m = 0; m + KVF_AUTH_MAC_LEN <= len; m += KVF_AUTH_MAC_LEN) {
                int diff = CRYPTO_memcmp(want, body + m, KVF_AUTH_MAC_LEN);
                if (diff == 0 && match < 0)
                    match = k;
            }
            OPENSSL_cleanse(want, sizeof(want));
        }
        if (match < 0)
            return srv_fail(s, -KVF_EAUTH, "wrong key: the proof does not match this side's key",
                            out, out_len, why, whylen,
                            "wrong key (the client's proof does not match this side's key)");
        /* Proven back with the key the client proved: the one both sides hold. */
        uint8_t mac[KVF_AUTH_MAC_LEN];
        if (!transcript_mac(kb[match], kl[match], "server", s->cn, s->sn, s->peer_id, s->my_id,
                            mac))
            return srv_fail(s, -KVF_EAUTH, "server error", out, out_len, why, whylen,
                            "HMAC failed");
        *out_len = kvf__auth_encode(out, KVF_AUTH_OK, mac, sizeof(mac), NULL, 0);
        s->state = SRV_DONE;
        return 1;
    }
    if (type == KVF_AUTH_REFUSED) {
        s->state = SRV_FAILED;
        snprintf(why, whylen, "the client gave up the handshake");
        return -KVF_EAUTH;
    }
    char reason[96];
    snprintf(reason, sizeof(reason), "authentication message type %u out of turn", (unsigned)type);
    return srv_fail(s, -KVF_EPROTO, "message out of turn", out, out_len, why, whylen, reason);
}

/* ---- the socket drivers ---------------------------------------------------------------------- */

int kvf__auth_io(int fd, void *buf, size_t len, bool out, uint64_t deadline_ms)
{
    int rc = kvf__nb_io(fd, buf, len, out, deadline_ms);
    return rc == -ECONNRESET ? -EPIPE : rc; /* a peer that hung up, either way */
}

/* kvf__auth_io() on a stream, plain or TLS. */
static int stream_io(kvf_stream_t *s, void *buf, size_t len, bool out, uint64_t deadline_ms)
{
    int rc = kvf__stream_io(s, buf, len, out, deadline_ms);
    return rc == -ECONNRESET ? -EPIPE : rc;
}

/* Receive one message: header (checked), then body into @body (KVF_AUTH_MAX_BODY bytes). */
static int recv_msg(kvf_stream_t *fd, uint64_t deadline_ms, uint8_t hdr[KVF_AUTH_HDR_LEN], uint8_t *type,
                    uint8_t *body, size_t *len, char *why, size_t whylen)
{
    int rc = stream_io(fd, hdr, KVF_AUTH_HDR_LEN, false, deadline_ms);
    if (rc)
        return rc;
    if (!kvf__auth_hdr_parse(hdr, type, len, why, whylen))
        return -KVF_EPROTO;
    return stream_io(fd, body, *len, false, deadline_ms);
}

static const char *io_text(int rc)
{
    return rc == -KVF_ETIMEDOUT ? "no answer within the handshake's time limit"
           : rc == -EPIPE      ? "the peer closed the connection"
                               : kvf_strerror(rc);
}

int kvf__auth_client_stream(kvf_stream_t *fd, const kvf_auth_key_t *key, const char *my_id, uint64_t deadline_ms,
                     const char *expect_id, char *why, size_t whylen)
{
    uint8_t msg[KVF_AUTH_MAX_MSG], body[KVF_AUTH_MAX_BODY + 1], hdr[KVF_AUTH_HDR_LEN];
    uint8_t cn[KVF_AUTH_NONCE_LEN], sn[KVF_AUTH_NONCE_LEN], mac[KVF_AUTH_MAC_LEN];
    char sid[KVF_AUTH_MAX_ID + 1];
    uint8_t type;
    size_t len, idl = strlen(my_id);
    int rc;
    if (!id_ok((const uint8_t *)my_id, idl)) {
        snprintf(why, whylen, "identity of %zu bytes is not one", idl);
        return -KVF_EINVAL;
    }
    if (RAND_bytes(cn, (int)sizeof(cn)) != 1) {
        snprintf(why, whylen, "the random generator failed");
        return -KVF_EAUTH;
    }
    len = kvf__auth_encode(msg, KVF_AUTH_HELLO, cn, sizeof(cn), my_id, idl);
    rc = stream_io(fd, msg, len, true, deadline_ms);
    if (rc == 0)
        rc = recv_msg(fd, deadline_ms, hdr, &type, body, &len, why, whylen);
    if (rc == -KVF_EPROTO && !kvf__auth_is_magic(hdr)) {
        snprintf(why, whylen, "the peer answered in another protocol: it is no kvferry endpoint "
                              "of this version");
        return rc;
    }
    if (rc) {
        if (rc != -KVF_EPROTO)
            snprintf(why, whylen, "%s%s", io_text(rc),
                     rc == -EPIPE ? " during the handshake (does it use another key, or none?)"
                                  : "");
        return rc;
    }
    if (type == KVF_AUTH_REFUSED)
        goto refused;
    if (type != KVF_AUTH_CHALLENGE || !id_ok(body + KVF_AUTH_NONCE_LEN, len - KVF_AUTH_NONCE_LEN)) {
        snprintf(why, whylen, "the peer sent authentication message type %u, not a challenge",
                 (unsigned)type);
        return -KVF_EPROTO;
    }
    memcpy(sn, body, sizeof(sn));
    memcpy(sid, body + KVF_AUTH_NONCE_LEN, len - KVF_AUTH_NONCE_LEN);
    sid[len - KVF_AUTH_NONCE_LEN] = '\0';
    if (strcmp(sid, expect_id) != 0) {
        /* Before any proof: what answers here is another server (or a relay to one). */
        snprintf(why, whylen, "the peer here is %s, not %s", sid, expect_id);
        len = kvf__auth_encode(msg, KVF_AUTH_REFUSED, "not the server expected", 23, NULL, 0);
        (void)stream_io(fd, msg, len, true, deadline_ms);
        return -KVF_EAUTH;
    }
    /* One proof per key: during a rotation the server may hold only the previous one. */
    uint8_t mac2[KVF_AUTH_MAC_LEN];
    if (!transcript_mac(key->bytes, key->len, "client", cn, sn, my_id, sid, mac) ||
        (key->prev_len &&
         !transcript_mac(key->prev, key->prev_len, "client", cn, sn, my_id, sid, mac2))) {
        snprintf(why, whylen, "HMAC failed");
        return -KVF_EAUTH;
    }
    len = kvf__auth_encode(msg, KVF_AUTH_PROOF, mac, sizeof(mac), mac2,
                           key->prev_len ? sizeof(mac2) : 0);
    OPENSSL_cleanse(mac2, sizeof(mac2));
    rc = stream_io(fd, msg, len, true, deadline_ms);
    if (rc == 0)
        rc = recv_msg(fd, deadline_ms, hdr, &type, body, &len, why, whylen);
    if (rc) {
        if (rc != -KVF_EPROTO)
            snprintf(why, whylen, "%s", io_text(rc));
        return rc;
    }
    if (type == KVF_AUTH_REFUSED)
        goto refused;
    if (type != KVF_AUTH_OK) {
        snprintf(why, whylen, "the peer sent authentication message type %u, not its proof",
                 (unsigned)type);
        return -KVF_EPROTO;
    }
    /* The server proves with whichever of this side's keys it shares. */
    bool ok = transcript_mac(key->bytes, key->len, "server", cn, sn, my_id, sid, mac) &&
              CRYPTO_memcmp(mac, body, KVF_AUTH_MAC_LEN) == 0;
    if (!ok && key->prev_len)
        ok = transcript_mac(key->prev, key->prev_len, "server", cn, sn, my_id, sid, mac) &&
             CRYPTO_memcmp(mac, body, KVF_AUTH_MAC_LEN) == 0;
    if (!ok) {
        OPENSSL_cleanse(mac, sizeof(mac));
        snprintf(why, whylen, "wrong key: the peer's proof does not match this side's key");
        len = kvf__auth_encode(msg, KVF_AUTH_REFUSED, "wrong key", 9, NULL, 0);
        (void)stream_io(fd, msg, len, true, deadline_ms);
        return -KVF_EAUTH;
    }
    OPENSSL_cleanse(mac, sizeof(mac));
    return 0;

refused:;
    char text[KVF_AUTH_MAX_ID + 1];
    kvf__printable(text, sizeof(text), body, len);
    snprintf(why, whylen, "refused by the peer: %s", text);
    return -KVF_EAUTH;
}

int kvf__auth_client(int fd, const kvf_auth_key_t *key, const char *my_id, uint64_t deadline_ms,
                     const char *expect_id, char *why, size_t whylen)
{
    kvf_stream_t s = {.fd = fd, .tls = NULL};
    return kvf__auth_client_stream(&s, key, my_id, deadline_ms, expect_id, why, whylen);
}

int kvf__auth_server(int fd, const kvf_auth_key_t *key, const char *my_id, uint64_t deadline_ms,
                     char *peer_id, uint8_t first[KVF_AUTH_HDR_LEN], size_t *first_len, char *why,
                     size_t whylen)
{
    kvf_auth_srv_t s;
    uint8_t out[KVF_AUTH_MAX_MSG], body[KVF_AUTH_MAX_BODY], hdr[KVF_AUTH_HDR_LEN];
    uint8_t type;
    size_t len, out_len;
    int rc;
    *first_len = 0;
    kvf__auth_srv_init(&s, key, my_id);
    for (bool first_msg = true;; first_msg = false) {
        rc = kvf__auth_io(fd, hdr, KVF_AUTH_HDR_LEN, false, deadline_ms);
        if (rc) {
            snprintf(why, whylen, "%s", io_text(rc));
            break;
        }
        if (first_msg) {
            memcpy(first, hdr, KVF_AUTH_HDR_LEN);
            *first_len = KVF_AUTH_HDR_LEN;
            if (!kvf__auth_is_magic(hdr)) {
                snprintf(why, whylen, "no authentication handshake: the client has no key");
                rc = -KVF_EPROTO;
                break;
            }
        }
        if (!kvf__auth_hdr_parse(hdr, &type, &len, why, whylen)) {
            out_len = kvf__auth_encode(out, KVF_AUTH_REFUSED, "malformed message", 17, NULL, 0);
            (void)kvf__auth_io(fd, out, out_len, true, deadline_ms);
            rc = -KVF_EPROTO;
            break;
        }
        rc = kvf__auth_io(fd, body, len, false, deadline_ms);
        if (rc) {
            snprintf(why, whylen, "%s", io_text(rc));
            break;
        }
        rc = kvf__auth_srv_step(&s, type, body, len, out, &out_len, why, whylen);
        if (out_len) {
            int src = kvf__auth_io(fd, out, out_len, true, deadline_ms);
            if (rc >= 0 && src) {
                snprintf(why, whylen, "%s", io_text(src));
                rc = src;
            }
        }
        if (rc == 1) {
            memcpy(peer_id, s.peer_id, strlen(s.peer_id) + 1);
            rc = 0;
            break;
        }
        if (rc < 0)
            break;
    }
    kvf__auth_srv_fini(&s);
    return rc;
}

void kvf__auth_send_refused(int fd, const char *reason, uint64_t deadline_ms)
{
    uint8_t out[KVF_AUTH_MAX_MSG];
    size_t rl = strnlen(reason, KVF_AUTH_MAX_ID);
    size_t n = kvf__auth_encode(out, KVF_AUTH_REFUSED, reason, rl, NULL, 0);
    (void)kvf__auth_io(fd, out, n, true, deadline_ms);
}
