"""The MT4SSL recipe on LibriSpeech 960 h, as a chain of SLURM jobs (see README.md here).

    python recipes/librispeech/submit.py --librispeech /data/LibriSpeech --work /data/mt4ssl \
        [--profile example] [--stage 1] [--stop-stage 9] [--dry-run] [--local]

Stages (each one `mt4ssl` command; sharded stages are job arrays; each waits for the last):
  1 manifests        train = train-clean-100 + train-clean-360 + train-other-500 (linked into
                     one folder), valid = dev-other
  2 mfcc             39-d MFCC, 100 Hz, sharded
  3 kmeans-mfcc      k-means, 100 clusters, on 10% of the utterances (all their frames: fairseq's
                     learn_kmeans.py --percent 0.1, as the published runs)
  4 labels-mfcc      50 Hz labels for train and valid
  5 hubert-iter1     first-iteration HuBERT-like Base on the MFCC labels
  6 layer6           layer-6 features of the iteration-1 model, sharded
  7 kmeans-layer6    k-means, 500 clusters, 10% of the utterances (about 17 M frames x 768 = 53 GB
                     in RAM, so the job asks for 64 GB: results/perf.md, "k-means at scale: 768-d";
                     it reads only those utterances' features, about a tenth of the 530 GB)
  8 labels-hubert500 50 Hz labels for train and valid
  9 mt4ssl           MT4SSL Base pretraining on the hubert500 labels (+ EMA teacher)
--local runs the same chain one stage after another in this process's machine (no SLURM).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mt4ssl.config import load_config
from mt4ssl.launch import Stage, executor_for, submit_chain
from mt4ssl.train.config import LaunchConfig, PretrainConfig

HERE = Path(__file__).resolve().parent
TRAIN_SPLITS = ("train-clean-100", "train-clean-360", "train-other-500")
SHARDS = 100


def link_training_folders(librispeech: Path, work: Path) -> Path:
    """One folder `train-960` of symlinks to the three training splits' speaker folders."""
    merged = work / "LibriSpeech"
    (merged / "train-960").mkdir(parents=True, exist_ok=True)
    for split in TRAIN_SPLITS:
        for speaker in sorted((librispeech / split).iterdir()):
            link = merged / "train-960" / speaker.name
            if not link.exists():
                link.symlink_to(speaker.resolve(), target_is_directory=True)
    dev = merged / "dev-other"
    if not dev.exists():
        dev.symlink_to((librispeech / "dev-other").resolve(), target_is_directory=True)
    return merged


def stages(work: Path, librispeech: Path, overrides: list[str]) -> list[Stage]:
    d = work
    m, mfcc, l6 = d / "manifests", d / "mfcc", d / "layer6"
    cpu = {"gpus_per_node": 0, "timeout_min": 240}
    it1 = d / "exp" / "hubert_iter1_base"

    def both_splits(name: str, feats: Path, km: Path, out: Path) -> list[Stage]:
        """Label train (dumped in SHARDS shards) and valid (one shard)."""
        return [Stage(f"{name}-{split}", ["labels", str(feats), split, str(km), "--nshard", str(nshard),
                                          "--manifest-dir", str(m), "--out", str(out)], params=cpu)
                for split, nshard in (("train", SHARDS), ("valid", 1))]

    return [
        Stage("manifests", ["manifest", str(librispeech), "--out", str(m),
                            "--splits", "train=train-960", "valid=dev-other"], params=cpu),
        Stage("mfcc", ["features", "mfcc", str(m), "train", str(mfcc), "--shard", "{shard}",
                       "--nshard", str(SHARDS)], shards=SHARDS, params=cpu),
        Stage("mfcc-valid", ["features", "mfcc", str(m), "valid", str(mfcc)], params=cpu),
        Stage("kmeans-mfcc", ["kmeans", str(mfcc), "train", str(d / "labels_mfcc100" / "km.npz"),
                              "--nshard", str(SHARDS), "-k", "100", "--sample", "utterances"], params=cpu),
        *both_splits("labels-mfcc", mfcc, d / "labels_mfcc100" / "km.npz", d / "labels_mfcc100"),
        Stage("hubert-iter1", ["pretrain", str(HERE / "hubert_iter1_base.yaml"), f"data.manifest_dir={m}",
                               f"data.labels={{mfcc100: {d / 'labels_mfcc100'}}}", f"run.out_dir={it1}",
                               *overrides]),
        Stage("layer6", ["extract", str(it1 / "checkpoints" / "checkpoint_last.pt"), str(m / "train.tsv"),
                         "--out", str(l6), "--layers", "6", "--shard", "{shard}", "--nshard", str(SHARDS),
                         "--device", "cuda", "--precision", "auto"], shards=SHARDS, params={"gpus_per_node": 1}),
        Stage("layer6-valid", ["extract", str(it1 / "checkpoints" / "checkpoint_last.pt"), str(m / "valid.tsv"),
                               "--out", str(l6), "--layers", "6", "--device", "cuda", "--precision", "auto"],
              params={"gpus_per_node": 1}),
        Stage("kmeans-layer6", ["kmeans", str(l6 / "layer6"), "train", str(d / "labels_hubert500" / "km.npz"),
                                "--nshard", str(SHARDS), "-k", "500", "--sample", "utterances"],
              params={**cpu, "timeout_min": 720, "mem_gb": 64}),
        *both_splits("labels-hubert500", l6 / "layer6", d / "labels_hubert500" / "km.npz", d / "labels_hubert500"),
        Stage("mt4ssl", ["pretrain", str(HERE / "mt4ssl_base.yaml"), f"data.manifest_dir={m}",
                         f"data.labels={{hubert500: {d / 'labels_hubert500'}}}",
                         f"run.out_dir={d / 'exp' / 'mt4ssl_base'}", *overrides]),
    ]


# stage number (as in the docstring) -> names of the Stage objects it covers
NUMBERS = {1: ["manifests"], 2: ["mfcc", "mfcc-valid"], 3: ["kmeans-mfcc"],
           4: ["labels-mfcc-train", "labels-mfcc-valid"], 5: ["hubert-iter1"],
           6: ["layer6", "layer6-valid"], 7: ["kmeans-layer6"],
           8: ["labels-hubert500-train", "labels-hubert500-valid"], 9: ["mt4ssl"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--librispeech", type=Path, required=True, help="folder with train-clean-100, ...")
    p.add_argument("--work", type=Path, required=True, help="where data, labels and runs go")
    p.add_argument("--profile", default="example", help="slurm/<profile>.yaml")
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--stop-stage", type=int, default=9)
    p.add_argument("--dry-run", action="store_true", help="print the jobs, submit nothing")
    p.add_argument("--local", action="store_true", help="run the stages here, one after another")
    p.add_argument("overrides", nargs="*", help="key=value for both pretraining configs")
    args = p.parse_args()

    root = link_training_folders(args.librispeech, args.work) if not args.dry_run else args.librispeech
    wanted = {name for n, names in NUMBERS.items() if args.stage <= n <= args.stop_stage for name in names}
    chain = [s for s in stages(args.work, root, args.overrides) if s.name in wanted]
    base = load_config(PretrainConfig, HERE / "mt4ssl_base.yaml")
    launch_cfg = LaunchConfig(**{**base.launch.__dict__, "profile": args.profile})
    executor = executor_for(launch_cfg, args.work / "slurm", cluster="debug" if args.local else None,
                            plan_only=args.dry_run)  # a dry run plans on any machine, SLURM or not
    if not args.dry_run:
        os.makedirs(args.work, exist_ok=True)
    submit_chain(chain, executor, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
