/* libFuzzer target for the state reader: every input is parsed on its own
 * (as kvrt-inspect does) and loaded into a small cache of each layout, whole
 * and into one sequence. A failed load must leave the cache as it was; a
 * successful one must leave a consistent cache whose state writes back. */
#include "fuzz_common.h"
#include "state.h"

static kvrt_cache *caches[FUZZ_N_LAYOUTS];
static kvrt_layer_desc layer_store[FUZZ_N_LAYOUTS][8];

static void setup(void)
{
    if (caches[0] != NULL)
        return;
    for (int i = 0; i < FUZZ_N_LAYOUTS; i++) {
        kvrt_cache_desc d;
        fuzz_desc(i, &d, layer_store[i]);
        kvrt_status st = kvrt_cache_create(&d, &caches[i]);
        FUZZ_ASSERT(st == KVRT_OK, "creating the %s cache: %s", fuzz_layout_names[i],
                    kvrt_last_error());
    }
}

static void load(kvrt_cache *c, int32_t dst, const uint8_t *data, size_t size)
{
    kvrt_cache_stats before, after;
    FUZZ_ASSERT(kvrt_cache_stats_get(c, -1, &before) == KVRT_OK, "stats");
    fuzz_input in = {data, size, 0};
    kvrt_status st = kvrt_state_read(c, dst, fuzz_reader, &in);
    FUZZ_ASSERT(fuzz_status_expected(st) || st == KVRT_ERR_UNSUPPORTED,
                "kvrt_state_read: %s: %s", kvrt_status_name(st), kvrt_last_error());
    FUZZ_ASSERT(kvrt_cache_check(c) == KVRT_OK, "after a load (%s): %s", kvrt_status_name(st),
                kvrt_last_error());
    if (st != KVRT_OK) {
        FUZZ_ASSERT(kvrt_cache_stats_get(c, -1, &after) == KVRT_OK, "stats");
        FUZZ_ASSERT(memcmp(&before, &after, sizeof before) == 0, "a failed load (%s) changed the cache",
                    kvrt_status_name(st));
        return;
    }
    /* what loaded writes back, at the size announced, and verifies */
    uint64_t bytes = 0;
    FUZZ_ASSERT(kvrt_state_size(c, -1, &bytes) == KVRT_OK, "size: %s", kvrt_last_error());
    fuzz_output out = {NULL, 0, 0};
    st = kvrt_state_write(c, -1, fuzz_writer, &out);
    FUZZ_ASSERT(st == KVRT_OK && out.size == bytes, "write back: %s (%zu of %llu bytes)",
                kvrt_last_error(), out.size, (unsigned long long)bytes);
    kvrt_state_view v;
    st = kvrt_state_parse(out.data, out.size, c, &v);
    FUZZ_ASSERT(st == KVRT_OK, "parsing the written state: %s", kvrt_last_error());
    kvrt_state_view_free(&v);
    free(out.data);
    FUZZ_ASSERT(kvrt_cache_clear(c) == KVRT_OK, "clear");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    kvrt_state_view v;
    kvrt_status st = kvrt_state_parse(data, size, NULL, &v);
    FUZZ_ASSERT(fuzz_status_expected(st) || st == KVRT_ERR_UNSUPPORTED, "kvrt_state_parse: %s: %s",
                kvrt_status_name(st), kvrt_last_error());
    kvrt_state_view_free(&v);
    for (int i = 0; i < FUZZ_N_LAYOUTS; i++) {
        load(caches[i], -1, data, size);
        load(caches[i], 1, data, size);
    }
    return 0;
}
