/* prepare_plan.c - the pure plan of a prepare job (see prepare.h): the
 * engine rule table and which steps run or are skipped, and why. */
#include <stdio.h>
#include <string.h>

#include "loader/prepare/prepare.h"

static const char *const KIND_NAMES[PREP_NKINDS] = {"download", "convert", "inspect", "shard",
                                                    "warm_load"};
static const char *const ENGINE_NAMES[] = {"sglang", "vllm", "transformers"};

const char *prep_kind_name(prep_kind k) {
    return k < PREP_NKINDS ? KIND_NAMES[k] : "?";
}

const char *prep_engine_name(prep_engine e) {
    return (unsigned)e < 3 ? ENGINE_NAMES[e] : "?";
}

bool prep_parse_engine(const char *s, prep_engine *out) {
    for (int i = 0; s && i < 3; i++) {
        if (strcmp(s, ENGINE_NAMES[i]) == 0) {
            *out = (prep_engine)i;
            return true;
        }
    }
    return false;
}

bool prep_engine_shards(prep_engine e, int tp) {
    return e == PREP_SGLANG && tp > 1;
}

static prep_step *add(prep_step *out, size_t *n, prep_kind k, bool run, const char *reason) {
    prep_step *s = &out[(*n)++];
    s->kind = k;
    s->run = run;
    snprintf(s->reason, sizeof s->reason, "%s", reason);
    return s;
}

/* A step runs when its output does not verify, or when what it reads is
 * rebuilt by an earlier step of this plan (or was, earlier in this job). */
static bool needs_run(const prep_facts *f, prep_kind k, bool input_rebuilt, const char **why) {
    if (f->ran[k]) {
        *why = "ran in this job";
        return true;
    }
    if (input_rebuilt) {
        *why = "its input is rebuilt by an earlier step";
        return true;
    }
    if (!f->in_place[k]) {
        *why = "no verified output yet";
        return true;
    }
    *why = "in place: its recorded files are there with their recorded sizes";
    return false;
}

size_t prep_plan(const prep_facts *f, const prep_request *r, prep_step out[PREP_NKINDS]) {
    size_t n = 0;
    const char *why = "";
    /* the folder later steps read from */
    bool weights_rebuilt = f->ran[PREP_DOWNLOAD] || f->ran[PREP_CONVERT];
    if (f->is_hub) {
        if (f->ran[PREP_DOWNLOAD]) {
            add(out, &n, PREP_DOWNLOAD, true, "ran in this job");
        } else if (!f->cached) {
            add(out, &n, PREP_DOWNLOAD, true, "not in the cache");
            weights_rebuilt = true;
        } else if (f->stale) {
            add(out, &n, PREP_DOWNLOAD, true, "the hub has a newer commit than the cache");
            weights_rebuilt = true;
        } else if (f->offline) {
            add(out, &n, PREP_DOWNLOAD, false,
                "cached; the hub could not be reached to check for a newer commit, so the "
                "cached one is used");
        } else {
            add(out, &n, PREP_DOWNLOAD, false, "cached at the hub's current commit");
        }
    }
    /* Unknown formats (a hub repo we could not list and do not have) plan
     * no convert: the download step fails first and says why. */
    if (f->formats_known && !f->has_safetensors && f->has_convertible) {
        bool run = needs_run(f, PREP_CONVERT, weights_rebuilt, &why);
        char reason[200];
        snprintf(reason, sizeof reason, "only .bin/.pt/GGUF weights; %s", why);
        add(out, &n, PREP_CONVERT, run, reason);
        weights_rebuilt |= run;
    }
    /* run first: an argument list would read `why` in no defined order */
    bool inspect_run = needs_run(f, PREP_INSPECT, weights_rebuilt, &why);
    add(out, &n, PREP_INSPECT, inspect_run, why);
    bool sharded_rebuilt = f->ran[PREP_SHARD];
    if (prep_engine_shards(r->engine, r->tp)) {
        bool run = needs_run(f, PREP_SHARD, weights_rebuilt, &why);
        char reason[200];
        snprintf(reason, sizeof reason, "%s loads tp %d from sharded_state; %s",
                 prep_engine_name(r->engine), r->tp, why);
        add(out, &n, PREP_SHARD, run, reason);
        sharded_rebuilt = run;
    }
    if (r->load) {
        bool run = needs_run(f, PREP_WARM_LOAD, weights_rebuilt || sharded_rebuilt, &why);
        add(out, &n, PREP_WARM_LOAD, run,
            run ? why : "resident: the weights an earlier prepare loaded are still on the devices");
    }
    return n;
}
