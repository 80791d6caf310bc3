/*
 * warm_load_gpu_bench.c - the warm_load pipeline onto one CUDA device vs a
 * bare pinned host-to-device copy of the same number of bytes, in the same
 * process (built against the CUDA build's libmodelprep.a by
 * bench/warm_load_gpu.sh; it speaks only gpu/gpu.h, never CUDA itself):
 *   warm_load_gpu_bench MODEL_DIR REPS
 * Prints "figure:" lines; exits 1 when the load fails or the bytes on the
 * device differ from the file, 3 when there is no CUDA device.
 */
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/warm/warm.h"
#include "util/timeutil.h"

#define PEER_BUF (256u << 20)

/* Pinned staging buffer -> device arena, PEER_BUF at a time, one stream:
 * the ceiling our pipeline is measured against. */
static double pinned_copy(gpu_set *g, uint64_t bytes, mp_error *err) {
    void *buf = NULL;
    gpu_arena *a = NULL;
    if (gpu_staging_alloc(g, PEER_BUF, &buf, err) != 0) return -1;
    memset(buf, 0x5a, PEER_BUF);
    double dt = -1;
    if (gpu_arena_alloc(g, 0, bytes, &a, err) == 0) {
        /* one warm-up copy so context and stream creation are not timed */
        uint64_t w = bytes < PEER_BUF ? bytes : PEER_BUF;
        if (gpu_copy_h2d(a, 0, buf, w, err) == 0 && gpu_device_sync(g, 0, err) == 0) {
            double t0 = time_mono();
            int rc = 0;
            for (uint64_t off = 0; off < bytes && rc == 0; off += PEER_BUF) {
                uint64_t n = bytes - off < PEER_BUF ? bytes - off : PEER_BUF;
                rc = gpu_copy_h2d(a, off, buf, n, err);
            }
            if (rc == 0 && gpu_device_sync(g, 0, err) == 0) dt = time_mono() - t0;
        }
        gpu_arena_free(a);
    }
    gpu_staging_free(g, buf);
    return dt;
}

/* sha256 of n bytes read back from the device vs from the file. */
static int check_tensor(const load_source *src, const load_item *it, gpu_arena *a, mp_error *err) {
    uint64_t n = it->bytes < (64u << 20) ? it->bytes : (64u << 20);
    unsigned char *x = malloc(n ? n : 1), *y = malloc(n ? n : 1);
    int rc = -1;
    if (x && y && gpu_read(a, it->offset, x, n, err) == 0 &&
        weights_pread(src->files[it->file].w->fds[it->src->file_index], y, n, it->src->data_offset,
                      err) == 0)
        rc = memcmp(x, y, n) == 0 ? 0 : mp_err(err, "mismatch", "%s differs", it->src->name);
    free(x);
    free(y);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: warm_load_gpu_bench MODEL_DIR REPS\n");
        return 2;
    }
    int reps = atoi(argv[2]);
    mp_error err = {0};
    gpu_set *g = NULL;
    if (gpu_set_open("auto", 0, &g, &err) != 0 || gpu_set_kind(g) != GPU_KIND_CUDA) {
        fprintf(stderr, "no CUDA device: %s\n", err.message);
        if (g) gpu_set_close(g);
        return 3;
    }
    gpu_device_info info;
    gpu_device_info_get(g, 0, &info, &err);
    printf("figure: device 0 %s, %llu bytes free\n", info.name,
           (unsigned long long)info.free_bytes);
    double best_load = 1e9, best_pipe = 1e9, best_peer = 1e9;
    uint64_t bytes = 0;
    load_stats st = {0};
    int fails = 0;
    for (int r = 0; r < reps; r++) {
        load_source src;
        load_plan plan;
        int dev = 0;
        load_plan_opts po = {.tp_size = 1, .devices = &dev, .dtype = MP_DT_INVALID};
        load_run_opts ro = {.host_direct = true};
        const char *rd = getenv("READERS");
        if (rd) ro.readers = atoi(rd);
        gpu_arena *arenas[GPU_MAX_DEVICES];
        double t0 = time_mono();
        if (load_source_open(argv[1], LOAD_FMT_AUTO, 1, &src, &err) != 0) goto bad;
        if (load_plan_build(&src, &po, &plan, &err) != 0) {
            load_source_free(&src);
            goto bad;
        }
        if (load_run(g, &src, &plan, &ro, arenas, &st, &err) != 0) {
            load_plan_free(&plan);
            load_source_free(&src);
            goto bad;
        }
        double dt = time_mono() - t0;
        bytes = plan.total_bytes;
        if (dt < best_load) best_load = dt;
        if (st.pipeline_s < best_pipe) best_pipe = st.pipeline_s;
        if (r == 0) /* first, middle and last tensors: the bytes arrived */
            for (size_t k = 0; k < plan.nitems; k += plan.nitems / 3 ? plan.nitems / 3 : 1)
                if (check_tensor(&src, &plan.items[k], arenas[0], &err) != 0) fails++;
        for (int d = 0; d < GPU_MAX_DEVICES; d++)
            gpu_arena_free(arenas[d]);
        load_plan_free(&plan);
        load_source_free(&src);
        double p = pinned_copy(g, bytes, &err);
        if (p < 0) goto bad;
        if (p < best_peer) best_peer = p;
        continue;
    bad:
        fprintf(stderr, "failed: %s: %s\n", err.code, err.message);
        gpu_set_close(g);
        return 1;
    }
    double gb = 1e9;
    printf("figure: bytes %.2f GB, readers %d, %d slots of %llu bytes\n", bytes / gb, st.readers,
           st.slots, (unsigned long long)st.slot_bytes);
    printf("figure: pinned cudaMemcpy (peer) %.3f s %.2f GB/s\n", best_peer,
           bytes / gb / best_peer);
    printf("figure: warm_load total          %.3f s %.2f GB/s\n", best_load,
           bytes / gb / best_load);
    printf("figure: warm_load pipeline       %.3f s %.2f GB/s (alloc %.3f s)\n", best_pipe,
           bytes / gb / best_pipe, st.alloc_s);
    printf("figure: ratio warm_load/pinned = %.2f (goal >= 0.85), pipeline only %.2f\n",
           best_peer / best_load, best_peer / best_pipe);
    printf("figure: content check %s\n", fails ? "FAILED" : "ok");
    gpu_set_close(g);
    return fails ? 1 : 0;
}
