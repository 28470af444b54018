/*
 * Fuzz target: the tcp transport's target side (src/transport/tcp_target.c), through a real loopback
 * connection. Each input is sent after a valid HELLO, then the client's write side is shut; the
 * answers are read until the target closes. Invariants: nothing outside the registered region
 * changes (it sits between two guard areas); no READ answer holds a byte from outside it (each
 * answered range lies inside the region, and when the input wrote nothing its bytes are the
 * region's pattern at that offset); the answers frame cleanly; and the target keeps serving (a
 * clean write lands and is answered at the end).
 */
#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/wire.h"
#include "common/regions.h"
#include "fuzz.h"
#include "transport/tcp_proto.h"
#include "transport/transport.h"

#define REGION  (64u << 10)
#define GUARD   (64u << 10)
#define FILLER  0xA5
/* Where the region is mapped when the address is free, so that a saved input (a libFuzzer
 * corpus) means the same thing in another process. */
#define FIXED_AT 0x7e0000000000ull

static kvf_region_table_t *rt;
static kvf_transport_t *tt;
static uint16_t port;
static uint8_t *mem; /* GUARD | REGION | GUARD */
static uint64_t base;
static atomic_uint notes;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int on_notify(void *arg, const char *sender, const void *msg, size_t len)
{
    (void)arg;
    (void)sender;
    (void)msg;
    KVF_FUZZ_CHECK(len <= KVF_NOTIFY_MAX, "notification of %zu bytes delivered", len);
    atomic_fetch_add(&notes, 1);
    return 0;
}

