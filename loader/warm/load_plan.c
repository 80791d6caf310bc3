/* load_plan.c - the warm_load plan: every (tensor, rank) pair becomes an
 * item with its output dtype, shape, slice and arena offset. Items keep
 * file order (file, then data offset) so the readers walk each file
 * forwards, which is what page cache read-ahead and O_DIRECT like. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/formats/gguf/gguf.h"
#include "loader/warm/warm.h"
#include "loader/tp_rules/tp_rules.h"
#include "util/tensor/cast.h"

static bool is_target(mp_dtype d) {
    return d == MP_DT_F32 || d == MP_DT_F16 || d == MP_DT_BF16;
}

static bool contiguous_view(const mp_tensor *t) {
    if (!t->is_view) return true;
    int64_t expect = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] != 1 && t->strides[d] != expect) return false;
        expect *= t->shape[d];
    }
    return true;
}

typedef struct tref {
    uint32_t file;
    const mp_tensor *t;
} tref;

static int cmp_tref_pos(const void *a, const void *b) {
    const tref *x = a, *y = b;
    if (x->file != y->file) return x->file < y->file ? -1 : 1;
    if (x->t->file_index != y->t->file_index) return x->t->file_index < y->t->file_index ? -1 : 1;
    if (x->t->data_offset != y->t->data_offset)
        return x->t->data_offset < y->t->data_offset ? -1 : 1;
    return strcmp(x->t->name, y->t->name);
}

typedef struct nref {
    const char *name;
    int rank;
} nref;

static int cmp_nref(const void *a, const void *b) {
    const nref *x = a, *y = b;
    if (x->rank != y->rank) return x->rank < y->rank ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The tensor-parallel slice of t for rank r, by the shard issue's rules
 * (loader/tp_rules.h) under HF naming: each tensor keeps its checkpoint
 * name, a rank gets exactly the bytes SGLang's layer would hold. *dropped:
 * the rules keep nothing of it (rotary inv_freq). */
static int plan_tp_slice(const tp_model_cfg *cfg, const mp_tensor *t, int tp, int rank,
                         load_slice *sl, int64_t *out_shape, bool *dropped, mp_error *err) {
    memcpy(out_shape, t->shape, sizeof t->shape);
    sl->dim = -1;
    sl->nseg = 0;
    *dropped = false;
    if (tp == 1) return 0;
    tp_slice ts;
    if (tp_slice_for(cfg, t, tp, rank, TP_NAMING_HF, &ts, err) != 0) return -1;
    if (ts.dropped) {
        *dropped = true;
        return 0;
    }
    if (ts.dim < 0) return 0;
    if (ts.dim >= t->ndim || ts.nseg < 1 || ts.nseg > LOAD_MAX_SEGS)
        return mp_err(err, "internal", "tp rule for %s out of range", t->name);
    sl->dim = ts.dim;
    sl->nseg = ts.nseg;
    int64_t ext = 0;
    for (int i = 0; i < ts.nseg; i++) {
        int64_t st = ts.seg[i].start, l = ts.seg[i].len;
        if (l < 0 || (st >= 0 && (st > t->shape[ts.dim] || l > t->shape[ts.dim] - st)))
            return mp_err(err, "internal", "tp rule for %s cuts outside the tensor", t->name);
        sl->seg[i].start = st;
        sl->seg[i].len = l;
        ext += l;
    }
    out_shape[ts.dim] = ext;
    return 0;
}

/* With tp > 1 on an unsharded checkpoint, the split rules come from its
 * config.json; cfg is zeroed otherwise. */
static int plan_tp_config(const load_source *src, int tp, bool sharded, tp_model_cfg *cfg,
                          mp_error *err) {
    memset(cfg, 0, sizeof *cfg);
    if (tp <= 1 || sharded) return 0;
    if (!src->config)
        return mp_err_field(err, "params.tp_size", "bad_request",
                            "tp_size > 1 needs the model's config.json for the split rules");
    if (tp_config_from_json(src->config, cfg, err) != 0 || tp_check(cfg, tp, err) != 0) {
        snprintf(err->field, sizeof err->field, "params.tp_size");
        return -1;
    }
    return 0;
}

