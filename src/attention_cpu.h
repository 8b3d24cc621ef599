/*
 * attention_cpu.h: masked paged attention on the host, the CPU backend's
 * attention and the C twin the GPU attention kernels are checked against.
 */
#ifndef KVRT_ATTENTION_CPU_H
#define KVRT_ATTENTION_CPU_H

#include "kvrt.h"
#include "../kernels/kvrt_ops.h"

/* Computes op (see kvrt_attention_op in kernels/kvrt_ops.h) with f32
 * accumulation, in parallel over the host's OpenMP threads, and returns when
 * op->out is written. Every element of op->out is written; a token with no
 * visible key gets zeros. The caller validates op (shapes, dtypes, pointers
 * and page tables in range). Returns KVRT_ERR_OUT_OF_MEMORY, without setting
 * a message and without writing op->out, when its host scratch (a few
 * hundred KiB per thread) cannot be allocated; otherwise KVRT_OK. */
kvrt_status kvrt_cpu_attention(const kvrt_attention_op *op);

#endif /* KVRT_ATTENTION_CPU_H */
