"""transformers' ``XcodecModel`` layout: state-dict key names and ``XcodecConfig`` both ways.

Our modules reproduce the released ``.pth`` layout (``encoder.block.*``,
``decoder_2.model.*``, ``quantizer.vq.layers.N._codebook.*``); transformers renamed
them. :func:`original_key_to_hf` and :func:`hf_key_to_original` are exact inverses on
every key of both released layouts (tests check this), whatever the weight-norm style
(``weight``, ``weight_g/weight_v``, ``parametrizations.weight.original0/1``).
"""

from __future__ import annotations

import math
import re

import torch
from transformers import AutoConfig

from modules.teacher import TEACHERS, teacher_config
from utils.config import ConfigError

from .config import GeneratorConfig

# Our acoustic stacks <-> transformers' names: (our prefix, their module, index of the
# first residual unit inside a block, names of the block's other layers by index).
_ACOUSTIC_STACKS = (
    ("encoder.block", "acoustic_encoder", 0, {3: "snake1", 4: "conv1"}),
    ("decoder_2.model", "acoustic_decoder", 2, {0: "snake1", 1: "conv_t1"}),
)
_UNIT_LAYERS = ("snake1", "conv1", "snake2", "conv2")  # a residual unit: Snake1d, conv, Snake1d, conv
_LINEARS = (("fc_prior.", "fc."), ("fc_post1.", "fc1."), ("fc_post2.", "fc2."))
# In the semantic encoder/decoder every conv is a padded wrapper (``.conv.weight``) except
# the 1x1 second conv of a residual unit.
_SEMANTIC_PLAIN = re.compile(r"\.res_units\.\d+\.conv2\.(weight|bias)$")


class LayoutError(ValueError):
    """A transformers config.json that does not describe an X-Codec; the message says why."""


def _acoustic_key_to_hf(key: str, n_stages: int) -> str | None:
    for prefix, module, first_unit, others in _ACOUSTIC_STACKS:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.*)", key)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        ends = {0: "conv1", n_stages + 1: "snake1", n_stages + 2: "conv2"}
        if i in ends:
            return f"{module}.{ends[i]}.{rest}"
        r = re.match(r"block\.(\d)\.block\.(\d)\.(.*)", rest)
        if r:
            j, k = int(r.group(1)) - first_unit, int(r.group(2))
            return f"{module}.block.{i - 1}.res_unit{j + 1}.{_UNIT_LAYERS[k]}.{r.group(3)}"
        r = re.match(r"block\.(\d)\.(.*)", rest)
        return f"{module}.block.{i - 1}.{others[int(r.group(1))]}.{r.group(2)}"
    return None


def _acoustic_key_from_hf(key: str, n_stages: int) -> str | None:
    for prefix, module, first_unit, others in _ACOUSTIC_STACKS:
        if not key.startswith(module + "."):
            continue
        rest = key[len(module) + 1 :]
        ends = {"conv1": 0, "snake1": n_stages + 1, "conv2": n_stages + 2}
        name, _, tail = rest.partition(".")
        if name in ends:
            return f"{prefix}.{ends[name]}.{tail}"
        r = re.match(r"block\.(\d+)\.res_unit(\d)\.(\w+)\.(.*)", rest)
        if r and r.group(3) in _UNIT_LAYERS:
            i, j, k = int(r.group(1)) + 1, int(r.group(2)) - 1 + first_unit, _UNIT_LAYERS.index(r.group(3))
            return f"{prefix}.{i}.block.{j}.block.{k}.{r.group(4)}"
        names = {v: k for k, v in others.items()}
        r = re.match(r"block\.(\d+)\.(\w+)\.(.*)", rest)
        if r and r.group(2) in names:
            return f"{prefix}.{int(r.group(1)) + 1}.block.{names[r.group(2)]}.{r.group(3)}"
    return None  # not a known layer: kept as it is, and reported as unexpected when loading