/* Every tensor of every file: refs (to be put in file order) and names
 * with their rank (to find a tensor two files hold). */
static int plan_refs(const load_source *src, bool sharded, tref **refs_out, nref **names_out,
                     size_t *n_out, mp_error *err) {
    size_t n = 0;
    for (size_t f = 0; f < src->nfiles; f++)
        n += src->files[f].w->ntensors;
    tref *refs = calloc(n ? n : 1, sizeof *refs);
    nref *names = calloc(n ? n : 1, sizeof *names);
    if (!refs || !names) {
        free(refs);
        free(names);
        return mp_err(err, "no_memory", "out of memory");
    }
    size_t k = 0;
    for (size_t f = 0; f < src->nfiles; f++)
        for (size_t i = 0; i < src->files[f].w->ntensors; i++) {
            refs[k].file = (uint32_t)f;
            refs[k].t = &src->files[f].w->tensors[i];
            names[k].name = refs[k].t->name;
            names[k].rank = sharded ? src->files[f].rank : 0;
            k++;
        }
    *refs_out = refs;
    *names_out = names;
    *n_out = n;
    return 0;
}

static int check_unique_names(nref *names, size_t n, mp_error *err) {
    qsort(names, n, sizeof *names, cmp_nref);
    for (size_t i = 1; i < n; i++)
        if (cmp_nref(&names[i - 1], &names[i]) == 0)
            return mp_err(err, "bad_header", "tensor %s appears in two files", names[i].name);
    return 0;
}

typedef struct plan_ctx {
    const load_source *src;
    const load_plan_opts *o;
    const tp_model_cfg *cfg;
    bool sharded;
    load_plan *plan;
} plan_ctx;

/* How the item is produced and in which dtype: GGML blocks are dequantized
 * when a dtype is asked for and they can be, else kept as they are; other
 * dtypes are cast when they can be. */
static void item_kind(const load_plan_opts *o, const mp_tensor *t, load_item *it) {
    bool want = o->dtype != MP_DT_INVALID;
    if (t->dtype == MP_DT_GGML) {
        if (want && gguf_can_dequant(t->ggml_type)) {
            it->kind = LOAD_K_DEQUANT;
            it->out_dtype = o->dtype;
        } else {
            it->kind = o->dummy ? LOAD_K_ZERO : LOAD_K_FILE;
        }
    } else {
        if (want && tensor_cast_supported(t->dtype, o->dtype)) it->out_dtype = o->dtype;
        if (o->dummy)
            it->kind = is_target(it->out_dtype) ? LOAD_K_DUMMY : LOAD_K_ZERO;
        else
            it->kind = contiguous_view(t) ? LOAD_K_FILE : LOAD_K_VIEW;
    }
}

/* The item's bytes, at the next aligned offset of its device's arena. */
static int item_place(load_plan *plan, const mp_tensor *t, load_item *it, mp_error *err) {
    if (it->out_dtype == MP_DT_GGML) {
        it->bytes = t->data_bytes;
    } else if (!mp_tensor_bytes(it->out_dtype, it->shape, it->ndim, &it->bytes)) {
        return mp_err(err, "bad_header", "tensor %s: size overflows", t->name);
    }
    uint64_t *end = &plan->arena_bytes[it->device];
    uint64_t off = (*end + GPU_ARENA_ALIGN - 1) / GPU_ARENA_ALIGN * GPU_ARENA_ALIGN;
    if (off < *end || off + it->bytes < off)
        return mp_err(err, "too_large", "arena size overflows");
    it->offset = off;
    *end = off + it->bytes;
    plan->total_bytes += it->bytes;
    return 0;
}

/* The rank's piece of a tensor the load quantizes: one LOAD_K_QUANT item
 * per part (the quantized weight, its scales, bitsandbytes' state), each
 * at its own aligned offset, with the part's name, dtype and shape. `it` is
 * the planned (sliced, unplaced) item of the source. */
