/*
 * kvferry — a transfer engine for disaggregated LLM inference.
 *
 * This is the only public header. Every function returns 0 (or a non-negative count where
 * documented) on success and a negative error code on failure: -errno for system errors, or
 * -KVF_E* for kvferry's own errors (see KVF_ERRNO_MAP). A failing call also sets a thread-local
 * message naming the value that was wrong, read with kvf_last_error().
 *
 * Threading: every function is safe to call from any thread unless its comment says otherwise.
 */
#ifndef KVFERRY_H
#define KVFERRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility: only what this header declares is exported. */
#if defined(__GNUC__) || defined(__clang__)
#define KVF_API __attribute__((visibility("default")))
#else
#define KVF_API
#endif

#define KVF_VERSION_MAJOR 0
#define KVF_VERSION_MINOR 1
#define KVF_VERSION_PATCH 0
#define KVF_VERSION_STRING "0.1.0"

/* ---------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------- */

/* kvferry's own codes start here, well above every errno value, so that one negative int can
 * carry either a system error or a kvferry error. */
#define KVF_ERRNO_OFFSET 1000

/* XX(name, value offset, message). The single table behind the enum, kvf_strerror() and
 * kvf_err_name(). Values are never reused or renumbered: they cross the wire and the Python API. */
#define KVF_ERRNO_MAP(XX)                                                                         \
    XX(EINVAL, 1, "invalid argument")                                                             \
    XX(ENOTFOUND, 2, "not found")                                                                 \
    XX(ETIMEDOUT, 3, "timed out")                                                                 \
    XX(EEXIST, 4, "already exists")                                                               \
    XX(ERANGE, 5, "out of range")                                                                 \
    XX(ENOTREG, 6, "memory not registered")                                                       \
    XX(EPEERGONE, 7, "peer gone")                                                                 \
    XX(EAUTH, 8, "authentication failed")                                                         \
    XX(EPROTO, 9, "protocol error")                                                               \
    XX(ENOTSUP, 10, "not supported")                                                              \
    XX(EBUSY, 11, "resource busy")                                                                \
    XX(ECANCELED, 12, "canceled")                                                                 \
    XX(ECASMISMATCH, 13, "compare-and-swap mismatch")                                             \
    XX(ESTALE, 14, "stale region information")                                                    \
    XX(ETOOBIG, 15, "value or frame too large")                                                   \
    XX(EBADVALUE, 16, "value is not of the expected form")                                        \
    XX(ESTOREDOWN, 17, "config store unreachable")                                                \
    XX(ECLOSED, 18, "object is shutting down")                                                    \
    XX(ENOMEM, 19, "out of memory")                                                               \
    XX(ETLS, 20, "TLS failure")

/** kvferry error codes. Functions return their negation (-KVF_ETIMEDOUT). */
typedef enum {
    KVF_OK = 0,
#define KVF__ERR_ENUM(name, off, msg) KVF_##name = KVF_ERRNO_OFFSET + (off),
    KVF_ERRNO_MAP(KVF__ERR_ENUM)
#undef KVF__ERR_ENUM
} kvf_errno_t;

/**
 * kvf_strerror - human-readable text for an error code.
 * @err: a return value of a kvferry call; negative or positive, -errno or -KVF_E*.
 * Returns a static string (never NULL); "success" for 0, "unknown error" for codes not in any
 * table. Thread-safe.
 */
KVF_API const char *kvf_strerror(int err);

/**
 * kvf_err_name - the symbolic name of an error code ("KVF_ETIMEDOUT", "ECONNREFUSED").
 * @err: negative or positive code.
 * Returns a static string (never NULL); "KVF_OK" for 0, "UNKNOWN" otherwise.
 */
KVF_API const char *kvf_err_name(int err);

/**
 * kvf_last_error - detail of the last failure on this thread.
 * Returns the message set by the most recent failing kvferry call made by the calling thread,
 * e.g. "store url tcp://192.168.1.1000:8000: 192.168.1.1000 is not a valid IPv4 address".
 * Successful calls do not clear it. The pointer stays valid until the next kvferry call on this
 * thread. Never NULL; "" when nothing has failed yet.
 */
KVF_API const char *kvf_last_error(void);

/** kvf_last_error_clear - reset this thread's last-error message to "". */
KVF_API void kvf_last_error_clear(void);

/**
 * kvf_last_error_set - record a message as this thread's last error, for bindings and wrappers.
 * @code: the code the failing call returns (0 or negative); handed back unchanged.
 * @fmt: printf-style format of the message, followed by its arguments. They may point into the
 *       current message (kvf_last_error()), so a wrapper can quote it.
 * Sets what kvf_last_error() returns on the calling thread only, as kvferry's own failing calls
 * do, so that a binding's own argument errors read the same way; the message is also logged at
 * debug level. A message longer than the slot (1023 bytes) is cut at its end.
 * Returns @code, so a failing path reads `return kvf_last_error_set(-KVF_EINVAL, "...", x);`.
 */
#if defined(__GNUC__) || defined(__clang__)
#define KVF__FORMAT_PRINTF_2_3 __attribute__((format(printf, 2, 3)))
#else
#define KVF__FORMAT_PRINTF_2_3
#endif
KVF_API int kvf_last_error_set(int code, const char *fmt, ...) KVF__FORMAT_PRINTF_2_3;
#undef KVF__FORMAT_PRINTF_2_3

/* ---------------------------------------------------------------------------------------------
 * Logging
 * ------------------------------------------------------------------------------------------- */

/** Log levels, the seed's numbering. The default is KVF_LOG_WARN. */
typedef enum {
    KVF_LOG_DEBUG = 0,
    KVF_LOG_INFO = 1,
    KVF_LOG_WARN = 2,
    KVF_LOG_ERROR = 3,
} kvf_log_level_t;

/**
 * kvf_log_set_level - set the process-wide log level.
 * @level: 0 debug, 1 info, 2 warn, 3 error. Messages below it are not formatted at all.
 * The initial level comes from the environment variable KVFERRY_LOG_LEVEL (a digit 0..3, or
 * debug/info/warn/error), else warn.
 * Returns 0, or -KVF_EINVAL for a level outside 0..3.
 */
KVF_API int kvf_log_set_level(int level);

/** kvf_log_get_level - the current process-wide log level (0..3). */
KVF_API int kvf_log_get_level(void);

/* ---------------------------------------------------------------------------------------------
 * Session ids and store URLs
 *
 * The same parsers kvf_engine_create() and kvf_store_open() use, for programs that take these
 * strings from a user and want to check them, or take them apart, before starting anything.
 * Syntax and address form only: nothing is looked up and no socket is opened.
 * ------------------------------------------------------------------------------------------- */

/**
 * kvf_session_id_parse - split a session id "ip:port", "[ipv6]:port" or "host:port".
 * @sid:      the session id. Port 0 is accepted: kvf_engine_create() reads it as "pick a free
 *            port".
 * @host:     receives the host: an IPv4 address, an IPv6 address without its brackets, or a host
 *            name, NUL-terminated; may be NULL.
 * @host_len: bytes at @host; KVF_SESSION_ID_MAX is always enough.
 * @port:     receives the port; may be NULL.
 * Returns 0; -KVF_EINVAL for a malformed id, with a last-error message naming the bad part, e.g.
 * "session id 10.0.0.1000:5: 10.0.0.1000 is not a valid IPv4 address"; -KVF_ERANGE when the host
 * does not fit in @host_len bytes (nothing is written then).
 */
KVF_API int kvf_session_id_parse(const char *sid, char *host, size_t host_len, uint16_t *port);

/**
 * kvf_session_id_format - write the session id of @host and @port: "host:port", or
 * "[host]:port" for an IPv6 address. kvf_session_id_parse() of the result gives @host and @port
 * back, so parse-then-format spells any accepted id the one way the engine spells it
 * (kvf_engine_session_id()), e.g. "10.0.0.1:050051" as "10.0.0.1:50051".
 * @host: an IPv4 address, an IPv6 address (without brackets) or a host name.
 * @port: the port; 0 gives an id that kvf_engine_create() reads as "pick a free port".
 * @buf:  receives the id, NUL-terminated.
 * @len:  bytes at @buf; KVF_SESSION_ID_MAX is always enough.
 * Returns 0; -KVF_EINVAL when @host is not a valid host, naming it; -KVF_ERANGE when the id does
 * not fit in @len bytes (nothing is written then).
 */
KVF_API int kvf_session_id_format(const char *host, uint16_t port, char *buf, size_t len);

/**
 * kvf_store_url_parse - check a config-store URL as kvf_store_open() does, and return its scheme
 * and its first endpoint.
 * @url:      "tcp://host:port", "tcp://[ipv6]:port", "etcd://host:port[,host:port...]" or
 *            "redis://[user:password@]host:port[/db]" (etcd:// takes "user:password@" too). Port 0 is
 *            refused: it names no store to connect to. "p2p://" (exactly) is no store: engines
 *            ask each peer for its records on the peer's session port (docs/protocol.md); it
 *            gives the host "" and the port 0.
 * @scheme:   receives "tcp", "etcd", "redis" or "p2p" (a static string); may be NULL.
 * @host:     receives the first endpoint's host (an IPv6 address without its brackets),
 *            NUL-terminated; may be NULL.
 * @host_len: bytes at @host; KVF_SESSION_ID_MAX is always enough.
 * @port:     receives the first endpoint's port; may be NULL.
 * Returns 0; -KVF_EINVAL for a malformed URL, with a last-error message naming the bad part, e.g.
 * "store url tcp://192.168.1.1000:8000: 192.168.1.1000 is not a valid IPv4 address";
 * -KVF_ERANGE when the host does not fit in @host_len bytes (nothing is written then).
 */
