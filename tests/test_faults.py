"""Faults: the fast cases of benchmarks/faults.py (which writes results/reliability.md with
more injections), and the fixes they needed.

kill -9 of the pretraining (also mid-checkpoint-write) and of the CTC fine-tuning, and exact
resume; a file-size limit while saving; shard and label jobs killed mid-write, and two workers
on one shard; on a real single-node SLURM cluster (tools/slurm_local.py, started here when
root with slurm-wlm and munge installed, else skipped saying why): a stage chain in dependency
order, a failed stage cancelling its dependants, submitit's preemption signal (`scancel
--signal=USR2`), a real preemption by a higher-priority job (SIGTERM, SIGKILL, requeue) and a
time limit hit mid-run; SIGTERM to a run's process group; a killed `mt4ssl superb` sweep rerun.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import faults
from mt4ssl.errors import InputError
from mt4ssl.features.dump import dump_shard, mfcc_kind, shard_lock
from mt4ssl.kmeans.apply import locked_output
from mt4ssl.train.log import TrainLog
from tools import slurm_local

KILL_UPDATES = 40  # the runs killed here (and their uninterrupted reference)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def data(work) -> Path:
    return faults.prepare(work / "data")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setitem(faults.ENV, "OMP_NUM_THREADS", "1")


# ----------------------------------------------------------------------------- the fixes


def test_checkpoint_write_failure_says_what_happened(tmp_path):
    """A file-size limit below the checkpoint's size (a full disk fails the same write): the
    error says the write failed and why, the previous files stay as they were, no partial file."""
    child = textwrap.dedent(f"""
        import resource, signal, torch
        from mt4ssl.train.checkpoint import CheckpointDir
        ckpt = CheckpointDir({str(tmp_path)!r})
        ckpt.save({{"num_updates": 1, "w": torch.ones(1000)}}, 1, numbered=True)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        ckpt.save({{"num_updates": 2, "w": torch.ones(100000)}}, 2, numbered=True)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mt4ssl.models.checkpoint.CheckpointWriteError: [Errno 27] ")
    assert f"{tmp_path / 'checkpoint_2.pt'}: writing the checkpoint failed: File too large" in last
    assert "disk full" in last and "nothing was replaced" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1.pt", "checkpoint_last.pt"]
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert state["num_updates"] == 1 and torch.equal(state["w"], torch.ones(1000))


def test_a_resumed_run_drops_what_an_interrupted_attempt_logged(tmp_path):
    rows = [json.dumps({"update": u, "loss": float(u)}) + "\n" for u in range(1, 7)]
    (tmp_path / "log.jsonl").write_text("".join(rows) + '{"update": 7, "lo')  # torn by a kill
    TrainLog(tmp_path, total=10, start=4).close()  # resumed from the checkpoint of update 4
    assert (tmp_path / "log.jsonl").read_text() == "".join(rows[:4])
    TrainLog(tmp_path, total=10, start=0).close()  # no checkpoint: everything is done again
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_second_worker_on_a_shard_or_labels_is_refused(libri_tree, tmp_path):
    from mt4ssl.cli import main

    assert main(["manifest", str(libri_tree), "--out", str(tmp_path / "m"), "--splits", "train"]) == 0
    feats = tmp_path / "f"
    with shard_lock(feats / "train_1_2", "shard 1/2 of train"):  # another job writes shard 1
        with pytest.raises(InputError, match=rf"\.train_1_2\.lock: shard 1/2 of train is being written by "
                                             rf"another process \(pid {os.getpid()}\)"):
            dump_shard(mfcc_kind(), tmp_path / "m/train.tsv", feats, "train", 1, 2, progress=False)
        dump_shard(mfcc_kind(), tmp_path / "m/train.tsv", feats, "train", 0, 2, progress=False)  # another shard
    assert not (feats / "train_1_2.npy").exists() and (feats / "train_0_2.json").is_file()
    dump_shard(mfcc_kind(), tmp_path / "m/train.tsv", feats, "train", 1, 2, progress=False)  # released
    assert (feats / "train_1_2.json").is_file()

    out = tmp_path / "lab"
    out.mkdir()
    (out / ".train.km.abcd1234.tmp").write_text("left by a killed job")
    with locked_output(out / "train.km", "the labels of train") as f:
        assert not (out / ".train.km.abcd1234.tmp").exists()
        with pytest.raises(InputError, match=r"\.train\.km\.lock: the labels of train is being written"):
            with locked_output(out / "train.km", "the labels of train"):
                pass
        f.write("0 1\n")
    assert (out / "train.km").read_text() == "0 1\n"


