"""The SUPERB learning-rate sweep (mt4ssl.superb.sweep): the summary (the best dev score's
learning rate and its test score) on hand-written run results, the checks before anything is
queued, one job per learning rate through submitit (its local executor: subprocesses, as
SLURM jobs run), and tools/superb_table.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mt4ssl.errors import InputError
from mt4ssl.superb import sweep

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import superb_table  # noqa: E402


def write_run(folder: Path, task: str, lr: float, dev: float | None, test: float, **extra) -> None:
    metric = {"pr": "per", "ks": "acc", "asr": "wer"}[task]
    result = {"task": task, "upstream": "mt4ssl_local", "ckpt": "/c.pt", "random_init": False, "lr": lr,
              "steps": 100, "metric": metric, "dev": dev, "test": test, "seconds": 1.5, "data": "/d", **extra}
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))


def test_summary_picks_best_dev_not_best_test(tmp_path):
    pr = tmp_path / "pr"
    write_run(pr / "lr0.01", "pr", 1e-2, dev=0.40, test=0.45)
    write_run(pr / "lr0.001", "pr", 1e-3, dev=0.30, test=0.50)  # best dev (PER: lower), worse test
    s = sweep.update_summary(pr, "pr", [1e-2, 1e-3, 1e-4], "mt4ssl superb --task pr ...")
    assert (s["lr"], s["dev"], s["test"], s["run"]) == (1e-3, 0.30, 0.50, "lr0.001")
    assert s["pending"] == ["lr0.0001"] and s["requested"] == ["lr0.0001", "lr0.001", "lr0.01"]
    assert json.loads((pr / "result.json").read_text()) == s

    ks = tmp_path / "ks"
    write_run(ks / "lr0.0001", "ks", 1e-4, dev=0.70, test=0.60)
    write_run(ks / "lr0.001", "ks", 1e-3, dev=0.80, test=0.55)  # accuracy: higher is better
    write_run(ks / "lr0.01", "ks", 1e-2, dev=None, test=0.99)  # no dev score: never picked
    s = sweep.update_summary(ks, "ks", [1e-4], "one job's command")
    assert (s["lr"], s["test"]) == (1e-3, 0.55) and s["pending"] == []
    s = sweep.update_summary(ks, "ks", [1e-2], "another job's command")
    assert s["commands"] == ["one job's command", "another job's command"]
    assert s["requested"] == ["lr0.0001", "lr0.01"]


def test_summary_rejects_mixed_runs(tmp_path):
    write_run(tmp_path / "lr0.01", "pr", 1e-2, dev=0.4, test=0.4)
    write_run(tmp_path / "lr0.001", "pr", 1e-3, dev=0.3, test=0.3, steps=200)
    with pytest.raises(InputError, match="differ in steps"):
        sweep.update_summary(tmp_path, "pr", [1e-2], "c")


def test_sweep_folder_checks(tmp_path, tiny_ckpt):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a sweep folder.*notes.txt"):
        sweep.sweep("pr", tmp_path, tmp_path, [1e-2], ckpt=tiny_ckpt)
    with pytest.raises(InputError, match="repeated learning rate"):
        sweep.sweep("pr", tmp_path, tmp_path / "new", [1e-2, 1e-2], ckpt=tiny_ckpt)
    with pytest.raises(InputError, match="--lr must be > 0"):
        sweep.sweep("pr", tmp_path, tmp_path / "new", [-1.0], ckpt=tiny_ckpt)


def test_one_job_per_run_folder(tmp_path, tiny_ckpt, monkeypatch):
    """While one job runs a learning rate, a second job on the same folder stops with an error
    naming it (and runs nothing); other rates are free; a finished (or killed) job's lock is gone."""
    import multiprocessing

    from mt4ssl.superb import runner
    from mt4ssl.utils.io import exclusive_lock

    ran = []
    monkeypatch.setattr(runner, "superb", lambda task, data, folder, lr, **o: ran.append(lr) or
                        write_run(folder, "pr", lr, dev=0.3, test=0.4))
    out = tmp_path / "pr"
    folder = sweep.lr_folder(out, 1e-2, "pr")
    started, release = multiprocessing.Event(), multiprocessing.Event()

    def hold():
        with exclusive_lock(folder, "test"):
            started.set()
            release.wait(30)

    other = multiprocessing.get_context("fork").Process(target=hold)
    other.start()
    try:
        assert started.wait(30)
        with pytest.raises(InputError, match=rf"\.lr0\.01\.lock: the SUPERB run .*lr0\.01 is being written by "
                                             rf"another process \(pid {other.pid}\)"):
            sweep.sweep("pr", tmp_path, out, [1e-2], ckpt=tiny_ckpt)
        assert ran == []
        sweep.sweep("pr", tmp_path, out, [1e-3], ckpt=tiny_ckpt)  # the lock file does not upset the check
        assert ran == [1e-3]
    finally:
        release.set()
        other.join(30)
    s = sweep.sweep("pr", tmp_path, out, [1e-2], ckpt=tiny_ckpt)
    assert ran == [1e-3, 1e-2] and s["pending"] == [] and not list(out.glob(".*.lock"))


def test_command_round_trips_through_the_cli_parser(tmp_path):
    from mt4ssl.cli import build_parser

    options = {"ckpt": tmp_path / "c.pt", "upstream": "mt4ssl_local", "random_init": True, "steps": 50,
               "eval_step": None, "batch_size": 4, "device": "cpu", "num_workers": 0, "seed": 7,
               "precision": "auto", "cache_gb": 0.5}
    argv = sweep.command("ks", tmp_path / "d", tmp_path / "o", [1e-3, 1e-4], options)
    args = build_parser("superb").parse_args(argv)
    assert args.lr == [1e-3, 1e-4] and args.random_init and args.steps == 50 and args.seed == 7
    assert {k: getattr(args, k) for k in options} == {**options, "ckpt": (tmp_path / "c.pt").resolve()}


