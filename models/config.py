"""The codec architecture: the ``generator.config`` section of the original and our YAML."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from modules.teacher import TEACHERS
from utils.config import ConfigError, check_ranges, from_dict, read_config, setting


@dataclasses.dataclass
class GeneratorConfig:
    """The codec architecture (the ``generator.config`` section of the original YAML).

    ``n_filters`` is accepted for compatibility but, as in the original, unused: the
    acoustic encoder width is ``encoder_dim`` (64 in every release).
    """

    n_filters: int = 32
    D: int = setting(256, gt=0)
    target_bandwidths: list[float] = setting(factory=lambda: [0.5, 1, 1.5, 2, 4], gt=0, nonempty=True)
    ratios: list[int] = setting(factory=lambda: [8, 5, 4, 2], ge=1, nonempty=True)
    sample_rate: int = setting(16000, gt=0)
    bins: int = setting(1024, ge=2)
    normalize: bool = False
    causal: bool = False
    semantic_techer: str = setting("hubert_base", choices=tuple(TEACHERS))
    encoder_dim: int = setting(64, gt=0)
    decoder_dim: int = setting(1024, gt=0)
    semantic_blocks: int = setting(2, ge=1)
    semantic_model_config: dict | None = None

    def check(self, where: str = "config") -> None:
        """Refuse values outside their ranges and combinations no model can be built from.

        Raises:
            ConfigError: naming the key and ``where`` (the file).
        """
        check_ranges(self, where)
        if self.target_bandwidths != sorted(self.target_bandwidths):
            raise ConfigError(f"{where}.target_bandwidths: must be in increasing order, got {self.target_bandwidths}")
        per_codebook = self.frame_rate * math.log2(self.bins) / 1000
        if self.target_bandwidths[-1] < per_codebook:
            raise ConfigError(
                f"{where}.target_bandwidths: the largest, {self.target_bandwidths[-1]} kbps, is less than one "
                f"codebook ({per_codebook:g} kbps at {self.frame_rate} frames/s and {self.bins} bins)"
            )
        if self.decoder_dim < 2 ** len(self.ratios):
            raise ConfigError(
                f"{where}.decoder_dim: {self.decoder_dim} is halved at each of the {len(self.ratios)} "
                f"upsampling stages; it must be at least {2 ** len(self.ratios)}"
            )

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
    cfg.check(f"{where}: generator.config")
    scale = data.get("audio_norm_scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ConfigError(f"{where}: audio_norm_scale: expected a number, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"{where}: audio_norm_scale: must be a finite number > 0, got {scale!r}")
    return cfg, float(scale)


def load_generator_config(path: str | Path) -> tuple[GeneratorConfig, float]:
    """Read a YAML (original release or ours) and return ``(GeneratorConfig, audio_norm_scale)``."""
    return generator_config_from_dict(read_config(path), str(path))
