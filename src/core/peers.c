/*
 * The peer cache: one entry per session this engine has transferred to, with the path chosen to
 * it (a walk over kvf__transports) and its published regions as last read from the store.
 * Entries live until destroy; a peer whose process went away has its path chosen again.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

static void peer_free(eng_peer_t *p)
{
    free(p->pending);
    if (p->tp)
        p->tops->peer_close(p->tp);
    if (p->ntp)
        p->nops->peer_close(p->ntp);
    pthread_rwlock_destroy(&p->sel);
    pthread_mutex_destroy(&p->lock);
    free(p->regions);
    free(p);
}

static eng_peer_t *peer_find_locked(kvf_engine_t *e, const char *sid)
{
    for (eng_peer_t *p = e->peers; p; p = p->next)
        if (!strcmp(p->sid, sid))
            return p;
    return NULL;
}

/* Open a handle for notifications to @p when its path cannot carry them: on the next transport
 * of the table after the path's (@i) that can (shm: tcp, which connects on first use). */
static int peer_open_notify(kvf_engine_t *e, eng_peer_t *p, size_t i, const kvf_tpeer_desc_t *d)
{
    int rc = -KVF_ENOTSUP;
    for (size_t j = i + 1; kvf__transports[j]; j++) {
        const struct kvf_transport_ops *o = kvf__transports[j];
        if (!(o->caps & KVF_TCAP_NOTIFY))
            continue;
        rc = o->peer_open(e->tr[j], d, &p->ntp);
        if (rc == 0)
            p->nops = o;
        if (rc != -KVF_ENOTSUP)
            return rc;
    }
    return kvf__err(rc, "no transport carries notifications to peer %s over %s", p->sid,
                    kvf__transports[i]->name);
}

/*
 * Choose the path to @p and open it: the first transport of kvf__transports (loop, shm, tcp)
 * whose peer_open() does not answer -KVF_ENOTSUP, or only the one config.transport forces
 * (tcp: loop and shm are skipped; shm: loop is skipped). Forcing a transport that cannot reach
 * the peer is an error naming the reason; in auto mode the reason a transport the peers offer
 * could not be used is logged once at info level. Called with @p->sel held exclusive (or before
 * @p is shared).
 */
