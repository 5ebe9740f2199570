"""Sharded, resumable feature dumping: `mt4ssl features`.

A manifest is cut into `nshard` contiguous shards (so a SLURM array runs one shard a task).
Shard i of n of split S is three files in the feature folder:
  `S_i_n.npy`   all frames of the shard, (frames, dim) float32
  `S_i_n.len`   frames per utterance, one line per manifest entry
  `S_i_n.json`  what was dumped (kind, rate, dim, manifest, entries); written last
A shard whose `.json` exists is finished and is not recomputed. While a shard is written, its
job holds an exclusive lock on `.S_i_n.lock` beside it (removed at the end; the lock is
released when the process ends, even by kill -9): a second job on the same shard stops with
an error naming the first one's pid instead of writing the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from mt4ssl.features import mfcc
from mt4ssl.utils.io import atomic_open, atomic_write_text
from mt4ssl.utils.io import exclusive_lock as shard_lock


@dataclass(frozen=True)
class FeatureKind:
    """What to dump: `compute(wav)` returns one (frames, dim) array per output; output j
    goes to the sub-folder `outputs[j]` of the feature folder ("" = the folder itself)."""

    name: str
    rate: int  # frames per second
    dim: int
    num_frames: Callable[[int], int]
    compute: Callable[[np.ndarray], Sequence[np.ndarray]]
    outputs: tuple[str, ...] = ("",)


def mfcc_kind(args: argparse.Namespace | None = None) -> FeatureKind:
    return FeatureKind("mfcc", mfcc.RATE, mfcc.DIM, mfcc.num_frames, lambda wav: [mfcc.mfcc39(wav)])


KINDS: dict[str, Callable[[argparse.Namespace], FeatureKind]] = {"mfcc": mfcc_kind}


def shard_range(total: int, shard: int, nshard: int) -> tuple[int, int]:
    """Entries [start, end) of shard `shard` of `nshard` (fairseq's split)."""
    if not 0 <= shard < nshard:
        raise InputError(f"--shard {shard} must be in [0, --nshard {nshard})")
    return round(total / nshard * shard), round(total / nshard * (shard + 1))


def shard_prefix(feat_dir: Path, split: str, shard: int, nshard: int) -> Path:
    return Path(feat_dir) / f"{split}_{shard}_{nshard}"


def dump_shard(kind: FeatureKind, manifest_path: Path, feat_dir: Path, split: str,
               shard: int = 0, nshard: int = 1, progress: bool = True) -> Path:
    """Compute and write one shard (of every output) unless it is finished; return the
    prefix of the first output."""
    prefixes = [shard_prefix(Path(feat_dir) / out, split, shard, nshard) for out in kind.outputs]
    if all(p.with_suffix(".json").exists() for p in prefixes):
        return prefixes[0]
    with shard_lock(prefixes[0], f"shard {shard}/{nshard} of {split}"):
        if all(p.with_suffix(".json").exists() for p in prefixes):  # finished by the job that held the lock
            return prefixes[0]
        _write_shard(kind, manifest_path, prefixes, split, shard, nshard, progress)
    return prefixes[0]


def _write_shard(kind: FeatureKind, manifest_path: Path, prefixes: list[Path], split: str,
                 shard: int, nshard: int, progress: bool) -> None:
    manifest = read_manifest(manifest_path)
    start, end = shard_range(len(manifest), shard, nshard)
    lens = [kind.num_frames(n) for n in manifest.sizes[start:end]]
    for i, n in zip(range(start, end), lens):
        if n == 0:
            raise InputError(f"{manifest.where(i)}: {manifest.sizes[i]} samples are too short "
                             f"for one {kind.name} frame")
    # Frames are known from the sample counts: fill memory-mapped arrays, then rename them.
    npys = [p.with_suffix(".npy") for p in prefixes]
    tmps = [npy.with_name(f".{npy.name}.tmp") for npy in npys]
    t0 = time.time()
    try:
        feats = []
        for tmp in tmps:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            feats.append(np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                   shape=(sum(lens), kind.dim)))
        offset = 0
        for i, n in zip(tqdm(range(start, end), desc=f"{kind.name} {split} {shard}/{nshard}",
                             unit="utt", disable=not progress), lens):
            for out, x in zip(feats, kind.compute(manifest.read(i)), strict=True):
                if x.shape != (n, kind.dim):
                    raise RuntimeError(f"{manifest.where(i)}: {kind.name} gave {x.shape}, "
                                       f"expected {(n, kind.dim)}")
                if not np.isfinite(x).all():  # never written: k-means and labels would take them silently
                    raise InputError(f"{manifest.where(i)}: {kind.name} features hold NaN or infinite values")
                out[offset:offset + n] = x
            offset += n
        for out, tmp, npy in zip(feats, tmps, npys):
            out.flush()
            tmp.replace(npy)
        del feats
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    for prefix in prefixes:
        with atomic_open(prefix.with_suffix(".len")) as f:
            f.writelines(f"{n}\n" for n in lens)
        atomic_write_text(prefix.with_suffix(".json"), json.dumps({
            "kind": kind.name, "rate": kind.rate, "dim": kind.dim, "split": split,
            "manifest": str(Path(manifest_path).resolve()), "shard": shard, "nshard": nshard,
            "entries": [start, end], "frames": int(sum(lens)), "seconds": round(time.time() - t0, 2),
        }, indent=1) + "\n")


@dataclass(frozen=True)
class Shard:
    feats: np.ndarray  # memory-mapped (frames, dim)
    lens: list[int]
    meta: dict


def load_shard(feat_dir: Path, split: str, shard: int, nshard: int) -> Shard:
    prefix = shard_prefix(feat_dir, split, shard, nshard)
    meta_path = prefix.with_suffix(".json")
    if not meta_path.exists():
        raise InputError(f"{meta_path}: shard {shard}/{nshard} of {split} is missing or unfinished "
                         f"(run `mt4ssl features ... --shard {shard} --nshard {nshard}`)")
    meta = json.loads(meta_path.read_text())
    feats = np.load(prefix.with_suffix(".npy"), mmap_mode="r")
    lens = [int(x) for x in prefix.with_suffix(".len").read_text().split()]
    if sum(lens) != feats.shape[0]:
        raise InputError(f"{prefix}.len: {sum(lens)} frames listed, {prefix}.npy has {feats.shape[0]}")
    return Shard(feats, lens, meta)


def iter_shards(feat_dir: Path, split: str, nshard: int) -> Iterator[Shard]:
    for i in range(nshard):
        yield load_shard(feat_dir, split, i, nshard)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=sorted(KINDS), help="feature kind")
    p.add_argument("manifest_dir", type=Path, help="folder with {split}.tsv")
    p.add_argument("split", help="manifest split name, e.g. train")
    p.add_argument("out", type=Path, help="feature folder")
    p.add_argument("--shard", type=int, default=0, help="this shard's index (SLURM array task id)")
    p.add_argument("--nshard", type=int, default=1, help="number of shards")
    p.add_argument("--all-shards", action="store_true",
                   help="dump every shard 0..nshard-1 in this process (finished ones are skipped)")


def run(args: argparse.Namespace) -> int:
    kind = KINDS[args.kind](args)
    manifest = args.manifest_dir / f"{args.split}.tsv"
    shards = range(args.nshard) if args.all_shards else [args.shard]
    for shard in shards:
        prefix = shard_prefix(args.out, args.split, shard, args.nshard)
        existed = prefix.with_suffix(".json").exists()
        dump_shard(kind, manifest, args.out, args.split, shard, args.nshard)
        print(f"{prefix}.npy: {'already done, kept' if existed else 'written'}")
    return 0
