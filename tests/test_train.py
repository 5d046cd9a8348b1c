"""Single-process training with configs/tiny.yaml: losses, checkpoints, tensorboard, exports,
bad clips, NaN steps and fine-tuning (CPU, in-process)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_launch_vqdp as trainer
from conftest import ROOT, to_release_state
from conftest import TINY_CONFIG as TINY
from conftest import train_tiny as run
from data import DataError
from models import XCodec
from models.pretrained import load_codec_state, read_state, read_torch_file
from training.checkpoint import nonfinite_entries, remove_stale_checkpoint_temporaries
from training.config import load_train_config
from utils.audio import load_audio

pytestmark = pytest.mark.usefixtures("train_env")



def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir / "logs"), size_guidance={"scalars": 0, "images": 0, "audio": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tiny_run_trains_logs_checkpoints_and_exports(tmp_path):
    log_dir = tmp_path / "run"
    state = run(log_dir, "max_steps=4")
    assert state.step == 4

    # The teacher: frozen, in eval mode, in no optimizer.
    teacher = state.codec.semantic_model
    assert not teacher.training and state.codec.training
    assert not any(p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for g in state.opt_g.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert optimised == {id(p) for p in state.codec.parameters() if p.requires_grad}

    # Checkpoints every 2 steps, the last 2 kept, each with an export beside it.
    ckpt_dir = log_dir / "model_ckpts"
    assert sorted(p.name for p in ckpt_dir.glob("ckpt_*.pth")) == ["ckpt_00000002.pth", "ckpt_00000004.pth"]
    assert sorted(p.name for p in ckpt_dir.glob("export_*")) == ["export_00000002", "export_00000004"]
    ckpt = read_torch_file(ckpt_dir / "ckpt_00000004.pth")  # weights_only loading
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 2
    assert set(ckpt["discriminators"]) == {"mfd"} and ckpt["optimizer_g"]["state"]
    assert not nonfinite_entries(ckpt["codec"])
    assert (log_dir / "config.yaml").is_file()

    # Tensorboard: every loss term, lr, grad norms, codebook stats, validation, media.
    acc = events(log_dir)
    tags = set(acc.Tags()["scalars"])
    for name in ("full_stft", "sub_stft", "adversarial", "feature_matching", "semantic", "commit", "generator", "discriminator", "discriminator_mfd"):
        values = scalars(acc, f"loss/{name}")
        assert sorted(values) == [1, 2, 3, 4], name
        assert all(math.isfinite(v) for v in values.values()), name
    assert "loss/mel" not in tags  # weight 0 in the released recipe: not computed
    lr = scalars(acc, "lr/g")
    assert lr[1] == pytest.approx(2e-4) and lr[4] == pytest.approx(2e-4 * 0.999)  # one epoch = 2 steps
    assert all(v > 0 for v in scalars(acc, "grad_norm/g").values())
    assert all(v > 0 for v in scalars(acc, "grad_norm/d").values())
    assert 0 < scalars(acc, "codebook/usage_q0")[4] <= 1
    assert scalars(acc, "codebook/perplexity_q0")[4] >= 1
    assert sorted(scalars(acc, "valid/mel_distance")) == [2, 4]
    assert all(v > 0 for v in scalars(acc, "valid/stft_distance").values())
    assert scalars(acc, "data/bad_files")[4] == 0
    assert scalars(acc, "train/nonfinite_skipped")[4] == 0
    images = set(acc.Tags()["images"])
    assert {"valid/clip0/spectrogram_original", "valid/clip0/spectrogram_reconstruction"} <= images
    assert len(acc.Images("valid/clip0/spectrogram_reconstruction")) == 2
    assert {"valid/clip0/original", "valid/clip0/reconstruction"} <= set(acc.Tags()["audio"])

    # The checkpoint and the slim export load for inference and agree.
    wav, _ = load_audio(ROOT / "tests" / "assets" / "speech_en.flac", 16000)
    x = torch.from_numpy(wav[:16000])[None, None]
    from_ckpt = XCodec.from_pretrained(ckpt_dir / "ckpt_00000004.pth")
    from_export = XCodec.from_pretrained(ckpt_dir / "export_00000004")
    codes = from_ckpt.encode(x, bandwidth=4)
    assert codes.shape == (1, 8, 50)
    assert torch.equal(codes, from_export.encode(x, bandwidth=4))
    audio = from_export.decode(codes)
    assert audio.shape == (1, 1, 16000) and torch.isfinite(audio).all()
    torch.testing.assert_close(audio, from_ckpt.decode(codes), rtol=1e-4, atol=1e-5)


def test_bad_clips_are_skipped_counted_and_logged_once(tmp_path):
    from tests.test_data import make_bad_files

    bad = make_bad_files(tmp_path / "bad")
    good = [ROOT / "tests" / "assets" / n for n in ("speech_en.flac", "speech_cn_4s.flac", "music_4s.flac")]
    files = good + list(bad.values())
    lst = tmp_path / "train.txt"
    lst.write_text("\n".join(str(p) for p in files) + "\n")
    log_dir = tmp_path / "run"
    # An all-bad batch is skipped, a mixed one trains on its good clips; two epochs.
    state = run(log_dir, f"training_file={lst}", "max_bad_fraction=1.0", "num_epoches=2", "validation_file=null", "checkpoint_interval=100")
    assert set(state.bad_files) == {str(p) for p in bad.values()}
    assert state.step >= 2 and state.epoch == 2
    acc = events(log_dir)
    assert max(scalars(acc, "data/bad_files").values()) == len(bad)
    log = (log_dir / "logs" / "log.txt").read_text()
    for path in bad.values():
        assert log.count(f"skipping unusable clip: {path}") == 1, path  # once, although seen twice

    # A batch that is mostly unreadable stops the run, naming the files.
    lst.write_text("\n".join(str(p) for p in [good[0], bad["nan"], bad["empty"], bad["not_audio"]]) + "\n")
    with pytest.raises(DataError) as err:
        run(tmp_path / "run2", f"training_file={lst}", "batch_size=4", "validation_file=null")
    assert "3 of 4 clips" in str(err.value)
    for key in ("nan", "empty", "not_audio"):
        assert str(bad[key]) in str(err.value)


def test_validation_without_a_usable_clip_reports_no_distances(tmp_path):
    from tests.test_data import make_bad_files

    bad = make_bad_files(tmp_path / "bad")
    lst = tmp_path / "valid.txt"
    lst.write_text("\n".join(str(bad[k]) for k in ("nan", "empty", "not_audio")) + "\n")
    log_dir = tmp_path / "run"
    run(log_dir, "max_steps=2", f"validation_file={lst}", "validation_interval=1", "checkpoint_interval=100")
    acc = events(log_dir)
    tags = set(acc.Tags()["scalars"])
    assert not {"valid/mel_distance", "valid/stft_distance", "valid/semantic_loss"} & tags  # not 0, as if perfect
    assert scalars(acc, "valid/clips") == {1: 0.0, 2: 0.0}
    log = (log_dir / "logs" / "log.txt").read_text()
    assert log.count("no usable clips") == 2 and "mel_distance" not in log


def test_nonfinite_loss_skips_update_then_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("XCODEC_TEST_NAN_STEPS", "3")
    log_dir = tmp_path / "run"
    state = run(log_dir, "max_steps=4", "checkpoint_interval=1", "num_ckpt_keep=10", "validation_file=null")
    assert state.nonfinite_total == 1 and state.nonfinite_consecutive == 0
    ckpts = {s: read_torch_file(log_dir / "model_ckpts" / f"ckpt_{s:08d}.pth") for s in (2, 3, 4)}
    for ckpt in ckpts.values():
        assert not nonfinite_entries({k: ckpt[k] for k in ("codec", "discriminators", "optimizer_g", "optimizer_d")})
    # The generator update of step 3 was skipped: codec weights and EMA codebooks unchanged.
    for key, value in ckpts[2]["codec"].items():
        assert torch.equal(value, ckpts[3]["codec"][key]), key
    assert not torch.equal(ckpts[3]["codec"]["fc_prior.weight"], ckpts[4]["codec"]["fc_prior.weight"])
    acc = events(log_dir)
    assert scalars(acc, "train/nonfinite_skipped")[2] == 0 and scalars(acc, "train/nonfinite_skipped")[4] == 1

    # A NaN at the very first step rolls the codebooks back to before their k-means
    # initialisation: the next step initialises them again.
    monkeypatch.setenv("XCODEC_TEST_NAN_STEPS", "1")
    first = run(tmp_path / "run1", "max_steps=2", "validation_file=null")
    used = [bool(layer.codebook.abs().sum() > 0) for layer in first.codec.quantizer.vq.layers]
    inited = [float(b) == 1.0 for k, b in first.codec.quantizer.state_dict().items() if k.endswith("inited")]
    assert first.nonfinite_total == 1 and inited[0] and used[0]  # stage 0 trains at every step
    assert all(i or not u for i, u in zip(inited, used))  # no stage trained without its k-means

    monkeypatch.setenv("XCODEC_TEST_NAN_STEPS", "2,3")
    with pytest.raises(trainer.TrainingError, match="2 consecutive steps with NaN/Inf"):
        run(tmp_path / "run2", "max_steps=6", "max_nonfinite_steps=2", "validation_file=null")


def test_init_from_released_style_weights(tmp_path):
    src = tmp_path / "src"
    run(src, "max_steps=2", "validation_file=null")
    ckpt = src / "model_ckpts" / "ckpt_00000002.pth"
    saved = read_torch_file(ckpt)["codec"]

    loaded = load_train_config(TINY, overrides=[f"init_from={ckpt}"])
    state = trainer.build_state(loaded.cfg, loaded.raw, torch.device("cpu"))
    load_codec_state(state.codec, read_state(str(ckpt)), "init_from")  # what main() does with init_from
    for key, value in state.codec.state_dict().items():
        assert torch.equal(value, saved[key]), key

    # From the slim export (folded weight norm): same codec function.
    fresh = trainer.build_state(loaded.cfg, loaded.raw, torch.device("cpu"))
    load_codec_state(fresh.codec, read_state(str(src / "model_ckpts" / "export_00000002")), "init_from")
    x = torch.randn(1, 1, 6400) * 0.1
    torch.testing.assert_close(fresh.codec.eval().encode(x), state.codec.eval().encode(x))

    # A release-style .pth alone (old weight_g/weight_v keys, an io.BytesIO entry, no YAML
    # beside it): the weights are all fine-tuning needs.
    release = tmp_path / "release_only" / "xcodec.pth"
    release.parent.mkdir()
    torch.save(to_release_state(saved), release)
    third = trainer.build_state(loaded.cfg, loaded.raw, torch.device("cpu"))
    load_codec_state(third.codec, read_state(str(release)), "init_from")
    for key, value in third.codec.state_dict().items():
        assert torch.equal(value, saved[key]), key

    # A fine-tuning run starts from those weights with fresh discriminators and optimizers.
    tuned = run(tmp_path / "tuned", f"init_from={ckpt}", "max_steps=1", "validation_file=null")
    assert tuned.step == 1
    log = (tmp_path / "tuned" / "logs" / "log.txt").read_text()
    assert f"codec initialised from {ckpt}" in log and "resumed" not in log


def test_every_discriminator_and_the_mel_loss(tmp_path):
    # One period / one scale: the HiFi-GAN discriminators have fixed, wide layers.
    state = run(tmp_path / "run", "max_steps=1", "d_list=[mfd,mpd,msd,msstftd]", "mpd.period_sizes=[2]", "msd.num_scales=1",
                "msstftd.filters=8", "loss_weights.mel=45", "validation_file=null")
    assert list(state.discriminators) == ["mfd", "mpd", "msd", "msstftd"]
    acc = events(tmp_path / "run")
    tags = set(acc.Tags()["scalars"])
    assert {"loss/mel", "loss/discriminator_mpd", "loss/discriminator_msd", "loss/discriminator_msstftd"} <= tags
    ckpt = read_torch_file(tmp_path / "run" / "model_ckpts" / "ckpt_00000001.pth")
    assert set(ckpt["discriminators"]) == {"mfd", "mpd", "msd", "msstftd"}


def test_bf16_autocast_keeps_the_quantizer_in_fp32():
    loaded = load_train_config(TINY, overrides=["precision=bf16"])
    state = trainer.build_state(loaded.cfg, loaded.raw, torch.device("cpu"))
    seen = []
    state.codec.quantizer.vq.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    # The teacher, both encoders and the decoder compute in bf16 (the caller's autocast).
    computed = {}
    for name in ("semantic_model", "encoder", "encoder_semantic", "decoder_2"):
        module = getattr(state.codec, name)
        module.register_forward_hook(lambda m, a, out, name=name: computed.update({name: _first_tensor(out).dtype}) and None)
    with state.autocast():
        out = state.codec(torch.randn(2, 1, 6400) * 0.1, 4.0)
    assert seen == [torch.float32]
    assert computed == dict.fromkeys(("semantic_model", "encoder", "encoder_semantic", "decoder_2"), torch.bfloat16)
    assert torch.is_autocast_enabled("cpu") is False  # no autocast state left behind
    assert torch.isfinite(out.audio.float()).all()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return next(v for v in (out.values() if hasattr(out, "values") else out) if isinstance(v, torch.Tensor))


def test_stale_temporaries_of_this_and_earlier_versions_are_removed(tmp_path):
    """A save killed mid-write leaves a temporary; earlier versions named them ckpt_X.pth.tmp-PID."""
    (tmp_path / "ckpt_00000004.pth.tmp-123").write_bytes(b"partial")
    (tmp_path / "export_00000004.tmp-123").mkdir()
    (tmp_path / "export_00000004.tmp-123" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".ckpt_00000005.pth.k2j4h1.tmp").write_bytes(b"partial")
    keep = ["ckpt_00000003.pth", "export_00000003", "notes.tmp-1.txt"]
    (tmp_path / keep[0]).write_bytes(b"complete")
    (tmp_path / keep[1]).mkdir()
    (tmp_path / keep[2]).write_text("not a temporary")
    removed = sorted(p.name for p in remove_stale_checkpoint_temporaries(tmp_path))
    assert removed == [".ckpt_00000005.pth.k2j4h1.tmp", "ckpt_00000004.pth.tmp-123", "export_00000004.tmp-123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


@pytest.mark.slow
def test_offline_teacher_download_fails_fast_in_one_line(tmp_path):
    """The default recipe downloads its teacher; with the hub unreachable (an endpoint that
    refuses connections) it stops within seconds, one line, before log_dir exists."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_CACHE": str(tmp_path / "empty_cache"), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(ROOT / "main_launch_vqdp.py"), "--config", str(ROOT / "configs" / "xcodec_hubert_librispeech.yaml"),
                           f"log_dir={tmp_path / 'run'}", "training_file=tests/assets/train.txt"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(err) == 1, proc.stderr[-3000:]
    assert "facebook/hubert-base-ls960" in err[0] and "cannot reach http://127.0.0.1:9" in err[0]
    assert "Retrying" not in proc.stderr + proc.stdout  # no five-retry backoff (a hang fails on the timeout)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "truncated", "world_size"])
def test_start_up_errors_are_one_line_and_create_nothing(tmp_path, case, capsys, monkeypatch):
    (tmp_path / "bad.pth").write_bytes(b"PK\x03\x04 truncated")
    overrides = {"missing": [f"init_from={tmp_path / 'absent.pth'}"], "truncated": [f"init_from={tmp_path / 'bad.pth'}"], "world_size": []}[case]
    if case == "world_size":
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        monkeypatch.delenv("MASTER_PORT", raising=False)
    code = trainer.cli(["--config", str(TINY), f"log_dir={tmp_path / 'run'}", "max_steps=1", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error:"), err
    assert {"missing": "not found", "truncated": "not a readable PyTorch checkpoint", "world_size": "torchrun"}[case] in err[0]
    assert not (tmp_path / "run").exists()


def test_an_unwritable_log_dir_is_one_line(tmp_path, capsys):
    """An OSError (here log_dir under a file) ends like every refusal: one line, exit 1, the file untouched."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file\n")
    code = trainer.cli(["--config", str(TINY), f"log_dir={blocker / 'run'}", "max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {blocker / 'run' / 'model_ckpts'}: Not a directory"], err
    assert blocker.read_text() == "a file\n"
