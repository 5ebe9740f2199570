"""tools/wer_table.py: the LibriSpeech WER table from hand-written `mt4ssl decode` jsons."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tools import wer_table


def decode_json(folder: Path, subset: str, viterbi: float, beam: float | None = None, lm: str | None = "lm.arpa",
                ckpt: str | None = None, words: int = 100) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    decoders = {"viterbi": {"wer": viterbi, "cer": viterbi / 3, "words": words}}
    if beam is not None:
        decoders["beam"] = {"wer": beam, "cer": beam / 3, "words": words, "lm": lm, "lexicon": "lexicon.txt",
                            "lm_weight": 2.0, "word_score": -1.0, "beam": 500}
    result = {"subset": subset, "ckpt": ckpt, "manifest": f"m/{subset}.tsv",
              "command": f"mt4ssl decode --subsets {subset} --out {folder}", "decoders": decoders}
    (folder / f"{subset}.json").write_text(json.dumps(result))


def finetune_run(root: Path, updates: int, random_init: bool) -> str:
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(
        f"model:\n  random_init: {str(random_init).lower()}\nrun:\n  max_updates: {updates}\n"
        f"  init_from: exp/pretrain/checkpoints/checkpoint_last.pt\n")
    return str(root / "checkpoints" / "checkpoint_best.pt")


def test_rows_columns_published_and_csv(tmp_path, capsys):
    pre = finetune_run(tmp_path / "ft_pre", 800, False)
    rnd = finetune_run(tmp_path / "ft_rnd", 800, True)
    decode_json(tmp_path / "pre", "dev-clean", 61.25, 40.5, ckpt=pre, words=321)
    decode_json(tmp_path / "pre", "test-clean", 63.0, 42.25, ckpt=pre)
    decode_json(tmp_path / "rnd", "dev-clean", 97.0, 90.0, ckpt=rnd)
    decode_json(tmp_path / "rnd", "test-clean", 98.0, 91.0, ckpt=rnd)
    out = tmp_path / "results" / "wer.md"
    assert wer_table.main(["--out", str(out), "--command", "make reproduce",
                           "--run", "tiny MT4SSL", "10 min", str(tmp_path / "pre"),
                           "--run", "random init", "10 min", str(tmp_path / "rnd")]) == 0
    md = out.read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "Command: `make reproduce`" in md and "Machine: " in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| model | split | decoding | dev-clean WER % | dev-other WER % | test-clean WER % "
                        "| test-other WER % | CER % | source |")
    # one row per model, split and decoding: Viterbi first, then the LM beam search; one note each model and split
    assert lines[1] == ("| tiny MT4SSL | 10 min | Viterbi (greedy), no LM | 61.2 | – | 63.0 | – "
                        "| dev-clean 20.4, test-clean 21.0 | measured [1] |")
    assert lines[2] == ("| tiny MT4SSL | 10 min | beam + LM `lm.arpa` (lm_weight 2, word_score -1, beam 500)"
                        " | 40.5 | – | 42.2 | – | dev-clean 13.5, test-clean 14.1 | measured [1] |")
    assert lines[3].startswith("| random init | 10 min | Viterbi (greedy), no LM | 97.0 | – | 98.0 | – |")
    assert lines[3].endswith("| measured [2] |")
    assert "| 90.0 | – | 91.0 | – | dev-clean 30.0, test-clean 30.3 | measured [2] |" in lines[4]
    # published MT4SSL: its two figures; split and LM said to be unknown, not invented
    mt4ssl = next(line for line in lines if line.startswith("| MT4SSL Base"))
    assert mt4ssl.count("not stated in the sources read") == 2
    assert "| – | – | 3.4 | 9.6 | – | published:" in mt4ssl
    assert all(("| published" in line) != ("measured [" in line) for line in lines[1:])
    # what made each measured row: the fine-tuning run (updates, init) and the decode command
    assert f"fine-tuning `{tmp_path / 'ft_pre'}` (800 updates from exp/pretrain/checkpoints/checkpoint_last.pt" in md
    assert f"fine-tuning `{tmp_path / 'ft_rnd'}` (800 updates from random init" in md
    note = next(line for line in md.splitlines() if line.startswith("1. tiny MT4SSL, 10 min: "))
    assert f"`mt4ssl decode --subsets dev-clean --out {tmp_path / 'pre'}`" in note
    assert f"`mt4ssl decode --subsets test-clean --out {tmp_path / 'pre'}`" in note
    assert "reference words: dev-clean 321, test-clean 100" in md

    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    measured = [r for r in rows if r["source"] == "measured"]
    assert [(r["model"], r["decoding"].split()[0]) for r in measured] == [
        ("tiny MT4SSL", "Viterbi"), ("tiny MT4SSL", "beam"), ("random init", "Viterbi"), ("random init", "beam")]
    assert measured[0]["dev-clean_wer"] == "61.2" and measured[0]["dev-other_wer"] == ""
    assert measured[1]["test-clean_cer"] == "14.1" and measured[1]["fine_tuning_updates"] == "800"
    published = {r["model"]: r for r in rows if r["source"] == "published"}
    assert published["MT4SSL Base (LibriSpeech 960 h)"]["test-other_wer"] == "9.6"
    assert published["MT4SSL Base (LibriSpeech 960 h)"]["split"] == "not stated in the sources read"


def test_lexicon_only_beam_other_subsets_and_no_runs(tmp_path):
    decode_json(tmp_path / "a", "dev-other", 50.0, 45.0, lm=None)
    decode_json(tmp_path / "a", "train-10m", 20.0)
    out = tmp_path / "wer.md"
    assert wer_table.main(["--out", str(out), "--run", "m", "1 h", str(tmp_path / "a")]) == 0
    md = out.read_text()
    assert "| m | 1 h | beam, lexicon only, no LM (beam 500) | – | 45.0 | – | – | – | dev-other 15.0 |" in md
    # a subset outside the four gets its own column after them
    assert "| test-other WER % | train-10m WER % | CER % | source |" in md
    assert ("| m | 1 h | Viterbi (greedy), no LM | – | 50.0 | – | – | 20.0 | dev-other 16.7, train-10m 6.7 "
            "| measured [1] |") in md
    assert "decode command not recorded" not in md
    # only the published rows
    assert wer_table.main(["--out", str(out)]) == 0
    assert "measured" not in out.read_text() and "| MT4SSL Base" in out.read_text()


@pytest.mark.parametrize("content, message", [
    (None, "no {subset}.json"),
    ("{not json", "not a readable decode result"),
    (json.dumps({"subset": "dev-clean"}), "no 'subset' and 'decoders'"),
    (json.dumps({"subset": "dev-clean", "decoders": {"viterbi": {"cer": 1.0}}}), "has no numeric 'wer'"),
    (json.dumps({"subset": "dev-clean", "decoders": {"beam": {"wer": 1.0}}}), "no 'viterbi' result"),
])
def test_bad_inputs_are_clear_errors(tmp_path, capsys, content, message):
    folder = tmp_path / "d"
    folder.mkdir()
    if content is not None:
        (folder / "dev-clean.json").write_text(content)
    assert wer_table.main(["--out", str(tmp_path / "w.md"), "--run", "m", "10 min", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wer_table: error: ") and message in err
    assert not (tmp_path / "w.md").exists()


def test_a_model_and_split_given_twice_is_an_error(tmp_path, capsys):
    decode_json(tmp_path / "a", "dev-clean", 50.0)
    args = ["--out", str(tmp_path / "w.md"), "--run", "m", "10 min", str(tmp_path / "a")]
    assert wer_table.main(args + ["--run", "m", "10 min", str(tmp_path / "a")]) == 2
    assert "given twice" in capsys.readouterr().err
