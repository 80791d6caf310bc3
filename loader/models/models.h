/*
 * models.h - the models a node has, and what a request's "model" may name.
 *
 * model_ref.c (mref_): what a request's "model" names, checked before
 * anything touches the disk: a hub repo id ("org/name") with a revision, or
 * a local directory that must lie under one of the configured model roots.
 *
 * local_models.c (mref_list_root): the models in folders (model roots and
 * our own output folders).
 *
 * cache.c (cache_): reading and evicting what the Hugging Face-layout cache
 * holds (models--org--name/{refs,snapshots,blobs}). Writing it is the hub
 * client's job (loader/hub/); this is the view GET/DELETE /v1/models need.
 */
#ifndef MP_LOADER_MODELS_H
#define MP_LOADER_MODELS_H
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include "util/error.h"

#define MREF_MAX_LEN 1024

/* True for a syntactically valid hub repo id: "org/name", each part
 * [A-Za-z0-9._-], 1..96 chars, not starting with '.' or '-', no "..", no "--". */
bool mref_is_repo_id(const char *s);
/* True for a valid revision: branch, tag or commit; [A-Za-z0-9._/-], no "..",
 * 1..255 chars, not starting with '/' or '-'. */
bool mref_is_revision(const char *s);

/* Confines a local path: absolute, no NUL (len must equal strlen), no ".."
 * component, at most MREF_MAX_LEN characters, and its realpath a directory
 * under a root. *out is the realpath (caller frees). err->code "bad_model"
 * (malformed), or, depending on the disk and the flags: "not_found" (no
 * such directory), "outside_roots" (the message names the roots),
 * "no_model_roots". */
int mref_confine(const char *path, size_t len, const char *const *roots, char **out, mp_error *err);

/* Confines every file a job may open, not only the model directory: each
 * entry under model_dir (recursively, 16 levels deep as no job goes further;
 * dot-entries are skipped as the jobs skip them) that is a symlink must
 * resolve inside one of allowed[] (NULL-terminated, realpath'd). Dangling
 * links are ignored (no job can open them). err "unsafe_path" names the
 * first offending file; "too_many_files" past 1,000,000 entries. */
int mref_confine_tree(const char *model_dir, const char *const *allowed, const char *why,
                      mp_error *err);
/* mref_confine_tree with the rule of the model's kind: a hub model's files
 * stay inside its own repo cache dir (<hub_cache>/models--org--name, where
 * snapshots link into ../../blobs), a local model's under the model roots. */
int mref_confine_model_files(const char *model_dir, const char *model, bool is_hub,
                             const char *hub_cache, const char *const *roots, mp_error *err);

/* The HF-cache directory of a repo: <cache>/models--org--name (caller frees). */
char *mref_repo_cache_dir(const char *hub_cache, const char *repo);
/* The cached snapshot of repo@revision when present (refs/<revision> → commit,
 * or the commit itself), else NULL. *commit (41 bytes) gets the commit. */
char *mref_snapshot_dir(const char *hub_cache, const char *repo, const char *revision,
                        char *commit);

/* ---- folders of models (local_models.c) ---- */

/* Appends to out one entry {"model","kind","revision":null,"path",
 * "size_bytes","files","formats"} per model under root: the root itself
 * when it holds weight files, else each sub-folder that does ("model" is
 * the path: what a job takes). kind: "local", "converted" or "sharded". */
int mref_list_root(const char *root, const char *kind, json_t *out);

/* The record an s3:// download leaves in its copy (loader/remote). */
#define MREF_S3_PROVENANCE ".modelprep-s3.json"
/* Appends one entry per downloaded s3:// copy under
 * <data_dir>/remote/s3/<bucket>/<prefix>/ (a folder holding
 * MREF_S3_PROVENANCE and a weight file): as mref_list_root's, with kind and
 * source "s3" and model the s3://bucket/prefix URL a job takes. */
int mref_list_s3(const char *data_dir, json_t *out);

/* ---- the hub cache (cache.c) ---- */

/* Every cached (repo, revision): [{"model","revision","commit","path",
 * "size_bytes","files","formats"}], files being the count. */
json_t *cache_list(const char *hub_cache);
/* One repo: its revisions and, for the given revision (or main, or the only
 * one), the files [{name,size,sha256}] of the snapshot. NULL when absent. */
json_t *cache_model(const char *hub_cache, const char *repo, const char *revision);
/* Removes the repo from the cache: renamed away first so no reader ever
 * sees a half-deleted snapshot, then deleted. */
int cache_evict(const char *hub_cache, const char *repo, mp_error *err);
/* Weight formats present among a snapshot's file names ("safetensors",
 * "pt", "gguf", "npy"). */
json_t *cache_formats_of(json_t *names);
/* For a snapshot symlink into blobs/ named by 64 hex digits (an LFS blob,
 * named by its sha256 as the hub advertised it): that sha256 into out (65
 * bytes). False for anything else. */
bool cache_blob_sha256(const char *path, char *out);

/* ---- remote stores (remote_ref.c) ----
 * "model" may also name a remote store in SGLang's URL syntax:
 *   s3://bucket/prefix            an object-store prefix of model files
 *   redis://host[:port]/model     a KV store in SGLang's RedisConnector layout
 * Everything is checked before use: bucket names as S3 allows them, prefix
 * and model name components from a safe set (they become local directory
 * names and SCAN patterns), no credentials in a model string (it is logged
 * and listed). */
typedef enum mref_scheme { MREF_NONE = 0, MREF_S3, MREF_REDIS } mref_scheme;

#define MREF_BUCKET_MAX 63
#define MREF_HOST_MAX 255
#define MREF_SECRET_MAX 256

typedef struct mref_remote {
    mref_scheme scheme;
    char bucket[MREF_BUCKET_MAX + 1];  /* s3 */
    char prefix[MREF_MAX_LEN + 1];     /* s3: key prefix, no leading or trailing '/' */
    char host[MREF_HOST_MAX + 1];      /* redis; an IPv6 literal without brackets */
    int port;                          /* redis; 6379 unless given */
    char model_name[MREF_MAX_LEN + 1]; /* redis: the URL path without its leading '/' */
    /* redis only, and only where allow_secrets: the user and password of
     * redis://user:password@host (as redis-py and SGLang read them). */
    char user[MREF_SECRET_MAX + 1];
    char password[MREF_SECRET_MAX + 1];
    bool has_password;
} mref_remote;

/* True when s starts with "s3://" or "redis://" (then it is not a hub id or
 * a path, and mref_remote_parse says whether it is usable). */
bool mref_is_remote(const char *s);
/* Parses and checks a remote URL (len must equal strlen). field names the
 * request field in errors ("model", "params.url"). allow_secrets: accept
 * user:password@ in a redis URL. Errors: "bad_model" (field set). */
int mref_remote_parse(const char *s, size_t len, bool allow_secrets, const char *field,
                      mref_remote *out, mp_error *err);
/* Where a download of an s3:// model lives: <data_dir>/remote/s3/<bucket>/
 * <prefix> into buf. Errors: "bad_model" (path too long). */
int mref_remote_local_dir(const char *data_dir, const mref_remote *r, char *buf, size_t n,
                          mp_error *err);
/* For a job's model: parses it (no secrets) and, for s3://, *local is the
 * realpath of the downloaded copy when one is there (else NULL; caller
 * frees). Redis models have no local copy. */
int mref_remote_resolve(const char *model, size_t len, const char *data_dir, mref_remote *out,
                        char **local, mp_error *err);
#endif
