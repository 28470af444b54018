/*
 * kvferry.TransferEngine: the seed's (mf_adapter) TransferEngine over kvf_engine_t.
 *
 * The seed's methods keep its names, argument order and int return codes, so that porting is an
 * import change. Objects registered by reference (numpy arrays, bytearrays, tensors) are kept
 * alive by the engine until they are unregistered or the engine is destroyed: a peer may write
 * into registered memory at any time, so it must not be freed under it.
 */
#include "kvferry_py.h"

#include <time.h>

typedef struct {
    PyObject_HEAD
    kvfpy_guard_t guard; /* holds the kvf_engine_t */
    int guard_ok;        /* the guard was initialised (tp_new may fail before) */
    kvf_config_t cfg;
    char ns[65];
    /* Registration pins: address (int) -> object keeping that memory alive. Touched only with
     * the GIL held. */
    PyObject *pins;
    kvfpy_batches_t batches; /* asynchronous batch ids (batches.c) */
    int batches_ok;          /* the table was initialised */
    /* Set while destroy() takes the engine, read without the GIL: waits that the C library does
     * not promise to end on kvf_engine_shutdown() (peer events) are run in short slices that
     * check it. */
    int closing;
} EngineObject;

/* ---- reaching the C engine ------------------------------------------------------------------ */

/* The engine with one more user, or NULL after setting the last-error message and *rc. */
static kvf_engine_t *engine_enter(EngineObject *self, const char *op, int *rc)
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

static void engine_leave(EngineObject *self)
{
    kvfpy_guard_leave(&self->guard);
}

static void engine_shutdown(void *e)
{
    kvf_engine_shutdown(e);
}

/* Free batch entries chained by ->next: the C batches without the GIL (kvf_batch_free may wait
 * for a batch still running), then, with it, the objects that kept their memory alive. */
static void batches_free(kvfpy_batch_t *dead)
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
static void engine_close(EngineObject *self)
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
    batches_free(dead);
    __atomic_store_n(&self->closing, 0, __ATOMIC_RELEASE);
    if (e && self->pins)
        PyDict_Clear(self->pins);
}

/* The session id of the engine held (or being made), for a message; "" when none. */
static void held_session_id(EngineObject *self, char *buf, size_t len)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    snprintf(buf, len, "%s", e ? kvf_engine_session_id(e) : "an initialize() in progress");
    if (e)
        kvfpy_guard_leave(&self->guard);
}

/* ---- object lifecycle ------------------------------------------------------------------------ */

static const char *const config_kwlist[] = {"init_timeout_ms",
                                            "op_timeout_ms",
                                            "lease_ttl_ms",
                                            "tcp_conns_per_peer",
                                            "tcp_chunk_bytes",
                                            "namespace",
                                            "max_batches",
                                            "submit_blocks",
                                            "async_threads",
                                            "notify_queue_max",
                                            NULL};

static int config_u32(PyObject *v, const char *name, uint32_t *out)
{
    uint64_t x;
    if (!v || v == Py_None)
        return 0;
    if (kvfpy_u64(v, name, &x) < 0)
        return -1;
    if (x > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s is out of range: %llu", name, (unsigned long long)x);
        return -1;
    }
    *out = (uint32_t)x;
    return 0;
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *v[10] = {NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOOOOOOOOO:TransferEngine",
                                     (char **)config_kwlist, &v[0], &v[1], &v[2], &v[3], &v[4],
                                     &v[5], &v[6], &v[7], &v[8], &v[9]))
        return -1;
    if (kvfpy_guard_enter(&self->guard)) {
        kvfpy_guard_leave(&self->guard);
        PyErr_SetString(PyExc_RuntimeError, "TransferEngine.__init__ called on an initialized "
                                            "engine");
        return -1;
    }
    kvf_config_init(&self->cfg);
    if (config_u32(v[0], "init_timeout_ms", &self->cfg.init_timeout_ms) < 0 ||
        config_u32(v[1], "op_timeout_ms", &self->cfg.op_timeout_ms) < 0 ||
        config_u32(v[2], "lease_ttl_ms", &self->cfg.lease_ttl_ms) < 0 ||
        config_u32(v[3], "tcp_conns_per_peer", &self->cfg.tcp_conns_per_peer) < 0 ||
        config_u32(v[4], "tcp_chunk_bytes", &self->cfg.tcp_chunk_bytes) < 0 ||
        config_u32(v[6], "max_batches", &self->cfg.max_batches) < 0 ||
        config_u32(v[8], "async_threads", &self->cfg.async_threads) < 0 ||
        config_u32(v[9], "notify_queue_max", &self->cfg.notify_queue_max) < 0)
        return -1;
    if (v[7] && v[7] != Py_None) {
        int blocks = PyObject_IsTrue(v[7]);
        if (blocks < 0)
            return -1;
        self->cfg.submit_blocks = (uint32_t)blocks;
    }
    if (v[5] && v[5] != Py_None) {
        const char *ns;
        if (kvfpy_str(v[5], "namespace", &ns) < 0)
            return -1;
        if (strlen(ns) >= sizeof(self->ns)) {
            PyErr_Format(PyExc_ValueError, "namespace is longer than %zu characters",
                         sizeof(self->ns) - 1);
            return -1;
        }
        snprintf(self->ns, sizeof(self->ns), "%s", ns);
        self->cfg.ns = self->ns;
    }
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (kvfpy_guard_init(&self->guard) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->guard_ok = 1;
    if (kvfpy_batches_init(&self->batches) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->batches_ok = 1;
    kvf_config_init(&self->cfg);
    self->pins = PyDict_New();
    if (!self->pins) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Engine_traverse(EngineObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pins);
    return 0;
}

/* Breaking a reference cycle through a registered object: the engine goes first, so that no
 * peer can write into the memory once the pins are released. */
static int Engine_clear(EngineObject *self)
{
    if (self->guard_ok)
        engine_close(self);
    Py_CLEAR(self->pins);
    return 0;
}

static void Engine_dealloc(EngineObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->guard_ok) {
        engine_close(self);
        kvfpy_guard_fini(&self->guard);
    }
    if (self->batches_ok)
        kvfpy_batches_fini(&self->batches);
    Py_CLEAR(self->pins);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---- the seed's methods ---------------------------------------------------------------------- */

static PyObject *Engine_initialize(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"store_url", "session_id", "role", "device_id", NULL};
    PyObject *url_o, *sid_o, *role_o, *dev_o = NULL;
    const char *url, *sid = "127.0.0.1:0", *role_s;
    kvf_role_t role;
    kvf_engine_t *e = NULL;
    int device_id = 0, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|O:initialize", (char **)kwlist, &url_o,
                                     &sid_o, &role_o, &dev_o))
        return NULL;
    if (kvfpy_str(url_o, "store_url", &url) < 0 ||
        (sid_o != Py_None && kvfpy_str(sid_o, "session_id", &sid) < 0) ||
        kvfpy_str(role_o, "role", &role_s) < 0 ||
        (dev_o && kvfpy_int(dev_o, "device_id", &device_id) < 0))
        return NULL;
    rc = kvf_role_parse(role_s, &role);
    if (rc < 0)
        return PyLong_FromLong(rc);
    rc = kvfpy_guard_reserve(&self->guard);
    if (rc < 0) {
        char held[128];
        held_session_id(self, held, sizeof(held));
        return kvfpy_fail(rc,
                          "initialize: the engine is already initialized (%s); call "
                          "destroy() first",
                          held);
    }
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_engine_create(url, sid, role, device_id, &self->cfg, &e);
    Py_END_ALLOW_THREADS
    kvfpy_guard_fill(&self->guard, rc == 0 ? e : NULL);
    return PyLong_FromLong(rc);
}

