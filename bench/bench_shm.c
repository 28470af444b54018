/*
 * bench_shm: kvferry shm writes against a raw process_vm_writev measured in the same run.
 *
 *   bench_shm [--reps N] [--lat-iters N]
 *
 * A Decode runs in a child process (this binary re-executed) and registers 64 MiB of ordinary
 * anonymous memory (faulted in at registration). The parent's Prefill writes 16 MiB and 64 MiB
 * into it with kvf_write(), alternating with a raw process_vm_writev() of the same bytes to the
 * same address; the median of REPS of each is reported, and the ratio. The first kvf_write (peer
 * lookup, handshake) is reported apart. Then the 4 KiB write latency: p50/p99 of LAT_ITERS
 * kvf_write calls, beside raw process_vm_writev of 4 KiB. After the timed part the child's bytes
 * are read back and compared, so a fast wrong transfer cannot pass. 1 GB = 10^9 bytes.
 *
 * The child also takes 64 MiB from kvf_mem_alloc() (a memfd, which the sender maps and writes
 * with memcpy). Writes of 16 MiB and 64 MiB into it are measured against a single-thread
 * memcpy() of the same bytes between two faulted-in buffers of this process, alternating, the
 * median of REPS each; the first write into it (fd fetch and mapping included) is reported apart.
 * These writes are made by three engines, with KVFERRY_SHM_COPY_THREADS 1, unset (the default)
 * and 2, each also as a ratio to a two-thread memcpy (a persistent helper copies half).
 */
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvferry.h"

#define BUF_BYTES (64u << 20)
#define CHILD_ARG "--child"

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

/* The Decode: register, allocate, print "<sid> <addr> <pid> <memfd addr>", wait for the parent
 * to close stdin. */
static int child_main(const char *url)
{
    kvf_engine_t *e;
    void *mem;
    uint8_t *buf = mmap(NULL, BUF_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    if (buf == MAP_FAILED ||
        kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_DECODE, 0, NULL, &e) < 0 ||
        kvf_mem_register(e, buf, BUF_BYTES) < 0 || kvf_mem_alloc(e, BUF_BYTES, &mem) < 0) {
        fprintf(stderr, "bench_shm child: %s\n", kvf_last_error());
        return 1;
    }
    printf("%s %p %d %p\n", kvf_engine_session_id(e), (void *)buf, (int)getpid(), mem);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    kvf_engine_destroy(e);
    return 0;
}

/* The two-thread memcpy baseline: a persistent helper copies the second half. */
typedef struct {
    void *(*volatile copy)(void *, const void *, size_t);
    pthread_barrier_t go, done;
    uint8_t *d;
    const uint8_t *s;
    size_t len;
    int stop;
} copy2_t;

static void *copy2_helper(void *arg)
{
    copy2_t *h = arg;
    for (;;) {
        pthread_barrier_wait(&h->go);
        if (h->stop)
            return NULL;
        h->copy(h->d, h->s, h->len);
        pthread_barrier_wait(&h->done);
    }
}

static void copy2(copy2_t *h, uint8_t *d, const uint8_t *s, size_t len)
{
    size_t half = (len / 2 + 4095) & ~(size_t)4095;
    h->d = d + half;
    h->s = s + half;
    h->len = len - half;
    pthread_barrier_wait(&h->go);
    h->copy(d, s, half);
    pthread_barrier_wait(&h->done);
}

