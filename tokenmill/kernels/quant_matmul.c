/* y = x W^T (+ bias) with W kept in its GGUF block format (Q4_1, Q8_0), x float32.
 *
 * Each pair of weight rows is dequantized to float32 exactly as the reference does it
 * (w = d * q + m per 32-weight block) into a small buffer, then multiplied with the rows
 * of x, four at a time, in 8-lane vector sums. Every output element is summed in the same
 * order whatever the number of rows of x: a row's result never depends on its batch.
 * Work is split over weight rows across a small persistent thread pool.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* ---- a persistent pool: workers spin briefly for the next job, then sleep ---- */

enum { MAX_THREADS = 64, SPINS = 20000 };

typedef void (*job_fn)(void *arg, int index, int count);

static struct {
    pthread_mutex_t lock, dispatch;
    pthread_cond_t wake;
    atomic_uint_fast64_t generation;
    atomic_int remaining;
    int started; /* worker threads running */
    job_fn fn;
    void *arg;
    int count; /* parts of the current job */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER,
        .dispatch = PTHREAD_MUTEX_INITIALIZER,
        .wake = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint_fast64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
            if (++spins < SPINS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.lock);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load(&pool.generation);
        if (index < pool.count) pool.fn(pool.arg, index, pool.count);
        atomic_fetch_sub_explicit(&pool.remaining, 1, memory_order_release);
    }
    return NULL;
}

/* Run fn(arg, i, count) for i < count, on the caller (i = 0) and count - 1 workers. */
static void parallel(job_fn fn, void *arg, int count) {
    if (count > MAX_THREADS) count = MAX_THREADS;
    pthread_mutex_lock(&pool.dispatch);
    while (pool.started < count - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)(pool.started + 1)) != 0) break;
        pthread_detach(thread);
        pool.started++;
    }
    if (count > pool.started + 1) count = pool.started + 1;
    if (count > 1) {
        pool.fn = fn;
        pool.arg = arg;
        pool.count = count;
        atomic_store(&pool.remaining, pool.started);
        pthread_mutex_lock(&pool.lock);
        atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    fn(arg, 0, count);
    if (count > 1)
        while (atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&pool.dispatch);
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
