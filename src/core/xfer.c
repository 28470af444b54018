/*
 * Synchronous transfers: kvf_transfer_sync() and its one-element forms, and the data path the
 * async batches share (kvf__eng_transfer): the peer entered, the batch checked as its path's
 * transport says (kvf_check_t), run, and retried once when a stale cache was the cause.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>

#include "core/core.h"

int kvf__eng_check_xfers(const char *peer, const kvf_xfer_t *x, size_t n)
{
    if (!x || n == 0)
        return kvf__err(-KVF_EINVAL, "transfer to %s: %s", peer, x ? "empty batch" : "NULL batch");
    if (n > ENG_MAX_BATCH)
        return kvf__err(-KVF_EINVAL, "transfer to %s: %zu elements exceed %u", peer, n,
                        ENG_MAX_BATCH);
    for (size_t i = 0; i < n; i++) {
        if (x[i].op != KVF_OP_WRITE && x[i].op != KVF_OP_READ)
            return kvf__err(-KVF_EINVAL,
                            "transfer to %s: element %zu: op %d is neither write "
                            "nor read",
                            peer, i, (int)x[i].op);
        if (x[i].len == 0)
            return kvf__err(-KVF_EINVAL, "transfer to %s: element %zu: length is 0", peer, i);
        if (!x[i].local)
            return kvf__err(-KVF_EINVAL, "transfer to %s: element %zu: local address is NULL", peer,
                            i);
        if (x[i].remote + x[i].len < x[i].remote)
            return kvf__err(-KVF_EINVAL,
                            "transfer to %s: element %zu: [0x%" PRIx64 ", +%zu) "
                            "wraps around the address space",
                            peer, i, x[i].remote, x[i].len);
    }
    return 0;
}

/* Forget element results before running the batch again. */
static void status_reset(const kvf_xfer_ctl_t *ctl, size_t n)
{
    if (ctl && ctl->status)
        for (size_t i = 0; i < n; i++)
            ctl->status[i] = KVF_XFER_PENDING;
}

/* The element the sender's own check refused: its status says so; the others never started. */
static void status_refused(const kvf_xfer_ctl_t *ctl, int rc, size_t bad)
{
    if (ctl && ctl->status)
        ctl->status[bad] = rc;
}

/*
 * A connection that the target closed just as a request crossed it (its idle timeout) fails the
 * batch as if the peer were gone. If the peer answers a new connection, run the batch once more:
 * its writes put the same bytes in the same place and its reads read again, the target checks
 * every request, and nothing was reported done. A peer that is really gone keeps @rc and its
 * message.
 */
static int retry_if_alive(eng_peer_t *p, const kvf_xfer_t *x, size_t n, uint64_t deadline,
                          const kvf_xfer_ctl_t *ctl, int rc)
{
    if (rc != -KVF_EPEERGONE || kvf__now_ms() >= deadline ||
        (ctl && ctl->cancel && atomic_load(ctl->cancel)))
        return rc;
    char msg[512];
    snprintf(msg, sizeof(msg), "%s", kvf_last_error());
    if (p->tops->peer_alive(p->tp, deadline) < 0)
        return kvf__err(rc, "%s", msg);
    KVF_DEBUG(ENG_LOG, "peer %s answers again after \"%s\": running the batch once more",
              p->sid, msg);
    status_reset(ctl, n);
    return p->tops->transfer(p->tp, x, n, deadline, ctl);
}

/* Peer path already held (@p->sel shared): run the batch, checked as its transport's @check
 * says (see kvf_check_t). */
