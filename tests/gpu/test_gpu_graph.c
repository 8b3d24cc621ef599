/*
 * test_gpu_graph.c: a step and a series of sequence edits captured into a
 * graph through the public API, then replayed, must leave the cache exactly
 * as running them directly does.
 *
 * The same scenario runs three times: on the CPU backend, on the device
 * directly, and on the device inside stream capture (cudaStreamBeginCapture
 * on the cache's stream; kvrt_batch_plan, kvrt_write and kvrt_attention of
 * every layer, kvrt_seq_cp, kvrt_seq_shift, kvrt_seq_rm, kvrt_cache_compact;
 * end the capture, instantiate, launch). Capture fails if any of those calls
 * synchronizes or touches the legacy stream, so its success proves the edits
 * are stream-ordered. Afterwards every sequence of every layer is gathered
 * and compared with the CPU run: positions and V bit-exact, K within the
 * rotation bound of tests/gpu/test_gpu_ops.c (only shifted rows may
 * differ), attention outputs within the bound of test_gpu_ops.c, and
 * kvrt_cache_check compares the device's positions with the host's.
 *
 * `capture-kernels` (kvrt-sim): one capture that reaches every kernel the
 * glue can launch for an f16 cache: a prefill-shaped step (the tensor-core
 * prefill kernel; the generic kernel for the MLA layer), a decode step (the
 * decode kernel; the MLA kernel for 512 + 64 latent rows), a long decode
 * that splits (the combine kernel), a gather into device memory, and the
 * edits (copy, shift with its re-rotation, removal, compaction); each
 * kernel must be launched inside the capture and the capture must end and
 * replay cleanly, so that a synchronization on any of those paths fails
 * here (mutant 2 in src/backend_gpu.c proves it for prefill).
 *
 * Compiled once per API (KVRT_GPU_CUDA or KVRT_GPU_HIP). Exits 77 without a
 * device.
 */
#include "gpu_compat.h"

#include "gpu_test.h"
#include "kvrt_layout.h"

#if defined(KVRT_GPU_IS_HIP)
#  define TEST_BACKEND KVRT_BACKEND_HIP
#else
#  define TEST_BACKEND KVRT_BACKEND_CUDA
#endif

#define RT(call)                                                                             \
    do {                                                                                     \
        cudaError_t rt_err_ = (call);                                                        \
        if (rt_err_ != cudaSuccess) {                                                        \
            gpu_test_failures++;                                                             \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                    \
                    cudaGetErrorString(rt_err_));                                            \
            return;                                                                          \
        }                                                                                    \
    } while (0)

enum { N_LAYERS = 3, MAX_SEQS = 4, FIRST = 40, SECOND = 6, MAX_ROWS = 128 };

/* Query heads per layer in the attention of the captured step. */
static const int q_heads[N_LAYERS] = {4, 8, 4};

static const kvrt_layer_desc layers[N_LAYERS] = {
    {KVRT_LAYER_ATTN, 2, 64, 64, 0, 0, 0},
    {KVRT_LAYER_ATTN, 4, 128, 64, 0, 0, 0},
    {KVRT_LAYER_MLA, 0, 0, 0, 0, 128, 32},
};

static int64_t k_row(int l) /* elements of one token's K row */
{
    return layers[l].kind == KVRT_LAYER_MLA ? layers[l].latent_dim + layers[l].rope_dim
                                            : (int64_t)layers[l].n_kv_heads * layers[l].head_dim_k;
}

static int64_t v_row(int l)
{
    return layers[l].kind == KVRT_LAYER_MLA ? 0 : (int64_t)layers[l].n_kv_heads * layers[l].head_dim_v;
}

/* Elements per query head of q and of the attention output. */
static int64_t q_dim(int l)
{
    return layers[l].kind == KVRT_LAYER_MLA ? layers[l].latent_dim + layers[l].rope_dim
                                            : layers[l].head_dim_k;
}

static int64_t out_dim(int l)
{
    return layers[l].kind == KVRT_LAYER_MLA ? layers[l].latent_dim : layers[l].head_dim_v;
}

