/* `kvferry store`: run the built-in config store until SIGINT or SIGTERM. */
#include <stdatomic.h>
#include <stdio.h>

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
            "usage: kvferry store [--listen tcp://HOST:PORT] [--log-level 0..3]\n\n"
            "Run the built-in config store in the foreground. Nodes find each other through it\n"
            "with --store-url tcp://HOST:PORT. Everything is kept in memory; nodes re-publish\n"
            "their records when it restarts. Stops cleanly on SIGINT or SIGTERM.\n\n"
            "  --listen URL      address to listen on (default tcp://0.0.0.0:8000;\n"
            "                    port 0 picks a free port, printed on start)\n"
            "  --log-level N     0 debug, 1 info, 2 warn (default), 3 error\n");
}

int kvf_cli_store(int argc, char **argv)
{
    const char *listen = "tcp://0.0.0.0:8000";
    const kvf_cli_opt_t opts[] = {
        {"listen", KVF_CLI_STR, &listen, 0, 0, NULL},
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
    atomic_store(&running, srv);
    kvf_cli_on_stop_signals(on_signal);

    printf("kvferry store listening on %s\n", kvf_store_server_url(srv));
    fflush(stdout);
    rc = kvf_store_server_wait(srv);
    atomic_store(&running, NULL);
    kvf_store_server_stop(srv);
    if (rc < 0) {
        kvf_cli_fail("store", rc, "event loop failed");
        return KVF_CLI_EXIT_FAIL;
    }
    printf("kvferry store stopped\n");
    return KVF_CLI_EXIT_OK;
}
