/* s3_download.c - an s3://bucket/prefix into DATA/remote/s3/<bucket>/
 * <prefix>/, usable by every job as a model (see remote.h).
 *
 * Order of work: list (every page) and choose the files exactly as a hub
 * download chooses them (hub_select_files: load_format, patterns, the
 * safetensors index); reuse files of an earlier copy whose ETag and size
 * still match (hard links); fetch the rest as ranged GETs from a pool of
 * `connections` threads, each range written in place with pwrite and each
 * GET conditional on the listed ETag; then hash every file (sha256, and MD5
 * where the ETag of a single-part upload is one), fsync, write the
 * provenance file (.modelprep-s3.json) and swap the folder in. Until the
 * swap nothing is visible under the final name; a failure removes the temp
 * folder, so there is never a half-published model. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/remote/remote_internal.h"
#include "util/fsutil.h"

#define S3D_PROVENANCE MREF_S3_PROVENANCE
#define S3D_PARTIAL ".modelprep-partial.json"
#define S3D_MAX_INDEX (64u << 20)
#define S3D_HASH_BLOCK (4u << 20)

typedef struct s3d_file {
    const s3_object *obj;
    const char *rel; /* path under the prefix */
    int fd;
    bool reused;
    char sha256[65];
    char md5[33];
    /* Hashing as the ranges land: chunks [first, first + nchunks) of the
     * context are this file's; the thread that completes the next chunk
     * in order hashes it (from the page cache, just written) and any done
     * chunks after it, so the digests are ready when the transfer ends. */
    pthread_mutex_t mu;
    size_t first, nchunks, next_hash;
    bool *done;
    bool hashing, want_md5;
    bool store_sha256;   /* the store's x-amz-checksum-sha256 matched */
    json_t *resume_done; /* chunk numbers an earlier run finished, or NULL */
    json_t *resume_part; /* {chunk number: bytes from its start} it left half done */
    EVP_MD_CTX *sha, *md5ctx;
} s3d_file;

typedef struct s3d_chunk {
    size_t file;
    uint64_t off, len;
    bool skip;         /* on disk from an earlier run */
    uint64_t start_at; /* bytes at its start on disk from an earlier run */
    /* bytes from its start written so far (in order: a range arrives as one
     * stream), what a record of the download may call on disk once fsync'ed */
    atomic_uint_least64_t have;
} s3d_chunk;

typedef struct s3d_ctx {
    const remote_s3_download_opts *o;
    const remote_callbacks *cb;
    s3_client *s3;
    s3d_file *files;
    size_t nfiles;
    s3d_chunk *chunks;
    size_t nchunks;
    atomic_size_t next;
    atomic_uint_least64_t done;
    atomic_bool failed;
    atomic_bool stop;
    pthread_mutex_t mu;
    mp_error first_err;
    char tmp_dir[PATH_MAX];
    uint64_t chunk; /* the range size, named in the resume record */
} s3d_ctx;

