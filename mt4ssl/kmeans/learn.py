"""Learn k-means centroids on a sample of dumped features: `mt4ssl kmeans`.

Backends:
  lloyd   (default) greedy k-means++ seeding on a pool of 64 frames per cluster, Lloyd
          iterations on a sub-sample of `points_per_centroid` (128) frames per cluster until
          the inertia improves by less than `tol` (1e-4) of itself, then `full_passes` (1)
          Lloyd steps over the whole sample, streamed in blocks. Distances run in faiss on CPU
          and in torch on any other device (`--device cuda`); the rest of the algorithm is the
          same torch code on every device.
  sklearn MiniBatchKMeans with fairseq's `simple_kmeans` settings (k-means++ init,
          n_init 20, batch 10000, max_iter 100, max_no_improvement 100): the parity option.
The sample (`--fraction` of the frames, or with `--sample utterances` of the utterances with
all their frames, as fairseq's learn_kmeans.py draws them) is read shard by shard into one
preallocated float32 array (the only copy of the sample in RAM: n x dim x 4 bytes); the shards
are read through a small buffer, not mapped.
The model file is an `.npz` with the centroids and a JSON header (backend, k, feature kind
and rate, sampled frames, inertia per frame on the sample).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mt4ssl.errors import InputError
from mt4ssl.features.dump import load_shard, shard_prefix
from mt4ssl.utils.io import atomic_open


@dataclass(frozen=True)
class KMeansModel:
    centroids: np.ndarray  # (k, dim) float32
    meta: dict

    def save(self, path: Path) -> None:
        with atomic_open(path, "wb") as f:
            np.savez(f, centroids=self.centroids, meta=np.array(json.dumps(self.meta)))

    @staticmethod
    def load(path: Path) -> "KMeansModel":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: k-means model not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                return KMeansModel(z["centroids"].astype(np.float32), json.loads(str(z["meta"])))
        except (ValueError, KeyError, OSError) as e:
            raise InputError(f"{path}: not a k-means model written by `mt4ssl kmeans` ({e})") from None


def read_rows(npy: Path, rows: np.ndarray, out: np.ndarray, buffer_bytes: int = 64 << 20,
              skip_bytes: int = 1 << 20) -> int:
    """out[j] = row rows[j] of the (frames, dim) float32 array in `npy`; `rows` sorted.
    Returns the bytes read.

    The file is read in contiguous spans through one buffer of `buffer_bytes` instead of being
    memory-mapped, so its pages never count in this process's resident memory. A span ends at
    a gap of more than `skip_bytes` between wanted rows: the gap is skipped, not read (whole
    utterances drawn from 10 % of them read about 10 % of the file; a 10 % draw of frames,
    with rows on nearly every page, reads all of it)."""
    with open(npy, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype != np.float32 or fortran or len(shape) != 2:
            raise InputError(f"{npy}: expected a C-order float32 (frames, dim) array, "
                             f"got {dtype} {shape}{' Fortran-order' if fortran else ''}")
        header, row_bytes = f.tell(), shape[1] * 4
        if len(rows) == 0:
            return 0
        span = max(1, min(buffer_bytes // row_bytes, int(rows[-1] - rows[0]) + 1))
        buf = np.empty((span, shape[1]), dtype=np.float32)
        # the j where a span must end: rows[j] is far past rows[j - 1] (and the last row)
        ends = np.append(np.flatnonzero(np.diff(rows) > max(1, skip_bytes // row_bytes)) + 1, len(rows))
        done = read = 0
        while done < len(rows):
            start = int(rows[done])
            end = min(done + int(np.searchsorted(rows[done:done + span], start + span)),
                      int(ends[np.searchsorted(ends, done, side="right")]))
            stop = int(rows[end - 1]) + 1
            f.seek(header + start * row_bytes)
            got = f.readinto(buf[:stop - start])
            if got != (stop - start) * row_bytes:
                raise InputError(f"{npy}: truncated (rows {start}..{stop} of {shape[0]} unreadable)")
            np.take(buf, rows[done:end] - start, axis=0, out=out[done:end], mode="clip")  # unbuffered
            done, read = end, read + got
        return read


SAMPLE_UNITS = ("frames", "utterances")


def sample_frames(feat_dir: Path, split: str, nshard: int, fraction: float, seed: int,
                  unit: str = "frames", progress: bool = False) -> tuple[np.ndarray, dict]:
    """A random `fraction` of the frames of all shards, and the shards' metadata.

    unit "frames": a uniform `fraction` of each shard's frames (numpy's default_rng(seed)).
    unit "utterances": fairseq `learn_kmeans.py --percent`'s draw, the same utterances for the
    same seed: ceil(fraction x utterances) of each shard, all their frames, drawn as
    `np.random.seed(seed)` then `np.random.choice(n, size, replace=False)` shard after shard;
    kept in file order (fairseq concatenates them in the drawn order).
    The sample is one array allocated once at its final size and filled shard by shard."""
    if not 0 < fraction <= 1:
        raise InputError(f"--fraction {fraction} must be in (0, 1]")
    if unit not in SAMPLE_UNITS:
        raise InputError(f"--sample {unit}: expected one of {', '.join(SAMPLE_UNITS)}")
    rng = np.random.default_rng(seed) if unit == "frames" else np.random.RandomState(seed)
    takes, kinds = [], set()
    for i in range(nshard):
        shard = load_shard(feat_dir, split, i, nshard)  # checks; its memory map is not read
        meta, (n, dim) = shard.meta, shard.feats.shape
        kinds.add((meta["kind"], meta["rate"], dim))
        if len(kinds) > 1:
            raise InputError(f"{feat_dir}: shards of {split} mix feature kinds/rates/dimensions")
        if unit == "frames":
            takes.append(np.sort(rng.choice(n, size=max(1, round(n * fraction)), replace=False)))
        else:
            lens = np.asarray(shard.lens, dtype=np.int64)
            utts = np.sort(rng.choice(len(lens), int(np.ceil(len(lens) * fraction)), replace=False))
            start, size = (np.cumsum(lens) - lens)[utts], lens[utts]
            within = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
            takes.append(np.repeat(start, size) + within)  # every row of every drawn utterance
    x = np.empty((sum(map(len, takes)), dim), dtype=np.float32)
    offset = 0
    for i, take in enumerate(tqdm(takes, desc=f"read {split} sample ({x.nbytes / 1e9:.1f} GB)",
                                  unit="shard", disable=not progress)):
        npy = shard_prefix(feat_dir, split, i, nshard).with_suffix(".npy")
        part = x[offset:offset + len(take)]
        read_rows(npy, take, part)
        for s in range(0, len(part), 1 << 16):  # checked in slices: no n x dim mask
            bad = ~np.isfinite(part[s:s + (1 << 16)]).all(1)
            if bad.any():
                raise InputError(f"{feat_dir}: the sampled features of {split} hold NaN or infinite "
                                 f"values (frame {take[s + int(bad.argmax())]} of {npy.name}; dumped "
                                 f"from bad audio or a diverged model?); dump them again")
        offset += len(take)
    return x, meta


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Run faiss (OpenMP), torch and the BLAS/OpenMP pools of numpy, scipy, scikit-learn on n
    threads."""
    if n is None:
        yield
        return
    import faiss
    from threadpoolctl import threadpool_limits

    before, before_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        faiss.omp_set_num_threads(before)
        torch.set_num_threads(before_torch)


