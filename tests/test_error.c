/* Error codes, their names and texts, and the thread-local last-error message. */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <string.h>

#include "test_util.h"

#include "common/common.h"

/* Built from the same X-macro as the enum, so a new entry is tested without editing this file. */
static const struct {
    int code;
    const char *name;
    const char *msg;
} kvf_errors[] = {
#define ERR_ROW(name, off, msg) {KVF_##name, "KVF_" #name, msg},
    KVF_ERRNO_MAP(ERR_ROW)
#undef ERR_ROW
};

static void every_kvf_code_has_name_and_message(void **state)
{
    (void)state;
    assert_true(KVF__ARRAY_SIZE(kvf_errors) > 0);
    for (size_t i = 0; i < KVF__ARRAY_SIZE(kvf_errors); i++) {
        int code = kvf_errors[i].code;
        print_message("%s\n", kvf_errors[i].name);
        assert_true(code > KVF_ERRNO_OFFSET);
        /* Functions return the negation; positive codes are accepted too. */
        assert_string_equal(kvf_err_name(-code), kvf_errors[i].name);
        assert_string_equal(kvf_err_name(code), kvf_errors[i].name);
        assert_string_equal(kvf_strerror(-code), kvf_errors[i].msg);
        assert_string_equal(kvf_strerror(code), kvf_errors[i].msg);
        assert_true(strlen(kvf_strerror(-code)) > 0);
        assert_string_not_equal(kvf_strerror(-code), "unknown error");
    }
}

static void kvf_codes_names_and_messages_are_distinct(void **state)
{
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(kvf_errors); i++) {
        for (size_t j = i + 1; j < KVF__ARRAY_SIZE(kvf_errors); j++) {
            assert_int_not_equal(kvf_errors[i].code, kvf_errors[j].code);
            assert_string_not_equal(kvf_err_name(-kvf_errors[i].code),
                                    kvf_err_name(-kvf_errors[j].code));
            assert_string_not_equal(kvf_strerror(-kvf_errors[i].code),
                                    kvf_strerror(-kvf_errors[j].code));
        }
    }
}

/* The numbers of every code, written out: they cross the wire (store and tcp answers) and the
 * Python API, so a renumbering or a reuse must fail here even though the table above would follow
 * it. A new code gets its row here. */
static void codes_pinned_to_their_wire_values(void **state)
{
    static const struct {
        int code;
        int value;
        const char *name;
    } pinned[] = {
        {KVF_EINVAL, 1001, "KVF_EINVAL"},       {KVF_ENOTFOUND, 1002, "KVF_ENOTFOUND"},
        {KVF_ETIMEDOUT, 1003, "KVF_ETIMEDOUT"}, {KVF_EEXIST, 1004, "KVF_EEXIST"},
        {KVF_ERANGE, 1005, "KVF_ERANGE"},       {KVF_ENOTREG, 1006, "KVF_ENOTREG"},
        {KVF_EPEERGONE, 1007, "KVF_EPEERGONE"}, {KVF_EAUTH, 1008, "KVF_EAUTH"},
        {KVF_EPROTO, 1009, "KVF_EPROTO"},       {KVF_ENOTSUP, 1010, "KVF_ENOTSUP"},
        {KVF_EBUSY, 1011, "KVF_EBUSY"},         {KVF_ECANCELED, 1012, "KVF_ECANCELED"},
        {KVF_ECASMISMATCH, 1013, "KVF_ECASMISMATCH"},
        {KVF_ESTALE, 1014, "KVF_ESTALE"},       {KVF_ETOOBIG, 1015, "KVF_ETOOBIG"},
        {KVF_EBADVALUE, 1016, "KVF_EBADVALUE"}, {KVF_ESTOREDOWN, 1017, "KVF_ESTOREDOWN"},
        {KVF_ECLOSED, 1018, "KVF_ECLOSED"},     {KVF_ENOMEM, 1019, "KVF_ENOMEM"},
        {KVF_ETLS, 1020, "KVF_ETLS"},
    };
    (void)state;
    assert_int_equal(KVF_ERRNO_OFFSET, 1000);
    assert_int_equal(KVF_OK, 0);
    /* Every code of the table is pinned: none added without a row here. */
    assert_int_equal(KVF__ARRAY_SIZE(pinned), KVF__ARRAY_SIZE(kvf_errors));
    for (size_t i = 0; i < KVF__ARRAY_SIZE(pinned); i++) {
        print_message("%s\n", pinned[i].name);
        assert_int_equal(pinned[i].code, pinned[i].value);
        /* By number, not by enum: what a peer or a Python caller holds. */
        assert_string_equal(kvf_err_name(-pinned[i].value), pinned[i].name);
    }
    assert_string_equal(kvf_strerror(-1001), "invalid argument");
    assert_string_equal(kvf_strerror(-1003), "timed out");
}

