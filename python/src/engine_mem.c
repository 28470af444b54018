/*
 * kvferry.TransferEngine: registered memory (the seed's register_memory, batch_register_memory,
 * unregister_memory, and mem_alloc/mem_free for memory same-host peers write into with a plain
 * copy). Objects registered by reference (numpy arrays, bytearrays, tensors) are pinned in the
 * engine's dict until they are unregistered or the engine is destroyed: a peer may write into
 * registered memory at any time, so it must not be freed under it.
 */
#include "engine.h"

/* Register @n spans; on success pin the objects behind them. */
static PyObject *register_spans(EngineObject *self, kvfpy_span_t *spans, size_t *lens, size_t n)
{
    void **addrs = NULL;
    int rc;

    kvf_engine_t *e = kvfpy_engine_enter(self, "register_memory", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    addrs = PyMem_Malloc((n ? n : 1) * sizeof(*addrs));
    if (!addrs) {
        kvfpy_engine_leave(self);
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < n; i++)
        addrs[i] = spans[i].addr;
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_register_batch(e, addrs, lens, n);
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    PyMem_Free(addrs);

    for (size_t i = 0; rc == 0 && i < n; i++) {
        PyObject *pin = kvfpy_span_pin(&spans[i]);
        if (!pin)
            return NULL;
        if (pin != Py_None) {
            PyObject *key = PyLong_FromVoidPtr(spans[i].addr);
            int err = key ? PyDict_SetItem(self->pins, key, pin) : -1;
            Py_XDECREF(key);
            if (err < 0) {
                Py_DECREF(pin);
                return NULL;
            }
        }
        Py_DECREF(pin);
    }
    return PyLong_FromLong(rc);
}

PyObject *kvfpy_engine_register_memory(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"buffer_addr", "capacity", NULL};
    PyObject *buf, *cap = NULL, *res = NULL;
    kvfpy_span_t span;
    size_t len;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:register_memory", (char **)kwlist, &buf,
                                     &cap))
        return NULL;
    if (kvfpy_span_get(buf, KVFPY_SPAN_WRITABLE, "buffer_addr", &span) < 0)
        return NULL;
    if (kvfpy_span_len(&span, cap, "buffer_addr", &len) == 0)
        res = register_spans(self, &span, &len, 1);
    kvfpy_span_release(&span);
    return res;
}

PyObject *kvfpy_engine_batch_register_memory(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"buffer_addrs", "capacities", NULL};
    PyObject *bufs_o, *caps_o = Py_None, *bufs, *caps = NULL, *res = NULL;
    kvfpy_span_t *spans;
    size_t *lens;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:batch_register_memory", (char **)kwlist,
                                     &bufs_o, &caps_o))
        return NULL;
    bufs = kvfpy_as_list(bufs_o, "buffer_addrs");
    if (!bufs)
        return NULL;
    if (caps_o != Py_None) {
        caps = kvfpy_as_list(caps_o, "capacities");
        if (!caps || kvfpy_check_same_len(bufs, "buffer_addrs", caps, "capacities") < 0)
            goto out;
    }
    if (kvfpy_spans_from_lists(bufs, caps, KVFPY_SPAN_WRITABLE, "buffer_addrs", &spans, &lens) < 0)
        goto out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(bufs);
    res = register_spans(self, spans, lens, (size_t)n);
    for (Py_ssize_t i = 0; i < n; i++)
        kvfpy_span_release(&spans[i]);
    PyMem_Free(spans);
    PyMem_Free(lens);
out:
    Py_DECREF(bufs);
    Py_XDECREF(caps);
    return res;
}

PyObject *kvfpy_engine_unregister_memory(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"buffer_addr", NULL};
    PyObject *buf;
    kvfpy_span_t span;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:unregister_memory", (char **)kwlist, &buf))
        return NULL;
    if (kvfpy_span_get(buf, KVFPY_SPAN_ADDR_ONLY, "buffer_addr", &span) < 0)
        return NULL;
    void *addr = span.addr;
    kvfpy_span_release(&span);

    kvf_engine_t *e = kvfpy_engine_enter(self, "unregister_memory", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_unregister(e, addr);
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    /* The region is gone (or its drain timed out, in which case the C library says the memory
     * must stay valid: keep the pin then). */
    if (rc == 0) {
        PyObject *key = PyLong_FromVoidPtr(addr);
        if (!key)
            return NULL;
        if (PyDict_DelItem(self->pins, key) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                Py_DECREF(key);
                return NULL;
            }
            PyErr_Clear();
        }
        Py_DECREF(key);
    }
    return PyLong_FromLong(rc);
}

PyObject *kvfpy_engine_mem_alloc(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"length", NULL};
    PyObject *len_o;
    uint64_t len;
    void *ptr = NULL;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:mem_alloc", (char **)kwlist, &len_o) ||
        kvfpy_u64(len_o, "length", &len) < 0)
        return NULL;
    kvf_engine_t *e = kvfpy_engine_enter(self, "mem_alloc", &rc);
    if (!e)
        return kvfpy_raise(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_alloc(e, (size_t)len, &ptr);
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    if (rc < 0)
        return kvfpy_raise(rc);
    return PyLong_FromVoidPtr(ptr);
}

PyObject *kvfpy_engine_mem_free(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"address", NULL};
    PyObject *addr_o;
    uint64_t addr;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:mem_free", (char **)kwlist, &addr_o) ||
        kvfpy_u64(addr_o, "address", &addr) < 0)
        return NULL;
    kvf_engine_t *e = kvfpy_engine_enter(self, "mem_free", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_free(e, (void *)(uintptr_t)addr);
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    return PyLong_FromLong(rc);
}