static int peer_transfer(kvf_engine_t *e, eng_peer_t *p, const kvf_xfer_t *x, size_t n,
                         uint64_t deadline, const kvf_xfer_ctl_t *ctl)
{
    size_t bad = 0;
    int rc;
    if (p->tops->check == KVF_CHECK_DIRECT)
        return p->tops->transfer(p->tp, x, n, deadline, ctl);
    if (p->tops->check == KVF_CHECK_SENDER) {
        /* Counted by the target's drain from before the generation is read until the copy
         * ended: an unregister that returned saw this transfer either finish or read its new
         * table. */
        uint64_t token;
        rc = p->tops->guard_enter(p->tp, &token);
        if (rc < 0)
            return rc;
        rc = kvf__peer_make_current(e, p);
        if (rc == 0) {
            rc = kvf__peer_check(p, x, n, &bad);
            if (rc < 0)
                status_refused(ctl, rc, bad);
        }
        if (rc == 0)
            rc = p->tops->transfer(p->tp, x, n, deadline, ctl);
        p->tops->guard_leave(p->tp, token);
        return rc;
    }
    /* A miss in the cached regions may only mean the cache is older than the target's table (a
     * region registered since). Up to ENG_SEND_ON_MISS_MAX missed bytes go unchecked and the
     * target's check decides. Above it the store is asked first and a range it does not publish
     * is refused here; when the store cannot answer, the target decides again. */
    bool unchecked = false;
    rc = kvf__peer_check(p, x, n, &bad);
    if (rc == -KVF_ENOTREG) {
        size_t missed = kvf__peer_missed_bytes(p, x, n);
        if (missed > ENG_SEND_ON_MISS_MAX && kvf__peer_refresh(e, p) == 0) {
            rc = kvf__peer_check(p, x, n, &bad);
        } else if (missed != SIZE_MAX) {
            unchecked = true;
            rc = 0;
        }
    }
    if (rc < 0) {
        status_refused(ctl, rc, bad);
        return rc;
    }
    rc = p->tops->transfer(p->tp, x, n, deadline, ctl);
    rc = retry_if_alive(p, x, n, deadline, ctl, rc);
    /* The target's check is authoritative. If it refused a range, the peer re-registered since
     * the cache was filled: refresh, and retry once if the range is published now. When an
     * unchecked batch's element that the fresh list does not hold either was refused by the
     * target too, the sender's check's message (which names the element and the nearest region)
     * replaces the target's, as if it had been checked before sending; an element the target
     * took keeps its result. */
    if (rc == -KVF_ENOTREG && kvf__now_ms() < deadline && kvf__peer_refresh(e, p) == 0) {
        int again = kvf__peer_check(p, x, n, &bad);
        if (again == 0) {
            status_reset(ctl, n);
            rc = p->tops->transfer(p->tp, x, n, deadline, ctl);
        } else if (unchecked && again == -KVF_ENOTREG &&
                   !(ctl && ctl->status && ctl->status[bad] == 0)) {
            status_refused(ctl, again, bad);
            rc = again;
        }
    }
    return rc;
}

/*
 * Coalescing: the frameworks pass thousands of pages per call, and neighbouring pages are often
 * adjacent on both sides. A run of elements with the same op whose local and remote ranges each
 * continue the previous one travels as one element: one frame and one answer over tcp, one copy
 * over shm. The merged batch is checked against the peer's regions as any batch is, so a run
 * that would cross from one region into the next is not merged (the whole batch then goes as
 * given). Per-element results are spread back to the caller's elements, and a failure names the
 * caller's elements behind the merged one.
 */
typedef struct {
    kvf_xfer_t *x;  /* merged elements */
    size_t *first;  /* first[k]: the caller's index of merged element k; first[m] = n */
    int *status;    /* per merged element */
    size_t m;
} merged_t;

static bool adjacent(const kvf_xfer_t *a, const kvf_xfer_t *b)
{
    return a->op == b->op && (const uint8_t *)a->local + a->len == (const uint8_t *)b->local &&
           a->remote + a->len == b->remote;
}

/* Fill @mg when merging shrinks @x by a worthwhile share; returns false (nothing allocated)
 * when the batch should go as given. */
