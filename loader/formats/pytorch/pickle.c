/*
 * pickle.c - the pkl_ machine: decodes the opcodes torch.save emits into an
 * arena-owned value tree. Everything outside the opcode subset is refused;
 * every length, index and count is checked against the remaining input and
 * the machine's limits before anything is allocated, so a hostile pickle
 * costs at most a bounded multiple of its own size.
 */
#include "loader/formats/pytorch/pickle_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Opcodes (CPython Lib/pickle.py names). */
enum {
    OP_MARK = '(',
    OP_STOP = '.',
    OP_POP = '0',
    OP_POP_MARK = '1',
    OP_DUP = '2',
    OP_FLOAT = 'F',
    OP_INT = 'I',
    OP_BININT = 'J',
    OP_BININT1 = 'K',
    OP_LONG = 'L',
    OP_BININT2 = 'M',
    OP_NONE = 'N',
    OP_PERSID = 'P',
    OP_BINPERSID = 'Q',
    OP_REDUCE = 'R',
    OP_STRING = 'S',
    OP_BINSTRING = 'T',
    OP_SHORT_BINSTRING = 'U',
    OP_UNICODE = 'V',
    OP_BINUNICODE = 'X',
    OP_APPEND = 'a',
    OP_BUILD = 'b',
    OP_GLOBAL = 'c',
    OP_DICT = 'd',
    OP_EMPTY_DICT = '}',
    OP_APPENDS = 'e',
    OP_GET = 'g',
    OP_BINGET = 'h',
    OP_INST = 'i',
    OP_LONG_BINGET = 'j',
    OP_LIST = 'l',
    OP_EMPTY_LIST = ']',
    OP_OBJ = 'o',
    OP_PUT = 'p',
    OP_BINPUT = 'q',
    OP_LONG_BINPUT = 'r',
    OP_SETITEM = 's',
    OP_TUPLE = 't',
    OP_EMPTY_TUPLE = ')',
    OP_SETITEMS = 'u',
    OP_BINFLOAT = 'G',
    OP_BINBYTES = 'B',
    OP_SHORT_BINBYTES = 'C',
    OP_PROTO = 0x80,
    OP_NEWOBJ = 0x81,
    OP_EXT1 = 0x82,
    OP_EXT2 = 0x83,
    OP_EXT4 = 0x84,
    OP_TUPLE1 = 0x85,
    OP_TUPLE2 = 0x86,
    OP_TUPLE3 = 0x87,
    OP_NEWTRUE = 0x88,
    OP_NEWFALSE = 0x89,
    OP_LONG1 = 0x8a,
    OP_LONG4 = 0x8b,
    OP_SHORT_BINUNICODE = 0x8c,
    OP_BINUNICODE8 = 0x8d,
    OP_BINBYTES8 = 0x8e,
    OP_EMPTY_SET = 0x8f,
    OP_ADDITEMS = 0x90,
    OP_FROZENSET = 0x91,
    OP_NEWOBJ_EX = 0x92,
    OP_STACK_GLOBAL = 0x93,
    OP_MEMOIZE = 0x94,
    OP_FRAME = 0x95,
};

#define ARENA_CHUNK (64 * 1024)
#define GLOBAL_LINE_MAX 256

typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} arena_chunk;

struct pkl_machine {
    pkl_limits lim;
    pkl_policy pol;
    arena_chunk *chunks;
    size_t arena_bytes;
    /* per run */
    pkl_value **stack;
    size_t sp, stack_cap;
    size_t *marks;
    size_t nmarks, marks_cap;
    pkl_value **memo;
    size_t memo_len, memo_cap;
    size_t ops;
    pkl_value *none, *tru, *fals;
};

void pkl_limits_default(pkl_limits *lim) {
    lim->max_stack = 1u << 20;
    lim->max_marks = 4096;
    lim->max_depth = 256;
    lim->max_memo = 1u << 24;
    lim->max_arena_bytes = (size_t)2 << 30;
    lim->max_container = 1u << 24;
}

/* ---- arena ------------------------------------------------------------- */

