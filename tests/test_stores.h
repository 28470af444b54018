/*
 * Config stores for the tests: the built-in one in this process, or etcd / redis-server started
 * as children on free loopback ports with their data in a fresh temporary folder. A child dies
 * with the test (see test_util.h) and is killed, reaped and its folder removed by
 * kvf_test_backend_stop(). The binaries come from Debian (make deps); a missing one fails the
 * test with a message saying what to install, never a silent skip.
 */
#ifndef KVF_TEST_STORES_H
#define KVF_TEST_STORES_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "kvferry.h"

typedef struct {
    char kind[16];                /* "builtin", "etcd" or "redis" */
    char url[256];                /* what kvf_store_open() takes */
    char dir[128];                /* etcd and redis: their temporary folder */
    pid_t pid;                    /* etcd and redis: the child; 0 while stopped */
    uint16_t port, peer_port;     /* client port; etcd's peer port */
    kvf_store_server_t *srv;      /* builtin */
    const char *extra[8];         /* more arguments for etcd / redis-server, NULL-ended; set
                                     them with kvf_test_backend_start_with() */
} kvf_test_backend_t;

/* The store kind this run of a case uses: $KVF_TEST_STORE (set by CTest for suites registered
 * with STORES), "builtin" when unset. */
const char *kvf_test_store_kind(void);

/* Start a store of @kind and wait (polling, bounded) until it answers. The binaries are
 * /usr/bin/etcd and /usr/bin/redis-server, or $KVF_TEST_ETCD / $KVF_TEST_REDIS. */
void kvf_test_backend_start(kvf_test_backend_t *b, const char *kind);
/* The same with @extra (NULL-ended, at most 7) appended to the server's command line, and
 * without waiting when @wait is false (e.g. a server that requires a password). */
void kvf_test_backend_start_with(kvf_test_backend_t *b, const char *kind,
                                 const char *const *extra, bool wait);
/* Kill it (SIGKILL; builtin: stop the server) and reap it. Its data stays unless @wipe. */
void kvf_test_backend_kill(kvf_test_backend_t *b, bool wipe);
/* Start it again on the same ports (after kvf_test_backend_kill()) and wait until it answers. */
void kvf_test_backend_restart(kvf_test_backend_t *b);
/* Kill, reap and remove everything. Safe on a stopped or zeroed backend. */
void kvf_test_backend_stop(kvf_test_backend_t *b);

#endif
