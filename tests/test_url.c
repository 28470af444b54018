/* Store URL and session id parsers: good input parses to the expected parts, bad input fails with
 * -KVF_EINVAL and a message naming the bad part, and kvf__hostport_format round-trips. The public
 * wrappers (kvf_session_id_parse/_format, kvf_store_url_parse) also fail a short buffer with
 * -KVF_ERANGE, writing nothing. */
#include <string.h>

#include "test_util.h"

#include "common/common.h"
#include "common/url.h"

/* A long but valid DNS name (4 labels of 63 bytes minus the tail, 253 bytes in all). */
static char long_name[254];
/* 254 bytes: one too many. */
static char too_long_name[255];

static void make_long_names(void)
{
    char label[64];
    memset(label, 'a', 63);
    label[63] = '\0';
    snprintf(long_name, sizeof(long_name), "%s.%s.%s.%.61s", label, label, label, label);
    assert_int_equal(strlen(long_name), 253);
    snprintf(too_long_name, sizeof(too_long_name), "%s.%s.%s.%.62s", label, label, label, label);
    assert_int_equal(strlen(too_long_name), 254);
}

static void assert_hostport(const kvf_hostport_t *hp, const char *host, kvf_host_kind_t kind,
                            unsigned port)
{
    assert_string_equal(hp->host, host);
    assert_int_equal(hp->kind, kind);
    assert_int_equal(hp->port, port);
}

/* ----------------------------------------------------------------------------------------------
 * Store URLs: good input
 * -------------------------------------------------------------------------------------------- */

static void store_url_good(void **state)
{
    static const struct {
        const char *url;
        kvf_store_scheme_t scheme;
        const char *host;
        kvf_host_kind_t kind;
        unsigned port;
    } cases[] = {
        {"tcp://192.168.1.100:8000", KVF_STORE_SCHEME_TCP, "192.168.1.100", KVF_HOST_IPV4, 8000},
        {"tcp://127.0.0.1:1", KVF_STORE_SCHEME_TCP, "127.0.0.1", KVF_HOST_IPV4, 1},
        {"tcp://0.0.0.0:65535", KVF_STORE_SCHEME_TCP, "0.0.0.0", KVF_HOST_IPV4, 65535},
        {"tcp://localhost:50051", KVF_STORE_SCHEME_TCP, "localhost", KVF_HOST_NAME, 50051},
        {"tcp://decode-0:8000", KVF_STORE_SCHEME_TCP, "decode-0", KVF_HOST_NAME, 8000},
        {"tcp://node1.cluster.local:7000", KVF_STORE_SCHEME_TCP, "node1.cluster.local",
         KVF_HOST_NAME, 7000},
        {"tcp://1.2.3.4a:80", KVF_STORE_SCHEME_TCP, "1.2.3.4a", KVF_HOST_NAME, 80},
        {"tcp://[::1]:8000", KVF_STORE_SCHEME_TCP, "::1", KVF_HOST_IPV6, 8000},
        {"tcp://[fe80::1:2:3]:9", KVF_STORE_SCHEME_TCP, "fe80::1:2:3", KVF_HOST_IPV6, 9},
        {"tcp://[::ffff:10.0.0.1]:80", KVF_STORE_SCHEME_TCP, "::ffff:10.0.0.1", KVF_HOST_IPV6,
         80},
        {"tcp://10.0.0.1:00080", KVF_STORE_SCHEME_TCP, "10.0.0.1", KVF_HOST_IPV4, 80},
        {"redis://10.0.0.5:6379", KVF_STORE_SCHEME_REDIS, "10.0.0.5", KVF_HOST_IPV4, 6379},
        {"redis://[2001:db8::5]:6379", KVF_STORE_SCHEME_REDIS, "2001:db8::5", KVF_HOST_IPV6, 6379},
        {"etcd://etcd-0:2379", KVF_STORE_SCHEME_ETCD, "etcd-0", KVF_HOST_NAME, 2379},
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        kvf_store_url_t u;
        print_message("%s\n", cases[i].url);
        assert_kvf_ok(kvf__store_url_parse(cases[i].url, 0, &u));
        assert_int_equal(u.scheme, cases[i].scheme);
        assert_int_equal(u.nhosts, 1);
        assert_hostport(&u.hosts[0], cases[i].host, cases[i].kind, cases[i].port);
    }
}

