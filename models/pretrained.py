"""Loading X-Codec weights from every format users have, safely.

Formats: an original release ``.pth`` (+ its YAML), a transformers ``XcodecModel``
directory (config.json + model.safetensors), our own export (config.yaml +
model.safetensors), a checkpoint written by our training, or a release name that is
downloaded once into the Hugging Face cache.

Every ``torch.load`` uses ``weights_only=True``; the only extra class allowed is
``io.BytesIO`` (the releases carry such entries), and non-tensor entries are dropped.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from utils.config import ConfigError, GeneratorConfig, generator_config_from_dict, load_generator_config

from .builder import build_codec
from .xcodec import XCodec

RELEASE_REPO = "ZhenYe234/xcodec"

# name -> (checkpoint file, config file) in RELEASE_REPO
RELEASES: dict[str, tuple[str, str]] = {
    "xcodec_hubert_librispeech": ("xcodec_speech_hubert_librispeech.pth", "config_hubert.yaml"),
    "xcodec_wavlm_mls": ("xcodec_speech_wavlm_mls.pth", "config_wavlm.yaml"),
    "xcodec_wavlm_more_data": ("xcodec_speech_wavlm_more_data.pth", "config_wavlm.yaml"),
    "xcodec_hubert_general_audio": ("xcodec_hubert_general_audio.pth", "config_hubert_general.yaml"),
    "xcodec_hubert_general_audio_v2": ("xcodec_hubert_general_audio_v2.pth", "config_hubert_general.yaml"),
}
DEFAULT_RELEASE = "xcodec_hubert_librispeech"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in one line."""


# ---------------------------------------------------------------------------- raw files
def read_torch_file(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True`` (plus ``io.BytesIO``), refusing anything else."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Unpickl" in type(exc).__name__:
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects other than tensors, which are never unpickled "
                f"(weights-only loading). {first[:200]}"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def tensors_only(state: dict) -> dict[str, torch.Tensor]:
    """Drop the non-tensor entries (e.g. io.BytesIO) that some releases carry."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


# ---------------------------------------------------------------------------- weight norm
_WN_SUFFIXES = {
    "g": (".weight_g", ".parametrizations.weight.original0"),
    "v": (".weight_v", ".parametrizations.weight.original1"),
}


def _wn_dim(g: torch.Tensor) -> int:
    big = [d for d, s in enumerate(g.shape) if s > 1]
    return big[0] if big else 0


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``g * v / ||v||`` with the norm over every dim but the one ``g`` spans."""
    return torch._weight_norm(v, g, _wn_dim(g))


def adapt_weight_norm(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rewrite weight-normed entries into the style ``expected`` keys use.

    Accepts old-style ``weight_g/weight_v``, ``parametrizations.weight.original0/1`` and
    plain (folded) ``weight`` for every layer, the teacher's positional conv included.
    """
    out = dict(state)
    prefixes = set()
    for key in state:
        for suffix in _WN_SUFFIXES["g"] + _WN_SUFFIXES["v"]:
            if key.endswith(suffix):
                prefixes.add(key[: -len(suffix)])
    for prefix in prefixes:
        g = next((state[prefix + s] for s in _WN_SUFFIXES["g"] if prefix + s in state), None)
        v = next((state[prefix + s] for s in _WN_SUFFIXES["v"] if prefix + s in state), None)
        if g is None or v is None:
            continue  # reported as a missing key later
        for s in _WN_SUFFIXES["g"] + _WN_SUFFIXES["v"]:
            out.pop(prefix + s, None)
        if prefix + ".weight" in expected:
            out[prefix + ".weight"] = fold_weight_norm(g, v)
        elif prefix + ".parametrizations.weight.original0" in expected:
            out[prefix + ".parametrizations.weight.original0"] = g
            out[prefix + ".parametrizations.weight.original1"] = v
        else:
            out[prefix + ".weight_g"], out[prefix + ".weight_v"] = g, v
    # Plain weights into a weight-normed model: g = ||w||, v = w reproduces w.
    for key in list(out):
        if key.endswith(".weight"):
            prefix = key[: -len(".weight")]
            if key not in expected and prefix + ".parametrizations.weight.original0" in expected:
                w = out.pop(key)
                dim = 2 if prefix.endswith("pos_conv_embed.conv") else 0
                out[prefix + ".parametrizations.weight.original0"] = torch.norm_except_dim(w, 2, dim)
                out[prefix + ".parametrizations.weight.original1"] = w
    return out


def load_codec_state(model: XCodec, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` (any weight-norm style) into ``model``; mismatches fail naming keys."""
    expected_state = model.state_dict()
    expected = set(expected_state)
    state = adapt_weight_norm(tensors_only(state), expected)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    wrong = sorted(k for k in expected & set(state) if state[k].shape != expected_state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}")
        if wrong:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected_state[k].shape)}" for k in wrong[:10]]
            parts.append(f"{len(wrong)} shape mismatch(es): {', '.join(shapes)}")
        raise CheckpointError(f"{source} does not match the config's architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------- transformers layout
# Our acoustic stacks -> transformers' names: (our prefix, their module, index of the
# first residual unit inside a block, names of the block's other layers by index).
_ACOUSTIC_STACKS = (
    ("encoder.block", "acoustic_encoder", 0, {3: "snake1", 4: "conv1"}),
    ("decoder_2.model", "acoustic_decoder", 2, {0: "snake1", 1: "conv_t1"}),
)


def _acoustic_key_to_hf(key: str, n_stages: int) -> str | None:
    for prefix, module, first_unit, others in _ACOUSTIC_STACKS:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.*)", key)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        ends = {0: "conv1", n_stages + 1: "snake1", n_stages + 2: "conv2"}
        if i in ends:
            return f"{module}.{ends[i]}.{rest}"
        r = re.match(r"block\.(\d)\.block\.(\d)\.(.*)", rest)
        if r:  # residual unit j, layer k: Snake1d, conv, Snake1d, conv
            j, k = int(r.group(1)) - first_unit, int(r.group(2))
            return f"{module}.block.{i - 1}.res_unit{j + 1}.{('snake1', 'conv1', 'snake2', 'conv2')[k]}.{r.group(3)}"
        r = re.match(r"block\.(\d)\.(.*)", rest)
        return f"{module}.block.{i - 1}.{others[int(r.group(1))]}.{r.group(2)}"
    return None


