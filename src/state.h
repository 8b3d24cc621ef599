/*
 * state.h: the state image parser and loader shared by state I/O
 * (src/state.c), host offload (src/offload.c) and kvrt-inspect. Internal;
 * the format is docs/state-format.md.
 */
#ifndef KVRT_STATE_H
#define KVRT_STATE_H

#include <stddef.h>
#include <stdint.h>

#include "kvrt.h"

/* Version 1; version 2 (written only when a layer has its own rope_theta)
 * adds the layer's rope_theta to each layer record. */
#define KVRT_STATE_VERSION 2
#define KVRT_STATE_MAGIC "KVRTSTAT"
#define KVRT_STATE_MAGIC_BYTES 8
#define KVRT_STATE_FRAME_BYTES 16   /* tag, flags, size */
#define KVRT_STATE_CHECKSUM_BYTES 8
#define KVRT_STATE_HEAD_FIXED 56
#define KVRT_STATE_LAYER_RECORD 40      /* version 1 */
#define KVRT_STATE_LAYER_RECORD_V2 44   /* version 2: + rope_theta */
#define KVRT_STATE_SCALES_ROW_F32 1     /* scales_format: an f32 per (token, head) of K, then of V */
#define KVRT_STATE_SEQ_FIXED 8
#define KVRT_STATE_GROUP_RECORD 16
#define KVRT_STATE_ROWS_FIXED 24
#define KVRT_STATE_END_PAYLOAD 8

enum {
    KVRT_STATE_TAG_HEAD = 0x44414548u, /* "HEAD" */
    KVRT_STATE_TAG_SEQ = 0x20514553u,  /* "SEQ " */
    KVRT_STATE_TAG_ROWS = 0x53574f52u, /* "ROWS" */
    KVRT_STATE_TAG_END = 0x20444e45u,  /* "END " */
};

/* A layer as the file describes it. */
typedef struct kvrt_state_layer {
    kvrt_layer_desc desc;
    uint32_t        group;
    uint32_t        row_bytes;
    uint32_t        scale_bytes;
} kvrt_state_layer;

typedef struct kvrt_state_header {
    uint32_t          version;
    uint32_t          dtype;
    uint32_t          n_layers;
    uint32_t          n_groups;
    uint32_t          n_seqs;
    uint32_t          block_size, cross_max_len, swa_full;   /* information only */
    kvrt_rope_desc    rope;
    uint32_t          scales_format;
    kvrt_state_layer *layers;       /* [n_layers] */
    uint8_t          *group_self;   /* [n_groups]: 1 ATTN/MLA, 0 CROSS */
    uint32_t         *group_first;  /* [n_groups]: first layer of each group */
} kvrt_state_header;

/* One sequence of a parsed image. Offsets are bytes from the image start. */
typedef struct kvrt_state_seq {
    int32_t   seq;
    int64_t  *n_tokens;      /* [n_groups] */
    int32_t  *evicted_min;   /* [n_groups] */
    int32_t  *evicted_max;   /* [n_groups] */
    uint64_t *pos_offset;    /* [n_groups]: little-endian i32 [n_tokens]; self groups */
    uint64_t *rows_offset;   /* [n_layers]: row data [n_tokens(group)][row_bytes] */
} kvrt_state_seq;

/* A section as found in the image (for kvrt-inspect). */
typedef struct kvrt_state_section {
    uint32_t tag;
    uint64_t offset;         /* of the frame */
    uint64_t payload_bytes;
    uint64_t checksum;
} kvrt_state_section;

/* The result of parsing an image; what it holds stays valid on error (the
 * sections verified before the failure), for kvrt-inspect. */
typedef struct kvrt_state_view {
    kvrt_state_header   header;
    int                 have_header;
    kvrt_state_seq     *seqs;
    int64_t             n_seqs, seqs_cap;
    kvrt_state_section *sections;
    int64_t             n_sections, sections_cap;
    int                 complete;   /* END verified */
    uint64_t            bytes;      /* image bytes consumed */
    /* parser position */
    int                 expect;     /* next section kind */
    uint32_t            next_layer;
} kvrt_state_view;

/* Parses and verifies a whole image in memory: every section's frame,
 * checksum and contents. With cache != NULL, the header must match the
 * cache (KVRT_ERR_INCOMPATIBLE naming the first differing field). Errors:
 * KVRT_ERR_CORRUPT (with section and byte offset), KVRT_ERR_INCOMPATIBLE,
 * KVRT_ERR_OUT_OF_MEMORY, KVRT_ERR_UNSUPPORTED (no checksum library).
 * Free *view with kvrt_state_view_free in every case. */
kvrt_status kvrt_state_parse(const void *image, size_t size, const kvrt_cache *cache,
                             kvrt_state_view *view);
void kvrt_state_view_free(kvrt_state_view *view);

/* Loads a verified view (image is the memory it was parsed from) into the
 * cache: dst_seq >= 0 (the view holds one sequence) or < 0 (each into its
 * id). All-or-nothing. */
kvrt_status kvrt_state_apply(kvrt_cache *cache, int32_t dst_seq, const kvrt_state_view *view,
                             const uint8_t *image);

/* "HEAD", "SEQ ", ... for a tag; "????" for others. */
const char *kvrt_state_tag_name(uint32_t tag);

#endif /* KVRT_STATE_H */
