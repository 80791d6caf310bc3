"""The convert job (PyTorch / GGUF -> safetensors) through the real server,
cross-checked against the real producers and readers: torch.save writes the
inputs, safetensors.safe_open reads our outputs, torch's own casts and
huggingface_hub's shard splitter give the expected answers, gguf-py writes
and dequantizes the GGUF inputs."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402


def start(make_server, root):
    return make_server(args=["--model-root", str(root)])


def convert(s, model, **params):
    return s.run_job({"type": "convert", "model": str(model), "params": params})


def read_out(path):
    """{name: tensor} of every safetensors file in path, plus metadata."""
    out, metas = {}, []
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as g:
                metas.append(g.metadata())
                for k in g.keys():
                    assert k not in out
                    out[k] = g.get_tensor(k)
    return out, metas


def same_bits(a, b):
    """Bit-exact equality (NaN-safe): same dtype, shape and bytes."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a, b = a.contiguous(), b.contiguous()
    if a.numel() == 0:
        return True
    return bytes(a.view(torch.uint8).numpy()) == bytes(b.view(torch.uint8).numpy()) if a.dim() else \
        bytes(a.reshape(1).view(torch.uint8).numpy()) == bytes(b.reshape(1).view(torch.uint8).numpy())


def no_leftovers(path):
    """Nothing but finished outputs: no temp folders next to them."""
    if not os.path.isdir(path):
        return True
    return [n for n in os.listdir(path) if ".convert-" in n or ".old-" in n] == []


def mixed_state_dict():
    torch.manual_seed(0)
    emb = torch.randn(100, 16)
    fused = torch.randn(48, 16)
    big = torch.randn(6, 10)
    return {
        "model.embed_tokens.weight": emb,
        "lm_head.weight": emb,  # tied: the very same view
        "q_proj.weight": fused[:16],  # three views at different offsets of one storage
        "k_proj.weight": fused[16:32],
        "v_proj.weight": fused[32:],
        "transposed": torch.randn(8, 4).t(),  # strided view
        "slice_cols": big[:, 2:7],  # non-contiguous slice
        "half": torch.randn(10).half(),
        "bf16": torch.randn(3, 5).bfloat16(),
        "f64": torch.randn(4).double(),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "u8": torch.arange(7, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


# ---------------------------------------------------------------- keep

def test_keep_is_bit_exact_with_tied_and_views(make_server, model_root):
    m = model_root / "tiny"
    m.mkdir()
    sd = mixed_state_dict()
    torch.save(sd, m / "pytorch_model.bin")
    (m / "config.json").write_text('{"model_type": "llama"}')
    (m / "tokenizer.json").write_text('{"version": "1.0"}')
    (m / "training_args.bin").write_bytes(b"not a checkpoint")  # never opened
    s = start(make_server, model_root)
    job = convert(s, m)
    assert job["state"] == "succeeded", job
    r = job["result"]
    out = r["output_path"]
    assert out == os.path.join(os.path.realpath(s.data_dir), "converted", "tiny")
    assert r["shared_tensors_deduplicated"] == 1
    assert r["deduplicated"] == [{"name": "lm_head.weight", "same_as": "model.embed_tokens.weight"}]
    assert r["tensors"] == len(sd) - 1 and r["verified"] is True
    assert [f["name"] for f in r["files"]] == ["model.safetensors"]
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    got, metas = read_out(out)
    assert metas == [{"format": "pt"}]
    assert set(got) == set(sd) - {"lm_head.weight"}
    for k, v in got.items():
        assert same_bits(v, sd[k].contiguous()), k
    assert r["bytes"] == sum(v.numel() * v.element_size() for v in got.values())
    # auxiliary files come along; weights and training state do not
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert no_leftovers(os.path.dirname(out))
    # the model folder itself is untouched
    assert sorted(os.listdir(m)) == ["config.json", "pytorch_model.bin", "tokenizer.json",
                                     "training_args.bin"]
    # a second run replaces our own earlier output, when asked to
    job2 = convert(s, m)
    assert job2["state"] == "failed" and job2["error"]["code"] == "output_exists", job2
    job2 = convert(s, m, overwrite=True)
    assert job2["state"] == "succeeded", job2
    assert no_leftovers(os.path.dirname(out))


def test_legacy_format(make_server, model_root):
    m = model_root / "legacy"
    m.mkdir()
    sd = mixed_state_dict()
    torch.save(sd, m / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    s = start(make_server, model_root)
    job = convert(s, m)
    assert job["state"] == "succeeded", job
    assert job["result"]["source_format"] == "pt_legacy"
    got, _ = read_out(job["result"]["output_path"])
    assert set(got) == set(sd) - {"lm_head.weight"}
    for k, v in got.items():
        assert same_bits(v, sd[k].contiguous()), k


# ---------------------------------------------------------------- casts

def special_floats():
    vals = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 65504.0, 65520.0,
            1e6, -1e6, 1e-8, 6e-8, 3e-5, 1e-40, -1e-45, 3.4e38, 1.00048828125, 1.0009765625,
            1 + 2 ** -8, 1 + 3 * 2 ** -9, 2.0 ** -24, 2.0 ** -25, 2.0 ** -133]
    torch.manual_seed(1)
    rnd = torch.randn(997) * torch.logspace(-30, 30, 997)
    return torch.cat([torch.tensor(vals, dtype=torch.float32), rnd])


@pytest.mark.parametrize("dtype,tdt", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                       ("fp32", torch.float32)])
def test_cast_matches_torch(make_server, model_root, dtype, tdt):
    m = model_root / ("cast_" + dtype)
    m.mkdir()
    x = special_floats()
    sd = {"f32": x, "f32_view": x[::3],
          "bf16": x.bfloat16(), "f16": x.half(), "f64": x.double() * 1.0000001,
          "ids": torch.arange(9), "u8": torch.arange(4, dtype=torch.uint8)}
    torch.save(sd, m / "pytorch_model.bin")
    s = start(make_server, model_root)
    job = convert(s, m, dtype=dtype)
    assert job["state"] == "succeeded", job
    got, _ = read_out(job["result"]["output_path"])
    for k, v in sd.items():
        g = got[k]
        if v.is_floating_point():
            want = v.contiguous().to(tdt)
            assert g.dtype == tdt, k
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(g), nan), k
            assert same_bits(g[~nan], want[~nan]), k
        else:
            assert same_bits(g, v), k  # integers untouched


