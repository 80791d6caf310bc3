/*
 * pt_read_bench - times opening a PyTorch checkpoint with pt_open and
 * reading every tensor's materialized bytes (views gathered) into one
 * preallocated buffer, against a plain sequential read() of the file into
 * the same buffer. Page cache is expected warm (bench/formats_pt.sh reads
 * the file first). Best of REPS runs.
 *
 *   pt_read_bench FILE [REPS]   prints "plain_read_s X", "pt_read_s Y",
 *                               "tensor_bytes N", "file_bytes M", "tensors K"
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/formats/pytorch/pytorch.h"
#include "loader/formats/weights.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int read_plain(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t off = 0;
    for (;;) {
        size_t want = cap - off > (1u << 30) ? (1u << 30) : cap - off;
        if (want == 0) break;
        ssize_t n = read(fd, buf + off, want);
        if (n < 0) {
            close(fd);
            return -1;
        }
        if (n == 0) break;
        off += (size_t)n;
    }
    close(fd);
    return 0;
}

/* open + read every tensor back to back into buf (NULL: only count) */
static int read_ours(const char *path, char *buf, uint64_t *total, size_t *count) {
    mp_weights w = {0};
    mp_error err = {0};
    int rc = pt_open(path, &w, &err);
    if (rc != 0) {
        fprintf(stderr, "pt_read_bench: %s: %s\n", err.code, err.message);
        return -1;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < w.ntensors && rc == 0; i++) {
        if (buf) rc = weights_read(&w, &w.tensors[i], buf + off, &err);
        off += w.tensors[i].nbytes;
    }
    if (rc != 0) fprintf(stderr, "pt_read_bench: %s: %s\n", err.code, err.message);
    *total = off;
    *count = w.ntensors;
    weights_free_fields(&w);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: pt_read_bench FILE [REPS]\n");
        return 2;
    }
    int reps = argc > 2 ? atoi(argv[2]) : 3;
    struct stat st;
    if (stat(argv[1], &st) != 0) {
        perror(argv[1]);
        return 1;
    }
    uint64_t total = 0;
    size_t count = 0;
    if (read_ours(argv[1], NULL, &total, &count) != 0) return 1;
    size_t size = (size_t)st.st_size, cap = total > size ? (size_t)total : size;
    char *buf = malloc(cap ? cap : 1);
    if (!buf) return 1;
    memset(buf, 0, cap); /* fault the pages in before timing anything */
    double best_plain = 1e9, best_pt = 1e9;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        if (read_plain(argv[1], buf, size) != 0) return 1;
        double t1 = now();
        if (read_ours(argv[1], buf, &total, &count) != 0) return 1;
        double t2 = now();
        if (t1 - t0 < best_plain) best_plain = t1 - t0;
        if (t2 - t1 < best_pt) best_pt = t2 - t1;
    }
    printf("plain_read_s %.6f\npt_read_s %.6f\ntensor_bytes %llu\nfile_bytes %zu\ntensors %zu\n",
           best_plain, best_pt, (unsigned long long)total, size, count);
    free(buf);
    return 0;
}
