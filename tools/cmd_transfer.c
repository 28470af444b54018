/*
 * `kvferry transfer`: the seed's test_transfer_engine.py as a C tool, with the seed's flags.
 *
 * A Decode node registers a buffer shaped like the seed's tensor, (10, 50, 40, 20, 60) float16 =
 * 48,000,000 bytes, and waits. A Prefill node fills its own buffer with random float16 values and
 * writes it, slice by slice, into the Decode's registered buffer, whose address it learns from
 * the Decode's published regions (on CPU hosts the seed's "same virtual address on both sides"
 * assumption does not hold). The two then meet in the config store, so the Decode knows when a
 * round has landed and can check it:
 *
 *   kvferry/v1/default/transfer/<decode sid>/round  set by the Prefill after its write returned:
 *       {"round": r, "prefill": sid, "bytes": B, "slices": 10, "hash": "fnv1a64w",
 *        "checksums": ["<16 hex digits>", ...]}
 *   kvferry/v1/default/transfer/<decode sid>/ack    set by the Decode to "r" once it checked
 *       round r, so the Prefill may overwrite the buffer with round r + 1.
 *
 * Each side deletes the key it waits on before the other side can set it again (the Decode its
 * stale round record before it registers, the round record after checking it; the Prefill the
 * previous ack before it publishes the next round), so a get-with-wait never returns an old value.
 */
#include <errno.h>
#include <getopt.h>
#include <ifaddrs.h>
#include <inttypes.h>
#include <jansson.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "cli.h"
#include "common/common.h"
#include "common/url.h"
#include "kvferry.h"

#define CMD "transfer"

/* The seed's tensor: shape (10, 50, 40, 20, 60), float16. */
#define XFER_SLICES 10u
#define XFER_SLICE_ELEMS (50u * 40u * 20u * 60u)
#define XFER_SLICE_BYTES (XFER_SLICE_ELEMS * 2u)
#define XFER_BYTES ((size_t)XFER_SLICES * XFER_SLICE_BYTES)

#define XFER_SID_MAX (KVF_HOST_MAX + 8)
#define XFER_KEY_MAX (XFER_SID_MAX + 64)
#define XFER_MAX_TIMEOUT_S 3600u /* kvf_store_get() waits at most an hour */
#define XFER_HASH_NAME "fnv1a64w"
/* Bound on the Prefill's wait for the Decode's engine to withdraw its records before the store
 * this process hosts goes away with it. */
#define XFER_STORE_LINGER_MS 3000u

typedef struct {
    kvf_role_t role;
    const char *store_url;
    kvf_store_url_t store;
    char src_sid[XFER_SID_MAX];
    char dst_sid[XFER_SID_MAX]; /* "" for the Decode */
    int npu_id;
    uint64_t iterations; /* 0 = forever */
    uint32_t timeout_ms;
    kvf_transport_kind_t transport;
} xfer_args_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvferry transfer --role Prefill|Decode --store-url tcp://IP:PORT\n"
            "                        [--src-session-id IP:PORT] [--dst-session-id IP:PORT]\n"
            "                        [--npu-id N] [--log-level 0..3] [--iterations N]\n"
            "                        [--timeout SEC] [--transport auto|tcp|shm]\n\n"
            "The seed's test_transfer_engine.py. The Decode registers a (10, 50, 40, 20, 60)\n"
            "float16 buffer (48,000,000 bytes) and checks every round it receives; the Prefill\n"
            "fills its own buffer with random values and writes the 10 slices into the Decode's.\n"
            "Either side may start first.\n\n"
            "  --role R              Prefill (sender) or Decode (receiver); required\n"
            "  --store-url URL       the config store, tcp://IP:PORT; required. When nothing\n"
            "                        answers there and IP is an address of this host, the\n"
            "                        Prefill starts the store in its own process\n"
            "  --src-session-id ID   this node's session id IP:PORT (port 0 = a free port;\n"
            "                        default: the store's IP with port 0)\n"
            "  --dst-session-id ID   the Decode's session id; required for the Prefill, refused\n"
            "                        for the Decode\n"
            "  --npu-id N            device id (on CPU hosts: NUMA node), default 0\n"
            "  --log-level N         0 debug, 1 info, 2 warn (default), 3 error\n"
            "  --iterations N        rounds to run, then exit 0; 0 (default) runs forever\n"
            "  --timeout SEC         bound on starting up, on each transfer and on each wait for\n"
            "                        the other side, 1..%u, default 30\n"
            "  --transport T         auto (default: shm to a peer on this host, else tcp), tcp,\n"
            "                        or shm (fails when the peer is not reachable by shm)\n\n"
            "Exit status: 0 every round done (and, on the Decode, verified), 1 failure (a\n"
            "message says why), 2 usage error.\n",
            XFER_MAX_TIMEOUT_S);
}

