/*
 * Watches of the etcd backend, and the wait of a get-with-wait: streaming POSTs to the gateway's
 * /v3/watch, each answer a JSON object on its own line. A watch runs on its own thread with its
 * own curl multi handle (so unwatch() can wake it at once) and remembers the revision after the
 * last event it delivered: when its stream breaks (a member died), it opens a new one on the next
 * endpoint from that revision, so no event is lost or repeated. If etcd compacted that revision
 * away meanwhile, the watch re-lists the prefix and delivers every key as a put (deletes in the
 * compacted range cannot be recovered; docs/operations.md says to keep etcd's auto-compaction
 * retention above the longest outage). See etcd.h.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/thread.h"
#include "store/etcd.h"

struct etcd_watch {
    etcd_watch_t *next;
    etcd_t *e;
    uint64_t id;
    char *prefix;
    kvf_store_watch_cb cb;
    void *arg;
    pthread_t th;
    CURLM *multi;
    atomic_bool stop;
    int64_t next_rev;
    bool resync;
};

/* ---- one stream ------------------------------------------------------------------------------ */

typedef enum { ST_BROKEN, ST_DONE, ST_STOPPED, ST_TIMEOUT } stream_end_t;

typedef struct {
    /* Called with each "result" object; returns true when the stream has given what it wanted. */
    bool (*on_result)(void *arg, json_t *result);
    void *arg;
    char *buf;
    size_t n, cap;
    bool done;
    char why[EXT_MSG_MAX];
} stream_t;

static size_t on_stream(char *p, size_t size, size_t nmemb, void *arg)
{
    stream_t *s = arg;
    size_t n = size * nmemb;
    if (s->n + n + 1 > ETCD_MAX_ANSWER) {
        snprintf(s->why, sizeof(s->why), "a watch answer exceeds %u bytes", ETCD_MAX_ANSWER);
        return 0;
    }
    if (s->n + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->n + n + 1)
            cap *= 2;
        char *q = realloc(s->buf, cap);
        if (!q)
            return 0;
        s->buf = q;
        s->cap = cap;
    }
    memcpy(s->buf + s->n, p, n);
    s->n += n;
    char *nl;
    while (!s->done && (nl = memchr(s->buf, '\n', s->n))) {
        size_t ln = (size_t)(nl - s->buf);
        json_t *j = json_loadb(s->buf, ln, 0, NULL);
        memmove(s->buf, nl + 1, s->n - ln - 1);
        s->n -= ln + 1;
        if (!j)
            continue;
        json_t *res = json_object_get(j, "result");
        json_t *err = json_object_get(j, "error");
        if (err) {
            const char *m = json_is_object(err)
                                ? json_string_value(json_object_get(err, "message"))
                                : json_string_value(err);
            snprintf(s->why, sizeof(s->why), "%s", m ? m : "watch error");
            json_decref(j);
            return 0;
        }
        if (res && s->on_result(s->arg, res))
            s->done = true;
        json_decref(j);
    }
    return s->done ? 0 : n;
}

/* POST @body to /v3/watch on @end and feed its answers to @s until it is done, the stream
 * breaks, @stop is set or @deadline_ms (0: none) passes. */
static stream_end_t stream_run(etcd_t *e, CURLM *m, const char *end, const char *body,
                               stream_t *s, atomic_bool *stop, uint64_t deadline_ms)
{
    char auth[300];
    struct curl_slist *hdr = NULL;
    etcd_tls_call_t call;
    CURL *c = curl_easy_init();
    if (!c) {
        snprintf(s->why, sizeof(s->why), "out of memory");
        return ST_BROKEN;
    }
    kvf__etcd_auth_header(e, auth, sizeof(auth));
    if (auth[0]) {
        hdr = curl_slist_append(NULL, auth);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    }
    kvf__etcd_curl_target(e, c, end, "/v3/watch", &call);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_stream);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)ETCD_CONNECT_MAX_MS);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPIDLE, 5L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPINTVL, 2L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_multi_add_handle(m, c);
    stream_end_t how = ST_BROKEN;
    for (;;) {
        int running = 0;
        curl_multi_perform(m, &running);
        if (s->done) {
            how = ST_DONE;
            break;
        }
        if (atomic_load(stop)) {
            how = ST_STOPPED;
            break;
        }
        if (!running) {
            int left;
            CURLMsg *msg = curl_multi_info_read(m, &left);
            if (!s->why[0])
                snprintf(s->why, sizeof(s->why), "%s: %s", end,
                         kvf__etcd_tls_why(&call, msg ? curl_easy_strerror(msg->data.result)
                                                      : "stream ended"));
            break;
        }
        uint64_t now = kvf__now_ms();
        if (deadline_ms && now >= deadline_ms) {
            how = ST_TIMEOUT;
            break;
        }
        uint64_t wait = deadline_ms && deadline_ms - now < 1000 ? deadline_ms - now : 1000;
        curl_multi_poll(m, NULL, 0, (int)wait, NULL);
    }
    curl_multi_remove_handle(m, c);
    curl_easy_cleanup(c);
    curl_slist_free_all(hdr);
    free(s->buf);
    s->buf = NULL;
    s->n = s->cap = 0;
    return how;
}

