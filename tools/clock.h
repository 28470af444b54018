/*
 * The tools' clock and timed waits: CLOCK_MONOTONIC, like every deadline inside kvferry, so that
 * a change of the wall clock stretches or cuts no timeout.
 */
#ifndef KVF_CLI_CLOCK_H
#define KVF_CLI_CLOCK_H

#include <pthread.h>
#include <stdint.h>

/* Now on the monotonic clock, in nanoseconds and in milliseconds. */
uint64_t cli_now_ns(void);
uint64_t cli_now_ms(void);

/* Initialise @cond so that cli_cond_wait_until() measures on the monotonic clock. Returns 0 or
 * a positive error number, as pthread_cond_init() does. */
int cli_cond_init(pthread_cond_t *cond);

/* pthread_cond_timedwait() until @deadline_ms (a cli_now_ms() time) on a cond initialised by
 * cli_cond_init(); returns its result (0, or ETIMEDOUT once the deadline has passed). */
int cli_cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *mu, uint64_t deadline_ms);

#endif /* KVF_CLI_CLOCK_H */
