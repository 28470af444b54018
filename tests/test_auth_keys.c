/*
 * Key files and key rotation (docs/security.md, "Key files" and "Key rotation"): what a key file
 * may be (a symlink to a private regular file, as a Kubernetes Secret is; owned by this user or
 * root; group read allowed, nothing more), what it may hold (one random key, or two during a
 * rotation), and a rotation's grace period: a node with the new and the previous key talks to
 * nodes that have either, and a node with neither is refused.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/auth.h"
#include "test_util.h"

typedef struct {
    char dir[64];
    char path[8][128];
    int n;
} files_t;

static void files_init(files_t *fs)
{
    snprintf(fs->dir, sizeof(fs->dir), "/tmp/kvf-keys-XXXXXX");
    assert_non_null(mkdtemp(fs->dir));
    fs->n = 0;
}

/* A file @name in the directory with @text and @mode; its path. */
static const char *file(files_t *fs, const char *name, const char *text, mode_t mode)
{
    assert_true(fs->n < 8);
    char *p = fs->path[fs->n++], tmp[sizeof(fs->path[0])];
    snprintf(tmp, sizeof(tmp), "%s/%s", fs->dir, name);
    memcpy(p, tmp, sizeof(tmp));
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    assert_int_equal(chmod(p, mode), 0);
    return p;
}

/* A fresh key's file @name (kvf_auth_keygen); its path. */
static const char *keyfile(files_t *fs, const char *name)
{
    assert_true(fs->n < 8);
    char *p = fs->path[fs->n++], tmp[sizeof(fs->path[0])];
    snprintf(tmp, sizeof(tmp), "%s/%s", fs->dir, name);
    memcpy(p, tmp, sizeof(tmp));
    assert_kvf_ok(kvf_auth_keygen(p));
    return p;
}

/* The hex text of key file @path (one line). */
static void key_text(const char *path, char *out, size_t len)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(out, (int)len, f));
    fclose(f);
    out[strcspn(out, "\n")] = '\0';
}

static void files_fini(files_t *fs)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", fs->dir);
    assert_int_equal(system(cmd), 0);
}

#define KEY32 "00112233445566778899aabbccddeeff"

/* A symlink to a private regular file is followed (a Kubernetes Secret mount is two levels of
 * them); a symlink to something else, or to nothing, is refused naming the path. */
