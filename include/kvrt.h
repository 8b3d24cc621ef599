/*
 * kvrt.h: the whole public API of kvrt, a KV-cache runtime for transformer
 * inference.
 *
 * A decoder describes its attention layers once (kvrt_cache_create). Each
 * step it plans slots for the new tokens (kvrt_batch_plan), writes their K/V
 * (kvrt_write) and runs masked attention over the cache (kvrt_attention).
 * Between steps it edits sequences (kvrt_seq_rm, kvrt_seq_cp, kvrt_seq_shift,
 * ...). All K/V lives on the cache's device; every edit runs there, in stream
 * order, and no K/V passes through the host unless the caller asks for it
 * (kvrt_gather).
 *
 * Conventions
 *   - Every function that can fail returns kvrt_status: KVRT_OK (0) or a
 *     negative error. The calling thread's last error message, starting with
 *     the function that failed and naming what was wrong, is kvrt_last_error().
 *   - A call that fails changes nothing: the cache is exactly as it was.
 *     The one exception is KVRT_ERR_CACHE_LOST (see "Device failures").
 *   - The library never aborts, exits or prints.
 *   - Positions are int32 in [0, 2^31 - 2]. In a range [p0, p1), p1 < 0 means
 *     "to the end" and p0 < 0 is read as 0; p0 > p1 >= 0 is
 *     KVRT_ERR_INVALID_ARG; an empty range changes nothing.
 *   - A sequence never holds two tokens at one position: a plan or an edit
 *     that would create one fails with KVRT_ERR_POS_EXISTS.
 *   - A plan (kvrt_batch) is valid until the next plan, edit or
 *     kvrt_cross_set of the cache; kvrt_write and kvrt_attention refuse a
 *     stale batch with KVRT_ERR_INVALID_ARG.
 *   - `stream` is a cudaStream_t / hipStream_t (NULL: the default stream); the
 *     CPU backend ignores it and completes work before returning.
 *   - Plans and sequence edits run on the cache's stream (kvrt_cache_set_stream).
 */
#ifndef KVRT_H
#define KVRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define KVRT_API __declspec(dllexport)
#elif defined(__GNUC__)
#  define KVRT_API __attribute__((visibility("default")))
#else
#  define KVRT_API
#endif

#define KVRT_VERSION_MAJOR 0
#define KVRT_VERSION_MINOR 1
#define KVRT_VERSION_PATCH 0
#define KVRT_VERSION_NUMBER \
    (KVRT_VERSION_MAJOR * 10000 + KVRT_VERSION_MINOR * 100 + KVRT_VERSION_PATCH)

/* The version the library was built as (KVRT_VERSION_NUMBER of its header). */
KVRT_API unsigned kvrt_version_number(void);
/* The same as "MAJOR.MINOR.PATCH". Static storage. */
KVRT_API const char *kvrt_version_string(void);

/* ------------------------------------------------------------------------ */
/* Status codes. Values are frozen once released; new ones are appended.    */
/* ------------------------------------------------------------------------ */

#define KVRT_STATUS_MAP(X)                                                          \
    X(OK,                  0, "success")                                           \
    X(ERR_INVALID_ARG,    -1, "invalid argument")                                  \
    X(ERR_OUT_OF_MEMORY,  -2, "out of memory")                                     \
    X(ERR_CAPACITY,       -3, "cache capacity exhausted")                          \
    X(ERR_POS_EXISTS,     -4, "position already present in the sequence")          \
    X(ERR_POS_RANGE,      -5, "position out of range")                             \
    X(ERR_WINDOW_EVICTED, -6, "sliding window no longer holds the rows needed")    \
    X(ERR_DEVICE,         -7, "device runtime error")                              \
    X(ERR_DEVICE_MISMATCH,-8, "pointer or cache on another device")                \
    X(ERR_NO_DEVICE,      -9, "no such device or backend")                         \
    X(ERR_INCOMPATIBLE,  -10, "incompatible layer description")                    \
    X(ERR_CORRUPT,       -11, "corrupt or truncated state")                        \
    X(ERR_IO,            -12, "input/output error")                                \
    X(ERR_UNSUPPORTED,   -13, "not supported by this backend or build")            \
    X(ERR_INTERNAL,      -14, "internal invariant violated")                       \
    X(ERR_CACHE_LOST,    -15, "a failed device call left the cache half-changed: clear it") \
    X(ERR_BUSY,          -16, "the cache is inside a call of another thread")

typedef enum kvrt_status {
#define KVRT_STATUS_ENUM_(name, value, text) KVRT_##name = value,
    KVRT_STATUS_MAP(KVRT_STATUS_ENUM_)
#undef KVRT_STATUS_ENUM_
} kvrt_status;

