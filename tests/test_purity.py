"""`mt4ssl purity`: measures, alignment formats, label sources, errors; one real-flite check."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mt4ssl.cli import main as cli_main
from mt4ssl.data.labels import write_dict
from mt4ssl.data.manifest import read_manifest, write_split
from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import save_checkpoint
from mt4ssl.models.cnn import num_frames
from mt4ssl.models.mt4ssl import MT4SSL
from mt4ssl.probes import purity
from tests.conftest import small_model_config, write_tree

# --------------------------------------------------------------------------- measures


def test_measures_of_a_hand_computed_example():
    phones = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array([5, 5, 7, 7, 7, 7])
    r = purity.cluster_quality(phones, labels)
    # p(y, z): (0,5) 2/6, (0,7) 1/6, (1,7) 2/6, (2,7) 1/6
    assert r["phone_purity"] == pytest.approx(2 / 6 + 2 / 6, abs=1e-4)  # max over y per cluster
    assert r["cluster_purity"] == pytest.approx(2 / 6 + 2 / 6 + 1 / 6, abs=1e-4)  # max over z per phone
    h_y = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)
    h_y_given_z = 2 / 3 * -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))  # cluster 5 is pure
    assert r["pnmi"] == pytest.approx((h_y - h_y_given_z) / h_y, abs=1e-4)
    assert r["phone_entropy"] == pytest.approx(h_y, abs=1e-4)
    assert (r["frames"], r["phones_seen"], r["clusters_used"]) == (6, 3, 2)


def test_pnmi_matches_sklearn():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    phones = rng.integers(0, 40, size=5000)
    labels = np.where(rng.random(5000) < 0.6, phones * 3 + rng.integers(0, 3, size=5000),
                      rng.integers(0, 120, size=5000))
    p = np.bincount(phones) / len(phones)
    h = -(p[p > 0] * np.log(p[p > 0])).sum()
    expected = mutual_info_score(phones, labels) / h
    assert purity.cluster_quality(phones, labels)["pnmi"] == pytest.approx(expected, abs=1e-4)


def test_labels_equal_to_phones_or_independent_of_them():
    rng = np.random.default_rng(1)
    phones = rng.integers(0, 40, size=100_000)
    same = purity.cluster_quality(phones, (phones * 7 + 3) % 40)  # a relabelling
    assert same["pnmi"] == same["phone_purity"] == same["cluster_purity"] == 1.0
    independent = purity.cluster_quality(phones, rng.integers(0, 50, size=len(phones)))
    assert independent["pnmi"] < 0.01
    with pytest.raises(InputError, match="same phone"):
        purity.cluster_quality(np.zeros(10, dtype=int), np.arange(10))


def test_linear_classifier_reads_a_linear_code():
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((len(purity.PHONES), 16)).astype(np.float32)
    y_fit, y_eval = rng.integers(0, 40, size=4000), rng.integers(0, 40, size=1000)
    x_fit = codes[y_fit] + 0.3 * rng.standard_normal((4000, 16)).astype(np.float32)
    x_eval = codes[y_eval] + 0.3 * rng.standard_normal((1000, 16)).astype(np.float32)
    r = purity.linear_classifier(x_fit, y_fit, x_eval, y_eval, steps=300)
    assert r["accuracy"] > 0.95 and r["fit_frames"] == 4000 and r["eval_frames"] == 1000
    assert purity.linear_classifier(x_fit, y_fit, x_eval, y_eval, steps=300) == r  # seeded


# --------------------------------------------------------------------------- alignments


def test_frame_phones_take_the_phone_at_each_frame_centre():
    ivs = [purity.Interval(0.0, 0.1, "sil", "a:1"), purity.Interval(0.1, 0.5, "AH0", "a:2"),
           purity.Interval(0.6, 1.0, "K", "a:3")]  # a gap 0.5-0.6
    phones = purity.frame_phones(ivs[::-1], 16000, "u")  # any order
    assert len(phones) == num_frames(16000) == 49
    ids = purity.PHONE_IDS
    # centre of frame t: 0.0125 + 0.02 t s
    assert (phones[:5] == ids["SIL"]).all() and (phones[5:25] == ids["AH"]).all()
    assert (phones[25:30] == -1).all() and (phones[30:] == ids["K"]).all()


def test_phone_normalisation():
    n = purity.normalize_phone
    assert [n(p, "x") for p in ("", "sil", "sp", "SPN", "SIL")] == [purity.PHONE_IDS["SIL"]] * 5
    assert n("ah0", "x") == n("AH", "x") == n("AH1_B", "x") == purity.PHONE_IDS["AH"]
    with pytest.raises(InputError, match=r"f.ctm:7: phone 'DX' is not one of the 39"):
        n("DX", "f.ctm:7")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Manifests of conftest's tone tree, CTMs of random phone sequences for all but the
    last utterance of each split, and a label file equal to the frame phones."""
    tmp = tmp_path_factory.mktemp("purity")
    tree = write_tree(tmp / "libri")
    write_split(tree / "train", tmp / "manifests", "train")
    write_split(tree / "dev", tmp / "manifests", "valid")
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        manifest = read_manifest(tmp / "manifests" / f"{split}.tsv")
        lines = []
        for f, n in list(zip(manifest.files, manifest.sizes))[:-1]:
            t, utt = 0.0, Path(f).stem
            while t < n / 16000 - 0.05:
                d = min(rng.uniform(0.03, 0.2), n / 16000 - t)
                lines.append(f"{utt} 1 {t:.3f} {d:.3f} {purity.PHONES[rng.integers(0, 40)]}\n")
                t = round(t + d, 3)
        (tmp / f"{split}.ctm").write_text("".join(lines))
        phones = purity.align(manifest, tmp / f"{split}.ctm")
        labels = [phones[i] if i in phones else np.zeros(num_frames(n), dtype=int)
                  for i, n in enumerate(manifest.sizes)]
        labels = [np.where(lab < 0, 0, lab) for lab in labels]
        (tmp / "labels").mkdir(exist_ok=True)
        (tmp / "labels" / f"{split}.km").write_text("".join(" ".join(map(str, lab)) + "\n" for lab in labels))
    write_dict(tmp / "labels" / "dict.km.txt", 40)
    return tmp


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    purity.add_args(p)
    return p.parse_args(list(argv))


