/* residents.c - see residents.h. One mutex guards the list; per-resident
 * reference counts let a digest or an export run without holding it. */
#include "loader/residents/residents.h"

#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "util/fsutil.h"
#include "util/timeutil.h"

#define RES_DIGEST_CHUNK (8u << 20)

typedef struct resident {
    char id[32];
    char created_at[40];
    res_spec spec;
    atomic_int refs;
    atomic_bool borrowed_out; /* a borrowed export handle was handed out */
    struct resident *next;
} resident;

struct resident_set {
    pthread_mutex_t mu;
    resident *head;
    res_records rec; /* all NULL when not recorded */
    gpu_set *gpus;
    res_change_fn on_change;
    void *on_change_arg;
};

static void spec_free(res_spec *sp) {
    for (int i = 0; i < GPU_MAX_DEVICES; i++)
        gpu_arena_free(sp->arenas[i]);
    for (size_t i = 0; i < sp->ntensors; i++)
        free(sp->tensors[i].name);
    free(sp->tensors);
    free(sp->model);
    free(sp->revision);
    json_decref(sp->load);
    memset(sp, 0, sizeof *sp);
}

static void res_unref(resident *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    spec_free(&r->spec);
    free(r);
}

resident_set *res_set_new(const res_records *records, gpu_set *gpus, res_change_fn fn, void *arg) {
    resident_set *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    pthread_mutex_init(&s->mu, NULL);
    if (records) s->rec = *records;
    s->gpus = gpus;
    s->on_change = fn;
    s->on_change_arg = arg;
    return s;
}