KVF_API int kvf_store_url_parse(const char *url, const char **scheme, char *host, size_t host_len,
                                uint16_t *port);

/* ---------------------------------------------------------------------------------------------
 * TLS for the config store
 *
 * One set of TLS options, referenced by kvf_store_server_opts_t.tls (the built-in store),
 * kvf_store_opts_t.tls (a store client: tcp:// and etcd://) and kvf_config_t.tls (an engine's
 * store client). The store URL stays tcp://: TLS is on when the options say so (enable), on
 * both ends; a mismatch fails at once on both sides (docs/security.md).
 * ------------------------------------------------------------------------------------------- */

/*
 * TLS options; fill with kvf_tls_opts_init(), then set fields. The strings are the caller's and
 * are read when the handle that uses them is created (files too: a certificate replaced later
 * takes effect for the next store or engine). File lists are comma-separated (so no path may
 * contain ',', ';' or ':'). Connections are TLS 1.3 only.
 *
 * Client (kvf_store_opts_t, kvf_config_t): verifies the server's certificate against ca_file /
 * ca_path (the system's CA store when neither is set and no fingerprint is), with the URL's host
 * (or server_name) as the name it must carry; or, with fingerprint, against that SHA-256
 * fingerprint (then the CA check is made only when a CA is set, and the name is not checked).
 * A client certificate (cert_file + key) is presented when set: mutual TLS.
 *
 * Server (kvf_store_server_opts_t): presents cert_file with its key (both required). With
 * ca_file or ca_path it requires every client to present a certificate signed by that CA
 * (mutual TLS); without, it accepts clients without certificates.
 *
 * Both: crl_file / crl_path make the peer's certificate be checked against those revocation
 * lists (X509_V_FLAG_CRL_CHECK: the peer's issuer must then have a CRL loaded).
 */
typedef struct {
    size_t size;                   /* sizeof(kvf_tls_opts_t), set by kvf_tls_opts_init() */
    uint32_t enable;               /* 1: TLS on; 0 [default]: plain TCP, every field ignored */
    const char *ca_file;           /* PEM file(s) of trusted CA certificates */
    const char *ca_path;           /* a directory of CA certificates (and CRLs) in OpenSSL's
                                      hashed layout (`openssl rehash DIR`) */
    const char *cert_file;         /* this side's certificate chain, PEM */
    const char *key_file;          /* its private key, PEM, possibly encrypted */
    const char *key_pem;           /* or the private key itself, PEM text (instead of key_file) */
    const char *key_password_file; /* file whose first line is the key's password */
    const char *key_password;      /* or the password itself (instead of key_password_file) */
    const char *crl_file;          /* PEM file(s) of certificate revocation lists */
    const char *crl_path;          /* a hashed directory of CRLs (`openssl rehash DIR`) */
    const char *server_name;       /* client: the name the server's certificate must carry, and
                                      the SNI; NULL [default]: the host of the store URL */
    const char *fingerprint;       /* client: the server certificate's SHA-256, 64 hex digits
                                      (colons allowed, "sha256:" prefix allowed) */
} kvf_tls_opts_t;

/** kvf_tls_opts_init - fill @opts with the defaults (TLS off) and set its size field. */
KVF_API void kvf_tls_opts_init(kvf_tls_opts_t *opts);

/**
 * kvf_tls_opts_check - check @opts as a client (@server 0) or a server (@server 1) would use
 * them: every file readable, certificates, keys and CRLs parse, the key's password is right and
 * the key matches the certificate, the fingerprint is 64 hex digits.
 * Returns 0 (also for NULL or enable 0), -errno for a file that cannot be read (the message
 * names it), -KVF_EINVAL for a malformed or missing option (named), -KVF_ETLS for what OpenSSL
 * refuses (with its reason, e.g. "wrong password for the private key F (bad decrypt)").
 */
KVF_API int kvf_tls_opts_check(const kvf_tls_opts_t *opts, int server);

/* ---------------------------------------------------------------------------------------------
 * Config store: server
 *
 * The built-in store (URL scheme tcp://) is an in-memory key-value store with get-with-wait,
 * compare-and-swap, atomic add, prefix list, prefix watch and leases. Its wire protocol is in
 * docs/protocol.md.
 * ------------------------------------------------------------------------------------------- */

/* Limits of the built-in store. A key, value, frame or list answer beyond its limit is refused
 * with -KVF_ETOOBIG; a connection beyond KVF_STORE_MAX_CLIENTS (the default of
 * kvf_store_server_opts_t.max_clients) is closed at once (the client sees -KVF_ESTOREDOWN); watches or waiters beyond their per-connection limit get -KVF_EBUSY; a
 * lease TTL outside 1..KVF_STORE_MAX_LEASE_TTL_MS gets -KVF_EINVAL. */
#define KVF_STORE_MAX_KEY_LEN 1024u          /* bytes; keys are non-empty */
#define KVF_STORE_MAX_VALUE_LEN (16u << 20)  /* bytes; values may be empty */
#define KVF_STORE_MAX_LIST_KEYS 100000u      /* key/value pairs in one list answer */
#define KVF_STORE_MAX_FRAME_LEN (64u << 20)  /* bytes of one frame body */
#define KVF_STORE_MAX_CLIENTS 4096u          /* connections served at once */
#define KVF_STORE_MAX_WATCHES_PER_CLIENT 1024u
#define KVF_STORE_MAX_WAITERS_PER_CLIENT 1024u /* get-with-wait requests pending per connection */
#define KVF_STORE_MAX_LEASE_TTL_MS (24u * 3600u * 1000u)

typedef struct kvf_store_server kvf_store_server_t;

/*
 * Bounds of a built-in store server, for kvf_store_server_start_opts(); fill with
 * kvf_store_server_opts_init() and change fields (the defaults are in brackets). A "client" in the
 * per-client quotas is a source IP address: keys and their bytes count against the address of the
 * connection that last wrote them, leases against the one that granted them, until they are
 * deleted or end. A request that would pass a quota is refused with -KVF_EBUSY and a message
 * naming the limit and its value, e.g. "quota max_keys_per_client (100000) reached: 127.0.0.2
 * holds 100000 keys"; nothing else changes. Every field must be at least 1.
 */
typedef struct {
    size_t size;                     /* sizeof(kvf_store_server_opts_t), set by the init */
    uint32_t max_clients;            /* connections served at once [4096] */
    uint32_t max_clients_per_addr;   /* of them, from one IP address [1024] */
    uint32_t idle_timeout_ms;        /* a connection that sends nothing for this long, and has no
                                        pending get-with-wait and no watch, is closed; 100 ..
                                        86400000 [60000]. kvf_store_t clients ping when quiet. */
    uint64_t max_keys;               /* keys held [1000000] */
    uint64_t max_keys_per_client;    /* [100000] */
    uint64_t max_bytes;              /* bytes of keys and values held [1 GiB] */
    uint64_t max_bytes_per_client;   /* [64 MiB] */
    uint32_t max_leases;             /* leases alive [100000] */
    uint32_t max_leases_per_client;  /* [10000] */
    uint32_t max_watches;            /* watches registered [65536] */
    uint32_t max_watches_per_client; /* over all connections of an address [4096]; one connection
                                        has at most KVF_STORE_MAX_WATCHES_PER_CLIENT */
    uint64_t max_output_bytes;       /* answers and events a connection has not read yet; past
                                        it the connection is closed (logged) [256 MiB] */
    uint64_t max_output_bytes_total; /* the same, all connections together; past it a connection
                                        that is behind gets closed [1 GiB] */
    const char *auth_key_file;       /* the cluster secret (see kvf_auth_keygen()): every client
                                        must prove it holds the same key before any request is
                                        read. NULL or "" [default]: $KVFERRY_AUTH_KEY_FILE, and
                                        when that is unset too, no authentication (a server on a
                                        non-loopback address then warns at start). */
    const char *admin_key_file;      /* the operators' key (kvf_auth_keygen()), needs an auth
                                        key: a client that proves it (kvf_store_opts_t.
                                        admin_key_file) may change and delete any key and revoke
                                        any lease. With an auth key every other client may
                                        change only keys bound to leases it granted itself (and
                                        keys with no lease), and a session's records
                                        (".../sessions/S", ".../regions/S") only when it names
                                        that session (kvf_store_opts_t.session_id); reads stay
                                        open to every authenticated client. NULL or "" [default]:
                                        $KVFERRY_ADMIN_KEY_FILE, else none. */
    const kvf_tls_opts_t *tls;       /* TLS for every connection (kvf_tls_opts_t: the server's
                                        certificate and key; a CA makes it mutual TLS). NULL
                                        [default]: plain TCP. A plain client is answered "this
                                        store requires TLS" (-KVF_ETLS) and closed; with an auth
                                        key too, the handshake runs inside TLS. */
} kvf_store_server_opts_t;

