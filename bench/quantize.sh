#!/usr/bin/env bash
# quantize: a 1 GiB bf16 checkpoint in 2 safetensors shards (32 Linear
# weights of 4096 x 4096, as a 7B model's layers) -> fp8-block and -> nf4,
# by our `quantize` job (a fresh modelprepd, submit to succeeded: the output
# fsync'd and published) and by the Python reference doing the same in the
# same run: the torch recipe (amax / 448 per 128 x 128 block, x / scale,
# clamp, .to(float8_e4m3fn)) or bitsandbytes' quantize_4bit(nf4, blocksize
# 64, double quant) on CPU, tensor by tensor from safetensors' load_file,
# saved with save_file and fsync'd. Peak RSS: ours is the server's VmHWM
# (/proc/<pid>/status, a fresh server per run, so it includes its own
# start-up), theirs the Python process's ru_maxrss. Both outputs are
# compared tensor by tensor (they must be equal bytes).
# Goals: >= 5x faster, peak RSS <= 1/4 of the reference's.
# BENCH_QGB (default 1.0), BENCH_REPS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
GB=${BENCH_QGB:-1.0}
REPS=${BENCH_REPS:-3}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d "${BENCH_DIR:-/tmp}/quantize.XXXXXX")
trap 'rm -rf "$work"' EXIT

make -s BUILD="$BUILD" "$BUILD/modelprepd" >/dev/null