def original_key_to_hf(key: str, n_stages: int) -> str:
    """Map a released/our state-dict key to transformers' ``XcodecModel`` naming."""
    acoustic = _acoustic_key_to_hf(key, n_stages)
    if acoustic is not None:
        return acoustic
    if key.startswith(("encoder_semantic.", "decoder_semantic.")):
        return re.sub(r"\.conv\.(weight|bias)$", r".\1", key)
    m = re.match(r"quantizer\.vq\.layers\.(\d+)\._codebook\.(.*)", key)
    if m:
        return f"quantizer.quantizers.{m.group(1)}.codebook.{m.group(2)}"
    for ours, theirs in _LINEARS:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def hf_key_to_original(key: str, n_stages: int) -> str:
    """The inverse of :func:`original_key_to_hf`."""
    acoustic = _acoustic_key_from_hf(key, n_stages)
    if acoustic is not None:
        return acoustic
    if key.startswith(("encoder_semantic.", "decoder_semantic.")):
        return key if _SEMANTIC_PLAIN.search(key) else re.sub(r"\.(weight|bias)$", r".conv.\1", key)
    m = re.match(r"quantizer\.quantizers\.(\d+)\.codebook\.(.*)", key)
    if m:
        return f"quantizer.vq.layers.{m.group(1)}._codebook.{m.group(2)}"
    for ours, theirs in _LINEARS:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def state_to_hf(state: dict[str, torch.Tensor], n_stages: int) -> dict[str, torch.Tensor]:
    return {original_key_to_hf(k, n_stages): v for k, v in state.items()}


def state_from_hf(state: dict[str, torch.Tensor], n_stages: int) -> dict[str, torch.Tensor]:
    """Rename a transformers ``XcodecModel`` state dict to our keys (any weight-norm style)."""
    return {hf_key_to_original(k, n_stages): v for k, v in state.items()}


# ---------------------------------------------------------------------------- configs
def _field(config: dict, key: str, kind: type, default, where: str):
    value = config.get(key)
    if value is None:
        value = default
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if not ok:
        raise LayoutError(f"{where}: {key}: expected {kind.__name__}, got {value!r}")
    return value


def teacher_from_hf_config(sc: dict, where: str) -> tuple[str, dict, dict]:
    """``(teacher name, overrides of its default config, the full config)`` from a transformers
    HuBERT/WavLM config dict (a ``semantic_model_config`` or a teacher's own ``config.json``)."""
    model_type = sc.get("model_type", "hubert")
    teacher = {"hubert": "hubert_base", "wavlm": "wavlm_base_plus"}.get(model_type)
    if teacher is None:
        raise LayoutError(f"{where}: unsupported semantic model type {model_type!r}")
    try:
        default = AutoConfig.for_model(model_type).to_dict()
        full = AutoConfig.for_model(model_type, **{k: v for k, v in sc.items() if k != "model_type"}).to_dict()
    except Exception as exc:  # transformers' own checks (wrong types, bad combinations)
        raise LayoutError(f"{where}: {str(exc).splitlines()[0][:200]}") from None
    ignore = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "model_type"}
    return teacher, {k: v for k, v in full.items() if k not in ignore and default.get(k) != v}, full


def generator_config_from_hf(config: dict, where: str = "config.json") -> GeneratorConfig:
    """GeneratorConfig from a transformers ``XcodecConfig`` dict (config.json)."""
    if not isinstance(config, dict):
        raise LayoutError(f"{where}: expected a JSON object, got {type(config).__name__}")
    ac = _field(config, "acoustic_model_config", dict, {}, where)
    sc = dict(_field(config, "semantic_model_config", dict, {}, where))
    teacher, overrides, full = teacher_from_hf_config(sc, f"{where}: semantic_model_config")
    bandwidths = _field(config, "target_bandwidths", list, [0.5, 1, 1.5, 2, 4], where)
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bandwidths):
        raise LayoutError(f"{where}: target_bandwidths: expected numbers, got {bandwidths!r}")
    ratios = _field(ac, "downsampling_ratios", list, [8, 5, 4, 2], where)
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ratios):
        raise LayoutError(f"{where}: acoustic_model_config.downsampling_ratios: expected integers, got {ratios!r}")
    strides = _field(config, "strides", list, [1, 1], where)
    cfg = GeneratorConfig(
        D=_field(ac, "hidden_size", int, 256, where),
        target_bandwidths=[float(b) for b in bandwidths],
        ratios=list(ratios),
        sample_rate=_field(config, "sample_rate", int, 16000, where),
        bins=_field(config, "codebook_size", int, 1024, where),
        semantic_techer=teacher,
        encoder_dim=_field(ac, "encoder_hidden_size", int, 64, where),
        decoder_dim=_field(ac, "decoder_hidden_size", int, 1024, where),
        semantic_blocks=len(strides),
        semantic_model_config=overrides or None,
    )
    try:
        cfg.check("")
    except ConfigError as exc:  # name the config.json key, not ours
        ours, _, problem = str(exc).lstrip(".").partition(": ")
        raise LayoutError(f"{where}: {_HF_NAMES.get(ours, ours)}: {problem}") from None
    _check_hf_consistency(config, ac, full, cfg, where)
    return cfg


