"""python -m models.convert: release .pth / training checkpoint / transformers dir / export, exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ASSETS, BASE_CONFIG, TINY_CONFIG, make_tiny_codec, read_asset, to_release_state
from models import XCodec
from models.convert import main as convert_main
from models.export import to_transformers
from models.hf_layout import hf_key_to_original, original_key_to_hf
from models.pretrained import fold_weight_norm
from utils.config import read_config

POS_CONV = "semantic_model.encoder.pos_conv_embed.conv.parametrizations.weight.original"


@pytest.fixture(scope="module")
def codec():
    return make_tiny_codec(seed=1)  # the training layout: weight norm on every conv


@pytest.fixture(scope="module")
def release_pth(tmp_path_factory, codec):
    d = tmp_path_factory.mktemp("release")
    torch.save(to_release_state(codec.state_dict()), d / "model.pth")  # weight_g/v keys, a BytesIO entry
    shutil.copy(BASE_CONFIG, d / BASE_CONFIG.name)
    (d / "config.yaml").write_text(TINY_CONFIG.read_text())
    return d / "model.pth"


def _convert(argv, capsys) -> str:
    code = convert_main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _same_model(a: XCodec, b: XCodec) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_release_to_transformers_to_export_and_back_is_exact(tmp_path, release_pth, capsys):
    hf1, export, hf2 = tmp_path / "hf1", tmp_path / "export", tmp_path / "hf2"
    assert "wrote transformers checkpoint" in _convert([release_pth, hf1], capsys)  # default: to transformers
    assert "wrote export checkpoint" in _convert([hf1, export], capsys)  # default for a transformers dir
    _convert([export, hf2, "--to", "transformers"], capsys)
    assert (hf1 / "config.json").is_file() and (export / "config.yaml").is_file()

    # The released tensors are carried over unchanged (acoustic weight norm folded, the
    # teacher's positional conv kept as g and v), and every direction round-trips exactly.
    raw = torch.load(release_pth, weights_only=False)
    t1, t2, te = (load_file(str(d / "model.safetensors")) for d in (hf1, hf2, export))
    assert t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    g, v = raw["encoder.block.0.weight_g"], raw["encoder.block.0.weight_v"]
    assert torch.equal(t1["acoustic_encoder.conv1.weight"], fold_weight_norm(g, v))
    assert torch.equal(te["encoder.block.0.weight"], fold_weight_norm(g, v))
    for i in (0, 1):
        assert torch.equal(t1[POS_CONV + str(i)], raw[POS_CONV + str(i)]) and torch.equal(te[POS_CONV + str(i)], raw[POS_CONV + str(i)])
    assert torch.equal(t1["quantizer.quantizers.3.codebook.embed"], raw["quantizer.vq.layers.3._codebook.embed"])

    reference = XCodec.from_pretrained(release_pth)
    for directory in (hf1, export, hf2):
        _same_model(XCodec.from_pretrained(directory), reference)


def test_trained_checkpoint_via_export_to_transformers_gives_the_same_codes_and_audio(tmp_path, codec, capsys):
    from transformers import XcodecModel

    ckpt = tmp_path / "ckpt_00000010.pth"  # what our training writes: codec state + config dict
    torch.save({"codec": codec.state_dict(), "config": read_config(TINY_CONFIG), "step": 10}, ckpt)
    _convert([ckpt, tmp_path / "export", "--to", "export"], capsys)  # a model trained here, exported
    _convert([tmp_path / "export", tmp_path / "hf"], capsys)  # and published for transformers
    ours = XCodec.from_pretrained(ckpt)
    _same_model(XCodec.from_pretrained(tmp_path / "export"), ours)
    _same_model(XCodec.from_pretrained(tmp_path / "hf"), ours)
    hf = XcodecModel.from_pretrained(str(tmp_path / "hf")).eval()

    x = torch.from_numpy(read_asset("speech_en.flac")[:40000])[None, None] * 0.95
    for bandwidth in (0.5, 4.0):
        codes = ours.encode(x, bandwidth)
        with torch.no_grad():
            hf_codes = hf.encode(x, bandwidth, return_dict=False)
            hf_audio = hf.decode(hf_codes, return_dict=False)
        assert torch.equal(codes, hf_codes)
        audio = ours.decode(codes)
        assert audio.shape == hf_audio.shape
        assert float((audio - hf_audio).norm() / hf_audio.norm()) < 1e-5
    assert codes[0, 0].unique().numel() > 20  # not degenerate


def test_conversion_errors_are_one_line(tmp_path, release_pth, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        ([release_pth, tmp_path / "full"], "not empty; pass --overwrite"),
        ([release_pth, tmp_path / "o", "--config", BASE_CONFIG], "does not match"),
        ([tmp_path / "missing.pth", tmp_path / "o"], "not found"),
    ]
    for argv, needle in cases:
        assert convert_main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert (tmp_path / "full" / "x").read_text() == "keep me" and not (tmp_path / "o").exists()
    # --overwrite never deletes the source it converts.
    (tmp_path / "full" / "model.pth").write_bytes(Path(release_pth).read_bytes())
    before = (tmp_path / "full" / "model.pth").read_bytes()
    argv = [tmp_path / "full" / "model.pth", tmp_path / "full", "--config", release_pth.parent / "config.yaml", "--overwrite"]
    assert convert_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is inside the destination" in err[0]
    assert (tmp_path / "full" / "model.pth").read_bytes() == before and (tmp_path / "full" / "x").read_text() == "keep me"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("layout", ["released_pth_layout_hubert_base.json", "released_pth_layout_wavlm_base_plus.json"])
def test_transformers_key_names_round_trip_on_the_released_layouts(layout):
    """Every key of both released layouts, in every weight-norm style, maps to transformers' name and back."""
    keys = list(json.loads((ASSETS / layout).read_text()))
    styles = [k.replace(".weight_g", s0).replace(".weight_v", s1) for k in keys
              for s0, s1 in ((".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1"))]  # fmt: skip
    mapped = {k: original_key_to_hf(k, 4) for k in styles}
    assert all(hf_key_to_original(v, 4) == k for k, v in mapped.items())
    assert len(set(mapped.values())) == len(set(styles))  # no two keys share a name
    assert hf_key_to_original("acoustic_encoder.block.0.res_unit1.unknown.weight", 4) == "acoustic_encoder.block.0.res_unit1.unknown.weight"


def test_transformers_state_names_are_exactly_ours(tiny_codec):
    """XcodecModel's own state dict renamed with the inverse map gives exactly our keys."""
    hf_keys = set(to_transformers(tiny_codec).state_dict())
    ours = {k.replace(".parametrizations.weight.original0", ".weight").replace(".parametrizations.weight.original1", ".weight") for k in tiny_codec.state_dict()}
    back = {hf_key_to_original(k, len(tiny_codec.config.ratios)) for k in hf_keys}
    back = {k.replace(".parametrizations.weight.original0", ".weight").replace(".parametrizations.weight.original1", ".weight") for k in back}
    assert back == ours
