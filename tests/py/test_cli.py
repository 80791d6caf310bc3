"""The command-line client `modelprep` (tools/modelprep.c, tools/cli/), the
sanitized build, against the real server: every command, its exit status
(0 done, 1 failed, 2 usage, 3 unreachable, 130 left running) and its
--json output parsed; its live output in a real terminal (tmux: send-keys,
capture-pane) while a throttled download from the C test hub runs, with
Ctrl-C cancelling (once) or leaving the job running (twice); plain lines
when stdout is a pipe; and a hostile server (bad JSON, a 20 MiB event line)
that must not crash it."""
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from conftest import tool

TMUX = shutil.which("tmux")


def cli_env(srv=None, **extra):
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1")
    env.pop("MODELPREP_TOKEN", None)
    env.pop("MODELPREP_URL", None)
    if srv is not None:
        env["MODELPREP_URL"] = srv.base
    env.update(extra)
    return env


def run(srv, *args, env=None, timeout=120):
    p = subprocess.run([tool("modelprep"), *args], capture_output=True, text=True,
                       env=env or cli_env(srv), timeout=timeout)
    # a sanitizer report is a crash, whatever the exit status says
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr
    return p


def js(p):
    assert p.stdout.strip(), p.stderr
    return json.loads(p.stdout)


def tiny_model(d):
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    d.mkdir()
    st.save_file({"model.embed_tokens.weight": np.ones((256, 64), dtype=np.float16),
                  "lm_head.weight": np.ones((256, 64), dtype=np.float16)},
                 str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256,
         "num_hidden_layers": 0, "intermediate_size": 128}))


