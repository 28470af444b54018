/* Bytes from the network or a user made safe to print (common.h). */
#include "common/common.h"

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
