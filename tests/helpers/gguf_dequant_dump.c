/*
 * gguf_dequant_dump - test helper for tests/py/test_formats_gguf.py.
 *
 *   gguf_dequant_dump info FILE
 *       JSON on stdout: version, alignment, data_start, metadata, types,
 *       tensors [{name, shape, dtype, ggml_type, type_name, data_offset,
 *       nbytes}], hf_config (or null) and hf_names {gguf: hf}.
 *   gguf_dequant_dump dequant FILE TENSOR [f32|f16|bf16] [UNPERMUTE_HEADS]
 *       the tensor dequantized, raw little-endian bytes on stdout; with
 *       UNPERMUTE_HEADS > 0 the rows are run through gguf_qk_unpermute.
 * Errors: "error: <code>: <message>" on stderr, exit 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/formats/gguf/gguf.h"

static int fail(const mp_error *err) {
    fprintf(stderr, "error: %s: %s\n", err->code, err->message);
    return 1;
}

static int cmd_info(mp_weights *w) {
    const gguf_info *gi = gguf_info_of(w);
    json_t *tensors = json_array(), *names = json_object();
    for (size_t i = 0; i < w->ntensors; i++) {
        const mp_tensor *t = &w->tensors[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++)
            json_array_append_new(shape, json_integer(t->shape[d]));
        int ty = gguf_tensor_type(t);
        json_array_append_new(
            tensors, json_pack("{s:s, s:o, s:s, s:i, s:s, s:I, s:I}", "name", t->name, "shape",
                               shape, "dtype", mp_dtype_name(t->dtype), "ggml_type", ty,
                               "type_name", gguf_type_name(ty), "data_offset",
                               (json_int_t)t->data_offset, "nbytes", (json_int_t)t->nbytes));
        char hf[256];
        const char *arch = json_string_value(json_object_get(w->metadata, "general.architecture"));
        if (gguf_name_to_hf(arch, t->name, hf, sizeof hf) == 0)
            json_object_set_new(names, t->name, json_string(hf));
    }
    mp_error err = {0};
    json_t *cfg = gguf_hf_config_weights(w, &err);
    json_t *doc = json_pack("{s:i, s:i, s:I, s:O, s:O, s:o, s:o, s:o}", "version", gi->version,
                            "alignment", gi->alignment, "data_start", (json_int_t)gi->data_start,
                            "metadata", w->metadata, "types", gi->types, "tensors", tensors,
                            "hf_config", cfg ? cfg : json_null(), "hf_names", names);
    if (!doc) return 1;
    json_dumpf(doc, stdout, JSON_COMPACT | JSON_SORT_KEYS);
    putchar('\n');
    json_decref(doc);
    return 0;
}

static int cmd_dequant(mp_weights *w, const char *name, const char *out_s, long heads) {
    mp_error err = {0};
    mp_dtype out = MP_DT_F32;
    if (out_s && strcmp(out_s, "f16") == 0) out = MP_DT_F16;
    if (out_s && strcmp(out_s, "bf16") == 0) out = MP_DT_BF16;
    const mp_tensor *t = NULL;
    for (size_t i = 0; i < w->ntensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0) t = &w->tensors[i];
    if (!t) {
        fprintf(stderr, "error: not_found: no tensor %s\n", name);
        return 1;
    }
    uint64_t numel;
    if (!mp_shape_numel(t->shape, t->ndim, &numel)) return 1;
    size_t es = out == MP_DT_F32 ? 4 : 2;
    void *buf = malloc(numel ? (size_t)numel * es : 1);
    if (!buf) return 1;
    int rc = gguf_tensor_dequant(w, t, out, buf, &err);
    if (rc == 0 && heads > 0) {
        int64_t rows = t->ndim ? t->shape[0] : 1;
        rc = gguf_qk_unpermute(buf, rows, (size_t)(numel / (uint64_t)rows) * es, heads, &err);
    }
    if (rc == 0 && fwrite(buf, es, (size_t)numel, stdout) != (size_t)numel) rc = -1;
    free(buf);
    return rc == 0 ? 0 : fail(&err);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s info FILE | dequant FILE TENSOR [f32|f16|bf16] [HEADS]\n",
                argv[0]);
        return 2;
    }
    mp_weights w = {0};
    mp_error err = {0};
    if (gguf_open(argv[2], &w, &err) != 0) {
        weights_free_fields(&w);
        return fail(&err);
    }
    int rc;
    if (strcmp(argv[1], "info") == 0)
        rc = cmd_info(&w);
    else if (strcmp(argv[1], "dequant") == 0 && argc >= 4)
        rc = cmd_dequant(&w, argv[3], argc > 4 ? argv[4] : NULL, argc > 5 ? atol(argv[5]) : 0);
    else
        rc = 2;
    weights_free_fields(&w);
    return rc;
}
