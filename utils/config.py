"""Typed configuration: YAML sections parsed into dataclasses; unknown keys fail.

A config file may hold the whole training recipe; inference only needs the
``generator`` section (the codec's architecture) and ``audio_norm_scale``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


@dataclasses.dataclass
class GeneratorConfig:
    """The codec architecture (the ``generator.config`` section of the original YAML).

    ``n_filters`` is accepted for compatibility but, as in the original, unused: the
    acoustic encoder width is ``encoder_dim`` (64 in every release).
    """

    n_filters: int = 32
    D: int = 256
    target_bandwidths: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1, 1.5, 2, 4])
    ratios: list[int] = dataclasses.field(default_factory=lambda: [8, 5, 4, 2])
    sample_rate: int = 16000
    bins: int = 1024
    normalize: bool = False
    causal: bool = False
    semantic_techer: str = "hubert_base"
    encoder_dim: int = 64
    decoder_dim: int = 1024
    semantic_blocks: int = 2
    semantic_model_config: dict | None = None


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
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
            try:  # YAML 1.1 reads "2e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}.{name}: expected {_type_name(tp)}, got {value!r}")
        if tp is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def read_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` a mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return data


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a config YAML, resolving its optional ``base:`` (a path relative to the file).

    Override files name their base and hold only what they change.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file path, got {base!r}")
    return merge(read_config(path.parent / base, _seen + (path,)), data)


def generator_config_from_dict(data: dict, where: str = "config") -> tuple[GeneratorConfig, float]:
    """Extract ``(GeneratorConfig, audio_norm_scale)`` from a full (original or ours) config dict."""
    gen = data.get("generator")
    if gen is None:
        raise ConfigError(f"{where}: no 'generator' section (the codec architecture)")
    if isinstance(gen, dict) and "config" in gen:
        name = gen.get("name", "SoundStream")
        if name not in ("SoundStream", "XCodec"):
            raise ConfigError(f"{where}: generator.name {name!r} is not an X-Codec model (SoundStream)")
        gen = gen["config"]
    cfg = from_dict(GeneratorConfig, gen, f"{where}: generator.config")
    scale = data.get("audio_norm_scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ConfigError(f"{where}: audio_norm_scale: expected a number, got {scale!r}")
    return cfg, float(scale)


def load_generator_config(path: str | Path) -> tuple[GeneratorConfig, float]:
    """Read a YAML (original release or ours) and return ``(GeneratorConfig, audio_norm_scale)``."""
    return generator_config_from_dict(read_config(path), str(path))
