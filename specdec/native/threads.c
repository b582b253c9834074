/* A fixed pool of threads for llama.c's products: pool_run(fn, arg) calls fn(arg, part, parts)
 * for part = 0 .. parts - 1, part 0 on the calling thread and the others on the pool's workers,
 * and returns when all have returned.
 *
 * Why a pool of our own: a forward pass makes ~120 products of 50-2,500 us each; waking a thread
 * per product (a condition variable, ~50 us on a small VM) would cost as much as the products.
 * Workers spin for a short while after each part, so the next product of the same pass finds
 * them awake, and sleep on a condition variable after that, so an idle service costs nothing.
 *
 * Off by default (one part, no thread started): spinning threads that share a core with another
 * process thrash, so the pool only serves a service that owns its cores (its --threads). One
 * caller at a time: a second thread calling while the pool is busy runs every part itself. */

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define MAX_THREADS 64
#define SPIN_NS 200000 /* a worker's spin after a part: longer than the work between two products */

typedef void (*part_fn)(void *arg, int part, int parts);

static struct {
    int workers; /* started: never stopped */
    int parts;   /* in use: the caller and workers 1 .. parts - 1 */
    pthread_mutex_t lock, busy;
    pthread_cond_t wake;
    atomic_uint generation; /* bumped per run, under `lock` */
    atomic_int pending;     /* workers still in the current run */
    part_fn fn;
    void *arg;
} pool = {0, 1, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static unsigned born[MAX_THREADS]; /* the run count when each worker was started: its last seen */

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *worker(void *arg) {
    const int part = (int)(long)arg;
    unsigned seen = born[part];
    for (;;) {
        unsigned run = atomic_load_explicit(&pool.generation, memory_order_acquire);
        for (long long until = now_ns() + SPIN_NS; run == seen && now_ns() < until;)
            run = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (run == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((run = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = run;
        if (part < pool.parts) pool.fn(pool.arg, part, pool.parts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

/* A forked child has none of the workers (fork copies the calling thread only): it starts with
 * no pool, and unlocked locks, whatever the parent's threads were doing. */
static void forget_pool_in_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0, pool.parts = 1;
}

static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, forget_pool_in_child);
}

/* Use `threads` threads in all (the caller included) from now on, starting the missing workers;
 * returns the number in use (fewer when a thread cannot be started). A service sets this once, at
 * start; fewer threads later leave the others idle (tests compare both in one process). */
int specdec_set_threads(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    pthread_mutex_lock(&pool.busy);
    while (pool.workers + 1 < threads) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        born[pool.workers + 1] = atomic_load(&pool.generation); /* no run starts while `busy` is held */
        int failed = pthread_create(&id, &attr, worker, (void *)(long)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    pool.parts = threads < pool.workers + 1 ? threads : pool.workers + 1;
    int parts = pool.parts;
    pthread_mutex_unlock(&pool.busy);
    return parts;
}

void pool_run(part_fn fn, void *arg) {
    if (pool.parts == 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(arg, 0, 1);
        return;
    }
    pool.fn = fn, pool.arg = arg;
    atomic_store_explicit(&pool.pending, pool.workers, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    fn(arg, 0, pool.parts);
    for (int spins = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; spins++)
        if (spins > 1000) sched_yield(); /* a worker was descheduled: let it run */
    pthread_mutex_unlock(&pool.busy);
}
