"""Device discipline without a GPU: a model on ``meta`` (shapes, no data) with inputs on CPU.

Every public path must move inputs to the model's device and create its own tensors
there: a tensor made on the CPU next to CUDA weights is the GPU-only crash these catch.
Also: exact mode computes in IEEE fp32 (TF32 off) and restores the process's flags.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_codec, read_asset
from models.precision import tf32_switches
from models.streaming import StreamingDecoder, decode_long, decode_many, encode_long, encode_many
from modules.teacher import first_conv_stats


@pytest.fixture(scope="module")
def meta_codec():
    return make_tiny_codec(weight_norm=False).to("meta")


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return torch.from_numpy(read_asset("speech_en.flac")[:16000])[None, None]


def test_encode_and_decode_move_inputs_to_the_model(meta_codec, clip):
    codes = meta_codec.encode(clip)  # CPU audio, meta model
    assert codes.device.type == "meta" and codes.shape == (1, 8, 50)
    batch = meta_codec.encode(torch.cat([clip, clip]), lengths=[16000, 12000])  # ragged: groups by length
    assert batch.device.type == "meta" and batch.shape == (2, 8, 50)
    cpu_codes = torch.zeros(2, 8, 50, dtype=torch.long)
    audio = meta_codec.decode(cpu_codes, frames=[50, 40])
    assert audio.device.type == "meta" and audio.shape == (2, 1, 16000)


def test_batches_long_files_and_streaming_on_the_model_device(meta_codec, clip):
    codes = encode_many(meta_codec, [clip[0, 0], clip[0, 0, :8000]], batch_size=2)
    assert [c.device.type for c in codes] == ["meta", "meta"] and [c.shape[-1] for c in codes] == [50, 25]
    audio = decode_many(meta_codec, [torch.zeros(8, 50, dtype=torch.long), torch.zeros(8, 30, dtype=torch.long)], batch_size=2)
    assert [a.device.type for a in audio] == ["meta", "meta"] and [a.shape[-1] for a in audio] == [16000, 9600]
    long = encode_long(meta_codec, torch.zeros(1, 1, 16000 * 12), window=4, context=1)  # windows + whole-file statistics
    assert long.device.type == "meta" and long.shape == (1, 8, 600)
    assert decode_long(meta_codec, torch.zeros(1, 8, 600, dtype=torch.long), window=100).device.type == "meta"
    dec = StreamingDecoder(meta_codec, lookahead=4)
    nothing = dec.push(torch.zeros(1, 8, 2, dtype=torch.long))  # nothing due yet: empty, on the model's device
    assert nothing.numel() == 0 and nothing.device.type == "meta"
    assert dec.flush().device.type == "meta" and StreamingDecoder(meta_codec).flush().device.type == "meta"


def test_first_conv_statistics_stay_on_the_input_device(meta_codec, clip):
    conv = meta_codec.semantic_model.feature_extractor.conv_layers[0].conv
    norm = meta_codec.semantic_model.feature_extractor.conv_layers[0].layer_norm
    mean, var = first_conv_stats(conv, norm, clip[:, 0].to("meta"))
    assert mean.device.type == var.device.type == "meta"
    assert all(t.device.type == "meta" for t in meta_codec.semantic_model.norm_stats(clip.to("meta")))


def test_exact_mode_turns_tf32_off_inside_and_restores_it(inference_codec, clip):
    seen = []

    def record(module, args):  # torch's newer API (the legacy getters refuse to read "ieee")
        seen.append([getattr(obj, name) for obj, name in tf32_switches()])

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    hooks = [inference_codec.encoder_semantic.register_forward_pre_hook(record), inference_codec.fc_post2.register_forward_pre_hook(record)]
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a user may have set them
        user = [getattr(obj, name) for obj, name in tf32_switches()]
        codes = inference_codec.encode(clip)
        inference_codec.decode(codes)
        assert len(seen) == 2 and all(v in ("ieee", False) for row in seen for v in row), seen  # IEEE fp32 inside
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
        seen.clear()
        inference_codec.encode(clip, precision="bf16")
        assert seen == [user]  # fast mode leaves them alone
        # A process that set the matmul precision through the newer API keeps to it.
        seen.clear()
        torch.set_float32_matmul_precision("high")
        inference_codec.encode(clip)
        assert all(v in ("ieee", False) for v in seen[0]) and torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision("highest")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        for h in hooks:
            h.remove()
