/*
 * Little-endian wire encoding: a growable output buffer and a bounds-checked input cursor.
 * Every protocol in kvferry is little-endian on the wire, whatever the host order.
 */
#ifndef KVF_WIRE_H
#define KVF_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Host x86-64 and arm64 are little-endian; these compile to plain loads and stores there and stay
 * correct elsewhere. */
static inline void kvf__put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void kvf__put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline void kvf__put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t kvf__get_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t kvf__get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
static inline uint64_t kvf__get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* A growable byte buffer. `oom` latches the first allocation failure so that a sequence of puts
 * needs one check at the end. */
typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
    bool oom;
} kvf_buf_t;

void kvf__buf_init(kvf_buf_t *b);
void kvf__buf_free(kvf_buf_t *b);
/* Make room for @extra more bytes; returns a pointer to the first of them or NULL (oom set). */
uint8_t *kvf__buf_reserve(kvf_buf_t *b, size_t extra);
void kvf__buf_put(kvf_buf_t *b, const void *p, size_t n);
void kvf__buf_put_u8(kvf_buf_t *b, uint8_t v);
void kvf__buf_put_u16(kvf_buf_t *b, uint16_t v);
void kvf__buf_put_u32(kvf_buf_t *b, uint32_t v);
void kvf__buf_put_u64(kvf_buf_t *b, uint64_t v);
/* A length-prefixed byte string: u32 length, then the bytes. */
void kvf__buf_put_blob(kvf_buf_t *b, const void *p, size_t n);
/* Drop the first @n bytes (consumed output). */
void kvf__buf_consume(kvf_buf_t *b, size_t n);

/* A read cursor over received bytes. Each get fails (returns false, sets `bad`) instead of
 * reading past the end, and later gets keep failing, so a decoder checks once at the end. */
typedef struct {
    const uint8_t *p;
    size_t left;
    bool bad;
} kvf_rd_t;

static inline void kvf__rd_init(kvf_rd_t *r, const void *p, size_t n)
{
    r->p = (const uint8_t *)p;
    r->left = n;
    r->bad = false;
}
bool kvf__rd_u8(kvf_rd_t *r, uint8_t *v);
bool kvf__rd_u16(kvf_rd_t *r, uint16_t *v);
bool kvf__rd_u32(kvf_rd_t *r, uint32_t *v);
bool kvf__rd_u64(kvf_rd_t *r, uint64_t *v);
/* A length-prefixed byte string, pointing into the input (no copy); fails if its length is above
 * @max or past the end of the input. */
bool kvf__rd_blob(kvf_rd_t *r, size_t max, const uint8_t **p, size_t *n);

#endif /* KVF_WIRE_H */
