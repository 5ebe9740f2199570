"""mt4ssl.launch: executors from profiles, launch, TrainJob, preemption/requeue, stage chains.

These run on any machine: SLURM executors are built with a fake `srun`/`sbatch`/`scontrol` on
PATH (the sbatch scripts submitit writes are read back: GPUs, several nodes, accounts and
profiles that a one-node CPU cluster cannot show); jobs run through submitit's "debug" executor
(in process) and "local" executor (subprocesses, with the same signal handling as on SLURM).
The same jobs on a real SLURM cluster (dependency order, a failed stage cancelling the rest,
preemption and time-limit requeue and resume): tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mt4ssl.config import config_from_dict
from mt4ssl.errors import InputError
from mt4ssl.launch import (PlannedJob, Stage, StageError, TrainJob, distributed_env, executor_for, launch,
                           submit_chain)
from mt4ssl.launch.submit import master_port
from mt4ssl.train.config import LaunchConfig, PretrainConfig

REPO = Path(__file__).resolve().parents[1]
TARGETS = "tests.launch_targets"

PROFILE = """\
partition: gpu
account: speech
qos: normal
constraint: a100
gpus_per_node: 8
cpus_per_task: 12
mem_gb: 480
timeout_min: 4320
setup: ["export NCCL_DEBUG=WARN"]
extra: {exclusive: true, mail_type: END}
"""


@pytest.fixture(autouse=True)
def importable_targets(monkeypatch):
    """`tests.launch_targets` importable here and in job subprocesses (which copy os.environ)."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """`srun` (runs its command: lets submitit build a SLURM executor, and the templates run),
    `sbatch` (prints increasing job ids), `scontrol` (show hostnames; logs the rest) on PATH."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"',
        "sbatch": f'n=$(( $(cat {bin_dir}/ids 2>/dev/null || echo 1000) + 1 )); echo $n > {bin_dir}/ids\n'
                  'echo "Submitted batch job $n"',
        "scontrol": f'if [ "$1" = show ]; then echo gpu07; echo gpu08; else echo "$@" >> {bin_dir}/scontrol.log; fi',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def pretrain_cfg(tmp_path, **launch) -> PretrainConfig:
    return config_from_dict(PretrainConfig, {"data": {"manifest_dir": str(tmp_path / "manifests")},
                                             "run": {"out_dir": str(tmp_path / "exp")}, "launch": launch})


def sbatch_text(executor, map_count=None) -> str:
    inner = executor._executor
    params = dict(inner.parameters, **({"map_count": map_count} if map_count else {}))
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="python -m submitit.core._submit", folder=inner.folder, **params)


def wait_for(predicate, what: str, timeout: float = 60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def progress(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- executors

def test_executor_profile_and_overrides(tmp_path, fake_slurm):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(PROFILE)
    # nodes, partition, timeout and extra are set; cpus_per_task is left at LaunchConfig's
    # default (10), so the profile's 12 applies
    cfg = LaunchConfig(launcher="slurm", profile=str(profile), nodes=2, partition="preempt", timeout_min=60,
                       max_requeues=7, extra={"comment": "mt4ssl run"})
    ex = executor_for(cfg, tmp_path / "slurm", name="mt4ssl-base")
    p = ex._executor.parameters
    assert ex.cluster == "slurm" and ex._executor.max_num_timeout == 7
    assert {k: p[k] for k in ("nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "mem", "time",
                              "partition", "account", "qos", "constraint", "signal_delay_s", "job_name")} == {
        "nodes": 2, "ntasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 12, "mem": "480GB",
        "time": 60, "partition": "preempt", "account": "speech", "qos": "normal", "constraint": "a100",
        "signal_delay_s": 120, "job_name": "mt4ssl-base"}
    text = sbatch_text(ex)
    for line in ["--partition=preempt", "--account=speech", "--qos=normal", "--constraint=a100", "--nodes=2",
                 "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=12", "--mem=480GB",
                 "--time=60", "--signal=USR2@120", "--requeue", "--exclusive", "--mail-type=END",
                 "--comment='mt4ssl run'", "--job-name=mt4ssl-base"]:
        assert f"#SBATCH {line}\n" in text, line
    assert "export NCCL_DEBUG=WARN" in text
    assert "srun --unbuffered" in text and "--kill-on-bad-exit=0 " in text  # rank 0 may still be saving


def test_example_profile_by_name(tmp_path, fake_slurm):
    ex = executor_for(LaunchConfig(launcher="slurm", profile="example"), tmp_path / "slurm")
    p = ex._executor.parameters
    assert (p["gpus_per_node"], p["ntasks_per_node"], p["cpus_per_task"], p["mem"], p["time"]) == \
        (8, 8, 10, "480GB", 4320)
    assert "#SBATCH --partition=" in sbatch_text(ex) and "#SBATCH --requeue\n" in sbatch_text(ex)


def test_cpu_job_and_dropped_option(tmp_path, fake_slurm):
    ex = executor_for(LaunchConfig(launcher="slurm", extra={"requeue": False}), tmp_path / "slurm")
    text = sbatch_text(ex)
    assert "#SBATCH --ntasks-per-node=1\n" in text
    assert "--gpus-per-node" not in text and "--requeue" not in text and "--mem" not in text


def test_profile_errors(tmp_path, fake_slurm):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PROFILE + "partitoin: typo\n")
    with pytest.raises(InputError, match=r"bad\.yaml.*unknown key.*partitoin"):
        executor_for(LaunchConfig(launcher="slurm", profile=str(bad)), tmp_path / "slurm")
    bad.write_text("gpus_per_node: eight\n")
    with pytest.raises(InputError, match=r"bad\.yaml\.gpus_per_node: expected int"):
        executor_for(LaunchConfig(launcher="slurm", profile=str(bad)), tmp_path / "slurm")
    bad.write_text("extra: {time: 10}\n")
    with pytest.raises(InputError, match=r"bad\.yaml: extra\.time: .*timeout_min"):
        executor_for(LaunchConfig(launcher="slurm", profile=str(bad)), tmp_path / "slurm")
    with pytest.raises(InputError, match=r"launch\.profile 'nosuchcluster'.*nosuchcluster\.yaml"):
        executor_for(LaunchConfig(launcher="slurm", profile="nosuchcluster"), tmp_path / "slurm")
    with pytest.raises(InputError, match=r"launch\.extra\.ntasks_per_node"):
        executor_for(LaunchConfig(launcher="slurm", extra={"ntasks_per_node": 2}), tmp_path / "slurm")


def test_no_srun_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="srun"):
        executor_for(LaunchConfig(launcher="slurm"), tmp_path / "slurm")


