/*
 * The table behind TransferEngine's asynchronous batch ids: id -> kvf_batch_t.
 *
 * Python code names a batch by an int id, never by a pointer, so that a stale or forged id is an
 * error code rather than a crash. Two Python threads may use one id at once, and both release the
 * GIL while inside the C library; so the table has its own mutex (it does not rely on the GIL,
 * which the callers drop), and each entry counts its users: an entry is unlinked when its id is
 * released (a final status was returned, or the engine went away), but the kvf_batch_t is freed
 * only when the last caller still using it has left.
 */
#include "kvferry_py.h"

#define MIN_BUCKETS 64u

int kvfpy_batches_init(kvfpy_batches_t *t)
{
    memset(t, 0, sizeof(*t));
    if (pthread_mutex_init(&t->lock, NULL) != 0)
        return -1;
    t->next_id = 1;
    return 0;
}

void kvfpy_batches_fini(kvfpy_batches_t *t)
{
    PyMem_RawFree(t->buckets);
    t->buckets = NULL;
    pthread_mutex_destroy(&t->lock);
}

static size_t bucket_of(const kvfpy_batches_t *t, uint64_t id)
{
    /* Ids are consecutive, so the low bits already spread them evenly. */
    return (size_t)(id & (t->nbuckets - 1));
}

/* Double the bucket array when the chains would get long. Called with the lock held. */
static int grow(kvfpy_batches_t *t)
{
    size_t n = t->nbuckets ? t->nbuckets * 2 : MIN_BUCKETS;
    kvfpy_batch_t **nb = PyMem_RawCalloc(n, sizeof(*nb));
    if (!nb)
        return -1;
    for (size_t i = 0; i < t->nbuckets; i++) {
        kvfpy_batch_t *x = t->buckets[i];
        while (x) {
            kvfpy_batch_t *next = x->next;
            size_t j = (size_t)(x->id & (n - 1));
            x->next = nb[j];
            nb[j] = x;
            x = next;
        }
    }
    PyMem_RawFree(t->buckets);
    t->buckets = nb;
    t->nbuckets = n;
    return 0;
}

int64_t kvfpy_batches_add(kvfpy_batches_t *t, kvf_batch_t *b, PyObject *pins)
{
    kvfpy_batch_t *x = PyMem_RawCalloc(1, sizeof(*x));
    int64_t id = -1;

    if (!x)
        return -1;
    x->b = b;
    x->pins = pins;
    pthread_mutex_lock(&t->lock);
    if (t->count >= t->nbuckets && grow(t) < 0) {
        pthread_mutex_unlock(&t->lock);
        PyMem_RawFree(x);
        return -1;
    }
    id = (int64_t)t->next_id++;
    x->id = (uint64_t)id;
    size_t i = bucket_of(t, x->id);
    x->next = t->buckets[i];
    t->buckets[i] = x;
    t->count++;
    pthread_mutex_unlock(&t->lock);
    return id;
}

kvfpy_batch_t *kvfpy_batches_get(kvfpy_batches_t *t, uint64_t id)
{
    kvfpy_batch_t *x = NULL;

    pthread_mutex_lock(&t->lock);
    if (t->nbuckets) {
        for (x = t->buckets[bucket_of(t, id)]; x; x = x->next)
            if (x->id == id)
                break;
    }
    if (x)
        x->users++;
    pthread_mutex_unlock(&t->lock);
    return x;
}

/* Unlink @x from its chain. Called with the lock held, for an entry still in the table. */
static void unlink_entry(kvfpy_batches_t *t, kvfpy_batch_t *x)
{
    kvfpy_batch_t **pp = &t->buckets[bucket_of(t, x->id)];
    while (*pp && *pp != x)
        pp = &(*pp)->next;
    if (*pp)
        *pp = x->next;
    x->next = NULL;
    x->released = 1;
    t->count--;
}

kvfpy_batch_t *kvfpy_batches_put(kvfpy_batches_t *t, kvfpy_batch_t *x, int release)
{
    int dead;

    pthread_mutex_lock(&t->lock);
    if (release && !x->released)
        unlink_entry(t, x);
    x->users--;
    dead = x->released && x->users == 0;
    pthread_mutex_unlock(&t->lock);
    return dead ? x : NULL;
}

kvfpy_batch_t *kvfpy_batches_drain(kvfpy_batches_t *t)
{
    kvfpy_batch_t *dead = NULL;

    pthread_mutex_lock(&t->lock);
    for (size_t i = 0; i < t->nbuckets; i++) {
        kvfpy_batch_t *x = t->buckets[i];
        t->buckets[i] = NULL;
        while (x) {
            kvfpy_batch_t *next = x->next;
            x->released = 1;
            x->next = NULL;
            /* An entry still in use is freed by its last user (kvfpy_batches_put). */
            if (x->users == 0) {
                x->next = dead;
                dead = x;
            }
            x = next;
        }
    }
    t->count = 0;
    pthread_mutex_unlock(&t->lock);
    return dead;
}

size_t kvfpy_batches_count(kvfpy_batches_t *t)
{
    pthread_mutex_lock(&t->lock);
    size_t n = t->count;
    pthread_mutex_unlock(&t->lock);
    return n;
}
