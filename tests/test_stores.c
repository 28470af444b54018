#include "test_stores.h"

#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"

/* Bound on a store's start-up, generous for a loaded machine. */
#define START_TIMEOUT_MS 20000u

const char *kvf_test_store_kind(void)
{
    const char *k = getenv("KVF_TEST_STORE");
    return k && *k ? k : "builtin";
}

static const char *find_binary(const char *name, const char *package)
{
    static char path[256];
    const char *env = getenv(strcmp(name, "etcd") == 0 ? "KVF_TEST_ETCD" : "KVF_TEST_REDIS");
    if (env && *env) {
        if (access(env, X_OK) != 0)
            fail_msg("%s is not installed at %s (KVF_TEST_%s); the %s backend's tests need it",
                     name, env, strcmp(name, "etcd") == 0 ? "ETCD" : "REDIS", name);
        return env;
    }
    const char *dirs[] = {"/usr/bin", "/usr/local/bin", "/usr/sbin"};
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dirs[i], name);
        if (access(path, X_OK) == 0)
            return path;
    }
    fail_msg("%s is not installed: the %s backend's tests need it; run `make deps` (Debian "
             "package %s)", name, name, package);
    return NULL;
}

/* Append b->extra at the first NULL of @argv (which has room for 8 more). */
static void add_extra(char **argv, const kvf_test_backend_t *b)
{
    size_t n = 0;
    while (argv[n])
        n++;
    for (size_t i = 0; i < 7 && b->extra[i]; i++)
        argv[n++] = (char *)b->extra[i];
}

static void spawn(kvf_test_backend_t *b)
{
    char log[200];
    snprintf(log, sizeof(log), "%s/server.log", b->dir);
    if (strcmp(b->kind, "etcd") == 0) {
        char data[160], client[64], peer[64], cluster[96];
        snprintf(data, sizeof(data), "%s/data", b->dir);
        snprintf(client, sizeof(client), "http://127.0.0.1:%u", b->port);
        snprintf(peer, sizeof(peer), "http://127.0.0.1:%u", b->peer_port);
        snprintf(cluster, sizeof(cluster), "t=%s", peer);
        char *argv[] = {(char *)find_binary("etcd", "etcd-server"), "--name", "t", "--data-dir",
                        data, "--listen-client-urls", client, "--advertise-client-urls", client,
                        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", cluster, "--heartbeat-interval", "10",
                        "--election-timeout", "100", "--log-level", "error", NULL, NULL, NULL,
                        NULL, NULL, NULL, NULL, NULL};
        add_extra(argv, b);
        b->pid = kvf_test_spawn(argv, log);
    } else {
        char port[16];
        snprintf(port, sizeof(port), "%u", b->port);
        char *argv[] = {(char *)find_binary("redis-server", "redis-server"), "--port", port,
                        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                        b->dir, "--daemonize", "no", NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                        NULL};
        add_extra(argv, b);
        b->pid = kvf_test_spawn(argv, log);
    }
}

/* Poll until the store answers a ping, the child died, or START_TIMEOUT_MS passed. */
static void wait_ready(kvf_test_backend_t *b)
{
    uint64_t deadline = kvf_test_now_ms() + START_TIMEOUT_MS;
    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = 0;
    o.request_timeout_ms = 500;
    for (;;) {
        kvf_store_t *st = NULL;
        if (kvf_store_open(b->url, &o, &st) == 0) {
            kvf_store_close(st);
            return;
        }
        if (kill(b->pid, 0) < 0 || kvf_test_now_ms() >= deadline) {
            char cmd[300];
            snprintf(cmd, sizeof(cmd), "tail -5 %s/server.log >&2", b->dir);
            if (system(cmd) < 0)
                (void)0;
            fail_msg("%s at %s did not answer within %u ms: %s", b->kind, b->url,
                     START_TIMEOUT_MS, kvf_last_error());
        }
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

void kvf_test_backend_start(kvf_test_backend_t *b, const char *kind)
{
    kvf_test_backend_start_with(b, kind, NULL, true);
}

void kvf_test_backend_start_with(kvf_test_backend_t *b, const char *kind,
                                 const char *const *extra, bool wait)
{
    memset(b, 0, sizeof(*b));
    for (size_t i = 0; extra && i < 7 && extra[i]; i++)
        b->extra[i] = extra[i];
    snprintf(b->kind, sizeof(b->kind), "%s", kind);
    if (strcmp(kind, "builtin") == 0) {
        b->srv = kvf_test_store_start();
        snprintf(b->url, sizeof(b->url), "%s", kvf_store_server_url(b->srv));
        return;
    }
    if (strcmp(kind, "etcd") != 0 && strcmp(kind, "redis") != 0)
        fail_msg("unknown store kind \"%s\" (KVF_TEST_STORE)", kind);
    /* Memory-backed when possible: etcd fsyncs every write. */
    snprintf(b->dir, sizeof(b->dir), "%s/kvf-%s-XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", kind);
    if (!mkdtemp(b->dir))
        fail_msg("mkdtemp %s: %s", b->dir, strerror(errno));
    /* Below the ephemeral range: nobody's outgoing connection takes them before the server
     * binds them (nor while it is killed and restarted on them). */
    b->port = kvf_test_free_port();
    do
        b->peer_port = kvf_test_free_port();
    while (b->peer_port == b->port);
    snprintf(b->url, sizeof(b->url), "%s://127.0.0.1:%u", kind, b->port);
    spawn(b);
    if (wait)
        wait_ready(b);
}

void kvf_test_backend_kill(kvf_test_backend_t *b, bool wipe)
{
    if (b->srv) {
        kvf_store_server_stop(b->srv);
        b->srv = NULL;
        return;
    }
    if (b->pid > 0) {
        kill(b->pid, SIGKILL);
        kvf_test_reap(b->pid, 10000);
        b->pid = 0;
    }
    if (wipe && b->dir[0]) {
        char cmd[200];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s/data'", b->dir);
        if (system(cmd) != 0)
            fail_msg("%s failed", cmd);
    }
}

void kvf_test_backend_restart(kvf_test_backend_t *b)
{
    if (strcmp(b->kind, "builtin") == 0) {
        /* Same port: the clients reconnect to the URL they know. */
        int rc = kvf_store_server_start(b->url, &b->srv);
        if (rc < 0)
            fail_msg("restart %s: %s", b->url, kvf_last_error());
        return;
    }
    spawn(b);
    wait_ready(b);
}

void kvf_test_backend_stop(kvf_test_backend_t *b)
{
    if (!b->kind[0])
        return;
    kvf_test_backend_kill(b, false);
    if (b->dir[0]) {
        char cmd[200];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", b->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "%s failed\n", cmd);
        b->dir[0] = '\0';
    }
    b->kind[0] = '\0';
}
