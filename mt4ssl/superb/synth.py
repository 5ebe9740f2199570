"""`mt4ssl synth-superb --task ks|sid|ic --out DIR`: synthetic SUPERB task data in the layouts
of the real datasets, so s3prl's KS, SID and IC run end to end here. For PR and ASR use
`mt4ssl synth-corpus`. Speech comes from the voices of `mt4ssl.data.synth` (espeak-ng and
flite); every file is a 16 kHz mono 16-bit WAV.

KS, Speech Commands v1 (`-d speech_commands`):
    DIR/train/<word>/<spk>_nohash_0.wav        1 s
    DIR/train/_background_noise_/*.wav         5 s of generated noise each (white, pink, brown)
    DIR/test/<12 classes>/<spk>_nohash_<n>.wav the 10 words, _unknown_, _silence_
  Words: the 10 commands (yes no up down left right on off stop go) and `--unknown` of the
  v1 auxiliary words (bed bird cat ...), each spoken once by every speaker, centred in 1 s
  (cut to the middle second if longer). The first `--speakers` voices make the training root,
  the next `--test-speakers` the test root. s3prl takes its dev split from a hash of the
  speaker prefix (`<spk>` before `_nohash_`) and drops a 10 % "test" slice: each speaker id is
  chosen so that every fifth training speaker (the first included) hashes to dev and the
  others to train. The test root's _silence_ clips are 1 s cuts of new noise.

SID, VoxCeleb1 identification (`-d voxceleb1`):
    DIR/{dev,test}/wav/idNNNNN/<video>/NNNNN.wav
    DIR/iden_split.txt                         `1|2|3 idNNNNN/<video>/NNNNN.wav` (train|dev|test)
  One speaker per voice: the i-th voice is id{10001 + i} (s3prl's label i). Each speaker reads
  `--utterances` training sentences from one video and `--eval-utterances` dev and test
  sentences each from one more video per split (sentences of 4-10 words from
  `mt4ssl.data.text`). As in VoxCeleb1, whose test/wav holds 40 of its 1251 speakers, the last
  fifth of the speakers (at least one) are under test/wav, the others under dev/wav.

IC, Fluent Speech Commands (`-d fluent_commands`):
    DIR/data/{train,valid,test}_data.csv       `,path,speakerId,transcription,action,object,location`
    DIR/wavs/speakers/<speakerId>/<uuid>.wav
  FSC's 31 intents (`INTENTS`: activate/deactivate the lights in the kitchen, increase the
  heat, bring the socks, change the language to German, ...), each said in one of a few ways
  (`PHRASES`). The splits have disjoint speakers (`--speakers`, `--valid-speakers`,
  `--test-speakers`), each saying `--utterances` commands. Training commands go through the
  intents in a seeded order (all 31 once there are 31 training commands); valid and test
  commands are drawn from the intents in train, so every slot value they hold occurs in train
  (s3prl takes its classes from train).

Variation, so that no task is solved by the voice alone: every spoken utterance gets its own
speed (sox `tempo`, a factor drawn from `--speed`), pitch (sox `pitch`, cents drawn from
`--pitch`) and added noise (white, pink or brown, at an SNR in dB drawn from `--snr` over the
power of the utterance as spoken; none with `--no-noise`). They are drawn from a generator
seeded by (`--seed`, the file's path), as are the texts: the data do not depend on
`--workers`, nor on being resumed. DIR/variation.tsv lists them (`path speed pitch_cents
snr_db noise`); the marker holds the settings and the file's sha256.

DIR/.mt4ssl-synth-superb.partial (the settings) is written first and the marker
DIR/.mt4ssl-synth-superb.json (settings, counts, variation) last; every file is written
atomically. Run again with the same settings, a finished folder is kept as it is and an
interrupted one is resumed (the files already written are kept); a folder of other settings,
or a non-empty one not written by this command, is an error.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import string
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from tqdm import tqdm

from mt4ssl.data.synth import VOICES, Voice, _check_programs, _speak
from mt4ssl.data.text import TextGenerator
from mt4ssl.errors import InputError
from mt4ssl.superb.tasks import BACKGROUND, IC_COLUMNS, IC_SPLITS, KS_WORDS, SID_SPLIT_FILE, dev_split
from mt4ssl.utils.io import atomic_open, atomic_write_text

SR = 16000
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin",
                 "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
MARKER = ".mt4ssl-synth-superb.json"  # written last: the folder is complete
PARTIAL = ".mt4ssl-synth-superb.partial"  # written first: the settings of the folder being written
VARIATION = "variation.tsv"
FORMAT = 2  # of the files written; 1: KS without variation. Bump on any change.
NOISES = ("white", "pink", "brown")
SID_WORDS = (4, 10)  # words per SID sentence

# Fluent Speech Commands' 31 (action, object, location) intents.
_ROOMS = ("none", "kitchen", "bedroom", "washroom")
INTENTS = tuple(
    [(a, "lights", r) for a in ("activate", "deactivate") for r in _ROOMS]
    + [(a, "heat", r) for a in ("increase", "decrease") for r in _ROOMS]
    + [(a, o, "none") for a in ("activate", "deactivate") for o in ("lamp", "music")]
    + [(a, "volume", "none") for a in ("increase", "decrease")]
    + [("bring", o, "none") for o in ("newspaper", "juice", "socks", "shoes")]
    + [("change language", o, "none") for o in ("none", "Chinese", "Korean", "English", "German")])
# Ways to say them, by (action, object) or (action, "*"): {obj} is the object, {in} " in the
# <room>" and {at} "<room> " (both empty for location none).
PHRASES = {
    ("activate", "lights"): ("turn on the lights{in}", "switch on the {at}lights",
                             "turn the {at}lights on", "{at}lights on"),
    ("deactivate", "lights"): ("turn off the lights{in}", "switch off the {at}lights",
                               "turn the {at}lights off", "{at}lights off"),
    ("increase", "heat"): ("turn the heat up{in}", "increase the temperature{in}",
                           "make it warmer{in}", "{at}heat up"),
    ("decrease", "heat"): ("turn the heat down{in}", "decrease the temperature{in}",
                           "make it cooler{in}", "{at}heat down"),
    ("activate", "lamp"): ("turn on the lamp", "switch on the lamp", "lamp on"),
    ("deactivate", "lamp"): ("turn off the lamp", "switch off the lamp", "lamp off"),
    ("activate", "music"): ("play the music", "start the music", "put on some music", "music on"),
    ("deactivate", "music"): ("stop the music", "pause the music", "turn the music off", "music off"),
    ("increase", "volume"): ("turn up the volume", "increase the volume", "louder please", "volume up"),
    ("decrease", "volume"): ("turn down the volume", "decrease the volume", "quieter please",
                             "volume down"),
    ("bring", "*"): ("bring me my {obj}", "get me the {obj}", "fetch my {obj}", "go get the {obj}"),
    ("change language", "none"): ("change the language", "switch the language", "language settings"),
    ("change language", "*"): ("change the language to {obj}", "switch the language to {obj}",
                               "set my language to {obj}", "{obj} please"),
}
SIZES = {  # the size options of each task
    "ks": ("speakers", "test_speakers", "unknown"),
    "sid": ("speakers", "utterances", "eval_utterances"),
    "ic": ("speakers", "valid_speakers", "test_speakers", "utterances"),
}


@dataclass(frozen=True)
class Variation:
    """The ranges each utterance's speed (tempo factor), pitch shift (cents) and SNR (dB) are
    drawn from, uniformly; snr None: no noise."""

    speed: tuple[float, float] = (0.85, 1.15)
    pitch: tuple[float, float] = (-200.0, 200.0)
    snr: tuple[float, float] | None = (10.0, 30.0)

    def check(self) -> None:
        for option, values, low, high in (("--speed", self.speed, 0.5, 2.0),
                                          ("--pitch", self.pitch, -1200, 1200),
                                          ("--snr", self.snr, -20, 100)):
            if values is None:
                continue
            if len(values) != 2 or not all(math.isfinite(v) for v in values) or values[0] > values[1]:
                raise InputError(f"{option} takes LOW HIGH (finite, LOW <= HIGH), got {list(values)}")
            if values[0] < low or values[1] > high:
                raise InputError(f"{option} {values[0]:g} {values[1]:g}: outside {low:g} .. {high:g}")

    def settings(self) -> dict:
        return {k: None if v is None else [float(x) for x in v] for k, v in asdict(self).items()}

    def draw(self, rng: random.Random) -> dict:
        noise = self.snr is not None
        return {"speed": round(rng.uniform(*self.speed), 3), "pitch": round(rng.uniform(*self.pitch)),
                "snr": round(rng.uniform(*self.snr), 1) if noise else None,
                "noise": rng.choice(NOISES) if noise else "none"}


@dataclass(frozen=True)
class _Utterance:
    """One spoken file to write: its path in DIR, voice and text."""

    path: str
    voice: Voice
    text: str
    one_second: bool = False  # KS: centred in (or cut to) 1 s


Plan = tuple[list[_Utterance], dict[str, str | np.ndarray], dict[str, int]]  # + other files, counts


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="ks, sid or ic (pr and asr: `mt4ssl synth-corpus`)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write: new, empty, or one this command "
                        "wrote with the same settings (kept if finished, else resumed)")
    parser.add_argument("--speakers", type=int, help="ks: training-root voices (10); sid: speakers (10); "
                        "ic: training speakers (10)")
    parser.add_argument("--test-speakers", type=int, help="ks: test-root voices (3); ic: test speakers (3)")
    parser.add_argument("--valid-speakers", type=int, help="ic: valid speakers (3)")
    parser.add_argument("--unknown", type=int, help="ks: auxiliary (_unknown_) words (5)")
    parser.add_argument("--utterances", type=int, help="sid: training utterances per speaker (8); "
                        "ic: commands per speaker (20)")
    parser.add_argument("--eval-utterances", type=int, help="sid: dev and test utterances per speaker (2)")
    parser.add_argument("--speed", type=float, nargs=2, default=Variation.speed, metavar=("LOW", "HIGH"),
                        help="tempo factor range of each utterance (0.85 1.15)")
    parser.add_argument("--pitch", type=float, nargs=2, default=Variation.pitch, metavar=("LOW", "HIGH"),
                        help="pitch shift range in cents (-200 200)")
    parser.add_argument("--snr", type=float, nargs=2, default=Variation.snr, metavar=("LOW", "HIGH"),
                        help="SNR range in dB of the added white/pink/brown noise (10 30)")
    parser.add_argument("--no-noise", action="store_true", help="add no noise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the texts, variation and noise (0)")
    parser.add_argument("--workers", type=int, help="parallel synthesis threads (default: CPU count)")


def run(args: argparse.Namespace) -> int:
    if args.task not in SIZES:
        raise InputError(f"task {args.task!r} not supported: {', '.join(SIZES)} "
                         "(pr and asr use `mt4ssl synth-corpus`)")
    sizes = {k: getattr(args, k) for k in ("speakers", "test_speakers", "valid_speakers", "unknown",
                                           "utterances", "eval_utterances") if getattr(args, k) is not None}
    for name in sizes:
        if name not in SIZES[args.task]:
            raise InputError(f"--{name.replace('_', '-')} does not apply to --task {args.task} (its "
                             f"options: {', '.join('--' + k.replace('_', '-') for k in SIZES[args.task])})")
    variation = Variation(tuple(args.speed), tuple(args.pitch), None if args.no_noise else tuple(args.snr))
    start = time.perf_counter()
    synth = {"ks": synth_ks, "sid": synth_sid, "ic": synth_ic}[args.task]
    counts = synth(args.out, **sizes, seed=args.seed, variation=variation, workers=args.workers)
    print(f"wrote {args.out}: {counts} in {time.perf_counter() - start:.1f} s")
    return 0


def speaker_id(speaker: int, split: str) -> str:
    """An 8-hex-digit id for voice `speaker` that s3prl's KS hash puts in `split`."""
    for salt in range(10_000):
        spk = f"{speaker:04x}{salt:04x}"
        if dev_split(f"{spk}_nohash_0.wav") == split:
            return spk
    raise RuntimeError(f"no speaker id hashes to {split}")  # pragma: no cover