static char *create_body(const char *key_b64, const char *end_b64, int64_t rev)
{
    json_t *cr = json_pack("{s:s,s:o}", "key", key_b64, "start_revision", kvf__etcd_num(rev));
    if (cr && end_b64)
        json_object_set_new(cr, "range_end", json_string(end_b64));
    json_t *b = cr ? json_pack("{s:o}", "create_request", cr) : NULL;
    char *t = b ? json_dumps(b, JSON_COMPACT) : NULL;
    json_decref(b);
    return t;
}

/* A short pause between failed streams that unwatch() can cut short. */
static void pause_ms(CURLM *m, uint32_t ms)
{
    curl_multi_poll(m, NULL, 0, (int)ms, NULL);
}

/* ---- get-with-wait --------------------------------------------------------------------------- */

typedef struct {
    etcd_t *e;
    const char *key, *what;
    void *val;
    size_t len;
    int rc;
} waitput_t;

/* The key's value now: true (done) when it is there, or when the read failed (w->rc). */
static bool waitput_read(waitput_t *w)
{
    json_t *b = json_object(), *r = NULL;
    char *k = kvf__etcd_b64(w->key, strlen(w->key));
    if (!b || !k || json_object_set_new(b, "key", json_string(k)) < 0) {
        free(k);
        json_decref(b);
        w->rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", w->e->url, w->what);
        return true;
    }
    free(k);
    w->rc = kvf__etcd_post(w->e, "/v3/kv/range", b, w->what, w->e->opts.request_timeout_ms, &r);
    json_t *kv = w->rc == 0 ? json_array_get(json_object_get(r, "kvs"), 0) : NULL;
    bool done = w->rc < 0 || kv;
    if (kv) {
        const char *v = json_string_value(json_object_get(kv, "value"));
        w->rc = kvf__etcd_unb64(v ? v : "", &w->val, &w->len);
    }
    json_decref(r);
    return done;
}

static bool waitput_result(void *arg, json_t *res)
{
    waitput_t *w = arg;
    /* The watch is in place (from the current revision, so etcd delivers at once): a read now
     * sees every put before it, the watch every put after. */
    if (json_is_true(json_object_get(res, "created")))
        return waitput_read(w);
    size_t i;
    json_t *ev;
    json_array_foreach(json_object_get(res, "events"), i, ev) {
        const char *type = json_string_value(json_object_get(ev, "type"));
        if (type && strcmp(type, "DELETE") == 0)
            continue;
        const char *v = json_string_value(json_object_get(json_object_get(ev, "kv"), "value"));
        w->rc = kvf__etcd_unb64(v ? v : "", &w->val, &w->len);
        return true;
    }
    return false;
}

int kvf__etcd_wait_put(etcd_t *e, const char *key, uint64_t deadline_ms, const char *what,
                       void **val, size_t *len)
{
    char *k = kvf__etcd_b64(key, strlen(key));
    /* From the current revision: a watch that starts in the past is only caught up by etcd's
     * background sync, every 100 ms. */
    char *body = k ? create_body(k, NULL, 0) : NULL;
    CURLM *m = body ? curl_multi_init() : NULL;
    free(k);
    if (!m) {
        free(body);
        return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
    }
    atomic_bool never = false;
    waitput_t w = {.e = e, .key = key, .what = what};
    stream_t s = {.on_result = waitput_result, .arg = &w};
    unsigned idx = atomic_load(&e->cur);
    stream_end_t how = ST_BROKEN;
    uint64_t down_since = 0;
    for (;;) {
        how = stream_run(e, m, e->ends[idx % e->nends], body, &s, &never, deadline_ms);
        if (how != ST_BROKEN)
            break;
        /* A broken stream: the next member; the read after its creation covers the gap. */
        uint64_t now = kvf__now_ms();
        if (!down_since)
            down_since = now;
        if (now >= deadline_ms || now - down_since >= e->opts.request_timeout_ms)
            break;
        KVF_DEBUG("store", "%s: %s: %s", e->url, what, s.why);
        if (e->user[0] && strstr(s.why, "auth"))
            kvf__etcd_authenticate(e, e->opts.request_timeout_ms);
        s.why[0] = '\0';
        idx++;
        pause_ms(m, ETCD_BACKOFF_MIN_MS);
    }
    curl_multi_cleanup(m);
    free(body);
    if (how == ST_DONE) {
        if (w.rc == -KVF_EPROTO)
            return kvf__err(-KVF_EPROTO, "store %s: %s: the gateway sent bad base64", e->url, what);
        if (w.rc < 0)
            return w.rc;
        *val = w.val;
        *len = w.len;
        return 0;
    }
    if (how == ST_TIMEOUT || kvf__now_ms() >= deadline_ms)
        return -KVF_ETIMEDOUT;
    return kvf__err(-KVF_ESTOREDOWN, "store %s: %s: the wait was cut off: %s", e->url, what,
                    s.why);
}