"$PY" - "$work/models/src" "$GB" <<'PYEOF'
import json, os, sys, torch
from safetensors.torch import save_file
out, gb = sys.argv[1], float(sys.argv[2])
os.makedirs(out)
g = torch.Generator().manual_seed(0)
n = max(2, int(round(gb * 2**30 / (4096 * 4096 * 2))))
names = ["model.layers.%d.mlp.%s.weight" % (i // 4, ("gate_proj", "up_proj", "down_proj", "o_proj")[i % 4])
         for i in range(n)]
wm = {}
for s in range(2):
    part = names[s * n // 2:(s + 1) * n // 2]
    fn = "model-%05d-of-00002.safetensors" % (s + 1)
    save_file({k: (torch.randn(4096, 4096, generator=g) * 0.02).bfloat16() for k in part},
              os.path.join(out, fn), metadata={"format": "pt"})
    wm.update({k: fn for k in part})
json.dump({"metadata": {}, "weight_map": wm}, open(out + "/model.safetensors.index.json", "w"))
json.dump({"model_type": "llama", "torch_dtype": "bfloat16"}, open(out + "/config.json", "w"))
PYEOF

cat > "$work/ref.py" <<'PYEOF'
# The reference: the same quantization in Python, tensor by tensor.
import json, os, resource, sys, time
import torch
from safetensors.torch import load_file, save_file
method, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()

def fp8_block(x, bn=128, bk=128):
    x = x.float()
    n, k = x.shape
    xp = torch.nn.functional.pad(x, (0, -k % bk, 0, -n % bn))
    b = xp.reshape(xp.shape[0] // bn, bn, xp.shape[1] // bk, bk)
    amax = b.abs().amax(dim=(1, 3))
    s = torch.where(amax == 0, torch.ones_like(amax), amax / 448)
    q = (b / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"weight": q.reshape(xp.shape)[:n, :k].contiguous(), "weight_scale_inv": s}

def nf4(x):
    import bitsandbytes.functional as F
    q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    d = {"weight": q}
    d.update({"weight." + k: v for k, v in st.as_dict(packed=True).items()})
    return d

fn = fp8_block if method == "fp8-block" else nf4
os.makedirs(dst)
for f in sorted(os.listdir(src)):
    if not f.endswith(".safetensors"):
        continue
    out = {}
    for name, t in load_file(os.path.join(src, f)).items():
        m = name[:-len(".weight")]
        out.update({m + "." + k: v for k, v in fn(t).items()})
    save_file(out, os.path.join(dst, f), metadata={"format": "pt"})
    fd = os.open(os.path.join(dst, f), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
print("%.3f %d" % (time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
PYEOF

cat > "$work/ours.py" <<'PYEOF'
# Ours: a fresh modelprepd, one quantize job, submit to succeeded; then the
# server's VmHWM.
import json, os, subprocess, sys, time, urllib.request
build, method, root, data, out = sys.argv[1:6]
p = subprocess.Popen([build + "/modelprepd", "--listen", "127.0.0.1:0", "--data-dir", data,
                      "--model-root", root], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
base = p.stdout.readline().decode().split("listening on ", 1)[1].strip()

def call(path, body=None):
    r = urllib.request.Request(base + path, data=json.dumps(body).encode() if body else None,
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r) as f:
        return json.loads(f.read())

try:
    t0 = time.perf_counter()
    job = call("/v1/jobs", {"type": "quantize", "model": root + "/src",
                            "params": {"method": method, "output": out}})
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.01)
        job = call("/v1/jobs/" + job["id"])
    dt = time.perf_counter() - t0
    assert job["state"] == "succeeded", job
    hwm = [l for l in open("/proc/%d/status" % p.pid) if l.startswith("VmHWM:")][0].split()[1]
    print("%.3f %s" % (dt, hwm))
finally:
    p.terminate()
    p.wait()
PYEOF

cat > "$work/same.py" <<'PYEOF'
# Both outputs hold the same bytes for every tensor the reference wrote
# (the quant_state JSON aside: ours is padded to its planned size).
import os, sys
from safetensors import safe_open
a, b = sys.argv[1], sys.argv[2]
def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="pt") as g:
                for k in g.keys():
                    t = g.get_tensor(k)
                    out[k] = t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
    return out
ta, tb = tensors(a), tensors(b)
bad = [k for k in tb if "quant_state" not in k and ta.get(k) != tb[k]]
print("equal" if not bad else "DIFFERENT (%d tensors, e.g. %s)" % (len(bad), bad[0]))
PYEOF

cat "$work"/models/src/*.safetensors >/dev/null
size=$(du -cb "$work"/models/src/*.safetensors | tail -1 | cut -f1)
for method in fp8-block nf4; do
  best_o=1e9; rss_o=0; best_r=1e9; rss_r=0
  for ((r = 0; r < REPS; r++)); do
    rm -rf "$work/data" "$work/models/out" "$work/ref"
    read -r t k < <("$PY" "$work/ours.py" "$BUILD" "$method" "$work/models" "$work/data" "$work/models/out")
    best_o=$(awk -v a="$best_o" -v b="$t" 'BEGIN{print (b<a)?b:a}'); (( k > rss_o )) && rss_o=$k
    read -r t k < <("$PY" "$work/ref.py" "$method" "$work/models/src" "$work/ref")
    best_r=$(awk -v a="$best_r" -v b="$t" 'BEGIN{print (b<a)?b:a}'); (( k > rss_r )) && rss_r=$k
  done
  same=$("$PY" "$work/same.py" "$work/models/out" "$work/ref")
  ref=$([ "$method" = nf4 ] && echo "bitsandbytes" || echo "torch recipe")
  awk -v gb="$(awk -v s="$size" 'BEGIN{printf "%.2f", s/2^30}')" -v m="$method" -v o="$best_o" -v p="$best_r" \
    -v ro="$rss_o" -v rp="$rss_r" -v same="$same" -v ref="$ref" 'BEGIN{
    printf "quantize %s GiB bf16 (2 shards) -> %s (best of runs)\n", gb, m
    printf "  modelprep job       %7.2f s  %8.1f MiB peak RSS (server VmHWM)\n", o, ro/1024
    printf "  python (%s) %7.2f s  %8.1f MiB peak RSS\n", ref, p, rp/1024
    printf "  speed-up %.2fx (goal >= 5x)   RSS ratio %.3f (goal <= 0.25)   outputs %s\n", p/o, ro/rp, same
  }'
done
