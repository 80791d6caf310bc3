"""Every file a job opens is confined, not only the model folder: weight
files (or configs) that are symlinks leaving the model roots are refused by
every job type with code unsafe_path naming the file, at submit time and
again when the job starts. Hub snapshots, whose files link into ../../blobs
of the same repo cache folder, keep working; a link into another repo's
blobs does not."""
import hashlib
import json
import os
import time

import pytest

np = pytest.importorskip("numpy")
st = pytest.importorskip("safetensors.numpy")

JOBS = [
    ("inspect", {}),
    ("shard", {"tp_size": 1}),
    ("warm_load", {}),
    ("verify", {}),
    ("convert", {}),
]


def write_model(d, name="model.safetensors"):
    d.mkdir(parents=True, exist_ok=True)
    st.save_file({"model.embed_tokens.weight": np.ones((8, 4), dtype=np.float32)}, str(d / name))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4,
        "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1,
        "intermediate_size": 8, "vocab_size": 8}))


def escaping_model(model_root, tmp_path, name="esc"):
    outside = tmp_path / "outside"
    write_model(outside)
    m = model_root / name
    m.mkdir()
    (m / "config.json").write_text((outside / "config.json").read_text())
    os.symlink(outside / "model.safetensors", m / "model.safetensors")
    return m


def problem_codes(doc):
    return [(e.get("field"), e.get("code"), e.get("message")) for e in doc.get("errors") or []]


@pytest.mark.parametrize("jtype,params", JOBS)
def test_link_out_of_the_root_is_refused_at_submit(make_server, model_root, tmp_path, jtype,
                                                    params):
    m = escaping_model(model_root, tmp_path)
    s = make_server(args=["--model-root", str(model_root), "--devices", "host"])
    status, doc = s.post("/v1/jobs", {"type": jtype, "model": str(m), "params": params})
    assert status == 400, (status, doc)
    (field, code, msg), = problem_codes(doc)
    assert field == "model" and code == "unsafe_path", doc
    assert "model.safetensors" in msg and str(tmp_path / "outside") in msg, msg
    assert "--model-root" in msg  # says what to do
    assert s.get("/v1/jobs")[1]["jobs"] == []


def test_links_inside_the_roots_are_fine(make_server, model_root, tmp_path):
    other = model_root / "shared"
    write_model(other)
    m = model_root / "m"
    m.mkdir()
    os.symlink(other / "model.safetensors", m / "model.safetensors")
    os.symlink("../shared/config.json", m / "config.json")
    s = make_server(args=["--model-root", str(model_root)])
    job = s.run_job({"type": "inspect", "model": str(m)})
    assert job["state"] == "succeeded", job


def test_link_made_while_queued_fails_the_job(make_server, model_root, tmp_path):
    """The check runs again when the job starts: a file swapped for an
    escaping link while the job waited in the queue fails it."""
    big = model_root / "big"
    big.mkdir()
    with open(big / "blob.bin", "wb") as f:  # sparse: hashing it keeps the only worker busy
        f.truncate(3 << 30)
    m = model_root / "m"
    write_model(m)
    outside = tmp_path / "outside"
    write_model(outside)
    s = make_server(args=["--model-root", str(model_root), "--workers", "1"])
    busy = s.submit({"type": "verify", "model": str(big)})
    deadline = time.time() + 30
    while s.get("/v1/jobs/" + busy["id"])[1]["state"] != "running" and time.time() < deadline:
        time.sleep(0.02)
    queued = s.submit({"type": "inspect", "model": str(m)})
    os.unlink(m / "model.safetensors")
    os.symlink(outside / "model.safetensors", m / "model.safetensors")
    assert s.get("/v1/jobs/" + queued["id"])[1]["state"] == "queued"
    s.delete("/v1/jobs/" + busy["id"])
    job = s.wait_job(queued["id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "unsafe_path"
    assert "model.safetensors" in job["error"]["message"]


def cached_repo(data_dir, repo, files):
    org, name = repo.split("/")
    base = os.path.join(str(data_dir), "hub", "models--%s--%s" % (org, name))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(os.path.join(base, "blobs"))
    os.makedirs(os.path.join(base, "refs"))
    os.makedirs(snap)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    for rel, target in files.items():
        os.symlink(target(base) if callable(target) else target, os.path.join(snap, rel))
    return base


def test_hub_snapshot_links_stay_in_their_repo(make_server, tmp_path):
    data = tmp_path / "d"
    src = tmp_path / "src"
    write_model(src)
    blobs = {}
    for f in ("model.safetensors", "config.json"):
        b = (src / f).read_bytes()
        blobs[f] = (hashlib.sha256(b).hexdigest(), b)

    def blob(name):
        def make(base):
            h, b = blobs[name]
            with open(os.path.join(base, "blobs", h), "wb") as fh:
                fh.write(b)
            return os.path.join("..", "..", "blobs", h)
        return make

    good = cached_repo(data, "acme/good", {"model.safetensors": blob("model.safetensors"),
                                           "config.json": blob("config.json")})
    # acme/bad borrows acme/good's weights blob: outside its own repo folder
    h = blobs["model.safetensors"][0]
    cached_repo(data, "acme/bad", {
        "model.safetensors": os.path.join("..", "..", "..", "models--acme--good", "blobs", h),
        "config.json": blob("config.json")})
    s = make_server(data_dir=data, args=["--devices", "host"])
    for jtype, params in JOBS:
        if jtype == "convert":
            continue  # safetensors already: nothing to convert
        ok = s.run_job({"type": jtype, "model": "acme/good", "params": params})
        assert ok["state"] == "succeeded", ok
        status, doc = s.post("/v1/jobs", {"type": jtype, "model": "acme/bad", "params": params})
        assert status == 400, (jtype, status, doc)
        (field, code, msg), = problem_codes(doc)
        assert code == "unsafe_path" and "model.safetensors" in msg, doc
        assert os.path.realpath(good) in msg  # the link's target, named
