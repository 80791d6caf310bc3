/*
 * gguf.c - GGUF v2/v3 reader: header, metadata (every value type, bounded),
 * tensor infos, data section; and the ggml type table.
 *
 * The file is hostile input. Modelled on ggml's gguf_init_from_reader: one
 * reader that knows how many bytes are left and refuses any read past the
 * end, hard caps on every count and length before anything is allocated,
 * and tensor offsets that must be exactly the running padded sum (which
 * rules out gaps, reordering and overlap). Metadata goes to JSON under a
 * value/byte budget so that a small file cannot make us build a huge tree.
 */
#include "loader/formats/gguf/gguf.h"
#include "loader/formats/formats_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- ggml type table (reference §3.4) ---- */

typedef struct gguf_type_desc {
    const char *name;
    uint16_t blck;
    uint16_t bytes;
} gguf_type_desc;

static const gguf_type_desc GGUF_TYPES[GGUF_T_COUNT] = {
    [0] = {"F32", 1, 4},         [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},      [6] = {"Q5_0", 32, 22},      [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},      [9] = {"Q8_1", 32, 36},      [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},   [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},   [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74},  [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},   [21] = {"IQ3_S", 256, 110},  [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},         [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},        [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},   [30] = {"BF16", 1, 2},       [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},   [39] = {"MXFP4", 32, 17},    [40] = {"NVFP4", 64, 36},
    [41] = {"Q1_0", 128, 18},    [42] = {"Q2_0", 64, 18},
};

static const gguf_type_desc *type_desc(int t) {
    if (t < 0 || t >= GGUF_T_COUNT || GGUF_TYPES[t].blck == 0) return NULL;
    return &GGUF_TYPES[t];
}

const char *gguf_type_name(int t) {
    const gguf_type_desc *d = type_desc(t);
    return d ? d->name : NULL;
}

int gguf_type_from_name(const char *name) {
    if (!name) return -1;
    for (int t = 0; t < GGUF_T_COUNT; t++)
        if (GGUF_TYPES[t].name && strcmp(GGUF_TYPES[t].name, name) == 0) return t;
    return -1;
}

unsigned gguf_type_block_size(int t) {
    const gguf_type_desc *d = type_desc(t);
    return d ? d->blck : 0;
}

unsigned gguf_type_block_bytes(int t) {
    const gguf_type_desc *d = type_desc(t);
    return d ? d->bytes : 0;
}

bool gguf_type_is_quantized(int t) {
    return gguf_type_block_size(t) > 1;
}

bool gguf_row_bytes(int t, int64_t ne0, uint64_t *out) {
    const gguf_type_desc *d = type_desc(t);
    if (!d || ne0 < 0 || ne0 % d->blck != 0) return false;
    return !__builtin_mul_overflow((uint64_t)ne0 / d->blck, (uint64_t)d->bytes, out);
}

mp_dtype gguf_type_dtype(int t) {
    switch (t) {
    case GGUF_T_F32:
        return MP_DT_F32;
    case GGUF_T_F16:
        return MP_DT_F16;
    case GGUF_T_BF16:
        return MP_DT_BF16;
    case GGUF_T_F64:
        return MP_DT_F64;
    case GGUF_T_I8:
        return MP_DT_I8;
    case GGUF_T_I16:
        return MP_DT_I16;
    case GGUF_T_I32:
        return MP_DT_I32;
    case GGUF_T_I64:
        return MP_DT_I64;
    default:
        return type_desc(t) ? MP_DT_GGML : MP_DT_INVALID;
    }
}

int gguf_tensor_type(const mp_tensor *t) {
    if (t->dtype == MP_DT_GGML) return type_desc(t->ggml_type) ? t->ggml_type : -1;
    switch (t->dtype) {
    case MP_DT_F32:
        return GGUF_T_F32;
    case MP_DT_F16:
        return GGUF_T_F16;
    case MP_DT_BF16:
        return GGUF_T_BF16;
    case MP_DT_F64:
        return GGUF_T_F64;
    case MP_DT_I8:
        return GGUF_T_I8;
    case MP_DT_I16:
        return GGUF_T_I16;
    case MP_DT_I32:
        return GGUF_T_I32;
    case MP_DT_I64:
        return GGUF_T_I64;
    default:
        return -1;
    }
}

