/*
 * status.c: status names and messages, the thread's last error, versions.
 */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

#define KVRT_STR_(x) #x
#define KVRT_STR(x) KVRT_STR_(x)

static _Thread_local char last_error[512];

unsigned kvrt_version_number(void) { return KVRT_VERSION_NUMBER; }

const char *kvrt_version_string(void)
{
    return KVRT_STR(KVRT_VERSION_MAJOR) "." KVRT_STR(KVRT_VERSION_MINOR) "." KVRT_STR(
        KVRT_VERSION_PATCH);
}

const char *kvrt_status_name(kvrt_status status)
{
    switch (status) {
#define KVRT_STATUS_NAME_(name, value, text)                                                 \
    case KVRT_##name:                                                                        \
        return "KVRT_" #name;
        KVRT_STATUS_MAP(KVRT_STATUS_NAME_)
#undef KVRT_STATUS_NAME_
    }
    return "KVRT_UNKNOWN";
}

const char *kvrt_status_str(kvrt_status status)
{
    switch (status) {
#define KVRT_STATUS_STR_(name, value, text)                                                  \
    case KVRT_##name:                                                                        \
        return text;
        KVRT_STATUS_MAP(KVRT_STATUS_STR_)
#undef KVRT_STATUS_STR_
    }
    return "unknown status";
}

const char *kvrt_last_error(void) { return last_error; }

void kvrt_clear_error(void) { last_error[0] = '\0'; }

kvrt_status kvrt_set_error(kvrt_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

/* An internal prefix of a message: "kvrt_name: " (an entry called on the
 * way) or the state parser's "state: ". Returns its length, 0 if none. */
static size_t internal_prefix(const char *m)
{
    size_t k = 0;
    if (strncmp(m, "kvrt_", 5) == 0) {
        k = 5;
        while ((m[k] >= 'a' && m[k] <= 'z') || (m[k] >= '0' && m[k] <= '9') || m[k] == '_')
            k++;
    } else if (strncmp(m, "state", 5) == 0) {
        k = 5;
    }
    return k > 0 && m[k] == ':' && m[k + 1] == ' ' ? k + 2 : 0;
}

kvrt_status kvrt_error_in(kvrt_status status, const char *fn)
{
    if (status == KVRT_OK)
        return status;
    size_t n = strlen(fn);
    if (strncmp(last_error, fn, n) == 0 && last_error[n] == ':')
        return status;
    char msg[sizeof last_error];
    const char *rest = last_error + internal_prefix(last_error);
    if (rest[0] == '\0')
        rest = kvrt_status_str(status);
    size_t at = n + 2, len = strlen(rest);
    if (at >= sizeof msg)
        return status;
    memcpy(msg, fn, n);
    memcpy(msg + n, ": ", 2);
    if (len > sizeof msg - 1 - at)
        len = sizeof msg - 1 - at; /* truncated, as vsnprintf would */
    memcpy(msg + at, rest, len);
    msg[at + len] = '\0';
    memcpy(last_error, msg, at + len + 1);
    return status;
}
