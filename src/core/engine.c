/*
 * The transfer engine: one node of the cluster. It owns one instance of each transport (the
 * one that listens on the session id's port among them), the region table, the peer cache and
 * the store client, and publishes two keys bound to its lease (records.c). This file creates,
 * shuts down and destroys it; the rest of src/core does the work (see core.h).
 *
 * Each peer is reached by one of the transports of kvf__transports, chosen on first use by
 * walking that table in order (loop → shm → tcp), or forced by config.transport /
 * KVFERRY_TRANSPORT: "loop" when the peer is an engine of this process (memcpy under the
 * target's own region references), "shm" when it is on this host and its memory is reachable
 * with process_vm_writev, "tcp" otherwise.
 *
 * A session id is "ip:port" and is also the address peers connect to, so a peer needs the store
 * only to learn that a session exists and which regions it has; transfers between peers that
 * already know each other go on while the store is down.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/thread.h"
#include "core/core.h"

const char *kvf_engine_session_id(const kvf_engine_t *e)
{
    return e ? e->sid : "";
}

uint16_t kvf_engine_port(const kvf_engine_t *e)
{
    return e ? kvf__transports[e->listener]->port(e->tr[e->listener]) : 0;
}

/* The locks and condition variables of batches, notifications and peer events (batch.c,
 * notify.c, events.c). init fails only on resources. wake tells waiters in kvf_notify_wait and
 * kvf_peer_events, and submitters waiting for room, that shutdown began. fini runs in destroy
 * after shutdown and kvf__batch_stop(): frees the queues. */
#define ASYNC_NCONDS 7
#define ASYNC_NLOCKS 5

static void async_objects(kvf_engine_t *e, pthread_cond_t *conds[ASYNC_NCONDS],
                          pthread_mutex_t *locks[ASYNC_NLOCKS])
{
    eng_batches_t *b = &e->batches;
    eng_notify_t *n = &e->notify;
    eng_events_t *v = &e->events;
    pthread_cond_t *c[] = {&b->work,  &b->room,  &b->idle, &n->order_cond,
                           &n->ncond, &n->nroom, &v->pcond};
    pthread_mutex_t *m[] = {&b->lock, &n->order_lock, &n->nlock, &v->plock, &v->sublock};
    _Static_assert(KVF__ARRAY_SIZE(c) == ASYNC_NCONDS && KVF__ARRAY_SIZE(m) == ASYNC_NLOCKS,
                   "ASYNC_NCONDS, ASYNC_NLOCKS");
    memcpy(conds, c, sizeof(c));
    memcpy(locks, m, sizeof(m));
}

static int async_init(kvf_engine_t *e)
{
    pthread_cond_t *conds[ASYNC_NCONDS];
    pthread_mutex_t *locks[ASYNC_NLOCKS];
    size_t made = 0;
    int rc = 0;
    async_objects(e, conds, locks);
    for (; made < ASYNC_NCONDS; made++) {
        rc = kvf__cond_init_monotonic(conds[made]);
        if (rc)
            break;
    }
    if (rc) {
        while (made > 0)
            pthread_cond_destroy(conds[--made]);
        return kvf__err(rc, "engine: condition variable: %s", kvf_strerror(rc));
    }
    for (size_t i = 0; i < ASYNC_NLOCKS; i++)
        pthread_mutex_init(locks[i], NULL);
    return 0;
}

static void async_wake(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->batches.lock);
    pthread_cond_broadcast(&e->batches.room);
    pthread_mutex_unlock(&e->batches.lock);
    pthread_mutex_lock(&e->notify.nlock);
    pthread_cond_broadcast(&e->notify.ncond);
    pthread_cond_broadcast(&e->notify.nroom);
    pthread_mutex_unlock(&e->notify.nlock);
    pthread_mutex_lock(&e->events.plock);
    pthread_cond_broadcast(&e->events.pcond);
    pthread_mutex_unlock(&e->events.plock);
}

