"""The SUPERB tasks `mt4ssl superb` runs: s3prl's task configs, the data checks, the metrics.

Hyper-parameters are s3prl 0.4.18's SUPERB configs, copied from the s3prl repository
(github s3prl/s3prl at tag v0.4.18; the wheel ships no task YAMLs):
  PR  s3prl/downstream/ctc/libriphone.yaml          (-d ctc)
  KS  s3prl/downstream/speech_commands/config.yaml  (-d speech_commands)
  SID s3prl/downstream/voxceleb1/config.yaml        (-d voxceleb1)
  IC  s3prl/downstream/fluent_commands/config.yaml  (-d fluent_commands)
  ASR s3prl/downstream/asr/config.yaml              (-d asr; without the dev-other and
      test-other splits, which are not prepared; KenLM decoding off, as there)
Changed: the data paths (absolute), `num_workers` (0 unless `--num-workers`; s3prl's 24 and
8 are for GPU servers) and, when given, total_steps (`--steps`, with eval/save/log steps
scaled), `--eval-step`, `--lr` and `--batch-size`.

Data layouts (`--data DIR`):
  PR  DIR/{train-clean-100,dev-clean,test-clean}/SPK/CH/SPK-CH-UTT.flac + SPK-CH.trans.txt
      and DIR/lexicon.txt (`WORD<TAB>PHONES`, ARPAbet with stress): LibriSpeech with a
      lexicon, or `mt4ssl synth-corpus`.
  KS  DIR/train/<word>/<spk>_nohash_<n>.wav + DIR/train/_background_noise_/*.wav (Speech
      Commands v1, e.g. speech_commands_v0.01) and DIR/test/<12 classes>/*.wav (the v0.01
      test set); `mt4ssl synth-superb --task ks` writes it.
  SID DIR/{dev,test}/wav/idNNNNN/<video>/<utt>.wav and DIR/iden_split.txt, lines
      `1|2|3 idNNNNN/<video>/<utt>.wav` (train|dev|test): VoxCeleb1 (vox1_dev_wav and
      vox1_test_wav unpacked in DIR, with its iden_split.txt), or `mt4ssl synth-superb --task
      sid`. Labels are int(NNNNN) - 10001 into s3prl's fixed 1251 classes (id10001..id11251).
  IC  DIR/data/{train,valid,test}_data.csv (`,path,speakerId,transcription,action,object,
      location`) and the wavs at their `path`s, relative to DIR: Fluent Speech Commands
      (fluent_speech_commands_dataset), or `mt4ssl synth-superb --task ic`.
  ASR the PR tree without the lexicon; transcripts only of A-Z, ' and spaces, 16 kHz flac.
      EXPDIR/bucket_file/<split>.csv and EXPDIR/char.dict are written from it
      (`mt4ssl.superb.asr`).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from mt4ssl.data.audio import audio_info
from mt4ssl.errors import InputError
from mt4ssl.superb import asr, libriphone

PR_SPLITS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}
KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KS_CLASSES = KS_WORDS + ("_unknown_", "_silence_")
BACKGROUND = "_background_noise_"
SID_SPLIT_FILE = "iden_split.txt"
SID_CLASSES = 1251  # s3prl's fixed output layer: labels int(id[2:]) - 10001
SID_SPLITS = {1: "train", 2: "dev", 3: "test"}
IC_SPLITS = ("train", "valid", "test")  # DIR/data/{split}_data.csv
IC_COLUMNS = ("path", "speakerId", "transcription", "action", "object", "location")
IC_SLOTS = ("action", "object", "location")

PR_CONFIG = {  # s3prl/downstream/ctc/libriphone.yaml
    "runner": {"total_steps": 100000, "gradient_clipping": 1, "gradient_accumulate_steps": 2,
               "log_step": 100, "eval_step": 1000, "save_step": 100, "max_keep": 1,
               "eval_dataloaders": ["dev"]},
    "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-2},
    "downstream_expert": {
        "corpus": {"name": "libriphone", "path": None, "lexicon": None,
                   "train": [PR_SPLITS["train"]], "dev": [PR_SPLITS["dev"]], "test": [PR_SPLITS["test"]],
                   "bucketing": True, "batch_size": 16, "num_workers": 24},
        "text": {"mode": "word", "vocab_file": None},
        "model": {"project_dim": 256, "zero_infinity": True, "select": "FrameLevel",
                  "Wav2Letter": {"total_rate": 320},
                  "RNNs": {"total_rate": 320, "module": "LSTM", "bidirection": True,
                           "dim": [1024, 1024, 1024], "dropout": [0.2, 0.2, 0.2],
                           "layer_norm": [True, True, True], "proj": [True, True, True],
                           "sample_rate": [1, 1, 1], "sample_style": "concat"}},
        "save_best_on": ["dev"], "metric_higher_better": False, "metric": ["per"]},
}

KS_CONFIG = {  # s3prl/downstream/speech_commands/config.yaml
    "runner": {"total_steps": 200000, "gradient_clipping": 1, "gradient_accumulate_steps": 1,
               "log_step": 100, "eval_step": 5000, "save_step": 1000, "max_keep": 1,
               "eval_dataloaders": ["dev", "test"]},
    "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-4},
    "downstream_expert": {
        "datarc": {"speech_commands_root": None, "speech_commands_test_root": None,
                   "num_workers": 8, "batch_size": 32},
        "modelrc": {"projector_dim": 256, "select": "UtteranceLevel",
                    "UtteranceLevel": {"pooling": "MeanPooling"}}},
}

SID_CONFIG = {  # s3prl/downstream/voxceleb1/config.yaml
    "runner": {"total_steps": 200000, "gradient_clipping": 1, "gradient_accumulate_steps": 4,
               "log_step": 500, "eval_step": 5000, "save_step": 1000, "max_keep": 1,
               "eval_dataloaders": ["dev", "test"]},
    "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-4},
    "downstream_expert": {
        "datarc": {"file_path": None, "meta_data": None, "num_workers": 12, "train_batch_size": 8,
                   "eval_batch_size": 1, "max_timestep": 128000},
        "modelrc": {"projector_dim": 256, "select": "UtteranceLevel",
                    "UtteranceLevel": {"pooling": "MeanPooling"}}},
}

IC_CONFIG = {  # s3prl/downstream/fluent_commands/config.yaml
    "runner": {"total_steps": 200000, "gradient_clipping": 1, "gradient_accumulate_steps": 1,
               "log_step": 100, "eval_step": 5000, "save_step": 250, "max_keep": 1,
               "eval_dataloaders": ["dev", "test"]},
    "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-4},
    "downstream_expert": {
        "datarc": {"file_path": None, "num_workers": 12, "train_batch_size": 32, "eval_batch_size": 32},
        "modelrc": {"projector_dim": 256, "select": "UtteranceLevel",
                    "UtteranceLevel": {"pooling": "MeanPooling"}}},
}

ASR_CONFIG = {  # s3prl/downstream/asr/config.yaml
    "runner": {"total_steps": 200000, "gradient_clipping": 1, "gradient_accumulate_steps": 1,
               "log_step": 100, "eval_step": 2000, "save_step": 500, "max_keep": 1,
               "eval_dataloaders": ["dev-clean"]},
    "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-4},
    "specaug": {"adaptive": False, "adaptive_number_ratio": 0.04, "adaptive_size_ratio": 0.04,
                "max_n_time_masks": 20, "apply_time_warp": True, "apply_time_mask": True,
                "apply_freq_mask": True, "time_warp_window": 5, "time_mask_width_range": [0, 40],
                "freq_mask_width_range": [0, 50], "num_freq_mask": 4, "num_time_mask": 2},
    "downstream_expert": {
        "datarc": {"train": [asr.SPLITS[0]], "dev-clean": [asr.SPLITS[1]], "test-clean": [asr.SPLITS[2]],
                   "num_workers": 12, "train_batch_size": 32, "batch_size": 32, "eval_batch_size": 1,
                   "libri_root": None, "bucket_file": None, "dict_path": None, "zero_infinity": True,
                   "decoder_args": {"decoder_type": "None", "nbest": 1, "criterion": "ctc", "beam": 5,
                                    "beam_threshold": 25, "kenlm_model": None, "lexicon": None,
                                    "lm_weight": 2, "word_score": -1, "unk_weight": "-math.inf",
                                    "sil_weight": 0}},
        "modelrc": {"project_dim": 1024, "select": "RNNs", "Wav2Letter": {"total_rate": 320},
                    "RNNs": {"total_rate": -1, "module": "LSTM", "bidirection": True,
                             "dim": [1024, 1024], "dropout": [0.2, 0.2], "layer_norm": [False, False],
                             "proj": [False, False], "sample_rate": [1, 1], "sample_style": "concat"}}},
}


@dataclass(frozen=True)
class Task:
    name: str  # pr | ks | sid | ic | asr
    downstream: str  # s3prl's -d
    config: dict
    metric: str  # s3prl's name of the metric printed / logged
    higher_better: bool
    dev_split: str = "dev"  # s3prl's names of the dev and test splits (`-t`; dev-best.ckpt)
    test_split: str = "test"


TASKS = {
    "pr": Task("pr", "ctc", PR_CONFIG, "per", False),
    "ks": Task("ks", "speech_commands", KS_CONFIG, "acc", True),
    "sid": Task("sid", "voxceleb1", SID_CONFIG, "acc", True),
    "ic": Task("ic", "fluent_commands", IC_CONFIG, "acc", True),
    "asr": Task("asr", "asr", ASR_CONFIG, "wer", False, "dev-clean", "test-clean"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def task_config(task: Task, data: Path, expdir: Path, steps: int | None, eval_step: int | None,
                lr: float | None, num_workers: int, batch_size: int | None = None) -> dict:
    """s3prl's config for `task` with paths (absolute), steps, lr, batch size and workers.

    `steps` sets total_steps; eval_step shrinks by the same factor, but to no fewer steps
    than steps / 20 (short runs: s3prl's ratio would evaluate dev 100 times for PR, 40 for
    KS) and no more than s3prl's; save_step and log_step follow eval_step (s3prl saves no
    states at the last step, so they coincide with the evaluations). `eval_step` sets
    eval_step (and save_step at most that)."""
    cfg = copy.deepcopy(task.config)
    runner = cfg["runner"]
    if steps is not None:
        scaled = round(runner["eval_step"] * steps / runner["total_steps"])
        every = min(runner["eval_step"], max(1, scaled, -(-steps // 20)))
        runner["total_steps"] = steps
        runner["eval_step"] = runner["save_step"] = runner["log_step"] = every
    if eval_step is not None:
        runner["eval_step"] = eval_step
        runner["save_step"] = min(runner["save_step"], eval_step)
    for key in ("eval_step", "save_step", "log_step"):
        runner[key] = min(runner[key], runner["total_steps"])
    if lr is not None:
        cfg["optimizer"]["lr"] = lr
    ds = cfg["downstream_expert"]
    if task.name == "pr":
        vocab = libriphone.write_vocab(expdir / "phoneme.txt")
        ds["corpus"].update(path=str(data), lexicon=[str(data / "lexicon.txt")], num_workers=num_workers)
        ds["corpus"]["batch_size"] = batch_size or ds["corpus"]["batch_size"]
        ds["text"]["vocab_file"] = str(vocab)
    elif task.name == "asr":
        buckets, dictionary = asr.prepare(data, expdir)
        ds["datarc"].update(libri_root=str(data), bucket_file=str(buckets), dict_path=str(dictionary),
                            num_workers=num_workers)
        ds["datarc"]["batch_size"] = batch_size or ds["datarc"]["batch_size"]
    elif task.name == "ks":
        ds["datarc"].update(speech_commands_root=str(data / "train"),
                            speech_commands_test_root=str(data / "test"), num_workers=num_workers)
        ds["datarc"]["batch_size"] = batch_size or ds["datarc"]["batch_size"]
    else:  # sid, ic
        ds["datarc"].update(file_path=str(data), num_workers=num_workers)
        if task.name == "sid":
            ds["datarc"]["meta_data"] = str(data / SID_SPLIT_FILE)
        ds["datarc"]["train_batch_size"] = batch_size or ds["datarc"]["train_batch_size"]
    return cfg


def batch_size(cfg: dict) -> int:
    ds = cfg["downstream_expert"]
    rc = ds["corpus"] if "corpus" in ds else ds["datarc"]
    return rc["batch_size"] if "batch_size" in rc else rc["train_batch_size"]  # SID, IC: train_


def check_batches(task: Task, counts: dict, batch: int) -> None:
    """KS's training loader drops the last partial batch (s3prl's `drop_last=True`): with
    fewer training items than one batch an epoch has no step and s3prl loops for ever."""
    if task.name == "ks" and counts["train"] + counts["noise"] < batch:
        raise InputError(f"KS: the training set has {counts['train']} files + {counts['noise']} "
                         f"background noises, fewer than one batch of {batch} (s3prl drops the "
                         f"last partial batch, so training would never take a step); add data "
                         f"or give a smaller --batch-size")
    if task.name == "asr" and counts[asr.SPLITS[0]] == 1 and batch > 1:
        raise InputError(f"ASR: {asr.SPLITS[0]}/ has 1 file; s3prl's ASR dataset drops a last "
                         f"bucket of one utterance, so training would never take a step; add "
                         f"data or give --batch-size 1")


# ---------------------------------------------------------------------------- data checks


def check_data(task: Task, data: Path) -> dict:
    """Check `data`'s layout for `task` before any training; return counts per split."""
    if not data.is_dir():
        raise InputError(f"--data {data}: not a folder")
    if task.name == "asr":
        return asr.check(data)
    if task.name in ("sid", "ic"):
        return _check_sid(data) if task.name == "sid" else _check_ic(data)
    return _check_pr(data) if task.name == "pr" else _check_ks(data)


