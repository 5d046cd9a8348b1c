"""Shared fixtures: real audio from tests/assets and tiny codecs with weights made here."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
BASE_CONFIG = ROOT / "configs" / "xcodec_hubert_librispeech.yaml"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def read_asset(name: str) -> np.ndarray:
    wav, rate = sf.read(ASSETS / name, dtype="float32")
    assert rate == 16000
    return wav


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """4.9 s of real English speech at 16 kHz, (T,) float32."""
    return read_asset("speech_en.flac")


def make_tiny_codec(weight_norm: bool = True, seed: int = 0):
    """A tiny codec (configs/tiny.yaml) with random weights and data-scaled codebooks, eval mode."""
    from models import build_codec, init_codebooks, load_generator_config

    torch.manual_seed(seed)
    gen, scale = load_generator_config(TINY_CONFIG)
    model = build_codec(gen, scale, weight_norm=weight_norm).eval()
    with torch.no_grad():
        # Non-trivial weight-norm gains and Snake alphas so that conversions are really tested.
        for name, p in model.named_parameters():
            if name.endswith("original0"):
                p.mul_(torch.rand_like(p) + 0.5)
            elif name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
        # Gaussian codebooks matched to each stage's residual on real audio (Mandarin speech,
        # not the English clip tests encode): seconds to build, and most codes get used.
    init_codebooks(model, [torch.from_numpy(read_asset("speech_cn_4s.flac")) * scale], "gaussian")
    return model.eval()


def to_release_state(state: dict[str, torch.Tensor]) -> dict:
    """A state dict in the released .pth style: old weight_g/weight_v keys for the codec
    convs, new-style parametrization keys for the teacher, plus an io.BytesIO entry."""
    out: dict = {}
    for key, value in state.items():
        if not key.startswith("semantic_model.") and ".parametrizations.weight.original" in key:
            key = key.replace(".parametrizations.weight.original0", ".weight_g").replace(
                ".parametrizations.weight.original1", ".weight_v"
            )
        out[key] = value.clone()
    out["extra_buffer"] = io.BytesIO(b"not a tensor")
    return out


@pytest.fixture(scope="session")
def tiny_codec():
    """The tiny codec with weight norm (training layout), eval mode. Do not mutate."""
    return make_tiny_codec()


@pytest.fixture(scope="session")
def inference_codec(tiny_codec):
    """The tiny codec as inference loads it: plain convs with weight norm folded. Do not mutate."""
    from models import build_codec
    from models.pretrained import load_codec_state

    model = build_codec(tiny_codec.config, tiny_codec.audio_norm_scale, weight_norm=False)
    load_codec_state(model, tiny_codec.state_dict())
    return model.eval()


@pytest.fixture(scope="session")
def hf_model(tiny_codec):
    """transformers' XcodecModel with the tiny codec's weights."""
    from models.export import to_transformers

    return to_transformers(tiny_codec)


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory, tiny_codec) -> Path:
    """A directory holding ``model.pth`` (released layout) and ``config.yaml`` (tiny)."""
    d = tmp_path_factory.mktemp("release")
    torch.save(to_release_state(tiny_codec.state_dict()), d / "model.pth")
    shutil.copy(TINY_CONFIG, d / "tiny.yaml")
    shutil.copy(BASE_CONFIG, d / BASE_CONFIG.name)  # tiny.yaml's base
    (d / "config.yaml").write_text((d / "tiny.yaml").read_text())
    return d


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay ``files`` ({path in the repo: bytes}) out in a Hugging Face hub cache (``HF_HUB_CACHE``)
    as huggingface_hub lays out a downloaded snapshot; returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def release_hub_cache(tmp_path_factory, release_dir) -> Path:
    """A Hugging Face hub cache holding the tiny codec as release ``xcodec_hubert_librispeech``
    of ZhenYe234/xcodec (.pth + YAML)."""
    import yaml

    from utils.config import merge

    cache = tmp_path_factory.mktemp("hub")
    config = (release_dir / "config.yaml").read_text().replace("base: xcodec_hubert_librispeech.yaml\n", "")
    # The released YAML is self-contained: inline the base.
    merged = merge(yaml.safe_load(BASE_CONFIG.read_text()), yaml.safe_load(config))
    add_to_hub_cache(cache, "ZhenYe234/xcodec", {
        "xcodec_speech_hubert_librispeech.pth": (release_dir / "model.pth").read_bytes(),
        "config_hubert.yaml": yaml.safe_dump(merged).encode(),
    })  # fmt: skip
    return cache


# ---------------------------------------------------------------------------- X-Codec 2
@pytest.fixture(scope="session")
def hf_xcodec2():
    """transformers' ``Xcodec2Model`` (tiny: the benchmark's ``TINY``) with random weights scaled so that codes
    spread over the codebook."""
    from benchmarks.bench_xcodec2 import random_hf_xcodec2

    return random_hf_xcodec2(tiny=True)


@pytest.fixture(scope="session")
def xcodec2_dir(tmp_path_factory, hf_xcodec2) -> Path:
    """The tiny X-Codec 2 in transformers' format (config.json + model.safetensors), as hf-audio/xcodec2 ships."""
    d = tmp_path_factory.mktemp("xcodec2")
    hf_xcodec2.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def xcodec2(xcodec2_dir):
    """Our :class:`models.XCodec2` loaded from :func:`xcodec2_dir`."""
    from models import XCodec2

    return XCodec2.from_pretrained(xcodec2_dir)


# ---------------------------------------------------------------------------- training
TEST_HOOK_VARS = ("XCODEC_TEST_NAN_STEPS", "XCODEC_TEST_KILL", "XCODEC_TEST_SAVE_PAUSE", "XCODEC_TEST_HASH_DIR")


@pytest.fixture
def train_env(monkeypatch):
    """In-process training runs: repository root as cwd (where runs/ and the tests' own lists
    resolve; tiny.yaml's lists resolve from the YAML), no fault-injection variables, one thread (the tiny model gains nothing from more,
    and timings stay sane on a busy machine)."""
    monkeypatch.chdir(ROOT)
    for var in TEST_HOOK_VARS:
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny(log_dir: Path, *overrides: str):
    """Train with configs/tiny.yaml in this process; returns the final training State."""
    import main_launch_vqdp as trainer

    return trainer.main(["--config", str(TINY_CONFIG), f"log_dir={log_dir}", *overrides])