static const char *const VALUE_TYPE_NAMES[GGUF_V_COUNT] = {
    "UINT8", "INT8",   "UINT16", "INT16",  "UINT32", "INT32",   "FLOAT32",
    "BOOL",  "STRING", "ARRAY",  "UINT64", "INT64",  "FLOAT64",
};
static const uint8_t VALUE_SIZES[GGUF_V_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *gguf_value_type_name(int vt) {
    return (vt >= 0 && vt < GGUF_V_COUNT) ? VALUE_TYPE_NAMES[vt] : NULL;
}

/* ---- bounded reader ---- */

#define RD_BUF (64u * 1024u)

typedef struct rd {
    int fd;
    uint64_t size; /* file size at open */
    uint64_t pos;
    unsigned char *buf;
    uint64_t bstart; /* buf holds [bstart, bstart + blen) */
    size_t blen;
    mp_error *err;
} rd;

static uint64_t rd_left(const rd *r) {
    return r->size - r->pos;
}

static int pread_full(int fd, void *dst, size_t n, uint64_t off, mp_error *err) {
    unsigned char *p = dst;
    while (n > 0) {
        size_t chunk = n > (1u << 30) ? (1u << 30) : n;
        ssize_t got = pread(fd, p, chunk, (off_t)off);
        if (got < 0) {
            if (errno == EINTR) continue;
            return mp_err(err, "io_error", "read at offset %" PRIu64 ": %s", off, strerror(errno));
        }
        if (got == 0)
            return mp_err(err, "truncated", "file ended at offset %" PRIu64 " while reading", off);
        p += got;
        off += (uint64_t)got;
        n -= (size_t)got;
    }
    return 0;
}

static int rd_read(rd *r, void *dst, uint64_t n, const char *what) {
    if (n > rd_left(r))
        return mp_err(r->err, "truncated",
                      "%s at offset %" PRIu64 " needs %" PRIu64 " bytes, file has %" PRIu64 " left",
                      what, r->pos, n, rd_left(r));
    unsigned char *out = dst;
    while (n > 0) {
        if (r->pos >= r->bstart && r->pos < r->bstart + r->blen) {
            size_t at = (size_t)(r->pos - r->bstart);
            size_t take = r->blen - at;
            if (take > n) take = (size_t)n;
            memcpy(out, r->buf + at, take);
            out += take;
            r->pos += take;
            n -= take;
            continue;
        }
        if (n >= RD_BUF) { /* big string: straight into the destination */
            if (pread_full(r->fd, out, (size_t)n, r->pos, r->err) < 0) return -1;
            r->pos += n;
            return 0;
        }
        size_t want = rd_left(r) < RD_BUF ? (size_t)rd_left(r) : RD_BUF;
        if (pread_full(r->fd, r->buf, want, r->pos, r->err) < 0) return -1;
        r->bstart = r->pos;
        r->blen = want;
    }
    return 0;
}

static int rd_skip(rd *r, uint64_t n, const char *what) {
    if (n > rd_left(r))
        return mp_err(r->err, "truncated",
                      "%s at offset %" PRIu64 " needs %" PRIu64 " bytes, file has %" PRIu64 " left",
                      what, r->pos, n, rd_left(r));
    r->pos += n;
    return 0;
}

static int rd_u32(rd *r, uint32_t *v, const char *what) {
    unsigned char b[4];
    if (rd_read(r, b, 4, what) < 0) return -1;
    *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return 0;
}

static int rd_u64(rd *r, uint64_t *v, const char *what) {
    unsigned char b[8];
    if (rd_read(r, b, 8, what) < 0) return -1;
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--)
        x = x << 8 | b[i];
    *v = x;
    return 0;
}

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

