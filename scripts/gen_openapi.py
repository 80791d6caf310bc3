#!/usr/bin/env python3
"""Writes openapi/openapi.yaml (JSON, which is valid YAML) from the tables
below. Edit here, run `python3 scripts/gen_openapi.py`, commit both.
The route list must match server/routes.c: tests/unit/test_openapi.c checks."""
import json, os

def ref(name):
    return {"$ref": "#/components/schemas/" + name}

def resp(desc, schema=None, ctype="application/json"):
    r = {"description": desc}
    if schema is not None:
        r["content"] = {ctype: {"schema": schema}}
    return r

PROBLEM = resp("error", ref("Problem"), "application/problem+json")
ERR = {"400": PROBLEM, "401": PROBLEM}

def op(summary, responses, params=None, body=None, tags=None, security=True):
    o = {"summary": summary, "responses": responses}
    if params:
        o["parameters"] = params
    if body:
        o["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if tags:
        o["tags"] = tags
    if not security:
        o["security"] = []
    return o

def path_param(name, schema=None):
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}

def query(name, schema):
    return {"name": name, "in": "query", "required": False, "schema": schema}

# ---- string rules, as regular expressions the server is checked against ----
# Each pattern documents a subset of what the server accepts (never more):
# tests/py/test_schemathesis.py sends requests generated from them and
# fails when the server refuses one. No look-arounds: generators need plain
# regular expressions.
W = "[A-Za-z0-9_]"
# A repo id part: starts and ends with a letter, digit or '_', no two of
# '.' '-' in a row (so no ".." or "--"); 1..96 characters.
REPO_PART = W + "(?:[.-]?" + W + ")*"
# Inside one "org/name" string the per-part bound is written into the
# expression: at most 48 word characters, so at most 95 characters a part.
REPO_PART_95 = W + "(?:[.-]?" + W + "){0,47}"
REPO_ID = "^" + REPO_PART_95 + "/" + REPO_PART_95 + "$"
# A revision: a branch, tag or commit; '/'-separated segments that start
# with a letter, digit or '_' and never hold "..".
REV_SEGMENT = W + "(?:\\.?[A-Za-z0-9_-])*"
REVISION = "^" + REV_SEGMENT + "(?:/" + REV_SEGMENT + ")*$"
# An absolute path without "." or ".." segments, empty segments or NUL.
PATH_SEGMENT = "(?:[^/\\x00.][^/\\x00]*|\\.[^/\\x00.][^/\\x00]*|\\.\\.[^/\\x00]+)"
# (Not written "^(?:/SEGMENT)+$": generators that fold maxLength into a
# lone repeated group would count groups, not characters.)
ABS_PATH = "^/" + PATH_SEGMENT + "(?:/" + PATH_SEGMENT + ")*$"
FILE_NAME = "^" + PATH_SEGMENT + "$"
NO_NUL = "^[^\\x00]+$"
JOB_ID = "^j_[0-9a-f]{20}$"
RESIDENT_ID = "^r_[0-9a-f]{4,64}$"
CURSOR = "^[1-9][0-9]{0,17}$"
JOB_TYPES = ["download", "convert", "inspect", "shard", "warm_load", "verify", "prepare", "publish", "quantize"]
REMOTE_MIN_PART_BYTES = 5 << 20  # loader/remote/remote.h: S3's minimum multipart part
JOB_STATES = ["queued", "running", "succeeded", "failed", "cancelled"]

MODEL_REPO = {"type": "string", "pattern": REPO_ID, "maxLength": 193,
              "description": "a hub repo id, org/name"}
MODEL_PATH = {"type": "string", "pattern": ABS_PATH, "minLength": 2, "maxLength": 1024,
              "description": "an absolute directory under a --model-root, <data>/converted or <data>/sharded (a job result's next_model; at most 1024 characters)"}
