/*
 * test_seeds.c: the scenarios of the bug reports kvrt exists to make
 * impossible (DESIGN.md, seeds/), on the backend named by KVRT_TEST_BACKEND
 * (cpu by default; exit 77 when it has no device).
 *
 *   seed000  clear and shift-left on the backend's memory
 *   seed002  a multi-turn chat on an interleaved sliding-window model: tail
 *            removal, prefix reuse only where the window allows it, clear
 *            leaving no trace
 *   seed004  a Whisper-style decoder: cross-attention K/V, speculative blocks
 *            rolled back with seq_rm, a pool growing without losing rows
 *
 * Every expectation comes from the test's own model of what was written
 * (scenario.h), never from what the library reports.
 */
#include "scenario.h"

/* ======================================================================== */
/* seed000: clear and shift-left                                            */
/* ======================================================================== */

/* Checks that the rows of layer l of seq at positions new_pos[i] are the rows
 * written at old_pos[i] with tags[i], K re-rotated by new - old. The rotated
 * dims are compared with a double-precision rotation of the written values
 * (bound as in test_api: f32 rotation with a double angle, within a few f32
 * ulps of |x| + |y| <= 2, so 2^-20); every other value bit-exact. */
static void expect_shifted(const kvrt_cache *c, int l, int32_t seq, int64_t n, const int32_t *new_pos,
                           const int32_t *old_pos, const uint32_t *tags)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    const kvrt_layer_desc *ld = &d->layers[l];
    int n_rot = d->rope.n_rot, dk = ld->head_dim_k;
    sc_rows r = sc_gather(c, l, seq, 0, -1);
    if (r.n != n)
        fail_msg("layer %d seq %d: %lld rows after the shift, expected %lld", l, seq, (long long)r.n,
                 (long long)n);
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(r.pos[i], new_pos[i]);
        int32_t delta = new_pos[i] - old_pos[i];
        for (int h = 0; h < ld->n_kv_heads; h++) {
            double x[1024];
            for (int e = 0; e < dk; e++)
                x[e] = sc_val(tags[i], l + SC_K, old_pos[i], (int64_t)h * dk + e);
            for (int p = 0; delta != 0 && p < n_rot / 2; p++) {
                int a = d->rope.style == KVRT_ROPE_NORMAL ? 2 * p : p;
                int b = d->rope.style == KVRT_ROPE_NORMAL ? 2 * p + 1 : p + n_rot / 2;
                double ang = delta * (double)d->rope.freq_scale *
                             pow((double)d->rope.theta, -2.0 * p / n_rot);
                double xa = x[a], xb = x[b];
                x[a] = xa * cos(ang) - xb * sin(ang);
                x[b] = xa * sin(ang) + xb * cos(ang);
            }
            for (int e = 0; e < dk; e++) {
                float got = r.k[i * r.kw + (int64_t)h * dk + e];
                int rotated = delta != 0 && e < n_rot;
                if (rotated ? fabs(got - x[e]) > 0x1p-20 : got != (float)x[e])
                    fail_msg("layer %d pos %d (was %d) head %d K[%d]: %.9g, expected %.9g", l,
                             new_pos[i], old_pos[i], h, e, got, x[e]);
            }
        }
        for (int64_t e = 0; e < r.vw; e++)
            if (r.v[i * r.vw + e] != sc_val(tags[i], l + SC_V, old_pos[i], e))
                fail_msg("layer %d pos %d (was %d): V[%lld] changed", l, new_pos[i], old_pos[i],
                         (long long)e);
    }
    sc_rows_free(&r);
}

