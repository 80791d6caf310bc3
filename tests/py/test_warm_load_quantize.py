"""warm_load with `quantize`: a bf16 checkpoint written by torch +
safetensors lands quantized (FP8 per tensor / channel / block, NF4 with and
without double quantization, LLM.int8) without a converted copy on disk.
Every part's bytes on the devices (the resident digests and the export
socket, an inference process's view) equal the references computed here:
the torch FP8 recipe (amax / 448, x / scale, clamp, .to(float8_e4m3fn)) and
bitsandbytes on CPU (quantize_4bit, int8_vectorwise_quant). With tp_size 2
each rank's piece is sliced first and quantized on its own, as SGLang's
BitsAndBytesModelLoader does; a sharded_state checkpoint's rank files and
a .bin's strided views are quantized too. Also: ignore patterns, the
refusals (param conflicts, an already quantized checkpoint, a NaN), a
cancel leaving nothing behind, and host memory bounded by one tensor per
reader. Every test runs on `host:4` and on `async:4` (arenas not
CPU-addressable, everything through the staging ring)."""
import json
import subprocess

import pytest
import safetensors.torch as st
import torch

from conftest import tool
from test_quantize import fp8_reference
from test_warm_load import (LLAMA, cancel_while_running, devices, digests, llama_tensors, load, ok,
                            read_exported, sha, tp_piece, write_model)

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(params=["host", "async"])
def dev4(request):
    return ["--devices", request.param + ":4"]


IGNORED = ("embed_tokens", "lm_head", "norm")


def quantized(name):
    return name.endswith(".weight") and not any(k in name for k in IGNORED)


def raw_sha(t):
    return sha(t.contiguous().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)


def reference_parts(module, w, method, block=(128, 128), dq=True):
    """{part name: (sha256, dtype, shape)} of one weight (the rank's piece);
    bitsandbytes' JSON quant state is compared parsed (ours is padded)."""
    if method.startswith("fp8"):
        q, s = fp8_reference(w, method, block)
        sname = ".weight_scale_inv" if method == "fp8-block" else ".weight_scale"
        return {module + ".weight": (raw_sha(q), "F8_E4M3", list(q.shape)),
                module + sname: (sha(s.float()), "F32", list(s.shape))}
    if method == "nf4":
        q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        out = {module + ".weight": (sha(q), "U8", list(q.shape)),
               module + ".weight.absmax": (sha(st.absmax), "U8" if dq else "F32",
                                           list(st.absmax.shape)),
               module + ".weight.quant_map": (sha(st.code), "F32", [16])}
        if dq:
            out[module + ".weight.nested_absmax"] = (sha(st.state2.absmax), "F32",
                                                     list(st.state2.absmax.shape))
            out[module + ".weight.nested_quant_map"] = (sha(st.state2.code), "F32", [256])
        state = {k: v for k, v in st.as_dict(packed=False).items() if not torch.is_tensor(v)}
        state["shape"] = list(state["shape"])
        out[module + ".weight.quant_state.bitsandbytes__nf4"] = (state, "U8", None)
        return out
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    return {module + ".weight": (sha(cb), "I8", list(cb.shape)),
            module + ".SCB": (sha(scb), "F32", list(scb.shape)),
            module + ".weight_format": (sha(torch.zeros((), dtype=torch.uint8)), "U8", [])}


def expected(ts, method, tp=1, **kw):
    """{(name, rank): (sha256 or parsed state, dtype, shape)} of the whole load."""
    out = {}
    for name, t in ts.items():
        for r in range(tp):
            piece = tp_piece(name, t, tp, r)
            if quantized(name):
                for k, v in reference_parts(name[:-len(".weight")], piece, method, **kw).items():
                    out[(k, r)] = v
            else:
                out[(name, r)] = (sha(piece), "BF16", list(piece.shape))
    return out


def check_resident(srv, rid, want, tp=1, sock=None):
    """The digests, the tensor table and (sock) the exported bytes against want."""
    got = digests(srv, rid)
    assert set(got) == set(want)
    s, doc = srv.get("/v1/residents/" + rid)
    assert s == 200
    table = {(t["name"], t["rank"]): t for t in doc["tensor_table"]}
    exported = read_exported(sock, rid) if sock else {}
    for key, (ref, dt, shape) in want.items():
        row = table[key]
        assert row["dtype"] == dt, (key, row)
        if isinstance(ref, dict):  # the quant state: JSON padded with blanks
            assert shape is None and row["shape"] == [row["bytes"]]
            if sock:
                assert json.loads(bytes(exported[key[0]].numpy()).decode()) == ref
            continue
        assert row["shape"] == shape, (key, row)
        assert got[key] == ref, key
        if sock:
            assert sha(exported[key[0]]) == ref, key


