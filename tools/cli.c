/*
 * What every `kvferry` subcommand shares: the option loop, failure messages, and the parsing of
 * numbers, transports and log levels, so that each flag reads and fails the same way everywhere.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli.h"
#include "kvferry.h"

/* getopt_long values of the table's options: index + CLI_OPT_BASE, above every character. */
#define CLI_OPT_BASE 256
/* Options of one subcommand, besides --log-level and --help. */
#define CLI_OPTS_MAX 32

void kvf_cli_fail(const char *cmd, int rc, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "kvferry %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    const char *detail = kvf_last_error();
    fprintf(stderr, ": %s (%s)\n", detail[0] ? detail : kvf_strerror(rc), kvf_err_name(rc));
}

int kvf_cli_parse_u64(const char *cmd, const char *flag, const char *s, uint64_t min, uint64_t max,
                      uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (!*s || *end || errno || s[0] == '-' || v < min || v > max) {
        fprintf(stderr, "kvferry %s: %s %s: want a whole number from %llu to %llu\n", cmd, flag, s,
                (unsigned long long)min, (unsigned long long)max);
        return -1;
    }
    *out = v;
    return 0;
}

int kvf_cli_parse_transport(const char *cmd, const char *s, kvf_transport_kind_t *out)
{
    if (!strcasecmp(s, "tcp"))
        *out = KVF_TRANSPORT_TCP;
    else if (!strcasecmp(s, "shm"))
        *out = KVF_TRANSPORT_SHM;
    else if (!strcasecmp(s, "auto"))
        *out = KVF_TRANSPORT_AUTO;
    else {
        fprintf(stderr, "kvferry %s: --transport %s: want auto, tcp or shm\n", cmd, s);
        return -1;
    }
    return 0;
}

int kvf_cli_parse_key_prefix(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    size_t n = strlen(value);
    if (n == 0 || n > 128 || strspn(value, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                           "0123456789_.:/-") != n) {
        fprintf(stderr,
                "kvferry %s: --key-prefix %s: want 1..128 letters, digits, '_', '.', ':', '/', "
                "'-'\n",
                cmd, value);
        return -1;
    }
    *(const char **)o->dst = value;
    return 0;
}

const char *kvf_cli_key_prefix(const char *flag)
{
    const char *env = getenv("KVFERRY_KEY_PREFIX");
    return flag ? flag : env && *env ? env : "kvferry/v1/";
}

const char *kvf_cli_transport_name(kvf_transport_kind_t t)
{
    return t == KVF_TRANSPORT_TCP ? "tcp" : t == KVF_TRANSPORT_SHM ? "shm" : "auto";
}

int kvf_cli_set_log_level(const char *cmd, const char *s)
{
    uint64_t level;
    if (kvf_cli_parse_u64(cmd, "--log-level", s, 0, 3, &level) < 0)
        return -1;
    kvf_log_set_level((int)level);
    return 0;
}

