/*
 * Threads and waits shared by every part of kvferry: one way to start an internal thread and one
 * way to wait on a condition variable until a deadline. Private; nothing here is API.
 */
#ifndef KVF_COMMON_THREAD_H
#define KVF_COMMON_THREAD_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct timespec;

/* Stack of kvferry's short-lived helper threads (per-connection servers, batch runners): they
 * keep little on the stack, and a small stack keeps many of them cheap. */
#define KVF_THREAD_SMALL_STACK (256u << 10)

/*
 * kvf__thread_start - start one of kvferry's internal threads.
 * @t:           receives the thread (to be joined by the caller).
 * @name:        a short name for `top -H` and gdb, at most 15 characters ("kvf-tcp-rx").
 * @stack_bytes: the stack size, or 0 for the system default.
 * Every signal is blocked in the new thread, so the application's handlers run on its own
 * threads and never on ours (a SIGINT handler that calls back into kvferry would deadlock).
 * Returns 0 or -errno from pthread_create (no message is recorded: the caller names what failed).
 */
int kvf__thread_start(pthread_t *t, const char *name, size_t stack_bytes, void *(*fn)(void *),
                      void *arg);

/* A condition variable on CLOCK_MONOTONIC, the clock of kvf__now_ms() and every deadline. */
int kvf__cond_init_monotonic(pthread_cond_t *cond);

/* The absolute CLOCK_MONOTONIC time @deadline_ms (kvf__now_ms() clock) as a timespec. */
void kvf__deadline_ts(struct timespec *ts, uint64_t deadline_ms);

/*
 * kvf__cond_wait_until - wait once on @cv (with @mu held) until it is signalled or @deadline_ms
 * (kvf__now_ms() clock; UINT64_MAX waits without a deadline) passes. @cv must come from
 * kvf__cond_init_monotonic(). Returns false without waiting once the deadline has passed, true
 * otherwise; like every condition wait it may wake early, so callers loop on their predicate:
 *     while (!ready && kvf__cond_wait_until(&cv, &mu, deadline)) {}
 */
bool kvf__cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, uint64_t deadline_ms);

#endif /* KVF_COMMON_THREAD_H */
