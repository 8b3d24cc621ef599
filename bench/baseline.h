/*
 * baseline.h: kvrt-bench's dense attention baseline on CUDA (baseline.cu,
 * built with cuBLAS when the build has CUDA, and against kvrt-sim's cuBLAS
 * shim for the simulated bench). The K/V of every layer and sequence,
 * gathered contiguous by the bench (kvrt_gather), is laid out per
 * (sequence, kv head); a step is then, per layer, one batched GEMM for
 * Q K^T (f16/bf16 in, f32 out and compute), a softmax kernel with the
 * causal mask by position writing P in the cache dtype, and one batched
 * GEMM for P V (f32 compute, output in the cache dtype): what a runtime
 * without paged attention kernels would do. HIP has no baseline (hipBLAS
 * is not packaged).
 *
 * Every function returns 0 or -1 with a message in bench_baseline_error().
 */
#ifndef KVRT_BENCH_BASELINE_H
#define KVRT_BENCH_BASELINE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bench_baseline_shape {
    int     bf16;      /* q, K, V and out are bf16 (else f16) */
    int     layers, batch, kv_heads, group; /* group: query heads per kv head */
    int     tokens;    /* new tokens per sequence (1: decode) */
    int     keys;      /* rows per sequence: the context and the new tokens */
    int     dk, dv;
    int     mla;       /* V is the first dv elements of each K row (kv_heads 1) */
    int32_t pos0;      /* position of each sequence's first new token; row j is at j */
} bench_baseline_shape;

typedef struct bench_baseline bench_baseline;

int bench_baseline_create(const bench_baseline_shape *shape, bench_baseline **out);
/* One (layer, sequence)'s rows in kvrt_gather's layout, device memory:
 * k [keys][kv_heads][dk], v [keys][kv_heads][dv] (NULL for MLA). Copied;
 * returns when done. */
int bench_baseline_load(bench_baseline *bl, int layer, int seq, const void *k, const void *v);
/* Queues, on the default stream, every layer's attention of
 * q [batch * tokens][kv_heads * group][dk] (sequence-major, then token)
 * into out [batch * tokens][kv_heads * group][dv], as kvrt_attention's
 * layout; out holds the last layer's. */
int bench_baseline_run(bench_baseline *bl, const void *q, void *out);
/* NULL is fine. */
void bench_baseline_destroy(bench_baseline *bl);
const char *bench_baseline_error(void);

#ifdef __cplusplus
}
#endif

#endif /* KVRT_BENCH_BASELINE_H */
