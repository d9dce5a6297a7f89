/* y = x W^T (+ bias), x float32, W in panels of 16 output columns: float16
 * ([panels][K][16]) or GGUF blocks repacked (quant_matmul.py maps each GGUF type to one of
 * four formats, named by a GGML type id):
 *   values: Q4_1 [panels][K][8] bytes, byte j = column j (low nibble) | column j+8 (high);
 *           Q8_0 and Q6_K [panels][K][16] int8;
 *           Q5_1 [panels][K/32][320] bytes: Q4_1's 32 x 8 nibble bytes, then 32 uint16
 *                whose bit j is column j's fifth bit (value 16);
 *   scales: [panels][K/G][S][16], G values per scale: float16 with G = 32 and S = 2 (d,
 *           then m) for Q4_1 and Q5_1, S = 1 (d) for Q8_0; float32 with G = 16, S = 1 for
 *           Q6_K (its per-16 scales, d * sc, exact).
 * A quantized weight is w = fma(d, q, m) (m = 0 for Q8_0 and Q6_K) per G-value block.
 *
 * Every output is ONE chain, y = fma(w_k, x_k, y) over k = 0 .. K-1 in order, whichever
 * tile computes it: batches of up to 4 rows convert the weights in registers (batch-1
 * decode reads only the compact bytes), larger ones convert a panel once into a float
 * buffer that 6-row tiles share. Both produce the same floats, so no result depends on the
 * batch around its row (nor on the thread count, nor on the build: the portable scalar
 * path runs the same chains). Work is split over panels across threads (parallel.h).
 *
 * With int8 activations (type | DOT, llama.cpp's route), x is quantized per row and
 * 32-value block, q = nearbyint(x * 127 / max|x|), d = max|x| / 127, s = d * sum(q), and the
 * weights' values are stored in dot-product order, 8 columns per 32-byte vector:
 *   Q4_1: [panels][K/32][2][4][32] bytes: in vector v of group g, byte 4c + i holds column
 *         8g + c's block values 4v + i (low nibble) and 16 + 4v + i (high nibble);
 *   Q5_1: [panels][K/32][2][160] bytes: Q4_1's 4 vectors, then a 32-byte plane whose
 *         byte 4c + i has bit 2v + h = the fifth bit of value 16h + 4v + i (one shift and
 *         mask puts a vector's fifth bits in place);
 *   Q8_0, Q6_K: [panels][K/32][2][8][32] int8: vector j of group g, byte 4c + i = column
 *         8g + c's block value 4j + i;
 *   scales as above. Every output is y = fma(float(sum q_w q_x), d_w * d_x, y) per G-value
 * block (Q6_K: each half of the activations' block), then for Q4_1 and Q5_1
 * y = fma(m_w, s_x, y), block after block in order; the integer sums are exact, so again
 * no result depends on the tile, the batch or the build.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

enum { TYPE_Q4_1 = 3, TYPE_Q5_1 = 7, TYPE_Q8_0 = 8, TYPE_Q6_K = 14 }; /* GGML type ids */

#if defined(__F16C__)
#include <immintrin.h>
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

enum { PANEL = 16, QBLOCK = 32 };
/* batches of up to IN_REGISTERS rows convert weights in registers; ROWS_PER_BLOCK rows of
 * x stay in L2 while a thread's panels pass */
enum { IN_REGISTERS = 4, ROWS_PER_BLOCK = 48 };
enum { SRC_F16, SRC_Q4_1, SRC_Q8_0, SRC_Q5_1, SRC_Q6_K }; /* weight formats */
enum { DOT = 256 }; /* type flag: int8 activations, values in dot-product order */

typedef struct {
    const float *x;
    const uint8_t *w;       /* float16 panels or quantized values */
    const uint16_t *scales; /* quantized formats only */
    float *y;
    int64_t M, K, N, panels;
    int64_t next; /* the first panel no thread has taken yet */
    int src, status;
    /* int8 activations (DOT): x quantized, [M][K] values, [M][K/32] d and s, and [M][K/16]
     * the integer sums of each half block's values */
    const int8_t *xq;
    const float *xd, *xs;
    const int32_t *xh;
} Matmul;

/* scales per block (d, m), values per scale, bytes per nibble group (Q5_1) */
static inline int64_t scale_rows(int src) { return src == SRC_Q4_1 || src == SRC_Q5_1 ? 2 : 1; }
static inline int64_t group_size(int src) { return src == SRC_Q6_K ? 16 : QBLOCK; }
static inline int has_min(int src) { return src == SRC_Q4_1 || src == SRC_Q5_1; }
enum { Q5_BLOCK_BYTES = 320, Q5_GROUP_BYTES = 160 };

