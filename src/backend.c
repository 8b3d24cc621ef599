/*
 * backend.c: choosing a backend for a device, and the device queries of the
 * public API.
 */
#include <stdio.h>

#include "internal.h"

const char *kvrt_backend_name(kvrt_backend backend)
{
    switch (backend) {
    case KVRT_BACKEND_CPU: return "cpu";
    case KVRT_BACKEND_CUDA: return "cuda";
    case KVRT_BACKEND_HIP: return "hip";
    }
    return "?";
}

int kvrt_device_count(kvrt_backend backend)
{
    switch (backend) {
    case KVRT_BACKEND_CPU: return kvrt_cpu_device_count();
#if defined(KVRT_HAVE_CUDA)
    case KVRT_BACKEND_CUDA: return kvrt_cuda_device_count();
#endif
#if defined(KVRT_HAVE_HIP)
    case KVRT_BACKEND_HIP: return kvrt_hip_device_count();
#endif
    default: return 0;
    }
}

kvrt_status kvrt_device_describe(kvrt_device device, char *buf, size_t size)
{
    KVRT_CHECK(buf != NULL, KVRT_ERR_INVALID_ARG, "kvrt_device_describe: buf is NULL");
    KVRT_CHECK(size > 0, KVRT_ERR_INVALID_ARG,
               "kvrt_device_describe: size is 0 (no room for the terminating NUL)");
    buf[0] = '\0';
    KVRT_CHECK(device.ordinal >= 0 && device.ordinal < kvrt_device_count(device.backend),
               KVRT_ERR_NO_DEVICE, "kvrt_device_describe: no device %s:%d (%d available)",
               kvrt_backend_name(device.backend), device.ordinal,
               kvrt_device_count(device.backend));
    switch (device.backend) {
    case KVRT_BACKEND_CPU:
        snprintf(buf, size, "cpu:0 host memory");
        return KVRT_OK;
#if defined(KVRT_HAVE_CUDA)
    case KVRT_BACKEND_CUDA: return kvrt_cuda_device_describe(device.ordinal, buf, size);
#endif
#if defined(KVRT_HAVE_HIP)
    case KVRT_BACKEND_HIP: return kvrt_hip_device_describe(device.ordinal, buf, size);
#endif
    default: break;
    }
    return kvrt_set_error(KVRT_ERR_NO_DEVICE, "kvrt_device_describe: backend %s is not built in",
                          kvrt_backend_name(device.backend));
}

kvrt_status kvrt_backend_open(kvrt_device device, kvrt_backend_t *out)
{
    memset(out, 0, sizeof *out);
    switch (device.backend) {
    case KVRT_BACKEND_CPU: return kvrt_cpu_backend_open(device, out);
#if defined(KVRT_HAVE_CUDA)
    case KVRT_BACKEND_CUDA: return kvrt_cuda_backend_open(device, out);
#endif
#if defined(KVRT_HAVE_HIP)
    case KVRT_BACKEND_HIP: return kvrt_hip_backend_open(device, out);
#endif
    default: break;
    }
    return kvrt_set_error(KVRT_ERR_NO_DEVICE, "device %s:%d: backend %s is not built into this kvrt",
                          kvrt_backend_name(device.backend), device.ordinal,
                          kvrt_backend_name(device.backend));
}

void kvrt_backend_close(kvrt_backend_t *be)
{
    if (be != NULL && be->ops != NULL && be->ops->shutdown != NULL)
        be->ops->shutdown(be);
    if (be != NULL)
        memset(be, 0, sizeof *be);
}