static void system_errno_codes(void **state)
{
    static const struct {
        int err;
        const char *name;
    } cases[] = {
        {ECONNREFUSED, "ECONNREFUSED"}, {ENOENT, "ENOENT"},   {EAGAIN, "EAGAIN"},
        {ETIMEDOUT, "ETIMEDOUT"},       {EPIPE, "EPIPE"},     {ECONNRESET, "ECONNRESET"},
        {EADDRINUSE, "EADDRINUSE"},     {ENOMEM, "ENOMEM"},   {EPERM, "EPERM"},
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(cases); i++) {
        print_message("%s\n", cases[i].name);
        assert_string_equal(kvf_err_name(-cases[i].err), cases[i].name);
        assert_string_equal(kvf_err_name(cases[i].err), cases[i].name);
        /* The test never calls setlocale(), so strerror() is the untranslated text too. */
        assert_string_equal(kvf_strerror(-cases[i].err), strerror(cases[i].err));
        assert_string_equal(kvf_strerror(cases[i].err), strerror(cases[i].err));
    }
    assert_string_equal(kvf_strerror(-ECONNREFUSED), "Connection refused");
    /* -ETIMEDOUT and -KVF_ETIMEDOUT are different codes with different names. */
    assert_string_not_equal(kvf_err_name(-ETIMEDOUT), kvf_err_name(-KVF_ETIMEDOUT));
}

static void zero_is_success(void **state)
{
    (void)state;
    assert_string_equal(kvf_err_name(0), "KVF_OK");
    assert_string_equal(kvf_strerror(0), "success");
}

static void unknown_codes(void **state)
{
    static const int codes[] = {
        999,                    /* below the offset, but no errno has it */
        KVF_ERRNO_OFFSET,       /* offset 0 is not a code */
        KVF_ERRNO_OFFSET + 500, /* past the table */
        123456,
    };
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(codes); i++) {
        print_message("%d\n", codes[i]);
        assert_string_equal(kvf_err_name(-codes[i]), "UNKNOWN");
        assert_string_equal(kvf_err_name(codes[i]), "UNKNOWN");
        assert_string_equal(kvf_strerror(-codes[i]), "unknown error");
        assert_string_equal(kvf_strerror(codes[i]), "unknown error");
    }
}

static void last_error_set_by_failing_call(void **state)
{
    (void)state;
    kvf_last_error_clear();
    assert_string_equal(kvf_last_error(), "");
    assert_kvf_err(kvf_log_set_level(7), -KVF_EINVAL);
    assert_last_error_contains("log level 7");
}

static void last_error_survives_success(void **state)
{
    (void)state;
    kvf_last_error_clear();
    assert_kvf_err(kvf_log_set_level(7), -KVF_EINVAL);
    assert_kvf_ok(kvf_log_set_level(kvf_log_get_level()));
    assert_last_error_contains("log level 7");
}

static void last_error_clear(void **state)
{
    (void)state;
    assert_kvf_err(kvf_log_set_level(7), -KVF_EINVAL);
    assert_string_not_equal(kvf_last_error(), "");
    kvf_last_error_clear();
    assert_non_null(kvf_last_error());
    assert_string_equal(kvf_last_error(), "");
}

