/*
 * Requests of the etcd backend: JSON over HTTP to the v3 gateway with failover between the
 * cluster's endpoints, base64, and a small pool of curl handles. See etcd.h.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/common.h"
#include "store/etcd.h"

/* ---- base64 ---------------------------------------------------------------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *kvf__etcd_b64(const void *p, size_t n)
{
    const unsigned char *s = p;
    char *o = malloc((n + 2) / 3 * 4 + 1), *w = o;
    if (!o)
        return NULL;
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        *w++ = B64[v >> 18];
        *w++ = B64[(v >> 12) & 63];
        *w++ = B64[(v >> 6) & 63];
        *w++ = B64[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
        *w++ = B64[v >> 18];
        *w++ = B64[(v >> 12) & 63];
        *w++ = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        *w++ = '=';
    }
    *w = '\0';
    return o;
}

static int b64_val(char c)
{
    const char *p = c ? strchr(B64, c) : NULL;
    return p ? (int)(p - B64) : -1;
}

int kvf__etcd_unb64(const char *s, void **out, size_t *n)
{
    size_t len = strlen(s);
    if (len % 4)
        return -KVF_EPROTO;
    unsigned char *o = malloc(len / 4 * 3 + 1);
    if (!o)
        return -KVF_ENOMEM;
    size_t w = 0;
    for (size_t i = 0; i < len; i += 4) {
        int v[4];
        for (int j = 0; j < 4; j++) {
            v[j] = s[i + j] == '=' && i + 4 == len && j >= 2 ? -2 : b64_val(s[i + j]);
            if (v[j] == -1 || (j == 3 && v[2] == -2 && v[3] != -2)) {
                free(o);
                return -KVF_EPROTO;
            }
        }
        uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 |
                     (uint32_t)(v[2] < 0 ? 0 : v[2]) << 6 | (uint32_t)(v[3] < 0 ? 0 : v[3]);
        o[w++] = (unsigned char)(x >> 16);
        if (v[2] >= 0)
            o[w++] = (unsigned char)(x >> 8);
        if (v[3] >= 0)
            o[w++] = (unsigned char)x;
    }
    o[w] = '\0';
    *out = o;
    *n = w;
    return 0;
}

char *kvf__etcd_prefix_end(const char *prefix)
{
    size_t n = strlen(prefix);
    unsigned char buf[KVF_STORE_MAX_KEY_LEN + 1];
    if (n > KVF_STORE_MAX_KEY_LEN)
        return NULL;
    memcpy(buf, prefix, n);
    while (n > 0 && buf[n - 1] == 0xff)
        n--;
    if (n == 0)
        return kvf__etcd_b64("", 1); /* "\0": to the end of the key space */
    buf[n - 1]++;
    return kvf__etcd_b64(buf, n);
}

json_t *kvf__etcd_num(int64_t v)
{
    char s[24];
    snprintf(s, sizeof(s), "%" PRId64, v);
    return json_string(s);
}

int64_t kvf__etcd_get_num(const json_t *obj, const char *field)
{
    json_t *v = obj ? json_object_get(obj, field) : NULL;
    if (json_is_integer(v))
        return (int64_t)json_integer_value(v);
    if (json_is_string(v))
        return strtoll(json_string_value(v), NULL, 10);
    return 0;
}

/* ---- curl ------------------------------------------------------------------------------------ */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static CURLcode g_init_rc;

