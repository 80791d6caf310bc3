"""Job outputs are models, and the prepare job (issue #13).

Against the real server: the output of convert and shard is the next job's
model (by the result's next_model), GET /v1/models lists every kind, two jobs
never write one output folder, an existing output is replaced only with
overwrite, and `prepare` makes a hub repo ready for an engine in one request
(served by the C test hub, loaded on --devices host:2), with child jobs,
steps, skip-when-in-place, failure, cancel and crash recovery."""
import fcntl
import json
import os
import time

import pytest
import torch

import tp_models as tm
from test_download import Hub
from test_events import SSE

HOST2 = ["--devices", "host:2"]


def bin_model(d, layers=1, vocab=1000, seed=0):
    """A llama checkpoint that only has pytorch_model.bin (needs a convert)."""
    cfg = tm.make_config("llama", layers=layers, vocab=vocab)
    sd = tm.make_state(cfg, seed=seed)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128}, f)
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    return cfg


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prephub")
    bin_model(str(root / "acme" / "llama-bin"))
    # big enough that a slowed hub takes a while and a convert is not instant
    bin_model(str(root / "acme" / "llama-big"), layers=2, vocab=16000, seed=1)
    return str(root)


@pytest.fixture
def hub(hub_root):
    hubs = []

    def factory(*flags):
        h = Hub(hub_root, *flags)
        hubs.append(h)
        return h

    yield factory
    for h in hubs:
        h.stop()


def ok(doc):
    assert doc["state"] == "succeeded", doc
    return doc["result"]


def children(s, job_id):
    st, doc = s.get("/v1/jobs?parent=%s&limit=50" % job_id)
    assert st == 200, doc
    return doc["jobs"]


# --------------------------------------------------------------------------- outputs are models

def test_outputs_chain_by_next_model(make_server, model_root):
    """convert -> inspect / shard / warm_load on its output, shard -> warm_load
    on its output, each by the previous result's next_model; GET /v1/models
    lists local, converted and sharded models."""
    bin_model(str(model_root / "old"))
    s = make_server(args=["--model-root", str(model_root)] + HOST2)
    conv = ok(s.run_job({"type": "convert", "model": str(model_root / "old")}))
    nxt = conv["next_model"]
    assert nxt == conv["output_path"]
    assert nxt == os.path.join(os.path.realpath(s.data_dir), "converted", "old")
    insp = ok(s.run_job({"type": "inspect", "model": nxt, "params": {"tp_sizes": [2]}}))
    assert insp["next_model"] == nxt
    sh = ok(s.run_job({"type": "shard", "model": nxt, "params": {"tp_size": 2}}))
    assert sh["next_model"] == os.path.join(os.path.realpath(s.data_dir), "sharded", "old-tp2")
    wl = ok(s.run_job({"type": "warm_load", "model": sh["next_model"],
                       "params": {"tp_size": 2, "load_format": "sharded_state"}}))
    assert wl["resident_id"]
    wl2 = ok(s.run_job({"type": "warm_load", "model": nxt,
                        "params": {"tp_size": 1, "keep_resident": False}}))
    assert wl2["bytes"] > 0

    st, doc = s.get("/v1/models")
    assert st == 200
    kinds = {(m["kind"], m["path"]) for m in doc["models"]}
    assert ("local", os.path.realpath(str(model_root / "old"))) in kinds
    assert ("converted", nxt) in kinds
    assert ("sharded", sh["next_model"]) in kinds
    for m in doc["models"]:
        assert m["size_bytes"] > 0 and m["model"] == m["path"]


