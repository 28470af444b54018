/*
 * Shared test helpers. Every test executable is run by CTest once per test case, with the case's
 * name as argv[1] (see tests/CMakeLists.txt); KVF_TEST_MAIN runs just that case.
 */
#ifndef KVF_TEST_UTIL_H
#define KVF_TEST_UTIL_H

/* 1 in a build with AddressSanitizer (GCC says __SANITIZE_ADDRESS__, clang
 * __has_feature(address_sanitizer)), else 0: tests give it more time and memory. */
#if defined(__SANITIZE_ADDRESS__)
#define KVF_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVF_TEST_SANITIZED 1
#endif
#endif
#ifndef KVF_TEST_SANITIZED
#define KVF_TEST_SANITIZED 0
#endif

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <cmocka.h>

#include "kvferry.h"

/* Exit code CTest reads as "skipped" (SKIP_RETURN_CODE). */
#define KVF_TEST_SKIP_CODE 77

/*
 * Run the cases of @tests (an array, not a pointer), or with a name in argv[1] only the cases it
 * matches (cmocka's glob: * and ?). A name that matches no case is an error (exit 1, naming it),
 * never a silent pass: a renamed or #if'd-out case that CTest still runs must fail.
 */
#define KVF_TEST_RUN(tests, argc, argv)                                                           \
    kvf_test_run_cases(#tests, (tests), sizeof(tests) / sizeof((tests)[0]), (argc), (argv))

#define KVF_TEST_MAIN(tests)                                                                      \
    int main(int argc, char **argv)                                                               \
    {                                                                                             \
        return KVF_TEST_RUN(tests, argc, argv);                                                   \
    }

int kvf_test_run_cases(const char *group, const struct CMUnitTest *tests, size_t n, int argc,
                       char **argv);

/* Assert that a kvferry call succeeded; on failure print the code's name and the last error. */
#define assert_kvf_ok(expr)                                                                       \
    do {                                                                                          \
        int kvf_rc_ = (expr);                                                                     \
        if (kvf_rc_ < 0)                                                                          \
            fail_msg("%s = %d (%s): %s", #expr, kvf_rc_, kvf_err_name(kvf_rc_), kvf_last_error()); \
    } while (0)

/* Assert that a kvferry call failed with @code; print both names otherwise. */
#define assert_kvf_err(expr, code)                                                                \
    do {                                                                                          \
        int kvf_rc_ = (expr);                                                                     \
        int kvf_want_ = (code);                                                                   \
        if (kvf_rc_ != kvf_want_)                                                                 \
            fail_msg("%s = %d (%s), want %d (%s); last error: %s", #expr, kvf_rc_,               \
                     kvf_err_name(kvf_rc_), kvf_want_, kvf_err_name(kvf_want_), kvf_last_error()); \
    } while (0)

/* Assert that the last error message contains @needle. */
#define assert_last_error_contains(needle)                                                        \
    do {                                                                                          \
        if (!strstr(kvf_last_error(), (needle)))                                                  \
            fail_msg("last error \"%s\" does not contain \"%s\"", kvf_last_error(), (needle));    \
    } while (0)

/* Skip the whole test executable: print why and exit with the skip code. */
void kvf_test_skip(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

/* Make sure this process may hold @need file descriptors: raise the soft RLIMIT_NOFILE (up to
 * the hard limit) or skip the test, naming @what, when the hard limit is lower. */
void kvf_test_need_fds(const char *what, unsigned long need);

/* Monotonic milliseconds. */
uint64_t kvf_test_now_ms(void);

/* Start an in-process store on 127.0.0.1 with a free port below the ephemeral range. */
kvf_store_server_t *kvf_test_store_start(void);

/* Path of the `kvferry` binary under test (from $KVFERRY_BIN). */
const char *kvf_test_cli_path(void);

/*
 * Run a command, capture its stdout+stderr into @out (NUL-terminated, truncated to @outlen - 1),
 * and return its exit status (0..255), or -1 if it was killed or could not start. The child is
 * killed after @timeout_ms and always reaped.
 */
int kvf_test_run(char *const argv[], char *out, size_t outlen, unsigned timeout_ms);

/*
 * Children started by the helpers below (kvf_test_spawn*, kvf_test_run, kvf_test_store_process)
 * die with the test: each gets SIGKILL when the thread that started it exits
 * (PR_SET_PDEATHSIG; start children from the thread that runs the case), and at exit the test
 * kills and reaps every one kvf_test_reap() has not reaped, so a case that fails half way
 * leaves no process behind.
 */

/* fork(), for a case that execs its own child: the child dies with this thread as above and the
 * parent tracks it until kvf_test_reap(). Fails the case when fork fails. */
pid_t kvf_test_fork(void);

/* Start a command in the background with stdout/stderr to @logfile (may be NULL); returns its pid. */
pid_t kvf_test_spawn(char *const argv[], const char *logfile);

/* Start a command in the background with stdout and stderr on a pipe; *@fd receives the read
 * end (close it when done). Returns the pid. */
pid_t kvf_test_spawn_pipe(char *const argv[], int *fd);

/* Read one line (without its newline) from @fd into @buf within @timeout_ms. Returns its length,
 * or -1 on timeout or end of file. Reads one byte at a time so nothing past the line is lost. */
int kvf_test_read_line(int fd, char *buf, size_t len, unsigned timeout_ms);

/* Start `kvferry store --listen tcp://127.0.0.1:0` and return its pid; *url receives the URL it
 * printed (at least 64 bytes). */
pid_t kvf_test_store_process(char *url, size_t len);

/* Wait up to @timeout_ms for @pid to exit; returns its exit status, or -1 after killing it
 * (SIGKILL) on timeout. Always reaps. */
int kvf_test_reap(pid_t pid, unsigned timeout_ms);

/* Fill @n bytes with a pseudo-random pattern of @seed (no two seeds give the same bytes, and no
 * byte position repeats the previous one's value for long), so a byte landing at a wrong offset
 * or from a wrong buffer shows. */
void kvf_test_pattern(uint8_t *p, size_t n, uint32_t seed);

/* Make the test certificates of tests/tls_certs.sh (found in @src_dir) in a new temporary
 * directory, whose name goes to @dir (at least 32 bytes); fails the test otherwise. */
void kvf_test_tls_certs(const char *src_dir, char *dir, size_t len);

/* A port of 127.0.0.1 nobody listens on now, below the ephemeral range: a port bind() picks (port
 * 0) is one another test's outgoing connection may take before the caller binds it. */
uint16_t kvf_test_free_port(void);

/* Create an engine on 127.0.0.1 with a free port; fails the test (naming the error) otherwise. */
kvf_engine_t *kvf_test_engine(const char *url, kvf_role_t role, const kvf_config_t *cfg);

#endif /* KVF_TEST_UTIL_H */
