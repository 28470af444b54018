/*
 * What the files of `kvferry bench` share: the data pattern both sides of a run compute, memory,
 * the parsing of sizes and memory kinds, sizes for people and sorting.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bench.h"

static uint64_t pattern_word(uint64_t seed, uint64_t widx)
{
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + widx * 0xd1b54a32d192ed03ull + 1;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint8_t pattern_byte(uint64_t seed, uint64_t o)
{
    return (uint8_t)(pattern_word(seed, o >> 3) >> ((o & 7u) * 8u));
}

void bench_pattern_fill(uint8_t *p, uint64_t off, size_t len, uint64_t seed)
{
    size_t i = 0;
    for (; i < len && ((off + i) & 7u); i++)
        p[i] = pattern_byte(seed, off + i);
    for (; i + 8 <= len; i += 8) {
        uint64_t w = pattern_word(seed, (off + i) >> 3);
        for (unsigned k = 0; k < 8; k++)
            p[i + k] = (uint8_t)(w >> (8 * k));
    }
    for (; i < len; i++)
        p[i] = pattern_byte(seed, off + i);
}

ssize_t bench_pattern_check(const uint8_t *p, uint64_t off, size_t len, uint64_t seed, uint8_t *got,
                            uint8_t *want)
{
    for (size_t i = 0; i < len; i++) {
        uint8_t w = pattern_byte(seed, off + i);
        if (p[i] != w) {
            *got = p[i];
            *want = w;
            return (ssize_t)i;
        }
    }
    return -1;
}

void *bench_map(size_t len)
{
    void *p =
        mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int bench_parse_size(const char *cmd, const char *flag, const char *s, uint64_t max, size_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    unsigned shift = 0;
    if (end != s && *end) {
        switch (*end) {
        case 'k':
        case 'K':
            shift = 10;
            break;
        case 'm':
        case 'M':
            shift = 20;
            break;
        case 'g':
        case 'G':
            shift = 30;
            break;
        default:
            end = (char *)s;
            break;
        }
        if (end != s && end[1] != '\0' && strcasecmp(end + 1, "iB") && strcasecmp(end + 1, "B"))
            end = (char *)s;
        else if (end != s)
            end += strlen(end);
    }
    if (end == s || *end || errno || s[0] == '-' || v == 0 || v > (max >> shift)) {
        fprintf(stderr,
                "kvferry %s: %s %s: want a size like 4096, 64K, 1M or 1G (1 byte to %llu MiB)\n",
                cmd, flag, s, (unsigned long long)(max >> 20));
        return -1;
    }
    *out = (size_t)(v << shift);
    return 0;
}

int bench_parse_memory(const char *cmd, const char *s, bool *alloc)
{
    if (strcasecmp(s, "alloc") && strcasecmp(s, "registered")) {
        fprintf(stderr, "kvferry %s: --memory %s: want alloc or registered\n", cmd, s);
        return -1;
    }
    *alloc = !strcasecmp(s, "alloc");
    return 0;
}

int bench_opt_size(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    char flag[64];
    snprintf(flag, sizeof(flag), "--%s", o->name);
    return bench_parse_size(cmd, flag, value, o->max, o->dst);
}

int bench_opt_memory(const char *cmd, const kvf_cli_opt_t *o, const char *value)
{
    return bench_parse_memory(cmd, value, o->dst);
}

void bench_size_name(size_t n, char *buf, size_t len)
{
    if (n >= (1u << 30) && n % (1u << 30) == 0)
        snprintf(buf, len, "%zu GiB", n >> 30);
    else if (n >= (1u << 20) && n % (1u << 20) == 0)
        snprintf(buf, len, "%zu MiB", n >> 20);
    else if (n >= 1024 && n % 1024 == 0)
        snprintf(buf, len, "%zu KiB", n >> 10);
    else
        snprintf(buf, len, "%zu B", n);
}

int bench_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

void bench_proc_status(pid_t pid, long *rss_kib, long *shmem_kib, long *file_kib, long *threads)
{
    char path[64], line[256];
    long file = -1;
    *rss_kib = -1;
    *shmem_kib = -1;
    *threads = -1;
    if (file_kib)
        *file_kib = -1;
    if (pid > 0)
        snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    else
        snprintf(path, sizeof(path), "/proc/self/status");
    FILE *f = fopen(path, "re");
    if (!f)
        return;
    while (fgets(line, sizeof(line), f)) {
        if (!strncmp(line, "VmRSS:", 6))
            *rss_kib = strtol(line + 6, NULL, 10);
        else if (!strncmp(line, "RssShmem:", 9))
            *shmem_kib = strtol(line + 9, NULL, 10);
        else if (!strncmp(line, "RssFile:", 8))
            file = strtol(line + 8, NULL, 10);
        else if (!strncmp(line, "Threads:", 8))
            *threads = strtol(line + 8, NULL, 10);
    }
    fclose(f);
    if (file_kib)
        *file_kib = file;
}

double bench_proc_cpu_s(pid_t pid)
{
    if (pid <= 0) {
        struct rusage ru;
        if (getrusage(RUSAGE_SELF, &ru) < 0)
            return -1;
        return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
               (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    }
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* "pid (comm) state ..." with utime and stime the 14th and 15th fields; comm may hold
     * spaces and parentheses, so count from the last ')'. */
    char *p = strrchr(buf, ')');
    unsigned long long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    long tck = sysconf(_SC_CLK_TCK);
    return (double)(ut + st) / (double)(tck > 0 ? tck : 100);
}
