/*
 * attention_cpu.h: masked paged attention on the host, the CPU backend's
 * attention and the C twin the GPU attention kernels are checked against.
 */
#ifndef KVRT_ATTENTION_CPU_H
#define KVRT_ATTENTION_CPU_H

#include "kvrt.h"
#include "../kernels/kvrt_ops.h"

/* Computes op (see kvrt_attention_op in kernels/kvrt_ops.h) with f32
 * accumulation, in parallel over at most max_threads OpenMP threads, and
 * returns when op->out is written. Every element of op->out is written; a token with no
 * visible key gets zeros; a NaN in q or in a K row a token sees makes that
 * token's rows NaN (in a V row: the element it feeds). op->dim_v is the
 * output row length; V rows are read with layer.layout.dim_v (equal for
 * ATTN and CROSS). op->max_seq_slots is not needed (seq_n_slots is read).
 * The caller validates op (shapes, dtypes, pointers and page tables in
 * range). Returns KVRT_ERR_OUT_OF_MEMORY, without setting a message and
 * without writing op->out, when its host scratch (a few hundred KiB per
 * thread) cannot be allocated; otherwise KVRT_OK. */
kvrt_status kvrt_cpu_attention(const kvrt_attention_op *op, int max_threads);

#endif /* KVRT_ATTENTION_CPU_H */