static void key_file_symlinks(void **state)
{
    (void)state;
    files_t fs;
    files_init(&fs);
    /* The layout kubelet makes: key -> ..data/key, ..data -> ..2026_12_05_.../ */
    char real[160], data[160], link[160], dirlink[160], fifo[160];
    snprintf(real, sizeof(real), "%s/..2026_12_05", fs.dir);
    assert_int_equal(mkdir(real, 0755), 0);
    snprintf(real, sizeof(real), "%s/..2026_12_05/cluster.key", fs.dir);
    FILE *f = fopen(real, "w");
    assert_non_null(f);
    fputs(KEY32 "\n", f);
    fclose(f);
    assert_int_equal(chmod(real, 0400), 0);
    snprintf(data, sizeof(data), "%s/..data", fs.dir);
    assert_int_equal(symlink("..2026_12_05", data), 0);
    snprintf(link, sizeof(link), "%s/cluster.key", fs.dir);
    assert_int_equal(symlink("..data/cluster.key", link), 0);
    kvf_auth_key_t k;
    assert_kvf_ok(kvf__auth_key_resolve(link, &k));
    assert_int_equal(k.len, 16);
    assert_int_equal(k.bytes[15], 0xff);
    assert_int_equal(k.prev_len, 0);

    snprintf(dirlink, sizeof(dirlink), "%s/dir.key", fs.dir);
    assert_int_equal(symlink("..data", dirlink), 0);
    assert_kvf_err(kvf__auth_key_resolve(dirlink, &k), -KVF_EINVAL);
    assert_last_error_contains("dir.key: not a regular file");
    snprintf(fifo, sizeof(fifo), "%s/fifo.key", fs.dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    assert_kvf_err(kvf__auth_key_resolve(fifo, &k), -KVF_EINVAL); /* and no hang */
    assert_last_error_contains("fifo.key: not a regular file");
    snprintf(dirlink, sizeof(dirlink), "%s/dangling.key", fs.dir);
    assert_int_equal(symlink("nowhere", dirlink), 0);
    assert_kvf_err(kvf__auth_key_resolve(dirlink, &k), -ENOENT);
    assert_last_error_contains("dangling.key: No such file or directory");
    /* The target's mode counts, not the link's. */
    assert_int_equal(chmod(real, 0644), 0);
    assert_kvf_err(kvf__auth_key_resolve(link, &k), -KVF_EINVAL);
    assert_last_error_contains("cluster.key: mode 0644 lets others use it; chmod 600 it");
    files_fini(&fs);
}

/* Group read is allowed (0640, 0440); other read and any write but the owner's are not, with a
 * message naming the path, the mode and the fix. */
static void key_file_modes(void **state)
{
    (void)state;
    files_t fs;
    files_init(&fs);
    kvf_auth_key_t k;
    static const struct {
        mode_t mode;
        const char *err; /* NULL: accepted */
    } cases[] = {
        {0600, NULL},
        {0400, NULL},
        {0640, NULL},
        {0440, NULL},
        {0644, "mode 0644 lets others use it; chmod 600 it (640 to share it with a group; in "
               "Kubernetes, defaultMode 0400, or 0440 with fsGroup)"},
        {0604, "mode 0604 lets others use it"},
        {0601, "mode 0601 lets others use it"},
        {0660, "mode 0660 lets group or others write it; chmod 600 it (640 to share it with a "
               "group)"},
        {0622, "mode 0622 lets group or others write it"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char name[32];
        snprintf(name, sizeof(name), "m%zu.key", i);
        const char *p = file(&fs, name, KEY32 "\n", cases[i].mode);
        if (!cases[i].err) {
            assert_kvf_ok(kvf__auth_key_resolve(p, &k));
            assert_int_equal(k.len, 16);
        } else {
            assert_kvf_err(kvf__auth_key_resolve(p, &k), -KVF_EINVAL);
            assert_last_error_contains(p);
            assert_last_error_contains(cases[i].err);
        }
        unlink(p);
        fs.n--;
    }
    files_fini(&fs);
}

/* A key file another user owns is refused (it, or the symlink to it, could be swapped for a key
 * of theirs). Needs root to make one. */
static void key_file_owner(void **state)
{
    (void)state;
    if (geteuid() != 0)
        kvf_test_skip("making a file another user owns needs root");
    files_t fs;
    files_init(&fs);
    const char *p = file(&fs, "theirs.key", KEY32 "\n", 0600);
    assert_int_equal(chown(p, 65534, 65534), 0);
    kvf_auth_key_t k;
    assert_kvf_err(kvf__auth_key_resolve(p, &k), -KVF_EINVAL);
    assert_last_error_contains("theirs.key: owned by uid 65534, not by this user (uid 0) or root");
    assert_int_equal(chown(p, 0, 0), 0);
    assert_kvf_ok(kvf__auth_key_resolve(p, &k));
    files_fini(&fs);
}

/* What a key file may hold: one key or two (the current one, then the previous), comments; not
 * a placeholder, not too short, not three keys, not nothing. */
static void key_file_contents(void **state)
{
    (void)state;
    files_t fs;
    files_init(&fs);
    kvf_auth_key_t k;
    const char *p = file(&fs, "two.key",
                         "# current\n" KEY32 "\n# previous, until every node has the current\n"
                         "ffeeddccbbaa99887766554433221100ff\n",
                         0600);
    assert_kvf_ok(kvf__auth_key_resolve(p, &k));
    assert_int_equal(k.len, 16);
    assert_int_equal(k.bytes[0], 0x00);
    assert_int_equal(k.prev_len, 17);
    assert_int_equal(k.prev[0], 0xff);

    static const struct {
        const char *text, *err;
    } bad[] = {
        {"0000000000000000000000000000000000000000000000000000000000000000\n",
         "every byte is 0x00: a placeholder, not a random key (make one with `kvferry keygen`)"},
        {"ffffffffffffffffffffffffffffffff", "every byte is 0xff: a placeholder"},
        {KEY32 "\n00000000000000000000000000000000\n",
         "(its second key, the previous one): every byte is 0x00"},
        {"0011223344\n", "10 characters; a key is 32..128 hex digits"},
        {KEY32 " 0011\n", "(its second key, the previous one): 4 characters"},
        {KEY32 "\n" KEY32 "\n" KEY32 "\n",
         "holds more than two keys; it holds one (make it with `kvferry keygen`), or two during "
         "a rotation: the current one, then the previous one"},
        {"# nothing yet\n\n", "holds no keys"},
        {"", "holds no keys"},
        {"0011223344556677889aabbccddeeffx\n", "character 32 is not a hex digit"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char name[32];
        snprintf(name, sizeof(name), "bad%zu.key", i);
        p = file(&fs, name, bad[i].text, 0600);
        assert_kvf_err(kvf__auth_key_resolve(p, &k), -KVF_EINVAL);
        assert_last_error_contains(p);
        assert_last_error_contains(bad[i].err);
        /* Nothing of a refused file is kept. */
        assert_int_equal(k.len, 0);
        assert_int_equal(k.prev_len, 0);
        unlink(p);
        fs.n--;
    }
    files_fini(&fs);
}

/* ---- rotation -------------------------------------------------------------------------------- */

#define XLEN (256u * 1024)

/* A tcp-only engine of @role proving key file @key at store @url. */
static kvf_engine_t *engine(const char *url, kvf_role_t role, const char *key)
{
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = key;
    cfg.transport = KVF_TRANSPORT_TCP;
    return kvf_test_engine(url, role, &cfg);
}

/* @from writes XLEN bytes of pattern @seed into @to's registered @dst; returns the result, and
 * when 0 the bytes are checked. */
static int write_into(kvf_engine_t *from, kvf_engine_t *to, uint8_t *dst, uint32_t seed)
{
    uint8_t *src = malloc(XLEN);
    assert_non_null(src);
    kvf_test_pattern(src, XLEN, seed);
    memset(dst, 0, XLEN);
    kvf_xfer_t x = {.op = KVF_OP_WRITE, .local = src, .remote = (uintptr_t)dst, .len = XLEN};
    int rc = kvf_transfer_sync(from, kvf_engine_session_id(to), &x, 1);
    if (rc == 0)
        assert_memory_equal(dst, src, XLEN);
    free(src);
    return rc;
}

/*
 * A rotation from key A to key B, half way: the store and one Decode have "B then A", one node
 * still has only A, one already only B. Each talks to the B+A nodes both ways (bytes checked);
 * the A-only and B-only nodes share no key and refuse each other; a node with only C is refused
 * by the store and by an engine.
 */
static void rotation_grace_period(void **state)
{
    (void)state;
    files_t fs;
    files_init(&fs);
    const char *a = keyfile(&fs, "a.key"), *b = keyfile(&fs, "b.key"), *c = keyfile(&fs, "c.key");
    char ta[160], tb[160], both[400];
    key_text(a, ta, sizeof(ta));
    key_text(b, tb, sizeof(tb));
    snprintf(both, sizeof(both), "# current\n%s\n# previous\n%s\n", tb, ta);
    const char *ba = file(&fs, "rotating.key", both, 0600);

    kvf_store_server_opts_t so;
    kvf_store_server_opts_init(&so);
    so.auth_key_file = ba;
    kvf_store_server_t *srv = NULL;
    assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &so, &srv));
    const char *url = kvf_store_server_url(srv);

    kvf_engine_t *e_ba = engine(url, KVF_ROLE_BOTH, ba);
    kvf_engine_t *e_a = engine(url, KVF_ROLE_BOTH, a);
    kvf_engine_t *e_b = engine(url, KVF_ROLE_BOTH, b);
    uint8_t *m_ba = malloc(XLEN), *m_a = malloc(XLEN), *m_b = malloc(XLEN);
    assert_true(m_ba && m_a && m_b);
    assert_kvf_ok(kvf_mem_register(e_ba, m_ba, XLEN));
    assert_kvf_ok(kvf_mem_register(e_a, m_a, XLEN));
    assert_kvf_ok(kvf_mem_register(e_b, m_b, XLEN));

    assert_kvf_ok(write_into(e_a, e_ba, m_ba, 1));  /* A proves; B+A accepts its previous key */
    assert_kvf_ok(write_into(e_ba, e_a, m_a, 2));   /* B+A proves both; A accepts the second */
    assert_kvf_ok(write_into(e_b, e_ba, m_ba, 3));  /* B proves; B+A accepts its current key */
    assert_kvf_ok(write_into(e_ba, e_b, m_b, 4));   /* B+A proves both; B accepts the first */
    assert_kvf_err(write_into(e_a, e_b, m_b, 5), -KVF_EAUTH);
    assert_last_error_contains("wrong key");
    assert_kvf_err(write_into(e_b, e_a, m_a, 6), -KVF_EAUTH);
    assert_last_error_contains("wrong key");

    /* C: refused by the store (create fails) and by an engine's port. */
    kvf_config_t cfg;
    kvf_config_init(&cfg);
    cfg.auth_key_file = c;
    kvf_engine_t *e_c = NULL;
    assert_kvf_err(kvf_engine_create(url, "127.0.0.1:0", KVF_ROLE_PREFILL, 0, &cfg, &e_c),
                   -KVF_EAUTH);
    assert_last_error_contains("wrong key: the proof does not match this side's key");
    kvf_auth_key_t kc;
    assert_kvf_ok(kvf__auth_key_resolve(c, &kc));
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(kvf_engine_port(e_ba)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    char why[256];
    assert_int_equal(kvf__auth_client(fd, &kc, "127.0.0.1:1", kvf__now_ms() + 5000,
                                      kvf_engine_session_id(e_ba), why, sizeof(why)),
                     -KVF_EAUTH);
    if (!strstr(why, "refused by the peer: wrong key"))
        fail_msg("why: %s", why);
    close(fd);
    kvf__auth_key_wipe(&kc);
    /* Store clients: B+A is a member of an A-only store, and of a B-only one. */
    for (int i = 0; i < 2; i++) {
        kvf_store_server_opts_t o1;
        kvf_store_server_opts_init(&o1);
        o1.auth_key_file = i ? b : a;
        kvf_store_server_t *s1 = NULL;
        assert_kvf_ok(kvf_store_server_start_opts("tcp://127.0.0.1:0", &o1, &s1));
        kvf_store_opts_t co;
        kvf_store_opts_init(&co);
        co.auth_key_file = ba;
        kvf_store_t *st = NULL;
        assert_kvf_ok(kvf_store_open(kvf_store_server_url(s1), &co, &st));
        assert_kvf_ok(kvf_store_set(st, "k", "v", 1, 0));
        kvf_store_close(st);
        co.auth_key_file = c;
        assert_kvf_err(kvf_store_open(kvf_store_server_url(s1), &co, &st), -KVF_EAUTH);
        kvf_store_server_stop(s1);
    }

    kvf_engine_destroy(e_b);
    kvf_engine_destroy(e_a);
    kvf_engine_destroy(e_ba);
    free(m_ba);
    free(m_a);
    free(m_b);
    kvf_store_server_stop(srv);
    files_fini(&fs);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(key_file_symlinks),
    cmocka_unit_test(key_file_modes),
    cmocka_unit_test(key_file_owner),
    cmocka_unit_test(key_file_contents),
    cmocka_unit_test(rotation_grace_period),
};

KVF_TEST_MAIN(tests)
