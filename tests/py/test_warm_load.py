"""warm_load end to end without a GPU: every load format, tensor-parallel
placement on four devices, dtype casts, dummy weights, cancel, out of device
memory, the export socket, encrypted safetensors, residents across a restart
and the 409 on evicting a resident model. Every test runs twice: on `host:4`
(copies are memcpys done on return, plain tensors spliced into the arena) and
on `async:4` (gpu/gpu_async.c: arenas not CPU-addressable, so everything goes
through the staging ring; copies complete late on a worker thread, fences
signal only then, and a staging slot refilled early fails the load), so that
the loader keeps the rules a GPU enforces. Expected bytes come from the real
producers (torch, safetensors, numpy, gguf-py), never from modelprepd."""
import hashlib
import json
import os
import subprocess
import time

import numpy as np
import pytest
import torch
import safetensors.torch as st

from conftest import tool

BACKENDS = ["host", "async"]


@pytest.fixture(params=BACKENDS)
def dev4(request):
    """--devices for four devices of each backend in turn."""
    return ["--devices", request.param + ":4"]
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 100,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def sha(t):
    if isinstance(t, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def llama_tensors(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (100, 32),
        "model.layers.0.self_attn.q_proj.weight": (32, 32),
        "model.layers.0.self_attn.k_proj.weight": (16, 32),
        "model.layers.0.self_attn.v_proj.weight": (16, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 32),
        "model.layers.0.mlp.gate_proj.weight": (64, 32),
        "model.layers.0.mlp.up_proj.weight": (64, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 64),
        "model.layers.0.input_layernorm.weight": (32,),
        "model.layers.0.post_attention_layernorm.weight": (32,),
        "model.norm.weight": (32,),
        "lm_head.weight": (100, 32),
    }
    return {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items()}


def write_model(d, tensors, config=LLAMA, name="model.safetensors"):
    os.makedirs(d, exist_ok=True)
    st.save_file(tensors, os.path.join(d, name), metadata={"format": "pt"})
    if config is not None:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
    return str(d)


def tp_piece(name, t, tp, r):
    """What SGLang's layers hold on rank r (HF names kept)."""
    if tp == 1:
        return t
    if "embed_tokens" in name or "lm_head" in name:
        padded = (t.shape[0] + 63) // 64 * 64
        full = torch.cat([t, torch.zeros(padded - t.shape[0], *t.shape[1:], dtype=t.dtype)])
        return full.chunk(tp, 0)[r]
    if "k_proj" in name or "v_proj" in name:
        kv, hd = LLAMA["num_key_value_heads"], LLAMA["head_dim"]
        if tp <= kv:
            return t.chunk(tp, 0)[r]
        h = r // (tp // kv)
        return t[h * hd:(h + 1) * hd]
    if any(k in name for k in ("q_proj", "gate_proj", "up_proj")):
        return t.chunk(tp, 0)[r]
    if any(k in name for k in ("o_proj", "down_proj")):
        return t.chunk(tp, 1)[r]
    return t


def load(srv, model, timeout=120, **params):
    return srv.run_job({"type": "warm_load", "model": model, "params": params}, timeout)


def ok(job):
    assert job["state"] == "succeeded", job
    return job["result"]


def digests(srv, rid):
    s, doc = srv.get("/v1/residents/%s/digest" % rid)
    assert s == 200, doc
    return {(t["name"], t["rank"]): t["sha256"] for t in doc["tensors"]}


def devices(srv):
    s, doc = srv.get("/v1/devices")
    assert s == 200
    return doc["devices"]


# --------------------------------------------------------------------------- formats

def test_safetensors_single_and_result_figures(dev4, make_server, model_root):
    ts = llama_tensors()
    m = write_model(model_root / "m", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, m, load_format="auto"))
    assert r["load_format"] == "safetensors"
    assert r["tensors"] == len(ts)
    assert r["bytes"] == sum(t.numel() * t.element_size() for t in ts.values())
    for k in ("plan_s", "open_s", "read_s", "copy_s", "total_s"):
        assert r["timings"][k] >= 0
    assert r["throughput_bytes_per_s"] > 0
    assert r["peak_host_bytes"] > 0
    assert [d["index"] for d in r["devices"]] == [0]
    d0 = r["devices"][0]
    assert d0["bytes"] >= r["bytes"] and d0["free_before"] > 0 and d0["free_after"] > 0
    got = digests(srv, r["resident_id"])
    assert got == {(k, 0): sha(v) for k, v in ts.items()}
    # the table: 256-aligned offsets, no overlap, dtype and shape as in the file
    s, doc = srv.get("/v1/residents/" + r["resident_id"])
    assert s == 200 and doc["state"] == "resident"
    rows = sorted(doc["tensor_table"], key=lambda x: x["offset"])
    end = 0
    for row in rows:
        assert row["offset"] % 256 == 0 and row["offset"] >= end
        end = row["offset"] + row["bytes"]
        assert row["dtype"] == "BF16" and row["shape"] == list(ts[row["name"]].shape)
    assert devices(srv)[0]["resident_bytes"] >= r["bytes"]
    assert [d["kind"] for d in devices(srv)] == [dev4[1].split(":")[0]] * 4