# Each alternative complete in itself (keywords next to anyOf make the
# boundary-case generators slow and confused).
# Remote models, as loader/models/remote_ref.c takes them (these patterns are
# a strict subset: names start with a letter or digit, buckets have no dots).
_RNAME = "[A-Za-z0-9][A-Za-z0-9._+=,@~-]{0,254}"
_RPATH = _RNAME + "(/" + _RNAME + ")*"
_PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
S3_URL = "^s3://[a-z0-9][a-z0-9-]{1,61}[a-z0-9]/" + _RPATH + "$"
REDIS_URL = "^redis://[a-z0-9]{1,63}(\\.[a-z0-9]{1,63}){0,3}(:" + _PORT + ")?/" + _RPATH + "$"
MODEL_S3 = {"type": "string", "pattern": S3_URL, "maxLength": 1024,
            "description": "s3://bucket/prefix: download pulls it; the other jobs use its downloaded copy"}
MODEL_REDIS = {"type": "string", "pattern": REDIS_URL, "maxLength": 1024,
               "description": "redis://host:port/model_name in SGLang's KV layout (warm_load)"}
MODEL_ANY = {"anyOf": [MODEL_REPO, MODEL_PATH, MODEL_S3],
             "description": "a hub repo id (org/name) or an absolute directory under a "
                            "--model-root (at most 1024 characters)"}
REVISION_S = {"type": "string", "pattern": REVISION, "minLength": 1, "maxLength": 255,
              "default": "main", "description": "branch, tag or commit"}
I64_MAX = 9223372036854775807

def S_(**kw):
    return dict({"type": "string"}, **kw)

def I_(lo=None, hi=None, **kw):
    d = {"type": "integer"}
    if lo is not None:
        d["minimum"] = lo
    if hi is not None:
        d["maximum"] = hi
    d.update(kw)
    return d

def nullable(schema):
    return dict(schema, nullable=True)

PROGRESS = {"type": "object", "additionalProperties": False,
            "required": ["done", "total", "unit", "rate", "message"],
            "description": "where a job is; once it has ended: message is done, failed or "
                           "cancelled and rate is the average (done / the job's duration)",
            "properties": {"done": I_(0), "total": I_(0),
                           "unit": S_(description="bytes, files or tensors"),
                           "rate": {"type": "number", "minimum": 0,
                                    "description": "units per second"},
                           "message": {"type": "string"}}}
PROGRESS_EVENT = dict(PROGRESS, required=PROGRESS["required"] + ["id"],
                      description="SSE event `progress`: the job's progress plus its id",
                      properties=dict(PROGRESS["properties"], id=S_(pattern=JOB_ID)))
TENSOR_ROW = {"type": "object", "properties": {
    "name": {"type": "string"}, "dtype": {"type": "string"},
    "shape": {"type": "array", "items": I_(0)},
    "device": I_(0), "rank": I_(0), "offset": I_(0), "bytes": I_(0),
    "ggml_type": I_(0, description="only for dtype GGML")}}