static int peer_select(kvf_engine_t *e, eng_peer_t *p, const atomic_bool *cancel)
{
    const char *forced = kvf__eng_forced_name(&e->cfg);
    const struct kvf_transport_ops *o = NULL;
    kvf_tpeer_desc_t d;
    bool have_record = false;
    char why[512] = "";
    size_t i, wl = 0;
    int rc;

    if (p->tp)
        p->tops->peer_close(p->tp);
    if (p->ntp)
        p->nops->peer_close(p->ntp);
    p->tp = NULL;
    p->ntp = NULL;
    p->tops = NULL;
    p->nops = NULL;
    memset(&d, 0, sizeof(d));
    d.sid = p->sid;
    rc = kvf__session_id_parse(p->sid, &d.addr);
    if (rc < 0)
        return rc;

    rc = -KVF_ENOTSUP;
    for (i = 0; kvf__transports[i]; i++) {
        o = kvf__transports[i];
        if (forced && strcmp(o->name, forced) != 0)
            continue;
        if ((o->caps & KVF_TCAP_RECORD) && !have_record) {
            kvf__eng_fetch_session(e, p->sid, e->cfg.init_timeout_ms, cancel, &d);
            have_record = true;
        }
        rc = o->peer_open(e->tr[i], &d, &p->tp);
        if (rc != -KVF_ENOTSUP)
            break;
        if (forced)
            return kvf__err_wrap(rc,
                                 "transport %s is forced (config.transport or "
                                 "KVFERRY_TRANSPORT) but cannot reach peer %s",
                                 o->name, p->sid);
        /* A transport peers offer that cannot reach this one is worth a line: the user may have
         * expected it. One that reaches only some peers by nature (loop) is not. */
        if ((o->caps & KVF_TCAP_OFFER) && wl < sizeof(why))
            wl += (size_t)snprintf(why + wl, sizeof(why) - wl, "%snot %s: %s", wl ? "; " : "",
                                   o->name, kvf_last_error());
    }
    if (!kvf__transports[i])
        return kvf__err(rc, "no transport reaches peer %s", p->sid);
    if (rc < 0)
        return rc;
    if (!(o->caps & KVF_TCAP_NOTIFY)) {
        rc = peer_open_notify(e, p, i, &d);
        if (rc < 0) {
            o->peer_close(p->tp);
            p->tp = NULL;
            return rc;
        }
    }
    if (why[0] && !p->fallback_logged)
        KVF_INFO(ENG_LOG, "engine %s: peer %s over %s, %s", e->sid, p->sid, o->name, why);
    p->fallback_logged |= why[0] != 0;
    p->via = o->name;
    p->tops = o;
    if (o->check == KVF_CHECK_SENDER) {
        /* What the store said of the peer's regions, generation included, is not believed on a
         * path whose sender's check is the only one: start again from the target's own table. */
        pthread_mutex_lock(&p->lock);
        p->gen = 0;
        pthread_mutex_unlock(&p->lock);
        rc = kvf__peer_refresh(e, p);
        if (rc < 0) {
            o->peer_close(p->tp);
            if (p->ntp)
                p->nops->peer_close(p->ntp);
            p->tp = p->ntp = NULL;
            p->tops = p->nops = NULL;
            return rc;
        }
    }
    pthread_mutex_lock(&p->lock);
    p->tops->regions_changed(p->tp, p->regions, p->nregions);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

/*
 * The cached peer for @sid, or a new one after its regions record appeared in the store (waiting
 * up to init_timeout_ms). The lookup runs without peers_lock so that a slow peer does not hold up
 * transfers to others; threads that want the same new peer at once wait for the first one's
 * lookup (peer_find_or_claim) rather than each fetching records and opening connections, shm
 * checks and fence slots that all but one would throw away.
 */
#define PEER_CLAIM_POLL_MS 20u

struct eng_resolving {
    struct eng_resolving *next;
    const char *sid;
};

static bool resolving_locked(kvf_engine_t *e, const char *sid)
{
    for (struct eng_resolving *r = e->resolving; r; r = r->next)
        if (!strcmp(r->sid, sid))
            return true;
    return false;
}

/* The cached peer for @sid, or NULL with @me queued as its resolver. While another thread is
 * already looking @sid up, wait for it (up to init_timeout_ms, the bound of that lookup too),
 * then use its result; if it failed, this thread tries itself. */
static eng_peer_t *peer_find_or_claim(kvf_engine_t *e, const char *sid, const atomic_bool *cancel,
                                      struct eng_resolving *me)
{
    uint64_t deadline = kvf__now_ms() + e->cfg.init_timeout_ms;
    eng_peer_t *p;
    pthread_mutex_lock(&e->peers_lock);
    /* A cancel sets a flag and signals nothing here: look at it every PEER_CLAIM_POLL_MS. */
    while (!(p = peer_find_locked(e, sid)) && resolving_locked(e, sid) &&
           !(cancel && atomic_load(cancel))) {
        uint64_t now = kvf__now_ms();
        if (now >= deadline)
            break;
        kvf__cond_wait_until(&e->peers_cv, &e->peers_lock,
                             deadline - now > PEER_CLAIM_POLL_MS ? now + PEER_CLAIM_POLL_MS
                                                                 : deadline);
    }
    if (!p) {
        me->sid = sid;
        me->next = e->resolving;
        e->resolving = me;
    }
    pthread_mutex_unlock(&e->peers_lock);
    return p;
}

static void peer_unclaim_locked(kvf_engine_t *e, struct eng_resolving *me)
{
    for (struct eng_resolving **r = &e->resolving; *r; r = &(*r)->next)
        if (*r == me) {
            *r = me->next;
            break;
        }
    pthread_cond_broadcast(&e->peers_cv);
}

static int peer_get_new(kvf_engine_t *e, const char *sid, const atomic_bool *cancel,
                        eng_peer_t **out);

static int peer_get(kvf_engine_t *e, const char *sid, const atomic_bool *cancel, eng_peer_t **out)
{
    struct eng_resolving me;
    eng_peer_t *p = peer_find_or_claim(e, sid, cancel, &me);
    if (p) {
        *out = p;
        return 0;
    }
    int rc = peer_get_new(e, sid, cancel, out);
    pthread_mutex_lock(&e->peers_lock);
    peer_unclaim_locked(e, &me);
    pthread_mutex_unlock(&e->peers_lock);
    return rc;
}

/* The store client's thread: a regions record of the namespace changed. If it is a watched
 * peer's, a copy of its text waits in the peer for the next check, which parses it
 * (peer_take_pending): nothing untrusted is parsed on this thread, which also keeps the
 * engine's lease alive. Deletes (the peer left) are left to the target's answers. */
static void rwatch_cb(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    kvf_engine_t *e = arg;
    eng_rwatch_t *w = &e->rwatch;
    size_t pl = strlen(w->prefix);
    if (type != KVF_STORE_EVENT_PUT || strncmp(kv->key, w->prefix, pl) != 0 || !kv->val ||
        kv->val_len > KVF_STORE_MAX_VALUE_LEN)
        return;
    const char *sid = kv->key + pl;
    pthread_mutex_lock(&w->lock);
    eng_peer_t *p = NULL;
    for (size_t i = 0; i < w->n && !p; i++)
        if (!strcmp(w->peers[i]->sid, sid))
            p = w->peers[i];
    char *copy = p ? malloc(kv->val_len + 1) : NULL;
    if (copy) {
        memcpy(copy, kv->val, kv->val_len);
        copy[kv->val_len] = '\0';
        pthread_mutex_lock(&p->lock);
        free(p->pending); /* events come in the store's order: the last one is the newest */
        p->pending = copy;
        p->npending = kv->val_len;
        pthread_mutex_unlock(&p->lock);
    }
    pthread_mutex_unlock(&w->lock);
}

/* Feed @p from the regions watch when its path's target checks every request (@target_checked,
 * read before @p was listed: tcp), so its cache learns new regions off the transfer path; the
 * first such peer starts the watch, and a failed start is tried again by the next one. Best
 * effort: a store without watches (p2p://) leaves the refresh on a miss. */
static void peer_watch(kvf_engine_t *e, eng_peer_t *p, bool target_checked)
{
    eng_rwatch_t *w = &e->rwatch;
    if (!target_checked || atomic_load(&w->state) == RWATCH_DISABLED)
        return;
    pthread_mutex_lock(&w->lock);
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        eng_peer_t **np = realloc(w->peers, cap * sizeof(*np));
        if (np) {
            w->peers = np;
            w->cap = cap;
        }
    }
    if (w->n < w->cap)
        w->peers[w->n++] = p;
    pthread_mutex_unlock(&w->lock);
    /* Not under w->lock: the watch request waits on the thread that runs rwatch_cb. */
    int off = RWATCH_OFF;
    if (!atomic_compare_exchange_strong(&w->state, &off, RWATCH_STARTING))
        return;
    kvf__eng_make_key(w->prefix, sizeof(w->prefix), e, "regions", "");
    if (kvf_store_watch(e->store, w->prefix, rwatch_cb, e, &w->id) == 0) {
        atomic_store(&w->state, RWATCH_ON);
    } else {
        KVF_INFO(ENG_LOG,
                 "engine %s: not watching its peers' regions (a region they register later is "
                 "learned by the first transfer into it): %s",
                 e->sid, kvf_last_error());
        atomic_store(&w->state, RWATCH_OFF);
    }
}

