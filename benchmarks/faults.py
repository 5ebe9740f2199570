"""Fault injection: what the cluster and the machine can do to a run, and what survives it.

    python benchmarks/faults.py [--kills 24] [--updates 240] [--work DIR] [--only NAME ...]

Faults (each a function here; tests/test_faults.py runs them with small counts in `make test`):
  kill9       kill -9 the tiny CPU pretraining (its process group) at random moments and the
              moment a checkpoint's temporary file appears; resume each time; check every
              checkpoint file after every kill; at the end compare the final weights,
              optimizer state and per-update log with an uninterrupted run's (bit for bit)
  kill9_finetune  the same for the CTC fine-tuning of the pretrained checkpoint
  disk_full   a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) below the checkpoint's size:
              the save fails with a message saying so, the checkpoints already written stay
              byte-identical; the run then resumes without the limit and ends as the
              uninterrupted one
  shards      `mt4ssl features` shard jobs and the `mt4ssl labels` job killed mid-write and
              rerun: features and labels byte-identical to an uninterrupted run's; a second
              worker started on a shard being written stops with an error naming the first
  sigterm     the same with SIGTERM to the process group (how SLURM stops every process of a
              job): each attempt saves and stops, nothing is redone
  slurm_*     on a real single-node SLURM cluster (tools/slurm_local.py; needs root and
              slurm-wlm + munge): a stage chain runs in dependency order, a failed stage
              cancels its dependants, `scancel --signal=USR2` (submitit's preemption signal), a
              time limit hit mid-run and a real preemption by a higher-priority partition's job
              (SIGTERM, SIGKILL, requeue) make the job save and resume with no update lost or
              repeated
  dry_run     recipes/librispeech/submit.py --dry-run with no SLURM command on PATH
  superb      an `mt4ssl superb` sweep killed during its second learning rate and rerun: the
              finished rate is kept, the interrupted one resumes from s3prl's states

Writes the "Faults" section of results/reliability.md (other sections are kept).
SLURM holds a requeued job for 120 s (BeginTime) before it may start again; the SLURM faults
release it at once (`scontrol update StartTime=now`), as an admin could, to keep them short.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mt4ssl.models.checkpoint import load_checkpoint  # noqa: E402

RESULTS = REPO / "results" / "reliability.md"
HEADER = ("# Reliability\n\nFaults injected into runs and bad inputs fed to every stage; each section "
          "was printed by the command it names.\n")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
VOLATILE = {"time", "audio_s_per_s", "updates_per_s", "data_wait_frac", "mem_gb", "valid_seconds"}
TRAIN = [32001, 40007, 48319, 35555, 57603, 33333, 36000, 41000]
VALID = [33001, 45007, 38319]
SMALL_MODEL = {
    "preset": "tiny", "embed_dim": 32, "ffn_dim": 64, "num_heads": 4, "num_layers": 2, "pos_conv_groups": 4,
    "teacher": {"top_k": 2}, "conv_layers": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
    "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0,
}
UPDATE_LINE = re.compile(r"INFO mt4ssl\.train: update (\d+)/\d+ ")
RESUMED_LINE = re.compile(r"resumed from (\S+) at update (\d+)")
# the trainer's line once checkpoint_last holds the update it stopped at (written then, or by
# that update's numbered save)
SAVED_LAST = r"(?:saved \S*checkpoint_last\.pt \(update (\d+)\)|\S*checkpoint_last\.pt already holds update (\d+))"


def mt4ssl(*args) -> list[str]:
    return [sys.executable, "-m", "mt4ssl", *map(str, args)]


# ----------------------------------------------------------------------------- data and runs

def prepare(root: Path, train=TRAIN, valid=VALID) -> Path:
    """A generated LibriSpeech-layout tree (tests/conftest.py's), its manifests (`root/m`) and
    50 Hz MFCC k-means labels (`root/lab`, k=8) of the train and valid splits."""
    from mt4ssl.cli import main
    from tests.conftest import write_tree

    if (root / "lab" / "valid.km").is_file():
        return root
    write_tree(root / "libri", {"train": list(train), "valid": list(valid)})
    m, f, lab = root / "m", root / "f", root / "lab"
    steps = [["manifest", root / "libri", "--out", m],
             *(["features", "mfcc", m, s, f] for s in ("train", "valid")),
             ["kmeans", f, "train", lab / "km.npz", "-k", "8", "--fraction", "1"],
             *(["labels", f, s, lab / "km.npz", "--manifest-dir", m, "--out", lab] for s in ("train", "valid"))]
    for argv in steps:
        if main(list(map(str, argv))) != 0:
            raise RuntimeError(f"preparing the fault data: `mt4ssl {' '.join(map(str, argv))}` failed")
    return root


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, data: Path, out: Path, updates: int, **sections) -> Path:
    """The tiny CPU pretraining config of the faults: a 2-layer model, checkpoints every 2
    updates (2 kept besides the first), validation every 5 (checkpoint_best written both as a
    link and as its own file), one data-loader worker, every update logged."""
    cfg = {"model": SMALL_MODEL,
           "data": {"manifest_dir": str(data / "m"), "labels": {"km": str(data / "lab")}, "max_tokens": 100000,
                    "num_workers": 1},
           "optim": {"lr": 1e-3},
           "run": {"out_dir": str(out), "max_updates": updates, "log_interval": 1, "save_interval": 2,
                   "keep_last": 2, "valid_interval": 5, "device": "cpu", "threads": 1, "precision": "fp32"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_merge(cfg, sections), sort_keys=False))
    return path


def start(cmd: list[str], log: Path, preexec=None) -> subprocess.Popen:
    """`cmd` in a new process group (so a kill reaches its data-loader worker, as SLURM's
    does), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=REPO,
                                start_new_session=True, preexec_fn=preexec)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL:
        proc.wait()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def comparable(rows: list[dict]) -> list[dict]:
    """The log rows without wall-clock values (times, speeds, memory)."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def updates_logged(text: str) -> list[int]:
    """The updates a run's output says it made ("update k/N" lines, log_interval 1)."""
    return [int(m.group(1)) for m in UPDATE_LINE.finditer(text)]


