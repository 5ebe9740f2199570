"""Waveform normalisation before or after cropping: how much does it change?

fairseq (MT4SSL's official code, data2vec, HuBERT) normalises each waveform to zero mean and
unit variance over the whole file when it reads it, then crops (to max_sample_size, and
"crop" batches to their shortest utterance); mt4ssl normalises the cropped waveform inside
the model. This measures, on the pretraining batches of a manifest (the demo's by default:
length-bucketed, data.max_tokens, "crop" collation, data.max_samples), the difference in the
normalised samples, in the CNN features, and in the pretraining loss of a checkpoint on the
same batches with the same masks (eval mode: no dropout):

    python benchmarks/normalize_before_crop.py --ckpt exp/tiny/pretrain/checkpoints/checkpoint_last.pt \
        --manifest-dir exp/tiny/manifests --labels mfcc100=exp/tiny/labels_mfcc100

The loss difference is set against the loss's own spread over two mask draws of the same batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mt4ssl.data.dataset import PretrainDataset, collate
from mt4ssl.data.sampler import BucketBatchSampler
from mt4ssl.models.checkpoint import load_model
from mt4ssl.models.mt4ssl import MT4SSL


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--labels", action="append", default=[], metavar="NAME=FOLDER")
    p.add_argument("--max-tokens", type=int, default=320_000, help="the demo's data.max_tokens")
    p.add_argument("--max-samples", type=int, default=320_000)
    p.add_argument("--min-samples", type=int, default=32_000)
    p.add_argument("--batches", type=int, default=0, help="0: every batch of the split")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    labels = dict(spec.split("=", 1) for spec in args.labels)
    data = PretrainDataset(args.manifest_dir / f"{args.split}.tsv",
                           {n: Path(f) / f"{args.split}.km" for n, f in labels.items()},
                           args.min_samples, args.max_samples)
    batches = list(BucketBatchSampler(data.sizes, args.max_tokens, seed=args.seed))
    if args.batches:
        batches = batches[:args.batches]

    ours_model = load_model(args.ckpt).eval()  # normalises the cropped batch (cfg.normalize)
    if not ours_model.cfg.normalize:
        raise SystemExit(f"{args.ckpt}: its model does not normalise waveforms (model.normalize=false)")
    parity_model = MT4SSL(dataclasses.replace(ours_model.cfg, normalize=False)).eval()
    parity_model.load_state_dict(ours_model.state_dict())  # same weights, input normalised beforehand

    sample_diff, scale, offset, cropped_frac = [], [], [], []
    feat_diff, loss_ours, loss_parity, loss_other_mask = [], [], [], []
    for b, ids in enumerate(batches):
        items = [data[i] for i in ids]
        batch = collate(items, mode="crop")
        m = batch["wav"].shape[1]
        # fairseq: the whole file normalised (layer_norm over it, eps 1e-5), then cropped as ours
        whole = [torch.from_numpy(data.manifest.read(int(data.indices[i]))) for i in ids]
        pre = torch.stack([F.layer_norm(w.float(), w.shape)[:m] for w in whole])
        post = F.layer_norm(batch["wav"].float(), (m,))  # ours (normalize_waveform, no padding)
        for w, a, c in zip(whole, pre, post):
            sample_diff.append(float((a - c).norm() / c.norm()))
            cropped_frac.append(1 - m / len(w))
            scale.append(float(a.std() / c.std()))  # the crop's std in whole-file units
            offset.append(float(a.mean()))
        with torch.no_grad():
            f_ours, _ = ours_model.features(batch["wav"])
            f_parity, _ = parity_model.features(pre)
            feat_diff.append(float((f_ours - f_parity).norm() / f_ours.norm()))
            torch.manual_seed(args.seed * 100_003 + b)
            mask = ours_model.sample_mask(f_ours, None)
            torch.manual_seed(args.seed * 100_003 + b + 50_000)
            other = ours_model.sample_mask(f_ours, None)
            out = ours_model(batch["wav"], mask_indices=mask, labels=batch["labels"])
            par = parity_model(pre, mask_indices=mask, labels=batch["labels"])
            oth = ours_model(batch["wav"], mask_indices=other, labels=batch["labels"])
            frames = float(out.sample_size)
            loss_ours.append(float(out.loss) / frames)
            loss_parity.append(float(par.loss) / frames)
            loss_other_mask.append(float(oth.loss) / float(oth.sample_size))

    def stats(x):
        x = np.asarray(x)
        return f"mean {x.mean():.4g}, median {np.median(x):.4g}, max {x.max():.4g}"

    lo, lp, lm = map(np.asarray, (loss_ours, loss_parity, loss_other_mask))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{args.manifest_dir / args.split}.tsv: {len(batches)} batches, {len(sample_diff)} utterances, "
          f"max_tokens {args.max_tokens}, checkpoint {args.ckpt}")
    print(f"fraction of each file cropped away: {stats(cropped_frac)}; "
          f"utterances cropped at all: {np.mean(np.asarray(cropped_frac) > 0):.1%}")
    print(f"normalised samples, ||whole-file - crop|| / ||crop||: {stats(sample_diff)}")
    print(f"std of the crop in whole-file units: {stats(scale)}; mean: {stats(np.abs(offset))} (abs)")
    print(f"CNN features (projected), relative L2 difference: {stats(feat_diff)}")
    print(f"loss per masked frame, ours (crop normalised): {lo.mean():.5f}; whole-file normalised: {lp.mean():.5f}")
    print(f"  |difference| per batch: {stats(np.abs(lo - lp))}; relative: {stats(np.abs(lo - lp) / lo)}")
    print(f"  for scale, another mask draw, |difference| per batch: {stats(np.abs(lo - lm))}")


if __name__ == "__main__":
    main()
