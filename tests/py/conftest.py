"""Shared pytest fixtures: start the real (sanitized) modelprepd on an ephemeral
loopback port with a fresh data dir, and talk HTTP to it."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

BUILD = os.environ.get("MODELPREP_BUILD") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build")
BUILD = os.path.abspath(BUILD)
SAN = os.path.join(BUILD, "asan")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "fixtures"))


def tool(name):
    """Path of a sanitized tool or helper program from the build."""
    for cand in (os.path.join(SAN, name), os.path.join(SAN, "tests", "helpers", name)):
        if os.path.exists(cand):
            return cand
    raise FileNotFoundError(name)


class Server:
    """A running modelprepd. Use .request() / .get() / .post() / .wait_job()."""

    def __init__(self, data_dir, args=(), env=None, token=None):
        self.data_dir = str(data_dir)
        self.args = list(args)
        self.env = dict(os.environ)
        self.env.setdefault("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1")
        self.env.pop("HF_HUB_CACHE", None)
        self.env.pop("HF_HOME", None)
        self.env.pop("HF_ENDPOINT", None)
        if env:
            self.env.update(env)
        self.token = token
        self.proc = None
        self.base = None
        self.log_path = os.path.join(self.data_dir, "server.log")

    def start(self):
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [os.path.join(SAN, "modelprepd"), "--listen", "127.0.0.1:0",
               "--data-dir", self.data_dir] + self.args
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log,
                                     env=self.env)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError("server did not start: %r\n%s" % (line, self.logs()))
        self.base = line.split("listening on ", 1)[1].strip()
        return self

    def logs(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("server did not stop within %ss" % timeout)
        rc = self.proc.returncode if self.proc else 0
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if getattr(self, "log", None):
            self.log.close()
        self.proc = None
        return rc

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        self.proc = None

    def request(self, method, path, body=None, headers=None, raw=False):
        h = {}
        if self.token:
            h["Authorization"] = "Bearer " + self.token
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        if headers:
            h.update(headers)
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, hdrs, payload = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, payload = e.code, dict(e.headers), e.read()
        if raw:
            return status, hdrs, payload
        try:
            doc = json.loads(payload) if payload else None
        except ValueError:
            doc = payload
        return status, doc

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def submit(self, job):
        status, doc = self.post("/v1/jobs", job)
        assert status == 202, (status, doc)
        return doc

    def wait_job(self, job_id, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, doc = self.get("/v1/jobs/" + job_id)
            assert status == 200, (status, doc)
            if doc["state"] in ("succeeded", "failed", "cancelled"):
                return doc
            time.sleep(0.05)
        raise AssertionError("job %s did not finish: %r\n%s" % (job_id, doc, self.logs()))

    def run_job(self, job, timeout=120):
        return self.wait_job(self.submit(job)["id"], timeout)


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(args=[...], env={...}, token=None) → started Server.
    Every server is stopped at teardown and must exit 0 (sanitizers clean)."""
    servers = []

    def factory(args=(), env=None, token=None, data_dir=None, start=True):
        s = Server(data_dir or tmp_path / ("data%d" % len(servers)), args, env, token)
        servers.append(s)
        return s.start() if start else s

    yield factory
    for s in servers:
        if s.proc is not None:
            rc = s.stop()
            assert rc == 0, "modelprepd exited %s\n%s" % (rc, s.logs())


@pytest.fixture
def model_root(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    return d
