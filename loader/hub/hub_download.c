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

int hub_download(const hub_download_opts *o, const hub_callbacks *cb, json_t **result,
                 mp_error *err) {
    double t0 = time_mono();
    *result = NULL;
    dl d = {.o = o, .cb = cb};
    const char *revision = o->revision && *o->revision ? o->revision : "main";
    if (!hub_repo_id_valid(o->repo))
        return mp_err_field(err, "model", "bad_request", "not a hub repo id: %.200s", o->repo);
    if (!hub_path_safe(revision, strlen(revision)) || strlen(revision) > 255)
        return mp_err_field(err, "revision", "bad_request", "invalid revision");
    if (!o->cache_dir || !*o->cache_dir) return mp_err(err, "internal", "no hub cache directory");

    char endpoint[2048];
    const char *ep = o->endpoint && *o->endpoint ? o->endpoint : HUB_DEFAULT_ENDPOINT;
    if (strlen(ep) >= sizeof endpoint)
        return mp_err_field(err, "endpoint", "bad_request", "endpoint too long");
    if (strncmp(ep, "http://", 7) != 0 && strncmp(ep, "https://", 8) != 0)
        return mp_err_field(err, "endpoint", "bad_request", "endpoint must be an http(s) URL");
    strcpy(endpoint, ep);
    for (size_t n = strlen(endpoint); n > 0 && endpoint[n - 1] == '/'; n--)
        endpoint[n - 1] = 0;

    hub_conn_opts conn = {
        .endpoint = endpoint,
        .token = o->token,
        .max_retries = o->max_retries >= 0 ? o->max_retries : HUB_DEFAULT_MAX_RETRIES,
        .backoff_base_s = o->backoff_base_s > 0 ? o->backoff_base_s : 0.3,
        .cancel = dl_cancelled,
        .cancel_arg = &d,
    };
    uint64_t chunk = o->chunk_bytes ? o->chunk_bytes : HUB_DEFAULT_CHUNK_BYTES;
    if (chunk < HUB_MIN_CHUNK_BYTES) chunk = HUB_MIN_CHUNK_BYTES;

    bool pinned = o->pin_commit && hub_is_commit(o->pin_commit);
    hub_listing l = {0};
    if (hub_fetch_listing(&conn, o->repo, pinned ? o->pin_commit : revision, &l, err) != 0)
        return -1;
    d.commit = l.commit;
    logf_(&d, "info", "%s@%s is commit %s (%zu files)", o->repo, revision, l.commit, l.nfiles);

    char repo_dir[PATH_MAX], blobs[PATH_MAX + 8], snap[PATH_MAX + 64];
    int rc = -1, lock_fd = -1;
    size_t *idx = NULL, *primary = NULL; /* primary[i]: 1 + the file whose blob i shares */
    char *index_text = NULL;
    bool *fetched = NULL;
    json_t *files = NULL;
    if (hub_repo_dir(repo_dir, sizeof repo_dir, o->cache_dir, o->repo, err) != 0) goto out;
    snprintf(blobs, sizeof blobs, "%s/blobs", repo_dir);
    snprintf(snap, sizeof snap, "%s/snapshots/%s", repo_dir, l.commit);
    if (fs_mkdirs(blobs, err) != 0) goto out;

    lock_fd = hub_lock_repo(o->cache_dir, o->repo, dl_cancelled, &d, err);
    if (lock_fd < 0) goto out;
    if (cb && cb->checkpoint) cb->checkpoint(cb->arg, l.commit, 0);

    idx = calloc(l.nfiles ? l.nfiles : 1, sizeof *idx);
    fetched = calloc(l.nfiles ? l.nfiles : 1, sizeof *fetched);
    primary = calloc(l.nfiles ? l.nfiles : 1, sizeof *primary);
    if (!idx || !fetched || !primary) {
        mp_err(err, "internal", "out of memory");
        goto out;
    }
    hub_xfer_opts xo = {.conn = conn,
                        .repo = o->repo,
                        .commit = l.commit,
                        .blobs_dir = blobs,
                        .connections =
                            o->connections > 0 ? o->connections : HUB_DEFAULT_CONNECTIONS,
                        .chunk_bytes = chunk,
                        .no_fsync = o->no_fsync};
    hub_xfer_stats stats = {0};

    bool needs_index = false;
    if (hub_select_files(&l, o->load_format, o->allow, o->nallow, o->ignore, o->nignore, NULL,
                         &needs_index, err) != 0)
        goto out;
    if (needs_index) {
        /* SGLang reads the index to drop shards it does not name: fetch it first */
        size_t k = 0;
        while (k < l.nfiles && strcmp(l.files[k].name, HUB_SAFE_INDEX) != 0)
            k++;
        if (l.files[k].size > (64u << 20)) {
            mp_err(err, "bad_response", "%s is implausibly large", HUB_SAFE_INDEX);
            goto out;
        }
        if (!blob_present(blobs, &l.files[k])) {
            d.total = l.files[k].size;
            if (fetch_batch(&d, &xo, &l, &k, 1, &stats, err) != 0) goto out;
            fetched[k] = true;
        }
        char path[PATH_MAX + 128];
        size_t len;
        snprintf(path, sizeof path, "%s/%s", blobs, l.files[k].etag);
        if (fs_read_all(path, 64u << 20, &index_text, &len, err) != 0) goto out;
        if (hub_select_files(&l, o->load_format, o->allow, o->nallow, o->ignore, o->nignore,
                             index_text, &needs_index, err) != 0)
            goto out;
    }

    /* what the cache already has, what must come over the network */
    uint64_t reused = 0, need = 0, dups = 0;
    size_t n = 0;
    d.total = 0;
    for (size_t i = 0; i < l.nfiles; i++) {
        hub_file *f = &l.files[i];
        if (!f->selected) continue;
        if (__builtin_add_overflow(d.total, f->size, &d.total)) {
            mp_err(err, "bad_response", "sizes overflow");
            goto out;
        }
        if (fetched[i]) continue;
        if (blob_present(blobs, f)) {
            reused += f->size;
            if (!f->lfs) {
                char path[PATH_MAX + 128];
                snprintf(path, sizeof path, "%s/%s", blobs, f->etag);
                if (fs_sha256_file(path, f->sha256, NULL, NULL, err) != 0) goto out;
            }
            continue;
        }
        idx[n++] = i;
    }
    /* Files with the same bytes (empty files, copies) share one blob: fetch
     * it once and copy its sha256 to the others afterwards. */
    if (n > 1) {
        ekey *keys = calloc(n, sizeof *keys);
        if (!keys) {
            mp_err(err, "internal", "out of memory");
            goto out;
        }
        for (size_t k = 0; k < n; k++)
            keys[k] = (ekey){l.files[idx[k]].etag, idx[k]};
        qsort(keys, n, sizeof *keys, cmp_ekey);
        size_t m = 0;
        for (size_t k = 0; k < n; k++) {
            if (k > 0 && strcmp(keys[k].etag, keys[m - 1].etag) == 0) {
                primary[keys[k].i] = keys[m - 1].i + 1;
                dups += l.files[keys[k].i].size;
                continue;
            }
            keys[m++] = keys[k];
        }
        for (size_t k = 0; k < m; k++)
            idx[k] = keys[k].i;
        n = m;
        free(keys);
        qsort(idx, n, sizeof *idx, cmp_size);
    }
    for (size_t k = 0; k < n; k++)
        need += l.files[idx[k]].size - partial_bytes(blobs, &l.files[idx[k]]);
    uint64_t free_b = 0;
    if (hub_free_bytes(blobs, &free_b, err) != 0) goto out;
    if (hub_check_space(need, free_b, blobs, err) != 0) goto out;
    logf_(&d, "info", "%zu files to fetch (%llu bytes), %llu bytes already cached", n,
          (unsigned long long)need, (unsigned long long)reused);
    d.base_done = reused + dups;
    for (size_t i = 0; i < l.nfiles; i++)
        if (fetched[i] && l.files[i].selected) d.base_done += l.files[i].size;
    if (fetch_batch(&d, &xo, &l, idx, n, &stats, err) != 0) goto out;
    if (stats.resumed)
        logf_(&d, "info", "resumed %llu bytes from an earlier run",
              (unsigned long long)stats.resumed);

    for (size_t i = 0; i < l.nfiles; i++)
        if (primary[i])
            memcpy(l.files[i].sha256, l.files[primary[i] - 1].sha256, sizeof l.files[i].sha256);
    reused += dups;

    /* publish: every blob is verified and in place */
    files = json_array();
    if (!files) {
        mp_err(err, "internal", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < l.nfiles; i++) {
        hub_file *f = &l.files[i];
        if (!f->selected) continue;
        if (hub_publish_link(repo_dir, l.commit, f->name, f->etag, err) != 0) goto out;
        json_array_append_new(files, json_pack("{s:s,s:I,s:s}", "name", f->name, "size",
                                               (json_int_t)f->size, "sha256", f->sha256));
    }
    if (strcmp(revision, l.commit) != 0 && hub_write_ref(repo_dir, revision, l.commit, err) != 0)
        goto out;
    fs_sync_parent(snap);
    *result = json_pack("{s:s,s:s,s:s,s:o,s:I,s:I,s:I,s:f}", "commit", l.commit, "revision",
                        revision, "path", snap, "files", files, "bytes_downloaded",
                        (json_int_t)stats.downloaded, "bytes_reused", (json_int_t)reused,
                        "bytes_resumed", (json_int_t)stats.resumed, "seconds", time_mono() - t0);
    files = NULL;
    if (!*result) {
        mp_err(err, "internal", "out of memory");
        goto out;
    }
    if (cb && cb->progress) cb->progress(cb->arg, d.total, d.total, "done");
    rc = 0;
out:
    json_decref(files);
    if (lock_fd >= 0) close(lock_fd);
    free(index_text);
    free(idx);
    free(primary);
    free(fetched);
    hub_listing_free(&l);
    return rc;
}
