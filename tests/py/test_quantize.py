"""quantize: our kernels and the `quantize` job against the real references.

Kernels (through tests/helpers/qz_kernel): FP8 per tensor / channel / block
against the torch recipe (amax / 448, x / scale, clamp, .to(float8_e4m3fn)),
NF4 against bitsandbytes' quantize_4bit on CPU (with and without double
quantization, whose nested absmax is bitsandbytes' quantize_blockwise) and
LLM.int8 against bitsandbytes' int8_vectorwise_quant, byte for byte, on
random tensors of several scales, shapes that are not block multiples, and
the values where rounding is decided (midpoints, ties)."""
import json
import os
import subprocess

import pytest

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

from conftest import tool  # noqa: E402

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def run_kernel(tmp_path, method, x, *extra):
    """Our parts for tensor x: a list of (plan entry, bytes)."""
    dt = {v: k for k, v in DTYPES.items()}[x.dtype]
    src = tmp_path / "in.raw"
    src.write_bytes(raw(x))
    prefix = str(tmp_path / "out")
    p = subprocess.run([tool("qz_kernel"), method, dt, str(x.shape[0]), str(x.shape[1]), str(src),
                        prefix] + [str(e) for e in extra], capture_output=True, text=True)
    if p.returncode == 1:
        return p.stdout.strip()
    assert p.returncode == 0, p.stderr
    plan = [json.loads(line) for line in p.stdout.splitlines()]
    return [(e, open("%s.%d" % (prefix, i), "rb").read()) for i, e in enumerate(plan)]


def raw(t):
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def fp8_reference(x, mode, block=(128, 128)):
    """The recipe, in float32: scale = amax / 448 (1.0 for an all-zero group)."""
    x = x.float()

    def q(v, s):
        return (v / s).clamp(-448, 448).to(torch.float8_e4m3fn)

    def scale(amax):
        return torch.where(amax == 0, torch.ones_like(amax), amax / 448)

    if mode == "fp8":
        s = scale(x.abs().amax())
        return q(x, s), s
    if mode == "fp8-channel":
        s = scale(x.abs().amax(dim=1, keepdim=True))
        return q(x, s), s
    bn, bk = block
    n, k = x.shape
    s = torch.empty((n + bn - 1) // bn, (k + bk - 1) // bk)
    out = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s[i, j] = scale(blk.abs().amax())
            out[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = q(blk, s[i, j])
    return out, s


def inputs():
    g = torch.Generator().manual_seed(1234)
    for dt in DTYPES.values():
        for shape in [(64, 64), (130, 200), (3, 7), (1, 1), (257, 129)]:
            for sc in (1.0, 1e-3, 300.0):
                x = (torch.randn(shape, generator=g) * sc).to(dt)
                x.view(-1)[0] = 0
                yield x


@pytest.mark.parametrize("mode", ["fp8", "fp8-channel", "fp8-block"])
def test_fp8_equals_torch_recipe(tmp_path, mode):
    for x in inputs():
        ref_q, ref_s = fp8_reference(x, mode)
        (qp, q), (sp, s) = run_kernel(tmp_path, mode, x)
        assert qp["dtype"] == "F8_E4M3" and qp["shape"] == list(x.shape)
        assert q == raw(ref_q), (mode, x.dtype, x.shape)
        assert sp["shape"] == list(ref_s.shape)
        assert s == raw(ref_s.float()), (mode, x.dtype, x.shape)


def test_fp8_block_tails_and_rounding_edges(tmp_path):
    # Every e4m3 value, the midpoints between neighbours (ties to even) and
    # their neighbours, scaled so that the block's amax is exactly 448.
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)].unique()
    mids = (codes[1:] + codes[:-1]) / 2
    vals = torch.cat([codes, mids, torch.nextafter(mids, torch.tensor(1e9)),
                      torch.nextafter(mids, torch.tensor(-1e9))])
    x = torch.zeros(300, 140)
    x.view(-1)[:vals.numel()] = vals
    x[0, 0] = 448.0
    for block in [(128, 128), (100, 7), (1, 140)]:
        ref_q, ref_s = fp8_reference(x, "fp8-block", block)
        (_, q), (sp, s) = run_kernel(tmp_path, "fp8-block", x, *block)
        assert sp["name"] == "m.weight_scale_inv"
        assert q == raw(ref_q) and s == raw(ref_s), block


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_equals_bitsandbytes(tmp_path, dq):
    torch.set_num_threads(1)  # bitsandbytes' nested mean is torch's: see quantize.h
    for x in inputs():
        ref, st = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
        parts = run_kernel(tmp_path, "nf4", x, *([] if dq else ["nodq"]))
        names = [p["name"] for p, _ in parts]
        got = dict((p["name"], b) for p, b in parts)
        assert got["m.weight"] == raw(ref), (x.dtype, x.shape)
        assert got["m.weight.absmax"] == raw(st.absmax)
        assert got["m.weight.quant_map"] == raw(st.code)
        if dq:
            assert got["m.weight.nested_absmax"] == raw(st.state2.absmax)
            assert got["m.weight.nested_quant_map"] == raw(st.state2.code)
        state = json.loads(got["m.weight.quant_state.bitsandbytes__nf4"])
        want = {k: v for k, v in st.as_dict(packed=False).items() if not torch.is_tensor(v)}
        want["shape"] = list(want["shape"])
        assert state == want
        assert names[0] == "m.weight" and names[-1].endswith("bitsandbytes__nf4")


