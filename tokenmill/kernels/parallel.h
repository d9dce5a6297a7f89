/* parallel(fn, arg, count): run fn(arg, i, count) once for every part i < count, on the
 * calling thread and up to count - 1 pool threads; returns when every part has run.
 *
 * Built for cores the process does not have to itself (a busy neighbour, a CPU quota, the
 * server's own threads). Parts are claimed from a shared ticket, not assigned to threads,
 * and a call ends when its parts are done, not when every thread has checked in: a pool
 * thread that the OS has not scheduled yet simply finds no part left, and the caller runs
 * the parts it did not take. Only a thread preempted in the middle of a part can hold a
 * call up (the jobs split their work into small chunks taken the same way, so that is one
 * chunk). Waiting threads spin briefly, then yield, then sleep on a futex, so an idle pool
 * costs nothing.
 *
 * The pool measures how long callers wait for parts still running elsewhere (stalls). When
 * stalls take over half of the parallel time in a window, the pool runs calls on one
 * thread fewer; it probes one more again after a back-off that doubles while probes fail
 * (0.25 s .. 8 s). Parts compute the same values whichever thread runs them and whatever
 * count a call gets (each job's contract), so the thread count never changes a result.
 * tm_pool_set_adaptive(0) pins the count to what callers ask (--cpu-threads).
 */
#ifndef TOKENMILL_PARALLEL_H
#define TOKENMILL_PARALLEL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

typedef void (*job_fn)(void *arg, int index, int count);

enum { POOL_MAX_THREADS = 256 };
#define SPIN_NS 30000LL         /* a waiting thread spins this long (a decode step's gaps) ... */
#define YIELD_NS 100000LL       /* ... then yields its core to others this long, then sleeps */
#define MAX_SPIN_NS 250000LL    /* a caller's spin for parts still running elsewhere, at most */
#define WINDOW_NS 20000000LL    /* parallel time per adaptation decision */
#define PROBE_MIN_NS 250000000LL
#define PROBE_MAX_NS 8000000000LL
#define STALL_HIGH 0.5 /* stall share of a window that makes the pool use a thread fewer */

static struct {
    pthread_mutex_t dispatch; /* one call at a time */
    _Atomic uint64_t ticket;  /* call << 32 | parts << 16 | next unclaimed part */
    _Atomic uint32_t wake;    /* futex word of sleeping pool threads */
    _Atomic uint32_t done;    /* parts finished in the current call; futex word of the caller */
    _Atomic int sleepers, caller_sleeping;
    job_fn fn;
    void *arg;
    int started; /* pool threads running */
    /* adaptation, under the dispatch lock */
    _Atomic int adaptive, limit; /* limit: most threads a call gets (0 = what it asks) */
    int widest;                  /* the most threads calls have asked for lately */
    int64_t window_ns, stall_ns, probe_at_ns, backoff_ns;
    int probing;
    /* counters for tm_pool_stats */
    _Atomic int64_t calls, total_ns, total_stall_ns, reductions, probes;
} pool = {.dispatch = PTHREAD_MUTEX_INITIALIZER, .adaptive = 1, .backoff_ns = PROBE_MIN_NS};

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void futex_wait(_Atomic uint32_t *word, uint32_t expected) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
#else
    (void)word, (void)expected;
    struct timespec t = {0, 50000};
    nanosleep(&t, NULL);
#endif
}

static void futex_wake(_Atomic uint32_t *word, int threads) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, threads, NULL, NULL, 0);
#else
    (void)word, (void)threads;
#endif
}

/* Spin for spin_ns, then yield for YIELD_NS, while `still` holds; the caller checks it again
 * afterwards and sleeps if it still holds. */
#define SPIN_THEN_YIELD(still, spin_ns)                                         \
    do {                                                                        \
        const int64_t start_ = now_ns();                                        \
        int64_t spent_ = 0;                                                     \
        for (int i_ = 0; (still); i_++) {                                       \
            if ((i_ & 63) == 0 && (spent_ = now_ns() - start_) > (spin_ns) + YIELD_NS) \
                break;                                                          \
            if (spent_ > (spin_ns)) sched_yield();                              \
            else cpu_relax();                                                   \
        }                                                                       \
    } while (0)

static inline uint32_t ticket_call(uint64_t t) { return (uint32_t)(t >> 32); }

/* Claim the next part of call `call`: its index (and *count, the call's parts), or -1 when
 * none is left or another call is on. The call's parts travel in the ticket itself, so a
 * thread that wakes late can never pair one call's ticket with another's part count. */
