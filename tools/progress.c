#include "progress.h"

#include <inttypes.h>
#include <unistd.h>

#include "clock.h"

#define REDRAW_NS 100000000ull /* a status line at most ten times a second */

void cli_progress_init(cli_progress_t *p, FILE *out, uint64_t total, const char *unit,
                       double interval_s, bool verbose)
{
    *p = (cli_progress_t){
        .out = out,
        .tty = isatty(fileno(out)) == 1,
        .verbose = verbose,
        .interval_ns = (uint64_t)(interval_s * 1e9),
        .total = total,
        .unit = unit,
        .t0_ns = cli_now_ns(),
    };
    p->line_ns = p->t0_ns;
}

void cli_progress_format(char *buf, size_t len, uint64_t done, uint64_t total, const char *unit,
                         uint64_t bytes, double elapsed_s)
{
    double rate = elapsed_s > 0 ? (double)bytes / elapsed_s / 1e9 : 0.0;
    int n = total ? snprintf(buf, len, "%" PRIu64 "/%" PRIu64 " %s", done, total, unit)
                  : snprintf(buf, len, "%" PRIu64 " %s", done, unit);
    if (n < 0 || (size_t)n >= len)
        return;
    int m = snprintf(buf + n, len - (size_t)n, ", %.2f GB, %.2f GB/s", (double)bytes / 1e9, rate);
    if (m < 0 || (size_t)(n + m) >= len || !total || !done || done >= total)
        return;
    double eta = elapsed_s / (double)done * (double)(total - done);
    snprintf(buf + n + m, len - (size_t)(n + m), ", ETA %.0f s", eta);
}

void cli_progress_clear(cli_progress_t *p)
{
    if (!p->status_shown)
        return;
    fputs("\r\033[K", p->out);
    fflush(p->out);
    p->status_shown = false;
}

bool cli_progress_tick(cli_progress_t *p, uint64_t done, uint64_t bytes)
{
    uint64_t now = cli_now_ns();
    bool last = p->total && done >= p->total;
    if (p->verbose || done <= 1 || last || now - p->line_ns >= p->interval_ns) {
        cli_progress_clear(p);
        p->line_ns = now;
        return true;
    }
    if (p->tty && now - p->drawn_ns >= REDRAW_NS) {
        char line[160];
        cli_progress_format(line, sizeof(line), done, p->total, p->unit, bytes,
                            (double)(now - p->t0_ns) / 1e9);
        fprintf(p->out, "\r\033[K%s", line);
        fflush(p->out);
        p->drawn_ns = now;
        p->status_shown = true;
    }
    return false;
}