/* Threads (docs/api.md, "Threads"). A cache, together with every handle
 * kvrt_cache_create_shared made on it, is used by one thread at a time:
 * calls on one cache from two threads at once must be serialized by the
 * caller (as a llama.cpp context is). A call that returns a status and
 * arrives while another thread is inside a call on the same cache (or a
 * handle sharing it), or that a state writer or reader makes on the cache
 * whose call invoked it, is refused: KVRT_ERR_BUSY, naming the call, with
 * nothing changed. Destroying a cache while another thread is inside a call
 * on it is undefined. Calls on different caches may run at the same time on
 * different threads; kvrt_last_error is per thread. Host memory failures (an
 * allocation of a call failing) return KVRT_ERR_OUT_OF_MEMORY naming the
 * call, with the cache exactly as it was: an edit that cannot record what it
 * will change is refused before it changes anything.
 *
 * Device failures (docs/api.md). A device call that fails (an allocation,
 * a copy, a kernel launch) makes the kvrt call return
 * KVRT_ERR_OUT_OF_MEMORY (an allocation) or KVRT_ERR_DEVICE, with a message
 * naming the runtime call ("kvrt_gather: cuda: cudaMemcpyAsync: invalid
 * argument (cudaErrorInvalidValue)"), and the cache exactly as it was:
 *   - kvrt_write, kvrt_attention, kvrt_gather, kvrt_state_write,
 *     kvrt_state_read / kvrt_state_load_file and kvrt_seq_restore (which
 *     load into free blocks and roll back);
 *   - kvrt_cross_set while a cross block is free (the rows go into it
 *     before the old block is released);
 *   - kvrt_batch_plan, kvrt_seq_rm, kvrt_seq_cp, kvrt_seq_keep,
 *     kvrt_cache_compact and kvrt_seq_offload, and kvrt_seq_shift /
 *     kvrt_seq_div until their RoPE re-rotation has been launched, when
 *     prefix caching is off and (plans) no block leaves a sliding window:
 *     a journal of what they change on the host (page tables, positions,
 *     refcounts, free lists) puts it back; their device work so far wrote
 *     rows only into blocks that return to the pool or into holes, and the
 *     device copy of positions, uploaded again by the next plan or edit.
 *     Earlier plans are stale afterwards (a failed plan's batch is
 *     unplanned);
 *   - every call while it validates, grows the pool or allocates before it
 *     commits (a pool grown for the call keeps its new free blocks).
 * Otherwise (kvrt_cache_clear, whose zeroing is under way; a shift or div
 * whose re-rotation ran; prefix caching; a plan that dropped window blocks)
 * the cache is half-changed and cannot be
 * restored: the call returns KVRT_ERR_CACHE_LOST, the message naming the
 * runtime call and ending "the cache must be cleared (kvrt_cache_clear)",
 * and from then on every call on the cache (and its shared handles) returns
 * KVRT_ERR_CACHE_LOST except kvrt_cache_clear, kvrt_cache_sync,
 * kvrt_cache_set_stream, kvrt_cache_destroy and the calls that return no
 * status. A kvrt_cache_clear that succeeds empties the cache, rebuilding
 * every host table, and makes it usable again; one that fails leaves it
 * lost. */

/* "KVRT_ERR_CAPACITY" for KVRT_ERR_CAPACITY; "KVRT_UNKNOWN" for other values. */
KVRT_API const char *kvrt_status_name(kvrt_status status);
/* A one-line description of the status ("cache capacity exhausted"). */
KVRT_API const char *kvrt_status_str(kvrt_status status);
/* The calling thread's last error message, naming the function that failed
 * and what was wrong ("kvrt_cache_create: layer 3: head_dim_k 0 must be a
 * multiple of 8 in [8, 1024]"). "" if none. Valid until the thread's next
 * failing kvrt call. */
KVRT_API const char *kvrt_last_error(void);

/* ------------------------------------------------------------------------ */
/* Devices, dtypes                                                           */
/* ------------------------------------------------------------------------ */

typedef enum kvrt_backend {
    KVRT_BACKEND_CPU  = 0,
    KVRT_BACKEND_CUDA = 1,
    KVRT_BACKEND_HIP  = 2,
} kvrt_backend;

typedef struct kvrt_device {
    kvrt_backend backend;
    int          ordinal;   /* device index within the backend; 0 for the CPU */
} kvrt_device;

/* Number of devices of a backend this build can use: 1 for the CPU, 0 when
 * the backend is not built in or has no device or no driver. Never fails. */
KVRT_API int kvrt_device_count(kvrt_backend backend);
/* "cpu", "cuda", "hip". */
KVRT_API const char *kvrt_backend_name(kvrt_backend backend);
/* Writes a description of the device ("cuda:0 NVIDIA H100 80GB HBM3, 79 GiB")
 * into buf (always NUL-terminated). KVRT_ERR_NO_DEVICE if there is none. */
KVRT_API kvrt_status kvrt_device_describe(kvrt_device device, char *buf, size_t size);

/* The CPU kernels have a portable copy and, on x86, an AVX2 (with FMA and
 * F16C) one; attention also has an AVX-512 (F, BW, VL) one (the re-rotation
 * of f16 keys and the streaming copies stop at AVX2). Each runs the widest
 * the processor has. The
 * environment variable KVRT_CPU_ISA = portable | avx2 | avx512, read once
 * (at the first call that needs it), caps that level: asking for more than
 * the processor has gives what it has; any other value is ignored. Results
 * differ between levels only by rounding (different summation orders and
 * FMA contraction), within each kernel's documented bound. */
typedef enum kvrt_cpu_isa {
    KVRT_CPU_ISA_PORTABLE = 0,
    KVRT_CPU_ISA_AVX2     = 1,
    KVRT_CPU_ISA_AVX512   = 2,
} kvrt_cpu_isa;

typedef struct kvrt_cpu_isa_info {
    kvrt_cpu_isa machine;    /* the widest level this processor runs */
    kvrt_cpu_isa used;       /* the level the CPU kernels run: machine, capped */
    int          requested;  /* KVRT_CPU_ISA's level; -1 unset, -2 not a level (ignored) */
    char         env[32];    /* KVRT_CPU_ISA as read (truncated), "" when unset */
} kvrt_cpu_isa_info;

/* Fills *info (reading KVRT_CPU_ISA on the first call). Never fails. */
KVRT_API void kvrt_cpu_isa_get(kvrt_cpu_isa_info *info);
/* "portable", "avx2", "avx512"; "unknown" for other values. */
KVRT_API const char *kvrt_cpu_isa_name(kvrt_cpu_isa isa);