static void setup(void)
{
    size_t total = GUARD + REGION + GUARD;
    mem = mmap((void *)(uintptr_t)FIXED_AT, total, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (mem == MAP_FAILED)
        mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    KVF_FUZZ_CHECK(mem != MAP_FAILED, "mmap");
    memset(mem, FILLER, total);
    base = (uint64_t)(uintptr_t)(mem + GUARD);
    KVF_FUZZ_CHECK(kvf__regions_create(&rt) == 0, "region table");
    KVF_FUZZ_CHECK(kvf__regions_add(rt, base, REGION, NULL) == 0, "register");
    kvf_log_set_level(KVF_LOG_ERROR); /* every refused frame would log a warning */
    kvf_transport_params_t p;
    memset(&p, 0, sizeof(p));
    p.local_sid = "127.0.0.1:0";
    snprintf(p.listen.host, sizeof(p.listen.host), "127.0.0.1");
    p.listen.kind = KVF_HOST_IPV4;
    p.regions = rt;
    p.conns_per_peer = 1;
    p.chunk_bytes = 1u << 20;
    p.connect_timeout_ms = 2000;
    p.notify_cb = on_notify;
    KVF_FUZZ_CHECK(kvf__tcp_ops.create(&p, &tt) == 0, "tcp create: %s", kvf_last_error());
    port = kvf__tcp_ops.port(tt);
}

static void hdr(uint8_t *b, uint8_t type, uint64_t req, uint64_t addr, uint64_t len)
{
    memset(b, 0, KVF_TCP_HDR_LEN);
    kvf__put_le32(b, KVF_TCP_MAGIC);
    b[4] = KVF_TCP_VERSION;
    b[5] = type;
    kvf__put_le64(b + 16, req);
    kvf__put_le64(b + 24, addr);
    kvf__put_le64(b + 32, len);
}

static int dial(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    KVF_FUZZ_CHECK(fd >= 0, "socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    KVF_FUZZ_CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "connect");
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    uint8_t h[KVF_TCP_HDR_LEN + 4];
    hdr(h, KVF_TCP_HELLO, 1, 0, 4);
    memcpy(h + KVF_TCP_HDR_LEN, "fuzz", 4);
    KVF_FUZZ_CHECK(send(fd, h, sizeof(h), MSG_NOSIGNAL) == (ssize_t)sizeof(h), "hello");
    uint8_t r[KVF_TCP_HDR_LEN];
    size_t got = 0;
    while (got < KVF_TCP_HDR_LEN) {
        ssize_t n = recv(fd, r + got, KVF_TCP_HDR_LEN - got, 0);
        KVF_FUZZ_CHECK(n > 0, "no answer to the hello");
        got += (size_t)n;
    }
    KVF_FUZZ_CHECK(r[5] == KVF_TCP_RESP && kvf__get_le32(r + 8) == 0, "hello refused");
    return fd;
}

/* The region's contents before each input: never the guards' FILLER, different at each offset. */
static uint8_t pattern(size_t off)
{
    uint8_t v = (uint8_t)(off * 7 + off / 251);
    return v == FILLER ? (uint8_t)(FILLER + 1) : v;
}

/* Everything the target answered to one input, kept for the READ oracle (up to ANSWERS_MAX). */
#define ANSWERS_MAX (4u << 20)
static uint8_t *answers;

/*
 * The READ oracle. Each answer is a header and its `len` bytes (a READ's data, or an error's
 * message). A READ's data (status 0, len > 0) must name a range inside the region. When nothing
 * was written (no answer with status 0 and no bytes: those are writes and notifications) and
 * every answer was kept, the data must also be the region's pattern at that offset.
 */
static void answers_check(const uint8_t *a, size_t n, bool whole)
{
    bool wrote = false;
    for (size_t at = 0; at + KVF_TCP_HDR_LEN <= n;) {
        tcp_hdr_t h;
        tcp_hdr_decode(a + at, &h);
        KVF_FUZZ_CHECK(h.type == KVF_TCP_RESP, "answer at byte %zu has type %u", at, h.type);
        if (h.status == 0 && h.len == 0)
            wrote = true;
        at += KVF_TCP_HDR_LEN;
        if (h.status != 0 || h.len == 0) {
            at += h.len;
            continue;
        }
        KVF_FUZZ_CHECK(h.addr >= base && h.len <= REGION && h.addr - base <= REGION - h.len,
                       "READ answer of %" PRIu64 " bytes at 0x%" PRIx64 " reaches outside the "
                       "region [0x%" PRIx64 ", 0x%" PRIx64 ")",
                       h.len, h.addr, base, base + REGION);
        at += h.len;
    }
    if (wrote || !whole)
        return;
    for (size_t at = 0; at + KVF_TCP_HDR_LEN <= n;) {
        tcp_hdr_t h;
        tcp_hdr_decode(a + at, &h);
        at += KVF_TCP_HDR_LEN;
        if (h.status == 0 && h.len > 0 && at + h.len <= n)
            for (uint64_t i = 0; i < h.len; i++)
                KVF_FUZZ_CHECK(a[at + i] == pattern(h.addr - base + i),
                               "READ answer at 0x%" PRIx64 ": byte %" PRIu64 " is 0x%02x, the "
                               "region holds 0x%02x there",
                               h.addr, i, a[at + i], pattern(h.addr - base + i));
        at += h.len;
    }
}

static void guards_intact(void)
{
    for (size_t i = 0; i < GUARD; i++) {
        KVF_FUZZ_CHECK(mem[i] == FILLER, "byte %zu below the region changed", GUARD - i);
        KVF_FUZZ_CHECK(mem[GUARD + REGION + i] == FILLER, "byte %zu past the region changed", i);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pthread_once(&once, setup);
    for (size_t i = 0; i < REGION; i++)
        mem[GUARD + i] = pattern(i);
    if (!answers)
        answers = malloc(ANSWERS_MAX);
    KVF_FUZZ_CHECK(answers, "malloc");
    int fd = dial();
    size_t off = 0;
    while (off < size) {
        ssize_t n = send(fd, data + off, size - off, MSG_NOSIGNAL);
        if (n <= 0)
            break; /* the target closed on a bad frame: fine */
        off += (size_t)n;
    }
    shutdown(fd, SHUT_WR);
    /* Kept up to ANSWERS_MAX; past it only the framing before is checked. */
    size_t got = 0;
    bool whole = true;
    for (;;) {
        uint8_t sink[16384];
        ssize_t n = got < ANSWERS_MAX ? recv(fd, answers + got, ANSWERS_MAX - got, 0)
                                      : recv(fd, sink, sizeof(sink), 0);
        if (n <= 0)
            break;
        if (got < ANSWERS_MAX)
            got += (size_t)n;
        else
            whole = false;
    }
    close(fd);
    answers_check(answers, got, whole);
    guards_intact();
    return 0;
}

void kvf_fuzz_seeds(kvf_fuzz_add_fn add)
{
    pthread_once(&once, setup);
    uint8_t b[4 * KVF_TCP_HDR_LEN + 4096];
    /* a WRITE inside the region */
    hdr(b, KVF_TCP_WRITE, 2, base + 10, 100);
    memset(b + KVF_TCP_HDR_LEN, 0x11, 100);
    add(b, KVF_TCP_HDR_LEN + 100);
    /* a WRITE one byte too long: refused, drained */
    hdr(b, KVF_TCP_WRITE, 2, base + REGION - 99, 100);
    add(b, KVF_TCP_HDR_LEN + 100);
    /* a READ */
    hdr(b, KVF_TCP_READ, 3, base + 200, 300);
    add(b, KVF_TCP_HDR_LEN);
    /* a READ up to the region's last byte, and one a byte too long: refused */
    hdr(b, KVF_TCP_READ, 3, base + REGION - 100, 100);
    add(b, KVF_TCP_HDR_LEN);
    hdr(b, KVF_TCP_READ, 3, base + REGION - 99, 100);
    add(b, KVF_TCP_HDR_LEN);
    /* a READ starting a byte before the region */
    hdr(b, KVF_TCP_READ, 3, base - 1, 100);
    add(b, KVF_TCP_HDR_LEN);
    /* a NOTIFY */
    hdr(b, KVF_TCP_NOTIFY, 4, 0, 5);
    memcpy(b + KVF_TCP_HDR_LEN, "hello", 5);
    add(b, KVF_TCP_HDR_LEN + 5);
    /* a WRITEV of two segments */
    hdr(b, KVF_TCP_WRITEV, 5, 2, 150);
    kvf__put_le64(b + KVF_TCP_HDR_LEN, base + 1000);
    kvf__put_le64(b + KVF_TCP_HDR_LEN + 8, 100);
    kvf__put_le64(b + KVF_TCP_HDR_LEN + 16, base + 3000);
    kvf__put_le64(b + KVF_TCP_HDR_LEN + 24, 50);
    memset(b + KVF_TCP_HDR_LEN + 32, 0x22, 150);
    add(b, KVF_TCP_HDR_LEN + 32 + 150);
    /* a WRITEV whose second segment is outside */
    kvf__put_le64(b + KVF_TCP_HDR_LEN + 16, base + REGION - 10);
    add(b, KVF_TCP_HDR_LEN + 32 + 150);
    /* pipelined: WRITE, READ, NOTIFY */
    size_t n = 0;
    hdr(b, KVF_TCP_WRITE, 6, base, 16);
    memset(b + KVF_TCP_HDR_LEN, 0x33, 16);
    n = KVF_TCP_HDR_LEN + 16;
    hdr(b + n, KVF_TCP_READ, 7, base, 16);
    n += KVF_TCP_HDR_LEN;
    hdr(b + n, KVF_TCP_NOTIFY, 8, 0, 1);
    b[n + KVF_TCP_HDR_LEN] = 'x';
    n += KVF_TCP_HDR_LEN + 1;
    add(b, n);
}

int kvf_fuzz_final(void)
{
    pthread_once(&once, setup);
    int fd = dial();
    uint8_t b[KVF_TCP_HDR_LEN + 64];
    hdr(b, KVF_TCP_WRITE, 9, base + 64, 64);
    memset(b + KVF_TCP_HDR_LEN, 0x5A, 64);
    send(fd, b, sizeof(b), MSG_NOSIGNAL);
    uint8_t r[KVF_TCP_HDR_LEN];
    size_t got = 0;
    while (got < KVF_TCP_HDR_LEN) {
        ssize_t n = recv(fd, r + got, KVF_TCP_HDR_LEN - got, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    guards_intact();
    bool ok = got == KVF_TCP_HDR_LEN && kvf__get_le32(r + 8) == 0 && mem[GUARD + 64] == 0x5A &&
              mem[GUARD + 127] == 0x5A;
    printf("fuzz_tcp: %u notifications delivered; target %s\n", atomic_load(&notes),
           ok ? "still serves" : "STOPPED SERVING");
    kvf__tcp_ops.destroy(tt);
    kvf__regions_destroy(rt);
    return ok ? 0 : 1;
}