static void global_init(void)
{
    g_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int kvf__etcd_curl_global(void)
{
    pthread_once(&g_once, global_init);
    return g_init_rc == CURLE_OK ? 0 : -KVF_ENOMEM;
}

void *kvf__etcd_curl_get(etcd_t *e)
{
    void *c = NULL;
    pthread_mutex_lock(&e->pool_mu);
    if (e->npool)
        c = e->pool[--e->npool];
    pthread_mutex_unlock(&e->pool_mu);
    return c ? c : curl_easy_init();
}

void kvf__etcd_curl_put(etcd_t *e, void *curl)
{
    pthread_mutex_lock(&e->pool_mu);
    if (e->npool < ETCD_POOL_MAX) {
        e->pool[e->npool++] = curl;
        curl = NULL;
    }
    pthread_mutex_unlock(&e->pool_mu);
    if (curl)
        curl_easy_cleanup(curl);
}

void kvf__etcd_pool_free(etcd_t *e)
{
    while (e->npool)
        curl_easy_cleanup(e->pool[--e->npool]);
}

/* ---- requests -------------------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t n, cap;
    bool too_big;
} rbuf_t;

static size_t on_data(char *p, size_t size, size_t nmemb, void *arg)
{
    rbuf_t *b = arg;
    size_t n = size * nmemb;
    if (b->n + n + 1 > ETCD_MAX_ANSWER) {
        b->too_big = true;
        return 0;
    }
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q)
            return 0;
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
    b->p[b->n] = '\0';
    return n;
}

static void nap_ms(uint64_t ms)
{
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void kvf__etcd_auth_header(etcd_t *e, char *buf, size_t n)
{
    pthread_mutex_lock(&e->pool_mu);
    if (e->token[0])
        snprintf(buf, n, "Authorization: %s", e->token);
    else
        buf[0] = '\0';
    pthread_mutex_unlock(&e->pool_mu);
}

/* One POST to endpoint @end. 0 with *@resp, 1 to try the next endpoint (with @why), 2 when the
 * token was refused (authenticate and retry), or a final negative code (message set). */
static int post_once(etcd_t *e, CURL *c, const char *end, const char *path, const char *body,
                     uint64_t timeout_ms, const char *what, json_t **resp, char *why, size_t wn)
{
    char auth[300];
    rbuf_t b = {0};
    struct curl_slist *hdr = NULL;
    etcd_tls_call_t call;
    curl_easy_reset(c);
    kvf__etcd_auth_header(e, auth, sizeof(auth));
    if (auth[0] && strcmp(path, "/v3/auth/authenticate") != 0) {
        hdr = curl_slist_append(NULL, auth);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    }
    kvf__etcd_curl_target(e, c, end, path, &call);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)(timeout_ms ? timeout_ms : 1));
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)(timeout_ms < ETCD_CONNECT_MAX_MS ? (timeout_ms ? timeout_ms : 1)
                                                              : ETCD_CONNECT_MAX_MS));
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    char cerr[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, cerr);
    CURLcode cc = curl_easy_perform(c);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, NULL);
    curl_slist_free_all(hdr);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (e->tls && (cc == CURLE_SEND_ERROR || cc == CURLE_RECV_ERROR) &&
        strcmp(what, "open") == 0 && !strstr(cerr, "reset")) {
        /* TLS 1.3 ends the client's handshake before the server has checked its certificate:
         * a refusal shows as the first request failing on a fresh connection. */
        free(b.p);
        return kvf__err(-KVF_ETLS,
                        "store %s: %s: TLS with %s failed: etcd closed the connection after the "
                        "handshake: it refused this client's certificate (%s) (%s)",
                        e->url, what, end,
                        e->tls_cert ? "is it signed by a CA etcd trusts?"
                                    : "none is set: --tls-cert and --tls-key",
                        cerr[0] ? cerr : curl_easy_strerror(cc));
    }
    if (cc != CURLE_OK && kvf__etcd_curl_tls_error((int)cc)) {
        /* A refused certificate is refused again: fail now, with curl's reason. */
        free(b.p);
        return kvf__err(-KVF_ETLS, "store %s: %s: TLS with %s%s%s%s failed: %s%s", e->url, what,
                        end, e->tls_name ? " (server name " : "",
                        e->tls_name ? e->tls_name : "", e->tls_name ? ")" : "",
                        kvf__etcd_tls_why(&call, cerr[0] ? cerr : curl_easy_strerror(cc)),
                        cc == CURLE_SSL_CONNECT_ERROR && strstr(cerr, "wrong version number")
                            ? " (does etcd serve https?)"
                            : "");
    }
    if (cc != CURLE_OK) {
        snprintf(why, wn, "%s: %s", end, b.too_big ? "answer too large" : curl_easy_strerror(cc));
        free(b.p);
        return b.too_big ? kvf__err(-KVF_ETOOBIG, "store %s: %s: the answer exceeds %u bytes",
                                    e->url, what, ETCD_MAX_ANSWER)
                         : 1;
    }
    json_error_t jerr;
    json_t *j = b.p ? json_loadb(b.p, b.n, 0, &jerr) : NULL;
    free(b.p);
    if (!json_is_object(j)) {
        json_decref(j);
        if (status == 404 || status == 405)
            return kvf__err(-KVF_EPROTO,
                            "store %s: %s: %s answered HTTP %ld: is it an etcd v3.4+ with its "
                            "JSON gateway at /v3/?",
                            e->url, what, end, status);
        snprintf(why, wn, "%s: HTTP %ld with no JSON answer", end, status);
        return status >= 500 ? 1 : kvf__err(-KVF_EPROTO, "store %s: %s: %s", e->url, what, why);
    }
    json_t *err = json_object_get(j, "error");
    if (!err) {
        json_t *res = json_object_get(j, "result"); /* streaming methods wrap their answer */
        if (json_is_object(res) && json_object_size(j) == 1) {
            json_incref(res);
            json_decref(j);
            j = res;
            err = json_object_get(j, "error");
        }
    }
    if (err || status != 200) {
        int64_t code = kvf__etcd_get_num(j, "code");
        const char *m = json_is_string(err) ? json_string_value(err)
                        : json_string_value(json_object_get(j, "message"));
        char msg[160];
        snprintf(msg, sizeof(msg), "%s", m ? m : "error");
        json_decref(j);
        snprintf(why, wn, "%.64s: %s (HTTP %ld)", end, msg, status);
        if (code == 14 || code == 4 || status == 503) /* unavailable, deadline: another member */
            return 1;
        bool is_auth = code == 16 || code == 7 || strstr(msg, "authentication failed") ||
                       strstr(msg, "user name is empty");
        if (e->user[0] && strcmp(path, "/v3/auth/authenticate") != 0 &&
            (code == 16 || strstr(msg, "user name is empty")))
            return 2; /* no token yet, or it expired */
        int rc = is_auth ? -KVF_EAUTH : code == 5 ? -KVF_ENOTFOUND : code == 3 ? -KVF_EINVAL
                                                                               : -KVF_EPROTO;
        if (is_auth && !e->user[0])
            return kvf__err(rc, "store %s: %s: %s (the cluster requires authentication: "
                            "etcd://user:password@host:port)", e->url, what, msg);
        return kvf__err(rc, "store %s: %s: %s", e->url, what, msg);
    }
    *resp = j;
    return 0;
}

