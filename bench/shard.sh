#!/usr/bin/env bash
# Shard throughput: a >= 2 GB llama-shaped bf16 checkpoint (2 safetensors
# files + index) to tp=4 sharded state with modelprep-shard (release build),
# against a plain copy of the same files measured in the same run. Both
# read a warm page cache; the shard fsyncs every file it writes, so the copy
# is timed as "cp + sync" (same durability) and also plain "cp" (data may
# still be in the page cache). Goal: shard >= 0.8x the copy's throughput,
# peak RSS bounded (two 16 MiB chunk buffers + tables, whatever the model).
# BENCH_LAYERS sets the size (20 layers ~ 2.06 GB), BENCH_REPS the best-of.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
LAYERS=${BENCH_LAYERS:-20}
REPS=${BENCH_REPS:-5}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d "${BENCH_DIR:-/tmp}/shard.XXXXXX")
trap 'rm -rf "$work"' EXIT

make -s BUILD="$BUILD" "$BUILD/modelprep-shard" >/dev/null
src="$work/model"
"$PY" - "$src" "$LAYERS" <<'PYEOF'
import json, os, sys
import numpy as np
sys.path.insert(0, "tests/fixtures")
import tp_models as tm
d, L = sys.argv[1], int(sys.argv[2])
os.makedirs(d)
cfg = tm.make_config("llama", hidden=2048, heads=16, kv=4, head_dim=128, inter=5632,
                     vocab=32000, layers=L, tie=False)
json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
json.dump({}, open(os.path.join(d, "tokenizer_config.json"), "w"))
rng = np.random.default_rng(0)
pool = rng.integers(0, 256, 64 << 20, dtype=np.uint8)  # reused: content is irrelevant
H, I, V = 2048, 5632, 32000
shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H),
          "model.norm.weight": (H,)}
for i in range(L):
    p = "model.layers.%d." % i
    shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (512, H),
                   p + "self_attn.v_proj.weight": (512, H), p + "self_attn.o_proj.weight": (H, H),
                   p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                   p + "mlp.down_proj.weight": (H, I)})
names = sorted(shapes)
wm = {}
for k in range(2):
    part, off = {}, 0
    for n in names[k::2]:
        nb = int(np.prod(shapes[n])) * 2
        a = np.resize(pool[off % (32 << 20):], nb) if nb > (32 << 20) else \
            pool[off % (32 << 20):off % (32 << 20) + nb]
        part[n] = ("BF16", a.reshape(list(shapes[n]) + [2]))
        off += 4099
        wm[n] = "model-%05d-of-00002.safetensors" % (k + 1)
    tm.write_raw(os.path.join(d, "model-%05d-of-00002.safetensors" % (k + 1)), part,
                 {"format": "pt"})
json.dump({"metadata": {}, "weight_map": wm},
          open(os.path.join(d, "model.safetensors.index.json"), "w"))
PYEOF
bytes=$(cat "$src"/*.safetensors | wc -c)
cat "$src"/* >/dev/null  # warm the page cache for both contenders

best_cp=999999; best_cps=999999; best_sh=999999; rss=0
for r in $(seq "$REPS"); do
  rm -rf "$work/copy" "$work/out"; mkdir "$work/copy"; sync
  t0=$(date +%s.%N); cp "$src"/*.safetensors "$work/copy/"; t1=$(date +%s.%N); sync; t2=$(date +%s.%N)
  cp_s=$(echo "$t1 - $t0" | bc); cps_s=$(echo "$t2 - $t0" | bc)
  rm -rf "$work/copy"; sync
  t0=$(date +%s.%N)
  /usr/bin/time -v "$BUILD/modelprep-shard" --tp 4 "$src" "$work/out" >"$work/res.json" 2>"$work/time.txt"
  t1=$(date +%s.%N)
  sh_s=$(echo "$t1 - $t0" | bc)
  kb=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$work/time.txt")
  [ "$kb" -gt "$rss" ] && rss=$kb
  best_cp=$(echo "if ($cp_s < $best_cp) $cp_s else $best_cp" | bc)
  best_cps=$(echo "if ($cps_s < $best_cps) $cps_s else $best_cps" | bc)
  best_sh=$(echo "if ($sh_s < $best_sh) $sh_s else $best_sh" | bc)
done
written=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['bytes_written'])" "$work/res.json")
mbps() { echo "scale=1; $1 / $2 / 1048576" | bc; }
echo "source:            $bytes bytes in 2 files; tp=4 writes $written tensor bytes"
echo "cp:                $(printf %.3f "$best_cp") s  $(mbps "$bytes" "$best_cp") MiB/s (no sync)"
echo "cp + sync:         $(printf %.3f "$best_cps") s  $(mbps "$bytes" "$best_cps") MiB/s"
echo "shard tp=4:        $(printf %.3f "$best_sh") s  $(mbps "$bytes" "$best_sh") MiB/s (fsync + re-read check included)"
echo "peak RSS (shard):  $((rss / 1024)) MiB"
echo "ratio shard / (cp + sync): $(echo "scale=2; $best_cps / $best_sh" | bc)x   (goal >= 0.8)"
echo "ratio shard / cp:          $(echo "scale=2; $best_cp / $best_sh" | bc)x"
