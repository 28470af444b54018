/* `kvferry` entry point: dispatch to a subcommand. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli.h"
#include "kvferry.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} commands[] = {
    {"store", kvf_cli_store, "run a built-in config store (tcp://)"},
    {"kv", kvf_cli_kv, "read and write keys in a config store (get, set, del, list, add)"},
    {"transfer", kvf_cli_transfer, "the seed's tool: a Prefill writes into a Decode's buffer"},
    {"demo", kvf_cli_demo, "a store, a Decode and a Prefill on 127.0.0.1: transfer and verify"},
    {"bench", kvf_cli_bench, "throughput and latency beside same-run baselines; `bench store`"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: kvferry <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n`kvferry <command> --help` describes each command. kvferry %s\n",
            KVF_VERSION_STRING);
}

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

int kvf_cli_set_log_level(const char *cmd, const char *s)
{
    uint64_t level;
    if (kvf_cli_parse_u64(cmd, "--log-level", s, 0, 3, &level) < 0)
        return -1;
    kvf_log_set_level((int)level);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kvferry %s\n", KVF_VERSION_STRING);
        return 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kvferry: unknown command \"%s\"\n\n", argv[1]);
    usage(stderr);
    return 2;
}