typedef enum kvrt_dtype {
    KVRT_F32  = 0,
    KVRT_F16  = 1,
    KVRT_BF16 = 2,
    /* Cache dtypes only (not for write sources, queries or outputs): one byte
     * per element and one f32 scale per (token, head) row of K and of V,
     * kept in a region of their own (docs/layouts.md, "Quantized dtypes").
     * Q8: int8, scale = amax / 127, values rounded to nearest even.
     * FP8_E4M3: OCP e4m3fn, saturating, scale = amax / 448.
     * NaN and +-Inf written into a quantized cache read back as NaN (the
     * rest of their row keeps its values); ATTN and CROSS layers only (an
     * MLA layer in a quantized cache is KVRT_ERR_UNSUPPORTED). */
    KVRT_Q8       = 3,
    KVRT_FP8_E4M3 = 4,
} kvrt_dtype;

/* Bytes per element (4, 2, 2, 1, 1; scales not counted); 0 for an unknown dtype. */
KVRT_API size_t kvrt_dtype_size(kvrt_dtype dtype);
/* "f32", "f16", "bf16", "q8", "fp8_e4m3"; "?" for an unknown dtype. */
KVRT_API const char *kvrt_dtype_name(kvrt_dtype dtype);
/* 1 for KVRT_Q8 and KVRT_FP8_E4M3 (a scale per row), else 0. */
KVRT_API int kvrt_dtype_is_quantized(kvrt_dtype dtype);

/* ------------------------------------------------------------------------ */
/* Cache description                                                         */
/* ------------------------------------------------------------------------ */

typedef enum kvrt_layer_kind {
    /* Self-attention: n_kv_heads heads of head_dim_k (K) and head_dim_v (V);
     * window 0 = full attention, > 0 = sliding window of that many positions.
     * MHA, GQA and MQA differ only in the query head count given to
     * kvrt_attention. */
    KVRT_LAYER_ATTN  = 0,
    /* Multi-head latent attention: one row of latent_dim + rope_dim per token
     * and no separate V (V is the first latent_dim values of the row). */
    KVRT_LAYER_MLA   = 1,
    /* Cross-attention: static K/V per sequence (encoder output) set with
     * kvrt_cross_set, up to kvrt_cache_desc.cross_max_len rows; no positions,
     * no RoPE, no causal mask. */
    KVRT_LAYER_CROSS = 2,
} kvrt_layer_kind;

/* One layer. Fields that do not apply to a kind must be 0. */
typedef struct kvrt_layer_desc {
    kvrt_layer_kind kind;
    int n_kv_heads;   /* ATTN, CROSS: >= 1 */
    int head_dim_k;   /* ATTN, CROSS: 1..1024, a multiple of 8 */
    int head_dim_v;   /* ATTN, CROSS: 1..1024, a multiple of 8 */
    int window;       /* ATTN: 0 or > 0 (sliding window) */
    int latent_dim;   /* MLA: kv_lora_rank, e.g. 512; a multiple of 8 */
    int rope_dim;     /* MLA: rotary part, e.g. 64; even, may be 0 */
    /* ATTN, MLA: this layer's RoPE base (Gemma 3's local layers use another
     * theta than its global ones); 0: the cache's rope.theta. Finite, >= 0. */
    float rope_theta;
} kvrt_layer_desc;

typedef enum kvrt_rope_style {
    KVRT_ROPE_NORMAL = 0,  /* rotate adjacent pairs (x[2i], x[2i+1]), as llama.cpp */
    KVRT_ROPE_NEOX   = 1,  /* rotate halves (x[i], x[i + n_rot/2]), as Hugging Face */
} kvrt_rope_style;

/* Where RoPE is applied to keys. */
typedef enum kvrt_rope_mode {
    /* The decoder writes rotated K; kvrt_seq_shift / kvrt_seq_div re-rotate
     * it in place (re-rounded to the cache dtype each time). */
    KVRT_ROPE_STORED_ROTATED = 0,
    /* The decoder writes K unrotated; kvrt_attention rotates each key by its
     * slot's position as it reads it (and each query by its token's
     * position when rope.rotate_q is 1). kvrt_seq_shift / kvrt_seq_div then
     * change positions only: no K is rewritten, any number of shifts is
     * exact. kvrt cannot tell rotated K from unrotated: a decoder that
     * writes rotated K into such a cache gets keys rotated twice. Every
     * backend has it (GPU caches: f32, f16, bf16; their attention runs on
     * the generic kernel in this mode). */
    KVRT_ROPE_IN_ATTENTION   = 1,
} kvrt_rope_mode;

/* How K is rotated: stored rotated (kvrt_seq_shift re-rotates it) or, in
 * KVRT_ROPE_IN_ATTENTION mode, rotated by kvrt_attention as it is read.
 * Angle of pair i at position p: p * freq_scale * theta^(-2i / n_rot), with
 * theta the layer's rope_theta where it has one.
 * ATTN layers rotate the first n_rot dims of each K head (n_rot 0: none);
 * MLA layers rotate their rope_dim part (the last rope_dim values of a row), with
 * rope_dim in place of n_rot in the angle. n_rot is the ATTN layers': a
 * cache without ATTN layers takes n_rot 0 or its MLA layers' rope_dim
 * (CROSS layers only: 0). */
typedef struct kvrt_rope_desc {
    int             n_rot;       /* even, <= every ATTN layer's head_dim_k */
    float           theta;       /* base, e.g. 10000 or 500000; finite, > 0 */
    float           freq_scale;  /* 1 = no scaling (linear scaling: 1/factor); finite, > 0 */
    kvrt_rope_style style;
    kvrt_rope_mode  mode;        /* KVRT_ROPE_STORED_ROTATED (default) or IN_ATTENTION */
    /* KVRT_ROPE_IN_ATTENTION only: 1 = queries come unrotated too and
     * kvrt_attention rotates them by their positions; 0 = queries come
     * rotated. Must be 0 in the other mode. */
    int             rotate_q;
} kvrt_rope_desc;

