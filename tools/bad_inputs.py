"""Bad inputs through the real commands: each must be a clear error (exit 2, `mt4ssl CMD:
error: ...` naming the file, line or key) or, where the user asked for skipping, a logged and
counted skip; never silent, never a stack trace.

    .venv/bin/python tools/bad_inputs.py                    # every case -> results/reliability.md
    .venv/bin/python tools/bad_inputs.py --only km_ --no-write
    .venv/bin/python tools/bad_inputs.py --against 41cca1e  # the same cases on an older commit's mt4ssl

Every case builds its own small inputs in a temporary folder (tones, hand-written manifests,
labels and configs, a tiny random checkpoint), spoils one thing and runs `mt4ssl ...` in this
process through `mt4ssl.cli.main`, exactly what the shell command runs. The outcome is one of
  error    exit 2 with `mt4ssl CMD: error: MESSAGE`
  skipped  exit 0, the bad item logged as skipped and counted (only where the user asked: --skip-bad)
  stopped  a training run stopped with a message saying why (exit 4)
  silent   exit 0 and nothing said: a failure of this project
  crash    an exception escaped (a stack trace): a failure of this project
  unclear  an error whose message does not name what `expect` says (file, line or key)
The table goes to the "Bad inputs" section of results/reliability.md (other sections are kept).
Every case takes a fraction of a second, so tests/test_bad_inputs.py runs all of them in `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # benchmarks.report when run as a script (mt4ssl: the one on the path first)

HEADER = ("# Reliability\n\nFaults injected into runs and bad inputs fed to every stage; each section "
          "was printed by the command it names.\n")  # the same as benchmarks/faults.py's: whichever writes first
RATE = 16000
WORDS = ("HELLO", "WORLD", "SPEECH", "MODEL")
TINY = ["model.preset=tiny", "model.embed_dim=32", "model.ffn_dim=64", "model.num_heads=4", "model.num_layers=2",
        "model.pos_conv_groups=4", "model.teacher.top_k=2",
        "model.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]",
        "model.layerdrop=0.0"]
PRETRAIN_YAML = ("run: {device: cpu, max_updates: 2, log_interval: 1, save_interval: 1, valid_interval: 0}\n"
                 "data: {max_tokens: 200000, num_workers: 0}\n")


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the bad input, in words
    setup: Callable[[Path], list[str]]  # writes the inputs under the folder; returns `mt4ssl` argv
    expect: str  # the message must contain this (the file, line or key)


@dataclass
class Outcome:
    case: Case
    argv: list[str]
    kind: str  # error | skipped | stopped | silent | crash | unclear
    code: int | None
    message: str

    @property
    def ok(self) -> bool:
        return self.kind in ("error", "skipped", "stopped")


# ---------------------------------------------------------------------------- inputs


def tone(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def corpus(d: Path, lengths=(32001, 36000, 40007), split: str = "train") -> Path:
    """A LibriSpeech-layout split `d/libri/{split}/100/10/100-10-000u.flac` + trans.txt."""
    folder = d / "libri" / split / "100" / "10"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for u, n in enumerate(lengths):
        utt = f"100-10-{u:04d}"
        sf.write(folder / f"{utt}.flac", tone(n, u), RATE, subtype="PCM_16")
        lines.append(f"{utt} {' '.join(WORDS[(u + k) % len(WORDS)] for k in range(3))}\n")
    (folder / "100-10.trans.txt").write_text("".join(lines))
    return d / "libri"


def first_audio(d: Path) -> Path:
    return sorted((d / "libri").rglob("*.flac"))[0]


def manifests(d: Path, splits=("train",)) -> Path:
    """`d/m/{split}.tsv/.wrd/.ltr` of `corpus` splits."""
    from mt4ssl.data.manifest import write_split

    for split in splits:
        corpus(d, split=split, lengths=(32001, 36000, 40007) if split == "train" else (33001, 38000))
        write_split(d / "libri" / split, d / "m", split)
    return d / "m"


def edit_line(path: Path, lineno: int, edit: Callable[[str], str | None]) -> None:
    """Replace line `lineno` (1-based) of a text file by edit(line) (None: drop it)."""
    lines = path.read_text().splitlines()
    new = edit(lines[lineno - 1])
    lines[lineno - 1:lineno] = [] if new is None else [new]
    path.write_text("\n".join(lines) + "\n")


def labels(d: Path, splits=("train",), classes: int = 4) -> Path:
    """`d/lab/{split}.km` (the right 50 Hz counts) + dict.km.txt for the manifests of `manifests`."""
    from mt4ssl.data.labels import write_dict
    from mt4ssl.data.manifest import read_manifest
    from mt4ssl.models.cnn import num_frames

    lab = d / "lab"
    lab.mkdir(parents=True, exist_ok=True)
    for split in splits:
        m = read_manifest(d / "m" / f"{split}.tsv")
        (lab / f"{split}.km").write_text("".join(" ".join(str(t % classes) for t in range(num_frames(n))) + "\n"
                                                 for n in m.sizes))
    write_dict(lab / "dict.km.txt", classes)
    return lab


def pretrain_data(d: Path) -> tuple[Path, Path]:
    return manifests(d, ("train",)), labels(d, ("train",))


def pretrain_argv(d: Path, *overrides: str) -> list[str]:
    cfg = d / "pretrain.yaml"
    if not cfg.exists():
        cfg.write_text(PRETRAIN_YAML)
    return ["pretrain", str(cfg), f"data.manifest_dir={d / 'm'}", f"data.labels={{km: {d / 'lab'}}}",
            f"run.out_dir={d / 'run'}", *TINY, *overrides]


def tiny_ckpt(d: Path, name: str = "tiny.pt", spoil: Callable[[dict], None] | None = None, **fields) -> Path:
    """A random checkpoint of a 2-layer model (one k-means label set 'km' of 4 classes)."""
    import torch

    from mt4ssl.models.checkpoint import save_checkpoint, write_state
    from mt4ssl.models.cnn import CONV_LAYERS
    from mt4ssl.models.mt4ssl import MT4SSL, model_config
    from mt4ssl.targets import KMeansConfig, TeacherConfig

    torch.manual_seed(0)
    cfg = model_config("tiny", conv_layers=tuple((32, k, s) for _, k, s in CONV_LAYERS), embed_dim=32, ffn_dim=64,
                       num_heads=4, num_layers=2, pos_conv_groups=4, layerdrop=0.0,
                       kmeans=KMeansConfig(labels=("km",), num_classes=(4,)), teacher=TeacherConfig(top_k=2), **fields)
    path = d / name
    save_checkpoint(path, MT4SSL(cfg))
    if spoil is not None:
        state = torch.load(path, weights_only=True)
        spoil(state)
        write_state(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    return path


def finetune_argv(d: Path, *overrides: str) -> list[str]:
    m = manifests(d, ("train", "valid"))
    ckpt = tiny_ckpt(d)
    cfg = d / "finetune.yaml"
    cfg.write_text("run: {device: cpu, max_updates: 2, log_interval: 1, valid_interval: 0}\n"
                   "data: {max_tokens: 200000, num_workers: 0, valid_split: valid}\n"
                   "model: {mask_channel_length: 8}\n")
    return ["finetune", str(cfg), f"data.manifest_dir={m}", f"run.out_dir={d / 'ft'}", f"run.init_from={ckpt}",
            *overrides]


def features_argv(d: Path) -> list[str]:
    return ["features", "mfcc", str(d / "m"), "train", str(d / "f")]


def write_audio(path: Path, data: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate, subtype=subtype, format=fmt)


def truncate(path: Path, keep: float = 0.6) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


# ---------------------------------------------------------------------------- the cases
# Each setup returns the argv of `mt4ssl`; a manifest-stage case spoils one file of the corpus
# before `mt4ssl manifest`, a data-stage case spoils it after (the manifest was right).


def _manifest_case(spoil: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        corpus(d)
        spoil(first_audio(d))
        return ["manifest", str(d / "libri"), "--out", str(d / "m")]
    return setup


def _data_case(spoil: Callable[[Path], None], argv=features_argv) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        manifests(d)
        spoil(first_audio(d))
        return argv(d)
    return setup


def _manifest_text_case(edit: Callable[[list[str]], list[str]], argv=features_argv) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        manifests(d)
        tsv = d / "m" / "train.tsv"
        tsv.write_text("".join(line + "\n" for line in edit(tsv.read_text().splitlines())))
        return argv(d)
    return setup


def _binary_manifest(d: Path) -> list[str]:
    manifests(d)
    (d / "m" / "train.tsv").write_bytes(b"\x80\x81\xfe" * 30)
    return features_argv(d)


def _km_case(edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        pretrain_data(d)
        edit(d / "lab")
        return pretrain_argv(d)
    return setup


def _km_line(lineno: int, edit: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    def apply(lab: Path) -> None:
        edit_line(lab / "train.km", lineno, lambda line: " ".join(edit(line.split())))
    return apply


def _pretrain_cfg_case(*overrides: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        pretrain_data(d)
        return pretrain_argv(d, *overrides)
    return setup


def _yaml_case(text: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        pretrain_data(d)
        (d / "pretrain.yaml").write_text(text)
        return pretrain_argv(d)
    return setup


def _finetune_case(*overrides: str, spoil: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        argv = finetune_argv(d, *overrides)
        if spoil is not None:
            spoil(d)
        return argv
    return setup


def _stereo(p: Path) -> None:
    write_audio(p, np.zeros((RATE, 2), np.float32), fmt="FLAC")


def _nan_wav(value: float) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        n = sf.info(str(p)).frames
        x = tone(n)
        x[n // 2] = value
        write_audio(p, x, subtype="FLOAT", fmt="WAV")
    return apply


def _skip_bad(d: Path) -> list[str]:
    corpus(d)
    _stereo(first_audio(d))
    return ["manifest", str(d / "libri"), "--out", str(d / "m"), "--skip-bad"]


def _missing_audio(p: Path) -> None:
    p.unlink()


def _truncated_flac(p: Path) -> None:
    truncate(p, 0.5)


def _resume_case(*overrides: str) -> Callable[[Path], list[str]]:
    """checkpoint_last of a first run, then the same out_dir with other settings."""
    def setup(d: Path) -> list[str]:
        from mt4ssl.cli import main

        pretrain_data(d)
        assert main(pretrain_argv(d, "run.max_updates=1")) == 0
        return pretrain_argv(d, *overrides)
    return setup


def _damaged_resume(d: Path) -> list[str]:
    from mt4ssl.cli import main

    pretrain_data(d)
    assert main(pretrain_argv(d, "run.max_updates=1")) == 0
    for p in (d / "run" / "checkpoints").glob("checkpoint_*.pt"):
        truncate(p, 0.5)  # checkpoint_last is a hard link to checkpoint_1: both damaged
    return pretrain_argv(d, "run.max_updates=2")


def _mid_run_nan_audio(d: Path) -> list[str]:
    """The labels and manifest are right; one file's samples turn NaN after `mt4ssl manifest`."""
    pretrain_data(d)
    _nan_wav(float("nan"))(first_audio(d))
    return pretrain_argv(d, "run.max_updates=3")


