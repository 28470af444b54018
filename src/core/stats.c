/*
 * The engine's statistics: counting a transfer call (kvf__stats_call, a handful of relaxed
 * atomic additions per call, never per byte or chunk), and kvf_engine_stats(), the snapshot the
 * Python binding, `kvferry info` (over a STATS frame) and the metrics endpoint read.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/stats.h"
#include "core/core.h"

void kvf__stats_call(kvf_engine_t *e, eng_peer_t *p, size_t ti, const kvf_xfer_t *x, size_t n,
                     int rc, uint64_t us)
{
    eng_stats_t *st = &e->stats;
    if (rc < 0) {
        int code = -rc - KVF_ERRNO_OFFSET;
        size_t slot = code > 0 && code < (int)KVF_STATS_ERR_SLOTS ? (size_t)code : 0;
        eng_count_add(&st->errors[slot], 1);
    }
    if (!p || ti >= KVF_TRANSPORTS_MAX)
        return;
    eng_tstats_t *t = &st->tr[ti];
    eng_counts_t *c = &p->counts[ti];
    eng_count_add(&t->lat[kvf__stats_lat_bucket(us)], 1);
    eng_count_add(&t->lat_sum_us, us);
    if (rc < 0) {
        eng_count_add(&c->v[EC_FAILED], 1);
        return;
    }
    uint64_t v[EC_N] = {0};
    for (size_t i = 0; i < n; i++) {
        bool w = x[i].op == KVF_OP_WRITE;
        v[w ? EC_WBYTES : EC_RBYTES] += x[i].len;
        v[w ? EC_WOPS : EC_ROPS]++;
    }
    v[EC_CALLS] = 1;
    for (size_t k = 0; k < EC_FAILED; k++) {
        if (v[k])
            eng_count_add(&c->v[k], v[k]);
    }
}

static uint64_t ld(_Atomic uint64_t *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

/* Add @c's counters to @out. */
static void counts_add(eng_counts_t *c, kvf_stats_counts_t *out)
{
    out->write_bytes += ld(&c->v[EC_WBYTES]);
    out->read_bytes += ld(&c->v[EC_RBYTES]);
    out->write_ops += ld(&c->v[EC_WOPS]);
    out->read_ops += ld(&c->v[EC_ROPS]);
    out->calls += ld(&c->v[EC_CALLS]);
    out->failed += ld(&c->v[EC_FAILED]);
}

/* Copy the peer cache's counters. Lock order: peers_lock, then each peer's sel (shared). */
static int peers_read(kvf_engine_t *e, kvf_stats_t *s)
{
    pthread_mutex_lock(&e->peers_lock);
    size_t n = 0;
    for (eng_peer_t *p = e->peers; p; p = p->next)
        n++;
    if (n) {
        s->peers = calloc(n, sizeof(*s->peers));
        if (!s->peers) {
            pthread_mutex_unlock(&e->peers_lock);
            return kvf__err(-KVF_ENOMEM, "engine %s: stats: out of memory for %zu peers", e->sid,
                            n);
        }
    }
    size_t k = 0;
    for (eng_peer_t *p = e->peers; p; p = p->next, k++) {
        kvf_stats_peer_t *o = &s->peers[k];
        snprintf(o->sid, sizeof(o->sid), "%s", p->sid);
        pthread_rwlock_rdlock(&p->sel);
        snprintf(o->transport, sizeof(o->transport), "%s", p->via ? p->via : "");
        if (p->tp)
            s->connections++;
        pthread_rwlock_unlock(&p->sel);
        for (size_t i = 0; i < KVF_TRANSPORTS_MAX; i++) {
            counts_add(&p->counts[i], &o->c);
            if (i < s->ntransports)
                counts_add(&p->counts[i], &s->transports[i].c);
        }
        o->in_flight = ld(&p->in_flight);
        s->in_flight += o->in_flight;
    }
    s->npeers = n;
    pthread_mutex_unlock(&e->peers_lock);
    return 0;
}

int kvf_engine_stats(kvf_engine_t *e, kvf_stats_t *s)
{
    if (!e || !s)
        return kvf__err(-KVF_EINVAL, "engine stats: NULL argument");
    memset(s, 0, sizeof(*s));
    s->size = sizeof(*s);
    snprintf(s->session_id, sizeof(s->session_id), "%s", e->sid);
    snprintf(s->role, sizeof(s->role), "%s", kvf_role_name(e->role));
    s->uptime_ms = kvf__now_ms() - e->stats.created_ms;
    memcpy(s->lat_bound_us, kvf__stats_lat_bound_us, sizeof(s->lat_bound_us));
    for (size_t i = 0; kvf__transports[i] && i < KVF_STATS_MAX_TRANSPORTS; i++) {
        kvf_stats_transport_t *t = &s->transports[i];
        eng_tstats_t *src = &e->stats.tr[i];
        snprintf(t->name, sizeof(t->name), "%s", kvf__transports[i]->name);
        for (size_t b = 0; b < KVF_STATS_LAT_BUCKETS; b++)
            t->lat_count[b] = ld(&src->lat[b]);
        t->lat_sum_us = ld(&src->lat_sum_us);
        s->ntransports = i + 1;
    }
    for (size_t i = 0; i < KVF_STATS_ERR_SLOTS; i++)
        s->errors[i] = ld(&e->stats.errors[i]);
    s->notify_sent = ld(&e->stats.notify_sent);
    s->notify_received = ld(&e->stats.notify_received);
    pthread_mutex_lock(&e->notify.nlock);
    s->notify_queued = e->notify.ncount;
    pthread_mutex_unlock(&e->notify.nlock);

    kvf_region_t *rs = NULL;
    size_t nr = 0;
    int rc = kvf__regions_snapshot(e->regions, &rs, &nr, NULL);
    if (rc < 0)
        return rc;
    s->regions = nr;
    for (size_t i = 0; i < nr; i++)
        s->region_bytes += rs[i].len;
    free(rs);
    return peers_read(e, s);
}

int kvf__stats_encoded(void *arg, uint8_t **out, size_t *len)
{
    kvf_stats_t s;
    int rc = kvf_engine_stats(arg, &s);
    if (rc == 0)
        rc = kvf__stats_encode(&s, out, len);
    kvf_stats_free(&s);
    return rc;
}

int kvf__stats_render(void *arg, char **out, size_t *len)
{
    kvf_stats_t s;
    int rc = kvf_engine_stats(arg, &s);
    if (rc == 0)
        rc = kvf_stats_prometheus(&s, out, len);
    kvf_stats_free(&s);
    return rc;
}

const char *kvf_engine_metrics_addr(const kvf_engine_t *e)
{
    return e && e->metrics ? kvf_metrics_server_addr(e->metrics) : "";
}
