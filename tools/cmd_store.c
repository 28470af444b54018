/* `kvferry store`: run the built-in config store until SIGINT or SIGTERM. */
#include <inttypes.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"
#include "kvferry.h"

/* Read by the signal handler: an atomic pointer is async-signal-safe to load. */
static kvf_store_server_t *_Atomic running;

static void on_signal(int sig)
{
    (void)sig;
    /* Async-signal-safe: it only writes the server's eventfd. */
    kvf_store_server_t *srv = atomic_load(&running);
    if (srv)
        kvf_store_server_shutdown(srv);
}

static void usage(FILE *f)
{
    kvf_store_server_opts_t d;
    kvf_store_server_opts_init(&d);
    fprintf(
        f,
        "usage: kvferry store [--listen tcp://HOST:PORT] [--metrics-listen HOST:PORT]\n"
        "                     [--log-level 0..3] [bounds...]\n\n"
        "Run the built-in config store in the foreground. Nodes find each other through it\n"
        "with --store-url tcp://HOST:PORT. Everything is kept in memory; nodes re-publish\n"
        "their records when it restarts. Stops cleanly on SIGINT or SIGTERM.\n\n"
        "  --listen URL      address to listen on (default tcp://127.0.0.1:8000, this host\n"
        "                    only; tcp://0.0.0.0:PORT listens on every address: give it an\n"
        "                    auth key. Port 0 picks a free port, printed on start)\n"
        "  --metrics-listen A  serve the store's counts (clients, keys, leases, requests,\n"
        "                    bytes) for Prometheus at http://A/metrics; port 0 picks one\n"
        "  --auth-key-file F  the cluster secret (`kvferry keygen`); default\n"
        "                    $KVFERRY_AUTH_KEY_FILE\n"
        "  --admin-key-file F  the store's operator key (`kvferry keygen`): may change\n"
        "                    any record (default $KVFERRY_ADMIN_KEY_FILE)\n"
        "  --log-level N     0 debug, 1 info, 2 warn (default), 3 error\n\n"
        "Bounds (a client is a source IP address; a request past a quota is refused with\n"
        "an error naming it, a connection past a bound is closed with a log line):\n"
        "  --max-clients N             connections at once (default %u)\n"
        "  --max-clients-per-addr N    connections from one address (default %u)\n"
        "  --idle-timeout-ms N         close a connection silent this long that waits for\n"
        "                              nothing (no get-with-wait, no watch) (default %u)\n"
        "  --max-keys N                keys held (default %" PRIu64 ")\n"
        "  --max-keys-per-client N     (default %" PRIu64 ")\n"
        "  --max-bytes N               bytes of keys and values held (default %" PRIu64 ")\n"
        "  --max-bytes-per-client N    (default %" PRIu64 ")\n"
        "  --max-leases N              leases alive (default %u)\n"
        "  --max-leases-per-client N   (default %u)\n"
        "  --max-watches N             watches registered (default %u)\n"
        "  --max-watches-per-client N  (default %u)\n"
        "  --max-output-bytes N        unread answers and events per connection (default %" PRIu64
        ")\n"
        "  --max-output-bytes-total N  the same, all connections (default %" PRIu64 ")\n",
        d.max_clients, d.max_clients_per_addr, d.idle_timeout_ms, d.max_keys, d.max_keys_per_client,
        d.max_bytes, d.max_bytes_per_client, d.max_leases, d.max_leases_per_client, d.max_watches,
        d.max_watches_per_client, d.max_output_bytes, d.max_output_bytes_total);
    fprintf(f, "\nTLS to the store (docs/security.md):\n%s", kvf_cli_tls_usage);
}

/* The metrics endpoint's callback: the server's counts as Prometheus text. */
static int render_store(void *arg, char **out, size_t *len)
{
    kvf_store_server_stats_t s;
    int rc = kvf_store_server_stats(arg, &s);
    return rc < 0 ? rc : kvf_store_server_stats_prometheus(&s, out, len);
}

