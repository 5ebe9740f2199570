"""`mt4ssl purity`: how much phone information frame labels or a layer carry.

    mt4ssl purity --manifest M/valid.tsv --alignments ALI --labels LAB/valid.km --out R.json
    mt4ssl purity --manifest M/valid.tsv --alignments ALI --ckpt CKPT [--random-init]
        [--layer 0 2 4] --fit-manifest M/train.tsv [--clusters 100]
        [--classifier --fit-alignments FIT_ALI] --out R.json
    (--mfcc instead of --ckpt: the 39-d MFCC of frame 2t, the frames `mt4ssl labels` uses)

Measures (Hsu et al. 2021, HuBERT, section IV-B "cluster quality"), on the frames that have
an alignment, with y the frame's phone and z its label and p their joint distribution over
the frames:
    phone purity    E_z[max_y p(y|z)]   how pure each cluster is in phones
    cluster purity  E_y[max_z p(z|y)]   how concentrated each phone is in one cluster
    PNMI            I(y; z) / H(y)      phone-normalised mutual information, 0 to 1
Silence (SIL) is one of the phones. Frames are the model's: frame t of an utterance (50 Hz)
is the CNN frame over samples [320t, 320t + 400); its phone is the one whose interval holds
the frame's centre, (320t + 200) / 16000 s. Frames whose centre no interval holds (a gap) are
left out.

Label sources (each gives one result line and one entry of the JSON's "results"):
  --labels SPLIT.km ...   label files as `mt4ssl labels` writes them (dict.km.txt beside).
  --ckpt CKPT --layer L ...  hidden states of a checkpoint (layer 0 = Transformer input;
      default all), one model pass for all layers; --random-init: the same architecture
      with fresh weights seeded by --seed. --mfcc: MFCC features instead of a model.
      Each layer is clustered by k-means (`mt4ssl.kmeans.learn.fit_lloyd`, k = --clusters)
      fitted on a seeded --fit-fraction of the frames of --fit-manifest, and applied to the
      aligned frames of --manifest.
  --classifier (with --ckpt or --mfcc): a frame-level linear phone classifier per layer:
      multinomial logistic regression (one Linear layer on features standardised with the
      fit frames' mean and std; Adam on seeded mini-batches of 1024 frames, lr 3e-2 decayed
      linearly to 0 over --classifier-steps, 1000; one thread) trained on the aligned frames
      of --fit-manifest (alignments from --fit-alignments), scored by frame phone accuracy on
      the aligned frames of --manifest. On the demo corpus it lands within 0.5 point of a
      converged (L-BFGS) logistic regression, in about a second per layer.

Alignment formats (--alignments, --fit-alignments):
  Phone CTM (a file), Kaldi's `ctm` as `mt4ssl synth-corpus` writes it in
  OUT/alignments/{split}.ctm: one phone per line, `UTT_ID CHANNEL START DURATION PHONE
  [CONFIDENCE]`, times in seconds.
  Montreal Forced Aligner output (a folder): `<utt_id>.TextGrid` files (searched
  recursively), Praat's long text format, as MFA writes them; the intervals of the tier named
  `phones` (or `SPEAKER - phones`) are read.
  Utterance ids are the manifest's file stems. Phones are normalised to the 39 ARPAbet
  phones of `mt4ssl.data.text` plus SIL: upper-cased, stress digits (AH0) and Kaldi's
  word-position suffixes (AH0_B) stripped; empty, sil, sp and spn are SIL. Any other phone,
  a malformed line, overlapping intervals, an interval ending more than 20 ms after the
  audio, or an alignment of an utterance that is not in the manifest is an error naming
  file:line. Utterances of the manifest without an alignment are skipped and counted (the
  synthetic corpus aligns only its flite voices).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mt4ssl.data.labels import read_labels
from mt4ssl.data.manifest import Manifest, read_manifest
from mt4ssl.errors import InputError
from mt4ssl.features import mfcc
from mt4ssl.features.extract import layer_kind
from mt4ssl.probes.ctc import PHONES39, subset, torch_threads
from mt4ssl.kmeans.apply import nearest
from mt4ssl.kmeans.learn import fit_lloyd, limit_threads
from mt4ssl.models.checkpoint import load_model
from mt4ssl.models.cnn import SAMPLE_RATE, num_frames
from mt4ssl.models.mt4ssl import MT4SSL
from mt4ssl.utils.io import atomic_write_text

log = logging.getLogger(__name__)

PHONES = ("SIL",) + PHONES39  # frame phone ids, SIL = 0
PHONE_IDS = {p: i for i, p in enumerate(PHONES)}
SILENCE = {"", "SIL", "SP", "SPN"}
HOP, WINDOW = 320, 400  # samples: the CNN's frame stride and receptive field
END_TOLERANCE = 0.02  # s: how far a phone may end after the audio (one frame)
OVERLAP_TOLERANCE = 1e-3  # s: the rounding of 3-decimal CTM times

# --------------------------------------------------------------------------- alignments


@dataclass(frozen=True)
class Interval:
    start: float  # seconds
    end: float
    phone: str  # as written in the file
    where: str  # file:line


def normalize_phone(phone: str, where: str) -> int:
    """A phone as alignments write it -> its id in PHONES."""
    p = re.sub(r"_[BIES]$", "", phone.strip().upper())  # Kaldi word-position suffix
    p = "SIL" if p in SILENCE else re.sub(r"[012]$", "", p)
    if p not in PHONE_IDS:
        raise InputError(f"{where}: phone {phone!r} is not one of the 39 ARPAbet phones (stress "
                         f"0/1/2 allowed) or a silence mark (empty, sil, sp, spn)")
    return PHONE_IDS[p]


def _seconds(value: str, where: str, what: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0:
        raise InputError(f"{where}: {what} {value!r} is not a non-negative number of seconds")
    return x


def read_ctm(path: Path) -> dict[str, list[Interval]]:
    """A phone CTM: utterance id -> its intervals, in file order."""
    alignments: dict[str, list[Interval]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        where = f"{path}:{lineno}"
        if not fields or fields[0].startswith(";;"):  # blank line or comment
            continue
        if len(fields) not in (5, 6):
            raise InputError(f"{where}: expected 'UTT_ID CHANNEL START DURATION PHONE "
                             f"[CONFIDENCE]', got {line!r}")
        utt, _, start, duration, phone = fields[:5]
        start_s = _seconds(start, where, "start")
        end_s = start_s + _seconds(duration, where, "duration")
        alignments.setdefault(utt, []).append(Interval(start_s, end_s, phone, where))
    return alignments


_KEY_VALUE = re.compile(r"^(\w+) = (.*)$")


def _decode(raw: bytes) -> str:
    """Praat writes UTF-8, or UTF-16 with a byte order mark."""
    return raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")


def read_textgrid(path: Path) -> list[Interval]:
    """The intervals of the phones tier of a long-format TextGrid."""
    try:
        lines = _decode(path.read_bytes()).splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a UTF-8 or UTF-16 text file ({e})") from None
    if not lines or 'ooTextFile' not in lines[0]:
        raise InputError(f"{path}:1: not a Praat TextGrid (no 'File type = \"ooTextFile\"')")
    tiers: list[tuple[str, list[dict]]] = []
    interval: dict | None = None
    for lineno, line in enumerate(lines, start=1):
        s = line.strip()
        if re.fullmatch(r"item \[\d+\]:", s):
            tiers.append(("", []))
            interval = None
        elif re.fullmatch(r"(intervals|points) \[\d+\]:", s) and tiers:
            interval = {"line": lineno}
            tiers[-1][1].append(interval)
        elif (m := _KEY_VALUE.match(s)) and tiers:
            key, value = m.groups()
            if interval is not None:
                interval[key] = value
            elif key == "name":
                tiers[-1] = (_unquote(value, f"{path}:{lineno}"), tiers[-1][1])
    if not tiers and any(s.strip() == '"IntervalTier"' for s in lines):
        raise InputError(f"{path}: a short-format TextGrid; only Praat's long text format (as "
                         f"MFA writes it) is read")
    phones = [t for t in tiers if t[0] == "phones" or t[0].endswith(" - phones")]
    if len(phones) != 1:
        raise InputError(f"{path}: expected one tier named 'phones' (or 'SPEAKER - phones'), "
                         f"found tiers {[name for name, _ in tiers]}")
    out = []
    for iv in phones[0][1]:
        where = f"{path}:{iv['line']}"
        if not {"xmin", "xmax", "text"} <= set(iv):
            raise InputError(f"{where}: an interval needs xmin, xmax and text (a point tier?)")
        out.append(Interval(_seconds(iv["xmin"], where, "xmin"), _seconds(iv["xmax"], where, "xmax"),
                            _unquote(iv["text"], where), where))
    return out


def _unquote(value: str, where: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        raise InputError(f"{where}: expected a quoted string, got {value}")
    return value[1:-1].replace('""', '"')


def read_alignments(path: Path) -> dict[str, list[Interval]]:
    """A CTM file or a folder of TextGrids: utterance id -> intervals."""
    path = Path(path)
    if path.is_file():
        return read_ctm(path)
    if not path.is_dir():
        raise InputError(f"{path}: alignments not found (a CTM file or a folder of TextGrids)")
    alignments: dict[str, list[Interval]] = {}
    seen: dict[str, Path] = {}
    for tg in sorted(path.rglob("*.TextGrid")):
        if tg.stem in seen:
            raise InputError(f"{tg}: utterance {tg.stem} also has {seen[tg.stem]}")
        seen[tg.stem] = tg
        alignments[tg.stem] = read_textgrid(tg)
    if not alignments:
        raise InputError(f"{path}: no .TextGrid files in this folder")
    return alignments


def frame_phones(intervals: list[Interval], n_samples: int, utt: str) -> np.ndarray:
    """The phone id of each 50 Hz frame of an utterance of `n_samples` (-1: no interval
    holds the frame's centre). Intervals are checked: no overlaps, none past the audio."""
    intervals = sorted(intervals, key=lambda iv: (iv.start, iv.end))
    seconds = n_samples / SAMPLE_RATE
    for prev, iv in zip([None] + intervals, intervals):
        if iv.end < iv.start:
            raise InputError(f"{iv.where}: interval ends ({iv.end}) before it starts ({iv.start})")
        if iv.end > seconds + END_TOLERANCE:
            raise InputError(f"{iv.where}: {utt}: phone {iv.phone!r} ends at {iv.end:.3f} s, "
                             f"after the end of the audio ({seconds:.3f} s)")
        if prev is not None and iv.start < prev.end - OVERLAP_TOLERANCE:
            raise InputError(f"{iv.where}: {utt}: interval {iv.start:.3f}-{iv.end:.3f} overlaps "
                             f"the one at {prev.where} ({prev.start:.3f}-{prev.end:.3f})")
    starts = np.array([iv.start for iv in intervals])
    ends = np.array([iv.end for iv in intervals])
    ids = np.array([normalize_phone(iv.phone, iv.where) for iv in intervals], dtype=np.int64)
    centres = (HOP * np.arange(num_frames(n_samples)) + WINDOW / 2) / SAMPLE_RATE
    k = np.searchsorted(starts, centres, side="right") - 1  # last interval starting at or before
    inside = (k >= 0) & (centres < ends[np.maximum(k, 0)])
    return np.where(inside, ids[np.maximum(k, 0)], -1)


def align(manifest: Manifest, path: Path) -> dict[int, np.ndarray]:
    """Frame phones of the manifest entries that have an alignment in `path`."""
    index: dict[str, int] = {}
    for i, f in enumerate(manifest.files):
        stem = Path(f).stem
        if stem in index:
            raise InputError(f"{manifest.where(i)}: utterance id {stem} (the file stem) is also "
                             f"line {index[stem] + 2}")
        index[stem] = i
    phones = {}
    for utt, intervals in read_alignments(path).items():
        if utt not in index:
            where = intervals[0].where if intervals else str(path)
            raise InputError(f"{where}: utterance {utt} is not in {manifest.path} (alignments "
                             f"of another split?)")
        phones[index[utt]] = frame_phones(intervals, manifest.sizes[index[utt]], utt)
    if not phones:
        raise InputError(f"{path}: no alignments")
    return dict(sorted(phones.items()))


# --------------------------------------------------------------------------- measures


def cluster_quality(phones: np.ndarray, labels: np.ndarray) -> dict:
    """Phone purity, cluster purity and PNMI of frame `labels` against frame `phones`."""
    if len(phones) != len(labels) or len(phones) == 0:
        raise ValueError(f"need as many labels as phones, and some: {len(labels)}, {len(phones)}")
    _, y = np.unique(phones, return_inverse=True)
    _, z = np.unique(labels, return_inverse=True)
    n_y, n_z = y.max() + 1, z.max() + 1
    joint = np.bincount(y * n_z + z, minlength=n_y * n_z).reshape(n_y, n_z) / len(y)
    p_y, p_z = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual_info = float((joint[nz] * np.log(joint[nz] / np.outer(p_y, p_z)[nz])).sum())
    h_y = float(-(p_y * np.log(p_y)).sum())
    if h_y == 0:
        raise InputError("every aligned frame has the same phone: PNMI is undefined")
    return {"phone_purity": round(float(joint.max(0).sum()), 4),
            "cluster_purity": round(float(joint.max(1).sum()), 4),
            "pnmi": round(mutual_info / h_y, 4),
            "phone_entropy": round(h_y, 4),
            "frames": int(len(y)), "phones_seen": int(n_y), "clusters_used": int(n_z)}


@torch_threads(1)
def linear_classifier(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
                      steps: int = 1000, batch_size: int = 1024, lr: float = 3e-2, seed: int = 0) -> dict:
    """Logistic regression from frames to phones: fitted on (x_fit, y_fit), frame accuracy on
    both sets. Features are standardised with the fit frames' mean and std."""
    x_fit, x_eval = torch.from_numpy(x_fit).float(), torch.from_numpy(x_eval).float()
    y_fit, y_eval = torch.from_numpy(y_fit), torch.from_numpy(y_eval)
    mean, std = x_fit.mean(0), x_fit.std(0).clamp(min=1e-5)
    x_fit, x_eval = (x_fit - mean) / std, (x_eval - mean) / std
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(x_fit.shape[1], len(PHONES))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # linear to 0
    for _ in range(steps):
        idx = torch.randint(len(x_fit), (min(batch_size, len(x_fit)),), generator=gen)
        loss = F.cross_entropy(head(x_fit[idx]), y_fit[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    with torch.inference_mode():
        acc = {name: round(float((head(x).argmax(1) == y).float().mean()), 4)
               for name, x, y in (("fit", x_fit, y_fit), ("eval", x_eval, y_eval))}
    return {"accuracy": acc["eval"], "fit_accuracy": acc["fit"], "final_loss": round(loss.item(), 4),
            "fit_frames": len(x_fit), "eval_frames": len(x_eval), "steps": steps,
            "batch_size": batch_size, "lr": lr}


# --------------------------------------------------------------------------- features

# wav (n_samples,) float32 -> one (num_frames(n_samples), dim) array per layer
Featurizer = Callable[[np.ndarray], list[np.ndarray]]


def mfcc_frames(wav: np.ndarray) -> list[np.ndarray]:
    """39-d MFCC of frame 2t for frame t: the same 400 samples as CNN frame t."""
    return [mfcc.mfcc39(wav)[::2]]


@dataclass
class Frames:
    """Features of a split per layer: a random sample of all frames (k-means fit) and the
    aligned frames with their phones."""

    sample: list[list[np.ndarray]] = field(default_factory=list)
    aligned: list[list[np.ndarray]] = field(default_factory=list)
    phones: list[np.ndarray] = field(default_factory=list)


def collect(manifest: Manifest, keep: list[int], featurize: Featurizer, n_layers: int,
            phones: dict[int, np.ndarray], fraction: float, seed: int, desc: str) -> Frames:
    rng = np.random.default_rng(seed)
    out = Frames([[] for _ in range(n_layers)], [[] for _ in range(n_layers)])
    for i in tqdm(keep, desc=desc, unit="utt", leave=False):
        feats = featurize(manifest.read(i))
        n = num_frames(manifest.sizes[i])
        if feats[0].shape[0] != n:
            raise InputError(f"{manifest.where(i)}: {feats[0].shape[0]} feature frames, but the "
                             f"50 Hz alignment frames are {n} (a model with another CNN geometry?)")
        take = np.sort(rng.choice(n, size=round(n * fraction), replace=False)) if fraction else None
        mask = phones[i] >= 0 if i in phones else None
        for layer, x in enumerate(feats):
            if take is not None:
                out.sample[layer].append(x[take])
            if mask is not None:
                out.aligned[layer].append(x[mask])
        if mask is not None:
            out.phones.append(phones[i][mask])
    return out


# --------------------------------------------------------------------------- command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True, metavar="SPLIT.tsv", help="{split}.tsv to measure on")
    p.add_argument("--alignments", type=Path, required=True,
                   help="phone alignments of that split: a CTM file or a folder of MFA TextGrids")
    p.add_argument("--out", type=Path, required=True, help="result JSON to write")
    p.add_argument("--labels", type=Path, nargs="+", default=[], metavar="KM",
                   help="label file(s) of that split ({split}.km, dict.km.txt beside)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--ckpt", type=Path, help="checkpoint whose layers to cluster")
    what.add_argument("--mfcc", action="store_true", help="cluster MFCC frames instead")
    p.add_argument("--layer", type=int, nargs="+", metavar="L", help="with --ckpt: hidden states (default: all)")
    p.add_argument("--random-init", action="store_true",
                   help="with --ckpt: the same architecture with fresh weights seeded by --seed")
    p.add_argument("--fit-manifest", type=Path, metavar="SPLIT.tsv",
                   help="with --ckpt/--mfcc: split to fit k-means and the classifier on (train)")
    p.add_argument("--fit-alignments", type=Path, help="with --classifier: alignments of --fit-manifest")
    p.add_argument("--fit-minutes", type=float,
                   help="use a seeded random subset of this much --fit-manifest audio (default: all)")
    p.add_argument("-k", "--clusters", type=int, default=100, help="k-means clusters (default: 100)")
    p.add_argument("--fit-fraction", type=float, default=0.1,
                   help="fraction of the fit frames k-means is fitted on (default: 0.1)")
    p.add_argument("--classifier", action="store_true",
                   help="also a frame-level linear phone classifier per layer (frame accuracy)")
    p.add_argument("--classifier-steps", type=int, default=1000, help="Adam steps (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads (default: 1)")


def _check_args(args: argparse.Namespace) -> None:
    features = args.ckpt is not None or args.mfcc
    if not args.labels and not features:
        raise InputError("nothing to measure: give --labels, --ckpt or --mfcc")
    if (args.layer or args.random_init) and args.ckpt is None:
        raise InputError("--layer and --random-init need --ckpt")
    if features and args.fit_manifest is None:
        raise InputError("--ckpt/--mfcc need --fit-manifest (the split k-means is fitted on)")
    if args.classifier and (not features or args.fit_alignments is None):
        raise InputError("--classifier needs --ckpt or --mfcc, and --fit-alignments")
    if args.clusters < 2 or not 0 < args.fit_fraction <= 1 or args.classifier_steps < 1:
        raise InputError("need --clusters >= 2, 0 < --fit-fraction <= 1, --classifier-steps >= 1")
    if args.fit_minutes is not None and args.fit_minutes <= 0:
        raise InputError("--fit-minutes must be positive")


def _concat(parts: list[np.ndarray], dim: int = 0) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    _check_args(args)
    manifest = read_manifest(args.manifest)
    phones = align(manifest, args.alignments)
    y = np.concatenate([phones[i][phones[i] >= 0] for i in phones])
    common = {"manifest": str(args.manifest), "alignments": str(args.alignments),
              "utterances": len(manifest), "aligned": len(phones), "skipped": len(manifest) - len(phones)}
    results = []
    for path in args.labels:
        labels = read_labels(path, manifest)
        z = np.concatenate([labels[i][phones[i] >= 0] for i in phones])
        results.append({"source": "labels", "labels": str(path), **cluster_quality(y, z)})

    if args.ckpt is not None or args.mfcc:
        if args.mfcc:
            featurize, names, source = mfcc_frames, ["mfcc"], {"source": "mfcc"}
        else:
            model = load_model(args.ckpt)
            if args.random_init:
                torch.manual_seed(args.seed)
                model = MT4SSL(model.cfg).eval()
            n_states = model.cfg.num_layers + 1
            layers = args.layer if args.layer is not None else list(range(n_states))
            bad = [layer for layer in layers if not 0 <= layer < n_states]
            if bad:
                raise InputError(f"--layer {bad}: {args.ckpt} has hidden states 0..{n_states - 1}")
            featurize, names = layer_kind(model, layers, torch.device("cpu"), None).compute, layers
            source = {"source": "mt4ssl", "ckpt": str(args.ckpt),
                      "init": "random" if args.random_init else "checkpoint"}
        fit_manifest = read_manifest(args.fit_manifest)
        fit_phones = align(fit_manifest, args.fit_alignments) if args.classifier else {}
        keep = list(range(len(fit_manifest)))
        if args.fit_minutes is not None:
            keep = subset(fit_manifest, args.fit_minutes * 60, args.seed)
        with torch_threads(args.threads):
            fit = collect(fit_manifest, keep, featurize, len(names), fit_phones, args.fit_fraction,
                          args.seed, f"features {fit_manifest.path.stem}")
            ev = collect(manifest, sorted(phones), featurize, len(names), phones, 0.0, args.seed,
                         f"features {manifest.path.stem}")
        extract_seconds = time.perf_counter() - t_start
        log.info("features of %d layer(s) in %.0f s: %d frames to fit k-means on, %d aligned fit "
                 "frames, %d aligned frames to measure", len(names), extract_seconds,
                 sum(map(len, fit.sample[0])), sum(map(len, fit.phones)), len(y))
        for layer, name in enumerate(names):
            sample = _concat(fit.sample[layer])
            if len(sample) < args.clusters:
                raise InputError(f"{args.fit_manifest}: {len(sample)} sampled frames are fewer than "
                                 f"k={args.clusters} clusters (raise --fit-fraction)")
            t0 = time.perf_counter()
            with limit_threads(args.threads):
                centroids = fit_lloyd(sample, args.clusters, args.seed)
                z = nearest(_concat(ev.aligned[layer]), centroids)
            result = {**source, "layer": name, "k": args.clusters, "fit_manifest": str(args.fit_manifest),
                      "fit_frames": len(sample), **cluster_quality(y, z),
                      "kmeans_seconds": round(time.perf_counter() - t0, 1)}
            if args.classifier:
                t0 = time.perf_counter()
                result["classifier"] = linear_classifier(
                    _concat(fit.aligned[layer]), np.concatenate(fit.phones), _concat(ev.aligned[layer]), y,
                    steps=args.classifier_steps, seed=args.seed)
                result["classifier"]["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(result)
        common["extract_seconds"] = round(extract_seconds, 1)
        if args.classifier:
            common["fit_aligned"] = len(fit_phones)

    common["seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(args.out, json.dumps({**common, "results": results}, indent=2) + "\n")
    for r in results:
        what = r["labels"] if r["source"] == "labels" else (
            "MFCC" if r["source"] == "mfcc" else
            f"{r['ckpt']}{' random init' if r['init'] == 'random' else ''} layer {r['layer']}")
        k = "" if r["source"] == "labels" else f" k-means {r['k']}"
        acc = f", classifier acc {r['classifier']['accuracy']:.1%}" if "classifier" in r else ""
        print(f"purity {what}{k}: phone purity {r['phone_purity']:.3f}, cluster purity "
              f"{r['cluster_purity']:.3f}, PNMI {r['pnmi']:.3f}{acc} ({r['frames']} frames, "
              f"{common['aligned']} utterances aligned, {common['skipped']} skipped)")
    print(f"-> {args.out}")
    return 0
