/*
 * Peer handles of the tcp transport (struct tcp_peer, tcp.h): a handle owns conns_per_peer
 * connections to one target, opened lazily by the transfers; closing it (or destroying the
 * transport) fails what is pending and waits for the running transfers to leave.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/thread.h"
#include "transport/tcp.h"

/* ---------------------------------------------------------------------------------------------
 * Initiator side: peers
 * ------------------------------------------------------------------------------------------- */

int tcp_peer_open(kvf_transport_t *tt, const kvf_tpeer_desc_t *d, kvf_tpeer_t **out)
{
    struct tcp_transport *t = tcp_of(tt);
    const char *peer_sid = d ? d->sid : NULL;
    const kvf_hostport_t *addr = d ? &d->addr : NULL;
    int rc;
    if (!t || !addr || !out)
        return kvf__err(-KVF_EINVAL, "tcp peer open: missing argument");
    unsigned n = t->conns_per_peer;
    struct tcp_peer *p = calloc(1, sizeof(*p) + n * sizeof(struct tcp_conn));
    if (!p)
        return kvf__err(-KVF_ENOMEM, "tcp peer open: out of memory");
    p->t = t;
    p->addr = *addr;
    kvf__hostport_format(addr, p->addr_str, sizeof(p->addr_str));
    snprintf(p->sid, sizeof(p->sid), "%s", peer_sid ? peer_sid : p->addr_str);
    snprintf(p->local_sid, sizeof(p->local_sid), "%s", t->local_sid);
    p->auth = t->auth;
    p->tls = t->tls_cli;
    p->chunk = t->chunk;
    p->connect_timeout_ms = t->connect_timeout_ms;
    p->nconns = 0;
    atomic_init(&p->rr, 0);
    rc = -pthread_mutex_init(&p->mu, NULL);
    if (rc)
        goto out_free;
    rc = kvf__cond_init_monotonic(&p->cv);
    if (rc)
        goto out_mu;
    for (; p->nconns < n; p->nconns++) {
        rc = tcp_conn_init(p, &p->conns[p->nconns], p->nconns);
        if (rc)
            goto out_conns;
    }
    pthread_mutex_lock(&t->mu);
    p->next = t->peers;
    t->peers = p;
    pthread_mutex_unlock(&t->mu);
    *out = (kvf_tpeer_t *)(void *)p;
    return 0;

out_conns:
    while (p->nconns > 0)
        tcp_conn_fini(&p->conns[--p->nconns]);
    pthread_cond_destroy(&p->cv);
out_mu:
    pthread_mutex_destroy(&p->mu);
out_free:
    kvf__auth_key_wipe(&p->auth);
    free(p);
    return kvf__err(rc, "tcp peer open %s: %s", peer_sid ? peer_sid : "?", kvf_strerror(rc));
}

/* Stop a peer's connections: fail what is pending with -KVF_ECLOSED, refuse new transfers, wait
 * for the running ones to return, then stop watching the sockets and close them. */
static void tcp_peer_shut(struct tcp_peer *p)
{
    pthread_mutex_lock(&p->mu);
    p->closing = true;
    for (unsigned i = 0; i < p->nconns; i++) {
        struct tcp_conn *c = &p->conns[i];
        tcp_conn_break_locked(c, c->gen, -KVF_ECLOSED, "transport is closing");
    }
    while (p->active > 0)
        pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->nconns; i++) {
        struct tcp_conn *c = &p->conns[i];
        pthread_mutex_lock(&p->mu);
        struct tcp_watch *w = c->watch;
        c->watch = NULL;
        pthread_mutex_unlock(&p->mu);
        tcp_watch_del(w);
        if (c->fd >= 0)
            tcp_conn_close_fd(c);
    }
}

void tcp_peer_detach_all(struct tcp_transport *t)
{
    pthread_mutex_lock(&t->mu);
    struct tcp_peer *list = t->peers;
    t->peers = NULL;
    pthread_mutex_unlock(&t->mu);
    for (struct tcp_peer *p = list; p; p = p->next) {
        tcp_peer_shut(p);
        p->t = NULL;
    }
}

void tcp_peer_close(kvf_tpeer_t *pp)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    if (!p)
        return;
    struct tcp_transport *t = p->t;
    if (t) {
        pthread_mutex_lock(&t->mu);
        for (struct tcp_peer **q = &t->peers; *q; q = &(*q)->next) {
            if (*q == p) {
                *q = p->next;
                break;
            }
        }
        pthread_mutex_unlock(&t->mu);
        tcp_peer_shut(p);
    }
    for (unsigned i = 0; i < p->nconns; i++)
        tcp_conn_fini(&p->conns[i]);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    kvf__auth_key_wipe(&p->auth);
    free(p);
}

/*
 * A connection that is up says the peer is there: its I/O thread notices the peer closing or
 * resetting it at once (the connection breaks). With none up, connect one now: a refusal (or
 * no answer within the connect timeout) means nothing listens at the peer's address any more.
 * A peer that only closed idle connections is reconnected, which the next transfer uses.
 */
int tcp_peer_alive(kvf_tpeer_t *pp, uint64_t deadline_ms)
{
    struct tcp_peer *p = tcp_peer_of(pp);
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    if (p->closing) {
        pthread_mutex_unlock(&p->mu);
        return kvf__err(-KVF_ECLOSED, "tcp peer %s: transport is closing", p->sid);
    }
    struct tcp_conn *down = NULL;
    for (unsigned i = 0; i < p->nconns; i++) {
        struct tcp_conn *c = &p->conns[i];
        if (c->state == TCP_CONN_UP || c->state == TCP_CONN_CONNECTING) {
            down = NULL; /* up, or someone is finding out */
            break;
        }
        if (!down)
            down = c;
    }
    if (down) {
        p->active++; /* keeps tcp_peer_shut waiting while the lock is dropped to connect */
        rc = tcp_conn_open_locked(down, deadline_ms);
        if (--p->active == 0 && p->closing)
            pthread_cond_broadcast(&p->cv);
    }
    pthread_mutex_unlock(&p->mu);
    if (rc == -KVF_EPEERGONE)
        return kvf__err(rc, "peer %s is gone: no connection to it is up and a new one failed (%s)",
                        p->sid, kvf_last_error());
    return rc;
}

