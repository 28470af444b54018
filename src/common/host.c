/* This host's and this process's identity, as same-host peers compare it (host.h). */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
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

/* The same from the kernel's socket diagnostics (sock_diag, what `ss -l` uses), asking for
 * listening sockets only: the kernel walks its listening table instead of printing every socket
 * of the host. /proc/net/tcp lists all of them, and on a host with many connections (thousands in
 * TIME_WAIT after a test run) reading it took 20-130 ms, paid by the first transfer to a shm peer.
 * Returns false when the socket or the dump fails (an old kernel, a seccomp filter). */
static bool listening_inodes_diag(int family, uint16_t port, unsigned long *inodes, size_t *n,
                                  size_t cap)
{
    struct {
        struct nlmsghdr nh;
        struct inet_diag_req_v2 r;
    } req = {
        .nh = {.nlmsg_len = sizeof(req),
               .nlmsg_type = SOCK_DIAG_BY_FAMILY,
               .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP},
        .r = {.sdiag_family = (uint8_t)family,
              .sdiag_protocol = IPPROTO_TCP,
              .idiag_states = 1u << TCP_LISTEN},
    };
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    struct timeval tv = {.tv_sec = 1};
    long buf[8192 / sizeof(long)];
    bool ok = false, done = false;
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0)
        return false;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (sendto(fd, &req, sizeof(req), 0, (struct sockaddr *)&sa, sizeof(sa)) != (ssize_t)sizeof(req))
        goto out;
    /* Bounded: a dump of listening sockets is a few messages; a kernel that never ends it is
     * cut off by the receive timeout. */
    for (unsigned round = 0; round < 4096 && !done; round++) {
        ssize_t got = recv(fd, buf, sizeof(buf), 0);
        if (got <= 0)
            goto out;
        size_t left = (size_t)got;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, left);
             h = NLMSG_NEXT(h, left)) {
            if (h->nlmsg_type == NLMSG_DONE) {
                done = true;
                break;
            }
            if (h->nlmsg_type == NLMSG_ERROR)
                goto out;
            if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
                continue;
            const struct inet_diag_msg *m = NLMSG_DATA(h);
            if (ntohs(m->id.idiag_sport) == port && m->idiag_inode != 0 && *n < cap)
                inodes[(*n)++] = m->idiag_inode;
        }
    }
    ok = done;
out:
    close(fd);
    return ok;
}

int kvf__host_pid_listens(pid_t pid, uint16_t port)
{
    unsigned long inodes[16];
    size_t n = 0;
    if (!listening_inodes_diag(AF_INET, port, inodes, &n, 16) ||
        !listening_inodes_diag(AF_INET6, port, inodes, &n, 16)) {
        n = listening_inodes("/proc/net/tcp", port, inodes, 0, 16);
        n = listening_inodes("/proc/net/tcp6", port, inodes, n, 16);
    }
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
