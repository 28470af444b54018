/*
 * Progress of long terminal work (`kvferry transfer` rounds, `kvferry bench` runs): on a
 * terminal one status line rewritten in place with the count, bytes, rate and ETA; otherwise
 * plain lines, at most one per interval, that a log keeps.
 *
 * The caller owns its detailed line (a round's result, say). cli_progress_tick() says whether
 * to print it now: always under --verbose, for the first and the last step, and once per
 * interval; on a terminal it draws the status line for the steps in between.
 */
#ifndef KVF_CLI_PROGRESS_H
#define KVF_CLI_PROGRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct {
    FILE *out;
    bool tty;             /* @out is a terminal: draw the status line */
    bool verbose;         /* every step's line */
    uint64_t interval_ns; /* a detailed line at least this often; 0 = every step */
    uint64_t total;       /* steps expected, 0 = unknown (no ETA) */
    const char *unit;     /* "rounds" */
    uint64_t t0_ns;       /* cli_progress_init() */
    uint64_t line_ns;     /* the last detailed line */
    uint64_t drawn_ns;    /* the last status line */
    bool status_shown;    /* a status line is on the terminal, to be cleared */
} cli_progress_t;

/* Start counting now. @interval_s is the longest gap between detailed lines (0: no gap). */
void cli_progress_init(cli_progress_t *p, FILE *out, uint64_t total, const char *unit,
                       double interval_s, bool verbose);

/* Step @done (1-based) finished, @bytes moved in all. Returns true when the caller should print
 * its detailed line now (any status line is already cleared); else, on a terminal, the status
 * line shows the progress (redrawn at most ten times a second). */
bool cli_progress_tick(cli_progress_t *p, uint64_t done, uint64_t bytes);

/* Clear the status line, before any other output or at the end. */
void cli_progress_clear(cli_progress_t *p);

/* Format "@done/@total @unit, X GB, Y GB/s, ETA Z s" (no total: no "/total", no ETA) for
 * @elapsed_s seconds into @buf. */
void cli_progress_format(char *buf, size_t len, uint64_t done, uint64_t total, const char *unit,
                         uint64_t bytes, double elapsed_s);

#endif /* KVF_CLI_PROGRESS_H */
