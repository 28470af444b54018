/* `kvferry kv`: an operator's client for the config store, like etcdctl or redis-cli. */
#include <errno.h>
#include <getopt.h>
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
            "  --store-url URL     the config store, e.g. tcp://127.0.0.1:8000\n"
            "  --timeout MS        how long to wait for the store to answer (default 5000)\n"
            "  --log-level N       0 debug, 1 info, 2 warn (default), 3 error\n\n"
            "Exit status: 0 done, 1 the store refused or failed (a message says why; a missing\n"
            "key is \"not found\"), 2 usage error.\n");
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
            return 2;
        if (n == 2 && kvf_cli_parse_u64("kv get", "WAIT_MS", a[1], 0, UINT32_MAX, &wait_ms) < 0)
            return 2;
        void *val;
        size_t len;
        rc = kvf_store_get(st, a[0], (uint32_t)wait_ms, &val, &len);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "get \"%s\"", a[0]);
            return 1;
        }
        fwrite(val, 1, len, stdout);
        fputc('\n', stdout);
        free(val);
        return 0;
    }
    if (!strcmp(sub, "set")) {
        if (want_args(sub, n, 2, 2) < 0)
            return 2;
        rc = kvf_store_set(st, a[0], a[1], strlen(a[1]), 0);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "set \"%s\"", a[0]);
            return 1;
        }
        return 0;
    }
    if (!strcmp(sub, "del")) {
        if (want_args(sub, n, 1, 1) < 0)
            return 2;
        rc = kvf_store_del(st, a[0]);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "del \"%s\"", a[0]);
            return 1;
        }
        return 0;
    }
    if (!strcmp(sub, "list")) {
        if (want_args(sub, n, 0, 1) < 0)
            return 2;
        kvf_store_kv_t *kvs;
        size_t count;
        const char *prefix = n ? a[0] : "";
        rc = kvf_store_list(st, prefix, &kvs, &count);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "list \"%s\"", prefix);
            return 1;
        }
        for (size_t i = 0; i < count; i++) {
            fputs(kvs[i].key, stdout);
            fputc('\t', stdout);
            fwrite(kvs[i].val, 1, kvs[i].val_len, stdout);
            fputc('\n', stdout);
        }
        kvf_store_kv_free(kvs, count);
        return 0;
    }
    if (!strcmp(sub, "add")) {
        if (want_args(sub, n, 2, 2) < 0)
            return 2;
        char *end;
        errno = 0;
        long long delta = strtoll(a[1], &end, 10);
        if (!a[1][0] || *end || errno == ERANGE) {
            fprintf(stderr, "kvferry kv add: DELTA %s: want a whole number from %lld to %lld\n",
                    a[1], LLONG_MIN, LLONG_MAX);
            return 2;
        }
        int64_t result;
        rc = kvf_store_add(st, a[0], (int64_t)delta, &result);
        if (rc < 0) {
            kvf_cli_fail("kv", rc, "add \"%s\"", a[0]);
            return 1;
        }
        printf("%" PRId64 "\n", result);
        return 0;
    }
    fprintf(stderr, "kvferry kv: unknown command \"%s\" (get, set, del, list, add)\n", sub);
    return 2;
}

int kvf_cli_kv(int argc, char **argv)
{
    static const struct option opts[] = {
        {"store-url", required_argument, NULL, 'u'},
        {"timeout", required_argument, NULL, 't'},
        {"log-level", required_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *url = NULL;
    uint64_t timeout_ms = 5000;
    int c;

    /* "+" stops at the first non-option so that values such as "-5" reach the subcommand. */
    while ((c = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
        switch (c) {
        case 'u':
            url = optarg;
            break;
        case 't':
            if (kvf_cli_parse_u64("kv", "--timeout", optarg, 1, UINT32_MAX, &timeout_ms) < 0)
                return 2;
            break;
        case 'v':
            if (kvf_cli_set_log_level("kv", optarg) < 0)
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
    if (!url) {
        fprintf(stderr, "kvferry kv: --store-url is required (e.g. tcp://127.0.0.1:8000)\n");
        return 2;
    }
    if (optind >= argc) {
        fprintf(stderr, "kvferry kv: missing command (get, set, del, list, add)\n");
        return 2;
    }

    kvf_store_opts_t o;
    kvf_store_opts_init(&o);
    o.connect_timeout_ms = (uint32_t)timeout_ms;
    o.request_timeout_ms = (uint32_t)timeout_ms;
    kvf_store_t *st;
    int rc = kvf_store_open(url, &o, &st);
    if (rc < 0) {
        kvf_cli_fail("kv", rc, "cannot reach the store");
        return 1;
    }
    int code = run_sub(st, argv[optind], argc - optind - 1, argv + optind + 1);
    kvf_store_close(st);
    return code;
}
