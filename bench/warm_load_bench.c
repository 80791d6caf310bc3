/*
 * warm_load_bench.c - the warm_load pipeline (loader/warm/warm.h) onto one host
 * device vs a plain read() of the same file into a buffer, same process,
 * page cache warm, best of REPS. Prints "key value" lines for
 * bench/warm_load.sh:
 *   warm_load_bench MODEL_DIR REPS FILE...  (the model's weight files)
 * The plain read is timed twice: into a pre-faulted buffer (the strict
 * peer) and into freshly malloc'd memory (what our arena also is).
 * Our figure includes everything a warm_load does after the job starts:
 * opening the headers, the plan, allocating the arena, reading, and freeing
 * it again, into an exportable memfd arena as the server makes.
 * load_private_s is the same into a private anonymous THP arena
 * (gpu_set_host_exportable(set, false)).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/warm/warm.h"
#include "util/timeutil.h"

static int nfiles;
static char **files;

/* Every file, one after another, into buf (size: their total). */
static double plain_read(unsigned char *buf, size_t size) {
    double t0 = time_mono();
    size_t got = 0;
    for (int i = 0; i < nfiles; i++) {
        int fd = open(files[i], O_RDONLY);
        if (fd < 0) return -1;
        for (;;) {
            size_t want = size - got < (16u << 20) ? size - got : (16u << 20);
            ssize_t n = want ? read(fd, buf + got, want) : 0;
            if (n <= 0) break;
            got += (size_t)n;
        }
        close(fd);
    }
    return got == size ? time_mono() - t0 : -1;
}

static double our_load(const char *dir, bool host_direct, bool exportable, uint64_t *bytes,
                       load_stats *st) {
    mp_error err = {0};
    gpu_set *g = NULL;
    if (gpu_set_open("host", 0, &g, &err) != 0) return -1;
    gpu_set_host_exportable(g, exportable);
    double t0 = time_mono();
    load_source src;
    load_plan plan;
    int dev = 0;
    load_plan_opts po = {.tp_size = 1, .devices = &dev, .dtype = MP_DT_INVALID};
    load_run_opts ro = {.host_direct = host_direct};
    gpu_arena *arenas[GPU_MAX_DEVICES];
    double dt = -1;
    if (load_source_open(dir, LOAD_FMT_AUTO, 1, &src, &err) == 0) {
        if (load_plan_build(&src, &po, &plan, &err) == 0) {
            if (load_run(g, &src, &plan, &ro, arenas, st, &err) == 0) {
                for (int d = 0; d < GPU_MAX_DEVICES; d++)
                    gpu_arena_free(arenas[d]);
                dt = time_mono() - t0;
                *bytes = plan.total_bytes;
            }
            load_plan_free(&plan);
        }
        load_source_free(&src);
    }
    if (dt < 0) fprintf(stderr, "load failed: %s: %s\n", err.code, err.message);
    gpu_set_close(g);
    return dt;
}

static double fresh_read(size_t size) {
    double t0 = time_mono();
    unsigned char *nb = malloc(size);
    double f = nb ? plain_read(nb, size) : -1;
    if (f >= 0) f = time_mono() - t0;
    free(nb);
    return f;
}

enum { V_PLAIN, V_FRESH, V_OURS, V_STAGED, V_PRIV, NV };

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: warm_load_bench MODEL_DIR REPS FILE...\n");
        return 2;
    }
    int reps = atoi(argv[2]);
    nfiles = argc - 3;
    files = argv + 3;
    size_t size = 0;
    for (int i = 0; i < nfiles; i++) {
        struct stat sb;
        if (stat(files[i], &sb) != 0) return 1;
        size += (size_t)sb.st_size;
    }
    unsigned char *buf = malloc(size);
    if (!buf) return 1;
    memset(buf, 1, size); /* the plain reader gets a pre-faulted buffer */
    double best[NV], worst[NV];
    for (int v = 0; v < NV; v++)
        best[v] = 1e9, worst[v] = 0;
    uint64_t bytes = 0;
    load_stats st_best = {0};
    for (int r = 0; r < reps; r++) {
        /* Rotate and reverse the order: on a VM whose balloon takes back
         * freed memory, a run that follows another's free can reuse its
         * pages while one after an idle spell pays to get them back, so no
         * variant should always follow the same one. */
        for (int k = 0; k < NV; k++) {
            int v = r % 2 ? (r + k) % NV : (r + NV - k) % NV;
            load_stats st;
            double t;
            switch (v) {
            case V_PLAIN:
                t = plain_read(buf, size);
                break;
            case V_FRESH: /* the same into fresh memory, as a load gets a fresh arena */
                t = fresh_read(size);
                break;
            case V_OURS: /* what the server does: exportable memfd arenas */
                t = our_load(argv[1], true, true, &bytes, &st);
                if (t >= 0 && t < best[v]) st_best = st;
                break;
            case V_STAGED:
                t = our_load(argv[1], false, true, &bytes, &st);
                break;
            default: /* private (anonymous, THP) arenas */
                t = our_load(argv[1], true, false, &bytes, &st);
                break;
            }
            if (t < 0) return 1;
            if (t < best[v]) best[v] = t;
            if (t > worst[v]) worst[v] = t;
        }
    }
    free(buf);
    printf("plain_fresh_s %.6f\nload_private_s %.6f\n", best[V_FRESH], best[V_PRIV]);
    printf("plain_worst_s %.6f\nload_worst_s %.6f\nprivate_worst_s %.6f\n", worst[V_PLAIN],
           worst[V_OURS], worst[V_PRIV]);
    printf("file_bytes %zu\ntensor_bytes %llu\nplain_read_s %.6f\nload_s %.6f\nload_staged_s %.6f\n"
           "readers %d\nalloc_s %.6f\n",
           size, (unsigned long long)bytes, best[V_PLAIN], best[V_OURS], best[V_STAGED],
           st_best.readers, st_best.alloc_s);
    return 0;
}
