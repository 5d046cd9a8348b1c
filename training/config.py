"""The typed training configuration: every section of the recipe YAML as a dataclass, and the merge of its layers
(``base:`` chain, ``--exp_config``, ``key.sub=value`` overrides), each checked on its own (docs/training.md).
The merged dict (``raw``) is kept verbatim: checkpoints store it and ``XCodec.from_pretrained`` reads it back."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import GeneratorConfig, generator_config_from_dict
from utils.budget import MAX_STEP_ELEMENTS, check_budget
from utils.config import ConfigError, config_dir, config_layers, from_dict, merge, setting


@dataclass
class GeneratorSection:
    """``generator:`` — the codec architecture (``name`` kept for original-config compatibility)."""

    name: str = "SoundStream"
    config: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class MFDConfig:
    """Multi-frequency discriminator (``mfd``, the released recipe's only discriminator)."""

    hop_lengths: list[int] = setting(factory=lambda: [32, 64, 128, 256, 512, 1024], ge=1, nonempty=True)
    hidden_channels: list[int] = setting(factory=lambda: [64, 128, 256, 512, 512, 512], ge=32)
    domain: str = setting("double", choices=("linear", "log", "double"))
    mel_scale: bool = True
    sample_rate: int = setting(16000, gt=0)


@dataclass
class MPDConfig:
    """HiFi-GAN multi-period discriminator (``mpd``)."""

    period_sizes: list[int] = setting(factory=lambda: [2, 3, 5, 7, 11], ge=1, nonempty=True)
    period_kernel_size: int = setting(5, ge=1)


@dataclass
class MSDConfig:
    """HiFi-GAN multi-scale discriminator (``msd``)."""

    num_scales: int = setting(3, ge=1)
    pool_kernel_size: int = setting(4, ge=1)
    pool_stride: int = setting(2, ge=1)


@dataclass
class MSSTFTDConfig:
    """EnCodec multi-scale STFT discriminator (``msstftd``)."""

    filters: int = setting(32, ge=1)
    n_ffts: list[int] = setting(factory=lambda: [1024, 2048, 512], ge=2, nonempty=True)
    hop_lengths: list[int] = setting(factory=lambda: [256, 512, 128], ge=1, nonempty=True)
    win_lengths: list[int] = setting(factory=lambda: [1024, 2048, 512], ge=1, nonempty=True)


@dataclass
class AdamWConfig:
    """``torch.optim.AdamW`` arguments (weight_decay 0.01 is AdamW's default, which the original used)."""

    lr: float = setting(2.0e-4, gt=0)
    betas: list[float] = setting(factory=lambda: [0.8, 0.99], ge=0, lt=1)
    eps: float = setting(1.0e-6, gt=0)
    weight_decay: float = setting(0.01, ge=0)


@dataclass
class OptimizerConfig:
    g: AdamWConfig = field(default_factory=AdamWConfig)
    d: AdamWConfig = field(default_factory=AdamWConfig)


@dataclass
class ExponentialLRConfig:
    gamma: float = setting(0.999, gt=0, le=1)


@dataclass
class SchedulerConfig:
    """``ExponentialLR`` for G and D. ``interval: epoch`` steps once per epoch, as the original."""

    g: ExponentialLRConfig = field(default_factory=ExponentialLRConfig)
    d: ExponentialLRConfig = field(default_factory=ExponentialLRConfig)
    interval: str = setting("epoch", choices=("epoch", "step"))


@dataclass
class LossWeights:
    """Weight of every loss term; the names are also the tensorboard keys (``loss/<name>``)."""

    full_stft: float = setting(1.0, ge=0)
    sub_stft: float = setting(1.0, ge=0)
    mel: float = setting(0.0, ge=0)
    feature_matching: float = setting(20.0, ge=0)
    adversarial: float = setting(1.0, ge=0)
    semantic: float = setting(100.0, ge=0)
    commit: float = setting(1.0, ge=0)


@dataclass
class STFTLossConfig:
    """Full-band multi-resolution STFT loss (Parallel WaveGAN sizes of the original)."""

    fft_sizes: list[int] = setting(factory=lambda: [512, 1024, 2048], ge=2, nonempty=True)
    win_sizes: list[int] = setting(factory=lambda: [480, 960, 1200], ge=1, nonempty=True)
    hop_sizes: list[int] = setting(factory=lambda: [120, 240, 300], ge=1, nonempty=True)


@dataclass
class SubbandSTFTLossConfig:
    """PQMF sub-band multi-resolution STFT loss."""

    num_bands: int = setting(6, ge=1)
    fft_sizes: list[int] = setting(factory=lambda: [128, 256, 256], ge=2, nonempty=True)
    win_sizes: list[int] = setting(factory=lambda: [80, 120, 200], ge=1, nonempty=True)
    hop_sizes: list[int] = setting(factory=lambda: [20, 40, 50], ge=1, nonempty=True)


@dataclass
class MelConfig:
    """HiFi-GAN log-mel settings: the optional mel loss and the validation mel distance."""

    sampling_rate: int = setting(16000, gt=0)
    n_fft: int = setting(1024, ge=2)
    num_mels: int = setting(80, ge=1)
    hop_size: int = setting(160, ge=1)
    win_size: int = setting(800, ge=1)
    fmin: float = setting(0.0, ge=0)
    fmax: float | None = setting(None, gt=0)


@dataclass
class TrainConfig:
    """The whole training recipe (configs/xcodec_hubert_librispeech.yaml has every key), with the
    original's key names (``training_file``, ``num_epoches``, ``checkpoint_interval`` ...)."""

    generator: GeneratorSection = field(default_factory=GeneratorSection)
    audio_norm_scale: float = setting(0.95, gt=0)
    # discriminators
    d_list: list[str] = setting(factory=lambda: ["mfd"], choices=("mfd", "mpd", "msd", "msstftd"), nonempty=True)
    mfd: MFDConfig = field(default_factory=MFDConfig)
    mpd: MPDConfig = field(default_factory=MPDConfig)
    msd: MSDConfig = field(default_factory=MSDConfig)
    msstftd: MSSTFTDConfig = field(default_factory=MSSTFTDConfig)
    # optimisation
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_clip: float = setting(2.0, gt=0)
    precision: str = setting("fp32", choices=("fp32", "bf16"))
    # losses
    loss_weights: LossWeights = field(default_factory=LossWeights)
    full_multi_scale_stft_loss: STFTLossConfig = field(default_factory=STFTLossConfig)
    sub_multi_scale_stft_loss: SubbandSTFTLossConfig = field(default_factory=SubbandSTFTLossConfig)
    mel_scale_loss: MelConfig = field(default_factory=MelConfig)
    discriminator_iter_start: int = setting(0, ge=0)
    # data
    training_file: str = "data/librispeech/train.txt"
    validation_file: str | None = None
    segment_size: int = setting(48000, ge=1)
    batch_size: int = setting(8, ge=1)
    num_workers: int = setting(8, ge=0)
    max_bad_fraction: float = setting(0.5, gt=0, le=1)
    # run
    log_dir: str = "runs/xcodec"
    seed: int = 2333
    cudnn_deterministic: bool = False
    device: str = setting("auto", choices=("auto", "cuda", "cpu"))
    dist_backend: str = setting("auto", choices=("auto", "nccl", "gloo"))
    dist_timeout_minutes: float = setting(30.0, gt=0)
    tensorboard: bool = True
    num_epoches: int = setting(5000, ge=0)
    max_steps: int = setting(0, ge=0)
    checkpoint_interval: int = setting(5000, ge=1)
    summary_interval: int = setting(100, ge=1)
    validation_interval: int = setting(5000, ge=1)
    validation_max_clips: int = setting(0, ge=0)
    print_freq: int = setting(10, ge=1)
    num_ckpt_keep: int = setting(10, ge=1)
    num_plots: int = setting(8, ge=0)
    max_nonfinite_steps: int = setting(10, ge=1)
    # initialisation
    init_from: str | None = None
    pretrained_teacher: bool | str | None = None

    @property
    def codec(self) -> GeneratorConfig:
        return self.generator.config

    def teacher_source(self) -> bool | str:
        """``build_codec``'s ``pretrained_teacher``: the key if set, else download (``True``) unless the config
        describes the teacher (``semantic_model_config``) or ``init_from`` carries its weights."""
        if self.pretrained_teacher is not None:
            return self.pretrained_teacher
        return self.init_from is None and self.codec.semantic_model_config is None


@dataclass
class LoadedConfig:
    """A parsed run config: the typed view, the merged raw dict it came from, its layers' names."""

    cfg: TrainConfig
    raw: dict
    sources: list[str]


def _accepts_str(keys: list[str]) -> bool:
    """Whether the ``TrainConfig`` key at ``keys`` is typed ``str`` (alone or in a union)."""
    tp: Any = TrainConfig
    for key in keys:
        tp = typing.get_type_hints(tp).get(key) if dataclasses.is_dataclass(tp) else None
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def parse_override(arg: str) -> dict:
    """``"a.b=value"`` -> ``{"a": {"b": value}}``, the value read as YAML; for a string-typed key the text
    as written (``log_dir=123`` stays ``"123"``), except ``null``/``~`` (None)."""
    if "=" not in arg:
        raise ConfigError(f"command line: {arg!r}: overrides look like key.sub=value")
    key, text = arg.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"command line: {arg!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except RecursionError:  # e.g. 100k nested "[": the parser recurses once per level
        raise ConfigError(f"command line: {key}: not valid YAML (nested too deeply)") from None
    if value is not None and not isinstance(value, (str, bool)) and _accepts_str(keys):
        value = text
    for k in reversed(keys):
        value = {k: value}
    return value


def _from_dict(data: dict, where: str) -> TrainConfig:
    """``from_dict`` with messages of the form ``<file>: <key.path>: <problem>``."""
    try:
        return from_dict(TrainConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).lstrip('.: ')}") from None


def _validate(cfg: TrainConfig, raw: dict, where: str) -> None:
    """Checks across keys that the dataclass types cannot express."""
    generator_config_from_dict(raw, where)  # the generator name and section, as inference reads them
    problems = {
        "d_list": len(set(cfg.d_list)) != len(cfg.d_list) and f"names repeat: {cfg.d_list}",
        "max_steps": cfg.max_steps == cfg.num_epoches == 0 and "max_steps and num_epoches are both 0: nothing to train",
        "optimizer.*.betas": {len(cfg.optimizer.g.betas), len(cfg.optimizer.d.betas)} != {2} and "expected two numbers",
        "segment_size": cfg.segment_size < cfg.codec.hop_length
        and f"{cfg.segment_size} samples is shorter than one code frame ({cfg.codec.hop_length} samples)",
        "pretrained_teacher": cfg.pretrained_teacher == "" and "empty string",
    }
    for name in ("full_multi_scale_stft_loss", "sub_multi_scale_stft_loss"):
        sec = getattr(cfg, name)
        if not len(sec.fft_sizes) == len(sec.win_sizes) == len(sec.hop_sizes):
            problems[name] = "fft_sizes, win_sizes and hop_sizes must have the same length"
    if "mfd" in cfg.d_list:
        problems["mfd"] = len(cfg.mfd.hop_lengths) != len(cfg.mfd.hidden_channels) and (
            "hop_lengths and hidden_channels must have the same length")
        problems["mfd.hidden_channels"] = any(c % 32 for c in cfg.mfd.hidden_channels) and (
            f"every width must be a multiple of 32, got {cfg.mfd.hidden_channels}")
    mel = cfg.mel_scale_loss
    problems["mel_scale_loss.fmax"] = mel.fmax is not None and mel.fmax <= mel.fmin and (
        f"must be above fmin ({mel.fmin}), got {mel.fmax}")
    for key, problem in problems.items():
        if problem:
            raise ConfigError(f"{where}: {key}: {problem}")
    # Before log_dir is touched: what one training step allocates, from the recipe alone.
    widest = max(cfg.codec.encoder_dim, cfg.codec.decoder_dim / 2 ** len(cfg.codec.ratios))
    check_budget(lambda v: _step_elements(v, widest), _recipe_sizes(cfg), _recipe_sizes(TrainConfig()),
                 f"{where}: ", "elements in one training step", MAX_STEP_ELEMENTS)  # fmt: skip


_RECIPE_SIZE_KEYS = (
    "segment_size", "batch_size", "mfd.hop_lengths", "mfd.hidden_channels", "msstftd.filters", "msstftd.n_ffts",
    "msstftd.hop_lengths", "full_multi_scale_stft_loss.fft_sizes", "full_multi_scale_stft_loss.hop_sizes",
    "sub_multi_scale_stft_loss.fft_sizes", "sub_multi_scale_stft_loss.hop_sizes", "mel_scale_loss.n_fft",
    "mel_scale_loss.num_mels", "mel_scale_loss.hop_size",
)  # fmt: skip


def _recipe_sizes(cfg: TrainConfig) -> dict:
    """The recipe keys that size a training step (dotted names as in the YAML)."""
    return {key: functools.reduce(getattr, key.split("."), cfg) for key in _RECIPE_SIZE_KEYS}


def _step_elements(v: dict, widest: float) -> float:
    """Elements (within a few x) of one training step's largest allocations: the batch at the widest
    audio-rate layer, every spectrogram of the losses and discriminators, the discriminators' weights."""
    audio = float(v["batch_size"]) * float(v["segment_size"])

    def spectrograms(n_ffts, hops) -> float:  # complex (B, n_fft / 2 + 1, T / hop) and its window
        return sum(audio / float(h) * (float(n) + 2) + float(n) for n, h in zip(n_ffts, hops))

    total = audio * widest
    for name in ("full_multi_scale_stft_loss", "sub_multi_scale_stft_loss"):
        total += spectrograms(v[f"{name}.fft_sizes"], v[f"{name}.hop_sizes"])
    total += spectrograms([v["mel_scale_loss.n_fft"]], [v["mel_scale_loss.hop_size"]])
    total += float(v["mel_scale_loss.n_fft"]) * float(v["mel_scale_loss.num_mels"])
    hops, hidden = v["mfd.hop_lengths"], v["mfd.hidden_channels"]  # each: an STFT of 4 * hop, 2-D convs up to `hidden`
    total += spectrograms([4 * float(h) for h in hops], hops)
    total += sum(12 * float(c) ** 2 + audio * float(c) / 16 for c in hidden)
    total += spectrograms(v["msstftd.n_ffts"], v["msstftd.hop_lengths"]) * (1 + float(v["msstftd.filters"]))
    return total


# Input paths a YAML layer may give relative to itself; the second group may also be names
# (a release, a hub repository id), so they are rebased only when the rebased path exists.
_FILE_PATH_KEYS = ("training_file", "validation_file")
_NAME_OR_PATH_KEYS = ("init_from", "pretrained_teacher")


def _file_layers(path: str | Path) -> list[tuple[str, dict]]:
    """``config_layers(path)`` with each layer's relative input paths taken from its file's directory."""
    out = []
    for where, data in config_layers(path):
        here, data = config_dir(where), dict(data)
        for key in _FILE_PATH_KEYS + _NAME_OR_PATH_KEYS:
            value = data.get(key)
            if not isinstance(value, str) or not value or Path(value).is_absolute():
                continue  # null, a flag, or a type error that the layer's check reports with the file's name
            rebased = here / value
            if key in _FILE_PATH_KEYS or rebased.exists():
                data[key] = str(rebased)
        out.append((where, data))
    return out


def load_train_config(config: str | Path, exp_config: str | Path | None = None,
                      overrides: typing.Sequence[str] = ()) -> LoadedConfig:  # fmt: skip
    """Read, check and merge the config layers; a ``ConfigError`` names the key and the file or argument."""
    layers = _file_layers(config) + (_file_layers(exp_config) if exp_config is not None else [])
    layers += [(f"command line {arg!r}", parse_override(arg)) for arg in overrides]
    raw: dict = {}
    for where, data in layers:
        _from_dict(data, where)  # each layer on its own (partial: every field has a default)
        gen = data.get("generator")
        if isinstance(gen, dict) and gen and "config" not in gen:
            raise ConfigError(f"{where}: generator: expected the architecture under generator.config")
        raw = merge(raw, data)
    where = str(config) if len(layers) == 1 else f"{config} (merged with its base, experiment file and overrides)"
    cfg = _from_dict(raw, where)
    _validate(cfg, raw, where)
    return LoadedConfig(cfg, raw, [w for w, _ in layers])
