/* The element-wise work between a decoder layer's matmuls, one call each instead of a
 * dozen small torch ops: residual add + RMSNorm, rotary embedding + KV-cache write, and
 * SiLU(gate) * up; and the sampler's full-vocabulary passes: an inverse-CDF draw and the
 * greedy argmax. float32, row-major, one row (token) at a time, so a row's result never
 * depends on the other rows of the batch. The arithmetic follows the torch reference
 * (tokenmill/layers/norm.py, rotary.py, llama.py) operation by operation. Big calls (prefill
 * chunks) split their rows over the OpenMP threads torch uses (see parallel.h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_math.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

enum { PARALLEL_VALUES = 1 << 14 }; /* fewer values than this: one thread (no fork cost) */

/* residual[t] += x[t] (when add), then out[t] = residual[t] / rms(residual[t]) * weight */
int tm_add_rms_norm(const float *x, float *residual, const float *weight, float *out,
                    int64_t rows, int64_t size, float eps, int add) {
#pragma omp parallel for schedule(static) if (rows * size >= PARALLEL_VALUES)
    for (int64_t t = 0; t < rows; t++) {
        const float *xt = x + t * size;
        float *rt = residual + t * size, *ot = out + t * size;
        float lanes[8] = {0};
        int64_t c = 0;
        if (add)
            for (int64_t i = 0; i < size; i++) rt[i] = xt[i] + rt[i];
        for (; c + 8 <= size; c += 8)
            for (int i = 0; i < 8; i++) lanes[i] += rt[c + i] * rt[c + i];
        float sum = 0.0f;
        for (; c < size; c++) sum += rt[c] * rt[c];
        for (int i = 0; i < 8; i++) sum += lanes[i];
        const float inv = 1.0f / sqrtf(sum / (float)size + eps);
        for (int64_t i = 0; i < size; i++) ot[i] = weight[i] * (rt[i] * inv);
    }
    return 0;
}

/* out[t, i] = silu(gate_up[t, i]) * gate_up[t, size + i] */
int tm_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t size) {
#pragma omp parallel for schedule(static) if (rows * size >= PARALLEL_VALUES)
    for (int64_t t = 0; t < rows; t++) {
        const float *g = gate_up + t * 2 * size, *u = g + size;
        float *o = out + t * size;
        for (int64_t i = 0; i < size; i++) o[i] = g[i] / (1.0f + tm_exp(-g[i])) * u[i];
    }
    return 0;
}

/* n floats -> float16 (round to nearest even); only built with F16C */
static inline void store_half(uint16_t *to, const float *from, int64_t n) {
#if defined(__F16C__)
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(to + i), _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) to[i] = _cvtss_sh(from[i], _MM_FROUND_TO_NEAREST_INT);
#else
    (void)to, (void)from, (void)n;
#endif
}

/* Whether float16 caches can be written (tm_rope_and_cache's f16). */
int tm_rope_writes_f16(void) {
#if defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

/* One step's rows of qkv [T, (H + 2 Hkv) * D] (q | k | v): q and k rotated by their
 * token's position ("rotate half" layout, table cos_sin [P, 2, D]) into q_out [T, H, D]
 * and k_out [T, Hkv, D]; k and v also written to the caches [S, Hkv, D] at slots[t]
 * (float32, or float16 when f16: rounded to nearest). Returns 1 (writing nothing) on a
 * position or slot out of range, 2 on f16 without tm_rope_writes_f16. */
int tm_rope_and_cache(const float *qkv, const float *cos_sin, const int64_t *positions,
                      const int64_t *slots, float *q_out, float *k_out, void *k_cache,
                      void *v_cache, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t num_positions, int64_t num_slots, int f16) {
    const int64_t D = head_dim, half = D / 2, width = (num_heads + 2 * num_kv_heads) * D;
    if (f16 && !tm_rope_writes_f16()) return 2;
    for (int64_t t = 0; t < rows; t++)
        if (positions[t] < 0 || positions[t] >= num_positions || slots[t] < 0 ||
            slots[t] >= num_slots)
            return 1;
#pragma omp parallel for schedule(static) if (rows * width >= PARALLEL_VALUES)
    for (int64_t t = 0; t < rows; t++) {
        const float *row = qkv + t * width;
        const float *cos = cos_sin + positions[t] * 2 * D, *sin = cos + D;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            const float *x = row + h * D;
            float *y = h < num_heads ? q_out + (t * num_heads + h) * D
                                     : k_out + (t * num_kv_heads + h - num_heads) * D;
            for (int64_t d = 0; d < half; d++) y[d] = x[d] * cos[d] + x[d + half] * -sin[d];
            for (int64_t d = half; d < D; d++) y[d] = x[d] * cos[d] + x[d - half] * sin[d];
        }
        const int64_t kv = num_kv_heads * D;
        const float *k = k_out + t * kv, *v = row + (num_heads + num_kv_heads) * D;
        if (f16) {
            store_half((uint16_t *)k_cache + slots[t] * kv, k, kv);
            store_half((uint16_t *)v_cache + slots[t] * kv, v, kv);
        } else {
            memcpy((float *)k_cache + slots[t] * kv, k, sizeof(float) * kv);
            memcpy((float *)v_cache + slots[t] * kv, v, sizeof(float) * kv);
        }
    }
    return 0;
}

/* the fixed sum tree of 8 lanes: ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) */
static inline float lane_total(const float *c) {
    return ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
}

