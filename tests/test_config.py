"""Model configs: override files, and clear errors for unknown keys, wrong types, missing sections."""

from __future__ import annotations

import pytest

import inference
from conftest import ROOT
from models import load_generator_config
from utils.config import ConfigError


def test_override_files_change_only_what_they_name():
    base, scale = load_generator_config(ROOT / "configs" / "xcodec_hubert_librispeech.yaml")
    wavlm, _ = load_generator_config(ROOT / "configs" / "xcodec_wavlm_mls.yaml")
    general, _ = load_generator_config(ROOT / "configs" / "xcodec_hubert_general_audio.yaml")
    tiny, _ = load_generator_config(ROOT / "configs" / "tiny.yaml")
    assert scale == 0.95
    assert (base.D, base.bins, base.ratios, base.semantic_techer) == (256, 1024, [8, 5, 4, 2], "hubert_base")
    assert wavlm.semantic_techer == "wavlm_base_plus" and wavlm.D == 256
    assert general.semantic_techer == "hubert_base_general"
    assert tiny.D == 16 and tiny.semantic_model_config["hidden_size"] == 32 and tiny.bins == 1024


@pytest.mark.parametrize(
    "snippet,needles",
    [
        ("    D: 16\n    depth: 3\n", ["depth", "unknown key"]),
        ("    D: sixteen\n", ["D", "expected int", "sixteen"]),
        ("    ratios: 320\n", ["ratios", "expected list"]),
        # values of the right type outside their range
        ("    D: 0\n", ["generator.config.D", "must be > 0"]),
        ("    D: 16\n    ratios: [8, 0, 4, 2]\n", ["ratios", ">= 1"]),
        ("    D: 16\n    ratios: [8, -5, 4, 2]\n", ["ratios", ">= 1"]),
        ("    D: 16\n    bins: 1\n", ["bins", ">= 2"]),
        ("    D: 16\n    target_bandwidths: []\n", ["target_bandwidths", "empty"]),
        ("    D: 16\n    target_bandwidths: [4, 0.5]\n", ["target_bandwidths", "increasing"]),
        ("    D: 16\n    target_bandwidths: [0.1]\n", ["target_bandwidths", "one codebook"]),
        ("    D: 16\n    sample_rate: 0\n", ["sample_rate", "> 0"]),
        ("    D: 16\n    semantic_techer: hubert_large\n", ["semantic_techer", "hubert_large", "hubert_base"]),
        ("    D: .nan\n", ["D", "expected int"]),
    ],
)
def test_bad_generator_config_fails_naming_key_and_file(tmp_path, release_dir, snippet, needles, capsys):
    text = (ROOT / "configs" / "tiny.yaml").read_text().replace("    D: 16\n", snippet)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text.replace("base: xcodec_hubert_librispeech.yaml", f"base: {ROOT / 'configs' / 'xcodec_hubert_librispeech.yaml'}"))
    with pytest.raises(ConfigError) as err:
        load_generator_config(cfg)
    for needle in [*needles, "bad.yaml"]:
        assert needle in str(err.value)
    code = inference.main(["--input", str(ROOT / "tests/assets/speech_en.flac"), "--output", str(tmp_path / "o.wav"),
                           "--checkpoint", str(release_dir / "model.pth"), "--config", str(cfg)])
    err_text = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err_text
    assert len([ln for ln in err_text.splitlines() if ln.startswith("error:")]) == 1 and "bad.yaml" in err_text


def test_missing_generator_section_and_malformed_yaml(tmp_path):
    (tmp_path / "nogen.yaml").write_text("audio_norm_scale: 0.95\n")
    with pytest.raises(ConfigError, match="no 'generator' section"):
        load_generator_config(tmp_path / "nogen.yaml")
    (tmp_path / "broken.yaml").write_text("generator: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_generator_config(tmp_path / "broken.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_generator_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_generator_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "text,needles",
    [
        ("audio_norm_scale: .nan\n", ["audio_norm_scale", "finite"]),
        ("audio_norm_scale: 0\n", ["audio_norm_scale", "> 0"]),
        (b"generator:\n  config:\n    D: 16 # \xff\xfe\n", ["not UTF-8"]),
    ],
)
def test_bad_top_level_values_and_bytes(tmp_path, release_dir, text, needles, capsys):
    cfg = tmp_path / "bad.yaml"
    base = (ROOT / "configs" / "tiny.yaml").read_bytes().replace(b"base: xcodec_hubert_librispeech.yaml",
                                                                  f"base: {ROOT / 'configs' / 'xcodec_hubert_librispeech.yaml'}".encode())
    cfg.write_bytes(base + (text if isinstance(text, bytes) else text.encode()))
    before = cfg.read_bytes()
    code = inference.main(["--input", str(ROOT / "tests/assets/speech_en.flac"), "--output", str(tmp_path / "o.wav"),
                           "--checkpoint", str(release_dir / "model.pth"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in [*needles, "bad.yaml"]:
        assert needle in err
    assert cfg.read_bytes() == before and not (tmp_path / "o.wav").exists()


def test_config_path_that_is_a_directory(tmp_path, release_dir, capsys):
    (tmp_path / "cfgdir").mkdir()
    code = inference.main(["--input", str(ROOT / "tests/assets/speech_en.flac"), "--output", str(tmp_path / "o.wav"),
                           "--checkpoint", str(release_dir / "model.pth"), "--config", str(tmp_path / "cfgdir")])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory" in err and len(err.strip().splitlines()) == 1