static int plan_quant_parts(const plan_ctx *pc, const load_item *planned, mp_error *err) {
    load_plan *plan = pc->plan;
    /* A copy: the first part is written over the planned item's slot. */
    const load_item base = *planned, *it = &base;
    load_quant *q = &plan->quants[plan->nquants];
    uint64_t shape[2] = {(uint64_t)it->shape[0], (uint64_t)it->shape[1]};
    if (qz_plan_tensor(pc->o->quant, it->src->name, it->src->dtype, shape, &q->qz, err) != 0)
        return -1;
    for (int k = 0; k < q->qz.n; k++) {
        const qz_part *pt = &q->qz.parts[k];
        load_item *pi = &plan->items[plan->nitems];
        *pi = *it;
        pi->kind = LOAD_K_QUANT;
        pi->name = pt->name;
        pi->out_dtype = pt->dtype;
        pi->ndim = pt->ndim;
        memset(pi->shape, 0, sizeof pi->shape);
        for (int d = 0; d < pt->ndim; d++)
            pi->shape[d] = (int64_t)pt->shape[d];
        pi->part = k;
        pi->quant = (uint32_t)plan->nquants;
        /* Sizes come from the plan: a scalar's shape gives no bytes. */
        uint64_t *end = &plan->arena_bytes[pi->device];
        uint64_t off = (*end + GPU_ARENA_ALIGN - 1) / GPU_ARENA_ALIGN * GPU_ARENA_ALIGN;
        if (off < *end || off + pt->nbytes < off)
            return mp_err(err, "too_large", "arena size overflows");
        pi->offset = off;
        pi->bytes = pt->nbytes;
        *end = off + pt->nbytes;
        plan->total_bytes += pt->nbytes;
        plan->quant_bytes_out += pt->nbytes;
        plan->nitems++;
    }
    plan->quant_bytes_in += shape[0] * shape[1] * (mp_dtype_bits(it->src->dtype) / 8);
    plan->nquants++;
    return 0;
}

/* Whether the load quantizes this (sliced) item. */
static bool item_quantized(const load_plan_opts *o, const load_item *it) {
    return o->quant && it->kind != LOAD_K_DEQUANT &&
           qz_select(it->src->name, it->src->dtype, it->src->ndim, o->quant_ignore,
                     o->quant_nignore, true, NULL) == QZ_SEL_QUANTIZE &&
           it->shape[0] > 0 && it->shape[1] > 0;
}

/* Rank r's item of tensor ref: appended to the plan unless the tp rules
 * drop the tensor. */
static int plan_item(const plan_ctx *pc, const tref *ref, int r, mp_error *err) {
    const load_plan_opts *o = pc->o;
    const mp_tensor *t = ref->t;
    load_plan *plan = pc->plan;
    load_item *it = &plan->items[plan->nitems];
    memset(it, 0, sizeof *it);
    it->file = ref->file;
    it->src = t;
    it->name = t->name;
    it->rank = r;
    it->device = o->devices[r];
    it->ndim = t->ndim;
    it->ggml_type = t->ggml_type;
    it->out_dtype = t->dtype;
    item_kind(o, t, it);
    if (pc->sharded || t->dtype == MP_DT_GGML) {
        memcpy(it->shape, t->shape, sizeof t->shape);
        it->slice.dim = -1;
    } else {
        bool dropped;
        if (plan_tp_slice(pc->cfg, t, o->tp_size, r, &it->slice, it->shape, &dropped, err) != 0)
            return -1;
        if (dropped) return 0;
    }
    if (it->slice.dim >= 0 && mp_dtype_bits(t->dtype) % 8 != 0)
        return mp_err(err, "bad_request", "cannot split %s (sub-byte dtype)", t->name);
    if (item_quantized(o, it)) return plan_quant_parts(pc, it, err);
    if (item_place(plan, t, it, err) != 0) return -1;
    plan->nitems++;
    return 0;
}

/* One item per (tensor, rank): the rank of its file for a sharded
 * checkpoint, every rank otherwise; refs are in file order. */
