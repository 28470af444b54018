/*
 * What the external store backends (etcd://, redis://) share: the argument checks of the public
 * functions, in the built-in client's words, and the lease keeper.
 *
 * The lease keeper holds the leases a client granted, by the id the user holds (a client id),
 * each with the backend's id on the store (the server id) and every key set under it with its
 * value. A thread keeps them alive (every ttl/3); when the store answers that it lost a lease
 * (restart without persistence, a failover that lost it, an expiry during an outage), the keeper
 * grants a new one and re-publishes every key of the old one under it. The user's id does not
 * change. The backend supplies four operations on the store (ext_lease_ops_t); the keeper calls
 * them with its mutex held, so they never run concurrently for one client, and set()/cas() wait
 * for a re-publication under way.
 */
#ifndef KVF_STORE_EXT_H
#define KVF_STORE_EXT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvferry.h"

#define EXT_MSG_MAX 256
#define EXT_WHAT_MAX 192
/* After a failed re-grant or keep-alive, the next attempt waits this long. */
#define EXT_RETRY_MS 500u

/* ---- argument checks (ext_check.c) ---------------------------------------------------------- */

/* "op "key"" shown safely, into @what of @n bytes. */
void kvf__ext_what(char *what, size_t n, const char *op, const char *key);
/* 0, or -KVF_EINVAL / -KVF_ETOOBIG with the last error set in the built-in client's words. */
int kvf__ext_check_key(const char *url, const char *op, const char *key, bool prefix);
int kvf__ext_check_value(const char *url, const char *what, const char *name, const void *val,
                         size_t len);
int kvf__ext_check_ttl(const char *url, uint32_t ttl_ms, uint64_t *lease);
/* Parse a counter value for add(): decimal, optional sign, nothing else; -KVF_EBADVALUE. */
int kvf__ext_parse_counter(const void *val, size_t len, int64_t *out);
/* The bytes of @p (@n) as a NUL-terminated malloc'ed copy, or NULL when out of memory. */
void *kvf__ext_dup(const void *p, size_t n);

/* ---- the lease keeper (ext_lease.c) --------------------------------------------------------- */

typedef struct ext_key {
    struct ext_key *next;
    char *key;
    uint8_t *val;
    size_t len;
} ext_key_t;

typedef struct ext_lease {
    struct ext_lease *next;
    uint64_t cid;     /* the user's id */
    uint64_t sid;     /* the store's id (redis: unused) */
    uint32_t ttl_ms;
    bool stopped;     /* keepalive_stop(): left to expire, never re-granted */
    bool lost;        /* the store lost it and the re-grant has not succeeded yet */
    uint64_t due_ms;  /* next keep-alive or re-grant attempt */
    ext_key_t *keys;
} ext_lease_t;

typedef struct {
    /* Grant a lease of @ttl_ms on the store: its id into *@sid. */
    int (*grant)(void *be, uint32_t ttl_ms, uint64_t *sid);
    /* Refresh @l: 0, -KVF_ENOTFOUND when the store lost it (or any of its keys), another code
     * when the store could not be reached (retried). */
    int (*keepalive)(void *be, const ext_lease_t *l);
    /* End @l on the store, deleting its keys. */
    int (*revoke)(void *be, const ext_lease_t *l);
    /* Set @key under @l (a re-publication). */
    int (*put)(void *be, const char *key, const void *val, size_t len, const ext_lease_t *l);
} ext_lease_ops_t;

typedef struct {
    const ext_lease_ops_t *ops;
    void *be;
    const char *url;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    pthread_t th;
    bool started, closing;
    ext_lease_t *leases;
    uint64_t next_cid;
} ext_keeper_t;

int kvf__ext_keeper_start(ext_keeper_t *k, const ext_lease_ops_t *ops, void *be, const char *url);
/* Stop the thread; revoke the leases still kept alive when @revoke (best effort); free all. */
void kvf__ext_keeper_stop(ext_keeper_t *k, bool revoke);
int kvf__ext_lease_grant(ext_keeper_t *k, uint32_t ttl_ms, uint64_t *cid);
int kvf__ext_lease_keepalive_stop(ext_keeper_t *k, uint64_t cid);
int kvf__ext_lease_revoke(ext_keeper_t *k, uint64_t cid);

/*
 * A set or cas under lease @cid (0: none). kvf__ext_put_begin() locks the keeper when @cid is
 * not 0 (so no re-grant runs while the key is written), finds the lease (-KVF_ENOTFOUND with the message when
 * the client holds no such lease), and gives its current state in *@l (NULL for @cid 0).
 * kvf__ext_put_end() records @key under it when @rc is 0 (or forgets it under any lease when
 * set without one) and unlocks.
 */
int kvf__ext_put_begin(ext_keeper_t *k, const char *what, uint64_t cid, ext_lease_t **l);
void kvf__ext_put_end(ext_keeper_t *k, int rc, const char *key, const void *val, size_t len,
                      ext_lease_t *l);
/* Between kvf__ext_put_begin() and _end(): the store answered that lease @l is gone; re-grant it
 * now (its other keys re-published). 0, or a negative code with the message set. */
int kvf__ext_regrant_locked(ext_keeper_t *k, ext_lease_t *l);
/* @key was deleted: stop re-publishing it. */
void kvf__ext_forget_key(ext_keeper_t *k, const char *key);

#endif /* KVF_STORE_EXT_H */
