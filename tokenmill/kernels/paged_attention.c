/* Decode attention over the paged KV cache, read in place (no gather copy).
 *
 * One query row per sequence: out[b, h] = softmax(q[b, h] . K[b]^T * scale) V[b], where the
 * keys and values of sequence b are the first lens[b] slots named by its block table.
 * float32 throughout; two passes over the keys (scores, then softmax) and one over the
 * values (AVX2 loops for head sizes that are a multiple of 8). Work items are sequences (or
 * (sequence, kv head) pairs when there are fewer sequences than threads), taken from a
 * shared counter by n_threads threads (parallel.h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_math.h"
#include "parallel.h"

typedef struct {
    const float *q;          /* [B, H, D] */
    const float *k_cache;    /* [S, Hkv, D] */
    const float *v_cache;    /* [S, Hkv, D] */
    const int64_t *tables;   /* [B, max_blocks] */
    const int64_t *lens;     /* [B] */
    float *out;              /* [B, H, D] */
    int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    float scale;
    int64_t splits;          /* items per sequence: 1, or Hkv (one per kv head) */
    int64_t batch;           /* work items: batch * splits */
    int64_t longest;         /* the longest sequence: sizes each thread's score buffer */
    int64_t next;            /* the first item no thread has taken yet */
    int status;
} Job;

/* dot(a, b) over n floats; lanes of 8 partial sums keep the compiler's vector FMAs busy */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lanes[8] = {0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int i = 0; i < 8; i++) lanes[i] += a[d + i] * b[d + i];
    float s = 0.0f;
    for (; d < n; d++) s += a[d] * b[d];
    for (int i = 0; i < 8; i++) s += lanes[i];
    return s;
}

/* each of `rows` rows of L scores -> its softmax, in place */
static void softmax_rows(float *scores, int64_t rows, int64_t L) {
    for (int64_t qh = 0; qh < rows; qh++) {
        float *sg = scores + qh * L, m = -INFINITY, sum = 0.0f;
        for (int64_t l = 0; l < L; l++) m = sg[l] > m ? sg[l] : m;
        for (int64_t l = 0; l < L; l++) {
            sg[l] = tm_exp(sg[l] - m);
            sum += sg[l];
        }
        const float inv = 1.0f / sum;
        for (int64_t l = 0; l < L; l++) sg[l] *= inv;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VECTOR_HEADS 1 /* head sizes that are a multiple of 8 take the AVX2 loops below */
#define INLINE static inline __attribute__((always_inline))

INLINE float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* scores[l] = q . k[l] * scale for keys k[0..R) of one block (R consecutive slots, `row`
 * floats apart): one accumulator per key, so a key's score is the same whichever R. */
INLINE void key_scores(const float *q, const float *k, int64_t row, int64_t D, float scale,
                       float *scores, const int R) {
    __m256 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + r * row + d), acc[r]);
    }
    for (int r = 0; r < R; r++) scores[r] = sum8(acc[r]) * scale;
}