schemas = {
    "Problem": {"type": "object", "required": ["type", "title", "status", "detail"],
                "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                               "status": {"type": "integer"}, "detail": {"type": "string"},
                               "errors": {"type": "array", "items": {"type": "object", "properties": {
                                   "field": {"type": "string"}, "code": {"type": "string"},
                                   "message": {"type": "string"}}}}}},
    "Progress": PROGRESS,
    "ProgressEvent": PROGRESS_EVENT,
    "JobError": {"type": "object", "nullable": True, "required": ["code", "message"],
                 "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
    "Job": {"type": "object", "required": ["id", "type", "model", "revision", "params", "state", "progress", "result", "error", "created_at"],
            "properties": {"id": S_(pattern=JOB_ID), "type": S_(enum=JOB_TYPES), "model": {"type": "string"},
                           "revision": {"type": "string"}, "params": {"type": "object"},
                           "state": S_(enum=JOB_STATES),
                           "progress": ref("Progress"),
                           "result": {"type": "object", "nullable": True,
                                      "description": "what the job produced; a failed job may keep what it found "
                                                     "(verify: the per-file table), else null"},
                           "error": ref("JobError"),
                           "created_at": {"type": "string", "format": "date-time"},
                           "started_at": {"type": "string", "format": "date-time", "nullable": True},
                           "finished_at": {"type": "string", "format": "date-time", "nullable": True},
                           "parent": nullable(S_(pattern=JOB_ID, description="the prepare job this job is a step of (null for a job submitted on its own)")),
                           "steps": {"type": "array", "description": "prepare only: its plan, updated as it runs",
                                     "items": ref("Step")}}},
    "Step": {"type": "object", "required": ["type", "state"],
             "properties": {"type": S_(enum=["download", "convert", "inspect", "shard", "warm_load"]),
                            "job": nullable(S_(pattern=JOB_ID, description="the child job (GET /v1/jobs?parent=<id> lists them)")),
                            "state": S_(enum=["pending", "running", "succeeded", "failed", "cancelled", "skipped"]),
                            "reason": S_(description="why it runs or is skipped"),
                            "model": S_(description="what the step works on")}},
    "JobList": {"type": "object", "required": ["jobs", "next_cursor"],
                "properties": {"jobs": {"type": "array", "items": ref("Job")},
                               "next_cursor": nullable(S_(pattern=CURSOR))}},
    "VerifyResult": {"type": "object", "description": "result of a verify job",
                     "properties": {"status": S_(enum=["verified", "recorded"],
                                                 description="recorded: no file had a known hash, this run only recorded them"),
                                    "ok": {"type": "boolean"}, "recorded": I_(0), "bytes": I_(0),
                                    "files": {"type": "array", "items": {"type": "object", "properties": {
                                        "name": {"type": "string"}, "size": I_(0),
                                        "expected": {"type": "string"}, "actual": {"type": "string"},
                                        "ok": {"type": "boolean"},
                                        "status": S_(enum=["verified", "recorded"])}}}}},
    "Device": {"type": "object", "properties": {"index": {"type": "integer"}, "kind": {"type": "string", "enum": ["cuda", "host", "async"],
                                                         "description": "async: the test backend of --devices async:N (host memory, late copies, real fences)"},
                                                "name": {"type": "string"}, "total_bytes": {"type": "integer"},
                                                "free_bytes": {"type": "integer"}, "resident_bytes": {"type": "integer"},
                                                "compute_capability": {"type": "string", "nullable": True},
                                                "pci_bus_id": {"type": "string", "nullable": True}}},
    "Version": {"type": "object", "properties": {"version": {"type": "string"}, "git": {"type": "string"},
                                                 "cuda": {"type": "object", "nullable": True, "properties": {
                                                     "runtime": {"type": "integer"}, "driver": {"type": "integer"}}}}},
    "ModelSummary": {"type": "object", "required": ["model", "kind", "revision", "path", "size_bytes", "files", "formats"],
                     "properties": {"model": S_(description="what to pass as a job's model"),
                                    "kind": S_(enum=["hub", "local", "converted", "sharded", "s3"]),
                                    "source": S_(enum=["s3"], description="the copy of an s3:// download (kind s3): "
                                                 "model is its s3://bucket/prefix URL, path the copy under <data>/remote/s3"),
                                    "revision": nullable(S_(description="hub snapshots only")),
                                    "commit": nullable(S_(pattern="^[0-9a-f]{40}$", description="hub snapshots only")),
                                    "path": {"type": "string"},
                                    "size_bytes": I_(0), "files": I_(0, description="how many files"),
                                    "formats": {"type": "array", "items": {"type": "string"}},
                                    "inspection": {"type": "object", "nullable": True,
                                                   "description": "the last inspect job's result on this model and revision (a path model: revision main): {result, job_id, at}, null when never inspected"}}},
    "Model": {"type": "object", "required": ["model", "revision", "commit", "path", "size_bytes", "files", "formats", "revisions", "inspection"],
              "properties": {"model": {"type": "string"}, "revision": {"type": "string"},
                             "commit": S_(pattern="^[0-9a-f]{40}$"), "path": {"type": "string"},
                             "size_bytes": I_(0),
                             "files": {"type": "array", "items": {"type": "object", "properties": {
                                 "name": {"type": "string"}, "size": I_(0),
                                 "sha256": nullable(S_(pattern="^[0-9a-f]{64}$"))}}},
                             "formats": {"type": "array", "items": {"type": "string"}},
                             "revisions": {"type": "array", "items": ref("ModelSummary")},
                             "inspection": {"type": "object", "nullable": True}}},
    "Resident": {"type": "object", "required": ["id", "model", "revision", "state", "bytes", "tensors"],
                 "properties": {"id": S_(pattern=RESIDENT_ID), "model": {"type": "string"},
                                "revision": {"type": "string"},
                                "state": S_(enum=["resident", "unloaded", "gone"],
                                            description="gone: the server restarted since it was loaded"),
                                "bytes": I_(0),
                                "tensors": I_(0, description="how many tensors (GET /v1/residents/{id} adds tensor_table)"),
                                "devices": {"type": "array", "items": {"type": "object", "properties": {
                                    "index": I_(0), "bytes": I_(0)}}},
                                "load": {"type": "object", "description": "the warm_load figures"},
                                "created_at": {"type": "string", "format": "date-time"},
                                "tensor_table": {"type": "array", "items": TENSOR_ROW,
                                                 "description": "one row per tensor (GET /v1/residents/{id} of a live resident)"}}},
}

