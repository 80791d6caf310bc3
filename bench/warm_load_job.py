"""warm_load_job.py - warm_load as a user measures it: the wall time of a
warm_load job (POST /v1/jobs -> the job seen "succeeded", polled every 5 ms,
keep_resident false) against a release-built modelprepd, next to what a
Python user would write instead, all in this one process and interleaved:

  load_file+clone  safetensors.torch.load_file of every shard, then .clone()
                   of every tensor (the bytes end up in fresh, private memory,
                   as the service's arena is)
  read fresh       read() of every shard into freshly allocated memory
                   (bench/warm_load_read: malloc + read, C)
  read prefaulted  the same into memory faulted in beforehand (the bound)

The server's first job (no pooled arena yet: it allocates, zero-fills and
splices) is timed apart as job_first_s. Best of REPS each; the order rotates each round so no variant always follows
the same one. Prints "key value" lines for bench/warm_load.sh.

  warm_load_job.py BASE_URL MODEL_DIR READ_HELPER REPS SHARD...
"""
import http.client
import json
import subprocess
import sys
import time
import urllib.parse

import safetensors.torch as st
import torch  # noqa: F401  (load_file returns torch tensors)


def job_wall(conn, model, path, **params):
    body = json.dumps({"type": "warm_load", "model": model,
                       "params": dict(params, keep_resident=False)})
    t0 = time.perf_counter()
    conn.request("POST", path + "/v1/jobs", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    doc = json.loads(r.read())
    if r.status != 202:
        raise SystemExit("submit failed: %d %s" % (r.status, doc))
    jid = doc["id"]
    while True:
        conn.request("GET", "%s/v1/jobs/%s" % (path, jid))
        r = conn.getresponse()
        doc = json.loads(r.read())
        if doc["state"] in ("succeeded", "failed", "cancelled"):
            t = time.perf_counter() - t0
            break
        time.sleep(0.005)
    if doc["state"] != "succeeded":
        raise SystemExit("job %s: %s" % (doc["state"], doc.get("error")))
    return t, doc.get("result") or {}


def load_clone(shards):
    t0 = time.perf_counter()
    out = []
    for s in shards:
        out.extend(t.clone() for t in st.load_file(s).values())
    t = time.perf_counter() - t0
    del out
    return t


def helper(exe, mode, shards):
    out = subprocess.run([exe, mode] + shards, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[0])


def main():
    base, model, exe, reps, shards = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
        sys.argv[5:]
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    names = ["job", "clone", "fresh", "prefault"]
    best = {n: 1e9 for n in names}
    worst = {n: 0.0 for n in names}
    best_result = {}
    # The server's first load finds no arena in the pool: timed on its own.
    first, _ = job_wall(conn, model, u.path.rstrip("/"))
    for rep in range(reps):
        for k in range(len(names)):
            n = names[(rep + k) % len(names)]
            if n == "job":
                t, res = job_wall(conn, model, u.path.rstrip("/"))
                if t < best[n]:
                    best_result = res
            elif n == "clone":
                t = load_clone(shards)
            else:
                t = helper(exe, n, shards)
            best[n] = min(best[n], t)
            worst[n] = max(worst[n], t)
    for n in names:
        print("%s_s %.6f" % (n, best[n]))
        print("%s_worst_s %.6f" % (n, worst[n]))
    print("job_first_s %.6f" % first)
    tm = best_result.get("timings", {})
    for k in ("open_s", "plan_s", "alloc_s", "pipeline_s", "total_s"):
        print("job_%s %.6f" % (k, tm.get(k, -1)))
    print("job_bytes %d" % best_result.get("bytes", 0))


if __name__ == "__main__":
    main()
