/*
 * ref.h: the reference model of a kvrt cache, for tests.
 *
 * Plain and obvious: no paging, no sharing, no slots. Per sequence a list of
 * tokens sorted by position, each holding its rows of every self-attention
 * layer as double (the values the cache dtype can hold: every written value
 * is rounded to the cache dtype first, exactly as kvrt stores it); per CROSS
 * layer and sequence a list of rows. Every operation of the public API is
 * implemented the obvious way, and attention runs in double precision.
 *
 * Statuses. Each operation first works out which statuses kvrt may return
 * for the call (a ref_status_set, one bit per status) and applies its effect
 * only when asked to (apply != 0) and success is among them. A test calls it
 * once with apply 0 to get the set, calls kvrt, checks that kvrt's status is
 * in the set, and on KVRT_OK calls it again with apply 1. The reference
 * knows nothing about blocks, so KVRT_ERR_CAPACITY and
 * KVRT_ERR_WINDOW_EVICTED are judged by the caller, from kvrt's own
 * statistics.
 *
 * Where the header leaves a case open, a policy flag picks the reading (see
 * ref_policy); by default the set contains every reading, so that either
 * answer passes as long as kvrt then behaves accordingly.
 */
#ifndef KVRT_REF_H
#define KVRT_REF_H

#include <stdint.h>

#include "kvrt.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A set of statuses: bit -status (KVRT_OK is bit 0). */
typedef uint32_t ref_status_set;
#define REF_BIT(status) (1u << (unsigned)(-(int)(status)))
#define REF_HAS(set, status) (((set) & REF_BIT(status)) != 0)

/* Readings of cases the header leaves open. Each is a ref_open_* value. */
typedef struct ref_policy {
    /* p0 < 0, or p0 > p1 >= 0, in rm/cp/shift/div ranges */
    int range_p0_negative;
    int range_reversed;
    /* kvrt_seq_div with seq < 0 (every sequence, as kvrt_seq_rm) */
    int div_all_seqs;
    /* kvrt_seq_cp with src == dst (a no-op, or INVALID_ARG like any
     * non-empty dst) */
    int cp_self;
    /* kvrt_cross_set with n == 0 (empties the layer) */
    int cross_set_empty;
    /* kvrt_seq_cp into a dst that has cross rows but no tokens */
    int cp_dst_cross_only;
    /* position INT32_MAX (planned or shifted to): valid or KVRT_ERR_POS_RANGE */
    int pos_int32_max;
    /* kvrt_seq_rm dropping cross rows: 0 when the range is [<=0, end), 1 when
     * the sequence has no tokens left afterwards (see ref_seq_rm). */
    int rm_drops_cross;
} ref_policy;

enum {
    REF_OPEN_EITHER = 0,  /* accept OK (with the natural effect) or the error
                           * (INVALID_ARG; POS_RANGE for pos_int32_max) */
    REF_OPEN_OK     = 1,
    REF_OPEN_ERROR  = 2,
};
enum {
    REF_RM_CROSS_FULL_RANGE = 0, /* rm of [p0 <= 0, p1 < 0) drops cross rows */
    REF_RM_CROSS_EMPTIED    = 1, /* rm that leaves no token drops cross rows */
};

typedef struct ref_model ref_model;

/* One token of a sequence, as ref_seq_tokens returns it. */
typedef struct ref_token {
    int32_t  pos;
    double  *data;      /* all self-attention layers' rows, at ref_layer_offset */
    int32_t *rotations; /* [n_layers]: re-rotations since the layer's row was written */
    uint8_t *written;   /* [n_layers]: 1 once kvrt_write stored the row */
    int32_t  token;     /* the token id declared for it (ref_plan_tokens, ref_attach_prefix); -1 none */
} ref_token;

/* Creates a model of an empty cache with desc's layers, dtype, max_seqs,
 * cross_max_len and rope (other fields are ignored). NULL on bad input. */
ref_model *ref_create(const kvrt_cache_desc *desc);
void ref_destroy(ref_model *m);
/* A deep copy. */
ref_model *ref_clone(const ref_model *m);
/* Readings of open cases (default: all REF_OPEN_EITHER, rm_drops_cross 0). */
void ref_set_policy(ref_model *m, const ref_policy *policy);
const ref_policy *ref_get_policy(const ref_model *m);

/* ---- layout of the reference rows ---- */

int ref_n_layers(const ref_model *m);
const kvrt_layer_desc *ref_layer(const ref_model *m, int layer);
/* Elements of one token's K (all heads) and V (all heads) in a layer.
 * MLA: K is latent+rope, V is 0 (V is read from K). */