/* peer_get() for a peer not in the cache: its regions and its path. If another thread inserted
 * the peer meanwhile (it gave up waiting on this one's claim), its entry wins. */
static int peer_get_new(kvf_engine_t *e, const char *sid, const atomic_bool *cancel,
                        eng_peer_t **out)
{
    kvf_hostport_t addr;
    eng_peer_t *p;
    int rc;

    rc = kvf__session_id_parse(sid, &addr);
    if (rc < 0)
        return rc;
    if (addr.port == 0)
        return kvf__err(-KVF_EINVAL, "peer session id %s: port 0 names no peer", sid);
    p = calloc(1, sizeof(*p));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "peer %s: out of memory", sid);
    snprintf(p->sid, sizeof(p->sid), "%s", sid);
    pthread_mutex_init(&p->lock, NULL);
    /* Writer preference: a re-selection must not starve behind a stream of transfers. */
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&p->sel, &ra);
    pthread_rwlockattr_destroy(&ra);
    atomic_init(&p->reselect, false);
    rc = kvf__eng_fetch_regions(e, sid, e->cfg.init_timeout_ms, cancel, &p->regions, &p->nregions,
                                &p->gen, &p->inc);
    if (rc < 0)
        goto out_free;
    rc = peer_select(e, p, cancel);
    if (rc < 0)
        goto out_free;
    bool target_checked = p->tops->check == KVF_CHECK_TARGET;

    pthread_mutex_lock(&e->peers_lock);
    eng_peer_t *other = peer_find_locked(e, sid);
    if (!other) {
        p->next = e->peers;
        e->peers = p;
    }
    pthread_mutex_unlock(&e->peers_lock);
    if (other) {
        peer_free(p);
        p = other;
    } else {
        peer_watch(e, p, target_checked);
    }
    KVF_DEBUG(ENG_LOG, "engine %s: peer %s found with %zu regions, via %s", e->sid, sid,
              p->nregions, p->via);
    *out = p;
    return 0;

