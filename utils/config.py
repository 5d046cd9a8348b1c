"""Reading configs: YAML files, their ``base:`` chains, and typed dataclass views (:func:`from_dict`) whose unknown
keys, wrong types and values out of range (:func:`setting`) fail naming the key and the file."""

import contextlib
import dataclasses
import functools
import math
import operator
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp in (int, float):  # a bool is no number here; an int is a float
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):  # NoneType, dict, str, bool, ...
        return isinstance(value, tp)
    return True


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None, choices: tuple | None = None,
            nonempty: bool = False) -> Any:  # fmt: skip
    """A dataclass field with its allowed range: bounds on a number or on every item of a list (NaN never passes),
    ``choices``, ``nonempty`` (a list); checked by :func:`from_dict` and :func:`check_ranges`."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "nonempty": nonempty}
    return dataclasses.field(default=default, default_factory=factory or dataclasses.MISSING, metadata=meta)


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _range_problem(value: Any, meta: typing.Mapping) -> str | None:
    """Why ``value`` is outside the range of a :func:`setting` (``None``: it is inside)."""
    if meta.get("nonempty") and isinstance(value, list) and not value:
        return "must not be empty"
    items = value if isinstance(value, list) else [value]
    choices = meta.get("choices")
    for item in items:
        if choices is not None and item is not None and item not in choices:
            return f"expected one of {', '.join(map(str, choices))}, got {item!r}"
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            return f"must be a finite number, got {value!r}"
        for key, (within, word) in _BOUNDS.items():
            bound = meta.get(key)
            if bound is not None and not within(item, bound):
                subject = "every item must be" if isinstance(value, list) else "must be"
                return f"{subject} {word} {bound}, got {value!r}"
    return None


def check_ranges(obj: Any, where: str = "config") -> None:
    """Check every field of dataclass ``obj`` (recursively) against its :func:`setting` range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{where}.{f.name}")
        elif (problem := _range_problem(value, f.metadata)) is not None:
            raise ConfigError(f"{where}.{f.name}: {problem}")


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and values out of range raise ConfigError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{where}.{name}")
            continue
        if tp is float and isinstance(value, str):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads "2e-4" (no dot) as a string
                value = float(value)
        if not _type_ok(value, tp):
            expected = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise ConfigError(f"{where}.{name}: expected {expected}, got {value!r}")
        kwargs[name] = float(value) if tp is float and isinstance(value, int) else value
    required = [n for n, f in fields.items() if dataclasses.MISSING is f.default is f.default_factory]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    obj = cls(**kwargs)
    check_ranges(obj, where)
    return obj


def read_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` a mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:  # e.g. 100k nested "[": the parser recurses once per level
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return data


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_layers(path: str | Path, _seen: tuple = ()) -> list[tuple[str, dict]]:
    """``[(file, mapping without base)]`` for ``path`` and the ``base:`` files it names, base first."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [(str(path), data)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file path, got {base!r}")
    return config_layers(config_dir(path) / base, _seen + (path.resolve(),)) + [(str(path), data)]


def config_dir(path: str | Path) -> Path:
    """Where relative paths inside config ``path`` start: its directory, or a linked config's target's."""
    path = Path(path)
    return path.resolve().parent if path.is_symlink() else path.parent


def read_config(path: str | Path) -> dict:
    """A config YAML merged over its ``base:`` chain."""
    return functools.reduce(merge, (data for _, data in config_layers(path)), {})
