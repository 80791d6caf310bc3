/*
 * hub.h - a Hugging Face Hub client that fills the huggingface_hub cache
 * layout (models--org--name/{blobs,snapshots,refs}) so that huggingface_hub,
 * transformers and SGLang can use the result offline as it is.
 *
 * The pieces, each in its own file:
 *   hub_select.c   which files of a repo to fetch (load_format as SGLang
 *                  picks weights, fnmatch patterns with huggingface_hub's
 *                  semantics, path safety)
 *   hub_cache.c    cache paths, the per-repo lock, refs, snapshot links
 *   hub_http.c     the hub's endpoints and error mapping, retry policy
 *   hub_transfer.c parallel ranged downloads into blobs/<etag>.incomplete
 *   hub_download.c the whole job: resolve, select, lock, fetch, verify,
 *                  publish, result
 * job_download.c adapts hub_download() to the job machinery (util/task.h).
 */
#ifndef MP_LOADER_HUB_H
#define MP_LOADER_HUB_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "util/error.h"

#define HUB_DEFAULT_ENDPOINT "https://huggingface.co"
#define HUB_DEFAULT_CONNECTIONS 8
#define HUB_DEFAULT_CHUNK_BYTES (32ull << 20)
#define HUB_MIN_CHUNK_BYTES (64ull << 10)
#define HUB_DEFAULT_MAX_RETRIES 5
#define HUB_MAX_PATH 1024 /* longest repo path we accept from the hub */

typedef enum hub_load_format {
    HUB_FMT_AUTO,
    HUB_FMT_SAFETENSORS,
    HUB_FMT_PT,
    HUB_FMT_GGUF,
    HUB_FMT_ALL,
} hub_load_format;

/* One entry of the hub's file listing (siblings of ?blobs=true). */
typedef struct hub_file {
    char *name; /* path in the repo, checked by hub_path_safe() */
    uint64_t size;
    char etag[65];   /* blob name in the cache: lfs sha256 or git blob sha1 */
    char sha256[65]; /* known sha256 (LFS), else "" until hashed */
    bool lfs;
    bool selected;
} hub_file;

typedef struct hub_listing {
    char commit[41];
    hub_file *files;
    size_t nfiles;
} hub_listing;

void hub_listing_free(hub_listing *l);

/* ---- hub_select.c (pure) ------------------------------------------------- */

/* Python's fnmatch.fnmatchcase: '*' and '?' cross '/', [seq] [!seq], a lone
 * '[' is literal, no backslash escapes. */
bool hub_fnmatch(const char *pattern, const char *name);
/* huggingface_hub's filter_repo_objects for one path: a pattern ending in
 * '/' matches everything below it; '\\' counts as '/'. allow == NULL: all. */
bool hub_pattern_filter(const char *path, const char *const *allow, size_t nallow,
                        const char *const *ignore, size_t nignore);
/* A repo path that can be joined under a directory without escaping it:
 * relative, no NUL, no empty/"."/".." component, bounded length. */
bool hub_path_safe(const char *path, size_t len);
int hub_parse_load_format(const char *s, hub_load_format *out);
/* SGLang's filter_files_not_needed_for_inference (suffix match). */
bool hub_is_training_artifact(const char *path);
/* Marks files[i].selected. index_json: the text of the repo's
 * model.safetensors.index.json when the chosen weights are safetensors and
 * the repo has one (NULL otherwise). *needs_index is set when the caller
 * must fetch that index and call again. Fails "file_not_found" when the
 * format finds no weights or nothing is left after the patterns. */
int hub_select_files(hub_listing *l, hub_load_format fmt, const char *const *allow, size_t nallow,
                     const char *const *ignore, size_t nignore, const char *index_json,
                     bool *needs_index, mp_error *err);
#define HUB_SAFE_INDEX "model.safetensors.index.json"

/* ---- hub_cache.c --------------------------------------------------------- */

bool hub_repo_id_valid(const char *repo);
bool hub_is_commit(const char *s);
bool hub_etag_valid(const char *s);
/* "<cache>/models--org--name" into buf. */
int hub_repo_dir(char *buf, size_t n, const char *cache, const char *repo, mp_error *err);
/* The relative link target from snapshots/<commit>/<path> to blobs/<etag>. */
int hub_link_target(char *buf, size_t n, const char *path, const char *etag, mp_error *err);
/* SGLang's get_lock() file name, <sha256(name)><name>.lock with name = repo
 * with '/' -> '-', kept in <cache>/.locks/ (where huggingface_hub keeps its
 * locks and its cache scanner looks away). Blocks (polling cancel) until the
 * flock is held; returns the fd. */
typedef bool (*hub_cancel_fn)(void *arg);
int hub_lock_repo(const char *cache, const char *repo, hub_cancel_fn cancel, void *arg,
                  mp_error *err);
int hub_lock_path(char *buf, size_t n, const char *cache, const char *repo);
/* refs/<revision> := commit (tmp + rename); revision must be path-safe. */
int hub_write_ref(const char *repo_dir, const char *revision, const char *commit, mp_error *err);
/* snapshots/<commit>/<path> -> blob, replacing what is there atomically. */
int hub_publish_link(const char *repo_dir, const char *commit, const char *path, const char *etag,
                     mp_error *err);
/* Free bytes on the file system holding path. */
int hub_free_bytes(const char *path, uint64_t *out, mp_error *err);
/* Kept free on the cache's file system beyond what a download needs, so a
 * download never fills the disk the SQLite store and logs share. */
