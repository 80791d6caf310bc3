"""warm_load on the async test backend (--devices async:N, gpu/gpu_async.c)
where it does what host devices cannot: a stress run of many concurrent
loads through tiny staging rings, with cancels, whose bytes must equal the
file's (a staging slot refilled before its copy's fence signalled fails the
job with staging_reused or leaves poisoned bytes, so this test fails if the
loader ever reuses a slot early); /v1/devices showing the async kind; and
unloading a resident whose borrowed export (the async stand-in for a CUDA
IPC handle) was handed out: 409 unless ?force=true. The rest of warm_load
runs on async too, in test_warm_load.py."""
import json
import subprocess
import time

import torch

from conftest import tool
from test_warm_load import LLAMA, llama_tensors, load, ok, sha, tp_piece, write_model, digests


def devices_doc(srv):
    s, doc = srv.get("/v1/devices")
    assert s == 200, doc
    return doc


def test_devices_show_async_kind(make_server):
    srv = make_server(args=["--devices", "async:3@64M/0"])
    doc = devices_doc(srv)
    assert [d["kind"] for d in doc["devices"]] == ["async"] * 3
    assert [d["name"] for d in doc["devices"]] == ["async"] * 3
    assert all(d["total_bytes"] == 64 << 20 for d in doc["devices"])
    assert doc["cuda_error"] is None  # no CUDA in this build: nothing failed


