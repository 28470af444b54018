/*
 * The handle guard: how a Python object owns a C handle that calls on other threads use
 * without the GIL. Without it, destroy() on one thread could free an engine that a transfer on
 * another thread is still inside.
 */
#include "kvferry_py.h"

int kvfpy_guard_init(kvfpy_guard_t *g)
{
    memset(g, 0, sizeof(*g));
    if (pthread_mutex_init(&g->lock, NULL) != 0)
        return -1;
    if (pthread_cond_init(&g->idle, NULL) != 0) {
        pthread_mutex_destroy(&g->lock);
        return -1;
    }
    return 0;
}

void kvfpy_guard_fini(kvfpy_guard_t *g)
{
    pthread_cond_destroy(&g->idle);
    pthread_mutex_destroy(&g->lock);
}

void *kvfpy_guard_enter(kvfpy_guard_t *g)
{
    pthread_mutex_lock(&g->lock);
    void *h = g->busy ? NULL : g->handle;
    if (h)
        g->users++;
    pthread_mutex_unlock(&g->lock);
    return h;
}

void kvfpy_guard_leave(kvfpy_guard_t *g)
{
    pthread_mutex_lock(&g->lock);
    if (--g->users == 0)
        pthread_cond_broadcast(&g->idle);
    pthread_mutex_unlock(&g->lock);
}

int kvfpy_guard_reserve(kvfpy_guard_t *g)
{
    int rc = 0;
    pthread_mutex_lock(&g->lock);
    if (g->handle || g->busy)
        rc = -KVF_EEXIST;
    else
        g->busy = 1;
    pthread_mutex_unlock(&g->lock);
    return rc;
}

void kvfpy_guard_fill(kvfpy_guard_t *g, void *handle)
{
    pthread_mutex_lock(&g->lock);
    g->handle = handle;
    g->busy = 0;
    pthread_mutex_unlock(&g->lock);
}

void *kvfpy_guard_take(kvfpy_guard_t *g, void (*shutdown)(void *h))
{
    void *h;

    pthread_mutex_lock(&g->lock);
    h = g->busy ? NULL : g->handle;
    if (h) {
        /* busy keeps new callers out while the slot still holds the handle. */
        g->busy = 1;
        /* Callers already inside may be waiting for something slow (a peer that has not
         * appeared): tell the handle to release them, so the wait below is short. */
        if (shutdown)
            shutdown(h);
        while (g->users)
            pthread_cond_wait(&g->idle, &g->lock);
        g->handle = NULL;
        g->busy = 0;
        g->closed = 1;
    }
    pthread_mutex_unlock(&g->lock);
    return h;
}

int kvfpy_guard_was_closed(kvfpy_guard_t *g)
{
    pthread_mutex_lock(&g->lock);
    int closed = g->closed;
    pthread_mutex_unlock(&g->lock);
    return closed;
}
