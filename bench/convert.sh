#!/usr/bin/env bash
# convert: a >= 1 GB torch.save .bin -> safetensors with our modelprep-convert
# (streamed, every tensor read back and compared, fsync'd, published by
# rename) vs SGLang's convert_bin_to_safetensor_file done in the same run
# (torch.load, drop data_ptr duplicates, .contiguous(), safetensors
# save_file, size check, load_file and torch.equal every tensor), plus the
# fsync of the file and its folder that we do too (equal durability). Both
# are measured with /usr/bin/time -v: wall seconds and peak RSS.
# Goals: >= 3x faster, peak RSS <= 1/4 of the peer's.
#
# inspect: a sparse >= 10 GB sharded safetensors checkpoint (real headers,
# ftruncate'd data) through modelprep-inspect. Goal: < 0.2 s.
# BENCH_GB (default 1.1), BENCH_INSPECT_GB (default 12), BENCH_REPS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
GB=${BENCH_GB:-1.1}
IGB=${BENCH_INSPECT_GB:-12}
REPS=${BENCH_REPS:-3}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d "${BENCH_DIR:-/tmp}/convert.XXXXXX")
trap 'rm -rf "$work"' EXIT

make -s BUILD="$BUILD" "$BUILD/modelprep-convert" "$BUILD/modelprep-inspect" >/dev/null

"$PY" - "$work/src" "$GB" <<'PYEOF'
import os, sys, torch
out, gb = sys.argv[1], float(sys.argv[2])
os.makedirs(out)
g = torch.Generator().manual_seed(0)
sd, total, i = {}, 0, 0
while total < gb * 2**30:
    dt = (torch.bfloat16, torch.float16, torch.float32)[i % 3]
    rows = 4096 if dt != torch.float32 else 2048
    sd["model.layers.%d.w" % i] = torch.randn(rows, 4096, generator=g).to(dt)
    sd["model.layers.%d.norm" % i] = torch.ones(4096)
    total += 32 * 2**20 + 4096 * 4
    i += 1
sd["model.embed_tokens.weight"] = torch.randn(4096, 4096, generator=g).bfloat16()
sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
torch.save(sd, out + "/pytorch_model.bin")
open(out + "/config.json", "w").write('{"model_type": "llama"}')
PYEOF

cat > "$work/peer.py" <<'PYEOF'
# SGLang's convert_bin_to_safetensor_file (model_loader/weight_utils.py).
import os, sys, time
from collections import defaultdict
import torch
from safetensors.torch import load_file, save_file
pt, sf = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
loaded = torch.load(pt, map_location="cpu", weights_only=True)
if "state_dict" in loaded:
    loaded = loaded["state_dict"]
ptrs = defaultdict(list)
for k, v in loaded.items():
    ptrs[v.data_ptr()].append(k)
for names in ptrs.values():
    for n in names[1:]:
        loaded.pop(n)
loaded = {k: v.contiguous() for k, v in loaded.items()}
os.makedirs(os.path.dirname(sf), exist_ok=True)
save_file(loaded, sf, metadata={"format": "pt"})
# Durable as ours is: the file and its directory entry on disk.
for p, flags in ((sf, os.O_RDONLY), (os.path.dirname(sf), os.O_RDONLY | os.O_DIRECTORY)):
    fd = os.open(p, flags)
    os.fsync(fd)
    os.close(fd)
sf_size, pt_size = os.stat(sf).st_size, os.stat(pt).st_size
if (sf_size - pt_size) / pt_size > 0.01:
    raise RuntimeError("size")
reloaded = load_file(sf)
for k in loaded:
    if not torch.equal(loaded[k], reloaded[k]):
        raise RuntimeError("mismatch " + k)
print("inner_s %.3f" % (time.perf_counter() - t0))
PYEOF

