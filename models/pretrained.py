"""Reading X-Codec checkpoints of every format, safely; the one checkpoint resolver.

Formats: an original release ``.pth`` (+ its YAML), a checkpoint written by our training
(a ``.pth`` holding ``codec`` and ``config``), a transformers ``XcodecModel`` directory
(config.json + model.safetensors), our own export (config.yaml + model.safetensors), or
a release name that is downloaded once into the Hugging Face cache.

:func:`resolve_checkpoint` turns what a user gave (path, release name) into a
:class:`CheckpointSource` (format, files, config); :func:`read_checkpoint` reads one into
a state dict in our key names plus its architecture. Loading
(``XCodec.from_pretrained``), conversion (``models.convert``), the tokenizer's
checkpoint fingerprint (:func:`checkpoint_id`) and training's ``init_from`` all go
through these two.

Every ``torch.load`` uses ``weights_only=True``; the only extra class allowed is
``io.BytesIO`` (the releases carry such entries), and non-tensor entries are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from modules.teacher import check_teacher_size
from utils.config import ConfigError
from utils.hub import HubError, hub_file, hub_snapshot

from .config import GeneratorConfig, generator_config_from_dict, load_generator_config
from .hf_layout import LayoutError, generator_config_from_hf, state_from_hf, teacher_from_hf_config

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
# YuE's music codec (multimodal-art-projection/YuE): a training checkpoint {"codec_model": ...}
# with 12 codebooks, its YAML beside it and the teacher's architecture in semantic_ckpts/.
YUE_RELEASE, YUE_REPO = "yue_xcodec_mini", "m-a-p/xcodec_mini_infer"
YUE_FILES = ["final_ckpt/ckpt_00360000.pth", "final_ckpt/config.yaml", "semantic_ckpts/hf_1_325000/config.json"]
REPO_FILES: dict[str, list[str]] = {YUE_REPO: YUE_FILES}  # hub repositories not in the transformers layout


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in one line."""


# ---------------------------------------------------------------------------- raw files
def read_torch_file(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True`` (plus ``io.BytesIO``), refusing anything else."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a directory, device or pipe); a checkpoint is a .pth file")
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects other than tensors, which are never unpickled "
                "(weights-only loading)"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def tensors_only(state: dict) -> dict[str, torch.Tensor]:
    """Drop the non-tensor entries (e.g. io.BytesIO) that some releases carry."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
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


def load_codec_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` (any weight-norm style) into ``model``; mismatches fail naming keys."""
    load_checked_state(model, adapt_weight_norm(tensors_only(state), set(model.state_dict())), source)


def load_checked_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, against: str = "the config's architecture") -> None:
    """``model.load_state_dict(state, strict=True)`` after the checks every loader owes: the keys
    and shapes (named), then weights that would load but cannot work (integer, NaN/Inf).

    Raises:
        CheckpointError: one line naming ``source``, what it was checked ``against`` and the tensors.
    """
    expected_state = model.state_dict()
    expected = set(expected_state)
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
        raise CheckpointError(f"{source} does not match {against}: " + "; ".join(parts))
    # Weights that load but cannot work: every code the same, or non-finite audio.
    integer = sorted(k for k in state if expected_state[k].is_floating_point() and not state[k].is_floating_point())
    if integer:
        raise CheckpointError(f"{source}: {len(integer)} weight(s) are not floating point, e.g. {integer[0]} ({state[integer[0]].dtype})")
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        raise CheckpointError(f"{source}: {len(nonfinite)} tensor(s) hold NaN or Inf, e.g. {nonfinite[0]}; refusing non-finite weights")
    model.load_state_dict(state, strict=True)



# ---------------------------------------------------------------------------- resolution
@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint's files are.

    Attributes:
        kind: ``"pth"`` (a release or one of our training checkpoints), ``"transformers"``
            or ``"export"``.
        weights: the ``.pth`` file, the transformers directory or the ``model.safetensors``.
        config: the YAML given or found for a ``.pth``/export (``None`` for a ``.pth`` with
            none given and none beside it: a training checkpoint carries its own), or
            ``config.json`` of a transformers directory.
        explicit_config: ``config`` was given by the user (it then wins over a training
            checkpoint's own config).
        name: what the user gave.
    """

    kind: str
    weights: Path
    config: Path | None
    explicit_config: bool
    name: str

    @property
    def files(self) -> list[Path]:
        """The files that define the model (weights and config), for fingerprints."""
        weights = self.weights / "model.safetensors" if self.kind == "transformers" else self.weights
        return [f for f in (weights, self.config) if f is not None and f.is_file()]


def download_release(name: str) -> tuple[Path, Path]:
    """Fetch a release's .pth and YAML into the Hugging Face cache (once) and return their paths."""
    ckpt, cfg = RELEASES[name]
    try:
        return hub_file(RELEASE_REPO, ckpt), hub_file(RELEASE_REPO, cfg)
    except HubError as exc:
        raise CheckpointError(
            f"could not get release {name!r}: {exc}. Without network, pass a local checkpoint: "
            "--checkpoint /path/to/model.pth --config /path/to/config.yaml"
        ) from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"could not get release {name!r} from the Hugging Face Hub ({type(exc).__name__}: {reason}). "
            "Without network, pass a local checkpoint: --checkpoint /path/to/model.pth --config /path/to/config.yaml"
        ) from None


