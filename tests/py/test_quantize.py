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
