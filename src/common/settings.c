/* Process-wide settings: kvf_log_set_level() and kvf_log_get_level(). Apart from log.c because
 * setting a level reports bad input through error.c, which logs. (KVFERRY_LOG_LEVEL is read in
 * log.c, which every program that logs links.) */
#include <stdio.h>
#include <stdlib.h>

#include "common/common.h"

int kvf_log_set_level(int level)
{
    if (level < KVF_LOG_DEBUG || level > KVF_LOG_ERROR)
        return kvf__err(-KVF_EINVAL, "log level %d: want 0 (debug), 1 (info), 2 (warn) or 3 (error)",
                        level);
    atomic_store(&kvf__log_level, level);
    return 0;
}

int kvf_log_get_level(void)
{
    return atomic_load(&kvf__log_level);
}