def synth_ks(out: str | Path, speakers: int = 10, test_speakers: int = 3, unknown: int = 5,
             seed: int = 0, variation: Variation = Variation(), workers: int | None = None) -> dict[str, int]:
    """Write the KS corpus (module docstring); return files per split (train, dev, test)."""
    if not 2 <= speakers or not 1 <= test_speakers or speakers + test_speakers > len(VOICES):
        raise InputError(f"--speakers (>= 2) + --test-speakers (>= 1) must be at most "
                         f"{len(VOICES)} voices, got {speakers} + {test_speakers}")
    if not 1 <= unknown <= len(UNKNOWN_WORDS):
        raise InputError(f"--unknown must be 1..{len(UNKNOWN_WORDS)}, got {unknown}")
    settings = {"task": "ks", "speakers": speakers, "test_speakers": test_speakers, "unknown": unknown}

    def plan() -> Plan:
        words = KS_WORDS + UNKNOWN_WORDS[:unknown]
        jobs, counts = [], {"train": 0, "dev": 0, "test": 0}
        for i, voice in enumerate(VOICES[:speakers + test_speakers]):
            test = i >= speakers
            split = "test" if test else ("dev" if i % 5 == 0 else "train")
            spk = speaker_id(voice.speaker, "train" if test else split)
            for n, word in enumerate(words):
                if test:  # all unknown words in one folder: one file name per word
                    path = f"test/{word if word in KS_WORDS else '_unknown_'}/{spk}_nohash_{n}.wav"
                else:
                    path = f"train/{word}/{spk}_nohash_0.wav"
                jobs.append(_Utterance(path, voice, word, one_second=True))
                counts[split] += 1
        rng = np.random.default_rng(seed)
        files = {f"train/{BACKGROUND}/{c}_noise.wav": _noise(rng, 5 * SR, c) for c in NOISES}
        files |= {f"test/_silence_/noise{n}_nohash_0.wav": _noise(rng, SR, c) for n, c in enumerate(NOISES)}
        counts["test"] += len(NOISES)
        return jobs, files, counts

    return _corpus(Path(out), settings, plan, seed, variation, workers)


