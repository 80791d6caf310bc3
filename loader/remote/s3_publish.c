/* s3_publish.c - a local model folder to s3://bucket/prefix (see remote.h).
 *
 * Readers are told when a model is whole by REMOTE_MANIFEST, which is
 * deleted first when a model is replaced and written last: a fleet node
 * that waits for the manifest never pulls half a model. Files up to
 * part_bytes go in one PUT; bigger ones as a multipart upload whose parts
 * are read, hashed and sent by `connections` threads side by side. Every
 * body carries its x-amz-checksum-sha256 so the store verifies what it got;
 * the manifest records each file's size and sha256 for readers to verify. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/remote/remote_internal.h"
#include "util/fsutil.h"

#define S3P_MAX_FILES 100000
#define S3P_MAX_PARTS 10000 /* S3's limit */

typedef struct s3p_file {
    char *rel;
    char *path;
    uint64_t size;
    char sha256[65];
    char etag[80];
    int parts;
} s3p_file;

typedef struct s3p_ctx {
    const remote_s3_publish_opts *o;
    const remote_callbacks *cb;
    s3_client *s3;
    s3p_file *files;
    size_t nfiles, cap;
    atomic_uint_least64_t done;
    uint64_t total;
} s3p_ctx;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static bool stopped(const s3p_ctx *c) {
    return c->cb && c->cb->cancelled && c->cb->cancelled(c->cb->arg);
}

static bool cancel_hook(void *arg) {
    return stopped(arg);
}

static int walk(s3p_ctx *c, const char *dir, const char *rel, int depth, mp_error *err) {
    DIR *d = opendir(dir);
    if (!d) return mp_err(err, "io_error", "%s: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[PATH_MAX], r[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path ||
            snprintf(r, sizeof r, "%s%s%s", rel, *rel ? "/" : "", e->d_name) >= (int)sizeof r)
            continue;
        struct stat st;
        if (stat(path, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            if (depth < 8) rc = walk(c, path, r, depth + 1, err);
            continue;
        }
        if (!S_ISREG(st.st_mode) || strcmp(r, REMOTE_MANIFEST) == 0) continue;
        if (!hub_path_safe(r, strlen(r))) continue;
        if (c->nfiles >= S3P_MAX_FILES) {
            rc = mp_err(err, "too_large", "more than %d files", S3P_MAX_FILES);
            break;
        }
        if (c->nfiles == c->cap) {
            size_t nc = c->cap ? c->cap * 2 : 64;
            s3p_file *nf = realloc(c->files, nc * sizeof *nf);
            if (!nf) {
                rc = mp_err(err, "no_memory", "out of memory");
                break;
            }
            c->files = nf;
            c->cap = nc;
        }
        s3p_file *f = &c->files[c->nfiles];
        memset(f, 0, sizeof *f);
        f->rel = strdup(r);
        f->path = strdup(path);
        f->size = (uint64_t)st.st_size;
        if (!f->rel || !f->path) {
            free(f->rel);
            free(f->path);
            rc = mp_err(err, "no_memory", "out of memory");
            break;
        }
        c->nfiles++;
        c->total += f->size;
    }
    closedir(d);
    return rc;
}

static int key_of(const s3p_ctx *c, const char *rel, char *key, size_t n, mp_error *err) {
    if (snprintf(key, n, "%s/%s", c->o->dst->prefix, rel) >= (int)n)
        return mp_err(err, "bad_param", "%s: key too long", rel);
    return 0;
}