def test_sharded_safetensors_with_index(dev4, make_server, model_root):
    ts = llama_tensors(torch.float16)
    d = model_root / "sh"
    names = sorted(ts)
    part1 = {k: ts[k] for k in names[:5]}
    part2 = {k: ts[k] for k in names[5:]}
    write_model(d, part1, name="model-00001-of-00002.safetensors")
    write_model(d, part2, name="model-00002-of-00002.safetensors")
    # a stray file the index does not name is ignored, as SGLang does
    st.save_file({"stray": torch.zeros(3)}, str(d / "consolidated.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in part1}
    wm.update({k: "model-00002-of-00002.safetensors" for k in part2})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d), load_format="safetensors", host_direct=False, staging_bytes=65536))
    assert digests(srv, r["resident_id"]) == {(k, 0): sha(v) for k, v in ts.items()}
    # O_DIRECT reads (aligned bounce buffer; page cache where the fs refuses it)
    r = ok(load(srv, str(d), direct_io=True, staging_bytes=65536, tp_size=2))
    assert r["staging"]["direct_io"] is True
    assert digests(srv, r["resident_id"]) == {(k, rk): sha(tp_piece(k, v, 2, rk))
                                             for k, v in ts.items() for rk in range(2)}


def test_pt_bin_with_views(dev4, make_server, model_root):
    d = model_root / "pt"
    d.mkdir()
    base = torch.randn(48, 40)
    sd = {"a.weight": base[:16],                 # a contiguous slice of a storage
          "b.weight": base[16:].t(),             # a strided view: materialized
          "c.bias": torch.arange(10, dtype=torch.int64),
          "d.weight": torch.randn(8, 8).to(torch.bfloat16)}
    torch.save(sd, str(d / "pytorch_model.bin"))
    torch.save({"x": torch.zeros(2)}, str(d / "optimizer.bin"))  # training state: skipped
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d)))
    assert r["load_format"] == "pt"
    assert digests(srv, r["resident_id"]) == {(k, 0): sha(v) for k, v in sd.items()}


def test_gguf_blocks_kept_and_dequantized(dev4, make_server, model_root):
    gguf = pytest.importorskip("gguf")
    from gguf import quants
    d = model_root / "gg"
    d.mkdir()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    q = quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    f = rng.standard_normal((4, 32)).astype(np.float32)
    w = gguf.GGUFWriter(str(d / "m.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d), load_format="gguf"))
    assert digests(srv, r["resident_id"]) == {("blk.0.ffn_up.weight", 0): sha(q),
                                             ("output_norm.weight", 0): sha(f)}
    s, doc = srv.get("/v1/residents/" + r["resident_id"])
    row = [t for t in doc["tensor_table"] if t["name"] == "blk.0.ffn_up.weight"][0]
    assert row["dtype"] == "GGML" and row["ggml_type"] == 8
    r = ok(load(srv, str(d), load_format="gguf", dtype="fp32"))
    deq = quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).astype(np.float32)
    assert digests(srv, r["resident_id"]) == {("blk.0.ffn_up.weight", 0): sha(deq),
                                             ("output_norm.weight", 0): sha(f)}


def test_npcache(dev4, make_server, model_root):
    d = model_root / "npc"
    (d / "np").mkdir(parents=True)
    arrs = {"w.a": np.arange(24, dtype=np.float32).reshape(4, 6),
            "w.b": np.arange(5, dtype=np.int64)}
    for k, v in arrs.items():
        with open(d / "np" / k, "wb") as f:
            np.save(f, v)
    (d / "np" / "weight_names.json").write_text(json.dumps(list(arrs)))
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d), load_format="npcache"))
    assert digests(srv, r["resident_id"]) == {(k, 0): sha(v) for k, v in arrs.items()}