int64_t ref_k_elems(const ref_model *m, int layer);
int64_t ref_v_elems(const ref_model *m, int layer);
/* Offset of a self layer's row (K then V) in ref_token.data. */
int64_t ref_layer_offset(const ref_model *m, int layer);
/* Whether element e (0 <= e < ref_k_elems) of a layer's K row is rotated by RoPE. */
int ref_k_elem_rotary(const ref_model *m, int layer, int64_t e);

/* ---- contents ---- */

int ref_n_seqs(const ref_model *m);
/* Tokens of seq, sorted by position; *n receives the count. */
const ref_token *ref_seq_tokens(const ref_model *m, int32_t seq, int64_t *n);
/* -1 when empty. */
int32_t ref_seq_pos_min(const ref_model *m, int32_t seq);
int32_t ref_seq_pos_max(const ref_model *m, int32_t seq);
/* The token of seq at pos, or NULL. */
const ref_token *ref_seq_find(const ref_model *m, int32_t seq, int32_t pos);
/* Cross rows of a CROSS layer: count, K [n][heads][dk] and V [n][heads][dv]. */
int ref_cross_rows(const ref_model *m, int layer, int32_t seq, const double **k,
                   const double **v);
/* Whether seq holds nothing: no token and no cross row. */
int ref_seq_is_empty(const ref_model *m, int32_t seq);

/* ---- operations (see the top comment for the two calls) ---- */

/* kvrt_batch_plan: INVALID_ARG (n out of [1, max_tokens], NULL arrays, bad
 * seq id, negative position), POS_EXISTS (position present or twice in the
 * batch), POS_RANGE for INT32_MAX (see ref_policy). When several apply, each
 * is a right answer. Applying adds the tokens, unwritten. */
ref_status_set ref_plan(ref_model *m, int n, const int32_t *seq_ids, const int32_t *positions,
                        int max_tokens, int apply);

/* kvrt_write of the n planned tokens (seq_ids/positions as planned) into one
 * layer: INVALID_ARG for a bad layer, a CROSS layer, NULL k, NULL v on ATTN.
 * Values are converted src_dtype -> f32 -> cache dtype. */
ref_status_set ref_write(ref_model *m, int layer, int n, const int32_t *seq_ids,
                         const int32_t *positions, const void *k, const void *v,
                         kvrt_dtype src_dtype, int apply);

/* kvrt_cross_set. */
ref_status_set ref_cross_set(ref_model *m, int layer, int32_t seq, int n, const void *k,
                             const void *v, kvrt_dtype src_dtype, int apply);

ref_status_set ref_seq_rm(ref_model *m, int32_t seq, int32_t p0, int32_t p1, int apply);
ref_status_set ref_seq_cp(ref_model *m, int32_t src, int32_t dst, int32_t p0, int32_t p1,
                          int apply);
ref_status_set ref_seq_keep(ref_model *m, int32_t seq, int apply);
ref_status_set ref_seq_shift(ref_model *m, int32_t seq, int32_t p0, int32_t p1, int32_t delta,
                             int apply);
ref_status_set ref_seq_div(ref_model *m, int32_t seq, int32_t p0, int32_t p1, int d, int apply);
void ref_clear(ref_model *m);
/* Copies sequence src of `from` (tokens and cross rows) into sequence dst of
 * m, which must be empty (a state load or an offload restored). The models
 * must have the same layers. */
void ref_seq_import(ref_model *m, int32_t dst, const ref_model *from, int32_t src);

/* ---- prefix caching ----
 * The model keeps the token id of every token planned with ids and, per
 * sequence, the salt of its last ref_attach_prefix (an edit of the sequence
 * that changes anything resets it to the empty salt, as kvrt ends the
 * sequence's chain). Every row written for a token whose sequence holds
 * declared tokens at every position from 0 up to it is recorded under
 * (salt, token ids of positions 0..pos, pos); ref_clear forgets the
 * records. A hit is served from the records. */

/* ref_plan with token ids (tokens[i] for token i). */
ref_status_set ref_plan_tokens(ref_model *m, int n, const int32_t *seq_ids,
                               const int32_t *positions, const int32_t *tokens, int max_tokens,
                               int apply);
/* The digest the records are kept under: of salt and tokens[0..n). */
uint64_t ref_prefix_digest(const void *salt, int salt_len, const int32_t *tokens, int64_t n);
/* When seq holds declared tokens at every position 0..pos: 1, and the digest
 * its rows are recorded under in *digest. Else 0. */
int ref_seq_token_digest(const ref_model *m, int32_t seq, int32_t pos, uint64_t *digest);
/* What kvrt_cache_clear does to prefix caching when the tokens come back
 * (a state load): every record and salt is forgotten. */
