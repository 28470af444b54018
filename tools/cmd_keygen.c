/* `kvferry keygen FILE`: write a new cluster secret (docs/security.md). */
#include <stdio.h>

#include "cli.h"
#include "kvferry.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: kvferry keygen FILE\n\n"
               "Write a new cluster secret to FILE: 32 random bytes as 64 hex digits, in a file\n"
               "created with mode 0600 (an existing file is never overwritten). Give the same\n"
               "file to every engine and store of the cluster with --auth-key-file FILE or\n"
               "KVFERRY_AUTH_KEY_FILE=FILE. To rotate, a key file may hold two keys, the new one\n"
               "first, then the previous one (docs/security.md, \"Key rotation\").\n");
}

int kvf_cli_keygen(int argc, char **argv)
{
    int first = 0;
    const kvf_cli_t cli = {"keygen", usage, NULL, 0, .usage_on_error = true, .operands = true};
    int code = kvf_cli_parse(&cli, argc, argv, &first);
    if (code != KVF_CLI_RUN)
        return code;
    if (argc - first != 1) {
        fprintf(stderr, "kvferry keygen: want one FILE, got %d arguments\n", argc - first);
        usage(stderr);
        return KVF_CLI_EXIT_USAGE;
    }
    int rc = kvf_auth_keygen(argv[first]);
    if (rc < 0) {
        kvf_cli_fail("keygen", rc, "cannot write the key");
        return KVF_CLI_EXIT_FAIL;
    }
    printf("wrote a new cluster secret to %s (mode 0600)\n", argv[first]);
    return KVF_CLI_EXIT_OK;
}