def test_outside_the_roots_names_them(make_server, model_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    bin_model(str(elsewhere))
    s = make_server(args=["--model-root", str(model_root)])
    st, doc = s.post("/v1/jobs", {"type": "inspect", "model": str(elsewhere)})
    assert st == 400, doc
    assert str(os.path.realpath(model_root)) in doc["detail"]
    assert os.path.join(os.path.realpath(s.data_dir), "converted") in doc["detail"]


def test_same_output_refused_while_active(make_server, model_root):
    """Two converts of one model (different dtypes) at once: the second is a
    409 output_busy at submit; at run time a held lock fails the job."""
    bin_model(str(model_root / "m"))
    s = make_server(args=["--model-root", str(model_root), "--workers", "1"])
    # the one worker is kept busy, so the first convert stays queued
    blocker = s.submit({"type": "convert", "model": str(model_root / "m"),
                        "params": {"output": str(model_root / "blocker")}})
    first = s.submit({"type": "convert", "model": str(model_root / "m"),
                      "params": {"dtype": "fp16"}})
    st, doc = s.post("/v1/jobs", {"type": "convert", "model": str(model_root / "m"),
                                  "params": {"dtype": "fp32"}})
    assert st == 409, doc
    assert doc["errors"][0]["code"] == "output_busy", doc
    assert first["id"] in doc["detail"]
    ok(s.wait_job(blocker["id"]))
    ok(s.wait_job(first["id"]))
    # once it has ended the folder is free (and replaced only with overwrite)
    ok(s.run_job({"type": "convert", "model": str(model_root / "m"),
                  "params": {"dtype": "fp32", "overwrite": True}}))
    # the run-time lock: another holder of <output>.lock
    lock = os.path.join(os.path.realpath(s.data_dir), "converted", ".m.lock")
    assert os.path.exists(lock)
    with open(lock, "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        d = s.run_job({"type": "convert", "model": str(model_root / "m"),
                       "params": {"overwrite": True}})
    assert d["state"] == "failed" and d["error"]["code"] == "output_busy", d


def test_existing_output_needs_overwrite(make_server, model_root):
    bin_model(str(model_root / "m"))
    s = make_server(args=["--model-root", str(model_root)])
    job = {"type": "convert", "model": str(model_root / "m"), "params": {"dtype": "fp16"}}
    r1 = ok(s.run_job(job))
    d = s.run_job({"type": "convert", "model": str(model_root / "m"),
                   "params": {"dtype": "fp32"}})
    assert d["state"] == "failed" and d["error"]["code"] == "output_exists", d
    assert "overwrite" in d["error"]["message"]
    # the first job's files are untouched
    assert {f["name"]: f["size"] for f in r1["files"]} == {
        n: os.path.getsize(os.path.join(r1["output_path"], n)) for n in
        (f["name"] for f in r1["files"])}
    r3 = ok(s.run_job({"type": "convert", "model": str(model_root / "m"),
                       "params": {"dtype": "fp32", "overwrite": True}}))
    assert r3["output_path"] == r1["output_path"]
    # shard too
    nxt = r3["next_model"]
    ok(s.run_job({"type": "shard", "model": nxt, "params": {"tp_size": 2}}))
    d = s.run_job({"type": "shard", "model": nxt, "params": {"tp_size": 2}})
    assert d["state"] == "failed" and d["error"]["code"] == "output_exists", d
    assert "overwrite" in d["error"]["message"]
    ok(s.run_job({"type": "shard", "model": nxt, "params": {"tp_size": 2, "overwrite": True}}))


# --------------------------------------------------------------------------- prepare

PREP = {"type": "prepare", "model": "acme/llama-bin",
        "params": {"for": "sglang", "tp_size": 2, "load": True}}


def step_states(doc):
    return [(s["type"], s["state"]) for s in doc["steps"]]