static bool merge_build(const kvf_xfer_t *x, size_t n, merged_t *mg)
{
    size_t m = 1;
    for (size_t i = 1; i < n; i++)
        m += !adjacent(&x[i - 1], &x[i]);
    if (m == n || m > n - n / 8) /* fewer than 1 in 8 saved: not worth a copy of the batch */
        return false;
    /* One allocation for the three arrays (kvf_xfer_t's alignment covers the others). */
    mg->x = malloc(m * sizeof(*mg->x) + (m + 1) * sizeof(*mg->first) + m * sizeof(*mg->status));
    if (!mg->x)
        return false;
    mg->first = (size_t *)(void *)(mg->x + m);
    mg->status = (int *)(void *)(mg->first + m + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && adjacent(&x[i - 1], &x[i])) {
            mg->x[k - 1].len += x[i].len;
            continue;
        }
        mg->first[k] = i;
        mg->x[k++] = x[i];
    }
    mg->first[k] = n;
    mg->m = k;
    for (size_t j = 0; j < k; j++)
        mg->status[j] = KVF_XFER_PENDING;
    return true;
}

static void merge_free(merged_t *mg)
{
    free(mg->x);
}

/* The results of the merged elements as the caller's, and a failure's message naming them. */
static int merge_finish(merged_t *mg, const kvf_xfer_ctl_t *ctl, int rc)
{
    size_t bad = mg->m;
    for (size_t k = 0; k < mg->m; k++) {
        if (ctl && ctl->status)
            for (size_t i = mg->first[k]; i < mg->first[k + 1]; i++)
                ctl->status[i] = mg->status[k];
        if (bad == mg->m && mg->status[k] < 0 && mg->status[k] != KVF_XFER_PENDING)
            bad = k;
    }
    if (rc < 0 && bad < mg->m) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", kvf_last_error());
        kvf__err(rc, "%s (element %zu as sent is elements %zu..%zu of the call, merged because "
                     "they are adjacent)",
                 msg, bad, mg->first[bad], mg->first[bad + 1] - 1);
    }
    return rc;
}

/* peer_transfer() of @x, merged where elements are adjacent on both sides. */
static int peer_transfer_merged(kvf_engine_t *e, eng_peer_t *p, const kvf_xfer_t *x, size_t n,
                                uint64_t deadline, const kvf_xfer_ctl_t *ctl)
{
    merged_t mg;
    size_t bad;
    if (n < 2 || p->tops->check == KVF_CHECK_DIRECT || !merge_build(x, n, &mg))
        return peer_transfer(e, p, x, n, deadline, ctl);
    /* A merged run must lie in one region; if the cache says otherwise (or is stale), the
     * batch goes as given and meets the usual checks. */
    if (kvf__peer_check(p, mg.x, mg.m, &bad) < 0) {
        merge_free(&mg);
        return peer_transfer(e, p, x, n, deadline, ctl);
    }
    kvf_xfer_ctl_t mctl = {.status = mg.status, .cancel = ctl ? ctl->cancel : NULL};
    int rc = merge_finish(&mg, ctl, peer_transfer(e, p, mg.x, mg.m, deadline, &mctl));
    merge_free(&mg);
    return rc;
}

/* The index in kvf__transports of the path @p uses (held shared), for the statistics. */
static size_t path_index(const eng_peer_t *p)
{
    size_t i = 0;
    while (kvf__transports[i] && kvf__transports[i] != p->tops)
        i++;
    return i;
}

int kvf__eng_transfer(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                      uint64_t deadline, const kvf_xfer_ctl_t *ctl)
{
    eng_peer_t *p;
    uint64_t t0 = kvf__now_ns();
    int rc = kvf__peer_enter(e, peer, "transfer", ctl ? ctl->cancel : NULL, &p);
    if (rc < 0) {
        kvf__stats_call(e, NULL, 0, x, n, rc, 0);
        return rc;
    }
    size_t ti = path_index(p);
    eng_count_add(&p->in_flight, 1);
    rc = kvf__peer_leave(p, peer_transfer_merged(e, p, x, n, deadline, ctl), "transfer");
    atomic_fetch_sub_explicit(&p->in_flight, 1, memory_order_relaxed);
    /* The peer stays in the cache until destroy, which waits for this busy section. */
    kvf__stats_call(e, p, ti, x, n, rc, (kvf__now_ns() - t0) / 1000u);
    return rc;
}

bool kvf__eng_post_rerun(int rc)
{
    return rc == -KVF_EPEERGONE || rc == -KVF_ENOTREG || rc == -KVF_ECLOSED;
}

