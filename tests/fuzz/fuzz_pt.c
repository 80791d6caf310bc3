/*
 * fuzz_pt.c - libFuzzer target for the PyTorch loader: the input is a whole
 * file (zip or legacy stream) opened with pt_open through a memfd, and every
 * tensor that opens is read; the input is also run as a bare data.pkl
 * through the torch allowlist, both as a zip and as a legacy pickle.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "loader/formats/pytorch/pytorch.h"
#include "loader/formats/weights.h"

#define READ_MAX (16u << 20)

static int mem_file(const uint8_t *data, size_t size, char *path, size_t cap) {
    int fd = memfd_create("fuzz", MFD_CLOEXEC);
    if (fd < 0) abort();
    size_t off = 0;
    while (off < size) {
        ssize_t n = write(fd, data + off, size - off);
        if (n <= 0) abort();
        off += (size_t)n;
    }
    snprintf(path, cap, "/proc/self/fd/%d", fd);
    return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64];
    int fd = mem_file(data, size, path, sizeof path);
    mp_weights w = {0};
    mp_error err;
    if (pt_open(path, &w, &err) == 0) {
        for (size_t i = 0; i < w.ntensors; i++) {
            const mp_tensor *t = &w.tensors[i];
            /* expand()ed views may materialize far beyond the file */
            if (t->nbytes > READ_MAX) continue;
            void *buf = malloc(t->nbytes ? t->nbytes : 1);
            if (!buf) abort();
            /* pt_open checked every view against its storage record */
            if (weights_read(&w, t, buf, &err) != 0) abort();
            free(buf);
        }
        weights_free_fields(&w);
    }
    (void)pt_check_pickle(data, size, false, &err);
    (void)pt_check_pickle(data, size, true, &err);
    close(fd);
    return 0;
}