int kvf_cli_store(int argc, char **argv)
{
    const char *listen = "tcp://127.0.0.1:8000", *metrics_listen = NULL;
    kvf_metrics_server_t *metrics = NULL;
    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    uint64_t max_clients = so.max_clients, per_addr = so.max_clients_per_addr,
             idle = so.idle_timeout_ms, leases = so.max_leases,
             leases_pc = so.max_leases_per_client, watches = so.max_watches,
             watches_pc = so.max_watches_per_client;
    const kvf_cli_opt_t opts[] = {
        {"listen", KVF_CLI_STR, &listen, 0, 0, NULL},
        {"metrics-listen", KVF_CLI_STR, &metrics_listen, 0, 0, NULL},
        {"max-clients", KVF_CLI_U64, &max_clients, 1, UINT32_MAX, NULL},
        {"max-clients-per-addr", KVF_CLI_U64, &per_addr, 1, UINT32_MAX, NULL},
        {"idle-timeout-ms", KVF_CLI_U64, &idle, 100, 86400000, NULL},
        {"max-keys", KVF_CLI_U64, &so.max_keys, 1, UINT64_MAX, NULL},
        {"max-keys-per-client", KVF_CLI_U64, &so.max_keys_per_client, 1, UINT64_MAX, NULL},
        {"max-bytes", KVF_CLI_U64, &so.max_bytes, 1, UINT64_MAX, NULL},
        {"max-bytes-per-client", KVF_CLI_U64, &so.max_bytes_per_client, 1, UINT64_MAX, NULL},
        {"max-leases", KVF_CLI_U64, &leases, 1, UINT32_MAX, NULL},
        {"max-leases-per-client", KVF_CLI_U64, &leases_pc, 1, UINT32_MAX, NULL},
        {"max-watches", KVF_CLI_U64, &watches, 1, UINT32_MAX, NULL},
        {"max-watches-per-client", KVF_CLI_U64, &watches_pc, 1, UINT32_MAX, NULL},
        {"max-output-bytes", KVF_CLI_U64, &so.max_output_bytes, 1, UINT64_MAX, NULL},
        {"max-output-bytes-total", KVF_CLI_U64, &so.max_output_bytes_total, 1, UINT64_MAX, NULL},
    };
    const kvf_cli_t cli = {
        "store", usage, opts, KVF_CLI_NOPTS(opts), .log_level = true, .usage_on_error = true};
    int code = kvf_cli_parse(&cli, argc, argv, NULL);
    if (code != KVF_CLI_RUN)
        return code;
    so.max_clients = (uint32_t)max_clients;
    so.max_clients_per_addr = (uint32_t)per_addr;
    so.idle_timeout_ms = (uint32_t)idle;
    so.max_leases = (uint32_t)leases;
    so.max_leases_per_client = (uint32_t)leases_pc;
    so.max_watches = (uint32_t)watches;
    so.max_watches_per_client = (uint32_t)watches_pc;

    kvf_store_server_t *srv;
    int rc = kvf_store_server_start_opts(listen, &so, &srv);
    if (rc < 0) {
        kvf_cli_fail("store", rc, "cannot listen on %s", listen);
        return KVF_CLI_EXIT_FAIL;
    }
    if (metrics_listen) {
        rc = kvf_metrics_server_start(metrics_listen, render_store, srv, &metrics);
        if (rc < 0) {
            kvf_cli_fail("store", rc, "--metrics-listen %s", metrics_listen);
            kvf_store_server_stop(srv);
            return KVF_CLI_EXIT_FAIL;
        }
    }
    atomic_store(&running, srv);
    kvf_cli_on_stop_signals(on_signal);

    printf("kvferry store listening on %s\n", kvf_store_server_url(srv));
    if (metrics)
        printf("kvferry store metrics on http://%s/metrics\n", kvf_metrics_server_addr(metrics));
    fflush(stdout);
    rc = kvf_store_server_wait(srv);
    atomic_store(&running, NULL);
    kvf_metrics_server_stop(metrics);
    kvf_store_server_stop(srv);
    if (rc < 0) {
        kvf_cli_fail("store", rc, "event loop failed");
        return KVF_CLI_EXIT_FAIL;
    }
    printf("kvferry store stopped\n");
    return KVF_CLI_EXIT_OK;
}