def test_cli_commands(make_server, model_root):
    tiny_model(model_root / "tiny")
    (model_root / "bad").mkdir()
    (model_root / "bad" / "w0.bin").write_bytes(os.urandom(4096))
    torch = pytest.importorskip("torch")  # noqa: F841
    from test_prepare import bin_model
    bin_model(str(model_root / "old"))
    srv = make_server(args=["--model-root", str(model_root), "--devices", "host"])
    tiny = str(model_root / "tiny")

    # inspect: a readable table, and the job as JSON
    p = run(srv, "inspect", tiny)
    assert p.returncode == 0, p.stderr
    for word in ("architecture", "LlamaForCausalLM", "params", "dtypes", "F16",
                 "quantization", "bytes per TP rank", "tp=1"):
        assert word in p.stdout, (word, p.stdout)
    doc = js(run(srv, "--json", "inspect", tiny, "--tp-sizes", "1,2"))
    assert doc["state"] == "succeeded" and doc["params"] == {"tp_sizes": [1, 2]}
    assert [e["tp"] for e in doc["result"]["per_tp"]] == [1, 2]

    # load, ps, ls (with where it is resident and what inspect found), unload
    p = run(srv, "load", tiny, "--json")
    assert p.returncode == 0, p.stderr
    rid = js(p)["result"]["resident_id"]
    p = run(srv, "ps")
    assert p.returncode == 0 and "device #0" in p.stdout and rid in p.stdout, p.stdout
    assert [r["id"] for r in js(run(srv, "ps", "--json"))["residents"]] == [rid]
    p = run(srv, "ls")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith(tiny + " ")]
    assert line and "local" in line[0] and "#0" in line[0] and "LlamaForCausalLM" in line[0], p.stdout
    models = js(run(srv, "ls", "--json"))["models"]
    mt = [m for m in models if m["model"] == tiny][0]
    assert mt["inspection"]["result"]["architecture"] == "LlamaForCausalLM"
    assert mt["inspection"]["job_id"] == doc["id"]
    p = run(srv, "unload", tiny)
    assert p.returncode == 0 and rid in p.stdout, p.stderr
    assert srv.get("/v1/residents/" + rid)[1]["state"] == "unloaded"
    p = run(srv, "unload", tiny)
    assert p.returncode == 1 and "nothing" in p.stderr

    # convert -> shard on its output -> prepare (steps), all followed to the end
    p = run(srv, "convert", str(model_root / "old"), "--dtype", "fp16")
    assert p.returncode == 0, p.stderr
    converted = [ln.split(": ", 1)[1] for ln in p.stdout.splitlines()
                 if ln.startswith("next model: ")][0]
    assert converted.endswith("/converted/old")
    p = run(srv, "shard", converted, "--tp-size", "2", "--json")
    assert p.returncode == 0, p.stderr
    shard = js(p)
    assert shard["type"] == "shard" and shard["params"] == {"tp_size": 2}
    p = run(srv, "prepare", str(model_root / "old"), "--load", "-p", "tp_size=1")
    assert p.returncode == 0, p.stderr
    assert "resident r_" in p.stdout and "inspect old" in p.stdout, p.stdout
    prep = [j for j in js(run(srv, "jobs", "--type", "prepare", "--json"))["jobs"]]
    assert len(prep) == 1 and prep[0]["params"] == {"load": True, "tp_size": 1}
    kids = js(run(srv, "jobs", "--parent", prep[0]["id"], "--json"))["jobs"]
    assert {k["type"] for k in kids} >= {"inspect", "warm_load"}

    # verify: a match is 0, a mismatch is 1 with the file named
    assert run(srv, "verify", tiny).returncode == 0
    with open(model_root / "tiny" / "config.json", "a") as f:
        f.write(" ")
    p = run(srv, "verify", tiny)
    assert p.returncode == 1 and "checksum_mismatch" in p.stderr and "config.json" in p.stderr
    # put the byte back: the recorded hash matches again
    cfg = model_root / "tiny" / "config.json"
    cfg.write_bytes(cfg.read_bytes()[:-1])

    # a failing job: 1, its code and message on stderr
    p = run(srv, "inspect", str(model_root / "bad"))
    assert p.returncode == 1 and "failed: unsupported_format:" in p.stderr, p.stderr
    failed_id = p.stdout.split()[0]

    # jobs: a table with start and duration, filters, --json
    p = run(srv, "jobs", "--state", "failed")
    assert p.returncode == 0 and failed_id in p.stdout and "unsupported_format" in p.stdout
    assert "STARTED" in p.stdout and "DURATION" in p.stdout
    # (the verify that found the mismatch above failed too, just before)
    failed = [j["id"] for j in js(run(srv, "jobs", "--state", "failed", "--json"))["jobs"]]
    assert failed[0] == failed_id and len(failed) == 2
    assert js(run(srv, "jobs", "--limit", "2", "--json"))["next_cursor"]

    # --detach returns the id at once; watch follows it to its end
    p = run(srv, "--detach", "verify", tiny)
    assert p.returncode == 0 and p.stdout.startswith("j_"), p.stderr
    jid = p.stdout.strip()
    w = js(run(srv, "watch", jid, "--json"))
    assert w["id"] == jid and w["state"] == "succeeded"
    assert run(srv, "watch", failed_id).returncode == 1
    # cancel: an ended job is refused (1), an unknown one too
    p = run(srv, "cancel", jid)
    assert p.returncode == 1 and "409" in p.stderr
    assert run(srv, "cancel", "j_nope").returncode == 1

    # devices
    p = run(srv, "devices")
    assert p.returncode == 0 and "#0" in p.stdout and "host" in p.stdout
    assert js(run(srv, "devices", "--json"))["devices"][0]["kind"] == "host"

    # rm: a hub model that is not cached is 1; a path is a usage error
    assert run(srv, "rm", "acme/none").returncode == 1
    assert run(srv, "rm", tiny).returncode == 2

    # usage errors: 2, and nothing is submitted
    before = len(js(run(srv, "jobs", "--json", "--limit", "500"))["jobs"])
    for args in ([], ["frobnicate"], ["convert"], ["convert", tiny, "--nope", "1"],
                 ["convert", tiny, "--max-shard-bytes", "abc"], ["shard", tiny, "--tp-size"],
                 ["inspect", tiny, "-p", "novalue"], ["jobs", "--bogus", "x"],
                 ["watch"], ["ls", "extra"], ["--url", "ftp://x", "ls"],
                 ["verify", "/etc"]):  # the server's 400: outside the model roots
        p = run(srv, *args)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
    p = run(srv, "convert", tiny, "--nope", "1")
    assert "--max-shard-bytes" in p.stderr  # the params it does take, from /openapi.json
    assert len(js(run(srv, "jobs", "--json", "--limit", "500"))["jobs"]) == before

    # an unreachable server: 3
    p = run(None, "--url", "http://127.0.0.1:1", "ls")
    assert p.returncode == 3 and "cannot reach" in p.stderr
    p = run(None, "ls", env=cli_env(None, MODELPREP_URL="http://127.0.0.1:1"))
    assert p.returncode == 3


def test_cli_token(make_server, tmp_path):
    srv = make_server(env={"MODELPREP_TOKEN": "s3cret"}, token="s3cret")
    p = run(srv, "jobs")
    assert p.returncode == 1 and "401" in p.stderr
    assert run(srv, "jobs", env=cli_env(srv, MODELPREP_TOKEN="s3cret")).returncode == 0
    (tmp_path / "tok").write_text("s3cret\n")
    assert run(srv, "--token-file", str(tmp_path / "tok"), "devices").returncode == 0
    assert run(srv, "--token-file", str(tmp_path / "missing"), "devices").returncode == 2


