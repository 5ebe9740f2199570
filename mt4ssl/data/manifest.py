"""fairseq manifests: `{split}.tsv` (+ `.wrd` words, `.ltr` letters) from a LibriSpeech tree.

A `.tsv` has the split's root folder on its first line, then `relative/path<TAB>n_samples`
per utterance. `.wrd` holds the uppercase transcript and `.ltr` the same as letters with `|`
between words (fairseq's `libri_labels` format), one line per `.tsv` entry, same order.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mt4ssl.data.audio import audio_info, read_audio
from mt4ssl.errors import InputError
from mt4ssl.utils.io import atomic_open, read_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    """A parsed `{split}.tsv`: root folder, relative paths and sample counts."""

    path: Path
    root: Path
    files: tuple[str, ...]
    sizes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    def audio_path(self, i: int) -> Path:
        return self.root / self.files[i]

    def where(self, i: int) -> str:
        """Where entry i is written: `file.tsv:line (relative/path)`."""
        return f"{self.path}:{i + 2} ({self.files[i]})"

    def read(self, i: int):
        """Read entry i's audio, checking the sample count the manifest gives."""
        try:
            return read_audio(self.audio_path(i), expected_samples=self.sizes[i])
        except InputError as e:
            raise InputError(f"{self.where(i)}: {e}") from None


def read_manifest(path: str | Path) -> Manifest:
    """Parse a `.tsv` manifest; any malformed line is an error naming file and line: a blank
    line, a missing or non-positive sample count, a path that leads out of the root folder
    (absolute, or through `..`), a path listed twice, no entries at all."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    lines = read_text(path).splitlines()
    if not lines or not lines[0].strip():
        raise InputError(f"{path}:1: expected the root folder on the first line")
    files, sizes, first = [], [], {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            raise InputError(f"{path}:{lineno}: blank line (expected 'relative/path<TAB>n_samples')")
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip():
            raise InputError(f"{path}:{lineno}: expected 'relative/path<TAB>n_samples', got {line!r}")
        try:
            n = int(fields[1])
        except ValueError:
            raise InputError(f"{path}:{lineno}: sample count {fields[1]!r} is not an integer") from None
        if n <= 0:
            raise InputError(f"{path}:{lineno}: sample count {n} must be positive")
        rel = fields[0]
        normal = posixpath.normpath(rel.replace("\\", "/"))
        if posixpath.isabs(normal) or normal == ".." or normal.startswith("../") or Path(rel).is_absolute():
            raise InputError(f"{path}:{lineno}: path {rel!r} leads outside the manifest's root folder "
                             f"(line 1); paths must be relative to it, without '..'")
        if normal in first:
            raise InputError(f"{path}:{lineno}: {rel} is listed twice (first on line {first[normal]}); "
                             f"each utterance would weigh double")
        first[normal] = lineno
        files.append(rel)
        sizes.append(n)
    if not files:
        raise InputError(f"{path}: no entries after the root folder line")
    return Manifest(path, Path(lines[0].strip()), tuple(files), tuple(sizes))


def read_transcripts(split_dir: Path) -> dict[str, str]:
    """All `SPK-CH.trans.txt` lines of a LibriSpeech split: utterance id -> transcript."""
    texts: dict[str, str] = {}
    for trans in sorted(split_dir.rglob("*.trans.txt")):
        for lineno, line in enumerate(trans.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            utt, _, text = line.partition(" ")
            if not text.strip():
                raise InputError(f"{trans}:{lineno}: expected 'UTTERANCE-ID TRANSCRIPT', got {line!r}")
            texts[utt] = text.strip().upper()
    return texts


def letters(words: str) -> str:
    """`HELLO WORLD` -> `H E L L O | W O R L D |` (fairseq's letter targets)."""
    return " ".join("|".join(words.split())) + " |"


def write_split(split_dir: Path, out_dir: Path, name: str, ext: str = "flac",
                skip_bad: bool = False) -> tuple[int, int]:
    """Write `name.tsv/.wrd/.ltr` for one split folder; return (kept, skipped)."""
    return write_folders(split_dir, ["."], out_dir, name, ext, skip_bad)


def write_folders(root: Path, folders: list[str], out_dir: Path, name: str, ext: str = "flac",
                  skip_bad: bool = False) -> tuple[int, int]:
    """Write `name.tsv/.wrd/.ltr` for the utterances of several LibriSpeech-layout folders
    under `root` (paths in the .tsv relative to it); return (kept, skipped)."""
    rows, skipped = [], 0
    for folder in folders:
        split_dir = root / folder
        if not split_dir.is_dir():
            raise InputError(f"{split_dir}: split folder not found")
        audio = sorted(split_dir.rglob(f"*.{ext}"))
        if not audio:
            raise InputError(f"{split_dir}: no .{ext} files")
        texts = read_transcripts(split_dir)
        for path in tqdm(audio, desc=f"manifest {name}", unit="file", leave=False):
            try:
                n = audio_info(path)
                if path.stem not in texts:
                    raise InputError(f"{path}: no transcript line for {path.stem} in its *.trans.txt")
            except InputError as e:
                if not skip_bad:
                    raise
                log.warning("skipped: %s", e)
                skipped += 1
                continue
            rows.append((path.relative_to(root).as_posix(), n, texts[path.stem]))
    if not rows:
        raise InputError(f"{root}: every file was skipped as bad")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / f"{name}.tsv") as tsv, atomic_open(out_dir / f"{name}.wrd") as wrd, \
            atomic_open(out_dir / f"{name}.ltr") as ltr:
        tsv.write(f"{root.resolve()}\n")
        for rel, n, text in rows:
            tsv.write(f"{rel}\t{n}\n")
            wrd.write(text + "\n")
            ltr.write(letters(text) + "\n")
    return len(rows), skipped


def _split_arg(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    return (name, folder) if sep else (spec, spec)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="LibriSpeech-layout root (real or synthetic)")
    p.add_argument("--out", type=Path, required=True, help="folder for {split}.tsv/.wrd/.ltr")
    p.add_argument("--splits", nargs="+", type=_split_arg, metavar="NAME[=FOLDER]",
                   help="splits to write, e.g. train=train-clean-100 valid=dev-clean "
                        "(default: every sub-folder of ROOT, named as the folder)")
    p.add_argument("--ext", default="flac", help="audio extension (default: flac)")
    p.add_argument("--skip-bad", action="store_true",
                   help="log and skip unreadable/empty/non-16 kHz/multi-channel/untranscribed files")


def run(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise InputError(f"{args.root}: not a folder")
    splits = args.splits or [(d.name, d.name) for d in sorted(args.root.iterdir())
                             if d.is_dir() and not d.name.startswith(".")
                             and any(d.rglob(f"*.{args.ext}"))]
    if not splits:
        raise InputError(f"{args.root}: no split folders with .{args.ext} files")
    for name, folder in splits:
        kept, skipped = write_split(args.root / folder, args.out, name, args.ext, args.skip_bad)
        extra = f", skipped {skipped} bad file(s)" if skipped else ""
        print(f"{name}: {kept} utterances -> {args.out / name}.tsv/.wrd/.ltr{extra}")
    return 0
