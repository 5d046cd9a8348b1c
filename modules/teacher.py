"""The frozen HuBERT/WavLM teacher. X-Codec's semantic target is the mean of *all* its hidden states (embedding
output and every layer) on the input padded by hop/2 on both sides: two quirks the released checkpoints depend on."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, HubertConfig, WavLMConfig
from transformers.masking_utils import create_bidirectional_mask

from utils.budget import check_budget
from utils.hub import HubError, hub_snapshot

from .tiled import ConvSpec, Segment, TiledRunner

# The first conv layers' outputs are large (512 channels at 3.2 kHz: 64 MB for 10 s): tiled together they stay
# in cache. Later layers are small and run whole.
TILED_FEATURE_LAYERS = 4


class TeacherSpec(NamedTuple):
    model_type: str  # "hubert" or "wavlm"
    repo_id: str  # Hugging Face repository of the pretrained teacher (training only)


TEACHERS: dict[str, TeacherSpec] = {
    "hubert_base": TeacherSpec("hubert", "facebook/hubert-base-ls960"),
    "wavlm_base_plus": TeacherSpec("wavlm", "microsoft/wavlm-base-plus"),
    "hubert_base_general": TeacherSpec("hubert", "ZhenYe234/hubert_base_general_audio"),
}


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
    """``(sizes, defaults)``: the :data:`TEACHER_SIZE_KEYS` of teacher ``name`` with ``overrides``, and by default."""
    full, default = teacher_config(name, overrides).to_dict(), teacher_config(name, None).to_dict()
    return {k: full.get(k) for k in TEACHER_SIZE_KEYS}, {k: default.get(k) for k in TEACHER_SIZE_KEYS}


def check_teacher_size(name: str, overrides: dict | None, where: str) -> None:
    """Refuse a teacher architecture too large to build (utils.budget), naming the key after ``where``."""
    check_budget(teacher_parameters, *teacher_size(name, overrides), where)


def fetch_teacher(name: str, pretrained: str | bool) -> str | bool:
    """The local directory of a pretrained teacher (``True``: the standard one, or a repository id or directory),
    downloaded once; ``False`` stays ``False``. Raises utils.hub.HubError (one line) when it cannot be had."""
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
        why = f"{type(exc).__name__}: {str(exc)[:160]}"
        raise HubError(f"teacher {source!r}: not a local directory nor a downloadable repository ({why})") from None


def build_teacher(name: str, overrides: dict | None = None, pretrained: str | bool = False, pad: int = 0) -> Teacher:
    """Build the frozen teacher (eval mode, no gradients).

    Args:
        name: one of :data:`TEACHERS` (the ``semantic_techer`` key of the configs).
        overrides: transformers config fields, e.g. a tiny architecture for tests.
        pretrained: ``False`` builds from the config, no network (the codec checkpoint carries the weights);
            ``True`` downloads the standard teacher, a string loads that repository id or directory (training).
        pad: zero samples added on each side of the teacher's input (hop / 2).
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown semantic teacher {name!r}; expected one of {sorted(TEACHERS)}")
    if pretrained:
        model = AutoModel.from_pretrained(fetch_teacher(name, pretrained), **(overrides or {}))
    else:
        model = AutoModel.from_config(teacher_config(name, overrides))
    teacher = Teacher(model, pad).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def first_conv_stats(conv: nn.Conv1d, norm: nn.GroupNorm, x: torch.Tensor, chunk: int = 1 << 16):
    """Per-item, per-group (mean, var), (B, G) float64 each, of ``conv(x)`` over time for (B, T) padded ``x``,
    without computing it: with one input channel, the mean is ``w . m`` and the second moment ``w^T G w`` from
    the patches' mean ``m`` and Gram matrix ``G`` (float64, in chunks). Within ~1e-7 of GroupNorm's own."""
    k, s, batch, device = conv.kernel_size[0], conv.stride[0], x.shape[0], conv.weight.device
    frames = (x.shape[-1] - k) // s + 1
    # On the conv's device, a chunk at a time: a long file may stay on the CPU.
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


