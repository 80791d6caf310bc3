"""The inspect job through the real server. Checkpoints are written by the
real producers (safetensors.torch.save_file, torch.save, gguf-py) with the
documented configs and tensor names of each quantization method
(weight-formats.md §5); per-TP bytes are checked against a hand computation
of SGLang's split (column/row parallel, KV heads replicated when tp exceeds
them, vocab padded to 64)."""
import json
import os
import struct
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402


def start(make_server, root):
    return make_server(args=["--model-root", str(root)])


def inspect(s, model, **params):
    return s.run_job({"type": "inspect", "model": str(model), "params": params})


def ok(job):
    assert job["state"] == "succeeded", job
    return job["result"]


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
         "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": False}


def llama_sd(cfg=LLAMA, dt=torch.bfloat16):
    h, L, ff, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kvd = cfg["num_key_value_heads"] * hd
    sd = {"model.embed_tokens.weight": torch.zeros(V, h, dtype=dt),
          "lm_head.weight": torch.zeros(V, h, dtype=dt), "model.norm.weight": torch.zeros(h, dtype=dt)}
    for i in range(L):
        p = "model.layers.%d." % i
        sd[p + "input_layernorm.weight"] = torch.zeros(h, dtype=dt)
        sd[p + "post_attention_layernorm.weight"] = torch.zeros(h, dtype=dt)
        sd[p + "self_attn.q_proj.weight"] = torch.zeros(h, h, dtype=dt)
        sd[p + "self_attn.k_proj.weight"] = torch.zeros(kvd, h, dtype=dt)
        sd[p + "self_attn.v_proj.weight"] = torch.zeros(kvd, h, dtype=dt)
        sd[p + "self_attn.o_proj.weight"] = torch.zeros(h, h, dtype=dt)
        sd[p + "mlp.gate_proj.weight"] = torch.zeros(ff, h, dtype=dt)
        sd[p + "mlp.up_proj.weight"] = torch.zeros(ff, h, dtype=dt)
        sd[p + "mlp.down_proj.weight"] = torch.zeros(h, ff, dtype=dt)
    return sd


def hand_rank_bytes(cfg, tp, es=2):
    """Largest rank's bytes of a dense llama, by hand: vocab padded to a
    multiple of 64 then split; q/gate/up split by rows, o/down by columns;
    k/v split by KV heads, or one KV head per rank when tp > kv heads."""
    h, L, ff, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // H
    vpad = (V + 63) // 64 * 64
    emb = vpad // tp * h
    heads_kv = KV // tp if tp <= KV else 1
    layer = 2 * h + (H // tp) * hd * h + 2 * heads_kv * hd * h + h * (h // tp) + 3 * (ff // tp) * h
    return es * (2 * emb + h + L * layer)


def write_model(d, sd, cfg, extra=None):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    for name, doc in (extra or {}).items():
        (d / name).write_text(json.dumps(doc))
    return d


# ---------------------------------------------------------------- plain

def test_unquantized_llama_and_per_tp_by_hand(make_server, model_root):
    sd = llama_sd()
    m = write_model(model_root / "llama", sd, LLAMA)
    s = start(make_server, model_root)
    r = ok(inspect(s, m, tp_sizes=[1, 2, 4, 8, 3]))
    assert r["architecture"] == "LlamaForCausalLM" and r["model_type"] == "llama"
    assert r["formats"] == ["safetensors"]
    assert r["params_total"] == sum(t.numel() for t in sd.values())
    assert r["bytes_total"] == 2 * r["params_total"]
    assert r["tensors_by_dtype"] == {"BF16": {"tensors": len(sd), "params": r["params_total"],
                                              "bytes": r["bytes_total"]}}
    q = r["quantization"]
    assert q["method"] is None and q["bits"] is None and q["kv_cache"] is None
    per = {e["tp"]: e for e in r["per_tp"]}
    for tp in (1, 2, 4):
        assert per[tp]["ok"] and per[tp]["bytes_per_rank"] == hand_rank_bytes(LLAMA, tp), tp
    # tp 8 > 4 heads and 3 does not divide: reported, not a failed job
    for tp in (8, 3):
        assert per[tp]["ok"] is False and per[tp]["bytes_per_rank"] is None
        assert "num_attention_heads" in per[tp]["reason"]
    assert r["warnings"] == []
    # the default tp_sizes
    r = ok(inspect(s, m))
    assert [e["tp"] for e in r["per_tp"]] == [1, 2, 4, 8]


def test_multimodal_text_config(make_server, model_root):
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
           "text_config": dict(LLAMA)}
    m = write_model(model_root / "mm", {"x": torch.zeros(4, dtype=torch.float16)}, cfg)
    s = start(make_server, model_root)
    r = ok(inspect(s, m))
    assert r["model_type"] == "llava" and r["text_model_type"] == "llama"
    assert r["architecture"] == "LlavaForConditionalGeneration"


