/*
 * Python arguments to C values. Everything a user can get wrong about types is caught here, with
 * the argument named, before a C call is made; values only C can judge (a range outside every
 * region, an unknown session) are left to C, which answers with a code and a message.
 */
#include "kvferry_py.h"

#define SPAN_KINDS                                                                                 \
    "an int address, an object with the buffer protocol (numpy array, bytearray) "                 \
    "or a tensor with data_ptr() and nbytes"

int kvfpy_u64(PyObject *obj, const char *what, uint64_t *out)
{
    PyObject *num;
    int overflow;

    /* bool is an int subclass, but True as an address or a size is a bug in the caller. */
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    num = PyNumber_Index(obj);
    if (!num)
        return -1;
    long long v = PyLong_AsLongLongAndOverflow(num, &overflow);
    if (v == -1 && PyErr_Occurred())
        goto out_err;
    if (overflow < 0 || (overflow == 0 && v < 0)) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative, got %S", what, num);
        goto out_err;
    }
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(num);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError, "%s does not fit in 64 bits: %S", what, num);
            goto out_err;
        }
        *out = u;
    } else {
        *out = (uint64_t)v;
    }
    Py_DECREF(num);
    return 0;
out_err:
    Py_DECREF(num);
    return -1;
}

int kvfpy_int(PyObject *obj, const char *what, int *out)
{
    int overflow;

    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *num = PyNumber_Index(obj);
    if (!num)
        return -1;
    long v = PyLong_AsLongAndOverflow(num, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        Py_DECREF(num);
        return -1;
    }
    if (overflow || v < INT_MIN || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s is out of range: %S", what, num);
        Py_DECREF(num);
        return -1;
    }
    Py_DECREF(num);
    *out = (int)v;
    return 0;
}

int kvfpy_str(PyObject *obj, const char *what, const char **out)
{
    Py_ssize_t n;

    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.100s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
    if (!s)
        return -1;
    if ((size_t)n != strlen(s)) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", what);
        return -1;
    }
    *out = s;
    return 0;
}

/* Call obj.name() and return the result, or NULL with an exception set. */
static PyObject *call_method0(PyObject *obj, const char *name)
{
    return PyObject_CallMethod(obj, name, NULL);
}

/*
 * A torch tensor (or anything shaped like one): data_ptr() gives the address, nbytes the size.
 * Device memory and non-contiguous views are refused by name: their data_ptr() is not a range
 * of host memory holding the tensor's bytes.
 */
static int span_from_tensor(PyObject *obj, const char *what, kvfpy_span_t *s)
{
    PyObject *v;
    uint64_t addr, nbytes;

    if (PyObject_HasAttrString(obj, "device")) {
        PyObject *dev = PyObject_GetAttrString(obj, "device");
        PyObject *type = dev ? PyObject_GetAttrString(dev, "type") : NULL;
        Py_XDECREF(dev);
        if (!type)
            return -1;
        int is_cpu = PyUnicode_Check(type) && PyUnicode_CompareWithASCIIString(type, "cpu") == 0;
        if (!is_cpu) {
            PyErr_Format(PyExc_ValueError,
                         "%s is a tensor on device '%S': kvferry moves host "
                         "memory only (use .cpu())",
                         what, type);
            Py_DECREF(type);
            return -1;
        }
        Py_DECREF(type);
    }
    if (PyObject_HasAttrString(obj, "is_contiguous")) {
        v = call_method0(obj, "is_contiguous");
        if (!v)
            return -1;
        int contiguous = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (contiguous < 0)
            return -1;
        if (!contiguous) {
            PyErr_Format(PyExc_ValueError,
                         "%s is not contiguous: its bytes are not one range "
                         "(use .contiguous())",
                         what);
            return -1;
        }
    }
    v = call_method0(obj, "data_ptr");
    if (!v)
        return -1;
    int rc = kvfpy_u64(v, "data_ptr()", &addr);
    Py_DECREF(v);
    if (rc < 0)
        return -1;

    if (PyObject_HasAttrString(obj, "nbytes")) {
        v = PyObject_GetAttrString(obj, "nbytes");
    } else {
        /* Older torch: element_size() * numel(). */
        PyObject *es = call_method0(obj, "element_size");
        PyObject *ne = es ? call_method0(obj, "numel") : NULL;
        v = ne ? PyNumber_Multiply(es, ne) : NULL;
        Py_XDECREF(es);
        Py_XDECREF(ne);
    }
    if (!v)
        return -1;
    rc = kvfpy_u64(v, "nbytes", &nbytes);
    Py_DECREF(v);
    if (rc < 0)
        return -1;

    s->addr = (char *)(uintptr_t)addr;
    s->len = (size_t)nbytes;
    s->sized = 1;
    Py_INCREF(obj);
    s->owner = obj;
    return 0;
}