def write_finetune_config(path: Path, data: Path, out: Path, init_from: Path, updates: int) -> Path:
    """CTC fine-tuning of the faults' tiny model on the same data (letters of the manifests):
    time and channel masking, the encoder frozen for the first 3 updates, checkpoints every 2
    updates, validation (greedy WER) every 5, every update logged."""
    cfg = {"model": {"mask_prob": 0.5, "mask_length": 5, "mask_channel_prob": 0.25, "mask_channel_length": 8,
                     "layerdrop": 0.0, "freeze_finetune_updates": 3},
           "data": {"manifest_dir": str(data / "m"), "valid_split": "valid", "max_tokens": 100000,
                    "num_workers": 1},
           "optim": {"lr": 2e-3},
           "run": {"out_dir": str(out), "init_from": str(init_from), "max_updates": updates, "log_interval": 1,
                   "save_interval": 2, "keep_last": 2, "valid_interval": 5, "device": "cpu", "threads": 1,
                   "precision": "fp32"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def reference(cfg: Path, out: Path, *overrides: str, command: str = "pretrain") -> Path:
    """An uninterrupted run of `cfg` in `out` (kept when it finished before)."""
    done = out / "done"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(mt4ssl(command, cfg, f"run.out_dir={out}", *overrides), env=ENV, cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the uninterrupted run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        done.write_text(proc.stderr)
    return out


def same_state(a: Path, b: Path) -> dict:
    """Bitwise comparison of two training checkpoints: model weights, optimizer state, the rest."""
    import torch

    sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))

    def equal(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(equal, x, y))
        return x == y

    return {"weights": equal(sa["model"], sb["model"]), "optimizer": equal(sa["optimizer"], sb["optimizer"]),
            "updates": (sa["num_updates"], sb["num_updates"]),
            "rest": all(equal(sa[k], sb[k]) for k in ("scheduler", "sampler", "num_updates", "model_config"))}


def check_checkpoints(folder: Path) -> tuple[int, list[str]]:
    """Load every checkpoint file in `folder`: (files checked, the ones that do not load)."""
    bad, files = [], sorted(folder.glob("checkpoint_*.pt")) if folder.exists() else []
    for path in files:
        try:
            state = load_checkpoint(path)
            if not isinstance(state.get("num_updates"), int) or "model" not in state:
                bad.append(f"{path.name}: incomplete state")
        except Exception as e:  # noqa: BLE001 (any failure to load is what is counted)
            bad.append(f"{path.name}: {e}")
    return len(files), bad


def saved_update(folder: Path) -> int:
    last = folder / "checkpoint_last.pt"
    return int(load_checkpoint(last)["num_updates"]) if last.exists() else 0


def leftovers(folder: Path) -> list[str]:
    """Temporary files of a checkpoint write that was killed (`.checkpoint_*.tmp` / `.link`)."""
    return sorted(p.name for p in folder.glob(".checkpoint_*")) if folder.exists() else []


def compare_run(run: Path, ref: Path) -> dict:
    rows, ref_rows = log_rows(run), log_rows(ref)
    seq = [r["update"] for r in rows]
    return {"log_updates_once_each": seq == sorted(set(seq)) and seq == [r["update"] for r in ref_rows],
            "losses_equal": comparable(rows) == comparable(ref_rows),
            **{f"final_{k}": v for k, v in same_state(run / "checkpoints/checkpoint_last.pt",
                                                      ref / "checkpoints/checkpoint_last.pt").items()}}


# ----------------------------------------------------------------------------- kill -9

def kill9(work: Path, data: Path, kills: int = 24, updates: int = 240, seed: int = 0, most: int = 12,
          command: str = "pretrain", sig: int = signal.SIGKILL) -> dict:
    """Kill -9 the pretraining (`command` "finetune": the CTC fine-tuning of the uninterrupted
    pretraining's checkpoint) `kills` times, resuming each time, then let it finish. Every
    other kill comes the moment a checkpoint's temporary file appears after the attempt's
    first update; the others at a random moment: during start-up (a random time before the
    first update), or at a random time within an update after 1 to `most` updates. With `sig`
    SIGTERM, that signal to the process group instead (as SLURM and container runtimes stop a
    job), each attempt then waited for."""
    rng = random.Random(seed)
    if command == "finetune":
        pre = write_config(work / "tiny.yaml", data, work / "unused", updates)
        source = reference(pre, work / f"reference_{updates}") / "checkpoints" / "checkpoint_last.pt"
        cfg = write_finetune_config(work / "tiny_ft.yaml", data, work / "unused", source, updates)
        ref = reference(cfg, work / f"reference_ft_{updates}", command="finetune")
    else:
        cfg = write_config(work / "tiny.yaml", data, work / "unused", updates)
        ref = reference(cfg, work / f"reference_{updates}")
    run = work / ("kill9" if sig == signal.SIGKILL else signal.Signals(sig).name.lower())
    run = run.with_name(run.name + ("" if command == "pretrain" else f"_{command}"))
    shutil.rmtree(run, ignore_errors=True)
    ckpts = run / "checkpoints"
    attempts = []
    while len(attempts) < kills:
        before = saved_update(ckpts)
        log = run.parent / f"{run.name}_logs" / f"attempt{len(attempts):02d}.log"
        proc = start(mt4ssl(command, cfg, f"run.out_dir={run}"), log)
        t0 = time.time()
        made = lambda: updates_logged(log.read_text())  # noqa: E731
        if len(attempts) % 2:
            mode = "checkpoint write"
            while proc.poll() is None and time.time() - t0 < 120 and not made():
                time.sleep(0.01)
            while proc.poll() is None and time.time() - t0 < 120 and not leftovers(ckpts):
                time.sleep(0.0005)
        elif rng.random() < 0.3:
            mode, delay = "start-up", rng.uniform(0.1, 3.0)
            while proc.poll() is None and time.time() - t0 < delay and not made():
                time.sleep(0.005)
        else:
            mode, target = "training", before + rng.randint(1, most)
            while proc.poll() is None and time.time() - t0 < 120 and (made() or [0])[-1] < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.1))  # somewhere in the next update (or its save, validation, log)
        if proc.poll() is not None:
            raise RuntimeError(f"attempt {len(attempts)} ended before it was killed (exit {proc.returncode}); "
                               f"give more updates than kills can use up:\n{log.read_text()[-2000:]}")
        kill_group(proc, sig)
        code = proc.wait()
        left = leftovers(ckpts)
        checked, corrupt = check_checkpoints(ckpts)
        text = log.read_text()
        resumed = [(Path(m.group(1)).name, int(m.group(2))) for m in RESUMED_LINE.finditer(text)]
        attempts.append({"mode": mode, "exit": code, "seconds": round(time.time() - t0, 2), "started_at": before,
                         "resumed": resumed, "updates": updates_logged(text), "leftovers": left,
                         "checked": checked, "corrupt": corrupt, "saved_after": saved_update(ckpts)})
    before = saved_update(ckpts)
    log = run.parent / f"{run.name}_logs" / "final.log"
    proc = start(mt4ssl(command, cfg, f"run.out_dir={run}"), log)
    if proc.wait() != 0:
        raise RuntimeError(f"the final attempt failed:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    final = {"started_at": before, "resumed": [(Path(m.group(1)).name, int(m.group(2)))
                                              for m in RESUMED_LINE.finditer(text)], "updates": updates_logged(text)}
    later = [*attempts[1:], final]
    resumable = [a for a in later if a["started_at"] > 0]
    made = [u for a in [*attempts, final] for u in a["updates"]]
    return {
        "command": command, "signal": signal.Signals(sig).name, "kills": len(attempts), "updates": updates,
        "exits": sorted({a["exit"] for a in attempts}),
        "during_checkpoint_write": sum(bool(a["leftovers"]) for a in attempts),
        "kill_modes": {m: sum(a["mode"] == m for a in attempts) for m in ("start-up", "training", "checkpoint write")},
        "restarts": len(later),
        "resumable": len(resumable),  # restarts that had a checkpoint_last to resume from
        # restarts that resumed from the newest checkpoint (the others were killed before they got there)
        "resumed": sum(a["resumed"] == [("checkpoint_last.pt", a["started_at"])] for a in resumable),
        "killed_before_resuming": sum(not a["resumed"] for a in resumable),
        "wrong_resumes": sum(bool(a["resumed"]) and a["resumed"] != [("checkpoint_last.pt", a["started_at"])]
                             for a in resumable),
        "fresh_starts_with_a_checkpoint": sum(a["started_at"] > 0 and not a["resumed"] and bool(a["updates"])
                                              for a in later),
        "checkpoint_files_checked": sum(a["checked"] for a in attempts),
        "corrupt": [c for a in attempts for c in a["corrupt"]],
        "progress_lost": sum(a["saved_after"] < a["started_at"] for a in attempts),
        "updates_made": len(made), "updates_redone": len(made) - len(set(made)),
        "all_updates_made": sorted(set(made)) == list(range(1, updates + 1)),
        **compare_run(run, ref), "attempts": attempts,
    }


