/*
 * `kvferry transfer`: the seed's test_transfer_engine.py as a C tool, with the seed's flags.
 *
 * A Decode node registers a buffer shaped like the seed's tensor, (10, 50, 40, 20, 60) float16 =
 * 48,000,000 bytes, and waits. A Prefill node fills its own buffer with random float16 values and
 * writes it, slice by slice, into the Decode's registered buffer, whose address it learns from
 * the Decode's published regions (on CPU hosts the seed's "same virtual address on both sides"
 * assumption does not hold). The config store only introduces the two; rounds are coordinated
 * with notifications (kvf_notify_*), which the engine delivers only after every byte of their
 * batch is in the target's memory, so nobody polls:
 *
 *   Prefill -> Decode, one per slice, carried by the batch that writes that slice:
 *       {"round": r, "slice": i, "slices": 10, "bytes": 4800000, "hash": "fnv1a64w",
 *        "checksum": "<16 hex digits>"}
 *     The Decode sums and checks slice i the moment this arrives.
 *   Decode -> Prefill, once it has checked all 10 slices of round r:  {"ack": r}
 *     The Prefill overwrites the Decode's buffer with round r + 1 only after it.
 *
 * Notifications from one engine to one peer arrive in the order their batches were submitted,
 * so the Decode sees slices 0..9 of a round in order; a batch that fails, or whose sender dies
 * part way, never notifies.
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
#include "common/thread.h"
#include "common/url.h"
#include "kvferry.h"

#define CMD "transfer"

/* The seed's tensor: shape (10, 50, 40, 20, 60), float16. */
#define XFER_SLICES 10u
#define XFER_SLICE_ELEMS (50u * 40u * 20u * 60u)
#define XFER_SLICE_BYTES (XFER_SLICE_ELEMS * 2u)
#define XFER_BYTES ((size_t)XFER_SLICES * XFER_SLICE_BYTES)

#define XFER_KEY_MAX (KVF_SESSION_ID_MAX + 64)
#define XFER_MAX_TIMEOUT_S 3600u /* an hour, the longest wait the store allows */
#define XFER_HASH_NAME "fnv1a64w"
/* Bound on the Prefill's wait for the Decode's engine to withdraw its records before the store
 * this process hosts goes away with it. */
#define XFER_STORE_LINGER_MS 3000u