static PyObject *Engine_get_rpc_port(EngineObject *self, PyObject *unused)
{
    int rc;
    kvf_engine_t *e = engine_enter(self, "get_rpc_port", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    rc = kvf_engine_port(e);
    engine_leave(self);
    return PyLong_FromLong(rc);
}

/* Register @n spans; on success pin the objects behind them. */
static PyObject *register_spans(EngineObject *self, kvfpy_span_t *spans, size_t *lens, size_t n)
{
    void **addrs = NULL;
    int rc;

    kvf_engine_t *e = engine_enter(self, "register_memory", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    addrs = PyMem_Malloc((n ? n : 1) * sizeof(*addrs));
    if (!addrs) {
        engine_leave(self);
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < n; i++)
        addrs[i] = spans[i].addr;
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_register_batch(e, addrs, lens, n);
    Py_END_ALLOW_THREADS
    engine_leave(self);
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

static PyObject *Engine_register_memory(EngineObject *self, PyObject *args, PyObject *kwds)
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

/* PySequence_Fast of @obj, or NULL with a TypeError naming @what. */
static PyObject *as_list(PyObject *obj, const char *what)
{
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list or tuple, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq) {
        PyErr_Format(PyExc_TypeError, "%s must be a list or tuple, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return seq;
}

static int check_same_len(PyObject *a, const char *an, PyObject *b, const char *bn)
{
    if (PySequence_Fast_GET_SIZE(a) != PySequence_Fast_GET_SIZE(b)) {
        PyErr_Format(PyExc_ValueError, "%s has %zd elements but %s has %zd", an,
                     PySequence_Fast_GET_SIZE(a), bn, PySequence_Fast_GET_SIZE(b));
        return -1;
    }
    return 0;
}

/*
 * Convert parallel lists of local buffers and lengths (@lens_seq may be NULL: whole objects)
 * into spans and sizes. On success the caller releases the @n spans and frees both arrays.
 */
static int spans_from_lists(PyObject *bufs, PyObject *lens_seq, unsigned flags,
                            const char *bufs_name, kvfpy_span_t **spans_out, size_t **lens_out)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(bufs);
    kvfpy_span_t *spans = PyMem_Calloc((size_t)(n ? n : 1), sizeof(*spans));
    size_t *lens = PyMem_Calloc((size_t)(n ? n : 1), sizeof(*lens));
    Py_ssize_t i = 0;
    char what[64];

    if (!spans || !lens) {
        PyErr_NoMemory();
        goto out_free;
    }
    for (; i < n; i++) {
        snprintf(what, sizeof(what), "%s[%zd]", bufs_name, i);
        if (kvfpy_span_get(PySequence_Fast_GET_ITEM(bufs, i), flags, what, &spans[i]) < 0)
            goto out_release;
        PyObject *l = lens_seq ? PySequence_Fast_GET_ITEM(lens_seq, i) : NULL;
        if (kvfpy_span_len(&spans[i], l, what, &lens[i]) < 0) {
            i++;
            goto out_release;
        }
    }
    *spans_out = spans;
    *lens_out = lens;
    return 0;

out_release:
    while (i-- > 0)
        kvfpy_span_release(&spans[i]);
out_free:
    PyMem_Free(spans);
    PyMem_Free(lens);
    return -1;
}

static PyObject *Engine_batch_register_memory(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"buffer_addrs", "capacities", NULL};
    PyObject *bufs_o, *caps_o = Py_None, *bufs, *caps = NULL, *res = NULL;
    kvfpy_span_t *spans;
    size_t *lens;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:batch_register_memory", (char **)kwlist,
                                     &bufs_o, &caps_o))
        return NULL;
    bufs = as_list(bufs_o, "buffer_addrs");
    if (!bufs)
        return NULL;
    if (caps_o != Py_None) {
        caps = as_list(caps_o, "capacities");
        if (!caps || check_same_len(bufs, "buffer_addrs", caps, "capacities") < 0)
            goto out;
    }
    if (spans_from_lists(bufs, caps, KVFPY_SPAN_WRITABLE, "buffer_addrs", &spans, &lens) < 0)
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

static PyObject *Engine_unregister_memory(EngineObject *self, PyObject *args, PyObject *kwds)
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

    kvf_engine_t *e = engine_enter(self, "unregister_memory", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_unregister(e, addr);
    Py_END_ALLOW_THREADS
    engine_leave(self);
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

/* ---- notification messages ------------------------------------------------------------------ */

/*
 * The notify= argument of the transfer methods: None (no notification), a bytes-like object or a
 * str (sent as UTF-8). On success *msg is a new bytes object holding a copy (so that a bytearray
 * changed after the call does not change the message), or NULL for None, and 0 is returned. A
 * message over KVF_NOTIFY_MAX returns -KVF_ETOOBIG with a message naming the limit; a wrong type
 * returns KVFPY_PYERR with a TypeError set.
 */
static int notify_get(PyObject *obj, const char *op, const char *what, PyObject **msg)
{
    Py_buffer view;
    PyObject *bytes;

    *msg = NULL;
    if (!obj || obj == Py_None)
        return 0;
    if (PyUnicode_Check(obj)) {
        bytes = PyUnicode_AsUTF8String(obj);
        if (!bytes)
            return KVFPY_PYERR;
    } else if (PyObject_CheckBuffer(obj)) {
        if (PyObject_GetBuffer(obj, &view, PyBUF_ANY_CONTIGUOUS) < 0)
            return KVFPY_PYERR;
        bytes = PyBytes_FromStringAndSize(view.buf, view.len);
        PyBuffer_Release(&view);
        if (!bytes)
            return KVFPY_PYERR;
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be bytes-like or a str, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return KVFPY_PYERR;
    }
    if (PyBytes_GET_SIZE(bytes) > KVF_NOTIFY_MAX) {
        int rc = kvf_last_error_set(
            -KVF_ETOOBIG, "%s: %s is %zd bytes, more than the %d-byte limit (KVF_NOTIFY_MAX)", op,
            what, PyBytes_GET_SIZE(bytes), KVF_NOTIFY_MAX);
        Py_DECREF(bytes);
        return rc;
    }
    *msg = bytes;
    return 0;
}

/* A notification's bytes for C: never NULL for a message (an empty one is still sent). */
static const void *msg_ptr(PyObject *msg)
{
    return msg ? PyBytes_AS_STRING(msg) : NULL;
}

static size_t msg_len(PyObject *msg)
{
    return msg ? (size_t)PyBytes_GET_SIZE(msg) : 0;
}

/* ---- transfers ------------------------------------------------------------------------------- */

static kvf_xfer_t *xfers_make(kvf_op_t op, kvfpy_span_t *spans, const size_t *lens,
                              const uint64_t *remotes, size_t n)
{
    kvf_xfer_t *x = PyMem_Malloc((n ? n : 1) * sizeof(*x));
    if (!x)
        return NULL;
    for (size_t i = 0; i < n; i++)
        x[i] = (kvf_xfer_t){.op = op, .local = spans[i].addr, .remote = remotes[i], .len = lens[i]};
    return x;
}

/* Run one batch and wait for it. @spans/@lens come from the caller; @remotes are peer addresses;
 * @msg is a bytes notification or NULL. */
static PyObject *run_batch(EngineObject *self, const char *op_name, kvf_op_t op, const char *peer,
                           kvfpy_span_t *spans, const size_t *lens, const uint64_t *remotes,
                           size_t n, PyObject *msg)
{
    int rc;
    kvf_xfer_t *x = xfers_make(op, spans, lens, remotes, n);
    if (!x)
        return PyErr_NoMemory();
    kvf_engine_t *e = engine_enter(self, op_name, &rc);
    if (e) {
        Py_BEGIN_ALLOW_THREADS
        if (msg)
            rc = kvf_transfer_sync_notify(e, peer, x, n, msg_ptr(msg), msg_len(msg));
        else
            rc = kvf_transfer_sync(e, peer, x, n);
        Py_END_ALLOW_THREADS
        engine_leave(self);
    }
    PyMem_Free(x);
    return PyLong_FromLong(rc);
}

/*
 * Submit one batch and give it an id. The memory of @spans is pinned in the batch's entry (the
 * buffer exports and tensors move out of the spans), with @msg, until the batch is freed: the C
 * library reads and writes it after this returns.
 */
static PyObject *submit_batch(EngineObject *self, const char *op_name, kvf_op_t op,
                              const char *peer, kvfpy_span_t *spans, const size_t *lens,
                              const uint64_t *remotes, size_t n, PyObject *msg)
{
    kvf_engine_t *e;
    kvf_batch_t *b = NULL;
    PyObject *pins = NULL, *res = NULL;
    int rc;

    kvf_xfer_t *x = xfers_make(op, spans, lens, remotes, n);
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

    e = engine_enter(self, op_name, &rc);
    if (!e) {
        res = PyLong_FromLong(rc);
        goto out;
    }
    /* Submitting may wait for room (config submit_blocks), and looks the peer up. */
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_transfer_submit(e, peer, x, n, msg_ptr(msg), msg_len(msg), &b);
    Py_END_ALLOW_THREADS
    if (rc == 0) {
        /* Added before leaving the engine, so that a destroy() racing with this call finds the
         * batch in the table and frees it. */
        int64_t id = kvfpy_batches_add(&self->batches, b, pins);
        if (id < 0) {
            Py_BEGIN_ALLOW_THREADS
            kvf_batch_free(b);
            Py_END_ALLOW_THREADS
            engine_leave(self);
            PyErr_NoMemory();
            goto out;
        }
        pins = NULL; /* owned by the entry now */
        res = PyLong_FromLongLong(id);
    } else {
        res = PyLong_FromLong(rc);
    }
    engine_leave(self);
out:
    Py_XDECREF(pins);
    PyMem_Free(x);
    return res;
}

static const char *transfer_name(kvf_op_t op, int batch, int async)
{
    if (async)
        return batch ? (op == KVF_OP_WRITE ? "batch_transfer_async_write"
                                           : "batch_transfer_async_read")
                     : (op == KVF_OP_WRITE ? "transfer_submit_write" : "transfer_submit_read");
    return batch ? (op == KVF_OP_WRITE ? "batch_transfer_sync_write" : "batch_transfer_sync_read")
                 : (op == KVF_OP_WRITE ? "transfer_sync_write" : "transfer_sync_read");
}

static PyObject *transfer_one(EngineObject *self, PyObject *args, PyObject *kwds, kvf_op_t op,
                              int async)
{
    static const char *const kwlist[] = {"dest_session", "buffer", "peer_buffer_address", "length",
                                         "notify", NULL};
    const char *name = transfer_name(op, 0, async);
    PyObject *sess_o, *buf, *peer_o, *len_o = Py_None, *notify_o = Py_None, *msg = NULL;
    PyObject *res = NULL;
    const char *sess;
    kvfpy_span_t span;
    uint64_t remote;
    size_t len;
    char fmt[64];

    snprintf(fmt, sizeof(fmt), "OOO|OO:%s", name);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, fmt, (char **)kwlist, &sess_o, &buf, &peer_o,
                                     &len_o, &notify_o))
        return NULL;
    if (kvfpy_str(sess_o, "dest_session", &sess) < 0 ||
        kvfpy_u64(peer_o, "peer_buffer_address", &remote) < 0)
        return NULL;
    int rc = notify_get(notify_o, name, "notify", &msg);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return PyLong_FromLong(rc);
    if (kvfpy_span_get(buf, op == KVF_OP_READ ? KVFPY_SPAN_WRITABLE : 0, "buffer", &span) < 0)
        goto out;
    if (kvfpy_span_len(&span, len_o, "buffer", &len) == 0)
        res = async ? submit_batch(self, name, op, sess, &span, &len, &remote, 1, msg)
                    : run_batch(self, name, op, sess, &span, &len, &remote, 1, msg);
    kvfpy_span_release(&span);
out:
    Py_XDECREF(msg);
    return res;
}

