/* What `kvferry bench` prints: the table of runs and baselines, and the JSON of --json. */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "bench_run.h"
#include "cli.h"

json_t *bench_stats_json(const bench_stats_t *s)
{
    return json_pack("{s:s,s:s,s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:o}", "name", s->name, "label",
                     s->label, "calls", (json_int_t)s->calls, "seconds", s->seconds, "gbps",
                     s->gbps, "ops_per_s", s->ops_per_s, "calls_per_s", s->calls_per_s, "p50_us",
                     s->p50_us, "p99_us", s->p99_us, "max_us", s->max_us, "mean_us", s->mean_us,
                     "first_transfer_us", s->first_us, "cpu_s_per_gb",
                     s->cpu_s_per_gb >= 0 ? json_real(s->cpu_s_per_gb) : json_null());
}

void bench_print_header(void)
{
    printf("%-9s %-5s %-9s %5s %3s %8s %11s %9s %9s %9s %10s\n", "transport", "op", "block",
           "batch", "thr", "GB/s", "ops/s", "p50 us", "p99 us", "max us", "first us");
}

void bench_print_run(const bench_t *b, const bench_layout_t *l, const bench_stats_t *s)
{
    char block[32];
    if (b->a.workload != BENCH_WL_BLOCKS)
        snprintf(block, sizeof(block), "%s", bench_workload_name(b->a.workload));
    else
        bench_size_name(l->len[0], block, sizeof(block));
    printf("%-9s %-5s %-9s %5zu %3" PRIu64 " %8.2f %11.0f %9.1f %9.1f %9.1f %10.1f\n",
           b->transport_used, b->a.op == KVF_OP_WRITE ? "write" : "read", block, l->n, b->a.threads,
           s->gbps, s->ops_per_s, s->p50_us, s->p99_us, s->max_us, s->first_us);
}

void bench_print_baseline(const bench_stats_t *kvf, const bench_stats_t *s, bool latency)
{
    printf("  vs %-20s %8.2f GB/s  ratio %5.2f   p50 %8.1f us", s->label, s->gbps,
           s->gbps > 0 ? kvf->gbps / s->gbps : 0, s->p50_us);
    if (latency)
        printf("  p50 ratio %5.2f", s->p50_us > 0 ? kvf->p50_us / s->p50_us : 0);
    printf("\n");
}

static json_t *machine_json(void)
{
    struct utsname u;
    char model[256] = "unknown", host[256] = "";
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    while (f && fgets(line, sizeof(line), f)) {
        char *colon = strchr(line, ':');
        if (!strncmp(line, "model name", 10) && colon) {
            snprintf(model, sizeof(model), "%s", colon + 2);
            model[strcspn(model, "\n")] = '\0';
            break;
        }
    }
    if (f)
        fclose(f);
    uname(&u);
    gethostname(host, sizeof(host) - 1);
    return json_pack("{s:i,s:s,s:s,s:s,s:I}", "cores", (int)sysconf(_SC_NPROCESSORS_ONLN), "kernel",
                     u.release, "cpu_model", model, "hostname", host, "memory_bytes",
                     (json_int_t)sysconf(_SC_PHYS_PAGES) * (json_int_t)sysconf(_SC_PAGESIZE));
}

static json_t *us_array(const double *v, unsigned n)
{
    json_t *a = json_array();
    for (unsigned i = 0; i < n; i++)
        json_array_append_new(a, json_real(v[i]));
    return a;
}

/* The cold-start probe (bench_region.c); null when it did not run or made no probe. */
static json_t *probe_json(const bench_region_probe_t *r)
{
    if (r->n == 0)
        return r->why[0] ? json_pack("{s:s}", "error", r->why) : json_null();
    json_t *j = json_pack("{s:I,s:i,s:o,s:o,s:o,s:o,s:f}", "bytes", (json_int_t)r->bytes,
                          "idle_ms", (int)BENCH_IDLE_MS, "first_us", us_array(r->first_us, r->n),
                          "repeat_us", us_array(r->repeat_us, r->n), "warm_us",
                          us_array(r->warm_us, r->n), "after_idle_us", us_array(r->idle_us, r->n),
                          "first_over_repeat", r->first_over_repeat);
    if (r->why[0])
        json_object_set_new(j, "error", json_string(r->why));
    return j;
}

