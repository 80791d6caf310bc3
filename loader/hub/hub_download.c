/*
 * hub_download.c - one repo snapshot from the hub into the cache: resolve the
 * revision to a commit and list its files, choose the files, take the repo's
 * lock, check free space, fetch what the cache lacks, and only then publish
 * snapshots/<commit>/ and refs/<revision>, so a failed or cancelled download
 * never leaves a partial snapshot behind.
 */
#include "loader/hub/hub.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/fsutil.h"
#include "util/timeutil.h"

typedef struct dl {
    const hub_download_opts *o;
    const hub_callbacks *cb;
    uint64_t base_done; /* bytes counted before the current transfer batch */
    uint64_t total;
    double last_ckpt;
    const char *commit;
    /* hub_download's steps */
    hub_listing l;
    char repo_dir[PATH_MAX], blobs[PATH_MAX + 8], snap[PATH_MAX + 64];
    int lock_fd; /* the repo's lock, -1 */
    hub_xfer_opts xo;
    hub_xfer_stats stats;
    size_t *idx, n;  /* the files to fetch */
    size_t *primary; /* primary[i]: 1 + the file whose blob i shares */
    bool *fetched;   /* came over the network before the main batch */
    char *index_text;
    uint64_t reused, dups;
} dl;

static void logf_(const dl *d, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void logf_(const dl *d, const char *level, const char *fmt, ...) {
    if (!d->cb || !d->cb->log) return;
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    d->cb->log(d->cb->arg, level, msg);
}

static bool dl_cancelled(void *arg) {
    const dl *d = arg;
    return d->cb && d->cb->cancelled && d->cb->cancelled(d->cb->arg);
}

static int dl_progress(void *arg, uint64_t bytes) {
    dl *d = arg;
    if (dl_cancelled(d)) return 1;
    uint64_t done = d->base_done + bytes;
    if (d->cb && d->cb->progress && d->cb->progress(d->cb->arg, done, d->total, "downloading"))
        return 1;
    double now = time_mono();
    if (d->cb && d->cb->checkpoint && d->commit && now - d->last_ckpt > 2.0) {
        d->last_ckpt = now;
        d->cb->checkpoint(d->cb->arg, d->commit, done);
    }
    return 0;
}

static bool blob_present(const char *blobs, const hub_file *f) {
    char path[PATH_MAX + 128];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", blobs, f->etag);
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size == f->size;
}

static uint64_t partial_bytes(const char *blobs, const hub_file *f) {
    char path[PATH_MAX + 128];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s.incomplete", blobs, f->etag);
    return stat(path, &st) == 0 && (uint64_t)st.st_size <= f->size ? (uint64_t)st.st_size : 0;
}

typedef struct ekey {
    const char *etag;
    size_t i;
} ekey;

static int cmp_ekey(const void *a, const void *b) {
    const ekey *x = a, *y = b;
    int c = strcmp(x->etag, y->etag);
    return c ? c : (x->i > y->i) - (x->i < y->i);
}

static int cmp_size(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return (x > y) - (x < y);
}

static int fetch_batch(dl *d, hub_xfer_opts *xo, hub_listing *l, const size_t *idx, size_t n,
                       hub_xfer_stats *acc, mp_error *err) {
    if (n == 0) return 0;
    hub_xfer_stats st;
    xo->progress = dl_progress;
    xo->progress_arg = d;
    int rc = hub_transfer(xo, l->files, idx, n, &st, err);
    acc->downloaded += st.downloaded;
    acc->resumed += st.resumed;
    return rc;
}

/* The endpoint, checked, without trailing '/'. */
static int dl_endpoint(const hub_download_opts *o, char *endpoint, size_t cap, mp_error *err) {
    const char *ep = o->endpoint && *o->endpoint ? o->endpoint : HUB_DEFAULT_ENDPOINT;
    if (strlen(ep) >= cap) return mp_err_field(err, "endpoint", "bad_request", "endpoint too long");
    if (strncmp(ep, "http://", 7) != 0 && strncmp(ep, "https://", 8) != 0)
        return mp_err_field(err, "endpoint", "bad_request", "endpoint must be an http(s) URL");
    strcpy(endpoint, ep);
    for (size_t n = strlen(endpoint); n > 0 && endpoint[n - 1] == '/'; n--)
        endpoint[n - 1] = 0;
    return 0;
}

/* The repo's cache folders and lock, and the per-file state of the fetch. */
static int dl_prepare(dl *d, const hub_conn_opts *conn, mp_error *err) {
    const hub_download_opts *o = d->o;
    const hub_listing *l = &d->l;
    if (hub_repo_dir(d->repo_dir, sizeof d->repo_dir, o->cache_dir, o->repo, err) != 0) return -1;
    snprintf(d->blobs, sizeof d->blobs, "%s/blobs", d->repo_dir);
    snprintf(d->snap, sizeof d->snap, "%s/snapshots/%s", d->repo_dir, l->commit);
    if (fs_mkdirs(d->blobs, err) != 0) return -1;

    d->lock_fd = hub_lock_repo(o->cache_dir, o->repo, dl_cancelled, d, err);
    if (d->lock_fd < 0) return -1;
    if (d->cb && d->cb->checkpoint) d->cb->checkpoint(d->cb->arg, l->commit, 0);

    d->idx = calloc(l->nfiles ? l->nfiles : 1, sizeof *d->idx);
    d->fetched = calloc(l->nfiles ? l->nfiles : 1, sizeof *d->fetched);
    d->primary = calloc(l->nfiles ? l->nfiles : 1, sizeof *d->primary);
    if (!d->idx || !d->fetched || !d->primary) return mp_err(err, "internal", "out of memory");
    uint64_t chunk = o->chunk_bytes ? o->chunk_bytes : HUB_DEFAULT_CHUNK_BYTES;
    if (chunk < HUB_MIN_CHUNK_BYTES) chunk = HUB_MIN_CHUNK_BYTES;
    d->xo = (hub_xfer_opts){.conn = *conn,
                            .repo = o->repo,
                            .commit = l->commit,
                            .blobs_dir = d->blobs,
                            .connections =
                                o->connections > 0 ? o->connections : HUB_DEFAULT_CONNECTIONS,
                            .chunk_bytes = chunk,
                            .no_fsync = o->no_fsync};
    return 0;
}

/* Chooses the files. With a safetensors index, SGLang reads it to drop the
 * shards it does not name: fetch it first, then choose again. */
static int dl_select(dl *d, mp_error *err) {
    const hub_download_opts *o = d->o;
    hub_listing *l = &d->l;
    bool needs_index = false;
    if (hub_select_files(l, o->load_format, o->allow, o->nallow, o->ignore, o->nignore, NULL,
                         &needs_index, err) != 0)
        return -1;
    if (!needs_index) return 0;
    size_t k = 0;
    while (k < l->nfiles && strcmp(l->files[k].name, HUB_SAFE_INDEX) != 0)
        k++;
    /* hub_select_files asks for the index only when the listing has it;
     * checked again here because the listing came from the network. */
    if (k == l->nfiles)
        return mp_err(err, "bad_response", "the listing names no %s", HUB_SAFE_INDEX);
    if (l->files[k].size > (64u << 20))
        return mp_err(err, "bad_response", "%s is implausibly large", HUB_SAFE_INDEX);
    if (!blob_present(d->blobs, &l->files[k])) {
        d->total = l->files[k].size;
        if (fetch_batch(d, &d->xo, l, &k, 1, &d->stats, err) != 0) return -1;
        d->fetched[k] = true;
    }
    char path[PATH_MAX + 128];
    size_t len;
    snprintf(path, sizeof path, "%s/%s", d->blobs, l->files[k].etag);
    if (fs_read_all(path, 64u << 20, &d->index_text, &len, err) != 0) return -1;
    if (hub_select_files(l, o->load_format, o->allow, o->nallow, o->ignore, o->nignore,
                         d->index_text, &needs_index, err) != 0)
        return -1;
    return 0;
}

/* Files with the same bytes (empty files, copies) share one blob: fetch it
 * once and copy its sha256 to the others afterwards (dl_fetch). Leaves
 * idx[0..n) one file per blob, smallest first. */
static int dl_dedup(dl *d, mp_error *err) {
    if (d->n <= 1) return 0;
    const hub_listing *l = &d->l;
    size_t n = d->n;
    ekey *keys = calloc(n, sizeof *keys);
    if (!keys) return mp_err(err, "internal", "out of memory");
    for (size_t k = 0; k < n; k++)
        keys[k] = (ekey){l->files[d->idx[k]].etag, d->idx[k]};
    qsort(keys, n, sizeof *keys, cmp_ekey);
    size_t m = 0;
    for (size_t k = 0; k < n; k++) {
        if (k > 0 && strcmp(keys[k].etag, keys[m - 1].etag) == 0) {
            d->primary[keys[k].i] = keys[m - 1].i + 1;
            d->dups += l->files[keys[k].i].size;
            continue;
        }
        keys[m++] = keys[k];
    }
    for (size_t k = 0; k < m; k++)
        d->idx[k] = keys[k].i;
    d->n = m;
    free(keys);
    qsort(d->idx, d->n, sizeof *d->idx, cmp_size);
    return 0;
}

/* What the cache already has (reused; the sha256 of a cached regular file
 * is computed here) and what must come over the network: idx[0..n). */
static int dl_plan_fetch(dl *d, mp_error *err) {
    hub_listing *l = &d->l;
    d->total = 0;
    for (size_t i = 0; i < l->nfiles; i++) {
        hub_file *f = &l->files[i];
        if (!f->selected) continue;
        if (__builtin_add_overflow(d->total, f->size, &d->total))
            return mp_err(err, "bad_response", "sizes overflow");
        if (d->fetched[i]) continue;
        if (blob_present(d->blobs, f)) {
            d->reused += f->size;
            if (!f->lfs) {
                char path[PATH_MAX + 128];
                snprintf(path, sizeof path, "%s/%s", d->blobs, f->etag);
                if (fs_sha256_file(path, f->sha256, NULL, NULL, err) != 0) return -1;
            }
            continue;
        }
        d->idx[d->n++] = i;
    }
    return dl_dedup(d, err);
}

/* Fetches idx[0..n) once the disk has room for them, then gives each file
 * that shares a blob the blob's sha256. */
static int dl_fetch(dl *d, mp_error *err) {
    hub_listing *l = &d->l;
    uint64_t need = 0;
    for (size_t k = 0; k < d->n; k++)
        need += l->files[d->idx[k]].size - partial_bytes(d->blobs, &l->files[d->idx[k]]);
    uint64_t free_b = 0;
    if (hub_free_bytes(d->blobs, &free_b, err) != 0) return -1;
    if (hub_check_space(need, free_b, d->blobs, err) != 0) return -1;
    logf_(d, "info", "%zu files to fetch (%llu bytes), %llu bytes already cached", d->n,
          (unsigned long long)need, (unsigned long long)d->reused);
    d->base_done = d->reused + d->dups;
    for (size_t i = 0; i < l->nfiles; i++)
        if (d->fetched[i] && l->files[i].selected) d->base_done += l->files[i].size;
    if (fetch_batch(d, &d->xo, l, d->idx, d->n, &d->stats, err) != 0) return -1;
    if (d->stats.resumed)
        logf_(d, "info", "resumed %llu bytes from an earlier run",
              (unsigned long long)d->stats.resumed);

    for (size_t i = 0; i < l->nfiles; i++)
        if (d->primary[i])
            memcpy(l->files[i].sha256, l->files[d->primary[i] - 1].sha256,
                   sizeof l->files[i].sha256);
    d->reused += d->dups;
    return 0;
}

/* Publish: every blob is verified and in place; link snapshots/<commit>/
 * and write refs/<revision>. */
static int dl_publish(dl *d, const char *revision, double t0, json_t **result, mp_error *err) {
    const hub_listing *l = &d->l;
    json_t *files = json_array();
    if (!files) return mp_err(err, "internal", "out of memory");
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < l->nfiles; i++) {
        const hub_file *f = &l->files[i];
        if (!f->selected) continue;
        rc = hub_publish_link(d->repo_dir, l->commit, f->name, f->etag, err);
        if (rc == 0)
            json_array_append_new(files, json_pack("{s:s,s:I,s:s}", "name", f->name, "size",
                                                   (json_int_t)f->size, "sha256", f->sha256));
    }
    if (rc == 0 && strcmp(revision, l->commit) != 0)
        rc = hub_write_ref(d->repo_dir, revision, l->commit, err);
    if (rc != 0) {
        json_decref(files);
        return -1;
    }
    if (fs_sync_parent(d->snap, err) != 0) {
        json_decref(files);
        return -1;
    }
    *result = json_pack("{s:s,s:s,s:s,s:o,s:I,s:I,s:I,s:f}", "commit", l->commit, "revision",
                        revision, "path", d->snap, "files", files, "bytes_downloaded",
                        (json_int_t)d->stats.downloaded, "bytes_reused", (json_int_t)d->reused,
                        "bytes_resumed", (json_int_t)d->stats.resumed, "seconds", time_mono() - t0);
    if (!*result) return mp_err(err, "internal", "out of memory");
    if (d->cb && d->cb->progress) d->cb->progress(d->cb->arg, d->total, d->total, "done");
    return 0;
}

