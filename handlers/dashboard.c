/* dashboard.c - GET / (the web dashboard) and GET /ui/{file} (its script and
 * style sheet), served from the files of web/ built into the binary. These
 * routes are open: the page holds no data, it asks for the token itself and
 * sends it with every API call it makes. */
#include <string.h>

#include "handlers/handlers.h"
#include "util/assets.h"

/* Only web files are served here, by extension, so that other built-in
 * assets (the OpenAPI document) are not reachable under /ui/. */
static const char *content_type(const char *name) {
    static const struct {
        const char *ext, *type;
    } TYPES[] = {
        {".html", "text/html; charset=utf-8"},
        {".js", "text/javascript; charset=utf-8"},
        {".css", "text/css; charset=utf-8"},
        {".svg", "image/svg+xml"},
    };
    const char *dot = strrchr(name, '.');
    if (!dot) return NULL;
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (strcmp(dot, TYPES[i].ext) == 0) return TYPES[i].type;
    return NULL;
}

static void serve(http_resp *rs, const char *name) {
    const char *type = content_type(name);
    const mp_asset *a = type ? mp_asset_find(name) : NULL;
    if (!a) {
        resp_problem(rs, 404, "no such dashboard file", NULL);
        return;
    }
    resp_static(rs, 200, type, (const char *)a->data, a->size);
}

void h_dashboard(http_req *rq, http_resp *rs) {
    (void)rq;
    serve(rs, "index.html");
}

void h_ui_asset(http_req *rq, http_resp *rs) {
    serve(rs, rq->params[0]);
}