def synth_sid(out: str | Path, speakers: int = 10, utterances: int = 8, eval_utterances: int = 2,
              seed: int = 0, variation: Variation = Variation(), workers: int | None = None) -> dict[str, int]:
    """Write the SID corpus (module docstring); return utterances per split and speakers."""
    if not 2 <= speakers <= len(VOICES):
        raise InputError(f"--speakers must be 2..{len(VOICES)} (the voices), got {speakers}")
    if utterances < 1 or eval_utterances < 1:
        raise InputError(f"--utterances and --eval-utterances must be >= 1, got {utterances}, {eval_utterances}")
    settings = {"task": "sid", "speakers": speakers, "utterances": utterances,
                "eval_utterances": eval_utterances}

    def plan() -> Plan:
        text = TextGenerator()
        first_test = speakers - max(1, speakers // 5)  # the speakers under test/wav
        jobs, lines = [], []
        counts = {"train": 0, "dev": 0, "test": 0, "speakers": speakers}
        for i, voice in enumerate(VOICES[:speakers]):
            spk, folder = f"id{10001 + i}", "test" if i >= first_test else "dev"
            for index, split, n in ((1, "train", utterances), (2, "dev", eval_utterances),
                                    (3, "test", eval_utterances)):
                rng = _rng(seed, "sid", spk, split)
                video = "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(11))
                for k in range(n):
                    name = f"{spk}/{video}/{k + 1:05d}.wav"
                    sentence = text.sentence(rng, rng.randint(*SID_WORDS))
                    jobs.append(_Utterance(f"{folder}/wav/{name}", voice, sentence.text))
                    lines.append(f"{index} {name}\n")
                    counts[split] += 1
        return jobs, {SID_SPLIT_FILE: "".join(lines)}, counts

    return _corpus(Path(out), settings, plan, seed, variation, workers)


def synth_ic(out: str | Path, speakers: int = 10, valid_speakers: int = 3, test_speakers: int = 3,
             utterances: int = 20, seed: int = 0, variation: Variation = Variation(),
             workers: int | None = None) -> dict[str, int]:
    """Write the IC corpus (module docstring); return commands per split and intents in train."""
    total = speakers + valid_speakers + test_speakers
    if min(speakers, valid_speakers, test_speakers) < 1 or total > len(VOICES):
        raise InputError(f"--speakers + --valid-speakers + --test-speakers (each >= 1) must be at most "
                         f"{len(VOICES)} voices, got {speakers} + {valid_speakers} + {test_speakers}")
    if utterances < 1:
        raise InputError(f"--utterances must be >= 1, got {utterances}")
    settings = {"task": "ic", "speakers": speakers, "valid_speakers": valid_speakers,
                "test_speakers": test_speakers, "utterances": utterances}

    def plan() -> Plan:
        order = list(INTENTS)
        _rng(seed, "ic", "intents").shuffle(order)
        jobs, trained = [], 0
        rows: dict[str, list] = {split: [] for split in IC_SPLITS}
        for i, voice in enumerate(VOICES[:total]):
            split = IC_SPLITS[(i >= speakers) + (i >= speakers + valid_speakers)]
            rng = _rng(seed, "ic", voice.speaker)
            spk = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(16))
            for _ in range(utterances):
                if split == "train":
                    intent, trained = order[trained % len(order)], trained + 1
                else:
                    intent = rng.choice(order[:min(trained, len(order))])
                path = f"wavs/speakers/{spk}/{uuid.UUID(int=rng.getrandbits(128), version=4)}.wav"
                words = _command(rng, *intent)
                jobs.append(_Utterance(path, voice, words))
                rows[split].append([path, spk, words[0].upper() + words[1:], *intent])
        files = {f"data/{split}_data.csv": _csv(rows[split]) for split in IC_SPLITS}
        counts = {split: len(rows[split]) for split in IC_SPLITS} | {"intents": min(trained, len(order))}
        return jobs, files, counts

    return _corpus(Path(out), settings, plan, seed, variation, workers)