void *pkl_alloc(pkl_machine *m, size_t n, mp_error *err) {
    size_t need = (n + 15) & ~(size_t)15;
    if (need < n || need > m->lim.max_arena_bytes - m->arena_bytes ||
        m->arena_bytes > m->lim.max_arena_bytes) {
        mp_err(err, "too_large", "pickle needs more than %zu bytes of memory",
               m->lim.max_arena_bytes);
        return NULL;
    }
    arena_chunk *c = m->chunks;
    if (!c || c->cap - c->used < need) {
        size_t cap = need > ARENA_CHUNK / 2 ? need : ARENA_CHUNK;
        c = malloc(sizeof *c + cap);
        if (!c) {
            mp_err(err, "no_memory", "out of memory decoding pickle");
            return NULL;
        }
        c->used = 0;
        c->cap = cap;
        if (need > ARENA_CHUNK / 2 && m->chunks) {
            /* keep the current partly-used chunk on top for small allocations */
            c->next = m->chunks->next;
            m->chunks->next = c;
        } else {
            c->next = m->chunks;
            m->chunks = c;
        }
    }
    void *p = c->data + c->used;
    c->used += need;
    m->arena_bytes += need;
    memset(p, 0, need);
    return p;
}

pkl_value *pkl_new_value(pkl_machine *m, pkl_kind kind, mp_error *err) {
    pkl_value *v = pkl_alloc(m, sizeof *v, err);
    if (v) v->kind = kind;
    return v;
}

pkl_value *pkl_new_obj(pkl_machine *m, int tag, void *ptr, mp_error *err) {
    pkl_value *v = pkl_new_value(m, PKL_OBJ, err);
    if (v) {
        v->u.obj.tag = tag;
        v->u.obj.ptr = ptr;
    }
    return v;
}

pkl_value *pkl_new_bytes(pkl_machine *m, const void *p, size_t len, mp_error *err) {
    pkl_value *v = pkl_new_value(m, PKL_BYTES, err);
    if (!v) return NULL;
    if (len == SIZE_MAX) {
        mp_err(err, "too_large", "bytes too long");
        return NULL;
    }
    char *s = pkl_alloc(m, len + 1, err);
    if (!s) return NULL;
    if (len) memcpy(s, p, len);
    v->u.str.s = s;
    v->u.str.len = len;
    return v;
}

pkl_machine *pkl_new(const pkl_limits *lim, const pkl_policy *policy) {
    pkl_machine *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (lim)
        m->lim = *lim;
    else
        pkl_limits_default(&m->lim);
    if (policy) m->pol = *policy;
    mp_error e;
    m->none = pkl_new_value(m, PKL_NONE, &e);
    m->tru = pkl_new_value(m, PKL_BOOL, &e);
    m->fals = pkl_new_value(m, PKL_BOOL, &e);
    if (!m->none || !m->tru || !m->fals) {
        pkl_free(m);
        return NULL;
    }
    m->tru->u.b = true;
    return m;
}

void pkl_free(pkl_machine *m) {
    if (!m) return;
    arena_chunk *c = m->chunks;
    while (c) {
        arena_chunk *n = c->next;
        free(c);
        c = n;
    }
    free(m->stack);
    free(m->marks);
    free(m->memo);
    free(m);
}

/* ---- helpers ----------------------------------------------------------- */

const char *pkl_kind_name(pkl_kind k) {
    static const char *names[] = {"None",  "bool", "int", "float", "str",    "bytes",
                                  "tuple", "list", "set", "dict",  "global", "object"};
    return (unsigned)k < sizeof names / sizeof names[0] ? names[k] : "?";
}

bool pkl_is_str(const pkl_value *v, const char *s) {
    return v && v->kind == PKL_STR && strlen(s) == v->u.str.len &&
           memcmp(v->u.str.s, s, v->u.str.len) == 0;
}

bool pkl_items(const pkl_value *v, pkl_value ***items, size_t *n) {
    if (!v || (v->kind != PKL_TUPLE && v->kind != PKL_LIST)) return false;
    *items = v->u.seq.items;
    *n = v->u.seq.n;
    return true;
}

