"""Logs: one line per event on stderr, --log-format text|json, with a level
and the job id where there is one, plus an access log line per request."""
import json
import os
import re
import subprocess
import time

from conftest import SAN

LEVELS = {"debug", "info", "warn", "error"}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z (debug|info|warn|error)\s+\S")


def make_model(root):
    d = root / "m"
    d.mkdir()
    (d / "a.bin").write_bytes(os.urandom(30000))
    return d


def wait_for(srv, needle, timeout=10):
    """The access log line is written once the response is out: poll."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = srv.logs()
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError("%r not in the log:\n%s" % (needle, srv.logs()))


def lines_of(srv):
    with open(srv.log_path, "rb") as f:
        return [ln for ln in f.read().decode().split("\n") if ln]


def test_json_lines_parse_and_carry_job_id_and_level(make_server, model_root):
    model = make_model(model_root)
    srv = make_server(args=["--log-format", "json", "--model-root", str(model_root)])
    job = srv.run_job({"type": "verify", "model": str(model)})
    srv.get("/no/such%0Aroute")
    wait_for(srv, "route=unmatched")
    assert srv.stop() == 0
    recs = [json.loads(ln) for ln in lines_of(srv)]  # every line is one JSON object
    assert len(recs) >= 5
    for r in recs:
        assert r["level"] in LEVELS, r
        assert re.match(r"^\d{4}-\d\d-\d\dT[\d:.]+Z$", r["ts"]), r
        assert isinstance(r["msg"], str) and r["msg"]
    mine = [r for r in recs if r.get("job_id") == job["id"]]
    msgs = [r["msg"] for r in mine]
    assert any("started" in m for m in msgs), msgs
    assert any(m.startswith("job verify succeeded") for m in msgs), msgs
    assert all(r["level"] == "info" for r in mine)
    # lines about no job carry no job_id
    assert any("ready" in r["msg"] and "job_id" not in r for r in recs)
    # access log: method, path, route, status, duration
    access = [r["msg"] for r in recs if r["msg"].startswith("http ")]
    assert any(re.search(r" POST /v1/jobs route=jobs_submit status=202 ms=[\d.]+", m) for m in access), access
    assert any("GET /v1/jobs/%s route=jobs_get status=200" % job["id"] in m for m in access)
    # a decoded newline in a path stays inside its JSON string
    bad = [m for m in access if "route=unmatched" in m]
    assert bad and "\n" in bad[0] and bad[0].endswith(tuple("0123456789"))


def test_text_lines_one_per_event(make_server, model_root):
    model = make_model(model_root)
    srv = make_server(args=["--model-root", str(model_root)])  # text is the default
    job = srv.run_job({"type": "verify", "model": str(model)})
    srv.get("/inject%0A2026-01-01T00:00:00Z%20error%20forged")
    wait_for(srv, "route=unmatched")
    # The worker logs the job's end just after publishing its state, which
    # is what run_job saw: the line may still be on its way.
    wait_for(srv, "job verify succeeded")
    lines = lines_of(srv)
    for ln in lines:
        assert TEXT_LINE.match(ln), ln
    assert not any(ln.startswith("2026-01-01T00:00:00Z") for ln in lines), "a path forged a line"
    job_lines = [ln for ln in lines if (" %s " % job["id"]) in ln]
    assert any("job verify succeeded" in ln for ln in job_lines), lines
    assert any(re.search(r"http 127\.0\.0\.1 POST /v1/jobs route=jobs_submit status=202", ln)
               for ln in lines), lines


def test_no_access_log(make_server):
    srv = make_server(args=["--no-access-log", "--log-format", "json"])
    srv.get("/healthz")
    srv.get("/v1/version")
    time.sleep(0.3)
    assert srv.stop() == 0
    recs = [json.loads(ln) for ln in lines_of(srv)]
    assert recs and not any(r["msg"].startswith("http ") for r in recs)


def test_bad_log_format_is_refused(tmp_path):
    r = subprocess.run([os.path.join(SAN, "modelprepd"), "--log-format", "xml",
                        "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0"],
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    assert b"--log-format" in r.stderr