static void seed000_clear_and_shift_left(void **state)
{
    (void)state;
    for (int style = 0; style < 2; style++) {
        kvrt_layer_desc layers[3] = {{KVRT_LAYER_ATTN, 2, 32, 16, 0, 0, 0},
                                     {KVRT_LAYER_ATTN, 1, 64, 64, 0, 0, 0},
                                     {KVRT_LAYER_ATTN, 4, 16, 32, 0, 0, 0}};
        kvrt_cache_desc d = sc_desc(layers, 3, KVRT_F32, 16, 16, 2);
        d.rope.n_rot = 16;
        d.rope.theta = 10000.0f;
        d.rope.freq_scale = style ? 0.25f : 1.0f;
        d.rope.style = (kvrt_rope_style)style;
        kvrt_cache *c;
        kvrt_batch *b;
        OK(kvrt_cache_create(&d, &c));
        OK(kvrt_batch_create(c, 64, &b));
        uint32_t tag_a[64], tag_b[64], tag_c[64];
        int32_t pos[64];
        for (int i = 0; i < 64; i++) {
            tag_a[i] = 1;
            tag_b[i] = 2;
            tag_c[i] = 3;
            pos[i] = i;
        }

        /* fill two sequences, clear: nothing left anywhere */
        OK(sc_step(c, b, 0, 0, 40, tag_a));
        OK(sc_step(c, b, 1, 0, 23, tag_a));
        for (int l = 0; l < 3; l++) {
            sc_expect_self(c, l, 0, 40, pos, tag_a);
            sc_expect_self(c, l, 1, 23, pos, tag_a);
        }
        OK(kvrt_cache_clear(c));
        sc_expect_fresh(c, "after clear");

        /* clear zeroed the device memory: a slot planned but not written reads 0 */
        int32_t s0 = 0, p0 = 0;
        OK(kvrt_batch_plan(c, 1, &s0, &p0, b));
        for (int l = 0; l < 3; l++) {
            sc_rows r = sc_gather(c, l, 0, 0, -1);
            assert_int_equal(r.n, 1);
            for (int64_t e = 0; e < r.kw; e++)
                if (r.k[e] != 0.0f)
                    fail_msg("layer %d: K[%lld] of an unwritten slot after clear is %g", l,
                             (long long)e, r.k[e]);
            for (int64_t e = 0; e < r.vw; e++)
                if (r.v[e] != 0.0f)
                    fail_msg("layer %d: V[%lld] of an unwritten slot after clear is %g", l,
                             (long long)e, r.v[e]);
            sc_rows_free(&r);
        }
        OK(kvrt_seq_rm(c, 0, -1, -1));
        sc_expect_fresh(c, "after removing the unwritten slot");

        /* refill, shorter: none of the first fill shows */
        OK(sc_step(c, b, 0, 0, 17, tag_b));
        for (int l = 0; l < 3; l++) {
            sc_expect_self(c, l, 0, 17, pos, tag_b);
            sc_expect_self(c, l, 1, 0, pos, tag_b);
        }

        /* shift-left: drop the first 20 of 48, move the rest down by 20 */
        OK(sc_step(c, b, 0, 17, 31, tag_b));
        OK(kvrt_seq_rm(c, 0, 0, 20));
        OK(kvrt_seq_shift(c, 0, 20, -1, -20));
        OK(kvrt_cache_check(c));
        int32_t old[64];
        for (int i = 0; i < 28; i++)
            old[i] = i + 20;
        for (int l = 0; l < 3; l++)
            expect_shifted(c, l, 0, 28, pos, old, tag_b);
        int32_t lo, hi;
        int64_t nt;
        OK(kvrt_seq_pos_min(c, 0, &lo));
        OK(kvrt_seq_pos_max(c, 0, &hi));
        OK(kvrt_seq_n_tokens(c, 0, &nt));
        assert_int_equal(lo, 0);
        assert_int_equal(hi, 27);
        assert_int_equal(nt, 28);
        kvrt_cache_stats s;
        OK(kvrt_cache_stats_get(c, -1, &s));
        assert_int_equal(s.slots_live, 28);
        /* blocks left empty by the removal went back: 48 slots were 3 blocks,
         * the first block (0..15) held only removed rows */
        assert_int_equal(s.blocks_used, 2);

        /* decoding goes on after the shift */
        for (int p = 28; p < 36; p++)
            OK(sc_step(c, b, 0, p, 1, tag_c));
        for (int l = 0; l < 3; l++)
            sc_expect_self_in(c, l, 0, 28, -1, 8, pos + 28, tag_c);
        OK(kvrt_seq_rm(c, 0, 28, -1));
        for (int l = 0; l < 3; l++)
            expect_shifted(c, l, 0, 28, pos, old, tag_b);

        /* the llama.cpp context shift: keep 4, drop 10, move the rest down by 10 */
        OK(sc_step(c, b, 1, 0, 40, tag_c));
        OK(kvrt_seq_rm(c, 1, 4, 14));
        OK(kvrt_seq_shift(c, 1, 14, -1, -10));
        int32_t old1[64];
        for (int i = 0; i < 30; i++)
            old1[i] = i < 4 ? i : i + 10;
        for (int l = 0; l < 3; l++) {
            expect_shifted(c, l, 1, 30, pos, old1, tag_c);
            expect_shifted(c, l, 0, 28, pos, old, tag_b); /* the other sequence untouched */
        }
        OK(kvrt_cache_check(c));

        /* clear after edits: still nothing left */
        OK(kvrt_cache_clear(c));
        sc_expect_fresh(c, "after the second clear");
        OK(sc_step(c, b, 1, 0, 5, tag_a));
        for (int l = 0; l < 3; l++)
            sc_expect_self(c, l, 1, 5, pos, tag_a);
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }
}