static PyObject *transfer_batch(EngineObject *self, PyObject *args, PyObject *kwds, kvf_op_t op,
                                int async)
{
    static const char *const kwlist[] = {"dest_session", "buffers", "peer_buffer_addresses",
                                         "lengths", "notify", NULL};
    const char *name = transfer_name(op, 1, async);
    PyObject *sess_o, *bufs_o, *peers_o, *lens_o = Py_None, *notify_o = Py_None;
    PyObject *bufs = NULL, *peers = NULL, *lens_seq = NULL, *res = NULL, *msg = NULL;
    kvfpy_span_t *spans = NULL;
    size_t *lens = NULL;
    uint64_t *remotes = NULL;
    const char *sess;
    char fmt[64], what[64];
    Py_ssize_t n = 0;

    snprintf(fmt, sizeof(fmt), "OOO|OO:%s", name);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, fmt, (char **)kwlist, &sess_o, &bufs_o, &peers_o,
                                     &lens_o, &notify_o))
        return NULL;
    if (kvfpy_str(sess_o, "dest_session", &sess) < 0)
        return NULL;
    int rc = notify_get(notify_o, name, "notify", &msg);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return PyLong_FromLong(rc);
    bufs = as_list(bufs_o, "buffers");
    if (!bufs)
        goto out;
    peers = as_list(peers_o, "peer_buffer_addresses");
    if (!peers || check_same_len(bufs, "buffers", peers, "peer_buffer_addresses") < 0)
        goto out;
    if (lens_o != Py_None) {
        lens_seq = as_list(lens_o, "lengths");
        if (!lens_seq || check_same_len(bufs, "buffers", lens_seq, "lengths") < 0)
            goto out;
    }
    n = PySequence_Fast_GET_SIZE(bufs);
    remotes = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(*remotes));
    if (!remotes) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        snprintf(what, sizeof(what), "peer_buffer_addresses[%zd]", i);
        if (kvfpy_u64(PySequence_Fast_GET_ITEM(peers, i), what, &remotes[i]) < 0)
            goto out;
    }
    if (spans_from_lists(bufs, lens_seq, op == KVF_OP_READ ? KVFPY_SPAN_WRITABLE : 0, "buffers",
                         &spans, &lens) < 0)
        goto out;
    res = async ? submit_batch(self, name, op, sess, spans, lens, remotes, (size_t)n, msg)
                : run_batch(self, name, op, sess, spans, lens, remotes, (size_t)n, msg);
    for (Py_ssize_t i = 0; i < n; i++)
        kvfpy_span_release(&spans[i]);
