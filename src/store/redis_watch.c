/*
 * Watches of the Redis backend and the wait of a get-with-wait, on the backend's event channel
 * (every write publishes its key and value there) and keyspace notifications of expiries. Each
 * watch owns a subscriber connection and a thread that polls it beside an eventfd (so unwatch()
 * wakes it at once). After a reconnect it re-lists its prefix and reports what changed while it
 * was away (see redis.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/common.h"
#include "common/thread.h"
#include "store/redis.h"

struct redis_watch {
    redis_watch_t *next;
    redis_t *r;
    uint64_t id;
    char *prefix;
    kvf_store_watch_cb cb;
    void *arg;
    pthread_t th;
    int wake_fd;
    atomic_bool stop;
    bool ready; /* subscribed once (r->wmu) */
    /* Keys under the prefix this watch has reported present, to tell deletes after a resync. */
    char **known;
    size_t nknown, capknown;
};

/* ---- the set of known keys ------------------------------------------------------------------- */

static ssize_t known_find(redis_watch_t *w, const char *key)
{
    for (size_t i = 0; i < w->nknown; i++)
        if (strcmp(w->known[i], key) == 0)
            return (ssize_t)i;
    return -1;
}

static void known_add(redis_watch_t *w, const char *key)
{
    if (known_find(w, key) >= 0)
        return;
    if (w->nknown == w->capknown) {
        size_t nc = w->capknown ? w->capknown * 2 : 16;
        char **g = realloc(w->known, nc * sizeof(*g));
        if (!g)
            return;
        w->known = g;
        w->capknown = nc;
    }
    char *k = strdup(key);
    if (k)
        w->known[w->nknown++] = k;
}

static void known_del(redis_watch_t *w, const char *key)
{
    ssize_t i = known_find(w, key);
    if (i < 0)
        return;
    free(w->known[i]);
    w->known[i] = w->known[--w->nknown];
}

static void deliver(redis_watch_t *w, kvf_store_event_type_t type, const char *key, void *val,
                    size_t len)
{
    if (type == KVF_STORE_EVENT_PUT)
        known_add(w, key);
    else
        known_del(w, key);
    kvf_store_kv_t kv = {.key = (char *)key, .val = val, .val_len = len};
    if (!atomic_load(&w->stop))
        w->cb(w->arg, type, &kv);
}

/* ---- subscriber connections ------------------------------------------------------------------ */

/* Subscribe @c to @channel (a pattern when @pattern) and read the confirmation. */
static int subscribe(redisContext *c, const char *channel, bool pattern)
{
    const char *argv[] = {pattern ? "PSUBSCRIBE" : "SUBSCRIBE", channel};
    size_t lens[] = {strlen(argv[0]), strlen(channel)};
    redisReply *rep = redisCommandArgv(c, 2, argv, lens);
    int ok = rep && rep->type == REDIS_REPLY_ARRAY;
    if (rep)
        freeReplyObject(rep);
    return ok ? 0 : -1;
}

/* One change, from the backend's channel or a keyspace notification. */
typedef struct {
    kvf_store_event_type_t type;
    char *key; /* malloc'ed */
    void *val; /* malloc'ed, NUL-terminated; NULL for deletes */
    size_t len;
} change_t;

static void change_free(change_t *ch)
{
    free(ch->key);
    free(ch->val);
}

/* A change in message @m: from the channel ("P" key NUL value, "D" key), or an expiry or
 * eviction from keyspace channel prefix @ks. False when @m is anything else (or out of memory). */