void ref_prefix_forget(ref_model *m);
/* The longest run of whole blocks from position 0 of tokens[0..n) whose rows
 * are recorded under salt in every self-attention layer, as far as each
 * layer needs them: all of them, or, in a sliding-window layer that drops
 * rows, those of the last `window` positions. In tokens. */
int32_t ref_prefix_longest(const ref_model *m, const int32_t *tokens, int n, const void *salt,
                           int salt_len, int block_size);
/* kvrt_seq_attach_prefix: INVALID_ARG for a bad or non-empty sequence, n < 0,
 * NULL tokens with n > 0, NULL salt with salt_len > 0, salt_len outside
 * [0, KVRT_PREFIX_SALT_MAX]. Applying records the salt and inserts tokens
 * 0..n_covered - 1 with their recorded rows (a layer without a record for a
 * position stays unwritten there). */
ref_status_set ref_attach_prefix(ref_model *m, int32_t seq, const int32_t *tokens, int n,
                                 const void *salt, int salt_len, int32_t n_covered, int apply);

/* ---- quantized rows (docs/layouts.md, "Quantized dtypes") ----
 * A q8 / fp8 cache holds, per (token, head) row of K and of V, a code per
 * element and an f32 scale; the reference keeps the values they stand for
 * (code * scale in f32; NaN for the NaN codes). */

/* Quantizes a row of n f32 values into code[0..n) and returns its scale. */
float ref_quantize_row(kvrt_dtype dtype, const float *x, int64_t n, uint8_t *code);
/* The value of a code of a row with scale `scale`. */
double ref_dequantize(kvrt_dtype dtype, uint8_t code, float scale);
/* The value of an e4m3fn code (NaN for 0x7f / 0xff). */
double ref_e4m3_value(uint8_t code);

/* An MLA slot row of an fp8 cache (docs/layouts.md, "fp8 MLA rows"): packs
 * the latent_dim + rope_dim f32 values of x into row (row_bytes of it: latent
 * codes, a scale per 128 latent values, the rope part in bf16, zero padding
 * to multiples of 16 bytes) and returns row_bytes. Each group of 128 is a
 * row of ref_quantize_row. */
int64_t ref_mla_fp8_row(const float *x, int32_t latent_dim, int32_t rope_dim, uint8_t *row);
/* Value i of such a row (ref_dequantize of its group, or its bf16). */
double ref_mla_fp8_value(const uint8_t *row, int32_t latent_dim, int64_t i);

/* ---- RoPE, in double ---- */

/* Rotates `dims` elements x[0..dims) as a position move of delta:
 * pair i (style NORMAL: (2i, 2i+1); NEOX: (i, i+dims/2)) turns by
 * delta * freq_scale * theta^(-2i/dims). */
void ref_rope_rotate(double *x, int dims, kvrt_rope_style style, double theta,
                     double freq_scale, int64_t delta);
/* The RoPE base of a layer (its rope_theta, or the cache's). */
double ref_layer_theta(const ref_model *m, int layer);
/* Turns the rotary part of n_heads head rows of a self layer (ATTN: the first
 * n_rot of each head_dim_k; MLA: the rope part of each latent + rope row) by
 * a position move of delta, in double, with the layer's base. 0 when the
 * layer has no rotary part. */
int ref_rotate_heads(const ref_model *m, int layer, double *x, int n_heads, int64_t delta);

/* ---- attention, in double ---- */

/* Attention of one query token of seq at position qpos over a layer's
 * reference rows (see kvrt_attention): q [n_q_heads][dk] as double, out
 * [n_q_heads][dv]. scale 0 means 1/sqrt(dk) where dk is head_dim_k for
 * ATTN/CROSS and latent_dim + rope_dim for MLA. Returns the number of keys
 * visible to the query (0: out is zeros), or -1 on bad arguments or when a
 * visible row is unwritten. */
int64_t ref_attention(const ref_model *m, int layer, int32_t seq, int32_t qpos,
                      const double *q, int n_q_heads, double scale, double softcap,
                      double *out);

/* Largest |value| over the V values (MLA: latent values) a query of seq at
 * qpos sees in a layer, for error bounds. */
double ref_attention_vmax(const ref_model *m, int layer, int32_t seq, int32_t qpos);

/* ---- dtype helpers ---- */

/* Value of element i of an array of `dtype`, as double. */
double ref_load(const void *base, kvrt_dtype dtype, int64_t i);
/* f rounded to dtype (round to nearest even), as double. */
double ref_round(double f, kvrt_dtype dtype);
/* Stores f (first rounded to f32) as element i of an array of `dtype`. */
void ref_store(void *base, kvrt_dtype dtype, int64_t i, double f);

#ifdef __cplusplus
}
#endif

#endif /* KVRT_REF_H */