typedef struct kvrt_cache_desc {
    kvrt_device            device;
    /* Element type of every layer. One dtype serves all layers: a per-layer
     * dtype (say bf16 first and last layers) is not offered (docs/layouts.md,
     * "Quantized dtypes"). */
    kvrt_dtype             dtype;
    int                    n_layers;
    const kvrt_layer_desc *layers;       /* [n_layers], copied at creation */
    int                    max_seqs;     /* sequence ids are [0, max_seqs) */
    int                    block_size;   /* slots per block: power of two, 1..256 */
    /* Blocks per layer group allocated at creation, and the most the pool may
     * grow to (0: n_blocks, no growth). Growth keeps every address: memory is
     * reserved for max_blocks and committed as needed. */
    int                    n_blocks;
    int                    max_blocks;
    int                    cross_max_len; /* rows per sequence in CROSS layers */
    kvrt_rope_desc         rope;
    int                    swa_full;     /* 1: keep every sliding-window row */
    int                    validate;     /* 1 (default): check device pointers */
    /* Automatic prefix caching (a kvrt_prefix_hash; 0: off). See "Prefix
     * caching" below. Ignored by kvrt_cache_create_shared (the pool is base's). */
    int                    prefix_cache;
    /* CPU backend: the most threads one call runs on (0, the default:
     * OpenMP's, omp_get_max_threads(); 1: the calling thread only, so no
     * OpenMP worker ever waits on a core). Ignored on GPUs. Calls too small
     * to pay for waking a thread run on the calling thread whatever this
     * says. After a call that ran on several threads, OpenMP's workers wait
     * for the next one as its wait policy says, and libgomp's default is to
     * spin for a while: a decoder that runs other threads between kvrt calls
     * (a BLAS) sets OMP_WAIT_POLICY=passive in its environment before it
     * starts, or gives kvrt fewer threads here (docs/api.md, "Threads").
     * Capped to the processors the process may run on.
     * kvrt_cache_create_shared uses base's count, but still refuses a
     * value outside [0, 4096] as kvrt_cache_create does. */
    int                    n_threads;
} kvrt_cache_desc;

/* Fills desc with defaults: CPU device, f16, block_size 16, max_seqs 1,
 * n_blocks 0 (must be set), rope {0, 10000, 1, NORMAL}, validate 1,
 * n_threads 0. */
KVRT_API void kvrt_cache_desc_init(kvrt_cache_desc *desc);

/* Bytes of one token's row of a layer in the cache and in state files:
 * ATTN/CROSS n_kv_heads * (head_dim_k + head_dim_v) * size(dtype),
 * MLA (latent_dim + rope_dim) * size(dtype), plus the scales of quantized
 * dtypes (kvrt_layer_scale_bytes). 0 for an invalid description (an MLA
 * layer in a quantized dtype included). The one function every reader and
 * writer of rows uses. */
KVRT_API size_t kvrt_layer_row_bytes(const kvrt_layer_desc *layer, kvrt_dtype dtype);
/* The scale bytes in kvrt_layer_row_bytes: ATTN/CROSS in Q8 or FP8_E4M3
 * 2 * n_kv_heads * 4 (an f32 per head of K and of V); 0 otherwise. */
KVRT_API size_t kvrt_layer_scale_bytes(const kvrt_layer_desc *layer, kvrt_dtype dtype);

/* ------------------------------------------------------------------------ */
/* Cache                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct kvrt_cache kvrt_cache;

/* Creates a cache: validates desc (every bad field is KVRT_ERR_INVALID_ARG
 * with a message naming it), forms layer groups (self-attention layers of
 * the same kind and window share a page table; each CROSS layer is a group of
 * its own), and allocates n_blocks blocks per
 * group on the device. KVRT_ERR_NO_DEVICE if the device does not exist,
 * KVRT_ERR_OUT_OF_MEMORY / KVRT_ERR_DEVICE if allocation fails.
 * On success *out owns the cache; on failure *out is NULL. */
KVRT_API kvrt_status kvrt_cache_create(const kvrt_cache_desc *desc, kvrt_cache **out);

/* Destroys a handle. The memory is freed, after the work queued on the
 * cache's stream, when the last handle on it (kvrt_cache_create_shared) is
 * destroyed. NULL is fine. */
KVRT_API void kvrt_cache_destroy(kvrt_cache *cache);

/* Creates a second handle on base's cache, for a speculative draft (MTP,
 * EAGLE) that reads the target's cache and has layers of its own. The new
 * handle shares base's block pool, sequences and positions: plans and edits
 * through either handle are seen by both. Layer i of desc is base's layer
 * base_layers[i] when base_layers[i] >= 0 (it must have the same shape), or,
 * when it is -1, a layer of the new handle's own (base_layers NULL: all own),
 * which joins the base group of its kind and window so that every edit moves
 * its rows too. Other negative values are KVRT_ERR_INVALID_ARG.
 * desc's dtype, block_size, max_seqs, swa_full and rope must equal base's;
 * its n_blocks and max_blocks are ignored (the pool is base's).
 * Errors, nothing created: KVRT_ERR_DEVICE_MISMATCH when desc->device is not
 * base's device (the message names the layer and both devices),
 * KVRT_ERR_INCOMPATIBLE naming the first differing field or a layer that
 * matches no group of base (own CROSS layers included).
 * Handles are reference-counted: destroying base while this handle lives
 * keeps the memory until the last handle is destroyed. An own layer's memory
 * is freed when the last handle using it (its creator, or a handle naming
 * it through base_layers) is destroyed, so a draft recreated per request
 * does not grow the cache. State, offload, query and edit entries work
 * through either handle and act on the shared cache; state files and
 * offloads taken through either handle hold base's layers only, and a
 * sequence loaded or restored through either handle has zeros in the own
 * layers' rows. */
KVRT_API kvrt_status kvrt_cache_create_shared(kvrt_cache *base, const kvrt_cache_desc *desc,
                                              const int *base_layers, kvrt_cache **out);

/* Sets the stream that plans and sequence edits are queued on (NULL: the
 * default stream). */
KVRT_API kvrt_status kvrt_cache_set_stream(kvrt_cache *cache, void *stream);

