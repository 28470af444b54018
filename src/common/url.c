/*
 * Store URLs and session ids. Syntax and address form only: no DNS, no sockets, so a typo such as
 * "tcp://192.168.1.1000:8000" is reported at once instead of as a connect timeout later.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/common.h"
#include "common/url.h"

/* A session id is host:port text: the longest host, a colon, brackets and five digits. */
_Static_assert(KVF_SESSION_ID_MAX == KVF_HOST_MAX + 8, "KVF_SESSION_ID_MAX is host:port text");

/* Bytes of the user's input quoted in the "store url <input>: " prefix; the tail of a longer
 * input is replaced by "..." so that the part naming the bad value still fits the message. */
#define CTX_INPUT_MAX 256

/* The schemes as the user must write them. */
static const struct {
    const char *name;
    kvf_store_scheme_t scheme;
    unsigned max_hosts;
} schemes[] = {
    {"tcp", KVF_STORE_SCHEME_TCP, 1},
    {"etcd", KVF_STORE_SCHEME_ETCD, KVF_URL_MAX_HOSTS},
    {"redis", KVF_STORE_SCHEME_REDIS, 1},
    {"p2p", KVF_STORE_SCHEME_P2P, 1},
};

#define VALID_SCHEMES "tcp://, etcd://, redis:// or p2p://"

