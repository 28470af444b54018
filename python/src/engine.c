/*
 * kvferry.TransferEngine: the seed's (mf_adapter) TransferEngine over kvf_engine_t.
 *
 * The seed's methods keep its names, argument order and int return codes, so that porting is an
 * import change. Objects registered by reference (numpy arrays, bytearrays, tensors) are kept
 * alive by the engine until they are unregistered or the engine is destroyed: a peer may write
 * into registered memory at any time, so it must not be freed under it.
 *
 * This file holds the type: its lifecycle, the seed's initialize, get_rpc_port and destroy, the
 * Pythonic extras of the object itself, and the method table; the other methods live in the
 * engine_*.c files below it (engine.h lists them).
 */
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine.h"

/* The session id of the engine held (or being made), for a message; "" when none. */
static void held_session_id(EngineObject *self, char *buf, size_t len)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    snprintf(buf, len, "%s", e ? kvf_engine_session_id(e) : "an initialize() in progress");
    if (e)
        kvfpy_guard_leave(&self->guard);
}

/* ---- object lifecycle ------------------------------------------------------------------------ */

static const char *const config_kwlist[] = {"init_timeout_ms",
                                            "op_timeout_ms",
                                            "lease_ttl_ms",
                                            "tcp_conns_per_peer",
                                            "tcp_chunk_bytes",
                                            "namespace",
                                            "max_batches",
                                            "submit_blocks",
                                            "async_threads",
                                            "notify_queue_max",
                                            "tcp_idle_timeout_ms",
                                            "key_prefix",
                                            "metrics_listen",
                                            "auth_key_file",
                                            "data_tls",
                                            "io_threads",
                                            NULL};

