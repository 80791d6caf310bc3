/*
 * pt_load.c - pt_open: PyTorch checkpoints without Python.
 *
 * The pickle runs under a fixed allowlist (the part of torch's weights_only
 * table a state dict needs); any other global is refused as unsafe_pickle
 * before anything could be done with it, and nothing is ever called: the
 * policy callbacks below only build descriptors. Persistent ids become
 * storage records (one per key, which is what makes tied weights
 * recognizable), _rebuild_tensor* become tensor references, and the state
 * dict (possibly under a {"state_dict": ...} style wrapper) becomes the
 * mp_tensor table. Storage bytes are only located, never read.
 *
 * Layouts: /work/shared/reference/weight-formats.md §2.
 */
#include "loader/formats/pytorch/pytorch.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/formats/pytorch/pickle_internal.h"
#include "loader/formats/pytorch/pt_zip_internal.h"
#include "loader/formats/formats_internal.h"

#define PT_MAX_PICKLE ((uint64_t)1 << 30)
#define PT_LEGACY_FIRST_READ ((size_t)4 << 20)
#define PT_MAX_STORAGES ((size_t)1 << 24)
#define PT_MAX_UNWRAP 4
#define PT_MAX_FROM_TYPE 4

/* ---- the allowlist ----------------------------------------------------- */

enum {
    G_ODICT = 1,
    G_REBUILD_T,
    G_REBUILD_T2,
    G_REBUILD_T3,
    G_REBUILD_P,
    G_REBUILD_PS,
    G_FROM_TYPE2,
    G_SIZE,
    G_DEVICE,
    G_LAYOUT,
    G_CODECS,
    G_BYTEARRAY,
    G_SET,
    G_PARAM_CLS,
    G_TENSOR_CLS,
    G_UNTYPED,
    G_REJECTED_FN, /* torch allows it, we cannot represent it */
    G_STORAGE = 1000,
    G_DTYPE = 2000,
};

typedef struct named_global {
    const char *module, *name;
    int id;
} named_global;

static const named_global globals_tab[] = {
    {"collections", "OrderedDict", G_ODICT},
    {"torch._utils", "_rebuild_tensor", G_REBUILD_T},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_T2},
    {"torch._utils", "_rebuild_tensor_v3", G_REBUILD_T3},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_P},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PS},
    {"torch._tensor", "_rebuild_from_type_v2", G_FROM_TYPE2},
    {"torch", "Size", G_SIZE},
    {"torch", "device", G_DEVICE},
    {"torch.serialization", "_get_layout", G_LAYOUT},
    {"_codecs", "encode", G_CODECS},
    {"builtins", "bytearray", G_BYTEARRAY},
    {"__builtin__", "bytearray", G_BYTEARRAY},
    {"builtins", "set", G_SET},
    {"__builtin__", "set", G_SET},
    {"torch.nn.parameter", "Parameter", G_PARAM_CLS},
    {"torch", "Tensor", G_TENSOR_CLS},
    {"torch._tensor", "Tensor", G_TENSOR_CLS},
    {"torch", "UntypedStorage", G_UNTYPED},
    {"torch.storage", "UntypedStorage", G_UNTYPED},
    {"torch._utils", "_rebuild_qtensor", G_REJECTED_FN},
    {"torch._utils", "_rebuild_sparse_tensor", G_REJECTED_FN},
    {"torch._utils", "_rebuild_sparse_csr_tensor", G_REJECTED_FN},
    {"torch._utils", "_rebuild_meta_tensor_no_storage", G_REJECTED_FN},
    {"torch._utils", "_rebuild_wrapper_subclass", G_REJECTED_FN},
    {"torch._utils", "_rebuild_device_tensor_from_numpy", G_REJECTED_FN},
    {"torch._utils", "_rebuild_device_tensor_from_cpu_tensor", G_REJECTED_FN},
    {"torch._utils", "_rebuild_xla_tensor", G_REJECTED_FN},
    {"torch._utils", "_rebuild_mps_tensor", G_REJECTED_FN},
    {"torch._utils", "_rebuild_nested_tensor", G_REJECTED_FN},
};

/* Legacy typed storage classes ("torch FloatStorage"); elem_size is kept for
 * the ones we cannot represent so their records can still be located. */
typedef struct storage_type {
    const char *name;
    mp_dtype dtype; /* MP_DT_INVALID: known, not supported */
    unsigned elem_size;
} storage_type;

static const storage_type storage_tab[] = {
    {"FloatStorage", MP_DT_F32, 4},        {"DoubleStorage", MP_DT_F64, 8},
    {"HalfStorage", MP_DT_F16, 2},         {"BFloat16Storage", MP_DT_BF16, 2},
    {"LongStorage", MP_DT_I64, 8},         {"IntStorage", MP_DT_I32, 4},
    {"ShortStorage", MP_DT_I16, 2},        {"CharStorage", MP_DT_I8, 1},
    {"ByteStorage", MP_DT_U8, 1},          {"BoolStorage", MP_DT_BOOL, 1},
    {"ComplexFloatStorage", MP_DT_C64, 8}, {"ComplexDoubleStorage", MP_DT_INVALID, 16},
    {"QInt8Storage", MP_DT_INVALID, 1},    {"QUInt8Storage", MP_DT_INVALID, 1},
    {"QInt32Storage", MP_DT_INVALID, 4},   {"QUInt4x2Storage", MP_DT_INVALID, 1},
    {"QUInt2x4Storage", MP_DT_INVALID, 1},
};

/* dtype objects ("torch float8_e4m3fn") as _rebuild_tensor_v3 takes them */
typedef struct dtype_name {
    const char *name;
    mp_dtype dtype;
} dtype_name;

