/*
 * Parsers for store URLs and session ids. They check syntax and address form only; nothing
 * here touches the network, so bad input is reported at once.
 */
#ifndef KVF_URL_H
#define KVF_URL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVF_HOST_MAX 256       /* bytes of a host name or address, with its NUL */
#define KVF_URL_MAX_HOSTS 16   /* endpoints in one etcd:// URL */
#define KVF_URL_CRED_MAX 128   /* bytes of a redis:// user or password, with its NUL */
#define KVF_URL_MAX_DB 1023    /* highest redis:// database number accepted */

typedef enum {
    KVF_HOST_NAME = 0, /* a DNS name such as "decode-0" or "localhost" */
    KVF_HOST_IPV4 = 4,
    KVF_HOST_IPV6 = 6,
} kvf_host_kind_t;

/* host:port. For IPv6 `host` holds the address without brackets. */
typedef struct {
    char host[KVF_HOST_MAX];
    kvf_host_kind_t kind;
    uint16_t port;
} kvf_hostport_t;

typedef enum {
    KVF_STORE_SCHEME_TCP,   /* built-in store */
    KVF_STORE_SCHEME_ETCD,  /* etcd v3 JSON gateway, one or more endpoints */
    KVF_STORE_SCHEME_REDIS,
    KVF_STORE_SCHEME_P2P,   /* no store: "p2p://", records asked of each peer (common/p2p.h) */
} kvf_store_scheme_t;

typedef struct {
    kvf_store_scheme_t scheme;
    unsigned nhosts;                       /* 1 except for etcd:// (1..16) and p2p:// (0) */
    kvf_hostport_t hosts[KVF_URL_MAX_HOSTS];
    /* "redis://[user:password@]host:port[/db]", "etcd://user:password@host:port[,...]" */
    char user[KVF_URL_CRED_MAX];     /* "" = none (Redis: the default user) */
    char password[KVF_URL_CRED_MAX]; /* "" = no authentication */
    unsigned db;                     /* redis:// only: 0..KVF_URL_MAX_DB */
} kvf_store_url_t;

/*
 * kvf__store_url_parse - parse "tcp://host:port", "tcp://[v6]:port", "etcd://h:p[,h:p...]" or
 * "redis://[user:password@]h:p[/db]"; etcd:// takes "user:password@" too; "p2p://" (exactly)
 * is no store at all (nhosts 0).
 * @allow_port0: accept port 0 (a server that picks a free port); clients pass 0.
 * Returns 0 or -KVF_EINVAL with a last-error message naming the bad part, e.g.
 * "store url tcp://192.168.1.1000:8000: 192.168.1.1000 is not a valid IPv4 address".
 */
int kvf__store_url_parse(const char *url, int allow_port0, kvf_store_url_t *out);

/*
 * kvf__session_id_parse - parse a session id "ip:port", "[v6]:port" or "host:port".
 * Port 0 is accepted and means "choose a free port".
 * Returns 0 or -KVF_EINVAL naming the bad part.
 */
int kvf__session_id_parse(const char *sid, kvf_hostport_t *out);

/*
 * kvf__hostport_format - write "host:port" or "[v6]:port" into @buf (at least
 * KVF_SESSION_ID_MAX bytes). Returns @buf.
 */
char *kvf__hostport_format(const kvf_hostport_t *hp, char *buf, size_t len);

/* Whether @hp names only this host: 127.0.0.0/8, ::1, or "localhost". A wildcard (0.0.0.0, ::)
 * or any other address is reachable from the network. */
bool kvf__hostport_is_loopback(const kvf_hostport_t *hp);

#endif /* KVF_URL_H */
