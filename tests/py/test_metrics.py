"""GET /metrics against real parsers: prometheus_client's text parser reads the
whole exposition, promtool (Debian's prometheus package) checks and lints it,
and the values move as jobs and requests happen."""
import os
import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

PROMTOOL = shutil.which("promtool")


def make_model(root, name, sizes):
    d = root / name
    d.mkdir(parents=True)
    total = 0
    for i, n in enumerate(sizes):
        (d / ("part-%d.bin" % i)).write_bytes(os.urandom(n))
        total += n
    return d, total


def scrape(srv):
    status, hdrs, body = srv.request("GET", "/metrics", raw=True)
    assert status == 200, body
    assert hdrs["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return text, families


def sample(families, metric, /, **labels):
    """The value of the one sample called `metric` with exactly these labels."""
    found = [s.value for f in families.values() for s in f.samples
             if s.name == metric and s.labels == labels]
    assert len(found) == 1, (metric, labels, found)
    return found[0]


def samples(families, name):
    return [s for f in families.values() for s in f.samples if s.name == name]


EXPECTED = {
    # family name as the parser reports it (counters lose _total) -> type
    "modelprep_build_info": "gauge",
    "modelprep_process_start_time_seconds": "gauge",
    "modelprep_jobs": "gauge",
    "modelprep_jobs_finished": "counter",
    "modelprep_job_duration_seconds": "histogram",
    "modelprep_http_requests": "counter",
    "modelprep_http_request_duration_seconds": "histogram",
    "modelprep_downloaded_bytes": "counter",
    "modelprep_read_bytes": "counter",
    "modelprep_copied_bytes": "counter",
    "modelprep_load_throughput_bytes_per_second": "gauge",
    "modelprep_workers": "gauge",
    "modelprep_store_size_bytes": "gauge",
    "modelprep_device_memory_total_bytes": "gauge",
    "modelprep_device_memory_free_bytes": "gauge",
    "modelprep_device_memory_resident_bytes": "gauge",
    "modelprep_residents": "gauge",
    "modelprep_resident_bytes": "gauge",
}


def test_families_and_values_move_with_jobs(make_server, model_root):
    model, total = make_model(model_root, "m1", [70000, 1234, 5])
    srv = make_server(args=["--model-root", str(model_root), "--workers", "3"])
    text, fam = scrape(srv)
    for name, typ in EXPECTED.items():
        assert name in fam, "missing family %s" % name
        assert fam[name].type == typ, (name, fam[name].type)
    assert all(f.startswith("modelprep_") for f in fam)
    assert sample(fam, "modelprep_jobs", type="verify", state="succeeded") == 0
    assert sample(fam, "modelprep_jobs_finished_total", type="verify", state="succeeded") == 0
    assert sample(fam, "modelprep_job_duration_seconds_count", type="verify") == 0
    assert sample(fam, "modelprep_read_bytes_total") == 0
    assert sample(fam, "modelprep_workers", state="idle") + \
        sample(fam, "modelprep_workers", state="busy") == 3
    assert sample(fam, "modelprep_store_size_bytes") > 0
    # one host device at least, and its numbers are consistent
    totals = samples(fam, "modelprep_device_memory_total_bytes")
    assert totals and all(s.value > 0 for s in totals)
    for s in totals:
        free = sample(fam, "modelprep_device_memory_free_bytes", **s.labels)
        assert 0 <= free <= s.value

    done = srv.run_job({"type": "verify", "model": str(model)})
    assert done["state"] == "succeeded", done
    deep = model_root / "deep"
    (deep / "/".join("d%d" % i for i in range(20))).mkdir(parents=True)  # over verify's limit
    failed = srv.run_job({"type": "verify", "model": str(deep)})
    assert failed["state"] == "failed", failed
    srv.get("/no/such/route")

    _, fam = scrape(srv)
    assert sample(fam, "modelprep_jobs", type="verify", state="succeeded") == 1
    assert sample(fam, "modelprep_jobs", type="verify", state="failed") == 1
    assert sample(fam, "modelprep_jobs", type="verify", state="running") == 0
    assert sample(fam, "modelprep_jobs_finished_total", type="verify", state="succeeded") == 1
    assert sample(fam, "modelprep_jobs_finished_total", type="verify", state="failed") == 1
    # histogram: count, +Inf bucket and cumulative buckets agree
    assert sample(fam, "modelprep_job_duration_seconds_count", type="verify") == 2
    buckets = [s for s in samples(fam, "modelprep_job_duration_seconds_bucket")
               if s.labels["type"] == "verify"]
    values = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
    assert values == sorted(values) and values[-1] == 2
    assert buckets[-1].labels["le"] == "+Inf"
    assert sample(fam, "modelprep_job_duration_seconds_sum", type="verify") > 0
    # the verify job read every byte of the model, once
    assert sample(fam, "modelprep_read_bytes_total") == total == done["result"]["bytes"]
    # HTTP: routes and statuses, unmatched paths under one label
    assert sample(fam, "modelprep_http_requests_total", route="jobs_submit", status="202") == 2
    assert sample(fam, "modelprep_http_requests_total", route="unmatched", status="404") == 1
    assert sample(fam, "modelprep_http_requests_total", route="metrics", status="200") >= 1
    assert sample(fam, "modelprep_http_requests_total", route="jobs_get", status="200") >= 2
    assert sample(fam, "modelprep_http_request_duration_seconds_count", route="jobs_submit") == 2
    # nothing resident without a warm_load
    assert sample(fam, "modelprep_residents") == 0
    assert samples(fam, "modelprep_resident_bytes") == []


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus, "
                    "listed in scripts/deps-extra.txt)")
