"""Reading X-Codec checkpoints of every format (release, training, YuE, transformers, export, hub name),
safely: one resolver, one reader, one state loader; every ``torch.load`` is weights-only (docs/conversion.md)."""

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from modules.teacher import check_teacher_size
from utils.config import ConfigError
from utils.hub import HubError, hub_file

from .config import GeneratorConfig, check_audio_norm_scale, generator_config_from_dict, load_generator_config
from .hf_layout import generator_config_from_hf, hf_key_to_original, teacher_from_hf_config
from .xcodec2_layout import (
    Codec2Config,
    codec2_config_from_hf,
    codec2_config_from_pip,
    hf_to_ours,
    is_pip_config,
    original_to_ours,
)

RELEASE_REPO = "ZhenYe234/xcodec"
# name -> (checkpoint file, config file) in RELEASE_REPO
RELEASES: dict[str, tuple[str, str]] = {
    "xcodec_hubert_librispeech": ("xcodec_speech_hubert_librispeech.pth", "config_hubert.yaml"),
    "xcodec_wavlm_mls": ("xcodec_speech_wavlm_mls.pth", "config_wavlm.yaml"),
    "xcodec_wavlm_more_data": ("xcodec_speech_wavlm_more_data.pth", "config_wavlm.yaml"),
    "xcodec_hubert_general_audio": ("xcodec_hubert_general_audio.pth", "config_hubert_general.yaml"),
    "xcodec_hubert_general_audio_v2": ("xcodec_hubert_general_audio_v2.pth", "config_hubert_general.yaml"),
}
# YuE's music codec: a training checkpoint {"codec_model": ...}, its YAML beside it, its teacher in semantic_ckpts/
YUE_RELEASE, YUE_REPO = "yue_xcodec_mini", "m-a-p/xcodec_mini_infer"
YUE_FILES = ["final_ckpt/ckpt_00360000.pth", "final_ckpt/config.yaml", "semantic_ckpts/hf_1_325000/config.json"]
TRANSFORMERS_FILES = ["config.json", "model.safetensors"]
# X-Codec 2: the pip package's hub layout (config.json + model.safetensors, the original names), as Llasa uses it
HUB_RELEASES = {"xcodec2": "HKUSTAudio/xcodec2"}
LOCAL_HINT = "Without network, pass a local checkpoint: --checkpoint /path/to/model.pth --config /path/to/config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in one line."""


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def download(repo: str, files: list[str], what: str, hint: str) -> list[Path]:
    """``files`` of hub ``repo``, cached or downloaded; else CheckpointError ``could not get {what}``, why, ``hint``."""
    try:
        return [hub_file(repo, f) for f in files]
    except HubError as exc:
        raise CheckpointError(f"could not get {what}: {exc}. {hint}") from None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {_first_line(exc, 160)}"
        raise CheckpointError(f"could not get {what} from the Hugging Face Hub ({reason}). {hint}") from None


def read_torch_file(path: str | Path, data: bytes | None = None) -> dict:
    """Weights-only ``torch.load`` of ``path`` (or of its ``data``, already read), a dict or CheckpointError."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a directory, device or pipe); a checkpoint is a .pth file")
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            obj = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            why = "the file holds Python objects other than tensors, which are never unpickled (weights-only loading)"
            raise CheckpointError(f"{path}: refused: {why}") from None
        reason = _first_line(exc).split(". ")[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _read_json(path: Path, data: bytes | None = None):
    try:
        return json.loads((path.read_bytes() if data is None else data).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:160]
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({why})") from None


_G = (".weight_g", ".parametrizations.weight.original0")
_V = (".weight_v", ".parametrizations.weight.original1")


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``g * v / ||v||`` with the norm over every dim but the one ``g`` spans (the one weight-norm fold)."""
    big = [d for d, s in enumerate(g.shape) if s > 1]
    return torch._weight_norm(v, g, big[0] if big else 0)


