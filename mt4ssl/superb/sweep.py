"""`mt4ssl superb --task T --ckpt CKPT --data DIR --out SWEEP [--lr A B ...] [--launch slurm]`:
a SUPERB task on a frozen upstream, over a learning-rate sweep, as SUPERB's protocol asks
(s3prl's docs reproduce the paper "by only changing the learning rate").

Each learning rate is one run of `mt4ssl.superb.runner` (s3prl's own runner: train, then the
best dev states on test) in SWEEP/lr<LR>/. SWEEP/result.json sums the sweep up, rewritten
after each run (under a lock, so parallel jobs cannot lose one another's runs):

    task, upstream, ckpt, random_init, metric, higher_better, steps
    lr, dev, test, run     the run of the best dev score (SUPERB's pick), its test score
    runs                   every finished run: lr, dev, test, seconds, folder
    pending                learning rates asked for and not finished
    commands               the command lines that asked for runs of this sweep

Run the command again and finished learning rates are kept, an interrupted run resumes from
s3prl's last states, and new learning rates extend the sweep (same task, upstream, checkpoint
and steps; another setting is an error naming it).

`--launch local` (default) runs the learning rates one after another here. `--launch slurm`
submits one job per unfinished learning rate through submitit (`--profile`, `--partition`,
`--gpus-per-node`, ...: the keys of launch.* in the pretraining configs), each running this
command for its learning rate; a job is requeued on preemption or timeout and resumes. The
command returns once they are submitted; SWEEP/result.json fills as they finish (rerun the
command with `--launch local` after they are done to print it, nothing is retrained).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import shlex
from pathlib import Path

from mt4ssl.errors import InputError
from mt4ssl.superb import runner
from mt4ssl.superb.tasks import get_task
from mt4ssl.utils.io import atomic_write_text, exclusive_lock

log = logging.getLogger(__name__)

SUMMARY = "result.json"


def add_args(parser: argparse.ArgumentParser) -> None:
    runner.add_args(parser)
    g = parser.add_argument_group("launch (one job per learning rate)")
    g.add_argument("--launch", default="local", choices=("local", "slurm"),
                   help="local: here, one learning rate after another (default); slurm: submitit jobs")
    g.add_argument("--profile", default="", help="cluster profile, slurm/<name>.yaml or a path")
    g.add_argument("--partition", default="")
    g.add_argument("--account", default="")
    g.add_argument("--qos", default="")
    g.add_argument("--constraint", default="")
    g.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job (default)")
    g.add_argument("--cpus-per-task", type=int, default=10)
    g.add_argument("--mem-gb", type=int, default=0, help="0: the profile's / cluster default")
    g.add_argument("--timeout-min", type=int, default=4320)
    g.add_argument("--max-requeues", type=int, default=20)
    g.add_argument("--dry-run", action="store_true", help="with --launch slurm: print the jobs, submit nothing")


OPTIONS = ("ckpt", "upstream", "random_init", "steps", "eval_step", "batch_size", "device",
           "num_workers", "seed", "precision", "cache_gb")


def run(args: argparse.Namespace) -> int:
    lrs = args.lr or [None]
    options = {k: getattr(args, k) for k in OPTIONS}
    if args.launch == "slurm":
        submit(args.task, args.data, args.out, lrs, options, args, dry_run=args.dry_run)
        return 0
    summary = sweep(args.task, args.data, args.out, lrs, **options)
    print(json.dumps(summary, indent=2))
    return 0


def command(task_name: str, data: Path, out: Path, lrs: list[float | None], options: dict) -> list[str]:
    """The `mt4ssl superb` arguments (absolute paths) of a local sweep over `lrs`."""
    argv = ["superb", "--task", task_name, "--data", str(Path(data).resolve()), "--out", str(Path(out).resolve())]
    if options.get("upstream", "mt4ssl_local") != "mt4ssl_local":
        argv += ["--upstream", options["upstream"]]
    if options.get("ckpt") is not None:
        argv += ["--ckpt", str(Path(options["ckpt"]).resolve())]
    if options.get("random_init"):
        argv.append("--random-init")
    for key in ("steps", "eval_step", "batch_size", "device", "num_workers", "seed", "precision", "cache_gb"):
        if options.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(options[key])]
    if any(lr is not None for lr in lrs):
        argv += ["--lr", *(repr(lr) for lr in lrs)]
    return argv


def lr_folder(sweep_dir: Path, lr: float | None, task_name: str) -> Path:
    """SWEEP/lr<LR>: `lr` as given (None: the task's s3prl default)."""
    if lr is None:
        lr = get_task(task_name).config["optimizer"]["lr"]
    return Path(sweep_dir) / f"lr{lr:g}"


def sweep(task_name: str, data: Path, out: Path, lrs: list[float | None], **options) -> dict:
    """Run (or resume, or keep) `runner.superb` for each learning rate; return the summary."""
    out = Path(out)
    _check_lrs(lrs)
    _check_sweep_dir(out)
    line = "mt4ssl " + shlex.join(command(task_name, data, out, lrs, options))
    for i, lr in enumerate(lrs):
        folder = lr_folder(out, lr, task_name)
        log.info("superb %s: learning rate %d/%d (%s) in %s", task_name, i + 1, len(lrs),
                 "s3prl's default" if lr is None else f"{lr:g}", folder)
        # one job per run folder: two (a job started twice, a sweep run by hand beside its SLURM
        # jobs) would both write s3prl's states and logs; the second stops and names the folder
        with exclusive_lock(folder, f"the SUPERB run {folder}"):
            runner.superb(task_name, data, folder, lr=lr, **options)
        summary = update_summary(out, task_name, lrs, line)
    return summary


def _check_lrs(lrs: list[float | None]) -> None:
    for lr in lrs:
        if lr is not None and not lr > 0:
            raise InputError(f"--lr must be > 0, got {lr}")
    if len(set(lrs)) != len(lrs):
        raise InputError(f"--lr: repeated learning rate in {lrs}")


def _check_sweep_dir(out: Path) -> None:
    """SWEEP must be new, empty, or a sweep folder (lr*/ runs and this module's files)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    ours = {SUMMARY, ".lock", "slurm"}
    other = [p.name for p in out.iterdir() if p.name not in ours and not (p.is_dir() and p.name.startswith("lr"))
             and not (p.name.startswith(".lr") and p.name.endswith(".lock"))]  # a run's (runner.superb)
    if other:
        raise InputError(f"--out {out}: not a sweep folder of `mt4ssl superb` (it holds {', '.join(sorted(other)[:3])}); "
                         f"give a new or empty folder")


def update_summary(out: Path, task_name: str, lrs: list[float | None], line: str) -> dict:
    """Rewrite SWEEP/result.json from the finished runs in SWEEP/lr*/ (locked: jobs of one
    sweep finish in parallel on a cluster). `line` is the command that asked for `lrs`; the
    learning rates asked for before (by the sweep's other jobs) stay in `pending` until done."""
    task = get_task(task_name)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).is_file() else {}
        asked = set(before.get("requested", [])) | {lr_folder(out, lr, task_name).name for lr in lrs}
        runs = []
        for folder in sorted(out.glob("lr*/")):
            if (folder / "result.json").is_file():
                result = json.loads((folder / "result.json").read_text())
                if result["task"] == task.name:
                    runs.append({**result, "folder": folder.name})
        if not runs:
            raise RuntimeError(f"{out}: no finished run")
        first = runs[0]
        for r in runs[1:]:
            for key in ("upstream", "ckpt", "random_init", "steps", "data"):
                if r[key] != first[key]:
                    raise InputError(f"{out}: runs {first['folder']} and {r['folder']} differ in {key} "
                                     f"({first[key]!r} vs {r[key]!r}): one sweep folder per setting")
        scored = [r for r in runs if r["dev"] is not None]
        best = (max if task.higher_better else min)(scored, key=lambda r: r["dev"]) if scored else {}
        summary = {key: first[key] for key in ("task", "upstream", "ckpt", "random_init", "metric", "steps")}
        summary.update(higher_better=task.higher_better,
                       **{key: best.get(key) for key in ("lr", "dev", "test")}, run=best.get("folder"),
                       runs=[{k: r[k] for k in ("lr", "dev", "test", "seconds", "folder")} for r in runs],
                       requested=sorted(asked), pending=sorted(asked - {r["folder"] for r in runs}),
                       commands=list(dict.fromkeys([*before.get("commands", []), line])))
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def submit(task_name: str, data: Path, out: Path, lrs: list[float | None], options: dict,
           launch_args: argparse.Namespace, dry_run: bool = False, cluster: str | None = None) -> list:
    """Submit one job per unfinished learning rate (`mt4ssl superb ... --lr LR`, run locally
    through `mt4ssl.launch.chain.CliJob`: requeued on preemption, resuming). Everything the
    runs will check is checked here first, so a bad input fails now and not in the queue."""
    from mt4ssl.launch.chain import CliJob, command_line as job_line
    from mt4ssl.launch.submit import executor_for
    from mt4ssl.superb import tasks
    from mt4ssl.train.config import LaunchConfig

    out = Path(out).resolve()
    _check_lrs(lrs)
    _check_sweep_dir(out)
    task = get_task(task_name)
    runner._check_upstream(options["upstream"], options["ckpt"], options["random_init"])
    counts = tasks.check_data(task, Path(data).resolve())
    tasks.check_batches(task, counts, options["batch_size"] or tasks.batch_size(task.config))
    todo = [lr for lr in lrs if not (lr_folder(out, lr, task_name) / "result.json").is_file()]
    if not todo:
        print(f"{out}: every learning rate has finished; see {out / SUMMARY}")
        return []
    keys = ("profile", "partition", "account", "qos", "constraint", "gpus_per_node", "cpus_per_task",
            "mem_gb", "timeout_min", "max_requeues")
    launch = LaunchConfig(launcher="slurm", **{k: getattr(launch_args, k) for k in keys})
    if launch.gpus_per_node > 1:
        raise InputError(f"--gpus-per-node {launch.gpus_per_node}: a SUPERB run here uses one device; "
                         f"the learning rates run as parallel jobs instead")
    if launch.gpus_per_node == 0 and options["device"] != "cpu":
        raise InputError(f"--device {options['device']} with --gpus-per-node 0: the jobs would get no GPU; "
                         f"give --gpus-per-node 1")
    if launch.gpus_per_node == 1 and options["device"] == "cpu":
        raise InputError("--gpus-per-node 1 with --device cpu: the jobs would hold GPUs they do not use; "
                         "give --device cuda")
    commands = [command(task_name, data, out, [lr], options) for lr in todo]
    if dry_run:
        for c in commands:
            print(f"would submit: {job_line(c)}")
        return commands
    executor = executor_for(launch, out / "slurm", cluster=cluster, name=f"superb-{task_name}")
    jobs = [executor.submit(CliJob(c)) for c in commands]
    for job, c in zip(jobs, commands):
        print(f"submitted job {job.job_id}: {job_line(c)}; logs: {job.paths.stdout}", flush=True)
    print(f"{out / SUMMARY} is updated as each job finishes")
    return jobs


def on_preemption() -> None:
    """Called by the job before its requeue: s3prl keeps its own states (every save_step);
    the requeued run resumes from the newest of them (runner.superb)."""
    log.warning("preempted: the requeued job resumes s3prl from its newest states-N.ckpt")
    return None