/* ---------------------------------------------------------------------------------------------
 * float16 data: random fill, sums, checksums
 * ------------------------------------------------------------------------------------------- */

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        /* Zero or subnormal: mant * 2^-24, exact in float. */
        float v = (float)mant * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31)
        bits = sign | 0x7f800000u | (mant << 13); /* inf or NaN */
    else
        bits = sign | ((exp - 15u + 127u) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* float -> float16 for values that are exactly representable as normal float16 numbers, or 0. */
static uint16_t float_to_half_exact(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    if ((bits & 0x7fffffffu) == 0)
        return sign;
    uint32_t exp = (bits >> 23) & 0xffu;
    return (uint16_t)(sign | ((exp - 127u + 15u) << 10) | ((bits >> 13) & 0x3ffu));
}

/* Every float16 bit pattern as a float: summing 24 million halves by lookup is several times
 * faster than converting each one. */
static float half_table[65536];
/* The 1024 values (2k + 1)/1024 - 1, k = 0..1023: a uniform grid over (-1, 1), symmetric about
 * 0 (so slice sums stay near 0, like the seed's random tensors) and all exact in float16. */
static uint16_t fill_table[1024];

static void tables_init(void)
{
    for (uint32_t h = 0; h < 65536u; h++)
        half_table[h] = half_to_float((uint16_t)h);
    for (uint32_t k = 0; k < 1024u; k++)
        fill_table[k] = float_to_half_exact((float)(2u * k + 1u) / 1024.0f - 1.0f);
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Fill @n bytes (a multiple of 8, 8-byte aligned) with random finite float16 values. */
static void fill_random_halves(void *buf, size_t n, uint64_t *seed)
{
    uint64_t *w = buf;
    for (size_t i = 0; i < n / 8; i++) {
        uint64_t r = splitmix64(seed);
        w[i] = (uint64_t)fill_table[r & 1023u] | (uint64_t)fill_table[(r >> 16) & 1023u] << 16 |
               (uint64_t)fill_table[(r >> 32) & 1023u] << 32 |
               (uint64_t)fill_table[(r >> 48) & 1023u] << 48;
    }
}

static double sum_halves(const void *buf, size_t n)
{
    const uint16_t *h = buf;
    double sum = 0;
    for (size_t i = 0; i < n / 2; i++)
        sum += half_table[h[i]];
    return sum;
}

/* FNV-1a, 64-bit, fed 8-byte little-endian words instead of single bytes (then the tail bytes):
 * eight times fewer multiplies, and still every bit of every byte changes the result. */
static uint64_t checksum_words(const void *buf, size_t n)
{
    const unsigned char *p = buf;
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, sizeof(w));
        h = (h ^ w) * 0x100000001b3ull;
    }
    for (; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static double ms_since(uint64_t t0_ns)
{
    return (double)(kvf__now_ns() - t0_ns) / 1e6;
}

/* 48,000,000 bytes, page-aligned (64-byte alignment is all the seed's tensor promises) and
 * faulted in now, so that no round pays for first-touch page faults. */
static void *buffer_alloc(void)
{
    void *p = mmap(NULL, XFER_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    memset(p, 0, XFER_BYTES);
    return p;
}

/* ---------------------------------------------------------------------------------------------
 * Arguments
 * ------------------------------------------------------------------------------------------- */

/* Parse and normalise a session id; port 0 allowed only when @allow_port0. */
static int parse_sid(const char *flag, const char *s, bool allow_port0, char *out, size_t len)
{
    kvf_hostport_t hp;
    if (kvf__session_id_parse(s, &hp) < 0) {
        fprintf(stderr, "kvferry " CMD ": %s: %s\n", flag, kvf_last_error());
        return -1;
    }
    if (!allow_port0 && hp.port == 0) {
        fprintf(stderr, "kvferry " CMD ": %s %s: port 0 names no node; give the port the Decode "
                        "printed in \"decode session IP:PORT ready\"\n", flag, s);
        return -1;
    }
    kvf__hostport_format(&hp, out, len);
    return 0;
}

/* Returns 0 to run, or the exit code (0 after --help, 2 after a usage error). */
static int parse_args(int argc, char **argv, xfer_args_t *a, bool *done)
{
    static const struct option opts[] = {
        {"role", required_argument, NULL, 'r'},
        {"src-session-id", required_argument, NULL, 's'},
        {"store-url", required_argument, NULL, 'u'},
        {"npu-id", required_argument, NULL, 'n'},
        {"dst-session-id", required_argument, NULL, 'd'},
        {"log-level", required_argument, NULL, 'v'},
        {"iterations", required_argument, NULL, 'i'},
        {"timeout", required_argument, NULL, 't'},
        {"transport", required_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *role = NULL, *src = NULL, *dst = NULL;
    uint64_t v;
    int c;

    memset(a, 0, sizeof(*a));
    a->timeout_ms = 30000;
    a->transport = KVF_TRANSPORT_AUTO;
    *done = false;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'r':
            role = optarg;
            break;
        case 's':
            src = optarg;
            break;
        case 'u':
            a->store_url = optarg;
            break;
        case 'd':
            dst = optarg;
            break;
        case 'n':
            if (kvf_cli_parse_u64(CMD, "--npu-id", optarg, 0, 65535, &v) < 0)
                return 2;
            a->npu_id = (int)v;
            break;
        case 'v':
            if (kvf_cli_set_log_level(CMD, optarg) < 0)
                return 2;
            break;
        case 'i':
            if (kvf_cli_parse_u64(CMD, "--iterations", optarg, 0, UINT32_MAX, &a->iterations) < 0)
                return 2;
            break;
        case 't':
            if (kvf_cli_parse_u64(CMD, "--timeout", optarg, 1, XFER_MAX_TIMEOUT_S, &v) < 0)
                return 2;
            a->timeout_ms = (uint32_t)v * 1000u;
            break;
        case 'T':
            if (!strcasecmp(optarg, "tcp")) {
                a->transport = KVF_TRANSPORT_TCP;
            } else if (!strcasecmp(optarg, "shm")) {
                a->transport = KVF_TRANSPORT_SHM;
            } else if (!strcasecmp(optarg, "auto")) {
                a->transport = KVF_TRANSPORT_AUTO;
            } else {
                fprintf(stderr, "kvferry " CMD ": --transport %s: want auto, tcp or shm\n",
                        optarg);
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            *done = true;
            return 0;
        default:
            fprintf(stderr, "(see kvferry " CMD " --help)\n");
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "kvferry " CMD ": unexpected argument \"%s\"\n", argv[optind]);
        return 2;
    }
    if (!role) {
        fprintf(stderr, "kvferry " CMD ": --role is required (Prefill or Decode)\n");
        return 2;
    }
    if (kvf_role_parse(role, &a->role) < 0 || a->role == KVF_ROLE_BOTH) {
        fprintf(stderr, "kvferry " CMD ": --role %s: want Prefill or Decode\n", role);
        return 2;
    }
    if (!a->store_url) {
        fprintf(stderr, "kvferry " CMD ": --store-url is required (e.g. tcp://127.0.0.1:8000)\n");
        return 2;
    }
    if (kvf__store_url_parse(a->store_url, 0, &a->store) < 0) {
        fprintf(stderr, "kvferry " CMD ": --store-url: %s\n", kvf_last_error());
        return 2;
    }
    if (src) {
        if (parse_sid("--src-session-id", src, true, a->src_sid, sizeof(a->src_sid)) < 0)
            return 2;
    } else {
        /* The seed leaves it optional; the store's address is the one address this node is
         * known to share a network with. */
        kvf_hostport_t hp = a->store.hosts[0];
        hp.port = 0;
        kvf__hostport_format(&hp, a->src_sid, sizeof(a->src_sid));
    }
    if (a->role == KVF_ROLE_DECODE && dst) {
        fprintf(stderr, "kvferry " CMD ": --dst-session-id is for the Prefill; a Decode waits "
                        "to be written to\n");
        return 2;
    }
    if (a->role == KVF_ROLE_PREFILL) {
        if (!dst) {
            fprintf(stderr, "kvferry " CMD ": the Prefill needs --dst-session-id IP:PORT, the "
                            "Decode's session id\n");
            return 2;
        }
        if (parse_sid("--dst-session-id", dst, false, a->dst_sid, sizeof(a->dst_sid)) < 0)
            return 2;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The config store
 * ------------------------------------------------------------------------------------------- */

static bool sockaddr_is_local(const struct sockaddr *sa, const struct ifaddrs *ifs)
{
    if (sa->sa_family == AF_INET) {
        const struct in_addr *a = &((const struct sockaddr_in *)sa)->sin_addr;
        if ((ntohl(a->s_addr) >> 24) == 127)
            return true;
        for (const struct ifaddrs *i = ifs; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET &&
                ((const struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr == a->s_addr)
                return true;
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a))
            return true;
        for (const struct ifaddrs *i = ifs; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET6 &&
                !memcmp(&((const struct sockaddr_in6 *)i->ifa_addr)->sin6_addr, a, sizeof(*a)))
                return true;
    }
    return false;
}

/* Is @host (an address or a name) one of this host's addresses? Only then may the Prefill serve
 * the store itself: a store URL naming another machine must be served there. */
static bool host_is_local(const kvf_hostport_t *host)
{
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (host->kind != KVF_HOST_NAME)
        hints.ai_flags = AI_NUMERICHOST;
    if (getaddrinfo(host->host, NULL, &hints, &res) != 0)
        return false;
    struct ifaddrs *ifs = NULL;
    getifaddrs(&ifs); /* on failure only loopback counts as local */
    bool local = false;
    for (struct addrinfo *ai = res; ai && !local; ai = ai->ai_next)
        local = sockaddr_is_local(ai->ai_addr, ifs);
    if (ifs)
        freeifaddrs(ifs);
    freeaddrinfo(res);
    return local;
}

static void store_opts(const xfer_args_t *a, uint32_t connect_ms, kvf_store_opts_t *o)
{
    kvf_store_opts_init(o);
    o->connect_timeout_ms = connect_ms;
    if (o->request_timeout_ms > a->timeout_ms)
        o->request_timeout_ms = a->timeout_ms;
}

/*
 * Connect to the store. A Prefill that finds nothing at a local --store-url serves the store
 * itself, as the seed's Prefill does with create_config_store(); *@srv receives that server.
 * Anyone else waits up to --timeout for the store, saying so.
 * Returns 0 or an exit code.
 */
static int store_connect(const xfer_args_t *a, kvf_store_t **st, kvf_store_server_t **srv)
{
    kvf_store_opts_t o;
    int rc;

    *srv = NULL;
    store_opts(a, 0, &o);
    rc = kvf_store_open(a->store_url, &o, st);
    if (rc == 0)
        return 0;
    if (rc != -KVF_ESTOREDOWN) {
        /* Not a store that is merely down (an unsupported scheme, say): waiting cannot help. */
        kvf_cli_fail(CMD, rc, "cannot use the config store at %s", a->store_url);
        return 1;
    }
    if (a->role == KVF_ROLE_PREFILL && a->store.scheme == KVF_STORE_SCHEME_TCP &&
        host_is_local(&a->store.hosts[0])) {
        rc = kvf_store_server_start(a->store_url, srv);
        if (rc == 0) {
            printf("no config store answered at %s; serving it in this process (the seed's "
                   "create_config_store)\n", kvf_store_server_url(*srv));
        } else if (rc != -EADDRINUSE) {
            kvf_cli_fail(CMD, rc, "no config store answers at %s and one cannot be started there",
                         a->store_url);
            return 1;
        }
        /* EADDRINUSE: another process started a store there just now; use it. */
    } else {
        printf("waiting up to %u s for the config store at %s\n", a->timeout_ms / 1000u,
               a->store_url);
    }
    store_opts(a, a->timeout_ms, &o);
    rc = kvf_store_open(a->store_url, &o, st);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "cannot reach the config store at %s within %u s", a->store_url,
                     a->timeout_ms / 1000u);
        kvf_store_server_stop(*srv);
        *srv = NULL;
        return 1;
    }
    return 0;
}

static void transfer_key(char *buf, size_t len, const char *decode_sid, const char *leaf)
{
    snprintf(buf, len, "kvferry/v1/default/transfer/%s/%s", decode_sid, leaf);
}

/* Delete @key; absent is fine. */
static int store_del_quiet(kvf_store_t *st, const char *key)
{
    int rc = kvf_store_del(st, key);
    return rc == -KVF_ENOTFOUND ? 0 : rc;
}

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    const char *key;
    bool gone;
} key_gone_t;

static void on_key_event(void *arg, kvf_store_event_type_t type, const kvf_store_kv_t *kv)
{
    key_gone_t *w = arg;
    /* A prefix watch: "sessions/127.0.0.1:4000" also matches "sessions/127.0.0.1:40001". */
    if (type != KVF_STORE_EVENT_DELETE || strcmp(kv->key, w->key) != 0)
        return;
    pthread_mutex_lock(&w->lock);
    w->gone = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* Wait up to @ms for @key to be deleted. Best effort: used only to let the Decode withdraw its
 * records before the store hosted by this Prefill goes away. */
static void wait_key_gone(kvf_store_t *st, const char *key, uint32_t ms)
{
    key_gone_t w = {.key = key};
    uint64_t id;
    void *val;
    size_t len;

    pthread_mutex_init(&w.lock, NULL);
    kvf__cond_init_monotonic(&w.cond);
    if (kvf_store_watch(st, key, on_key_event, &w, &id) == 0) {
        /* Watch first, then look: a delete between the two is not missed. */
        if (kvf_store_get(st, key, 0, &val, &len) == 0) {
            free(val);
            struct timespec ts;
            kvf__deadline_ts(&ts, kvf__now_ms() + ms);
            pthread_mutex_lock(&w.lock);
            while (!w.gone && pthread_cond_timedwait(&w.cond, &w.lock, &ts) == 0)
                ;
            pthread_mutex_unlock(&w.lock);
        }
        kvf_store_unwatch(st, id);
    }
    pthread_cond_destroy(&w.cond);
    pthread_mutex_destroy(&w.lock);
}

/* ---------------------------------------------------------------------------------------------
 * Decode
 * ------------------------------------------------------------------------------------------- */

/* Parse a round record. Returns 0 or -1 with a message in @err. Store values are input from
 * another process: every field is checked. */
static int parse_round(const char *val, size_t len, uint64_t *round, uint64_t sums[XFER_SLICES],
                       char *prefill, size_t prefill_len, char *err, size_t errlen)
{
    json_error_t je;
    json_t *root = json_loadb(val, len, 0, &je);
    int rc = -1;
    if (!root) {
        snprintf(err, errlen, "not JSON: %.100s", je.text);
        return -1;
    }
    json_t *r = json_object_get(root, "round");
    json_t *bytes = json_object_get(root, "bytes");
    json_t *slices = json_object_get(root, "slices");
    json_t *hash = json_object_get(root, "hash");
    json_t *sums_j = json_object_get(root, "checksums");
    json_t *from = json_object_get(root, "prefill");
    if (!json_is_integer(r) || json_integer_value(r) < 1) {
        snprintf(err, errlen, "\"round\" is not a positive integer");
        goto out;
    }
    if (!json_is_integer(bytes) || json_integer_value(bytes) != (json_int_t)XFER_BYTES ||
        !json_is_integer(slices) || json_integer_value(slices) != (json_int_t)XFER_SLICES) {
        snprintf(err, errlen, "want \"bytes\": %zu and \"slices\": %u", XFER_BYTES, XFER_SLICES);
        goto out;
    }
    if (!json_is_string(hash) || strcmp(json_string_value(hash), XFER_HASH_NAME) != 0) {
        snprintf(err, errlen, "want \"hash\": \"%s\"", XFER_HASH_NAME);
        goto out;
    }
    if (!json_is_array(sums_j) || json_array_size(sums_j) != XFER_SLICES) {
        snprintf(err, errlen, "\"checksums\" is not an array of %u", XFER_SLICES);
        goto out;
    }
    for (size_t i = 0; i < XFER_SLICES; i++) {
        const char *s = json_string_value(json_array_get(sums_j, i));
        if (!s || strlen(s) != 16 || strspn(s, "0123456789abcdef") != 16) {
            snprintf(err, errlen, "checksum %zu is not 16 lowercase hex digits", i);
            goto out;
        }
        sums[i] = strtoull(s, NULL, 16);
    }
    snprintf(prefill, prefill_len, "%s", json_is_string(from) ? json_string_value(from) : "?");
    *round = (uint64_t)json_integer_value(r);
    rc = 0;
out:
    json_decref(root);
    return rc;
}

/* Wait for the next round record. Returns 0, or an exit code. */
static int decode_wait_round(const xfer_args_t *a, kvf_store_t *st, const char *key, void **val,
                             size_t *len)
{
    for (;;) {
        int rc = kvf_store_get(st, key, a->timeout_ms, val, len);
        if (rc == 0)
            return 0;
        /* Forever mode (--iterations 0) waits for a Prefill as long as it takes, like the seed. */
        if (rc == -KVF_ETIMEDOUT && a->iterations == 0)
            continue;
        if (rc == -KVF_ETIMEDOUT)
            fprintf(stderr, "kvferry " CMD ": no Prefill wrote to this Decode within %u s "
                            "(waited for %s)\n", a->timeout_ms / 1000u, key);
        else
            kvf_cli_fail(CMD, rc, "waiting for the Prefill's round record %s", key);
        return 1;
    }
}

static int run_decode(const xfer_args_t *a, kvf_engine_t *e, kvf_store_t *st, const char *sid)
{
    char round_key[XFER_KEY_MAX], ack_key[XFER_KEY_MAX];
    int code = 1, rc;

    transfer_key(round_key, sizeof(round_key), sid, "round");
    transfer_key(ack_key, sizeof(ack_key), sid, "ack");
    /* A record left by an earlier Decode with this session id must not pass for a new round.
     * Deleted before registering: no Prefill can write, so none can publish, before that. */
    if ((rc = store_del_quiet(st, round_key)) < 0 || (rc = store_del_quiet(st, ack_key)) < 0) {
        kvf_cli_fail(CMD, rc, "clearing %s", round_key);
        return 1;
    }

    void *buf = buffer_alloc();
    if (!buf) {
        fprintf(stderr, "kvferry " CMD ": cannot allocate %zu bytes: %s\n", XFER_BYTES,
                strerror(errno));
        return 1;
    }
    rc = kvf_mem_register(e, buf, XFER_BYTES);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "register %zu bytes at %p", XFER_BYTES, buf);
        goto out_unmap;
    }
    printf("register success: %zu bytes at %p, %u slices of %u bytes (float16 (10, 50, 40, 20, "
           "60))\n", XFER_BYTES, buf, XFER_SLICES, XFER_SLICE_BYTES);
    printf(KVF_CLI_DECODE_READY_FMT "\n", sid);

    for (uint64_t done = 0; a->iterations == 0 || done < a->iterations;) {
        void *val;
        size_t len;
        uint64_t round, want[XFER_SLICES];
        char from[XFER_SID_MAX], err[160];

        if (decode_wait_round(a, st, round_key, &val, &len) != 0)
            goto out_unregister;
        rc = parse_round(val, len, &round, want, from, sizeof(from), err, sizeof(err));
        free(val);
        if (rc < 0) {
            fprintf(stderr, "kvferry " CMD ": bad round record at %s: %s\n", round_key, err);
            goto out_unregister;
        }
        printf("round %" PRIu64 ": %zu bytes from %s\n", round, XFER_BYTES, from);
        bool ok = true;
        for (unsigned i = 0; i < XFER_SLICES; i++) {
            const char *slice = (const char *)buf + (size_t)i * XFER_SLICE_BYTES;
            printf("get buffer success %u, sum=%.4f\n", i, sum_halves(slice, XFER_SLICE_BYTES));
            uint64_t got = checksum_words(slice, XFER_SLICE_BYTES);
            if (got != want[i]) {
                fprintf(stderr, "kvferry " CMD ": round %" PRIu64 ": slice %u (bytes %zu..%zu) "
                                "differs from what the Prefill sent: checksum %016" PRIx64
                                ", want %016" PRIx64 "\n", round, i,
                        (size_t)i * XFER_SLICE_BYTES, (size_t)(i + 1) * XFER_SLICE_BYTES - 1,
                        got, want[i]);
                ok = false;
            }
        }
        if (!ok)
            goto out_unregister;
        done++;
        printf(KVF_CLI_DECODE_VERIFIED_FMT "\n", round, XFER_SLICES, XFER_BYTES);

        /* Round record first, then the ack: the Prefill publishes its next round only after
         * the ack, so that record cannot be the one deleted here. */
        char ack[24];
        snprintf(ack, sizeof(ack), "%" PRIu64, round);
        if ((rc = kvf_store_del(st, round_key)) < 0 ||
            (rc = kvf_store_set(st, ack_key, ack, strlen(ack), 0)) < 0) {
            kvf_cli_fail(CMD, rc, "acknowledging round %" PRIu64 " at %s", round, ack_key);
            goto out_unregister;
        }
    }
    printf("decode done: %" PRIu64 " rounds verified\n", a->iterations);
    code = 0;
out_unregister:
    rc = kvf_mem_unregister(e, buf);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "unregister %p", buf);
        code = 1;
    }
out_unmap:
    munmap(buf, XFER_BYTES);
    return code;
}

