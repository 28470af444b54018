/* `kvferry` entry point: dispatch to a subcommand. */
#include <stdio.h>
#include <string.h>

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
    {"keygen", kvf_cli_keygen, "write a new cluster secret (auth key file, mode 0600)"},
    {"info", kvf_cli_info, "what the store knows (sessions, regions); an engine's live statistics"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: kvferry <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n`kvferry <command> --help` describes each command. kvferry %s\n",
            KVF_VERSION_STRING);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return KVF_CLI_EXIT_USAGE;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return KVF_CLI_EXIT_OK;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kvferry %s\n", KVF_VERSION_STRING);
        return KVF_CLI_EXIT_OK;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kvferry: unknown command \"%s\"\n\n", argv[1]);
    usage(stderr);
    return KVF_CLI_EXIT_USAGE;
}