# ----------------------------------------------------------------------------- launch / TrainJob

def test_launch_local_calls_target_here(tmp_path):
    out = launch(pretrain_cfg(tmp_path), target=f"{TARGETS}:record")
    assert out["pid"] == os.getpid() and out["out_dir"] == str(tmp_path / "exp")
    with pytest.raises(InputError, match="nosuchfunction"):
        launch(pretrain_cfg(tmp_path), target=f"{TARGETS}:nosuchfunction")


def test_launch_slurm_through_debug_executor(tmp_path, capsys):
    job = launch(pretrain_cfg(tmp_path, launcher="slurm"), target=f"{TARGETS}:record", cluster="debug")
    assert "submitted job" in capsys.readouterr().out
    assert job.result()["out_dir"] == str(tmp_path / "exp")
    assert (tmp_path / "exp" / "slurm").is_dir()


def test_trainjob_local_executor_two_tasks(tmp_path):
    """Two tasks in subprocesses: each gets torchrun's variables from submitit's environment."""
    ex = executor_for(LaunchConfig(launcher="slurm", gpus_per_node=2, timeout_min=5), tmp_path / "jobs",
                      cluster="local")
    job = ex.submit(TrainJob(f"{TARGETS}:record", {"out_dir": str(tmp_path)}))
    results = job.results()
    assert len(results) == 2 and all(r["pid"] != os.getpid() for r in results)
    envs = sorted((r["env"] for r in results), key=lambda e: e["RANK"])
    assert [e["RANK"] for e in envs] == ["0", "1"] and [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    for e in envs:
        assert (e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) == ("2", "127.0.0.1", str(master_port(job.job_id)))


def test_distributed_env_from_slurm(monkeypatch):
    from submitit.slurm.slurm import SlurmJobEnvironment

    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                       "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    env = distributed_env(SlurmJobEnvironment())
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port("4242"))}
    assert 10_000 <= master_port("4242") < 30_000 and master_port("4242") != master_port("4243")


def test_preemption_saves_requeues_and_resumes(tmp_path):
    """USR2 (what SLURM sends before the end) to the running task: on_preemption() saves, submitit
    requeues the job (the local executor restarts it), the new run resumes from the saved step."""
    ex = executor_for(LaunchConfig(launcher="slurm", timeout_min=30, max_requeues=3), tmp_path / "jobs",
                      cluster="local")
    job = ex.submit(TrainJob(f"{TARGETS}:count", {"out_dir": str(tmp_path), "steps": 30, "step_s": 0.05}))
    steps = wait_for(lambda: len(progress(tmp_path / "progress.txt")) >= 4 and progress(tmp_path / "progress.txt"),
                     "the first steps")
    first_pid = steps[0][0]
    os.kill(first_pid, signal.SIGUSR2)
    result = job.result()

    saved = json.loads((tmp_path / "checkpoints" / "checkpoint_last.json").read_text())["step"]
    assert (tmp_path / "preemptions.txt").read_text().split() == [str(first_pid), str(saved)]
    assert saved >= 4
    assert result["pid"] != first_pid and result["started_from"] == saved and result["step"] == 30
    steps = progress(tmp_path / "progress.txt")
    first = [s for pid, s in steps if pid == first_pid]
    second = [s for pid, s in steps if pid == result["pid"]]
    assert first == list(range(1, len(first) + 1)) and max(first) <= saved
    assert second == list(range(saved + 1, 31))  # continued, not restarted from 0
    assert "preemption checkpoint saved" in job.stderr() and "Requeued job" in job.stdout()


