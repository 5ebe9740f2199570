"""Learn k-means centroids on a sample of dumped features: `mt4ssl kmeans`.

Backends:
  faiss   (default) k-means++ seeding, then full-batch Lloyd iterations in faiss; the
          best of a few restarts is kept.
  sklearn MiniBatchKMeans with fairseq's `simple_kmeans` settings (k-means++ init,
          n_init 20, batch 10000, max_iter 100, max_no_improvement 100): the parity option.
The model file is an `.npz` with the centroids and a JSON header (backend, k, feature kind
and rate, sampled frames, inertia per frame on the sample).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mt4ssl.errors import InputError
from mt4ssl.features.dump import iter_shards
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


def sample_frames(feat_dir: Path, split: str, nshard: int, fraction: float, seed: int) -> tuple[np.ndarray, dict]:
    """A uniform random `fraction` of all frames of all shards, and the shards' metadata."""
    if not 0 < fraction <= 1:
        raise InputError(f"--fraction {fraction} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    parts, meta = [], None
    for shard in iter_shards(feat_dir, split, nshard):
        if meta is not None and (shard.meta["kind"], shard.meta["rate"]) != (meta["kind"], meta["rate"]):
            raise InputError(f"{feat_dir}: shards of {split} mix feature kinds/rates")
        meta = shard.meta
        n = shard.feats.shape[0]
        take = np.sort(rng.choice(n, size=max(1, round(n * fraction)), replace=False))
        parts.append(np.asarray(shard.feats[take], dtype=np.float32))
    return np.concatenate(parts), meta


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Run faiss (OpenMP) and BLAS/OpenMP pools of numpy, scipy, scikit-learn on n threads."""
    if n is None:
        yield
        return
    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def fit_faiss(x: np.ndarray, k: int, seed: int, niter: int = 50, nredo: int = 2) -> np.ndarray:
    """Lloyd iterations in faiss from k-means++ seeds (faiss' own init is uniform random,
    which strands centroids in local minima); the best of `nredo` restarts is kept."""
    import faiss
    from sklearn.cluster import kmeans_plusplus

    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    best, best_obj = None, np.inf
    for r in range(nredo):
        # k-means++ on a subsample: seeding costs O(n k d log k), Lloyd's steps O(n k d).
        sub = x[rng.choice(len(x), size=min(len(x), 64 * k), replace=False)]
        init, _ = kmeans_plusplus(sub, k, random_state=seed + r)
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + r, verbose=False,
                          max_points_per_centroid=len(x) // k + 1)
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        if km.obj[-1] < best_obj:
            best, best_obj = km.centroids.copy(), km.obj[-1]
    return best


def fit_sklearn(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, init="k-means++", max_iter=100, batch_size=10000,
                         tol=0.0, max_no_improvement=100, n_init=20, reassignment_ratio=0.0,
                         random_state=seed, compute_labels=False)
    km.fit(x)
    return km.cluster_centers_.astype(np.float32)


BACKENDS = {"faiss": fit_faiss, "sklearn": fit_sklearn}


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of each row of x to its nearest centroid."""
    from mt4ssl.kmeans.apply import nearest

    _, dist = nearest(x, centroids, return_distances=True)
    return float(dist.mean())


def learn(feat_dir: Path, split: str, nshard: int, k: int, out: Path, backend: str = "faiss",
          fraction: float = 0.1, seed: int = 0, threads: int | None = None) -> KMeansModel:
    x, feat_meta = sample_frames(feat_dir, split, nshard, fraction, seed)
    if not np.isfinite(x).all():
        raise InputError(f"{feat_dir}: the sampled features of {split} hold NaN or infinite values "
                         f"(dumped from bad audio or a diverged model?); dump them again")
    if x.shape[0] < k:
        raise InputError(f"{feat_dir}: {x.shape[0]} sampled frames are fewer than k={k} clusters "
                         f"(raise --fraction or use more data)")
    with limit_threads(threads):
        t0 = time.time()
        centroids = BACKENDS[backend](x, k, seed)
        fit_seconds = time.time() - t0
        model = KMeansModel(centroids, {
            "backend": backend, "k": k, "dim": int(x.shape[1]), "kind": feat_meta["kind"],
            "rate": feat_meta["rate"], "split": split, "fraction": fraction, "seed": seed,
            "frames": int(x.shape[0]), "fit_seconds": round(fit_seconds, 2),
            "inertia_per_frame": inertia(x, centroids),
        })
    model.save(out)
    return model


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("feat_dir", type=Path, help="feature folder written by `mt4ssl features`")
    p.add_argument("split", help="split whose features to learn on")
    p.add_argument("out", type=Path, help="k-means model file (.npz)")
    p.add_argument("--nshard", type=int, default=1)
    p.add_argument("-k", "--clusters", type=int, default=100)
    p.add_argument("--backend", choices=sorted(BACKENDS), default="faiss")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of frames to fit on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: the libraries' own, usually all cores)")


def run(args: argparse.Namespace) -> int:
    if args.clusters < 2:
        raise InputError(f"-k {args.clusters}: need at least 2 clusters")
    m = learn(args.feat_dir, args.split, args.nshard, args.clusters, args.out, args.backend,
              args.fraction, args.seed, args.threads)
    print(f"{args.out}: k={m.meta['k']} on {m.meta['frames']} frames ({m.meta['backend']}, "
          f"{m.meta['fit_seconds']} s), inertia/frame {m.meta['inertia_per_frame']:.3f}")
    return 0
