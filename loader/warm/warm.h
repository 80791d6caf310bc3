/*
 * warm.h - the warm_load pipeline (load_ prefix), free of HTTP and tasks so
 * unit tests can drive it:
 *
 *   load_source_open  which files, in which format (auto as SGLang picks)
 *   load_plan_build   which tensors go to which rank and device, in which
 *                     dtype, at which 256-byte aligned offset of one arena
 *                     per device; tensor-parallel slices by loader/tp_rules.h
 *   load_run          allocates the arenas (after checking free memory),
 *                     then reader threads pread (optionally O_DIRECT) into a
 *                     ring of pinned staging slots and queue the copies on
 *                     each device's stream; fences tell when a slot may be
 *                     refilled, so reading and copying overlap and staging
 *                     memory stays at staging_bytes whatever the model size.
 *
 * Every transformation a tensor needs happens in the reader on its way into
 * a slot: a tensor-parallel slice (runs gathered from the source rows), a
 * dtype cast (F32/F16/BF16/F64/F8 -> F32/F16/BF16: tensor_cast's), a GGUF
 * dequantization, the decryption of an encrypted safetensors file (chunks verified before use).
 * Only a strided PyTorch view is materialized whole in host memory first,
 * and a tensor quantized on the fly (load_plan_opts.quant): its rank's piece
 * is gathered, quantized (loader/quantize) and its parts streamed through
 * the same ring, so the arenas need not be CPU-addressable.
 */
#ifndef MP_LOADER_WARM_H
#define MP_LOADER_WARM_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "gpu/gpu.h"
#include "loader/formats/safetensors/safetensors.h"
#include "loader/formats/weights.h"
#include "loader/quantize/quantize.h"
#include "util/error.h"

#define LOAD_MAX_SEGS 16
#define LOAD_DEFAULT_STAGING (256ull << 20)
#define LOAD_MIN_STAGING (64ull << 10)

typedef enum load_format {
    LOAD_FMT_AUTO = 0,
    LOAD_FMT_SAFETENSORS,
    LOAD_FMT_PT,
    LOAD_FMT_GGUF,
    LOAD_FMT_NPCACHE,
    LOAD_FMT_SHARDED_STATE,
    LOAD_FMT_DUMMY,
} load_format;

/* "auto" ... "dummy"; -1 when unknown. */
int load_format_from_name(const char *s);
const char *load_format_name(load_format f);

/* ---- sources ---- */

typedef struct load_file {
    mp_weights *w;  /* one opened weight file (or an npcache dir) */
    int rank;       /* sharded_state: the rank the file belongs to; else -1 */
    stc_file crypt; /* encryption parameters (crypt.encrypted false when plain) */
    int *dio_fds;   /* O_DIRECT fds per w->files entry, -1 where unavailable */
} load_file;

typedef struct load_source {
    load_format format; /* resolved: never AUTO; DUMMY keeps the headers' shapes */
    load_file *files;
    size_t nfiles;
    json_t *config; /* config.json of the model dir, or NULL */
    bool encrypted; /* at least one file is */
} load_source;

/* Opens the weights of model_dir in format fmt (AUTO: *.safetensors (only
 * those of model.safetensors.index.json when present), else *.bin, else
 * *.pt, else a *.gguf; dummy uses whichever of these exists for shapes, else
 * an npcache, else config.json of a dense llama-family model).
 * sharded_state: model-rank-{r}-part-{p}.safetensors for r < tp_size.
 * Errors: "not_found" (no weights), and the readers' codes. */
int load_source_open(const char *model_dir, load_format fmt, int tp_size, load_source *src,
                     mp_error *err);
void load_source_free(load_source *src);
/* Opens O_DIRECT descriptors next to the normal ones (where the file system
 * allows; others read through the page cache). */
void load_source_open_direct(load_source *src);
/* Appends an opened weight file (src takes w, also on failure): for a
 * source built by hand, e.g. from headers read over the network. */
int load_source_add(load_source *src, mp_weights *w, mp_error *err);

/* ---- plan ---- */

typedef enum load_kind {
    LOAD_K_FILE = 0, /* bytes from the file, maybe sliced and cast */
    LOAD_K_VIEW,     /* a strided PyTorch view: materialized, then as FILE */
    LOAD_K_DEQUANT,  /* ggml blocks dequantized on the CPU */
    LOAD_K_DUMMY,    /* gpu_fill_dummy on the device */
    LOAD_K_ZERO,     /* zeros (a dummy load's non-float tensors) */
    LOAD_K_QUANT,    /* part `part` of the rank's piece, quantized on the CPU */
} load_kind;

/* A slice along dim: the output's extent along dim is the concatenation of
 * segments [start, start + len) of the source's (start < 0: len zero rows,
 * e.g. vocabulary padding). dim < 0: the whole tensor. */
typedef struct load_slice {
    int dim;
    int nseg;
    struct {
        int64_t start, len;
    } seg[LOAD_MAX_SEGS];
} load_slice;

