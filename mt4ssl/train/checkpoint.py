"""Training checkpoints in `{out_dir}/checkpoints/`.

    checkpoint_<updates>.pt   every `save_interval` updates; the first and the last
                              `keep_last` are kept
    checkpoint_last.pt        the newest state, always a complete file
    checkpoint_best.pt        the state with the lowest validation loss so far (run.valid_interval)

A resume reads checkpoint_last.pt; when it is missing, truncated, corrupt or holds weights that
are not finite, the newest usable numbered checkpoint instead, with a warning naming both
(`load_resume`); a folder whose checkpoints are all unusable is an error, never a fresh start.

Every file is written atomically (temporary file, fsync, rename), so a kill during a save
leaves the previous files intact; checkpoint_last is a hard link to the newest numbered
file when there is one (no second write of a multi-GB file), and so is checkpoint_best when it
is written at the update of a numbered file. The format is the model checkpoint's
(`mt4ssl.models.checkpoint`) plus the training state, so `load_model`, `mt4ssl extract` and
the s3prl upstream read training checkpoints directly (checkpoint_best.pt included).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import load_checkpoint, nonfinite_weight, write_state

log = logging.getLogger("mt4ssl.train")

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
NUMBERED = re.compile(r"checkpoint_(\d+)\.pt$")


class CheckpointDir:
    def __init__(self, folder: str | Path, keep_last: int = 1):
        self.folder = Path(folder)
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.folder / LAST

    @property
    def best(self) -> Path:
        return self.folder / BEST

    def numbered(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.folder.glob("checkpoint_*.pt")
                 if (m := NUMBERED.match(p.name))]
        return sorted(found)

    def save(self, state: dict, updates: int, numbered: bool) -> Path:
        """Write `state`; as checkpoint_<updates>.pt too when `numbered`. Returns the path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".checkpoint_*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
        if not numbered:
            write_state(self.last, state)
            return self.last
        path = self.folder / f"checkpoint_{updates}.pt"
        write_state(path, state)
        self._link(path, self.last)
        self._prune()
        return path

    def save_best(self, state: dict, same_as: Path | None = None) -> Path:
        """Write `state` as checkpoint_best.pt: a hard link to `same_as` when that file holds
        the same state (written at this update), else a new file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if same_as is None:
            write_state(self.best, state)
        else:
            self._link(same_as, self.best)
        return self.best

    def _link(self, path: Path, name: Path) -> None:
        """Make `name` a hard link to `path`, atomically (replacing what `name` was)."""
        link = self.folder / f".{name.name}.link"
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, name)

    def _prune(self) -> None:
        files = self.numbered()
        keep = {files[0][1], *(p for _, p in files[-self.keep_last:])} if files else set()
        for _, p in files:
            if p not in keep:
                p.unlink()

    def load_last(self, map_location="cpu") -> dict | None:
        return load_checkpoint(self.last, map_location) if self.last.exists() else None

    def load_resume(self, map_location="cpu") -> tuple[dict, Path] | None:
        """The state to resume from and its file: checkpoint_last.pt, or, when it is missing,
        truncated, corrupt or not finite, the newest numbered checkpoint that is usable (with
        a warning naming both). None when the folder has no checkpoint at all (a new run);
        an InputError when it has some but none is usable (never a silent fresh start)."""
        numbered = [p for _, p in reversed(self.numbered())]
        candidates = ([self.last] if self.last.exists() else []) + numbered
        problems = [] if self.last.exists() or not numbered else [f"{self.last}: not found"]
        for path in candidates:
            try:
                state = load_checkpoint(path, map_location)
                why = unusable(state)
            except InputError as e:
                why = str(e).removeprefix(f"{path}: ")
            if why is None:
                if problems:
                    log.warning("%s; resuming from %s instead (the newest usable numbered checkpoint)",
                                "; ".join(problems), path)
                return state, path
            problems.append(f"{path}: {why}")
        if problems:
            raise InputError(f"no checkpoint in {self.folder} can be resumed from ({'; '.join(problems)}); "
                             f"move the folder away to start a new run, or set run.out_dir to another one")
        return None


TRAINING_FIELDS = ("model_config", "model", "optimizer", "scheduler", "scaler", "sampler", "num_updates")


def unusable(state: dict) -> str | None:
    """Why a loaded checkpoint cannot be resumed from (not a training checkpoint, weights that
    are not finite), or None."""
    missing = [k for k in TRAINING_FIELDS if k not in state]
    if missing:
        return f"not a training checkpoint (no {', '.join(missing)})"
    weights = {k: state[k] for k in ("model", "ctc") if isinstance(state.get(k), dict)}
    bad = nonfinite_weight(weights) if "model" in weights else "model"
    if bad is not None:
        return f"weight {bad} holds NaN or infinite values"
    return None
