/*
 * qz_select.c - what a quantizer takes, shared by the offline job (qz_run.c)
 * and warm_load's quantizing load (loader/warm/load_plan.c), so that both
 * quantize the same tensors and refuse the same sources:
 *
 *   qz_select         a 2-D F32/F16/BF16 `<module>.weight` whose module
 *                     matches neither the caller's ignore patterns nor
 *                     (unless turned off) the defaults of qz_names.c
 *   qz_check_source   a source that is quantized already is refused
 */
#include <stdio.h>
#include <string.h>

#include "loader/inspect/inspect.h"
#include "loader/quantize/quantize.h"

qz_selection qz_select(const char *name, mp_dtype dt, int ndim, const char *const *ignore,
                       size_t nignore, bool defaults, int *user_match) {
    if (user_match) *user_match = -1;
    size_t n = strlen(name);
    if (!qz_candidate(name, dt, ndim) || n - 7 >= QZ_NAME_MAX) return QZ_SEL_NOT_CANDIDATE;
    char module[QZ_NAME_MAX];
    memcpy(module, name, n - 7);
    module[n - 7] = '\0';
    int u = qz_ignore_match(module, ignore, nignore);
    if (user_match) *user_match = u;
    if (u >= 0) return QZ_SEL_IGNORED;
    if (defaults) {
        const char *const *d = qz_default_ignore();
        size_t nd = 0;
        while (d[nd])
            nd++;
        if (qz_ignore_match(module, d, nd) >= 0) return QZ_SEL_IGNORED;
    }
    return QZ_SEL_QUANTIZE;
}

static bool quantized_dtype(mp_dtype d) {
    return d == MP_DT_F8_E4M3 || d == MP_DT_F8_E5M2 || d == MP_DT_I8 || d == MP_DT_F4 ||
           d == MP_DT_F8_E4M3FNUZ || d == MP_DT_F8_E5M2FNUZ;
}

/* Quantizing twice multiplies the error, and the loaders would not know
 * the result. */
int qz_check_source(const json_t *cfg, const mp_tensor *ts, size_t n, const char *instead,
                    mp_error *err) {
    const json_t *tc = cfg ? json_object_get(cfg, "text_config") : NULL;
    const char *keys[] = {"quantization_config", "compression_config"};
    for (int i = 0; cfg && i < 2; i++) {
        const json_t *q = json_object_get(cfg, keys[i]);
        if (!q && tc) q = json_object_get(tc, keys[i]);
        if (q) {
            const char *m = json_string_value(json_object_get(q, "quant_method"));
            return mp_err(err, "already_quantized",
                          "the model is already quantized (config.json %s, quant_method %s); %s",
                          keys[i], m ? m : "?", instead);
        }
    }
    json_t *q = insp_quant_from_tensors(ts, n);
    if (q) {
        const char *m = json_string_value(json_object_get(q, "method"));
        mp_err(err, "already_quantized",
               "the model's tensors are already quantized (%s, recognized from their names and "
               "dtypes); %s",
               m ? m : "?", instead);
        json_decref(q); /* m points into q */
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        if (quantized_dtype(ts[i].dtype))
            return mp_err(err, "already_quantized",
                          "tensor %s is %s: the model is already quantized; %s", ts[i].name,
                          mp_dtype_name(ts[i].dtype), instead);
    return 0;
}
