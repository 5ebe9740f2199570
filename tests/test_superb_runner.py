"""`mt4ssl superb` (mt4ssl.superb.runner): PR, KS, SID and IC end to end through s3prl 0.4.18's own
runner on CPU (a few steps, tiny model, tiny data), and every input error raised before any
s3prl process starts. Also the synthetic KS, SID and IC corpora and the PR phone vocab/lexicon checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3prl")

from mt4ssl.cli import main  # noqa: E402
from mt4ssl.data import synth  # noqa: E402
from mt4ssl.data.text import WORD_PHONES  # noqa: E402
from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.superb import libriphone, runner, sweep, tasks  # noqa: E402
from mt4ssl.superb.synth import synth_ks  # noqa: E402
from tests.conftest import write_tree  # noqa: E402

needs_tts = pytest.mark.skipif(any(shutil.which(p) is None for p in synth.PROGRAMS),
                               reason=f"needs {', '.join(synth.PROGRAMS)}")

LEXICON = {"HELLO": "HH AH0 L OW1", "WORLD": "W ER1 L D", "SPEECH": "S P IY1 CH",
           "MODEL": "M AA1 D AH0 L", "CLUSTER": "K L AH1 S T ER0", "LABEL": "L EY1 B AH0 L",
           "FRAME": "F R EY1 M"}
PR_LENGTHS = {"train-clean-100": [32001, 40007, 48319, 35555], "dev-clean": [32999, 41601],
              "test-clean": [36001, 30011]}


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


@pytest.fixture(scope="module")
def pr_data(tmp_path_factory) -> Path:
    root = write_tree(tmp_path_factory.mktemp("pr") / "libri", PR_LENGTHS)
    (root / "lexicon.txt").write_text("".join(f"{w}\t{p}\n" for w, p in LEXICON.items()))
    return root


@pytest.fixture(scope="module")
def ks_data(tmp_path_factory) -> Path:
    if any(shutil.which(p) is None for p in synth.PROGRAMS):
        pytest.skip(f"needs {', '.join(synth.PROGRAMS)}")
    return tmp_path_factory.mktemp("ks") / "speech_commands"


@pytest.fixture
def no_s3prl(monkeypatch):
    """Fail the test if the runner would start s3prl."""
    def refuse(argv, logfile):
        raise AssertionError(f"s3prl started: {argv}")
    monkeypatch.setattr(runner, "_s3prl", refuse)


def test_pr_sweep_end_to_end(pr_data, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "pr"
    argv = ["superb", "--task", "pr", "--ckpt", str(ckpt), "--data", str(pr_data),
            "--out", str(out), "--steps", "3", "--eval-step", "3", "--lr", "1e-2", "1e-4"]
    assert main(argv) == 0
    summary = json.loads((out / "result.json").read_text())
    runs = {r["folder"]: r for r in summary["runs"]}
    assert sorted(runs) == ["lr0.0001", "lr0.01"] and summary["pending"] == []
    for name, lr in (("lr0.01", 1e-2), ("lr0.0001", 1e-4)):
        result = json.loads((out / name / "result.json").read_text())
        assert result["task"] == "pr" and result["metric"] == "per" and result["steps"] == 3
        assert result["lr"] == lr and result["states"] == "dev-best.ckpt"
        assert isinstance(result["test"], float) and result["test"] >= 0 and isinstance(result["dev"], float)
        assert runs[name]["dev"] == result["dev"] and runs[name]["test"] == result["test"]
        assert (out / name / "test-hyp.ark").is_file()
        assert (out / name / "phoneme.txt").read_text().split() == list(libriphone.PHONES)
        cfg = (out / name / "config.yaml").read_text()
        assert "total_steps: 3" in cfg and str(pr_data) in cfg and f"lr: {lr}" in cfg
    best = min(summary["runs"], key=lambda r: r["dev"])  # PER: lower is better
    assert summary["run"] == best["folder"] and summary["test"] == best["test"] and summary["lr"] == best["lr"]
    assert summary["commands"][0].startswith("mt4ssl superb --task pr") and "--lr 0.01 0.0001" in summary["commands"][0]

    # the same command again retrains nothing (a started s3prl process would fail the test)
    monkeypatch.setattr(runner, "_s3prl", lambda argv, logfile, append=False: pytest.fail(f"s3prl ran {argv}"))
    assert main(argv) == 0
    assert json.loads((out / "result.json").read_text())["runs"] == summary["runs"]
    monkeypatch.undo()

    # an interrupted run (states saved, no result) resumes from s3prl's newest states
    run = out / "lr0.0001"
    for name in ("result.json", "test.log"):
        (run / name).unlink()
    assert main(argv) == 0
    assert "Resume from" in (run / "train.log").read_text() and (run / "result.json").is_file()
    # another setting in the same sweep folder is an error naming it
    with pytest.raises(InputError, match="steps: 3 there, 5 now"):
        sweep.sweep("pr", pr_data, out, [1e-2], ckpt=ckpt, steps=5, eval_step=3)


@needs_tts
def test_ks_end_to_end(ks_data, ckpt, tmp_path):
    counts = synth_ks(ks_data, speakers=2, test_speakers=1, unknown=1)
    assert counts["dev"] > 0 and counts["train"] > 0 and counts["test"] == 10 + 1 + 3
    assert sorted(p.name for p in (ks_data / "test").iterdir()) == sorted(tasks.KS_CLASSES)
    out = tmp_path / "ks"
    with pytest.raises(InputError, match="fewer than one batch of 32"):  # s3prl would loop for ever
        runner.superb("ks", ks_data, out, ckpt=ckpt, steps=3)
    result = runner.superb("ks", ks_data, out, ckpt=ckpt, random_init=True, steps=3, eval_step=3,
                           lr=1e-3, batch_size=4)
    assert result == json.loads((out / "result.json").read_text())
    assert result["metric"] == "acc" and 0 <= result["test"] <= 1 and result["lr"] == 1e-3
    assert result["random_init"] and (out / "random_init.pt").is_file() and result["batch_size"] == 4
    assert "test at step" in (out / "log.log").read_text()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_errors_before_training(pr_data, ckpt, tmp_path, no_s3prl):
    out = tmp_path / "out"
    bad_ckpt = tmp_path / "plain.pt"
    torch.save({"model": {}}, bad_ckpt)
    cases = {
        "unknown task 'er'": dict(task_name="er"),
        "not an mt4ssl checkpoint": dict(ckpt=bad_ckpt),
        "checkpoint not found": dict(ckpt=tmp_path / "nope.pt"),
        "--ckpt CKPT is required": dict(ckpt=None),
        "takes no --ckpt": dict(upstream="fbank"),
        "--steps must be >= 1": dict(steps=0),
    }
    for message, kwargs in cases.items():
        kwargs = {"task_name": "pr", "data": pr_data, "out": out, "ckpt": ckpt, **kwargs}
        with pytest.raises(InputError, match=message):
            runner.superb(**kwargs)
    data = _copy(pr_data, tmp_path / "missing")
    shutil.rmtree(data / "dev-clean")
    with pytest.raises(InputError, match="missing split dev-clean"):
        runner.superb("pr", data, out, ckpt=ckpt)
    data = _copy(pr_data, tmp_path / "layout")
    for f in (data / "test-clean").rglob("*.flac"):
        f.rename(data / "test-clean" / f.name)  # flat, not SPK/CH/
    with pytest.raises(InputError, match="no SPK/CH/SPK-CH-UTT.flac"):
        runner.superb("pr", data, out, ckpt=ckpt)
    data = _copy(pr_data, tmp_path / "oov")
    (data / "lexicon.txt").write_text("HELLO\tHH AH L OW\n")  # no stress, and words missing
    with pytest.raises(InputError, match="not in the 71-phone vocab"):
        runner.superb("pr", data, out, ckpt=ckpt)
    with pytest.raises(InputError, match="missing split train/"):
        runner.superb("ks", pr_data, out, ckpt=ckpt)
    assert not out.exists()  # nothing written, no s3prl run
    out.mkdir()
    (out / "states-10.ckpt").write_text("old run")
    with pytest.raises(InputError, match="not an empty folder"):
        runner.superb("pr", pr_data, out, ckpt=ckpt)


def test_cli_error_message(pr_data, ckpt, tmp_path, capsys, no_s3prl):
    rc = main(["superb", "--task", "er", "--ckpt", str(ckpt), "--data", str(pr_data),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "mt4ssl superb: error: unknown task 'er'" in capsys.readouterr().err


def test_ks_layout_errors(tmp_path, ckpt, no_s3prl):
    import numpy as np
    import soundfile as sf

    root = tmp_path / "sc"

    def wav(path, n=16000):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), np.zeros(n, np.float32), 16000)

    spk = [f"{i:08x}" for i in range(40)]
    for w in tasks.KS_WORDS:
        for s in spk:
            wav(root / "train" / w / f"{s}_nohash_0.wav", 400)
    for c in tasks.KS_CLASSES[:-1]:
        wav(root / "test" / c / "a_nohash_0.wav", 400)
    with pytest.raises(InputError, match=r"no _background_noise_/\*.wav"):
        tasks.check_data(tasks.get_task("ks"), root)
    wav(root / "train" / "_background_noise_" / "short.wav", 8000)
    with pytest.raises(InputError, match="at least 1 s"):
        tasks.check_data(tasks.get_task("ks"), root)
    wav(root / "train" / "_background_noise_" / "short.wav", 32000)
    with pytest.raises(InputError, match="_silence_"):
        tasks.check_data(tasks.get_task("ks"), root)
    wav(root / "test" / "_silence_" / "a_nohash_0.wav")
    counts = tasks.check_data(tasks.get_task("ks"), root)
    assert counts["dev"] > 0 and counts["train"] > 0 and counts["test"] == 12 and counts["noise"] == 1
    assert counts["dev"] == 10 * sum(tasks.dev_split(f"{s}_nohash_0.wav") == "dev" for s in spk)


def test_vocab_and_config_scaling(tmp_path):
    assert len(libriphone.PHONES) == 71 and set(libriphone.PHONES) == WORD_PHONES | {"SIL", "SPN"}
    assert libriphone.PHONES[:4] == ("SIL", "SPN", "AA0", "AA1") and libriphone.PHONES[-1] == "ZH"
    pr = tasks.task_config(tasks.get_task("pr"), tmp_path, tmp_path, 2000, None, None, 0)
    assert pr["runner"]["total_steps"] == 2000 and pr["runner"]["eval_step"] == 100  # 20 evals
    assert pr["runner"]["save_step"] == 100 and pr["optimizer"]["lr"] == 1e-2
    assert tasks.task_config(tasks.get_task("pr"), tmp_path, tmp_path, 50000, None, None, 0)["runner"][
        "eval_step"] == 1000  # s3prl's
    full = tasks.task_config(tasks.get_task("pr"), tmp_path, tmp_path, None, None, None, 0)["runner"]
    assert (full["total_steps"], full["eval_step"], full["save_step"]) == (100000, 1000, 100)
    assert pr["downstream_expert"]["corpus"]["lexicon"] == [str(tmp_path / "lexicon.txt")]
    ks = tasks.task_config(tasks.get_task("ks"), tmp_path, tmp_path, None, 7, 3e-4, 0)
    assert ks["runner"]["total_steps"] == 200000 and ks["runner"]["eval_step"] == 7
    assert ks["optimizer"]["lr"] == 3e-4 and tasks.KS_CONFIG["optimizer"]["lr"] == 1e-4


# ---------------------------------------------------------------------------- ASR (-d asr)

import yaml  # noqa: E402

from mt4ssl.superb import asr  # noqa: E402


def test_asr_end_to_end(pr_data, ckpt, tmp_path):
    out = tmp_path / "asr"
    result = runner.superb("asr", pr_data, out, ckpt=ckpt, steps=3, eval_step=3)
    assert result == json.loads((out / "result.json").read_text())
    assert result["task"] == "asr" and result["metric"] == "wer" and result["steps"] == 3
    assert result["lr"] == 1e-4 and result["counts"] == {s: len(PR_LENGTHS[s]) for s in asr.SPLITS}
    wers = [float(x) for x in (out / "test.log").read_text().split("test-clean wer: ")[1:]]
    assert len(wers) == 1 and result["test"] == pytest.approx(wers[0] / 100) and result["test"] >= 0
    assert isinstance(result["dev"], float)
    # s3prl's ASR saves dev-clean-best.ckpt only when the dev WER beats its initial 100 %
    best = (out / "dev-clean-best.ckpt").is_file()
    assert best == (result["dev"] < 1)
    assert result["states"] == ("dev-clean-best.ckpt" if best else "states-3.ckpt")
    assert (out / "test-clean-noLM-hyp.ark").is_file() and (out / "dev-clean-noLM-ref.ark").is_file()
    datarc = yaml.safe_load((out / "config.yaml").read_text())["downstream_expert"]["datarc"]
    assert datarc["libri_root"] == str(pr_data) and datarc["dict_path"] == str(out / "char.dict")
    assert datarc["bucket_file"] == str(out / "bucket_file") and datarc["num_workers"] == 0
    for split in asr.SPLITS:
        rows = (out / "bucket_file" / f"{split}.csv").read_text().splitlines()
        assert [int(r.split(",")[2]) for r in rows[1:]] == sorted(PR_LENGTHS[split], reverse=True)
    assert [line.split()[0] for line in (out / "char.dict").read_text().splitlines()] == list(asr.CHARS)
    assert not list(pr_data.rglob("*.csv")) and not (pr_data / "char.dict").exists()


def _flac(path: Path, n: int, rate: int = 16000) -> None:
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(n, np.float32), rate)


def test_asr_bucket_file_and_dictionary(tmp_path):
    root = tmp_path / "libri"
    train = root / "train-clean-100"
    _flac(train / "1/2/1-2-0000.flac", 1600)
    _flac(train / "1/2/1-2-0001.flac", 3200)
    _flac(train / "3/4/3-4-0000.flac", 2400)
    (train / "1/2/1-2.trans.txt").write_text("1-2-0000 HI YOU\n1-2-0001 it's  a\n")
    (train / "3/4/3-4.trans.txt").write_text("3-4-0000 ZOO\n")
    csv_file = asr.write_bucket_file(root, "train-clean-100", tmp_path / "bucket" / "train-clean-100.csv")
    assert csv_file.read_text() == (",file_path,length,label\n"
                                    "0,train-clean-100/1/2/1-2-0001.flac,3200,\n"
                                    "1,train-clean-100/3/4/3-4-0000.flac,2400,\n"
                                    "2,train-clean-100/1/2/1-2-0000.flac,1600,\n")
    # tokens: H I | Y O U |, I T ' S | A |, Z O O |
    dict_file = asr.write_dictionary(root, tmp_path / "char.dict")
    assert dict_file.read_text() == ("| 5\nE 0\nT 1\nA 1\nO 3\nN 0\nI 2\nH 1\nS 1\nR 0\nD 0\nL 0\nU 1\n"
                                     "M 0\nC 0\nW 0\nF 0\nG 0\nY 1\nP 0\nB 0\nV 0\nK 0\n' 1\nX 0\n"
                                     "J 0\nQ 0\nZ 1\n")

    # s3prl's own ASR dictionary and dataset read them as its preprocess outputs
    from s3prl.downstream.asr.dataset import SequenceDataset
    from s3prl.downstream.asr.dictionary import Dictionary

    dictionary = Dictionary.load(str(dict_file))
    assert len(dictionary) == 32 and dictionary.bos() == 0  # 4 specials + 28: the CTC blank is <s>
    data = SequenceDataset("train", 1, dictionary, libri_root=str(root), bucket_file=str(csv_file.parent),
                           train=["train-clean-100"])
    assert data.X == [["train-clean-100/1/2/1-2-0001.flac"], ["train-clean-100/3/4/3-4-0000.flac"],
                      ["train-clean-100/1/2/1-2-0000.flac"]]
    assert data.Y["1-2-0000"].tolist() == [4 + asr.CHARS.index(c) for c in "HI|YOU|"] + [dictionary.eos()]
    assert data.Y["1-2-0001"].tolist()[:-1] == [4 + asr.CHARS.index(c) for c in "IT'S|A|"]
    assert len(dictionary) == 32  # nothing added while encoding
    assert asr.tokens(" it's  a ") == list("IT'S|A|")

    for split in asr.SPLITS[1:]:
        _flac(root / split / "5/6/5-6-0000.flac", 800)
        (root / split / "5/6/5-6.trans.txt").write_text("5-6-0000 A\n")
    assert tasks.check_data(tasks.get_task("asr"), root) == {"train-clean-100": 3, "dev-clean": 1,
                                                             "test-clean": 1}
    task = tasks.get_task("asr")
    printed = "train wer: 99.0\ndev-clean wer: 87.5\ndev-clean uer: 50.0\ndev-clean wer: 100.0\n"
    assert tasks.parse_metric(task, "dev-clean", printed, tmp_path) == [0.875, 1.0]
    assert tasks.parse_metric(task, "test-clean", printed, tmp_path) == []


def test_asr_errors_before_training(pr_data, ckpt, tmp_path, no_s3prl):
    out = tmp_path / "out"

    def fails(message, data, **kwargs):
        with pytest.raises(InputError, match=message):
            runner.superb("asr", data, out, ckpt=ckpt, **kwargs)

    data = _copy(pr_data, tmp_path / "missing")
    shutil.rmtree(data / "test-clean")
    fails("missing split test-clean/", data)
    data = _copy(pr_data, tmp_path / "noflac")
    for f in (data / "dev-clean").rglob("*.flac"):
        f.unlink()
    fails(r"dev-clean: no SPK/CH/SPK-CH-UTT.flac", data)
    data = _copy(pr_data, tmp_path / "noline")
    trans = data / "train-clean-100/101/10/101-10.trans.txt"
    trans.write_text("".join(line + "\n" for line in trans.read_text().splitlines()[1:]))
    fails(r"101-10-0001.flac: no line for 101-10-0001 in .*101-10.trans.txt", data)
    data = _copy(pr_data, tmp_path / "notrans")
    (data / "test-clean/100/10/100-10.trans.txt").unlink()
    fails(r"100-10-0000.flac: no 100-10.trans.txt beside it", data)
    data = _copy(pr_data, tmp_path / "chars")
    trans = data / "dev-clean/100/10/100-10.trans.txt"
    trans.write_text("100-10-0000 HELLO WORLD-2 café\n")
    fails(r"100-10.trans.txt: utterance 100-10-0000: characters \['-', '2', 'É'\] are outside", data)
    data = _copy(pr_data, tmp_path / "rate")
    _flac(data / "test-clean/100/10/100-10-0000.flac", 8000, rate=8000)
    fails("100-10-0000.flac: 8000 Hz; s3prl's ASR needs 16000 Hz", data)
    data = _copy(pr_data, tmp_path / "one")
    for f in sorted((data / "train-clean-100").rglob("*.flac"))[1:]:
        f.unlink()
    fails("has 1 file; s3prl's ASR dataset drops", data)
    assert not out.exists()  # nothing written, no s3prl run


# ---------------------------------------------------------------------------- SID and IC, synthetic data

import csv  # noqa: E402
import hashlib  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

import yaml  # noqa: E402

from mt4ssl.superb import synth as superb_synth  # noqa: E402

SID_SIZES = dict(speakers=3, utterances=2, eval_utterances=1)
IC_SIZES = dict(speakers=2, valid_speakers=1, test_speakers=1, utterances=4)


def _synth_or_skip(tmp_path_factory, name: str, write, **sizes) -> Path:
    if any(shutil.which(p) is None for p in synth.PROGRAMS):
        pytest.skip(f"needs {', '.join(synth.PROGRAMS)}")
    root = tmp_path_factory.mktemp(name) / name
    write(root, **sizes)
    return root


@pytest.fixture(scope="module")
def sid_data(tmp_path_factory) -> Path:
    return _synth_or_skip(tmp_path_factory, "voxceleb1", superb_synth.synth_sid, **SID_SIZES)


@pytest.fixture(scope="module")
def ic_data(tmp_path_factory) -> Path:
    return _synth_or_skip(tmp_path_factory, "fluent", superb_synth.synth_ic, **IC_SIZES)


def _marker(root: Path) -> dict:
    return json.loads((root / superb_synth.MARKER).read_text())


def _variation(root: Path) -> dict[str, dict]:
    """variation.tsv by path, after checking its hash against the marker's."""
    text = (root / superb_synth.VARIATION).read_text()
    assert _marker(root)["variation"] == {"file": superb_synth.VARIATION,
                                          "sha256": hashlib.sha256(text.encode()).hexdigest()}
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    return {r["path"]: r for r in rows}


