/* Growable output buffer and bounds-checked input cursor (see wire.h). */
#include <stdlib.h>

#include "common/wire.h"

void kvf__buf_init(kvf_buf_t *b)
{
    memset(b, 0, sizeof(*b));
}

void kvf__buf_free(kvf_buf_t *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

uint8_t *kvf__buf_reserve(kvf_buf_t *b, size_t extra)
{
    if (b->oom)
        return NULL;
    if (extra > SIZE_MAX / 2 - b->len) {
        b->oom = true;
        return NULL;
    }
    if (b->len + extra > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + extra)
            cap *= 2;
        uint8_t *d = realloc(b->data, cap);
        if (!d) {
            b->oom = true;
            return NULL;
        }
        b->data = d;
        b->cap = cap;
    }
    return b->data + b->len;
}

void kvf__buf_put(kvf_buf_t *b, const void *p, size_t n)
{
    uint8_t *d = kvf__buf_reserve(b, n);
    if (!d)
        return;
    if (n)
        memcpy(d, p, n);
    b->len += n;
}

void kvf__buf_put_u8(kvf_buf_t *b, uint8_t v)
{
    kvf__buf_put(b, &v, 1);
}

void kvf__buf_put_u16(kvf_buf_t *b, uint16_t v)
{
    uint8_t t[2];
    kvf__put_le16(t, v);
    kvf__buf_put(b, t, sizeof(t));
}

void kvf__buf_put_u32(kvf_buf_t *b, uint32_t v)
{
    uint8_t t[4];
    kvf__put_le32(t, v);
    kvf__buf_put(b, t, sizeof(t));
}

void kvf__buf_put_u64(kvf_buf_t *b, uint64_t v)
{
    uint8_t t[8];
    kvf__put_le64(t, v);
    kvf__buf_put(b, t, sizeof(t));
}

void kvf__buf_put_blob(kvf_buf_t *b, const void *p, size_t n)
{
    if (n > UINT32_MAX) {
        b->oom = true;
        return;
    }
    kvf__buf_put_u32(b, (uint32_t)n);
    kvf__buf_put(b, p, n);
}

void kvf__buf_consume(kvf_buf_t *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static bool rd_take(kvf_rd_t *r, size_t n, const uint8_t **p)
{
    if (r->bad || r->left < n) {
        r->bad = true;
        return false;
    }
    *p = r->p;
    r->p += n;
    r->left -= n;
    return true;
}

bool kvf__rd_u8(kvf_rd_t *r, uint8_t *v)
{
    const uint8_t *p;
    if (!rd_take(r, 1, &p))
        return false;
    *v = p[0];
    return true;
}

bool kvf__rd_u16(kvf_rd_t *r, uint16_t *v)
{
    const uint8_t *p;
    if (!rd_take(r, 2, &p))
        return false;
    *v = kvf__get_le16(p);
    return true;
}

bool kvf__rd_u32(kvf_rd_t *r, uint32_t *v)
{
    const uint8_t *p;
    if (!rd_take(r, 4, &p))
        return false;
    *v = kvf__get_le32(p);
    return true;
}

bool kvf__rd_u64(kvf_rd_t *r, uint64_t *v)
{
    const uint8_t *p;
    if (!rd_take(r, 8, &p))
        return false;
    *v = kvf__get_le64(p);
    return true;
}

bool kvf__rd_blob(kvf_rd_t *r, size_t max, const uint8_t **p, size_t *n)
{
    uint32_t len;
    if (!kvf__rd_u32(r, &len))
        return false;
    if (len > max) {
        r->bad = true;
        return false;
    }
    if (!rd_take(r, len, p))
        return false;
    *n = len;
    return true;
}
