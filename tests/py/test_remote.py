"""Remote model stores end to end, against real servers started here on
loopback: Debian's redis-server (read back with the redis-py client and
safetensors, the way SGLang's RedisConnector reads), and moto's standalone S3
server (written and read back with boto3). A small fault proxy in front of
moto injects 503 SlowDown, missing keys and connections cut mid-object, and
checks SigV4 signatures with botocore's signer, so a wrong secret is refused
the way S3 refuses it."""
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import tp_models as tm

redis = pytest.importorskip("redis")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.auth import S3SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402

VENV_BIN = os.path.dirname(__import__("sys").executable)
AK, SK, REGION = "AKIDMODELPREPTEST", "s3cr3t/modelprep+test", "us-east-1"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not start" % what)


# --- Redis ------------------------------------------------------------------

class RedisServer:
    def __init__(self, tmp, password=None, extra=()):
        if not shutil.which("redis-server"):
            pytest.skip("redis-server is not installed (scripts/deps.sh installs it)")
        self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(tmp)]
        if password:
            args += ["--requirepass", password]
        args += list(extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "redis-server")
        self.client = redis.Redis(host="127.0.0.1", port=self.port, password=password)

    def url(self, name, auth=""):
        return "redis://%s127.0.0.1:%d/%s" % (auth, self.port, name)

    def stop(self):
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path):
    servers = []

    def make(password=None, extra=()):
        d = tmp_path / ("redis%d" % len(servers))
        d.mkdir()
        servers.append(RedisServer(d, password, extra))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def sglang_read_rank(client, model, rank):
    """What SGLang's RedisConnector.weight_iterator yields for a rank: SCAN
    MATCH {model}/keys/rank_{r}/*, each value through safetensors' load."""
    prefix = "%s/keys/rank_%d/" % (model, rank)
    out = {}
    for key in client.scan_iter(match=prefix + "*"):
        val = client.get(key)
        out[key.decode()[len(prefix):]] = val
    return out


def check_value(name, val, want_raw):
    """A value is safetensors.torch.save({"tensor_bytes": t}), byte for byte,
    and t's bytes are what the rank must hold."""
    (n,) = struct.unpack("<Q", val[:8])
    hdr = json.loads(val[8:8 + n])
    assert list(hdr) == ["tensor_bytes"], (name, hdr)
    t = st_load(bytes(val))["tensor_bytes"]
    assert st_save({"tensor_bytes": t}) == val, name
    assert list(t.shape) == list(want_raw.shape[:-1]), (name, list(t.shape), want_raw.shape)
    assert val[8 + n:] == want_raw.tobytes(), name


def read_source(d):
    src = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            src.update(tm.read_raw(os.path.join(d, f)))
    return src


@pytest.mark.parametrize("arch,tp", [("llama", 1), ("llama", 2), ("qwen3_moe", 2),
                                     ("qwen2", 4)])
def test_redis_publish_sglang_layout(make_server, model_root, redis_server, arch, tp):
    cfg = tm.make_config(arch)
    d = model_root / arch
    tm.write_model(str(d), cfg, tm.make_state(cfg, seed=tp), files=2)
    r = redis_server()
    s = make_server(args=["--model-root", str(model_root)])
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": r.url("org/" + arch), "tp_size": tp}})
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert res["tp_size"] == tp and res["naming"] == "sglang"
    assert res["url"] == r.url("org/" + arch)
    src = read_source(str(d))
    total = 0
    for rank in range(tp):
        got = sglang_read_rank(r.client, "org/" + arch, rank)
        want = tm.expected_rank(cfg, src, tp, rank, "sglang")
        assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
        for name, a in want.items():
            check_value(name, got[name], a)
            total += a.nbytes
        assert res["ranks"][rank]["tensors"] == len(want)
    assert res["bytes"] == total
    assert not r.client.exists("org/%s/keys/rank_%d/model.norm.weight" % (arch, tp))
    # the text files, as SGLang's pull_files_from_db reads them back
    for f in ("config.json", "tokenizer_config.json", "generation_config.json",
              "model.safetensors.index.json"):
        assert r.client.get("org/%s/files/%s" % (arch, f)) == (d / f).read_bytes(), f
    # nothing staged is left behind
    assert [k for k in r.client.scan_iter(match="*.tmp-*")] == []


def test_redis_publish_hf_names_overwrite_and_binary_files(make_server, model_root,
                                                           redis_server):
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    (d / "tokenizer.model").write_bytes(b"\x00\xff\xfe sentencepiece")
    (d / "original").mkdir()
    (d / "original" / "config.json").write_text("{\"deeper\": 1}")
    (d / "original" / "params.json").write_text("{\"dim\": 8}")
    r = redis_server()
    s = make_server(args=["--model-root", str(model_root)])
    url = r.url("m")
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": url, "naming": "hf"}})
    assert job["state"] == "succeeded", job
    src = read_source(str(d))
    got = sglang_read_rank(r.client, "m", 0)
    assert sorted(got) == sorted(src)
    for name, (dt, shape, a) in src.items():
        check_value(name, got[name], a)
    assert sorted(job["result"]["skipped_files"], key=lambda x: x["name"]) == [
        {"name": "config.json", "reason": "a file nearer the top has this name"},
        {"name": "tokenizer.model", "reason": "not UTF-8 text"}]
    assert not r.client.exists("m/files/tokenizer.model")
    # SGLang keys files by base name: the top-level config wins
    assert r.client.get("m/files/config.json") == (d / "config.json").read_bytes()
    assert r.client.get("m/files/params.json") == b"{\"dim\": 8}"
    # again: refused unless overwrite
    job = s.run_job({"type": "publish", "model": str(d), "params": {"url": url}})
    assert job["state"] == "failed" and job["error"]["code"] == "output_exists", job
    assert sorted(sglang_read_rank(r.client, "m", 0)) == sorted(src)
    # overwrite with tp 2 sglang names: no key of the old model survives
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": url, "tp_size": 2, "overwrite": True}})
    assert job["state"] == "succeeded", job
    keys = sorted(k.decode() for k in r.client.scan_iter(match="m/*"))
    assert not [k for k in keys if k.endswith("q_proj.weight")]
    assert any(k.startswith("m/keys/rank_1/") and k.endswith("qkv_proj.weight") for k in keys)
    assert len(keys) == job["result"]["keys"]