static int read_at(int fd, void *buf, size_t len, uint64_t off, const char *what, mp_error *err) {
    char *b = buf;
    while (len > 0) {
        ssize_t r = pread(fd, b, len, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            return mp_err(err, "io_error", "%s: %s", what, r < 0 ? strerror(errno) : "shrank");
        b += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static void sha_b64(const void *p, size_t n, unsigned char md[32], char *b64) {
    SHA256(p, n, md);
    s3_base64(md, 32, b64);
}

/* ---- multipart ---------------------------------------------------------------- */

typedef struct mpu {
    s3p_ctx *c;
    s3p_file *f;
    int fd;
    const char *key;
    const char *upload_id;
    uint64_t part_bytes;
    int nparts;
    char (*etags)[80];
    char (*sums)[48];
    atomic_int next;
    atomic_bool failed;
    pthread_mutex_t mu;
    mp_error err;
} mpu;

static void *mpu_main(void *arg) {
    mpu *m = arg;
    unsigned char *buf = malloc(m->part_bytes);
    for (;;) {
        int i = atomic_fetch_add(&m->next, 1);
        if (i >= m->nparts || atomic_load(&m->failed)) break;
        mp_error e = {0};
        uint64_t off = (uint64_t)i * m->part_bytes;
        size_t len = (size_t)(m->f->size - off < m->part_bytes ? m->f->size - off : m->part_bytes);
        unsigned char md[32];
        int rc = buf ? 0 : mp_err(&e, "no_memory", "out of memory for a part");
        if (rc == 0) rc = read_at(m->fd, buf, len, off, m->f->rel, &e);
        if (rc == 0) {
            sha_b64(buf, len, md, m->sums[i]);
            rc = s3_mpu_part(m->c->s3, m->key, m->upload_id, i + 1, buf, len, m->sums[i],
                             m->etags[i], sizeof m->etags[i], &e);
        }
        if (rc != 0) {
            pthread_mutex_lock(&m->mu);
            if (!atomic_load(&m->failed)) {
                m->err = e;
                atomic_store(&m->failed, true);
            }
            pthread_mutex_unlock(&m->mu);
            break;
        }
        atomic_fetch_add(&m->c->done, len);
    }
    free(buf);
    return NULL;
}

/* The sha256 of the whole file for the manifest (parts carry their own). */
static int file_sha256(s3p_file *f, mp_error *err) {
    return fs_sha256_file(f->path, f->sha256, NULL, NULL, err);
}

static int put_multipart(s3p_ctx *c, s3p_file *f, int fd, const char *key, mp_error *err) {
    uint64_t part = c->o->part_bytes ? c->o->part_bytes : REMOTE_DEFAULT_PART_BYTES;
    if (part < REMOTE_MIN_PART_BYTES) part = REMOTE_MIN_PART_BYTES;
    while ((f->size + part - 1) / part > S3P_MAX_PARTS)
        part *= 2;
    mpu m = {.c = c, .f = f, .fd = fd, .key = key, .part_bytes = part};
    m.nparts = (int)((f->size + part - 1) / part);
    m.etags = calloc((size_t)m.nparts, sizeof *m.etags);
    m.sums = calloc((size_t)m.nparts, sizeof *m.sums);
    pthread_mutex_init(&m.mu, NULL);
    char upload_id[1024];
    int rc = (!m.etags || !m.sums) ? mp_err(err, "no_memory", "out of memory") : 0;
    if (rc == 0) rc = s3_mpu_create(c->s3, key, upload_id, sizeof upload_id, err);
    bool created = rc == 0;
    if (rc == 0) {
        m.upload_id = upload_id;
        int conns = c->o->connections > 0 ? c->o->connections : 4;
        if (conns > m.nparts) conns = m.nparts;
        pthread_t th[64];
        int started = 0;
        for (int i = 0; i < conns && i < 64; i++)
            if (pthread_create(&th[i], NULL, mpu_main, &m) == 0) started++;
        if (started == 0) rc = mp_err(err, "internal", "cannot start upload threads");
        /* progress from this thread while the parts go */
        while (rc == 0) {
            int nx = atomic_load(&m.next);
            if (nx >= m.nparts + started || atomic_load(&m.failed)) break;
            if (c->cb && c->cb->progress &&
                c->cb->progress(c->cb->arg, atomic_load(&c->done), c->total, "uploading to s3"))
                atomic_store(&m.failed, true); /* the workers stop; the error is "cancelled" */
            struct timespec ts = {0, 50 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        for (int i = 0; i < started; i++)
            pthread_join(th[i], NULL);
        if (rc == 0 && atomic_load(&m.failed))
            rc = m.err.code[0] ? (*err = m.err, -1) : mp_err(err, "cancelled", "cancelled");
    }
    if (rc == 0) rc = file_sha256(f, err);
    if (rc == 0)
        rc = s3_mpu_complete(c->s3, key, upload_id, m.nparts, m.etags, m.sums, f->etag,
                             sizeof f->etag, err);
    if (rc != 0 && created) s3_mpu_abort(c->s3, key, upload_id);
    f->parts = m.nparts;
    free(m.etags);
    free(m.sums);
    pthread_mutex_destroy(&m.mu);
    return rc;
}

static int put_file(s3p_ctx *c, s3p_file *f, mp_error *err) {
    char key[MREF_MAX_LEN + PATH_MAX];
    if (key_of(c, f->rel, key, sizeof key, err) != 0) return -1;
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mp_err(err, "io_error", "%s: %s", f->path, strerror(errno));
    uint64_t part = c->o->part_bytes ? c->o->part_bytes : REMOTE_DEFAULT_PART_BYTES;
    int rc;
    if (f->size > part) {
        rc = put_multipart(c, f, fd, key, err);
    } else {
        unsigned char *buf = malloc(f->size ? f->size : 1), md[32];
        char b64[48];
        rc = buf ? read_at(fd, buf, f->size, 0, f->rel, err)
                 : mp_err(err, "no_memory", "out of memory");
        if (rc == 0) {
            sha_b64(buf, f->size, md, b64);
            fs_hex(md, 32, f->sha256);
            rc = s3_put(c->s3, key, buf, f->size, b64, f->etag, sizeof f->etag, err);
        }
        free(buf);
        if (rc == 0) atomic_fetch_add(&c->done, f->size);
        f->parts = 1;
    }
    close(fd);
    if (rc != 0) return mp_err_wrap(err, NULL, "%s", f->rel);
    return 0;
}

static int put_manifest(s3p_ctx *c, json_t *files, mp_error *err) {
    char now[40];
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(now, sizeof now, "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *doc = json_pack("{s:s,s:s?,s:s,s:O}", "format", "modelprep-s3-manifest/1",
                            "source_model", c->o->source_model, "created_at", now, "files", files);
    char *text = doc ? json_dumps(doc, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
    json_decref(doc);
    if (!text) return mp_err(err, "no_memory", "out of memory");
    char key[MREF_MAX_LEN + 64], b64[48];
    unsigned char md[32];
    int rc = key_of(c, REMOTE_MANIFEST, key, sizeof key, err);
    if (rc == 0) {
        sha_b64(text, strlen(text), md, b64);
        rc = s3_put(c->s3, key, text, strlen(text), b64, NULL, 0, err);
    }
    free(text);
    return rc;
}

int remote_s3_publish(const remote_s3_publish_opts *o, const remote_callbacks *cb, json_t **result,
                      mp_error *err) {
    *result = NULL;
    double t0 = now_s();
    if (!o->dst || o->dst->scheme != MREF_S3) return mp_err(err, "bad_param", "not an s3:// url");
    s3p_ctx c = {.o = o, .cb = cb};
    char mkey[MREF_MAX_LEN + 64];
    json_t *files = NULL;
    int rc = key_of(&c, REMOTE_MANIFEST, mkey, sizeof mkey, err);
    if (rc == 0) rc = s3_client_new(&o->where, o->dst->bucket, &c.s3, err);
    if (rc == 0) s3_client_set_cancel(c.s3, cancel_hook, &c);
    if (rc == 0) rc = walk(&c, o->model_dir, "", 0, err);
    if (rc == 0 && c.nfiles == 0) rc = mp_err(err, "not_found", "%s has no files", o->model_dir);
    if (rc == 0) {
        uint64_t sz;
        mp_error e2 = {0};
        int h = s3_head(c.s3, mkey, &sz, NULL, 0, NULL, 0, &e2);
        if (h == 0 && !o->overwrite)
            rc = mp_err(err, "output_exists",
                        "s3://%s/%s already holds a published model; pass overwrite to replace it",
                        o->dst->bucket, o->dst->prefix);
        else if (h == 0)
            rc = s3_delete(c.s3, mkey, err); /* readers stop trusting the old model first */
        else if (strcmp(e2.code, "not_found") != 0) {
            *err = e2;
            rc = -1;
        }
    }
    for (size_t i = 0; rc == 0 && i < c.nfiles; i++) {
        if (stopped(&c)) rc = mp_err(err, "cancelled", "cancelled");
        if (rc == 0) rc = put_file(&c, &c.files[i], err);
        if (rc == 0 && cb && cb->progress &&
            cb->progress(cb->arg, atomic_load(&c.done), c.total, "uploading to s3"))
            rc = mp_err(err, "cancelled", "cancelled");
    }
    if (rc == 0) {
        files = json_array();
        for (size_t i = 0; files && i < c.nfiles; i++)
            json_array_append_new(files, json_pack("{s:s,s:I,s:s,s:s,s:i}", "name", c.files[i].rel,
                                                   "size", (json_int_t)c.files[i].size, "sha256",
                                                   c.files[i].sha256, "etag", c.files[i].etag,
                                                   "parts", c.files[i].parts));
        rc = files ? put_manifest(&c, files, err) : mp_err(err, "no_memory", "out of memory");
    }
    if (rc == 0) {
        double secs = now_s() - t0;
        char url[MREF_MAX_LEN + 80];
        snprintf(url, sizeof url, "s3://%s/%s", o->dst->bucket, o->dst->prefix);
        *result = json_pack("{s:s,s:s,s:O,s:I,s:f,s:f}", "url", url, "manifest", REMOTE_MANIFEST,
                            "files", files, "bytes", (json_int_t)c.total, "seconds", secs,
                            "throughput_bytes_per_s", secs > 0 ? (double)c.total / secs : 0.0);
        if (!*result) rc = mp_err(err, "no_memory", "out of memory");
    }
    json_decref(files);
    for (size_t i = 0; i < c.nfiles; i++) {
        free(c.files[i].rel);
        free(c.files[i].path);
    }
    free(c.files);
    s3_client_free(c.s3);
    return rc;
}
