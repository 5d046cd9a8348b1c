"""Training config: every recipe file parses; bad keys and types fail naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

import main_launch_vqdp as trainer
from data import list_audio_files
from training.config import load_train_config, parse_override
from utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize(
    "name", ["xcodec_hubert_librispeech", "xcodec_wavlm_mls", "xcodec_hubert_general_audio", "tiny"]
)
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
    loaded = load_train_config(
        CONFIGS / "tiny.yaml",
        exp,
        ["batch_size=5", "log_dir=123", "d_list=[mfd, mpd]", "init_from=null", "loss_weights.mel=45"],
    )
    cfg = loaded.cfg
    assert cfg.batch_size == 5  # the command line wins over the experiment file
    assert cfg.optimizer.d.lr == 1e-3 and cfg.optimizer.g.lr == 2e-4
    assert cfg.log_dir == "123"  # a string key keeps the text as written
    assert cfg.d_list == ["mfd", "mpd"] and cfg.init_from is None and cfg.loss_weights.mel == 45.0
    assert loaded.raw["generator"]["config"]["D"] == 16  # the raw merged dict is what checkpoints store
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


def test_yaml_paths_resolve_from_the_file_and_command_line_paths_from_the_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "exp" / "lists").mkdir(parents=True)
    (elsewhere / "exp" / "lists" / "valid.txt").write_text("a.wav\n")
    (elsewhere / "exp" / "start").mkdir()  # init_from given as a directory beside the experiment file
    _write(
        elsewhere / "exp",
        "validation_file: lists/valid.txt\ninit_from: start\npretrained_teacher: facebook/hubert-base-ls960\n",
    )
    (elsewhere / "linked.yaml").symlink_to(CONFIGS / "tiny.yaml")
    monkeypatch.chdir(elsewhere)  # not the repository root: tiny.yaml's lists must still be found

    cfg = load_train_config(CONFIGS / "tiny.yaml").cfg
    assert Path(cfg.training_file).resolve() == ROOT / "tests" / "assets" / "tiny_train.txt"
    assert Path(cfg.validation_file).resolve() == ROOT / "tests" / "assets" / "tiny_valid.txt"
    assert cfg.log_dir == "runs/tiny"  # an output: taken from the working directory
    clips = list_audio_files(cfg.training_file) + list_audio_files(cfg.validation_file)
    assert len(clips) == 4 and all(Path(p).is_file() for p in clips)  # the lists' clips too, from here
    linked = load_train_config("linked.yaml").cfg  # a linked config's paths sit beside its target
    assert Path(linked.training_file).resolve() == ROOT / "tests" / "assets" / "tiny_train.txt"

    cfg = load_train_config(CONFIGS / "tiny.yaml", "exp/exp.yaml", ["training_file=mine.txt"]).cfg
    assert cfg.training_file == "mine.txt"  # the command line: from the working directory
    assert Path(cfg.validation_file).resolve() == elsewhere / "exp" / "lists" / "valid.txt"
    assert Path(cfg.init_from).resolve() == elsewhere / "exp" / "start"
    assert cfg.pretrained_teacher == "facebook/hubert-base-ls960"  # a hub id, not a path beside the file


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
