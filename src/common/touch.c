/*
 * Warming memory for the first transfer (touch.h says why).
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/touch.h"

#define TOUCH_PAGE  4096u /* the smallest page; a larger one is touched several times, harmlessly */
#define TOUCH_BATCH 1024u /* iovecs per process_vm_writev call: the kernel's IOV_MAX */

int kvf__touch_enabled(void)
{
    static atomic_int state; /* 0 unknown, 1 on, 2 off */
    int s = atomic_load_explicit(&state, memory_order_relaxed);
    if (s == 0) {
        const char *v = getenv("KVFERRY_NO_WARM");
        s = v && !strcmp(v, "1") ? 2 : 1;
        atomic_store_explicit(&state, s, memory_order_relaxed);
    }
    return s == 1;
}

void kvf__touch_kernel(const void *addr, size_t len)
{
    struct iovec src[TOUCH_BATCH], dst[TOUCH_BATCH];
    char sink[TOUCH_BATCH];
    uintptr_t p = (uintptr_t)addr, end = p + len;
    pid_t self = getpid();

    if (len == 0 || end < p || !kvf__touch_enabled())
        return;
    while (p < end) {
        unsigned k = 0;
        for (; k < TOUCH_BATCH && p < end; k++) {
            src[k] = (struct iovec){(void *)p, 1};
            dst[k] = (struct iovec){sink + k, 1};
            /* The next page boundary, so that every page of the range gets one byte. */
            p = (p | (TOUCH_PAGE - 1)) + 1;
        }
        if (process_vm_writev(self, src, k, dst, k, 0) < 0)
            return; /* refused (seccomp, an old kernel): the first transfer pays instead */
    }
}
