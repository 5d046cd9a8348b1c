"""transformers' ``XcodecModel`` layout both ways: its state-dict key names (exact inverses of the released
``.pth`` layout ours keeps, in every weight-norm style) and ``XcodecConfig``."""

import functools
import re

from transformers import AutoConfig

from modules.teacher import TEACHERS, teacher_config
from utils.config import ConfigError

from .config import GeneratorConfig

# Acoustic stacks: (our prefix, transformers' module, first residual unit's index in a block, other layers by index)
_ACOUSTIC_STACKS = (
    ("encoder.block", "acoustic_encoder", 0, {3: "snake1", 4: "conv1"}),
    ("decoder_2.model", "acoustic_decoder", 2, {0: "snake1", 1: "conv_t1"}),
)
_UNIT_LAYERS = ("snake1", "conv1", "snake2", "conv2")  # a residual unit: Snake1d, conv, Snake1d, conv
_LINEARS = (("fc_prior.", "fc."), ("fc_post1.", "fc1."), ("fc_post2.", "fc2."))
# Every semantic conv is a padded wrapper (``.conv.weight``) but the 1x1 second conv of a residual unit.
_SEMANTIC_PLAIN = re.compile(r"\.res_units\.\d+\.conv2\.(weight|bias)$")


@functools.cache
def _renamed_prefixes(n_stages: int) -> list[tuple[str, str]]:
    """``(our prefix, transformers' prefix)`` of every renamed module but the quantizer's."""
    pairs = []
    for ours, theirs, first_unit, others in _ACOUSTIC_STACKS:
        ends = {0: "conv1", n_stages + 1: "snake1", n_stages + 2: "conv2"}
        pairs += [(f"{ours}.{i}.", f"{theirs}.{name}.") for i, name in ends.items()]
        layers = [(str(k), name) for k, name in others.items()]
        units = [(j, k, name) for j in range(3) for k, name in enumerate(_UNIT_LAYERS)]  # 3 residual units a block
        layers += [(f"{first_unit + j}.block.{k}", f"res_unit{j + 1}.{name}") for j, k, name in units]
        for i in range(1, n_stages + 1):
            pairs += [(f"{ours}.{i}.block.{a}.", f"{theirs}.block.{i - 1}.{b}.") for a, b in layers]
    return pairs + list(_LINEARS)


def original_key_to_hf(key: str, n_stages: int) -> str:
    """Map a released/our state-dict key to transformers' ``XcodecModel`` naming."""
    for ours, theirs in _renamed_prefixes(n_stages):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    if key.startswith(("encoder_semantic.", "decoder_semantic.")):
        return re.sub(r"\.conv\.(weight|bias)$", r".\1", key)
    return re.sub(r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.quantizers.\1.codebook.", key)


def hf_key_to_original(key: str, n_stages: int) -> str:
    """The inverse of :func:`original_key_to_hf`; a key of no known layer is kept (reported as unexpected)."""
    for ours, theirs in _renamed_prefixes(n_stages):
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    if key.startswith(("encoder_semantic.", "decoder_semantic.")):
        return key if _SEMANTIC_PLAIN.search(key) else re.sub(r"\.(weight|bias)$", r".conv.\1", key)
    return re.sub(r"^quantizer\.quantizers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", key)


def _field(config: dict, key: str, kind: type, default, where: str):
    value = default if config.get(key) is None else config[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key}: expected {kind.__name__}, got {value!r}")
    return value


def teacher_from_hf_config(sc: dict, where: str) -> tuple[str, dict, dict]:
    """``(teacher name, overrides of its defaults, full config)`` of a transformers HuBERT/WavLM config dict."""
    model_type = sc.get("model_type", "hubert")
    teacher = {"hubert": "hubert_base", "wavlm": "wavlm_base_plus"}.get(model_type)
    if teacher is None:
        raise ConfigError(f"{where}: unsupported semantic model type {model_type!r}")
    try:
        default = AutoConfig.for_model(model_type).to_dict()
        full = AutoConfig.for_model(model_type, **{k: v for k, v in sc.items() if k != "model_type"}).to_dict()
    except Exception as exc:  # transformers' own checks (wrong types, bad combinations)
        raise ConfigError(f"{where}: {str(exc).splitlines()[0][:200]}") from None
    ignore = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "model_type"}
    return teacher, {k: v for k, v in full.items() if k not in ignore and default.get(k) != v}, full


