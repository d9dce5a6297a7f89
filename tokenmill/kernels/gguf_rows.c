/* Rows of a GGUF tensor's quantized blocks decoded to float32: an embedding looked up from
 * the blocks a file stores, so its float32 table never exists (gguf_rows.py).
 *
 * Each value is ggml's dequantize_row_* of its type, operation for operation, as gguf-py's
 * dequantize also computes it (a product, then a sum or difference; no fused
 * multiply-add, so the floats equal theirs):
 *   Q4_0  d * (q - 8)               Q4_1  d * q + m
 *   Q5_0  d * (q - 16)              Q5_1  d * q + m
 *   Q8_0  d * q
 *   Q4_K, Q5_K  (d * sc) * q - (dmin * mn), per 32-value sub-block's 6-bit sc and mn
 *   Q6_K  (d * sc) * (q - 32), per 16-value sub-block's int8 sc
 */
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

enum { ROWS_Q4_0 = 2, ROWS_Q4_1 = 3, ROWS_Q5_0 = 6, ROWS_Q5_1 = 7, ROWS_Q8_0 = 8 };
enum { ROWS_Q4_K = 12, ROWS_Q5_K = 13, ROWS_Q6_K = 14 };

static float rows_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return half_to_float(h);
}

static void rows_q4_0(const uint8_t *b, float *y) { /* d, qs[16] */
    const float d = rows_half(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((qs[j] & 15) - 8);
        y[j + 16] = d * (float)((qs[j] >> 4) - 8);
    }
}

static void rows_q4_1(const uint8_t *b, float *y) { /* d, m, qs[16] */
    const float d = rows_half(b), m = rows_half(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(qs[j] & 15) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

/* Q5_0 (d, qh[4], qs[16]) and Q5_1 (d, m, qh[4], qs[16]): bit j of qh is value j's fifth */
static void rows_q5(const uint8_t *b, float *y, int with_min) {
    const float d = rows_half(b), m = with_min ? rows_half(b + 2) : 0.0f;
    const uint8_t *p = b + (with_min ? 4 : 2);
    uint32_t qh;
    memcpy(&qh, p, sizeof qh);
    const uint8_t *qs = p + 4;
    for (int j = 0; j < 16; j++) {
        const int low = (qs[j] & 15) | (int)(((qh >> j) & 1) << 4);
        const int high = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        if (with_min) {
            y[j] = d * (float)low + m;
            y[j + 16] = d * (float)high + m;
        } else {
            y[j] = d * (float)(low - 16);
            y[j + 16] = d * (float)(high - 16);
        }
    }
}

static void rows_q8_0(const uint8_t *b, float *y) { /* d, qs[32] int8 */
    const float d = rows_half(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = d * (float)qs[j];
}

/* the 6-bit scale and min of sub-block j of Q4_K / Q5_K's 12 packed bytes */
static void rows_scale_min(int j, const uint8_t *q, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (the same with qh[32] before qs): 256
 * values, 8 sub-blocks of 32 */
static void rows_k(const uint8_t *b, float *y, int five) {
    const float d = rows_half(b), dmin = rows_half(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
    for (int g = 0; g < 4; g++) { /* 64 values: low nibbles, then high nibbles */
        for (int half = 0; half < 2; half++) {
            int sc, mn;
            rows_scale_min(2 * g + half, scales, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            for (int l = 0; l < 32; l++) {
                int q = half ? qs[l] >> 4 : qs[l] & 15;
                if (five) q += ((qh[l] >> (2 * g + half)) & 1) << 4;
                y[64 * g + 32 * half + l] = d1 * (float)q - m1;
            }
        }
        qs += 32;
    }
}

static void rows_q6_k(const uint8_t *b, float *y) { /* ql[128], qh[64], sc[16] int8, d */
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = rows_half(b + 208);
    for (int n = 0; n < 2; n++) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = (int)((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = (int)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

/* out[i] = row ids[i] of `blocks` ([rows][row_bytes] of `type`, `dim` values a row),
 * decoded; ids are checked by the caller. 0, or -1 for a type this file does not read. */
int tm_gguf_rows(const uint8_t *blocks, int64_t row_bytes, int type, int64_t dim,
                 const int64_t *ids, int64_t n, float *out) {
    int64_t per_block, block_bytes;
    switch (type) {
    case ROWS_Q4_0: per_block = 32, block_bytes = 18; break;
    case ROWS_Q4_1: per_block = 32, block_bytes = 20; break;
    case ROWS_Q5_0: per_block = 32, block_bytes = 22; break;
    case ROWS_Q5_1: per_block = 32, block_bytes = 24; break;
    case ROWS_Q8_0: per_block = 32, block_bytes = 34; break;
    case ROWS_Q4_K: per_block = 256, block_bytes = 144; break;
    case ROWS_Q5_K: per_block = 256, block_bytes = 176; break;
    case ROWS_Q6_K: per_block = 256, block_bytes = 210; break;
    default: return -1;
    }
    if (dim % per_block || dim / per_block * block_bytes != row_bytes) return -1;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = blocks + ids[i] * row_bytes;
        float *y = out + i * dim;
        for (int64_t k = 0; k < dim / per_block; k++, row += block_bytes, y += per_block) {
            switch (type) {
            case ROWS_Q4_0: rows_q4_0(row, y); break;
            case ROWS_Q4_1: rows_q4_1(row, y); break;
            case ROWS_Q5_0: rows_q5(row, y, 0); break;
            case ROWS_Q5_1: rows_q5(row, y, 1); break;
            case ROWS_Q8_0: rows_q8_0(row, y); break;
            case ROWS_Q4_K: rows_k(row, y, 0); break;
            case ROWS_Q5_K: rows_k(row, y, 1); break;
            default: rows_q6_k(row, y); break;
            }
        }
    }
    return 0;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
