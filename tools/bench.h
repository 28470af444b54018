/*
 * `kvferry bench`: the parts shared by its files.
 *
 *   cmd_bench.c        the initiator: the runs (with its own files, listed in bench_run.h)
 *   bench_serve.c      `kvferry bench --serve`: the target
 *   bench_kvferry.c    kvferry as a method
 *   bench_baseline.c   the baselines: memcpy, process_vm_writev/readv, raw TCP stream, ping-pong
 *   bench_util.c       the data pattern both sides use, memory, parsing
 *   cmd_bench_store.c  `kvferry bench store`
 *
 * A run moves a *layout* (the blocks of one kvf_transfer_sync call, at offsets inside a
 * thread's slice) over and over; every method (kvferry or a baseline) is a `call` that moves one
 * layout at a given base offset, timed by the same harness.
 */
#ifndef KVF_CLI_BENCH_H
#define KVF_CLI_BENCH_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "cli.h"
#include "kvferry.h"

/* Store keys, under kvferry/v1/<ns>/bench/<target session id>/: "info" (the target's buffer),
 * "seq" (a counter that numbers requests), "req/<n>" and "ans/<n>" (a request and its answer). */
#define BENCH_KEY_FMT "kvferry/v1/%s/bench/%s/%s"
#define BENCH_KEY_MAX 512
/* The line a target prints once it is ready: its session id. */
#define BENCH_READY_FMT "bench target %s ready"
/* Environment variable read by a target, a test hook only: when set to 1, the target flips one
 * byte of the first block it is asked to verify or to fill, so that tests can see verification
 * fail. Documented in docs/performance.md. */
#define BENCH_CORRUPT_ENV "KVFERRY_BENCH_TEST_CORRUPT"
#define BENCH_LAT_MAX     (1u << 20) /* latency samples kept per thread */
#define BENCH_MAX_BATCH   1024u      /* --batch */
#define BENCH_MAX_BLOCKS  2048u      /* blocks in one call (the pages workload has 1,952) */
#define BENCH_MAX_WINDOW  64u        /* --window: asynchronous batches in flight per thread */

/* The blocks of one call: offsets relative to a base, in a span of bytes; a thread's slice holds
 * `copies` spans, and consecutive calls move consecutive spans, round-robin. */
typedef struct {
    size_t n;
    size_t off[BENCH_MAX_BLOCKS];
    size_t len[BENCH_MAX_BLOCKS];
    size_t bytes;  /* sum of len */
    size_t span;   /* bytes from the first block's start to the last one's end, page-rounded */
    size_t copies; /* spans in a slice */
} bench_layout_t;

typedef struct bench_worker bench_worker_t;

/* One way of moving a layout: kvferry, or a baseline. */
typedef struct {
    const char *name;  /* JSON name: "kvferry", "memcpy", "process_vm_writev", "raw_tcp", ... */
    const char *label; /* for the table */
    int (*start)(bench_worker_t *w);             /* per thread, untimed; may be NULL */
    int (*call)(bench_worker_t *w, size_t base); /* move the layout at @base of the slice */
    int (*finish)(bench_worker_t *w);            /* per thread, timed (drain); may be NULL */
    void (*cleanup)(bench_worker_t *w);          /* per thread, untimed; may be NULL */
} bench_method_t;

/* What a method needs to know; one per thread. */
struct bench_worker {
    const bench_layout_t *lay;
    const bench_method_t *m;
    unsigned idx;
    kvf_op_t op;
    uint8_t *local;   /* this thread's slice of the initiator's buffer */
    uint8_t *scratch; /* this thread's slice of a second local buffer (memcpy / TCP receiver) */
    uint64_t remote;  /* the target address of this thread's slice */
    kvf_engine_t *engine;
    const char *peer;
    pid_t target_pid;
    /* Per-method state. */
    kvf_xfer_t x[BENCH_MAX_BLOCKS];
    struct iovec liov[BENCH_MAX_BLOCKS], riov[BENCH_MAX_BLOCKS];
    int fd;    /* raw TCP: sending end */
    int rx_fd; /* raw TCP: receiving end, read by rx_thread */
    pthread_t rx_thread;
    bool rx_started;
    bool pingpong;
    bool gather; /* raw TCP: writev/readv of the whole layout */
    uint64_t rx_bytes; /* raw TCP: bytes the receiver got */
    int rx_failed;
    /* kvferry with --window N > 1: asynchronous batches in flight, oldest first. */
    unsigned window, inflight, head;
    bool warmed;
    kvf_batch_t *ring[BENCH_MAX_WINDOW];
    char err[256]; /* why the method failed */
};

