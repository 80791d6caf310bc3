/*
 * warm_load_read.c - the plain-read peers of bench/warm_load_job.py: read()
 * every FILE whole, 16 MiB at a time, and print the seconds it took.
 *   warm_load_read fresh FILE...     into memory malloc'd inside the timed
 *                                    region (page faults included, as a
 *                                    loader that allocates per load pays)
 *   warm_load_read prefault FILE...  into memory written beforehand (no
 *                                    faults: the bound for a copy)
 * The buffers stay allocated until after the clock stops, so freeing is not
 * counted (a warm_load job with keep_resident false does count its free).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int read_all(const char *path, unsigned char *buf, size_t size) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    size_t got = 0;
    while (got < size) {
        size_t want = size - got < (16u << 20) ? size - got : (16u << 20);
        ssize_t n = read(fd, buf + got, want);
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    return got == size ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "fresh") != 0 && strcmp(argv[1], "prefault") != 0)) {
        fprintf(stderr, "usage: warm_load_read fresh|prefault FILE...\n");
        return 2;
    }
    int n = argc - 2;
    int fresh = strcmp(argv[1], "fresh") == 0;
    size_t *size = calloc((size_t)n, sizeof *size);
    unsigned char **buf = calloc((size_t)n, sizeof *buf);
    if (!size || !buf) return 1;
    for (int i = 0; i < n; i++) {
        struct stat sb;
        if (stat(argv[i + 2], &sb) != 0) return 1;
        size[i] = (size_t)sb.st_size;
        if (!fresh) {
            if (!(buf[i] = malloc(size[i]))) return 1;
            memset(buf[i], 1, size[i]);
        }
    }
    double t0 = now();
    for (int i = 0; i < n; i++) {
        if (fresh && !(buf[i] = malloc(size[i]))) return 1;
        if (read_all(argv[i + 2], buf[i], size[i]) != 0) return 1;
    }
    double t = now() - t0;
    for (int i = 0; i < n; i++)
        free(buf[i]);
    free(buf);
    free(size);
    printf("%.6f\n", t);
    return 0;
}
