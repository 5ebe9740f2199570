"""The pretraining dataset: waveforms of a manifest with their 50 Hz frame labels, and the
batch collation; `LetterDataset` / `collate_letters` are the CTC fine-tuning ones (whole
utterances with their `.ltr` letter targets, zero-padded batches).

`PretrainDataset` reads the manifest and every label set once, up front (a bad label file
fails at start, naming its file and line), skips utterances shorter than `min_samples` and
crops the rest to at most `max_samples` from the start. `dataset[i]` is
`{"id": i, "wav": (n,) float32, "labels": {name: (num_frames(n),) int64}}` with n the cropped
length; `dataset.sizes` are those lengths (for `BucketBatchSampler`). With `normalize=True`
(fairseq's order, `data.normalize_before_crop`) the waveform is normalised to zero mean and
unit variance over the whole file before any crop (the model then must not normalise again).

`collate(items, mode)` makes a batch of them:
- "crop" (the official code's behaviour): every utterance is cropped from the start to the
  shortest one, m samples, rounded down to a multiple of `crop_multiple` samples
  (`bucket_length`; data.crop_multiple_ms, so that batch shapes repeat and a compiled model
  is not recompiled for every new length), and its labels to `num_frames(m)`. CNN frame t covers samples
  [320t, 320t + 400), so the frames of the crop are exactly the first `num_frames(m)` frames
  of the whole utterance and label t stays the label of frame t.
- "pad": waveforms are zero-padded to the longest (`padding_mask` True at padding) and
  labels to `num_frames(longest)` with 0; padded frames are never masked, so their label
  value is never used.

Labels are held as one flat array per label set (the smallest integer type that fits the
dictionary) plus offsets, not as a list of arrays: a few hundred MB instead of GBs for 960 h,
and no per-utterance Python objects for forked DataLoader workers to copy on write.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mt4ssl.data.labels import read_dict, read_labels
from mt4ssl.data.manifest import read_manifest
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import num_frames
from mt4ssl.utils.io import read_text

log = logging.getLogger(__name__)

COLLATE_MODES = ("crop", "pad")


def _label_dtype(n_classes: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.int32):
        if n_classes <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class PretrainDataset(Dataset):
    """Utterances of a `{split}.tsv` manifest with their label sets.

    label_sets: label-set name (e.g. "mfcc100") -> its `.km` file; the dictionary is the
    `dict.km.txt` beside it. Every file is read and checked here, not per item.
    """

    def __init__(self, manifest_path: str | Path, label_sets: Mapping[str, str | Path] | None = None,
                 min_samples: int = 32000, max_samples: int = 320000, normalize: bool = False):
        if num_frames(max_samples) < 1:
            raise InputError(f"max_samples={max_samples}: must be at least 400 (one 25 ms CNN frame)")
        if min_samples > max_samples:
            raise InputError(f"min_samples={min_samples} is larger than max_samples={max_samples}")
        self.manifest = read_manifest(manifest_path)
        self.min_samples, self.max_samples, self.normalize = min_samples, max_samples, normalize
        full = np.asarray(self.manifest.sizes, dtype=np.int64)
        # manifest entry of each dataset item
        self.indices = np.flatnonzero(full >= min_samples)
        skipped = len(full) - len(self.indices)
        if skipped:
            log.info("%s: skipped %d of %d utterances shorter than %d samples",
                     self.manifest.path, skipped, len(full), min_samples)
        if len(self.indices) == 0:
            raise InputError(f"{self.manifest.path}: every utterance is shorter than "
                             f"min_samples={min_samples}")
        self.sizes = np.minimum(full[self.indices], max_samples)
        self._frames = np.array([num_frames(n) for n in self.sizes], dtype=np.int64)

        self._num_classes: dict[str, int] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._label_offsets: dict[str, np.ndarray] = {}
        for name, km_path in (label_sets or {}).items():
            km_path = Path(km_path)
            dict_path = km_path.parent / "dict.km.txt"
            labels = read_labels(km_path, self.manifest, dict_path)
            n_classes = len(read_dict(dict_path))
            # labels of the kept items, cropped to their frames (read_labels checked the counts)
            kept = [labels[j][:t] for j, t in zip(self.indices, self._frames)]
            self._labels[name] = np.concatenate(kept, dtype=_label_dtype(n_classes), casting="unsafe")
            self._label_offsets[name] = np.concatenate([[0], np.cumsum(self._frames)])
            self._num_classes[name] = n_classes

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self._labels)

    def num_classes(self, name: str) -> int:
        """Size of label set `name`'s dictionary (the classifier's outputs)."""
        if name not in self._num_classes:
            raise KeyError(f"no label set {name!r}; the dataset has {sorted(self._num_classes)}")
        return self._num_classes[name]

    def where(self, i: int) -> str:
        """Where item i is written: `file.tsv:line (relative/path)`."""
        return self.manifest.where(int(self.indices[i]))

    def __getitem__(self, i: int) -> dict:
        n = int(self.sizes[i])
        wav = torch.from_numpy(self.manifest.read(int(self.indices[i])))
        if self.normalize:  # over the whole file, then cropped (fairseq's F.layer_norm(wav, wav.shape))
            wav = F.layer_norm(wav.float(), wav.shape)
        wav = wav[:n]
        labels = {}
        for name, flat in self._labels.items():
            start, end = self._label_offsets[name][i], self._label_offsets[name][i + 1]
            labels[name] = torch.from_numpy(flat[start:end].astype(np.int64))
        return {"id": i, "wav": wav, "labels": labels}


def bucket_length(n: int, multiple: int) -> int:
    """`n` rounded down to a multiple of `multiple` (1: n itself); n when it is shorter than
    one multiple (nothing would be left)."""
    if multiple < 1:
        raise ValueError(f"multiple {multiple} must be at least 1")
    return n if n < multiple else n - n % multiple


def collate(items: Sequence[dict], mode: str = "crop", crop_multiple: int = 1) -> dict:
    """Batch dataset items (see the module docstring for "crop" and "pad"; `crop_multiple`
    applies to "crop" only).

    Returns {"ids": (B,) int64, "wav": (B, S) float32, "padding_mask": (B, S) bool (True =
    padding) or None, "labels": {name: (B, num_frames(S)) int64}, "samples": real samples}.
    In "pad" mode padding_mask is None when every utterance has the same length.
    """
    if mode not in COLLATE_MODES:
        raise ValueError(f"collate mode must be one of {COLLATE_MODES}, got {mode!r}")
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(item["wav"]) for item in items]
    names = list(items[0]["labels"])
    ids = torch.tensor([item["id"] for item in items], dtype=torch.long)
    if mode == "crop":
        m = bucket_length(min(lengths), crop_multiple)
        t = num_frames(m)
        wav = torch.stack([item["wav"][:m] for item in items])
        labels = {name: torch.stack([item["labels"][name][:t] for item in items]) for name in names}
        return {"ids": ids, "wav": wav, "padding_mask": None, "labels": labels,
                "samples": m * len(items)}

    s = max(lengths)
    t = num_frames(s)
    wav = torch.zeros(len(items), s, dtype=items[0]["wav"].dtype)
    padding_mask = torch.zeros(len(items), s, dtype=torch.bool)
    labels = {name: torch.zeros(len(items), t, dtype=torch.long) for name in names}
    for b, item in enumerate(items):
        n = lengths[b]
        wav[b, :n] = item["wav"]
        padding_mask[b, n:] = True
        for name in names:
            lab = item["labels"][name]
            labels[name][b, :len(lab)] = lab
    return {"ids": ids, "wav": wav, "padding_mask": padding_mask if min(lengths) < s else None,
            "labels": labels, "samples": sum(lengths)}


class LetterDataset(Dataset):
    """Utterances of a `{split}.tsv` manifest with their `{split}.ltr` letter transcripts
    (fairseq's convention: space-separated letters, `|` after every word), for CTC.

    Every line is read and encoded with `dictionary` (an `mt4ssl.finetune.ctc.Dictionary`)
    here: an empty line or a line count that differs from the manifest is an error naming the
    file and line, and so is a symbol the dictionary lacks, unless `drop_unknown` (validation
    sets: such symbols are left out of the CTC targets, with a warning, and stay in
    `letters(i)`, the reference). Utterances shorter than max(min_samples, 400) samples
    (one CNN frame) are skipped; none is cropped (the transcript covers the whole of it).
    `dataset[i]` is {"id": i, "wav": (n,) float32, "target": (L,) int64}; `letters(i)` is
    its transcript's tokens.
    """

    def __init__(self, manifest_path: str | Path, ltr_path: str | Path, dictionary, min_samples: int = 0,
                 drop_unknown: bool = False):
        self.manifest = read_manifest(manifest_path)
        ltr_path = Path(ltr_path)
        if not ltr_path.is_file():
            raise InputError(f"{ltr_path}: letter transcripts not found (the .ltr beside {self.manifest.path.name}; "
                             f"`mt4ssl manifest` writes them)")
        lines = read_text(ltr_path).splitlines()
        if len(lines) != len(self.manifest):
            raise InputError(f"{ltr_path}: {len(lines)} lines, but {self.manifest.path} has "
                             f"{len(self.manifest)} utterances")
        self._tokens: list[tuple[str, ...]] = []
        targets, unknown = [], Counter()
        for lineno, line in enumerate(lines, start=1):
            tokens = tuple(line.split())
            if not tokens:
                raise InputError(f"{ltr_path}:{lineno}: empty transcript")
            if drop_unknown:
                unknown.update(t for t in tokens if t not in dictionary or t == dictionary.symbols[0])
                tokens = tuple(t for t in tokens if t in dictionary and t != dictionary.symbols[0]) or tokens
            try:
                targets.append(np.asarray(dictionary.encode(tokens), dtype=np.int16))
            except KeyError as e:
                raise InputError(f"{ltr_path}:{lineno}: {e.args[0]} (it has {' '.join(dictionary.symbols[1:])}); "
                                 f"give data.dictionary a dict.ltr.txt with every symbol of every split "
                                 f"(`mt4ssl manifest-limited` writes one)") from None
            self._tokens.append(tuple(line.split()))
        if unknown:
            log.warning("%s: %d token(s) not in the dictionary (%s) are left out of the CTC targets "
                        "(they count as errors in the WER)", ltr_path, sum(unknown.values()), " ".join(sorted(unknown)))
        full = np.asarray(self.manifest.sizes, dtype=np.int64)
        self.indices = np.flatnonzero(full >= max(min_samples, 400))
        skipped = len(full) - len(self.indices)
        if skipped:
            log.info("%s: skipped %d of %d utterances shorter than %d samples", self.manifest.path, skipped,
                     len(full), max(min_samples, 400))
        if len(self.indices) == 0:
            raise InputError(f"{self.manifest.path}: every utterance is shorter than {max(min_samples, 400)} samples")
        self.sizes = full[self.indices]
        self._targets = [targets[j] for j in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def where(self, i: int) -> str:
        return self.manifest.where(int(self.indices[i]))

    def letters(self, i: int) -> tuple[str, ...]:
        return self._tokens[int(self.indices[i])]

    def __getitem__(self, i: int) -> dict:
        wav = self.manifest.read(int(self.indices[i]))
        return {"id": i, "wav": torch.from_numpy(wav), "target": torch.from_numpy(self._targets[i].astype(np.int64))}


def collate_letters(items: Sequence[dict]) -> dict:
    """Zero-padded waveforms and concatenated CTC targets: {"ids", "wav" (B, S),
    "padding_mask" (B, S) or None when all lengths are equal, "targets" (sum L,),
    "target_lengths" (B,), "samples"}."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(item["wav"]) for item in items]
    wav = torch.zeros(len(items), max(lengths), dtype=items[0]["wav"].dtype)
    padding_mask = torch.ones(len(items), max(lengths), dtype=torch.bool)
    for b, item in enumerate(items):
        wav[b, :lengths[b]] = item["wav"]
        padding_mask[b, :lengths[b]] = False
    return {"ids": torch.tensor([item["id"] for item in items], dtype=torch.long), "wav": wav,
            "padding_mask": padding_mask if min(lengths) < max(lengths) else None,
            "targets": torch.cat([item["target"] for item in items]),
            "target_lengths": torch.tensor([len(item["target"]) for item in items], dtype=torch.long),
            "samples": sum(lengths)}
