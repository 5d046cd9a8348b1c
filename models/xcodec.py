"""X-Codec: acoustic encoder + frozen teacher -> one residual VQ -> acoustic decoder."""

from __future__ import annotations

from collections.abc import Sequence
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

from .config import GeneratorConfig
from .export import push_to_hub, save_transformers
from .precision import DTYPES, autocast, check_precision, ieee_fp32
from .pretrained import CheckpointSource, load_codec_state, read_checkpoint


class CodesError(ValueError):
    """Codes that this model cannot decode (shape, dtype or range)."""


@dataclass
class CodecOutput:
    """Training forward output.

    Attributes:
        audio: (B, 1, F * hop) reconstruction.
        codes: (B, n_q, F).
        commit_loss: () commitment loss.
        semantic_loss: () MSE between the semantic decoder output and the teacher features.
        n_q: quantizer stages used.
        bandwidth: kbps used.
    """

    audio: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    semantic_loss: torch.Tensor
    n_q: int
    bandwidth: float


class XCodec(nn.Module):
    """The X-Codec model, assembled from its parts (built from a config by :func:`build_codec`).

    Args:
        encoder: acoustic encoder, (B, 1, T) -> (B, D, F).
        decoder: acoustic decoder, (B, D, F) -> (B, 1, F * hop).
        quantizer: residual VQ over D + H channels.
        semantic_model: frozen teacher (HuBERT / WavLM) with hidden size H.
        semantic_encoder: (B, H, F) -> (B, H, F).
        semantic_decoder: (B, H, F) -> (B, H, F), training target only.
        sample_rate: audio rate in Hz.
        hop_length: samples per frame.
        audio_norm_scale: gain the released pipelines apply to audio before ``encode``
            (0.95); kept here for the CLI, never applied inside ``encode``.
    """

    def __init__(
        self,
        encoder: AcousticEncoder,
        decoder: AcousticDecoder,
        quantizer: ResidualVectorQuantizer,
        semantic_model: nn.Module,
        semantic_encoder: SemanticEncoder,
        semantic_decoder: SemanticDecoder,
        sample_rate: int,
        hop_length: int,
        audio_norm_scale: float = 1.0,
    ):
        super().__init__()
        latent = quantizer.dimension
        hidden = semantic_model.config.hidden_size
        acoustic = latent - hidden
        # Attribute names reproduce the released state-dict layout.
        self.encoder = encoder
        self.encoder_semantic = semantic_encoder
        self.decoder_semantic = semantic_decoder
        self.quantizer = quantizer
        self.decoder_2 = decoder
        self.semantic_model = semantic_model
        self.fc_prior = nn.Linear(latent, latent)
        self.fc_post1 = nn.Linear(latent, hidden)
        self.fc_post2 = nn.Linear(latent, acoustic)
        self.sample_rate = sample_rate
        self.hop_length = hop_length
        self.audio_norm_scale = audio_norm_scale
        self.config = None  # the GeneratorConfig, set by build_codec
        self._tiled = TiledStacks()  # the CPU inference engine's runners and plans, built on first use

    # ------------------------------------------------------------------ properties
    @property
    def decoder(self) -> AcousticDecoder:
        return self.decoder_2

    @property
    def frame_rate(self) -> float:
        return self.quantizer.frame_rate

    @property
    def target_bandwidths(self) -> list[float]:
        return self.quantizer.target_bandwidths

    @property
    def n_q(self) -> int:
        return self.quantizer.n_q

    @property
    def bins(self) -> int:
        return self.quantizer.bins

    @property
    def device(self) -> torch.device:
        return self.fc_prior.weight.device

    def train(self, mode: bool = True) -> XCodec:
        super().train(mode)
        self.semantic_model.eval()  # frozen: its dropout must never perturb the targets (the original leaves it in train mode)
        return self

    # ------------------------------------------------------------------ lengths
    def num_frames(self, lengths: torch.Tensor | int) -> torch.Tensor:
        """Code frames for inputs of ``lengths`` samples: the teacher's frame count."""
        return self.semantic_model.num_frames(lengths)

    def _acoustic_padding(self, lengths: torch.Tensor) -> torch.Tensor:
        # The original encodes again with hop/2 zeros on each side when the acoustic and semantic
        # frame counts differ; deciding per item up front gives that with one acoustic pass.
        pad = self.hop_length // 2
        differs = self.encoder.output_length(lengths) != self.num_frames(lengths)
        return differs.long() * pad

    # ------------------------------------------------------------------ encoding
    def _check_audio(self, wav: torch.Tensor) -> None:
        if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
            raise ValueError("audio must be a floating-point tensor of shape (B, 1, T)")
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"audio must have shape (B, 1, T), got {tuple(wav.shape)}")
        if not bool(torch.isfinite(wav).all()):
            raise ValueError("audio contains NaN or Inf samples")

    # ------------------------------------------------------------------ fast paths
    def _fast_cpu(self, device: torch.device) -> bool:
        """Inference on CPU without autograd: the cache-blocked runner applies."""
        return device.type == "cpu" and not torch.is_grad_enabled()

    def _item_groups(self, sizes: torch.Tensor, device: torch.device, precision: str) -> list[list[int]] | None:
        """How a batch of items of ``sizes`` runs: ``None``, as one padded (masked) pass, or
        in groups that each run unpadded. On CPU each item runs alone: a padded batch is
        slower per sample there (FLOP-bound work; 8x larger activations thrash caches). In
        exact mode elsewhere, items of equal size run together: the masks and the kernels
        cuDNN and SDPA pick for other shapes could change an item's last bits, and a code.
        """
        if self._fast_cpu(device):
            return [[i] for i in range(len(sizes))]
        if precision == "fp32" and bool((sizes != sizes[0]).any()):
            groups: dict[int, list[int]] = {}
            for i, n in enumerate(sizes.tolist()):
                groups.setdefault(n, []).append(i)
            return list(groups.values())
        return None

    def _run_acoustic(self, which: str, x: torch.Tensor, lengths: torch.Tensor | None, precision: str) -> torch.Tensor:
        """Acoustic ``"encoder"`` or ``"decoder"``: cache-blocked channels-last on CPU
        without autograd (fp32 or bf16), else the eager module under autocast."""
        module = self.encoder if which == "encoder" else self.decoder_2
        if self._fast_cpu(x.device) and precision is not None:
            return self._tiled.run(module.block if which == "encoder" else module.model, x, lengths, DTYPES[precision])
        with autocast(x.device, precision):
            return module(x, lengths).float()

    def latents(self, wav: torch.Tensor, lengths: torch.Tensor | None = None, precision: str | None = "fp32", norm_stats=None):
        """The quantizer's input for (B, 1, T) audio.

        ``precision``: ``"fp32"``, ``"bf16"`` or ``None`` (the caller's autocast: training).

        Returns ``(latents (B, D+H, F), teacher features (B, H, F), frames (B,))``: the fused
        acoustic + semantic latents after ``fc_prior``, the semantic target, and each item's
        frame count (``lengths`` as in :meth:`encode`).
        """
        batch, _, total = wav.shape
        lengths = self._valid_lengths(wav, lengths)
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

        pads = self._acoustic_padding(lengths)
        if bool((pads == 0).all()):
            e_acoustic = self._run_acoustic("encoder", wav, dev_lengths, precision)
        else:
            # Items needing padding get hop/2 zeros on each side; one acoustic pass for all.
            width = total + 2 * int(pads.max())
            buf = wav.new_zeros(batch, 1, width)
            for i in range(batch):
                p = int(pads[i])
                buf[i, :, p : p + total] = wav[i]
            enc_lengths = lengths + 2 * pads
            ragged_enc = bool((enc_lengths != width).any())
            e_acoustic = self._run_acoustic("encoder", buf, enc_lengths.to(wav.device) if ragged_enc else None, precision)
        acoustic_frames = self.encoder.output_length(lengths + 2 * pads)
        if bool((acoustic_frames != frames).any()):
            raise RuntimeError(
                f"acoustic/semantic frame mismatch {acoustic_frames.tolist()} vs {frames.tolist()}; "
                "the encoder ratios and the teacher's conv strides disagree"
            )
        n = int(frames.max())
        e = torch.cat([e_acoustic[..., :n], e_semantic[..., :n]], dim=1)
        e = self.fc_prior(e.transpose(1, 2)).transpose(1, 2)
        return e, semantic_target[..., :n], frames

    @staticmethod
    def _valid_lengths(wav: torch.Tensor, lengths) -> torch.Tensor:
        batch, _, total = wav.shape
        if lengths is None:
            return torch.full((batch,), total, dtype=torch.long)
        given = torch.as_tensor(lengths).cpu()
        lengths = given.long()  # 16000.5 samples is refused below, not truncated
        if given.shape != (batch,) or bool((given != lengths).any()) or bool((lengths > total).any()) or bool((lengths < 1).any()):
            raise ValueError(f"lengths must be {batch} whole numbers in [1, {total}], got {given.tolist()}")
        return lengths

    def min_length(self) -> int:
        """Shortest input (samples) that yields one frame."""
        lo = 1
        while int(self.num_frames(lo)) < 1:
            lo += 1
        return lo

    @torch.inference_mode()
    def encode(
        self,
        wav: torch.Tensor,
        bandwidth: float | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        precision: str = "fp32",
        norm_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Encode audio to codes.

        Args:
            wav: (B, 1, T) float audio at ``sample_rate``. Nothing is rescaled here
                (the released pipelines multiply by ``audio_norm_scale`` first).
            bandwidth: one of ``target_bandwidths`` (default: the largest).
            lengths: (B,) valid samples per item for a zero-padded batch of clips of
                different lengths. Each item then gets exactly the codes it gets alone,
                ``num_frames(lengths[i])`` frames; frames after those are padding.
            precision: ``"fp32"`` (exact: the eager float32 model's codes; latents differ in the last bits only)
                or ``"bf16"`` (fast: teacher, semantic and acoustic encoders in bfloat16; most codes agree).
            norm_stats: the teacher's first GroupNorm statistics (``semantic_model.norm_stats``; long files).

        Returns:
            (B, n_q, F) int64 codes, n_q = bandwidth / (log2(bins) * frame_rate / 1000).
        """
        self._check_audio(wav)
        wav = wav.to(self.device, torch.float32)  # float64/float16 input: computed in float32 like any other
        check_precision(precision, wav.device)
        n_q = self.quantizer.n_q_for_bandwidth(bandwidth)  # validates before any compute
        with ieee_fp32(precision == "fp32", wav.device):
            if wav.shape[0] == 1:
                return self._encode_pass(wav, bandwidth, lengths, precision, norm_stats)
            lengths = self._valid_lengths(wav, lengths)
            groups = self._item_groups(lengths, wav.device, precision)
            if groups is None:
                return self._encode_pass(wav, bandwidth, lengths, precision, norm_stats)
            frames = self.num_frames(lengths)
            if bool((frames < 1).any()):
                self.latents(wav[:1, :, : int(lengths.min())], None)  # raises the too-short error
            out = torch.zeros(wav.shape[0], n_q, int(frames.max()), dtype=torch.long, device=wav.device)
            for idx in groups:
                n = int(lengths[idx[0]])
                codes = self._encode_pass(wav[idx, :, :n], bandwidth, None, precision, norm_stats)
                out[idx, :, : codes.shape[-1]] = codes
            return out

    def _encode_pass(self, wav: torch.Tensor, bandwidth: float | None, lengths, precision: str, norm_stats=None) -> torch.Tensor:
        e, _, frames = self.latents(wav, lengths, precision, norm_stats)
        codes = self.quantizer.encode(e, bandwidth)
        if lengths is not None and bool((frames != codes.shape[-1]).any()):
            codes = codes.masked_fill(~self._frame_mask(frames, codes.shape[-1], codes.device)[:, None, :], 0)
        return codes

    @staticmethod
    def _frame_mask(frames: torch.Tensor, size: int, device) -> torch.Tensor:
        return torch.arange(size, device=device)[None, :] < frames.to(device)[:, None]

    # ------------------------------------------------------------------ decoding
    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise :class:`CodesError` unless ``codes`` is an integer (B, n_q, F) tensor in range."""
        if not isinstance(codes, torch.Tensor):
            raise CodesError(f"codes must be a tensor, got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise CodesError(f"codes must be integers, got {codes.dtype}")
        if codes.dim() != 3:
            raise CodesError(f"codes must have shape (B, n_q, frames), got {tuple(codes.shape)}")
        if not 1 <= codes.shape[1] <= self.n_q:
            raise CodesError(f"codes have {codes.shape[1]} quantizers; this model has 1 to {self.n_q}")
        if codes.shape[-1] < 1:
            raise CodesError("codes have 0 frames")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.bins:
            raise CodesError(f"codes must lie in [0, {self.bins}) for this model, found values in [{lo}, {hi}]")

    @torch.inference_mode()
    def decode(
        self, codes: torch.Tensor, frames: torch.Tensor | Sequence[int] | None = None, precision: str = "fp32"
    ) -> torch.Tensor:
        """Decode codes to audio.

        Args:
            codes: (B, n_q, F) integer codes, any n_q up to ``self.n_q``; values outside
                [0, bins) are refused with :class:`CodesError`.
            frames: (B,) valid frames per item of a padded batch (as returned by
                ``num_frames``); each item then decodes exactly as alone.
            precision: ``"fp32"`` (within ~1e-6 of the eager model) or ``"bf16"``.

        Returns:
            (B, 1, F * hop) float32 audio (whole frames; trim to the input length yourself).
        """
        self.check_codes(codes)
        codes = codes.to(device=self.device, dtype=torch.long)
        check_precision(precision, codes.device)
        count = codes.shape[-1]
        if frames is not None:
            frames = torch.as_tensor(frames, dtype=torch.long).cpu()
            if frames.shape != (codes.shape[0],) or int(frames.min()) < 1 or int(frames.max()) > count:
                raise ValueError(f"frames must be {codes.shape[0]} values in [1, {count}], got {frames.tolist()}")
        with ieee_fp32(precision == "fp32", codes.device):
            groups = None
            if codes.shape[0] > 1:
                sizes = frames if frames is not None else torch.full((codes.shape[0],), count)
                groups = self._item_groups(sizes, codes.device, precision)
            if groups is None:
                return self._decode_pass(codes, frames, precision)
            out = torch.zeros(codes.shape[0], 1, count * self.hop_length, device=codes.device)
            for idx in groups:
                f = count if frames is None else int(frames[idx[0]])
                audio = self._decode_pass(codes[idx, :, :f], None, precision)
                out[idx, :, : audio.shape[-1]] = audio
            return out

    def _decode_pass(self, codes: torch.Tensor, frames: torch.Tensor | None, precision: str) -> torch.Tensor:
        quantized = self.quantizer.decode(codes)
        z = self.fc_post2(quantized.transpose(1, 2)).transpose(1, 2)
        if frames is not None:
            if bool((frames == codes.shape[-1]).all()):
                frames = None
            else:
                frames = frames.to(z.device)
                z = z * self._frame_mask(frames, z.shape[-1], z.device)[:, None, :].to(z.dtype)
        audio = self._run_acoustic("decoder", z, frames, precision)
        if not audio.is_meta and not bool(torch.isfinite(audio).all()):  # meta: shapes only, no values
            raise ValueError("decoded audio holds NaN or Inf: the model's weights or codebooks are not finite")
        return audio

    # ------------------------------------------------------------------ training
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
        return CodecOutput(audio, q.codes, q.commit_loss, semantic_loss, q.n_q, q.bandwidth)

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors, which ``XcodecModel.from_pretrained`` and :meth:`from_pretrained` open."""
        return save_transformers(self, directory)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
        return push_to_hub(self, repo_id, private, token)  # save_pretrained into a hub repository; the commit URL

    @classmethod
    def from_pretrained(
        cls, path: str | Path | CheckpointSource, config: str | Path | None = None, device: str | torch.device = "cpu"
    ) -> XCodec:
        """Load an inference model (eval mode, weight norm folded, no gradients).

        ``path``: a release name (downloaded once into the Hugging Face cache), a
        release .pth (config: ``config`` or ``config.yaml`` beside it), a checkpoint of our
        training, a transformers ``XcodecModel`` directory or our export. Raises
        ``models.pretrained.CheckpointError`` with a one-line reason.
        """
        contents = read_checkpoint(path, config)
        model = build_codec(contents.generator, contents.audio_norm_scale, weight_norm=False)
        load_codec_state(model, contents.state, contents.source)
        for module in model.semantic_model.modules():  # the teacher's positional conv
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return model.to(device)


def build_codec(
    cfg: GeneratorConfig,
    audio_norm_scale: float = 1.0,
    weight_norm: bool = True,
    pretrained_teacher: str | bool = False,
) -> XCodec:
    """The one factory: an X-Codec from its generator config.

    Args:
        cfg: architecture (the YAML ``generator.config`` section).
        audio_norm_scale: gain the pipelines apply before encoding (stored, not applied).
        weight_norm: weight-norm parametrized acoustic convs (training); ``False`` builds
            plain convs, which is what inference loads folded weights into.
        pretrained_teacher: ``False`` builds the teacher from its config (weights come
            from the codec checkpoint); ``True`` or a repo id / directory loads a
            pretrained teacher (training from scratch).
    """
    teacher = build_teacher(cfg.semantic_techer, cfg.semantic_model_config, pretrained_teacher, cfg.hop_length // 2)
    hidden = teacher.config.hidden_size
    quantizer = ResidualVectorQuantizer.for_bandwidths(cfg.D + hidden, cfg.bins, cfg.frame_rate, cfg.target_bandwidths)
    model = XCodec(
        encoder=AcousticEncoder(cfg.encoder_dim, cfg.ratios, cfg.D, wn=weight_norm),
        decoder=AcousticDecoder(cfg.D, cfg.decoder_dim, cfg.ratios, wn=weight_norm),
        quantizer=quantizer,
        semantic_model=teacher,
        semantic_encoder=SemanticEncoder(hidden, cfg.semantic_blocks),
        semantic_decoder=SemanticDecoder(hidden, cfg.semantic_blocks),
        sample_rate=cfg.sample_rate,
        hop_length=cfg.hop_length,
        audio_norm_scale=audio_norm_scale,
    )
    model.config = cfg
    return model
