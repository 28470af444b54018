/*
 * kvferry.Store: a small client of the config store (set, get with wait, delete), for
 * applications that coordinate through the same store as their engines, such as the seed's
 * example publishing per-slice checksums. A Pythonic extra: failures raise kvferry.Error.
 */
#include "kvferry_py.h"

typedef struct {
    PyObject_HEAD
    kvfpy_guard_t guard; /* holds the kvf_store_t */
    int guard_ok;
} StoreObject;

static PyObject *Store_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    StoreObject *self = (StoreObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (kvfpy_guard_init(&self->guard) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->guard_ok = 1;
    return (PyObject *)self;
}

static void store_close(StoreObject *self)
{
    Py_BEGIN_ALLOW_THREADS
    kvf_store_close(kvfpy_guard_take(&self->guard, NULL));
    Py_END_ALLOW_THREADS
}

static int Store_init(StoreObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"url", "connect_timeout_ms", "request_timeout_ms",
                                         "auth_key_file", NULL};
    PyObject *url_o, *ct = NULL, *rt = NULL, *key_o = NULL;
    const char *url;
    uint64_t v;
    kvf_store_opts_t opts;
    kvf_store_t *st = NULL;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO$O:Store", (char **)kwlist, &url_o, &ct, &rt,
                                     &key_o))
        return -1;
    if (kvfpy_str(url_o, "url", &url) < 0)
        return -1;
    kvf_store_opts_init(&opts);
    opts.tls = kvfpy_tls_opts();
    if (key_o && key_o != Py_None && kvfpy_str(key_o, "auth_key_file", &opts.auth_key_file) < 0)
        return -1;
    if (ct && ct != Py_None) {
        if (kvfpy_u64(ct, "connect_timeout_ms", &v) < 0)
            return -1;
        opts.connect_timeout_ms = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
    }
    if (rt && rt != Py_None) {
        if (kvfpy_u64(rt, "request_timeout_ms", &v) < 0)
            return -1;
        opts.request_timeout_ms = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
    }
    if (kvfpy_guard_reserve(&self->guard) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "Store.__init__ called on an open store");
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_store_open(url, &opts, &st);
    Py_END_ALLOW_THREADS
    kvfpy_guard_fill(&self->guard, rc == 0 ? st : NULL);
    if (rc < 0) {
        kvfpy_raise(rc);
        return -1;
    }
    return 0;
}

static void Store_dealloc(StoreObject *self)
{
    if (self->guard_ok) {
        store_close(self);
        kvfpy_guard_fini(&self->guard);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static kvf_store_t *store_enter(StoreObject *self)
{
    kvf_store_t *st = kvfpy_guard_enter(&self->guard);
    if (!st)
        kvfpy_raise(kvf_last_error_set(-KVF_ECLOSED, "the store client is closed"));
    return st;
}

static PyObject *Store_set(StoreObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"key", "value", NULL};
    PyObject *key_o, *val_o;
    const char *key;
    Py_buffer val;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:set", (char **)kwlist, &key_o, &val_o) ||
        kvfpy_str(key_o, "key", &key) < 0)
        return NULL;
    if (PyUnicode_Check(val_o)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(val_o, &n);
        if (!s || PyBuffer_FillInfo(&val, val_o, (void *)s, n, 1, PyBUF_SIMPLE) < 0)
            return NULL;
    } else if (PyObject_GetBuffer(val_o, &val, PyBUF_ANY_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "value must be str or bytes-like, not %.100s",
                     Py_TYPE(val_o)->tp_name);
        return NULL;
    }
    kvf_store_t *st = store_enter(self);
    if (!st) {
        PyBuffer_Release(&val);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_store_set(st, key, val.buf, (size_t)val.len, 0);
    Py_END_ALLOW_THREADS
    kvfpy_guard_leave(&self->guard);
    PyBuffer_Release(&val);
    if (rc < 0)
        return kvfpy_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *Store_get(StoreObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"key", "wait_ms", NULL};
    PyObject *key_o, *wait_o = NULL;
    const char *key;
    uint64_t wait = 0;
    void *val = NULL;
    size_t len = 0;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:get", (char **)kwlist, &key_o, &wait_o) ||
        kvfpy_str(key_o, "key", &key) < 0 ||
        (wait_o && wait_o != Py_None && kvfpy_u64(wait_o, "wait_ms", &wait) < 0))
        return NULL;
    if (wait > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "wait_ms is out of range: %llu", (unsigned long long)wait);
        return NULL;
    }
    kvf_store_t *st = store_enter(self);
    if (!st)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_store_get(st, key, (uint32_t)wait, &val, &len);
    Py_END_ALLOW_THREADS
    kvfpy_guard_leave(&self->guard);
    if (rc == -KVF_ENOTFOUND || rc == -KVF_ETIMEDOUT)
        Py_RETURN_NONE;
    if (rc < 0)
        return kvfpy_raise(rc);
    PyObject *res = PyBytes_FromStringAndSize(val, (Py_ssize_t)len);
    free(val);
    return res;
}

static PyObject *Store_delete(StoreObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"key", NULL};
    PyObject *key_o;
    const char *key;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:delete", (char **)kwlist, &key_o) ||
        kvfpy_str(key_o, "key", &key) < 0)
        return NULL;
    kvf_store_t *st = store_enter(self);
    if (!st)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_store_del(st, key);
    Py_END_ALLOW_THREADS
    kvfpy_guard_leave(&self->guard);
    if (rc == -KVF_ENOTFOUND)
        Py_RETURN_FALSE;
    if (rc < 0)
        return kvfpy_raise(rc);
    Py_RETURN_TRUE;
}

static PyObject *Store_close(StoreObject *self, PyObject *unused)
{
    store_close(self);
    Py_RETURN_NONE;
}

static PyObject *Store_enter_ctx(StoreObject *self, PyObject *unused)
{
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Store_exit_ctx(StoreObject *self, PyObject *args)
{
    store_close(self);
    Py_RETURN_FALSE;
}

#define KW    (METH_VARARGS | METH_KEYWORDS)
#define FN(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef Store_methods[] = {
    {"set", FN(Store_set), KW,
     "set($self, key, value)\n--\n\n-> None\n\nSet key (str) to value (bytes-like, or str stored "
     "as UTF-8)."},
    {"get", FN(Store_get), KW,
     "get($self, key, wait_ms=0)\n--\n\n-> bytes or None\n\nThe value of key, waiting up to "
     "wait_ms for it to appear; None when it is absent (after the wait)."},
    {"delete", FN(Store_delete), KW,
     "delete($self, key)\n--\n\n-> bool\n\nDelete key; False when it did not exist."},
    {"close", FN(Store_close), METH_NOARGS,
     "close($self, /)\n--\n\n-> None\n\nDisconnect (idempotent)."},
    {"__enter__", FN(Store_enter_ctx), METH_NOARGS, NULL},
    {"__exit__", FN(Store_exit_ctx), METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject kvfpy_StoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvferry.Store",
    .tp_doc = "Store(url, connect_timeout_ms=None, request_timeout_ms=None)\n--\n\n"
              "A client of the config store at url (\"tcp://ip:port\"). Raises kvferry.Error "
              "when the store does not answer within connect_timeout_ms (default 10000).",
    .tp_basicsize = sizeof(StoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Store_new,
    .tp_init = (initproc)Store_init,
    .tp_dealloc = (destructor)Store_dealloc,
    .tp_methods = Store_methods,
};
