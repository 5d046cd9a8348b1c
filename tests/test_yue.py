"""YuE's X-Codec (12 codebooks, raw input) and its Vocos vocoders, in YuE's exact file layout
with random weights made here; the Vocos ISTFT against a direct computation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from transformers import HubertConfig, XcodecModel

import inference
from conftest import ROOT, TINY_CONFIG, add_to_hub_cache, read_asset, to_release_state
from models import XCodec, build_codec, init_codebooks
from models.config import GeneratorConfig
from models.pretrained import CheckpointError
from models.vocoder import BackboneArgs, HeadArgs, Vocoder, merge_low_band
from modules.vocos import ISTFT

TEACHER = yaml.safe_load(TINY_CONFIG.read_text())["generator"]["config"]["semantic_model_config"]
YUE_CONFIG = {  # final_ckpt/config.yaml: the generator section and (unused here) training keys
    "generator": {"name": "SoundStream", "config": {"n_filters": 32, "D": 16, "target_bandwidths": [0.5, 1, 1.5, 2, 4, 6],
                                                    "ratios": [8, 5, 4, 2], "sample_rate": 16000, "bins": 1024,
                                                    "encoder_dim": 8, "decoder_dim": 64}},
    "audio_norm_scale": 0.95, "segment_size": 16000, "lr": 1e-4,
}  # fmt: skip


@pytest.fixture(scope="module")
def yue(tmp_path_factory):
    """``(repo dir, the model its weights came from, the vocoder)`` in m-a-p/xcodec_mini_infer's layout."""
    torch.manual_seed(7)
    cfg = GeneratorConfig(**YUE_CONFIG["generator"]["config"], semantic_model_config=TEACHER)
    model = build_codec(cfg, weight_norm=True).eval()
    init_codebooks(model, [torch.from_numpy(read_asset("music_4s.flac"))], "gaussian")  # most codes used
    root = tmp_path_factory.mktemp("yue") / "xcodec_mini_infer"
    (root / "final_ckpt").mkdir(parents=True)
    state = {k: v for k, v in to_release_state(model.state_dict()).items() if isinstance(v, torch.Tensor)}
    ckpt = {"codec_model": state, "optimizer_g": {"state": {}, "param_groups": []}, "optimizer_d": {"state": {}, "param_groups": []},
            "lr_scheduler_g": {"last_epoch": 3}, "lr_scheduler_d": {"last_epoch": 3}, "epoch": 3, "steps": 360000,
            "mfd": {"conv.weight": torch.zeros(2, 2)}}  # fmt: skip
    torch.save(ckpt, root / "final_ckpt" / "ckpt_00360000.pth")
    (root / "final_ckpt" / "config.yaml").write_text(yaml.safe_dump(YUE_CONFIG))
    teacher_dir = root / "semantic_ckpts" / "hf_1_325000"
    teacher_dir.mkdir(parents=True)
    (teacher_dir / "config.json").write_text(
        json.dumps({**HubertConfig(**TEACHER).to_dict(), "architectures": ["HubertModel"]})
    )
    (teacher_dir / "preprocessor_config.json").write_text(
        json.dumps({"feature_extractor_type": "Wav2Vec2FeatureExtractor"})
    )
    vocoder = Vocoder(
        BackboneArgs(input_channels=16 + TEACHER["hidden_size"], dim=32, intermediate_dim=48, num_layers=2),
        HeadArgs(dim=32),
    ).eval()
    (root / "decoders").mkdir()
    for name in ("decoder_131000.pth", "decoder_151000.pth"):
        torch.save(vocoder.state_dict(), root / "decoders" / name)
    (root / "decoders" / "config.yaml").write_text(yaml.safe_dump({
        "backbone": {"class_path": "vocos.models.VocosBackbone", "init_args": {"input_channels": 48, "dim": 32, "intermediate_dim": 48, "num_layers": 2}},
        "head": {"class_path": "vocos.heads.ISTFTHead", "init_args": {"dim": 32, "n_fft": 3528, "hop_length": 882, "padding": "same"}},
    }))  # fmt: skip
    return root, model, vocoder


@pytest.fixture(scope="module")
def music() -> torch.Tensor:
    return torch.from_numpy(read_asset("music_4s.flac")[:24000].copy())[None, None]