static bool cancelled_cb(void *arg) {
    s3d_ctx *c = arg;
    if (atomic_load(&c->stop)) return true;
    return c->cb && c->cb->cancelled && c->cb->cancelled(c->cb->arg);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- transfer ------------------------------------------------------------------ */

typedef struct range_sink {
    s3d_ctx *c;
    s3d_chunk *ch;
    int fd;
    uint64_t start, pos, end;
} range_sink;

static int rs_write(void *arg, const void *p, size_t n) {
    range_sink *s = arg;
    if (atomic_load(&s->c->stop)) return -1;
    /* a store that sends more than the range asked for is not trusted */
    if (s->pos + n > s->end) return -1;
    const char *b = p;
    size_t left = n;
    while (left > 0) {
        ssize_t w = pwrite(s->fd, b, left, (off_t)s->pos);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        b += w;
        left -= (size_t)w;
        s->pos += (uint64_t)w;
    }
    atomic_store(&s->ch->have, s->pos - s->ch->off);
    atomic_fetch_add(&s->c->done, n);
    return 0;
}

static void rs_restart(void *arg) {
    range_sink *s = arg;
    atomic_fetch_sub(&s->c->done, s->pos - s->start);
    s->pos = s->start;
    atomic_store(&s->ch->have, s->start - s->ch->off);
}

static void set_error(s3d_ctx *c, const mp_error *e) {
    pthread_mutex_lock(&c->mu);
    if (!atomic_load(&c->failed)) {
        c->first_err = *e;
        atomic_store(&c->failed, true);
        atomic_store(&c->stop, true);
    }
    pthread_mutex_unlock(&c->mu);
}

static int hash_range(s3d_file *f, uint64_t off, uint64_t len, unsigned char *buf, mp_error *err) {
    while (len > 0) {
        size_t want = len < S3D_HASH_BLOCK ? (size_t)len : S3D_HASH_BLOCK;
        ssize_t r = pread(f->fd, buf, want, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            return mp_err(err, "io_error", "%s: read back: %s", f->rel,
                          r < 0 ? strerror(errno) : "short file");
        EVP_DigestUpdate(f->sha, buf, (size_t)r);
        if (f->want_md5) EVP_DigestUpdate(f->md5ctx, buf, (size_t)r);
        off += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

/* Chunk `ci` (a context index) of f is on disk: hash what is now
 * contiguous from the start. One thread hashes a file at a time; the check
 * for more work and the hand-back happen under the lock, so a chunk marked
 * done meanwhile is never missed. */
static int advance_hash(s3d_ctx *c, size_t ci, unsigned char *buf, mp_error *err) {
    s3d_file *f = &c->files[c->chunks[ci].file];
    int rc = 0;
    pthread_mutex_lock(&f->mu);
    f->done[ci - f->first] = true;
    if (f->hashing) {
        pthread_mutex_unlock(&f->mu);
        return 0;
    }
    f->hashing = true;
    while (rc == 0 && f->next_hash < f->nchunks && f->done[f->next_hash]) {
        const s3d_chunk *ch = &c->chunks[f->first + f->next_hash];
        pthread_mutex_unlock(&f->mu);
        rc = hash_range(f, ch->off, ch->len, buf, err);
        pthread_mutex_lock(&f->mu);
        f->next_hash++;
    }
    f->hashing = false;
    pthread_mutex_unlock(&f->mu);
    return rc;
}

static void *transfer_main(void *arg) {
    s3d_ctx *c = arg;
    unsigned char *buf = NULL;
    for (;;) {
        size_t i = atomic_fetch_add(&c->next, 1);
        if (i >= c->nchunks || atomic_load(&c->stop)) break;
        s3d_chunk *ch = &c->chunks[i];
        if (ch->skip) continue;
        const s3d_file *f = &c->files[ch->file];
        /* the rest of a range an earlier run left half done */
        uint64_t from = ch->off + ch->start_at;
        range_sink rs = {c, ch, f->fd, from, from, ch->off + ch->len};
        s3_sink sink = {rs_write, rs_restart, &rs};
        mp_error e = {0};
        if (s3_get_range(c->s3, f->obj->key, from, rs.end - from, f->obj->etag, &sink, &e) != 0) {
            if (strcmp(e.code, "cancelled") == 0 && atomic_load(&c->failed)) break;
            mp_err_wrap(&e, NULL, "%s", f->rel);
            set_error(c, &e);
            break;
        }
        if (rs.pos != rs.end) {
            mp_err(&e, "bad_response", "%s: the store sent %llu of %llu bytes of a range", f->rel,
                   (unsigned long long)(rs.pos - rs.start), (unsigned long long)(rs.end - from));
            set_error(c, &e);
            break;
        }
        /* start writeback now, so the fsync at the end is short */
        sync_file_range(f->fd, (off64_t)ch->off, (off64_t)ch->len, SYNC_FILE_RANGE_WRITE);
        if (!buf) buf = malloc(S3D_HASH_BLOCK);
        if (!buf || advance_hash(c, i, buf, &e) != 0) {
            if (!buf) mp_err(&e, "no_memory", "out of memory hashing");
            set_error(c, &e);
            break;
        }
    }
    free(buf);
    return NULL;
}

static bool write_record(s3d_ctx *c);

#define S3D_RECORD_EVERY_S 2.0

static int run_pool(s3d_ctx *c, int threads, void *(*fn)(void *), size_t items, uint64_t total,
                    mp_error *err) {
    pthread_t th[64];
    int started = 0;
    for (int i = 0; i < threads && i < 64; i++) {
        if (pthread_create(&th[i], NULL, fn, c) != 0) break;
        started++;
    }
    if (started == 0) return mp_err(err, "internal", "cannot start transfer threads");
    bool stopped = false;
    /* While ranges arrive on disk, a record of them every few seconds lets
     * a run after a crash fetch only the rest (in memory there is nothing
     * to keep). */
    bool record = fn == transfer_main && !c->o->stage_dir;
    double last_record = now_s();
    /* The job's thread reports progress and watches for a cancel while the
     * pool works. */
    for (;;) {
        if (record && now_s() - last_record >= S3D_RECORD_EVERY_S) {
            (void)write_record(c); /* best effort: the download goes on without */
            last_record = now_s();
        }
        bool all_done = atomic_load(&c->next) >= items + (size_t)started;
        uint64_t d = atomic_load(&c->done);
        if (c->cb && c->cb->progress && !stopped &&
            c->cb->progress(c->cb->arg, d, total, "downloading from s3")) {
            atomic_store(&c->stop, true);
            stopped = true;
        }
        if (!stopped && c->cb && c->cb->cancelled && c->cb->cancelled(c->cb->arg)) {
            atomic_store(&c->stop, true);
            stopped = true;
        }
        if (all_done || atomic_load(&c->stop)) break;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    if (atomic_load(&c->failed)) {
        *err = c->first_err;
        return -1;
    }
    if (stopped || atomic_load(&c->stop)) return mp_err(err, "cancelled", "cancelled");
    return 0;
}

/* ---- hashing ---------------------------------------------------------------------- */

/* Worth a HEAD after the transfer: a big file, or one whose ETag is not an
 * MD5 (multipart), so the store's own x-amz-checksum-sha256, when it keeps
 * one, is compared too. Small single-part files are covered by their MD5. */
static bool needs_head(const s3d_file *f) {
    return f->obj->size >= (1u << 20) || !f->want_md5;
}

/* The object as it is now: still the listed ETag (a replacement between
 * the ranges and now fails), and, for a single-part object the store keeps
 * a SHA-256 of, that SHA-256 equal to what arrived. */
static int check_head(s3d_ctx *c, s3d_file *f, const unsigned char sha[32], mp_error *err) {
    uint64_t size = 0;
    char etag[80] = "", sum[64] = "", mine[64];
    if (s3_head(c->s3, f->obj->key, &size, etag, sizeof etag, sum, sizeof sum, err) != 0)
        return mp_err_wrap(err, NULL, "%s", f->rel);
    if (size != f->obj->size || (etag[0] && strcmp(etag, f->obj->etag) != 0))
        return mp_err(err, "changed_during_download",
                      "%s changed while it was being read (now %llu bytes, ETag %s); run the job "
                      "again",
                      f->rel, (unsigned long long)size, etag);
    /* A multipart object's checksum is (on most stores) a checksum of the
     * parts' checksums, not of the object: only single-part ones compare. */
    if (!sum[0] || strchr(sum, '-') || strchr(f->obj->etag, '-')) return 0;
    s3_base64(sha, 32, mine);
    if (strcmp(mine, sum) != 0)
        return mp_err(err, "checksum_mismatch",
                      "%s: SHA-256 of what arrived (%s) is not the store's x-amz-checksum-sha256 "
                      "(%s)",
                      f->rel, mine, sum);
    f->store_sha256 = true;
    return 0;
}

/* After the transfer: digests final (a reused file is hashed whole here),
 * MD5 checked against a single-part ETag, data fsync'ed. */
static void *hash_main(void *arg) {
    s3d_ctx *c = arg;
    unsigned char *buf = NULL;
    for (;;) {
        size_t i = atomic_fetch_add(&c->next, 1);
        if (i >= c->nfiles || atomic_load(&c->stop)) break;
        s3d_file *f = &c->files[i];
        mp_error e = {0};
        int rc = 0;
        if (f->reused) {
            if (!buf && !(buf = malloc(S3D_HASH_BLOCK)))
                rc = mp_err(&e, "no_memory", "out of memory hashing");
            if (rc == 0) rc = hash_range(f, 0, f->obj->size, buf, &e);
        } else if (f->next_hash != f->nchunks) {
            rc = mp_err(&e, "internal", "%s: %zu of %zu ranges hashed", f->rel, f->next_hash,
                        f->nchunks);
        }
        unsigned char d[EVP_MAX_MD_SIZE], md[EVP_MAX_MD_SIZE];
        unsigned dl = 0;
        if (rc == 0) {
            EVP_DigestFinal_ex(f->sha, d, &dl);
            fs_hex(d, dl, f->sha256);
        }
        if (rc == 0 && f->want_md5) {
            EVP_DigestFinal_ex(f->md5ctx, md, &dl);
            fs_hex(md, dl, f->md5);
            if (strcasecmp(f->md5, f->obj->etag) != 0)
                rc = mp_err(&e, "checksum_mismatch",
                            "%s: MD5 %s of what arrived is not the object's ETag %s", f->rel,
                            f->md5, f->obj->etag);
        }
        if (rc == 0 && !f->reused && needs_head(f)) rc = check_head(c, f, d, &e);
        if (rc == 0 && !f->reused && fsync(f->fd) != 0)
            rc = mp_err(&e, "io_error", "%s: fsync: %s", f->rel, strerror(errno));
        if (rc != 0) {
            set_error(c, &e);
            break;
        }
    }
    free(buf);
    return NULL;
}

/* Per-file hashing state; every file gets one so clean-up is uniform. */
static int files_init(s3d_ctx *c, mp_error *err) {
    for (size_t i = 0; i < c->nfiles; i++) {
        s3d_file *f = &c->files[i];
        pthread_mutex_init(&f->mu, NULL);
        f->sha = EVP_MD_CTX_new();
        f->md5ctx = EVP_MD_CTX_new();
        /* the ETag of a single-part upload is the MD5 of the object */
        f->want_md5 = strlen(f->obj->etag) == 32 && !strchr(f->obj->etag, '-');
        if (!f->sha || !f->md5ctx || !EVP_DigestInit_ex(f->sha, EVP_sha256(), NULL) ||
            !EVP_DigestInit_ex(f->md5ctx, EVP_md5(), NULL))
            return mp_err(err, "no_memory", "out of memory for digests");
    }
    return 0;
}

static void files_free(s3d_ctx *c) {
    for (size_t i = 0; i < c->nfiles; i++) {
        s3d_file *f = &c->files[i];
        if (f->fd >= 0) close(f->fd);
        pthread_mutex_destroy(&f->mu);
        EVP_MD_CTX_free(f->sha);
        EVP_MD_CTX_free(f->md5ctx);
        free(f->done);
        json_decref(f->resume_done);
        json_decref(f->resume_part);
    }
    free(c->files);
}

/* ---- choosing ----------------------------------------------------------------------- */

/* hub_select_files over the listing, fetching the safetensors index when it
 * asks for it (remote_internal.h). */
int s3_choose(s3_client *s3, const remote_callbacks *cb, const s3_pick *o, const s3_listing *ls,
              size_t plen, size_t **sel, size_t *nsel, mp_error *err) {
    hub_listing hl = {0};
    size_t *map = calloc(ls->n ? ls->n : 1, sizeof *map);
    hl.files = calloc(ls->n ? ls->n : 1, sizeof *hl.files);
    if (!map || !hl.files) {
        free(map);
        free(hl.files);
        return mp_err(err, "no_memory", "out of memory");
    }
    int rc = 0;
    for (size_t i = 0; i < ls->n && rc == 0; i++) {
        const char *key = ls->objs[i].key;
        if (strlen(key) <= plen || key[strlen(key) - 1] == '/') continue; /* folder markers */
        const char *rel = key + plen;
        if (strcmp(rel, S3D_PROVENANCE) == 0) continue;
        if (!hub_path_safe(rel, strlen(rel))) {
            remote_log(cb, "warn", "skipping object %.200s: not a safe relative path", key);
            continue;
        }
        hub_file *f = &hl.files[hl.nfiles];
        f->name = (char *)rel; /* borrowed: hl is not freed with hub_listing_free */
        f->size = ls->objs[i].size;
        map[hl.nfiles++] = i;
    }
    if (hl.nfiles == 0)
        rc = mp_err(err, "not_found", "s3://%s/%s/ holds no objects", o->src->bucket,
                    o->src->prefix);
    bool needs_index = false;
    char *index = NULL;
    if (rc == 0)
        rc = hub_select_files(&hl, o->load_format, o->allow, o->nallow, o->ignore, o->nignore, NULL,
                              &needs_index, err);
    if (rc == 0 && needs_index) {
        size_t ii = SIZE_MAX;
        for (size_t i = 0; i < hl.nfiles; i++)
            if (strcmp(hl.files[i].name, HUB_SAFE_INDEX) == 0) ii = i;
        const s3_object *io = ii == SIZE_MAX ? NULL : &ls->objs[map[ii]];
        if (!io || io->size > S3D_MAX_INDEX) {
            rc = mp_err(err, "bad_response", "%s is missing or too large", HUB_SAFE_INDEX);
        } else {
            char *b = malloc(io->size + 1);
            if (!b)
                rc = mp_err(err, "no_memory", "out of memory");
            else if ((rc = s3_get_bytes(s3, io->key, 0, io->size, io->etag, b, err)) == 0) {
                b[io->size] = 0;
                index = b;
                b = NULL;
                rc = hub_select_files(&hl, o->load_format, o->allow, o->nallow, o->ignore,
                                      o->nignore, index, &needs_index, err);
            }
            free(b);
        }
    }
    free(index);
    if (rc == 0) {
        *sel = calloc(hl.nfiles ? hl.nfiles : 1, sizeof **sel);
        *nsel = 0;
        if (!*sel) rc = mp_err(err, "no_memory", "out of memory");
        for (size_t i = 0; rc == 0 && i < hl.nfiles; i++)
            if (hl.files[i].selected) (*sel)[(*nsel)++] = map[i];
        if (rc == 0 && *nsel == 0)
            rc = mp_err(err, "file_not_found", "nothing left to download after the patterns");
        if (rc != 0) {
            free(*sel);
            *sel = NULL;
        }
    }
    free(map);
    free(hl.files);
    return rc;
}

/* ---- folders -------------------------------------------------------------------------- */

static void rm_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) {
        unlink(dir);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= (int)sizeof p) continue;
        struct stat st;
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode))
            rm_tree(p);
        else
            unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static int mkparents(const char *path, mp_error *err) {
    char d[PATH_MAX];
    snprintf(d, sizeof d, "%s", path);
    char *s = strrchr(d, '/');
    if (!s) return 0;
    *s = 0;
    return fs_mkdirs(d, err);
}

/* The earlier copy's record of what it holds: {key: {etag, size}}. */
static json_t *old_record(const char *final_dir) {
    char p[PATH_MAX];
    if (snprintf(p, sizeof p, "%s/%s", final_dir, S3D_PROVENANCE) >= (int)sizeof p) return NULL;
    json_t *j = json_load_file(p, 0, NULL);
    json_t *files = json_incref(json_object_get(j, "files"));
    json_decref(j);
    if (!json_is_array(files)) {
        json_decref(files);
        return NULL;
    }
    return files;
}

static bool can_reuse(const json_t *old, const char *final_dir, const s3d_file *f) {
    size_t i;
    json_t *v;
    json_array_foreach(old, i, v) {
        const char *name = json_string_value(json_object_get(v, "name"));
        const char *etag = json_string_value(json_object_get(v, "etag"));
        json_t *size = json_object_get(v, "size");
        if (!name || !etag || strcmp(name, f->rel) != 0) continue;
        if (strcmp(etag, f->obj->etag) != 0 || !json_is_integer(size) ||
            (uint64_t)json_integer_value(size) != f->obj->size)
            return false;
        char p[PATH_MAX];
        struct stat st;
        return snprintf(p, sizeof p, "%s/%s", final_dir, f->rel) < (int)sizeof p &&
               lstat(p, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size == f->obj->size;
    }
    return false;
}

/* A file a drained or crashed run left in partial_dir, when it is still the
 * same object (same ETag and size; a replaced object starts over): moved
 * into the temp folder and opened as it is; its finished chunks and the
 * fetched starts of the others are marked by plan_chunks. */
static bool resume_file(s3d_file *f, const json_t *partial, const char *partial_dir,
                        const char *p) {
    json_t *e = json_object_get(json_object_get(partial, "files"), f->rel);
    const char *etag = json_string_value(json_object_get(e, "etag"));
    json_t *size = json_object_get(e, "size"), *done = json_object_get(e, "done");
    if (!etag || strcmp(etag, f->obj->etag) != 0 || !json_is_integer(size) ||
        (uint64_t)json_integer_value(size) != f->obj->size || !json_is_array(done))
        return false;
    char src[PATH_MAX];
    struct stat st;
    if (snprintf(src, sizeof src, "%s/%s", partial_dir, f->rel) >= (int)sizeof src ||
        lstat(src, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != f->obj->size ||
        rename(src, p) != 0)
        return false;
    if ((f->fd = open(p, O_RDWR | O_CLOEXEC)) < 0) return false;
    f->resume_done = json_incref(done);
    json_t *part = json_object_get(e, "part");
    if (json_is_object(part)) f->resume_part = json_incref(part);
    return true;
}

static int open_targets(s3d_ctx *c, const char *final_dir, const json_t *old, const json_t *partial,
                        const char *partial_dir, mp_error *err) {
    for (size_t i = 0; i < c->nfiles; i++) {
        s3d_file *f = &c->files[i];
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", c->tmp_dir, f->rel) >= (int)sizeof p)
            return mp_err(err, "bad_model", "%s: path too long", f->rel);
        if (mkparents(p, err) != 0) return -1;
        if (partial && resume_file(f, partial, partial_dir, p)) continue;
        if (old && can_reuse(old, final_dir, f)) {
            char src[PATH_MAX];
            snprintf(src, sizeof src, "%s/%s", final_dir, f->rel);
            if (link(src, p) == 0 && (f->fd = open(p, O_RDONLY | O_CLOEXEC)) >= 0) {
                f->reused = true;
                continue;
            }
            unlink(p);
        }
        if (c->o->stage_dir) {
            /* in memory, linked from the staging folder */
            char target[64];
            f->fd = memfd_create("modelprep-s3", MFD_CLOEXEC);
            if (f->fd < 0) return mp_err(err, "io_error", "memfd_create: %s", strerror(errno));
            snprintf(target, sizeof target, "/proc/self/fd/%d", f->fd);
            if (symlink(target, p) != 0)
                return mp_err(err, "io_error", "%s: %s", p, strerror(errno));
        } else {
            f->fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        }
        if (f->fd < 0) return mp_err(err, "io_error", "%s: %s", p, strerror(errno));
        if (ftruncate(f->fd, (off_t)f->obj->size) != 0)
            return mp_err(err, "io_error", "%s: %s", p, strerror(errno));
    }
    return 0;
}

/* Chunks an earlier run left half done: fetched from where it stopped. */
static void resume_parts(s3d_ctx *c, s3d_file *f, size_t k, uint64_t *resumed) {
    const char *key;
    json_t *v;
    json_object_foreach(f->resume_part, key, v) {
        char *end;
        unsigned long long x = strtoull(key, &end, 10);
        json_int_t have = json_integer_value(v);
        if (*end || end == key || x >= k || !json_is_integer(v) || have <= 0) continue;
        s3d_chunk *ch = &c->chunks[f->first + (size_t)x];
        if (ch->skip || ch->start_at || (uint64_t)have >= ch->len) continue;
        ch->start_at = (uint64_t)have;
        atomic_store(&ch->have, ch->start_at);
        *resumed += ch->start_at;
    }
}

static int plan_chunks(s3d_ctx *c, uint64_t chunk, uint64_t *total, uint64_t *resumed,
                       mp_error *err) {
    *resumed = 0;
    size_t n = 0;
    *total = 0;
    for (size_t i = 0; i < c->nfiles; i++)
        if (!c->files[i].reused) {
            n += c->files[i].obj->size ? (size_t)((c->files[i].obj->size + chunk - 1) / chunk) : 0;
            *total += c->files[i].obj->size;
        }
    c->chunks = calloc(n ? n : 1, sizeof *c->chunks);
    if (!c->chunks) return mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; i < c->nfiles; i++) {
        if (c->files[i].reused) continue;
        c->files[i].first = c->nchunks;
        size_t k =
            c->files[i].obj->size ? (size_t)((c->files[i].obj->size + chunk - 1) / chunk) : 0;
        c->files[i].nchunks = k;
        if (k && !(c->files[i].done = calloc(k, sizeof *c->files[i].done)))
            return mp_err(err, "no_memory", "out of memory");
        for (uint64_t off = 0; off < c->files[i].obj->size; off += chunk) {
            uint64_t len =
                c->files[i].obj->size - off < chunk ? c->files[i].obj->size - off : chunk;
            s3d_chunk *ch = &c->chunks[c->nchunks++]; /* zeroed by calloc */
            ch->file = i;
            ch->off = off;
            ch->len = len;
        }
        /* chunks an earlier run finished: not fetched again */
        size_t j;
        json_t *v;
        json_array_foreach(c->files[i].resume_done, j, v) {
            json_int_t x = json_integer_value(v);
            if (!json_is_integer(v) || x < 0 || (size_t)x >= k) continue;
            s3d_chunk *ch = &c->chunks[c->files[i].first + (size_t)x];
            if (!ch->skip) *resumed += ch->len - ch->start_at;
            ch->skip = true;
            ch->start_at = 0;
        }
        resume_parts(c, &c->files[i], k, resumed);
    }
    return 0;
}

/* The resumed chunks go through the running hashes first (in order, as
 * advance_hash wants them). */
static int hash_resumed(s3d_ctx *c, mp_error *err) {
    unsigned char *buf = NULL;
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < c->nchunks; i++) {
        if (!c->chunks[i].skip) continue;
        if (!buf && !(buf = malloc(S3D_HASH_BLOCK))) rc = mp_err(err, "no_memory", "out of memory");
        if (rc == 0) rc = advance_hash(c, i, buf, err);
    }
    free(buf);
    return rc;
}

/* The record of what is on disk in the temp folder (S3D_PARTIAL): per file
 * its ETag, size, finished chunks and how far the others got. What it
 * names is fsync'ed first, and it replaces the last one atomically, so after
 * a crash it never claims bytes the disk does not have. */
static bool write_record(s3d_ctx *c) {
    json_t *files = json_object();
    for (size_t i = 0; files && i < c->nfiles; i++) {
        s3d_file *f = &c->files[i];
        if (f->reused || f->fd < 0 || !f->done) continue;
        json_t *done = json_array(), *part = json_object();
        pthread_mutex_lock(&f->mu);
        for (size_t k = 0; done && part && k < f->nchunks; k++) {
            uint64_t have = atomic_load(&c->chunks[f->first + k].have);
            if (f->done[k] || c->chunks[f->first + k].skip) {
                json_array_append_new(done, json_integer((json_int_t)k));
            } else if (have > 0) {
                char key[24];
                snprintf(key, sizeof key, "%zu", k);
                json_object_set_new(part, key, json_integer((json_int_t)have));
            }
        }
        pthread_mutex_unlock(&f->mu);
        /* the snapshot above, then the fsync: everything it names is on disk */
        if (!done || !part || fdatasync(f->fd) != 0) {
            json_decref(done);
            json_decref(part);
            continue;
        }
        json_object_set_new(files, f->rel,
                            json_pack("{s:s,s:I,s:o,s:o}", "etag", f->obj->etag, "size",
                                      (json_int_t)f->obj->size, "done", done, "part", part));
    }
    json_t *doc =
        files ? json_pack("{s:I,s:o}", "chunk", (json_int_t)c->chunk, "files", files) : NULL;
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    char p[PATH_MAX];
    mp_error e = {0};
    bool ok = text && snprintf(p, sizeof p, "%s/%s", c->tmp_dir, S3D_PARTIAL) < (int)sizeof p &&
              fs_write_atomic(p, text, strlen(text), &e) == 0;
    free(text);
    return ok;
}

/* A drain stopped the download: what arrived is kept for the job's next
 * run (the temp folder moves to partial_dir with its record). */
static void save_partial(s3d_ctx *c, const char *partial_dir) {
    bool ok = write_record(c);
    rm_tree(partial_dir);
    if (!ok || rename(c->tmp_dir, partial_dir) != 0) rm_tree(c->tmp_dir);
}

/* Without a chunk_bytes param: ranges of at least REMOTE_DEFAULT_CHUNK_BYTES,
 * grown so that each connection gets about one range of a big download
 * (at most 256 MiB). Every request costs a round trip and, on stores that
 * read the whole object to serve a range, a pass over the object. */
static uint64_t auto_chunk(const s3d_ctx *c, int conns) {
    uint64_t total = 0;
    for (size_t i = 0; i < c->nfiles; i++)
        if (!c->files[i].reused) total += c->files[i].obj->size;
    uint64_t per =
        (total / (uint64_t)(conns > 0 ? conns : 1) + (1u << 20) - 1) & ~((1ull << 20) - 1);
    if (per > (256ull << 20)) per = 256ull << 20;
    return per > REMOTE_DEFAULT_CHUNK_BYTES ? per : REMOTE_DEFAULT_CHUNK_BYTES;
}

/* Swaps the new folder in: RENAME_EXCHANGE with an existing copy (then the
 * old one is removed), else a plain rename. */
static int publish_dir(const char *tmp, const char *final_dir, mp_error *err) {
    if (mkparents(final_dir, err) != 0) return -1;
    if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final_dir, RENAME_NOREPLACE) == 0)
        return fs_sync_parent(final_dir, err);
    if (errno != EEXIST)
        return mp_err(err, "io_error", "publish %s: %s", final_dir, strerror(errno));
    if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final_dir, RENAME_EXCHANGE) != 0)
        return mp_err(err, "io_error", "replace %s: %s", final_dir, strerror(errno));
    rm_tree(tmp); /* now the old copy */
    return fs_sync_parent(final_dir, err);
}

