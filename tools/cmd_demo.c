/*
 * `kvferry demo`: the seed's flow end to end on one machine. It runs three children of this very
 * binary (found through /proc/self/exe): a config store on 127.0.0.1 with a free port, a Decode
 * with a free port, and a Prefill that writes into the Decode's buffer; it relays their output,
 * and sums up what the Prefill reported and the Decode verified.
 *
 * One thread, one poll loop: the children's output pipes, and a signalfd for SIGCHLD (so a
 * child's exit wakes the loop without polling) and for SIGINT/SIGTERM (so an interrupted demo
 * still stops and reaps every child it started).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli.h"
#include "clock.h"
#include "kvferry.h"

#define CMD "demo"
#define DEMO_LINE_MAX 1024
#define DEMO_URL_MAX 300
/* How long a child has to exit after SIGTERM before it gets SIGKILL, and to exit after closing
 * its output. */
#define DEMO_GRACE_MS 3000u

enum { DEMO_STORE, DEMO_DECODE, DEMO_PREFILL, DEMO_NCHILD };

typedef struct {
    pid_t pid;    /* 0 until started and after reaped */
    int fd;       /* read end of its stdout+stderr; -1 once closed */
    int status;   /* exit code once reaped; -1 when killed by a signal */
    bool started;
    char line[DEMO_LINE_MAX];
    size_t used;
} demo_child_t;

typedef struct {
    demo_child_t child[DEMO_NCHILD];
    int sigfd;
    sigset_t old_mask;
    bool interrupted;
    /* Learned from the children's output. */
    char store_url[DEMO_URL_MAX];
    char decode_sid[DEMO_URL_MAX];
    uint64_t rounds_written, rounds_verified, bytes;
    double ms, first_ms;
    char via[16]; /* the transport the Prefill reported ("transport to SID: shm") */
    bool verbose; /* -v, passed on to the children: the per-slice lines too */
} demo_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvferry demo [--iterations N] [--timeout SEC] [--transport auto|tcp|shm]\n"
            "                    [-v|--verbose] [--log-level 0..3]\n\n"
            "Run the seed's flow on 127.0.0.1 with free ports: a config store (kvferry store), a\n"
            "Decode (kvferry transfer --role Decode) and a Prefill writing into its 48,000,000-\n"
            "byte buffer (kvferry transfer --role Prefill), every byte checked by the Decode.\n"
            "Prints their output (without the seed's per-slice lines unless -v) and a summary\n"
            "naming the transport; exits 0 only when every round was verified.\n\n"
            "  --iterations N   rounds (default 3)\n"
            "  --timeout SEC    the children's --timeout (default 30)\n"
            "  --transport T    the children's --transport: auto (default; shm on one host),\n"
            "                   tcp or shm\n"
            "  -v, --verbose    also relay the per-slice lines (\"get/set buffer success\")\n"
            "  --log-level N    the children's --log-level (default: $KVFERRY_LOG_LEVEL, else\n"
            "                   2, warn)\n"
            "  --auth-key-file F  the cluster secret every child proves (`kvferry keygen`);\n"
            "                   default $KVFERRY_AUTH_KEY_FILE\n");
}

/* Start this binary with @argv, its stdout and stderr on a pipe. */
static int child_start(demo_t *d, int which, char *const argv[])
{
    demo_child_t *c = &d->child[which];
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        fprintf(stderr, "kvferry " CMD ": pipe: %s\n", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "kvferry " CMD ": fork: %s\n", strerror(errno));
        close(pfd[0]);
        close(pfd[1]);
        return -1;
    }
    if (pid == 0) {
        /* The demo blocks the signals its signalfd reads; the child must not inherit that. */
        sigprocmask(SIG_SETMASK, &d->old_mask, NULL);
        dup2(pfd[1], 1);
        dup2(pfd[1], 2);
        execv("/proc/self/exe", argv);
        fprintf(stderr, "kvferry " CMD ": cannot run /proc/self/exe: %s\n", strerror(errno));
        _exit(127);
    }
    close(pfd[1]);
    c->pid = pid;
    c->fd = pfd[0];
    c->started = true;
    c->status = -1;
    c->used = 0;
    return 0;
}