def original_key_to_hf(key: str, n_stages: int) -> str:
    """Map a released/our state-dict key to transformers' ``XcodecModel`` naming."""
    acoustic = _acoustic_key_to_hf(key, n_stages)
    if acoustic is not None:
        return acoustic
    if key.startswith(("encoder_semantic.", "decoder_semantic.")):
        return re.sub(r"\.conv\.(weight|bias)$", r".\1", key)
    m = re.match(r"quantizer\.vq\.layers\.(\d+)\._codebook\.(.*)", key)
    if m:
        return f"quantizer.quantizers.{m.group(1)}.codebook.{m.group(2)}"
    for ours, theirs in (("fc_prior.", "fc."), ("fc_post1.", "fc1."), ("fc_post2.", "fc2.")):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def state_to_hf(state: dict[str, torch.Tensor], n_stages: int) -> dict[str, torch.Tensor]:
    return {original_key_to_hf(k, n_stages): v for k, v in state.items()}


def state_from_hf(state: dict[str, torch.Tensor], model: XCodec) -> dict[str, torch.Tensor]:
    """Rename a transformers ``XcodecModel`` state dict to our keys (any weight-norm style)."""
    n = len(model.config.ratios)
    names: dict[str, str] = {}
    for key in model.state_dict():
        for variant in _key_variants(key):
            names[original_key_to_hf(variant, n)] = variant
    return {names.get(k, k): v for k, v in state.items()}


def _key_variants(key: str) -> list[str]:
    for suffix in (".weight", ".parametrizations.weight.original0", ".parametrizations.weight.original1"):
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            return [base + s for s in (".weight", ".weight_g", ".weight_v", ".parametrizations.weight.original0", ".parametrizations.weight.original1")]
    return [key]


