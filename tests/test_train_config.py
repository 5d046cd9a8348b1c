"""Training config: every recipe file parses; bad keys and types fail naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

import main_launch_vqdp as trainer
from training.config import load_train_config, parse_override
from utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("name", ["xcodec_hubert_librispeech", "xcodec_wavlm_mls", "xcodec_hubert_general_audio", "tiny"])
def test_recipe_configs_parse(name):
    loaded = load_train_config(CONFIGS / f"{name}.yaml")
    cfg = loaded.cfg
    # The paper's recipe survives in every variant unless overridden.
    assert cfg.optimizer.g.lr == 2e-4 and cfg.optimizer.g.betas == [0.8, 0.99] and cfg.optimizer.g.eps == 1e-6
    assert cfg.lr_scheduler.g.gamma == 0.999 and cfg.grad_clip == 2.0
    assert cfg.loss_weights.semantic == 100 and cfg.loss_weights.feature_matching == 20 and cfg.loss_weights.commit == 1
    assert cfg.d_list == ["mfd"]
    assert cfg.sub_multi_scale_stft_loss.num_bands == 6
    assert loaded.sources[0].endswith("xcodec_hubert_librispeech.yaml")
    if name == "tiny":
        assert cfg.teacher_source() is False  # tiny teacher built from semantic_model_config
        assert cfg.codec.D == 16
    else:
        assert cfg.teacher_source() is True  # real runs load the pretrained teacher
    if name == "xcodec_wavlm_mls":
        assert cfg.codec.semantic_techer == "wavlm_base_plus"


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    exp = _write(tmp_path, f"base: {CONFIGS / 'tiny.yaml'}\nbatch_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(exp)
    assert "batch_sise" in str(err.value) and str(exp) in str(err.value)

    nested = _write(tmp_path, "mfd:\n  hop_length: [1]\n", "nested.yaml")
    with pytest.raises(ConfigError) as err:
        load_train_config(CONFIGS / "tiny.yaml", exp_config=nested)
    assert "mfd" in str(err.value) and "hop_length" in str(err.value) and str(nested) in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path):
    exp = _write(tmp_path, "optimizer:\n  g:\n    lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(CONFIGS / "tiny.yaml", exp_config=exp)
    assert "optimizer.g.lr" in str(err.value) and str(exp) in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_train_config(CONFIGS / "tiny.yaml", overrides=["max_steps=four"])
    assert "max_steps" in str(err.value) and "command line" in str(err.value)
    with pytest.raises(ConfigError, match="d_list"):
        load_train_config(CONFIGS / "tiny.yaml", overrides=["d_list=[mfd,nope]"])
    with pytest.raises(ConfigError, match="precision"):
        load_train_config(CONFIGS / "tiny.yaml", overrides=["precision=fp8"])


def test_overrides_and_experiment_file_merge(tmp_path):
    exp = _write(tmp_path, "batch_size: 3\noptimizer:\n  d:\n    lr: 1.0e-3\n")
    loaded = load_train_config(CONFIGS / "tiny.yaml", exp, ["batch_size=5", "log_dir=123", "d_list=[mfd, mpd]", "init_from=null", "loss_weights.mel=45"])
    cfg = loaded.cfg
    assert cfg.batch_size == 5  # the command line wins over the experiment file
    assert cfg.optimizer.d.lr == 1e-3 and cfg.optimizer.g.lr == 2e-4
    assert cfg.log_dir == "123"  # a string key keeps the text as written
    assert cfg.d_list == ["mfd", "mpd"] and cfg.init_from is None and cfg.loss_weights.mel == 45.0
    assert loaded.raw["generator"]["config"]["D"] == 16  # the raw merged dict is what checkpoints store
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


def test_cli_reports_config_errors(tmp_path, capsys):
    rc = trainer.cli(["--config", str(CONFIGS / "tiny.yaml"), f"log_dir={tmp_path / 'run'}", "segment_sise=1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "segment_sise" in err and "command line" in err
    assert not (tmp_path / "run").exists()  # nothing is created for a config that does not parse


@pytest.mark.parametrize(
    "override,needles",
    [
        ("optimizer.g.lr=-1e-4", ["optimizer.g.lr", "> 0"]),
        ("optimizer.d.betas=[0.8, 1.5]", ["optimizer.d.betas", "< 1"]),
        ("segment_size=100", ["segment_size", "shorter than one code frame"]),
        ("lr_scheduler.g.gamma=0", ["lr_scheduler.g.gamma", "> 0"]),
        ("grad_clip=.inf", ["grad_clip", "finite"]),
        ("generator.config.ratios=[8, 0]", ["ratios", ">= 1"]),
        ("mel_scale_loss.fmax=0", ["fmax", "> 0"]),
        ("audio_norm_scale=.nan", ["audio_norm_scale", "finite"]),
    ],
)
def test_out_of_range_values_fail_naming_key_and_source(tmp_path, capsys, override, needles):
    rc = trainer.cli(["--config", str(CONFIGS / "tiny.yaml"), f"log_dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "run").exists()
