"""The codec against transformers' XcodecModel, and its API contracts, on real speech."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_codec
from models import CodesError, XCodec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("num_samples", [48000, 78480])  # a multiple of the hop (320) and not
def test_matches_transformers_batch1(inference_codec, hf_model, speech, num_samples):
    x = torch.from_numpy(speech[:num_samples])[None, None] * 0.95
    with torch.no_grad():
        ref_codes = hf_model.encode(x, 4.0, return_dict=False)
        ref_audio = hf_model.decode(ref_codes, return_dict=False)
    codes = inference_codec.encode(x, 4.0)
    audio = inference_codec.decode(codes)
    assert codes.shape == ref_codes.shape == (1, 8, inference_codec.num_frames(num_samples))
    assert torch.equal(codes, ref_codes)
    assert _rel(audio, ref_audio) < 1e-4
    # The codes are not degenerate: many distinct entries are used.
    assert codes[0, 0].unique().numel() > 20


def test_matches_transformers_ragged_batch(inference_codec, hf_model, speech):
    lengths = [78480, 48000, 20001]
    batch = torch.zeros(3, 1, max(lengths))
    for i, n in enumerate(lengths):
        batch[i, 0, :n] = torch.from_numpy(speech[:n]) * 0.95
    codes = inference_codec.encode(batch, 2.0, lengths=lengths)
    frames = inference_codec.num_frames(torch.tensor(lengths))
    audio = inference_codec.decode(codes, frames=frames)
    assert codes.shape == (3, 4, int(frames.max()))
    for i, n in enumerate(lengths):
        with torch.no_grad():
            ref = hf_model.encode(batch[i : i + 1, :, :n], 2.0, return_dict=False)
            ref_audio = hf_model.decode(ref, return_dict=False)
        f = int(frames[i])
        assert torch.equal(codes[i : i + 1, :, :f], ref), f"item {i}"
        assert bool((codes[i, :, f:] == 0).all())
        assert _rel(audio[i : i + 1, :, : f * 320], ref_audio) < 1e-4


def test_bandwidth_sets_codebooks(inference_codec, speech):
    x = torch.from_numpy(speech[:16000])[None, None]
    full = inference_codec.encode(x)
    assert inference_codec.n_q == 8 and full.shape[1] == 8
    for bw, n_q in [(0.5, 1), (1, 2), (1.5, 3), (2, 4), (4, 8)]:
        codes = inference_codec.encode(x, bw)
        assert codes.shape[1] == n_q
        assert torch.equal(codes, full[:, :n_q])  # residual VQ: a prefix of the full codes
        assert inference_codec.decode(codes).shape == (1, 1, codes.shape[-1] * 320)
    with pytest.raises(ValueError, match="unsupported bandwidth 3"):
        inference_codec.encode(x, 3.0)


def test_decode_refuses_bad_codes(inference_codec):
    good = torch.zeros(1, 2, 10, dtype=torch.long)
    assert inference_codec.decode(good).shape == (1, 1, 3200)
    with pytest.raises(CodesError, match=r"\[0, 1024\).*1024"):
        inference_codec.decode(torch.full((1, 2, 10), 1024))
    with pytest.raises(CodesError, match="-1"):
        inference_codec.decode(torch.full((1, 2, 10), -1))
    with pytest.raises(CodesError, match="9 quantizers"):
        inference_codec.decode(torch.zeros(1, 9, 10, dtype=torch.long))
    with pytest.raises(CodesError, match="integers"):
        inference_codec.decode(torch.zeros(1, 2, 10))
    with pytest.raises(CodesError, match="shape"):
        inference_codec.decode(torch.zeros(2, 10, dtype=torch.long))


def test_encode_refuses_bad_audio(inference_codec):
    x = torch.zeros(1, 1, 4000)
    x[0, 0, 100] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        inference_codec.encode(x)
    with pytest.raises(ValueError, match=r"shape \(B, 1, T\)"):
        inference_codec.encode(torch.zeros(1, 2, 4000))
    with pytest.raises(ValueError, match="too short"):
        inference_codec.encode(torch.zeros(1, 1, inference_codec.min_length() - 1))
    assert inference_codec.encode(torch.zeros(1, 1, inference_codec.min_length())).shape[-1] == 1


def test_quantizer_forward_equals_decode_of_encode(tiny_codec, speech):
    x = torch.from_numpy(speech[:32000])[None, None]
    with torch.no_grad():
        latents = tiny_codec.latents(x, None)[0]
        q = tiny_codec.quantizer(latents, 2.0)
        codes = tiny_codec.quantizer.encode(latents, 2.0)
        assert q.n_q == 4 and q.bandwidth == pytest.approx(2.0)
        assert torch.equal(q.codes, codes)
        assert torch.allclose(q.quantized, tiny_codec.quantizer.decode(codes), atol=1e-6)


def test_train_mode_keeps_teacher_frozen(tiny_codec):
    tiny_codec.train()
    try:
        assert not tiny_codec.semantic_model.training
        assert tiny_codec.encoder.training
        assert not any(p.requires_grad for p in tiny_codec.semantic_model.parameters())
    finally:
        tiny_codec.eval()


def test_public_attributes(inference_codec):
    assert isinstance(inference_codec, XCodec)
    assert inference_codec.sample_rate == 16000
    assert inference_codec.hop_length == 320
    assert inference_codec.frame_rate == 50
    assert inference_codec.target_bandwidths == [0.5, 1.0, 1.5, 2.0, 4.0]
    assert inference_codec.audio_norm_scale == pytest.approx(0.95)


def test_decode_never_returns_non_finite_audio():
    model = make_tiny_codec(weight_norm=False)
    codes = torch.zeros(1, 2, 10, dtype=torch.long)
    assert torch.isfinite(model.decode(codes)).all()
    with torch.no_grad():
        model.quantizer.vq.layers[1].codebook[0, 0] = float("inf")  # as a diverged training run may leave it
    with pytest.raises(ValueError, match="decoded audio holds NaN or Inf"):
        model.decode(codes)


def test_float64_audio_is_encoded_as_float32_and_fractional_lengths_are_refused(tiny_codec):
    model = tiny_codec.eval()
    x = torch.randn(2, 1, 4000, generator=torch.Generator().manual_seed(3)) * 0.1
    assert torch.equal(model.encode(x.double()), model.encode(x))
    assert torch.equal(model.encode(x, lengths=torch.tensor([3200.0, 4000.0])), model.encode(x, lengths=[3200, 4000]))
    with pytest.raises(ValueError, match="whole numbers"):
        model.encode(x, lengths=[3200.5, 4000])