void res_set_free(resident_set *s) {
    if (!s) return;
    resident *r = s->head;
    while (r) {
        resident *next = r->next;
        if (s->rec.set_state) s->rec.set_state(s->rec.ctx, r->id, "gone");
        res_unref(r);
        r = next;
    }
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static json_t *device_bytes(const res_spec *sp) {
    json_t *out = json_array();
    for (int i = 0; i < GPU_MAX_DEVICES; i++)
        if (sp->arenas[i])
            json_array_append_new(out, json_pack("{s:i,s:I}", "index", i, "bytes",
                                                 (json_int_t)gpu_arena_size(sp->arenas[i])));
    return out;
}

static uint64_t total_bytes(const res_spec *sp) {
    uint64_t t = 0;
    for (size_t i = 0; i < sp->ntensors; i++)
        t += sp->tensors[i].bytes;
    return t;
}

static const char *dtype_label(const res_tensor *t) {
    return t->dtype == MP_DT_GGML ? "GGML" : mp_dtype_name(t->dtype);
}

static json_t *summary(const resident *r) {
    json_t *doc =
        json_pack("{s:s,s:s,s:s,s:s,s:I,s:I,s:o,s:s}", "id", r->id, "model", r->spec.model,
                  "revision", r->spec.revision, "state", "resident", "bytes",
                  (json_int_t)total_bytes(&r->spec), "tensors", (json_int_t)r->spec.ntensors,
                  "devices", device_bytes(&r->spec), "created_at", r->created_at);
    if (doc && r->spec.load) json_object_set(doc, "load", r->spec.load);
    return doc;
}

static json_t *tensor_table(const resident *r) {
    json_t *arr = json_array();
    for (size_t i = 0; i < r->spec.ntensors; i++) {
        const res_tensor *t = &r->spec.tensors[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++)
            json_array_append_new(shape, json_integer(t->shape[d]));
        json_t *row =
            json_pack("{s:s,s:s,s:o,s:i,s:i,s:I,s:I}", "name", t->name, "dtype", dtype_label(t),
                      "shape", shape, "device", t->device, "rank", t->rank, "offset",
                      (json_int_t)t->offset, "bytes", (json_int_t)t->bytes);
        if (row && t->dtype == MP_DT_GGML)
            json_object_set_new(row, "ggml_type", json_integer(t->ggml_type));
        json_array_append_new(arr, row);
    }
    return arr;
}

static void notify(resident_set *s, const char *event, const char *id, const char *model) {
    if (!s->on_change) return;
    json_t *ev = json_pack("{s:s,s:s,s:s}", "event", event, "id", id, "model", model ? model : "");
    char *text = ev ? json_dumps(ev, JSON_COMPACT) : NULL;
    json_decref(ev);
    if (text) s->on_change(s->on_change_arg, text);
    free(text);
}

int res_add(resident_set *s, res_spec *spec, char *id_out, mp_error *err) {
    resident *r = calloc(1, sizeof *r);
    unsigned char rnd[8];
    if (!r || getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
        free(r);
        spec_free(spec);
        return mp_err(err, "no_memory", "cannot create a resident");
    }
    char hex[17];
    fs_hex(rnd, sizeof rnd, hex);
    snprintf(r->id, sizeof r->id, "r_%s", hex);
    time_rfc3339_now(r->created_at, sizeof r->created_at);
    r->spec = *spec;
    memset(spec, 0, sizeof *spec);
    atomic_init(&r->refs, 1);
    atomic_init(&r->borrowed_out, false);
    json_t *doc = summary(r);
    if (s->rec.put && doc)
        s->rec.put(s->rec.ctx, r->id, r->spec.model, r->spec.revision, "resident", doc);
    json_decref(doc);
    pthread_mutex_lock(&s->mu);
    r->next = s->head;
    s->head = r;
    pthread_mutex_unlock(&s->mu);
    snprintf(id_out, 32, "%s", r->id);
    notify(s, "added", r->id, r->spec.model);
    return 0;
}

/* Finds a live resident and takes a reference; NULL when unknown. */
static resident *acquire(resident_set *s, const char *id) {
    pthread_mutex_lock(&s->mu);
    resident *r = s->head;
    while (r && strcmp(r->id, id) != 0)
        r = r->next;
    if (r) atomic_fetch_add(&r->refs, 1);
    pthread_mutex_unlock(&s->mu);
    return r;
}

int res_remove(resident_set *s, const char *id, bool force) {
    pthread_mutex_lock(&s->mu);
    resident **pp = &s->head;
    while (*pp && strcmp((*pp)->id, id) != 0)
        pp = &(*pp)->next;
    resident *r = *pp;
    /* Checked under the list lock, which res_export holds while it marks the
     * resident, so that an export cannot slip in between. */
    if (r && !force && atomic_load(&r->borrowed_out)) {
        pthread_mutex_unlock(&s->mu);
        return RES_EXPORTED;
    }
    if (r) *pp = r->next;
    pthread_mutex_unlock(&s->mu);
    if (!r) return -1;
    char model[512];
    snprintf(model, sizeof model, "%s", r->spec.model);
    if (s->rec.set_state) s->rec.set_state(s->rec.ctx, id, "unloaded");
    res_unref(r);
    notify(s, "removed", id, model);
    return 0;
}

json_t *res_list(resident_set *s) {
    /* The records have every resident ever recorded, with its state; live ones
     * are refreshed from memory. */
    json_t *all = s->rec.list ? s->rec.list(s->rec.ctx) : NULL;
    if (!all) all = json_array();
    size_t i;
    json_t *it;
    json_array_foreach(all, i, it) {
        const char *id = json_string_value(json_object_get(it, "id"));
        resident *r = id ? acquire(s, id) : NULL;
        if (r) {
            json_t *live = summary(r);
            if (live) json_array_set_new(all, i, live);
            res_unref(r);
        }
    }
    return all;
}

json_t *res_get(resident_set *s, const char *id) {
    resident *r = acquire(s, id);
    if (!r) return s->rec.get ? s->rec.get(s->rec.ctx, id) : NULL;
    json_t *doc = summary(r);
    if (doc) json_object_set_new(doc, "tensor_table", tensor_table(r));
    res_unref(r);
    return doc;
}

int res_digest(resident_set *s, const char *id, json_t **out, mp_error *err) {
    resident *r = acquire(s, id);
    if (!r) return mp_err(err, "not_found", "no live resident %s", id);
    unsigned char *buf = malloc(RES_DIGEST_CHUNK);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    json_t *list = json_array();
    int rc = 0;
    if (!buf || !ctx || !list) {
        rc = mp_err(err, "no_memory", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < r->spec.ntensors && rc == 0; i++) {
        const res_tensor *t = &r->spec.tensors[i];
        gpu_arena *a = r->spec.arenas[t->device];
        if (!a) {
            rc = mp_err(err, "internal", "tensor %s has no arena", t->name);
            break;
        }
        EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
        for (uint64_t off = 0; off < t->bytes;) {
            size_t n =
                t->bytes - off > RES_DIGEST_CHUNK ? RES_DIGEST_CHUNK : (size_t)(t->bytes - off);
            if (gpu_read(a, t->offset + off, buf, n, err) != 0) {
                rc = -1;
                break;
            }
            EVP_DigestUpdate(ctx, buf, n);
            off += n;
        }
        if (rc != 0) break;
        unsigned char md[32];
        unsigned int mdlen = 0;
        char hex[65];
        EVP_DigestFinal_ex(ctx, md, &mdlen);
        fs_hex(md, 32, hex);
        json_array_append_new(list, json_pack("{s:s,s:i,s:i,s:s}", "name", t->name, "device",
                                              t->device, "rank", t->rank, "sha256", hex));
    }
out:
    EVP_MD_CTX_free(ctx);
    free(buf);
    res_unref(r);
    if (rc != 0) {
        json_decref(list);
        return -1;
    }
    *out = json_pack("{s:s,s:o}", "id", id, "tensors", list);
    return 0;
}

bool res_model_resident(resident_set *s, const char *model) {
    pthread_mutex_lock(&s->mu);
    bool found = false;
    for (resident *r = s->head; r; r = r->next)
        if (strcmp(r->spec.model, model) == 0) found = true;
    pthread_mutex_unlock(&s->mu);
    return found;
}

void res_each_bytes(resident_set *s, void (*fn)(void *, const char *, uint64_t), void *arg) {
    pthread_mutex_lock(&s->mu);
    for (resident *r = s->head; r; r = r->next)
        fn(arg, r->spec.model, total_bytes(&r->spec));
    pthread_mutex_unlock(&s->mu);
}

int res_export(resident_set *s, const char *id, json_t **desc, int *fds, int *nfds, mp_error *err) {
    resident *r = acquire(s, id);
    *nfds = 0;
    if (!r) return mp_err(err, "not_found", "no live resident %s", id);
    json_t *arenas = json_array();
    int rc = 0;
    bool borrowed = false;
    for (int i = 0; i < GPU_MAX_DEVICES && rc == 0; i++) {
        gpu_arena *a = r->spec.arenas[i];
        if (!a) continue;
        gpu_export ex;
        if (gpu_arena_export(a, &ex, err) != 0) {
            rc = -1;
            break;
        }
        json_t *row = json_pack("{s:i,s:I,s:s}", "device", i, "size", (json_int_t)ex.size, "kind",
                                gpu_kind_name(ex.kind));
        if (ex.kind == GPU_KIND_CUDA) {
            json_object_set_new(row, "ipc_handle", json_string(ex.ipc_handle));
        } else {
            int fd = dup(ex.fd);
            if (fd < 0) {
                rc = mp_err(err, "io_error", "dup failed");
                json_decref(row);
                break;
            }
            json_object_set_new(row, "fd_index", json_integer(*nfds));
            fds[(*nfds)++] = fd;
        }
        json_array_append_new(arenas, row);
        if (ex.borrowed) borrowed = true;
    }
    if (rc == 0 && borrowed) {
        /* From now on another process may map the memory: unloading needs
         * force. Under the list lock (see res_remove); a resident already
         * removed meanwhile is not handed out. */
        pthread_mutex_lock(&s->mu);
        resident *it = s->head;
        while (it && it != r)
            it = it->next;
        if (it)
            atomic_store(&r->borrowed_out, true);
        else
            rc = mp_err(err, "not_found", "resident %s was unloaded", id);
        pthread_mutex_unlock(&s->mu);
    }
    if (rc == 0) {
        *desc = summary(r);
        json_object_set_new(*desc, "arenas", arenas);
        json_object_set_new(*desc, "tensor_table", tensor_table(r));
    } else {
        json_decref(arenas);
        for (int i = 0; i < *nfds; i++)
            close(fds[i]);
        *nfds = 0;
    }
    res_unref(r);
    return rc;
}
