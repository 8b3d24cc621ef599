/*
 * kvrt_llama.c: kvrt-llama, text generation with a llama2.c checkpoint or a
 * GGUF file of the llama architecture, whose KV cache is kvrt's. Every cache operation is printed (to stderr, in
 * brackets) as it happens; the generated text goes to stdout.
 *
 *   kvrt-llama --make-tiny DIR [-s SEED] [--shape D,H,L,NH,NKV,V,CTX]
 *                                              write DIR/model.bin + DIR/tokenizer.bin
 *                                              (random weights; --shape as the seven
 *                                              header ints, e.g. stories15M's
 *                                              288,768,6,6,6,32000,256)
 *   kvrt-llama MODEL.bin|MODEL.gguf [options]
 *
 *   -z PATH            tokenizer.bin (default: a GGUF file's own tokenizer, else
 *                      tokenizer.bin beside the model)
 *   -i TEXT            prompt (default "Once upon a time")
 *   -n N               tokens to generate per sequence (default 64); past the
 *                      context a context shift makes room, so any N works
 *   -t T               temperature (default 1; 0 = greedy)
 *   -p P               top-p (default 0.9; 1 = the full distribution)
 *   -s SEED            sampling seed (default 42); fork k uses SEED + k
 *   --ctx N            context per sequence (default: the model's seq_len)
 *   --keep K           tokens kept at a context shift (default 1, the BOS)
 *   --parallel N       fork the prompt into N sequences (kvrt_seq_cp) and
 *                      decode them as one batch
 *   --chat             read one user turn per line from stdin; each turn's
 *                      transcript is tokenized whole and only what differs
 *                      from the cache is run (kvrt_seq_rm of the divergent tail)
 *   --save PATH        write the session (tokens, samplers, kvrt state) at the end
 *   --load PATH        resume a saved session (then -i, if given, is appended)
 *   --backend B        cpu (default), cuda or hip
 *   --cache-dtype D    f32 (default), f16, bf16, q8 or fp8 (e4m3); q8 and fp8
 *                      on the CPU backend (a scale per token and kv head)
 *   --rope S           normal (default, llama2.c) or neox
 *   --rope-theta X     RoPE base (default: a GGUF file's llama.rope.freq_base,
 *                      else 10000)
 *   --batch N          tokens per forward call when prefilling (default 64)
 *   --kv-threads N     threads of kvrt's CPU backend (kvrt_cache_desc.n_threads;
 *                      default 0, OpenMP's)
 *
 * A prompt longer than the context is an error (it says both lengths);
 * generation past the context shifts.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "devmem.h"
#include "llama.h"

typedef struct options {
    const char *model, *tokenizer, *prompt, *save, *load, *make_tiny, *shape;
    int         n_gen, n_ctx, n_keep, parallel, chat, max_batch, kv_threads;
    float       temperature, top_p;
    uint64_t    seed;
    kvrt_device device;
    kvrt_dtype  cache_dtype;
    kvrt_rope_style rope_style;
    float       rope_theta;
} options;

static void usage(void)
{
    fprintf(stderr,
            "usage: kvrt-llama --make-tiny DIR [-s SEED] [--shape D,H,L,NH,NKV,V,CTX]\n"
            "       kvrt-llama MODEL.bin|MODEL.gguf [-z TOKENIZER] [-i PROMPT] [-n N] [-t TEMP]\n"
            "                  [-p TOP_P] [-s SEED] [--ctx N] [--keep K] [--parallel N] [--chat]\n"
            "                  [--save PATH] [--load PATH] [--backend cpu|cuda|hip]\n"
            "                  [--cache-dtype f32|f16|bf16|q8|fp8] [--rope normal|neox]\n"
            "                  [--rope-theta X] [--batch N] [--kv-threads N]\n");
    exit(2);
}

static int die(const char *what)
{
    fprintf(stderr, "kvrt-llama: %s%s\n", what ? what : "", llama_error());
    return 1;
}

static int parse(int argc, char **argv, options *o)
{
    *o = (options){.prompt = NULL, .n_gen = 64, .n_keep = 1, .parallel = 1, .max_batch = 64,
                   .temperature = 1.0f, .top_p = 0.9f, .seed = 42,
                   .device = {KVRT_BACKEND_CPU, 0}, .cache_dtype = KVRT_F32,
                   .rope_style = KVRT_ROPE_NORMAL, .rope_theta = 0.0f};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define VALUE() (v ? (i++, v) : (usage(), ""))
        if (!strcmp(a, "--make-tiny")) o->make_tiny = VALUE();
        else if (!strcmp(a, "--shape")) o->shape = VALUE();
        else if (!strcmp(a, "-z")) o->tokenizer = VALUE();
        else if (!strcmp(a, "-i")) o->prompt = VALUE();
        else if (!strcmp(a, "-n")) o->n_gen = atoi(VALUE());
        else if (!strcmp(a, "-t")) o->temperature = strtof(VALUE(), NULL);
        else if (!strcmp(a, "-p")) o->top_p = strtof(VALUE(), NULL);
        else if (!strcmp(a, "-s")) o->seed = strtoull(VALUE(), NULL, 10);
        else if (!strcmp(a, "--ctx")) o->n_ctx = atoi(VALUE());
        else if (!strcmp(a, "--keep")) o->n_keep = atoi(VALUE());
        else if (!strcmp(a, "--parallel")) o->parallel = atoi(VALUE());
        else if (!strcmp(a, "--chat")) o->chat = 1;
        else if (!strcmp(a, "--save")) o->save = VALUE();
        else if (!strcmp(a, "--load")) o->load = VALUE();
        else if (!strcmp(a, "--batch")) o->max_batch = atoi(VALUE());
        else if (!strcmp(a, "--kv-threads")) o->kv_threads = atoi(VALUE());
        else if (!strcmp(a, "--rope-theta")) o->rope_theta = strtof(VALUE(), NULL);
        else if (!strcmp(a, "--backend")) {
            const char *b = VALUE();
            if (!strcmp(b, "cpu")) o->device.backend = KVRT_BACKEND_CPU;
            else if (!strcmp(b, "cuda")) o->device.backend = KVRT_BACKEND_CUDA;
            else if (!strcmp(b, "hip")) o->device.backend = KVRT_BACKEND_HIP;
            else usage();
        } else if (!strcmp(a, "--cache-dtype")) {
            const char *d = VALUE();
            if (!strcmp(d, "f32")) o->cache_dtype = KVRT_F32;
            else if (!strcmp(d, "f16")) o->cache_dtype = KVRT_F16;
            else if (!strcmp(d, "bf16")) o->cache_dtype = KVRT_BF16;
            else if (!strcmp(d, "q8")) o->cache_dtype = KVRT_Q8;
            else if (!strcmp(d, "fp8")) o->cache_dtype = KVRT_FP8_E4M3;
            else usage();
        } else if (!strcmp(a, "--rope")) {
            const char *r = VALUE();
            if (!strcmp(r, "normal")) o->rope_style = KVRT_ROPE_NORMAL;
            else if (!strcmp(r, "neox")) o->rope_style = KVRT_ROPE_NEOX;
            else usage();
        } else if (a[0] != '-' && !o->model) o->model = a;
        else usage();
#undef VALUE
    }
    if (!o->make_tiny && !o->model)
        usage();
    if (o->n_gen < 0 || o->parallel < 1 || o->parallel > 1024 || o->max_batch < 1 ||
        (o->chat && o->parallel > 1)) {
        fprintf(stderr, "kvrt-llama: -n must be >= 0, --parallel in [1, 1024], --batch >= 1, "
                        "and --chat runs one sequence\n");
        exit(2);
    }
    return 0;
}

static int make_tiny(const options *o)
{
    if (mkdir(o->make_tiny, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "kvrt-llama: %s: %s\n", o->make_tiny, strerror(errno));
        return 1;
    }
    llama_config c = llama_tiny_config();
    if (o->shape) { /* the seven header ints; a negative vocab: separate classifier */
        int v[7];
        if (sscanf(o->shape, "%d,%d,%d,%d,%d,%d,%d", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                   &v[6]) != 7)
            usage();
        c = (llama_config){v[0], v[1], v[2], v[3], v[4], v[5] < 0 ? -v[5] : v[5], v[6],
                           v[5] > 0};
    }
    if (llama_write_tiny(o->make_tiny, &c, o->seed) != 0)
        return die(NULL);
    printf("wrote %s/model.bin (random weights, seed %llu: dim %d, hidden_dim %d, %d layers, "
           "%d query heads over %d kv heads, vocab %d, context %d) and %s/tokenizer.bin\n",
           o->make_tiny, (unsigned long long)o->seed, c.dim, c.hidden_dim, c.n_layers,
           c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len, o->make_tiny);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Printing                                                                  */
