/*
 * The busy sections of an engine: every public call that uses the engine's state runs inside
 * one, and destroy waits until none is left after it set `closing`, which refuses new ones.
 */
#include <pthread.h>
#include <stdbool.h>

#include "core/core.h"

int kvf__eng_busy_enter(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->busy_lock);
    bool closing = e->closing;
    if (!closing)
        e->busy++;
    pthread_mutex_unlock(&e->busy_lock);
    return closing ? kvf__err(-KVF_ECLOSED, "engine %s is being destroyed", e->sid) : 0;
}

void kvf__eng_busy_leave(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->busy_lock);
    if (--e->busy == 0)
        pthread_cond_broadcast(&e->busy_cond);
    pthread_mutex_unlock(&e->busy_lock);
}

bool kvf__eng_closing(kvf_engine_t *e)
{
    pthread_mutex_lock(&e->busy_lock);
    bool closing = e->closing;
    pthread_mutex_unlock(&e->busy_lock);
    return closing;
}
