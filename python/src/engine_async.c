/*
 * kvferry.TransferEngine: asynchronous batches (Mooncake's names). A submit gives the batch an
 * id in the engine's table (batches.c) that pins its memory and notification until the batch
 * is freed; transfer_check_status, transfer_wait, transfer_cancel, transfer_element_status and
 * get_batch_transfer_status find it by that id, and release the id once its final status has
 * been returned.
 */
#include "engine.h"

/*
 * Submit one batch and give it an id. The memory of @spans is pinned in the batch's entry (the
 * buffer exports and tensors move out of the spans), with @msg, until the batch is freed: the C
 * library reads and writes it after this returns.
 */
PyObject *kvfpy_engine_submit(EngineObject *self, const char *op_name, kvf_op_t op,
                              const char *peer, kvfpy_span_t *spans, const size_t *lens,
                              const uint64_t *remotes, size_t n, PyObject *msg)
{
    kvf_engine_t *e;
    kvf_batch_t *b = NULL;
    PyObject *pins = NULL, *res = NULL;
    int rc;

    kvf_xfer_t *x = kvfpy_xfers_make(op, spans, lens, remotes, n);
    if (!x)
        return PyErr_NoMemory();
    pins = PyTuple_New((Py_ssize_t)n + 1);
    if (!pins)
        goto out;
    for (size_t i = 0; i < n; i++) {
        PyObject *pin = kvfpy_span_pin(&spans[i]);
        if (!pin)
            goto out;
        PyTuple_SET_ITEM(pins, (Py_ssize_t)i, pin);
    }
    Py_INCREF(msg ? msg : Py_None);
    PyTuple_SET_ITEM(pins, (Py_ssize_t)n, msg ? msg : Py_None);

    e = kvfpy_engine_enter(self, op_name, &rc);
    if (!e) {
        res = PyLong_FromLong(rc);
        goto out;
    }
    /* Submitting may wait for room (config submit_blocks), and looks the peer up. */
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_transfer_submit(e, peer, x, n, kvfpy_msg_ptr(msg), kvfpy_msg_len(msg), &b);
    Py_END_ALLOW_THREADS
    if (rc == 0) {
        /* Added before leaving the engine, so that a destroy() racing with this call finds the
         * batch in the table and frees it. */
        int64_t id = kvfpy_batches_add(&self->batches, b, pins);
        if (id < 0) {
            Py_BEGIN_ALLOW_THREADS
            kvf_batch_free(b);
            Py_END_ALLOW_THREADS
            kvfpy_engine_leave(self);
            PyErr_NoMemory();
            goto out;
        }
        pins = NULL; /* owned by the entry now */
        res = PyLong_FromLongLong(id);
    } else {
        res = PyLong_FromLong(rc);
    }
    kvfpy_engine_leave(self);
out:
    Py_XDECREF(pins);
    PyMem_Free(x);
    return res;
}

/* A batch id argument: any int (a negative one, such as a failed submit's code, is simply not a
 * known id). -1 with a TypeError for other types. */
static int batch_id_get(PyObject *obj, long long *out)
{
    int overflow;

    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "batch_id must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *num = PyNumber_Index(obj);
    if (!num)
        return -1;
    long long v = PyLong_AsLongLongAndOverflow(num, &overflow);
    Py_DECREF(num);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = overflow ? 0 : v; /* out of range: no such id */
    return 0;
}

/*
 * Enter the engine and find batch @id, counting the caller in on both: the C batch may then be
 * used without the GIL. NULL with *rc set (and the last-error message) when the engine is not
 * running or the id is not known.
 */
static kvfpy_batch_t *batch_enter(EngineObject *self, const char *op, long long id, int *rc)
{
    if (!kvfpy_engine_enter(self, op, rc))
        return NULL;
    kvfpy_batch_t *x = id > 0 ? kvfpy_batches_get(&self->batches, (uint64_t)id) : NULL;
    if (!x) {
        kvfpy_engine_leave(self);
        *rc = kvf_last_error_set(
            -KVF_EINVAL,
            "%s: batch id %lld is unknown: not returned by a submit on this engine, "
            "or already released (an id is released once its final status has been "
            "returned)",
            op, id);
    }
    return x;
}

/* Count the caller out of @x and of the engine; with @release the id is released and the batch
 * freed once nobody uses it. */
static void batch_leave(EngineObject *self, kvfpy_batch_t *x, int release)
{
    kvfpy_batch_t *dead = kvfpy_batches_put(&self->batches, x, release);
    kvfpy_engine_leave(self);
    kvfpy_engine_batches_free(dead);
}

PyObject *kvfpy_engine_transfer_check_status(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"batch_id", NULL};
    PyObject *id_o;
    long long id;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:transfer_check_status", (char **)kwlist,
                                     &id_o) ||
        batch_id_get(id_o, &id) < 0)
        return NULL;
    kvfpy_batch_t *x = batch_enter(self, "transfer_check_status", id, &rc);
    if (!x)
        return PyLong_FromLong(rc);
    rc = kvf_batch_status(x->b, NULL, 0);
    batch_leave(self, x, rc != KVF_BATCH_PENDING);
    return PyLong_FromLong(rc);
}