/* Deterministic input value in [-1, 1]. */
static float value(int l, int kv, int32_t pos, int64_t e)
{
    uint32_t x = (uint32_t)(l * 7919 + kv * 15485863 + pos * 104729 + (int32_t)e * 31);
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 2001) / 1000.0f - 1.0f;
}

/* What one run leaves: per layer and sequence, the gathered rows. */
typedef struct snapshot {
    int64_t  n[N_LAYERS][MAX_SEQS];
    int32_t  pos[N_LAYERS][MAX_SEQS][MAX_ROWS];
    uint16_t *k[N_LAYERS][MAX_SEQS], *v[N_LAYERS][MAX_SEQS];
    float    *attn[N_LAYERS]; /* the captured step's attention output, f32 */
} snapshot;

static void snapshot_free(snapshot *s)
{
    for (int l = 0; l < N_LAYERS; l++)
        free(s->attn[l]);
    for (int l = 0; l < N_LAYERS; l++)
        for (int q = 0; q < MAX_SEQS; q++) {
            free(s->k[l][q]);
            free(s->v[l][q]);
        }
}

/* Input rows of a plan of n tokens at positions p0.., as f32, in host
 * memory or on the device. */
typedef struct inputs {
    void *k[N_LAYERS], *v[N_LAYERS], *q[N_LAYERS], *out[N_LAYERS];
    int   on_device;
} inputs;

static void inputs_make(inputs *in, int on_device, int32_t p0, int n)
{
    memset(in, 0, sizeof *in);
    in->on_device = on_device;
    for (int l = 0; l < N_LAYERS; l++)
        for (int kv = 0; kv < 4; kv++) { /* K, V, q, out */
            int64_t row = kv == 0 ? k_row(l) : kv == 1 ? v_row(l)
                        : (kv == 2 ? q_dim(l) : out_dim(l)) * q_heads[l];
            if (row == 0)
                continue;
            size_t bytes = (size_t)(n * row) * sizeof(float);
            float *host = malloc(bytes);
            for (int t = 0; t < n; t++)
                for (int64_t e = 0; e < row; e++)
                    host[t * row + e] = value(l, kv, p0 + t, e);
            void *p = host;
            if (on_device) {
                p = NULL;
                if (cudaMalloc(&p, bytes) != cudaSuccess ||
                    cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
                    fprintf(stderr, "inputs: device allocation failed\n");
                    exit(1);
                }
                free(host);
            }
            void **slot = kv == 0 ? &in->k[l] : kv == 1 ? &in->v[l] : kv == 2 ? &in->q[l] : &in->out[l];
            *slot = p;
        }
}

static void inputs_free(inputs *in)
{
    for (int l = 0; l < N_LAYERS; l++) {
        void *p[4] = {in->k[l], in->v[l], in->q[l], in->out[l]};
        for (int i = 0; i < 4; i++) {
            if (p[i] == NULL)
                continue;
            if (in->on_device)
                (void)cudaFree(p[i]);
            else
                free(p[i]);
        }
    }
}

static kvrt_status plan_and_write(kvrt_cache *cache, kvrt_batch *batch, int32_t seq, int32_t p0, int n,
                                  const inputs *in, void *stream)
{
    int32_t seqs[64], pos[64];
    for (int t = 0; t < n; t++) {
        seqs[t] = seq;
        pos[t] = p0 + t;
    }
    kvrt_status st = kvrt_batch_plan(cache, n, seqs, pos, batch);
    for (int l = 0; l < N_LAYERS && st == KVRT_OK; l++)
        st = kvrt_write(cache, batch, l, in->k[l], in->v[l], KVRT_F32, stream);
    for (int l = 0; l < N_LAYERS && st == KVRT_OK; l++) {
        kvrt_attention_params params = {q_heads[l], 0.0f, 0.0f, KVRT_F32, KVRT_F32};
        st = kvrt_attention(cache, batch, l, in->q[l], in->out[l], &params, stream);
    }
    return st;
}