static void store_url_etcd_list(void **state)
{
    kvf_store_url_t u;
    (void)state;
    assert_kvf_ok(kvf__store_url_parse("etcd://10.0.0.1:2379,[::1]:2380,etcd-2:2381", 0, &u));
    assert_int_equal(u.scheme, KVF_STORE_SCHEME_ETCD);
    assert_int_equal(u.nhosts, 3);
    assert_hostport(&u.hosts[0], "10.0.0.1", KVF_HOST_IPV4, 2379);
    assert_hostport(&u.hosts[1], "::1", KVF_HOST_IPV6, 2380);
    assert_hostport(&u.hosts[2], "etcd-2", KVF_HOST_NAME, 2381);
}

/* Credentials (redis://, etcd://) and a Redis database; the password never appears in a
 * message. */
static void store_url_credentials(void **state)
{
    (void)state;
    kvf_store_url_t u;
    assert_kvf_ok(kvf__store_url_parse("redis://alice:pa:ss@10.0.0.1:6379/7", 0, &u));
    assert_string_equal(u.user, "alice");
    assert_string_equal(u.password, "pa:ss");
    assert_int_equal(u.db, 7);
    assert_hostport(&u.hosts[0], "10.0.0.1", KVF_HOST_IPV4, 6379);
    assert_kvf_ok(kvf__store_url_parse("redis://:pw@[::1]:6379", 0, &u));
    assert_string_equal(u.user, "");
    assert_string_equal(u.password, "pw");
    assert_int_equal(u.db, 0);
    assert_kvf_ok(kvf__store_url_parse("etcd://root:p@ss@h1:2379,h2:2379", 0, &u));
    assert_string_equal(u.user, "root");
    assert_string_equal(u.password, "p@ss");
    assert_int_equal(u.nhosts, 2);
    assert_kvf_ok(kvf__store_url_parse("tcp://127.0.0.1:8000", 0, &u));
    assert_string_equal(u.password, "");
    assert_kvf_err(kvf__store_url_parse("etcd://:secret1@h1:2379", 0, &u), -KVF_EINVAL);
    assert_last_error_contains("etcd needs a user name");
    assert_kvf_err(kvf__store_url_parse("redis://u:@h:1", 0, &u), -KVF_EINVAL);
    assert_last_error_contains("empty password");
    assert_kvf_err(kvf__store_url_parse("redis://u:secret2@h:1/99999", 0, &u), -KVF_EINVAL);
    assert_last_error_contains("database '99999' is not a number 0..1023");
    if (strstr(kvf_last_error(), "secret2"))
        fail_msg("the password is shown: %s", kvf_last_error());
    assert_kvf_err(kvf__store_url_parse("redis://u:secret3@h:1/2x", 0, &u), -KVF_EINVAL);
    assert_kvf_err(kvf__store_url_parse("etcd://h1:2379/0", 0, &u), -KVF_EINVAL);
}

static void store_url_etcd_max_hosts(void **state)
{
    char url[1024] = "etcd://";
    kvf_store_url_t u;
    (void)state;
    for (unsigned i = 0; i < KVF_URL_MAX_HOSTS; i++)
        snprintf(url + strlen(url), sizeof(url) - strlen(url), "%sh%u:%u", i ? "," : "", i,
                 2000 + i);
    assert_kvf_ok(kvf__store_url_parse(url, 0, &u));
    assert_int_equal(u.nhosts, KVF_URL_MAX_HOSTS);
    for (unsigned i = 0; i < KVF_URL_MAX_HOSTS; i++) {
        char host[16];
        snprintf(host, sizeof(host), "h%u", i);
        assert_hostport(&u.hosts[i], host, KVF_HOST_NAME, 2000 + i);
    }

    /* One more is refused. */
    strcat(url, ",h16:2016");
    assert_kvf_err(kvf__store_url_parse(url, 0, &u), -KVF_EINVAL);
    assert_last_error_contains("more than 16 endpoints");
}

static void store_url_port0(void **state)
{
    kvf_store_url_t u;
    (void)state;
    assert_kvf_ok(kvf__store_url_parse("tcp://127.0.0.1:0", 1, &u));
    assert_hostport(&u.hosts[0], "127.0.0.1", KVF_HOST_IPV4, 0);

    kvf_last_error_clear();
    assert_kvf_err(kvf__store_url_parse("tcp://127.0.0.1:0", 0, &u), -KVF_EINVAL);
    assert_last_error_contains("store url tcp://127.0.0.1:0: ");
    assert_last_error_contains("port 0");
}

