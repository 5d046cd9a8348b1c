"""YuE's 44.1 kHz vocoders (``yue_xcodec_mini``'s ``decoders/``: vocals, instrumentals): Vocos decoders on the
quantizer's latents of 8 codebooks, 882 samples a frame::

    codec = XCodec.from_pretrained("yue_xcodec_mini")
    vocoder = Vocoder.from_pretrained("vocals")            # or "instrumentals", or a .pth
    codes = codec.encode(wav_16k, bandwidth=4.0)           # (B, 8, F)
    audio = vocoder.vocode(codec, codes)                   # (B, 1, F * 882) at 44.1 kHz
    audio = merge_low_band(codec.decode(codes), audio)     # YuE's optional post-processing
"""

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modules.vocos import ISTFTHead, VocosBackbone
from utils.audio import sinc_resample
from utils.budget import check_budget
from utils.config import ConfigError, from_dict, read_yaml, setting

from .pretrained import YUE_REPO, CheckpointError, download, load_codec_state, read_torch_file

VOCODERS = {"vocals": "decoders/decoder_131000.pth", "instrumentals": "decoders/decoder_151000.pth"}
VOCODER_CONFIG = "decoders/config.yaml"
LOW_BAND_CUTOFF_HZ = 5500.0
YUE_VOCODER_CODEBOOKS = 8  # YuE's stage-2 codes (4 kbps)


@dataclasses.dataclass
class BackboneArgs:
    input_channels: int = setting(1024, ge=1)
    dim: int = setting(512, ge=1)
    intermediate_dim: int = setting(1536, ge=1)
    num_layers: int = setting(8, ge=1)
    layer_scale_init_value: float | None = setting(None, ge=0)


@dataclasses.dataclass
class HeadArgs:
    dim: int = setting(512, ge=1)
    n_fft: int = setting(3528, ge=2)
    hop_length: int = setting(882, ge=1)
    padding: str = setting("same", choices=("same",))


