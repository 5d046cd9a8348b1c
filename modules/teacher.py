"""The frozen self-supervised teacher (HuBERT or WavLM from transformers).

X-Codec's semantic target is the mean of *all* hidden states of the teacher (the
embedding output and every layer), computed on the input padded by hop/2 on both
sides. Both are quirks that the released checkpoints depend on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, HubertConfig, WavLMConfig

from utils.budget import check_budget
from utils.hub import HubError, hub_snapshot

from .tiled import ConvSpec, Pointwise, Segment, TiledRunner


@dataclass(frozen=True)
class TeacherSpec:
    model_type: str  # "hubert" or "wavlm"
    repo_id: str  # Hugging Face repository of the pretrained teacher (training only)


TEACHERS: dict[str, TeacherSpec] = {
    "hubert_base": TeacherSpec("hubert", "facebook/hubert-base-ls960"),
    "wavlm_base_plus": TeacherSpec("wavlm", "microsoft/wavlm-base-plus"),
    "hubert_base_general": TeacherSpec("hubert", "ZhenYe234/hubert_base_general_audio"),
}


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm over time that can ignore padded frames.

    Used in place of the GroupNorm of the teacher's first conv layer, which normalises
    each channel over the whole clip: padding a clip in a batch would otherwise change
    its statistics. With ``valid_lengths`` unset it is exactly ``nn.GroupNorm``.
    """

    valid_lengths: torch.Tensor | None = None
    # (mean, var) per group, (G,) each: normalise with these instead of the input's own
    # statistics (windowed long-file encoding uses the whole file's).
    fixed_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_stats is not None:
            b, c, t = x.shape
            mean, var = (v.to(x.dtype)[None, :, None, None] for v in self.fixed_stats)
            y = ((x.reshape(b, self.num_groups, -1, t) - mean) / torch.sqrt(var + self.eps)).reshape(b, c, t)
            if self.affine:
                y = y * self.weight[None, :, None] + self.bias[None, :, None]
            return y
        if self.valid_lengths is None:
            return super().forward(x)
        # Each item normalised over its own valid frames by the native kernel: bitwise
        # what the item gets alone from the eager module (the CPU inference path runs
        # items alone through the tiled extractor instead). Frames past an item's
        # length are set to zero.
        out = torch.zeros_like(x)
        for i, n in enumerate(self.valid_lengths.tolist()):
            n = max(0, min(int(n), x.shape[-1]))
            if n > 0:
                out[i : i + 1, :, :n] = F.group_norm(x[i : i + 1, :, :n], self.num_groups, self.weight, self.bias, self.eps)
        return out


def teacher_config(name: str, overrides: dict | None):
    """The transformers config of teacher ``name`` (``TEACHERS``) with ``overrides`` applied."""
    cls = {"hubert": HubertConfig, "wavlm": WavLMConfig}[TEACHERS[name].model_type]
    # The base configs' defaults are the base models' architecture.
    return cls(**(overrides or {}))


# The transformers config keys that size a teacher (see teacher_parameters).
TEACHER_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "conv_dim", "conv_kernel",
                     "num_conv_pos_embeddings", "num_conv_pos_embedding_groups")  # fmt: skip


def teacher_parameters(c: Mapping[str, Any]) -> float:
    """Parameters (within 2x) of a HuBERT/WavLM whose transformers config holds ``c`` (the
    :data:`TEACHER_SIZE_KEYS`), in float arithmetic: sizes of 10^9 must not build big integers."""
    h, inner = float(c["hidden_size"]), float(c["intermediate_size"])
    dims = [1.0, *(float(d) for d in c["conv_dim"])]
    convs = sum(a * b * float(k) for a, b, k in zip(dims, dims[1:], c["conv_kernel"]))
    pos_conv = h * h / max(float(c["num_conv_pos_embedding_groups"]), 1.0) * float(c["num_conv_pos_embeddings"])
    return convs + dims[-1] * h + pos_conv + float(c["num_hidden_layers"]) * (4 * h * h + 2 * h * inner)