out:
    PyMem_Free(spans);
    PyMem_Free(lens);
    PyMem_Free(remotes);
    Py_XDECREF(bufs);
    Py_XDECREF(peers);
    Py_XDECREF(lens_seq);
    Py_XDECREF(msg);
    return res;
}

static PyObject *Engine_transfer_sync_write(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_one(self, a, k, KVF_OP_WRITE, 0);
}

static PyObject *Engine_transfer_sync_read(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_one(self, a, k, KVF_OP_READ, 0);
}

static PyObject *Engine_batch_transfer_sync_write(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_batch(self, a, k, KVF_OP_WRITE, 0);
}

static PyObject *Engine_batch_transfer_sync_read(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_batch(self, a, k, KVF_OP_READ, 0);
}

/* ---- asynchronous batches (Mooncake's names) ------------------------------------------------- */

static PyObject *Engine_transfer_submit_write(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_one(self, a, k, KVF_OP_WRITE, 1);
}

static PyObject *Engine_transfer_submit_read(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_one(self, a, k, KVF_OP_READ, 1);
}

static PyObject *Engine_batch_transfer_async_write(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_batch(self, a, k, KVF_OP_WRITE, 1);
}

static PyObject *Engine_batch_transfer_async_read(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_batch(self, a, k, KVF_OP_READ, 1);
}

