/*
 * job_prepare.c - the prepare job: "make model M ready for engine E with tp
 * N (on these devices)" as one request with one status. It finds what the
 * model is and has, asks loader/prepare for the plan (prep_plan: download,
 * convert, inspect, shard, warm_load, each run or skipped with a reason),
 * runs the first step that must run as a child job (task_run_child: a job
 * of its own in the API, "parent" = this job), records what that step made
 * (prepare_record.c), and plans again, until nothing is left to run. The
 * plan and each step's state and child job are the job's "steps".
 *
 * It stops at the first failing step with that step's code and the message
 * prefixed by the step. Cancelling it cancels the running child (the child
 * sees this job's cancel). It is resumable: after a crash or a drain it is
 * re-queued, plans again, and what earlier steps made verifies and is not
 * made again (those steps keep their first child's id, from the
 * checkpoint). Submitted again when everything is in place, every step is
 * skipped and it succeeds at once.
 *
 * Params: for ("sglang" default, "vllm", "transformers"), tp_size (1),
 * devices (for warm_load), dtype (convert and warm_load), load (false),
 * allow_patterns (download).
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu.h"
#include "loader/hub/hub.h"
#include "loader/jobs/jobs_internal.h"
#include "loader/models/models.h"
#include "loader/prepare/prepare.h"
#include "loader/residents/residents.h"
#include "util/jobtype.h"

static const char *const ENGINES[] = {"sglang", "vllm", "transformers", NULL};
static const char *const DTYPES[] = {"keep", "bf16", "fp16", "fp32", NULL};

/* One run of a prepare job. */
typedef struct prep_ctx {
    mp_task *t;
    const mp_task_info *in;
    prep_request req;
    const char *dtype; /* params.dtype or NULL */
    char *record_path;
    json_t *record;
    /* the hub's answer, asked once per run */
    bool hub_asked, offline;
    char hub_commit[41];
    json_t *hub_names; /* file names of the hub's listing, or NULL */
    /* where things are, from the last look (owned) */
    char *source_dir; /* the model's own folder (snapshot or local) */
    char *source_id;  /* repo@commit or the folder */
    char *weights;    /* the "model" later steps read: the model or the convert output */
    char *weights_id; /* what those weights were made from */
    char *converted;  /* convert's output folder */
    char *sharded;    /* shard's output folder */
    bool convert_planned, shard_planned;
    /* this run */
    json_t *steps; /* the API's "steps" */
    bool ran[PREP_NKINDS];
    char jobs[PREP_NKINDS][40];   /* child job ids */
    json_t *results[PREP_NKINDS]; /* child results */
    json_t *prior;                /* checkpoint's steps (resume), borrowed */
    char running_job[40];
} prep_ctx;

static int tp_of(const json_t *params) {
    json_t *v = json_object_get(params, "tp_size");
    return json_is_integer(v) ? (int)json_integer_value(v) : 1;
}

static int prepare_validate(const mp_task_info *in, mp_error *err) {
    prep_engine e;
    const char *f = json_string_value(json_object_get(in->params, "for"));
    if (f && !prep_parse_engine(f, &e))
        return mp_err_field(err, "params.for", "bad_value",
                            "params.for must be sglang, vllm or transformers");
    int tp = tp_of(in->params);
    json_t *devs = json_object_get(in->params, "devices");
    /* An empty list is no list, as for warm_load: the default devices. */
    if (devs && json_array_size(devs) > 0 && (int)json_array_size(devs) != tp)
        return mp_err_field(err, "params.devices", "param_conflict",
                            "devices must list tp_size (%d) devices", tp);
    bool load = json_is_true(json_object_get(in->params, "load"));
    if (load && !devs && in->env && in->env->gpus && tp > gpu_set_count(in->env->gpus))
        return mp_err_field(err, "params.tp_size", "no_such_device",
                            "tp_size %d needs %d devices to load on, the server has %d", tp, tp,
                            gpu_set_count(in->env->gpus));
    return 0;
}

/* ---- what the model is now --------------------------------------------- */

static bool cancel_cb(void *arg) {
    return task_cancelled(arg);
}

/* The hub's commit for the revision (one cheap listing call, no retries).
 * Unreachable: the cached snapshot is used and the plan says so. Any other
 * answer (no such repo, gated) is left to the download step to report. */