static void store_url_long_names(void **state)
{
    char url[512];
    kvf_store_url_t u;
    (void)state;
    make_long_names();
    snprintf(url, sizeof(url), "tcp://%s:80", long_name);
    assert_kvf_ok(kvf__store_url_parse(url, 0, &u));
    assert_hostport(&u.hosts[0], long_name, KVF_HOST_NAME, 80);

    snprintf(url, sizeof(url), "tcp://%s:80", too_long_name);
    assert_kvf_err(kvf__store_url_parse(url, 0, &u), -KVF_EINVAL);
    assert_last_error_contains("longer than 253 bytes");
}

/* ----------------------------------------------------------------------------------------------
 * Store URLs: bad input
 * -------------------------------------------------------------------------------------------- */

/* The typo in the seed's own Prefill example: the exact message users will see. */
static void store_url_seed_typo(void **state)
{
    kvf_store_url_t u;
    (void)state;
    kvf_last_error_clear();
    assert_kvf_err(kvf__store_url_parse("tcp://192.168.1.1000:8000", 0, &u), -KVF_EINVAL);
    assert_string_equal(kvf_last_error(),
                        "store url tcp://192.168.1.1000:8000: 192.168.1.1000 is not a valid IPv4 "
                        "address");
}

static void store_url_bad(void **state)
{
    static const struct {
        const char *url;
        const char *needle; /* must appear in the message, besides the "store url <url>: " prefix */
    } cases[] = {
        /* scheme */
        {"http://10.0.0.1:80", "unknown scheme 'http'"},
        {"http://10.0.0.1:80", "tcp://, etcd://, redis:// or p2p://"},
        {"TCP://10.0.0.1:80", "scheme 'TCP' must be lowercase"},
        {"Etcd://10.0.0.1:80", "scheme 'Etcd' must be lowercase"},
        {"://10.0.0.1:80", "unknown scheme ''"},
        {"10.0.0.1:8000", "missing scheme"},
        {"tcp:/10.0.0.1:8000", "missing scheme"},
        /* host */
        {"tcp://", "missing host and port"},
        {"tcp://:8000", "empty host in ':8000'"},
        {"tcp://1.2.3:80", "1.2.3 is not a valid IPv4 address"},
        {"tcp://256.1.1.1:80", "256.1.1.1 is not a valid IPv4 address"},
        {"tcp://1.2.3.4.5:80", "1.2.3.4.5 is not a valid IPv4 address"},
        {"tcp://1..2.3:80", "1..2.3 is not a valid IPv4 address"},
        {"tcp://8000:80", "8000 is not a valid IPv4 address"},
        {"tcp://-bad:80", "host name '-bad'"},
        {"tcp://bad-.example:80", "host name 'bad-.example'"},
        {"tcp://a..b:80", "host name 'a..b' has an empty label"},
        {"tcp://host.:80", "host name 'host.' has an empty label"},
        {"tcp://under_score:80", "host name 'under_score' contains a character"},
        {"tcp://user@host:80", "host name 'user@host'"},
        {"tcp://ho st:80", "host name 'ho st'"},
        {"tcp://::1:8000", "write an IPv6 address in brackets, e.g. [::1]:8000"},
        {"tcp://fe80::1:80", "'fe80::1:80' has more than one ':'"},
        {"tcp://[::1:8000", "unclosed bracket in '[::1:8000'"},
        {"tcp://[]:8000", "empty host in '[]'"},
        {"tcp://[1.2.3.4]:8000", "1.2.3.4 is not a valid IPv6 address"},
        {"tcp://[::g]:8000", "::g is not a valid IPv6 address"},
        {"tcp://::1]:8000", "unmatched ']' in '::1]:8000'"},
        {"tcp://fe80::1", "e.g. [::1]:port"},
        {"tcp://[::1]8000", "unexpected '8000' after '[::1]'"},
        {"tcp://[::1]", "missing port after '[::1]'"},
        {"tcp://[::1]:", "missing port after '[::1]:'"},
        /* port */
        {"tcp://10.0.0.1", "missing port in '10.0.0.1'"},
        {"tcp://localhost", "missing port in 'localhost'"},
        {"tcp://10.0.0.1:", "missing port after '10.0.0.1:'"},
        {"tcp://10.0.0.1:http", "port 'http' is not a decimal number"},
        {"tcp://10.0.0.1:-1", "port '-1' is not a decimal number"},
        {"tcp://10.0.0.1:+80", "port '+80' is not a decimal number"},
        {"tcp://10.0.0.1: 80", "port ' 80' is not a decimal number"},
        {"tcp://10.0.0.1:65536", "port 65536 is out of range"},
        {"tcp://10.0.0.1:99999999999999999999", "port 99999999999999999999 is out of range"},
        {"tcp://10.0.0.1:0", "port 0 is not allowed"},
        /* trailing garbage */
        {"tcp://10.0.0.1:8000/", "unexpected '/' after port 8000"},
        {"tcp://10.0.0.1:8000/store", "unexpected '/store' after port 8000"},
        {"tcp://10.0.0.1:8000 ", "unexpected ' ' after port 8000"},
        {"tcp://10.0.0.1:80x", "unexpected 'x' after port 80"},
        {"tcp://[::1]:80:90", "unexpected ':90' after port 80"},
        /* lists */
        {"tcp://10.0.0.1:80,10.0.0.2:80", "only etcd:// takes a list"},
        {"redis://10.0.0.1:80,10.0.0.2:80", "unexpected ',10.0.0.2:80'"},
        {"etcd://10.0.0.1:2379,", "empty endpoint 2"},
        {"etcd://,10.0.0.1:2379", "empty endpoint 1"},
        {"etcd://a:1,,b:2", "empty endpoint 2"},
        {"etcd://a:1,b", "missing port in 'b'"},
        {"etcd://a:1,300.1.1.1:2", "300.1.1.1 is not a valid IPv4 address"},
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        kvf_store_url_t u;
        char prefix[512];
        print_message("%s\n", cases[i].url);
        kvf_last_error_clear();
        assert_kvf_err(kvf__store_url_parse(cases[i].url, 0, &u), -KVF_EINVAL);
        snprintf(prefix, sizeof(prefix), "store url %s: ", cases[i].url);
        assert_int_equal(strncmp(kvf_last_error(), prefix, strlen(prefix)), 0);
        assert_last_error_contains(cases[i].needle);
    }
}

