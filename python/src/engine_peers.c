/*
 * kvferry.TransferEngine: peers: waiting for one to be up, the joined/left events, the regions a
 * peer has registered and the transport that reaches it.
 */
#include "engine.h"

#include <time.h>

/* Milliseconds on the monotonic clock, for get_peer_events()'s slices. */
static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

PyObject *kvfpy_engine_wait_for_peer(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"session_id", "timeout", NULL};
    PyObject *sess_o, *to_o = Py_None;
    const char *sess;
    int rc, ms;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:wait_for_peer", (char **)kwlist, &sess_o,
                                     &to_o) ||
        kvfpy_str(sess_o, "session_id", &sess) < 0 ||
        kvfpy_timeout_get(
            to_o, "timeout",
            (int)(self->cfg.init_timeout_ms > INT_MAX ? INT_MAX : self->cfg.init_timeout_ms),
            &ms) < 0)
        return NULL;
    kvf_engine_t *e = kvfpy_engine_enter(self, "wait_for_peer", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_peer_wait(e, sess, (uint32_t)ms);
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    return PyLong_FromLong(rc);
}

PyObject *kvfpy_engine_check_peer(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"session_id", NULL};
    PyObject *sess_o;
    const char *sess;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:check_peer", (char **)kwlist, &sess_o) ||
        kvfpy_str(sess_o, "session_id", &sess) < 0)
        return NULL;
    kvf_engine_t *e = kvfpy_engine_enter(self, "check_peer", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_peer_check(e, sess);
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    return PyLong_FromLong(rc);
}

#define PEER_CHUNK 64
/* kvf_peer_events() is not promised to return on kvf_engine_shutdown(), so a long wait is made
 * of slices this long, between which destroy() is noticed. */
#define PEER_SLICE_MS 200

PyObject *kvfpy_engine_get_peer_events(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"timeout", NULL};
    PyObject *to_o = NULL, *list = NULL;
    kvf_peer_event_t *ev;
    int rc, ms, n;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:get_peer_events", (char **)kwlist, &to_o))
        return NULL;
    ms = 0; /* the default: take what is there */
    if (to_o && kvfpy_timeout_get(to_o, "timeout", -1, &ms) < 0)
        return NULL;
    kvf_engine_t *e = kvfpy_engine_enter(self, "get_peer_events", &rc);
    if (!e)
        return kvfpy_raise(rc);
    ev = PyMem_RawMalloc(PEER_CHUNK * sizeof(*ev));
    if (!ev) {
        kvfpy_engine_leave(self);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    uint64_t deadline = ms < 0 ? UINT64_MAX : now_ms() + (uint64_t)ms;
    for (;;) {
        uint64_t now = now_ms();
        int slice =
            ms < 0 || deadline - now > PEER_SLICE_MS ? PEER_SLICE_MS : (int)(deadline - now);
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
            PyObject *t =
                Py_BuildValue("(ss)", ev[i].type == KVF_PEER_JOINED ? "joined" : "left", ev[i].sid);
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
    kvfpy_engine_leave(self);
    PyMem_RawFree(ev);
    return list;
}

PyObject *kvfpy_engine_peer_regions(EngineObject *self, PyObject *args, PyObject *kwds)
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
    kvf_engine_t *e = kvfpy_engine_enter(self, "peer_regions", &rc);
    if (!e)
        return kvfpy_raise(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_peer_regions(e, sess, &r, &n);
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
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

PyObject *kvfpy_engine_peer_transport(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"session", NULL};
    PyObject *sess_o;
    const char *sess, *name = NULL;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:peer_transport", (char **)kwlist, &sess_o) ||
        kvfpy_str(sess_o, "session", &sess) < 0)
        return NULL;
    kvf_engine_t *e = kvfpy_engine_enter(self, "peer_transport", &rc);
    if (!e)
        return kvfpy_raise(rc);
    rc = kvf_engine_peer_transport(e, sess, &name);
    kvfpy_engine_leave(self);
    if (rc < 0)
        return kvfpy_raise(rc);
    return PyUnicode_FromString(name);
}

/* get_stats(): the C snapshot rendered as JSON by the library and read back with the json module,
 * so that the dict has exactly the shape docs/operations.md gives for `kvferry info --json`. */
PyObject *kvfpy_engine_get_stats(EngineObject *self, PyObject *unused)
{
    (void)unused;
    int rc;
    kvf_stats_t st;
    char *text = NULL;
    size_t len = 0;
    kvf_engine_t *e = kvfpy_engine_enter(self, "get_stats", &rc);
    if (!e)
        return kvfpy_raise(rc);
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_engine_stats(e, &st);
    if (rc == 0) {
        rc = kvf_stats_json(&st, &text, &len);
        kvf_stats_free(&st);
    }
    Py_END_ALLOW_THREADS
    kvfpy_engine_leave(self);
    if (rc < 0)
        return kvfpy_raise(rc);
    PyObject *json = PyImport_ImportModule("json");
    PyObject *out = json ? PyObject_CallMethod(json, "loads", "s#", text, (Py_ssize_t)len) : NULL;
    Py_XDECREF(json);
    free(text);
    return out;
}

PyObject *kvfpy_engine_metrics_address(EngineObject *self, PyObject *unused)
{
    (void)unused;
    int rc;
    kvf_engine_t *e = kvfpy_engine_enter(self, "metrics_address", &rc);
    if (!e)
        return kvfpy_raise(rc);
    const char *a = kvf_engine_metrics_addr(e);
    PyObject *out = a[0] ? PyUnicode_FromString(a) : Py_NewRef(Py_None);
    kvfpy_engine_leave(self);
    return out;
}