static bool utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        unsigned cp;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (n - i < len) return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* ---- stack, marks, memo ------------------------------------------------ */

static int push(pkl_machine *m, pkl_value *v, mp_error *err) {
    if (!v) return -1;
    if (m->sp == m->stack_cap) {
        if (m->sp >= m->lim.max_stack)
            return mp_err(err, "too_large", "pickle stack deeper than %zu", m->lim.max_stack);
        size_t cap = m->stack_cap ? m->stack_cap * 2 : 64;
        if (cap > m->lim.max_stack) cap = m->lim.max_stack;
        pkl_value **s = realloc(m->stack, cap * sizeof *s);
        if (!s) return mp_err(err, "no_memory", "out of memory decoding pickle");
        m->stack = s;
        m->stack_cap = cap;
    }
    m->stack[m->sp++] = v;
    return 0;
}

/* The lowest stack index a plain pop may reach: values under the last mark
 * belong to an outer construct. */
static size_t stack_floor(const pkl_machine *m) {
    return m->nmarks ? m->marks[m->nmarks - 1] : 0;
}

static pkl_value *pop(pkl_machine *m, mp_error *err) {
    if (m->sp <= stack_floor(m)) {
        mp_err(err, "bad_header", "pickle stack underflow");
        return NULL;
    }
    return m->stack[--m->sp];
}

static pkl_value *top(pkl_machine *m, mp_error *err) {
    if (m->sp <= stack_floor(m)) {
        mp_err(err, "bad_header", "pickle stack underflow");
        return NULL;
    }
    return m->stack[m->sp - 1];
}

static int push_mark(pkl_machine *m, mp_error *err) {
    if (m->nmarks == m->marks_cap) {
        if (m->nmarks >= m->lim.max_marks)
            return mp_err(err, "too_large", "more than %zu open pickle MARKs", m->lim.max_marks);
        size_t cap = m->marks_cap ? m->marks_cap * 2 : 16;
        if (cap > m->lim.max_marks) cap = m->lim.max_marks;
        size_t *s = realloc(m->marks, cap * sizeof *s);
        if (!s) return mp_err(err, "no_memory", "out of memory decoding pickle");
        m->marks = s;
        m->marks_cap = cap;
    }
    m->marks[m->nmarks++] = m->sp;
    return 0;
}

/* Pops the last mark; *first = index of the first item above it. */
static int pop_mark(pkl_machine *m, size_t *first, mp_error *err) {
    if (!m->nmarks) return mp_err(err, "bad_header", "pickle opcode needs a MARK but none is open");
    *first = m->marks[--m->nmarks];
    return 0;
}

static int memo_put(pkl_machine *m, uint64_t idx, mp_error *err) {
    pkl_value *v = top(m, err);
    if (!v) return -1;
    /* A real pickler numbers memo slots sequentially, so an index never
     * exceeds the opcodes seen so far; this bounds the memo by input size. */
    if (idx >= m->lim.max_memo || idx > m->ops)
        return mp_err(err, "too_large", "pickle memo index %llu out of range",
                      (unsigned long long)idx);
    if (idx >= m->memo_cap) {
        size_t cap = m->memo_cap ? m->memo_cap : 64;
        while (cap <= idx)
            cap *= 2;
        if (cap > m->lim.max_memo) cap = m->lim.max_memo;
        pkl_value **s = realloc(m->memo, cap * sizeof *s);
        if (!s) return mp_err(err, "no_memory", "out of memory decoding pickle");
        memset(s + m->memo_cap, 0, (cap - m->memo_cap) * sizeof *s);
        m->memo = s;
        m->memo_cap = cap;
    }
    m->memo[idx] = v;
    if (idx >= m->memo_len) m->memo_len = idx + 1;
    return 0;
}

static int memo_get(pkl_machine *m, uint64_t idx, mp_error *err) {
    if (idx >= m->memo_len || !m->memo[idx])
        return mp_err(err, "bad_header", "pickle memo slot %llu is empty", (unsigned long long)idx);
    return push(m, m->memo[idx], err);
}

