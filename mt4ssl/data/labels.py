"""Frame label files: `{split}.km` (space-separated ints, one line per manifest entry) and
`dict.km.txt` (fairseq dictionary: `SYMBOL COUNT` per line, the symbols 0..K-1).

Labels are at the model's 50 Hz frame rate: entry i has exactly `num_frames(n_samples[i])`
labels. Reading checks that strictly, so labels at another rate (say 100 Hz MFCC frames)
fail with the utterance and both counts instead of being cropped into misalignment.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np

from mt4ssl.data.manifest import Manifest
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import FRAME_RATE, num_frames
from mt4ssl.utils.io import atomic_open, read_text


def write_dict(path: Path, n_classes: int) -> None:
    with atomic_open(path) as f:
        f.writelines(f"{i} 1\n" for i in range(n_classes))


def read_dict(path: Path) -> list[str]:
    """The symbols of a fairseq dictionary file, in order."""
    if not Path(path).is_file():
        raise InputError(f"{path}: label dictionary not found")
    symbols = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise InputError(f"{path}:{lineno}: expected 'SYMBOL COUNT', got {line!r}")
        symbols.append(fields[0])
    if not symbols:
        raise InputError(f"{path}: empty label dictionary")
    return symbols


def rate_hint(n_labels: int, n_frames: int) -> str:
    if n_frames and n_labels in (2 * n_frames - 1, 2 * n_frames, 2 * n_frames + 1):
        return f" (that is about {2 * FRAME_RATE} Hz; labels must be at {FRAME_RATE} Hz)"
    return ""


def read_labels(km_path: Path, manifest: Manifest, dict_path: Path | None = None) -> list[np.ndarray]:
    """Read and check a label file against its manifest and dictionary.

    The dictionary's symbols must be the integers 0..K-1 in order (as `mt4ssl labels`
    writes it); every label must be one of them.
    """
    km_path = Path(km_path)
    dict_path = Path(dict_path) if dict_path else km_path.parent / "dict.km.txt"
    symbols = read_dict(dict_path)
    if symbols != [str(i) for i in range(len(symbols))]:
        raise InputError(f"{dict_path}: symbols must be 0..{len(symbols) - 1} in order")
    n_classes = len(symbols)
    if not km_path.is_file():
        raise InputError(f"{km_path}: label file not found")
    lines = read_text(km_path).splitlines()
    if len(lines) != len(manifest):
        raise InputError(f"{km_path}: {len(lines)} lines, but {manifest.path} has {len(manifest)} "
                         f"entries")
    labels = []
    for i, line in enumerate(lines):
        where = f"{km_path}:{i + 1} ({manifest.files[i]})"
        try:
            lab = np.array([int(x) for x in line.split()], dtype=np.int64)
        except ValueError:
            bad = next(x for x in line.split() if not x.lstrip("-").isdigit())
            raise InputError(f"{where}: label {bad!r} is not an integer") from None
        expected = num_frames(manifest.sizes[i])
        if len(lab) != expected:
            raise InputError(f"{where}: {len(lab)} labels, but the model has {expected} frames at "
                             f"{FRAME_RATE} Hz for {manifest.sizes[i]} samples"
                             f"{rate_hint(len(lab), expected)}")
        if len(lab) and (lab.min() < 0 or lab.max() >= n_classes):
            bad = int(lab[(lab < 0) | (lab >= n_classes)][0])
            raise InputError(f"{where}: label {bad} is outside the dictionary {dict_path} "
                             f"(0..{n_classes - 1})")
        labels.append(lab)
    return labels
