/*
 * Internals of the built-in config store server (server.c) for tests and the library's
 * own code. Not part of the public API.
 */
#ifndef KVF_STORE_SERVER_INTERNAL_H
#define KVF_STORE_SERVER_INTERNAL_H

#include "kvferry.h"

/* The number of get-with-wait requests currently parked on @srv (all connections), i.e. GETs of
 * an absent key with a non-zero wait_ms that are neither answered nor timed out yet. Maintained
 * by the loop thread; safe to call from any thread (a snapshot). 0 for NULL. Tests use it to
 * wait until a GET is really parked before setting its key. */
unsigned kvf__store_server_waiters(const kvf_store_server_t *srv);

#endif