def stress_model(model_root):
    """About 1.4 MB of bf16 llama weights, big enough that a 64 KiB ring
    wraps hundreds of times per load."""
    big = dict(LLAMA, hidden_size=128, intermediate_size=512, vocab_size=1000, head_dim=32)
    shapes = {
        "model.embed_tokens.weight": (1000, 128),
        "model.layers.0.self_attn.q_proj.weight": (128, 128),
        "model.layers.0.self_attn.k_proj.weight": (64, 128),
        "model.layers.0.self_attn.v_proj.weight": (64, 128),
        "model.layers.0.self_attn.o_proj.weight": (128, 128),
        "model.layers.0.mlp.gate_proj.weight": (512, 128),
        "model.layers.0.mlp.up_proj.weight": (512, 128),
        "model.layers.0.mlp.down_proj.weight": (128, 512),
        "model.layers.0.input_layernorm.weight": (128,),
        "model.norm.weight": (128,),
        "lm_head.weight": (1000, 128),
    }
    g = torch.Generator().manual_seed(3)
    ts = {k: torch.randn(*s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    return write_model(model_root / "stress", ts, config=big), ts, big


def want_digests(ts, cfg, tp, dtype):
    def piece(name, t, r):
        if tp == 1:
            return t
        # test_warm_load.tp_piece reads the head layout from LLAMA; this model's differs.
        if "k_proj" in name or "v_proj" in name:
            return t.chunk(tp, 0)[r]
        return tp_piece(name, t, tp, r)
    out = {}
    for k, v in ts.items():
        for r in range(tp):
            p = piece(k, v, r)
            out[(k, r)] = sha(p.float() if dtype == "fp32" else p)
    return out


def test_stress_concurrent_loads_tiny_staging_cancels(make_server, model_root):
    m, ts, cfg = stress_model(model_root)
    srv = make_server(args=["--model-root", str(model_root), "--devices", "async:2/1000",
                            "--workers", "6"])
    variants = []
    for i in range(12):
        params = {"staging_bytes": 65536, "readers": 1 + i % 3, "tp_size": 1 + i % 2,
                  "keep_resident": i % 4 != 3}
        if i % 3 == 1:
            params["dtype"] = "fp32"
        variants.append(params)
    jobs = [srv.submit({"type": "warm_load", "model": m, "params": p}) for p in variants]
    # Cancel every third one once it runs (or, if it raced ahead, whatever
    # state it is in): the ring is then torn down with copies in flight.
    for j in jobs[::3]:
        deadline = time.time() + 30
        while time.time() < deadline:
            state = srv.get("/v1/jobs/" + j["id"])[1]["state"]
            if state != "queued":
                break
            time.sleep(0.002)
        s, _ = srv.delete("/v1/jobs/" + j["id"])
        assert s in (202, 409)  # 409: it had already finished
    done = [srv.wait_job(j["id"], timeout=300) for j in jobs]
    for i, (p, doc) in enumerate(zip(variants, done)):
        assert doc["state"] in (("succeeded", "cancelled") if i % 3 == 0 else ("succeeded",)), \
            (p, doc)
        if doc["state"] != "succeeded":
            continue
        r = doc["result"]
        if not p["keep_resident"]:
            assert r["resident_id"] is None
            continue
        want = want_digests(ts, cfg, p["tp_size"], p.get("dtype"))
        assert digests(srv, r["resident_id"]) == want, p
    # Every resident unloads; every cancelled or transient load left nothing.
    s, doc = srv.get("/v1/residents")
    for res in doc["residents"]:
        assert srv.delete("/v1/residents/" + res["id"])[0] == 200
    assert all(d["resident_bytes"] == 0 for d in devices_doc(srv)["devices"])
    assert "staging_reused" not in srv.logs()


def test_unload_after_borrowed_export_needs_force(make_server, model_root, tmp_path):
    ts = llama_tensors()
    m = write_model(model_root / "bx", ts)
    for backend, borrowed in (("async", True), ("host", False)):
        sock = str(tmp_path / ("%s.sock" % backend))
        srv = make_server(args=["--model-root", str(model_root), "--export-socket", sock,
                                "--devices", backend + ":2"])
        rid = ok(load(srv, m, tp_size=2))["resident_id"]
        # Before any export, unloading needs nothing.
        other = ok(load(srv, m))["resident_id"]
        assert srv.delete("/v1/residents/" + other)[0] == 200
        out = subprocess.run([tool("export_consumer"), sock, rid], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert srv.delete("/v1/residents/%s?force=maybe" % rid)[0] == 400
        if borrowed:
            s, doc = srv.delete("/v1/residents/" + rid)
            assert s == 409 and "force=true" in doc["detail"], doc
            assert srv.get("/v1/residents/" + rid)[1]["state"] == "resident"
            assert srv.delete("/v1/residents/%s?force=false" % rid)[0] == 409
            s, doc = srv.delete("/v1/residents/%s?force=true" % rid)
        else:
            # A memfd outlives the unload in the importer: no refusal.
            s, doc = srv.delete("/v1/residents/" + rid)
        assert s == 200 and doc["state"] == "unloaded", doc
        assert all(d["resident_bytes"] == 0 for d in devices_doc(srv)["devices"])
        assert srv.stop() == 0


def test_device_convert_arena_pool_and_staging_cap(make_server, model_root):
    """Casts on the device (device_convert: raw bf16 through staging, the
    cast queued on the device after its copy, as on a GPU) give torch's
    fp32 bytes; an unloaded resident's arena goes to the pool and the next
    load reuses it (devices[].arena_reused) with the right bytes; and a
    staging_bytes over --staging-cap is refused at submit (400)."""
    m, ts, cfg = stress_model(model_root)
    srv = make_server(args=["--model-root", str(model_root), "--devices", "async:2/100",
                            "--staging-cap", "1048576"])
    s, doc = srv.post("/v1/jobs", {"type": "warm_load", "model": m,
                                   "params": {"staging_bytes": 2 << 20}})
    assert s == 400, doc
    assert "staging_cap" in json.dumps(doc) and "params.staging_bytes" in json.dumps(doc), doc
    want = want_digests(ts, cfg, 1, "fp32")
    params = {"dtype": "fp32", "device_convert": True, "staging_bytes": 65536}
    first = srv.run_job({"type": "warm_load", "model": m, "params": params})
    assert first["state"] == "succeeded", first
    r = first["result"]
    assert r["device_converted_bytes"] == r["bytes"]
    assert r["devices"][0]["arena_reused"] is False
    assert digests(srv, r["resident_id"]) == want
    assert srv.delete("/v1/residents/" + r["resident_id"])[0] == 200
    second = srv.run_job({"type": "warm_load", "model": m, "params": params})
    assert second["state"] == "succeeded", second
    r = second["result"]
    assert r["devices"][0]["arena_reused"] is True
    assert digests(srv, r["resident_id"]) == want
    assert "staging_reused" not in srv.logs()