/* A batch id argument: any int (a negative one, such as a failed submit's code, is simply not a
 * known id). -1 with a TypeError for other types. */
static int batch_id_get(PyObject *obj, long long *out)
{
    int overflow;

    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "batch_id must be an int, not %.100s",
                     Py_TYPE(obj)->tp_name);
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
    if (!engine_enter(self, op, rc))
        return NULL;
    kvfpy_batch_t *x = id > 0 ? kvfpy_batches_get(&self->batches, (uint64_t)id) : NULL;
    if (!x) {
        engine_leave(self);
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
    engine_leave(self);
    batches_free(dead);
}

/* A timeout in seconds (int or float, >= 0) as milliseconds, rounded up; None gives @none_ms.
 * -1 with TypeError/ValueError set. */
static int timeout_get(PyObject *obj, const char *what, int none_ms, int *out)
{
    if (!obj || obj == Py_None) {
        *out = none_ms;
        return 0;
    }
    if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyIndex_Check(obj))) {
        PyErr_Format(PyExc_TypeError, "%s must be a number of seconds or None, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (!(t >= 0)) { /* also NaN */
        PyErr_Format(PyExc_ValueError, "%s must be >= 0 seconds (or None), got %R", what, obj);
        return -1;
    }
    double ms = t * 1000.0;
    if (ms > (double)INT_MAX)
        *out = INT_MAX;
    else
        *out = (int)ms + ((double)(int)ms < ms);
    return 0;
}

static PyObject *Engine_transfer_check_status(EngineObject *self, PyObject *args, PyObject *kwds)
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

static PyObject *Engine_transfer_wait(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"batch_id", "timeout", NULL};
    PyObject *id_o, *to_o = Py_None;
    long long id;
    int rc, ms;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:transfer_wait", (char **)kwlist, &id_o,
                                     &to_o) ||
        batch_id_get(id_o, &id) < 0 || timeout_get(to_o, "timeout", -1, &ms) < 0)
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

static PyObject *Engine_transfer_cancel(EngineObject *self, PyObject *args, PyObject *kwds)
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

static PyObject *Engine_transfer_element_status(EngineObject *self, PyObject *args,
                                                PyObject *kwds)
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

static PyObject *Engine_get_batch_transfer_status(EngineObject *self, PyObject *args,
                                                  PyObject *kwds)
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
        ids = as_list(ids_o, "batch_ids");
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
    if (!engine_enter(self, op, &rc)) {
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
    engine_leave(self);
    batches_free(dead);
    PyMem_Free(v);
    if (first < 0)
        kvf_last_error_set(first, "%s", first_msg);
    return PyLong_FromLong(first);
}

/* ---- notifications --------------------------------------------------------------------------- */

static PyObject *Engine_send_notification(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"dest_session", "message", NULL};
    const char *op = "send_notification";
    PyObject *sess_o, *msg_o, *msg = NULL;
    const char *sess;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:send_notification", (char **)kwlist,
                                     &sess_o, &msg_o) ||
        kvfpy_str(sess_o, "dest_session", &sess) < 0)
        return NULL;
    if (msg_o == Py_None) {
        PyErr_SetString(PyExc_TypeError, "message must be bytes-like or a str, not None");
        return NULL;
    }
    rc = notify_get(msg_o, op, "message", &msg);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return PyLong_FromLong(rc);
    kvf_engine_t *e = engine_enter(self, op, &rc);
    if (e) {
        Py_BEGIN_ALLOW_THREADS
        rc = kvf_notify_send(e, sess, msg_ptr(msg), msg_len(msg));
        Py_END_ALLOW_THREADS
        engine_leave(self);
    }
    Py_DECREF(msg);
    return PyLong_FromLong(rc);
}

/* Notifications taken per C call. */
#define NOTIFY_CHUNK 16

/*
 * Take every queued notification as a list of (sender, bytes); with @wait, first wait up to
 * @timeout_ms (negative: until one comes or the engine is destroyed) for one to arrive.
 */
static PyObject *notify_take(EngineObject *self, const char *op, int wait, int timeout_ms)
{
    PyObject *list = NULL;
    int rc, n;

    kvf_engine_t *e = engine_enter(self, op, &rc);
    if (!e)
        return kvfpy_raise(rc);
    kvf_notify_t *buf = PyMem_RawMalloc(NOTIFY_CHUNK * sizeof(*buf));
    if (!buf) {
        engine_leave(self);
        return PyErr_NoMemory();
    }
    list = PyList_New(0);
    for (int round = 0; list; round++) {
        if (round == 0 && wait) {
            Py_BEGIN_ALLOW_THREADS
            n = kvf_notify_wait(e, buf, NOTIFY_CHUNK, timeout_ms);
            Py_END_ALLOW_THREADS
        } else {
            n = kvf_notify_poll(e, buf, NOTIFY_CHUNK);
        }
        if (n < 0) {
            /* What was taken already is returned; the error shows again on the next call. */
            if (PyList_GET_SIZE(list) == 0) {
                Py_CLEAR(list);
                kvfpy_raise(n);
            }
            break;
        }
        for (int i = 0; i < n; i++) {
            PyObject *t = Py_BuildValue(
                "(Ny#)",
                PyUnicode_DecodeUTF8(buf[i].sender, (Py_ssize_t)strnlen(buf[i].sender,
                                                                        sizeof(buf[i].sender)),
                                     "replace"),
                (const char *)buf[i].msg, (Py_ssize_t)buf[i].len);
            if (!t || PyList_Append(list, t) < 0) {
                /* The rest of this chunk is lost, as it would be with no memory anywhere. */
                Py_XDECREF(t);
                Py_CLEAR(list);
                break;
            }
            Py_DECREF(t);
        }
        if (n < NOTIFY_CHUNK)
            break;
    }
    engine_leave(self);
    PyMem_RawFree(buf);
    return list;
}

static PyObject *Engine_get_notifications(EngineObject *self, PyObject *unused)
{
    return notify_take(self, "get_notifications", 0, 0);
}