def test_yue_layout_loads_as_directory_and_as_pth_and_encodes_at_every_bandwidth(yue, music):
    root, source, _ = yue
    a = XCodec.from_pretrained(root)
    b = XCodec.from_pretrained(root / "final_ckpt" / "ckpt_00360000.pth")
    assert a.n_q == 12 and a.target_bandwidths == [0.5, 1, 1.5, 2, 4, 6]
    assert a.audio_norm_scale == 1.0  # YuE encodes raw audio
    assert a.semantic_model.config.hidden_size == TEACHER["hidden_size"]  # from semantic_ckpts/*/config.json
    frames = int(a.num_frames(music.shape[-1]))
    for bw, n_q in ((0.5, 1), (4, 8), (6, 12)):
        codes = a.encode(music, bw)
        assert codes.shape == (1, n_q, frames) and torch.equal(codes, b.encode(music, bw))
        assert torch.equal(codes, source.encode(music, bw))  # the weights of the layout are the model's
        audio = a.decode(codes)
        assert audio.shape == (1, 1, frames * 320) and bool(torch.isfinite(audio).all())
    assert codes.unique().numel() > 20


def test_yue_batches_equal_items_alone(yue, music):
    model = XCodec.from_pretrained(yue[0])
    x = torch.zeros(2, 1, music.shape[-1])
    x[0] = music[0]
    x[1, :, :17000] = music[0, :, 3000:20000]
    codes = model.encode(x, 4, lengths=[music.shape[-1], 17000])
    assert torch.equal(codes[0], model.encode(x[:1], 4)[0])
    alone = model.encode(x[1:, :, :17000], 4)[0]
    assert torch.equal(codes[1, :, : alone.shape[-1]], alone)


def test_vocoder_gives_882_samples_per_frame_at_44k_and_the_low_band_merge(yue, music):
    root, _, vocoder = yue
    model = XCodec.from_pretrained(root)
    codes = model.encode(music, 4)
    voc = Vocoder.from_pretrained(root / "decoders" / "decoder_131000.pth")
    out = voc.vocode(model, codes)
    assert voc.sample_rate == 44100 and out.shape == (1, 1, codes.shape[-1] * 882)
    assert torch.equal(out, vocoder(model.quantizer.decode(codes)))
    merged = merge_low_band(model.decode(codes), out)
    assert merged.shape[0] == 1 and abs(merged.shape[-1] - out.shape[-1]) <= 2 and bool(torch.isfinite(merged).all())


