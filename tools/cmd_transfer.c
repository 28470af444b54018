/*
 * `kvferry transfer`: the seed's test_transfer_engine.py as a C tool, with the seed's flags.
 *
 * A Decode node registers a buffer shaped like the seed's tensor, (10, 50, 40, 20, 60) float16 =
 * 48,000,000 bytes, and waits. A Prefill node fills its own buffer with random float16 values and
 * writes it, slice by slice, into the Decode's registered buffer, whose address it learns from
 * the Decode's published regions (on CPU hosts the seed's "same virtual address on both sides"
 * assumption does not hold). The config store only introduces the two; rounds are coordinated
 * with notifications (kvf_notify_*), which the engine delivers only after every byte of their
 * batch is in the target's memory, so nobody polls:
 *
 *   Prefill -> Decode, one per slice, carried by the batch that writes that slice:
 *       {"round": r, "slice": i, "slices": 10, "bytes": 4800000, "hash": "fnv1a64w",
 *        "checksum": "<16 hex digits>"}
 *     The Decode sums and checks slice i the moment this arrives.
 *   Decode -> Prefill, once it has checked all 10 slices of round r:  {"ack": r}
 *     The Prefill overwrites the Decode's buffer with round r + 1 only after it.
 *
 * Notifications from one engine to one peer arrive in the order their batches were submitted,
 * so the Decode sees slices 0..9 of a round in order; a batch that fails, or whose sender dies
 * part way, never notifies.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "cli.h"
#include "kvferry.h"
#include "transfer.h"

#define CMD XFER_CMD

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvferry transfer --role Prefill|Decode --store-url URL\n"
            "                        [--src-session-id IP:PORT] [--dst-session-id IP:PORT]\n"
            "                        [--npu-id N] [--log-level 0..3] [--iterations N]\n"
            "                        [--timeout SEC] [--transport auto|tcp|shm]\n"
            "                        [--metrics-listen HOST:PORT]\n"
            "                        [--progress-interval SEC] [-v|--verbose]\n"
            "                        [--key-prefix P]\n\n"
            "The seed's test_transfer_engine.py. The Decode registers a (10, 50, 40, 20, 60)\n"
            "float16 buffer (48,000,000 bytes) and checks every round it receives; the Prefill\n"
            "fills its own buffer with random values and writes the 10 slices into the Decode's.\n"
            "Either side may start first.\n\n"
            "  --role R              Prefill (sender) or Decode (receiver); required\n"
            "  --store-url URL       the config store; required: tcp://IP:PORT (built-in),\n"
            "                        etcd://[USER:PASS@]H:P[,H:P...] or\n"
            "                        redis://[USER:PASS@]H:P[/DB], or p2p:// for none (each\n"
            "                        engine is asked for its records on its session port;\n"
            "                        then --src-session-id is required).\n"
            "                        When nothing answers at a tcp:// URL whose IP is an\n"
            "                        address of this host, the Prefill starts the store in\n"
            "                        its own process\n"
            "  --src-session-id ID   this node's session id IP:PORT (port 0 = a free port;\n"
            "                        default: the store's IP with port 0)\n"
            "  --dst-session-id ID   the Decode's session id; required for the Prefill, refused\n"
            "                        for the Decode\n"
            "  --npu-id N            device id (on CPU hosts only published), default 0\n"
            "  --auth-key-file F  the cluster secret (`kvferry keygen`); default\n"
            "                    $KVFERRY_AUTH_KEY_FILE\n"
            "  --log-level N         0 debug, 1 info, 2 warn (default), 3 error\n"
            "  --iterations N        rounds to run, then exit 0; 0 (default) runs forever\n"
            "  --timeout SEC         bound on starting up, on each transfer and on each wait for\n"
            "                        the other side, 1..%u, default 30\n"
            "  --transport T         auto (default: shm to a peer on this host, else tcp), tcp,\n"
            "                        or shm (fails when the peer is not reachable by shm)\n"
            "  --metrics-listen A    serve this engine's statistics for Prometheus at\n"
            "                        http://A/metrics (port 0 picks one; the address is\n"
            "                        printed)\n"
            "  --progress-interval S a round's line for the first and the last round and at\n"
            "                        least every S seconds (0: every round), default %u; on\n"
            "                        a terminal a status line with rounds, bytes, rate and\n"
            "                        ETA shows the rounds in between\n"
            "  --key-prefix P        " KVF_CLI_KEY_PREFIX_HELP
            "  -v, --verbose         every round's line and the seed's per-slice lines\n"
            "                        (\"set/get buffer success i, sum=...\")\n\n"
            "Exit status: 0 every round done (and, on the Decode, verified), 1 failure (a\n"
            "message says why), 2 usage error.\n",
            XFER_MAX_TIMEOUT_S, XFER_PROGRESS_S);
    fprintf(f, "\nTLS to the store (docs/security.md):\n%s", kvf_cli_tls_usage);
}

/* ---------------------------------------------------------------------------------------------
 * Arguments
 * ------------------------------------------------------------------------------------------- */

