/* Attention over the paged KV cache, read in place (no gather copy).
 *
 * One query per row: out[b, h] = softmax(q[b, h] . K[b]^T * scale) V[b], where the keys and
 * values of row b are the first lens[b] slots named by its block table: a decode, or one
 * token of a prefill chunk (then lens[b] = its position + 1). With a sliding window w > 0,
 * only its last w of them: blocks before the window's first are never read (the engine
 * may have freed them). float32 math over a float32, float16, bfloat16 or fp8 cache
 * (kv_format.h; the narrow ones: the AVX2 + F16C loops only, converted on load); two
 * passes over the keys (scores, then softmax) and one over the values (AVX2 loops for head
 * sizes that are a multiple of 8). A row's result depends on its query, keys and values only:
 * consecutive rows of one sequence (a prefill chunk) form a tile that reads each key and
 * value once for all its rows, but each row still sums in the same order as alone. A
 * decode row of grouped heads over a narrow cache converts each block to floats once for
 * the query heads that share its kv head (staged_item), the same floats in the same sums.
 * The next KEY_BLOCKS_AHEAD blocks are prefetched while one is read (prefetch_block): a
 * sequence's blocks lie anywhere. Work items are tiles (or (tile, kv head) pairs when
 * there are fewer tiles than threads), taken from a shared counter by n_threads threads
 * (parallel.h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_math.h"
#include "kv_format.h"
#include "parallel.h"

enum { TILE_ROWS = 16 }; /* rows of one sequence that share their key and value reads */
/* blocks of keys asked for ahead of their reads: scoring one block of a decode row takes
 * less time than a miss to memory (docs/benchmarks.md, "Far prefetch") */
enum { KEY_BLOCKS_AHEAD = 3 };

typedef struct {
    const float *q;          /* [B, H, D] */
    const char *k_cache;     /* [S, Hkv, D] in `format` (kv_format.h) */
    const char *v_cache;
    const int64_t *tables;   /* [B, max_blocks] */
    const int64_t *lens;     /* [B] */
    float *out;              /* [B, H, D] */
    int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    float scale;
    int64_t window;          /* keys a row sees, its last ones; 0: all */
    int format;              /* CACHE_F32, or a narrower one (F16C builds only) */
    int64_t splits;          /* items per tile: 1, or Hkv (one per kv head) */
    const int64_t *tiles;    /* [num_tiles + 1]: tile t is rows tiles[t] .. tiles[t + 1] - 1 */
    int64_t num_tiles;       /* work items: num_tiles * splits */
    int64_t capacity;        /* floats of each thread's score buffer */
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

/* the first key a row of `len` keys sees under the job's window */
static inline int64_t first_key(const Job *j, int64_t len) {
    return j->window > 0 && len > j->window ? len - j->window : 0;
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

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VECTOR_HEADS 1 /* head sizes that are a multiple of 8, up to 256, take the AVX2 loops */
#define INLINE static inline __attribute__((always_inline))

/* lanes [0, n) of 8 (n <= 8) */
INLINE __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* softmax_rows for one row, 8 scores at a time (the last few masked): the max, then e^(s -
 * max) and their sum in 8 lanes, then a multiply by 1 / sum. Every step depends on L only,
 * so a row's probabilities do not depend on the rows around it. */
INLINE void softmax_row(float *s, int64_t L) {
    const int64_t full = L & ~(int64_t)7;
    const __m256i tail = first_lanes(L - full);
    const __m256 lowest = _mm256_set1_ps(-INFINITY);
    __m256 top = lowest;
    for (int64_t l = 0; l < full; l += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + l));
    if (full < L)
        top = _mm256_max_ps(top, _mm256_blendv_ps(lowest, _mm256_maskload_ps(s + full, tail), _mm256_castsi256_ps(tail)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const __m256 m = _mm256_set1_ps(_mm_cvtss_f32(m4));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t l = 0; l < full; l += 8) {
        const __m256 e = tm_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), m));
        _mm256_storeu_ps(s + l, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (full < L) {
        const __m256 e = _mm256_and_ps(tm_exp8(_mm256_sub_ps(_mm256_maskload_ps(s + full, tail), m)),
                                       _mm256_castsi256_ps(tail));
        _mm256_maskstore_ps(s + full, tail, e);
        sum = _mm256_add_ps(sum, e);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    const __m256 inv = _mm256_set1_ps(1.0f / _mm_cvtss_f32(s4));
    for (int64_t l = 0; l < full; l += 8) _mm256_storeu_ps(s + l, _mm256_mul_ps(_mm256_loadu_ps(s + l), inv));
    if (full < L) _mm256_maskstore_ps(s + full, tail, _mm256_mul_ps(_mm256_maskload_ps(s + full, tail), inv));
}

/* what load_kv's floats are multiplied by to give the cache's values: 256 for e4m3, else 1
 * (a power of two: the scores' scale and the weighted values take it, exactly) */
INLINE float value_scale(const int fmt) { return fmt == CACHE_E4M3 ? 256.0f : 1.0f; }

/* e4m3 bytes (sign-extended to 16 bits) -> the float16s of their bits moved up 7 places,
 * the sign's copy at bit 14 cleared: each value / 256, exactly (kv_format.h) */
INLINE __m128i e4m3_halves(__m128i widened) {
    return _mm_and_si128(_mm_slli_epi16(widened, 7), _mm_set1_epi16((short)0xBFFF));
}

/* 8 cache values from `at` as floats (float16, bfloat16 and e5m2 converted exactly: an e5m2
 * byte is a float16's top byte; e4m3 exactly too, but / 256: value_scale) */
INLINE __m256 load_kv(const char *at, const int fmt) {
    if (fmt == CACHE_E5M2) /* each byte under a zero byte: the float16 it is the top of */
        return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i *)at)));
    if (fmt == CACHE_E4M3)
        return _mm256_cvtph_ps(e4m3_halves(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)at))));
    if (fmt == CACHE_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)at));
    if (fmt == CACHE_BF16) /* a float's top half */
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)at)), 16));
    return _mm256_loadu_ps((const float *)at);
}

