/*
 * test_ref.c: the reference model against hand-computed cases: element
 * conversion, RoPE (identity, inverse, pair layouts), the sequence edits on
 * small examples and attention. Plain C, no test framework, so that it runs
 * wherever the reference builds.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kvrt_layout.h"
#include "ref.h"

static int n_checks, n_failed;

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        n_checks++;                                                                          \
        if (!(cond)) {                                                                       \
            n_failed++;                                                                      \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);         \
        }                                                                                    \
    } while (0)

#define CHECK_NEAR(a, b, tol) CHECK(fabs((double)(a) - (double)(b)) <= (tol))

#define OKSET REF_BIT(KVRT_OK)
#define ERRSET(e) REF_BIT(KVRT_ERR_##e)

/* ---- element conversion ---- */

static void test_conversion(void)
{
    CHECK(kvrt_f32_to_f16(1.0f) == 0x3c00);
    CHECK(kvrt_f32_to_f16(-2.0f) == 0xc000);
    CHECK(kvrt_f32_to_f16(65504.0f) == 0x7bff);
    CHECK(kvrt_f32_to_f16(65520.0f) == 0x7c00);           /* rounds up to inf */
    CHECK(kvrt_f32_to_f16(ldexpf(1, -24)) == 0x0001);      /* smallest subnormal */
    CHECK(kvrt_f32_to_f16(ldexpf(1, -25)) == 0x0000);      /* tie to even: 0 */
    CHECK(kvrt_f32_to_f16(1.0f + ldexpf(1, -11)) == 0x3c00);     /* tie to even */
    CHECK(kvrt_f32_to_f16(1.0f + 3 * ldexpf(1, -11)) == 0x3c02); /* tie to even, up */
    CHECK(kvrt_f16_to_f32(0x3555) == 0.333251953125f);
    CHECK(kvrt_f16_to_f32(0x0001) == ldexpf(1, -24));
    CHECK(kvrt_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(kvrt_f32_to_bf16(1.0f + ldexpf(1, -8)) == 0x3f80);     /* tie to even */
    CHECK(kvrt_f32_to_bf16(1.0f + 3 * ldexpf(1, -8)) == 0x3f82);
    CHECK(kvrt_bf16_to_f32(0xc040) == -3.0f);
    CHECK(ref_round(0.1, KVRT_F32) == (double)0.1f);
    CHECK(ref_round(0.1, KVRT_F16) == 0.0999755859375);
    CHECK(ref_round(0.1, KVRT_BF16) == 0.10009765625);
    uint16_t h[2];
    ref_store(h, KVRT_F16, 1, 0.5);
    CHECK(h[1] == 0x3800);
    CHECK(ref_load(h, KVRT_F16, 1) == 0.5);
}

/* ---- RoPE ---- */

static void test_rope(void)
{
    double x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8];
    memcpy(y, x, sizeof(x));
    ref_rope_rotate(y, 8, KVRT_ROPE_NORMAL, 10000, 1, 0);
    CHECK(memcmp(x, y, sizeof(x)) == 0);

    for (int style = 0; style < 2; style++) {
        memcpy(y, x, sizeof(x));
        ref_rope_rotate(y, 8, (kvrt_rope_style)style, 10000, 0.25, 12345);
        int moved = 0;
        for (int i = 0; i < 8; i++)
            moved |= fabs(y[i] - x[i]) > 1e-3;
        CHECK(moved);
        ref_rope_rotate(y, 8, (kvrt_rope_style)style, 10000, 0.25, -12345);
        for (int i = 0; i < 8; i++)
            CHECK_NEAR(y[i], x[i], 1e-12);
        /* a rotation keeps the norm of each pair */
        ref_rope_rotate(y, 8, (kvrt_rope_style)style, 500000, 1, 7);
        for (int i = 0; i < 4; i++) {
            int a = style ? i : 2 * i, b = style ? i + 4 : 2 * i + 1;
            CHECK_NEAR(hypot(y[a], y[b]), hypot(x[a], x[b]), 1e-12);
        }
    }

    /* dims 4, theta 10000: pair 0 turns by delta, pair 1 by delta / 100 */
    double n[4] = {1, 0, 0, 0};
    ref_rope_rotate(n, 4, KVRT_ROPE_NORMAL, 10000, 1, 1);
    CHECK_NEAR(n[0], cos(1.0), 1e-15);
    CHECK_NEAR(n[1], sin(1.0), 1e-15);
    CHECK(n[2] == 0 && n[3] == 0);
    double z[4] = {1, 0, 0, 0};
    ref_rope_rotate(z, 4, KVRT_ROPE_NEOX, 10000, 1, 1);
    CHECK_NEAR(z[0], cos(1.0), 1e-15);
    CHECK(z[1] == 0);
    CHECK_NEAR(z[2], sin(1.0), 1e-15);
    CHECK(z[3] == 0);
    double p[4] = {0, 0, 1, 0};
    ref_rope_rotate(p, 4, KVRT_ROPE_NORMAL, 10000, 1, 1);
    CHECK_NEAR(p[2], cos(0.01), 1e-15);
    CHECK_NEAR(p[3], sin(0.01), 1e-15);
    double q[4] = {0, 0, 1, 0};
    ref_rope_rotate(q, 4, KVRT_ROPE_NEOX, 10000, 1, 1);
    CHECK_NEAR(q[0], -sin(1.0), 1e-15);
    CHECK_NEAR(q[2], cos(1.0), 1e-15);
    /* freq_scale scales the angle */
    double f[2] = {1, 0};
    ref_rope_rotate(f, 2, KVRT_ROPE_NORMAL, 10000, 0.5, 3);
    CHECK_NEAR(f[0], cos(1.5), 1e-15);
    CHECK_NEAR(f[1], sin(1.5), 1e-15);
}