/** kvf_store_server_opts_init - fill @opts with the defaults and set its size field. */
KVF_API void kvf_store_server_opts_init(kvf_store_server_opts_t *opts);

/**
 * kvf_store_server_start - start a built-in config store in this process.
 * @listen_url: "tcp://host:port" to listen on; port 0 picks a free port (see
 *              kvf_store_server_url()). Host "0.0.0.0" or "[::]" listens on every address.
 * @out:        receives the server handle.
 * The server runs on its own thread with a single-threaded epoll loop. It holds everything in
 * memory; stopping it loses all keys (clients re-publish theirs when they reconnect).
 * Returns 0, -KVF_EINVAL for a malformed URL (the message names it), or -errno from bind/listen
 * (e.g. -EADDRINUSE).
 */
KVF_API int kvf_store_server_start(const char *listen_url, kvf_store_server_t **out);

/**
 * kvf_store_server_start_opts - kvf_store_server_start() with bounds other than the defaults.
 * @opts: NULL for the defaults (then it is kvf_store_server_start()).
 * Returns what kvf_store_server_start() returns, and -KVF_EINVAL naming a field out of range.
 */
KVF_API int kvf_store_server_start_opts(const char *listen_url, const kvf_store_server_opts_t *opts,
                                        kvf_store_server_t **out);

/**
 * kvf_store_server_url - the URL the server actually listens on ("tcp://127.0.0.1:40123"),
 * with the chosen port when it was started with port 0. Valid until kvf_store_server_stop().
 */
KVF_API const char *kvf_store_server_url(const kvf_store_server_t *srv);

/**
 * kvf_store_server_stop - stop the server, close every client connection and free it.
 * Clients blocked in a request get an error at once. NULL is a no-op.
 */
KVF_API void kvf_store_server_stop(kvf_store_server_t *srv);

/**
 * kvf_store_server_wait - block until the server stops after kvf_store_server_shutdown().
 * Used by `kvferry store`, whose signal handler calls kvf_store_server_shutdown(). The handle
 * must still be freed with kvf_store_server_stop().
 * Returns 0 after a clean shutdown, or a negative code if the event loop failed.
 */
KVF_API int kvf_store_server_wait(kvf_store_server_t *srv);

/**
 * kvf_store_server_shutdown - ask the server to stop; async-signal-safe (it writes an eventfd),
 * so it may be called from a SIGINT/SIGTERM handler. kvf_store_server_wait() then returns.
 */
KVF_API void kvf_store_server_shutdown(kvf_store_server_t *srv);

/** What a built-in store server counts, from kvf_store_server_stats(). */
typedef struct {
    size_t size;        /* sizeof(kvf_store_server_stats_t) */
    uint64_t uptime_ms; /* since the server started */
    uint64_t clients;   /* connections open now */
    uint64_t keys;      /* keys held now */
    uint64_t leases;    /* leases alive now */
    uint64_t waiters;   /* get-with-wait requests parked now */
    uint64_t ops;       /* requests served since the start */
    uint64_t bytes_in;  /* bytes received from clients since the start */
    uint64_t bytes_out; /* bytes sent to clients since the start */
} kvf_store_server_stats_t;

/**
 * kvf_store_server_stats - a snapshot of what @srv counts. Each field is read on its own (the
 * loop thread keeps them with relaxed atomics), so two fields may be a moment apart.
 * Returns 0, or -KVF_EINVAL for a NULL argument.
 */
KVF_API int kvf_store_server_stats(const kvf_store_server_t *srv, kvf_store_server_stats_t *out);

/**
 * kvf_store_server_stats_prometheus - render @s in the Prometheus text format 0.0.4:
 * kvferry_store_clients, kvferry_store_keys, kvferry_store_leases, kvferry_store_waiters
 * (gauges), kvferry_store_ops_total, kvferry_store_rx_bytes_total, kvferry_store_tx_bytes_total
 * (counters; ops per second is their rate()), kvferry_store_uptime_seconds.
 * @out: receives a malloc'ed, NUL-terminated string (free() it); @len its length (may be NULL).
 * Returns 0, -KVF_EINVAL, -KVF_ENOMEM.
 */
KVF_API int kvf_store_server_stats_prometheus(const kvf_store_server_stats_t *s, char **out,
                                              size_t *len);

/* ---------------------------------------------------------------------------------------------
 * Config store: client
 * ------------------------------------------------------------------------------------------- */

typedef struct kvf_store kvf_store_t;

/** Options for kvf_store_open(). Fill with kvf_store_opts_init(), then change fields. */
typedef struct {
    size_t size;              /* sizeof(kvf_store_opts_t), set by kvf_store_opts_init() */
    uint32_t connect_timeout_ms; /* how long kvf_store_open() waits for the store to answer;
                                    0 = fail at once if it cannot connect. Default 10000. */
    uint32_t request_timeout_ms; /* bound on every request (a get-with-wait adds its own wait);
                                    also how long a request waits for a reconnection, and how long
                                    the store may leave a lease keep-alive (or the probe sent
                                    after a request timed out) unanswered before the client drops
                                    the connection as dead and reconnects (TCP_USER_TIMEOUT and
                                    TCP keep-alives are set from it too, at least 1 s). Default
                                    5000 */
    const char *auth_key_file;   /* tcp:// and p2p://: the cluster secret the built-in store
                                    (or, on p2p://, the engines asked for records) requires
                                    (kvf_auth_keygen()). NULL or "" (default):
                                    $KVFERRY_AUTH_KEY_FILE, else none. A store that refuses the
                                    key, or wants one when none is set, fails the open at once
                                    with -KVF_EAUTH. */
    const char *admin_key_file;  /* tcp:// only: prove the store's admin key instead of the
                                    cluster secret, as an operator (`kvferry kv
                                    --admin-key-file`): such a client may change any key and
                                    revoke any lease. NULL or "" (default): none (the variable
                                    $KVFERRY_ADMIN_KEY_FILE is read by `kvferry kv` only, never
                                    by an engine's store client). Without it, a change to a key
                                    bound to another client's lease fails with -EACCES. */
    const kvf_tls_opts_t *tls;   /* tcp://: TLS 1.3 to a built-in store started with TLS;
                                    etcd://: https to etcd with these CA, certificate, key and
                                    CRL files, server name and fingerprint (as for tcp://; a CRL
                                    directory or several CA or CRL files: -KVF_ENOTSUP);
                                    redis://: refused (-KVF_ENOTSUP: Debian's hiredis has no
                                    TLS). A failed handshake or certificate check (a fingerprint
                                    or name that does not match too) fails the open at once with
                                    -KVF_ETLS and the reason. NULL [default]: plain TCP
                                    (http for etcd). */
    const char *session_id;      /* tcp:// with a key, and p2p://: the engine session this client
                                    speaks for (kvf_engine_create() sets it to the engine's).
                                    With a key, a built-in store lets only a client that names
                                    session S (or an operator with the admin key) change or
                                    delete the keys ".../sessions/S" and ".../regions/S";
                                    anyone else gets -EACCES. Any holder of the cluster key may
                                    name any session: this keeps members apart, it does not
                                    isolate one that means harm (docs/security.md). NULL
                                    (default): an anonymous member, which may not change any
                                    session's records. */
} kvf_store_opts_t;

/** kvf_store_opts_init - fill @opts with the defaults and set its size field. */
KVF_API void kvf_store_opts_init(kvf_store_opts_t *opts);

/**
 * kvf_store_open - connect to a config store.
 * @url:  "tcp://host:port" (the built-in store), "etcd://[user:password@]host:port[,host:port...]"
 *        (etcd v3.4+ through its JSON gateway; requests fail over between the endpoints) or
 *        "redis://[user:password@]host:port[/db]" (Redis 6+; the password is never shown in
 *        messages or by kvf_store_url()). Every backend has the semantics documented below;
 *        docs/operations.md says how each is run and what it needs (Redis: keyspace
 *        notifications of expiries, turned on by the client when CONFIG SET is allowed).
 * @opts: NULL for the defaults.
 * @out:  receives the client handle.
 * Retries with backoff until the store answers or connect_timeout_ms passes, so a node started
 * before its store simply waits for it. Afterwards the client reconnects on its own; leases it
 * granted are re-established and keys set under them re-published after the store restarts (or,
 * on etcd and Redis, whenever the store lost them).
 * Returns 0, -KVF_EINVAL for a malformed URL (at once, naming the bad part),
 * -KVF_ESTOREDOWN when the store did not answer in time, -KVF_EAUTH when etcd or Redis refused
 * the credentials (the password is never shown in messages), -KVF_ETLS at once when TLS failed
 * (a certificate refused on either side, TLS on one side only; see kvf_store_opts_t.tls).
 */
KVF_API int kvf_store_open(const char *url, const kvf_store_opts_t *opts, kvf_store_t **out);

/** kvf_store_close - disconnect and free; leases granted through it are revoked (best effort).
 *  Pending requests on other threads fail with -KVF_ECLOSED. NULL is a no-op. */
KVF_API void kvf_store_close(kvf_store_t *st);