static const dtype_name dtype_tab[] = {
    {"float32", MP_DT_F32},
    {"float", MP_DT_F32},
    {"float64", MP_DT_F64},
    {"double", MP_DT_F64},
    {"float16", MP_DT_F16},
    {"half", MP_DT_F16},
    {"bfloat16", MP_DT_BF16},
    {"int64", MP_DT_I64},
    {"long", MP_DT_I64},
    {"int32", MP_DT_I32},
    {"int", MP_DT_I32},
    {"int16", MP_DT_I16},
    {"short", MP_DT_I16},
    {"int8", MP_DT_I8},
    {"uint8", MP_DT_U8},
    {"bool", MP_DT_BOOL},
    {"complex64", MP_DT_C64},
    {"cfloat", MP_DT_C64},
    {"float8_e4m3fn", MP_DT_F8_E4M3},
    {"float8_e5m2", MP_DT_F8_E5M2},
    {"float8_e4m3fnuz", MP_DT_F8_E4M3FNUZ},
    {"float8_e5m2fnuz", MP_DT_F8_E5M2FNUZ},
    {"float8_e8m0fnu", MP_DT_F8_E8M0},
    {"uint16", MP_DT_U16},
    {"uint32", MP_DT_U32},
    {"uint64", MP_DT_U64},
    {"complex128", MP_DT_INVALID},
    {"cdouble", MP_DT_INVALID},
    {"complex32", MP_DT_INVALID},
    {"chalf", MP_DT_INVALID},
    {"qint8", MP_DT_INVALID},
    {"quint8", MP_DT_INVALID},
    {"qint32", MP_DT_INVALID},
    {"quint4x2", MP_DT_INVALID},
    {"quint2x4", MP_DT_INVALID},
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* ---- decoded objects --------------------------------------------------- */

enum { TAG_STORAGE = 1, TAG_TENSOR, TAG_DEVICE, TAG_OTHER };

typedef struct pt_storage {
    const char *key;    /* arena-owned */
    int type_id;        /* G_STORAGE + i, or G_UNTYPED */
    mp_dtype dtype;     /* MP_DT_INVALID for untyped or unsupported */
    unsigned elem_size; /* 1 for untyped (numel counts bytes) */
    uint64_t numel;     /* in elem_size units */
    uint64_t nbytes;
    uint64_t data_off; /* absolute, once located */
    bool located;
} pt_storage;

typedef struct pt_sref {
    size_t sid;
    uint64_t view_off; /* legacy storage views, in storage units */
    uint64_t view_numel;
} pt_sref;

typedef struct pt_tref {
    size_t sid;
    mp_dtype dtype;
    int ndim;
    int64_t shape[MP_MAX_DIMS];
    int64_t stride[MP_MAX_DIMS];
    int64_t offset; /* elements of dtype from the root storage's start */
} pt_tref;

typedef struct pt_ctx {
    bool legacy;
    pt_storage *st;
    size_t nst, capst;
    size_t *hash; /* storage index + 1; 0 = empty */
    size_t hcap;
    int from_type_depth;
} pt_ctx;

static void ctx_free(pt_ctx *c) {
    free(c->st);
    free(c->hash);
    memset(c, 0, sizeof *c);
}

static uint64_t str_hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static pt_storage *storage_find(pt_ctx *c, const char *key, size_t klen, size_t *sid) {
    if (!c->hcap) return NULL;
    size_t mask = c->hcap - 1, i = (size_t)str_hash(key, klen) & mask;
    while (c->hash[i]) {
        pt_storage *s = &c->st[c->hash[i] - 1];
        if (strlen(s->key) == klen && memcmp(s->key, key, klen) == 0) {
            *sid = c->hash[i] - 1;
            return s;
        }
        i = (i + 1) & mask;
    }
    return NULL;
}

static int storage_add(pt_ctx *c, const pt_storage *s, size_t *sid, mp_error *err) {
    if (c->nst >= PT_MAX_STORAGES) return mp_err(err, "too_large", "too many storages");
    if (c->nst == c->capst) {
        size_t cap = c->capst ? c->capst * 2 : 64;
        pt_storage *n = realloc(c->st, cap * sizeof *n);
        if (!n) return mp_err(err, "no_memory", "out of memory");
        c->st = n;
        c->capst = cap;
    }
    if ((c->nst + 1) * 2 > c->hcap) {
        size_t hcap = c->hcap ? c->hcap * 2 : 128;
        size_t *h = calloc(hcap, sizeof *h);
        if (!h) return mp_err(err, "no_memory", "out of memory");
        for (size_t k = 0; k < c->nst; k++) {
            size_t i = (size_t)str_hash(c->st[k].key, strlen(c->st[k].key)) & (hcap - 1);
            while (h[i])
                i = (i + 1) & (hcap - 1);
            h[i] = k + 1;
        }
        free(c->hash);
        c->hash = h;
        c->hcap = hcap;
    }
    c->st[c->nst] = *s;
    size_t i = (size_t)str_hash(s->key, strlen(s->key)) & (c->hcap - 1);
    while (c->hash[i])
        i = (i + 1) & (c->hcap - 1);
    c->hash[i] = c->nst + 1;
    *sid = c->nst++;
    return 0;
}

/* ---- policy callbacks -------------------------------------------------- */

static int pol_global(void *ctx, const char *mod, const char *name, mp_error *err) {
    (void)ctx;
    for (size_t i = 0; i < NELEM(globals_tab); i++)
        if (!strcmp(globals_tab[i].module, mod) && !strcmp(globals_tab[i].name, name))
            return globals_tab[i].id;
    if (!strcmp(mod, "torch") || !strcmp(mod, "torch.cuda")) {
        for (size_t i = 0; i < NELEM(storage_tab); i++)
            if (!strcmp(storage_tab[i].name, name)) return G_STORAGE + (int)i;
    }
    if (!strcmp(mod, "torch"))
        for (size_t i = 0; i < NELEM(dtype_tab); i++)
            if (!strcmp(dtype_tab[i].name, name)) return G_DTYPE + (int)i;
    return mp_err(err, "unsafe_pickle", "forbidden global %s.%s", mod, name);
}

static const char *gname(const pkl_value *g, char *buf, size_t n) {
    snprintf(buf, n, "%s.%s", g->u.global.module, g->u.global.name);
    return buf;
}

static bool get_int(const pkl_value *v, int64_t *out) {
    if (!v) return false;
    if (v->kind == PKL_INT) {
        *out = v->u.i;
        return true;
    }
    if (v->kind == PKL_BOOL) {
        *out = v->u.b;
        return true;
    }
    return false;
}

static int get_dims(const pkl_value *v, const char *what, int64_t *out, int *nd, bool signed_ok,
                    mp_error *err) {
    pkl_value **it;
    size_t n;
    if (!pkl_items(v, &it, &n))
        return mp_err(err, "bad_header", "tensor %s is a %s, not a tuple", what,
                      pkl_kind_name(v->kind));
    if (n > MP_MAX_DIMS)
        return mp_err(err, "unsupported_format", "tensor with %zu dimensions (at most %d)", n,
                      MP_MAX_DIMS);
    for (size_t i = 0; i < n; i++) {
        if (!get_int(it[i], &out[i]) || it[i]->kind != PKL_INT)
            return mp_err(err, "bad_header", "tensor %s holds a %s", what,
                          pkl_kind_name(it[i]->kind));
        if (out[i] < 0 && !signed_ok)
            return mp_err(err, "bad_header", "tensor %s has a negative entry", what);
        if (out[i] < 0) return mp_err(err, "unsupported_format", "tensor with a negative stride");
    }
    *nd = (int)n;
    return 0;
}

/* _rebuild_tensor*(storage, offset, size, stride, ...) -> tensor reference */
static pkl_value *make_tensor(pt_ctx *c, pkl_machine *m, pkl_value **a, mp_dtype want,
                              bool have_want, mp_error *err) {
    if (a[0]->kind != PKL_OBJ || a[0]->u.obj.tag != TAG_STORAGE) {
        mp_err(err, "bad_header", "tensor rebuilt from a %s instead of a storage",
               pkl_kind_name(a[0]->kind));
        return NULL;
    }
    const pt_sref *sr = a[0]->u.obj.ptr;
    const pt_storage *s = &c->st[sr->sid];
    mp_dtype dt;
    if (have_want) {
        if (s->type_id != G_UNTYPED && s->dtype != want) {
            mp_err(err, "bad_header", "storage '%s' rebuilt with a different dtype", s->key);
            return NULL;
        }
        dt = want;
    } else {
        if (s->type_id == G_UNTYPED) {
            mp_err(err, "bad_header", "storage '%s' is untyped but no dtype is given", s->key);
            return NULL;
        }
        dt = s->dtype;
    }
    if (dt == MP_DT_INVALID) {
        mp_err(err, "unsupported_format",
               "storage '%s' has a dtype with no safetensors "
               "equivalent (%s)",
               s->key,
               s->type_id >= G_STORAGE && s->type_id < G_DTYPE
                   ? storage_tab[s->type_id - G_STORAGE].name
                   : "unknown");
        return NULL;
    }
    unsigned es = mp_dtype_bits(dt) / 8;
    pt_tref *t = pkl_alloc(m, sizeof *t, err);
    if (!t) return NULL;
    t->sid = sr->sid;
    t->dtype = dt;
    int64_t off;
    if (!get_int(a[1], &off) || a[1]->kind != PKL_INT || off < 0) {
        mp_err(err, "bad_header", "tensor storage offset is not a non-negative int");
        return NULL;
    }
    int nd_stride;
    if (get_dims(a[2], "size", t->shape, &t->ndim, false, err) ||
        get_dims(a[3], "stride", t->stride, &nd_stride, true, err))
        return NULL;
    if (nd_stride != t->ndim) {
        mp_err(err, "bad_header", "tensor size and stride differ in length");
        return NULL;
    }
    /* available elements of dt in the (view of the) storage */
    uint64_t avail, voff;
    if (s->type_id == G_UNTYPED) {
        avail = sr->view_numel / es;
        if (sr->view_off % es) {
            mp_err(err, "bad_header", "storage view misaligned for its dtype");
            return NULL;
        }
        voff = sr->view_off / es;
    } else {
        avail = sr->view_numel;
        voff = sr->view_off;
    }
    uint64_t numel;
    if (!mp_shape_numel(t->shape, t->ndim, &numel)) {
        mp_err(err, "bad_header", "tensor size overflows");
        return NULL;
    }
    if (numel > 0) {
        uint64_t last = (uint64_t)off, ext;
        for (int i = 0; i < t->ndim; i++) {
            if (__builtin_mul_overflow((uint64_t)(t->shape[i] - 1), (uint64_t)t->stride[i], &ext) ||
                __builtin_add_overflow(last, ext, &last)) {
                mp_err(err, "bad_header", "tensor strides overflow");
                return NULL;
            }
        }
        if (last >= avail) {
            mp_err(err, "bad_header", "tensor reaches element %llu of storage '%s', which has %llu",
                   (unsigned long long)last, s->key, (unsigned long long)avail);
            return NULL;
        }
    } else if ((uint64_t)off > avail) {
        mp_err(err, "bad_header", "empty tensor offset beyond its storage");
        return NULL;
    }
    if ((uint64_t)off > (uint64_t)INT64_MAX - voff) {
        mp_err(err, "bad_header", "tensor offset overflows");
        return NULL;
    }
    t->offset = (int64_t)(voff + (uint64_t)off);
    return pkl_new_obj(m, TAG_TENSOR, t, err);
}

static bool is_tensor(const pkl_value *v) {
    return v && v->kind == PKL_OBJ && v->u.obj.tag == TAG_TENSOR;
}

static pkl_value *pol_reduce(void *ctx, pkl_machine *m, pkl_value *fn, pkl_value *args, bool is_new,
                             mp_error *err) {
    pt_ctx *c = ctx;
    pkl_value **a = args->u.seq.items;
    size_t n = args->u.seq.n;
    int id = fn->u.global.id;
    char nb[600];
    if (is_new && id != G_ODICT && id != G_PARAM_CLS && id != G_SET) {
        mp_err(err, "unsafe_pickle", "NEWOBJ of %s is not allowed", gname(fn, nb, sizeof nb));
        return NULL;
    }
    switch (id) {
    case G_ODICT: {
        pkl_value *d = pkl_new_value(m, PKL_DICT, err);
        if (!d) return NULL;
        if (n == 0) return d;
        pkl_value **it;
        size_t k;
        if (n == 1 && pkl_items(a[0], &it, &k) && k == 0) return d;
        mp_err(err, "unsupported_format", "OrderedDict built from arguments is not supported");
        return NULL;
    }
    case G_SET:
        if (n == 0) return pkl_new_value(m, PKL_SET, err);
        if (n == 1 && (a[0]->kind == PKL_LIST || a[0]->kind == PKL_TUPLE)) {
            pkl_value *s = pkl_new_value(m, PKL_SET, err);
            if (s) {
                /* share the items; cap = n makes a later ADDITEMS copy first */
                s->u.seq = a[0]->u.seq;
                s->u.seq.cap = s->u.seq.n;
            }
            return s;
        }
        break;
    case G_REBUILD_T:
    case G_REBUILD_T2:
        if ((id == G_REBUILD_T && n != 4) || (id == G_REBUILD_T2 && n != 6 && n != 7)) break;
        if (n == 7 && !(a[6]->kind == PKL_NONE || (a[6]->kind == PKL_DICT && !a[6]->u.dict.n))) {
            mp_err(err, "unsupported_format",
                   "tensor with extra metadata (conjugate/negative bits) is not supported");
            return NULL;
        }
        return make_tensor(c, m, a, MP_DT_INVALID, false, err);
    case G_REBUILD_T3: {
        if (n != 7 && n != 8) break;
        if (a[6]->kind != PKL_GLOBAL || a[6]->u.global.id < G_DTYPE) {
            mp_err(err, "bad_header", "_rebuild_tensor_v3 dtype argument is a %s",
                   pkl_kind_name(a[6]->kind));
            return NULL;
        }
        mp_dtype dt = dtype_tab[a[6]->u.global.id - G_DTYPE].dtype;
        if (dt == MP_DT_INVALID) {
            mp_err(err, "unsupported_format", "dtype torch.%s has no safetensors equivalent",
                   a[6]->u.global.name);
            return NULL;
        }
        if (n == 8 && !(a[7]->kind == PKL_NONE || (a[7]->kind == PKL_DICT && !a[7]->u.dict.n))) {
            mp_err(err, "unsupported_format",
                   "tensor with extra metadata (conjugate/negative bits) is not supported");
            return NULL;
        }
        return make_tensor(c, m, a, dt, true, err);
    }
    case G_REBUILD_P:
    case G_REBUILD_PS:
        if (n != (id == G_REBUILD_P ? 3u : 4u)) break;
        if (!is_tensor(a[0])) {
            mp_err(err, "bad_header", "parameter wraps a %s, not a tensor",
                   pkl_kind_name(a[0]->kind));
            return NULL;
        }
        return a[0];
    case G_PARAM_CLS:
        /* Parameter.__new__(Parameter, data[, requires_grad]) */
        if (n >= 1 && n <= 2 && is_tensor(a[0])) return a[0];
        break;
    case G_FROM_TYPE2: {
        /* (func, new_type, args, state): the tensor is func(*args) */
        if (n != 4) break;
        if (a[0]->kind != PKL_GLOBAL || a[1]->kind != PKL_GLOBAL ||
            (a[1]->u.global.id != G_TENSOR_CLS && a[1]->u.global.id != G_PARAM_CLS) ||
            a[2]->kind != PKL_TUPLE) {
            mp_err(err, "unsupported_format", "tensor subclass rebuild is not supported");
            return NULL;
        }
        if (c->from_type_depth >= PT_MAX_FROM_TYPE) {
            mp_err(err, "too_large", "_rebuild_from_type_v2 nested too deeply");
            return NULL;
        }
        c->from_type_depth++;
        pkl_value *r = pol_reduce(ctx, m, a[0], a[2], false, err);
        c->from_type_depth--;
        if (r && !is_tensor(r)) {
            mp_err(err, "bad_header", "_rebuild_from_type_v2 did not produce a tensor");
            return NULL;
        }
        return r;
    }
    case G_SIZE:
        if (n == 1 && (a[0]->kind == PKL_TUPLE || a[0]->kind == PKL_LIST)) return a[0];
        if (n == 0) return pkl_new_value(m, PKL_TUPLE, err);
        break;
    case G_DEVICE:
        if (n >= 1 && n <= 2 && a[0]->kind == PKL_STR) return pkl_new_obj(m, TAG_DEVICE, NULL, err);
        break;
    case G_LAYOUT:
        if (n == 1 && a[0]->kind == PKL_STR) return pkl_new_obj(m, TAG_OTHER, NULL, err);
        break;
    case G_CODECS: {
        /* protocol-2 bytes: _codecs.encode(str, 'latin1') */
        if (n != 2 || a[0]->kind != PKL_STR ||
            !(pkl_is_str(a[1], "latin1") || pkl_is_str(a[1], "latin-1")))
            break;
        const unsigned char *s = (const unsigned char *)a[0]->u.str.s;
        size_t len = a[0]->u.str.len, o = 0;
        pkl_value *b = pkl_new_bytes(m, s, len, err); /* latin1 is never longer */
        if (!b) return NULL;
        for (size_t i = 0; i < len; i++) {
            if (s[i] < 0x80) {
                b->u.str.s[o++] = (char)s[i];
            } else if ((s[i] == 0xC2 || s[i] == 0xC3) && i + 1 < len) {
                b->u.str.s[o++] = (char)(((s[i] & 0x03) << 6) | (s[i + 1] & 0x3F));
                i++;
            } else {
                mp_err(err, "bad_header", "_codecs.encode: character outside latin1");
                return NULL;
            }
        }
        b->u.str.len = o;
        b->u.str.s[o] = 0;
        return b;
    }
    case G_BYTEARRAY:
        if (n == 0) return pkl_new_bytes(m, "", 0, err);
        if (n == 1 && a[0]->kind == PKL_BYTES) return a[0];
        break;
    case G_REJECTED_FN:
        mp_err(err, "unsupported_format", "%s tensors are not supported (only dense tensors)",
               gname(fn, nb, sizeof nb));
        return NULL;
    default:
        mp_err(err, "unsafe_pickle", "calling %s is not allowed", gname(fn, nb, sizeof nb));
        return NULL;
    }
    mp_err(err, "bad_header", "%s called with unexpected arguments (%zu)", gname(fn, nb, sizeof nb),
           n);
    return NULL;
}

static int pol_build(void *ctx, pkl_machine *m, pkl_value *obj, pkl_value *state, mp_error *err) {
    (void)ctx;
    (void)m;
    (void)state;
    /* Tensor/Parameter __setstate__ only carries requires_grad, hooks and
     * python attributes: nothing that changes the bytes. */
    if (obj->u.obj.tag == TAG_TENSOR) return 0;
    return mp_err(err, "unsafe_pickle", "BUILD on this object is not allowed");
}

static pkl_value *pol_persistent(void *ctx, pkl_machine *m, pkl_value *pid, mp_error *err) {
    pt_ctx *c = ctx;
    pkl_value **a;
    size_t n;
    if (pid->kind != PKL_TUPLE || !pkl_items(pid, &a, &n) || n == 0) {
        mp_err(err, "unsafe_pickle", "persistent id is a %s, not a ('storage', ...) tuple",
               pkl_kind_name(pid->kind));
        return NULL;
    }
    if (pkl_is_str(a[0], "module")) {
        mp_err(err, "unsupported_format",
               "checkpoint pickles a whole nn.Module (source code); save a state_dict instead");
        return NULL;
    }
    if (!pkl_is_str(a[0], "storage")) {
        mp_err(err, "unsafe_pickle", "persistent id is not a ('storage', ...) tuple");
        return NULL;
    }
    size_t want = c->legacy ? 6 : 5;
    if (n != want) {
        mp_err(err, "bad_header", "storage persistent id has %zu fields, expected %zu", n, want);
        return NULL;
    }
    if (a[1]->kind != PKL_GLOBAL ||
        !(a[1]->u.global.id == G_UNTYPED ||
          (a[1]->u.global.id >= G_STORAGE && a[1]->u.global.id < G_DTYPE))) {
        mp_err(err, "bad_header", "storage type is a %s, not a storage class",
               pkl_kind_name(a[1]->kind));
        return NULL;
    }
    int64_t numel;
    if (a[2]->kind != PKL_STR || !a[2]->u.str.len || memchr(a[2]->u.str.s, 0, a[2]->u.str.len) ||
        !get_int(a[4], &numel) || a[4]->kind != PKL_INT || numel < 0) {
        mp_err(err, "bad_header", "malformed storage persistent id");
        return NULL;
    }
    int tid = a[1]->u.global.id;
    size_t sid;
    pt_storage *s = storage_find(c, a[2]->u.str.s, a[2]->u.str.len, &sid);
    if (s) {
        if (s->type_id != tid || s->numel != (uint64_t)numel) {
            mp_err(err, "bad_header", "storage '%s' appears with two different types or sizes",
                   s->key);
            return NULL;
        }
    } else {
        pt_storage ns = {0};
        ns.key = a[2]->u.str.s;
        ns.type_id = tid;
        if (tid == G_UNTYPED) {
            ns.dtype = MP_DT_INVALID;
            ns.elem_size = 1;
        } else {
            ns.dtype = storage_tab[tid - G_STORAGE].dtype;
            ns.elem_size = storage_tab[tid - G_STORAGE].elem_size;
        }
        ns.numel = (uint64_t)numel;
        if (__builtin_mul_overflow(ns.numel, (uint64_t)ns.elem_size, &ns.nbytes) ||
            ns.nbytes > (uint64_t)INT64_MAX) {
            mp_err(err, "bad_header", "storage '%s' size overflows", ns.key);
            return NULL;
        }
        if (storage_add(c, &ns, &sid, err)) return NULL;
        s = &c->st[sid];
    }
    pt_sref *r = pkl_alloc(m, sizeof *r, err);
    if (!r) return NULL;
    r->sid = sid;
    r->view_off = 0;
    r->view_numel = s->numel;
    if (c->legacy && a[5]->kind != PKL_NONE) {
        /* (view_key, offset, size): a slice of the root storage */
        pkl_value **v;
        size_t vn;
        int64_t vo, vs;
        if (!pkl_items(a[5], &v, &vn) || vn != 3 || !get_int(v[1], &vo) || !get_int(v[2], &vs) ||
            vo < 0 || vs < 0 || (uint64_t)vo > s->numel || (uint64_t)vs > s->numel - (uint64_t)vo) {
            mp_err(err, "bad_header", "malformed storage view of '%s'", s->key);
            return NULL;
        }
        r->view_off = (uint64_t)vo;
        r->view_numel = (uint64_t)vs;
    }
    return pkl_new_obj(m, TAG_STORAGE, r, err);
}

static pkl_machine *new_machine(pt_ctx *c) {
    pkl_policy pol = {c, pol_global, pol_reduce, pol_build, pol_persistent};
    return pkl_new(NULL, &pol);
}

/* ---- state dict -------------------------------------------------------- */

static const char *const wrapper_keys[] = {
    "state_dict", "model_state_dict", "model", "module", "model_state", "net", "network"};

static bool dict_get(const pkl_value *d, const char *key, pkl_value **out) {
    for (size_t i = 0; i < d->u.dict.n; i++)
        if (pkl_is_str(d->u.dict.keys[i], key)) {
            *out = d->u.dict.vals[i];
            return true;
        }
    return false;
}

/* The dict of tensors: v itself when all its values are tensors, else the
 * value under the first known wrapper key (recursively). torch never
 * flattens nested dicts into dotted names, so neither do we. */
static int find_state_dict(const pkl_value *v, int depth, const pkl_value **out, mp_error *err) {
    if (v->kind != PKL_DICT) {
        if (is_tensor(v))
            return mp_err(err, "unsupported_format",
                          "checkpoint holds a single tensor, not a state dict");
        return mp_err(err, "unsupported_format", "checkpoint holds a %s, not a state dict",
                      pkl_kind_name(v->kind));
    }
    size_t bad = SIZE_MAX;
    for (size_t i = 0; i < v->u.dict.n && bad == SIZE_MAX; i++)
        if (v->u.dict.keys[i]->kind != PKL_STR || !is_tensor(v->u.dict.vals[i])) bad = i;
    if (bad == SIZE_MAX) {
        *out = v;
        return 0;
    }
    if (depth < PT_MAX_UNWRAP)
        for (size_t k = 0; k < NELEM(wrapper_keys); k++) {
            pkl_value *inner;
            if (dict_get(v, wrapper_keys[k], &inner) && inner->kind == PKL_DICT)
                return find_state_dict(inner, depth + 1, out, err);
        }
    const pkl_value *key = v->u.dict.keys[bad], *val = v->u.dict.vals[bad];
    if (key->kind != PKL_STR)
        return mp_err(err, "unsupported_format", "state dict has a %s key, not a str",
                      pkl_kind_name(key->kind));
    if (val->kind == PKL_DICT)
        return mp_err(err, "unsupported_format",
                      "state dict entry '%.200s' is a nested dict; torch does not flatten "
                      "nested dicts and '%.200s' is not a known wrapper key "
                      "(state_dict, model, module, ...)",
                      key->u.str.s, key->u.str.s);
    return mp_err(err, "unsupported_format", "state dict entry '%.200s' is a %s, not a tensor",
                  key->u.str.s, pkl_kind_name(val->kind));
}

static int cmp_name(const void *a, const void *b) {
    const pkl_value *x = *(pkl_value *const *)a, *y = *(pkl_value *const *)b;
    size_t n = x->u.str.len < y->u.str.len ? x->u.str.len : y->u.str.len;
    int r = memcmp(x->u.str.s, y->u.str.s, n);
    return r ? r : (x->u.str.len > y->u.str.len) - (x->u.str.len < y->u.str.len);
}

static int check_names(const pkl_value *sd, mp_error *err) {
    size_t n = sd->u.dict.n;
    for (size_t i = 0; i < n; i++)
        if (memchr(sd->u.dict.keys[i]->u.str.s, 0, sd->u.dict.keys[i]->u.str.len))
            return mp_err(err, "bad_header", "tensor name contains a NUL byte");
    if (n < 2) return 0;
    pkl_value **k = malloc(n * sizeof *k);
    if (!k) return mp_err(err, "no_memory", "out of memory");
    memcpy(k, sd->u.dict.keys, n * sizeof *k);
    qsort(k, n, sizeof *k, cmp_name);
    int rc = 0;
    for (size_t i = 1; i < n && !rc; i++)
        if (!cmp_name(&k[i - 1], &k[i]))
            rc = mp_err(err, "bad_header", "tensor '%.200s' appears twice", k[i]->u.str.s);
    free(k);
    return rc;
}

/* Fills w's tensors from the state dict; storages must be located. */
static int emit_tensors(const pt_ctx *c, const pkl_value *sd, mp_weights *w, mp_error *err) {
    for (size_t i = 0; i < sd->u.dict.n; i++) {
        const pkl_value *k = sd->u.dict.keys[i];
        const pt_tref *r = sd->u.dict.vals[i]->u.obj.ptr;
        const pt_storage *s = &c->st[r->sid];
        mp_tensor *t = weights_add_tensor(w, err);
        if (!t) return -1;
        t->name = strndup(k->u.str.s, k->u.str.len);
        if (!t->name) return mp_err(err, "no_memory", "out of memory");
        t->dtype = r->dtype;
        t->ggml_type = -1;
        t->ndim = r->ndim;
        memcpy(t->shape, r->shape, sizeof t->shape);
        t->storage_offset = r->offset;
        t->file_index = 0;
        t->data_offset = s->data_off;
        t->data_bytes = s->nbytes;
        t->storage_id = (int64_t)r->sid;
        if (!mp_tensor_bytes(t->dtype, t->shape, t->ndim, &t->nbytes))
            return mp_err(err, "bad_header", "tensor '%s' size overflows", t->name);
        /* contiguous iff each stride matches the row-major one (size-1 dims
         * do not matter); then the canonical strides are stored. An empty
         * tensor is contiguous, and its other dims may multiply past int64:
         * strides past an overflow are 0 (nothing is ever read). */
        bool contig = true, ovf = false;
        int64_t want = 1;
        for (int d = r->ndim - 1; d >= 0; d--) {
            if (r->shape[d] != 1 && r->stride[d] != want) contig = false;
            if (__builtin_mul_overflow(want, r->shape[d], &want)) break;
        }
        if (t->nbytes == 0) contig = true;
        want = 1;
        for (int d = r->ndim - 1; d >= 0; d--) {
            t->strides[d] = !contig ? r->stride[d] : ovf ? 0 : want;
            /* torch's contiguous strides treat a 0-size dim as 1 */
            if (!ovf && __builtin_mul_overflow(want, r->shape[d] ? r->shape[d] : 1, &want))
                ovf = true;
        }
        t->is_view = !contig || r->offset != 0 || t->nbytes != s->nbytes;
    }
    return 0;
}

/* ---- zip --------------------------------------------------------------- */

static int read_small(int fd, const pt_zip *z, const char *rel, char *buf, size_t cap, bool *found,
                      mp_error *err) {
    const pt_zip_entry *e = pt_zip_find(z, rel);
    *found = e != NULL;
    if (!e) return 0;
    uint8_t *b;
    size_t n;
    if (pt_zip_read(fd, e, cap - 1, &b, &n, err)) return -1;
    memcpy(buf, b, n + 1);
    free(b);
    return 0;
}

static int open_zip(int fd, const char *path, pt_ctx *c, pkl_machine *m, mp_weights *w,
                    mp_error *err) {
    pt_zip z;
    if (pt_zip_open(fd, &z, err)) return -1;
    int rc = -1;
    uint8_t *pkl = NULL;
    size_t plen;
    char small[64];
    bool found;
    if (pt_zip_find(&z, "constants.pkl")) {
        mp_err(err, "unsupported_format", "%s is a TorchScript archive, not a torch.save file",
               path);
        goto out;
    }
    if (read_small(fd, &z, "byteorder", small, sizeof small, &found, err)) goto out;
    if (found && strcmp(small, "little") != 0) {
        if (strcmp(small, "big") == 0)
            mp_err(err, "unsupported_format",
                   "%s was saved on a big-endian machine (byteorder=big); not supported", path);
        else
            mp_err(err, "bad_header", "%s: unknown byteorder record", path);
        goto out;
    }
    const pt_zip_entry *pe = pt_zip_find(&z, "data.pkl");
    if (!pe) {
        mp_err(err, "bad_header", "%s: zip archive has no %s/data.pkl", path, z.prefix);
        goto out;
    }
    if (pt_zip_read(fd, pe, PT_MAX_PICKLE, &pkl, &plen, err)) goto out;
    pkl_value *root;
    size_t used;
    if (pkl_run(m, pkl, plen, &used, &root, err)) goto out;
    const pkl_value *sd;
    if (find_state_dict(root, 0, &sd, err) || check_names(sd, err)) goto out;
    char rel[600];
    for (size_t i = 0; i < c->nst; i++) {
        pt_storage *s = &c->st[i];
        if (strlen(s->key) > 500) {
            mp_err(err, "bad_header", "storage key too long");
            goto out;
        }
        snprintf(rel, sizeof rel, "data/%s", s->key);
        const pt_zip_entry *e = pt_zip_find(&z, rel);
        if (!e) {
            mp_err(err, "bad_header", "%s: storage record %s/%s is missing", path, z.prefix, rel);
            goto out;
        }
        if (pt_zip_check_stored(e, err)) goto out;
        if (e->size < s->nbytes) {
            mp_err(err, "truncated", "%s: storage record %s holds %llu bytes, needs %llu", path,
                   e->name, (unsigned long long)e->size, (unsigned long long)s->nbytes);
            goto out;
        }
        s->data_off = e->data_off;
        s->located = true;
    }
    rc = emit_tensors(c, sd, w, err);
out:
    free(pkl);
    pt_zip_close(&z);
    return rc;
}

/* ---- legacy ------------------------------------------------------------ */

static const uint8_t legacy_magic[15] = {0x80, 0x02, 0x8A, 0x0A, 0x6C, 0xFC, 0x9C, 0x46,
                                         0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19, 0x2E};

/* Parses the leading pickles of a legacy file from buf; *data_start = first
 * byte after the storage key list. */
static int legacy_pickles(const uint8_t *buf, size_t len, pt_ctx *c, pkl_machine *m,
                          const pkl_value **sd, const pkl_value **keys, uint64_t *data_start,
                          mp_error *err) {
    if (len < sizeof legacy_magic || memcmp(buf, legacy_magic, sizeof legacy_magic))
        return mp_err(err, "unsupported_format", "not a torch.save file (bad magic number)");
    size_t pos = sizeof legacy_magic, used;
    pkl_value *v;
    if (pkl_run(m, buf + pos, len - pos, &used, &v, err)) return -1;
    pos += used;
    if (v->kind != PKL_INT || v->u.i != 1001)
        return mp_err(err, "unsupported_format", "unsupported legacy torch.save protocol");
    if (pkl_run(m, buf + pos, len - pos, &used, &v, err)) return -1;
    pos += used;
    pkl_value *le;
    if (v->kind != PKL_DICT || !dict_get(v, "little_endian", &le) || le->kind != PKL_BOOL)
        return mp_err(err, "bad_header", "legacy sys_info record is malformed");
    if (!le->u.b)
        return mp_err(err, "unsupported_format",
                      "checkpoint was saved on a big-endian machine; not supported");
    if (pkl_run(m, buf + pos, len - pos, &used, &v, err)) return -1;
    pos += used;
    if (find_state_dict(v, 0, sd, err) || check_names(*sd, err)) return -1;
    if (pkl_run(m, buf + pos, len - pos, &used, &v, err)) return -1;
    pos += used;
    if (v->kind != PKL_LIST)
        return mp_err(err, "bad_header", "legacy storage key list is a %s", pkl_kind_name(v->kind));
    *keys = v;
    *data_start = pos;
    return 0;
}

static int open_legacy_try(int fd, uint64_t fsize, const char *path, pt_ctx *c, mp_weights *w,
                           mp_error *err) {
    /* The pickles' total length is only known by parsing them: read a
     * prefix, and start over with a longer one if it was too short. */
    size_t want = fsize < PT_LEGACY_FIRST_READ ? (size_t)fsize : PT_LEGACY_FIRST_READ;
    for (;;) {
        uint8_t *buf = malloc(want ? want : 1);
        if (!buf) return mp_err(err, "no_memory", "out of memory");
        if (pt_pread_full(fd, buf, want, 0, err)) {
            free(buf);
            return -1;
        }
        ctx_free(c);
        c->legacy = true;
        pkl_machine *m = new_machine(c);
        if (!m) {
            free(buf);
            return mp_err(err, "no_memory", "out of memory");
        }
        const pkl_value *sd = NULL, *keys = NULL;
        uint64_t pos = 0;
        int rc = legacy_pickles(buf, want, c, m, &sd, &keys, &pos, err);
        free(buf);
        if (rc && !strcmp(err->code, "truncated") && want < fsize && want < PT_MAX_PICKLE) {
            pkl_free(m);
            uint64_t next = (uint64_t)want * 4;
            if (next > fsize) next = fsize;
            if (next > PT_MAX_PICKLE) next = PT_MAX_PICKLE;
            want = (size_t)next;
            continue;
        }
        /* storages follow in key-list order, each as i64 numel + bytes */
        bool *seen = rc ? NULL : calloc(c->nst ? c->nst : 1, sizeof *seen);
        if (!rc && !seen) rc = mp_err(err, "no_memory", "out of memory");
        for (size_t i = 0; !rc && i < keys->u.seq.n; i++) {
            const pkl_value *k = keys->u.seq.items[i];
            size_t sid;
            pt_storage *s =
                k->kind == PKL_STR ? storage_find(c, k->u.str.s, k->u.str.len, &sid) : NULL;
            if (!s) {
                rc = mp_err(err, "bad_header", "%s: storage key list names an unknown storage",
                            path);
                break;
            }
            if (seen[sid]) {
                rc = mp_err(err, "bad_header", "%s: storage '%s' listed twice", path, s->key);
                break;
            }
            seen[sid] = true;
            uint8_t nb[8];
            if (pos > fsize || fsize - pos < 8) {
                rc = mp_err(err, "truncated", "%s: storage '%s' missing at end of file", path,
                            s->key);
                break;
            }
            if (pt_pread_full(fd, nb, 8, pos, err)) {
                rc = -1;
                break;
            }
            uint64_t numel = 0;
            for (int b = 7; b >= 0; b--)
                numel = (numel << 8) | nb[b];
            if (numel != s->numel) {
                rc = mp_err(err, "bad_header", "%s: storage '%s' has %llu elements, expected %llu",
                            path, s->key, (unsigned long long)numel, (unsigned long long)s->numel);
                break;
            }
            pos += 8;
            if (s->nbytes > fsize - pos) {
                rc = mp_err(err, "truncated", "%s: storage '%s' runs past the end of file", path,
                            s->key);
                break;
            }
            s->data_off = pos;
            s->located = true;
            pos += s->nbytes;
        }
        for (size_t i = 0; !rc && i < c->nst; i++)
            if (!c->st[i].located)
                rc = mp_err(err, "bad_header", "%s: storage '%s' has no data", path, c->st[i].key);
        free(seen);
        if (!rc) rc = emit_tensors(c, sd, w, err);
        pkl_free(m);
        return rc;
    }
}

static int open_legacy(int fd, uint64_t fsize, const char *path, pt_ctx *c, mp_weights *w,
                       mp_error *err_out) {
    mp_error errbuf = {0}, *err = &errbuf; /* the retry below needs the code */
    int rc = open_legacy_try(fd, fsize, path, c, w, err);
    if (rc && err_out) *err_out = errbuf;
    return rc;
}

/* ---- entry points ------------------------------------------------------ */

int pt_open(const char *path, mp_weights *w, mp_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path,
                      strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mp_err(err, "unsupported_format", "%s: not a regular file", path);
    }
    if (weights_add_file(w, path, fd, err) != 0) {
        close(fd);
        return -1;
    }
    uint64_t fsize = (uint64_t)st.st_size;
    uint8_t head[512] = {0};
    size_t hn = fsize < sizeof head ? (size_t)fsize : sizeof head;
    pt_ctx c = {0};
    int rc = pt_pread_full(fd, head, hn, 0, err);
    if (rc) {
        /* nothing */
    } else if (hn >= 4 && !memcmp(head, "PK\x03\x04", 4)) {
        w->format = MP_FMT_PT_ZIP;
        pkl_machine *m = new_machine(&c);
        rc = m ? open_zip(fd, path, &c, m, w, err) : mp_err(err, "no_memory", "out of memory");
        pkl_free(m);
    } else if (hn >= 8 && !memcmp(head, "PYTORCH1", 8)) {
        rc =
            mp_err(err, "unsupported_format", "%s: PYTORCH1 preview format is not supported", path);
    } else if (hn >= 262 && !memcmp(head + 257, "ustar", 5)) {
        rc =
            mp_err(err, "unsupported_format",
                   "%s: ancient tar-format torch checkpoint (torch <= 0.3) is not supported", path);
    } else {
        w->format = MP_FMT_PT_LEGACY;
        rc = open_legacy(fd, fsize, path, &c, w, err);
    }
    ctx_free(&c);
    /* Tensor bytes are then copied out of the page cache by memcpy, which
     * beats pread on large storages (bench/formats_pt.sh). */
    if (rc == 0) rc = weights_map_file(w, 0, err);
    if (rc) weights_free_fields(w);
    return rc;
}

