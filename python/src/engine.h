/*
 * Private declarations of kvferry.TransferEngine's files. The type and its lifecycle are in
 * engine.c, the top of them, which alone fills the method table; each group of methods has its
 * own file below it, and every one of them reaches the C engine through engine_handle.c:
 *
 *   engine.c          the type: lifecycle, initialize/get_rpc_port/destroy, the method table
 *   engine_mem.c      registered memory            engine_xfer.c    transfers, sync and async
 *   engine_async.c    asynchronous batch ids       engine_notify.c  notifications
 *   engine_peers.c    peers                        engine_handle.c  entering and closing the engine
 *
 * Arrows point down that list's order (engine_xfer.c submits through engine_async.c and takes
 * its notify= argument through engine_notify.c); no two of these files call each other.
 */
#ifndef KVFERRY_PY_ENGINE_H
#define KVFERRY_PY_ENGINE_H

#include <stdbool.h>

#include "kvferry_py.h"

typedef struct {
    PyObject_HEAD
    kvfpy_guard_t guard; /* holds the kvf_engine_t */
    int guard_ok;        /* the guard was initialised (tp_new may fail before) */
    kvf_config_t cfg;
    char ns[65];
    char metrics_listen[KVF_SESSION_ID_MAX];
    char key_prefix[129];
    char auth_key_file[4096];
    bool data_tls; /* TLS on the data path too, with the set_conf_store_tls() options */
    /* Registration pins: address (int) -> object keeping that memory alive. Touched only with
     * the GIL held. */
    PyObject *pins;
    kvfpy_batches_t batches; /* asynchronous batch ids (batches.c) */
    int batches_ok;          /* the table was initialised */
    /* Set while destroy() takes the engine, read without the GIL: waits that the C library does
     * not promise to end on kvf_engine_shutdown() (peer events) are run in short slices that
     * check it. */
    int closing;
    /* get_rpc_port() before initialize(): a socket bound to a free port (not listening), which
     * initialize() hands the engine (kvf_config_t.listen_fd) when the session id names that
     * port, so the port the caller was told stays this engine's. -1: none. GIL held. */
    int reserved_fd;
    int reserved_port;
} EngineObject;

/* ---- reaching the C engine (engine_handle.c) ---------------------------------------------- */

/* The engine with one more user, or NULL after setting the last-error message and *rc. */
kvf_engine_t *kvfpy_engine_enter(EngineObject *self, const char *op, int *rc);
void kvfpy_engine_leave(EngineObject *self);
/* Free batch entries chained by ->next (kvf_batch_free without the GIL, then the pins). */
void kvfpy_engine_batches_free(kvfpy_batch_t *dead);
/* Destroy the C engine (if any), free the batches still holding ids, then drop the pins. */
void kvfpy_engine_close(EngineObject *self);

/* ---- notification messages (engine_notify.c) ---------------------------------------------- */

/* The notify= or message argument @obj as a new bytes object in *msg (NULL for None): 0,
 * -KVF_ETOOBIG over KVF_NOTIFY_MAX (with a message), or KVFPY_PYERR with a TypeError set. */
int kvfpy_notify_get(PyObject *obj, const char *op, const char *what, PyObject **msg);

/* A notification's bytes for C: never NULL for a message (an empty one is still sent). */
static inline const void *kvfpy_msg_ptr(PyObject *msg)
{
    return msg ? PyBytes_AS_STRING(msg) : NULL;
}

static inline size_t kvfpy_msg_len(PyObject *msg)
{
    return msg ? (size_t)PyBytes_GET_SIZE(msg) : 0;
}

/* ---- asynchronous batches (engine_async.c) ------------------------------------------------ */

/* Submit one batch and give it an id, pinning the memory of @spans and @msg until the batch is
 * freed. The id (>= 1) or a negative code as a Python int; NULL with an exception set. */
PyObject *kvfpy_engine_submit(EngineObject *self, const char *op_name, kvf_op_t op,
                              const char *peer, kvfpy_span_t *spans, const size_t *lens,
                              const uint64_t *remotes, size_t n, PyObject *msg);

/* ---- the methods, by file ---------------------------------------------------------------- */

/*
 * The methods defined below engine.c, by file: each is a METH_VARARGS | METH_KEYWORDS function
 * kvfpy_engine_<name>; engine.c's method table gives their docstrings. get_notifications
 * (METH_NOARGS, engine_notify.c) is declared after them. The list is laid out by hand, under a
 * comment naming each file (clang-format would run it together).
 */
/* clang-format off */
#define KVFPY_ENGINE_METHODS(X)                                                                    \
    /* engine_mem.c */                                                                             \
    X(register_memory) X(batch_register_memory) X(unregister_memory) X(mem_alloc) X(mem_free)      \
    /* engine_xfer.c */                                                                            \
    X(transfer_sync_write) X(transfer_sync_read) X(batch_transfer_sync_write)                      \
    X(batch_transfer_sync_read) X(transfer_submit_write) X(transfer_submit_read)                   \
    X(batch_transfer_async_write) X(batch_transfer_async_read)                                     \
    /* engine_async.c */                                                                           \
    X(transfer_check_status) X(transfer_wait) X(transfer_cancel) X(transfer_element_status)        \
    X(get_batch_transfer_status)                                                                   \
    /* engine_notify.c */                                                                          \
    X(send_notification) X(wait_notification)                                                      \
    /* engine_peers.c */                                                                           \
    X(wait_for_peer) X(check_peer) X(get_peer_events) X(peer_regions) X(peer_transport)
/* clang-format on */

#define KVFPY_ENGINE_DECLARE(name)                                                                 \
    PyObject *kvfpy_engine_##name(EngineObject *self, PyObject *args, PyObject *kwds);
KVFPY_ENGINE_METHODS(KVFPY_ENGINE_DECLARE)
#undef KVFPY_ENGINE_DECLARE
PyObject *kvfpy_engine_get_notifications(EngineObject *self, PyObject *unused);
PyObject *kvfpy_engine_get_stats(EngineObject *self, PyObject *unused);
PyObject *kvfpy_engine_metrics_address(EngineObject *self, PyObject *unused);

#endif /* KVFERRY_PY_ENGINE_H */