/* ---- containers -------------------------------------------------------- */

static int note_depth(pkl_machine *m, pkl_value *c, const pkl_value *child, mp_error *err) {
    unsigned d = (unsigned)child->depth + 1;
    if (d > c->depth) {
        if (d > m->lim.max_depth)
            return mp_err(err, "too_large", "pickle nesting deeper than %zu", m->lim.max_depth);
        c->depth = (uint16_t)d;
    }
    return 0;
}

static int seq_reserve(pkl_machine *m, pkl_value ***items, size_t *cap, size_t n, size_t more,
                       mp_error *err) {
    if (more > m->lim.max_container || n > m->lim.max_container - more)
        return mp_err(err, "too_large", "pickle container with more than %zu items",
                      m->lim.max_container);
    if (n + more <= *cap) return 0;
    size_t ncap = *cap ? *cap : 4;
    while (ncap < n + more)
        ncap *= 2;
    pkl_value **s = pkl_alloc(m, ncap * sizeof *s, err);
    if (!s) return -1;
    if (n) memcpy(s, *items, n * sizeof *s);
    *items = s;
    *cap = ncap;
    return 0;
}

static int seq_append(pkl_machine *m, pkl_value *c, pkl_value *v, mp_error *err) {
    if (seq_reserve(m, &c->u.seq.items, &c->u.seq.cap, c->u.seq.n, 1, err)) return -1;
    c->u.seq.items[c->u.seq.n++] = v;
    return note_depth(m, c, v, err);
}

static int dict_set(pkl_machine *m, pkl_value *d, pkl_value *k, pkl_value *v, mp_error *err) {
    size_t cap = d->u.dict.cap;
    if (d->u.dict.n == cap) {
        size_t c1 = cap, c2 = cap;
        if (seq_reserve(m, &d->u.dict.keys, &c1, d->u.dict.n, 1, err) ||
            seq_reserve(m, &d->u.dict.vals, &c2, d->u.dict.n, 1, err))
            return -1;
        d->u.dict.cap = c1;
    }
    d->u.dict.keys[d->u.dict.n] = k;
    d->u.dict.vals[d->u.dict.n] = v;
    d->u.dict.n++;
    if (note_depth(m, d, k, err)) return -1;
    return note_depth(m, d, v, err);
}

/* Builds a tuple/list/set from stack[first..sp) and removes those items. */
static pkl_value *collect(pkl_machine *m, pkl_kind kind, size_t first, mp_error *err) {
    pkl_value *t = pkl_new_value(m, kind, err);
    if (!t) return NULL;
    size_t n = m->sp - first;
    if (n) {
        if (seq_reserve(m, &t->u.seq.items, &t->u.seq.cap, 0, n, err)) return NULL;
        for (size_t i = 0; i < n; i++) {
            t->u.seq.items[i] = m->stack[first + i];
            if (note_depth(m, t, m->stack[first + i], err)) return NULL;
        }
        t->u.seq.n = n;
    }
    m->sp = first;
    return t;
}

/* ---- input ------------------------------------------------------------- */

typedef struct rd {
    const uint8_t *p;
    size_t len, pos;
} rd;

static int need(rd *r, uint64_t n, mp_error *err) {
    if (n > r->len - r->pos)
        return mp_err(err, "truncated", "pickle ends inside an opcode at byte %zu", r->pos);
    return 0;
}

static uint64_t le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static pkl_value *read_str(pkl_machine *m, rd *r, uint64_t n, bool text, mp_error *err) {
    if (need(r, n, err)) return NULL;
    const uint8_t *s = r->p + r->pos;
    if (text && !utf8_valid(s, (size_t)n)) {
        mp_err(err, "bad_header", "pickle string at byte %zu is not valid UTF-8", r->pos);
        return NULL;
    }
    pkl_value *v = pkl_new_bytes(m, s, (size_t)n, err);
    if (!v) return NULL;
    if (text) v->kind = PKL_STR;
    r->pos += (size_t)n;
    return v;
}

