/*
 * bench_transfer: kvferry TCP write throughput against a raw TCP stream measured in the same run.
 *
 *   bench_transfer [--block-size BYTES]... [--total BYTES] [--reps N] [--batch N]
 *
 * Baseline: one loopback TCP connection, a sender thread doing plain send() of BLOCK bytes and a
 * receiver thread doing recv() into the destination, cycling through the same 64 MiB source and
 * destination buffers the engine uses. kvferry: two engines in this process (a Decode that
 * registered the 64 MiB destination, a Prefill writing into it), BATCH blocks per
 * kvf_transfer_sync call. Runs alternate (raw, kvferry, raw, ...) and the median of REPS is
 * reported, so both see the same machine load. After the timed part the destination is compared
 * with the source, so a fast wrong transfer cannot pass. 1 GB = 10^9 bytes.
 */
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kvferry.h"

#define BUF_BYTES (64u << 20)
#define MAX_SIZES 8

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* ---- raw TCP baseline ---------------------------------------------------------------------- */

typedef struct {
    int fd;
    uint8_t *dst;
    size_t total;
    int failed;
} raw_rx_t;

static void *raw_receiver(void *p)
{
    raw_rx_t *r = p;
    size_t got = 0;
    /* Blocks divide the buffer, so byte k of the stream belongs at k mod BUF_BYTES. */
    while (got < r->total) {
        size_t pos = got % BUF_BYTES;
        size_t want = BUF_BYTES - pos;
        if (want > r->total - got)
            want = r->total - got;
        ssize_t n = recv(r->fd, r->dst + pos, want, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            r->failed = 1;
            return NULL;
        }
        got += (size_t)n;
    }
    return NULL;
}

static double raw_gbps(const uint8_t *src, uint8_t *dst, size_t block, size_t total)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 1) < 0 ||
        getsockname(ls, (struct sockaddr *)&a, &al) < 0)
        return 0;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof(a)) < 0)
        return 0;
    int s = accept(ls, NULL, NULL);
    close(ls);
    raw_rx_t rx = {.fd = s, .dst = dst, .total = total};
    pthread_t th;
    double t0 = now_s();
    pthread_create(&th, NULL, raw_receiver, &rx);
    size_t sent = 0;
    while (sent < total) {
        size_t pos = sent % BUF_BYTES;
        size_t len = block;
        const uint8_t *p = src + pos;
        while (len) {
            ssize_t n = send(c, p, len, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                goto out;
            p += n;
            len -= (size_t)n;
        }
        sent += block;
    }
out:
    pthread_join(th, NULL);
    double dt = now_s() - t0;
    close(c);
    close(s);
    return rx.failed ? 0 : (double)total / dt / 1e9;
}

/* ---- kvferry ------------------------------------------------------------------------------- */

static double kvf_gbps(kvf_engine_t *pre, const char *peer, const uint8_t *src, uint8_t *dst,
                       size_t block, size_t total, unsigned batch)
{
    kvf_xfer_t *x = calloc(batch, sizeof(*x));
    size_t blocks_per_buf = BUF_BYTES / block, next = 0;
    double t0 = now_s();
    for (size_t done = 0; done < total;) {
        unsigned n = 0;
        while (n < batch && done < total) {
            size_t off = (next++ % blocks_per_buf) * block;
            x[n++] = (kvf_xfer_t){KVF_OP_WRITE, (void *)(src + off), (uintptr_t)(dst + off),
                                  block};
            done += block;
        }
        if (kvf_transfer_sync(pre, peer, x, n) < 0) {
            fprintf(stderr, "bench_transfer: %s\n", kvf_last_error());
            free(x);
            return 0;
        }
    }
    double dt = now_s() - t0;
    free(x);
    return (double)total / dt / 1e9;
}

