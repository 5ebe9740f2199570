"""tools/reproduce_table.py: the `make reproduce` table and plot from run folders."""

from __future__ import annotations

import json
from pathlib import Path

from tools import reproduce_table


def purity_result(accuracies: list[float], fit: list[float], pnmi: list[float]) -> dict:
    return {"results": [{"layer": i, "pnmi": p, "classifier": {"accuracy": a, "fit_accuracy": f}}
                        for i, (a, f, p) in enumerate(zip(accuracies, fit, pnmi))]}


def write_run(folder: Path, final_acc: float, per: float, ce: float | None) -> None:
    folder.mkdir(parents=True)
    rows = [{"update": 5, "loss": 9.0, "time": 100.0},
            {"update": 10, "loss": 8.0, "time": 220.0, "valid_loss": 8.5,
             **({"valid_loss_mfcc100": ce} if ce is not None else {}), "valid_loss_teacher": 4.0}]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # layer 1 has the best training accuracy: its evaluation accuracy is the one reported,
    # even though layer 0 scores higher on the evaluation frames
    (folder / "probe_5.json").write_text(json.dumps(purity_result([0.3, 0.2], [0.1, 0.4], [0.1, 0.2])))
    (folder / "probe_10.json").write_text(json.dumps(
        purity_result([0.9, final_acc], [0.1, 0.5], [0.3, 0.25])))
    (folder / "ctc_probe.json").write_text(json.dumps({"per": {"valid": per, "test": per + 0.01}}))


def test_table_and_plot(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs / "mt4ssl-seed1", 0.30, 0.70, 4.0)
    write_run(runs / "mt4ssl-seed2", 0.34, 0.74, 4.2)
    write_run(runs / "hubert_like-seed1", 0.28, 0.80, 4.1)
    write_run(runs / "data2vec_like-seed1", 0.22, 0.85, None)
    (runs / "data2vec_like-seed1" / "collapsed.txt").write_text("training collapsed at update 7: target_std = 0.05 < 0.1\n")
    (runs / "random_init_probe.json").write_text(json.dumps(purity_result([0.18], [0.2], [0.21])))
    (runs / "random_init_ctc.json").write_text(json.dumps({"per": {"valid": 0.896, "test": 0.891}}))
    (runs / "mfcc_probe.json").write_text(json.dumps(purity_result([0.584], [0.6], [0.452])))
    out = tmp_path / "reproduce.md"
    assert reproduce_table.main(["--runs", str(runs), "--command", "make reproduce", "--out", str(out),
                                 "--seconds", "600"]) == 0
    md = out.read_text()
    assert "Command: `make reproduce`" in md and "Wall time of this invocation: 10.0 min" in md
    # mean ± half range over the two seeds; layer picked by training accuracy (layer 1)
    assert "| MT4SSL (k-means + teacher) | 1 2 | 10 | 32.0 ± 2.0 | 0.300 ± 0.000 | 72.0 ± 2.0 | 73.0 ± 2.0 " \
           "| 4.100 ± 0.100 | 4.000 ± 0.000 | 2.0 ± 0.0 |" in md
    assert "| data2vec-like (teacher only) | 1 | 10 | 22.0 | 0.300 | 85.0 | 86.0 | – | 4.000 | 2.0 |" in md
    assert "| same architecture, random init | – | 0 | 18.0 | 0.210 | 89.6 | 89.1 |" in md
    assert "| MFCC (39-d), no model | – | – | 58.4 | 0.452 |" in md
    assert "| MT4SSL (k-means + teacher) | 20.0 | 32.0 |" in md  # the per-checkpoint table
    assert "data2vec-like (teacher only), seed 1: **training collapsed at update 7: target_std = 0.05 < 0.1**" in md
    assert "MT4SSL (k-means + teacher), seed" not in md  # finished runs have no such line
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".png"))]


def test_missing_pieces_are_clear_errors(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    assert reproduce_table.main(["--runs", str(runs), "--command", "c", "--out", str(tmp_path / "r.md")]) == 2
    assert "no <variant>-seed<S> run folders" in capsys.readouterr().err
    write_run(runs / "mt4ssl-seed1", 0.3, 0.7, 4.0)
    assert reproduce_table.main(["--runs", str(runs), "--command", "c", "--out", str(tmp_path / "r.md")]) == 2
    assert "random_init_probe.json: not found" in capsys.readouterr().err
    (runs / "random_init_probe.json").write_text(json.dumps({"results": [{"layer": 0, "pnmi": 0.2}]}))
    (runs / "random_init_ctc.json").write_text("{}")
    (runs / "mfcc_probe.json").write_text("{}")
    assert reproduce_table.main(["--runs", str(runs), "--command", "c", "--out", str(tmp_path / "r.md")]) == 2
    assert "no classifier results" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
