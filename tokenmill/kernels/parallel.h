/* parallel(fn, arg, count): run fn(arg, i, count) for i < count on up to `count` threads
 * (count may come back smaller: then every index below it runs once).
 *
 * Built with OpenMP, the parallel regions run on the process's OpenMP threads: the same
 * ones PyTorch's CPU ops use (both load libgomp.so.1), so the kernels and torch's ops
 * never compete for cores with two sets of spinning threads. Without OpenMP, a small
 * persistent pthread pool whose workers spin briefly for the next job, then sleep.
 */
#ifndef TOKENMILL_PARALLEL_H
#define TOKENMILL_PARALLEL_H

typedef void (*job_fn)(void *arg, int index, int count);

#ifdef _OPENMP
#include <omp.h>

static void parallel(job_fn fn, void *arg, int count) {
    if (count <= 1) {
        fn(arg, 0, 1);
        return;
    }
#pragma omp parallel num_threads(count)
    fn(arg, omp_get_thread_num(), omp_get_num_threads());
}

#else
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

enum { MAX_THREADS = 64, SPINS = 20000 };

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

#endif /* _OPENMP */
#endif /* TOKENMILL_PARALLEL_H */