# ----------------------------------------------------------------------------- injected faults


def test_kill9_during_training_and_checkpoint_writes_resumes_exactly(work, data):
    r = faults.kill9(work, data, kills=4, updates=KILL_UPDATES, most=6)
    assert r["kills"] == 4 and r["kill_modes"]["checkpoint write"] == 2
    assert r["corrupt"] == [] and r["checkpoint_files_checked"] > 0
    assert r["during_checkpoint_write"] >= 1, r["attempts"]  # killed with a partial checkpoint file
    assert r["wrong_resumes"] == 0 and r["fresh_starts_with_a_checkpoint"] == 0 and r["progress_lost"] == 0
    assert r["resumed"] + r["killed_before_resuming"] == r["resumable"] and r["resumed"] >= 1
    assert r["all_updates_made"] and r["log_updates_once_each"]
    assert r["losses_equal"] and r["final_weights"] and r["final_optimizer"] and r["final_rest"]


def test_kill9_of_the_finetuning_resumes_exactly(work, data):
    r = faults.kill9(work, data, kills=2, updates=KILL_UPDATES, most=6, command="finetune")
    assert r["kills"] == 2 and r["corrupt"] == [] and r["wrong_resumes"] == 0 and r["progress_lost"] == 0
    assert r["all_updates_made"] and r["log_updates_once_each"]
    assert r["losses_equal"] and r["final_weights"] and r["final_optimizer"] and r["final_rest"]


def test_sigterm_to_the_process_group_saves_and_stops(work, data):
    """SIGTERM to every process of the run, as SLURM stops a job: the DataLoader worker must
    not die of it (torch then raised in the training process, even mid-save, and nothing was
    saved); the trainer saves at the end of the update and stops; the rerun resumes there."""
    import signal

    r = faults.kill9(work, data, kills=2, updates=KILL_UPDATES, most=6, sig=signal.SIGTERM)
    assert set(r["exits"]) <= {3, -signal.SIGTERM}, r["attempts"]  # 3: saved and stopped
    assert all(a["exit"] == 3 for a in r["attempts"] if a["mode"] != "start-up"), r["attempts"]
    assert r["corrupt"] == [] and r["updates_redone"] == 0 and r["wrong_resumes"] == 0
    assert r["all_updates_made"] and r["log_updates_once_each"]
    assert r["losses_equal"] and r["final_weights"] and r["final_optimizer"]


def test_disk_full_while_saving_keeps_the_checkpoints(work, data):
    r = faults.disk_full(work, data, times=1, updates=KILL_UPDATES)
    assert r["injected"] == r["survived"] == 1, r["injections"]
    assert "writing the checkpoint failed: File too large" in r["message"] and r["corrupt"] == []
    assert r["losses_equal"] and r["final_weights"] and r["final_optimizer"]


def test_killed_shard_and_label_jobs_rerun_to_identical_files(work):
    r = faults.shards(work, nshard=2, rounds=1)
    assert r["kills"] == 3 and r["mid_write"] >= 1
    assert r["features_equal"] and r["labels_equal"] and r["leftover_tmp_after_reruns"] == []
    two = r["second_worker"]
    assert two["exit"] == 2 and two["first_pid_named"] and "is being written by another process" in two["message"][0]
    assert two["first_exit"] == 0 and two["output_equal"] and two["rerun_after"][0].endswith("already done, kept")


