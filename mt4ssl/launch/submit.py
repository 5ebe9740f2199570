"""Launching pretraining: in this process, or on SLURM through submitit with checkpoint/requeue.

    launch(cfg)                              # cfg.launch.launcher: local | slurm
    executor = executor_for(cfg.launch, folder)   # a submitit executor: profile + launch.*

On SLURM every task of the job runs `TrainJob(target, cfg)()`: it exports torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the SLURM job, then calls the
target (`mt4ssl.train.pretrain:train`), which resumes from `checkpoint_last.pt` if there is one.

Preemption and time limit: SLURM sends USR2 `signal_delay_s` (120) seconds before the end
(and on preemption where the cluster sets PreemptParameters=send_user_signal). submitit's
handler (global rank 0 only; the trainer defers it to the end of the current update) calls
`TrainJob.checkpoint`, which calls the target module's `on_preemption()` and requeues the job
with a fresh `TrainJob`. A preemption without that setting is SIGTERM, then SIGKILL after the
partition's GraceTime, and SLURM requeues the job itself (PreemptMode=REQUEUE): the trainer
saves at the SIGTERM and waits (mt4ssl/train/loop.py). Forked children (DataLoader workers),
which SLURM signals too, ignore these signals. Plain sbatch without submitit:
slurm/pretrain.sbatch.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import logging
import os
import shutil
import signal
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import submitit

from mt4ssl.config import config_from_dict
from mt4ssl.errors import InputError

if TYPE_CHECKING:
    from mt4ssl.train.config import LaunchConfig, PretrainConfig

log = logging.getLogger(__name__)

DEFAULT_TARGET = "mt4ssl.train.pretrain:train"
SIGNAL_DELAY_S = 120  # seconds between the warning signal and the end of the job
PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm"  # the repository's slurm/ folder

# sbatch options that mt4ssl sets itself: `extra` may not set them (say which key does)
_MANAGED = {"partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint",
            "nodes": "launch.nodes", "ntasks-per-node": "gpus_per_node (tasks = max(1, gpus_per_node))",
            "gpus-per-node": "gpus_per_node", "cpus-per-task": "cpus_per_task", "mem": "mem_gb",
            "time": "timeout_min", "signal": "signal_delay_s (the signal is submitit's USR2)",
            "job-name": None, "output": None, "error": None, "array": None, "open-mode": None}


# ----------------------------------------------------------------------------- profiles

@dataclass(frozen=True)
class SlurmProfile:
    """A cluster profile, `slurm/<name>.yaml`; a key left out is not set by the profile."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int | None = None
    signal_delay_s: int | None = None  # warning signal this long before the end (default 120)
    setup: tuple[str, ...] = ()  # shell lines run in the sbatch script before srun
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options: {option: value}


def find_profile(profile: str) -> Path:
    """`profile` is a YAML path, or a name looked up as `slurm/NAME.yaml` (here, then the repo)."""
    if profile.endswith((".yaml", ".yml")) or os.sep in profile:
        candidates = [Path(profile).expanduser()]
    else:
        candidates = list(dict.fromkeys([Path("slurm") / f"{profile}.yaml", PROFILE_DIR / f"{profile}.yaml"]))
    for path in candidates:
        if path.is_file():
            return path
    raise InputError(f"launch.profile {profile!r}: no such profile file (looked for "
                     f"{', '.join(str(p) for p in candidates)})")


def load_profile(profile: str) -> tuple[SlurmProfile, Path]:
    """Parse a profile strictly: an unknown key or a wrong type is an error naming the file."""
    import yaml

    path = find_profile(profile)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    prof = config_from_dict(SlurmProfile, data or {}, str(path))
    _check_extra(prof.extra, f"{path}: extra")
    return prof, path


def _check_extra(extra: dict[str, Any], where: str) -> None:
    for key in extra:
        flag = key.replace("_", "-")
        if flag in _MANAGED:
            use = _MANAGED[flag]
            raise InputError(f"{where}.{key}: this sbatch option is set by mt4ssl"
                             + (f"; use {use} instead" if use else ""))


# ----------------------------------------------------------------------------- executors

