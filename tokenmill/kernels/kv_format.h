/* The KV cache's element formats, shared by its writer (layer_ops.c) and its reader
 * (paged_attention.c): float32, float16, and fp8 e5m2 (vLLM's --kv-cache-dtype fp8_e5m2).
 *
 * An e5m2 value is the top byte of a float16 (1 sign, 5 exponent, 2 mantissa bits), so it
 * is written as the float rounded to float16 and then to its top byte (both to nearest
 * even), and read back exactly by shifting the byte into a float16's top. The torch path
 * (tokenmill/layers/attention.py) writes through float16 the same way, so both paths store
 * the same bytes.
 */
#ifndef TM_KV_FORMAT_H
#define TM_KV_FORMAT_H

#include <stdint.h>

enum { CACHE_F32 = 0, CACHE_F16 = 1, CACHE_E5M2 = 2 };

/* bytes per cache value */
static inline int64_t value_size(const int format) {
    return format == CACHE_F32 ? 4 : format == CACHE_F16 ? 2 : 1;
}

/* a float16's bits -> the e5m2 byte nearest to it (ties to even; past the largest finite
 * e5m2, 57344, rounds to infinity as torch's conversion does) */
static inline uint8_t e5m2_from_half(uint16_t h) {
    if ((h & 0x7C00) == 0x7C00 && (h & 0x03FF)) return (uint8_t)((h >> 8) | 0x7F); /* NaN, as torch */
    return (uint8_t)((h + 0x7F + ((h >> 8) & 1)) >> 8);
}

#endif