@pytest.mark.parametrize("method", ["fp8", "fp8-channel", "fp8-block", "nf4", "int8"])
def test_each_method_equals_the_reference(dev4, make_server, model_root, tmp_path, method):
    torch.set_num_threads(1)  # bitsandbytes' nested mean is torch's: see quantize.h
    ts = llama_tensors()
    m = write_model(model_root / "m", ts)
    sock = str(tmp_path / "export.sock")
    srv = make_server(args=["--model-root", str(model_root), "--export-socket", sock] + dev4)
    r = ok(load(srv, m, quantize=method))
    want = expected(ts, method)
    check_resident(srv, r["resident_id"], want, sock=sock)
    q = r["quantization"]
    nq = sum(quantized(k) for k in ts)
    assert q["method"] == method and q["tensors"] == nq and q["where"] == "host"
    assert q["bytes_before"] == sum(ts[k].numel() * 2 for k in ts if quantized(k))
    assert 0 < q["bytes_after"] < q["bytes_before"]
    assert r["tensors"] == len(want)
    # one source tensor and its parts at most, besides staging and scratch
    assert r["peak_host_bytes"] > 0


def test_fp8_block_sizes_and_nf4_without_double_quant(dev4, make_server, model_root):
    ts = llama_tensors(seed=3)
    ts["model.layers.0.mlp.up_proj.weight"][5:9] = 0  # zero groups: scale 1.0
    m = write_model(model_root / "m", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    # blocks that do not divide the shapes: ragged edge blocks
    r = ok(load(srv, m, quantize="fp8-block", quantize_block_size=[24, 20]))
    check_resident(srv, r["resident_id"], expected(ts, "fp8-block", block=(24, 20)))
    torch.set_num_threads(1)
    r = ok(load(srv, m, quantize="nf4", quantize_double_quant=False))
    check_resident(srv, r["resident_id"], expected(ts, "nf4", dq=False))


@pytest.mark.parametrize("method", ["fp8", "fp8-channel", "fp8-block", "nf4", "int8"])
def test_tp2_quantizes_each_ranks_piece(dev4, make_server, model_root, method):
    torch.set_num_threads(1)
    ts = llama_tensors(seed=5)
    m = write_model(model_root / "m", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    extra = {"quantize_block_size": [8, 12]} if method == "fp8-block" else {}
    r = ok(load(srv, m, quantize=method, tp_size=2, devices=[2, 1], **extra))
    want = expected(ts, method, tp=2, **({"block": (8, 12)} if extra else {}))
    check_resident(srv, r["resident_id"], want, tp=2)
    s, doc = srv.get("/v1/residents/" + r["resident_id"])
    assert {(t["rank"], t["device"]) for t in doc["tensor_table"]} == {(0, 2), (1, 1)}
    # a row-parallel weight's piece is half its columns, quantized alone
    row = [t for t in doc["tensor_table"]
           if t["name"] == "model.layers.0.self_attn.o_proj.weight" and t["rank"] == 1][0]
    assert row["shape"] == ([32 * 16 // 2, 1] if method == "nf4" else [32, 16])


def test_export_consumer_lists_the_parts(dev4, make_server, model_root, tmp_path):
    ts = llama_tensors()
    m = write_model(model_root / "m", ts)
    sock = str(tmp_path / "export.sock")
    srv = make_server(args=["--model-root", str(model_root), "--export-socket", sock] + dev4)
    r = ok(load(srv, m, quantize="fp8"))
    out = subprocess.run([tool("export_consumer"), sock, r["resident_id"]], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:-1]
    want = expected(ts, "fp8")
    assert sorted(lines) == sorted("%s %s" % (k[0], v[0]) for k, v in want.items())
    assert any(l.startswith("model.layers.0.mlp.down_proj.weight_scale ") for l in lines)


def test_ignore_patterns(dev4, make_server, model_root):
    ts = llama_tensors()
    m = write_model(model_root / "m", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, m, quantize="int8", quantize_ignore=["*.mlp.*", "*k_proj"]))
    got = digests(srv, r["resident_id"])
    for name, t in ts.items():
        kept = not quantized(name) or ".mlp." in name or "k_proj" in name
        assert (got[(name, 0)] == sha(t)) == kept, name
        assert ((name[:-7] + ".SCB", 0) in got) != kept, name
    assert r["quantization"]["tensors"] == 3


def test_refusals(dev4, make_server, model_root):
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    m = write_model(model_root / "m", llama_tensors())
    for params, field in [({"quantize": "fp8", "quantize_block_size": [64, 64]},
                           "quantize_block_size"),
                          ({"quantize": "int8", "quantize_double_quant": False},
                           "quantize_double_quant"),
                          ({"quantize_ignore": ["*"]}, "params.quantize"),
                          ({"quantize": "nf4", "dtype": "bf16"}, "params.dtype"),
                          ({"quantize": "fp8", "load_format": "dummy"}, "params.load_format"),
                          ({"quantize": "fp8", "load_format": "gguf"}, "params.load_format")]:
        s, doc = srv.post("/v1/jobs", {"type": "warm_load", "model": m, "params": params})
        assert s == 400 and doc["errors"][0]["code"] == "param_conflict", (params, doc)
        assert field in json.dumps(doc), (params, doc)
    for params in [{"quantize": "fp4"}, {"quantize": "fp8-block", "quantize_block_size": [0, 8]},
                   {"quantize": "fp8-block", "quantize_block_size": [8]}]:
        s, doc = srv.post("/v1/jobs", {"type": "warm_load", "model": m, "params": params})
        assert s == 400, (params, doc)

    def failed(model, code, **params):
        job = load(srv, model, **params)
        assert job["state"] == "failed" and job["error"]["code"] == code, job
        assert all(d["resident_bytes"] == 0 for d in devices(srv))
        return job["error"]["message"]

    # already quantized: F8 weights, or a declared quantization_config
    ts = llama_tensors()
    ts["model.layers.0.self_attn.q_proj.weight"] = ts[
        "model.layers.0.self_attn.q_proj.weight"].to(torch.float8_e4m3fn)
    msg = failed(write_model(model_root / "f8", ts), "already_quantized", quantize="fp8")
    assert "already quantized" in msg
    cfg = dict(LLAMA, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    msg = failed(write_model(model_root / "qc", llama_tensors(), config=cfg), "already_quantized",
                 quantize="nf4")
    assert "quantization_config" in msg and "bitsandbytes" in msg
    # a NaN in a weight: named, with its index
    ts = llama_tensors()
    ts["model.layers.0.mlp.up_proj.weight"][3, 7] = float("nan")
    for method in ("fp8", "nf4", "int8"):
        msg = failed(write_model(model_root / "nan", ts), "non_finite_weight", quantize=method)
        assert "model.layers.0.mlp.up_proj.weight" in msg and "[3, 7]" in msg, msg
    # nothing left to quantize
    failed(m, "nothing_to_quantize", quantize="fp8", quantize_ignore=["*"])


def test_cancel_mid_quantizing_load_leaves_nothing(dev4, make_server, model_root):
    # 16 weights of 2 MiB each quantized to NF4 on one reader through 64 KiB
    # of staging under ASan: long enough for the cancel to land.
    ts = {"model.layers.%d.mlp.down_proj.weight" % i: torch.randn(512, 2048).to(torch.bfloat16)
          for i in range(16)}
    m = write_model(model_root / "cx", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    cancel_while_running(srv, m, {"quantize": "nf4", "staging_bytes": 65536, "readers": 1})


def test_host_memory_is_one_tensor_per_reader(dev4, make_server, model_root):
    # 32 MiB of weights on 2 readers: each holds one 2 MiB source tensor and
    # its parts at a time, besides the staging ring, never the model.
    torch.set_num_threads(1)
    ts = {"model.layers.%d.mlp.up_proj.weight" % i: torch.randn(512, 2048).to(torch.bfloat16)
          for i in range(16)}
    m = write_model(model_root / "big", ts)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, m, quantize="nf4", readers=2, staging_bytes=1 << 20))
    tensor = 512 * 2048 * 2
    staging = r["staging"]["slots"] * r["staging"]["slot_bytes"]
    assert r["staging"]["readers"] == 2
    assert tensor < r["peak_host_bytes"] <= staging + 2 * (2 * tensor)
    assert r["peak_host_bytes"] < 16 * tensor
    check_resident(srv, r["resident_id"], expected(ts, "nf4"))


def test_pt_views_quantized(dev4, make_server, model_root):
    # a .bin written by torch.save: an offset slice of a storage and a
    # strided (transposed) view, both quantized from their logical values
    d = model_root / "pt"
    d.mkdir()
    base = torch.randn(48, 40)
    sd = {"a.weight": base[:16], "b.weight": base[16:].t(), "c.bias": torch.arange(10)}
    torch.save(sd, str(d / "pytorch_model.bin"))
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d), quantize="fp8-channel"))
    assert r["load_format"] == "pt"
    want = {}
    for k, v in sd.items():
        if k.endswith(".weight"):
            want.update({(n, 0): p for n, p in
                         reference_parts(k[:-7], v.contiguous(), "fp8-channel").items()})
        else:
            want[(k, 0)] = (sha(v), "I64", [10])
    check_resident(srv, r["resident_id"], want)
    assert r["quantization"]["bytes_before"] == (16 * 40 + 40 * 32) * 4


def test_sharded_state_ranks_quantized(dev4, make_server, model_root):
    # a checkpoint pre-split per rank (SGLang sharded_state, fused qkv_proj):
    # each rank's file is its piece already, quantized as it is
    d = model_root / "ss"
    d.mkdir()
    ranks = []
    for rk in range(2):
        t = {"model.layers.0.self_attn.qkv_proj.weight": (torch.randn(24, 16) + rk).bfloat16(),
             "model.norm.weight": torch.full((16,), float(rk)).bfloat16()}
        st.save_file(t, str(d / ("model-rank-%d-part-0.safetensors" % rk)))
        ranks.append(t)
    srv = make_server(args=["--model-root", str(model_root)] + dev4)
    r = ok(load(srv, str(d), load_format="sharded_state", tp_size=2, quantize="fp8"))
    want = {}
    for rk, t in enumerate(ranks):
        want.update({(k, rk): v for (k, _), v in expected(t, "fp8").items()})
    check_resident(srv, r["resident_id"], want)
    assert r["quantization"]["tensors"] == 2
