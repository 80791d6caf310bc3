/*
 * remote.h - remote model stores (remote_ prefix): S3-compatible object
 * storage and Redis, in the layouts SGLang's RemoteModelLoader reads, free
 * of HTTP-server and task concerns (loader/jobs/job_publish.c and the
 * download job drive it; a tool or a unit test can call it directly).
 *
 * The pieces, each in its own file:
 *   remote_creds.c   S3 credentials: environment or an AWS credentials file
 *   s3_client.c      signed S3 requests (libcurl CURLOPT_AWS_SIGV4), retries
 *                    with backoff, ListObjectsV2 paging, ranged GETs, PUTs,
 *                    multipart uploads; the XML answers parsed defensively
 *   s3_download.c    s3://bucket/prefix -> DATA/remote/s3/<bucket>/<prefix>/
 *   s3_ranged.c      warm_load from s3:// by ranged GETs per tensor
 *   s3_publish.c     a local model -> s3://bucket/prefix, manifest last
 *   redis_kv.c       a hiredis connection: AUTH, pipelined SETs, SCAN, swap
 *   redis_publish.c  a local model -> redis://host:port/model_name in
 *                    SGLang's KV layout, per tensor-parallel rank
 *   redis_fetch.c    redis:// ranks staged in memory for warm_load
 * (s3_download.c also stages into memory, for warm_load from s3://.)
 *
 * Redis layout (SGLang's RedisConnector, RemoteModelLoader.save_model):
 *   {model_name}/keys/rank_{r}/{param}  safetensors bytes of the one-entry
 *                                       dict {"tensor_bytes": tensor}
 *   {model_name}/files/{file_name}      a non-weight file's text (basename)
 * S3 layout: the model's files under the prefix, as a local model folder
 * has them, plus modelprep-manifest.json (written last).
 */
#ifndef MP_LOADER_REMOTE_H
#define MP_LOADER_REMOTE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"
#include "loader/hub/hub.h"
#include "loader/models/models.h"
#include "loader/tp_rules/tp_rules.h"
#include "util/error.h"

#define REMOTE_MANIFEST "modelprep-manifest.json"
#define REMOTE_DEFAULT_CONNECTIONS 8
#define REMOTE_DEFAULT_CHUNK_BYTES (16ull << 20)
#define REMOTE_DEFAULT_PART_BYTES (64ull << 20)
#define REMOTE_MIN_PART_BYTES (5ull << 20) /* S3's minimum multipart part */
#define REMOTE_DEFAULT_MAX_RETRIES 5
#define REMOTE_DEFAULT_PIPELINE_BYTES (64ull << 20)

/* Progress, log and cancel hooks shared by every remote operation; all
 * optional. progress returns non-zero to stop ("cancelled"). */
typedef struct remote_callbacks {
    int (*progress)(void *arg, uint64_t done, uint64_t total, const char *msg);
    void (*log)(void *arg, const char *level, const char *msg);
    bool (*cancelled)(void *arg);
    void *arg;
    /* true when a stop is a drain (the job will run again): a download then
     * keeps what arrived for the next run. */
    bool (*draining)(void *arg);
} remote_callbacks;

/* ---- credentials (remote_creds.c) ---------------------------------------- */

typedef struct remote_s3_creds {
    char access_key[129];
    char secret_key[257];
    char session_token[4097]; /* "" when none */
    char region[65];          /* "us-east-1" unless configured */
} remote_s3_creds;

/* From `file` when given (AWS shared-credentials format: [default] or the
 * profile AWS_PROFILE names, aws_access_key_id / aws_secret_access_key /
 * aws_session_token / region), else from AWS_ACCESS_KEY_ID,
 * AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; region from AWS_REGION or
 * AWS_DEFAULT_REGION when the file has none. No credentials at all is not an
 * error (anonymous requests: access_key ""). Secrets never appear in error
 * messages. Errors: "bad_credentials". */
int remote_s3_creds_load(const char *file, remote_s3_creds *out, mp_error *err);
/* Wipes the secrets. */
void remote_s3_creds_clear(remote_s3_creds *c);

/* ---- where an S3 bucket is ------------------------------------------------ */

typedef struct remote_s3_where {
    /* "http(s)://host[:port]" (no path); NULL or "": AWS,
     * https://s3.<region>.amazonaws.com */
    const char *endpoint;
    /* Virtual-hosted addressing (bucket.host) instead of path-style
     * (host/bucket). Custom endpoints default to path-style. */
    bool virtual_hosted;
    const remote_s3_creds *creds;
    int max_retries;       /* < 0: REMOTE_DEFAULT_MAX_RETRIES */
    double backoff_base_s; /* 0: 0.2 s */
    long timeout_s;        /* per request without progress; 0: 60 */
} remote_s3_where;

/* Virtual-hosted or not: the job's addressing param ("path", "virtual")
 * when given, else the server's style (--s3-addressing /
 * AWS_S3_ADDRESSING_STYLE: "path", "virtual", "auto" or NULL), and for
 * "auto" as botocore does: path-style for a custom endpoint, virtual-hosted
 * on AWS. */
