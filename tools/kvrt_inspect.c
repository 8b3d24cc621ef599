/*
 * kvrt-inspect: prints a kvrt state file (docs/state-format.md): the header,
 * every layer and group, every sequence (token count and position range per
 * group) and every section with its size, verifying every checksum and the
 * file's structure with the library's own parser.
 *   kvrt-inspect FILE
 * Exit status: 0 for a valid file, 1 for an unreadable or invalid one (with
 * the reason), 2 for a usage error.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvrt.h"
#include "state.h"

static const char *kind_name(kvrt_layer_kind kind)
{
    switch (kind) {
    case KVRT_LAYER_ATTN: return "ATTN";
    case KVRT_LAYER_MLA: return "MLA";
    case KVRT_LAYER_CROSS: return "CROSS";
    }
    return "?";
}

static int32_t le_i32(const uint8_t *p)
{
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
}

/* Reads a whole file; NULL with errno's message in *why. */
static uint8_t *read_file(const char *path, size_t *size, const char **why)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        *why = strerror(errno);
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *data = malloc(cap);
    while (data != NULL) {
        n += fread(data + n, 1, cap - n, f);
        if (n < cap)
            break;
        uint8_t *p = cap < SIZE_MAX / 2 ? realloc(data, cap * 2) : NULL;
        if (p == NULL) {
            free(data);
            data = NULL;
            break;
        }
        data = p;
        cap *= 2;
    }
    if (data == NULL) {
        *why = "out of memory";
    } else if (ferror(f)) {
        *why = strerror(errno);
        free(data);
        data = NULL;
    }
    fclose(f);
    *size = n;
    return data;
}

static void print_header(const kvrt_state_header *h)
{
    printf("format version %u, dtype %s, %u layer%s in %u group%s, %u sequence%s\n", h->version,
           kvrt_dtype_name((kvrt_dtype)h->dtype), h->n_layers, h->n_layers == 1 ? "" : "s",
           h->n_groups, h->n_groups == 1 ? "" : "s", h->n_seqs, h->n_seqs == 1 ? "" : "s");
    printf("written by a cache with block_size %u, cross_max_len %u, swa_full %u (information only)\n",
           h->block_size, h->cross_max_len, h->swa_full);
    printf("rope: n_rot %d, theta %.9g, freq_scale %.9g, style %s\n", h->rope.n_rot,
           (double)h->rope.theta, (double)h->rope.freq_scale,
           h->rope.style == KVRT_ROPE_NORMAL ? "normal" : h->rope.style == KVRT_ROPE_NEOX ? "neox" : "?");
    printf("scales_format %u (%s)\n\n", h->scales_format, h->scales_format == 0 ? "none" : "quantized");
    printf("layers:\n  %5s  %-5s  %5s  %5s  %5s  %6s  %6s  %4s  %5s  %9s  %11s\n", "layer", "kind",
           "heads", "dim_k", "dim_v", "window", "latent", "rope", "group", "row_bytes", "scale_bytes");
    for (uint32_t l = 0; l < h->n_layers; l++) {
        const kvrt_state_layer *sl = &h->layers[l];
        const kvrt_layer_desc *d = &sl->desc;
        printf("  %5u  %-5s  %5d  %5d  %5d  %6d  %6d  %4d  %5u  %9u  %11u\n", l, kind_name(d->kind),
               d->n_kv_heads, d->head_dim_k, d->head_dim_v, d->window, d->latent_dim, d->rope_dim,
               sl->group, sl->row_bytes, sl->scale_bytes);
    }
    printf("groups:\n");
    for (uint32_t g = 0; g < h->n_groups; g++) {
        const kvrt_layer_desc *first = &h->layers[h->group_first[g]].desc;
        printf("  group %u: %s", g, kind_name(first->kind));
        if (first->kind == KVRT_LAYER_ATTN && first->window > 0)
            printf(" sliding window %d", first->window);
        else if (first->kind == KVRT_LAYER_ATTN)
            printf(" full attention");
        printf(", layers");
        for (uint32_t l = 0; l < h->n_layers; l++)
            if (h->layers[l].group == g)
                printf(" %u", l);
        printf("\n");
    }
}

static void print_seqs(const kvrt_state_view *v, const uint8_t *image)
{
    const kvrt_state_header *h = &v->header;
    printf("\nsequences:\n");
    for (int64_t i = 0; i < v->n_seqs; i++) {
        const kvrt_state_seq *s = &v->seqs[i];
        printf("  sequence %d\n", (int)s->seq);
        for (uint32_t g = 0; g < h->n_groups; g++) {
            int64_t n = s->n_tokens[g];
            printf("    group %u: ", g);
            if (!h->group_self[g]) {
                printf("%" PRId64 " cross row%s\n", n, n == 1 ? "" : "s");
                continue;
            }
            printf("%" PRId64 " token%s", n, n == 1 ? "" : "s");
            if (n > 0 && s->pos_offset[g] != 0) {
                int32_t lo = le_i32(image + s->pos_offset[g]);
                int32_t hi = le_i32(image + s->pos_offset[g] + 4 * (uint64_t)(n - 1));
                printf(", positions [%d, %d]%s", (int)lo, (int)hi,
                       (int64_t)hi - lo + 1 == n ? " contiguous" : " with gaps");
            }
            if (s->evicted_max[g] >= 0)
                printf(", window evicted [%d, %d]", (int)s->evicted_min[g], (int)s->evicted_max[g]);
            printf("\n");
        }
    }
}

static void print_sections(const kvrt_state_view *v)
{
    printf("\nsections:\n  %12s  %-4s  %14s  %18s\n", "offset", "tag", "payload bytes", "xxh3");
    for (int64_t i = 0; i < v->n_sections; i++) {
        const kvrt_state_section *s = &v->sections[i];
        printf("  %12" PRIu64 "  %-4s  %14" PRIu64 "  0x%016" PRIx64 "  ok\n", s->offset,
               kvrt_state_tag_name(s->tag), s->payload_bytes, s->checksum);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        fprintf(stderr, "usage: kvrt-inspect FILE\n"
                        "Prints a kvrt state file and verifies its checksums and structure.\n");
        return argc == 2 ? 0 : 2;
    }
    const char *path = argv[1];
    const char *why = NULL;
    size_t size = 0;
    uint8_t *image = read_file(path, &size, &why);
    if (image == NULL) {
        fprintf(stderr, "kvrt-inspect: %s: %s\n", path, why);
        return 1;
    }
    printf("kvrt state file %s, %zu bytes\n", path, size);
    kvrt_state_view v;
    kvrt_status st = kvrt_state_parse(image, size, NULL, &v);
    if (v.have_header)
        print_header(&v.header);
    if (st == KVRT_OK)
        print_seqs(&v, image);
    print_sections(&v);
    if (st != KVRT_OK) {
        printf("\ninvalid: %s\n", kvrt_last_error());
        fprintf(stderr, "kvrt-inspect: %s: %s: %s\n", path, kvrt_status_name(st), kvrt_last_error());
    } else {
        printf("\n%" PRId64 " sections, every checksum verified: valid\n", v.n_sections);
    }
    kvrt_state_view_free(&v);
    free(image);
    return st == KVRT_OK ? 0 : 1;
}