def test_slurm_submission_checks_before_queueing(tmp_path, tiny_ckpt, capsys):
    import argparse

    from tests.conftest import WORDS, write_tree

    data = write_tree(tmp_path / "libri", {"train-clean-100": [32000, 40000], "dev-clean": [32000],
                                           "test-clean": [36000]})
    (data / "lexicon.txt").write_text("".join(f"{w}\tHH AH0 L OW1\n" for w in WORDS))
    launch = argparse.Namespace(profile="", partition="gpu", account="", qos="", constraint="", gpus_per_node=1,
                                cpus_per_task=4, mem_gb=0, timeout_min=60, max_requeues=3)
    options = {"ckpt": tiny_ckpt, "upstream": "mt4ssl_local", "random_init": False, "steps": 3,
               "eval_step": None, "batch_size": None, "device": "cpu", "num_workers": 0, "seed": 1,
               "precision": "fp32", "cache_gb": 0.0}
    with pytest.raises(InputError, match="--device cpu"):
        sweep.submit("pr", data, tmp_path / "s", [1e-2], options, launch, dry_run=True)
    with pytest.raises(InputError, match="no lexicon.txt"):
        sweep.submit("pr", tmp_path, tmp_path / "s", [1e-2], {**options, "device": "cuda"}, launch, dry_run=True)
    commands = sweep.submit("pr", data, tmp_path / "s", [1e-2, 1e-3], {**options, "device": "cuda"}, launch,
                            dry_run=True)
    assert [c[c.index("--lr") + 1] for c in commands] == ["0.01", "0.001"]
    assert all("--device" in c and c[c.index("--device") + 1] == "cuda" for c in commands)
    assert capsys.readouterr().out.count("would submit: mt4ssl superb --task pr") == 2


@pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="needs s3prl (the superb extra)")
def test_one_job_per_learning_rate(tmp_path, tiny_ckpt):
    """Two learning rates as two submitit jobs (local executor), each running `mt4ssl superb`
    for its rate through s3prl and rewriting the sweep summary under the lock."""
    import argparse

    from tests.conftest import WORDS, write_tree

    data = write_tree(tmp_path / "libri", {"train-clean-100": [32000, 40000, 36000], "dev-clean": [32000],
                                           "test-clean": [36000]})
    (data / "lexicon.txt").write_text("".join(f"{w}\tHH AH0 L OW1\n" for w in WORDS))
    launch = argparse.Namespace(profile="", partition="", account="", qos="", constraint="", gpus_per_node=0,
                                cpus_per_task=1, mem_gb=0, timeout_min=10, max_requeues=0)
    options = {"ckpt": tiny_ckpt, "upstream": "mt4ssl_local", "random_init": False, "steps": 2,
               "eval_step": 2, "batch_size": 2, "device": "cpu", "num_workers": 0, "seed": 1, "precision": "fp32",
               "cache_gb": 1.0}
    out = tmp_path / "sweep"
    jobs = sweep.submit("pr", data, out, [1e-2, 1e-3], options, launch, cluster="local")
    assert len(jobs) == 2
    for job in jobs:
        assert job.exception() is None, job.stderr()
    summary = json.loads((out / "result.json").read_text())
    assert sorted(r["folder"] for r in summary["runs"]) == ["lr0.001", "lr0.01"] and summary["pending"] == []
    assert len(summary["commands"]) == 2  # one per job
    assert sweep.submit("pr", data, out, [1e-2, 1e-3], options, launch, cluster="local") == []  # all done


def test_table(tmp_path, monkeypatch):
    for label, task, lr, test in (("tiny", "pr", 1e-2, 0.5123), ("tiny", "ks", 1e-3, 0.25), ("fbank", "pr", 1e-2, 0.6)):
        write_run(tmp_path / label / task / f"lr{lr:g}", task, lr, dev=test, test=test)
        sweep.update_summary(tmp_path / label / task, task, [lr], f"mt4ssl superb --task {task} --data {tmp_path}/d")
    monkeypatch.chdir(tmp_path)  # paths below the current folder are shown relative to it
    out = tmp_path / "t.md"
    runs = [f"tiny={tmp_path / 'tiny' / 'pr'}", f"tiny={tmp_path / 'tiny' / 'ks'}", f"fbank={tmp_path / 'fbank' / 'pr'}"]
    assert superb_table.main([x for r in runs for x in ("--run", r)] + ["--out", str(out), "--command", "make demo"]) == 0
    md = out.read_text()
    assert "Made by: `make demo`" in md and "| tiny | measured | 51.23 (lr 0.01) | 25.00 (lr 0.001) |" in md
    assert "| fbank | measured | 60.00 (lr 0.01) | — |" in md
    assert "| HuBERT Base (LS 960 h), published | published | 5.41 | 96.30 |" in md
    assert "`mt4ssl superb --task pr --data d`" in md and str(tmp_path) not in md.split("Runs (")[1]
    rows = list(csv.reader(out.with_suffix(".csv").open()))
    assert rows[0] == ["upstream", "source", "PR PER %", "pr lr", "KS acc %", "ks lr"]
    assert rows[1] == ["tiny", "measured", "51.23", "0.01", "25.00", "0.001"]
    assert superb_table.main(["--run", f"x={tmp_path}", "--out", str(out)]) == 2  # not a sweep folder
    with pytest.raises(InputError, match="two sweeps of task pr"):
        superb_table.collect([("a", tmp_path / "tiny" / "pr"), ("a", tmp_path / "fbank" / "pr")])