def test_redis_auth(make_server, model_root, redis_server, tmp_path):
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    r = redis_server(password="pa ss:w@rd")
    pwfile = tmp_path / "redis.pw"
    pwfile.write_text("pa ss:w@rd\n")
    s = make_server(args=["--model-root", str(model_root)])
    job = s.run_job({"type": "publish", "model": str(d), "params": {"url": r.url("a")}})
    assert job["state"] == "failed" and job["error"]["code"] == "unauthorized", job
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": r.url("a", ":wrong@")}})
    assert job["state"] == "failed" and job["error"]["code"] == "unauthorized", job
    assert "wrong" not in json.dumps(job["error"])
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": r.url("a", ":pa%20ss%3Aw%40rd@")}})
    assert job["state"] == "succeeded", job
    s2 = make_server(args=["--model-root", str(model_root), "--redis-password-file",
                           str(pwfile)])
    job = s2.run_job({"type": "publish", "model": str(d), "params": {"url": r.url("b")}})
    assert job["state"] == "succeeded", job
    assert r.client.exists("b/keys/rank_0/model.norm.weight")
    assert "pa ss" not in s.logs() + s2.logs()


def test_publish_rejects_bad_requests(make_server, model_root):
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    s = make_server(args=["--model-root", str(model_root)])
    bad = [
        {"url": "redis://127.0.0.1:6379/"},
        {"url": "redis://127.0.0.1:99999/m"},
        {"url": "redis://127.0.0.1/m*"},
        {"url": "ftp://x/y"},
        {"url": "s3://Bad_Bucket/x"},
        {"url": "s3://bucket/../x"},
        {"url": "s3://bucket"},
        {"url": "redis://127.0.0.1/m", "tp_size": 3},  # 8 heads
        {"url": "redis://127.0.0.1/m", "endpoint": "http://x"},
        {"url": "s3://bucket/x", "tp_size": 2},
        {"url": "s3://bucket/x", "endpoint": "ftp://x"},
        {},
    ]
    for p in bad:
        st, doc = s.post("/v1/jobs", {"type": "publish", "model": str(d), "params": p})
        assert st == 400, (p, st, doc)
    st, doc = s.post("/v1/jobs", {"type": "inspect", "model": "redis://127.0.0.1/m"})
    assert st == 400 and doc["errors"][0]["field"] == "model", doc
    st, doc = s.post("/v1/jobs", {"type": "inspect", "model": "s3://bucket/not/here"})
    assert st == 400 and doc["errors"][0]["code"] == "not_cached", doc
    st, doc = s.post("/v1/jobs", {"type": "warm_load", "model": "redis://u:p@127.0.0.1/m"})
    assert st == 400, doc


def test_redis_unreachable(make_server, model_root):
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    s = make_server(args=["--model-root", str(model_root)])
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": "redis://127.0.0.1:%d/m" % free_port()}})
    assert job["state"] == "failed" and job["error"]["code"] == "remote_unavailable", job


