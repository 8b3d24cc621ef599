/*
 * test_gpu_prerope_shift.c: 100 shifts (and a div) on a pre-RoPE cache
 * (rope.mode KVRT_ROPE_IN_ATTENTION) of the backend named by
 * KVRT_TEST_BACKEND change positions only: K and V gathered before and
 * after are bit-exact, the positions moved by the shifts' sum, and a CPU
 * cache given the same writes and edits gathers the same bytes. Two ATTN
 * layers (per-layer bases), both RoPE styles, partial rotary dims.
 */
#include "../unit/scenario.h"

enum { HEADS = 2, DK = 32, DV = 16, N = 40 };

static kvrt_cache *make_cache(kvrt_device dev, kvrt_rope_style style, int n_rot,
                              kvrt_layer_desc layers[2])
{
    for (int l = 0; l < 2; l++) {
        memset(&layers[l], 0, sizeof layers[l]);
        layers[l].kind = KVRT_LAYER_ATTN;
        layers[l].n_kv_heads = HEADS;
        layers[l].head_dim_k = DK;
        layers[l].head_dim_v = DV;
        layers[l].rope_theta = l == 0 ? 10000.0f : 1000000.0f;
    }
    kvrt_cache_desc d = test_desc(layers, 2, KVRT_F16, 16, 16, 2);
    d.device = dev;
    d.rope.n_rot = n_rot;
    d.rope.style = style;
    d.rope.mode = KVRT_ROPE_IN_ATTENTION;
    d.rope.rotate_q = 1;
    kvrt_cache *c = NULL;
    OK(kvrt_cache_create(&d, &c));
    return c;
}

/* Plans N tokens of sequence 0 at 0.. and writes both layers (f32 source). */
static void put(kvrt_cache *c, const sc_buf *k, const sc_buf *v)
{
    int32_t seqs[N], pos[N];
    for (int i = 0; i < N; i++)
        seqs[i] = 0, pos[i] = i;
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, N, &b));
    OK(kvrt_batch_plan(c, N, seqs, pos, b));
    for (int l = 0; l < 2; l++)
        OK(kvrt_write(c, b, l, k->p, v->p, KVRT_F32, NULL));
    kvrt_batch_destroy(b);
}

typedef struct rows {
    uint16_t k[N * HEADS * DK], v[N * HEADS * DV];
    int32_t  pos[N];
    int64_t  n;
} rows;

static void gather(const kvrt_cache *c, int layer, rows *r)
{
    OK(kvrt_gather(c, layer, 0, 0, -1, r->k, r->v, r->pos, N, &r->n, NULL));
    assert_int_equal(r->n, N);
}

static void edit(kvrt_cache *c, int32_t *end)
{
    for (int i = 0; i < 100; i++) {
        int32_t delta = i % 2 ? -37 : 41;
        OK(kvrt_seq_shift(c, 0, 0, -1, delta));
        *end += delta;
    }
    OK(kvrt_seq_div(c, 0, 0, -1, 1));
}

static void check(kvrt_rope_style style, int n_rot)
{
    static float k[N * HEADS * DK], v[N * HEADS * DV];
    for (int64_t e = 0; e < N * HEADS * DK; e++)
        k[e] = test_value(0, (int32_t)(e / (HEADS * DK)), e) * 3.0f;
    for (int64_t e = 0; e < N * HEADS * DV; e++)
        v[e] = test_value(1, (int32_t)(e / (HEADS * DV)), e);
    kvrt_layer_desc layers[2], cpu_layers[2];
    kvrt_device cpu = {KVRT_BACKEND_CPU, 0};
    kvrt_cache *c = make_cache(sc_dev.device, style, n_rot, layers);
    kvrt_cache *h = make_cache(cpu, style, n_rot, cpu_layers);
    sc_buf kb = sc_upload(k, sizeof k), vb = sc_upload(v, sizeof v);
    put(c, &kb, &vb);
    put(h, &(sc_buf){k, sizeof k, 0}, &(sc_buf){v, sizeof v, 0});
    static rows before[2], after, on_cpu;
    for (int l = 0; l < 2; l++)
        gather(c, l, &before[l]);
    int32_t end = N, end_cpu = N;
    edit(c, &end);
    edit(h, &end_cpu);
    for (int l = 0; l < 2; l++) {
        gather(c, l, &after);
        gather(h, l, &on_cpu);
        for (int i = 0; i < N; i++)
            assert_int_equal(after.pos[i], before[l].pos[i] + end - N);
        assert_memory_equal(after.k, before[l].k, sizeof after.k);
        assert_memory_equal(after.v, before[l].v, sizeof after.v);
        assert_memory_equal(after.k, on_cpu.k, sizeof after.k);
        assert_memory_equal(after.pos, on_cpu.pos, sizeof after.pos);
    }
    sc_buf_free(&kb);
    sc_buf_free(&vb);
    kvrt_cache_destroy(c);
    kvrt_cache_destroy(h);
}

static void test_shifts_keep_k(void **state)
{
    (void)state;
    check(KVRT_ROPE_NEOX, DK);
    check(KVRT_ROPE_NORMAL, DK / 2);
}

int main(void)
{
    int st = sc_backend_init();
    if (st != 0)
        return st;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_shifts_keep_k)};
    st = cmocka_run_group_tests(tests, NULL, NULL);
    sc_backend_fini();
    return st;
}
