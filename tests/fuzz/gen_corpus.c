/* Writes the seed corpus of the fuzz targets into DIR/state and DIR/api:
 *   state/  valid states of every fuzz layout (whole cache and one sequence),
 *           truncated and bit-flipped variants, random bytes;
 *   api/    call programs for fuzz_api.c (a scripted run per layout)
 *           and random byte strings. The api/found_*.bin files beside them
 *           are inputs that libFuzzer found (fuzz-api -merge=1), kept as
 *           they are; this program does not touch them.
 * Deterministic: running it again rewrites the same files.
 *   build/tests/fuzz/fuzz-gen-corpus tests/fuzz/corpus */
#include <errno.h>
#include <sys/stat.h>

#include "fuzz_common.h"
#include "state.h"

static uint32_t rng = 20240611u;

static uint32_t next_random(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}

static void write_file(const char *dir, const char *name, const uint8_t *data, size_t size)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
        fprintf(stderr, "gen_corpus: writing %s: %s\n", path, strerror(errno));
        exit(1);
    }
}

static void check(kvrt_status st, const char *what)
{
    if (st != KVRT_OK) {
        fprintf(stderr, "gen_corpus: %s: %s: %s\n", what, kvrt_status_name(st), kvrt_last_error());
        exit(1);
    }
}

static size_t k_elems(const kvrt_layer_desc *l)
{
    return l->kind == KVRT_LAYER_MLA ? (size_t)(l->latent_dim + l->rope_dim)
                                     : (size_t)l->n_kv_heads * (size_t)l->head_dim_k;
}

static size_t v_elems(const kvrt_layer_desc *l)
{
    return l->kind == KVRT_LAYER_MLA ? 0 : (size_t)l->n_kv_heads * (size_t)l->head_dim_v;
}

static float value(int a, int b, size_t e)
{
    return (float)((a * 131 + b * 31 + (int)e * 7) % 200) / 100.0f - 1.0f;
}

/* Plans positions first, first + stride, ... of seq in batches of 4. */
static void fill(kvrt_cache *c, int32_t seq, int32_t first, int n, int32_t stride)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    kvrt_batch *b = NULL;
    check(kvrt_batch_create(c, 4, &b), "batch");
    float k[4 * 64], v[4 * 64];
    for (int done = 0; done < n; done += 4) {
        int m = n - done < 4 ? n - done : 4;
        int32_t seqs[4], pos[4];
        for (int i = 0; i < m; i++) {
            seqs[i] = seq;
            pos[i] = first + (done + i) * stride;
        }
        check(kvrt_batch_plan(c, m, seqs, pos, b), "plan");
        for (int l = 0; l < d->n_layers; l++) {
            const kvrt_layer_desc *ld = &d->layers[l];
            if (ld->kind == KVRT_LAYER_CROSS)
                continue;
            for (int i = 0; i < m; i++) {
                for (size_t e = 0; e < k_elems(ld); e++)
                    k[(size_t)i * k_elems(ld) + e] = value(pos[i], l, e);
                for (size_t e = 0; e < v_elems(ld); e++)
                    v[(size_t)i * v_elems(ld) + e] = value(pos[i] + 1000, l, e);
            }
            check(kvrt_write(c, b, l, k, v_elems(ld) > 0 ? v : NULL, KVRT_F32, NULL), "write");
        }
    }
    kvrt_batch_destroy(b);
}

static void cross(kvrt_cache *c, int32_t seq, int n)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    float k[16 * 64], v[16 * 64];
    for (int l = 0; l < d->n_layers; l++) {
        const kvrt_layer_desc *ld = &d->layers[l];
        if (ld->kind != KVRT_LAYER_CROSS)
            continue;
        for (int i = 0; i < n; i++) {
            for (size_t e = 0; e < k_elems(ld); e++)
                k[(size_t)i * k_elems(ld) + e] = value(i, l + seq, e);
            for (size_t e = 0; e < v_elems(ld); e++)
                v[(size_t)i * v_elems(ld) + e] = value(i + 500, l + seq, e);
        }
        check(kvrt_cross_set(c, l, seq, n, k, v, KVRT_F32, NULL), "cross_set");
    }
}