/* The transport's end of a posted batch: count it (a batch that runs again is counted then). */
static void post_done(void *arg, int rc, const char *msg)
{
    eng_post_t *ps = arg;
    atomic_fetch_sub_explicit(&ps->p->in_flight, 1, memory_order_relaxed);
    if (!kvf__eng_post_rerun(rc))
        kvf__stats_call(ps->e, ps->p, ps->ti, ps->x, ps->n, rc,
                        (kvf__now_ns() - ps->t0_ns) / 1000u);
    ps->done(ps->arg, rc, msg);
}

int kvf__eng_post(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n,
                  uint64_t deadline_ms, int *status, eng_post_t *ps)
{
    eng_peer_t *p = kvf__peer_enter_now(e, peer);
    if (!p)
        return 1;
    int rc = 1;
    /* Only where the target checks every request (tcp): the batch must hit the cached regions,
     * so that a miss keeps the checks and messages of kvf__eng_transfer(). A miss is no error of
     * this call (the batch is queued): the caller's last error stays as it was. */
    if (p->tops->check == KVF_CHECK_TARGET && kvf__peer_holds(p, x, n)) {
        *ps = (eng_post_t){.e = e, .p = p, .ti = path_index(p), .t0_ns = kvf__now_ns(), .x = x,
                           .n = n, .done = ps->done, .arg = ps->arg};
        eng_count_add(&p->in_flight, 1);
        rc = p->tops->post(p->tp, x, n, deadline_ms, status, post_done, ps);
        if (rc != 0)
            atomic_fetch_sub_explicit(&p->in_flight, 1, memory_order_relaxed);
    }
    /* Not a failure: the batch is posted, or runs the usual way. */
    kvf__peer_leave(p, 0, "transfer");
    return rc;
}

int kvf_transfer_sync(kvf_engine_t *e, const char *peer, const kvf_xfer_t *x, size_t n)
{
    if (!e)
        return kvf__err(-KVF_EINVAL, "transfer: the engine is NULL");
    if (!peer)
        return kvf__err(-KVF_EINVAL, "transfer: the peer session id is NULL");
    int rc = kvf__eng_check_xfers(peer, x, n);
    if (rc < 0)
        return rc;
    rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    rc = kvf__eng_transfer(e, peer, x, n, kvf__now_ms() + e->cfg.op_timeout_ms, NULL);
    kvf__eng_busy_leave(e);
    return rc;
}

int kvf_write(kvf_engine_t *e, const char *peer, const void *local, uint64_t remote, size_t len)
{
    kvf_xfer_t x = {.op = KVF_OP_WRITE, .local = (void *)local, .remote = remote, .len = len};
    return kvf_transfer_sync(e, peer, &x, 1);
}

int kvf_read(kvf_engine_t *e, const char *peer, void *local, uint64_t remote, size_t len)
{
    kvf_xfer_t x = {.op = KVF_OP_READ, .local = local, .remote = remote, .len = len};
    return kvf_transfer_sync(e, peer, &x, 1);
}

int kvf_peer_regions(kvf_engine_t *e, const char *peer, kvf_region_info_t **out, size_t *n)
{
    kvf_region_t *rs;
    size_t count;
    uint64_t gen;

    if (!e || !peer || !out || !n)
        return kvf__err(-KVF_EINVAL, "peer regions: NULL argument");
    int rc = kvf__eng_busy_enter(e);
    if (rc < 0)
        return rc;
    rc = kvf__eng_fetch_regions(e, peer, e->cfg.init_timeout_ms, NULL, &rs, &count, &gen,
                                NULL);
    if (rc < 0)
        goto out;
    kvf_region_info_t *info = calloc(count ? count : 1, sizeof(*info));
    if (!info) {
        free(rs);
        rc = kvf__err(-KVF_ENOMEM, "peer %s: out of memory", peer);
        goto out;
    }
    for (size_t i = 0; i < count; i++)
        info[i] = (kvf_region_info_t){.addr = rs[i].addr, .len = rs[i].len};
    free(rs);
    *out = info;
    *n = count;
out:
    kvf__eng_busy_leave(e);
    return rc;
}
