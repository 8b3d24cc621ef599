/*
 * model.c: the files of a llama2.c model. The checkpoint (a header of seven
 * int32 and the f32 weights, mapped read-only), its tokenizer.bin (read,
 * checked, byte-pair encoding as llama2.c does it, pieces back to text), and
 * a writer of a tiny random model in the same two formats, so that the tool
 * and its tests run where no weights can be downloaded.
 *
 * Every header value is range-checked before anything is sized from it, and
 * the file must be exactly as long as the header says; each failure names
 * the field.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "llama.h"

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */
/* ------------------------------------------------------------------------ */

static _Thread_local char error_text[512];

const char *llama_error(void)
{
    return error_text;
}

/* Sets the message and returns -1. Shared with decode.c. */
int llama_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_text, sizeof error_text, fmt, ap);
    va_end(ap);
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Checkpoint                                                                */
/* ------------------------------------------------------------------------ */

#define HEADER_BYTES 28

/* Floats of the weights outside the layers, and of one layer. */
static uint64_t fixed_floats(const llama_config *c, int head_size)
{
    uint64_t vocab_dim = (uint64_t)c->vocab_size * (uint64_t)c->dim;
    return vocab_dim                                     /* token_embedding */
           + (uint64_t)c->dim                            /* rms_final */
           + (uint64_t)c->seq_len * (uint64_t)head_size  /* freq_cis real + imag (unused) */
           + (c->shared_classifier ? 0 : vocab_dim);     /* wcls */
}

static uint64_t layer_floats(const llama_config *c, int head_size)
{
    uint64_t dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim;
    uint64_t kv_dim = (uint64_t)c->n_kv_heads * (uint64_t)head_size;
    return 2 * dim                 /* rms_att, rms_ffn */
           + 2 * dim * dim         /* wq, wo */
           + 2 * kv_dim * dim      /* wk, wv */
           + 3 * hidden * dim;     /* w1, w2, w3 */
}

/* The llama2.c header's names of the config's fields, in its order. */
const char *const llama_header_names[7] = {"dim", "hidden_dim", "n_layers", "n_heads",
                                           "n_kv_heads", "vocab_size", "seq_len"};

#define RANGE(i, field, lo, hi)                                                               \
    do {                                                                                      \
        if (c->field < (lo) || c->field > (hi))                                               \
            return llama_fail("%s %s: %s %d is out of range [%d, %d]", what, path, names[i],  \
                              c->field, (lo), (hi));                                          \
    } while (0)

int llama_check_config(const char *what, const char *path, const char *const names[7],
                       const llama_config *c)
{
    RANGE(0, dim, 8, 65536);
    RANGE(1, hidden_dim, 1, 1 << 20);
    RANGE(2, n_layers, 1, 4096);
    RANGE(3, n_heads, 1, c->dim);
    RANGE(4, n_kv_heads, 1, c->n_heads);
    RANGE(5, vocab_size, 3, 1 << 22);
    RANGE(6, seq_len, 1, 1 << 24);
    if (c->dim % c->n_heads != 0)
        return llama_fail("%s %s: %s %d does not divide %s %d", what, path, names[3], c->n_heads,
                          names[0], c->dim);
    if (c->n_heads % c->n_kv_heads != 0)
        return llama_fail("%s %s: %s %d does not divide %s %d", what, path, names[4],
                          c->n_kv_heads, names[3], c->n_heads);
    int head_size = c->dim / c->n_heads;
    if (head_size % 8 != 0 || head_size > 1024)
        return llama_fail("%s %s: head size %s / %s = %d must be a multiple of 8 and at most "
                          "1024", what, path, names[0], names[3], head_size);
    return 0;
}

static int check_config(const char *path, const llama_config *c)
{
    return llama_check_config("checkpoint", path, llama_header_names, c);
}

/* The file is exactly header + weights long; otherwise say which field
 * disagrees with the file when one value of it would fit. */