def test_labels_equal_to_the_alignment_score_one(data, capsys):
    out = data / "labels.json"
    args = _args("--manifest", str(data / "manifests/valid.tsv"), "--alignments", str(data / "valid.ctm"),
                 "--labels", str(data / "labels/valid.km"), "--out", str(out))
    assert purity.run(args) == 0
    result = json.loads(out.read_text())
    assert (result["utterances"], result["aligned"], result["skipped"]) == (2, 1, 1)
    (r,) = result["results"]
    assert r["source"] == "labels" and r["pnmi"] == r["phone_purity"] == r["cluster_purity"] == 1.0
    aligned = purity.align(read_manifest(data / "manifests/valid.tsv"), data / "valid.ctm")
    assert r["frames"] == (aligned[0] >= 0).sum() > 0.9 * num_frames(32999)
    printed = capsys.readouterr().out
    assert "PNMI 1.000" in printed and "1 utterances aligned, 1 skipped" in printed


TEXTGRID = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 2.0624375
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 2.0624375
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 2.0624375
            text = "hello"
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 2.0624375
        intervals: size = 4
        intervals [1]:
            xmin = 0
            xmax = 0.3
            text = ""
        intervals [2]:
            xmin = 0.3
            xmax = 1.0
            text = "HH"
        intervals [3]:
            xmin = 1.0
            xmax = 1.7
            text = "AH0"
        intervals [4]:
            xmin = 1.7
            xmax = 2.0624375
            text = "spn"
