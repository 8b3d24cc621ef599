/*
 * llama.h: a Llama-family decoder whose KV cache is kvrt's. Shared by the
 * kvrt-llama tool and its test.
 *
 *   model.c      the llama2.c checkpoint (read and checked; a tiny random one
 *                written), its tokenizer.bin (read, checked, encode, decode)
 *   gguf.c       GGUF files of the llama architecture (f32, f16), read and
 *                checked into the same model and tokenizer
 *   decode.c     the forward pass (RMSNorm, RoPE, GQA attention through
 *                kvrt_batch_plan + kvrt_write + kvrt_attention, SwiGLU, the
 *                classifier; every matrix product through BLAS), sequences
 *                (prefill, decode as one batch, context shift, fork, truncate),
 *                sampling, and session files
 *   kvrt_llama.c the command line
 *
 * Functions that can fail return 0 or -1, with a message naming what was
 * wrong in llama_error().
 */
#ifndef KVRT_LLAMA_H
#define KVRT_LLAMA_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kvrt.h"

struct llama_tokenizer;

/* The message of the last failure on this thread. */
const char *llama_error(void);

/* The next value of a xorshift64* generator (state never 0): the tiny
 * model's weights and the samplers. */
uint64_t llama_random(uint64_t *state);

/* ------------------------------------------------------------------------ */
/* Checkpoint (llama2.c format)                                              */
/* ------------------------------------------------------------------------ */

/* The header: seven int32, then f32 weights. A negative vocab_size in the
 * file means the classifier is stored after the other weights (unshared);
 * otherwise it is the token embedding. */
typedef struct llama_config {
    int dim;         /* residual width; n_heads * head_size */
    int hidden_dim;  /* SwiGLU width */
    int n_layers;
    int n_heads;     /* query heads */
    int n_kv_heads;  /* key/value heads; divides n_heads */
    int vocab_size;  /* > 0 here; the file's sign is shared_classifier */
    int seq_len;     /* context the model was trained with */
    int shared_classifier;
} llama_config;

/* Views into the checkpoint's mapped file; [out][in] row-major matrices. */
typedef struct llama_weights {
    const float *token_embedding; /* [vocab_size][dim] */
    const float *rms_att;         /* [n_layers][dim] */
    const float *wq;              /* [n_layers][dim][dim] */
    const float *wk;              /* [n_layers][kv_dim][dim] */
    const float *wv;              /* [n_layers][kv_dim][dim] */
    const float *wo;              /* [n_layers][dim][dim] */
    const float *rms_ffn;         /* [n_layers][dim] */
    const float *w1;              /* [n_layers][hidden_dim][dim] (gate) */
    const float *w2;              /* [n_layers][dim][hidden_dim] (down) */
    const float *w3;              /* [n_layers][hidden_dim][dim] (up) */
    const float *rms_final;       /* [dim] */
    const float *wcls;            /* [vocab_size][dim] */
} llama_weights;

typedef struct llama_model {
    llama_config  config;
    llama_weights w;
    int           head_size;  /* dim / n_heads */
    int           kv_dim;     /* n_kv_heads * head_size */
    float         rope_theta; /* the file's RoPE base; 0: not said (llama2.c) */
    void         *map;
    size_t        map_bytes;
    float        *owned;      /* GGUF: the weights converted to f32, which w views */
} llama_model;

/* Maps and checks a checkpoint: every header field in range (the message
 * names the first that is not), and the file exactly as long as the header
 * says. Nothing is allocated from a header value before it is checked. A
 * file that starts with "GGUF" is read by llama_gguf_load. */
int llama_model_load(const char *path, llama_model *model);
void llama_model_free(llama_model *model);

/* ------------------------------------------------------------------------ */
/* GGUF (gguf.c)                                                             */
/* ------------------------------------------------------------------------ */

/* Reads a GGUF file (version 2 or 3) of the llama architecture with f32 or
 * f16 tensors: the config from its llama.* keys, the weights converted to
 * f32 in llama2.c's layout (so the decoder is the same), and, when tok is
 * not NULL, the tokenizer from tokenizer.ggml.tokens and .scores
 * (SentencePiece's U+2581 read as a space). Every count, length, offset and
 * dimension is checked against the file and the config before anything is
 * sized from it; a failure names the key or tensor, and changes nothing. */
int llama_gguf_load(const char *path, llama_model *model, struct llama_tokenizer *tok);

/* 1 when path starts with the GGUF magic. */
int llama_is_gguf(const char *path);

/* ------------------------------------------------------------------------ */
/* Shared by model.c and gguf.c                                              */
/* ------------------------------------------------------------------------ */

/* Sets llama_error() and returns -1. */
int llama_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The llama2.c header's field names, in its order. */
extern const char *const llama_header_names[7];
/* Checks a config's fields against each other and against what kvrt can
 * cache; a failure says "<what> <path>: <names[i]> ...". */
