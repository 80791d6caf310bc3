/*
 * cache.h - reading and evicting what the Hugging Face-layout cache holds
 * (models--org--name/{refs,snapshots,blobs}). Writing it is the hub client's
 * job (hub_*.c); this is the view GET/DELETE /v1/models need.
 */
#ifndef MP_LOADER_CACHE_H
#define MP_LOADER_CACHE_H
#include <jansson.h>
#include <stdbool.h>
#include "util/error.h"

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
#endif
