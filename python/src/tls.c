/*
 * The seed's TLS calls: set_conf_store_tls(enable, tls_info) with the upstream's "key: value;"
 * string, and set_conf_store_tls_key(tls_pk, tls_pk_pw, py_decrypt_func). They set one
 * process-wide kvf_tls_opts_t that every later TransferEngine.initialize(), create_config_store()
 * and Store() of this process use (touched with the GIL held only).
 */
#include "kvferry_py.h"

#include <stdbool.h>
#include <string.h>

static kvf_tls_opts_t tls_opts;
static bool tls_set; /* set_conf_store_tls() was called: tls_opts rules, even when off */
/* The strings tls_opts points at, owned here. */
static char *s_ca_file, *s_ca_path, *s_cert, *s_key_file, *s_key_pw_file, *s_crl_file,
    *s_crl_path, *s_key_pem, *s_key_pw;

static void wipe_free(char **p)
{
    if (*p) {
        explicit_bzero(*p, strlen(*p));
        free(*p);
        *p = NULL;
    }
}

const kvf_tls_opts_t *kvfpy_tls_opts(void)
{
    return tls_set ? &tls_opts : NULL;
}

/* Point tls_opts at the owned strings. */
static void opts_refresh(void)
{
    uint32_t enable = tls_opts.enable;
    kvf_tls_opts_init(&tls_opts);
    tls_opts.enable = enable;
    tls_opts.ca_file = s_ca_file;
    tls_opts.ca_path = s_ca_path;
    tls_opts.cert_file = s_cert;
    /* The key goes with tlsCert: without a certificate it is not used. */
    if (s_cert) {
        tls_opts.key_file = s_key_pem ? NULL : s_key_file;
        tls_opts.key_pem = s_key_pem;
        tls_opts.key_password_file = s_key_pw ? NULL : s_key_pw_file;
        tls_opts.key_password = s_key_pw;
    }
    tls_opts.crl_file = s_crl_file;
    tls_opts.crl_path = s_crl_path;
}

/* Trim spaces and tabs at both ends of [*b, *e). */
static void trim(const char **b, const char **e)
{
    while (*b < *e && (**b == ' ' || **b == '\t' || **b == '\n' || **b == '\r'))
        (*b)++;
    while (*e > *b && ((*e)[-1] == ' ' || (*e)[-1] == '\t' || (*e)[-1] == '\n' || (*e)[-1] == '\r'))
        (*e)--;
}

/* The file list @names (comma-separated) joined to the directory @dir when relative. */
static char *join_list(const char *dir, const char *names)
{
    size_t cap = strlen(names) * 2 + (dir ? strlen(dir) * 17 : 0) + 1;
    char *out = malloc(cap), *copy = strdup(names);
    if (!out || !copy) {
        free(out);
        free(copy);
        return NULL;
    }
    out[0] = '\0';
    char *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ')
            t++;
        if (!*t)
            continue;
        size_t len = strlen(out);
        snprintf(out + len, cap - len, "%s%s%s%s", len ? "," : "", dir && t[0] != '/' ? dir : "",
                 dir && t[0] != '/' ? "/" : "", t);
    }
    free(copy);
    return out;
}

typedef struct {
    const char *name;
    char *val; /* owned, after parsing */
    bool list; /* a comma-separated list of names is allowed */
} info_key_t;