/* 16 cache values from `at` into two[0] (the first 8) and two[1]: load_kv twice, but an
 * e5m2 cache's 16 bytes are loaded once */
INLINE void load_kv16(const char *at, const int fmt, __m256 *two) {
    if (fmt == CACHE_E5M2) {
        const __m128i bytes = _mm_loadu_si128((const __m128i *)at);
        two[0] = _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), bytes));
        two[1] = _mm256_cvtph_ps(_mm_unpackhi_epi8(_mm_setzero_si128(), bytes));
    } else if (fmt == CACHE_E4M3) {
        const __m128i bytes = _mm_loadu_si128((const __m128i *)at);
        two[0] = _mm256_cvtph_ps(e4m3_halves(_mm_cvtepi8_epi16(bytes)));
        two[1] = _mm256_cvtph_ps(e4m3_halves(_mm_cvtepi8_epi16(_mm_srli_si128(bytes, 8))));
    } else {
        two[0] = load_kv(at, fmt);
        two[1] = load_kv(at + 8 * value_size(fmt), fmt);
    }
}

/* the 8 lane sums of acc[0..8), scaled (lane r: key r's score), n of them stored (none when
 * n <= 0); lane r is ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) of acc[r] */
INLINE void store_sums(const __m256 *acc, float scale, float *scores, int64_t n) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                      _mm256_permute2f128_ps(s0123, s4567, 0x31));
    const __m256 scaled = _mm256_mul_ps(sums, _mm256_set1_ps(scale));
    if (n >= 8) {
        _mm256_storeu_ps(scores, scaled);
    } else if (n > 0) {
        float all[8];
        _mm256_storeu_ps(all, scaled);
        memcpy(scores, all, sizeof(float) * n);
    }
}

/* scores[0 .. n) = q . k[l] * scale for 8 keys k[0..8) (consecutive slots, `row` bytes
 * apart; lanes past n are computed and dropped): one accumulator per key, the 8 reduced
 * together in one tree, so a key's score does not depend on its neighbours. */