def _extract(ckpt: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        corpus(d)
        return ["extract", str(ckpt(d)), str(first_audio(d)), "--out", str(d / "x")]
    return setup


def _nan_features(d: Path) -> list[str]:
    """An MFCC shard with a NaN (as dumped from bad audio before it was refused)."""
    from mt4ssl.cli import main

    manifests(d)
    assert main(features_argv(d)) == 0
    feats = np.load(d / "f" / "train_0_1.npy", mmap_mode="r+")
    feats[5, 3] = np.nan
    feats.flush()
    del feats
    return ["kmeans", str(d / "f"), "train", str(d / "km.npz"), "-k", "4", "--fraction", "1"]


def _resume_other_labels(d: Path) -> list[str]:
    """checkpoint_last of a run on 4-cluster labels, then labels of 8 clusters."""
    from mt4ssl.cli import main

    pretrain_data(d)
    assert main(pretrain_argv(d, "run.max_updates=1")) == 0
    labels(d, classes=8)
    return pretrain_argv(d)


def _resume_other_dictionary(d: Path) -> list[str]:
    """checkpoint_last of a fine-tuning, then a dict.ltr.txt with the letters in another order."""
    from mt4ssl.cli import main

    argv = finetune_argv(d, "run.max_updates=1")
    assert main(argv) == 0
    letters = sorted(set((d / "m" / "train.ltr").read_text().split()))
    (d / "m" / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in letters))
    return [a for a in argv if a != "run.max_updates=1"]


