"""X-Codec: acoustic encoder + frozen teacher -> one residual VQ -> acoustic decoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from modules import AcousticDecoder, AcousticEncoder, SemanticDecoder, SemanticEncoder
from modules.teacher import build_teacher
from modules.tiled import TiledStacks
from quantization import ResidualVectorQuantizer

from .codec import Codec
from .config import GeneratorConfig
from .engine import run_acoustic
from .export import push_to_hub, save_transformers
from .precision import autocast
from .pretrained import CheckpointError, load_codec_state, read_checkpoint


@dataclass
class CodecOutput:
    """Training forward output."""

    audio: torch.Tensor  # (B, 1, T) reconstruction, the input's length
    codes: torch.Tensor  # (B, n_q, F)
    commit_loss: torch.Tensor  # () commitment loss
    semantic_loss: torch.Tensor  # () MSE between the semantic decoder output and the teacher features
    n_q: int  # quantizer stages used
    bandwidth: float  # kbps used


class XCodec(Codec):
    """The X-Codec model, assembled from its parts (built from a config by :func:`build_codec`).

    Args:
        encoder, decoder: acoustic encoder (B, 1, T) -> (B, D, F) and decoder (B, D, F) -> (B, 1, F * hop).
        quantizer: residual VQ over D + H channels.
        semantic_model: frozen teacher (HuBERT / WavLM) with hidden size H.
        semantic_encoder, semantic_decoder: (B, H, F) -> (B, H, F); the decoder's output is a training target only.
        sample_rate, hop_length: audio rate in Hz, samples per frame.
        audio_norm_scale: gain the released pipelines apply before ``encode`` (0.95): models.pipeline applies it,
            ``encode`` never does.
    """

    def __init__(self, encoder: AcousticEncoder, decoder: AcousticDecoder, quantizer: ResidualVectorQuantizer,
                 semantic_model: nn.Module, semantic_encoder: SemanticEncoder, semantic_decoder: SemanticDecoder,
                 sample_rate: int, hop_length: int, audio_norm_scale: float = 1.0):  # fmt: skip
        super().__init__()
        latent, hidden = quantizer.dimension, semantic_model.config.hidden_size
        # Attribute names reproduce the released state-dict layout.
        self.encoder, self.encoder_semantic, self.decoder_semantic = encoder, semantic_encoder, semantic_decoder
        self.quantizer, self.decoder_2, self.semantic_model = quantizer, decoder, semantic_model
        self.fc_prior = nn.Linear(latent, latent)
        self.fc_post1 = nn.Linear(latent, hidden)
        self.fc_post2 = nn.Linear(latent, latent - hidden)
        self.sample_rate, self.hop_length, self.audio_norm_scale = sample_rate, hop_length, audio_norm_scale
        self.n_q, self.bins, self.frame_rate = quantizer.n_q, quantizer.bins, quantizer.frame_rate  # fixed by the VQ
        self.target_bandwidths = quantizer.target_bandwidths
        self.config = None  # the GeneratorConfig, set by build_codec
        self._tiled = TiledStacks()  # the CPU inference engine's runners and plans, built on first use

    @property
    def decoder(self) -> AcousticDecoder:
        return self.decoder_2

    def train(self, mode: bool = True) -> XCodec:
        super().train(mode)
        self.semantic_model.eval()  # frozen: its dropout must never perturb the targets (the original leaves it in train mode)
        return self

    def num_frames(self, lengths: torch.Tensor | int) -> torch.Tensor:
        """Code frames for inputs of ``lengths`` samples: the teacher's frame count."""
        return self.semantic_model.num_frames(lengths)

    def norm_stats(self, wav: torch.Tensor):
        """A whole file's teacher GroupNorm statistics, for :meth:`encode` of its windows (models.pipeline)."""
        return self.semantic_model.norm_stats(wav)

    def latents(self, wav: torch.Tensor, lengths: torch.Tensor | None = None, precision: str | None = "fp32",
                norm_stats=None):  # fmt: skip
        """The quantizer's input for (B, 1, T) audio: ``(latents (B, D+H, F), teacher features (B, H, F), frames
        (B,))``, the fused latents after ``fc_prior``, the semantic target and each item's frame count (``lengths``
        as in :meth:`encode`; ``precision``: ``"fp32"``, ``"bf16"`` or ``None``, the caller's autocast: training)."""
        total = wav.shape[-1]
        lengths = self._sizes(lengths, wav.shape[0], wav.shape[-1], "lengths")
        frames = self.num_frames(lengths)
        if bool((frames < 1).any()):
            short = int(lengths[frames < 1].min())
            raise ValueError(f"audio of {short} samples is too short: at least {self.min_length()} samples are needed")
        ragged = bool((lengths != total).any())
        if ragged:
            wav = wav * (torch.arange(total)[None, None, :] < lengths[:, None, None]).to(wav)
        dev_lengths = lengths.to(wav.device) if ragged else None

        with autocast(wav.device, precision):
            semantic_target = self.semantic_model(wav, dev_lengths, norm_stats).transpose(1, 2)
            e_semantic = self.encoder_semantic(semantic_target, frames.to(wav.device) if ragged else None)
        semantic_target, e_semantic = semantic_target.float(), e_semantic.float()

        # The original encodes again with hop/2 zeros on each side when the acoustic and semantic
        # frame counts differ; deciding per item up front gives that with one acoustic pass.
        p = self.hop_length // 2
        pads = (self.encoder.output_length(lengths) != frames).long() * p
        if bool((pads == 0).all()):
            e_acoustic = run_acoustic(self, "encoder", wav, dev_lengths, precision)
        else:
            buf = torch.where((pads > 0).to(wav.device)[:, None, None], F.pad(wav, (p, p)), F.pad(wav, (0, 2 * p)))
            enc_lengths = lengths + 2 * pads
            ragged_enc = bool((enc_lengths != total + 2 * p).any())
            e_acoustic = run_acoustic(self, "encoder", buf, enc_lengths.to(wav.device) if ragged_enc else None, precision)
        acoustic_frames = self.encoder.output_length(lengths + 2 * pads)
        if bool((acoustic_frames != frames).any()):
            raise RuntimeError(f"acoustic/semantic frame mismatch {acoustic_frames.tolist()} vs {frames.tolist()}; "
                               "the encoder ratios and the teacher's conv strides disagree")
        n = int(frames.max())
        e = torch.cat([e_acoustic[..., :n], e_semantic[..., :n]], dim=1)
        e = self.fc_prior(e.transpose(1, 2)).transpose(1, 2)
        return e, semantic_target[..., :n], frames

    def _encode_pass(self, wav: torch.Tensor, bandwidth: float | None, lengths, precision: str, norm_stats=None) -> torch.Tensor:
        e, _, frames = self.latents(wav, lengths, precision, norm_stats)
        codes = self.quantizer.encode(e, bandwidth)
        if lengths is not None and bool((frames != codes.shape[-1]).any()):  # each item's padding frames: 0
            frames = frames.to(codes.device)[:, None, None]
            codes = codes * (torch.arange(codes.shape[-1], device=codes.device) < frames)
        return codes

    def _decode_pass(self, codes: torch.Tensor, frames: torch.Tensor | None, precision: str) -> torch.Tensor:
        quantized = self.quantizer.decode(codes)
        z = self.fc_post2(quantized.transpose(1, 2)).transpose(1, 2)
        if frames is not None:  # a ragged batch: each item's padding frames are zero, as alone
            frames = frames.to(z.device)
            z = z * (torch.arange(z.shape[-1], device=z.device) < frames[:, None, None]).to(z.dtype)
        audio = run_acoustic(self, "decoder", z, frames, precision)
        if not audio.is_meta and not bool(torch.isfinite(audio).all()):  # meta: shapes only, no values
            raise ValueError("decoded audio holds NaN or Inf: the model's weights or codebooks are not finite")
        return audio

    def forward(self, wav: torch.Tensor, bandwidth: float | None = None, audio_grad: bool = True) -> CodecOutput:
        """Training pass on (B, 1, T) segments: one encoder/teacher pass, one decoder pass,
        in the caller's precision (under bf16 autocast all but the quantizer run in bf16).
        ``audio_grad=False`` decodes without a graph (no loss uses the waveform this step:
        the acoustic decoder is then unused, as DDP must see it)."""
        e, semantic_target, _ = self.latents(wav, None, precision=None)
        q = self.quantizer(e, bandwidth)
        quantized = q.quantized
        semantic = self.decoder_semantic(self.fc_post1(quantized.transpose(1, 2)).transpose(1, 2))
        semantic_loss = F.mse_loss(semantic, semantic_target.detach())
        with torch.set_grad_enabled(audio_grad and torch.is_grad_enabled()):
            audio = self.decoder_2(self.fc_post2(quantized.transpose(1, 2)).transpose(1, 2))
        audio = F.pad(audio, (0, wav.shape[-1] - audio.shape[-1]))  # whole frames -> the input's length
        return CodecOutput(audio, q.codes, q.commit_loss, semantic_loss, q.n_q, q.bandwidth)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors, which ``XcodecModel.from_pretrained`` and :meth:`from_pretrained` open."""
        return save_transformers(self, directory)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
        return push_to_hub(self, repo_id, private, token)  # save_pretrained into a hub repository; the commit URL

    @classmethod
    def from_pretrained(cls, path: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu"):
        """An inference model: eval mode, weight norm folded, no gradients, :attr:`checkpoint_id` set; a checkpoint
        that cannot be used raises ``models.pretrained.CheckpointError`` with a one-line reason.

        Args:
            path: a release name or ``owner/name`` (downloaded once into the Hugging Face cache), a release
                .pth (config: ``config`` or ``config.yaml`` beside it), a checkpoint of our training or YuE's,
                a transformers ``XcodecModel`` directory or our export.
        """
        return cls.from_checkpoint(read_checkpoint(path, config), device)

    @classmethod
    def from_checkpoint(cls, ckpt, device: str | torch.device = "cpu") -> XCodec:
        """:meth:`from_pretrained` of a checkpoint already read (``models.pretrained.read_checkpoint``)."""
        if not isinstance(ckpt.generator, GeneratorConfig):
            raise CheckpointError(f"{ckpt.source}: an X-Codec 2 checkpoint (XCodec2.from_pretrained or models.load_codec reads it)")
        model = build_codec(ckpt.generator, ckpt.audio_norm_scale, weight_norm=False)
        load_codec_state(model, ckpt.state, ckpt.source)  # folds every weight norm into the plain convs
        model.checkpoint_id = ckpt.id
        return model.eval().requires_grad_(False).to(device)


def build_codec(cfg: GeneratorConfig, audio_norm_scale: float = 1.0, weight_norm: bool = True,
                pretrained_teacher: str | bool = False) -> XCodec:  # fmt: skip
    """The one factory: an X-Codec from its generator config (the YAML ``generator.config`` section).

    Args:
        audio_norm_scale: gain the pipelines apply before encoding (stored, not applied).
        weight_norm: weight-norm parametrized convs (training); ``False`` builds plain convs, the
            teacher's positional conv included, which is what inference loads folded weights into.
        pretrained_teacher: ``False`` builds the teacher from its config (weights come from the codec
            checkpoint); ``True`` or a repo id / directory loads a pretrained teacher (training from scratch).
    """
    teacher = build_teacher(cfg.semantic_techer, cfg.semantic_model_config, pretrained_teacher, cfg.hop_length // 2)
    for module in teacher.modules() if not weight_norm else ():  # the positional conv: the loader folds its state
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight")
    hidden = teacher.config.hidden_size
    quantizer = ResidualVectorQuantizer.for_bandwidths(cfg.D + hidden, cfg.bins, cfg.frame_rate, cfg.target_bandwidths)
    model = XCodec(AcousticEncoder(cfg.encoder_dim, cfg.ratios, cfg.D, wn=weight_norm),
                   AcousticDecoder(cfg.D, cfg.decoder_dim, cfg.ratios, wn=weight_norm), quantizer, teacher,
                   SemanticEncoder(hidden, cfg.semantic_blocks), SemanticDecoder(hidden, cfg.semantic_blocks),
                   cfg.sample_rate, cfg.hop_length, audio_norm_scale)  # fmt: skip
    model.config, model.checkpoint_id = cfg, None  # checkpoint_id: set by from_pretrained
    return model