/* One token per row drawn from softmax(logits[t] / temperature[t]) by inverse CDF with
 * uniforms[t] in [0, 1): e_i = e^(x_i - max x) (0 below e^-87: masked tokens have none),
 * then in 8 lanes (lane k sums tokens 8v + k, v = 0, 1, ...) the CDF after each vector v,
 * F[v] = lane_total of the lane sums, which never decreases; the total is the last F. The
 * token is the first whose running mass passes u * total: its vector by binary search over
 * F, then token by token inside it (a token of zero mass is never drawn). Rows are `stride`
 * floats apart and split over the OpenMP threads; a row's draw depends on its own inputs
 * only. Returns 1 when a row has no finite maximum or no mass (the caller then takes the
 * torch path), 2 when memory ran out. */
int tm_sample_rows(const float *logits, int64_t rows, int64_t vocab, int64_t stride,
                   const float *temperature, const float *uniforms, int64_t *out) {
    int status = 0;
#pragma omp parallel if (rows * vocab >= PARALLEL_VALUES)
    {
        const int64_t vectors = (vocab + 7) / 8;
        float *e = malloc(sizeof(float) * 9 * vectors), *cdf = e + 8 * vectors;
        if (e == NULL) {
#pragma omp atomic write
            status = 2;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            if (e == NULL) continue;
            const float *l = logits + t * stride, inv = 1.0f / temperature[t];
            float top = -INFINITY;
            for (int64_t i = 0; i < vocab; i++) top = l[i] * inv > top ? l[i] * inv : top;
            if (!isfinite(top)) {
#pragma omp atomic write
                status = 1;
                continue;
            }
            for (int64_t i = 0; i < vocab; i++) { /* below e^-87 (masked tokens: -inf): no mass */
                const float d = l[i] * inv - top;
                e[i] = d < -87.0f ? 0.0f : tm_exp(d);
            }
            for (int64_t i = vocab; i < 8 * vectors; i++) e[i] = 0.0f;
            float lanes[8] = {0};
            for (int64_t v = 0; v < vectors; v++) {
                for (int k = 0; k < 8; k++) lanes[k] += e[8 * v + k];
                cdf[v] = lane_total(lanes);
            }
            const float total = cdf[vectors - 1], target = uniforms[t] * total;
            if (!(total > 0.0f) || !isfinite(total)) {
#pragma omp atomic write
                status = 1;
                continue;
            }
            int64_t lo = 0, hi = vectors - 1; /* the first v with cdf[v] > target, else the last */
            while (lo < hi) {
                const int64_t mid = lo + (hi - lo) / 2;
                if (cdf[mid] > target) hi = mid;
                else lo = mid + 1;
            }
            const float *ev = e + 8 * lo;
            float running = lo > 0 ? cdf[lo - 1] : 0.0f;
            int64_t token = -1;
            for (int k = 0; k < 8 && token < 0; k++)
                if ((running += ev[k]) > target && ev[k] > 0.0f) token = 8 * lo + k;
            for (int k = 7; token < 0 && k >= 0; k--) /* rounding: the vector's last with mass */
                if (ev[k] > 0.0f) token = 8 * lo + k;
            for (int64_t i = 8 * lo - 1; token < 0; i--) /* (a vector with no mass: before it) */
                if (e[i] > 0.0f) token = i;
            out[t] = token;
        }
        free(e);
    }
    return status;
}

/* out[t] = the index of row t's largest value, the first one on a tie, or the first NaN
 * (torch.argmax's rule); rows `stride` floats apart. Lane k of the vector loop keeps its
 * first maximum of values 8v + k (only a strictly larger value replaces it); the lanes
 * holding the row's maximum then give the smallest index. */
int tm_argmax_rows(const float *logits, int64_t rows, int64_t vocab, int64_t stride,
                   int64_t *out) {
    if (rows < 1 || vocab < 1) return 1;
#pragma omp parallel for schedule(static) if (rows * vocab >= PARALLEL_VALUES)
    for (int64_t t = 0; t < rows; t++) {
        const float *l = logits + t * stride;
        int64_t best = 0, i = 0;
#if defined(__AVX2__)
        if (vocab >= 8 && vocab <= INT32_MAX) { /* lane indices are 32-bit */
            __m256 top = _mm256_loadu_ps(l), nan = _mm256_cmp_ps(top, top, _CMP_UNORD_Q);
            __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), idx = at;
            const __m256i eight = _mm256_set1_epi32(8);
            for (i = 8; i + 8 <= vocab; i += 8) {
                const __m256 v = _mm256_loadu_ps(l + i);
                idx = _mm256_add_epi32(idx, eight);
                const __m256 larger = _mm256_cmp_ps(v, top, _CMP_GT_OQ);
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                top = _mm256_blendv_ps(top, v, larger);
                at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), larger));
            }
            if (_mm256_movemask_ps(nan) == 0) {
                float lane_top[8];
                int32_t lane_at[8];
                _mm256_storeu_ps(lane_top, top);
                _mm256_storeu_si256((__m256i *)lane_at, at);
                best = lane_at[0];
                for (int k = 1; k < 8; k++)
                    if (lane_top[k] > l[best] || (lane_top[k] == l[best] && lane_at[k] < best)) best = lane_at[k];
            } else {
                i = 0; /* a NaN: the scalar scan below finds the first one */
            }
        }
#endif
        for (; i < vocab; i++) {
            if (isnan(l[i])) {
                best = i;
                break;
            }
            if (l[i] > l[best]) best = i;
        }
        out[t] = best;
    }
    return 0;
}