# ----------------------------------------------------------------------------- disk full

def _file_size_limit(limit: int):
    def preexec():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("checkpoint_*.pt"))}


def disk_full(work: Path, data: Path, times: int = 4, updates: int = 240) -> dict:
    """`times` times: run a few updates normally (stopped with SIGUSR1, which saves), then
    resume under a file-size limit below a checkpoint's size; finally finish without it."""
    cfg = write_config(work / "tiny.yaml", data, work / "unused", updates)
    ref = reference(cfg, work / f"reference_{updates}")
    run = work / "disk_full"
    shutil.rmtree(run, ignore_errors=True)
    ckpts, logs = run / "checkpoints", work / "disk_full_logs"
    size = (ref / "checkpoints/checkpoint_last.pt").stat().st_size
    limit = size * 6 // 10
    injections = []
    for i in range(times):
        log = logs / f"normal{i}.log"
        proc = start(mt4ssl("pretrain", cfg, f"run.out_dir={run}"), log)
        first = saved_update(ckpts)
        wait_for(lambda: proc.poll() is not None or (updates_logged(log.read_text()) or [0])[-1] >= first + 3,
                 120, "a few updates")
        os.kill(proc.pid, signal.SIGUSR1)  # the trainer saves checkpoint_last and stops (exit 3)
        if proc.wait() != 3:
            raise RuntimeError(f"a stop with SIGUSR1 did not exit with 3:\n{log.read_text()[-2000:]}")
        before, at = _digests(ckpts), saved_update(ckpts)
        log = logs / f"limited{i}.log"
        proc = start(mt4ssl("pretrain", cfg, f"run.out_dir={run}"), log, preexec=_file_size_limit(limit))
        code = proc.wait()
        text = log.read_text()
        message = next((line.strip() for line in text.splitlines() if "writing the checkpoint failed" in line), "")
        checked, corrupt = check_checkpoints(ckpts)
        injections.append({
            "saved_at": at, "exit": code, "message": message,
            "files_unchanged": _digests(ckpts) == before, "checkpoint_last_update": saved_update(ckpts),
            "leftovers": leftovers(ckpts), "checked": checked, "corrupt": corrupt,
            "survived": (code != 0 and "File too large" in message and _digests(ckpts) == before
                         and saved_update(ckpts) == at and not leftovers(ckpts) and not corrupt)})
    log = logs / "final.log"
    proc = start(mt4ssl("pretrain", cfg, f"run.out_dir={run}"), log)
    if proc.wait() != 0:
        raise RuntimeError(f"the run after the disk-full failures did not finish:\n{log.read_text()[-3000:]}")
    return {"injected": len(injections), "survived": sum(i["survived"] for i in injections),
            "limit_bytes": limit, "checkpoint_bytes": size,
            "corrupt": [c for i in injections for c in i["corrupt"]],
            "message": injections[0]["message"] if injections else "", **compare_run(run, ref),
            "injections": injections}


# ----------------------------------------------------------------------------- shard jobs

SHARD_LENGTHS = [80000 + 997 * i for i in range(24)]


def _tree_bytes(folder: Path, pattern: str) -> dict[str, bytes]:
    """The files `pattern` of `folder` (not the hidden lock and temporary files)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")}


def _kill_when(proc: subprocess.Popen, folder: Path, prefix: str, rng: random.Random, timeout: float = 60) -> bool:
    """Kill -9 `proc` shortly after a temporary file `prefix*` appears in `folder` (or when it
    ends); True when the file was still there after the kill (killed mid-write)."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if folder.exists() and any(n.startswith(prefix) and n.endswith(".tmp") for n in os.listdir(folder)):
            time.sleep(rng.uniform(0, 0.03))
            break
        time.sleep(0.0005)
    kill_group(proc)
    return folder.exists() and any(n.startswith(prefix) and n.endswith(".tmp") for n in os.listdir(folder))