static void ask_hub(prep_ctx *c) {
    const mp_task_info *in = c->in;
    c->hub_asked = true;
    if (hub_is_commit(in->revision)) {
        snprintf(c->hub_commit, sizeof c->hub_commit, "%s", in->revision);
        return;
    }
    const mp_task_env *env = in->env;
    hub_conn_opts o = {
        .endpoint =
            env->hub_endpoint && *env->hub_endpoint ? env->hub_endpoint : HUB_DEFAULT_ENDPOINT,
        .token = env->hf_token,
        .max_retries = 0,
        .backoff_base_s = 0.1,
        .cancel = cancel_cb,
        .cancel_arg = c->t,
    };
    hub_listing l = {0};
    mp_error err = {0};
    if (hub_fetch_listing(&o, in->model, in->revision, &l, &err) == 0) {
        snprintf(c->hub_commit, sizeof c->hub_commit, "%s", l.commit);
        c->hub_names = json_array();
        for (size_t i = 0; c->hub_names && i < l.nfiles; i++)
            json_array_append_new(c->hub_names, json_string(l.files[i].name));
    } else if (strcmp(err.code, "network_error") == 0 || strcmp(err.code, "hub_unavailable") == 0) {
        c->offline = true;
        task_log(c->t, "warn", "cannot reach the hub to check %s@%s (%s); using the cache",
                 in->model, in->revision, err.message);
    } else {
        task_log(c->t, "info", "the hub answered %s for %s@%s: %s", err.code, in->model,
                 in->revision, err.message);
    }
    hub_listing_free(&l);
}

static void forget_paths(prep_ctx *c) {
    free(c->source_dir);
    free(c->source_id);
    free(c->weights);
    free(c->weights_id);
    free(c->converted);
    free(c->sharded);
    c->source_dir = c->source_id = c->weights = c->weights_id = c->converted = c->sharded = NULL;
}

static json_t *opts_dtype(const prep_ctx *c) {
    return json_pack("{s:s}", "dtype", c->dtype ? c->dtype : "keep");
}

static json_t *opts_tp(const prep_ctx *c) {
    return json_pack("{s:i}", "tp_size", c->req.tp);
}

static json_t *opts_load(const prep_ctx *c) {
    json_t *devs = json_object_get(c->in->params, "devices");
    return json_pack("{s:i,s:s,s:O}", "tp_size", c->req.tp, "dtype", c->dtype ? c->dtype : "keep",
                     "devices", devs ? devs : json_null());
}

/* Whether an entry verifies for these options (options freed). */
static bool entry_ok(prep_ctx *c, const char *key, const char *source, json_t *options) {
    char why[256];
    bool ok =
        prep_record_verifies(json_object_get(c->record, key), source, options, why, sizeof why);
    json_decref(options);
    return ok;
}

/* warm_load's output is a resident, not files: in place while the one this
 * record names is still on the devices. */
static bool resident_ok(prep_ctx *c, const char *source) {
    json_t *e = json_object_get(c->record, "warm_load");
    const char *id = json_string_value(json_object_get(e, "resident_id"));
    const char *src = json_string_value(json_object_get(e, "source"));
    json_t *o = opts_load(c);
    bool same =
        id && src && strcmp(src, source) == 0 && json_equal(json_object_get(e, "options"), o);
    json_decref(o);
    if (!same || !c->in->env->residents) return false;
    json_t *r = res_get(c->in->env->residents, id);
    bool ok = r != NULL;
    json_decref(r);
    return ok;
}

static char *dup_printf(const char *fmt, const char *a, const char *b) {
    char *s = NULL;
    if (asprintf(&s, fmt, a, b) < 0) return NULL;
    return s;
}