static PyObject *Engine_wait_notification(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"timeout", NULL};
    PyObject *to_o = Py_None;
    int ms;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:wait_notification", (char **)kwlist,
                                     &to_o) ||
        timeout_get(to_o, "timeout", -1, &ms) < 0)
        return NULL;
    return notify_take(self, "wait_notification", 1, ms);
}

/* ---- peers ----------------------------------------------------------------------------------- */

static PyObject *Engine_wait_for_peer(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"session_id", "timeout", NULL};
    PyObject *sess_o, *to_o = Py_None;
    const char *sess;
    int rc, ms;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:wait_for_peer", (char **)kwlist, &sess_o,
                                     &to_o) ||
        kvfpy_str(sess_o, "session_id", &sess) < 0 ||
        timeout_get(to_o, "timeout", (int)(self->cfg.init_timeout_ms > INT_MAX
                                               ? INT_MAX
                                               : self->cfg.init_timeout_ms),
                    &ms) < 0)
        return NULL;
    kvf_engine_t *e = engine_enter(self, "wait_for_peer", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_peer_wait(e, sess, (uint32_t)ms);
    Py_END_ALLOW_THREADS
    engine_leave(self);
    return PyLong_FromLong(rc);
}

/* Milliseconds on the monotonic clock, for get_peer_events()'s slices. */
static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

#define PEER_CHUNK 64
/* kvf_peer_events() is not promised to return on kvf_engine_shutdown(), so a long wait is made
 * of slices this long, between which destroy() is noticed. */
#define PEER_SLICE_MS 200

static PyObject *Engine_get_peer_events(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"timeout", NULL};
    PyObject *to_o = NULL, *list = NULL;
    kvf_peer_event_t *ev;
    int rc, ms, n;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:get_peer_events", (char **)kwlist, &to_o))
        return NULL;
    ms = 0; /* the default: take what is there */
    if (to_o && timeout_get(to_o, "timeout", -1, &ms) < 0)
        return NULL;
    kvf_engine_t *e = engine_enter(self, "get_peer_events", &rc);
    if (!e)
        return kvfpy_raise(rc);
    ev = PyMem_RawMalloc(PEER_CHUNK * sizeof(*ev));
    if (!ev) {
        engine_leave(self);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    uint64_t deadline = ms < 0 ? UINT64_MAX : now_ms() + (uint64_t)ms;
    for (;;) {
        uint64_t now = now_ms();
        int slice = ms < 0 || deadline - now > PEER_SLICE_MS ? PEER_SLICE_MS : (int)(deadline - now);
        if (ms == 0)
            slice = 0;
        n = kvf_peer_events(e, ev, PEER_CHUNK, slice);
        if (n != 0 || ms == 0 || now_ms() >= deadline)
            break;
        if (__atomic_load_n(&self->closing, __ATOMIC_ACQUIRE)) {
            n = kvf_last_error_set(-KVF_ECLOSED, "get_peer_events: the engine is being destroyed");
            break;
        }
    }
    Py_END_ALLOW_THREADS
    list = n < 0 ? kvfpy_raise(n) : PyList_New(0);
    while (list && n > 0) {
        for (int i = 0; i < n; i++) {
            PyObject *t = Py_BuildValue("(ss)", ev[i].type == KVF_PEER_JOINED ? "joined" : "left",
                                        ev[i].sid);
            if (!t || PyList_Append(list, t) < 0) {
                Py_XDECREF(t);
                Py_CLEAR(list);
                break;
            }
            Py_DECREF(t);
        }
        if (!list || n < PEER_CHUNK)
            break;
        n = kvf_peer_events(e, ev, PEER_CHUNK, 0);
    }
    engine_leave(self);
    PyMem_RawFree(ev);
    return list;
}

static PyObject *Engine_destroy(EngineObject *self, PyObject *unused)
{
    engine_close(self);
    return PyLong_FromLong(0);
}

/* ---- Pythonic extras --------------------------------------------------------------------- */

static PyObject *Engine_peer_regions(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"session", NULL};
    PyObject *sess_o, *list;
    kvf_region_info_t *r = NULL;
    const char *sess;
    size_t n = 0;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:peer_regions", (char **)kwlist, &sess_o) ||
        kvfpy_str(sess_o, "session", &sess) < 0)
        return NULL;
    kvf_engine_t *e = engine_enter(self, "peer_regions", &rc);
    if (!e)
        return kvfpy_raise(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_peer_regions(e, sess, &r, &n);
    Py_END_ALLOW_THREADS
    engine_leave(self);
    if (rc < 0)
        return kvfpy_raise(rc);
    list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *t =
            Py_BuildValue("(KK)", (unsigned long long)r[i].addr, (unsigned long long)r[i].len);
        if (!t) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    free(r);
    return list;
}

static PyObject *Engine_get_session_id(EngineObject *self, void *closure)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    if (!e)
        Py_RETURN_NONE;
    PyObject *s = PyUnicode_FromString(kvf_engine_session_id(e));
    engine_leave(self);
    return s;
}

static PyObject *Engine_enter(EngineObject *self, PyObject *unused)
{
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Engine_exit(EngineObject *self, PyObject *args)
{
    engine_close(self);
    Py_RETURN_FALSE;
}

static PyObject *Engine_repr(EngineObject *self)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    if (!e)
        return PyUnicode_FromFormat("<kvferry.TransferEngine %s>",
                                    kvfpy_guard_was_closed(&self->guard) ? "destroyed"
                                                                         : "not initialized");
    PyObject *s =
        PyUnicode_FromFormat("<kvferry.TransferEngine session %s>", kvf_engine_session_id(e));
    engine_leave(self);
    return s;
}

#define KW    (METH_VARARGS | METH_KEYWORDS)
#define FN(f) ((PyCFunction)(void (*)(void))(f))