int llama_check_config(const char *what, const char *path, const char *const names[7],
                       const llama_config *c);
/* f32 weights in llama2.c's layout (freq_cis: with its unused RoPE tables). */
uint64_t llama_weight_floats(const llama_config *c, int freq_cis);
/* Points model->w into weights p laid out so; config, head_size, kv_dim set. */
void llama_layout_weights(llama_model *model, const float *p, int freq_cis);

/* ------------------------------------------------------------------------ */
/* Tokenizer (llama2.c tokenizer.bin)                                        */
/* ------------------------------------------------------------------------ */

typedef struct llama_token_index {
    const char *piece;
    int         id;
} llama_token_index;

/* int32 max_token_length, then per token: f32 score, int32 length, bytes. */
typedef struct llama_tokenizer {
    int                vocab_size;
    int                max_token_length;
    char             **pieces;   /* [vocab_size], NUL-terminated */
    float             *scores;   /* [vocab_size] */
    llama_token_index *sorted;   /* [vocab_size] by piece, for lookup */
    char              *text;     /* storage of every piece */
    char              *merge;    /* [2 * max_token_length + 1] encode scratch */
    char               byte_pieces[512]; /* byte b as the string at 2b */
} llama_tokenizer;

enum { LLAMA_BOS = 1, LLAMA_EOS = 2 };

/* Reads and checks a tokenizer for a model of vocab_size tokens. */
int llama_tokenizer_load(const char *path, int vocab_size, llama_tokenizer *tok);
/* Sorts the lookup index and fills byte_pieces, once pieces are set. */
void llama_tokenizer_index(llama_tokenizer *tok);
void llama_tokenizer_free(llama_tokenizer *tok);
/* Byte-pair encodes text (llama2.c / SentencePiece: a leading space, UTF-8
 * code points or byte fallback, then the best-scoring merges), with BOS
 * first when bos. tokens must hold strlen(text) + 2 ids. */
int llama_encode(const llama_tokenizer *tok, const char *text, int bos, int *tokens,
                 int *n_tokens);
/* The text of token after prev: byte tokens (<0x0A>) become their byte and
 * the space after BOS is dropped. Valid until the next call. */
const char *llama_piece(const llama_tokenizer *tok, int prev, int token);
/* 0 for an empty piece and for a lone byte that is neither printable nor
 * a newline or tab (what llama2.c leaves unprinted), else 1. */
int llama_piece_printable(const char *piece);
/* Prints a piece when it is printable. */
void llama_print_piece(FILE *out, const char *piece);

/* ------------------------------------------------------------------------ */
/* A tiny random model                                                       */
/* ------------------------------------------------------------------------ */

/* The model --make-tiny writes: 4 layers, dim 128, 4 query heads over 2 kv
 * heads, vocab 512, context 256. */
llama_config llama_tiny_config(void);
/* Writes dir/model.bin (random weights from seed) and dir/tokenizer.bin
 * (specials, the 256 byte tokens, printable ASCII, prefixes of common words,
 * then filler pieces up to config->vocab_size >= 354). dir must exist. The
 * config is checked as a checkpoint's header would be. */
int llama_write_tiny(const char *dir, const llama_config *config, uint64_t seed);

/* ------------------------------------------------------------------------ */
/* Decoder                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct llama_decoder_options {
    kvrt_device     device;
    kvrt_dtype      cache_dtype;
    int             n_ctx;      /* positions per sequence (0: the model's seq_len) */
    int             max_seqs;   /* sequences decoded together */
    int             max_batch;  /* tokens per forward call (prefill chunks) */
    kvrt_rope_style rope_style; /* llama2.c checkpoints: NORMAL */
    float           rope_theta;
    int             n_threads;  /* kvrt_cache_desc.n_threads (CPU backend; 0: OpenMP's) */
} llama_decoder_options;

void llama_decoder_options_init(llama_decoder_options *opts);

/* The forward pass's state: the cache and the activations of one call. */
typedef struct llama_decoder {
    const llama_model    *model;
    llama_decoder_options opts;
    kvrt_cache           *cache;
    kvrt_batch           *batch;
    double               *inv_freq;     /* [head_size / 2]: theta^(-2i/head_size) */
    /* host activations, [max_batch][...] */
    float  *x;         /* [dim] residual */
    float  *xb;        /* [dim] normed input of a sublayer */
    float  *q;         /* [dim] */
    float  *k, *v;     /* [kv_dim] */
    float  *att;       /* [dim] attention output */
    float  *hb, *hb2;  /* [hidden_dim] */
    float  *logits;    /* [max_batch][vocab_size]: rows of the tokens asked for */
    /* device copies of q, k, v and att (the host arrays on the CPU backend) */
    void   *dev_q, *dev_k, *dev_v, *dev_att;
} llama_decoder;

