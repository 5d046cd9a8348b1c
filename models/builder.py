"""The one factory that turns a config into an :class:`XCodec`."""

from __future__ import annotations

import math

import numpy as np

from modules import AcousticDecoder, AcousticEncoder, SemanticDecoder, SemanticEncoder, build_teacher
from quantization import ResidualVectorQuantizer
from utils.config import GeneratorConfig

from .xcodec import XCodec


def frame_rate_of(cfg: GeneratorConfig) -> int:
    return math.ceil(cfg.sample_rate / int(np.prod(cfg.ratios)))


def num_quantizers_of(cfg: GeneratorConfig) -> int:
    """Stages for the largest target bandwidth, as the original computes it."""
    return int(1000 * cfg.target_bandwidths[-1] // (frame_rate_of(cfg) * math.log2(cfg.bins)))


def build_codec(
    cfg: GeneratorConfig,
    audio_norm_scale: float = 1.0,
    weight_norm: bool = True,
    pretrained_teacher: str | bool = False,
) -> XCodec:
    """Build an X-Codec from its generator config.

    Args:
        cfg: architecture (the YAML ``generator.config`` section).
        audio_norm_scale: gain the pipelines apply before encoding (stored, not applied).
        weight_norm: weight-norm parametrized acoustic convs (training); ``False`` builds
            plain convs, which is what inference loads folded weights into.
        pretrained_teacher: ``False`` builds the teacher from its config (weights come
            from the codec checkpoint); ``True`` or a repo id / directory loads a
            pretrained teacher (training from scratch).
    """
    hop = int(np.prod(cfg.ratios))
    teacher = build_teacher(cfg.semantic_techer, cfg.semantic_model_config, pretrained_teacher)
    hidden = teacher.config.hidden_size
    quantizer = ResidualVectorQuantizer(
        dimension=cfg.D + hidden,
        n_q=num_quantizers_of(cfg),
        bins=cfg.bins,
        frame_rate=frame_rate_of(cfg),
        target_bandwidths=cfg.target_bandwidths,
    )
    model = XCodec(
        encoder=AcousticEncoder(cfg.encoder_dim, cfg.ratios, cfg.D, wn=weight_norm),
        decoder=AcousticDecoder(cfg.D, cfg.decoder_dim, cfg.ratios, wn=weight_norm),
        quantizer=quantizer,
        semantic_model=teacher,
        semantic_encoder=SemanticEncoder(hidden, cfg.semantic_blocks),
        semantic_decoder=SemanticDecoder(hidden, cfg.semantic_blocks),
        sample_rate=cfg.sample_rate,
        hop_length=hop,
        audio_norm_scale=audio_norm_scale,
    )
    model.config = cfg
    return model