def teacher_size(name: str, overrides: dict | None) -> tuple[dict, dict]:
    """``(sizes, defaults)``: the :data:`TEACHER_SIZE_KEYS` of teacher ``name`` with ``overrides``, and of its default."""
    full, default = teacher_config(name, overrides).to_dict(), teacher_config(name, None).to_dict()
    return {k: full.get(k) for k in TEACHER_SIZE_KEYS}, {k: default.get(k) for k in TEACHER_SIZE_KEYS}


def check_teacher_size(name: str, overrides: dict | None, where: str) -> None:
    """Refuse a teacher architecture too large to build (utils.budget), naming the key after ``where``."""
    check_budget(teacher_parameters, *teacher_size(name, overrides), where)


def fetch_teacher(name: str, pretrained: str | bool) -> str | bool:
    """The local directory of a pretrained teacher (``pretrained``: ``True`` for the standard
    one, a repository id or a directory), downloaded once; ``False`` stays ``False``.

    Raises:
        utils.hub.HubError: not cached and the hub cannot be reached (in seconds, one line).
    """
    if not pretrained:
        return False
    source = TEACHERS[name].repo_id if pretrained is True else str(pretrained)
    if Path(source).is_dir():
        return source
    try:
        return str(hub_snapshot(source))
    except HubError:
        raise
    except Exception as exc:  # a malformed id, a repository that does not exist, ...
        raise HubError(f"teacher {source!r}: not a local directory nor a downloadable repository ({type(exc).__name__}: {str(exc)[:160]})") from None


def build_teacher(name: str, config_overrides: dict | None = None, pretrained: str | bool = False) -> nn.Module:
    """Build the teacher model.

    Args:
        name: one of :data:`TEACHERS` (the ``semantic_techer`` key of the configs).
        config_overrides: transformers config fields, e.g. a tiny architecture for tests.
        pretrained: ``False`` builds from the config with no network (the codec checkpoint
            carries the teacher's weights); ``True`` downloads the standard teacher and a
            string loads that repository id or local directory (training).
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown semantic teacher {name!r}; expected one of {sorted(TEACHERS)}")
    if pretrained:
        model = AutoModel.from_pretrained(fetch_teacher(name, pretrained), **(config_overrides or {}))
    else:
        model = AutoModel.from_config(teacher_config(name, config_overrides))
    _install_masked_group_norm(model)
    install_tiled_feature_encoder(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _install_masked_group_norm(model: nn.Module) -> None:
    for layer in model.feature_extractor.conv_layers:
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, nn.GroupNorm) and not isinstance(norm, MaskedGroupNorm):
            masked = MaskedGroupNorm(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
            masked.load_state_dict(norm.state_dict())
            layer.layer_norm = masked


def _first_conv_lengths(model: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    k, s = model.config.conv_kernel[0], model.config.conv_stride[0]
    return torch.div(lengths - k, s, rounding_mode="floor") + 1


def teacher_frames(model: nn.Module, num_samples: torch.Tensor) -> torch.Tensor:
    """Frames the teacher produces for ``num_samples`` (already padded) input samples."""
    lengths = num_samples
    for k, s in zip(model.config.conv_kernel, model.config.conv_stride):
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return lengths


def _hidden_state_mean(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Mean of all hidden states, bitwise what the reference computes
    (``torch.stack(hidden_states, dim=1).mean(dim=1)``).

    On CPU the states are summed as they are produced and the sum divided: the same bits
    as the stacked mean, without holding the 1 + num_layers copies. CUDA's mean kernel
    sums in another order and multiplies by 1/N, so there the states are stacked.
    """
    layers = list(model.encoder.layers)
    stack = x.device.type != "cpu"
    states: list[torch.Tensor] = []

    def accumulate(module, args, kw):
        h = args[0] if args else kw["hidden_states"]
        if stack:
            states.append(h)
        elif states:
            states[0].add_(h)
        else:
            states.append(h.clone())

    handles = [layer.register_forward_pre_hook(accumulate, with_kwargs=True) for layer in layers]
    try:
        out = model(x, output_hidden_states=False, **kwargs).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    if not states:  # a teacher without layers
        return out.clone()
    if stack:
        return torch.stack([*states, out], dim=1).mean(dim=1)
    return states[0].add_(out).div_(len(layers) + 1)


