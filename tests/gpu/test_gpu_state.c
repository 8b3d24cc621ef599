/*
 * test_gpu_state.c: state files move between the device and the CPU
 * backend bit-exactly, both ways.
 *
 * For each cache dtype (f32, f16, bf16): a device cache with an attention
 * layer, a sliding-window layer, an MLA layer and a cross layer holds two
 * sequences (written on the device, then shifted on the device so that
 * re-rotated rows are part of the state) and cross rows. Its state (every
 * sequence) is loaded into a CPU cache of the same block size (the header
 * records it); every row and position of every layer and sequence
 * gathered from the CPU cache equals the device's, and the CPU cache's own
 * state is the same file byte for byte. That file loaded into a fresh
 * device cache of another block size again gathers equal to the CPU cache.
 * Data moves: compared bit-exact.
 *
 * A cmocka test on the helpers of tests/state/state_test.h (state images in
 * memory, snapshots of a cache). Compiled once per API (KVRT_GPU_CUDA or
 * KVRT_GPU_HIP); argument "cpu" puts the CPU backend in the device's place,
 * which checks the test where there is no device. Skipped (77) without a
 * device.
 */
#include "gpu_compat.h"

#include "../state/state_test.h"

#if defined(KVRT_GPU_IS_HIP)
#  define TEST_BACKEND KVRT_BACKEND_HIP
#else
#  define TEST_BACKEND KVRT_BACKEND_CUDA
#endif

enum { N_LAYERS = 4, MAX_SEQS = 3, CROSS_ROWS = 12 };

static const kvrt_layer_desc layers[N_LAYERS] = {
    {KVRT_LAYER_ATTN, 2, 16, 8, 0, 0, 0},
    {KVRT_LAYER_ATTN, 1, 8, 16, 48, 0, 0},
    {KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 16},
    {KVRT_LAYER_CROSS, 2, 8, 16, 0, 0, 0},
};

static kvrt_backend device_backend = TEST_BACKEND;

/* n rows of layer l's K (kv 0) or V (kv 1) for positions p0.. as f32
 * (row_value of state_test.h), on the device (host memory for the CPU). */
static void *rows(uint32_t salt, int l, int kv, int32_t p0, int n)
{
    size_t w = kv == 0 ? layer_k_elems(&layers[l]) : layer_v_elems(&layers[l]);
    size_t bytes = (size_t)n * w * sizeof(float);
    float *host = malloc(bytes + 4);
    for (int t = 0; t < n; t++)
        for (size_t e = 0; e < w; e++)
            host[(size_t)t * w + e] = row_value(salt + (uint32_t)kv, l, p0 + t, (int64_t)e);
    if (device_backend == KVRT_BACKEND_CPU)
        return host;
    void *p = NULL;
    assert_int_equal(cudaMalloc(&p, bytes + 4), cudaSuccess);
    assert_int_equal(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    free(host);
    return p;
}

static void rows_free(void *p)
{
    if (device_backend == KVRT_BACKEND_CPU)
        free(p);
    else
        (void)cudaFree(p);
}

static kvrt_cache *make(kvrt_backend backend, kvrt_dtype dtype, int block_size)
{
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.device.backend = backend;
    d.dtype = dtype;
    d.layers = layers;
    d.n_layers = N_LAYERS;
    d.block_size = block_size;
    d.n_blocks = 512 / block_size;
    d.max_seqs = MAX_SEQS;
    d.cross_max_len = CROSS_ROWS;
    d.rope.n_rot = 8;
    d.rope.theta = 10000.0f;
    kvrt_cache *c = NULL;
    OK(kvrt_cache_create(&d, &c));
    return c;
}

/* Writes positions 0..n-1 of seq on every self-attention layer (fill_seq of
 * state_test.h takes host rows; a device cache takes device rows). */
static void fill(kvrt_cache *c, int32_t seq, int n, uint32_t salt)
{
    int32_t seqs[256], pos[256];
    assert_true(n <= 256);
    for (int t = 0; t < n; t++) {
        seqs[t] = seq;
        pos[t] = t;
    }
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, n, &b));
    OK(kvrt_batch_plan(c, n, seqs, pos, b));
    for (int l = 0; l < N_LAYERS; l++) {
        if (layers[l].kind == KVRT_LAYER_CROSS)
            continue;
        void *k = rows(salt, l, 0, 0, n);
        void *v = layer_v_elems(&layers[l]) > 0 ? rows(salt, l, 1, 0, n) : NULL;
        OK(kvrt_write(c, b, l, k, v, KVRT_F32, NULL));
        OK(kvrt_cache_sync(c)); /* the inputs live until the stream has passed the write */
        rows_free(k);
        if (v != NULL)
            rows_free(v);
    }
    kvrt_batch_destroy(b);
    void *k = rows(salt + 7, 3, 0, 0, CROSS_ROWS), *v = rows(salt + 7, 3, 1, 0, CROSS_ROWS);
    OK(kvrt_cross_set(c, 3, seq, CROSS_ROWS, k, v, KVRT_F32, NULL));
    OK(kvrt_cache_sync(c));
    rows_free(k);
    rows_free(v);
}

static void round_trip(kvrt_dtype dtype)
{
    kvrt_cache *dev = make(device_backend, dtype, 16);
    kvrt_cache *cpu = make(KVRT_BACKEND_CPU, dtype, 16);
    fill(dev, 0, 150, 11);
    fill(dev, 1, 40, 23);
    OK(kvrt_seq_shift(dev, 0, 30, -1, 5));  /* re-rotated on the device */
    OK(kvrt_seq_shift(dev, 1, 0, -1, -3));  /* positions below 0 are dropped */
    blob from_dev = save_state(dev, -1);
    OK(load_state(cpu, -1, from_dev.data, from_dev.size));
    for (int32_t s = 0; s < MAX_SEQS; s++)
        assert_same_seq(dev, s, cpu, s);
    kvrt_seq_group_info info;
    OK(kvrt_seq_group_info_get(cpu, 0, kvrt_layer_group(cpu, 0), &info));
    assert_true(info.n_tokens > 100); /* the scenario is not empty */
    blob from_cpu = save_state(cpu, -1);
    assert_same_blob(&from_dev, &from_cpu, "the device's and the CPU's states");
    kvrt_cache *back = make(device_backend, dtype, 64);
    OK(load_state(back, -1, from_cpu.data, from_cpu.size));
    for (int32_t s = 0; s < MAX_SEQS; s++)
        assert_same_seq(cpu, s, back, s);
    OK(kvrt_cache_check(back));
    blob_free(&from_dev);
    blob_free(&from_cpu);
    kvrt_cache_destroy(dev);
    kvrt_cache_destroy(cpu);
    kvrt_cache_destroy(back);
}

static void state_f32(void **st) { (void)st; round_trip(KVRT_F32); }
static void state_f16(void **st) { (void)st; round_trip(KVRT_F16); }
static void state_bf16(void **st) { (void)st; round_trip(KVRT_BF16); }

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "cpu") == 0)
        device_backend = KVRT_BACKEND_CPU;
    if (kvrt_device_count(device_backend) == 0) {
        printf("test_gpu_state: no %s device, skipped\n", kvrt_backend_name(device_backend));
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(state_f32),
        cmocka_unit_test(state_f16),
        cmocka_unit_test(state_bf16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