static int check_size(const char *path, const llama_config *c, int head_size, uint64_t bytes)
{
    uint64_t fixed = HEADER_BYTES + 4 * fixed_floats(c, head_size);
    uint64_t layer = 4 * layer_floats(c, head_size);
    uint64_t need = fixed + (uint64_t)c->n_layers * layer;
    if (bytes == need)
        return 0;
    uint64_t classifier = 4 * (uint64_t)c->vocab_size * (uint64_t)c->dim;
    if (c->shared_classifier && bytes == need + classifier)
        return llama_fail("checkpoint %s: vocab_size %d is positive (classifier shared with the "
                          "embedding) but the file holds a separate classifier", path,
                          c->vocab_size);
    if (!c->shared_classifier && bytes + classifier == need)
        return llama_fail("checkpoint %s: vocab_size -%d is negative (separate classifier) but "
                          "the file holds none", path, c->vocab_size);
    if (bytes >= fixed && (bytes - fixed) % layer == 0)
        return llama_fail("checkpoint %s: n_layers %d, but the file holds %llu layers", path,
                          c->n_layers, (unsigned long long)((bytes - fixed) / layer));
    return llama_fail("checkpoint %s: %llu bytes, but the header (dim %d, hidden_dim %d, "
                      "n_layers %d, n_heads %d, n_kv_heads %d, vocab_size %d, seq_len %d) "
                      "needs %llu", path, (unsigned long long)bytes, c->dim, c->hidden_dim,
                      c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size, c->seq_len,
                      (unsigned long long)need);
}

uint64_t llama_weight_floats(const llama_config *c, int freq_cis)
{
    int head_size = c->dim / c->n_heads;
    uint64_t floats = fixed_floats(c, head_size) + (uint64_t)c->n_layers * layer_floats(c, head_size);
    return freq_cis ? floats : floats - (uint64_t)c->seq_len * (uint64_t)head_size;
}

void llama_layout_weights(llama_model *m, const float *p, int freq_cis)
{
    const llama_config *c = &m->config;
    uint64_t dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim;
    uint64_t L = (uint64_t)c->n_layers, kv_dim = (uint64_t)m->kv_dim;
    llama_weights *w = &m->w;
    w->token_embedding = p; p += (uint64_t)c->vocab_size * dim;
    w->rms_att = p;         p += L * dim;
    w->wq = p;              p += L * dim * dim;
    w->wk = p;              p += L * kv_dim * dim;
    w->wv = p;              p += L * kv_dim * dim;
    w->wo = p;              p += L * dim * dim;
    w->rms_ffn = p;         p += L * dim;
    w->w1 = p;              p += L * hidden * dim;
    w->w2 = p;              p += L * dim * hidden;
    w->w3 = p;              p += L * hidden * dim;
    w->rms_final = p;       p += dim;
    if (freq_cis)
        p += (uint64_t)c->seq_len * (uint64_t)m->head_size; /* freq_cis_real, freq_cis_imag */
    w->wcls = c->shared_classifier ? w->token_embedding : p;
}

int llama_model_load(const char *path, llama_model *model)
{
    memset(model, 0, sizeof *model);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return llama_fail("checkpoint %s: %s", path, strerror(errno));
    struct stat st;
    int32_t header[7];
    int rc = -1;
    if (fstat(fd, &st) != 0) {
        llama_fail("checkpoint %s: %s", path, strerror(errno));
        goto out;
    }
    if ((uint64_t)st.st_size < HEADER_BYTES ||
        pread(fd, header, HEADER_BYTES, 0) != HEADER_BYTES) {
        llama_fail("checkpoint %s: %lld bytes, shorter than the 28-byte header", path,
                   (long long)st.st_size);
        goto out;
    }
    if (memcmp(header, "GGUF", 4) == 0) {
        close(fd);
        return llama_gguf_load(path, model, NULL);
    }
    if (memcmp(header, "ak42", 4) == 0) {
        llama_fail("checkpoint %s: a llama2.c export of version 1 or 2 (magic \"ak42\"); "
                   "kvrt-llama reads the legacy format (export.py --version 0)", path);
        goto out;
    }
    llama_config *c = &model->config;
    *c = (llama_config){header[0], header[1], header[2], header[3], header[4], header[5],
                        header[6], 1};
    if (header[5] < 0) { /* llama2.c: negative vocab_size, unshared classifier */
        c->shared_classifier = 0;
        c->vocab_size = header[5] == INT32_MIN ? 0 : -header[5];
    }
    if (check_config(path, c) != 0)
        goto out;
    model->head_size = c->dim / c->n_heads;
    model->kv_dim = c->n_kv_heads * model->head_size;
    if (check_size(path, c, model->head_size, (uint64_t)st.st_size) != 0)
        goto out;
    /* populated now, so that the first forward pass does not pay the page faults */
    model->map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (model->map == MAP_FAILED) {
        model->map = NULL;
        llama_fail("checkpoint %s: mmap: %s", path, strerror(errno));
        goto out;
    }
    model->map_bytes = (size_t)st.st_size;
    llama_layout_weights(model, (const float *)((const char *)model->map + HEADER_BYTES), 1);
    rc = 0;
out:
    close(fd);
    return rc;
}

