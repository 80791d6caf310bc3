/*
 * qz_par.c - the kernels' parallel loop: units [0, n) split into contiguous
 * ranges, one per thread (the caller's among them), joined before return.
 * Every unit's result is independent of the split, so the output is the
 * same bytes whatever the thread count; an error is the one of the lowest
 * failing range, so its message does not depend on timing either.
 */
#include <pthread.h>
#include <stdlib.h>

#include "loader/quantize/qz_internal.h"

typedef struct qz_chunk {
    qz_unit_fn fn;
    void *arg;
    size_t u0, u1;
    int rc;
    mp_error err;
} qz_chunk;

static void *chunk_main(void *p) {
    qz_chunk *c = p;
    c->rc = c->fn(c->arg, c->u0, c->u1, &c->err);
    return NULL;
}

int qz_parallel(int threads, size_t n, qz_unit_fn fn, void *arg, mp_error *err) {
    if (threads > QZ_MAX_THREADS) threads = QZ_MAX_THREADS;
    if ((size_t)threads > n) threads = (int)n;
    if (threads <= 1) return fn(arg, 0, n, err);
    qz_chunk c[QZ_MAX_THREADS];
    pthread_t th[QZ_MAX_THREADS];
    bool started[QZ_MAX_THREADS] = {false};
    size_t per = (n + (size_t)threads - 1) / (size_t)threads;
    for (int t = 0; t < threads; t++) {
        size_t u0 = (size_t)t * per, u1 = u0 + per < n ? u0 + per : n;
        c[t] = (qz_chunk){.fn = fn, .arg = arg, .u0 = u0 < n ? u0 : n, .u1 = u1, .rc = 0};
        /* Thread 0's range runs here, after the others are started; a
         * thread that cannot start runs its range here too. */
        if (t > 0) started[t] = pthread_create(&th[t], NULL, chunk_main, &c[t]) == 0;
    }
    chunk_main(&c[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            chunk_main(&c[t]);
    }
    for (int t = 0; t < threads; t++) {
        if (c[t].rc != 0) {
            if (err) *err = c[t].err;
            return -1;
        }
    }
    return 0;
}