def _csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text().splitlines()))


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_synth_sid_layout(sid_data):
    lines = (sid_data / tasks.SID_SPLIT_FILE).read_text().splitlines()
    speakers = {"id10001", "id10002", "id10003"}
    assert len(lines) == len(speakers) * (2 + 1 + 1)
    by_split: dict[str, set] = {}
    for line in lines:
        index, name = line.split()
        by_split.setdefault(index, set()).add(name.split("/")[0])
        [wav] = sid_data.glob(f"*/wav/{name}")  # s3prl's lookup finds exactly one file
        info = sf.info(str(wav))
        assert (info.samplerate, info.channels) == (16000, 1) and info.frames > 16000 // 2
    assert by_split == {"1": speakers, "2": speakers, "3": speakers}
    assert sorted(p.name for p in (sid_data / "test" / "wav").iterdir()) == ["id10003"]  # the last fifth, >= 1
    assert sorted(p.name for p in (sid_data / "dev" / "wav").iterdir()) == ["id10001", "id10002"]
    assert len({line.split()[1].rsplit("/", 1)[0] for line in lines}) == 3 * 3  # a video per speaker and split
    counts = _marker(sid_data)["counts"]
    assert counts == {"train": 6, "dev": 3, "test": 3, "speakers": 3}
    assert tasks.check_data(tasks.get_task("sid"), sid_data) == counts
    rows = _variation(sid_data)
    assert sorted(rows) == sorted(p.relative_to(sid_data).as_posix() for p in sid_data.rglob("*.wav"))
    assert len({r["speed"] for r in rows.values()}) > 1 and len({r["pitch_cents"] for r in rows.values()}) > 1
    for r in rows.values():
        assert 0.85 <= float(r["speed"]) <= 1.15 and -200 <= int(r["pitch_cents"]) <= 200
        assert 10 <= float(r["snr_db"]) <= 30 and r["noise"] in superb_synth.NOISES


