/* The element-wise work between a decoder layer's matmuls, one call each instead of a
 * dozen small torch ops: residual add + RMSNorm, rotary embedding + KV-cache write, and
 * SiLU(gate) * up; and the sampler's full-vocabulary passes: an inverse-CDF draw and the
 * greedy argmax. float32, row-major, one row (token) at a time, so a row's result never
 * depends on the other rows of the batch. The arithmetic follows the torch reference
 * (tokenmill/layers/norm.py, rotary.py, llama.py) operation by operation. Big calls (prefill
 * chunks, the sampler's full-vocabulary rows) split their rows over the thread pool
 * (parallel.h) in chunks of whole rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_math.h"
#include "kv_format.h"
#include "parallel.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

enum {
    PARALLEL_VALUES = 1 << 14, /* fewer values than this: one thread (no hand-off cost) */
    CHUNK_VALUES = 1 << 12,    /* values per chunk of rows the threads take */
};

/* Rows t of a call over rows of `size` values: in parallel when there are enough values. */
static void for_rows(range_fn fn, void *ctx, int64_t rows, int64_t size) {
    const int64_t chunk = size >= CHUNK_VALUES ? 1 : CHUNK_VALUES / (size > 0 ? size : 1);
    parallel_range(fn, ctx, rows, chunk, size > 0 ? (PARALLEL_VALUES + size - 1) / size : rows + 1);
}

typedef struct {
    const float *x, *weight;
    float *residual, *out;
    int64_t size;
    float eps;
    int add;
} NormRows;

static void norm_rows(void *arg, int64_t begin, int64_t end) {
    const NormRows *a = arg;
    const float *x = a->x, *weight = a->weight;
    float *residual = a->residual, *out = a->out;
    const int64_t size = a->size;
    for (int64_t t = begin; t < end; t++) {
        const float *xt = x + t * size;
        float *rt = residual + t * size, *ot = out + t * size;
        float lanes[8] = {0};
        int64_t c = 0;
        if (a->add)
            for (int64_t i = 0; i < size; i++) rt[i] = xt[i] + rt[i];
        for (; c + 8 <= size; c += 8)
            for (int i = 0; i < 8; i++) lanes[i] += rt[c + i] * rt[c + i];
        float sum = 0.0f;
        for (; c < size; c++) sum += rt[c] * rt[c];
        for (int i = 0; i < 8; i++) sum += lanes[i];
        const float inv = 1.0f / sqrtf(sum / (float)size + a->eps);
        for (int64_t i = 0; i < size; i++) ot[i] = weight[i] * (rt[i] * inv);
    }
}

/* residual[t] += x[t] (when add), then out[t] = residual[t] / rms(residual[t]) * weight */
int tm_add_rms_norm(const float *x, float *residual, const float *weight, float *out,
                    int64_t rows, int64_t size, float eps, int add) {
    NormRows a = {x, weight, residual, out, size, eps, add};
    for_rows(norm_rows, &a, rows, size);
    return 0;
}

typedef struct {
    const float *gate_up;
    float *out;
    int64_t size;
} SiluRows;

static void silu_rows(void *arg, int64_t begin, int64_t end) {
    const SiluRows *a = arg;
    const int64_t size = a->size;
    for (int64_t t = begin; t < end; t++) {
        const float *g = a->gate_up + t * 2 * size, *u = g + size;
        float *o = a->out + t * size;
        int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        /* 8 at a time (the compiler leaves the scalar loop scalar: roundf); tm_exp8 rounds n
         * half to even where tm_exp rounds half away, which moves e^x by an ulp at most and
         * only at exact half steps; which loop a value takes depends on its index alone */
        const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
        for (; i + 8 <= size; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 e = tm_exp8(_mm256_xor_ps(x, sign));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < size; i++) o[i] = g[i] / (1.0f + tm_exp(-g[i])) * u[i];
    }
}