/* ---------------------------------------------------------------------------------------------
 * Prefill
 * ------------------------------------------------------------------------------------------- */

/*
 * Find the Decode's 48,000,000-byte buffer among its published regions. kvf_peer_regions()
 * waits for the Decode's session to appear; its buffer follows within milliseconds (the Decode
 * registers right after it starts), which is the only gap the short retries below cover.
 */
static int find_decode_buffer(const xfer_args_t *a, kvf_engine_t *e, uint64_t *addr)
{
    uint64_t deadline = kvf__now_ms() + a->timeout_ms;
    unsigned backoff_ms = 1;
    for (;;) {
        kvf_region_info_t *regs;
        size_t n;
        int rc = kvf_peer_regions(e, a->dst_sid, &regs, &n);
        if (rc < 0) {
            kvf_cli_fail(CMD, rc, "Decode %s (--dst-session-id) did not appear in the store "
                                  "within %u s", a->dst_sid, a->timeout_ms / 1000u);
            return 1;
        }
        /* The exact size first, else any region large enough. */
        bool found = false;
        for (size_t i = 0; i < n && !found; i++)
            if (regs[i].len == XFER_BYTES)
                *addr = regs[i].addr, found = true;
        for (size_t i = 0; i < n && !found; i++)
            if (regs[i].len > XFER_BYTES)
                *addr = regs[i].addr, found = true;
        free(regs);
        if (found)
            return 0;
        if (kvf__now_ms() >= deadline) {
            fprintf(stderr, "kvferry " CMD ": Decode %s has registered no region of %zu bytes "
                            "within %u s (%zu regions)\n", a->dst_sid, XFER_BYTES,
                    a->timeout_ms / 1000u, n);
            return 1;
        }
        struct timespec ts = {0, (long)backoff_ms * 1000000L};
        nanosleep(&ts, NULL);
        if (backoff_ms < 50)
            backoff_ms *= 2;
    }
}

