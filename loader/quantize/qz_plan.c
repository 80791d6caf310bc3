/*
 * qz_plan.c - the public face of the kernels: method names and defaults, the
 * output parts of one source tensor (names, dtypes, shapes, sizes: all known
 * before any data is read), and qz_quantize's dispatch to the kernel files.
 */
#include <stdio.h>
#include <string.h>

#include "loader/quantize/qz_internal.h"

static const char *const METHOD_NAMES[QZ_METHOD_COUNT] = {"fp8", "fp8-channel", "fp8-block", "nf4",
                                                          "int8"};

int qz_method_parse(const char *s, qz_method *out) {
    for (int m = 0; s && m < QZ_METHOD_COUNT; m++) {
        if (strcmp(s, METHOD_NAMES[m]) == 0) {
            *out = (qz_method)m;
            return 0;
        }
    }
    return -1;
}

const char *qz_method_name(qz_method m) {
    return m >= 0 && m < QZ_METHOD_COUNT ? METHOD_NAMES[m] : "?";
}

void qz_params_default(qz_params *p, qz_method m) {
    memset(p, 0, sizeof *p);
    p->method = m;
    p->block_n = 128;
    p->block_k = 128;
    p->double_quant = true;
    p->threads = 1;
    p->torch_threads = 1;
}

int qz_params_check(const qz_params *p, mp_error *err) {
    if (p->method < 0 || p->method >= QZ_METHOD_COUNT)
        return mp_err_field(err, "method", "bad_params", "unknown quantization method");
    if (p->method == QZ_FP8_BLOCK &&
        (p->block_n == 0 || p->block_k == 0 || p->block_n > 65536 || p->block_k > 65536))
        return mp_err_field(err, "block_size", "bad_params",
                            "block_size must be two integers in 1..65536, got [%u, %u]", p->block_n,
                            p->block_k);
    return 0;
}

static int part_set(qz_plan *plan, const char *base, const char *suffix, mp_dtype dt, int ndim,
                    uint64_t d0, uint64_t d1) {
    qz_part *pt = &plan->parts[plan->n++];
    int w = snprintf(pt->name, sizeof pt->name, "%s%s", base, suffix);
    if (w < 0 || (size_t)w >= sizeof pt->name) return -1;
    pt->dtype = dt;
    pt->ndim = ndim;
    pt->shape[0] = ndim > 0 ? d0 : 0;
    pt->shape[1] = ndim > 1 ? d1 : 0;
    uint64_t numel = ndim == 0 ? 1 : (ndim == 1 ? d0 : d0 * d1);
    pt->nbytes = numel * (dt == MP_DT_F32 ? 4 : 1);
    return 0;
}

static uint64_t ceil_div(uint64_t a, uint64_t b) {
    return (a + b - 1) / b;
}

/* The parts of each method, named as the loaders expect them. `module` is
 * the name without its ".weight". */
static int plan_parts(const qz_params *p, const char *module, mp_dtype dt, qz_plan *plan) {
    uint64_t n = plan->rows, k = plan->cols, numel = n * k;
    int bad = 0;
    switch (p->method) {
    case QZ_FP8:
    case QZ_FP8_CHANNEL:
    case QZ_FP8_BLOCK:
        bad |= part_set(plan, module, ".weight", MP_DT_F8_E4M3, 2, n, k);
        if (p->method == QZ_FP8)
            bad |= part_set(plan, module, ".weight_scale", MP_DT_F32, 0, 0, 0);
        else if (p->method == QZ_FP8_CHANNEL)
            bad |= part_set(plan, module, ".weight_scale", MP_DT_F32, 2, n, 1);
        else
            bad |= part_set(plan, module, ".weight_scale_inv", MP_DT_F32, 2,
                            ceil_div(n, p->block_n), ceil_div(k, p->block_k));
        break;
    case QZ_NF4: {
        uint64_t blocks = ceil_div(numel, QZ_NF4_BLOCKSIZE);
        bad |= part_set(plan, module, ".weight", MP_DT_U8, 2, (numel + 1) / 2, 1);
        bad |= part_set(plan, module, ".weight.absmax", p->double_quant ? MP_DT_U8 : MP_DT_F32, 1,
                        blocks, 0);
        bad |= part_set(plan, module, ".weight.quant_map", MP_DT_F32, 1, 16, 0);
        if (p->double_quant) {
            bad |= part_set(plan, module, ".weight.nested_absmax", MP_DT_F32, 1,
                            ceil_div(blocks, QZ_NESTED_BLOCKSIZE), 0);
            bad |= part_set(plan, module, ".weight.nested_quant_map", MP_DT_F32, 1, 256, 0);
        }
        uint64_t shape[2] = {n, k};
        long len = qz_nf4_state_json(p, dt, shape, 0.0f, NULL, 0);
        bad |= len < 0;
        bad |= part_set(plan, module, ".weight.quant_state.bitsandbytes__nf4", MP_DT_U8, 1,
                        (uint64_t)(len < 0 ? 0 : len), 0);
        break;
    }
    case QZ_INT8:
        bad |= part_set(plan, module, ".weight", MP_DT_I8, 2, n, k);
        bad |= part_set(plan, module, ".SCB", MP_DT_F32, 1, n, 0);
        bad |= part_set(plan, module, ".weight_format", MP_DT_U8, 0, 0, 0);
        break;
    default:
        return -1;
    }
    return bad ? -1 : 0;
}

int qz_plan_tensor(const qz_params *p, const char *name, mp_dtype src_dtype,
                   const uint64_t shape[2], qz_plan *plan, mp_error *err) {
    memset(plan, 0, sizeof *plan);
    if (qz_params_check(p, err) != 0) return -1;
    if (src_dtype != MP_DT_F32 && src_dtype != MP_DT_F16 && src_dtype != MP_DT_BF16)
        return mp_err(err, "bad_params", "%s: only F32, F16 and BF16 weights can be quantized",
                      name);
    /* Bounded so that n * k and every buffer size fit comfortably. */
    if (shape[0] == 0 || shape[1] == 0 || shape[0] > (1ull << 31) || shape[1] > (1ull << 31) ||
        shape[0] * shape[1] > (1ull << 40))
        return mp_err(err, "bad_params", "%s: shape [%llu, %llu] cannot be quantized", name,
                      (unsigned long long)shape[0], (unsigned long long)shape[1]);
    char module[QZ_NAME_MAX];
    size_t len = strlen(name);
    if (len >= sizeof module)
        return mp_err(err, "bad_params", "tensor name too long (%zu bytes)", len);
    memcpy(module, name, len + 1);
    if (len > 7 && strcmp(module + len - 7, ".weight") == 0) module[len - 7] = '\0';
    plan->rows = shape[0];
    plan->cols = shape[1];
    if (plan_parts(p, module, src_dtype, plan) != 0)
        return mp_err(err, "bad_params", "%s: an output name would be too long", name);
    return 0;
}

int qz_quantize(const qz_params *p, const qz_plan *plan, mp_dtype src_dtype, const void *src,
                void *const out[], mp_error *err) {
    switch (p->method) {
    case QZ_FP8:
    case QZ_FP8_CHANNEL:
    case QZ_FP8_BLOCK:
        return qz_fp8_run(p, plan, src_dtype, src, out, err);
    case QZ_NF4:
        return qz_nf4_run(p, plan, src_dtype, src, out, err);
    case QZ_INT8:
        return qz_int8_run(plan, src_dtype, src, out, err);
    default:
        return mp_err(err, "bad_params", "unknown quantization method");
    }
}
