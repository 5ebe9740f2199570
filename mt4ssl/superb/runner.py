"""`mt4ssl superb --task pr|asr|ks|sid|ic --ckpt CKPT --data DIR --out EXPDIR`: one SUPERB task on a
frozen upstream through s3prl 0.4.18's own runner and downstream code.

1. Checks, before any training: the task name, the data layout and its splits
   (`mt4ssl.superb.tasks`), the checkpoint (an mt4ssl checkpoint that loads), the options.
2. Upstream: `--ckpt CKPT` (s3prl's `-u mt4ssl_local -k CKPT`); `--random-init` the same
   architecture with fresh weights (written to EXPDIR/random_init.pt, seed `--seed`);
   `--upstream fbank` s3prl's fbank baseline (no checkpoint).
3. Writes EXPDIR/config.yaml (s3prl's SUPERB config of the task, paths filled in, steps
   scaled by `--steps`, `--lr`) and EXPDIR/phoneme.txt (PR), or EXPDIR/char.dict and
   EXPDIR/bucket_file/{split}.csv (ASR; s3prl's wheel has neither, `mt4ssl.superb.asr`).
4. Runs, each in a subprocess (`python -m mt4ssl.superb._s3prl_main`, s3prl's
   `run_downstream` with the run-time fixes listed there), output in EXPDIR/train.log and
   EXPDIR/test.log:
       -m train --device D -u UPSTREAM [-k CKPT] -d TASK -c EXPDIR/config.yaml -p EXPDIR
       -m evaluate --device D -e EXPDIR/dev-best.ckpt -t test
   (the last states-N.ckpt when no dev-best.ckpt was written; ASR: dev-clean-best.ckpt and
   `-t test-clean`, s3prl's split names there).
5. Writes EXPDIR/result.json: task, upstream, ckpt (with --random-init: the checkpoint
   whose architecture was used), random_init, lr, steps, metric (per, wer: fractions, lower
   is better; acc: fraction, higher is better), dev (best dev value during training), test (of
   the states evaluated, `states`), data, counts (files per split), seconds (both runs).

EXPDIR holds one run: EXPDIR/run.json (its settings) is written first. Run again with the
same settings, the command returns the finished result, resumes s3prl's training from the
newest states-N.ckpt (`-m train -e`, e.g. after a preemption; a .ckpt whose write a kill cut
off is removed first), or starts again when no states were saved; a folder of other settings, or not of this command, is an error.
`mt4ssl superb` (mt4ssl.superb.sweep) runs this once per learning rate of a sweep.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
import yaml

from mt4ssl.errors import InputError
from mt4ssl.superb import tasks
from mt4ssl.superb.tasks import TASKS, check_data, get_task, parse_metric, task_config
from mt4ssl.utils.io import atomic_write_text
from mt4ssl.utils.precision import PRECISIONS

log = logging.getLogger(__name__)

UPSTREAMS = ("mt4ssl_local", "fbank")
RUN_FILE = "run.json"  # the settings of the run in the folder, written first


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help=f"SUPERB task: {', '.join(TASKS)}")
    parser.add_argument("--ckpt", type=Path, help="mt4ssl checkpoint (not with --upstream fbank)")
    parser.add_argument("--data", required=True, type=Path, help="task data folder (see mt4ssl.superb.tasks)")
    parser.add_argument("--out", required=True, type=Path, help="experiment folder (new or empty)")
    parser.add_argument("--upstream", default="mt4ssl_local", choices=UPSTREAMS,
                        help="mt4ssl_local (--ckpt) or s3prl's fbank baseline")
    parser.add_argument("--random-init", action="store_true",
                        help="the architecture of --ckpt with fresh weights")
    parser.add_argument("--lr", type=float, nargs="+", help="learning rate(s) of the sweep, one run each "
                        "(default: s3prl's, PR 1e-2, ASR/KS/SID/IC 1e-4)")
    parser.add_argument("--steps", type=int, help="total steps (default: s3prl's, PR 100k, ASR/KS/SID/IC 200k); "
                        "eval/save/log steps scale with it")
    parser.add_argument("--eval-step", type=int, help="evaluate dev every N steps (default: scaled)")
    parser.add_argument("--batch-size", type=int, help="(training) batch size (default: s3prl's, PR 16, ASR 32, KS 32, SID 8, IC 32)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="autocast of the mt4ssl upstream's forward (fp32; auto = bf16 where the "
                        "device has native bf16); s3prl's downstream stays fp32")
    parser.add_argument("--cache-gb", type=float, default=0.0,
                        help="keep the frozen upstream's states of up to this many GB of utterances in "
                        "memory, so later epochs skip it (0: off; mt4ssl.superb.upstream)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers (0)")
    parser.add_argument("--seed", type=int, default=1337, help="s3prl's seed; also --random-init's (1337)")


def superb(task_name: str, data: Path, out: Path, ckpt: Path | None = None,
           upstream: str = "mt4ssl_local", random_init: bool = False, lr: float | None = None,
           steps: int | None = None, eval_step: int | None = None,
           batch_size: int | None = None, device: str = "cpu",
           num_workers: int = 0, seed: int = 1337, precision: str = "fp32",
           cache_gb: float = 0.0) -> dict:
    """Run one task (see the module docstring); return the result dict."""
    task = get_task(task_name)
    data, out = Path(data).resolve(), Path(out).resolve()
    for name, value in (("--steps", steps), ("--eval-step", eval_step), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if lr is not None and not lr > 0:
        raise InputError(f"--lr must be > 0, got {lr}")
    if num_workers < 0:
        raise InputError(f"--num-workers must be >= 0, got {num_workers}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if upstream == "fbank" and (precision != "fp32" or cache_gb):
        raise InputError("--precision / --cache-gb apply to mt4ssl checkpoints; s3prl's fbank runs as it is")
    if not 0 <= cache_gb < float("inf"):
        raise InputError(f"--cache-gb must be >= 0, got {cache_gb}")
    model = _check_upstream(upstream, ckpt, random_init)
    source = None if ckpt is None else str(Path(ckpt).resolve())
    settings = {"task": task.name, "upstream": upstream, "ckpt": source, "random_init": random_init,
                "lr": lr, "steps": steps, "eval_step": eval_step, "batch_size": batch_size,
                "seed": seed, "precision": precision, "data": str(data)}
    resume = _prepare_out(out, settings)
    if isinstance(resume, dict):  # finished before
        return resume
    counts = check_data(task, data)
    log.info("%s data %s: %s", task.name, data, counts)
    batch = batch_size or tasks.batch_size(task.config)
    tasks.check_batches(task, counts, batch)

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_FILE, json.dumps(settings, indent=2) + "\n")
    common = ["--device", device, "--seed", str(seed), "-d", task.downstream]
    if resume is not None:  # s3prl restores its arguments and config from the states file
        log.info("%s: resuming s3prl training from %s", out, resume.name)
        _s3prl(["-m", "train", *common, "-e", str(resume)], out / "train.log", append=True)
    else:
        if random_init:
            ckpt = _fresh_weights(model, out / "random_init.pt", seed)
        config = task_config(task, data, out, steps, eval_step, lr, num_workers, batch_size)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        up = ["-u", upstream] + (["-k", str(Path(ckpt).resolve())] if upstream == "mt4ssl_local" else [])
        options = {k: v for k, v in (("precision", precision), ("cache_gb", cache_gb)) if v not in ("fp32", 0)}
        if options:  # s3prl's -g: the upstream's options (mt4ssl.superb.upstream)
            atomic_write_text(out / "upstream.yaml", yaml.safe_dump(options))
            up += ["-g", str(out / "upstream.yaml")]
        _s3prl(["-m", "train", *common, *up, "-c", str(out / "config.yaml"), "-p", str(out)],
               out / "train.log")
    config = yaml.safe_load((out / "config.yaml").read_text())
    states = out / f"{task.dev_split}-best.ckpt"
    if not states.is_file():
        saved = sorted(out.glob("states-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
        if not saved:
            raise RuntimeError(f"s3prl training wrote no dev-best.ckpt or states-*.ckpt in {out}")
        states = saved[-1]
    dev = parse_metric(task, task.dev_split, (out / "train.log").read_text(), out)  # all attempts
    seen = len(parse_metric(task, task.test_split, "", out))  # KS: log.log holds training-time tests too
    test_out = _s3prl(["-m", "evaluate", *common, "-e", str(states), "-t", task.test_split], out / "test.log")
    test = parse_metric(task, task.test_split, test_out, out)[seen:]
    if not test:
        raise RuntimeError(f"no test {task.metric} found in the s3prl output ({out / 'test.log'})")

    result = {"task": task.name, "upstream": upstream,
              "ckpt": source, "random_init": random_init, "lr": config["optimizer"]["lr"],
              "steps": config["runner"]["total_steps"], "batch_size": batch, "metric": task.metric,
              "dev": (min if not task.higher_better else max)(dev) if dev else None,
              "test": test[-1], "states": states.name, "data": str(data), "counts": counts,
              "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def _check_upstream(upstream: str, ckpt: Path | None, random_init: bool):
    """The model of `ckpt` (checked to load), or None for fbank."""
    if upstream == "fbank":
        if ckpt is not None or random_init:
            raise InputError("--upstream fbank takes no --ckpt / --random-init")
        return None
    if ckpt is None:
        raise InputError("--ckpt CKPT is required (an mt4ssl checkpoint; --random-init uses its "
                         "architecture), or use --upstream fbank")
    from mt4ssl.models.checkpoint import load_model

    try:
        return load_model(ckpt)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{ckpt}: an mt4ssl checkpoint whose model does not load: "
                         f"{type(e).__name__}: {e}") from None


def _fresh_weights(model, path: Path, seed: int) -> Path:
    from mt4ssl.models.checkpoint import save_checkpoint
    from mt4ssl.models.mt4ssl import MT4SSL

    torch.manual_seed(seed)
    save_checkpoint(path, MT4SSL(model.cfg), random_init_seed=seed)
    return path


def _prepare_out(out: Path, settings: dict) -> dict | Path | None:
    """What to do with the experiment folder: None to start (a new or empty folder, or one
    of an earlier attempt at the same run that saved no s3prl states: emptied), the newest
    states-N.ckpt to resume from, or the result of the same run finished before. A folder of
    another run, or not one of `mt4ssl superb`'s, is an error."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return None
    if not (out / RUN_FILE).is_file():
        raise InputError(f"--out {out}: exists and is not an empty folder nor one of an `mt4ssl superb` "
                         f"run (no {RUN_FILE}): s3prl would mix runs; give a new folder")
    before = json.loads((out / RUN_FILE).read_text())
    changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
    if changed:
        raise InputError(f"--out {out}: holds a run with other settings ("
                         + ", ".join(f"{k}: {before.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
                         + "); give a new folder")
    if (out / "result.json").is_file():
        log.info("%s: finished before, result.json kept", out)
        return json.loads((out / "result.json").read_text())
    for partial in sorted(p for p in out.glob("*.ckpt") if not _complete(p)):  # s3prl writes them in place
        log.warning("%s: incomplete (its write was cut off, e.g. by a kill): removed", partial)
        partial.unlink()
    saved = sorted(out.glob("states-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
    if saved:
        return saved[-1]
    log.info("%s: an earlier attempt saved no s3prl states; starting again", out)
    for path in out.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def _complete(path: Path) -> bool:
    """Whether a torch.save file is whole: a zip archive with its central directory, which
    is written last (a write cut off by a kill has none)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def _s3prl(argv: list[str], logfile: Path, append: bool = False) -> str:
    """Run s3prl's run_downstream (with the fixes) in a subprocess; its output goes to
    `logfile` (appended to with `append`: a resumed run) and is returned. A failure raises
    with the end of the log. The child ignores SIGUSR2, SLURM's warning signal, which the
    job's own process handles (requeue; the requeued run resumes from s3prl's last states)."""
    cmd = [sys.executable, "-m", "mt4ssl.superb._s3prl_main", *argv]
    log.info("running %s", " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(logfile, "a" if append else "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
    text = logfile.read_text()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"s3prl {argv[1]} failed (exit {proc.returncode}); log {logfile}:\n{tail}")
    return text
