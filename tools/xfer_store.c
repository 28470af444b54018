/*
 * The config store of `kvferry transfer`: reached with the tool's --timeout, or served in this
 * process by a Prefill that finds none at a local --store-url, as the seed's Prefill does.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "cli.h"
#include "clock.h"
#include "transfer.h"

static bool sockaddr_is_local(const struct sockaddr *sa, const struct ifaddrs *ifs)
{
    if (sa->sa_family == AF_INET) {
        const struct in_addr *a = &((const struct sockaddr_in *)sa)->sin_addr;
        if ((ntohl(a->s_addr) >> 24) == 127)
            return true;
        for (const struct ifaddrs *i = ifs; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET &&
                ((const struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr == a->s_addr)
                return true;
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a))
            return true;
        for (const struct ifaddrs *i = ifs; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET6 &&
                !memcmp(&((const struct sockaddr_in6 *)i->ifa_addr)->sin6_addr, a, sizeof(*a)))
                return true;
    }
    return false;
}

/* Is @host (an address or a name) one of this host's addresses? Only then may the Prefill serve
 * the store itself: a store URL naming another machine must be served there. */
static bool host_is_local(const char *host)
{
    struct addrinfo hints, *res;
    unsigned char addr[sizeof(struct in6_addr)];
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    /* An address is taken as it is; only a name is looked up. */
    if (inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1)
        hints.ai_flags = AI_NUMERICHOST;
    if (getaddrinfo(host, NULL, &hints, &res) != 0)
        return false;
    struct ifaddrs *ifs = NULL;
    getifaddrs(&ifs); /* on failure only loopback counts as local */
    bool local = false;
    for (struct addrinfo *ai = res; ai && !local; ai = ai->ai_next)
        local = sockaddr_is_local(ai->ai_addr, ifs);
    if (ifs)
        freeifaddrs(ifs);
    freeaddrinfo(res);
    return local;
}

static void store_opts(const xfer_args_t *a, uint32_t connect_ms, kvf_store_opts_t *o)
{
    kvf_store_opts_init(o);
    o->connect_timeout_ms = connect_ms;
    if (o->request_timeout_ms > a->timeout_ms)
        o->request_timeout_ms = a->timeout_ms;
}

/*
 * Connect to the store. A Prefill that finds nothing at a local --store-url serves the store
 * itself, as the seed's Prefill does with create_config_store(); *@srv receives that server.
 * Anyone else waits up to --timeout for the store, saying so.
 * Returns 0 or an exit code.
 */
int xfer_store_connect(const xfer_args_t *a, kvf_store_t **st, kvf_store_server_t **srv)
{
    kvf_store_opts_t o;
    int rc;

    *srv = NULL;
    store_opts(a, 0, &o);
    rc = kvf_store_open(a->store_url, &o, st);
    if (rc == 0)
        return 0;
    if (rc != -KVF_ESTOREDOWN) {
        /* Not a store that is merely down (an unsupported scheme, say): waiting cannot help. */
        kvf_cli_fail(XFER_CMD, rc, "cannot use the config store at %s", a->store_url);
        return KVF_CLI_EXIT_FAIL;
    }
    if (a->role == KVF_ROLE_PREFILL && a->store_is_tcp && host_is_local(a->store_host)) {
        rc = kvf_store_server_start(a->store_url, srv);
        if (rc == 0) {
            printf("no config store answered at %s; serving it in this process (the seed's "
                   "create_config_store)\n",
                   kvf_store_server_url(*srv));
            /* Loudly, on stderr too: a mistyped URL would otherwise quietly start a second
             * store that no Decode ever finds. */
            fprintf(stderr,
                    "kvferry " XFER_CMD ": WARNING: nothing answered at %s, so this Prefill now "
                    "serves the config store in its own process (it ends with it); every node "
                    "must use that URL. If a store should be running there, check --store-url.\n",
                    a->store_url);
        } else if (rc != -EADDRINUSE) {
            kvf_cli_fail(XFER_CMD, rc,
                         "no config store answers at %s and one cannot be started there",
                         a->store_url);
            return KVF_CLI_EXIT_FAIL;
        }
        /* EADDRINUSE: another process started a store there just now; use it. */
    } else {
        printf("waiting up to %u s for the config store at %s\n", a->timeout_ms / 1000u,
               a->store_url);
    }
    store_opts(a, a->timeout_ms, &o);
    rc = kvf_store_open(a->store_url, &o, st);
    if (rc < 0) {
        kvf_cli_fail(XFER_CMD, rc, "cannot reach the config store at %s within %u s", a->store_url,
                     a->timeout_ms / 1000u);
        kvf_store_server_stop(*srv);
        *srv = NULL;
        return KVF_CLI_EXIT_FAIL;
    }
    return 0;
}

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    const char *key;
    bool gone;
} key_gone_t;

static void on_key_event(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    key_gone_t *w = arg;
    /* A prefix watch: "sessions/127.0.0.1:4000" also matches "sessions/127.0.0.1:40001". */
    if (type != KVF_STORE_EVENT_DELETE || strcmp(kv->key, w->key) != 0)
        return;
    pthread_mutex_lock(&w->lock);
    w->gone = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* Wait up to @ms for @key to be deleted. Best effort: used only to let the Decode withdraw its
 * records before the store hosted by this Prefill goes away. */
void xfer_wait_key_gone(kvf_store_t *st, const char *key, uint32_t ms)
{
    key_gone_t w = {.key = key};
    uint64_t id;
    void *val;
    size_t len;

    pthread_mutex_init(&w.lock, NULL);
    cli_cond_init(&w.cond);
    if (kvf_store_watch(st, key, on_key_event, &w, &id) == 0) {
        /* Watch first, then look: a delete between the two is not missed. */
        if (kvf_store_get(st, key, 0, &val, &len) == 0) {
            free(val);
            uint64_t deadline = cli_now_ms() + ms;
            pthread_mutex_lock(&w.lock);
            while (!w.gone && cli_cond_wait_until(&w.cond, &w.lock, deadline) == 0)
                ;
            pthread_mutex_unlock(&w.lock);
        }
        kvf_store_unwatch(st, id);
    }
    pthread_cond_destroy(&w.cond);
    pthread_mutex_destroy(&w.lock);
}