def test_sharded_state_each_rank_to_its_device(dev4, make_server, model_root):
    d = model_root / "ss"
    d.mkdir()
    ranks = []
    for rk in range(2):
        a = {"model.layers.0.self_attn.qkv_proj.weight": torch.randn(8, 4) + rk,
             "model.norm.weight": torch.full((4,), float(rk))}
        b = {"lm_head.weight": torch.randn(6, 4) - rk}
        st.save_file(a, str(d / ("model-rank-%d-part-0.safetensors" % rk)))
        st.save_file(b, str(d / ("model-rank-%d-part-1.safetensors" % rk)))
        ranks.append({**a, **b})
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d), load_format="sharded_state", tp_size=2, devices=[3, 1]))
    want = {(k, rk): sha(v) for rk in range(2) for k, v in ranks[rk].items()}
    assert digests(srv, r["resident_id"]) == want
    s, doc = srv.get("/v1/residents/" + r["resident_id"])
    assert {(t["rank"], t["device"]) for t in doc["tensor_table"]} == {(0, 3), (1, 1)}
    # a tp_size the checkpoint was not sharded for is refused
    job = load(srv, str(d), load_format="sharded_state", tp_size=1)
    assert job["state"] == "failed" and job["error"]["code"] == "bad_request"


# --------------------------------------------------------------------------- tensor parallel

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_placement(dev4, make_server, model_root, tp):
    ts = llama_tensors()
    m = write_model(model_root / "tp", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, m, tp_size=tp, staging_bytes=65536, host_direct=False, readers=3))
    assert [d["index"] for d in r["devices"]] == list(range(tp))
    want = {(k, rk): sha(tp_piece(k, v, tp, rk)) for k, v in ts.items() for rk in range(tp)}
    assert digests(srv, r["resident_id"]) == want
    s, doc = srv.get("/v1/residents/" + r["resident_id"])
    for row in doc["tensor_table"]:
        assert row["device"] == row["rank"]
        assert row["shape"] == list(tp_piece(row["name"], ts[row["name"]], tp, row["rank"]).shape)


def test_tp_devices_order_and_cast(dev4, make_server, model_root):
    ts = llama_tensors()
    m = write_model(model_root / "tpc", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, m, tp_size=2, devices=[2, 0], dtype="fp32"))
    want = {(k, rk): sha(tp_piece(k, v, 2, rk).float()) for k, v in ts.items() for rk in range(2)}
    assert digests(srv, r["resident_id"]) == want
    s, doc = srv.get("/v1/residents/" + r["resident_id"])
    assert {(t["rank"], t["device"]) for t in doc["tensor_table"]} == {(0, 2), (1, 0)}
    assert {t["dtype"] for t in doc["tensor_table"]} == {"F32"}


def test_bad_params(dev4, make_server, model_root):
    m = write_model(model_root / "bp", llama_tensors())
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    for params, field in [({"tp_size": 8}, "params.tp_size"),
                          ({"devices": [0, 9]}, "params.devices"),
                          ({"devices": [1, 1]}, "params.devices"),
                          ({"tp_size": 2, "devices": [0]}, "params.devices"),
                          ({"load_format": "jax"}, "params.load_format"),
                          ({"dummy": {"low": 1, "high": 0}}, "params.dummy"),
                          ({"staging_bytes": 10}, "params.staging_bytes")]:
        s, doc = srv.post("/v1/jobs", {"type": "warm_load", "model": m, "params": params})
        assert s == 400, (params, doc)
        assert field in json.dumps(doc), (params, doc)


# --------------------------------------------------------------------------- dummy

