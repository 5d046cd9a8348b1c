"""Loading checkpoints in every format, safely, with clear errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ASSETS, BASE_CONFIG, ROOT
from models import XCodec
from models.export import save_export, save_transformers
from models.pretrained import CheckpointError


def _encode(model: XCodec, speech, n: int = 16000) -> torch.Tensor:
    return model.encode(torch.from_numpy(speech[:n])[None, None] * 0.95)


def _random_release_state(layout: dict, old_style_pos_conv: bool) -> dict:
    """Random tensors with every key and shape of a released .pth (from the shared layout)."""
    g = torch.Generator().manual_seed(0)
    state: dict = {}
    for key, spec in layout.items():
        shape = spec["shape"]
        if key.endswith("inited"):
            t = torch.ones(shape)
        elif key.endswith(("weight_g", "original0")):
            t = torch.rand(shape, generator=g) + 0.5
        else:
            t = torch.randn(shape, generator=g) * 0.02
        if old_style_pos_conv and "pos_conv_embed" in key:
            key = key.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            )
        state[key] = t
    state["optimizer_blob"] = io.BytesIO(b"\x00" * 16)
    return state


@pytest.mark.parametrize(
    "teacher,layout_file",
    [("hubert_base", "released_pth_layout_hubert_base.json"), ("wavlm_base_plus", "released_pth_layout_wavlm_base_plus.json")],
)
def test_released_layout_pth_loads_and_runs(tmp_path, speech, teacher, layout_file):
    layout = json.loads((ASSETS / layout_file).read_text())
    ckpt = tmp_path / "xcodec.pth"
    torch.save(_random_release_state(layout, old_style_pos_conv=teacher == "wavlm_base_plus"), ckpt)
    config = tmp_path / "config.yaml"
    config.write_text(BASE_CONFIG.read_text().replace("semantic_techer: hubert_base", f"semantic_techer: {teacher}"))
    model = XCodec.from_pretrained(ckpt)  # config.yaml beside the .pth, as the original
    assert not model.training
    codes = model.encode(torch.from_numpy(speech[:8000])[None, None], 1.0)
    assert codes.shape == (1, 2, 25)
    audio = model.decode(codes)
    assert audio.shape == (1, 1, 8000) and bool(torch.isfinite(audio).all())
    # Weight norm was folded into plain weights: g * v / |v| of the first encoder conv.
    state = torch.load(ckpt, weights_only=False)
    g, v = state["encoder.block.0.weight_g"], state["encoder.block.0.weight_v"]
    expected = g * v / v.norm(dim=(1, 2), keepdim=True)
    assert torch.allclose(model.encoder.block[0].weight, expected, atol=1e-6)


def test_release_pth_gives_the_same_codes_as_the_model(release_dir, tiny_codec, speech):
    model = XCodec.from_pretrained(release_dir / "model.pth")
    assert torch.equal(_encode(model, speech), _encode(tiny_codec, speech))


def test_weight_norm_key_styles_are_equivalent(tmp_path, release_dir, tiny_codec, speech):
    new_style = {k: v for k, v in tiny_codec.state_dict().items()}
    torch.save(new_style, tmp_path / "new.pth")
    a = XCodec.from_pretrained(tmp_path / "new.pth", config=release_dir / "config.yaml")
    b = XCodec.from_pretrained(release_dir / "model.pth")
    assert torch.equal(_encode(a, speech), _encode(b, speech))


def test_transformers_directory_and_our_export(tmp_path, tiny_codec, speech):
    ref = _encode(tiny_codec, speech)
    hf_dir = save_transformers(tiny_codec, tmp_path / "hf")
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert torch.equal(_encode(XCodec.from_pretrained(hf_dir), speech), ref)
    export = save_export(XCodec.from_pretrained(hf_dir), tmp_path / "export")
    assert torch.equal(_encode(XCodec.from_pretrained(export), speech), ref)


def test_mismatched_checkpoint_names_keys(tmp_path, release_dir):
    base = torch.load(release_dir / "model.pth", weights_only=False)
    state = {k: v for k, v in base.items() if not k.startswith("fc_post1")}
    state["junk.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        XCodec.from_pretrained(tmp_path / "bad.pth", config=release_dir / "config.yaml")
    msg = str(err.value)
    assert "2 missing key(s): fc_post1.bias, fc_post1.weight" in msg
    assert "1 unexpected key(s): junk.weight" in msg


@pytest.mark.parametrize("damage", ["nan", "inf_codebook", "integer"])
def test_weights_that_cannot_work_are_refused_naming_the_tensor(tmp_path, release_dir, damage, capsys):
    import inference

    state = torch.load(release_dir / "model.pth", weights_only=False)
    key = {"nan": "fc_prior.weight", "inf_codebook": "quantizer.vq.layers.2._codebook.embed", "integer": "fc_post2.weight"}[damage]
    if damage == "integer":
        state[key] = state[key].round().to(torch.int32)
    else:
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan") if damage == "nan" else float("inf")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        XCodec.from_pretrained(tmp_path / "bad.pth", config=release_dir / "config.yaml")
    wav = tmp_path / "in.flac"
    wav.write_bytes((ASSETS / "speech_en.flac").read_bytes())
    before = wav.read_bytes()
    code = inference.main(["--checkpoint", str(tmp_path / "bad.pth"), "--config", str(release_dir / "config.yaml"),
                           "--input", str(wav), "--output", str(tmp_path / "out.wav")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0] and "Traceback" not in err[0]
    assert wav.read_bytes() == before and not (tmp_path / "out.wav").exists()


def test_config_architecture_mismatch_is_reported(tmp_path, release_dir):
    with pytest.raises(CheckpointError, match="shape mismatch"):
        XCodec.from_pretrained(release_dir / "model.pth", config=BASE_CONFIG)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"encoder.block.0.bias": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        XCodec.from_pretrained(tmp_path / "evil.pth", config=BASE_CONFIG)
    assert not marker.exists()


def test_unknown_release_name():
    with pytest.raises(CheckpointError, match="unknown release name 'xcodec_nope'"):
        XCodec.from_pretrained("xcodec_nope")


def _hub_script(name: str) -> str:
    return textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import torch
        from models import XCodec
        m = XCodec.from_pretrained({name!r})
        x = torch.zeros(1, 1, 3200)
        print("OK", tuple(m.encode(x).shape))
        """
    )


