#include "test_util.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int kvf_test_run_cases(const char *group, const struct CMUnitTest *tests, size_t n, int argc,
                       char **argv)
{
    if (argc > 1) {
        bool found = false;
        for (size_t i = 0; i < n && !found; i++)
            found = tests[i].name && fnmatch(argv[1], tests[i].name, 0) == 0;
        if (!found) {
            fprintf(stderr, "%s: unknown test \"%s\": no case of %s has that name\n", argv[0],
                    argv[1], group);
            return 1;
        }
        cmocka_set_test_filter(argv[1]);
    }
    return _cmocka_run_group_tests(group, tests, n, NULL, NULL);
}

/* ---- children ------------------------------------------------------------------------------ */

/* Children started and not yet reaped by kvf_test_reap(); killed and reaped at exit. */
#define MAX_CHILDREN 64
static pid_t children[MAX_CHILDREN];
static pthread_mutex_t children_mu = PTHREAD_MUTEX_INITIALIZER;

static void kill_children_at_exit(void)
{
    pthread_mutex_lock(&children_mu);
    for (int i = 0; i < MAX_CHILDREN; i++) {
        pid_t pid = children[i];
        if (pid <= 0)
            continue;
        children[i] = 0;
        int status;
        /* Still our unreaped child (so the pid cannot have been reused): kill and reap it. */
        if (waitpid(pid, &status, WNOHANG) == 0) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
        }
    }
    pthread_mutex_unlock(&children_mu);
}

static void track_child(pid_t pid)
{
    static bool registered;
    pthread_mutex_lock(&children_mu);
    if (!registered)
        registered = atexit(kill_children_at_exit) == 0;
    int i = 0;
    while (i < MAX_CHILDREN && children[i] > 0)
        i++;
    if (i < MAX_CHILDREN)
        children[i] = pid;
    pthread_mutex_unlock(&children_mu);
    if (i == MAX_CHILDREN) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        fail_msg("more than %d children at once: reap them with kvf_test_reap()", MAX_CHILDREN);
    }
}

static void untrack_child(pid_t pid)
{
    pthread_mutex_lock(&children_mu);
    for (int i = 0; i < MAX_CHILDREN; i++)
        if (children[i] == pid)
            children[i] = 0;
    pthread_mutex_unlock(&children_mu);
}

pid_t kvf_test_fork(void)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        fail_msg("fork: %s", strerror(errno));
    if (pid == 0) {
        /* SIGKILL when the thread that forked exits; if the parent died before prctl, the child
         * was reparented already and must not run on. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(127);
        return 0;
    }
    track_child(pid);
    return pid;
}

void kvf_test_skip(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "SKIP: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(KVF_TEST_SKIP_CODE);
}

void kvf_test_need_fds(const char *what, unsigned long need)
{
    struct rlimit rl;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur >= need)
        return;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need)
        kvf_test_skip("%s needs %lu file descriptors; the hard limit is %lu", what, need,
                      (unsigned long)rl.rlim_max);
    rl.rlim_cur = need;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
}

uint64_t kvf_test_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

kvf_store_server_t *kvf_test_store_start(void)
{
    /* On a port below the ephemeral range, which tests restart the store on: a port bind()
     * picks (port 0) could be taken by another test's outgoing connection while it is free. */
    kvf_store_server_t *srv = NULL;
    int rc = -EADDRINUSE;
    for (int tries = 0; tries < 5 && rc == -EADDRINUSE; tries++) {
        char url[64];
        snprintf(url, sizeof(url), "tcp://127.0.0.1:%u", kvf_test_free_port());
        rc = kvf_store_server_start(url, &srv);
    }
    if (rc < 0)
        fail_msg("kvf_store_server_start: %s: %s", kvf_err_name(rc), kvf_last_error());
    return srv;
}

const char *kvf_test_cli_path(void)
{
    const char *p = getenv("KVFERRY_BIN");
    if (!p || !*p)
        fail_msg("KVFERRY_BIN is not set (run the tests through ctest)");
    return p;
}

