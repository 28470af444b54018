/*
 * The test runner itself (tests/test_util.h, tests/test_util.c): a case name that matches
 * nothing fails every suite instead of passing with zero cases run, and a case that fails or dies
 * half way leaves none of its children running.
 */
#include "test_util.h"

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Helper modes of this binary: start a child (`sleep 60`, once running), print "child <pid>", then fail the
 * case through cmocka, or die at once by SIGKILL (no atexit handler runs). */
#define FAIL_ARG  "--fail-leaving-child"
#define CRASH_ARG "--crash-leaving-child"

static char out[65536];

static char *self_path(char *path, size_t len)
{
    ssize_t n = readlink("/proc/self/exe", path, len - 1);
    assert_true(n > 0);
    path[n] = '\0';
    return path;
}

static void expect_unknown_name_refused(const char *exe)
{
    char *argv[] = {(char *)exe, "no_such_case_xyz", NULL};
    int rc = kvf_test_run(argv, out, sizeof(out), 20000);
    if (rc != 1 || !strstr(out, "unknown test \"no_such_case_xyz\""))
        fail_msg("%s no_such_case_xyz: exit %d, want 1 and a message naming the name; output:\n%s",
                 exe, rc, out);
    /* The refusal comes before any case runs. */
    if (strstr(out, "[ RUN      ]") || strstr(out, "PASSED"))
        fail_msg("%s ran cases for an unknown name:\n%s", exe, out);
}

/* Every suite CTest runs (KVF_TEST_SUITES, set by tests/CMakeLists.txt) refuses a name that
 * matches none of its cases, whether it uses KVF_TEST_MAIN or a main of its own. */
static void unknown_name_fails_every_suite(void **state)
{
    (void)state;
    const char *dir = getenv("KVF_TEST_BIN_DIR");
    const char *list = getenv("KVF_TEST_SUITES");
    if (!dir || !list || !*list)
        fail_msg("KVF_TEST_BIN_DIR and KVF_TEST_SUITES must be set (run through ctest)");
    char names[2048], exe[4096];
    snprintf(names, sizeof(names), "%s", list);
    int n = 0;
    for (char *save, *s = strtok_r(names, ":", &save); s; s = strtok_r(NULL, ":", &save)) {
        snprintf(exe, sizeof(exe), "%s/tests/%s", dir, s);
        print_message("%s\n", s);
        expect_unknown_name_refused(exe);
        n++;
    }
    assert_true(n >= 10);
}

/* A known name, and a glob matching some cases, still run. */
static void known_names_and_globs_run(void **state)
{
    (void)state;
    char path[4096];
    char *exact[] = {self_path(path, sizeof(path)), "trivial_case", NULL};
    int rc = kvf_test_run(exact, out, sizeof(out), 20000);
    if (rc != 0 || !strstr(out, "[  PASSED  ] 1 test(s)."))
        fail_msg("exit %d, want 0 and one case run; output:\n%s", rc, out);
    char *glob[] = {path, "trivial_*", NULL};
    rc = kvf_test_run(glob, out, sizeof(out), 20000);
    if (rc != 0 || !strstr(out, "[  PASSED  ] 1 test(s)."))
        fail_msg("exit %d, want 0 and one case run; output:\n%s", rc, out);
}

static void trivial_case(void **state)
{
    (void)state;
}

/* Run this binary in helper mode @mode; return the pid of the child it left, after the helper
 * process ended (exit status in *@status, -1 when killed). This process is a child subreaper, so
 * that child is reparented to it and can be waited for here. */
static pid_t run_helper(const char *mode, int *status)
{
    char path[4096], line[256];
    assert_int_equal(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
    char *argv[] = {self_path(path, sizeof(path)), (char *)mode, NULL};
    int fd;
    pid_t helper = kvf_test_spawn_pipe(argv, &fd);
    /* cmocka's own lines come first. */
    do {
        if (kvf_test_read_line(fd, line, sizeof(line), 10000) < 0)
            fail_msg("helper %s did not report its child", mode);
    } while (strncmp(line, "child ", 6) != 0);
    pid_t child = (pid_t)atoi(line + 6);
    assert_true(child > 0);
    *status = kvf_test_reap(helper, 10000);
    close(fd);
    return child;
}

/* The grandchild @pid is gone (killed, and reaped by the helper or here) within a few seconds of
 * its test process ending. */
static void expect_child_killed(pid_t pid)
{
    uint64_t deadline = kvf_test_now_ms() + 5000;
    int status;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            break;
        /* Not our child: the helper killed and reaped it itself before it ended (an orphan
         * still running would have been reparented to this subreaper). */
        if (r < 0 && errno == ECHILD && kill(pid, 0) < 0 && errno == ESRCH)
            return;
        if (r < 0 && errno != EINTR)
            fail_msg("waitpid(%d): %s", (int)pid, strerror(errno));
        if (kvf_test_now_ms() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fail_msg("child %d still ran 5 s after its test process ended", (int)pid);
        }
        /* Polling the orphan's state, bounded; as kvf_test_reap() does. */
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
        fail_msg("child %d ended with status 0x%x, want killed by SIGKILL", (int)pid, status);
}

/* A case that fails through cmocka: its child is killed and reaped when the test exits. */
static void failed_case_leaves_no_child(void **state)
{
    (void)state;
    int status;
    pid_t child = run_helper(FAIL_ARG, &status);
    assert_int_equal(status, 1); /* one case failed */
    expect_child_killed(child);
}

/* A test process killed outright (a crash, CTest's timeout): its child dies with it. */
static void killed_test_leaves_no_child(void **state)
{
    (void)state;
    int status;
    pid_t child = run_helper(CRASH_ARG, &status);
    assert_int_equal(status, -1); /* killed */
    expect_child_killed(child);
}

static void leave_child(bool crash)
{
    /* Told apart from a child that has not yet set PR_SET_PDEATHSIG: it has printed a line. */
    char *argv[] = {"sh", "-c", "echo up; exec sleep 60", NULL};
    char line[64];
    int fd;
    pid_t pid = kvf_test_spawn_pipe(argv, &fd);
    if (kvf_test_read_line(fd, line, sizeof(line), 10000) < 0 || strcmp(line, "up") != 0)
        fail_msg("the child did not start");
    printf("child %d\n", (int)pid);
    fflush(stdout);
    if (crash)
        raise(SIGKILL);
    fail_msg("failing on purpose with child %d running", (int)pid);
}

static void leave_child_then_fail(void **state)
{
    (void)state;
    leave_child(false);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(unknown_name_fails_every_suite),
    cmocka_unit_test(known_names_and_globs_run),
    cmocka_unit_test(failed_case_leaves_no_child),
    cmocka_unit_test(killed_test_leaves_no_child),
    cmocka_unit_test(trivial_case),
};

int main(int argc, char **argv)
{
    /* Written as plain initializers, not cmocka_unit_test(), so that CTest does not register
     * the helper case as a test of its own (tests/CMakeLists.txt scans for that macro). */
    static const struct CMUnitTest helper[] = {
        {"leave_child_then_fail", leave_child_then_fail, NULL, NULL, NULL},
    };
    if (argc == 2 && strcmp(argv[1], FAIL_ARG) == 0)
        return KVF_TEST_RUN(helper, 1, argv);
    if (argc == 2 && strcmp(argv[1], CRASH_ARG) == 0)
        leave_child(true);
    return KVF_TEST_RUN(tests, argc, argv);
}