/* The edits captured into the graph. */
static kvrt_status edits(kvrt_cache *cache, kvrt_batch *batch, const inputs *second, void *stream)
{
    kvrt_status st = plan_and_write(cache, batch, 0, FIRST, SECOND, second, stream);
    if (st == KVRT_OK)
        st = kvrt_seq_cp(cache, 0, 1, 0, -1);        /* shares whole blocks, copies the last */
    if (st == KVRT_OK)
        st = kvrt_seq_shift(cache, 1, 20, -1, 7);    /* copy-on-write, then re-rotation */
    if (st == KVRT_OK)
        st = kvrt_seq_rm(cache, 0, 4, 12);           /* holes in sequence 0 */
    if (st == KVRT_OK)
        st = kvrt_seq_cp(cache, 0, 2, 0, 30);        /* a partial copy */
    if (st == KVRT_OK)
        st = kvrt_cache_compact(cache);              /* moves rows into the holes */
    return st;
}

/* The backend of modes 1 and 2 (the CPU for the self-check). */
static kvrt_backend device_backend = TEST_BACKEND;

/* `sync-in-capture`: a call that waits for the stream, made inside the
 * capture after the edits, which must fail and invalidate the capture. */
enum { SYNC_NONE, SYNC_CACHE, SYNC_GATHER, SYNC_N };
static int sync_inside = SYNC_NONE;
static const char *const sync_names[SYNC_N] = {"none", "kvrt_cache_sync", "kvrt_gather"};

/* Makes the synchronizing call `sync_inside` on a capturing stream: it must
 * fail with KVRT_ERR_DEVICE. */
static void sync_under_capture(kvrt_cache *cache, void *stream)
{
    kvrt_status st = KVRT_OK;
    if (sync_inside == SYNC_CACHE) {
        st = kvrt_cache_sync(cache);
    } else {
        uint16_t k[MAX_ROWS * 64];
        int32_t pos[MAX_ROWS];
        int64_t n = 0;
        st = kvrt_gather(cache, 0, 0, 0, -1, k, NULL, pos, MAX_ROWS, &n, stream);
    }
    CHECK(st == KVRT_ERR_DEVICE, "%s under capture: %s (%s), want KVRT_ERR_DEVICE",
          sync_names[sync_inside], kvrt_status_name(st), kvrt_last_error());
}