static void store_url_null_and_empty(void **state)
{
    kvf_store_url_t u;
    (void)state;
    kvf_last_error_clear();
    assert_kvf_err(kvf__store_url_parse(NULL, 0, &u), -KVF_EINVAL);
    assert_last_error_contains("store url is NULL");
    kvf_last_error_clear();
    assert_kvf_err(kvf__store_url_parse("", 0, &u), -KVF_EINVAL);
    assert_last_error_contains("store url is empty");
    kvf_last_error_clear();
    assert_kvf_err(kvf__store_url_parse("tcp://a:1", 0, NULL), -KVF_EINVAL);
    assert_last_error_contains("no output");
}

/* A failed parse leaves the caller's struct as it was. */
static void store_url_failure_keeps_output(void **state)
{
    kvf_store_url_t u;
    (void)state;
    assert_kvf_ok(kvf__store_url_parse("etcd://a:1,b:2", 0, &u));
    assert_kvf_err(kvf__store_url_parse("etcd://c:3,d", 0, &u), -KVF_EINVAL);
    assert_int_equal(u.nhosts, 2);
    assert_hostport(&u.hosts[0], "a", KVF_HOST_NAME, 1);
    assert_hostport(&u.hosts[1], "b", KVF_HOST_NAME, 2);
}

/* A very long input is quoted only in part, and the message still names the bad value. */
static void store_url_long_input(void **state)
{
    char url[2048];
    kvf_store_url_t u;
    (void)state;
    strcpy(url, "etcd://");
    for (unsigned i = 0; i < 15; i++)
        strcat(url, "a-fairly-long-host-name-for-etcd.example.com:2379,");
    strcat(url, "999.1.1.1:2379");
    assert_true(strlen(url) > 700);
    kvf_last_error_clear();
    assert_kvf_err(kvf__store_url_parse(url, 0, &u), -KVF_EINVAL);
    assert_last_error_contains("999.1.1.1 is not a valid IPv4 address");
    assert_last_error_contains("...: ");
    assert_true(strlen(kvf_last_error()) < 512);
}

/* ----------------------------------------------------------------------------------------------
 * Session ids
 * -------------------------------------------------------------------------------------------- */

