/*
 * list() of the etcd backend: a prefix read in pages of ETCD_LIST_PAGE keys, every page at the
 * revision of the first so that the whole answer is one snapshot. Used by watches too, to
 * resync after a compaction. See etcd.h.
 */
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "store/etcd.h"

int kvf__etcd_list(etcd_t *e, const char *prefix, kvf_store_kv_t **out, size_t *count)
{
    char what[EXT_WHAT_MAX];
    if (!prefix)
        prefix = "";
    int rc = kvf__ext_check_key(e->url, "list", prefix, true);
    if (rc < 0)
        return rc;
    kvf__ext_what(what, sizeof(what), "list", prefix);
    if (!out || !count)
        return kvf__err(-KVF_EINVAL, "store %s: %s: the output pointers are NULL", e->url, what);
    *out = NULL;
    *count = 0;
    char *end = kvf__etcd_prefix_end(prefix);
    char *from = *prefix ? kvf__etcd_b64(prefix, strlen(prefix)) : kvf__etcd_b64("", 1);
    kvf_store_kv_t *kvs = NULL;
    size_t n = 0, cap = 0;
    int64_t rev = 0;
    rc = 0;
    /* Pages of ETCD_LIST_PAGE keys, all read at the revision of the first, so the whole list is
     * one consistent snapshot. */
    while (rc == 0 && from && end) {
        json_t *b = json_pack("{s:s,s:s,s:o}", "key", from, "range_end", end, "limit",
                              kvf__etcd_num(ETCD_LIST_PAGE));
        if (b && rev)
            json_object_set_new(b, "revision", kvf__etcd_num(rev));
        json_t *r = NULL;
        if (!b) {
            rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
            break;
        }
        rc = kvf__etcd_post(e, "/v3/kv/range", b, what, e->opts.request_timeout_ms, &r);
        if (rc < 0)
            break;
        if (!rev)
            rev = kvf__etcd_get_num(json_object_get(r, "header"), "revision");
        json_t *arr = json_object_get(r, "kvs");
        size_t i;
        json_t *kv;
        const char *last = NULL;
        json_array_foreach(arr, i, kv) {
            if (n == cap) {
                size_t nc = cap ? cap * 2 : 64;
                kvf_store_kv_t *g = realloc(kvs, nc * sizeof(*g));
                if (!g) {
                    rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
                    break;
                }
                kvs = g;
                cap = nc;
            }
            void *k = NULL, *v = NULL;
            size_t kl = 0, vl = 0;
            last = json_string_value(json_object_get(kv, "key"));
            const char *vs = json_string_value(json_object_get(kv, "value"));
            if (kvf__etcd_unb64(last ? last : "", &k, &kl) < 0 ||
                kvf__etcd_unb64(vs ? vs : "", &v, &vl) < 0) {
                free(k);
                rc = kvf__err(-KVF_EPROTO, "store %s: %s: the gateway sent bad base64", e->url,
                              what);
                break;
            }
            kvs[n].key = k;
            kvs[n].val = v;
            kvs[n].val_len = vl;
            n++;
        }
        bool more = json_is_true(json_object_get(r, "more")) && last && rc == 0;
        if (more) {
            /* The next page starts just after the last key: that key with a NUL appended. */
            const char *lk = kvs[n - 1].key;
            size_t ll = strlen(lk);
            char *nk = malloc(ll + 1);
            free(from);
            from = NULL;
            if (nk) {
                memcpy(nk, lk, ll);
                nk[ll] = '\0';
                from = kvf__etcd_b64(nk, ll + 1);
                free(nk);
            }
            if (!from)
                rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
        }
        json_decref(r);
        if (!more)
            break;
    }
    if (rc == 0 && (!from || !end))
        rc = kvf__err(-KVF_ENOMEM, "store %s: %s: out of memory", e->url, what);
    free(from);
    free(end);
    if (rc < 0) {
        kvf_store_kv_free(kvs, n);
        return rc;
    }
    *out = kvs;
    *count = n;
    return 0;
}

