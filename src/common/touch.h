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
 * kvf__touch_kernel takes the kernel's share of that cost when memory is registered, not on the
 * first transfer. A new mapping of a peer's kvf_mem_alloc memory is warmed with stores by the
 * shm transport's warmer thread when the region is learned (transport/shm_warm.c): done inside
 * the first transfer into the region, it only moved the cost there.
 */
#ifndef KVF_COMMON_TOUCH_H
#define KVF_COMMON_TOUCH_H

#include <stddef.h>

/* The kernel reads one byte of every page of [@addr, @addr+@len) through its address in this
 * process (process_vm_writev to this process into a scratch byte), the way send(),
 * process_vm_writev() and recv() reach it later. Changes no byte of the range and works on
 * read-only memory. Best effort: does nothing where process_vm_writev is refused. */
void kvf__touch_kernel(const void *addr, size_t len);

/* Whether warming is on: KVFERRY_NO_WARM=1 turns it off (to measure what it saves), read once. */
int kvf__touch_enabled(void);

#endif /* KVF_COMMON_TOUCH_H */