def generator_config_from_hf(config: dict, where: str = "config.json") -> GeneratorConfig:
    """GeneratorConfig from a transformers ``XcodecConfig`` dict (config.json)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
    ac = _field(config, "acoustic_model_config", dict, {}, where)
    sc = _field(config, "semantic_model_config", dict, {}, where)
    teacher, overrides, full = teacher_from_hf_config(sc, f"{where}: semantic_model_config")
    bandwidths = _field(config, "target_bandwidths", list, [0.5, 1, 1.5, 2, 4], where)
    if not all(type(b) in (int, float) for b in bandwidths):
        raise ConfigError(f"{where}: target_bandwidths: expected numbers, got {bandwidths!r}")
    ratios = _field(ac, "downsampling_ratios", list, [8, 5, 4, 2], where)
    if not all(type(r) is int for r in ratios):
        raise ConfigError(f"{where}: acoustic_model_config.downsampling_ratios: expected integers, got {ratios!r}")
    cfg = GeneratorConfig(
        D=_field(ac, "hidden_size", int, 256, where), target_bandwidths=[float(b) for b in bandwidths],
        ratios=list(ratios), sample_rate=_field(config, "sample_rate", int, 16000, where),
        bins=_field(config, "codebook_size", int, 1024, where), semantic_techer=teacher,
        encoder_dim=_field(ac, "encoder_hidden_size", int, 64, where),
        decoder_dim=_field(ac, "decoder_hidden_size", int, 1024, where),
        semantic_blocks=len(_field(config, "strides", list, [1, 1], where)), semantic_model_config=overrides or None,
    )
    try:
        cfg.check("")
    except ConfigError as exc:  # name the config.json key, not ours
        ours, _, problem = str(exc).lstrip(".").partition(": ")
        raise ConfigError(f"{where}: {_HF_NAMES.get(ours, ours)}: {problem}") from None
    # Sizes that must agree for the weights to mean what the config says (the decoder uses the encoder's ratios).
    expect = {
        "acoustic_model_config.upsampling_ratios": (ac.get("upsampling_ratios"), cfg.ratios),
        "acoustic_model_config.hop_length": (ac.get("hop_length"), cfg.hop_length),
        "acoustic_model_config.sampling_rate": (ac.get("sampling_rate"), cfg.sample_rate),
        "channel_ratios": (config.get("channel_ratios"), [1] * cfg.semantic_blocks),
        "strides": (config.get("strides"), [1] * cfg.semantic_blocks),
        "codebook_dim": (config.get("codebook_dim"), cfg.D + full["hidden_size"]),
    }
    for key, (found, wanted) in expect.items():
        if found is not None and found != wanted:
            raise ConfigError(f"{where}: {key} is {found!r} but the rest of the config implies {wanted!r}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(full.get(key), int) or full[key] < 1:
            raise ConfigError(f"{where}: semantic_model_config.{key}: expected an integer > 0, got {full.get(key)!r}")
    if full["hidden_size"] % full["num_attention_heads"]:
        hidden, heads = full["hidden_size"], full["num_attention_heads"]
        problem = f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        raise ConfigError(f"{where}: semantic_model_config: {problem}")
    return cfg


_AC = "acoustic_model_config."
_HF_NAMES = {"D": _AC + "hidden_size", "ratios": _AC + "downsampling_ratios", "bins": "codebook_size",
             "encoder_dim": _AC + "encoder_hidden_size", "decoder_dim": _AC + "decoder_hidden_size",
             "semantic_blocks": "strides"}  # fmt: skip


def hf_config_from_generator(cfg: GeneratorConfig) -> dict:
    """A transformers ``XcodecConfig`` dict describing ``cfg``'s architecture."""
    teacher_cfg = teacher_config(cfg.semantic_techer, cfg.semantic_model_config).to_dict()
    teacher_cfg["model_type"] = TEACHERS[cfg.semantic_techer].model_type
    acoustic = dict(
        model_type="dac", encoder_hidden_size=cfg.encoder_dim, downsampling_ratios=list(cfg.ratios),
        decoder_hidden_size=cfg.decoder_dim, upsampling_ratios=list(cfg.ratios), hidden_size=cfg.D,
        sampling_rate=cfg.sample_rate, hop_length=cfg.hop_length,
    )
    return dict(
        model_type="xcodec", target_bandwidths=list(cfg.target_bandwidths), sample_rate=cfg.sample_rate,
        codebook_size=cfg.bins, channel_ratios=[1] * cfg.semantic_blocks, strides=[1] * cfg.semantic_blocks,
        acoustic_model_config=acoustic, semantic_model_config=teacher_cfg,
    )
