/*
 * warm_load_bench.c - the warm_load pipeline (loader/load.h) onto one host
 * device vs a plain read() of the same file into a buffer, same process,
 * page cache warm, best of REPS. Prints "key value" lines for
 * bench/warm_load.sh:
 *   warm_load_bench MODEL_DIR FILE REPS
 * The plain read is timed twice: into a pre-faulted buffer (the strict
 * peer) and into freshly malloc'd memory (what our arena also is).
 * Our figure includes everything a warm_load does after the job starts:
 * opening the headers, the plan, allocating the arena (fallocate'd memfd),
 * reading, and freeing it again.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/load.h"
#include "util/timeutil.h"

static double plain_read(const char *file, unsigned char *buf, size_t size) {
    double t0 = time_mono();
    int fd = open(file, O_RDONLY);
    if (fd < 0) return -1;
    size_t got = 0;
    while (got < size) {
        size_t want = size - got < (16u << 20) ? size - got : (16u << 20);
        ssize_t n = read(fd, buf + got, want);
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    return got == size ? time_mono() - t0 : -1;
}

static double our_load(const char *dir, bool host_direct, uint64_t *bytes, load_stats *st) {
    mp_error err = {0};
    gpu_set *g = NULL;
    if (gpu_set_open("host", 0, &g, &err) != 0) return -1;
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

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: warm_load_bench MODEL_DIR FILE REPS\n");
        return 2;
    }
    int reps = atoi(argv[3]);
    struct stat sb;
    if (stat(argv[2], &sb) != 0) return 1;
    size_t size = (size_t)sb.st_size;
    unsigned char *buf = malloc(size);
    if (!buf) return 1;
    memset(buf, 1, size); /* the plain reader gets a pre-faulted buffer */
    double plain = 1e9, fresh = 1e9, ours = 1e9, staged = 1e9;
    uint64_t bytes = 0;
    load_stats st, st2;
    for (int r = 0; r < reps; r++) {
        double p = plain_read(argv[2], buf, size);
        /* the same into freshly allocated memory, as a load gets a fresh arena */
        double t0 = time_mono();
        unsigned char *nb = malloc(size);
        double f = nb ? plain_read(argv[2], nb, size) : -1;
        if (f >= 0) f = time_mono() - t0;
        free(nb);
        if (f >= 0 && f < fresh) fresh = f;
        double o = our_load(argv[1], true, &bytes, &st);
        double s = our_load(argv[1], false, &bytes, &st2);
        if (p < 0 || o < 0 || s < 0) return 1;
        if (p < plain) plain = p;
        if (o < ours) ours = o;
        if (s < staged) staged = s;
    }
    free(buf);
    printf("plain_fresh_s %.6f\n", fresh);
    printf("file_bytes %zu\ntensor_bytes %llu\nplain_read_s %.6f\nload_s %.6f\nload_staged_s %.6f\n"
           "readers %d\nalloc_s %.6f\n",
           size, (unsigned long long)bytes, plain, ours, staged, st.readers, st.alloc_s);
    return 0;
}
