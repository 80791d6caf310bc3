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

def path_param(name):
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}

def query(name, schema):
    return {"name": name, "in": "query", "required": False, "schema": schema}

schemas = {
    "Problem": {"type": "object", "required": ["type", "title", "status", "detail"],
                "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                               "status": {"type": "integer"}, "detail": {"type": "string"},
                               "errors": {"type": "array", "items": {"type": "object", "properties": {
                                   "field": {"type": "string"}, "code": {"type": "string"},
                                   "message": {"type": "string"}}}}}},
    "JobRequest": {"type": "object", "required": ["type", "model"], "additionalProperties": False,
                   "properties": {"type": {"type": "string", "enum": ["download", "convert", "inspect", "shard", "warm_load", "verify", "prepare"]},
                                  "model": {"type": "string", "description": "hub repo id org/name, or an absolute path under a --model-root, <data>/converted or <data>/sharded (a job result's next_model)"},
                                  "revision": {"type": "string", "default": "main"},
                                  "params": {"type": "object", "description": "see Params_<type>"}}},
    "Progress": {"type": "object", "properties": {"done": {"type": "integer"}, "total": {"type": "integer"},
                                                  "unit": {"type": "string"}, "rate": {"type": "number"},
                                                  "message": {"type": "string"}}},
    "JobError": {"type": "object", "nullable": True, "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
    "Job": {"type": "object", "required": ["id", "type", "model", "revision", "params", "state", "progress", "result", "error", "created_at"],
            "properties": {"id": {"type": "string"}, "type": {"type": "string"}, "model": {"type": "string"},
                           "revision": {"type": "string"}, "params": {"type": "object"},
                           "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                           "progress": ref("Progress"), "result": {"type": "object", "nullable": True},
                           "error": ref("JobError"),
                           "created_at": {"type": "string", "format": "date-time"},
                           "started_at": {"type": "string", "format": "date-time", "nullable": True},
                           "finished_at": {"type": "string", "format": "date-time", "nullable": True},
                           "parent": {"type": "string", "nullable": True,
                                      "description": "the prepare job this job is a step of (null for a job submitted on its own)"},
                           "steps": {"type": "array", "description": "prepare only: its plan, updated as it runs",
                                     "items": ref("Step")}}},
    "Step": {"type": "object", "required": ["type", "state"],
             "properties": {"type": {"type": "string", "enum": ["download", "convert", "inspect", "shard", "warm_load"]},
                            "job": {"type": "string", "nullable": True, "description": "the child job (GET /v1/jobs?parent=<id> lists them)"},
                            "state": {"type": "string", "enum": ["pending", "running", "succeeded", "failed", "cancelled", "skipped"]},
                            "reason": {"type": "string", "description": "why it runs or is skipped"},
                            "model": {"type": "string", "description": "what the step works on"}}},
    "JobList": {"type": "object", "properties": {"jobs": {"type": "array", "items": ref("Job")},
                                                 "next_cursor": {"type": "string", "nullable": True}}},
    "Device": {"type": "object", "properties": {"index": {"type": "integer"}, "kind": {"type": "string", "enum": ["cuda", "host", "async"],
                                                         "description": "async: the test backend of --devices async:N (host memory, late copies, real fences)"},
                                                "name": {"type": "string"}, "total_bytes": {"type": "integer"},
                                                "free_bytes": {"type": "integer"}, "resident_bytes": {"type": "integer"},
                                                "compute_capability": {"type": "string", "nullable": True},
                                                "pci_bus_id": {"type": "string", "nullable": True}}},
    "Version": {"type": "object", "properties": {"version": {"type": "string"}, "git": {"type": "string"},
                                                 "cuda": {"type": "object", "nullable": True, "properties": {
                                                     "runtime": {"type": "integer"}, "driver": {"type": "integer"}}}}},
    "Model": {"type": "object", "properties": {"model": {"type": "string", "description": "what to pass as a job's model"},
                                               "kind": {"type": "string", "enum": ["hub", "local", "converted", "sharded"]},
                                               "revision": {"type": "string"},
                                               "commit": {"type": "string"}, "path": {"type": "string"},
                                               "size_bytes": {"type": "integer"}, "files": {},
                                               "formats": {"type": "array", "items": {"type": "string"}},
                                               "inspection": {"type": "object", "nullable": True,
                                                              "description": "the last inspect job's result on this model and revision (a path model: revision main): {result, job_id, at}, null when never inspected"}}},
    "Resident": {"type": "object", "properties": {"id": {"type": "string"}, "model": {"type": "string"},
                                                  "revision": {"type": "string"}, "state": {"type": "string"},
                                                  "bytes": {"type": "integer"}, "devices": {"type": "array", "items": {"type": "object"}},
                                                  "tensors": {"type": "array", "items": {"type": "object", "properties": {
                                                      "name": {"type": "string"}, "dtype": {"type": "string"},
                                                      "shape": {"type": "array", "items": {"type": "integer"}},
                                                      "device": {"type": "integer"}, "offset": {"type": "integer"},
                                                      "bytes": {"type": "integer"}}}}}},
}