static bool utf8_valid(const char *s, size_t n, bool allow_nul) {
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        if (p[i] == 0 && !allow_nul) return false;
        size_t l = utf8_seq(p + i, n - i);
        if (!l) return false;
        i += l;
    }
    return true;
}

/* A JSON string of s, invalid sequences replaced by U+FFFD. */
static json_t *json_str_lossy(const char *s, size_t n) {
    if (utf8_valid(s, n, true)) return json_stringn(s, n);
    size_t cap;
    if (__builtin_mul_overflow(n, (size_t)3, &cap)) return NULL;
    char *o = malloc(cap + 1);
    if (!o) return NULL;
    size_t k = 0;
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq(p + i, n - i);
        if (l) {
            memcpy(o + k, p + i, l);
            k += l;
            i += l;
        } else {
            memcpy(o + k, "\xef\xbf\xbd", 3);
            k += 3;
            i++;
        }
    }
    json_t *j = json_stringn(o, k);
    free(o);
    return j;
}

/* The shortest decimal that reads back as f, as a double: 1e-05f becomes
 * 1e-05 in JSON instead of 9.99999974737875e-06. */
static double f32_shortest(float f) {
    char buf[48];
    for (int p = 1; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)f);
        double d = strtod(buf, NULL);
        if ((float)d == f) return d;
    }
    return (double)f;
}

/* ---- metadata values ---- */

typedef struct meta_budget {
    uint64_t values;
    uint64_t string_bytes;
} meta_budget;

#define JSON_MAX_ONE_STRING (16u << 20)

static json_t *omitted(const char *type, const char *what, uint64_t count) {
    return json_pack("{s:b, s:s, s:I}", "omitted", 1, "type", type, what, (json_int_t)count);
}

static int read_string_value(rd *r, meta_budget *b, json_t **out, const char *what) {
    uint64_t len;
    if (rd_u64(r, &len, what) < 0) return -1;
    if (len > GGUF_MAX_STRING)
        return mp_err(r->err, "too_large", "%s: string length %" PRIu64 " exceeds 1 GiB", what,
                      len);
    if (len > rd_left(r))
        return mp_err(r->err, "truncated",
                      "%s: string of %" PRIu64 " bytes, file has %" PRIu64 " left", what, len,
                      rd_left(r));
    if (!out) return rd_skip(r, len, what);
    if (len > JSON_MAX_ONE_STRING || b->string_bytes + len > GGUF_JSON_MAX_STRING_BYTES) {
        if (rd_skip(r, len, what) < 0) return -1;
        *out = omitted("STRING", "length", len);
        return *out ? 0 : mp_err(r->err, "io_error", "out of memory");
    }
    char *s = malloc((size_t)len + 1);
    if (!s) return mp_err(r->err, "too_large", "%s: cannot allocate %" PRIu64 " bytes", what, len);
    if (rd_read(r, s, len, what) < 0) {
        free(s);
        return -1;
    }
    b->string_bytes += len;
    *out = json_str_lossy(s, (size_t)len);
    free(s);
    return *out ? 0 : mp_err(r->err, "io_error", "out of memory");
}

