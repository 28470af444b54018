/*
 * How the module reports failures, below every other file of it: kvferry.Error for the Pythonic
 * extras, and the C library's thread-local last-error message (set through the public
 * kvf_last_error_set()) for the seed's methods, which return int codes.
 */
#include "kvferry_py.h"

#include <stdarg.h>

PyObject *kvfpy_Error;

int kvfpy_errors_add(PyObject *m)
{
    kvfpy_Error = PyErr_NewExceptionWithDoc(
        "kvferry.Error",
        "A kvferry call failed. .code is the negative return code; the message includes "
        "get_last_err_msg().",
        PyExc_RuntimeError, NULL);
    if (!kvfpy_Error)
        return -1;
    Py_INCREF(kvfpy_Error);
    if (PyModule_AddObject(m, "Error", kvfpy_Error) < 0) {
        Py_DECREF(kvfpy_Error);
        return -1;
    }
    return 0;
}

PyObject *kvfpy_raise(int rc)
{
    const char *detail = kvf_last_error();
    PyObject *msg = PyUnicode_FromFormat("%s (%s, %d)%s%s", kvf_strerror(rc), kvf_err_name(rc), rc,
                                         *detail ? ": " : "", detail);
    if (!msg)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(kvfpy_Error, msg);
    Py_DECREF(msg);
    if (!exc)
        return NULL;
    PyObject *code = PyLong_FromLong(rc);
    if (!code || PyObject_SetAttrString(exc, "code", code) < 0) {
        Py_XDECREF(code);
        Py_DECREF(exc);
        return NULL;
    }
    Py_DECREF(code);
    PyErr_SetObject(kvfpy_Error, exc);
    Py_DECREF(exc);
    return NULL;
}

PyObject *kvfpy_fail(int rc, const char *fmt, ...)
{
    char buf[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return PyLong_FromLong(kvf_last_error_set(rc, "%s", buf));
}
