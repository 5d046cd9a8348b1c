"""X-Codec 2's architecture and checkpoint layouts: :class:`Codec2Config` from a transformers ``Xcodec2Config``
or the pip package's config.json, and every layout's state-dict keys in ours (transformers' names)."""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from transformers import Wav2Vec2BertConfig

from utils.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Codec2Config:
    """The architecture (defaults: the released model, HKUSTAudio/xcodec2). ``semantic``: the w2v-BERT config's
    fields (``Wav2Vec2BertConfig``), truncated to ``semantic_layers`` layers (the hidden state X-Codec 2 uses)."""

    hidden_size: int = 1024
    encoder_width: int = 48
    ratios: tuple[int, ...] = (2, 2, 4, 4, 5)
    layers: int = 12
    heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 4096
    levels: tuple[int, ...] = (4,) * 8
    sample_rate: int = 16000
    semantic: dict = dataclasses.field(default_factory=dict)
    semantic_layers: int = 16

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    def semantic_config(self) -> Wav2Vec2BertConfig:
        return Wav2Vec2BertConfig(**{**self.semantic, "num_hidden_layers": self.semantic_layers,
                                     "layerdrop": 0.0, "apply_spec_augment": False})  # fmt: skip




def _ints(value, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{where}: {key} must be a list of positive integers, got {value!r}")
    return tuple(value)


def codec2_config_from_hf(config: dict, where: str) -> Codec2Config:
    """:class:`Codec2Config` of a transformers ``Xcodec2Config`` (config.json, model_type ``xcodec2``)."""
    fields = {"hidden_size": "hidden_size", "encoder_hidden_size": "encoder_width", "num_hidden_layers": "layers",
              "num_attention_heads": "heads", "head_dim": "head_dim", "intermediate_size": "mlp_dim",
              "sampling_rate": "sample_rate"}  # fmt: skip
    values = {}
    for theirs, ours in fields.items():
        if theirs in config:
            v = config[theirs]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}: {theirs} must be a positive integer, got {v!r}")
            values[ours] = v
    if config.get("num_key_value_heads", values.get("heads", 16)) != values.get("heads", 16):
        raise ConfigError(f"{where}: num_key_value_heads must equal num_attention_heads (X-Codec 2 has no GQA)")
    if "downsampling_ratios" in config:
        values["ratios"] = _ints(config["downsampling_ratios"], where, "downsampling_ratios")
    if "quantization_levels" in config:
        values["levels"] = _ints(config["quantization_levels"], where, "quantization_levels")
    semantic = config.get("semantic_model_config") or {}
    if not isinstance(semantic, dict):
        raise ConfigError(f"{where}: semantic_model_config must be an object")
    semantic = {k: v for k, v in semantic.items() if k not in ("model_type", "transformers_version", "architectures")}
    layers = semantic.pop("num_hidden_layers", Codec2Config.semantic_layers)
    return Codec2Config(**values, semantic=semantic, semantic_layers=layers)


def codec2_config_from_pip(config: dict, where: str) -> Codec2Config:
    """The pip package's config.json (``BigCodecConfig``): only the three 1024 sizes, the rest is fixed in its code."""
    sizes = {k: config.get(k, 1024) for k in ("semantic_hidden_size", "codec_encoder_hidden_size", "codec_decoder_hidden_size")}
    if any(v != 1024 for v in sizes.values()) or not config.get("use_vocos", True):
        raise ConfigError(f"{where}: only the released X-Codec 2 architecture (sizes 1024, use_vocos) is known, got {sizes}")
    return Codec2Config()


def is_pip_config(config: dict) -> bool:
    """The pip package's config.json says model_type ``xcodec`` too; its fields tell it from X-Codec's."""
    return "codec_decoder_hidden_size" in config or "use_vocos" in config


