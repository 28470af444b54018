/*
 * bench_store: config-store operations per second on loopback, beside a raw TCP ping-pong of a
 * similar size measured in the same run (the ceiling for any request/response protocol over one
 * connection).
 *
 *   bench_store [--clients N] [--seconds S] [--store-url URL]
 *
 * Without --store-url it starts a store in-process on 127.0.0.1. Each client thread has its own
 * connection and does set then get of its own key, one request at a time.
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

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct {
    const char *url;
    int id;
    double seconds;
    unsigned long sets, gets;
    int failed;
} client_arg_t;

static void *client_main(void *p)
{
    client_arg_t *a = p;
    kvf_store_t *st;
    if (kvf_store_open(a->url, NULL, &st) < 0) {
        fprintf(stderr, "client %d: %s\n", a->id, kvf_last_error());
        a->failed = 1;
        return NULL;
    }
    char key[64], val[64];
    snprintf(key, sizeof(key), "bench/client/%d", a->id);
    double end = now_s() + a->seconds;
    unsigned long n = 0;
    while (now_s() < end) {
        int len = snprintf(val, sizeof(val), "value-%lu", n);
        if (kvf_store_set(st, key, val, (size_t)len, 0) < 0) {
            a->failed = 1;
            break;
        }
        a->sets++;
        void *got;
        size_t glen;
        if (kvf_store_get(st, key, 0, &got, &glen) < 0 || glen != (size_t)len ||
            memcmp(got, val, glen) != 0) {
            fprintf(stderr, "client %d: get returned the wrong value\n", a->id);
            a->failed = 1;
            break;
        }
        free(got);
        a->gets++;
        n++;
    }
    kvf_store_close(st);
    return NULL;
}

/* Raw baseline: one TCP connection, 48-byte request, 24-byte answer, one at a time. */
typedef struct {
    int fd;
    double seconds;
} echo_arg_t;

static int full_io(int fd, void *buf, size_t len, int writing)
{
    char *p = buf;
    while (len) {
        ssize_t n = writing ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void *echo_server(void *p)
{
    echo_arg_t *a = p;
    char req[48], ans[24] = {0};
    while (full_io(a->fd, req, sizeof(req), 0) == 0)
        if (full_io(a->fd, ans, sizeof(ans), 1) < 0)
            break;
    return NULL;
}

static double raw_pingpong_per_s(double seconds)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 1) < 0 ||
        getsockname(ls, (struct sockaddr *)&sa, &sl) < 0)
        return 0;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        return 0;
    int s = accept(ls, NULL, NULL);
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    echo_arg_t ea = {.fd = s, .seconds = seconds};
    pthread_t th;
    pthread_create(&th, NULL, echo_server, &ea);
    char req[48] = {0}, ans[24];
    unsigned long n = 0;
    double t0 = now_s(), end = t0 + seconds;
    while (now_s() < end) {
        if (full_io(c, req, sizeof(req), 1) < 0 || full_io(c, ans, sizeof(ans), 0) < 0)
            break;
        n++;
    }
    double rate = (double)n / (now_s() - t0);
    shutdown(c, SHUT_RDWR);
    pthread_join(th, NULL);
    close(c);
    close(s);
    close(ls);
    return rate;
}

static double run_clients(const char *url, int nclients, double seconds, int *failed)
{
    pthread_t *th = calloc((size_t)nclients, sizeof(*th));
    client_arg_t *args = calloc((size_t)nclients, sizeof(*args));
    double t0 = now_s();
    for (int i = 0; i < nclients; i++) {
        args[i] = (client_arg_t){.url = url, .id = i, .seconds = seconds};
        pthread_create(&th[i], NULL, client_main, &args[i]);
    }
    unsigned long ops = 0;
    for (int i = 0; i < nclients; i++) {
        pthread_join(th[i], NULL);
        ops += args[i].sets + args[i].gets;
        *failed |= args[i].failed;
    }
    double rate = (double)ops / (now_s() - t0);
    free(th);
    free(args);
    return rate;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"clients", required_argument, NULL, 'c'},
        {"seconds", required_argument, NULL, 's'},
        {"store-url", required_argument, NULL, 'u'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int many = 8;
    double seconds = 2.0;
    const char *url = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': many = atoi(optarg); break;
        case 's': seconds = atof(optarg); break;
        case 'u': url = optarg; break;
        default:
            fprintf(stderr, "usage: bench_store [--clients N] [--seconds S] [--store-url URL]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (many < 1 || many > 1000 || seconds <= 0 || seconds > 60) {
        fprintf(stderr, "bench_store: --clients 1..1000, --seconds up to 60\n");
        return 2;
    }
    kvf_store_server_t *srv = NULL;
    if (!url) {
        if (kvf_store_server_start("tcp://127.0.0.1:0", &srv) < 0) {
            fprintf(stderr, "bench_store: %s\n", kvf_last_error());
            return 1;
        }
        url = kvf_store_server_url(srv);
    }
    int failed = 0;
    double raw = raw_pingpong_per_s(seconds);
    double one = run_clients(url, 1, seconds, &failed);
    double n = run_clients(url, many, seconds, &failed);
    printf("%-34s %12s %10s\n", "what", "ops/s", "ratio");
    printf("%-34s %12.0f %10s\n", "raw TCP ping-pong, 1 connection", raw, "1.00");
    printf("%-34s %12.0f %10.2f\n", "store set+get, 1 client", one, raw > 0 ? one / raw : 0);
    char label[64];
    snprintf(label, sizeof(label), "store set+get, %d clients", many);
    printf("%-34s %12.0f %10.2f\n", label, n, raw > 0 ? n / raw : 0);
    kvf_store_server_stop(srv);
    if (failed) {
        fprintf(stderr, "bench_store: a client failed\n");
        return 1;
    }
    return 0;
}