int hub_download(const hub_download_opts *o, const hub_callbacks *cb, json_t **result,
                 mp_error *err) {
    double t0 = time_mono();
    *result = NULL;
    dl d = {.o = o, .cb = cb, .lock_fd = -1};
    const char *revision = o->revision && *o->revision ? o->revision : "main";
    if (!hub_repo_id_valid(o->repo))
        return mp_err_field(err, "model", "bad_request", "not a hub repo id: %.200s", o->repo);
    if (!hub_path_safe(revision, strlen(revision)) || strlen(revision) > 255)
        return mp_err_field(err, "revision", "bad_request", "invalid revision");
    if (!o->cache_dir || !*o->cache_dir) return mp_err(err, "internal", "no hub cache directory");

    char endpoint[2048];
    if (dl_endpoint(o, endpoint, sizeof endpoint, err) != 0) return -1;
    hub_conn_opts conn = {
        .endpoint = endpoint,
        .token = o->token,
        .max_retries = o->max_retries >= 0 ? o->max_retries : HUB_DEFAULT_MAX_RETRIES,
        .backoff_base_s = o->backoff_base_s > 0 ? o->backoff_base_s : 0.3,
        .cancel = dl_cancelled,
        .cancel_arg = &d,
    };

    bool pinned = o->pin_commit && hub_is_commit(o->pin_commit);
    if (hub_fetch_listing(&conn, o->repo, pinned ? o->pin_commit : revision, &d.l, err) != 0)
        return -1;
    d.commit = d.l.commit;
    logf_(&d, "info", "%s@%s is commit %s (%zu files)", o->repo, revision, d.l.commit, d.l.nfiles);

    int rc = -1;
    if (dl_prepare(&d, &conn, err) == 0 && dl_select(&d, err) == 0 && dl_plan_fetch(&d, err) == 0 &&
        dl_fetch(&d, err) == 0 && dl_publish(&d, revision, t0, result, err) == 0)
        rc = 0;
    if (d.lock_fd >= 0) close(d.lock_fd);
    free(d.index_text);
    free(d.idx);
    free(d.primary);
    free(d.fetched);
    hub_listing_free(&d.l);
    return rc;
}