static int publish_round(kvf_store_t *st, const char *key, const char *sid, uint64_t round,
                         const uint64_t sums[XFER_SLICES])
{
    json_t *arr = json_array();
    for (unsigned i = 0; i < XFER_SLICES; i++) {
        char hex[17];
        snprintf(hex, sizeof(hex), "%016" PRIx64, sums[i]);
        json_array_append_new(arr, json_string(hex));
    }
    json_t *root = json_pack("{s:I, s:s, s:I, s:I, s:s, s:o}", "round", (json_int_t)round,
                             "prefill", sid, "bytes", (json_int_t)XFER_BYTES, "slices",
                             (json_int_t)XFER_SLICES, "hash", XFER_HASH_NAME, "checksums", arr);
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!text)
        return -KVF_ENOMEM;
    int rc = kvf_store_set(st, key, text, strlen(text), 0);
    free(text);
    return rc;
}

/* Wait for the Decode's ack of @round. Returns 0 or an exit code. */
static int prefill_wait_ack(const xfer_args_t *a, kvf_store_t *st, const char *key,
                            uint64_t round)
{
    void *val;
    size_t len;
    int rc = kvf_store_get(st, key, a->timeout_ms, &val, &len);
    if (rc == -KVF_ETIMEDOUT) {
        fprintf(stderr, "kvferry " CMD ": Decode %s did not confirm round %" PRIu64 " within %u s "
                        "(waited for %s)\n", a->dst_sid, round, a->timeout_ms / 1000u, key);
        return 1;
    }
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "waiting for the Decode's ack at %s", key);
        return 1;
    }
    char want[24];
    snprintf(want, sizeof(want), "%" PRIu64, round);
    bool ok = len == strlen(want) && !memcmp(val, want, len);
    if (!ok)
        fprintf(stderr, "kvferry " CMD ": Decode %s acknowledged \"%.*s\", want round %s\n",
                a->dst_sid, (int)(len > 32 ? 32 : len), (const char *)val, want);
    free(val);
    return ok ? 0 : 1;
}

