/* Logging: level get/set, lazy argument evaluation, line format, KVFERRY_LOG_LEVEL. */
#include <pthread.h>
#include <regex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "test_util.h"

#include "common/common.h"

/* argv[1] that makes this binary print kvf_log_get_level() and exit, for the environment tests. */
#define PRINT_LEVEL_ARG "--print-log-level"

/* Every test starts from the default level and leaves the process there. */
static int reset_level(void **state)
{
    (void)state;
    return kvf_log_set_level(KVF_LOG_WARN) == 0 ? 0 : -1;
}

/*
 * Capture what is written to fd 2 between capture_start() and capture_stop(). Lines are written
 * with one fprintf to the unbuffered stderr, so after the call returns they are in the file.
 */
struct capture {
    FILE *file;
    int saved_fd;
};

static void capture_start(struct capture *c)
{
    c->file = tmpfile();
    assert_non_null(c->file);
    fflush(stderr);
    c->saved_fd = dup(STDERR_FILENO);
    assert_true(c->saved_fd >= 0);
    assert_true(dup2(fileno(c->file), STDERR_FILENO) >= 0);
}

/* Restore stderr and return what was written (NUL-terminated, in @buf). */
static const char *capture_stop(struct capture *c, char *buf, size_t len)
{
    fflush(stderr);
    assert_true(dup2(c->saved_fd, STDERR_FILENO) >= 0);
    close(c->saved_fd);
    rewind(c->file);
    size_t n = fread(buf, 1, len - 1, c->file);
    buf[n] = '\0';
    fclose(c->file);
    return buf;
}

/* ----------------------------------------------------------------------------------------------
 * Levels
 * -------------------------------------------------------------------------------------------- */

static void set_level_rejects_out_of_range(void **state)
{
    static const int bad[] = {-1, 4, -100, 100};
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(bad); i++) {
        char want[32];
        kvf_last_error_clear();
        assert_kvf_err(kvf_log_set_level(bad[i]), -KVF_EINVAL);
        snprintf(want, sizeof(want), "log level %d", bad[i]);
        assert_last_error_contains(want);
        /* A rejected level changes nothing. */
        assert_int_equal(kvf_log_get_level(), KVF_LOG_WARN);
    }
}

static void set_level_accepts_0_to_3(void **state)
{
    (void)state;
    for (int level = KVF_LOG_DEBUG; level <= KVF_LOG_ERROR; level++) {
        assert_kvf_ok(kvf_log_set_level(level));
        assert_int_equal(kvf_log_get_level(), level);
    }
    assert_kvf_ok(kvf_log_set_level(KVF_LOG_INFO));
    assert_int_equal(kvf_log_get_level(), KVF_LOG_INFO);
}

/* Path of this test binary, which the environment tests run in PRINT_LEVEL_ARG mode. */
static void self_path(char *buf, size_t len)
{
    ssize_t n = readlink("/proc/self/exe", buf, len - 1);
    assert_true(n > 0 && (size_t)n < len - 1);
    buf[n] = '\0';
}

static void default_level_is_warn(void **state)
{
    char self[4096];
    char out[256];
    char *argv[] = {self, PRINT_LEVEL_ARG, NULL};
    (void)state;
    /* The default is the level a fresh process gets without KVFERRY_LOG_LEVEL. */
    self_path(self, sizeof(self));
    assert_int_equal(unsetenv("KVFERRY_LOG_LEVEL"), 0);
    assert_int_equal(kvf_test_run(argv, out, sizeof(out), 5000), 0);
    assert_string_equal(out, "level=2\n");
}

/* ----------------------------------------------------------------------------------------------
 * Lazy evaluation: the level is checked before the arguments are evaluated
 * -------------------------------------------------------------------------------------------- */

static int side_effects;

static int count_call(void)
{
    side_effects++;
    return 4242;
}