static bool has_prefix(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Relay one line of a child's output and pick out what the demo needs from it. */
static void on_line(demo_t *d, int which, const char *line)
{
    static const char *const tags[DEMO_NCHILD] = {"[store]   ", "[decode]  ", "[prefill] "};
    printf("%s%s\n", tags[which], line);

    if (which == DEMO_STORE) {
        const char *tag = "kvferry store listening on ";
        if (has_prefix(line, tag) && !d->store_url[0])
            snprintf(d->store_url, sizeof(d->store_url), "%s", line + strlen(tag));
    } else if (which == DEMO_DECODE) {
        /* KVF_CLI_DECODE_READY_FMT: "decode session <sid> ready". */
        const char *head = "decode session ", *tail = " ready";
        size_t n = strlen(line), hn = strlen(head), tn = strlen(tail);
        if (!d->decode_sid[0] && has_prefix(line, head) && n > hn + tn &&
            !strcmp(line + n - tn, tail) && n - hn - tn < sizeof(d->decode_sid))
            snprintf(d->decode_sid, sizeof(d->decode_sid), "%.*s", (int)(n - hn - tn), line + hn);
        if (has_prefix(line, "round ") && strstr(line, ": verified "))
            d->rounds_verified++;
    } else {
        /* KVF_CLI_PREFILL_ROUND_FMT: "round R: wrote B bytes in MS ms, G GB/s". */
        uint64_t round;
        size_t bytes;
        double ms;
        const char *t = has_prefix(line, "transport to ") ? strstr(line, ": ") : NULL;
        if (t && !d->via[0])
            snprintf(d->via, sizeof(d->via), "%s", t + 2);
        if (sscanf(line, "round %" SCNu64 ": wrote %zu bytes in %lf ms", &round, &bytes, &ms) ==
            3) {
            if (d->rounds_written == 0)
                d->first_ms = ms;
            d->rounds_written++;
            d->bytes += bytes;
            d->ms += ms;
        }
    }
}

/* Read what child @which has written; relay complete lines. Closes the pipe at end of file. */
static void child_read(demo_t *d, int which)
{
    demo_child_t *c = &d->child[which];
    char buf[4096];
    ssize_t n = read(c->fd, buf, sizeof(buf));
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (n <= 0) {
        if (c->used) {
            c->line[c->used] = '\0';
            on_line(d, which, c->line);
            c->used = 0;
        }
        close(c->fd);
        c->fd = -1;
        return;
    }
    for (ssize_t i = 0; i < n; i++) {
        /* An overlong line is relayed in pieces rather than dropped. */
        if (buf[i] == '\n' || c->used == sizeof(c->line) - 1) {
            c->line[c->used] = '\0';
            on_line(d, which, c->line);
            c->used = 0;
            if (buf[i] == '\n')
                continue;
        }
        c->line[c->used++] = buf[i];
    }
}

/* Reap every child that has exited, without blocking. */
static void reap_exited(demo_t *d)
{
    for (int i = 0; i < DEMO_NCHILD; i++) {
        demo_child_t *c = &d->child[i];
        int status;
        if (c->pid > 0 && waitpid(c->pid, &status, WNOHANG) == c->pid) {
            c->status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
            c->pid = 0;
        }
    }
}

/*
 * Relay output and reap children until @done(d) holds, the deadline passes or a signal asks us
 * to stop. Returns 0 when @done held, -1 otherwise.
 */
static int pump(demo_t *d, uint64_t deadline_ms, bool (*done)(const demo_t *))
{
    for (;;) {
        reap_exited(d);
        if (done(d))
            return 0;
        uint64_t now = cli_now_ms();
        if (now >= deadline_ms || d->interrupted)
            return -1;
        struct pollfd p[DEMO_NCHILD + 1];
        int who[DEMO_NCHILD + 1], n = 0;
        p[n] = (struct pollfd){.fd = d->sigfd, .events = POLLIN};
        who[n++] = -1;
        for (int i = 0; i < DEMO_NCHILD; i++)
            if (d->child[i].fd >= 0) {
                p[n] = (struct pollfd){.fd = d->child[i].fd, .events = POLLIN};
                who[n++] = i;
            }
        uint64_t wait_ms = deadline_ms - now;
        int r = poll(p, (nfds_t)n, wait_ms > 60000 ? 60000 : (int)wait_ms);
        if (r < 0 && errno != EINTR) {
            fprintf(stderr, "kvferry " CMD ": poll: %s\n", strerror(errno));
            return -1;
        }
        for (int i = 0; r > 0 && i < n; i++) {
            if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            if (who[i] >= 0) {
                child_read(d, who[i]);
                continue;
            }
            struct signalfd_siginfo si;
            while (read(d->sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
                if (si.ssi_signo != SIGCHLD)
                    d->interrupted = true;
        }
    }
}

static bool store_ready(const demo_t *d)
{
    return d->store_url[0] || d->child[DEMO_STORE].fd < 0;
}

static bool decode_ready(const demo_t *d)
{
    return d->decode_sid[0] || d->child[DEMO_DECODE].fd < 0;
}

static bool child_gone(const demo_t *d, int which)
{
    const demo_child_t *c = &d->child[which];
    return c->fd < 0 && c->pid == 0;
}

static bool nodes_done(const demo_t *d)
{
    return child_gone(d, DEMO_DECODE) && child_gone(d, DEMO_PREFILL);
}

static bool store_gone(const demo_t *d)
{
    return child_gone(d, DEMO_STORE);
}

static bool all_gone(const demo_t *d)
{
    for (int i = 0; i < DEMO_NCHILD; i++)
        if (!child_gone(d, i))
            return false;
    return true;
}

/* Stop every child still running: SIGTERM, then SIGKILL after DEMO_GRACE_MS. Always reaps. */
static void stop_all(demo_t *d)
{
    for (int i = 0; i < DEMO_NCHILD; i++)
        if (d->child[i].pid > 0)
            kill(d->child[i].pid, SIGTERM);
    bool was_interrupted = d->interrupted;
    /* A second Ctrl-C must not cut the grace period short and leave children behind. */
    d->interrupted = false;
    if (pump(d, cli_now_ms() + DEMO_GRACE_MS, all_gone) < 0) {
        for (int i = 0; i < DEMO_NCHILD; i++) {
            demo_child_t *c = &d->child[i];
            if (c->pid > 0) {
                kill(c->pid, SIGKILL);
                waitpid(c->pid, NULL, 0);
                c->pid = 0;
                c->status = -1;
            }
            if (c->fd >= 0) {
                close(c->fd);
                c->fd = -1;
            }
        }
    }
    d->interrupted = d->interrupted || was_interrupted;
}

static const char *exit_text(const demo_child_t *c, char *buf, size_t len)
{
    if (!c->started)
        return "not started";
    if (c->status < 0)
        return "killed";
    snprintf(buf, len, "exit %d", c->status);
    return buf;
}

int kvf_cli_demo(int argc, char **argv)
{
    /* The children get this process's level: --log-level, else KVFERRY_LOG_LEVEL, else warn. */
    uint64_t iterations = 3, timeout_s = 30, level = (uint64_t)kvf_log_get_level();
    kvf_transport_kind_t transport = KVF_TRANSPORT_AUTO;
    bool verbose = false;
    const kvf_cli_opt_t opts[] = {
        {"iterations", KVF_CLI_U64, &iterations, 1, 1000, NULL},
        {"timeout", KVF_CLI_U64, &timeout_s, 1, 3600, NULL},
        {"log-level", KVF_CLI_U64, &level, 0, 3, NULL},
        KVF_CLI_OPT_TRANSPORT(&transport),
    };
    const kvf_cli_t cli = {CMD, usage, opts, KVF_CLI_NOPTS(opts), .usage_on_error = true,
                           .verbose = &verbose};
    int rc = kvf_cli_parse(&cli, argc, argv, NULL);
    if (rc != KVF_CLI_RUN)
        return rc;
    setvbuf(stdout, NULL, _IOLBF, 0);

    demo_t d;
    memset(&d, 0, sizeof(d));
    d.verbose = verbose;
    char *tr = (char *)kvf_cli_transport_name(transport);
    for (int i = 0; i < DEMO_NCHILD; i++)
        d.child[i].fd = -1;
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &mask, &d.old_mask) < 0 ||
        (d.sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
        fprintf(stderr, "kvferry " CMD ": signalfd: %s\n", strerror(errno));
        return 1;
    }

    char iters[24], tmo[24], lvl[24];
    snprintf(iters, sizeof(iters), "%" PRIu64, iterations);
    snprintf(tmo, sizeof(tmo), "%" PRIu64, timeout_s);
    snprintf(lvl, sizeof(lvl), "%" PRIu64, level);
    uint64_t timeout_ms = timeout_s * 1000u;
    /* Every round's line (the summary counts them); the seed's per-slice lines under -v only. */
    char *vflag = d.verbose ? "-v" : NULL;
    const char *why = NULL;
    int code = 1;

    char *store_argv[] = {"kvferry", "store", "--listen", "tcp://127.0.0.1:0", "--log-level", lvl,
                          NULL};
    if (child_start(&d, DEMO_STORE, store_argv) < 0)
        goto out_stop;
    if (pump(&d, cli_now_ms() + timeout_ms, store_ready) < 0 || !d.store_url[0]) {
        why = "the config store did not report its address";
        goto out_stop;
    }

    char *decode_argv[] = {"kvferry", "transfer", "--role", "Decode", "--src-session-id",
                           "127.0.0.1:0", "--store-url", d.store_url, "--iterations", iters,
                           "--timeout", tmo, "--log-level", lvl, "--transport", tr,
                           "--progress-interval", "0", vflag, NULL};
    if (child_start(&d, DEMO_DECODE, decode_argv) < 0)
        goto out_stop;
    if (pump(&d, cli_now_ms() + timeout_ms, decode_ready) < 0 || !d.decode_sid[0]) {
        why = "the Decode did not report its session id";
        goto out_stop;
    }

    uint64_t t0 = cli_now_ms();
    char *prefill_argv[] = {"kvferry", "transfer", "--role", "Prefill", "--src-session-id",
                            "127.0.0.1:0", "--store-url", d.store_url, "--dst-session-id",
                            d.decode_sid, "--iterations", iters, "--timeout", tmo,
                            "--log-level", lvl, "--transport", tr,
                            "--progress-interval", "0", vflag, NULL};
    if (child_start(&d, DEMO_PREFILL, prefill_argv) < 0)
        goto out_stop;
    /* Each child bounds its start-up and every round by --timeout; this outer bound only
     * catches a child that hangs despite that. */
    if (pump(&d, t0 + (iterations + 3) * timeout_ms, nodes_done) < 0) {
        why = d.interrupted ? "interrupted" : "the Decode and Prefill did not finish in time";
        goto out_stop;
    }
    double wall_ms = (double)(cli_now_ms() - t0);

    /* Guarded: kill(0, ...) would signal our whole process group. */
    if (d.child[DEMO_STORE].pid > 0)
        kill(d.child[DEMO_STORE].pid, SIGTERM);
    if (pump(&d, cli_now_ms() + DEMO_GRACE_MS, store_gone) < 0)
        why = "the config store did not stop on SIGTERM";

    bool ok = d.child[DEMO_DECODE].status == 0 && d.child[DEMO_PREFILL].status == 0 &&
              d.rounds_verified == iterations && d.rounds_written == iterations;
    printf("demo summary:\n");
    printf("  rounds: %" PRIu64 " written, %" PRIu64 " verified (of %" PRIu64 ")\n",
           d.rounds_written, d.rounds_verified, iterations);
    printf("  bytes moved: %" PRIu64 "\n", d.bytes);
    if (d.rounds_written) {
        printf("  transfer time: %.3f ms (%.0f ms wall clock with start-up and checks)\n", d.ms,
               wall_ms);
        const char *how = !strcmp(d.via, "shm")  ? "same host: process_vm_writev into the "
                                                   "Decode's buffer"
                          : !strcmp(d.via, "tcp")  ? "TCP to the Decode's port, received into its "
                                                   "buffer"
                          : !strcmp(d.via, "loop") ? "same process: memcpy"
                                                   : "not reported";
        printf("  transport: %s (%s)\n", d.via[0] ? d.via : "?", how);
        printf("  throughput: %.2f GB/s", d.ms > 0 ? (double)d.bytes / (d.ms * 1e6) : 0.0);
        /* The first round also opens the connections; the rest is the steady state. */
        if (d.rounds_written > 1 && d.first_ms > 0 && d.ms > d.first_ms)
            printf(" (first round %.2f GB/s, later rounds %.2f GB/s)",
                   (double)d.bytes / d.rounds_written / (d.first_ms * 1e6),
                   (double)d.bytes * (double)(d.rounds_written - 1) / (double)d.rounds_written /
                       ((d.ms - d.first_ms) * 1e6));
        printf("\n    (bytes over the Prefill's time for its rounds: the writes of all 10 slices\n"
               "     and each slice's notification, until the Decode queued the last; not\n"
               "     start-up, the Decode's checks or the acknowledgements)\n");
    }
    printf("  verified: %s\n", ok ? "yes" : "no");
    if (!ok)
        why = "the Decode or the Prefill failed";
    else
        code = why ? 1 : 0;

out_stop:
    stop_all(&d);
    if (code != 0) {
        char b[DEMO_NCHILD][32];
        fprintf(stderr, "kvferry " CMD ": failed: %s (store: %s, Decode: %s, Prefill: %s)\n",
                d.interrupted ? "interrupted" : why ? why : "could not start a child",
                exit_text(&d.child[DEMO_STORE], b[0], sizeof(b[0])),
                exit_text(&d.child[DEMO_DECODE], b[1], sizeof(b[1])),
                exit_text(&d.child[DEMO_PREFILL], b[2], sizeof(b[2])));
        if (d.interrupted)
            code = 130;
    }
    close(d.sigfd);
    sigprocmask(SIG_SETMASK, &d.old_mask, NULL);
    return code;
}
