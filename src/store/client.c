/*
 * Client of the built-in config store (tcp://): its open() and close(), and its ops table (the
 * backend kvf_store_open() picks for tcp://, see store.h).
 * client.h describes how the client works and the files below this one.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/thread.h"
#include "common/url.h"
#include "store/client.h"

static void cli_free(kvf_store_t *st)
{
    while (st->leases) {
        cli_lease_t *l = st->leases;
        st->leases = l->next;
        kvf__cli_lease_free(l);
    }
    while (st->watches) {
        cli_watch_t *w = st->watches;
        st->watches = w->next;
        kvf__cli_watch_free(w);
    }
    kvf__buf_free(&st->out);
    kvf__buf_free(&st->rx);
    pthread_cond_destroy(&st->cond);
    pthread_mutex_destroy(&st->mu);
    close(st->wake_fd);
    free(st->url);
    kvf__auth_key_wipe(&st->auth);
    kvf__tls_ctx_free(st->tls_ctx);
    free(st);
}

/* Connect for kvf_store_open(): retry with backoff until connect_timeout_ms has passed. */
static int cli_open_connect(kvf_store_t *st, kvf_tls_t **tls)
{
    uint64_t start = kvf__now_ms();
    uint32_t ct = st->opts.connect_timeout_ms;
    uint64_t deadline = start + ct;
    uint32_t backoff = CLI_BACKOFF_MIN_MS;
    char why[CLI_MSG_MAX] = "";
    for (;;) {
        /* With no connect timeout a single attempt is still bounded, by the request timeout. */
        uint64_t attempt_deadline = ct ? deadline : start + st->opts.request_timeout_ms;
        int fd = kvf__cli_connect_once(st, attempt_deadline, false, tls, why, sizeof(why));
        if (fd >= 0)
            return fd;
        /* Retrying cannot change the other side's mind about our key or certificate. */
        if (fd == -KVF_EAUTH || fd == -KVF_ETLS)
            return kvf__err(fd, "store %s: %s", st->url, why);
        uint64_t now = kvf__now_ms();
        if (ct == 0 || now >= deadline)
            break;
        KVF_DEBUG("store", "%s: %s; retrying in %u ms", st->url, why, backoff);
        uint64_t nap = deadline - now < backoff ? deadline - now : backoff;
        struct timespec ts = {.tv_sec = (time_t)(nap / 1000),
                              .tv_nsec = (long)(nap % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
        backoff = backoff * 2 > CLI_BACKOFF_MAX_MS ? CLI_BACKOFF_MAX_MS : backoff * 2;
    }
    if (ct == 0)
        return kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect: %s", st->url, why);
    return kvf__err(-KVF_ESTOREDOWN, "store %s: cannot connect within %u ms: %s", st->url, ct, why);
}

static void cli_close(kvf_store_t *st);

/* The backend's open(): kvf_store_open() (store.c) has parsed @url and completed @opts. */
static int cli_open(const char *url, const kvf_store_url_t *addr, const kvf_store_opts_t *opts,
                    kvf_store_t **out)
{
    int rc;
    kvf_store_t *st = calloc(1, sizeof(*st));
    if (!st)
        return kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
    st->fd = -1;
    st->opts = *opts;
    st->addr = *addr;
    st->next_req_id = 1;
    st->url = strdup(url);
    if (!st->url) {
        rc = kvf__err(-KVF_ENOMEM, "store %s: out of memory", url);
        goto out_free_st;
    }
    st->base.ops = &kvf__store_builtin_ops;
    st->base.url = st->url;
    /* The admin key only when the caller names it: never from the environment, so that an
     * engine started where an operator's variables are set does not act as the operator. */
    rc = opts->admin_key_file && *opts->admin_key_file
             ? kvf__auth_admin_key_resolve(opts->admin_key_file, &st->auth)
             : 0;
    bool admin = rc == 0 && st->auth.len;
    if (rc == 0 && !admin)
        rc = kvf__auth_key_resolve(opts->auth_key_file, &st->auth);
    kvf_tls_opts_t tls_env;
    const kvf_tls_opts_t *to = kvf__tls_opts_resolve(opts->tls, &tls_env);
    if (rc == 0 && to)
        rc = kvf__tls_ctx_new(to, false, addr->hosts[0].host, &st->tls_ctx);
    st->opts.auth_key_file = NULL; /* the caller's strings; not kept */
    st->opts.admin_key_file = NULL;
    st->opts.tls = NULL;
    if (rc < 0) {
        kvf__err_wrap(rc, "store %s", url);
        goto out_free_url;
    }
    const char *sess = opts->session_id;
    st->opts.session_id = NULL;
    if (!admin && sess && *sess) {
        /* An engine's client: its identity names the session, whose records only it may change
         * (server_ops.c). The proof binds the name, not the key to the session: see security.md. */
        kvf_hostport_t hp;
        if (kvf__session_id_parse(sess, &hp) < 0 ||
            strlen(sess) > KVF_AUTH_MAX_ID - strlen(KVF_AUTH_SESSION_ID)) {
            rc = kvf__err(-KVF_EINVAL, "store %s: opts.session_id \"%.64s\" is not a session id",
                          url, sess);
            goto out_free_url;
        }
        snprintf(st->ident, sizeof(st->ident), "%s%s", KVF_AUTH_SESSION_ID, sess);
    } else {
        uint64_t inst = 0;
        if (getrandom(&inst, sizeof(inst), GRND_NONBLOCK) != (ssize_t)sizeof(inst))
            inst = kvf__now_ns() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)st;
        snprintf(st->ident, sizeof(st->ident), "%s/%016" PRIx64,
                 admin ? KVF_AUTH_ADMIN_ID : "kvferry-store-client", inst);
    }
    st->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (st->wake_fd < 0) {
        rc = kvf__err(-errno, "store %s: eventfd: %s", url, kvf_strerror(-errno));
        goto out_free_url;
    }
    pthread_mutex_init(&st->mu, NULL);
    rc = kvf__cond_init_monotonic(&st->cond);
    if (rc < 0) {
        rc = kvf__err(rc, "store %s: pthread_cond_init: %s", url, kvf_strerror(rc));
        goto out_close_wake;
    }

    kvf_tls_t *tls = NULL;
    int fd = cli_open_connect(st, &tls);
    if (fd < 0) {
        rc = fd;
        goto out_free_all;
    }
    pthread_mutex_lock(&st->mu);
    kvf__cli_conn_up_locked(st, fd, tls);
    pthread_mutex_unlock(&st->mu);

    /* The I/O thread takes no signals: they belong to the application's threads. */
    rc = kvf__thread_start(&st->io, "kvf-store-io", 0, kvf__cli_io_main, st);
    if (rc < 0) {
        rc = kvf__err(rc, "store %s: cannot start the I/O thread: %s", url, kvf_strerror(rc));
        pthread_mutex_lock(&st->mu);
        kvf__cli_conn_down_locked(st, -KVF_ECLOSED, "the client was closed");
        pthread_mutex_unlock(&st->mu);
        goto out_free_all;
    }
    st->io_started = true;

    /* Something accepted the connection; make sure it is a store that answers. */
    rc = kvf__builtin_ping(st);
    if (rc == -KVF_EAUTH || rc == -KVF_ETLS) {
        /* The store's own answer says what is missing; the message already names the store. */
        cli_close(st);
        return rc;
    }
    if (rc < 0) {
        rc = kvf__err_wrap(-KVF_ESTOREDOWN, "store %s: the store does not answer", url);
        cli_close(st);
        return rc;
    }
    KVF_DEBUG("store", "%s: connected", url);
    *out = st;
    return 0;

out_free_all:
    cli_free(st);
    return rc;
out_close_wake:
    pthread_mutex_destroy(&st->mu);
    close(st->wake_fd);
out_free_url:
    free(st->url);
out_free_st:
    kvf__auth_key_wipe(&st->auth);
    kvf__tls_ctx_free(st->tls_ctx);
    free(st);
    return rc;
}

/* Revoke every live lease, all within CLI_CLOSE_REVOKE_MS, without waiting for a reconnection. */
static void cli_revoke_all(kvf_store_t *st)
{
    uint64_t deadline = kvf__now_ms() + CLI_CLOSE_REVOKE_MS;
    for (;;) {
        pthread_mutex_lock(&st->mu);
        cli_lease_t *l;
        for (l = st->leases; l && l->state != CLI_LEASE_LIVE; l = l->next)
            ;
        /* While a re-grant is being restored, kvf__cli_call() waits for it (within the
         * deadline). */
        if (!l || st->state == CLI_DOWN) {
            pthread_mutex_unlock(&st->mu);
            return;
        }
        uint64_t sid = l->sid, cid = l->cid, gen = st->conn_gen;
        kvf__cli_lease_free(kvf__cli_lease_unlink_locked(st, cid));
        pthread_mutex_unlock(&st->mu);

        uint64_t now = kvf__now_ms();
        if (now >= deadline)
            return;
        char what[64];
        snprintf(what, sizeof(what), "lease revoke %" PRIu64, cid);
        kvf_buf_t f;
        cli_req_t *rq = kvf__cli_req_new(KVF_STORE_OP_LEASE_REVOKE, CLI_OWNER_CALLER);
        if (!rq)
            return;
        if (kvf__cli_frame_u64(&f, KVF_STORE_OP_LEASE_REVOKE, sid) < 0) {
            kvf__buf_free(&f);
            kvf__cli_req_free(rq);
            return;
        }
        rq->sid_gen = gen;
        if (kvf__cli_call(st, &rq, &f, deadline - now, false, what) < 0)
            KVF_DEBUG("store", "%s: on close: %s", st->url, kvf_last_error());
        kvf__buf_free(&f);
        kvf__cli_req_free(rq);
    }
}

static void cli_close(kvf_store_t *st)
{
    if (!st)
        return;
    if (cli_on_io_thread(st)) {
        KVF_ERROR("store", "%s: kvf_store_close() called from a watch callback; ignored", st->url);
        return;
    }
    cli_revoke_all(st);
    pthread_mutex_lock(&st->mu);
    st->closing = true;
    pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->mu);
    cli_wake(st);
    pthread_join(st->io, NULL);
    /* The I/O thread failed every request on its way out; wait for their callers to leave. */
    pthread_mutex_lock(&st->mu);
    while (st->active_calls > 0)
        pthread_cond_wait(&st->cond, &st->mu);
    pthread_mutex_unlock(&st->mu);
    KVF_DEBUG("store", "%s: closed", st->url);
    cli_free(st);
}

const kvf_store_ops_t kvf__store_builtin_ops = {
    .size = sizeof(kvf_store_ops_t),
    .name = "builtin",
    .open = cli_open,
    .close = cli_close,
    .set = kvf__builtin_set,
    .get = kvf__builtin_get,
    .del = kvf__builtin_del,
    .cas = kvf__builtin_cas,
    .add = kvf__builtin_add,
    .list = kvf__builtin_list,
    .list_page = kvf__builtin_list_page,
    .watch = kvf__builtin_watch,
    .unwatch = kvf__builtin_unwatch,
    .lease_grant = kvf__builtin_lease_grant,
    .lease_keepalive_stop = kvf__builtin_lease_keepalive_stop,
    .lease_revoke = kvf__builtin_lease_revoke,
    .ping = kvf__builtin_ping,
};