TRANSFORMERS_FILES = ["config.json", "model.safetensors"]  # what a transformers XcodecModel repository needs


def is_repo_id(name: str) -> bool:
    """``owner/name`` of a Hugging Face repository (not a local path, not a file name)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and Path(name).suffix not in (".pth", ".pt", ".safetensors", ".yaml", ".json")


def download_repo(repo_id: str) -> Path:
    """The local snapshot of a hub repository holding a checkpoint (the files it needs only)."""
    try:
        return hub_snapshot(repo_id, REPO_FILES.get(repo_id, TRANSFORMERS_FILES))
    except HubError as exc:
        raise CheckpointError(f"could not get {repo_id!r}: {exc}. Without network, pass a local checkpoint directory") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not get {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {reason})") from None


def resolve_checkpoint(checkpoint: str | Path | CheckpointSource, config: str | Path | None = None) -> CheckpointSource:
    """Turn a release name or a path (``.pth``, transformers or export directory,
    ``.safetensors``) and an optional YAML into a :class:`CheckpointSource`."""
    if isinstance(checkpoint, CheckpointSource):
        return checkpoint
    cfg = Path(config) if config is not None else None
    name = str(checkpoint)
    if isinstance(checkpoint, str) and checkpoint == YUE_RELEASE:
        return resolve_checkpoint(download_repo(YUE_REPO), config)
    if isinstance(checkpoint, str) and checkpoint in RELEASES:
        ckpt, release_cfg = download_release(checkpoint)
        return CheckpointSource("pth", ckpt, cfg or release_cfg, True, name)
    path = Path(checkpoint)
    if not path.exists() and isinstance(checkpoint, str) and is_repo_id(name):
        return resolve_checkpoint(download_repo(name), config)
    if not path.exists():
        if "/" not in name and not path.suffix:
            raise CheckpointError(f"unknown release name {name!r}; known releases: {', '.join(RELEASES)}")
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        if (path / "final_ckpt").is_dir():  # YuE's repository layout
            found = sorted((path / "final_ckpt").glob("*.pth"))
            if not found:
                raise CheckpointError(f"{path / 'final_ckpt'}: no .pth checkpoint in it")
            weights = path / YUE_FILES[0] if (path / YUE_FILES[0]).is_file() else found[-1]
            return CheckpointSource("pth", weights, cfg or weights.parent / "config.yaml", cfg is not None, name)
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return CheckpointSource("transformers", path, path / "config.json", False, name)
        if (path / "model.safetensors").is_file():
            return CheckpointSource("export", path / "model.safetensors", cfg or path / "config.yaml", cfg is not None, name)
        raise CheckpointError(
            f"{path}: directory holds neither config.json + model.safetensors, config.yaml + model.safetensors, nor final_ckpt/ (YuE)"
        )
    if path.suffix == ".safetensors":
        return CheckpointSource("export", path, cfg or path.parent / "config.yaml", cfg is not None, name)
    beside = path.parent / "config.yaml"
    return CheckpointSource("pth", path, cfg or (beside if beside.is_file() else None), cfg is not None, name)


def checkpoint_id(checkpoint: str | Path | CheckpointSource, config: str | Path | None = None) -> str:
    """A short fingerprint of the checkpoint's files (weights and config), for manifests.

    Files, not loaded tensors: folding weight norm at load time rounds differently with
    different thread counts, so the loaded tensors are not a stable fingerprint.
    """
    digest = hashlib.sha256()
    for path in resolve_checkpoint(checkpoint, config).files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return "xcodec-" + digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- reading
@dataclasses.dataclass
class CheckpointContents:
    """A checkpoint read into memory.

    Attributes:
        state: tensors in our key names, weight norm as stored.
        generator: the architecture.
        audio_norm_scale: the gain the pipelines apply before encoding.
        kind: ``"release"``, ``"training"``, ``"transformers"`` or ``"export"``.
        source: where it came from (for messages).
    """

    state: dict[str, torch.Tensor]
    generator: GeneratorConfig
    audio_norm_scale: float
    kind: str
    source: str


def _yaml_config(path: Path | None, weights: Path) -> tuple[GeneratorConfig, float]:
    if path is None:
        beside = weights.parent / "config.yaml"
        what = f"{beside} is not a file" if beside.exists() else "no config.yaml beside it"
        raise CheckpointError(f"{weights}: no config given and {what}; pass --config /path/to/config.yaml")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; the config is a YAML file (e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    try:
        return load_generator_config(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def read_hf_config(path: Path) -> tuple[GeneratorConfig, float]:
    """Architecture and ``audio_norm_scale`` (0.95 when absent) of a transformers config.json."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({str(exc)[:160]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict) or config.get("model_type") != "xcodec":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path}: config.json is for model_type {found!r}, not 'xcodec'")
    try:
        gen = generator_config_from_hf(config, str(path))
    except LayoutError as exc:
        raise CheckpointError(str(exc)) from None
    scale = config.get("audio_norm_scale", 0.95)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{path}: audio_norm_scale: expected a finite number > 0, got {scale!r}")
    return gen, float(scale)