def adapt_weight_norm(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Weight-normed entries in the style ``expected`` keys use: ``weight_g/_v`` or ``original0/1`` folded
    into ``weight`` or renamed; a plain ``weight`` where a parametrization is expected becomes ``||w||, w``."""
    out = dict(state)
    prefixes = {k[: -len(s)] for k in state for s in _G + _V if k.endswith(s)}
    for prefix in prefixes:
        g = next((state[prefix + s] for s in _G if prefix + s in state), None)
        v = next((state[prefix + s] for s in _V if prefix + s in state), None)
        if g is None or v is None:
            continue  # reported as a missing key later
        for s in _G + _V:
            out.pop(prefix + s, None)
        if prefix + ".weight" in expected:
            out[prefix + ".weight"] = fold_weight_norm(g, v)
        else:
            style = 1 if prefix + _G[1] in expected else 0
            out[prefix + _G[style]], out[prefix + _V[style]] = g, v
    for key in [k for k in out if k.endswith(".weight") and k not in expected]:
        prefix = key[: -len(".weight")]
        if prefix + _G[1] in expected:
            w = out.pop(key)
            dim = 2 if prefix.endswith("pos_conv_embed.conv") else 0
            out[prefix + _G[1]], out[prefix + _V[1]] = torch.norm_except_dim(w, 2, dim), w
    return out


def load_codec_state(model: nn.Module, state: dict, source: str = "checkpoint",
                     against: str = "the config's architecture") -> None:  # fmt: skip
    """Strict ``load_state_dict`` of a state of any weight-norm style, after checking keys, shapes, dtypes
    and finiteness (else a one-line CheckpointError naming ``source``, ``against`` and the tensors)."""
    expected_state = model.state_dict()
    expected = set(expected_state)
    state = adapt_weight_norm({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    wrong = sorted(k for k in expected & set(state) if state[k].shape != expected_state[k].shape)
    parts = [f"{len(missing)} missing key(s): {', '.join(missing[:10])}"] if missing else []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}")
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected_state[k].shape)}" for k in wrong[:10]]
        parts.append(f"{len(wrong)} shape mismatch(es): {', '.join(shapes)}")
    if parts:
        raise CheckpointError(f"{source} does not match {against}: " + "; ".join(parts))
    # Weights that load but cannot work: every code the same, or non-finite audio.
    ints = sorted(k for k in state if expected_state[k].is_floating_point() and not state[k].is_floating_point())
    if ints:
        what = f"{len(ints)} weight(s) are not floating point, e.g. {ints[0]} ({state[ints[0]].dtype})"
        raise CheckpointError(f"{source}: {what}")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        what = f"{len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0]}"
        raise CheckpointError(f"{source}: {what}; refusing non-finite weights")
    model.load_state_dict(state, strict=True)


class CheckpointSource(NamedTuple):
    """A checkpoint's files; ``config`` None: a ``.pth`` with no YAML; ``explicit_config``: the user's, which wins."""

    kind: str
    weights: Path
    config: Path | None
    explicit_config: bool


def resolve_checkpoint(checkpoint: str | Path, config: str | Path | None = None) -> CheckpointSource:
    """A release name, hub ``owner/name`` or path (a file or a directory of any format), and an optional YAML."""
    cfg = Path(config) if config is not None else None
    name, path = str(checkpoint), Path(checkpoint)
    if isinstance(checkpoint, str) and checkpoint in RELEASES:
        weights, release_cfg = download(RELEASE_REPO, list(RELEASES[name]), f"release {name!r}", LOCAL_HINT)
        return CheckpointSource("pth", weights, cfg or release_cfg, True)
    parts, suffixes = name.split("/"), (".pth", ".pt", ".safetensors", ".yaml", ".json")
    repo_id = len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and path.suffix not in suffixes
    if isinstance(checkpoint, str) and (checkpoint in HUB_RELEASES or checkpoint == YUE_RELEASE
                                        or (not path.exists() and repo_id)):  # fmt: skip
        repo = YUE_REPO if checkpoint == YUE_RELEASE else HUB_RELEASES.get(name, name)
        files = YUE_FILES if repo == YUE_REPO else TRANSFORMERS_FILES
        where = download(repo, files, repr(repo), "Without network, pass a local checkpoint directory")[0].parent
        return resolve_checkpoint(where.parent if repo == YUE_REPO else where, config)
    if not path.exists():
        if "/" not in name and not path.suffix:
            known = ", ".join([*RELEASES, YUE_RELEASE, *HUB_RELEASES])
            raise CheckpointError(f"unknown release name {name!r}; known releases: {known}")
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir() and (path / "final_ckpt").is_dir():  # YuE's repository layout
        found = sorted((path / "final_ckpt").glob("*.pth"))
        if not found:
            raise CheckpointError(f"{path / 'final_ckpt'}: no .pth checkpoint in it")
        weights = path / YUE_FILES[0] if (path / YUE_FILES[0]).is_file() else found[-1]
        return CheckpointSource("pth", weights, cfg or weights.parent / "config.yaml", cfg is not None)
    if path.is_dir() and all((path / f).is_file() for f in TRANSFORMERS_FILES):
        return CheckpointSource("transformers", path / "model.safetensors", path / "config.json", False)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    elif path.is_dir():
        layouts = "config.json + model.safetensors, config.yaml + model.safetensors, nor final_ckpt/ (YuE)"
        raise CheckpointError(f"{path}: directory holds neither {layouts}")
    if path.suffix == ".safetensors":
        return CheckpointSource("export", path, cfg or path.parent / "config.yaml", cfg is not None)
    beside = path.parent / "config.yaml"
    return CheckpointSource("pth", path, cfg or (beside if beside.is_file() else None), cfg is not None)


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint in memory, tensors in our key names; ``kind``: release, training, yue, transformers or export;
    ``id``: ``xcodec-`` + 16 hex digits of its files (not tensors: folding rounds differently per thread count)."""

    state: dict[str, torch.Tensor]
    generator: GeneratorConfig | Codec2Config | None
    audio_norm_scale: float
    kind: str
    source: str
    id: str


def _yaml_config(path: Path | None, weights: Path) -> tuple[GeneratorConfig, float]:
    if path is None:
        beside = weights.parent / "config.yaml"
        what = f"{beside} is not a file" if beside.exists() else "no config.yaml beside it"
        raise CheckpointError(f"{weights}: no config given and {what}; pass --config /path/to/config.yaml")
    return load_generator_config(path)


def _hf_config(path: Path, data: bytes | None) -> tuple[GeneratorConfig | Codec2Config, float]:
    """Architecture and ``audio_norm_scale`` (0.95 when absent; X-Codec 2: none) of a config.json: transformers'
    ``xcodec`` or ``xcodec2``, or the X-Codec 2 pip package's."""
    config = _read_json(path, data)
    if not isinstance(config, dict) or config.get("model_type") not in ("xcodec", "xcodec2"):
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path}: config.json is for model_type {found!r}, not 'xcodec' or 'xcodec2'")
    if config["model_type"] == "xcodec2":
        return codec2_config_from_hf(config, str(path)), 1.0
    if is_pip_config(config):
        return codec2_config_from_pip(config, str(path)), 1.0
    gen = generator_config_from_hf(config, str(path))
    return gen, check_audio_norm_scale(config.get("audio_norm_scale", 0.95), path)