def _extract_nan_audio(d: Path) -> list[str]:
    corpus(d)
    _nan_wav(float("nan"))(first_audio(d))
    return ["extract", str(tiny_ckpt(d)), str(first_audio(d)), "--out", str(d / "x")]


def _truncated_ckpt(d: Path) -> Path:
    path = tiny_ckpt(d)
    truncate(path, 0.5)
    return path


class _Payload:
    """Unpickling this runs code (it writes `marker`)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def _pickled_ckpt(d: Path) -> Path:
    import torch

    state = torch.load(tiny_ckpt(d), weights_only=True)
    torch.save({**state, "extra": _Payload(d / "payload_ran")}, d / "evil.pt")
    return d / "evil.pt"


def _fairseq_ckpt(name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        import torch

        torch.save({"cfg": {"model": {"_name": name}, "task": {}}, "model": {"w": torch.zeros(2)}}, d / "fs.pt")
        return d / "fs.pt"
    return make


def _convert_unsupported(d: Path) -> list[str]:
    return ["convert", "fairseq", str(_fairseq_ckpt("wav2vec_ctc")(d)), str(d / "o.pt")]


def _wrong_shapes(state: dict) -> None:
    state["model_config"]["embed_dim"] = 64  # the weights are of a 32-d model
    state["model_config"]["ffn_dim"] = 128


def _nan_weight(state: dict) -> None:
    state["model"]["post_extract_proj.weight"][0, 0] = float("nan")


def _kmeans_case(*extra: str, spoil_model: bool = False, dims: int | None = None) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        from mt4ssl.cli import main

        manifests(d)
        assert main(features_argv(d)) == 0
        if spoil_model:
            (d / "km.npz").write_bytes(b"not a k-means model")
            return ["labels", str(d / "f"), "train", str(d / "km.npz"), "--manifest-dir", str(d / "m"),
                    "--out", str(d / "lab")]
        if dims is not None:
            from mt4ssl.kmeans.learn import KMeansModel

            KMeansModel(np.zeros((4, dims), np.float32), {"k": 4}).save(d / "km.npz")
            return ["labels", str(d / "f"), "train", str(d / "km.npz"), "--manifest-dir", str(d / "m"),
                    "--out", str(d / "lab")]
        return ["kmeans", str(d / "f"), "train", str(d / "km.npz"), *extra]
    return setup


def _ltr(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        edit(d / "m" / "train.ltr")
    return apply


def _cuda_case(d: Path) -> list[str]:
    import torch

    pretrain_data(d)
    if torch.cuda.is_available():  # the case needs a machine without CUDA: ask for a device it lacks
        return pretrain_argv(d, f"run.device=cuda:{torch.cuda.device_count()}")
    return pretrain_argv(d, "run.device=cuda")


CASES: list[Case] = [
    # ---------------------------------------------------------------- audio, at `mt4ssl manifest`
    Case("audio_corrupt", "audio file of random bytes", _manifest_case(lambda p: p.write_bytes(os.urandom(3000))),
         "100-10-0000.flac: unreadable audio"),
    Case("audio_empty_file", "audio file of 0 bytes", _manifest_case(lambda p: p.write_bytes(b"")),
         "100-10-0000.flac: unreadable audio"),
    Case("audio_zero_length", "valid WAV header, 0 samples",
         _manifest_case(lambda p: write_audio(p, np.zeros(0, np.float32), fmt="WAV")), "100-10-0000.flac: empty audio"),
    Case("audio_8khz", "8 kHz audio", _manifest_case(lambda p: write_audio(p, tone(8000), 8000, fmt="FLAC")),
         "100-10-0000.flac: sample rate 8000 Hz"),
    Case("audio_44khz", "44.1 kHz audio", _manifest_case(lambda p: write_audio(p, tone(44100), 44100, fmt="FLAC")),
         "100-10-0000.flac: sample rate 44100 Hz"),
    Case("audio_stereo", "two channels", _manifest_case(_stereo), "100-10-0000.flac: 2 channels"),
    Case("audio_8bit", "8-bit unsigned PCM WAV",
         _manifest_case(lambda p: write_audio(p, tone(32000), subtype="PCM_U8", fmt="WAV")),
         "100-10-0000.flac: 8-bit samples (PCM_U8)"),
    Case("audio_truncated_wav", "WAV whose data chunk the file cuts short",
         _manifest_case(lambda p: (write_audio(p, tone(32000), fmt="WAV"), truncate(p))),
         "100-10-0000.flac: truncated: the header declares 64000 bytes"),
    Case("audio_untranscribed", "audio file without a transcript line",
         _manifest_case(lambda p: (p.parent / "100-10.trans.txt").write_text(
             "".join(l + "\n" for l in (p.parent / "100-10.trans.txt").read_text().splitlines()[1:]))),
         "100-10-0000.flac: no transcript line"),
    Case("audio_skip_bad", "two channels, with --skip-bad", _skip_bad, "100-10-0000.flac: 2 channels"),
    # ---------------------------------------------------------------- audio data, at `mt4ssl features`
    Case("audio_truncated_flac", "FLAC cut in half after the manifest (header intact)", _data_case(_truncated_flac),
         "train.tsv:2 (100/10/100-10-0000.flac)"),
    Case("audio_nan", "float WAV with a NaN sample", _data_case(_nan_wav(float("nan"))), "100-10-0000.flac: sample 16000 is nan"),
    Case("audio_inf", "float WAV with an infinite sample", _data_case(_nan_wav(float("inf"))), "100-10-0000.flac: sample 16000 is inf"),
    Case("audio_float_int_scale", "float WAV at int16 scale",
         _data_case(lambda p: write_audio(p, tone(sf.info(str(p)).frames) * 32768, subtype="FLOAT", fmt="WAV")),
         "100-10-0000.flac: float samples reach"),
    Case("audio_missing", "manifest lists a file that is gone", _data_case(_missing_audio),
         "train.tsv:2 (100/10/100-10-0000.flac)"),
    Case("audio_replaced_length", "file replaced by a shorter one after the manifest",
         _data_case(lambda p: write_audio(p, tone(16000), fmt="FLAC")), "has 16000 samples, the manifest says 32001"),
    Case("extract_nan_audio", "`mt4ssl extract` of one float file with a NaN sample", _extract_nan_audio,
         "100-10-0000.flac: sample 16000 is nan"),
    # ---------------------------------------------------------------- manifests (`mt4ssl features`)
    Case("tsv_wrong_count", "sample count off by one", _manifest_text_case(
        lambda ls: ls[:1] + [ls[1].split("\t")[0] + f"\t{int(ls[1].split(chr(9))[1]) + 1}"] + ls[2:]),
         "train.tsv:2 (100/10/100-10-0000.flac)"),
    Case("tsv_blank_line", "blank line among the entries", _manifest_text_case(lambda ls: ls[:2] + [""] + ls[2:]),
         "train.tsv:3: blank line"),
    Case("tsv_duplicate", "an entry listed twice", _manifest_text_case(lambda ls: ls + [ls[1]]),
         "train.tsv:5: 100/10/100-10-0000.flac is listed twice (first on line 2)"),
    Case("tsv_outside_root", "path through '..' out of the root", _manifest_text_case(
        lambda ls: ls[:1] + ["../outside/x.flac\t32000"] + ls[2:]), "train.tsv:2: path '../outside/x.flac' leads outside"),
    Case("tsv_absolute_path", "absolute path", _manifest_text_case(lambda ls: ls[:1] + ["/etc/x.flac\t32000"] + ls[2:]),
         "train.tsv:2: path '/etc/x.flac' leads outside"),
    Case("tsv_bad_count", "sample count that is not an integer",
         _manifest_text_case(lambda ls: ls[:1] + [ls[1].split("\t")[0] + "\t3.5e4"] + ls[2:]),
         "train.tsv:2: sample count '3.5e4' is not an integer"),
    Case("tsv_negative_count", "negative sample count",
         _manifest_text_case(lambda ls: ls[:1] + [ls[1].split("\t")[0] + "\t-5"] + ls[2:]),
         "train.tsv:2: sample count -5 must be positive"),
    Case("tsv_no_tab", "entry without a tab", _manifest_text_case(lambda ls: ls[:1] + [ls[1].replace("\t", " ")] + ls[2:]),
         "train.tsv:2: expected 'relative/path<TAB>n_samples'"),
    Case("tsv_no_root", "first line empty (no root folder)", _manifest_text_case(lambda ls: [""] + ls[1:]),
         "train.tsv:1: expected the root folder"),
    Case("tsv_no_entries", "root line only", _manifest_text_case(lambda ls: ls[:1]),
         "train.tsv: no entries"),
    Case("tsv_not_text", "manifest of binary bytes", _binary_manifest, "train.tsv: not UTF-8 text"),
    Case("tsv_missing", "manifest file missing", lambda d: ["features", "mfcc", str(d / "m"), "train", str(d / "f")],
         "train.tsv: manifest not found"),
    Case("tsv_too_short", "utterance shorter than one MFCC frame", _manifest_text_case(
        lambda ls: ls + ["100/10/short.flac\t200"]), "train.tsv:5 (100/10/short.flac): 200 samples are too short"),
    # ---------------------------------------------------------------- labels (`mt4ssl pretrain` reads them at start)
    Case("km_line_count", "label file with a line missing", _km_case(lambda lab: edit_line(lab / "train.km", 3, lambda _: None)),
         "train.km: 2 lines, but"),
    Case("km_frame_count", "one label too many on a line", _km_case(_km_line(2, lambda xs: xs + ["0"])),
         "train.km:2 (100/10/100-10-0001.flac): 113 labels"),
    Case("km_100hz", "labels at 100 Hz (MFCC frame rate)", _km_case(_km_line(1, lambda xs: xs + xs)),
         "train.km:1 (100/10/100-10-0000.flac): 198 labels"),
    Case("km_not_integer", "label '2.0'", _km_case(_km_line(2, lambda xs: ["2.0"] + xs[1:])),
         "train.km:2 (100/10/100-10-0001.flac): label '2.0' is not an integer"),
    Case("km_out_of_dict", "label 4 with a 4-symbol dictionary", _km_case(_km_line(3, lambda xs: xs[:-1] + ["4"])),
         "train.km:3 (100/10/100-10-0002.flac): label 4 is outside the dictionary"),
    Case("km_negative", "label -1", _km_case(_km_line(1, lambda xs: ["-1"] + xs[1:])),
         "train.km:1 (100/10/100-10-0000.flac): label -1 is outside the dictionary"),
    Case("km_dict_malformed", "dictionary line without a count",
         _km_case(lambda lab: edit_line(lab / "dict.km.txt", 2, lambda _: "1")), "dict.km.txt:2: expected 'SYMBOL COUNT'"),
    Case("km_missing", "label file missing", _km_case(lambda lab: (lab / "train.km").unlink()),
         "train.km: label file not found"),
    Case("km_blank_line", "blank line in the label file", _km_case(lambda lab: edit_line(lab / "train.km", 2, lambda _: "")),
         "train.km:2 (100/10/100-10-0001.flac): 0 labels"),
    Case("km_binary", "label file of binary bytes", _km_case(lambda lab: (lab / "train.km").write_bytes(b"\xff\xfe\x00\x01" * 50)),
         "train.km: not UTF-8 text"),
    # ---------------------------------------------------------------- configs (`mt4ssl pretrain` / `finetune`)
    Case("cfg_unknown_key", "misspelled key run.max_update", _pretrain_cfg_case("run.max_update=3"),
         "unknown key(s) ['max_update']"),
    Case("cfg_unknown_yaml_key", "unknown key in the YAML file", _yaml_case("optim: {learning_rate: 0.1}\n"),
         "pretrain.yaml.optim: unknown key(s) ['learning_rate']"),
    Case("cfg_wrong_type", "optim.lr=fast", _pretrain_cfg_case("optim.lr=fast"), "optim.lr: expected float, got 'fast'"),
    Case("cfg_wrong_type_int", "run.max_updates=1.5", _pretrain_cfg_case("run.max_updates=1.5"),
         "run.max_updates: expected int, got 1.5"),
    Case("cfg_mask_prob", "model.mask_prob=1.5 (a probability above 1)", _pretrain_cfg_case("model.mask_prob=1.5"),
         "mask_prob: 1.5 must be in [0, 1]"),
    Case("cfg_dropout", "model.dropout=-0.1", _pretrain_cfg_case("model.dropout=-0.1"), "dropout: -0.1 must be in [0, 1]"),
    Case("cfg_negative_lr", "optim.lr=-1e-4", _pretrain_cfg_case("optim.lr=-1e-4"), "optim.lr: -0.0001 must be positive"),
    Case("cfg_nan_lr", "optim.lr=.nan", _pretrain_cfg_case("optim.lr=.nan"), "optim.lr: expected a finite number"),
    Case("cfg_betas", "optim.betas=[0.9,1.5]", _pretrain_cfg_case("optim.betas=[0.9,1.5]"), "optim.betas: [0.9, 1.5]"),
    Case("cfg_eps", "optim.eps=0", _pretrain_cfg_case("optim.eps=0"), "optim.eps: 0.0 must be positive"),
    Case("cfg_keep_last", "run.keep_last=0", _pretrain_cfg_case("run.keep_last=0"), "run.keep_last: 0 must be at least 1"),
    Case("cfg_seed", "run.seed=-1", _pretrain_cfg_case("run.seed=-1"), "run.seed: -1 must be at least 0"),
    Case("cfg_workers", "data.num_workers=-2", _pretrain_cfg_case("data.num_workers=-2"),
         "data.num_workers: -2 must be at least 0"),
    Case("cfg_heads", "model.num_heads=0", _pretrain_cfg_case("model.num_heads=0"), "num_heads: 0 must be at least 1"),
    Case("cfg_ema", "model.teacher.ema_decay=1.5", _pretrain_cfg_case("model.teacher.ema_decay=1.5"),
         "teacher.ema_decay 1.5 must be in [0, 1]"),
    Case("cfg_clip", "optim.clip_norm=-1", _pretrain_cfg_case("optim.clip_norm=-1"), "optim.clip_norm: -1.0 must be at least 0"),
    Case("cfg_warmup", "optim.warmup_ratio=2 (polynomial)", _pretrain_cfg_case("optim.schedule=polynomial",
                                                                              "optim.warmup_ratio=2"),
         "optim.warmup_ratio: 2.0 must be in [0, 1]"),
    Case("cfg_device", "run.device=cuda on a machine without that GPU", _cuda_case, "run.device"),
    Case("cfg_precision", "run.precision=fp8", _pretrain_cfg_case("run.precision=fp8"),
         "run.precision: 'fp8' is not one of"),
    Case("cfg_ft_mask", "finetune model.mask_prob=1.2", _finetune_case("model.mask_prob=1.2"),
         "model.mask_prob: 1.2 must be in [0, 1)"),
    Case("cfg_yaml_syntax", "YAML that does not parse", _yaml_case("run: {device: cpu\n"), "pretrain.yaml: not a valid YAML"),
    # ---------------------------------------------------------------- checkpoints
    Case("ckpt_truncated", "`mt4ssl extract` of a truncated checkpoint", _extract(_truncated_ckpt), "tiny.pt: not an mt4ssl checkpoint"),
    Case("ckpt_fairseq", "`mt4ssl extract` of a fairseq checkpoint", _extract(_fairseq_ckpt("hubert")),
         "fs.pt: not an mt4ssl checkpoint"),
    Case("ckpt_wrong_shapes", "weights of another model size than its model_config",
         _extract(lambda d: tiny_ckpt(d, spoil=_wrong_shapes)), "tiny.pt: an mt4ssl checkpoint whose model does not load (its weights do not fit"),
    Case("ckpt_nan_weights", "`mt4ssl extract` of a checkpoint with a NaN weight",
         _extract(lambda d: tiny_ckpt(d, spoil=_nan_weight)), "tiny.pt: weight post_extract_proj.weight holds NaN"),
    Case("ckpt_pickle", "`mt4ssl extract` of a checkpoint that unpickles code (a __reduce__ payload)",
         _extract(lambda d: _pickled_ckpt(d)), "evil.pt: not an mt4ssl checkpoint (it does not load with weights_only"),
    Case("ckpt_convert_unsupported", "fairseq checkpoint of model type wav2vec_ctc", _convert_unsupported,
         "model 'wav2vec_ctc': only"),
    Case("ckpt_resume_other_size", "resume with another model size (model.embed_dim=64)",
         _resume_case("model.embed_dim=64", "model.ffn_dim=128"), "checkpoint_last.pt: made with another model config (embed_dim: 32 -> 64; ffn_dim: 64 -> 128"),
    Case("ckpt_resume_other_targets", "resume with another target set (model.targets=[kmeans])",
         _resume_case("model.targets=[kmeans]"), "checkpoint_last.pt: made with another model config (targets: ('kmeans', 'teacher') -> ('kmeans',)"),
    Case("ckpt_resume_other_labels", "resume with labels of another k (8 clusters instead of 4)", _resume_other_labels,
         "checkpoint_last.pt: made with another model config (kmeans.num_classes: (4,) -> (8,)"),
    Case("ckpt_resume_other_dict", "resume a fine-tuning with another letter dictionary", _resume_other_dictionary,
         "checkpoint_last.pt: made with another letter dictionary"),
    Case("ckpt_resume_all_damaged", "resume when every checkpoint is truncated", _damaged_resume,
         "checkpoint_last.pt: not an mt4ssl checkpoint"),
    Case("ckpt_init_nan", "finetune run.init_from a checkpoint with a NaN weight",
         _finetune_case(spoil=lambda d: tiny_ckpt(d, spoil=_nan_weight)), "tiny.pt: run.init_from: weight"),
    Case("ckpt_init_missing", "finetune run.init_from a file that does not exist",
         _finetune_case("run.init_from=/nonexistent/x.pt"), "/nonexistent/x.pt: checkpoint not found"),
    # ---------------------------------------------------------------- k-means
    Case("kmeans_k1", "mt4ssl kmeans -k 1", _kmeans_case("-k", "1"), "-k 1: need at least 2 clusters"),
    Case("kmeans_fraction", "mt4ssl kmeans --fraction 0", _kmeans_case("--fraction", "0"), "--fraction 0.0 must be in (0, 1]"),
    Case("kmeans_too_many", "more clusters than frames", _kmeans_case("-k", "100000", "--fraction", "1"),
         "fewer than k=100000 clusters"),
    Case("kmeans_junk_model", "mt4ssl labels with a file that is not a k-means model", _kmeans_case(spoil_model=True),
         "km.npz: not a k-means model"),
    Case("kmeans_nan_features", "feature shard holding a NaN (dumped before NaN audio was refused)", _nan_features,
         "the sampled features of train hold NaN"),
    Case("kmeans_wrong_dims", "k-means model of 20-d features for 39-d MFCCs", _kmeans_case(dims=20),
         "km.npz: centroids are 20-d"),
    # ---------------------------------------------------------------- fine-tuning transcripts
    Case("ltr_line_count", ".ltr with a line missing", _finetune_case(spoil=_ltr(lambda p: edit_line(p, 2, lambda _: None))),
         "train.ltr: 2 lines, but"),
    Case("ltr_empty_line", ".ltr with an empty transcript", _finetune_case(spoil=_ltr(lambda p: edit_line(p, 2, lambda _: ""))),
         "train.ltr:2: empty transcript"),
    Case("ltr_not_utf8", ".ltr in Latin-1 with a non-ASCII letter",
         _finetune_case(spoil=_ltr(lambda p: p.write_bytes(p.read_bytes().replace(b"H", "\u00c9".encode("latin-1"), 1)))),
         "train.ltr: not UTF-8 text"),
    Case("ltr_unknown_symbol", "letter missing from the dictionary",
         _finetune_case(spoil=lambda d: (d / "m" / "dict.ltr.txt").write_text(
             "".join(f"{c} 1\n" for c in "|HELOWRDSPC"))), "train.ltr:2: token 'M' is not in the dictionary"),
    # ---------------------------------------------------------------- bad data found while training
    Case("train_lr_diverges", "optim.lr=1e30: the weights blow up after the first update",
         _pretrain_cfg_case("optim.lr=1e30", "run.max_updates=60"), "stopped: 50 updates in a row were skipped"),
    Case("train_nan_audio", "pretraining reaches a float file with a NaN sample", _mid_run_nan_audio,
         "100-10-0000.flac: sample 16000 is nan"),
    Case("train_nan_audio_worker", "the same, read by a DataLoader worker process (data.num_workers=1)",
         lambda d: [*_mid_run_nan_audio(d), "data.num_workers=1"], "100-10-0000.flac: sample 16000 is nan"),
]


# ---------------------------------------------------------------------------- running


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_case(case: Case, folder: Path) -> Outcome:
    """Build the case's inputs in `folder`, run `mt4ssl ARGV` in this process, classify."""
    from mt4ssl.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # progress bars
        argv = case.setup(folder)
    err, out, records = io.StringIO(), io.StringIO(), _Records()
    root = logging.getLogger()
    root.addHandler(records)
    code, crash = None, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    except Exception as e:
        crash = f"{type(e).__name__}: {e}".splitlines()[0] + " | " + traceback.format_exc().strip().splitlines()[-1]
    finally:
        root.removeHandler(records)
    text = err.getvalue().replace("\r", "\n")  # a progress bar may share the error's line
    lines = [line[line.index(f"mt4ssl {argv[0]}:"):] for line in text.splitlines() if f"mt4ssl {argv[0]}:" in line]
    expect = case.expect
    if crash is not None:
        kind, message = "crash", crash
    elif code == 2 and lines:
        message = lines[-1]
        kind = "error" if expect in message else "unclear"
    elif code == 4 and lines:
        message = lines[-1]
        kind = "stopped" if expect in message else "unclear"
    elif code == 0 and "skipped" in out.getvalue() and any(expect in m for m in records.messages):
        kind = "skipped"
        message = next(m for m in records.messages if expect in m) + " | " + out.getvalue().strip().splitlines()[-1]
    elif code == 0:
        kind, message = "silent", (records.messages[-1] if records.messages else "")
    else:
        kind, message = "unclear", (lines[-1] if lines else text.strip().splitlines()[-1:] or [f"exit {code}"])
        message = message if isinstance(message, str) else message[0]
    return Outcome(case, list(argv), kind, code, message)