def test_superb_resume_skips_states_cut_off_by_a_kill(tmp_path):
    """s3prl writes its states files in place: a kill during the write leaves a truncated
    states-N.ckpt, and the rerun resumed from it and crashed (torch: "failed finding central
    directory"). The resume takes the newest whole one."""
    from mt4ssl.superb import runner

    settings = {"task": "pr", "lr": 0.01}
    (tmp_path / runner.RUN_FILE).write_text(json.dumps(settings))
    torch.save({"step": 1}, tmp_path / "states-1.ckpt")
    torch.save({"step": 2, "w": torch.ones(1000)}, tmp_path / "states-2.ckpt")
    whole = (tmp_path / "states-2.ckpt").read_bytes()
    (tmp_path / "states-2.ckpt").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "dev-best.ckpt").write_bytes(whole[:100])
    assert runner._prepare_out(tmp_path, settings) == tmp_path / "states-1.ckpt"
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["states-1.ckpt"]
    (tmp_path / "states-1.ckpt").write_bytes(b"")  # none whole: start again (the folder emptied)
    assert runner._prepare_out(tmp_path, settings) is None and not any(tmp_path.iterdir())


@pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="needs s3prl (the superb extra)")
def test_killed_superb_sweep_keeps_finished_rates_and_resumes(work, tiny_ckpt):
    r = faults.superb_sweep(work, tiny_ckpt)
    assert r["killed"] and r["first_finished"] and not r["second_finished"] and r["second_states"]
    assert r["rerun_exit"] == 0, r["rerun_tail"]
    assert r["first_kept"] and r["first_kept_logged"]  # the finished rate was not run again
    whole = [s for s in r["second_states"] if s not in r["states_cut_off"]]
    assert r["second_resumed_from"] == whole[-1:]  # the newest whole states, or the start
    assert r["runs"] == ["lr0.001", "lr0.01"] and r["pending"] == []


# ----------------------------------------------------------------------------- a real SLURM cluster


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_local.why_not()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    try:
        with slurm_local.running() as cluster:
            yield cluster
    except slurm_local.Unavailable as e:
        pytest.skip(f"no local SLURM cluster: {e}")


def test_slurm_chain_in_order_and_a_failed_stage_cancels_its_dependants(slurm, work, data):
    r = faults.slurm_chain(work, data)
    assert r["chain"]["states"] == [["COMPLETED"], ["COMPLETED", "COMPLETED"], ["COMPLETED"]]
    assert r["chain"]["in_order"] and r["chain"]["outputs"]
    f = r["failing"]
    assert f["states"] == ["FAILED", "CANCELLED", "CANCELLED"] and f["reasons"][1:] == ["DependencyNeverSatisfied"] * 2
    assert f["dependants_never_ran"] and f["error_names_command"] and f["no_output"]


def test_slurm_preemption_saves_requeues_and_resumes_exactly(slurm, work, data):
    r = faults.slurm_preemption(work, data, updates=KILL_UPDATES)
    assert r["state"] == "COMPLETED" and r["restarts"] == 1 and r["saved_on_signal"] and r["corrupt"] == []
    assert len(r["attempts"]) == 2 and r["resumed_at"] == [r["attempts"][0][1]]
    assert r["no_update_lost_or_repeated"] and r["log_updates_once_each"]
    assert r["losses_equal"] and r["final_weights"] and r["final_optimizer"]


def test_slurm_real_preemption_saves_at_sigterm_and_resumes(slurm, work, data):
    """A job of the higher-priority partition preempts the run: SLURM sends SIGTERM (submitit
    only logs it), SIGKILL after GraceTime, and requeues the job. The trainer saved at the
    SIGTERM (before: nothing, and the requeued job started again from update 0)."""
    r = faults.slurm_priority_preemption(work, data)
    assert r["preempted"] and r["urgent_state"] == "COMPLETED" and r["restarts"] >= 1
    assert r["saved_on_sigterm"] and r["resumed_at"][0] == r["saved_on_sigterm"] == r["attempts"][0][1]
    assert r["no_update_lost_or_repeated"] and r["log_updates_once_each"] and r["losses_equal"]
    assert r["corrupt"] == []


def test_slurm_time_limit_mid_run_saves_requeues_and_resumes(slurm, work, data):
    r = faults.slurm_timeout(work, data)
    assert r["restarts"] >= 1 and r["time_limit"] == "00:01:00" and r["warning_after_s"] is not None
    assert r["saved_at_signal"] > 0 and r["corrupt"] == []  # the warning came mid-run (nothing here signalled it)
    assert r["resumed_at"][0] == r["saved_at_signal"] == r["attempts"][0][1]
    assert r["no_update_lost_or_repeated"] and r["log_updates_once_each"] and r["losses_equal"]
