"""Errors that teach: each answer says what would have been accepted or what
to do. An unknown job type lists the types; an unknown param lists the
type's params; a 401 from the hub points at HF_TOKEN; a port that cannot be
bound is named with its address; and a normal start logs no libmicrohttpd
warning."""
import os
import socket
import subprocess

from conftest import SAN
from test_download import Hub, job  # noqa: F401  (the C test hub)
from hub_repos import make_repos

TYPES = ["download", "verify", "convert", "inspect", "warm_load", "shard"]


def only_error(doc):
    (e,) = doc["errors"]
    return e


def test_unknown_type_lists_the_types(make_server):
    s = make_server()
    st, doc = s.post("/v1/jobs", {"type": "downlaod", "model": "a/b"})
    assert st == 400
    e = only_error(doc)
    assert e["field"] == "type" and e["code"] == "unknown_type"
    for t in TYPES:
        assert t in e["message"], e
    assert doc["detail"] == e["message"]


def test_unknown_param_lists_the_params(make_server, model_root):
    m = model_root / "m"
    m.mkdir()
    (m / "x.bin").write_bytes(b"x")
    s = make_server(args=["--model-root", str(model_root)])
    st, doc = s.post("/v1/jobs", {"type": "convert", "model": str(m),
                                  "params": {"dtyp": "bf16"}})
    assert st == 400
    e = only_error(doc)
    assert e["field"] == "params.dtyp" and e["code"] == "unknown_field"
    for p in ("dtype", "max_shard_bytes", "output", "file", "encryption_key_file"):
        assert p in e["message"], e
    st, doc = s.post("/v1/jobs", {"type": "verify", "model": str(m), "params": {"deep": True}})
    assert st == 400 and "takes no params" in only_error(doc)["message"], doc


def test_hub_401_points_at_hf_token(make_server, tmp_path):
    repos = make_repos(str(tmp_path / "repos"))
    h = Hub(repos, "--token", "sekrit")
    try:
        s = make_server(args=["--hub-endpoint", h.url])
        d = s.run_job(job("acme/tiny"))
        assert d["state"] == "failed" and d["error"]["code"] == "unauthorized", d
        assert "set HF_TOKEN" in d["error"]["message"], d
        s2 = make_server(args=["--hub-endpoint", h.url], env={"HF_TOKEN": "wrong"})
        d = s2.run_job(job("acme/tiny"))
        assert d["error"]["code"] == "unauthorized", d
        assert "refused the token" in d["error"]["message"] and "HF_TOKEN" in d["error"]["message"]
    finally:
        h.stop()


def test_bind_failure_names_the_address(make_server, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        p = subprocess.run([os.path.join(SAN, "modelprepd"), "--listen", "127.0.0.1:%d" % port,
                            "--data-dir", str(tmp_path / "d")],
                           capture_output=True, timeout=60,
                           env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1"))
    finally:
        holder.close()
    err = p.stderr.decode()
    assert p.returncode != 0
    assert "127.0.0.1:%d" % port in err, err
    assert "to port 0" not in err, err
    assert "Address already in use" in err and "--listen" in err, err


def test_start_logs_no_httpd_warning(make_server):
    s = make_server()
    assert s.get("/healthz")[0] == 200
    s.stop()
    logs = s.logs()
    assert "EXTERNAL_LOGGER" not in logs, logs
    assert "httpd:" not in logs, logs