static void async_fini(kvf_engine_t *e)
{
    pthread_cond_t *conds[ASYNC_NCONDS];
    pthread_mutex_t *locks[ASYNC_NLOCKS];
    async_objects(e, conds, locks);
    kvf__notify_fini(e);
    kvf__events_fini(e);
    for (size_t i = 0; i < ASYNC_NCONDS; i++)
        pthread_cond_destroy(conds[i]);
    for (size_t i = 0; i < ASYNC_NLOCKS; i++)
        pthread_mutex_destroy(locks[i]);
    memset(&e->batches, 0, sizeof(e->batches));
    memset(&e->notify, 0, sizeof(e->notify));
    memset(&e->events, 0, sizeof(e->events));
}

/* Destroy the transports created, in the reverse order of their creation (the listener last). */
static void transports_destroy(kvf_engine_t *e)
{
    size_t n = 0;
    while (kvf__transports[n])
        n++;
    for (size_t i = n; i-- > 0;)
        if (i != e->listener && e->tr[i])
            kvf__transports[i]->destroy(e->tr[i]);
    if (e->tr[e->listener])
        kvf__transports[e->listener]->destroy(e->tr[e->listener]);
}

/*
 * Session ids are compared as written, so one that no peer could write the same way is refused
 * or made exact here: the unspecified address (0.0.0.0, ::) listens everywhere but names no
 * address a peer can reach; a host name ("localhost") is resolved to its address (IPv4 first, as
 * the listening socket does), which becomes the engine's id.
 */
static int session_host_check(const char *session_id, kvf_hostport_t *hp)
{
    if ((hp->kind == KVF_HOST_IPV4 && !strcmp(hp->host, "0.0.0.0")) ||
        (hp->kind == KVF_HOST_IPV6 && !strcmp(hp->host, "::")))
        return kvf__err(-KVF_EINVAL,
                        "session id %s: %s listens on every address but names none a peer can "
                        "reach (session ids are compared as written); give this host's address "
                        "that peers use, e.g. 127.0.0.1 on one host",
                        session_id, hp->host);
    if (hp->kind != KVF_HOST_NAME)
        return 0;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    const int families[] = {AF_INET, AF_INET6};
    for (size_t i = 0; i < 2 && !res; i++) {
        hints.ai_family = families[i];
        if (getaddrinfo(hp->host, NULL, &hints, &res) != 0)
            res = NULL;
    }
    if (!res)
        return kvf__err(-KVF_EINVAL, "session id %s: host name %s does not resolve", session_id,
                        hp->host);
    char ip[INET6_ADDRSTRLEN];
    const void *a = res->ai_family == AF_INET
                        ? (const void *)&((struct sockaddr_in *)res->ai_addr)->sin_addr
                        : (const void *)&((struct sockaddr_in6 *)res->ai_addr)->sin6_addr;
    inet_ntop(res->ai_family, a, ip, sizeof(ip));
    hp->kind = res->ai_family == AF_INET ? KVF_HOST_IPV4 : KVF_HOST_IPV6;
    freeaddrinfo(res);
    KVF_INFO(ENG_LOG, "session id %s: %s resolves to %s; the engine is known as %s:%u", session_id,
             hp->host, ip, ip, (unsigned)hp->port);
    snprintf(hp->host, sizeof(hp->host), "%s", ip);
    return session_host_check(session_id, hp);
}

/*
 * Publish the engine's records for the first time. Regions first: a peer that sees the session
 * record can then always find its regions. A store with the cluster secret lets only the client
 * that names this session change its records, and the previous engine at this session id (dead:
 * this one holds its port) named the same one, so its records are taken over at once. A store
 * that still refuses them with -EACCES (records of a client that named no session, e.g. an older
 * kvferry) is waited out until their lease expires, up to init_timeout_ms.
 */