static int plan_items(const plan_ctx *pc, const tref *refs, size_t n, mp_error *err) {
    size_t per = pc->sharded ? 1 : (size_t)pc->o->tp_size, cap = 0, icap = 0;
    size_t parts = pc->o->quant ? QZ_MAX_PARTS : 1;
    if (__builtin_mul_overflow(n, per, &cap) || __builtin_mul_overflow(cap, parts, &icap))
        return mp_err(err, "too_large", "too many tensors");
    if (!(pc->plan->items = calloc(icap ? icap : 1, sizeof *pc->plan->items)))
        return mp_err(err, "no_memory", "out of memory");
    if (pc->o->quant && !(pc->plan->quants = calloc(cap ? cap : 1, sizeof *pc->plan->quants)))
        return mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; i < n; i++) {
        int r0 = pc->sharded ? pc->src->files[refs[i].file].rank : 0;
        int r1 = pc->sharded ? r0 + 1 : pc->o->tp_size;
        for (int r = r0; r < r1; r++)
            if (plan_item(pc, &refs[i], r, err) != 0) return -1;
    }
    return 0;
}

/* Quantizing twice multiplies the error, and the loaders would not know
 * the result: a declared quantization, tensors already in a quantized
 * dtype or carrying quantization scales, and GGUF blocks are refused. */
static int quant_source_check(const load_source *src, const load_plan_opts *o, mp_error *err) {
    if (o->dtype != MP_DT_INVALID || o->dummy)
        return mp_err_field(err, "params.quantize", "param_conflict",
                            "quantize cannot be combined with dtype or a dummy load");
    if (qz_params_check(o->quant, err) != 0) return -1;
    const char *instead = "load it without quantize, or quantize its unquantized original";
    for (size_t f = 0; f < src->nfiles; f++) {
        const mp_weights *w = src->files[f].w;
        if (qz_check_source(f == 0 ? src->config : NULL, w->tensors, w->ntensors, instead, err) !=
            0)
            return -1;
        for (size_t i = 0; i < w->ntensors; i++) {
            mp_dtype d = w->tensors[i].dtype;
            if (d == MP_DT_GGML)
                return mp_err(err, "unsupported_format",
                              "tensor %s is GGUF blocks: quantize loads safetensors or PyTorch "
                              "checkpoints in F32/F16/BF16",
                              w->tensors[i].name);
        }
    }
    return 0;
}

int load_plan_build(const load_source *src, const load_plan_opts *o, load_plan *plan,
                    mp_error *err) {
    memset(plan, 0, sizeof *plan);
    int tp = o->tp_size;
    if (tp < 1 || tp > GPU_MAX_DEVICES) return mp_err(err, "bad_request", "tp_size out of range");
    plan->tp_size = tp;
    for (int r = 0; r < tp; r++)
        plan->devices[r] = o->devices[r];
    if (o->dtype != MP_DT_INVALID && !is_target(o->dtype))
        return mp_err(err, "bad_request", "dtype must be bf16, fp16 or fp32");
    bool sharded = src->format == LOAD_FMT_SHARDED_STATE;
    if (src->format == LOAD_FMT_GGUF && tp > 1)
        return mp_err_field(err, "params.tp_size", "bad_request",
                            "a GGUF checkpoint loads on one device (tp_size 1)");

    if (o->quant) {
        if (quant_source_check(src, o, err) != 0) return -1;
        plan->qparams = *o->quant;
    }
    tp_model_cfg cfg;
    if (plan_tp_config(src, tp, sharded, &cfg, err) != 0) return -1;
    tref *refs = NULL;
    nref *names = NULL;
    size_t n = 0;
    if (plan_refs(src, sharded, &refs, &names, &n, err) != 0) return -1;
    int rc = check_unique_names(names, n, err);
    free(names);
    qsort(refs, n, sizeof *refs, cmp_tref_pos);
    plan_ctx pc = {.src = src, .o = o, .cfg = &cfg, .sharded = sharded, .plan = plan};
    if (rc == 0) rc = plan_items(&pc, refs, n, err);
    free(refs);
    if (rc == 0 && o->quant && plan->nquants == 0)
        rc = mp_err(err, "nothing_to_quantize",
                    "no tensor is quantized: every 2-D weight is ignored or not F32/F16/BF16");
    if (rc != 0) load_plan_free(plan);
    return rc;
}

void load_plan_free(load_plan *plan) {
    free(plan->items);
    free(plan->quants);
    memset(plan, 0, sizeof *plan);
}