def _command(rng: random.Random, action: str, obj: str, location: str) -> str:
    templates = PHRASES.get((action, obj)) or PHRASES[(action, "*")]
    room = location != "none"
    return rng.choice(templates).format(obj=obj, **{"in": f" in the {location}" if room else "",
                                                    "at": f"{location} " if room else ""})


def _csv(rows: list[list]) -> str:
    f = io.StringIO()
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["", *IC_COLUMNS])
    writer.writerows([i, *row] for i, row in enumerate(rows))
    return f.getvalue()


def _rng(*parts) -> random.Random:
    return random.Random("/".join(map(str, ("mt4ssl-synth-superb", *parts))))


# ---------------------------------------------------------------------------- writing


def _corpus(out: Path, settings: dict, plan: Callable[[], Plan], seed: int, variation: Variation,
            workers: int | None) -> dict[str, int]:
    """Write the corpus `plan` describes into `out` (resuming a partial one of the same
    settings), then the variation list and the marker; return its counts."""
    variation.check()
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    settings = {**settings, "seed": seed, "variation": variation.settings(), "format": FORMAT}
    if (out / MARKER).is_file():
        done = json.loads((out / MARKER).read_text())
        if done.get("settings") == settings:
            (out / PARTIAL).unlink(missing_ok=True)
            return done["counts"]
        _refuse(out, "a corpus", done.get("settings", {}), settings)
    if (out / PARTIAL).is_file():
        before = json.loads((out / PARTIAL).read_text())
        if before != settings:
            _refuse(out, "an unfinished corpus", before, settings)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: exists and is not an empty folder (nor one of "
                         f"`mt4ssl synth-superb`: no {PARTIAL}); give a new or empty folder")
    _check_programs()
    jobs, files, counts = plan()
    atomic_write_text(out / PARTIAL, json.dumps(settings, indent=2) + "\n")
    pool = ThreadPoolExecutor(workers or os.cpu_count() or 1)  # the work is in subprocesses
    try:
        draws = list(tqdm(pool.map(lambda job: _render(out, job, seed, variation), jobs),
                          total=len(jobs), desc=f"synth-superb {settings['task']}", unit="file"))
    finally:  # on an error, queued files are dropped instead of written
        pool.shutdown(cancel_futures=True)
    for path, content in files.items():
        if isinstance(content, str):
            atomic_write_text(out / path, content)
        else:
            _write_wav(out / path, content)
    table = "path\tspeed\tpitch_cents\tsnr_db\tnoise\n" + "".join(
        f"{job.path}\t{d['speed']:g}\t{d['pitch']}\t{'none' if d['snr'] is None else d['snr']}\t{d['noise']}\n"
        for job, d in zip(jobs, draws))
    atomic_write_text(out / VARIATION, table)
    marker = {"tool": f"mt4ssl synth-superb --task {settings['task']}", "settings": settings,
              "counts": counts, "variation": {"file": VARIATION,
                                              "sha256": hashlib.sha256(table.encode()).hexdigest()}}
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")
    (out / PARTIAL).unlink()
    return counts


