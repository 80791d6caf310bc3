"""shard job end to end through the real server: tiny checkpoints of every
supported architecture (written by torch + safetensors), tp 1/2/4/8, both
namings; every rank's tensor compared with the same slice cut by numpy
(tests/fixtures/tp_models.py, SGLang's split semantics), re-assembly of the
ranks reproduces the source, and the files load with safetensors itself."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tp_models as tm


def read_source(model_dir):
    src = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        src.update(tm.read_raw(f))
    return src


def read_ranks(out, tp):
    ranks = []
    for r in range(tp):
        files = sorted(glob.glob(os.path.join(out, "model-rank-%d-part-*.safetensors" % r)))
        assert files, "rank %d has no files" % r
        d = {}
        for f in files:
            for n, (dt, shape, a) in tm.read_raw(f).items():
                assert n not in d, "%s twice in rank %d" % (n, r)
                d[n] = a
        ranks.append(d)
    assert not glob.glob(os.path.join(out, "model-rank-%d-part-*" % tp))
    return ranks


def check_output(cfg, model_dir, out, tp, naming, result):
    src = read_source(model_dir)
    ranks = read_ranks(out, tp)
    for r in range(tp):
        want = tm.expected_rank(cfg, {n: v for n, v in src.items()}, tp, r, naming)
        assert sorted(ranks[r]) == sorted(want), (r, sorted(set(ranks[r]) ^ set(want)))
        for n, a in want.items():
            assert ranks[r][n].shape == a.shape, (n, r, ranks[r][n].shape, a.shape)
            assert np.array_equal(ranks[r][n], a), (n, r)
    if naming == "hf":
        back = tm.reassemble_hf(cfg, ranks, tp, src)
        assert sorted(back) == sorted(src)
        for n, (dt, shape, a) in src.items():
            assert np.array_equal(back[n], a), n
    # the result and the manifest describe what is on disk
    assert result["tp_size"] == tp and result["naming"] == naming
    assert [x["rank"] for x in result["ranks"]] == list(range(tp))
    for x in result["ranks"]:
        on_disk = sum(os.path.getsize(os.path.join(out, f["name"])) for f in x["files"])
        assert x["bytes"] == on_disk
    man = json.load(open(os.path.join(out, "sharded_state.json")))
    assert man["tp_size"] == tp and man["naming"] == naming
    assert man["pattern"] == "model-rank-{rank}-part-{part}.safetensors"
    assert man["source"]["path"] == os.path.realpath(model_dir)
    assert {x["kind"] for x in man["rules"]} >= {"qkv", "row", "vocab", "replicated"}
    for f in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(out, f), "rb").read() == \
            open(os.path.join(model_dir, f), "rb").read()
    assert not os.path.exists(os.path.join(out, "README.md"))
    assert not glob.glob(out + ".tmp-*")


def shard(s, model_dir, out, tp, naming="sglang", **params):
    p = {"tp_size": tp, "naming": naming, "output": str(out)}
    p.update(params)
    job = s.run_job({"type": "shard", "model": str(model_dir), "params": p})
    return job


@pytest.mark.parametrize("arch", sorted(tm.ARCHS))
def test_shard_arch_matrix(make_server, model_root, arch):
    cfg = tm.make_config(arch)
    d = model_root / arch
    tm.write_model(str(d), cfg, tm.make_state(cfg, seed=len(arch)),
                   files=2 if arch in ("llama", "qwen3_moe") else 1)
    s = make_server(args=["--model-root", str(model_root)])
    for tp in (1, 2, 4, 8):
        for naming in ("sglang", "hf"):
            out = model_root / "out" / ("%s-tp%d-%s" % (arch, tp, naming))
            job = shard(s, d, out, tp, naming)
            assert job["state"] == "succeeded", job
            check_output(cfg, str(d), str(out), tp, naming, job["result"])


def test_shard_sglang_names_and_shapes(make_server, model_root):
    """The exact keys and shapes SGLang's model classes hold (what
    ShardedStateLoader demands), for a qwen2_moe at tp 4 with KV replication."""
    cfg = tm.make_config("qwen2_moe")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    s = make_server(args=["--model-root", str(model_root)])
    out = model_root / "o"
    job = shard(s, d, out, 4)
    assert job["state"] == "succeeded", job
    with safe_open(str(out / "model-rank-3-part-0.safetensors"), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        qkv = f.get_tensor("model.layers.0.self_attn.qkv_proj.weight")
    H, hd = 128, 16
    assert shapes["lm_head.weight"] == [256, H]  # 1000 -> 1024 padded, / 4
    assert shapes["model.embed_tokens.weight"] == [256, H]  # untied: both kept
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == [(2 + 2 * 1) * hd, H]
    assert shapes["model.layers.0.self_attn.qkv_proj.bias"] == [(2 + 2) * hd]
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == [H, 2 * hd]
    assert shapes["model.layers.1.mlp.experts.w13_weight"] == [8, 2 * 8, H]
    assert shapes["model.layers.1.mlp.experts.w2_weight"] == [8, H, 8]
    assert shapes["model.layers.1.mlp.shared_expert.gate_up_proj.weight"] == [2 * 16, H]
    assert shapes["model.layers.1.mlp.shared_expert.down_proj.weight"] == [H, 16]
    assert shapes["model.layers.1.mlp.shared_expert_gate.weight"] == [1, H]
    assert shapes["model.layers.1.mlp.gate.weight"] == [8, H]
    # rank 3 with 2 KV heads at tp 4 takes KV head 3 // 2 = 1
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(qkv[:2 * hd], q[6 * hd:8 * hd])
    assert torch.equal(qkv[2 * hd:3 * hd], k[hd:2 * hd])
    # padding rows of the last rank are zero
    with safe_open(str(out / "model-rank-3-part-0.safetensors"), framework="pt") as f:
        lm = f.get_tensor("lm_head.weight")
    assert torch.count_nonzero(lm[1000 - 768:]) == 0


def test_shard_parts_and_default_output(make_server, model_root, tmp_path):
    cfg = tm.make_config("llama")
    d = model_root / "llama-small"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    s = make_server(args=["--model-root", str(model_root)])
    # 40 KB parts: several per rank; the embedding (128 KB / rank) is alone
    job = s.run_job({"type": "shard", "model": str(d),
                     "params": {"tp_size": 2, "max_part_bytes": 40000}})
    assert job["state"] == "succeeded", job
    out = job["result"]["output_path"]
    assert out == os.path.join(os.path.realpath(s.data_dir), "sharded", "llama-small-tp2")
    assert job["result"]["parts"] > 3
    for r in range(2):
        files = glob.glob(os.path.join(out, "model-rank-%d-part-*.safetensors" % r))
        assert len(files) == job["result"]["parts"]
        for f in files:
            t = tm.read_raw(f)
            data = sum(a.size for _, _, a in t.values())
            assert data <= 40000 or len(t) == 1
    check_output(cfg, str(d), out, 2, "sglang", job["result"])
    # a second run does not clobber the first unless asked to
    job = s.run_job({"type": "shard", "model": str(d), "params": {"tp_size": 2}})
    assert job["state"] == "failed" and job["error"]["code"] == "output_exists", job
    job = s.run_job({"type": "shard", "model": str(d),
                     "params": {"tp_size": 2, "overwrite": True}})
    assert job["state"] == "succeeded", job
    assert job["result"]["parts"] == 1
    assert len(glob.glob(os.path.join(out, "*.safetensors"))) == 2


def test_shard_fp8_block(make_server, model_root):
    """F8_E4M3 weights with weight_scale_inv in 128x128 blocks: scales split
    with their weights, in block units, fused like them."""
    cfg = tm.make_config("qwen3", hidden=256, heads=4, kv=2, head_dim=128, inter=512,
                         vocab=300, layers=1)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "fmt": "e4m3", "weight_block_size": [128, 128]}
    sd = tm.make_state(cfg)
    raw = {}
    rng = np.random.default_rng(1)
    for n, t in sd.items():
        if n.endswith("_proj.weight"):
            N, K = t.shape
            raw[n] = ("F8_E4M3", rng.integers(0, 255, size=(N, K, 1), dtype=np.uint8))
            sc = torch.rand(-(-N // 128), -(-K // 128), dtype=torch.float32)
            raw[n[:-len("weight")] + "weight_scale_inv"] = ("F32", tm.raw_of_torch(sc))
        else:
            raw[n] = ({torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype],
                      tm.raw_of_torch(t))
    d = model_root / "fp8"
    os.makedirs(d)
    json.dump(cfg, open(d / "config.json", "w"))
    for f in ("tokenizer_config.json", "generation_config.json"):
        open(d / f, "w").write("{}")
    tm.write_raw(str(d / "model.safetensors"), raw, {"format": "pt"})
    s = make_server(args=["--model-root", str(model_root)])
    src = tm.read_raw(str(d / "model.safetensors"))
    for tp in (1, 2, 4):
        for naming in ("sglang", "hf"):
            out = model_root / "out" / ("fp8-tp%d-%s" % (tp, naming))
            job = shard(s, d, out, tp, naming)
            assert job["state"] == "succeeded", job
            ranks = read_ranks(str(out), tp)
            for r in range(tp):
                for n, a in ranks[r].items():
                    assert a.dtype == np.uint8
                if naming == "hf":
                    continue
                qkv = ranks[r]["model.layers.0.self_attn.qkv_proj.weight_scale_inv"]
                # per rank: q 4/tp heads of 128 rows = 4/tp scale rows; k, v one each
                # (at tp 4 the 2 KV heads are replicated: rank r takes head r // 2)
                kvh = [r] if tp == 2 else ([0, 1] if tp == 1 else [r // 2])
                q = src["model.layers.0.self_attn.q_proj.weight_scale_inv"][2]
                k = src["model.layers.0.self_attn.k_proj.weight_scale_inv"][2]
                v = src["model.layers.0.self_attn.v_proj.weight_scale_inv"][2]
                nq = 4 // tp
                want = np.concatenate([q[r * nq:(r + 1) * nq]] + [k[h:h + 1] for h in kvh]
                                      + [v[h:h + 1] for h in kvh])
                assert np.array_equal(qkv, want), (tp, r)
                down = ranks[r]["model.layers.0.mlp.down_proj.weight_scale_inv"]
                ds = src["model.layers.0.mlp.down_proj.weight_scale_inv"][2]
                assert np.array_equal(down, ds[:, r * (4 // tp):(r + 1) * (4 // tp)])
                gu = ranks[r]["model.layers.0.mlp.gate_up_proj.weight"]
                g = src["model.layers.0.mlp.gate_proj.weight"][2]
                u = src["model.layers.0.mlp.up_proj.weight"][2]
                n = 512 // tp
                assert np.array_equal(gu, np.concatenate([g[r * n:(r + 1) * n],
                                                          u[r * n:(r + 1) * n]]))
            if naming == "hf":
                # weights (F8_E4M3 bytes included) re-assemble to the source
                weights = {k2: v2 for k2, v2 in src.items() if not k2.endswith("scale_inv")}
                back = tm.reassemble_hf(cfg, ranks, tp, weights)
                assert sorted(back) == sorted(weights)
                for n, a in back.items():
                    assert np.array_equal(a, src[n][2]), n
                # scales: rank r holds block rows/cols r of the split
                for r in range(tp):
                    qs = src["model.layers.0.self_attn.q_proj.weight_scale_inv"][2]
                    nq = 4 // tp
                    assert np.array_equal(
                        ranks[r]["model.layers.0.self_attn.q_proj.weight_scale_inv"],
                        qs[r * nq:(r + 1) * nq])
    # tp 8 would cut q into 64-row slices, not whole 128-row blocks: a 400
    st, doc = s.post("/v1/jobs", {"type": "shard", "model": str(d), "params": {"tp_size": 8}})
    assert st == 400 and "params.tp_size" in json.dumps(doc), doc


def test_shard_errors(make_server, model_root, tmp_path):
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    s = make_server(args=["--model-root", str(model_root)])

    def post(params, model=str(d)):
        return s.post("/v1/jobs", {"type": "shard", "model": model, "params": params})

    for bad in ({"tp_size": 3}, {"tp_size": 16}, {"tp_size": 0}, {},
                {"tp_size": 2, "naming": "megatron"}, {"tp_size": 2, "max_part_bytes": 0}):
        st, doc = post(bad)
        assert st == 400, (bad, st, doc)
    st, doc = post({"tp_size": 3})
    assert "params.tp_size" in json.dumps(doc) and "num_attention_heads" in json.dumps(doc)
    # kv heads 2 and tp 8: replication is fine; tp 3 divides neither
    st, doc = post({"tp_size": 2, "output": str(tmp_path / "elsewhere")})
    assert st == 400 and "params.output" in json.dumps(doc), doc
    st, doc = post({"tp_size": 2, "output": "/etc/x"})
    assert st == 400 and "params.output" in json.dumps(doc), doc

    # unknown architecture: the job fails naming it
    cfg2 = dict(cfg, architectures=["FalconForCausalLM"], model_type="falcon")
    d2 = model_root / "falcon"
    tm.write_model(str(d2), cfg2, tm.make_state(cfg))
    job = s.run_job({"type": "shard", "model": str(d2), "params": {"tp_size": 2}})
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "unsupported_architecture"
    assert "FalconForCausalLM" in job["error"]["message"]

    # an unsplittable tensor: the job fails naming it
    sd = tm.make_state(cfg)
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(4, 4)
    d3 = model_root / "odd"
    tm.write_model(str(d3), cfg, sd)
    job = s.run_job({"type": "shard", "model": str(d3), "params": {"tp_size": 2}})
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "unsplittable"
    assert "model.layers.0.self_attn.mystery.weight" in job["error"]["message"]
    assert not glob.glob(os.path.join(s.data_dir, "sharded", "*"))

    # a fused target missing a piece (v_proj gone)
    sd = tm.make_state(cfg)
    del sd["model.layers.1.self_attn.v_proj.weight"]
    d4 = model_root / "nov"
    tm.write_model(str(d4), cfg, sd)
    job = s.run_job({"type": "shard", "model": str(d4), "params": {"tp_size": 2}})
    assert job["state"] == "failed" and job["error"]["code"] == "incomplete", job
    assert "model.layers.1.self_attn.qkv_proj" in job["error"]["message"]


def crc32c_py(data, crc=0):
    """Reference CRC-32C (bitwise table), independent of the C code."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def data_section(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n:]