def test_nf4_ties_and_big_nested(tmp_path):
    torch.set_num_threads(1)
    code = bnbf.get_4bit_type("nf4", device="cpu")
    mids = (code[:-1] + code[1:]) / 2
    x = torch.zeros(4, 64)
    x[0, 0] = 1.0
    x[0, 1:16] = mids
    x[0, 16:31] = torch.nextafter(mids, torch.tensor(2.0))
    x[0, 31:46] = torch.nextafter(mids, torch.tensor(-2.0))
    x[1, 0] = -1.0
    x[1, 1:16] = -mids
    ref, st = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
    got = dict((p["name"], b) for p, b in run_kernel(tmp_path, "nf4", x, "nodq"))
    assert got["m.weight"] == raw(ref)
    assert got["m.weight.absmax"] == raw(st.absmax)
    # More than 32768 blocks (torch's one-thread sum; ties in the dynamic map's
    # 65536-entry table), an odd element count.
    y = (torch.randn(1031, 2049) * 0.02).to(torch.bfloat16)
    ref, st = bnbf.quantize_4bit(y, blocksize=64, quant_type="nf4", compress_statistics=True)
    got = dict((p["name"], b) for p, b in run_kernel(tmp_path, "nf4", y))
    assert got["m.weight"] == raw(ref)
    assert got["m.weight.absmax"] == raw(st.absmax)
    assert got["m.weight.nested_absmax"] == raw(st.state2.absmax)


def test_codebooks_are_bitsandbytes(tmp_path):
    got = dict((p["name"], b) for p, b in run_kernel(tmp_path, "nf4", torch.ones(1, 64)))
    assert got["m.weight.quant_map"] == raw(bnbf.get_4bit_type("nf4", device="cpu"))
    assert got["m.weight.nested_quant_map"] == raw(bnbf.create_dynamic_map())


def test_int8_equals_bitsandbytes(tmp_path):
    for x in inputs():
        cb, scb, _ = bnbf.int8_vectorwise_quant(x.to(torch.float16))
        (wp, w), (sp, s), (fp, f) = run_kernel(tmp_path, "int8", x)
        assert (wp["dtype"], sp["name"], fp["name"]) == ("I8", "m.SCB", "m.weight_format")
        assert w == raw(cb) and s == raw(scb), (x.dtype, x.shape)
        assert f == b"\x00"
    # Ties at .5 after the scale (row absmax 127: the multiplier is exactly 1).
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 3.5, -0.5, 126.5, 0.0], [0.0] * 8])
    cb, scb, _ = bnbf.int8_vectorwise_quant(x.to(torch.float16))
    (_, w), (_, s), _ = run_kernel(tmp_path, "int8", x)
    assert w == raw(cb) and s == raw(scb)