/* ---- edits ---- */

/* One ATTN layer (1 head, K 4 rotated dims of 4, V 2), one CROSS layer, and
 * one MLA layer (latent 2, rope 2): small enough to check by hand. */
static kvrt_layer_desc small_layers[3] = {
    {.kind = KVRT_LAYER_ATTN, .n_kv_heads = 1, .head_dim_k = 4, .head_dim_v = 2},
    {.kind = KVRT_LAYER_CROSS, .n_kv_heads = 1, .head_dim_k = 2, .head_dim_v = 2},
    {.kind = KVRT_LAYER_MLA, .latent_dim = 2, .rope_dim = 2},
};

static ref_model *small_model(kvrt_dtype dtype)
{
    kvrt_cache_desc d;
    memset(&d, 0, sizeof(d));
    d.dtype = dtype;
    d.n_layers = 3;
    d.layers = small_layers;
    d.max_seqs = 3;
    d.block_size = 16;
    d.n_blocks = 4;
    d.cross_max_len = 4;
    d.rope.n_rot = 4;
    d.rope.theta = 10000;
    d.rope.freq_scale = 1;
    d.rope.style = KVRT_ROPE_NORMAL;
    ref_model *m = ref_create(&d);
    ref_policy p = {0};
    p.range_p0_negative = REF_OPEN_OK;
    p.range_reversed = REF_OPEN_OK;
    ref_set_policy(m, &p);
    return m;
}

/* Plans seq at positions and writes K = pos + e/10 + layer, V = -(pos) - e. */
static void plan_write(ref_model *m, int32_t seq, int n, const int32_t *pos)
{
    int32_t seqs[16];
    float k[16 * 4], v[16 * 2], kmla[16 * 4];
    for (int i = 0; i < n; i++) {
        seqs[i] = seq;
        for (int e = 0; e < 4; e++) {
            k[i * 4 + e] = (float)pos[i] + (float)e / 10;
            kmla[i * 4 + e] = (float)pos[i] + 2 + (float)e / 10;
        }
        for (int e = 0; e < 2; e++)
            v[i * 2 + e] = -(float)pos[i] - (float)e;
    }
    CHECK(ref_plan(m, n, seqs, pos, 16, 1) == OKSET);
    CHECK(ref_write(m, 0, n, seqs, pos, k, v, KVRT_F32, 1) == OKSET);
    CHECK(ref_write(m, 2, n, seqs, pos, kmla, NULL, KVRT_F32, 1) == OKSET);
}