def test_synth_ic_layout(ic_data):
    frames = {}
    for split in tasks.IC_SPLITS:
        rows = _csv_rows(ic_data / "data" / f"{split}_data.csv")
        assert rows[0] == ["", "path", "speakerId", "transcription", "action", "object", "location"]
        assert [r[0] for r in rows[1:]] == [str(i) for i in range(len(rows) - 1)]
        frames[split] = rows[1:]
        for _, path, spk, text, action, obj, location in rows[1:]:
            assert path.startswith(f"wavs/speakers/{spk}/") and (ic_data / path).is_file()
            assert (action, obj, location) in superb_synth.INTENTS and text[0].isupper()
    assert [len(frames[s]) for s in tasks.IC_SPLITS] == [8, 4, 4]
    speakers = {s: {r[2] for r in frames[s]} for s in tasks.IC_SPLITS}
    assert [len(v) for v in speakers.values()] == [2, 1, 1] and not speakers["train"] & speakers["test"]
    intents = {tuple(r[4:]) for r in frames["train"]}
    assert len(intents) == 8  # training commands go through distinct intents first
    for split in ("valid", "test"):
        assert {tuple(r[4:]) for r in frames[split]} <= intents
    counts = _marker(ic_data)["counts"]
    assert counts == {"train": 8, "valid": 4, "test": 4, "intents": 8}
    assert tasks.check_data(tasks.get_task("ic"), ic_data) == {"train": 8, "valid": 4, "test": 4}
    assert sorted(_variation(ic_data)) == sorted(r[1] for s in tasks.IC_SPLITS for r in frames[s])
    assert len(superb_synth.INTENTS) == len(set(superb_synth.INTENTS)) == 31
    for action, obj, location in superb_synth.INTENTS:  # every intent has phrasings, rooms only where FSC has them
        text = superb_synth._command(random.Random(0), action, obj, location)
        assert location == "none" or location in text