def read_state(checkpoint: str | Path | CheckpointSource, config: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of any checkpoint in our key names, without needing its config where the
    format allows (a release ``.pth`` alone: fine-tuning takes the architecture from its own config)."""
    src = resolve_checkpoint(checkpoint, config)
    if src.kind != "pth":
        return read_checkpoint(src).state
    obj = read_torch_file(src.weights)
    for key in ("codec", "codec_model"):  # ours, YuE's
        if isinstance(obj.get(key), dict):
            return tensors_only(obj[key])
    return tensors_only(obj)


def read_checkpoint(checkpoint: str | Path | CheckpointSource, config: str | Path | None = None) -> CheckpointContents:
    """Read any checkpoint (see :func:`resolve_checkpoint`) into a :class:`CheckpointContents`."""
    src = resolve_checkpoint(checkpoint, config)
    where = str(src.weights)
    if src.kind == "transformers":
        gen, scale = read_hf_config(src.config)
        state = state_from_hf(read_safetensors(src.weights / "model.safetensors"), len(gen.ratios))
        return CheckpointContents(state, gen, scale, "transformers", where)
    if src.kind == "export":
        gen, scale = _yaml_config(src.config, src.weights)
        return CheckpointContents(read_safetensors(src.weights), gen, scale, "export", where)
    obj = read_torch_file(src.weights)
    if isinstance(obj.get("codec"), dict):  # one of our training checkpoints
        if not src.explicit_config and isinstance(obj.get("config"), dict):
            try:
                gen, scale = generator_config_from_dict(obj["config"], where)
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from None
        else:
            gen, scale = _yaml_config(src.config, src.weights)
        return CheckpointContents(tensors_only(obj["codec"]), gen, scale, "training", where)
    if isinstance(obj.get("codec_model"), dict):  # YuE's training checkpoint: the codec only
        return CheckpointContents(tensors_only(obj["codec_model"]), _yue_config(src), 1.0, "yue", where)
    gen, scale = _yaml_config(src.config, src.weights)
    return CheckpointContents(tensors_only(obj), gen, scale, "release", where)


def _yue_config(src: CheckpointSource) -> GeneratorConfig:
    """YuE's architecture: its YAML, with the teacher's from ``semantic_ckpts/*/config.json`` of
    the repository (``final_ckpt/..``) when present. YuE encodes raw audio: no input gain."""
    gen, _ = _yaml_config(src.config, src.weights)  # its audio_norm_scale (0.95) is training-only
    teachers = sorted((src.weights.parent.parent / "semantic_ckpts").glob("*/config.json"))
    if len(teachers) > 1:
        raise CheckpointError(f"{src.weights.parent.parent / 'semantic_ckpts'}: several teacher configs; expected one")
    if not teachers:
        return gen  # the standard HuBERT base architecture, which YuE's teacher has
    try:
        data = json.loads(teachers[0].read_bytes().decode("utf-8"))
        if not isinstance(data, dict):
            raise CheckpointError(f"{teachers[0]}: expected a JSON object")
        name, overrides, _ = teacher_from_hf_config(data, str(teachers[0]))
        check_teacher_size(name, overrides, f"{teachers[0]}: ")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{teachers[0]}: not valid UTF-8 JSON ({str(exc)[:160]})") from None
    except RecursionError:
        raise CheckpointError(f"{teachers[0]}: not valid JSON (nested too deeply)") from None
    except (LayoutError, ConfigError) as exc:
        raise CheckpointError(str(exc)) from None
    return dataclasses.replace(gen, semantic_techer=name, semantic_model_config=overrides or None)
