"""`mt4ssl probe`: SUPERB-PR-like phone recognition with a CTC head on frozen features.

    mt4ssl probe --manifest-dir M --lexicon LEX --ckpt CKPT --out probe.json  [--layer L]
    mt4ssl probe --manifest-dir M --lexicon LEX --mfcc --out probe_mfcc.json

What it measures: how linearly phones can be read off a representation, as SUPERB's PR task
(a linear CTC head on frozen upstream features, phone error rate), small enough for a CPU.

- Targets: each `{split}.wrd` line -> phones through the lexicon (`WORD PHONES`, tab or
  space separated, ARPAbet; a word's first entry wins). Stress is stripped: 39 phones + the
  CTC blank (SUPERB keeps stress, 71 symbols; 39 phones need less data to learn and are the
  usual PER convention). No silence tokens: the `.wrd` has no pause marks.
- Features, extracted once (torch.inference_mode, one utterance at a time, no padding) and
  kept in memory as float16; the command logs the memory they need and refuses to start if
  it is more than 80% of the available memory (then probe one `--layer`, or train on a
  `--train-minutes` subset):
  `--ckpt`: the model's hidden states at 50 Hz (layer 0 = Transformer input, layer i = block
  i's output). With `--layer L` that layer only; by default all of them, combined by a
  learnable softmax-weighted sum (SUPERB's featurizer).
  `--mfcc`: 39-d MFCC (+deltas) at 100 Hz with pairs of frames stacked -> 78-d at 50 Hz, the
  models' frame rate, so both kinds of probe see the same number of CTC frames per phone.
- Every layer and dimension is standardised with the training split's mean and std (a fixed
  affine map the linear layer could absorb; it only makes Adam well conditioned and the
  layer weights comparable). Head: the layer weights, then one Linear to the 40 CTC outputs
  (`--hidden N` puts a Linear + ReLU of N units first; not SUPERB's linear probe).
- Training: CTC loss (`F.ctc_loss`, mean over utterances of loss / target length), Adam at a
  constant learning rate, a fixed number of updates of `--batch-size` utterances drawn by
  seeded epoch shuffling. The defaults (700 updates of 8 utterances, lr 3e-2) were chosen on
  the tiny synthetic demo corpus (31 min of training audio): MFCC reaches 52% PER there
  (51% after 1000 updates, 56% after 500), a randomly initialised tiny model 89%. The CPU
  time goes to `F.ctc_loss` (about 50 ms an update), and, for a model, to its CNN during
  extraction (about 70 s for the demo corpus' 39 min with the tiny model).
- Evaluation: greedy best-path decoding; PER = edit distance / reference phones, as a
  fraction (0.25 = 25 %), on the valid and test splits.
- Threads: one by default (`--threads`). On a 2-core machine shared with other jobs, two
  threads made MFCC and model extraction 10-60x slower and the head's updates 2-40x slower.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mt4ssl.data.manifest import Manifest, read_manifest
from mt4ssl.data.text import CONSONANTS, VOWELS
from mt4ssl.errors import InputError
from mt4ssl.features import mfcc
from mt4ssl.finetune.ctc import Dictionary, error_rate, greedy_decode
from mt4ssl.models.checkpoint import load_model
from mt4ssl.models.mt4ssl import MT4SSL
from mt4ssl.models.cnn import FRAME_RATE, SAMPLE_RATE, num_frames
from mt4ssl.utils.io import atomic_write_text

log = logging.getLogger(__name__)

PHONES39 = tuple(sorted(VOWELS + CONSONANTS))
PHONE_DICT = Dictionary.from_symbols(PHONES39)

# --------------------------------------------------------------------------- targets


def strip_stress(phone: str) -> str:
    """AH0 -> AH; consonants are unchanged."""
    return re.sub(r"[012]$", "", phone)


def read_lexicon(path: str | Path) -> dict[str, tuple[str, ...]]:
    """`WORD PHONE PHONE ...` per line -> {WORD: 39-set phones}; bad lines name file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: lexicon not found")
    lexicon: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise InputError(f"{path}:{lineno}: expected 'WORD<TAB>PHONES', got {line!r}")
        phones = tuple(strip_stress(p) for p in fields[1:])
        bad = [p for p, s in zip(fields[1:], phones) if s not in PHONE_DICT]
        if bad:
            raise InputError(f"{path}:{lineno}: {' '.join(bad)} not among the 39 ARPAbet phones "
                             f"(with or without stress 0/1/2)")
        lexicon.setdefault(fields[0].upper(), phones)
    if not lexicon:
        raise InputError(f"{path}: the lexicon is empty")
    return lexicon