static int write_provenance(s3d_ctx *c, json_t *files, mp_error *err) {
    json_t *doc = json_pack("{s:s,s:s,s:s,s:O}", "source", "s3", "bucket", c->o->src->bucket,
                            "prefix", c->o->src->prefix, "files", files);
    char *text = doc ? json_dumps(doc, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
    json_decref(doc);
    if (!text) return mp_err(err, "no_memory", "out of memory");
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/%s", c->tmp_dir, S3D_PROVENANCE);
    int rc = fs_write_atomic(p, text, strlen(text), err);
    free(text);
    return rc;
}

void remote_unstage_dir(const char *dir, int *fds, size_t n) {
    rm_tree(dir); /* links only: lstat does not follow them */
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0) {
            close(fds[i]);
            fds[i] = -1;
        }
}

/* Lists the prefix and sets up c->files for the chosen objects (borrowed
 * from *ls). */
static int list_and_choose(s3d_ctx *c, const char *prefix, s3_listing *ls, mp_error *err) {
    const remote_s3_download_opts *o = c->o;
    size_t *sel = NULL, nsel = 0;
    int rc = s3_list(c->s3, prefix, ls, err);
    if (rc == 0)
        remote_log(c->cb, "info", "s3://%s/%s: %zu objects in %zu pages", o->src->bucket,
                   o->src->prefix, ls->n, ls->pages);
    s3_pick pick = {o->src, o->load_format, o->allow, o->nallow, o->ignore, o->nignore};
    if (rc == 0) rc = s3_choose(c->s3, c->cb, &pick, ls, strlen(prefix), &sel, &nsel, err);
    if (rc == 0 && o->stage_dir && nsel > o->stage_max)
        rc = mp_err(err, "too_large", "%zu files to stage, room for %zu", nsel, o->stage_max);
    if (rc == 0 && !(c->files = calloc(nsel, sizeof *c->files)))
        rc = mp_err(err, "no_memory", "out of memory");
    if (rc == 0) {
        for (size_t i = 0; i < nsel; i++) {
            c->files[i].obj = &ls->objs[sel[i]];
            c->files[i].rel = ls->objs[sel[i]].key + strlen(prefix);
            c->files[i].fd = -1;
        }
        c->nfiles = nsel;
        rc = files_init(c, err);
    }
    free(sel);
    return rc;
}