/* Looks at the cache, the folders and the record; fills the facts. */
static int gather(prep_ctx *c, prep_facts *f, mp_error *err) {
    const mp_task_info *in = c->in;
    memset(f, 0, sizeof *f);
    memcpy(f->ran, c->ran, sizeof f->ran);
    forget_paths(c);
    f->is_hub = in->is_hub_model;
    json_t *names = NULL;
    if (f->is_hub) {
        char commit[41] = "";
        c->source_dir = mref_snapshot_dir(in->env->hub_cache, in->model, in->revision, commit);
        f->cached = c->source_dir != NULL;
        f->offline = c->offline;
        f->stale = f->cached && c->hub_commit[0] && strcmp(commit, c->hub_commit) != 0;
        c->source_id = dup_printf("%s@%s", in->model, f->cached ? commit : c->hub_commit);
    } else {
        c->source_dir = in->model_path ? strdup(in->model_path) : NULL;
        c->source_id = c->source_dir ? strdup(c->source_dir) : NULL;
        if (!c->source_dir) return mp_err(err, "not_found", "%s is not available", in->model);
    }
    if (!c->source_id) return mp_err(err, "no_memory", "out of memory");
    if (f->cached || !f->is_hub) {
        json_t *files = prep_dir_files(c->source_dir);
        names = json_array();
        const char *k;
        json_t *v;
        json_object_foreach(files, k, v) json_array_append_new(names, json_string(k));
        json_decref(files);
    } else if (c->hub_names) {
        names = json_incref(c->hub_names);
    }
    if (names) {
        json_t *fmts = cache_formats_of(names);
        size_t i;
        json_t *it;
        f->formats_known = true;
        json_array_foreach(fmts, i, it) {
            const char *n = json_string_value(it);
            if (strcmp(n, "safetensors") == 0) f->has_safetensors = true;
            if (strcmp(n, "pt") == 0 || strcmp(n, "gguf") == 0) f->has_convertible = true;
        }
        json_decref(fmts);
        json_decref(names);
    }
    /* The outputs, at the folders convert and shard would pick. */
    c->convert_planned = f->formats_known && !f->has_safetensors && f->has_convertible;
    if (job_output_default(in, "converted", "", false, &c->converted, err) != 0) return -1;
    f->in_place[PREP_CONVERT] = entry_ok(c, "convert", c->source_id, opts_dtype(c));
    if (c->convert_planned) {
        c->weights = strdup(c->converted);
        c->weights_id = dup_printf("%s<-%s", c->converted, c->source_id);
    } else {
        c->weights = strdup(in->model);
        c->weights_id = strdup(c->source_id);
    }
    if (!c->weights || !c->weights_id) return mp_err(err, "no_memory", "out of memory");
    f->in_place[PREP_INSPECT] = entry_ok(c, "inspect", c->weights_id, opts_tp(c));
    char key[32];
    snprintf(key, sizeof key, "shard-tp%d", c->req.tp);
    c->shard_planned = prep_engine_shards(c->req.engine, c->req.tp);
    if (c->shard_planned) {
        /* shard names its default output after its model: the repo or the
         * convert output folder */
        mp_task_info wi = *in;
        wi.model = c->weights;
        wi.is_hub_model = !c->convert_planned && in->is_hub_model;
        if (!wi.is_hub_model) wi.revision = "main";
        char suffix[24];
        snprintf(suffix, sizeof suffix, "-tp%d", c->req.tp);
        if (job_output_default(&wi, "sharded", suffix, false, &c->sharded, err) != 0) return -1;
        f->in_place[PREP_SHARD] = entry_ok(c, key, c->weights_id, opts_tp(c));
    }
    f->in_place[PREP_WARM_LOAD] = resident_ok(c, c->shard_planned ? c->sharded : c->weights_id);
    return 0;
}

/* ---- steps ---------------------------------------------------------------- */

/* The child job a step had in the interrupted run it resumes, when that run
 * saw it succeed. */
static const char *prior_job(prep_ctx *c, prep_kind k) {
    size_t i;
    json_t *s;
    json_array_foreach(c->prior, i, s) {
        const char *type = json_string_value(json_object_get(s, "type"));
        const char *st = json_string_value(json_object_get(s, "state"));
        if (type && st && strcmp(type, prep_kind_name(k)) == 0 && strcmp(st, "succeeded") == 0)
            return json_string_value(json_object_get(s, "job"));
    }
    return NULL;
}

static const char *step_model(const prep_ctx *c, prep_kind k) {
    switch (k) {
    case PREP_DOWNLOAD:
    case PREP_CONVERT:
        return c->in->model;
    case PREP_WARM_LOAD:
        return c->shard_planned ? c->sharded : c->weights;
    default:
        return c->weights;
    }
}

