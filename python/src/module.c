/*
 * The module kvferry._kvferry: the seed's module functions (create_config_store, set_log_level,
 * set_conf_store_tls and set_conf_store_tls_key (tls.c), get_last_err_msg), kvferry.Error (errors.c) and the types. The package
 * kvferry/__init__.py re-exports all of it. The top of the module's files: it assembles the
 * others and nothing calls it.
 */
#include "kvferry_py.h"

#include <string.h>

/* Config stores started by create_config_store(): a list of StoreServer objects that lives as
 * long as the module, as the seed's in-process store lives as long as its process. */
static PyObject *config_stores;

static PyObject *mod_create_config_store(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"store_url", "auth_key_file", NULL};
    PyObject *url_o, *key_o = NULL, *srv = NULL;
    const char *url, *key = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$O:create_config_store", (char **)kwlist,
                                     &url_o, &key_o) ||
        kvfpy_str(url_o, "store_url", &url) < 0)
        return NULL;
    if (key_o && key_o != Py_None && kvfpy_str(key_o, "auth_key_file", &key) < 0)
        return NULL;
    const char *scheme = NULL;
    int rc = kvf_store_url_parse(url, &scheme, NULL, 0, NULL);
    if (rc == 0 && strcmp(scheme, "tcp") != 0) {
        /* etcd and Redis run on their own: check that one answers, start nothing. */
        kvf_store_t *st = NULL;
        kvf_store_opts_t so;
        kvf_store_opts_init(&so);
        so.tls = kvfpy_tls_opts();
        Py_BEGIN_ALLOW_THREADS
        rc = kvf_store_open(url, &so, &st);
        if (rc == 0)
            rc = kvf_store_ping(st);
        kvf_store_close(st);
        Py_END_ALLOW_THREADS
        return PyLong_FromLong(rc);
    }
    rc = kvfpy_store_server_start(url, key, &srv);
    if (rc == KVFPY_PYERR)
        return NULL;
    if (rc < 0)
        return PyLong_FromLong(rc);
    rc = PyList_Append(config_stores, srv);
    Py_DECREF(srv);
    if (rc < 0)
        return NULL;
    return PyLong_FromLong(0);
}

static PyObject *mod_set_log_level(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"level", NULL};
    PyObject *lv_o;
    int level;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:set_log_level", (char **)kwlist, &lv_o) ||
        kvfpy_int(lv_o, "level", &level) < 0)
        return NULL;
    return PyLong_FromLong(kvf_log_set_level(level));
}

static PyObject *mod_get_last_err_msg(PyObject *mod, PyObject *unused)
{
    return PyUnicode_FromString(kvf_last_error());
}

static PyObject *mod_strerror(PyObject *mod, PyObject *arg)
{
    int code;
    if (kvfpy_int(arg, "code", &code) < 0)
        return NULL;
    return PyUnicode_FromString(kvf_strerror(code));
}

static PyObject *mod_err_name(PyObject *mod, PyObject *arg)
{
    int code;
    if (kvfpy_int(arg, "code", &code) < 0)
        return NULL;
    return PyUnicode_FromString(kvf_err_name(code));
}

