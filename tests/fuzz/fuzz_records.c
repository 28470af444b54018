/*
 * Fuzz target: what an engine reads about its peers from the store (their session and regions
 * records, JSON written by whoever can write to the store) and the URL and session-id parsers
 * (user input). The input is split at its first NUL: the part before it goes to the URL and
 * session-id parsers, the whole input to both record parsers. Invariants: an accepted regions
 * list is sorted, non-overlapping and does not wrap; strings that come out are NUL-terminated
 * within their fields; an accepted URL or session id formats back within its buffer.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "common/url.h"
#include "core/core.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool quiet;
    if (!quiet) {
        kvf_log_set_level(KVF_LOG_ERROR);
        quiet = true;
    }
    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';

    kvf_store_url_t u;
    if (kvf__store_url_parse(s, 1, &u) == 0) {
        KVF_FUZZ_CHECK(u.nhosts >= 1 && u.nhosts <= KVF_URL_MAX_HOSTS, "%u hosts", u.nhosts);
        for (unsigned i = 0; i < u.nhosts; i++) {
            char buf[KVF_HOST_MAX + 8];
            KVF_FUZZ_CHECK(memchr(u.hosts[i].host, '\0', KVF_HOST_MAX), "host not terminated");
            kvf__hostport_format(&u.hosts[i], buf, sizeof(buf));
        }
    }
    kvf_hostport_t hp;
    if (kvf__session_id_parse(s, &hp) == 0) {
        char buf[KVF_HOST_MAX + 8];
        KVF_FUZZ_CHECK(memchr(hp.host, '\0', KVF_HOST_MAX), "session host not terminated");
        kvf__hostport_format(&hp, buf, sizeof(buf));
        kvf_hostport_t again;
        KVF_FUZZ_CHECK(kvf__session_id_parse(buf, &again) == 0 && again.port == hp.port,
                       "session id %s does not parse back", buf);
    }

    kvf_tpeer_desc_t d;
    memset(&d, 0, sizeof(d));
    kvf__eng_parse_session(data, size, &d);
    KVF_FUZZ_CHECK(memchr(d.boot_id, '\0', sizeof(d.boot_id)) &&
                       memchr(d.net_ns, '\0', sizeof(d.net_ns)) &&
                       memchr(d.memfd_sock, '\0', sizeof(d.memfd_sock)),
                   "session record strings not terminated");
    KVF_FUZZ_CHECK(d.pid >= 0, "pid %d", (int)d.pid);

    kvf_region_t *rs = NULL;
    size_t n = 0;
    uint64_t gen = 0;
    if (kvf__eng_parse_regions("fuzz:1", data, size, &rs, &n, &gen, NULL) == 0) {
        for (size_t i = 0; i < n; i++) {
            KVF_FUZZ_CHECK(rs[i].len > 0, "region %zu empty", i);
            KVF_FUZZ_CHECK(rs[i].len - 1 <= UINT64_MAX - rs[i].addr, "region %zu wraps", i);
            KVF_FUZZ_CHECK(i == 0 || rs[i].addr - rs[i - 1].addr >= rs[i - 1].len,
                           "regions %zu and %zu overlap or are out of order", i - 1, i);
        }
        free(rs);
    }
    free(s);
    return 0;
}

void kvf_fuzz_seeds(kvf_fuzz_add_fn add)
{
    static const char *const seeds[] = {
        "{\"gen\":3,\"regions\":[{\"addr\":\"7f0000000000\",\"len\":4096,\"gen\":1},"
        "{\"addr\":\"7f0000001000\",\"len\":8192,\"gen\":2}]}",
        "{\"gen\":0,\"regions\":[]}",
        "{\"gen\":1,\"regions\":[{\"addr\":\"ffffffffffffffff\",\"len\":1}]}",
        "{\"version\":1,\"role\":\"Decode\",\"device_id\":0,\"pid\":4242,"
        "\"boot_id\":\"0123456789abcdef0123456789abcdef0123\",\"net_ns\":\"net:[4026531840]\","
        "\"transports\":[\"tcp\",\"shm\"],\"shm_word\":\"7ffd12340000\",\"shm_nonce\":\"1f\","
        "\"memfd_socket\":\"kvferry/default/127.0.0.1:50051\"}",
        "tcp://127.0.0.1:8000",
        "tcp://[::1]:8000",
        "etcd://10.0.0.1:2379,10.0.0.2:2379",
        "redis://cache-0:6379",
        "tcp://192.168.1.1000:8000",
        "127.0.0.1:50051",
        "[fe80::1]:1",
        "decode-0.example:65535",
    };
    for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++)
        add((const uint8_t *)seeds[i], strlen(seeds[i]));
}

int kvf_fuzz_final(void)
{
    return 0;
}