static int raw_write(pid_t pid, const void *src, uint64_t dst, size_t len)
{
    struct iovec l = {.iov_base = (void *)src, .iov_len = len};
    struct iovec r = {.iov_base = (void *)(uintptr_t)dst, .iov_len = len};
    return process_vm_writev(pid, &l, 1, &r, 1, 0) == (ssize_t)len ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], CHILD_ARG))
        return child_main(argv[2]);
    int reps = 15, lat_iters = 20000;
    static const struct option opts[] = {{"reps", required_argument, NULL, 'r'},
                                         {"lat-iters", required_argument, NULL, 'l'},
                                         {"help", no_argument, NULL, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == 'r')
            reps = atoi(optarg);
        else if (c == 'l')
            lat_iters = atoi(optarg);
        else {
            fprintf(stderr, "usage: bench_shm [--reps N] [--lat-iters N]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (reps < 1 || reps > 200 || lat_iters < 100 || lat_iters > 10000000) {
        fprintf(stderr, "bench_shm: --reps 1..200, --lat-iters 100..10000000\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    kvf_store_server_t *srv;
    if (kvf_store_server_start("tcp://127.0.0.1:0", &srv) < 0) {
        fprintf(stderr, "bench_shm: %s\n", kvf_last_error());
        return 1;
    }
    int to[2], from[2];
    if (pipe(to) < 0 || pipe(from) < 0)
        return 1;
    pid_t child = fork();
    if (child == 0) {
        dup2(to[0], 0);
        dup2(from[1], 1);
        close(to[1]);
        close(from[0]);
        char *cargv[] = {"/proc/self/exe", CHILD_ARG, (char *)kvf_store_server_url(srv), NULL};
        execv("/proc/self/exe", cargv);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    FILE *in = fdopen(from[0], "r");
    char sid[300];
    void *addr_p, *mem_p;
    int pid;
    if (!in || fscanf(in, "%299s %p %d %p", sid, &addr_p, &pid, &mem_p) != 4) {
        fprintf(stderr, "bench_shm: the child Decode did not start\n");
        return 1;
    }
    uint64_t dst = (uintptr_t)addr_p, mdst = (uintptr_t)mem_p;

    kvf_engine_t *pre;
    if (kvf_engine_create(kvf_store_server_url(srv), "127.0.0.1:0", KVF_ROLE_PREFILL, 0, NULL,
                          &pre) < 0) {
        fprintf(stderr, "bench_shm: %s\n", kvf_last_error());
        return 1;
    }
    uint8_t *src = aligned_alloc(4096, BUF_BYTES), *back = aligned_alloc(4096, BUF_BYTES);
    for (size_t i = 0; i < BUF_BYTES; i++)
        src[i] = (uint8_t)(i * 131 + (i >> 12));
    memset(back, 0, BUF_BYTES);

    double t0 = now_s();
    if (kvf_write(pre, sid, src, dst, 16u << 20) < 0) {
        fprintf(stderr, "bench_shm: %s\n", kvf_last_error());
        return 1;
    }
    double first = now_s() - t0;
    const char *via = "?";
    kvf_engine_peer_transport(pre, sid, &via);
    printf("bench_shm: peer %s via %s; first 16 MiB kvf_write (handshake included): %.3f ms, "
           "%.2f GB/s\n",
           sid, via, first * 1e3, (double)(16u << 20) / first / 1e9);

    static const size_t sizes[] = {16u << 20, 64u << 20};
    double *tr = calloc((size_t)reps, sizeof(double)), *tk = calloc((size_t)reps, sizeof(double));
    int rc = 0;
    for (size_t s = 0; s < 2; s++) {
        size_t len = sizes[s];
        /* Warm-up of both paths at this size. */
        raw_write(pid, src, dst, len);
        kvf_write(pre, sid, src, dst, len);
        for (int r = 0; r < reps; r++) {
            double a = now_s();
            rc |= raw_write(pid, src, dst, len);
            double b = now_s();
            rc |= kvf_write(pre, sid, src, dst, len);
            double d = now_s();
            tr[r] = b - a;
            tk[r] = d - b;
        }
        qsort(tr, (size_t)reps, sizeof(double), cmp_double);
        qsort(tk, (size_t)reps, sizeof(double), cmp_double);
        double graw = (double)len / tr[reps / 2] / 1e9, gkvf = (double)len / tk[reps / 2] / 1e9;
        printf("bench_shm: %3zu MiB  raw process_vm_writev %6.2f GB/s  kvferry shm %6.2f GB/s  "
               "ratio %.3f (target >= 0.9)\n",
               len >> 20, graw, gkvf, gkvf / graw);
    }

    /* 4 KiB latency, one call at a time. */
    double *lr = calloc((size_t)lat_iters, sizeof(double));
    double *lk = calloc((size_t)lat_iters, sizeof(double));
    for (int i = 0; i < 1000; i++)
        kvf_write(pre, sid, src, dst, 4096);
    for (int i = 0; i < lat_iters; i++) {
        size_t off = (size_t)(i % 1024) * 4096;
        double a = now_s();
        rc |= raw_write(pid, src + off, dst + off, 4096);
        double b = now_s();
        rc |= kvf_write(pre, sid, src + off, dst + off, 4096);
        double d = now_s();
        lr[i] = b - a;
        lk[i] = d - b;
    }
    qsort(lr, (size_t)lat_iters, sizeof(double), cmp_double);
    qsort(lk, (size_t)lat_iters, sizeof(double), cmp_double);
    printf("bench_shm: 4 KiB write latency  kvferry shm p50 %.2f us p99 %.2f us (target p50 <= 5 "
           "us)  raw process_vm_writev p50 %.2f us p99 %.2f us\n",
           lk[lat_iters / 2] * 1e6, lk[lat_iters * 99 / 100] * 1e6, lr[lat_iters / 2] * 1e6,
           lr[lat_iters * 99 / 100] * 1e6);

    /* The bytes must be right: read the whole buffer back through the engine. */
    if (kvf_read(pre, sid, back, dst, BUF_BYTES) < 0 || memcmp(back, src, BUF_BYTES) != 0) {
        fprintf(stderr, "bench_shm: the Decode's buffer does not match what was written\n");
        rc = -1;
    }

    /* kvf_mem_alloc memory: written through the mapping, against memcpy of the same size by one
     * thread and by two (this thread and a helper, each half), by three Prefill engines: copy
     * threads 1, the default, and 2 (KVFERRY_SHM_COPY_THREADS at engine creation). */
    void *(*volatile copy)(void *, const void *, size_t) = memcpy;
    memset(back, 0, BUF_BYTES); /* faulted in: the memcpy destination */
    const char *envs[3] = {"1", NULL, "2"};
    const char *names[3] = {"copy threads 1", "copy threads default", "copy threads 2"};
    char *saved = getenv("KVFERRY_SHM_COPY_THREADS");
    saved = saved ? strdup(saved) : NULL;
    kvf_engine_t *me[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3; k++) {
        if (envs[k])
            setenv("KVFERRY_SHM_COPY_THREADS", envs[k], 1);
        else
            unsetenv("KVFERRY_SHM_COPY_THREADS");
        if (kvf_engine_create(kvf_store_server_url(srv), "127.0.0.1:0", KVF_ROLE_PREFILL, 0, NULL,
                              &me[k]) < 0) {
            fprintf(stderr, "bench_shm: %s\n", kvf_last_error());
            return 1;
        }
    }
    if (saved)
        setenv("KVFERRY_SHM_COPY_THREADS", saved, 1);
    else
        unsetenv("KVFERRY_SHM_COPY_THREADS");
    free(saved);
    t0 = now_s();
    rc |= kvf_write(pre, sid, src, mdst, 16u << 20);
    first = now_s() - t0;
    printf("bench_shm: kvf_mem_alloc memory: first 16 MiB kvf_write (fd fetch, mmap and its "
           "page tables included): %.3f ms, %.2f GB/s; online CPUs %ld\n",
           first * 1e3, (double)(16u << 20) / first / 1e9, sysconf(_SC_NPROCESSORS_ONLN));
    for (int k = 0; k < 3; k++)
        rc |= kvf_write(me[k], sid, src, mdst, 4096); /* fd fetch and mapping, untimed */
    copy2_t h = {.copy = copy};
    pthread_t helper;
    pthread_barrier_init(&h.go, NULL, 2);
    pthread_barrier_init(&h.done, NULL, 2);
    if (pthread_create(&helper, NULL, copy2_helper, &h) != 0)
        return 1;
    double *t2 = calloc((size_t)reps, sizeof(double));
    double *tm[3];
    for (int k = 0; k < 3; k++)
        tm[k] = calloc((size_t)reps, sizeof(double));
    for (size_t s = 0; s < 2; s++) {
        size_t len = sizes[s];
        copy(back, src, len);
        copy2(&h, back, src, len);
        rc |= kvf_write(pre, sid, src, mdst, len);
        for (int k = 0; k < 3; k++)
            rc |= kvf_write(me[k], sid, src, mdst, len);
        for (int r = 0; r < reps; r++) {
            double a = now_s();
            copy(back, src, len);
            double b = now_s();
            copy2(&h, back, src, len);
            double d = now_s();
            tr[r] = b - a;
            t2[r] = d - b;
            for (int k = 0; k < 3; k++) {
                a = now_s();
                rc |= kvf_write(me[k], sid, src, mdst, len);
                tm[k][r] = now_s() - a;
            }
        }
        qsort(tr, (size_t)reps, sizeof(double), cmp_double);
        qsort(t2, (size_t)reps, sizeof(double), cmp_double);
        double gcpy = (double)len / tr[reps / 2] / 1e9, gcpy2 = (double)len / t2[reps / 2] / 1e9;
        printf("bench_shm: %3zu MiB  memcpy %6.2f GB/s  two-thread memcpy %6.2f GB/s\n", len >> 20,
               gcpy, gcpy2);
        for (int k = 0; k < 3; k++) {
            qsort(tm[k], (size_t)reps, sizeof(double), cmp_double);
            double g = (double)len / tm[k][reps / 2] / 1e9;
            printf("bench_shm: %3zu MiB  kvferry shm into kvf_mem_alloc memory, %-20s %6.2f GB/s  "
                   "ratio to memcpy %.3f (target >= 0.85), to two-thread memcpy %.3f\n",
                   len >> 20, names[k], g, g / gcpy, g / gcpy2);
        }
    }
    h.stop = 1;
    pthread_barrier_wait(&h.go);
    pthread_join(helper, NULL);
    pthread_barrier_destroy(&h.go);
    pthread_barrier_destroy(&h.done);
    for (int k = 0; k < 3; k++) {
        kvf_engine_destroy(me[k]);
        free(tm[k]);
    }
    free(t2);
    memset(back, 0, BUF_BYTES);
    if (kvf_read(pre, sid, back, mdst, BUF_BYTES) < 0 || memcmp(back, src, BUF_BYTES) != 0) {
        fprintf(stderr, "bench_shm: the Decode's kvf_mem_alloc memory does not match\n");
        rc = -1;
    }
    if (rc)
        fprintf(stderr, "bench_shm: a transfer failed: %s\n", kvf_last_error());

    kvf_engine_destroy(pre);
    close(to[1]);
    fclose(in);
    waitpid(child, NULL, 0);
    kvf_store_server_stop(srv);
    free(tr);
    free(tk);
    free(lr);
    free(lk);
    free(src);
    free(back);
    return rc ? 1 : 0;
}