/* ======================================================================== */
/* seed002: multi-turn chat on interleaved sliding-window attention         */
/* ======================================================================== */

enum { CHAT_LAYERS = 12, CHAT_WINDOW = 32, CHAT_BLOCK = 16, CHAT_MAX = 512 };

/* Gemma-like: five sliding-window layers to one global layer. */
static void chat_layers(kvrt_layer_desc *layers)
{
    for (int l = 0; l < CHAT_LAYERS; l++)
        layers[l] = (kvrt_layer_desc){KVRT_LAYER_ATTN, 2, 32, 16, l % 6 == 5 ? 0 : CHAT_WINDOW, 0, 0};
}

static const int chat_swa_layers[] = {0, 1, 2, 3, 4, 6, 7, 8, 9, 10};
static const int chat_full_layers[] = {5, 11};

/* The test's model of the chat's cache. A row's tag hashes the whole token
 * prefix up to it, as a real model's K/V depends on every earlier token. */
typedef struct chat {
    kvrt_cache *c;
    kvrt_batch *b;
    int         g_swa, g_full;
    int32_t     len;                 /* tokens in the cache */
    uint32_t    tok[CHAT_MAX];
    uint32_t    tag[CHAT_MAX];       /* tag of the row at each position */
    sc_swa      swa;
    int         refused, resumed_after_eviction;
} chat;

static uint32_t prefix_tag(uint32_t prev, uint32_t tok)
{
    uint32_t x = prev * 0x01000193u ^ (tok + 0x9e3779b9u);
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    return x;
}

static void chat_expect(chat *ch)
{
    for (unsigned i = 0; i < sizeof chat_full_layers / sizeof chat_full_layers[0]; i++)
        sc_expect_range(ch->c, chat_full_layers[i], 0, 0, ch->len - 1, ch->tag);
    sc_expect_swa(ch->c, ch->g_swa, 0, &ch->swa, chat_swa_layers,
                  (int)(sizeof chat_swa_layers / sizeof chat_swa_layers[0]), ch->tag, ch->len);
    int32_t lo, hi;
    int64_t nt;
    OK(kvrt_seq_pos_min(ch->c, 0, &lo));
    OK(kvrt_seq_pos_max(ch->c, 0, &hi));
    OK(kvrt_seq_n_tokens(ch->c, 0, &nt));
    assert_int_equal(lo, ch->len > 0 ? 0 : -1);
    assert_int_equal(hi, ch->len - 1);
    assert_int_equal(nt, ch->len);
    kvrt_seq_group_info info;
    OK(kvrt_seq_group_info_get(ch->c, 0, ch->g_full, &info));
    assert_int_equal(info.n_tokens, ch->len);
    assert_int_equal(info.n_blocks, (ch->len + CHAT_BLOCK - 1) / CHAT_BLOCK);
    assert_int_equal(info.evicted_max, -1);
    OK(kvrt_cache_check(ch->c));
}

/* Appends tokens toks[0..n) at ch->len, planned in chunks of `chunk`. */
static void chat_feed(chat *ch, const uint32_t *toks, int n, int chunk)
{
    for (int at = 0; at < n; at += chunk) {
        int m = n - at < chunk ? n - at : chunk;
        int32_t p0 = ch->len;
        for (int i = 0; i < m; i++) {
            ch->tok[p0 + i] = toks[at + i];
            ch->tag[p0 + i] = prefix_tag(p0 + i > 0 ? ch->tag[p0 + i - 1] : 0x5eed, toks[at + i]);
        }
        OK(sc_step(ch->c, ch->b, 0, p0, m, ch->tag + p0));
        sc_swa_plan(&ch->swa, p0, m);
        ch->len += m;
    }
}

/* The token a turn's answer generates: decoded one at a time; the last
 * one's attention is checked in a sliding-window and a global layer. */