static bool parse_change(const redisReply *m, const char *ks, change_t *ch)
{
    memset(ch, 0, sizeof(*ch));
    if (m->type != REDIS_REPLY_ARRAY || m->elements < 3 ||
        m->element[0]->type != REDIS_REPLY_STRING)
        return false;
    if (strcmp(m->element[0]->str, "message") == 0) {
        const redisReply *p = m->element[2];
        if (p->type != REDIS_REPLY_STRING || p->len < 2 || (p->str[0] != 'P' && p->str[0] != 'D'))
            return false;
        const char *nul = memchr(p->str + 1, '\0', p->len - 1);
        size_t kl = nul ? (size_t)(nul - p->str - 1) : p->len - 1;
        ch->type = p->str[0] == 'P' ? KVF_STORE_EVENT_PUT : KVF_STORE_EVENT_DELETE;
        ch->key = kvf__ext_dup(p->str + 1, kl);
        if (ch->type == KVF_STORE_EVENT_PUT) {
            if (!nul)
                return false;
            ch->len = p->len - kl - 2;
            ch->val = kvf__ext_dup(nul + 1, ch->len);
            if (!ch->val) {
                change_free(ch);
                return false;
            }
        }
        return ch->key != NULL;
    }
    if (strcmp(m->element[0]->str, "pmessage") == 0 && m->elements >= 4) {
        const char *chan = m->element[2]->str, *ev = m->element[3]->str;
        size_t pl = strlen(ks);
        if (strncmp(chan, ks, pl) != 0 || (strcmp(ev, "expired") && strcmp(ev, "evicted")))
            return false;
        ch->type = KVF_STORE_EVENT_DELETE;
        ch->key = strdup(chan + pl);
        return ch->key != NULL;
    }
    return false;
}

/* Next message on @c, waiting until @deadline_ms (0: a second) or a wake-up on @wake_fd.
 * 1 with *@out, 0 when nothing came, -1 when the connection broke. */
static int next_message(redisContext *c, int wake_fd, uint64_t deadline_ms, redisReply **out)
{
    void *rep = NULL;
    if (redisGetReplyFromReader(c, &rep) != REDIS_OK)
        return -1;
    if (rep) {
        *out = rep;
        return 1;
    }
    uint64_t now = kvf__now_ms();
    int tmo = deadline_ms ? (deadline_ms > now ? (int)(deadline_ms - now) : 0) : 1000;
    struct pollfd p[2] = {{.fd = c->fd, .events = POLLIN}, {.fd = wake_fd, .events = POLLIN}};
    int n = poll(p, wake_fd >= 0 ? 2 : 1, tmo);
    if (n <= 0 || !(p[0].revents & (POLLIN | POLLHUP | POLLERR)))
        return 0;
    if (redisBufferRead(c) != REDIS_OK)
        return -1;
    if (redisGetReplyFromReader(c, &rep) != REDIS_OK)
        return -1;
    *out = rep;
    return rep ? 1 : 0;
}

/* ---- get-with-wait --------------------------------------------------------------------------- */

int kvf__redis_wait_key(redis_t *r, const char *key, uint64_t deadline_ms, const char *what,
                        void **val, size_t *len)
{
    char chan[KVF__REDIS_CHANNEL_MAX], why[EXT_MSG_MAX] = "";
    kvf__redis_channel(r, chan, sizeof(chan));
    redisContext *c = NULL;
    int rc = -KVF_ETIMEDOUT;
    /* Subscribe first, then read: a set between the two is seen by one or the other. */
    while (kvf__now_ms() < deadline_ms) {
        if (!c) {
            c = kvf__redis_connect(r, r->opts.request_timeout_ms, why, sizeof(why));
            if (!c || subscribe(c, chan, false) < 0) {
                if (c)
                    redisFree(c);
                c = NULL;
                rc = kvf__err(-KVF_ESTOREDOWN, "store %s: %s: cannot subscribe: %s", r->url, what,
                              why[0] ? why : "connection lost");
                break;
            }
            rc = kvf__redis_get(r, what, key, val, len);
            if (rc <= 0)
                break;
            rc = -KVF_ETIMEDOUT;
        }
        redisReply *m = NULL;
        int got = next_message(c, -1, deadline_ms, &m);
        if (got < 0) {
            redisFree(c); /* subscribe and read again */
            c = NULL;
            continue;
        }
        change_t ch;
        bool hit = got > 0 && parse_change(m, "", &ch);
        if (m)
            freeReplyObject(m);
        if (hit && ch.type == KVF_STORE_EVENT_PUT && strcmp(ch.key, key) == 0) {
            *val = ch.val;
            *len = ch.len;
            ch.val = NULL;
            rc = 0;
        }
        if (hit)
            change_free(&ch);
        if (rc == 0)
            break;
    }
    if (c)
        redisFree(c);
    return rc;
}

