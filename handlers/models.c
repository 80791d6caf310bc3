/* models.c - /v1/models: every model a job can take (the hub cache, the
 * model roots, our convert and shard outputs, the copies of s3:// downloads,
 * each with its kind and last
 * inspection), one
 * cached model with its files and last inspection, and eviction (409 while
 * resident or in use). */
#include <string.h>

#include "handlers/handlers.h"
#include "loader/models/models.h"
#include "loader/residents/residents.h"
#include "store/store.h"

static bool repo_from_params(http_req *rq, http_resp *rs, char *repo, size_t len) {
    snprintf(repo, len, "%s/%s", rq->params[0], rq->params[1]);
    if (!mref_is_repo_id(repo)) {
        resp_problem(rs, 400, "not a valid repo id (org/name)",
                     json_pack("[{s:s,s:s}]", "field", "model", "code", "bad_model"));
        return false;
    }
    return true;
}

void h_models_list(http_req *rq, http_resp *rs) {
    const mp_config *cfg = &rq->srv->cfg;
    json_t *models = cache_list(cfg->hub_cache);
    int rc = models ? 0 : -1;
    for (int i = 0; rc == 0 && i < cfg->n_model_roots; i++)
        rc = mref_list_root(cfg->model_roots[i], "local", models);
    if (rc == 0 && cfg->output_roots[0])
        rc = mref_list_root(cfg->output_roots[0], "converted", models);
    if (rc == 0 && cfg->output_roots[1])
        rc = mref_list_root(cfg->output_roots[1], "sharded", models);
    if (rc == 0) rc = mref_list_s3(cfg->data_dir, models);
    if (rc != 0) {
        json_decref(models);
        resp_problem(rs, 503, "out of memory", NULL);
        return;
    }
    /* Each model's last inspection, so a client lists what the node has and
     * what it is in one call. A path model is inspected at revision "main"
     * (what a job on it records), a hub model at the ref it is listed by. */
    size_t i;
    json_t *m;
    json_array_foreach(models, i, m) {
        const char *rev = json_string_value(json_object_get(m, "revision"));
        json_t *insp = store_inspection_get(
            rq->srv->store, json_string_value(json_object_get(m, "model")), rev ? rev : "main");
        json_object_set_new(m, "inspection", insp ? insp : json_null());
    }
    resp_json(rs, 200, json_pack("{s:o}", "models", models));
}

void h_models_get(http_req *rq, http_resp *rs) {
    char repo[256];
    if (!repo_from_params(rq, rs, repo, sizeof repo)) return;
    const char *rev = http_query(rq, "revision");
    if (rev && !mref_is_revision(rev)) {
        resp_problem(rs, 400, "bad revision", NULL);
        return;
    }
    json_t *m = cache_model(rq->srv->cfg.hub_cache, repo, rev);
    if (!m) {
        resp_problem(rs, 404, "this model is not in the local cache", NULL);
        return;
    }
    const char *revision = json_string_value(json_object_get(m, "revision"));
    json_t *insp = store_inspection_get(rq->srv->store, repo, revision);
    json_object_set_new(m, "inspection", insp ? insp : json_null());
    resp_json(rs, 200, m);
}

void h_models_delete(http_req *rq, http_resp *rs) {
    char repo[256];
    if (!repo_from_params(rq, rs, repo, sizeof repo)) return;
    if (rq->srv->residents && res_model_resident(rq->srv->residents, repo)) {
        resp_problem(rs, 409, "the model is resident on a device; unload it first", NULL);
        return;
    }
    if (store_job_active_for_model(rq->srv->store, repo)) {
        resp_problem(rs, 409, "a queued or running job uses this model", NULL);
        return;
    }
    mp_error err = {0};
    if (cache_evict(rq->srv->cfg.hub_cache, repo, &err) != 0) {
        resp_error(rs, strcmp(err.code, "not_found") == 0 ? 404 : 503, &err);
        return;
    }
    resp_json(rs, 200, json_pack("{s:s,s:b}", "model", repo, "evicted", 1));
}