/* Waits for all work queued on the cache's stream. */
KVRT_API kvrt_status kvrt_cache_sync(kvrt_cache *cache);

/* The description the cache was created with (layers point into the cache). */
KVRT_API const kvrt_cache_desc *kvrt_cache_get_desc(const kvrt_cache *cache);

/* Number of layer groups, and the group of a layer (-1 if out of range). */
KVRT_API int kvrt_cache_n_groups(const kvrt_cache *cache);
KVRT_API int kvrt_layer_group(const kvrt_cache *cache, int layer);

typedef struct kvrt_cache_stats {
    int64_t blocks_total;   /* blocks in the pool(s) now (grows up to max_blocks) */
    int64_t blocks_free;
    int64_t blocks_used;    /* referenced by at least one sequence */
    int64_t blocks_shared;  /* referenced by two or more sequences */
    int64_t slots_live;     /* slots holding a token, counted once per block */
    int64_t holes;          /* used slots without a token (pos -1) inside sequences */
    int64_t bytes_device;   /* device memory committed for K/V and positions */
    int64_t blocks_cached;  /* prefix caching: unreferenced blocks kept for reuse
                               (free + used + cached == total) */
} kvrt_cache_stats;

/* Statistics of one group (group >= 0) or summed over all (group = -1). */
KVRT_API kvrt_status kvrt_cache_stats_get(const kvrt_cache *cache, int group,
                                          kvrt_cache_stats *out);

/* Checks every internal invariant (refcounts equal page-table references,
 * free + used (+ cached) == total, free blocks hold no position, cached
 * blocks have refcount 0 and a key found by its table, recorded position
 * ranges equal the live slots', no duplicate positions, the device copy of
 * positions equals the host's). KVRT_ERR_INTERNAL with a message on the first
 * violation. For tests and debugging; costs O(cache size) on the host. */
KVRT_API kvrt_status kvrt_cache_check(const kvrt_cache *cache);

/* ------------------------------------------------------------------------ */
/* The step                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct kvrt_batch kvrt_batch;

/* Creates a batch for up to max_tokens tokens per plan, with its host and
 * device metadata buffers. The batch belongs to the cache and must not
 * outlive it. */
KVRT_API kvrt_status kvrt_batch_create(kvrt_cache *cache, int max_tokens, kvrt_batch **out);
/* NULL is fine. */
KVRT_API void kvrt_batch_destroy(kvrt_batch *batch);
/* Tokens in the batch's current plan (0 before the first plan). */
KVRT_API int kvrt_batch_n_tokens(const kvrt_batch *batch);

/* Plans a step: token i of n belongs to sequence seq_ids[i] at position
 * positions[i] (host arrays). Reserves a slot for each token in every
 * self-attention group: appends blocks as needed, copies a shared target
 * block first (copy-on-write), and in sliding-window groups frees the blocks
 * whose rows have all left the window of the sequence's oldest new token.
 * Uploads the step's metadata (slots, page tables, positions) to the device
 * asynchronously on the cache's stream.
 * Errors, with nothing changed: KVRT_ERR_INVALID_ARG (n out of [1,max_tokens],
 * seq id out of range, negative position), KVRT_ERR_POS_RANGE (position
 * 2^31 - 1), KVRT_ERR_POS_EXISTS (a position
 * already in the sequence or twice in the batch), KVRT_ERR_WINDOW_EVICTED (a
 * sliding-window group no longer holds rows the token must see),
 * KVRT_ERR_CAPACITY (not enough blocks even after growth and, with prefix
 * caching, the eviction of every cached block). */
KVRT_API kvrt_status kvrt_batch_plan(kvrt_cache *cache, int n, const int32_t *seq_ids,
                                     const int32_t *positions, kvrt_batch *batch);

/* Writes the batch's new K/V rows of one layer into their slots, converting
 * from src_dtype to the cache dtype (round to nearest even).
 *   ATTN: k [n_tokens][n_kv_heads][head_dim_k], v [n_tokens][n_kv_heads][head_dim_v]
 *   MLA:  k [n_tokens][latent_dim + rope_dim] (K already rotated), v NULL
 *         (a non-NULL v is KVRT_ERR_INVALID_ARG: an MLA row has no V of its own)
 * Row-major, contiguous, on the cache's device. CROSS layers are set with
 * kvrt_cross_set instead (KVRT_ERR_INVALID_ARG here).
 * Queued on `stream`, which must be ordered after the cache's stream. */
KVRT_API kvrt_status kvrt_write(kvrt_cache *cache, const kvrt_batch *batch, int layer,
                                const void *k, const void *v, kvrt_dtype src_dtype,
                                void *stream);

/* ------------------------------------------------------------------------ */
/* Attention                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct kvrt_attention_params {
    int        n_q_heads;  /* a multiple of the layer's n_kv_heads (MLA: any >= 1) */
    float      scale;      /* multiplies q.k; 0 means 1/sqrt(dk), dk = head_dim_k
                              (MLA: latent_dim + rope_dim) */
    float      softcap;    /* > 0: logits become softcap * tanh(s / softcap) */
    kvrt_dtype q_dtype;    /* dtype of q: f32, f16 or bf16 */
    kvrt_dtype out_dtype;  /* f32 or the cache dtype (a quantized cache: f32, f16 or bf16) */
} kvrt_attention_params;