void llama_model_free(llama_model *model)
{
    if (model->map)
        munmap(model->map, model->map_bytes);
    free(model->owned);
    memset(model, 0, sizeof *model);
}

/* ------------------------------------------------------------------------ */
/* Tokenizer                                                                 */
/* ------------------------------------------------------------------------ */

static int compare_pieces(const void *a, const void *b)
{
    return strcmp(((const llama_token_index *)a)->piece, ((const llama_token_index *)b)->piece);
}

/* The whole file in memory (it is small); *bytes its size. */
static unsigned char *read_file(const char *what, const char *path, size_t *bytes)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        llama_fail("%s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    struct stat st;
    unsigned char *data = NULL;
    if (fstat(fileno(f), &st) != 0 || st.st_size < 0) {
        llama_fail("%s %s: %s", what, path, strerror(errno));
    } else if (!(data = malloc((size_t)st.st_size + 1))) {
        llama_fail("%s %s: allocating %lld bytes failed", what, path, (long long)st.st_size);
    } else if (fread(data, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        llama_fail("%s %s: read failed", what, path);
        free(data);
        data = NULL;
    }
    *bytes = data ? (size_t)st.st_size : 0;
    fclose(f);
    return data;
}

void llama_tokenizer_index(llama_tokenizer *tok)
{
    qsort(tok->sorted, (size_t)tok->vocab_size, sizeof *tok->sorted, compare_pieces);
    for (int b = 0; b < 256; b++) {
        tok->byte_pieces[2 * b] = (char)b;
        tok->byte_pieces[2 * b + 1] = '\0';
    }
}

int llama_tokenizer_load(const char *path, int vocab_size, llama_tokenizer *tok)
{
    memset(tok, 0, sizeof *tok);
    if (vocab_size < 3)
        return llama_fail("tokenizer %s: vocab_size %d, need at least <unk>, <s>, </s>", path,
                          vocab_size);
    size_t size;
    unsigned char *data = read_file("tokenizer", path, &size);
    if (!data)
        return -1;
    size_t at = 0;
    int32_t max_len;
    if (size < 4) {
        llama_fail("tokenizer %s: %zu bytes, no max_token_length", path, size);
        goto fail;
    }
    memcpy(&max_len, data, 4);
    at = 4;
    if (max_len < 1 || max_len > 65536) {
        llama_fail("tokenizer %s: max_token_length %d is out of range [1, 65536]", path,
                   max_len);
        goto fail;
    }
    tok->vocab_size = vocab_size;
    tok->max_token_length = max_len;
    /* vocab_size was checked against the checkpoint's size; pieces are
     * stored in at most the file's bytes (each entry has 8 bytes of header
     * for its NUL). */
    tok->pieces = malloc((size_t)vocab_size * sizeof *tok->pieces);
    tok->scores = malloc((size_t)vocab_size * sizeof *tok->scores);
    tok->sorted = malloc((size_t)vocab_size * sizeof *tok->sorted);
    tok->text = malloc(size + 1);
    tok->merge = malloc(2 * (size_t)max_len + 2);
    if (!tok->pieces || !tok->scores || !tok->sorted || !tok->text || !tok->merge) {
        llama_fail("tokenizer %s: out of memory", path);
        goto fail;
    }
    char *text = tok->text;
    for (int i = 0; i < vocab_size; i++) {
        int32_t len;
        if (size - at < 8) {
            llama_fail("tokenizer %s: ends at token %d of the model's vocab_size %d", path, i,
                       vocab_size);
            goto fail;
        }
        memcpy(&tok->scores[i], data + at, 4);
        memcpy(&len, data + at + 4, 4);
        at += 8;
        if (!isfinite(tok->scores[i])) {
            llama_fail("tokenizer %s: token %d: score is not finite", path, i);
            goto fail;
        }
        if (len < 0 || len > max_len) {
            llama_fail("tokenizer %s: token %d: length %d is out of range [0, max_token_length "
                       "%d]", path, i, len, max_len);
            goto fail;
        }
        if (size - at < (size_t)len) {
            llama_fail("tokenizer %s: token %d: length %d runs past the end of the file", path,
                       i, len);
            goto fail;
        }
        memcpy(text, data + at, (size_t)len);
        text[len] = '\0';
        tok->pieces[i] = text;
        tok->sorted[i] = (llama_token_index){text, i};
        text += len + 1;
        at += (size_t)len;
    }
    if (at != size) {
        llama_fail("tokenizer %s: %zu bytes after the model's vocab_size %d tokens (a tokenizer "
                   "for another vocabulary?)", path, size - at, vocab_size);
        goto fail;
    }
    llama_tokenizer_index(tok);
    free(data);
    return 0;
fail:
    free(data);
    llama_tokenizer_free(tok);
    return -1;
}

void llama_tokenizer_free(llama_tokenizer *tok)
{
    free(tok->pieces);
    free(tok->scores);
    free(tok->sorted);
    free(tok->text);
    free(tok->merge);
    memset(tok, 0, sizeof *tok);
}

static int lookup(const llama_tokenizer *tok, const char *piece)
{
    llama_token_index key = {piece, 0};
    const llama_token_index *hit = bsearch(&key, tok->sorted, (size_t)tok->vocab_size,
                                           sizeof *tok->sorted, compare_pieces);
    return hit ? hit->id : -1;
}

int llama_encode(const llama_tokenizer *tok, const char *text, int bos, int *tokens,
                 int *n_tokens)
{
    int n = 0;
    if (bos)
        tokens[n++] = LLAMA_BOS;
    if (text[0] != '\0') { /* SentencePiece's dummy prefix */
        int space = lookup(tok, " ");
        if (space >= 0)
            tokens[n++] = space;
    }
    /* One token per UTF-8 code point, or one per byte (<0xXX>, id byte + 3). */
    char point[5];
    for (const unsigned char *c = (const unsigned char *)text; *c;) {
        int len = 1;
        while (len < 4 && (c[len] & 0xC0) == 0x80)
            len++;
        memcpy(point, c, (size_t)len);
        point[len] = '\0';
        int id = len <= tok->max_token_length ? lookup(tok, point) : -1;
        if (id >= 0) {
            tokens[n++] = id;
        } else {
            for (int i = 0; i < len; i++)
                tokens[n++] = c[i] + 3 < tok->vocab_size ? c[i] + 3 : 0;
        }
        c += len;
    }
    /* Merge the adjacent pair whose joined piece scores best, until none is a token. */
    for (;;) {
        float best_score = -INFINITY;
        int best_id = -1, best_at = -1;
        for (int i = 0; i + 1 < n; i++) {
            const char *a = tok->pieces[tokens[i]], *b = tok->pieces[tokens[i + 1]];
            size_t la = strlen(a), lb = strlen(b);
            if (la + lb > (size_t)tok->max_token_length)
                continue;
            memcpy(tok->merge, a, la);
            memcpy(tok->merge + la, b, lb + 1);
            int id = lookup(tok, tok->merge);
            if (id >= 0 && tok->scores[id] > best_score) {
                best_score = tok->scores[id];
                best_id = id;
                best_at = i;
            }
        }
        if (best_at < 0)
            break;
        tokens[best_at] = best_id;
        memmove(&tokens[best_at + 1], &tokens[best_at + 2],
                (size_t)(n - best_at - 2) * sizeof *tokens);
        n--;
    }
    *n_tokens = n;
    return 0;
}

const char *llama_piece(const llama_tokenizer *tok, int prev, int token)
{
    if (token < 0 || token >= tok->vocab_size)
        return "";
    const char *piece = tok->pieces[token];
    if (prev == LLAMA_BOS && piece[0] == ' ')
        piece++;
    unsigned byte;
    char end;
    if (sscanf(piece, "<0x%2X>%c", &byte, &end) == 1 && strlen(piece) == 6)
        return &tok->byte_pieces[2 * byte];
    return piece;
}

int llama_piece_printable(const char *piece)
{
    unsigned char b = (unsigned char)piece[0];
    if (b == '\0')
        return 0;
    return piece[1] != '\0' || (b >= 0x20 && b < 0x7F) || b == '\n' || b == '\t';
}

void llama_print_piece(FILE *out, const char *piece)
{
    if (llama_piece_printable(piece))
        fputs(piece, out);
}

/* ------------------------------------------------------------------------ */
/* A tiny random model                                                       */
/* ------------------------------------------------------------------------ */

llama_config llama_tiny_config(void)
{
    return (llama_config){.dim = 128, .hidden_dim = 344, .n_layers = 4, .n_heads = 4,
                          .n_kv_heads = 2, .vocab_size = 512, .seq_len = 256,
                          .shared_classifier = 1};
}

uint64_t llama_random(uint64_t *state) /* xorshift64* */
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545F4914F6CDD1Dull;
}