@needs_tts
def test_synth_variation_applied(tmp_path):
    """Speed changes the length by 1/speed; the noise is at the drawn SNR."""
    sizes = dict(speakers=2, utterances=1, eval_utterances=1)
    flat = superb_synth.Variation(speed=(1, 1), pitch=(0, 0), snr=None)
    clean = superb_synth.synth_sid(tmp_path / "clean", **sizes, variation=flat)
    assert superb_synth.synth_sid(tmp_path / "varied", **sizes) == clean
    noisy = superb_synth.Variation(speed=(1, 1), pitch=(0, 0), snr=(10, 10))
    superb_synth.synth_sid(tmp_path / "noisy", **sizes, variation=noisy)
    assert {r["noise"] for r in _variation(tmp_path / "clean").values()} == {"none"}
    for path, row in _variation(tmp_path / "varied").items():
        ref, _ = sf.read(str(tmp_path / "clean" / path))
        varied, _ = sf.read(str(tmp_path / "varied" / path))
        assert len(varied) == pytest.approx(len(ref) / float(row["speed"]), rel=0.02)
        noisy_wav, _ = sf.read(str(tmp_path / "noisy" / path))
        gain = np.dot(noisy_wav, ref) / np.dot(ref, ref)  # the peak limit may scale the sum
        residual = noisy_wav - gain * ref
        assert 10 * np.log10(np.mean((gain * ref) ** 2) / np.mean(residual ** 2)) == pytest.approx(10, abs=0.5)
    assert _marker(tmp_path / "noisy")["settings"]["variation"] == {"speed": [1.0, 1.0], "pitch": [0.0, 0.0],
                                                                   "snr": [10.0, 10.0]}