INLINE void key_scores(const float *q, const char *k, int64_t row, int64_t D, float scale,
                       float *scores, int64_t n, const int fmt) {
    const int64_t size = value_size(fmt); /* bytes per cache value */
    __m256 acc[8];
    for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) { /* the same fma chain as 8 at a time, in fewer loads */
        const __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + d + 8);
        for (int r = 0; r < 8; r++) {
            __m256 key[2];
            load_kv16(k + r * row + d * size, fmt, key);
            acc[r] = _mm256_fmadd_ps(q1, key[1], _mm256_fmadd_ps(q0, key[0], acc[r]));
        }
    }
    for (; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(qd, load_kv(k + r * row + d * size, fmt), acc[r]);
    }
    store_sums(acc, scale, scores, n);
}

/* the scores of keys [i, n) of one block (i + 8 > the block size: its last few keys) from a
 * zero-padded copy */
INLINE void tail_scores(const Job *j, const float *q, const char *k, int64_t i, int64_t n,
                        float *scores, const int fmt) {
    const int64_t D = j->head_dim, size = value_size(fmt), row = j->num_kv_heads * D * size;
    char copy[8 * 256 * 4]; /* D <= 256 */
    memset(copy, 0, (size_t)(8 * D * size));
    for (int64_t r = 0; r < n - i; r++) memcpy(copy + r * D * size, k + (i + r) * row, (size_t)(D * size));
    key_scores(q, copy, D * size, D, j->scale * value_scale(fmt), scores + i, n - i, fmt);
}

/* the scores of keys [0, n) of one block: 8 slots at a time, read in place while 8 fit in
 * the block, else from a zero-padded copy (block sizes that are not a multiple of 8) */
INLINE void block_scores(const Job *j, const float *q, const char *k, int64_t n, float *scores,
                         const int fmt) {
    const int64_t D = j->head_dim, size = value_size(fmt), row = j->num_kv_heads * D * size;
    int64_t i = 0;
    for (; i < n && i + 8 <= j->block_size; i += 8)
        key_scores(q, k + i * row, row, D, j->scale * value_scale(fmt), scores + i, n - i, fmt);
    if (i < n) tail_scores(j, q, k, i, n, scores, fmt);
}

#if defined(__AVX512VL__)
/* 32 vector registers: two rows' scores of the same 8 keys at once, each key loaded (and
 * converted) once for both. Each score is the same fma chain and reduction tree as
 * key_scores', so the bits do not change. */
#define PAIRED_ROWS 1

INLINE void key_scores2(const float *q0, const float *q1, const char *k, int64_t row, int64_t D,
                        float scale, float *s0, int64_t n0, float *s1, int64_t n1, const int fmt) {
    const int64_t size = value_size(fmt);
    __m256 a0[8], a1[8];
    for (int r = 0; r < 8; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        const __m256 x0 = _mm256_loadu_ps(q0 + d), y0 = _mm256_loadu_ps(q0 + d + 8);
        const __m256 x1 = _mm256_loadu_ps(q1 + d), y1 = _mm256_loadu_ps(q1 + d + 8);
        for (int r = 0; r < 8; r++) {
            __m256 key[2];
            load_kv16(k + r * row + d * size, fmt, key);
            a0[r] = _mm256_fmadd_ps(y0, key[1], _mm256_fmadd_ps(x0, key[0], a0[r]));
            a1[r] = _mm256_fmadd_ps(y1, key[1], _mm256_fmadd_ps(x1, key[0], a1[r]));
        }
    }
    for (; d < D; d += 8) {
        const __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d);
        for (int r = 0; r < 8; r++) {
            const __m256 key = load_kv(k + r * row + d * size, fmt);
            a0[r] = _mm256_fmadd_ps(x0, key, a0[r]);
            a1[r] = _mm256_fmadd_ps(x1, key, a1[r]);
        }
    }
    store_sums(a0, scale, s0, n0);
    store_sums(a1, scale, s1, n1);
}

