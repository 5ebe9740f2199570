#!/usr/bin/env bash
# model.teacher.masks_per_sample at equal wall time, on CPU: the demo's tiny pretraining
# (recipes/tiny/pretrain.yaml, launched as recipes/tiny/run.sh stage 5 does) with M = 1 and with
# M > 1 masked copies per teacher pass, the M > 1 arm given fewer updates so that both take about
# the same seconds; both arms of a seed run at the same time (one core each) so they share the
# machine's load; then the demo's CTC phone probe (`mt4ssl probe`) of each last checkpoint.
#   bash benchmarks/masks_per_sample.sh [--exp DIR] [--out DIR] [--seeds "1 2"] [--m 4]
#        [--updates N] [--updates-m N] [--probe-updates N]
# --updates-m: the M > 1 arm's updates; measure its cost per update first (a 30-update run of
# each arm side by side) and give it updates x (seconds per M=1 update / seconds per M update).
# Each arm's EMA anneal spans its whole run (model.teacher.ema_anneal_updates = its updates,
# = the demo's 400 for 400 updates). Prints one line per arm; rerunning skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."

exp=exp/tiny; out=exp/masks_per_sample; seeds="1 2"; m=4; updates=400; updates_m=200; probe_updates=3000
while [ $# -gt 0 ]; do
  case "$1" in
    --exp) exp=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --m) m=$2; shift 2 ;;
    --updates) updates=$2; shift 2 ;;
    --updates-m) updates_m=$2; shift 2 ;;
    --probe-updates) probe_updates=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
MT4SSL=${MT4SSL:-.venv/bin/mt4ssl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
.venv/bin/python -c "import os, platform, torch; print(f'machine: {platform.processor() or platform.machine()}, \
{os.cpu_count()} cores, torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}')"

arm() {  # name seed M updates: pretrain, timed
  local run=$out/$1 t0
  [ -f "$run/seconds" ] && return 0
  t0=$(date +%s%N)
  $MT4SSL pretrain recipes/tiny/pretrain.yaml run.out_dir="$run" data.manifest_dir="$exp/manifests" \
    "data.labels={mfcc100: $exp/labels_mfcc100}" run.seed="$2" run.max_updates="$4" \
    model.teacher.ema_anneal_updates="$4" model.teacher.masks_per_sample="$3" > "$run.log" 2>&1 || {
    echo "pretraining $run failed: see $run.log" >&2; return 1; }
  echo $(( ($(date +%s%N) - t0) / 1000000 )) | sed 's/...$/.&/' > "$run/seconds"
}
probe() {
  local run=$out/$1
  [ -f "$run/probe.json" ] || $MT4SSL probe --ckpt "$run/checkpoints/checkpoint_last.pt" --manifest-dir "$exp/manifests" \
    --lexicon "$exp/corpus/lexicon.txt" --updates "$probe_updates" --out "$run/probe.json" > "$run/probe.log" 2>&1 || {
    echo "probe of $run failed: see $run/probe.log" >&2; return 1; }
}

for s in $seeds; do
  echo "== seed $s: M=1 ($updates updates) and M=$m ($updates_m updates) side by side ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
  arm "m1-seed$s" "$s" 1 "$updates" & a=$!
  arm "m$m-seed$s" "$s" "$m" "$updates_m" & b=$!
  wait $a; wait $b
  probe "m1-seed$s" & a=$!
  probe "m$m-seed$s" & b=$!
  wait $a; wait $b
done
echo "== done ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
for s in $seeds; do
  for name in "m1-seed$s" "m$m-seed$s"; do
    .venv/bin/python - "$out/$name" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in open(run / "log.jsonl")]
last = [r for r in rows if "valid_loss" in r][-1]
probe = json.loads((run / "probe.json").read_text())
print(f"{run.name}: {rows[-1]['update']} updates in {float((run / 'seconds').read_text()):.0f} s, "
      f"valid_loss {last['valid_loss']:.3f} (kmeans {last['valid_loss_kmeans']:.3f}, teacher "
      f"{last['valid_loss_teacher']:.3f}), probe PER valid {probe['per']['valid']:.4f} test {probe['per']['test']:.4f}")
EOF
  done
done
