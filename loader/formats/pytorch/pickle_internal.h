/*
 * pickle.h - a small, strict pickle machine (pkl_) for the pickles torch.save
 * writes: the protocol 2 opcodes of torch's weights_only unpickler plus the
 * protocol 3-5 framing/bytes/memo opcodes. It never imports or calls
 * anything: GLOBAL is a lookup through the caller's policy, and REDUCE,
 * NEWOBJ, BUILD and BINPERSID are handed to policy callbacks that build
 * plain values. Missing callbacks mean the opcode is refused.
 *
 * All values live in the machine's arena and are freed with it; the memo
 * holds references (a dict memoized before SETITEMS fills it is the same
 * dict), so the result may share subtrees and may even contain cycles:
 * walkers must bound their depth.
 */
#ifndef MP_LOADER_PICKLE_H
#define MP_LOADER_PICKLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

typedef enum pkl_kind {
    PKL_NONE,
    PKL_BOOL,
    PKL_INT,
    PKL_FLOAT,
    PKL_STR,   /* UTF-8 checked */
    PKL_BYTES, /* raw */
    PKL_TUPLE,
    PKL_LIST,
    PKL_SET,
    PKL_DICT,
    PKL_GLOBAL, /* module.name the policy allowed */
    PKL_OBJ,    /* an object a policy callback built: tag + pointer */
} pkl_kind;

typedef struct pkl_value pkl_value;
struct pkl_value {
    pkl_kind kind;
    uint16_t depth; /* nesting when built (containers filled later may be deeper) */
    union {
        bool b;
        int64_t i;
        double f;
        struct {
            char *s; /* NUL-terminated copy (may contain NULs for BYTES) */
            size_t len;
        } str;
        struct {
            pkl_value **items;
            size_t n, cap;
        } seq; /* TUPLE, LIST, SET */
        struct {
            pkl_value **keys, **vals;
            size_t n, cap;
            pkl_value *state; /* last BUILD state, kept but not merged */
        } dict;
        struct {
            const char *module, *name;
            int id; /* policy's id for it */
        } global;
        struct {
            int tag;
            void *ptr;
            pkl_value *state;
        } obj;
    } u;
};

typedef struct pkl_machine pkl_machine;

typedef struct pkl_policy {
    void *ctx;
    /* GLOBAL / STACK_GLOBAL: return an id >= 0, or set err and return -1. */
    int (*global)(void *ctx, const char *module, const char *name, mp_error *err);
    /* REDUCE (is_new false: callable(*args)) and NEWOBJ (is_new true:
     * cls.__new__(cls, *args)); args is a TUPLE. NULL result: err is set. */
    pkl_value *(*reduce)(void *ctx, pkl_machine *m, pkl_value *callable, pkl_value *args,
                         bool is_new, mp_error *err);
    /* BUILD: apply state to obj (obj is never a DICT: dict BUILD is kept in
     * u.dict.state by the machine). Return 0 or -1 with err. */
    int (*build)(void *ctx, pkl_machine *m, pkl_value *obj, pkl_value *state, mp_error *err);
    /* BINPERSID */
    pkl_value *(*persistent_load)(void *ctx, pkl_machine *m, pkl_value *pid, mp_error *err);
} pkl_policy;

typedef struct pkl_limits {
    size_t max_stack;       /* values on the stack at once */
    size_t max_marks;       /* open MARKs */
    size_t max_depth;       /* container nesting */
    size_t max_memo;        /* memo slots */
    size_t max_arena_bytes; /* all values together */
    size_t max_container;   /* items in one tuple/list/dict/set */
} pkl_limits;

/* Defaults sized for state dicts of the largest models: plenty for a 1 MB
 * data.pkl with 100k tensors, far below what would hurt the host. */
void pkl_limits_default(pkl_limits *lim);

/* lim NULL means defaults. policy is copied. NULL on out of memory. */
pkl_machine *pkl_new(const pkl_limits *lim, const pkl_policy *policy);
void pkl_free(pkl_machine *m);

/* Runs one pickle (up to STOP) from buf. Stack and memo start empty each
 * run; values of earlier runs stay valid. *consumed (may be NULL) gets the
 * bytes used. Errors: "truncated" (ran off the end), "bad_header"
 * (malformed), "unsafe_pickle" (a refused global/opcode/operation),
 * "too_large" (a limit), "no_memory". */
int pkl_run(pkl_machine *m, const uint8_t *buf, size_t len, size_t *consumed, pkl_value **out,
            mp_error *err);

/* Value constructors for policy callbacks (arena-owned; NULL + err on limits). */
void *pkl_alloc(pkl_machine *m, size_t n, mp_error *err);
pkl_value *pkl_new_value(pkl_machine *m, pkl_kind kind, mp_error *err);
pkl_value *pkl_new_obj(pkl_machine *m, int tag, void *ptr, mp_error *err);
pkl_value *pkl_new_bytes(pkl_machine *m, const void *p, size_t len, mp_error *err);

/* Helpers for walkers. */
const char *pkl_kind_name(pkl_kind k);
bool pkl_is_str(const pkl_value *v, const char *s);
/* Tuple or list items; false if v is neither. */
bool pkl_items(const pkl_value *v, pkl_value ***items, size_t *n);

#endif