/* the scales of `panel`'s block (G values) `block`: float16, or float32 for Q6_K */
static inline const char *scales_at(const uint16_t *scales, int64_t K, int64_t panel,
                                    int64_t block, int src) {
    const int64_t index = (panel * (K / group_size(src)) + block) * scale_rows(src) * PANEL;
    return src == SRC_Q6_K ? (const char *)((const float *)scales + index)
                           : (const char *)(scales + index);
}

#if defined(HAVE_AVX2) && defined(__F16C__)
#define INLINE static inline __attribute__((always_inline))

/* Unsigned-by-signed byte products summed in fours into 32-bit lanes, added to acc: one
 * instruction where the compiler targets VNNI (AVX-VNNI, or AVX-512 VNNI with VL; -march=native
 * on a CPU that has it), else maddubs and madd. No pair of products here comes near int16's
 * limit (at most 2 x 128 x 127), so maddubs never saturates and both give the same exact
 * sums: no result depends on which the build has. */
#if defined(__AVXVNNI__)
#define HAVE_VNNI 1
INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#else
#define HAVE_VNNI 0
INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

/* the block's scales of `panel` as floats: dm[0..15] = d, dm[16..31] = m (Q4_1, Q5_1) */
INLINE void block_scales(const Matmul *p, int64_t panel, int64_t block, const int src, float *dm) {
    const char *sc = scales_at(p->scales, p->K, panel, block, src);
    if (src == SRC_Q6_K) {
        memcpy(dm, sc, sizeof(float) * PANEL);
        return;
    }
    for (int i = 0; i < 2 * scale_rows(src); i++)
        _mm256_storeu_ps(dm + 8 * i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc + i)));
}

/* bit b of every byte of `plane` moved to bit 4 (value 16), the rest cleared */
INLINE __m256i fifth_bits(__m256i plane, const int b) {
    const __m256i at = b <= 4 ? _mm256_slli_epi16(plane, 4 - b) : _mm256_srli_epi16(plane, b - 4);
    return _mm256_and_si256(at, _mm256_set1_epi8(16));
}

/* the 16 weights of `panel` at k as floats (columns 0-7, 8-15) */
INLINE void weights_at(const Matmul *p, int64_t panel, int64_t k, const int src, const float *dm,
                       __m256 *lo, __m256 *hi) {
    if (src == SRC_F16) {
        const uint16_t *w = (const uint16_t *)p->w + (panel * p->K + k) * PANEL;
        *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
        *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 8)));
    } else if (src == SRC_Q4_1 || src == SRC_Q5_1) {
        const uint8_t *b = p->w + (panel * p->K + k) * 8;
        __m256i fifth_lo = _mm256_setzero_si256(), fifth_hi = fifth_lo;
        if (src == SRC_Q5_1) {
            const uint8_t *base = p->w + (panel * (p->K / QBLOCK) + k / QBLOCK) * Q5_BLOCK_BYTES;
            uint16_t bits;
            memcpy(&bits, base + 256 + (k % QBLOCK) * 2, sizeof bits);
            b = base + (k % QBLOCK) * 8;
            /* column j's bit moved to bit 4 (value 16) */
            const __m256i all = _mm256_set1_epi32((int32_t)bits << 4), sixteen = _mm256_set1_epi32(16);
            fifth_lo = _mm256_and_si256(_mm256_srlv_epi32(all, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), sixteen);
            fifth_hi = _mm256_and_si256(_mm256_srlv_epi32(all, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)), sixteen);
        }
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
        const __m256 qlo = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(15)), fifth_lo));
        const __m256 qhi = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(v, 4), fifth_hi));
        *lo = _mm256_fmadd_ps(_mm256_loadu_ps(dm), qlo, _mm256_loadu_ps(dm + 16));
        *hi = _mm256_fmadd_ps(_mm256_loadu_ps(dm + 8), qhi, _mm256_loadu_ps(dm + 24));
    } else { /* Q8_0, Q6_K */
        const uint8_t *b = p->w + (panel * p->K + k) * 16;
        const __m256 qlo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b)));
        const __m256 qhi =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8))));
        *lo = _mm256_mul_ps(_mm256_loadu_ps(dm), qlo);
        *hi = _mm256_mul_ps(_mm256_loadu_ps(dm + 8), qhi);
    }
}

INLINE void store_tile(const Matmul *p, int64_t m, int64_t panel, const int R, const int P,
                       __m256 acc[8][8]) {
    const int64_t col = panel * PANEL, valid = p->N - col;
    for (int r = 0; r < R; r++) {
        float *y = p->y + (m + r) * p->N + col;
        if (valid >= PANEL * P) {
            for (int c = 0; c < 2 * P; c++) _mm256_storeu_ps(y + 8 * c, acc[r][c]);
        } else {
            float tmp[8 * 8];
            for (int c = 0; c < 2 * P; c++) _mm256_storeu_ps(tmp + 8 * c, acc[r][c]);
            memcpy(y, tmp, sizeof(float) * valid);
        }
    }
}