static int run_prefill(const xfer_args_t *a, kvf_engine_t *e, kvf_store_t *st, const char *sid)
{
    char round_key[XFER_KEY_MAX], ack_key[XFER_KEY_MAX];
    uint64_t seed, remote;
    int code = 1, rc;

    transfer_key(round_key, sizeof(round_key), a->dst_sid, "round");
    transfer_key(ack_key, sizeof(ack_key), a->dst_sid, "ack");
    if (getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed))
        seed = kvf__now_ns() ^ ((uint64_t)getpid() << 32);

    void *buf = buffer_alloc();
    if (!buf) {
        fprintf(stderr, "kvferry " CMD ": cannot allocate %zu bytes: %s\n", XFER_BYTES,
                strerror(errno));
        return 1;
    }
    /* Registered like the seed's Prefill does; the engine also needs no more for a write. */
    rc = kvf_mem_register(e, buf, XFER_BYTES);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "register %zu bytes at %p", XFER_BYTES, buf);
        goto out_unmap;
    }
    printf("register success: %zu bytes at %p\n", XFER_BYTES, buf);
    printf(KVF_CLI_PREFILL_READY_FMT "\n", sid);

    if (find_decode_buffer(a, e, &remote) != 0)
        goto out_unregister;
    printf("decode %s: buffer of %zu bytes at 0x%" PRIx64 "\n", a->dst_sid, XFER_BYTES, remote);

    uint64_t total_bytes = 0;
    double total_ms = 0;
    for (uint64_t round = 1; a->iterations == 0 || round <= a->iterations; round++) {
        uint64_t sums[XFER_SLICES];
        kvf_xfer_t x[XFER_SLICES];

        fill_random_halves(buf, XFER_BYTES, &seed);
        for (unsigned i = 0; i < XFER_SLICES; i++) {
            size_t off = (size_t)i * XFER_SLICE_BYTES;
            sums[i] = checksum_words((char *)buf + off, XFER_SLICE_BYTES);
            x[i] = (kvf_xfer_t){.op = KVF_OP_WRITE,
                                .local = (char *)buf + off,
                                .remote = remote + off,
                                .len = XFER_SLICE_BYTES};
        }
        uint64_t t0 = kvf__now_ns();
        rc = kvf_transfer_sync(e, a->dst_sid, x, XFER_SLICES);
        double ms = ms_since(t0);
        if (rc < 0) {
            kvf_cli_fail(CMD, rc, "round %" PRIu64 ": write to %s", round, a->dst_sid);
            goto out_unregister;
        }
        const char *via;
        if (round == 1 && kvf_engine_peer_transport(e, a->dst_sid, &via) == 0)
            printf("transport to %s: %s\n", a->dst_sid, via);
        for (unsigned i = 0; i < XFER_SLICES; i++)
            printf("set buffer success %u, sum=%.4f\n", i,
                   sum_halves((char *)buf + (size_t)i * XFER_SLICE_BYTES, XFER_SLICE_BYTES));
        printf(KVF_CLI_PREFILL_ROUND_FMT "\n", round, XFER_BYTES, ms,
               (double)XFER_BYTES / (ms * 1e6));
        total_bytes += XFER_BYTES;
        total_ms += ms;

        /* The previous ack goes before this round is announced, so the wait below cannot be
         * answered by it. */
        if ((rc = store_del_quiet(st, ack_key)) < 0 ||
            (rc = publish_round(st, round_key, sid, round, sums)) < 0) {
            kvf_cli_fail(CMD, rc, "publishing round %" PRIu64 " at %s", round, round_key);
            goto out_unregister;
        }
        if (prefill_wait_ack(a, st, ack_key, round) != 0)
            goto out_unregister;
    }
    printf("prefill done: %" PRIu64 " rounds, %" PRIu64 " bytes in %.3f ms, %.2f GB/s\n",
           a->iterations, total_bytes, total_ms,
           total_ms > 0 ? (double)total_bytes / (total_ms * 1e6) : 0.0);
    code = 0;