static size_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    switch (*end) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= 1024 * 1024; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
    default: break;
    }
    return (size_t)v;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"block-size", required_argument, NULL, 'b'}, {"total", required_argument, NULL, 't'},
        {"reps", required_argument, NULL, 'r'},       {"batch", required_argument, NULL, 'n'},
        {"help", no_argument, NULL, 'h'},             {NULL, 0, NULL, 0},
    };
    size_t sizes[MAX_SIZES], nsizes = 0, total = 1u << 30;
    unsigned reps = 5, batch = 1;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'b':
            if (nsizes < MAX_SIZES)
                sizes[nsizes++] = parse_size(optarg);
            break;
        case 't': total = parse_size(optarg); break;
        case 'r': reps = (unsigned)atoi(optarg); break;
        case 'n': batch = (unsigned)atoi(optarg); break;
        default:
            fprintf(stderr, "usage: bench_transfer [--block-size B]... [--total B] [--reps N] "
                            "[--batch N]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (nsizes == 0) {
        sizes[nsizes++] = 1u << 20;
        sizes[nsizes++] = 4u << 20;
    }
    for (size_t i = 0; i < nsizes; i++)
        if (sizes[i] < 1 || sizes[i] > BUF_BYTES || BUF_BYTES % sizes[i]) {
            fprintf(stderr, "bench_transfer: block size %zu must divide 64 MiB\n", sizes[i]);
            return 2;
        }
    if (reps < 1 || reps > 50 || batch < 1 || batch > 1024 || total < BUF_BYTES ||
        total > (64ull << 30)) {
        fprintf(stderr, "bench_transfer: --reps 1..50, --batch 1..1024, --total 64M..64G\n");
        return 2;
    }

    uint8_t *src = aligned_alloc(4096, BUF_BYTES), *dst = aligned_alloc(4096, BUF_BYTES);
    for (size_t i = 0; i < BUF_BYTES; i++)
        src[i] = (uint8_t)(i * 131 + (i >> 12));
    memset(dst, 0, BUF_BYTES);

    kvf_store_server_t *srv;
    kvf_engine_t *dec, *pre;
    /* Forced tcp: two engines of one process would otherwise take the loop path (memcpy), and
     * this benchmark is about the TCP transport (bench_shm covers shm). */
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.transport = KVF_TRANSPORT_TCP;
    if (kvf_store_server_start("tcp://127.0.0.1:0", &srv) < 0 ||
        kvf_engine_create(kvf_store_server_url(srv), "127.0.0.1:0", KVF_ROLE_DECODE, 0, &cfg,
                          &dec) < 0 ||
        kvf_engine_create(kvf_store_server_url(srv), "127.0.0.1:0", KVF_ROLE_PREFILL, 0, &cfg,
                          &pre) < 0 ||
        kvf_mem_register(dec, dst, BUF_BYTES) < 0) {
        fprintf(stderr, "bench_transfer: %s\n", kvf_last_error());
        return 1;
    }
    const char *peer = kvf_engine_session_id(dec);
    /* Warm-up: connections opened, pages and socket buffers in steady state. */
    kvf_gbps(pre, peer, src, dst, 1u << 20, BUF_BYTES, 1);
    raw_gbps(src, dst, 1u << 20, BUF_BYTES);

    printf("%-10s %6s %14s %14s %8s\n", "block", "batch", "raw TCP GB/s", "kvferry GB/s",
           "ratio");
    int bad = 0;
    for (size_t s = 0; s < nsizes; s++) {
        double raw[50], kvf[50];
        for (unsigned r = 0; r < reps; r++) {
            raw[r] = raw_gbps(src, dst, sizes[s], total);
            memset(dst, 0, BUF_BYTES);
            kvf[r] = kvf_gbps(pre, peer, src, dst, sizes[s], total, batch);
            /* Every block of the buffer was written at least once: it must equal the source. */
            if (total >= BUF_BYTES && memcmp(src, dst, BUF_BYTES) != 0) {
                fprintf(stderr, "bench_transfer: destination differs from source\n");
                bad = 1;
            }
        }
        qsort(raw, reps, sizeof(double), cmp_double);
        qsort(kvf, reps, sizeof(double), cmp_double);
        double mr = raw[reps / 2], mk = kvf[reps / 2];
        printf("%-10zu %6u %14.2f %14.2f %8.2f\n", sizes[s], batch, mr, mk, mr > 0 ? mk / mr : 0);
    }
    kvf_engine_destroy(pre);
    kvf_engine_destroy(dec);
    kvf_store_server_stop(srv);
    free(src);
    free(dst);
    return bad;
}
