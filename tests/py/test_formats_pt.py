"""PyTorch checkpoints (torch.save zip and legacy) read by our C loader
(pt_open) versus the real torch: every tensor's materialized bytes must hash
the same as torch's `t.contiguous()`, views and tied weights must be
recognized, and hostile pickles must be refused without running anything.

The C side is `modelprep-tensors --json FILE` when it is built, else the
tests/helpers/pt_dump program (same data)."""
import hashlib
import io
import json
import os
import subprocess
import zipfile

import pytest

torch = pytest.importorskip("torch")

from conftest import SAN  # noqa: E402


def _exe(*cands):
    for cand in cands:
        if os.path.exists(cand):
            return cand
    return None


def _run(cmd):
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1")
    p = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def run_dump(path):
    """(returncode, {name: entry}, stderr). Digests come from
    `modelprep-tensors --json` (JSON lines) when built; the pt_dump helper
    adds the descriptor fields (is_view, storage_id, strides, offset) and
    must agree on every digest."""
    tool = _exe(os.path.join(SAN, "modelprep-tensors"))
    helper = _exe(os.path.join(SAN, "tests", "helpers", "pt_dump"))
    if not tool and not helper:
        pytest.skip("neither modelprep-tensors nor pt_dump is built")
    got, errs, rcs = None, "", []
    if helper:
        rc, out, err = _run([helper, str(path)])
        rcs.append(rc)
        errs += err
        if rc == 0:
            got = {t["name"]: t for t in json.loads(out)["tensors"]}
    if tool:
        rc, out, err = _run([tool, "--json", str(path)])
        rcs.append(rc)
        errs += err
        if rc == 0:
            lines = [json.loads(l) for l in out.splitlines() if l.strip()]
            if got is None:
                got = {t["name"]: t for t in lines}
            else:
                assert [t["name"] for t in lines] == list(got)
                for t in lines:
                    assert t["sha256"] == got[t["name"]]["sha256"], t["name"]
    # both tools must agree on success/failure
    assert len(set(rc == 0 for rc in rcs)) == 1, (rcs, errs)
    if rcs[0] != 0:
        return rcs[0], None, errs
    return 0, got, errs


def torch_sha(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def check_matches(path, sd):
    rc, got, err = run_dump(path)
    assert rc == 0, err
    assert list(got) == list(sd), "names/order differ"
    for name, t in sd.items():
        g = got[name]
        assert g["dtype"] == DTYPE_NAMES[t.dtype], name
        assert list(g["shape"]) == list(t.shape), name
        assert g["sha256"] == torch_sha(t), name
    return got


def base_state_dict():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 4, generator=g)
    return {
        "f32": w,
        "f16": torch.randn(3, 5, generator=g).half(),
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(10, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True, True]),
        "scalar": torch.tensor(3.5),
        "scalar_i64": torch.tensor(42),
        "empty": torch.zeros(0),
        "empty2d": torch.zeros(3, 0, dtype=torch.float16),
        "big4d": torch.randn(2, 3, 4, 5, generator=g),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_dtypes_scalars_empty(tmp_path, zip_format):
    sd = base_state_dict()
    path = tmp_path / "model.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = check_matches(path, sd)
    if "is_view" in got["f32"]:
        assert not got["f32"]["is_view"]
        assert not got["scalar"]["is_view"]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_tied_and_views(tmp_path, zip_format):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 6, generator=g)
    qkv = torch.randn(12, 4, generator=g)
    sd = {
        "embed.weight": w,
        "lm_head.weight": w,               # tied: same tensor, two names
        "transposed": w.t(),               # non-contiguous view of the same storage
        "row_slice": w[2:5],               # offset view
        "col_slice": w[:, 1:4],            # non-contiguous + offset
        "stepped": w[::2, ::3],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0
        "q": qkv[0:4], "k": qkv[4:8], "v": qkv[8:12],  # fused storage sliced
        "single": w[3, 2],                 # 0-dim view at an offset
    }
    path = tmp_path / "views.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = check_matches(path, sd)
    if "storage_id" not in got["embed.weight"]:
        return
    sid = got["embed.weight"]["storage_id"]
    for n in ("lm_head.weight", "transposed", "row_slice", "col_slice", "stepped", "single"):
        assert got[n]["storage_id"] == sid, n
    assert got["q"]["storage_id"] == got["k"]["storage_id"] == got["v"]["storage_id"] != sid
    assert got["expanded"]["storage_id"] not in (sid, got["q"]["storage_id"])
    assert not got["embed.weight"]["is_view"] and not got["lm_head.weight"]["is_view"]
    for n in ("transposed", "row_slice", "col_slice", "stepped", "expanded", "q", "k", "v",
              "single"):
        assert got[n]["is_view"], n
    if "strides" in got["transposed"]:
        assert got["transposed"]["strides"] == [1, 6]
        assert got["row_slice"]["storage_offset"] == 12
        assert got["k"]["storage_offset"] == 16