static int publish_first(kvf_engine_t *e)
{
    uint64_t deadline = kvf__now_ms() + e->cfg.init_timeout_ms;
    bool said = false;
    for (;;) {
        int rc = kvf__eng_publish_regions(e);
        if (rc == 0)
            rc = kvf__eng_publish_session(e);
        if (rc != -EACCES || kvf__now_ms() >= deadline)
            return rc;
        if (!said)
            KVF_INFO(ENG_LOG, "session %s: waiting for the lease of the engine that was here to "
                              "expire (the store keeps its records until then)",
                     e->sid);
        said = true;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

int kvf_engine_create(const char *store_url, const char *session_id, kvf_role_t role, int device_id,
                      const kvf_config_t *cfg, kvf_engine_t **out)
{
    kvf_hostport_t listen;
    kvf_store_url_t surl;
    kvf_auth_key_t auth = {.len = 0};
    kvf_engine_t *e;
    int rc;

    if (!out)
        return kvf__err(-KVF_EINVAL, "engine create: the output pointer is NULL");
    *out = NULL;
    if (!store_url)
        return kvf__err(-KVF_EINVAL, "engine create: the store URL is NULL");
    rc = kvf__store_url_parse(store_url, 0, &surl);
    if (rc < 0)
        return rc;
    if (!session_id)
        return kvf__err(-KVF_EINVAL, "engine create: the session id is NULL");
    rc = kvf__session_id_parse(session_id, &listen);
    if (rc == 0)
        rc = session_host_check(session_id, &listen);
    if (rc < 0)
        return rc;
    if ((unsigned)role > KVF_ROLE_BOTH)
        return kvf__err(-KVF_EINVAL,
                        "engine create: role %d: want Prefill (0), Decode (1) or "
                        "Both (2)",
                        (int)role);
    if (device_id < 0)
        return kvf__err(-KVF_EINVAL, "engine create: device id %d: want >= 0", device_id);

    e = calloc(1, sizeof(*e));
    if (!e)
        return kvf__err(-KVF_ENOMEM, "engine create: out of memory");
    rc = kvf__eng_config_load(cfg, &e->cfg);
    if (rc < 0)
        goto out_free;
    snprintf(e->ns, sizeof(e->ns), "%s", e->cfg.ns);
    e->cfg.ns = e->ns;
    snprintf(e->prefix, sizeof(e->prefix), "%s", e->cfg.key_prefix);
    e->cfg.key_prefix = e->prefix;
    e->role = role;
    e->device_id = device_id;
    e->stats.created_ms = kvf__now_ms();
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    e->started_unix_ms = (uint64_t)wall.tv_sec * 1000u + (uint64_t)wall.tv_nsec / 1000000u;
    while (kvf__transports[e->listener] && !(kvf__transports[e->listener]->caps & KVF_TCAP_LISTEN))
        e->listener++;
    /* The nonce tells this engine's word apart from whatever another process (a restart, a
     * reused pid) keeps at the same address. */
    e->shm_word.magic = KVF_SHM_WORD_MAGIC;
    if (getrandom(&e->shm_word.nonce, sizeof(e->shm_word.nonce), GRND_NONBLOCK) !=
        (ssize_t)sizeof(e->shm_word.nonce))
        e->shm_word.nonce = kvf__now_ms() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)e;
    pthread_mutex_init(&e->publish_lock, NULL);
    pthread_mutex_init(&e->peers_lock, NULL);
    pthread_mutex_init(&e->rwatch.lock, NULL);
    const char *queue_only = getenv("KVFERRY_SUBMIT_QUEUE");
    e->submit_posts = !(queue_only && !strcmp(queue_only, "1"));
    const char *nowatch = getenv("KVFERRY_NO_REGIONS_WATCH");
    atomic_init(&e->rwatch.state,
                nowatch && !strcmp(nowatch, "1") ? RWATCH_DISABLED : RWATCH_OFF);
    pthread_mutex_init(&e->busy_lock, NULL);
    pthread_mutex_init(&e->mem_lock, NULL);
    rc = kvf__cond_init_monotonic(&e->busy_cond);
    if (rc < 0)
        goto out_destroy_locks;
    rc = kvf__cond_init_monotonic(&e->peers_cv);
    if (rc < 0) {
        pthread_cond_destroy(&e->busy_cond);
        goto out_destroy_locks;
    }
    KVF_DEBUG(ENG_LOG, "device id %d: host memory (no device memory kinds are built)", device_id);

    rc = async_init(e);
    if (rc < 0)
        goto out_destroy_cond;
    rc = kvf__regions_create(&e->regions);
    if (rc < 0)
        goto out_async;
    /* The key is read once, here; the transport and the store client keep their own copies. */
    rc = kvf__auth_key_resolve(e->cfg.auth_key_file, &auth);
    if (rc < 0) {
        kvf__err_wrap(rc, "engine create");
        goto out_regions;
    }
    kvf_tls_opts_t denv;
    const kvf_tls_opts_t *dtls;
    rc = kvf__tls_data_resolve(e->cfg.data_tls, e->cfg.tls, &denv, &dtls);
    if (rc < 0) {
        kvf__err_wrap(rc, "engine create");
        goto out_regions;
    }

    /* Listen first: the port is the session's identity, and holding it proves that no live
     * engine on this host owns the session id, so a record left in the store is a dead one's. */
    kvf_transport_params_t tp = {
        .local_sid = session_id,
        .listen = listen,
        .regions = e->regions,
        .conns_per_peer = e->cfg.tcp_conns_per_peer,
        .chunk_bytes = e->cfg.tcp_chunk_bytes,
        .connect_timeout_ms = e->cfg.init_timeout_ms,
        .idle_timeout_ms = e->cfg.tcp_idle_timeout_ms,
        .io_threads = e->cfg.io_threads,
        .notify_cb = kvf__notify_deliver,
        .notify_arg = e,
        .stats_cb = kvf__stats_encoded,
        .stats_arg = e,
        .record_cb = kvf__eng_record_answer,
        .record_arg = e,
        .listen_fd = e->cfg.listen_fd >= 0 ? &e->cfg.listen_fd : NULL,
        .shm_word = &e->shm_word,
        .auth = &auth,
        .tls = dtls,
    };
    rc = kvf__transports[e->listener]->create(&tp, &e->tr[e->listener]);
    if (rc == -EADDRINUSE) {
        rc = kvf__err(rc,
                      "session id %s is already in use: another engine or process holds "
                      "port %u on this host",
                      session_id, listen.port);
        goto out_regions;
    }
    if (rc == -EADDRNOTAVAIL) {
        rc = kvf__err(rc, "session id %s: %s is not an address of this host", session_id,
                      listen.host);
        goto out_regions;
    }
    if (rc < 0)
        goto out_regions;
    listen.port = kvf_engine_port(e);
    kvf__hostport_format(&listen, e->sid, sizeof(e->sid));
    memcpy(e->shm_word.sid, e->sid, sizeof(e->shm_word.sid));
    kvf__eng_make_key(e->session_key, sizeof(e->session_key), e, "sessions", e->sid);
    kvf__eng_make_key(e->regions_key, sizeof(e->regions_key), e, "regions", e->sid);
    /* The memfd socket is named after the session (unique on the host while the port is held);
     * an engine forced to tcp offers no shm and so serves no memfds. */
    char sock[ENG_KEY_MAX];
    snprintf(sock, sizeof(sock), "kvferry/%s/%s", e->ns, e->sid);
    tp.local_sid = e->sid;
    for (size_t i = 0; kvf__transports[i]; i++) {
        if (i == e->listener)
            continue;
        tp.memfd_sock = kvf__eng_offered(e, kvf__transports[i]) ? sock : NULL;
        rc = kvf__transports[i]->create(&tp, &e->tr[i]);
        if (rc < 0)
            goto out_transport;
    }

    kvf_store_opts_t so;
    kvf_store_opts_init(&so);
    so.connect_timeout_ms = e->cfg.init_timeout_ms;
    so.auth_key_file = e->cfg.auth_key_file;
    /* p2p:// asks the engines' data ports: it takes the data path's TLS. */
    so.tls = surl.scheme == KVF_STORE_SCHEME_P2P ? dtls : e->cfg.tls;
    /* With a key, the store lets only this client change this session's records. */
    so.session_id = e->sid;
    rc = kvf_store_open(store_url, &so, &e->store);
    /* The caller's strings are not kept. */
    e->cfg.auth_key_file = NULL;
    e->cfg.tls = NULL;
    e->cfg.data_tls = NULL;
    if (rc < 0)
        goto out_transport;
    rc = kvf_store_lease_grant(e->store, e->cfg.lease_ttl_ms, &e->lease);
    if (rc < 0)
        goto out_store;

    void *old;
    size_t old_len;
    /* Without a store (p2p://) there is nobody else's record to take over, and asking would
     * ask this very engine, which does not answer before it starts. */
    if (surl.scheme != KVF_STORE_SCHEME_P2P &&
        kvf_store_get(e->store, e->session_key, 0, &old, &old_len) == 0) {
        KVF_INFO(ENG_LOG, "session %s: taking over the record of an engine that is gone", e->sid);
        free(old);
    }
    rc = publish_first(e);
    if (rc < 0)
        goto out_store;
    atomic_store(&e->records_ready, true);
    if (e->cfg.metrics_listen && e->cfg.metrics_listen[0]) {
        rc = kvf_metrics_server_start(e->cfg.metrics_listen, kvf__stats_render, e, &e->metrics);
        if (rc < 0)
            goto out_store;
    }
    e->cfg.metrics_listen = NULL; /* the caller's string; not kept */
    for (size_t i = 0; kvf__transports[i]; i++)
        kvf__transports[i]->start(e->tr[i]);
    KVF_INFO(ENG_LOG, "engine %s (%s) ready, store %s", e->sid, kvf_role_name(role), store_url);
    kvf__auth_key_wipe(&auth);
    *out = e;
    return 0;

out_store:
    kvf__err_wrap(rc, "engine %s: store %s", e->sid, store_url);
    kvf_store_close(e->store);
out_transport:
    transports_destroy(e);
out_regions:
    kvf__regions_destroy(e->regions);
out_async:
    async_fini(e);
out_destroy_cond:
    pthread_cond_destroy(&e->peers_cv);
    pthread_cond_destroy(&e->busy_cond);
out_destroy_locks:
    pthread_mutex_destroy(&e->mem_lock);
    pthread_mutex_destroy(&e->busy_lock);
    pthread_mutex_destroy(&e->peers_lock);
    pthread_mutex_destroy(&e->rwatch.lock);
    pthread_mutex_destroy(&e->publish_lock);
out_free:
    kvf__auth_key_wipe(&auth);
    free(e->shm_table);
    free(e);
    return rc;
}

void kvf_engine_shutdown(kvf_engine_t *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->busy_lock);
    e->closing = true;
    pthread_mutex_unlock(&e->busy_lock);
    async_wake(e);
}