/* Parse and normalise a session id; port 0 allowed only when @allow_port0. */
static int parse_sid(const char *flag, const char *s, bool allow_port0, char *out, size_t len)
{
    char host[KVF_SESSION_ID_MAX];
    uint16_t port;
    if (kvf_session_id_parse(s, host, sizeof(host), &port) < 0) {
        fprintf(stderr, "kvferry " CMD ": %s: %s\n", flag, kvf_last_error());
        return -1;
    }
    if (!allow_port0 && port == 0) {
        fprintf(stderr,
                "kvferry " CMD ": %s %s: port 0 names no node; give the port the Decode "
                "printed in \"decode session IP:PORT ready\"\n",
                flag, s);
        return -1;
    }
    if (!strcmp(host, "0.0.0.0") || !strcmp(host, "::")) {
        fprintf(stderr,
                "kvferry " CMD ": %s %s: %s names no address a peer can reach; give "
                "the node's address (e.g. 127.0.0.1 on one host)\n",
                flag, s, host);
        return -1;
    }
    /* Session ids are compared as written: a name is resolved to the address the engine
     * publishes (IPv4 first, as the engine does), so localhost:50051 finds 127.0.0.1:50051. */
    unsigned char bin[16];
    if (inet_pton(AF_INET, host, bin) != 1 && inet_pton(AF_INET6, host, bin) != 1) {
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
        const int families[] = {AF_INET, AF_INET6};
        for (size_t i = 0; i < 2 && !res; i++) {
            hints.ai_family = families[i];
            if (getaddrinfo(host, NULL, &hints, &res) != 0)
                res = NULL;
        }
        if (!res) {
            fprintf(stderr, "kvferry " CMD ": %s %s: host name %s does not resolve\n", flag, s,
                    host);
            return -1;
        }
        const void *a = res->ai_family == AF_INET
                            ? (const void *)&((struct sockaddr_in *)res->ai_addr)->sin_addr
                            : (const void *)&((struct sockaddr_in6 *)res->ai_addr)->sin6_addr;
        inet_ntop(res->ai_family, a, host, sizeof(host));
        freeaddrinfo(res);
    }
    /* A parsed host always formats, into KVF_SESSION_ID_MAX bytes. */
    return kvf_session_id_format(host, port, out, len) < 0 ? -1 : 0;
}

