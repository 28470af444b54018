/*
 * kvferry.TransferEngine: the transfer methods, one element or a batch, each as a write or a
 * read: the seed's synchronous ones (transfer_sync_*, batch_transfer_sync_*), run here and waited
 * for with the GIL released, and Mooncake's asynchronous ones (transfer_submit_*,
 * batch_transfer_async_*), which parse the same arguments and are submitted by engine_async.c.
 */
#include "engine.h"

/* Run one batch and wait for it. @spans/@lens come from the caller; @remotes are peer addresses;
 * @msg is a bytes notification or NULL. */
static PyObject *run_batch(EngineObject *self, const char *op_name, kvf_op_t op, const char *peer,
                           kvfpy_span_t *spans, const size_t *lens, const uint64_t *remotes,
                           size_t n, PyObject *msg)
{
    int rc;
    kvf_xfer_t *x = kvfpy_xfers_make(op, spans, lens, remotes, n);
    if (!x)
        return PyErr_NoMemory();
    kvf_engine_t *e = kvfpy_engine_enter(self, op_name, &rc);
    if (e) {
        Py_BEGIN_ALLOW_THREADS
        if (msg)
            rc = kvf_transfer_sync_notify(e, peer, x, n, kvfpy_msg_ptr(msg), kvfpy_msg_len(msg));
        else
            rc = kvf_transfer_sync(e, peer, x, n);
        Py_END_ALLOW_THREADS
        kvfpy_engine_leave(self);
    }
    PyMem_Free(x);
    return PyLong_FromLong(rc);
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
    static const char *const kwlist[] = {"dest_session", "buffer", "peer_buffer_address",
                                         "length",       "notify", NULL};
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
    int rc = kvfpy_notify_get(notify_o, name, "notify", &msg);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return PyLong_FromLong(rc);
    if (kvfpy_span_get(buf, op == KVF_OP_READ ? KVFPY_SPAN_WRITABLE : 0, "buffer", &span) < 0)
        goto out;
    if (kvfpy_span_len(&span, len_o, "buffer", &len) == 0)
        res = async ? kvfpy_engine_submit(self, name, op, sess, &span, &len, &remote, 1, msg)
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
                                         "lengths",      "notify",  NULL};
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
    int rc = kvfpy_notify_get(notify_o, name, "notify", &msg);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return PyLong_FromLong(rc);
    bufs = kvfpy_as_list(bufs_o, "buffers");
    if (!bufs)
        goto out;
    peers = kvfpy_as_list(peers_o, "peer_buffer_addresses");
    if (!peers || kvfpy_check_same_len(bufs, "buffers", peers, "peer_buffer_addresses") < 0)
        goto out;
    if (lens_o != Py_None) {
        lens_seq = kvfpy_as_list(lens_o, "lengths");
        if (!lens_seq || kvfpy_check_same_len(bufs, "buffers", lens_seq, "lengths") < 0)
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
    if (kvfpy_spans_from_lists(bufs, lens_seq, op == KVF_OP_READ ? KVFPY_SPAN_WRITABLE : 0,
                               "buffers", &spans, &lens) < 0)
        goto out;
    res = async ? kvfpy_engine_submit(self, name, op, sess, spans, lens, remotes, (size_t)n, msg)
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

/* One method per operation and mode: the seed's synchronous ones, and the asynchronous ones
 * (Mooncake's names), which return a batch id for engine_async.c's methods. */
#define TRANSFER_METHOD(name, body, op, async)                                                    \
    PyObject *kvfpy_engine_##name(EngineObject *self, PyObject *a, PyObject *k)                   \
    {                                                                                              \
        return body(self, a, k, op, async);                                                        \
    }

TRANSFER_METHOD(transfer_sync_write, transfer_one, KVF_OP_WRITE, 0)
TRANSFER_METHOD(transfer_sync_read, transfer_one, KVF_OP_READ, 0)
TRANSFER_METHOD(batch_transfer_sync_write, transfer_batch, KVF_OP_WRITE, 0)
TRANSFER_METHOD(batch_transfer_sync_read, transfer_batch, KVF_OP_READ, 0)
TRANSFER_METHOD(transfer_submit_write, transfer_one, KVF_OP_WRITE, 1)
TRANSFER_METHOD(transfer_submit_read, transfer_one, KVF_OP_READ, 1)
TRANSFER_METHOD(batch_transfer_async_write, transfer_batch, KVF_OP_WRITE, 1)
TRANSFER_METHOD(batch_transfer_async_read, transfer_batch, KVF_OP_READ, 1)