# --- S3 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    exe = os.path.join(VENV_BIN, "moto_server")
    if not os.path.exists(exe):
        pytest.skip("moto[server] is not installed (scripts/requirements.txt)")
    port = free_port()
    log = open(str(tmp_path_factory.mktemp("moto") / "moto.log"), "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    wait_port(port, proc, "moto_server")
    yield port
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def s3client(port):
    return boto3.client("s3", endpoint_url="http://127.0.0.1:%d" % port,
                        aws_access_key_id=AK, aws_secret_access_key=SK, region_name=REGION)


_bucket_n = [0]


def new_bucket(port):
    _bucket_n[0] += 1
    name = "models-%d-%d" % (os.getpid() % 10000, _bucket_n[0])
    s3client(port).create_bucket(Bucket=name)
    return name


class FaultProxy:
    """HTTP/1.1 proxy in front of moto. Records every request; `faults` is
    a list of callables (method, path) -> None or an action:
    ("status", code, s3_code) answers with an S3 error; ("cut", n) forwards
    but closes the connection after n body bytes; ("header", name, value)
    forwards with that response header replaced; ("body", f) forwards f(body)
    instead of the body (with its length); ("stall", n, event) sends the
    headers and n body bytes, then waits for the event. With `secret`, each
    request's SigV4 signature is recomputed with botocore's signer and a
    mismatch is answered 403 SignatureDoesNotMatch, as S3 does."""

    def __init__(self, upstream, secret=None):
        self.upstream = upstream
        self.secret = secret
        self.faults = []
        self.log = []
        self.lock = threading.Lock()
        proxy = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with proxy.lock:
                    proxy.log.append((self.command, self.path, dict(self.headers), body))
                action = None
                for f in list(proxy.faults):
                    action = f(self.command, self.path)
                    if action:
                        break
                if proxy.secret and not proxy.signature_ok(self, body):
                    action = ("status", 403, "SignatureDoesNotMatch")
                if action and action[0] == "status":
                    xml = ("<?xml version=\"1.0\"?><Error><Code>%s</Code><Message>injected"
                           "</Message></Error>" % action[2]).encode()
                    self.send_response(action[1])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                c = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                hdrs = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                c.request(self.command, self.path, body=body or None, headers=hdrs)
                r = c.getresponse()
                data = r.read()
                if action and action[0] == "body":
                    data = action[1](data)
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if action and action[0] == "header" and k.lower() == action[1].lower():
                        v = action[2]
                    if k.lower() not in ("content-length", "connection", "transfer-encoding",
                                         "server", "date"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the object's length
                self.send_header("Content-Length", r.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    if action and action[0] == "stall":
                        self.wfile.write(data[:action[1]])
                        self.wfile.flush()
                        action[2].wait(60)
                        self.close_connection = True
                    elif action and action[0] == "cut":
                        self.wfile.write(data[:action[1]])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    else:
                        self.wfile.write(data)
                c.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def signature_ok(self, h, body):
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return False
        fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
        signed = fields["SignedHeaders"].split(";")
        if "host" not in signed or "x-amz-date" not in signed or \
                "x-amz-content-sha256" not in signed:
            return False
        if h.headers.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
            return False
        return fields["Signature"] == expected_signature(
            h.command, "http://%s%s" % (h.headers["Host"], h.path), h.headers, signed,
            self.secret)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def expected_signature(method, url, headers, signed, secret):
    req = AWSRequest(method=method, url=url,
                     headers={k: headers[k] for k in signed})
    req.context["timestamp"] = headers["x-amz-date"]
    auth = S3SigV4Auth(Credentials(AK, secret), "s3", REGION)
    return auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req)


@pytest.fixture
def proxy(moto):
    made = []

    def make(secret=None):
        made.append(FaultProxy(moto, secret))
        return made[-1]

    yield make
    for p in made:
        p.stop()


def s3_env(port):
    return {"AWS_ACCESS_KEY_ID": AK, "AWS_SECRET_ACCESS_KEY": SK, "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": "http://127.0.0.1:%d" % port}


def upload_model(port, bucket, prefix, d, multipart_file=None):
    """boto3 puts the model folder under prefix; multipart_file (a name in d)
    goes up as a 3-part multipart upload."""
    c = s3client(port)
    for f in sorted(os.listdir(d)):
        cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20) \
            if f == multipart_file else TransferConfig(multipart_threshold=1 << 30)
        c.upload_file(os.path.join(d, f), bucket, "%s/%s" % (prefix, f), Config=cfg)


def no_temp(s):
    """Nothing left in <data>/remote/.tmp (which a ranged load never makes)."""
    t = os.path.join(s.data_dir, "remote", ".tmp")
    return not os.path.exists(t) or not os.listdir(t)


def local_copy(s, bucket, prefix):
    return os.path.join(s.data_dir, "remote", "s3", bucket, prefix)


def test_s3_download_matches_boto3_uploads(make_server, model_root, moto, tmp_path):
    cfg = tm.make_config("llama", hidden=512, inter=1536, vocab=4000)
    d = model_root / "llama"
    tm.write_model(str(d), cfg, tm.make_state(cfg), files=2)
    (d / "big.safetensors.extra").write_bytes(os.urandom(12 << 20))  # 3 parts of 5 MiB
    (d / "pytorch_model.bin").write_bytes(b"not chosen: safetensors win")
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "org/llama/v1", str(d), multipart_file="big.safetensors.extra")
    etag = s3client(moto).head_object(Bucket=bucket, Key="org/llama/v1/big.safetensors.extra")
    assert etag["ETag"].strip('"').endswith("-3")  # really multipart
    s = make_server(args=["--model-root", str(model_root)], env=s3_env(moto))
    model = "s3://%s/org/llama/v1" % bucket
    job = s.run_job({"type": "download", "model": model,
                     "params": {"chunk_bytes": 1 << 20, "connections": 4}})
    assert job["state"] == "succeeded", job
    out = local_copy(s, bucket, "org/llama/v1")
    assert job["result"]["path"] == out
    names = sorted(f["name"] for f in job["result"]["files"])
    want = sorted(f for f in os.listdir(d) if f != "pytorch_model.bin")
    assert names == want
    assert not os.path.exists(os.path.join(out, "pytorch_model.bin"))
    for f in job["result"]["files"]:
        data = open(os.path.join(out, f["name"]), "rb").read()
        assert data == (d / f["name"]).read_bytes(), f["name"]
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
    assert job["result"]["requests"] > 12 + 2  # ranged GETs of 1 MiB
    # usable as a model by other jobs
    job2 = s.run_job({"type": "inspect", "model": model})
    assert job2["state"] == "succeeded", job2
    assert job2["result"]["architecture"] == "LlamaForCausalLM"
    # again: nothing changed, nothing fetched
    job3 = s.run_job({"type": "download", "model": model})
    assert job3["state"] == "succeeded", job3
    assert job3["result"]["bytes_downloaded"] == 0
    assert all(f["reused"] for f in job3["result"]["files"])
    # an object replaced upstream is fetched again
    s3client(moto).put_object(Bucket=bucket, Key="org/llama/v1/config.json",
                              Body=json.dumps(cfg).encode() + b" ")
    job4 = s.run_job({"type": "download", "model": model})
    assert job4["state"] == "succeeded", job4
    assert job4["result"]["bytes_downloaded"] == len(json.dumps(cfg)) + 1
    assert open(os.path.join(out, "config.json"), "rb").read().endswith(b"} ")
    assert no_temp(s)