/* out[d0 .. d0 + 8 NV) = sum over the L keys of p[l] v[l] for one head */
INLINE void weighted_values(const Job *j, const int64_t *table, int64_t L, const float *p,
                            int64_t offset, float *out, const int NV) {
    const int64_t bs = j->block_size, row = j->num_kv_heads * j->head_dim;
    __m256 acc[8];
    for (int c = 0; c < NV; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t start = 0; start < L; start += bs) {
        const int64_t n = L - start < bs ? L - start : bs;
        const float *v = j->v_cache + table[start / bs] * bs * row + offset;
        for (int64_t i = 0; i < n; i++, v += row) {
            const __m256 w = _mm256_broadcast_ss(p + start + i);
            for (int c = 0; c < NV; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
        }
    }
    for (int c = 0; c < NV; c++) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

/* run_item for a head size that is a multiple of 8: the scores of 8 keys at a time, and
 * each head's output accumulated in registers over the keys */
static void vector_item(const Job *j, const int64_t *table, int64_t h0, int64_t heads,
                        int64_t L, const float *q, float *scores, float *out) {
    const int64_t Hkv = j->num_kv_heads, D = j->head_dim, bs = j->block_size, row = Hkv * D;
    const int64_t G = j->num_heads / Hkv;
    for (int64_t qh = 0; qh < heads; qh++) {
        const int64_t kv = h0 + qh / G;
        for (int64_t start = 0; start < L; start += bs) {
            const int64_t n = L - start < bs ? L - start : bs;
            const float *k = j->k_cache + table[start / bs] * bs * row + kv * D;
            float *sc = scores + qh * L + start;
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) key_scores(q + qh * D, k + i * row, row, D, j->scale, sc + i, 8);
            for (; i < n; i++) key_scores(q + qh * D, k + i * row, row, D, j->scale, sc + i, 1);
        }
    }
    softmax_rows(scores, heads, L);
    for (int64_t qh = 0; qh < heads; qh++) {
        const int64_t kv = h0 + qh / G;
        int64_t d = 0;
        for (; d + 64 <= D; d += 64) weighted_values(j, table, L, scores + qh * L, kv * D + d, out + qh * D + d, 8);
        for (; d < D; d += 8) weighted_values(j, table, L, scores + qh * L, kv * D + d, out + qh * D + d, 1);
    }
}
#endif

/* Item = (sequence b, kv heads [h0, h1)): reading every head of a slot together reads
 * each cache row once, front to back. */
static int run_item(const Job *j, int64_t b, int64_t h0, int64_t h1, float *scores,
                    int64_t capacity) {
    const int64_t Hkv = j->num_kv_heads, D = j->head_dim, bs = j->block_size;
    const int64_t G = j->num_heads / Hkv, heads = (h1 - h0) * G, L = j->lens[b];
    if (L <= 0 || heads * L > capacity) return 1;
    const int64_t *table = j->tables + b * j->max_blocks;
    const float *q = j->q + (b * j->num_heads + h0 * G) * D;
    float *out = j->out + (b * j->num_heads + h0 * G) * D;
#ifdef VECTOR_HEADS
    if (D % 8 == 0) {
        vector_item(j, table, h0, heads, L, q, scores, out);
        return 0;
    }
#endif
    const int64_t row = Hkv * D; /* floats between consecutive slots */

    /* scores[qh * L + l], qh = query head relative to h0 * G */
    for (int64_t start = 0; start < L; start += bs) {
        const int64_t n = L - start < bs ? L - start : bs;
        const float *k = j->k_cache + table[start / bs] * bs * row + h0 * D;
        for (int64_t i = 0; i < n; i++, k += row)
            for (int64_t qh = 0; qh < heads; qh++)
                scores[qh * L + start + i] = dot(q + qh * D, k + (qh / G) * D, D) * j->scale;
    }
    softmax_rows(scores, heads, L);
    memset(out, 0, sizeof(float) * heads * D);
    for (int64_t start = 0; start < L; start += bs) {
        const int64_t n = L - start < bs ? L - start : bs;
        const float *v = j->v_cache + table[start / bs] * bs * row + h0 * D;
        for (int64_t i = 0; i < n; i++, v += row)
            for (int64_t qh = 0; qh < heads; qh++) {
                const float p = scores[qh * L + start + i], *vh = v + (qh / G) * D;
                float *o = out + qh * D;
                for (int64_t d = 0; d < D; d++) o[d] += p * vh[d];
            }
    }
    return 0;
}

/* Threads take items one at a time until none are left: a preempted thread delays the call
 * by one item, not by its whole share. */
static void run_job(void *arg, int index, int count) {
    Job *j = (Job *)arg;
    (void)index, (void)count;
    const int64_t items = j->batch * j->splits;
    const int64_t per_seq = j->num_kv_heads / j->splits; /* kv heads per item */
    const int64_t capacity = per_seq * (j->num_heads / j->num_kv_heads) * j->longest;
    float *scores = malloc(sizeof(float) * (capacity > 0 ? capacity : 1));
    int status = scores == NULL;
    while (!status) {
        const int64_t item = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (item >= items) break;
        const int64_t b = item / j->splits, h0 = (item % j->splits) * per_seq;
        status = run_item(j, b, h0, h0 + per_seq, scores, capacity);
    }
    free(scores);
    if (status) __atomic_fetch_or(&j->status, status, __ATOMIC_RELAXED);
}

/* Returns 0 on success, nonzero if a length was empty or memory ran out. */
int tm_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                              const int64_t *tables, const int64_t *lens, float *out,
                              int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, int64_t max_blocks,
                              float scale, int64_t n_threads) {
    /* whole sequences per item, unless there are fewer sequences than threads */
    const int64_t splits = batch >= n_threads ? 1 : num_kv_heads;
    const int64_t items = batch * splits;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > items) n_threads = items;
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; b++) longest = lens[b] > longest ? lens[b] : longest;
    Job job = {q, k_cache, v_cache, tables, lens, out, num_heads, num_kv_heads, head_dim,
               block_size, max_blocks, scale, splits, batch, longest, 0, 0};
    parallel(run_job, &job, (int)n_threads);
    return job.status;
}
