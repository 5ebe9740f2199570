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

import dataclasses
import typing
from pathlib import Path

import torch

from mt4ssl.errors import InputError
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig
from mt4ssl.utils.io import atomic_open

FORMAT, VERSION = "mt4ssl", 1


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_from_dict(cls, data: dict, where: str = "config"):
    """Rebuild a (nested, frozen) config dataclass; an unknown key is an error naming it."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = config_from_dict(hints[key], value, f"{where}.{key}")
        else:
            kwargs[key] = _tuples(value)
    return cls(**kwargs)


def save_checkpoint(path: str | Path, model: MT4SSL, **extra) -> None:
    """Save the model (and any extra plain values / state dicts) atomically."""
    state = {"format": FORMAT, "version": VERSION, "model_config": config_to_dict(model.cfg),
             "model": model.state_dict(), **extra}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


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


def load_model(path: str | Path, map_location="cpu") -> MT4SSL:
    """The model of a checkpoint, in eval mode."""
    state = load_checkpoint(path, map_location)
    model = MT4SSL(config_from_dict(ModelConfig, state["model_config"], f"{path}: model_config"))
    model.load_state_dict(state["model"])
    return model.to(map_location).eval()
