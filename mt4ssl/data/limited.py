"""`mt4ssl manifest-limited`: manifests of the Libri-light limited-supervision splits and the
LibriSpeech dev/test sets, for CTC fine-tuning and decoding.

    mt4ssl manifest-limited --librilight DATA/librispeech_finetuning --librispeech DATA/LibriSpeech \\
        --out DATA/manifests_ft

Libri-light's `librispeech_finetuning.tgz` holds six 10-minute sets `1h/{0..5}/` and `9h/`,
each with `clean/` and `other/` LibriSpeech-layout trees (`SPK/CH/*.flac`, `SPK-CH.trans.txt`).
The splits of the papers (wav2vec 2.0, HuBERT, data2vec, MT4SSL):

    train-10m   1h/0                 train-1h    1h/0 .. 1h/5
    train-10h   1h/0 .. 1h/5 + 9h    train-clean-100 (100 h)   LibriSpeech's train-clean-100

plus dev-clean, dev-other, test-clean and test-other from the LibriSpeech root (train-clean-100
too when that folder is there). `--splits train-10m,train-1h,dev-clean` writes only those (and
needs only their folders: a 10-minute run does not need 9h, a corpus without dev-other is
fine). Each split gets `{name}.tsv/.wrd/.ltr` (mt4ssl.data.manifest);
`dict.ltr.txt` (fairseq's "SYMBOL COUNT" format, most frequent first) counts the letters of
every split written, so each split's fine-tuning uses the same output symbols (the 10-minute
set alone might lack a rare letter).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from mt4ssl.data.manifest import write_folders
from mt4ssl.errors import InputError
from mt4ssl.utils.io import atomic_write_text

TEN_MIN = [f"1h/{k}" for k in range(6)]
LIMITED = {"train-10m": TEN_MIN[:1], "train-1h": TEN_MIN, "train-10h": TEN_MIN + ["9h"]}
LIBRISPEECH = ("dev-clean", "dev-other", "test-clean", "test-other")
OPTIONAL = ("train-clean-100",)
ALL = (*LIMITED, *LIBRISPEECH, *OPTIONAL)


def write_dictionary(out: Path, names: list[str]) -> Path:
    """`dict.ltr.txt` from the `.ltr` files of `names` in `out`."""
    counts: Counter = Counter()
    for name in names:
        counts.update((out / f"{name}.ltr").read_text(encoding="utf-8").split())
    path = out / "dict.ltr.txt"
    atomic_write_text(path, "".join(f"{s} {counts[s]}\n" for s in sorted(counts, key=lambda s: (-counts[s], s))))
    return path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--librilight", type=Path, required=True,
                   help="the librispeech_finetuning folder (with 1h/0..5 and 9h)")
    p.add_argument("--librispeech", type=Path, required=True,
                   help="the LibriSpeech root (with dev-clean, dev-other, test-clean, test-other)")
    p.add_argument("--out", type=Path, required=True, help="folder for {split}.tsv/.wrd/.ltr and dict.ltr.txt")
    p.add_argument("--splits", default="",
                   help=f"comma-separated splits to write, among {','.join(ALL)} (default: all, "
                        f"train-clean-100 when its folder is there)")
    p.add_argument("--ext", default="flac", help="audio extension (default: flac)")
    p.add_argument("--skip-bad", action="store_true",
                   help="log and skip unreadable/empty/non-16 kHz/multi-channel/untranscribed files")


def run(args: argparse.Namespace) -> int:
    chosen = [s for s in args.splits.split(",") if s] if args.splits else None
    unknown = [s for s in chosen or [] if s not in ALL]
    if unknown:
        raise InputError(f"--splits: unknown split(s) {', '.join(unknown)}; choose among {', '.join(ALL)}")
    wanted = (lambda name: name in chosen) if chosen else (lambda name: name not in OPTIONAL)
    limited = {name: folders for name, folders in LIMITED.items() if wanted(name)}
    librispeech = [name for name in LIBRISPEECH + OPTIONAL if wanted(name)]
    needed = sorted({f for folders in limited.values() for f in folders})
    missing = [str(args.librilight / f) for f in needed if not (args.librilight / f).is_dir()]
    missing += [str(args.librispeech / f) for f in librispeech if not (args.librispeech / f).is_dir()]
    if missing:
        raise InputError(f"missing folder(s) {', '.join(missing)}: --librilight is the librispeech_finetuning "
                         f"folder of Libri-light (1h/0..5, 9h), --librispeech the LibriSpeech root")
    jobs = [(name, args.librilight, folders) for name, folders in limited.items()]
    jobs += [(name, args.librispeech / name, ["."]) for name in librispeech]
    if not chosen:
        jobs += [(name, args.librispeech / name, ["."]) for name in OPTIONAL if (args.librispeech / name).is_dir()]
    for name, root, folders in jobs:
        kept, skipped = write_folders(root, folders, args.out, name, args.ext, args.skip_bad)
        extra = f", skipped {skipped} bad file(s)" if skipped else ""
        print(f"{name}: {kept} utterances -> {args.out / name}.tsv/.wrd/.ltr{extra}")
    path = write_dictionary(args.out, [name for name, _, _ in jobs])
    print(f"letters of every split -> {path}")
    return 0