def _yue_config(src: CheckpointSource) -> GeneratorConfig:
    """YuE's YAML, with the teacher's architecture from ``semantic_ckpts/*/config.json`` when present."""
    gen, _ = _yaml_config(src.config, src.weights)  # its audio_norm_scale (0.95) is training-only
    root = src.weights.parent.parent / "semantic_ckpts"
    teachers = sorted(root.glob("*/config.json"))
    if len(teachers) > 1:
        raise CheckpointError(f"{root}: several teacher configs; expected one")
    if not teachers:
        return gen  # the standard HuBERT base architecture, which YuE's teacher has
    data = _read_json(teachers[0])
    if not isinstance(data, dict):
        raise CheckpointError(f"{teachers[0]}: expected a JSON object")
    name, overrides, _ = teacher_from_hf_config(data, str(teachers[0]))
    check_teacher_size(name, overrides, f"{teachers[0]}: ")
    return dataclasses.replace(gen, semantic_techer=name, semantic_model_config=overrides or None)


def _codec2_architecture(config: str | Path | None) -> Codec2Config | None:
    """An X-Codec 2 architecture other than the released one, for the original layouts (their files hold none):
    a transformers ``Xcodec2Config`` config.json given as ``config``."""
    if config is None:
        return None
    data = _read_json(Path(config))
    if not isinstance(data, dict) or data.get("model_type") != "xcodec2":
        raise CheckpointError(f"{config}: an X-Codec 2 architecture is a transformers config.json (model_type 'xcodec2')")
    return codec2_config_from_hf(data, str(config))