long pt_check_pickle(const uint8_t *buf, size_t len, bool legacy, mp_error *err) {
    pt_ctx c = {0};
    c.legacy = legacy;
    pkl_machine *m = new_machine(&c);
    if (!m) return mp_err(err, "no_memory", "out of memory");
    pkl_value *root;
    const pkl_value *sd;
    long rc = -1;
    if (!pkl_run(m, buf, len, NULL, &root, err) && !find_state_dict(root, 0, &sd, err) &&
        !check_names(sd, err))
        rc = (long)sd->u.dict.n;
    pkl_free(m);
    ctx_free(&c);
    return rc;
}

/* ---- identity ---------------------------------------------------------- */

void pt_view_key_of(const mp_tensor *t, pt_view_key *k) {
    k->file_index = t->file_index;
    k->storage_id = t->storage_id;
    unsigned bits = mp_dtype_bits(t->dtype);
    k->byte_offset = (uint64_t)t->storage_offset * (bits / 8);
}

bool pt_same_storage(const mp_tensor *a, const mp_tensor *b) {
    return a->storage_id >= 0 && a->storage_id == b->storage_id && a->file_index == b->file_index;
}

bool pt_same_data_ptr(const mp_tensor *a, const mp_tensor *b) {
    pt_view_key x, y;
    if (!pt_same_storage(a, b)) return false;
    pt_view_key_of(a, &x);
    pt_view_key_of(b, &y);
    return x.byte_offset == y.byte_offset;
}