static int positions_are(const ref_model *m, int32_t seq, int n, const int32_t *want)
{
    int64_t count;
    const ref_token *t = ref_seq_tokens(m, seq, &count);
    if (count != n)
        return 0;
    for (int i = 0; i < n; i++)
        if (t[i].pos != want[i])
            return 0;
    return 1;
}

static void test_plan(void)
{
    ref_model *m = small_model(KVRT_F16);
    int32_t pos[5] = {0, 1, 2, 3, 4};
    plan_write(m, 0, 5, pos);
    CHECK(positions_are(m, 0, 5, pos));
    CHECK(ref_seq_pos_min(m, 0) == 0 && ref_seq_pos_max(m, 0) == 4);
    CHECK(ref_seq_pos_min(m, 1) == -1 && ref_seq_pos_max(m, 1) == -1);

    int32_t s2[2] = {0, 1}, p2[2] = {2, 7};
    CHECK(ref_plan(m, 2, s2, p2, 16, 0) == ERRSET(POS_EXISTS));
    int32_t s3[2] = {1, 1}, p3[2] = {7, 7};
    CHECK(ref_plan(m, 2, s3, p3, 16, 0) == ERRSET(POS_EXISTS));
    int32_t s4[1] = {3}, p4[1] = {0};
    CHECK(ref_plan(m, 1, s4, p4, 16, 0) == ERRSET(INVALID_ARG));
    int32_t s5[1] = {1}, p5[1] = {-1};
    CHECK(ref_plan(m, 1, s5, p5, 16, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_plan(m, 0, s5, p5, 16, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_plan(m, 17, s5, p5, 16, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_plan(m, 1, NULL, p5, 16, 0) == ERRSET(INVALID_ARG));
    /* an invalid token and a duplicate: either error is a right answer */
    int32_t s6[2] = {9, 0}, p6[2] = {0, 1};
    CHECK(ref_plan(m, 2, s6, p6, 16, 0) == (ERRSET(INVALID_ARG) | ERRSET(POS_EXISTS)));

    /* position INT32_MAX is an open reading */
    int32_t s8[1] = {1}, p9[1] = {INT32_MAX};
    CHECK(ref_plan(m, 1, s8, p9, 16, 0) == (OKSET | ERRSET(POS_RANGE)));
    int32_t s9[2] = {1, 0}, p10[2] = {INT32_MAX, 0};
    CHECK(ref_plan(m, 2, s9, p10, 16, 0) == (ERRSET(POS_EXISTS) | ERRSET(POS_RANGE)));

    /* written values are rounded to the cache dtype (f16) */
    const ref_token *t = ref_seq_find(m, 0, 3);
    CHECK(t && t->written[0] && !t->written[1] && t->written[2]);
    CHECK(t->data[ref_layer_offset(m, 0) + 1] == (double)kvrt_f16_to_f32(kvrt_f32_to_f16(3.1f)));
    CHECK(t->data[ref_layer_offset(m, 0) + 4] == -3.0);  /* V[0] */
    CHECK(t->data[ref_layer_offset(m, 2) + 0] == 5.0);   /* MLA latent[0] */

    /* writes: CROSS layer, bad layer, missing V, a token not planned */
    float k[4] = {0}, v[2] = {0};
    int32_t s7[1] = {0}, p7[1] = {2}, p8[1] = {9};
    CHECK(ref_write(m, 1, 1, s7, p7, k, v, KVRT_F32, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_write(m, 3, 1, s7, p7, k, v, KVRT_F32, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_write(m, 0, 1, s7, p7, k, NULL, KVRT_F32, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_write(m, 2, 1, s7, p7, k, NULL, KVRT_F32, 0) == OKSET);
    CHECK(ref_write(m, 0, 1, s7, p8, k, v, KVRT_F32, 0) == ERRSET(INVALID_ARG));
    ref_destroy(m);
}

static void test_rm_cp_keep(void)
{
    ref_model *m = small_model(KVRT_F32);
    int32_t pos[5] = {0, 1, 2, 3, 4};
    plan_write(m, 0, 5, pos);
    float ck[3 * 2] = {1, 2, 3, 4, 5, 6}, cv[3 * 2] = {-1, -2, -3, -4, -5, -6};
    CHECK(ref_cross_set(m, 1, 0, 3, ck, cv, KVRT_F32, 1) == OKSET);
    CHECK(ref_cross_set(m, 1, 0, 5, ck, cv, KVRT_F32, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_cross_set(m, 0, 0, 3, ck, cv, KVRT_F32, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_cross_set(m, 1, 3, 3, ck, cv, KVRT_F32, 0) == ERRSET(INVALID_ARG));
    const double *k;
    CHECK(ref_cross_rows(m, 1, 0, &k, NULL) == 3 && k[5] == 6);

    CHECK(ref_seq_rm(m, 0, 1, 3, 1) == OKSET);
    int32_t want1[3] = {0, 3, 4};
    CHECK(positions_are(m, 0, 3, want1));
    CHECK(ref_seq_rm(m, 3, 0, -1, 0) == ERRSET(INVALID_ARG));

    /* cp: a range of src into an empty dst, with the cross rows */
    CHECK(ref_seq_cp(m, 0, 1, 3, -1, 1) == OKSET);
    int32_t want2[2] = {3, 4};
    CHECK(positions_are(m, 1, 2, want2));
    CHECK(ref_cross_rows(m, 1, 1, &k, NULL) == 3 && k[0] == 1);
    CHECK(ref_seq_find(m, 1, 3)->data[1] == (double)3.1f);
    CHECK(ref_seq_cp(m, 0, 1, 0, -1, 0) == ERRSET(INVALID_ARG)); /* dst not empty */
    CHECK(ref_seq_cp(m, 0, 3, 0, -1, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_seq_cp(m, -1, 2, 0, -1, 0) == ERRSET(INVALID_ARG));
    /* the copy is independent of its source */
    CHECK(ref_seq_rm(m, 0, 4, 5, 1) == OKSET);
    CHECK(positions_are(m, 1, 2, want2));

    /* rm of a part keeps the cross rows, rm of everything drops them */
    CHECK(ref_seq_rm(m, 1, 3, 4, 1) == OKSET);
    CHECK(ref_cross_rows(m, 1, 1, NULL, NULL) == 3);
    CHECK(ref_seq_rm(m, 1, 0, -1, 1) == OKSET);
    CHECK(ref_seq_is_empty(m, 1));

    /* seq < 0: every sequence */
    int32_t p2[2] = {7, 8};
    plan_write(m, 2, 2, p2);
    CHECK(ref_seq_rm(m, -1, 4, 8, 1) == OKSET);
    int32_t want3[1] = {8}, want4[2] = {0, 3};
    CHECK(positions_are(m, 2, 1, want3));
    CHECK(positions_are(m, 0, 2, want4));

    /* import from another model: tokens and cross rows, deep copies */
    ref_model *other = ref_clone(m);
    CHECK(ref_seq_rm(m, 0, 0, -1, 1) == OKSET);
    CHECK(ref_seq_is_empty(m, 0));
    ref_seq_import(m, 0, other, 0);
    ref_destroy(other);
    CHECK(positions_are(m, 0, 2, want4));
    CHECK(ref_cross_rows(m, 1, 0, &k, NULL) == 3 && k[5] == 6);
    CHECK(ref_seq_find(m, 0, 3)->data[1] == (double)3.1f);

    /* keep */
    CHECK(ref_seq_keep(m, 3, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_seq_keep(m, -1, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_seq_keep(m, 2, 1) == OKSET);
    CHECK(ref_seq_is_empty(m, 0));
    CHECK(positions_are(m, 2, 1, want3));

    ref_clear(m);
    CHECK(ref_seq_is_empty(m, 2));

    /* open readings: with the default policy both answers are allowed */
    ref_policy p = {0};
    ref_set_policy(m, &p);
    CHECK(ref_seq_rm(m, 0, -3, -1, 0) == (OKSET | ERRSET(INVALID_ARG)));
    CHECK(ref_seq_rm(m, 0, 5, 2, 0) == (OKSET | ERRSET(INVALID_ARG)));
    CHECK(ref_seq_rm(m, 0, 5, 5, 0) == OKSET);
    /* cp onto itself: a no-op or an error */
    CHECK(ref_seq_cp(m, 2, 2, 0, -1, 0) == (OKSET | ERRSET(INVALID_ARG)));
    ref_destroy(m);
}

static void test_shift_div(void)
{
    ref_model *m = small_model(KVRT_F32);
    int32_t pos[5] = {0, 1, 2, 3, 4};
    plan_write(m, 0, 5, pos);
    double k3[4], v3[2], mla3[4];
    const ref_token *t = ref_seq_find(m, 0, 3);
    memcpy(k3, t->data + ref_layer_offset(m, 0), sizeof(k3));
    memcpy(v3, t->data + ref_layer_offset(m, 0) + 4, sizeof(v3));
    memcpy(mla3, t->data + ref_layer_offset(m, 2), sizeof(mla3));

    CHECK(ref_seq_shift(m, 0, 3, -1, 10, 1) == OKSET);
    int32_t want1[5] = {0, 1, 2, 13, 14};
    CHECK(positions_are(m, 0, 5, want1));
    t = ref_seq_find(m, 0, 13);
    ref_rope_rotate(k3, 4, KVRT_ROPE_NORMAL, 10000, 1, 10);
    for (int e = 0; e < 4; e++)
        CHECK(t->data[ref_layer_offset(m, 0) + e] == k3[e]);
    CHECK(memcmp(t->data + ref_layer_offset(m, 0) + 4, v3, sizeof(v3)) == 0);
    /* MLA: the latent part stays, the rope part (last 2) turns */
    CHECK(t->data[ref_layer_offset(m, 2) + 0] == mla3[0]);
    CHECK(t->data[ref_layer_offset(m, 2) + 1] == mla3[1]);
    ref_rope_rotate(mla3 + 2, 2, KVRT_ROPE_NORMAL, 10000, 1, 10);
    CHECK(t->data[ref_layer_offset(m, 2) + 2] == mla3[2]);
    CHECK(t->data[ref_layer_offset(m, 2) + 3] == mla3[3]);
    CHECK(t->rotations[0] == 1 && t->rotations[1] == 0 && t->rotations[2] == 1);
    CHECK(ref_seq_find(m, 0, 2)->rotations[0] == 0);

    /* collision with a token outside the range; nothing changes */
    CHECK(ref_seq_shift(m, 0, 13, -1, -12, 1) == ERRSET(POS_EXISTS));
    CHECK(positions_are(m, 0, 5, want1));
    /* overflow */
    CHECK(ref_seq_shift(m, 0, 14, -1, INT32_MAX - 10, 0) == ERRSET(POS_RANGE));
    CHECK(ref_seq_shift(m, 0, 14, -1, INT32_MAX - 15, 0) == OKSET);
    CHECK(ref_seq_shift(m, 0, 14, -1, INT32_MAX - 14, 0) == (OKSET | ERRSET(POS_RANGE)));
    CHECK(ref_seq_shift(m, 3, 0, -1, 1, 0) == ERRSET(INVALID_ARG));
    /* negative new positions are removed; the others may land on free ones */
    CHECK(ref_seq_shift(m, 0, 0, 3, -1, 1) == OKSET);
    int32_t want2[4] = {0, 1, 13, 14};
    CHECK(positions_are(m, 0, 4, want2));
    /* shift back by -delta restores the values */
    CHECK(ref_seq_shift(m, 0, 13, 15, -10, 1) == OKSET);
    t = ref_seq_find(m, 0, 3);
    CHECK(t->rotations[0] == 2);
    for (int e = 0; e < 4; e++)
        CHECK_NEAR(t->data[ref_layer_offset(m, 0) + e], 3 + e / 10.0, 1e-6);

    /* div of 0 1 3 4: [1, end) / 2 moves 1 onto 0 */
    CHECK(ref_seq_div(m, 0, 1, -1, 2, 1) == ERRSET(POS_EXISTS));
    int32_t want3[4] = {0, 1, 3, 4};
    CHECK(positions_are(m, 0, 4, want3));
    CHECK(ref_seq_div(m, 0, 3, 5, 2, 0) == ERRSET(POS_EXISTS)); /* 3/2 lands on 1 */
    CHECK(ref_seq_div(m, 0, 4, -1, 2, 1) == OKSET);             /* 4 -> 2 */
    int32_t want4[4] = {0, 1, 2, 3};
    CHECK(positions_are(m, 0, 4, want4));
    t = ref_seq_find(m, 0, 2);
    CHECK(t->rotations[0] == 3); /* 4 -> 14 -> 4 -> 2 */
    CHECK(ref_seq_div(m, 0, 0, -1, 0, 0) == ERRSET(INVALID_ARG));
    CHECK(ref_seq_div(m, 0, 0, -1, 1, 0) == OKSET);
    /* sparse positions divide without collisions */
    ref_clear(m);
    int32_t sparse[3] = {0, 4, 9};
    plan_write(m, 1, 3, sparse);
    CHECK(ref_seq_div(m, 1, 0, -1, 2, 1) == OKSET);
    int32_t want5[3] = {0, 2, 4};
    CHECK(positions_are(m, 1, 3, want5));
    CHECK(ref_seq_find(m, 1, 0)->rotations[0] == 0); /* 0 / 2 == 0: not moved */
    ref_destroy(m);
}

/* ---- attention ---- */

static void test_attention(void)
{
    kvrt_layer_desc layers[3] = {
        {.kind = KVRT_LAYER_ATTN, .n_kv_heads = 1, .head_dim_k = 2, .head_dim_v = 2, .window = 2},
        {.kind = KVRT_LAYER_MLA, .latent_dim = 2, .rope_dim = 2},
        {.kind = KVRT_LAYER_CROSS, .n_kv_heads = 1, .head_dim_k = 2, .head_dim_v = 1},
    };
    kvrt_cache_desc d;
    memset(&d, 0, sizeof(d));
    d.dtype = KVRT_F32;
    d.n_layers = 3;
    d.layers = layers;
    d.max_seqs = 2;
    d.cross_max_len = 4;
    d.rope.theta = 10000;
    d.rope.freq_scale = 1;
    ref_model *m = ref_create(&d);

    /* keys at positions 0, 1, 2: K = (1, 0), (0, 1), (1, 1), V = (p, 10p) */
    int32_t seqs[3] = {0, 0, 0}, pos[3] = {0, 1, 2};
    float k[6] = {1, 0, 0, 1, 1, 1}, v[6] = {0, 0, 1, 10, 2, 20};
    float km[12] = {1, 2, 0, 0, 3, 4, 0, 0, 5, 6, 0, 0};
    CHECK(ref_plan(m, 3, seqs, pos, 8, 1) == OKSET);
    CHECK(ref_write(m, 0, 3, seqs, pos, k, v, KVRT_F32, 1) == OKSET);

    double q[4] = {0, 0, 0, 0}, out[8];
    /* unwritten MLA rows: no answer */
    CHECK(ref_attention(m, 1, 0, 2, q, 1, 1, 0, out) == -1);
    CHECK(ref_write(m, 1, 3, seqs, pos, km, NULL, KVRT_F32, 1) == OKSET);

    /* one visible key (causal): the output is its V */
    CHECK(ref_attention(m, 0, 0, 0, q, 1, 0, 0, out) == 1);
    CHECK(out[0] == 0 && out[1] == 0);
    /* window 2 at position 2 sees positions 1 and 2; q = 0: equal weights */
    CHECK(ref_attention(m, 0, 0, 2, q, 1, 0, 0, out) == 2);
    CHECK_NEAR(out[0], 1.5, 1e-15);
    CHECK_NEAR(out[1], 15, 1e-13);
    /* q = (ln 3, 0), scale 1: logits 0 (key 1) and ln 3 (key 2): weights 1/4, 3/4 */
    q[0] = log(3.0);
    CHECK(ref_attention(m, 0, 0, 2, q, 1, 1, 0, out) == 2);
    CHECK_NEAR(out[0], 0.25 * 1 + 0.75 * 2, 1e-14);
    /* soft cap 1: logits tanh(0), tanh(ln 3) */
    CHECK(ref_attention(m, 0, 0, 2, q, 1, 1, 1, out) == 2);
    double w2 = exp(tanh(log(3.0)));
    CHECK_NEAR(out[0], (1 + 2 * w2) / (1 + w2), 1e-14);
    /* GQA: two query heads share the kv head */
    double q2[6] = {0, 0, log(3.0), 0, 0, 0};
    CHECK(ref_attention(m, 0, 0, 2, q2, 2, 1, 0, out) == 2);
    CHECK_NEAR(out[0], 1.5, 1e-14);
    CHECK_NEAR(out[2], 1.75, 1e-14);
    CHECK(ref_attention(m, 0, 0, 2, q2, 3, 1, 0, out) == 2); /* 3 % 1 == 0 */
    /* no visible key: zeros; another sequence is empty */
    out[0] = 7;
    CHECK(ref_attention(m, 0, 1, 5, q, 1, 1, 0, out) == 0);
    CHECK(out[0] == 0 && out[1] == 0);
    /* MLA: V is the latent part; no window; q . k over all 4 dims */
    double qm[4] = {0, 0, 0, 0};
    CHECK(ref_attention(m, 1, 0, 2, qm, 1, 1, 0, out) == 3);
    CHECK_NEAR(out[0], 3, 1e-14);
    CHECK_NEAR(out[1], 4, 1e-14);
    /* CROSS: every row, no mask; a sequence without rows gets zeros */
    float ck[4] = {1, 0, 0, 0}, cv[2] = {4, 8};
    CHECK(ref_cross_set(m, 2, 0, 2, ck, cv, KVRT_F32, 1) == OKSET);
    double qc[2] = {log(3.0), 0};
    CHECK(ref_attention(m, 2, 0, 0, qc, 1, 1, 0, out) == 2);
    CHECK_NEAR(out[0], 0.75 * 4 + 0.25 * 8, 1e-14);
    CHECK(ref_attention(m, 2, 1, 0, qc, 1, 1, 0, out) == 0);
    CHECK(ref_attention_vmax(m, 0, 0, 2) == 20);
    CHECK(ref_attention_vmax(m, 2, 0, 0) == 8);
    ref_destroy(m);
}

int main(void)
{
    test_conversion();
    test_rope();
    test_plan();
    test_rm_cp_keep();
    test_shift_div();
    test_attention();
    if (n_failed) {
        fprintf(stderr, "ref self-test: %d of %d checks failed\n", n_failed, n_checks);
        return 1;
    }
    printf("ref self-test: %d checks passed\n", n_checks);
    return 0;
}