def _read_files(src: CheckpointSource) -> tuple[list[bytes | None], str]:
    """The bytes of the weights and the config (``None``: not a regular file) and :attr:`Checkpoint.id`."""
    digest, blobs = hashlib.sha256(), []
    for path in (src.weights, src.config):
        data = path.read_bytes() if path is not None and path.is_file() else None
        if data is not None:
            digest.update(path.name.encode() + b"\0" + data)
        blobs.append(data)
    return blobs, "xcodec-" + digest.hexdigest()[:16]


def read_checkpoint(checkpoint: str | Path, config: str | Path | None = None, architecture: bool = True) -> Checkpoint:
    """Read any checkpoint, each file once; ``architecture=False``: no config needed, ``generator`` None."""
    src = resolve_checkpoint(checkpoint, config)
    blobs, ckpt_id = _read_files(src)
    where = str(src.weights.parent if src.kind == "transformers" else src.weights)
    try:
        if src.kind != "pth":
            try:
                state = load_safetensors(blobs[0])
            except Exception as exc:
                raise CheckpointError(f"{src.weights}: not a readable safetensors file ({_first_line(exc)})") from None
            if src.kind == "transformers":
                gen, scale = _hf_config(src.config, blobs[1])
                if isinstance(gen, Codec2Config):  # transformers' names, or the pip package's (the original's)
                    pip = "CodecEnc" in {k.split(".")[0] for k in state}
                    gen = _codec2_architecture(config) or gen if pip else gen
                    state = original_to_ours(state, gen.semantic_layers) if pip else hf_to_ours(state)
                    return Checkpoint(state, gen, scale, "xcodec2-pip" if pip else "xcodec2", where, ckpt_id)
                state = {hf_key_to_original(k, len(gen.ratios)): v for k, v in state.items()}
                return Checkpoint(state, gen, scale, "transformers", where, ckpt_id)
            return Checkpoint(state, *_yaml_config(src.config, src.weights), "export", where, ckpt_id)
        obj = read_torch_file(src.weights, blobs[0])
        lightning = obj.get("state_dict")
        if isinstance(lightning, dict) and any(str(k).startswith("CodecEnc.") for k in lightning):  # X-Codec 2's
            gen = _codec2_architecture(config) or Codec2Config()  # the .ckpt holds none: the released one by default
            state = original_to_ours({k: v for k, v in lightning.items() if isinstance(v, torch.Tensor)}, gen.semantic_layers)
            return Checkpoint(state, gen, 1.0, "xcodec2-lightning", where, ckpt_id)
        key = next((k for k in ("codec", "codec_model") if isinstance(obj.get(k), dict)), None)  # ours, YuE's
        state = {k: v for k, v in (obj if key is None else obj[key]).items() if isinstance(v, torch.Tensor)}
        kind = {"codec": "training", "codec_model": "yue", None: "release"}[key]
        if not architecture:
            return Checkpoint(state, None, 1.0, kind, where, ckpt_id)
        if kind == "yue":  # YuE encodes raw audio: no input gain
            return Checkpoint(state, _yue_config(src), 1.0, kind, where, ckpt_id)
        if kind == "training" and not src.explicit_config and isinstance(obj.get("config"), dict):
            return Checkpoint(state, *generator_config_from_dict(obj["config"], where), kind, where, ckpt_id)
        return Checkpoint(state, *_yaml_config(src.config, src.weights), kind, where, ckpt_id)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def read_state(checkpoint: str | Path, config: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of any checkpoint in our key names, without its config where the format allows."""
    return read_checkpoint(checkpoint, config, architecture=False).state


def checkpoint_id(checkpoint: str | Path, config: str | Path | None = None) -> str:
    """:attr:`Checkpoint.id` of a checkpoint, for callers without the model (``XCodec.checkpoint_id`` has it)."""
    return _read_files(resolve_checkpoint(checkpoint, config))[1]