pid_t kvf_test_spawn(char *const argv[], const char *logfile)
{
    pid_t pid = kvf_test_fork();
    if (pid == 0) {
        if (logfile) {
            int fd = open(logfile, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
                close(fd);
            }
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

int kvf_test_reap(pid_t pid, unsigned timeout_ms)
{
    uint64_t deadline = kvf_test_now_ms() + timeout_ms;
    int status;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR) {
            untrack_child(pid);
            return -1;
        }
        if (kvf_test_now_ms() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            untrack_child(pid);
            return -1;
        }
        /* Polling the child's state: there is no portable fd for a child's exit before
         * pidfd_open, and 5 ms granularity is plenty for a test timeout. */
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    untrack_child(pid);
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return -1;
}

int kvf_test_run(char *const argv[], char *out, size_t outlen, unsigned timeout_ms)
{
    int fd;
    pid_t pid = kvf_test_spawn_pipe(argv, &fd);
    size_t used = 0;
    uint64_t deadline = kvf_test_now_ms() + timeout_ms;
    for (;;) {
        uint64_t now = kvf_test_now_ms();
        if (now >= deadline)
            break;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, (int)(deadline - now));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        char tmp[4096];
        ssize_t r = read(fd, tmp, sizeof(tmp));
        if (r <= 0)
            break;
        size_t take = (size_t)r;
        if (outlen && used + take > outlen - 1)
            take = outlen - 1 - used;
        memcpy(out + used, tmp, take);
        used += take;
    }
    if (outlen)
        out[used] = '\0';
    close(fd);
    uint64_t now = kvf_test_now_ms();
    return kvf_test_reap(pid, now >= deadline ? 0 : (unsigned)(deadline - now));
}

pid_t kvf_test_spawn_pipe(char *const argv[], int *fd)
{
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0)
        fail_msg("pipe: %s", strerror(errno));
    pid_t pid = kvf_test_fork();
    if (pid == 0) {
        dup2(pfd[1], 1);
        dup2(pfd[1], 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(pfd[1]);
    *fd = pfd[0];
    return pid;
}

int kvf_test_read_line(int fd, char *buf, size_t len, unsigned timeout_ms)
{
    uint64_t deadline = kvf_test_now_ms() + timeout_ms;
    size_t used = 0;
    while (used + 1 < len) {
        uint64_t now = kvf_test_now_ms();
        if (now >= deadline)
            return -1;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, (int)(deadline - now));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        char ch;
        if (read(fd, &ch, 1) != 1)
            return -1;
        if (ch == '\n')
            break;
        buf[used++] = ch;
    }
    buf[used] = '\0';
    return (int)used;
}

pid_t kvf_test_store_process(char *url, size_t len)
{
    char *argv[] = {(char *)kvf_test_cli_path(), "store", "--listen", "tcp://127.0.0.1:0", NULL};
    int fd;
    pid_t pid = kvf_test_spawn_pipe(argv, &fd);
    char line[256];
    const char *tag = "listening on ";
    if (kvf_test_read_line(fd, line, sizeof(line), 10000) < 0 || !strstr(line, tag)) {
        kill(pid, SIGKILL);
        kvf_test_reap(pid, 1000);
        close(fd);
        fail_msg("kvferry store did not report its address");
    }
    snprintf(url, len, "%s", strstr(line, tag) + strlen(tag));
    close(fd);
    return pid;
}

void kvf_test_pattern(uint8_t *p, size_t n, uint32_t seed)
{
    uint64_t x = 0x9E3779B97F4A7C15ull * (seed + 1u);
    for (size_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (uint8_t)(x >> 56);
    }
}

void kvf_test_tls_certs(const char *src_dir, char *dir, size_t len)
{
    snprintf(dir, len, "/tmp/kvf-tls-XXXXXX");
    assert_non_null(mkdtemp(dir));
    char script[512];
    snprintf(script, sizeof(script), "%s/tls_certs.sh", src_dir);
    char *argv[] = {"/bin/sh", script, dir, NULL};
    static char out[8192];
    int rc = kvf_test_run(argv, out, sizeof(out), 60000);
    if (rc != 0)
        fail_msg("tls_certs.sh exited %d: %s (see %s/openssl.log)", rc, out, dir);
}

kvf_engine_t *kvf_test_engine(const char *url, kvf_role_t role, const kvf_config_t *cfg)
{
    kvf_engine_t *e = NULL;
    assert_kvf_ok(kvf_engine_create(url, "127.0.0.1:0", role, 0, cfg, &e));
    return e;
}

uint16_t kvf_test_free_port(void)
{
    unsigned low = 32768;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%u", &low) != 1)
            low = 32768;
        fclose(f);
    }
    if (low <= 10001)
        low = 32768;
    /* Seeded once per thread and carried on, so that calls within one millisecond (a store and
     * its peer port) draw different ports. */
    static _Thread_local unsigned seed;
    if (!seed)
        seed = ((unsigned)getpid() << 16) ^ (unsigned)kvf_test_now_ms() ^ (unsigned)(uintptr_t)&seed;
    for (int tries = 0; tries < 200; tries++) {
        seed = seed * 1103515245u + 12345u;
        uint16_t port = (uint16_t)(10000 + (seed >> 8) % (low - 10000));
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(fd >= 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int rc = bind(fd, (struct sockaddr *)&a, sizeof(a));
        close(fd);
        if (rc == 0)
            return port;
    }
    fail_msg("no free port below %u in 200 tries", low);
    return 0;
}