def _check_pr(data: Path) -> dict:
    lexicon_file = data / "lexicon.txt"
    if not lexicon_file.is_file():
        raise InputError(f"--data {data}: no lexicon.txt (WORD<TAB>PHONES, ARPAbet with stress)")
    lexicon = libriphone.read_lexicon([lexicon_file])
    counts = {}
    for role, split in PR_SPLITS.items():
        folder = data / split
        if not folder.is_dir():
            raise InputError(f"--data {data}: missing split {split}/ (the {role} split; PR needs "
                             f"{', '.join(s + '/' for s in PR_SPLITS.values())})")
        flacs = sorted(folder.glob("*/*/*.flac"))
        if not flacs:
            raise InputError(f"{folder}: no SPK/CH/SPK-CH-UTT.flac files (LibriSpeech layout)")
        transcripts = libriphone.read_transcripts(folder)
        for f in flacs:
            if f.stem not in transcripts:
                raise InputError(f"{f}: no line for {f.stem} in {f.parent}/*.trans.txt")
            libriphone.to_phones(f.stem, transcripts[f.stem], lexicon)
        counts[split] = len(flacs)
    return counts


def dev_split(name: str) -> str:
    """s3prl's Speech Commands split of a file name (speech_commands/expert.py split_dataset):
    'dev', 'test' (dropped by s3prl) or 'train', from a hash of the speaker prefix."""
    speaker = re.sub(r"_nohash_.*$", "", name)
    max_uttr = 2 ** 27 - 1
    percent = (int(hashlib.sha1(speaker.encode()).hexdigest(), 16) % (max_uttr + 1)) * (100.0 / max_uttr)
    return "dev" if percent < 10 else "test" if percent < 20 else "train"