/* Writes n floats: uniform in [-scale, scale) + offset. */
static int write_random(FILE *f, uint64_t n, float scale, float offset, uint64_t *rng)
{
    float buf[1024];
    while (n > 0) {
        size_t m = n < 1024 ? (size_t)n : 1024;
        for (size_t i = 0; i < m; i++)
            buf[i] = offset + scale * ((float)(llama_random(rng) >> 40) / 8388608.0f - 1.0f);
        if (fwrite(buf, sizeof(float), m, f) != m)
            return -1;
        n -= m;
    }
    return 0;
}

static int write_model(FILE *f, const llama_config *c, uint64_t seed)
{
    int head_size = c->dim / c->n_heads;
    uint64_t dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim;
    uint64_t L = (uint64_t)c->n_layers, kv_dim = (uint64_t)c->n_kv_heads * (uint64_t)head_size;
    int32_t header[7] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                         c->shared_classifier ? c->vocab_size : -c->vocab_size, c->seq_len};
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1;
    /* Scales keep activations near unit variance: a matrix of fan-in m has
     * entries of variance 1/m; embedding and classifier rows of variance
     * 4/dim give logits of standard deviation about 2. */
    float in_dim = sqrtf(3.0f / (float)c->dim), in_hidden = sqrtf(3.0f / (float)c->hidden_dim);
    float rows = sqrtf(12.0f / (float)c->dim);
    if (fwrite(header, sizeof header, 1, f) != 1 ||
        write_random(f, (uint64_t)c->vocab_size * dim, rows, 0, &rng) ||
        write_random(f, L * dim, 0.1f, 1.0f, &rng) ||               /* rms_att */
        write_random(f, L * dim * dim, in_dim, 0, &rng) ||          /* wq */
        write_random(f, 2 * L * kv_dim * dim, in_dim, 0, &rng) ||   /* wk, wv */
        write_random(f, L * dim * dim, in_dim, 0, &rng) ||          /* wo */
        write_random(f, L * dim, 0.1f, 1.0f, &rng) ||               /* rms_ffn */
        write_random(f, L * hidden * dim, in_dim, 0, &rng) ||       /* w1 */
        write_random(f, L * dim * hidden, in_hidden, 0, &rng) ||    /* w2 */
        write_random(f, L * hidden * dim, in_dim, 0, &rng) ||       /* w3 */
        write_random(f, dim, 0.1f, 1.0f, &rng) ||                   /* rms_final */
        write_random(f, (uint64_t)c->seq_len * (uint64_t)head_size, 0, 0, &rng) || /* freq_cis */
        (!c->shared_classifier &&
         write_random(f, (uint64_t)c->vocab_size * dim, rows, 0, &rng)))
        return -1;
    return 0;
}

