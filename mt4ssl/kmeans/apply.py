"""Apply k-means to dumped features and write 50 Hz frame labels: `mt4ssl labels`.

Features at 100 Hz (MFCC) are reduced to the model's 50 Hz explicitly: MFCC frame 2t covers
samples [320t, 320t + 400), exactly the receptive field of CNN frame t, so label t is the
cluster of MFCC frame 2t. The count per utterance must then equal the CNN's frame count
for its sample count; any mismatch is an error naming the utterance, never a silent crop.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mt4ssl.data.labels import write_dict
from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from mt4ssl.features.dump import iter_shards, shard_lock
from mt4ssl.kmeans.learn import KMeansModel, Nearest, blocks, limit_threads, resolve_device
from mt4ssl.models.cnn import FRAME_RATE, num_frames
from mt4ssl.utils.io import atomic_open


def nearest(x: np.ndarray, centroids: np.ndarray, return_distances: bool = False,
            chunk: int = 1 << 15, device: str | torch.device = "cpu", engine: str = "auto"):
    """Index of the nearest centroid (squared L2, exact) for each row of x: faiss's flat index
    on CPU, torch on another device (`learn.Nearest`). x may be a large memory map: it is
    read in chunks of `chunk` rows."""
    device = torch.device(device)
    find = Nearest(torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device), engine)
    idx = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for s, xb in zip(range(0, len(x), chunk), blocks(x, device, chunk)):
        i, d = find(xb)
        idx[s:s + chunk], dist[s:s + chunk] = i.cpu().numpy(), d.cpu().numpy()
    return (idx, dist) if return_distances else idx


def to_model_rate(labels: np.ndarray, rate: int) -> np.ndarray:
    """Reduce labels at `rate` Hz (a multiple of 50) to the model's 50 Hz frames."""
    if rate % FRAME_RATE:
        raise InputError(f"features at {rate} Hz cannot be reduced to the model's {FRAME_RATE} Hz")
    return labels[:: rate // FRAME_RATE]


def dump_labels(feat_dir: Path, split: str, nshard: int, km_path: Path, manifest_path: Path,
                out_dir: Path, progress: bool = True, threads: int | None = None,
                device: str = "cpu") -> dict:
    """Label every utterance of `split`; write `{split}.km` and `dict.km.txt` atomically.

    `dict.km.txt` lists the symbols 0..K-1 with count 1 (as fairseq's HuBERT recipe writes
    it), so labelling several splits into one folder writes the same dictionary. One job
    writes a split's labels at a time (`locked_output`).
    """
    device = resolve_device(str(device))
    model = KMeansModel.load(km_path)
    manifest = read_manifest(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(len(model.centroids), dtype=np.int64)
    i, frames, t0 = 0, 0, time.time()
    bar = tqdm(total=len(manifest), desc=f"labels {split}", unit="utt", disable=not progress)
    with locked_output(out_dir / f"{split}.km", f"the labels of {split}") as f:
        for shard in iter_shards(feat_dir, split, nshard):
            if shard.meta["dim"] != model.centroids.shape[1]:
                raise InputError(f"{km_path}: centroids are {model.centroids.shape[1]}-d, "
                                 f"features in {feat_dir} are {shard.meta['dim']}-d")
            if shard.meta["entries"][0] != i:
                raise InputError(f"{feat_dir}: shard {shard.meta['shard']}/{nshard} starts at entry "
                                 f"{shard.meta['entries'][0]}, expected {i}")
            with limit_threads(threads):
                ids = nearest(shard.feats, model.centroids, device=device)
            frames += len(ids)
            for lab in np.split(ids, np.cumsum(shard.lens)[:-1]):
                lab = to_model_rate(lab, shard.meta["rate"])
                expected = num_frames(manifest.sizes[i])
                if len(lab) != expected:
                    raise InputError(f"{manifest.where(i)}: {len(lab)} labels at {FRAME_RATE} Hz, "
                                     f"but the model has {expected} frames for "
                                     f"{manifest.sizes[i]} samples")
                counts += np.bincount(lab, minlength=len(counts))
                f.write(" ".join(map(str, lab.tolist())) + "\n")
                i += 1
                bar.update()
        if i != len(manifest):
            raise InputError(f"{feat_dir}: shards cover {i} entries, {manifest_path} has {len(manifest)}")
    bar.close()
    write_dict(out_dir / "dict.km.txt", len(counts))
    seconds = time.time() - t0
    return {"utterances": i, "feature_frames": frames, "seconds": seconds,
            "frames_per_second": frames / max(seconds, 1e-9), "unused_clusters": int((counts == 0).sum())}


@contextlib.contextmanager
def locked_output(path: Path, what: str):
    """`atomic_open(path)` holding the job lock of `path` (`.NAME.lock`: a second job writing it
    stops with an error naming the first); the temporary file of a killed job is removed first."""
    with shard_lock(path, what):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        with atomic_open(path) as f:
            yield f


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("feat_dir", type=Path, help="feature folder written by `mt4ssl features`")
    p.add_argument("split", help="split to label")
    p.add_argument("km", type=Path, help="k-means model written by `mt4ssl kmeans`")
    p.add_argument("--manifest-dir", type=Path, required=True, help="folder with {split}.tsv")
    p.add_argument("--out", type=Path, required=True, help="folder for {split}.km + dict.km.txt")
    p.add_argument("--nshard", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: the libraries' own, usually all cores)")
    p.add_argument("--device", default="cpu",
                   help="where distances are computed: cpu (faiss), cuda, cuda:1, ... (torch)")


def run(args: argparse.Namespace) -> int:
    s = dump_labels(args.feat_dir, args.split, args.nshard, args.km,
                    args.manifest_dir / f"{args.split}.tsv", args.out, threads=args.threads,
                    device=args.device)
    print(f"{args.out / args.split}.km: {s['utterances']} utterances, "
          f"{s['feature_frames'] / s['seconds']:.0f} frames/s, {s['unused_clusters']} unused clusters")
    return 0