/* ---- watches --------------------------------------------------------------------------------- */

static bool watch_result(void *arg, json_t *res)
{
    etcd_watch_t *w = arg;
    if (json_is_true(json_object_get(res, "canceled"))) {
        int64_t cr = kvf__etcd_get_num(res, "compact_revision");
        if (cr > 0)
            w->resync = true;
        return true;
    }
    size_t i;
    json_t *ev;
    json_array_foreach(json_object_get(res, "events"), i, ev) {
        json_t *kvj = json_object_get(ev, "kv");
        const char *type = json_string_value(json_object_get(ev, "type"));
        bool del = type && strcmp(type, "DELETE") == 0;
        const char *ks = json_string_value(json_object_get(kvj, "key"));
        const char *vs = json_string_value(json_object_get(kvj, "value"));
        int64_t rev = kvf__etcd_get_num(kvj, "mod_revision");
        kvf_store_kv_t kv = {0};
        size_t kl = 0;
        if (kvf__etcd_unb64(ks ? ks : "", (void **)&kv.key, &kl) < 0 ||
            (!del && kvf__etcd_unb64(vs ? vs : "", &kv.val, &kv.val_len) < 0)) {
            free(kv.key);
            KVF_WARN("store", "%s: watch %" PRIu64 ": an event with bad base64 was dropped",
                     w->e->url, w->id);
            continue;
        }
        if (!atomic_load(&w->stop))
            w->cb(w->arg, del ? KVF_STORE_EVENT_DELETE : KVF_STORE_EVENT_PUT, &kv);
        free(kv.key);
        free(kv.val);
        if (rev >= w->next_rev)
            w->next_rev = rev + 1;
    }
    return atomic_load(&w->stop);
}

/* The watch's revision was compacted away: deliver what is there now as puts, and go on from
 * the revision of that read. */
static void watch_resync(etcd_watch_t *w)
{
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    json_t *r = NULL;
    /* The revision first: every change after it is delivered by the stream that follows. */
    if (kvf__etcd_post(w->e, "/v3/maintenance/status", json_object(), "watch resync",
                       w->e->opts.request_timeout_ms, &r) < 0)
        return;
    int64_t rev = kvf__etcd_get_num(json_object_get(r, "header"), "revision");
    json_decref(r);
    if (kvf__etcd_list(w->e, w->prefix, &kvs, &n) < 0)
        return;
    KVF_WARN("store", "%s: watch %" PRIu64 " of \"%s\": events were compacted away; re-delivering "
             "%zu keys as puts", w->e->url, w->id, w->prefix, n);
    for (size_t i = 0; i < n && !atomic_load(&w->stop); i++)
        w->cb(w->arg, KVF_STORE_EVENT_PUT, &kvs[i]);
    kvf_store_kv_free(kvs, n);
    w->next_rev = rev + 1;
    w->resync = false;
}

