/* The monotonic clock every deadline in kvferry is measured on. */
#include <time.h>

#include "common/common.h"

uint64_t kvf__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t kvf__now_ms(void)
{
    return kvf__now_ns() / 1000000u;
}