static int claim(uint32_t call, int *count) {
    uint64_t t = atomic_load(&pool.ticket);
    for (;;) {
        const int next = (int)(t & 0xffff), parts = (int)(t >> 16 & 0xffff);
        if (ticket_call(t) != call || next >= parts) return -1;
        if (atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) {
            *count = parts;
            return next;
        }
    }
}

static void finish_part(int count) {
    if ((int)atomic_fetch_add(&pool.done, 1) + 1 == count && atomic_load(&pool.caller_sleeping))
        futex_wake(&pool.done, 1);
}

/* Run the parts of call `call` that are still unclaimed; fn and arg are read only once a
 * part is held: the call cannot end (and the next one overwrite them) before it finishes. */
static void run_parts(uint32_t call) {
    int count, part;
    while ((part = claim(call, &count)) >= 0) {
        pool.fn(pool.arg, part, count);
        finish_part(count);
    }
}

static __thread int on_pool_thread; /* 1 on the pool's own threads (tm_pool_selftest) */

static void *pool_thread(void *unused) {
    (void)unused;
    on_pool_thread = 1;
    uint32_t seen = ticket_call(atomic_load(&pool.ticket));
    for (;;) {
        SPIN_THEN_YIELD(ticket_call(atomic_load(&pool.ticket)) == seen, SPIN_NS);
        uint32_t wake = atomic_load(&pool.wake);
        atomic_fetch_add(&pool.sleepers, 1);
        while (ticket_call(atomic_load(&pool.ticket)) == seen) {
            futex_wait(&pool.wake, wake);
            wake = atomic_load(&pool.wake);
        }
        atomic_fetch_sub(&pool.sleepers, 1);
        seen = ticket_call(atomic_load(&pool.ticket));
        run_parts(seen);
    }
    return NULL;
}

/* The stall share of each window decides the thread count (see the header); called under
 * the dispatch lock after every call that asked for more than one thread. */
static void adapt(int asked, int64_t elapsed_ns, int64_t stall_ns) {
    if (asked > pool.widest) pool.widest = asked;
    const int64_t now = now_ns();
    const int limit = atomic_load(&pool.limit) ? atomic_load(&pool.limit) : pool.widest;
    if (limit < pool.widest && !pool.probing && now >= pool.probe_at_ns) {
        atomic_store(&pool.limit, limit + 1 >= pool.widest ? 0 : limit + 1);
        atomic_fetch_add(&pool.probes, 1);
        pool.probing = 1;
        pool.window_ns = pool.stall_ns = 0;
        return;
    }
    pool.window_ns += elapsed_ns;
    pool.stall_ns += stall_ns;
    if (pool.window_ns < WINDOW_NS) return;
    const double stalls = (double)pool.stall_ns / (double)pool.window_ns;
    if (stalls > STALL_HIGH && limit > 1) {
        if (pool.probing && pool.backoff_ns < PROBE_MAX_NS) pool.backoff_ns *= 2;
        if (!pool.probing) atomic_fetch_add(&pool.reductions, 1);
        atomic_store(&pool.limit, limit - 1);
        pool.probe_at_ns = now + pool.backoff_ns;
    } else if (pool.probing) { /* the probe held: keep it, and probe further soon */
        pool.backoff_ns = PROBE_MIN_NS;
        pool.probe_at_ns = now + pool.backoff_ns;
    }
    pool.probing = 0;
    pool.window_ns = pool.stall_ns = 0;
}

static void parallel(job_fn fn, void *arg, int count) {
    const int limit = atomic_load(&pool.limit);
    const int asked = count;
    if (count > POOL_MAX_THREADS) count = POOL_MAX_THREADS;
    if (limit > 0 && count > limit && atomic_load(&pool.adaptive)) count = limit;
    if (count <= 1) {
        fn(arg, 0, 1);
        if (asked > 1 && atomic_load(&pool.adaptive)) { /* runs alone: time to probe? */
            pthread_mutex_lock(&pool.dispatch);
            adapt(asked, 0, 0);
            pthread_mutex_unlock(&pool.dispatch);
        }
        return;
    }
    pthread_mutex_lock(&pool.dispatch);
    while (pool.started < count - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, pool_thread, NULL) != 0) break;
        pthread_detach(thread);
        pool.started++;
    }
    if (count > pool.started + 1) count = pool.started + 1;
    const int64_t start = now_ns();
    pool.fn = fn;
    pool.arg = arg;
    atomic_store(&pool.done, 0);
    const uint32_t call = ticket_call(atomic_load(&pool.ticket)) + 1;
    atomic_store(&pool.ticket, (uint64_t)call << 32 | (uint64_t)count << 16);
    if (atomic_load(&pool.sleepers) > 0) {
        atomic_fetch_add(&pool.wake, 1);
        futex_wake(&pool.wake, count - 1);
    }
    run_parts(call);
    /* the last parts elsewhere usually end within one chunk of the work the caller did:
     * spin for a quarter of it (big batches' chunks take ~100 us) before yielding */
    const int64_t own = now_ns(), spin = (own - start) / 4;
    SPIN_THEN_YIELD((int)atomic_load(&pool.done) < count,
                    spin < SPIN_NS ? SPIN_NS : spin > MAX_SPIN_NS ? MAX_SPIN_NS : spin);
    if ((int)atomic_load(&pool.done) < count) {
        atomic_store(&pool.caller_sleeping, 1);
        for (uint32_t d; (int)(d = atomic_load(&pool.done)) < count;) futex_wait(&pool.done, d);
        atomic_store(&pool.caller_sleeping, 0);
    }
    const int64_t end = now_ns();
    atomic_fetch_add(&pool.calls, 1);
    atomic_fetch_add(&pool.total_ns, end - start);
    atomic_fetch_add(&pool.total_stall_ns, end - own);
    if (atomic_load(&pool.adaptive)) adapt(asked, end - start, end - own);
    pthread_mutex_unlock(&pool.dispatch);
}