def executor_for(launch: LaunchConfig, folder: str | Path, cluster: str | None = None,
                 name: str = "mt4ssl", plan_only: bool = False) -> submitit.AutoExecutor:
    """A submitit executor for `launch`: submitit's defaults < the profile < launch.* keys.

    A launch.* key overrides the profile when it differs from its default in `LaunchConfig`
    (so `cpus_per_task: 10` in a config does not hide the profile's value). `cluster` is
    "slurm" (default) or, for tests and laptops, "local" (subprocesses) or "debug" (in process).
    `plan_only`: for dry runs (`submit_chain(..., dry_run=True)`), which only write sbatch
    scripts: a SLURM executor is built on a machine without SLURM too.
    """
    from mt4ssl.train.config import LaunchConfig

    prof, _ = load_profile(launch.profile) if launch.profile else (SlurmProfile(), None)
    _check_extra(launch.extra, "launch.extra")
    defaults = LaunchConfig()

    def pick(key: str):
        value = getattr(launch, key)
        theirs = getattr(prof, key)
        return theirs if value == getattr(defaults, key) and theirs is not None else value

    gpus, cpus, mem, timeout = (pick(k) for k in ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"))
    for key, value, low in (("nodes", launch.nodes, 1), ("gpus_per_node", gpus, 0), ("cpus_per_task", cpus, 1),
                            ("mem_gb", mem, 0), ("timeout_min", timeout, 1),
                            ("max_requeues", launch.max_requeues, 0)):
        if value < low:
            raise InputError(f"launch.{key}: {value} must be at least {low}")
    cluster = cluster or "slurm"
    no_srun = cluster == "slurm" and shutil.which("srun") is None
    if no_srun and not plan_only:
        raise InputError("launch.launcher=slurm: `srun` is not on PATH (submit from a SLURM login node, "
                         "or run here with launch.launcher=local)")
    with _without_srun_check() if no_srun else contextlib.nullcontext():
        executor = submitit.AutoExecutor(folder, cluster=cluster, slurm_max_num_timeout=launch.max_requeues,
                                         local_max_num_timeout=launch.max_requeues)
    params: dict[str, Any] = {"name": name, "nodes": launch.nodes, "tasks_per_node": max(1, gpus),
                              "cpus_per_task": cpus, "timeout_min": timeout}
    if gpus:
        params["gpus_per_node"] = gpus
    if mem:
        params["mem_gb"] = mem
    for key in ("partition", "account", "qos", "constraint"):
        if pick(key):
            params[f"slurm_{key}"] = pick(key)
    extra = {"requeue": True, **prof.extra, **launch.extra}  # false/null drops an option
    params["slurm_additional_parameters"] = {k: v for k, v in extra.items() if v is not None and v is not False}
    params["slurm_signal_delay_s"] = prof.signal_delay_s or SIGNAL_DELAY_S
    # a rank that stops (exits) first must not make srun kill rank 0 while it writes the checkpoint
    params["slurm_srun_args"] = ["--kill-on-bad-exit=0"]
    if prof.setup:
        params["slurm_setup"] = list(prof.setup)
    try:
        executor.update_parameters(**params)
    except ValueError as e:  # submitit's own checks (e.g. the local executor has one node)
        raise InputError(f"launch: {e}") from None
    return executor


@contextlib.contextmanager
def _without_srun_check():
    """Let submitit build a SLURM executor where `srun` is missing (it refuses to: "are you
    indeed on a slurm cluster?"), for a dry run's sbatch scripts; nothing is submitted."""
    from submitit.slurm.slurm import SlurmExecutor

    original = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 1)
    try:
        yield
    finally:
        SlurmExecutor.affinity = original


# ----------------------------------------------------------------------------- the job side

