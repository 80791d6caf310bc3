/*
 * st_roundtrip - exposes our writers to the Python cross-checks
 * (tests/py/test_formats_st.py), which compare their output with what the
 * safetensors and numpy packages write and read.
 *
 *   st_roundtrip copy IN OUT [--no-meta | --meta K=V]...
 *       every tensor of IN (any format weights_open reads) into OUT.safetensors
 *       through st_writer, fed in odd-sized chunks; metadata from IN's
 *       __metadata__ unless --no-meta / --meta given
 *   st_roundtrip from-npy OUT [--meta K=V]... NAME[:DTYPE]=FILE.npy...
 *       a safetensors file from .npy inputs (DTYPE reinterprets the bits,
 *       e.g. w:BF16=w.npy for uint16 bit patterns)
 *   st_roundtrip npy IN OUTDIR      each tensor of IN as OUTDIR/<name>.npy
 *   st_roundtrip npcache IN DIR     npcache_write_dir
 *   st_roundtrip index IN OUT       st_index_read IN, st_index_write OUT
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/formats/formats_internal.h" /* weights_add_file */
#include "loader/formats/npy/npy.h"
#include "loader/formats/safetensors/safetensors.h"
#include "loader/formats/weights.h"

static int fail(const mp_error *e) {
    fprintf(stderr, "st_roundtrip: %s: %s\n", e->code, e->message);
    return 1;
}

/* Writes the tensors of src (its tensor k = writer input k) to out. */
static int write_st(const char *out, mp_weights *src, json_t *meta, mp_error *err) {
    st_wtensor *ws = calloc(src->ntensors ? src->ntensors : 1, sizeof *ws);
    if (!ws) return mp_err(err, "io_error", "out of memory");
    for (size_t i = 0; i < src->ntensors; i++) {
        ws[i].name = src->tensors[i].name;
        ws[i].dtype = src->tensors[i].dtype;
        ws[i].ndim = src->tensors[i].ndim;
        memcpy(ws[i].shape, src->tensors[i].shape, sizeof ws[i].shape);
    }
    st_writer *w;
    int rc = st_writer_open(out, ws, src->ntensors, meta, &w, err);
    free(ws);
    if (rc != 0) return -1;
    for (size_t k = 0; k < src->ntensors; k++) {
        const mp_tensor *t = &src->tensors[st_writer_order(w, k)];
        char *buf = malloc(t->nbytes ? t->nbytes : 1);
        if (!buf || weights_read(src, t, buf, err) != 0) {
            if (!buf) mp_err(err, "io_error", "out of memory");
            free(buf);
            st_writer_abort(w);
            return -1;
        }
        /* odd chunking on purpose: the writer must not care */
        size_t off = 0;
        while (off < t->nbytes) {
            size_t c = t->nbytes - off < 7 ? t->nbytes - off : 7 + (off % 1000);
            if (c > t->nbytes - off) c = t->nbytes - off;
            if (st_writer_write(w, buf + off, c, err) != 0) {
                free(buf);
                st_writer_abort(w);
                return -1;
            }
            off += c;
        }
        free(buf);
    }
    return st_writer_finish(w, err);
}

static int add_meta(json_t **meta, const char *kv) {
    const char *eq = strchr(kv, '=');
    if (!eq) return -1;
    if (!*meta) *meta = json_object();
    char *k = strndup(kv, (size_t)(eq - kv));
    int rc = k ? json_object_set_new(*meta, k, json_string(eq + 1)) : -1;
    free(k);
    return rc;
}

static int cmd_copy(int argc, char **argv) {
    if (argc < 4) return 2;
    json_t *meta = NULL;
    bool explicit_meta = false;
    for (int i = 4; i < argc; i++) {
        explicit_meta = true;
        if (strcmp(argv[i], "--no-meta") == 0) continue;
        if (strcmp(argv[i], "--meta") != 0 || i + 1 >= argc || add_meta(&meta, argv[++i]) != 0)
            return 2;
    }
    mp_error err = {0};
    mp_weights *w;
    if (weights_open(argv[2], &w, &err) != 0) return fail(&err);
    if (!explicit_meta && w->metadata) meta = json_incref(w->metadata);
    int rc = write_st(argv[3], w, meta, &err);
    json_decref(meta);
    weights_close(w);
    return rc ? fail(&err) : 0;
}

