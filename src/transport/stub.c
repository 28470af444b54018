/* The stubs for ops a transport does not have (transport.h), shared by every transport. */
#include "transport/transport.h"

int kvf__transport_enotsup_gen(kvf_tpeer_t *p, uint64_t *gen)
{
    (void)p;
    (void)gen;
    return -KVF_ENOTSUP;
}

int kvf__transport_enotsup_regions(kvf_tpeer_t *p, kvf_region_t **out, size_t *n, uint64_t *gen)
{
    (void)p;
    (void)out;
    (void)n;
    (void)gen;
    return -KVF_ENOTSUP;
}

int kvf__transport_enotsup_notify(kvf_tpeer_t *p, const void *msg, size_t len, uint64_t deadline_ms)
{
    (void)p;
    (void)msg;
    (void)len;
    (void)deadline_ms;
    return -KVF_ENOTSUP;
}

void kvf__transport_nop_regions(kvf_tpeer_t *p, const kvf_region_t *rs, size_t n)
{
    (void)p;
    (void)rs;
    (void)n;
}

void kvf__transport_nop_published(kvf_transport_t *t, const kvf_region_t *rs, size_t n,
                                  uint64_t gen)
{
    (void)t;
    (void)rs;
    (void)n;
    (void)gen;
}

uint16_t kvf__transport_no_port(const kvf_transport_t *t)
{
    (void)t;
    return 0;
}

void kvf__transport_nop(kvf_transport_t *t)
{
    (void)t;
}

int kvf__transport_nop_export(kvf_transport_t *t, void *addr, size_t len, int fd)
{
    (void)t;
    (void)addr;
    (void)len;
    (void)fd;
    return 0;
}

void kvf__transport_nop_unexport(kvf_transport_t *t, void *addr)
{
    (void)t;
    (void)addr;
}

const char *kvf__transport_no_sock(const kvf_transport_t *t)
{
    (void)t;
    return "";
}

int kvf__transport_no_guard_enter(kvf_tpeer_t *p, uint64_t *token)
{
    (void)p;
    *token = 0;
    return 0;
}

void kvf__transport_no_guard_leave(kvf_tpeer_t *p, uint64_t token)
{
    (void)p;
    (void)token;
}

int kvf__transport_no_drain(kvf_transport_t *t, uint64_t deadline_ms)
{
    (void)t;
    (void)deadline_ms;
    return 0;
}

int kvf__transport_no_post(kvf_tpeer_t *p, const kvf_xfer_t *x, size_t n, uint64_t deadline_ms,
                           int *status, kvf_post_done_fn done, void *arg)
{
    (void)p;
    (void)x;
    (void)n;
    (void)deadline_ms;
    (void)status;
    (void)done;
    (void)arg;
    return 1;
}

size_t kvf__transport_no_holders(kvf_transport_t *t, uint64_t addr, uint64_t len, char *buf,
                                 size_t buflen)
{
    (void)t;
    (void)addr;
    (void)len;
    (void)buf;
    (void)buflen;
    return 0;
}
