"""Stage chaining for recipes: each stage is one `mt4ssl` command, run as a job or a job array.

    stages = [Stage("manifest", ["manifest", "LibriSpeech", "--out", "data/manifests"]),
              Stage("mfcc", ["features", "mfcc", "data/manifests", "train", "data/mfcc",
                             "--shard", "{shard}", "--nshard", "100"], shards=100),
              Stage("pretrain", ["pretrain", "recipes/librispeech/pretrain.yaml", "run.seed=2"])]
    jobs = submit_chain(stages, executor_for(launch_cfg, "exp/slurm"))

On SLURM everything is submitted at once and each stage waits for the whole previous stage
(`--dependency=afterok:...`, with `--kill-on-invalid-dep=yes` so a failure cancels the rest).
With any other executor ("local", "debug") the stages run one after another, each waited for,
so the same recipe runs on a laptop. A command that exits nonzero fails its job; the error
names the command and the exit code. Each job is a `CliJob`: requeued on preemption/timeout
(a rerun resumes where the command can: finished feature shards are skipped, pretraining
resumes from checkpoint_last.pt), with torchrun's variables set for multi-task stages.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

from mt4ssl.errors import InputError
from mt4ssl.launch.submit import PreemptibleJob, requeuing

log = logging.getLogger(__name__)


TRAINING = ("pretrain", "finetune")  # commands that run DDP over the executor's nodes and tasks


class StageError(RuntimeError):
    """A stage's command failed (nonzero exit) or its job did not complete."""


@dataclass(frozen=True)
class Stage:
    """One `mt4ssl` command. With shards > 0 it runs as `shards` jobs (a SLURM array), `{shard}`
    in argv replaced by the index. A job is one task on one node, except for `pretrain` and
    `finetune`, which take the executor's nodes and tasks (DDP). `params` are executor parameters for this stage
    only, in submitit AutoExecutor names (timeout_min, gpus_per_node, slurm_partition, ...);
    gpus_per_node=0 requests no GPU."""

    name: str
    argv: list[str]
    shards: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise InputError(f"stage {self.name!r}: needs a name and a non-empty list of string arguments")
        if self.shards < 0:
            raise InputError(f"stage {self.name!r}: shards {self.shards} must be >= 0")
        if self.shards and not any("{shard}" in a for a in self.argv):
            raise InputError(f"stage {self.name!r}: shards={self.shards} but no '{{shard}}' in its arguments")

    def commands(self) -> list[list[str]]:
        """The argv of each task."""
        if not self.shards:
            return [list(self.argv)]
        return [[a.replace("{shard}", str(i)) for a in self.argv] for i in range(self.shards)]


def command_line(argv: Sequence[str]) -> str:
    return "mt4ssl " + shlex.join(argv)


def run_cli(argv: Sequence[str]) -> int:
    """`mt4ssl.cli.main(argv)`; a nonzero exit (argparse's included) raises StageError."""
    from mt4ssl.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        if requeuing():  # submitit's exit after checkpoint + requeue: not a failure
            raise
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code:
        raise StageError(f"`{command_line(argv)}` exited with code {code}")
    return 0