static pkl_value *new_int(pkl_machine *m, int64_t i, mp_error *err) {
    pkl_value *v = pkl_new_value(m, PKL_INT, err);
    if (v) v->u.i = i;
    return v;
}

/* LONG1/LONG4: little-endian two's complement, must fit int64. */
static pkl_value *read_long(pkl_machine *m, rd *r, uint64_t n, mp_error *err) {
    if (need(r, n, err)) return NULL;
    const uint8_t *p = r->p + r->pos;
    if (n > 8) {
        /* still fits if the extra high bytes are pure sign extension */
        uint8_t sign = (p[7] & 0x80) ? 0xFF : 0x00;
        for (uint64_t k = 8; k < n; k++)
            if (p[k] != sign) {
                mp_err(err, "too_large", "pickle integer wider than 64 bits at byte %zu", r->pos);
                return NULL;
            }
    }
    uint64_t u = 0;
    int nb = n > 8 ? 8 : (int)n;
    u = le(p, nb);
    if (nb > 0 && nb < 8 && (p[nb - 1] & 0x80)) u |= ~(uint64_t)0 << (8 * nb);
    r->pos += (size_t)n;
    int64_t i;
    memcpy(&i, &u, sizeof i);
    return new_int(m, i, err);
}

static int read_line(rd *r, char *out, mp_error *err) {
    size_t start = r->pos;
    for (size_t k = 0; k < GLOBAL_LINE_MAX; k++) {
        if (r->pos >= r->len)
            return mp_err(err, "truncated", "pickle ends inside GLOBAL at byte %zu", start);
        uint8_t c = r->p[r->pos++];
        if (c == '\n') {
            out[k] = 0;
            return k ? 0 : mp_err(err, "bad_header", "empty GLOBAL name at byte %zu", start);
        }
        if (c < 0x21 || c > 0x7e)
            return mp_err(err, "bad_header", "bad character in GLOBAL name at byte %zu", start);
        out[k] = (char)c;
    }
    return mp_err(err, "bad_header", "GLOBAL name longer than %d at byte %zu", GLOBAL_LINE_MAX,
                  start);
}

static int do_global(pkl_machine *m, const char *mod, const char *name, mp_error *err) {
    if (!m->pol.global) return mp_err(err, "unsafe_pickle", "forbidden global %s.%s", mod, name);
    int id = m->pol.global(m->pol.ctx, mod, name, err);
    if (id < 0) return -1;
    pkl_value *v = pkl_new_value(m, PKL_GLOBAL, err);
    if (!v) return -1;
    size_t lm = strlen(mod), ln = strlen(name);
    char *s = pkl_alloc(m, lm + ln + 2, err);
    if (!s) return -1;
    memcpy(s, mod, lm + 1);
    memcpy(s + lm + 1, name, ln + 1);
    v->u.global.module = s;
    v->u.global.name = s + lm + 1;
    v->u.global.id = id;
    return push(m, v, err);
}

static int do_reduce(pkl_machine *m, pkl_value *callable, pkl_value *args, bool is_new,
                     const char *op, mp_error *err) {
    if (callable->kind != PKL_GLOBAL)
        return mp_err(err, "unsafe_pickle", "%s on a %s, not an allowed global", op,
                      pkl_kind_name(callable->kind));
    if (args->kind != PKL_TUPLE)
        return mp_err(err, "bad_header", "%s of %s.%s with a %s instead of an argument tuple", op,
                      callable->u.global.module, callable->u.global.name,
                      pkl_kind_name(args->kind));
    if (!m->pol.reduce)
        return mp_err(err, "unsafe_pickle", "%s of %s.%s is not allowed", op,
                      callable->u.global.module, callable->u.global.name);
    pkl_value *v = m->pol.reduce(m->pol.ctx, m, callable, args, is_new, err);
    if (!v) return -1;
    return push(m, v, err);
}

/* ---- the machine ------------------------------------------------------- */