def phone_targets(wrd: Path, lexicon: dict[str, tuple[str, ...]], n_utterances: int,
                  lexicon_path: str | Path = "the lexicon") -> list[list[str]]:
    """The phones of each `.wrd` line; an unknown word names the `.wrd` file and line."""
    if not wrd.is_file():
        raise InputError(f"{wrd}: transcript file not found (the .wrd beside the manifest)")
    lines = wrd.read_text().splitlines()
    if len(lines) != n_utterances:
        raise InputError(f"{wrd}: {len(lines)} lines, but its manifest has {n_utterances} utterances")
    targets = []
    for lineno, line in enumerate(lines, start=1):
        words = line.split()
        if not words:
            raise InputError(f"{wrd}:{lineno}: empty transcript")
        phones = []
        for word in words:
            if word.upper() not in lexicon:
                raise InputError(f"{wrd}:{lineno}: word {word!r} is not in {lexicon_path}")
            phones.extend(lexicon[word.upper()])
        targets.append(phones)
    return targets


# --------------------------------------------------------------------------- features

# wav (n_samples,) float32 -> (frames, layers, dim)
Featurizer = Callable[[np.ndarray], torch.Tensor]


def mfcc_featurizer(wav: np.ndarray) -> torch.Tensor:
    """39-d MFCC at 100 Hz -> pairs of frames stacked: (frames // 2, 1, 78) at 50 Hz."""
    x = torch.from_numpy(mfcc.mfcc39(wav))
    n = x.shape[0] // 2
    return x[: 2 * n].reshape(n, 1, 2 * x.shape[1])


def model_featurizer(model, layer: int | None, device: torch.device) -> Featurizer:
    """Hidden states of `model`: layer `layer` only, or all of them (layer None)."""

    @torch.inference_mode()
    def compute(wav: np.ndarray) -> torch.Tensor:
        states, _ = model.extract_features(torch.from_numpy(wav).to(device).unsqueeze(0), layers=layer)
        if layer is not None:
            return states[layer][0].unsqueeze(1).float().cpu()
        return torch.stack([s[0] for s in states], dim=1).float().cpu()

    return compute


@dataclass
class Split:
    name: str
    feats: list[torch.Tensor]  # (frames, layers, dim) float16, one per utterance
    targets: list[torch.Tensor]  # phone ids, int64
    seconds: float  # audio


def load_split(name: str, manifest: Manifest, phones: list[list[str]], keep: list[int],
               featurize: Featurizer) -> Split:
    """Featurize the utterances `keep` of a split (manifest order)."""
    feats = []
    for i in tqdm(keep, desc=f"features {name}", unit="utt", leave=False):
        x = featurize(manifest.read(i))
        if x.shape[0] == 0:
            raise InputError(f"{manifest.where(i)}: too short for one feature frame")
        x = x.to(torch.float16)
        if not torch.isfinite(x).all():
            raise InputError(f"{manifest.where(i)}: features are not finite in float16 (NaN, or |x| > 65504)")
        feats.append(x)
    targets = [torch.tensor(PHONE_DICT.encode(phones[i]), dtype=torch.long) for i in keep]
    short = sum(x.shape[0] < ctc_min_frames(y) for x, y in zip(feats, targets))
    if short:
        log.warning("%s: %d of %d utterances have fewer frames than CTC needs for their phones "
                    "(they add no loss in training and errors in evaluation)", name, short, len(feats))
    return Split(name, feats, targets, sum(manifest.sizes[i] for i in keep) / SAMPLE_RATE)


