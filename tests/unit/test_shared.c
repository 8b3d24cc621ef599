/*
 * test_shared.c: shared handles for speculative drafts (seed 001: a draft
 * sharing the target's cache on another device must be refused at creation,
 * naming the devices and the layer), and a speculative round through both
 * handles.
 */
#include "common.h"

static void fill(float *x, int64_t n, int salt)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = test_value(salt, (int32_t)(i / 64), i % 64);
}

/* seed 001: the draft asks for another device than the target's cache. */
static void test_seed001_shared_device_mismatch(void **state)
{
    (void)state;
    kvrt_layer_desc tl[2] = {{KVRT_LAYER_ATTN, 2, 16, 16, 0, 0, 0}, {KVRT_LAYER_ATTN, 2, 16, 16, 0, 0, 0}};
    kvrt_cache_desc td = test_desc(tl, 2, KVRT_F16, 16, 32, 2);
    kvrt_cache *target, *draft = (kvrt_cache *)0x1;
    OK(kvrt_cache_create(&td, &target));
    kvrt_layer_desc dl[2] = {tl[1], {KVRT_LAYER_ATTN, 2, 16, 16, 0, 0, 0}};
    int base_layers[2] = {1, -1};
    kvrt_cache_desc dd = td;
    dd.layers = dl;
    dd.device = (kvrt_device){KVRT_BACKEND_CUDA, 0};
    EXPECT(KVRT_ERR_DEVICE_MISMATCH, kvrt_cache_create_shared(target, &dd, base_layers, &draft));
    assert_null(draft);
    assert_non_null(strstr(kvrt_last_error(), "cuda:0"));
    assert_non_null(strstr(kvrt_last_error(), "cpu:0"));
    assert_non_null(strstr(kvrt_last_error(), "layer 0"));
    /* a named layer of another shape */
    dd.device = td.device;
    dl[0].head_dim_k = 32;
    EXPECT(KVRT_ERR_INCOMPATIBLE, kvrt_cache_create_shared(target, &dd, base_layers, &draft));
    assert_non_null(strstr(kvrt_last_error(), "head_dim_k 32"));
    dl[0].head_dim_k = 16;
    /* another dtype */
    dd.dtype = KVRT_F32;
    EXPECT(KVRT_ERR_INCOMPATIBLE, kvrt_cache_create_shared(target, &dd, base_layers, &draft));
    assert_non_null(strstr(kvrt_last_error(), "dtype"));
    dd.dtype = td.dtype;
    /* an own layer no group of the base can hold */
    dl[1].window = 8;
    EXPECT(KVRT_ERR_INCOMPATIBLE, kvrt_cache_create_shared(target, &dd, base_layers, &draft));
    assert_non_null(strstr(kvrt_last_error(), "window 8"));
    dl[1].window = 0;
    base_layers[0] = 7;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create_shared(target, &dd, base_layers, &draft));
    OK(kvrt_cache_check(target));
    kvrt_cache_destroy(target);
}

/* Draft proposes 4 tokens in its own layer; target verifies them through the
 * same plan; the rejected tail is removed once and is gone in both. */
