/*
 * st_read_bench - times reading every tensor of a safetensors file into one
 * preallocated buffer, through our pread path (st_open + weights_read) and
 * our mmap path (st_open_mmap + weights_read), against a plain sequential
 * read() of the whole file into the same buffer. Page cache is expected
 * warm (bench/formats_st.sh reads the file first). Best of REPS runs.
 *
 *   st_read_bench FILE [REPS]    prints "plain_read_s X", "st_pread_s Y",
 *                                "st_mmap_s Z", "tensor_bytes N", "file_bytes M"
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/formats/safetensors/safetensors.h"

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

/* open + read every tensor back to back into buf */
static int read_ours(const char *path, char *buf, int use_mmap, uint64_t *total) {
    mp_weights w = {0};
    mp_error err = {0};
    int rc = use_mmap ? st_open_mmap(path, &w, &err) : st_open(path, &w, &err);
    if (rc != 0) {
        fprintf(stderr, "st_read_bench: %s: %s\n", err.code, err.message);
        return -1;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < w.ntensors && rc == 0; i++) {
        rc = weights_read(&w, &w.tensors[i], buf + off, &err);
        off += w.tensors[i].nbytes;
    }
    if (rc != 0) fprintf(stderr, "st_read_bench: %s: %s\n", err.code, err.message);
    *total = off;
    weights_free_fields(&w);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: st_read_bench FILE [REPS]\n");
        return 2;
    }
    int reps = argc > 2 ? atoi(argv[2]) : 3;
    struct stat st;
    if (stat(argv[1], &st) != 0) {
        perror(argv[1]);
        return 1;
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size);
    if (!buf) return 1;
    memset(buf, 0, size); /* fault the pages in before timing anything */
    double best_plain = 1e9, best_pread = 1e9, best_mmap = 1e9;
    uint64_t total = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        if (read_plain(argv[1], buf, size) != 0) return 1;
        double t1 = now();
        if (read_ours(argv[1], buf, 0, &total) != 0) return 1;
        double t2 = now();
        if (read_ours(argv[1], buf, 1, &total) != 0) return 1;
        double t3 = now();
        if (t1 - t0 < best_plain) best_plain = t1 - t0;
        if (t2 - t1 < best_pread) best_pread = t2 - t1;
        if (t3 - t2 < best_mmap) best_mmap = t3 - t2;
    }
    printf(
        "plain_read_s %.6f\nst_pread_s %.6f\nst_mmap_s %.6f\ntensor_bytes %llu\nfile_bytes %zu\n",
        best_plain, best_pread, best_mmap, (unsigned long long)total, size);
    free(buf);
    return 0;
}