static _Atomic int default_threads = 1; /* for calls that name no count (tm_pool_configure) */

/* fn(ctx, begin, end) over [0, items) in chunks of `chunk` items, taken by up to the default
 * thread count; one thread when there are fewer than `min_items` items. */
typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);
typedef struct {
    range_fn fn;
    void *ctx;
    int64_t items, chunk;
    _Atomic int64_t next;
} RangeJob;

static void range_part(void *arg, int index, int count) {
    RangeJob *job = arg;
    (void)index, (void)count;
    for (;;) {
        const int64_t begin = atomic_fetch_add_explicit(&job->next, job->chunk, memory_order_relaxed);
        if (begin >= job->items) return;
        job->fn(job->ctx, begin, begin + job->chunk < job->items ? begin + job->chunk : job->items);
    }
}

static void parallel_range(range_fn fn, void *ctx, int64_t items, int64_t chunk, int64_t min_items) {
    if (items < min_items || atomic_load(&default_threads) <= 1) {
        if (items > 0) fn(ctx, 0, items);
        return;
    }
    RangeJob job = {fn, ctx, items, chunk < 1 ? 1 : chunk, 0};
    const int64_t chunks = (items + job.chunk - 1) / job.chunk;
    const int threads = atomic_load(&default_threads);
    parallel(range_part, &job, chunks < threads ? (int)chunks : threads);
}

/* The thread count of calls that name none (the layer ops, the sampler): torch's. */
void tm_pool_configure(int threads) {
    atomic_store(&default_threads, threads < 1 ? 1 : threads);
}

/* Pin the thread count to what callers ask (0), or let the pool adapt it (1, the default);
 * either way the adaptation starts afresh. */
void tm_pool_set_adaptive(int adaptive) {
    pthread_mutex_lock(&pool.dispatch);
    atomic_store(&pool.adaptive, adaptive != 0);
    atomic_store(&pool.limit, 0);
    pool.widest = 0;
    pool.window_ns = pool.stall_ns = 0;
    pool.probing = 0;
    pool.backoff_ns = PROBE_MIN_NS;
    pthread_mutex_unlock(&pool.dispatch);
}

/* A test of the adaptation without a busy machine: `calls` calls of `count` parts, a part
 * taking caller_ns on the calling thread and pool_ns on a pool thread (as if that thread had
 * been descheduled in the middle of it). */
typedef struct {
    int64_t caller_ns, pool_ns;
} SelfTest;

static void selftest_part(void *arg, int index, int count) {
    (void)index, (void)count;
    const SelfTest *test = arg;
    const int64_t delay = on_pool_thread ? test->pool_ns : test->caller_ns;
    const struct timespec t = {(time_t)(delay / 1000000000), (long)(delay % 1000000000)};
    if (delay > 0) nanosleep(&t, NULL);
}

void tm_pool_selftest(int calls, int count, int64_t caller_ns, int64_t pool_ns) {
    SelfTest test = {caller_ns, pool_ns};
    for (int i = 0; i < calls; i++) parallel(selftest_part, &test, count);
}

/* out: calls, their total time and stall time (ns), reductions, probes, the current limit
 * (0: none), pool threads started. */
void tm_pool_stats(int64_t *out) {
    out[0] = atomic_load(&pool.calls);
    out[1] = atomic_load(&pool.total_ns);
    out[2] = atomic_load(&pool.total_stall_ns);
    out[3] = atomic_load(&pool.reductions);
    out[4] = atomic_load(&pool.probes);
    out[5] = atomic_load(&pool.limit);
    out[6] = pool.started;
}

#endif /* TOKENMILL_PARALLEL_H */