static void args_not_evaluated_below_level(void **state)
{
    struct capture c;
    char out[4096];
    (void)state;
    side_effects = 0;
    assert_kvf_ok(kvf_log_set_level(KVF_LOG_WARN));
    capture_start(&c);
    KVF_DEBUG("test", "value %d", count_call());
    KVF_INFO("test", "value %d", count_call());
    capture_stop(&c, out, sizeof(out));
    assert_int_equal(side_effects, 0);
    assert_string_equal(out, "");

    assert_kvf_ok(kvf_log_set_level(KVF_LOG_ERROR));
    capture_start(&c);
    KVF_WARN("test", "value %d", count_call());
    capture_stop(&c, out, sizeof(out));
    assert_int_equal(side_effects, 0);
    assert_string_equal(out, "");
}

static void args_evaluated_at_level(void **state)
{
    struct capture c;
    char out[4096];
    (void)state;
    side_effects = 0;
    assert_kvf_ok(kvf_log_set_level(KVF_LOG_DEBUG));
    capture_start(&c);
    KVF_DEBUG("test", "value %d", count_call());
    capture_stop(&c, out, sizeof(out));
    assert_int_equal(side_effects, 1);
    assert_non_null(strstr(out, "value 4242"));

    /* Higher levels are emitted too, each evaluating its arguments once. */
    capture_start(&c);
    KVF_INFO("test", "value %d", count_call());
    KVF_WARN("test", "value %d", count_call());
    KVF_ERROR("test", "value %d", count_call());
    capture_stop(&c, out, sizeof(out));
    assert_int_equal(side_effects, 4);
    assert_non_null(strstr(out, " INFO "));
    assert_non_null(strstr(out, " WARN "));
    assert_non_null(strstr(out, " ERROR "));
}

/* ----------------------------------------------------------------------------------------------
 * Line format: "YYYY-MM-DD HH:MM:SS.uuuuuu LEVEL [tid] subsys: message"
 * -------------------------------------------------------------------------------------------- */

static void assert_log_line(const char *out, const char *level, long tid, const char *subsys,
                            const char *msg)
{
    char pattern[512];
    regex_t re;
    snprintf(pattern, sizeof(pattern),
             "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6} %s +\\[%ld\\] %s: "
             "%s$",
             level, tid, subsys, msg);
    assert_int_equal(regcomp(&re, pattern, REG_EXTENDED | REG_NEWLINE | REG_NOSUB), 0);
    int rc = regexec(&re, out, 0, NULL, 0);
    regfree(&re);
    if (rc != 0)
        fail_msg("no line of \"%s\" matches /%s/", out, pattern);
}

static void line_format(void **state)
{
    struct capture c;
    char out[4096];
    (void)state;
    assert_kvf_ok(kvf_log_set_level(KVF_LOG_WARN));
    capture_start(&c);
    KVF_WARN("store", "peer %s: %d regions", "10.0.0.2:50051", 3);
    KVF_ERROR("tcp", "closed");
    capture_stop(&c, out, sizeof(out));
    long tid = (long)syscall(SYS_gettid);
    assert_log_line(out, "WARN", tid, "store", "peer 10\\.0\\.0\\.2:50051: 3 regions");
    assert_log_line(out, "ERROR", tid, "tcp", "closed");
    /* One line per call, nothing else. */
    int lines = 0;
    for (const char *p = out; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 2);
}

struct thread_log {
    long tid;
};

static void *log_from_thread(void *arg)
{
    struct thread_log *t = arg;
    t->tid = (long)syscall(SYS_gettid);
    KVF_WARN("worker", "from the other thread");
    return NULL;
}

static void line_names_the_calling_thread(void **state)
{
    struct capture c;
    struct thread_log t = {0};
    pthread_t th;
    char out[4096];
    (void)state;
    capture_start(&c);
    int rc = pthread_create(&th, NULL, log_from_thread, &t);
    if (rc == 0)
        rc = pthread_join(th, NULL);
    capture_stop(&c, out, sizeof(out));
    assert_int_equal(rc, 0);
    assert_true(t.tid > 0);
    assert_int_not_equal(t.tid, (long)syscall(SYS_gettid));
    assert_log_line(out, "WARN", t.tid, "worker", "from the other thread");
}

/* ----------------------------------------------------------------------------------------------
 * KVFERRY_LOG_LEVEL, read once when the library loads: checked in a fresh child process
 * -------------------------------------------------------------------------------------------- */

