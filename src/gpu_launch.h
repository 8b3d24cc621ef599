/*
 * gpu_launch.h: the kernel launchers that the .cu files in kernels/ export to the host
 * glue (src/backend_gpu.c). Each takes an op (host memory; the arrays it
 * points to are device memory), computes its grid, queues the kernel on
 * `stream` and returns the runtime's status of the launch.
 *
 * Names carry the API (kvrt_cuda_launch_write, kvrt_hip_launch_write) so
 * that a library built with both links. Include gpu_compat.h first.
 */
#ifndef KVRT_GPU_LAUNCH_H
#define KVRT_GPU_LAUNCH_H

#include <stddef.h>

#include "kvrt_ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* kvrt_write_op: rows scattered into slots with dtype conversion (write.cu). */
cudaError_t KVRT_GPU_FN(launch_write)(const kvrt_write_op *op, void *stream);
/* kvrt_move_op: slot spans copied in every layer of a group (move.cu). */
cudaError_t KVRT_GPU_FN(launch_move)(const kvrt_move_op *op, void *stream);
/* kvrt_rotate_op: RoPE re-rotation of K in place, every layer (rotate.cu). */
cudaError_t KVRT_GPU_FN(launch_rotate)(const kvrt_rotate_op *op, void *stream);
/* kvrt_gather_op: rows at slots copied out contiguously (gather.cu). */
cudaError_t KVRT_GPU_FN(launch_gather)(const kvrt_gather_op *op, void *stream);
/* kvrt_pos_op: positions of whole blocks overwritten (set_pos.cu). */
cudaError_t KVRT_GPU_FN(launch_set_pos)(const kvrt_pos_op *op, void *stream);
/* kvrt_attention_op: paged masked attention (attention.cu). Returns
 * cudaErrorInvalidValue for shapes the kernel does not support (q and acc
 * rows beyond 40 KiB of shared memory); the glue checks those first and
 * reports them as KVRT_ERR_UNSUPPORTED. */
cudaError_t KVRT_GPU_FN(launch_attention)(const kvrt_attention_op *op, void *stream);
/* The same with a device workspace for splitting long sequences (flash-
 * decoding): attention_workspace gives the bytes the best plan for `op`
 * wants (0: none); launch_attention_ws splits as far as `workspace_bytes`
 * allows (NULL: no split, as launch_attention). The workspace must stay
 * untouched by other work until the launched kernels finish. */
size_t KVRT_GPU_FN(attention_workspace)(const kvrt_attention_op *op);
cudaError_t KVRT_GPU_FN(launch_attention_ws)(const kvrt_attention_op *op, void *stream,
                                             void *workspace, size_t workspace_bytes);

/* Merges the split partials of launch_attention_ws's layout
 * ([n_tokens][n_q_heads][n_splits][2 + dim_v] floats: m, l, acc) into
 * op->out (attention.cu; the decode kernel's splits use it too). */
cudaError_t KVRT_GPU_FN(launch_attention_combine)(const kvrt_attention_op *op, int n_splits,
                                                  const float *partial, void *stream);
/* Decode-shaped attention (attention_decode.cu): attention_decode_takes
 * says whether the decode kernel takes `op` (1 to 8 query tokens per
 * sequence, ATTN or CROSS, f32/f16/bf16 cache, head dims multiples of 8 up
 * to 256, 16-byte aligned regions); its workspace and launch work as
 * attention_workspace and launch_attention_ws do. */
int KVRT_GPU_FN(attention_decode_takes)(const kvrt_attention_op *op);
size_t KVRT_GPU_FN(attention_decode_workspace)(const kvrt_attention_op *op);
cudaError_t KVRT_GPU_FN(launch_attention_decode)(const kvrt_attention_op *op, void *stream,
                                                 void *workspace, size_t workspace_bytes);
/* kvrt_attention_op on tensor cores for prefill-shaped calls
 * (attention_prefill.cu): attention_prefill_supports says whether the
 * kernel takes `op` (f16 or bf16 cache and queries, not MLA, head_dim_k ==
 * head_dim_v in {64, 96, 128}); launch_attention_prefill returns
 * cudaErrorInvalidValue for an op it does not take. */
int KVRT_GPU_FN(attention_prefill_supports)(const kvrt_attention_op *op);
cudaError_t KVRT_GPU_FN(launch_attention_prefill)(const kvrt_attention_op *op, void *stream);

/* Decode-shaped MLA attention on tensor cores (attention_mla.cu):
 * attention_mla_takes says whether the kernel takes `op` (MLA, latent rows
 * of 576 values with V their first 512, f16 or bf16 cache and queries of
 * the same dtype, K as stored, 1 to 8 query tokens per sequence); its
 * workspace and launch work as attention_workspace and launch_attention_ws
 * do, and the launch returns cudaErrorInvalidValue for an op it does not
 * take. */
int KVRT_GPU_FN(attention_mla_takes)(const kvrt_attention_op *op);
size_t KVRT_GPU_FN(attention_mla_workspace)(const kvrt_attention_op *op);
cudaError_t KVRT_GPU_FN(launch_attention_mla)(const kvrt_attention_op *op, void *stream,
                                              void *workspace, size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* KVRT_GPU_LAUNCH_H */