/* ---- watches --------------------------------------------------------------------------------- */

/* Re-list the prefix and report the differences with what the watch knew. */
static void resync(redis_watch_t *w)
{
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0;
    if (kvf__redis_list(w->r, w->prefix, &kvs, &n) < 0) {
        KVF_WARN("store", "%s: watch %" PRIu64 ": resync failed: %s", w->r->url, w->id,
                 kvf_last_error());
        return;
    }
    /* Deletes first: keys known before and not there now. */
    for (size_t i = w->nknown; i-- > 0;) {
        bool present = false;
        for (size_t j = 0; j < n && !present; j++)
            present = strcmp(kvs[j].key, w->known[i]) == 0;
        if (!present) {
            char *k = strdup(w->known[i]);
            if (k)
                deliver(w, KVF_STORE_EVENT_DELETE, k, NULL, 0);
            free(k);
        }
    }
    for (size_t j = 0; j < n; j++)
        deliver(w, KVF_STORE_EVENT_PUT, kvs[j].key, kvs[j].val, kvs[j].val_len);
    kvf_store_kv_free(kvs, n);
}

static void *watch_main(void *arg)
{
    redis_watch_t *w = arg;
    redis_t *r = w->r;
    char chan_prefix[32], why[EXT_MSG_MAX] = "", chan[KVF__REDIS_CHANNEL_MAX];
    snprintf(chan_prefix, sizeof(chan_prefix), "__keyspace@%u__:", r->addr.db);
    kvf__redis_channel(r, chan, sizeof(chan));
    size_t plen = strlen(w->prefix);
    char *esc = kvf__redis_glob_escape(w->prefix);
    char *pat = esc ? malloc(strlen(chan_prefix) + strlen(esc) + 2) : NULL;
    if (pat)
        sprintf(pat, "%s%s*", chan_prefix, esc);
    free(esc);
    redisContext *c = NULL;
    bool first = true;
    uint32_t backoff = REDIS_BACKOFF_MIN_MS;
    while (pat && !atomic_load(&w->stop)) {
        if (!c) {
            c = kvf__redis_connect(r, r->opts.request_timeout_ms, why, sizeof(why));
            if (c && (subscribe(c, chan, false) < 0 || subscribe(c, pat, true) < 0)) {
                redisFree(c);
                c = NULL;
            }
            if (!c) {
                struct pollfd p = {.fd = w->wake_fd, .events = POLLIN};
                poll(&p, 1, (int)backoff);
                backoff = backoff * 2 > REDIS_BACKOFF_MAX_MS ? REDIS_BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            backoff = REDIS_BACKOFF_MIN_MS;
            /* Redis may have restarted without its notification setting. */
            __atomic_store_n(&r->notify_ok, false, __ATOMIC_RELEASE);
            if (!first) {
                if (kvf__redis_need_notify(r, "watch") < 0)
                    KVF_WARN("store", "%s: %s", r->url, kvf_last_error());
                KVF_INFO("store", "%s: watch %" PRIu64 " resubscribed; resyncing \"%s\"", r->url,
                         w->id, w->prefix);
                resync(w);
            } else {
                kvf__redis_need_notify(r, "watch");
                pthread_mutex_lock(&r->wmu);
                w->ready = true;
                pthread_cond_broadcast(&r->wcond);
                pthread_mutex_unlock(&r->wmu);
            }
            first = false;
        }
        redisReply *m = NULL;
        int got = next_message(c, w->wake_fd, 0, &m);
        if (got < 0) {
            KVF_DEBUG("store", "%s: watch %" PRIu64 ": connection lost (%s)", r->url, w->id,
                      c->errstr);
            redisFree(c);
            c = NULL;
            continue;
        }
        change_t ch;
        if (got > 0 && parse_change(m, chan_prefix, &ch)) {
            if (strncmp(ch.key, w->prefix, plen) == 0)
                deliver(w, ch.type, ch.key, ch.val, ch.len);
            change_free(&ch);
        }
        if (m)
            freeReplyObject(m);
    }
    if (c)
        redisFree(c);
    free(pat);
    return NULL;
}

static void watch_free(redis_watch_t *w)
{
    for (size_t i = 0; i < w->nknown; i++)
        free(w->known[i]);
    free(w->known);
    if (w->wake_fd >= 0)
        close(w->wake_fd);
    free(w->prefix);
    free(w);
}

int kvf__redis_watch(redis_t *r, const char *prefix, kvf_store_watch_cb cb, void *arg,
                     uint64_t *watch_id)
{
    char what[EXT_WHAT_MAX];
    int rc = kvf__ext_check_key(r->url, "watch", prefix, true);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "watch", prefix);
    if (!cb || !watch_id)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL", r->url, what,
                        cb ? "watch_id" : "the callback");
    *watch_id = 0;
    rc = kvf__redis_need_notify(r, what);
    if (rc < 0)
        return rc;
    redis_watch_t *w = calloc(1, sizeof(*w));
    if (!w)
        return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", r->url, what);
    w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    w->prefix = strdup(prefix);
    if (w->wake_fd < 0 || !w->prefix) {
        watch_free(w);
        return kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", r->url, what);
    }
    w->r = r;
    w->cb = cb;
    w->arg = arg;
    pthread_mutex_lock(&r->wmu);
    w->id = r->next_wid++;
    rc = kvf__thread_start(&w->th, "kvf-redis-watch", 0, watch_main, w);
    if (rc < 0) {
        pthread_mutex_unlock(&r->wmu);
        watch_free(w);
        return kvf__err(rc, "store %s: %s: cannot start its thread: %s", r->url, what,
                        kvf_strerror(rc));
    }
    w->next = r->watches;
    r->watches = w;
    /* Subscribed before watch() returns, so that every later change is seen. */
    struct timespec ts;
    kvf__deadline_ts(&ts, kvf__now_ms() + r->opts.request_timeout_ms);
    while (!w->ready && pthread_cond_timedwait(&r->wcond, &r->wmu, &ts) == 0)
        ;
    bool ready = w->ready;
    uint64_t id = w->id;
    pthread_mutex_unlock(&r->wmu);
    if (!ready) {
        kvf__redis_unwatch(r, id);
        return kvf__err(-KVF_ESTOREDOWN, "store %s: %s: could not subscribe within %u ms", r->url,
                        what, r->opts.request_timeout_ms);
    }
    *watch_id = id;
    return 0;
}