static int config_u32(PyObject *v, const char *name, uint32_t *out)
{
    uint64_t x;
    if (!v || v == Py_None)
        return 0;
    if (kvfpy_u64(v, name, &x) < 0)
        return -1;
    if (x > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s is out of range: %llu", name, (unsigned long long)x);
        return -1;
    }
    *out = (uint32_t)x;
    return 0;
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *v[16] = {NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOOOOOOOOOOOOOOO:TransferEngine",
                                     (char **)config_kwlist, &v[0], &v[1], &v[2], &v[3], &v[4],
                                     &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &v[11],
                                     &v[12], &v[13], &v[14], &v[15]))
        return -1;
    if (kvfpy_guard_enter(&self->guard)) {
        kvfpy_guard_leave(&self->guard);
        PyErr_SetString(PyExc_RuntimeError, "TransferEngine.__init__ called on an initialized "
                                            "engine");
        return -1;
    }
    kvf_config_init(&self->cfg);
    if (config_u32(v[0], "init_timeout_ms", &self->cfg.init_timeout_ms) < 0 ||
        config_u32(v[1], "op_timeout_ms", &self->cfg.op_timeout_ms) < 0 ||
        config_u32(v[2], "lease_ttl_ms", &self->cfg.lease_ttl_ms) < 0 ||
        config_u32(v[3], "tcp_conns_per_peer", &self->cfg.tcp_conns_per_peer) < 0 ||
        config_u32(v[4], "tcp_chunk_bytes", &self->cfg.tcp_chunk_bytes) < 0 ||
        config_u32(v[6], "max_batches", &self->cfg.max_batches) < 0 ||
        config_u32(v[8], "async_threads", &self->cfg.async_threads) < 0 ||
        config_u32(v[9], "notify_queue_max", &self->cfg.notify_queue_max) < 0 ||
        config_u32(v[10], "tcp_idle_timeout_ms", &self->cfg.tcp_idle_timeout_ms) < 0 ||
        config_u32(v[15], "io_threads", &self->cfg.io_threads) < 0)
        return -1;
    if (v[7] && v[7] != Py_None) {
        int blocks = PyObject_IsTrue(v[7]);
        if (blocks < 0)
            return -1;
        self->cfg.submit_blocks = (uint32_t)blocks;
    }
    if (v[5] && v[5] != Py_None) {
        const char *ns;
        if (kvfpy_str(v[5], "namespace", &ns) < 0)
            return -1;
        if (strlen(ns) >= sizeof(self->ns)) {
            PyErr_Format(PyExc_ValueError, "namespace is longer than %zu characters",
                         sizeof(self->ns) - 1);
            return -1;
        }
        snprintf(self->ns, sizeof(self->ns), "%s", ns);
        self->cfg.ns = self->ns;
    }
    if (v[11] && v[11] != Py_None) {
        const char *p;
        if (kvfpy_str(v[11], "key_prefix", &p) < 0)
            return -1;
        if (strlen(p) >= sizeof(self->key_prefix)) {
            PyErr_Format(PyExc_ValueError, "key_prefix is longer than %zu characters",
                         sizeof(self->key_prefix) - 1);
            return -1;
        }
        snprintf(self->key_prefix, sizeof(self->key_prefix), "%s", p);
        self->cfg.key_prefix = self->key_prefix;
    }
    if (v[12] && v[12] != Py_None) {
        const char *ml;
        if (kvfpy_str(v[12], "metrics_listen", &ml) < 0)
            return -1;
        if (strlen(ml) >= sizeof(self->metrics_listen)) {
            PyErr_Format(PyExc_ValueError, "metrics_listen is longer than %zu characters",
                         sizeof(self->metrics_listen) - 1);
            return -1;
        }
        snprintf(self->metrics_listen, sizeof(self->metrics_listen), "%s", ml);
        self->cfg.metrics_listen = self->metrics_listen;
    }
    if (v[13] && v[13] != Py_None) {
        const char *kf;
        if (kvfpy_str(v[13], "auth_key_file", &kf) < 0)
            return -1;
        if (strlen(kf) >= sizeof(self->auth_key_file)) {
            PyErr_Format(PyExc_ValueError, "auth_key_file is longer than %zu characters",
                         sizeof(self->auth_key_file) - 1);
            return -1;
        }
        snprintf(self->auth_key_file, sizeof(self->auth_key_file), "%s", kf);
        self->cfg.auth_key_file = self->auth_key_file;
    }
    self->data_tls = false;
    if (v[14] && v[14] != Py_None) {
        int on = PyObject_IsTrue(v[14]);
        if (on < 0)
            return -1;
        self->data_tls = on != 0;
    }
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (kvfpy_guard_init(&self->guard) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->guard_ok = 1;
    if (kvfpy_batches_init(&self->batches) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->batches_ok = 1;
    kvf_config_init(&self->cfg);
    self->reserved_fd = -1;
    self->pins = PyDict_New();
    if (!self->pins) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Engine_traverse(EngineObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pins);
    return 0;
}

/* Breaking a reference cycle through a registered object: the engine goes first, so that no
 * peer can write into the memory once the pins are released. */
static int Engine_clear(EngineObject *self)
{
    if (self->guard_ok)
        kvfpy_engine_close(self);
    Py_CLEAR(self->pins);
    return 0;
}

static void reserved_close(EngineObject *self)
{
    if (self->reserved_fd >= 0)
        close(self->reserved_fd);
    self->reserved_fd = -1;
    self->reserved_port = 0;
}

static void Engine_dealloc(EngineObject *self)
{
    PyObject_GC_UnTrack(self);
    reserved_close(self);
    if (self->guard_ok) {
        kvfpy_engine_close(self);
        kvfpy_guard_fini(&self->guard);
    }
    if (self->batches_ok)
        kvfpy_batches_fini(&self->batches);
    Py_CLEAR(self->pins);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---- the seed's methods ---------------------------------------------------------------------- */

static PyObject *Engine_initialize(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static const char *const kwlist[] = {"store_url", "session_id", "role", "device_id", NULL};
    PyObject *url_o, *sid_o, *role_o, *dev_o = NULL;
    const char *url, *sid = "127.0.0.1:0", *role_s;
    kvf_role_t role;
    kvf_engine_t *e = NULL;
    int device_id = 0, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|O:initialize", (char **)kwlist, &url_o,
                                     &sid_o, &role_o, &dev_o))
        return NULL;
    if (kvfpy_str(url_o, "store_url", &url) < 0 ||
        (sid_o != Py_None && kvfpy_str(sid_o, "session_id", &sid) < 0) ||
        kvfpy_str(role_o, "role", &role_s) < 0 ||
        (dev_o && kvfpy_int(dev_o, "device_id", &device_id) < 0))
        return NULL;
    rc = kvf_role_parse(role_s, &role);
    if (rc < 0)
        return PyLong_FromLong(rc);
    rc = kvfpy_guard_reserve(&self->guard);
    if (rc < 0) {
        char held[128];
        held_session_id(self, held, sizeof(held));
        return kvfpy_fail(rc,
                          "initialize: the engine is already initialized (%s); call "
                          "destroy() first",
                          held);
    }
    /* The port get_rpc_port() handed out: the engine listens on that very socket. */
    char host[KVF_SESSION_ID_MAX];
    uint16_t port = 0;
    kvf_config_t cfg = self->cfg;
    cfg.tls = kvfpy_tls_opts();
    if (self->data_tls) {
        if (!cfg.tls || !cfg.tls->enable) {
            kvfpy_guard_fill(&self->guard, NULL);
            return kvfpy_fail(-KVF_EINVAL,
                              "initialize: data_tls=True takes the options of "
                              "set_conf_store_tls(True, ...), which was not called");
        }
        cfg.data_tls = cfg.tls;
    }
    if (self->reserved_fd >= 0 && kvf_session_id_parse(sid, host, sizeof(host), &port) == 0 &&
        (port == self->reserved_port || port == 0) && !strchr(host, ':'))
        cfg.listen_fd = self->reserved_fd;
    Py_BEGIN_ALLOW_THREADS
    rc = kvf_engine_create(url, sid, role, device_id, &cfg, &e);
    Py_END_ALLOW_THREADS
    kvfpy_guard_fill(&self->guard, rc == 0 ? e : NULL);
    if (rc == 0 && cfg.listen_fd >= 0)
        reserved_close(self); /* the engine listens on its own copy */
    return PyLong_FromLong(rc);
}