#define HUB_SPACE_MARGIN (64ull << 20)
/* 0 when need + HUB_SPACE_MARGIN fits in free_bytes; else "insufficient_space"
 * with a message giving need, the margin, their sum and what is free in dir. */
int hub_check_space(uint64_t need, uint64_t free_bytes, const char *dir, mp_error *err);

/* ---- hub_http.c ---------------------------------------------------------- */

/* Retry-After: delta-seconds or an HTTP-date. Returns seconds to wait
 * (clamped to [0, 600]) or -1 when the value is unusable. */
double hub_parse_retry_after(const char *value, time_t now);
/* Maps a failed hub response to a job error code. api: the request was to
 * /api/..., so a bare 404 means the repo rather than a file. NULL when the
 * status is worth retrying (5xx, 429, 408). */
const char *hub_error_code(long status, const char *x_error_code, bool api);
/* What to do about an error code, to append to its message ("" when there
 * is nothing to add): for "unauthorized", set HF_TOKEN (sent_token false) or
 * check it (the hub refused the one sent). */
const char *hub_error_hint(const char *code, bool sent_token);
/* "W/\"abc\"" -> "abc" into out (>= 65 bytes); false when it is not 40/64 hex. */
bool hub_normalize_etag(const char *in, char *out, size_t n);
/* Content-Range "bytes a-b/total". */
int hub_parse_content_range(const char *v, uint64_t *first, uint64_t *last, uint64_t *total);
/* Parses the JSON of GET /api/models/{repo}/revision/{rev}?blobs=true. */
int hub_parse_listing(const char *json, size_t len, hub_listing *out, mp_error *err);
/* Backoff before retry number `attempt` (0-based): 0.3 s * 2^attempt, at most
 * 10 s, plus jitter drawn from *seed. */
double hub_backoff_s(int attempt, double base_s, uint64_t *seed);

typedef struct hub_conn_opts {
    const char *endpoint; /* no trailing '/' */
    const char *token;    /* or NULL */
    int max_retries;
    double backoff_base_s;
    hub_cancel_fn cancel;
    void *cancel_arg;
} hub_conn_opts;

/* GET the listing of repo@revision with retries. */
int hub_fetch_listing(const hub_conn_opts *c, const char *repo, const char *revision,
                      hub_listing *out, mp_error *err);
/* Same scheme, host and port (the token only goes to the hub's origin). */
bool hub_same_origin(const char *a, const char *b);
/* Percent-encodes s into buf; keep_slash keeps '/'. */
int hub_url_quote(char *buf, size_t n, const char *s, bool keep_slash);

/* ---- hub_transfer.c ------------------------------------------------------ */

typedef struct hub_xfer_opts {
    hub_conn_opts conn;
    const char *repo;
    const char *commit;
    const char *blobs_dir;
    int connections;
    uint64_t chunk_bytes;
    bool no_fsync; /* see hub_download_opts */
    /* Called often from the transfer loop with the bytes of this batch that
     * are on disk; non-zero cancels. */
    int (*progress)(void *arg, uint64_t done_bytes);
    void *progress_arg;
} hub_xfer_opts;

typedef struct hub_xfer_stats {
    uint64_t downloaded; /* bytes received over the network this run */
    uint64_t resumed;    /* bytes found in .incomplete files from earlier runs */
} hub_xfer_stats;

/* Fetches files[i] (for each index in idx) into blobs_dir/<etag>, verifying
 * size and sha256 (LFS) or the git blob sha1 (regular files); fills sha256.
 * Blobs already present are not touched (the caller skips them). */
int hub_transfer(const hub_xfer_opts *o, hub_file *files, const size_t *idx, size_t n,
                 hub_xfer_stats *stats, mp_error *err);

/* ---- hub_download.c ------------------------------------------------------ */

typedef struct hub_download_opts {
    const char *endpoint; /* NULL: HUB_DEFAULT_ENDPOINT */
    const char *token;
    const char *cache_dir;
    const char *repo;
    const char *revision;   /* NULL: "main" */
    const char *pin_commit; /* from a checkpoint: finish this commit */
    hub_load_format load_format;
    const char *const *allow;
    size_t nallow; /* allow == NULL: no allow list */
    const char *const *ignore;
    size_t nignore;
    int connections;      /* 0: default */
    uint64_t chunk_bytes; /* 0: default */
    /* Blobs are fsync'ed before they are renamed into place, so a power cut
     * cannot leave a wrong blob under a sha256 name. Only benchmarks comparing
     * with tools that do not sync turn this off. */
    bool no_fsync;
    int max_retries;       /* < 0: default */
    double backoff_base_s; /* 0: 0.3 */
} hub_download_opts;

typedef struct hub_callbacks {
    /* progress in bytes of the selected files; return non-zero to cancel */
    int (*progress)(void *arg, uint64_t done, uint64_t total, const char *msg);
    /* the commit is known: persist it so a resumed run finishes the same one */
    void (*checkpoint)(void *arg, const char *commit, uint64_t done);
    void (*log)(void *arg, const char *level, const char *msg);
    /* true once the job should stop (cancel or drain) */
    bool (*cancelled)(void *arg);
    void *arg;
} hub_callbacks;

/* The whole download. On success *result is the job result object
 * (commit, path, files, bytes_downloaded, bytes_reused, seconds). */
int hub_download(const hub_download_opts *o, const hub_callbacks *cb, json_t **result,
                 mp_error *err);

#endif