/* For every token of the batch, attention over the live slots of its
 * sequence in the layer's group: a key is visible when its position is
 * <= the token's position (causal) and > position - window (sliding window);
 * holes are skipped. CROSS layers see all of the sequence's static rows.
 *   ATTN, CROSS: q [n_tokens][n_q_heads][head_dim_k], out [n_tokens][n_q_heads][head_dim_v]
 *   MLA:         q [n_tokens][n_q_heads][latent_dim + rope_dim],
 *                out [n_tokens][n_q_heads][latent_dim]
 * A token with no visible key gets zeros. The batch's rows must have been
 * written (kvrt_write) for self-attention layers: kvrt does not track which
 * planned rows were written, and a row planned but never written is read as
 * its slot holds it (zeros in memory no row has used, else an earlier
 * token's row), with status KVRT_OK.
 * Precision: sums in f32. On CUDA and HIP, prefill-shaped calls (more than 8
 * tokens per sequence) on an f16 or bf16 ATTN/CROSS layer with q of the
 * cache dtype and head_dim_k == head_dim_v in {64, 96, 128} run on tensor
 * cores, which round the softmax weights to the cache dtype before they
 * multiply V: an output moves by at most 2^-11 (f16) or 2^-8 (bf16) times
 * the largest |V| it sees. */
KVRT_API kvrt_status kvrt_attention(kvrt_cache *cache, const kvrt_batch *batch, int layer,
                                    const void *q, void *out,
                                    const kvrt_attention_params *params, void *stream);

/* ------------------------------------------------------------------------ */
/* Cross-attention K/V                                                       */
/* ------------------------------------------------------------------------ */

/* Stores a sequence's static K/V of one CROSS layer: k [n][n_kv_heads][head_dim_k],
 * v [n][n_kv_heads][head_dim_v] on the cache's device, converted from src_dtype.
 * Replaces what the sequence had in that layer (a copy shared through
 * kvrt_seq_cp is left to the other sequences); n = 0 empties it.
 * KVRT_ERR_INVALID_ARG if n > cross_max_len. Makes earlier plans stale. */
KVRT_API kvrt_status kvrt_cross_set(kvrt_cache *cache, int layer, int32_t seq, int n,
                                    const void *k, const void *v, kvrt_dtype src_dtype,
                                    void *stream);

/* ------------------------------------------------------------------------ */
/* Sequence edits                                                            */
/* ------------------------------------------------------------------------ */

/* Removes the tokens of sequence seq (seq < 0: every sequence) with positions
 * in [p0, p1) from every group. The range [0, end) (p0 <= 0, p1 < 0) also
 * drops the sequence's cross-attention K/V. Blocks left empty return to the
 * pool (with prefix caching, keyed ones stay cached). KVRT_ERR_CAPACITY if a
 * block shared with another sequence must be copied first and none is free.
 * With seq < 0 (here and in kvrt_seq_shift and kvrt_seq_div) every sharer of
 * a shared block is edited alike, so the block is edited in place, stays
 * shared and needs no copy. */
KVRT_API kvrt_status kvrt_seq_rm(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1);

/* Copies the tokens of src in [p0, p1) into dst, which must hold nothing
 * (KVRT_ERR_INVALID_ARG otherwise). Blocks whose used slots all lie in the
 * range are shared (reference-counted, copied on the first write that touches
 * them); boundary blocks are copied. Cross-attention K/V is shared (also for
 * an empty range). src == dst changes nothing and succeeds. A destination
 * holding cross K/V is not empty. */
KVRT_API kvrt_status kvrt_seq_cp(kvrt_cache *cache, int32_t src, int32_t dst,
                                 int32_t p0, int32_t p1);

/* Removes every sequence except seq. */
KVRT_API kvrt_status kvrt_seq_keep(kvrt_cache *cache, int32_t seq);

/* Adds delta to the positions in [p0, p1) of seq (seq < 0: every sequence)
 * and re-rotates the rotary part of their cached K by delta (all layers of a
 * group in one launch; each layer by its RoPE base; a quantized head row is
 * dequantized, turned and quantized again; in KVRT_ROPE_IN_ATTENTION mode
 * no K changes, only positions). Tokens whose new position is negative are removed.
 * KVRT_ERR_POS_EXISTS if a moved token would land on a position the sequence
 * keeps; KVRT_ERR_POS_RANGE if a new position would overflow int32. */
KVRT_API kvrt_status kvrt_seq_shift(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1,
                                    int32_t delta);

/* Divides the positions in [p0, p1) of seq (seq < 0: every sequence) by
 * d (>= 1, rounding down) and re-rotates K accordingly (as kvrt_seq_shift). Two tokens that would land on one position:
 * KVRT_ERR_POS_EXISTS, nothing changed. */
KVRT_API kvrt_status kvrt_seq_div(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1,
                                  int d);

/* Empties the cache: every sequence, every block, every cross row, every
 * prefix-caching key and cached block; memory is zeroed on the device. */
KVRT_API kvrt_status kvrt_cache_clear(kvrt_cache *cache);

/* Closes holes: in each sequence, live slots past the first holes move into
 * them (one launch per group for all its layers) and emptied blocks return to
 * the pool. Holes inside blocks shared with other sequences stay. */
KVRT_API kvrt_status kvrt_cache_compact(kvrt_cache *cache);

/* ------------------------------------------------------------------------ */
/* Queries                                                                   */
/* ------------------------------------------------------------------------ */

/* Smallest / largest position of seq over all self-attention groups; -1 when
 * the sequence is empty. Derived from live slots. */
KVRT_API kvrt_status kvrt_seq_pos_min(const kvrt_cache *cache, int32_t seq, int32_t *out);
KVRT_API kvrt_status kvrt_seq_pos_max(const kvrt_cache *cache, int32_t seq, int32_t *out);
/* Tokens of seq (counted in the first full-attention group, or the first group). */
KVRT_API kvrt_status kvrt_seq_n_tokens(const kvrt_cache *cache, int32_t seq, int64_t *out);

typedef struct kvrt_seq_group_info {
    int32_t pos_min, pos_max;   /* of live slots; -1 if none */
    int64_t n_tokens;           /* live slots */
    int64_t n_slots;            /* used slots (live + holes) */
    int     n_blocks;           /* blocks in the sequence's page table */
    int32_t evicted_max;        /* largest position a sliding window dropped; -1 none */
} kvrt_seq_group_info;