/* block_scores for two rows at once: keys [0, n0) and [0, n1) of one block */
INLINE void block_scores2(const Job *j, const float *q0, const float *q1, const char *k,
                          int64_t n0, int64_t n1, float *s0, float *s1, const int fmt) {
    const int64_t D = j->head_dim, size = value_size(fmt), row = j->num_kv_heads * D * size;
    const int64_t n = n0 > n1 ? n0 : n1;
    int64_t i = 0;
    for (; i < n && i + 8 <= j->block_size; i += 8)
        key_scores2(q0, q1, k + i * row, row, D, j->scale * value_scale(fmt), s0 + i, n0 - i, s1 + i, n1 - i, fmt);
    if (i < n0) tail_scores(j, q0, k, i, n0, s0, fmt);
    if (i < n1) tail_scores(j, q1, k, i, n1, s1, fmt);
}
#endif

/* out[r][d0 .. d0 + 8 NV) = sum over row r's keys [lo[r], L[r]) of p[r][l] v[l] for one
 * head, R rows of one tile at a time (each value row read once for all of them); every
 * output lane is one fma chain over the keys in order, whatever R and NV */
INLINE void weighted_values(const Job *j, const int64_t *table, const int64_t *L,
                            const int64_t *lo, const float *const *p, int64_t offset,
                            float *const *out, const int R, const int NV, const int fmt) {
    const int64_t bs = j->block_size, size = value_size(fmt), row = j->num_kv_heads * j->head_dim * size;
    const int64_t longest = L[R - 1];
    __m256 acc[2][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t start = lo[0] / bs * bs; start < longest; start += bs) {
        const int64_t n = longest - start < bs ? longest - start : bs;
        const char *v = j->v_cache + table[start / bs] * bs * row + offset * size;
        for (int64_t i = 0; i < n; i++, v += row) {
            __m256 values[8];
            for (int c = 0; c + 1 < NV; c += 2) load_kv16(v + 8 * c * size, fmt, values + c);
            if (NV % 2) values[NV - 1] = load_kv(v + 8 * (NV - 1) * size, fmt);
            for (int r = 0; r < R; r++) {
                if (start + i >= L[r] || start + i < lo[r]) continue;
                const __m256 w = _mm256_broadcast_ss(p[r] + start + i);
                for (int c = 0; c < NV; c++) acc[r][c] = _mm256_fmadd_ps(w, values[c], acc[r][c]);
            }
        }
    }
    const __m256 unit = _mm256_set1_ps(value_scale(fmt));
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NV; c++)
            _mm256_storeu_ps(out[r] + 8 * c, fmt == CACHE_E4M3 ? _mm256_mul_ps(acc[r][c], unit) : acc[r][c]);
}

/* Ask for one kv head's keys or values of one block (from `at`, a slot's row apart) ahead
 * of their reads. The blocks of a sequence lie anywhere in the cache, and the hardware
 * prefetchers do not follow a jump from one to the next: without this, decode attention
 * waits on memory at every block (docs/benchmarks.md, "Paged attention"). While a block's
 * keys are scored the next block's keys come into L1 and this block's values into L2. */
INLINE void prefetch_block(const char *at, const Job *j, const int fmt, const int to_l1) {
    const int64_t bytes = j->head_dim * value_size(fmt), row = j->num_kv_heads * bytes;
    for (int64_t i = 0; i < j->block_size; i++, at += row)
        for (int64_t o = 0; o < bytes; o += 64) {
            if (to_l1) _mm_prefetch(at + o, _MM_HINT_T0);
            else _mm_prefetch(at + o, _MM_HINT_T1);
        }
}

/* kv head `kv`'s keys of `count` blocks from `from` (a block's first slot), those below
 * `end`: the first into L1 if to_l1, the rest into L2 */
INLINE void prefetch_keys(const Job *j, const int64_t *table, int64_t from, int64_t count,
                          int64_t end, int64_t kv, const int fmt, const int to_l1) {
    const int64_t bs = j->block_size, bytes = j->head_dim * value_size(fmt);
    const int64_t block = bs * j->num_kv_heads * bytes; /* bytes of a block */
    for (int64_t start = from; start < end && start < from + count * bs; start += bs)
        prefetch_block(j->k_cache + table[start / bs] * block + kv * bytes, j, fmt, to_l1 && start == from);
}

/* as its keys from `start` (a block's first slot) are scored: kv head `kv`'s keys of the
 * next block (if any below `end`) into L1, of the KEY_BLOCKS_AHEAD - 1 after it into L2,
 * and its values of this block into L2 */