def shards(work: Path, nshard: int = 3, rounds: int = 2, seed: int = 0) -> dict:
    """Feature shards and labels, killed mid-write and rerun `rounds` times each, against an
    uninterrupted run; then two workers on one shard."""
    from mt4ssl.cli import main
    from tests.conftest import write_tree

    rng = random.Random(seed)
    root = work / "shards"
    shutil.rmtree(root, ignore_errors=True)
    write_tree(root / "libri", {"train": SHARD_LENGTHS})
    m = root / "m"
    assert main(["manifest", str(root / "libri"), "--out", str(m)]) == 0
    ref_f, ref_lab, km = root / "ref_f", root / "ref_lab", root / "km.npz"
    labels = ["--manifest-dir", m, "--nshard", nshard]
    for argv in (["features", "mfcc", m, "train", ref_f, "--nshard", nshard, "--all-shards"],
                 ["kmeans", ref_f, "train", km, "--nshard", nshard, "-k", "8", "--fraction", "1"],
                 ["labels", ref_f, "train", km, *labels, "--out", ref_lab]):  # uninterrupted, in this process
        if main(list(map(str, argv))) != 0:
            raise RuntimeError(f"`mt4ssl {' '.join(map(str, argv))}` failed")

    f, lab, logs = root / "f", root / "lab", root / "logs"
    kills, mid, reruns = 0, 0, 0
    for i in range(nshard):
        cmd = mt4ssl("features", "mfcc", m, "train", f, "--shard", i, "--nshard", nshard)
        for r in range(rounds):
            mid += _kill_when(start(cmd, logs / f"shard{i}_kill{r}.log"), f, f".train_{i}_{nshard}.npy", rng)
            kills += 1
        if start(cmd, logs / f"shard{i}_rerun.log").wait() != 0:
            raise RuntimeError(f"the rerun of shard {i} failed: {(logs / f'shard{i}_rerun.log').read_text()[-2000:]}")
        reruns += 1
    cmd = mt4ssl("labels", f, "train", km, *labels, "--out", lab)
    for r in range(rounds):
        mid += _kill_when(start(cmd, logs / f"labels_kill{r}.log"), lab, ".train.km.", rng)
        kills += 1
    if start(cmd, logs / "labels_rerun.log").wait() != 0:
        raise RuntimeError(f"the labels rerun failed: {(logs / 'labels_rerun.log').read_text()[-2000:]}")
    reruns += 1
    # the .json records the seconds the shard took: compare what it says about the data
    meta = [{k: v for k, v in json.loads((d / f"train_{i}_{nshard}.json").read_text()).items() if k != "seconds"}
            for i in range(nshard) for d in (f, ref_f)]
    features_equal = all(_tree_bytes(f, f"train_*{ext}") == _tree_bytes(ref_f, f"train_*{ext}")
                         for ext in (".npy", ".len")) and meta[0::2] == meta[1::2]
    labels_equal = _tree_bytes(lab, "*") == _tree_bytes(ref_lab, "*")
    left = sorted(p.name for p in [*f.glob(".*.tmp"), *lab.glob(".*.tmp")])

    # two workers on one shard: the first is paused mid-write while the second starts
    two = root / "two"
    cmd = mt4ssl("features", "mfcc", m, "train", two, "--shard", 0, "--nshard", nshard)
    first = start(cmd, logs / "first.log")
    wait_for(lambda: first.poll() is not None or any(n.endswith(".npy.tmp") for n in os.listdir(two))
             if two.exists() else False, 60, "the first worker to start writing", poll=0.0005)
    kill_group(first, signal.SIGSTOP)
    second = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
    kill_group(first, signal.SIGCONT)
    first_code = first.wait()
    after = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)  # finished: kept
    two_equal = all(_tree_bytes(two, f"train_0_{nshard}{ext}") == _tree_bytes(ref_f, f"train_0_{nshard}{ext}")
                    for ext in (".npy", ".len"))
    return {"kills": kills, "mid_write": mid, "reruns_ok": reruns, "features_equal": features_equal,
            "labels_equal": labels_equal, "leftover_tmp_after_reruns": left,
            "second_worker": {"exit": second.returncode, "message": second.stderr.strip().splitlines()[-1:],
                              "first_exit": first_code, "first_pid_named": f"pid {first.pid}" in second.stderr,
                              "rerun_after": after.stdout.strip().splitlines()[-1:], "output_equal": two_equal}}


# ----------------------------------------------------------------------------- SLURM