# ---------------------------------------------------------------- config.json dtype

TORCH_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def auto_dtypes(cfg):
    """The dtype each transformers generation picks for torch_dtype="auto"
    (and SGLang/vLLM for --dtype auto): before 4.56 `torch_dtype`, from 4.56
    on `dtype` first, then `torch_dtype`. Multimodal models: text_config."""
    old = cfg.get("torch_dtype")
    new = cfg.get("dtype", cfg.get("torch_dtype"))
    return old, new


@pytest.mark.parametrize("dtype,tdt", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                       ("keep", torch.float16)])
def test_config_names_the_dtype_written(make_server, model_root, dtype, tdt):
    m = model_root / ("cfg_" + dtype)
    m.mkdir()
    torch.manual_seed(2)
    # "keep": fp16 weights with a few fp32 norms, under a config that says float32
    sd = {"embed": torch.randn(64, 32).half(), "proj": torch.randn(32, 32).half(),
          "norm": torch.randn(32), "ids": torch.arange(4)}
    if dtype != "keep":
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save(sd, m / "pytorch_model.bin")
    cfg_in = {"model_type": "llava", "torch_dtype": "float32", "dtype": "float32",
              "text_config": {"model_type": "llama", "torch_dtype": "float32"},
              "vision_config": {"hidden_size": 8}}
    (m / "config.json").write_text(json.dumps(cfg_in, indent=2))
    s = start(make_server, model_root)
    job = convert(s, m, dtype=dtype)
    assert job["state"] == "succeeded", job
    out = job["result"]["output_path"]
    got, _ = read_out(out)
    held = {v.dtype for v in got.values() if v.is_floating_point()}
    assert tdt in held
    cfg = json.load(open(os.path.join(out, "config.json")))
    want = TORCH_NAMES[tdt]
    assert auto_dtypes(cfg) == (want, want), cfg
    assert auto_dtypes(cfg["text_config"]) == (want, want), cfg
    # everything else is the source's config, unchanged
    rest = {k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype", "text_config")}
    assert rest == {"model_type": "llava", "vision_config": {"hidden_size": 8}}
    assert cfg["text_config"]["model_type"] == "llama"
    # written through a temp file and renamed: nothing left over
    assert sorted(os.listdir(out)) == [".modelprep-convert.json", "config.json",
                                       "model.safetensors"]
    assert json.load(open(m / "config.json")) == cfg_in  # the source is untouched


# ---------------------------------------------------------------- sharding

def test_sharded_input_and_output_split_like_huggingface_hub(make_server, model_root):
    from huggingface_hub import split_torch_state_dict_into_shards
    m = model_root / "sharded"
    m.mkdir()
    torch.manual_seed(2)
    sd = {}
    for i in range(6):
        sd["layers.%d.w" % i] = torch.randn(64, 32)  # 8192 bytes
        sd["layers.%d.b" % i] = torch.randn(32)  # 128 bytes
    sd["huge"] = torch.randn(100, 64)  # 25600 bytes: over the limit, a shard of its own
    names = list(sd)
    parts = [names[:7], names[7:]]
    wm = {}
    for i, part in enumerate(parts):
        fn = "pytorch_model-%05d-of-%05d.bin" % (i + 1, len(parts))
        torch.save({k: sd[k] for k in part}, m / fn)
        wm.update({k: fn for k in part})
    (m / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    limit = 20000
    s = start(make_server, model_root)
    job = convert(s, m, max_shard_bytes=limit)
    assert job["state"] == "succeeded", job
    out = job["result"]["output_path"]
    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    want = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    assert idx["weight_map"] == want.tensor_to_filename
    assert idx["metadata"]["total_size"] == sum(v.numel() * 4 for v in sd.values())
    files = sorted(set(idx["weight_map"].values()))
    assert files == sorted(want.filename_to_tensors)
    assert len(files) > 2 and all(f.startswith("model-0000") for f in files)
    for f in files:
        with safe_open(os.path.join(out, f), framework="pt") as g:
            assert g.metadata() == {"format": "pt"}
            assert set(g.keys()) == {k for k, v in idx["weight_map"].items() if v == f}
            size = sum(g.get_tensor(k).numel() * 4 for k in g.keys())
            assert size <= limit or len(list(g.keys())) == 1
            for k in g.keys():
                assert same_bits(g.get_tensor(k), sd[k])
    assert sorted(x["name"] for x in job["result"]["files"]) == sorted(
        files + ["model.safetensors.index.json"])


def test_sharded_without_index_is_merged(make_server, model_root):
    m = model_root / "noindex"
    m.mkdir()
    a, b = {"a": torch.randn(3)}, {"b": torch.randn(4)}
    torch.save(a, m / "pytorch_model-00001-of-00002.bin")
    torch.save(b, m / "pytorch_model-00002-of-00002.bin")
    s = start(make_server, model_root)
    job = convert(s, m)
    assert job["state"] == "succeeded", job
    got, _ = read_out(job["result"]["output_path"])
    assert same_bits(got["a"], a["a"]) and same_bits(got["b"], b["b"])


# ---------------------------------------------------------------- refusals

def test_unsafe_pickle_fails_and_writes_nothing(make_server, model_root, tmp_path):
    m = model_root / "evil"
    m.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch %s" % marker,))

    torch.save({"w": torch.ones(2), "x": Evil()}, m / "pytorch_model.bin")
    s = start(make_server, model_root)
    job = convert(s, m)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "unsafe_pickle"
    assert "%s.system" % os.system.__module__ in job["error"]["message"]
    assert not marker.exists()
    conv = os.path.join(s.data_dir, "converted")
    assert not os.path.exists(os.path.join(conv, "evil"))
    assert no_leftovers(conv)


def test_error_paths_are_clear(make_server, model_root):
    s = start(make_server, model_root)
    # already safetensors
    st = model_root / "already"
    st.mkdir()
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(st / "model.safetensors"))
    job = convert(s, st)
    assert job["state"] == "failed" and job["error"]["code"] == "not_found"
    assert "safetensors already" in job["error"]["message"]
    # unreadable index
    bad = model_root / "badindex"
    bad.mkdir()
    (bad / "pytorch_model.bin.index.json").write_text("{not json")
    job = convert(s, bad)
    assert job["state"] == "failed" and job["error"]["code"] == "bad_header", job["error"]
    # a weight_map naming a missing file
    miss = model_root / "missing"
    miss.mkdir()
    torch.save({"a": torch.ones(2)}, miss / "pytorch_model-00001-of-00002.bin")
    (miss / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    job = convert(s, miss)
    assert job["state"] == "failed" and job["error"]["code"] == "not_found", job["error"]
    assert "pytorch_model-00002-of-00002.bin" in job["error"]["message"]
    # empty folder
    empty = model_root / "empty"
    empty.mkdir()
    job = convert(s, empty)
    assert job["state"] == "failed" and job["error"]["code"] == "not_found"
    assert no_leftovers(os.path.join(s.data_dir, "converted"))


def test_output_param_is_confined(make_server, model_root, tmp_path):
    m = model_root / "outp"
    m.mkdir()
    torch.save({"a": torch.ones(2)}, m / "pytorch_model.bin")
    s = start(make_server, model_root)
    for bad in ["relative/dir", str(tmp_path / "elsewhere"), str(model_root / ".." / "x"),
                str(model_root), str(m), "/"]:
        st, doc = s.post("/v1/jobs", {"type": "convert", "model": str(m),
                                      "params": {"output": bad}})
        assert st == 400, (bad, doc)
        assert "params.output" in json.dumps(doc), doc
    st, doc = s.post("/v1/jobs", {"type": "convert", "model": str(m), "params": {"dtype": "int4"}})
    assert st == 400 and "params.dtype" in json.dumps(doc)
    # a folder inside the model root is fine
    target = model_root / "outp-st"
    job = convert(s, m, output=str(target))
    assert job["state"] == "succeeded", job
    assert job["result"]["output_path"] == str(target)
    assert os.path.exists(target / "model.safetensors")
    # an existing folder that convert did not make is never replaced
    other = model_root / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    job = convert(s, m, output=str(other))
    assert job["state"] == "failed" and job["error"]["code"] == "output_exists"
    assert (other / "keep.txt").read_text() == "mine"
    assert no_leftovers(str(model_root))


def test_cancel_leaves_nothing(make_server, model_root):
    m = model_root / "big"
    m.mkdir()
    sd = {"t%d" % i: torch.randn(512, 1024) for i in range(24)}  # 48 MiB
    torch.save(sd, m / "pytorch_model.bin")
    s = start(make_server, model_root)
    job = s.submit({"type": "convert", "model": str(m), "params": {"dtype": "bf16"}})
    st, _ = s.delete("/v1/jobs/" + job["id"])
    done = s.wait_job(job["id"])
    conv = os.path.join(s.data_dir, "converted")
    if done["state"] == "cancelled":
        assert not os.path.exists(os.path.join(conv, "big"))
    else:  # finished before the cancel arrived
        assert done["state"] == "succeeded"
    assert no_leftovers(conv)


# ---------------------------------------------------------------- GGUF

def llama_cpp_permute(w, n_head):
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_gguf_to_safetensors(make_server, model_root):
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    rng = np.random.default_rng(3)
    hidden, heads, kv, ff, vocab = 64, 4, 2, 96, 40
    hd = hidden // heads
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(hidden).astype(np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(hidden).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((hidden, hidden)).astype(np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv * hd, hidden)).astype(np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((kv * hd, hidden)).astype(np.float32),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, hidden)).astype(np.float32),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(hidden).astype(np.float32),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((ff, hidden)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((ff, hidden)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, ff)).astype(np.float32),
    }
    gname = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    quant = {"blk.0.attn_q.weight": T.Q8_0, "blk.0.attn_k.weight": T.Q8_0,
             "blk.0.ffn_up.weight": T.Q8_0, "blk.0.ffn_down.weight": T.Q4_0}
    m = model_root / "gg"
    m.mkdir()
    w = gguf.GGUFWriter(str(m / "tiny.Q8_0.gguf"), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    expected = {}
    for name, x in hf.items():
        g = gname[name]
        if g == "blk.0.attn_q.weight":
            x = llama_cpp_permute(x, heads)
        elif g == "blk.0.attn_k.weight":
            x = llama_cpp_permute(x, kv)
        if g in quant:
            raw = quants.quantize(x, quant[g])
            w.add_tensor(g, raw, raw_dtype=quant[g])
            deq = quants.dequantize(raw, quant[g]).reshape(x.shape)
        else:
            w.add_tensor(g, x)
            deq = x
        n = {"blk.0.attn_q.weight": heads, "blk.0.attn_k.weight": kv}.get(g)
        if n:  # transformers' reverse_permute
            deq = deq.reshape(n, deq.shape[0] // n // 2, 2, *deq.shape[1:]).swapaxes(2, 1).reshape(deq.shape)
        expected[name] = (deq, g in quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = start(make_server, model_root)
    job = convert(s, m)
    assert job["state"] == "succeeded", job
    out = job["result"]["output_path"]
    got, _ = read_out(out)
    assert set(got) == set(hf)
    for name, (deq, was_quant) in expected.items():
        g = got[name].numpy()
        if was_quant:  # dequantized to fp16 (default)
            assert g.dtype == np.float16, name
            assert np.array_equal(g, deq.astype(np.float16)), name
        else:  # plain F32 tensors keep their dtype
            assert g.dtype == np.float32 and np.array_equal(g, deq), name
        if not was_quant and name.endswith("q_proj.weight"):
            assert np.array_equal(g, hf[name])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == hidden and cfg["num_key_value_heads"] == kv
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is True
    # an explicit dtype applies to every float tensor
    job = convert(s, m, dtype="fp32", output=str(model_root / "gg32"))
    assert job["state"] == "succeeded", job
    got, _ = read_out(job["result"]["output_path"])
    q = got["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert q.dtype == np.float32
    assert np.array_equal(q, expected["model.layers.0.self_attn.q_proj.weight"][0])


def test_hub_snapshot_converts_outside_the_cache(make_server, tmp_path):
    """A cached hub snapshot (files are symlinks into blobs/) converts into
    <data_dir>/converted/org--name-<revision>; an output inside the hub cache
    is refused."""
    data = tmp_path / "hubdata"
    repo = data / "hub" / "models--acme--tiny"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    sd = {"w": torch.randn(4, 4), "b": torch.randn(4).half()}
    torch.save(sd, repo / "blobs" / "b1")
    (repo / "blobs" / "b2").write_text('{"model_type": "llama"}')
    os.symlink("../../blobs/b1", snap / "pytorch_model.bin")
    os.symlink("../../blobs/b2", snap / "config.json")
    s = make_server(data_dir=data)
    job = s.run_job({"type": "convert", "model": "acme/tiny", "params": {"dtype": "bf16"}})
    assert job["state"] == "succeeded", job
    out = job["result"]["output_path"]
    assert out == os.path.join(os.path.realpath(str(data)), "converted", "acme--tiny-main")
    got, _ = read_out(out)
    assert same_bits(got["w"], sd["w"].bfloat16()) and same_bits(got["b"], sd["b"].bfloat16())
    assert json.load(open(os.path.join(out, "config.json"))) == {
        "model_type": "llama", "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    assert not os.path.islink(os.path.join(out, "config.json"))
    assert sorted(os.listdir(snap)) == ["config.json", "pytorch_model.bin"]
    st, doc = s.post("/v1/jobs", {"type": "convert", "model": "acme/tiny",
                                  "params": {"output": str(data / "hub" / "conv")}})
    assert st == 400 and "params.output" in json.dumps(doc)
