/*
 * kvferry.TransferEngine: notifications, the short messages a target takes only after every byte
 * of the batch that carried them is in its memory: the notify= argument of the transfers,
 * send_notification, get_notifications and wait_notification.
 */
#include "engine.h"

/* ---- notification messages ------------------------------------------------------------------ */

/*
 * The notify= argument of the transfer methods: None (no notification), a bytes-like object or a
 * str (sent as UTF-8). On success *msg is a new bytes object holding a copy (so that a bytearray
 * changed after the call does not change the message), or NULL for None, and 0 is returned. A
 * message over KVF_NOTIFY_MAX returns -KVF_ETOOBIG with a message naming the limit; a wrong type
 * returns KVFPY_PYERR with a TypeError set.
 */
int kvfpy_notify_get(PyObject *obj, const char *op, const char *what, PyObject **msg)
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

/* ---- notifications --------------------------------------------------------------------------- */

PyObject *kvfpy_engine_send_notification(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"dest_session", "message", NULL};
    const char *op = "send_notification";
    PyObject *sess_o, *msg_o, *msg = NULL;
    const char *sess;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:send_notification", (char **)kwlist, &sess_o,
                                     &msg_o) ||
        kvfpy_str(sess_o, "dest_session", &sess) < 0)
        return NULL;
    if (msg_o == Py_None) {
        PyErr_SetString(PyExc_TypeError, "message must be bytes-like or a str, not None");
        return NULL;
    }
    rc = kvfpy_notify_get(msg_o, op, "message", &msg);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return PyLong_FromLong(rc);
    kvf_engine_t *e = kvfpy_engine_enter(self, op, &rc);
    if (e) {
        Py_BEGIN_ALLOW_THREADS
        rc = kvf_notify_send(e, sess, kvfpy_msg_ptr(msg), kvfpy_msg_len(msg));
        Py_END_ALLOW_THREADS
        kvfpy_engine_leave(self);
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
static PyObject *notify_take(EngineObject *self, const char *op, int wait, int timeout_ms,
                             const char *peer)
{
    PyObject *list = NULL;
    int rc, n;

    kvf_engine_t *e = kvfpy_engine_enter(self, op, &rc);
    if (!e)
        return kvfpy_raise(rc);
    kvf_notify_t *buf = PyMem_RawMalloc(NOTIFY_CHUNK * sizeof(*buf));
    if (!buf) {
        kvfpy_engine_leave(self);
        return PyErr_NoMemory();
    }
    list = PyList_New(0);
    for (int round = 0; list; round++) {
        if (round == 0 && wait) {
            Py_BEGIN_ALLOW_THREADS
            n = peer ? kvf_notify_wait_peer(e, peer, buf, NOTIFY_CHUNK, timeout_ms)
                     : kvf_notify_wait(e, buf, NOTIFY_CHUNK, timeout_ms);
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
                PyUnicode_DecodeUTF8(buf[i].sender,
                                     (Py_ssize_t)strnlen(buf[i].sender, sizeof(buf[i].sender)),
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
    kvfpy_engine_leave(self);
    PyMem_RawFree(buf);
    return list;
}

PyObject *kvfpy_engine_get_notifications(EngineObject *self, PyObject *unused)
{
    return notify_take(self, "get_notifications", 0, 0, NULL);
}

PyObject *kvfpy_engine_wait_notification(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"timeout", "peer", NULL};
    PyObject *to_o = Py_None, *peer_o = Py_None;
    const char *peer = NULL;
    int ms;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO:wait_notification", (char **)kwlist, &to_o,
                                     &peer_o) ||
        kvfpy_timeout_get(to_o, "timeout", -1, &ms) < 0 ||
        (peer_o != Py_None && kvfpy_str(peer_o, "peer", &peer) < 0))
        return NULL;
    return notify_take(self, "wait_notification", 1, ms, peer);
}