def test_promtool_accepts_and_lints_clean(make_server, model_root):
    model, _ = make_model(model_root, "m2", [4096])
    srv = make_server(args=["--model-root", str(model_root)])
    srv.run_job({"type": "verify", "model": str(model)})
    srv.get("/v1/jobs")
    status, _, body = srv.request("GET", "/metrics", raw=True)
    assert status == 200
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                       timeout=60)
    # promtool prints lint problems (naming, units, _total) and exits non-zero on any
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert r.stdout.strip() == b"" and r.stderr.strip() == b"", (r.stdout + r.stderr).decode()


def test_metrics_needs_the_token(make_server):
    srv = make_server(env={"MODELPREP_TOKEN": "t0k3n"}, token="t0k3n")
    srv.token = None
    status, doc = srv.get("/metrics")
    assert status == 401 and doc["status"] == 401
    srv.token = "t0k3n"
    # Requests are counted when libmicrohttpd reports them complete, which
    # can come a moment after the client has read the answer.
    deadline = time.time() + 5
    while True:
        _, fam = scrape(srv)
        n = [x for x in samples(fam, "modelprep_http_requests_total")
             if x.labels == {"route": "metrics", "status": "401"}]
        if n or time.time() > deadline:
            break
        time.sleep(0.05)
    assert sample(fam, "modelprep_http_requests_total", route="metrics", status="401") == 1


def warm_load_registered(srv, model):
    status, doc = srv.post("/v1/jobs", {"type": "warm_load", "model": str(model),
                                        "params": {}})
    if status == 400 and any(e.get("field") == "type" for e in doc.get("errors") or []):
        return None
    return status, doc


def test_resident_bytes_by_model_with_escaped_labels(make_server, model_root, tmp_path):
    """A model whose path holds a quote and a backslash: the label must be
    escaped so that the parser reads the exact name back."""
    pytest.importorskip("safetensors")
    import numpy as np
    from safetensors.numpy import save_file
    d = model_root / 'we"ird\\name'
    d.mkdir()
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(d / "model.safetensors"))
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    srv = make_server(args=["--model-root", str(model_root), "--devices", "host"])
    got = warm_load_registered(srv, d)
    if got is None:
        pytest.skip("warm_load is not a registered job type in this build yet")
    status, doc = got
    assert status == 202, doc
    job = srv.wait_job(doc["id"])
    assert job["state"] == "succeeded", job
    _, fam = scrape(srv)
    assert sample(fam, "modelprep_residents") == 1
    by_model = {s.labels["model"]: s.value for s in samples(fam, "modelprep_resident_bytes")}
    assert list(by_model) == [str(d)], by_model
    assert by_model[str(d)] == job["result"]["bytes"] > 0
    devs = samples(fam, "modelprep_device_memory_resident_bytes")
    assert sum(s.value for s in devs) >= job["result"]["bytes"]
    assert sample(fam, "modelprep_copied_bytes_total") == job["result"]["bytes"]
    rid = job["result"]["resident_id"]
    assert srv.delete("/v1/residents/" + rid)[0] == 200
    _, fam = scrape(srv)
    assert sample(fam, "modelprep_residents") == 0
    assert samples(fam, "modelprep_resident_bytes") == []


class TestHub:
    """tests/helpers/testhub serving ROOT/<org>/<name>/ as hub repos."""
    __test__ = False

    def __init__(self, root, *flags):
        from conftest import tool
        self.proc = subprocess.Popen([tool("testhub"), *flags, str(root)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening on "), line
        self.url = line.split("listening on ", 1)[1].strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def test_downloaded_bytes_counted(make_server, tmp_path):
    repo = tmp_path / "hubroot" / "acme" / "small"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}')
    (repo / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
                                             + os.urandom(300000))
    hub = TestHub(tmp_path / "hubroot")
    try:
        srv = make_server(args=["--hub-endpoint", hub.url])
        job = srv.run_job({"type": "download", "model": "acme/small"})
        assert job["state"] == "succeeded", job
        n = job["result"]["bytes_downloaded"]
        assert n >= 300000
        _, fam = scrape(srv)
        assert sample(fam, "modelprep_downloaded_bytes_total") == n
        assert sample(fam, "modelprep_jobs_finished_total", type="download", state="succeeded") == 1
        # the same again is served from the cache: nothing more is downloaded
        again = srv.run_job({"type": "download", "model": "acme/small"})
        assert again["state"] == "succeeded", again
        _, fam = scrape(srv)
        assert sample(fam, "modelprep_downloaded_bytes_total") == n + again["result"]["bytes_downloaded"]
    finally:
        hub.stop()
