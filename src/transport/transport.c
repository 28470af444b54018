/* What every transport shares: the stubs for ops a transport does not have (transport.h). */
#include "transport/transport.h"

int kvf__transport_enotsup_gen(kvf_tpeer_t *p, uint64_t *gen)
{
    (void)p;
    (void)gen;
    return -KVF_ENOTSUP;
}

int kvf__transport_enotsup_notify(kvf_tpeer_t *p, const void *msg, size_t len,
                                  uint64_t deadline_ms)
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
