/*
 * kvrt_info.c: kvrt-info prints the library's version, the backends built
 * into it and their devices.
 */
#include <stdio.h>

#include "kvrt.h"

int main(void)
{
    printf("kvrt %s (header %d.%d.%d)\n", kvrt_version_string(), KVRT_VERSION_MAJOR,
           KVRT_VERSION_MINOR, KVRT_VERSION_PATCH);
    static const kvrt_backend backends[] = {KVRT_BACKEND_CPU, KVRT_BACKEND_CUDA, KVRT_BACKEND_HIP};
    for (int i = 0; i < 3; i++) {
        kvrt_backend be = backends[i];
        int n = kvrt_device_count(be);
        printf("%-5s %d device%s%s\n", kvrt_backend_name(be), n, n == 1 ? "" : "s",
               n == 0 ? " (not built in, or no device or driver)" : "");
        for (int d = 0; d < n; d++) {
            char desc[256];
            kvrt_device dev = {be, d};
            kvrt_status st = kvrt_device_describe(dev, desc, sizeof desc);
            if (st == KVRT_OK)
                printf("  %s\n", desc);
            else
                printf("  %s:%d: %s: %s\n", kvrt_backend_name(be), d, kvrt_status_name(st),
                       kvrt_last_error());
        }
    }
    return 0;
}