int kvf__etcd_authenticate(etcd_t *e, uint64_t timeout_ms)
{
    json_t *r = NULL;
    int rc = kvf__etcd_post(e, "/v3/auth/authenticate",
                            json_pack("{s:s,s:s}", "name", e->user, "password", e->password),
                            "authenticate", timeout_ms, &r);
    const char *tok = json_string_value(json_object_get(r, "token"));
    if (rc == 0 && !tok)
        rc = kvf__err(-KVF_EPROTO, "store %s: authenticate: no token in the answer (is "
                      "authentication enabled on the cluster?)", e->url);
    if (rc == 0) {
        pthread_mutex_lock(&e->pool_mu);
        snprintf(e->token, sizeof(e->token), "%s", tok);
        pthread_mutex_unlock(&e->pool_mu);
    }
    json_decref(r);
    return rc;
}

int kvf__etcd_post(etcd_t *e, const char *path, json_t *body, const char *what,
                   uint64_t timeout_ms, json_t **resp)
{
    *resp = NULL;
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (!text)
        return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
    CURL *c = kvf__etcd_curl_get(e);
    if (!c) {
        free(text);
        return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
    }
    uint64_t deadline = kvf__now_ms() + timeout_ms;
    uint32_t backoff = ETCD_BACKOFF_MIN_MS;
    char why[EXT_MSG_MAX] = "no endpoint tried";
    bool reauthed = false;
    int rc;
    for (;;) {
        unsigned start = atomic_load(&e->cur) % e->nends;
        rc = 1;
        for (unsigned k = 0; k < e->nends && rc == 1; k++) {
            unsigned i = (start + k) % e->nends;
            uint64_t now = kvf__now_ms();
            if (now >= deadline)
                break;
            rc = post_once(e, c, e->ends[i], path, text, deadline - now, what, resp, why,
                           sizeof(why));
            if (rc != 1 && i != start)
                atomic_store(&e->cur, i);
            if (rc == 1)
                KVF_DEBUG("store", "%s: %s: %s", e->url, what, why);
        }
        if (rc == 2) {
            /* Authenticate (once per request) and send it again. */
            uint64_t t = kvf__now_ms();
            rc = reauthed ? kvf__err(-KVF_EAUTH, "store %s: %s: the new token was refused too",
                                     e->url, what)
                          : kvf__etcd_authenticate(e, deadline > t ? deadline - t : 1);
            reauthed = true;
            if (rc == 0) {
                rc = 1;
                continue;
            }
            break;
        }
        uint64_t now = kvf__now_ms();
        if (rc != 1 || now >= deadline)
            break;
        nap_ms(deadline - now < backoff ? deadline - now : backoff);
        backoff = backoff * 2 > ETCD_BACKOFF_MAX_MS ? ETCD_BACKOFF_MAX_MS : backoff * 2;
    }
    kvf__etcd_curl_put(e, c);
    free(text);
    if (rc == 1)
        rc = kvf__err(-KVF_ESTOREDOWN, "store %s: %s: no etcd endpoint answered within %" PRIu64
                      " ms (last: %s)", e->url, what, timeout_ms, why);
    return rc;
}
