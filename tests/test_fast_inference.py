"""Fast inference (issue #4): exact mode against transformers' XcodecModel, the
cache-blocked runner against eager modules, batches against single items, windowed
long-file encoding and chunked / streaming decoding, on real speech with the tiny codec."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from models import precision
from models.streaming import (
    DECODER_CONTEXT,
    StreamingDecoder,
    chunk_codes,
    decode_long,
    decode_many,
    encode_long,
    encode_many,
    receptive_frames,
)
from modules.snake import snake, snake_reference
from modules.teacher import Teacher, first_conv_stats
from modules.tiled import TiledRunner, plan_segments


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _clip(speech: np.ndarray, n: int) -> torch.Tensor:
    reps = -(-n // len(speech))
    return torch.from_numpy(np.tile(speech, reps)[:n].copy())[None, None] * 0.95


# ---------------------------------------------------------------------------- exact mode
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("num_samples", [64000, 78413])  # a multiple of the hop and not
def test_exact_mode_matches_transformers(inference_codec, hf_model, speech, num_threads, num_samples, threads):
    torch.set_num_threads(num_threads)
    x = _clip(speech, num_samples)
    with torch.inference_mode():
        ref_codes = hf_model.encode(x, 4.0, return_dict=False)
        ref_audio = hf_model.decode(ref_codes, return_dict=False)
    codes = inference_codec.encode(x, 4.0)
    assert torch.equal(codes, ref_codes)
    assert codes[0, 0].unique().numel() > 20  # not degenerate
    audio = inference_codec.decode(ref_codes)
    assert audio.shape == ref_audio.shape and audio.dtype == torch.float32
    assert _rel(audio, ref_audio) < 1e-5


def test_snake_is_bitwise_the_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 48, 5000) * 4
    alpha = torch.rand(1, 48, 1) + 0.2
    ref = snake_reference(x, alpha)
    assert torch.equal(snake(x, alpha, tile=4096), ref)
    y = x.clone()
    assert torch.equal(snake(y, alpha, out=y, tile=1000), ref)  # in place
    x4 = x[:, :, None, :].contiguous(memory_format=torch.channels_last)
    assert torch.equal(snake(x4, alpha, tile=4096)[:, :, 0], ref)


def test_runner_matches_eager_with_many_tiles(inference_codec, speech):
    """Small tiles force many tiles per stage: halos, edges and ragged items must match
    the eager modules (up to oneDNN's channels-last summation order)."""
    x = _clip(speech, 40321)
    z = torch.randn(2, inference_codec.decoder.model[0].in_channels, 90) * 0.3
    lengths = torch.tensor([40321, 23000])
    xb = torch.cat([x, x * 0.5], 0)
    xb[1, :, 23000:] = 0
    with torch.inference_mode():
        runner = TiledRunner(tile=16384, min_tile=256)
        enc = plan_segments(inference_codec.encoder.block)
        y, out_len = runner.run(enc, runner.to_layout(x))
        assert _rel(runner.from_layout(y), inference_codec.encoder(x)) < 1e-5
        yb, out_lens = runner.run(enc, runner.to_layout(xb), lengths)
        ref = inference_codec.encoder(xb, lengths)
        assert _rel(runner.from_layout(yb), ref) < 1e-5
        assert out_lens.tolist() == inference_codec.encoder.output_length(lengths).tolist()
        # padded positions are exactly zero, as in the eager modules
        assert bool((runner.from_layout(yb)[1, :, int(out_lens[1]) :] == 0).all())
        dec = plan_segments(inference_codec.decoder.model)
        ref = inference_codec.decoder(z, torch.tensor([90, 61]))
        out = runner.from_layout(runner.run(dec, runner.to_layout(z), torch.tensor([90, 61]))[0])
        assert _rel(out, ref) < 1e-5
        # and so does a single tile per stage
        whole = TiledRunner(tile=1 << 30, min_tile=1 << 30)
        assert _rel(whole.from_layout(whole.run(dec, whole.to_layout(z))[0]), inference_codec.decoder(z)) < 1e-5


def test_teacher_running_mean_is_the_stacked_mean(inference_codec, hf_model, speech):
    """The teacher's own forward against transformers' model with the same weights: in
    float64 (the eager feature extractor in both) bitwise the stacked mean of its hidden
    states; in float32 (the cache-blocked feature extractor) up to its rounding."""
    x = _clip(speech, 30000)
    xp = torch.nn.functional.pad(x[:, 0], (160, 160))
    with torch.inference_mode():
        ref = torch.stack(hf_model.semantic_model(xp, output_hidden_states=True).hidden_states, 1).mean(1)
        assert _rel(inference_codec.semantic_model(x), ref) < 1e-5
        hf64 = copy.deepcopy(hf_model.semantic_model).double()
        hidden = hf64(xp.double(), output_hidden_states=True).hidden_states
        assert torch.equal(Teacher(hf64, 160)(x.double()), torch.stack(hidden, 1).mean(1))


def test_teacher_feature_extractor_tiles_match_eager(inference_codec, hf_model, speech):
    """The cache-blocked feature extractor (GroupNorm from analytic statistics) against
    the module's own forward, for one clip, a batch (per-item statistics), and with the
    whole-file statistics of windowed encoding."""
    teacher = inference_codec.semantic_model
    fe = teacher.feature_extractor
    x = _clip(speech, 52000)[:, 0]
    batch = torch.cat([x, x.flip(-1) * 0.3], 0)
    with torch.inference_mode():
        for inp in (x, batch):
            ref = fe(inp)  # transformers' module: eager GroupNorm
            out = teacher._conv_features(inp, None, None)
            assert out.shape == ref.shape
            assert _rel(out, ref) < 1e-5
        # the statistics equal those GroupNorm computes from the conv's output
        layer = fe.conv_layers[0]
        y = layer.conv(batch[:, None]).double()
        mean, var = first_conv_stats(layer.conv, layer.layer_norm, batch)
        g = layer.layer_norm.num_groups
        yg = y.reshape(2, g, -1)
        assert torch.allclose(mean, yg.mean(-1), rtol=1e-9, atol=1e-9)
        assert torch.allclose(var, yg.var(-1, unbiased=False), rtol=1e-9, atol=1e-9)
        stats = teacher.norm_stats(x[:, None])
        padded = torch.nn.functional.pad(x, (160, 160))
        assert torch.allclose(stats[0].double(), first_conv_stats(layer.conv, layer.layer_norm, padded)[0])
        tiled_fixed = teacher._conv_features(x[:, 4000:20000], None, stats)
        eager = Teacher(copy.deepcopy(hf_model.semantic_model).double(), 160)  # float64: the eager path, same stats
        eager_fixed = eager._conv_features(x[:, 4000:20000].double(), None, stats)
        assert _rel(tiled_fixed, eager_fixed.float()) < 1e-5


# ---------------------------------------------------------------------------- batches
def test_batch_equals_each_item_alone(inference_codec, speech):
    lengths = [78480, 41000, 16001]
    batch = torch.zeros(3, 1, max(lengths))
    for i, n in enumerate(lengths):
        batch[i, 0, :n] = _clip(speech[i * 3000 :], n)[0, 0]
    codes = inference_codec.encode(batch, 2.0, lengths=lengths)
    frames = inference_codec.num_frames(torch.tensor(lengths))
    audio = inference_codec.decode(codes, frames=frames)
    for i, n in enumerate(lengths):
        f = int(frames[i])
        alone = inference_codec.encode(batch[i : i + 1, :, :n], 2.0)
        assert torch.equal(codes[i : i + 1, :, :f], alone), f"item {i}"
        assert bool((codes[i, :, f:] == 0).all())
        assert torch.equal(audio[i : i + 1, :, : f * 320], inference_codec.decode(alone))
        assert bool((audio[i, :, f * 320 :] == 0).all())
    many = encode_many(inference_codec, [batch[i, 0, :n] for i, n in enumerate(lengths)], 2.0, batch_size=2)
    assert all(torch.equal(m, codes[i, :, : int(frames[i])]) for i, m in enumerate(many))
    wavs = decode_many(inference_codec, many, batch_size=2)
    assert all(torch.equal(w, audio[i, 0, : int(frames[i]) * 320]) for i, w in enumerate(wavs))


def test_padded_batch_paths_match_items(inference_codec, speech):
    """The masked padded batch (tiled runner without autograd; eager modules with it, as
    on GPU) gives each item its own latents up to the teacher's last bits."""
    lengths = torch.tensor([48000, 30000])
    batch = torch.zeros(2, 1, 48000)
    for i, n in enumerate(lengths.tolist()):
        batch[i, 0, :n] = _clip(speech, n)[0, 0]
    with torch.inference_mode():
        tiled, _, frames = inference_codec.latents(batch, lengths)
        singles = [inference_codec.latents(batch[i : i + 1, :, :n], None)[0] for i, n in enumerate(lengths.tolist())]
    eager = inference_codec.latents(batch, lengths)[0].detach()  # grad mode on: module path
    for i in range(2):
        f = int(frames[i])
        assert _rel(tiled[i : i + 1, :, :f], singles[i]) < 1e-5
        assert _rel(eager[i : i + 1, :, :f], singles[i]) < 1e-5


def test_pipeline_trims_to_the_source_and_windows_past_one_threshold(inference_codec, speech):
    """models.pipeline: the model's gain, exact batching, one long/short threshold (2 s here) for
    encoding and decoding, and every output cut to its source's length."""
    from models.pipeline import Pipeline

    pipe = Pipeline(inference_codec, 2.0, window=1.0, context=0.5)
    clips = [_clip(speech, n)[0, 0] / 0.95 for n in (16001, 24000, 40321)]  # the last is long
    codes, audio = pipe.encode_decode(clips)
    assert [pipe.is_long(c.shape[-1]) for c in codes] == [False, False, True]
    for clip, c, a in zip(clips, codes, audio):
        scaled = clip[None, None] * inference_codec.audio_norm_scale
        if pipe.is_long(c.shape[-1]):
            assert torch.equal(c, encode_long(inference_codec, scaled, 2.0, window=1.0, context=0.5)[0])
        else:
            assert torch.equal(c, inference_codec.encode(scaled, 2.0)[0])
            whole = inference_codec.decode(c[None], length=clip.numel())[0, 0]
            assert torch.equal(a, whole) and whole.shape[-1] == clip.numel()
        assert a.shape == clip.shape
    assert [a.shape[-1] for a in pipe.decode(codes)] == [c.shape[-1] * 320 for c in codes]  # no source: whole frames
    assert "too short" in pipe.too_short(10) and pipe.too_short(16000) is None
    batch = torch.stack([clips[0], clips[0]])[:, None]
    with torch.no_grad():
        assert inference_codec(batch, 2.0).audio.shape[-1] == 16001  # forward: the input's length
    padded = inference_codec.decode(codes[0][None].expand(2, -1, -1), length=[16001, 16000])
    assert padded.shape == (2, 1, 16001) and float(padded[1, 0, 16000:].abs().sum()) == 0


# ---------------------------------------------------------------------------- long files
def test_windowed_encoding_stitches_at_frame_boundaries(inference_codec, speech):
    x = _clip(speech, 16000 * 14 + 201)
    single = inference_codec.encode(x, 4.0)
    windowed = encode_long(inference_codec, x, 4.0, window=3.0, context=1.5)
    assert windowed.shape == single.shape
    # The tiny random teacher is global (attention, GroupNorm over the clip) and its
    # Gaussian codebooks have many near-ties; with the whole file's GroupNorm statistics
    # and 1.5 s of context, 99.5% of the codes are those of the single pass.
    agreement = float((windowed == single).float().mean())
    assert agreement > 0.97, agreement
    # Both levers do their job: without context, or with each window's own statistics,
    # much more disagrees (89% and 79% here).
    bare = float((encode_long(inference_codec, x, 4.0, window=3.0, context=0.0) == single).float().mean())
    assert bare < agreement - 0.05, (bare, agreement)
    local = float((encode_long(inference_codec, x, 4.0, window=3.0, context=1.5, global_norm=False) == single).float().mean())
    assert local < agreement - 0.1, (local, agreement)
    # A clip that fits in one window is one pass.
    assert torch.equal(encode_long(inference_codec, x[..., :48000], 4.0, window=3.0, context=0.0), inference_codec.encode(x[..., :48000], 4.0))


def test_chunked_and_streaming_decode(inference_codec, speech):
    x = _clip(speech, 16000 * 8)
    codes = inference_codec.encode(x, 4.0)
    whole = inference_codec.decode(codes)
    assert receptive_frames(inference_codec) <= DECODER_CONTEXT
    assert _rel(decode_long(inference_codec, codes, window=70), whole) < 1e-5
    assert _rel(decode_long(inference_codec, codes, window=70, context=0), whole) > 1e-4  # context matters
    for lookahead, bound in ((DECODER_CONTEXT, 1e-5), (0, 1.0)):
        dec = StreamingDecoder(inference_codec, context=DECODER_CONTEXT, lookahead=lookahead)
        pieces = [dec.push(c) for c in chunk_codes(codes, 7)]
        if lookahead == 0:
            assert all(p.numel() == 7 * 320 for p in pieces[:-1])  # every chunk yields its audio
        pieces.append(dec.flush())
        y = torch.cat(pieces)
        assert y.shape == whole[0, 0].shape
        assert _rel(y, whole[0, 0]) < bound


# ---------------------------------------------------------------------------- fast mode
def _assert_codes_differ_only_at_near_ties(model, x: torch.Tensor, exact: torch.Tensor, fast: torch.Tensor) -> None:
    """bf16 codes are fp32's except where bf16's rounding of the latents can move the choice.

    How many codes flip depends on the CPU's bf16 kernels (AMX, AVX512-BF16 or none round
    differently), so no agreement rate is asserted. What holds on every CPU: the bf16 latents
    follow the fp32 ones, and a code differs only where the fp32 residual is
    nearly equidistant from both entries. For entries a (bf16's) and b (fp32's) the gap
    |r - a|^2 - |r - b|^2 is linear in r, so moving r by d shifts it by at most 2 |d| |a - b|:
    a flip needs an fp32 margin below that. Random codes fail both checks.

    Args:
        model: the codec; x: (1, 1, T) audio; exact, fast: (n_q, F) codes in fp32 and bf16.
    """
    with torch.inference_mode():
        e32 = model.latents(x, None, "fp32")[0][0].double()  # (D, F)
        e16 = model.latents(x, None, "bf16")[0][0].double()
    delta = (e16 - e32).norm(dim=0)  # (F,) per frame
    # The bf16 encoder tracks the signal: its error is below the latents' own change from one
    # frame to the next (a random tiny teacher amplifies bf16 rounding to ~25% of the latents,
    # the frames change by ~80%); zero, shuffled or uncorrelated latents would not be.
    assert float((e16 - e32).norm()) < float((e32[:, 1:] - e32[:, :-1]).norm())
    r32, r16 = e32.clone(), e16.clone()
    same_prefix = torch.ones(exact.shape[1], dtype=torch.bool)  # earlier stages agree: same residual shift
    checked = 0
    for k, layer in enumerate(model.quantizer.vq.layers[: exact.shape[0]]):
        book = layer.codebook.double()  # (bins, D)
        a, b = book[fast[k]].T, book[exact[k]].T  # (D, F)
        margin = (r32 - a).pow(2).sum(0) - (r32 - b).pow(2).sum(0)  # >= 0 up to rounding: b is fp32's nearest
        bound = 2 * delta * (a - b).norm(dim=0) + 1e-5 * (r32.pow(2).sum(0) + a.pow(2).sum(0) + b.pow(2).sum(0))
        flipped = same_prefix & (fast[k] != exact[k])
        assert bool((margin[flipped] <= bound[flipped]).all()), (k, margin[flipped], bound[flipped])
        checked += int(flipped.sum())
        r32, r16 = r32 - b, r16 - a
        same_prefix &= fast[k] == exact[k]
    assert checked > 0 or torch.equal(fast, exact)  # the check saw every difference of stage 0 at least


@pytest.mark.slow
def test_bf16_speed_probe_tells_fast_kernels_from_none():
    """The probe measures what the CPU's bf16 kernels do: with oneDNN held to AVX512 without its
    bf16 instructions (or to AVX2: torch's reference loop) bf16 is slower on any CPU; a CPU with
    AMX or AVX512-BF16 runs the probe faster in bf16 than in fp32 with every kernel allowed."""
    import subprocess
    import sys

    from conftest import ROOT

    def probe(isa: str | None) -> float:
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        env.update({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})
        argv = [sys.executable, "-c", "from models.precision import cpu_bf16_speedup; print(cpu_bf16_speedup())"]
        out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert probe("AVX512_CORE") < 0.9
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if "amx_tile" in flags or "avx512_bf16" in flags:
        assert probe(None) > 0.9


def test_bf16_fast_mode(inference_codec, speech):
    x = _clip(speech, 48000)
    exact = inference_codec.encode(x, 4.0)
    precision.reset_warnings()
    speedup = precision.cpu_bf16_speedup()  # measured once: which branch runs depends on this CPU
    assert speedup > 0
    if speedup < 0.9:  # says once that fp32 is the faster choice here
        with pytest.warns(RuntimeWarning, match="float32 rate on this CPU"):
            fast = inference_codec.encode(x, 4.0, precision="bf16")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # fast bf16 here: no warning
            fast = inference_codec.encode(x, 4.0, precision="bf16")
    assert fast.shape == exact.shape and fast.dtype == torch.long
    _assert_codes_differ_only_at_near_ties(inference_codec, x, exact[0], fast[0])
    audio = inference_codec.decode(exact, precision="bf16")
    assert audio.dtype == torch.float32
    assert _rel(audio, inference_codec.decode(exact)) < 0.05
    with pytest.raises(ValueError, match="precision"):
        inference_codec.encode(x, 4.0, precision="fp16")