typedef struct {
    kvf_role_t role;
    const char *store_url;
    kvf_store_url_t store;
    char src_sid[KVF_SESSION_ID_MAX];
    char dst_sid[KVF_SESSION_ID_MAX]; /* "" for the Decode */
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
            if (kvf_cli_parse_transport(CMD, optarg, &a->transport) < 0)
                return 2;
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
 * Notifications: the slice announcement and the round acknowledgement
 * ------------------------------------------------------------------------------------------- */

/* A slice notification, parsed. */
typedef struct {
    uint64_t round;
    unsigned slice;
    uint64_t checksum;
} slice_note_t;

static int format_slice_note(char *buf, size_t len, uint64_t round, unsigned slice,
                             uint64_t checksum)
{
    return snprintf(buf, len,
                    "{\"round\":%" PRIu64 ",\"slice\":%u,\"slices\":%u,\"bytes\":%u,"
                    "\"hash\":\"" XFER_HASH_NAME "\",\"checksum\":\"%016" PRIx64 "\"}",
                    round, slice, XFER_SLICES, XFER_SLICE_BYTES, checksum);
}

/* Parse a slice notification. Returns 0 or -1 with a message in @err. Notifications are input
 * from another process: every field is checked. */
static int parse_slice_note(const unsigned char *msg, size_t len, slice_note_t *s, char *err,
                            size_t errlen)
{
    json_error_t je;
    json_t *root = json_loadb((const char *)msg, len, 0, &je);
    int rc = -1;
    if (!root) {
        snprintf(err, errlen, "not JSON: %.100s", je.text);
        return -1;
    }
    json_t *r = json_object_get(root, "round");
    json_t *slice = json_object_get(root, "slice");
    json_t *slices = json_object_get(root, "slices");
    json_t *bytes = json_object_get(root, "bytes");
    json_t *hash = json_object_get(root, "hash");
    json_t *sum = json_object_get(root, "checksum");
    if (!json_is_integer(r) || json_integer_value(r) < 1) {
        snprintf(err, errlen, "\"round\" is not a positive integer");
        goto out;
    }
    if (!json_is_integer(slice) || json_integer_value(slice) < 0 ||
        json_integer_value(slice) >= (json_int_t)XFER_SLICES) {
        snprintf(err, errlen, "\"slice\" is not an integer in 0..%u", XFER_SLICES - 1);
        goto out;
    }
    if (!json_is_integer(bytes) || json_integer_value(bytes) != (json_int_t)XFER_SLICE_BYTES ||
        !json_is_integer(slices) || json_integer_value(slices) != (json_int_t)XFER_SLICES) {
        snprintf(err, errlen, "want \"bytes\": %u and \"slices\": %u", XFER_SLICE_BYTES,
                 XFER_SLICES);
        goto out;
    }
    if (!json_is_string(hash) || strcmp(json_string_value(hash), XFER_HASH_NAME) != 0) {
        snprintf(err, errlen, "want \"hash\": \"%s\"", XFER_HASH_NAME);
        goto out;
    }
    const char *hex = json_string_value(sum);
    if (!hex || strlen(hex) != 16 || strspn(hex, "0123456789abcdef") != 16) {
        snprintf(err, errlen, "\"checksum\" is not 16 lowercase hex digits");
        goto out;
    }
    s->round = (uint64_t)json_integer_value(r);
    s->slice = (unsigned)json_integer_value(slice);
    s->checksum = strtoull(hex, NULL, 16);
    rc = 0;
out:
    json_decref(root);
    return rc;
}

/* Parse an acknowledgement {"ack": r}. Returns 0 or -1. */
static int parse_ack(const unsigned char *msg, size_t len, uint64_t *round)
{
    json_t *root = json_loadb((const char *)msg, len, 0, NULL);
    json_t *r = json_object_get(root, "ack");
    int rc = -1;
    if (json_is_integer(r) && json_integer_value(r) >= 1) {
        *round = (uint64_t)json_integer_value(r);
        rc = 0;
    }
    json_decref(root);
    return rc;
}

/* The first @max bytes of a notification, for a message: printable ASCII, others as '.'. */
static const char *note_excerpt(const kvf_notify_t *n, char *buf, size_t max)
{
    size_t k = n->len < max - 1 ? n->len : max - 1;
    for (size_t i = 0; i < k; i++)
        buf[i] = n->msg[i] >= 0x20 && n->msg[i] < 0x7f ? (char)n->msg[i] : '.';
    buf[k] = '\0';
    return buf;
}

/* ---------------------------------------------------------------------------------------------
 * Decode
 * ------------------------------------------------------------------------------------------- */

/*
 * Wait for the next notification. In forever mode (--iterations 0) the Decode waits for a
 * Prefill as long as it takes, like the seed; within a round, or with --iterations, a silence
 * longer than --timeout is an error. Returns 0 or an exit code.
 */
static int decode_wait_note(const xfer_args_t *a, kvf_engine_t *e, kvf_notify_t *note,
                            uint64_t round, unsigned next, const char *from)
{
    for (;;) {
        int n = kvf_notify_wait(e, note, 1, (int)a->timeout_ms);
        if (n == 1)
            return 0;
        if (n < 0) {
            kvf_cli_fail(CMD, n, "waiting for the Prefill's notifications");
            return 1;
        }
        if (next == 0 && a->iterations == 0)
            continue;
        if (next == 0)
            fprintf(stderr, "kvferry " CMD ": no Prefill wrote to this Decode within %u s\n",
                    a->timeout_ms / 1000u);
        else
            fprintf(stderr, "kvferry " CMD ": round %" PRIu64 ": slice %u from %s did not "
                            "arrive within %u s\n", round, next, from, a->timeout_ms / 1000u);
        return 1;
    }
}

static int run_decode(const xfer_args_t *a, kvf_engine_t *e, const char *sid)
{
    int code = 1, rc;

    void *buf = buffer_alloc();
    kvf_notify_t *note = malloc(sizeof(*note));
    if (!buf || !note) {
        fprintf(stderr, "kvferry " CMD ": cannot allocate %zu bytes: %s\n", XFER_BYTES,
                strerror(errno));
        goto out_free;
    }
    rc = kvf_mem_register(e, buf, XFER_BYTES);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "register %zu bytes at %p", XFER_BYTES, buf);
        goto out_free;
    }
    printf("register success: %zu bytes at %p, %u slices of %u bytes (float16 (10, 50, 40, 20, "
           "60))\n", XFER_BYTES, buf, XFER_SLICES, XFER_SLICE_BYTES);
    printf(KVF_CLI_DECODE_READY_FMT "\n", sid);

    /* Each slice is checked the moment its notification arrives: the engine delivers it only
     * once every byte of that slice is in this buffer, and the Prefill writes the next round
     * only after this Decode's acknowledgement. */
    char from[KVF_SESSION_ID_MAX] = "";
    uint64_t round = 0;
    unsigned next = 0; /* the slice expected next; 0 between rounds */
    for (uint64_t done = 0; a->iterations == 0 || done < a->iterations;) {
        slice_note_t s;
        char err[160], excerpt[64];

        if (decode_wait_note(a, e, note, round, next, from) != 0)
            goto out_unregister;
        if (parse_slice_note(note->msg, note->len, &s, err, sizeof(err)) < 0) {
            fprintf(stderr, "kvferry " CMD ": bad slice notification from %s (\"%s\"): %s\n",
                    note->sender, note_excerpt(note, excerpt, sizeof(excerpt)), err);
            goto out_unregister;
        }
        if (s.slice == 0) {
            /* A new round; one left incomplete means its Prefill went away (a batch that
             * fails never notifies), and a restarted one begins again. */
            if (next != 0)
                fprintf(stderr, "kvferry " CMD ": round %" PRIu64 " from %s stopped after %u of "
                                "%u slices; round %" PRIu64 " from %s begins\n", round, from,
                        next, XFER_SLICES, s.round, note->sender);
            round = s.round;
            snprintf(from, sizeof(from), "%s", note->sender);
            printf("round %" PRIu64 ": %zu bytes from %s\n", round, XFER_BYTES, from);
        } else if (s.slice != next || s.round != round || strcmp(note->sender, from) != 0) {
            fprintf(stderr, "kvferry " CMD ": slice %u of round %" PRIu64 " from %s arrived, "
                            "want slice %u of round %" PRIu64 " from %s\n", s.slice, s.round,
                    note->sender, next, round, from);
            goto out_unregister;
        }
        const char *slice = (const char *)buf + (size_t)s.slice * XFER_SLICE_BYTES;
        printf("get buffer success %u, sum=%.4f\n", s.slice, sum_halves(slice, XFER_SLICE_BYTES));
        uint64_t got = checksum_words(slice, XFER_SLICE_BYTES);
        if (got != s.checksum) {
            fprintf(stderr, "kvferry " CMD ": round %" PRIu64 ": slice %u (bytes %zu..%zu) "
                            "differs from what the Prefill sent: checksum %016" PRIx64
                            ", want %016" PRIx64 "\n", round, s.slice,
                    (size_t)s.slice * XFER_SLICE_BYTES,
                    (size_t)(s.slice + 1) * XFER_SLICE_BYTES - 1, got, s.checksum);
            goto out_unregister;
        }
        if (++next < XFER_SLICES)
            continue;
        next = 0;
        done++;
        printf(KVF_CLI_DECODE_VERIFIED_FMT "\n", round, XFER_SLICES, XFER_BYTES);

        char ack[48];
        int len = snprintf(ack, sizeof(ack), "{\"ack\":%" PRIu64 "}", round);
        rc = kvf_notify_send(e, from, ack, (size_t)len);
        if (rc < 0) {
            kvf_cli_fail(CMD, rc, "acknowledging round %" PRIu64 " to %s", round, from);
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
out_free:
    free(note);
    if (buf)
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

/* Wait for the Decode's acknowledgement of @round. Returns 0 or an exit code. */
static int prefill_wait_ack(const xfer_args_t *a, kvf_engine_t *e, kvf_notify_t *note,
                            uint64_t round)
{
    uint64_t deadline = kvf__now_ms() + a->timeout_ms;
    for (;;) {
        uint64_t now = kvf__now_ms();
        int n = now < deadline ? kvf_notify_wait(e, note, 1, (int)(deadline - now)) : 0;
        if (n < 0) {
            kvf_cli_fail(CMD, n, "waiting for Decode %s to confirm round %" PRIu64, a->dst_sid,
                         round);
            return 1;
        }
        if (n == 0) {
            fprintf(stderr, "kvferry " CMD ": Decode %s did not confirm round %" PRIu64
                            " within %u s\n", a->dst_sid, round, a->timeout_ms / 1000u);
            return 1;
        }
        uint64_t acked;
        char excerpt[64];
        if (parse_ack(note->msg, note->len, &acked) < 0) {
            /* Not the Decode's: nothing else is expected here, but nothing else should stop
             * the transfer either. */
            fprintf(stderr, "kvferry " CMD ": ignoring notification \"%s\" from %s\n",
                    note_excerpt(note, excerpt, sizeof(excerpt)), note->sender);
            continue;
        }
        if (acked != round) {
            fprintf(stderr, "kvferry " CMD ": Decode %s acknowledged round %" PRIu64
                            ", want round %" PRIu64 "\n", note->sender, acked, round);
            return 1;
        }
        return 0;
    }
}

/* Cancel (if still running) and free @n batches. */
static void batches_free(kvf_batch_t **b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kvf_batch_free(b[i]);
}

/*
 * Write one round: each slice is its own batch carrying that slice's notification, so the
 * Decode can check slice i while later ones are still on their way. All ten are submitted at
 * once and run on the engine's async threads; notifications keep submission order. Returns 0,
 * or an exit code after a message.
 */
static int prefill_write_round(const xfer_args_t *a, kvf_engine_t *e, void *buf, uint64_t remote,
                               uint64_t round, const uint64_t *sums)
{
    kvf_batch_t *b[XFER_SLICES];
    size_t nb = 0;
    int rc;

    for (unsigned i = 0; i < XFER_SLICES; i++) {
        size_t off = (size_t)i * XFER_SLICE_BYTES;
        kvf_xfer_t x = {.op = KVF_OP_WRITE,
                        .local = (char *)buf + off,
                        .remote = remote + off,
                        .len = XFER_SLICE_BYTES};
        char msg[256];
        int len = format_slice_note(msg, sizeof(msg), round, i, sums[i]);
        rc = kvf_transfer_submit(e, a->dst_sid, &x, 1, msg, (size_t)len, &b[nb]);
        if (rc < 0) {
            kvf_cli_fail(CMD, rc, "round %" PRIu64 ": slice %u: write to %s", round, i,
                         a->dst_sid);
            goto out_free;
        }
        nb++;
    }
    for (unsigned i = 0; i < XFER_SLICES; i++) {
        rc = kvf_batch_wait(b[i], -1); /* bounded by op_timeout_ms (--timeout) */
        if (rc != KVF_BATCH_DONE) {
            kvf_cli_fail(CMD, rc < 0 ? rc : -KVF_ETIMEDOUT, "round %" PRIu64 ": slice %u: "
                         "write to %s", round, i, a->dst_sid);
            goto out_free;
        }
    }
    rc = 0;
out_free:
    batches_free(b, nb);
    return rc < 0 ? 1 : 0;
}

static int run_prefill(const xfer_args_t *a, kvf_engine_t *e, const char *sid)
{
    uint64_t seed, remote;
    int code = 1, rc;

    if (getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed))
        seed = kvf__now_ns() ^ ((uint64_t)getpid() << 32);

    void *buf = buffer_alloc();
    kvf_notify_t *note = malloc(sizeof(*note));
    if (!buf || !note) {
        fprintf(stderr, "kvferry " CMD ": cannot allocate %zu bytes: %s\n", XFER_BYTES,
                strerror(errno));
        goto out_free;
    }
    /* Registered like the seed's Prefill does; the engine also needs no more for a write. */
    rc = kvf_mem_register(e, buf, XFER_BYTES);
    if (rc < 0) {
        kvf_cli_fail(CMD, rc, "register %zu bytes at %p", XFER_BYTES, buf);
        goto out_free;
    }
    printf("register success: %zu bytes at %p\n", XFER_BYTES, buf);
    printf(KVF_CLI_PREFILL_READY_FMT "\n", sid);

    if (find_decode_buffer(a, e, &remote) != 0)
        goto out_unregister;
    printf("decode %s: buffer of %zu bytes at 0x%" PRIx64 "\n", a->dst_sid, XFER_BYTES, remote);

    uint64_t total_bytes = 0;
    double total_ms = 0;
    for (uint64_t round = 1; a->iterations == 0 || round <= a->iterations; round++) {
        fill_random_halves(buf, XFER_BYTES, &seed);
        /* The slices' checksums (for the notifications) are computed before the clock starts:
         * hashing 48 MB takes longer than moving it. */
        uint64_t sums[XFER_SLICES];
        for (unsigned i = 0; i < XFER_SLICES; i++)
            sums[i] = checksum_words((char *)buf + (size_t)i * XFER_SLICE_BYTES, XFER_SLICE_BYTES);
        uint64_t t0 = kvf__now_ns();
        if (prefill_write_round(a, e, buf, remote, round, sums) != 0)
            goto out_unregister;
        double ms = ms_since(t0);
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

        /* The Decode checks each slice as its notification arrives; its buffer may be
         * overwritten only once it confirmed the whole round. */
        if (prefill_wait_ack(a, e, note, round) != 0)
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
out_free:
    free(note);
    if (buf)
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
    /* The engine's own spelling of its id, with the chosen port: the Prefill names it. */
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s", kvf_engine_session_id(e));

    code = a.role == KVF_ROLE_DECODE ? run_decode(&a, e, sid) : run_prefill(&a, e, sid);

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
