"""X-Codec 2.0 (Ye et al. 2025, the Llasa paper): a BigCodec acoustic encoder and w2v-BERT 2.0 (hidden state 16,
through a conv adapter) concatenated, one FSQ codebook of 65,536 codes at 50 Hz, a Transformer + Vocos decoder.
Same API as :class:`models.xcodec.XCodec` (the shared part: :class:`models.codec.Codec`); parameter names are
transformers' ``Xcodec2Model``'s; models.xcodec2_layout reads every released layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Wav2Vec2BertModel

from modules.bigcodec import BigCodecEncoder
from modules.vocos import TransformerVocos
from modules.w2v_bert import Fbank, SemanticAdapter
from quantization.fsq import FSQ

from .codec import Codec
from .engine import pad_rows
from .precision import autocast
from .pretrained import CheckpointError, load_codec_state, read_checkpoint
from .xcodec import XCodec
from .xcodec2_layout import DERIVED, Codec2Config, hf_config_from_codec2, ours_to_hf


class XCodec2(Codec):
    """X-Codec 2 from its :class:`Codec2Config` (weights: :meth:`from_pretrained`).

    The released pipeline pads each clip to the next multiple of the hop (a whole hop when it is one already), then
    computes the fbank features of that clip with hop/2 zeros on each side: F = T // hop + 1 frames for T samples.
    """

    windowed_decode = False  # the decoder's attention and GroupNorms see every frame: one pass per clip

    def __init__(self, cfg: Codec2Config):
        super().__init__()
        semantic = cfg.semantic_config()
        dim = cfg.hidden_size + semantic.hidden_size
        self.semantic_encoder = Wav2Vec2BertModel(semantic)
        self.semantic_adapter = SemanticAdapter(semantic.hidden_size)
        self.acoustic_encoder = BigCodecEncoder(cfg.encoder_width, cfg.ratios, cfg.hidden_size)
        self.fc_encoder = torch.nn.Linear(dim, dim)
        self.sample_rate, self.hop_length, self.audio_norm_scale = cfg.sample_rate, cfg.hop_length, 1.0
        self.quantizer = FSQ(dim, cfg.levels, cfg.sample_rate / cfg.hop_length)
        self.acoustic_decoder = TransformerVocos(dim, cfg.hidden_size, cfg.layers, cfg.heads, cfg.head_dim,
                                                 cfg.mlp_dim, cfg.hop_length)  # fmt: skip
        self.n_q, self.bins, self.frame_rate = 1, self.quantizer.bins, self.quantizer.frame_rate
        self.target_bandwidths = self.quantizer.target_bandwidths
        self.fbank = Fbank(cfg.sample_rate)
        self.config, self.checkpoint_id = cfg, None

    def num_frames(self, lengths: torch.Tensor | int) -> torch.Tensor:
        """Code frames for ``lengths`` samples: ``T // hop + 1``."""
        return torch.as_tensor(lengths) // self.hop_length + 1

    def _padded(self, wav: torch.Tensor) -> torch.Tensor:
        return F.pad(wav, (0, self.hop_length - wav.shape[-1] % self.hop_length))

    def norm_stats(self, wav: torch.Tensor):
        """A whole file's fbank statistics, for :meth:`encode` of its windows (models.pipeline)."""
        half = self.hop_length // 2
        return self.fbank.norm_stats(F.pad(self._padded(wav.reshape(1, -1))[0], (half, half)))

    def _encode_pass(self, wav: torch.Tensor, bandwidth, lengths, precision: str, norm_stats=None) -> torch.Tensor:
        if lengths is not None:  # a ragged group (the padded bf16 path off CPU): each clip alone, as it is released
            return pad_rows([self._encode_pass(wav[i : i + 1, :, :n], bandwidth, None, precision, norm_stats)[0]
                             for i, n in enumerate(lengths.tolist())])  # fmt: skip
        wav, half = self._padded(wav), self.hop_length // 2
        features = torch.stack([self.fbank(F.pad(w[0], (half, half)), norm_stats) for w in wav]).to(wav.device)
        with autocast(wav.device, precision):
            semantic = self.semantic_encoder(features).last_hidden_state.transpose(1, 2)
            latents = torch.cat([self.semantic_adapter(semantic), self.acoustic_encoder(wav)], dim=1)
            latents = self.fc_encoder(latents.transpose(1, 2))
        return self.quantizer.encode(latents)[:, None]

    def _decode_pass(self, codes: torch.Tensor, frames, precision: str) -> torch.Tensor:
        if frames is not None:  # a ragged group: each item alone (attention and GroupNorm span the clip)
            rows = [self._decode_pass(codes[i : i + 1, :, :n], None, precision)[0] for i, n in enumerate(frames.tolist())]
            return pad_rows(rows)
        with autocast(codes.device, precision):
            audio = self.acoustic_decoder(self.quantizer.decode(codes[:, 0])).float()[:, None]
        if not bool(torch.isfinite(audio).all()):
            raise ValueError("decoded audio holds NaN or Inf: the model's weights are not finite")
        return audio

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors in transformers' ``Xcodec2Model`` format (which it opens)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in ours_to_hf(self.state_dict()).items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(hf_config_from_codec2(self.config), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu"):
        """An inference model (eval mode, no gradients, :attr:`checkpoint_id` set) from a release name or hub id
        (``xcodec2``, ``HKUSTAudio/xcodec2``, ``hf-audio/xcodec2``), a transformers or pip-package directory, or
        the original Lightning ``.ckpt``; else ``models.pretrained.CheckpointError`` with a one-line reason."""
        return cls.from_checkpoint(read_checkpoint(path, config), device)

    @classmethod
    def from_checkpoint(cls, ckpt, device: str | torch.device = "cpu") -> XCodec2:
        """:meth:`from_pretrained` of a checkpoint already read (``models.pretrained.read_checkpoint``)."""
        if not isinstance(ckpt.generator, Codec2Config):
            raise CheckpointError(f"{ckpt.source}: an X-Codec checkpoint, not X-Codec 2 (XCodec.from_pretrained reads it)")
        model = cls(ckpt.generator)
        state = {**{k: v for k, v in model.state_dict().items() if DERIVED.search(k)}, **ckpt.state}  # fixed buffers
        load_codec_state(model, state, ckpt.source, "X-Codec 2's architecture")
        model.checkpoint_id = ckpt.id
        return model.eval().requires_grad_(False).to(device)



def load_codec(path: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu") -> Codec:
    """X-Codec or X-Codec 2, whichever ``path`` holds (anything either ``from_pretrained`` reads), read once."""
    ckpt = read_checkpoint(path, config)
    return (XCodec2 if isinstance(ckpt.generator, Codec2Config) else XCodec).from_checkpoint(ckpt, device)
