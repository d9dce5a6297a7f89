/* The element-wise work between a decoder layer's matmuls, one call each instead of a
 * dozen small torch ops: residual add + RMSNorm, rotary embedding + KV-cache write, and
 * SiLU(gate) * up. float32, row-major, one row (token) at a time, so a row's result never
 * depends on the other rows of the batch. The arithmetic follows the torch reference
 * (tokenmill/layers/norm.py, rotary.py, llama.py) operation by operation. Big calls (prefill
 * chunks) split their rows over the OpenMP threads torch uses (see parallel.h).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_math.h"

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

/* One step's rows of qkv [T, (H + 2 Hkv) * D] (q | k | v): q and k rotated by their
 * token's position ("rotate half" layout, table cos_sin [P, 2, D]) into q_out [T, H, D]
 * and k_out [T, Hkv, D]; k and v also written to the caches [S, Hkv, D] at slots[t].
 * Returns 1 (writing nothing) on a position or slot out of range. */
int tm_rope_and_cache(const float *qkv, const float *cos_sin, const int64_t *positions,
                      const int64_t *slots, float *q_out, float *k_out, float *k_cache,
                      float *v_cache, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t num_positions, int64_t num_slots) {
    const int64_t D = head_dim, half = D / 2, width = (num_heads + 2 * num_kv_heads) * D;
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
        memcpy(k_cache + slots[t] * kv, k_out + t * kv, sizeof(float) * kv);
        memcpy(v_cache + slots[t] * kv, row + (num_heads + num_kv_heads) * D, sizeof(float) * kv);
    }
    return 0;
}
