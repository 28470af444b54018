/* The tools' monotonic clock and the timed wait that goes with it (clock.h). */
#include <time.h>

#include "clock.h"

/* Now on CLOCK_MONOTONIC, in units of @unit_ns nanoseconds. */
static uint64_t now_in(uint64_t unit_ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) / unit_ns;
}

uint64_t cli_now_ns(void)
{
    return now_in(1);
}

uint64_t cli_now_ms(void)
{
    return now_in(1000000u);
}

int cli_cond_init(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc)
        return rc;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    rc = pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
    return rc;
}

int cli_cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *mu, uint64_t deadline_ms)
{
    struct timespec ts = {.tv_sec = (time_t)(deadline_ms / 1000u),
                          .tv_nsec = (long)(deadline_ms % 1000u) * 1000000L};
    return pthread_cond_timedwait(cond, mu, &ts);
}