def test_wrong_layouts_are_refused_naming_the_keys(yue, tmp_path):
    root, _, _ = yue
    ckpt = torch.load(root / "final_ckpt" / "ckpt_00360000.pth", weights_only=True)
    del ckpt["codec_model"]["quantizer.vq.layers.11._codebook.embed"]
    bad = tmp_path / "final_ckpt"
    bad.mkdir()
    torch.save(ckpt, bad / "ckpt_00360000.pth")
    (bad / "config.yaml").write_text((root / "final_ckpt" / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match=r"missing key\(s\): quantizer\.vq\.layers\.11\._codebook\.embed"):
        XCodec.from_pretrained(tmp_path)
    state = torch.load(root / "decoders" / "decoder_131000.pth", weights_only=True)
    state["backbone.convnext.9.gamma"] = state.pop("backbone.convnext.1.gamma")
    torch.save(state, tmp_path / "decoder.pth")
    with pytest.raises(
        CheckpointError,
        match=r"missing key\(s\): backbone\.convnext\.1\.gamma; 1 unexpected key\(s\): backbone\.convnext\.9\.gamma",
    ):
        Vocoder.from_pretrained(tmp_path / "decoder.pth", config=root / "decoders" / "config.yaml")


def test_vocos_key_names_are_those_of_the_released_decoders():
    """81 tensors, named and shaped as YuE's decoder_*.pth (decoders/config.yaml's sizes)."""
    state = Vocoder(BackboneArgs(), HeadArgs()).state_dict()
    expected = {"backbone.embed.weight": (512, 1024, 7), "backbone.embed.bias": (512,), "backbone.norm.weight": (512,),
                "backbone.norm.bias": (512,), "backbone.final_layer_norm.weight": (512,), "backbone.final_layer_norm.bias": (512,),
                "head.out.weight": (3530, 512), "head.out.bias": (3530,), "head.istft.window": (3528,)}  # fmt: skip
    for i in range(8):
        block = {"dwconv.weight": (512, 1, 7), "dwconv.bias": (512,), "norm.weight": (512,), "norm.bias": (512,),
                 "pwconv1.weight": (1536, 512), "pwconv1.bias": (1536,), "pwconv2.weight": (512, 1536),
                 "pwconv2.bias": (512,), "gamma": (512,)}  # fmt: skip
        expected.update({f"backbone.convnext.{i}.{k}": v for k, v in block.items()})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected and len(state) == 81


def test_same_padding_istft_equals_a_direct_overlap_add():
    n_fft, hop, frames = 64, 16, 9
    spec = torch.randn(2, n_fft // 2 + 1, frames, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    istft = ISTFT(n_fft, hop)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    np.testing.assert_allclose(istft.window.numpy(), window, atol=1e-6)  # float32 buffer (the state-dict key)
    window = istft.window.double().numpy()  # the same values, so the algorithm is compared exactly
    ours = istft.double()(spec).numpy()
    length = (frames - 1) * hop + n_fft
    for b in range(2):
        y, env = np.zeros(length), np.zeros(length)
        for t in range(frames):
            y[t * hop : t * hop + n_fft] += np.fft.irfft(spec[b, :, t].numpy(), n_fft) * window
            env[t * hop : t * hop + n_fft] += window**2
        pad = (n_fft - hop) // 2
        direct = y[pad:-pad] / env[pad:-pad]
        assert ours.shape[-1] == frames * hop == len(direct)
        np.testing.assert_allclose(ours[b], direct, rtol=1e-10, atol=1e-12)


def test_inference_writes_44k_files_with_the_vocoder(yue, tmp_path, capsys):
    root = yue[0]
    src = tmp_path / "song.flac"
    sf.write(src, read_asset("music_4s.flac")[:20000], 16000)
    voc = root / "decoders" / "decoder_151000.pth"
    argv = ["--checkpoint", str(root), "--input", str(src), "-b", "4", "--vocoder", str(voc)]
    assert inference.main([*argv, "--output", str(tmp_path / "a.wav"), "--codes-out", str(tmp_path / "a.npy")]) == 0
    info = sf.info(str(tmp_path / "a.wav"))
    assert info.samplerate == 44100 and info.frames == round(20000 * 44100 / 16000)
    assert np.load(tmp_path / "a.npy").shape[0] == 8  # what YuE's stage 2 reads
    assert inference.main([*argv, "--output", str(tmp_path / "m.wav"), "--low-freq-merge"]) == 0
    assert sf.info(str(tmp_path / "m.wav")).frames == info.frames
    code = inference.main(
        [
            "--checkpoint",
            str(root),
            "--codes-in",
            str(tmp_path / "a.npy"),
            "--output",
            str(tmp_path / "c.wav"),
            "--vocoder",
            str(voc),
        ]
    )
    assert code == 0 and sf.info(str(tmp_path / "c.wav")).samplerate == 44100
    capsys.readouterr()


def test_yue_to_transformers_gives_the_same_codes(yue, tmp_path, music):
    model = XCodec.from_pretrained(yue[0])
    hf = XcodecModel.from_pretrained(str(model.save_pretrained(tmp_path / "hf"))).eval()
    assert hf.config.target_bandwidths[-1] == 6
    with torch.no_grad():
        hf_codes = hf.encode(music, bandwidth=6.0).audio_codes
    assert hf_codes.shape[1] == 12 and torch.equal(hf_codes, model.encode(music, 6))
    from models.convert import main as convert_main

    assert (
        convert_main([str(yue[0]), str(tmp_path / "converted")]) == 0
    )  # the conversion CLI, verified tensor by tensor
    assert torch.equal(XCodec.from_pretrained(tmp_path / "converted").encode(music, 6), hf_codes)


@pytest.mark.slow
def test_release_name_and_vocoders_through_an_offline_hub_cache(yue, tmp_path):
    root = yue[0]
    files = ["final_ckpt/ckpt_00360000.pth", "final_ckpt/config.yaml", "semantic_ckpts/hf_1_325000/config.json",
             "decoders/config.yaml", "decoders/decoder_131000.pth", "decoders/decoder_151000.pth"]  # fmt: skip
    cache = tmp_path / "cache"
    add_to_hub_cache(cache, "m-a-p/xcodec_mini_infer", {f: (root / f).read_bytes() for f in files})
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import torch
        from models import XCodec
        from models.vocoder import Vocoder
        m = XCodec.from_pretrained("yue_xcodec_mini")
        codes = m.encode(torch.zeros(1, 1, 3200), 4)
        for name in ("vocals", "instrumentals"):
            print("OK", name, tuple(Vocoder.from_pretrained(name).vocode(m, codes).shape))
        try:
            Vocoder.from_pretrained("vocals").vocode(m, m.encode(torch.zeros(1, 1, 3200), 6))
        except ValueError as exc:
            print("REFUSED", exc)
    """)  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK vocals (1, 1, 8820)" in proc.stdout and "OK instrumentals (1, 1, 8820)" in proc.stdout
    assert "REFUSED this vocoder takes 8 codebooks, not 12" in proc.stdout  # YuE's vocoders: stage-2 codes only


def test_evaluate_with_the_vocoder_scores_at_the_reference_rate(yue, tmp_path, capsys):
    import soxr

    import evaluate

    root = yue[0]
    ref = soxr.resample(read_asset("music_4s.flac")[:24000], 16000, 44100)
    sf.write(tmp_path / "song.wav", ref, 44100)
    argv = ["--checkpoint", str(root), "--input", str(tmp_path / "song.wav"), "--bandwidths", "4",
            "--vocoder", str(root / "decoders" / "decoder_151000.pth"), "--output", str(tmp_path / "r.json")]  # fmt: skip
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sample_rate"] == 44100 and report["vocoder"].endswith("decoder_151000.pth")
    assert [s["n_q"] for s in report["bandwidths"]] == [8]  # the vocoder takes 8 codebooks: -b 0.5 is refused
    row = report["bandwidths"][0]["files"][0]
    assert row["path"] == "song.wav" and math.isfinite(row["mel_distance"]) and math.isfinite(row["si_sdr"])


def _torchaudio_sinc_resample(x: np.ndarray, orig: int, new: int, width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """torchaudio's ``sinc_interp_hann`` resampling from its documented formula, output by output:
    ``y[m] = sum_i x[i] * (base / orig) * sinc(t) * cos(pi t / (2 width))^2``, ``t = base * (i / orig - m / new)``,
    ``|t| <= width``, ``base = rolloff * min(orig, new)`` (no gcd step, no kernel table, no strided convolution)."""
    base = rolloff * min(orig, new)
    m = np.arange(math.ceil(len(x) * new / orig))
    i = np.floor(m * orig / new).astype(np.int64)[:, None] + np.arange(
        -width * orig // int(base) - 2, width * orig // int(base) + 3
    )
    t = base * (i / orig - m[:, None] / new)
    w = np.where(np.abs(t) <= width, np.sinc(t) * np.cos(np.pi * t / (2 * width)) ** 2, 0.0) * (base / orig)
    taps = np.where((i >= 0) & (i < len(x)), x[np.clip(i, 0, len(x) - 1)], 0.0)
    return (taps * w).sum(axis=1)


def test_sinc_resample_is_torchaudios_windowed_sinc():
    from utils.audio import sinc_resample, sinc_resample_kernel

    kernel, width = sinc_resample_kernel(160, 441)  # 16 -> 44.1 kHz after the gcd (100)
    assert width == 7 and kernel.shape == (441, 2 * 7 + 160)  # ceil(6 * 160 / 158.4) taps of context
    j, k = np.meshgrid(np.arange(441), np.arange(174), indexing="ij")
    t = np.clip(158.4 * ((k - 7) / 160 - j / 441), -6, 6)
    assert np.allclose(kernel, np.sinc(t) * np.cos(np.pi * t / 12) ** 2 * 0.99, rtol=0, atol=1e-12)
    x = read_asset("music_4s.flac").astype(np.float64)
    for orig, new in ((16000, 44100), (44100, 16000), (16000, 24000)):
        y = sinc_resample(x, orig, new)
        ref = _torchaudio_sinc_resample(x, orig, new)
        assert y.shape == ref.shape == (math.ceil(len(x) * new / orig),)
        assert np.abs(y - ref).max() < 1e-9 * np.abs(ref).max(), (orig, new)


def test_merge_low_band_is_yues_post_processing_step_for_step():
    """YuE's replace_low_freq_with_energy_matched, each step computed here with numpy/scipy:
    torchaudio Resample 16 -> 44.1 kHz, lowpass/highpass biquads (RBJ, Q 0.707, clamped to [-1, 1]),
    one RMS gain, the sum cut to the shorter length."""
    import soxr
    from scipy.signal import lfilter

    codec = read_asset("music_4s.flac").astype(np.float64)  # the codec's 16 kHz decoding
    rng = np.random.default_rng(0)
    voc = soxr.resample(read_asset("speech_en.flac")[:64000], 16000, 44100)[:175000]  # the vocoder at 44.1 kHz
    voc = voc + 0.05 * rng.standard_normal(len(voc))  # highs for the vocoder's band

    def biquad(x, kind):
        w0 = 2 * np.pi * 5500.0 / 44100
        alpha, c = np.sin(w0) / 2 / 0.707, np.cos(w0)
        b = [(1 - c) / 2, 1 - c, (1 - c) / 2] if kind == "low" else [(1 + c) / 2, -1 - c, (1 + c) / 2]
        a = [1 + alpha, -2 * c, 1 - alpha]
        return np.clip(lfilter(np.array(b) / a[0], np.array(a) / a[0], x), -1, 1)

    def yue(a):
        a_low, b_low, b_high = biquad(a, "low"), biquad(voc, "low"), biquad(voc, "high")
        scale = (np.sqrt(np.mean(b_low**2)) + 1e-10) / (np.sqrt(np.mean(a_low**2)) + 1e-10)
        n = min(len(a_low), len(b_high))
        return a_low[:n] * scale + b_high[:n]

    ref = yue(_torchaudio_sinc_resample(codec, 16000, 44100))
    ours = merge_low_band(torch.from_numpy(codec)[None, None], torch.from_numpy(voc)[None, None])[0, 0].double().numpy()
    assert ours.shape == ref.shape == (175000,)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
    with_soxr = yue(soxr.resample(codec, 16000, 44100))  # what the merge did before: measurably not YuE's
    assert np.linalg.norm(with_soxr - ref) / np.linalg.norm(ref) > 1e-3


def test_a_vocoder_given_as_a_path_refuses_other_codebook_counts(yue, tmp_path, capsys):
    """Its n_q comes from its config (YuE's 8 unless ``n_q:`` says otherwise): 12-codebook codes are
    refused in one line, not vocoded into wrong audio."""
    root = yue[0]
    model = XCodec.from_pretrained(root)
    src = tmp_path / "song.flac"
    sf.write(src, read_asset("music_4s.flac")[:20000], 16000)
    np.save(tmp_path / "c12.npy", model.encode(torch.from_numpy(read_asset("music_4s.flac")[:20000].copy())[None, None], 6)[0].numpy().astype(np.int16))
    voc = root / "decoders" / "decoder_151000.pth"
    code = inference.main(["--checkpoint", str(root), "--codes-in", str(tmp_path / "c12.npy"), "--output", str(tmp_path / "o.wav"), "--vocoder", str(voc)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "this vocoder takes 8 codebooks, not 12" in err[0], err
    assert not (tmp_path / "o.wav").exists()
    code = inference.main(["--checkpoint", str(root), "--input", str(src), "-b", "6", "--output", str(tmp_path / "o.wav"), "--vocoder", str(voc)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "takes 8 codebooks, not 12" in err[0] and not (tmp_path / "o.wav").exists(), err
    mine = tmp_path / "voc"  # a vocoder trained on 12 codebooks says so
    mine.mkdir()
    (mine / "decoder.pth").write_bytes(voc.read_bytes())
    (mine / "config.yaml").write_text((root / "decoders" / "config.yaml").read_text() + "n_q: 12\n")
    assert Vocoder.from_pretrained(mine / "decoder.pth").n_q == 12
    code = inference.main(["--checkpoint", str(root), "--codes-in", str(tmp_path / "c12.npy"), "--output", str(tmp_path / "o.wav"), "--vocoder", str(mine / "decoder.pth")])
    assert code == 0 and sf.info(str(tmp_path / "o.wav")).samplerate == 44100
    capsys.readouterr()


def test_a_local_yue_clone_gives_its_own_vocoders(yue, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may come from the hub
    root, _, vocoder = yue
    for checkpoint in (root, root / "final_ckpt" / "ckpt_00360000.pth"):
        voc = Vocoder.from_pretrained("vocals", checkpoint=checkpoint)
        assert all(torch.equal(a, b) for a, b in zip(voc.state_dict().values(), vocoder.state_dict().values()))
    src = tmp_path / "song.flac"
    sf.write(src, read_asset("music_4s.flac")[:20000], 16000)
    code = inference.main(["--checkpoint", str(root), "--input", str(src), "-b", "4", "--vocoder", "instrumentals", "--output", str(tmp_path / "o.wav")])
    assert code == 0, capsys.readouterr().err
    assert sf.info(str(tmp_path / "o.wav")).samplerate == 44100
