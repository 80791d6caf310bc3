/*
 * residents.h - weights the process holds on its devices after a warm_load:
 * the arenas, the tensor table, and what they cost. Shared by the warm_load
 * job (which adds residents), the HTTP handlers (list, get, digest, unload),
 * the export socket (hands arenas to other processes) and metrics.
 *
 * A resident is reference counted: a digest or an export in progress keeps
 * its arenas alive even while an unload removes it from the set.
 * Residents are recorded (by the server, in its store: see res_records) so
 * that, after a restart, those of the dead process are listed as "gone".
 */
#ifndef MP_LOADER_RESIDENTS_H
#define MP_LOADER_RESIDENTS_H
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "gpu/gpu.h"
#include "util/tensor/tensor.h"
#include "util/error.h"

typedef struct resident_set resident_set;

/* Where residents are recorded. The server backs it with its store; NULL
 * (tests, tools) keeps residents in memory only. The recorder reports its
 * own failures (a resident that could not be recorded still works; it is
 * only missing from the list after a restart), hence no results here. */
typedef struct res_records {
    void *ctx;
    void (*put)(void *ctx, const char *id, const char *model, const char *revision,
                const char *state, json_t *doc);
    void (*set_state)(void *ctx, const char *id, const char *state);
    json_t *(*list)(void *ctx);                /* every recorded doc, with "state" */
    json_t *(*get)(void *ctx, const char *id); /* NULL when unknown */
} res_records;

typedef struct res_tensor {
    char *name;     /* owned */
    mp_dtype dtype; /* MP_DT_GGML + ggml_type for quantized blocks */
    int ggml_type;
    int ndim;
    int64_t shape[MP_MAX_DIMS];
    int device;      /* device index in the gpu_set */
    int rank;        /* tensor-parallel rank */
    uint64_t offset; /* in the device's arena */
    uint64_t bytes;
} res_tensor;

/* What a loader hands over. res_add takes ownership of everything in it. */
typedef struct res_spec {
    char *model, *revision;             /* owned */
    gpu_arena *arenas[GPU_MAX_DEVICES]; /* by device index; NULL where unused */
    res_tensor *tensors;                /* owned array */
    size_t ntensors;
    json_t *load; /* the load's result figures (owned), shown in the doc */
} res_spec;

/* on_change is called (outside locks) with a small JSON event after every
 * add or remove; the server publishes it on the event hub. */
typedef void (*res_change_fn)(void *arg, const char *event_json);

/* records is copied; may be NULL. */
resident_set *res_set_new(const res_records *records, gpu_set *gpus, res_change_fn fn, void *arg);
/* Frees every resident's arenas (process exit). */
void res_set_free(resident_set *s);

/* Adds a resident; *id_out (>= 32 bytes) receives "r_<hex>". On failure the
 * spec is still consumed (arenas freed). */
int res_add(resident_set *s, res_spec *spec, char *id_out, mp_error *err);
/* res_remove's answer when a borrowed handle was handed out. */
#define RES_EXPORTED (-2)
/* Unloads: 0 done, -1 unknown id. Memory is freed once no reader holds it.
 * RES_EXPORTED (nothing done) when res_export handed out a handle that does
 * not keep the memory alive (gpu_export.borrowed: a CUDA IPC handle) and
 * force is false: another process may still use the memory, and freeing it
 * would pull it from under that process (a memfd needs no such care: the
 * kernel keeps it until the last mapping goes). */
int res_remove(resident_set *s, const char *id, bool force);
/* Summaries of live residents plus those recorded as gone/unloaded. */
json_t *res_list(resident_set *s);
/* One resident with its tensor table; NULL when unknown. Gone residents
 * (of a dead process) come from the store without a table. */
json_t *res_get(resident_set *s, const char *id);
/* Reads every tensor back from its device: {"tensors":[{"name","sha256"}]}.
 * -1 with err "not_found" for an unknown id. */
int res_digest(resident_set *s, const char *id, json_t **out, mp_error *err);
/* True when a live resident holds this model. */
bool res_model_resident(resident_set *s, const char *model);
/* Calls fn for each live resident's (model, total bytes). */
void res_each_bytes(resident_set *s, void (*fn)(void *, const char *, uint64_t), void *arg);

/* Export for another process: the description (tensor table, per-device
 * arena sizes, CUDA IPC handles) and, for host arenas, dup'ed memfds in
 * device order (*nfds of them, caller closes). */
int res_export(resident_set *s, const char *id, json_t **desc, int *fds, int *nfds, mp_error *err);
#endif
