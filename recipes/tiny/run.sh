#!/usr/bin/env bash
# The tiny recipe: the whole pipeline at CPU scale on a synthetic LibriSpeech-layout corpus.
# Same commands as recipes/librispeech, other paths and sizes.
#   bash recipes/tiny/run.sh [--stage N] [--stop-stage N] [--exp DIR] [--hours H] [--updates N]
#                            [--probe-updates N] [--superb-pr-steps N] [--superb-ks-steps N]
# Each stage skips work that is already done, so a re-run resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=0; stop_stage=100; exp=exp/tiny; hours=0.5; seed=0; nshard=2; k=100
updates=400; probe_updates=3000; superb_pr_steps=800; superb_ks_steps=1500
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    --hours) hours=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --updates) updates=$2; shift 2 ;;
    --probe-updates) probe_updates=$2; shift 2 ;;
    --superb-pr-steps) superb_pr_steps=$2; shift 2 ;;
    --superb-ks-steps) superb_ks_steps=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
MT4SSL=${MT4SSL:-.venv/bin/mt4ssl}
# One compute thread per process: on the 2-core machine this recipe was made on, torch and
# faiss ran slower with 2 threads than with 1 (the data-loader worker takes the other core).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
corpus=$exp/corpus; manifests=$exp/manifests; feats=$exp/mfcc; labels=$exp/labels_mfcc$k
step() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
say() { printf '\n== stage %s: %s (%s)\n' "$1" "$2" "$(date +%T)"; }
t_start=$(date +%s)

if step 0; then
  say 0 "synthetic corpus -> $corpus"
  $MT4SSL synth-corpus --out "$corpus" --hours "$hours" --seed "$seed"  # kept if already complete
fi

if step 1; then
  say 1 "manifests -> $manifests"
  $MT4SSL manifest "$corpus" --out "$manifests" \
    --splits train=train-clean-100 valid=dev-clean test=test-clean
fi

if step 2; then
  say 2 "MFCC features (39-d, 100 Hz, $nshard shards) -> $feats"
  for split in train valid test; do
    $MT4SSL features mfcc "$manifests" "$split" "$feats" --nshard "$nshard" --all-shards
  done
fi

if step 3; then
  say 3 "k-means (k=$k, mt4ssl kmeans' default backend, 10% of train frames) -> $labels/km.npz"
  $MT4SSL kmeans "$feats" train "$labels/km.npz" --nshard "$nshard" -k "$k" --seed "$seed"
fi

if step 4; then
  say 4 "50 Hz frame labels -> $labels"
  for split in train valid test; do
    $MT4SSL labels "$feats" "$split" "$labels/km.npz" --nshard "$nshard" \
      --manifest-dir "$manifests" --out "$labels"
  done
fi

run=$exp/pretrain; probes=$exp/probes; ali=$corpus/alignments; ckpt=$run/checkpoints/checkpoint_last.pt
ctc=(--manifest-dir "$manifests" --lexicon "$corpus/lexicon.txt" --updates "$probe_updates")
frames=(--manifest "$manifests/valid.tsv" --alignments "$ali/dev-clean.ctm" --fit-manifest "$manifests/train.tsv"
        --fit-alignments "$ali/train-clean-100.ctm" --classifier)
pids=()
bg() { "$@" > "$probes/$(basename "${*: -1}" .json).log" 2>&1 & pids+=($!); }  # log named after --out
wait_all() { local p; for p in "${pids[@]}"; do wait "$p"; done; pids=(); }
mkdir -p "$probes"

# SUPERB (stage 8): s3prl's SUPERB configs with a CPU budget: fewer steps, smaller batches,
# one learning rate each. Finished runs are kept by `mt4ssl superb`, so the fbank baselines,
# which need no checkpoint, run during pretraining (stage 5) and are not run again.
sb=$exp/superb; ks_data=$exp/speech_commands
P=pr$superb_pr_steps; K=ks$superb_ks_steps  # run folders named after their budget
pr=(--task pr --data "$corpus" --steps "$superb_pr_steps" --eval-step $(( superb_pr_steps / 4 )) --batch-size 8)
ks=(--task ks --data "$ks_data" --steps "$superb_ks_steps" --eval-step $(( superb_ks_steps / 4 )) --batch-size 16 --lr 1e-3)
# the frozen tiny model's states of each utterance are kept in memory: later epochs skip it
model=(--ckpt "$ckpt" --precision auto --cache-gb 4)
sbg() { local name=$1; shift; "$@" --out "$sb/$name" > "$sb/$name.log" 2>&1 & pids+=($!); }
superb_baselines() {
  $MT4SSL synth-superb --task ks --out "$ks_data" > "$sb/synth_ks.log" 2>&1  # kept if already complete
  $MT4SSL superb "${pr[@]}" --upstream fbank --out "$sb/fbank_$P" > "$sb/fbank_$P.log" 2>&1
  $MT4SSL superb "${ks[@]}" --upstream fbank --out "$sb/fbank_$K" > "$sb/fbank_$K.log" 2>&1
}
mkdir -p "$sb"

