/*
 * Internals of the etcd backend (etcd://host:port[,host:port...]), shared by its files; not part
 * of the API.
 *
 * The client speaks etcd v3's JSON gateway (grpc-gateway, served by etcd on its client port at
 * /v3/) over HTTP/1.1 with libcurl: keys and values travel base64-encoded, 64-bit numbers as
 * decimal strings. Each request is tried on the endpoint that answered last and, when that one
 * cannot be reached or answers "unavailable" (no leader, shutting down), on the next, round the
 * list, until request_timeout_ms has passed: a cluster that loses a member keeps serving.
 *
 *   etcd.c        the backend's operations and its ops table
 *   etcd_watch.c  watches (one streaming /v3/watch per watch, on its own thread, resumed from
 *                 the next revision after a failover so no event is lost) and the wait of a
 *                 get-with-wait (a watch of the key from now, then a read once it is created)
 *   etcd_list.c   list by prefix, in pages
 *   etcd_http.c   requests with failover, base64, a pool of curl handles
 *   etcd_tls.c    https: the TLS options on each curl handle, a pinned fingerprint (an OpenSSL
 *                 verify callback on curl's SSL_CTX) and a server name (CURLOPT_CONNECT_TO)
 *
 * With "etcd://user:password@..." the client authenticates (/v3/auth/authenticate) and sends
 * the token with every request and stream; an expired token ("invalid auth token") is renewed
 * once and the request retried.
 *
 * Leases are the lease keeper's (ext.h): etcd leases, re-granted and their keys re-published
 * when etcd lost them. etcd counts lease TTLs in whole seconds (and raises short ones to its
 * minimum, 1.5 x the election timeout): a TTL in ms is rounded up to seconds.
 */
#ifndef KVF_STORE_ETCD_H
#define KVF_STORE_ETCD_H

#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/url.h"
#include "kvferry.h"
#include "store/ext.h"
#include "store/store.h"

#define ETCD_POOL_MAX 8
/* Keys fetched per range request of a list (paged by key). */
#define ETCD_LIST_PAGE 1000
/* Biggest answer accepted from the gateway: a page of ETCD_LIST_PAGE values of the largest size
 * would not fit, so a page also stops at this many bytes (etcd's own limit is 1.5 MiB per
 * request by default; answers are base64, 4/3 of the bytes). */
#define ETCD_MAX_ANSWER (64u << 20)
#define ETCD_BACKOFF_MIN_MS 20u
#define ETCD_BACKOFF_MAX_MS 500u
/* Bound on one connection attempt to one endpoint, so a dead member costs little. */
#define ETCD_CONNECT_MAX_MS 1000u

typedef struct etcd_watch etcd_watch_t;

typedef struct kvf_etcd {
    kvf_store_base_t base; /* first: see store.h */
    char *url;
    kvf_store_opts_t opts;
    unsigned nends;
    char *ends[KVF_URL_MAX_HOSTS]; /* "http://host:port" */
    atomic_uint cur;               /* the endpoint that answered last */
    char user[KVF_URL_CRED_MAX];   /* "" = the cluster has no authentication */
    char password[KVF_URL_CRED_MAX];
    char token[256];               /* from /v3/auth/authenticate; pool_mu */
    /* TLS (https to every endpoint): copies of the caller's options, read-only after open. */
    bool tls;
    bool tls_has_ca;  /* a CA file or directory is set */
    bool tls_pin;     /* a fingerprint is set: tls_fp */
    uint8_t tls_fp[32]; /* the pinned SHA-256 */
    char *tls_ca, *tls_capath, *tls_cert, *tls_key, *tls_key_pem, *tls_key_pw, *tls_crl;
    char *tls_name;   /* the server name (SNI, the name checked), NULL: each endpoint's host */

    pthread_mutex_t pool_mu;
    void *pool[ETCD_POOL_MAX]; /* idle CURL handles (they keep their connections) */
    unsigned npool;

    ext_keeper_t keeper;

    pthread_mutex_t wmu;
    pthread_cond_t wcond;
    etcd_watch_t *watches; /* active */
    etcd_watch_t *dead;    /* unwatched from their own callback: joined at close */
    uint64_t next_wid;
} etcd_t;

/* ---- etcd_http.c ----------------------------------------------------------------------------- */

/* Base64 of @n bytes of @p, malloc'ed and NUL-terminated; NULL when out of memory. */
char *kvf__etcd_b64(const void *p, size_t n);
/* Decode NUL-terminated base64 @s into a malloc'ed buffer (NUL-terminated too), its length in
 * *@n; -KVF_EPROTO when @s is not base64, -KVF_ENOMEM. */
int kvf__etcd_unb64(const char *s, void **out, size_t *n);
/* The range end that makes [@prefix, end) every key starting with @prefix, base64 ("AA==", the
 * key "\0", for the empty prefix: every key). */
