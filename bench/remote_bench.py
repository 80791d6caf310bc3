"""Driver of bench/remote.sh: starts moto_server, redis-server and the
release modelprepd on loopback, times each contender in the same run and
prints ratios (see remote.sh for what is compared)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import boto3
import redis
import torch
from boto3.s3.transfer import TransferConfig
from safetensors.torch import load_file, save, save_file

MB = int(os.environ.get("BENCH_REMOTE_MB", "1024"))
REPS = int(os.environ.get("BENCH_REPS", "2"))
CONN = int(os.environ.get("BENCH_CONN", "8"))
BUILD = os.environ.get("BUILD", "build")
BIN = os.path.dirname(sys.executable)
AK, SK = "bench", "benchsecret"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc):
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit("a server exited")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("a server did not start")


def post(base, body):
    req = urllib.request.Request(base + "/v1/jobs", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    job = json.loads(urllib.request.urlopen(req).read())
    while True:
        j = json.loads(urllib.request.urlopen(base + "/v1/jobs/" + job["id"]).read())
        if j["state"] in ("succeeded", "failed", "cancelled"):
            if j["state"] != "succeeded":
                raise SystemExit("job failed: %r" % j["error"])
            return j
        time.sleep(0.02)


def main():
    work = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR", "/tmp"), prefix="remote.")
    procs = []
    try:
        run(work, procs)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def run(work, procs):
    mport, rport = free_port(), free_port()
    procs.append(subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p",
                                   str(mport)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", work],
                                  stdout=subprocess.DEVNULL))
    wait_port(mport, procs[0])
    wait_port(rport, procs[1])
    ep = "http://127.0.0.1:%d" % mport
    env = dict(os.environ, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK,
               AWS_ENDPOINT_URL=ep, AWS_REGION="us-east-1")
    models = os.path.join(work, "models")
    os.makedirs(models)
    srv = subprocess.Popen([os.path.join(BUILD, "modelprepd"), "--listen", "127.0.0.1:0",
                            "--data-dir", os.path.join(work, "data"), "--model-root", models,
                            "--no-access-log"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    procs.append(srv)
    base = srv.stdout.readline().decode().split("listening on ")[1].strip()

    # ---- S3 download ----
    s3 = boto3.client("s3", endpoint_url=ep, aws_access_key_id=AK, aws_secret_access_key=SK,
                      region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    per = MB // 4 << 20
    for i in range(4):
        s3.put_object(Bucket="bench", Key="m/model-%05d-of-00004.safetensors" % (i + 1),
                      Body=os.urandom(per))
    total = 4 * per
    best = {"ours": 1e9, "seq": 1e9, "par": 1e9}
    for _ in range(REPS):
        shutil.rmtree(os.path.join(work, "data", "remote"), ignore_errors=True)
        t = time.perf_counter()
        j = post(base, {"type": "download", "model": "s3://bench/m",
                        "params": {"connections": CONN, "load_format": "all"}})
        best["ours"] = min(best["ours"], time.perf_counter() - t)
        if os.environ.get("BENCH_VERBOSE"):
            print("  ours: job %.2f s, transfer %.2f s, %d requests" % (
                j["result"]["seconds"], j["result"]["transfer_seconds"], j["result"]["requests"]))
        d = os.path.join(work, "seq")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        t = time.perf_counter()
        for i in range(4):
            k = "m/model-%05d-of-00004.safetensors" % (i + 1)
            s3.download_file("bench", k, os.path.join(d, os.path.basename(k)))
        best["seq"] = min(best["seq"], time.perf_counter() - t)
        shutil.rmtree(d)
        os.makedirs(d)
        t = time.perf_counter()
        cfg = TransferConfig(max_concurrency=CONN)
        ths = [threading.Thread(target=s3.download_file, args=(
            "bench", "m/model-%05d-of-00004.safetensors" % (i + 1),
            os.path.join(d, "f%d" % i)), kwargs={"Config": cfg}) for i in range(4)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        best["par"] = min(best["par"], time.perf_counter() - t)
        shutil.rmtree(d)
    gb = total / 1e9
    print("download %.2f GB from moto S3: ours %.2f s (%.2f GB/s), boto3 download_file "
          "sequential %.2f s, boto3 TransferManager parallel %.2f s" %
          (gb, best["ours"], gb / best["ours"], best["seq"], best["par"]))
    print("  ratio vs sequential: %.2fx (goal >= 2x); vs parallel: %.2fx (goal >= 1x)" %
          (best["seq"] / best["ours"], best["par"] / best["ours"]))

    # ---- Redis publish ----
    mdir = os.path.join(models, "m")
    os.makedirs(mdir)
    n = 64
    rows = (MB << 20) // n // 2 // 2048
    tensors = {"model.layers.%d.w" % i: torch.randn(rows, 2048).to(torch.bfloat16)
               for i in range(n)}
    save_file(tensors, os.path.join(mdir, "model.safetensors"))
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump({"architectures": ["X"]}, f)
    del tensors
    pbytes = os.path.getsize(os.path.join(mdir, "model.safetensors"))
    r = redis.Redis(host="127.0.0.1", port=rport)
    best = {"ours": 1e9, "py": 1e9}
    for k in range(REPS):
        r.flushall()
        t = time.perf_counter()
        post(base, {"type": "publish", "model": mdir,
                    "params": {"url": "redis://127.0.0.1:%d/m" % rport, "naming": "hf"}})
        best["ours"] = min(best["ours"], time.perf_counter() - t)
        r.flushall()
        # SGLang's save_model: every state-dict tensor through
        # SafeSerializer.to_bytes and client.set, then the .json/.py files
        t = time.perf_counter()
        sd = load_file(os.path.join(mdir, "model.safetensors"))
        for key, tensor in sd.items():
            r.set("m/keys/rank_0/%s" % key, save({"tensor_bytes": tensor.cpu().contiguous()}))
        for root, _, files in os.walk(mdir):
            for fn in files:
                if os.path.splitext(fn)[1] in (".json", ".py"):
                    with open(os.path.join(root, fn), encoding="utf-8") as fh:
                        r.set("m/files/%s" % fn, fh.read())
        best["py"] = min(best["py"], time.perf_counter() - t)
        del sd
    gb = pbytes / 1e9
    print("publish %.2f GB to redis-server (SGLang layout): ours %.2f s (%.2f GB/s), "
          "SGLang save_model with redis-py %.2f s" % (gb, best["ours"], gb / best["ours"],
                                                      best["py"]))
    print("  ratio: %.2fx (goal >= 2x)" % (best["py"] / best["ours"]))
    r.close()


if __name__ == "__main__":
    main()