static json_t *scalar_json(int vt, const unsigned char *p) {
    uint64_t u = 0;
    for (int i = VALUE_SIZES[vt] - 1; i >= 0; i--)
        u = u << 8 | p[i];
    switch (vt) {
    case GGUF_V_UINT8:
        return json_integer((json_int_t)(uint8_t)u);
    case GGUF_V_INT8:
        return json_integer((json_int_t)(int8_t)(uint8_t)u);
    case GGUF_V_UINT16:
        return json_integer((json_int_t)(uint16_t)u);
    case GGUF_V_INT16:
        return json_integer((json_int_t)(int16_t)(uint16_t)u);
    case GGUF_V_UINT32:
        return json_integer((json_int_t)(uint32_t)u);
    case GGUF_V_INT32:
        return json_integer((json_int_t)(int32_t)(uint32_t)u);
    case GGUF_V_UINT64:
        if (u > (uint64_t)INT64_MAX) return json_real((double)u);
        return json_integer((json_int_t)u);
    case GGUF_V_INT64: {
        int64_t s;
        memcpy(&s, &u, sizeof s);
        return json_integer((json_int_t)s);
    }
    case GGUF_V_BOOL:
        return json_boolean(u != 0);
    case GGUF_V_FLOAT32: {
        uint32_t w = (uint32_t)u;
        float f;
        memcpy(&f, &w, sizeof f);
        if (f != f || f - f != 0.0f) return json_null();
        return json_real(f32_shortest(f));
    }
    case GGUF_V_FLOAT64: {
        double d;
        memcpy(&d, &u, sizeof d);
        if (d != d || d - d != 0.0) return json_null();
        return json_real(d);
    }
    default:
        return NULL;
    }
}

static int read_value(rd *r, uint32_t vt, int depth, meta_budget *b, json_t **out, char *tname,
                      size_t tname_sz, const char *what);

/* Array body after its type: elem type, count, values. out == NULL skips. */
static int read_array(rd *r, int depth, meta_budget *b, json_t **out, char *tname, size_t tname_sz,
                      const char *what) {
    uint32_t et;
    uint64_t n;
    if (rd_u32(r, &et, what) < 0 || rd_u64(r, &n, what) < 0) return -1;
    if (et >= GGUF_V_COUNT)
        return mp_err(r->err, "bad_header", "%s: array element type %" PRIu32 " is invalid", what,
                      et);
    if (et == GGUF_V_ARRAY && depth + 1 >= GGUF_MAX_ARRAY_DEPTH)
        return mp_err(r->err, "bad_header", "%s: arrays nested deeper than %d", what,
                      GGUF_MAX_ARRAY_DEPTH);
    if (n > GGUF_MAX_ARRAY)
        return mp_err(r->err, "too_large", "%s: array of %" PRIu64 " elements exceeds 2^30", what,
                      n);
    /* Every element takes at least this much file: no count can outrun it. */
    uint64_t min = et == GGUF_V_STRING ? 8 : et == GGUF_V_ARRAY ? 12 : VALUE_SIZES[et];
    if (n * min > rd_left(r))
        return mp_err(r->err, "truncated",
                      "%s: array of %" PRIu64 " %s needs at least %" PRIu64
                      " bytes, file has %" PRIu64 " left",
                      what, n, VALUE_TYPE_NAMES[et], n * min, rd_left(r));
    if (tname) {
        if (et == GGUF_V_ARRAY)
            snprintf(tname, tname_sz, "[ARRAY]");
        else
            snprintf(tname, tname_sz, "[%s]", VALUE_TYPE_NAMES[et]);
    }
    bool build = out != NULL;
    if (build && (n > GGUF_JSON_MAX_ARRAY || b->values + n > GGUF_JSON_MAX_VALUES)) build = false;
    json_t *arr = build ? json_array() : NULL;
    if (build && !arr) return mp_err(r->err, "io_error", "out of memory");
    uint64_t strings_before = b->string_bytes;
    for (uint64_t i = 0; i < n; i++) {
        json_t *v = NULL;
        if (et != GGUF_V_STRING && et != GGUF_V_ARRAY) {
            unsigned char buf[8];
            if (rd_read(r, buf, VALUE_SIZES[et], what) < 0) goto fail;
            if (!arr) continue;
            v = scalar_json((int)et, buf);
        } else {
            if (read_value(r, et, depth + 1, b, arr ? &v : NULL, NULL, 0, what) < 0) goto fail;
            if (!arr) continue;
            if (v && json_is_object(v) && json_object_get(v, "omitted")) {
                /* Over the budget mid-way: summarize the whole array instead. */
                json_decref(v);
                json_decref(arr);
                arr = NULL;
                b->string_bytes = strings_before;
                continue;
            }
        }
        if (!v || json_array_append_new(arr, v) < 0) {
            mp_err(r->err, "io_error", "out of memory");
            goto fail;
        }
        b->values++;
    }
    if (!out) return 0;
    if (!arr) {
        char t[32];
        snprintf(t, sizeof t, "[%s]", VALUE_TYPE_NAMES[et]);
        arr = omitted(t, "count", n);
        if (!arr) return mp_err(r->err, "io_error", "out of memory");
    }
    *out = arr;
    return 0;
fail:
    json_decref(arr);
    return -1;
}

