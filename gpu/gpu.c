/*
 * gpu.c - the device set behind gpu.h: parsing --devices (which picks the
 * set's backend table, once), per-device accounting of resident bytes,
 * argument checks (bounds, alignment, dtypes, overlap) for every arena
 * operation, then a call through the table. Backends trust what reaches
 * them; nothing here knows which backend it talks to.
 */
#include "gpu/gpu_internal.h"
#include "gpu/dummy.h"
#include "util/tensor/ggml_blocks.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int gpu_nomem(mp_error *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        snprintf(err->code, sizeof err->code, "insufficient_memory");
        err->field[0] = '\0';
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return GPU_NOMEM;
}

/* ---- --devices ---- */

/* "123", "64M", "2g": bytes, suffixes are powers of 1024. */
static int parse_size(const char *s, uint64_t *out) {
    if (!isdigit((unsigned char)*s)) return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return -1;
    unsigned shift = 0;
    switch (toupper((unsigned char)*end)) {
    case '\0':
        break;
    case 'K':
        shift = 10;
        end++;
        break;
    case 'M':
        shift = 20;
        end++;
        break;
    case 'G':
        shift = 30;
        end++;
        break;
    case 'T':
        shift = 40;
        end++;
        break;
    default:
        return -1;
    }
    if (*end || v == 0 || v > (UINT64_MAX >> shift)) return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

static void init_devices(gpu_set *s, const gpu_backend *be, int n, uint64_t cap,
                         unsigned delay_us) {
    s->be = be;
    s->n = n;
    for (int i = 0; i < n; i++) {
        s->dev[i].index = i;
        s->dev[i].ordinal = i;
        s->dev[i].cap = cap;
        s->dev[i].delay_us = delay_us;
    }
}

#define ASYNC_DEFAULT_DELAY_US 200u
#define ASYNC_MAX_DELAY_US 1000000u

/* "host[:N][@SIZE]" and "async[:N][@SIZE][/US]"; plen: the length of the
 * backend's word. */
static int parse_host(gpu_set *s, const char *spec, size_t plen, const gpu_backend *be,
                      uint64_t cap, mp_error *err) {
    const char *p = spec + plen;
    bool async = be == &gpu_backend_async;
    long n = 1;
    if (*p == ':') {
        char *end;
        errno = 0;
        n = strtol(p + 1, &end, 10);
        if (end == p + 1 || errno || n < 1 || n > GPU_MAX_DEVICES)
            return mp_err_field(err, "devices", "invalid_devices", "\"%s\": %s:N needs N in 1..%d",
                                spec, be->name, GPU_MAX_DEVICES);
        p = end;
    }
    if (*p == '@') {
        /* The cap ends at the delay's '/', if any. */
        char num[32];
        size_t len = async ? strcspn(p + 1, "/") : strlen(p + 1);
        if (len >= sizeof num)
            return mp_err_field(err, "devices", "invalid_devices",
                                "\"%s\": bad memory cap after '@'", spec);
        memcpy(num, p + 1, len);
        num[len] = '\0';
        if (parse_size(num, &cap) != 0)
            return mp_err_field(err, "devices", "invalid_devices",
                                "\"%s\": bad memory cap after '@'", spec);
        p += 1 + len;
    }
    unsigned long delay = ASYNC_DEFAULT_DELAY_US;
    if (async && *p == '/') {
        char *end;
        errno = 0;
        if (!isdigit((unsigned char)p[1]))
            return mp_err_field(err, "devices", "invalid_devices",
                                "\"%s\": bad delay after '/' (microseconds)", spec);
        delay = strtoul(p + 1, &end, 10);
        if (errno || *end || delay > ASYNC_MAX_DELAY_US)
            return mp_err_field(err, "devices", "invalid_devices",
                                "\"%s\": delay after '/' must be 0..%u microseconds", spec,
                                ASYNC_MAX_DELAY_US);
        p = end;
    }
    if (*p)
        return mp_err_field(err, "devices", "invalid_devices",
                            "\"%s\": expected auto, host, host:N, async:N or CUDA indices like 0,1",
                            spec);
    init_devices(s, be, (int)n, cap, async ? (unsigned)delay : 0);
    return 0;
}

static int parse_cuda_list(gpu_set *s, const char *spec, mp_error *err) {
    int ord[GPU_MAX_DEVICES], n = 0;
    const char *p = spec;
    for (;;) {
        if (!isdigit((unsigned char)*p))
            return mp_err_field(
                err, "devices", "invalid_devices",
                "\"%s\": expected auto, host, host:N, async:N or CUDA indices like 0,1", spec);
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || v >= GPU_MAX_DEVICES)
            return mp_err_field(err, "devices", "device_unavailable", "\"%s\": no CUDA device %s",
                                spec, p);
        for (int i = 0; i < n; i++)
            if (ord[i] == v)
                return mp_err_field(err, "devices", "invalid_devices",
                                    "\"%s\": device %ld named twice", spec, v);
        if (n == GPU_MAX_DEVICES)
            return mp_err_field(err, "devices", "invalid_devices", "too many devices");
        ord[n++] = (int)v;
        if (*end == '\0') break;
        if (*end != ',')
            return mp_err_field(err, "devices", "invalid_devices", "\"%s\": bad separator", spec);
        p = end + 1;
    }
#if MP_HAVE_CUDA
    int have = gpu_cuda_count(s->cuda_error, sizeof s->cuda_error);
    for (int i = 0; i < n; i++)
        if (ord[i] >= have)
            return mp_err_field(err, "devices", "device_unavailable",
                                "CUDA device %d is not present (%d found%s%s)", ord[i], have,
                                s->cuda_error[0] ? ": " : "", s->cuda_error);
    init_devices(s, &gpu_backend_cuda, n, 0, 0);
    for (int i = 0; i < n; i++)
        s->dev[i].ordinal = ord[i];
    return 0;
#else
    (void)s;
    return mp_err_field(err, "devices", "device_unavailable",
                        "CUDA device %d requested but this build has no CUDA support", ord[0]);
#endif
}