void kvf_engine_destroy(kvf_engine_t *e)
{
    if (!e)
        return;
    /* No scrape reads the engine once it begins to come apart. */
    kvf_metrics_server_stop(e->metrics);
    e->metrics = NULL;
    /* Stopped first: this waits for loop transfers from other engines of this process into
     * this one to leave, and no new one can find it. */
    for (size_t i = 0; kvf__transports[i]; i++)
        kvf__transports[i]->stop(e->tr[i]);
    /* New calls are refused from here on; running transfers are bounded by op_timeout_ms, and
     * those waiting for a peer notice `closing` within ENG_WAIT_SLICE_MS. */
    kvf_engine_shutdown(e);
    /* Queued batches fail with -KVF_ECLOSED; running ones end within op_timeout_ms. */
    kvf__batch_stop(e);
    pthread_mutex_lock(&e->busy_lock);
    while (e->busy)
        pthread_cond_wait(&e->busy_cond, &e->busy_lock);
    pthread_mutex_unlock(&e->busy_lock);
    /* The application frees its registered memory once this returns. */
    kvf__eng_withdraw_regions(e);

    /* Closing the store client revokes the lease, which withdraws both records at once instead
     * of letting them linger for a TTL. Best effort and bounded: with the store down they
     * expire on their own. */
    kvf_store_close(e->store);

    kvf__peers_fini(e);
    transports_destroy(e);
    kvf__regions_destroy(e->regions);
    /* No transport delivers notifications and no batch is left. */
    async_fini(e);
    /* Nothing serves or transfers any more: what kvf_mem_alloc() handed out goes now. */
    kvf__mem_fini(e);
    pthread_mutex_destroy(&e->mem_lock);
    pthread_cond_destroy(&e->peers_cv);
    pthread_cond_destroy(&e->busy_cond);
    pthread_mutex_destroy(&e->busy_lock);
    pthread_mutex_destroy(&e->peers_lock);
    pthread_mutex_destroy(&e->rwatch.lock);
    pthread_mutex_destroy(&e->publish_lock);
    KVF_INFO(ENG_LOG, "engine %s destroyed", e->sid);
    /* A sender that reads the word after this finds no engine there, whatever reuses the
     * memory (it checks the magic and the nonce). */
    __atomic_store_n(&e->shm_word.magic, 0, __ATOMIC_RELEASE);
    free(e->shm_table);
    free(e);
}
