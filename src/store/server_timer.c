/*
 * Timers of the store server: a binary min-heap of deadlines. Each timer is embedded in the
 * object it times (a waiter, a lease, a connection's partial frame); the loop in server.c runs
 * the due ones.
 */
#include <errno.h>
#include <stdlib.h>

#include "store/server.h"

static void heap_place(struct kvf_store_server *srv, size_t i, struct srv_timer *t)
{
    srv->heap[i] = t;
    t->idx = i;
}

static void heap_sift_up(struct kvf_store_server *srv, size_t i)
{
    struct srv_timer *t = srv->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (srv->heap[parent]->deadline_ms <= t->deadline_ms)
            break;
        heap_place(srv, i, srv->heap[parent]);
        i = parent;
    }
    heap_place(srv, i, t);
}

static void heap_sift_down(struct kvf_store_server *srv, size_t i)
{
    struct srv_timer *t = srv->heap[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= srv->heap_len)
            break;
        if (child + 1 < srv->heap_len &&
            srv->heap[child + 1]->deadline_ms < srv->heap[child]->deadline_ms)
            child++;
        if (srv->heap[child]->deadline_ms >= t->deadline_ms)
            break;
        heap_place(srv, i, srv->heap[child]);
        i = child;
    }
    heap_place(srv, i, t);
}

/* Arm @t for @deadline_ms, or move its deadline if it is armed. Returns 0 or -ENOMEM. */
int kvf__srv_timer_arm(struct kvf_store_server *srv, struct srv_timer *t, uint64_t deadline_ms)
{
    if (timer_armed(t)) {
        uint64_t old = t->deadline_ms;
        t->deadline_ms = deadline_ms;
        if (deadline_ms < old)
            heap_sift_up(srv, t->idx);
        else
            heap_sift_down(srv, t->idx);
        return 0;
    }
    if (srv->heap_len == srv->heap_cap) {
        size_t cap = srv->heap_cap ? srv->heap_cap * 2 : 64;
        struct srv_timer **h = realloc(srv->heap, cap * sizeof(*h));
        if (!h)
            return -ENOMEM;
        srv->heap = h;
        srv->heap_cap = cap;
    }
    t->deadline_ms = deadline_ms;
    heap_place(srv, srv->heap_len++, t);
    heap_sift_up(srv, t->idx);
    return 0;
}

void kvf__srv_timer_disarm(struct kvf_store_server *srv, struct srv_timer *t)
{
    if (!timer_armed(t))
        return;
    size_t i = t->idx;
    struct srv_timer *last = srv->heap[--srv->heap_len];
    t->idx = SRV_TIMER_IDLE;
    if (last == t)
        return;
    heap_place(srv, i, last);
    heap_sift_up(srv, i);
    heap_sift_down(srv, last->idx);
}