/** kvf_store_url - the URL this client was opened with (redis://: with the password shown as
 *  "***"). */
KVF_API const char *kvf_store_url(const kvf_store_t *st);

/**
 * kvf_store_set - set @key to @val.
 * @key:   NUL-terminated, 1..KVF_STORE_MAX_KEY_LEN bytes.
 * @val:   @len bytes (may be binary; @len 0 is an empty value).
 * @lease: 0, or a lease from kvf_store_lease_grant(): the key is deleted when the lease ends.
 * Returns 0 or a negative code (-KVF_ENOTFOUND when @lease does not exist).
 */
KVF_API int kvf_store_set(kvf_store_t *st, const char *key, const void *val, size_t len,
                          uint64_t lease);

/**
 * kvf_store_get - read @key, waiting for it to appear for up to @wait_ms.
 * @wait_ms: 0 = answer at once; at most one hour (3,600,000), larger is -KVF_EINVAL.
 * @val:     receives a malloc'ed copy of the value, NUL-terminated for convenience (the NUL is not
 *           counted in @len); free it with free().
 * Returns 0, -KVF_ENOTFOUND (wait_ms 0 and absent), -KVF_ETIMEDOUT (still absent after
 * wait_ms), or another negative code.
 */
KVF_API int kvf_store_get(kvf_store_t *st, const char *key, uint32_t wait_ms, void **val,
                          size_t *len);

/** kvf_store_del - delete @key. Returns 0, or -KVF_ENOTFOUND when it did not exist. */
KVF_API int kvf_store_del(kvf_store_t *st, const char *key);

/**
 * kvf_store_cas - compare-and-swap.
 * @expected: the value @key must hold for the swap to happen, or NULL to require that @key is
 *            absent.
 * @val/@len: the new value. @lease as in kvf_store_set().
 * Returns 0 when swapped, -KVF_ECASMISMATCH when the current value differs.
 */
KVF_API int kvf_store_cas(kvf_store_t *st, const char *key, const void *expected,
                          size_t expected_len, const void *val, size_t len, uint64_t lease);

/**
 * kvf_store_add - atomically add @delta to the 64-bit counter at @key (absent counts as 0).
 * The value is kept as decimal text, so kvf_store_get() and `kvferry kv get` read it.
 * @result: receives the new value (may be NULL).
 * Returns 0, -KVF_EBADVALUE when the value is not a decimal integer, -KVF_ERANGE on overflow.
 */
KVF_API int kvf_store_add(kvf_store_t *st, const char *key, int64_t delta, int64_t *result);

/** One key/value pair of a list answer or a watch event. */
typedef struct {
    char *key;      /* NUL-terminated */
    void *val;      /* NUL-terminated for convenience; NULL in delete events */
    size_t val_len;
} kvf_store_kv_t;

/**
 * kvf_store_list - every key starting with @prefix ("" = all), in byte order, with its value.
 * @out/@count: receive an array; free it with kvf_store_kv_free().
 * Fetched in pages (kvf_store_list_page()), so any number of keys is listed; the result is not a
 * snapshot when keys change meanwhile.
 */
KVF_API int kvf_store_list(kvf_store_t *st, const char *prefix, kvf_store_kv_t **out,
                           size_t *count);

/* Flags of kvf_store_list_page(). */
#define KVF_STORE_LIST_KEYS_ONLY 1u /* values are not sent: each val is "" (val_len 0) */
/* Largest page kvf_store_list_page() returns (a larger @max is lowered to it). A page also
 * stops after about 4 MiB of keys and values, but always holds at least one pair. */
#define KVF_STORE_LIST_PAGE_MAX 10000u

/**
 * kvf_store_list_page - one page of the keys starting with @prefix, in byte order.
 * @after: only keys after this one (exclusive); NULL or "" to start at the first. Pass the last
 *         key of the previous page to get the next one.
 * @max:   pairs wanted, 1..KVF_STORE_LIST_PAGE_MAX (0 or more means KVF_STORE_LIST_PAGE_MAX).
 * @flags: 0 or KVF_STORE_LIST_KEYS_ONLY.
 * @out/@count: receive an array; free it with kvf_store_kv_free().
 * @more:  receives 1 when keys after this page match @prefix, else 0 (may be NULL).
 * Pages are not a snapshot: a key set or deleted between two calls may or may not appear.
 * kvf_store_list() is built on it and returns every page at once.
 */
KVF_API int kvf_store_list_page(kvf_store_t *st, const char *prefix, const char *after, size_t max,
                                unsigned flags, kvf_store_kv_t **out, size_t *count, int *more);

/** kvf_store_kv_free - free an array returned by kvf_store_list(). */
KVF_API void kvf_store_kv_free(kvf_store_kv_t *kvs, size_t count);

/** Watch event types. */
typedef enum { KVF_STORE_EVENT_PUT = 1, KVF_STORE_EVENT_DELETE = 2 } kvf_store_event_type_t;

/**
 * Watch callback. Runs on the client's I/O thread: it must not block and must not call
 * kvf_store_* functions on the same client (they would wait on the thread that runs it).
 * @kv is valid only during the call.
 */
typedef void (*kvf_store_watch_cb)(void *arg, kvf_store_event_type_t type,
                                   const kvf_store_kv_t *kv);

/**
 * kvf_store_watch - call @cb for every put and delete of a key starting with @prefix, from now
 * on, until kvf_store_unwatch(). Watches survive reconnects. What happens to events during an
 * outage depends on the store: tcp:// loses them (re-list after a reconnect if they matter);
 * etcd:// resumes from the revision after the last event delivered, so none is lost (unless etcd
 * compacted it away: then every key under @prefix is delivered again as a put); redis:// re-lists
 * @prefix and delivers the differences (puts for new or changed keys, deletes for vanished
 * ones). On redis://, only writes made through kvferry clients and expiries are seen.
 * @watch_id: receives a handle for kvf_store_unwatch().
 */
KVF_API int kvf_store_watch(kvf_store_t *st, const char *prefix, kvf_store_watch_cb cb, void *arg,
                            uint64_t *watch_id);

/** kvf_store_unwatch - stop a watch; no callback for it runs after this returns (unless it is
 *  called from that callback). Returns -KVF_ENOTFOUND for an unknown id. */
KVF_API int kvf_store_unwatch(kvf_store_t *st, uint64_t watch_id);

/**
 * kvf_store_lease_grant - create a lease of @ttl_ms (1..KVF_STORE_MAX_LEASE_TTL_MS).
 * The client keeps it alive in the background (every ttl/3) until kvf_store_lease_revoke() or
 * kvf_store_close(); when the client dies, the lease expires and its keys vanish.
 * @lease: receives the lease id to pass to kvf_store_set(). The id stays valid across
 *         reconnects: the client re-grants the lease and re-publishes its keys if the store lost them.
 * etcd counts TTLs in whole seconds (rounded up, and raised to etcd's minimum, 1.5 election
 * timeouts); on redis:// a lease is the TTL of each key set under it, kept alive by the client.
 */
KVF_API int kvf_store_lease_grant(kvf_store_t *st, uint32_t ttl_ms, uint64_t *lease);

/**
 * kvf_store_lease_keepalive_stop - stop refreshing @lease without revoking it, so that it
 * expires after its TTL as if this process had died. Meant for tests and for handing over.
 */
KVF_API int kvf_store_lease_keepalive_stop(kvf_store_t *st, uint64_t lease);

/**
 * kvf_store_lease_revoke - end @lease now; its keys are deleted (watchers see the deletes).
 * In every case the client stops keeping @lease alive and forgets it (later uses of the id get
 * -KVF_ENOTFOUND). Returns 0 when the store revoked it (or had already lost it, keys included);
 * -KVF_ESTOREDOWN when the revoke could not be done on the store (not connected, or the
 * connection the lease lived on was lost), or -KVF_ETIMEDOUT when the store did not answer in
 * time: the lease then simply expires on the store after its TTL, and its keys with it.
 */
KVF_API int kvf_store_lease_revoke(kvf_store_t *st, uint64_t lease);

/** kvf_store_ping - one round trip to the store. Returns 0 or a negative code. */
KVF_API int kvf_store_ping(kvf_store_t *st);

/* ---------------------------------------------------------------------------------------------
 * Transfer engine
 *
 * An engine is a node of the cluster, named by its session id "ip:port" (the port it listens
 * on). A Decode node registers memory; a Prefill node writes into it (or reads from it) by
 * naming the Decode's session id and an address inside one of its registered regions. Engines
 * find each other through the config store: each publishes its record and its regions under
 * kvferry/v1/<namespace>/ bound to a lease, so a dead engine's records vanish.
 * ------------------------------------------------------------------------------------------- */

typedef struct kvf_engine kvf_engine_t;

/** Roles, the seed's plus Both. The role is published and shown; it does not restrict which
 *  operations an engine may perform (a Decode may read from a Prefill, too). */
typedef enum {
    KVF_ROLE_PREFILL = 0,
    KVF_ROLE_DECODE = 1,
    KVF_ROLE_BOTH = 2,
} kvf_role_t;

/**
 * kvf_role_parse - "Prefill", "Decode" or "Both" (any case) to a role.
 * Returns 0, or -KVF_EINVAL naming @s.
 */