/* mode 0: CPU; 1: device, direct; 2: device, captured and replayed. */
static void run(int mode, snapshot *out)
{
    memset(out, 0, sizeof *out);
    int on_device = mode > 0 && device_backend != KVRT_BACKEND_CPU;
    kvrt_cache_desc desc;
    kvrt_cache_desc_init(&desc);
    desc.device.backend = mode > 0 ? device_backend : KVRT_BACKEND_CPU;
    desc.device.ordinal = 0;
    desc.dtype = KVRT_F16;
    desc.n_layers = N_LAYERS;
    desc.layers = layers;
    desc.max_seqs = MAX_SEQS;
    desc.block_size = 16;
    desc.n_blocks = 32;
    desc.rope.n_rot = 64;
    desc.rope.theta = 10000.0f;
    desc.rope.freq_scale = 1.0f;
    desc.rope.style = KVRT_ROPE_NORMAL;
    kvrt_cache *cache = NULL;
    kvrt_batch *batch = NULL;
    cudaStream_t stream = NULL;
    inputs first, second;
    inputs_make(&first, on_device, 0, FIRST);
    inputs_make(&second, on_device, FIRST, SECOND);
    kvrt_status st = kvrt_cache_create(&desc, &cache);
    CHECK(st == KVRT_OK, "mode %d: kvrt_cache_create: %s", mode, kvrt_last_error());
    if (st == KVRT_OK && on_device) {
        if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
            CHECK(0, "cudaStreamCreateWithFlags failed");
            st = KVRT_ERR_DEVICE;
        } else {
            st = kvrt_cache_set_stream(cache, (void *)stream);
        }
    }
    if (st == KVRT_OK)
        st = kvrt_batch_create(cache, 64, &batch);
    if (st == KVRT_OK)
        st = plan_and_write(cache, batch, 0, 0, FIRST, &first, (void *)stream);
    if (st == KVRT_OK)
        st = kvrt_cache_sync(cache);
    CHECK(st == KVRT_OK, "mode %d: first step: %s", mode, kvrt_last_error());

    if (st == KVRT_OK && mode < 2) {
        st = edits(cache, batch, &second, (void *)stream);
        CHECK(st == KVRT_OK, "mode %d: edits: %s", mode, kvrt_last_error());
    } else if (st == KVRT_OK) {
        cudaGraph_t graph = NULL;
        cudaGraphExec_t exec = NULL;
        cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
        CHECK(err == cudaSuccess, "cudaStreamBeginCapture: %s", cudaGetErrorString(err));
        if (err == cudaSuccess) {
            st = edits(cache, batch, &second, (void *)stream);
            CHECK(st == KVRT_OK, "edits under capture: %s", kvrt_last_error());
            if (sync_inside != SYNC_NONE)
                sync_under_capture(cache, (void *)stream);
            err = cudaStreamEndCapture(stream, &graph);
            if (sync_inside != SYNC_NONE) {
                CHECK(err == cudaErrorStreamCaptureInvalidated && graph == NULL,
                      "cudaStreamEndCapture after %s: %s, want the capture invalidated",
                      sync_names[sync_inside], cudaGetErrorString(err));
                st = KVRT_ERR_DEVICE; /* nothing was replayed: no snapshot */
            } else {
                CHECK(err == cudaSuccess, "cudaStreamEndCapture (did an edit synchronize?): %s",
                      cudaGetErrorString(err));
            }
        }
        if (st == KVRT_OK && err == cudaSuccess) {
#if defined(KVRT_GPU_IS_HIP)
            err = hipGraphInstantiate(&exec, graph, NULL, NULL, 0);
#else
            err = cudaGraphInstantiate(&exec, graph, 0ULL);
#endif
            CHECK(err == cudaSuccess, "graph instantiation: %s", cudaGetErrorString(err));
            if (err == cudaSuccess) {
                err = cudaGraphLaunch(exec, stream);
                CHECK(err == cudaSuccess, "cudaGraphLaunch: %s", cudaGetErrorString(err));
                if (err == cudaSuccess)
                    err = cudaStreamSynchronize(stream);
                CHECK(err == cudaSuccess, "replay: %s", cudaGetErrorString(err));
            }
        }
        if (exec != NULL)
            (void)cudaGraphExecDestroy(exec);
        if (graph != NULL)
            (void)cudaGraphDestroy(graph);
        if (err != cudaSuccess && st == KVRT_OK)
            st = KVRT_ERR_DEVICE;
        if (sync_inside != SYNC_NONE) {
            (void)cudaGetLastError();
            st = KVRT_ERR_DEVICE;
        }
    }
    /* The outputs were written on the cache's stream, which does not order
     * against the legacy stream of the copies below. */
    if (st == KVRT_OK) {
        st = kvrt_cache_sync(cache);
        CHECK(st == KVRT_OK, "mode %d: kvrt_cache_sync: %s", mode, kvrt_last_error());
    }
    for (int l = 0; l < N_LAYERS && st == KVRT_OK; l++) {
        size_t bytes = (size_t)(SECOND * out_dim(l) * q_heads[l]) * sizeof(float);
        out->attn[l] = malloc(bytes);
        if (on_device) {
            cudaError_t err = cudaMemcpy(out->attn[l], second.out[l], bytes, cudaMemcpyDeviceToHost);
            CHECK(err == cudaSuccess, "attention output: %s", cudaGetErrorString(err));
        } else {
            memcpy(out->attn[l], second.out[l], bytes);
        }
    }
    if (st == KVRT_OK) {
        st = kvrt_cache_check(cache);
        CHECK(st == KVRT_OK, "mode %d: kvrt_cache_check: %s", mode, kvrt_last_error());
    }
    for (int l = 0; l < N_LAYERS && st == KVRT_OK; l++)
        for (int q = 0; q < MAX_SEQS && st == KVRT_OK; q++) {
            out->k[l][q] = calloc((size_t)(MAX_ROWS * k_row(l)), sizeof(uint16_t));
            out->v[l][q] = calloc((size_t)(MAX_ROWS * (v_row(l) > 0 ? v_row(l) : 1)), sizeof(uint16_t));
            st = kvrt_gather(cache, l, q, 0, -1, out->k[l][q], v_row(l) > 0 ? out->v[l][q] : NULL,
                             out->pos[l][q], MAX_ROWS, &out->n[l][q], (void *)stream);
            CHECK(st == KVRT_OK, "mode %d: gather layer %d seq %d: %s", mode, l, q, kvrt_last_error());
        }
    kvrt_batch_destroy(batch);
    kvrt_cache_destroy(cache);
    if (stream != NULL)
        (void)cudaStreamDestroy(stream);
    inputs_free(&first);
    inputs_free(&second);
}