def obj(props):
    return {"type": "object", "additionalProperties": False, "properties": props}

S, I, B, N = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
SA, IA = {"type": "array", "items": S}, {"type": "array", "items": I}
def enum(*v):
    return {"type": "string", "enum": list(v)}

# One schema per job type's params; tests/unit/test_core.c checks that each
# matches the type's mp_param_spec (names, JSON types, enums).
JOB_PARAMS = {
    "download": obj({"allow_patterns": SA, "ignore_patterns": SA,
                     "load_format": enum("auto", "safetensors", "pt", "gguf", "all"),
                     "endpoint": S, "connections": I, "chunk_bytes": I, "max_retries": I}),
    "convert": obj({"dtype": enum("keep", "bf16", "fp16", "fp32"), "max_shard_bytes": I,
                    "output": S, "file": S, "encryption_key_file": S, "overwrite": B}),
    "inspect": obj({"tp_sizes": IA, "kv_cache_scales_file": S}),
    "shard": obj({"tp_size": I, "max_part_bytes": I, "naming": enum("sglang", "hf"),
                  "output": S, "overwrite": B}),
    "warm_load": obj({"load_format": enum("auto", "safetensors", "pt", "gguf", "npcache", "sharded_state", "dummy"),
                      "devices": IA, "tp_size": I, "dtype": enum("auto", "keep", "bf16", "fp16", "fp32"),
                      "decryption_key_file": S,
                      "dummy": {"type": "object", "properties": {"low": N, "high": N, "seed": I}},
                      "keep_resident": B, "staging_bytes": I, "direct_io": B, "host_direct": B,
                      "readers": I}),
    "verify": obj({}),
    "prepare": obj({"for": enum("sglang", "vllm", "transformers"), "tp_size": I, "devices": IA,
                    "dtype": enum("keep", "bf16", "fp16", "fp32"), "load": B, "allow_patterns": SA}),
}
for name, sch in JOB_PARAMS.items():
    schemas["Params_" + name] = sch

