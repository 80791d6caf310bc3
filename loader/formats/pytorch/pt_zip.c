/*
 * pt_zip.c - central-directory reader for torch.save archives. torch's
 * local headers carry zero sizes (bit 3 data descriptors), so sizes and CRCs
 * come from the central directory and only the data offset comes from the
 * local header, whose extra field holds torch's 64-byte alignment padding.
 */
#include "loader/formats/pytorch/pt_zip_internal.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SIG_LOCAL 0x04034b50u
#define SIG_CENTRAL 0x02014b50u
#define SIG_EOCD 0x06054b50u
#define SIG_EOCD64 0x06064b50u
#define SIG_LOC64 0x07064b50u

#define EOCD_LEN 22
#define LOC64_LEN 20
#define EOCD64_LEN 56
#define CENTRAL_LEN 46
#define LOCAL_LEN 30
#define EOCD_SCAN (EOCD_LEN + 65535)

#define MAX_CD_BYTES ((uint64_t)256 << 20)
#define MAX_ENTRIES ((uint64_t)4 << 20)

static uint16_t rd16(const uint8_t *p) {
    return (uint16_t)(p[0] | p[1] << 8);
}
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const uint8_t *p) {
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

int pt_pread_full(int fd, void *buf, size_t n, uint64_t off, mp_error *err) {
    uint8_t *p = buf;
    while (n) {
        if (off > (uint64_t)INT64_MAX) return mp_err(err, "truncated", "read past end of file");
        ssize_t k = pread(fd, p, n > (1u << 30) ? (1u << 30) : n, (off_t)off);
        if (k < 0) {
            if (errno == EINTR) continue;
            return mp_err(err, "io_error", "read failed: %s", strerror(errno));
        }
        if (k == 0) return mp_err(err, "truncated", "file ends early");
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const pt_zip_entry *)a)->name, ((const pt_zip_entry *)b)->name);
}

void pt_zip_close(pt_zip *z) {
    if (!z) return;
    for (size_t i = 0; i < z->nentries; i++)
        free(z->entries[i].name);
    free(z->entries);
    free(z->prefix);
    memset(z, 0, sizeof *z);
}

/* Finds the end records: sets the central directory's count/size/offset. */
static int find_cd(int fd, uint64_t fsize, uint64_t *count, uint64_t *cd_size, uint64_t *cd_off,
                   uint64_t *cd_end_limit, mp_error *err) {
    if (fsize < EOCD_LEN) return mp_err(err, "truncated", "file too small for a zip archive");
    size_t scan = fsize < EOCD_SCAN ? (size_t)fsize : EOCD_SCAN;
    uint8_t *tail = malloc(scan);
    if (!tail) return mp_err(err, "no_memory", "out of memory");
    uint64_t base = fsize - scan;
    if (pt_pread_full(fd, tail, scan, base, err)) {
        free(tail);
        return -1;
    }
    size_t at = SIZE_MAX;
    for (size_t i = scan - EOCD_LEN + 1; i-- > 0;) {
        if (rd32(tail + i) == SIG_EOCD && i + EOCD_LEN + rd16(tail + i + 20) == scan) {
            at = i;
            break;
        }
    }
    if (at == SIZE_MAX) {
        free(tail);
        return mp_err(err, "bad_header", "zip end-of-central-directory record not found");
    }
    const uint8_t *e = tail + at;
    uint16_t disk = rd16(e + 4), cd_disk = rd16(e + 6);
    uint64_t n_disk = rd16(e + 8), n = rd16(e + 10);
    uint64_t sz = rd32(e + 12), off = rd32(e + 16);
    uint64_t eocd_pos = base + at;
    bool saturated = disk == 0xFFFF || cd_disk == 0xFFFF || n_disk == 0xFFFF || n == 0xFFFF ||
                     sz == 0xFFFFFFFFu || off == 0xFFFFFFFFu;
    *cd_end_limit = eocd_pos;
    uint8_t loc[LOC64_LEN];
    bool have_loc = false;
    if (eocd_pos >= LOC64_LEN) {
        if (pt_pread_full(fd, loc, LOC64_LEN, eocd_pos - LOC64_LEN, err)) {
            free(tail);
            return -1;
        }
        have_loc = rd32(loc) == SIG_LOC64;
    }
    free(tail);
    if (have_loc) {
        uint64_t e64 = rd64(loc + 8);
        if (rd32(loc + 4) != 0 || rd32(loc + 16) > 1)
            return mp_err(err, "bad_header", "multi-disk zip archives are not supported");
        if (e64 > eocd_pos - LOC64_LEN || eocd_pos - LOC64_LEN - e64 < EOCD64_LEN)
            return mp_err(err, "bad_header", "zip64 end record offset out of range");
        uint8_t r[EOCD64_LEN];
        if (pt_pread_full(fd, r, EOCD64_LEN, e64, err)) return -1;
        if (rd32(r) != SIG_EOCD64) return mp_err(err, "bad_header", "zip64 end record missing");
        disk = rd32(r + 16) ? 1 : 0;
        cd_disk = rd32(r + 20) ? 1 : 0;
        n_disk = rd64(r + 24);
        n = rd64(r + 32);
        sz = rd64(r + 40);
        off = rd64(r + 48);
        *cd_end_limit = e64;
    } else if (saturated) {
        return mp_err(err, "bad_header", "zip needs zip64 end records but they are missing");
    }
    if (disk != 0 || cd_disk != 0 || n_disk != n)
        return mp_err(err, "bad_header", "multi-disk zip archives are not supported");
    if (off > *cd_end_limit || sz > *cd_end_limit - off)
        return mp_err(err, "bad_header", "zip central directory out of range");
    if (sz > MAX_CD_BYTES || n > MAX_ENTRIES)
        return mp_err(err, "too_large", "zip central directory too large");
    if (n == 0) return mp_err(err, "bad_header", "zip archive is empty");
    if (n > sz / CENTRAL_LEN) return mp_err(err, "bad_header", "zip entry count exceeds directory");
    *count = n;
    *cd_size = sz;
    *cd_off = off;
    return 0;
}