typedef struct load_item {
    uint32_t file;        /* index into src->files */
    const mp_tensor *src; /* borrowed from that file's weights */
    const char *name;     /* the output's name: src->name, or a quantized part's */
    load_kind kind;
    int rank, device;   /* device: index in the gpu set */
    mp_dtype out_dtype; /* MP_DT_GGML for blocks kept as they are */
    int ggml_type;
    int ndim;
    int64_t shape[MP_MAX_DIMS]; /* output shape */
    load_slice slice;
    uint64_t offset, bytes; /* in the device's arena */
    /* LOAD_K_QUANT: the part's index in plan->quants[quant] (a tensor's
     * parts are consecutive items, part 0 first; the reader of part 0
     * quantizes once and writes them all). */
    int part;
    uint32_t quant;
} load_item;

/* One quantized (tensor, rank): the parts and the rank's piece (qz->rows x
 * qz->cols in the source dtype). */
typedef struct load_quant {
    qz_plan qz;
} load_quant;

typedef struct load_plan {
    load_item *items;
    size_t nitems;
    int tp_size;
    int devices[GPU_MAX_DEVICES];          /* rank -> device index */
    uint64_t arena_bytes[GPU_MAX_DEVICES]; /* by device index */
    uint64_t total_bytes;
    load_quant *quants; /* nquants of them, when the load quantizes */
    size_t nquants;
    qz_params qparams;
    uint64_t quant_bytes_in, quant_bytes_out; /* the quantized pieces, before and after */
} load_plan;

typedef struct load_plan_opts {
    int tp_size;        /* >= 1 */
    const int *devices; /* rank -> device index (tp_size entries) */
    mp_dtype dtype;     /* MP_DT_INVALID keeps each tensor's dtype */
    bool dummy;         /* fill instead of reading */
    /* Quantize on the fly (NULL: no): the tensors qz_select picks
     * (with the extra ignore patterns), each rank's piece after its
     * tensor-parallel slice, as SGLang's BitsAndBytesModelLoader does. */
    const qz_params *quant;
    const char *const *quant_ignore;
    size_t quant_nignore;
} load_plan_opts;

/* Errors: "bad_request" (a dtype that cannot be cast, a tensor the tp
 * rules cannot split), "too_large"; with quant: "already_quantized" (the
 * config declares a quantization, or tensors are already FP8/INT8/FP4 or
 * carry quantization scales), "unsupported_format" (GGUF blocks),
 * "nothing_to_quantize". */
int load_plan_build(const load_source *src, const load_plan_opts *o, load_plan *plan,
                    mp_error *err);
void load_plan_free(load_plan *plan);

/* ---- run ---- */

typedef struct load_run_opts {
    uint64_t staging_bytes; /* 0: LOAD_DEFAULT_STAGING */
    int readers;            /* 0: a default from the CPU count */
    bool direct_io;         /* read through O_DIRECT where possible */
    bool host_direct;       /* host arenas: pread straight into the arena */
    /* Casts and GGUF dequantization on the device (gpu_cast, gpu_dequant):
     * the file's raw bytes go through staging into a device scratch area
     * (a slot's worth per slot) and the kernel writes the tensor, so an
     * up-cast or a Q4_K -> bf16 load sends 2-3.5x fewer bytes over PCIe.
     * Whole tensors only (a tensor-parallel slice is gathered and cast on
     * the CPU), and pairs the device supports. The job turns it on for CUDA
     * sets; the async backend runs the same path in tests. */
    bool device_convert;
    const unsigned char *key; /* decryption key, or NULL */
    /* Where the bytes come from when the files are not local (warm_load
     * straight from s3://: loader/jobs wires in a ranged-GET reader): len
     * bytes at byte off of file `part` of src->files[file]; called from the
     * reader threads at once. NULL: pread of the files' descriptors. With
     * it, runs of small neighbouring tensors of one file are fetched with
     * one call of up to a slot (each reader holds one slot-sized buffer for
     * that), and splice and O_DIRECT are off. */
    int (*read_at)(void *arg, uint32_t file, uint32_t part, uint64_t off, void *dst, uint64_t len,
                   mp_error *err);
    void *read_arg;
    float dummy_low, dummy_high;
    uint64_t dummy_seed;
    /* Called from the calling thread only, a few times a second. */
    void *cb;
    bool (*cancelled)(void *cb);
    void (*progress)(void *cb, uint64_t done, uint64_t total);
} load_run_opts;

typedef struct load_stats {
    double read_s, copy_s, pipeline_s, alloc_s; /* read_s/copy_s: summed over threads */
    uint64_t bytes_read;                        /* from files */
    uint64_t reads;                             /* read_at calls (0 without one) */
    uint64_t peak_host_bytes;                   /* staging + scratch + materialized views */
    uint64_t free_before[GPU_MAX_DEVICES], free_after[GPU_MAX_DEVICES];
    int readers, slots;
    uint64_t slot_bytes;
    uint64_t device_converted;    /* output bytes cast or dequantized on the device */
    bool reused[GPU_MAX_DEVICES]; /* the device's arena came from the pool */
} load_stats;

/* Allocates one arena per used device (error "insufficient_device_memory"
 * when a device lacks the room: checked before, and from the allocation
 * itself) and fills it. On success arenas[dev] hold the weights (caller
 * owns them); on any failure or cancel ("cancelled") nothing is left
 * allocated. */
int load_run(gpu_set *gpus, const load_source *src, const load_plan *plan, const load_run_opts *o,
             gpu_arena *arenas[GPU_MAX_DEVICES], load_stats *st, mp_error *err);

#endif