_HF_NAMES = {
    "D": "acoustic_model_config.hidden_size",
    "ratios": "acoustic_model_config.downsampling_ratios",
    "encoder_dim": "acoustic_model_config.encoder_hidden_size",
    "decoder_dim": "acoustic_model_config.decoder_hidden_size",
    "bins": "codebook_size",
    "semantic_blocks": "strides",
}


def _check_hf_consistency(config: dict, ac: dict, teacher: dict, cfg: GeneratorConfig, where: str) -> None:
    """Sizes that must agree for the weights to mean what the config says."""
    hop = math.prod(cfg.ratios)
    expect = {
        "acoustic_model_config.upsampling_ratios": (ac.get("upsampling_ratios"), cfg.ratios),  # the decoder uses the encoder's ratios
        "acoustic_model_config.hop_length": (ac.get("hop_length"), hop),
        "acoustic_model_config.sampling_rate": (ac.get("sampling_rate"), cfg.sample_rate),
        "channel_ratios": (config.get("channel_ratios"), [1] * cfg.semantic_blocks),
        "strides": (config.get("strides"), [1] * cfg.semantic_blocks),
        "codebook_dim": (config.get("codebook_dim"), cfg.D + teacher["hidden_size"]),
    }
    for key, (found, wanted) in expect.items():
        if found is not None and found != wanted:
            raise LayoutError(f"{where}: {key} is {found!r} but the rest of the config implies {wanted!r}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(teacher.get(key), int) or teacher[key] < 1:
            raise LayoutError(f"{where}: semantic_model_config.{key}: expected a positive integer, got {teacher.get(key)!r}")
    if teacher["hidden_size"] % teacher["num_attention_heads"]:
        raise LayoutError(
            f"{where}: semantic_model_config: hidden_size {teacher['hidden_size']} is not a multiple of "
            f"num_attention_heads {teacher['num_attention_heads']}"
        )


def hf_config_from_generator(cfg: GeneratorConfig) -> dict:
    """A transformers ``XcodecConfig`` dict describing ``cfg``'s architecture."""
    teacher_cfg = teacher_config(cfg.semantic_techer, cfg.semantic_model_config).to_dict()
    teacher_cfg["model_type"] = TEACHERS[cfg.semantic_techer].model_type
    return {
        "model_type": "xcodec",
        "target_bandwidths": list(cfg.target_bandwidths),
        "sample_rate": cfg.sample_rate,
        "codebook_size": cfg.bins,
        "channel_ratios": [1] * cfg.semantic_blocks,
        "strides": [1] * cfg.semantic_blocks,
        "acoustic_model_config": {
            "model_type": "dac",
            "encoder_hidden_size": cfg.encoder_dim,
            "downsampling_ratios": list(cfg.ratios),
            "decoder_hidden_size": cfg.decoder_dim,
            "upsampling_ratios": list(cfg.ratios),
            "hidden_size": cfg.D,
            "sampling_rate": cfg.sample_rate,
            "hop_length": math.prod(cfg.ratios),
        },
        "semantic_model_config": teacher_cfg,
    }