int gpu_set_open(const char *spec, uint64_t host_cap_bytes, gpu_set **out, mp_error *err) {
    *out = NULL;
    gpu_set *s = calloc(1, sizeof *s);
    if (!s) return mp_err(err, "out_of_memory", "gpu set");
    int rc = 0;
    if (!spec || !*spec || strcmp(spec, "auto") == 0) {
        int have = 0;
#if MP_HAVE_CUDA
        have = gpu_cuda_count(s->cuda_error, sizeof s->cuda_error);
        if (have > GPU_MAX_DEVICES) have = GPU_MAX_DEVICES;
        if (have > 0) init_devices(s, &gpu_backend_cuda, have, 0, 0);
#endif
        if (have == 0) init_devices(s, &gpu_backend_host, 1, host_cap_bytes, 0);
    } else if (strncmp(spec, "host", 4) == 0) {
        rc = parse_host(s, spec, 4, &gpu_backend_host, host_cap_bytes, err);
    } else if (strncmp(spec, "async", 5) == 0) {
        rc = parse_host(s, spec, 5, &gpu_backend_async, host_cap_bytes, err);
    } else {
        rc = parse_cuda_list(s, spec, err);
    }
    if (rc != 0) {
        free(s);
        return -1;
    }
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        return mp_err(err, "internal", "pthread_mutex_init");
    }
    *out = s;
    return 0;
}

static void pool_release(gpu_set *s, gpu_arena *list);
static gpu_arena *pool_pop(gpu_set *s, gpu_dev *d);