INLINE void prefetch_around(const Job *j, const int64_t *table, int64_t start, int64_t end,
                            int64_t kv, const int fmt) {
    const int64_t bs = j->block_size, bytes = j->head_dim * value_size(fmt);
    prefetch_keys(j, table, start + bs, KEY_BLOCKS_AHEAD, end, kv, fmt, 1);
    prefetch_block(j->v_cache + table[start / bs] * bs * j->num_kv_heads * bytes + kv * bytes, j, fmt, 0);
}

/* run_item for a head size that is a multiple of 8: rows b .. b + R - 1 of one sequence
 * (lens ascending), query heads [h0 G, h0 G + heads), one head at a time (its R rows of
 * scores stay in cache); scores of 8 keys at a time, each key block read once for every
 * row of the tile */
INLINE void vector_item(const Job *j, const int64_t *table, int64_t b, int64_t R, int64_t h0,
                        int64_t heads, float *scores, const int fmt) {
    const int64_t Hkv = j->num_kv_heads, D = j->head_dim, bs = j->block_size;
    const int64_t size = value_size(fmt), row = Hkv * D * size; /* bytes between slots */
    const int64_t G = j->num_heads / Hkv, H = j->num_heads, *lens = j->lens + b;
    const int64_t longest = lens[R - 1];
    int64_t lo[TILE_ROWS]; /* each row's first key (ascending, as lens is) */
    for (int64_t r = 0; r < R; r++) lo[r] = first_key(j, lens[r]);
    for (int64_t qh = 0; qh < heads; qh++) {
        const int64_t kv = h0 + qh / G, head = h0 * G + qh;
        for (int64_t start = lo[0] / bs * bs; start < longest; start += bs) {
            const char *k = j->k_cache + table[start / bs] * bs * row + kv * D * size;
            if (qh % G == 0) prefetch_around(j, table, start, longest, kv, fmt); /* its first head */
            for (int64_t r = 0; r < R; r++) {
                const int64_t n = lens[r] - start < bs ? lens[r] - start : bs;
                if (n <= 0 || start + bs <= lo[r]) continue; /* none of its keys here */
#ifdef PAIRED_ROWS
                const int64_t n1 = r + 1 < R ? (lens[r + 1] - start < bs ? lens[r + 1] - start : bs) : 0;
                if (n1 > 0 && start + bs > lo[r + 1]) { /* the next row's keys here too */
                    block_scores2(j, j->q + ((b + r) * H + head) * D, j->q + ((b + r + 1) * H + head) * D,
                                  k, n, n1, scores + r * longest + start, scores + (r + 1) * longest + start, fmt);
                    r++;
                    continue;
                }
#endif
                block_scores(j, j->q + ((b + r) * H + head) * D, k, n, scores + r * longest + start, fmt);
            }
        }
        for (int64_t r = 0; r < R; r++) softmax_row(scores + r * longest + lo[r], lens[r] - lo[r]);
        for (int64_t r0 = 0; r0 < R; r0 += 2) {
            const int two = R - r0 >= 2;
            const float *p[2] = {scores + r0 * longest, scores + (r0 + two) * longest};
#ifdef PAIRED_ROWS
            const int64_t step = 64; /* 16 accumulators (and 8 values) of 32 registers */
#else
            const int64_t step = two ? 32 : 64; /* 8 accumulators per row, 16 at most */
#endif
            for (int64_t d = 0; d < D; d += step) {
                float *out[2] = {j->out + ((b + r0) * H + head) * D + d,
                                 j->out + ((b + r0 + two) * H + head) * D + d};
                if (d + step > D) { /* the head's last floats, 8 at a time */
                    for (int r = 0; r <= two; r++)
                        for (int64_t e = d; e < D; e += 8) {
                            float *slice = out[r] + e - d;
                            weighted_values(j, table, lens + r0 + r, lo + r0 + r, p + r, kv * D + e, &slice, 1, 1, fmt);
                        }
                } else if (two) {
                    weighted_values(j, table, lens + r0, lo + r0, p, kv * D + d, out, 2, (int)(step / 8), fmt);
                } else {
                    weighted_values(j, table, lens + r0, lo + r0, p, kv * D + d, out, 1, 8, fmt);
                }
            }
        }
    }
}

