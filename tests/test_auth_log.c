/*
 * What an operator sees when someone without the key knocks (docs/security.md, "The handshake"):
 * the engine and the store each log a warning naming the refused peer's address and why, and a
 * flood of bad attempts is rate-limited to a bounded number of lines (KVF_LOG_RATELIMIT_BURST per
 * KVF_LOG_RATELIMIT_WINDOW_MS, then one "(N more suppressed)").
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/auth.h"
#include "common/common.h"
#include "common/url.h"
#include "test_util.h"

#define ATTEMPTS 60u

typedef struct {
    char path[64];
    int saved;
} logcap_t;

static void logcap_start(logcap_t *lc)
{
    snprintf(lc->path, sizeof(lc->path), "/tmp/kvf-auth-log-XXXXXX");
    int fd = mkstemp(lc->path);
    assert_true(fd >= 0);
    fflush(stderr);
    lc->saved = dup(STDERR_FILENO);
    assert_true(lc->saved >= 0);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);
    close(fd);
}

/* Restore stderr; the captured lines containing @a and @b, the first such in @first. */
static unsigned logcap_stop(logcap_t *lc, const char *a, const char *b, char *first, size_t flen)
{
    fflush(stderr);
    dup2(lc->saved, STDERR_FILENO);
    close(lc->saved);
    FILE *f = fopen(lc->path, "r");
    assert_non_null(f);
    char line[4096];
    unsigned hit = 0;
    first[0] = '\0';
    while (fgets(line, sizeof(line), f)) {
        if (strstr(line, a) && strstr(line, b) && hit++ == 0)
            snprintf(first, flen, "%s", line);
    }
    fclose(f);
    unlink(lc->path);
    return hit;
}

/* One connection from 127.0.0.2 to @port that proves @key as @id, expecting @server; its local
 * port in *@lport. Returns the handshake's result. */
static int bad_attempt(uint16_t port, const kvf_auth_key_t *key, const char *id,
                       const char *server, uint16_t *lport)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000002)};
    assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
    socklen_t ml = sizeof(me);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &ml), 0);
    *lport = ntohs(me.sin_port);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
    char why[256];
    int rc = kvf__auth_client(fd, key, id, kvf__now_ms() + 5000, server, why, sizeof(why));
    if (rc != -KVF_EAUTH || !strstr(why, "refused by the peer: wrong key"))
        fail_msg("attempt %u: %d %s", (unsigned)*lport, rc, why);
    close(fd);
    return rc;
}

/* Lines allowed for attempts spread over @ms: a burst per window started, and one more per
 * window for its "(N more suppressed)". */
static unsigned allowed_lines(uint64_t ms)
{
    return (unsigned)(ms / KVF_LOG_RATELIMIT_WINDOW_MS + 1) * (KVF_LOG_RATELIMIT_BURST + 1);
}

/* ATTEMPTS handshakes with a wrong key at an engine and at a store: each side's log names the
 * first refused peer (address and port) and the reason, and holds far fewer lines than attempts;
 * the servers still serve a client with the key. */
static void refused_peers_logged_rate_limited(void **state)
{
    (void)state;
    char dir[] = "/tmp/kvf-authlog-XXXXXX", good[64], bad[64];
    assert_non_null(mkdtemp(dir));
    snprintf(good, sizeof(good), "%s/good.key", dir);
    snprintf(bad, sizeof(bad), "%s/bad.key", dir);
    assert_kvf_ok(kvf_auth_keygen(good));
    assert_kvf_ok(kvf_auth_keygen(bad));
    kvf_auth_key_t wrong;
    assert_kvf_ok(kvf__auth_key_resolve(bad, &wrong));
    kvf_log_set_level(KVF_LOG_WARN);

    for (int store = 0; store < 2; store++) {
        kvf_store_server_opts_t so;
        kvf_store_server_opts_init(&so);
        so.auth_key_file = good;
        kvf_store_server_t *srv = NULL;
        assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &srv));
        kvf_config_t cfg;
        kvf_config_init(&cfg);
        cfg.auth_key_file = good;
        cfg.transport = KVF_TRANSPORT_TCP;
        kvf_engine_t *e = store ? NULL : kvf_test_engine(kvf_store_server_url(srv),
                                                         KVF_ROLE_DECODE, &cfg);
        kvf_store_url_t u;
        assert_kvf_ok(kvf__store_url_parse(kvf_store_server_url(srv), 0, &u));
        uint16_t port = store ? u.hosts[0].port : kvf_engine_port(e);
        const char *server = store ? KVF_AUTH_STORE_ID : kvf_engine_session_id(e);

        logcap_t lc;
        logcap_start(&lc);
        uint64_t t0 = kvf_test_now_ms();
        uint16_t first_port = 0, lport;
        for (unsigned i = 0; i < ATTEMPTS; i++) {
            bad_attempt(port, &wrong, store ? "kvferry-store-client/x" : "127.0.0.2:1", server,
                        &lport);
            if (i == 0)
                first_port = lport;
        }
        uint64_t took = kvf_test_now_ms() - t0;
        /* Still serving the members: and once the server is stopped every line is written. */
        kvf_store_opts_t co;
        kvf_store_opts_init(&co);
        co.auth_key_file = good;
        kvf_store_t *st = NULL;
        assert_kvf_ok(kvf_store_open(kvf_store_server_url(srv), &co, &st));
        assert_kvf_ok(kvf_store_set(st, "still", "here", 4, 0));
        kvf_store_close(st);
        kvf_engine_destroy(e);
        kvf_store_server_stop(srv);
        uint64_t spread = kvf_test_now_ms() - t0;

        char want[160], first[4096];
        snprintf(want, sizeof(want), "%s: closing connection from 127.0.0.2:%u: ",
                 store ? "store" : "tcp", (unsigned)first_port);
        unsigned hits = logcap_stop(&lc, "closing connection from 127.0.0.2:",
                                    "authentication failed: wrong key", first, sizeof(first));
        print_message("%s: %u bad attempts in %llu ms, %u log lines\n", store ? "store" : "engine",
                      ATTEMPTS, (unsigned long long)took, hits);
        if (!strstr(first, want) || !strstr(first, "WARN"))
            fail_msg("the first line does not name the first refused peer (%s): %s", want, first);
        assert_true(hits >= 1);
        if (hits > allowed_lines(spread) || (spread < KVF_LOG_RATELIMIT_WINDOW_MS && hits >
                                                                    KVF_LOG_RATELIMIT_BURST))
            fail_msg("%u lines for %u attempts in %llu ms: not rate-limited", hits, ATTEMPTS,
                     (unsigned long long)spread);
    }
    kvf__auth_key_wipe(&wrong);
    unlink(good);
    unlink(bad);
    rmdir(dir);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(refused_peers_logged_rate_limited),
};

KVF_TEST_MAIN(tests)
