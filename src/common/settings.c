/* Process-wide settings: the log level from KVFERRY_LOG_LEVEL and kvf_log_set_level(). Apart
 * from log.c because setting a level reports bad input through error.c, which logs. */
#include <stdio.h>
#include <stdlib.h>

#include "common/common.h"

/* Read KVFERRY_LOG_LEVEL when the library is loaded, before any thread of ours exists. */
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