def test_prepare_to_ready_then_all_skipped(make_server, hub):
    h = hub()
    s = make_server(args=["--hub-endpoint", h.url] + HOST2)
    j = s.submit(PREP)
    sse = SSE(s, "/v1/jobs/%s/events" % j["id"])
    evs = sse.until(lambda e: e["event"] == "state" and
                    json.loads(e["data"])["state"] in ("succeeded", "failed", "cancelled"))
    sse.close()
    d = s.wait_job(j["id"])
    r = ok(d)
    assert step_states(d) == [("download", "succeeded"), ("convert", "succeeded"),
                              ("inspect", "succeeded"), ("shard", "succeeded"),
                              ("warm_load", "succeeded")]
    assert any(e["event"] == "steps" for e in evs)
    # each step is a child job with "parent"
    kids = children(s, j["id"])
    assert sorted(k["type"] for k in kids) == sorted(t for t, _ in step_states(d))
    by_id = {k["id"]: k for k in kids}
    for step in d["steps"]:
        k = by_id[step["job"]]
        assert k["parent"] == j["id"] and k["state"] == "succeeded" and k["type"] == step["type"]
    assert d["parent"] is None
    data = os.path.realpath(s.data_dir)
    assert r["next_model"] == os.path.join(data, "sharded", "acme--llama-bin-main-tp2")
    assert r["load_format"] == "sharded_state" and r["resident_id"]
    st, res = s.get("/v1/residents/" + r["resident_id"])
    assert st == 200 and len(res["devices"]) == 2
    st, models = s.get("/v1/models")
    kinds = {m["kind"] for m in models["models"]}
    assert {"hub", "converted", "sharded"} <= kinds

    # again: everything verifies, nothing runs
    t0 = time.time()
    d2 = s.run_job(PREP)
    assert time.time() - t0 < 5
    r2 = ok(d2)
    assert all(st == "skipped" for _, st in step_states(d2)), d2["steps"]
    assert all(x.get("reason") for x in d2["steps"])
    assert children(s, d2["id"]) == []
    assert r2["next_model"] == r["next_model"] and r2["resident_id"] == r["resident_id"]
    assert r2["ran"] == 0 and r2["skipped"] == 5

    # a removed output is made again, and only what depends on it
    os.remove(os.path.join(r["next_model"], "model-rank-1-part-0.safetensors"))
    d3 = s.run_job(PREP)
    ok(d3)
    assert dict(step_states(d3)) == {"download": "skipped", "convert": "skipped",
                                     "inspect": "skipped", "shard": "succeeded",
                                     "warm_load": "succeeded"}


def test_prepare_offline_uses_cache(make_server, hub, tmp_path):
    h = hub()
    data = tmp_path / "data"
    s = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    job = {"type": "prepare", "model": "acme/llama-bin", "params": {"for": "vllm", "tp_size": 2}}
    d = s.run_job(job)
    assert [t for t, _ in step_states(ok(d) and d)] == ["download", "convert", "inspect"]
    s.stop()
    h.stop()
    s2 = make_server(args=["--hub-endpoint", h.url], data_dir=data)  # the hub is gone
    d2 = s2.run_job(job)
    r2 = ok(d2)
    assert r2["offline"] is True
    assert all(st == "skipped" for _, st in step_states(d2))
    assert "could not be reached" in d2["steps"][0]["reason"]


def test_prepare_failure_stops_at_the_step(make_server, hub, model_root):
    h = hub()
    s = make_server(args=["--hub-endpoint", h.url, "--model-root", str(model_root)])
    d = s.run_job({"type": "prepare", "model": "acme/nope", "params": {}})
    assert d["state"] == "failed", d
    assert d["error"]["code"] == "repo_not_found", d
    assert d["error"]["message"].startswith("step download: ")
    assert step_states(d)[0] == ("download", "failed")
    kid = children(s, d["id"])
    assert len(kid) == 1 and kid[0]["error"]["code"] == "repo_not_found"
    # a later step: a model whose config makes tp 3 impossible fails at shard
    bin_model(str(model_root / "m"))
    d = s.run_job({"type": "prepare", "model": str(model_root / "m"), "params": {"tp_size": 3}})
    assert d["state"] == "failed", d
    assert d["error"]["message"].startswith("step shard: "), d["error"]
    assert dict(step_states(d))["shard"] == "failed"
    assert dict(step_states(d))["convert"] == "succeeded"
    # bad params are a 400 at submit
    st, doc = s.post("/v1/jobs", {"type": "prepare", "model": "acme/llama-bin",
                                  "params": {"for": "tgi"}})
    assert st == 400, doc