def _check_ks(data: Path) -> dict:
    train, test = data / "train", data / "test"
    for folder, what in ((train, "the Speech Commands v0.01 training root"),
                         (test, "the v0.01 test set root")):
        if not folder.is_dir():
            raise InputError(f"--data {data}: missing split {folder.name}/ ({what})")
    counts = {"train": 0, "dev": 0, "test": 0}
    for word in KS_WORDS:
        wavs = sorted((train / word).glob("*.wav"))
        if not wavs:
            raise InputError(f"{train}: no {word}/*.wav (each of the 10 command words needs files)")
    for folder in sorted(p for p in train.iterdir() if p.is_dir() and p.name != BACKGROUND):
        for wav in folder.glob("*.wav"):
            split = dev_split(wav.name)
            if split != "test":
                counts[split] += 1
    if counts["dev"] == 0 or counts["train"] == 0:
        empty = "dev" if counts["dev"] == 0 else "train"
        raise InputError(f"{train}: s3prl's speaker-hash split leaves the {empty} set empty; "
                         f"use more (or other) speaker ids (<spk>_nohash_<n>.wav)")
    noise = sorted((train / BACKGROUND).glob("*.wav"))
    if not noise:
        raise InputError(f"{train}: no {BACKGROUND}/*.wav (the _silence_ class)")
    for wav in noise:
        if sf.info(str(wav)).frames < 16000:
            raise InputError(f"{wav}: background noise must last at least 1 s at 16 kHz")
    missing = [c for c in KS_CLASSES if not any((test / c).glob("*.wav"))]
    if missing:
        raise InputError(f"{test}: no wavs in class folder(s) {', '.join(missing)} (the test root "
                         f"needs all 12: {', '.join(KS_CLASSES)})")
    counts["noise"] = len(noise)
    counts["test"] = sum(len(list((test / c).glob("*.wav"))) for c in KS_CLASSES)
    return counts