def test_s3_download_pages_over_1000_keys(make_server, moto):
    bucket = new_bucket(moto)
    c = s3client(moto)
    bodies = {"f/%04d.txt" % i: ("object %d\n" % i).encode() for i in range(1105)}

    def put(keys):
        cc = s3client(moto)
        for k in keys:
            cc.put_object(Bucket=bucket, Key="many/" + k, Body=bodies[k])

    keys = sorted(bodies)
    ths = [threading.Thread(target=put, args=(keys[i::8],)) for i in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert c.list_objects_v2(Bucket=bucket, Prefix="many/")["IsTruncated"]
    s = make_server(env=s3_env(moto))
    job = s.run_job({"type": "download", "model": "s3://%s/many" % bucket,
                     "params": {"load_format": "all", "connections": 16}}, timeout=300)
    assert job["state"] == "succeeded", job
    out = local_copy(s, bucket, "many")
    got = {}
    for root, _, files in os.walk(out):
        for f in files:
            if not f.startswith("."):
                p = os.path.join(root, f)
                got[os.path.relpath(p, out)] = open(p, "rb").read()
    assert got == bodies


def test_s3_faults(make_server, model_root, moto, proxy):
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "m", str(d))
    p = proxy()
    s = make_server(env=dict(s3_env(moto), AWS_ENDPOINT_URL="http://127.0.0.1:%d" % p.port))
    model = "s3://%s/m" % bucket
    out = local_copy(s, bucket, "m")

    # 503 SlowDown for the first 4 GETs of the weights: retried, succeeds
    n503 = [0]

    def slow(method, path):
        if method == "GET" and "model.safetensors" in path and n503[0] < 4:
            n503[0] += 1
            return ("status", 503, "SlowDown")

    p.faults = [slow]
    job = s.run_job({"type": "download", "model": model})
    assert job["state"] == "succeeded", job
    assert job["result"]["retries"] >= 4 and n503[0] == 4
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == \
        (d / "model.safetensors").read_bytes()
    shutil.rmtree(out)

    # a connection cut mid-object, once: retried from the range's start
    cut = [0]

    def cutter(method, path):
        if method == "GET" and "model.safetensors" in path and cut[0] < 1:
            cut[0] += 1
            return ("cut", 1000)

    p.faults = [cutter]
    job = s.run_job({"type": "download", "model": model})
    assert job["state"] == "succeeded", job
    assert cut[0] == 1 and job["result"]["retries"] >= 1
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == \
        (d / "model.safetensors").read_bytes()
    shutil.rmtree(out)

    # a store that keeps failing: a clear error, nothing published
    p.faults = [lambda m, path: ("status", 503, "SlowDown") if "model.safe" in path else None]
    job = s.run_job({"type": "download", "model": model, "params": {"max_retries": 2}})
    assert job["state"] == "failed" and job["error"]["code"] == "remote_unavailable", job
    assert "SlowDown" in job["error"]["message"]
    assert not os.path.exists(out)
    p.faults = [lambda m, path: ("cut", 10) if "model.safe" in path else None]
    job = s.run_job({"type": "download", "model": model, "params": {"max_retries": 1}})
    assert job["state"] == "failed" and job["error"]["code"] == "remote_unavailable", job
    assert not os.path.exists(out)

    # a key listed but gone when fetched
    p.faults = [lambda m, path: ("status", 404, "NoSuchKey")
                if m == "GET" and "config.json" in path else None]
    job = s.run_job({"type": "download", "model": model})
    assert job["state"] == "failed" and job["error"]["code"] == "not_found", job
    assert "config.json" in job["error"]["message"]
    assert not os.path.exists(out)
    assert no_temp(s)

    # the store's own SHA-256 (x-amz-checksum-sha256) is compared with what
    # arrived; a HEAD that disagrees, or a changed ETag, fails the job
    c = s3client(moto)
    big = os.urandom(3 << 20)
    c.put_object(Bucket=bucket, Key="ck/model.safetensors.x", Body=big,
                 ChecksumAlgorithm="SHA256")
    c.put_object(Bucket=bucket, Key="ck/config.json", Body=b"{}")
    p.faults = []
    ck = "s3://%s/ck" % bucket
    job = s.run_job({"type": "download", "model": ck, "params": {"load_format": "all"}})
    assert job["state"] == "succeeded", job
    f = [x for x in job["result"]["files"] if x["name"] == "model.safetensors.x"][0]
    assert f["store_checksum"] is True and f["sha256"] == hashlib.sha256(big).hexdigest()
    shutil.rmtree(local_copy(s, bucket, "ck"))
    p.faults = [lambda m, path: ("header", "x-amz-checksum-sha256", "A" * 43 + "=")
                if m == "HEAD" and path.endswith("model.safetensors.x") else None]
    job = s.run_job({"type": "download", "model": ck, "params": {"load_format": "all"}})
    assert job["state"] == "failed" and job["error"]["code"] == "checksum_mismatch", job
    assert not os.path.exists(local_copy(s, bucket, "ck"))
    p.faults = [lambda m, path: ("header", "ETag", '"0123456789abcdef0123456789abcdef"')
                if m == "HEAD" and path.endswith("model.safetensors.x") else None]
    job = s.run_job({"type": "download", "model": ck, "params": {"load_format": "all"}})
    assert job["state"] == "failed" and job["error"]["code"] == "changed_during_download", job
    assert not os.path.exists(local_copy(s, bucket, "ck"))

    # an empty prefix, a missing bucket
    p.faults = []
    job = s.run_job({"type": "download", "model": "s3://%s/nothing/here" % bucket})
    assert job["state"] == "failed" and job["error"]["code"] == "not_found", job
    job = s.run_job({"type": "download", "model": "s3://no-such-bucket-x/m"})
    assert job["state"] == "failed" and job["error"]["code"] == "not_found", job
    assert "does not exist" in job["error"]["message"]


def test_s3_signatures_checked(make_server, model_root, moto, proxy, tmp_path):
    """Our SigV4 signatures are the ones botocore computes for the same
    requests (GET with ranges, listing queries, PUT bodies, multipart); a
    wrong secret is refused as 'unauthorized'."""
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    (d / "blob.bin2").write_bytes(os.urandom(6 << 20))
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "m", str(d))
    p = proxy(secret=SK)
    ep = "http://127.0.0.1:%d" % p.port
    s = make_server(args=["--model-root", str(model_root)], env=dict(s3_env(moto),
                                                                     AWS_ENDPOINT_URL=ep))
    job = s.run_job({"type": "download", "model": "s3://%s/m" % bucket})
    assert job["state"] == "succeeded", job
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": "s3://%s/pub/m" % bucket, "part_bytes": 5 << 20}})
    assert job["state"] == "succeeded", job
    methods = {(m, "uploadId" in path, "uploads" in path) for m, path, _, _ in p.log}
    assert ("PUT", True, False) in methods and ("POST", False, True) in methods
    # the manifest is the last object written, after the completed upload
    writes = [(m, path) for m, path, _, _ in p.log if m in ("PUT", "POST")]
    assert writes[-1][0] == "PUT" and writes[-1][1].endswith("/pub/m/modelprep-manifest.json")
    assert any(m == "POST" and "uploadId=" in path for m, path in writes[:-1])
    # a credentials file with the wrong secret
    creds = tmp_path / "creds"
    creds.write_text("[default]\naws_access_key_id = %s\naws_secret_access_key = nope\n" % AK)
    s2 = make_server(args=["--s3-credentials-file", str(creds)],
                     env={"AWS_ENDPOINT_URL": ep, "AWS_ACCESS_KEY_ID": "",
                          "AWS_SECRET_ACCESS_KEY": ""})
    job = s2.run_job({"type": "download", "model": "s3://%s/m" % bucket})
    assert job["state"] == "failed" and job["error"]["code"] == "unauthorized", job
    assert "nope" not in json.dumps(job) and "nope" not in s2.logs()
    assert SK not in s.logs()