/* The bound of device against CPU attention for one output of the
 * captured step, derived as attention_close's in tests/gpu/test_gpu_ops.c
 * (which see): per side B = 2 A (2 E_p + (6 n + 33) u), u = 2^-24, with
 *   D = scale (dk + 12) u M + 4 u S, S = scale M (no soft-cap, no pre-RoPE),
 *   E_p = 2 D + 2 u S + 4 u + 4 u n + 2 u S + 3 (4 u + 2 u S),
 * and the two sides' B added. The inputs bound the terms: K and V are f16
 * roundings of value() in [-1, 1] (stored as written: rotated by the
 * caller), so |k|, |v| <= 1, M = max_j sum |q_i k_ji| <= |q|_1 and A <= 1;
 * a token of the step sees at most FIRST + SECOND keys. The step runs
 * neither tensor-core kernel (f32 queries on an f16 cache; no 512 + 64 MLA
 * rows), so P is not rounded. Outputs are f32: an f32 ulp each side. */
static double attention_bound(int64_t dk, double q1)
{
    const double u = 0x1p-24, n = FIRST + SECOND, scale = 1.0f / sqrtf((float)dk);
    double M = q1, S = scale * M;
    double D = scale * (double)(dk + 12) * u * M + 4 * u * S;
    double E_p = 2 * D + 2 * u * S + 4 * u + 4 * u * n + 2 * u * S + 3 * (4 * u + 2 * u * S);
    return 2 * (2 * (2 * E_p + (6 * n + 33) * u)); /* both sides' B, A <= 1 */
}

/* f16 rows of a device run against the CPU's: equal, or within the
 * rotation bound (one f16 ulp + one f32 ulp + 2^-22, inputs in [-1, 1]). */
static void compare(const snapshot *cpu, const snapshot *dev, const char *what)
{
    for (int l = 0; l < N_LAYERS; l++)
        for (int q = 0; q < MAX_SEQS; q++) {
            int64_t n = cpu->n[l][q];
            CHECK(dev->n[l][q] == n, "%s: layer %d seq %d: %lld rows, cpu %lld", what, l, q,
                  (long long)dev->n[l][q], (long long)n);
            if (dev->n[l][q] != n || dev->k[l][q] == NULL || cpu->k[l][q] == NULL)
                continue;
            CHECK(memcmp(dev->pos[l][q], cpu->pos[l][q], (size_t)n * sizeof(int32_t)) == 0,
                  "%s: layer %d seq %d: positions differ", what, l, q);
            if (v_row(l) > 0)
                CHECK(memcmp(dev->v[l][q], cpu->v[l][q], (size_t)(n * v_row(l)) * 2) == 0,
                      "%s: layer %d seq %d: V differs", what, l, q);
            int64_t bad = 0;
            for (int64_t i = 0; i < n * k_row(l); i++) {
                float a = kvrt_f16_to_f32(cpu->k[l][q][i]), b = kvrt_f16_to_f32(dev->k[l][q][i]);
                if (cpu->k[l][q][i] == dev->k[l][q][i])
                    continue;
                float m = fabsf(a) > fabsf(b) ? fabsf(a) : fabsf(b);
                int e;
                frexpf(m > 6.1e-5f ? m : 6.1e-5f, &e);
                double bound = ldexp(1.0, e - 11) + ldexp(1.0, e - 24) + ldexp(1.0, -22);
                bad += !(fabs((double)a - (double)b) <= bound);
            }
            CHECK(bad == 0, "%s: layer %d seq %d: %lld K values beyond the rotation bound", what, l,
                  q, (long long)bad);
        }
    /* attention (f32 out): attention_bound, per (token, query head) */
    for (int l = 0; l < N_LAYERS; l++) {
        if (cpu->attn[l] == NULL || dev->attn[l] == NULL) {
            CHECK(0, "%s: layer %d: no attention output", what, l);
            continue;
        }
        int64_t bad = 0, n = SECOND * out_dim(l) * q_heads[l];
        for (int64_t i = 0; i < n; i++) {
            const int64_t row = i / out_dim(l); /* token row / q_heads, head row % q_heads */
            double q1 = 0; /* |q|_1 of the row, the query as written (f32) */
            for (int64_t e = 0; e < q_dim(l); e++)
                q1 += fabs(value(l, 2, FIRST + (int32_t)(row / q_heads[l]),
                                 (row % q_heads[l]) * q_dim(l) + e));
            float a = cpu->attn[l][i], b = dev->attn[l][i];
            double m = fabs(a) > fabs(b) ? fabs(a) : fabs(b);
            bad += !(fabs((double)a - (double)b) <= attention_bound(q_dim(l), q1) + 2 * m * ldexp(1.0, -24));
        }
        CHECK(bad == 0, "%s: layer %d: %lld of %lld attention outputs beyond the bound", what, l,
              (long long)bad, (long long)n);
    }
}