KVF_API int kvf_role_parse(const char *s, kvf_role_t *out);

/** kvf_role_name - "Prefill", "Decode", "Both", or "?" for other values. */
KVF_API const char *kvf_role_name(kvf_role_t role);

/** Data-path transports. AUTO picks, per peer, the first path that can reach it. */
typedef enum {
    KVF_TRANSPORT_AUTO = 0, /* loop (same process) → shm (same host) → tcp, per peer */
    KVF_TRANSPORT_TCP = 1,  /* tcp only; the engine also stops offering shm to its peers */
    KVF_TRANSPORT_SHM = 2,  /* same-host shm (process_vm_writev/readv) only, also to engines of
                               this process; a peer shm cannot reach fails with -KVF_ENOTSUP
                               and the reason */
} kvf_transport_kind_t;

/** Engine configuration. Fill with kvf_config_init(), then change fields. */
typedef struct {
    size_t size;                 /* sizeof(kvf_config_t), set by kvf_config_init() */
    uint32_t init_timeout_ms;    /* how long create waits for the store, and the first transfer
                                    to a peer waits for the peer to appear. Default 10000. */
    uint32_t op_timeout_ms;      /* bound on every transfer call. Default 30000. */
    uint32_t lease_ttl_ms;       /* lease of the engine's store records, 100..86400000 ms.
                                    Default 5000. */
    uint32_t tcp_conns_per_peer; /* TCP connections to each peer, 1..16. Default 2. */
    uint32_t tcp_chunk_bytes;    /* larger elements are split into chunks of this size, spread
                                    over the connections; 64 KiB..64 MiB. Default 4 MiB. */
    kvf_transport_kind_t transport; /* default AUTO; KVFERRY_TRANSPORT=auto|tcp|shm overrides */
    const char *ns;              /* store namespace, [A-Za-z0-9_.-]{1,64}; default "default".
                                    Engines see only peers of the same namespace. */
    uint32_t mem_huge_pages;     /* 1: kvf_mem_alloc() tries huge pages (MFD_HUGETLB, 2 MiB)
                                    first and falls back to normal pages, saying so at info
                                    level. Default 0. */
    uint32_t max_batches;        /* asynchronous batches submitted and not yet complete, per
                                    engine; 1..1048576. Default 4096. */
    uint32_t submit_blocks;      /* what kvf_transfer_submit() does when max_batches are in
                                    flight: 0 (default) fail at once with -KVF_EBUSY; 1 wait for
                                    one to complete, up to op_timeout_ms, then -KVF_EBUSY. */
    uint32_t async_threads;      /* threads that run asynchronous batches, 1..64. Default 4.
                                    Started by the first submit, or by kvf_peer_wait() once
                                    it found its peer (they then open its path).
                                    Each runs one batch at a time; a batch's chunks are
                                    pipelined over the peer's connections all the same. While
                                    batches wait for a peer that has not appeared, more threads
                                    are started (up to 64) so others are not held up. */
    uint32_t notify_queue_max;   /* notifications this engine keeps for kvf_notify_poll(); 1..
                                    1048576, default 65536. One sender may hold at most half of
                                    it (at least 1), so a flooding peer leaves room for others.
                                    When it is full, or the sender holds its share, a sender's
                                    notification waits up to 2 s for room, then its batch fails
                                    with -KVF_EBUSY (the message says its data landed). */
    uint32_t tcp_idle_timeout_ms; /* a TCP connection a peer opened to this engine is closed
                                    once it brought no request for this long (the peer
                                    reconnects on its next transfer, unnoticed); 100 ..
                                    86400000, default 60000. */
    const char *key_prefix;      /* prefix of every key the engine reads and writes in the store,
                                    1..128 characters of [A-Za-z0-9_.:/-]; NULL (default) takes
                                    $KVFERRY_KEY_PREFIX, else "kvferry/v1/". Engines see only
                                    peers that use the same prefix and namespace. */
    const char *metrics_listen;  /* "host:port": serve this engine's statistics for Prometheus
                                    at http://host:port/metrics (kvf_metrics_server_start(),
                                    kvf_stats_prometheus()) from create to destroy; port 0
                                    picks a free one. NULL or "" (default): no endpoint. */
    const char *auth_key_file;   /* the cluster secret (kvf_auth_keygen()): with a key, every
                                    tcp connection to and from this engine, and its connection
                                    to a built-in store, starts with a mutual HMAC-SHA256
                                    challenge-response, and a peer without the key is refused
                                    with -KVF_EAUTH before any byte is read or written.
                                    NULL or "" (default): $KVFERRY_AUTH_KEY_FILE, else none (an
                                    engine on a non-loopback address then warns at create).
                                    docs/security.md says what each mode protects. */
    int listen_fd;               /* -1 (default): bind the session id's address. Otherwise a TCP
                                    socket the caller already bound (listening or not; the
                                    wildcard address or the session id's), e.g. to hand out its
                                    port before the engine exists: the engine listens on a
                                    duplicate of it, so the port is never free in between. Its
                                    port must be the session id's (or the session id's port
                                    0 takes it). The caller keeps and closes its own fd. */
    const kvf_tls_opts_t *tls;   /* TLS for the engine's store connection, as
                                    kvf_store_opts_t.tls. NULL [default]: none. The data path
                                    (engine to engine) is data_tls's. */
    const kvf_tls_opts_t *data_tls; /* TLS 1.3 on every tcp connection to and from this engine
                                    (before the secret's handshake, when there is a key). The
                                    engine is the server of the connections its peers open, so
                                    cert_file and key_file are required; with ca_file or ca_path
                                    it requires its peers' certificates too (mutual TLS). As a
                                    client it verifies each peer's certificate against the CA and
                                    the address of the peer's session id (an IP SAN or a DNS
                                    name), or server_name (one name for every engine), or the
                                    fingerprint. May point to the same options as tls. Both ends
                                    must agree: a peer without it is refused with -KVF_ETLS.
                                    Shared memory (shm) is not affected. NULL [default]:
                                    $KVFERRY_TLS_DATA=1 takes tls (or the KVFERRY_TLS_*
                                    variables), else none. */
    uint32_t io_threads;         /* the tcp transport's I/O threads, 1..64: epoll loops that
                                    serve the connections peers open to this engine, and as many
                                    that read the answers on the connections it opens to peers,
                                    however many there are. 0 (default): $KVFERRY_IO_THREADS,
                                    else min(online CPUs, 4). */
} kvf_config_t;

/**
 * kvf_auth_keygen - write a new cluster secret to @path: 32 random bytes as 64 hex digits and a
 * newline, in a file created with mode 0600 (the key file of kvf_config_t.auth_key_file,
 * kvf_store_opts_t.auth_key_file, kvf_store_server_opts_t.auth_key_file and
 * $KVFERRY_AUTH_KEY_FILE; `kvferry keygen` calls this). An existing file is never overwritten.
 * A key file is read as one key of 32..128 hex digits, or two separated by white space (the
 * current key, then the previous one, both accepted during a rotation; docs/security.md), with
 * '#' comment lines. It may be a symlink; the file must be owned by this user or root, and is
 * refused when others may read it or group or others may write it, or when a key's bytes are
 * all the same (a placeholder).
 * Returns 0, -EEXIST, or another -errno with a message naming @path.
 */
KVF_API int kvf_auth_keygen(const char *path);

/** kvf_config_init - fill @cfg with the defaults and set its size field. */
KVF_API void kvf_config_init(kvf_config_t *cfg);

/**
 * kvf_engine_create - start an engine: listen, connect to the store, publish the session record.
 * @store_url:  the config store, e.g. "tcp://127.0.0.1:8000" (waited for up to init_timeout_ms),
 *              or "p2p://" for none: the engine keeps its own records and answers peers' P2P
 *              record requests on its session port, and a peer's session id alone is enough to
 *              reach it (tcp, or shm on the same host); kvf_peer_events() needs a store.
 * @session_id: "ip:port" this engine listens on and is known by; port 0 picks a free port (read
 *              the result with kvf_engine_session_id()). The ip must be an address of this host.
 * @role:       KVF_ROLE_PREFILL, KVF_ROLE_DECODE or KVF_ROLE_BOTH.
 * @device_id:  the seed's npu id (MemFabric's device number). On CPU hosts every buffer is host
 *              memory and the id selects nothing: it is only published in the session record
 *              (a device memory kind, when one is built, will use it). Must be >= 0.
 * @cfg:        NULL for the defaults.
 * @out:        receives the engine.
 * The engine is ready when this returns: its record is published and peers can reach it.
 * A session id whose port is held by a live engine is refused with -EADDRINUSE and a message
 * naming it; a record left by a dead engine is taken over.
 * Returns 0, -KVF_EINVAL (bad argument, named), -KVF_ESTOREDOWN, -KVF_EAUTH or -KVF_ETLS
 * (the store refused this engine, at once: see kvf_store_open()), or -errno from bind/listen.
 */
KVF_API int kvf_engine_create(const char *store_url, const char *session_id, kvf_role_t role,
                              int device_id, const kvf_config_t *cfg, kvf_engine_t **out);