'''


def test_textgrid_folder_as_mfa_writes_it(data, tmp_path):
    folder = tmp_path / "mfa" / "100"  # MFA mirrors the corpus' speaker folders
    folder.mkdir(parents=True)
    (folder / "100-10-0000.TextGrid").write_text(TEXTGRID)
    ivs = purity.read_textgrid(folder / "100-10-0000.TextGrid")
    assert [(iv.start, iv.end, iv.phone) for iv in ivs] == [
        (0, 0.3, ""), (0.3, 1.0, "HH"), (1.0, 1.7, "AH0"), (1.7, 2.0624375, "spn")]
    assert ivs[1].where == f"{folder / '100-10-0000.TextGrid'}:29"
    manifest = read_manifest(data / "manifests/valid.tsv")  # 100-10-0000 is 32999 samples
    phones = purity.align(manifest, tmp_path / "mfa")
    assert list(phones) == [0]
    ids = purity.PHONE_IDS
    assert phones[0][0] == ids["SIL"] and phones[0][20] == ids["HH"] and phones[0][60] == ids["AH"]
    assert phones[0][-1] == ids["SIL"]
    (folder / "100-10-0000.TextGrid").write_text(TEXTGRID.replace('name = "phones"', 'name = "segments"'))
    with pytest.raises(InputError, match=r"one tier named 'phones'.*\['words', 'segments'\]"):
        purity.align(manifest, tmp_path / "mfa")


@pytest.mark.parametrize("line, message", [
    ("100-10-0000 1 0.000", r"valid.ctm:2: expected 'UTT_ID CHANNEL START DURATION PHONE"),
    ("100-10-0000 1 0.5 x AH", r"valid.ctm:2: duration 'x' is not a non-negative number"),
    ("100-10-0000 1 0.5 0.1 XYZ", r"valid.ctm:2: phone 'XYZ' is not one of the 39"),
    ("100-10-0000 1 2.0 0.1 AH", r"valid.ctm:2: 100-10-0000: phone 'AH' ends at 2.100 s, after the end "
                                 r"of the audio \(2.062 s\)"),
    ("100-10-0000 1 0.05 0.1 AH", r"valid.ctm:2: 100-10-0000: interval 0.050-0.150 overlaps the one at "
                                  r".*valid.ctm:1"),
    ("101-10-0000 1 0.2 0.1 AH", r"valid.ctm:2: utterance 101-10-0000 is not in .*valid.tsv"),
])
def test_alignment_errors_name_file_and_line(data, tmp_path, line, message):
    ctm = tmp_path / "valid.ctm"
    ctm.write_text(f"100-10-0000 1 0.000 0.100 SIL\n{line}\n")
    with pytest.raises(InputError, match=message):
        purity.align(read_manifest(data / "manifests/valid.tsv"), ctm)


def test_cli_reports_an_alignment_of_another_split(data, capsys):
    code = cli_main(["purity", "--manifest", str(data / "manifests/valid.tsv"), "--alignments",
                     str(data / "train.ctm"), "--labels", str(data / "labels/valid.km"),
                     "--out", str(data / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "mt4ssl purity: error:" in err and "utterance 100-10-0002 is not in" in err
    assert not (data / "x.json").exists()


# --------------------------------------------------------------------------- features + k-means


def _figures(result: dict) -> dict:
    """A result without its timings."""
    return {k: _figures(v) if isinstance(v, dict) else v for k, v in result.items() if "seconds" not in k}


def test_checkpoint_layers_kmeans_and_classifier(data, capsys):
    ckpt = data / "tiny.pt"
    torch.manual_seed(0)
    save_checkpoint(ckpt, MT4SSL(small_model_config()))
    common = ["--manifest", str(data / "manifests/valid.tsv"), "--alignments", str(data / "valid.ctm"),
              "--fit-manifest", str(data / "manifests/train.tsv"), "--fit-alignments", str(data / "train.ctm"),
              "-k", "4", "--fit-fraction", "1", "--classifier", "--classifier-steps", "20"]
    out = data / "ckpt.json"
    assert purity.run(_args(*common, "--ckpt", str(ckpt), "--layer", "0", "2",
                            "--labels", str(data / "labels/valid.km"), "--out", str(out))) == 0
    result = json.loads(out.read_text())
    labels, *layers = result["results"]
    assert labels["source"] == "labels" and [r["layer"] for r in layers] == [0, 2]
    for r in layers:
        assert r["source"] == "mt4ssl" and r["init"] == "checkpoint" and r["k"] == 4
        assert r["frames"] == labels["frames"] and 0 <= r["pnmi"] <= 1 and r["clusters_used"] <= 4
        assert r["fit_frames"] == sum(num_frames(n) for n in read_manifest(data / "manifests/train.tsv").sizes)
        assert 0 <= r["classifier"]["accuracy"] <= 1 and r["classifier"]["eval_frames"] == r["frames"]
    assert result["fit_aligned"] == 5
    assert "layer 2 k-means 4" in capsys.readouterr().out
    # the same again, seeded: same figures; random init: other figures
    assert purity.run(_args(*common, "--ckpt", str(ckpt), "--layer", "0", "2", "--out", str(out))) == 0
    assert [_figures(r) for r in json.loads(out.read_text())["results"]] == [_figures(r) for r in layers]
    assert purity.run(_args(*common, "--ckpt", str(ckpt), "--random-init", "--seed", "1",
                            "--layer", "2", "--out", str(out))) == 0
    (rand,) = json.loads(out.read_text())["results"]
    assert rand["init"] == "random"
    assert rand["classifier"]["final_loss"] != layers[1]["classifier"]["final_loss"]
    with pytest.raises(InputError, match=r"--layer \[4\]: .* has hidden states 0..3"):
        purity.run(_args(*common, "--ckpt", str(ckpt), "--layer", "4", "--out", str(out)))
    # MFCC frames: one 39-d MFCC frame per CNN frame
    assert purity.run(_args(*common, "--mfcc", "--out", str(out))) == 0
    (mfcc,) = json.loads(out.read_text())["results"]
    assert mfcc["source"] == "mfcc" and mfcc["frames"] == labels["frames"]


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to measure"),
    (["--mfcc"], "need --fit-manifest"),
    (["--labels", "v.km", "--layer", "1"], "--layer and --random-init need --ckpt"),
    (["--labels", "v.km", "--classifier"], "--classifier needs --ckpt or --mfcc, and --fit-alignments"),
])
def test_argument_errors(argv, message):
    with pytest.raises(InputError, match=message):
        purity.run(_args("--manifest", "v.tsv", "--alignments", "v.ctm", "--out", "o.json", *argv))


def test_mfcc_frames_match_the_cnn_frames():
    for n in (400, 719, 720, 721, 32001, 48319):
        wav = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        assert purity.mfcc_frames(wav)[0].shape == (num_frames(n), 39)


# --------------------------------------------------------------------------- real flite


@pytest.mark.skipif(any(shutil.which(p) is None for p in ("espeak-ng", "flite", "sox")),
                    reason="needs espeak-ng, flite and sox")
def test_synthetic_corpus_alignments_hold(tmp_path):
    from mt4ssl.data import synth

    corpus = tmp_path / "corpus"
    # speakers 100-105: espeak-ng, espeak-ng, flite slt, espeak-ng, espeak-ng, flite kal (8 kHz)
    synth.synthesize(corpus, hours=0.004, dev_hours=0.004, test_hours=0.001, speakers=6, workers=2)
    write_split(corpus / "dev-clean", tmp_path / "m", "valid")
    write_split(corpus / "train-clean-100", tmp_path / "m", "train")
    manifest = read_manifest(tmp_path / "m" / "valid.tsv")
    ctm = corpus / "alignments" / "dev-clean.ctm"
    ends: dict[str, float] = {}
    for line in ctm.read_text().splitlines():
        utt, _, start, duration, _ = line.split()
        ends[utt] = float(start) + float(duration)
    assert {u.split("-")[0] for u in ends} == {"102", "105"}
    for i, f in enumerate(manifest.files):
        utt = Path(f).stem
        if utt in ends:
            assert abs(ends[utt] - sf.info(str(manifest.audio_path(i))).duration) < 0.02, utt
    phones = purity.align(manifest, ctm)
    assert len(phones) == len(ends) and all((p >= 0).all() for p in phones.values())  # no gaps
    out = tmp_path / "r.json"
    assert purity.run(_args("--manifest", str(tmp_path / "m/valid.tsv"), "--alignments", str(ctm),
                            "--mfcc", "--fit-manifest", str(tmp_path / "m/train.tsv"), "-k", "8",
                            "--fit-fraction", "1", "--out", str(out))) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["pnmi"] > 0.1 and r["phones_seen"] > 15  # MFCC clusters do carry phone information