static void session_id_good(void **state)
{
    static const struct {
        const char *sid;
        const char *host;
        kvf_host_kind_t kind;
        unsigned port;
    } cases[] = {
        {"192.168.1.101:50051", "192.168.1.101", KVF_HOST_IPV4, 50051},
        {"127.0.0.1:0", "127.0.0.1", KVF_HOST_IPV4, 0},
        {"10.0.0.2:65535", "10.0.0.2", KVF_HOST_IPV4, 65535},
        {"[::1]:8000", "::1", KVF_HOST_IPV6, 8000},
        {"[2001:db8::1]:0", "2001:db8::1", KVF_HOST_IPV6, 0},
        {"decode-0:9000", "decode-0", KVF_HOST_NAME, 9000},
        {"localhost:1", "localhost", KVF_HOST_NAME, 1},
        {"Node-7.Rack2:123", "Node-7.Rack2", KVF_HOST_NAME, 123},
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        kvf_hostport_t hp;
        print_message("%s\n", cases[i].sid);
        assert_kvf_ok(kvf__session_id_parse(cases[i].sid, &hp));
        assert_hostport(&hp, cases[i].host, cases[i].kind, cases[i].port);
    }
}

static void session_id_bad(void **state)
{
    static const struct {
        const char *sid;
        const char *needle;
    } cases[] = {
        {"192.168.1.1000:8000", "192.168.1.1000 is not a valid IPv4 address"},
        {"1.2.3:8000", "1.2.3 is not a valid IPv4 address"},
        {"192.168.1.1", "missing port in '192.168.1.1'"},
        {"192.168.1.1:", "missing port after '192.168.1.1:'"},
        {":8000", "empty host in ':8000'"},
        {"10.0.0.1:65536", "port 65536 is out of range"},
        {"10.0.0.1:abc", "port 'abc' is not a decimal number"},
        {"10.0.0.1:80x", "unexpected 'x' after port 80"},
        {"::1:8000", "write an IPv6 address in brackets, e.g. [::1]:8000"},
        {"[::1:8000", "unclosed bracket in '[::1:8000'"},
        {"[::zz]:8000", "::zz is not a valid IPv6 address"},
        {"[::1]", "missing port after '[::1]'"},
        {"bad_host:80", "host name 'bad_host'"},
        {"-x:80", "host name '-x'"},
        {"tcp://10.0.0.1:80", "takes no scheme"},
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        kvf_hostport_t hp;
        char prefix[256];
        print_message("%s\n", cases[i].sid);
        kvf_last_error_clear();
        assert_kvf_err(kvf__session_id_parse(cases[i].sid, &hp), -KVF_EINVAL);
        snprintf(prefix, sizeof(prefix), "session id %s: ", cases[i].sid);
        assert_int_equal(strncmp(kvf_last_error(), prefix, strlen(prefix)), 0);
        assert_last_error_contains(cases[i].needle);
    }
}

static void session_id_null_and_empty(void **state)
{
    kvf_hostport_t hp;
    (void)state;
    kvf_last_error_clear();
    assert_kvf_err(kvf__session_id_parse(NULL, &hp), -KVF_EINVAL);
    assert_last_error_contains("session id is NULL");
    kvf_last_error_clear();
    assert_kvf_err(kvf__session_id_parse("", &hp), -KVF_EINVAL);
    assert_last_error_contains("session id is empty");
    kvf_last_error_clear();
    assert_kvf_err(kvf__session_id_parse("a:1", NULL), -KVF_EINVAL);
    assert_last_error_contains("no output");
}

/* ----------------------------------------------------------------------------------------------
 * kvf__hostport_format
 * -------------------------------------------------------------------------------------------- */