bool remote_s3_virtual(const char *param, const char *server_style, const char *endpoint);

/* True for "http://..." or "https://..." with a host, no path, query,
 * userinfo or whitespace (what `endpoint` and AWS_ENDPOINT_URL may be). */
bool remote_endpoint_valid(const char *s);

/* ---- download (s3_download.c) ---------------------------------------------- */

typedef struct remote_s3_download_opts {
    const mref_remote *src; /* scheme MREF_S3 */
    remote_s3_where where;
    const char *data_dir; /* the copy goes to <data_dir>/remote/s3/<bucket>/<prefix> */
    const char *tmp_tag;  /* names the temp folder (the job id) */
    hub_load_format load_format;
    const char *const *allow;
    size_t nallow;
    const char *const *ignore;
    size_t nignore;
    int connections;      /* 0: REMOTE_DEFAULT_CONNECTIONS */
    uint64_t chunk_bytes; /* ranged GET size; 0: about one range per connection,
                           * REMOTE_DEFAULT_CHUNK_BYTES..256 MiB */
    bool overwrite;       /* replace an existing copy */
    /* In memory instead (warm_load straight from S3): every chosen file is a
     * memfd linked from stage_dir (created; /proc/self/fd links), so the
     * folder opens like a model folder while nothing is written to disk.
     * stage_fds gets the descriptors (caller closes them and removes the
     * folder with remote_unstage_dir). No copy is published. */
    const char *stage_dir;
    int *stage_fds;
    size_t stage_max; /* room in stage_fds */
    size_t *nstage_fds;
} remote_s3_download_opts;

/* Removes a staging folder made by a download with stage_dir (links and
 * sub-folders, never their targets) and closes n descriptors. */
void remote_unstage_dir(const char *dir, int *fds, size_t n);

/* Lists the prefix (ListObjectsV2, every page), picks the files as a hub
 * download would (load_format, patterns, the safetensors index), fetches
 * them with parallel ranged GETs (If-Match the listed ETag, so an object
 * replaced mid-download fails instead of mixing), checks each object's size,
 * its MD5 where the ETag is one (single-part uploads), HEADs big and
 * multipart files afterwards (ETag and size unchanged; a single-part
 * object's x-amz-checksum-sha256, where the store keeps one, equal to the
 * sha256 of what arrived), records each file's
 * sha256, and publishes the folder atomically (temp folder, fsync, rename).
 * *result: {model, path, files: [{name, size, etag, sha256}], bytes, seconds,
 * throughput_bytes_per_s, requests, retries}. Errors: "not_found" (bucket or
 * prefix empty), "file_not_found" (nothing selected), "unauthorized",
 * "forbidden", "changed_during_download", "checksum_mismatch",
 * "remote_unavailable" (retries exhausted), "bad_response", "output_exists",
 * "io_error", "cancelled". A stop while cb->draining() says so keeps the
 * finished ranges for the next run with the same tmp_tag, which fetches
 * only the rest. */
int remote_s3_download(const remote_s3_download_opts *o, const remote_callbacks *cb,
                       json_t **result, mp_error *err);

/* ---- warm_load straight from s3:// by ranged reads (s3_ranged.c) ------------ */

/* The way the Run:ai model streamer reads: the safetensors headers with
 * ranged GETs (the 8-byte length, then the header), the tensors planned as
 * from local files, then each tensor's bytes (or a run of small neighbours)
 * with a ranged GET straight into the loader's staging ring, so host memory
 * is the ring's, not the model's. Every GET carries If-Match with the listed
 * ETag (an object replaced mid-load fails "changed_during_download") and must
 * come back as exactly the range asked for. */
typedef struct remote_s3_ranged remote_s3_ranged;

typedef struct remote_s3_ranged_opts {
    const mref_remote *src; /* scheme MREF_S3 */
    remote_s3_where where;
    hub_load_format load_format; /* which files, as a download would choose */
} remote_s3_ranged_opts;

/* Lists the prefix, chooses the files, reads every chosen .safetensors
 * file's header and config.json. Returns 1 (nothing opened, *out NULL) when
 * the choice holds no safetensors file or an encrypted one: the caller then
 * fetches the files whole. Errors: those of remote_s3_download, "bad_header"
 * (a header length of 0, over 10^8 or past the object, a header that is not
 * safetensors), "truncated". */
int remote_s3_ranged_open(const remote_s3_ranged_opts *o, const remote_callbacks *cb,
                          remote_s3_ranged **out, mp_error *err);
/* The chosen safetensors files, in name order; file i's table (files[0] is
 * its s3:// URL, fds[0] -1) is handed to the caller once by take. */
size_t remote_s3_ranged_nfiles(const remote_s3_ranged *r);
mp_weights *remote_s3_ranged_take(remote_s3_ranged *r, size_t i);
/* config.json of the prefix (borrowed), or NULL. */
json_t *remote_s3_ranged_config(const remote_s3_ranged *r);
/* load_run_opts.read_at: len bytes at off of file `file` (part 0), one
 * ranged GET; thread-safe. */