@needs_tts
def test_synth_ks_variation(tmp_path):
    counts = superb_synth.synth_ks(tmp_path / "ks", speakers=2, test_speakers=1, unknown=1)
    rows = _variation(tmp_path / "ks")
    assert len(rows) == counts["train"] + counts["dev"] + counts["test"] - 3  # not the generated noise
    assert not any(tasks.BACKGROUND in p or "_silence_" in p for p in rows)
    for path in rows:
        assert sf.info(str(tmp_path / "ks" / path)).frames == 16000
    assert _marker(tmp_path / "ks")["settings"]["format"] == superb_synth.FORMAT == 2


@needs_tts
def test_synth_resume_and_settings(tmp_path):
    root = tmp_path / "ic"
    counts = superb_synth.synth_ic(root, **IC_SIZES)
    wavs = sorted(root.rglob("*.wav"))
    audio = {p: p.read_bytes() for p in wavs}
    mtimes = {p: p.stat().st_mtime_ns for p in wavs}
    assert superb_synth.synth_ic(root, **IC_SIZES) == counts  # finished: kept as it is
    assert {p: p.stat().st_mtime_ns for p in wavs} == mtimes
    # interrupted: the settings in the partial marker, no marker, a file not written yet
    settings = _marker(root)["settings"]
    (root / superb_synth.MARKER).unlink()
    (root / superb_synth.PARTIAL).write_text(json.dumps(settings))
    wavs[0].unlink()
    assert superb_synth.synth_ic(root, **IC_SIZES) == counts
    assert wavs[0].read_bytes() == audio[wavs[0]]  # the same file again: seeded by its path
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in wavs[1:])  # the others kept
    assert not (root / superb_synth.PARTIAL).exists() and _marker(root)["settings"] == settings
    with pytest.raises(InputError, match="holds a corpus of other settings .*seed: 0 there, 1 now"):
        superb_synth.synth_ic(root, **IC_SIZES, seed=1)
    (root / superb_synth.MARKER).unlink()
    (root / superb_synth.PARTIAL).write_text(json.dumps(settings))
    with pytest.raises(InputError, match="holds an unfinished corpus of other settings .*utterances: 4 there, 5 now"):
        superb_synth.synth_ic(root, **{**IC_SIZES, "utterances": 5})
    other = superb_synth.synth_ic(tmp_path / "seed1", **IC_SIZES, seed=1)
    assert other["train"] == counts["train"]
    assert _marker(tmp_path / "seed1")["variation"]["sha256"] != hashlib.sha256(
        (root / superb_synth.VARIATION).read_bytes()).hexdigest()  # other draws
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        superb_synth.synth_sid(tmp_path / "busy", **SID_SIZES)