def obj(props, required=None):
    o = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        o["required"] = required
    return o

S, B, N = {"type": "string"}, {"type": "boolean"}, {"type": "number"}
def enum(*v):
    return {"type": "string", "enum": list(v)}
def IA(lo, hi, **kw):
    return dict({"type": "array", "maxItems": 1024, "items": I_(lo, hi)}, **kw)
DEVICES_DESC = ("device indexes, one per tensor-parallel rank: as many as tp_size "
                "(400 param_conflict otherwise); empty or absent: the first tp_size devices")
PATTERNS = {"type": "array", "maxItems": 256,
            "items": S_(minLength=1, maxLength=256, pattern=NO_NUL,
                        description="fnmatch pattern (at most 1024 bytes in UTF-8)")}

# One schema per job type's params; tests/unit/test_core.c checks that each
# matches the type's mp_param_spec (names, JSON types, enums, integer bounds).
JOB_PARAMS = {
    "download": obj({"allow_patterns": PATTERNS, "ignore_patterns": PATTERNS,
                     "load_format": enum("auto", "safetensors", "pt", "gguf", "all"),
                     "endpoint": S_(pattern="^https?://[^\\s\\x00]*$", maxLength=256,
                                    description="http(s) URL of another hub for this job"),
                     "connections": I_(1, 64), "chunk_bytes": I_(65536, 1 << 32),
                     "max_retries": I_(0, 20),
                     # s3:// models only
                     "addressing": enum("path", "virtual"), "overwrite": B}),
    "convert": obj({"dtype": enum("keep", "bf16", "fp16", "fp32"), "max_shard_bytes": I_(1, I64_MAX),
                    "output": S_(pattern=ABS_PATH, maxLength=1024), "file": S_(pattern=FILE_NAME, maxLength=255),
                    "encryption_key_file": S_(pattern=NO_NUL, maxLength=1024), "overwrite": B}),
    "inspect": obj({"tp_sizes": IA(1, 1024), "kv_cache_scales_file": S_(pattern=NO_NUL, maxLength=1024)}),
    "shard": obj({"tp_size": I_(1, 1024), "max_part_bytes": I_(1, I64_MAX), "naming": enum("sglang", "hf"),
                  "output": S_(pattern=ABS_PATH, maxLength=1024), "overwrite": B}, required=["tp_size"]),
    "warm_load": obj({"load_format": enum("auto", "safetensors", "pt", "gguf", "npcache", "sharded_state", "dummy"),
                      "devices": IA(0, 63, description=DEVICES_DESC, uniqueItems=True), "tp_size": I_(1, 64), "dtype": enum("auto", "keep", "bf16", "fp16", "fp32"),
                      "decryption_key_file": S_(pattern=NO_NUL, maxLength=1024),
                      "dummy": {"type": "object", "additionalProperties": False,
                                "properties": {"low": N, "high": N, "seed": I_(0)}},
                      "keep_resident": B, "staging_bytes": I_(65536, 1 << 40), "direct_io": B, "host_direct": B,
                      "device_convert": B,
                      "readers": I_(1, 64),
                      "s3_read": S_(enum=["ranged", "whole"],
                                    description="s3:// models: ranged GETs per tensor into the staging ring "
                                                "(safetensors; the default) or the files fetched whole into memory"),
                      "addressing": enum("path", "virtual"),
                      "quantize": enum("fp8", "fp8-channel", "fp8-block", "nf4", "int8"),
                      "quantize_block_size": {"type": "array", "items": I_(1, 65536), "minItems": 2, "maxItems": 2,
                                              "description": "[block_n, block_k], quantize fp8-block only (default [128, 128])"},
                      "quantize_double_quant": B,
                      "quantize_ignore": {"type": "array", "maxItems": 64,
                                          "items": S_(pattern=NO_NUL, maxLength=512),
                                          "description": "fnmatch patterns of modules left unquantized, added to the defaults"}}),
    "verify": obj({}),
    "prepare": obj({"for": enum("sglang", "vllm", "transformers"), "tp_size": I_(1, 1024), "devices": IA(0, 63, description=DEVICES_DESC, uniqueItems=True),
                    "dtype": enum("keep", "bf16", "fp16", "fp32"), "load": B,
                    "allow_patterns": {"type": "array", "items": S_(pattern=NO_NUL, maxLength=1024)}}),
    "publish": obj({"url": S_(pattern="(" + S3_URL + ")|(" + REDIS_URL + ")", maxLength=1024,
                              description="s3://bucket/prefix or redis://[[user]:password@]host[:port]/model_name"),
                    "tp_size": I_(1, 1024), "naming": enum("sglang", "hf"), "pipeline_bytes": I_(1 << 20, 1 << 34),
                    "endpoint": S_(pattern="^https?://[a-z0-9]{1,63}(\\.[a-z0-9]{1,63}){0,3}(:" + _PORT + ")?$", maxLength=256,
                                   description="the S3 endpoint, http(s)://host[:port] (s3:// urls only)"),
                    "addressing": enum("path", "virtual"), "part_bytes": I_(REMOTE_MIN_PART_BYTES, 5 << 30),
                    "connections": I_(1, 64), "max_retries": I_(0, 20), "overwrite": B}, required=["url"]),
    "quantize": obj({"method": enum("fp8", "fp8-channel", "fp8-block", "nf4", "int8"),
                     "block_size": IA(1, 65536, minItems=2, maxItems=2,
                                      description="[n, k] of fp8-block's scale blocks (default [128, 128]; "
                                                  "400 param_conflict with another method)"),
                     "double_quant": dict(B, description="nf4: quantize the absmax vector too (default true; "
                                                         "400 param_conflict with another method)"),
                     "ignore": dict(PATTERNS, description="module names left unquantized (fnmatch), added to the defaults"),
                     "ignore_defaults": B, "max_shard_bytes": I_(1, I64_MAX),
                     "output": S_(pattern=ABS_PATH, maxLength=1024), "overwrite": B}, required=["method"]),
}
for name, sch in JOB_PARAMS.items():
    schemas["Params_" + name] = sch