def test_non_finite_refused(tmp_path):
    for method in ("fp8", "fp8-block", "nf4", "int8"):
        x = torch.ones(3, 70, dtype=torch.bfloat16)
        x[2, 69] = float("nan")
        out = run_kernel(tmp_path, method, x)
        assert isinstance(out, str) and out.startswith("ERROR non_finite_weight"), out
        assert "m.weight" in out and "[2, 69]" in out


# ---------------------------------------------------------------------------
# The job, through the real server.

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def start(make_server, root):
    return make_server(args=["--model-root", str(root)])


def quantize(s, model, **params):
    return s.run_job({"type": "quantize", "model": str(model), "params": params})


def read_out(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as g:
                assert g.metadata() == {"format": "pt"}
                for k in g.keys():
                    assert k not in out
                    out[k] = g.get_tensor(k)
    return out


def toy_model(root, name="toy", dtype=torch.bfloat16, config=True, nan=False):
    """A hand-made checkpoint (torch + safetensors save_file) with what the
    default ignore rules must leave alone, shapes that are not block multiples
    and two shards with an index."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    a = {"model.embed_tokens.weight": r(96, 64),
         "model.layers.0.self_attn.q_proj.weight": r(300, 64),
         "model.layers.0.self_attn.q_proj.bias": r(300),
         "model.layers.0.mlp.gate_proj.weight": r(130, 64),
         "model.layers.0.input_layernorm.weight": r(64)}
    b = {"model.layers.0.mlp.gate.weight": r(8, 64),
         "model.layers.0.mlp.down_proj.weight": r(64, 130),
         "lm_head.weight": r(96, 64)}
    if nan:
        b["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    d = root / name
    d.mkdir()
    save_file(a, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" for k in a}
    wm.update({k: "model-00002-of-00002.safetensors" for k in b})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if config:
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (d / "tokenizer.json").write_text("{}")
    return d, dict(a, **b)


QUANTIZED = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
             "model.layers.0.mlp.down_proj"]
IGNORED = ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate"]


@pytest.mark.parametrize("method", ["fp8", "fp8-channel", "fp8-block"])
def test_job_fp8_tensor_by_tensor(make_server, model_root, method):
    d, src = toy_model(model_root)
    s = start(make_server, model_root)
    job = quantize(s, d, method=method, max_shard_bytes=60000)
    assert job["state"] == "succeeded", job
    res = job["result"]
    out_dir = res["output_path"]
    assert out_dir.endswith("/converted/toy-" + method)
    assert res["quantized"] == 3 and sorted(res["ignored"]) == IGNORED
    assert res["unmatched_ignore"] == [] and res["warnings"] == []
    names = sorted(os.listdir(out_dir))
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names
    out = read_out(out_dir)
    index = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    assert sorted(index["weight_map"]) == sorted(out)
    scale_name = "weight_scale_inv" if method == "fp8-block" else "weight_scale"
    for m in QUANTIZED:
        ref_q, ref_s = fp8_reference(src[m + ".weight"], method)
        assert out[m + ".weight"].dtype == torch.float8_e4m3fn
        assert raw(out[m + ".weight"]) == raw(ref_q), m
        sc = out[m + "." + scale_name]
        assert sc.dtype == torch.float32 and raw(sc) == raw(ref_s), m
        # What SGLang's / vLLM's Fp8LinearMethod (and compressed-tensors'
        # W8A8Fp8 for channels) register: scalar (per-tensor), [N, 1], or
        # [ceil(N/128), ceil(K/128)]; they multiply the fp8 values.
        n, k = src[m + ".weight"].shape
        want = {"fp8": (), "fp8-channel": (n, 1), "fp8-block": ((n + 127) // 128, (k + 127) // 128)}
        assert tuple(sc.shape) == want[method]
        q = out[m + ".weight"].float()
        if method == "fp8-block":
            sc = sc.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        deq = q * sc
        assert torch.allclose(deq, src[m + ".weight"].float(), rtol=0.07, atol=1e-4)
    for k in src:
        if not any(k == m + ".weight" for m in QUANTIZED):
            assert raw(out[k]) == raw(src[k]), k  # copied as they were
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    qc = cfg["quantization_config"]
    assert cfg["torch_dtype"] == "bfloat16"
    if method == "fp8-channel":
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
        w = qc["config_groups"]["group_0"]["weights"]
        assert (w["strategy"], w["type"], w["num_bits"], w["dynamic"]) == ("channel", "float", 8, False)
        assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
        assert sorted(qc["ignore"]) == IGNORED
    else:
        assert (qc["quant_method"], qc["fmt"], qc["activation_scheme"]) == ("fp8", "e4m3", "dynamic")
        assert qc.get("weight_block_size") == ([128, 128] if method == "fp8-block" else None)
        assert sorted(qc["ignored_layers"]) == IGNORED
    # inspect reports what was asked
    ins = s.run_job({"type": "inspect", "model": out_dir})
    assert ins["state"] == "succeeded", ins
    q = ins["result"]["quantization"]
    assert q["method"] == ("compressed-tensors" if method == "fp8-channel" else "fp8"), q
    assert q["weight_block_size"] == ([128, 128] if method == "fp8-block" else None)
    if method == "fp8-channel":
        assert (q["strategy"], q["weight_type"], q["bits"]) == ("channel", "float", 8)
    assert sorted(q["ignored_layers"]) == IGNORED


@pytest.mark.parametrize("dq", [True, False])
def test_job_nf4_equals_bitsandbytes(make_server, model_root, dq):
    torch.set_num_threads(1)
    d, src = toy_model(model_root)
    s = start(make_server, model_root)
    job = quantize(s, d, method="nf4", double_quant=dq, output=str(model_root / "out"))
    assert job["state"] == "succeeded", job
    out = read_out(str(model_root / "out"))
    for m in QUANTIZED:
        ref, st = bnbf.quantize_4bit(src[m + ".weight"], blocksize=64, quant_type="nf4",
                                     compress_statistics=dq)
        assert raw(out[m + ".weight"]) == raw(ref), m
        assert raw(out[m + ".weight.absmax"]) == raw(st.absmax)
        if dq:
            assert raw(out[m + ".weight.nested_absmax"]) == raw(st.state2.absmax)
        # Read back as transformers does (Params4bit.from_prequantized builds
        # this QuantState from the serialized parts), then dequantized.
        parts = {k[len(m) + 8:]: v for k, v in out.items() if k.startswith(m + ".weight.")}
        qs = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
        deq = bnbf.dequantize_4bit(out[m + ".weight"], qs)
        want = bnbf.dequantize_4bit(ref, st)
        assert torch.equal(deq, want)
    cfg = json.load(open(model_root / "out" / "config.json"))["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"] is True
    assert cfg["bnb_4bit_quant_type"] == "nf4" and cfg["bnb_4bit_use_double_quant"] is dq
    assert sorted(cfg["llm_int8_skip_modules"]) == IGNORED
    ins = s.run_job({"type": "inspect", "model": str(model_root / "out")})
    q = ins["result"]["quantization"]
    assert q["method"] == "bitsandbytes" and q.get("bits") == 4, q
    assert (q["quant_type"], q["group_size"], q["double_quant"]) == ("nf4", 64, dq)


def test_job_int8_equals_bitsandbytes(make_server, model_root):
    d, src = toy_model(model_root)
    s = start(make_server, model_root)
    job = quantize(s, d, method="int8", output=str(model_root / "out"))
    assert job["state"] == "succeeded", job
    out = read_out(str(model_root / "out"))
    for m in QUANTIZED:
        cb, scb, _ = bnbf.int8_vectorwise_quant(src[m + ".weight"].to(torch.float16))
        assert raw(out[m + ".weight"]) == raw(cb) and raw(out[m + ".SCB"]) == raw(scb), m
        assert out[m + ".weight_format"].item() == 0
    cfg = json.load(open(model_root / "out" / "config.json"))["quantization_config"]
    assert cfg["load_in_8bit"] is True and cfg["load_in_4bit"] is False
    ins = s.run_job({"type": "inspect", "model": str(model_root / "out")})
    q = ins["result"]["quantization"]
    assert q["method"] == "bitsandbytes" and q.get("bits") == 8, q


def tiny_llama(root, inter=256):
    tr = pytest.importorskip("transformers")
    cfg = tr.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = tr.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(str(root / "tiny"))
    return root / "tiny", m


@pytest.mark.parametrize("method", ["nf4", "int8", "fp8-block"])
def test_job_output_loads_in_transformers(make_server, model_root, method):
    """transformers loads the output on CPU: bitsandbytes' Linear4bit /
    Linear8bitLt for nf4 / int8 (its CPU backend), FineGrainedFP8's CPU
    dequantization for fp8-block (which needs block multiples, hence 256)."""
    tr = pytest.importorskip("transformers")
    d, ref = tiny_llama(model_root)
    s = start(make_server, model_root)
    out = model_root / ("out-" + method)
    job = quantize(s, d, method=method, output=str(out))
    assert job["state"] == "succeeded", job
    m = tr.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    lin = m.model.layers[0].self_attn.q_proj
    want = {"nf4": "Linear4bit", "int8": "Linear8bitLt", "fp8-block": "Linear"}[method]
    assert type(lin).__name__ == want
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        got = m(x).logits.float()
        exp = ref(x).logits.float()
    # Quantization noise, not garbage: the logits stay close to the original.
    err = (got - exp).abs().max().item()
    assert err < 0.25 * exp.abs().max().item(), err



def quantized_linears(model, parts):
    """The Linear modules of `model` whose weight the job quantized."""
    return [(n, mod) for n, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and n + ".weight_scale" in parts]


def rewrite_tensor(out_dir, name, value):
    """Replace one tensor of a written checkpoint, in the shard that holds it."""
    index = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    path = os.path.join(out_dir, index["weight_map"][name])
    with safe_open(path, framework="pt") as g:
        tensors = {k: g.get_tensor(k) for k in g.keys()}
    tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def test_job_fp8_channel_loads_in_compressed_tensors(make_server, model_root):
    """fp8-channel through transformers + compressed-tensors on CPU, the
    loading code of llm-compressor's FP8_DYNAMIC checkpoints: by default the
    Linears keep our fp8 weights and [N, 1] scales as parameters and
    decompress them on the first forward; with dequantize=True the weights
    are decompressed while loading, so they must equal fp8(q) * scale row by
    row, and a scale changed on disk must change exactly its row."""
    tr = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    d, ref = tiny_llama(model_root, inter=200)  # 200: not a multiple of anything
    s = start(make_server, model_root)
    out = model_root / "out-ch"
    job = quantize(s, d, method="fp8-channel", output=str(out), max_shard_bytes=200000)
    assert job["state"] == "succeeded", job
    parts = read_out(str(out))
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        exp = ref(x).logits.float()

    def close_logits(m):
        with torch.no_grad():
            got = m(x).logits.float()
        err = (got - exp).abs().max().item()
        assert err < 0.25 * exp.abs().max().item(), err

    def dequant(name):
        return (parts[name + ".weight"].float() * parts[name + ".weight_scale"]).to(torch.bfloat16)

    # As stored: compressed-tensors' own parameters hold our bytes.
    m = tr.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    lins = quantized_linears(m, parts)
    assert len(lins) == 14  # 7 Linears a layer, lm_head ignored
    for n, lin in lins:
        assert lin.quantization_scheme.weights.strategy == "channel", n
        assert lin.weight.dtype == torch.float8_e4m3fn and raw(lin.weight) == raw(parts[n + ".weight"]), n
        sc = parts[n + ".weight_scale"]
        assert lin.weight_scale.shape == sc.shape and torch.equal(lin.weight_scale, sc.to(lin.weight_scale.dtype)), n
    close_logits(m)
    for n, lin in lins:  # decompressed by the forward: bf16 weights from bf16 scales
        assert lin.weight.dtype == torch.bfloat16, n
        assert torch.allclose(lin.weight.float(), dequant(n).float(), rtol=2 ** -7, atol=0), n
    # Decompressed while loading, with our float32 scales: exact.
    cfg = tr.CompressedTensorsConfig(dequantize=True)
    m = tr.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", quantization_config=cfg)
    for n, lin in quantized_linears(m, parts):
        assert torch.equal(lin.weight, dequant(n)), n
    assert torch.equal(m.lm_head.weight, ref.lm_head.weight)  # ignored: as it was
    close_logits(m)
    # A wrong scale on disk shows in exactly its row.
    q = "model.layers.1.mlp.down_proj"
    bad = parts[q + ".weight_scale"].clone()
    bad[5, 0] *= 3
    rewrite_tensor(str(out), q + ".weight_scale", bad)
    m = tr.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", quantization_config=cfg)
    got = m.model.layers[1].mlp.down_proj.weight
    want = dequant(q)
    assert not torch.equal(got[5], want[5])
    assert torch.equal(got[5], (parts[q + ".weight"][5].float() * bad[5]).to(torch.bfloat16))
    assert torch.equal(torch.cat([got[:5], got[6:]]), torch.cat([want[:5], want[6:]]))


def test_job_fp8_tensor_loads_in_sglang(make_server, model_root):
    """Per-tensor fp8 through SGLang's own loading code on CPU: its Fp8Config
    reads our config, its Fp8LinearMethod registers the parameters of the
    fused qkv / gate_up and the row-parallel o / down Linears, and their
    weight loaders take our tensors, each scalar scale into its shard's slot;
    SGLang's per_tensor_dequantize of what they hold must give the source.
    (transformers cannot: its FP8Linear reads a per-tensor scale only as
    `weight_scale_inv`, vLLM and SGLang only as `weight_scale`.) Opt-in:
    SGLang 0.5 pins torch 2.14 / transformers 5.19, so it is not in
    scripts/requirements.txt; with it installed (--no-deps, plus the pure
    Python modules it imports) this runs. process_weights_after_loading is
    left out: requantizing the fused shards to one scale is a CUDA/XPU kernel,
    and SGLang's CPU engine needs AMX and sgl-kernel's CPU build."""
    sgl_fp8 = pytest.importorskip("sglang.srt.layers.quantization.fp8")
    from sglang.srt.layers import linear as sgl_linear
    from sglang.srt.layers.quantization.utils import per_tensor_dequantize
    d, ref = tiny_llama(model_root, inter=200)
    s = start(make_server, model_root)
    out = model_root / "out-pt"
    job = quantize(s, d, method="fp8", output=str(out))
    assert job["state"] == "succeeded", job
    parts = read_out(str(out))
    qc = sgl_fp8.Fp8Config.from_config(json.load(open(out / "config.json"))["quantization_config"])
    assert qc.is_checkpoint_fp8_serialized and qc.weight_block_size is None
    head = sgl_linear.ReplicatedLinear(128, 256, bias=False, quant_config=qc, prefix="lm_head")
    kw = dict(bias=False, params_dtype=torch.bfloat16, quant_config=qc, parallel_group="replicated")
    assert type(head.quant_method).__name__ == "UnquantizedLinearMethod"  # ignored_layers read
    checked = 0
    for i, layer in enumerate(ref.model.layers):
        p = "model.layers.%d." % i
        attn, mlp = p + "self_attn.", p + "mlp."
        fused = [(sgl_linear.QKVParallelLinear(128, 32, 4, 2, prefix=attn + "qkv_proj", **kw),
                  [(attn + "q_proj", "q"), (attn + "k_proj", "k"), (attn + "v_proj", "v")]),
                 (sgl_linear.MergedColumnParallelLinear(128, [200, 200], prefix=mlp + "gate_up_proj", **kw),
                  [(mlp + "gate_proj", 0), (mlp + "up_proj", 1)]),
                 (sgl_linear.RowParallelLinear(128, 128, prefix=attn + "o_proj", **kw), [(attn + "o_proj", None)]),
                 (sgl_linear.RowParallelLinear(200, 128, prefix=mlp + "down_proj", **kw),
                  [(mlp + "down_proj", None)])]
        for lin, shards in fused:
            assert type(lin.quant_method).__name__ == "Fp8LinearMethod"
            assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.shape == (len(shards),)
            for name, sid in shards:
                for pn in ("weight", "weight_scale"):
                    prm = getattr(lin, pn)
                    args = (prm, parts[name + "." + pn]) + (() if sid is None else (sid,))
                    prm.weight_loader(*args)
            assert raw(lin.weight) == raw(torch.cat([parts[n + ".weight"] for n, _ in shards]))
            assert torch.equal(lin.weight_scale.data, torch.stack([parts[n + ".weight_scale"] for n, _ in shards]))
            start_row = 0
            for j, (name, _) in enumerate(shards):
                rows = lin.weight[start_row:start_row + lin.logical_widths[j]]
                deq = per_tensor_dequantize(rows, lin.weight_scale[j]).float()
                src = ref.get_parameter(name + ".weight").float()
                sc = parts[name + ".weight_scale"].item()
                # e4m3: half a step is 2^-4 of the value (2^-10 of the scale
                # for subnormals); fp16 (per_tensor_dequantize's) rounds too.
                assert ((deq - src).abs() <= src.abs() * (2 ** -4 + 2 ** -10) + sc * 2 ** -10 + 1e-7).all(), name
                start_row += lin.logical_widths[j]
                checked += 1
    assert checked == 14

def test_job_refusals(make_server, model_root):
    d, _ = toy_model(model_root)
    nan_d, _ = toy_model(model_root, "withnan", nan=True)
    s = start(make_server, model_root)
    # bad params: 400 problem+json naming the field
    for params, field, code in [({}, "params.method", None), ({"method": "int4"}, "params.method", None),
                                ({"method": "nf4", "block_size": [64, 64]}, "params.block_size", "param_conflict"),
                                ({"method": "fp8", "double_quant": False}, "params.double_quant", "param_conflict"),
                                ({"method": "fp8-block", "block_size": [0, 128]}, "params.block_size", None),
                                ({"method": "fp8-block", "block_size": [128]}, "params.block_size", None)]:
        st, doc = s.post("/v1/jobs", {"type": "quantize", "model": str(d), "params": params})
        assert st == 400, (params, st, doc)
        assert doc["errors"][0]["field"] == field, doc
        if code:
            assert doc["errors"][0]["code"] == code
    # NaN in a weight: a clear error naming the tensor, nothing written
    job = quantize(s, nan_d, method="fp8", output=str(model_root / "nan-out"))
    assert job["state"] == "failed" and job["error"]["code"] == "non_finite_weight", job
    assert "model.layers.0.mlp.down_proj.weight" in job["error"]["message"]
    assert "[3, 5]" in job["error"]["message"]
    assert not (model_root / "nan-out").exists()
    assert [n for n in os.listdir(model_root) if "quantize-" in n] == []
    # a quantized source: refused, by its config and by its tensors alone
    job = quantize(s, d, method="fp8-block")
    assert job["state"] == "succeeded", job
    out = job["result"]["output_path"]
    for m in ("nf4", "fp8"):
        again = quantize(s, out, method=m, output=str(model_root / ("again-" + m)))
        assert again["state"] == "failed" and again["error"]["code"] == "already_quantized", again
    os.unlink(os.path.join(out, "config.json"))
    again = quantize(s, out, method="int8", output=str(model_root / "again2"))
    assert again["error"]["code"] == "already_quantized", again
    # the output exists: refused unless overwrite
    job2 = quantize(s, d, method="fp8-block")
    assert job2["state"] == "failed" and job2["error"]["code"] == "output_exists", job2
    job3 = quantize(s, d, method="fp8-block", overwrite=True)
    assert job3["state"] == "succeeded", job3
    # not safetensors: convert first
    pt = model_root / "ptmodel"
    pt.mkdir()
    torch.save({"a.weight": torch.randn(4, 4)}, str(pt / "pytorch_model.bin"))
    job = quantize(s, pt, method="fp8")
    assert job["state"] == "failed" and job["error"]["code"] == "unsupported_format", job
    assert "convert" in job["error"]["message"]


def test_job_ignore_patterns(make_server, model_root):
    d, src = toy_model(model_root, config=False)
    s = start(make_server, model_root)
    # User patterns add to the defaults; one that matches nothing is a warning.
    job = quantize(s, d, method="fp8", ignore=["*.down_proj", "*no_such_module*"],
                   output=str(model_root / "o1"))
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert sorted(res["ignored"]) == sorted(IGNORED + ["model.layers.0.mlp.down_proj"])
    assert res["unmatched_ignore"] == ["*no_such_module*"]
    assert any("no_such_module" in w for w in res["warnings"])
    assert any("config.json" in w for w in res["warnings"])  # none in the source
    out = read_out(str(model_root / "o1"))
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    # Without the defaults only the user's patterns count: lm_head and the
    # embeddings are quantized too (the router as well).
    job = quantize(s, d, method="fp8", ignore=["*norm*"], ignore_defaults=False,
                   output=str(model_root / "o2"))
    assert job["state"] == "succeeded", job
    assert job["result"]["quantized"] == 6 and job["result"]["ignored"] == []
    assert job["result"]["unmatched_ignore"] == ["*norm*"]  # the norm is 1-D, never a candidate
    # Everything ignored: nothing to quantize is an error, not an empty copy.
    job = quantize(s, d, method="fp8", ignore=["*"], output=str(model_root / "o3"))
    assert job["state"] == "failed" and job["error"]["code"] == "nothing_to_quantize", job


def test_cli_quantize(make_server, model_root):
    """The client's `quantize` verb: params from flags, followed to the end."""
    from test_cli import cli_env, js  # noqa: E402
    d, _ = toy_model(model_root)
    s = start(make_server, model_root)
    p = subprocess.run([tool("modelprep"), "quantize", str(d), "--method", "fp8-block", "--block-size",
                        "[64, 128]", "--json"], capture_output=True, text=True, env=cli_env(s),
                       timeout=120)
    assert p.returncode == 0, p.stderr
    job = js(p)
    assert job["type"] == "quantize" and job["params"] == {"method": "fp8-block", "block_size": [64, 128]}
    assert job["state"] == "succeeded" and job["result"]["block_size"] == [64, 128]
    p = subprocess.run([tool("modelprep"), "quantize", str(d), "--method", "int4"], capture_output=True,
                       text=True, env=cli_env(s), timeout=120)
    assert p.returncode == 2 and "params.method" in p.stderr, p.stderr  # a 400 is a usage error


def test_job_nf4_nested_mean_as_torch_default(make_server, model_root):
    """Over 32768 blocks torch sums absmax.mean() in parallel, so its result
    (and bitsandbytes') depends on its thread count: the job reproduces torch's
    default on this machine, and says which it used."""
    d = model_root / "big"
    d.mkdir()
    x = (torch.randn(1031, 2049, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.up_proj.weight": x}, str(d / "model.safetensors"))
    s = start(make_server, model_root)
    job = quantize(s, d, method="nf4", output=str(model_root / "out"))
    assert job["state"] == "succeeded", job
    threads = job["result"]["torch_threads"]
    default = subprocess.run([os.sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, env=dict(os.environ))
    assert int(default.stdout) == threads
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, st = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    finally:
        torch.set_num_threads(old)
    out = read_out(str(model_root / "out"))
    m = "model.layers.0.mlp.up_proj.weight"
    assert raw(out[m]) == raw(ref)
    assert raw(out[m + ".absmax"]) == raw(st.absmax)
    assert raw(out[m + ".nested_absmax"]) == raw(st.state2.absmax)
    state = json.loads(bytes(out[m + ".quant_state.bitsandbytes__nf4"].numpy()))
    assert state["nested_offset"] == st.offset.item()
