/*
 * kvrt_info.c: kvrt-info prints the library's version, the backends built
 * into it and their devices, and the instruction set the CPU kernels run
 * (KVRT_CPU_ISA caps it: portable, avx2, avx512).
 *
 *   kvrt-info                  version, backends, devices
 *   kvrt-info --budget SIZE    tokens a memory budget of SIZE (80GiB, 512MiB,
 *                              or bytes) holds per cache dtype, for a
 *                              Llama-3-8B-shaped and a DeepSeek-V3-shaped
 *                              layer description (from kvrt_layer_row_bytes;
 *                              DeepSeek-V3's fp8 line from the FlashMLA row
 *                              layout of kvrt_layout.h)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvrt.h"
#include "kvrt_layout.h"

/* SIZE with an optional KiB/MiB/GiB/TiB (or KB/MB/GB/TB, powers of 1000)
 * suffix; 0 when it does not parse. */
static double parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || v <= 0)
        return 0;
    static const struct { const char *suffix; double scale; } units[] = {
        {"", 1},          {"B", 1},          {"KiB", 1024.0},   {"MiB", 1048576.0},
        {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}, {"KB", 1e3}, {"MB", 1e6},
        {"GB", 1e9},      {"TB", 1e12},
    };
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (strcmp(end, units[i].suffix) == 0)
            return v * units[i].scale;
    return 0;
}

typedef struct model {
    const char     *name;
    int             n_layers;
    kvrt_layer_desc layer;  /* every layer */
} model;

/* The FlashMLA-style fp8 row of an MLA layer (docs/layouts.md, "fp8 MLA
 * rows"; kvrt_layout.h), which kvrt_layer_row_bytes does not count while
 * caches refuse it: 1 with its bytes and scale bytes, 0 for anything else. */
static int fp8_mla_row(const kvrt_layer_desc *l, kvrt_dtype dtype, size_t *row, size_t *scales)
{
    if (l->kind != KVRT_LAYER_MLA || dtype != KVRT_FP8_E4M3 || l->latent_dim % KVRT_MLA_FP8_GROUP)
        return 0;
    *row = (size_t)kvrt_mla_fp8_row_bytes(l->latent_dim, l->rope_dim);
    *scales = (size_t)(kvrt_mla_fp8_rope_off(l->latent_dim) - kvrt_mla_fp8_scale_off(l->latent_dim));
    return 1;
}

/* The CPU kernels' instruction set (kvrt_cpu_isa_get): what the processor
 * has, what KVRT_CPU_ISA asked for, and what runs. */
static void print_cpu_isa(void)
{
    kvrt_cpu_isa_info isa;
    kvrt_cpu_isa_get(&isa);
    printf("  CPU kernels: %s (processor: %s", kvrt_cpu_isa_name(isa.used),
           kvrt_cpu_isa_name(isa.machine));
    if (isa.requested == -2)
        printf("; KVRT_CPU_ISA=%s is not portable, avx2 or avx512: ignored", isa.env);
    else if (isa.requested > (int)isa.machine)
        printf("; KVRT_CPU_ISA=%s is above what it has: capped to %s", isa.env,
               kvrt_cpu_isa_name(isa.used));
    else if (isa.requested >= 0)
        printf("; KVRT_CPU_ISA=%s", isa.env);
    printf(")\n");
}

static int budget(const char *arg)
{
    double bytes = parse_size(arg);
    if (bytes <= 0) {
        fprintf(stderr, "kvrt-info: --budget %s: not a size (e.g. 80GiB, 512MiB, 1e9)\n", arg);
        return 2;
    }
    static const model models[] = {
        {"Llama-3-8B (32 layers, 8 kv heads, d 128)", 32, {KVRT_LAYER_ATTN, 8, 128, 128, 0, 0, 0, 0}},
        {"DeepSeek-V3 (61 MLA layers, 512 + 64)", 61, {KVRT_LAYER_MLA, 0, 0, 0, 0, 512, 64, 0}},
    };
    static const kvrt_dtype dtypes[] = {KVRT_F32, KVRT_BF16, KVRT_F16, KVRT_Q8, KVRT_FP8_E4M3};
    printf("tokens a budget of %s (%.0f bytes) holds; K/V rows only (positions add 4 bytes a "
           "token per layer group, page tables and block rounding not counted)\n",
           arg, bytes);
    for (size_t m = 0; m < sizeof models / sizeof models[0]; m++) {
        printf("%s\n", models[m].name);
        printf("  %-9s %14s %14s %16s\n", "dtype", "bytes/token", "of which scales", "tokens");
        for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
            size_t row = kvrt_layer_row_bytes(&models[m].layer, dtypes[d]);
            size_t scales = kvrt_layer_scale_bytes(&models[m].layer, dtypes[d]);
            if (row == 0 && fp8_mla_row(&models[m].layer, dtypes[d], &row, &scales)) {
                double token = (double)row * models[m].n_layers;
                printf("  %-9s %14.0f %14.0f %16.0f  (FlashMLA rows: layout only, a cache "
                       "refuses them in this build)\n",
                       kvrt_dtype_name(dtypes[d]), token, (double)scales * models[m].n_layers,
                       bytes / token);
                continue;
            }
            if (row == 0) {
                printf("  %-9s %14s %14s %16s\n", kvrt_dtype_name(dtypes[d]), "-", "-",
                       "not supported for this layer kind");
                continue;
            }
            double token = (double)row * models[m].n_layers;
            printf("  %-9s %14.0f %14.0f %16.0f\n", kvrt_dtype_name(dtypes[d]), token,
                   (double)scales * models[m].n_layers, bytes / token);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--budget") == 0)
        return budget(argv[2]);
    if (argc != 1) {
        fprintf(stderr, "usage: kvrt-info [--budget SIZE]\n");
        return 2;
    }
    printf("kvrt %s (header %d.%d.%d)\n", kvrt_version_string(), KVRT_VERSION_MAJOR,
           KVRT_VERSION_MINOR, KVRT_VERSION_PATCH);
    static const kvrt_backend backends[] = {KVRT_BACKEND_CPU, KVRT_BACKEND_CUDA, KVRT_BACKEND_HIP};
    for (int i = 0; i < 3; i++) {
        kvrt_backend be = backends[i];
        int n = kvrt_device_count(be);
        printf("%-5s %d device%s%s\n", kvrt_backend_name(be), n, n == 1 ? "" : "s",
               n == 0 ? " (not built in, or no device or driver)" : "");
        for (int d = 0; d < n; d++) {
            char desc[256];
            kvrt_device dev = {be, d};
            kvrt_status st = kvrt_device_describe(dev, desc, sizeof desc);
            if (st == KVRT_OK)
                printf("  %s\n", desc);
            else
                printf("  %s:%d: %s: %s\n", kvrt_backend_name(be), d, kvrt_status_name(st),
                       kvrt_last_error());
        }
        if (be == KVRT_BACKEND_CPU)
            print_cpu_isa();
    }
    return 0;
}
