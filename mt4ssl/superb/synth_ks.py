"""`mt4ssl synth-superb --task ks --out DIR`: a synthetic Speech Commands v1 corpus for KS.

    DIR/train/<word>/<spk>_nohash_0.wav        1 s, 16 kHz mono 16-bit WAV
    DIR/train/_background_noise_/*.wav         5 s of generated noise each (white, pink, brown)
    DIR/test/<12 classes>/<spk>_nohash_0.wav   the 10 words, _unknown_, _silence_
    DIR/.mt4ssl-synth-superb.json              settings, written last

Words: the 10 commands (yes no up down left right on off stop go) and `--unknown` of the
v1 auxiliary words (bed bird cat ...), each spoken once by every speaker with the voices of
`mt4ssl.data.synth` (espeak-ng and flite), centred in 1 s (cut to the middle second if
longer). The first `--speakers` voices make the training root, the next `--test-speakers`
the test root. s3prl takes its dev split from a hash of the speaker prefix (`<spk>` before
`_nohash_`) and drops a 10 % "test" slice: each speaker id is chosen so that every fifth
training speaker (the first included) hashes to dev and the others to train. The test
root's _silence_ clips are 1 s cuts of new noise. For PR, use `mt4ssl synth-corpus`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from mt4ssl.data.synth import VOICES, _check_programs, _speak
from mt4ssl.errors import InputError
from mt4ssl.superb.tasks import BACKGROUND, KS_WORDS, dev_split
from mt4ssl.utils.io import atomic_write_text

SR = 16000
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin",
                 "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
MARKER = ".mt4ssl-synth-superb.json"
FORMAT = 1


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="ks (for pr use `mt4ssl synth-corpus`)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (new or empty)")
    parser.add_argument("--speakers", type=int, default=10, help="training-root voices (10)")
    parser.add_argument("--test-speakers", type=int, default=3, help="test-root voices (3)")
    parser.add_argument("--unknown", type=int, default=5, help="auxiliary (_unknown_) words (5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (0)")


def run(args: argparse.Namespace) -> int:
    if args.task != "ks":
        raise InputError(f"task {args.task!r} not supported: ks only "
                         "(pr uses `mt4ssl synth-corpus`)")
    start = time.perf_counter()
    counts = synth_ks(args.out, args.speakers, args.test_speakers, args.unknown, args.seed)
    print(f"wrote {args.out}: {counts} in {time.perf_counter() - start:.1f} s")
    return 0


def speaker_id(speaker: int, split: str) -> str:
    """An 8-hex-digit id for voice `speaker` that s3prl's hash puts in `split`."""
    for salt in range(10_000):
        spk = f"{speaker:04x}{salt:04x}"
        if dev_split(f"{spk}_nohash_0.wav") == split:
            return spk
    raise RuntimeError(f"no speaker id hashes to {split}")  # pragma: no cover


def synth_ks(out: str | Path, speakers: int = 10, test_speakers: int = 3, unknown: int = 5,
             seed: int = 0) -> dict[str, int]:
    out = Path(out)
    settings = {"speakers": speakers, "test_speakers": test_speakers, "unknown": unknown,
                "seed": seed, "format": FORMAT}
    if not 2 <= speakers or not 1 <= test_speakers or speakers + test_speakers > len(VOICES):
        raise InputError(f"--speakers (>= 2) + --test-speakers (>= 1) must be at most "
                         f"{len(VOICES)} voices, got {speakers} + {test_speakers}")
    if not 1 <= unknown <= len(UNKNOWN_WORDS):
        raise InputError(f"--unknown must be 1..{len(UNKNOWN_WORDS)}, got {unknown}")
    if (out / MARKER).is_file():
        done = json.loads((out / MARKER).read_text())
        if done["settings"] == settings:
            return done["counts"]
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out}: exists and is not empty; give a new or empty folder")
    _check_programs()
    rng = np.random.default_rng(seed)
    words = KS_WORDS + UNKNOWN_WORDS[:unknown]
    counts = {"train": 0, "dev": 0, "test": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for i, voice in enumerate(VOICES[:speakers + test_speakers]):
            test = i >= speakers
            split = "test" if test else ("dev" if i % 5 == 0 else "train")
            spk = speaker_id(voice.speaker, "train" if test else split)
            for word in words:
                flac = Path(tmp, f"{spk}-{word}.flac")
                _speak(voice, word, flac)
                if test:  # all unknown words in one folder: one file name per word
                    folder = word if word in KS_WORDS else "_unknown_"
                    path = out / "test" / folder / f"{spk}_nohash_{words.index(word)}.wav"
                else:
                    path = out / "train" / word / f"{spk}_nohash_0.wav"
                _write(path, _one_second(flac))
                counts[split] += 1
    for name, wav in _noises(rng, 5 * SR).items():
        _write(out / "train" / BACKGROUND / f"{name}_noise.wav", wav)
    for n, wav in enumerate(_noises(rng, SR).values()):
        _write(out / "test" / "_silence_" / f"noise{n}_nohash_0.wav", wav)
        counts["test"] += 1
    atomic_write_text(out / MARKER, json.dumps({"tool": "mt4ssl synth-superb --task ks",
                                                "settings": settings, "counts": counts}, indent=2) + "\n")
    return counts


def _one_second(path: Path) -> np.ndarray:
    wav, sr = sf.read(str(path), dtype="float32")
    assert sr == SR, (path, sr)
    if len(wav) >= SR:
        start = (len(wav) - SR) // 2
        return wav[start:start + SR]
    left = (SR - len(wav)) // 2
    return np.pad(wav, (left, SR - len(wav) - left))


def _noises(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """White, pink (1/f) and brown (1/f^2) noise of `n` samples, peak 0.3."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    out = {"white": np.fft.irfft(spectrum, n), "pink": np.fft.irfft(spectrum / np.sqrt(f), n),
           "brown": np.fft.irfft(spectrum / f, n)}
    return {k: (0.3 * v / np.abs(v).max()).astype(np.float32) for k, v in out.items()}


def _write(path: Path, wav: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, SR, subtype="PCM_16")