def test_s3_virtual_hosted_addressing(make_server, model_root, moto, proxy):
    """AWS_S3_ADDRESSING_STYLE=virtual (botocore's addressing_style): every
    request goes to <bucket>.localhost:<port> (libcurl resolves *.localhost
    to loopback) with the bucket out of the path, and is signed as botocore
    signs that virtual-hosted request (the proxy recomputes each signature
    with botocore's S3SigV4Auth and refuses a mismatch). Download, ranged
    warm_load and publish all work so; a job's addressing overrides it."""
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "m", str(d))
    p = proxy(secret=SK)
    ep = "http://localhost:%d" % p.port
    vhost = "%s.localhost:%d" % (bucket, p.port)
    s = make_server(args=["--model-root", str(model_root)],
                    env=dict(s3_env(moto), AWS_ENDPOINT_URL=ep, AWS_S3_ADDRESSING_STYLE="virtual"))
    model = "s3://%s/m" % bucket

    def hosts():
        got = {(h.get("Host"), path.startswith("/%s" % bucket)) for _, path, h, _ in p.log}
        p.log.clear()
        return got

    job = s.run_job({"type": "download", "model": model})
    assert job["state"] == "succeeded", job
    assert hosts() == {(vhost, False)}
    for f in os.listdir(d):
        assert open(os.path.join(local_copy(s, bucket, "m"), f), "rb").read() == \
            (d / f).read_bytes()
    job = s.run_job({"type": "warm_load", "model": "s3://%s/m" % bucket,
                     "params": {"keep_resident": False, "s3_read": "ranged"}})
    assert job["state"] == "succeeded", job  # the copy: no requests
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": "s3://%s/pub/m" % bucket}})
    assert job["state"] == "succeeded", job
    assert hosts() == {(vhost, False)}
    assert s3client(moto).get_object(Bucket=bucket, Key="pub/m/model.safetensors")["Body"] \
        .read() == (d / "model.safetensors").read_bytes()
    # streamed from the store, virtual-hosted; then path-style for one job
    job = s.run_job({"type": "warm_load", "model": "s3://%s/pub/m" % bucket,
                     "params": {"keep_resident": False}})
    assert job["state"] == "succeeded" and job["result"]["remote"]["mode"] == "ranged", job
    assert hosts() == {(vhost, False)}
    job = s.run_job({"type": "warm_load", "model": "s3://%s/pub/m" % bucket,
                     "params": {"keep_resident": False, "addressing": "path"}})
    assert job["state"] == "succeeded", job
    assert hosts() == {("localhost:%d" % p.port, True)}
    # addressing is for s3:// models only
    st, doc = s.post("/v1/jobs", {"type": "warm_load", "model": str(d),
                                  "params": {"addressing": "virtual"}})
    assert st == 400 and doc["errors"][0]["code"] == "param_conflict", doc


def test_s3_publish_read_back_by_boto3(make_server, model_root, moto):
    cfg = tm.make_config("llama", hidden=512, inter=1536, vocab=4000)
    d = model_root / "llama"
    tm.write_model(str(d), cfg, tm.make_state(cfg), files=2)
    (d / "sub").mkdir()
    (d / "sub" / "big.dat").write_bytes(os.urandom(11 << 20 | 12345))
    bucket = new_bucket(moto)
    s = make_server(args=["--model-root", str(model_root)], env=s3_env(moto))
    url = "s3://%s/pub/llama" % bucket
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": url, "part_bytes": 5 << 20, "connections": 3}})
    assert job["state"] == "succeeded", job
    c = s3client(moto)
    listed = {o["Key"]: o for o in c.list_objects_v2(Bucket=bucket, Prefix="pub/llama/")
              ["Contents"]}
    files = [os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs]
    assert sorted(listed) == sorted(["pub/llama/" + f for f in files] +
                                    ["pub/llama/modelprep-manifest.json"])
    for f in files:
        body = c.get_object(Bucket=bucket, Key="pub/llama/" + f)["Body"].read()
        assert body == (d / f).read_bytes(), f
    big = c.head_object(Bucket=bucket, Key="pub/llama/sub/big.dat")
    assert big["ETag"].strip('"').endswith("-3")
    man = json.loads(c.get_object(Bucket=bucket, Key="pub/llama/modelprep-manifest.json")
                     ["Body"].read())
    assert man["source_model"] == str(d)
    for f in man["files"]:
        assert f["sha256"] == hashlib.sha256((d / f["name"]).read_bytes()).hexdigest()
    # the manifest is not older than any object (the proxy test checks the order exactly)
    man_t = listed["pub/llama/modelprep-manifest.json"]["LastModified"]
    assert all(o["LastModified"] <= man_t for o in listed.values())
    job = s.run_job({"type": "publish", "model": str(d), "params": {"url": url}})
    assert job["state"] == "failed" and job["error"]["code"] == "output_exists", job
    # and what was published downloads again, identical
    job = s.run_job({"type": "download", "model": url, "params": {"load_format": "all"}})
    assert job["state"] == "succeeded", job
    out = local_copy(s, bucket, "pub/llama")
    for f in files:
        assert open(os.path.join(out, f), "rb").read() == (d / f).read_bytes(), f


# --- warm_load from redis:// --------------------------------------------------

def test_warm_load_from_redis(make_server, model_root, redis_server):
    """Publish at tp 2, then warm_load redis://.../m at tp 2 onto two host
    devices: each device holds exactly its rank's tensors (sha256 read back
    from the device), nothing is left in the data dir, and what is not
    SGLang's layout fails with a clear error."""
    cfg = tm.make_config("qwen3_moe")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    r = redis_server()
    s = make_server(args=["--model-root", str(model_root), "--devices", "host:2"])
    job = s.run_job({"type": "publish", "model": str(d),
                     "params": {"url": r.url("fleet/m"), "tp_size": 2}})
    assert job["state"] == "succeeded", job
    job = s.run_job({"type": "warm_load", "model": r.url("fleet/m"),
                     "params": {"tp_size": 2}})
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert res["load_format"] == "sharded_state"
    assert [x["rank"] for x in res["remote"]["ranks"]] == [0, 1]
    src = read_source(str(d))
    st, doc = s.get("/v1/residents/%s/digest" % res["resident_id"])
    assert st == 200, doc
    got = {(t["name"], t["rank"]): t["sha256"] for t in doc["tensors"]}
    want = {}
    for rank in range(2):
        for name, a in tm.expected_rank(cfg, src, 2, rank, "sglang").items():
            want[(name, rank)] = hashlib.sha256(a.tobytes()).hexdigest()
    assert got == want
    assert no_temp(s)
    # a dtype cast on the way, as for any checkpoint
    job = s.run_job({"type": "warm_load", "model": r.url("fleet/m"),
                     "params": {"tp_size": 2, "dtype": "fp32", "keep_resident": False}})
    assert job["state"] == "succeeded", job
    assert job["result"]["bytes"] > res["bytes"]
    # wrong tp: published for 2 ranks
    job = s.run_job({"type": "warm_load", "model": r.url("fleet/m"), "params": {"tp_size": 1}})
    assert job["state"] == "failed" and job["error"]["code"] == "bad_request", job
    # nothing there
    job = s.run_job({"type": "warm_load", "model": r.url("nothing")})
    assert job["state"] == "failed" and job["error"]["code"] == "not_found", job
    # hostile values: a truncated tensor, a value that is not safetensors
    key = "fleet/m/keys/rank_1/model.norm.weight"
    good = r.client.get(key)
    for bad in (good[:-2], b"\x10" + b"\x00" * 7 + b"{not json}", b"x"):
        r.client.set(key, bad)
        job = s.run_job({"type": "warm_load", "model": r.url("fleet/m"),
                         "params": {"tp_size": 2}})
        assert job["state"] == "failed" and job["error"]["code"] == "bad_model", job
        assert "model.norm.weight" in job["error"]["message"]
    r.client.set(key, good)
    st, doc = s.post("/v1/jobs", {"type": "warm_load", "model": r.url("fleet/m"),
                                  "params": {"load_format": "dummy"}})
    assert st == 400, doc
    assert no_temp(s)