/* ------------------------------------------------------------------------ */

/* The text of each sequence (--parallel prints them at the end). */
typedef struct text {
    char  *data;
    size_t len, cap;
} text;

static void text_add(text *t, const char *s)
{
    size_t n = strlen(s);
    if (t->len + n + 1 > t->cap) {
        t->cap = (t->len + n + 1) * 2;
        char *grown = realloc(t->data, t->cap);
        if (!grown) {
            fprintf(stderr, "kvrt-llama: out of memory\n");
            exit(1);
        }
        t->data = grown;
    }
    memcpy(t->data + t->len, s, n + 1);
    t->len += n;
}

static int last_token(const llama_seq *seq)
{
    return seq->n > 0 ? seq->tokens[seq->n - 1] : LLAMA_BOS;
}

/* Adds (or, for one sequence, prints) seq's pending token. */
static void emit(const llama_tokenizer *tok, const llama_seq *seq, text *t, int stream)
{
    const char *piece = llama_piece(tok, last_token(seq), seq->pending);
    if (stream) {
        llama_print_piece(stdout, piece);
        fflush(stdout);
    }
    if (t && llama_piece_printable(piece))
        text_add(t, piece);
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);
    fprintf(stderr, "\n[");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "]\n");
    va_end(ap);
}

static void print_shift(const llama_session *sess, int s, int dropped, int n_keep)
{
    int n_ctx = sess->dec->opts.n_ctx;
    note("context shift, seq %d: context of %d full; kept the first %d, kvrt_seq_rm [%d, %d), "
         "kvrt_seq_shift [%d, %d) by -%d, kvrt_cache_compact; now %d tokens", s, n_ctx, n_keep,
         n_keep,
         n_keep + dropped, n_keep + dropped, n_ctx, dropped, sess->seqs[s].n);
}