/* The tiny vocabulary: <unk>, <s>, </s>, the 256 byte tokens, the 95
 * printable ASCII characters, then prefixes of common words (each prefix a
 * token, so that merges build the word) until vocab_size. */
static int write_tokenizer(FILE *f, int vocab_size)
{
    static const char *words[] = {
        " the", " and", " was", " once", " upon", " time", " there", " little", " girl",
        " named", " lily", " she", " loved", " play", " with", " her", " friend", " they",
        " happy", " said", " one", " day", " went", " park", " saw", " big", " tree",
        " cat", " dog", " ball", " sun", " very", " had", " mom", " to", " in", " of",
        " it", " he", " on", " for", " is", " you", " that", " at", " his", " but", " not",
        "ing", "ed", "er", "es", "ly", "th", "he", "in", "an", "on", "re", "at", "nd",
    };
    if (vocab_size < 354 || vocab_size > (1 << 20))
        return llama_fail("tiny model: vocab_size %d is out of range [354, 1048576]", vocab_size);
    char (*pieces)[16] = malloc((size_t)vocab_size * sizeof *pieces);
    if (!pieces)
        return llama_fail("tiny model: out of memory for %d tokens", vocab_size);
    int n = 0;
    strcpy(pieces[n++], "<unk>");
    strcpy(pieces[n++], "\n<s>\n");
    strcpy(pieces[n++], "\n</s>\n");
    for (int b = 0; b < 256; b++)
        snprintf(pieces[n++], 16, "<0x%02X>", b);
    for (int ch = 32; ch < 127; ch++)
        snprintf(pieces[n++], 16, "%c", ch);
    for (size_t w = 0; w < sizeof words / sizeof *words && n < vocab_size; w++) {
        for (size_t len = 2; len <= strlen(words[w]) && n < vocab_size; len++) {
            char prefix[16];
            snprintf(prefix, sizeof prefix, "%.*s", (int)len, words[w]);
            int seen = 0;
            for (int i = 0; i < n && !seen; i++)
                seen = strcmp(pieces[i], prefix) == 0;
            if (!seen)
                strcpy(pieces[n++], prefix);
        }
    }
    for (int a = 0; n < vocab_size; a++) { /* filler, never merged into */
        if (a < 26 * 26)
            snprintf(pieces[n++], 16, "~%c%c", 'a' + a / 26, 'a' + a % 26);
        else
            snprintf(pieces[n++], 16, "~%d", a);
    }
    int32_t max_len = 15;
    int rc = fwrite(&max_len, 4, 1, f) == 1 ? 0 : -1;
    for (int i = 0; i < n && rc == 0; i++) {
        /* Longer pieces merge first; bytes and characters are never merges. */
        float score = i < 354 ? -1e6f : (float)strlen(pieces[i]) - (float)i * 1e-3f;
        int32_t len = (int32_t)strlen(pieces[i]);
        if (fwrite(&score, 4, 1, f) != 1 || fwrite(&len, 4, 1, f) != 1 ||
            fwrite(pieces[i], 1, (size_t)len, f) != (size_t)len)
            rc = -1;
    }
    free(pieces);
    return rc;
}

int llama_write_tiny(const char *dir, const llama_config *config, uint64_t seed)
{
    char path[4096];
    const char *names[2] = {"model.bin", "tokenizer.bin"};
    if (check_config(dir, config) != 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        FILE *f = fopen(path, "wb");
        if (!f)
            return llama_fail("tiny model: %s: %s", path, strerror(errno));
        error_text[0] = '\0';
        int rc = i == 0 ? write_model(f, config, seed) : write_tokenizer(f, config->vocab_size);
        if (fclose(f) != 0)
            rc = -1;
        if (rc != 0)
            return error_text[0] ? -1 : llama_fail("tiny model: writing %s failed", path);
    }
    return 0;
}