static void chat_generate(chat *ch, int n, uint32_t *rng)
{
    for (int i = 0; i < n; i++) {
        *rng = *rng * 1664525u + 1013904223u;
        uint32_t t = *rng >> 8;
        chat_feed(ch, &t, 1, 1);
    }
    if (n == 0)
        return;
    int32_t q = ch->len - 1;
    int32_t pos[CHAT_MAX];
    int32_t lo = q - CHAT_WINDOW + 1 > 0 ? q - CHAT_WINDOW + 1 : 0;
    for (int32_t p = 0; p <= q; p++)
        pos[p] = p;
    sc_expect_attention(ch->c, ch->b, 0, 4, 7, q - lo + 1, pos + lo, ch->tag + lo);
    sc_expect_attention(ch->c, ch->b, 5, 4, 7, q + 1, pos, ch->tag);
}

/* One turn: the new prompt; reuse what the cache may keep, then answer. */
static void chat_turn(chat *ch, const uint32_t *prompt, int n, int chunk, int reset_with_clear,
                      int answer, uint32_t *rng)
{
    int32_t d = 0;
    while (d < ch->len && d < n && ch->tok[d] == prompt[d])
        d++;
    assert_true(d < n); /* every prompt adds something */
    /* remove the divergent tail */
    OK(kvrt_seq_rm(ch->c, 0, d, -1));
    ch->len = d;
    sc_swa_rm_tail(&ch->swa, d);
    chat_expect(ch);
    int ok = -1;
    OK(kvrt_seq_can_resume(ch->c, 0, d, &ok));
    if (ok != sc_swa_can_resume(&ch->swa, d))
        fail_msg("can_resume at %d: %d, expected %d (evicted up to %d, window %d)", d, ok,
                 sc_swa_can_resume(&ch->swa, d), ch->swa.emax, CHAT_WINDOW);
    if (ok) {
        if (ch->swa.emax >= 0)
            ch->resumed_after_eviction++;
        chat_feed(ch, prompt + d, n - d, chunk);
    } else {
        /* planning there is refused and changes nothing */
        ch->refused++;
        sc_snapshot before = sc_snap(ch->c);
        int m = n - d < chunk ? n - d : chunk;
        int32_t seqs[CHAT_MAX], pos[CHAT_MAX];
        for (int i = 0; i < m; i++) {
            seqs[i] = 0;
            pos[i] = d + i;
        }
        EXPECT(KVRT_ERR_WINDOW_EVICTED, kvrt_batch_plan(ch->c, m, seqs, pos, ch->b));
        assert_non_null(strstr(kvrt_last_error(), "evicted"));
        sc_expect_unchanged(ch->c, &before, "a refused plan");
        sc_snap_free(&before);
        if (reset_with_clear)
            OK(kvrt_cache_clear(ch->c));
        else
            OK(kvrt_seq_rm(ch->c, 0, -1, -1));
        sc_expect_fresh(ch->c, reset_with_clear ? "clear between prompts" : "seq_rm of the sequence");
        ch->len = 0;
        sc_swa_clear(&ch->swa);
        chat_feed(ch, prompt, n, chunk);
        if (reset_with_clear) {
            /* the cleared cache behaves as a fresh one fed the same prompt */
            kvrt_cache *fresh;
            kvrt_batch *fb;
            OK(kvrt_cache_create(kvrt_cache_get_desc(ch->c), &fresh));
            OK(kvrt_batch_create(fresh, 128, &fb));
            for (int at = 0; at < n; at += chunk)
                OK(sc_step(fresh, fb, 0, at, n - at < chunk ? n - at : chunk, ch->tag + at));
            sc_snapshot a = sc_snap(ch->c), f = sc_snap(fresh);
            for (int g = -1; g < a.n_groups; g++)
                assert_memory_equal(&a.stats[g + 1], &f.stats[g + 1], sizeof(kvrt_cache_stats));
            assert_memory_equal(a.info, f.info, sizeof(kvrt_seq_group_info) * (size_t)a.n_groups);
            for (int l = 0; l < a.n_layers; l++)
                sc_expect_same_rows(&f.rows[l], &a.rows[l], "cleared cache vs fresh cache");
            sc_snap_free(&a);
            sc_snap_free(&f);
            kvrt_batch_destroy(fb);
            kvrt_cache_destroy(fresh);
        }
    }
    chat_expect(ch);
    chat_generate(ch, answer, rng);
    chat_expect(ch);
}

