/*
 * hub_transfer.c - fetches blobs: many ranged GETs at once over one libcurl
 * multi handle, each written with pwrite at its offset into
 * blobs/<etag>.incomplete.
 *
 * A file larger than one chunk is first probed (HEAD on its resolve URL, no
 * redirect followed) to learn where its bytes live (the CDN URL of an LFS
 * file), then cut into chunks fetched in parallel from there; the token goes
 * only to the hub's own origin, as huggingface_hub does. Chunks are handed
 * out file by file, so files finish one after another and are hashed (in a
 * helper thread) while the next ones download.
 *
 * Completed chunks are recorded in blobs/<etag>.incomplete.ranges, which is
 * what a later run trusts: an interrupted transfer resumes with Range from the
 * byte where it stopped, and a run after a restart skips what the ranges file
 * names. A blob is renamed into place only once its size and hash match
 * (sha256 of LFS files, the git blob sha1 of the others).
 */
#include "loader/hub/hub_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/fsutil.h"
#include "util/timeutil.h"

enum { C_TODO, C_ACTIVE, C_DONE };
enum { F_NEED_PROBE, F_PROBING, F_READY, F_HASHING, F_DONE };

typedef struct chunk {
    uint64_t off, len, got, got_at_start;
    int state, attempts;
    double not_before;
} chunk;

typedef struct xfile {
    hub_file *f;
    int fd;
    char part[PATH_MAX], ranges[PATH_MAX], blob[PATH_MAX];
    char url[4096];
    char *data_url; /* where the bytes are; NULL: the resolve URL, redirects followed */
    bool data_auth;
    int state, probe_attempts, reprobes;
    double probe_not_before;
    chunk *chunks;
    size_t nchunks, ndone;
    bool resumed, restarted, collapse;
    /* hasher output */
    bool hash_ok;
    char hash_msg[200];
} xfile;

typedef struct conn {
    CURLM *multi; /* its worker's */
    CURL *e;
    struct curl_slist *hl;
    hub_hdrs h;
    xfile *xf;
    chunk *ck; /* NULL: a probe */
    bool busy, checked_status, no_range;
    char werr[160];
} conn;

/* ---- hasher thread --------------------------------------------------------- */

typedef struct hasher {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    xfile **queue;
    size_t qhead, qtail, qcap;
    xfile **done;
    size_t ndone;
    atomic_bool stop;
    bool started, no_fsync;
} hasher;