/* bytes of one panel's 16 weights at one k (Q5_1: on average) */
INLINE int64_t weight_bytes(const int src) {
    return src == SRC_F16 ? 32 : src == SRC_Q4_1 ? 8 : src == SRC_Q5_1 ? 10 : 16;
}

/* Batches of 1-2 rows read the weights once, faster than the hardware prefetcher fetches
 * them: ask for the line PREFETCH_BYTES ahead in the panel (and the next block's scales)
 * (docs/benchmarks.md, "Native CPU kernels"). The int8 tiles do so in the first row tile
 * of each block of rows, the one that brings a panel in from memory (dot_tile). */
enum { PREFETCH_BYTES = 512 };
/* Besides the line PREFETCH_BYTES ahead into L1, the tiles ask for the line
 * FAR_PREFETCH_BYTES ahead into L2: a core's misses then stay in flight while it
 * multiplies, where on their own the loads and the products took turns (batch 1 streams
 * the whole model every step, ~85 MB for the bundled one; docs/benchmarks.md, "Far
 * prefetch"). */
enum { FAR_PREFETCH_BYTES = 2048 };
INLINE void prefetch_values(const uint8_t *at) {
    _mm_prefetch((const char *)at + PREFETCH_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char *)at + FAR_PREFETCH_BYTES, _MM_HINT_T1);
}

INLINE void prefetch(const Matmul *p, int64_t panel, int64_t k, const int src) {
    prefetch_values(p->w + (panel * p->K + k) * weight_bytes(src));
    if (src != SRC_F16 && (k & (group_size(src) - 1)) == 0) {
        const char *sc = scales_at(p->scales, p->K, panel, k / group_size(src), src);
        _mm_prefetch(sc + PREFETCH_BYTES / 4, _MM_HINT_T0);
    }
}

/* R rows (from m) by P panels (from panel), weights converted in registers */
INLINE void tile_in_registers(const Matmul *p, int64_t m, int64_t panel, const int R,
                              const int P, const int src) {
    const int64_t K = p->K, step = src == SRC_F16 ? K : group_size(src);
    const int64_t every = src == SRC_F16 ? 2 : src == SRC_Q4_1 ? 8 : 4; /* k per cache line */
    const float *x = p->x + m * K;
    __m256 acc[8][8];
    float dm[4][2 * PANEL];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * P; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += step) {
        if (src != SRC_F16)
            for (int pp = 0; pp < P; pp++) block_scales(p, panel + pp, k0 / step, src, dm[pp]);
        for (int64_t k = k0; k < k0 + step; k++) {
            __m256 w[8];
            if (R <= 2 && (k & (every - 1)) == 0) /* a cache line per panel */
                for (int pp = 0; pp < P; pp++) prefetch(p, panel + pp, k, src);
            for (int pp = 0; pp < P; pp++)
                weights_at(p, panel + pp, k, src, dm[pp], &w[2 * pp], &w[2 * pp + 1]);
            for (int r = 0; r < R; r++) {
                const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
                for (int c = 0; c < 2 * P; c++) acc[r][c] = _mm256_fmadd_ps(w[c], xb, acc[r][c]);
            }
        }
    }
    store_tile(p, m, panel, R, P, acc);
}

/* R rows (from m) by one panel whose weights are floats in wbuf [K][16] */
INLINE void tile_from_buffer(const Matmul *p, int64_t m, int64_t panel, const int R,
                             const float *wbuf) {
    const int64_t K = p->K;
    const float *x = p->x + m * K;
    __m256 acc[8][8];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 lo = _mm256_loadu_ps(wbuf + k * PANEL), hi = _mm256_loadu_ps(wbuf + k * PANEL + 8);
        for (int r = 0; r < R; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
            acc[r][0] = _mm256_fmadd_ps(lo, xb, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(hi, xb, acc[r][1]);
        }
    }
    store_tile(p, m, panel, R, 1, acc);
}

INLINE void convert_panel(const Matmul *p, int64_t panel, const int src, float *wbuf) {
    const int64_t K = p->K, step = src == SRC_F16 ? K : group_size(src);
    float dm[2 * PANEL];
    for (int64_t k0 = 0; k0 < K; k0 += step) {
        if (src != SRC_F16) block_scales(p, panel, k0 / step, src, dm);
        for (int64_t k = k0; k < k0 + step; k++) {
            __m256 lo, hi;
            weights_at(p, panel, k, src, dm, &lo, &hi);
            _mm256_storeu_ps(wbuf + k * PANEL, lo);
            _mm256_storeu_ps(wbuf + k * PANEL + 8, hi);
        }
    }
}

