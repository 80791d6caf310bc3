"""warm_load_quantize.py - a quantizing warm_load as a user measures it (the
wall time of the job, submit..succeeded, keep_resident false, release
modelprepd on the host device) against what a Python user would write to
get the same bytes, interleaved in this one process, best of REPS:

  fp8 peer  safetensors.torch.load_file, then per weight torch's FP8 recipe
            (x.float(), amax / 448, x / scale, clamp, .to(float8_e4m3fn))
  nf4 peer  load_file, then bitsandbytes.functional.quantize_4bit (CPU,
            blocksize 64, double quantization) per weight
  plain     the same warm_load without quantize (what quantizing costs)

Prints "key value" lines for bench/warm_load_quantize.sh.

  warm_load_quantize.py BASE_URL MODEL_DIR REPS SHARD...
"""
import sys
import time
import urllib.parse
import http.client

import safetensors.torch as st
import torch
import bitsandbytes.functional as bnbf

from warm_load_job import job_wall


def py_fp8(shards):
    t0 = time.perf_counter()
    out = []
    for s in shards:
        for t in st.load_file(s).values():
            x = t.float()
            amax = x.abs().amax()
            scale = torch.where(amax == 0, torch.ones_like(amax), amax / 448)
            out.append(((x / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale))
    t = time.perf_counter() - t0
    del out
    return t


def py_nf4(shards):
    t0 = time.perf_counter()
    out = []
    for s in shards:
        for t in st.load_file(s).values():
            out.append(bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4",
                                          compress_statistics=True))
    t = time.perf_counter() - t0
    del out
    return t


def main():
    base, model, reps, shards = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    path = u.path.rstrip("/")
    runs = {
        "job_fp8": lambda: job_wall(conn, model, path, quantize="fp8"),
        "job_nf4": lambda: job_wall(conn, model, path, quantize="nf4"),
        "job_plain": lambda: job_wall(conn, model, path),
        "py_fp8": lambda: (py_fp8(shards), {}),
        "py_nf4": lambda: (py_nf4(shards), {}),
    }
    names = list(runs)
    best = {n: 1e9 for n in names}
    result = {}
    runs["job_plain"]()  # the server's first load allocates its arena: not timed
    for rep in range(reps):
        for k in range(len(names)):
            n = names[(k + rep) % len(names)]
            t, r = runs[n]()
            if t < best[n]:
                best[n] = t
                result[n] = r
    for n in names:
        print("%s_s %.6f" % (n, best[n]))
    q = result["job_fp8"]["quantization"]
    print("bytes_before %d" % q["bytes_before"])
    print("peak_host_fp8 %d" % result["job_fp8"]["peak_host_bytes"])
    print("readers %d" % result["job_fp8"]["staging"]["readers"])


if __name__ == "__main__":
    main()
