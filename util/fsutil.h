/* fsutil.h - file-system helpers shared by the store, the loader and tools:
 * directories, atomic publication (temp name, fsync, rename), sha256 of files. */
#ifndef MP_UTIL_FSUTIL_H
#define MP_UTIL_FSUTIL_H
#include <stddef.h>
#include <stdint.h>
#include "util/error.h"
/* mkdir -p with mode 0755; 0 on success (existing dirs are fine). */
MP_MUST_USE int fs_mkdirs(const char *path, mp_error *err);
/* Writes data to path via "<path>.tmp.<pid>", fsync, rename, fsync(dir). */
MP_MUST_USE int fs_write_atomic(const char *path, const void *data, size_t len, mp_error *err);
/* fsync the directory containing path so a rename in it is durable; a
 * failure means the publication may not survive a crash ("io_error"). */
MP_MUST_USE int fs_sync_parent(const char *path, mp_error *err);
/* Reads a whole (small) file; *out is NUL-terminated and owned by the caller.
 * Files over max bytes are refused with "too_large". */
MP_MUST_USE int fs_read_all(const char *path, size_t max, char **out, size_t *len, mp_error *err);
/* sha256 of a file as 64 lowercase hex chars + NUL in hex (>= 65 bytes).
 * progress (may be NULL) is called with bytes hashed so far; returning
 * non-zero from it stops the hash with "cancelled". */
typedef int (*fs_progress_fn)(void *arg, uint64_t bytes);
MP_MUST_USE int fs_sha256_file(const char *path, char *hex, fs_progress_fn progress, void *arg,
                               mp_error *err);
void fs_hex(const unsigned char *bytes, size_t n, char *out);
#endif