static int read_value(rd *r, uint32_t vt, int depth, meta_budget *b, json_t **out, char *tname,
                      size_t tname_sz, const char *what) {
    if (vt >= GGUF_V_COUNT)
        return mp_err(r->err, "bad_header", "%s: value type %" PRIu32 " is invalid", what, vt);
    if (tname && vt != GGUF_V_ARRAY) snprintf(tname, tname_sz, "%s", VALUE_TYPE_NAMES[vt]);
    if (vt == GGUF_V_STRING) return read_string_value(r, b, out, what);
    if (vt == GGUF_V_ARRAY) return read_array(r, depth, b, out, tname, tname_sz, what);
    unsigned char buf[8];
    if (rd_read(r, buf, VALUE_SIZES[vt], what) < 0) return -1;
    if (!out) return 0;
    *out = scalar_json((int)vt, buf);
    if (!*out) return mp_err(r->err, "io_error", "out of memory");
    b->values++;
    return 0;
}

/* ---- format-private state ---- */

typedef struct gguf_impl {
    gguf_info info;
} gguf_impl;

static void gguf_impl_free(void *p) {
    gguf_impl *g = p;
    if (!g) return;
    json_decref(g->info.types);
    free(g);
}

const gguf_info *gguf_info_of(const mp_weights *w) {
    if (!w || w->format != MP_FMT_GGUF || w->impl_free != gguf_impl_free || !w->impl) return NULL;
    return &((const gguf_impl *)w->impl)->info;
}

const char *gguf_meta_type(const mp_weights *w, const char *key) {
    const gguf_info *gi = gguf_info_of(w);
    if (!gi || !key) return NULL;
    return json_string_value(json_object_get(gi->types, key));
}

/* ---- header ---- */

typedef struct tinfo {
    char *name;
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    int type;
    uint64_t offset;
    uint64_t nbytes;
} tinfo;

static int read_kvs(rd *r, uint64_t n_kv, json_t *meta, json_t *types, uint32_t *alignment) {
    meta_budget b = {0, 0};
    for (uint64_t i = 0; i < n_kv; i++) {
        char what[96];
        uint64_t klen;
        snprintf(what, sizeof what, "metadata key %" PRIu64, i);
        if (rd_u64(r, &klen, what) < 0) return -1;
        if (klen == 0) return mp_err(r->err, "bad_header", "%s is empty", what);
        if (klen > 65535)
            return mp_err(r->err, "bad_header", "%s is %" PRIu64 " bytes long (max 65535)", what,
                          klen);
        char *key = malloc((size_t)klen + 1);
        if (!key) return mp_err(r->err, "io_error", "out of memory");
        if (rd_read(r, key, klen, what) < 0) {
            free(key);
            return -1;
        }
        key[klen] = 0;
        if (!utf8_valid(key, (size_t)klen, false)) {
            free(key);
            return mp_err(r->err, "bad_header", "%s is not valid UTF-8 text", what);
        }
        if (json_object_get(meta, key)) {
            mp_err(r->err, "bad_header", "duplicate metadata key '%.64s'", key);
            free(key);
            return -1;
        }
        snprintf(what, sizeof what, "metadata '%.64s'", key);
        uint32_t vt;
        char tname[32] = "";
        json_t *v = NULL;
        if (rd_u32(r, &vt, what) < 0 ||
            read_value(r, vt, 0, &b, &v, tname, sizeof tname, what) < 0) {
            free(key);
            return -1;
        }
        if (strcmp(key, "general.alignment") == 0) {
            if (vt != GGUF_V_UINT32) {
                json_decref(v);
                free(key);
                return mp_err(r->err, "bad_header", "general.alignment has type %s, must be UINT32",
                              gguf_value_type_name((int)vt));
            }
            json_int_t a = json_integer_value(v);
            if (a <= 0 || (a & (a - 1)) != 0) {
                json_decref(v);
                free(key);
                return mp_err(r->err, "bad_header",
                              "general.alignment %" JSON_INTEGER_FORMAT " is not a power of two",
                              a);
            }
            *alignment = (uint32_t)a;
        }
        if (json_object_set_new(meta, key, v) < 0 ||
            json_object_set_new(types, key, json_string(tname)) < 0) {
            free(key);
            return mp_err(r->err, "io_error", "out of memory");
        }
        free(key);
    }
    return 0;
}