static void chat_open(chat *ch)
{
    static kvrt_layer_desc layers[CHAT_LAYERS];
    chat_layers(layers);
    kvrt_cache_desc d = sc_desc(layers, CHAT_LAYERS, KVRT_F16, CHAT_BLOCK, 40, 1);
    memset(ch, 0, sizeof *ch);
    OK(kvrt_cache_create(&d, &ch->c));
    OK(kvrt_batch_create(ch->c, 128, &ch->b));
    assert_int_equal(kvrt_cache_n_groups(ch->c), 2);
    ch->g_swa = kvrt_layer_group(ch->c, 0);
    ch->g_full = kvrt_layer_group(ch->c, 5);
    assert_int_not_equal(ch->g_swa, ch->g_full);
    sc_swa_init(&ch->swa, CHAT_WINDOW, CHAT_BLOCK);
}

static void chat_close(chat *ch)
{
    kvrt_batch_destroy(ch->b);
    kvrt_cache_destroy(ch->c);
}

/* A prompt: the first `keep` tokens of the cache's history, then n_new new tokens. */
static int make_prompt(const chat *ch, uint32_t *out, int keep, int n_new, uint32_t *rng)
{
    memcpy(out, ch->tok, sizeof(uint32_t) * (size_t)keep);
    for (int i = 0; i < n_new; i++) {
        *rng = *rng * 1664525u + 1013904223u;
        out[keep + i] = (*rng >> 8) | 0x80000000u; /* never equal to a generated token */
    }
    return keep + n_new;
}

static void seed002_swa_chat(void **state)
{
    (void)state;
    chat ch;
    chat_open(&ch);
    uint32_t rng = 12345, prompt[CHAT_MAX];
    int n;

    /* turn 1: system + user, short */
    n = make_prompt(&ch, prompt, 0, 12, &rng);
    prompt[0] = 1; /* BOS */
    chat_turn(&ch, prompt, n, 64, 1, 6, &rng);
    assert_int_equal(ch.len, 18);

    /* turn 2, the report's second call: a new question sharing only BOS */
    n = make_prompt(&ch, prompt, 1, 9, &rng);
    chat_turn(&ch, prompt, n, 64, 1, 8, &rng);
    assert_int_equal(ch.len, 18);
    assert_int_equal(ch.refused, 0);

    /* turn 3: the conversation goes on (a long prefix, long prompt in chunks) */
    n = make_prompt(&ch, prompt, ch.len, 70, &rng);
    chat_turn(&ch, prompt, n, 16, 1, 20, &rng);
    assert_int_equal(ch.len, 108);
    assert_true(ch.swa.emax >= 0); /* the window has evicted rows */

    /* turn 4: an earlier message edited: the prefix reaches into evicted rows */
    n = make_prompt(&ch, prompt, 60, 30, &rng);
    chat_turn(&ch, prompt, n, 32, 1, 12, &rng);
    assert_int_equal(ch.refused, 1);

    /* turn 5: regenerate the last answer: long prefix, window intact */
    n = make_prompt(&ch, prompt, ch.len - 2, 25, &rng);
    chat_turn(&ch, prompt, n, 7, 1, 5, &rng);
    assert_int_equal(ch.refused, 1);
    assert_true(ch.resumed_after_eviction >= 1);

    /* turn 6: a new conversation sharing a few tokens: refused, reset by seq_rm */
    n = make_prompt(&ch, prompt, 5, 20, &rng);
    chat_turn(&ch, prompt, n, 128, 0, 40, &rng);
    assert_int_equal(ch.refused, 2);
    chat_close(&ch);
}

/* The report's second call, many times: remove a divergent tail and decode.
 * Whenever the window still holds what the resumed tokens need, neither the
 * plan nor the following decode may fail; where it does not, the plan is
 * refused with WINDOW_EVICTED, never computed on stale rows. */
