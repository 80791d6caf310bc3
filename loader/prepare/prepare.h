/*
 * prepare.h - the plan of a prepare job: which steps make model M ready for
 * engine E with tensor-parallel size N (prep_ prefix). Two halves:
 *
 * prepare_plan.c (pure): from what the model is and has (prep_facts) and
 * what is asked (prep_request), the ordered steps, each to run or to skip
 * with a reason. The rule table is README's "prepare" section:
 *
 *   hub repo not cached, or cached at another commit than the hub's  -> download
 *   weights only .bin/.pt/.pth or GGUF (no safetensors)              -> convert
 *   always                                                           -> inspect
 *   tp > 1 and the engine loads pre-sharded state (sglang)           -> shard
 *   load: true                                                       -> warm_load
 *
 * A step is skipped when its output is in place and verifies (see
 * prepare_record.c), unless a step it reads from runs in this plan.
 *
 * prepare_record.c: the record a prepare keeps per model@revision under
 * <data>/prepared/, one entry per step output (its source, its options, and
 * each file's size), and the check that an entry still verifies: the source
 * and options are the same and every recorded file is there with its
 * recorded size. No hashing: this is the cheap check that lets an
 * identical request succeed at once; a verify job does the expensive one.
 */
#ifndef MP_LOADER_PREPARE_H
#define MP_LOADER_PREPARE_H
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "util/error.h"

typedef enum prep_engine { PREP_SGLANG, PREP_VLLM, PREP_TRANSFORMERS } prep_engine;

typedef enum prep_kind {
    PREP_DOWNLOAD,
    PREP_CONVERT,
    PREP_INSPECT,
    PREP_SHARD,
    PREP_WARM_LOAD,
    PREP_NKINDS
} prep_kind;

typedef struct prep_request {
    prep_engine engine;
    int tp;    /* >= 1 */
    bool load; /* end with a warm_load */
} prep_request;

/* What the model is and has, as the job found it just now. */
typedef struct prep_facts {
    bool is_hub;                /* a hub repo id (else a local folder) */
    bool cached;                /* hub: a snapshot of the revision is in the cache */
    bool stale;                 /* hub: the hub's commit differs from the cached one */
    bool offline;               /* hub: the hub could not be asked; the cache is used */
    bool formats_known;         /* the three below come from the cache, the hub or the folder */
    bool has_safetensors;       /* *.safetensors weights */
    bool has_convertible;       /* *.bin / *.pt / *.pth / *.gguf weights */
    bool in_place[PREP_NKINDS]; /* that step's output is there and verifies */
    bool ran[PREP_NKINDS];      /* this job already ran that step: its output is new */
} prep_facts;

typedef struct prep_step {
    prep_kind kind;
    bool run;
    char reason[200];
} prep_step;

/* The steps in order (at most PREP_NKINDS). Returns how many. */
size_t prep_plan(const prep_facts *f, const prep_request *r, prep_step out[PREP_NKINDS]);
/* Whether an engine loads a pre-sharded checkpoint at this tp: SGLang with
 * --load-format sharded_state when tp > 1. vLLM reads the same file layout,
 * but its parameter names are not checked against our shard output, and
 * transformers splits at load time: both load the plain checkpoint. */
bool prep_engine_shards(prep_engine e, int tp);
const char *prep_kind_name(prep_kind k);
const char *prep_engine_name(prep_engine e);
/* "sglang", "vllm", "transformers"; false for anything else. */
bool prep_parse_engine(const char *s, prep_engine *out);

/* ---- records (prepare_record.c) ---- */

/* {name: size} of the regular files at the top of dir (links followed),
 * or NULL when dir cannot be read. */
json_t *prep_dir_files(const char *dir);
/* The record file of model@revision: <data_dir>/prepared/<name>.json, name
 * as convert names its default output (caller frees). */
char *prep_record_path(const char *data_dir, const char *model, const char *revision, bool is_hub);
/* The record ({} when there is none yet or it is unreadable: then every
 * step runs, which is always safe). */
json_t *prep_record_load(const char *path);
/* Writes it atomically (<data_dir>/prepared is made when missing). */
int prep_record_save(const char *path, json_t *record, mp_error *err);
/* An entry for a step output: {"source", "options", "output", "files",
 * "job"}; files from prep_dir_files(output). NULL when output is unreadable. */
json_t *prep_record_entry(const char *source, json_t *options, const char *output, const char *job);
/* Whether entry (may be NULL) still verifies for this source and options:
 * same source, equal options, and every recorded file present with its
 * recorded size. why (when not) says what differs. */
bool prep_record_verifies(json_t *entry, const char *source, json_t *options, char *why,
                          size_t whylen);
#endif