static void hash_file(hasher *hs, xfile *x) {
    x->hash_ok = false;
    unsigned char *buf = malloc(4u << 20);
    EVP_MD_CTX *s256 = EVP_MD_CTX_new(), *s1 = EVP_MD_CTX_new();
    if (!buf || !s256 || !s1 || !EVP_DigestInit_ex(s256, EVP_sha256(), NULL) ||
        !EVP_DigestInit_ex(s1, EVP_sha1(), NULL)) {
        snprintf(x->hash_msg, sizeof x->hash_msg, "out of memory");
        goto out;
    }
    if (!x->f->lfs) {
        /* git's blob id: sha1("blob <size>\0" + content) */
        char hdr[48];
        int n = snprintf(hdr, sizeof hdr, "blob %llu", (unsigned long long)x->f->size);
        EVP_DigestUpdate(s1, hdr, (size_t)n + 1);
    }
    uint64_t off = 0;
    while (off < x->f->size) {
        if (atomic_load(&hs->stop)) {
            snprintf(x->hash_msg, sizeof x->hash_msg, "cancelled");
            goto out;
        }
        size_t want = x->f->size - off < (4u << 20) ? (size_t)(x->f->size - off) : (4u << 20);
        ssize_t r = pread(x->fd, buf, want, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            snprintf(x->hash_msg, sizeof x->hash_msg, "read %.100s: %s", x->part,
                     r < 0 ? strerror(errno) : "short file");
            goto out;
        }
        EVP_DigestUpdate(s256, buf, (size_t)r);
        if (!x->f->lfs) EVP_DigestUpdate(s1, buf, (size_t)r);
        off += (uint64_t)r;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen;
    char hex[65];
    EVP_DigestFinal_ex(s256, md, &mdlen);
    fs_hex(md, mdlen, hex);
    if (x->f->lfs) {
        if (strcmp(hex, x->f->sha256) != 0) {
            snprintf(x->hash_msg, sizeof x->hash_msg, "sha256 %.16s... != advertised %.16s...", hex,
                     x->f->sha256);
            goto out;
        }
    } else {
        char h1[65];
        EVP_DigestFinal_ex(s1, md, &mdlen);
        fs_hex(md, mdlen, h1);
        if (strcmp(h1, x->f->etag) != 0) {
            snprintf(x->hash_msg, sizeof x->hash_msg, "git blob id %.12s... != advertised %.12s...",
                     h1, x->f->etag);
            goto out;
        }
        memcpy(x->f->sha256, hex, 65);
    }
    if (!hs->no_fsync && fdatasync(x->fd) != 0) {
        snprintf(x->hash_msg, sizeof x->hash_msg, "fsync %.100s: %s", x->part, strerror(errno));
        goto out;
    }
    x->hash_ok = true;
out:
    free(buf);
    EVP_MD_CTX_free(s256);
    EVP_MD_CTX_free(s1);
}

static void *hasher_main(void *arg) {
    hasher *hs = arg;
    pthread_mutex_lock(&hs->mu);
    for (;;) {
        while (hs->qhead == hs->qtail && !atomic_load(&hs->stop))
            pthread_cond_wait(&hs->cv, &hs->mu);
        if (atomic_load(&hs->stop)) break;
        xfile *x = hs->queue[hs->qhead++];
        pthread_mutex_unlock(&hs->mu);
        hash_file(hs, x);
        pthread_mutex_lock(&hs->mu);
        hs->done[hs->ndone++] = x;
    }
    pthread_mutex_unlock(&hs->mu);
    return NULL;
}

/* ---- ranges file ----------------------------------------------------------- */

static void ranges_load(xfile *x) {
    FILE *fp = fopen(x->ranges, "r");
    if (!fp) return;
    unsigned long long off, len;
    char line[128];
    while (fgets(line, sizeof line, fp)) {
        if (!strchr(line, '\n')) break; /* a torn last line */
        if (sscanf(line, "%llu %llu", &off, &len) != 2) continue;
        if (off > x->f->size || len > x->f->size - off) continue;
        for (size_t i = 0; i < x->nchunks; i++) {
            chunk *c = &x->chunks[i];
            if (c->state == C_DONE) continue;
            if (off <= c->off && c->off + c->len <= off + len) {
                c->state = C_DONE;
                c->got = c->len;
                x->ndone++;
                x->resumed = true;
            } else if (off == c->off && len > c->got && len < c->len) {
                c->got = len; /* the head of a chunk an earlier run was fetching */
                x->resumed = true;
            }
        }
    }
    fclose(fp);
}

static void ranges_append(xfile *x, const chunk *c) {
    char line[64];
    int n = snprintf(line, sizeof line, "%llu %llu\n", (unsigned long long)c->off,
                     (unsigned long long)c->got);
    int fd = open(x->ranges, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return; /* only costs a re-download after a restart */
    if (write(fd, line, (size_t)n) != n) {
        /* same: a lost record only means refetching that chunk */
    }
    close(fd);
}

/* ---- the transfer state ------------------------------------------------------ */

/* Shared by the worker threads (each runs its own multi handle over its
 * share of the connections, so receiving and writing use several cores)
 * and the coordinating thread. mu guards files, chunks and the error; a
 * chunk's `got` is also advanced by the worker that owns the chunk's
 * transfer, with atomics, so progress can be read at any time. */
typedef struct xfer {
    const hub_xfer_opts *o;
    xfile *files;
    size_t nfiles;
    pthread_mutex_t mu;
    hasher hs;
    uint64_t seed;
    hub_xfer_stats *stats;
    atomic_bool stop;
    bool failed;
    mp_error err;
    /* hub_transfer's own: the workers and the connections they share */
    struct worker *ws;
    int nworkers;
    conn *conns;
    int nconns;
} xfer;

typedef struct worker {
    xfer *t;
    CURLM *multi;
    conn *conns;
    int nconns;
    pthread_t th;
    bool started;
} worker;

static void chunks_init(xfile *x, uint64_t chunk_bytes) {
    for (size_t i = 0; i < x->nchunks; i++) {
        chunk *c = &x->chunks[i];
        c->off = (uint64_t)i * chunk_bytes;
        c->len = x->f->size - c->off < chunk_bytes ? x->f->size - c->off : chunk_bytes;
        c->got = 0;
        c->state = C_TODO;
        c->attempts = 0;
        c->not_before = 0;
    }
    x->ndone = 0;
}

static int xfile_open(xfer *t, xfile *x, mp_error *err) {
    const hub_xfer_opts *o = t->o;
    char qpath[3 * HUB_MAX_PATH + 1];
    if (hub_url_quote(qpath, sizeof qpath, x->f->name, true) != 0)
        return mp_err(err, "unsafe_path", "path too long");
    int w1 = snprintf(x->part, sizeof x->part, "%s/%s.incomplete", o->blobs_dir, x->f->etag);
    int w2 =
        snprintf(x->ranges, sizeof x->ranges, "%s/%s.incomplete.ranges", o->blobs_dir, x->f->etag);
    int w3 = snprintf(x->blob, sizeof x->blob, "%s/%s", o->blobs_dir, x->f->etag);
    int w4 = snprintf(x->url, sizeof x->url, "%s/%s/resolve/%s/%s", o->conn.endpoint, o->repo,
                      o->commit, qpath);
    if (w1 < 0 || w2 < 0 || w3 < 0 || w4 < 0 || (size_t)w2 >= sizeof x->ranges ||
        (size_t)w4 >= sizeof x->url)
        return mp_err(err, "bad_path", "path too long for %s", x->f->name);
    uint64_t cb = o->chunk_bytes;
    x->nchunks = x->f->size == 0 ? 0 : (size_t)((x->f->size + cb - 1) / cb);
    x->chunks = calloc(x->nchunks ? x->nchunks : 1, sizeof *x->chunks);
    if (!x->chunks) return mp_err(err, "internal", "out of memory");
    chunks_init(x, cb);
    x->fd = open(x->part, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (x->fd < 0) return mp_err(err, "io_error", "open %s: %s", x->part, strerror(errno));
    struct stat st;
    if (fstat(x->fd, &st) != 0) return mp_err(err, "io_error", "stat %s", x->part);
    if (access(x->ranges, F_OK) == 0 && (uint64_t)st.st_size <= x->f->size) {
        ranges_load(x);
    } else {
        /* bytes without a ranges record cannot be trusted: start over */
        unlink(x->ranges);
        if (ftruncate(x->fd, 0) != 0) return mp_err(err, "io_error", "truncate %s", x->part);
    }
    for (size_t i = 0; i < x->nchunks; i++)
        t->stats->resumed += x->chunks[i].got;
    x->state = x->nchunks > 1 ? F_NEED_PROBE : F_READY;
    return 0;
}

/* Hands a finished file to the hasher. */
static void to_hasher(xfer *t, xfile *x) {
    x->state = F_HASHING;
    pthread_mutex_lock(&t->hs.mu);
    t->hs.queue[t->hs.qtail++] = x;
    pthread_cond_signal(&t->hs.cv);
    pthread_mutex_unlock(&t->hs.mu);
}

/* ---- curl callbacks ------------------------------------------------------------ */

static size_t chunk_write(char *d, size_t sz, size_t n, void *arg) {
    conn *c = arg;
    size_t len = sz * n;
    chunk *ck = c->ck;
    xfile *x = c->xf;
    if (!c->checked_status) {
        long status = 0;
        curl_easy_getinfo(c->e, CURLINFO_RESPONSE_CODE, &status);
        c->checked_status = true;
        if (status == 206) {
            uint64_t a, b, total;
            if (hub_parse_content_range(c->h.content_range, &a, &b, &total) != 0 ||
                a != ck->off + ck->got || total != x->f->size || b > ck->off + ck->len - 1) {
                snprintf(c->werr, sizeof c->werr, "unexpected Content-Range \"%.60s\"",
                         c->h.content_range);
                return 0;
            }
        } else if (status == 200) {
            if (ck->off + ck->got != 0 || ck->len != x->f->size) {
                /* the server ignored Range: fall back to one whole-file stream */
                c->no_range = true;
                return 0;
            }
        } else {
            c->werr[0] = 0;
        }
    }
    long status = 0;
    curl_easy_getinfo(c->e, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200 && status != 206) return len; /* an error page: drop it */
    if (ck->got + len > ck->len) {
        snprintf(c->werr, sizeof c->werr, "server sent more bytes than requested");
        return 0;
    }
    size_t left = len;
    const char *p = d;
    while (left > 0) {
        ssize_t w = pwrite(x->fd, p, left, (off_t)(ck->off + ck->got));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            snprintf(c->werr, sizeof c->werr, "write %.100s: %s", x->part,
                     w < 0 ? strerror(errno) : "no space");
            return 0;
        }
        p += w;
        left -= (size_t)w;
        __atomic_fetch_add(&ck->got, (uint64_t)w, __ATOMIC_RELAXED);
    }
    return len;
}

static size_t discard_write(char *d, size_t sz, size_t n, void *arg) {
    (void)d;
    (void)arg;
    return sz * n;
}

static int conn_start(xfer *t, conn *c, xfile *x, chunk *ck, mp_error *err) {
    const hub_xfer_opts *o = t->o;
    curl_easy_reset(c->e);
    curl_slist_free_all(c->hl);
    c->hl = NULL;
    bool probe = ck == NULL;
    const char *url = (!probe && x->data_url) ? x->data_url : x->url;
    bool auth = (!probe && x->data_url) ? x->data_auth : true;
    if (hub_curl_setup(c->e, &o->conn, auth, &c->hl, err) != 0) return -1;
    hub_hdrs_reset(&c->h);
    c->xf = x;
    c->ck = ck;
    c->checked_status = false;
    c->no_range = false;
    c->werr[0] = 0;
    curl_easy_setopt(c->e, CURLOPT_URL, url);
    curl_easy_setopt(c->e, CURLOPT_PRIVATE, c);
    curl_easy_setopt(c->e, CURLOPT_HEADERFUNCTION, hub_header_cb);
    curl_easy_setopt(c->e, CURLOPT_HEADERDATA, &c->h);
    if (probe) {
        curl_easy_setopt(c->e, CURLOPT_NOBODY, 1L);
        curl_easy_setopt(c->e, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(c->e, CURLOPT_WRITEFUNCTION, discard_write);
        curl_easy_setopt(c->e, CURLOPT_TIMEOUT, 60L);
        x->state = F_PROBING;
    } else {
        char range[64];
        snprintf(range, sizeof range, "%llu-%llu", (unsigned long long)(ck->off + ck->got),
                 (unsigned long long)(ck->off + ck->len - 1));
        curl_easy_setopt(c->e, CURLOPT_RANGE, range);
        /* also from the CDN URL, which may redirect again; libcurl drops
         * the Authorization header when a redirect leaves the origin */
        curl_easy_setopt(c->e, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(c->e, CURLOPT_WRITEFUNCTION, chunk_write);
        curl_easy_setopt(c->e, CURLOPT_WRITEDATA, c);
        curl_easy_setopt(c->e, CURLOPT_BUFFERSIZE, 512L * 1024);
        ck->state = C_ACTIVE;
        ck->got_at_start = ck->got;
    }
    if (curl_multi_add_handle(c->multi, c->e) != CURLM_OK)
        return mp_err(err, "internal", "curl_multi_add_handle failed");
    c->busy = true;
    return 0;
}

/* Picks the next thing to do for a free connection: a probe or a chunk, in
 * file order. Returns 1 when something was started. */
static int schedule_one(xfer *t, conn *c, double now, mp_error *err) {
    for (size_t i = 0; i < t->nfiles; i++) {
        xfile *x = &t->files[i];
        if (x->state == F_NEED_PROBE) {
            if (now < x->probe_not_before) continue;
            return conn_start(t, c, x, NULL, err) == 0 ? 1 : -1;
        }
        if (x->state != F_READY || x->collapse) continue;
        for (size_t k = 0; k < x->nchunks; k++) {
            chunk *ck = &x->chunks[k];
            if (ck->state == C_TODO && now >= ck->not_before)
                return conn_start(t, c, x, ck, err) == 0 ? 1 : -1;
        }
    }
    return 0;
}

/* A failed attempt: retry after a backoff, or give up with a code. */
static int retry_or_fail(xfer *t, int *attempts, double *not_before, long status, CURLcode cc,
                         const hub_hdrs *h, const char *what, mp_error *err) {
    (*attempts)++;
    if (*attempts > t->o->conn.max_retries) {
        if (cc != CURLE_OK)
            return mp_err(err, "network_error", "%s: %s (after %d attempts)", what,
                          curl_easy_strerror(cc), *attempts);
        return mp_err(err, "hub_unavailable", "%s: HTTP %ld (after %d attempts)", what, status,
                      *attempts);
    }
    double wait = cc == CURLE_OK
                      ? hub_parse_retry_after(h->retry_after[0] ? h->retry_after : NULL, time(NULL))
                      : -1;
    if (wait < 0) wait = hub_backoff_s(*attempts - 1, t->o->conn.backoff_base_s, &t->seed);
    *not_before = time_mono() + wait;
    return 0;
}

static int probe_done(xfer *t, conn *c, CURLcode cc, mp_error *err) {
    xfile *x = c->xf;
    long status = 0;
    curl_easy_getinfo(c->e, CURLINFO_RESPONSE_CODE, &status);
    x->state = F_NEED_PROBE;
    if (cc == CURLE_OK && (status == 200 || (status >= 300 && status < 400))) {
        char et[65];
        const char *raw = c->h.linked_etag[0] ? c->h.linked_etag : c->h.etag;
        if (raw[0] && hub_normalize_etag(raw, et, sizeof et) && strcmp(et, x->f->etag) != 0)
            return mp_err(err, "bad_response", "%s: hub etag %s differs from the listing's %s",
                          x->f->name, et, x->f->etag);
        if (c->h.linked_size >= 0 && (uint64_t)c->h.linked_size != x->f->size)
            return mp_err(err, "bad_response", "%s: hub size %lld differs from the listing's %llu",
                          x->f->name, c->h.linked_size, (unsigned long long)x->f->size);
        free(x->data_url);
        x->data_url = NULL;
        if (status == 200) {
            x->data_url = strdup(x->url);
            x->data_auth = true;
        } else {
            char *loc = NULL;
            curl_easy_getinfo(c->e, CURLINFO_REDIRECT_URL, &loc);
            if (!loc)
                return mp_err(err, "bad_response", "%s: redirect without Location", x->f->name);
            x->data_url = strdup(loc);
            x->data_auth = hub_same_origin(x->url, loc);
        }
        if (!x->data_url) return mp_err(err, "internal", "out of memory");
        x->state = F_READY;
        return 0;
    }
    if (cc == CURLE_OK) {
        const char *code = hub_error_code(status, c->h.x_error_code, false);
        if (code)
            return mp_err(err, code, "%s: hub answered HTTP %ld %s%s", x->f->name, status,
                          c->h.x_error_code,
                          hub_error_hint(code, t->o->conn.token && *t->o->conn.token));
    }
    return retry_or_fail(t, &x->probe_attempts, &x->probe_not_before, status, cc, &c->h, x->f->name,
                         err);
}

static int chunk_done(xfer *t, conn *c, CURLcode cc, mp_error *err) {
    xfile *x = c->xf;
    chunk *ck = c->ck;
    long status = 0;
    curl_easy_getinfo(c->e, CURLINFO_RESPONSE_CODE, &status);
    ck->state = C_TODO;
    if (c->no_range) x->collapse = true;
    if (x->collapse) {
        /* the server does not do ranges: one chunk for the whole file, once
         * the other requests on it have ended */
        for (size_t k = 0; k < x->nchunks; k++)
            if (x->chunks[k].state == C_ACTIVE) return 0;
        x->nchunks = 1;
        chunks_init(x, x->f->size);
        unlink(x->ranges);
        x->collapse = false;
        return 0;
    }
    if (cc == CURLE_OK && (status == 200 || status == 206) && ck->got == ck->len) {
        ck->state = C_DONE;
        x->ndone++;
        ranges_append(x, ck);
        if (x->ndone == x->nchunks) to_hasher(t, x);
        return 0;
    }
    if (c->werr[0] && cc == CURLE_WRITE_ERROR) {
        if (strncmp(c->werr, "write ", 6) == 0) return mp_err(err, "io_error", "%s", c->werr);
        return mp_err(err, "bad_response", "%s: %s", x->f->name, c->werr);
    }
    if (cc == CURLE_OK && status != 200 && status != 206) {
        const char *code = hub_error_code(status, c->h.x_error_code, false);
        if (code && x->data_url && x->reprobes < 2 &&
            (status == 401 || status == 403 || status == 404)) {
            /* a signed CDN URL may have expired: ask the hub again */
            x->reprobes++;
            x->state = F_NEED_PROBE;
            return 0;
        }
        if (code)
            return mp_err(
                err, code, "%s: HTTP %ld %s%s", x->f->name, status, c->h.x_error_code,
                hub_error_hint(code, x->data_auth && t->o->conn.token && *t->o->conn.token));
    }
    /* a cut connection, a timeout, a 5xx or 429: retry the rest of the chunk.
     * An attempt that moved the chunk forward does not count against it. */
    if (ck->got > ck->got_at_start) ck->attempts = 0;
    return retry_or_fail(t, &ck->attempts, &ck->not_before, status, cc, &c->h, x->f->name, err);
}

/* Moves a verified blob into place, or handles a mismatch. */
static int hashed(xfer *t, xfile *x, mp_error *err) {
    if (x->hash_ok) {
        if (rename(x->part, x->blob) != 0)
            return mp_err(err, "io_error", "rename %s: %s", x->blob, strerror(errno));
        if (fs_sync_parent(x->blob, err) != 0) return -1;
        unlink(x->ranges);
        close(x->fd);
        x->fd = -1;
        x->state = F_DONE;
        return 0;
    }
    if (strncmp(x->hash_msg, "sha256", 6) != 0 && strncmp(x->hash_msg, "git", 3) != 0)
        return mp_err(err, "io_error", "%s: %s", x->f->name, x->hash_msg);
    if (x->resumed && !x->restarted) {
        /* bytes kept from an earlier run may be stale: fetch it all once more */
        x->restarted = true;
        x->resumed = false;
        unlink(x->ranges);
        if (ftruncate(x->fd, 0) != 0) return mp_err(err, "io_error", "truncate %s", x->part);
        chunks_init(x, t->o->chunk_bytes);
        x->state = x->nchunks > 1 && x->data_url == NULL ? F_NEED_PROBE : F_READY;
        return 0;
    }
    unlink(x->part);
    unlink(x->ranges);
    return mp_err(err, "checksum_mismatch", "%s: %s", x->f->name, x->hash_msg);
}

static uint64_t bytes_on_disk(const xfer *t) {
    uint64_t s = 0;
    /* Also called on the way out of a failed xfer_init. */
    for (size_t i = 0; t->files && i < t->nfiles; i++) {
        const xfile *x = &t->files[i];
        for (size_t k = 0; x->chunks && k < x->nchunks; k++)
            s += __atomic_load_n(&x->chunks[k].got, __ATOMIC_RELAXED);
    }
    return s;
}

/* Records the first failure and stops everyone. Called with t->mu held. */
static void fail_locked(xfer *t, const mp_error *e) {
    if (!t->failed) {
        t->failed = true;
        t->err = *e;
    }
    atomic_store(&t->stop, true);
}

static void *worker_main(void *arg) {
    worker *w = arg;
    xfer *t = w->t;
    mp_error e;
    while (!atomic_load(&t->stop)) {
        pthread_mutex_lock(&t->mu);
        double now = time_mono();
        for (int i = 0; i < w->nconns && !t->failed; i++) {
            if (w->conns[i].busy) continue;
            int r = schedule_one(t, &w->conns[i], now, &e);
            if (r < 0) fail_locked(t, &e);
            if (r <= 0) break;
        }
        pthread_mutex_unlock(&t->mu);
        int running = 0;
        if (curl_multi_perform(w->multi, &running) != CURLM_OK) {
            mp_err(&e, "internal", "curl_multi_perform failed");
            pthread_mutex_lock(&t->mu);
            fail_locked(t, &e);
            pthread_mutex_unlock(&t->mu);
            break;
        }
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(w->multi, &left))) {
            if (m->msg != CURLMSG_DONE) continue;
            conn *c = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&c);
            CURLcode cc = m->data.result;
            curl_multi_remove_handle(w->multi, c->e);
            c->busy = false;
            if (c->ck && cc == CURLE_OK && c->ck->got > c->ck->got_at_start && !t->o->no_fsync) {
                /* start writing the chunk back now, so that the fsync before
                 * the blob's rename finds little left to do */
                sync_file_range(c->xf->fd, (off64_t)(c->ck->off + c->ck->got_at_start),
                                (off64_t)(c->ck->got - c->ck->got_at_start), SYNC_FILE_RANGE_WRITE);
            }
            pthread_mutex_lock(&t->mu);
            int r = c->ck ? chunk_done(t, c, cc, &e) : probe_done(t, c, cc, &e);
            if (r != 0) fail_locked(t, &e);
            pthread_mutex_unlock(&t->mu);
        }
        curl_multi_poll(w->multi, NULL, 0, 20, NULL);
    }
    /* abandon what is in flight; chunk_done never runs for these */
    pthread_mutex_lock(&t->mu);
    for (int i = 0; i < w->nconns; i++) {
        conn *c = &w->conns[i];
        if (!c->busy) continue;
        curl_multi_remove_handle(w->multi, c->e);
        c->busy = false;
        if (c->ck) c->ck->state = C_TODO;
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static int worker_count(int connections) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n = cpus > 0 ? (int)cpus : 1;
    if (n > 8) n = 8;
    return n < connections ? n : connections;
}

/* The transfer's arrays and locks (the locks whatever happens: xfer_free
 * destroys them). */
static int xfer_init(xfer *t, size_t n, mp_error *err) {
    const hub_xfer_opts *o = t->o;
    t->nconns = o->connections > 0 ? o->connections : HUB_DEFAULT_CONNECTIONS;
    t->nworkers = worker_count(t->nconns);
    t->ws = calloc((size_t)t->nworkers, sizeof *t->ws);
    t->conns = calloc((size_t)t->nconns, sizeof *t->conns);
    t->files = calloc(n ? n : 1, sizeof *t->files);
    t->hs.queue = calloc(n ? n * 2 : 1, sizeof *t->hs.queue);
    t->hs.done = calloc(n ? n * 2 : 1, sizeof *t->hs.done);
    t->hs.qcap = n * 2;
    t->hs.no_fsync = o->no_fsync;
    pthread_mutex_init(&t->mu, NULL);
    pthread_mutex_init(&t->hs.mu, NULL);
    pthread_cond_init(&t->hs.cv, NULL);
    if (!t->ws || !t->conns || !t->files || !t->hs.queue || !t->hs.done)
        return mp_err(err, "internal", "out of memory");
    for (size_t i = 0; i < n; i++)
        t->files[i].fd = -1;
    return 0;
}

/* Shares the connections out over the workers: a multi handle per worker,
 * an easy handle per connection. */
static int xfer_curl_init(xfer *t, mp_error *err) {
    for (int i = 0, next = 0; i < t->nworkers; i++) {
        worker *w = &t->ws[i];
        w->t = t;
        w->conns = t->conns + next;
        w->nconns = t->nconns / t->nworkers + (i < t->nconns % t->nworkers);
        next += w->nconns;
        if (!(w->multi = curl_multi_init()))
            return mp_err(err, "internal", "curl_multi_init failed");
        for (int k = 0; k < w->nconns; k++) {
            w->conns[k].multi = w->multi;
            if (!(w->conns[k].e = curl_easy_init()))
                return mp_err(err, "internal", "curl_easy_init failed");
        }
    }
    return 0;
}

/* Opens each file's .incomplete; one that is whole already goes straight
 * to the hasher. */
static int xfer_open_files(xfer *t, hub_file *files, const size_t *idx, mp_error *err) {
    for (size_t i = 0; i < t->nfiles; i++) {
        t->files[i].f = &files[idx[i]];
        if (xfile_open(t, &t->files[i], err) != 0) return -1;
        if (t->files[i].nchunks == t->files[i].ndone) to_hasher(t, &t->files[i]);
    }
    return 0;
}

static int start_workers(xfer *t, mp_error *err) {
    for (int i = 0; i < t->nworkers; i++) {
        if (pthread_create(&t->ws[i].th, NULL, worker_main, &t->ws[i]) != 0) {
            mp_err(err, "internal", "cannot start a download thread");
            atomic_store(&t->stop, true);
            return -1;
        }
        t->ws[i].started = true;
    }
    return 0;
}

/* Coordinates until every file is verified and in place: progress, cancel,
 * and the files the hasher is done with. */
static int xfer_wait(xfer *t, mp_error *err) {
    const hub_xfer_opts *o = t->o;
    size_t ndone_files = 0;
    while (ndone_files < t->nfiles) {
        if (o->progress && o->progress(o->progress_arg, bytes_on_disk(t)) != 0)
            return mp_err(err, "cancelled", "cancelled");
        xfile *got[64];
        size_t ng = 0;
        pthread_mutex_lock(&t->hs.mu);
        while (t->hs.ndone > 0 && ng < 64)
            got[ng++] = t->hs.done[--t->hs.ndone];
        pthread_mutex_unlock(&t->hs.mu);
        pthread_mutex_lock(&t->mu);
        for (size_t i = 0; i < ng && !t->failed; i++) {
            mp_error e;
            if (hashed(t, got[i], &e) != 0)
                fail_locked(t, &e);
            else if (got[i]->state == F_DONE)
                ndone_files++;
        }
        bool failed = t->failed;
        if (failed) *err = t->err;
        pthread_mutex_unlock(&t->mu);
        if (failed) return -1;
        if (ndone_files < t->nfiles) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    return 0;
}

/* Stops and joins the workers, then the hasher. */
static void xfer_stop(xfer *t) {
    atomic_store(&t->stop, true);
    for (int i = 0; t->ws && i < t->nworkers; i++)
        if (t->ws[i].started) pthread_join(t->ws[i].th, NULL);
    if (t->hs.started) {
        pthread_mutex_lock(&t->hs.mu);
        atomic_store(&t->hs.stop, true);
        pthread_cond_signal(&t->hs.cv);
        pthread_mutex_unlock(&t->hs.mu);
        pthread_join(t->hs.th, NULL);
    }
}

/* Keeps what partial chunks hold for the next run (cancel, drain, error). */
static void keep_partial_chunks(xfer *t) {
    for (size_t i = 0; t->files && i < t->nfiles; i++) {
        xfile *x = &t->files[i];
        if (x->fd < 0 || x->state == F_DONE || x->state == F_HASHING) continue;
        for (size_t k = 0; k < x->nchunks; k++)
            if (x->chunks[k].state != C_DONE && x->chunks[k].got > x->chunks[k].got_at_start)
                ranges_append(x, &x->chunks[k]);
    }
}

static void xfer_free(xfer *t) {
    for (int i = 0; t->conns && i < t->nconns; i++) {
        if (t->conns[i].e) curl_easy_cleanup(t->conns[i].e);
        curl_slist_free_all(t->conns[i].hl);
    }
    for (int i = 0; t->ws && i < t->nworkers; i++)
        if (t->ws[i].multi) curl_multi_cleanup(t->ws[i].multi);
    for (size_t i = 0; t->files && i < t->nfiles; i++) {
        if (t->files[i].fd >= 0) close(t->files[i].fd);
        free(t->files[i].chunks);
        free(t->files[i].data_url);
    }
    pthread_mutex_destroy(&t->mu);
    pthread_mutex_destroy(&t->hs.mu);
    pthread_cond_destroy(&t->hs.cv);
    free(t->files);
    free(t->conns);
    free(t->ws);
    free(t->hs.queue);
    free(t->hs.done);
}

int hub_transfer(const hub_xfer_opts *o, hub_file *files, const size_t *idx, size_t n,
                 hub_xfer_stats *stats, mp_error *err) {
    xfer t = {.o = o, .nfiles = n, .stats = stats};
    t.seed = (uint64_t)time(NULL) * 2654435761u ^ (uint64_t)getpid();
    int rc = -1;
    uint64_t disk0 = 0;
    memset(stats, 0, sizeof *stats);
    if (xfer_init(&t, n, err) != 0 || xfer_curl_init(&t, err) != 0) goto out;
    if (pthread_create(&t.hs.th, NULL, hasher_main, &t.hs) != 0) {
        mp_err(err, "internal", "cannot start the hash thread");
        goto out;
    }
    t.hs.started = true;
    if (xfer_open_files(&t, files, idx, err) != 0) goto out;
    disk0 = bytes_on_disk(&t);
    if (start_workers(&t, err) != 0 || xfer_wait(&t, err) != 0) goto out;
    if (o->progress) o->progress(o->progress_arg, bytes_on_disk(&t));
    rc = 0;
out:
    xfer_stop(&t);
    stats->downloaded = bytes_on_disk(&t) > disk0 ? bytes_on_disk(&t) - disk0 : 0;
    if (rc != 0) keep_partial_chunks(&t);
    xfer_free(&t);
    return rc;
}