def job_tasks(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o ID`: one dict per job (array task) of its key=value fields."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]


def job_state(job_id: str) -> dict[str, str]:
    tasks = job_tasks(job_id)
    return tasks[0] if tasks else {}


def requeued(job_id: str, timeout: float) -> dict[str, str]:
    """Wait until the job is back in the queue after a requeue (Restarts > 0, PENDING)."""
    return wait_for(lambda: (s := job_state(job_id)).get("Restarts", "0") != "0"
                    and s.get("JobState") in ("PENDING", *FINISHED) and s, timeout, f"job {job_id}'s requeue",
                    poll=0.1)


def release(job_id: str) -> str:
    """Start a requeued job now instead of after SLURM's 120 s hold; returns the BeginTime it had."""
    begin = job_state(job_id).get("StartTime", "")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True,
                   timeout=30)
    return begin


def write_profile(path: Path, **keys) -> Path:
    """A cluster profile for the local cluster: partition debug, CPU jobs of one core."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"partition": "debug", "gpus_per_node": 0, "cpus_per_task": 1, **keys}))
    return path


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE")


def slurm_chain(work: Path, data: Path) -> dict:
    """A 3-stage chain (manifest -> 2-shard MFCC array -> k-means) and a chain whose first
    stage fails (its dependants must be cancelled, not run)."""
    from mt4ssl.launch import Stage, executor_for, submit_chain
    from mt4ssl.train.config import LaunchConfig

    root = work / "chain"
    shutil.rmtree(root, ignore_errors=True)
    launch = LaunchConfig(launcher="slurm", profile=str(write_profile(root / "profile.yaml", timeout_min=10)))
    ex = executor_for(launch, root / "jobs")
    m, f = root / "m", root / "f"
    cpu = {"gpus_per_node": 0, "timeout_min": 10}
    jobs = submit_chain([
        Stage("manifest", ["manifest", str(data / "libri"), "--out", str(m), "--splits", "train"], params=cpu),
        Stage("mfcc", ["features", "mfcc", str(m), "train", str(f), "--shard", "{shard}", "--nshard", "2"],
              shards=2, params=cpu),
        Stage("kmeans", ["kmeans", str(f), "train", str(root / "km.npz"), "--nshard", "2", "-k", "4",
                         "--fraction", "1"], params=cpu),
    ], ex)
    ids = [stage[0].job_id.split("_")[0] for stage in jobs]
    wait_for(lambda: all(t.get("JobState") in FINISHED for i in ids for t in job_tasks(i)), 300,
             "the chain to finish", poll=0.5)
    stages = [job_tasks(i) for i in ids]
    ordered = all(min(t["StartTime"] for t in later) >= max(t["EndTime"] for t in earlier)
                  for earlier, later in zip(stages, stages[1:]))
    ok = {"states": [[t["JobState"] for t in s] for s in stages], "in_order": ordered,
          "outputs": (m / "train.tsv").is_file() and all((f / f"train_{i}_2.json").is_file() for i in range(2))
          and (root / "km.npz").is_file()}

    failing = submit_chain([
        Stage("bad-manifest", ["manifest", str(root / "nowhere"), "--out", str(root / "m2")], params=cpu),
        Stage("after-bad", ["features", "mfcc", str(root / "m2"), "train", str(root / "f2")], params=cpu),
        Stage("after-after", ["kmeans", str(root / "f2"), "train", str(root / "km2.npz"), "-k", "4"], params=cpu),
    ], ex)
    fids = [stage[0].job_id for stage in failing]
    wait_for(lambda: all(job_state(i).get("JobState") in FINISHED for i in fids), 300, "the failing chain", poll=0.5)
    fstates = [job_state(i) for i in fids]
    err = Path(failing[0][0].paths.stderr)
    return {"chain": ok, "failing": {
        "states": [s["JobState"] for s in fstates], "reasons": [s.get("Reason") for s in fstates],
        "dependants_never_ran": all(s.get("RunTime") == "00:00:00" for s in fstates[1:]),
        "error_names_command": err.exists() and "exited with code 2" in err.read_text(),
        "no_output": not (root / "f2").exists()}}


def _submit_pretraining(cfg_path: Path, out: Path, profile: Path, *overrides: str):
    from mt4ssl.config import load_config
    from mt4ssl.launch import launch
    from mt4ssl.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, cfg_path, [f"run.out_dir={out}", "launch.launcher=slurm",
                                                 f"launch.profile={profile}", *overrides])
    return launch(cfg)


def _attempts(text: str) -> list[list[int]]:
    """The updates each attempt of a job made, from its stderr (an attempt starts with the
    "JobEnvironment(...)" line mt4ssl.launch logs)."""
    runs: list[list[int]] = []
    for line in text.splitlines():
        if "mt4ssl.launch.submit: JobEnvironment(" in line or not runs:
            runs.append([])
        m = UPDATE_LINE.search(line)
        if m:
            runs[-1].append(int(m.group(1)))
    return [r for r in runs if r] or [[]]


def slurm_preemption(work: Path, data: Path, updates: int = 40, after: int = 3) -> dict:
    """The tiny pretraining as a SLURM job through submitit; `scancel --signal=USR2` once it
    made `after` updates (what SLURM sends before a preemption); the job must save, requeue
    itself and resume; compared with an uninterrupted run."""
    cfg = write_config(work / "tiny.yaml", data, work / "unused", updates)
    ref = reference(cfg, work / f"reference_{updates}")
    out = work / "slurm_preemption"
    shutil.rmtree(out, ignore_errors=True)
    job = _submit_pretraining(cfg, out, write_profile(out.parent / "profile_preempt.yaml", timeout_min=10))
    err = Path(job.paths.stderr)
    text = lambda: err.read_text() if err.exists() else ""  # noqa: E731
    wait_for(lambda: len(updates_logged(text())) >= after, 300, f"{after} updates of job {job.job_id}", poll=0.02)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
    state = requeued(job.job_id, 120)
    held_until = release(job.job_id) if state.get("JobState") == "PENDING" else ""
    final = wait_for(lambda: (s := job_state(job.job_id)).get("JobState") in FINISHED and s, 300,
                     "the job to finish", poll=0.5)
    log = text()
    attempts = _attempts(log)
    flat = [u for a in attempts for u in a]
    resumed = [int(m.group(2)) for m in RESUMED_LINE.finditer(log)]
    return {"job": job.job_id, "state": final["JobState"], "restarts": int(final.get("Restarts", 0)),
            "requeue_state": state.get("JobState"), "held_until": held_until,
            "saved_on_signal": bool(re.search(r"received SIGUSR2.*?" + SAVED_LAST, log, re.S))
            and "preemption checkpoint saved" in log,
            "resumed_at": resumed, "attempts": [[a[0], a[-1]] if a else [] for a in attempts],
            "no_update_lost_or_repeated": flat == list(range(1, updates + 1)),
            "corrupt": check_checkpoints(out / "checkpoints")[1], **compare_run(out, ref)}


def _requeued_then_stopped(work: Path, data: Path, name: str, interrupt, after_resume: int, timeout_min: int,
                           *overrides: str, **profile) -> tuple[str, dict, dict]:
    """The open-ended SLURM cases: a long tiny pretraining submitted as `slurm_{name}` while an
    uninterrupted run of the same config goes on on the other core; `interrupt(job, text)` does
    what makes SLURM requeue the job (and returns what it wants reported). Once requeued, it is
    released, stopped with USR1 (save and stop) `after_resume` updates into the resumed attempt,
    and compared update by update with the uninterrupted run. Returns the job's log, the
    interrupt's report and the fields both cases report."""
    cfg = write_config(work / "timeout.yaml", data, work / "unused", 100_000,
                       optim={"schedule": "constant", "warmup_ratio": 0.0},
                       run={"save_interval": 100_000, "valid_interval": 0})
    out, ref = work / f"slurm_{name}", work / f"reference_{name}"
    for d in (out, ref):
        shutil.rmtree(d, ignore_errors=True)
    job = _submit_pretraining(cfg, out, write_profile(out.parent / f"profile_{name}.yaml", timeout_min=timeout_min,
                                                       **profile), *overrides)
    reference_run = start(mt4ssl("pretrain", cfg, f"run.out_dir={ref}"), work / f"reference_{name}.log")
    err = Path(job.paths.stderr)
    text = lambda: err.read_text() if err.exists() else ""  # noqa: E731
    try:
        report = interrupt(job, text)
        state = requeued(job.job_id, 300)
        requeue_saved = saved_update(out / "checkpoints")
        held_until = release(job.job_id) if state.get("JobState") == "PENDING" else ""
        wait_for(lambda: len(_attempts(text())) >= 2 and len(_attempts(text())[-1]) >= after_resume, 300,
                 "the resumed attempt", poll=0.05)
        subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True, timeout=30)
        final = wait_for(lambda: (s := job_state(job.job_id)).get("JobState") in FINISHED and s, 120,
                         "the job to stop", poll=0.5)
        stopped = saved_update(out / "checkpoints")
        wait_for(lambda: len(log_rows(ref)) >= stopped, 300, "the uninterrupted run to get as far", poll=0.2)
    finally:
        kill_group(reference_run)
    log = text()
    attempts = _attempts(log)
    flat = [u for a in attempts for u in a]
    rows = log_rows(out)
    return log, {**report, "saved_at_requeue": requeue_saved}, {
        "job": job.job_id, "state": final["JobState"], "restarts": int(final.get("Restarts", 0)),
        "time_limit": final.get("TimeLimit"), "held_until": held_until, "resumed_at": [int(m.group(2)) for m in RESUMED_LINE.finditer(log)],
        "attempts": [[a[0], a[-1]] if a else [] for a in attempts], "stopped_at": stopped,
        "no_update_lost_or_repeated": flat == list(range(1, stopped + 1)),
        "corrupt": check_checkpoints(out / "checkpoints")[1],
        "log_updates_once_each": [r["update"] for r in rows] == list(range(1, stopped + 1)),
        "losses_equal": comparable(rows) == comparable(log_rows(ref)[:len(rows)])}


def slurm_timeout(work: Path, data: Path, after_resume: int = 3) -> dict:
    """A job with a 1-minute time limit (submitit's USR2 comes 15 s before it; SLURM sends it up
    to 30 s early) in a run far longer: it must save at the signal, requeue and resume."""
    log, report, common = _requeued_then_stopped(
        work, data, "timeout", lambda job, text: {}, after_resume, 1, "launch.max_requeues=3", signal_delay_s=15)
    return {**common, "warning_after_s": _warning_after(log), "saved_at_signal": report["saved_at_requeue"]}


def slurm_priority_preemption(work: Path, data: Path, after: int = 3) -> dict:
    """A real preemption: the tiny pretraining in the `debug` partition, then a job of the
    `urgent` partition (PriorityTier 2) asking for every core. SLURM sends SIGTERM (the
    default: no PreemptParameters=send_user_signal), SIGKILL after the partition's GraceTime,
    and requeues the job (PreemptMode=REQUEUE)."""
    from tools.slurm_local import URGENT

    def preempt(job, text) -> dict:
        wait_for(lambda: len(updates_logged(text())) >= after, 300, f"{after} updates of job {job.job_id}", poll=0.05)
        urgent = subprocess.run(["sbatch", "--parsable", "-p", URGENT, "-c", str(os.cpu_count() or 1), "-o",
                                 str(work / "slurm_priority" / "urgent.out"), "--wrap", "sleep 1"],
                                capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        return {"urgent": urgent}

    log, report, common = _requeued_then_stopped(work, data, "priority", preempt, after, 10)
    first = log.split("mt4ssl.launch.submit: JobEnvironment(")[1] if log.count("JobEnvironment(") > 1 else log
    term = re.search(r"received SIGTERM.*?" + SAVED_LAST, first, re.S)
    return {**common, "urgent_job": report["urgent"], "urgent_state": job_state(report["urgent"]).get("JobState"),
            "preempted": "DUE TO PREEMPTION" in log, "saved_on_sigterm": int(term.group(1) or term.group(2)) if term else None}


def _warning_after(text: str) -> float | None:
    """Seconds from the job's (first attempt's) start to the SIGUSR2 the trainer received."""
    from datetime import datetime

    def stamp(marker: str):
        line = next((x for x in text.splitlines() if marker in x), None)
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") if line else None

    begin, signal_at = stamp("mt4ssl.launch.submit: JobEnvironment("), stamp("received SIGUSR2")
    return round((signal_at - begin).total_seconds(), 1) if begin and signal_at else None


# ----------------------------------------------------------------------------- dry run, SUPERB

def dry_run(work: Path) -> dict:
    """recipes/librispeech/submit.py --dry-run with an empty PATH (no srun, no sbatch)."""
    empty = work / "empty_bin"
    empty.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(REPO / "recipes/librispeech/submit.py"), "--librispeech",
                           "/data/LibriSpeech", "--work", str(work / "nowhere"), "--dry-run"],
                          env={**ENV, "PATH": str(empty)}, capture_output=True, text=True, cwd=REPO)
    stages = [line for line in proc.stdout.splitlines() if line.startswith("stage ")]
    return {"exit": proc.returncode, "stages": len(stages), "traceback": "Traceback" in proc.stderr,
            "wrote_nothing": not (work / "nowhere").exists()}


def superb_sweep(work: Path, ckpt: Path, steps: int = 4) -> dict:
    """`mt4ssl superb --task pr` over two learning rates, killed (its process group, as SLURM
    kills a job) once the second rate's s3prl run saved states; then rerun."""
    from tests.conftest import WORDS, write_tree

    root = work / "superb"
    shutil.rmtree(root, ignore_errors=True)
    data = write_tree(root / "libri", {"train-clean-100": [32000, 40000, 36000], "dev-clean": [32000],
                                       "test-clean": [36000]})
    (data / "lexicon.txt").write_text("".join(f"{w}\tHH AH0 L OW1\n" for w in WORDS))
    out = root / "sweep"
    cmd = mt4ssl("superb", "--task", "pr", "--ckpt", ckpt, "--data", data, "--out", out, "--lr", "1e-2", "1e-3",
                 "--steps", steps, "--eval-step", steps // 2, "--batch-size", 2, "--num-workers", 0, "--seed", 1)
    first, second = out / "lr0.01", out / "lr0.001"
    proc = start(cmd, root / "first.log")
    try:
        wait_for(lambda: proc.poll() is not None or any(second.glob("states-*.ckpt")), 600,
                 "the second learning rate's first s3prl states", poll=0.01)
    finally:
        kill_group(proc)
    from mt4ssl.superb.runner import _complete

    states = sorted(second.glob("states-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
    killed = {"killed": proc.returncode == -signal.SIGKILL, "first_finished": (first / "result.json").is_file(),
              "second_finished": (second / "result.json").is_file(), "second_states": [p.name for p in states],
              "states_cut_off": [p.name for p in states if not _complete(p)]}
    kept = {p.name: p.stat().st_mtime_ns for p in first.iterdir()} if first.exists() else {}
    result_before = (first / "result.json").read_bytes() if killed["first_finished"] else b""
    rerun = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
    after = {p.name: p.stat().st_mtime_ns for p in first.iterdir()} if first.exists() else {}
    summary = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {}
    return {**killed, "rerun_exit": rerun.returncode, "rerun_tail": rerun.stderr.strip().splitlines()[-3:],
            "first_kept": after == kept and (first / "result.json").read_bytes() == result_before,
            "first_kept_logged": "finished before, result.json kept" in rerun.stderr,
            "second_resumed_from": re.findall(r"resuming s3prl training from (states-\d+\.ckpt)", rerun.stderr),
            "runs": sorted(r["folder"] for r in summary.get("runs", [])), "pending": summary.get("pending")}


# ----------------------------------------------------------------------------- report

def report(results: dict) -> str:
    import torch

    lines = [f"torch {torch.__version__}, CPU capability `{torch.backends.cpu.get_cpu_capability()}`; "
             "a tiny CPU pretraining (2 layers x 32, 8 utterances, one data-loader worker, "
             "checkpoints every 2 updates, validation every 5; the CTC fine-tuning starts from the "
             "uninterrupted pretraining's checkpoint).", "",
             "| fault | injected | survived | corrupt checkpoints | equal to the uninterrupted run |",
             "|---|---|---|---|---|"]
    for key, what in (("kill9", "the pretraining"), ("kill9_finetune", "the CTC fine-tuning")):
        if key not in results:
            continue
        k = results[key]
        eq = k["losses_equal"] and k["final_weights"] and k["final_optimizer"] and k["log_updates_once_each"]
        modes = k["kill_modes"]
        lines.append(
            f"| kill -9 of {what}'s process group (at random moments: {modes['start-up']} during start-up, "
            f"{modes['training']} during training; {modes['checkpoint write']} when a checkpoint's temporary "
            f"file appeared; {k['during_checkpoint_write']} kills left a partial checkpoint write "
            f"behind) | {k['kills']} | {k['resumed']} restarts resumed from the newest "
            f"checkpoint, {k['killed_before_resuming']} killed again before resuming, "
            f"{k['wrong_resumes']} resumed from another file or update; the final attempt finished | "
            f"{len(k['corrupt'])} of {k['checkpoint_files_checked']} files checked after the kills | "
            f"{'yes' if eq else 'NO'}: final weights and optimizer state bit for bit, all {k['updates']} "
            f"per-update log rows ({k['updates_redone']} updates were redone after kills) |")
    if "sigterm" in results:
        k = results["sigterm"]
        eq = k["losses_equal"] and k["final_weights"] and k["final_optimizer"] and k["log_updates_once_each"]
        lines.append(
            f"| SIGTERM to the pretraining's process group, as SLURM signals every process of a job (scancel, "
            f"time limit, a preemption by default) ({k['kill_modes']['start-up']} during start-up, "
            f"{k['kill_modes']['training']} during training, {k['kill_modes']['checkpoint write']} during a "
            f"checkpoint write) | {k['kills']} | {k['resumed']} restarts resumed from the newest checkpoint "
            f"(exit codes {k['exits']}: 3 saved and stopped, -15 killed before training started) | "
            f"{len(k['corrupt'])} of {k['checkpoint_files_checked']} | {'yes' if eq else 'NO'}: bit for bit, "
            f"{k['updates_redone']} updates redone |")
    if "disk_full" in results:
        d = results["disk_full"]
        eq = d["losses_equal"] and d["final_weights"] and d["final_optimizer"]
        lines.append(
            f"| file-size limit of {d['limit_bytes']:,} bytes (a checkpoint is {d['checkpoint_bytes']:,}) while "
            f"saving | {d['injected']} | {d['survived']}: the run stopped saying so, the checkpoints already "
            f"written byte-identical, no partial file left | {len(d['corrupt'])} | "
            f"{'yes' if eq else 'NO'}: resumed without the limit |")
    if "shards" in results:
        s = results["shards"]
        two = s["second_worker"]
        lines.append(
            f"| kill -9 of `mt4ssl features` shard jobs and of `mt4ssl labels`, rerun | {s['kills']} "
            f"({s['mid_write']} mid-write) | {s['kills']} | - | features "
            f"{'byte-identical' if s['features_equal'] else 'DIFFER'}, labels "
            f"{'byte-identical' if s['labels_equal'] else 'DIFFER'} |")
        lines.append(
            f"| a second worker on a shard being written | 1 | {'yes' if two['exit'] == 2 and two['first_pid_named'] else 'NO'}: "
            f"it stopped (exit {two['exit']}) naming the first worker's pid; the first finished "
            f"(exit {two['first_exit']}) | - | {'yes' if two['output_equal'] else 'NO'} |")
    if "slurm_chain" in results:
        c = results["slurm_chain"]
        lines.append(
            f"| SLURM: stage chain manifest -> MFCC array (2) -> k-means | 1 | "
            f"{'ran in dependency order' if c['chain']['in_order'] else 'OUT OF ORDER'}, states "
            f"{c['chain']['states']} | - | - |")
        fl = c["failing"]
        lines.append(
            f"| SLURM: first stage of a 3-stage chain fails | 1 | dependants {fl['states'][1:]} "
            f"({', '.join(map(str, fl['reasons'][1:]))}), never ran | - | - |")
    for key, what in (("slurm_preemption", "`scancel --signal=USR2` (preemption warning)"),
                      ("slurm_timeout", "time limit hit mid-run (1 min; submitit's USR2 15 s before it, "
                                        "SLURM sent it {warning_after_s} s after the start)")):
        if key in results:
            p = results[key]
            eq = p["losses_equal"] and p.get("final_weights", True)
            how = (": final weights bit for bit" if "final_weights" in p
                   else f" (per-update log to update {p.get('stopped_at')})")
            what = what.format(warning_after_s=p.get("warning_after_s"))
            lines.append(
                f"| SLURM: {what} | 1 | saved, requeued (Restarts={p['restarts']}), resumed at update "
                f"{p['resumed_at']}; updates per attempt {p['attempts']}, none lost or repeated: "
                f"{'yes' if p['no_update_lost_or_repeated'] else 'NO'} | {len(p['corrupt'])} | "
                f"{'yes' if eq else 'NO'}{how} |")
    if "slurm_priority" in results:
        p = results["slurm_priority"]
        lines.append(
            f"| SLURM: a real preemption, by a job of a higher-priority partition (PreemptMode=REQUEUE, "
            f"GraceTime 5 s: SIGTERM, then SIGKILL) | 1 | "
            f"{'saved at the SIGTERM (update ' + str(p['saved_on_sigterm']) + ')' if p['saved_on_sigterm'] else 'NOT saved'}"
            f", killed, requeued by SLURM (Restarts={p['restarts']}), resumed at update {p['resumed_at']}; updates "
            f"per attempt {p['attempts']}, none lost or repeated: {'yes' if p['no_update_lost_or_repeated'] else 'NO'} | "
            f"{len(p['corrupt'])} | {'yes' if p['losses_equal'] else 'NO'} (per-update log to update {p['stopped_at']}) |")
    if "dry_run" in results:
        r = results["dry_run"]
        lines.append(f"| `recipes/librispeech/submit.py --dry-run` with no SLURM on PATH | 1 | "
                     f"{'yes' if r['exit'] == 0 and not r['traceback'] else 'NO'}: {r['stages']} stages planned, "
                     f"nothing written | - | - |")
    if "superb" in results:
        s = results["superb"]
        cut = f" ({', '.join(s['states_cut_off'])} cut off mid-write, removed)" if s["states_cut_off"] else ""
        lines.append(f"| `mt4ssl superb` sweep (2 learning rates) killed when the second rate's s3prl states "
                     f"file appeared{cut} | 1 | "
                     f"{'yes' if s['first_kept'] and s['rerun_exit'] == 0 else 'NO'}: the finished rate kept, the "
                     f"other resumed from {s['second_resumed_from'] or 'the start'}; runs {s['runs']} | - | - |")
    for key in SLURM_FAULTS:
        if results.get(f"{key}_skipped"):
            lines.append(f"| {key} | skipped: {results[f'{key}_skipped']} | | | |")
    if "slurm_preemption" in results or "slurm_timeout" in results:
        lines += ["", "SLURM held each requeued job for 120 s (BeginTime) before it could start again; the "
                  "script released it at once with `scontrol update StartTime=now`."]
    return "\n".join(lines) + "\n"


SLURM_FAULTS = ("slurm_chain", "slurm_preemption", "slurm_timeout", "slurm_priority")
FAULTS = ("kill9", "kill9_finetune", "sigterm", "disk_full", "shards", "slurm", "dry_run", "superb")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=24, help="kill -9 injections into the pretraining (default 24; "
                   "half as many into the fine-tuning)")
    p.add_argument("--updates", type=int, default=240, help="updates of the killed run (default 240)")
    p.add_argument("--disk-full", type=int, default=4, help="disk-full injections (default 4)")
    p.add_argument("--only", nargs="+", choices=FAULTS, default=list(FAULTS))
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print, do not write the results file")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mt4ssl-faults-"))
    results: dict = {}
    try:
        data = prepare(work / "data")
        if "kill9" in args.only:
            results["kill9"] = kill9(work, data, args.kills, args.updates)
            print(json.dumps({k: v for k, v in results["kill9"].items() if k != "attempts"}), flush=True)
        if "kill9_finetune" in args.only:
            results["kill9_finetune"] = kill9(work, data, args.kills // 2, args.updates, command="finetune")
            print(json.dumps({k: v for k, v in results["kill9_finetune"].items() if k != "attempts"}), flush=True)
        if "sigterm" in args.only:
            results["sigterm"] = kill9(work, data, args.kills // 2, args.updates, sig=signal.SIGTERM)
            print(json.dumps({k: v for k, v in results["sigterm"].items() if k != "attempts"}), flush=True)
        if "disk_full" in args.only:
            results["disk_full"] = disk_full(work, data, args.disk_full, args.updates)
            print(json.dumps({k: v for k, v in results["disk_full"].items() if k != "injections"}), flush=True)
        if "shards" in args.only:
            results["shards"] = shards(work)
            print(json.dumps(results["shards"]), flush=True)
        if "slurm" in args.only:
            from tools import slurm_local

            try:
                with slurm_local.running():
                    for key, fn in (("slurm_chain", lambda: slurm_chain(work, data)),
                                    ("slurm_preemption", lambda: slurm_preemption(work, data)),
                                    ("slurm_timeout", lambda: slurm_timeout(work, data)),
                                    ("slurm_priority", lambda: slurm_priority_preemption(work, data))):
                        results[key] = fn()
                        print(json.dumps(results[key]), flush=True)
            except slurm_local.Unavailable as e:
                for key in SLURM_FAULTS:
                    results[f"{key}_skipped"] = str(e)
        if "dry_run" in args.only:
            results["dry_run"] = dry_run(work)
            print(json.dumps(results["dry_run"]), flush=True)
        if "superb" in args.only:
            import torch

            from mt4ssl.models.checkpoint import save_checkpoint
            from mt4ssl.models.mt4ssl import MT4SSL
            from tests.conftest import small_model_config

            torch.manual_seed(0)
            ckpt = work / "tiny_ckpt.pt"
            save_checkpoint(ckpt, MT4SSL(small_model_config()))
            results["superb"] = superb_sweep(work, ckpt)
            print(json.dumps(results["superb"]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/faults.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    body = report(results)
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import write_section

        write_section("Faults", command, body, path=args.out, header=HEADER)
        print(f"wrote the Faults section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