/* The temp folder, with what can be taken over: files of an earlier copy
 * that still match (*old, its record) and ranges a drained run of this job
 * left in partial_dir (whose chunk size then wins). */
static int prepare_tmp(s3d_ctx *c, const char *final_dir, json_t **old, const char *partial_dir,
                       uint64_t *chunk, mp_error *err) {
    const remote_s3_download_opts *o = c->o;
    struct stat st;
    bool exists = !o->stage_dir && stat(final_dir, &st) == 0;
    if (exists) *old = old_record(final_dir);
    if (exists && !*old && !o->overwrite)
        return mp_err(err, "output_exists",
                      "%s exists and was not written by an s3 download; pass overwrite", final_dir);
    json_t *partial = NULL;
    if (!o->stage_dir) {
        char pp[PATH_MAX + 64], tp[PATH_MAX + 64];
        snprintf(pp, sizeof pp, "%s/%s", partial_dir, S3D_PARTIAL);
        snprintf(tp, sizeof tp, "%s/%s", c->tmp_dir, S3D_PARTIAL);
        /* A crash left the temp folder with its last record (a drain would
         * have moved it): that is what to resume from. */
        if (access(pp, F_OK) != 0 && access(tp, F_OK) == 0) {
            rm_tree(partial_dir);
            if (rename(c->tmp_dir, partial_dir) == 0)
                remote_log(c->cb, "info", "resuming what an interrupted run left on disk");
        }
        partial = json_load_file(pp, 0, NULL);
    }
    json_t *pc = json_object_get(partial, "chunk");
    if (partial && (!json_is_integer(pc) || json_integer_value(pc) < 1 ||
                    (o->chunk_bytes && (uint64_t)json_integer_value(pc) != o->chunk_bytes))) {
        json_decref(partial);
        partial = NULL;
    }
    if (partial) *chunk = (uint64_t)json_integer_value(pc);
    rm_tree(c->tmp_dir); /* an earlier, interrupted run of this job */
    int rc = fs_mkdirs(c->tmp_dir, err);
    if (rc == 0)
        rc = open_targets(c, final_dir, o->overwrite ? NULL : *old, partial, partial_dir, err);
    json_decref(partial);
    if (!o->stage_dir) rm_tree(partial_dir); /* what was not taken over is stale */
    return rc;
}