static int decode_step(llama_session *sess, const options *o)
{
    int shifted[1024];
    if (llama_decode_step(sess, o->n_keep, shifted) != 0)
        return -1;
    for (int s = 0; s < sess->n_seqs; s++)
        if (shifted[s] > 0)
            print_shift(sess, s, shifted[s], o->n_keep);
    return 0;
}

/* Generates up to n_gen tokens per sequence: each pending token is printed,
 * then run (all sequences as one batch) to draw the next. A sequence stops at
 * EOS. The last drawn token stays pending: a resumed session (resumed != 0),
 * which printed it before its save, runs it first, so that the two runs
 * print what one would have. */
static int generate(llama_session *sess, const llama_tokenizer *tok, const options *o,
                    text *texts, int resumed)
{
    int stream = sess->n_seqs == 1, any = 0;
    for (int s = 0; s < sess->n_seqs; s++)
        any |= sess->seqs[s].pending >= 0;
    if (resumed && any && decode_step(sess, o) != 0)
        return -1;
    for (int i = 0; i < o->n_gen; i++) {
        int live = 0;
        for (int s = 0; s < sess->n_seqs; s++) {
            llama_seq *seq = &sess->seqs[s];
            if (seq->pending < 0)
                continue;
            if (seq->pending == LLAMA_EOS || seq->pending == LLAMA_BOS) { /* as llama2.c */
                note("seq %d: end of text", s);
                seq->pending = -1;
                continue;
            }
            emit(tok, seq, texts ? &texts[s] : NULL, stream);
            live++;
        }
        if (live == 0 || i == o->n_gen - 1)
            break;
        if (decode_step(sess, o) != 0)
            return -1;
    }
    return 0;
}