#define KW    (METH_VARARGS | METH_KEYWORDS)
#define FN(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef module_methods[] = {
    {"create_config_store", FN(mod_create_config_store), KW,
     "create_config_store($module, store_url, *, auth_key_file=None)\n--\n\n-> int\n\n"
     "Start the built-in config store in this process, listening on store_url "
     "(\"tcp://ip:port\"); it runs until the process exits. For \"etcd://...\" and "
     "\"redis://...\" URLs nothing is started: it checks that the store answers. Returns 0 or a "
     "negative code."},
    {"set_log_level", FN(mod_set_log_level), KW,
     "set_log_level($module, level)\n--\n\n-> int\n\nProcess-wide log level: 0 debug, 1 info, 2 "
     "warn, 3 error. Returns 0 or a negative code."},
    {"set_conf_store_tls", FN(kvfpy_set_conf_store_tls), KW,
     "set_conf_store_tls($module, enable, tls_info)\n--\n\n-> int\n\n"
     "TLS 1.3 for this process's config store connections: every later "
     "TransferEngine.initialize(), create_config_store() and Store() uses it. tls_info is the "
     "upstream string \"tlsCaPath: DIR; tlsCaFile: a.pem,b.pem; tlsCert: F; tlsPk: F; "
     "tlsPkPwd: F; tlsCrlPath: DIR; tlsCrlFile: c.pem\" (file names relative to their "
     "directory; no path may contain ';', ',' or ':'). enable=False: plain TCP. Returns 0 or a "
     "negative code (the message names the value or file)."},
    {"set_conf_store_tls_key", FN(kvfpy_set_conf_store_tls_key), KW,
     "set_conf_store_tls_key($module, tls_pk, tls_pk_pw=None, py_decrypt_func=None)\n--\n\n"
     "-> int\n\nThe private key for TLS: tls_pk is its PEM text (or the name of its file), "
     "tls_pk_pw its password, first passed through py_decrypt_func(str) -> str when given. "
     "Returns 0 or a negative code."},
    {"get_last_err_msg", FN(mod_get_last_err_msg), METH_NOARGS,
     "get_last_err_msg($module, /)\n--\n\n-> str\n\nDetail of the last failure of a kvferry call "
     "on this thread (\"\" if none)."},
    {"strerror", FN(mod_strerror), METH_O,
     "strerror($module, code)\n--\n\n-> str\n\nText of a return code (\"not found\")."},
    {"err_name", FN(mod_err_name), METH_O,
     "err_name($module, code)\n--\n\n-> str\n\nSymbolic name of a return code "
     "(\"KVF_ENOTFOUND\")."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvferry._kvferry",
    .m_doc = "kvferry's C extension; import it as `kvferry`.",
    .m_size = -1,
    .m_methods = module_methods,
};

static int add_type(PyObject *m, PyTypeObject *t, const char *name)
{
    if (PyType_Ready(t) < 0)
        return -1;
    Py_INCREF(t);
    if (PyModule_AddObject(m, name, (PyObject *)t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__kvferry(void)
{
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    if (add_type(m, &kvfpy_EngineType, "TransferEngine") < 0 ||
        add_type(m, &kvfpy_StoreType, "Store") < 0 ||
        add_type(m, &kvfpy_StoreServerType, "StoreServer") < 0)
        goto out_err;

    if (kvfpy_errors_add(m) < 0)
        goto out_err;

    config_stores = PyList_New(0);
    if (!config_stores)
        goto out_err;
    Py_INCREF(config_stores);
    if (PyModule_AddObject(m, "_config_stores", config_stores) < 0) {
        Py_DECREF(config_stores);
        goto out_err;
    }

    if (PyModule_AddStringConstant(m, "__version__", KVF_VERSION_STRING) < 0 ||
        PyModule_AddIntConstant(m, "KVF_OK", 0) < 0 ||
        PyModule_AddIntConstant(m, "KVF_ERRNO_OFFSET", KVF_ERRNO_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "KVF_NOTIFY_MAX", KVF_NOTIFY_MAX) < 0 ||
        PyModule_AddIntConstant(m, "KVF_BATCH_PENDING", KVF_BATCH_PENDING) < 0 ||
        PyModule_AddIntConstant(m, "KVF_BATCH_DONE", KVF_BATCH_DONE) < 0 ||
        PyModule_AddIntConstant(m, "KVF_XFER_PENDING", KVF_XFER_PENDING) < 0)
        goto out_err;
#define ADD_ERR(name, off, msg)                                                                    \
    if (PyModule_AddIntConstant(m, "KVF_" #name, KVF_##name) < 0)                                  \
        goto out_err;
    KVF_ERRNO_MAP(ADD_ERR)
#undef ADD_ERR
    return m;

out_err:
    Py_DECREF(m);
    return NULL;
}
