#!/usr/bin/env bash
# `make reproduce`: the paper's central comparison at CPU scale. MT4SSL (k-means + teacher),
# HuBERT-like ([kmeans]) and data2vec-like ([teacher]) pretrained with the same recipe
# (recipes/tiny/pretrain.yaml), budget, data and seeds, each probed the same way at several
# checkpoints; writes results/reproduce.md and results/reproduce.png. Then issue 9's fine-tuning
# comparison (recipes/tiny/finetune.sh): results/librispeech_wer.md.
#   bash recipes/tiny/reproduce.sh [--seeds "1 2"] [--updates N] [--points P] [--jobs J] [--exp DIR]
# Every run resumes and every probe is skipped when its result exists, so a rerun continues.
set -euo pipefail
cd "$(dirname "$0")/../.."

seeds="1 2"; updates=""; points=4; jobs=2; exp=exp/tiny
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds=$2; shift 2 ;;
    --updates) updates=$2; shift 2 ;;
    --points) points=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
MT4SSL=${MT4SSL:-.venv/bin/mt4ssl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
updates=${updates:-$(.venv/bin/python -c "import yaml; print(yaml.safe_load(open('recipes/tiny/pretrain.yaml'))['run']['max_updates'])")}
every=$(( updates / points )); [ "$every" -ge 1 ] || every=1
manifests=$exp/manifests; labels=$exp/labels_mfcc100; ali=$exp/corpus/alignments; out=$exp/reproduce
declare -A TARGETS=([mt4ssl]="[kmeans, teacher]" [hubert_like]="[kmeans]" [data2vec_like]="[teacher]")
t_start=$(date +%s)

echo "== data (the demo's stages 0-4)"
bash recipes/tiny/run.sh --exp "$exp" --stop-stage 4 > /dev/null

one_run() {  # variant seed: pretrain, then probe every saved checkpoint
  local v=$1 s=$2 run=$out/$1-seed$2
  $MT4SSL pretrain recipes/tiny/pretrain.yaml run.out_dir="$run" data.manifest_dir="$manifests" \
    "data.labels={mfcc100: $labels}" "model.targets=${TARGETS[$v]}" run.seed="$s" \
    run.max_updates="$updates" run.save_interval="$every" run.keep_last="$points" >> "$run.log" 2>&1 || {
    # a collapse is a result, not a failure: the trainer saved the state it stopped at
    grep -o "training collapsed at update [0-9]*: [^(]*" "$run.log" | tail -1 > "$run/collapsed.txt"
    [ -s "$run/collapsed.txt" ] || { echo "pretraining $run failed: see $run.log" >&2; return 1; }
    echo "   $v seed $s: $(cat "$run/collapsed.txt")"; }
  for ckpt in "$run"/checkpoints/checkpoint_[0-9]*.pt; do
    local n; n=$(basename "$ckpt" .pt); n=${n#checkpoint_}
    [ -f "$run/probe_$n.json" ] || $MT4SSL purity --manifest "$manifests/valid.tsv" \
      --alignments "$ali/dev-clean.ctm" --fit-manifest "$manifests/train.tsv" \
      --fit-alignments "$ali/train-clean-100.ctm" --ckpt "$ckpt" --classifier \
      --out "$run/probe_$n.json" >> "$run.log" 2>&1
  done
  [ -f "$run/ctc_probe.json" ] || $MT4SSL probe --ckpt "$run/checkpoints/checkpoint_last.pt" \
    --manifest-dir "$manifests" --lexicon "$exp/corpus/lexicon.txt" --updates 1500 --out "$run/ctc_probe.json" >> "$run.log" 2>&1
  echo "   $v seed $s done ($(( $(date +%s) - t_start )) s since start)"
}

mkdir -p "$out"
echo "== $(( 3 * $(wc -w <<< "$seeds") )) pretraining runs of $updates updates, $jobs at a time, probes at every $every updates -> $out"
for s in $seeds; do
  for v in mt4ssl hubert_like data2vec_like; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    one_run "$v" "$s" &
  done
done
wait

echo "== baselines: random init and MFCC, the same probes"
first=$out/mt4ssl-seed${seeds%% *}/checkpoints/checkpoint_last.pt
[ -f "$out/random_init_probe.json" ] || $MT4SSL purity --manifest "$manifests/valid.tsv" \
  --alignments "$ali/dev-clean.ctm" --fit-manifest "$manifests/train.tsv" \
  --fit-alignments "$ali/train-clean-100.ctm" --ckpt "$first" --random-init --classifier \
  --out "$out/random_init_probe.json" > /dev/null 2>&1
[ -f "$out/random_init_ctc.json" ] || $MT4SSL probe --ckpt "$first" --random-init \
  --manifest-dir "$manifests" --lexicon "$exp/corpus/lexicon.txt" --updates 1500 --out "$out/random_init_ctc.json" > /dev/null 2>&1

[ -f "$out/mfcc_probe.json" ] || $MT4SSL purity --manifest "$manifests/valid.tsv" \
  --alignments "$ali/dev-clean.ctm" --fit-manifest "$manifests/train.tsv" \
  --fit-alignments "$ali/train-clean-100.ctm" --mfcc --classifier --out "$out/mfcc_probe.json" > /dev/null 2>&1

.venv/bin/python tools/reproduce_table.py --runs "$out" --command "make reproduce  # bash recipes/tiny/reproduce.sh" \
  --seconds "$(( $(date +%s) - t_start ))"

echo "== CTC fine-tuning of the demo checkpoint vs random init, 10 min and 1 h, greedy and LM (recipes/tiny/finetune.sh)"
bash recipes/tiny/finetune.sh --exp "$exp" --jobs "$jobs"
echo "== done in $(( $(date +%s) - t_start )) s: results/reproduce.md, results/reproduce.png (runs in $out), results/librispeech_wer.md"
