"""X-Codec 2's architecture and checkpoint layouts: :class:`Codec2Config` from a transformers ``Xcodec2Config``
or the pip package's config.json, and every layout's state-dict keys in ours (transformers' names)."""

from __future__ import annotations

import dataclasses
import math

from transformers import Wav2Vec2BertConfig


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


