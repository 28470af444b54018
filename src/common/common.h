/*
 * Private helpers shared by every part of kvferry: error reporting, logging, the clock and
 * printable text (threads and deadline waits: thread.h).
 * Not installed; nothing here is API.
 */
#ifndef KVF_COMMON_H
#define KVF_COMMON_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvferry.h"

#define KVF__ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define KVF__PRINTF(f, a) __attribute__((format(printf, f, a)))

/*
 * kvf__err - record a detailed message in this thread's last-error slot and return @code, so a
 * failing path reads `return kvf__err(-KVF_EINVAL, "session id %s: ...", sid);`.
 * The message is also logged at debug level. The library's short name for the public
 * kvf_last_error_set(), which bindings use for their own errors: one function, one behaviour.
 */
#define kvf__err kvf_last_error_set

/* Prefix the current last-error message with "<prefix>: ", keeping @code. Used by callers that
 * add context ("store tcp://h:p: ") to an error a lower layer already described. */
int kvf__err_wrap(int code, const char *fmt, ...) KVF__PRINTF(2, 3);
/* Whether @v is one of kvferry's error codes (KVF_EINVAL ... the last of KVF_ERRNO_MAP): what a
 * status received from the network may carry. */
bool kvf__is_kvf_code(uint32_t v);

/* Logging. The level test happens before any argument is evaluated, so a debug line costs one
 * relaxed load when debug is off. @subsys names the part of kvferry ("store", "tcp", ...). */
extern _Atomic int kvf__log_level;

void kvf__log_write(int level, const char *subsys, const char *fmt, ...) KVF__PRINTF(3, 4);

#define KVF_LOG(level, subsys, ...)                                                               \
    do {                                                                                          \
        if ((level) >= atomic_load_explicit(&kvf__log_level, memory_order_relaxed))               \
            kvf__log_write((level), (subsys), __VA_ARGS__);                                       \
    } while (0)

#define KVF_DEBUG(subsys, ...) KVF_LOG(KVF_LOG_DEBUG, subsys, __VA_ARGS__)
#define KVF_INFO(subsys, ...) KVF_LOG(KVF_LOG_INFO, subsys, __VA_ARGS__)
#define KVF_WARN(subsys, ...) KVF_LOG(KVF_LOG_WARN, subsys, __VA_ARGS__)
#define KVF_ERROR(subsys, ...) KVF_LOG(KVF_LOG_ERROR, subsys, __VA_ARGS__)

/*
 * Rate-limited lines, for anything a peer can make happen over and over (a refused connection, a
 * failed accept, a malformed frame): each call site of KVF_LOG_RATELIMITED prints at most
 * KVF_LOG_RATELIMIT_BURST lines per KVF_LOG_RATELIMIT_WINDOW_MS; the rest are counted, and the
 * first line of a later window is preceded by one "(N more suppressed)" line. A site's state is a
 * static kvf_log_ratelimit_t the macro declares; its mutex is taken only for a line at or above
 * the level, never on a path that logs nothing.
 */
#define KVF_LOG_RATELIMIT_BURST     10u
#define KVF_LOG_RATELIMIT_WINDOW_MS 1000u

typedef struct {
    pthread_mutex_t mu;
    uint64_t window_start; /* kvf__now_ms() of the window's first line; 0 = none yet */
    unsigned passed;       /* lines printed in this window */
    unsigned dropped;      /* lines dropped since the last printed one */
} kvf_log_ratelimit_t;

#define KVF_LOG_RATELIMIT_INIT {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0}

/* Whether a line at @now_ms may be printed; when it may, *@dropped receives the count of lines
 * dropped before it (then reset). */
bool kvf__log_ratelimit(kvf_log_ratelimit_t *rl, uint64_t now_ms, unsigned *dropped);

#define KVF_LOG_RATELIMITED(level, subsys, ...)                                                   \
    do {                                                                                          \
        static kvf_log_ratelimit_t kvf_rl_ = KVF_LOG_RATELIMIT_INIT;                              \
        unsigned kvf_dropped_;                                                                    \
        if ((level) >= atomic_load_explicit(&kvf__log_level, memory_order_relaxed) &&             \
            kvf__log_ratelimit(&kvf_rl_, kvf__now_ms(), &kvf_dropped_)) {                         \
            if (kvf_dropped_)                                                                     \
                kvf__log_write((level), (subsys), "(%u more suppressed)", kvf_dropped_);          \
            kvf__log_write((level), (subsys), __VA_ARGS__);                                       \
        }                                                                                         \
    } while (0)

#define KVF_WARN_RATELIMITED(subsys, ...) KVF_LOG_RATELIMITED(KVF_LOG_WARN, subsys, __VA_ARGS__)

/* Parse a log level: "0".."3" or debug/info/warn/warning/error (any case). -1 if invalid. */
int kvf__log_level_parse(const char *s);

/* Monotonic clock. */
uint64_t kvf__now_ns(void);
uint64_t kvf__now_ms(void);

/*
 * kvf__printable - copy up to @len bytes of @src (network or user input) into @dst as text safe
 * for a log line or an error message: bytes outside printable ASCII become '?'. At most
 * @dstlen - 1 bytes are written, then a NUL. Returns @dst.
 */
char *kvf__printable(char *dst, size_t dstlen, const void *src, size_t len);

/* The value of hex digit @c (either case), or -1 when it is none. */
int kvf__hexval(int c);

#endif /* KVF_COMMON_H */
