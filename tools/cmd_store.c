/* `kvferry store`: run the built-in config store until SIGINT or SIGTERM. */
#include <stdatomic.h>
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
    fprintf(f,
            "usage: kvferry store [--listen tcp://HOST:PORT] [--metrics-listen HOST:PORT]\n"
            "                     [--log-level 0..3]\n\n"
            "Run the built-in config store in the foreground. Nodes find each other through it\n"
            "with --store-url tcp://HOST:PORT. Everything is kept in memory; nodes re-publish\n"
            "their records when it restarts. Stops cleanly on SIGINT or SIGTERM.\n\n"
            "  --listen URL      address to listen on (default tcp://0.0.0.0:8000;\n"
            "                    port 0 picks a free port, printed on start)\n"
            "  --metrics-listen A  serve the store's counts (clients, keys, leases, requests,\n"
            "                      bytes) for Prometheus at http://A/metrics; port 0 picks one\n"
            "  --log-level N     0 debug, 1 info, 2 warn (default), 3 error\n");
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
    const char *listen = "tcp://0.0.0.0:8000", *metrics_listen = NULL;
    kvf_metrics_server_t *metrics = NULL;
    const kvf_cli_opt_t opts[] = {
        {"listen", KVF_CLI_STR, &listen, 0, 0, NULL},
        {"metrics-listen", KVF_CLI_STR, &metrics_listen, 0, 0, NULL},
    };
    const kvf_cli_t cli = {"store", usage, opts, KVF_CLI_NOPTS(opts),
                           .log_level = true, .usage_on_error = true};
    int code = kvf_cli_parse(&cli, argc, argv, NULL);
    if (code != KVF_CLI_RUN)
        return code;

    kvf_store_server_t *srv;
    int rc = kvf_store_server_start(listen, &srv);
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