out_unregister:
    rc = kvf_mem_unregister(e, buf);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "unregister %p", buf);
        code = 1;
    }
out_unmap:
    munmap(buf, XFER_BYTES);
    return code;
}

int kvf_cli_transfer(int argc, char **argv)
{
    xfer_args_t a;
    bool done;
    int code = parse_args(argc, argv, &a, &done);
    if (code != 0 || done)
        return code;

    /* Line-buffered even into a pipe: `kvferry demo` and the tests wait for these lines. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    tables_init();

    kvf_store_t *st;
    kvf_store_server_t *srv;
    code = store_connect(&a, &st, &srv);
    if (code != 0)
        return code;

    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.init_timeout_ms = a.timeout_ms;
    cfg.op_timeout_ms = a.timeout_ms;
    cfg.transport = a.transport;
    kvf_engine_t *e;
    int rc = kvf_engine_create(a.store_url, a.src_sid, a.role, a.npu_id, &cfg, &e);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "cannot start the %s engine as %s", kvf_role_name(a.role), a.src_sid);
        code = 1;
        goto out_store;
    }
    /* The engine's own spelling of its id, with the chosen port: the Prefill names it and the
     * store keys below are built from it. */
    char sid[XFER_SID_MAX];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(e));

    code = a.role == KVF_ROLE_DECODE ? run_decode(&a, e, st, sid) : run_prefill(&a, e, st, sid);

    kvf_engine_destroy(e);
out_store:
    if (srv && a.role == KVF_ROLE_PREFILL && code == 0) {
        /* This process hosts the store: give the Decode the moment it needs to withdraw its
         * records, rather than cutting the store away under its shutdown. */
        char key[XFER_KEY_MAX];
        snprintf(key, sizeof(key), "kvferry/v1/default/sessions/%s", a.dst_sid);
        wait_key_gone(st, key, XFER_STORE_LINGER_MS);
    }
    kvf_store_close(st);
    kvf_store_server_stop(srv);
    return code;
}
