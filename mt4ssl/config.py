"""Typed configs: frozen dataclasses <-> plain dicts, YAML files and `key=value` overrides.

    cfg = load_config(PretrainConfig, "recipes/tiny/pretrain.yaml", ["optim.lr=1e-3"])

YAML and overrides are merged with OmegaConf (so `${...}` interpolations work), then built
into the dataclasses strictly: an unknown or misspelled key is an error naming it and the
file, a value of the wrong type (or a float that is NaN or infinite) is an error naming the key;
impossible values (a probability above 1, a negative rate) are the dataclasses' own checks.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

from mt4ssl.errors import InputError


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys (dotted, nested) whose values differ between two config dicts, as
    "key: a -> b" ("missing" where one side lacks the key)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "missing"), b.get(k, "missing")
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _convert(value, hint, where: str):
    """Check/convert a plain value to the field type `hint` (ints to floats, lists to tuples)."""
    origin = typing.get_origin(hint)
    if _is_dataclass_type(hint):
        return config_from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except InputError as e:
                errors.append(str(e))
        raise InputError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise InputError(f"{where}: expected {len(args)} values, got {list(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(hint)
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise InputError(f"{where}: expected {hint.__name__}, got {value!r}")
        if hint is float and not math.isfinite(value):
            raise InputError(f"{where}: expected a finite number, got {value!r}")
        return value
    if hint is typing.Any:
        return value
    raise InputError(f"{where}: unsupported field type {hint}")


def config_from_dict(cls, data, where: str = "config"):
    """Build the (nested, frozen) dataclass `cls` from a dict; unknown keys are errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known keys: {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, InputError) as e:
        raise InputError(f"{where}: {e}") from None


def load_config(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """A `cls` from a YAML file plus `key.sub=value` overrides (values parsed as YAML)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = str(path) if path else "config"
    try:
        base = OmegaConf.load(path) if path else OmegaConf.create({})
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except Exception as e:
        raise InputError(f"{path}: not a valid YAML config ({e})") from None
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise InputError(f"overrides {bad}: expected key=value (e.g. optim.lr=1e-4)")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise InputError(f"{where}: {e}") from None
    return config_from_dict(cls, data or {}, where)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (loads back with `load_config`)."""
    from omegaconf import OmegaConf

    from mt4ssl.utils.io import atomic_write_text

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(plain(config_to_dict(cfg)))))