# The original names (pip package's model.safetensors, the Lightning checkpoint's state_dict) -> ours, in order.
_ORIGINAL = [
    (r"^semantic_model\.", "semantic_encoder."),
    (r"^CodecEnc\.conv_blocks\.0\.", "acoustic_encoder.conv1."),
    (r"^CodecEnc\.conv_final_block\.0\.", "acoustic_encoder.snake1."),
    (r"^CodecEnc\.conv_final_block\.1\.", "acoustic_encoder.conv2."),
    (r"^CodecEnc\.conv_blocks\.(\d+)\.block\.(\d)\.block\.(\d)\.",
     lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{_UNIT[int(m[3])]}."),
    (r"^CodecEnc\.conv_blocks\.(\d+)\.block\.3\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.snake1."),
    (r"^CodecEnc\.conv_blocks\.(\d+)\.block\.4\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.conv1."),
    (r"^SemanticEncoder_module\.initial_conv\.", "semantic_adapter.conv1."),
    (r"^SemanticEncoder_module\.residual_blocks\.1\.", "semantic_adapter.conv2."),
    (r"^SemanticEncoder_module\.residual_blocks\.3\.", "semantic_adapter.conv3."),
    (r"^SemanticEncoder_module\.final_conv\.", "semantic_adapter.conv4."),
    (r"^fc_prior\.", "fc_encoder."),
    (r"^fc_post_a\.", "acoustic_decoder.fc."),
    (r"^generator\.quantizer\.(project_in|project_out)\.", r"quantizer.\1."),
    (r"^generator\.backbone\.final_layer_norm\.", "acoustic_decoder.norm."),
    (r"^generator\.backbone\.transformers\.(\d+)\.att_norm\.", r"acoustic_decoder.layers.\1.input_layernorm."),
    (r"^generator\.backbone\.transformers\.(\d+)\.ffn_norm\.", r"acoustic_decoder.layers.\1.post_attention_layernorm."),
    (r"^generator\.backbone\.transformers\.(\d+)\.att\.c_proj\.", r"acoustic_decoder.layers.\1.self_attn.o_proj."),
    (r"^generator\.backbone\.transformers\.(\d+)\.", r"acoustic_decoder.layers.\1."),
    (r"^generator\.backbone\.", "acoustic_decoder."),
    (r"^generator\.head\.", "acoustic_decoder.head."),
    (r"\.act\.bias$", ".act.beta"),  # the pip package's in-memory SnakeBeta names it bias (X-Codec-2.0 #24)
]
_UNIT = ("snake1", "conv1", "snake2", "conv2")
# Kept by the Lightning module for training only; never part of the codec.
_TRAINING_ONLY = ("discriminator.", "spec_discriminator.", "model_spk.", "fc_post_s.", "SemanticDecoder_module.", "criteria.")
DERIVED = re.compile(r"(\.upsample\.filter|\.downsample\.lowpass\.filter|\.istft\.window|\.levels|\.basis|\.codebook)$")


def original_to_ours(state: dict[str, torch.Tensor], semantic_layers: int) -> dict[str, torch.Tensor]:
    """The pip package's or the Lightning checkpoint's tensors in our names: the fused attention projection split
    into q, k, v (no RoPE permutation: its one angle per head cancels in the scores), the teacher's layers past
    ``semantic_layers`` and the training-only modules dropped, fixed filters and windows left to the model."""
    out = {}
    for key, value in state.items():
        if key.startswith(_TRAINING_ONLY) or DERIVED.search(key):
            continue
        layer = re.match(r"^semantic_model\.encoder\.layers\.(\d+)\.", key)
        if layer and int(layer[1]) >= semantic_layers:
            continue
        for pattern, repl in _ORIGINAL:
            key = re.sub(pattern, repl, key)
        fused = re.match(r"^(acoustic_decoder\.layers\.\d+\.)att\.c_attn\.weight$", key)
        if fused:
            out.update(zip((fused[1] + f"self_attn.{p}_proj.weight" for p in "qkv"), value.chunk(3, dim=0)))
            continue
        out[key] = value
    return out


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``Xcodec2Model`` tensors in our names (the ISTFT head's linear is Vocos' ``out``)."""
    return {re.sub(r"^acoustic_decoder\.head\.linear\.", "acoustic_decoder.head.out.", k): v for k, v in state.items()
            if not DERIVED.search(k)}  # fmt: skip


def hf_config_from_codec2(cfg: Codec2Config) -> dict:
    """transformers' ``Xcodec2Config`` fields (config.json) of ``cfg``: the inverse of :func:`codec2_config_from_hf`."""
    semantic = {**cfg.semantic, "model_type": "wav2vec2-bert", "num_hidden_layers": cfg.semantic_layers}
    return {"model_type": "xcodec2", "architectures": ["Xcodec2Model"], "hidden_size": cfg.hidden_size,
            "encoder_hidden_size": cfg.encoder_width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_dim,
            "downsampling_ratios": list(cfg.ratios), "quantization_levels": list(cfg.levels),
            "quantization_dim": cfg.hidden_size + cfg.semantic_config().hidden_size, "sampling_rate": cfg.sample_rate,
            "semantic_model_config": semantic}  # fmt: skip


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors in transformers' names (the inverse of :func:`hf_to_ours`), fixed buffers left out."""
    return {re.sub(r"^acoustic_decoder\.head\.out\.", "acoustic_decoder.head.linear.", k): v for k, v in state.items()
            if not DERIVED.search(k)}  # fmt: skip