/* out[t, i] = silu(gate_up[t, i]) * gate_up[t, size + i] */
int tm_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t size) {
    SiluRows a = {gate_up, out, size};
    for_rows(silu_rows, &a, rows, size);
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

/* n floats -> bfloat16 (round to nearest even, kv_format.h) */
static inline void store_bf16(uint16_t *to, const float *from, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, from + i, sizeof bits);
        to[i] = bf16_from_bits(bits);
    }
}

/* n floats -> fp8 bytes (CACHE_E5M2 or CACHE_E4M3) through float16 (kv_format.h); only
 * built with F16C */
static inline void store_fp8(uint8_t *to, const float *from, int64_t n, const int format) {
#if defined(__F16C__)
    uint16_t half[8];
    for (int64_t i = 0; i < n; i += 8) {
        const int64_t m = n - i < 8 ? n - i : 8;
        store_half(half, from + i, m);
        for (int64_t e = 0; e < m; e++)
            to[i + e] = format == CACHE_E5M2 ? e5m2_from_half(half[e]) : e4m3_from_half(half[e]);
    }
#else
    (void)to, (void)from, (void)n, (void)format;
#endif
}

/* Whether float16, bfloat16 and fp8 caches can be written (tm_rope_and_cache's format). */
int tm_rope_writes_f16(void) {
#if defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

typedef struct {
    const float *qkv, *cos_sin;
    const int64_t *positions, *slots;
    float *q_out, *k_out;
    void *k_cache, *v_cache;
    int64_t num_heads, num_kv_heads, head_dim;
    int format;
} RopeRows;

static void rope_rows(void *arg, int64_t begin, int64_t end) {
    const RopeRows *a = arg;
    const int64_t num_heads = a->num_heads, num_kv_heads = a->num_kv_heads, D = a->head_dim;
    const int64_t half = D / 2, width = (num_heads + 2 * num_kv_heads) * D;
    for (int64_t t = begin; t < end; t++) {
        const float *row = a->qkv + t * width;
        const float *cos = a->cos_sin + a->positions[t] * 2 * D, *sin = cos + D;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            const float *x = row + h * D;
            float *y = h < num_heads ? a->q_out + (t * num_heads + h) * D
                                     : a->k_out + (t * num_kv_heads + h - num_heads) * D;
            for (int64_t d = 0; d < half; d++) y[d] = x[d] * cos[d] + x[d + half] * -sin[d];
            for (int64_t d = half; d < D; d++) y[d] = x[d] * cos[d] + x[d - half] * sin[d];
        }
        const int64_t kv = num_kv_heads * D, slot = a->slots[t];
        const float *k = a->k_out + t * kv, *v = row + (num_heads + num_kv_heads) * D;
        if (a->format == CACHE_F16) {
            store_half((uint16_t *)a->k_cache + slot * kv, k, kv);
            store_half((uint16_t *)a->v_cache + slot * kv, v, kv);
        } else if (a->format == CACHE_BF16) {
            store_bf16((uint16_t *)a->k_cache + slot * kv, k, kv);
            store_bf16((uint16_t *)a->v_cache + slot * kv, v, kv);
        } else if (a->format != CACHE_F32) {
            store_fp8((uint8_t *)a->k_cache + slot * kv, k, kv, a->format);
            store_fp8((uint8_t *)a->v_cache + slot * kv, v, kv, a->format);
        } else {
            memcpy((float *)a->k_cache + slot * kv, k, sizeof(float) * kv);
            memcpy((float *)a->v_cache + slot * kv, v, sizeof(float) * kv);
        }
    }
}

/* One step's rows of qkv [T, (H + 2 Hkv) * D] (q | k | v): q and k rotated by their
 * token's position ("rotate half" layout, table cos_sin [P, 2, D]) into q_out [T, H, D]
 * and k_out [T, Hkv, D]; k and v also written to the caches [S, Hkv, D] at slots[t]
 * in `format` (kv_format.h: float32, or float16, bfloat16 or fp8 rounded to nearest). Returns 1
 * (writing nothing) on a position or slot out of range, 2 on a narrow format without
 * tm_rope_writes_f16. */
