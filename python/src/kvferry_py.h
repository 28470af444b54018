/*
 * Private declarations shared by the files of the CPython extension `kvferry._kvferry`.
 *
 * The extension is a thin layer over include/kvferry.h. Its rules:
 *  - The seed's methods return the C library's int codes (0 or negative) and leave the detail in
 *    the C library's thread-local last-error message (get_last_err_msg()). Python exceptions are
 *    raised only for arguments of the wrong Python type or value, before anything reaches C.
 *  - Every call that may block runs with the GIL released.
 *  - A C handle is never freed while another thread is inside a call that uses it: each handle
 *    is reached through a kvfpy_guard_t that counts the calls in flight.
 */
#ifndef KVFERRY_PY_H
#define KVFERRY_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kvferry.h"

/* The module's own attribute: printf-style arguments are checked against their format. */
#define KVFPY_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* ---- handle guard (guard.c) ---------------------------------------------------------------- */

/*
 * Keeps a C handle alive while calls that run without the GIL use it. kvfpy_guard_enter()
 * returns the handle and counts the caller in; kvfpy_guard_leave() counts it out.
 * kvfpy_guard_take() detaches the handle so that no new call gets it, waits until the calls in
 * flight have left, and hands it over for destruction. The mutex is only ever held for a few
 * instructions and never while waiting for the GIL, so it cannot deadlock with it.
 */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t idle;
    void *handle;
    unsigned users;
    int busy;   /* a create or a take is in progress: the slot is neither free nor usable */
    int closed; /* the handle was taken at least once (for the error message) */
} kvfpy_guard_t;

int kvfpy_guard_init(kvfpy_guard_t *g);
void kvfpy_guard_fini(kvfpy_guard_t *g);
/* The handle with one more user, or NULL (nothing set, or being taken). */
void *kvfpy_guard_enter(kvfpy_guard_t *g);
void kvfpy_guard_leave(kvfpy_guard_t *g);
/* Reserve the empty slot for a create; 0, or -KVF_EEXIST when a handle is set or being made. */
int kvfpy_guard_reserve(kvfpy_guard_t *g);
/* End a reservation: store @handle (NULL when the create failed). */
void kvfpy_guard_fill(kvfpy_guard_t *g, void *handle);
/* Detach the handle and wait for its users to leave. Call without the GIL. NULL when there was
 * nothing to take (never set, already taken, or another thread is taking it). */
/* @shutdown (may be NULL) is called with the handle, under the guard, before waiting: it should
 * make calls in flight return soon. */
void *kvfpy_guard_take(kvfpy_guard_t *g, void (*shutdown)(void *h));
/* Whether a handle was ever taken, for messages ("destroyed" rather than "not initialized"). */
int kvfpy_guard_was_closed(kvfpy_guard_t *g);

/* ---- asynchronous batch ids (batches.c) --------------------------------------------------- */

/*
 * One asynchronous batch as Python sees it: an id that names a kvf_batch_t, and the objects that
 * keep the batch's local memory and notification alive until kvf_batch_free() has returned.
 */
typedef struct kvfpy_batch {
    struct kvfpy_batch *next; /* hash chain; reused for lists of entries to free */
    uint64_t id;
    kvf_batch_t *b;
    unsigned users; /* callers using b without the table's lock */
    int released;   /* unlinked from the table: freed when users reaches 0 */
    PyObject *pins; /* touched only with the GIL held */
} kvfpy_batch_t;

/* id -> batch, with its own mutex: callers hold no GIL while the batches they use run. */
typedef struct {
    pthread_mutex_t lock;
    kvfpy_batch_t **buckets;
    size_t nbuckets; /* a power of two, or 0 before the first add */
    size_t count;
    uint64_t next_id; /* ids start at 1 and are never reused by an engine object */
} kvfpy_batches_t;

int kvfpy_batches_init(kvfpy_batches_t *t);
/* Frees the table itself; entries must have been drained. */
void kvfpy_batches_fini(kvfpy_batches_t *t);
/* Add @b with @pins (the reference is stolen on success). The new id (>= 1), or -1 (no memory). */
int64_t kvfpy_batches_add(kvfpy_batches_t *t, kvf_batch_t *b, PyObject *pins);
/* The entry of @id with one more user, or NULL when the id is unknown or released. */
kvfpy_batch_t *kvfpy_batches_get(kvfpy_batches_t *t, uint64_t id);
/* One user less; with @release the id is unlinked (if it still was not). Returns the entry when
 * it is now unused and unlinked: the caller frees it (kvf_batch_free, then the pins). */
kvfpy_batch_t *kvfpy_batches_put(kvfpy_batches_t *t, kvfpy_batch_t *x, int release);
/* Unlink every entry. Returns those nobody uses, chained by ->next, for the caller to free; the
 * others are freed by their last user. */
kvfpy_batch_t *kvfpy_batches_drain(kvfpy_batches_t *t);
/* Ids not yet released. */
size_t kvfpy_batches_count(kvfpy_batches_t *t);

/* ---- argument conversion (args.c) --------------------------------------------------------- */

/* Flags for kvfpy_span_get(). */
#define KVFPY_SPAN_WRITABLE  1u /* the memory will be written into: refuse read-only buffers */
#define KVFPY_SPAN_ADDR_ONLY 2u /* only the address is needed (unregister) */