bool pt_same_view(const mp_tensor *a, const mp_tensor *b) {
    if (!pt_same_data_ptr(a, b) || a->dtype != b->dtype || a->ndim != b->ndim) return false;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d] || a->strides[d] != b->strides[d]) return false;
    return true;
}

/* Two handlers, one reader: the zip is recognised before safetensors and
 * the legacy stream after it (registry.c); pt_open tells them apart again
 * by the same bytes. */
static bool pt_detect_zip(const char *path, const unsigned char *b, size_t n, uint64_t size) {
    return n >= 4 && (memcmp(b, "PK\x03\x04", 4) == 0 ||
                      memcmp(b, "PK\x05\x06", 4) == 0); /* the latter: an empty archive */
}

/* torch.save's legacy stream starts with a protocol-2 pickle of its magic
 * number. */
static bool pt_detect_legacy(const char *path, const unsigned char *b, size_t n, uint64_t size) {
    return n >= 2 && b[0] == 0x80 && b[1] >= 2 && b[1] <= 5;
}

const mp_format_handler mp_format_pytorch_zip = {
    .name = "PyTorch",
    .format = MP_FMT_PT_ZIP,
    .detect = pt_detect_zip,
    .open = pt_open,
};

const mp_format_handler mp_format_pytorch_legacy = {
    .name = "PyTorch",
    .format = MP_FMT_PT_LEGACY,
    .detect = pt_detect_legacy,
    .open = pt_open,
};