def test_warm_load_from_s3_without_a_copy(make_server, model_root, moto):
    """warm_load s3://... with no download: the files are fetched into memory
    and loaded, each device gets its rank's slices, nothing lands on disk;
    after a download the local copy is used instead."""
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg, seed=3), files=2)
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "m", str(d))
    s = make_server(args=["--devices", "host:2"], env=s3_env(moto))
    model = "s3://%s/m" % bucket
    job = s.run_job({"type": "warm_load", "model": model, "params": {"tp_size": 2}})
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert res["load_format"] == "safetensors"
    # read by ranges: the weight files' headers and tensors, nothing else
    assert res["remote"]["mode"] == "ranged"
    assert sorted(f["name"] for f in res["remote"]["files"]) == \
        sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    src = read_source(str(d))
    st, doc = s.get("/v1/residents/%s/digest" % res["resident_id"])
    got = {(t["name"], t["rank"]): t["sha256"] for t in doc["tensors"]}
    want = {(n, rank): hashlib.sha256(a.tobytes()).hexdigest()
            for rank in range(2) for n, a in tm.expected_rank(cfg, src, 2, rank, "hf").items()}
    assert got == want
    assert res["source_reads"] >= 1 and res["remote"]["bytes_fetched"] > 0
    # the whole-file path (what pt/gguf models take) gives the same tensors
    job = s.run_job({"type": "warm_load", "model": model,
                     "params": {"tp_size": 2, "s3_read": "whole"}})
    assert job["state"] == "succeeded", job
    assert "mode" not in job["result"]["remote"]
    st, doc = s.get("/v1/residents/%s/digest" % job["result"]["resident_id"])
    assert {(t["name"], t["rank"]): t["sha256"] for t in doc["tensors"]} == want
    assert not os.path.exists(local_copy(s, bucket, "m"))
    assert no_temp(s)
    # a missing bucket: a clear error, nothing left
    job = s.run_job({"type": "warm_load", "model": "s3://no-such-bucket-y/m"})
    assert job["state"] == "failed" and job["error"]["code"] == "not_found", job
    assert no_temp(s)
    # with a downloaded copy, the copy is what loads (no requests to the store)
    assert s.run_job({"type": "download", "model": model})["state"] == "succeeded"
    job = s.run_job({"type": "warm_load", "model": model, "params": {"keep_resident": False}})
    assert job["state"] == "succeeded", job
    assert "remote" not in job["result"]


def test_s3_copies_are_listed_and_usable_by_url(make_server, model_root, moto):
    """A download from s3:// (here a nested prefix) is listed by GET
    /v1/models under its s3:// URL (kind and source "s3", the copy's path),
    and every job that works on local files takes that URL; temp folders and
    a prefix without a finished copy are not listed."""
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "team/llama-a", str(d))
    s = make_server(env=s3_env(moto))
    model = "s3://%s/team/llama-a" % bucket
    assert s.run_job({"type": "download", "model": model})["state"] == "succeeded"
    # a stray folder without the download's record is no model
    os.makedirs(os.path.join(s.data_dir, "remote", "s3", bucket, "half"))
    shutil.copy(str(d / "model.safetensors"), os.path.join(s.data_dir, "remote", "s3", bucket,
                                                            "half"))
    st, doc = s.get("/v1/models")
    assert st == 200, doc
    s3m = [m for m in doc["models"] if m["kind"] == "s3"]
    assert len(s3m) == 1, doc
    m = s3m[0]
    assert m["model"] == model and m["source"] == "s3" and m["inspection"] is None
    assert m["path"] == local_copy(s, bucket, "team/llama-a")
    assert m["formats"] == ["safetensors"] and m["size_bytes"] > 0
    for job in ({"type": "inspect", "model": model},
                {"type": "verify", "model": model},
                {"type": "shard", "model": model, "params": {"tp_size": 2}},
                {"type": "warm_load", "model": model, "params": {"keep_resident": False}}):
        j = s.run_job(job)
        assert j["state"] == "succeeded", j
    st, doc = s.get("/v1/models")
    m = [m for m in doc["models"] if m["model"] == model][0]
    assert m["inspection"] is not None