/* Bind a socket to a free port of every IPv4 address and keep it, not listening: the port is
 * this object's until initialize() hands the socket to the engine (or the object goes). */
static int reserve_port(EngineObject *self)
{
    if (self->reserved_fd >= 0)
        return self->reserved_port;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t al = sizeof(a);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &al) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    self->reserved_fd = fd;
    self->reserved_port = ntohs(a.sin_port);
    return self->reserved_port;
}

static PyObject *Engine_get_rpc_port(EngineObject *self, PyObject *unused)
{
    int rc;
    /* Before the first initialize(): a port reserved for it (the frameworks build their
     * session id from it). */
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    if (!e && !kvfpy_guard_was_closed(&self->guard))
        return PyLong_FromLong(reserve_port(self));
    if (e)
        kvfpy_guard_leave(&self->guard);
    e = kvfpy_engine_enter(self, "get_rpc_port", &rc);
    if (!e)
        return PyLong_FromLong(rc);
    rc = kvf_engine_port(e);
    kvfpy_engine_leave(self);
    return PyLong_FromLong(rc);
}

static PyObject *Engine_destroy(EngineObject *self, PyObject *unused)
{
    kvfpy_engine_close(self);
    return PyLong_FromLong(0);
}

/* ---- Pythonic extras --------------------------------------------------------------------- */

static PyObject *Engine_get_session_id(EngineObject *self, void *closure)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    if (!e)
        Py_RETURN_NONE;
    PyObject *s = PyUnicode_FromString(kvf_engine_session_id(e));
    kvfpy_engine_leave(self);
    return s;
}