/* What one group holds of a sequence. */
KVRT_API kvrt_status kvrt_seq_group_info_get(const kvrt_cache *cache, int32_t seq, int group,
                                             kvrt_seq_group_info *out);

/* Sets *ok to 1 when a token of seq planned at position pos would see every
 * row it should (no sliding-window group has dropped a row inside its window),
 * else 0. A decoder resumes a prefix only when this holds.
 * KVRT_ERR_POS_RANGE for a negative pos. */
KVRT_API kvrt_status kvrt_seq_can_resume(const kvrt_cache *cache, int32_t seq, int32_t pos,
                                         int *ok);

/* Copies seq's rows of one layer with positions in [p0, p1), in position
 * order, in the cache dtype (q8 / fp8: the codes, one byte each; see
 * kvrt_gather_scales and kvrt_gather_as):
 *   ATTN, CROSS: k [n][n_kv_heads][head_dim_k], v [n][n_kv_heads][head_dim_v]
 *   MLA:         k [n][latent_dim + rope_dim], v unused
 * and their positions into pos (host memory; CROSS rows are numbered 0..n-1).
 * k, v and pos may each be NULL; k and v may be host or device memory.
 * capacity is the rows the buffers hold; *n_out receives the number of rows
 * in the range (KVRT_ERR_INVALID_ARG, with *n_out set, if it exceeds capacity).
 * Synchronizes `stream` when a destination is host memory. */
KVRT_API kvrt_status kvrt_gather(const kvrt_cache *cache, int layer, int32_t seq,
                                 int32_t p0, int32_t p1, void *k, void *v, int32_t *pos,
                                 int64_t capacity, int64_t *n_out, void *stream);

/* kvrt_gather of a quantized cache's scales: k_scale [n][n_kv_heads] and
 * v_scale [n][n_kv_heads] f32 (bit-exact, as stored), host or device memory,
 * each may be NULL. With kvrt_gather's bytes they are the whole stored row.
 * KVRT_ERR_INVALID_ARG for a cache that is not quantized. */
KVRT_API kvrt_status kvrt_gather_scales(const kvrt_cache *cache, int layer, int32_t seq,
                                        int32_t p0, int32_t p1, float *k_scale, float *v_scale,
                                        int64_t capacity, int64_t *n_out, void *stream);

/* kvrt_gather converting to dst_dtype (f32, f16 or bf16): quantized rows are
 * dequantized (element * its row's scale, in f32, then rounded to
 * dst_dtype; NaN markers as NaN); other dtypes are converted. Shapes and
 * arguments as kvrt_gather. */
KVRT_API kvrt_status kvrt_gather_as(const kvrt_cache *cache, int layer, int32_t seq,
                                    int32_t p0, int32_t p1, void *k, void *v, int32_t *pos,
                                    kvrt_dtype dst_dtype, int64_t capacity, int64_t *n_out,
                                    void *stream);


/* ------------------------------------------------------------------------ */
/* State files (docs/state-format.md)                                        */
/* ------------------------------------------------------------------------ */

/* Called by kvrt_state_write with the next `size` bytes of the state; returns
 * KVRT_OK or an error that aborts the write (returned to the caller). */
typedef kvrt_status (*kvrt_state_writer)(void *user, const void *data, size_t size);
/* Called by kvrt_state_read for the next `size` bytes; stores how many it
 * delivered in *got (at most size). Fewer than size is fine (kvrt asks
 * again for the rest); 0 means the input has ended. */
typedef kvrt_status (*kvrt_state_reader)(void *user, void *data, size_t size, size_t *got);

/* Writes the state of sequence seq (seq < 0: every sequence) through `writer`:
 * the header (format version, the layer description, dtype, RoPE), then per
 * sequence its tokens' positions and, per layer, its rows in position order,
 * each section with a checksum. Reads the cache through its stream (a device
 * cache is synchronized). KVRT_ERR_UNSUPPORTED if this build has no checksum
 * library. */
KVRT_API kvrt_status kvrt_state_write(kvrt_cache *cache, int32_t seq, kvrt_state_writer writer,
                                      void *user);

/* Bytes kvrt_state_write would produce for seq (seq < 0: every sequence). */
KVRT_API kvrt_status kvrt_state_size(const kvrt_cache *cache, int32_t seq, uint64_t *bytes);

/* Loads a state through `reader`. dst_seq >= 0: the file must hold one
 * sequence, loaded into dst_seq, which must be empty; dst_seq < 0: every
 * sequence of the file into the same ids, each of which must be empty.
 * The file loads into any cache with the same layer description, dtype and
 * RoPE (mode and per-layer bases included), on any backend and block size;
 * quantized rows load with their scales, bit-exactly. Errors, with the cache untouched:
 * KVRT_ERR_INCOMPATIBLE naming the first differing field ("layer 5:
 * latent_dim 512 in file, 448 in cache"), KVRT_ERR_CORRUPT (truncated, bad
 * checksum, absurd counts), KVRT_ERR_CAPACITY, KVRT_ERR_INVALID_ARG.
 * Reading stops after the state's END section: what follows it in the input
 * is left unread, so a state may be embedded in a longer stream.
 * kvrt_state_load_file and kvrt_seq_restore, which see the whole input,
 * refuse bytes after END with KVRT_ERR_CORRUPT. */
KVRT_API kvrt_status kvrt_state_read(kvrt_cache *cache, int32_t dst_seq, kvrt_state_reader reader,
                                     void *user);

/* kvrt_state_write / kvrt_state_read to and from a file (KVRT_ERR_IO with the
 * system's message when it cannot be opened, written or read).
 * kvrt_state_save_file writes a temporary file in path's directory, syncs it
 * and renames it over path only when the whole state is written: a failed
 * save leaves the file system as it was. A path that exists and is not a
 * regular file (a symbolic link, a device, a directory) is refused with
 * KVRT_ERR_IO; an existing file's permissions are kept. */
