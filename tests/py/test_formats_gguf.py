"""GGUF reader and dequantizers cross-checked against the real producer:
llama.cpp's `gguf` PyPI package (GGUFWriter, GGUFReader, gguf.quants).

Our side is tests/helpers/gguf_dequant_dump (info: metadata + tensor table as
JSON; dequant: a tensor dequantized to raw f32/f16/bf16 bytes)."""
import hashlib
import json
import os
import struct
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402
from gguf import quants  # noqa: E402

from conftest import SAN, tool  # noqa: E402

ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1")


def dump(*args, check=True):
    p = subprocess.run([tool("gguf_dequant_dump")] + [str(a) for a in args],
                       capture_output=True, env=ENV, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


def info(path):
    return json.loads(dump("info", path).stdout)


def dequant(path, name, out="f32", heads=0):
    raw = dump("dequant", path, name, out, heads).stdout
    return np.frombuffer(raw, dtype={"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[out])


def write(path, build, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def set_version(path, version):
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", version))


# ---------------------------------------------------------------- metadata

@pytest.mark.parametrize("version", [2, 3])
def test_metadata_every_type_and_tensor_table(tmp_path, version):
    rng = np.random.default_rng(1)
    t_f32 = rng.standard_normal((3, 5)).astype(np.float32)
    t_f16 = rng.standard_normal((2, 4, 8)).astype(np.float16)
    t_i32 = np.arange(7, dtype=np.int32)

    def build(w):
        w.add_uint8("t.u8", 250)
        w.add_int8("t.i8", -100)
        w.add_uint16("t.u16", 65000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4000000000)
        w.add_int32("t.i32", -2000000000)
        w.add_float32("t.f32", 0.1)
        w.add_bool("t.bool", True)
        w.add_bool("t.false", False)
        w.add_string("t.str", "héllo ✓ world")
        w.add_uint64("t.u64", 2**62 + 3)
        w.add_int64("t.i64", -(2**62))
        w.add_float64("t.f64", 3.141592653589793)
        w.add_array("t.arr_i32", [1, -2, 3])
        w.add_array("t.arr_f32", [0.5, 1e-5, -2.25])
        w.add_array("t.arr_str", ["a", "", "<0x0A>", "ünï"])
        w.add_array("t.arr_bool", [True, False])
        w.add_key_value("t.arr_u64", [1, 2**40], V.ARRAY, sub_type=V.UINT64)
        w.add_array("t.nested", [[1, 2], [3]])
        w.add_custom_alignment(64)
        w.add_tensor("a.weight", t_f32)
        w.add_tensor("b.weight", t_f16)
        w.add_tensor("c", t_i32)

    path = write(tmp_path / "m.gguf", build)
    if version == 2:
        set_version(path, 2)
    doc = info(path)
    m, ty = doc["metadata"], doc["types"]
    assert doc["version"] == version
    assert doc["alignment"] == 64
    assert m["general.architecture"] == "llama"
    assert m["t.u8"] == 250 and ty["t.u8"] == "UINT8"
    assert m["t.i8"] == -100 and ty["t.i8"] == "INT8"
    assert m["t.u16"] == 65000 and ty["t.u16"] == "UINT16"
    assert m["t.i16"] == -30000 and ty["t.i16"] == "INT16"
    assert m["t.u32"] == 4000000000 and ty["t.u32"] == "UINT32"
    assert m["t.i32"] == -2000000000 and ty["t.i32"] == "INT32"
    assert np.float32(m["t.f32"]) == np.float32(0.1) and ty["t.f32"] == "FLOAT32"
    assert m["t.f32"] == 0.1  # the shortest decimal of the float, not 0.10000000149
    assert m["t.bool"] is True and m["t.false"] is False and ty["t.bool"] == "BOOL"
    assert m["t.str"] == "héllo ✓ world" and ty["t.str"] == "STRING"
    assert m["t.u64"] == 2**62 + 3 and ty["t.u64"] == "UINT64"
    assert m["t.i64"] == -(2**62) and ty["t.i64"] == "INT64"
    assert m["t.f64"] == 3.141592653589793 and ty["t.f64"] == "FLOAT64"
    assert m["t.arr_i32"] == [1, -2, 3] and ty["t.arr_i32"] == "[INT32]"
    assert [np.float32(x) for x in m["t.arr_f32"]] == [np.float32(x) for x in (0.5, 1e-5, -2.25)]
    assert m["t.arr_str"] == ["a", "", "<0x0A>", "ünï"] and ty["t.arr_str"] == "[STRING]"
    assert m["t.arr_bool"] == [True, False]
    assert m["t.arr_u64"] == [1, 2**40] and ty["t.arr_u64"] == "[UINT64]"
    assert m["t.nested"] == [[1, 2], [3]] and ty["t.nested"] == "[ARRAY]"

    # The tensor table agrees with gguf-py's own reader.
    r = gguf.GGUFReader(str(path))
    ours = {t["name"]: t for t in doc["tensors"]}
    assert [t["name"] for t in doc["tensors"]] == [t.name for t in r.tensors]
    for t in r.tensors:
        o = ours[t.name]
        assert o["shape"] == [int(x) for x in reversed(t.shape.tolist())]  # ours outermost-first
        assert o["ggml_type"] == int(t.tensor_type)
        assert o["type_name"] == t.tensor_type.name
        assert o["data_offset"] == t.data_offset
        assert o["nbytes"] == t.n_bytes
        assert o["data_offset"] % 64 == 0
    assert ours["a.weight"]["shape"] == [3, 5] and ours["a.weight"]["dtype"] == "F32"
    assert ours["b.weight"]["shape"] == [2, 4, 8] and ours["b.weight"]["dtype"] == "F16"
    assert ours["c"]["dtype"] == "I32"
    assert np.array_equal(dequant(path, "a.weight"), t_f32.ravel())
    assert np.array_equal(dequant(path, "b.weight", "f16").view(np.uint16), t_f16.ravel().view(np.uint16))
    assert np.array_equal(dequant(path, "b.weight"), t_f16.astype(np.float32).ravel())


def test_huge_array_is_summarized_not_materialized(tmp_path):
    """A 5M-element UINT8 array (over the JSON budget) becomes a summary."""
    n = (1 << 22) + 1
    body = bytearray()
    body += b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    key = b"big.array"
    body += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", V.ARRAY, V.UINT8, n)
    body += bytes(n)
    key = b"after"
    body += struct.pack("<Q", len(key)) + key + struct.pack("<II", V.UINT32, 7)
    path = tmp_path / "big.gguf"
    path.write_bytes(body)
    doc = info(path)
    assert doc["metadata"]["big.array"] == {"omitted": True, "type": "[UINT8]", "count": n}
    assert doc["metadata"]["after"] == 7
    assert gguf.GGUFReader(str(path)).fields["after"].parts[-1][0] == 7


def test_hostile_files_fail_cleanly(tmp_path):
    def build(w):
        w.add_uint32("x", 1)
        w.add_tensor("t", np.ones((4, 32), np.float32))
    good = write(tmp_path / "good.gguf", build).read_bytes()
    cases = {
        "magic": (b"GGUX" + good[4:], "unsupported_format"),
        "v1": (good[:4] + struct.pack("<I", 1) + good[8:], "unsupported_format"),
        "v4": (good[:4] + struct.pack("<I", 4) + good[8:], "unsupported_format"),
        "count": (good[:8] + struct.pack("<Q", 2**60) + good[16:], "too_large"),
        "cut": (good[:-10], "truncated"),
    }
    for name, (data, code) in cases.items():
        p = tmp_path / (name + ".gguf")
        p.write_bytes(data)
        r = dump("info", p, check=False)
        assert r.returncode == 1, name
        assert r.stderr.decode().startswith("error: %s:" % code), (name, r.stderr)


# ---------------------------------------------------------------- dequant

QUANTIZABLE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0, T.MXFP4]
# gguf-py can dequantize these but not quantize them: random blocks instead,
# with finite f16 scales at the offsets of the block layout.
RANDOM_BLOCKS = {
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0], T.NVFP4: [],
}


def random_blocks(qtype, rows, cols, rng):
    blck, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // blck
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    for off in RANDOM_BLOCKS[qtype]:
        d = (rng.standard_normal(nb) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, cols // blck * size)


def bf16_rne(x):
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


@pytest.mark.parametrize("qtype", QUANTIZABLE + list(RANDOM_BLOCKS), ids=lambda q: q.name)
def test_dequant_bit_exact_vs_gguf_py(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    blck, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 6, max(512, blck * 2)
    if qtype in RANDOM_BLOCKS:
        raw = random_blocks(qtype, rows, cols, rng)
    else:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        x[0, :blck] = 0.0  # an all-zero block (d = 0)
        raw = quants.quantize(x, qtype)
    want = quants.dequantize(raw, qtype)
    assert want.shape == (rows, cols)

    path = write(tmp_path / "q.gguf", lambda w: w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype))
    doc = info(path)
    t = doc["tensors"][0]
    assert t["type_name"] == qtype.name and t["dtype"] == "GGML" and t["shape"] == [rows, cols]
    assert t["nbytes"] == raw.nbytes

    got = dequant(path, "blk.0.ffn_up.weight").reshape(rows, cols)
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32)), \
        np.argwhere(got.view(np.uint32) != want.view(np.uint32))[:5]
    got16 = dequant(path, "blk.0.ffn_up.weight", "f16").reshape(rows, cols)
    assert np.array_equal(got16.view(np.uint16), want.astype(np.float16).view(np.uint16))
    gotbf = dequant(path, "blk.0.ffn_up.weight", "bf16").reshape(rows, cols)
    assert np.array_equal(gotbf, bf16_rne(want))


def test_bf16_and_f16_conversions_round_to_nearest_even(tmp_path):
    """F32 tensor with ties, subnormals, overflow, Inf and NaN → f16/bf16."""
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -np.inf, np.inf, np.nan,
                        2.0**-24, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                        np.float32(3.4e38), 1e-40], np.float32)
    bits = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([special, bits.view(np.float32)])
    x = np.concatenate([x, np.zeros((-len(x)) % 32, np.float32)])
    path = write(tmp_path / "f.gguf", lambda w: w.add_tensor("x", x))
    got16 = dequant(path, "x", "f16").view(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want16 = x.astype(np.float16).view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(got16[finite], want16[finite])
    assert np.all((got16[~finite] & 0x7C00) == 0x7C00) and np.all((got16[~finite] & 0x3FF) != 0)
    gotbf = dequant(path, "x", "bf16")
    assert np.array_equal(gotbf, bf16_rne(x))
    torch = pytest.importorskip("torch")
    if hasattr(torch, "bfloat16"):  # torch's own f32 -> bf16 cast agrees
        tb = torch.from_numpy(x[finite].copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(gotbf[finite], tb)


# ---------------------------------------------------------------- Q/K permutation

def llama_cpp_permute(weights, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def test_qk_unpermute_recovers_hf(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    n_head, n_kv, head_dim, hidden = 4, 2, 16, 64
    q = torch.randn(n_head * head_dim, hidden).numpy()
    k = torch.randn(n_kv * head_dim, hidden).numpy()
    qb = torch.randn(n_head * head_dim).numpy()
    gq = llama_cpp_permute(q, n_head, n_head)
    gk = llama_cpp_permute(k, n_head, n_kv)
    gqb = llama_cpp_permute(qb, n_head, n_head)
    assert not np.array_equal(gq, q)
    q8 = quants.quantize(gq, T.Q8_0)

    def build(w):
        w.add_tensor("blk.0.attn_q.weight", gq)
        w.add_tensor("blk.0.attn_k.weight", gk)
        w.add_tensor("blk.0.attn_q.bias", gqb)
        w.add_tensor("blk.1.attn_q.weight", q8, raw_dtype=T.Q8_0)

    path = write(tmp_path / "qk.gguf", build)
    assert np.array_equal(dequant(path, "blk.0.attn_q.weight", heads=n_head).reshape(q.shape), q)
    assert np.array_equal(dequant(path, "blk.0.attn_k.weight", heads=n_kv).reshape(k.shape), k)
    assert np.array_equal(dequant(path, "blk.0.attn_q.bias", heads=n_head), qb)
    # quantized: dequantize (gguf-py), then transformers' reverse_permute
    deq = quants.dequantize(q8, T.Q8_0)
    want = deq.reshape(n_head, head_dim // 2, 2, hidden).swapaxes(2, 1).reshape(deq.shape)
    assert np.array_equal(dequant(path, "blk.1.attn_q.weight", heads=n_head).reshape(q.shape), want)


# ---------------------------------------------------------------- HF config / names

def test_hf_config_and_names(tmp_path):
    def build(w):
        w.add_context_length(4096)
        w.add_embedding_length(64)
        w.add_block_count(2)
        w.add_feed_forward_length(172)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(500000.0)
        w.add_token_list(["<s>", "</s>", "a", "b", "c"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_tensor("token_embd.weight", np.zeros((5, 64), np.float32))
        for i in range(2):
            for n, shape in [("attn_norm", (64,)), ("attn_q", (64, 64)), ("attn_k", (32, 64)),
                             ("attn_v", (32, 64)), ("attn_output", (64, 64)), ("ffn_norm", (64,)),
                             ("ffn_gate", (172, 64)), ("ffn_up", (172, 64)), ("ffn_down", (64, 172))]:
                w.add_tensor("blk.%d.%s.weight" % (i, n), np.zeros(shape, np.float32))
        w.add_tensor("output_norm.weight", np.zeros((64,), np.float32))

    doc = info(write(tmp_path / "cfg.gguf", build))
    cfg = doc["hf_config"]
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == 64 and cfg["intermediate_size"] == 172
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["num_hidden_layers"] == 2 and cfg["max_position_embeddings"] == 4096
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 500000.0
    assert cfg["vocab_size"] == 5 and cfg["bos_token_id"] == 0 and cfg["eos_token_id"] == 1
    assert cfg["tie_word_embeddings"] is True  # no output.weight
    names = doc["hf_names"]
    assert names["token_embd.weight"] == "model.embed_tokens.weight"
    assert names["blk.1.attn_output.weight"] == "model.layers.1.self_attn.o_proj.weight"
    assert names["blk.0.ffn_norm.weight"] == "model.layers.0.post_attention_layernorm.weight"
    assert names["output_norm.weight"] == "model.norm.weight"
    assert len(names) == len(doc["tensors"])
    # transformers' own map, where installed, agrees on every name.
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except Exception:
        GGUF_CONFIG_MAPPING = None
    if GGUF_CONFIG_MAPPING:
        for gkey, hkey in GGUF_CONFIG_MAPPING["llama"].items():
            if hkey and "llama." + gkey in doc["metadata"]:
                assert cfg[hkey] == pytest.approx(doc["metadata"]["llama." + gkey])


# ---------------------------------------------------------------- modelprep-tensors

def test_modelprep_tensors_lists_ggml_types(tmp_path):
    exe = os.path.join(SAN, "modelprep-tensors")
    if not os.path.exists(exe):
        pytest.skip("modelprep-tensors not built yet")
    rng = np.random.default_rng(3)
    q4k = random_blocks(T.Q4_K, 2, 256, rng)
    q80 = quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.Q8_0)
    f32 = rng.standard_normal((3, 4)).astype(np.float32)

    def build(w):
        w.add_tensor("q4k", q4k, raw_dtype=T.Q4_K)
        w.add_tensor("q80", q80, raw_dtype=T.Q8_0)
        w.add_tensor("f32", f32)

    path = write(tmp_path / "t.gguf", build)
    p = subprocess.run([exe, "--json", str(path)], capture_output=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    by = {}
    for line in p.stdout.decode().splitlines():  # one JSON object per tensor
        if line.strip():
            t = json.loads(line)
            by[t["name"]] = t
    want = {"q4k": ("Q4_K", q4k, [2, 256]), "q80": ("Q8_0", q80, [2, 64]),
            "f32": ("F32", f32, [3, 4])}
    assert set(by) == set(want)
    for name, (tname, arr, shape) in want.items():
        t = by[name]
        assert t["dtype"] == tname, t
        assert t["shape"] == shape, t
        assert t["bytes"] == arr.nbytes, t
        assert t["sha256"] == hashlib.sha256(arr.tobytes()).hexdigest(), t