void gpu_set_close(gpu_set *s) {
    if (!s) return;
    /* Pooled arenas and cached staging first: freeing them may wait on a
     * stream, which must still exist. */
    gpu_arena *victims = NULL;
    for (int i = 0; i < s->n; i++)
        for (gpu_arena *a; (a = pool_pop(s, &s->dev[i])) != NULL;) {
            a->pool_next = victims;
            victims = a;
        }
    pool_release(s, victims);
    while (s->staging_cache) {
        gpu_staging_buf *b = s->staging_cache;
        s->staging_cache = b->next;
        s->be->staging_free(s, b->p);
        free(b);
    }
    for (int i = 0; i < s->n; i++)
        if (s->dev[i].ready) s->be->stream_destroy(&s->dev[i]);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

void gpu_set_host_exportable(gpu_set *s, bool exportable) {
    pthread_mutex_lock(&s->mu);
    s->host_private = !exportable;
    pthread_mutex_unlock(&s->mu);
}

int gpu_set_count(const gpu_set *s) {
    return s->n;
}

gpu_kind gpu_set_kind(const gpu_set *s) {
    return s->be->kind;
}

const char *gpu_set_cuda_error(const gpu_set *s) {
    return s->cuda_error;
}

const char *gpu_kind_name(gpu_kind k) {
    switch (k) {
    case GPU_KIND_CUDA:
        return "cuda";
    case GPU_KIND_ASYNC:
        return "async";
    default:
        return "host";
    }
}

static int check_index(const gpu_set *s, int index, mp_error *err) {
    if (index < 0 || index >= s->n)
        return mp_err_field(err, "devices", "device_unavailable", "no device %d (set has %d)",
                            index, s->n);
    return 0;
}

/* Free memory of a host memory device, under set->mu: the backend's
 * figure, plus the pool's bytes where that figure is MemAvailable (which
 * does not count shmem, though the pool gives it back on demand). */
static int host_mem_info_locked(gpu_set *s, gpu_dev *d, uint64_t *total, uint64_t *avail,
                                mp_error *err) {
    int rc = s->be->mem_info(d, total, avail, err);
    if (rc == 0 && !d->cap) *avail += s->pooled;
    return rc;
}

/* Free memory of a device: under set->mu where the backend's accounting
 * lives there (host memory), else straight from the backend. */
static int mem_info(gpu_set *s, gpu_dev *d, uint64_t *total, uint64_t *avail, mp_error *err) {
    if (!s->be->host_memory) return s->be->mem_info(d, total, avail, err);
    pthread_mutex_lock(&s->mu);
    int rc = host_mem_info_locked(s, d, total, avail, err);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int gpu_device_info_get(gpu_set *s, int index, gpu_device_info *out, mp_error *err) {
    if (check_index(s, index, err) != 0) return -1;
    memset(out, 0, sizeof *out);
    gpu_dev *d = &s->dev[index];
    out->index = index;
    out->kind = s->be->kind;
    out->ordinal = d->ordinal;
    out->resident_bytes = gpu_device_resident(s, index);
    if (s->be->describe(d, out, err) != 0) return -1;
    return mem_info(s, d, &out->total_bytes, &out->free_bytes, err);
}

uint64_t gpu_device_resident(gpu_set *s, int index) {
    if (index < 0 || index >= s->n) return 0;
    pthread_mutex_lock(&s->mu);
    uint64_t r = s->dev[index].resident;
    pthread_mutex_unlock(&s->mu);
    return r;
}

/* The copy stream of device index, created on first use. */
static int dev_ready(gpu_set *s, int index, mp_error *err) {
    gpu_dev *d = &s->dev[index];
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    if (!d->ready) {
        rc = s->be->stream_init(d, err);
        d->ready = rc == 0;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int gpu_device_sync(gpu_set *s, int index, mp_error *err) {
    if (check_index(s, index, err) != 0 || dev_ready(s, index, err) != 0) return -1;
    return s->be->sync(&s->dev[index], err);
}

bool gpu_cuda_versions(int *runtime, int *driver) {
    int r = 0, d = 0;
    bool ok = false;
#if MP_HAVE_CUDA
    ok = gpu_cuda_versions_impl(&r, &d);
#endif
    if (runtime) *runtime = r;
    if (driver) *driver = d;
    return ok;
}

/* ---- the arena pool ---- */

/* The pool is a list per device, oldest first; every operation on it is
 * under set->mu, and arenas leave it before their memory is touched, so
 * the slow parts (munmap, resize) run unlocked. */

static void pool_unlink(gpu_set *s, gpu_dev *d, gpu_arena *a, gpu_arena *prev) {
    if (prev)
        prev->pool_next = a->pool_next;
    else
        d->pool = a->pool_next;
    a->pool_next = NULL;
    d->pooled -= a->size;
    s->pooled -= a->size;
}

/* The oldest pooled arena of d, unlinked; NULL when none. */
static gpu_arena *pool_pop(gpu_set *s, gpu_dev *d) {
    gpu_arena *a = d->pool;
    if (a) pool_unlink(s, d, a, NULL);
    return a;
}

/* The pooled arena of d closest in size to bytes (the cheapest to resize),
 * unlinked; NULL when none. */
static gpu_arena *pool_take_best(gpu_set *s, gpu_dev *d, uint64_t bytes) {
    gpu_arena *best = NULL, *best_prev = NULL, *prev = NULL;
    uint64_t best_diff = UINT64_MAX;
    for (gpu_arena *a = d->pool; a; prev = a, a = a->pool_next) {
        uint64_t diff = a->size > bytes ? a->size - bytes : bytes - a->size;
        if (diff < best_diff) {
            best = a;
            best_prev = prev;
            best_diff = diff;
        }
    }
    if (best) pool_unlink(s, d, best, best_prev);
    return best;
}

/* Frees a list of unlinked arenas (linked by pool_next). Unlocked. */
static void pool_release(gpu_set *s, gpu_arena *list) {
    while (list) {
        gpu_arena *next = list->pool_next;
        s->be->arena_free(list);
        free(list);
        list = next;
    }
}

/* Unlinks pooled arenas, oldest first and this device's first, until at
 * least `need` bytes are unlinked or the set's pool is empty. Under mu. */
static gpu_arena *pool_evict(gpu_set *s, gpu_dev *first, uint64_t need) {
    gpu_arena *victims = NULL;
    uint64_t got = 0;
    for (int k = -1; k < s->n && got < need; k++) {
        gpu_dev *d = k < 0 ? first : &s->dev[k];
        for (gpu_arena *a; got < need && (a = pool_pop(s, d)) != NULL;) {
            got += a->size;
            a->pool_next = victims;
            victims = a;
        }
    }
    return victims;
}

void gpu_set_arena_pool(gpu_set *s, uint64_t cap_bytes) {
    pthread_mutex_lock(&s->mu);
    s->pool_cap = s->be->host_memory ? cap_bytes : 0;
    gpu_arena *victims =
        s->pooled > s->pool_cap ? pool_evict(s, &s->dev[0], s->pooled - s->pool_cap) : NULL;
    pthread_mutex_unlock(&s->mu);
    pool_release(s, victims);
}

uint64_t gpu_set_pooled_bytes(gpu_set *s) {
    pthread_mutex_lock(&s->mu);
    uint64_t v = s->pooled;
    pthread_mutex_unlock(&s->mu);
    return v;
}

/* Pools a freed arena when it may be (a memfd nobody imported, room under
 * the cap, memory not short); true when it did, and then owns it. */
static bool pool_put(gpu_arena *a) {
    gpu_set *s = a->set;
    gpu_dev *d = &s->dev[a->dev];
    if (!s->be->host_memory || a->fd < 0 || a->priv || a->exported) return false;
    pthread_mutex_lock(&s->mu);
    bool room = s->pool_cap && a->size <= s->pool_cap - s->pooled;
    pthread_mutex_unlock(&s->mu);
    if (!room) return false;
    if (!d->cap) {
        /* Without a cap the pool holds memory the system may need: only
         * while at least an eighth of it stays available. */
        uint64_t total, avail;
        if (gpu_host_meminfo(&total, &avail, NULL) != 0 || avail < total / 8) return false;
    }
    /* Work queued on the arena ends before anyone reuses it (a GPU's
     * stream orders that anyway; the async backend checks it). */
    if (d->ready) (void)s->be->sync(d, NULL);
    pthread_mutex_lock(&s->mu);
    room = s->pool_cap && a->size <= s->pool_cap - s->pooled;
    if (room) {
        gpu_arena **tail = &d->pool;
        while (*tail)
            tail = &(*tail)->pool_next;
        *tail = a;
        a->pool_next = NULL;
        d->pooled += a->size;
        s->pooled += a->size;
        d->resident -= a->size;
        s->live--;
    }
    pthread_mutex_unlock(&s->mu);
    return room;
}

/* A host memory arena: from the pool when it has one for the device
 * (resized to bytes), else fresh; the room is checked and reserved under
 * the lock first, so that concurrent loads cannot together exceed a cap,
 * and pooled arenas are released where the new one needs their memory.
 * Returns the arena to use (a, or a pooled one after freeing a). */
static int host_memory_alloc(gpu_set *s, gpu_dev *d, gpu_arena **ap, mp_error *err) {
    const gpu_backend *be = s->be;
    gpu_arena *a = *ap;
    uint64_t bytes = a->size, total, avail;
    gpu_arena *reuse = NULL, *victims = NULL;
    pthread_mutex_lock(&s->mu);
    a->priv = s->host_private;
    int rc = host_mem_info_locked(s, d, &total, &avail, err);
    if (rc == 0 && bytes > avail)
        rc = gpu_nomem(err, "device %d (%s): %" PRIu64 " bytes asked, %" PRIu64 " free", d->index,
                       be->name, bytes, avail);
    if (rc == 0) {
        d->resident += bytes;
        if (!a->priv) reuse = pool_take_best(s, d, bytes);
        /* Under a cap, the pool may only keep what the live arenas leave. */
        if (d->cap && d->resident + d->pooled > d->cap)
            victims = pool_evict(s, d, d->resident + d->pooled - d->cap);
    }
    pthread_mutex_unlock(&s->mu);
    pool_release(s, victims);
    if (rc != 0) return rc;
    if (!d->cap && s->pooled) {
        /* Without a cap: release pooled memory the new bytes need. */
        uint64_t need = reuse ? (bytes > reuse->size ? bytes - reuse->size : 0) : bytes;
        uint64_t mt, ma;
        if (need && gpu_host_meminfo(&mt, &ma, NULL) == 0 && need > ma) {
            pthread_mutex_lock(&s->mu);
            victims = pool_evict(s, d, need - ma);
            pthread_mutex_unlock(&s->mu);
            pool_release(s, victims);
        }
    }
    if (reuse) {
        mp_error re = {0};
        if (gpu_host_arena_resize(reuse, bytes, &re) == 0) {
            reuse->reused = true;
            reuse->exported = false;
            free(a);
            *ap = reuse;
            return 0;
        }
        /* Could not resize it: release it, and try fresh memory. */
        reuse->pool_next = NULL;
        pool_release(s, reuse);
    }
    rc = be->arena_alloc(a, err);
    if (rc != 0) {
        pthread_mutex_lock(&s->mu);
        d->resident -= bytes;
        pthread_mutex_unlock(&s->mu);
    }
    return rc;
}

/* ---- arenas ---- */

int gpu_arena_alloc(gpu_set *s, int index, uint64_t bytes, gpu_arena **out, mp_error *err) {
    *out = NULL;
    if (check_index(s, index, err) != 0) return -1;
    if (bytes == 0) return mp_err(err, "invalid_argument", "arena of 0 bytes");
    /* The arena's stream exists before the arena: freeing it syncs it. */
    if (dev_ready(s, index, err) != 0) return -1;
    const gpu_backend *be = s->be;
    gpu_dev *d = &s->dev[index];
    gpu_arena *a = calloc(1, sizeof *a);
    if (!a) return mp_err(err, "out_of_memory", "arena handle");
    a->set = s;
    a->dev = index;
    a->size = bytes;
    a->fd = -1;
    int rc = 0;
    if (be->host_memory) {
        rc = host_memory_alloc(s, d, &a, err);
    } else {
        rc = be->arena_alloc(a, err);
        if (rc == 0) {
            pthread_mutex_lock(&s->mu);
            d->resident += bytes;
            pthread_mutex_unlock(&s->mu);
        }
    }
    if (rc != 0) {
        free(a);
        return rc;
    }
    pthread_mutex_lock(&s->mu);
    s->live++;
    pthread_mutex_unlock(&s->mu);
    *out = a;
    return 0;
}

void gpu_arena_free(gpu_arena *a) {
    if (!a) return;
    if (pool_put(a)) return;
    gpu_set *s = a->set;
    gpu_dev *d = &s->dev[a->dev];
    s->be->arena_free(a);
    pthread_mutex_lock(&s->mu);
    d->resident -= a->size;
    s->live--;
    pthread_mutex_unlock(&s->mu);
    free(a);
}

uint64_t gpu_arena_size(const gpu_arena *a) {
    return a->size;
}

int gpu_arena_device(const gpu_arena *a) {
    return a->dev;
}

void *gpu_arena_host_ptr(const gpu_arena *a) {
    return a->set->be->cpu_addressable ? a->ptr : NULL;
}

bool gpu_arena_reused(const gpu_arena *a) {
    return a->reused;
}

int gpu_arena_host_fd(const gpu_arena *a) {
    return a->set->be->cpu_addressable ? a->fd : -1;
}

int gpu_arena_export(gpu_arena *a, gpu_export *out, mp_error *err) {
    memset(out, 0, sizeof *out);
    out->size = a->size;
    out->fd = -1;
    if (a->set->be->arena_export(a, out, err) != 0) return -1;
    a->exported = true;
    return 0;
}

/* ---- staging ---- */

/* Without a cap, freed staging is kept up to this much. */
#define GPU_STAGING_CACHE_DEFAULT (1ull << 30)

void gpu_set_staging_cap(gpu_set *s, uint64_t cap_bytes) {
    pthread_mutex_lock(&s->mu);
    s->staging_cap = cap_bytes;
    pthread_mutex_unlock(&s->mu);
}

uint64_t gpu_set_staging_cap_get(const gpu_set *s) {
    return s->staging_cap;
}

int gpu_staging_alloc(gpu_set *s, size_t bytes, void **out, mp_error *err) {
    *out = NULL;
    if (bytes == 0) return mp_err(err, "invalid_argument", "staging buffer of 0 bytes");
    gpu_staging_buf *node = NULL, *victims = NULL;
    pthread_mutex_lock(&s->mu);
    uint64_t cap = s->staging_cap;
    if (cap && bytes > cap) {
        pthread_mutex_unlock(&s->mu);
        gpu_nomem(err, "%zu bytes of staging asked, the cap is %" PRIu64, bytes, cap);
        if (err) snprintf(err->code, sizeof err->code, "staging_cap");
        return GPU_NOMEM;
    }
    /* The smallest cached buffer that fits and wastes at most its half. */
    gpu_staging_buf **best = NULL;
    for (gpu_staging_buf **b = &s->staging_cache; *b; b = &(*b)->next)
        if ((*b)->bytes >= bytes && (*b)->bytes / 2 <= bytes &&
            (!best || (*b)->bytes < (*best)->bytes))
            best = b;
    if (best) {
        node = *best;
        *best = node->next;
        s->staging_cached -= node->bytes;
    } else {
        /* Fresh memory: make room under the cap from the cache. */
        while (cap && s->staging_cache && s->staging_live + s->staging_cached + bytes > cap) {
            gpu_staging_buf *v = s->staging_cache;
            s->staging_cache = v->next;
            s->staging_cached -= v->bytes;
            v->next = victims;
            victims = v;
        }
        if (cap && s->staging_live + bytes > cap) {
            uint64_t live = s->staging_live;
            pthread_mutex_unlock(&s->mu);
            for (gpu_staging_buf *v; (v = victims) != NULL; free(v)) {
                victims = v->next;
                s->be->staging_free(s, v->p);
            }
            gpu_nomem(err,
                      "%zu bytes of staging asked, %" PRIu64 " of the cap of %" PRIu64
                      " are in use by other loads",
                      bytes, live, cap);
            if (err) snprintf(err->code, sizeof err->code, "staging_cap");
            return GPU_NOMEM;
        }
    }
    s->staging_live += node ? node->bytes : bytes;
    pthread_mutex_unlock(&s->mu);
    for (gpu_staging_buf *v; (v = victims) != NULL; free(v)) {
        victims = v->next;
        s->be->staging_free(s, v->p);
    }
    int rc = 0;
    if (!node) {
        node = calloc(1, sizeof *node);
        if (!node) rc = mp_err(err, "out_of_memory", "staging buffer");
        if (rc == 0) {
            node->bytes = bytes;
            rc = s->be->staging_alloc(s, bytes, &node->p, err);
        }
        if (rc != 0) {
            free(node);
            pthread_mutex_lock(&s->mu);
            s->staging_live -= bytes;
            pthread_mutex_unlock(&s->mu);
            return rc;
        }
    }
    pthread_mutex_lock(&s->mu);
    node->next = s->staging_live_bufs;
    s->staging_live_bufs = node;
    pthread_mutex_unlock(&s->mu);
    *out = node->p;
    return 0;
}

void gpu_staging_free(gpu_set *s, void *p) {
    if (!p) return;
    pthread_mutex_lock(&s->mu);
    gpu_staging_buf *node = NULL;
    for (gpu_staging_buf **b = &s->staging_live_bufs; *b; b = &(*b)->next)
        if ((*b)->p == p) {
            node = *b;
            *b = node->next;
            break;
        }
    if (node) s->staging_live -= node->bytes;
    uint64_t keep_max = s->staging_cap ? s->staging_cap : GPU_STAGING_CACHE_DEFAULT;
    bool keep = node && s->staging_live + s->staging_cached + node->bytes <= keep_max;
    pthread_mutex_unlock(&s->mu);
    if (!keep) {
        s->be->staging_free(s, p);
        free(node);
        return;
    }
    /* Copies from it may still be queued: wait for every device as the
     * backend's free would (cudaFreeHost synchronizes), so the next load
     * may refill it at once. */
    for (int i = 0; i < s->n; i++) {
        pthread_mutex_lock(&s->mu);
        bool ready = s->dev[i].ready;
        pthread_mutex_unlock(&s->mu);
        if (ready) (void)s->be->sync(&s->dev[i], NULL);
    }
    pthread_mutex_lock(&s->mu);
    node->next = s->staging_cache;
    s->staging_cache = node;
    s->staging_cached += node->bytes;
    pthread_mutex_unlock(&s->mu);
}

/* ---- transfers ---- */

static int check_span(const gpu_arena *a, uint64_t off, uint64_t bytes, mp_error *err) {
    if (off > a->size || bytes > a->size - off)
        return mp_err(err, "out_of_range",
                      "range [%" PRIu64 ", +%" PRIu64 ") outside an arena of %" PRIu64 " bytes",
                      off, bytes, a->size);
    return 0;
}

int gpu_copy_h2d(gpu_arena *a, uint64_t off, const void *src, size_t n, mp_error *err) {
    if (check_span(a, off, n, err) != 0) return -1;
    if (n == 0) return 0;
    if (dev_ready(a->set, a->dev, err) != 0) return -1;
    return a->set->be->copy_h2d(&a->set->dev[a->dev], (char *)a->ptr + off, src, n, err);
}

int gpu_read(gpu_arena *a, uint64_t off, void *dst, size_t n, mp_error *err) {
    if (check_span(a, off, n, err) != 0) return -1;
    if (n == 0) return 0;
    if (dev_ready(a->set, a->dev, err) != 0) return -1;
    return a->set->be->read(&a->set->dev[a->dev], (char *)a->ptr + off, dst, n, err);
}

/* ---- fences ---- */

int gpu_fence_create(gpu_set *s, int index, gpu_fence **out, mp_error *err) {
    *out = NULL;
    if (check_index(s, index, err) != 0 || dev_ready(s, index, err) != 0) return -1;
    gpu_fence *f = calloc(1, sizeof *f);
    if (!f) return mp_err(err, "out_of_memory", "fence");
    f->set = s;
    f->dev = index;
    if (s->be->fence_create(&s->dev[index], f, err) != 0) {
        free(f);
        return -1;
    }
    pthread_mutex_lock(&s->mu);
    s->live++;
    pthread_mutex_unlock(&s->mu);
    *out = f;
    return 0;
}

int gpu_fence_record(gpu_fence *f, mp_error *err) {
    if (f->set->be->fence_record(&f->set->dev[f->dev], f, err) != 0) return -1;
    f->recorded = 1;
    return 0;
}

int gpu_fence_wait(gpu_fence *f, mp_error *err) {
    if (!f->recorded) return 0;
    return f->set->be->fence_wait(&f->set->dev[f->dev], f, err);
}

int gpu_fence_query(gpu_fence *f, mp_error *err) {
    if (!f->recorded) return 1;
    return f->set->be->fence_query(&f->set->dev[f->dev], f, err);
}

void gpu_fence_free(gpu_fence *f) {
    if (!f) return;
    gpu_set *s = f->set;
    s->be->fence_free(&s->dev[f->dev], f);
    pthread_mutex_lock(&s->mu);
    s->live--;
    pthread_mutex_unlock(&s->mu);
    free(f);
}

/* ---- compute ---- */

static unsigned float_size(mp_dtype dt) {
    switch (dt) {
    case MP_DT_F32:
        return 4;
    case MP_DT_F16:
    case MP_DT_BF16:
        return 2;
    case MP_DT_F8_E4M3:
    case MP_DT_F8_E5M2:
        return 1;
    default:
        return 0;
    }
}

static bool is_wide(mp_dtype dt) {
    return dt == MP_DT_F32 || dt == MP_DT_F16 || dt == MP_DT_BF16;
}

bool gpu_cast_supported(mp_dtype from, mp_dtype to) {
    return is_wide(to) && float_size(from) != 0;
}

bool gpu_dequant_supported(int ggml_type) {
    return ggml_blk_elems(ggml_type) != 0;
}

/* Offset aligned for the element type and span inside the arena. */
static int check_elems(const gpu_arena *a, uint64_t off, unsigned esize, uint64_t bytes,
                       const char *what, mp_error *err) {
    if (esize > 1 && off % esize != 0)
        return mp_err(err, "invalid_argument", "%s offset %" PRIu64 " not aligned to %u", what, off,
                      esize);
    return check_span(a, off, bytes, err);
}

static bool overlaps(const gpu_arena *a, uint64_t aoff, uint64_t abytes, const gpu_arena *b,
                     uint64_t boff, uint64_t bbytes) {
    if (a != b || abytes == 0 || bbytes == 0) return false;
    return aoff < boff + bbytes && boff < aoff + abytes;
}

static int same_device(const gpu_arena *a, const gpu_arena *b, mp_error *err) {
    if (a->set != b->set || a->dev != b->dev)
        return mp_err(err, "invalid_argument", "source and destination on different devices");
    return 0;
}

int gpu_cast(gpu_arena *dst, uint64_t dst_off, mp_dtype dst_dt, const gpu_arena *src,
             uint64_t src_off, mp_dtype src_dt, uint64_t n, mp_error *err) {
    if (!gpu_cast_supported(src_dt, dst_dt))
        return mp_err(err, "unsupported_dtype", "no device cast from %s to %s",
                      mp_dtype_name(src_dt), mp_dtype_name(dst_dt));
    if (same_device(dst, src, err) != 0) return -1;
    unsigned ds = float_size(dst_dt), ss = float_size(src_dt);
    uint64_t dbytes, sbytes;
    if (__builtin_mul_overflow(n, (uint64_t)ds, &dbytes) ||
        __builtin_mul_overflow(n, (uint64_t)ss, &sbytes))
        return mp_err(err, "out_of_range", "cast of %" PRIu64 " elements overflows", n);
    if (check_elems(dst, dst_off, ds, dbytes, "destination", err) != 0 ||
        check_elems(src, src_off, ss, sbytes, "source", err) != 0)
        return -1;
    if (overlaps(dst, dst_off, dbytes, src, src_off, sbytes) && !(dst_off == src_off && ds == ss))
        return mp_err(err, "invalid_argument", "cast source and destination overlap");
    if (n == 0) return 0;
    void *dp = (char *)dst->ptr + dst_off;
    const void *sp = (const char *)src->ptr + src_off;
    if (dev_ready(dst->set, dst->dev, err) != 0) return -1;
    return dst->set->be->cast(&dst->set->dev[dst->dev], dp, dst_dt, sp, src_dt, n, err);
}

int gpu_dequant(gpu_arena *dst, uint64_t dst_off, mp_dtype dst_dt, const gpu_arena *src,
                uint64_t src_off, int ggml_type, uint64_t n, mp_error *err) {
    unsigned be = ggml_blk_elems(ggml_type), bb = ggml_blk_bytes(ggml_type);
    if (!be)
        return mp_err(err, "unsupported_dtype", "no device dequantization of ggml type %d",
                      ggml_type);
    if (!is_wide(dst_dt))
        return mp_err(err, "unsupported_dtype", "dequantize to %s", mp_dtype_name(dst_dt));
    if (n % be != 0)
        return mp_err(err, "invalid_argument",
                      "%" PRIu64 " elements is not a whole number of %u-element blocks", n, be);
    if (same_device(dst, src, err) != 0) return -1;
    unsigned ds = float_size(dst_dt);
    uint64_t dbytes, sbytes;
    if (__builtin_mul_overflow(n, (uint64_t)ds, &dbytes) ||
        __builtin_mul_overflow(n / be, (uint64_t)bb, &sbytes))
        return mp_err(err, "out_of_range", "dequant of %" PRIu64 " elements overflows", n);
    if (check_elems(dst, dst_off, ds, dbytes, "destination", err) != 0 ||
        check_elems(src, src_off, 1, sbytes, "source", err) != 0)
        return -1;
    if (overlaps(dst, dst_off, dbytes, src, src_off, sbytes))
        return mp_err(err, "invalid_argument", "dequant source and destination overlap");
    if (n == 0) return 0;
    void *dp = (char *)dst->ptr + dst_off;
    const void *sp = (const char *)src->ptr + src_off;
    if (dev_ready(dst->set, dst->dev, err) != 0) return -1;
    return dst->set->be->dequant(&dst->set->dev[dst->dev], dp, dst_dt, sp, ggml_type, n, err);
}

int gpu_memset(gpu_arena *a, uint64_t off, int byte, uint64_t n, mp_error *err) {
    if (check_span(a, off, n, err) != 0) return -1;
    if (n == 0) return 0;
    if (dev_ready(a->set, a->dev, err) != 0) return -1;
    return a->set->be->memset(&a->set->dev[a->dev], (char *)a->ptr + off, byte & 0xff, n, err);
}

int gpu_fill_dummy(gpu_arena *a, uint64_t off, mp_dtype dt, uint64_t n, const char *name,
                   const gpu_dummy_params *p, mp_error *err) {
    if (!is_wide(dt))
        return mp_err(err, "unsupported_dtype", "dummy weights of dtype %s", mp_dtype_name(dt));
    if (!isfinite(p->low) || !isfinite(p->high) || p->low > p->high)
        return mp_err_field(err, "dummy", "invalid_argument",
                            "dummy range needs finite low <= high");
    unsigned es = float_size(dt);
    uint64_t bytes;
    if (__builtin_mul_overflow(n, (uint64_t)es, &bytes))
        return mp_err(err, "out_of_range", "dummy fill of %" PRIu64 " elements overflows", n);
    if (check_elems(a, off, es, bytes, "destination", err) != 0) return -1;
    if (n == 0) return 0;
    uint64_t tseed = gpu_dummy_tensor_seed(p->seed, name);
    void *dp = (char *)a->ptr + off;
    if (dev_ready(a->set, a->dev, err) != 0) return -1;
    return a->set->be->fill_dummy(&a->set->dev[a->dev], dp, dt, n, p->first, tseed, p->low, p->high,
                                  err);
}