static void print_speed(const llama_session *sess)
{
    fflush(stdout);
    fprintf(stderr, "\n[speed: prefill %lld tokens in %.1f ms = %.1f tokens/s; decode %lld tokens "
                    "in %.1f ms = %.1f tokens/s]\n",
            (long long)sess->prefill_tokens, sess->prefill_s * 1e3,
            sess->prefill_s > 0 ? (double)sess->prefill_tokens / sess->prefill_s : 0.0,
            (long long)sess->decode_tokens, sess->decode_s * 1e3,
            sess->decode_s > 0 ? (double)sess->decode_tokens / sess->decode_s : 0.0);
}

/* ------------------------------------------------------------------------ */
/* Modes                                                                     */
/* ------------------------------------------------------------------------ */

static int *encode(const llama_tokenizer *tok, const char *s, int bos, int *n)
{
    int *tokens = malloc((strlen(s) + 3) * sizeof(int));
    if (!tokens) {
        fprintf(stderr, "kvrt-llama: out of memory\n");
        exit(1);
    }
    llama_encode(tok, s, bos, tokens, n);
    return tokens;
}

/* Prompt (or resumed session, loaded by main), forks, generation. */
static int run_generate(llama_session *sess, const llama_tokenizer *tok, const options *o)
{
    llama_decoder *dec = sess->dec;
    if (o->load) {
        if (o->prompt) { /* appended after each sequence's pending token */
            int n, rc = 0;
            int *tokens = encode(tok, o->prompt, 0, &n);
            int *input = malloc((size_t)(n + 1) * sizeof(int));
            for (int s = 0; s < sess->n_seqs && input && rc == 0; s++) {
                llama_seq *seq = &sess->seqs[s];
                int m = 0;
                if (seq->pending >= 0)
                    input[m++] = seq->pending;
                memcpy(input + m, tokens, (size_t)n * sizeof(int));
                /* make room by context shifts while what is kept can be shifted */
                while (rc == 0 && seq->n + m + n > dec->opts.n_ctx && seq->n > o->n_keep + 1) {
                    int dropped = llama_context_shift(sess, s, o->n_keep);
                    rc = dropped < 0 ? die(NULL) : 0;
                    if (rc == 0)
                        print_shift(sess, s, dropped, o->n_keep);
                }
                if (rc == 0 && llama_prefill(sess, s, input, m + n) != 0)
                    rc = die(NULL);
                if (rc == 0)
                    note("prefill, seq %d: %d tokens appended", s, m + n);
            }
            free(input);
            free(tokens);
            if (rc != 0)
                return rc;
        }
    } else {
        const char *prompt = o->prompt ? o->prompt : "Once upon a time";
        int n;
        int *tokens = encode(tok, prompt, 1, &n);
        int rc = llama_prefill(sess, 0, tokens, n);
        free(tokens);
        if (rc != 0)
            return die(NULL);
        note("prefill, seq 0: %d prompt tokens (kvrt_batch_plan + kvrt_write + kvrt_attention "
             "per layer, %d per call)", n, dec->opts.max_batch);
        for (int s = 1; s < sess->n_seqs; s++) {
            if (llama_fork(sess, 0, s, o->seed + (uint64_t)s, dec->logits) != 0)
                return die(NULL);
            kvrt_cache_stats st;
            kvrt_cache_stats_get(dec->cache, -1, &st);
            note("fork: kvrt_seq_cp seq 0 -> seq %d (seed %llu); %lld blocks shared", s,
                 (unsigned long long)(o->seed + (uint64_t)s), (long long)st.blocks_shared);
        }
        if (sess->n_seqs == 1)
            fputs(prompt, stdout);
    }
    text *texts = calloc((size_t)sess->n_seqs, sizeof *texts);
    int rc = generate(sess, tok, o, texts, o->load && !o->prompt) != 0 ? die(NULL) : 0;
    if (rc == 0 && sess->n_seqs > 1) {
        fflush(stdout);
        for (int s = 0; s < sess->n_seqs; s++) {
            printf("\n--- seq %d ---\n%s\n", s, texts[s].data ? texts[s].data : "");
        }
    }
    for (int s = 0; s < sess->n_seqs; s++)
        free(texts[s].data);
    free(texts);
    return rc;
}