out_free:
    peer_free(p);
    return rc;
}

/* Replace the cached regions by @rs (taken over) unless they are older than the cache (two
 * refreshes racing), so the cache never goes back in time within one incarnation @inc of the
 * peer; a list from another incarnation (the session's engine restarted, counting generations
 * from 1 again) replaces it whatever its generation. */
static void peer_regions_replace(eng_peer_t *p, kvf_region_t *rs, size_t n, uint64_t gen,
                                 uint64_t inc)
{
    pthread_mutex_lock(&p->lock);
    if (gen >= p->gen || inc != p->inc) {
        free(p->regions);
        p->regions = rs;
        p->nregions = n;
        p->gen = gen;
        p->inc = inc;
        rs = NULL;
        if (p->tp)
            p->tops->regions_changed(p->tp, p->regions, p->nregions);
    }
    pthread_mutex_unlock(&p->lock);
    free(rs);
}

/* Re-read the peer's regions from the store (no wait: it exists, or existed). */
static int peer_refresh_store(kvf_engine_t *e, eng_peer_t *p)
{
    kvf_region_t *rs;
    size_t n;
    uint64_t gen, inc;
    int rc = kvf__eng_fetch_regions(e, p->sid, 0, NULL, &rs, &n, &gen, &inc);
    if (rc == 0)
        peer_regions_replace(p, rs, n, gen, inc);
    return rc;
}

/* Re-read the peer's regions from where its path's check needs them: a path checked by the
 * sender alone (shm) reads the target's own table from the target, because the store may be
 * forged and nothing else stands between a forged list and the target's memory; the others read
 * the store (their target checks every request). @p->sel held. */
int kvf__peer_refresh(kvf_engine_t *e, eng_peer_t *p)
{
    if (!p->tops || p->tops->check != KVF_CHECK_SENDER)
        return peer_refresh_store(e, p);
    kvf_region_t *rs;
    size_t n;
    uint64_t gen;
    int rc = p->tops->regions_read(p->tp, &rs, &n, &gen);
    if (rc == 0)
        peer_regions_replace(p, rs, n, gen, p->inc); /* the live table: this incarnation's */
    return rc;
}

/* The peer process went away (or restarted under the same session id): forget its regions and
 * choose its path again, once, by whichever transfer comes first. */
static int peer_reselect(kvf_engine_t *e, eng_peer_t *p, const atomic_bool *cancel)
{
    int rc = 0;
    pthread_rwlock_wrlock(&p->sel);
    if (atomic_load(&p->reselect)) {
        pthread_mutex_lock(&p->lock);
        p->gen = 0;
        free(p->pending); /* the old process's, or read before it went */
        p->pending = NULL;
        pthread_mutex_unlock(&p->lock);
        rc = peer_refresh_store(e, p);
        if (rc == 0)
            rc = peer_select(e, p, cancel);
        if (rc == 0)
            atomic_store(&p->reselect, false);
    }
    pthread_rwlock_unlock(&p->sel);
    return rc;
}

/* Take in the record the regions watch left: parsed here, on a transfer's thread, and kept as
 * a refresh's list is (peer_regions_replace). @p->sel held shared (so @p->tops and @p->tp are
 * stable); @p->lock not held. */
static void peer_take_pending(eng_peer_t *p)
{
    pthread_mutex_lock(&p->lock);
    char *text = p->pending;
    size_t len = p->npending;
    p->pending = NULL;
    pthread_mutex_unlock(&p->lock);
    if (!text)
        return;
    kvf_region_t *rs;
    size_t n;
    uint64_t gen, inc;
    if (p->tops && p->tops->check == KVF_CHECK_TARGET &&
        kvf__eng_parse_regions(p->sid, text, len, &rs, &n, &gen, &inc) == 0)
        peer_regions_replace(p, rs, n, gen, inc);
    free(text);
}

