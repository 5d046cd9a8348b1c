"""The codec architecture: the ``generator.config`` section of the original and our YAML."""

import dataclasses
import math
from pathlib import Path

from modules.teacher import TEACHER_SIZE_KEYS, TEACHERS, teacher_parameters, teacher_size
from utils.budget import check_budget
from utils.config import ConfigError, check_ranges, from_dict, read_config, setting

SIZE_KEYS = ("D", "target_bandwidths", "ratios", "sample_rate", "bins", "encoder_dim", "decoder_dim", "semantic_blocks")


@dataclasses.dataclass
class GeneratorConfig:
    """The codec architecture; ``n_filters`` is accepted but, as in the original, unused (``encoder_dim`` is)."""

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
        """ConfigError naming the key and ``where`` for values out of range or that build no model."""
        check_ranges(self, where)
        if self.target_bandwidths != sorted(self.target_bandwidths):
            raise ConfigError(f"{where}.target_bandwidths: must be in increasing order, got {self.target_bandwidths}")
        per_codebook = self.frame_rate * math.log2(self.bins) / 1000
        if self.target_bandwidths[-1] < per_codebook:
            one = f"one codebook ({per_codebook:g} kbps at {self.frame_rate} frames/s and {self.bins} bins)"
            largest = f"the largest, {self.target_bandwidths[-1]} kbps"
            raise ConfigError(f"{where}.target_bandwidths: {largest}, is less than {one}")
        if self.decoder_dim < 2 ** len(self.ratios):
            n = len(self.ratios)
            stages = f"is halved at each of the {n} upsampling stages; it must be at least {2**n}"
            raise ConfigError(f"{where}.decoder_dim: {self.decoder_dim} {stages}")
        # The keys that size the model (the teacher's as semantic_model_config.<key>), and their defaults.
        teachers = teacher_size(self.semantic_techer, self.semantic_model_config)
        sizes, defaults = (
            {k: getattr(cfg, k) for k in SIZE_KEYS} | {f"semantic_model_config.{k}": v for k, v in teacher.items()}
            for cfg, teacher in zip((self, GeneratorConfig()), teachers)
        )
        check_budget(codec_parameters, sizes, defaults, f"{where}.")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        """Code frames per second, as the original computes it (rounded up)."""
        return math.ceil(self.sample_rate / self.hop_length)


def codec_parameters(v: dict) -> float:
    """Parameters and codebook buffers (within 2x) of a codec of sizes ``v`` (floats: 10^9 builds no bigint)."""
    teacher = teacher_parameters({k: v[f"semantic_model_config.{k}"] for k in TEACHER_SIZE_KEYS})
    h, d = float(v["semantic_model_config.hidden_size"]), float(v["D"])
    ratios = [float(r) for r in v["ratios"]]
    frame_rate = math.ceil(float(v["sample_rate"]) / math.prod(ratios))
    n_q = 1000 * float(max(v["target_bandwidths"])) / (frame_rate * math.log2(float(v["bins"])))
    total = teacher + 3 * n_q * float(v["bins"]) * (d + h)  # codebooks: embedding, EMA sum and counts
    width = float(v["encoder_dim"])
    for r in ratios:  # three residual units (k7 + k1) on `width`, then a strided conv to twice it
        total += 24 * width * width + 4 * r * width * width
        width *= 2
    total += width * d * 3
    width = float(v["decoder_dim"])
    total += d * width * 7
    for r in ratios:  # a transposed conv halving the width, three residual units
        total += r * width * width + 6 * width * width
        width /= 2
    total += 6 * float(v["semantic_blocks"]) * 8 * h * h  # semantic encoder and decoder
    return total + (d + h) * (2 * (d + h))  # fc_prior, fc_post1, fc_post2


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
    return cfg, check_audio_norm_scale(data.get("audio_norm_scale", 1.0), where)


def check_audio_norm_scale(scale: object, where: str | Path) -> float:
    """``scale`` as a float when it is a finite number > 0 (not a bool), else ConfigError."""
    if type(scale) not in (int, float) or not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"{where}: audio_norm_scale: expected a finite number > 0, got {scale!r}")
    return float(scale)


def load_generator_config(path: str | Path) -> tuple[GeneratorConfig, float]:
    """Read a YAML (original release or ours) and return ``(GeneratorConfig, audio_norm_scale)``."""
    return generator_config_from_dict(read_config(path), str(path))