/**
 * kvf_engine_destroy - withdraw the engine's records, close its connections and free it.
 * Calls that start on other threads once destroy has begun fail with -KVF_ECLOSED; a transfer
 * still waiting for its peer to appear gives up with -KVF_ECLOSED within 200 ms; transfers
 * already moving data are waited for (each is bounded by op_timeout_ms). No other call on @e
 * may start after it returns. NULL is a no-op.
 */
KVF_API void kvf_engine_destroy(kvf_engine_t *e);

/**
 * kvf_engine_shutdown - the first half of kvf_engine_destroy(), for wrappers that must wait for
 * their own callers before freeing: from now on calls fail with -KVF_ECLOSED and a transfer
 * waiting for its peer to appear gives up within 200 ms. Frees nothing; kvf_engine_destroy()
 * must still be called. Idempotent; NULL is a no-op.
 */
KVF_API void kvf_engine_shutdown(kvf_engine_t *e);

/** kvf_engine_session_id - this engine's session id, with the chosen port when created with 0. */
KVF_API const char *kvf_engine_session_id(const kvf_engine_t *e);

/** kvf_engine_port - the port this engine listens on (the seed's get_rpc_port). */
KVF_API uint16_t kvf_engine_port(const kvf_engine_t *e);

/**
 * kvf_mem_register - make [addr, addr+len) writable and readable by peers.
 * Exact byte bounds. Zero length, or overlap with a registered region, is refused with
 * -KVF_EINVAL naming both ranges; registering the same range twice gives -KVF_EEXIST; a range
 * not entirely mapped in this process (freed, or a wrong length) gives -EFAULT naming it.
 * The pages are faulted in (MADV_POPULATE_WRITE, or _READ for read-only memory) and the kernel
 * reads one byte of each, so that the first transfer does not pay for page faults or for the
 * first kernel access to each page (which costs about 5 us a page on some VMs, see
 * docs/performance.md); the contents are never changed. This takes about as long as that first
 * access would (tens of ms for 48 MB on such a VM, well under a ms on others).
 * Peers see the region within milliseconds (it is published to the store).
 */
KVF_API int kvf_mem_register(kvf_engine_t *e, void *addr, size_t len);

/** kvf_mem_register_batch - register @n ranges: all of them, or none on error. */
KVF_API int kvf_mem_register_batch(kvf_engine_t *e, void *const *addrs, const size_t *lens,
                                   size_t n);

/**
 * kvf_mem_unregister - withdraw the region that starts at @addr.
 * New transfers touching it fail with -KVF_ENOTREG at once; transfers already writing into or
 * reading from it are waited for, on every transport (same-host shm senders included), so once
 * it returns 0 no byte lands there any more. After op_timeout_ms it returns -KVF_ETIMEDOUT with
 * a message naming the peer still holding it; the range is unregistered all the same, and the
 * memory must stay valid until that peer ends. Over TCP a sender must keep a minimum rate, so no
 * request holds a region for longer than about 9 s. If publishing the change to the store fails, the call still succeeds
 * (this engine refuses the range; the next publication tells peers) and a warning is logged.
 * Returns -KVF_ENOTREG when no region starts at @addr.
 */
KVF_API int kvf_mem_unregister(kvf_engine_t *e, void *addr);

/**
 * kvf_mem_alloc - allocate @len bytes that peers can write into, already registered.
 * The memory is a memfd (memfd_create) mapped shared, page-aligned, zeroed and faulted in. With
 * config.mem_huge_pages it is backed by huge pages when the host has them, else by normal pages.
 * It is registered exactly [*@out, *@out + @len), like kvf_mem_register(); do not unregister it
 * yourself, free it with kvf_mem_free().
 * Same-host (shm) senders fetch the memfd once, over this engine's Unix socket (see
 * docs/protocol.md), map it and write into it with a plain memcpy instead of
 * process_vm_writev: for such a write, kvf_transfer_sync() returning 0 means the bytes are in
 * this memory. Every write is still checked against this engine's published regions.
 * @out: receives the address.
 * Returns 0; -KVF_EINVAL for @len 0 or a NULL argument (named); -errno from memfd_create,
 * ftruncate or mmap (e.g. -ENOMEM); errors of kvf_mem_register().
 */
KVF_API int kvf_mem_alloc(kvf_engine_t *e, size_t len, void **out);

/**
 * kvf_mem_free - unregister and free memory from kvf_mem_alloc().
 * Unregisters first, as kvf_mem_unregister(): new transfers into it fail with -KVF_ENOTREG
 * (shm senders drop their mapping when they next see the region list change), transfers already
 * in it are waited for. Then the memory is unmapped.
 * Returns 0; -KVF_EINVAL when @ptr is not an address kvf_mem_alloc() returned on @e (or was
 * freed); -KVF_ETIMEDOUT when transfers did not leave in op_timeout_ms: the memory then stays
 * mapped (unregistered) until kvf_engine_destroy().
 */
KVF_API int kvf_mem_free(kvf_engine_t *e, void *ptr);

/** Transfer direction, seen from the calling engine. */
typedef enum {
    KVF_OP_WRITE = 0, /* local memory -> peer's registered memory */
    KVF_OP_READ = 1,  /* peer's registered memory -> local memory */
} kvf_op_t;

/** One element of a batch. */
typedef struct {
    kvf_op_t op;
    void *local;     /* source of a write, destination of a read (need not be registered) */
    uint64_t remote; /* address inside one of the peer's registered regions */
    size_t len;      /* bytes, > 0 */
} kvf_xfer_t;

/**
 * kvf_transfer_sync - run a batch of elements against @peer and wait for all of them.
 * @peer: the peer's session id. If it has not appeared in the store yet, waits for it up to
 *        init_timeout_ms, then fails with -KVF_ENOTFOUND naming it.
 * Returns 0 only when every byte is in place: for writes, in the peer's memory; for reads, in
 * local memory. On failure returns the first error (-KVF_ENOTREG for a range outside the peer's
 * regions, -KVF_EPEERGONE, -KVF_ETIMEDOUT after op_timeout_ms, ...) with a message naming the
 * element; other elements may or may not have been transferred.
 * Elements adjacent on both sides (same op, each local and remote range continuing the previous
 * one, within one region of the peer) travel as one: a message about such a merged element ends
 * with "(element K as sent is elements I..J of the call, merged because they are adjacent)".
 * Thread-safe: many threads may transfer through one engine at once.
 */
KVF_API int kvf_transfer_sync(kvf_engine_t *e, const char *peer, const kvf_xfer_t *xfers, size_t n);

/** kvf_write - one-element kvf_transfer_sync() writing @len bytes from @local to @remote. */
KVF_API int kvf_write(kvf_engine_t *e, const char *peer, const void *local, uint64_t remote,
                      size_t len);

/** kvf_read - one-element kvf_transfer_sync() reading @len bytes at @remote into @local. */
KVF_API int kvf_read(kvf_engine_t *e, const char *peer, void *local, uint64_t remote, size_t len);

/* ---------------------------------------------------------------------------------------------
 * Asynchronous batches and notifications
 *
 * A batch may carry a notification: up to KVF_NOTIFY_MAX bytes that the target engine can read
 * (kvf_notify_poll/kvf_notify_wait) only after every byte of that batch is in its memory, on
 * every transport. It is sent after the batch's last element completed, so a batch that fails,
 * is cancelled, or whose sender dies part way never yields one. Notifications from one engine to
 * one peer arrive in the order their batches were submitted (kvf_transfer_submit) or started
 * (kvf_transfer_sync_notify), whichever order the batches complete in.
 * ------------------------------------------------------------------------------------------- */

/** Largest notification message, in bytes. */
#define KVF_NOTIFY_MAX 4096
/** Bytes of a session id with its NUL ("ip:port", the ip possibly a host name). */
#define KVF_SESSION_ID_MAX 264

/** An asynchronous batch: from kvf_transfer_submit(), freed with kvf_batch_free(). */
typedef struct kvf_batch kvf_batch_t;

/** What kvf_batch_status() and kvf_batch_wait() return besides a negative error. */
enum {
    KVF_BATCH_PENDING = 0, /* queued or running */
    KVF_BATCH_DONE = 1,    /* every element complete (and its notification delivered) */
};

/** An element's status in kvf_batch_status(): 0 done, this while it is not finished, or a
 *  negative error (-KVF_ECANCELED for an element never started: cancelled, or an earlier
 *  element of its batch failed). */
#define KVF_XFER_PENDING 1

/**
 * kvf_transfer_sync_notify - kvf_transfer_sync(), then deliver @msg to @peer once every byte is
 * in place. @n may be 0 to send the notification alone (still in order with earlier batches).
 * @msg: 0..KVF_NOTIFY_MAX bytes (NULL with @msg_len 0 sends an empty notification).
 * Returns 0 when the data is in place and the peer has queued the notification; on any error
 * no notification is delivered. -KVF_ETOOBIG for @msg_len over KVF_NOTIFY_MAX; -KVF_EBUSY when
 * the peer's notification queue stayed full.
 */
KVF_API int kvf_transfer_sync_notify(kvf_engine_t *e, const char *peer, const kvf_xfer_t *xfers,
                                     size_t n, const void *msg, size_t msg_len);