int kvf__peer_check(eng_peer_t *p, const kvf_xfer_t *x, size_t n, size_t *bad)
{
    int rc = 0;
    peer_take_pending(p);
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = kvf__regions_check(p->regions, p->nregions, x[i].remote, x[i].len);
        if (rc < 0) {
            kvf__err_wrap(rc, "element %zu (%s)", i, x[i].op == KVF_OP_WRITE ? "write" : "read");
            *bad = i;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

bool kvf__peer_holds(eng_peer_t *p, const kvf_xfer_t *x, size_t n)
{
    bool all = true;
    peer_take_pending(p);
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < n && all; i++)
        all = kvf__regions_holds(p->regions, p->nregions, x[i].remote, x[i].len);
    pthread_mutex_unlock(&p->lock);
    return all;
}

size_t kvf__peer_missed_bytes(eng_peer_t *p, const kvf_xfer_t *x, size_t n)
{
    size_t missed = 0;
    char msg[512];
    snprintf(msg, sizeof(msg), "%s", kvf_last_error());
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < n && missed != SIZE_MAX; i++) {
        int rc = kvf__regions_check(p->regions, p->nregions, x[i].remote, x[i].len);
        if (rc == -KVF_ENOTREG)
            missed = x[i].len > SIZE_MAX - 1 - missed ? SIZE_MAX : missed + x[i].len;
        else if (rc < 0)
            missed = SIZE_MAX;
    }
    pthread_mutex_unlock(&p->lock);
    kvf__err(0, "%s", msg); /* the message stays the caller's first check's */
    return missed;
}

/*
 * For shm the sender's check is the only one, so make the cached list current first: read the
 * target's live generation and, if the cache is older, re-read the target's own table. Once a
 * target's unregister has returned, its table no longer holds the region.
 */
int kvf__peer_make_current(kvf_engine_t *e, eng_peer_t *p)
{
    uint64_t live;
    int rc = p->tops->regions_gen(p->tp, &live);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&p->lock);
    bool stale = live > p->gen;
    pthread_mutex_unlock(&p->lock);
    if (!stale)
        return 0;
    rc = kvf__peer_refresh(e, p);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&p->lock);
    uint64_t have = p->gen;
    pthread_mutex_unlock(&p->lock);
    if (live > have)
        return kvf__err(-KVF_ESTALE,
                        "peer %s: the region table read (generation %" PRIu64
                        ") is older than its live generation %" PRIu64
                        "; refusing to write unchecked",
                        p->sid, have, live);
    return 0;
}

/* Tell a peer the store no longer lists (its engine was destroyed) from one it never listed. */
static int peer_record_present(kvf_engine_t *e, const char *peer)
{
    char key[ENG_KEY_MAX];
    void *val;
    size_t len;
    kvf__eng_make_key(key, sizeof(key), e, "sessions", peer);
    int rc = kvf__eng_store_get_wait(e, key, 0, NULL, &val, &len);
    if (rc == 0)
        free(val);
    else if (rc == -KVF_ENOTFOUND)
        rc = kvf__err(-KVF_EPEERGONE,
                      "peer %s has no session record in namespace %s: it is gone, or never "
                      "started",
                      peer, e->ns);
    return rc;
}

int kvf__eng_peer_check(kvf_engine_t *e, const char *peer)
{
    eng_peer_t *p;
    int rc = 0;
    pthread_mutex_lock(&e->peers_lock);
    p = peer_find_locked(e, peer);
    /* Found gone before: unless it restarted (then its path is chosen afresh below), it still
     * is, whatever its lingering records say. */
    bool was_gone = p && atomic_load(&p->reselect);
    pthread_mutex_unlock(&e->peers_lock);
    if (!p)
        rc = peer_record_present(e, peer);
    if (rc < 0)
        return rc;
    rc = kvf__peer_enter(e, peer, "peer check", NULL, &p);
    if (rc == -KVF_ENOTFOUND || (rc < 0 && was_gone))
        return kvf__err(-KVF_EPEERGONE, "peer %s is gone: %s", peer, kvf_last_error());
    if (rc < 0)
        return rc;
    rc = p->tops->peer_alive(p->tp, kvf__now_ms() + e->cfg.init_timeout_ms);
    return kvf__peer_leave(p, rc, "peer check");
}

int kvf_peer_check(kvf_engine_t *e, const char *peer)
{
    kvf_hostport_t hp;
    if (!e || !peer)
        return kvf__err(-KVF_EINVAL, "peer check: %s is NULL", !e ? "the engine" : "the peer");
    int rc = kvf__session_id_parse(peer, &hp);
    if (rc < 0)
        return rc;
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    rc = kvf__eng_peer_check(e, peer);
    kvf__eng_busy_leave(e);
    return rc;
}

