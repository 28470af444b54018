/* Internal threads and deadline waits (thread.h). */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "common/common.h"
#include "common/thread.h"

int kvf__thread_start(pthread_t *t, const char *name, size_t stack_bytes, void *(*fn)(void *),
                      void *arg)
{
    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc)
        return -rc;
    if (stack_bytes)
        pthread_attr_setstacksize(&attr, stack_bytes);
    /* The new thread inherits this mask; the caller's own mask is put back at once. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(t, &attr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc)
        return -rc;
    if (name) {
        char shortname[16];
        snprintf(shortname, sizeof(shortname), "%s", name);
        pthread_setname_np(*t, shortname);
    }
    return 0;
}

int kvf__cond_init_monotonic(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc)
        return -rc;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    rc = pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
    return -rc;
}

void kvf__deadline_ts(struct timespec *ts, uint64_t deadline_ms)
{
    ts->tv_sec = (time_t)(deadline_ms / 1000u);
    ts->tv_nsec = (long)(deadline_ms % 1000u) * 1000000L;
}

bool kvf__cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, uint64_t deadline_ms)
{
    if (deadline_ms == UINT64_MAX) {
        pthread_cond_wait(cv, mu);
        return true;
    }
    if (kvf__now_ms() >= deadline_ms)
        return false;
    struct timespec ts;
    kvf__deadline_ts(&ts, deadline_ms);
    pthread_cond_timedwait(cv, mu, &ts);
    return true;
}