def test_synth_superb_option_errors(tmp_path, capsys):
    out = tmp_path / "o"
    cases = {
        ("--task", "pr"): "task 'pr' not supported: ks, sid, ic",
        ("--task", "sid", "--unknown", "2"): "--unknown does not apply to --task sid",
        ("--task", "ks", "--utterances", "2"): "--utterances does not apply to --task ks",
        ("--task", "ic", "--speed", "1.2", "1.0"): "--speed takes LOW HIGH",
        ("--task", "ks", "--pitch", "0", "2000"): "--pitch 0 2000: outside -1200 .. 1200",
        ("--task", "sid", "--snr", "nan", "10"): "--snr takes LOW HIGH (finite",
        ("--task", "sid", "--speakers", "1"): "--speakers must be 2..36",
        ("--task", "sid", "--eval-utterances", "0"): "--eval-utterances must be >= 1",
        ("--task", "ic", "--speakers", "30", "--valid-speakers", "5"): "must be at most 36 voices",
        ("--task", "ic", "--workers", "0"): "--workers must be >= 1",
    }
    for args, message in cases.items():
        assert main(["synth-superb", "--out", str(out), *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not out.exists()


def test_sid_ic_configs(tmp_path):
    sid = tasks.task_config(tasks.get_task("sid"), tmp_path, tmp_path, 2000, None, None, 0, 4)
    assert sid["runner"]["gradient_accumulate_steps"] == 4 and sid["runner"]["eval_step"] == 100
    assert sid["runner"]["eval_dataloaders"] == ["dev", "test"]
    assert sid["downstream_expert"]["datarc"] == {
        "file_path": str(tmp_path), "meta_data": str(tmp_path / "iden_split.txt"), "num_workers": 0,
        "train_batch_size": 4, "eval_batch_size": 1, "max_timestep": 128000}
    ic = tasks.task_config(tasks.get_task("ic"), tmp_path, tmp_path, None, None, 1e-3, 2)
    assert ic["runner"]["total_steps"] == 200000 and ic["runner"]["save_step"] == 250
    assert ic["optimizer"]["lr"] == 1e-3 and tasks.IC_CONFIG["optimizer"]["lr"] == 1e-4
    assert ic["downstream_expert"]["datarc"] == {"file_path": str(tmp_path), "num_workers": 2,
                                                 "train_batch_size": 32, "eval_batch_size": 32}
    assert tasks.batch_size(sid) == 4 and tasks.batch_size(tasks.SID_CONFIG) == 8 and tasks.batch_size(ic) == 32


def _check_logged(task_name: str, out: Path, result: dict) -> None:
    """The result's dev and test are those of EXPDIR/log.log: the best dev and the test of the
    evaluation, after the test s3prl runs at each training-time evaluation."""
    task = tasks.get_task(task_name)
    dev, test = tasks.parse_metric(task, "dev", "", out), tasks.parse_metric(task, "test", "", out)
    assert len(dev) == 1 and len(test) == 2  # eval at step 3 (dev, test), then -m evaluate
    assert result["dev"] == max(dev) and result["test"] == test[-1] and 0 <= result["test"] <= 1
    assert result["metric"] == "acc" and result["steps"] == 3 and result["task"] == task_name


@needs_tts
def test_sid_end_to_end(sid_data, ckpt, tmp_path):
    out = tmp_path / "sid"
    result = runner.superb("sid", sid_data, out, ckpt=ckpt, steps=3, eval_step=3, batch_size=4)
    assert result == json.loads((out / "result.json").read_text())
    _check_logged("sid", out, result)
    assert result["batch_size"] == 4 and result["lr"] == 1e-4 and result["counts"]["speakers"] == 3
    datarc = yaml.safe_load((out / "config.yaml").read_text())["downstream_expert"]["datarc"]
    assert datarc["file_path"] == str(sid_data) and datarc["meta_data"] == str(sid_data / "iden_split.txt")
    # s3prl's file lists were cached in the run's folder, from this data
    for split, n in (("train", 6), ("dev", 3), ("test", 3)):
        with open(out / "voxceleb1_cache" / f"{split}.pkl", "rb") as f:
            paths = pickle.load(f)
        assert len(paths) == n and all(Path(p).is_relative_to(sid_data) for p in paths)
    predicted = (out / "test_predict.txt").read_text().split()
    assert len(predicted) == 2 * 3 and all(s.startswith("id1") for s in predicted[1::2])


@needs_tts
def test_ic_end_to_end(ic_data, ckpt, tmp_path):
    out = tmp_path / "ic"
    result = runner.superb("ic", ic_data, out, ckpt=ckpt, steps=3, eval_step=3, batch_size=4, lr=1e-3)
    assert result == json.loads((out / "result.json").read_text())
    _check_logged("ic", out, result)
    assert result["counts"] == {"train": 8, "valid": 4, "test": 4} and result["lr"] == 1e-3
    assert yaml.safe_load((out / "config.yaml").read_text())["downstream_expert"]["datarc"]["file_path"] == str(ic_data)
    truth = _csv_rows(out / "test_truth.csv")
    expected = [r[4:] for r in _csv_rows(ic_data / "data" / "test_data.csv")[1:]]
    assert [r[1:] for r in truth] == expected  # s3prl read our slots


@needs_tts
def test_sid_ic_errors_before_training(sid_data, ic_data, ckpt, tmp_path, no_s3prl):
    out = tmp_path / "out"

    def fails(task, data, message):
        with pytest.raises(InputError, match=message):
            runner.superb(task, data, out, ckpt=ckpt)

    split_lines = (sid_data / tasks.SID_SPLIT_FILE).read_text().splitlines()

    def sid_case(name, lines=None):
        data = _copy(sid_data, tmp_path / name)
        if lines is not None:
            (data / tasks.SID_SPLIT_FILE).write_text("".join(line + "\n" for line in lines))
        return data

    data = sid_case("nosplit")
    (data / tasks.SID_SPLIT_FILE).unlink()
    fails("sid", data, "no iden_split.txt")
    data = sid_case("layout")
    for folder in ("dev", "test"):
        (data / folder / "wav").rename(data / folder / "audio")
    fails("sid", data, r"no \*/wav/idNNNNN/VIDEO/UTT.wav files")
    fails("sid", sid_case("index", split_lines + ["4 id10001/abc/00001.wav"]),
          r"iden_split.txt:13: '4 id10001/abc/00001.wav' is not `1\|2\|3")
    fails("sid", sid_case("blank", split_lines[:2] + [""] + split_lines[2:]), r"iden_split.txt:3: '' is not")
    fails("sid", sid_case("shape", ["1 id10001/00001.wav"] + split_lines), r":1: 'id10001/00001.wav' is not idNNNNN")
    fails("sid", sid_case("range", split_lines + ["1 id09999/abc/00001.wav"]), "speaker id09999 is outside id10001..id11251")
    fails("sid", sid_case("nofile", split_lines + ["1 id10001/abc/00009.wav"]), r":13: id10001/abc/00009.wav not found as")
    data = sid_case("twice")
    shutil.copytree(data / "dev" / "wav" / "id10001", data / "test" / "wav" / "id10001")
    fails("sid", data, r":1: id10001/.* is in 2 folders")
    fails("sid", sid_case("nodev", [line for line in split_lines if not line.startswith("2 ")]),
          "missing split dev: no `2 ...` lines")
    fails("sid", sid_case("unseen", [line for line in split_lines if not line.startswith("1 id10002")]),
          "speaker.s. id10002 have dev/test lines but no training")
    data = sid_case("rate")
    first = next(sid_data.glob(f"*/wav/{split_lines[0].split()[1]}")).relative_to(sid_data)
    sf.write(str(data / first), np.zeros(8000, np.float32), 8000)
    fails("sid", data, "sample rate 8000 Hz, expected 16000 Hz")

    def ic_case(name, split=None, edit=None):
        data = _copy(ic_data, tmp_path / f"ic-{name}")
        if edit is not None:
            path = data / "data" / f"{split}_data.csv"
            _write_csv(path, edit(_csv_rows(path)))
        return data

    data = ic_case("nocsv")
    (data / "data" / "valid_data.csv").unlink()
    fails("ic", data, "missing split data/valid_data.csv")
    fails("ic", ic_case("column", "train", lambda rows: [r[:5] + r[6:] for r in rows]),
          r"train_data.csv: no column\(s\) object")
    fails("ic", ic_case("norows", "test", lambda rows: rows[:1]), "test_data.csv: no rows")
    fails("ic", ic_case("empty", "test", lambda rows: rows[:2] + [rows[2][:6] + [""]] + rows[3:]),
          "test_data.csv:3: empty location")
    fails("ic", ic_case("unseen", "valid", lambda rows: rows[:1] + [rows[1][:5] + ["toaster"] + rows[1][6:]] + rows[2:]),
          "valid_data.csv:2: object 'toaster' does not occur in train_data.csv")
    data = ic_case("nowav")
    (data / _csv_rows(data / "data" / "train_data.csv")[2][1]).unlink()  # line 3
    fails("ic", data, r"train_data.csv:3: wavs/speakers/.*\.wav: no such file")
    assert not out.exists()  # nothing written, no s3prl run