static int read_tinfo(rd *r, uint64_t idx, tinfo *t, json_t *names) {
    char what[96];
    uint64_t len;
    snprintf(what, sizeof what, "tensor info %" PRIu64, idx);
    if (rd_u64(r, &len, what) < 0) return -1;
    if (len > GGUF_MAX_NAME)
        return mp_err(r->err, "bad_header", "%s: name is %" PRIu64 " bytes (max %d)", what, len,
                      GGUF_MAX_NAME);
    t->name = malloc((size_t)len + 1);
    if (!t->name) return mp_err(r->err, "io_error", "out of memory");
    if (rd_read(r, t->name, len, what) < 0) return -1;
    t->name[len] = 0;
    if (!utf8_valid(t->name, (size_t)len, false))
        return mp_err(r->err, "bad_header", "%s: name is not valid UTF-8 text", what);
    if (json_object_get(names, t->name))
        return mp_err(r->err, "bad_header", "duplicate tensor name '%s'", t->name);
    if (json_object_set_new(names, t->name, json_true()) < 0)
        return mp_err(r->err, "io_error", "out of memory");
    snprintf(what, sizeof what, "tensor '%s'", t->name);

    if (rd_u32(r, &t->n_dims, what) < 0) return -1;
    if (t->n_dims > GGUF_MAX_DIMS)
        return mp_err(r->err, "bad_header", "%s has %" PRIu32 " dims (max %d)", what, t->n_dims,
                      GGUF_MAX_DIMS);
    int64_t numel = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
        uint64_t ne = 1;
        if (d < t->n_dims && rd_u64(r, &ne, what) < 0) return -1;
        if (ne > (uint64_t)INT64_MAX)
            return mp_err(r->err, "bad_header", "%s: dim %" PRIu32 " is negative", what, d);
        t->ne[d] = (int64_t)ne;
        /* Zero dims still must not let the other dims overflow the strides. */
        if (__builtin_mul_overflow(numel, ne ? (int64_t)ne : 1, &numel))
            return mp_err(r->err, "bad_header", "%s: element count overflows", what);
    }
    uint32_t ty;
    if (rd_u32(r, &ty, what) < 0) return -1;
    const gguf_type_desc *td = type_desc((int)ty);
    if (!td)
        return mp_err(r->err, "bad_header", "%s has unknown or removed ggml type %" PRIu32, what,
                      ty);
    t->type = (int)ty;
    if (t->ne[0] % td->blck != 0)
        return mp_err(r->err, "bad_header",
                      "%s: row of %" PRId64 " elements is not a multiple of the %s block size %u",
                      what, t->ne[0], td->name, td->blck);
    uint64_t nb;
    if (!gguf_row_bytes(t->type, t->ne[0], &nb))
        return mp_err(r->err, "bad_header", "%s: byte size overflows", what);
    for (int d = 1; d < GGUF_MAX_DIMS; d++)
        if (__builtin_mul_overflow(nb, (uint64_t)t->ne[d], &nb) || nb > (uint64_t)INT64_MAX)
            return mp_err(r->err, "bad_header", "%s: byte size overflows", what);
    t->nbytes = nb;
    return rd_u64(r, &t->offset, what);
}

