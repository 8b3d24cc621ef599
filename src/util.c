/*
 * util.c: small host helpers: growable arrays, dtypes.
 */
#include "internal.h"

kvrt_status kvrt_reserve(void **p, int64_t *cap, int64_t need, size_t size)
{
    if (need <= *cap)
        return KVRT_OK;
    int64_t n = *cap > 0 ? *cap : 16;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, (size_t)n * size);
    KVRT_CHECK(q != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation of %lld bytes failed",
               (long long)n * (long long)size);
    *p = q;
    *cap = n;
    return KVRT_OK;
}

size_t kvrt_dtype_size(kvrt_dtype dtype)
{
    switch (dtype) {
    case KVRT_F32: return 4;
    case KVRT_F16: return 2;
    case KVRT_BF16: return 2;
    case KVRT_Q8: return 1;
    case KVRT_FP8_E4M3: return 1;
    }
    return 0;
}

int kvrt_dtype_is_quantized(kvrt_dtype dtype)
{
    return dtype == KVRT_Q8 || dtype == KVRT_FP8_E4M3;
}

int kvrt_dtype_is_plain(kvrt_dtype dtype)
{
    return dtype == KVRT_F32 || dtype == KVRT_F16 || dtype == KVRT_BF16;
}

const char *kvrt_dtype_name(kvrt_dtype dtype)
{
    switch (dtype) {
    case KVRT_F32: return "f32";
    case KVRT_F16: return "f16";
    case KVRT_BF16: return "bf16";
    case KVRT_Q8: return "q8";
    case KVRT_FP8_E4M3: return "fp8_e4m3";
    }
    return "?";
}

kvrt_status kvrt_scratch(kvrt_cache *cache, int which, int64_t n, int32_t **out)
{
    int32_t **p = which == 0 ? &cache->scratch_a : which == 1 ? &cache->scratch_b : &cache->scratch_c;
    int64_t *cap = which == 0 ? &cache->scratch_a_cap
                 : which == 1 ? &cache->scratch_b_cap
                              : &cache->scratch_c_cap;
    KVRT_TRY(kvrt_reserve((void **)p, cap, n > 0 ? n : 1, sizeof(int32_t)));
    *out = *p;
    return KVRT_OK;
}

int kvrt_cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}