# "wall rss_kb" of a command under /usr/bin/time -v
measure() {
  local log="$work/time.log"
  /usr/bin/time -v "$@" >"$work/out.txt" 2>"$log" || { cat "$log" >&2; return 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log" |
    awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  echo "$wall $rss"
}

src="$work/src/pytorch_model.bin"
size=$(stat -c %s "$src")
cat "$src" >/dev/null
best_ours=1e9; rss_ours=0; best_peer=1e9; rss_peer=0
for ((r = 0; r < REPS; r++)); do
  rm -rf "$work/out_ours" "$work/out_peer"
  read -r w k < <(measure "$BUILD/modelprep-convert" "$work/src" "$work/out_ours")
  best_ours=$(awk -v a="$best_ours" -v b="$w" 'BEGIN{print (b<a)?b:a}')
  (( k > rss_ours )) && rss_ours=$k
  read -r w k < <(measure "$PY" "$work/peer.py" "$src" "$work/out_peer/model.safetensors")
  best_peer=$(awk -v a="$best_peer" -v b="$w" 'BEGIN{print (b<a)?b:a}')
  (( k > rss_peer )) && rss_peer=$k
done
# The disk's floor for the same bytes: written and fsync'd by dd.
best_dd=1e9
for ((r = 0; r < REPS; r++)); do
  read -r w _ < <(measure dd if="$src" of="$work/dd.out" bs=16M conv=fsync status=none)
  best_dd=$(awk -v a="$best_dd" -v b="$w" 'BEGIN{print (b<a)?b:a}')
  rm -f "$work/dd.out"
done
# same tensors either way (our file is sorted like the reference writer, so
# equal bytes is a fair check)
cmp -s "$work/out_ours/model.safetensors" "$work/out_peer/model.safetensors" &&
  same="byte-identical" || same="DIFFERENT"
awk -v gb="$(awk -v s="$size" 'BEGIN{printf "%.2f", s/2^30}')" -v o="$best_ours" -v p="$best_peer" \
  -v ro="$rss_ours" -v rp="$rss_peer" -v same="$same" -v dd="$best_dd" 'BEGIN{
  printf "convert %s GiB .bin -> safetensors (best of runs, wall incl. start-up)\n", gb
  printf "  modelprep-convert  %7.2f s  %8.1f MiB peak RSS\n", o, ro/1024
  printf "  sglang way (torch) %7.2f s  %8.1f MiB peak RSS  (+ fsync, as ours)\n", p, rp/1024
  printf "  dd conv=fsync       %7.2f s  (the same bytes written and fsync'"'"'d: the disk'"'"'s floor)\n", dd
  printf "  speed-up %.2fx (goal >= 3x)   RSS ratio %.3f (goal <= 0.25)   outputs %s\n", p/o, ro/rp, same
  printf "  ours / dd floor: %.2fx the time of dd alone\n", o/dd
}'

# ---- inspect on a sparse >= 10 GB sharded checkpoint -------------------------
"$PY" - "$work/big" "$IGB" <<'PYEOF'
import json, os, struct, sys
out, gb = sys.argv[1], float(sys.argv[2])
os.makedirs(out)
H, I, L, V = 8192, 28672, 80, 128256
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
       "intermediate_size": I, "num_attention_heads": 64, "num_key_value_heads": 8,
       "num_hidden_layers": L, "vocab_size": V, "tie_word_embeddings": False}
json.dump(cfg, open(out + "/config.json", "w"))
tensors = [("model.embed_tokens.weight", [V, H])]
for i in range(L):
    p = "model.layers.%d." % i
    tensors += [(p + "self_attn.q_proj.weight", [H, H]), (p + "self_attn.k_proj.weight", [1024, H]),
                (p + "self_attn.v_proj.weight", [1024, H]), (p + "self_attn.o_proj.weight", [H, H]),
                (p + "mlp.gate_proj.weight", [I, H]), (p + "mlp.up_proj.weight", [I, H]),
                (p + "mlp.down_proj.weight", [H, I]), (p + "input_layernorm.weight", [H]),
                (p + "post_attention_layernorm.weight", [H])]
tensors += [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]
total = sum(2 * (s[0] * (s[1] if len(s) > 1 else 1)) for _, s in tensors)
assert total >= gb * 1e9 * 0.9, total
nshards = 30
per = (len(tensors) + nshards - 1) // nshards
wm, size = {}, 0
for k in range(nshards):
    part = tensors[k * per:(k + 1) * per]
    fn = "model-%05d-of-%05d.safetensors" % (k + 1, nshards)
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in part:
        n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        hdr[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
        wm[name] = fn
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, fn), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
    size += 8 + len(h) + off
json.dump({"metadata": {"total_size": total}, "weight_map": wm},
          open(out + "/model.safetensors.index.json", "w"))
print("%.1f" % (size / 1e9), file=open(out + "/../big.size", "w"))
PYEOF
best_i=1e9; best_iw=1e9
for ((r = 0; r < REPS + 2; r++)); do
  t0=$(date +%s.%N)
  "$BUILD/modelprep-inspect" "$work/big" >"$work/insp.json"
  t1=$(date +%s.%N)
  s=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$work/insp.json")
  best_i=$(awk -v a="$best_i" -v b="$s" 'BEGIN{print (b<a)?b:a}')
  best_iw=$(awk -v a="$best_iw" -v b="$t1" -v c="$t0" 'BEGIN{d=b-c; print (d<a)?d:a}')
done
"$PY" - "$work/insp.json" "$(cat "$work/big.size")" "$best_i" "$best_iw" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
per = {e["tp"]: e["bytes_per_rank"] for e in r["per_tp"]}
print("inspect %s GB sparse sharded safetensors (70B-shaped, 30 shards)" % sys.argv[2])
print("  insp_run %.4f s, whole process %.4f s (goal < 0.2 s)" % (float(sys.argv[3]), float(sys.argv[4])))
print("  params_total %d, bytes_total %d, per-rank bytes %s" % (r["params_total"], r["bytes_total"], per))
PYEOF