enum { STAGE_SLOTS = 16 }; /* slots of a block a staged decode converts at a time */

/* n slots of one kv head's keys or values from `at` (a slot's `row` bytes apart) as floats
 * to[n][D] (load_kv's floats, exactly); slots n .. fill - 1 zeroed */
INLINE void stage_rows(const char *at, int64_t row, int64_t D, int64_t n, int64_t fill, float *to,
                       const int fmt) {
    const int64_t size = value_size(fmt);
    for (int64_t i = 0; i < n; i++, at += row, to += D) {
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) {
            __m256 two[2];
            load_kv16(at + d * size, fmt, two);
            _mm256_storeu_ps(to + d, two[0]);
            _mm256_storeu_ps(to + d + 8, two[1]);
        }
        for (; d < D; d += 8) _mm256_storeu_ps(to + d, load_kv(at + d * size, fmt));
    }
    if (fill > n) memset(to, 0, sizeof(float) * (fill - n) * D);
}

/* out[0 .. D) += sum over i < count of p[i] vals[i] (vals [count][D] floats): each lane one
 * fma chain over i in order, as weighted_values' */
INLINE void add_weighted(const float *vals, int64_t count, int64_t D, const float *p, float *out) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
        __m256 acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_loadu_ps(out + d + 8 * c);
        for (int64_t i = 0; i < count; i++) {
            const __m256 w = _mm256_broadcast_ss(p + i);
            for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vals + i * D + d + 8 * c), acc[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(out + d + 8 * c, acc[c]);
    }
    for (; d < D; d += 8) {
        __m256 acc = _mm256_loadu_ps(out + d);
        for (int64_t i = 0; i < count; i++)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i), _mm256_loadu_ps(vals + i * D + d), acc);
        _mm256_storeu_ps(out + d, acc);
    }
}

/* vector_item for one decode row (R = 1) of grouped heads over a float16, bfloat16 or fp8
 * cache: each block's keys, then its values, converted to floats once (STAGE_SLOTS slots
 * at a time) for all G query heads that read them, where vector_item converts them once
 * per query head. The same floats in the same fma chains: the same bits. */
INLINE void staged_item(const Job *j, const int64_t *table, int64_t b, int64_t h0, int64_t heads,
                        float *scores, const int fmt) {
    const int64_t Hkv = j->num_kv_heads, D = j->head_dim, bs = j->block_size, H = j->num_heads;
    const int64_t G = H / Hkv, size = value_size(fmt), row = Hkv * D * size;
    const int64_t L = j->lens[b], lo = first_key(j, L), first = lo / bs * bs;
    const float scale = j->scale * value_scale(fmt);
    float stage[STAGE_SLOTS * 256]; /* D <= 256 */
    for (int64_t kv = h0; kv < h0 + heads / G; kv++) {
        /* the first blocks' keys; a later kv head's come while the one before weighs values */
        if (kv == h0) prefetch_keys(j, table, first, KEY_BLOCKS_AHEAD + 1, L, kv, fmt, 1);
        const float *q = j->q + (b * H + kv * G) * D;
        float *out = j->out + (b * H + kv * G) * D; /* G heads' rows */
        for (int64_t start = first; start < L; start += bs) { /* scores[g L + key] */
            const int64_t n = L - start < bs ? L - start : bs;
            const char *k = j->k_cache + table[start / bs] * bs * row + kv * D * size;
            prefetch_around(j, table, start, L, kv, fmt);
            for (int64_t c0 = 0; c0 < n; c0 += STAGE_SLOTS) {
                const int64_t m = n - c0 < STAGE_SLOTS ? n - c0 : STAGE_SLOTS;
                stage_rows(k + c0 * row, row, D, m, (m + 7) & ~(int64_t)7, stage, fmt);
                for (int64_t g = 0; g < G; g++)
                    for (int64_t i = 0; i < m; i += 8)
                        key_scores(q + g * D, (const char *)(stage + i * D), D * 4, D, scale,
                                   scores + g * L + start + c0 + i, m - i, CACHE_F32);
            }
        }
        for (int64_t g = 0; g < G; g++) softmax_row(scores + g * L + lo, L - lo);
        memset(out, 0, sizeof(float) * G * D);
        if (kv + 1 < h0 + heads / G) prefetch_keys(j, table, first, KEY_BLOCKS_AHEAD + 1, L, kv + 1, fmt, 0);
        for (int64_t start = first; start < L; start += bs) {
            const int64_t n = L - start < bs ? L - start : bs;
            const char *v = j->v_cache + table[start / bs] * bs * row + kv * D * size;
            for (int64_t c0 = 0; c0 < n; c0 += STAGE_SLOTS) {
                const int64_t m = n - c0 < STAGE_SLOTS ? n - c0 : STAGE_SLOTS;
                const int64_t from = start + c0 < lo ? lo - start - c0 : 0; /* the window's first */
                if (from >= m) continue;
                stage_rows(v + (c0 + from) * row, row, D, m - from, m - from, stage, fmt);
                for (int64_t g = 0; g < G; g++)
                    add_weighted(stage, m - from, D, scores + g * L + start + c0 + from, out + g * D);
            }
        }
        if (fmt == CACHE_E4M3) {
            const __m256 unit = _mm256_set1_ps(value_scale(fmt));
            for (int64_t e = 0; e < G * D; e += 8) _mm256_storeu_ps(out + e, _mm256_mul_ps(_mm256_loadu_ps(out + e), unit));
        }
    }
}
#endif