/* Applies the zip64 extra field (id 1) to the saturated fixed fields. */
static int apply_zip64(const uint8_t *x, size_t xlen, uint64_t *usize, uint64_t *csize,
                       uint64_t *hoff, bool need_u, bool need_c, bool need_h, mp_error *err) {
    size_t i = 0;
    while (i + 4 <= xlen) {
        uint16_t id = rd16(x + i), len = rd16(x + i + 2);
        if (len > xlen - i - 4) return mp_err(err, "bad_header", "zip extra field overruns");
        if (id == 1) {
            const uint8_t *p = x + i + 4;
            size_t left = len;
            if (need_u) {
                if (left < 8) return mp_err(err, "bad_header", "short zip64 extra field");
                *usize = rd64(p);
                p += 8;
                left -= 8;
            }
            if (need_c) {
                if (left < 8) return mp_err(err, "bad_header", "short zip64 extra field");
                *csize = rd64(p);
                p += 8;
                left -= 8;
            }
            if (need_h) {
                if (left < 8) return mp_err(err, "bad_header", "short zip64 extra field");
                *hoff = rd64(p);
            }
            return 0;
        }
        i += 4 + (size_t)len;
    }
    if (need_u || need_c || need_h)
        return mp_err(err, "bad_header", "zip entry needs a zip64 extra field but has none");
    return 0;
}