static void test_draft_speculative_round(void **state)
{
    (void)state;
    kvrt_layer_desc tl[2] = {{KVRT_LAYER_ATTN, 2, 16, 16, 0, 0, 0}, {KVRT_LAYER_ATTN, 2, 16, 16, 0, 0, 0}};
    kvrt_cache_desc td = test_desc(tl, 2, KVRT_F32, 4, 32, 2);
    kvrt_cache *target, *draft;
    kvrt_batch *b;
    OK(kvrt_cache_create(&td, &target));
    kvrt_layer_desc dl[2] = {tl[1], {KVRT_LAYER_ATTN, 1, 8, 8, 0, 0, 0}};
    int base_layers[2] = {1, -1};
    kvrt_cache_desc dd = td;
    dd.layers = dl;
    dd.n_blocks = 0; /* ignored: the pool is the target's */
    OK(kvrt_cache_create_shared(target, &dd, base_layers, &draft));
    assert_int_equal(kvrt_cache_get_desc(draft)->n_layers, 2);
    assert_int_equal(kvrt_cache_get_desc(target)->n_layers, 2);
    assert_int_equal(kvrt_layer_group(draft, 1), kvrt_layer_group(target, 0));
    OK(kvrt_batch_create(target, 16, &b));
    /* prompt: 10 tokens, target layers */
    int32_t seqs[16] = {0}, pos[16];
    float k[16 * 64], v[16 * 64], dk[16 * 8], dv[16 * 8];
    for (int i = 0; i < 10; i++)
        pos[i] = i;
    OK(kvrt_batch_plan(target, 10, seqs, pos, b));
    fill(k, 10 * 32, 1);
    fill(v, 10 * 32, 2);
    OK(kvrt_write(target, b, 0, k, v, KVRT_F32, NULL));
    OK(kvrt_write(target, b, 1, k, v, KVRT_F32, NULL));
    fill(dk, 10 * 8, 3);
    fill(dv, 10 * 8, 4);
    OK(kvrt_write(draft, b, 1, dk, dv, KVRT_F32, NULL)); /* the draft's own layer for the prompt */
    /* draft proposes 4 */
    for (int i = 0; i < 4; i++)
        pos[i] = 10 + i;
    OK(kvrt_batch_plan(draft, 4, seqs, pos, b));
    fill(dk + 10 * 8, 4 * 8, 5);
    fill(dv + 10 * 8, 4 * 8, 6);
    OK(kvrt_write(draft, b, 1, dk + 10 * 8, dv + 10 * 8, KVRT_F32, NULL));
    /* the target verifies the same 4 through the same plan */
    fill(k + 10 * 32, 4 * 32, 7);
    fill(v + 10 * 32, 4 * 32, 8);
    OK(kvrt_write(target, b, 0, k + 10 * 32, v + 10 * 32, KVRT_F32, NULL));
    OK(kvrt_write(target, b, 1, k + 10 * 32, v + 10 * 32, KVRT_F32, NULL));
    /* accepts 2: the rejected tail goes once, through either handle */
    OK(kvrt_seq_rm(draft, 0, 12, -1));
    int64_t n;
    int32_t gp[16];
    float gk[16 * 64], gv[16 * 64];
    OK(kvrt_gather(target, 0, 0, 0, -1, gk, gv, gp, 16, &n, NULL));
    assert_int_equal(n, 12);
    assert_memory_equal(gk, k, sizeof(float) * 12 * 32);
    assert_memory_equal(gv, v, sizeof(float) * 12 * 32);
    OK(kvrt_gather(draft, 1, 0, 0, -1, gk, gv, gp, 16, &n, NULL));
    assert_int_equal(n, 12);
    assert_memory_equal(gk, dk, sizeof(float) * 12 * 8);
    assert_memory_equal(gv, dv, sizeof(float) * 12 * 8);
    OK(kvrt_gather(draft, 0, 0, 0, -1, gk, gv, gp, 16, &n, NULL)); /* = target layer 1 */
    assert_int_equal(n, 12);
    assert_memory_equal(gk, k, sizeof(float) * 12 * 32);
    int32_t hi;
    OK(kvrt_seq_pos_max(target, 0, &hi));
    assert_int_equal(hi, 11);
    /* an edit through the target moves the draft's rows too */
    OK(kvrt_seq_cp(target, 0, 1, 0, 6));
    OK(kvrt_gather(draft, 1, 1, 0, -1, gk, gv, gp, 16, &n, NULL));
    assert_int_equal(n, 6);
    assert_memory_equal(gk, dk, sizeof(float) * 6 * 8);
    OK(kvrt_cache_check(draft));
    /* the target's handle goes first; the draft still works */
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(target);
    OK(kvrt_seq_rm(draft, 1, 0, -1));
    OK(kvrt_gather(draft, 1, 0, 0, -1, gk, gv, gp, 16, &n, NULL));
    assert_int_equal(n, 12);
    OK(kvrt_cache_check(draft));
    kvrt_cache_destroy(draft);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_seed001_shared_device_mismatch),
        cmocka_unit_test(test_draft_speculative_round),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
