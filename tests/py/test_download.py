"""The download job against our C test hub (tests/helpers/testhub: a real HTTP
server with the hub's endpoints, LFS redirects to another origin, Range, and
injectable faults), checked with the real huggingface_hub reading the cache
offline."""
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tool
from hub_repos import make_repos

PY = sys.executable
TINY_WEIGHTS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
TINY_AUTO = sorted(["README.md", "config.json", "generation_config.json",
                    "model.safetensors.index.json", "tokenizer.json",
                    "tokenizer_config.json"] + TINY_WEIGHTS)


class Hub:
    def __init__(self, root, *flags):
        self.proc = subprocess.Popen([tool("testhub"), *flags, str(root)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening on "), (line, self.proc.stderr.read())
        self.url = line.split("listening on ", 1)[1].strip()

    def stats(self):
        import urllib.request
        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as r:
            return json.loads(r.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc.stdout.close()
        self.proc.stderr.close()
        assert self.proc.returncode == 0


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return make_repos(str(tmp_path_factory.mktemp("hubrepos")))


@pytest.fixture
def hub(repos):
    hubs = []

    def factory(*flags):
        h = Hub(repos, *flags)
        hubs.append(h)
        return h

    yield factory
    for h in hubs:
        h.stop()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def job(model, revision="main", **params):
    return {"type": "download", "model": model, "revision": revision, "params": params}


def hub_cache(server):
    return os.path.join(server.data_dir, "hub")


def offline_check(cache, repo, files, revision="main"):
    """huggingface_hub, offline, must find the snapshot and every file."""
    code = r"""
import json, sys
from huggingface_hub import snapshot_download, hf_hub_download, scan_cache_dir
cache, repo, rev, files = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
snap = snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True)
paths = {f: hf_hub_download(repo, f, revision=rev, cache_dir=cache, local_files_only=True) for f in files}
info = scan_cache_dir(cache)
print(json.dumps({"snap": snap, "paths": paths, "warnings": [str(w) for w in info.warnings],
                  "repos": [[r.repo_id, r.size_on_disk, r.nb_files] for r in info.repos]}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([PY, "-c", code, cache, repo, revision, json.dumps(files)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sglang_local_snapshot(cache, repo, revision="main"):
    """What SGLang's _find_local_hf_snapshot_dir_unlocked accepts: refs/<rev> to
    a snapshot with >= 1 weight file and every index shard present."""
    d = os.path.join(cache, "models--" + repo.replace("/", "--"))
    with open(os.path.join(d, "refs", revision)) as f:
        commit = f.read()
    snap = os.path.join(d, "snapshots", commit)
    weights = [p for p in glob.glob(os.path.join(snap, "*.safetensors")) if os.path.isfile(p)]
    assert weights
    for idx in glob.glob(os.path.join(snap, "*.safetensors.index.json")):
        with open(idx) as f:
            for shard in set(json.load(f)["weight_map"].values()):
                assert os.path.isfile(os.path.join(snap, shard)), shard
    return snap


def test_auto_download_is_usable_offline(make_server, hub, repos):
    h = hub()
    s = make_server(args=["--hub-endpoint", h.url])
    doc = s.run_job(job("acme/tiny", chunk_bytes=65536, connections=4))
    assert doc["state"] == "succeeded", doc
    r = doc["result"]
    assert len(r["commit"]) == 40
    names = [f["name"] for f in r["files"]]
    # SGLang's choice: safetensors named by the index (no stray consolidated),
    # no .bin, nothing under original/, configs and tokenizer along
    assert sorted(names) == TINY_AUTO
    src = os.path.join(repos, "acme", "tiny")
    for f in r["files"]:
        assert f["sha256"] == sha256(os.path.join(src, f["name"])), f
        assert f["size"] == os.path.getsize(os.path.join(src, f["name"]))
    total = sum(f["size"] for f in r["files"])
    assert r["bytes_downloaded"] == total and r["bytes_reused"] == 0
    assert r["seconds"] > 0
    cache = hub_cache(s)
    assert r["path"] == os.path.join(cache, "models--acme--tiny", "snapshots", r["commit"])
    # exactly huggingface_hub's layout: relative links into blobs/, refs/main
    for n in names:
        p = os.path.join(r["path"], n)
        assert os.path.islink(p) and not os.path.isabs(os.readlink(p))
        assert os.readlink(p).startswith("../../blobs/")
    with open(os.path.join(cache, "models--acme--tiny", "refs", "main")) as f:
        assert f.read() == r["commit"]
    assert not glob.glob(os.path.join(cache, "models--acme--tiny", "blobs", "*incomplete*"))
    # big shard went as parallel ranged requests from the CDN origin
    st = h.stats()
    assert st["range_gets"] > 40 and st["heads"] >= 1
    # the real huggingface_hub, offline
    off = offline_check(cache, "acme/tiny", names)
    assert off["snap"] == r["path"]
    for n, p in off["paths"].items():
        assert p == os.path.join(r["path"], n)
        assert sha256(p) == sha256(os.path.join(src, n))
    assert off["warnings"] == []
    assert off["repos"][0][0] == "acme/tiny" and off["repos"][0][2] == len(names)
    assert sglang_local_snapshot(cache, "acme/tiny") == r["path"]
    # progress was in bytes and complete
    assert doc["progress"]["unit"] == "bytes"
    assert doc["progress"]["done"] == doc["progress"]["total"] == total

    # again: everything is reused, no file is fetched
    before = h.stats()
    doc2 = s.run_job(job("acme/tiny"))
    r2 = doc2["result"]
    assert doc2["state"] == "succeeded"
    assert r2["bytes_downloaded"] == 0 and r2["bytes_reused"] == total
    assert r2["files"] == r["files"]
    assert h.stats()["data_gets"] == before["data_gets"]


def test_load_formats_and_patterns(make_server, hub, repos):
    h = hub()
    s = make_server()

    def names(doc):
        assert doc["state"] == "succeeded", doc
        return sorted(f["name"] for f in doc["result"]["files"])

    assert names(s.run_job(job("acme/pickled", endpoint=h.url))) == [
        "config.json", "pytorch_model.bin", "tokenizer.model"]  # no training artefacts
    assert names(s.run_job(job("acme/pickled", endpoint=h.url, load_format="pt"))) == [
        "config.json", "pytorch_model.bin", "tokenizer.model"]
    assert names(s.run_job(job("acme/quant", endpoint=h.url, load_format="gguf",
                               allow_patterns=["*Q4_K_M*", "*.json"]))) == [
        "config.json", "model-Q4_K_M.gguf"]
    all_files = names(s.run_job(job("acme/tiny", endpoint=h.url, load_format="all",
                                    ignore_patterns=["original/"])))
    assert "pytorch_model.bin" in all_files and "consolidated.safetensors" in all_files
    assert "training_args.bin" in all_files and not any(n.startswith("original/") for n in all_files)
    assert names(s.run_job(job("acme/tiny", endpoint=h.url, load_format="all",
                               allow_patterns=["original/*"]))) == [
        "original/consolidated.00.pth", "original/params.json"]
    # an empty file and a nested one are fine for huggingface_hub too
    d = s.run_job(job("acme/quant", endpoint=h.url, load_format="all"))
    assert names(d) == ["config.json", "docs/config.json", "docs/empty.txt", "empty.txt",
                        "model-Q4_K_M.gguf", "model-Q8_0.gguf"]
    by = {f["name"]: f for f in d["result"]["files"]}
    assert by["empty.txt"]["sha256"] == by["docs/empty.txt"]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert by["docs/config.json"]["sha256"] == by["config.json"]["sha256"]
    r = d["result"]
    assert r["bytes_downloaded"] + r["bytes_reused"] == sum(f["size"] for f in r["files"])
    off = offline_check(hub_cache(s), "acme/quant", sorted(by))
    assert os.path.realpath(off["paths"]["docs/config.json"]) == os.path.realpath(off["paths"]["config.json"])

    d = s.run_job(job("acme/pickled", endpoint=h.url, load_format="safetensors"))
    assert d["state"] == "failed" and d["error"]["code"] == "file_not_found"
    d = s.run_job(job("acme/tiny", endpoint=h.url, allow_patterns=["*.nothing"]))
    assert d["state"] == "failed" and d["error"]["code"] == "file_not_found"


def test_bad_params_are_400(make_server, model_root):
    s = make_server(args=["--model-root", str(model_root)])
    for params in ({"load_format": "npcache"}, {"connections": 0}, {"connections": 65},
                   {"allow_patterns": "*.json"}, {"endpoint": "ftp://x"}, {"bogus": 1}):
        st, doc = s.post("/v1/jobs", job("acme/tiny", **params))
        assert st == 400, (params, st, doc)
    st, _ = s.post("/v1/jobs", job(str(model_root)))
    assert st == 400


def test_hub_errors_map_to_codes(make_server, hub, tmp_path):
    h = hub("--gated", "acme/quant")
    s = make_server(args=["--hub-endpoint", h.url])
    cases = [(job("acme/nope"), "repo_not_found"),
             (job("acme/tiny", revision="v9"), "revision_not_found"),
             (job("acme/quant"), "unauthorized")]
    for j, code in cases:
        d = s.run_job(j)
        assert d["state"] == "failed" and d["error"]["code"] == code, d
    assert not os.path.exists(os.path.join(hub_cache(s), "models--acme--tiny", "snapshots"))


def test_token_goes_to_the_hub_not_the_cdn(make_server, hub):
    h = hub("--token", "sekrit")
    s = make_server(args=["--hub-endpoint", h.url], env={"HF_TOKEN": "sekrit"})
    d = s.run_job(job("acme/tiny"))
    assert d["state"] == "succeeded", d
    st = h.stats()
    assert st["cdn_auth"] == 0 and st["range_gets"] > 0
    s2 = make_server(args=["--hub-endpoint", h.url])
    d = s2.run_job(job("acme/tiny"))
    assert d["state"] == "failed" and d["error"]["code"] == "unauthorized"
    # the server's token never goes to a per-job endpoint on another origin
    other = hub()
    d = s.run_job(job("acme/tiny", endpoint=other.url))
    assert d["state"] == "succeeded"


def test_evil_sibling_is_refused(make_server, hub, tmp_path):
    h = hub("--evil")
    s = make_server(args=["--hub-endpoint", h.url])
    d = s.run_job(job("acme/tiny", load_format="all"))
    assert d["state"] == "failed" and d["error"]["code"] == "unsafe_path", d
    assert not glob.glob(os.path.join(str(tmp_path), "**", "evil"), recursive=True)
    assert h.stats()["data_gets"] == 0


def test_insufficient_space_is_checked_first(make_server, hub):
    h = hub("--huge")
    s = make_server(args=["--hub-endpoint", h.url])
    d = s.run_job(job("acme/tiny", load_format="all"))
    assert d["state"] == "failed" and d["error"]["code"] == "insufficient_space", d
    # what is needed is spelled out with the margin that is kept free
    assert "+ 64 MiB margin =" in d["error"]["message"], d
    assert h.stats()["data_gets"] == 0
    blobs = os.path.join(hub_cache(s), "models--acme--tiny", "blobs")
    assert not os.path.exists(blobs) or os.listdir(blobs) == []


def test_retries_on_5xx_429(make_server, hub):
    h = hub("--fail-500", "3", "--fail-429", "2", "--retry-after", "1")
    s = make_server(args=["--hub-endpoint", h.url])
    t = time.time()
    d = s.run_job(job("acme/tiny", chunk_bytes=262144))
    assert d["state"] == "succeeded", d
    assert h.stats()["errors_sent"] == 5
    assert time.time() - t >= 1.0  # Retry-After honoured
    h2 = hub("--fail-500", "1000")
    s2 = make_server()  # an empty cache
    d = s2.run_job(job("acme/tiny", endpoint=h2.url, max_retries=1))
    assert d["state"] == "failed" and d["error"]["code"] == "hub_unavailable", d


def test_cut_connections_resume_with_range(make_server, hub, repos):
    h = hub("--cut", "6")
    s = make_server(args=["--hub-endpoint", h.url])
    d = s.run_job(job("acme/tiny", chunk_bytes=262144, max_retries=2))
    assert d["state"] == "succeeded", d
    st = h.stats()
    total = sum(f["size"] for f in d["result"]["files"])
    assert st["cuts_done"] == 6
    # the cut halves were kept: far less than refetching the cut requests whole
    assert st["bytes_sent"] < total + 6 * 262144 // 2 + 4096
    src = os.path.join(repos, "acme", "tiny")
    for f in d["result"]["files"]:
        assert sha256(os.path.join(d["result"]["path"], f["name"])) == sha256(
            os.path.join(src, f["name"]))


def test_checksum_mismatch_publishes_nothing(make_server, hub, repos):
    h = hub("--corrupt", "model-00001-of-00002.safetensors")
    s = make_server(args=["--hub-endpoint", h.url])
    d = s.run_job(job("acme/tiny"))
    assert d["state"] == "failed" and d["error"]["code"] == "checksum_mismatch", d
    repo = os.path.join(hub_cache(s), "models--acme--tiny")
    assert not os.path.exists(os.path.join(repo, "snapshots"))
    assert not os.path.exists(os.path.join(repo, "refs"))
    # neither the bad bytes nor a blob under the good name stay behind (other
    # files' .incomplete parts may, for a later resume)
    etag = sha256(os.path.join(repos, "acme", "tiny", "model-00001-of-00002.safetensors"))
    assert not glob.glob(os.path.join(repo, "blobs", etag + "*"))


def wait_progress(s, job_id, frac, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st, doc = s.get("/v1/jobs/" + job_id)
        p = doc.get("progress") or {}
        if doc["state"] == "running" and p.get("total") and p["done"] >= frac * p["total"]:
            return doc
        assert doc["state"] in ("queued", "running"), doc
        time.sleep(0.05)
    raise AssertionError("no progress: %r" % doc)


def test_cancel_stops_promptly(make_server, hub):
    h = hub("--slow", "400000")
    s = make_server(args=["--hub-endpoint", h.url])
    j = s.submit(job("acme/tiny", chunk_bytes=65536, connections=2))
    doc = wait_progress(s, j["id"], 0.1)
    assert doc["progress"]["unit"] == "bytes" and doc["progress"]["rate"] > 0
    t = time.time()
    st, _ = s.delete("/v1/jobs/" + j["id"])
    assert st == 202
    d = s.wait_job(j["id"], timeout=30)
    assert d["state"] == "cancelled", d
    assert time.time() - t < 5
    repo = os.path.join(hub_cache(s), "models--acme--tiny")
    assert not os.path.exists(os.path.join(repo, "snapshots"))
    assert glob.glob(os.path.join(repo, "blobs", "*.incomplete"))  # kept for a resume


def test_resume_after_server_restart(make_server, hub, tmp_path, repos):
    h = hub("--slow", "500000")
    data = tmp_path / "data"
    s = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    j = s.submit(job("acme/tiny", chunk_bytes=65536, connections=2))
    wait_progress(s, j["id"], 0.4)
    s.kill9()
    s2 = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    d = s2.wait_job(j["id"], timeout=120)
    assert d["state"] == "succeeded", d
    r = d["result"]
    total = sum(f["size"] for f in r["files"])
    assert r["bytes_resumed"] > 0
    assert r["bytes_downloaded"] + r["bytes_resumed"] + r["bytes_reused"] == total
    src = os.path.join(repos, "acme", "tiny")
    for f in r["files"]:
        assert sha256(os.path.join(r["path"], f["name"])) == sha256(os.path.join(src, f["name"]))
    offline_check(hub_cache(s2), "acme/tiny", [f["name"] for f in r["files"]])


def test_drain_requeues_and_resumes(make_server, hub, tmp_path):
    h = hub("--slow", "500000")
    data = tmp_path / "data"
    s = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    j = s.submit(job("acme/tiny", chunk_bytes=262144, connections=2))
    wait_progress(s, j["id"], 0.3)
    assert s.stop() == 0  # SIGTERM: the job checkpoints and goes back to the queue
    s2 = make_server(args=["--hub-endpoint", h.url], data_dir=data)
    d = s2.wait_job(j["id"], timeout=120)
    assert d["state"] == "succeeded", d
    # partial chunks were kept too, not only whole ones
    assert d["result"]["bytes_resumed"] >= 0.3 * sum(f["size"] for f in d["result"]["files"]) - 65536


def test_two_jobs_one_repo(make_server, hub):
    h = hub("--slow", "4000000")
    s = make_server(args=["--hub-endpoint", h.url, "--workers", "2"])
    a = s.submit(job("acme/tiny", chunk_bytes=65536))
    b = s.submit(job("acme/tiny", chunk_bytes=65536))
    da, db = s.wait_job(a["id"]), s.wait_job(b["id"])
    assert da["state"] == db["state"] == "succeeded", (da, db)
    # the repo lock serialises them: the second finds every blob in place
    ra, rb = da["result"], db["result"]
    assert sorted([ra["bytes_reused"], rb["bytes_reused"]])[0] == 0
    assert max(ra["bytes_reused"], rb["bytes_reused"]) == sum(f["size"] for f in ra["files"])