struct thread_result {
    int use_set;       /* fail through kvf_last_error_set() rather than a failing call */
    char initial[64];  /* kvf_last_error() when the thread starts */
    int rc;            /* of its own failing call */
    char after[1024];  /* kvf_last_error() after that call */
};

static void *other_thread(void *arg)
{
    struct thread_result *r = arg;
    snprintf(r->initial, sizeof(r->initial), "%s", kvf_last_error());
    if (r->use_set)
        r->rc = kvf_last_error_set(-KVF_EPEERGONE, "set by the other thread");
    else
        r->rc = kvf_log_set_level(-5);
    snprintf(r->after, sizeof(r->after), "%s", kvf_last_error());
    return NULL;
}

static void last_error_is_thread_local(void **state)
{
    struct thread_result r;
    pthread_t t;
    (void)state;
    memset(&r, 0, sizeof(r));
    kvf_last_error_clear();
    assert_kvf_err(kvf_log_set_level(7), -KVF_EINVAL);

    assert_int_equal(pthread_create(&t, NULL, other_thread, &r), 0);
    assert_int_equal(pthread_join(t, NULL), 0);

    /* The new thread did not see this thread's message... */
    assert_string_equal(r.initial, "");
    /* ...got its own... */
    assert_int_equal(r.rc, -KVF_EINVAL);
    assert_non_null(strstr(r.after, "log level -5"));
    assert_null(strstr(r.after, "log level 7"));
    /* ...and left this thread's alone. */
    assert_last_error_contains("log level 7");
    assert_null(strstr(kvf_last_error(), "-5"));
}

/* kvf_last_error_set: what bindings and wrappers use to report their own failures. */
static void last_error_set_is_read_back(void **state)
{
    (void)state;
    kvf_last_error_clear();
    assert_int_equal(kvf_last_error_set(-KVF_ENOTSUP, "tls %s for %s", "on", "tcp://h:1"),
                     -KVF_ENOTSUP);
    assert_string_equal(kvf_last_error(), "tls on for tcp://h:1");
    /* A later message replaces the earlier one, and may quote it. */
    assert_int_equal(kvf_last_error_set(-KVF_EINVAL, "wrapper: %s", kvf_last_error()),
                     -KVF_EINVAL);
    assert_string_equal(kvf_last_error(), "wrapper: tls on for tcp://h:1");
}

static void last_error_set_returns_the_code(void **state)
{
    static const int codes[] = {0, -KVF_EINVAL, -KVF_ECLOSED, -ECONNREFUSED, -ETIMEDOUT, INT_MIN};
    (void)state;
    for (size_t i = 0; i < KVF__ARRAY_SIZE(codes); i++) {
        print_message("%d\n", codes[i]);
        assert_int_equal(kvf_last_error_set(codes[i], "code %zu", i), codes[i]);
        char want[32];
        snprintf(want, sizeof(want), "code %zu", i);
        assert_string_equal(kvf_last_error(), want);
    }
}

static void last_error_set_cuts_a_long_message(void **state)
{
    (void)state;
    /* The width makes 3,000 characters of a short format: more than the slot's 1,023. */
    assert_int_equal(kvf_last_error_set(-KVF_ETOOBIG, "head%2996s", "tail"), -KVF_ETOOBIG);
    assert_int_equal(strlen(kvf_last_error()), 1023);
    assert_memory_equal(kvf_last_error(), "head    ", 8);
    assert_null(strstr(kvf_last_error(), "tail"));
    /* Quoting a full slot into itself is safe: the start survives, the end is cut. */
    assert_int_equal(kvf_last_error_set(-KVF_EINVAL, "again: %s", kvf_last_error()), -KVF_EINVAL);
    assert_int_equal(strlen(kvf_last_error()), 1023);
    assert_memory_equal(kvf_last_error(), "again: head    ", 15);
}

