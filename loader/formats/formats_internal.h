/*
 * formats_internal.h - what the format readers share with weights.c, and
 * nothing a consumer needs: the handler each format registers (how to
 * recognise one of its files, how to open it), the table of handlers, and
 * the helpers a reader fills an mp_weights with.
 *
 * A new format lands as its own folder under loader/formats/ that defines
 * one mp_format_handler, plus one line in the table of registry.c; neither
 * weights.h nor weights.c changes. Its family-specific API (writers,
 * metadata accessors, its *_open for callers that know the format) goes in
 * the folder's own public header.
 */
#ifndef MP_LOADER_FORMATS_INTERNAL_H
#define MP_LOADER_FORMATS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"

/* Bytes of a file's start that detection looks at. */
#define MP_FORMAT_HEAD_BYTES 64

typedef struct mp_format_handler {
    /* The family as the "not a ... file" message names it ("safetensors",
     * "PyTorch", ...); handlers of one family share it. */
    const char *name;
    /* What weights_detect reports when this handler's detect matches. */
    mp_format format;
    /* Whether a regular file of `size` bytes at path is of this format;
     * head holds its first n bytes (n <= MP_FORMAT_HEAD_BYTES, less only
     * for a shorter file). Pure: no I/O, no error. */
    bool (*detect)(const char *path, const unsigned char *head, size_t n, uint64_t size);
    /* Fills a zeroed *w from the file; on error *w may be half filled
     * (weights_free_fields cleans it). */
    int (*open)(const char *path, mp_weights *w, mp_error *err);
} mp_format_handler;

/* Every handler in detection order, NULL-terminated (registry.c): the
 * first whose detect matches opens the file. */
extern const mp_format_handler *const mp_format_handlers[];

/* Appends a file that the reader opened; w takes fd over on success only. */
int weights_add_file(mp_weights *w, const char *path, int fd, mp_error *err);

#endif
