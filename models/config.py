"""The codec architecture: the ``generator.config`` section of the original and our YAML."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from utils.config import ConfigError, from_dict, read_config


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

    @property
    def hop_length(self) -> int:
        """Samples per code frame (the product of the encoder ratios)."""
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        """Code frames per second, as the original computes it (rounded up)."""
        return math.ceil(self.sample_rate / self.hop_length)


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
