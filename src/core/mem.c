/*
 * Registration (kvf_mem_register*, kvf_mem_unregister) and the memory of kvf_mem_alloc(): a
 * memfd, offered to the transports that serve memory to same-host senders (shm) before it is
 * registered.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/touch.h"
#include "core/core.h"

/* One kvf_mem_alloc() allocation: a memfd mapped MAP_SHARED at @addr. @len is what the caller
 * asked for and what is registered; @map_len is rounded up to the page size. @kept: its
 * unregister timed out in kvf_mem_free(), so it stays mapped until destroy. */
typedef struct eng_mem {
    struct eng_mem *next;
    void *addr;
    size_t len;
    size_t map_len;
    int fd;
    bool huge;
    bool kept;
} eng_mem_t;

/* Fault the pages in now, so that the first transfer into them runs at memory speed instead of
 * page-fault speed. MADV_POPULATE_WRITE (Linux 5.14) does it without touching the contents; for
 * read-only memory (a source that peers only read) MADV_POPULATE_READ does what can be done.
 * Then the kernel reads one byte of each page through its address (kvf__touch_kernel), the way
 * the transports' send(), recv() and process_vm_writev() reach it later: where that first access
 * is slow even for present pages (a guest under shadow paging, common/touch.h) it is paid here,
 * not by the first transfer. Nothing here ever stores to the range: it may be read-only, and a
 * store could race with the application's own writes. Where neither advice exists the first
 * transfer pays the faults. */
static void prefault(void *addr, size_t len)
{
    long psz = sysconf(_SC_PAGESIZE);
    uintptr_t page = (uintptr_t)(psz > 0 ? psz : 4096);
    uintptr_t start = (uintptr_t)addr & ~(page - 1);
    uintptr_t end = (uintptr_t)addr + len;
#if defined(MADV_POPULATE_WRITE) && defined(MADV_POPULATE_READ)
    if (madvise((void *)start, end - start, MADV_POPULATE_WRITE) < 0 &&
        madvise((void *)start, end - start, MADV_POPULATE_READ) < 0)
        KVF_DEBUG(ENG_LOG, "prefault [%p, +%zu): %s", addr, len, strerror(errno));
#else
    (void)start;
    (void)end;
#endif
    kvf__touch_kernel(addr, len);
}

/* Whether all of [@addr, @addr+@len) is mapped in this process: msync() of a range with a hole
 * fails with ENOMEM, without touching a page (MS_ASYNC writes nothing back). A range that is not
 * mapped would be accepted by the region table, and the first peer write into it would kill
 * this process (tcp: SIGSEGV in recv's copy) or fail far from the mistake. */
static bool mapped(void *addr, size_t len)
{
    long psz = sysconf(_SC_PAGESIZE);
    uintptr_t page = (uintptr_t)(psz > 0 ? psz : 4096);
    uintptr_t start = (uintptr_t)addr & ~(page - 1);
    uintptr_t end = (uintptr_t)addr + len;
    if (end < start)
        return false; /* past the end of the address space; the table refuses it with a message */
    return msync((void *)start, end - start, MS_ASYNC) == 0 || errno != ENOMEM;
}

int kvf_mem_register(kvf_engine_t *e, void *addr, size_t len)
{
    if (!e)
        return kvf__err(-KVF_EINVAL, "register: the engine is NULL");
    return kvf_mem_register_batch(e, &addr, &len, 1);
}

