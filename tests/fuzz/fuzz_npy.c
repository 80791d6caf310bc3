/*
 * fuzz_npy.c - libFuzzer target: the input is a whole .npy file, parsed from
 * memory (npy_parse_header) and through npy_open; what opens is read
 * (fortran-order files go through the view gather).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "loader/formats/npy/npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mp_tensor t = {0};
    mp_error err;
    (void)npy_parse_header(data, size, &t, &err);
    int fd = memfd_create("fuzz", MFD_CLOEXEC);
    if (fd < 0) abort();
    size_t off = 0;
    while (off < size) {
        ssize_t n = write(fd, data + off, size - off);
        if (n <= 0) abort();
        off += (size_t)n;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    mp_weights w = {0};
    if (npy_open(path, &w, &err) == 0) {
        void *buf = malloc(w.tensors[0].nbytes ? w.tensors[0].nbytes : 1);
        if (!buf) abort();
        if (weights_read(&w, &w.tensors[0], buf, &err) != 0) abort();
        free(buf);
        weights_free_fields(&w);
    }
    close(fd);
    return 0;
}
