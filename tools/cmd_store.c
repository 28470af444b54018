/* `kvferry store`: run the built-in config store until SIGINT or SIGTERM. */
#include <getopt.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

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
    static const struct option opts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"log-level", required_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *listen = "tcp://0.0.0.0:8000";
    int c;

    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'l':
            listen = optarg;
            break;
        case 'v':
            if (kvf_cli_set_log_level("store", optarg) < 0)
                return 2;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "kvferry store: unexpected argument \"%s\"\n", argv[optind]);
        return 2;
    }

    kvf_store_server_t *srv;
    int rc = kvf_store_server_start(listen, &srv);
    if (rc < 0) {
        kvf_cli_fail("store", rc, "cannot listen on %s", listen);
        return 1;
    }
    atomic_store(&running, srv);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    printf("kvferry store listening on %s\n", kvf_store_server_url(srv));
    fflush(stdout);
    rc = kvf_store_server_wait(srv);
    atomic_store(&running, NULL);
    kvf_store_server_stop(srv);
    if (rc < 0) {
        kvf_cli_fail("store", rc, "event loop failed");
        return 1;
    }
    printf("kvferry store stopped\n");
    return 0;
}
