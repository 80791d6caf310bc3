/*
 * qz_kernel.c - runs one quantize kernel (loader/quantize) over a raw tensor
 * so that tests/py/test_quantize.py can compare its parts, byte for byte,
 * with torch's and bitsandbytes' own results on the same input, without the
 * job's file plumbing in between:
 *   qz_kernel METHOD DTYPE ROWS COLS IN OUT_PREFIX [nodq] [BN BK]
 * DTYPE is F32, F16 or BF16; IN holds ROWS*COLS row-major elements. Writes
 * OUT_PREFIX.<i> for each part and prints the plan as JSON lines
 * {"name","dtype","shape","nbytes"}; on a refusal prints "ERROR code: msg"
 * and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/quantize/quantize.h"

static int die(const char *what) {
    fprintf(stderr, "qz_kernel: %s\n", what);
    return 2;
}

static int parse_dtype(const char *s, mp_dtype *dt) {
    *dt = !strcmp(s, "F32")    ? MP_DT_F32
          : !strcmp(s, "F16")  ? MP_DT_F16
          : !strcmp(s, "BF16") ? MP_DT_BF16
                               : MP_DT_INVALID;
    return *dt == MP_DT_INVALID ? -1 : 0;
}

static void *read_all(const char *path, size_t want) {
    FILE *f = fopen(path, "rb");
    void *buf = f ? malloc(want ? want : 1) : NULL;
    if (buf && fread(buf, 1, want, f) != want) {
        free(buf);
        buf = NULL;
    }
    if (f) fclose(f);
    return buf;
}

static int write_parts(const qz_plan *plan, void *const out[], const char *prefix) {
    char path[4096];
    for (int i = 0; i < plan->n; i++) {
        snprintf(path, sizeof path, "%s.%d", prefix, i);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(out[i], 1, (size_t)plan->parts[i].nbytes, f) != plan->parts[i].nbytes) {
            if (f) fclose(f);
            return -1;
        }
        if (fclose(f) != 0) return -1;
        const qz_part *pt = &plan->parts[i];
        printf("{\"name\": \"%s\", \"dtype\": \"%s\", \"shape\": [", pt->name,
               mp_dtype_name(pt->dtype));
        for (int d = 0; d < pt->ndim; d++)
            printf(d ? ", %llu" : "%llu", (unsigned long long)pt->shape[d]);
        printf("], \"nbytes\": %llu}\n", (unsigned long long)pt->nbytes);
    }
    return 0;
}

int main(int argc, char **argv) {
    qz_method m;
    mp_dtype dt;
    if (argc < 7 || qz_method_parse(argv[1], &m) != 0 || parse_dtype(argv[2], &dt) != 0)
        return die("usage: qz_kernel METHOD DTYPE ROWS COLS IN OUT_PREFIX [nodq] [BN BK]");
    qz_params p;
    qz_params_default(&p, m);
    int a = 7;
    if (a < argc && !strcmp(argv[a], "nodq")) {
        p.double_quant = false;
        a++;
    }
    if (a + 1 < argc) {
        p.block_n = (uint32_t)strtoul(argv[a], NULL, 10);
        p.block_k = (uint32_t)strtoul(argv[a + 1], NULL, 10);
    }
    uint64_t shape[2] = {strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10)};
    qz_plan plan;
    mp_error err;
    if (qz_plan_tensor(&p, "m.weight", dt, shape, &plan, &err) != 0) {
        printf("ERROR %s: %s\n", err.code, err.message);
        return 1;
    }
    size_t esize = dt == MP_DT_F32 ? 4 : 2;
    void *src = read_all(argv[5], (size_t)(shape[0] * shape[1]) * esize);
    if (!src) return die("cannot read the input");
    void *out[QZ_MAX_PARTS] = {0};
    int rc = 0;
    for (int i = 0; i < plan.n && rc == 0; i++)
        rc = (out[i] = calloc(1, (size_t)plan.parts[i].nbytes)) ? 0 : -1;
    if (rc == 0 && qz_quantize(&p, &plan, dt, src, out, &err) != 0) {
        printf("ERROR %s: %s\n", err.code, err.message);
        rc = 1;
    } else if (rc == 0 && write_parts(&plan, out, argv[6]) != 0) {
        rc = die("cannot write the parts");
    }
    for (int i = 0; i < plan.n; i++)
        free(out[i]);
    free(src);
    return rc;
}