static PyObject *Engine_mem_alloc(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"length", NULL};
    PyObject *len_o;
    uint64_t len;
    void *ptr = NULL;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:mem_alloc", (char **)kwlist, &len_o) ||
        kvfpy_u64(len_o, "length", &len) < 0)
        return NULL;
    kvf_engine_t *e = engine_enter(self, "mem_alloc", &rc);
    if (!e)
        return kvfpy_raise(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_alloc(e, (size_t)len, &ptr);
    Py_END_ALLOW_THREADS
    engine_leave(self);
    if (rc < 0)
        return kvfpy_raise(rc);
    return PyLong_FromVoidPtr(ptr);
}

static PyObject *Engine_mem_free(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"address", NULL};
    PyObject *addr_o;
    uint64_t addr;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:mem_free", (char **)kwlist, &addr_o) ||
        kvfpy_u64(addr_o, "address", &addr) < 0)
        return NULL;
    kvf_engine_t *e = engine_enter(self, "mem_free", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_mem_free(e, (void *)(uintptr_t)addr);
    Py_END_ALLOW_THREADS
    engine_leave(self);
    return PyLong_FromLong(rc);
}

static PyObject *Engine_peer_transport(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"session", NULL};
    PyObject *sess_o;
    const char *sess, *name = NULL;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:peer_transport", (char **)kwlist, &sess_o) ||
        kvfpy_str(sess_o, "session", &sess) < 0)
        return NULL;
    kvf_engine_t *e = engine_enter(self, "peer_transport", &rc);
    if (!e)
        return kvfpy_raise(rc);
    rc = kvf_engine_peer_transport(e, sess, &name);
    engine_leave(self);
    if (rc < 0)
        return kvfpy_raise(rc);
    return PyUnicode_FromString(name);
}