int tm_rope_and_cache(const float *qkv, const float *cos_sin, const int64_t *positions,
                      const int64_t *slots, float *q_out, float *k_out, void *k_cache,
                      void *v_cache, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t num_positions, int64_t num_slots, int format) {
    const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim;
    if (format != CACHE_F32 && !tm_rope_writes_f16()) return 2;
    for (int64_t t = 0; t < rows; t++)
        if (positions[t] < 0 || positions[t] >= num_positions || slots[t] < 0 ||
            slots[t] >= num_slots)
            return 1;
    RopeRows a = {qkv, cos_sin, positions, slots, q_out, k_out, k_cache, v_cache,
                  num_heads, num_kv_heads, head_dim, format};
    for_rows(rope_rows, &a, rows, width);
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
 * floats apart and split over the thread pool; a row's draw depends on its own inputs
 * only. Returns 1 when a row has no finite maximum or no mass (the caller then takes the
 * torch path), 2 when memory ran out. */
typedef struct {
    const float *logits, *temperature, *uniforms;
    int64_t rows, vocab, stride, *out;
    _Atomic int64_t next;
    _Atomic int status;
} SampleJob;

/* A part draws rows taken one at a time, with its own scratch of the row's e^x and CDF. */
static void sample_part(void *arg, int index, int count) {
    SampleJob *j = arg;
    (void)index, (void)count;
    const int64_t vocab = j->vocab, vectors = (vocab + 7) / 8;
    float *e = malloc(sizeof(float) * 9 * vectors), *cdf = e + 8 * vectors;
    if (e == NULL) {
        atomic_store(&j->status, 2);
        return;
    }
    for (int64_t t; (t = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < j->rows;) {
        const float *l = j->logits + t * j->stride, inv = 1.0f / j->temperature[t];
        float top = -INFINITY;
        for (int64_t i = 0; i < vocab; i++) top = l[i] * inv > top ? l[i] * inv : top;
        if (!isfinite(top)) {
            atomic_store(&j->status, 1);
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
        const float total = cdf[vectors - 1], target = j->uniforms[t] * total;
        if (!(total > 0.0f) || !isfinite(total)) {
            atomic_store(&j->status, 1);
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
        j->out[t] = token;
    }
    free(e);
}

int tm_sample_rows(const float *logits, int64_t rows, int64_t vocab, int64_t stride,
                   const float *temperature, const float *uniforms, int64_t *out) {
    SampleJob job = {logits, temperature, uniforms, rows, vocab, stride, out, 0, 0};
    const int64_t threads = rows * vocab >= PARALLEL_VALUES ? atomic_load(&default_threads) : 1;
    parallel(sample_part, &job, (int)(rows < threads ? rows : threads));
    return atomic_load(&job.status);
}

/* out[t] = the index of row t's largest value, the first one on a tie, or the first NaN
 * (torch.argmax's rule); rows `stride` floats apart. Lane k of the vector loop keeps its
 * first maximum of values 8v + k (only a strictly larger value replaces it); the lanes
 * holding the row's maximum then give the smallest index. */
typedef struct {
    const float *logits;
    int64_t vocab, stride, *out;
} ArgmaxRows;

static void argmax_rows(void *arg, int64_t begin, int64_t end) {
    const ArgmaxRows *a = arg;
    const int64_t vocab = a->vocab;
    for (int64_t t = begin; t < end; t++) {
        const float *l = a->logits + t * a->stride;
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
        a->out[t] = best;
    }
}

int tm_argmax_rows(const float *logits, int64_t rows, int64_t vocab, int64_t stride,
                   int64_t *out) {
    if (rows < 1 || vocab < 1) return 1;
    ArgmaxRows a = {logits, vocab, stride, out};
    for_rows(argmax_rows, &a, rows, vocab);
    return 0;
}