if step 5; then
  say 5 "tiny MT4SSL pretraining on CPU -> $run (resumes if interrupted); meanwhile, on the other core, the MFCC baselines"
  [ -f "$probes/mfcc.json" ] || bg $MT4SSL probe --mfcc "${ctc[@]}" --out "$probes/mfcc.json"
  [ -f "$probes/mfcc_frames.json" ] || bg $MT4SSL purity "${frames[@]}" --mfcc --out "$probes/mfcc_frames.json"
  [ -f "$probes/mfcc_labels.json" ] || bg $MT4SSL purity --manifest "$manifests/valid.tsv" \
    --alignments "$ali/dev-clean.ctm" --labels "$labels/valid.km" --out "$probes/mfcc_labels.json"
  superb_baselines & pids+=($!)  # SUPERB fbank PR and KS (stage 8's table)
  $MT4SSL pretrain recipes/tiny/pretrain.yaml run.out_dir="$run" data.manifest_dir="$manifests" \
    "data.labels={mfcc100: $labels}" run.max_updates="$updates"
  wait_all
fi

if step 6; then
  say 6 "probes of the untrained and the pretrained model, two at a time -> $probes"
  # phone recognition (linear CTC on frozen layers, PER), then frame-level measures against
  # the flite voices' alignments (linear frame phone classifier, k-means purity and PNMI)
  [ -f "$probes/random_init.json" ] || bg $MT4SSL probe --ckpt "$ckpt" --random-init "${ctc[@]}" --out "$probes/random_init.json"
  bg $MT4SSL probe --ckpt "$ckpt" "${ctc[@]}" --out "$probes/mt4ssl.json"
  wait_all
  [ -f "$probes/random_init_frames.json" ] || bg $MT4SSL purity "${frames[@]}" --ckpt "$ckpt" --random-init --out "$probes/random_init_frames.json"
  bg $MT4SSL purity "${frames[@]}" --ckpt "$ckpt" --out "$probes/mt4ssl_frames.json"
  wait_all
  grep -h "^probe\|^purity" "$probes"/*.log || true
fi

if step 7; then
  say 7 "results table and learning curves -> results/"
  .venv/bin/python tools/demo_table.py --run "$run" --command "make demo  # bash recipes/tiny/run.sh" \
    --probe "MFCC (39-d)=$probes/mfcc.json" --probe "tiny model, random init=$probes/random_init.json" \
    --probe "tiny MT4SSL, $updates updates=$probes/mt4ssl.json" \
    --frames "MFCC k-means labels (the k-means target)=$probes/mfcc_labels.json" \
    --frames "MFCC (39-d)=$probes/mfcc_frames.json" \
    --frames "tiny model, random init=$probes/random_init_frames.json" \
    --frames "tiny MT4SSL, $updates updates=$probes/mt4ssl_frames.json"
  .venv/bin/python tools/plot_curves.py "$run/log.jsonl" --out results/demo_curves.png
fi

if step 8; then
  say 8 "SUPERB PR and KS through s3prl's own runner: random init and MT4SSL, two at a time -> $sb"
  superb_baselines & pids+=($!)  # done in stage 5 unless started here
  wait_all
  sbg mt4ssl_$P $MT4SSL superb "${pr[@]}" "${model[@]}"
  sbg random_$P $MT4SSL superb "${pr[@]}" "${model[@]}" --random-init
  wait_all
  sbg mt4ssl_$K $MT4SSL superb "${ks[@]}" "${model[@]}"
  sbg random_$K $MT4SSL superb "${ks[@]}" "${model[@]}" --random-init
  wait_all
  .venv/bin/python tools/superb_table.py --out results/superb_demo.md \
    --command "make demo  # bash recipes/tiny/run.sh, stage 8" \
    --title "SUPERB PR and KS on synthetic data: the demo's tiny MT4SSL vs random init vs fbank" \
    --note "CPU budget: PR $superb_pr_steps steps (batch 8 x 2 accumulated), KS $superb_ks_steps steps (batch 16, lr 1e-3), \
one learning rate each (no sweep), s3prl's SUPERB configs otherwise; the tiny model's states cached in memory \
(\`--cache-gb\`: the same numbers, computed once). PR: the synthetic LibriSpeech-layout corpus of \
stage 0; KS: \`mt4ssl synth-superb --task ks\` (Speech Commands v1 layout). Tiny model: $updates CPU updates of \
pretraining; published rows are Base models pretrained on 960 h on GPUs, for scale only. fbank's KS is at chance \
by construction: s3prl's fbank is normalised per utterance (mean 0 per channel), so KS's mean pooling gives every \
clip the same vector." \
    --run "tiny MT4SSL, $updates updates=$sb/mt4ssl_$P" --run "tiny MT4SSL, $updates updates=$sb/mt4ssl_$K" \
    --run "tiny model, random init=$sb/random_$P" --run "tiny model, random init=$sb/random_$K" \
    --run "fbank (s3prl)=$sb/fbank_$P" --run "fbank (s3prl)=$sb/fbank_$K"
fi

cat <<MSG

== done in $(( $(date +%s) - t_start )) s. Where everything went:
  corpus       $corpus   (LibriSpeech layout + lexicon.txt)
  manifests    $manifests/{train,valid,test}.{tsv,wrd,ltr}
  features     $feats/{split}_{shard}_$nshard.{npy,len,json}
  k-means      $labels/km.npz
  labels       $labels/{train,valid,test}.km + dict.km.txt
  checkpoint   $run/checkpoints/checkpoint_last.pt  (checkpoint_best.pt: lowest validation loss)
  TensorBoard  tensorboard --logdir $run/tb      (JSON lines: $run/log.jsonl)
  probes       $probes/*.json   (CTC PER: mfcc, random_init, mt4ssl; frame measures: *_frames, mfcc_labels)
  table, plot  results/demo.md, results/demo_curves.png
  SUPERB       $exp/superb/{mt4ssl,random,fbank}_{pr,ks}<steps>/result.json -> results/superb_demo.md (+ .csv)
MSG
