/* The KV cache's element formats, shared by its writer (layer_ops.c) and its reader
 * (paged_attention.c): float32, float16, bfloat16, and vLLM's 8-bit floats
 * (--kv-cache-dtype fp8_e5m2, and fp8 / fp8_e4m3 with vLLM's default scale of 1).
 *
 * bfloat16 is a float32's top half: written rounded to nearest even, the bytes torch's
 * conversion gives (NaN: a NaN), and read back exactly by a shift.
 *
 * Both 8-bit formats are written as the float rounded to float16 and then to the byte
 * (both to nearest even); the torch path (tokenmill/layers/attention.py) writes through
 * float16 the same way, so both paths store the same bytes, torch's for every float16.
 * - e5m2 (1 sign, 5 exponent, 2 mantissa bits) is a float16's top byte: past its largest
 *   finite value, 57344, it rounds to infinity, as torch's conversion does. Read back
 *   exactly by putting the byte in a float16's top.
 * - e4m3 (1 sign, 4 exponent, 3 mantissa bits, no infinities: "e4m3fn") saturates at
 *   +-448, as torch's conversion does. Read back as the float16 whose bits are the byte's
 *   moved up 7 places (the value / 256, exactly: float16's exponent bias is 8 more), so
 *   the readers scale by 256, a power of two, where that is exact.
 */
#ifndef TM_KV_FORMAT_H
#define TM_KV_FORMAT_H

#include <stdint.h>

enum { CACHE_F32 = 0, CACHE_F16 = 1, CACHE_E5M2 = 2, CACHE_E4M3 = 3, CACHE_BF16 = 4 };

/* bytes per cache value */
static inline int64_t value_size(const int format) {
    return format == CACHE_F32 ? 4 : format == CACHE_F16 || format == CACHE_BF16 ? 2 : 1;
}

/* a float's bits -> the bfloat16 nearest to it (ties to even; NaN to a quiet NaN of the
 * same sign) */
static inline uint16_t bf16_from_bits(uint32_t bits) {
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)(((bits >> 16) & 0x8000) | 0x7FC0);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* a float16's bits -> the e5m2 byte nearest to it (ties to even; past the largest finite
 * e5m2, 57344, rounds to infinity as torch's conversion does) */
static inline uint8_t e5m2_from_half(uint16_t h) {
    if ((h & 0x7C00) == 0x7C00 && (h & 0x03FF)) return (uint8_t)((h >> 8) | 0x7F); /* NaN, as torch */
    return (uint8_t)((h + 0x7F + ((h >> 8) & 1)) >> 8);
}

/* x >> shift (1 <= shift <= 16), rounded to nearest even */
static inline uint32_t shift_to_nearest_even(uint32_t x, int shift) {
    const uint32_t half = 1u << (shift - 1), rest = x & ((1u << shift) - 1), q = x >> shift;
    return q + (rest > half || (rest == half && (q & 1)));
}

/* a float16's bits -> the e4m3 byte nearest to it (ties to even; past 448, and
 * infinities, saturate to +-448; NaN to 0x7F with its sign, as torch's conversion does) */
static inline uint8_t e4m3_from_half(uint16_t h) {
    const uint8_t sign = (uint8_t)((h >> 8) & 0x80);
    const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0x1F && mantissa) return sign | 0x7F;
    uint32_t byte;
    if (exponent >= 9) /* an e4m3 normal: rebias the exponent by 8, keep 3 mantissa bits */
        byte = shift_to_nearest_even(((exponent - 8) << 10) | mantissa, 7);
    else if (exponent >= 1) /* an e4m3 subnormal, m 2^-9: m = significand 2^(exponent - 16) */
        byte = shift_to_nearest_even(0x400 | mantissa, 16 - (int)exponent);
    else /* below 2^-14, under half the smallest e4m3 subnormal (2^-9) */
        byte = 0;
    return sign | (uint8_t)(byte > 0x7E ? 0x7E : byte);
}

#endif