INLINE void run_panels(const Matmul *p, int64_t begin, int64_t end, const int src, float *wbuf) {
    for (int64_t m0 = 0; m0 < p->M; m0 += ROWS_PER_BLOCK) {
        const int64_t m1 = m0 + ROWS_PER_BLOCK < p->M ? m0 + ROWS_PER_BLOCK : p->M;
        const int64_t rows = m1 - m0;
        /* in registers, one row takes 4 float16 panels at a time (2 quantized), two rows 2 */
        const int wide = src == SRC_F16 ? 4 : 2;
        if (rows <= IN_REGISTERS) {
            int64_t panel = begin;
            if (rows == 1)
                for (; panel + wide <= end; panel += wide) tile_in_registers(p, m0, panel, 1, wide, src);
            if (rows == 2)
                for (; panel + 2 <= end; panel += 2) tile_in_registers(p, m0, panel, 2, 2, src);
            for (; panel < end; panel++) {
                switch (rows) {
                case 1: tile_in_registers(p, m0, panel, 1, 1, src); break;
                case 2: tile_in_registers(p, m0, panel, 2, 1, src); break;
                case 3: tile_in_registers(p, m0, panel, 3, 1, src); break;
                default: tile_in_registers(p, m0, panel, 4, 1, src); break;
                }
            }
            continue;
        }
        for (int64_t panel = begin; panel < end; panel++) {
            convert_panel(p, panel, src, wbuf);
            int64_t m = m0;
            for (; m + 6 <= m1; m += 6) tile_from_buffer(p, m, panel, 6, wbuf);
            switch (m1 - m) {
            case 5: tile_from_buffer(p, m, panel, 5, wbuf); break;
            case 4: tile_from_buffer(p, m, panel, 4, wbuf); break;
            case 3: tile_from_buffer(p, m, panel, 3, wbuf); break;
            case 2: tile_from_buffer(p, m, panel, 2, wbuf); break;
            case 1: tile_from_buffer(p, m, panel, 1, wbuf); break;
            }
        }
    }
}

/* ---- int8 activations (DOT) ---- */

/* the sum of 8 int32 lanes */
INLINE int32_t lane_sum(__m256i v) {
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
    return _mm_cvtsi128_si32(t4);
}

/* x [blocks][32] -> q, d, s per block (the header's formula; cvtps rounds to nearest even,
 * as nearbyintf does in the portable path), and h, the sums of q over each half block */

static void quantize_blocks(const float *x, int64_t blocks, int8_t *q, float *d, float *s, int32_t *h) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < blocks; b++) {
        const float *v = x + b * QBLOCK;
        __m256 a[4];
        for (int i = 0; i < 4; i++) a[i] = _mm256_loadu_ps(v + 8 * i);
        __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float top = _mm_cvtss_f32(m4);
        const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        __m256i n[4];
        for (int i = 0; i < 4; i++) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], inv));
        h[2 * b] = lane_sum(_mm256_add_epi32(n[0], n[1]));
        h[2 * b + 1] = lane_sum(_mm256_add_epi32(n[2], n[3]));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
        _mm256_storeu_si256((__m256i *)(q + b * QBLOCK), _mm256_permutevar8x32_epi32(bytes, order));
        d[b] = top / 127.0f;
        s[b] = d[b] * (float)(h[2 * b] + h[2 * b + 1]);
    }
}

INLINE int32_t load4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* acc += float(sum) * (d_w * d_x) (+ m_w * s_x): one block's (Q6_K: half block's) step */
INLINE void dot_step(const Matmul *p, int64_t m, int64_t panel, const int R, const int P,
                     const int src, int64_t b, int64_t scale_block, __m256i sum[8][4], __m256 acc[8][8]) {
    const int64_t blocks = p->K / QBLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    float dm[2][2 * PANEL];
    for (int pp = 0; pp < P; pp++) block_scales(p, panel + pp, scale_block, src, dm[pp]);
    for (int r = 0; r < R; r++) {
        const __m256 xd = _mm256_broadcast_ss(p->xd + (m + r) * blocks + b);
        const __m256 xs = _mm256_broadcast_ss(p->xs + (m + r) * blocks + b);
        for (int c = 0; c < 2 * P; c++) {
            /* Q4_1 without VNNI sums in 16 bits (dot_tile) */
            const __m256i isum = src == SRC_Q4_1 && !HAVE_VNNI ? _mm256_madd_epi16(sum[r][c], ones) : sum[r][c];
            const float *d = dm[c / 2] + 8 * (c % 2);
            acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(_mm256_loadu_ps(d), xd), acc[r][c]);
            if (has_min(src)) acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(d + PANEL), xs, acc[r][c]);
        }
    }
}

/* rows of x per int8 tile: 8 where 32 vector registers hold their sums (AVX-512 VL), else 4 */
#if defined(__AVX512VL__)
#define DOT_ROWS 8
#define SUM_IN_REGISTER(x) "+v"(x)
#else
#define DOT_ROWS 4
#define SUM_IN_REGISTER(x) "+x"(x)
#endif