static void last_error_set_is_thread_local(void **state)
{
    struct thread_result r;
    pthread_t t;
    (void)state;
    memset(&r, 0, sizeof(r));
    r.use_set = 1;
    assert_int_equal(kvf_last_error_set(-KVF_EINVAL, "set by this thread"), -KVF_EINVAL);

    assert_int_equal(pthread_create(&t, NULL, other_thread, &r), 0);
    assert_int_equal(pthread_join(t, NULL), 0);

    /* Neither thread sees the other's message. */
    assert_string_equal(r.initial, "");
    assert_int_equal(r.rc, -KVF_EPEERGONE);
    assert_string_equal(r.after, "set by the other thread");
    assert_string_equal(kvf_last_error(), "set by this thread");
}

/* The private helpers every failing path uses. */
static void int_min_is_unknown(void **state)
{
    (void)state;
    /* -INT_MIN does not exist: the lookup must not negate it. */
    assert_string_equal(kvf_err_name(INT_MIN), "UNKNOWN");
    assert_string_equal(kvf_strerror(INT_MIN), "unknown error");
}

static void err_may_quote_the_last_error(void **state)
{
    (void)state;
    kvf__err(-KVF_EINVAL, "inner");
    assert_int_equal(kvf__err(-KVF_EPROTO, "outer: %s", kvf_last_error()), -KVF_EPROTO);
    assert_string_equal(kvf_last_error(), "outer: inner");
}

static void err_and_wrap(void **state)
{
    (void)state;
    kvf_last_error_clear();
    assert_int_equal(kvf__err(-KVF_ENOTFOUND, "key %s", "a/b"), -KVF_ENOTFOUND);
    assert_string_equal(kvf_last_error(), "key a/b");
    assert_int_equal(kvf__err_wrap(-KVF_ENOTFOUND, "store %s", "tcp://h:1"), -KVF_ENOTFOUND);
    assert_string_equal(kvf_last_error(), "store tcp://h:1: key a/b");

    /* Wrapping with no message below uses the code's text. */
    kvf_last_error_clear();
    assert_int_equal(kvf__err_wrap(-ECONNREFUSED, "connect to %s", "h:1"), -ECONNREFUSED);
    assert_string_equal(kvf_last_error(), "connect to h:1: Connection refused");
}

static void long_message_is_cut_not_overrun(void **state)
{
    char big[4096];
    (void)state;
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    assert_int_equal(kvf__err(-KVF_EINVAL, "value %s", big), -KVF_EINVAL);
    size_t n = strlen(kvf_last_error());
    assert_true(n > 0 && n < sizeof(big));
    assert_memory_equal(kvf_last_error(), "value xxx", 9);

    /* The wrapped prefix, which names the value, survives; the tail is what gets cut. */
    assert_int_equal(kvf__err_wrap(-KVF_EINVAL, "ctx"), -KVF_EINVAL);
    assert_memory_equal(kvf_last_error(), "ctx: value xxx", 14);
    assert_int_equal(strlen(kvf_last_error()), n);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(every_kvf_code_has_name_and_message),
    cmocka_unit_test(kvf_codes_names_and_messages_are_distinct),
    cmocka_unit_test(codes_pinned_to_their_wire_values),
    cmocka_unit_test(system_errno_codes),
    cmocka_unit_test(zero_is_success),
    cmocka_unit_test(unknown_codes),
    cmocka_unit_test(last_error_set_by_failing_call),
    cmocka_unit_test(last_error_survives_success),
    cmocka_unit_test(last_error_clear),
    cmocka_unit_test(last_error_is_thread_local),
    cmocka_unit_test(last_error_set_is_read_back),
    cmocka_unit_test(last_error_set_returns_the_code),
    cmocka_unit_test(last_error_set_cuts_a_long_message),
    cmocka_unit_test(last_error_set_is_thread_local),
    cmocka_unit_test(int_min_is_unknown),
    cmocka_unit_test(err_may_quote_the_last_error),
    cmocka_unit_test(err_and_wrap),
    cmocka_unit_test(long_message_is_cut_not_overrun),
};

KVF_TEST_MAIN(tests)