SSE = resp("event stream", {"type": "string"}, "text/event-stream")
paths = {
    "/healthz": {"get": op("liveness", {"200": resp("ok", {"type": "object"})}, security=False)},
    "/readyz": {"get": op("readiness: store open, workers running", {"200": resp("ready", {"type": "object"}), "503": resp("not ready", {"type": "object"})}, security=False)},
    "/openapi.json": {"get": op("this document", {"200": resp("OpenAPI 3 document", {"type": "object"})}, security=False)},
    "/v1/version": {"get": op("build and CUDA versions", {"200": resp("version", ref("Version")), **ERR})},
    "/v1/jobs": {
        "post": op("submit a job", {"202": resp("created", ref("Job")), "200": resp("existing job for this Idempotency-Key", ref("Job")),
                                     "409": PROBLEM, "413": PROBLEM, "422": PROBLEM, "503": PROBLEM, **ERR},
                   params=[{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}}],
                   body=ref("JobRequest")),
        "get": op("list jobs, newest first", {"200": resp("jobs", ref("JobList")), **ERR},
                  params=[query("state", {"type": "string"}), query("type", {"type": "string"}), query("model", {"type": "string"}),
                          query("parent", {"type": "string"}),
                          query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}), query("cursor", {"type": "string"})]),
    },
    "/v1/jobs/{id}": {
        "get": op("one job", {"200": resp("job", ref("Job")), "404": PROBLEM, **ERR}, params=[path_param("id")]),
        "delete": op("cancel a queued or running job", {"202": resp("cancelling", ref("Job")), "404": PROBLEM, "409": PROBLEM, **ERR}, params=[path_param("id")]),
    },
    "/v1/jobs/{id}/events": {"get": op("progress, log and state events until the job ends", {"200": SSE, "404": PROBLEM, **ERR}, params=[path_param("id")])},
    "/v1/events": {"get": op("every job and resident change (SSE), resumable with Last-Event-ID", {"200": SSE, **ERR},
                             params=[{"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}}])},
    "/v1/devices": {"get": op("devices weights can be placed on", {"200": resp("devices", {"type": "object", "properties": {"devices": {"type": "array", "items": ref("Device")},
                                                                                                       "cuda_error": {"type": "string", "nullable": True,
                                                                                                                      "description": "why CUDA discovery found no device (e.g. a driver older than the runtime); null when it did not fail"}}}), **ERR})},
    "/v1/models": {"get": op("every model a job can take: the hub cache (kind hub), the model roots (local) and our outputs (converted, sharded), each with its last inspection", {"200": resp("models", {"type": "object", "properties": {"models": {"type": "array", "items": ref("Model")}}}), **ERR})},
    "/v1/models/{org}/{name}": {
        "get": op("one cached model with its files and last inspection", {"200": resp("model", ref("Model")), "404": PROBLEM, **ERR},
                  params=[path_param("org"), path_param("name"), query("revision", {"type": "string"})]),
        "delete": op("evict from the cache", {"200": resp("evicted", {"type": "object"}), "404": PROBLEM, "409": PROBLEM, **ERR},
                     params=[path_param("org"), path_param("name")]),
    },
    "/v1/residents": {"get": op("warm-loaded weights held by the server", {"200": resp("residents", {"type": "object", "properties": {"residents": {"type": "array", "items": ref("Resident")}}}), **ERR})},
    "/v1/residents/{id}": {
        "get": op("one resident with its tensor table", {"200": resp("resident", ref("Resident")), "404": PROBLEM, **ERR}, params=[path_param("id")]),
        "delete": op("unload: frees its device memory. 409 when it is not loaded, or when its CUDA IPC handle was handed out over the export socket "
                     "(another process may still map the memory) unless force=true",
                     {"200": resp("unloaded", {"type": "object"}), "404": PROBLEM, "409": PROBLEM, **ERR},
                     params=[path_param("id"), query("force", {"type": "boolean", "default": False})]),
    },
    "/v1/residents/{id}/digest": {"get": op("sha256 of every tensor read back from its device", {"200": resp("digests", {"type": "object", "properties": {"tensors": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "sha256": {"type": "string"}}}}}}), "404": PROBLEM, **ERR}, params=[path_param("id")])},
    "/metrics": {"get": op("Prometheus text exposition", {"200": resp("metrics", {"type": "string"}, "text/plain"), "401": PROBLEM})},
    "/": {"get": op("the web dashboard (HTML); it asks for the token itself", {"200": resp("page", {"type": "string"}, "text/html")}, tags=["dashboard"], security=False)},
    "/ui/{file}": {"get": op("a static file of the dashboard (app.js, style.css)", {"200": resp("file", {"type": "string"}, "text/plain"), "404": PROBLEM}, params=[path_param("file")], tags=["dashboard"], security=False)},
}

def build():
    p = dict(paths)
    return {
        "openapi": "3.0.3",
        "info": {"title": "modelprep", "version": "0.1.0",
                 "description": "Model-preparation service for GPU nodes. Contract: shared/api.md."},
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