/* Usage: test_gpu_graph [cpu | sync-in-capture]. "cpu" runs the scenario
 * on the CPU backend twice, without capture, which checks the test where
 * there is no device. "sync-in-capture" adds, inside the capture, each call
 * that waits for the stream (kvrt_cache_sync, a kvrt_gather to host memory)
 * and passes when each fails and the capture ends invalidated. */
#if defined(KVRT_GPU_SIM)
/* A device buffer of n values value(l, kv, pos, e) (row elements per
 * token) as f32 or f16 (0 values: zeros). */
static void *device_values(size_t n, int row, int f16, int l, int kv)
{
    const size_t es = f16 ? 2 : 4;
    unsigned char *host = calloc(n > 0 ? n : 1, es);
    for (size_t i = 0; i < n; i++)
        kvrt_store(host, f16 ? KVRT_LAYOUT_F16 : KVRT_LAYOUT_F32, (int64_t)i,
                   value(l, kv, (int32_t)(i / (size_t)row), (int64_t)(i % (size_t)row)));
    void *p = NULL;
    if (cudaMalloc(&p, n * es + 16) != cudaSuccess ||
        cudaMemcpy(p, host, n * es, cudaMemcpyHostToDevice) != cudaSuccess) {
        fprintf(stderr, "capture-kernels: device allocation failed\n");
        exit(1);
    }
    free(host);
    return p;
}

/* The kernels one capture must launch (kvrt-sim names, as at the launch
 * sites in kernels/). */
static const char *const captured_kernels[] = {
    "attention_prefill_kernel", "attention_kernel<", "attention_decode_kernel",
    "attention_mla_kernel",     "attention_combine_kernel", "write_kernel",
    "gather_kernel",            "set_pos_kernel",  "rotate_kernel", "move_kernel",
};
enum { N_CAPTURED = sizeof captured_kernels / sizeof captured_kernels[0] };