int kvf__redis_unwatch(redis_t *r, uint64_t watch_id)
{
    pthread_mutex_lock(&r->wmu);
    redis_watch_t **pp, *w = NULL;
    for (pp = &r->watches; *pp; pp = &(*pp)->next) {
        if ((*pp)->id == watch_id) {
            w = *pp;
            *pp = w->next;
            break;
        }
    }
    if (!w) {
        pthread_mutex_unlock(&r->wmu);
        return kvf__err(-KVF_ENOTFOUND, "store %s: unwatch %" PRIu64 ": no such watch", r->url,
                        watch_id);
    }
    atomic_store(&w->stop, true);
    uint64_t one = 1;
    if (write(w->wake_fd, &one, sizeof(one)) < 0)
        (void)0;
    if (pthread_equal(pthread_self(), w->th)) {
        w->next = r->dead;
        r->dead = w;
        pthread_mutex_unlock(&r->wmu);
        return 0;
    }
    pthread_mutex_unlock(&r->wmu);
    pthread_join(w->th, NULL);
    watch_free(w);
    return 0;
}

void kvf__redis_watch_stop_all(redis_t *r)
{
    pthread_mutex_lock(&r->wmu);
    redis_watch_t *all = r->watches, *dead = r->dead;
    r->watches = r->dead = NULL;
    pthread_mutex_unlock(&r->wmu);
    uint64_t one = 1;
    for (redis_watch_t *w = all; w; w = w->next) {
        atomic_store(&w->stop, true);
        if (write(w->wake_fd, &one, sizeof(one)) < 0)
            (void)0;
    }
    while (all || dead) {
        redis_watch_t *w = all ? all : dead;
        if (all)
            all = w->next;
        else
            dead = w->next;
        pthread_join(w->th, NULL);
        watch_free(w);
    }
}