static void fill_tensor(mp_tensor *mt, tinfo *t, uint64_t data_start) {
    mt->name = t->name;
    t->name = NULL;
    mt->dtype = gguf_type_dtype(t->type);
    mt->ggml_type = mt->dtype == MP_DT_GGML ? t->type : -1;
    mt->ndim = (int)t->n_dims;
    for (int i = 0; i < mt->ndim; i++)
        mt->shape[i] = t->ne[mt->ndim - 1 - i];
    int64_t stride = 1;
    for (int i = mt->ndim - 1; i >= 0; i--) {
        mt->strides[i] = stride;
        stride *= mt->shape[i] ? mt->shape[i] : 1; /* bounded by read_tinfo's product check */
    }
    mt->storage_offset = 0;
    mt->is_view = false;
    mt->file_index = 0;
    mt->data_offset = data_start + t->offset;
    mt->data_bytes = t->nbytes;
    mt->nbytes = t->nbytes;
    mt->storage_id = -1;
}

static uint64_t align_up(uint64_t x, uint64_t a, bool *ovf) {
    uint64_t y;
    if (__builtin_add_overflow(x, a - 1, &y)) {
        *ovf = true;
        return 0;
    }
    return y & ~(a - 1);
}

static int gguf_parse(rd *r, mp_weights *w, const char *path) {
    mp_error *err = r->err;
    unsigned char magic[4];
    if (rd_read(r, magic, 4, "magic") < 0) return -1;
    if (memcmp(magic, "GGUF", 4) != 0) {
        char shown[5];
        for (int i = 0; i < 4; i++)
            shown[i] = (magic[i] >= 0x20 && magic[i] < 0x7f) ? (char)magic[i] : '?';
        shown[4] = 0;
        return mp_err(err, "unsupported_format", "not a GGUF file (magic '%s')", shown);
    }
    uint32_t version;
    if (rd_u32(r, &version, "version") < 0) return -1;
    if (version == 0) return mp_err(err, "bad_header", "GGUF version 0 is invalid");
    if ((version & 0xffff) == 0)
        return mp_err(err, "unsupported_format",
                      "GGUF version 0x%08" PRIx32 " looks byte-swapped (big-endian file)", version);
    if (version == 1)
        return mp_err(err, "unsupported_format", "GGUF v1 is obsolete and not supported");
    if (version > 3)
        return mp_err(err, "unsupported_format", "GGUF version %" PRIu32 " is newer than 3",
                      version);
    uint64_t n_tensors, n_kv;
    if (rd_u64(r, &n_tensors, "tensor count") < 0 || rd_u64(r, &n_kv, "metadata count") < 0)
        return -1;
    if (n_tensors > GGUF_MAX_TENSORS)
        return mp_err(err, "too_large", "tensor count %" PRIu64 " exceeds %u", n_tensors,
                      GGUF_MAX_TENSORS);
    if (n_kv > GGUF_MAX_KV)
        return mp_err(err, "too_large", "metadata count %" PRIu64 " exceeds %u", n_kv, GGUF_MAX_KV);
    /* Smallest KV: 8 (len) + 1 (key) + 4 (type) + 1 (u8); smallest tensor info: 8 + 4 + 4 + 8. */
    if (n_kv * 14 + n_tensors * 24 > rd_left(r))
        return mp_err(err, "truncated",
                      "%" PRIu64 " metadata entries and %" PRIu64 " tensors cannot fit in %" PRIu64
                      " bytes",
                      n_kv, n_tensors, rd_left(r));

    int rc = -1;
    json_t *meta = json_object(), *types = json_object(), *names = json_object();
    tinfo *ti = calloc(n_tensors ? (size_t)n_tensors : 1, sizeof *ti);
    gguf_impl *impl = calloc(1, sizeof *impl);
    uint32_t alignment = GGUF_DEFAULT_ALIGNMENT;
    if (!meta || !types || !names || !ti || !impl) {
        mp_err(err, "io_error", "out of memory");
        goto out;
    }
    if (read_kvs(r, n_kv, meta, types, &alignment) < 0) goto out;
    for (uint64_t i = 0; i < n_tensors; i++)
        if (read_tinfo(r, i, &ti[i], names) < 0) goto out;

    bool ovf = false;
    uint64_t data_start = n_tensors ? align_up(r->pos, alignment, &ovf) : r->pos;
    uint64_t expect = 0;
    for (uint64_t i = 0; i < n_tensors && !ovf; i++) {
        if (ti[i].offset != expect) {
            mp_err(err, "bad_header", "tensor '%s' has offset %" PRIu64 ", expected %" PRIu64,
                   ti[i].name, ti[i].offset, expect);
            goto out;
        }
        uint64_t end;
        if (__builtin_add_overflow(data_start, ti[i].offset, &end) ||
            __builtin_add_overflow(end, ti[i].nbytes, &end) || end > r->size) {
            mp_err(err, "truncated",
                   "tensor '%s' (%" PRIu64 " bytes at data offset %" PRIu64
                   ") runs past the end of the %" PRIu64 "-byte file",
                   ti[i].name, ti[i].nbytes, ti[i].offset, r->size);
            goto out;
        }
        expect = align_up(expect + ti[i].nbytes, alignment, &ovf);
    }
    if (ovf) {
        mp_err(err, "bad_header", "tensor data size overflows");
        goto out;
    }

    /* All checks passed: hand everything to w. */
    w->format = MP_FMT_GGUF;
    if (weights_add_file(w, path, r->fd, err) < 0) goto out;
    r->fd = -1; /* owned by w now */
    for (uint64_t i = 0; i < n_tensors; i++) {
        mp_tensor *mt = weights_add_tensor(w, err);
        if (!mt) goto out;
        fill_tensor(mt, &ti[i], data_start);
    }
    impl->info.version = version;
    impl->info.alignment = alignment;
    impl->info.data_start = data_start;
    impl->info.n_kv = n_kv;
    impl->info.types = types;
    types = NULL;
    w->impl = impl;
    w->impl_free = gguf_impl_free;
    impl = NULL;
    w->metadata = meta;
    meta = NULL;
    rc = 0;
out:
    for (uint64_t i = 0; ti && i < n_tensors; i++)
        free(ti[i].name);
    free(ti);
    json_decref(meta);
    json_decref(types);
    json_decref(names);
    gguf_impl_free(impl);
    return rc;
}

int gguf_open(const char *path, mp_weights *w, mp_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mp_err(err, errno == ENOENT ? "not_found" : "io_error", "open %s: %s", path,
                      strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return mp_err(err, "io_error", "stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return mp_err(err, "unsupported_format", "%s is not a regular file", path);
    }
    rd r = {.fd = fd, .size = (uint64_t)st.st_size, .err = err};
    r.buf = malloc(RD_BUF);
    if (!r.buf) {
        close(fd);
        return mp_err(err, "io_error", "out of memory");
    }
    int rc = gguf_parse(&r, w, path);
    free(r.buf);
    if (r.fd >= 0) close(r.fd);
    return rc;
}

static bool gguf_detect(const char *path, const unsigned char *b, size_t n, uint64_t size) {
    return n >= 4 && memcmp(b, "GGUF", 4) == 0;
}

const mp_format_handler mp_format_gguf = {
    .name = "GGUF",
    .format = MP_FMT_GGUF,
    .detect = gguf_detect,
    .open = gguf_open,
};