static void seed002_rm_tail_then_decode(void **state)
{
    (void)state;
    uint32_t rng = 777;
    for (int trial = 0; trial < 60; trial++) {
        chat ch;
        chat_open(&ch);
        uint32_t prompt[CHAT_MAX];
        rng = rng * 1664525u + 1013904223u;
        int n = make_prompt(&ch, prompt, 0, 2 + (int)(rng >> 8) % 40, &rng);
        rng = rng * 1664525u + 1013904223u;
        chat_feed(&ch, prompt, n, 1 + (int)(rng >> 8) % 20);
        rng = rng * 1664525u + 1013904223u;
        chat_generate(&ch, (int)(rng >> 8) % 60, &rng);
        chat_expect(&ch);
        for (int round = 0; round < 3; round++) {
            rng = rng * 1664525u + 1013904223u;
            int32_t d = (int32_t)((rng >> 8) % (uint32_t)ch.len);
            OK(kvrt_seq_rm(ch.c, 0, d, -1));
            ch.len = d;
            sc_swa_rm_tail(&ch.swa, d);
            chat_expect(&ch);
            int ok;
            OK(kvrt_seq_can_resume(ch.c, 0, d, &ok));
            assert_int_equal(ok, sc_swa_can_resume(&ch.swa, d));
            if (!ok) {
                uint32_t t = 42;
                uint32_t tag = prefix_tag(d > 0 ? ch.tag[d - 1] : 0x5eed, t);
                EXPECT(KVRT_ERR_WINDOW_EVICTED, sc_step(ch.c, ch.b, 0, d, 1, &tag));
                break;
            }
            int m = make_prompt(&ch, prompt, d, 1 + (int)(rng >> 12) % 10, &rng);
            chat_feed(&ch, prompt + d, m - d, 1 + (int)(rng >> 16) % 8);
            chat_generate(&ch, 1 + (int)(rng >> 20) % 20, &rng);
            chat_expect(&ch);
        }
        chat_close(&ch);
    }
}

/* ======================================================================== */
/* seed004: a Whisper-style decoder                                         */
/* ======================================================================== */

enum { WH_LAYERS = 8, WH_CROSS_LEN = 1500, WH_MAX = 256 };

typedef struct whisper {
    kvrt_cache *c;
    kvrt_batch *b;
    int32_t     len;
    uint32_t    tag[WH_MAX];
    int         growths;
} whisper;

static int wh_is_cross(int l) { return l % 2 == 1; }

static void wh_expect(const whisper *w)
{
    for (int l = 0; l < WH_LAYERS; l++)
        if (!wh_is_cross(l))
            sc_expect_range(w->c, l, 0, 0, w->len - 1, w->tag);
    int32_t hi;
    OK(kvrt_seq_pos_max(w->c, 0, &hi));
    assert_int_equal(hi, w->len - 1);
    OK(kvrt_cache_check(w->c));
}

static void wh_expect_cross(const whisper *w)
{
    for (int l = 0; l < WH_LAYERS; l++)
        if (wh_is_cross(l))
            sc_expect_cross(w->c, l, 0, WH_CROSS_LEN, 100u + (uint32_t)l);
}

/* Plans and writes positions [len, len + n) with the given tags; when the
 * pool grows, every self-attention row gathered before is still there,
 * bit-exact, and so is the encoder output. */
static void wh_step(whisper *w, int n, const uint32_t *tags)
{
    kvrt_cache_stats before, after;
    OK(kvrt_cache_stats_get(w->c, -1, &before));
    sc_rows rows[WH_LAYERS];
    for (int l = 0; l < WH_LAYERS; l += 2)
        rows[l] = sc_gather(w->c, l, 0, 0, -1);
    memcpy(w->tag + w->len, tags, sizeof(uint32_t) * (size_t)n);
    OK(sc_step(w->c, w->b, 0, w->len, n, tags));
    w->len += n;
    OK(kvrt_cache_stats_get(w->c, -1, &after));
    if (after.blocks_total != before.blocks_total) {
        assert_true(after.blocks_total > before.blocks_total);
        assert_true(after.bytes_device > before.bytes_device);
        w->growths++;
        for (int l = 0; l < WH_LAYERS; l += 2) {
            sc_rows now = sc_gather(w->c, l, 0, 0, w->len - n);
            sc_expect_same_rows(&rows[l], &now, "rows across pool growth");
            sc_rows_free(&now);
        }
        wh_expect_cross(w);
    }
    for (int l = 0; l < WH_LAYERS; l += 2)
        sc_rows_free(&rows[l]);
}

