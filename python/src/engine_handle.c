/*
 * Reaching the C engine of a kvferry.TransferEngine: entering and leaving it (through its handle
 * guard, so that destroy() on one thread waits for the calls in flight on others), and closing
 * it, which frees the asynchronous batches still holding ids and then drops the registration
 * pins. The lowest of the engine's files: every method goes through it.
 */
#include "engine.h"

/* The engine with one more user, or NULL after setting the last-error message and *rc. */
kvf_engine_t *kvfpy_engine_enter(EngineObject *self, const char *op, int *rc)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    if (e)
        return e;
    if (kvfpy_guard_was_closed(&self->guard))
        *rc = kvf_last_error_set(-KVF_ECLOSED,
                                 "%s: the engine has been destroyed (call initialize() "
                                 "again to start a new one)",
                                 op);
    else
        *rc = kvf_last_error_set(-KVF_EINVAL,
                                 "%s: the engine is not initialized (call initialize() "
                                 "first)",
                                 op);
    return NULL;
}

void kvfpy_engine_leave(EngineObject *self)
{
    kvfpy_guard_leave(&self->guard);
}

static void engine_shutdown(void *e)
{
    kvf_engine_shutdown(e);
}

/* Free batch entries chained by ->next: the C batches without the GIL (kvf_batch_free may wait
 * for a batch still running), then, with it, the objects that kept their memory alive. */
void kvfpy_engine_batches_free(kvfpy_batch_t *dead)
{
    if (!dead)
        return;
    Py_BEGIN_ALLOW_THREADS
    for (kvfpy_batch_t *x = dead; x; x = x->next)
        kvf_batch_free(x->b);
    Py_END_ALLOW_THREADS
    while (dead) {
        kvfpy_batch_t *next = dead->next;
        Py_XDECREF(dead->pins);
        PyMem_RawFree(dead);
        dead = next;
    }
}

/* Destroy the C engine (if any) without the GIL, then free the batches still holding ids (the
 * C library allows kvf_batch_free() after kvf_engine_destroy(), which completed them), then drop
 * the pins: only once the engine has stopped serving may the registered memory go. */
void kvfpy_engine_close(EngineObject *self)
{
    kvf_engine_t *e;
    kvfpy_batch_t *dead = NULL;

    __atomic_store_n(&self->closing, 1, __ATOMIC_RELEASE);
    Py_BEGIN_ALLOW_THREADS
    e = kvfpy_guard_take(&self->guard, engine_shutdown);
    kvf_engine_destroy(e);
    Py_END_ALLOW_THREADS
    /* Every batch call runs inside the engine guard, so none is using an entry now. */
    if (self->batches_ok)
        dead = kvfpy_batches_drain(&self->batches);
    kvfpy_engine_batches_free(dead);
    __atomic_store_n(&self->closing, 0, __ATOMIC_RELEASE);
    if (e && self->pins)
        PyDict_Clear(self->pins);
}