@pytest.mark.slow
def test_release_name_resolves_through_offline_hf_cache(tmp_path, release_hub_cache):
    """The real huggingface_hub code path against a cache laid out as the hub lays it out."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(release_hub_cache), "HF_HOME": str(tmp_path / "home")}
    ok = subprocess.run([sys.executable, "-c", _hub_script("xcodec_hubert_librispeech")], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "OK (1, 8, 10)" in ok.stdout
    missing = subprocess.run([sys.executable, "-c", _hub_script("xcodec_wavlm_mls")], env=env, capture_output=True, text=True)
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert "could not get release 'xcodec_wavlm_mls'" in last and "--checkpoint" in last


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_codec):
    return save_transformers(tiny_codec, tmp_path_factory.mktemp("hf") / "xcodec-tiny")


def _edit(config: dict, path: str, value) -> dict:
    out = json.loads(json.dumps(config))
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (None, [1, 2], "model_type"),
        ("codebook_size", 0, "codebook_size: must be >= 2"),
        ("codebook_size", "1024", "codebook_size: expected int"),
        ("sample_rate", 0, "sample_rate"),
        ("target_bandwidths", [], "target_bandwidths"),
        ("target_bandwidths", ["4"], "target_bandwidths: expected numbers"),
        ("acoustic_model_config.hidden_size", -4, "acoustic_model_config.hidden_size: must be > 0"),
        ("acoustic_model_config.downsampling_ratios", [8, 0, 4, 2], "downsampling_ratios: every item"),
        ("acoustic_model_config.upsampling_ratios", [2, 4, 5, 8], "upsampling_ratios"),
        ("acoustic_model_config.hop_length", 160, "hop_length"),
        ("codebook_dim", 7, "codebook_dim"),
        ("semantic_model_config.num_attention_heads", 3, "num_attention_heads"),
        ("semantic_model_config.hidden_size", "big", "semantic_model_config"),
        ("audio_norm_scale", float("nan"), "audio_norm_scale"),
    ],
)
def test_transformers_config_json_is_validated(tmp_path, hf_dir, path, value, needle, capsys):
    import inference

    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(value if path is None else _edit(config, path, value)))
    with pytest.raises(CheckpointError, match=needle):
        XCodec.from_pretrained(d)
    code = inference.main(["--checkpoint", str(d), "--input", str(ASSETS / "speech_en.flac"), "--output", str(tmp_path / "o.wav")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "config.json" in err[0], err
    assert not (tmp_path / "o.wav").exists()


def test_non_regular_checkpoint_and_directory_config(tmp_path, release_dir):
    with pytest.raises(CheckpointError, match="not a regular file") as err:
        XCodec.from_pretrained("/dev/zero", config=release_dir / "config.yaml")
    assert "Python objects" not in str(err.value)
    (tmp_path / "config.yaml").mkdir()
    (tmp_path / "model.pth").write_bytes((release_dir / "model.pth").read_bytes())
    with pytest.raises(CheckpointError, match="config.yaml is not a file"):
        XCodec.from_pretrained(tmp_path / "model.pth")


@pytest.mark.slow
def test_hub_repo_ids_resolve_through_an_offline_cache_and_save_pretrained_opens_in_transformers(tmp_path, tiny_codec, speech):
    """``from_pretrained("owner/name")`` on the real huggingface_hub path (a cache laid out as
    the hub lays it out, HF_HUB_OFFLINE=1); ``save_pretrained`` is what XcodecModel opens."""
    from transformers import XcodecModel

    from conftest import add_to_hub_cache

    saved = XCodec.from_pretrained(save_transformers(tiny_codec, tmp_path / "hf")).save_pretrained(tmp_path / "saved")
    hf = XcodecModel.from_pretrained(str(saved)).eval()
    x = torch.from_numpy(speech[:16000])[None, None]
    ours = XCodec.from_pretrained(saved)
    with torch.no_grad():
        hf_codes = hf.encode(x).audio_codes
        hf_audio = hf.decode(hf_codes).audio_values
    assert torch.equal(ours.encode(x), hf_codes)
    assert float((ours.decode(hf_codes)[..., : hf_audio.shape[-1]] - hf_audio).abs().max()) < 1e-5
    cache = tmp_path / "cache"
    add_to_hub_cache(cache, "someone/xcodec-tiny", {n: (saved / n).read_bytes() for n in ("config.json", "model.safetensors")})
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import torch
        from models import XCodec
        m = XCodec.from_pretrained("someone/xcodec-tiny")
        x = torch.zeros(1, 1, 3200)
        print("OK", tuple(m.encode(x).shape))
        try:
            XCodec.from_pretrained("someone/not-cached")
        except Exception as exc:
            print("ERR", type(exc).__name__, exc)
    """)  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK (1, 8, 10)" in proc.stdout
    assert "ERR CheckpointError could not get 'someone/not-cached'" in proc.stdout and "HF_HUB_OFFLINE" in proc.stdout