static void env_sets_initial_level(void **state)
{
    static const struct {
        const char *value;
        const char *want;       /* the child's output must start with this */
        const char *complaint;  /* and contain this, or NULL */
    } cases[] = {
        {"debug", "level=0\n", NULL},
        {"0", "level=0\n", NULL},
        {"1", "level=1\n", NULL},
        {"info", "level=1\n", NULL},
        {"warn", "level=2\n", NULL},
        {"WARNING", "level=2\n", NULL},
        {"3", "level=3\n", NULL},
        {"Error", "level=3\n", NULL},
        {"", "level=2\n", NULL},
        {"bogus", "level=2\n", "KVFERRY_LOG_LEVEL=bogus"},
        {"4", "level=2\n", "KVFERRY_LOG_LEVEL=4"},
        {"-1", "level=2\n", "KVFERRY_LOG_LEVEL=-1"},
    };
    char self[4096];
    char out[1024];
    char *argv[] = {self, PRINT_LEVEL_ARG, NULL};
    (void)state;
    self_path(self, sizeof(self));

    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        print_message("KVFERRY_LOG_LEVEL=%s\n", cases[i].value);
        /* The child inherits the environment; this test is single-threaded here. */
        assert_int_equal(setenv("KVFERRY_LOG_LEVEL", cases[i].value, 1), 0);
        int status = kvf_test_run(argv, out, sizeof(out), 5000);
        assert_int_equal(unsetenv("KVFERRY_LOG_LEVEL"), 0);
        assert_int_equal(status, 0);
        /* The complaint goes to stderr before main() runs; the level line is on stdout. */
        if (!strstr(out, cases[i].want))
            fail_msg("child output \"%s\" lacks \"%s\"", out, cases[i].want);
        if (cases[i].complaint) {
            if (!strstr(out, cases[i].complaint))
                fail_msg("child output \"%s\" lacks \"%s\"", out, cases[i].complaint);
        } else {
            assert_string_equal(out, cases[i].want);
        }
    }
}

/* KVFERRY_LOG_LEVEL holds in a program that references nothing but logging: tests/log_env_probe.c,
 * linked with the static library, which leaves out every object a program does not reference
 * (the variable used to be read in settings.c, which such a program never linked). */
static void env_read_in_any_program(void **state)
{
    (void)state;
    const char *dir = getenv("KVF_TEST_BIN_DIR");
    if (!dir)
        skip();
    char path[4096], out[1024];
    snprintf(path, sizeof(path), "%s/tests/log_env_probe", dir);
    char *argv[] = {path, NULL};
    assert_int_equal(setenv("KVFERRY_LOG_LEVEL", "debug", 1), 0);
    int status = kvf_test_run(argv, out, sizeof(out), 5000);
    assert_int_equal(unsetenv("KVFERRY_LOG_LEVEL"), 0);
    assert_int_equal(status, 0);
    if (!strstr(out, "level=0\n") || !strstr(out, "a debug line"))
        fail_msg("%s with KVFERRY_LOG_LEVEL=debug printed \"%s\"", path, out);
}

/* ----------------------------------------------------------------------------------------------
 * kvf__log_level_parse
 * -------------------------------------------------------------------------------------------- */

static void level_parse(void **state)
{
    static const struct {
        const char *s;
        int want;
    } cases[] = {
        {"0", 0},        {"1", 1},        {"2", 2},       {"3", 3},
        {"debug", 0},    {"DEBUG", 0},    {"info", 1},    {"Info", 1},
        {"warn", 2},     {"warning", 2},  {"WARN", 2},    {"error", 3},
        {"ERROR", 3},    {"4", -1},       {"-1", -1},     {"", -1},
        {"00", -1},      {"10", -1},      {"3 ", -1},     {" 3", -1},
        {"debugx", -1},  {"deb", -1},     {"err", -1},    {"fatal", -1},
        {"trace", -1},   {"0x1", -1},
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        print_message("\"%s\"\n", cases[i].s);
        assert_int_equal(kvf__log_level_parse(cases[i].s), cases[i].want);
    }
    assert_int_equal(kvf__log_level_parse(NULL), -1);
}

/* ----------------------------------------------------------------------------------------------
 * Rate-limited lines
 * -------------------------------------------------------------------------------------------- */