static void seed004_whisper_decoder(void **state)
{
    (void)state;
    kvrt_layer_desc layers[WH_LAYERS];
    for (int l = 0; l < WH_LAYERS; l++)
        layers[l] = wh_is_cross(l) ? (kvrt_layer_desc){KVRT_LAYER_CROSS, 4, 32, 32, 0, 0, 0}
                                   : (kvrt_layer_desc){KVRT_LAYER_ATTN, 4, 32, 32, 0, 0, 0};
    kvrt_cache_desc d = sc_desc(layers, WH_LAYERS, KVRT_F16, 16, 2, 1);
    d.max_blocks = 16;
    d.cross_max_len = WH_CROSS_LEN;
    whisper w;
    memset(&w, 0, sizeof w);
    OK(kvrt_cache_create(&d, &w.c));
    OK(kvrt_batch_create(w.c, 8, &w.b));
    int g_self = kvrt_layer_group(w.c, 0);
    kvrt_cache_stats s;
    OK(kvrt_cache_stats_get(w.c, g_self, &s));
    assert_int_equal(s.blocks_total, 2);

    /* the encoder output, once per cross layer */
    for (int l = 0; l < WH_LAYERS; l++)
        if (wh_is_cross(l))
            OK(sc_cross_set(w.c, l, 0, WH_CROSS_LEN, 100u + (uint32_t)l));
    wh_expect_cross(&w);
    int32_t hi;
    OK(kvrt_seq_pos_max(w.c, 0, &hi));
    assert_int_equal(hi, -1); /* cross rows are not positions */

    /* the start-of-transcript prompt, then decoding with speculative blocks */
    uint32_t sot[4] = {50258, 50259, 50359, 50363};
    wh_step(&w, 4, sot);
    wh_expect(&w);
    int accepted_pattern[] = {2, 0, 3, 1, 4, 2};
    int spec = 0;
    while (w.len < 120) {
        if (w.len % 9 == 5 && spec < 6) {
            /* draft 4 tokens, verify, keep `acc` of them, roll the rest back */
            int acc = accepted_pattern[spec++];
            uint32_t draft[4];
            for (int i = 0; i < 4; i++)
                draft[i] = 0xd0000000u + (uint32_t)(w.len + i) * 7u + (uint32_t)spec;
            int32_t p0 = w.len;
            wh_step(&w, 4, draft);
            wh_expect(&w);
            OK(kvrt_seq_rm(w.c, 0, p0 + acc, -1));
            w.len = p0 + acc;
            wh_expect(&w);
            OK(kvrt_cache_stats_get(w.c, g_self, &s));
            assert_int_equal(s.blocks_used, (w.len + 15) / 16);
            assert_int_equal(s.slots_live, w.len);
            wh_expect_cross(&w);
        }
        uint32_t t = 1000u + (uint32_t)w.len;
        wh_step(&w, 1, &t);
    }
    wh_expect(&w);
    assert_true(w.growths >= 2); /* 2 -> 4 -> 8 blocks */
    OK(kvrt_cache_stats_get(w.c, g_self, &s));
    assert_true(s.blocks_total > 2 && s.blocks_total <= 16);

    /* attention of the last token: self over every row, cross over the encoder output */
    int32_t pos[WH_MAX];
    for (int i = 0; i < WH_MAX; i++)
        pos[i] = i;
    sc_expect_attention(w.c, w.b, 0, 8, 3, w.len, pos, w.tag);
    uint32_t xtag = 101;
    sc_expect_attention(w.c, w.b, 1, 8, 3, WH_CROSS_LEN, NULL, &xtag);

    /* the transcript is done: removing the sequence drops its cross K/V too */
    OK(kvrt_seq_rm(w.c, 0, -1, -1));
    for (int l = 0; l < WH_LAYERS; l++) {
        sc_rows r = sc_gather(w.c, l, 0, 0, -1);
        assert_int_equal(r.n, 0);
        sc_rows_free(&r);
    }
    OK(kvrt_cache_stats_get(w.c, -1, &s));
    assert_int_equal(s.blocks_used, 0);
    assert_int_equal(s.slots_live, 0);
    OK(kvrt_cache_check(w.c));
    kvrt_batch_destroy(w.b);
    kvrt_cache_destroy(w.c);
}

/* An optional argument selects cases by name (cmocka's filter pattern). */
int main(int argc, char **argv)
{
    if (argc > 1)
        cmocka_set_test_filter(argv[1]);
    int st = sc_backend_init();
    if (st != 0)
        return st;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(seed000_clear_and_shift_left),
        cmocka_unit_test(seed002_swa_chat),
        cmocka_unit_test(seed002_rm_tail_then_decode),
        cmocka_unit_test(seed004_whisper_decoder),
    };
    st = cmocka_run_group_tests(tests, NULL, NULL);
    sc_backend_fini();
    return st;
}
