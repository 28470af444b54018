/*
 * kvferry.TransferEngine: the seed's (mf_adapter) TransferEngine over kvf_engine_t.
 *
 * The seed's methods keep its names, argument order and int return codes, so that porting is an
 * import change. Objects registered by reference (numpy arrays, bytearrays, tensors) are kept
 * alive by the engine until they are unregistered or the engine is destroyed: a peer may write
 * into registered memory at any time, so it must not be freed under it.
 */
#include "kvferry_py.h"

typedef struct {
    PyObject_HEAD
    kvfpy_guard_t guard; /* holds the kvf_engine_t */
    int guard_ok;        /* the guard was initialised (tp_new may fail before) */
    kvf_config_t cfg;
    char ns[65];
    /* Registration pins: address (int) -> object keeping that memory alive. Touched only with
     * the GIL held. */
    PyObject *pins;
} EngineObject;

/* ---- reaching the C engine ------------------------------------------------------------------ */

/* The engine with one more user, or NULL after setting the last-error message and *rc. */
static kvf_engine_t *engine_enter(EngineObject *self, const char *op, int *rc)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    if (e)
        return e;
    if (kvfpy_guard_was_closed(&self->guard))
        *rc = kvf__err(-KVF_ECLOSED,
                       "%s: the engine has been destroyed (call initialize() "
                       "again to start a new one)",
                       op);
    else
        *rc = kvf__err(-KVF_EINVAL,
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

/* Destroy the C engine (if any) without the GIL, then drop the pins: only once the engine has
 * stopped serving may the registered memory go. */
static void engine_close(EngineObject *self)
{
    kvf_engine_t *e;

    Py_BEGIN_ALLOW_THREADS
    e = kvfpy_guard_take(&self->guard, engine_shutdown);
    kvf_engine_destroy(e);
    Py_END_ALLOW_THREADS
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
    PyObject *v[6] = {NULL, NULL, NULL, NULL, NULL, NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOOOOO:TransferEngine", (char **)config_kwlist,
                                     &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]))
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
        config_u32(v[4], "tcp_chunk_bytes", &self->cfg.tcp_chunk_bytes) < 0)
        return -1;
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

/* Run one batch. @spans/@lens come from the caller; @remotes are peer addresses. */
static PyObject *run_batch(EngineObject *self, const char *op_name, kvf_op_t op, const char *peer,
                           kvfpy_span_t *spans, const size_t *lens, const uint64_t *remotes,
                           size_t n)
{
    int rc;
    kvf_xfer_t *x = PyMem_Malloc((n ? n : 1) * sizeof(*x));
    if (!x)
        return PyErr_NoMemory();
    for (size_t i = 0; i < n; i++)
        x[i] = (kvf_xfer_t){.op = op, .local = spans[i].addr, .remote = remotes[i], .len = lens[i]};
    kvf_engine_t *e = engine_enter(self, op_name, &rc);
    if (e) {
        Py_BEGIN_ALLOW_THREADS
        rc = kvf_transfer_sync(e, peer, x, n);
        Py_END_ALLOW_THREADS
        engine_leave(self);
    }
    PyMem_Free(x);
    return PyLong_FromLong(rc);
}

static PyObject *transfer_one(EngineObject *self, PyObject *args, PyObject *kwds, kvf_op_t op)
{
    static const char *const kwlist[] = {"dest_session", "buffer", "peer_buffer_address", "length",
                                         NULL};
    const char *name = op == KVF_OP_WRITE ? "transfer_sync_write" : "transfer_sync_read";
    PyObject *sess_o, *buf, *peer_o, *len_o = Py_None, *res = NULL;
    const char *sess;
    kvfpy_span_t span;
    uint64_t remote;
    size_t len;
    char fmt[64];

    snprintf(fmt, sizeof(fmt), "OOO|O:%s", name);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, fmt, (char **)kwlist, &sess_o, &buf, &peer_o,
                                     &len_o))
        return NULL;
    if (kvfpy_str(sess_o, "dest_session", &sess) < 0 ||
        kvfpy_u64(peer_o, "peer_buffer_address", &remote) < 0)
        return NULL;
    if (kvfpy_span_get(buf, op == KVF_OP_READ ? KVFPY_SPAN_WRITABLE : 0, "buffer", &span) < 0)
        return NULL;
    if (kvfpy_span_len(&span, len_o, "buffer", &len) == 0)
        res = run_batch(self, name, op, sess, &span, &len, &remote, 1);
    kvfpy_span_release(&span);
    return res;
}

static PyObject *transfer_batch(EngineObject *self, PyObject *args, PyObject *kwds, kvf_op_t op)
{
    static const char *const kwlist[] = {"dest_session", "buffers", "peer_buffer_addresses",
                                         "lengths", NULL};
    const char *name =
        op == KVF_OP_WRITE ? "batch_transfer_sync_write" : "batch_transfer_sync_read";
    PyObject *sess_o, *bufs_o, *peers_o, *lens_o = Py_None;
    PyObject *bufs = NULL, *peers = NULL, *lens_seq = NULL, *res = NULL;
    kvfpy_span_t *spans = NULL;
    size_t *lens = NULL;
    uint64_t *remotes = NULL;
    const char *sess;
    char fmt[64], what[64];
    Py_ssize_t n = 0;

    snprintf(fmt, sizeof(fmt), "OOO|O:%s", name);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, fmt, (char **)kwlist, &sess_o, &bufs_o, &peers_o,
                                     &lens_o))
        return NULL;
    if (kvfpy_str(sess_o, "dest_session", &sess) < 0)
        return NULL;
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
    res = run_batch(self, name, op, sess, spans, lens, remotes, (size_t)n);
    for (Py_ssize_t i = 0; i < n; i++)
        kvfpy_span_release(&spans[i]);
out:
    PyMem_Free(spans);
    PyMem_Free(lens);
    PyMem_Free(remotes);
    Py_XDECREF(bufs);
    Py_XDECREF(peers);
    Py_XDECREF(lens_seq);
    return res;
}

static PyObject *Engine_transfer_sync_write(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_one(self, a, k, KVF_OP_WRITE);
}

static PyObject *Engine_transfer_sync_read(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_one(self, a, k, KVF_OP_READ);
}

static PyObject *Engine_batch_transfer_sync_write(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_batch(self, a, k, KVF_OP_WRITE);
}

static PyObject *Engine_batch_transfer_sync_read(EngineObject *self, PyObject *a, PyObject *k)
{
    return transfer_batch(self, a, k, KVF_OP_READ);
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
    {"destroy", FN(Engine_destroy), METH_NOARGS,
     "destroy() -> int\n\nWithdraw the session, close connections and free the engine (waiting "
     "for transfers still running on other threads). Returns 0; a no-op when not initialized."},
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
              "tcp_conns_per_peer=None, tcp_chunk_bytes=None, namespace=None)\n\n"
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
