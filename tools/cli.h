/*
 * The `kvferry` command line tool: one file per subcommand (cmd_*.c), dispatched by main.c, and
 * this helper they all share: exit codes, failure messages, number and transport parsing, and one
 * option loop driven by a table of the subcommand's options.
 *
 * The tool is a program like any other: it uses include/kvferry.h only.
 */
#ifndef KVF_CLI_H
#define KVF_CLI_H

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kvferry.h"

/* Exit codes of every subcommand. */
enum {
    KVF_CLI_EXIT_OK = 0,
    KVF_CLI_EXIT_FAIL = 1,  /* a message on stderr says why */
    KVF_CLI_EXIT_USAGE = 2, /* a message on stderr names the bad flag or argument */
};

/* Each subcommand gets argv starting at its own name and returns the process exit code. */
int kvf_cli_store(int argc, char **argv);
int kvf_cli_kv(int argc, char **argv);
int kvf_cli_transfer(int argc, char **argv);
int kvf_cli_demo(int argc, char **argv);
int kvf_cli_bench(int argc, char **argv);
int kvf_cli_info(int argc, char **argv);
int kvf_cli_keygen(int argc, char **argv);

/* Lines `kvferry transfer` prints and `kvferry demo` (and the tests) read. */
#define KVF_CLI_DECODE_READY_FMT  "decode session %s ready"
#define KVF_CLI_PREFILL_READY_FMT "prefill session %s ready"
/* round, slices, bytes */
#define KVF_CLI_DECODE_VERIFIED_FMT "round %" PRIu64 ": verified %u slices, %zu bytes"
/* round, bytes, milliseconds, GB/s (1 GB = 1e9 bytes) */
#define KVF_CLI_PREFILL_ROUND_FMT "round %" PRIu64 ": wrote %zu bytes in %.3f ms, %.2f GB/s"

/* Print "kvferry <cmd>: <message>: <last error>" to stderr for a failed kvferry call. */
void kvf_cli_fail(const char *cmd, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Parse a decimal unsigned number within [min, max]; returns 0 or -1 after printing a usage
 * error naming @flag and @s. */
int kvf_cli_parse_u64(const char *cmd, const char *flag, const char *s, uint64_t min, uint64_t max,
                      uint64_t *out);

/* Apply --log-level: returns 0 or -1 after printing a usage error. */
int kvf_cli_set_log_level(const char *cmd, const char *s);

/* Parse --transport auto|tcp|shm; returns 0 or -1 after printing a usage error naming @s. */
int kvf_cli_parse_transport(const char *cmd, const char *s, kvf_transport_kind_t *out);

/* The --transport spelling of @t: "auto", "tcp" or "shm". */
const char *kvf_cli_transport_name(kvf_transport_kind_t t);

/* Call @handler on SIGINT and SIGTERM, and ignore SIGPIPE (a peer that goes away is an error
 * return, not a signal). */
void kvf_cli_on_stop_signals(void (*handler)(int));

/* ---------------------------------------------------------------------------------------------
 * The option loop
 * ------------------------------------------------------------------------------------------- */

typedef struct kvf_cli_opt kvf_cli_opt_t;

/* What an option does with its value. */
typedef enum {
    KVF_CLI_STR,       /* *(const char **)dst = the value */
    KVF_CLI_FLAG,      /* *(bool *)dst = true; takes no value */
    KVF_CLI_IGNORE,    /* accepted and ignored; takes no value */
    KVF_CLI_U64,       /* *(uint64_t *)dst = a whole number in [min, max] */
    KVF_CLI_TRANSPORT, /* *(kvf_transport_kind_t *)dst = auto|tcp|shm */
    KVF_CLI_CUSTOM,    /* parse(): the subcommand's own */
} kvf_cli_kind_t;

struct kvf_cli_opt {
    const char *name; /* the long name without "--" */
    kvf_cli_kind_t kind;
    void *dst;
    uint64_t min, max; /* KVF_CLI_U64; a custom parse() may read them too */
    /* KVF_CLI_CUSTOM: returns 0, or -1 after printing a usage error. */
    int (*parse)(const char *cmd, const kvf_cli_opt_t *o, const char *value);
};

/* The options every subcommand spells the same way. */
#define KVF_CLI_OPT_STORE_URL(dst)                                                                 \
    {                                                                                              \
        "store-url", KVF_CLI_STR, (dst), 0, 0, NULL                                                \
    }
#define KVF_CLI_OPT_TRANSPORT(dst)                                                                 \
    {                                                                                              \
        "transport", KVF_CLI_TRANSPORT, (dst), 0, 0, NULL                                          \
    }
/* --key-prefix P: *(const char **)dst = P, checked as engines check config.key_prefix. */
#define KVF_CLI_OPT_KEY_PREFIX(dst)                                                                \
    {                                                                                              \
        "key-prefix", KVF_CLI_CUSTOM, (dst), 0, 0, kvf_cli_parse_key_prefix                        \
    }
int kvf_cli_parse_key_prefix(const char *cmd, const kvf_cli_opt_t *o, const char *value);

/* The store key prefix engines use: @flag (--key-prefix) when given, else $KVFERRY_KEY_PREFIX,
 * else "kvferry/v1/" (as kvf_config_t.key_prefix documents). */
const char *kvf_cli_key_prefix(const char *flag);

/* The --key-prefix help line, for the usage texts. */
#define KVF_CLI_KEY_PREFIX_HELP                                                                    \
    "prefix of the store keys, as the engines'\n"                                                  \
    "                        (default $KVFERRY_KEY_PREFIX, else kvferry/v1/)\n"

/* The number of options in the table @opts. */
#define KVF_CLI_NOPTS(opts) (sizeof(opts) / sizeof((opts)[0]))

typedef struct {
    const char *cmd;        /* as messages name the subcommand: "bench", "bench --serve" */
    void (*usage)(FILE *f); /* the --help text */
    const kvf_cli_opt_t *opts;
    size_t nopts; /* KVF_CLI_NOPTS(opts) */
    /* Accept --log-level 0..3 (after the table's options) and apply it at once. */
    bool log_level;
    /* An unknown option prints the usage to stderr; else a pointer to --help. */
    bool usage_on_error;
    /* Stop at the first operand and leave it and the rest to the subcommand (whose values,
     * such as "-5", must not be read as options); else an operand is a usage error. */
    bool operands;
    /* NULL, or set to true by -v / --verbose. */
    bool *verbose;
} kvf_cli_t;

/* kvf_cli_parse returns this to go on; anything else is the exit code. */
#define KVF_CLI_RUN (-1)

/*
 * Parse argv (from the subcommand's name on) against @cli: --help and -h print the usage to
 * stdout; every option of the table (and --log-level) is applied in the order given. Returns
 * KVF_CLI_RUN, with the index of the first operand in *@first when @cli->operands; else
 * KVF_CLI_EXIT_OK after --help, or KVF_CLI_EXIT_USAGE after a usage error has been printed.
 */
int kvf_cli_parse(const kvf_cli_t *cli, int argc, char **argv, int *first);

/* The help text of the TLS flags kvf_cli_parse() takes on every subcommand (--tls-ca-file and
 * the others set KVFERRY_TLS_* for this process and its children). */
extern const char *const kvf_cli_tls_usage;

#endif /* KVF_CLI_H */