def test_module_state_dict_and_parameters(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3),
                            torch.nn.Embedding(7, 3))
    sd = m.state_dict()  # OrderedDict with _metadata (BUILD) and an int64 scalar
    path = tmp_path / "module.bin"
    torch.save(sd, path)
    check_matches(path, dict(sd))
    params = dict(m.named_parameters())  # nn.Parameter -> _rebuild_parameter
    path2 = tmp_path / "params.bin"
    torch.save(params, path2)
    check_matches(path2, {k: v.detach() for k, v in params.items()})


def test_many_tensors_long_memo_and_protocol4(tmp_path):
    # > 256 memo entries forces LONG_BINPUT/LONG_BINGET; protocol 4 adds FRAME,
    # SHORT_BINUNICODE, MEMOIZE and STACK_GLOBAL.
    sd = {"layer.%d.weight" % i: torch.full((2, i % 5 + 1), float(i)) for i in range(400)}
    p2 = tmp_path / "many.bin"
    torch.save(sd, p2)
    check_matches(p2, sd)
    p4 = tmp_path / "proto4.bin"
    torch.save(sd, p4, pickle_protocol=4)
    check_matches(p4, sd)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_wrapper_unwrapped(tmp_path, key):
    sd = base_state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({key: sd, "epoch": 3, "note": "hello"}, path)
    check_matches(path, sd)


def test_nested_non_wrapper_dict_refused(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"encoder": {"w": torch.ones(2)}, "b": torch.ones(1)}, path)
    rc, _, err = run_dump(path)
    assert rc != 0
    assert "unsupported_format" in err and "encoder" in err


def test_malicious_reduce_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch %s" % marker,))

    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    assert not marker.exists()
    rc, _, err = run_dump(path)
    assert rc != 0
    assert "unsafe_pickle" in err
    assert "forbidden global %s.system" % os.system.__module__ in err  # posix.system on Linux
    assert not marker.exists()
    # and torch's own safe loader agrees that it is unsafe
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def test_whole_module_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    rc, _, err = run_dump(path)
    assert rc != 0
    assert "unsafe_pickle" in err and "torch.nn.modules.linear.Linear" in err


def test_archive_prefix_from_buffer_and_path(tmp_path):
    sd = {"a": torch.arange(4.0)}
    buf = io.BytesIO()
    torch.save(sd, buf)  # prefix "archive/"
    p = tmp_path / "buffer.bin"
    p.write_bytes(buf.getvalue())
    assert zipfile.ZipFile(p).namelist()[0].startswith("archive/")
    check_matches(p, sd)
    p2 = tmp_path / "weird.name.pth"
    torch.save(sd, p2)
    check_matches(p2, sd)


def test_compressed_rezip_refused(tmp_path):
    src = tmp_path / "src.bin"
    torch.save({"a": torch.zeros(1000)}, src)
    dst = tmp_path / "deflated.bin"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    rc, _, err = run_dump(dst)
    assert rc != 0
    assert "compressed" in err


def test_rezip_stored_unaligned_ok(tmp_path):
    # third-party re-zips keep records stored but drop torch's 64-byte padding
    sd = base_state_dict()
    src = tmp_path / "src.bin"
    torch.save(sd, src)
    dst = tmp_path / "stored.bin"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    check_matches(dst, sd)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_files_fail_cleanly(tmp_path, zip_format):
    src = tmp_path / "full.bin"
    torch.save(base_state_dict(), src, _use_new_zipfile_serialization=zip_format)
    data = src.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 30, len(data) - 1):
        p = tmp_path / ("cut%d.bin" % cut)
        p.write_bytes(data[:cut])
        rc, _, err = run_dump(p)
        assert rc == 1, (cut, err)  # a clean error, not a sanitizer abort
        assert "AddressSanitizer" not in err and "runtime error" not in err


def test_digests_match_weights_only_load(tmp_path):
    # torch.load(weights_only=True) is the reference reader of the bench
    sd = base_state_dict()
    path = tmp_path / "wo.bin"
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    check_matches(path, loaded)
