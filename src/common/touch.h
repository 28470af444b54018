/*
 * Warming memory for the first transfer. Private; nothing here is API.
 *
 * Populating page tables (MAP_POPULATE, MADV_POPULATE_WRITE) is not always enough for the first
 * access to run at memory speed. Measured on this project's machines (a guest under shadow
 * paging, see docs/performance.md "Cold start"): the first access to a page through a given
 * address, from user mode or from the kernel (a recv() or send() copying to or from it, a
 * process_vm_writev() reading its source), costs about 5 us per 4 KiB page, 60-80 ms for 48 MB,
 * even when the page is present, dirty and mapped, and every later access is free. A kernel
 * access does not warm user-mode accesses and a read does not warm a later user-mode write.
 * These helpers take that cost when memory is registered or mapped, not on the first transfer.
 */
#ifndef KVF_COMMON_TOUCH_H
#define KVF_COMMON_TOUCH_H

#include <stddef.h>

/* The kernel reads one byte of every page of [@addr, @addr+@len) through its address in this
 * process (process_vm_writev to this process into a scratch byte), the way send(),
 * process_vm_writev() and recv() reach it later. Changes no byte of the range and works on
 * read-only memory. Best effort: does nothing where process_vm_writev is refused. */
void kvf__touch_kernel(const void *addr, size_t len);

/* An atomic OR of 0 into one byte of every page of [@addr, @addr+@len) from user mode: a store
 * that changes nothing, even with another process writing the same memory at the same time
 * (the read-modify-write is indivisible). The range must be mapped writable. */
void kvf__touch_user_write(void *addr, size_t len);

/* Whether warming is on: KVFERRY_NO_WARM=1 turns it off (to measure what it saves), read once. */
int kvf__touch_enabled(void);

#endif /* KVF_COMMON_TOUCH_H */