/* One call site's state: KVF_LOG_RATELIMIT_BURST lines pass in a window, the rest are counted,
 * and the first line of a later window reports how many were dropped. */
static void ratelimit_counts_what_it_drops(void **state)
{
    (void)state;
    kvf_log_ratelimit_t rl = KVF_LOG_RATELIMIT_INIT;
    unsigned dropped = 99;
    const unsigned n = KVF_LOG_RATELIMIT_BURST + 25;
    unsigned passed = 0;
    for (unsigned i = 0; i < n; i++) {
        if (kvf__log_ratelimit(&rl, 5000 + i, &dropped)) {
            passed++;
            assert_int_equal(dropped, 0);
        }
    }
    assert_int_equal(passed, KVF_LOG_RATELIMIT_BURST);
    /* Still inside the window: dropped. */
    assert_false(kvf__log_ratelimit(&rl, 5000 + KVF_LOG_RATELIMIT_WINDOW_MS - 1, &dropped));
    /* The next window: passes, and says how many were dropped since the last line. */
    assert_true(kvf__log_ratelimit(&rl, 5000 + KVF_LOG_RATELIMIT_WINDOW_MS, &dropped));
    assert_int_equal(dropped, 26);
    assert_true(kvf__log_ratelimit(&rl, 5001 + KVF_LOG_RATELIMIT_WINDOW_MS, &dropped));
    assert_int_equal(dropped, 0);
}

static void ratelimited_call_site(int i)
{
    KVF_LOG_RATELIMITED(KVF_LOG_WARN, "rltest", "repeated line %d", i);
}

static unsigned count_substr(const char *s, const char *needle)
{
    unsigned n = 0;
    for (const char *p = strstr(s, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* The macro: a burst of 1,000 lines from one call site prints KVF_LOG_RATELIMIT_BURST, and the
 * first line a window later is preceded by one "(N more suppressed)" line. Below the level
 * nothing is printed or counted. */
static void ratelimited_macro_prints_burst_then_summary(void **state)
{
    (void)state;
    static char out[64 << 10];
    struct capture c;
    capture_start(&c);
    for (int i = 0; i < 1000; i++)
        ratelimited_call_site(i);
    usleep((KVF_LOG_RATELIMIT_WINDOW_MS + 100) * 1000);
    ratelimited_call_site(1000);
    assert_kvf_ok(kvf_log_set_level(KVF_LOG_ERROR));
    for (int i = 0; i < 1000; i++)
        ratelimited_call_site(2000 + i);
    capture_stop(&c, out, sizeof(out));
    print_message("%s", out);
    assert_int_equal(count_substr(out, "repeated line"), KVF_LOG_RATELIMIT_BURST + 1);
    char want[64];
    /* A normal log line (level, subsystem), before the line that ended the quiet window. */
    snprintf(want, sizeof(want), "rltest: (%u more suppressed)", 1000 - KVF_LOG_RATELIMIT_BURST);
    assert_int_equal(count_substr(out, want), 1);
    assert_int_equal(count_substr(out, "more suppressed"), 1);
    const char *sum = strstr(out, want), *last = strstr(out, "repeated line 1000");
    assert_non_null(last);
    assert_true(sum < last);
    assert_int_equal(count_substr(out, "WARN "), KVF_LOG_RATELIMIT_BURST + 2);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(set_level_rejects_out_of_range, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(set_level_accepts_0_to_3, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(default_level_is_warn, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(args_not_evaluated_below_level, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(args_evaluated_at_level, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(line_format, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(line_names_the_calling_thread, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(env_sets_initial_level, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(env_read_in_any_program, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(level_parse, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(ratelimit_counts_what_it_drops, reset_level, reset_level),
    cmocka_unit_test_setup_teardown(ratelimited_macro_prints_burst_then_summary, reset_level,
                                    reset_level),
};

int main(int argc, char **argv)
{
    /* Helper mode for env_sets_initial_level: report the level the library started with. */
    if (argc > 1 && strcmp(argv[1], PRINT_LEVEL_ARG) == 0) {
        printf("level=%d\n", kvf_log_get_level());
        return 0;
    }
    return KVF_TEST_RUN(tests, argc, argv);
}