static void capture_kernels(void)
{
    enum { PRE = 24, LONG = 900, HEADS = 4, MLA_HEADS = 16, DK = 64, LAT = 512, ROPE = 64 };
    static const kvrt_layer_desc ls[2] = {
        {KVRT_LAYER_ATTN, 2, DK, DK, 0, 0, 0},
        {KVRT_LAYER_MLA, 0, 0, 0, 0, LAT, ROPE},
    };
    const int k_rows[2] = {2 * DK, LAT + ROPE}, q_rows[2] = {HEADS * DK, MLA_HEADS * (LAT + ROPE)},
              o_rows[2] = {HEADS * DK, MLA_HEADS * LAT};
    kvrt_cache_desc desc;
    kvrt_cache_desc_init(&desc);
    desc.device.backend = device_backend;
    desc.dtype = KVRT_F16;
    desc.n_layers = 2;
    desc.layers = ls;
    desc.max_seqs = 4;
    desc.block_size = 16;
    desc.n_blocks = 160;
    desc.rope.n_rot = DK;
    kvrt_cache *cache = NULL;
    kvrt_batch *batch = NULL;
    cudaStream_t stream = NULL;
    CHECK(kvrt_cache_create(&desc, &cache) == KVRT_OK, "capture-kernels: create: %s", kvrt_last_error());
    if (cache == NULL)
        return;
    RT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CHECK(kvrt_cache_set_stream(cache, (void *)stream) == KVRT_OK && kvrt_batch_create(cache, LONG, &batch) == KVRT_OK,
          "capture-kernels: stream or batch: %s", kvrt_last_error());
    void *k[2], *v = device_values((size_t)LONG * 2 * DK, 2 * DK, 0, 0, 1), *q[2], *out[2], *rows;
    for (int l = 0; l < 2; l++) {
        k[l] = device_values((size_t)LONG * k_rows[l], k_rows[l], 0, l, 0);
        q[l] = device_values((size_t)PRE * q_rows[l], q_rows[l], 1, l, 2);
        out[l] = device_values((size_t)PRE * o_rows[l], o_rows[l], 0, l, 3);
    }
    rows = device_values((size_t)LONG * (LAT + ROPE), LAT + ROPE, 1, 0, 4);
    /* before the capture: sequence 0 holds LONG tokens (a decode over it splits) */
    int32_t seqs[LONG], pos[LONG];
    for (int t = 0; t < LONG; t++)
        seqs[t] = 0, pos[t] = t;
    kvrt_status st = kvrt_batch_plan(cache, LONG, seqs, pos, batch);
    for (int l = 0; l < 2 && st == KVRT_OK; l++)
        st = kvrt_write(cache, batch, l, k[l], l == 0 ? v : NULL, KVRT_F32, (void *)stream);
    /* and a decode over it, run directly: a capture cannot grow the split
     * workspace, so the one inside needs it allocated here */
    for (int l = 0; l < 2 && st == KVRT_OK; l++) {
        int32_t seq = 0, at = LONG;
        if (l == 0)
            st = kvrt_batch_plan(cache, 1, &seq, &at, batch);
        for (int w = 0; w < 2 && st == KVRT_OK && l == 0; w++)
            st = kvrt_write(cache, batch, w, k[w], w == 0 ? v : NULL, KVRT_F32, (void *)stream);
        kvrt_attention_params p = {l == 0 ? HEADS : MLA_HEADS, 0.0f, 0.0f, KVRT_F16, KVRT_F32};
        if (st == KVRT_OK)
            st = kvrt_attention(cache, batch, l, q[l], out[l], &p, (void *)stream);
    }
    if (st == KVRT_OK)
        st = kvrt_cache_sync(cache);
    CHECK(st == KVRT_OK, "capture-kernels: the first sequence: %s", kvrt_last_error());

    long before[N_CAPTURED];
    for (int i = 0; i < N_CAPTURED; i++)
        before[i] = kvrt_sim_launches_of(captured_kernels[i]);
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
    CHECK(err == cudaSuccess, "cudaStreamBeginCapture: %s", cudaGetErrorString(err));
    /* a prefill-shaped step of sequence 1: PRE tokens, f16 queries */
    for (int t = 0; t < PRE; t++)
        seqs[t] = 1, pos[t] = t;
    if (st == KVRT_OK)
        st = kvrt_batch_plan(cache, PRE, seqs, pos, batch);
    for (int l = 0; l < 2 && st == KVRT_OK; l++)
        st = kvrt_write(cache, batch, l, k[l], l == 0 ? v : NULL, KVRT_F32, (void *)stream);
    for (int l = 0; l < 2 && st == KVRT_OK; l++) {
        kvrt_attention_params p = {l == 0 ? HEADS : MLA_HEADS, 0.0f, 0.0f, KVRT_F16, KVRT_F32};
        st = kvrt_attention(cache, batch, l, q[l], out[l], &p, (void *)stream);
    }
    /* decode: a token of sequence 1 (short), then one of sequence 0 (LONG
     * keys: split, merged by the combine kernel) */
    for (int s = 1; s >= 0 && st == KVRT_OK; s--) {
        int32_t seq = s, at = s == 1 ? PRE : LONG + 1;
        st = kvrt_batch_plan(cache, 1, &seq, &at, batch);
        for (int l = 0; l < 2 && st == KVRT_OK; l++)
            st = kvrt_write(cache, batch, l, k[l], l == 0 ? v : NULL, KVRT_F32, (void *)stream);
        for (int l = 0; l < 2 && st == KVRT_OK; l++) {
            kvrt_attention_params p = {l == 0 ? HEADS : MLA_HEADS, 0.0f, 0.0f, KVRT_F16, KVRT_F32};
            st = kvrt_attention(cache, batch, l, q[l], out[l], &p, (void *)stream);
        }
    }
    int64_t n_rows = 0; /* a gather into device memory, stream-ordered */
    if (st == KVRT_OK)
        st = kvrt_gather(cache, 1, 1, 0, -1, rows, NULL, NULL, LONG, &n_rows, (void *)stream);
    if (st == KVRT_OK)
        st = kvrt_seq_cp(cache, 1, 2, 0, -1);
    if (st == KVRT_OK)
        st = kvrt_seq_shift(cache, 2, 10, -1, 5);
    if (st == KVRT_OK)
        st = kvrt_seq_rm(cache, 1, 3, 9);
    if (st == KVRT_OK)
        st = kvrt_cache_compact(cache);
    CHECK(st == KVRT_OK, "capture-kernels: under capture: %s", kvrt_last_error());
    if (err == cudaSuccess) {
        err = cudaStreamEndCapture(stream, &graph);
        CHECK(err == cudaSuccess, "capture-kernels: cudaStreamEndCapture (a call synchronized?): %s",
              cudaGetErrorString(err));
    }
    for (int i = 0; i < N_CAPTURED; i++)
        CHECK(kvrt_sim_launches_of(captured_kernels[i]) > before[i],
              "capture-kernels: %s was not launched inside the capture", captured_kernels[i]);
    if (err == cudaSuccess && st == KVRT_OK) {
#if defined(KVRT_GPU_IS_HIP)
        err = hipGraphInstantiate(&exec, graph, NULL, NULL, 0);
#else
        err = cudaGraphInstantiate(&exec, graph, 0ULL);
#endif
        if (err == cudaSuccess)
            err = cudaGraphLaunch(exec, stream);
        if (err == cudaSuccess)
            err = cudaStreamSynchronize(stream);
        CHECK(err == cudaSuccess, "capture-kernels: replay: %s", cudaGetErrorString(err));
        CHECK(kvrt_cache_check(cache) == KVRT_OK, "capture-kernels: check: %s", kvrt_last_error());
    }
    if (exec != NULL)
        (void)cudaGraphExecDestroy(exec);
    if (graph != NULL)
        (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    for (int l = 0; l < 2; l++) {
        (void)cudaFree(k[l]);
        (void)cudaFree(q[l]);
        (void)cudaFree(out[l]);
    }
    (void)cudaFree(v);
    (void)cudaFree(rows);
    kvrt_batch_destroy(batch);
    kvrt_cache_destroy(cache);
    (void)cudaStreamDestroy(stream);
}
#endif

int main(int argc, char **argv)
{
    int selfcheck = argc > 1 && strcmp(argv[1], "cpu") == 0;
    int sync_check = argc > 1 && strcmp(argv[1], "sync-in-capture") == 0;
    if (selfcheck)
        device_backend = KVRT_BACKEND_CPU;
    if (kvrt_device_count(device_backend) == 0) {
        printf("test_gpu_graph: no %s device, skipped\n", kvrt_backend_name(device_backend));
        return GPU_TEST_SKIP;
    }
#if defined(KVRT_GPU_SIM)
    if (argc > 1 && strcmp(argv[1], "capture-kernels") == 0) {
        capture_kernels();
        return gpu_test_result("test_gpu_graph capture-kernels");
    }
#endif
    if (sync_check) {
        for (sync_inside = SYNC_CACHE; sync_inside < SYNC_N; sync_inside++) {
            snapshot s;
            run(2, &s);
            snapshot_free(&s);
        }
        return gpu_test_result("test_gpu_graph sync-in-capture");
    }
    snapshot cpu, direct, captured;
    run(0, &cpu);
    run(1, &direct);
    CHECK(cpu.n[0][0] > 0 && cpu.n[0][1] > 0 && cpu.n[0][2] > 0, "the scenario left empty sequences");
    compare(&cpu, &direct, "direct");
    if (!selfcheck) {
        run(2, &captured);
        compare(&cpu, &captured, "captured");
        snapshot_free(&captured);
    }
    snapshot_free(&cpu);
    snapshot_free(&direct);
    return gpu_test_result("test_gpu_graph");
}