class Nearest:
    """Nearest centroid (squared L2, exact) of blocks of rows: faiss's flat index on CPU,
    one torch matmul + min on other devices (or on CPU with engine="torch")."""

    def __init__(self, centroids: torch.Tensor, engine: str = "auto"):
        self.engine = ("faiss" if centroids.device.type == "cpu" else "torch") if engine == "auto" else engine
        if self.engine == "faiss":
            if centroids.device.type != "cpu":
                raise ValueError("the faiss engine runs on CPU tensors only")
            import faiss

            self.index = faiss.IndexFlatL2(centroids.shape[1])
            self.index.add(np.ascontiguousarray(centroids.numpy(), dtype=np.float32))
        elif self.engine == "torch":
            self.c, self.cc = centroids, (centroids * centroids).sum(1)
        else:
            raise ValueError(f"unknown engine {engine!r}")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index int64, squared distance float32) of the nearest centroid of each row of x."""
        if self.engine == "faiss":
            d, i = self.index.search(x.numpy(), 1)
            return torch.from_numpy(i[:, 0]), torch.from_numpy(d[:, 0]).clamp_(min=0)
        d, i = torch.addmm(self.cc, x, self.c.T, alpha=-2).min(1)
        return i, (d + (x * x).sum(1)).clamp_(min=0)


def blocks(x: np.ndarray | torch.Tensor, device: torch.device, block: int):
    """Consecutive row blocks of x as float32 tensors on `device` (no copy for a CPU block
    of a writable float32 array)."""
    for s in range(0, len(x), block):
        xb = x[s:s + block]
        if isinstance(xb, np.ndarray):
            xb = np.ascontiguousarray(xb, dtype=np.float32)
            # a read-only memory map (features on disk): copy the block (torch needs writable)
            xb = torch.from_numpy(xb if xb.flags.writeable else xb.copy())
        yield xb.to(device, torch.float32)


def kmeans_plusplus(x: torch.Tensor, k: int, seed: int, trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeds (Arthur and Vassilvitskii 2007; `trials` candidates a step,
    default 2 + ln k as in scikit-learn, the one that lowers the potential most is kept):
    k rows of x."""
    n, trials = len(x), trials or 2 + int(math.log(k))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    xx = (x * x).sum(1)
    rows = torch.empty(k, dtype=torch.int64, device=x.device)
    first = int(torch.randint(n, (1,), generator=gen, device=x.device))
    rows[0] = first
    closest = (xx - 2 * (x @ x[first]) + xx[first]).clamp_(min=0)
    pot = closest.sum(dtype=torch.float64)
    for c in range(1, k):
        r = torch.rand(trials, generator=gen, device=x.device, dtype=torch.float64) * pot
        cand = torch.searchsorted(closest.cumsum(0, dtype=torch.float64), r).clamp_(max=n - 1)
        d = torch.addmm(xx[cand, None] + xx[None], x[cand], x.T, alpha=-2).clamp_(min=0)
        torch.minimum(d, closest, out=d)
        pots = d.sum(1, dtype=torch.float64)
        best = int(pots.argmin())
        closest, pot = d[best], pots[best]
        rows[c] = cand[best]
    return x[rows]