int kvf_mem_register_batch(kvf_engine_t *e, void *const *addrs, const size_t *lens, size_t n)
{
    uint64_t *a, *l;
    int rc;

    if (!e)
        return kvf__err(-KVF_EINVAL, "register: the engine is NULL");
    if (n == 0 || !addrs || !lens)
        return kvf__err(-KVF_EINVAL, "register: %s",
                        n ? "NULL address or length array" : "empty batch");
    for (size_t i = 0; i < n; i++) {
        if (!addrs[i])
            return kvf__err(-KVF_EINVAL, "register: element %zu: address is NULL", i);
        if (lens[i] && !mapped(addrs[i], lens[i]))
            return kvf__err(-EFAULT,
                            "register: element %zu [%p, +%zu) is not mapped in this process "
                            "(freed, or a wrong address or length)",
                            i, addrs[i], lens[i]);
    }
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    a = malloc(n * sizeof(*a));
    l = malloc(n * sizeof(*l));
    if (!a || !l) {
        rc = kvf__err(-KVF_ENOMEM, "register: out of memory for %zu ranges", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        a[i] = (uintptr_t)addrs[i];
        l[i] = lens[i];
    }
    rc = kvf__regions_add_batch(e->regions, a, l, n);
    if (rc < 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        prefault(addrs[i], lens[i]);
    rc = kvf__eng_publish_regions(e);
    if (rc < 0) {
        /* Peers could not learn of the ranges: undo, so that the caller's view and theirs agree. */
        for (size_t i = 0; i < n; i++)
            kvf__regions_remove(e->regions, a[i], e->cfg.op_timeout_ms);
        goto out;
    }
    KVF_DEBUG(ENG_LOG, "engine %s: registered %zu range(s), first [%p, +%zu)", e->sid, n, addrs[0],
              lens[0]);
out:
    free(a);
    free(l);
    kvf__eng_busy_leave(e);
    return rc;
}

/* The length of the registered region that starts at @addr, 0 when there is none. */
static uint64_t region_len(kvf_engine_t *e, uintptr_t addr)
{
    kvf_region_t *rs;
    size_t n;
    uint64_t len = 0;
    if (kvf__regions_snapshot(e->regions, &rs, &n, NULL) < 0)
        return 0;
    for (size_t i = 0; i < n && !len; i++)
        if (rs[i].addr == addr)
            len = rs[i].len;
    free(rs);
    return len;
}

/* An unregister of [@addr, +@len) timed out (@rc): add to its message who still holds it. */
static int name_holders(kvf_engine_t *e, int rc, uintptr_t addr, uint64_t len)
{
    char who[512] = "";
    size_t n = 0;
    for (size_t i = 0; kvf__transports[i]; i++)
        n += kvf__transports[i]->holders(e->tr[i], addr, len, who, sizeof(who));
    if (n) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", kvf_last_error());
        kvf__err(rc, "%s; held by %s", msg, who);
    }
    return rc;
}

int kvf_mem_unregister(kvf_engine_t *e, void *addr)
{
    if (!e)
        return kvf__err(-KVF_EINVAL, "unregister: the engine is NULL");
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    uint64_t deadline = kvf__now_ms() + e->cfg.op_timeout_ms;
    uint64_t len = region_len(e, (uintptr_t)addr);
    rc = kvf__regions_remove(e->regions, (uintptr_t)addr, e->cfg.op_timeout_ms);
    if (rc == -KVF_ETIMEDOUT)
        name_holders(e, rc, (uintptr_t)addr, len);
    /* Publish even after a drain timeout: the region is gone for new requests either way. A
     * failed publication does not fail the call: the target's own table already refuses the
     * range, and the next successful publication carries the change. */
    if (rc == 0 || rc == -KVF_ETIMEDOUT) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", kvf_last_error());
        if (kvf__eng_publish_regions(e) < 0) {
            KVF_WARN(ENG_LOG, "engine %s: unregistered %p, but publishing the change failed: %s",
                     e->sid, addr, kvf_last_error());
            kvf__err(rc, "%s", msg);
        }
    }
    /* The table senders read (the shm word) no longer has the range: wait out the same-host
     * senders that checked against the old one. */
    if (rc == 0) {
        rc = kvf__eng_drain(e, deadline);
        if (rc < 0)
            kvf__err_wrap(rc, "unregister %p: not drained within op_timeout_ms (%u ms)", addr,
                          e->cfg.op_timeout_ms);
    }
    kvf__eng_busy_leave(e);
    return rc;
}

/* A memfd of @map_len bytes mapped shared, huge pages when @huge. The huge attempt faults the
 * pages in here: with no huge pages left, a later first touch would be SIGBUS, while
 * MADV_POPULATE_WRITE fails cleanly. Returns 0 or -errno of the step that failed. */
static int mem_map(size_t map_len, bool huge, eng_mem_t *m)
{
    unsigned flags = MFD_CLOEXEC;
    int rc;
    if (huge) {
#if defined(MFD_HUGETLB) && defined(MADV_POPULATE_WRITE)
        flags |= MFD_HUGETLB;
#else
        return -ENOTSUP;
#endif
    }
    m->fd = memfd_create("kvferry", flags);
    if (m->fd < 0)
        return -errno;
    if (ftruncate(m->fd, (off_t)map_len) < 0) {
        rc = -errno;
        goto out_close;
    }
    m->addr = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, m->fd, 0);
    if (m->addr == MAP_FAILED) {
        rc = -errno;
        goto out_close;
    }
#ifdef MADV_POPULATE_WRITE
    if (huge && madvise(m->addr, map_len, MADV_POPULATE_WRITE) < 0) {
        rc = -errno;
        munmap(m->addr, map_len);
        goto out_close;
    }
#endif
    m->map_len = map_len;
    m->huge = huge;
    return 0;
out_close:
    close(m->fd);
    m->fd = -1;
    return rc;
}

/* Offer @m to every transport that serves memory (shm), or to none. */
static int mem_export(kvf_engine_t *e, const eng_mem_t *m)
{
    for (size_t i = 0; kvf__transports[i]; i++) {
        int rc = kvf__transports[i]->mem_export(e->tr[i], m->addr, m->len, m->fd);
        if (rc < 0) {
            while (i-- > 0)
                kvf__transports[i]->mem_unexport(e->tr[i], m->addr);
            return rc;
        }
    }
    return 0;
}

static void mem_unexport(kvf_engine_t *e, void *addr)
{
    for (size_t i = 0; kvf__transports[i]; i++)
        kvf__transports[i]->mem_unexport(e->tr[i], addr);
}