def _refuse(out: Path, what: str, before: dict, settings: dict) -> None:
    changed = sorted(k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k))
    raise InputError(f"--out {out}: holds {what} of other settings ("
                     + ", ".join(f"{k}: {before.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
                     + "); give a new or empty folder")


def _render(out: Path, job: _Utterance, seed: int, variation: Variation) -> dict:
    """Speak `job` with its drawn speed, pitch and noise into DIR/job.path (kept if written
    before); return the draw."""
    rng = _rng(seed, "variation", job.path)
    draw = variation.draw(rng)
    path = out / job.path
    if path.is_file():
        return draw
    with tempfile.TemporaryDirectory() as tmp:
        spoken, varied = Path(tmp, "spoken.flac"), Path(tmp, "varied.wav")
        _speak(job.voice, job.text, spoken)
        effects = (["pitch", str(draw["pitch"])] if draw["pitch"] else []) + (
            ["tempo", "-s", f"{draw['speed']:g}"] if draw["speed"] != 1 else [])
        cmd = ["sox", "-D", "-V1", str(spoken), "-e", "floating-point", "-b", "32", str(varied), *effects]
        proc = subprocess.run(cmd, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): "
                               f"{proc.stderr.decode(errors='replace').strip()}")
        wav, sr = sf.read(str(varied), dtype="float32")
    assert sr == SR, (job.path, sr)
    power = float(np.mean(wav.astype(np.float64) ** 2))
    if job.one_second:
        wav = _one_second(wav)
    if draw["snr"] is not None:
        noise = _noise(np.random.default_rng(rng.getrandbits(64)), len(wav), draw["noise"])
        wav = wav + noise * np.sqrt(power / 10 ** (draw["snr"] / 10) / np.mean(noise.astype(np.float64) ** 2))
    peak = float(np.abs(wav).max())
    _write_wav(path, wav * (0.99 / peak if peak > 0.99 else 1.0))
    return draw


def _one_second(wav: np.ndarray) -> np.ndarray:
    if len(wav) >= SR:
        start = (len(wav) - SR) // 2
        return wav[start:start + SR]
    left = (SR - len(wav)) // 2
    return np.pad(wav, (left, SR - len(wav) - left))


def _noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    """White, pink (1/f) or brown (1/f^2) noise of `n` samples, peak 0.3."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    wav = np.fft.irfft(spectrum / f ** {"white": 0.0, "pink": 0.5, "brown": 1.0}[color], n)
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32)


def _write_wav(path: Path, wav: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        sf.write(f, wav.astype(np.float32), SR, subtype="PCM_16", format="WAV")