def vm_hwm(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def big_model(d, mib=256):
    """A safetensors file of `mib` MiB written by safetensors.torch: 4 MiB
    fp32 matrices plus 300 small vectors (bf16 and fp32), the small ones
    neighbours in the file so the loader can fetch them together."""
    g = torch.Generator().manual_seed(7)
    state = {"layers.%03d.weight" % i: torch.randn(1024, 1024, generator=g)
             for i in range((mib << 20) // (4 << 20) - 1)}
    for i in range(300):
        dt = torch.bfloat16 if i % 2 else torch.float32
        state["norms.%03d.weight" % i] = torch.randn(256, generator=g).to(dt)
    os.makedirs(d, exist_ok=True)
    from safetensors.torch import save_file
    save_file(state, os.path.join(d, "model.safetensors"))
    json.dump({"architectures": ["Unknown"]}, open(os.path.join(d, "config.json"), "w"))
    return {n: hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16
                              else t.numpy().tobytes()).hexdigest() for n, t in state.items()}


def resident_digests(s, rid):
    st, doc = s.get("/v1/residents/%s/digest" % rid)
    assert st == 200, doc
    return {t["name"]: t["sha256"] for t in doc["tensors"]}


def test_warm_load_from_s3_by_ranges_holds_only_the_ring(make_server, model_root, moto):
    """A 256 MiB model warm-loaded straight from S3 with a 16 MiB staging ring:
    the headers and tensors come by ranged GETs (small neighbours together),
    the resident's tensors are the file's, and host memory stays near the
    ring: the job's peak_host_bytes and the server's VmHWM both stay far
    below what the whole-file path holds (measured in the same test)."""
    d = str(model_root / "big")
    want = big_model(d)
    size = os.path.getsize(os.path.join(d, "model.safetensors"))
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "big", d)
    model = "s3://%s/big" % bucket
    params = {"staging_bytes": 16 << 20, "keep_resident": True}

    cfg = tm.make_config("llama")
    tm.write_model(str(model_root / "small"), cfg, tm.make_state(cfg))
    upload_model(moto, bucket, "small", str(model_root / "small"))
    s = make_server(env=s3_env(moto))
    # warm the process up (threads, curl, TLS tables) on a small model
    job = s.run_job({"type": "warm_load", "model": "s3://%s/small" % bucket,
                     "params": dict(params, keep_resident=False)})
    assert job["state"] == "succeeded", job
    hwm0 = vm_hwm(s.proc.pid)
    job = s.run_job({"type": "warm_load", "model": model, "params": params}, timeout=300)
    assert job["state"] == "succeeded", job
    res = job["result"]
    hwm = vm_hwm(s.proc.pid) - hwm0
    assert res["remote"]["mode"] == "ranged" and res["bytes"] > 250 << 20
    assert resident_digests(s, res["resident_id"]) == want
    # ring (16 MiB) + one slot per reader for batches: nowhere near the file
    assert res["peak_host_bytes"] <= (24 << 20), res
    # every GET was a range of at most a slot, and the 300 small tensors
    # came in a handful of requests
    slot = res["staging"]["slot_bytes"]
    assert res["source_reads"] < (size // slot) + 1 + 300 // 4, res
    assert res["remote"]["bytes_fetched"] <= size
    # the host "device" arena is the model (256 MiB) in this process; the
    # rest is the ring and the client's buffers (a whole-file path buffering
    # in the heap would add the file again)
    assert hwm < res["bytes"] + (64 << 20), (hwm, res["bytes"])

    # the whole-file path holds the file in memory (memfds) besides: the
    # peak_host_bytes bound above would fail for it
    s2 = make_server(env=s3_env(moto))
    job = s2.run_job({"type": "warm_load", "model": model,
                      "params": dict(params, s3_read="whole")}, timeout=300)
    assert job["state"] == "succeeded", job
    assert job["result"]["peak_host_bytes"] >= size
    assert resident_digests(s2, job["result"]["resident_id"]) == want


def test_warm_load_from_s3_by_ranges_refuses_hostile_answers(make_server, model_root, moto,
                                                            proxy):
    """A store that answers a range with fewer or more bytes, or with another
    Content-Range, or an object whose header length runs past its end: the
    job fails with a clear code, no resident is left, nothing on disk."""
    cfg = tm.make_config("llama")
    d = model_root / "m"
    tm.write_model(str(d), cfg, tm.make_state(cfg))
    bucket = new_bucket(moto)
    upload_model(moto, bucket, "m", str(d))
    c = s3client(moto)
    c.put_object(Bucket=bucket, Key="liar/model.safetensors",
                 Body=struct.pack("<Q", 1 << 20) + b'{"a":')
    c.put_object(Bucket=bucket, Key="huge/model.safetensors",
                 Body=struct.pack("<Q", 1 << 62) + b"{}")
    p = proxy()
    s = make_server(env=dict(s3_env(moto), AWS_ENDPOINT_URL="http://127.0.0.1:%d" % p.port))
    model = "s3://%s/m" % bucket

    def weights_get(fault):
        seen = [0]

        def f(method, path):
            # the tensors' GETs, not the 8-byte length's or the header's
            if method == "GET" and path.split("?")[0].endswith(".safetensors"):
                seen[0] += 1
                if seen[0] > 2:
                    return fault
        return f

    cases = [
        (("body", lambda b: b[:-1]), "bad_response", "bytes arrived"),
        (("body", lambda b: b + b"xx"), "bad_response", "longer than the range"),
        (("header", "Content-Range", "bytes 0-9/99999999"), "bad_response", "Content-Range"),
    ]
    for fault, code, words in cases:
        p.faults = [weights_get(fault)]
        job = s.run_job({"type": "warm_load", "model": model})
        assert job["state"] == "failed", job
        assert job["error"]["code"] == code and words in job["error"]["message"], job
    p.faults = []
    for prefix in ("liar", "huge"):
        job = s.run_job({"type": "warm_load", "model": "s3://%s/%s" % (bucket, prefix)})
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "bad_header", job
        assert "header length" in job["error"]["message"], job
    st, doc = s.get("/v1/residents")
    assert st == 200 and not doc["residents"], doc
    assert no_temp(s)
    # the same store, answering straight: loads
    assert s.run_job({"type": "warm_load", "model": model})["state"] == "succeeded"


def weights_gate(p, npass, stall=None):
    """A fault for proxy p: the first npass GETs of model.safetensors pass;
    the next sends `stall` bytes and then waits for the gate (without stall,
    it waits before answering), and so do the ones after it. Returns the
    fault, the gate and the list of paths asked for."""
    gate = threading.Event()
    passed = []

    def fault(method, path):
        if method == "GET" and path.endswith("model.safetensors"):
            with p.lock:
                passed.append(path)
                n = len(passed)
            if n == npass + 1 and stall:
                return ("stall", stall, gate)
            if n > npass:
                gate.wait(60)
        return None
    return fault, gate, passed


class GatedDownload:
    """A 12 MiB model.safetensors and a config.json under s3://<new>/r, a
    server whose store is proxy p with weights_gate(p, 4, stall) as its
    fault, and a download of it started (1 MiB ranges, one connection)."""

    def __init__(self, make_server, moto, p, tmp_path, stall=None):
        self.p = p
        self.bucket = new_bucket(moto)
        self.body = os.urandom(12 << 20)
        c = s3client(moto)
        c.put_object(Bucket=self.bucket, Key="r/model.safetensors", Body=self.body)
        c.put_object(Bucket=self.bucket, Key="r/config.json", Body=b"{}")
        self.fault, self.gate, self.passed = weights_gate(p, 4, stall)
        p.faults = [self.fault]
        self.data = tmp_path / "data"
        self.env = dict(s3_env(moto), AWS_ENDPOINT_URL="http://127.0.0.1:%d" % p.port)
        self.s = make_server(env=self.env, data_dir=self.data)
        self.job = self.s.submit({"type": "download", "model": "s3://%s/r" % self.bucket,
                                  "params": {"chunk_bytes": 1 << 20, "connections": 1}})


def test_s3_download_resumes_after_a_drain(make_server, moto, proxy, tmp_path):
    """SIGTERM mid-download: the job goes back to the queue with the ranges
    that arrived; the next server start fetches only the rest, and the file
    is whole and checked."""
    g = GatedDownload(make_server, moto, proxy(), tmp_path)
    bucket, body, env, data, s, job = g.bucket, g.body, g.env, g.data, g.s, g.job
    passed, gate = g.passed, g.gate
    deadline = time.time() + 60
    while len(passed) < 5 and time.time() < deadline:
        time.sleep(0.05)
    assert len(passed) >= 5
    assert s.stop() == 0  # drain: the transfer in flight is abandoned
    gate.set()
    ranges_before = len(passed)
    s2 = make_server(env=env, data_dir=data)
    done = s2.wait_job(job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    res = done["result"]
    # config.json (2 bytes, first in the listing) and 4 ranges of the weights
    assert res["bytes_resumed"] == (4 << 20) + 2
    assert res["bytes_downloaded"] == 8 << 20
    assert len(passed) - ranges_before == 8
    out = local_copy(s2, bucket, "r")
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == body
    f = [x for x in res["files"] if x["name"] == "model.safetensors"][0]
    assert f["sha256"] == hashlib.sha256(body).hexdigest()
    assert not os.listdir(os.path.join(s2.data_dir, "remote", ".tmp"))


def test_s3_download_resumes_after_a_crash(make_server, moto, proxy, tmp_path):
    """kill -9 mid-download: the re-queued job takes over what the last
    record (fsync'ed data, then the record, every 2 s) says is on disk:
    finished ranges, and the fetched start of a range cut short, whose rest
    comes with a ranged GET from there; the copy equals boto3's download byte
    for byte. An object replaced while the server was down starts over."""
    # 4 ranges of the weights pass, the 5th stops after 300000 bytes
    g = GatedDownload(make_server, moto, proxy(), tmp_path, stall=300000)
    bucket, env, data, s, job, p = g.bucket, g.env, g.data, g.s, g.job, g.p
    passed, gate, stall, c = g.passed, g.gate, g.fault, s3client(moto)
    record = os.path.join(str(data), "remote", ".tmp", job["id"], ".modelprep-partial.json")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            part = json.load(open(record))["files"]["model.safetensors"]["part"]
            if part:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    assert part == {"4": 300000}, part
    s.kill9()
    p.faults = []
    gate.set()
    with p.lock:
        p.log.clear()
    s2 = make_server(env=env, data_dir=data)
    done = s2.wait_job(job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    res = done["result"]
    assert res["bytes_resumed"] == (4 << 20) + 300000 + 2, res
    assert res["bytes_downloaded"] == (8 << 20) - 300000, res
    # the cut range's rest was asked for from where the disk left off
    ranges = [h.get("Range") for m, path, h, _ in p.log
              if m == "GET" and path.endswith("model.safetensors")]
    assert ranges[0] == "bytes=%d-%d" % ((4 << 20) + 300000, (5 << 20) - 1), ranges
    out = local_copy(s2, bucket, "r")
    want = tmp_path / "boto3.bin"
    c.download_file(bucket, "r/model.safetensors", str(want))
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == want.read_bytes()
    assert sorted(os.listdir(out)) == [".modelprep-s3.json", "config.json", "model.safetensors"]
    assert no_temp(s2)

    # the object replaced while the server is down: nothing of it is kept
    passed.clear()
    gate.clear()
    p.faults = [stall]
    job = s2.submit({"type": "download", "model": "s3://%s/r" % bucket,
                     "params": {"chunk_bytes": 1 << 20, "connections": 1, "overwrite": True}})
    record = os.path.join(str(data), "remote", ".tmp", job["id"], ".modelprep-partial.json")
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(record):
        time.sleep(0.1)
    time.sleep(2.5)  # a record with the weights' ranges in it
    s2.kill9()
    p.faults = []
    gate.set()
    body2 = os.urandom(12 << 20)
    c.put_object(Bucket=bucket, Key="r/model.safetensors", Body=body2)
    s3 = make_server(env=env, data_dir=data)
    done = s3.wait_job(job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert done["result"]["bytes_resumed"] == 2, done["result"]  # config.json only
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == body2
    assert no_temp(s3)


def test_s3_download_cancel_leaves_nothing(make_server, moto, proxy):
    bucket = new_bucket(moto)
    s3client(moto).put_object(Bucket=bucket, Key="c/model.safetensors",
                              Body=os.urandom(6 << 20))
    p = proxy()
    gate = threading.Event()
    seen = []

    def hold(method, path):
        if method == "GET" and path.endswith("model.safetensors"):
            seen.append(path)
            if len(seen) > 2:
                gate.wait(30)

    p.faults = [hold]
    s = make_server(env=dict(s3_env(moto), AWS_ENDPOINT_URL="http://127.0.0.1:%d" % p.port))
    job = s.submit({"type": "download", "model": "s3://%s/c" % bucket,
                    "params": {"chunk_bytes": 1 << 20, "connections": 1}})
    deadline = time.time() + 60
    while len(seen) < 3 and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    st, _ = s.delete("/v1/jobs/" + job["id"])
    assert st in (200, 202)
    done = s.wait_job(job["id"], timeout=30)
    gate.set()
    assert done["state"] == "cancelled", done
    assert time.time() - t0 < 10  # the transfer in flight was aborted, not waited for
    assert not os.path.exists(local_copy(s, bucket, "c"))
    assert no_temp(s)


def test_redis_publish_failure_keeps_the_old_model(make_server, model_root, redis_server):
    """A publish that fails half-way (Redis refuses a value over
    proto-max-bulk-len and drops the connection) leaves the model that was
    there as it was, and no staged keys."""
    r = redis_server(extra=["--proto-max-bulk-len", "1mb"])
    cfg = tm.make_config("llama")
    small = model_root / "small"
    tm.write_model(str(small), cfg, tm.make_state(cfg))
    cfg2 = tm.make_config("llama", hidden=512, inter=1536, vocab=4000)
    big = model_root / "big"
    tm.write_model(str(big), cfg2, tm.make_state(cfg2))
    s = make_server(args=["--model-root", str(model_root)])
    job = s.run_job({"type": "publish", "model": str(small), "params": {"url": r.url("m")}})
    assert job["state"] == "succeeded", job
    before = {k: r.client.get(k) for k in r.client.scan_iter(match="m/*")}
    job = s.run_job({"type": "publish", "model": str(big),
                     "params": {"url": r.url("m"), "overwrite": True}})
    assert job["state"] == "failed", job
    assert job["error"]["code"] in ("remote_unavailable", "remote_error"), job
    after = {k: r.client.get(k) for k in r.client.scan_iter(match="m/*")}
    assert after == before
    assert list(r.client.scan_iter(match="*.tmp-*")) == []
