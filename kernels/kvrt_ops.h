/*
 * kvrt_ops.h: the arguments of every backend operation, as plain structs that
 * the host fills and the CPU backend or a GPU launcher consumes. Arrays
 * marked "device" are in memory the backend's kernels can read (host memory
 * on the CPU backend, uploaded by the backend's staging on GPUs).
 */
#ifndef KVRT_OPS_H
#define KVRT_OPS_H

#include "kvrt_layout.h"

/* Scatter new rows into their slots, converting dtype. Into a quantized
 * layer, src_dtype f32/f16/bf16 rows are quantized (kvrt_quant_row, one
 * scale per head row); src_dtype equal to the layer's quantized dtype copies
 * stored bytes and the scales k_scale_src / v_scale_src as they are (state
 * loads). */
typedef struct kvrt_write_op {
    kvrt_layer_ref layer;
    const void    *k_src;      /* [n_rows][n_heads][dim_k] */
    const void    *v_src;      /* [n_rows][n_heads][dim_v]; NULL: K only */
    int32_t        src_dtype;
    int32_t        n_rows;
    const int32_t *slots;      /* device [n_rows]: destination slot of each row */
    const float   *k_scale_src; /* device [n_rows][n_heads]: stored scales (raw copies only) */
    const float   *v_scale_src; /* device [n_rows][n_heads] */
} kvrt_write_op;

/* A run of slots copied from src..src+len-1 to dst..dst+len-1. Spans of one
 * op never overlap each other (destinations are distinct from all sources). */
typedef struct kvrt_span {
    int32_t src, dst, len;
} kvrt_span;

/* Copy slots in every layer of a group (copy-on-write, seq_cp boundary
 * blocks, compaction): one launch for all layers; the scales of quantized
 * layers move with their rows. */
typedef struct kvrt_move_op {
    const kvrt_layer_ref *layers;  /* device [n_layers] */
    int32_t               n_layers;
    const kvrt_span      *spans;   /* device [n_spans] */
    int32_t               n_spans;
    int32_t               max_len; /* longest span */
} kvrt_move_op;

/* Re-rotate the rotary part of K at the given slots by their position delta,
 * in every layer of a group. One launch for all layers. Each layer turns by
 * its layout's rope_theta (rope.theta is the cache's). A quantized head row
 * is dequantized whole, turned, and quantized again with a new scale. */
typedef struct kvrt_rotate_op {
    const kvrt_layer_ref *layers;  /* device [n_layers] */
    int32_t               n_layers;
    int32_t               max_rot_dims;
    kvrt_rope             rope;
    const int32_t        *slots;   /* device [n] */
    const int32_t        *deltas;  /* device [n]: new position - old position */
    int32_t               n;
} kvrt_rotate_op;

/* Copy the rows at the given slots of one layer, in order, to dst
 * ([n][n_heads][dim_k] and [n][n_heads][dim_v], cache dtype, or dst_dtype
 * when convert is 1: dequantized or converted), and a quantized layer's
 * scales to k_scale_dst / v_scale_dst ([n][n_heads] f32). */
typedef struct kvrt_gather_op {
    kvrt_layer_ref layer;
    const int32_t *slots;      /* device [n] */
    int32_t        n;
    void          *k_dst;      /* device; may be NULL */
    void          *v_dst;      /* device; may be NULL */
    int32_t        convert;    /* 1: k_dst / v_dst get dst_dtype (f32, f16, bf16) values */
    int32_t        dst_dtype;
    float         *k_scale_dst; /* device; may be NULL */
    float         *v_scale_dst; /* device; may be NULL */
} kvrt_gather_op;

/* Overwrite the positions of whole blocks: pos[block[i]] = data[i]. */
typedef struct kvrt_pos_op {
    int32_t       *pos;        /* group positions [n_blocks][block_size] */
    int32_t        block_size;
    const int32_t *blocks;     /* device [n] */
    const int32_t *data;       /* device [n][block_size] */
    int32_t        n;
} kvrt_pos_op;

/* Masked attention of a batch's tokens over their sequences' slots.
 * Token t belongs to batch sequence tok_seq[t]; that sequence's used slots
 * are page_indices[page_indptr[s] ..] (block ids) covering seq_n_slots[s]
 * slots. A key at slot j is visible when pos[j] >= 0, pos[j] <= tok_pos[t]
 * (if causal) and pos[j] > tok_pos[t] - window (if window > 0). Without
 * positions (pos NULL, cross-attention) every used slot is visible. */
typedef struct kvrt_attention_op {
    kvrt_layer_ref layer;
    const int32_t *pos;          /* device [n_blocks][block_size]; NULL: all visible */
    int32_t        causal;
    int32_t        window;       /* 0: none */
    int32_t        mla;          /* 1: V is the first dim_v values of the K row */
    int32_t        dim_v;        /* output values per head: layout.dim_v, or latent_dim for MLA */
    int32_t        n_tokens;
    int32_t        n_q_heads;
    float          scale;
    float          softcap;      /* 0: none */
    int32_t        q_dtype;
    int32_t        out_dtype;
    const void    *q;            /* [n_tokens][n_q_heads][dim_k] */
    void          *out;          /* [n_tokens][n_q_heads][dim_v] */
    const int32_t *tok_seq;      /* device [n_tokens] */
    const int32_t *tok_pos;      /* device [n_tokens] */
    const int32_t *page_indptr;  /* device [n_seqs + 1] */
    const int32_t *page_indices; /* device [page_indptr[n_seqs]] */
    const int32_t *seq_n_slots;  /* device [n_seqs] */
    int32_t        n_seqs;
    int32_t        max_seq_slots;/* longest seq_n_slots, for split planning */
    /* KVRT_ROPE_IN_ATTENTION: each key's rotary part (layout.rot_offset,
     * rot_dims, rope_theta) is turned by its slot's position as it is read,
     * and with rotate_q each query's by its token's position. */
    int32_t        rope_in_attention;
    int32_t        rotate_q;
    kvrt_rope      rope;         /* style and freq_scale (theta: layout.rope_theta) */
} kvrt_attention_op;

#endif /* KVRT_OPS_H */