/*
 * A piece of local memory named by one Python argument: an int address, an object with the
 * buffer protocol, or a tensor-like object with data_ptr() and nbytes. The span holds the
 * buffer export (or a reference to the tensor) until kvfpy_span_release(), so the memory cannot
 * move or vanish while a C call without the GIL uses it.
 */
typedef struct {
    char *addr;
    size_t len; /* bytes the object spans; only meaningful when sized */
    int sized;  /* 0 for a bare address: the caller vouches for the length */
    int has_view;
    Py_buffer view;
    PyObject *owner; /* new reference to a tensor-like object, or NULL */
} kvfpy_span_t;

/* Convert @obj (argument @what, for messages). Returns 0, or -1 with TypeError/ValueError set. */
int kvfpy_span_get(PyObject *obj, unsigned flags, const char *what, kvfpy_span_t *s);
void kvfpy_span_release(kvfpy_span_t *s);
/* The length to use: @length_obj (NULL or None = the whole object), checked against the span. */
int kvfpy_span_len(const kvfpy_span_t *s, PyObject *length_obj, const char *what, size_t *out);
/* A new reference that keeps the span's memory alive and in place (a capsule holding the buffer
 * export, or the tensor), moving that hold out of @s; Py_None for a bare address. */
PyObject *kvfpy_span_pin(kvfpy_span_t *s);

/* An unsigned 64-bit integer (address or size) from an int-like object. 0 or -1 with
 * TypeError (not an int) or ValueError (negative, too large) naming @what. */
int kvfpy_u64(PyObject *obj, const char *what, uint64_t *out);
/* A C int from an int-like object, -1 with TypeError/ValueError naming @what. */
int kvfpy_int(PyObject *obj, const char *what, int *out);
/* A UTF-8 string from a str (valid while @obj lives); -1 with TypeError/ValueError. */
int kvfpy_str(PyObject *obj, const char *what, const char **out);

/* PySequence_Fast of @obj (a list or tuple, not a str or bytes), or NULL with a TypeError naming
 * @what. */
PyObject *kvfpy_as_list(PyObject *obj, const char *what);
/* 0 when the sequences @a and @b (from kvfpy_as_list) have the same length, else -1 with a
 * ValueError naming both. */
int kvfpy_check_same_len(PyObject *a, const char *an, PyObject *b, const char *bn);
/* Spans and lengths of parallel lists of local buffers and lengths (@lens_seq may be NULL:
 * whole objects); 0, or -1 with an exception set. On success the caller releases the spans and
 * frees both arrays (PyMem_Free). */
int kvfpy_spans_from_lists(PyObject *bufs, PyObject *lens_seq, unsigned flags,
                           const char *bufs_name, kvfpy_span_t **spans_out, size_t **lens_out);
/* A timeout in seconds (int or float, >= 0) as milliseconds, rounded up; None gives @none_ms.
 * -1 with TypeError/ValueError naming @what. */
int kvfpy_timeout_get(PyObject *obj, const char *what, int none_ms, int *out);
/* The kvf_xfer_t elements of a batch (PyMem_Free them), or NULL when out of memory. */
kvf_xfer_t *kvfpy_xfers_make(kvf_op_t op, kvfpy_span_t *spans, const size_t *lens,
                             const uint64_t *remotes, size_t n);

/* ---- errors (errors.c) -------------------------------------------------------------------- */

/* kvferry.Error: raised by the Pythonic extras (peer_regions, Store, StoreServer) on failure. */
extern PyObject *kvfpy_Error;
/* Create kvferry.Error and add it to module @m as "Error". 0, or -1 with an exception set. */
int kvfpy_errors_add(PyObject *m);
/* Raise kvferry.Error(code, message) from a negative C return code and the last-error text. */
PyObject *kvfpy_raise(int rc);
/* Set the C library's last-error message from the extension (so get_last_err_msg() sees it)
 * and return @rc as a Python int. */
PyObject *kvfpy_fail(int rc, const char *fmt, ...) KVFPY_PRINTF(2, 3);

/* ---- TLS for the store (tls.c) --------------------------------------------------------------- */

/* The options set_conf_store_tls() and set_conf_store_tls_key() made, or NULL when
 * set_conf_store_tls() was never called (the library then reads KVFERRY_TLS_*). GIL held. */
const kvf_tls_opts_t *kvfpy_tls_opts(void);
/* The module functions (module.c lists them). */
PyObject *kvfpy_set_conf_store_tls(PyObject *mod, PyObject *args, PyObject *kwds);
PyObject *kvfpy_set_conf_store_tls_key(PyObject *mod, PyObject *args, PyObject *kwds);

/* ---- types --------------------------------------------------------------------------------- */

extern PyTypeObject kvfpy_EngineType;      /* engine.c */
extern PyTypeObject kvfpy_StoreType;       /* store.c */
extern PyTypeObject kvfpy_StoreServerType; /* store_server.c */

/* Returned instead of a kvferry code when a Python exception is set (no C code is that low). */
#define KVFPY_PYERR INT_MIN

/* Start a store server: 0 with *out a new StoreServer object, a negative kvferry code (message
 * in the last-error slot, no exception), or KVFPY_PYERR with a Python exception set. */
int kvfpy_store_server_start(const char *url, const char *auth_key_file, PyObject **out);

#endif /* KVFERRY_PY_H */