int kvf_mem_alloc(kvf_engine_t *e, size_t len, void **out)
{
    long psz = sysconf(_SC_PAGESIZE);
    size_t page = psz > 0 ? (size_t)psz : 4096;
    eng_mem_t *m;
    int rc;

    if (!e)
        return kvf__err(-KVF_EINVAL, "mem alloc: the engine is NULL");
    if (!out)
        return kvf__err(-KVF_EINVAL, "mem alloc: the output pointer is NULL");
    *out = NULL;
    if (len == 0)
        return kvf__err(-KVF_EINVAL, "mem alloc: length is 0; want at least 1 byte");
    if (len > (SIZE_MAX >> 2))
        return kvf__err(-KVF_EINVAL, "mem alloc: length %zu is larger than any memory", len);
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    m = calloc(1, sizeof(*m));
    if (!m) {
        rc = kvf__err(-KVF_ENOMEM, "mem alloc: out of memory");
        goto out;
    }
    m->len = len;
    rc = -ENOTSUP;
    if (e->cfg.mem_huge_pages) {
        rc = mem_map((len + ENG_HUGE_PAGE - 1) & ~(size_t)(ENG_HUGE_PAGE - 1), true, m);
        if (rc < 0)
            KVF_INFO(ENG_LOG,
                     "engine %s: mem alloc of %zu bytes: no huge pages (%s), using "
                     "normal pages",
                     e->sid, len, strerror(-rc));
    }
    if (rc < 0)
        rc = mem_map((len + page - 1) & ~(page - 1), false, m);
    if (rc < 0) {
        rc = kvf__err(rc, "mem alloc of %zu bytes: memfd: %s", len, strerror(-rc));
        goto out_free;
    }
    /* Exported before it is registered: the memfd socket answers only for registered regions,
     * and a sender asking as soon as the region is published must get the fd. */
    rc = mem_export(e, m);
    if (rc < 0)
        goto out_unmap;
    rc = kvf_mem_register(e, m->addr, len); /* faults the pages in */
    if (rc < 0)
        goto out_unexport;
    pthread_mutex_lock(&e->mem_lock);
    m->next = e->mems;
    e->mems = m;
    pthread_mutex_unlock(&e->mem_lock);
    KVF_DEBUG(ENG_LOG, "engine %s: mem alloc [%p, +%zu), %s pages", e->sid, m->addr, len,
              m->huge ? "huge" : "normal");
    *out = m->addr;
    goto out;

out_unexport:
    mem_unexport(e, m->addr);
out_unmap:
    munmap(m->addr, m->map_len);
    close(m->fd);
out_free:
    free(m);
out:
    kvf__eng_busy_leave(e);
    return rc;
}

int kvf_mem_free(kvf_engine_t *e, void *ptr)
{
    eng_mem_t *m = NULL;
    int rc;

    if (!e)
        return kvf__err(-KVF_EINVAL, "mem free: the engine is NULL");
    if (!ptr)
        return kvf__err(-KVF_EINVAL, "mem free: the pointer is NULL");
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&e->mem_lock);
    for (eng_mem_t **pp = &e->mems; *pp; pp = &(*pp)->next) {
        if ((*pp)->addr == ptr && !(*pp)->kept) {
            m = *pp;
            *pp = m->next;
            break;
        }
    }
    pthread_mutex_unlock(&e->mem_lock);
    if (!m) {
        rc = kvf__err(-KVF_EINVAL,
                      "mem free: %p was not returned by kvf_mem_alloc() on engine "
                      "%s (or is already freed)",
                      ptr, e->sid);
        goto out;
    }
    /* Unregister first: from its return no new transfer can reach the memory (shm senders see
     * the generation move and unmap), and the memfd socket no longer hands the fd out. */
    rc = kvf_mem_unregister(e, ptr);
    if (rc == -KVF_ETIMEDOUT) {
        /* Transfers still write into it: it must stay mapped, so it is kept until destroy. */
        m->kept = true;
        pthread_mutex_lock(&e->mem_lock);
        m->next = e->mems;
        e->mems = m;
        pthread_mutex_unlock(&e->mem_lock);
        kvf__err(rc,
                 "mem free %p: transfers into it did not end within %u ms; it stays "
                 "allocated until kvf_engine_destroy()",
                 ptr, e->cfg.op_timeout_ms);
        goto out;
    }
    /* -KVF_ENOTREG: the caller unregistered it already; freeing is still right. */
    rc = 0;
    mem_unexport(e, ptr);
    munmap(m->addr, m->map_len);
    close(m->fd);
    free(m);
out:
    kvf__eng_busy_leave(e);
    return rc;
}

void kvf__mem_fini(kvf_engine_t *e)
{
    for (eng_mem_t *m = e->mems, *next; m; m = next) {
        next = m->next;
        munmap(m->addr, m->map_len);
        close(m->fd);
        free(m);
    }
    e->mems = NULL;
}
