"""Property tests for losses, PQMF and discriminators (CPU, run with `python -m pytest`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from losses import (
    FeatureMatchingLoss,
    GANLoss,
    MelSpectrogramLoss,
    MultiResolutionSTFTLoss,
    SubbandMultiResolutionSTFTLoss,
    mel_spectrogram,
)
from modules.discriminators import (
    MultiFrequencyDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    MultiScaleSTFTDiscriminator,
    build_discriminators,
)
from modules.pqmf import PQMF

SR = 16000
ASSET = Path(__file__).parent / "assets" / "speech_en.flac"

# The released recipe's discriminator section (codec_16k_6kbps_v3_vqdp.yaml).
RECIPE = {
    "mfd": {
        "hop_lengths": [32, 64, 128, 256, 512, 1024],
        "hidden_channels": [64, 128, 256, 512, 512, 512],
        "domain": "double",
        "mel_scale": True,
        "sample_rate": 16000,
    },
    "mpd": {"period_sizes": [2, 3, 5, 7, 11], "period_kernel_size": 5},
    "msd": {"num_scales": 3, "pool_kernel_size": 4, "pool_stride": 2},
    "msstftd": {"filters": 32},
}


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    wav, sr = sf.read(ASSET, dtype="float32")
    assert sr == SR
    return torch.from_numpy(wav[SR // 2 : SR // 2 + 2 * SR]).view(
        1, 1, -1
    )  # 2 s of speech, (1, 1, T)


def _snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - est).pow(2).sum().item())


# ---------------------------------------------------------------- STFT losses


@pytest.mark.parametrize(
    "loss_cls", [MultiResolutionSTFTLoss, SubbandMultiResolutionSTFTLoss]
)
def test_stft_losses_zero_for_identical_and_grow_with_noise(loss_cls, speech):
    loss = loss_cls()
    assert loss(speech, speech).item() == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(speech.shape, generator=gen)
    values = [
        loss(speech + level * noise, speech).item() for level in (1e-3, 1e-2, 1e-1)
    ]
    assert values[0] > 0
    assert values == sorted(values) and values[2] > 2 * values[0]


@pytest.mark.parametrize(
    "loss_cls", [MultiResolutionSTFTLoss, SubbandMultiResolutionSTFTLoss]
)
def test_stft_losses_known_values_for_doubled_signal(loss_cls, speech):
    # |STFT(2y)| = 2|STFT(y)|: spectral convergence is exactly 1 and the
    # log-magnitude term ln 2, up to the 1e-7 power floor on silent bins.
    sc, mag = loss_cls().components(2 * speech, speech)
    assert sc.item() == pytest.approx(1.0, abs=1e-3)
    assert mag.item() == pytest.approx(math.log(2), abs=0.02)


def test_stft_loss_accepts_flat_batches_and_backpropagates(speech):
    estimate = (0.9 * speech.clone()).requires_grad_(True)
    loss = MultiResolutionSTFTLoss([256, 512], [64, 128], [256, 400])
    value = loss(estimate, speech)
    assert value.item() == pytest.approx(
        loss(estimate.view(1, -1), speech.view(1, -1)).item()
    )
    value.backward()
    assert torch.isfinite(estimate.grad).all() and estimate.grad.abs().sum() > 0


# ---------------------------------------------------------------------- PQMF


@pytest.mark.parametrize(("num_bands", "cutoff"), [(6, None), (8, None), (4, 0.142)])
def test_pqmf_reconstructs_speech(num_bands, cutoff, speech):
    pqmf = PQMF(num_bands, cutoff_ratio=cutoff)
    bands = pqmf.analysis(speech)
    assert bands.shape == (1, num_bands, speech.shape[-1] // num_bands)
    recon = pqmf.synthesis(bands)
    n = recon.shape[-1]
    assert n >= speech.shape[-1] - num_bands
    assert _snr_db(speech[..., :n], recon) > 35.0


def test_pqmf_routes_a_sine_to_its_band():
    pqmf = PQMF(4, cutoff_ratio=0.142)  # bands of 2 kHz at 16 kHz
    t = torch.arange(SR) / SR
    for freq, band in [(700.0, 0), (3000.0, 1), (5000.0, 2), (7000.0, 3)]:
        energy = (
            pqmf.analysis(torch.sin(2 * math.pi * freq * t).view(1, 1, -1))
            .pow(2)
            .sum(-1)
            .flatten()
        )
        assert energy.argmax().item() == band
        assert energy[band] / energy.sum() > 0.95


# ----------------------------------------------------------------------- mel


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    # Slaney/librosa scale: linear below 1 kHz (15 mel), logarithmic above.
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(
        mel < 15.0,
        200.0 * mel / 3.0,
        1000.0 * np.exp((mel - 15.0) * math.log(6.4) / 27.0),
    )


@pytest.mark.parametrize("band", [5, 20, 45, 70])
def test_mel_spectrogram_of_sine_peaks_in_its_band(band):
    # 80 bands between 0 and 8 kHz; Nyquist is 15 + 27 * ln(8) / ln(6.4) mel.
    edges = np.linspace(0.0, 15.0 + 27.0 * math.log(8.0) / math.log(6.4), 80 + 2)
    freq = float(_slaney_mel_to_hz(edges[band + 1]))  # centre of filter `band`
    t = torch.arange(SR, dtype=torch.float64) / SR
    wav = (0.5 * torch.sin(2 * math.pi * freq * t)).float().view(1, 1, -1)
    mel = mel_spectrogram(wav)
    assert mel.shape == (1, 80, SR // 160)
    peaks = mel[0, :, 5:-5].argmax(0)  # skip edge frames touched by padding
    assert (peaks == band).all(), (freq, peaks.unique())


def test_mel_loss_matches_function_and_orders_distortions(speech):
    loss = MelSpectrogramLoss()
    assert torch.allclose(loss.log_mel(speech), mel_spectrogram(speech))
    assert loss(speech, speech).item() == 0.0
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(speech.shape, generator=gen)
    small, large = (
        loss(speech + 1e-3 * noise, speech).item(),
        loss(speech + 1e-1 * noise, speech).item(),
    )
    assert 0 < small < large


# ----------------------------------------------------------- adversarial losses


def test_gan_loss_known_values():
    gan = GANLoss()
    ones, zeros = torch.ones(2, 7), torch.zeros(2, 7)
    assert gan.discriminator([ones, ones], [zeros, zeros]).item() == 0.0
    assert gan.discriminator([zeros], [ones]).item() == pytest.approx(2.0)
    assert gan.discriminator([ones, zeros], [zeros, zeros]).item() == pytest.approx(
        0.5
    )  # mean over sub-discs
    assert gan.generator([ones, ones]).item() == 0.0
    assert gan.generator([zeros]).item() == pytest.approx(1.0)
    assert gan.generator([ones, 3 * ones]).item() == pytest.approx(2.0)  # (0 + 4) / 2
    assert gan(zeros).item() == gan.generator(zeros).item()


def test_gan_generator_gradient_pushes_fake_logits_towards_one():
    logits = torch.zeros(3, 4, requires_grad=True)
    GANLoss().generator([logits]).backward()
    assert (logits.grad < 0).all()


def test_feature_matching_loss_values_and_detaches_real():
    real = [
        [
            torch.randn(2, 4, 8, requires_grad=True),
            torch.randn(2, 16, requires_grad=True),
        ],
        [torch.randn(2, 5)],
    ]
    fake = [[r + 0.5 for r in real[0]], [real[1][0] - 2.0]]
    fake = [[f.detach().requires_grad_(True) for f in group] for group in fake]
    fm = FeatureMatchingLoss()
    assert fm(real, real).item() == 0.0
    value = fm(real, fake)
    assert value.item() == pytest.approx(
        (0.5 + 0.5 + 2.0) / 3
    )  # mean over 3 maps, not over elements
    value.backward()
    assert real[0][0].grad is None and fake[0][0].grad is not None


# ------------------------------------------------------------- discriminators


@pytest.mark.parametrize(
    ("name", "length"), [("mfd", 8192), ("mpd", 4096), ("msd", 4096), ("msstftd", 4096)]
)
def test_discriminator_interface_and_gradients(name, length):
    # The mfd's coarsest resolution (hop 1024) needs >= 8192 samples to survive its three stride-2 convs.
    torch.manual_seed(0)
    disc = build_discriminators([name], RECIPE)[name]
    x = (0.1 * torch.randn(2, 1, length)).requires_grad_(True)
    logits, fmaps = disc(x)
    assert len(logits) == len(fmaps) > 0
    for out, feats in zip(logits, fmaps):
        assert out.dim() == 2 and out.shape[0] == 2 and torch.isfinite(out).all()
        assert len(feats) > 0 and all(f.shape[0] == 2 for f in feats)
    loss = GANLoss().generator(logits) + sum(
        f.abs().mean() for feats in fmaps for f in feats
    )
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())

    # Samples must not mix across the batch (catches reshape mistakes). eval():
    # spectral norm's power iteration would otherwise change the weights per call.
    disc.eval()
    with torch.no_grad():
        batch, _ = disc(x.detach())
        single, _ = disc(x[1:].detach())
    for out_batch, out_single in zip(batch, single):
        torch.testing.assert_close(out_batch[1:], out_single, rtol=1e-4, atol=1e-5)


def test_discriminator_layouts_follow_recipe():
    mfd = MultiFrequencyDiscriminator(**RECIPE["mfd"])
    with torch.no_grad():
        logits, fmaps = mfd(torch.randn(1, 1, 8192))
    assert len(logits) == 6 and all(len(f) == 6 for f in fmaps)
    assert [f[-1].shape[1] for f in fmaps] == RECIPE["mfd"]["hidden_channels"]
    assert fmaps[0][0].shape[1] == 64 // 32
    assert len(MultiPeriodDiscriminator(period_sizes=[2, 3]).discriminators) == 2
    assert len(MultiScaleDiscriminator(num_scales=2).discriminators) == 2
    assert (
        len(
            MultiScaleSTFTDiscriminator(
                n_ffts=[512], hop_lengths=[128], win_lengths=[512]
            ).discriminators
        )
        == 1
    )


def test_mfd_double_domain_log_channel_in_unit_range():
    spec = MultiFrequencyDiscriminator().spectrograms[2](0.5 * torch.randn(1, 4096))
    assert spec.shape == (1, 2, 257, 4096 // 128 + 1)
    assert spec[:, 1].min() >= 0 and spec[:, 1].max() <= 1
    assert (spec[:, 0] > 0).all()


def test_build_discriminators_returns_named_moduledict_and_rejects_unknown():
    ds = build_discriminators(["mpd", "msstftd"], {"mpd": {"period_sizes": [2, 3]}})
    assert list(ds.keys()) == ["mpd", "msstftd"]
    assert (
        isinstance(ds["mpd"], MultiPeriodDiscriminator)
        and len(ds["mpd"].discriminators) == 2
    )
    with pytest.raises(ValueError, match="msstftd"):
        build_discriminators(["mfd", "hifigan"], {})