/* Signed weights (Q8_0, Q6_K) with VNNI go into the dot products as w + 128 (unsigned, as
 * the instruction takes them), one instruction a product instead of two (|w| and a sign
 * moved onto x): sum((w + 128) x) - 128 sum(x) = sum(w x), the same exact integer sums.
 * This takes 128 x (the sum of the rows' values over half blocks [half, half + halves)) off
 * each row's sums; nothing for other formats or builds. */
INLINE void unbias(const Matmul *p, int64_t m, const int R, const int P, const int src,
                   int64_t half, const int halves, __m256i sum[8][4]) {
    if (!HAVE_VNNI || (src != SRC_Q8_0 && src != SRC_Q6_K)) return;
    for (int r = 0; r < R; r++) {
        const int32_t *h = p->xh + (m + r) * (p->K / 16) + half;
        const __m256i bias = _mm256_set1_epi32(128 * (halves == 2 ? h[0] + h[1] : h[0]));
        for (int c = 0; c < 2 * P; c++) sum[r][c] = _mm256_sub_epi32(sum[r][c], bias);
    }
}

/* bytes of a group of 8 columns' values in one block, dot-product order */
INLINE int64_t dot_group_bytes(const int src) {
    return src == SRC_Q4_1 ? 128 : src == SRC_Q5_1 ? Q5_GROUP_BYTES : 256;
}

/* R rows (from m) by P panels (from panel) of values in dot-product order.
 * Q4_1: u8 nibbles times s8 activations (maddubs), 16-bit sums over a block (at most
 * 8 x 2 x 15 x 127 = 30480); Q5_1: u8 5-bit values, 16-bit sums of 4 products (at most
 * 4 x 31 x 127 = 15748) added up in 32 bits; Q8_0 and Q6_K: |w| times sign(w) x, 32-bit
 * sums (Q6_K: one per 16 values, each with its own scale). With VNNI every format sums
 * straight into 32 bits (dot_u8s8), the same exact sums. */
INLINE void dot_tile(const Matmul *p, int64_t m, int64_t panel, const int R, const int P, const int src) {
    const int64_t K = p->K, blocks = K / QBLOCK;
    const int vectors = src == SRC_Q4_1 || src == SRC_Q5_1 ? 4 : 8; /* per group of 8 columns and block */
    const int64_t gb = dot_group_bytes(src);
    const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[8][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * P; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i sum[8][4];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 2 * P; c++) sum[r][c] = _mm256_setzero_si256();
        for (int v = 0; v < vectors; v++) {
            __m256i w[4], w2[4];
            for (int c = 0; c < 2 * P; c++) {
                const uint8_t *group = p->w + (((panel + c / 2) * blocks + b) * 2 + c % 2) * gb;
                const uint8_t *at = group + v * 32;
                if ((R == 1 || m % ROWS_PER_BLOCK == 0) && (v & 1) == 0) prefetch_values(at);
                const __m256i raw = _mm256_loadu_si256((const __m256i *)at);
                if (src == SRC_Q4_1 || src == SRC_Q5_1) {
                    w[c] = _mm256_and_si256(raw, nibble);
                    w2[c] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
                    if (src == SRC_Q5_1) {
                        const __m256i plane = _mm256_loadu_si256((const __m256i *)(group + 128));
                        switch (v) { /* constant shifts once the loop is unrolled */
                        case 0: w[c] = _mm256_or_si256(w[c], fifth_bits(plane, 0)), w2[c] = _mm256_or_si256(w2[c], fifth_bits(plane, 1)); break;
                        case 1: w[c] = _mm256_or_si256(w[c], fifth_bits(plane, 2)), w2[c] = _mm256_or_si256(w2[c], fifth_bits(plane, 3)); break;
                        case 2: w[c] = _mm256_or_si256(w[c], fifth_bits(plane, 4)), w2[c] = _mm256_or_si256(w2[c], fifth_bits(plane, 5)); break;
                        default: w[c] = _mm256_or_si256(w[c], fifth_bits(plane, 6)), w2[c] = _mm256_or_si256(w2[c], fifth_bits(plane, 7)); break;
                        }
                    }
                } else if (HAVE_VNNI) { /* w + 128, unsigned: unbias takes 128 sum(x) off */
                    w[c] = _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80));
                } else {
                    w[c] = _mm256_abs_epi8(raw);
                    w2[c] = raw;
                }
            }
            for (int r = 0; r < R; r++) {
                const int8_t *xq = p->xq + (m + r) * K + b * QBLOCK;
                if (src == SRC_Q4_1 || src == SRC_Q5_1) {
                    const __m256i lo = _mm256_set1_epi32(load4(xq + 4 * v)), hi = _mm256_set1_epi32(load4(xq + 16 + 4 * v));
                    for (int c = 0; c < 2 * P; c++) {
                        if (HAVE_VNNI) { /* 32-bit sums at once */
                            sum[r][c] = dot_u8s8(dot_u8s8(sum[r][c], w[c], lo), w2[c], hi);
                            continue;
                        }
                        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w[c], lo),
                                                               _mm256_maddubs_epi16(w2[c], hi));
                        sum[r][c] = src == SRC_Q4_1 ? _mm256_add_epi16(sum[r][c], pairs)
                                                    : _mm256_add_epi32(sum[r][c], _mm256_madd_epi16(pairs, ones));
                    }
                } else {
                    const __m256i a = _mm256_set1_epi32(load4(xq + 4 * v));
                    for (int c = 0; c < 2 * P; c++)
                        sum[r][c] = HAVE_VNNI ? dot_u8s8(sum[r][c], w[c], a)
                                              : dot_u8s8(sum[r][c], w[c], _mm256_sign_epi8(a, w2[c]));
                }
                /* the sums stay in registers: left alone, GCC defers the integer adds and
                 * spills every product first, far slower */
                for (int c = 0; c < 2 * P; c++) __asm__("" : SUM_IN_REGISTER(sum[r][c]));
            }
            if (src == SRC_Q6_K && v == 3) { /* the block's first 16 values: their own scale */
                unbias(p, m, R, P, src, 2 * b, 1, sum);
                dot_step(p, m, panel, R, P, src, b, 2 * b, sum, acc);
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < 2 * P; c++) sum[r][c] = _mm256_setzero_si256();
            }
        }
        if (src == SRC_Q6_K) unbias(p, m, R, P, src, 2 * b + 1, 1, sum);
        else unbias(p, m, R, P, src, 2 * b, 2, sum);
        dot_step(p, m, panel, R, P, src, b, src == SRC_Q6_K ? 2 * b + 1 : b, sum, acc);
    }
    store_tile(p, m, panel, R, P, acc);
}