static void hostport_format_round_trip(void **state)
{
    static const char *const sids[] = {
        "192.168.1.101:50051", "127.0.0.1:0", "[::1]:8000", "[2001:db8::1]:65535",
        "decode-0:9000",       "localhost:1",
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(sids); i++) {
        kvf_hostport_t hp, again;
        char buf[KVF_HOST_MAX + 8];
        assert_kvf_ok(kvf__session_id_parse(sids[i], &hp));
        assert_ptr_equal(kvf__hostport_format(&hp, buf, sizeof(buf)), buf);
        assert_string_equal(buf, sids[i]);
        assert_kvf_ok(kvf__session_id_parse(buf, &again));
        assert_memory_equal(&hp, &again, sizeof(hp));
    }

    /* Store URL endpoints format the same way. */
    kvf_store_url_t u;
    char buf[KVF_HOST_MAX + 8];
    assert_kvf_ok(kvf__store_url_parse("etcd://[fe80::2]:2379,10.1.2.3:2380", 0, &u));
    assert_string_equal(kvf__hostport_format(&u.hosts[0], buf, sizeof(buf)), "[fe80::2]:2379");
    assert_string_equal(kvf__hostport_format(&u.hosts[1], buf, sizeof(buf)), "10.1.2.3:2380");

    /* The longest host name fits the documented buffer size. */
    make_long_names();
    char sid[300];
    kvf_hostport_t hp;
    snprintf(sid, sizeof(sid), "%s:65535", long_name);
    assert_kvf_ok(kvf__session_id_parse(sid, &hp));
    assert_string_equal(kvf__hostport_format(&hp, buf, sizeof(buf)), sid);

    /* A short buffer is truncated, never overrun. */
    char small[8];
    memset(small, 'x', sizeof(small));
    assert_kvf_ok(kvf__session_id_parse("10.0.0.1:8000", &hp));
    assert_string_equal(kvf__hostport_format(&hp, small, sizeof(small)), "10.0.0.");
}

/* ----------------------------------------------------------------------------------------------
 * The public functions (kvferry.h): kvf_session_id_parse, kvf_session_id_format,
 * kvf_store_url_parse
 * -------------------------------------------------------------------------------------------- */

static void public_session_id_parse_good(void **state)
{
    static const struct {
        const char *sid, *host;
        unsigned port;
    } cases[] = {
        {"10.0.0.1:50051", "10.0.0.1", 50051},
        {"127.0.0.1:0", "127.0.0.1", 0},
        {"decode-0:8000", "decode-0", 8000},
        {"[::1]:9000", "::1", 9000},
        {"[fe80::1:2:3]:9", "fe80::1:2:3", 9},
        {"10.0.0.1:00080", "10.0.0.1", 80},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char host[KVF_SESSION_ID_MAX];
        uint16_t port = 1234;
        assert_kvf_ok(kvf_session_id_parse(cases[i].sid, host, sizeof(host), &port));
        assert_string_equal(host, cases[i].host);
        assert_int_equal(port, cases[i].port);
    }
    /* Either output may be left out. */
    uint16_t port;
    assert_kvf_ok(kvf_session_id_parse("[::1]:7", NULL, 0, &port));
    assert_int_equal(port, 7);
    char host[KVF_SESSION_ID_MAX];
    assert_kvf_ok(kvf_session_id_parse("[::1]:7", host, sizeof(host), NULL));
    assert_string_equal(host, "::1");
    /* The longest host fits in KVF_SESSION_ID_MAX. */
    make_long_names();
    char sid[KVF_SESSION_ID_MAX];
    snprintf(sid, sizeof(sid), "%s:65535", long_name);
    assert_kvf_ok(kvf_session_id_parse(sid, host, sizeof(host), &port));
    assert_string_equal(host, long_name);
}