KVRT_API kvrt_status kvrt_state_save_file(kvrt_cache *cache, int32_t seq, const char *path);
KVRT_API kvrt_status kvrt_state_load_file(kvrt_cache *cache, int32_t dst_seq, const char *path);

/* ------------------------------------------------------------------------ */
/* Host offload                                                              */
/* ------------------------------------------------------------------------ */

typedef struct kvrt_offload kvrt_offload;

/* Moves sequence seq's rows (every layer, cross K/V included) to host memory
 * (pinned on GPU backends) and empties the sequence, returning its blocks to
 * the pool. *out owns the host copy. KVRT_ERR_OUT_OF_MEMORY with nothing
 * changed if the host copy cannot be allocated. */
KVRT_API kvrt_status kvrt_seq_offload(kvrt_cache *cache, int32_t seq, kvrt_offload **out);

/* Brings an offloaded sequence back, bit-exactly, into dst_seq (empty) of
 * the same cache (or a cache with the same description), into free blocks
 * anywhere. KVRT_ERR_CAPACITY with nothing changed (and the offload kept) if
 * the blocks are not there. */
KVRT_API kvrt_status kvrt_seq_restore(kvrt_cache *cache, int32_t dst_seq, const kvrt_offload *off);

/* Bytes of host memory an offload holds. */
KVRT_API uint64_t kvrt_offload_bytes(const kvrt_offload *off);
/* NULL is fine. */
KVRT_API void kvrt_offload_free(kvrt_offload *off);

/* ------------------------------------------------------------------------ */
/* Prefix caching (docs/api.md, "Prefix caching")                            */
/* ------------------------------------------------------------------------ */

/* Hash of block keys (kvrt_cache_desc.prefix_cache). A key is
 * H(previous block's key || this block's token ids), chained from a root
 * H(salt, block_size); one key serves every layer group, each group has its
 * own table of keyed blocks. KVRT_ERR_UNSUPPORTED at creation when the build
 * lacks the hash's library. */
typedef enum kvrt_prefix_hash {
    KVRT_PREFIX_OFF    = 0,
    KVRT_PREFIX_BLAKE2B = 1,  /* BLAKE2b-256 (libsodium): collisions infeasible */
    KVRT_PREFIX_XXH3   = 2,   /* XXH3-128 (xxHash): fast, not collision-resistant;
                                 for callers who trust every prompt */
} kvrt_prefix_hash;

/* Longest salt accepted, in bytes. */
#define KVRT_PREFIX_SALT_MAX 256

/* kvrt_batch_plan with the token id of every planned token (token_ids[i]
 * for token i; n_token_ids must equal n). A sequence whose tokens were
 * declared without a gap from position 0 (or from a kvrt_seq_attach_prefix)
 * and not edited since gets a key for each block it fills, in every
 * self-attention group. A block's key is published (found by later
 * lookups) once every layer of its group has been written (kvrt_write) for
 * this plan; a sequence whose plan is not written in every layer stops
 * keying. Errors: those of kvrt_batch_plan, and KVRT_ERR_INVALID_ARG, with
 * nothing changed, for a cache without prefix caching, token_ids NULL or
 * n_token_ids != n. */
KVRT_API kvrt_status kvrt_batch_plan_tokens(kvrt_cache *cache, int n, const int32_t *seq_ids,
                                            const int32_t *positions, const int32_t *token_ids,
                                            int n_token_ids, kvrt_batch *batch);

/* Looks up the prompt tokens[0..n) under salt (salt_len bytes, 0 to
 * KVRT_PREFIX_SALT_MAX; NULL when 0) and attaches to the empty sequence seq
 * the longest run of cached full blocks from position 0 that every
 * self-attention group can serve: full-attention groups need every block,
 * a sliding-window group the blocks of the last `window` positions (the
 * ones before are recorded as dropped, as kvrt_seq_can_resume reads them).
 * Each attached block's refcount grows by one; *n_covered receives the
 * tokens attached (a multiple of block_size, <= n), positions
 * 0..*n_covered - 1. The decoder then plans tokens[*n_covered..n) with
 * kvrt_batch_plan_tokens (pass n - 1 tokens to keep the last one for its
 * logits). Blocks cached under another salt never match. The sequence's
 * later blocks are keyed under this salt. Makes earlier plans stale.
 * Errors, nothing changed: KVRT_ERR_INVALID_ARG for a cache without prefix
 * caching, a sequence out of range or not empty, n < 0, tokens NULL with
 * n > 0, salt NULL with salt_len > 0, salt_len out of range, n_covered
 * NULL; KVRT_ERR_OUT_OF_MEMORY. */
KVRT_API kvrt_status kvrt_seq_attach_prefix(kvrt_cache *cache, int32_t seq, const int32_t *tokens,
                                            int n, const void *salt, int salt_len,
                                            int32_t *n_covered);

typedef struct kvrt_prefix_stats {
    int64_t lookups;         /* kvrt_seq_attach_prefix calls that succeeded */
    int64_t hits;            /* lookups that attached at least one block */
    int64_t misses;          /* lookups that attached nothing */
    int64_t tokens_queried;  /* sum of n over lookups */
    int64_t tokens_served;   /* sum of *n_covered over lookups */
    int64_t evictions;       /* cached blocks taken for new data, all groups */
    int64_t blocks_cached;   /* cached blocks now, all groups */
    int64_t blocks_keyed;    /* blocks with a key now (cached or in use), all groups */
} kvrt_prefix_stats;

/* Prefix-caching statistics since creation (counters survive
 * kvrt_cache_clear, which drops every key and cached block).
 * KVRT_ERR_INVALID_ARG for a cache without prefix caching. */
KVRT_API kvrt_status kvrt_prefix_stats_get(const kvrt_cache *cache, kvrt_prefix_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* KVRT_H */