/* one row: two panels at a time; more: 4-row tiles while a panel's values stay in L1 */
INLINE void run_dot_panels(const Matmul *p, int64_t begin, int64_t end, const int src) {
    for (int64_t m0 = 0; m0 < p->M; m0 += ROWS_PER_BLOCK) {
        const int64_t m1 = m0 + ROWS_PER_BLOCK < p->M ? m0 + ROWS_PER_BLOCK : p->M;
        int64_t panel = begin;
        if (m1 - m0 == 1)
            for (; panel + 2 <= end; panel += 2) dot_tile(p, m0, panel, 1, 2, src);
        for (; panel < end; panel++) {
            int64_t m = m0;
            for (; m + DOT_ROWS <= m1; m += DOT_ROWS) dot_tile(p, m, panel, DOT_ROWS, 1, src);
            switch (m1 - m) {
#if DOT_ROWS == 8
            case 7: dot_tile(p, m, panel, 7, 1, src); break;
            case 6: dot_tile(p, m, panel, 6, 1, src); break;
            case 5: dot_tile(p, m, panel, 5, 1, src); break;
            case 4: dot_tile(p, m, panel, 4, 1, src); break;
#endif
            case 3: dot_tile(p, m, panel, 3, 1, src); break;
            case 2: dot_tile(p, m, panel, 2, 1, src); break;
            case 1: dot_tile(p, m, panel, 1, 1, src); break;
            }
        }
    }
}

/* Threads take chunks of panels until none are left: a thread the OS preempts (the server's
 * own threads share these cores) delays the call by one chunk, not by its whole share. */