class CliJob(PreemptibleJob):
    """`run_cli(argv)` as a submitit job, requeued on preemption/timeout; the command's module
    (mt4ssl.cli.COMMANDS) saves first if it has an `on_preemption()` (pretraining does)."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def hook_module(self) -> str:
        from mt4ssl.cli import COMMANDS

        return COMMANDS.get(self.argv[0], ("mt4ssl.cli",))[0]

    def run(self) -> int:
        return run_cli(self.argv)

    def fresh(self) -> "CliJob":
        return CliJob(self.argv)

    def __repr__(self) -> str:
        return f"CliJob({command_line(self.argv)!r})"


@dataclass
class PlannedJob:
    """What a dry run would submit: a stand-in id, the command, the SLURM dependency and
    (SLURM executors) the sbatch script."""

    job_id: str
    stage: str
    argv: list[str]
    dependency: str | None = None
    sbatch: str = ""


def _cluster(executor) -> str:
    return getattr(executor, "cluster", None) or executor.name()


def _base_ids(jobs) -> list[str]:
    """SLURM ids to depend on: an array `123_4` is depended on as a whole, `123` (a dry run's
    stand-in id: the stage name)."""
    return list(dict.fromkeys(j.stage if isinstance(j, PlannedJob) else str(j.job_id).split("_")[0]
                              for j in jobs))


def submit_chain(stages: Sequence[Stage], executor, dry_run: bool = False) -> list[list]:
    """Submit `stages` in order, each depending on the whole previous stage; returns the jobs
    of each stage (PlannedJob stand-ins with dry_run). On a non-SLURM executor each stage
    is run and waited for before the next; a failure raises StageError naming the command."""
    stages = list(stages)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise InputError(f"stage names must be unique, got {names}")
    cluster = _cluster(executor)
    on_slurm = cluster == "slurm"
    inner = getattr(executor, "_executor", executor)  # AutoExecutor wraps the real one
    saved = dict(inner.parameters)
    chain: list[list] = []
    previous: list[str] = []
    try:
        for stage in stages:
            inner.parameters.clear()
            inner.parameters.update(saved)
            if stage.argv[0] not in TRAINING:  # data commands are one process: one task, one node
                executor.update_parameters(**executor._convert_parameters({"nodes": 1, "tasks_per_node": 1}))
            if stage.params:
                executor.update_parameters(**stage.params)
            dependency = f"afterok:{':'.join(previous)}" if on_slurm and previous else None
            if on_slurm:
                for key in ("gpus_per_node", "mem"):  # 0: not requested (e.g. a CPU stage)
                    if inner.parameters.get(key) in (0, "0GB"):
                        del inner.parameters[key]
                inner.parameters["job_name"] = f"mt4ssl-{stage.name}"
                extra = dict(inner.parameters.get("additional_parameters") or {})
                if dependency:
                    extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
                inner.parameters["additional_parameters"] = extra
            commands = stage.commands()
            if dry_run:
                jobs = _plan(stage, commands, dependency, inner if on_slurm else None)
            elif stage.shards:
                jobs = executor.submit_array([CliJob(c) for c in commands])
            else:
                jobs = [executor.submit(CliJob(commands[0]))]
            _report(stage, jobs, dependency, dry_run, on_slurm)
            if not on_slurm and not dry_run:
                _wait(stage, commands, jobs)
            previous = _base_ids(jobs)
            chain.append(jobs)
    finally:
        inner.parameters.clear()
        inner.parameters.update(saved)
    return chain


def _plan(stage: Stage, commands, dependency, slurm_executor) -> list[PlannedJob]:
    ids = [stage.name] if not stage.shards else [f"{stage.name}_{i}" for i in range(stage.shards)]
    sbatch = ""
    if slurm_executor is not None:
        if stage.shards:
            slurm_executor.parameters["map_count"] = stage.shards
        sbatch = slurm_executor._make_submission_file_text(slurm_executor._submitit_command_str, "dry-run")
        slurm_executor.parameters.pop("map_count", None)
    return [PlannedJob(i, stage.name, c, dependency, sbatch) for i, c in zip(ids, commands)]


def _report(stage: Stage, jobs, dependency, dry_run: bool, on_slurm: bool) -> None:
    if not stage.shards:
        what = f"job {jobs[0].job_id}"
    elif on_slurm:
        what = f"array {_base_ids(jobs)[0]} ({len(jobs)} tasks)"
    else:
        what = f"{len(jobs)} jobs {', '.join(str(j.job_id) for j in jobs)}"
    after = f" after {dependency.split(':', 1)[1]}" if dependency else ""
    logs = "" if dry_run else f"; logs: {jobs[0].paths.stdout}"
    print(f"stage {stage.name}: {'would submit ' if dry_run else ''}{what}{after}: "
          f"{command_line(stage.argv)}{logs}", flush=True)


def _wait(stage: Stage, commands, jobs) -> None:
    # job.exception() waits and returns the error: the debug executor's job.result() would
    # open a post-mortem debugger on failure instead
    for i, (argv, job) in enumerate(zip(commands, jobs)):
        error = job.exception()
        if error is not None:
            task = f" task {i}" if stage.shards else ""
            raise StageError(f"stage {stage.name!r}{task} failed: `{command_line(argv)}`\n{error}") from error
