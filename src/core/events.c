/*
 * Peer events: kvf_peer_wait() for one session to appear (then its path is opened in the
 * background), and kvf_peer_events(), the joins and
 * leaves of the sessions of this engine's namespace, from a watch on the store's sessions prefix
 * installed by the first call.
 *
 * Lock order: sublock before plock; the store's watch callback takes only plock; the engine's
 * busy_lock (closing) is taken inside plock, never the other way round.
 */
#include <pthread.h>
#include <search.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/thread.h"
#include "core/core.h"

#define EVENTS_LOG "events"

int kvf_peer_wait(kvf_engine_t *e, const char *peer, uint32_t timeout_ms)
{
    kvf_hostport_t hp;
    if (!e || !peer)
        return kvf__err(-KVF_EINVAL, "peer wait: %s is NULL", !e ? "the engine" : "the peer");
    int rc = kvf__session_id_parse(peer, &hp);
    if (rc < 0)
        return rc;
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    char key[ENG_KEY_MAX];
    void *val;
    size_t len;
    kvf__eng_make_key(key, sizeof(key), e, "sessions", peer);
    rc = kvf__eng_store_get_wait(e, key, timeout_ms, NULL, &val, &len);
    if (rc == 0) {
        free(val);
        /* A transfer usually follows: open the path now, in the background, rather than on the
         * first transfer's clock. */
        kvf__batch_open_peer(e, peer);
    } else if (rc == -KVF_ETIMEDOUT || rc == -KVF_ENOTFOUND)
        rc = kvf__err(-KVF_ETIMEDOUT, "peer %s did not appear in namespace %s within %u ms", peer,
                      e->ns, timeout_ms);
    kvf__eng_busy_leave(e);
    return rc;
}

static int known_cmp(const void *a, const void *b)
{
    return strcmp(((const eng_known_t *)a)->sid, ((const eng_known_t *)b)->sid);
}

/* Record a join or leave if it changes what is known. Under plock. The known sessions are a tree:
 * a store may hold any number of them (150,000 were listed in issue 12). */
static void peer_event_push(kvf_engine_t *e, kvf_peer_event_type_t type, const char *sid)
{
    eng_events_t *a = &e->events;
    eng_known_t probe;
    snprintf(probe.sid, sizeof(probe.sid), "%s", sid);
    void **slot = tfind(&probe, &a->known, known_cmp);
    if (type == KVF_PEER_JOINED) {
        if (slot)
            return; /* a re-publication (lease re-granted, record updated) */
        eng_known_t *k = malloc(sizeof(*k));
        if (k)
            *k = probe; /* before tsearch(), which compares it */
        if (!k || !tsearch(k, &a->known, known_cmp)) {
            free(k);
            KVF_WARN_RATELIMITED(EVENTS_LOG, "engine %s: out of memory recording peer %s", e->sid,
                                 sid);
            return;
        }
    } else {
        if (!slot)
            return;
        eng_known_t *k = *slot;
        tdelete(k, &a->known, known_cmp);
        free(k);
    }
    if (a->ev_count == ENG_EVENTS_MAX) {
        KVF_WARN_RATELIMITED(EVENTS_LOG, "engine %s: %u peer events unread; dropping the oldest",
                             e->sid, ENG_EVENTS_MAX);
        a->ev_head = (a->ev_head + 1) % ENG_EVENTS_MAX;
        a->ev_count--;
    }
    kvf_peer_event_t *ev = &a->events[(a->ev_head + a->ev_count) % ENG_EVENTS_MAX];
    ev->type = type;
    snprintf(ev->sid, sizeof(ev->sid), "%s", sid);
    a->ev_count++;
    pthread_cond_broadcast(&a->pcond);
}

/* The session id in a sessions key, or NULL for this engine's own or a foreign key. */
static const char *session_of(kvf_engine_t *e, const char *key)
{
    char prefix[ENG_KEY_MAX];
    kvf__eng_make_key(prefix, sizeof(prefix), e, "sessions", "");
    size_t pl = strlen(prefix);
    if (strncmp(key, prefix, pl) || !key[pl] || !strcmp(key + pl, e->sid))
        return NULL;
    return key + pl;
}