static void public_session_id_parse_bad(void **state)
{
    static const struct {
        const char *sid, *needle;
    } cases[] = {
        {"10.0.0.1000:5", "session id 10.0.0.1000:5: 10.0.0.1000 is not a valid IPv4 address"},
        {"::1:5", "session id ::1:5: '::1:5' has more than one ':'; write an IPv6 address in "
                  "brackets, e.g. [::1]:5"},
        {"[::1]5", "unexpected '5' after '[::1]'"},
        {"host", "session id host: missing port in 'host'"},
        {"tcp://10.0.0.1:5", "session id tcp://10.0.0.1:5: a session id takes no scheme"},
        {"10.0.0.1:65536", "port 65536 is out of range"},
        {"", "session id is empty"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char host[KVF_SESSION_ID_MAX] = "untouched";
        uint16_t port = 77;
        kvf_last_error_clear();
        assert_kvf_err(kvf_session_id_parse(cases[i].sid, host, sizeof(host), &port),
                       -KVF_EINVAL);
        assert_last_error_contains(cases[i].needle);
        assert_string_equal(host, "untouched");
        assert_int_equal(port, 77);
    }
    kvf_last_error_clear();
    assert_kvf_err(kvf_session_id_parse(NULL, NULL, 0, NULL), -KVF_EINVAL);
    assert_last_error_contains("session id is NULL");
}

static void public_session_id_parse_short_buffer(void **state)
{
    (void)state;
    char host[8];
    uint16_t port = 77;
    memset(host, 'x', sizeof(host));
    kvf_last_error_clear();
    /* "10.0.0.1" needs 9 bytes with its NUL. */
    assert_kvf_err(kvf_session_id_parse("10.0.0.1:5", host, sizeof(host), &port), -KVF_ERANGE);
    assert_last_error_contains("session id 10.0.0.1:5: host 10.0.0.1 needs 9 bytes; the buffer "
                               "has 8");
    for (size_t i = 0; i < sizeof(host); i++)
        assert_int_equal(host[i], 'x');
    assert_int_equal(port, 77);
    char fits[9];
    assert_kvf_ok(kvf_session_id_parse("10.0.0.1:5", fits, sizeof(fits), &port));
    assert_string_equal(fits, "10.0.0.1");
}

static void public_session_id_format(void **state)
{
    char buf[KVF_SESSION_ID_MAX];
    (void)state;
    assert_kvf_ok(kvf_session_id_format("10.0.0.1", 50051, buf, sizeof(buf)));
    assert_string_equal(buf, "10.0.0.1:50051");
    assert_kvf_ok(kvf_session_id_format("::1", 0, buf, sizeof(buf)));
    assert_string_equal(buf, "[::1]:0");
    assert_kvf_ok(kvf_session_id_format("decode-0", 8000, buf, sizeof(buf)));
    assert_string_equal(buf, "decode-0:8000");

    /* Parse then format spells an id the engine's one way. */
    char host[KVF_SESSION_ID_MAX];
    uint16_t port;
    assert_kvf_ok(kvf_session_id_parse("[fe80::1:2:3]:0009", host, sizeof(host), &port));
    assert_kvf_ok(kvf_session_id_format(host, port, buf, sizeof(buf)));
    assert_string_equal(buf, "[fe80::1:2:3]:9");

    /* The host is checked by the parser's rules. */
    static const struct {
        const char *host, *needle;
    } bad[] = {
        {"10.0.0.1000", "10.0.0.1000 is not a valid IPv4 address"},
        {"[::1]", "session id [[::1]]:5"},
        {"fe80::zz", "fe80::zz is not a valid IPv6 address"},
        {"a b", "host name 'a b' contains a character other than"},
        {"", "session id host is empty"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        strcpy(buf, "untouched");
        kvf_last_error_clear();
        assert_kvf_err(kvf_session_id_format(bad[i].host, 5, buf, sizeof(buf)), -KVF_EINVAL);
        assert_last_error_contains(bad[i].needle);
        assert_string_equal(buf, "untouched");
    }
    kvf_last_error_clear();
    assert_kvf_err(kvf_session_id_format(NULL, 5, buf, sizeof(buf)), -KVF_EINVAL);
    assert_last_error_contains("session id host is NULL");
    make_long_names();
    kvf_last_error_clear();
    assert_kvf_err(kvf_session_id_format(too_long_name, 5, buf, sizeof(buf)), -KVF_EINVAL);
    assert_last_error_contains("is longer than 253 bytes");
    char huge[300];
    memset(huge, 'a', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    kvf_last_error_clear();
    assert_kvf_err(kvf_session_id_format(huge, 5, buf, sizeof(buf)), -KVF_EINVAL);
    assert_last_error_contains("is longer than 255 bytes");

    /* A short buffer: nothing written, the size needed named. */
    char small[14];
    memset(small, 'x', sizeof(small));
    kvf_last_error_clear();
    assert_kvf_err(kvf_session_id_format("10.0.0.1", 50051, small, sizeof(small)), -KVF_ERANGE);
    assert_last_error_contains("session id 10.0.0.1:50051 needs 15 bytes; the buffer has 14");
    for (size_t i = 0; i < sizeof(small); i++)
        assert_int_equal(small[i], 'x');
    char fits[15];
    assert_kvf_ok(kvf_session_id_format("10.0.0.1", 50051, fits, sizeof(fits)));
    assert_string_equal(fits, "10.0.0.1:50051");
}

static void public_store_url_parse_good(void **state)
{
    static const struct {
        const char *url, *scheme, *host;
        unsigned port;
    } cases[] = {
        {"tcp://192.168.1.100:8000", "tcp", "192.168.1.100", 8000},
        {"tcp://[::1]:8000", "tcp", "::1", 8000},
        {"tcp://localhost:50051", "tcp", "localhost", 50051},
        {"etcd://10.0.0.1:2379,10.0.0.2:2379", "etcd", "10.0.0.1", 2379},
        {"etcd://[fe80::1]:2379,10.0.0.2:2379", "etcd", "fe80::1", 2379},
        {"redis://10.0.0.5:6379", "redis", "10.0.0.5", 6379},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *scheme = NULL;
        char host[KVF_SESSION_ID_MAX];
        uint16_t port = 0;
        assert_kvf_ok(kvf_store_url_parse(cases[i].url, &scheme, host, sizeof(host), &port));
        assert_string_equal(scheme, cases[i].scheme);
        assert_string_equal(host, cases[i].host);
        assert_int_equal(port, cases[i].port);
    }
    /* Every output may be left out: a plain check. */
    assert_kvf_ok(kvf_store_url_parse("tcp://127.0.0.1:1", NULL, NULL, 0, NULL));
}

static void public_store_url_parse_bad(void **state)
{
    static const struct {
        const char *url, *needle;
    } cases[] = {
        {"tcp://192.168.1.1000:8000",
         "store url tcp://192.168.1.1000:8000: 192.168.1.1000 is not a valid IPv4 address"},
        {"tcp://127.0.0.1:0", "store url tcp://127.0.0.1:0: port 0 is not allowed here"},
        {"http://10.0.0.1:80", "unknown scheme 'http'"},
        {"tcp://::1:8000", "write an IPv6 address in brackets, e.g. [::1]:8000"},
        {"tcp://[::1", "unclosed bracket"},
        {"10.0.0.1:80", "missing scheme"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *scheme = "untouched";
        char host[KVF_SESSION_ID_MAX] = "untouched";
        uint16_t port = 77;
        kvf_last_error_clear();
        assert_kvf_err(kvf_store_url_parse(cases[i].url, &scheme, host, sizeof(host), &port),
                       -KVF_EINVAL);
        assert_last_error_contains(cases[i].needle);
        assert_string_equal(scheme, "untouched");
        assert_string_equal(host, "untouched");
        assert_int_equal(port, 77);
    }
    kvf_last_error_clear();
    assert_kvf_err(kvf_store_url_parse(NULL, NULL, NULL, 0, NULL), -KVF_EINVAL);
    assert_last_error_contains("store url is NULL");
}

static void public_store_url_parse_short_buffer(void **state)
{
    (void)state;
    const char *scheme = "untouched";
    char host[9];
    uint16_t port = 77;
    memset(host, 'x', sizeof(host));
    kvf_last_error_clear();
    assert_kvf_err(kvf_store_url_parse("tcp://localhost:8000", &scheme, host, sizeof(host), &port),
                   -KVF_ERANGE);
    assert_last_error_contains("store url tcp://localhost:8000: host localhost needs 10 bytes; "
                               "the buffer has 9");
    for (size_t i = 0; i < sizeof(host); i++)
        assert_int_equal(host[i], 'x');
    assert_string_equal(scheme, "untouched");
    assert_int_equal(port, 77);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(store_url_good),
    cmocka_unit_test(store_url_etcd_list),
    cmocka_unit_test(store_url_credentials),
    cmocka_unit_test(store_url_etcd_max_hosts),
    cmocka_unit_test(store_url_port0),
    cmocka_unit_test(store_url_long_names),
    cmocka_unit_test(store_url_seed_typo),
    cmocka_unit_test(store_url_bad),
    cmocka_unit_test(store_url_null_and_empty),
    cmocka_unit_test(store_url_failure_keeps_output),
    cmocka_unit_test(store_url_long_input),
    cmocka_unit_test(session_id_good),
    cmocka_unit_test(session_id_bad),
    cmocka_unit_test(session_id_null_and_empty),
    cmocka_unit_test(hostport_format_round_trip),
    cmocka_unit_test(public_session_id_parse_good),
    cmocka_unit_test(public_session_id_parse_bad),
    cmocka_unit_test(public_session_id_parse_short_buffer),
    cmocka_unit_test(public_session_id_format),
    cmocka_unit_test(public_store_url_parse_good),
    cmocka_unit_test(public_store_url_parse_bad),
    cmocka_unit_test(public_store_url_parse_short_buffer),
};

KVF_TEST_MAIN(tests)