int remote_s3_ranged_read(void *r, uint32_t file, uint32_t part, uint64_t off, void *dst,
                          uint64_t len, mp_error *err);
/* {url, mode: "ranged", files: [{name, size, etag}], requests, retries,
 * bytes_fetched}. */
json_t *remote_s3_ranged_info(const remote_s3_ranged *r);
void remote_s3_ranged_free(remote_s3_ranged *r);

/* ---- publish (s3_publish.c, redis_publish.c) ------------------------------- */

typedef struct remote_s3_publish_opts {
    const char *model_dir; /* realpath of the local model */
    const char *source_model;
    const mref_remote *dst; /* scheme MREF_S3 */
    remote_s3_where where;
    int connections;     /* parallel part uploads; 0: default */
    uint64_t part_bytes; /* multipart threshold and part size; 0: default */
    bool overwrite;      /* replace a prefix that already has a manifest */
} remote_s3_publish_opts;

/* Uploads every regular file of model_dir (recursively, hidden files
 * skipped; hub snapshot links followed) under the prefix: small files with
 * one PUT, big ones as a multipart upload (each part with its
 * x-amz-checksum-sha256), then REMOTE_MANIFEST last, so a reader that waits
 * for the manifest never sees half a model. A failed multipart upload is
 * aborted. *result: {url, files: [{name, size, sha256, etag, parts}], bytes,
 * seconds, throughput_bytes_per_s}. Errors as remote_s3_download plus
 * "output_exists". */
int remote_s3_publish(const remote_s3_publish_opts *o, const remote_callbacks *cb, json_t **result,
                      mp_error *err);

typedef struct remote_redis_publish_opts {
    const char *model_dir;   /* realpath of the local model (safetensors/pt) */
    const mref_remote *dst;  /* scheme MREF_REDIS */
    const char *password;    /* AUTH when the URL has none; NULL: no AUTH */
    int tp;                  /* ranks to write (1..); rank r under rank_{r} */
    tp_naming naming;        /* TP_NAMING_SGLANG: SGLang's parameter names */
    bool overwrite;          /* replace keys already under {model_name}/ */
    const char *tmp_tag;     /* staging prefix {model_name}.tmp-<tag>/ */
    uint64_t pipeline_bytes; /* bytes in flight before replies are read */
    double timeout_s;        /* per reply; 0: 60 */
} remote_redis_publish_opts;

/* Writes every rank's tensors and the non-weight text files under a
 * staging prefix with pipelined SETs, then swaps them in with one
 * MULTI/EXEC (old keys deleted, staged keys renamed), so SGLang never lists
 * a half-written model. A failure removes the staged keys. *result: {url,
 * model_name, tp_size, naming, ranks: [{rank, tensors, bytes}], files,
 * skipped_files, keys, bytes, seconds, throughput_bytes_per_s}. Errors:
 * "remote_unavailable" (connect/IO), "unauthorized" (AUTH refused),
 * "output_exists", "remote_error" (Redis refused a command, e.g. a value
 * over proto-max-bulk-len or maxmemory), "unsupported_format" (GGUF blocks),
 * those of tp_rules.h, "io_error", "cancelled". */
int remote_redis_publish(const remote_redis_publish_opts *o, const remote_callbacks *cb,
                         json_t **result, mp_error *err);

/* ---- warm_load from redis:// (redis_fetch.c) -------------------------------- */

/* Reads ranks 0..tp-1 of src (SGLang's layout) into memory: per rank one
 * safetensors file in a memfd (fds[r], owned by the caller), linked from
 * dir/model-rank-{r}-part-0.safetensors, and the model's text files
 * written into dir, so dir loads as a sharded_state checkpoint. Each value
 * is checked to be safetensors of {"tensor_bytes": t} with a consistent
 * dtype, shape and size. *info: [{rank, tensors, bytes}]. Errors:
 * "not_found" (a rank without keys), "bad_request" (published for more
 * ranks), "bad_model" (a value that is not SGLang's), the connection's
 * codes. On failure nothing is left staged. */
int remote_redis_stage(const mref_remote *src, const char *password, int tp, const char *dir,
                       double timeout_s, const remote_callbacks *cb, int *fds, json_t **info,
                       mp_error *err);
/* Removes dir and closes the memfds (the loader's own descriptors keep the
 * memory alive as long as it reads). */
void remote_redis_unstage(const char *dir, int *fds, int n);

/* SGLang's SafeSerializer.to_bytes: safetensors bytes of {"tensor_bytes":
 * t}, byte-identical to safetensors.torch.save (header padded with spaces
 * to 8 bytes, no __metadata__). Writes the 8-byte length and the header into
 * hdr (at least REMOTE_ST1_HDR_MAX bytes) and returns their length, or 0
 * when the dtype or shape cannot be written. The data bytes follow it. */
#define REMOTE_ST1_HDR_MAX 512
size_t remote_st1_header(mp_dtype dtype, int ndim, const int64_t *shape, uint64_t nbytes,
                         char *hdr);

#endif
