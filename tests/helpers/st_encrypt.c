/*
 * st_encrypt.c - writes an encrypted copy of a safetensors file with the
 * loader's own writer (stc_encrypt_file, loader/formats/safetensors/st_crypt.c), for tests that
 * need one without going through the convert job:
 *   st_encrypt IN.safetensors OUT.safetensors KEYFILE [CHUNK_BYTES]
 */
#include <stdio.h>
#include <stdlib.h>

#include "loader/formats/safetensors/safetensors.h"

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: st_encrypt IN OUT KEYFILE [CHUNK_BYTES]\n");
        return 2;
    }
    mp_error err = {0};
    unsigned char key[STC_KEY_BYTES];
    uint64_t chunk = argc == 5 ? strtoull(argv[4], NULL, 10) : 0;
    if (stc_key_load(argv[3], key, &err) != 0 ||
        stc_encrypt_file(argv[1], argv[2], key, chunk, &err) != 0) {
        fprintf(stderr, "%s: %s\n", err.code, err.message);
        return 1;
    }
    return 0;
}
