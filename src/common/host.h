/*
 * The identity of this host and of this process's view of it, which engines publish in their
 * session records and compare to decide whether a peer is on the same host (shm). Private.
 */
#ifndef KVF_COMMON_HOST_H
#define KVF_COMMON_HOST_H

#include <stdint.h>
#include <sys/types.h>

/* Bytes of a boot id or network namespace name with its NUL. */
#define KVF_HOST_ID_MAX 40

/* This host's boot id (36 characters + NUL), read once; "" if it cannot be read. */
const char *kvf__host_boot_id(void);

/* This process's network namespace as "net:[inode]", read once; "" if it cannot be read.
 * Engines in different network namespaces are treated as different hosts (that is how the
 * tests build "two hosts" on one machine, and how containers with their own network usually
 * look), even when their memory would be reachable. */
const char *kvf__host_net_ns(void);

/*
 * kvf__host_pid_listens - whether process @pid holds a listening TCP socket on @port of this
 * network namespace (/proc/net/tcp and tcp6 name the socket's inode, /proc/<pid>/fd the
 * process's sockets). The kernel's word, not a record's: a same-host sender uses it to prove
 * that a pid is the engine of a session id, whose port only that engine can hold.
 * Returns 1, 0, or -errno when @pid's fds cannot be read (-EACCES: another user's process;
 * -ENOENT: gone).
 */
int kvf__host_pid_listens(pid_t pid, uint16_t port);

#endif /* KVF_COMMON_HOST_H */