def test_prepare_cancel_cascades(make_server, hub):
    h = hub("--slow", "300000")
    s = make_server(args=["--hub-endpoint", h.url])
    j = s.submit({"type": "prepare", "model": "acme/llama-big", "params": {}})
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = children(s, j["id"])
        if kids and kids[0]["state"] == "running" and kids[0]["progress"]["done"] > 0:
            break
        time.sleep(0.05)
    kid = kids[0]
    assert kid["type"] == "download"
    st, _ = s.delete("/v1/jobs/" + j["id"])
    assert st == 202
    d = s.wait_job(j["id"], timeout=30)
    assert d["state"] == "cancelled", d
    k = s.wait_job(kid["id"], timeout=30)
    assert k["state"] == "cancelled", k
    assert step_states(d) == [("download", "cancelled"), ("convert", "pending"),
                              ("inspect", "pending")]


def test_prepare_resumes_after_kill9(make_server, hub, tmp_path):
    h = hub("--slow", "2000000")
    data = tmp_path / "data"
    s = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    j = s.submit({"type": "prepare", "model": "acme/llama-big", "params": {"tp_size": 2}})
    # kill once the download has succeeded (as late as we catch it)
    deadline = time.time() + 90
    doc = None
    while time.time() < deadline:
        st, doc = s.get("/v1/jobs/" + j["id"])
        steps = dict(step_states(doc)) if doc.get("steps") else {}
        if steps.get("download") == "succeeded" or doc["state"] not in ("queued", "running"):
            break
        time.sleep(0.02)
    if doc["state"] == "succeeded":
        pytest.skip("the prepare finished before the kill; nothing to resume")
    assert doc["state"] == "running", doc
    first_download = [x for x in doc["steps"] if x["type"] == "download"][0]["job"]
    s.kill9()
    s2 = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    d = s2.wait_job(j["id"], timeout=120)
    ok(d)
    assert [st for _, st in step_states(d)] == ["succeeded"] * 4, d["steps"]
    # the download was not run again: the same child, and only one
    steps = {x["type"]: x for x in d["steps"]}
    assert steps["download"]["job"] == first_download
    kids = children(s2, j["id"])
    assert [k["id"] for k in kids if k["type"] == "download"] == [first_download]
    # a child the crash cut short was failed as interrupted, never re-queued
    for k in kids:
        if k["id"] not in {x["job"] for x in d["steps"]}:
            assert k["state"] == "failed" and k["error"]["code"] == "interrupted", k


def test_prepare_drain_requeues_and_resumes(make_server, hub, tmp_path):
    """SIGTERM mid-step: the child ends interrupted, the prepare goes back to
    the queue and finishes after the restart (the download resuming)."""
    h = hub("--slow", "1000000")
    data = tmp_path / "data"
    s = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    j = s.submit({"type": "prepare", "model": "acme/llama-big", "params": {"for": "vllm"}})
    deadline = time.time() + 60
    kids = []
    while time.time() < deadline:
        kids = children(s, j["id"])
        if kids and kids[0]["progress"]["done"] > 0:
            break
        time.sleep(0.05)
    assert s.stop() == 0
    s2 = make_server(args=["--hub-endpoint", h.url], data_dir=data, start=False)
    s2.start()
    first = s2.get("/v1/jobs/" + kids[0]["id"])[1]
    assert first["state"] == "failed" and first["error"]["code"] == "interrupted", first
    d = s2.wait_job(j["id"], timeout=120)
    ok(d)
    dl = [k for k in children(s2, j["id"]) if k["type"] == "download"]
    assert len(dl) == 2
    done = [k for k in dl if k["state"] == "succeeded"][0]
    assert done["result"]["bytes_resumed"] > 0
