"""The verify job through the real server: a hub cache laid out exactly as
huggingface_hub lays it out (blobs named by their sha256, snapshot symlinks)
and local model folders. A mismatch must fail the job (checksum_mismatch,
naming the file); a first run that only records hashes says so; the final
progress of any job says how it ended, with the average rate and no job id
(the id belongs to progress events only)."""
import hashlib
import json
import os
import urllib.request


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def hub_repo(data_dir, repo="acme/tiny", files=None):
    """A cached snapshot: LFS-style blobs named by their sha256."""
    org, name = repo.split("/")
    base = os.path.join(str(data_dir), "hub", "models--%s--%s" % (org, name))
    commit = "c" * 40
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(os.path.join(base, "blobs"))
    os.makedirs(os.path.join(base, "refs"))
    os.makedirs(snap)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    blobs = {}
    for rel, data in (files or {}).items():
        h = sha256(data)
        with open(os.path.join(base, "blobs", h), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", h), os.path.join(snap, rel))
        blobs[rel] = os.path.join(base, "blobs", h)
    return blobs


def test_flipped_blob_byte_fails_the_job(make_server, tmp_path):
    data = tmp_path / "d"
    weights = bytes(range(256)) * 64
    blobs = hub_repo(data, files={"model.safetensors": weights, "config.json": b'{"a": 1}'})
    s = make_server(data_dir=data)
    ok = s.run_job({"type": "verify", "model": "acme/tiny"})
    assert ok["state"] == "succeeded", ok
    # LFS blob names are the expected hashes: even a first run verifies
    assert ok["result"]["status"] == "verified" and ok["result"]["ok"] is True
    by_name = {f["name"]: f for f in ok["result"]["files"]}
    assert by_name["model.safetensors"]["status"] == "verified"

    with open(blobs["model.safetensors"], "r+b") as f:  # one flipped bit
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    bad = s.run_job({"type": "verify", "model": "acme/tiny"})
    assert bad["state"] == "failed", bad
    assert bad["error"]["code"] == "checksum_mismatch"
    msg = bad["error"]["message"]
    assert "model.safetensors" in msg and "config.json" not in msg, msg
    assert "DELETE /v1/models/acme/tiny" in msg, msg
    # the table stays available on the failed job
    files = {f["name"]: f for f in bad["result"]["files"]}
    assert files["model.safetensors"]["ok"] is False
    assert files["model.safetensors"]["expected"] == sha256(weights)
    assert files["config.json"]["ok"] is True
    assert bad["result"]["ok"] is False and bad["result"]["status"] == "verified"
    assert bad["progress"]["message"] == "failed"
    # the list shows it as failed too (what the dashboard colours red)
    st, lst = s.get("/v1/jobs?state=failed&type=verify")
    assert st == 200 and [j["id"] for j in lst["jobs"]] == [bad["id"]]


def test_first_run_records_then_verifies(make_server, model_root):
    m = model_root / "m"
    m.mkdir()
    (m / "a.bin").write_bytes(b"x" * 5000)
    (m / "b.json").write_text("{}")
    s = make_server(args=["--model-root", str(model_root)])
    first = s.run_job({"type": "verify", "model": str(m)})
    assert first["state"] == "succeeded", first
    r = first["result"]
    assert r["status"] == "recorded" and r["recorded"] == 2 and r["ok"] is True
    assert {f["status"] for f in r["files"]} == {"recorded"}
    second = s.run_job({"type": "verify", "model": str(m)})
    assert second["state"] == "succeeded", second
    assert second["result"]["status"] == "verified" and second["result"]["recorded"] == 0
    # a new file is recorded while the others are verified: the run verified
    (m / "c.txt").write_text("new")
    third = s.run_job({"type": "verify", "model": str(m)})
    st = {f["name"]: f["status"] for f in third["result"]["files"]}
    assert st == {"a.bin": "verified", "b.json": "verified", "c.txt": "recorded"}
    assert third["result"]["status"] == "verified"
    (m / "a.bin").write_bytes(b"y" * 5000)
    bad = s.run_job({"type": "verify", "model": str(m)})
    assert bad["state"] == "failed" and bad["error"]["code"] == "checksum_mismatch", bad
    assert "a.bin" in bad["error"]["message"]


def read_events(srv, job_id):
    """The job's event history (the stream ends with the job)."""
    req = urllib.request.Request(srv.base + "/v1/jobs/%s/events" % job_id)
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    out = []
    for block in text.split("\n\n"):
        kind, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if kind:
            out.append((kind, json.loads("\n".join(data)) if data else None))
    return out


def test_final_progress_says_done_with_average_rate(make_server, model_root):
    m = model_root / "big"
    m.mkdir()
    (m / "w.bin").write_bytes(os.urandom(8 << 20))
    s = make_server(args=["--model-root", str(model_root)])
    job = s.run_job({"type": "verify", "model": str(m)})
    assert job["state"] == "succeeded", job
    p = job["progress"]
    assert set(p) == {"done", "total", "unit", "rate", "message"}, p  # no "id"
    assert p["message"] == "done" and p["done"] == p["total"] == 8 << 20
    assert p["rate"] > 0
    # average: total units over the job's duration (started_at..finished_at)
    from datetime import datetime
    t0 = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    t1 = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00"))
    secs = max((t1 - t0).total_seconds(), 1e-3)
    assert p["rate"] >= 0.2 * p["total"] / (secs + 1.0), (p, secs)
    # events do carry the job id, which the all-jobs stream needs
    evs = read_events(s, job["id"])
    prog = [d for k, d in evs if k == "progress"]
    assert prog and all(d["id"] == job["id"] for d in prog)
    assert prog[-1]["message"] == "done" and prog[-1]["rate"] == p["rate"]
    # the state event (the whole job) has no id inside its progress
    final = [d for k, d in evs if k == "state"][-1]
    assert "id" not in final["progress"]