def read_vocoder_config(path: str | Path) -> tuple[BackboneArgs, HeadArgs, int]:
    """``backbone``, ``head`` (Vocos' ``class_path`` + ``init_args``) and ``n_q`` (else YuE's 8) of a vocoder
    YAML; ConfigError naming the key and the file."""
    data = read_yaml(path)
    unknown = sorted(set(data) - {"backbone", "head", "feature_extractor", "n_q"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a vocoder config has backbone, head and n_q")
    n_q = data.get("n_q", YUE_VOCODER_CODEBOOKS)
    if isinstance(n_q, bool) or not isinstance(n_q, int) or n_q < 1:
        raise ConfigError(f"{path}: n_q: expected the number of codebooks the vocoder takes (an integer >= 1), got {n_q!r}")
    parts = []
    for key, cls, name in (("backbone", BackboneArgs, "VocosBackbone"), ("head", HeadArgs, "ISTFTHead")):
        section = data.get(key)
        if not isinstance(section, dict) or not str(section.get("class_path", "")).endswith(name):
            raise ConfigError(f"{path}: {key}: expected class_path ...{name} with init_args")
        parts.append(from_dict(cls, section.get("init_args"), f"{path}: {key}.init_args"))
    backbone, head = parts
    if backbone.dim != head.dim:
        raise ConfigError(f"{path}: head.init_args.dim {head.dim} differs from backbone.init_args.dim {backbone.dim}")
    if head.n_fft <= head.hop_length or (head.n_fft - head.hop_length) % 2:
        needs = "same padding needs n_fft > hop_length with an even difference"
        raise ConfigError(f"{path}: head.init_args: {needs}, got {head.n_fft} and {head.hop_length}")
    sizes, defaults = (
        {f"{key}.init_args.{k}": v for key, args in (("backbone", b), ("head", h))
         for k, v in dataclasses.asdict(args).items() if k not in ("layer_scale_init_value", "padding")}
        for b, h in ((backbone, head), (BackboneArgs(), HeadArgs()))
    )  # fmt: skip
    check_budget(_vocoder_parameters, sizes, defaults, f"{path}: ")
    return backbone, head, n_q


def _vocoder_parameters(v: dict) -> float:
    """Parameters (within 2x) of a vocoder whose config sizes are ``v`` (float arithmetic)."""
    dim, n_fft = float(v["backbone.init_args.dim"]), float(v["head.init_args.n_fft"])
    blocks = float(v["backbone.init_args.num_layers"]) * dim * (8 + 2 * float(v["backbone.init_args.intermediate_dim"]))
    head = float(v["head.init_args.dim"]) * (n_fft + 2) + n_fft
    return float(v["backbone.init_args.input_channels"]) * dim * 7 + blocks + head


class Vocoder(nn.Module):
    """A Vocos decoder from codec latents to audio following a ``frame_rate`` codec; ``n_q``: its codebooks."""

    def __init__(self, backbone: BackboneArgs, head: HeadArgs, frame_rate: int = 50, n_q: int | None = None):
        super().__init__()
        self.frame_rate, self.n_q = frame_rate, n_q
        self.backbone = VocosBackbone(**dataclasses.asdict(backbone))
        self.head = ISTFTHead(**dataclasses.asdict(head))
        self.hop_length, self.input_channels = head.hop_length, backbone.input_channels
        self.sample_rate = head.hop_length * frame_rate

    @property
    def device(self) -> torch.device:
        return self.head.out.weight.device

    @torch.inference_mode()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, input_channels, F) latents -> (B, 1, F * hop_length) audio."""
        return self.head(self.backbone(latents.to(self.device, torch.float32)))[:, None]

    @torch.inference_mode()
    def vocode(self, codec: nn.Module, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_q, F) codes of ``codec`` -> (B, 1, F * hop_length) audio (from the latents before ``fc_post2``)."""
        codec.check_codes(codes)
        self.check_codec(codec, codes.shape[1])
        return self(codec.quantizer.decode(codes.to(codec.device)))

    def check_codec(self, codec: nn.Module, n_q: int) -> None:
        """ValueError unless ``n_q`` codebooks of ``codec`` are what this vocoder takes."""
        if self.n_q is not None and n_q != self.n_q:
            fix = f"encode at the bandwidth of {self.n_q} (YuE: -b 4)"
            raise ValueError(f"this vocoder takes {self.n_q} codebooks, not {n_q}: {fix}")
        if codec.frame_rate != self.frame_rate:
            rates = f"a {self.frame_rate} Hz codec; this one runs at {codec.frame_rate} Hz"
            raise ValueError(f"this vocoder follows {rates}")
        if codec.quantizer.dimension != self.input_channels:
            latent = codec.quantizer.dimension
            raise ValueError(f"the vocoder takes {self.input_channels}-channel latents; this codec gives {latent}")

    @staticmethod
    def from_pretrained(name: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu",
                        checkpoint: str | Path | None = None) -> "Vocoder":  # fmt: skip
        """``"vocals"`` / ``"instrumentals"`` (from ``checkpoint``'s local YuE clone, else downloaded) or a
        ``decoder_*.pth`` (config: ``config`` or ``config.yaml`` beside it); CheckpointError in one line."""
        name, local = str(name), Path(checkpoint or "")
        local = local.parent.parent if local.is_file() else local  # YuE's clone, or its final_ckpt/*.pth
        clone = checkpoint is not None and name in VOCODERS and (local / "final_ckpt").is_dir()
        if clone and (local / VOCODERS[name]).is_file() and (local / VOCODER_CONFIG).is_file():
            name = str(local / VOCODERS[name])
        if name in VOCODERS:
            hint = "Pass a local decoder_*.pth"
            weights, cfg = download(YUE_REPO, [VOCODERS[name], VOCODER_CONFIG], f"the {name} vocoder", hint)
        else:
            weights, cfg = Path(name), Path(name).parent / "config.yaml"
            if not weights.is_file():
                known = f"a .pth with config.yaml beside it, or one of {', '.join(VOCODERS)}"
                raise CheckpointError(f"{weights}: vocoder not found ({known})")
        cfg = Path(config) if config is not None else cfg
        try:
            backbone, head, n_q = read_vocoder_config(cfg)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        model = Vocoder(backbone, head, n_q=n_q)
        load_codec_state(model, read_torch_file(weights), str(weights), str(cfg))
        return model.eval().requires_grad_(False).to(device)


def _biquad(x: np.ndarray, rate: int, cutoff: float, kind: str, q: float = 0.707) -> np.ndarray:
    """RBJ cookbook low/high-pass (as ``torchaudio.functional.*pass_biquad``, output clamped to [-1, 1])."""
    from scipy.signal import lfilter  # optional heavy dependency (0.4 s to import): only --low-freq-merge needs it

    w0 = 2 * np.pi * cutoff / rate
    alpha, cos = np.sin(w0) / (2 * q), np.cos(w0)
    sign = -1 if kind == "low" else 1
    b = np.array([1 + sign * cos, -2 * (1 + sign * cos), 1 + sign * cos]) * [1, sign, 1] / 2
    a = np.array([1 + alpha, -2 * cos, 1 - alpha])
    return np.clip(lfilter(b / a[0], a / a[0], x.astype(np.float64)), -1.0, 1.0)


def merge_low_band(codec_audio: torch.Tensor, vocoded: torch.Tensor, codec_rate: int = 16000, rate: int = 44100,
                   cutoff: float = LOW_BAND_CUTOFF_HZ, eps: float = 1e-10) -> torch.Tensor:  # fmt: skip
    """YuE's ``replace_low_freq_with_energy_matched`` (float64): the codec's decoding below ``cutoff``, scaled to
    the vocoder's energy there, plus the vocoder above it, as (B, 1, min(T16 resampled, T44)) float32 at ``rate``.

    Args:
        codec_audio: (B, 1, T16) the codec's decoding at ``codec_rate``; vocoded: (B, 1, T44) the vocoder's at ``rate``.
    """
    out = []
    for low, high in zip(codec_audio[:, 0].float().cpu().numpy(), vocoded[:, 0].float().cpu().numpy()):
        low = sinc_resample(low, codec_rate, rate)  # as YuE's torchaudio Resample: soxr differs by ~13% above 6 kHz
        a_low, b_low = _biquad(low, rate, cutoff, "low"), _biquad(high, rate, cutoff, "low")
        gain = (np.sqrt(np.mean(b_low**2)) + eps) / (np.sqrt(np.mean(a_low**2)) + eps)
        b_high = _biquad(high, rate, cutoff, "high")
        n = min(len(a_low), len(b_high))
        out.append((a_low[:n] * gain + b_high[:n]).astype(np.float32))
    n = min(len(o) for o in out)
    return torch.from_numpy(np.stack([o[:n] for o in out]))[:, None]
