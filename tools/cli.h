/* The `kvferry` command line tool: one file per subcommand. */
#ifndef KVF_CLI_H
#define KVF_CLI_H

#include <stdint.h>

/* Each subcommand gets argv starting at its own name and returns the process exit code:
 * 0 success, 1 failure (a message on stderr), 2 usage error. */
int kvf_cli_store(int argc, char **argv);
int kvf_cli_kv(int argc, char **argv);

/* Print "kvferry <cmd>: <message>: <last error>" to stderr for a failed kvferry call. */
void kvf_cli_fail(const char *cmd, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Parse a decimal unsigned number within [min, max]; returns 0 or -1 after printing a usage
 * error naming @flag and @s. */
int kvf_cli_parse_u64(const char *cmd, const char *flag, const char *s, uint64_t min, uint64_t max,
                      uint64_t *out);

/* Apply --log-level: returns 0 or -1 after printing a usage error. */
int kvf_cli_set_log_level(const char *cmd, const char *s);

#endif /* KVF_CLI_H */