bool kvf__eng_peer_known(kvf_engine_t *e, const char *sid)
{
    pthread_mutex_lock(&e->peers_lock);
    bool known = peer_find_locked(e, sid) != NULL;
    pthread_mutex_unlock(&e->peers_lock);
    return known;
}

int kvf_engine_peer_transport(kvf_engine_t *e, const char *peer, const char **name)
{
    if (!e || !peer || !name)
        return kvf__err(-KVF_EINVAL, "peer transport: NULL argument");
    pthread_mutex_lock(&e->peers_lock);
    eng_peer_t *p = peer_find_locked(e, peer);
    pthread_mutex_unlock(&e->peers_lock);
    /* Not under peers_lock: a re-selection holds sel for up to init_timeout_ms, and every
     * other peer's lookup needs peers_lock. A peer, once listed, lives until destroy. */
    if (p) {
        pthread_rwlock_rdlock(&p->sel);
        *name = p->via;
        pthread_rwlock_unlock(&p->sel);
    }
    return p ? 0
             : kvf__err(-KVF_ENOTFOUND, "engine %s has not transferred to peer %s", e->sid, peer);
}

int kvf__peer_enter(kvf_engine_t *e, const char *peer, const char *what, const atomic_bool *cancel,
                    eng_peer_t **out)
{
    eng_peer_t *p;
    int rc = peer_get(e, peer, cancel, &p);
    if (rc < 0)
        return rc;
    for (;;) {
        if (atomic_load(&p->reselect)) {
            rc = peer_reselect(e, p, cancel);
            if (rc < 0)
                return kvf__err_wrap(rc, "%s to %s", what, peer);
        }
        pthread_rwlock_rdlock(&p->sel);
        /* Another thread's choice may have failed between the look and the lock, leaving no
         * path: choose again (or meet its error). */
        if (!atomic_load(&p->reselect) && p->tp)
            break;
        if (!p->tp)
            atomic_store(&p->reselect, true);
        pthread_rwlock_unlock(&p->sel);
    }
    *out = p;
    return 0;
}

eng_peer_t *kvf__peer_enter_now(kvf_engine_t *e, const char *peer)
{
    pthread_mutex_lock(&e->peers_lock);
    eng_peer_t *p = peer_find_locked(e, peer);
    pthread_mutex_unlock(&e->peers_lock);
    if (!p || atomic_load(&p->reselect) || pthread_rwlock_tryrdlock(&p->sel) != 0)
        return NULL;
    /* A choice that failed since the first look leaves no path (and reselect set). */
    if (atomic_load(&p->reselect) || !p->tp) {
        pthread_rwlock_unlock(&p->sel);
        return NULL;
    }
    return p;
}

/* Leave what kvf__peer_enter() entered. The process behind the peer is gone: the next call looks it
 * up again, since it may have restarted under the same session id (another pid, other memory,
 * maybe another host). */
int kvf__peer_leave(eng_peer_t *p, int rc, const char *what)
{
    pthread_rwlock_unlock(&p->sel);
    if (rc == -KVF_EPEERGONE)
        atomic_store(&p->reselect, true);
    if (rc < 0)
        kvf__err_wrap(rc, "%s to %s", what, p->sid);
    return rc;
}

void kvf__peers_fini(kvf_engine_t *e)
{
    /* The store client is closed: no watch callback runs any more. */
    free(e->rwatch.peers);
    e->rwatch.peers = NULL;
    e->rwatch.n = e->rwatch.cap = 0;
    for (eng_peer_t *p = e->peers, *next; p; p = next) {
        next = p->next;
        peer_free(p);
    }
    e->peers = NULL;
}

bool kvf__peer_knows(kvf_engine_t *e, const char *sid, uint64_t addr, uint64_t len)
{
    bool known = false;
    pthread_mutex_lock(&e->peers_lock);
    eng_peer_t *p = peer_find_locked(e, sid);
    if (p) {
        pthread_mutex_lock(&p->lock);
        kvf_region_t *rs = NULL;
        size_t n = 0;
        uint64_t gen;
        known = kvf__regions_check(p->regions, p->nregions, addr, len) == 0 ||
                (p->pending &&
                 kvf__eng_parse_regions(p->sid, p->pending, p->npending, &rs, &n, &gen, NULL) ==
                     0 &&
                 kvf__regions_check(rs, n, addr, len) == 0);
        free(rs);
        pthread_mutex_unlock(&p->lock);
    }
    pthread_mutex_unlock(&e->peers_lock);
    return known;
}
