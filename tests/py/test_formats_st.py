"""Cross-checks of our safetensors / npy / npcache readers and writers
against the real producers (safetensors 0.8 Rust core, numpy, torch,
huggingface_hub). Tools: modelprep-tensors (digests of materialized
tensors) and tests/helpers/st_roundtrip (exposes our writers)."""
import hashlib
import io
import json
import os
import struct
import subprocess

import numpy as np
import pytest
from safetensors import TensorSpec, deserialize, safe_open, serialize
from safetensors.numpy import save_file

from conftest import tool


def digests(*paths):
    """{name: record} from `modelprep-tensors --json`."""
    r = subprocess.run([tool("modelprep-tensors"), "--json", *map(str, paths)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        rec = json.loads(line)
        assert rec["name"] not in out
        out[rec["name"]] = rec
    return out


def roundtrip(*args, ok=True):
    r = subprocess.run([tool("st_roundtrip"), *map(str, args)], capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()


def raw_serialize(specs, metadata=None):
    """The reference writer fed raw bytes: specs = {name: (dtype, shape, bytes)}
    with safetensors' python dtype names (bfloat16, float8_e4m3fn, ...)."""
    keep = {}
    ts = {}
    for name, (dt, shape, data) in specs.items():
        buf = np.frombuffer(data, np.uint8).copy() if data else np.zeros(1, np.uint8)
        keep[name] = buf
        ts[name] = TensorSpec(dtype=dt, shape=list(shape), data_ptr=buf.ctypes.data,
                              data_len=len(data))
    return bytes(serialize(ts, metadata=metadata))


RNG = np.random.default_rng(1234)


def numpy_tensors():
    return {
        "model.f32": RNG.standard_normal((4, 6)).astype(np.float32),
        "model.f16": RNG.standard_normal((3, 5)).astype(np.float16),
        "model.f64": RNG.standard_normal((7,)),
        "i8": RNG.integers(-128, 127, (9,), dtype=np.int8),
        "u8": RNG.integers(0, 255, (2, 2, 2), dtype=np.uint8),
        "i16": RNG.integers(-3000, 3000, (5,), dtype=np.int16),
        "u16": RNG.integers(0, 65535, (5,), dtype=np.uint16),
        "i32": RNG.integers(-(2**31), 2**31 - 1, (3,), dtype=np.int32),
        "u32": RNG.integers(0, 2**32 - 1, (3,), dtype=np.uint32),
        "i64": RNG.integers(-(2**62), 2**62, (2,), dtype=np.int64),
        "u64": RNG.integers(0, 2**63, (2,), dtype=np.uint64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "weird \"name\"\n\u00e9": np.arange(3, dtype=np.int32),
    }


ST_NAMES = {np.float32: "F32", np.float16: "F16", np.float64: "F64", np.int8: "I8",
            np.uint8: "U8", np.int16: "I16", np.uint16: "U16", np.int32: "I32",
            np.uint32: "U32", np.int64: "I64", np.uint64: "U64", np.bool_: "BOOL"}


def test_numpy_producer_digests(tmp_path):
    ts = numpy_tensors()
    p = tmp_path / "np.safetensors"
    save_file(ts, str(p), metadata={"format": "pt"})
    got = digests(p)
    assert set(got) == set(ts)
    for name, a in ts.items():
        rec = got[name]
        assert rec["dtype"] == ST_NAMES[a.dtype.type], name
        assert rec["shape"] == list(a.shape)
        assert rec["bytes"] == a.nbytes
        assert rec["sha256"] == sha(np.ascontiguousarray(a).tobytes()), name
        assert rec["file"] == str(p)


def test_torch_producer_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save
    ts = {"w": torch.randn(5, 3).to(torch.bfloat16), "b": torch.randn(3).half(),
          "i": torch.arange(4, dtype=torch.int64)}
    p = tmp_path / "t.safetensors"
    torch_save(ts, str(p))
    got = digests(p)
    assert got["w"]["dtype"] == "BF16"
    for name, t in ts.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 \
            else t.numpy().tobytes()
        assert got[name]["sha256"] == sha(raw), name


SPECIAL = {  # safetensors python dtype -> (our name, bits)
    "bfloat16": ("BF16", 16), "float8_e4m3fn": ("F8_E4M3", 8), "float8_e5m2": ("F8_E5M2", 8),
    "float8_e8m0fnu": ("F8_E8M0", 8), "float8_e4m3fnuz": ("F8_E4M3FNUZ", 8),
    "float8_e5m2fnuz": ("F8_E5M2FNUZ", 8), "complex64": ("C64", 64),
}


def special_specs():
    specs = {}
    for dt, (_, bits) in SPECIAL.items():
        n = 6
        specs["t." + dt] = (dt, [2, 3], RNG.integers(0, 256, n * bits // 8, dtype=np.uint8).tobytes())
    specs["t.f8_scalar"] = ("float8_e4m3fn", [], b"\x38")
    specs["t.f8_empty"] = ("float8_e5m2", [0], b"")
    # FP4: two per byte; the binding doubles the last dim in the header
    specs["t.fp4"] = ("float4_e2m1fn_x2", [2, 2], b"\x12\x34\x56\x78")
    return specs


def test_reference_writer_special_dtypes(tmp_path):
    specs = special_specs()
    p = tmp_path / "s.safetensors"
    p.write_bytes(raw_serialize(specs, {"format": "pt"}))
    got = digests(p)
    for name, (dt, shape, data) in specs.items():
        rec = got[name]
        if dt in SPECIAL:
            assert rec["dtype"] == SPECIAL[dt][0]
            assert rec["shape"] == shape
        assert rec["sha256"] == sha(data), name
        assert rec["bytes"] == len(data)
    assert got["t.fp4"]["dtype"] == "F4" and got["t.fp4"]["shape"] == [2, 4]


def test_our_writer_is_byte_identical(tmp_path):
    """copy: reference file -> our reader -> our writer == the same bytes."""
    for i, (make, meta) in enumerate([
            (lambda p: save_file(numpy_tensors(), p, metadata={"format": "pt"}), None),
            (lambda p: save_file(numpy_tensors(), p), None),
            (lambda p: open(p, "wb").write(raw_serialize(special_specs(), {"format": "pt"})), None),
            (lambda p: save_file({}, p), None)]):
        src = tmp_path / ("src%d.safetensors" % i)
        dst = tmp_path / ("dst%d.safetensors" % i)
        make(str(src))
        roundtrip("copy", src, dst)
        assert dst.read_bytes() == src.read_bytes()
        assert not os.path.exists(str(dst) + ".tmp")


def test_our_writer_from_npy_matches_save_file(tmp_path):
    """Tensors from a different source (np.save files): our writer's output
    equals safetensors.numpy.save_file for the same dict, and safe_open reads
    identical arrays back."""
    ts = numpy_tensors()
    ts.pop("weird \"name\"\n\u00e9")  # not a valid argv NAME=FILE spec
    args = []
    for i, (name, a) in enumerate(ts.items()):
        f = tmp_path / ("a%d.npy" % i)
        np.save(str(f), a)
        args.append("%s=%s" % (name, f))
    ours = tmp_path / "ours.safetensors"
    ref = tmp_path / "ref.safetensors"
    roundtrip("from-npy", ours, "--meta", "format=pt", *args)
    save_file(ts, str(ref), metadata={"format": "pt"})
    assert ours.read_bytes() == ref.read_bytes()
    with safe_open(str(ours), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(ts)
        for name, a in ts.items():
            b = f.get_tensor(name)
            assert b.dtype == a.dtype and b.shape == a.shape
            assert np.array_equal(b, a), name


def test_our_writer_bf16_f8_via_bits(tmp_path):
    bits16 = RNG.integers(0, 65535, (4, 2), dtype=np.uint16)
    bits8 = RNG.integers(0, 255, (3,), dtype=np.uint8)
    np.save(str(tmp_path / "h.npy"), bits16)
    np.save(str(tmp_path / "e.npy"), bits8)
    ours = tmp_path / "ours.safetensors"
    roundtrip("from-npy", ours, "w:BF16=%s" % (tmp_path / "h.npy"),
              "s:F8_E4M3=%s" % (tmp_path / "e.npy"))
    ref = raw_serialize({"w": ("bfloat16", [4, 2], bits16.tobytes()),
                         "s": ("float8_e4m3fn", [3], bits8.tobytes())})
    assert ours.read_bytes() == ref
    back = dict(deserialize(ours.read_bytes()))
    # deserialize (the reference reader) names dtypes as the header does
    assert back["w"]["dtype"] == "BF16" and bytes(back["w"]["data"]) == bits16.tobytes()
    assert back["s"]["dtype"] == "F8_E4M3" and bytes(back["s"]["data"]) == bits8.tobytes()
    assert back["w"]["shape"] == [4, 2]


NPY_ARRAYS = {
    "f32_2d": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64_fortran": np.asfortranarray(RNG.standard_normal((3, 5))),
    "i16_fortran3d": np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)),
    "u64": np.arange(5, dtype=np.uint64) * (2**60),
    "bool": np.array([[True, False], [False, True]]),
    "scalar_f16": np.array(1.5, dtype=np.float16),
    "empty": np.zeros((2, 0), dtype=np.int8),
    "c64": (np.arange(3) + 1j).astype(np.complex64),
}


@pytest.mark.parametrize("name", sorted(NPY_ARRAYS))
def test_numpy_npy_read(tmp_path, name):
    a = NPY_ARRAYS[name]
    p = tmp_path / (name + ".npy")
    np.save(str(p), a)
    rec = digests(p)[name]
    assert rec["shape"] == list(a.shape)
    assert rec["sha256"] == sha(np.ascontiguousarray(a).tobytes())


def test_numpy_npy_v2_and_v3(tmp_path):
    a = np.arange(10, dtype=np.int32)
    for ver in [(2, 0), (3, 0)]:
        p = tmp_path / ("v%d.npy" % ver[0])
        with open(p, "wb") as f:
            np.lib.format.write_array(f, a, version=ver)
        assert digests(p)["v%d" % ver[0]]["sha256"] == sha(a.tobytes())


def test_our_npy_writer_matches_numpy(tmp_path):
    ts = {k: v for k, v in numpy_tensors().items() if "\"" not in k}
    src = tmp_path / "src.safetensors"
    save_file(ts, str(src))
    out = tmp_path / "npy"
    out.mkdir()
    roundtrip("npy", src, out)
    for name, a in ts.items():
        f = out / (name + ".npy")
        b = np.load(str(f))
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b), name
        buf = io.BytesIO()
        np.save(buf, a)
        assert f.read_bytes() == buf.getvalue(), name


def test_npcache_sglang_compatible(tmp_path):
    """Our npcache dir is readable the way np_cache_weights_iterator reads it,
    and a dir written the way it writes one is readable by us."""
    ts = {k: v for k, v in numpy_tensors().items() if "\"" not in k}
    src = tmp_path / "model.safetensors"
    save_file(ts, str(src))
    np_folder = tmp_path / "np"
    roundtrip("npcache", src, np_folder)
    with open(np_folder / "weight_names.json") as f:
        names = json.load(f)
    assert names == list(digests(src))  # our order = file order of the source
    for name in names:
        a = np.load(os.path.join(str(np_folder), name))  # sglang: no extension
        assert np.array_equal(a, ts[name]) and a.dtype == ts[name].dtype
    assert not (np_folder / "weight_dtypes.json").exists()

    # written SGLang's way (np.save into an open file named by the param)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    order = sorted(ts)
    for name in order:
        with open(theirs / name, "wb") as f:
            np.save(f, ts[name])
    with open(theirs / "weight_names.json", "w") as f:
        json.dump(order, f)
    got = digests(theirs)
    assert list(got) == order
    for name in order:
        assert got[name]["sha256"] == sha(np.ascontiguousarray(ts[name]).tobytes())
    # our names file is the same text json.dump writes
    roundtrip("npcache", theirs, tmp_path / "again")
    assert (tmp_path / "again" / "weight_names.json").read_text() == json.dumps(order)


def test_npcache_bf16_sidecar(tmp_path):
    bits = RNG.integers(0, 65535, (3, 2), dtype=np.uint16)
    src = tmp_path / "bf.safetensors"
    src.write_bytes(raw_serialize({"w": ("bfloat16", [3, 2], bits.tobytes())}))
    roundtrip("npcache", src, tmp_path / "np")
    assert np.array_equal(np.load(str(tmp_path / "np" / "w")), bits)  # bit patterns
    assert json.loads((tmp_path / "np" / "weight_dtypes.json").read_text()) == {"w": "BF16"}
    rec = digests(tmp_path / "np")["w"]
    assert rec["dtype"] == "BF16" and rec["sha256"] == sha(bits.tobytes())


def test_sharded_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from huggingface_hub import save_torch_state_dict
    sd = {"layer%d.weight" % i: torch.randn(64, 32) for i in range(6)}
    sd["layer0.bias"] = torch.randn(64).to(torch.bfloat16)
    save_torch_state_dict(sd, str(tmp_path), max_shard_size=20000)
    idx_path = tmp_path / "model.safetensors.index.json"
    assert idx_path.exists()
    idx = json.loads(idx_path.read_text())
    assert len(set(idx["weight_map"].values())) > 1
    for target in (tmp_path, idx_path):
        got = digests(target)
        assert set(got) == set(sd)
        for name, t in sd.items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 \
                else t.numpy().tobytes()
            assert got[name]["sha256"] == sha(raw), name
            assert os.path.basename(got[name]["file"]) in (os.path.basename(str(target)),
                                                          os.path.basename(str(tmp_path)))
    # our index writer: same content, text as transformers writes it
    roundtrip("index", idx_path, tmp_path / "ours.json")
    ours = (tmp_path / "ours.json").read_text()
    assert json.loads(ours) == idx
    assert ours == json.dumps(idx, indent=2, sort_keys=True) + "\n"


def test_errors_are_one_clean_line(tmp_path):
    p = tmp_path / "bad.safetensors"
    ok = raw_serialize({"a": ("float32", [2], b"\0" * 8)})
    cases = {
        "truncated": ok[:-1],
        "trailing": ok + b"\0",
        "huge": struct.pack("<Q", 10**8 + 1) + b"{}",
        "dup": (lambda h: struct.pack("<Q", len(h)) + h + b"\0\0")(
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'),
        "meta": (lambda h: struct.pack("<Q", len(h)) + h)(b'{"__metadata__":{"a":1}}'),
        "garbage": b"just some bytes that are not weights",
    }
    for what, data in cases.items():
        p.write_bytes(data)
        r = subprocess.run([tool("modelprep-tensors"), str(p)], capture_output=True, text=True)
        assert r.returncode != 0, what
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "bad.safetensors" in lines[0], (what, r.stderr)
        assert r.stdout == "", what
    r = subprocess.run([tool("modelprep-tensors"), str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "not_found" in r.stderr
