"""Offline targets: the project's k-means (`--backend lloyd`) against scikit-learn
MiniBatchKMeans with fairseq's simple_kmeans settings, on the same MFCC frames, and label-dump
throughput (the LibriSpeech-size figures: benchmarks/kmeans_scale.py).

    python benchmarks/offline_targets.py [--feat-dir exp/tiny/mfcc] [--nshard 2] [-k 100]

Both fit the same 10% sample of frames; inertia is the mean squared distance of ALL frames
to their nearest centroid. Writes its section of results/perf.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from mt4ssl.features.dump import iter_shards  # noqa: E402
from mt4ssl.kmeans.apply import dump_labels  # noqa: E402
from mt4ssl.kmeans.learn import KMeansModel, fit_lloyd, fit_sklearn, inertia, sample_frames  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feat-dir", type=Path, default=Path("exp/tiny/mfcc"))
    p.add_argument("--manifest-dir", type=Path, default=Path("exp/tiny/manifests"))
    p.add_argument("--split", default="train")
    p.add_argument("--nshard", type=int, default=2)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    load = os.getloadavg()

    all_frames = np.concatenate([np.asarray(s.feats) for s in iter_shards(args.feat_dir, args.split, args.nshard)])
    rows, results = [], {}
    for backend, fit in [("lloyd (mt4ssl default)", fit_lloyd), ("sklearn MiniBatchKMeans (fairseq settings)", fit_sklearn)]:
        times, inertias = [], []
        fit(all_frames[: 20 * args.k], args.k, 0)  # warm-up: library loading, thread pools
        for seed in args.seeds:
            x, _ = sample_frames(args.feat_dir, args.split, args.nshard, args.fraction, seed)
            t0 = time.perf_counter()
            centroids = fit(x, args.k, seed)
            times.append(time.perf_counter() - t0)
            inertias.append(inertia(all_frames, centroids))
            print(f"{backend} seed {seed}: {times[-1]:.2f} s, inertia/frame {inertias[-1]:.3f}", flush=True)
        results[backend] = (np.median(times), np.mean(inertias))
        rows.append(f"| {backend} | {np.median(times):.2f} | {np.mean(inertias):.3f} "
                    f"(min {min(inertias):.3f}, max {max(inertias):.3f}) |")
    (t_ours, i_ours), (t_sk, i_sk) = results.values()

    with tempfile.TemporaryDirectory() as tmp:
        km = Path(tmp) / "km.npz"
        KMeansModel(fit_lloyd(x, args.k, 0), {"k": args.k}).save(km)
        runs = [dump_labels(args.feat_dir, args.split, args.nshard, km,
                            args.manifest_dir / f"{args.split}.tsv", Path(tmp), progress=False)
                for _ in range(3)]
    fps = np.median([r["frames_per_second"] for r in runs])

    body = f"""MFCC 39-d, {len(all_frames):,} frames at 100 Hz ({len(all_frames) / 360000:.2f} h) of split
`{args.split}` in `{args.feat_dir}`; k = {args.k}; each fit on a {args.fraction:.0%} sample
({len(x):,} frames); seeds {args.seeds}, after one untimed warm-up fit each. Inertia = mean squared distance of all frames to the
nearest centroid. OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}; load average at the start
{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, at the end {os.getloadavg()[0]:.1f} (1-min) on {os.cpu_count()} cores.

| k-means | fit time, median (s) | inertia/frame, mean over seeds |
|---|---|---|
{chr(10).join(rows)}

- Speed-up of lloyd over scikit-learn: **{t_sk / t_ours:.1f}x**
- Inertia of lloyd relative to scikit-learn: **{(i_ours / i_sk - 1) * 100:+.2f}%**
- Label dump (nearest centroid + 50 Hz reduction + checks + write): **{fps:,.0f} frames/s** (median of 3)
"""
    print(body)
    write_section("offline targets: k-means and label dump", "make bench  # python benchmarks/offline_targets.py", body)


if __name__ == "__main__":
    main()