# A job request is one of these, told apart by "type": each type's params
# are its own (an unknown param is a 400 naming the accepted ones).
for name in JOB_TYPES:
    req = ["type", "model"] + (["params"] if JOB_PARAMS[name].get("required") else [])
    schemas["JobRequest_" + name] = {
        "type": "object", "required": req, "additionalProperties": False,
        "properties": {"type": enum(name),
                       "model": ({"anyOf": [MODEL_REPO, MODEL_S3]} if name == "download" else
                                 dict(MODEL_ANY, anyOf=MODEL_ANY["anyOf"] + [MODEL_REDIS]) if name == "warm_load" else
                                 MODEL_ANY),
                       "revision": REVISION_S,
                       "params": ref("Params_" + name)}}
schemas["JobRequest"] = {"oneOf": [ref("JobRequest_" + n) for n in JOB_TYPES],
                         "discriminator": {"propertyName": "type",
                                           "mapping": {n: "#/components/schemas/JobRequest_" + n for n in JOB_TYPES}}}

SSE = resp("event stream: `state` (a Job), `progress` (a ProgressEvent), `log`, `resident`, `resync`",
           {"type": "string"}, "text/event-stream")
JOB_ID_P = path_param("id", S_(pattern=JOB_ID))
RES_ID_P = path_param("id", S_(pattern=RESIDENT_ID))
ORG_P = dict(path_param("org", S_(pattern="^" + REPO_PART + "$", maxLength=96)), example="acme")
NAME_P = dict(path_param("name", S_(pattern="^" + REPO_PART + "$", maxLength=96)), example="tiny")
OBJ = {"type": "object"}
paths = {
    "/healthz": {"get": op("liveness", {"200": resp("ok", OBJ)}, security=False)},
    "/readyz": {"get": op("readiness: store open, workers running", {"200": resp("ready", OBJ), "503": resp("not ready", OBJ)}, security=False)},
    "/openapi.json": {"get": op("this document", {"200": resp("OpenAPI 3 document", OBJ)}, security=False)},
    "/v1/version": {"get": op("build and CUDA versions", {"200": resp("version", ref("Version")), **ERR})},
    "/v1/jobs": {
        "post": op("submit a job", {"202": resp("created", ref("Job")), "200": resp("existing job for this Idempotency-Key", ref("Job")),
                                     "409": PROBLEM, "413": PROBLEM, "422": PROBLEM, "503": PROBLEM, **ERR},
                   params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": S_(pattern="^[!-~]+$", minLength=1, maxLength=255)}],
                   body=ref("JobRequest")),
        "get": op("list jobs, newest first", {"200": resp("jobs", ref("JobList")), **ERR},
                  params=[query("state", S_(enum=JOB_STATES)), query("type", S_(enum=JOB_TYPES)),
                          query("model", S_(pattern=NO_NUL, maxLength=1024)),
                          query("parent", S_(pattern=JOB_ID, description="only the steps of this prepare job")),
                          query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
                          query("cursor", S_(pattern=CURSOR, description="next_cursor of the previous page"))]),
    },
    "/v1/jobs/{id}": {
        "get": op("one job", {"200": resp("job", ref("Job")), "404": PROBLEM, **ERR}, params=[JOB_ID_P]),
        "delete": op("cancel a queued or running job", {"202": resp("cancelling", ref("Job")), "404": PROBLEM, "409": PROBLEM, **ERR}, params=[JOB_ID_P]),
    },
    "/v1/jobs/{id}/events": {"get": op("progress, log and state events until the job ends", {"200": SSE, "404": PROBLEM, **ERR}, params=[JOB_ID_P])},
    "/v1/events": {"get": op("every job and resident change (SSE), resumable with Last-Event-ID", {"200": SSE, **ERR},
                             params=[{"name": "Last-Event-ID", "in": "header", "required": False, "schema": S_(pattern="^[0-9]{1,18}$")}])},
    "/v1/devices": {"get": op("devices weights can be placed on", {"200": resp("devices", {"type": "object", "required": ["devices"], "properties": {"devices": {"type": "array", "items": ref("Device")},
                                                                                                                               "cuda_error": nullable(S_(description="why CUDA discovery found no device (e.g. a driver older than the runtime); null when it did not fail"))}}), **ERR})},
    "/v1/models": {"get": op("every model a job can take: one entry per cached hub revision (kind hub), each model folder under the model roots (local) and our outputs (converted, sharded), each copy of an s3:// download (s3, listed by its s3:// URL), each with its last inspection", {"200": resp("models", {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": ref("ModelSummary")}}}), **ERR})},
    "/v1/models/{org}/{name}": {
        "get": op("one cached model with its files and last inspection", {"200": resp("model", ref("Model")), "404": PROBLEM, **ERR},
                  params=[ORG_P, NAME_P, query("revision", S_(pattern=REVISION, maxLength=255))]),
        "delete": op("evict from the cache", {"200": resp("evicted", {"type": "object", "properties": {"model": S, "evicted": B}}), "404": PROBLEM, "409": PROBLEM, **ERR},
                     params=[ORG_P, NAME_P]),
    },
    "/v1/residents": {"get": op("warm-loaded weights held by the server", {"200": resp("residents", {"type": "object", "required": ["residents"], "properties": {"residents": {"type": "array", "items": ref("Resident")}}}), **ERR})},
    "/v1/residents/{id}": {
        "get": op("one resident with its tensor table", {"200": resp("resident", ref("Resident")), "404": PROBLEM, **ERR}, params=[RES_ID_P]),
        "delete": op("unload: frees its device memory. 409 when it is not loaded, or when its CUDA IPC handle was handed out over the export socket "
                     "(another process may still map the memory) unless force=true",
                     {"200": resp("unloaded", {"type": "object", "properties": {"id": S, "state": S_(enum=["unloaded"])}}), "404": PROBLEM, "409": PROBLEM, **ERR},
                     params=[RES_ID_P, query("force", {"type": "boolean", "default": False})]),
    },
    "/v1/residents/{id}/digest": {"get": op("sha256 of every tensor read back from its device (off the HTTP threads; 503 while 4 digests are already running)", {"200": resp("digests", {"type": "object", "properties": {"id": S, "tensors": {"type": "array", "items": {"type": "object", "properties": {"name": S, "device": I_(0), "rank": I_(0), "sha256": S_(pattern="^[0-9a-f]{64}$")}}}}}), "404": PROBLEM, "503": PROBLEM, **ERR}, params=[RES_ID_P])},
    "/metrics": {"get": op("Prometheus text exposition", {"200": resp("metrics", {"type": "string"}, "text/plain"), "401": PROBLEM})},
    "/": {"get": op("the web dashboard (HTML); it asks for the token itself", {"200": resp("page", {"type": "string"}, "text/html")}, tags=["dashboard"], security=False)},
    "/ui/{file}": {"get": op("a static file of the dashboard", {"200": {"description": "file", "content": {"text/javascript": {"schema": S}, "text/css": {"schema": S}}}, "404": PROBLEM},
                             params=[path_param("file", S_(enum=["app.js", "style.css"]))], tags=["dashboard"], security=False)},
}

def build():
    p = dict(paths)
    return {
        "openapi": "3.0.3",
        "info": {"title": "modelprep", "version": "0.1.0",
                 "description": "Model-preparation service for GPU nodes. This document is the "
                                "contract; openapi/README.md describes it for people."},
        "servers": [{"url": "http://127.0.0.1:8420"}],
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": p,
    }

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(__file__), "..", "openapi", "openapi.yaml")
    with open(out, "w") as f:
        json.dump(build(), f, indent=1, sort_keys=False)
        f.write("\n")