class Teacher(nn.Module):
    """The frozen HuBERT/WavLM teacher with an explicit forward over the transformers model's submodules (kept
    under their names: the checkpoints' keys); the first GroupNorm is per item (ragged batches), with given
    statistics (windowed long files) or, on the CPU in float32, cache-blocked with the next convs.

    Args:
        model: a transformers ``HubertModel`` or ``WavLMModel``; its submodules are taken.
        pad: zero samples added on each side of the input (hop / 2).
    """

    def __init__(self, model: nn.Module, pad: int):
        super().__init__()
        self.config = model.config
        self.pad = pad
        if hasattr(model, "masked_spec_embed"):  # unused (no SpecAugment), but in the checkpoints
            self.masked_spec_embed = model.masked_spec_embed
        self.feature_extractor = model.feature_extractor
        self.feature_projection = model.feature_projection
        self.encoder = model.encoder
        self._runner = TiledRunner(torch.float32, min_tile=256)

    def num_frames(self, samples: torch.Tensor | int) -> torch.Tensor:
        """Frames for inputs of ``samples`` samples (the pad is added here)."""
        n = torch.as_tensor(samples) + 2 * self.pad
        for k, s in zip(self.config.conv_kernel, self.config.conv_stride):
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n

    def _group_norm(self) -> nn.GroupNorm | None:
        """The GroupNorm of the first conv layer (HuBERT / WavLM base), if the teacher has one."""
        norm = getattr(self.feature_extractor.conv_layers[0], "layer_norm", None)
        return norm if isinstance(norm, nn.GroupNorm) else None

    @torch.no_grad()
    def norm_stats(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, var), (B, G) each, of the first GroupNorm over whole (B, 1, T) clips (windowed long files use
        them for every window); ``None`` when the teacher has no such GroupNorm."""
        norm = self._group_norm()
        if norm is None:
            return None
        x = F.pad(wav[:, 0], (self.pad, self.pad))
        mean, var = first_conv_stats(self.feature_extractor.conv_layers[0].conv, norm, x)
        return mean.float(), var.float()

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None, norm_stats=None) -> torch.Tensor:
        """Mean of all hidden states (the embedding output and every layer's).

        Args:
            wav: (B, 1, T) waveform; samples past ``lengths`` must be zero.
            lengths: (B,) valid samples per item, or ``None`` when all are ``T``. Each item
                is normalised over its own frames and padded frames are masked in attention.
            norm_stats: (mean, var), (B or 1, G) each, from :meth:`norm_stats`: the first
                GroupNorm uses these instead of the input's own statistics.

        Returns:
            (B, F, H) features; frames past an item's own count are undefined.
        """
        if lengths is not None and bool((lengths == wav.shape[-1]).all()):
            lengths = None
        h = self._conv_features(F.pad(wav[:, 0], (self.pad, self.pad)), lengths, norm_stats).transpose(1, 2)
        h = self.feature_projection(h)
        if isinstance(h, tuple):  # WavLM's also returns the normalised conv features
            h = h[0]
        mask = None
        if lengths is not None:
            mask = torch.arange(h.shape[1], device=h.device)[None, :] < self.num_frames(lengths)[:, None]
            h = h.masked_fill(~mask[..., None], 0)  # as transformers' encoder does
        states = self._hidden_states(h, mask)
        if h.device.type != "cpu":  # CUDA's mean kernel sums in another order than a running sum
            return torch.stack(list(states), dim=1).mean(dim=1)
        # On CPU a running sum gives the stacked mean's bits without holding every state.
        total = next(states).clone()
        for state in states:
            total.add_(state)
        return total.div_(len(self.encoder.layers) + 1)

    def _hidden_states(self, h: torch.Tensor, mask: torch.Tensor | None):
        """Yields the encoder's hidden states (eval) on projected features (B, F, H), the embedding output first."""
        enc, stable = self.encoder, self.config.do_stable_layer_norm
        h = h + enc.pos_conv_embed(h)
        if not stable:
            h = enc.layer_norm(h)
        wavlm = self.config.model_type == "wavlm"
        if not wavlm:  # HuBERT's layers take the 4-d mask transformers builds; WavLM's the (B, F) one
            mask = create_bidirectional_mask(config=enc.config, inputs_embeds=h, attention_mask=mask)
        yield h
        bias = None  # WavLM: the relative position bias the first layer computes
        for i, layer in enumerate(enc.layers):
            if wavlm:
                h, bias = layer(h, attention_mask=mask, position_bias=bias)
            else:
                h = layer(h, attention_mask=mask)
            if not stable or i + 1 < len(enc.layers):
                yield h
        if stable:
            yield enc.layer_norm(h)

    def _conv_features(self, x: torch.Tensor, lengths: torch.Tensor | None, norm_stats) -> torch.Tensor:
        """(B, C, F) conv features of the padded (B, T) input; ``lengths`` unpadded."""
        layers = self.feature_extractor.conv_layers
        norm = self._group_norm()
        if norm is None:  # LayerNorm per frame: nothing global
            return self.feature_extractor(x)
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        if lengths is None and cpu_fp32:  # HuBERT/WavLM have no norm after the first conv
            return self._tiled_features(x, norm_stats)
        h = layers[0].conv(x[:, None])
        if norm_stats is not None:
            b, c, t = h.shape
            mean, var = (v.to(h.dtype)[:, :, None, None] for v in norm_stats)
            h = ((h.reshape(b, norm.num_groups, -1, t) - mean) / torch.sqrt(var + norm.eps)).reshape(b, c, t)
            if norm.affine:
                h = h * norm.weight[:, None] + norm.bias[:, None]
        elif lengths is None:
            h = norm(h)
        else:
            # Each item over its own frames by the native kernel: bitwise what it gets alone; the rest stays zero.
            out = torch.zeros_like(h)
            k, s = self.config.conv_kernel[0], self.config.conv_stride[0]
            for i, n in enumerate(((lengths + 2 * self.pad - k) // s + 1).tolist()):
                out[i : i + 1, :, :n] = norm(h[i : i + 1, :, :n])
            h = out
        h = layers[0].activation(h)
        for layer in layers[1:]:
            h = layer(h)
        return h

    def _tiled_features(self, x: torch.Tensor, norm_stats) -> torch.Tensor:
        """The conv features with the first layers cache-blocked (float32 CPU inference)."""
        layers = self.feature_extractor.conv_layers
        conv, norm = layers[0].conv, layers[0].layer_norm
        mean, var = (v.double() for v in norm_stats) if norm_stats is not None else first_conv_stats(conv, norm, x)
        # GroupNorm as one multiply-add per element, its coefficients in float64.
        per_group = norm.num_channels // norm.num_groups
        inv = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
        scale = inv * (norm.weight.double() if norm.affine else 1.0)
        shift = (norm.bias.double() if norm.affine else 0.0) - mean.repeat_interleave(per_group, dim=1) * scale
        scale, shift = scale.float()[:, :, None, None], shift.float()[:, :, None, None]
        ops = [ConvSpec.of(conv), lambda t: torch.addcmul(shift, t, scale), layers[0].activation]
        n = min(TILED_FEATURE_LAYERS, len(layers))
        for layer in layers[1:n]:
            ops += [ConvSpec.of(layer.conv), layer.activation]
        y, _ = self._runner.run([Segment(ops)], self._runner.to_layout(x[:, None]))
        h = self._runner.from_layout(y)
        for layer in layers[n:]:
            h = layer(h)
        return h