int bench_write_json(const bench_t *b, int argc, char **argv, bool ok)
{
    json_t *cmd = json_array();
    for (int i = 0; i < argc; i++)
        json_array_append_new(cmd, json_string(argv[i]));
    char when[64];
    time_t now = time(NULL);
    struct tm tm;
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
    json_t *root = json_pack(
        "{s:s,s:s,s:s,s:o,s:O,s:s,s:s,s:s,s:s,s:b,s:o,s:O}", "tool", "kvferry bench", "version",
        KVF_VERSION_STRING, "time", when, "machine", machine_json(), "command", cmd, "transport",
        b->transport_used ? b->transport_used : "none", "transport_requested",
        kvf_cli_transport_name(b->a.transport), "target", b->a.target ? b->a.target : "local",
        "target_memory", b->target_memory, "verified", ok, "runs_count",
        json_integer((json_int_t)json_array_size(b->runs)), "runs", b->runs);
    json_decref(cmd);
    json_object_set_new(root, "ready_ms", b->ready_ms > 0 ? json_real(b->ready_ms) : json_null());
    static const char *side[2] = {"initiator", "target"};
    /* The bench's own anonymous buffers; kvf_mem_alloc memory (the target's with --memory
     * alloc, and its mapping in a shm sender) is shared memory, counted apart. What is left
     * (engine_*) is the binary and the libraries (file_*, a part of it) and the process's other
     * anonymous memory: the engine's heap and thread stacks, and the little the bench keeps
     * outside its buffers (its latency samples are mapped and unmapped per run, and sorted
     * without the heap: bench_sort.c). */
    long own[2] = {(long)(b->local_len * (b->scratch ? 2 : 1) / 1024),
                   strcmp(b->target_memory, "registered") ? 0 : (long)(b->target_len / 1024)};
    json_t *rss = json_object(), *thr = json_object();
    for (int i = 0; i < 2; i++) {
        long eng[2];
        for (int w = 0; w < 2; w++)
            eng[w] = b->rss_kib[i][w] - (b->shmem_kib[i][w] > 0 ? b->shmem_kib[i][w] : 0) - own[i];
        json_object_set_new(
            rss, side[i],
            b->rss_kib[i][0] < 0
                ? json_null()
                : json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "before",
                            (json_int_t)b->rss_kib[i][0], "after", (json_int_t)b->rss_kib[i][1],
                            "shmem_after", (json_int_t)b->shmem_kib[i][1], "engine_before",
                            (json_int_t)eng[0], "engine_after", (json_int_t)eng[1],
                            "file_before", (json_int_t)b->file_kib[i][0], "file_after",
                            (json_int_t)b->file_kib[i][1]));
        json_object_set_new(thr, side[i],
                            b->nthreads[i][0] < 0 ? json_null()
                                                  : json_pack("{s:I,s:I}", "before",
                                                              (json_int_t)b->nthreads[i][0],
                                                              "after",
                                                              (json_int_t)b->nthreads[i][1]));
    }
    json_object_set_new(rss, "initiator_buffers_kib", json_integer((json_int_t)own[0]));
    json_object_set_new(rss, "target_buffer_kib", json_integer((json_int_t)(b->target_len / 1024)));
    json_object_set_new(root, "rss_kib", rss);
    json_object_set_new(root, "threads", thr);
    json_object_set_new(root, "fresh_region", probe_json(&b->probe));
    int rc = json_dump_file(root, b->a.json_path, JSON_INDENT(2));
    json_decref(root);
    if (rc < 0) {
        fprintf(stderr, "kvferry " BENCH_CMD ": cannot write %s: %s\n", b->a.json_path,
                strerror(errno));
        return -1;
    }
    return 0;
}