PyObject *kvfpy_set_conf_store_tls(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"enable", "tls_info", NULL};
    PyObject *en_o, *info_o = Py_None;
    const char *info = "";

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:set_conf_store_tls", (char **)kwlist, &en_o,
                                     &info_o))
        return NULL;
    if (info_o != Py_None && kvfpy_str(info_o, "tls_info", &info) < 0)
        return NULL;
    int enable = PyObject_IsTrue(en_o);
    if (enable < 0)
        return NULL;
    if (!enable) {
        tls_opts.enable = 0;
        tls_set = true;
        return PyLong_FromLong(0);
    }
    info_key_t keys[] = {
        {"tlsCaPath", NULL, false},  {"tlsCaFile", NULL, true}, {"tlsCert", NULL, false},
        {"tlsCrlPath", NULL, false}, {"tlsCrlFile", NULL, true}, {"tlsPk", NULL, false},
        {"tlsPkPwd", NULL, false},   {"packagePath", NULL, false},
    };
    const size_t nkeys = sizeof(keys) / sizeof(keys[0]);
    int rc = 0;
    PyObject *ret = NULL;
    for (const char *p = info; *p;) {
        const char *end = strchr(p, ';');
        if (!end)
            end = p + strlen(p);
        const char *b = p, *e = end;
        p = *end ? end + 1 : end;
        trim(&b, &e);
        if (b == e)
            continue;
        const char *colon = memchr(b, ':', (size_t)(e - b));
        if (!colon) {
            ret = kvfpy_fail(-KVF_EINVAL, "tls_info: \"%.*s\" is not \"key: value\"",
                             (int)(e - b), b);
            goto out;
        }
        const char *kb = b, *ke = colon, *vb = colon + 1, *ve = e;
        trim(&kb, &ke);
        trim(&vb, &ve);
        size_t k;
        for (k = 0; k < nkeys; k++)
            if (strlen(keys[k].name) == (size_t)(ke - kb) &&
                memcmp(keys[k].name, kb, (size_t)(ke - kb)) == 0)
                break;
        if (k == nkeys) {
            ret = kvfpy_fail(-KVF_EINVAL,
                             "tls_info: unknown key \"%.*s\" (known: tlsCaPath, tlsCaFile, "
                             "tlsCert, tlsPk, tlsPkPwd, tlsCrlPath, tlsCrlFile, packagePath)",
                             (int)(ke - kb), kb);
            goto out;
        }
        for (const char *c = vb; c < ve; c++)
            if (*c == ':' || (*c == ',' && !keys[k].list)) {
                ret = kvfpy_fail(-KVF_EINVAL,
                                 "tls_info: %s \"%.*s\": a path may not contain ';', ',' or ':'",
                                 keys[k].name, (int)(ve - vb), vb);
                goto out;
            }
        free(keys[k].val);
        keys[k].val = strndup(vb, (size_t)(ve - vb));
        if (!keys[k].val) {
            ret = PyErr_NoMemory();
            goto out;
        }
    }
    /* tlsCaFile and tlsCrlFile name files of tlsCaPath and tlsCrlPath (as upstream); a directory
     * alone is an OpenSSL hashed directory. */
    char *ca_file = keys[1].val ? join_list(keys[0].val, keys[1].val) : NULL;
    char *crl_file = keys[4].val ? join_list(keys[3].val, keys[4].val) : NULL;
    if ((keys[1].val && !ca_file) || (keys[4].val && !crl_file)) {
        free(ca_file);
        free(crl_file);
        ret = PyErr_NoMemory();
        goto out;
    }
    wipe_free(&s_ca_file);
    wipe_free(&s_ca_path);
    wipe_free(&s_cert);
    wipe_free(&s_crl_file);
    wipe_free(&s_crl_path);
    wipe_free(&s_key_file);
    wipe_free(&s_key_pw_file);
    s_ca_file = ca_file;
    s_ca_path = ca_file ? NULL : keys[0].val;
    if (!ca_file)
        keys[0].val = NULL;
    s_crl_file = crl_file;
    s_crl_path = crl_file ? NULL : keys[3].val;
    if (!crl_file)
        keys[3].val = NULL;
    s_cert = keys[2].val;
    keys[2].val = NULL;
    s_key_file = keys[5].val;
    keys[5].val = NULL;
    s_key_pw_file = keys[6].val;
    keys[6].val = NULL;
    tls_opts.enable = 1;
    tls_set = true;
    opts_refresh();
    /* Check what can be checked now (files readable, certificates and key parse), so that a
     * mistake is told here rather than at the first initialize(); a certificate whose key comes
     * next, from set_conf_store_tls_key() (the upstream's order), is checked then. */
    if (!s_cert || s_key_file || s_key_pem) {
        Py_BEGIN_ALLOW_THREADS
        rc = kvf_tls_opts_check(&tls_opts, 0);
        Py_END_ALLOW_THREADS
    }
    ret = PyLong_FromLong(rc);
out:
    for (size_t k = 0; k < nkeys; k++)
        free(keys[k].val);
    return ret;
}

PyObject *kvfpy_set_conf_store_tls_key(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"tls_pk", "tls_pk_pw", "py_decrypt_func", NULL};
    PyObject *pk_o, *pw_o = Py_None, *fn = Py_None, *plain = NULL;
    const char *pk, *pw = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO:set_conf_store_tls_key", (char **)kwlist,
                                     &pk_o, &pw_o, &fn))
        return NULL;
    if (kvfpy_str(pk_o, "tls_pk", &pk) < 0)
        return NULL;
    if (pw_o != Py_None && kvfpy_str(pw_o, "tls_pk_pw", &pw) < 0)
        return NULL;
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "py_decrypt_func must be callable or None");
        return NULL;
    }
    if (fn != Py_None && pw && *pw) {
        /* The password is given encrypted; the application's function decrypts it. */
        plain = PyObject_CallFunction(fn, "s", pw);
        if (!plain)
            return NULL;
        if (kvfpy_str(plain, "py_decrypt_func's result", &pw) < 0) {
            Py_DECREF(plain);
            return NULL;
        }
    }
    char *key = strdup(pk), *pass = pw && *pw ? strdup(pw) : NULL;
    Py_XDECREF(plain);
    if (!key || (pw && *pw && !pass)) {
        free(key);
        free(pass);
        return PyErr_NoMemory();
    }
    wipe_free(&s_key_pem);
    wipe_free(&s_key_pw);
    wipe_free(&s_key_pw_file);
    /* The key's PEM text, or else the name of its file. */
    if (strstr(key, "-----BEGIN")) {
        s_key_pem = key;
    } else {
        wipe_free(&s_key_file);
        s_key_file = key;
    }
    s_key_pw = pass;
    opts_refresh();
    if (!tls_opts.enable)
        return PyLong_FromLong(0);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_tls_opts_check(&tls_opts, 0);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}
