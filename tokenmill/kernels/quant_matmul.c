/* y = x W^T (+ bias) with W kept in its GGUF block format (Q4_1, Q8_0), x float32.
 *
 * Each pair of weight rows is dequantized to float32 exactly as the reference does it
 * (w = d * q + m per 32-weight block) into a small buffer, then multiplied with the rows
 * of x, four at a time, in 8-lane vector sums. Every output element is summed in the same
 * order whatever the number of rows of x: a row's result never depends on its batch.
 * Work is split over weight rows across threads (parallel.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

enum { TYPE_Q4_1 = 3, TYPE_Q8_0 = 8 }; /* GGML type ids */

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

static uint16_t read_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

/* One weight row of K values -> out[K] float32: d * q + m (Q4_1) or d * q (Q8_0), a
 * multiply then an add, as gguf-py's reference dequantization rounds them. */
static void dequantize_row(const uint8_t *row, int type, int64_t K, float *out) {
    for (int64_t b = 0; b < K / 32; b++, out += 32) {
        if (type == TYPE_Q4_1) {
            const uint8_t *blk = row + b * 20, *qs = blk + 4;
            const float d = half_to_float(read_u16(blk)), m = half_to_float(read_u16(blk + 2));
#ifdef HAVE_AVX2
            const __m128i packed = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(15);
            const __m128i lo = _mm_and_si128(packed, mask);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
            const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int i = 0; i < 4; i++) {
                const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
                _mm256_storeu_ps(out + 8 * i, _mm256_add_ps(_mm256_mul_ps(dv, q), mv));
            }
#else
            for (int j = 0; j < 16; j++) {
                volatile float lo = d * (float)(qs[j] & 15), hi = d * (float)(qs[j] >> 4);
                out[j] = lo + m;
                out[j + 16] = hi + m;
            }
#endif
        } else {
            const uint8_t *blk = row + b * 34;
            const int8_t *qs = (const int8_t *)(blk + 2);
            const float d = half_to_float(read_u16(blk));
            for (int j = 0; j < 32; j++) out[j] = d * (float)qs[j];
        }
    }
}

/* The same accumulation for every output element, in one row or four: per 8-lane vector,
 * acc = fma(w, x, acc) over k in order, then a fixed-order sum of the lanes. */
#ifdef HAVE_AVX2
static inline float hsum(__m256 v) {
    float l[8];
    _mm256_storeu_ps(l, v);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* rows x0..x3 against weight rows w0, w1: y_r[0], y_r[1] */
static void tile4(const float *const x[4], const float *w0, const float *w1, int64_t K,
                  float *const y[4], int two) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
           a30 = a00, a31 = a00;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 u = _mm256_loadu_ps(w0 + k), v = _mm256_loadu_ps(w1 + k);
        __m256 xv = _mm256_loadu_ps(x0 + k);
        a00 = _mm256_fmadd_ps(u, xv, a00);
        a01 = _mm256_fmadd_ps(v, xv, a01);
        xv = _mm256_loadu_ps(x1 + k);
        a10 = _mm256_fmadd_ps(u, xv, a10);
        a11 = _mm256_fmadd_ps(v, xv, a11);
        xv = _mm256_loadu_ps(x2 + k);
        a20 = _mm256_fmadd_ps(u, xv, a20);
        a21 = _mm256_fmadd_ps(v, xv, a21);
        xv = _mm256_loadu_ps(x3 + k);
        a30 = _mm256_fmadd_ps(u, xv, a30);
        a31 = _mm256_fmadd_ps(v, xv, a31);
    }
    y[0][0] = hsum(a00), y[1][0] = hsum(a10), y[2][0] = hsum(a20), y[3][0] = hsum(a30);
    if (two) y[0][1] = hsum(a01), y[1][1] = hsum(a11), y[2][1] = hsum(a21), y[3][1] = hsum(a31);
}