static void peer_watch_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    kvf_engine_t *e = arg;
    const char *sid = session_of(e, kv->key);
    if (!sid)
        return;
    pthread_mutex_lock(&e->events.plock);
    peer_event_push(e, type == KVF_STORE_EVENT_PUT ? KVF_PEER_JOINED : KVF_PEER_LEFT, sid);
    pthread_mutex_unlock(&e->events.plock);
}

/* Watch first, then list: a session that appears in between is reported once. */
static int peer_subscribe(kvf_engine_t *e)
{
    eng_events_t *a = &e->events;
    char prefix[ENG_KEY_MAX];
    kvf__eng_make_key(prefix, sizeof(prefix), e, "sessions", "");
    a->events = calloc(ENG_EVENTS_MAX, sizeof(*a->events));
    if (!a->events)
        return kvf__err(-KVF_ENOMEM, "engine %s: out of memory for peer events", e->sid);
    int rc = kvf_store_watch(e->store, prefix, peer_watch_cb, e, &a->watch_id);
    if (rc < 0)
        return kvf__err_wrap(rc, "engine %s: watching %s", e->sid, prefix);
    /* Page by page, keys only: the store may hold any number of sessions, and only their ids
     * are needed here. */
    char after[KVF_STORE_MAX_KEY_LEN + 1] = "";
    for (int more = 1; more;) {
        kvf_store_kv_t *kvs;
        size_t count;
        rc = kvf_store_list_page(e->store, prefix, after, 0, KVF_STORE_LIST_KEYS_ONLY, &kvs, &count,
                                 &more);
        if (rc < 0) {
            kvf_store_unwatch(e->store, a->watch_id);
            return kvf__err_wrap(rc, "engine %s: listing %s", e->sid, prefix);
        }
        pthread_mutex_lock(&a->plock);
        for (size_t i = 0; i < count; i++) {
            const char *sid = session_of(e, kvs[i].key);
            if (sid)
                peer_event_push(e, KVF_PEER_JOINED, sid);
        }
        pthread_mutex_unlock(&a->plock);
        if (count == 0 || strlen(kvs[count - 1].key) >= sizeof(after))
            more = 0;
        else
            snprintf(after, sizeof(after), "%s", kvs[count - 1].key);
        kvf_store_kv_free(kvs, count);
    }
    pthread_mutex_lock(&a->plock);
    a->subscribed = true;
    pthread_mutex_unlock(&a->plock);
    return 0;
}

int kvf_peer_events(kvf_engine_t *e, kvf_peer_event_t *out, size_t max, int timeout_ms)
{
    if (!e || !out || max == 0)
        return kvf__err(-KVF_EINVAL, "peer events: %s",
                        !e     ? "the engine is NULL"
                        : !out ? "the output array is NULL"
                               : "max is 0");
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    eng_events_t *a = &e->events;
    /* One subscriber at a time; the watch callback takes only plock, so this lock may be held
     * across the store calls. */
    pthread_mutex_lock(&a->sublock);
    pthread_mutex_lock(&a->plock);
    bool sub = a->subscribed;
    pthread_mutex_unlock(&a->plock);
    if (!sub)
        rc = peer_subscribe(e);
    pthread_mutex_unlock(&a->sublock);
    if (rc < 0) {
        kvf__eng_busy_leave(e);
        return rc;
    }

    uint64_t deadline = eng_deadline_of(timeout_ms);
    size_t k = 0;
    pthread_mutex_lock(&a->plock);
    for (;;) {
        while (k < max && a->ev_count > 0) {
            out[k++] = a->events[a->ev_head];
            a->ev_head = (a->ev_head + 1) % ENG_EVENTS_MAX;
            a->ev_count--;
        }
        if (k)
            break;
        if (kvf__eng_closing(e)) {
            rc = kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid);
            break;
        }
        if (!kvf__cond_wait_until(&a->pcond, &a->plock, deadline))
            break;
    }
    pthread_mutex_unlock(&a->plock);
    kvf__eng_busy_leave(e);
    return rc < 0 ? rc : (int)k;
}

/* ---- lifetime ------------------------------------------------------------------------------- */
void kvf__events_fini(kvf_engine_t *e)
{
    eng_events_t *a = &e->events;
    tdestroy(a->known, free);
    a->known = NULL;
    free(a->events);
}
