/*
 * pt_zip.h - a minimal, strict reader for the zip container torch.save
 * writes (>= 1.6): central directory (with zip64), the one top-level
 * archive prefix, and each record's data offset taken from its local
 * header. It only locates stored (uncompressed) records; it never inflates.
 */
#ifndef MP_LOADER_PT_ZIP_H
#define MP_LOADER_PT_ZIP_H

#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

typedef struct pt_zip_entry {
    char *name;      /* full name, NUL-terminated, owned */
    uint16_t method; /* 0 = stored */
    uint16_t flags;  /* bit 0 = encrypted */
    uint32_t crc32;
    uint64_t comp_size;  /* bytes in the file */
    uint64_t size;       /* uncompressed size */
    uint64_t header_off; /* local header */
    uint64_t data_off;   /* first data byte (from the local header) */
} pt_zip_entry;

typedef struct pt_zip {
    pt_zip_entry *entries; /* sorted by name, unique */
    size_t nentries;
    char *prefix; /* "archive" (no slash), owned */
    uint64_t file_size;
} pt_zip;

/* Reads the central directory of the open file fd. Checks: one EOCD, no
 * multi-disk, zip64 records when fields are saturated, every entry under one
 * prefix directory, no duplicate names, every local header present and
 * matching, every record's data inside the file and before the central
 * directory. Errors: "bad_header", "truncated", "too_large", "io_error",
 * "no_memory". */
int pt_zip_open(int fd, pt_zip *z, mp_error *err);
void pt_zip_close(pt_zip *z);

/* Entry "<prefix>/<rel>" or NULL. */
const pt_zip_entry *pt_zip_find(const pt_zip *z, const char *rel);

/* Fails with "unsupported_format" unless e is a stored, unencrypted entry
 * whose sizes agree; what names the record for the message. */
int pt_zip_check_stored(const pt_zip_entry *e, mp_error *err);

/* Reads a whole stored record into a malloc'd buffer (+1 NUL byte); fails
 * with "too_large" above max bytes. */
int pt_zip_read(int fd, const pt_zip_entry *e, uint64_t max, uint8_t **buf, size_t *len,
                mp_error *err);

/* pread that retries short reads; "truncated" when EOF comes first. */
int pt_pread_full(int fd, void *buf, size_t n, uint64_t off, mp_error *err);

#endif