/* Ranges on `conns` connections, then the digests, checks and fsyncs. */
static int transfer(s3d_ctx *c, uint64_t chunk, int conns, uint64_t *total, uint64_t *resumed,
                    double *xfer_s, mp_error *err) {
    *xfer_s = 0;
    int rc = plan_chunks(c, chunk, total, resumed, err);
    if (rc == 0 && *resumed) {
        remote_log(c->cb, "info", "resuming: %llu bytes kept from the drained run",
                   (unsigned long long)*resumed);
        atomic_store(&c->done, *resumed);
        rc = hash_resumed(c, err);
    }
    double t = now_s();
    if (rc == 0 && c->nchunks > 0)
        rc = run_pool(c, conns < (int)c->nchunks ? conns : (int)c->nchunks, transfer_main,
                      c->nchunks, *total, err);
    *xfer_s = now_s() - t;
    if (rc == 0) {
        atomic_store(&c->next, 0);
        int ht = conns < (int)c->nfiles ? conns : (int)c->nfiles;
        rc = run_pool(c, ht > 0 ? ht : 1, hash_main, c->nfiles, *total, err);
    }
    return rc;
}

static void close_files(s3d_ctx *c) {
    for (size_t i = 0; i < c->nfiles; i++)
        if (c->files[i].fd >= 0) {
            close(c->files[i].fd);
            c->files[i].fd = -1;
        }
}