def test_dummy_deterministic_in_range(dev4, make_server, model_root):
    ts = llama_tensors()
    ts["model.int_buffer"] = torch.arange(7, dtype=torch.int32)
    m = write_model(model_root / "dm", ts)
    srv = make_server(args=["--model-root", str(model_root), "--export-socket",
                            str(model_root / "x.sock")] + dev4)
    p = {"load_format": "dummy", "dummy": {"low": -0.5, "high": 0.25, "seed": 7}, "dtype": "fp32"}
    a = ok(load(srv, m, **p))
    b = ok(load(srv, m, **p))
    da, db = digests(srv, a["resident_id"]), digests(srv, b["resident_id"])
    assert da == db
    c = ok(load(srv, m, **{**p, "dummy": {"low": -0.5, "high": 0.25, "seed": 8}}))
    dc = digests(srv, c["resident_id"])
    assert da[("model.norm.weight", 0)] != dc[("model.norm.weight", 0)]
    # the values, read through the export socket's mapping
    out = subprocess.run([tool("export_consumer"), str(model_root / "x.sock"), a["resident_id"]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s, doc = srv.get("/v1/residents/" + a["resident_id"])
    assert doc["load"]["load_format"] == "dummy"
    assert a["bytes_read"] == 0
    for row in doc["tensor_table"]:
        if row["name"] == "model.int_buffer":
            assert row["dtype"] == "I32"
            assert da[(row["name"], 0)] == sha(np.zeros(7, np.int32))
        else:
            assert row["dtype"] == "F32"


def test_dummy_values_within_bounds(dev4, make_server, model_root, tmp_path):
    """Read a dummy tensor's values back through the exported memfd."""
    m = write_model(model_root / "dv", {"w": torch.zeros(64, 64, dtype=torch.bfloat16)}, config=None)
    sock = str(tmp_path / "e.sock")
    srv = make_server(args=["--model-root", str(model_root), "--export-socket", sock] + dev4)
    r = ok(load(srv, m, load_format="dummy", dummy={"low": 2.0, "high": 3.0, "seed": 1}))
    vals = read_exported(sock, r["resident_id"])["w"].view(torch.bfloat16).float()
    assert vals.min() >= 2.0 and vals.max() <= 3.0 and vals.std() > 0.1


M64 = (1 << 64) - 1


def splitmix64(x):
    z = (x + 0x9e3779b97f4a7c15) & M64
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def dummy_values(name, seed, low, high, n):
    """gpu/dummy.h's generator, written again from its comment."""
    h = 0xcbf29ce484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001b3) & M64
    ts = splitmix64(seed ^ h)
    lo, hi = np.float32(low), np.float32(high)
    out = np.empty(n, np.float32)
    for i in range(n):
        u = np.float32(splitmix64((ts + i) & M64) >> 40) * np.float32(2.0 ** -24)
        out[i] = lo + (hi - lo) * u
    return out


def test_dummy_values_match_the_documented_generator(dev4, make_server, model_root, tmp_path):
    m = write_model(model_root / "dg", {"a.weight": torch.zeros(10, 7)}, config=None)
    sock = str(tmp_path / "g.sock")
    srv = make_server(args=["--model-root", str(model_root), "--export-socket", sock] + dev4)
    r = ok(load(srv, m, load_format="dummy", dummy={"low": -0.75, "high": 0.5, "seed": 99}))
    got = read_exported(sock, r["resident_id"])["a.weight"].view(torch.float32).numpy()
    assert got.tobytes() == dummy_values("a.weight", 99, -0.75, 0.5, 70).tobytes()


def read_exported(sock, rid):
    """Maps the arenas like an inference process would (Python's socket +
    SCM_RIGHTS) and returns {name: uint8 tensor}."""
    import array
    import mmap
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.sendall((rid + "\n").encode())
    data, fds = b"", []
    while True:
        msg, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
        for lvl, typ, cd in anc:
            if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cd[:len(cd) - len(cd) % 4])
                fds.extend(a)
        if not msg:
            break
        data += msg
    s.close()
    desc = json.loads(data)
    maps = {}
    for a in desc["arenas"]:
        maps[a["device"]] = mmap.mmap(fds[a["fd_index"]], a["size"], prot=mmap.PROT_READ)
    out = {}
    for t in desc["tensor_table"]:
        mm = maps[t["device"]]
        out[t["name"]] = torch.frombuffer(bytearray(mm[t["offset"]:t["offset"] + t["bytes"]]),
                                          dtype=torch.uint8)
    for mm in maps.values():
        mm.close()
    for fd in fds:
        os.close(fd)
    return out