def test_shard_result_crc(make_server, model_root):
    """The crc32c the job reports for each file is the standard CRC-32C of
    its data section (checked here in Python, not with our code)."""
    cfg = tm.make_config("qwen3", vocab=300, layers=1)
    d = model_root / "q"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    s = make_server(args=["--model-root", str(model_root)])
    out = model_root / "o"
    job = shard(s, d, out, 2)
    assert job["state"] == "succeeded", job
    for rk in job["result"]["ranks"]:
        for f in rk["files"]:
            assert crc32c_py(data_section(str(out / f["name"]))) == f["crc32c"], f
    man = json.load(open(out / "sharded_state.json"))
    assert man["ranks"] == job["result"]["ranks"]


def test_shard_resume(model_root, tmp_path):
    """An interrupted run (stopped after 3 parts, as a drain stops the job)
    leaves its temp folder and checkpoint; the resumed run re-checks the
    finished files, rewrites one that was damaged, and ends with the same
    bytes a fresh run writes."""
    import subprocess
    from conftest import tool
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    cli = tool("modelprep-shard")
    out, ck = tmp_path / "out", tmp_path / "ck.json"
    args = [cli, "--tp", "2", "--max-part-bytes", "40000", "--tag", "j_test"]
    p = subprocess.run(args + ["--checkpoint-out", str(ck), "--stop-after-parts", "3",
                               str(d), str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and "cancelled" in p.stderr, p.stderr
    assert "Sanitizer" not in p.stderr, p.stderr
    tmpd = tmp_path / "out.tmp-j_test"
    state = json.load(open(ck))
    assert len(state["files"]) == 6 and state["tp"] == 2
    assert sorted(os.listdir(tmpd)) == sorted(state["files"])
    assert not out.exists()
    # damage one finished file: the resumed run must not take it over
    victim = tmpd / "model-rank-1-part-1.safetensors"
    b = bytearray(victim.read_bytes())
    b[-1] ^= 0xFF
    victim.write_bytes(bytes(b))
    p = subprocess.run(args + ["--resume", str(ck), str(d), str(out)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert "part 0: taken over" in p.stderr and "part 2: taken over" in p.stderr
    assert "part 1 of the interrupted run does not check out" in p.stderr
    assert not tmpd.exists()
    fresh = tmp_path / "fresh"
    p = subprocess.run([cli, "--tp", "2", "--max-part-bytes", "40000", str(d), str(fresh)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    names = sorted(f for f in os.listdir(fresh) if f.endswith(".safetensors"))
    assert names == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    for f in names:
        assert (out / f).read_bytes() == (fresh / f).read_bytes(), f
    check_output(cfg, str(d), str(out), 2, "sglang", json.loads(p.stdout))
    # a checkpoint of another split is not taken over
    out2 = tmp_path / "out2"
    p = subprocess.run([cli, "--tp", "2", "--tag", "j_test", "--resume", str(ck), str(d),
                        str(out2)], capture_output=True, text=True)
    assert p.returncode == 0 and "taken over" not in p.stderr, p.stderr


def test_shard_drain_resumes(make_server, model_root, tmp_path):
    """SIGTERM while a shard job runs: it goes back to the queue with its
    checkpoint and the next server finishes it, taking the finished parts
    over instead of writing them again."""
    import time
    cfg = tm.make_config("llama", layers=48)
    d = model_root / "big"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    data = tmp_path / "data"
    s = make_server(args=["--model-root", str(model_root)], data_dir=data)
    out = model_root / "out"
    j = s.submit({"type": "shard", "model": str(d),
                  "params": {"tp_size": 4, "max_part_bytes": 1, "output": str(out)}})
    # a part per tensor (each fsynced and checkpointed): the job runs for a
    # while; stop it once it has made some progress
    deadline = time.time() + 60
    while time.time() < deadline:
        st, doc = s.get("/v1/jobs/" + j["id"])
        pr = doc.get("progress") or {}
        if doc["state"] != "queued" and pr.get("total") and pr["done"] >= 0.2 * pr["total"]:
            break
        time.sleep(0.01)
    assert s.stop() == 0
    s2 = make_server(args=["--model-root", str(model_root)], data_dir=data)
    doc = s2.wait_job(j["id"], timeout=120)
    assert doc["state"] == "succeeded", doc
    if doc["result"]["files_resumed"] == 0:
        pytest.skip("the job finished before the drain; nothing to resume")
    assert doc["result"]["files_resumed"] % 4 == 0
    check_output(cfg, str(d), str(out), 4, "sglang", doc["result"])


def test_shard_from_pytorch_bin(make_server, model_root):
    """A torch.save checkpoint (pytorch_model.bin, with a strided view among
    its tensors) shards like the safetensors one."""
    cfg = tm.make_config("qwen2", layers=1)
    sd = tm.make_state(cfg)
    st_dir = model_root / "st"
    tm.write_model(str(st_dir), cfg, sd)  # the reference bytes
    # a transposed-then-transposed-back view: same values, non-contiguous storage
    k = "model.layers.0.mlp.down_proj.weight"
    sd[k] = sd[k].t().contiguous().t()
    assert not sd[k].is_contiguous()
    d = model_root / "bin"
    os.makedirs(d)
    json.dump(cfg, open(d / "config.json", "w"))
    torch.save(sd, str(d / "pytorch_model.bin"))
    s = make_server(args=["--model-root", str(model_root)])
    for tp in (1, 2):
        out = model_root / ("out%d" % tp)
        job = shard(s, d, out, tp)
        assert job["state"] == "succeeded", job
        src = read_source(str(st_dir))
        ranks = read_ranks(str(out), tp)
        for r in range(tp):
            want = tm.expected_rank(cfg, src, tp, r, "sglang")
            assert sorted(ranks[r]) == sorted(want)
            for n, a in want.items():
                assert np.array_equal(ranks[r][n], a), (n, r)