PyObject *kvfpy_engine_transfer_wait(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"batch_id", "timeout", NULL};
    PyObject *id_o, *to_o = Py_None;
    long long id;
    int rc, ms;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:transfer_wait", (char **)kwlist, &id_o,
                                     &to_o) ||
        batch_id_get(id_o, &id) < 0 || kvfpy_timeout_get(to_o, "timeout", -1, &ms) < 0)
        return NULL;
    kvfpy_batch_t *x = batch_enter(self, "transfer_wait", id, &rc);
    if (!x)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_batch_wait(x->b, ms);
    Py_END_ALLOW_THREADS
    batch_leave(self, x, rc != KVF_BATCH_PENDING);
    return PyLong_FromLong(rc);
}

PyObject *kvfpy_engine_transfer_cancel(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"batch_id", NULL};
    PyObject *id_o;
    long long id;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:transfer_cancel", (char **)kwlist, &id_o) ||
        batch_id_get(id_o, &id) < 0)
        return NULL;
    kvfpy_batch_t *x = batch_enter(self, "transfer_cancel", id, &rc);
    if (!x)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_batch_cancel(x->b);
    Py_END_ALLOW_THREADS
    batch_leave(self, x, 0);
    return PyLong_FromLong(rc);
}

PyObject *kvfpy_engine_transfer_element_status(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"batch_id", NULL};
    PyObject *id_o, *list = NULL;
    long long id;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:transfer_element_status", (char **)kwlist,
                                     &id_o) ||
        batch_id_get(id_o, &id) < 0)
        return NULL;
    kvfpy_batch_t *x = batch_enter(self, "transfer_element_status", id, &rc);
    if (!x)
        return kvfpy_raise(rc);
    size_t n = kvf_batch_size(x->b);
    int *st = PyMem_Malloc((n ? n : 1) * sizeof(*st));
    if (!st) {
        batch_leave(self, x, 0);
        return PyErr_NoMemory();
    }
    kvf_batch_status(x->b, st, n);
    batch_leave(self, x, 0);
    list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *v = PyLong_FromLong(st[i]);
        if (!v) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    PyMem_Free(st);
    return list;
}

PyObject *kvfpy_engine_get_batch_transfer_status(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"batch_ids", NULL};
    const char *op = "get_batch_transfer_status";
    PyObject *ids_o, *ids;
    kvfpy_batch_t *dead = NULL;
    char first_msg[1024] = "";
    int first = 0, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:get_batch_transfer_status", (char **)kwlist,
                                     &ids_o))
        return NULL;
    if (PyLong_Check(ids_o)) /* one id: accepted as a list of one */
        ids = PyTuple_Pack(1, ids_o);
    else
        ids = kvfpy_as_list(ids_o, "batch_ids");
    if (!ids)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    long long *v = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(*v));
    if (!v) {
        Py_DECREF(ids);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (batch_id_get(PySequence_Fast_GET_ITEM(ids, i), &v[i]) < 0) {
            Py_DECREF(ids);
            PyMem_Free(v);
            return NULL;
        }
    }
    Py_DECREF(ids);
    if (!kvfpy_engine_enter(self, op, &rc)) {
        PyMem_Free(v);
        return PyLong_FromLong(rc);
    }
    /* Every batch is waited for, in the order given (each wait is bounded by op_timeout_ms from
     * when that batch started running), and released once final. The result is the first
     * failure in that order, with its message. */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        kvfpy_batch_t *x = v[i] > 0 ? kvfpy_batches_get(&self->batches, (uint64_t)v[i]) : NULL;
        if (!x) {
            rc = kvf_last_error_set(
                -KVF_EINVAL,
                "%s: batch_ids[%zd]: batch id %lld is unknown: not returned by a "
                "submit on this engine, or already released",
                op, i, v[i]);
        } else {
            rc = kvf_batch_wait(x->b, -1);
            if (rc == KVF_BATCH_PENDING)
                rc = kvf_last_error_set(
                    -KVF_ETIMEDOUT,
                    "%s: batch id %lld did not complete in time; it is not released", op, v[i]);
            kvfpy_batch_t *d = kvfpy_batches_put(&self->batches, x, rc != -KVF_ETIMEDOUT);
            if (d) {
                d->next = dead;
                dead = d;
            }
        }
        if (rc < 0 && first == 0) {
            first = rc;
            snprintf(first_msg, sizeof(first_msg), "%s", kvf_last_error());
        }
    }
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    kvfpy_engine_batches_free(dead);
    PyMem_Free(v);
    if (first < 0)
        kvf_last_error_set(first, "%s", first_msg);
    return PyLong_FromLong(first);
}