# --------------------------------------------------------------------------- export

def test_export_socket_matches_digests(dev4, make_server, model_root, tmp_path):
    ts = llama_tensors()
    m = write_model(model_root / "ex", ts)
    sock = str(tmp_path / "export.sock")
    srv = make_server(args=["--model-root", str(model_root), "--export-socket", sock] + dev4)
    r = ok(load(srv, m, tp_size=2))
    out = subprocess.run([tool("export_consumer"), sock, r["resident_id"]], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:-1]
    s, doc = srv.get("/v1/residents/%s/digest" % r["resident_id"])
    assert lines == ["%s %s" % (t["name"], t["sha256"]) for t in doc["tensors"]]
    assert len(lines) == 2 * len(ts)
    # and those are the torch slices
    want = sorted("%s %s" % (k, sha(tp_piece(k, v, 2, rk))) for k, v in ts.items() for rk in range(2))
    assert sorted(lines) == want
    # unknown id: the consumer reports the error
    out = subprocess.run([tool("export_consumer"), sock, "r_nope"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "not_found" in out.stderr


def metric(srv, name):
    s, _, body = srv.request("GET", "/metrics", raw=True)
    assert s == 200
    for line in body.decode().split("\n"):
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_digest_runs_off_the_http_threads(dev4, make_server, model_root):
    """A digest reads every byte back from the device: with one HTTP thread,
    other requests must still be answered while it runs (they were not while
    the digest ran on the HTTP thread), and stopping the server mid-digest
    must end cleanly (libmicrohttpd cannot stop with a suspended connection)."""
    import threading
    big = {"w": torch.randn(64 << 20, generator=torch.Generator().manual_seed(3))}  # 256 MiB
    m = write_model(model_root / "big", big, config=None)
    srv = make_server(args=["--model-root", str(model_root), "--http-threads", "1"] + dev4)
    rid = ok(load(srv, m, timeout=300))["resident_id"]
    got = {}
    t = threading.Thread(target=lambda: got.update(d=digests(srv, rid)))
    t.start()
    seen = []
    while t.is_alive():
        seen.append(metric(srv, "modelprep_http_deferred"))
    t.join()
    assert 1.0 in seen, seen
    assert got["d"] == {("w", 0): sha(big["w"])}
    assert metric(srv, "modelprep_http_deferred") == 0.0
    # SIGTERM while a digest is in flight: the server waits for it, exits 0.
    t = threading.Thread(target=lambda: got.update(late=srv.get("/v1/residents/%s/digest" % rid)))
    t.start()
    while metric(srv, "modelprep_http_deferred") != 1.0 and t.is_alive():
        pass
    assert srv.stop() == 0, srv.logs()
    t.join()
    assert got["late"][0] == 200 and got["late"][1]["tensors"][0]["sha256"] == sha(big["w"])


# --------------------------------------------------------------------------- residents

def test_keep_resident_false_frees(dev4, make_server, model_root):
    ts = llama_tensors()
    m = write_model(model_root / "kr", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, m, keep_resident=False, tp_size=4))
    assert r["resident_id"] is None and r["bytes"] > 0 and r["throughput_bytes_per_s"] > 0
    assert all(d["resident_bytes"] == 0 for d in devices(srv))
    s, doc = srv.get("/v1/residents")
    assert doc["residents"] == []


def test_unload_and_restart_lists_gone(dev4, make_server, model_root, tmp_path):
    ts = llama_tensors()
    m = write_model(model_root / "rs", ts)
    data = tmp_path / "data-restart"
    args = ["--model-root", str(model_root)] + dev4
    srv = make_server(args=args, data_dir=data)
    a = ok(load(srv, m))["resident_id"]
    b = ok(load(srv, m))["resident_id"]
    s, doc = srv.delete("/v1/residents/" + a)
    assert s == 200 and doc["state"] == "unloaded"
    assert srv.delete("/v1/residents/" + a)[0] == 409
    assert srv.get("/v1/residents/%s/digest" % a)[0] == 404
    assert srv.get("/v1/residents/r_0000/digest")[0] == 404
    assert srv.stop() == 0
    srv2 = make_server(args=args, data_dir=data)
    s, doc = srv2.get("/v1/residents")
    states = {x["id"]: x["state"] for x in doc["residents"]}
    assert states == {a: "unloaded", b: "gone"}
    assert srv2.get("/v1/residents/%s/digest" % b)[0] == 404
    assert srv2.delete("/v1/residents/" + b)[0] == 409
    assert all(d["resident_bytes"] == 0 for d in devices(srv2))


def test_delete_model_conflicts_while_resident(dev4, make_server, tmp_path):
    data = tmp_path / "data-hub"
    snap = data / "hub" / "models--org--tiny" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (data / "hub" / "models--org--tiny" / "refs").mkdir()
    (data / "hub" / "models--org--tiny" / "refs" / "main").write_text("ab" * 20)
    ts = llama_tensors()
    write_model(snap, ts)
    srv = make_server(args=dev4, data_dir=data)
    r = ok(load(srv, "org/tiny"))
    assert digests(srv, r["resident_id"]) == {(k, 0): sha(v) for k, v in ts.items()}
    s, doc = srv.delete("/v1/models/org/tiny")
    assert s == 409, doc
    assert srv.delete("/v1/residents/" + r["resident_id"])[0] == 200
    s, doc = srv.delete("/v1/models/org/tiny")
    assert s == 200, doc


# --------------------------------------------------------------------------- failures

def test_insufficient_device_memory_leaves_nothing(dev4, make_server, model_root):
    ts = {"big": torch.zeros(300, 1024)}  # 1.2 MB
    m = write_model(model_root / "oom", ts, config=None)
    srv = make_server(args=["--model-root", str(model_root), "--host-device-memory",
                            str(1 << 20)] + dev4)
    job = load(srv, m)
    assert job["state"] == "failed" and job["error"]["code"] == "insufficient_device_memory", job
    assert all(d["resident_bytes"] == 0 for d in devices(srv))
    assert srv.get("/v1/residents")[1]["residents"] == []
    # the same model fits once split four ways (but not "big" unsplit: no rule)
    job = load(srv, m, tp_size=4)
    assert job["state"] == "failed"
    assert all(d["resident_bytes"] == 0 for d in devices(srv))


def test_cancel_releases_everything(dev4, make_server, model_root):
    # 48 MB of bf16 cast to fp32 and split by columns, through 64 KiB of
    # staging on one reader under ASan: long enough for the cancel to land.
    ts = {"model.layers.0.mlp.down_proj.weight": torch.ones(1024, 24 * 1024, dtype=torch.bfloat16)}
    m = write_model(model_root / "cx", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    cancel_while_running(srv, m, {"tp_size": 2, "dtype": "fp32", "staging_bytes": 65536,
                                  "readers": 1, "host_direct": False})


def cancel_while_running(srv, m, params):
    """Submits a warm_load, cancels it once running: it ends cancelled with
    nothing left on the devices."""
    job = srv.submit({"type": "warm_load", "model": m, "params": params})
    deadline = time.time() + 60
    while time.time() < deadline:
        s, doc = srv.get("/v1/jobs/" + job["id"])
        if doc["state"] == "running":
            break
        time.sleep(0.005)
    assert doc["state"] == "running", doc
    assert srv.delete("/v1/jobs/" + job["id"])[0] == 202
    doc = srv.wait_job(job["id"])
    assert doc["state"] == "cancelled", doc
    assert all(d["resident_bytes"] == 0 for d in devices(srv))
    assert srv.get("/v1/residents")[1]["residents"] == []


def test_missing_weights_and_formats(dev4, make_server, model_root):
    d = model_root / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    job = load(srv, str(d))
    assert job["state"] == "failed" and job["error"]["code"] == "not_found"
    m = write_model(model_root / "st", llama_tensors())
    for fmt in ("pt", "gguf", "npcache", "sharded_state"):
        job = load(srv, m, load_format=fmt)
        assert job["state"] == "failed" and job["error"]["code"] == "not_found", (fmt, job)


# --------------------------------------------------------------------------- encryption

def write_key(path, raw):
    path.write_bytes(raw)
    return str(path)


def test_encrypted_safetensors_round_trip(dev4, make_server, model_root):
    ts = llama_tensors()
    plain = write_model(model_root / "plain", ts)
    key = write_key(model_root / "k.key", bytes(range(32)))
    wrong = write_key(model_root / "w.key", (bytes(range(1, 33)).hex() + "\n").encode())
    enc = model_root / "enc"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps(LLAMA))
    r = subprocess.run([tool("st_encrypt"), os.path.join(plain, "model.safetensors"),
                        str(enc / "model.safetensors"), key, "4096"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # still a valid safetensors file: the header reads without the key
    from safetensors import safe_open
    with safe_open(str(enc / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(ts)
        assert f.metadata()["encryption"] == "aes-256-gcm-chunked-v1"
        assert f.get_slice("model.norm.weight").get_shape() == [32]
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    res = ok(load(srv, str(enc), decryption_key_file=key, tp_size=2))
    assert res["encrypted"] is True
    want = {(k, rk): sha(tp_piece(k, v, 2, rk)) for k, v in ts.items() for rk in range(2)}
    assert digests(srv, res["resident_id"]) == want
    # relative to the model dir works too
    ok(load(srv, str(enc), decryption_key_file="../k.key", keep_resident=False))
    for params, code in [({}, "decryption_key_required"),
                         ({"decryption_key_file": wrong}, "decryption_failed")]:
        job = load(srv, str(enc), **params)
        assert job["state"] == "failed" and job["error"]["code"] == code, (params, job)
    # the key must lie under a model root or the data dir
    s, doc = srv.post("/v1/jobs", {"type": "warm_load", "model": str(enc),
                                   "params": {"decryption_key_file": "/etc/hostname"}})
    assert s == 400 and "decryption_key_file" in json.dumps(doc)
    # a flipped byte anywhere in the data region fails the load, leaving nothing
    before = sum(d["resident_bytes"] for d in devices(srv))
    p = enc / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-100] ^= 0x10
    p.write_bytes(bytes(raw))
    job = load(srv, str(enc), decryption_key_file=key)
    assert job["state"] == "failed" and job["error"]["code"] == "decryption_failed", job
    assert sum(d["resident_bytes"] for d in devices(srv)) == before
    # inspect reads headers only: works without the key
    s, types = srv.get("/v1/version")
    job = srv.run_job({"type": "inspect", "model": str(enc)})
    assert job["state"] == "succeeded", job


def test_convert_with_encryption_key(dev4, make_server, model_root):
    d = model_root / "cv"
    d.mkdir()
    sd = {k: v for k, v in llama_tensors(torch.float32).items()}
    torch.save(sd, str(d / "pytorch_model.bin"))
    (d / "config.json").write_text(json.dumps(LLAMA))
    key = write_key(model_root / "ck.key", bytes(range(100, 132)))
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    out = str(model_root / "cv-enc")
    job = srv.run_job({"type": "convert", "model": str(d),
                       "params": {"output": out, "encryption_key_file": key}})
    assert job["state"] == "succeeded", job
    assert job["result"]["encryption"] == "aes-256-gcm-chunked-v1"
    res = ok(load(srv, out, decryption_key_file=key))
    assert digests(srv, res["resident_id"]) == {(k, 0): sha(v) for k, v in sd.items()}
    job = load(srv, out)
    assert job["error"]["code"] == "decryption_key_required"


def test_dummy_shapes_from_config_only(dev4, make_server, model_root):
    """No weight files: a dense llama's tensor list comes from config.json."""
    d = model_root / "cfg-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d), load_format="dummy", tp_size=2))
    assert r["bytes_read"] == 0
    s, doc = srv.get("/v1/residents/" + r["resident_id"])
    want = llama_tensors()  # the same names and shapes as a real checkpoint
    rows = {(t["name"], t["rank"]): t for t in doc["tensor_table"]}
    assert {n for n, _ in rows} == set(want)
    for (name, rk), row in rows.items():
        assert row["dtype"] == "BF16"  # torch_dtype
        assert row["shape"] == list(tp_piece(name, want[name], 2, rk).shape), name
    # the same load again gives the same bytes
    r2 = ok(load(srv, str(d), load_format="dummy", tp_size=2))
    assert digests(srv, r["resident_id"]) == digests(srv, r2["resident_id"])
    # auto, or a config that is not llama-like, cannot invent weights
    assert load(srv, str(d))["error"]["code"] == "not_found"
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert load(srv, str(d), load_format="dummy")["error"]["code"] == "not_found"