static int step(pkl_machine *m, rd *r, bool *stop, pkl_value **out, mp_error *err) {
    if (r->pos >= r->len)
        return mp_err(err, "truncated", "pickle ends without STOP at byte %zu", r->pos);
    size_t at = r->pos;
    uint8_t op = r->p[r->pos++];
    m->ops++;
    pkl_value *a, *b, *c;
    size_t first = 0;
    switch (op) {
    case OP_PROTO:
        if (need(r, 1, err)) return -1;
        if (r->p[r->pos] < 2 || r->p[r->pos] > 5)
            return mp_err(err, "bad_header", "unsupported pickle protocol %u", r->p[r->pos]);
        r->pos++;
        return 0;
    case OP_FRAME:
        /* frames only batch reads; contents are ordinary opcodes */
        if (need(r, 8, err)) return -1;
        r->pos += 8;
        return 0;
    case OP_STOP:
        if (!(a = pop(m, err))) return -1;
        *out = a;
        *stop = true;
        return 0;
    case OP_MARK:
        return push_mark(m, err);
    case OP_NONE:
        return push(m, m->none, err);
    case OP_NEWTRUE:
        return push(m, m->tru, err);
    case OP_NEWFALSE:
        return push(m, m->fals, err);
    case OP_BININT:
        if (need(r, 4, err)) return -1;
        a = new_int(m, (int32_t)(uint32_t)le(r->p + r->pos, 4), err);
        r->pos += 4;
        return push(m, a, err);
    case OP_BININT1:
        if (need(r, 1, err)) return -1;
        a = new_int(m, r->p[r->pos++], err);
        return push(m, a, err);
    case OP_BININT2:
        if (need(r, 2, err)) return -1;
        a = new_int(m, (int64_t)le(r->p + r->pos, 2), err);
        r->pos += 2;
        return push(m, a, err);
    case OP_LONG1:
        if (need(r, 1, err)) return -1;
        return push(m, read_long(m, r, r->p[r->pos++], err), err);
    case OP_LONG4: {
        if (need(r, 4, err)) return -1;
        int32_t n = (int32_t)(uint32_t)le(r->p + r->pos, 4);
        r->pos += 4;
        if (n < 0) return mp_err(err, "bad_header", "negative LONG4 length at byte %zu", at);
        return push(m, read_long(m, r, (uint64_t)n, err), err);
    }
    case OP_BINFLOAT: {
        if (need(r, 8, err)) return -1;
        uint64_t u = 0;
        for (int i = 0; i < 8; i++) /* big-endian, unlike everything else */
            u = (u << 8) | r->p[r->pos + i];
        r->pos += 8;
        if (!(a = pkl_new_value(m, PKL_FLOAT, err))) return -1;
        memcpy(&a->u.f, &u, sizeof u);
        return push(m, a, err);
    }
    case OP_BINUNICODE:
    case OP_BINSTRING:
    case OP_BINBYTES: {
        if (need(r, 4, err)) return -1;
        uint64_t n = le(r->p + r->pos, 4);
        if (op == OP_BINSTRING && (n & 0x80000000u))
            return mp_err(err, "bad_header", "negative BINSTRING length at byte %zu", at);
        r->pos += 4;
        return push(m, read_str(m, r, n, op != OP_BINBYTES, err), err);
    }
    case OP_SHORT_BINUNICODE:
    case OP_SHORT_BINSTRING:
    case OP_SHORT_BINBYTES:
        if (need(r, 1, err)) return -1;
        return push(m, read_str(m, r, r->p[r->pos++], op != OP_SHORT_BINBYTES, err), err);
    case OP_BINUNICODE8:
    case OP_BINBYTES8: {
        if (need(r, 8, err)) return -1;
        uint64_t n = le(r->p + r->pos, 8);
        r->pos += 8;
        return push(m, read_str(m, r, n, op == OP_BINUNICODE8, err), err);
    }
    case OP_EMPTY_TUPLE:
        return push(m, collect(m, PKL_TUPLE, m->sp, err), err);
    case OP_TUPLE1:
    case OP_TUPLE2:
    case OP_TUPLE3: {
        size_t n = (size_t)(op - OP_TUPLE1 + 1);
        if (m->sp - stack_floor(m) < n) return mp_err(err, "bad_header", "pickle stack underflow");
        return push(m, collect(m, PKL_TUPLE, m->sp - n, err), err);
    }
    case OP_TUPLE:
    case OP_LIST:
    case OP_FROZENSET:
        if (pop_mark(m, &first, err)) return -1;
        return push(m,
                    collect(m,
                            op == OP_TUPLE  ? PKL_TUPLE
                            : op == OP_LIST ? PKL_LIST
                                            : PKL_SET,
                            first, err),
                    err);
    case OP_EMPTY_LIST:
        return push(m, pkl_new_value(m, PKL_LIST, err), err);
    case OP_EMPTY_DICT:
        return push(m, pkl_new_value(m, PKL_DICT, err), err);
    case OP_EMPTY_SET:
        return push(m, pkl_new_value(m, PKL_SET, err), err);
    case OP_DICT: {
        if (pop_mark(m, &first, err)) return -1;
        if ((m->sp - first) % 2)
            return mp_err(err, "bad_header", "DICT with an odd number of items at byte %zu", at);
        if (!(a = pkl_new_value(m, PKL_DICT, err))) return -1;
        for (size_t i = first; i < m->sp; i += 2)
            if (dict_set(m, a, m->stack[i], m->stack[i + 1], err)) return -1;
        m->sp = first;
        return push(m, a, err);
    }
    case OP_APPEND:
        if (!(b = pop(m, err)) || !(a = top(m, err))) return -1;
        if (a->kind != PKL_LIST)
            return mp_err(err, "unsafe_pickle", "APPEND to a %s at byte %zu",
                          pkl_kind_name(a->kind), at);
        return seq_append(m, a, b, err);
    case OP_APPENDS:
    case OP_ADDITEMS:
        if (pop_mark(m, &first, err)) return -1;
        if (first == 0 || first <= stack_floor(m))
            return mp_err(err, "bad_header", "pickle stack underflow");
        a = m->stack[first - 1];
        if (a->kind != (op == OP_APPENDS ? PKL_LIST : PKL_SET))
            return mp_err(err, "unsafe_pickle", "%s to a %s at byte %zu",
                          op == OP_APPENDS ? "APPENDS" : "ADDITEMS", pkl_kind_name(a->kind), at);
        for (size_t i = first; i < m->sp; i++)
            if (seq_append(m, a, m->stack[i], err)) return -1;
        m->sp = first;
        return 0;
    case OP_SETITEM:
        if (!(c = pop(m, err)) || !(b = pop(m, err)) || !(a = top(m, err))) return -1;
        if (a->kind != PKL_DICT)
            return mp_err(err, "unsafe_pickle", "SETITEM on a %s at byte %zu",
                          pkl_kind_name(a->kind), at);
        return dict_set(m, a, b, c, err);
    case OP_SETITEMS:
        if (pop_mark(m, &first, err)) return -1;
        if (first == 0 || first <= stack_floor(m))
            return mp_err(err, "bad_header", "pickle stack underflow");
        a = m->stack[first - 1];
        if (a->kind != PKL_DICT)
            return mp_err(err, "unsafe_pickle", "SETITEMS on a %s at byte %zu",
                          pkl_kind_name(a->kind), at);
        if ((m->sp - first) % 2)
            return mp_err(err, "bad_header", "SETITEMS with an odd number of items at byte %zu",
                          at);
        for (size_t i = first; i < m->sp; i += 2)
            if (dict_set(m, a, m->stack[i], m->stack[i + 1], err)) return -1;
        m->sp = first;
        return 0;
    case OP_BINPUT:
        if (need(r, 1, err)) return -1;
        return memo_put(m, r->p[r->pos++], err);
    case OP_LONG_BINPUT:
        if (need(r, 4, err)) return -1;
        r->pos += 4;
        return memo_put(m, le(r->p + r->pos - 4, 4), err);
    case OP_MEMOIZE:
        return memo_put(m, m->memo_len, err);
    case OP_BINGET:
        if (need(r, 1, err)) return -1;
        return memo_get(m, r->p[r->pos++], err);
    case OP_LONG_BINGET:
        if (need(r, 4, err)) return -1;
        r->pos += 4;
        return memo_get(m, le(r->p + r->pos - 4, 4), err);
    case OP_GLOBAL: {
        char mod[GLOBAL_LINE_MAX + 1], name[GLOBAL_LINE_MAX + 1];
        if (read_line(r, mod, err) || read_line(r, name, err)) return -1;
        return do_global(m, mod, name, err);
    }
    case OP_STACK_GLOBAL:
        if (!(b = pop(m, err)) || !(a = pop(m, err))) return -1;
        if (a->kind != PKL_STR || b->kind != PKL_STR || !a->u.str.len || !b->u.str.len ||
            a->u.str.len > GLOBAL_LINE_MAX || b->u.str.len > GLOBAL_LINE_MAX ||
            memchr(a->u.str.s, 0, a->u.str.len) || memchr(b->u.str.s, 0, b->u.str.len))
            return mp_err(err, "bad_header", "STACK_GLOBAL needs two short strings at byte %zu",
                          at);
        return do_global(m, a->u.str.s, b->u.str.s, err);
    case OP_REDUCE:
        if (!(b = pop(m, err)) || !(a = pop(m, err))) return -1;
        return do_reduce(m, a, b, false, "REDUCE", err);
    case OP_NEWOBJ:
        if (!(b = pop(m, err)) || !(a = pop(m, err))) return -1;
        return do_reduce(m, a, b, true, "NEWOBJ", err);
    case OP_NEWOBJ_EX:
        if (!(c = pop(m, err)) || !(b = pop(m, err)) || !(a = pop(m, err))) return -1;
        if (c->kind != PKL_DICT || c->u.dict.n)
            return mp_err(err, "unsafe_pickle", "NEWOBJ_EX with keyword arguments at byte %zu", at);
        return do_reduce(m, a, b, true, "NEWOBJ_EX", err);
    case OP_BUILD:
        if (!(b = pop(m, err)) || !(a = top(m, err))) return -1;
        if (a->kind == PKL_DICT) {
            /* OrderedDict's _metadata arrives here: an attribute, not items */
            a->u.dict.state = b;
            return 0;
        }
        if (a->kind != PKL_OBJ || !m->pol.build)
            return mp_err(err, "unsafe_pickle", "BUILD on a %s is not allowed (byte %zu)",
                          pkl_kind_name(a->kind), at);
        return m->pol.build(m->pol.ctx, m, a, b, err);
    case OP_BINPERSID:
        if (!(a = pop(m, err))) return -1;
        if (!m->pol.persistent_load)
            return mp_err(err, "unsafe_pickle", "persistent ids are not allowed here");
        return push(m, m->pol.persistent_load(m->pol.ctx, m, a, err), err);
    case OP_INST:
    case OP_OBJ:
    case OP_PERSID:
    case OP_EXT1:
    case OP_EXT2:
    case OP_EXT4:
        return mp_err(err, "unsafe_pickle", "pickle opcode 0x%02x (%s) is never allowed", op,
                      op == OP_INST     ? "INST"
                      : op == OP_OBJ    ? "OBJ"
                      : op == OP_PERSID ? "PERSID"
                                        : "EXT");
    default:
        return mp_err(err, "bad_header", "unsupported pickle opcode 0x%02x at byte %zu", op, at);
    }
}

int pkl_run(pkl_machine *m, const uint8_t *buf, size_t len, size_t *consumed, pkl_value **out,
            mp_error *err) {
    rd r = {buf, len, 0};
    m->sp = 0;
    m->nmarks = 0;
    m->memo_len = 0;
    m->ops = 0;
    if (m->memo_cap) memset(m->memo, 0, m->memo_cap * sizeof *m->memo);
    bool stop = false;
    pkl_value *res = NULL;
    while (!stop)
        if (step(m, &r, &stop, &res, err)) return -1;
    if (consumed) *consumed = r.pos;
    *out = res;
    return 0;
}