static int span_from_buffer(PyObject *obj, unsigned flags, const char *what, kvfpy_span_t *s)
{
    int want = PyBUF_ANY_CONTIGUOUS | ((flags & KVFPY_SPAN_WRITABLE) ? PyBUF_WRITABLE : 0);

    if (PyObject_GetBuffer(obj, &s->view, want) == 0) {
        s->has_view = 1;
        s->addr = s->view.buf;
        s->len = (size_t)s->view.len;
        s->sized = 1;
        return 0;
    }
    /* Say which requirement failed; the exporter's own message is often generic. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *value = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    Py_buffer probe;
    if ((flags & KVFPY_SPAN_WRITABLE) &&
        PyObject_GetBuffer(obj, &probe, PyBUF_ANY_CONTIGUOUS) == 0) {
        PyBuffer_Release(&probe);
        PyErr_Format(PyExc_TypeError,
                     "%s is a read-only %.100s; this call writes into it, so "
                     "it needs writable memory",
                     what, Py_TYPE(obj)->tp_name);
    } else {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "%s (%.100s) cannot be used as one contiguous range of "
                     "memory: %S",
                     what, Py_TYPE(obj)->tp_name, value ? value : Py_None);
    }
    Py_XDECREF(value);
    return -1;
}

int kvfpy_span_get(PyObject *obj, unsigned flags, const char *what, kvfpy_span_t *s)
{
    memset(s, 0, sizeof(*s));

    /* Order matters: a one-element integer tensor also has __index__, and a numpy integer scalar
     * also exports a buffer; both are meant as what they look like first. */
    if (PyLong_Check(obj) && !PyBool_Check(obj)) {
        uint64_t a;
        if (kvfpy_u64(obj, what, &a) < 0)
            return -1;
        s->addr = (char *)(uintptr_t)a;
        return 0;
    }
    if (PyObject_HasAttrString(obj, "data_ptr"))
        return span_from_tensor(obj, what, s);
    if (PyIndex_Check(obj) && !PyBool_Check(obj)) {
        uint64_t a;
        if (kvfpy_u64(obj, what, &a) == 0) {
            s->addr = (char *)(uintptr_t)a;
            return 0;
        }
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return -1;
        PyErr_Clear(); /* e.g. a numpy array: __index__ exists but refuses; try its buffer */
    }
    if (PyObject_CheckBuffer(obj))
        return span_from_buffer(obj, (flags & KVFPY_SPAN_ADDR_ONLY) ? 0 : flags, what, s);
    PyErr_Format(PyExc_TypeError, "%s must be " SPAN_KINDS ", not %.100s", what,
                 Py_TYPE(obj)->tp_name);
    return -1;
}

void kvfpy_span_release(kvfpy_span_t *s)
{
    if (s->has_view) {
        PyBuffer_Release(&s->view);
        s->has_view = 0;
    }
    Py_CLEAR(s->owner);
}

int kvfpy_span_len(const kvfpy_span_t *s, PyObject *length_obj, const char *what, size_t *out)
{
    uint64_t n;

    if (!length_obj || length_obj == Py_None) {
        if (!s->sized) {
            PyErr_Format(PyExc_TypeError, "a length is required when %s is an int address", what);
            return -1;
        }
        *out = s->len;
        return 0;
    }
    if (kvfpy_u64(length_obj, "length", &n) < 0)
        return -1;
    if (n > SIZE_MAX || (s->sized && n > s->len)) {
        PyErr_Format(PyExc_ValueError, "length %llu exceeds the %zu bytes of %s",
                     (unsigned long long)n, s->len, what);
        return -1;
    }
    *out = (size_t)n;
    return 0;
}

/* ---- pins: what keeps registered objects alive ----------------------------------------------- */

#define PIN_CAPSULE "kvferry.pin"

static void pin_destroy(PyObject *capsule)
{
    Py_buffer *view = PyCapsule_GetPointer(capsule, PIN_CAPSULE);
    if (view) {
        PyBuffer_Release(view);
        PyMem_Free(view);
    }
}

PyObject *kvfpy_span_pin(kvfpy_span_t *s)
{
    if (s->owner) {
        PyObject *o = s->owner;
        s->owner = NULL;
        return o;
    }
    if (!s->has_view)
        Py_RETURN_NONE;
    Py_buffer *view = PyMem_Malloc(sizeof(*view));
    if (!view)
        return PyErr_NoMemory();
    *view = s->view;
    PyObject *cap = PyCapsule_New(view, PIN_CAPSULE, pin_destroy);
    if (!cap) {
        PyMem_Free(view);
        return NULL;
    }
    /* The export now belongs to the capsule: holding it keeps a bytearray from being resized
     * and a numpy array's memory from being freed while peers may write into it. */
    s->has_view = 0;
    return cap;
}

/* PySequence_Fast of @obj, or NULL with a TypeError naming @what. */
PyObject *kvfpy_as_list(PyObject *obj, const char *what)
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

int kvfpy_check_same_len(PyObject *a, const char *an, PyObject *b, const char *bn)
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
int kvfpy_spans_from_lists(PyObject *bufs, PyObject *lens_seq, unsigned flags,
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

/* A timeout in seconds (int or float, >= 0) as milliseconds, rounded up; None gives @none_ms.
 * -1 with TypeError/ValueError set. */
int kvfpy_timeout_get(PyObject *obj, const char *what, int none_ms, int *out)
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

/* The C library's elements of a batch: local @spans with @lens bytes each, to @remotes. */
kvf_xfer_t *kvfpy_xfers_make(kvf_op_t op, kvfpy_span_t *spans, const size_t *lens,
                             const uint64_t *remotes, size_t n)
{
    kvf_xfer_t *x = PyMem_Malloc((n ? n : 1) * sizeof(*x));
    if (!x)
        return NULL;
    for (size_t i = 0; i < n; i++)
        x[i] = (kvf_xfer_t){.op = op, .local = spans[i].addr, .remote = remotes[i], .len = lens[i]};
    return x;
}