static void matmul_job(void *arg, int index, int count) {
    Matmul *p = arg;
    (void)index, (void)count;
    const int64_t chunk = p->M > ROWS_PER_BLOCK ? 16 : 4; /* big batches: x stays in L2 longer */
    float *wbuf = NULL;
    if (p->xq == NULL && p->M > IN_REGISTERS && (wbuf = malloc(sizeof(float) * PANEL * p->K)) == NULL) {
        __atomic_fetch_or(&p->status, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        const int64_t begin = __atomic_fetch_add(&p->next, chunk, __ATOMIC_RELAXED);
        if (begin >= p->panels) break;
        const int64_t end = begin + chunk < p->panels ? begin + chunk : p->panels;
        if (p->xq != NULL) {
            switch (p->src) {
            case SRC_Q4_1: run_dot_panels(p, begin, end, SRC_Q4_1); break;
            case SRC_Q5_1: run_dot_panels(p, begin, end, SRC_Q5_1); break;
            case SRC_Q6_K: run_dot_panels(p, begin, end, SRC_Q6_K); break;
            default: run_dot_panels(p, begin, end, SRC_Q8_0); break;
            }
            continue;
        }
        switch (p->src) {
        case SRC_F16: run_panels(p, begin, end, SRC_F16, wbuf); break;
        case SRC_Q4_1: run_panels(p, begin, end, SRC_Q4_1, wbuf); break;
        case SRC_Q5_1: run_panels(p, begin, end, SRC_Q5_1, wbuf); break;
        case SRC_Q6_K: run_panels(p, begin, end, SRC_Q6_K, wbuf); break;
        default: run_panels(p, begin, end, SRC_Q8_0, wbuf); break;
        }
    }
    free(wbuf);
}
#else /* portable: the same chain per output, one output at a time */
static void quantize_blocks(const float *x, int64_t blocks, int8_t *q, float *d, float *s, int32_t *h) {
    for (int64_t b = 0; b < blocks; b++) {
        const float *v = x + b * QBLOCK;
        float top = 0.0f;
        for (int i = 0; i < QBLOCK; i++) top = __builtin_fmaxf(top, __builtin_fabsf(v[i]));
        const float inv = top > 0.0f ? 127.0f / top : 0.0f;
        h[2 * b] = h[2 * b + 1] = 0;
        for (int i = 0; i < QBLOCK; i++) {
            q[b * QBLOCK + i] = (int8_t)__builtin_nearbyintf(v[i] * inv);
            h[2 * b + i / 16] += q[b * QBLOCK + i];
        }
        d[b] = top / 127.0f;
        s[b] = d[b] * (float)(h[2 * b] + h[2 * b + 1]);
    }
}

/* scale `row` (0: d, 1: m) of column n's G-value block `block` */
static float scale_of(const Matmul *p, int64_t n, int64_t block, int row) {
    const char *sc = scales_at(p->scales, p->K, n / PANEL, block, p->src);
    if (p->src == SRC_Q6_K) return ((const float *)sc)[n % PANEL];
    return half_to_float(((const uint16_t *)sc)[row * PANEL + n % PANEL]);
}

/* the quantized value of column n at k, values in dot-product order */
static int32_t dot_value_at(const Matmul *p, int64_t n, int64_t k) {
    const int64_t panel = n / PANEL, group = n % PANEL / 8, c = n % 8, b = k / QBLOCK, i = k % QBLOCK;
    const int64_t blocks = p->K / QBLOCK;
    const int64_t gb = p->src == SRC_Q4_1 ? 128 : p->src == SRC_Q5_1 ? Q5_GROUP_BYTES : 256;
    const uint8_t *at = p->w + ((panel * blocks + b) * 2 + group) * gb;
    if (p->src == SRC_Q8_0 || p->src == SRC_Q6_K) return ((const int8_t *)at)[i / 4 * 32 + c * 4 + i % 4];
    const uint8_t byte = at[i % 16 / 4 * 32 + c * 4 + i % 4];
    int32_t q = i < 16 ? byte & 15 : byte >> 4;
    if (p->src == SRC_Q5_1) q |= (at[128 + c * 4 + i % 4] >> (2 * (i % 16 / 4) + (i >= 16)) & 1) << 4;
    return q;
}

static float dot_output(const Matmul *p, int64_t m, int64_t n) {
    const int64_t blocks = p->K / QBLOCK, G = group_size(p->src);
    float acc = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t g = b * QBLOCK; g < (b + 1) * QBLOCK; g += G) { /* Q6_K: two halves */
            int32_t isum = 0;
            for (int64_t k = g; k < g + G; k++) isum += dot_value_at(p, n, k) * p->xq[m * p->K + k];
            acc = __builtin_fmaf((float)isum, scale_of(p, n, g / G, 0) * p->xd[m * blocks + b], acc);
        }
        if (has_min(p->src)) acc = __builtin_fmaf(scale_of(p, n, b, 1), p->xs[m * blocks + b], acc);
    }
    return acc;
}

static float weight_at(const Matmul *p, int64_t n, int64_t k) {
    const int64_t panel = n / PANEL, j = n % PANEL, block = k / group_size(p->src);
    if (p->src == SRC_F16) return half_to_float(((const uint16_t *)p->w)[(panel * p->K + k) * PANEL + j]);
    if (p->src == SRC_Q4_1 || p->src == SRC_Q5_1) {
        int32_t q;
        if (p->src == SRC_Q4_1) {
            const uint8_t byte = p->w[(panel * p->K + k) * 8 + j % 8];
            q = j < 8 ? byte & 15 : byte >> 4;
        } else {
            const uint8_t *base = p->w + (panel * (p->K / QBLOCK) + k / QBLOCK) * Q5_BLOCK_BYTES;
            const uint8_t byte = base[(k % QBLOCK) * 8 + j % 8];
            uint16_t bits;
            memcpy(&bits, base + 256 + (k % QBLOCK) * 2, sizeof bits);
            q = (j < 8 ? byte & 15 : byte >> 4) | ((bits >> j) & 1) << 4;
        }
        return __builtin_fmaf(scale_of(p, n, block, 0), (float)q, scale_of(p, n, block, 1));
    }
    return scale_of(p, n, block, 0) * (float)((const int8_t *)p->w)[(panel * p->K + k) * PANEL + j];
}