static PyMethodDef Engine_methods[] = {
    {"initialize", FN(Engine_initialize), KW,
     "initialize(store_url, session_id, role, device_id=0) -> int\n\n"
     "Start the engine: listen on session_id (\"ip:port\"; port 0 picks one; None means "
     "\"127.0.0.1:0\"), connect to the config store at store_url (\"tcp://ip:port\", waited for "
     "up to init_timeout_ms) and publish this session. role is \"Prefill\", \"Decode\" or "
     "\"Both\". Returns 0 or a negative code (see get_last_err_msg())."},
    {"get_rpc_port", FN(Engine_get_rpc_port), METH_NOARGS,
     "get_rpc_port() -> int\n\nThe port this engine listens on, or a negative code."},
    {"register_memory", FN(Engine_register_memory), KW,
     "register_memory(buffer_addr, capacity=None) -> int\n\n"
     "Make [buffer_addr, buffer_addr+capacity) writable and readable by peers. buffer_addr is "
     "an int address, a writable buffer object or a CPU tensor (capacity then defaults to its "
     "size; the object is kept alive until it is unregistered). Returns 0 or a negative code."},
    {"batch_register_memory", FN(Engine_batch_register_memory), KW,
     "batch_register_memory(buffer_addrs, capacities=None) -> int\n\n"
     "Register several ranges: all of them, or none on error. Returns 0 or a negative code."},
    {"unregister_memory", FN(Engine_unregister_memory), KW,
     "unregister_memory(buffer_addr) -> int\n\n"
     "Withdraw the region starting at buffer_addr; transfers into it already running are "
     "waited for, later ones fail. Returns 0 or a negative code."},
    {"transfer_sync_write", FN(Engine_transfer_sync_write), KW,
     "transfer_sync_write(dest_session, buffer, peer_buffer_address, length=None) -> int\n\n"
     "Write length bytes from local buffer into dest_session's registered memory at "
     "peer_buffer_address and wait until they are there. Returns 0 or a negative code."},
    {"transfer_sync_read", FN(Engine_transfer_sync_read), KW,
     "transfer_sync_read(dest_session, buffer, peer_buffer_address, length=None) -> int\n\n"
     "Read length bytes at peer_buffer_address in dest_session's registered memory into local "
     "buffer. Returns 0 or a negative code."},
    {"batch_transfer_sync_write", FN(Engine_batch_transfer_sync_write), KW,
     "batch_transfer_sync_write(dest_session, buffers, peer_buffer_addresses, lengths=None) "
     "-> int\n\nSeveral writes to one peer, waited for together. Returns 0 or a negative code."},
    {"batch_transfer_sync_read", FN(Engine_batch_transfer_sync_read), KW,
     "batch_transfer_sync_read(dest_session, buffers, peer_buffer_addresses, lengths=None) "
     "-> int\n\nSeveral reads from one peer, waited for together. Returns 0 or a negative code."},
    {"transfer_submit_write", FN(Engine_transfer_submit_write), KW,
     "transfer_submit_write(dest_session, buffer, peer_buffer_address, length=None, "
     "notify=None) -> int\n\n"
     "Start writing length bytes from buffer to dest_session's memory at peer_buffer_address "
     "in the background. Returns a batch id (>= 1) for transfer_check_status/transfer_wait, or "
     "a negative code. buffer must stay valid and unchanged until the batch is complete (a "
     "buffer object is kept alive meanwhile). notify: bytes delivered to dest_session after "
     "every byte is there."},
    {"transfer_submit_read", FN(Engine_transfer_submit_read), KW,
     "transfer_submit_read(dest_session, buffer, peer_buffer_address, length=None, "
     "notify=None) -> int\n\n"
     "Start reading into buffer in the background. Returns a batch id (>= 1) or a negative "
     "code."},
    {"batch_transfer_async_write", FN(Engine_batch_transfer_async_write), KW,
     "batch_transfer_async_write(dest_session, buffers, peer_buffer_addresses, lengths=None, "
     "notify=None) -> int\n\n"
     "Start several writes to one peer as one batch. Returns a batch id (>= 1) or a negative "
     "code."},
    {"batch_transfer_async_read", FN(Engine_batch_transfer_async_read), KW,
     "batch_transfer_async_read(dest_session, buffers, peer_buffer_addresses, lengths=None, "
     "notify=None) -> int\n\n"
     "Start several reads from one peer as one batch. Returns a batch id (>= 1) or a negative "
     "code."},
    {"transfer_check_status", FN(Engine_transfer_check_status), KW,
     "transfer_check_status(batch_id) -> int\n\n"
     "1 when the batch is complete, 0 while it runs, a negative code when it failed (see "
     "get_last_err_msg()). Never blocks. Once 1 or a negative code has been returned, the id is "
     "released: later calls with it return -KVF_EINVAL."},
    {"transfer_wait", FN(Engine_transfer_wait), KW,
     "transfer_wait(batch_id, timeout=None) -> int\n\n"
     "As transfer_check_status, waiting up to timeout seconds (None: until the batch ends, "
     "which op_timeout_ms bounds) for the batch to end. The GIL is released."},
    {"transfer_cancel", FN(Engine_transfer_cancel), KW,
     "transfer_cancel(batch_id) -> int\n\n"
     "Stop the batch: elements not yet started are not sent and no notification is delivered. "
     "Returns 0; the id is not released (its status is then -KVF_ECANCELED, or 1 if it had "
     "already completed)."},
    {"transfer_element_status", FN(Engine_transfer_element_status), KW,
     "transfer_element_status(batch_id) -> list of int\n\n"
     "Each element's status: 0 done, KVF_XFER_PENDING (1) not finished, or a negative code. "
     "Does not release the id. Raises kvferry.Error for an unknown id."},
    {"get_batch_transfer_status", FN(Engine_get_batch_transfer_status), KW,
     "get_batch_transfer_status(batch_ids) -> int\n\n"
     "Wait for every batch in the list (GIL released; each wait bounded by op_timeout_ms) and "
     "release the ids. Returns 0 when all succeeded, else the first negative code in list "
     "order (an unknown id counts as -KVF_EINVAL)."},
    {"send_notification", FN(Engine_send_notification), KW,
     "send_notification(dest_session, message) -> int\n\n"
     "Deliver message (bytes-like or str, at most KVF_NOTIFY_MAX = 4096 bytes) to "
     "dest_session, in order after this engine's earlier batches to it. Returns 0 once the "
     "peer has queued it, or a negative code."},
    {"get_notifications", FN(Engine_get_notifications), METH_NOARGS,
     "get_notifications() -> list of (sender_session_id, bytes)\n\n"
     "Every notification received and not yet taken, oldest first; [] when none. Never "
     "blocks. Raises kvferry.Error when the engine is not running."},
    {"wait_notification", FN(Engine_wait_notification), KW,
     "wait_notification(timeout=None) -> list of (sender_session_id, bytes)\n\n"
     "As get_notifications, waiting up to timeout seconds (None: until one arrives or the "
     "engine is destroyed) for the first; [] when the time ran out. The GIL is released."},
    {"wait_for_peer", FN(Engine_wait_for_peer), KW,
     "wait_for_peer(session_id, timeout=None) -> int\n\n"
     "Wait up to timeout seconds (None: init_timeout_ms) for an engine with that session id "
     "to be up. Returns 0, or a negative code (-KVF_ETIMEDOUT)."},
    {"get_peer_events", FN(Engine_get_peer_events), KW,
     "get_peer_events(timeout=0) -> list of (\"joined\" | \"left\", session_id)\n\n"
     "Peers that joined or left since the previous call; the first call reports every peer "
     "already up as joined. Waits up to timeout seconds (None: for ever) for the first event. "
     "Raises kvferry.Error on failure."},
    {"destroy", FN(Engine_destroy), METH_NOARGS,
     "destroy() -> int\n\nWithdraw the session, close connections and free the engine (waiting "
     "for transfers still running on other threads); batch ids not yet released are freed. "
     "Returns 0; a no-op when not initialized."},
    {"unInitialize", FN(Engine_destroy), METH_NOARGS,
     "unInitialize() -> int\n\nSame as destroy()."},
    {"peer_regions", FN(Engine_peer_regions), KW,
     "peer_regions(session) -> list of (addr, length)\n\n"
     "The regions the peer has registered, sorted by address (waiting up to init_timeout_ms "
     "for the peer to appear). Raises kvferry.Error on failure."},
    {"mem_alloc", FN(Engine_mem_alloc), KW,
     "mem_alloc(length) -> int\n\n"
     "Allocate length bytes of shared memory (memfd), registered with this engine, so that "
     "same-host peers write into it with a plain copy. Returns its address; raises "
     "kvferry.Error on failure. Free it with mem_free()."},
    {"mem_free", FN(Engine_mem_free), KW,
     "mem_free(address) -> int\n\n"
     "Unregister and free memory from mem_alloc(). Returns 0 or a negative code."},
    {"peer_transport", FN(Engine_peer_transport), KW,
     "peer_transport(session) -> str\n\n"
     "How transfers to the peer travel: \"loop\", \"shm\" or \"tcp\" (known after the first "
     "transfer). Raises kvferry.Error for a peer not used yet."},
    {"__enter__", FN(Engine_enter), METH_NOARGS, NULL},
    {"__exit__", FN(Engine_exit), METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"session_id", (getter)Engine_get_session_id, NULL,
     "This engine's session id (\"ip:port\", with the chosen port), or None when not "
     "initialized.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject kvfpy_EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvferry.TransferEngine",
    .tp_doc = "TransferEngine(*, init_timeout_ms=None, op_timeout_ms=None, lease_ttl_ms=None, "
              "tcp_conns_per_peer=None, tcp_chunk_bytes=None, namespace=None, max_batches=None, "
              "submit_blocks=None, async_threads=None, notify_queue_max=None)\n\n"
              "A kvferry node with the seed's (mf_adapter) TransferEngine methods. The "
              "keyword-only arguments override kvf_config_t defaults. Use as a context manager "
              "to destroy the engine on exit.",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_repr = (reprfunc)Engine_repr,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};