def generator_config_from_hf(config: dict) -> GeneratorConfig:
    """GeneratorConfig from a transformers ``XcodecConfig`` dict (config.json)."""
    from transformers import AutoConfig

    ac = config.get("acoustic_model_config") or {}
    sc = dict(config.get("semantic_model_config") or {})
    model_type = sc.get("model_type", "hubert")
    teacher = {"hubert": "hubert_base", "wavlm": "wavlm_base_plus"}.get(model_type)
    if teacher is None:
        raise CheckpointError(f"unsupported semantic model type {model_type!r} in config.json")
    default = AutoConfig.for_model(model_type).to_dict()
    full = AutoConfig.for_model(model_type, **{k: v for k, v in sc.items() if k != "model_type"}).to_dict()
    ignore = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "model_type"}
    overrides = {k: v for k, v in full.items() if k not in ignore and default.get(k) != v}
    return GeneratorConfig(
        D=ac.get("hidden_size", 256),
        target_bandwidths=[float(b) for b in config.get("target_bandwidths", [0.5, 1, 1.5, 2, 4])],
        ratios=list(ac.get("downsampling_ratios", [8, 5, 4, 2])),
        sample_rate=config.get("sample_rate", 16000),
        bins=config.get("codebook_size", 1024),
        semantic_techer=teacher,
        encoder_dim=ac.get("encoder_hidden_size", 64),
        decoder_dim=ac.get("decoder_hidden_size", 1024),
        semantic_blocks=len(config.get("strides", [1, 1])),
        semantic_model_config=overrides or None,
    )


def hf_config_from_generator(cfg: GeneratorConfig) -> dict:
    """A transformers ``XcodecConfig`` dict describing ``cfg``'s architecture."""
    from modules.teacher import TEACHERS, _teacher_config

    teacher_cfg = _teacher_config(cfg.semantic_techer, cfg.semantic_model_config).to_dict()
    teacher_cfg["model_type"] = TEACHERS[cfg.semantic_techer].model_type
    return {
        "model_type": "xcodec",
        "target_bandwidths": list(cfg.target_bandwidths),
        "sample_rate": cfg.sample_rate,
        "codebook_size": cfg.bins,
        "channel_ratios": [1] * cfg.semantic_blocks,
        "strides": [1] * cfg.semantic_blocks,
        "acoustic_model_config": {
            "model_type": "dac",
            "encoder_hidden_size": cfg.encoder_dim,
            "downsampling_ratios": list(cfg.ratios),
            "decoder_hidden_size": cfg.decoder_dim,
            "upsampling_ratios": list(cfg.ratios),
            "hidden_size": cfg.D,
            "sampling_rate": cfg.sample_rate,
            "hop_length": int(torch.tensor(cfg.ratios).prod()),
        },
        "semantic_model_config": teacher_cfg,
    }


# ---------------------------------------------------------------------------- resolution
def download_release(name: str) -> tuple[Path, Path]:
    """Fetch a release's .pth and YAML into the Hugging Face cache (once) and return their paths."""
    from huggingface_hub import hf_hub_download

    ckpt, cfg = RELEASES[name]
    try:
        return Path(hf_hub_download(RELEASE_REPO, ckpt)), Path(hf_hub_download(RELEASE_REPO, cfg))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"could not get release {name!r} from the Hugging Face Hub ({type(exc).__name__}: {reason}). "
            "Without network, pass a local checkpoint: --checkpoint /path/to/model.pth --config /path/to/config.yaml"
        ) from None


def load_pretrained(path: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu") -> XCodec:
    """See :meth:`XCodec.from_pretrained`."""
    cfg_path = Path(config) if config is not None else None
    if isinstance(path, str) and path in RELEASES:
        ckpt, release_cfg = download_release(path)
        return _from_pth(ckpt, cfg_path or release_cfg, device)
    p = Path(path)
    if not p.exists():
        if "/" not in str(path) and not p.suffix:
            raise CheckpointError(f"unknown release name {str(path)!r}; known releases: {', '.join(RELEASES)}")
        raise CheckpointError(f"{p}: checkpoint not found")
    if p.is_dir():
        if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            return _from_hf_dir(p, device)
        if (p / "model.safetensors").is_file():
            return _from_export(p / "model.safetensors", cfg_path or p / "config.yaml", device)
        raise CheckpointError(f"{p}: directory holds neither config.json + model.safetensors nor config.yaml + model.safetensors")
    if p.suffix == ".safetensors":
        return _from_export(p, cfg_path or p.parent / "config.yaml", device)
    return _from_pth(p, cfg_path, device)


def _finish(model: XCodec, device) -> XCodec:
    _fold_teacher_weight_norm(model)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device)