def test_bin_counts_tied_weights_once(make_server, model_root):
    m = model_root / "tied"
    m.mkdir()
    emb = torch.zeros(10, 4)
    torch.save({"model.embed_tokens.weight": emb, "lm_head.weight": emb, "n": torch.zeros(4)},
               m / "pytorch_model.bin")
    (m / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    s = start(make_server, model_root)
    r = ok(inspect(s, m))
    assert r["formats"] == ["pt"] and r["params_total"] == 44 and r["bytes_total"] == 176
    assert any("tied" in w for w in r["warnings"])


# ---------------------------------------------------------------- quantized

def fp8_model(root, name, with_config):
    """DeepSeek-style block fp8: F8_E4M3 weights + F32 weight_scale_inv."""
    cfg = dict(LLAMA, hidden_size=256, intermediate_size=512, num_attention_heads=2,
               num_key_value_heads=1, num_hidden_layers=1)
    if with_config:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128], "fmt": "e4m3",
                                      "ignored_layers": ["lm_head"]}
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    # numpy has no fp8: write the safetensors header ourselves (bytes are zeros)
    tensors = {"model.embed_tokens.weight": ("BF16", [100, 256]), "lm_head.weight": ("BF16", [100, 256]),
               "model.norm.weight": ("BF16", [256])}
    p = "model.layers.0."
    for n, shape in [("self_attn.q_proj", [256, 256]), ("self_attn.k_proj", [128, 256]),
                     ("self_attn.v_proj", [128, 256]), ("self_attn.o_proj", [256, 256]),
                     ("mlp.gate_proj", [512, 256]), ("mlp.up_proj", [512, 256]), ("mlp.down_proj", [256, 512])]:
        tensors[p + n + ".weight"] = ("F8_E4M3", shape)
        tensors[p + n + ".weight_scale_inv"] = ("F32", [(shape[0] + 127) // 128, (shape[1] + 127) // 128])
    for n in ("input_layernorm", "post_attention_layernorm"):
        tensors[p + n + ".weight"] = ("BF16", [256])
    write_st_header(d / "model.safetensors", tensors)
    return d


ES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1, "I8": 1, "I32": 4, "I64": 8}


def write_st_header(path, tensors, sparse=False):
    """A real safetensors file (data zeros); sparse=True only sets the size."""
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for name, (dt, shape) in tensors.items():
        n = ES[dt] * int(np.prod(shape)) if shape else ES[dt]
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        if sparse:
            f.truncate(8 + len(h) + off)
        else:
            f.write(b"\0" * off)
    return off


def test_fp8_block_from_config_and_from_tensors(make_server, model_root):
    s = start(make_server, model_root)
    r = ok(inspect(s, fp8_model(model_root, "fp8", True), tp_sizes=[1, 2]))
    q = r["quantization"]
    assert q["method"] == "fp8" and q["bits"] == 8 and q["source"] == "config.json"
    assert q["weight_block_size"] == [128, 128] and q["activation_scheme"] == "dynamic"
    assert q["ignored_layers"] == ["lm_head"]
    assert r["tensors_by_dtype"]["F8_E4M3"]["tensors"] == 7
    assert all(e["ok"] for e in r["per_tp"]), r["per_tp"]
    # tp=2 by hand: bf16 embeddings (vocab 100 -> 128 padded) and norms, fp8
    # weights split, their 128x128 block scales split with them
    per2 = {e["tp"]: e for e in r["per_tp"]}[2]["bytes_per_rank"]
    emb = 2 * (128 // 2 * 256 * 2)
    norms = 3 * 256 * 2
    w = (128 * 256 + 128 * 256 + 128 * 256 + 256 * 128 + 256 * 256 + 256 * 256 + 256 * 256)
    sc = 4 * (1 * 2 + 1 * 2 + 1 * 2 + 2 * 1 + 2 * 2 + 2 * 2 + 2 * 2)
    assert per2 == emb + norms + w + sc
    # nothing declared: recognized from names and dtypes
    r = ok(inspect(s, fp8_model(model_root, "fp8t", False)))
    q = r["quantization"]
    assert q["method"] == "fp8" and q["source"] == "tensors" and q["weight_block_size"] == [128, 128]


def gptq_tensors(prefix, K, N, bits=4, group=128, gidx=True, dt="F16"):
    pf = 32 // bits
    t = {prefix + ".qweight": ("I32", [K // pf, N]), prefix + ".qzeros": ("I32", [K // group, N // pf]),
         prefix + ".scales": (dt, [K // group, N])}
    if gidx:
        t[prefix + ".g_idx"] = ("I32", [K])
    return t


def awq_tensors(prefix, K, N, group=128):
    return {prefix + ".qweight": ("I32", [K, N // 8]), prefix + ".qzeros": ("I32", [K // group, N // 8]),
            prefix + ".scales": ("F16", [K // group, N])}


def quant_dir(root, name, cfg, tensors, extra=None):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    for n, doc in (extra or {}).items():
        (d / n).write_text(json.dumps(doc))
    write_st_header(d / "model.safetensors", tensors)
    return d


def test_awq_gptq_and_marlin(make_server, model_root):
    s = start(make_server, model_root)
    t = awq_tensors("model.layers.0.mlp.up_proj", 256, 512)
    t.update({"model.embed_tokens.weight": ("F16", [100, 256])})
    cfg = dict(LLAMA, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128,
                                           "zero_point": True, "version": "gemm",
                                           "modules_to_not_convert": ["visual"]})
    q = ok(inspect(s, quant_dir(model_root, "awq", cfg, t)))["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["source"]) == ("awq", 4, 128, "config.json")
    assert q["zero_point"] is True and q["version"] == "gemm" and q["ignored_layers"] == ["visual"]
    assert q["runtime_method"] == "awq_marlin"
    # GPTQ declared only in quantize_config.json (AutoGPTQ layout)
    t = gptq_tensors("model.layers.0.mlp.up_proj", 256, 512)
    qc = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "true_sequential": True}
    q = ok(inspect(s, quant_dir(model_root, "gptq", dict(LLAMA), t, {"quantize_config.json": qc})))["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["source"]) == ("gptq", 4, 128, "quantize_config.json")
    assert q["desc_act"] is False and q["sym"] is True and q["runtime_method"] == "gptq_marlin"
    # 3-bit asymmetric: no marlin
    qc3 = dict(qc, bits=3, sym=False)
    q = ok(inspect(s, quant_dir(model_root, "gptq3", dict(LLAMA), t, {"quantize_config.json": qc3})))["quantization"]
    assert q["bits"] == 3 and q["marlin_compatible"] is False and q["runtime_method"] == "gptq"
    # the marlin checkpoint variant (GPTQModel checkpoint_format)
    cfg = dict(LLAMA, quantization_config=dict(qc, quant_method="gptq", checkpoint_format="marlin"))
    q = ok(inspect(s, quant_dir(model_root, "gptqm", cfg, t)))["quantization"]
    assert q["method"] == "gptq_marlin" and q["checkpoint_format"] == "marlin"
    # tensors only: gptq (g_idx, packed along K) vs awq (packed along N)
    q = ok(inspect(s, quant_dir(model_root, "gptqt", dict(LLAMA), gptq_tensors("a.b", 256, 512, bits=8, group=64))))["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["source"]) == ("gptq", 8, 64, "tensors")
    q = ok(inspect(s, quant_dir(model_root, "awqt", dict(LLAMA), awq_tensors("a.b", 256, 512))))["quantization"]
    assert (q["method"], q["bits"], q["group_size"]) == ("awq", 4, 128)


def bnb4_tensors(prefix, n, k, qtype="nf4", double=True):
    numel = n * k
    blocks = (numel + 63) // 64
    t = {prefix + ".weight": ("U8", [(numel + 1) // 2, 1]),
         prefix + ".weight.quant_map": ("F32", [16]),
         prefix + ".weight.quant_state.bitsandbytes__" + qtype: ("U8", [120])}
    if double:
        t[prefix + ".weight.absmax"] = ("U8", [blocks])
        t[prefix + ".weight.nested_absmax"] = ("F32", [(blocks + 255) // 256])
        t[prefix + ".weight.nested_quant_map"] = ("F32", [256])
    else:
        t[prefix + ".weight.absmax"] = ("F32", [blocks])
    return t


def test_bitsandbytes(make_server, model_root):
    s = start(make_server, model_root)
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
           "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
           "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": ["lm_head"]}
    t = bnb4_tensors("model.layers.0.mlp.up_proj", 128, 64)
    t["model.embed_tokens.weight"] = ("BF16", [100, 64])
    q = ok(inspect(s, quant_dir(model_root, "bnb", dict(LLAMA, quantization_config=bnb), t)))["quantization"]
    assert (q["method"], q["bits"], q["quant_type"]) == ("bitsandbytes", 4, "nf4")
    assert q["pre_quantized"] is True and q["double_quant"] is True
    assert q["ignored_layers"] == ["lm_head"] and q["compute_dtype"] == "bfloat16"
    # declared but weights are plain bf16: quantized on load, not pre-quantized
    q = ok(inspect(s, quant_dir(model_root, "bnbq", dict(LLAMA, quantization_config=bnb),
                                {"model.layers.0.mlp.up_proj.weight": ("BF16", [128, 64])})))["quantization"]
    assert q["method"] == "bitsandbytes" and q["pre_quantized"] is False
    # nothing declared: fp4 pre-quantized from tensor names
    q = ok(inspect(s, quant_dir(model_root, "bnbt", dict(LLAMA), bnb4_tensors("x", 8, 64, "fp4", False))))["quantization"]
    assert (q["method"], q["quant_type"], q["source"], q["pre_quantized"]) == ("bitsandbytes", "fp4", "tensors", True)
    # 8-bit LLM.int8
    t8 = {"x.weight": ("I8", [8, 64]), "x.SCB": ("F32", [8]), "x.weight_format": ("U8", [])}
    q = ok(inspect(s, quant_dir(model_root, "bnb8", dict(LLAMA), t8)))["quantization"]
    assert (q["method"], q["bits"]) == ("bitsandbytes", 8)


def test_compressed_tensors(make_server, model_root):
    s = start(make_server, model_root)
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "quantization_status": "compressed", "ignore": ["lm_head", "re:.*vision.*"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                    "group_size": 128, "strategy": "group",
                                                    "dynamic": False}}},
          "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                              "symmetric": True}}
    t = {"model.layers.0.mlp.up_proj.weight_packed": ("I32", [512, 32]),
         "model.layers.0.mlp.up_proj.weight_scale": ("BF16", [512, 2]),
         "model.layers.0.mlp.up_proj.weight_shape": ("I64", [2]),
         "model.layers.0.self_attn.k_scale": ("F32", []), "model.layers.0.self_attn.v_scale": ("F32", [])}
    q = ok(inspect(s, quant_dir(model_root, "ct", dict(LLAMA, quantization_config=ct), t)))["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["format"]) == ("compressed-tensors", 4, 128, "pack-quantized")
    assert q["strategy"] == "group" and q["ignored_layers"] == ["lm_head", "re:.*vision.*"]
    assert q["kv_cache"]["dtype"] == "fp8" and q["kv_cache"]["scales_in_checkpoint"] == 2
    # fp8 dynamic (float-quantized, input activations dynamic)
    ct8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
           "config_groups": {"g": {"targets": ["Linear"],
                                   "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                   "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}}
    q = ok(inspect(s, quant_dir(model_root, "ct8", dict(LLAMA, quantization_config=ct8),
                                {"a.weight": ("F8_E4M3", [4, 4]), "a.weight_scale": ("F32", [4, 1])})))["quantization"]
    assert (q["bits"], q["activation_scheme"], q["weight_type"]) == (8, "dynamic", "float")


def test_modelopt_fp8_and_nvfp4_from_hf_quant_config(make_server, model_root):
    s = start(make_server, model_root)
    hq = {"producer": {"name": "modelopt", "version": "0.19.0"},
          "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                           "exclude_modules": ["lm_head"]}}
    t = {"model.layers.0.mlp.up_proj.weight": ("F8_E4M3", [128, 64]),
         "model.layers.0.mlp.up_proj.weight_scale": ("F32", []),
         "model.layers.0.mlp.up_proj.input_scale": ("F32", []),
         "model.layers.0.self_attn.k_proj.k_scale": ("F32", []),
         "model.layers.0.self_attn.v_proj.v_scale": ("F32", [])}
    q = ok(inspect(s, quant_dir(model_root, "mo8", dict(LLAMA), t, {"hf_quant_config.json": hq})))["quantization"]
    assert (q["method"], q["bits"], q["source"], q["quant_algo"]) == ("modelopt", 8, "hf_quant_config.json", "FP8")
    assert q["ignored_layers"] == ["lm_head"] and q["kv_cache"]["dtype"] == "fp8"
    assert q["kv_cache"]["scales_in_checkpoint"] == 2 and q["activation_scheme"] == "static"
    hq4 = {"producer": {"name": "modelopt", "version": "0.23.0"},
           "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                            "exclude_modules": ["lm_head", "model.layers.0.mlp*"]}}
    t4 = {"model.layers.1.mlp.up_proj.weight": ("U8", [128, 32]),
          "model.layers.1.mlp.up_proj.weight_scale": ("F8_E4M3", [128, 4]),
          "model.layers.1.mlp.up_proj.weight_scale_2": ("F32", []),
          "model.layers.1.mlp.up_proj.input_scale": ("F32", [])}
    q = ok(inspect(s, quant_dir(model_root, "mo4", dict(LLAMA), t4, {"hf_quant_config.json": hq4})))["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["quant_algo"]) == ("modelopt_fp4", 4, 16, "NVFP4")
    assert q["ignored_layers"] == ["lm_head", "model.layers.0.mlp*"] and q["kv_cache"] is None
    # the same tensors without any config: recognized as NVFP4
    q = ok(inspect(s, quant_dir(model_root, "mo4t", dict(LLAMA), t4)))["quantization"]
    assert (q["method"], q["source"], q["group_size"]) == ("modelopt_fp4", "tensors", 16)


def test_gguf_histogram(make_server, model_root):
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    m = model_root / "gg"
    m.mkdir()
    w = gguf.GGUFWriter(str(m / "tiny-Q8_0.gguf"), "llama")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(7)
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", quants.quantize(f(100, 64), T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", f(64))
    for n, shape in [("attn_q", (64, 64)), ("attn_k", (32, 64)), ("attn_v", (32, 64)),
                     ("attn_output", (64, 64)), ("ffn_gate", (128, 64)), ("ffn_up", (128, 64))]:
        w.add_tensor("blk.0.%s.weight" % n, quants.quantize(f(*shape), T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", quants.quantize(f(64, 128), T.Q4_0), raw_dtype=T.Q4_0)
    w.add_tensor("blk.0.attn_norm.weight", f(64))
    w.add_tensor("blk.0.ffn_norm.weight", f(64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = start(make_server, model_root)
    r = ok(inspect(s, m))
    q = r["quantization"]
    assert (q["method"], q["source"], q["bits"], q["main_type"]) == ("gguf", "gguf", 8, "Q8_0")
    assert q["types"] == {"Q8_0": 7, "Q4_0": 1, "F32": 3} and q["file_type"] == 7
    assert r["formats"] == ["gguf"] and r["architecture"] == "LlamaForCausalLM"
    assert any("config derived" in x for x in r["warnings"])
    assert r["tensors_by_dtype"]["Q8_0"]["tensors"] == 7
    numel = 100 * 64 + 3 * 64 + 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3
    assert r["params_total"] == numel


# ---------------------------------------------------------------- KV scales

def kv_doc(ranks=2, layers=2, dtype="float8_e4m3fn", model_type="llama"):
    return {"model_type": model_type, "kv_cache": {"dtype": dtype, "scaling_factor": {
        str(r): {str(l): 1.0 + 0.1 * l for l in range(layers)} for r in range(ranks)}}}


@pytest.mark.parametrize("doc,valid,why", [
    (kv_doc(), True, None),
    (dict(kv_doc(), model_type=None), True, None),
    (kv_doc(dtype="float8_e5m2"), False, "float8_e4m3fn"),
    (kv_doc(model_type="qwen2"), False, "does not match"),
    (kv_doc(layers=3), False, "3 layer scales"),
    ({"kv_cache": kv_doc()["kv_cache"]}, False, "model_type is required"),
    ({"model_type": "llama", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {
        "0": {"0": 1, "1": 1}, "2": {"0": 1, "1": 1}}}}, False, "TP ranks"),
    ({"model_type": "llama", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {
        "0": {"0": 1, "5": 1}}}}, False, "layers"),
])
def test_kv_cache_scales_file(make_server, model_root, doc, valid, why):
    m = write_model(model_root / "kv", llama_sd(), LLAMA, {"kv_scales.json": doc})
    s = start(make_server, model_root)
    r = ok(inspect(s, m, kv_cache_scales_file="kv_scales.json", tp_sizes=[1]))
    kv = r["quantization"]["kv_cache"]
    assert kv["valid"] is valid, kv
    if valid:
        assert kv["reason"] is None and kv["tp_size"] == 2
    else:
        assert why in kv["reason"], kv


def test_kv_cache_scales_file_is_confined(make_server, model_root, tmp_path):
    m = write_model(model_root / "kvc", llama_sd(), LLAMA)
    outside = tmp_path / "kv.json"
    outside.write_text(json.dumps(kv_doc()))
    s = start(make_server, model_root)
    for bad in [str(outside), "../../kv.json", "missing.json"]:
        st, doc = s.post("/v1/jobs", {"type": "inspect", "model": str(m),
                                      "params": {"kv_cache_scales_file": bad}})
        assert st == 400 and "params.kv_cache_scales_file" in json.dumps(doc), (bad, doc)


# ---------------------------------------------------------------- errors & speed

def test_error_paths(make_server, model_root):
    s = start(make_server, model_root)
    nocfg = model_root / "nocfg"
    nocfg.mkdir()
    save_file({"a": torch.zeros(2)}, str(nocfg / "model.safetensors"))
    job = inspect(s, nocfg)
    assert job["state"] == "failed" and job["error"]["code"] == "not_found"
    assert "config.json" in job["error"]["message"]
    badcfg = model_root / "badcfg"
    badcfg.mkdir()
    (badcfg / "config.json").write_text("{oops")
    save_file({"a": torch.zeros(2)}, str(badcfg / "model.safetensors"))
    job = inspect(s, badcfg)
    assert job["state"] == "failed" and job["error"]["code"] == "bad_config"
    idx = model_root / "badidx"
    idx.mkdir()
    (idx / "config.json").write_text(json.dumps(LLAMA))
    (idx / "model.safetensors.index.json").write_text("not json")
    job = inspect(s, idx)
    assert job["state"] == "failed" and job["error"]["code"] == "bad_header", job["error"]
    miss = model_root / "missing"
    miss.mkdir()
    (miss / "config.json").write_text(json.dumps(LLAMA))
    save_file({"a": torch.zeros(2)}, str(miss / "model-00001-of-00002.safetensors"))
    (miss / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    job = inspect(s, miss)
    assert job["state"] == "failed" and job["error"]["code"] == "not_found"
    assert "model-00002-of-00002.safetensors" in job["error"]["message"]
    none = model_root / "noweights"
    none.mkdir()
    (none / "config.json").write_text(json.dumps(LLAMA))
    job = inspect(s, none)
    assert job["state"] == "failed" and job["error"]["code"] == "not_found"


def test_headers_only_on_a_large_sparse_checkpoint(make_server, model_root):
    """3.6 GiB of sparse shards: inspect must not touch the data (the bench
    does the same with >= 10 GB)."""
    cfg = dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=8, num_hidden_layers=4, vocab_size=32000)
    m = model_root / "big"
    m.mkdir()
    (m / "config.json").write_text(json.dumps(cfg))
    wm, total = {}, 0
    for shard in range(2):
        t = {}
        for i in range(shard * 2, shard * 2 + 2):
            p = "model.layers.%d." % i
            for n, shape in [("self_attn.q_proj", [4096, 4096]), ("self_attn.k_proj", [1024, 4096]),
                             ("self_attn.v_proj", [1024, 4096]), ("self_attn.o_proj", [4096, 4096]),
                             ("mlp.gate_proj", [11008, 4096]), ("mlp.up_proj", [11008, 4096]),
                             ("mlp.down_proj", [4096, 11008])]:
                t[p + n + ".weight"] = ("F32", shape)
            for n in ("input_layernorm", "post_attention_layernorm"):
                t[p + n + ".weight"] = ("F32", [4096])
        if shard == 0:
            t["model.embed_tokens.weight"] = ("F32", [32000, 4096])
            t["lm_head.weight"] = ("F32", [32000, 4096])
            t["model.norm.weight"] = ("F32", [4096])
        fn = "model-%05d-of-00002.safetensors" % (shard + 1)
        total += write_st_header(m / fn, t, sparse=True)
        wm.update({k: fn for k in t})
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    s = start(make_server, model_root)
    t0 = time.time()
    r = ok(inspect(s, m))
    assert time.time() - t0 < 10
    assert r["seconds"] < 1.0
    assert r["bytes_total"] == total and r["tensors"] == len(wm)
    per = {e["tp"]: e for e in r["per_tp"]}
    assert per[8]["ok"] and per[8]["bytes_per_rank"] == hand_rank_bytes(cfg, 8, es=4)


def test_inspection_is_stored_for_the_model(make_server, tmp_path):
    """A hub snapshot's inspection shows up in GET /v1/models/{org}/{name}."""
    data = tmp_path / "hubdata"
    repo = data / "hub" / "models--acme--tiny"
    commit = "b" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "config.json").write_text(json.dumps(LLAMA))
    save_file(llama_sd(), str(snap / "model.safetensors"), metadata={"format": "pt"})
    s = make_server(data_dir=data)
    job = s.run_job({"type": "inspect", "model": "acme/tiny", "params": {"tp_sizes": [2]}})
    r = ok(job)
    st, doc = s.get("/v1/models/acme/tiny")
    assert st == 200, doc
    assert doc["inspection"] is not None
    insp = doc["inspection"]
    insp = insp.get("result", insp) if isinstance(insp, dict) else insp
    assert insp["params_total"] == r["params_total"]
    assert insp["per_tp"] == r["per_tp"]
