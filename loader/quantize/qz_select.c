/*
 * qz_select.c - which tensors a quantizing warm_load quantizes: 2-D
 * F32/F16/BF16 `.weight` tensors whose module (the name without ".weight")
 * matches neither the default ignore patterns nor the caller's. The
 * defaults are the offline quantize job's (embeddings, lm_head, norms, MoE
 * routers and gates: what vLLM, SGLang and llm-compressor leave
 * unquantized), so a warm_load with `quantize` holds the same tensors
 * quantized as a quantize job's output would.
 */
#include <string.h>

#include "loader/quantize/quantize.h"

bool qz_select_weight(const char *name, mp_dtype dt, int ndim, const char *const *ignore,
                      size_t nignore) {
    size_t n = strlen(name);
    if (!qz_candidate(name, dt, ndim) || n - 7 >= QZ_NAME_MAX) return false;
    char module[QZ_NAME_MAX];
    memcpy(module, name, n - 7);
    module[n - 7] = '\0';
    const char *const *defaults = qz_default_ignore();
    size_t nd = 0;
    while (defaults[nd])
        nd++;
    return qz_ignore_match(module, defaults, nd) < 0 &&
           qz_ignore_match(module, ignore, nignore) < 0;
}