int pt_zip_open(int fd, pt_zip *z, mp_error *err) {
    memset(z, 0, sizeof *z);
    struct stat st;
    if (fstat(fd, &st)) return mp_err(err, "io_error", "stat failed: %s", strerror(errno));
    uint64_t fsize = (uint64_t)st.st_size;
    z->file_size = fsize;
    uint64_t n = 0, cd_size = 0, cd_off = 0, cd_limit = 0;
    if (find_cd(fd, fsize, &n, &cd_size, &cd_off, &cd_limit, err)) return -1;
    uint8_t *cd = malloc(cd_size ? (size_t)cd_size : 1);
    if (!cd) return mp_err(err, "no_memory", "out of memory");
    if (pt_pread_full(fd, cd, (size_t)cd_size, cd_off, err)) {
        free(cd);
        return -1;
    }
    z->entries = calloc((size_t)n, sizeof *z->entries);
    if (!z->entries) {
        free(cd);
        return mp_err(err, "no_memory", "out of memory");
    }
    size_t pos = 0;
    int rc = -1;
    for (uint64_t k = 0; k < n; k++) {
        if (cd_size - pos < CENTRAL_LEN || rd32(cd + pos) != SIG_CENTRAL) {
            mp_err(err, "bad_header", "zip central directory entry %llu is malformed",
                   (unsigned long long)k);
            goto out;
        }
        const uint8_t *c = cd + pos;
        pt_zip_entry *e = &z->entries[z->nentries];
        size_t nlen = rd16(c + 28), xlen = rd16(c + 30), clen = rd16(c + 32);
        if (cd_size - pos - CENTRAL_LEN < nlen + xlen + clen) {
            mp_err(err, "bad_header", "zip central directory entry %llu overruns",
                   (unsigned long long)k);
            goto out;
        }
        if (nlen == 0 || memchr(c + CENTRAL_LEN, 0, nlen)) {
            mp_err(err, "bad_header", "zip entry %llu has a bad name", (unsigned long long)k);
            goto out;
        }
        e->flags = rd16(c + 8);
        e->method = rd16(c + 10);
        e->crc32 = rd32(c + 16);
        e->comp_size = rd32(c + 20);
        e->size = rd32(c + 24);
        e->header_off = rd32(c + 42);
        if (rd16(c + 34) != 0 && rd16(c + 34) != 0xFFFF) {
            mp_err(err, "bad_header", "multi-disk zip archives are not supported");
            goto out;
        }
        if (apply_zip64(c + CENTRAL_LEN + nlen, xlen, &e->size, &e->comp_size, &e->header_off,
                        e->size == 0xFFFFFFFFu, e->comp_size == 0xFFFFFFFFu,
                        e->header_off == 0xFFFFFFFFu, err))
            goto out;
        e->name = strndup((const char *)c + CENTRAL_LEN, nlen);
        if (!e->name) {
            mp_err(err, "no_memory", "out of memory");
            goto out;
        }
        z->nentries++;
        pos += CENTRAL_LEN + nlen + xlen + clen;
    }
    /* torch: every record lives under one directory, named by the first */
    const char *first = z->entries[0].name;
    const char *slash = strchr(first, '/');
    if (!slash || slash == first) {
        mp_err(err, "bad_header", "zip entry '%s' is not in a subdirectory", first);
        goto out;
    }
    size_t plen = (size_t)(slash - first);
    z->prefix = strndup(first, plen);
    if (!z->prefix) {
        mp_err(err, "no_memory", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < z->nentries; i++) {
        pt_zip_entry *e = &z->entries[i];
        if (strncmp(e->name, z->prefix, plen) != 0 || e->name[plen] != '/') {
            mp_err(err, "bad_header", "zip entry '%s' is outside the archive directory '%s'",
                   e->name, z->prefix);
            goto out;
        }
        /* local header: data starts after ITS name and extra (torch pads there) */
        uint8_t lh[LOCAL_LEN];
        if (e->header_off > cd_off || cd_off - e->header_off < LOCAL_LEN) {
            mp_err(err, "bad_header", "zip entry '%s' has its header out of range", e->name);
            goto out;
        }
        if (pt_pread_full(fd, lh, LOCAL_LEN, e->header_off, err)) goto out;
        if (rd32(lh) != SIG_LOCAL) {
            mp_err(err, "bad_header", "zip entry '%s' has no local header", e->name);
            goto out;
        }
        size_t lnlen = rd16(lh + 26), lxlen = rd16(lh + 28);
        size_t cnlen = strlen(e->name);
        uint64_t data = e->header_off + LOCAL_LEN + lnlen + lxlen;
        if (lnlen != cnlen || data > cd_off || e->comp_size > cd_off - data) {
            mp_err(err, "bad_header", "zip entry '%s' has its data out of range", e->name);
            goto out;
        }
        char lname[65536];
        if (pt_pread_full(fd, lname, lnlen, e->header_off + LOCAL_LEN, err)) goto out;
        if (memcmp(lname, e->name, lnlen) != 0) {
            mp_err(err, "bad_header", "zip entry '%s': local and central names differ", e->name);
            goto out;
        }
        e->data_off = data;
    }
    qsort(z->entries, z->nentries, sizeof *z->entries, cmp_entry);
    for (size_t i = 1; i < z->nentries; i++)
        if (strcmp(z->entries[i - 1].name, z->entries[i].name) == 0) {
            mp_err(err, "bad_header", "zip entry '%s' appears twice", z->entries[i].name);
            goto out;
        }
    rc = 0;
out:
    free(cd);
    if (rc) pt_zip_close(z);
    return rc;
}

const pt_zip_entry *pt_zip_find(const pt_zip *z, const char *rel) {
    size_t plen = strlen(z->prefix), rlen = strlen(rel);
    char stackbuf[512];
    char *full = plen + rlen + 2 <= sizeof stackbuf ? stackbuf : malloc(plen + rlen + 2);
    if (!full) return NULL;
    memcpy(full, z->prefix, plen);
    full[plen] = '/';
    memcpy(full + plen + 1, rel, rlen + 1);
    pt_zip_entry key = {.name = full};
    const pt_zip_entry *e = bsearch(&key, z->entries, z->nentries, sizeof key, cmp_entry);
    if (full != stackbuf) free(full);
    return e;
}

int pt_zip_check_stored(const pt_zip_entry *e, mp_error *err) {
    if (e->flags & 1)
        return mp_err(err, "unsupported_format", "zip record '%s' is encrypted", e->name);
    if (e->method != 0)
        return mp_err(err, "unsupported_format",
                      "zip record '%s' is compressed (method %u); torch.save writes stored "
                      "records only - re-save the checkpoint with torch.save",
                      e->name, e->method);
    if (e->comp_size != e->size)
        return mp_err(err, "bad_header", "stored zip record '%s' has mismatched sizes", e->name);
    return 0;
}

int pt_zip_read(int fd, const pt_zip_entry *e, uint64_t max, uint8_t **buf, size_t *len,
                mp_error *err) {
    *buf = NULL;
    if (pt_zip_check_stored(e, err)) return -1;
    if (e->size > max)
        return mp_err(err, "too_large", "zip record '%s' is larger than %llu bytes", e->name,
                      (unsigned long long)max);
    uint8_t *b = malloc((size_t)e->size + 1);
    if (!b) return mp_err(err, "no_memory", "out of memory");
    if (pt_pread_full(fd, b, (size_t)e->size, e->data_off, err)) {
        free(b);
        return -1;
    }
    b[e->size] = 0;
    *buf = b;
    *len = (size_t)e->size;
    return 0;
}
