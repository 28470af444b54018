/*
 * The table of transports (transport.h), in the order the core tries them for a peer when none
 * is forced: an engine of this process is reached by memcpy, one on this host by
 * process_vm_writev or a shared mapping, anything else over tcp, which reaches every peer and
 * so comes last. A transport that cannot reach a peer answers peer_open() with -KVF_ENOTSUP and
 * the core tries the next one.
 */
#include "common/common.h"
#include "transport/transport.h"

const struct kvf_transport_ops *const kvf__transports[] = {
    &kvf__loop_ops,
    &kvf__shm_ops,
    &kvf__tcp_ops,
    NULL,
};

_Static_assert(KVF__ARRAY_SIZE(kvf__transports) <= KVF_TRANSPORTS_MAX + 1,
               "raise KVF_TRANSPORTS_MAX");
