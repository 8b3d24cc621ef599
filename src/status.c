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
