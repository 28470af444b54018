/* Text helpers (common.h): bytes from the network or a user made safe to print, hex digits. */
#include "common/common.h"

int kvf__hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

char *kvf__printable(char *dst, size_t dstlen, const void *src, size_t len)
{
    const unsigned char *s = src;
    size_t o = 0;
    if (dstlen == 0)
        return dst;
    for (size_t i = 0; i < len && o + 1 < dstlen; i++)
        dst[o++] = (s[i] >= 0x20 && s[i] < 0x7f) ? (char)s[i] : '?';
    dst[o] = '\0';
    return dst;
}