/* ---- bench_util.c ------------------------------------------------------------------------- */

/* The data pattern: the byte at offset @o of the target buffer, for @seed. Both sides compute it
 * from the target offset, so a block that lands in the wrong place fails the check too. */
void bench_pattern_fill(uint8_t *p, uint64_t off, size_t len, uint64_t seed);
/* Returns -1 if the pattern holds, else the index of the first wrong byte, with the byte found
 * and the byte wanted in @got and @want. */
ssize_t bench_pattern_check(const uint8_t *p, uint64_t off, size_t len, uint64_t seed, uint8_t *got,
                            uint8_t *want);

/* Parse a size "4096", "64K", "1M", "1G" (binary multiples; "KiB" and "KB" read as "K") of 1 to
 * @max bytes; returns 0 or -1 after printing a usage error naming @flag and @s. */
int bench_parse_size(const char *cmd, const char *flag, const char *s, uint64_t max, size_t *out);

/* --memory alloc|registered; 0, or -1 after a usage error. */
int bench_parse_memory(const char *cmd, const char *s, bool *alloc);

/* The two above as parse() of a KVF_CLI_CUSTOM option: a size of 1 to o->max bytes into the
 * size_t at o->dst; a memory kind into the bool at o->dst (true for alloc). */
int bench_opt_size(const char *cmd, const kvf_cli_opt_t *o, const char *value);
int bench_opt_memory(const char *cmd, const kvf_cli_opt_t *o, const char *value);

/* @n bytes for people: "4 KiB", "1 MiB", "1 GiB" when a whole multiple, else "N B". */
void bench_size_name(size_t n, char *buf, size_t len);

/* qsort() comparison of two uint64_t. */
int bench_cmp_u64(const void *a, const void *b);

/* Sort @n samples ascending in place, in a scratch mapping unmapped before returning: nothing of
 * it is left on the heap, where glibc's qsort() leaves its temporary array resident and the RSS
 * report would count it as the engine's (bench_sort.c). Returns 0, or -1 when the scratch cannot
 * be mapped (@a is then unchanged). */
int bench_sort_u64(uint64_t *a, size_t n);

/* Anonymous memory, faulted in; NULL on failure. Free with munmap(). */
void *bench_map(size_t len);

/* VmRSS, RssShmem (memfd and other shared memory: kvf_mem_alloc buffers, a peer's mapped into a
 * sender) and RssFile (the binary and the shared libraries, pages other processes share) in KiB
 * and the thread count of process @pid (0: this one), from /proc; -1 each when they cannot be
 * read. @file_kib may be NULL. */
void bench_proc_status(pid_t pid, long *rss_kib, long *shmem_kib, long *file_kib, long *threads);

/* User + system CPU seconds of process @pid (0: this one), all its threads so far; -1 when it
 * cannot be read. Clock-tick resolution (10 ms) for another process. */
double bench_proc_cpu_s(pid_t pid);

/* ---- kvferry (bench_kvferry.c) ------------------------------------------------------------ */

/* kvferry moving a layout per call: kvf_transfer_sync for a --window of 1, else asynchronous
 * batches, @window in flight per thread. */
const bench_method_t *bench_kvferry_method(unsigned window);

/* ---- the baselines (bench_baseline.c) ------------------------------------------------------ */

extern const bench_method_t bench_memcpy;
extern const bench_method_t bench_pvm_write; /* process_vm_readv for --op read: */
extern const bench_method_t bench_pvm_read;
extern const bench_method_t bench_raw_tcp;
extern const bench_method_t bench_tcp_pingpong;
extern const bench_method_t bench_raw_tcp_gather; /* layouts of many blocks */

/* Send or receive exactly @len bytes on a blocking socket, retrying on EINTR. bench_send_all
 * returns 0 or -1; bench_recv_all 1 after @len bytes, 0 at end of stream before the first byte,
 * -1 otherwise. */
int bench_send_all(int fd, const void *p, size_t len);
int bench_recv_all(int fd, void *p, size_t len);

/* ---- the subcommands --------------------------------------------------------------------- */

/* `kvferry bench --serve ...` (argv starts at "bench"; bench_serve.c). */
int bench_serve_main(int argc, char **argv);

/* `kvferry bench store` (argv starts at "store"; cmd_bench_store.c). */
int kvf_cli_bench_store(int argc, char **argv);

#endif /* KVF_CLI_BENCH_H */