static void tile1(const float *x, const float *w0, const float *w1, int64_t K, float *y, int two) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
    }
    y[0] = hsum(a0);
    if (two) y[1] = hsum(a1);
}
#else /* portable: the same order, written out lane by lane */
static float dot8(const float *x, const float *w, int64_t K) {
    float l[8] = {0};
    for (int64_t k = 0; k < K; k += 8)
        for (int i = 0; i < 8; i++) l[i] = __builtin_fmaf(w[k + i], x[k + i], l[i]);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

static void tile1(const float *x, const float *w0, const float *w1, int64_t K, float *y, int two) {
    y[0] = dot8(x, w0, K);
    if (two) y[1] = dot8(x, w1, K);
}

static void tile4(const float *const x[4], const float *w0, const float *w1, int64_t K,
                  float *const y[4], int two) {
    for (int r = 0; r < 4; r++) tile1(x[r], w0, w1, K, y[r], two);
}
#endif

typedef struct {
    const float *x;
    const uint8_t *w;
    float *y;
    int64_t M, K, N, row_bytes;
    int type, status;
} Matmul;

static void matmul_part(const Matmul *p, int64_t n_begin, int64_t n_end, float *buf) {
    const int64_t K = p->K;
    for (int64_t n = n_begin; n < n_end; n += 2) {
        const int two = n + 1 < n_end;
        dequantize_row(p->w + n * p->row_bytes, p->type, K, buf);
        if (two)
            dequantize_row(p->w + (n + 1) * p->row_bytes, p->type, K, buf + K);
        else
            memset(buf + K, 0, sizeof(float) * K); /* the unused second row */
        int64_t m = 0;
        for (; m + 4 <= p->M; m += 4) {
            const float *x[4] = {p->x + m * K, p->x + (m + 1) * K, p->x + (m + 2) * K,
                                 p->x + (m + 3) * K};
            float *y[4] = {p->y + m * p->N + n, p->y + (m + 1) * p->N + n,
                           p->y + (m + 2) * p->N + n, p->y + (m + 3) * p->N + n};
            tile4(x, buf, buf + K, K, y, two);
        }
        for (; m < p->M; m++) tile1(p->x + m * K, buf, buf + K, K, p->y + m * p->N + n, two);
    }
}

static void matmul_job(void *arg, int index, int count) {
    Matmul *p = arg;
    /* split on even weight rows so pairs stay whole: the same pairs for every M */
    const int64_t pairs = (p->N + 1) / 2;
    const int64_t begin = 2 * (pairs * index / count), end = 2 * (pairs * (index + 1) / count);
    float *buf = malloc(sizeof(float) * 2 * p->K);
    if (buf == NULL) {
        p->status = 1;
        return;
    }
    matmul_part(p, begin, end < p->N ? end : p->N, buf);
    free(buf);
}

/* ---- float16 weights in panels of 16 output columns: W16 [ceil(N/16)][K][16] ----
 *
 * A tile is R rows of x by P panels (16 P columns): R x 2P vector accumulators, each output
 * summed as acc = fma(w[k], x[k], acc) for k = 0 .. K-1 in order in one lane. Whichever tile
 * covers an output, its value is the same: no result depends on the batch around its row.
 * R rows and P panels are compile-time constants, so the accumulators stay in registers.
 */
enum { PANEL = 16 };

typedef struct {
    const float *x;
    const uint16_t *w;
    float *y;
    int64_t M, K, N, panels;
    int status;
} F16Matmul;

#if defined(HAVE_AVX2) && defined(__F16C__)
static inline __attribute__((always_inline)) void f16_tile(const F16Matmul *p, int64_t m,
                                                           int64_t panel, const int R,
                                                           const int P) {
    const int64_t K = p->K;
    const float *x = p->x + m * K;
    const uint16_t *w = p->w + panel * K * PANEL;
    __m256 acc[6][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * P; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 wv[8];
        for (int c = 0; c < 2 * P; c++)
            wv[c] = _mm256_cvtph_ps(
                _mm_loadu_si128((const __m128i *)(w + (c / 2) * K * PANEL + k * PANEL + (c % 2) * 8)));
        for (int r = 0; r < R; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
            for (int c = 0; c < 2 * P; c++) acc[r][c] = _mm256_fmadd_ps(wv[c], xb, acc[r][c]);
        }
    }
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
#else /* portable: the same per-output order (one fma chain over k) */
static float half_at(const uint16_t *w) { return half_to_float(*w); }

static void f16_tile(const F16Matmul *p, int64_t m, int64_t panel, const int R, const int P) {
    const int64_t K = p->K;
    for (int r = 0; r < R; r++)
        for (int64_t c = 0; c < PANEL * P && panel * PANEL + c < p->N; c++) {
            const uint16_t *w = p->w + (panel + c / PANEL) * K * PANEL + c % PANEL;
            const float *x = p->x + (m + r) * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc = __builtin_fmaf(half_at(w + k * PANEL), x[k], acc);
            p->y[(m + r) * p->N + panel * PANEL + c] = acc;
        }
}
#endif

/* rows [m, m + rows) of x against panels [begin, end): the widest tile that fits */
static void f16_rows(const F16Matmul *p, int64_t m, int rows, int64_t begin, int64_t end) {
    int64_t panel = begin;
    switch (rows) {
    case 1:
        for (; panel + 4 <= end; panel += 4) f16_tile(p, m, panel, 1, 4);
        break;
    case 2:
        for (; panel + 2 <= end; panel += 2) f16_tile(p, m, panel, 2, 2);
        break;
    }
    for (; panel < end; panel++) {
        switch (rows) {
        case 1: f16_tile(p, m, panel, 1, 1); break;
        case 2: f16_tile(p, m, panel, 2, 1); break;
        case 3: f16_tile(p, m, panel, 3, 1); break;
        case 4: f16_tile(p, m, panel, 4, 1); break;
        case 5: f16_tile(p, m, panel, 5, 1); break;
        default: f16_tile(p, m, panel, 6, 1); break;
        }
    }
}

static void f16_job(void *arg, int index, int count) {
    const F16Matmul *p = arg;
    enum { ROWS_PER_BLOCK = 48 }; /* a block of x rows stays in L2 while the panels pass */
    const int64_t begin = p->panels * index / count, end = p->panels * (index + 1) / count;
    for (int64_t m0 = 0; m0 < p->M; m0 += ROWS_PER_BLOCK) {
        const int64_t m1 = m0 + ROWS_PER_BLOCK < p->M ? m0 + ROWS_PER_BLOCK : p->M;
        if (m1 - m0 <= 2) {
            for (int64_t m = m0; m < m1; m += 2) f16_rows(p, m, m1 - m < 2 ? 1 : 2, begin, end);
            continue;
        }
        for (int64_t panel = begin; panel < end; panel++)
            for (int64_t m = m0; m < m1; m += 6)
                f16_rows(p, m, m1 - m < 6 ? (int)(m1 - m) : 6, panel, panel + 1);
    }
}

/* y [M, N] = x [M, K] W^T (+ bias [N]); W float16 in panels (see above). Returns 0, or 1
 * on a bad shape. */
int tm_f16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                  const float *bias, float *y, int n_threads) {
    if (M < 1 || K < 1 || N < 1) return 1;
    F16Matmul p = {x, w, y, M, K, N, (N + PANEL - 1) / PANEL, 0};
    n_threads = n_threads < 1 ? 1 : n_threads;
    if (n_threads > p.panels) n_threads = (int)p.panels;
    parallel(f16_job, &p, n_threads);
    if (bias != NULL)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
    return p.status;
}

/* y [M, N] = x [M, K] W^T (+ bias [N]); W [N] rows of row_bytes in GGML `type`.
 * Returns 0, or 1 on an unsupported type or shape, or no memory. */
int tm_quant_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                    int64_t row_bytes, int type, const float *bias, float *y, int n_threads) {
    if ((type != TYPE_Q4_1 && type != TYPE_Q8_0) || K % 32 != 0 || M < 1) return 1;
    n_threads = n_threads < 1 ? 1 : n_threads;
    Matmul p = {x, w, y, M, K, N, row_bytes, type, 0};
    parallel(matmul_job, &p, n_threads);
    const int status = p.status;
    if (bias != NULL && status == 0)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
    return status;
}