def test_forked_children_ignore_the_warning_signal(tmp_path):
    """DataLoader workers are forked from the training process and SLURM signals them too: they
    must not run submitit's handler (which would save a stale copy and requeue)."""
    ex = executor_for(LaunchConfig(launcher="slurm", timeout_min=30), tmp_path / "jobs", cluster="local")
    job = ex.submit(TrainJob(f"{TARGETS}:fork_and_signal", {"out_dir": str(tmp_path)}))
    assert job.result() == {"child_exit": 0}
    assert not (tmp_path / "preemptions.txt").exists() and "Caught signal" not in job.stderr()


@pytest.mark.parametrize("exit_code, restarts, requeued", [(3, 0, True), (3, 20, False), (0, 0, False),
                                                       (1, 0, False)])
def test_pretrain_sbatch_template(tmp_path, fake_slurm, exit_code, restarts, requeued):
    """slurm/pretrain.sbatch with fake srun/scontrol and a fake python: torchrun's variables per
    task, launch.launcher=local forced, requeue only after a saved stop (exit 3), at most 20x."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\necho "$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $*" '
                      f'> {tmp_path}/task.txt\nexit {exit_code}\n')
    python.chmod(0o755)
    env = dict(os.environ, MT4SSL_PYTHON=str(python), SLURM_JOB_ID="4242", SLURM_PROCID="5", SLURM_LOCALID="1",
               SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_RESTART_COUNT=str(restarts))
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sbatch"), "exp.yaml", "run.seed=2"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == exit_code, proc.stderr
    assert (tmp_path / "task.txt").read_text().split() == [
        "5", "1", "16", "gpu07", str(10000 + 4242 % 20000), "-m", "mt4ssl", "pretrain", "exp.yaml", "run.seed=2",
        "launch.launcher=local"]
    log = fake_slurm / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 4242\n" if requeued else "")


def test_stage_array_template(tmp_path, fake_slurm):
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/tasks.txt\n')
    python.chmod(0o755)
    base = dict(os.environ, MT4SSL_PYTHON=str(python), SLURM_ARRAY_JOB_ID="55", SLURM_ARRAY_TASK_COUNT="2")
    script = str(REPO / "slurm" / "stage_array.sbatch")
    for task in ("0", "1"):
        subprocess.run(["bash", script, "features", "mfcc", "m", "train", "f"],
                       env=dict(base, SLURM_ARRAY_TASK_ID=task), check=True, capture_output=True, timeout=60)
    assert (tmp_path / "tasks.txt").read_text().splitlines() == [
        f"-m mt4ssl features mfcc m train f --shard {i} --nshard 2" for i in (0, 1)]
    bad = subprocess.run(["bash", script, "features"], env=dict(base, SLURM_ARRAY_TASK_ID="2"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "NSHARD" in bad.stderr


# ----------------------------------------------------------------------------- chains

def test_chain_debug_runs_stages_in_order(libri_tree, tmp_path, capsys):
    ex = executor_for(LaunchConfig(launcher="slurm"), tmp_path / "jobs", cluster="debug")
    man, feats = tmp_path / "manifests", tmp_path / "mfcc"
    jobs = submit_chain([
        Stage("manifest", ["manifest", str(libri_tree), "--out", str(man), "--splits", "train"]),
        Stage("mfcc", ["features", "mfcc", str(man), "train", str(feats), "--shard", "{shard}", "--nshard", "2"],
              shards=2),
    ], ex)
    assert [len(j) for j in jobs] == [1, 2] and all(j.result() == 0 for stage in jobs for j in stage)
    assert (man / "train.tsv").is_file()
    for shard in range(2):
        meta = json.loads((feats / f"train_{shard}_2.json").read_text())
        assert (meta["shard"], meta["nshard"]) == (shard, 2)
    out = capsys.readouterr().out
    assert out.index("stage manifest: job") < out.index("stage mfcc: 2 jobs")


def test_chain_failure_names_the_command(libri_tree, tmp_path):
    ex = executor_for(LaunchConfig(launcher="slurm"), tmp_path / "jobs", cluster="debug")
    missing = tmp_path / "nowhere"
    with pytest.raises(StageError, match=rf"(?s)stage 'manifest' failed: `mt4ssl manifest {re.escape(str(missing))} "
                                         r".*exited with code 2"):
        submit_chain([Stage("manifest", ["manifest", str(missing), "--out", str(tmp_path / "m")]),
                      Stage("never", ["manifest", str(libri_tree), "--out", str(tmp_path / "never")])], ex)
    assert not (tmp_path / "never").exists()


def test_chain_failure_in_subprocess(tmp_path):
    """Through the local executor the command and exit code come back from the job's traceback."""
    ex = executor_for(LaunchConfig(launcher="slurm", timeout_min=5), tmp_path / "jobs", cluster="local")
    with pytest.raises(StageError) as err:
        submit_chain([Stage("manifest", ["manifest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])], ex)
    assert f"`mt4ssl manifest {tmp_path / 'nowhere'}" in str(err.value) and "exited with code 2" in str(err.value)


def test_run_cli_exit_codes(monkeypatch, tmp_path):
    from mt4ssl.launch import chain, submit

    with pytest.raises(StageError, match=r"`mt4ssl manifest` exited with code 2"):  # argparse: missing args
        chain.run_cli(["manifest"])
    with pytest.raises(StageError, match=r"exited with code 2"):
        chain.run_cli(["manifest", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    # after submitit's checkpoint(), its requeue exit is not a failure: it must get through
    monkeypatch.setattr(submit, "_requeuing", True)
    with pytest.raises(SystemExit):
        chain.run_cli(["manifest"])


def test_chain_slurm_dependencies(tmp_path, fake_slurm):
    ex = executor_for(LaunchConfig(launcher="slurm", profile="example", nodes=2, extra={"comment": "x"}),
                      tmp_path / "jobs")
    before = dict(ex._executor.parameters)
    stages = [Stage("manifest", ["manifest", "LibriSpeech", "--out", "m"]),
              Stage("mfcc", ["features", "mfcc", "m", "train", "f", "--shard", "{shard}", "--nshard", "3"],
                    shards=3, params={"gpus_per_node": 0, "timeout_min": 240}),
              Stage("pretrain_base", ["pretrain", "recipes/librispeech/pretrain.yaml", "run.seed=2"])]

    plan = submit_chain(stages, ex, dry_run=True)
    assert all(isinstance(j, PlannedJob) for stage in plan for j in stage)
    assert [j.job_id for j in plan[1]] == ["mfcc_0", "mfcc_1", "mfcc_2"] and plan[1][2].argv[-3] == "2"
    assert plan[0][0].dependency is None and "--dependency" not in plan[0][0].sbatch
    assert "#SBATCH --dependency=afterok:manifest\n" in plan[1][0].sbatch
    assert "#SBATCH --array=0-2%3\n" in plan[1][0].sbatch and "#SBATCH --time=240\n" in plan[1][0].sbatch
    assert "#SBATCH --dependency=afterok:mfcc\n" in plan[2][0].sbatch and "--time=4320" in plan[2][0].sbatch
    assert not (fake_slurm / "ids").exists()  # nothing submitted

    jobs = submit_chain(stages, ex)  # through the fake sbatch
    assert [[j.job_id for j in stage] for stage in jobs] == [["1001"], ["1002_0", "1002_1", "1002_2"], ["1003"]]
    scripts = [Path(stage[0].paths.submission_file).read_text() for stage in jobs]
    assert "--dependency" not in scripts[0] and "#SBATCH --job-name=mt4ssl-manifest\n" in scripts[0]
    # data stages run one task on one node; pretraining takes the executor's nodes x GPUs
    assert all("#SBATCH --ntasks-per-node=1\n" in s and "#SBATCH --nodes=1\n" in s for s in scripts[:2])
    assert "#SBATCH --ntasks-per-node=8\n" in scripts[2] and "#SBATCH --nodes=2\n" in scripts[2]
    assert "#SBATCH --dependency=afterok:1001\n" in scripts[1] and "#SBATCH --array=0-2%3\n" in scripts[1]
    assert "#SBATCH --kill-on-invalid-dep=yes\n" in scripts[1] and "--gpus-per-node" not in scripts[1]
    assert "#SBATCH --dependency=afterok:1002\n" in scripts[2] and "#SBATCH --gpus-per-node=8\n" in scripts[2]
    assert all("#SBATCH --comment=x\n" in s and "#SBATCH --requeue\n" in s for s in scripts)
    assert ex._executor.parameters == before  # the executor is left as it was
    assert jobs[2][0].submission().function.argv == stages[2].argv