def lloyd_step(x, centroids: torch.Tensor, block: int, engine: str = "auto",
               keep_distances: bool = False):
    """One pass of Lloyd's algorithm over the rows of x (streamed in blocks): the new
    centroids (empty clusters keep their old one), the counts, the inertia of the OLD
    centroids (sum of squared distances), and each row's distance if asked."""
    k, dim = centroids.shape
    nearest = Nearest(centroids, engine)
    sums = torch.zeros(k, dim, dtype=torch.float64, device=centroids.device)
    part = torch.empty(k, dim, dtype=torch.float32, device=centroids.device)
    counts = torch.zeros(k, dtype=torch.int64, device=centroids.device)
    obj = torch.zeros((), dtype=torch.float64, device=centroids.device)
    dists = []
    for xb in blocks(x, centroids.device, block):
        idx, dist = nearest(xb)
        idx, dist = idx.to(centroids.device), dist.to(centroids.device)
        sums += part.zero_().index_add_(0, idx, xb)  # float32 per block, float64 across blocks
        counts += torch.bincount(idx, minlength=k)
        obj += dist.sum(dtype=torch.float64)
        if keep_distances:
            dists.append(dist)
    new = centroids.clone()
    full = counts > 0
    new[full] = (sums[full] / counts[full, None]).float()
    return new, counts, float(obj), (torch.cat(dists) if keep_distances else None)