def subset(manifest: Manifest, max_seconds: float, seed: int) -> list[int]:
    """A seeded random subset of at most `max_seconds` of audio (at least one utterance),
    in manifest order."""
    order = list(range(len(manifest)))
    random.Random(seed).shuffle(order)
    keep, total = [], 0.0
    for i in order:
        seconds = manifest.sizes[i] / SAMPLE_RATE
        if keep and total + seconds > max_seconds:
            continue
        keep.append(i)
        total += seconds
    return sorted(keep)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ctc_min_frames(target: torch.Tensor) -> int:
    """Frames a CTC alignment needs: one per token, plus a blank between equal neighbours."""
    return len(target) + int((target[1:] == target[:-1]).sum())


def feature_stats(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(layer, dim) mean and std over all frames; a (nearly) constant dimension gets
    1/1000 of its layer's largest std, so that standardising it cannot blow up."""
    total = sum(x.shape[0] for x in feats)
    s = sum(x.double().sum(0) for x in feats)
    ss = sum(x.double().square().sum(0) for x in feats)
    mean = s / total
    std = (ss / total - mean.square()).clamp(min=0).sqrt()
    std = torch.maximum(std, (1e-3 * std.amax(dim=-1, keepdim=True)).clamp(min=1e-8))
    return mean.float(), std.float()


def standardize_(split: Split, mean: torch.Tensor, std: torch.Tensor) -> None:
    """In place: every frame of every layer to (x - mean) / std, kept as float16."""
    split.feats = [((x.float() - mean) / std).to(torch.float16) for x in split.feats]


# --------------------------------------------------------------------------- head


class ProbeHead(nn.Module):
    """Softmax-weighted sum of (standardised) layers, [Linear + ReLU], Linear."""

    def __init__(self, n_layers: int, dim: int, n_tokens: int, hidden: int = 0):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(n_layers)) if n_layers > 1 else None
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.out = nn.Linear(hidden or dim, n_tokens)

    def layer_weights(self) -> torch.Tensor:
        if self.layer_logits is None:
            return torch.ones(1)
        return self.layer_logits.detach().softmax(0).cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (N, layers, dim) -> logits (N, tokens)."""
        x = x.float()
        if self.layer_logits is None:
            x = x[:, 0]
        else:  # (layers,) @ (N, layers, dim): a batched matrix-vector product
            x = self.layer_logits.softmax(0) @ x
        return self.out(self.proj(x))

    def utterances(self, feats: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Logits of each utterance; the frames of all of them go through in one batch
        (concatenated, so no compute is spent on padding)."""
        lengths = [x.shape[0] for x in feats]
        return list(self(torch.cat(feats).to(device)).split(lengths))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with n intra-op threads. The head's ops are too small to share: with 2 threads
    on a busy 2-core CPU a CTC update took 2-40x longer than with 1 (threads wait for each
    other at every op while another process holds a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch_threads(1)
def train_head(head: ProbeHead, train: Split, updates: int, batch_size: int, lr: float, seed: int,
               device: torch.device) -> float:
    """Fixed-update CTC training at a constant learning rate (as SUPERB's PR); returns the
    mean loss of the last 10% of updates."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    batch_size = min(batch_size, len(train.feats))
    order: list[int] = []
    tail, tail_losses = max(1, updates // 10), []
    head.train()
    t0 = time.perf_counter()
    bar = tqdm(range(1, updates + 1), desc="probe", unit="upd", leave=False)
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(train.feats), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        logits = head.utterances([train.feats[i] for i in idx], device)
        log_probs = nn.utils.rnn.pad_sequence(logits).log_softmax(-1)  # (T, B, V)
        ys = [train.targets[i] for i in idx]
        loss = F.ctc_loss(log_probs, torch.cat(ys).to(device), [len(x) for x in logits], [len(y) for y in ys],
                          blank=PHONE_DICT.blank, reduction="mean", zero_infinity=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if step > updates - tail:
            tail_losses.append(value)
        bar.set_postfix_str(f"loss={value:.3f}", refresh=False)
        if step % max(1, updates // 5) == 0 or step == updates:
            log.info("probe update %d/%d: ctc loss %.3f (%.0f s)", step, updates, value,
                     time.perf_counter() - t0)
    return float(np.mean(tail_losses))


@torch_threads(1)
@torch.inference_mode()
def evaluate(head: ProbeHead, split: Split, device: torch.device, batch_size: int = 16) -> float:
    """Greedy-decoding PER of the head on a split (a fraction)."""
    head.eval()
    hyps: list[list[int]] = []
    for start in range(0, len(split.feats), batch_size):
        for logits in head.utterances(split.feats[start:start + batch_size], device):
            hyps.extend(greedy_decode(logits.unsqueeze(0), blank=PHONE_DICT.blank))
    return error_rate([y.tolist() for y in split.targets], hyps)


# --------------------------------------------------------------------------- command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest-dir", type=Path, required=True,
                   help="folder with {split}.tsv and {split}.wrd for the three splits")
    p.add_argument("--lexicon", type=Path, required=True,
                   help="'WORD PHONES' per line (ARPAbet, stress optional), e.g. corpus/lexicon.txt")
    p.add_argument("--out", type=Path, required=True, help="result JSON to write")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", type=Path, help="mt4ssl checkpoint whose hidden states to probe")
    what.add_argument("--mfcc", action="store_true", help="probe 39-d MFCCs (stacked to 50 Hz) instead")
    p.add_argument("--random-init", action="store_true",
                   help="with --ckpt: the same architecture with fresh random weights (seeded by "
                        "--seed), the untrained baseline")
    p.add_argument("--layer", type=int,
                   help="with --ckpt: probe this hidden state (0 = Transformer input); "
                        "default: a learned weighted sum of all of them")
    p.add_argument("--train-split", default="train", help="default: train")
    p.add_argument("--valid-split", default="valid", help="default: valid")
    p.add_argument("--test-split", default="test", help="default: test")
    p.add_argument("--train-minutes", type=float,
                   help="train on a seeded random subset of this much audio (default: the whole split)")
    p.add_argument("--updates", type=int, default=700, help="Adam updates (default: 700)")
    p.add_argument("--lr", type=float, default=3e-2, help="Adam learning rate (default: 3e-2)")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per update (default: 8)")
    p.add_argument("--hidden", type=int, default=0,
                   help="units of a Linear+ReLU before the output layer (default: 0 = linear probe)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for feature extraction (default: 1; the head always "
                        "uses 1). More help only on idle cores: on a busy 2-core machine, 2 "
                        "threads made extraction 10x slower")


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if (args.layer is not None or args.random_init) and args.ckpt is None:
        raise InputError("--layer and --random-init need --ckpt (MFCC features have no layers)")
    for name in ("updates", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.hidden < 0:
        raise InputError("--lr must be positive and --hidden non-negative")
    if args.train_minutes is not None and args.train_minutes <= 0:
        raise InputError("--train-minutes must be positive")
    device = torch.device(args.device)
    lexicon = read_lexicon(args.lexicon)

    if args.mfcc:
        featurize, n_states, dim = mfcc_featurizer, 1, 2 * mfcc.DIM
        frames_of = lambda n: mfcc.num_frames(n) // 2  # noqa: E731
        features, layer = "mfcc", None
    else:
        model = load_model(args.ckpt, map_location=device)
        if args.random_init:
            torch.manual_seed(args.seed)
            model = MT4SSL(model.cfg).to(device).eval()
        n_all = model.cfg.num_layers + 1
        if args.layer is not None and not 0 <= args.layer < n_all:
            raise InputError(f"--layer {args.layer}: {args.ckpt} has hidden states 0..{n_all - 1}")
        featurize = model_featurizer(model, args.layer, device)
        n_states, dim = (n_all if args.layer is None else 1), model.cfg.embed_dim
        frames_of = lambda n: num_frames(n, model.cfg.conv_layers)  # noqa: E731
        features, layer = "mt4ssl", ("weighted" if args.layer is None else args.layer)

    roles = ("train", "valid", "test")
    names = {role: getattr(args, f"{role}_split") for role in roles}
    # every transcript is checked against the lexicon before the slow part
    manifests = {role: read_manifest(args.manifest_dir / f"{names[role]}.tsv") for role in roles}
    phones = {role: phone_targets(args.manifest_dir / f"{names[role]}.wrd", lexicon, len(manifests[role]),
                                  args.lexicon) for role in roles}
    keep = {role: list(range(len(manifests[role]))) for role in roles}
    if args.train_minutes is not None:
        keep["train"] = subset(manifests["train"], args.train_minutes * 60, args.seed)
    frames = sum(frames_of(manifests[role].sizes[i]) for role in roles for i in keep[role])
    need = frames * n_states * dim * 2
    log.info("features: %d frames x %d layer(s) x %d dims = %.2f GB in memory (float16)",
             frames, n_states, dim, need / 1e9)
    available = available_memory()
    if available is not None and need > 0.8 * available:
        raise InputError(f"the features need {need / 1e9:.1f} GB of memory and {available / 1e9:.1f} GB are "
                         f"available: probe one --layer, or fewer --train-minutes")

    splits = {}
    for role in roles:
        t0 = time.perf_counter()
        with torch_threads(args.threads):
            splits[role] = load_split(names[role], manifests[role], phones[role], keep[role], featurize)
        log.info("%s features: %d utterances, %.1f min of audio, %.1f s", names[role], len(splits[role].feats),
                 splits[role].seconds / 60, time.perf_counter() - t0)
    extract_seconds = time.perf_counter() - t_start

    train = splits["train"]
    mean, std = feature_stats(train.feats)
    for split in splits.values():
        standardize_(split, mean, std)
    torch.manual_seed(args.seed)
    head = ProbeHead(n_states, dim, len(PHONE_DICT), args.hidden).to(device)
    t0 = time.perf_counter()
    final_loss = train_head(head, train, args.updates, args.batch_size, args.lr, args.seed, device)
    train_seconds = time.perf_counter() - t0
    per = {role: evaluate(head, splits[role], device) for role in ("valid", "test")}
    seconds = time.perf_counter() - t_start

    result = {
        "features": features,
        "ckpt": None if args.ckpt is None else str(args.ckpt),
        "init": "random" if args.random_init else ("checkpoint" if args.ckpt else None),
        "layer": layer,
        "layer_weights": [round(w, 4) for w in head.layer_weights().tolist()] if layer == "weighted" else None,
        "feature_dim": dim,
        "frame_rate": FRAME_RATE,
        "targets": f"{len(PHONES39)} ARPAbet phones, stress stripped, + CTC blank",
        "per": per,
        "final_train_loss": round(final_loss, 4),
        "updates": args.updates,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "hidden": args.hidden,
        "seed": args.seed,
        "train_utterances": len(train.feats),
        "train_minutes": round(train.seconds / 60, 2),
        "train_minutes_cap": args.train_minutes,
        "valid_utterances": len(splits["valid"].feats),
        "test_utterances": len(splits["test"].feats),
        "manifest_dir": str(args.manifest_dir),
        "splits": names,
        "lexicon": str(args.lexicon),
        "extract_seconds": round(extract_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(seconds, 1),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    what = "MFCC" if args.mfcc else (f"{args.ckpt}{' random init' if args.random_init else ''} "
                                     f"({'all layers' if layer == 'weighted' else f'layer {layer}'})")
    print(f"probe {what}: PER valid {per['valid']:.1%} test {per['test']:.1%} "
          f"({args.updates} updates, {len(train.feats)} train utterances, {seconds:.0f} s) -> {args.out}")
    return 0