/* Returns KVF_CLI_RUN to run, or the exit code (0 after --help, 2 after a usage error). */
static int parse_args(int argc, char **argv, xfer_args_t *a)
{
    const char *role = NULL, *src = NULL, *dst = NULL;
    uint64_t npu_id = 0, timeout_s = 30;

    memset(a, 0, sizeof(*a));
    a->transport = KVF_TRANSPORT_AUTO;
    a->progress_s = XFER_PROGRESS_S;
    const kvf_cli_opt_t opts[] = {
        {"role", KVF_CLI_STR, &role, 0, 0, NULL},
        {"src-session-id", KVF_CLI_STR, &src, 0, 0, NULL},
        KVF_CLI_OPT_STORE_URL(&a->store_url),
        {"npu-id", KVF_CLI_U64, &npu_id, 0, 65535, NULL},
        {"dst-session-id", KVF_CLI_STR, &dst, 0, 0, NULL},
        {"iterations", KVF_CLI_U64, &a->iterations, 0, UINT32_MAX, NULL},
        {"timeout", KVF_CLI_U64, &timeout_s, 1, XFER_MAX_TIMEOUT_S, NULL},
        KVF_CLI_OPT_TRANSPORT(&a->transport),
        {"metrics-listen", KVF_CLI_STR, &a->metrics_listen, 0, 0, NULL},
        {"progress-interval", KVF_CLI_U64, &a->progress_s, 0, XFER_MAX_TIMEOUT_S, NULL},
        KVF_CLI_OPT_KEY_PREFIX(&a->key_prefix),
    };
    const kvf_cli_t cli = {
        CMD, usage, opts, KVF_CLI_NOPTS(opts), .log_level = true, .verbose = &a->verbose};
    int rc = kvf_cli_parse(&cli, argc, argv, NULL);
    if (rc != KVF_CLI_RUN)
        return rc;
    a->npu_id = (int)npu_id;
    a->timeout_ms = (uint32_t)timeout_s * 1000u;
    if (!role) {
        fprintf(stderr, "kvferry " CMD ": --role is required (Prefill or Decode)\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (kvf_role_parse(role, &a->role) < 0 || a->role == KVF_ROLE_BOTH) {
        fprintf(stderr, "kvferry " CMD ": --role %s: want Prefill or Decode\n", role);
        return KVF_CLI_EXIT_USAGE;
    }
    if (!a->store_url) {
        fprintf(stderr, "kvferry " CMD ": --store-url is required (e.g. tcp://127.0.0.1:8000)\n");
        return KVF_CLI_EXIT_USAGE;
    }
    const char *scheme;
    if (kvf_store_url_parse(a->store_url, &scheme, a->store_host, sizeof(a->store_host), NULL) <
        0) {
        fprintf(stderr, "kvferry " CMD ": --store-url: %s\n", kvf_last_error());
        return KVF_CLI_EXIT_USAGE;
    }
    a->store_is_tcp = !strcmp(scheme, "tcp");
    if (!src && !strcmp(scheme, "p2p")) {
        fprintf(stderr, "kvferry " CMD ": with --store-url p2p:// give --src-session-id IP:PORT "
                        "(there is no store host to default to; the Prefill names the Decode by "
                        "it)\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (src) {
        if (parse_sid("--src-session-id", src, true, a->src_sid, sizeof(a->src_sid)) < 0)
            return KVF_CLI_EXIT_USAGE;
    } else {
        /* The seed leaves it optional; the store's address is the one address this node is
         * known to share a network with. */
        char dflt[KVF_SESSION_ID_MAX];
        kvf_session_id_format(a->store_host, 0, dflt, sizeof(dflt));
        if (parse_sid("--src-session-id (by default the store's host)", dflt, true, a->src_sid,
                      sizeof(a->src_sid)) < 0)
            return KVF_CLI_EXIT_USAGE;
    }
    if (a->role == KVF_ROLE_DECODE && dst) {
        fprintf(stderr, "kvferry " CMD ": --dst-session-id is for the Prefill; a Decode waits "
                        "to be written to\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (a->role == KVF_ROLE_PREFILL) {
        if (!dst) {
            fprintf(stderr, "kvferry " CMD ": the Prefill needs --dst-session-id IP:PORT, the "
                            "Decode's session id\n");
            return KVF_CLI_EXIT_USAGE;
        }
        if (parse_sid("--dst-session-id", dst, false, a->dst_sid, sizeof(a->dst_sid)) < 0)
            return KVF_CLI_EXIT_USAGE;
    }
    return KVF_CLI_RUN;
}

/* ---------------------------------------------------------------------------------------------
 * The run
 * ------------------------------------------------------------------------------------------- */

int kvf_cli_transfer(int argc, char **argv)
{
    xfer_args_t a;
    int code = parse_args(argc, argv, &a);
    if (code != KVF_CLI_RUN)
        return code;

    /* Line-buffered even into a pipe: `kvferry demo` and the tests wait for these lines. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    xfer_tables_init();

    kvf_store_t *st;
    kvf_store_server_t *srv;
    code = xfer_store_connect(&a, &st, &srv);
    if (code != 0)
        return code;

    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.init_timeout_ms = a.timeout_ms;
    cfg.op_timeout_ms = a.timeout_ms;
    cfg.transport = a.transport;
    cfg.metrics_listen = a.metrics_listen;
    cfg.key_prefix = a.key_prefix;
    kvf_engine_t *e;
    int rc = kvf_engine_create(a.store_url, a.src_sid, a.role, a.npu_id, &cfg, &e);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "cannot start the %s engine as %s", kvf_role_name(a.role), a.src_sid);
        code = KVF_CLI_EXIT_FAIL;
        goto out_store;
    }
    /* The engine's own spelling of its id, with the chosen port: the Prefill names it. */
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(e));
    if (a.metrics_listen)
        printf("%s metrics on http://%s/metrics\n", kvf_role_name(a.role),
               kvf_engine_metrics_addr(e));

    code = a.role == KVF_ROLE_DECODE ? xfer_decode_run(&a, e, sid) : xfer_prefill_run(&a, e, sid);

    kvf_engine_destroy(e);
out_store:
    if (srv && a.role == KVF_ROLE_PREFILL && code == 0) {
        /* This process hosts the store: give the Decode the moment it needs to withdraw its
         * records, rather than cutting the store away under its shutdown. */
        char key[XFER_KEY_MAX];
        snprintf(key, sizeof(key), "%sdefault/sessions/%s", kvf_cli_key_prefix(a.key_prefix),
                 a.dst_sid);
        xfer_wait_key_gone(st, key, XFER_STORE_LINGER_MS);
    }
    kvf_store_close(st);
    kvf_store_server_stop(srv);
    return code;
}