def _check_sid(data: Path) -> dict:
    """VoxCeleb1 as s3prl's voxceleb1/dataset.py reads it: each split-file line names a file
    it finds as DIR/*/wav/<path> (the first match), labelled by its speaker folder."""
    split_file = data / SID_SPLIT_FILE
    if not split_file.is_file():
        raise InputError(f"--data {data}: no {SID_SPLIT_FILE} (VoxCeleb1's identification split, "
                         f"lines `1|2|3 idNNNNN/VIDEO/UTT.wav` for train|dev|test)")
    found: dict[str, list[Path]] = {}
    for root in sorted(p for p in data.glob("*/wav") if p.is_dir()):
        for wav in root.glob("*/*/*.wav"):
            found.setdefault(wav.relative_to(root).as_posix(), []).append(wav)
    if not found:
        raise InputError(f"--data {data}: no */wav/idNNNNN/VIDEO/UTT.wav files (VoxCeleb1 layout: "
                         f"dev/wav/..., test/wav/...)")
    counts = {split: 0 for split in SID_SPLITS.values()}
    speakers: dict[str, set[str]] = {split: set() for split in SID_SPLITS.values()}
    first: dict[str, Path] = {}
    for n, line in enumerate(split_file.read_text().splitlines(), 1):
        where, parts = f"{split_file}:{n}", line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) not in SID_SPLITS:
            raise InputError(f"{where}: {line!r} is not `1|2|3 idNNNNN/VIDEO/UTT.wav`")
        match = re.fullmatch(r"id(\d{5})/[^/]+/[^/]+\.wav", parts[1])
        if not match:
            raise InputError(f"{where}: {parts[1]!r} is not idNNNNN/VIDEO/UTT.wav")
        if not 0 <= int(match[1]) - 10001 < SID_CLASSES:
            raise InputError(f"{where}: speaker id{match[1]} is outside id10001..id{10000 + SID_CLASSES} "
                             f"(s3prl's {SID_CLASSES} classes, label NNNNN - 10001)")
        paths = found.get(parts[1], [])
        if len(paths) != 1:
            raise InputError(f"{where}: {parts[1]} " + (f"not found as {data}/*/wav/{parts[1]}" if not paths else
                             f"is in {len(paths)} folders ({', '.join(str(p) for p in paths)}): ambiguous"))
        split = SID_SPLITS[int(parts[0])]
        counts[split] += 1
        speakers[split].add(match[1])
        first.setdefault(split, paths[0])
    for index, split in SID_SPLITS.items():
        if not counts[split]:
            raise InputError(f"{split_file}: missing split {split}: no `{index} ...` lines")
    unseen = sorted((speakers["dev"] | speakers["test"]) - speakers["train"])
    if unseen:
        raise InputError(f"{split_file}: speaker(s) {', '.join('id' + s for s in unseen)} have dev/test "
                         f"lines but no training (1) line (SID classifies among training speakers)")
    for wav in first.values():
        audio_info(wav)
    return counts | {"speakers": len(speakers["train"])}