static void *watch_main(void *arg)
{
    etcd_watch_t *w = arg;
    etcd_t *e = w->e;
    char *k = *w->prefix ? kvf__etcd_b64(w->prefix, strlen(w->prefix)) : kvf__etcd_b64("", 1);
    char *end = kvf__etcd_prefix_end(w->prefix);
    unsigned idx = atomic_load(&e->cur);
    uint32_t backoff = ETCD_BACKOFF_MIN_MS;
    while (k && end && !atomic_load(&w->stop)) {
        if (w->resync)
            watch_resync(w);
        char *body = create_body(k, end, w->next_rev);
        if (!body)
            break;
        stream_t s = {.on_result = watch_result, .arg = w};
        uint64_t t0 = kvf__now_ms();
        stream_end_t how =
            stream_run(e, w->multi, e->ends[idx % e->nends], body, &s, &w->stop, 0);
        free(body);
        if (how == ST_STOPPED || atomic_load(&w->stop))
            break;
        if (w->resync)
            continue;
        KVF_DEBUG("store", "%s: watch %" PRIu64 ": stream ended (%s); resuming at revision %" PRId64,
                  e->url, w->id, s.why, w->next_rev);
        if (e->user[0] && strstr(s.why, "auth"))
            kvf__etcd_authenticate(e, e->opts.request_timeout_ms);
        idx++;
        if (kvf__now_ms() - t0 > 2000)
            backoff = ETCD_BACKOFF_MIN_MS;
        pause_ms(w->multi, backoff);
        backoff = backoff * 2 > ETCD_BACKOFF_MAX_MS ? ETCD_BACKOFF_MAX_MS : backoff * 2;
    }
    free(k);
    free(end);
    return NULL;
}

static void watch_free(etcd_watch_t *w)
{
    curl_multi_cleanup(w->multi);
    free(w->prefix);
    free(w);
}

int kvf__etcd_watch(etcd_t *e, const char *prefix, kvf_store_watch_cb cb, void *arg,
                    uint64_t *watch_id)
{
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(e->url, "watch", prefix, true);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "watch", prefix);
    if (!cb || !watch_id)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL", e->url, what,
                        cb ? "watch_id" : "the callback");
    *watch_id = 0;
    /* The revision now: the watch delivers every change after it, however late its stream
     * opens. */
    json_t *r = NULL;
    rc = kvf__etcd_post(e, "/v3/maintenance/status", json_object(), what,
                        e->opts.request_timeout_ms, &r);
    if (rc < 0)
        return rc;
    int64_t rev = kvf__etcd_get_num(json_object_get(r, "header"), "revision");
    json_decref(r);
    etcd_watch_t *w = calloc(1, sizeof(*w));
    if (w) {
        w->prefix = strdup(prefix);
        w->multi = curl_multi_init();
    }
    if (!w || !w->prefix || !w->multi) {
        if (w)
            watch_free(w);
        return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
    }
    w->e = e;
    w->cb = cb;
    w->arg = arg;
    w->next_rev = rev + 1;
    pthread_mutex_lock(&e->wmu);
    w->id = e->next_wid++;
    rc = kvf__thread_start(&w->th, "kvf-etcd-watch", 0, watch_main, w);
    if (rc < 0) {
        pthread_mutex_unlock(&e->wmu);
        watch_free(w);
        return kvf__err(rc, "store %s: %s: cannot start its thread: %s", e->url, what,
                        kvf_strerror(rc));
    }
    w->next = e->watches;
    e->watches = w;
    *watch_id = w->id;
    pthread_mutex_unlock(&e->wmu);
    return 0;
}

int kvf__etcd_unwatch(etcd_t *e, uint64_t watch_id)
{
    pthread_mutex_lock(&e->wmu);
    etcd_watch_t **pp, *w = NULL;
    for (pp = &e->watches; *pp; pp = &(*pp)->next) {
        if ((*pp)->id == watch_id) {
            w = *pp;
            *pp = w->next;
            break;
        }
    }
    if (!w) {
        pthread_mutex_unlock(&e->wmu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: unwatch %" PRIu64 ": no such watch", e->url,
                        watch_id);
    }
    atomic_store(&w->stop, true);
    curl_multi_wakeup(w->multi);
    if (pthread_equal(pthread_self(), w->th)) {
        /* From its own callback: it stops when the callback returns; joined at close. */
        w->next = e->dead;
        e->dead = w;
        pthread_mutex_unlock(&e->wmu);
        return 0;
    }
    pthread_mutex_unlock(&e->wmu);
    pthread_join(w->th, NULL);
    watch_free(w);
    return 0;
}

void kvf__etcd_watch_stop_all(etcd_t *e)
{
    pthread_mutex_lock(&e->wmu);
    etcd_watch_t *all = e->watches, *dead = e->dead;
    e->watches = e->dead = NULL;
    pthread_mutex_unlock(&e->wmu);
    for (etcd_watch_t *w = all; w; w = w->next) {
        atomic_store(&w->stop, true);
        curl_multi_wakeup(w->multi);
    }
    while (all || dead) {
        etcd_watch_t *w = all ? all : dead;
        if (all)
            all = w->next;
        else
            dead = w->next;
        pthread_join(w->th, NULL);
        watch_free(w);
    }
}
