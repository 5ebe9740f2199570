"""k-means at LibriSpeech scale: the project's fit (`--backend lloyd`) against scikit-learn
MiniBatchKMeans with fairseq's simple_kmeans settings, k = 500 on >= 1 M frames, fit time,
inertia on the fitted frames and on held-out frames, peak RSS projected to HuBERT iteration 2
(17 M frames x 768), and label-dump throughput per core at 768-d.

    python benchmarks/kmeans_scale.py --dim 39  [--frames 1200000] [-k 500] [--threads 2]
    python benchmarks/kmeans_scale.py --dim 768 [--frames 1000000] [-k 500] [--threads 2]

Features (written as feature shards, read back by `mt4ssl kmeans`' own sampler):
  39-d   the tiny recipe's MFCC frames (`exp/tiny/mfcc`, `bash recipes/tiny/run.sh --stop-stage
         2`): train tiled to --frames, each copy with Gaussian noise of 0.1 x each dimension's
         std; held-out: the test split's frames, tiled and noised the same way.
  768-d  a Gaussian mixture standing in for layer features: 2,000 components (Zipf weights)
         whose means span a 256-d subspace with a decaying spectrum, noise of rank 128 (also
         decaying) plus an isotropic floor, per-component scales; held-out frames are new
         draws from the same mixture.
Each fit runs in a fresh process (the sample read with `sample_frames`, then the fit), so
its peak RSS (VmHWM) is its own. Both fit the same frames on the same threads. Writes the
section `k-means at scale: <dim>-d` of results/perf.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HUBERT_IT2 = 17_000_000  # frames: 10 % of 960 h at 50 Hz
UTT = 500  # frames per synthetic utterance (10 s at 50 Hz)


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_split(feat_dir: Path, split: str, chunks, n: int, dim: int, rate: int, nshard: int) -> None:
    """Shards of `split` in the format of `mt4ssl features`, filled from an iterator of
    (rows, dim) float32 chunks that yields n rows in all."""
    from mt4ssl.features.dump import shard_prefix

    feat_dir.mkdir(parents=True, exist_ok=True)
    utts = -(-n // UTT)
    bounds = [round(utts / nshard * i) for i in range(nshard + 1)]
    it, pending = iter(chunks), np.empty((0, dim), np.float32)
    for s in range(nshard):
        lens = [min(UTT, n - u * UTT) for u in range(bounds[s], bounds[s + 1])]
        prefix = shard_prefix(feat_dir, split, s, nshard)
        out = np.lib.format.open_memmap(prefix.with_suffix(".npy"), "w+", np.float32, (sum(lens), dim))
        filled = 0
        while filled < len(out):
            if not len(pending):
                pending = next(it)
            take = min(len(out) - filled, len(pending))
            out[filled:filled + take], pending = pending[:take], pending[take:]
            filled += take
        out.flush()
        del out
        prefix.with_suffix(".len").write_text("".join(f"{x}\n" for x in lens))
        prefix.with_suffix(".json").write_text(json.dumps({
            "kind": "mfcc" if dim == 39 else f"layer-{dim}", "rate": rate, "dim": dim, "split": split,
            "shard": s, "nshard": nshard, "entries": [bounds[s], bounds[s + 1]], "frames": sum(lens)}))


def mixture_chunks(n: int, dim: int, seed: int, components: int = 2000, rank: int = 256,
                   noise_rank: int = 128, chunk: int = 65536):
    p = np.random.default_rng(1234)  # the mixture: the same for train and held-out
    qm = np.linalg.qr(p.standard_normal((dim, rank)))[0].T.astype(np.float32)
    qn = np.linalg.qr(p.standard_normal((dim, noise_rank)))[0].T.astype(np.float32)
    means = ((p.standard_normal((components, rank)) * np.arange(1, rank + 1) ** -0.6) @ qm * 6).astype(np.float32)
    w = np.arange(1, components + 1) ** -0.8
    w = p.permutation(w / w.sum())
    scale = np.exp(0.3 * p.standard_normal(components)).astype(np.float32)
    spec = (np.arange(1, noise_rank + 1) ** -0.5).astype(np.float32)
    r = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        comp = r.choice(components, size=b, p=w)
        z = r.standard_normal((b, noise_rank), dtype=np.float32) * spec
        yield means[comp] + scale[comp, None] * (z @ qn + 0.15 * r.standard_normal((b, dim), dtype=np.float32))


def tiled_chunks(frames: np.ndarray, n: int, seed: int, noise: float = 0.1):
    r = np.random.default_rng(seed)
    std = frames.std(0).astype(np.float32)
    for s in range(0, n, len(frames)):
        b = min(len(frames), n - s)
        yield frames[:b] + noise * std * r.standard_normal((b, frames.shape[1]), dtype=np.float32)


def make_features(args, work: Path) -> str:
    if args.dim == 39:
        from mt4ssl.kmeans.learn import sample_frames

        src = {split: sample_frames(args.mfcc, split, args.mfcc_nshard, 1.0, 0)[0] for split in ("train", "test")}
        write_split(work, "train", tiled_chunks(src["train"], args.frames, 1), args.frames, 39, 100, args.nshard)
        write_split(work, "valid", tiled_chunks(src["test"], args.heldout, 2), args.heldout, 39, 100, 1)
        where = args.mfcc.relative_to(ROOT) if args.mfcc.is_relative_to(ROOT) else args.mfcc
        return (f"MFCC 39-d of the tiny synthetic corpus (`{where}`): {len(src['train']):,} train frames "
                f"tiled to {args.frames:,}, each copy plus Gaussian noise of 0.1 x each dimension's std; "
                f"held out: the {len(src['test']):,} test-split frames tiled and noised the same way to "
                f"{args.heldout:,}")
    write_split(work, "train", mixture_chunks(args.frames, args.dim, 1), args.frames, args.dim, 50, args.nshard)
    write_split(work, "valid", mixture_chunks(args.heldout, args.dim, 2), args.heldout, args.dim, 50, 1)
    return (f"synthetic {args.dim}-d layer-like features: a Gaussian mixture of 2,000 components (Zipf "
            f"weights 1/i^0.8) whose means span a 256-d subspace (spectrum i^-0.6), anisotropic noise of "
            f"rank 128 (spectrum i^-0.5) plus an isotropic floor, per-component scales (log-normal, "
            f"sigma 0.3); {args.frames:,} frames to fit, {args.heldout:,} new draws held out")


def child(args) -> None:
    """One fit in this fresh process: read the sample, fit, save the centroids, print JSON."""
    from mt4ssl.kmeans.learn import fit_lloyd, fit_sklearn, limit_threads, sample_frames

    base, load = status_bytes("VmRSS"), os.getloadavg()[0]
    t0 = time.perf_counter()
    x, _ = sample_frames(args.feats, "train", args.nshard, args.fraction, args.seed)
    read_s = time.perf_counter() - t0
    stats: dict = {}
    with limit_threads(args.threads):
        t0 = time.perf_counter()
        if args.child == "lloyd":
            c = fit_lloyd(x, args.k, args.seed, device=args.device, stats=stats)
        else:
            c = fit_sklearn(x, args.k, args.seed)
        fit_s = time.perf_counter() - t0
    np.save(args.out, c)
    print(json.dumps({"read_s": read_s, "fit_s": fit_s, "frames": len(x), "sample_bytes": x.nbytes,
                      "rss_base": base, "peak_rss": status_bytes("VmHWM"), "stats": stats,
                      "load": [load, os.getloadavg()[0]]}))


def run_child(args, backend: str, seed: int, out: Path, fraction: float = 1.0, device: str = "cpu") -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--feats", str(args.work_feats), "--nshard",
           str(args.nshard), "-k", str(args.k), "--seed", str(seed), "--threads", str(args.threads),
           "--fraction", str(fraction), "--device", device, "--out", str(out), "--dim", str(args.dim)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label_throughput(feats: Path, km: Path, tmp: Path, n: int) -> dict:
    """frames/s of `mt4ssl labels` (1 thread) on the held-out split, and of the assignment
    alone with the torch engine (the code a GPU runs) on 1 CPU thread, and on CUDA if here."""
    import torch

    from mt4ssl.kmeans.apply import dump_labels, nearest
    from mt4ssl.kmeans.learn import KMeansModel, limit_threads, sample_frames
    from mt4ssl.models.cnn import num_frames

    lens = [int(x) for x in (feats / "valid_0_1.len").read_text().split()]
    samples = {m: 400 + 320 * (m - 1) for m in set(lens)}
    assert all(num_frames(samples[m]) == m for m in lens)
    (tmp / "valid.tsv").write_text("/synthetic\n" + "".join(f"u{i}.flac\t{samples[m]}\n" for i, m in enumerate(lens)))
    runs = [dump_labels(feats, "valid", 1, km, tmp / "valid.tsv", tmp / "lab", progress=False, threads=1)
            for _ in range(3)]
    x, _ = sample_frames(feats, "valid", 1, 1.0, 0)
    c = KMeansModel.load(km).centroids
    out = {"dump": float(np.median([r["frames_per_second"] for r in runs]))}
    with limit_threads(1):
        for engine in ("faiss", "torch"):
            t = []
            for _ in range(3):
                t0 = time.perf_counter()
                nearest(x, c, engine=engine)
                t.append(time.perf_counter() - t0)
            out[f"assign_{engine}"] = len(x) / float(np.median(t))
    if torch.cuda.is_available():
        nearest(x[:65536], c, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nearest(x, c, device="cuda")
        torch.cuda.synchronize()
        out["assign_cuda"] = len(x) / (time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, choices=(39, 768), required=True)
    p.add_argument("--frames", type=int, default=None, help="frames to fit on (default 1.2 M at 39-d, 1 M at 768-d)")
    p.add_argument("--heldout", type=int, default=200_000)
    p.add_argument("-k", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of our fit")
    p.add_argument("--sklearn-seeds", type=int, nargs="+", default=None,
                   help="seeds of scikit-learn's fit (default 0 1 2 at 39-d, 0 at 768-d: ~6 min a fit)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--nshard", type=int, default=4)
    p.add_argument("--mfcc", type=Path, default=ROOT / "exp/tiny/mfcc")
    p.add_argument("--mfcc-nshard", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="folder for the generated shards (default: a temp dir)")
    p.add_argument("--skip-sklearn", action="store_true", help="ours only (no reference, no section written)")
    p.add_argument("--no-write", action="store_true", help="print the section, do not write results/perf.md")
    # child-process options
    p.add_argument("--child", choices=("lloyd", "sklearn"), help=argparse.SUPPRESS)
    p.add_argument("--feats", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    args.frames = args.frames or (1_200_000 if args.dim == 39 else 1_000_000)
    args.sklearn_seeds = args.sklearn_seeds or ([0, 1, 2] if args.dim == 39 else [0])

    import torch

    from mt4ssl.kmeans.learn import KMeansModel, inertia

    t_start, load = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        args.work_feats = tmp / "feats"
        t0 = time.perf_counter()
        what = make_features(args, args.work_feats)
        print(f"features written in {time.perf_counter() - t0:.0f} s: {what}", flush=True)
        from mt4ssl.kmeans.learn import sample_frames

        def frames(split, nshard):  # fitted and held-out frames, as the fits read them
            return sample_frames(args.work_feats, split, nshard, 1.0, 0)[0]

        results = {}
        backends = ["lloyd"] + ([] if args.skip_sklearn else ["sklearn"])
        if torch.cuda.is_available():
            backends.insert(1, "lloyd-cuda")
        for backend in backends:
            for seed in (args.sklearn_seeds if backend == "sklearn" else args.seeds):
                out = tmp / f"{backend}_{seed}.npy"
                r = run_child(args, backend.split("-")[0], seed, out, device="cuda" if "cuda" in backend else "cpu")
                r["centroids"] = np.load(out)
                results.setdefault(backend, []).append(r)
                print(f"{backend} seed {seed}: fit {r['fit_s']:.1f} s (read {r['read_s']:.1f} s), "
                      f"peak RSS {r['peak_rss'] / 1e9:.2f} GB, {r['stats'].get('iterations', '')} iterations",
                      flush=True)
        x, held = frames("train", args.nshard), frames("valid", 1)
        for rs in results.values():
            for r in rs:
                r["inertia"], r["inertia_held"] = inertia(x, r["centroids"]), inertia(held, r["centroids"])
        del x, held
        print({b: [(round(r["inertia"], 4), round(r["inertia_held"], 4)) for r in rs] for b, rs in results.items()})

        mem = []
        if args.dim == 768:  # RSS against sample size: two sizes, a line, projected to 17 M frames
            r = run_child(args, "lloyd", args.seeds[0], tmp / "mem.npy", fraction=0.25)
            for r in (r, results["lloyd"][0]):
                mem.append((r["sample_bytes"], r["peak_rss"], r["rss_base"], r["frames"]))
            km = tmp / "km.npz"
            KMeansModel(results["lloyd"][0]["centroids"], {"k": args.k}).save(km)
            dump = label_throughput(args.work_feats, km, tmp, args.heldout)
    if args.skip_sklearn:
        return
    write_report(args, what, results, mem, dump if args.dim == 768 else None, load, time.time() - t_start)


def write_report(args, what, results, mem, dump, load, seconds) -> None:
    import torch

    def med(rs, key):
        return float(np.median([r[key] for r in rs]))

    ours, ref = results["lloyd"], results["sklearn"]
    rows = []
    names = {"lloyd": "mt4ssl `--backend lloyd` (default), CPU", "lloyd-cuda": "mt4ssl `--backend lloyd --device cuda`",
             "sklearn": "sklearn MiniBatchKMeans (fairseq settings)"}
    def spread(rs, key, fmt):
        v = [r[key] for r in rs]
        return f"{np.mean(v):{fmt}}" + (f" ({min(v):{fmt}}-{max(v):{fmt}})" if len(v) > 1 else "")

    for b, rs in results.items():
        it = ", ".join(f"{r['stats']['iterations']} + {r['stats']['full_passes']}" for r in rs) if "lloyd" in b else "-"
        rows.append(f"| {names[b]} | {med(rs, 'fit_s'):.1f} ({min(r['fit_s'] for r in rs):.1f}-"
                    f"{max(r['fit_s'] for r in rs):.1f}) | {med(ref, 'fit_s') / med(rs, 'fit_s'):.1f}x | "
                    f"{spread(rs, 'inertia', '.4f')} | {spread(rs, 'inertia_held', '.4f')} | "
                    f"{it} | {med(rs, 'peak_rss') / 1e9:.2f} |")
    loads = [x for rs in results.values() for r in rs for x in r["load"]]
    d_train = (np.mean([r["inertia"] for r in ours]) / np.mean([r["inertia"] for r in ref]) - 1) * 100
    d_held = (np.mean([r["inertia_held"] for r in ours]) / np.mean([r["inertia_held"] for r in ref]) - 1) * 100
    st = ours[0]["stats"]
    body = f"""{what}. k = {args.k}; seeds {args.seeds} (ours), {args.sklearn_seeds} (scikit-learn); {args.threads} thread(s) each (faiss, torch, BLAS and
OpenMP pools limited alike); each fit in a fresh process on the same frames (`sample_frames`, all
frames of the train shards), timed from the sample in RAM to the centroids. Inertia = mean squared
distance to the nearest centroid, of the fitted frames and of the held-out frames. CPU capability
`{torch.backends.cpu.get_cpu_capability()}`, torch {torch.__version__}; load average at the start
{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores, 1-min load {min(loads):.1f}-{max(loads):.1f}
at the starts and ends of the fits (other users' jobs share the machine); the run took {seconds / 60:.1f} min.

| k-means | fit (s), median (min-max) | speed-up | inertia, fitted frames, mean (min-max) | inertia, held-out frames | iterations (sub-sample + full passes) | peak RSS (GB) |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- Speed-up over scikit-learn: **{med(ref, 'fit_s') / med(ours, 'fit_s'):.1f}x**; inertia relative to
  scikit-learn: **{d_train:+.2f}%** on the fitted frames, **{d_held:+.2f}%** on held-out frames.
- Ours (the defaults): greedy k-means++ ({st['init_trials']} candidates a step) on {st['init_points']:,} frames,
  Lloyd on a {st['subsample']:,}-frame sub-sample ({st['subsample'] // args.k} per centroid) until the inertia
  improves by < 1e-4 of itself, then one Lloyd step over all {ours[0]['frames']:,} frames; time split
  (seed {args.seeds[0]}): seeding {st['seconds_init']:.1f} s, sub-sample {st['seconds_subsample']:.1f} s, full pass {st['seconds_full']:.1f} s.
"""
    if "lloyd-cuda" not in results:
        body += ("- No CUDA device here: `--device cuda` (the same code, torch distances on the device; "
                 "tests run that engine on CPU) is not measured.\n")
    if mem:
        (b1, p1, base1, n1), (b2, p2, base2, n2) = mem
        slope = (p2 - p1) / (b2 - b1)
        target = HUBERT_IT2 * args.dim * 4
        proj = p2 + slope * (target - b2)
        mem = int(np.ceil(proj / 1e9 * 1.1 / 8) * 8)
        body += f"""
Memory (768-d, ours, CPU): peak RSS {p1 / 1e9:.2f} GB with a {n1:,}-frame sample ({b1 / 1e9:.2f} GB)
and {p2 / 1e9:.2f} GB with {n2:,} frames ({b2 / 1e9:.2f} GB); RSS after the imports {base2 / 1e9:.2f} GB.
Each further GB of sample costs **{slope:.2f} GB** of RSS (one copy: the sample array; shards
are read through a 64 MB buffer, never mapped), so HuBERT iteration 2's sample (17 M frames x
768 x 4 B = {target / 1e9:.1f} GB) peaks at about **{proj / 1e9:.0f} GB**: request **`--mem={mem}G`**
(sbatch; `mem_gb: {mem}` in a submitit profile) for the k-means job (10 % headroom, rounded up to
8 GB; the sub-sample, blocks and libraries are the fixed {(p2 - slope * b2) / 1e9:.1f} GB).
"""
    if dump:
        body += f"""
Label dump at 768-d, 1 thread (= per core), k = {args.k}, {args.heldout:,} held-out frames:
`mt4ssl labels` (faiss distances, 50 Hz checks, text write) **{dump['dump']:,.0f} frames/s/core**
(median of 3); the assignment alone: faiss {dump['assign_faiss']:,.0f}, torch engine (the code
`--device cuda` runs) {dump['assign_torch']:,.0f} frames/s/core{f", CUDA {dump['assign_cuda']:,.0f} frames/s" if 'assign_cuda' in dump else ""}.
At that rate labelling HuBERT's 960 h (1.7e8 frames at 50 Hz) takes {1.7e8 / dump['dump'] / 3600:.1f} core-hours.
"""
    print(body)
    if not args.no_write:
        command = " ".join(["python benchmarks/kmeans_scale.py", *sys.argv[1:]])
        threads = os.environ.get("OMP_NUM_THREADS")
        write_section(f"k-means at scale: {args.dim}-d", f"OMP_NUM_THREADS={threads} {command}" if threads else command, body)


if __name__ == "__main__":
    main()