def _check_ic(data: Path) -> dict:
    """Fluent Speech Commands as s3prl's fluent_commands expert reads it: pandas.read_csv of
    each csv, the wav at DIR/<path>, the classes of each slot those of train."""
    import pandas as pd

    frames = {}
    for split in IC_SPLITS:
        csv = data / "data" / f"{split}_data.csv"
        if not csv.is_file():
            raise InputError(f"--data {data}: missing split data/{split}_data.csv (Fluent Speech Commands "
                             f"layout: data/{{{','.join(IC_SPLITS)}}}_data.csv, columns ,{','.join(IC_COLUMNS)})")
        try:
            df = pd.read_csv(csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise InputError(f"{csv}: not a readable csv ({e})") from None
        missing = [c for c in ("path", *IC_SLOTS) if c not in df.columns]
        if missing:
            raise InputError(f"{csv}: no column(s) {', '.join(missing)} (s3prl reads path, "
                             f"{', '.join(IC_SLOTS)}; the FSC header is ,{','.join(IC_COLUMNS)})")
        if df.empty:
            raise InputError(f"{csv}: no rows")
        for column in ("path", *IC_SLOTS):  # line numbers: the header is line 1
            if df[column].isna().any():
                raise InputError(f"{csv}:{int(df[column].isna().to_numpy().argmax()) + 2}: empty {column} "
                                 f"(pandas reads it as missing)")
        for n, path in enumerate(df["path"], 2):
            if not (data / str(path)).is_file():
                raise InputError(f"{csv}:{n}: {path}: no such file under {data}")
        audio_info(data / str(df["path"].iloc[0]))
        frames[split] = df
    for split in IC_SPLITS[1:]:
        for slot in IC_SLOTS:
            known = set(frames["train"][slot])
            for n, value in enumerate(frames[split][slot], 2):
                if value not in known:
                    raise InputError(f"{data / 'data' / f'{split}_data.csv'}:{n}: {slot} {value!r} does not "
                                     f"occur in train_data.csv (s3prl's {slot} classes are those of train)")
    return {split: len(df) for split, df in frames.items()}


# ---------------------------------------------------------------------------- metrics


def parse_metric(task: Task, split: str, stdout: str, expdir: Path) -> list[float]:
    """Every value of `split`'s metric a run reported, in order: PR from the printed
    `{split} per: X` lines, KS, SID and IC from EXPDIR/log.log `{split} at step N: X` lines, ASR from
    the printed `{split} wer: X` lines (s3prl prints percent: returned as a fraction, like PER)."""
    if task.name == "asr":
        return [float(x) / 100 for x in re.findall(rf"^{re.escape(split)} wer: ([0-9.eE+-]+)$", stdout, re.M)]
    if task.name == "pr":
        return [float(x) for x in re.findall(rf"^{split} per: ([0-9.eE+-]+)$", stdout, re.M)]
    log = expdir / "log.log"
    text = log.read_text() if log.is_file() else ""
    return [float(x) for x in re.findall(rf"^{split} at step \d+: ([0-9.eE+-]+)$", text, re.M)]