static void state_corpus(const char *dir)
{
    for (int layout = 0; layout < FUZZ_N_LAYOUTS; layout++) {
        kvrt_cache_desc d;
        kvrt_layer_desc layers[8];
        fuzz_desc(layout, &d, layers);
        kvrt_cache *c = NULL;
        check(kvrt_cache_create(&d, &c), "create");
        fill(c, 0, 0, 24, 1);
        fill(c, 2, 5, 10, 2);
        check(kvrt_seq_rm(c, 0, 3, 6), "rm"); /* holes */
        if (layout == FUZZ_MIXED) {
            cross(c, 0, 5);
            cross(c, 3, 3); /* a sequence of cross rows only */
        }
        const char *name = fuzz_layout_names[layout];
        char file[128];
        fuzz_output all = {NULL, 0, 0}, one = {NULL, 0, 0};
        check(kvrt_state_write(c, -1, fuzz_writer, &all), "state");
        check(kvrt_state_write(c, 0, fuzz_writer, &one), "state");
        snprintf(file, sizeof file, "valid_%s_all.kvst", name);
        write_file(dir, file, all.data, all.size);
        snprintf(file, sizeof file, "valid_%s_seq0.kvst", name);
        write_file(dir, file, one.data, one.size);
        /* truncated: inside the header, at a section boundary, in the last rows */
        const size_t cuts[3] = {40, 8 + 24 + 56 + 40 * (size_t)d.n_layers, all.size - 5};
        for (int i = 0; i < 3; i++) {
            snprintf(file, sizeof file, "truncated_%s_%d.kvst", name, i);
            write_file(dir, file, all.data, cuts[i]);
        }
        /* one flipped bit each */
        for (int i = 0; i < 3; i++) {
            size_t bit = next_random() % (one.size * 8);
            one.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
            snprintf(file, sizeof file, "bitflip_%s_%d.kvst", name, i);
            write_file(dir, file, one.data, one.size);
            one.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        }
        free(all.data);
        free(one.data);
        kvrt_cache_destroy(c);
    }
    uint8_t junk[2048];
    for (int i = 0; i < 4; i++) {
        size_t n = 64 + next_random() % (sizeof junk - 64);
        for (size_t k = 0; k < n; k++)
            junk[k] = (uint8_t)next_random();
        if (i >= 2)
            memcpy(junk, KVRT_STATE_MAGIC, 8);
        char file[64];
        snprintf(file, sizeof file, "random_%d.bin", i);
        write_file(dir, file, junk, n);
    }
    write_file(dir, "magic_only.bin", (const uint8_t *)KVRT_STATE_MAGIC, 8);
}

/* ---- API programs, encoded for fuzz_api.c's decoder ---- */

typedef struct prog {
    uint8_t b[4096];
    size_t  n;
} prog;

static void emit(prog *p, int v) { p->b[p->n++] = (uint8_t)v; }

#define SEQ_ALL 15
#define POS_END_A 254 /* with a following 0: position -1, "to the end" */

static void p_plan(prog *p, int n, int seq, int base, int stride, int attention)
{
    emit(p, 0);
    emit(p, n - 1);
    emit(p, seq);
    emit(p, base);
    emit(p, stride);
    for (int i = 0; i < n; i++)
        emit(p, 0);
    emit(p, attention);
}