/* Chat turns from stdin: the transcript is tokenized whole each turn (as
 * llama-cpp-python and llama.cpp's server do), the common prefix with the
 * cache is kept, the cache's divergent tail removed with kvrt_seq_rm and the
 * rest prefilled. At least one token is always run, so that there are
 * logits to sample from (seed 002's off-by-one). */
static int run_chat(llama_session *sess, const llama_tokenizer *tok, const options *o)
{
    llama_decoder *dec = sess->dec;
    text transcript = {0};
    char line[4096];
    int rc = 0;
    for (int turn = 1; rc == 0 && fgets(line, sizeof line, stdin); turn++) {
        line[strcspn(line, "\n")] = '\0';
        size_t mark = transcript.len;
        text_add(&transcript, "[INST] ");
        text_add(&transcript, line);
        text_add(&transcript, " [/INST]");
        int n;
        int *tokens = encode(tok, transcript.data, 1, &n);
        if (n >= dec->opts.n_ctx) { /* drop the earlier turns */
            note("turn %d: the transcript's %d tokens fill the context of %d; earlier turns "
                 "dropped", turn, n, dec->opts.n_ctx);
            memmove(transcript.data, transcript.data + mark, transcript.len - mark + 1);
            transcript.len -= mark;
            free(tokens);
            tokens = encode(tok, transcript.data, 1, &n);
            if (n >= dec->opts.n_ctx) {
                fprintf(stderr, "kvrt-llama: turn %d: %d tokens do not fit the context of %d\n",
                        turn, n, dec->opts.n_ctx);
                free(tokens);
                rc = 1;
                break;
            }
        }
        llama_seq *seq = &sess->seqs[0];
        int common = 0;
        while (common < seq->n && common < n && seq->tokens[common] == tokens[common])
            common++;
        if (common == n)
            common--;
        int removed = seq->n - common;
        if (llama_truncate(sess, 0, common) != 0 ||
            llama_prefill(sess, 0, tokens + common, n - common) != 0) {
            free(tokens);
            rc = die(NULL);
            break;
        }
        note("turn %d: %d tokens; %d cached tokens kept, kvrt_seq_rm of %d divergent, %d "
             "prefilled", turn, n, common, removed, n - common);
        printf("> %s\n", line);
        text reply = {0};
        text_add(&reply, "");
        rc = generate(sess, tok, o, &reply, 0) != 0 ? die(NULL) : 0;
        printf("\n");
        /* The reply joins the transcript as the text that was printed. */
        text_add(&transcript, " ");
        text_add(&transcript, reply.data);
        free(reply.data);
        free(tokens);
    }
    free(transcript.data);
    return rc;
}