static void format_ctx(char *ctx, size_t len, const char *what, const char *input)
{
    if (strlen(input) > CTX_INPUT_MAX)
        snprintf(ctx, len, "%s %.*s...", what, CTX_INPUT_MAX, input);
    else
        snprintf(ctx, len, "%s %s", what, input);
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int is_alnum(char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* RFC 1123 host name: dot-separated labels of 1..63 letters, digits and hyphens, none starting or
 * ending with a hyphen, at most 253 bytes in all. Returns NULL or what is wrong with it. */
static const char *dns_name_problem(const char *host, size_t len)
{
    if (len > 253)
        return "is longer than 253 bytes";
    size_t label = 0;
    for (size_t i = 0; i <= len; i++) {
        char c = i < len ? host[i] : '.';
        if (c == '.') {
            if (label == 0)
                return "has an empty label";
            if (label > 63)
                return "has a label longer than 63 bytes";
            if (host[i - label] == '-' || host[i - 1] == '-')
                return "has a label that starts or ends with '-'";
            label = 0;
        } else if (is_alnum(c) || c == '-') {
            label++;
        } else {
            return "contains a character other than letters, digits, '-' and '.'";
        }
    }
    return NULL;
}

/*
 * Validate the unbracketed host @host[0..len) and store it in @out. A host of only digits and
 * dots is meant as IPv4 and must be a dotted quad; anything else must be a DNS name.
 */
static int parse_plain_host(const char *ctx, const char *host, size_t len, kvf_hostport_t *out)
{
    size_t i;

    if (len >= KVF_HOST_MAX)
        return kvf__err(-KVF_EINVAL, "%s: host %.*s... is longer than %d bytes", ctx, 64, host,
                        KVF_HOST_MAX - 1);
    memcpy(out->host, host, len);
    out->host[len] = '\0';
    for (i = 0; i < len && (is_digit(host[i]) || host[i] == '.'); i++)
        ;
    if (i == len) {
        struct in_addr a4;
        if (inet_pton(AF_INET, out->host, &a4) != 1)
            return kvf__err(-KVF_EINVAL, "%s: %s is not a valid IPv4 address", ctx, out->host);
        out->kind = KVF_HOST_IPV4;
        return 0;
    }
    const char *problem = dns_name_problem(host, len);
    if (problem)
        return kvf__err(-KVF_EINVAL, "%s: host name '%s' %s", ctx, out->host, problem);
    out->kind = KVF_HOST_NAME;
    return 0;
}

/* Parse the decimal port @p[0..len) that followed "<host_shown>:". */
static int parse_port(const char *ctx, const char *host_shown, const char *p, size_t len,
                      int allow_port0, kvf_hostport_t *out)
{
    size_t ndigits;
    unsigned long v = 0;

    if (len == 0)
        return kvf__err(-KVF_EINVAL, "%s: missing port after '%s:'", ctx, host_shown);
    /* Stop accumulating once past 65535 so that a long digit string cannot overflow. */
    for (ndigits = 0; ndigits < len && is_digit(p[ndigits]); ndigits++)
        if (v <= 65535)
            v = v * 10 + (unsigned long)(p[ndigits] - '0');
    if (ndigits == 0)
        return kvf__err(-KVF_EINVAL, "%s: port '%.*s' is not a decimal number", ctx, (int)len, p);
    if (ndigits < len)
        return kvf__err(-KVF_EINVAL, "%s: unexpected '%.*s' after port %.*s", ctx,
                        (int)(len - ndigits), p + ndigits, (int)ndigits, p);
    if (v > 65535)
        return kvf__err(-KVF_EINVAL, "%s: port %.*s is out of range (max 65535)", ctx, (int)len, p);
    if (v == 0 && !allow_port0)
        return kvf__err(-KVF_EINVAL, "%s: port 0 is not allowed here; give the port to connect to",
                        ctx);
    out->port = (uint16_t)v;
    return 0;
}

/* Without brackets "::1:8000" cannot be split into address and port: say how to write it, with
 * the user's own address and port when they can be told apart. */
static int unbracketed_ipv6(const char *ctx, const char *s, size_t len)
{
    char addr[KVF_HOST_MAX];
    struct in6_addr a6;
    const char *last = s + len;
    size_t i;

    while (last[-1] != ':')
        last--;
    size_t alen = (size_t)(last - 1 - s);
    size_t plen = (size_t)(s + len - last);
    for (i = 0; i < plen && is_digit(last[i]); i++)
        ;
    if (plen > 0 && i == plen && alen < sizeof(addr)) {
        memcpy(addr, s, alen);
        addr[alen] = '\0';
        if (inet_pton(AF_INET6, addr, &a6) == 1)
            return kvf__err(-KVF_EINVAL,
                            "%s: '%.*s' has more than one ':'; write an IPv6 address in brackets, "
                            "e.g. [%s]:%.*s",
                            ctx, (int)len, s, addr, (int)plen, last);
    }
    return kvf__err(-KVF_EINVAL,
                    "%s: '%.*s' has more than one ':'; write an IPv6 address in brackets, e.g. "
                    "[::1]:port",
                    ctx, (int)len, s);
}

/* Parse one endpoint "host:port" or "[v6]:port" spanning @s[0..len) into @out. */
static int parse_endpoint(const char *ctx, const char *s, size_t len, int allow_port0,
                          kvf_hostport_t *out)
{
    const char *port;
    size_t port_len;
    char shown[KVF_HOST_MAX + 2];

    memset(out, 0, sizeof(*out));
    if (len == 0)
        return kvf__err(-KVF_EINVAL, "%s: missing host and port", ctx);

    if (s[0] == '[') {
        const char *close = memchr(s, ']', len);
        if (!close)
            return kvf__err(-KVF_EINVAL, "%s: unclosed bracket in '%.*s'", ctx, (int)len, s);
        size_t hlen = (size_t)(close - s - 1);
        if (hlen == 0)
            return kvf__err(-KVF_EINVAL, "%s: empty host in '[]'", ctx);
        if (hlen >= KVF_HOST_MAX)
            return kvf__err(-KVF_EINVAL, "%s: bracketed host is longer than %d bytes", ctx,
                            KVF_HOST_MAX - 1);
        memcpy(out->host, s + 1, hlen);
        out->host[hlen] = '\0';
        struct in6_addr a6;
        if (inet_pton(AF_INET6, out->host, &a6) != 1)
            return kvf__err(-KVF_EINVAL, "%s: %s is not a valid IPv6 address", ctx, out->host);
        out->kind = KVF_HOST_IPV6;
        snprintf(shown, sizeof(shown), "[%s]", out->host);
        const char *after = close + 1;
        size_t rest = len - (size_t)(after - s);
        if (rest == 0)
            return kvf__err(-KVF_EINVAL, "%s: missing port after '%s'", ctx, shown);
        if (after[0] != ':')
            return kvf__err(-KVF_EINVAL, "%s: unexpected '%.*s' after '%s'; want %s:port", ctx,
                            (int)rest, after, shown, shown);
        port = after + 1;
        port_len = rest - 1;
    } else {
        if (memchr(s, ']', len))
            return kvf__err(-KVF_EINVAL, "%s: unmatched ']' in '%.*s'", ctx, (int)len, s);
        const char *colon = memchr(s, ':', len);
        if (!colon)
            return kvf__err(-KVF_EINVAL, "%s: missing port in '%.*s'; want host:port", ctx,
                            (int)len, s);
        size_t hlen = (size_t)(colon - s);
        if (memchr(colon + 1, ':', len - hlen - 1))
            return unbracketed_ipv6(ctx, s, len);
        if (hlen == 0)
            return kvf__err(-KVF_EINVAL, "%s: empty host in '%.*s'", ctx, (int)len, s);
        int rc = parse_plain_host(ctx, s, hlen, out);
        if (rc < 0)
            return rc;
        snprintf(shown, sizeof(shown), "%s", out->host);
        port = colon + 1;
        port_len = len - hlen - 1;
    }
    return parse_port(ctx, shown, port, port_len, allow_port0, out);
}

int kvf__store_url_parse(const char *url, int allow_port0, kvf_store_url_t *out)
{
    char ctx[CTX_INPUT_MAX + 32];
    kvf_store_url_t u;
    unsigned max_hosts = 0;

    if (!url)
        return kvf__err(-KVF_EINVAL, "store url is NULL; want " VALID_SCHEMES " and host:port");
    if (!out)
        return kvf__err(-KVF_EINVAL, "store url %s: no output struct", url);
    if (!url[0])
        return kvf__err(-KVF_EINVAL, "store url is empty; want " VALID_SCHEMES " and host:port");
    format_ctx(ctx, sizeof(ctx), "store url", url);

    const char *sep = strstr(url, "://");
    if (!sep)
        return kvf__err(-KVF_EINVAL, "%s: missing scheme; want " VALID_SCHEMES, ctx);
    size_t slen = (size_t)(sep - url);
    memset(&u, 0, sizeof(u));
    for (size_t i = 0; i < KVF__ARRAY_SIZE(schemes); i++) {
        if (strlen(schemes[i].name) != slen)
            continue;
        if (memcmp(url, schemes[i].name, slen) == 0) {
            u.scheme = schemes[i].scheme;
            max_hosts = schemes[i].max_hosts;
            break;
        }
        if (strncasecmp(url, schemes[i].name, slen) == 0)
            return kvf__err(-KVF_EINVAL, "%s: scheme '%.*s' must be lowercase (%s://)", ctx,
                            (int)slen, url, schemes[i].name);
    }
    if (!max_hosts)
        return kvf__err(-KVF_EINVAL, "%s: unknown scheme '%.*s'; valid schemes are " VALID_SCHEMES,
                        ctx, (int)slen, url);

    const char *p = sep + 3;
    char hostpart[KVF_HOST_MAX + 16];
    if (u.scheme == KVF_STORE_SCHEME_P2P) {
        /* No store at all: each peer is asked for its records on its own session port. */
        if (*p)
            return kvf__err(-KVF_EINVAL,
                            "%s: p2p:// takes nothing after '://' (peers are found by their "
                            "session ids, not through a store)",
                            ctx);
        *out = u;
        return 0;
    }
    if (u.scheme == KVF_STORE_SCHEME_REDIS || u.scheme == KVF_STORE_SCHEME_ETCD) {
        /* redis://[user:password@]host:port[/db], etcd://user:password@host:port[,...]; the
         * credentials are never echoed in messages. */
        const char *at = strrchr(p, '@');
        if (at) {
            const char *colon = memchr(p, ':', (size_t)(at - p));
            size_t ul = colon ? (size_t)(colon - p) : 0;
            size_t pl = colon ? (size_t)(at - colon - 1) : (size_t)(at - p);
            const char *pw = colon ? colon + 1 : p;
            if (ul >= KVF_URL_CRED_MAX || pl >= KVF_URL_CRED_MAX)
                return kvf__err(-KVF_EINVAL, "store url %.*s://...@%s: user or password longer "
                                "than %d bytes", (int)slen, url, at + 1, KVF_URL_CRED_MAX - 1);
            if (pl == 0)
                return kvf__err(-KVF_EINVAL, "store url %.*s://...@%s: empty password before "
                                "'@'", (int)slen, url, at + 1);
            if (ul == 0 && u.scheme == KVF_STORE_SCHEME_ETCD)
                return kvf__err(-KVF_EINVAL, "store url etcd://...@%s: etcd needs a user name "
                                "(etcd://user:password@host:port)", at + 1);
            memcpy(u.user, p, ul);
            memcpy(u.password, pw, pl);
            p = at + 1;
            snprintf(ctx, sizeof(ctx), "store url %.*s://...@%.*s", (int)slen, url, CTX_INPUT_MAX,
                     p);
        }
        const char *slash = u.scheme == KVF_STORE_SCHEME_REDIS ? strchr(p, '/') : NULL;
        if (slash) {
            char *end = NULL;
            unsigned long db = strtoul(slash + 1, &end, 10);
            if (!slash[1] || *end || db > KVF_URL_MAX_DB || slash[1] < '0' || slash[1] > '9')
                return kvf__err(-KVF_EINVAL, "%s: database '%s' is not a number 0..%d", ctx,
                                slash + 1, KVF_URL_MAX_DB);
            if ((size_t)(slash - p) >= sizeof(hostpart))
                return kvf__err(-KVF_EINVAL, "%s: host too long", ctx);
            memcpy(hostpart, p, (size_t)(slash - p));
            hostpart[slash - p] = '\0';
            u.db = (unsigned)db;
            p = hostpart;
        }
    }
    if (!*p)
        return kvf__err(-KVF_EINVAL, "%s: missing host and port after '%.*s://'", ctx, (int)slen,
                        url);
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (u.nhosts == max_hosts) {
            if (max_hosts == 1)
                return kvf__err(-KVF_EINVAL,
                                "%s: %.*s:// takes one host:port (unexpected ',%s'); only "
                                "etcd:// takes a list",
                                ctx, (int)slen, url, p);
            return kvf__err(-KVF_EINVAL, "%s: more than %d endpoints", ctx, KVF_URL_MAX_HOSTS);
        }
        if (len == 0)
            return kvf__err(-KVF_EINVAL, "%s: empty endpoint %u in the list", ctx, u.nhosts + 1);
        int rc = parse_endpoint(ctx, p, len, allow_port0, &u.hosts[u.nhosts]);
        if (rc < 0)
            return rc;
        u.nhosts++;
        if (!comma)
            break;
        p = comma + 1;
    }
    *out = u;
    return 0;
}

int kvf__session_id_parse(const char *sid, kvf_hostport_t *out)
{
    char ctx[CTX_INPUT_MAX + 32];
    kvf_hostport_t hp;

    if (!sid)
        return kvf__err(-KVF_EINVAL, "session id is NULL; want ip:port, [ipv6]:port or host:port");
    if (!out)
        return kvf__err(-KVF_EINVAL, "session id %s: no output struct", sid);
    if (!sid[0])
        return kvf__err(-KVF_EINVAL, "session id is empty; want ip:port, [ipv6]:port or host:port");
    format_ctx(ctx, sizeof(ctx), "session id", sid);
    if (strstr(sid, "://"))
        return kvf__err(-KVF_EINVAL, "%s: a session id takes no scheme; want ip:port", ctx);
    int rc = parse_endpoint(ctx, sid, strlen(sid), 1, &hp);
    if (rc < 0)
        return rc;
    *out = hp;
    return 0;
}

char *kvf__hostport_format(const kvf_hostport_t *hp, char *buf, size_t len)
{
    if (!buf || len == 0)
        return buf;
    if (hp->kind == KVF_HOST_IPV6)
        snprintf(buf, len, "[%s]:%u", hp->host, (unsigned)hp->port);
    else
        snprintf(buf, len, "%s:%u", hp->host, (unsigned)hp->port);
    return buf;
}

/* ---------------------------------------------------------------------------------------------
 * The public face of the parsers above (include/kvferry.h): plain strings instead of
 * kvf_hostport_t, for programs outside the library.
 * ------------------------------------------------------------------------------------------- */

/* Copy the parsed host of @what (a session id or a store url, for the message) into the caller's
 * buffer, when there is one, or fail with -KVF_ERANGE writing nothing. */
static int host_out(const char *what, const char *input, const kvf_hostport_t *hp, char *host,
                    size_t host_len, uint16_t *port)
{
    size_t n = strlen(hp->host);
    if (host && n >= host_len)
        return kvf__err(-KVF_ERANGE, "%s %.*s: host %s needs %zu bytes; the buffer has %zu", what,
                        CTX_INPUT_MAX, input, hp->host, n + 1, host_len);
    if (host)
        memcpy(host, hp->host, n + 1);
    if (port)
        *port = hp->port;
    return 0;
}

int kvf_session_id_parse(const char *sid, char *host, size_t host_len, uint16_t *port)
{
    kvf_hostport_t hp;
    int rc = kvf__session_id_parse(sid, &hp);
    if (rc < 0)
        return rc;
    return host_out("session id", sid, &hp, host, host_len, port);
}

int kvf_session_id_format(const char *host, uint16_t port, char *buf, size_t len)
{
    char text[KVF_SESSION_ID_MAX];
    kvf_hostport_t hp;

    if (!host || !host[0])
        return kvf__err(-KVF_EINVAL, "session id host is %s; want an IP address or a host name",
                        host ? "empty" : "NULL");
    if (strlen(host) >= KVF_HOST_MAX)
        return kvf__err(-KVF_EINVAL, "session id host %.64s... is longer than %d bytes", host,
                        KVF_HOST_MAX - 1);
    /* Only an IPv6 address holds a ':'; a stray one is caught by the parse below. */
    if (strchr(host, ':'))
        snprintf(text, sizeof(text), "[%s]:%u", host, (unsigned)port);
    else
        snprintf(text, sizeof(text), "%s:%u", host, (unsigned)port);
    /* The host is checked by the very rules every session id is parsed by, so that what this
     * writes is always accepted back. */
    int rc = kvf__session_id_parse(text, &hp);
    if (rc < 0)
        return rc;
    size_t n = strlen(text);
    if (!buf || n >= len)
        return kvf__err(-KVF_ERANGE, "session id %s needs %zu bytes; the buffer has %zu", text,
                        n + 1, buf ? len : 0);
    memcpy(buf, text, n + 1);
    return 0;
}

int kvf_store_url_parse(const char *url, const char **scheme, char *host, size_t host_len,
                        uint16_t *port)
{
    kvf_store_url_t u;
    int rc = kvf__store_url_parse(url, 0, &u);
    if (rc < 0)
        return rc;
    /* p2p:// names no host: "" and port 0. */
    rc = host_out("store url", url, &u.hosts[0], host, host_len, port);
    if (rc < 0)
        return rc;
    if (scheme)
        for (size_t i = 0; i < KVF__ARRAY_SIZE(schemes); i++)
            if (schemes[i].scheme == u.scheme)
                *scheme = schemes[i].name;
    return 0;
}

bool kvf__hostport_is_loopback(const kvf_hostport_t *hp)
{
    if (hp->kind == KVF_HOST_IPV4)
        return strncmp(hp->host, "127.", 4) == 0;
    if (hp->kind == KVF_HOST_IPV6)
        return strcmp(hp->host, "::1") == 0;
    return strcasecmp(hp->host, "localhost") == 0;
}
