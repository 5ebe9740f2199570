"""SUPERB ASR (s3prl's `-d asr`): the data check, and the two inputs the s3prl 0.4.18 wheel lacks,
written from the LibriSpeech tree into the experiment folder.

What s3prl's `asr/dataset.py` and `asr/expert.py` read (0.4.18):
- `datarc.bucket_file/<split>.csv` for each split, made in the s3prl repository by
  `preprocess/generate_len_for_bucket.py` (not in the wheel): pandas' `to_csv` of the
  columns `file_path` (relative to `libri_root`, `split/SPK/CH/SPK-CH-UTT.flac`), `length`
  (samples) and `label` (empty: the script writes None and the dataset never reads it), rows
  longest first, with pandas' unnamed index column (header `,file_path,length,label`).
  `write_bucket_file` writes the same table.
- The transcripts, from `SPK-CH.trans.txt` beside each flac (a flac without a line there is
  dropped silently): uppercased, spaces turned into the word separator `|`, one token per
  character, `|` appended (`tokens`), then an end-of-sentence symbol.
- `datarc.dict_path` (default `asr/char.dict`, not in the wheel): a fairseq dictionary,
  `SYMBOL COUNT` per line, after fairseq's 4 specials (`<s>` = CTC blank, `<pad>`, `</s>`,
  `<unk>`), so 32 outputs. `write_dictionary` writes LibriSpeech's 28 characters in
  char.dict's order (`CHARS`: the same output index for each character as s3prl's file),
  with their counts in the training transcripts.
- fairseq's `encode_line` *adds* a token missing from the dictionary, past the model's output
  size: `check` refuses any character outside `CHARS`, before training.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import soundfile as sf

from mt4ssl.errors import InputError
from mt4ssl.superb.libriphone import read_transcripts
from mt4ssl.utils.io import atomic_write_text

SPLITS = ("train-clean-100", "dev-clean", "test-clean")  # train, dev, test
CHARS = ("|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "C", "W", "F",
         "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")  # s3prl's asr/char.dict order
LETTERS = frozenset(CHARS) - {"|"}  # what a transcript may hold, besides spaces
SAMPLE_RATE = 16000


def tokens(text: str) -> list[str]:
    """s3prl's ASR tokens of a transcript (dataset.py `process_trans`, before the eos)."""
    return list(" ".join(text.split()).upper().replace(" ", "|")) + ["|"]


def flacs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*/*.flac"))


def check(data: Path) -> dict[str, int]:
    """Check the LibriSpeech tree `data` for s3prl's ASR; return the flac count per split."""
    counts = {}
    for split in SPLITS:
        folder = data / split
        if not folder.is_dir():
            raise InputError(f"--data {data}: missing split {split}/ (ASR needs "
                             f"{', '.join(s + '/' for s in SPLITS)})")
        files = flacs(folder)
        if not files:
            raise InputError(f"{folder}: no SPK/CH/SPK-CH-UTT.flac files (LibriSpeech layout)")
        transcripts = read_transcripts(folder)
        for f in files:
            trans = f.parent / f"{f.parent.parent.name}-{f.parent.name}.trans.txt"
            if not trans.is_file():
                raise InputError(f"{f}: no {trans.name} beside it (s3prl reads each chapter's "
                                 f"transcripts from SPK-CH.trans.txt)")
            if f.stem not in transcripts:
                raise InputError(f"{f}: no line for {f.stem} in {trans}")
            bad = sorted(set("".join(transcripts[f.stem].split()).upper()) - LETTERS)
            if bad:
                raise InputError(f"{trans}: utterance {f.stem}: characters {bad} are outside the "
                                 f"ASR dictionary (LibriSpeech's A-Z and ', and spaces)")
            try:
                rate = sf.info(str(f)).samplerate
            except RuntimeError as e:
                raise InputError(f"{f}: not a readable FLAC file: {e}") from None
            if rate != SAMPLE_RATE:
                raise InputError(f"{f}: {rate} Hz; s3prl's ASR needs {SAMPLE_RATE} Hz audio")
        counts[split] = len(files)
    return counts


def write_bucket_file(data: Path, split: str, path: Path) -> Path:
    """`path` (`bucket_file/<split>.csv`): every flac of `data/split`, longest first."""
    rows = sorted(((sf.info(str(f)).frames, f.relative_to(data).as_posix()) for f in flacs(data / split)),
                  key=lambda row: (-row[0], row[1]))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["", "file_path", "length", "label"])
    writer.writerows([i, file, length, ""] for i, (length, file) in enumerate(rows))
    atomic_write_text(path, text.getvalue())
    return path


def write_dictionary(data: Path, path: Path, split: str = SPLITS[0]) -> Path:
    """`path` (char.dict): `CHARS`, each with its count in `data/split`'s transcripts."""
    transcripts = read_transcripts(data / split)
    counts = Counter(t for f in flacs(data / split) for t in tokens(transcripts[f.stem]))
    atomic_write_text(path, "".join(f"{c} {counts[c]}\n" for c in CHARS))
    return path


def prepare(data: Path, expdir: Path) -> tuple[Path, Path]:
    """Write EXPDIR/bucket_file/<split>.csv for every split and EXPDIR/char.dict; return
    (bucket folder, dictionary)."""
    for split in SPLITS:
        write_bucket_file(data, split, expdir / "bucket_file" / f"{split}.csv")
    return expdir / "bucket_file", write_dictionary(data, expdir / "char.dict")
