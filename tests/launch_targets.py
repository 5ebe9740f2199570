"""Job targets for tests/test_launch.py, importable as `tests.launch_targets` by job subprocesses.

`count` stands in for the training loop: it counts steps into progress.txt, resumes from the
JSON "checkpoint" that `on_preemption()` writes, exactly as `mt4ssl.train.pretrain` resumes from
checkpoint_last.pt. A cfg is a dict ({"out_dir", "steps", "step_s"}) or a PretrainConfig.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_state = {"out": None, "step": 0}


def _get(cfg, key: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return {"out_dir": cfg.run.out_dir, "steps": cfg.run.max_updates}.get(key, default)


def checkpoint_path(out_dir) -> Path:
    return Path(out_dir) / "checkpoints" / "checkpoint_last.json"


def record(cfg) -> dict:
    """What the job saw: its pid, torchrun's variables, the config's out_dir."""
    return {"pid": os.getpid(), "out_dir": str(_get(cfg, "out_dir")),
            "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}}


def count(cfg) -> dict:
    """Count from the saved step to cfg's steps, one step every step_s seconds."""
    out = Path(_get(cfg, "out_dir"))
    ckpt = checkpoint_path(out)
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    _state.update(out=out, step=start)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "progress.txt", "a") as f:
        for step in range(start + 1, _get(cfg, "steps") + 1):
            time.sleep(_get(cfg, "step_s", 0.05))
            _state["step"] = step
            f.write(f"{os.getpid()} {step}\n")
            f.flush()
    return {"pid": os.getpid(), "started_from": start, "step": _state["step"],
            "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}}


def on_preemption() -> Path | None:
    """Save the running count (what the trainer's on_preemption does with its state)."""
    if _state["out"] is None:
        return None
    ckpt = checkpoint_path(_state["out"])
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": _state["step"]}))
    tmp.replace(ckpt)
    with open(_state["out"] / "preemptions.txt", "a") as f:
        f.write(f"{os.getpid()} {_state['step']}\n")
    return ckpt


def fork_and_signal(cfg) -> dict:
    """Fork a child (as a DataLoader worker is forked) and send it the warning signal SLURM sends
    to every process of a job: the child must neither save nor requeue, just keep working."""
    import signal

    _state.update(out=Path(_get(cfg, "out_dir")), step=7)  # what a stale copy would save
    child = os.fork()
    if child == 0:
        time.sleep(1.0)
        os._exit(0)
    time.sleep(0.2)
    os.kill(child, signal.SIGUSR2)
    _, status = os.waitpid(child, 0)
    return {"child_exit": os.waitstatus_to_exitcode(status)}
