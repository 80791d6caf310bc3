/*
 * fuzz_gguf.c - libFuzzer target for the GGUF reader: the input becomes a
 * file (memfd), gguf_open parses it, and whatever opens is walked the way
 * consumers walk it (dequantize small tensors, map names, build a config).
 * Any crash, sanitizer report, leak or hang is a bug; errors are fine.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "loader/formats/gguf/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int fd = memfd_create("fuzz_gguf", MFD_CLOEXEC);
    if (fd < 0) return 0;
    size_t off = 0;
    while (off < size) {
        ssize_t n = write(fd, data + off, size - off);
        if (n <= 0) {
            close(fd);
            return 0;
        }
        off += (size_t)n;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    mp_weights w = {0};
    mp_error err = {0};
    if (gguf_open(path, &w, &err) == 0) {
        for (size_t i = 0; i < w.ntensors; i++) {
            const mp_tensor *t = &w.tensors[i];
            uint64_t numel;
            int ty = gguf_tensor_type(t);
            if (ty < 0 || !gguf_can_dequant(ty)) continue;
            if (!mp_shape_numel(t->shape, t->ndim, &numel) || numel > (1u << 16)) continue;
            float *buf = malloc(numel ? numel * sizeof(float) : 1);
            if (buf) gguf_tensor_dequant(&w, t, MP_DT_F32, buf, &err);
            free(buf);
            char hf[128];
            const char *arch =
                json_string_value(json_object_get(w.metadata, "general.architecture"));
            gguf_name_to_hf(arch, t->name, hf, sizeof hf);
        }
        json_decref(gguf_hf_config_weights(&w, &err));
    }
    weights_free_fields(&w);
    close(fd);
    return 0;
}
