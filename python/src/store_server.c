/*
 * kvferry.StoreServer: the built-in config store running inside this process, as the seed's
 * create_config_store() starts it, but as an object with the URL it actually listens on (so
 * that port 0 is usable) and a stop().
 */
#include "kvferry_py.h"

typedef struct {
    PyObject_HEAD
    kvf_store_server_t *srv;
    PyObject *url; /* str, kept after stop() for messages */
} StoreServerObject;

int kvfpy_store_server_start(const char *url, const char *auth_key_file, PyObject **out)
{
    kvf_store_server_t *srv = NULL;
    kvf_store_server_opts_t so;
    int rc;

    kvf_store_server_opts_init(&so);
    so.auth_key_file = auth_key_file;
    so.tls = kvfpy_tls_opts();
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_store_server_start_opts(url, &so, &srv);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return rc;
    StoreServerObject *self = PyObject_New(StoreServerObject, &kvfpy_StoreServerType);
    if (!self) {
        kvf_store_server_stop(srv);
        return KVFPY_PYERR;
    }
    self->srv = srv;
    self->url = PyUnicode_FromString(kvf_store_server_url(srv));
    if (!self->url) {
        Py_DECREF(self);
        return KVFPY_PYERR;
    }
    *out = (PyObject *)self;
    return 0;
}

static PyObject *StoreServer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"url", "auth_key_file", NULL};
    PyObject *url_o = NULL, *key_o = NULL, *out = NULL;
    const char *url = "tcp://127.0.0.1:0", *key = NULL;

    if (type != &kvfpy_StoreServerType) {
        PyErr_SetString(PyExc_TypeError, "kvferry.StoreServer cannot be subclassed");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O$O:StoreServer", (char **)kwlist, &url_o,
                                     &key_o))
        return NULL;
    if (url_o && url_o != Py_None && kvfpy_str(url_o, "url", &url) < 0)
        return NULL;
    if (key_o && key_o != Py_None && kvfpy_str(key_o, "auth_key_file", &key) < 0)
        return NULL;
    int rc = kvfpy_store_server_start(url, key, &out);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return kvfpy_raise(rc);
    return out;
}

static void server_stop(StoreServerObject *self)
{
    kvf_store_server_t *srv = self->srv;
    self->srv = NULL; /* under the GIL: nobody else can see it any more */
    if (srv) {
        Py_BEGIN_ALLOW_THREADS
        kvf_store_server_stop(srv);
        Py_END_ALLOW_THREADS
    }
}

static void StoreServer_dealloc(StoreServerObject *self)
{
    server_stop(self);
    Py_XDECREF(self->url);
    PyObject_Free(self);
}

static PyObject *StoreServer_stop(StoreServerObject *self, PyObject *unused)
{
    server_stop(self);
    Py_RETURN_NONE;
}

static PyObject *StoreServer_get_url(StoreServerObject *self, void *closure)
{
    Py_INCREF(self->url);
    return self->url;
}

static PyObject *StoreServer_get_running(StoreServerObject *self, void *closure)
{
    return PyBool_FromLong(self->srv != NULL);
}

static PyObject *StoreServer_enter(StoreServerObject *self, PyObject *unused)
{
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *StoreServer_exit(StoreServerObject *self, PyObject *args)
{
    server_stop(self);
    Py_RETURN_FALSE;
}

static PyObject *StoreServer_repr(StoreServerObject *self)
{
    return PyUnicode_FromFormat("<kvferry.StoreServer %U%s>", self->url,
                                self->srv ? "" : " (stopped)");
}

static PyMethodDef StoreServer_methods[] = {
    {"stop", (PyCFunction)StoreServer_stop, METH_NOARGS,
     "stop($self, /)\n--\n\n-> None\n\nStop serving and close every client connection "
     "(idempotent)."},
    {"__enter__", (PyCFunction)StoreServer_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)StoreServer_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef StoreServer_getset[] = {
    {"url", (getter)StoreServer_get_url, NULL,
     "The URL the server listens on, with the chosen port (\"tcp://127.0.0.1:40123\").", NULL},
    {"running", (getter)StoreServer_get_running, NULL, "False after stop().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject kvfpy_StoreServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvferry.StoreServer",
    .tp_doc = "StoreServer(url=\"tcp://127.0.0.1:0\")\n--\n\n"
              "Run the built-in config store in this process until stop() or until the object "
              "is freed. Port 0 picks a free port (read .url). Raises kvferry.Error on failure.",
    .tp_basicsize = sizeof(StoreServerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = StoreServer_new,
    .tp_dealloc = (destructor)StoreServer_dealloc,
    .tp_repr = (reprfunc)StoreServer_repr,
    .tp_methods = StoreServer_methods,
    .tp_getset = StoreServer_getset,
};