def _fold_teacher_weight_norm(model: XCodec) -> None:
    from torch.nn.utils import parametrize

    for module in model.semantic_model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def _config_for(cfg_path: Path | None, ckpt: Path) -> tuple[GeneratorConfig, float]:
    if cfg_path is None:
        cfg_path = ckpt.parent / "config.yaml"
        if not cfg_path.is_file():
            raise CheckpointError(f"{ckpt}: no config given and no config.yaml beside it; pass --config /path/to/config.yaml")
    try:
        return load_generator_config(cfg_path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def _from_pth(path: Path, cfg_path: Path | None, device) -> XCodec:
    obj = read_torch_file(path)
    if "codec" in obj and isinstance(obj.get("codec"), dict):  # our training checkpoint
        if cfg_path is not None:
            gen, scale = _config_for(cfg_path, path)
        elif isinstance(obj.get("config"), dict):
            try:
                gen, scale = generator_config_from_dict(obj["config"], str(path))
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from None
        else:
            gen, scale = _config_for(None, path)
        state = obj["codec"]
    else:
        gen, scale = _config_for(cfg_path, path)
        state = obj
    model = build_codec(gen, scale, weight_norm=False)
    load_codec_state(model, state, str(path))
    return _finish(model, device)


def _from_export(path: Path, cfg_path: Path, device) -> XCodec:
    gen, scale = _config_for(cfg_path, path)
    model = build_codec(gen, scale, weight_norm=False)
    load_codec_state(model, read_safetensors(path), str(path))
    return _finish(model, device)


def read_hf_dir(path: Path) -> tuple[dict[str, torch.Tensor], GeneratorConfig, float, XCodec]:
    """A transformers ``XcodecModel`` directory: its state renamed to our keys, its
    generator config, ``audio_norm_scale`` (0.95 when config.json has none) and an
    inference skeleton (plain convs) built from them, not yet loaded."""
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if config.get("model_type") != "xcodec":
        raise CheckpointError(f"{path}: config.json is for model_type {config.get('model_type')!r}, not 'xcodec'")
    gen = generator_config_from_hf(config)
    scale = float(config.get("audio_norm_scale", 0.95))
    model = build_codec(gen, scale, weight_norm=False)
    return state_from_hf(read_safetensors(path / "model.safetensors"), model), gen, scale, model


def _from_hf_dir(path: Path, device) -> XCodec:
    state, _, _, model = read_hf_dir(path)
    load_codec_state(model, state, str(path))
    return _finish(model, device)


# ---------------------------------------------------------------------------- export
def save_export(model: XCodec, directory: str | Path) -> Path:
    """Write our inference export: ``model.safetensors`` (folded weights) + ``config.yaml``."""
    import yaml
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = folded_state_dict(model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    doc = {"generator": {"name": "SoundStream", "config": asdict(model.config)}, "audio_norm_scale": model.audio_norm_scale}
    (directory / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return directory


def folded_state_dict(model: XCodec) -> dict[str, torch.Tensor]:
    """The state dict with every weight norm folded into plain ``weight`` tensors."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    expected = {re.sub(r"\.parametrizations\.weight\.original[01]$", ".weight", k) for k in state}
    return adapt_weight_norm(state, expected)


def to_transformers(model: XCodec):
    """A transformers ``XcodecModel`` (eval mode) holding exactly ``model``'s weights."""
    from transformers import XcodecConfig, XcodecModel

    hf = XcodecModel(XcodecConfig(**hf_config_from_generator(model.config))).eval()
    state = state_to_hf(folded_state_dict(model), len(model.config.ratios))
    hf.load_state_dict(adapt_weight_norm(state, set(hf.state_dict())), strict=True)
    return hf


def save_transformers(model: XCodec, directory: str | Path) -> Path:
    """Write a transformers ``XcodecModel`` directory (config.json + model.safetensors)."""
    directory = Path(directory)
    to_transformers(model).save_pretrained(str(directory))
    return directory
