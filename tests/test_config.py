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
