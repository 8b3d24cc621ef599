/*
 * test_mla_fp8.c: the FlashMLA-style fp8 MLA row of kernels/kvrt_layout.h
 * (docs/layouts.md, "fp8 MLA rows") against the reference model (tests/ref),
 * which packs the row from the description alone:
 *   - sizes and offsets: 656 bytes at 512 / 64, every part 16-byte aligned;
 *   - packing from f32, f16 and bf16 is bit-exact (codes, scales, rope bf16,
 *     zero padding), with zero groups, saturation, ties, NaN and Inf;
 *   - reading back matches the reference value for value, NaN stays NaN,
 *     and the error is within the bound derived below;
 *   - a shift turns the rope part only: latent codes and scales bit-exact;
 *   - caches refuse MLA layers in q8 and fp8 on every backend, saying why.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvrt.h"
#include "kvrt_layout.h"
#include "ref.h"

enum { ROW_MAX = 1024 + 64 + 16 + 256 };

static uint32_t rng = 12345u;
static float frand(void)
{
    rng = rng * 1664525u + 1013904223u;
    return (float)((rng >> 8) & 0xffffu) / 32768.0f - 1.0f;
}

static void test_sizes(void **state)
{
    (void)state;
    assert_int_equal(kvrt_mla_fp8_row_bytes(512, 64), 656);
    assert_int_equal(kvrt_mla_fp8_scale_off(512), 512);
    assert_int_equal(kvrt_mla_fp8_rope_off(512), 528);
    for (int32_t latent = 128; latent <= 1024; latent += 128)
        for (int32_t rope = 0; rope <= 128; rope += 2) {
            int64_t so = kvrt_mla_fp8_scale_off(latent), ro = kvrt_mla_fp8_rope_off(latent);
            int64_t n = kvrt_mla_fp8_row_bytes(latent, rope);
            assert_int_equal(so % 16, 0);
            assert_int_equal(ro % 16, 0);
            assert_int_equal(n % 16, 0);
            assert_true(ro >= so + 4 * (latent / 128) && ro - so - 4 * (latent / 128) < 16);
            assert_true(n >= ro + 2 * rope && n - ro - 2 * rope < 16);
        }
}

/* latent + rope values with every special case in the first groups:
 * group 0 all zeros but a NaN, group 1 with +-Inf and a tie, group 2 all
 * zero; the rest random with magnitudes over many binades. */
static void fill_row(float *x, int32_t latent, int32_t rope)
{
    for (int32_t i = 0; i < latent + rope; i++)
        x[i] = frand() * ldexpf(1.0f, (int)(rng % 13u) - 6);
    if (latent >= 384) {
        for (int32_t i = 0; i < 128; i++)
            x[i] = 0.0f;
        x[5] = NAN;
        x[128] = INFINITY;
        x[129] = -INFINITY;
        x[130] = 448.0f; /* amax of group 1: scale 1, exact codes */
        x[131] = 1.0625f; /* halfway between 1 and 1.125: ties to even (1) */
        x[132] = -1.1875f; /* halfway between 1.125 and 1.25: ties to even (1.25) */
        for (int32_t i = 256; i < 384; i++)
            x[i] = -0.0f;
    }
    if (rope > 2) {
        x[latent] = NAN;
        x[latent + 1] = 3.0e38f;
    }
}

static void check_pack(int32_t latent, int32_t rope, int32_t src_dtype)
{
    float x[ROW_MAX], xf[ROW_MAX];
    uint16_t h[ROW_MAX];
    uint8_t row[ROW_MAX], want[ROW_MAX];
    fill_row(x, latent, rope);
    const void *src = x;
    if (src_dtype != KVRT_LAYOUT_F32) {
        for (int32_t i = 0; i < latent + rope; i++)
            h[i] = src_dtype == KVRT_LAYOUT_F16 ? kvrt_f32_to_f16(x[i]) : kvrt_f32_to_bf16(x[i]);
        src = h;
    }
    for (int32_t i = 0; i < latent + rope; i++)
        xf[i] = kvrt_load(src, src_dtype, i);
    memset(row, 0xa5, sizeof row);
    kvrt_mla_fp8_quant_row(row, src, src_dtype, latent, rope);
    int64_t n = ref_mla_fp8_row(xf, latent, rope, want);
    assert_int_equal(n, kvrt_mla_fp8_row_bytes(latent, rope));
    assert_memory_equal(row, want, (size_t)n);
    assert_int_equal(row[n], 0xa5); /* nothing past the row */

    /* Read back. Bound: a latent value is e4m3(x / s) * s with s = amax / 448
     * of its group; e4m3 rounds to 3 mantissa bits, so a normal code is off
     * by at most 2^-4 of the value, and a subnormal one (|x / s| < 2^-6) by at
     * most half its step 2^-9, i.e. 2^-10 s = amax / 458752; both are within
     * amax / 16 (plus one f32 rounding of the product, 2^-24 relative). The
     * rope part is bf16: half an ulp of 8 bits, 2^-8 of the value. */
    for (int32_t i = 0; i < latent + rope; i++) {
        double got = kvrt_mla_fp8_load(row, latent, i), ref = ref_mla_fp8_value(want, latent, i);
        if (!isfinite(xf[i]) && i < latent) {
            assert_true(isnan(got));
            continue;
        }
        if (isnan(xf[i])) {
            assert_true(isnan(got));
            continue;
        }
        assert_true(got == ref);
        if (i < latent) {
            int32_t g = i / 128;
            double amax = 0.0;
            for (int32_t j = 128 * g; j < 128 * g + 128; j++)
                if (isfinite(xf[j]) && fabs(xf[j]) > amax)
                    amax = fabs(xf[j]);
            assert_true(fabs(got - xf[i]) <= amax / 16.0 * (1.0 + 0x1p-20));
        } else if (isfinite(xf[i])) {
            assert_true(fabs(got - xf[i]) <= fabs(xf[i]) * 0x1p-8);
        }
    }
    if (latent >= 384) {
        assert_true(kvrt_mla_fp8_scale(row, latent, 0) == 0.0f); /* only a NaN: scale 0 */
        assert_int_equal(row[5], 0x7f);
        assert_int_equal(row[128], 0x7f); /* +Inf: NaN marker */
        assert_int_equal(row[129], 0xff); /* -Inf: NaN marker with the sign */
        assert_true(kvrt_mla_fp8_scale(row, latent, 1) == 1.0f);
        assert_int_equal(row[130], 0x7e); /* 448 */
        if (src_dtype == KVRT_LAYOUT_F32) {
            assert_int_equal(row[131], 0x38); /* 1 */
            assert_int_equal(row[132], 0xba); /* -1.25 */
        }
        assert_true(kvrt_mla_fp8_scale(row, latent, 2) == 0.0f);
    }
}