static void matmul_job(void *arg, int index, int count) {
    Matmul *p = arg;
    const int64_t begin = p->panels * index / count * PANEL;
    const int64_t end_panel = p->panels * (index + 1) / count * PANEL;
    const int64_t end = end_panel < p->N ? end_panel : p->N;
    for (int64_t m = 0; m < p->M; m++)
        for (int64_t n = begin; n < end; n++) {
            if (p->xq != NULL) {
                p->y[m * p->N + n] = dot_output(p, m, n);
                continue;
            }
            float acc = 0.0f;
            for (int64_t k = 0; k < p->K; k++)
                acc = __builtin_fmaf(weight_at(p, n, k), p->x[m * p->K + k], acc);
            p->y[m * p->N + n] = acc;
        }
}
#endif

/* Activations to int8 blocks: a prefill chunk's (thousands of blocks) split over threads,
 * each block on its own, so the result does not depend on the split. */
enum { QUANTIZE_BLOCKS_PER_THREAD = 1024 };
typedef struct {
    const float *x;
    int64_t blocks;
    int8_t *q;
    float *d, *s;
    int32_t *h;
} Quantize;

static void quantize_job(void *arg, int index, int count) {
    const Quantize *j = arg;
    const int64_t begin = j->blocks * index / count, end = j->blocks * (index + 1) / count;
    quantize_blocks(j->x + begin * QBLOCK, end - begin, j->q + begin * QBLOCK, j->d + begin, j->s + begin,
                    j->h + 2 * begin);
}

static int matmul(Matmul *p, const float *bias, int n_threads) {
    n_threads = n_threads < 1 ? 1 : n_threads;
    if (n_threads > p->panels) n_threads = (int)p->panels;
    parallel(matmul_job, p, n_threads);
    if (bias != NULL && p->status == 0)
        for (int64_t m = 0; m < p->M; m++)
            for (int64_t n = 0; n < p->N; n++) p->y[m * p->N + n] += bias[n];
    return p->status;
}

/* y [M, N] = x [M, K] W^T (+ bias [N]), W float16 panels. Returns 0, or 1 on a bad shape
 * or no memory. */
int tm_f16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                  const float *bias, float *y, int n_threads) {
    if (M < 1 || K < 1 || N < 1) return 1;
    Matmul p = {x, (const uint8_t *)w, NULL, y, M, K, N, (N + PANEL - 1) / PANEL, 0, SRC_F16, 0, NULL, NULL, NULL, NULL};
    return matmul(&p, bias, n_threads);
}

/* y [M, N] = x [M, K] W^T (+ bias [N]), W repacked GGML `type` blocks (type | DOT: int8
 * activations, values in dot-product order). Returns 0, or 1 on an unsupported type or
 * shape, or no memory. */
int tm_quant_matmul(const float *x, int64_t M, int64_t K, const uint8_t *values,
                    const uint16_t *scales, int64_t N, int type, const float *bias, float *y,
                    int n_threads) {
    const int dot = (type & DOT) != 0;
    type &= ~DOT;
    const int src = type == TYPE_Q4_1 ? SRC_Q4_1 : type == TYPE_Q8_0 ? SRC_Q8_0
                  : type == TYPE_Q5_1 ? SRC_Q5_1 : type == TYPE_Q6_K ? SRC_Q6_K : -1;
    if (src < 0 || K % QBLOCK != 0 || K < 1 || M < 1 || N < 1) return 1;
    Matmul p = {x, values, scales, y, M, K, N, (N + PANEL - 1) / PANEL, 0, src, 0, NULL, NULL, NULL, NULL};
    if (!dot) return matmul(&p, bias, n_threads);
    const int64_t blocks = M * K / QBLOCK;
    int8_t *xq = malloc(M * K + 2 * sizeof(float) * blocks + 2 * sizeof(int32_t) * blocks);
    if (xq == NULL) return 1;
    float *xd = (float *)(xq + M * K), *xs = xd + blocks;
    int32_t *xh = (int32_t *)(xs + blocks);
    Quantize job = {x, blocks, xq, xd, xs, xh};
    const int64_t parts = blocks / QUANTIZE_BLOCKS_PER_THREAD;
    parallel(quantize_job, &job, (int)(parts < n_threads ? (parts < 1 ? 1 : parts) : n_threads));
    p.xq = xq, p.xd = xd, p.xs = xs, p.xh = xh;
    const int status = matmul(&p, bias, n_threads);
    free(xq);
    return status;
}

/* 1 when built with the AVX2/FMA/F16C tiles; 0 for the portable (slow, scalar) path */
int tm_matmul_vectorized(void) {
#if defined(HAVE_AVX2) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

/* Whether the int8 dot products run on VNNI instructions (dot_u8s8) in this build. */
int tm_matmul_vnni(void) {
#if defined(HAVE_AVX2) && defined(__F16C__)
    return HAVE_VNNI;
#else
    return 0;
#endif
}