/* The API's steps from a plan; a step's state: what it did in this run,
 * else what the interrupted run saw it do, else pending or skipped. */
static void publish_steps(prep_ctx *c, const prep_step *plan, size_t n, int running) {
    json_t *steps = json_array();
    for (size_t i = 0; steps && i < n; i++) {
        prep_kind k = plan[i].kind;
        const char *state = plan[i].run ? "pending" : "skipped";
        const char *job = NULL;
        const char *pj = prior_job(c, k);
        if ((int)k == running) {
            state = "running";
            job = c->running_job[0] ? c->running_job : NULL;
        } else if (c->ran[k]) {
            state = "succeeded";
            job = c->jobs[k];
        } else if (!plan[i].run && pj) {
            state = "succeeded";
            job = pj;
        }
        json_t *s = json_pack("{s:s,s:s,s:s,s:s}", "type", prep_kind_name(k), "state", state,
                              "reason", plan[i].reason, "model", step_model(c, k));
        if (!s) continue;
        json_object_set_new(s, "job", job ? json_string(job) : json_null());
        json_array_append_new(steps, s);
    }
    if (!steps) return;
    json_decref(c->steps);
    c->steps = steps;
    task_steps(c->t, steps);
}

static void mark_step(prep_ctx *c, prep_kind k, const char *state, const char *job) {
    size_t i;
    json_t *s;
    json_array_foreach(c->steps, i, s) {
        if (strcmp(json_string_value(json_object_get(s, "type")), prep_kind_name(k)) != 0) continue;
        json_object_set_new(s, "state", json_string(state));
        if (job) json_object_set_new(s, "job", json_string(job));
    }
    task_steps(c->t, c->steps);
}

typedef struct started_arg {
    prep_ctx *c;
    prep_kind k;
} started_arg;

static void child_started(void *arg, const char *child_id) {
    started_arg *a = arg;
    snprintf(a->c->running_job, sizeof a->c->running_job, "%s", child_id);
    mark_step(a->c, a->k, "running", child_id);
}

/* The child request of a step (params owned by the caller). */
static json_t *step_params(const prep_ctx *c, prep_kind k) {
    json_t *p = json_object();
    json_t *in = c->in->params;
    switch (k) {
    case PREP_DOWNLOAD:
        json_object_set_new(p, "load_format", json_string("auto"));
        if (json_object_get(in, "allow_patterns"))
            json_object_set(p, "allow_patterns", json_object_get(in, "allow_patterns"));
        break;
    case PREP_CONVERT:
        /* The default output is prepare's to replace: its record says the
         * folder there is not what this request needs. */
        if (c->dtype) json_object_set_new(p, "dtype", json_string(c->dtype));
        json_object_set_new(p, "overwrite", json_true());
        break;
    case PREP_INSPECT:
        json_object_set_new(p, "tp_sizes", json_pack("[i]", c->req.tp));
        break;
    case PREP_SHARD:
        json_object_set_new(p, "tp_size", json_integer(c->req.tp));
        json_object_set_new(p, "overwrite", json_true());
        break;
    case PREP_WARM_LOAD:
        json_object_set_new(p, "tp_size", json_integer(c->req.tp));
        json_object_set_new(p, "load_format",
                            json_string(c->shard_planned ? "sharded_state" : "auto"));
        if (json_object_get(in, "devices"))
            json_object_set(p, "devices", json_object_get(in, "devices"));
        if (c->dtype) json_object_set_new(p, "dtype", json_string(c->dtype));
        break;
    default:
        break;
    }
    return p;
}

/* After a step: what it made goes into the record, so that the next plan
 * (and the next prepare) sees it in place. A record that cannot be written
 * only costs a later prepare a re-run: logged, not fatal. */