static void test_pack(void **state)
{
    (void)state;
    const int32_t dtypes[3] = {KVRT_LAYOUT_F32, KVRT_LAYOUT_F16, KVRT_LAYOUT_BF16};
    const int32_t shapes[][2] = {{512, 64}, {128, 0}, {256, 6}, {384, 64}, {1024, 128}, {640, 2}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int d = 0; d < 3; d++)
            for (int rep = 0; rep < 4; rep++)
                check_pack(shapes[s][0], shapes[s][1], dtypes[d]);
}

/* A shift turns the rope part in bf16 and nothing else: the latent codes and
 * scales stay bit-exact; the rope part matches the reference's double
 * rotation of the stored bf16 values within one bf16 rounding per shift
 * (2^-8 of the pair's magnitude) plus the f32 products (a few 2^-24). */
static void test_shift(void **state)
{
    (void)state;
    const int32_t latent = 512, rope = 64;
    for (int style = 0; style < 2; style++) {
        float x[ROW_MAX];
        uint8_t row[ROW_MAX], before[ROW_MAX];
        fill_row(x, latent, rope);
        x[latent] = 0.5f;
        x[latent + 1] = -0.25f; /* finite rope values only */
        kvrt_mla_fp8_quant_row(row, x, KVRT_LAYOUT_F32, latent, rope);
        memcpy(before, row, sizeof row);
        kvrt_rope rp = {rope, style, 10000.0f, 1.0f};
        const int64_t deltas[3] = {7, -3, 1000};
        for (int t = 0; t < 3; t++) {
            double want[128], mag[128];
            for (int32_t i = 0; i < rope; i++)
                want[i] = kvrt_mla_fp8_load(row, latent, latent + i);
            for (int32_t p = 0; p < rope / 2; p++) {
                int32_t a, b;
                kvrt_rope_pair(style, rope, p, &a, &b);
                mag[a] = mag[b] = hypot(want[a], want[b]);
            }
            ref_rope_rotate(want, rope, (kvrt_rope_style)style, 10000.0, 1.0, deltas[t]);
            kvrt_mla_fp8_rotate(row, latent, rope, &rp, deltas[t]);
            assert_memory_equal(row, before, (size_t)kvrt_mla_fp8_rope_off(latent));
            for (int32_t i = 0; i < rope; i++)
                assert_true(fabs(kvrt_mla_fp8_load(row, latent, latent + i) - want[i]) <=
                            mag[i] * (0x1p-8 + 0x1p-20));
        }
        int64_t n = kvrt_mla_fp8_row_bytes(latent, rope);
        assert_memory_not_equal(row + kvrt_mla_fp8_rope_off(latent),
                                before + kvrt_mla_fp8_rope_off(latent),
                                (size_t)(n - kvrt_mla_fp8_rope_off(latent)));
    }
}

/* A cache refuses an MLA layer in q8 (by design) and in fp8 (the row is
 * defined, not yet stored), on every backend, naming the layer and its kind;
 * kvrt_layer_row_bytes does not count what no cache stores. */
static void test_refused(void **state)
{
    (void)state;
    kvrt_layer_desc layers[2] = {{KVRT_LAYER_ATTN, 2, 64, 64, 0, 0, 0, 0},
                                 {KVRT_LAYER_MLA, 0, 0, 0, 0, 512, 64, 0}};
    const kvrt_backend backends[3] = {KVRT_BACKEND_CPU, KVRT_BACKEND_CUDA, KVRT_BACKEND_HIP};
    for (int b = 0; b < 3; b++)
        for (int q = 0; q < 2; q++) {
            kvrt_cache_desc d;
            kvrt_cache_desc_init(&d);
            d.dtype = q ? KVRT_Q8 : KVRT_FP8_E4M3;
            d.n_layers = 2;
            d.layers = layers;
            d.n_blocks = 4;
            d.rope.n_rot = 64;
            d.device.backend = backends[b];
            kvrt_cache *c = (kvrt_cache *)1;
            assert_int_equal(kvrt_cache_create(&d, &c), KVRT_ERR_UNSUPPORTED);
            assert_null(c);
            const char *msg = kvrt_last_error();
            assert_non_null(strstr(msg, "layer 1 (MLA)"));
            assert_non_null(strstr(msg, q ? "no int8 form" : "FlashMLA-style fp8 MLA row"));
            assert_int_equal(kvrt_layer_row_bytes(&layers[1], d.dtype), 0);
        }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_pack),
        cmocka_unit_test(test_shift),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
