/* Process-wide logging to stderr: one line per message with time, level, thread and subsystem. */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"

_Atomic int kvf__log_level = KVF_LOG_WARN;

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

int kvf__log_level_parse(const char *s)
{
    static const struct {
        const char *name;
        int level;
    } names[] = {{"debug", 0}, {"info", 1}, {"warn", 2}, {"warning", 2}, {"error", 3}};
    if (!s)
        return -1;
    if (s[0] >= '0' && s[0] <= '3' && s[1] == '\0')
        return s[0] - '0';
    for (size_t i = 0; i < KVF__ARRAY_SIZE(names); i++)
        if (strcasecmp(s, names[i].name) == 0)
            return names[i].level;
    return -1;
}

/* Read KVFERRY_LOG_LEVEL when the library is loaded, before any thread of ours exists. Here, in
 * the object every logging call needs: a program linked with the static library gets only the
 * objects it references, and may reference nothing of settings.c. */
__attribute__((constructor)) static void log_init_from_env(void)
{
    const char *env = getenv("KVFERRY_LOG_LEVEL");
    if (!env || !*env)
        return;
    int level = kvf__log_level_parse(env);
    if (level < 0) {
        fprintf(stderr, "kvferry: ignoring KVFERRY_LOG_LEVEL=%s (want 0..3 or debug/info/warn/error)\n",
                env);
        return;
    }
    atomic_store(&kvf__log_level, level);
}

void kvf__log_write(int level, const char *subsys, const char *fmt, ...)
{
    char msg[2048];
    struct timespec ts;
    struct tm tm;
    va_list ap;

    if (level < KVF_LOG_DEBUG)
        level = KVF_LOG_DEBUG;
    if (level > KVF_LOG_ERROR)
        level = KVF_LOG_ERROR;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    /* One fprintf per line so that lines from different threads do not interleave. */
    fprintf(stderr, "%04d-%02d-%02d %02d:%02d:%02d.%06ld %-5s [%ld] %s: %s\n", tm.tm_year + 1900,
            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000,
            level_names[level], (long)syscall(SYS_gettid), subsys, msg);
}

bool kvf__log_ratelimit(kvf_log_ratelimit_t *rl, uint64_t now_ms, unsigned *dropped)
{
    bool pass;
    pthread_mutex_lock(&rl->mu);
    if (rl->passed == 0 || now_ms - rl->window_start >= KVF_LOG_RATELIMIT_WINDOW_MS) {
        rl->window_start = now_ms;
        rl->passed = 0;
    }
    pass = rl->passed < KVF_LOG_RATELIMIT_BURST;
    if (pass) {
        rl->passed++;
        *dropped = rl->dropped;
        rl->dropped = 0;
    } else if (rl->dropped < UINT32_MAX) {
        rl->dropped++;
    }
    pthread_mutex_unlock(&rl->mu);
    return pass;
}