def import_target(target: str) -> Callable:
    """"package.module:function" -> the function."""
    module, sep, func = target.partition(":")
    if not sep or not module or not func:
        raise InputError(f"target {target!r}: expected 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise InputError(f"target {target!r}: {e}") from None


def master_port(job_id: str) -> int:
    """A port in [10000, 30000) from the job id: same for all tasks and across requeues, below
    Linux's ephemeral range, different for jobs (and array tasks) sharing a node."""
    return 10_000 + zlib.crc32(str(job_id).encode()) % 20_000


def distributed_env(job_env) -> dict[str, str]:
    """torchrun's variables for a task of a submitit (SLURM or local) job."""
    host = job_env.hostnames[0] if job_env.cluster == "slurm" else "127.0.0.1"
    return {"RANK": str(job_env.global_rank), "WORLD_SIZE": str(job_env.num_tasks),
            "LOCAL_RANK": str(job_env.local_rank),
            "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(1, job_env.num_nodes)),
            "MASTER_ADDR": host, "MASTER_PORT": str(master_port(job_env.job_id))}


def job_environment():
    """submitit's JobEnvironment of the job this process runs in, or None outside a job."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


_requeuing = False  # set once submitit checkpoints this process for a requeue


def requeuing() -> bool:
    """True once submitit's handler has checkpointed this process: the SystemExit that follows
    is submitit's requeue exit and must propagate (see chain.run_cli)."""
    return _requeuing


def save_on_preemption(module: str) -> Path | None:
    """Call `module.on_preemption()` (rank 0 writes), logging what happened; never raises, so
    the job is still requeued (and resumes from its last checkpoint) if saving fails."""
    try:
        hook = getattr(importlib.import_module(module), "on_preemption", None)
        if hook is None:
            log.warning("%s has no on_preemption(): the requeued job resumes from its last checkpoint", module)
            return None
        path = hook()
    except Exception:
        log.exception("on_preemption() of %s failed; the requeued job resumes from its last checkpoint", module)
        return None
    if path:
        log.warning("preemption checkpoint saved: %s", path)
    return path


def _prepare_job_process() -> int | None:
    """In a submitit task (SLURM or local; not the in-process debug executor): export torchrun's
    variables and keep forked children (DataLoader workers) out of submitit's signal handling.
    Returns this process's pid, or None outside such a job."""
    job_env = job_environment()
    if job_env is None or job_env.cluster not in ("slurm", "local"):
        return None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("submitit").propagate = False  # it has its own handler
    if job_env.cluster == "slurm" or job_env.num_tasks > 1:
        os.environ.update(distributed_env(job_env))
    warning_sig = job_env._usr_sig()

    def in_child():
        # SLURM signals every process of the job. A forked child would run submitit's handlers
        # (inherited): save a stale copy and requeue on USR2, shrug off SIGTERM. Undo both.
        try:
            signal.signal(warning_sig, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # not the main thread
            pass

    os.register_at_fork(after_in_child=in_child)
    dist = [f"{k}={os.environ[k]}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
            if k in os.environ]
    log.info("%s%s", job_env, f" ({' '.join(dist)})" if dist else "")
    return os.getpid()


class PreemptibleJob(submitit.helpers.Checkpointable, abc.ABC):
    """A submitit callable that saves through `on_preemption()` of `hook_module()` and requeues
    itself (as a fresh copy) on the warning signal; subclasses define `run` and `fresh`."""

    _pid: int | None = None

    @abc.abstractmethod
    def hook_module(self) -> str:
        """The module whose `on_preemption()` saves the job's state."""

    @abc.abstractmethod
    def run(self):
        """The job's work."""

    @abc.abstractmethod
    def fresh(self) -> "PreemptibleJob":
        """A new copy of this job, to be requeued."""

    def __call__(self):
        self._pid = _prepare_job_process()
        return self.run()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # submitit calls this from its signal handler on global rank 0 only, then requeues
        global _requeuing
        if self._pid in (None, os.getpid()):  # not a forked copy
            _requeuing = True
            save_on_preemption(self.hook_module())
        return submitit.helpers.DelayedSubmission(self.fresh())


class TrainJob(PreemptibleJob):
    """`target(cfg)` as a submitit job; requeued on preemption/timeout, resuming from
    `{run.out_dir}/checkpoints/checkpoint_last.pt` (the target's job)."""

    def __init__(self, target: str = DEFAULT_TARGET, cfg: Any = None):
        self.target = target
        self.cfg = cfg

    def hook_module(self) -> str:
        return self.target.partition(":")[0]

    def run(self):
        return import_target(self.target)(self.cfg)

    def fresh(self) -> "TrainJob":
        return TrainJob(self.target, self.cfg)

    def __repr__(self) -> str:
        return f"TrainJob({self.target!r})"


# ----------------------------------------------------------------------------- launch

def launch(cfg: PretrainConfig, target: str = DEFAULT_TARGET, cluster: str | None = None):
    """Run `target(cfg)` here (launcher=local, or when already inside a submitit job) and return
    its result; or submit it to SLURM (folder `{run.out_dir}/slurm`) and return the job."""
    env = job_environment()
    if cfg.launch.launcher == "local" or env is not None:
        if cfg.launch.launcher != "local":
            log.info("already inside a %s job: running %s in this process", env.cluster, target)
        return import_target(target)(cfg)
    import_target(target)  # fail here, not in the queue
    folder = Path(cfg.run.out_dir) / "slurm"
    executor = executor_for(cfg.launch, folder, cluster=cluster, name=f"mt4ssl-{Path(cfg.run.out_dir).name}")
    job = executor.submit(TrainJob(target, cfg))
    print(f"submitted job {job.job_id} ({executor.cluster}, {job.num_tasks} task(s)); "
          f"logs: {job.paths.stdout} and {job.paths.stderr}", flush=True)
    return job
