/* This host's and this process's identity, as same-host peers compare it (host.h). */
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "common/host.h"

static char host_boot_id[KVF_HOST_ID_MAX];
static pthread_once_t host_boot_once = PTHREAD_ONCE_INIT;

static void host_boot_id_read(void)
{
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, host_boot_id, sizeof(host_boot_id) - 1);
    close(fd);
    if (n <= 0) {
        host_boot_id[0] = '\0';
        return;
    }
    host_boot_id[n] = '\0';
    host_boot_id[strcspn(host_boot_id, "\n")] = '\0';
}

const char *kvf__host_boot_id(void)
{
    pthread_once(&host_boot_once, host_boot_id_read);
    return host_boot_id;
}

static char host_net_ns[KVF_HOST_ID_MAX];
static pthread_once_t host_net_once = PTHREAD_ONCE_INIT;

static void host_net_ns_read(void)
{
    ssize_t n = readlink("/proc/self/ns/net", host_net_ns, sizeof(host_net_ns) - 1);
    host_net_ns[n > 0 ? n : 0] = '\0';
}

const char *kvf__host_net_ns(void)
{
    pthread_once(&host_net_once, host_net_ns_read);
    return host_net_ns;
}
