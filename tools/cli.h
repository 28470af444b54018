/* The `kvferry` command line tool: one file per subcommand. */
#ifndef KVF_CLI_H
#define KVF_CLI_H

#include <inttypes.h>
#include <stdint.h>

#include "kvferry.h"

/* Each subcommand gets argv starting at its own name and returns the process exit code:
 * 0 success, 1 failure (a message on stderr), 2 usage error. */
int kvf_cli_store(int argc, char **argv);
int kvf_cli_kv(int argc, char **argv);
int kvf_cli_transfer(int argc, char **argv);
int kvf_cli_demo(int argc, char **argv);
int kvf_cli_bench(int argc, char **argv);

/* Lines `kvferry transfer` prints and `kvferry demo` (and the tests) read. */
#define KVF_CLI_DECODE_READY_FMT "decode session %s ready"
#define KVF_CLI_PREFILL_READY_FMT "prefill session %s ready"
/* round, slices, bytes */
#define KVF_CLI_DECODE_VERIFIED_FMT "round %" PRIu64 ": verified %u slices, %zu bytes"
/* round, bytes, milliseconds, GB/s (1 GB = 1e9 bytes) */
#define KVF_CLI_PREFILL_ROUND_FMT "round %" PRIu64 ": wrote %zu bytes in %.3f ms, %.2f GB/s"

/* Print "kvferry <cmd>: <message>: <last error>" to stderr for a failed kvferry call. */
void kvf_cli_fail(const char *cmd, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Parse a decimal unsigned number within [min, max]; returns 0 or -1 after printing a usage
 * error naming @flag and @s. */
int kvf_cli_parse_u64(const char *cmd, const char *flag, const char *s, uint64_t min, uint64_t max,
                      uint64_t *out);

/* Apply --log-level: returns 0 or -1 after printing a usage error. */
int kvf_cli_set_log_level(const char *cmd, const char *s);

/* Parse --transport auto|tcp|shm; returns 0 or -1 after printing a usage error naming @s. */
int kvf_cli_parse_transport(const char *cmd, const char *s, kvf_transport_kind_t *out);

#endif /* KVF_CLI_H */