static void record_step(prep_ctx *c, prep_kind k, json_t *result) {
    json_t *entry = NULL;
    const char *key = prep_kind_name(k);
    char shard_key[32];
    const char *job = c->jobs[k];
    switch (k) {
    case PREP_CONVERT: {
        json_t *o = opts_dtype(c);
        entry = prep_record_entry(c->source_id, o, c->converted, job);
        json_decref(o);
        break;
    }
    case PREP_INSPECT: {
        const char *dir = c->convert_planned ? c->converted : c->source_dir;
        json_t *o = opts_tp(c);
        entry = prep_record_entry(c->weights_id, o, dir, job);
        json_decref(o);
        break;
    }
    case PREP_SHARD: {
        snprintf(shard_key, sizeof shard_key, "shard-tp%d", c->req.tp);
        key = shard_key;
        const char *out = json_string_value(json_object_get(result, "output_path"));
        json_t *o = opts_tp(c);
        entry = prep_record_entry(c->weights_id, o, out ? out : c->sharded, job);
        json_decref(o);
        break;
    }
    case PREP_WARM_LOAD: {
        const char *rid = json_string_value(json_object_get(result, "resident_id"));
        if (rid)
            entry = json_pack("{s:s,s:o,s:s,s:s}", "source",
                              c->shard_planned ? c->sharded : c->weights_id, "options",
                              opts_load(c), "resident_id", rid, "job", job);
        break;
    }
    default:
        return; /* download: the cache is its own record */
    }
    if (!entry) {
        task_log(c->t, "warn", "cannot record what the %s step made", prep_kind_name(k));
        return;
    }
    json_object_set_new(c->record, key, entry);
    mp_error err = {0};
    if (prep_record_save(c->record_path, c->record, &err) != 0)
        task_log(c->t, "warn", "cannot save the prepare record %s: %s", c->record_path,
                 err.message);
}

static void save_progress(prep_ctx *c) {
    json_t *cp = json_pack("{s:O}", "steps", c->steps ? c->steps : json_null());
    /* Resume state only: an unsaved one costs the display of earlier
     * steps' job ids after a crash, never correctness (the record is what
     * decides what runs). task_checkpoint has logged it. */
    if (cp && task_checkpoint(c->t, cp) != 0) task_log(c->t, "debug", "checkpoint not saved");
}

/* Runs one step as a child. 0, or -1 after task_fail. */
static int run_step(prep_ctx *c, prep_kind k, const char *revision) {
    json_t *params = step_params(c, k);
    started_arg sa = {c, k};
    c->running_job[0] = 0;
    mp_child_req rq = {.type = prep_kind_name(k),
                       .model = step_model(c, k),
                       .revision = revision,
                       .params = params,
                       .started = child_started,
                       .arg = &sa};
    json_t *result = NULL;
    mp_error err = {0};
    int rc = task_run_child(c->t, &rq, &result, &err);
    json_decref(params);
    snprintf(c->jobs[k], sizeof c->jobs[k], "%s", c->running_job);
    if (rc != 0) {
        bool stopped = task_cancelled(c->t);
        mark_step(c, k, stopped && !task_draining(c->t) ? "cancelled" : "failed",
                  c->running_job[0] ? c->running_job : NULL);
        if (task_draining(c->t))
            return task_fail(c->t, "interrupted", "step %s: interrupted by a shutdown",
                             prep_kind_name(k));
        if (stopped)
            return task_fail(c->t, "cancelled", "cancelled during step %s", prep_kind_name(k));
        mp_err_wrap(&err, NULL, "step %s", prep_kind_name(k));
        return task_fail(c->t, err.code, "%s", err.message);
    }
    c->ran[k] = true;
    c->results[k] = result;
    record_step(c, k, result);
    mark_step(c, k, "succeeded", c->jobs[k]);
    save_progress(c);
    return 0;
}

static json_t *final_result(prep_ctx *c) {
    int ran = 0, skipped = 0;
    size_t i;
    json_t *s;
    json_array_foreach(c->steps, i, s) {
        const char *st = json_string_value(json_object_get(s, "state"));
        if (st && strcmp(st, "skipped") == 0)
            skipped++;
        else
            ran++;
    }
    const char *next = c->shard_planned ? c->sharded : c->weights;
    json_t *r = json_pack("{s:s,s:s,s:i,s:s,s:O,s:i,s:i,s:b}", "next_model", next, "for",
                          prep_engine_name(c->req.engine), "tp_size", c->req.tp, "load_format",
                          c->shard_planned ? "sharded_state" : "auto", "steps", c->steps, "ran",
                          ran, "skipped", skipped, "offline", c->offline);
    if (!r) return NULL;
    const char *rid = json_string_value(json_object_get(c->results[PREP_WARM_LOAD], "resident_id"));
    if (!rid && c->req.load)
        rid = json_string_value(
            json_object_get(json_object_get(c->record, "warm_load"), "resident_id"));
    json_object_set_new(r, "resident_id", rid ? json_string(rid) : json_null());
    json_t *insp = c->results[PREP_INSPECT];
    if (insp) json_object_set(r, "inspection", insp);
    return r;
}

