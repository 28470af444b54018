/* This host's and this process's identity, as same-host peers compare it (host.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
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

/* The inodes of the listening TCP sockets on @port in one of /proc/net/tcp{,6}, appended to
 * @inodes (room for @cap). Lines: "sl local rem st tx:rx tr:when retrnsmt uid timeout inode". */
static size_t listening_inodes(const char *path, uint16_t port, unsigned long *inodes,
                               size_t n, size_t cap)
{
    FILE *f = fopen(path, "re");
    char line[512];
    if (!f)
        return n;
    while (n < cap && fgets(line, sizeof(line), f)) {
        char local[64];
        unsigned st, lport;
        unsigned long inode;
        if (sscanf(line, " %*u: %63s %*s %x %*s %*s %*s %*u %*u %lu", local, &st, &inode) != 3)
            continue; /* the header line */
        const char *colon = strrchr(local, ':');
        if (!colon || sscanf(colon + 1, "%x", &lport) != 1)
            continue;
        if (st == 0x0A /* TCP_LISTEN */ && lport == port && inode != 0)
            inodes[n++] = inode;
    }
    fclose(f);
    return n;
}

int kvf__host_pid_listens(pid_t pid, uint16_t port)
{
    unsigned long inodes[16];
    size_t n = listening_inodes("/proc/net/tcp", port, inodes, 0, 16);
    n = listening_inodes("/proc/net/tcp6", port, inodes, n, 16);
    if (n == 0)
        return 0;
    char dir[64];
    snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(dir);
    if (!d)
        return -errno;
    int found = 0;
    struct dirent *de;
    while (!found && (de = readdir(d)) != NULL) {
        char path[sizeof(dir) + sizeof(de->d_name) + 1], link[64];
        unsigned long ino;
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        ssize_t len = readlink(path, link, sizeof(link) - 1);
        if (len <= 0)
            continue;
        link[len] = '\0';
        if (sscanf(link, "socket:[%lu]", &ino) != 1)
            continue;
        for (size_t i = 0; i < n && !found; i++)
            found = inodes[i] == ino;
    }
    closedir(d);
    return found;
}
