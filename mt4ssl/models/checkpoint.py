"""The project's checkpoint format: one `torch.save` dict of tensors and plain Python values,
so it loads with `torch.load(weights_only=True)` (no code runs from the file).

    {"format": "mt4ssl", "version": 1,
     "model_config": {...ModelConfig as a dict...},
     "model": state dict (student, heads, EMA teacher),
     ...}                      training checkpoints add optimizer, schedule, RNG states, ...

Written atomically (temporary file, fsync, rename): a crash during a save leaves the previous
file intact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mt4ssl.config import config_from_dict, config_to_dict
from mt4ssl.errors import InputError
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig
from mt4ssl.utils.io import atomic_open

FORMAT, VERSION = "mt4ssl", 1


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, file-size limit, I/O error); the
    file it was to replace, if any, is intact."""


def write_state(path: str | Path, state: dict) -> None:
    """Write a checkpoint dict (with "model_config" and "model") atomically, format-marked.

    A failed write (e.g. the disk is full) raises CheckpointWriteError saying so: the partial
    file is removed and `path` keeps its previous content. (torch.save reports a failed write
    as an unrelated-looking RuntimeError from its zip writer; the OSError behind it is what
    happened.)"""
    try:
        with atomic_open(path, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise
        raise CheckpointWriteError(
            cause.errno, f"{path}: writing the checkpoint failed: {cause.strerror or cause} (disk full, over "
            f"a quota or a file-size limit?); nothing was replaced: the checkpoints already in "
            f"{Path(path).parent} are intact and the partial file was removed") from e


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError in the chain of `e` (itself, its cause or its context), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def save_checkpoint(path: str | Path, model: MT4SSL, **extra) -> None:
    """Save the model (and any extra plain values / state dicts) atomically."""
    write_state(path, {"model_config": config_to_dict(model.cfg), "model": model.state_dict(), **extra})


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not an mt4ssl checkpoint (it does not load with "
                         f"weights_only=True: {str(e).splitlines()[0]}); a fairseq checkpoint "
                         f"must first be converted with `mt4ssl convert fairseq`") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not an mt4ssl checkpoint (no format marker)")
    if state.get("version", 0) > VERSION:
        raise InputError(f"{path}: checkpoint version {state['version']} is newer than this "
                         f"mt4ssl reads ({VERSION})")
    return state


def nonfinite_weight(weights: dict) -> str | None:
    """The name of the first floating-point tensor of a state dict holding a NaN or an
    infinity (nested dicts are searched too, as `outer.inner`), or None."""
    for name, value in weights.items():
        if isinstance(value, dict):
            inner = nonfinite_weight(value)
            if inner is not None:
                return f"{name}.{inner}"
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def load_model(path: str | Path, map_location="cpu") -> MT4SSL:
    """The model of a checkpoint, in eval mode; weights that do not fit its config, or that
    are not finite, are an InputError naming the file."""
    state = load_checkpoint(path, map_location)
    if not isinstance(state.get("model_config"), dict) or not isinstance(state.get("model"), dict):
        raise InputError(f"{path}: an mt4ssl checkpoint without 'model_config' and 'model'")
    model = MT4SSL(config_from_dict(ModelConfig, state["model_config"], f"{path}: model_config"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        text = " ".join(str(e).split())
        raise InputError(f"{path}: an mt4ssl checkpoint whose model does not load (its weights do not fit "
                         f"its model_config: another model size or target set?): {text[:300]}"
                         f"{' ...' if len(text) > 300 else ''}") from None
    bad = nonfinite_weight(state["model"])
    if bad is not None:
        raise InputError(f"{path}: weight {bad} holds NaN or infinite values (a diverged run?); "
                         f"use an earlier checkpoint")
    return model.to(map_location).eval()
