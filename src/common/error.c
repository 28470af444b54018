/* Error codes, names and the thread-local last-error message. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "common/common.h"

#define LAST_ERROR_MAX 1024

static _Thread_local char last_error[LAST_ERROR_MAX];

const char *kvf_strerror(int err)
{
    if (err == INT_MIN)
        return "unknown error";
    if (err < 0)
        err = -err;
    if (err == 0)
        return "success";
    switch (err) {
#define KVF__ERR_STR(name, off, msg)                                                              \
    case KVF_ERRNO_OFFSET + (off):                                                                \
        return msg;
        KVF_ERRNO_MAP(KVF__ERR_STR)
#undef KVF__ERR_STR
    default:
        break;
    }
    if (err < KVF_ERRNO_OFFSET) {
        const char *d = strerrordesc_np(err);
        if (d)
            return d;
    }
    return "unknown error";
}

bool kvf__is_kvf_code(uint32_t v)
{
    switch (v) {
#define KVF__ERR_CASE(name, off, msg) case KVF_ERRNO_OFFSET + (off):
        KVF_ERRNO_MAP(KVF__ERR_CASE)
#undef KVF__ERR_CASE
        return true;
    default:
        return false;
    }
}

const char *kvf_err_name(int err)
{
    if (err == INT_MIN)
        return "UNKNOWN";
    if (err < 0)
        err = -err;
    if (err == 0)
        return "KVF_OK";
    switch (err) {
#define KVF__ERR_NAME(name, off, msg)                                                             \
    case KVF_ERRNO_OFFSET + (off):                                                                \
        return "KVF_" #name;
        KVF_ERRNO_MAP(KVF__ERR_NAME)
#undef KVF__ERR_NAME
    default:
        break;
    }
    if (err < KVF_ERRNO_OFFSET) {
        const char *n = strerrorname_np(err);
        if (n)
            return n;
    }
    return "UNKNOWN";
}

const char *kvf_last_error(void)
{
    return last_error;
}

void kvf_last_error_clear(void)
{
    last_error[0] = '\0';
}

int kvf_last_error_set(int code, const char *fmt, ...)
{
    /* Format into a copy first: the arguments may point into last_error itself. */
    char msg[LAST_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    memcpy(last_error, msg, sizeof(msg));
    KVF_DEBUG("error", "%s (%s)", last_error, kvf_err_name(code));
    return code;
}

int kvf__err_wrap(int code, const char *fmt, ...)
{
    char prefix[LAST_ERROR_MAX];
    char old[LAST_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, last_error, sizeof(old));
    /* A message longer than the slot is cut; the start, which names the value, survives. */
    int n = snprintf(last_error, sizeof(last_error), "%s: %s", prefix,
                     old[0] ? old : kvf_strerror(code));
    if (n >= (int)sizeof(last_error))
        KVF_DEBUG("error", "last-error message cut to %zu bytes", sizeof(last_error) - 1);
    return code;
}