def fit_lloyd(x: np.ndarray, k: int, seed: int, device: str | torch.device = "cpu",
              points_per_centroid: int = 128, tol: float = 1e-4, max_iter: int = 100,
              full_passes: int = 1, init_points_per_centroid: int = 64, init_trials: int = 24,
              block: int = 1 << 15,
              engine: str = "auto", init: np.ndarray | None = None,
              stats: dict | None = None) -> np.ndarray:
    """k-means of the rows of x (n, dim); returns (k, dim) float32 centroids.

    1. greedy k-means++ with `init_trials` candidates a step on `init_points_per_centroid * k`
       rows of the sub-sample (or the given `init`); a larger pool and more candidates than
       scikit-learn's (30,000 rows, 2 + ln k) led Lloyd to lower optima on 768-d features;
    2. Lloyd on a random sub-sample of `points_per_centroid * k` rows (all rows if that is
       more; 0 = all) until the inertia improves by less than `tol` of itself, or
       `max_iter` iterations; a cluster left empty restarts at the sub-sample's row farthest
       from its centroid;
    3. if the sub-sample was not all of x: `full_passes` Lloyd steps over all rows, streamed
       in blocks of `block` rows (x is never copied on CPU; on other devices one block at a
       time is).
    `stats`, if given, receives the iterations, the inertia trace and the phase timings."""
    device = torch.device(device)
    n = len(x)
    if n < k:
        raise ValueError(f"{n} rows are fewer than k={k} clusters")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    m = n if points_per_centroid <= 0 else min(n, points_per_centroid * k)
    if m == n:  # iterate on x itself (a read-only memory map must be copied for torch)
        sub = np.ascontiguousarray(x, dtype=np.float32)
        sub = torch.from_numpy(sub if sub.flags.writeable else sub.copy()).to(device)
    else:
        sub = torch.from_numpy(np.asarray(x[np.sort(rng.choice(n, size=m, replace=False))],
                                          dtype=np.float32)).to(device)
    init_points = 0 if init is not None else min(m, init_points_per_centroid * k)
    if init is None:
        init_rows = np.sort(rng.choice(m, size=init_points, replace=False))
        c = kmeans_plusplus(sub[torch.from_numpy(init_rows).to(device)], k, seed, init_trials)
    else:
        c = torch.from_numpy(np.array(init, dtype=np.float32)).to(device)
        if c.shape != (k, x.shape[1]):
            raise ValueError(f"init has shape {tuple(c.shape)}, expected {(k, x.shape[1])}")
    t_init = time.perf_counter()
    trace, prev, converged = [], math.inf, False
    for _ in range(max_iter):
        new, counts, obj, dist = lloyd_step(sub, c, block, engine, keep_distances=True)
        trace.append(obj / m)
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty) and obj > 0:  # restart each at a far row (distinct rows, farthest first)
            new[empty] = sub[dist.topk(len(empty)).indices]
        c = new
        if prev - obj <= tol * obj and (len(empty) == 0 or obj == 0):
            converged = True
            break
        prev = obj
    t_sub = time.perf_counter()
    passes = 0
    if m < n:
        for _ in range(full_passes):
            c, _, obj, _ = lloyd_step(x, c, block, engine)
            trace.append(obj / n)
            passes += 1
    if stats is not None:
        stats.update(iterations=len(trace) - passes, converged=converged, full_passes=passes,
                     subsample=m, init_points=init_points, init_trials=init_trials,
                     inertia_trace=trace, seconds_init=t_init - t0, seconds_subsample=t_sub - t_init,
                     seconds_full=time.perf_counter() - t_sub)
    return c.cpu().numpy()


