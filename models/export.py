"""Writing X-Codec checkpoints as our export (folded ``model.safetensors`` + ``config.yaml``) or transformers'
``XcodecModel`` (``config.json`` + ``model.safetensors``), from any module with X-Codec's layout and attributes."""

import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi
from safetensors.torch import save_file
from transformers import XcodecConfig, XcodecModel

from .config import GeneratorConfig
from .hf_layout import hf_config_from_generator, original_key_to_hf
from .pretrained import adapt_weight_norm


def folded_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every weight norm folded into plain ``weight`` tensors."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return adapt_weight_norm(state, {re.sub(r"\.parametrizations\.weight\.original[01]$", ".weight", k) for k in state})


def write_export(state: dict[str, torch.Tensor], gen: GeneratorConfig, scale: float, directory: str | Path) -> Path:
    """Our export of ``state`` (our key names): ``model.safetensors`` + ``config.yaml``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    doc = {"generator": {"name": "SoundStream", "config": asdict(gen)}, "audio_norm_scale": scale}
    (directory / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return directory


def transformers_model(state: dict[str, torch.Tensor], gen: GeneratorConfig, scale: float) -> XcodecModel:
    """A transformers ``XcodecModel`` (eval mode) holding exactly ``state`` (our key names)."""
    hf = XcodecModel(XcodecConfig(**hf_config_from_generator(gen), audio_norm_scale=scale)).eval()
    renamed = {original_key_to_hf(k, len(gen.ratios)): v for k, v in state.items()}
    hf.load_state_dict(adapt_weight_norm(renamed, set(hf.state_dict())), strict=True)
    return hf


def save_export(model: torch.nn.Module, directory: str | Path) -> Path:
    return write_export(folded_state_dict(model), model.config, model.audio_norm_scale, directory)


def to_transformers(model: torch.nn.Module) -> XcodecModel:
    return transformers_model(folded_state_dict(model), model.config, model.audio_norm_scale)


def save_transformers(model: torch.nn.Module, directory: str | Path) -> Path:
    to_transformers(model).save_pretrained(str(directory))
    return Path(directory)


def push_to_hub(model: torch.nn.Module, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Upload ``model`` in the transformers format to the Hugging Face Hub; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_transformers(model, tmp)
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="X-Codec (transformers XcodecModel format)"))
