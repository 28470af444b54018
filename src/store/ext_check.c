/*
 * Argument checks of the external store backends (etcd://, redis://), in the words of the
 * built-in client, so that a user sees the same error whatever the store.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "store/ext.h"

static const char *show(char *buf, size_t n, const char *s, size_t len)
{
    size_t max = n - 4 < 64 ? n - 4 : 64, i, o = 0;
    for (i = 0; i < len && o < max; i++)
        buf[o++] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
    if (i < len) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

void kvf__ext_what(char *what, size_t n, const char *op, const char *key)
{
    char shown[80];
    snprintf(what, n, "%s \"%s\"", op, show(shown, sizeof(shown), key, strlen(key)));
}

int kvf__ext_check_key(const char *url, const char *op, const char *key, bool prefix)
{
    const char *noun = prefix ? "prefix" : "key";
    if (!key)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL", url, op, noun);
    size_t n = strlen(key);
    if (n == 0 && !prefix)
        return kvf__err(-KVF_EINVAL, "store %s: %s: key is empty", url, op);
    if (n > KVF_STORE_MAX_KEY_LEN) {
        char shown[80];
        return kvf__err(-KVF_ETOOBIG, "store %s: %s \"%s\": %s of %zu bytes exceeds the %u-byte limit",
                        url, op, show(shown, sizeof(shown), key, n), noun, n,
                        KVF_STORE_MAX_KEY_LEN);
    }
    return 0;
}

int kvf__ext_check_value(const char *url, const char *what, const char *name, const void *val,
                         size_t len)
{
    if (!val && len)
        return kvf__err(-KVF_EINVAL, "store %s: %s: %s is NULL with length %zu", url, what, name,
                        len);
    if (len > KVF_STORE_MAX_VALUE_LEN)
        return kvf__err(-KVF_ETOOBIG, "store %s: %s: %s of %zu bytes exceeds the %u-byte limit", url,
                        what, name, len, KVF_STORE_MAX_VALUE_LEN);
    return 0;
}

int kvf__ext_check_ttl(const char *url, uint32_t ttl_ms, uint64_t *lease)
{
    if (!lease)
        return kvf__err(-KVF_EINVAL, "store %s: lease grant (ttl %u ms): the output pointer is NULL",
                        url, ttl_ms);
    *lease = 0;
    if (ttl_ms == 0 || ttl_ms > KVF_STORE_MAX_LEASE_TTL_MS)
        return kvf__err(-KVF_EINVAL, "store %s: lease grant (ttl %u ms): ttl must be 1..%u ms", url,
                        ttl_ms, KVF_STORE_MAX_LEASE_TTL_MS);
    return 0;
}

/* Strict decimal int64, as the built-in store reads a counter: an optional '-', then digits. */
int kvf__ext_parse_counter(const void *val, size_t len, int64_t *out)
{
    const unsigned char *p = val;
    size_t i = 0;
    bool neg = false;
    int64_t v = 0;
    if (len && p[0] == '-') {
        neg = true;
        i = 1;
    }
    if (i == len)
        return -KVF_EBADVALUE;
    for (; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -KVF_EBADVALUE;
        int d = p[i] - '0';
        if (__builtin_mul_overflow(v, 10, &v))
            return -KVF_EBADVALUE;
        if (neg ? __builtin_sub_overflow(v, d, &v) : __builtin_add_overflow(v, d, &v))
            return -KVF_EBADVALUE;
    }
    *out = v;
    return 0;
}

void *kvf__ext_dup(const void *p, size_t n)
{
    char *c = malloc(n + 1);
    if (!c)
        return NULL;
    if (n)
        memcpy(c, p, n);
    c[n] = '\0';
    return c;
}