int main(int argc, char **argv)
{
    /* kvrt's CPU attention runs OpenMP threads, which by default spin for a
     * while after each call and so take the cores OpenBLAS's threads need
     * for the next product (a 9-token prefill measured 25 times slower).
     * libgomp reads its wait policy only from the environment at start, so
     * set it and start again, unless the caller chose one. */
    if (!getenv("OMP_WAIT_POLICY")) {
        setenv("OMP_WAIT_POLICY", "passive", 1);
        execv("/proc/self/exe", argv); /* on failure, go on spinning */
    }
    options o;
    parse(argc, argv, &o);
    if (o.make_tiny)
        return make_tiny(&o);

    llama_model model = {0};
    llama_tokenizer tok = {0};
    llama_decoder dec = {0};
    llama_session sess = {0};
    int rc = 1;
    char tok_path[4096];
    int gguf = llama_is_gguf(o.model); /* its tokenizer is inside, unless -z says */
    if (!o.tokenizer && !gguf) {
        const char *slash = strrchr(o.model, '/');
        snprintf(tok_path, sizeof tok_path, "%.*stokenizer.bin",
                 slash ? (int)(slash - o.model + 1) : 0, o.model);
        o.tokenizer = tok_path;
    }
    int n_seqs = o.parallel;
    if ((gguf && !o.tokenizer ? llama_gguf_load(o.model, &model, &tok)
                              : llama_model_load(o.model, &model) != 0 ||
                                    llama_tokenizer_load(o.tokenizer, model.config.vocab_size,
                                                         &tok) != 0) != 0 ||
        (o.load && llama_session_peek(o.load, &n_seqs) != 0)) {
        rc = die(NULL);
        goto out;
    }
    llama_decoder_options dopts;
    llama_decoder_options_init(&dopts);
    dopts.device = o.device;
    dopts.cache_dtype = o.cache_dtype;
    dopts.n_ctx = o.n_ctx;
    dopts.max_seqs = n_seqs;
    dopts.max_batch = o.max_batch;
    dopts.rope_style = o.rope_style;
    /* --rope-theta, else the file's (GGUF), else llama2.c's 10000 */
    dopts.rope_theta = o.rope_theta > 0 ? o.rope_theta
                       : model.rope_theta > 0 ? model.rope_theta : 10000.0f;
    dopts.n_threads = o.kv_threads;
    llama_sampler sampler;
    llama_sampler_init(&sampler, o.temperature, o.top_p, o.seed);
    if (llama_decoder_create(&model, &dopts, &dec) != 0 ||
        llama_session_create(&dec, n_seqs, &sampler, &sess) != 0) {
        rc = die(NULL);
        goto out;
    }
    const llama_config *c = &model.config;
    fprintf(stderr, "[model %s: dim %d, %d layers, %d query heads over %d kv heads, vocab %d%s; "
                    "kvrt cache on %s, %s, context %d, %d sequence%s]\n",
            o.model, c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size,
            c->shared_classifier ? "" : ", separate classifier", kvrt_backend_name(o.device.backend),
            kvrt_dtype_name(o.cache_dtype), dec.opts.n_ctx, n_seqs, n_seqs > 1 ? "s" : "");

    if (o.load && llama_session_load(&sess, o.load) != 0) {
        rc = die(NULL);
        goto out;
    }
    for (int s = 0; o.load && s < sess.n_seqs; s++)
        note("load %s, seq %d: %d tokens restored by kvrt_state_read, next token %d", o.load, s,
             sess.seqs[s].n, sess.seqs[s].pending);
    rc = o.chat ? run_chat(&sess, &tok, &o) : run_generate(&sess, &tok, &o);
    if (rc == 0 && o.save && llama_session_save(&sess, o.save) != 0) {
        rc = die(NULL);
    } else if (rc == 0 && o.save) {
        int total = 0;
        for (int s = 0; s < sess.n_seqs; s++)
            total += sess.seqs[s].n;
        note("save %s: %d sequence%s, %d tokens (kvrt_state_write)", o.save, sess.n_seqs,
             sess.n_seqs > 1 ? "s" : "", total);
    }
    if (rc == 0)
        print_speed(&sess);
out:
    llama_session_destroy(&sess);
    llama_decoder_destroy(&dec);
    llama_tokenizer_free(&tok);
    llama_model_free(&model);
    return rc;
}
