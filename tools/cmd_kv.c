/* `kvferry kv`: an operator's client for the config store, like etcdctl or redis-cli. */
#include <errno.h>
#include <limits.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "kvferry.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvferry kv --store-url URL [--timeout MS] COMMAND ARGS\n\n"
            "commands:\n"
            "  get KEY [WAIT_MS]   print the value of KEY; with WAIT_MS, wait that long for it\n"
            "  set KEY VALUE       set KEY to VALUE\n"
            "  del KEY             delete KEY\n"
            "  list [PREFIX]       print \"KEY<TAB>VALUE\" for every key under PREFIX, in order\n"
            "  add KEY DELTA       add DELTA to the integer at KEY and print the result\n\n"
            "  --store-url URL     the config store: tcp://H:P (built-in),\n"
            "                      etcd://[USER:PASS@]H:P[,H:P...]\n"
            "                      or redis://[USER:PASS@]H:P[/DB]\n"
            "  --timeout MS        how long to wait for the store to answer (default 5000)\n"
            "  --auth-key-file F  the cluster secret (`kvferry keygen`); default\n"
            "                    $KVFERRY_AUTH_KEY_FILE\n"
            "  --admin-key-file F  the store's operator key (`kvferry keygen`): may change\n"
            "                    any record (default $KVFERRY_ADMIN_KEY_FILE)\n"
            "  --log-level N       0 debug, 1 info, 2 warn (default), 3 error\n\n"
            "Exit status: 0 done, 1 the store refused or failed (a message says why; a missing\n"
            "key is \"not found\"), 2 usage error.\n");
    fprintf(f, "\nTLS to the store (docs/security.md):\n%s", kvf_cli_tls_usage);
}

static int want_args(const char *sub, int have, int min, int max)
{
    if (have >= min && have <= max)
        return 0;
    fprintf(stderr, "kvferry kv %s: wrong number of arguments (see kvferry kv --help)\n", sub);
    return -1;
}

static int run_sub(kvf_store_t *st, const char *sub, int n, char **a)
{
    int rc;
    if (!strcmp(sub, "get")) {
        uint64_t wait_ms = 0;
        if (want_args(sub, n, 1, 2) < 0)
            return KVF_CLI_EXIT_USAGE;
        if (n == 2 && kvf_cli_parse_u64("kv get", "WAIT_MS", a[1], 0, UINT32_MAX, &wait_ms) < 0)
            return KVF_CLI_EXIT_USAGE;
        void *val;
        size_t len;
        rc = kvf_store_get(st, a[0], (uint32_t)wait_ms, &val, &len);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "get \"%s\"", a[0]);
            return KVF_CLI_EXIT_FAIL;
        }
        fwrite(val, 1, len, stdout);
        fputc('\n', stdout);
        free(val);
        return KVF_CLI_EXIT_OK;
    }
    if (!strcmp(sub, "set")) {
        if (want_args(sub, n, 2, 2) < 0)
            return KVF_CLI_EXIT_USAGE;
        rc = kvf_store_set(st, a[0], a[1], strlen(a[1]), 0);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "set \"%s\"", a[0]);
            return KVF_CLI_EXIT_FAIL;
        }
        return KVF_CLI_EXIT_OK;
    }
    if (!strcmp(sub, "del")) {
        if (want_args(sub, n, 1, 1) < 0)
            return KVF_CLI_EXIT_USAGE;
        rc = kvf_store_del(st, a[0]);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "del \"%s\"", a[0]);
            return KVF_CLI_EXIT_FAIL;
        }
        return KVF_CLI_EXIT_OK;
    }
    if (!strcmp(sub, "list")) {
        if (want_args(sub, n, 0, 1) < 0)
            return KVF_CLI_EXIT_USAGE;
        kvf_store_kv_t *kvs;
        size_t count;
        const char *prefix = n ? a[0] : "";
        rc = kvf_store_list(st, prefix, &kvs, &count);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "list \"%s\"", prefix);
            return KVF_CLI_EXIT_FAIL;
        }
        for (size_t i = 0; i < count; i++) {
            fputs(kvs[i].key, stdout);
            fputc('\t', stdout);
            fwrite(kvs[i].val, 1, kvs[i].val_len, stdout);
            fputc('\n', stdout);
        }
        kvf_store_kv_free(kvs, count);
        return KVF_CLI_EXIT_OK;
    }
    if (!strcmp(sub, "add")) {
        if (want_args(sub, n, 2, 2) < 0)
            return KVF_CLI_EXIT_USAGE;
        char *end;
        errno = 0;
        long long delta = strtoll(a[1], &end, 10);
        if (!a[1][0] || *end || errno == ERANGE) {
            fprintf(stderr, "kvferry kv add: DELTA %s: want a whole number from %lld to %lld\n",
                    a[1], LLONG_MIN, LLONG_MAX);
            return KVF_CLI_EXIT_USAGE;
        }
        int64_t result;
        rc = kvf_store_add(st, a[0], (int64_t)delta, &result);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "add \"%s\"", a[0]);
            return KVF_CLI_EXIT_FAIL;
        }
        printf("%" PRId64 "\n", result);
        return KVF_CLI_EXIT_OK;
    }
    fprintf(stderr, "kvferry kv: unknown command \"%s\" (get, set, del, list, add)\n", sub);
    return KVF_CLI_EXIT_USAGE;
}

int kvf_cli_kv(int argc, char **argv)
{
    const char *url = NULL;
    uint64_t timeout_ms = 5000;
    const kvf_cli_opt_t opts[] = {
        KVF_CLI_OPT_STORE_URL(&url),
        {"timeout", KVF_CLI_U64, &timeout_ms, 1, UINT32_MAX, NULL},
    };
    const kvf_cli_t cli = {"kv", usage, opts, KVF_CLI_NOPTS(opts),
                           .log_level = true, .usage_on_error = true, .operands = true};
    int first;
    int code = kvf_cli_parse(&cli, argc, argv, &first);
    if (code != KVF_CLI_RUN)
        return code;
    if (!url) {
        fprintf(stderr, "kvferry kv: --store-url is required (e.g. tcp://127.0.0.1:8000)\n");
        return KVF_CLI_EXIT_USAGE;
    }
    if (first >= argc) {
        fprintf(stderr, "kvferry kv: missing command (get, set, del, list, add)\n");
        return KVF_CLI_EXIT_USAGE;
    }

    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.request_timeout_ms = (uint32_t)timeout_ms;
    /* --admin-key-file (or the variable it sets): the operator's key, for this tool alone. */
    o.admin_key_file = getenv("KVFERRY_ADMIN_KEY_FILE");
    kvf_store_t *st;
    /* One attempt first: a port that refuses has no store behind it, and an operator wants to
     * hear that at once rather than after --timeout of retries. Anything else (no answer, a
     * store still starting) is retried for --timeout. */
    o.connect_timeout_ms = 0;
    int rc = kvf_store_open(url, &o, &st);
    if (rc == -KVF_ESTOREDOWN && !strstr(kvf_last_error(), strerror(ECONNREFUSED))) {
        o.connect_timeout_ms = (uint32_t)timeout_ms;
        rc = kvf_store_open(url, &o, &st);
    }
    if (rc < 0) {
        kvf_cli_fail("kv", rc, "cannot reach the store");
        return KVF_CLI_EXIT_FAIL;
    }
    code = run_sub(st, argv[first], argc - first - 1, argv + first + 1);
    kvf_store_close(st);
    return code;
}