/** kvf_notify_send - a notification alone: kvf_transfer_sync_notify() with no elements. */
KVF_API int kvf_notify_send(kvf_engine_t *e, const char *peer, const void *msg, size_t msg_len);

/**
 * kvf_transfer_submit - start a batch in the background and return at once.
 * The element array is copied; the memory the elements name must stay valid (and the local
 * memory of writes unchanged) until the batch is complete. Elements run in order on the
 * engine's async threads, bounded by op_timeout_ms from when the batch starts running; the
 * peer is looked up as by kvf_transfer_sync() (waiting up to init_timeout_ms for it to appear).
 * A small batch of writes without a message (up to 128 KiB, one request) to a peer whose tcp
 * path is open and whose cached regions hold every element, submitted while no batch is queued
 * and with more than one async thread, is posted instead: this call sends
 * it on a connection that can take it without waiting (socket room, nobody sending) and returns,
 * and the answer completes it on the I/O thread that reads it, with no hop to an async thread
 * (its op_timeout_ms counts from the submit, checked once a second).
 * KVFERRY_SUBMIT_QUEUE=1 queues every batch.
 * @msg/@msg_len: an optional notification (@msg NULL: none), as kvf_transfer_sync_notify().
 * @out: receives the batch.
 * Returns 0; -KVF_EINVAL for a bad element (named, as kvf_transfer_sync()); -KVF_ETOOBIG for a
 * message over KVF_NOTIFY_MAX; -KVF_EBUSY when config.max_batches are in flight (at once, or after
 * op_timeout_ms with config.submit_blocks); -KVF_ECLOSED while the engine is being destroyed.
 */
KVF_API int kvf_transfer_submit(kvf_engine_t *e, const char *peer, const kvf_xfer_t *xfers,
                                size_t n, const void *msg, size_t msg_len, kvf_batch_t **out);

/**
 * kvf_batch_status - poll a batch.
 * @elem_status: NULL, or room for @n statuses: entry i receives element i's status (0 done, or a
 *               negative error) once the batch is complete, KVF_XFER_PENDING for every entry
 *               while it is pending; @n may be less than the batch's size.
 * Returns KVF_BATCH_PENDING, KVF_BATCH_DONE, or the batch's first error (negative), with its
 * message available from kvf_last_error(). Never blocks.
 */
KVF_API int kvf_batch_status(kvf_batch_t *b, int *elem_status, size_t n);

/**
 * kvf_batch_wait - wait up to @timeout_ms (negative: until it completes, which op_timeout_ms
 * bounds) for @b to complete.
 * Returns as kvf_batch_status(): KVF_BATCH_PENDING when the time ran out first.
 */
KVF_API int kvf_batch_wait(kvf_batch_t *b, int timeout_ms);

/**
 * kvf_batch_cancel - stop a batch: elements (and, over tcp, chunks of elements) not yet started
 * are not sent; elements already started complete or fail as they would have. A queued batch
 * completes at once. The batch then fails with -KVF_ECANCELED unless everything was already
 * done, and delivers no notification. Returns 0 (also when the batch is already complete).
 */
KVF_API int kvf_batch_cancel(kvf_batch_t *b);

/** kvf_batch_size - the number of elements of @b. */
KVF_API size_t kvf_batch_size(const kvf_batch_t *b);

/**
 * kvf_batch_free - free a batch. A batch still pending is cancelled and waited for first (no
 * element touches its memory after this returns). May be called after kvf_engine_destroy(),
 * which completes every batch of the engine. NULL is a no-op.
 */
KVF_API void kvf_batch_free(kvf_batch_t *b);

/** A notification as received. */
typedef struct {
    char sender[KVF_SESSION_ID_MAX]; /* the sending engine's session id */
    size_t len;                      /* bytes of msg */
    unsigned char msg[KVF_NOTIFY_MAX];
} kvf_notify_t;

/**
 * kvf_notify_poll - take up to @max queued notifications, oldest first, without waiting.
 * Returns the number taken (0 if none), or a negative error.
 */
KVF_API int kvf_notify_poll(kvf_engine_t *e, kvf_notify_t *out, size_t max);

/**
 * kvf_notify_wait - as kvf_notify_poll(), waiting up to @timeout_ms (negative: for ever, until
 * kvf_engine_shutdown()) for the first one. Returns the number taken, 0 when the time ran out,
 * -KVF_ECLOSED when the engine is being destroyed.
 */
KVF_API int kvf_notify_wait(kvf_engine_t *e, kvf_notify_t *out, size_t max, int timeout_ms);

/* ---------------------------------------------------------------------------------------------
 * Peers
 * ------------------------------------------------------------------------------------------- */

/**
 * kvf_notify_wait_peer - as kvf_notify_wait(), for a caller that waits for @peer in particular
 * (a Prefill for its Decode's answer): notifications from any sender are returned as they come,
 * but once @peer is known to be gone (see kvf_peer_check(), asked every 200 ms while nothing
 * arrives) and nothing is queued, it returns -KVF_EPEERGONE with a message naming @peer, within
 * about a second of its death rather than at @timeout_ms. Returns the number taken, 0 at
 * @timeout_ms, or a negative code (-KVF_EINVAL for a malformed @peer).
 */
KVF_API int kvf_notify_wait_peer(kvf_engine_t *e, const char *peer, kvf_notify_t *out, size_t max,
                                 int timeout_ms);

/**
 * kvf_peer_check - is @peer still there? Returns 0 while its path says so, or
 * -KVF_EPEERGONE with a message naming it when it is gone: its session record is no longer in
 * the store (its engine was destroyed, or never started), or the path this engine uses to it
 * says so (tcp: no connection is up and a new one is refused or unanswered within
 * init_timeout_ms; shm: its process exited; in-process: its engine was destroyed). Cheap while a
 * connection is up; a peer not reached before is looked up and reached first. After
 * -KVF_EPEERGONE the next transfer to that session id looks it up afresh (it may have
 * restarted).
 */
KVF_API int kvf_peer_check(kvf_engine_t *e, const char *peer);

/**
 * kvf_peer_wait - wait up to @timeout_ms for @peer's session record to be in the store (that is,
 * for an engine with that session id to be up, in this engine's namespace). With "p2p://" the
 * peer itself is asked for its record until it answers. Once it is there, the engine also starts
 * its async threads (if no submit did yet) and, on one of them, looks the peer up and opens its
 * path (as kvf_peer_check() would), so that the first transfer to it does not wait for either;
 * that runs in the background and is best effort: this call does not wait for it, and a failure
 * is met and reported by the first transfer, as before.
 * Returns 0; -KVF_ETIMEDOUT naming the peer; -KVF_EINVAL for a malformed session id;
 * -KVF_ECLOSED when the engine is being destroyed.
 */
KVF_API int kvf_peer_wait(kvf_engine_t *e, const char *peer, uint32_t timeout_ms);

typedef enum {
    KVF_PEER_JOINED = 1, /* a session record appeared */
    KVF_PEER_LEFT = 2,   /* it was withdrawn, or its lease expired (the engine died) */
} kvf_peer_event_type_t;

typedef struct {
    kvf_peer_event_type_t type;
    char sid[KVF_SESSION_ID_MAX];
} kvf_peer_event_t;

/**
 * kvf_peer_events - take up to @max peer events, waiting up to @timeout_ms (negative: for ever)
 * for the first. The first call subscribes (a watch on the store's session records) and reports
 * every peer already present as KVF_PEER_JOINED; later calls report changes since the previous
 * call. This engine itself is never reported. Events that arrive while the store connection is
 * down are lost; at most 4096 are kept (the oldest are dropped, with a warning).
 * Returns the number taken, 0 when the time ran out, or a negative error; -KVF_ENOTSUP for an
 * engine created with "p2p://" (no directory of sessions to watch; kvf_peer_wait() and
 * kvf_peer_check() still work for a session id the caller knows).
 */
KVF_API int kvf_peer_events(kvf_engine_t *e, kvf_peer_event_t *out, size_t max, int timeout_ms);

/** A registered region as seen by peers. */
typedef struct {
    uint64_t addr;
    uint64_t len;
} kvf_region_info_t;

/**
 * kvf_engine_peer_transport - the path this engine uses to @peer: "loop" (an engine of this
 * process: memcpy), "shm" (same host: process_vm_writev/readv) or "tcp". Chosen at the first
 * transfer to the peer (or kvf_peer_check(), or in the background after kvf_peer_wait() found
 * it) and again after the peer process went away.
 * @name: receives a static string.
 * Returns 0, or -KVF_ENOTFOUND when no transfer to @peer has been made yet.
 */
KVF_API int kvf_engine_peer_transport(kvf_engine_t *e, const char *peer, const char **name);

/**
 * kvf_peer_regions - the regions @peer has published, sorted by address (fetched fresh from the
 * store, waiting up to init_timeout_ms for the peer to appear).
 * @out/@n: receive a malloc'ed array; free() it. @n may be 0.
 */
KVF_API int kvf_peer_regions(kvf_engine_t *e, const char *peer, kvf_region_info_t **out, size_t *n);