def run_cases(cases: list[Case], workdir: Path | None = None, progress: bool = True) -> list[Outcome]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # main's is then a no-op
    logging.getLogger().setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    outcomes = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, case in enumerate(cases):
            outcome = run_case(case, Path(tmp) / case.name)
            outcome.message = outcome.message.replace(str(Path(tmp) / case.name), "$D")
            outcome.argv = [a.replace(str(Path(tmp) / case.name), "$D") for a in outcome.argv]
            outcomes.append(outcome)
            if progress:
                print(f"[{i + 1}/{len(cases)}] {outcome.kind:8s} {case.name}: {outcome.message[:150]}", file=sys.stderr,
                      flush=True)
    return outcomes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _command(argv: list[str]) -> str:
    text = "mt4ssl " + " ".join(a for a in argv if a not in TINY)
    return text if len(text) < 200 else text[:197] + "..."


def table(outcomes: list[Outcome]) -> str:
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("error", "skipped", "stopped", "silent", "crash", "unclear")}
    lines = [f"{len(outcomes)} bad inputs, each run through the `mt4ssl` command named (in the process, as "
             f"`mt4ssl.cli.main`); `$D` is the case's own temporary folder; the overrides of the tiny model "
             f"(`{' '.join(TINY)}`) are left out of the pretraining commands shown; `$D/pretrain.yaml` is "
             f"`{PRETRAIN_YAML.strip().replace(chr(10), ' ')}` unless the case says otherwise.",
             "",
             "Outcomes: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
             f". **Silent: {counts['silent']}**, stack traces: {counts['crash']}, messages not naming the "
             f"file/line/key: {counts['unclear']}.",
             "",
             "| # | bad input | command | outcome | message |",
             "|---|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        lines.append(f"| {i} | {_cell(o.case.what)} | `{_cell(_command(o.argv))}` | {o.kind} | {_cell(o.message)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the cases whose name contains this")
    p.add_argument("--no-write", action="store_true", help="print the table, leave results/ alone")
    p.add_argument("--section", default="Bad inputs", help="section of results/reliability.md to (re)write")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "reliability.md")
    p.add_argument("--against", metavar="REV",
                   help="run the cases on the mt4ssl of git commit REV (extracted to a temporary folder) and "
                        "write them as the section 'Bad inputs at REV'")
    args = p.parse_args(argv)
    if args.against:
        body, ok = against(args.against, args.only)
        section, command = f"Bad inputs at {args.against}", f"tools/bad_inputs.py --against {args.against}"
    else:
        outcomes = run_cases([c for c in CASES if args.only in c.name])
        body, ok = table(outcomes), all(o.ok for o in outcomes)
        section, command = "Bad inputs", "tools/bad_inputs.py"
    print(body)
    if not args.no_write:
        from benchmarks.report import write_section

        write_section(section, f".venv/bin/python {command}", body, path=args.out, header=HEADER)
        print(f"wrote the {section!r} section of {args.out}", file=sys.stderr)
    return 0 if ok else 1


def against(rev: str, only: str) -> tuple[str, bool]:
    """This script's cases with the `mt4ssl` package of commit `rev` (git archive into a
    temporary folder, first on PYTHONPATH of a child process): (its table, all ok)."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "mt4ssl"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1"}
        child = subprocess.run([sys.executable, __file__, "--no-write", "--only", only], env=env, cwd=tmp,
                               capture_output=True, text=True)
    head = child.stdout.find(f"{len([c for c in CASES if only in c.name])} bad inputs")
    if head < 0:
        raise RuntimeError(f"the run against {rev} printed no table:\n{child.stderr[-3000:]}")
    note = (f"The cases of the section above run on the `mt4ssl` package of commit {rev} (this script and "
            f"its inputs unchanged).\n\n")
    return note + child.stdout[head:], child.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