char *kvf__etcd_prefix_end(const char *prefix);
/* A JSON string of a decimal 64-bit number, as the gateway wants them. */
json_t *kvf__etcd_num(int64_t v);
/* A decimal field of @obj, 0 when absent. */
int64_t kvf__etcd_get_num(const json_t *obj, const char *field);

/*
 * POST @body (a JSON object; the reference is stolen) to @path ("/v3/kv/range") on the cluster,
 * failing over between endpoints until @timeout_ms has passed. On 0, *@resp holds the answer
 * (json_decref it). An error the cluster answered is returned as its code: -KVF_ENOTFOUND for
 * gRPC NotFound (a lease it does not have), -KVF_EINVAL for InvalidArgument, -KVF_EPROTO else;
 * -KVF_ESTOREDOWN when no endpoint answered in time. The last error reads "store URL: @what: ...".
 */
int kvf__etcd_post(etcd_t *e, const char *path, json_t *body, const char *what,
                   uint64_t timeout_ms, json_t **resp);

/* The "Authorization: TOKEN" header for a request, into @buf (n bytes): "" when the client has
 * no credentials or no token yet. */
void kvf__etcd_auth_header(etcd_t *e, char *buf, size_t n);
/* Get a new token with the URL's user and password: 0, or -KVF_EAUTH / another code. */
int kvf__etcd_authenticate(etcd_t *e, uint64_t timeout_ms);

/* ---- etcd_tls.c ----------------------------------------------------------------------------- */

/* Take TLS options @o (the store URL's first host @host): checked as the built-in client
 * checks them (files, key password, fingerprint), copied; options libcurl cannot honour are
 * refused with -KVF_ENOTSUP naming them (a fingerprint, when libcurl is not built with
 * OpenSSL). Returns 0 or a negative code with the last-error set. */
int kvf__etcd_tls_setup(etcd_t *e, const kvf_tls_opts_t *o, const char *host);
void kvf__etcd_tls_free(etcd_t *e);

/* What one request (or watch stream) needs for its TLS: on the caller's stack, alive until the
 * request's curl handle is done with it (perform returned, the stream ended). */
typedef struct {
    etcd_t *e;
    char why[200];                    /* why the pinned certificate was refused; "" else */
    char conn_to[KVF_HOST_MAX + 40];  /* with a server name: "::HOST:PORT" of the endpoint */
    struct curl_slist conn;           /* CURLOPT_CONNECT_TO's list of that one entry */
} etcd_tls_call_t;

/* Point @curl at @path ("/v3/kv/range") on endpoint @end ("https://host:port"): its URL, and
 * with TLS every TLS option (with a server name, the URL carries the name and the connection
 * goes to @end's address). @call is filled here. */
void kvf__etcd_curl_target(etcd_t *e, void *curl, const char *end, const char *path,
                           etcd_tls_call_t *call);
/* Why a TLS request failed: @call's own reason (a fingerprint that does not match) or, when it
 * has none, @curl_says (curl's message). */
const char *kvf__etcd_tls_why(const etcd_tls_call_t *call, const char *curl_says);
/* Whether curl's @code is a TLS failure (a certificate refused, no TLS on the other side). */
bool kvf__etcd_curl_tls_error(int code);

/* ---- etcd_http.c (the pool) ------------------------------------------------------------------ */

/* curl handles: take one from the pool (or a new one), give it back. */
void *kvf__etcd_curl_get(etcd_t *e);
void kvf__etcd_curl_put(etcd_t *e, void *curl);
void kvf__etcd_pool_free(etcd_t *e);
/* curl_global_init, once per process. */
int kvf__etcd_curl_global(void);

/* ---- etcd_list.c ---------------------------------------------------------------------------- */

/* kvf_store_list() on etcd: every key under @prefix, in byte order, one snapshot. */
int kvf__etcd_list(etcd_t *e, const char *prefix, kvf_store_kv_t **out, size_t *count);

/* ---- etcd_watch.c ---------------------------------------------------------------------------- */

int kvf__etcd_watch(etcd_t *e, const char *prefix, kvf_store_watch_cb cb, void *arg,
                    uint64_t *watch_id);
int kvf__etcd_unwatch(etcd_t *e, uint64_t watch_id);
/* Stop every watch (close). */
void kvf__etcd_watch_stop_all(etcd_t *e);
/*
 * Wait until @key exists, until @deadline_ms: a watch of the key from now, and once etcd has
 * created it a read (so a put before the watch is seen by the read, one after by the watch).
 * 0 with its value (malloc'ed, NUL-terminated) in *@val and *@len; -KVF_ETIMEDOUT when it did
 * not appear; another code when the cluster could not be reached.
 */
int kvf__etcd_wait_put(etcd_t *e, const char *key, uint64_t deadline_ms, const char *what,
                       void **val, size_t *len);

#endif /* KVF_STORE_ETCD_H */