/* Item = (tile rows b .. b + R - 1, kv heads [h0, h1)): reading every head of a slot
 * together reads each cache row once, front to back. */
static int run_item(const Job *j, int64_t b, int64_t R, int64_t h0, int64_t h1, float *scores) {
    const int64_t Hkv = j->num_kv_heads, D = j->head_dim, bs = j->block_size;
    const int64_t G = j->num_heads / Hkv, heads = (h1 - h0) * G;
    const int64_t *table = j->tables + b * j->max_blocks;
    if (j->lens[b] <= 0 || R * j->lens[b + R - 1] > j->capacity || heads * j->lens[b + R - 1] > j->capacity) return 1;
#ifdef VECTOR_HEADS
    if (D % 8 == 0 && D <= 256) {
        if (R == 1 && G > 1 && j->format != CACHE_F32) {
            if (j->format == CACHE_F16) staged_item(j, table, b, h0, heads, scores, CACHE_F16);
            else if (j->format == CACHE_E5M2) staged_item(j, table, b, h0, heads, scores, CACHE_E5M2);
            else if (j->format == CACHE_E4M3) staged_item(j, table, b, h0, heads, scores, CACHE_E4M3);
            else staged_item(j, table, b, h0, heads, scores, CACHE_BF16);
            return 0;
        }
        if (j->format == CACHE_F16) vector_item(j, table, b, R, h0, heads, scores, CACHE_F16);
        else if (j->format == CACHE_E5M2) vector_item(j, table, b, R, h0, heads, scores, CACHE_E5M2);
        else if (j->format == CACHE_E4M3) vector_item(j, table, b, R, h0, heads, scores, CACHE_E4M3);
        else if (j->format == CACHE_BF16) vector_item(j, table, b, R, h0, heads, scores, CACHE_BF16);
        else vector_item(j, table, b, R, h0, heads, scores, CACHE_F32);
        return 0;
    }
#endif
    if (j->format != CACHE_F32) return 1; /* narrower caches need the F16C loops */
    const int64_t row = Hkv * D; /* floats between consecutive slots */
    for (int64_t rb = b; rb < b + R; rb++) {
        const int64_t lo = first_key(j, j->lens[rb]), L = j->lens[rb] - lo; /* keys lo + l */
        const float *q = j->q + (rb * j->num_heads + h0 * G) * D;
        float *out = j->out + (rb * j->num_heads + h0 * G) * D;
        /* scores[qh * L + l], qh = query head relative to h0 * G */
        for (int64_t l = 0; l < L; l++) {
            const float *k = (const float *)j->k_cache + (table[(lo + l) / bs] * bs + (lo + l) % bs) * row + h0 * D;
            for (int64_t qh = 0; qh < heads; qh++)
                scores[qh * L + l] = dot(q + qh * D, k + (qh / G) * D, D) * j->scale;
        }
        softmax_rows(scores, heads, L);
        memset(out, 0, sizeof(float) * heads * D);
        for (int64_t l = 0; l < L; l++) {
            const float *v = (const float *)j->v_cache + (table[(lo + l) / bs] * bs + (lo + l) % bs) * row + h0 * D;
            for (int64_t qh = 0; qh < heads; qh++) {
                const float p = scores[qh * L + l], *vh = v + (qh / G) * D;
                float *o = out + qh * D;
                for (int64_t d = 0; d < D; d++) o[d] += p * vh[d];
            }
        }
    }
    return 0;
}