/* Publishes the folder (or hands the staged descriptors over) and builds
 * the result. */
static int finish(s3d_ctx *c, char *final_dir, size_t fdn, double t0, double xfer_s, uint64_t total,
                  uint64_t resumed, json_t **result, mp_error *err) {
    const remote_s3_download_opts *o = c->o;
    json_t *files = json_array();
    uint64_t reused = 0;
    for (size_t i = 0; files && i < c->nfiles; i++) {
        const s3d_file *f = &c->files[i];
        json_array_append_new(files, json_pack("{s:s,s:I,s:s,s:s,s:b,s:b}", "name", f->rel, "size",
                                               (json_int_t)f->obj->size, "etag", f->obj->etag,
                                               "sha256", f->sha256, "reused", f->reused,
                                               "store_checksum", f->store_sha256));
        if (f->reused) reused += f->obj->size;
    }
    int rc = files ? 0 : mp_err(err, "no_memory", "out of memory");
    if (rc == 0 && o->stage_dir) {
        /* staged: the descriptors go to the caller, nothing is published */
        for (size_t i = 0; i < c->nfiles; i++) {
            o->stage_fds[i] = c->files[i].fd;
            c->files[i].fd = -1;
        }
        *o->nstage_fds = c->nfiles;
        snprintf(final_dir, fdn, "%s", o->stage_dir);
    }
    if (rc == 0 && !o->stage_dir) {
        /* the resume record has done its work: not part of the copy */
        char rp[PATH_MAX + 64];
        snprintf(rp, sizeof rp, "%s/%s", c->tmp_dir, S3D_PARTIAL);
        if (unlink(rp) != 0 && errno != ENOENT)
            rc = mp_err(err, "io_error", "%s: %s", rp, strerror(errno));
    }
    if (rc == 0 && !o->stage_dir) rc = write_provenance(c, files, err);
    if (rc == 0 && !o->stage_dir) rc = fs_sync_parent(c->tmp_dir, err);
    close_files(c);
    if (rc == 0 && !o->stage_dir) rc = publish_dir(c->tmp_dir, final_dir, err);
    if (rc == 0) {
        uint64_t req = 0, retries = 0;
        s3_client_counts(c->s3, &req, &retries);
        char model[MREF_MAX_LEN + 80];
        snprintf(model, sizeof model, "s3://%s/%s", o->src->bucket, o->src->prefix);
        *result =
            json_pack("{s:s,s:s,s:O,s:I,s:I,s:I,s:f,s:f,s:f,s:I,s:I}", "model", model, "path",
                      final_dir, "files", files, "bytes_downloaded", (json_int_t)(total - resumed),
                      "bytes_resumed", (json_int_t)resumed, "bytes_reused", (json_int_t)reused,
                      "seconds", now_s() - t0, "transfer_seconds", xfer_s, "throughput_bytes_per_s",
                      xfer_s > 0 ? (double)(total - resumed) / xfer_s : 0.0, "requests",
                      (json_int_t)req, "retries", (json_int_t)retries);
        if (!*result) rc = mp_err(err, "no_memory", "out of memory");
    }
    json_decref(files);
    return rc;
}