def hub_with(tmp_path, repos, *flags):
    """The C test hub serving acme/<name> repos of about `size` bytes."""
    for name, size in repos.items():
        repo = tmp_path / "hubroot" / "acme" / name
        repo.mkdir(parents=True)
        (repo / "config.json").write_text('{"model_type": "llama"}')
        (repo / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
                                                 + os.urandom(size))
    hub = subprocess.Popen([tool("testhub"), *flags, str(tmp_path / "hubroot")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = hub.stdout.readline().decode()
    assert line.startswith("listening on "), line
    return hub, line.split("listening on ", 1)[1].strip()


def stop_hub(hub):
    hub.terminate()
    hub.wait(timeout=30)
    hub.stdout.close()


def job_id_on(screen):
    """The id the client printed when it submitted (after a prompt, maybe)."""
    m = re.search(r"\b(j_[0-9a-f]{20}) download acme/slow", screen)
    assert m, screen
    return m.group(1)


class Tmux:
    """A detached tmux server of our own (its own socket), 120x20."""

    def __init__(self, tmp_path):
        self.sock = str(tmp_path / "tmux.sock")
        self.tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "20", "sh")

    def tmux(self, *args):
        return subprocess.run([TMUX, "-S", self.sock, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    def send(self, *keys):
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self):
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, pred, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.screen()
            if pred(s):
                return s
            time.sleep(0.1)
        raise AssertionError("not on screen in time:\n" + self.screen())

    def close(self):
        subprocess.run([TMUX, "-S", self.sock, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.skipif(not TMUX, reason="tmux is not installed (scripts/deps-extra.txt)")
def test_cli_terminal_progress_and_ctrl_c(make_server, tmp_path):
    """A throttled pull in a real terminal: one bar, redrawn in place, with
    bytes, rate and ETA; Ctrl-C cancels the job (exit 1), Ctrl-C twice
    leaves it running (exit 130). With stdout a pipe: plain lines, at most
    one a second."""
    hub, url = hub_with(tmp_path, {"slow": 3 << 20, "plain": 1200 << 10, "gone": 2 << 20},
                        "--slow", "400000")
    try:
        srv = make_server(args=["--hub-endpoint", url])
        term = Tmux(tmp_path)
        try:
            env = "ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 MODELPREP_URL=%s" % srv.base
            cmd = "%s %s pull acme/slow --connections 1; echo EXIT=$?" % (env, tool("modelprep"))
            term.send(cmd, "Enter")
            # the bar moves, and stays one line: it is redrawn, not reprinted
            s1 = term.wait_for(lambda s: "ETA" in s and "/s" in s and "%" in s)
            bar1 = [ln for ln in s1.splitlines() if ln.startswith("download acme/slow")]
            assert len(bar1) == 1 and "MiB" in bar1[0] and "[#" in bar1[0], s1
            s2 = term.wait_for(lambda s: [ln for ln in s.splitlines()
                                          if ln.startswith("download acme/slow")] != bar1)
            assert len([ln for ln in s2.splitlines() if ln.startswith("download acme/slow")]) == 1, s2
            assert all(len(ln) <= 120 for ln in s2.splitlines())
            jid = job_id_on(s2)
            # Ctrl-C: the server cancels it, the client sees it end: exit 1
            term.send("C-c")
            s3 = term.wait_for(lambda s: re.search(r"EXIT=\d", s))
            assert "cancelling job " + jid in s3 and "cancel requested" in s3, s3
            assert "EXIT=1" in s3 and "cancelled" in s3, s3
            assert srv.get("/v1/jobs/" + jid)[1]["state"] == "cancelled"

            # twice: the client leaves, the job goes on to the end
            term.send("clear", "Enter")
            term.send(cmd, "Enter")
            s = term.wait_for(lambda s: "ETA" in s and not re.search(r"EXIT=\d", s))
            jid2 = job_id_on(s)
            term.send("C-c")
            term.wait_for(lambda s: "cancelling job" in s)
            term.send("C-c")
            s4 = term.wait_for(lambda s: re.search(r"EXIT=\d", s))
            assert "EXIT=130" in s4 and "left job %s running" % jid2 in s4, s4
            assert "modelprep watch " + jid2 in s4 and "cancel requested" not in s4
        finally:
            term.close()
        assert srv.wait_job(jid2, timeout=60)["state"] == "succeeded"

        # not a terminal: plain lines, no escapes, at most about one a second
        t0 = time.time()
        p = run(srv, "pull", "acme/plain", "--connections", "1", "--revision", "main")
        took = time.time() - t0
        assert p.returncode == 0, p.stderr
        assert "\x1b" not in p.stdout and "\r" not in p.stdout
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("download acme/plain")]
        moving = [ln for ln in lines if "%" in ln and "/s" in ln]
        assert moving and len(lines) <= took + 3, (took, p.stdout)
        assert len(set(lines)) == len(lines)
        assert "next model: acme/plain" in p.stdout
        # cancel: a detached pull, cancelled by id; watch sees it end cancelled
        p = run(srv, "--detach", "pull", "acme/gone", "--connections", "1")
        assert p.returncode == 0, p.stderr
        gone = p.stdout.strip()
        p = run(srv, "cancel", gone)
        assert p.returncode == 0 and "cancelling " + gone in p.stdout, p.stderr
        p = run(srv, "watch", gone)
        assert p.returncode == 1 and "job %s cancelled" % gone in p.stderr, p.stderr
        assert js(run(srv, "watch", gone, "--json"))["state"] == "cancelled"

        p = run(srv, "ls")
        assert any(ln.startswith("acme/slow ") and " hub " in ln for ln in p.stdout.splitlines())
        assert run(srv, "rm", "acme/slow").returncode == 0
        assert run(srv, "rm", "acme/slow").returncode == 1
    finally:
        stop_hub(hub)


Y = {"id": "j_y", "type": "verify", "model": "m", "state": "queued"}


class Hostile(http.server.BaseHTTPRequestHandler):
    """Answers like modelprepd, badly: events that are not JSON, one event
    line of 20 MiB, a list that is not JSON."""
    protocol_version = "HTTP/1.0"
    y_streams = 0

    def log_message(self, *a):
        pass

    def send(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/openapi.json":
            self.send(200, json.dumps({"components": {"schemas": {
                "Params_verify": {"type": "object", "properties": {}}}}}).encode())
        elif self.path == "/v1/models":
            self.send(200, b"{\"models\": [1, 2,")
        elif self.path == "/v1/jobs/j_x/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"event: progress\ndata: {not json\n\n")
            self.wfile.write(b"event: log\ndata: " + b"x" * (20 << 20) + b"\n\n")
            self.wfile.write(b"event: state\r\ndata: [1,2]\r\n\r\n")
            self.wfile.write(b"event: " + b"k" * 5000 + b"\ndata: {}\n\n")
            self.wfile.write(b"\x00\xff\xfe garbage without a newline")
            # the stream ends before the job did: the client asks for the job
        elif self.path == "/v1/jobs/j_y/events":
            # dropped after one log, then replayed from the start: the
            # client prints each log once
            Hostile.y_streams += 1
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'event: log\ndata: {"level":"info","message":"first log"}\n\n')
            if Hostile.y_streams > 1:
                self.wfile.write(b'event: log\ndata: {"level":"info","message":"second log"}\n\n')
                self.wfile.write(b'event: state\ndata: ' + json.dumps(
                    dict(Y, state="succeeded", result={"ok": True})).encode() + b"\n\n")
        elif self.path == "/v1/jobs/j_y":
            self.send(200, json.dumps(dict(Y, state="running")).encode())
        elif self.path == "/v1/jobs/j_x":
            self.send(200, json.dumps({"id": "j_x", "type": "verify", "model": "m",
                                       "state": "failed", "error": {
                                           "code": "boom", "message": "it broke"}}).encode())
        else:
            self.send(404, b"{}")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        self.send(202, json.dumps({"id": "j_x", "type": "verify", "model": "m",
                                   "state": "queued"}).encode())


def test_cli_hostile_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        env = cli_env(None, MODELPREP_URL="http://127.0.0.1:%d" % httpd.server_address[1])
        p = run(None, "verify", "m", env=env)
        assert p.returncode == 1, (p.returncode, p.stderr)
        assert "boom: it broke" in p.stderr
        assert "oversized event line" in p.stdout + p.stderr
        assert "not JSON" in p.stderr
        p = run(None, "ls", env=env)
        assert p.returncode == 1 and "not JSON" in p.stderr, p.stderr
        # a stream that drops mid-job is reopened; replayed logs are not repeated
        p = run(None, "watch", "j_y", env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("first log") == 1 and p.stdout.count("second log") == 1, p.stdout
        assert Hostile.y_streams == 2
    finally:
        httpd.shutdown()
        httpd.server_close()
