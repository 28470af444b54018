/*
 * The target of `kvferry bench`, seen from the initiator: a local process (this binary as
 * `kvferry bench --serve`), or one started elsewhere; its buffer as published in the store, and
 * the requests (verify, fill) it answers through the store (see bench_serve.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_run.h"
#include "cli.h"
#include "clock.h"

static void bench_key(const bench_t *b, const char *sub, char *key, size_t len)
{
    snprintf(key, len, BENCH_KEY_FMT, b->a.ns, b->peer, sub);
}

/* Start `kvferry bench --serve` as a child with @size bytes and read its session id from its
 * ready line. Returns 0 or -1 after saying why (the child, if any, is killed and reaped by
 * bench_target_stop()). */
int bench_target_spawn(bench_t *b, size_t size)
{
    char sizes[32], *argv[20];
    int n = 0, pfd[2];
    snprintf(sizes, sizeof(sizes), "%zu", size);
    argv[n++] = "kvferry";
    argv[n++] = "bench";
    argv[n++] = "--serve";
    argv[n++] = "--store-url";
    argv[n++] = (char *)b->store_url;
    argv[n++] = "--session-id";
    argv[n++] = "127.0.0.1:0";
    argv[n++] = "--size";
    argv[n++] = sizes;
    argv[n++] = "--memory";
    argv[n++] = b->a.alloc ? "alloc" : "registered";
    argv[n++] = "--transport";
    argv[n++] = (char *)kvf_cli_transport_name(b->a.transport);
    argv[n++] = "--ns";
    argv[n++] = (char *)b->a.ns;
    argv[n] = NULL;

    if (pipe2(pfd, O_CLOEXEC) < 0) {
        fprintf(stderr, "kvferry " BENCH_CMD ": pipe: %s\n", strerror(errno));
        return -1;
    }
    pid_t parent = getpid();
    b->child = fork();
    if (b->child < 0) {
        fprintf(stderr, "kvferry " BENCH_CMD ": fork: %s\n", strerror(errno));
        close(pfd[0]);
        close(pfd[1]);
        return -1;
    }
    if (b->child == 0) {
        /* The target must not outlive this process, however it ends. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        dup2(pfd[1], 1);
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    close(pfd[1]);

    char line[512];
    size_t used = 0;
    uint64_t deadline = cli_now_ms() + BENCH_START_TIMEOUT_MS;
    int rc = -1;
    while (used + 1 < sizeof(line)) {
        uint64_t now = cli_now_ms();
        if (now >= deadline)
            break;
        struct pollfd p = {.fd = pfd[0], .events = POLLIN};
        int r = poll(&p, 1, (int)(deadline - now));
        if (r < 0 && errno == EINTR)
            continue;
        char ch;
        if (r <= 0 || read(pfd[0], &ch, 1) != 1)
            break;
        if (ch == '\n') {
            rc = 0;
            break;
        }
        line[used++] = ch;
    }
    close(pfd[0]);
    line[used] = '\0';
    const char *prefix = "bench target ";
    char *end = strstr(line, " ready");
    if (rc < 0 || strncmp(line, prefix, strlen(prefix)) || !end ||
        (size_t)(end - line) - strlen(prefix) >= sizeof(b->peer)) {
        fprintf(stderr,
                "kvferry " BENCH_CMD ": the target process did not report ready within %u s%s%s\n",
                BENCH_START_TIMEOUT_MS / 1000u, used ? "; it said: " : "", line);
        return -1;
    }
    *end = '\0';
    memcpy(b->peer, line + strlen(prefix), (size_t)(end - line) - strlen(prefix) + 1);
    return 0;
}

/* Stop the local target (SIGTERM, then SIGKILL after 5 s) and reap it. */
void bench_target_stop(bench_t *b)
{
    if (b->child <= 0)
        return;
    kill(b->child, SIGTERM);
    uint64_t deadline = cli_now_ms() + 5000;
    int status;
    for (;;) {
        pid_t r = waitpid(b->child, &status, WNOHANG);
        if (r == b->child || (r < 0 && errno != EINTR))
            break;
        if (cli_now_ms() >= deadline) {
            kill(b->child, SIGKILL);
            waitpid(b->child, &status, 0);
            break;
        }
        poll(NULL, 0, 10);
    }
    b->child = 0;
}

/* Read the target's published buffer. */
int bench_target_info(bench_t *b)
{
    char key[BENCH_KEY_MAX];
    void *val;
    size_t len;
    bench_key(b, "info", key, sizeof(key));
    int rc = kvf_store_get(b->st, key, BENCH_START_TIMEOUT_MS, &val, &len);
    if (rc < 0) {
        kvf_cli_fail(BENCH_CMD, rc, "no target published %s", key);
        return -1;
    }
    json_t *info = json_loads(val, 0, NULL);
    free(val);
    json_int_t addr = json_integer_value(json_object_get(info, "addr"));
    json_int_t size = json_integer_value(json_object_get(info, "len"));
    const char *mem = json_string_value(json_object_get(info, "memory"));
    b->target_pid = (pid_t)json_integer_value(json_object_get(info, "pid"));
    if (!info || addr <= 0 || size <= 0 || !mem) {
        fprintf(stderr, "kvferry " BENCH_CMD ": %s is not a bench target's record\n", key);
        json_decref(info);
        return -1;
    }
    b->target_addr = (uint64_t)addr;
    b->target_len = (uint64_t)size;
    snprintf(b->target_memory, sizeof(b->target_memory), "%s", mem);
    json_decref(info);
    return 0;
}

/* Send @req (taken) to the target and wait for its answer; @ans gets it (ok) when not NULL.
 * Returns 0, or -1 with the reason in @err. */
static int target_ask(bench_t *b, const char *cmd, json_t *req, json_t **ans_out, char *err,
                      size_t errlen)
{
    char key[BENCH_KEY_MAX], sub[64];
    int64_t n;
    void *val = NULL;
    size_t len;
    bench_key(b, "seq", key, sizeof(key));
    int rc = kvf_store_add(b->st, key, 1, &n);
    if (rc == 0) {
        char *text = json_dumps(req, JSON_COMPACT);
        snprintf(sub, sizeof(sub), "req/%" PRId64, n);
        bench_key(b, sub, key, sizeof(key));
        rc = text ? kvf_store_set(b->st, key, text, strlen(text), 0) : -KVF_ENOMEM;
        free(text);
    }
    json_decref(req);
    if (rc == 0) {
        snprintf(sub, sizeof(sub), "ans/%" PRId64, n);
        bench_key(b, sub, key, sizeof(key));
        rc = kvf_store_get(b->st, key, BENCH_ANSWER_TIMEOUT_MS, &val, &len);
    }
    if (rc < 0) {
        snprintf(err, errlen, "asking the target to %s: %s (%s)", cmd, kvf_last_error(),
                 kvf_err_name(rc));
        return -1;
    }
    kvf_store_del(b->st, key);
    json_t *ans = json_loads(val, 0, NULL);
    free(val);
    int ok = json_is_true(json_object_get(ans, "ok"));
    if (!ok)
        snprintf(err, errlen, "%s",
                 json_string_value(json_object_get(ans, "error"))
                     ? json_string_value(json_object_get(ans, "error"))
                     : "the target sent a malformed answer");
    if (ok && ans_out)
        *ans_out = ans;
    else
        json_decref(ans);
    return ok ? 0 : -1;
}

int bench_target_request(bench_t *b, const char *cmd, uint64_t seed, json_t *blocks, char *err,
                         size_t errlen)
{
    json_t *req = json_pack("{s:s,s:I,s:O}", "cmd", cmd, "seed", (json_int_t)seed, "blocks", blocks);
    if (!req) {
        snprintf(err, errlen, "asking the target to %s: out of memory", cmd);
        return -1;
    }
    return target_ask(b, cmd, req, NULL, err, errlen);
}

int bench_target_alloc(bench_t *b, size_t len, uint64_t *addr, char *err, size_t errlen)
{
    json_t *ans = NULL, *req = json_pack("{s:s,s:I}", "cmd", "alloc", "len", (json_int_t)len);
    if (!req) {
        snprintf(err, errlen, "asking the target to alloc: out of memory");
        return -1;
    }
    if (target_ask(b, "alloc", req, &ans, err, errlen) < 0)
        return -1;
    json_int_t a = json_integer_value(json_object_get(ans, "addr"));
    json_decref(ans);
    if (a <= 0) {
        snprintf(err, errlen, "the target answered alloc without an address");
        return -1;
    }
    *addr = (uint64_t)a;
    return 0;
}
