"""A Libri-light `librispeech_finetuning` layout from a (synthetic) LibriSpeech-layout train split,
so that `mt4ssl manifest-limited` makes the 10-minute and 1-hour splits of it.

    python tools/synth_librilight.py exp/tiny/corpus_ft/train-clean-100 exp/tiny/librispeech_finetuning
    mt4ssl manifest-limited --librilight exp/tiny/librispeech_finetuning \\
        --librispeech exp/tiny/corpus_ft --splits train-10m,train-1h,dev-clean,test-clean --out DIR

Writes OUT/1h/{0..5}/clean/SPK/CH/ (six sets of about `--minutes` each, as Libri-light's
`1h/{0..5}`) and OUT/9h/clean/SPK/CH/ (whatever audio is left, when some is): relative
symbolic links to the FLACs and each chapter's `SPK-CH.trans.txt` with the lines of the
utterances in that set. Libri-light's sets are "clean" and "other" LibriSpeech speakers; a
synthetic corpus has one kind, written as `clean/`.

Selection (deterministic; no randomness): in rounds, every speaker (in id order) gives each
set that is not yet full its next utterance (in id order); a set is full when it holds at
least `--minutes`. So every set has (nearly) every voice, sets differ in their utterances,
and `1h/0` (= train-10m) is in train-1h. Not enough audio for the sets is an error saying
how many hours to synthesize. OUT/layout.json lists each set's utterances and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mt4ssl.data.audio import SAMPLE_RATE, audio_info  # noqa: E402
from mt4ssl.data.manifest import read_transcripts  # noqa: E402
from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.utils.io import atomic_write_text  # noqa: E402


def utterances(train: Path, ext: str = "flac") -> dict[str, list[tuple[Path, str, float]]]:
    """speaker -> [(audio file, transcript, seconds)] in utterance-id order."""
    if not train.is_dir():
        raise InputError(f"{train}: not a folder (the train split of a LibriSpeech-layout corpus)")
    texts = read_transcripts(train)
    by_speaker: dict[str, list[tuple[Path, str, float]]] = defaultdict(list)
    for path in sorted(train.rglob(f"*.{ext}")):
        if path.stem not in texts:
            raise InputError(f"{path}: no transcript line for {path.stem} in its *.trans.txt")
        by_speaker[path.relative_to(train).parts[0]].append((path, texts[path.stem], audio_info(path) / SAMPLE_RATE))
    if not by_speaker:
        raise InputError(f"{train}: no .{ext} files")
    return dict(sorted(by_speaker.items()))


def assign(by_speaker: dict[str, list], sets: int, seconds: float) -> tuple[list[list], list]:
    """(sets lists of utterances, the rest); see the module docstring."""
    total = sum(u[2] for utts in by_speaker.values() for u in utts)
    if total < sets * seconds:
        raise InputError(f"the train split has {total / 3600:.2f} h of audio, {sets} sets of {seconds / 60:g} min "
                         f"need {sets * seconds / 3600:.2f} h: synthesize more (`mt4ssl synth-corpus --hours H`)")
    chosen: list[list] = [[] for _ in range(sets)]
    filled = [0.0] * sets
    queues = {spk: list(utts) for spk, utts in by_speaker.items()}
    while any(f < seconds for f in filled) and any(queues.values()):
        for spk, queue in queues.items():
            for k in range(sets):
                if queue and filled[k] < seconds:
                    utt = queue.pop(0)
                    chosen[k].append(utt)
                    filled[k] += utt[2]
    if any(f < seconds for f in filled):  # only a few long utterances: the total check is not enough
        raise InputError(f"could not fill {sets} sets of {seconds / 60:g} min from the train split "
                         f"({', '.join(f'{f / 60:.1f}' for f in filled)} min): synthesize more")
    rest = [u for queue in queues.values() for u in queue]
    return chosen, rest


def write_set(out: Path, utts: list[tuple[Path, str, float]], copy: bool) -> None:
    """OUT/clean/SPK/CH/ with links (or copies) and the chapters' trans.txt."""
    chapters: dict[Path, list[str]] = defaultdict(list)
    for path, text, _ in utts:
        spk, ch = path.stem.split("-")[:2]
        folder = out / "clean" / spk / ch
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        if copy:
            shutil.copyfile(path, target)
        else:
            target.symlink_to(os.path.relpath(path.resolve(), folder.resolve()))
        chapters[folder].append(f"{path.stem} {text}\n")
    for folder, lines in chapters.items():
        spk, ch = folder.parent.name, folder.name
        atomic_write_text(folder / f"{spk}-{ch}.trans.txt", "".join(sorted(lines)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train", type=Path, help="a LibriSpeech-layout split folder (SPK/CH/*.flac + *.trans.txt)")
    p.add_argument("out", type=Path, help="the librispeech_finetuning folder to write (must not exist)")
    p.add_argument("--sets", type=int, default=6, help="sets in 1h/ (Libri-light: 6)")
    p.add_argument("--minutes", type=float, default=10.0, help="audio per set (Libri-light: 10)")
    p.add_argument("--copy", action="store_true", help="copy the FLACs instead of linking them")
    p.add_argument("--ext", default="flac")
    args = p.parse_args(argv)
    try:
        if args.sets < 1 or args.minutes <= 0:
            raise InputError(f"--sets {args.sets} and --minutes {args.minutes:g} must be positive")
        if args.out.exists():
            raise InputError(f"{args.out}: exists; remove it or give another folder")
        chosen, rest = assign(utterances(args.train, args.ext), args.sets, args.minutes * 60)
    except InputError as e:
        print(f"synth_librilight: error: {e}", file=sys.stderr)
        return 2
    tmp = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    layout = {"train": str(args.train), "sets": {}}
    for k, utts in enumerate(chosen):
        write_set(tmp / "1h" / str(k), utts, args.copy)
        layout["sets"][f"1h/{k}"] = {"seconds": round(sum(u[2] for u in utts), 2),
                                     "utterances": [u[0].stem for u in utts]}
    if rest:
        write_set(tmp / "9h", rest, args.copy)
        layout["sets"]["9h"] = {"seconds": round(sum(u[2] for u in rest), 2), "utterances": [u[0].stem for u in rest]}
    atomic_write_text(tmp / "layout.json", json.dumps(layout, indent=1) + "\n")
    tmp.rename(args.out)
    for name, s in layout["sets"].items():
        speakers = len({u.split("-")[0] for u in s["utterances"]})
        print(f"{args.out / name}: {len(s['utterances'])} utterances, {s['seconds'] / 60:.1f} min, {speakers} speakers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
