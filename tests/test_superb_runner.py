"""`mt4ssl superb` (mt4ssl.superb.runner): PR and KS end to end through s3prl 0.4.18's own
runner on CPU (a few steps, tiny model, tiny data), and every input error raised before any
s3prl process starts. Also the synthetic KS corpus and the PR phone vocab/lexicon checks."""

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
from mt4ssl.superb import libriphone, runner, tasks  # noqa: E402
from mt4ssl.superb.synth_ks import synth_ks  # noqa: E402
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


def test_pr_end_to_end(pr_data, ckpt, tmp_path):
    out = tmp_path / "pr"
    rc = main(["superb", "--task", "pr", "--ckpt", str(ckpt), "--data", str(pr_data),
               "--out", str(out), "--steps", "3", "--eval-step", "3"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "pr" and result["metric"] == "per" and result["steps"] == 3
    assert result["lr"] == 1e-2 and result["states"] == "dev-best.ckpt"
    assert isinstance(result["test"], float) and result["test"] >= 0
    assert isinstance(result["dev"], float)
    assert (out / "test-hyp.ark").is_file()
    assert (out / "phoneme.txt").read_text().split() == list(libriphone.PHONES)
    cfg = (out / "config.yaml").read_text()
    assert "total_steps: 3" in cfg and str(pr_data) in cfg


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
    rc = main(["superb", "--task", "sid", "--ckpt", str(ckpt), "--data", str(pr_data),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "mt4ssl superb: error: unknown task 'sid'" in capsys.readouterr().err


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