static int cmd_from_npy(int argc, char **argv) {
    if (argc < 3) return 2;
    json_t *meta = NULL;
    mp_weights all = {0};
    mp_error err = {0};
    int i = 3, rc = 0;
    for (; i < argc && strcmp(argv[i], "--meta") == 0; i += 2)
        if (i + 1 >= argc || add_meta(&meta, argv[i + 1]) != 0) return 2;
    /* Open each .npy and move its file and tensor into one table. */
    for (; i < argc && rc == 0; i++) {
        char *spec = strdup(argv[i]);
        char *eq = spec ? strchr(spec, '=') : NULL;
        if (!eq) {
            free(spec);
            rc = mp_err(&err, "bad_request", "want NAME[:DTYPE]=FILE, got %s", argv[i]);
            break;
        }
        *eq = 0;
        char *colon = strchr(spec, ':');
        if (colon) *colon = 0;
        mp_weights one = {0};
        rc = npy_open(eq + 1, &one, &err);
        if (rc == 0) rc = weights_add_file(&all, one.files[0], one.fds[0], &err);
        if (rc == 0) {
            one.fds[0] = -1;
            mp_tensor *t = weights_add_tensor(&all, &err);
            if (!t)
                rc = -1;
            else {
                *t = one.tensors[0];
                one.tensors[0].name = NULL;
                free(t->name);
                t->name = strdup(spec);
                t->file_index = all.nfiles - 1;
                if (colon) {
                    mp_dtype dt = mp_dtype_from_name(colon + 1);
                    if (mp_dtype_bits(dt) != mp_dtype_bits(t->dtype) || dt == MP_DT_INVALID)
                        rc = mp_err(&err, "bad_request", "cannot view %s as %s",
                                    mp_dtype_name(t->dtype), colon + 1);
                    t->dtype = dt;
                }
            }
        }
        weights_free_fields(&one);
        free(spec);
    }
    if (rc == 0) rc = write_st(argv[2], &all, meta, &err);
    weights_free_fields(&all);
    json_decref(meta);
    return rc ? fail(&err) : 0;
}

static int cmd_npy(int argc, char **argv) {
    if (argc != 4) return 2;
    mp_error err = {0};
    mp_weights *w;
    if (weights_open(argv[2], &w, &err) != 0) return fail(&err);
    int rc = 0;
    for (size_t i = 0; i < w->ntensors && rc == 0; i++) {
        const mp_tensor *t = &w->tensors[i];
        char *buf = malloc(t->nbytes ? t->nbytes : 1);
        size_t pl = strlen(argv[3]) + strlen(t->name) + 6;
        char *p = malloc(pl);
        if (!buf || !p) rc = mp_err(&err, "io_error", "out of memory");
        if (rc == 0) {
            snprintf(p, pl, "%s/%s.npy", argv[3], t->name);
            rc = weights_read(w, t, buf, &err);
        }
        if (rc == 0) rc = npy_write(p, t->dtype, t->shape, t->ndim, buf, t->nbytes, &err);
        free(buf);
        free(p);
    }
    weights_close(w);
    return rc ? fail(&err) : 0;
}

static int cmd_npcache(int argc, char **argv) {
    if (argc != 4) return 2;
    mp_error err = {0};
    mp_weights *w;
    if (weights_open(argv[2], &w, &err) != 0) return fail(&err);
    int rc = npcache_write_dir(w, argv[3], &err);
    weights_close(w);
    return rc ? fail(&err) : 0;
}

static int cmd_index(int argc, char **argv) {
    if (argc != 4) return 2;
    mp_error err = {0};
    st_index idx;
    if (st_index_read(argv[2], &idx, &err) != 0) return fail(&err);
    int rc = st_index_write(argv[3], &idx, &err);
    st_index_free(&idx);
    return rc ? fail(&err) : 0;
}

int main(int argc, char **argv) {
    int rc = 2;
    if (argc >= 2) {
        if (strcmp(argv[1], "copy") == 0)
            rc = cmd_copy(argc, argv);
        else if (strcmp(argv[1], "from-npy") == 0)
            rc = cmd_from_npy(argc, argv);
        else if (strcmp(argv[1], "npy") == 0)
            rc = cmd_npy(argc, argv);
        else if (strcmp(argv[1], "npcache") == 0)
            rc = cmd_npcache(argc, argv);
        else if (strcmp(argv[1], "index") == 0)
            rc = cmd_index(argc, argv);
    }
    if (rc == 2) fprintf(stderr, "st_roundtrip: bad usage (see the header of st_roundtrip.c)\n");
    return rc;
}