/* Threads take items one at a time until none are left: a preempted thread delays the call
 * by one item, not by its whole share. */
static void run_job(void *arg, int index, int count) {
    Job *j = (Job *)arg;
    (void)index, (void)count;
    const int64_t items = j->num_tiles * j->splits;
    const int64_t per_item = j->num_kv_heads / j->splits; /* kv heads per item */
    float *scores = malloc(sizeof(float) * (j->capacity > 0 ? j->capacity : 1));
    int status = scores == NULL;
    while (!status) {
        const int64_t item = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (item >= items) break;
        const int64_t t = item / j->splits, h0 = (item % j->splits) * per_item;
        status = run_item(j, j->tiles[t], j->tiles[t + 1] - j->tiles[t], h0, h0 + per_item, scores);
    }
    free(scores);
    if (status) __atomic_fetch_or(&j->status, status, __ATOMIC_RELAXED);
}

/* Whether float16, bfloat16 and fp8 caches can be read for this head size (the vector
 * loops only). */
int tm_paged_attention_reads_f16(int64_t head_dim) {
#ifdef VECTOR_HEADS
    return head_dim % 8 == 0 && head_dim <= 256;
#else
    (void)head_dim;
    return 0;
#endif
}

/* Whether this build scores and weighs two rows of a prefill tile at once (PAIRED_ROWS). */
int tm_paged_attention_paired(void) {
#ifdef PAIRED_ROWS
    return 1;
#else
    return 0;
#endif
}

/* The caches are in `format` (kv_format.h). Returns 0 on success, nonzero if a length was
 * empty, memory ran out or the caches are narrower than float32 where
 * tm_paged_attention_reads_f16 says no. */
int tm_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                              const int64_t *tables, const int64_t *lens, float *out,
                              int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, int64_t max_blocks,
                              float scale, int64_t window, int64_t n_threads, int format) {
    /* tiles: runs of rows with one block table and consecutive lengths (a prefill chunk) */
    int64_t *tiles = malloc(sizeof(int64_t) * (batch + 1)), num_tiles = 0, widest = 0;
    if (tiles == NULL) return 1;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t first = num_tiles ? tiles[num_tiles - 1] : 0;
        const int joins = b > 0 && b - first < TILE_ROWS && lens[b] == lens[b - 1] + 1 &&
                          memcmp(tables + b * max_blocks, tables + (b - 1) * max_blocks,
                                 sizeof(int64_t) * max_blocks) == 0;
        if (!joins) tiles[num_tiles++] = b;
        const int64_t rows = b - tiles[num_tiles - 1] + 1;
        widest = rows * lens[b] > widest ? rows * lens[b] : widest;
    }
    tiles[num_tiles] = batch;
    /* whole tiles per item, unless there are fewer tiles than threads */
    const int64_t splits = num_tiles >= n_threads ? 1 : num_kv_heads;
    const int64_t items = num_tiles * splits;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > items) n_threads = items;
    /* scores: the tile's rows of one head (AVX2), or one row's heads (portable) */
    const int64_t capacity = num_kv_heads / splits * (num_heads / num_kv_heads) * widest;
    Job job = {q, k_cache, v_cache, tables, lens, out, num_heads, num_kv_heads, head_dim,
               block_size, max_blocks, scale, window, format, splits, tiles, num_tiles, capacity, 0, 0};
    parallel(run_job, &job, (int)n_threads);
    free(tiles);
    return job.status;
}
