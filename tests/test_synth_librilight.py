"""tools/synth_librilight.py (a Libri-light layout of a synthetic train split) and
`mt4ssl manifest-limited --splits` reading it."""

from __future__ import annotations

import json

from mt4ssl.cli import main
from mt4ssl.data.manifest import read_manifest
from tests.conftest import write_tree
from tools import synth_librilight


def test_sets_of_every_speaker_then_manifests_of_the_chosen_splits(tmp_path, capsys):
    # speakers 100 and 101 alternate; 1 s, 1.5 s, 1 s, ... utterances
    lengths = [16000 if u % 4 < 2 else 24000 for u in range(14)]
    corpus = write_tree(tmp_path / "corpus", {"train-clean-100": lengths, "dev-clean": [20000, 20000]})
    out = tmp_path / "librispeech_finetuning"
    # 6 sets of at least 2 s: each gets one utterance of each speaker per round
    assert synth_librilight.main([str(corpus / "train-clean-100"), str(out), "--minutes", str(2 / 60)]) == 0
    layout = json.loads((out / "layout.json").read_text())["sets"]
    assert list(layout) == [f"1h/{k}" for k in range(6)] + ["9h"]
    assert layout["1h/0"]["utterances"] == ["100-10-0000", "101-10-0001"]
    assert layout["1h/1"]["utterances"] == ["100-10-0002", "101-10-0003"]
    assert layout["1h/5"]["utterances"] == ["100-10-0010", "101-10-0011"]
    assert [layout[f"1h/{k}"]["seconds"] for k in range(6)] == [2.0, 3.0] * 3
    assert layout["9h"]["utterances"] == ["100-10-0012", "101-10-0013"]
    every = [u for s in layout.values() for u in s["utterances"]]
    assert sorted(every) == sorted(set(every)) and len(every) == 14
    link = out / "1h" / "1" / "clean" / "101" / "10" / "101-10-0003.flac"
    assert link.is_symlink() and link.read_bytes() == (corpus / "train-clean-100/101/10/101-10-0003.flac").read_bytes()
    trans = (corpus / "train-clean-100/101/10/101-10.trans.txt").read_text().splitlines()
    assert (out / "1h/1/clean/101/10/101-10.trans.txt").read_text().splitlines() == [trans[1]]
    assert "1h/0: 2 utterances, 0.0 min, 2 speakers" in capsys.readouterr().out

    # only the chosen splits; 9h, dev-other, test-* are not needed
    m = tmp_path / "m"
    assert main(["manifest-limited", "--librilight", str(out), "--librispeech", str(corpus),
                 "--splits", "train-10m,train-1h,dev-clean", "--out", str(m)]) == 0
    assert sorted(p.name for p in m.glob("*.tsv")) == ["dev-clean.tsv", "train-10m.tsv", "train-1h.tsv"]
    ten = read_manifest(m / "train-10m.tsv")
    assert list(ten.sizes) == [16000, 16000] and all(ten.audio_path(i).is_file() for i in range(len(ten)))
    assert sorted(read_manifest(m / "train-1h.tsv").sizes) == sorted(lengths[:12])
    words = (m / "train-1h.wrd").read_text().split() + (m / "dev-clean.wrd").read_text().split()
    assert {line.split()[0] for line in (m / "dict.ltr.txt").read_text().splitlines()} == set("".join(words)) | {"|"}
    capsys.readouterr()
    assert main(["manifest-limited", "--librilight", str(out), "--librispeech", str(corpus),
                 "--splits", "train-10h,dev-other", "--out", str(m)]) == 2
    err = capsys.readouterr().err
    assert str(corpus / "dev-other") in err and str(out / "9h") not in err  # 9h is there (the rest)
    assert main(["manifest-limited", "--librilight", str(out), "--librispeech", str(corpus),
                 "--splits", "train-2h", "--out", str(m)]) == 2
    assert "unknown split(s) train-2h" in capsys.readouterr().err


def test_not_enough_audio_and_existing_output_are_errors(tmp_path, capsys):
    corpus = write_tree(tmp_path / "corpus", {"train-clean-100": [16000] * 4})
    assert synth_librilight.main([str(corpus / "train-clean-100"), str(tmp_path / "ll"), "--sets", "6"]) == 2
    err = capsys.readouterr().err
    assert "0.00 h of audio, 6 sets of 10 min need 1.00 h" in err and "mt4ssl synth-corpus --hours" in err
    assert not (tmp_path / "ll").exists()
    (tmp_path / "ll").mkdir()
    assert synth_librilight.main([str(corpus / "train-clean-100"), str(tmp_path / "ll"), "--sets", "2",
                                  "--minutes", str(1 / 60)]) == 2
    assert "exists" in capsys.readouterr().err
    assert synth_librilight.main([str(tmp_path / "nope"), str(tmp_path / "ll2")]) == 2
    assert "not a folder" in capsys.readouterr().err