static PyObject *Engine_enter(EngineObject *self, PyObject *unused)
{
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Engine_exit(EngineObject *self, PyObject *args)
{
    kvfpy_engine_close(self);
    Py_RETURN_FALSE;
}

static PyObject *Engine_repr(EngineObject *self)
{
    kvf_engine_t *e = kvfpy_guard_enter(&self->guard);
    if (!e)
        return PyUnicode_FromFormat("<kvferry.TransferEngine %s>",
                                    kvfpy_guard_was_closed(&self->guard) ? "destroyed"
                                                                         : "not initialized");
    PyObject *s =
        PyUnicode_FromFormat("<kvferry.TransferEngine session %s>", kvf_engine_session_id(e));
    kvfpy_engine_leave(self);
    return s;
}

#define KW    (METH_VARARGS | METH_KEYWORDS)
#define FN(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef Engine_methods[] = {
    {"initialize", FN(Engine_initialize), KW,
     "initialize($self, store_url, session_id, role, device_id=0)\n--\n\n-> int\n\nStart the "
     "engine: listen on session_id (\"ip:port\"; port 0 picks one; None means \"127.0.0.1:0\"), "
     "connect to the config store at store_url (\"tcp://ip:port\", waited for up to "
     "init_timeout_ms) and publish this session. role is \"Prefill\", \"Decode\" or \"Both\". "
     "Returns 0 or a negative code (see get_last_err_msg())."},
    {"get_rpc_port", FN(Engine_get_rpc_port), METH_NOARGS,
     "get_rpc_port($self, /)\n--\n\n-> int\n\nThe port this engine listens on, or a negative "
     "code."},
    {"register_memory", FN(kvfpy_engine_register_memory), KW,
     "register_memory($self, buffer_addr, capacity=None)\n--\n\n-> int\n\nMake [buffer_addr, "
     "buffer_addr+capacity) writable and readable by peers. buffer_addr is an int address, a "
     "writable buffer object or a CPU tensor (capacity then defaults to its size; the object is "
     "kept alive until it is unregistered). Returns 0 or a negative code."},
    {"batch_register_memory", FN(kvfpy_engine_batch_register_memory), KW,
     "batch_register_memory($self, buffer_addrs, capacities=None)\n--\n\n-> int\n\nRegister "
     "several ranges: all of them, or none on error. Returns 0 or a negative code."},
    {"unregister_memory", FN(kvfpy_engine_unregister_memory), KW,
     "unregister_memory($self, buffer_addr)\n--\n\n-> int\n\nWithdraw the region starting at "
     "buffer_addr; transfers into it already running are waited for, later ones fail. Returns 0 "
     "or a negative code."},
    {"transfer_sync_write", FN(kvfpy_engine_transfer_sync_write), KW,
     "transfer_sync_write($self, dest_session, buffer, peer_buffer_address, length=None, "
     "notify=None)\n--\n\n-> int\n\nWrite length bytes from local buffer into dest_session's "
     "registered memory at peer_buffer_address and wait until they are there. Returns 0 or a "
     "negative code."
     " With notify= (bytes), it is delivered to dest_session once every byte is there."},
    {"transfer_sync_read", FN(kvfpy_engine_transfer_sync_read), KW,
     "transfer_sync_read($self, dest_session, buffer, peer_buffer_address, length=None, "
     "notify=None)\n--\n\n-> int\n\nRead length bytes at peer_buffer_address in dest_session's "
     "registered memory into local buffer. Returns 0 or a negative code."
     " With notify= (bytes), it is delivered to dest_session once every byte is there."},
    {"batch_transfer_sync_write", FN(kvfpy_engine_batch_transfer_sync_write), KW,
     "batch_transfer_sync_write($self, dest_session, buffers, peer_buffer_addresses, "
     "lengths=None, notify=None)\n--\n\n-> int\n\nSeveral writes to one peer, waited for "
     "together. Returns 0 or a negative code."
     " With notify= (bytes), it is delivered to dest_session once every byte is there."},
    {"batch_transfer_sync_read", FN(kvfpy_engine_batch_transfer_sync_read), KW,
     "batch_transfer_sync_read($self, dest_session, buffers, peer_buffer_addresses, lengths=None,"
     " notify=None)\n--\n\n-> int\n\nSeveral reads from one peer, waited for together. Returns 0 "
     "or a negative code."
     " With notify= (bytes), it is delivered to dest_session once every byte is there."},
    {"transfer_submit_write", FN(kvfpy_engine_transfer_submit_write), KW,
     "transfer_submit_write($self, dest_session, buffer, peer_buffer_address, length=None, "
     "notify=None)\n--\n\n-> int\n\nStart writing length bytes from buffer to dest_session's "
     "memory at peer_buffer_address in the background. Returns a batch id (>= 1) for "
     "transfer_check_status/transfer_wait, or a negative code. buffer must stay valid and "
     "unchanged until the batch is complete (a buffer object is kept alive meanwhile). notify: "
     "bytes delivered to dest_session after every byte is there."},
    {"transfer_submit_read", FN(kvfpy_engine_transfer_submit_read), KW,
     "transfer_submit_read($self, dest_session, buffer, peer_buffer_address, length=None, "
     "notify=None)\n--\n\n-> int\n\nStart reading into buffer in the background. Returns a batch "
     "id (>= 1) or a negative code."},
    {"batch_transfer_async_write", FN(kvfpy_engine_batch_transfer_async_write), KW,
     "batch_transfer_async_write($self, dest_session, buffers, peer_buffer_addresses, "
     "lengths=None, notify=None)\n--\n\n-> int\n\nStart several writes to one peer as one batch. "
     "Returns a batch id (>= 1) or a negative code."},
    {"batch_transfer_async_read", FN(kvfpy_engine_batch_transfer_async_read), KW,
     "batch_transfer_async_read($self, dest_session, buffers, peer_buffer_addresses, "
     "lengths=None, notify=None)\n--\n\n-> int\n\nStart several reads from one peer as one batch."
     " Returns a batch id (>= 1) or a negative code."},
    {"transfer_check_status", FN(kvfpy_engine_transfer_check_status), KW,
     "transfer_check_status($self, batch_id)\n--\n\n-> int\n\n1 when the batch is complete, 0 "
     "while it runs, a negative code when it failed (see get_last_err_msg()). Never blocks. Once "
     "1 or a negative code has been returned, the id is released: later calls with it return "
     "-KVF_EINVAL."},
    {"transfer_wait", FN(kvfpy_engine_transfer_wait), KW,
     "transfer_wait($self, batch_id, timeout=None)\n--\n\n-> int\n\nAs transfer_check_status, "
     "waiting up to timeout seconds (None: until the batch ends, which op_timeout_ms bounds) for "
     "the batch to end. The GIL is released."},
    {"transfer_cancel", FN(kvfpy_engine_transfer_cancel), KW,
     "transfer_cancel($self, batch_id)\n--\n\n-> int\n\nStop the batch: elements not yet started "
     "are not sent and no notification is delivered. Returns 0; the id is not released (its "
     "status is then -KVF_ECANCELED, or 1 if it had already completed)."},
    {"transfer_element_status", FN(kvfpy_engine_transfer_element_status), KW,
     "transfer_element_status($self, batch_id)\n--\n\n-> list of int\n\nEach element's status: 0 "
     "done, KVF_XFER_PENDING (1) not finished, or a negative code. Does not release the id. "
     "Raises kvferry.Error for an unknown id."},
    {"get_batch_transfer_status", FN(kvfpy_engine_get_batch_transfer_status), KW,
     "get_batch_transfer_status($self, batch_ids)\n--\n\n-> int\n\nWait for every batch in the "
     "list (GIL released; each wait bounded by op_timeout_ms) and release the ids. Returns 0 when"
     " all succeeded, else the first negative code in list order (an unknown id counts as "
     "-KVF_EINVAL)."},
    {"send_notification", FN(kvfpy_engine_send_notification), KW,
     "send_notification($self, dest_session, message)\n--\n\n-> int\n\nDeliver message "
     "(bytes-like or str, at most KVF_NOTIFY_MAX = 4096 bytes) to dest_session, in order after "
     "this engine's earlier batches to it. Returns 0 once the peer has queued it, or a negative "
     "code."},
    {"get_notifications", FN(kvfpy_engine_get_notifications), METH_NOARGS,
     "get_notifications($self, /)\n--\n\n-> list of (sender_session_id, bytes)\n\nEvery "
     "notification received and not yet taken, oldest first; [] when none. Never blocks. Raises "
     "kvferry.Error when the engine is not running."},
    {"wait_notification", FN(kvfpy_engine_wait_notification), KW,
     "wait_notification($self, timeout=None, peer=None)\n--\n\n-> list of (sender_session_id, "
     "bytes)\n\nAs get_notifications, waiting up to timeout seconds (None: until one arrives or "
     "the engine is destroyed) for the first; [] when the time ran out. The GIL is released. With"
     " peer (a session id), the wait raises kvferry.Error (KVF_EPEERGONE, naming it) within about"
     " a second once that peer is gone and nothing arrived."},
    {"check_peer", FN(kvfpy_engine_check_peer), KW,
     "check_peer($self, session_id)\n--\n\n-> int\n\n0 while the engine with that session id is "
     "there; -KVF_EPEERGONE once it is gone (its session record left the store, or its connection"
     " broke and a new one is refused, or its process exited); another negative code on error."},
    {"wait_for_peer", FN(kvfpy_engine_wait_for_peer), KW,
     "wait_for_peer($self, session_id, timeout=None)\n--\n\n-> int\n\nWait up to timeout seconds "
     "(None: init_timeout_ms) for an engine with that session id to be up. Returns 0, or a "
     "negative code (-KVF_ETIMEDOUT)."},
    {"get_peer_events", FN(kvfpy_engine_get_peer_events), KW,
     "get_peer_events($self, timeout=0)\n--\n\n-> list of (\"joined\" | \"left\", session_id)\n\n"
     "Peers that joined or left since the previous call; the first call reports every peer "
     "already up as joined. Waits up to timeout seconds (None: for ever) for the first event. "
     "Raises kvferry.Error on failure."},
    {"destroy", FN(Engine_destroy), METH_NOARGS,
     "destroy($self, /)\n--\n\n-> int\n\nWithdraw the session, close connections and free the "
     "engine (waiting for transfers still running on other threads); batch ids not yet released "
     "are freed. Returns 0; a no-op when not initialized."},
    {"unInitialize", FN(Engine_destroy), METH_NOARGS,
     "unInitialize($self, /)\n--\n\n-> int\n\nSame as destroy()."},
    {"peer_regions", FN(kvfpy_engine_peer_regions), KW,
     "peer_regions($self, session)\n--\n\n-> list of (addr, length)\n\nThe regions the peer has "
     "registered, sorted by address (waiting up to init_timeout_ms for the peer to appear). "
     "Raises kvferry.Error on failure."},
    {"mem_alloc", FN(kvfpy_engine_mem_alloc), KW,
     "mem_alloc($self, length)\n--\n\n-> int\n\nAllocate length bytes of shared memory (memfd), "
     "registered with this engine, so that same-host peers write into it with a plain copy. "
     "Returns its address; raises kvferry.Error on failure. Free it with mem_free()."},
    {"mem_free", FN(kvfpy_engine_mem_free), KW,
     "mem_free($self, address)\n--\n\n-> int\n\nUnregister and free memory from mem_alloc(). "
     "Returns 0 or a negative code."},
    {"peer_transport", FN(kvfpy_engine_peer_transport), KW,
     "peer_transport($self, session)\n--\n\n-> str\n\nHow transfers to the peer travel: \"loop\","
     " \"shm\" or \"tcp\" (known after the first transfer). Raises kvferry.Error for a peer not "
     "used yet."},
    {"get_stats", FN(kvfpy_engine_get_stats), METH_NOARGS,
     "get_stats($self, /)\n--\n\n-> dict\n\nThis engine's statistics: bytes and operations by "
     "direction, per transport and per peer, errors by code, calls in flight, the transfer-time "
     "histogram, registered regions and bytes, connections and notifications (docs/operations.md "
     "lists the keys). Raises kvferry.Error when not initialized."},
    {"metrics_address", FN(kvfpy_engine_metrics_address), METH_NOARGS,
     "metrics_address($self, /)\n--\n\n-> str or None\n\n\"host:port\" of the metrics endpoint "
     "started by metrics_listen=, or None."},
    {"__enter__", FN(Engine_enter), METH_NOARGS, NULL},
    {"__exit__", FN(Engine_exit), METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"session_id", (getter)Engine_get_session_id, NULL,
     "This engine's session id (\"ip:port\", with the chosen port), or None when not "
     "initialized.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject kvfpy_EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvferry.TransferEngine",
    .tp_doc = "TransferEngine(*, init_timeout_ms=None, op_timeout_ms=None, lease_ttl_ms=None, "
              "tcp_conns_per_peer=None, tcp_chunk_bytes=None, namespace=None, max_batches=None, "
              "submit_blocks=None, async_threads=None, notify_queue_max=None, "
              "tcp_idle_timeout_ms=None, key_prefix=None, metrics_listen=None, auth_key_file=None, "
              "data_tls=None, io_threads=None)\n--\n\n"
              "A kvferry node with the seed's (mf_adapter) TransferEngine methods. The "
              "keyword-only arguments override kvf_config_t defaults; metrics_listen=\"host:port\" "
              "serves get_stats() for Prometheus at http://host:port/metrics; data_tls=True puts "
              "the engine's tcp data connections under TLS too, with the set_conf_store_tls() "
              "options. Use as a context manager to destroy the engine on exit.",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_repr = (reprfunc)Engine_repr,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};