int remote_s3_download(const remote_s3_download_opts *o, const remote_callbacks *cb,
                       json_t **result, mp_error *err) {
    *result = NULL;
    double t0 = now_s();
    if (!o->src || o->src->scheme != MREF_S3) return mp_err(err, "bad_param", "not an s3:// model");
    s3d_ctx c = {.o = o, .cb = cb};
    pthread_mutex_init(&c.mu, NULL);
    char final_dir[PATH_MAX], prefix[MREF_MAX_LEN + 2], partial_dir[PATH_MAX + 16] = "";
    s3_listing ls = {0};
    json_t *old = NULL;
    int rc = mref_remote_local_dir(o->data_dir, o->src, final_dir, sizeof final_dir, err);
    snprintf(prefix, sizeof prefix, "%s/", o->src->prefix);
    if (rc == 0) rc = s3_client_new(&o->where, o->src->bucket, &c.s3, err);
    if (rc == 0) s3_client_set_cancel(c.s3, cancelled_cb, &c);
    if (rc == 0) rc = list_and_choose(&c, prefix, &ls, err);
    if (rc == 0 && o->stage_dir)
        snprintf(c.tmp_dir, sizeof c.tmp_dir, "%s", o->stage_dir);
    else if (rc == 0 && snprintf(c.tmp_dir, sizeof c.tmp_dir, "%s/remote/.tmp/%s", o->data_dir,
                                 o->tmp_tag && *o->tmp_tag ? o->tmp_tag : "s3-download") >=
                            (int)sizeof c.tmp_dir)
        rc = mp_err(err, "bad_model", "temp path too long");
    if (rc == 0) snprintf(partial_dir, sizeof partial_dir, "%s.partial", c.tmp_dir);
    int conns = o->connections > 0 ? o->connections : REMOTE_DEFAULT_CONNECTIONS;
    uint64_t chunk = o->chunk_bytes ? o->chunk_bytes : auto_chunk(&c, conns);
    if (rc == 0) rc = prepare_tmp(&c, final_dir, &old, partial_dir, &chunk, err);
    c.chunk = chunk;
    uint64_t total = 0, resumed = 0;
    double xfer_s = 0;
    if (rc == 0) rc = transfer(&c, chunk, conns, &total, &resumed, &xfer_s, err);
    if (rc == 0)
        rc = finish(&c, final_dir, sizeof final_dir, t0, xfer_s, total, resumed, result, err);
    /* A drain keeps what arrived for the re-queued job; anything else that
     * failed leaves nothing behind. */
    bool keep = rc != 0 && !o->stage_dir && partial_dir[0] && strcmp(err->code, "cancelled") == 0 &&
                cb && cb->draining && cb->draining(cb->arg);
    if (keep) save_partial(&c, partial_dir);
    if (c.files) files_free(&c);
    if (rc != 0 && c.tmp_dir[0] && !keep) rm_tree(c.tmp_dir);
    json_decref(old);
    free(c.chunks);
    s3_listing_free(&ls);
    s3_client_free(c.s3);
    pthread_mutex_destroy(&c.mu);
    return rc;
}
