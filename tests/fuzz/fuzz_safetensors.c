/*
 * fuzz_safetensors.c - libFuzzer target: the input is a whole file. It goes
 * through st_open (pread path) and st_open_mmap, and every tensor that opens
 * is read; a JSON-looking input is also tried as a sharded index.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "loader/formats/safetensors/safetensors.h"

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

static void read_all(mp_weights *w) {
    mp_error err;
    for (size_t i = 0; i < w->ntensors; i++) {
        /* st_open guarantees nbytes <= file size, so this stays small */
        void *buf = malloc(w->tensors[i].nbytes ? w->tensors[i].nbytes : 1);
        if (!buf) abort();
        if (weights_read(w, &w->tensors[i], buf, &err) != 0) abort(); /* opened => readable */
        free(buf);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64];
    int fd = mem_file(data, size, path, sizeof path);
    mp_weights w = {0};
    mp_error err;
    if (st_open(path, &w, &err) == 0) {
        read_all(&w);
        weights_free_fields(&w);
        if (st_open_mmap(path, &w, &err) != 0) abort();
        read_all(&w);
        weights_free_fields(&w);
    }
    if (size > 0 && data[0] == '{') {
        st_index idx;
        if (st_index_read(path, &idx, &err) == 0) st_index_free(&idx);
    }
    close(fd);
    return 0;
}