static int prepare_loop(prep_ctx *c) {
    /* Each round plans afresh and runs the first step that must run. A step
     * runs at most once per job: what it made either verifies afterwards
     * or the next round would loop, so a step that ran counts as done. */
    for (int round = 0; round <= PREP_NKINDS; round++) {
        if (task_cancelled(c->t))
            return task_fail(c->t, task_draining(c->t) ? "interrupted" : "cancelled",
                             "stopped between steps");
        prep_facts f;
        mp_error err = {0};
        if (gather(c, &f, &err) != 0) return task_fail(c->t, err.code, "%s", err.message);
        prep_step plan[PREP_NKINDS];
        size_t n = prep_plan(&f, &c->req, plan);
        int next = -1;
        for (size_t i = 0; i < n && next < 0; i++)
            if (plan[i].run && !c->ran[plan[i].kind]) next = (int)i;
        publish_steps(c, plan, n, -1);
        size_t done = 0;
        for (size_t i = 0; i < n; i++)
            done += !plan[i].run || c->ran[plan[i].kind];
        if (next < 0) {
            task_progress(c->t, n, n, "steps", "ready");
            return 0;
        }
        prep_kind k = plan[next].kind;
        char msg[64];
        snprintf(msg, sizeof msg, "step %s", prep_kind_name(k));
        task_progress(c->t, done, n, "steps", msg);
        /* Paths carry no revision; the repo's steps keep the job's. */
        bool on_repo = strchr(step_model(c, k), '/') && step_model(c, k)[0] != '/';
        if (run_step(c, k, on_repo ? c->in->revision : "main") != 0) return -1;
    }
    return task_fail(c->t, "internal", "the plan did not settle");
}

static int prepare_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    prep_ctx c = {.t = t, .in = in};
    const char *f = json_string_value(json_object_get(in->params, "for"));
    if (!prep_parse_engine(f ? f : "sglang", &c.req.engine))
        return task_fail(t, "bad_request", "params.for must be sglang, vllm or transformers");
    c.req.tp = tp_of(in->params);
    c.req.load = json_is_true(json_object_get(in->params, "load"));
    c.dtype = json_string_value(json_object_get(in->params, "dtype"));
    c.prior = json_object_get(in->checkpoint, "steps");
    c.record_path = prep_record_path(in->env->data_dir, in->model, in->revision, in->is_hub_model);
    if (!c.record_path) return task_fail(t, "bad_model", "no usable record name for %s", in->model);
    c.record = prep_record_load(c.record_path);
    if (in->is_hub_model) ask_hub(&c);
    int rc = prepare_loop(&c);
    if (rc == 0) {
        json_t *r = final_result(&c);
        rc = r ? task_succeed(t, r) : task_fail(t, "no_memory", "out of memory");
    }
    for (int k = 0; k < PREP_NKINDS; k++)
        json_decref(c.results[k]);
    forget_paths(&c);
    json_decref(c.steps);
    json_decref(c.hub_names);
    json_decref(c.record);
    free(c.record_path);
    return rc;
}

static const mp_param_spec prepare_params[] = {
    {"for", MP_P_STRING, ENGINES, 0, 0},
    {"tp_size", MP_P_INT, NULL, 1, 1024},
    {"devices", MP_P_INT_ARRAY, NULL, 0, GPU_MAX_DEVICES - 1},
    {"dtype", MP_P_STRING, DTYPES, 0, 0},
    {"load", MP_P_BOOL, NULL, 0, 0},
    {"allow_patterns", MP_P_STRING_ARRAY, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_prepare = {
    .name = "prepare",
    .params = prepare_params,
    .validate = prepare_validate,
    .run = prepare_run,
    .flags = MP_JOB_RESUMABLE,
};