void kvf_cli_on_stop_signals(void (*handler)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* Apply option @o with @value; 0, or -1 after a usage error. */
static int opt_apply(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    char flag[64];
    switch (o->kind) {
    case KVF_CLI_STR:
        *(const char **)o->dst = value;
        return 0;
    case KVF_CLI_FLAG:
        *(bool *)o->dst = true;
        return 0;
    case KVF_CLI_IGNORE:
        return 0;
    case KVF_CLI_U64:
        snprintf(flag, sizeof(flag), "--%s", o->name);
        return kvf_cli_parse_u64(cmd, flag, value, o->min, o->max, o->dst);
    case KVF_CLI_TRANSPORT:
        return kvf_cli_parse_transport(cmd, value, o->dst);
    case KVF_CLI_CUSTOM:
        return o->parse(cmd, o, value);
    }
    return -1;
}

/* The TLS options every subcommand that reaches a store takes, and the variable each sets: like
 * the cluster key, through the environment, so that every store, store client and engine of
 * this process and the processes it starts use them (docs/security.md). */
static const struct {
    const char *flag, *env;
    bool arg;
} tls_flags[] = {
    {"tls", "KVFERRY_TLS", false},
    {"tls-ca-file", "KVFERRY_TLS_CA_FILE", true},
    {"tls-ca-path", "KVFERRY_TLS_CA_PATH", true},
    {"tls-cert", "KVFERRY_TLS_CERT", true},
    {"tls-key", "KVFERRY_TLS_KEY", true},
    {"tls-key-password-file", "KVFERRY_TLS_KEY_PASSWORD_FILE", true},
    {"tls-crl-file", "KVFERRY_TLS_CRL_FILE", true},
    {"tls-crl-path", "KVFERRY_TLS_CRL_PATH", true},
    {"tls-server-name", "KVFERRY_TLS_SERVER_NAME", true},
    {"tls-fingerprint", "KVFERRY_TLS_FINGERPRINT", true},
    {"tls-data", "KVFERRY_TLS_DATA", false},
};
#define CLI_TLS_BASE 0x4000

const char *const kvf_cli_tls_usage =
    "  --tls              TLS 1.3 to the store, verified with the system's CAs\n"
    "  --tls-ca-file F    CA certificate(s), PEM (comma-separated); turns TLS on\n"
    "  --tls-ca-path D    CA directory (`openssl rehash D`)\n"
    "  --tls-cert F       this side's certificate (a store: required; a client: mutual TLS)\n"
    "  --tls-key F        its private key, PEM\n"
    "  --tls-key-password-file F  the key's password (first line)\n"
    "  --tls-crl-file F   revocation list(s), PEM; --tls-crl-path D a directory of them\n"
    "  --tls-server-name N  the name the store's certificate must carry (default: its host)\n"
    "  --tls-fingerprint H  accept only this store certificate (SHA-256, hex)\n"
    "  --tls-data         TLS on the engines' data connections too, with these options (each\n"
    "                     engine then needs --tls-cert and --tls-key; peers are checked\n"
    "                     against the address of their session id)\n";

int kvf_cli_parse(const kvf_cli_t *cli, int argc, char **argv, int *first)
{
    struct option lo[CLI_OPTS_MAX + 6 + (sizeof(tls_flags) / sizeof(tls_flags[0]))];
    size_t n = 0;
    int c;

    /* A table longer than this is a programming error, caught by any run of --help. */
    if (cli->nopts > CLI_OPTS_MAX)
        abort();
    for (; n < cli->nopts; n++) {
        kvf_cli_kind_t k = cli->opts[n].kind;
        bool has_arg = k != KVF_CLI_FLAG && k != KVF_CLI_IGNORE;
        lo[n] = (struct option){cli->opts[n].name, has_arg ? required_argument : no_argument, NULL,
                                CLI_OPT_BASE + (int)n};
    }
    if (cli->log_level)
        lo[n++] = (struct option){"log-level", required_argument, NULL, 'L'};
    lo[n++] = (struct option){"auth-key-file", required_argument, NULL, 'K'};
    lo[n++] = (struct option){"admin-key-file", required_argument, NULL, 'A'};
    for (size_t i = 0; i < (sizeof(tls_flags) / sizeof(tls_flags[0])); i++)
        lo[n++] = (struct option){tls_flags[i].flag,
                                  tls_flags[i].arg ? required_argument : no_argument, NULL,
                                  CLI_TLS_BASE + (int)i};
    if (cli->verbose)
        lo[n++] = (struct option){"verbose", no_argument, NULL, 'v'};
    lo[n++] = (struct option){"help", no_argument, NULL, 'h'};
    lo[n] = (struct option){NULL, 0, NULL, 0};

    optind = 1;
    /* "+" stops at the first operand, so that operands such as "-5" reach the subcommand. */
    const char *shorts =
        cli->verbose ? (cli->operands ? "+hv" : "hv") : (cli->operands ? "+h" : "h");
    while ((c = getopt_long(argc, argv, shorts, lo, NULL)) != -1) {
        if (c == 'h') {
            cli->usage(stdout);
            return KVF_CLI_EXIT_OK;
        }
        if (c == 'v') {
            *cli->verbose = true;
            continue;
        }
        if (c == 'L') {
            if (kvf_cli_set_log_level(cli->cmd, optarg) < 0)
                return KVF_CLI_EXIT_USAGE;
            continue;
        }
        if (c == 'K' || c == 'A') {
            /* Through the environment, so that every engine, store and store client of this
             * process, and the processes it starts (demo, bench), use the same cluster key. The
             * admin key's variable is read only by the store server and by `kvferry kv`; an
             * engine's store client never proves it. */
            const char *flag = c == 'K' ? "auth-key-file" : "admin-key-file";
            if (!*optarg ||
                setenv(c == 'K' ? "KVFERRY_AUTH_KEY_FILE" : "KVFERRY_ADMIN_KEY_FILE", optarg, 1)) {
                fprintf(stderr, "kvferry %s: --%s: want a file name\n", cli->cmd, flag);
                return KVF_CLI_EXIT_USAGE;
            }
            continue;
        }
        if (c >= CLI_TLS_BASE && c < CLI_TLS_BASE + (int)(sizeof(tls_flags) / sizeof(tls_flags[0]))) {
            size_t i = (size_t)(c - CLI_TLS_BASE);
            const char *v = tls_flags[i].arg ? optarg : "1";
            if (!*v || strchr(v, ';') || setenv(tls_flags[i].env, v, 1)) {
                fprintf(stderr, "kvferry %s: --%s: want a value without ';' (got \"%s\")\n",
                        cli->cmd, tls_flags[i].flag, v);
                return KVF_CLI_EXIT_USAGE;
            }
            continue;
        }
        if (c < CLI_OPT_BASE) {
            /* getopt_long has said what was wrong. */
            if (cli->usage_on_error)
                cli->usage(stderr);
            else
                fprintf(stderr, "(see kvferry %s --help)\n", cli->cmd);
            return KVF_CLI_EXIT_USAGE;
        }
        if (opt_apply(cli->cmd, &cli->opts[c - CLI_OPT_BASE], optarg) < 0)
            return KVF_CLI_EXIT_USAGE;
    }
    if (cli->operands) {
        *first = optind;
    } else if (optind != argc) {
        fprintf(stderr, "kvferry %s: unexpected argument \"%s\"\n", cli->cmd, argv[optind]);
        return KVF_CLI_EXIT_USAGE;
    }
    return KVF_CLI_RUN;
}
