/*
 * qz_select.c - which tensors a quantizing warm_load quantizes: 2-D
 * F32/F16/BF16 `.weight` tensors whose module (the name without ".weight")
 * matches neither the default ignore patterns nor the caller's. The
 * defaults are the offline quantize job's (embeddings, lm_head, norms, MoE
 * routers and gates: what vLLM, SGLang and llm-compressor leave
 * unquantized), so a warm_load with `quantize` holds the same tensors
 * quantized as a quantize job's output would.
 */
#include <fnmatch.h>
#include <string.h>

#include "loader/quantize/quantize.h"

/* Module names; a leading `*` matches anything, dots included. */
static const char *const SELECT_DEFAULT_IGNORE[] = {
    "*embed*",
    "*wte",
    "*wpe",
    "*word_embeddings*",
    "lm_head",
    "*.lm_head",
    "*norm*",
    "*ln_*",
    "*.ln_f",
    "*mlp.gate",
    "*router*",
    "*block_sparse_moe.gate",
    "*shared_expert_gate",
    NULL,
};

static bool select_matches(const char *module, const char *const *pats, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (pats[i] && fnmatch(pats[i], module, 0) == 0) return true;
    return false;
}

bool qz_select_weight(const char *name, mp_dtype dt, int ndim, const char *const *ignore,
                      size_t nignore) {
    size_t n = strlen(name);
    if (ndim != 2 || (dt != MP_DT_F32 && dt != MP_DT_F16 && dt != MP_DT_BF16) || n <= 7 ||
        strcmp(name + n - 7, ".weight") != 0 || n - 7 >= QZ_NAME_MAX)
        return false;
    char module[QZ_NAME_MAX];
    memcpy(module, name, n - 7);
    module[n - 7] = '\0';
    size_t nd = sizeof SELECT_DEFAULT_IGNORE / sizeof SELECT_DEFAULT_IGNORE[0] - 1;
    return !select_matches(module, SELECT_DEFAULT_IGNORE, nd) &&
           !select_matches(module, ignore, nignore);
}
