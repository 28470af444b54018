/*
 * A program linked with the static library that references nothing but logging, as an
 * application that never sets a level does: it logs one debug line and prints the level
 * KVFERRY_LOG_LEVEL gave it (test_log.env_read_in_any_program).
 */
#include <stdatomic.h>
#include <stdio.h>

#include "common/common.h"

int main(void)
{
    KVF_DEBUG("probe", "a debug line");
    printf("level=%d\n", atomic_load(&kvf__log_level));
    return 0;
}