int llama_decoder_create(const llama_model *model, const llama_decoder_options *opts,
                         llama_decoder *dec);
void llama_decoder_destroy(llama_decoder *dec);

/* Runs the model on n <= max_batch tokens: token i of sequence seq_ids[i] at
 * position positions[i]. The logits of the tokens with want[i] != 0 (want
 * NULL: the last token) are the rows of dec->logits, in batch order.
 * *n_logits (may be NULL) receives how many. */
int llama_forward(llama_decoder *dec, int n, const int *tokens, const int32_t *seq_ids,
                  const int32_t *positions, const unsigned char *want, int *n_logits);

/* ------------------------------------------------------------------------ */
/* Sampling                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct llama_sampler {
    float    temperature;  /* 0: greedy (argmax) */
    float    top_p;        /* in (0, 1): nucleus sampling; else the full distribution */
    uint64_t rng;          /* xorshift state, never 0 */
} llama_sampler;

void llama_sampler_init(llama_sampler *s, float temperature, float top_p, uint64_t seed);
/* Samples from logits [vocab_size] (overwritten with probabilities).
 * scratch holds vocab_size (prob, index) pairs for top-p. */
int llama_sample(llama_sampler *s, float *logits, int vocab_size, void *scratch);

/* ------------------------------------------------------------------------ */
/* Sequences and sessions                                                    */
/* ------------------------------------------------------------------------ */

/* What the decoder knows of a sequence: the tokens in the cache, token i at
 * position i (every edit below keeps that), and the next token, sampled but
 * not yet run. */
typedef struct llama_seq {
    int          *tokens;   /* [n_ctx] */
    int           n;        /* tokens in the cache */
    int           pending;  /* next input; -1 none */
    llama_sampler sampler;
} llama_seq;

typedef struct llama_session {
    llama_decoder *dec;
    int            n_seqs;
    llama_seq     *seqs;     /* [opts.max_seqs]; sequence s is kvrt sequence s */
    float         *probs;    /* [vocab_size] sampling scratch */
    void          *scratch;  /* top-p pairs */
    double         prefill_s, decode_s;     /* seconds spent in each */
    int64_t        prefill_tokens, decode_tokens;
} llama_session;

/* A session of n_seqs <= max_seqs empty sequences, samplers from s. */
int llama_session_create(llama_decoder *dec, int n_seqs, const llama_sampler *s,
                         llama_session *sess);
void llama_session_destroy(llama_session *sess);

/* Runs tokens[0..n) after sequence seq's cached tokens (in chunks of
 * max_batch) and samples its pending token from the last one's logits.
 * Fails, changing nothing, when they do not fit the context. */
int llama_prefill(llama_session *sess, int seq, const int *tokens, int n);

/* One decode step for every sequence with a pending token, as one batch:
 * each pending token is run and the next one sampled. A sequence whose
 * context is full is shifted first (llama_context_shift with n_keep), and
 * shifted[seq] (may be NULL) receives the tokens it dropped, else 0. */
int llama_decode_step(llama_session *sess, int n_keep, int *shifted);

/* Makes room at the end of a full sequence: keeps its first n_keep tokens,
 * drops the oldest half of the rest (kvrt_seq_rm) and moves the remainder
 * down (kvrt_seq_shift, which re-rotates their cached K), then closes the
 * holes left behind (kvrt_cache_compact). Returns the tokens dropped (>= 1),
 * or -1. */
int llama_context_shift(llama_session *sess, int seq, int n_keep);

/* Forks seq src into dst (empty): kvrt_seq_cp shares the cached blocks;
 * the tokens, the pending token and the sampler are copied. When seed != 0
 * dst's sampler is seeded with it and, when logits is not NULL (the logits
 * src's pending token was drawn from, e.g. dec->logits right after
 * llama_prefill), dst's pending token is drawn again from them, so that
 * dst continues exactly as the same prompt run alone with that seed. */
int llama_fork(llama_session *sess, int src, int dst, uint64_t seed, const float *logits);

/* Drops the cached tokens of seq from n on (kvrt_seq_rm) and its pending token. */
int llama_truncate(llama_session *sess, int seq, int n);

/* A session file: the session's header (its model's shape, per sequence the
 * tokens, the pending token and the sampler), then kvrt's state of every
 * sequence (kvrt_state_write). Load needs a session with at least as many
 * sequences, the file's all empty; it checks the file against the model and the
 * cache (kvrt_state_read) and changes nothing on failure. */
int llama_session_save(llama_session *sess, const char *path);
int llama_session_load(llama_session *sess, const char *path);
/* The number of sequences a session file holds (*n_seqs), checked lightly. */
int llama_session_peek(const char *path, int *n_seqs);

#endif /* KVRT_LLAMA_H */