def resolve_device(name: str) -> torch.device:
    """A torch device from a --device value; InputError for a bad name or a device not here."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise InputError(f"--device {name}: no such CUDA device here "
                         f"({torch.cuda.device_count()} visible)")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def fit_sklearn(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, init="k-means++", max_iter=100, batch_size=10000,
                         tol=0.0, max_no_improvement=100, n_init=20, reassignment_ratio=0.0,
                         random_state=seed, compute_labels=False)
    km.fit(x)
    return km.cluster_centers_.astype(np.float32)


BACKENDS = {"lloyd": fit_lloyd, "sklearn": fit_sklearn}


def inertia(x: np.ndarray, centroids: np.ndarray, device: str | torch.device = "cpu",
            block: int = 1 << 15) -> float:
    """Mean squared distance of each row of x to its nearest centroid."""
    nearest = Nearest(torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device))
    total = sum(float(nearest(xb)[1].sum(dtype=torch.float64)) for xb in blocks(x, torch.device(device), block))
    return total / len(x)


def learn(feat_dir: Path, split: str, nshard: int, k: int, out: Path, backend: str = "lloyd",
          fraction: float = 0.1, seed: int = 0, threads: int | None = None, device: str = "cpu",
          sample: str = "frames", **options) -> KMeansModel:
    """Sample (`sample_frames`, `sample` = its unit), fit, save. `options` go to the lloyd
    backend (points_per_centroid, tol, ...)."""
    if backend != "lloyd" and (str(device) != "cpu" or options):
        raise InputError(f"--backend {backend} runs on CPU only, with fairseq's settings")
    device = resolve_device(str(device))
    x, feat_meta = sample_frames(feat_dir, split, nshard, fraction, seed, sample, progress=True)
    if x.shape[0] < k:
        raise InputError(f"{feat_dir}: {x.shape[0]} sampled frames are fewer than k={k} clusters "
                         f"(raise --fraction or use more data)")
    print(f"k-means: k={k} on {len(x):,} x {x.shape[1]} frames ({backend}, {device})...",
          file=sys.stderr, flush=True)
    with limit_threads(threads):
        t0 = time.time()
        stats: dict = {}
        if backend == "lloyd":
            centroids = fit_lloyd(x, k, seed, device=device, stats=stats, **options)
        else:
            centroids = BACKENDS[backend](x, k, seed)
        fit_seconds = time.time() - t0
        model = KMeansModel(centroids, {
            "backend": backend, "k": k, "dim": int(x.shape[1]), "kind": feat_meta["kind"],
            "rate": feat_meta["rate"], "split": split, "fraction": fraction, "sample": sample,
            "seed": seed,
            "frames": int(x.shape[0]), "fit_seconds": round(fit_seconds, 2),
            **({"options": options, "iterations": stats["iterations"],
                "converged": stats["converged"], "full_passes": stats["full_passes"]}
               if backend == "lloyd" else {}),
            "inertia_per_frame": inertia(x, centroids, device),
        })
    model.save(out)
    return model


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("feat_dir", type=Path, help="feature folder written by `mt4ssl features`")
    p.add_argument("split", help="split whose features to learn on")
    p.add_argument("out", type=Path, help="k-means model file (.npz)")
    p.add_argument("--nshard", type=int, default=1)
    p.add_argument("-k", "--clusters", type=int, default=100)
    p.add_argument("--backend", choices=sorted(BACKENDS), default="lloyd")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="fraction of frames (or of utterances, --sample utterances) to fit on")
    p.add_argument("--sample", choices=SAMPLE_UNITS, default="frames",
                   help="frames: a uniform fraction of all frames; utterances: fairseq "
                        "learn_kmeans.py --percent's draw (the same utterances for the same "
                        "--seed, all their frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: the libraries' own, usually all cores)")
    p.add_argument("--device", default="cpu", help="lloyd: cpu, cuda, cuda:1, ...")
    p.add_argument("--points-per-centroid", type=int, default=128,
                   help="lloyd: iterate on a sub-sample of this many frames per cluster, then "
                        "one pass over the whole sample (0: iterate on the whole sample)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="lloyd: stop when the inertia improves by less than this fraction")
    p.add_argument("--max-iter", type=int, default=100, help="lloyd: at most this many iterations")


def run(args: argparse.Namespace) -> int:
    if args.clusters < 2:
        raise InputError(f"-k {args.clusters}: need at least 2 clusters")
    options = {}
    if args.backend == "lloyd":
        options = {"points_per_centroid": args.points_per_centroid, "tol": args.tol,
                   "max_iter": args.max_iter}
    m = learn(args.feat_dir, args.split, args.nshard, args.clusters, args.out, args.backend,
              args.fraction, args.seed, args.threads, args.device, args.sample, **options)
    print(f"{args.out}: k={m.meta['k']} on {m.meta['frames']} frames ({m.meta['backend']}, "
          f"{m.meta['fit_seconds']} s), inertia/frame {m.meta['inertia_per_frame']:.3f}")
    return 0