static void api_corpus(const char *dir)
{
    for (int layout = 0; layout < FUZZ_N_LAYOUTS; layout++) {
        prog p = {{0}, 0};
        emit(&p, layout);
        for (int base = 0; base < 40; base += 8)
            p_plan(&p, 8, 0, base, 1, 1 + 2 * (base / 8));
        if (layout == FUZZ_MIXED) {
            emit(&p, 10); emit(&p, 3); emit(&p, 0); emit(&p, 6); /* cross_set layer 3 seq 0, 6 rows */
        }
        emit(&p, 4); emit(&p, 0); emit(&p, 1); emit(&p, 0); emit(&p, POS_END_A); emit(&p, 0); /* cp 0 -> 1 */
        p_plan(&p, 8, 1, 40, 1, 0);
        emit(&p, 3); emit(&p, 0); emit(&p, 3); emit(&p, 6);                 /* rm 0 [3, 6) */
        emit(&p, 6); emit(&p, 1); emit(&p, 10); emit(&p, POS_END_A); emit(&p, 0); emit(&p, 5); /* shift */
        emit(&p, 12); emit(&p, SEQ_ALL); emit(&p, 1);                        /* state: mirror */
        emit(&p, 12); emit(&p, 1); emit(&p, 0); emit(&p, 2);                 /* state 1 -> 2 */
        emit(&p, 13); emit(&p, 0); emit(&p, 3);                              /* offload 0 -> 3 */
        emit(&p, 9);                                                         /* compact */
        emit(&p, 14); emit(&p, 1); emit(&p, 30); emit(&p, 1);                /* queries */
        emit(&p, 7); emit(&p, 2); emit(&p, 0); emit(&p, POS_END_A); emit(&p, 0); emit(&p, 2); /* div */
        emit(&p, 11); emit(&p, 1); emit(&p, 1); emit(&p, 3); emit(&p, 0); emit(&p, POS_END_A); emit(&p, 0); emit(&p, 64);
        emit(&p, 5); emit(&p, 3);                                            /* keep 3 */
        emit(&p, 12); emit(&p, SEQ_ALL); emit(&p, 1);
        /* op 15: hostile rows and queries, then attention over them */
        emit(&p, 15); emit(&p, 0); emit(&p, 3); emit(&p, 2); emit(&p, 0); emit(&p, 1);
        for (int i = 0; i < 4; i++)
            emit(&p, 0);
        emit(&p, 0x2a); emit(&p, 1);
        for (int how = 0; how < 4; how++) {                                  /* shared from get_desc */
            emit(&p, 15); emit(&p, 1); emit(&p, how);
        }
        for (int v = 0; v < 14; v++) {                        /* hostile descriptions, each value */
            emit(&p, 15); emit(&p, 2); emit(&p, v % 2); emit(&p, v);
            emit(&p, 15); emit(&p, 2); emit(&p, 2); emit(&p, v); emit(&p, v);
        }
        emit(&p, 15); emit(&p, 2); emit(&p, 3); emit(&p, 0); emit(&p, 0);   /* n_threads 4097 */
        emit(&p, 15); emit(&p, 2); emit(&p, 4); emit(&p, 0);                /* thetas -0 */
        emit(&p, 8); emit(&p, 0);                                            /* clear */
        char file[64];
        snprintf(file, sizeof file, "script_%s.bin", fuzz_layout_names[layout]);
        write_file(dir, file, p.b, p.n);
    }
    for (int i = 0; i < 24; i++) {
        uint8_t junk[600];
        size_t n = 16 + next_random() % (sizeof junk - 16);
        for (size_t k = 0; k < n; k++)
            junk[k] = (uint8_t)next_random();
        char file[64];
        snprintf(file, sizeof file, "random_%02d.bin", i);
        write_file(dir, file, junk, n);
    }
}

static void make_dir(const char *path)
{
    if (mkdir(path, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "gen_corpus: mkdir %s: %s\n", path, strerror(errno));
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR (writes CORPUS_DIR/state and CORPUS_DIR/api)\n", argv[0]);
        return 2;
    }
    char state_dir[1024], api_dir[1024];
    snprintf(state_dir, sizeof state_dir, "%s/state", argv[1]);
    snprintf(api_dir, sizeof api_dir, "%s/api", argv[1]);
    make_dir(argv[1]);
    make_dir(state_dir);
    make_dir(api_dir);
    state_corpus(state_dir);
    api_corpus(api_dir);
    printf("corpus written to %s\n", argv[1]);
    return 0;
}