@torch.no_grad()
def teacher_features(model: nn.Module, wav: torch.Tensor, pad: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of all teacher hidden states.

    Args:
        model: the teacher.
        wav: (B, 1, T) waveform; samples past ``lengths`` must be zero.
        pad: samples of zero padding on each side (hop // 2).
        lengths: (B,) valid samples per item, or ``None`` when all are ``T``.

    Returns:
        (B, F, H) features; frames past an item's own count are undefined.
    """
    x = F.pad(wav[:, 0], (pad, pad))
    ragged = lengths is not None and bool((lengths != wav.shape[-1]).any())
    if not ragged:
        return _hidden_state_mean(model, x)
    padded = lengths + 2 * pad
    attention_mask = (torch.arange(x.shape[-1], device=x.device)[None, :] < padded[:, None]).long()
    norms = [m for m in model.feature_extractor.modules() if isinstance(m, MaskedGroupNorm)]
    for norm in norms:
        norm.valid_lengths = _first_conv_lengths(model, padded)
    try:
        return _hidden_state_mean(model, x, attention_mask=attention_mask)
    finally:
        for norm in norms:
            norm.valid_lengths = None


def _first_norm(model: nn.Module) -> MaskedGroupNorm | None:
    """The GroupNorm of the teacher's first conv layer (HuBERT / WavLM base), if any;
    a GroupNorm anywhere else is not supported by the statistics below."""
    norms = [getattr(layer, "layer_norm", None) for layer in model.feature_extractor.conv_layers]
    found = [i for i, n in enumerate(norms) if isinstance(n, MaskedGroupNorm)]
    if not found:
        return None
    if found != [0]:
        raise NotImplementedError("global GroupNorm statistics need the GroupNorm on the first conv only")
    return norms[0]


@torch.no_grad()
def first_conv_stats(conv: nn.Conv1d, norm: nn.GroupNorm, x: torch.Tensor, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item, per-group (mean, var) of ``conv(x)`` over time, without computing it.

    The conv has one input channel, so each output channel is a dot product of its
    weights with the input's patches: the mean is ``w . m`` and the second moment
    ``w^T G w``, from the patches' mean ``m`` and Gram matrix ``G`` (float64, in chunks
    of frames). Agrees with the GroupNorm's own float32 statistics to ~1e-7.

    Args:
        x: (B, T) input of the conv (already padded).

    Returns:
        (mean, var), each (B, G) float64.
    """
    k, s = conv.kernel_size[0], conv.stride[0]
    frames = (x.shape[-1] - k) // s + 1
    batch = x.shape[0]
    # On the conv's device, a chunk at a time: a long file may stay on the CPU.
    device = conv.weight.device
    first = torch.zeros(batch, k, dtype=torch.float64, device=device)
    gram = torch.zeros(batch, k, k, dtype=torch.float64, device=device)
    for f0 in range(0, frames, chunk):
        f1 = min(frames, f0 + chunk)
        patches = x[:, f0 * s : (f1 - 1) * s + k].to(device).double().unfold(-1, k, s)  # (B, F, k)
        first += patches.sum(1)
        gram += patches.transpose(1, 2) @ patches
    first /= frames
    gram /= frames
    w = conv.weight.double().reshape(conv.out_channels, k)  # (C, k)
    mean = first @ w.T  # (B, C)
    square = torch.einsum("ck,bkl,cl->bc", w, gram, w)
    if conv.bias is not None:
        b = conv.bias.double()
        square = square + 2 * b * mean + b * b
        mean = mean + b
    g = norm.num_groups
    mean_g = mean.reshape(batch, g, -1).mean(-1)
    var_g = (square.reshape(batch, g, -1).mean(-1) - mean_g * mean_g).clamp_min(0)
    return mean_g, var_g


@torch.no_grad()
def group_norm_stats(model: nn.Module, wav: torch.Tensor, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, var) per group, (G,) each, of the GroupNorm after the teacher's first conv
    over a whole (1, 1, T) clip padded by ``pad`` (windowed long-file encoding normalises
    every window with these). Returns [] when the teacher has no such GroupNorm."""
    norm = _first_norm(model)
    if norm is None:
        return []
    mean, var = first_conv_stats(model.feature_extractor.conv_layers[0].conv, norm, F.pad(wav[:, 0], (pad, pad)))
    return [(mean[0].float(), var[0].float())]


# The first layers of the feature extractor run on large tensors (512 channels at 3.2 kHz
# for the first conv's output: 64 MB for 10 s); computed together tile by tile they stay
# in cache. Later layers are small and run whole.
TILED_FEATURE_LAYERS = 4


def _tiled_feature_encoder(encoder: nn.Module, input_values: torch.Tensor) -> torch.Tensor:
    """The feature extractor's forward with its first layers cache-blocked (float32 CPU
    inference); anything it does not cover runs the module's own forward."""
    layers = encoder.conv_layers
    norm = getattr(layers[0], "layer_norm", None)
    covered = (
        input_values.device.type == "cpu"
        and input_values.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and isinstance(norm, MaskedGroupNorm)
        and norm.valid_lengths is None
        and all(not isinstance(getattr(layer, "layer_norm", None), nn.Module) for layer in layers[1:])
        and all(isinstance(layer.activation, nn.Module) for layer in layers)
    )
    if not covered:
        return type(encoder).forward(encoder, input_values)
    conv0 = layers[0].conv
    if norm.fixed_stats is not None:
        mean, var = (v.double()[None] for v in norm.fixed_stats)
    else:
        mean, var = first_conv_stats(conv0, norm, input_values)
    per_group = norm.num_channels // norm.num_groups
    inv = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)  # (B, C)
    scale = inv * (norm.weight.double() if norm.affine else 1.0)
    shift = (norm.bias.double() if norm.affine else 0.0) - mean.repeat_interleave(per_group, dim=1) * scale
    scale = scale.float()[:, :, None, None]
    shift = shift.float()[:, :, None, None]

    ops: list = [ConvSpec.of(conv0), Pointwise(lambda t: torch.addcmul(shift, t, scale)), Pointwise(layers[0].activation)]
    n = min(TILED_FEATURE_LAYERS, len(layers))
    for layer in layers[1:n]:
        ops += [ConvSpec.of(layer.conv), Pointwise(layer.activation)]
    runner = encoder.__dict__.get("_runner")
    if runner is None:
        runner = encoder.__dict__["_runner"] = TiledRunner(torch.float32, min_tile=256)
    y, _ = runner.run([Segment(ops)], runner.to_layout(input_values[:, None]))
    hidden = runner.from_layout(y)
    for layer in layers[n:]:
        hidden = layer(hidden)
    return hidden


def install_tiled_feature_encoder(model: nn.Module) -> None:
    """Route the teacher's feature extractor through :func:`_tiled_feature_encoder`
    (an instance attribute: the state dict and training are unaffected)."""
    encoder = model.feature_extractor
    encoder.forward = _tiled_feature_encoder.__get__(encoder)


class fixed_group_norm_stats:
    """Context manager: the teacher's GroupNorm uses ``stats`` (from :func:`group_norm_stats`)."""

    def __init__(self, model: nn.Module, stats: list[tuple[torch.Tensor, torch.Tensor]]):
        self.norms = [m for m in model.feature_extractor.modules() if isinstance(m, MaskedGroupNorm)] if stats else []
        self.stats = stats

    def __enter__(self):
        for norm, st in zip(self.norms, self.stats):
            norm.fixed_stats = tuple(v.to(norm.weight.device) for v in st)
        return self

    def __exit__(self, *exc):
        for norm in self.norms:
            norm.fixed_stats = None