/* ---------------------------------------------------------------------------------------------
 * Statistics
 *
 * Every engine counts what it does. Counting costs seven relaxed atomic additions per transfer
 * call (not per element, byte or chunk) and a clock read at each end of the call; a snapshot
 * takes the peer-cache lock for the time it sums the per-peer counters. "Write" and "read" are
 * seen from the engine that starts the transfer: a write sends bytes (tx), a read receives them
 * (rx). Counts only grow, from the engine's creation.
 * ------------------------------------------------------------------------------------------- */

/** Buckets of the transfer-time histograms, the last unbounded (kvf_stats_t.lat_bound_us). */
#define KVF_STATS_LAT_BUCKETS 20
/** Slots of kvf_stats_t.errors: slot i > 0 counts -(KVF_ERRNO_OFFSET + i); slot 0 every other
 *  code (system errors, -errno). */
#define KVF_STATS_ERR_SLOTS 32
/** Transports a snapshot reports at most (kvf_stats_t.transports). */
#define KVF_STATS_MAX_TRANSPORTS 8
/** Bytes of a transport name in a snapshot, with its NUL. */
#define KVF_STATS_NAME_MAX 16

/** Operations counted for one transport or one peer. An operation is one element of a batch;
 *  a call is one kvf_transfer_sync() (or notify variant) or one asynchronous batch. Bytes and
 *  operations are counted when their call succeeds, so they are bytes that arrived. */
typedef struct {
    uint64_t write_bytes; /* bytes written to peers (tx) */
    uint64_t read_bytes;  /* bytes read from peers (rx) */
    uint64_t write_ops;
    uint64_t read_ops;
    uint64_t calls;       /* calls that succeeded */
    uint64_t failed;      /* calls that failed (their code is in kvf_stats_t.errors) */
} kvf_stats_counts_t;

/** One transport's counts and the histogram of its calls' durations. */
typedef struct {
    char name[KVF_STATS_NAME_MAX]; /* "loop", "shm", "tcp" */
    kvf_stats_counts_t c;
    uint64_t lat_count[KVF_STATS_LAT_BUCKETS]; /* calls (succeeded or failed) whose duration was
                                                  at most lat_bound_us[i] and above
                                                  lat_bound_us[i-1] (not cumulative) */
    uint64_t lat_sum_us;                       /* the sum of those durations, microseconds */
} kvf_stats_transport_t;

/** One peer this engine has transferred to, as in its peer cache. */
typedef struct {
    char sid[KVF_SESSION_ID_MAX];
    char transport[KVF_STATS_NAME_MAX]; /* the path in use ("" before the first was chosen) */
    kvf_stats_counts_t c;
    uint64_t in_flight; /* calls to this peer running now */
} kvf_stats_peer_t;

/** A snapshot of an engine's statistics, filled by kvf_engine_stats() or
 *  kvf_engine_stats_fetch(); release with kvf_stats_free(). */
typedef struct {
    size_t size;                               /* sizeof(kvf_stats_t) */
    char session_id[KVF_SESSION_ID_MAX];
    char role[KVF_STATS_NAME_MAX];             /* "Prefill", "Decode", "Both" */
    uint64_t uptime_ms;                        /* since the engine was created */
    uint64_t lat_bound_us[KVF_STATS_LAT_BUCKETS]; /* upper bounds; the last is UINT64_MAX */
    size_t ntransports;
    kvf_stats_transport_t transports[KVF_STATS_MAX_TRANSPORTS];
    uint64_t errors[KVF_STATS_ERR_SLOTS];      /* failed calls by code, see KVF_STATS_ERR_SLOTS */
    uint64_t in_flight;                        /* transfer calls running now (once their
                                                  peer was found: the peers' sum) */
    uint64_t regions;                          /* regions registered now */
    uint64_t region_bytes;                     /* their bytes */
    uint64_t connections;                      /* peers with a path open (the peer cache) */
    uint64_t notify_sent;                      /* notifications peers accepted from this engine */
    uint64_t notify_received;                  /* notifications queued here by peers */
    uint64_t notify_queued;                    /* received and not yet taken by kvf_notify_poll */
    size_t npeers;
    kvf_stats_peer_t *peers;                   /* @npeers entries, or NULL */
} kvf_stats_t;

/**
 * kvf_engine_stats - a snapshot of @e's statistics.
 * @out: filled entirely; its peers array is allocated. Release it with kvf_stats_free().
 * Counters of different fields are read one after another, not atomically together, so a
 * transfer that ends during the call may be in one field and not yet in another.
 * Returns 0, -KVF_EINVAL for a NULL argument, -KVF_ENOMEM.
 */
KVF_API int kvf_engine_stats(kvf_engine_t *e, kvf_stats_t *out);

/** kvf_stats_free - free what a snapshot allocated (not @s itself); @s may then be reused.
 *  NULL is a no-op. */
KVF_API void kvf_stats_free(kvf_stats_t *s);

/**
 * kvf_stats_json - render a snapshot as one JSON object (the shape is in docs/operations.md;
 * Python's get_stats() returns it as a dict).
 * @out: receives a malloc'ed, NUL-terminated string (free() it); @len its length (may be NULL).
 * Returns 0, -KVF_EINVAL, -KVF_ENOMEM.
 */
KVF_API int kvf_stats_json(const kvf_stats_t *s, char **out, size_t *len);

/**
 * kvf_stats_prometheus - render a snapshot in the Prometheus text format 0.0.4:
 * kvferry_tx_bytes_total, kvferry_rx_bytes_total, kvferry_tx_ops_total, kvferry_rx_ops_total,
 * kvferry_xfer_calls_total and kvferry_xfer_failed_total by {transport}, the same by {peer,
 * transport} as kvferry_peer_*, kvferry_xfer_time_seconds (histogram by {transport}),
 * kvferry_errors_total{code}, and gauges (docs/operations.md lists them all).
 * @out/@len as kvf_stats_json(). Returns 0, -KVF_EINVAL, -KVF_ENOMEM.
 */
KVF_API int kvf_stats_prometheus(const kvf_stats_t *s, char **out, size_t *len);

/**
 * kvf_engine_stats_fetch - ask the engine listening at @session_id for its statistics, over its
 * tcp port (a STATS frame, docs/protocol.md). Needs no store and no engine of one's own.
 * The cluster secret comes from $KVFERRY_AUTH_KEY_FILE, and TLS (for an engine with data TLS)
 * from $KVFERRY_TLS_DATA=1 with the KVFERRY_TLS_* variables, as `kvferry info` sets them.
 * @timeout_ms: bound on connecting and on the answer (0: 5000).
 * @out: filled as by kvf_engine_stats(); release with kvf_stats_free().
 * Returns 0; -KVF_EINVAL for a malformed session id; -ECONNREFUSED (nothing listens there),
 * -KVF_ETIMEDOUT, -KVF_EPROTO (what answered is no kvferry engine, or an older one), -KVF_EAUTH
 * or -KVF_ETLS (the engine requires the secret or TLS, or refused this side's), each with a
 * message naming the session id.
 */
KVF_API int kvf_engine_stats_fetch(const char *session_id, uint32_t timeout_ms, kvf_stats_t *out);

/* ---------------------------------------------------------------------------------------------
 * Metrics endpoint
 *
 * A small HTTP responder for Prometheus scrapes: GET /metrics answers the text a callback
 * renders. It is built to face a hostile network: at most KVF_METRICS_MAX_CONNS connections at
 * once (more are closed at once), a request larger than KVF_METRICS_MAX_REQUEST bytes or slower
 * than KVF_METRICS_TIMEOUT_MS is closed with no answer beyond an error status, and one thread
 * serves everything without blocking on any client.
 * ------------------------------------------------------------------------------------------- */

#define KVF_METRICS_MAX_CONNS   16u
#define KVF_METRICS_MAX_REQUEST 8192u
#define KVF_METRICS_TIMEOUT_MS  5000u

typedef struct kvf_metrics_server kvf_metrics_server_t;

/** Renders the body of one scrape: a malloc'ed buffer of @len bytes in *@out (freed by the
 *  server). Runs on the server's thread. Returns 0, or a negative code (answered with 500). */
typedef int (*kvf_metrics_render_cb)(void *arg, char **out, size_t *len);

/**
 * kvf_metrics_server_start - serve GET /metrics on @listen ("host:port", as a session id; port 0
 * picks a free one, see kvf_metrics_server_addr()).
 * Returns 0, -KVF_EINVAL naming a malformed address, or -errno from bind/listen.
 */
KVF_API int kvf_metrics_server_start(const char *listen, kvf_metrics_render_cb render, void *arg,
                                     kvf_metrics_server_t **out);

/** kvf_metrics_server_addr - "host:port" actually listened on. Valid until stop. */
KVF_API const char *kvf_metrics_server_addr(const kvf_metrics_server_t *m);

/** kvf_engine_metrics_addr - "host:port" of @e's metrics endpoint (config.metrics_listen, with
 *  the chosen port), or "" when it has none. Valid until kvf_engine_destroy(). */
KVF_API const char *kvf_engine_metrics_addr(const kvf_engine_t *e);

/** kvf_metrics_server_stop - stop serving, close every connection, free. NULL is a no-op. No
 *  render callback runs after it returns. */
KVF_API void kvf_metrics_server_stop(kvf_metrics_server_t *m);

#ifdef __cplusplus
}
#endif
#endif /* KVFERRY_H */
