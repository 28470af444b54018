/*
 * The defaults and limits of the config store, in one place: the protocol's own (both sides),
 * the server's and the client's. The public limits (key, value, frame and list sizes, clients,
 * watches and waiters per connection, lease TTL) are in include/kvferry.h; docs/protocol.md
 * lists the protocol's.
 */
#ifndef KVF_STORE_LIMITS_H
#define KVF_STORE_LIMITS_H

#include <stdint.h>

/* ---- the protocol ---------------------------------------------------------------------------- */

/* A partial frame that has not completed within this time closes its connection, so a client
 * that sends half a frame and stalls cannot pin server memory forever. */
#define KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS 30000u
/* A connection whose unsent output (answers and watch events it is not reading) grows past this
 * is closed: a slow consumer must not grow the server without bound. The default of
 * kvf_store_server_opts_t.max_output_bytes. */
#define KVF_STORE_MAX_OUTPUT_BYTES (256u << 20)
/* Longest get-with-wait accepted. */
#define KVF_STORE_MAX_WAIT_MS (3600u * 1000u)

/* ---- the server ------------------------------------------------------------------------------ */

/* Environment variable that overrides KVF_STORE_PARTIAL_FRAME_TIMEOUT_MS, read at server start
 * (tests use a short value). */
#define SRV_PARTIAL_TIMEOUT_ENV    "KVFERRY_STORE_PARTIAL_FRAME_TIMEOUT_MS"
#define SRV_PARTIAL_TIMEOUT_MAX_MS (24u * 3600u * 1000u)

/* Defaults of kvf_store_server_opts_t (include/kvferry.h; docs/operations.md lists them). */
#define SRV_DEFAULT_MAX_CLIENTS_PER_ADDR   1024u
#define SRV_DEFAULT_IDLE_TIMEOUT_MS        60000u
#define SRV_MIN_IDLE_TIMEOUT_MS            100u
#define SRV_MAX_IDLE_TIMEOUT_MS            (24u * 3600u * 1000u)
#define SRV_DEFAULT_MAX_KEYS               1000000u
#define SRV_DEFAULT_MAX_KEYS_PER_CLIENT    100000u
#define SRV_DEFAULT_MAX_BYTES              (UINT64_C(1) << 30)
#define SRV_DEFAULT_MAX_BYTES_PER_CLIENT   (UINT64_C(64) << 20)
#define SRV_DEFAULT_MAX_LEASES             100000u
#define SRV_DEFAULT_MAX_LEASES_PER_CLIENT  10000u
#define SRV_DEFAULT_MAX_WATCHES            65536u
#define SRV_DEFAULT_MAX_WATCHES_PER_CLIENT 4096u
#define SRV_DEFAULT_MAX_OUTPUT_TOTAL       (UINT64_C(1) << 30)

/* Input buffer: small by default so that thousands of idle clients cost little; grown
 * geometrically as the bytes of a (validated) frame arrive, never to the announced size up front,
 * and shrunk back afterwards. */
#define SRV_IN_MIN  4096u
#define SRV_IN_KEEP (64u << 10)
/* Output buffers larger than this are released once drained. */
#define SRV_OUT_KEEP (1u << 20)
/* Stop executing (and reading) requests from a client while more than this much of its output is
 * unsent: a client that pipelines requests without reading answers is slowed down instead of
 * growing the server. Checked before each request, so one answer may go past it. Watch events and
 * woken get-with-wait answers can still push it up to KVF_STORE_MAX_OUTPUT_BYTES. */
#define SRV_OUT_PAUSE_READ (8u << 20)
/* Fairness: at most this many recv() calls for one connection per loop iteration. */
#define SRV_READS_PER_EVENT   16
#define SRV_ACCEPTS_PER_EVENT 64
#define SRV_EPOLL_EVENTS      64
/* iovecs of one sendmsg() (owned bytes and shared tails). */
#define SRV_FLUSH_IOV 64
/* Bytes gathered into one TLS write (one record, the largest TLS allows). */
#define SRV_TLS_RECORD 16384
/* After accept() runs out of fds or memory, stop accepting for this long instead of spinning on
 * a listening socket that stays readable. */
#define SRV_ACCEPT_PAUSE_MS 100u
/* Error-answer messages are short; longer ones are truncated. */
#define SRV_ERRMSG_MAX 256

/* ---- the client ------------------------------------------------------------------------------ */

#define CLI_DEFAULT_CONNECT_TIMEOUT_MS 10000u
#define CLI_DEFAULT_REQUEST_TIMEOUT_MS 5000u
/* Reconnect backoff: the first attempt after a loss is immediate, then 50 ms doubling to 1 s. */
#define CLI_BACKOFF_MIN_MS 50u
#define CLI_BACKOFF_MAX_MS 1000u
/* Bound on one connection attempt, so a black-holed address cannot stall the I/O thread. */
#define CLI_ATTEMPT_MAX_MS 2000u
/* kvf_store_close() revokes live leases within this time, all together. */
#define CLI_CLOSE_REVOKE_MS 500u
/* Floor of TCP_USER_TIMEOUT (otherwise request_timeout_ms), see cli_set_dead_peer_opts() in
 * client_conn.c. */
#define CLI_TCP_USER_TIMEOUT_MIN_MS 1000u
/* After a failed re-grant, the next attempt waits this long. */
#define CLI_REGRANT_RETRY_MS 1000u
#define CLI_REQ_BUCKETS      64u
#define CLI_MSG_MAX          256
#define CLI_WHAT_MAX         192
#define CLI_READ_CHUNK       (64u << 10)
/* Input/output buffers larger than this are freed once empty rather than kept for reuse. */
#define CLI_BUF_KEEP_MAX (1u << 20)
/* Reads per wake-up before the I/O thread looks at its timers and output again. */
#define CLI_READ_ROUNDS 16
/* A connected client that sent nothing for this long sends a PING, so that the server's idle
 * timeout (kvf_store_server_opts_t.idle_timeout_ms, 60 s by default) never closes a live client. */
#define CLI_QUIET_PING_MS 15000u

#endif
