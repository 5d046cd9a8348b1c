"""X-Codec 2 (models.xcodec2) on real audio: codes and audio against transformers' ``Xcodec2Model`` (tiny, random
weights), ragged batches, every checkpoint layout (transformers', the pip package's, the Lightning .ckpt, the hub
names) and the code range. The original layouts are built here from the original key names
(zhenye234/X-Codec-2.0, the xcodec2 pip package), not with models.xcodec2_layout."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import SeamlessM4TFeatureExtractor

from benchmarks.bench_xcodec2 import TINY
from conftest import TINY_CONFIG, add_to_hub_cache, read_asset
from models import CheckpointError, CodesError, XCodec, XCodec2, build_codec, load_codec, load_generator_config
from models.pipeline import Pipeline
from modules.bigcodec import kaiser_sinc_filter

HOP = 320
TINY_XCODEC2 = {"model_type": "xcodec2", **TINY}  # the tiny architecture as a transformers config.json
# The pip package's config.json (BigCodecConfig): it describes no architecture but the released one.
PIP_CONFIG = {"model_type": "xcodec", "semantic_hidden_size": 1024, "codec_encoder_hidden_size": 1024,
              "codec_decoder_hidden_size": 1024, "use_vocos": True, "architectures": ["XCodec2Model"]}  # fmt: skip
# What the Lightning module saves besides the codec (lightning_module.py), dropped on loading.
TRAINING_ONLY = {k: torch.randn(4, 3) for k in (
    "discriminator.discriminators.0.convs.0.weight", "spec_discriminator.discriminators.0.conv.weight", "fc_post_s.weight",
    "model_spk.feature_extract.weight", "SemanticDecoder_module.initial_conv.weight", "criteria.mel_loss.mel_transforms.0.spectrogram.window")}  # fmt: skip


def clip(name: str, start: int = 0, length: int | None = None) -> np.ndarray:
    wav = read_asset(name)
    return np.ascontiguousarray(wav[start : None if length is None else start + length])


def hf_reference(hf, wav: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' codes (1, 1, F) and audio of one clip, features as X-Codec 2 computes them: the clip padded to
    the next multiple of the hop (a whole hop if it is one), fbank of that with hop/2 zeros on each side."""
    x = torch.from_numpy(wav)[None]
    x = F.pad(x, (0, HOP - x.shape[-1] % HOP))
    fe = SeamlessM4TFeatureExtractor(padding_value=1.0)
    features = fe(F.pad(x, (HOP // 2, HOP // 2)).numpy(), sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        codes = hf.encode(x[:, None], features).audio_codes
        return codes, hf.decode(codes).audio_values


# ---------------------------------------------------------------------------- 1. against transformers
@pytest.mark.parametrize("name,start,length", [
    ("speech_en.flac", 0, None),  # 78480 samples: 245 hops + 80
    ("speech_cn_4s.flac", 16000, 100 * HOP),  # an exact multiple of the hop: one whole hop of padding
    ("music_4s.flac", 8000, 60 * HOP + 319),  # one sample short of a multiple
    ("speech_en.flac", 8000, 4817),  # 0.3 s
])  # fmt: skip
def test_codes_and_audio_are_transformers(hf_xcodec2, xcodec2, name, start, length):
    wav = clip(name, start, length)
    ref_codes, ref_audio = hf_reference(hf_xcodec2, wav)
    codes = xcodec2.encode(torch.from_numpy(wav)[None, None])
    assert codes.shape == ref_codes.shape == (1, 1, len(wav) // HOP + 1) == (1, 1, int(xcodec2.num_frames(len(wav))))
    assert torch.equal(codes, ref_codes.long())
    assert len(codes.unique()) > codes.shape[-1] // 4  # codes vary: the comparison means something
    audio = xcodec2.decode(ref_codes)
    assert audio.shape == ref_audio.shape and float((audio - ref_audio).abs().max()) < 1e-5


# ---------------------------------------------------------------------------- 2. ragged batches
# transformers' own padded batch (Xcodec2FeatureExtractor's layout built by hand, as it needs torchaudio: each clip
# padded as alone, zero-padded to the longest, padding_mask over its samples + 1; its SeamlessM4T features padded
# with 1.0 and stacked, input_features_mask over its frames), measured once on these three clips with the tiny
# random model: the longest clip's codes equal its single-clip codes; the two shorter clips differ in their last
# frames (6 of 101 and 3 of 53: the acoustic encoder's convolutions see the zeros past each clip), and its
# audio_codes_mask marks (samples + 1) // 320 frames, one fewer than the clip alone gives. Its decode takes no
# mask: the padded items' audio differs from their audio alone by up to 0.26 (peak 0.24). Ours gives each clip
# exactly its codes and audio alone.
def ragged_clips() -> list[torch.Tensor]:
    return [torch.from_numpy(c) for c in (clip("speech_en.flac", 0, 32123), clip("speech_cn_4s.flac", 0, 48005),
                                          clip("music_4s.flac", 0, 16640))]  # fmt: skip


def test_ragged_batch_gives_each_clip_its_codes_and_audio_alone(xcodec2):
    clips = ragged_clips()
    lengths = [len(c) for c in clips]
    alone = [xcodec2.encode(c[None, None])[0] for c in clips]
    audio_alone = [xcodec2.decode(a[None])[0] for a in alone]
    batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)[:, None]
    codes = xcodec2.encode(batch, lengths=lengths)
    frames = xcodec2.num_frames(torch.tensor(lengths))
    assert codes.shape == (3, 1, int(frames.max())) and frames.tolist() == [a.shape[-1] for a in alone]
    with torch.inference_mode():  # the padded group (off CPU, bf16) goes through the same per-clip pass
        grouped = xcodec2._encode_pass(batch, None, torch.tensor(lengths), "fp32")
    audio = xcodec2.decode(codes, frames=frames)
    for i, (a, y) in enumerate(zip(alone, audio_alone)):
        assert torch.equal(codes[i, :, : a.shape[-1]], a) and torch.equal(grouped[i, :, : a.shape[-1]], a)
        torch.testing.assert_close(audio[i, :, : y.shape[-1]], y, atol=1e-6, rtol=0)
        assert not audio[i, :, y.shape[-1] :].any()
    pipe = Pipeline(xcodec2)
    pipe_codes = pipe.encode(clips)
    assert all(torch.equal(p, a) for p, a in zip(pipe_codes, alone))
    out = pipe.decode(pipe_codes, lengths)
    assert [o.shape for o in out] == [(n,) for n in lengths]
    for o, y, n in zip(out, audio_alone, lengths):
        torch.testing.assert_close(o, y[0, :n], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- 3. checkpoint layouts
_UNIT = ("snake1", "conv1", "snake2", "conv2")  # an original ResidualUnit's block.{0,1,2,3}
_ADAPTER = ("initial_conv", "residual_blocks.1", "residual_blocks.3", "final_conv")  # SemanticEncoder_module's
_LAYER = {"input_layernorm": "att_norm", "post_attention_layernorm": "ffn_norm", "self_attn.o_proj": "att.c_proj"}
# transformers' names -> the original's (the facts' table read right to left); the first match applies.
_TO_ORIGINAL = [
    (r"^semantic_encoder\.", "semantic_model."),
    (r"^acoustic_encoder\.conv1\.", "CodecEnc.conv_blocks.0."),
    (r"^acoustic_encoder\.snake1\.", "CodecEnc.conv_final_block.0."),
    (r"^acoustic_encoder\.conv2\.", "CodecEnc.conv_final_block.1."),
    (r"^acoustic_encoder\.block\.(\d+)\.res_unit(\d)\.(\w+)\.",
     lambda m: f"CodecEnc.conv_blocks.{int(m[1]) + 1}.block.{int(m[2]) - 1}.block.{_UNIT.index(m[3])}."),
    (r"^acoustic_encoder\.block\.(\d+)\.(snake1|conv1)\.",
     lambda m: f"CodecEnc.conv_blocks.{int(m[1]) + 1}.block.{3 if m[2] == 'snake1' else 4}."),
    (r"^semantic_adapter\.conv(\d)\.", lambda m: f"SemanticEncoder_module.{_ADAPTER[int(m[1]) - 1]}."),
    (r"^fc_encoder\.", "fc_prior."),
    (r"^acoustic_decoder\.fc\.", "fc_post_a."),
    (r"^quantizer\.", "generator.quantizer."),
    (r"^acoustic_decoder\.norm\.", "generator.backbone.final_layer_norm."),
    (r"^acoustic_decoder\.head\.linear\.", "generator.head.out."),
    (r"^acoustic_decoder\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.o_proj)\.",
     lambda m: f"generator.backbone.transformers.{m[1]}.{_LAYER[m[2]]}."),
    (r"^acoustic_decoder\.layers\.", "generator.backbone.transformers."),
    (r"^acoustic_decoder\.", "generator.backbone."),
]  # fmt: skip


def to_original(hf_state: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """The pip package's model.safetensors (= the Lightning state_dict's codec part) of transformers' tensors."""
    out, g = {}, torch.Generator().manual_seed(1)
    for key, value in hf_state.items():
        qkv = re.match(r"^acoustic_decoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$", key)
        if qkv:  # one fused c_attn: q, k, v on dim 0, q and k back to interleaved-pair RoPE order
            q, k, v = (hf_state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj"))
            unrope = lambda w: w.view(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)  # noqa: E731
            out[f"generator.backbone.transformers.{qkv[1]}.att.c_attn.weight"] = torch.cat([unrope(q), unrope(k), v])
            continue
        if re.match(r"^acoustic_decoder\.layers\.\d+\.self_attn\.[kv]_proj\.weight$", key):
            continue
        pattern, repl = next((p, r) for p, r in _TO_ORIGINAL if re.search(p, key))
        name = re.sub(pattern, repl, key)
        if name.startswith("CodecEnc.") and name.endswith(".weight"):  # legacy weight norm, v of another scale
            v = value * (torch.rand(value.shape[0], 1, 1, generator=g) + 0.5)
            out[name[:-6] + "weight_g"], out[name[:-6] + "weight_v"] = value.flatten(1).norm(dim=1).view(-1, 1, 1), v
        else:
            out[name] = value.clone()
        if name.endswith(".act.alpha"):  # Activation1d's persistent up/down-sampling filters
            prefix = name[: -len("act.alpha")]
            for buffer in ("upsample.filter", "downsample.lowpass.filter"):
                out[prefix + buffer] = kaiser_sinc_filter(0.25, 0.3, 12)
    out["generator.head.istft.window"] = torch.hann_window(4 * HOP)
    layers = TINY_XCODEC2["semantic_model_config"]["num_hidden_layers"]
    for key in [k for k in out if k.startswith("semantic_model.encoder.layers.")]:  # w2v-BERT's later layers
        out[re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m[1]) + layers}.", key)] = torch.randn_like(out[key])
    return out


@pytest.fixture(scope="module")
def original_state(hf_xcodec2) -> dict[str, torch.Tensor]:
    return to_original(hf_xcodec2.state_dict(), TINY_XCODEC2["num_attention_heads"])


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "config.json"
    path.write_text(json.dumps(TINY_XCODEC2))
    return path


def pip_dir(path, state: dict[str, torch.Tensor]):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(PIP_CONFIG))
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    return path


def test_every_layout_loads_to_the_same_codes(xcodec2, xcodec2_dir, original_state, tiny_json, tmp_path, speech):
    assert {"CodecEnc.conv_blocks.0.weight_g", "CodecEnc.conv_blocks.5.block.4.weight_v",  # the fixture is as released
            "CodecEnc.conv_blocks.1.block.0.block.0.act.beta", "CodecEnc.conv_final_block.0.downsample.lowpass.filter",
            "generator.backbone.transformers.1.att.c_attn.weight", "semantic_model.encoder.layers.3.ffn1.output_dense.bias",
            "generator.head.istft.window", "SemanticEncoder_module.residual_blocks.3.bias"} <= set(original_state)  # fmt: skip
    assert original_state["CodecEnc.conv_blocks.0.weight_g"].shape == (8, 1, 1)
    wav = torch.from_numpy(speech[:16000])[None, None]
    ref_codes, ref_audio = xcodec2.encode(wav), xcodec2.decode(xcodec2.encode(wav))
    ckpt = tmp_path / "epoch=4-step=1400000.ckpt"
    torch.save({"state_dict": {**original_state, **TRAINING_ONLY}, "epoch": 4, "global_step": 1400000}, ckpt)
    layouts = [(xcodec2_dir, None), (pip_dir(tmp_path / "pip", original_state), tiny_json), (ckpt, tiny_json)]
    for path, config in layouts:
        model = load_codec(path, config)
        assert type(model) is XCodec2, path
        codes = model.encode(wav)
        assert torch.equal(codes, ref_codes), path
        assert float((model.decode(codes) - ref_audio).abs().max()) < 1e-5, path
        assert torch.equal(XCodec2.from_pretrained(path, config).encode(wav), ref_codes)


def test_release_name_and_hub_ids_resolve_through_an_offline_cache(monkeypatch, tmp_path, xcodec2, xcodec2_dir,
                                                                    original_state, tiny_json, speech):  # fmt: skip
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    for var, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(var, str(int(value)) if value is True else value)
        monkeypatch.setattr(huggingface_hub.constants, var, value)
    with pytest.raises(CheckpointError, match=r"could not get 'HKUSTAudio/xcodec2'.*HF_HUB_OFFLINE") as err:
        XCodec2.from_pretrained("xcodec2")
    assert "\n" not in str(err.value)
    files = lambda d: {n: (d / n).read_bytes() for n in ("config.json", "model.safetensors")}  # noqa: E731
    add_to_hub_cache(cache, "HKUSTAudio/xcodec2", files(pip_dir(tmp_path / "pip", original_state)))
    add_to_hub_cache(cache, "hf-audio/xcodec2", files(xcodec2_dir))
    wav = torch.from_numpy(speech[:8000])[None, None]
    for name, config in (("xcodec2", tiny_json), ("HKUSTAudio/xcodec2", tiny_json), ("hf-audio/xcodec2", None)):
        model = load_codec(name, config)
        assert type(model) is XCodec2 and torch.equal(model.encode(wav), xcodec2.encode(wav)), name


@pytest.mark.parametrize("key,change,needle", [
    ("generator.backbone.final_layer_norm.bias", None, "1 missing key(s): acoustic_decoder.norm.bias"),
    ("CodecEnc.conv_blocks.0.weight_v", None, "missing key(s): acoustic_encoder.conv1.weight"),
    ("generator.backbone.extra.weight", lambda _: torch.zeros(3), "1 unexpected key(s): acoustic_decoder.extra.weight"),
    ("fc_prior.weight", lambda w: w[:, 1:], "1 shape mismatch(es): fc_encoder.weight (96, 95) vs (96, 96)"),
])  # fmt: skip
def test_wrong_layouts_fail_in_one_line_naming_the_keys(tmp_path, original_state, tiny_json, key, change, needle):
    state = {k: v for k, v in original_state.items() if k != key}
    if change is not None:
        state[key] = change(original_state.get(key))
    with pytest.raises(CheckpointError, match=re.escape(needle)) as err:
        XCodec2.from_pretrained(pip_dir(tmp_path / "pip", state), tiny_json)
    assert "\n" not in str(err.value)


def test_each_class_refuses_the_others_checkpoint_and_load_codec_picks(tmp_path, xcodec2_dir):
    with pytest.raises(CheckpointError, match="an X-Codec 2 checkpoint") as err:
        XCodec.from_pretrained(xcodec2_dir)
    assert "\n" not in str(err.value)
    torch.save(build_codec(*load_generator_config(TINY_CONFIG)).state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="an X-Codec checkpoint, not X-Codec 2") as err:
        XCodec2.from_pretrained(tmp_path / "model.pth", TINY_CONFIG)
    assert "\n" not in str(err.value)
    assert type(load_codec(tmp_path / "model.pth", TINY_CONFIG)) is XCodec
    assert type(load_codec(xcodec2_dir)) is XCodec2


# ---------------------------------------------------------------------------- 4. codes
def test_one_codebook_of_65536_codes_at_0_8_kbps(xcodec2, speech):
    assert (xcodec2.bins, xcodec2.n_q, xcodec2.target_bandwidths, xcodec2.frame_rate) == (65536, 1, [0.8], 50)
    wav = torch.from_numpy(speech[:32000])[None, None]
    codes = xcodec2.encode(wav, bandwidth=0.8)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) < 65536
    assert torch.equal(codes, xcodec2.encode(wav))
    for bandwidth in (0.4, 1.5, 6.0):
        with pytest.raises(ValueError, match="bandwidth"):
            xcodec2.encode(wav, bandwidth=bandwidth)
    assert xcodec2.decode(torch.tensor([[[0, 65535, 12345]]])).shape == (1, 1, 3 * HOP)
    for bad in (65536, -1, 1 << 40):
        wrong = codes.clone()
        wrong[0, 0, 5] = bad
        with pytest.raises(CodesError, match=r"\[0, 65536\)"):
            xcodec2.decode(wrong)


def test_the_pip_layout_converts_to_a_directory_transformers_opens(hf_xcodec2, original_state, tiny_json, tmp_path):
    from transformers import Xcodec2Model

    from models.convert import main as convert_main

    dst = tmp_path / "hf"
    assert convert_main([str(pip_dir(tmp_path / "pip", original_state)), str(dst), "--config", str(tiny_json)]) == 0
    hf, info = Xcodec2Model.from_pretrained(str(dst), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = hf_xcodec2.state_dict()  # the weights the pip layout was made from (weight norm folds within rounding)
    assert all(torch.allclose(v, ref[k], rtol=1e-5, atol=1e-6) for k, v in hf.state_dict().items()
               if not re.search(r"self_attn\.[qk]_proj", k))  # fmt: skip  (q, k: rows in RoPE order, same scores)
    wav = clip("speech_en.flac", 0, None)
    codes, audio = hf_reference(hf.eval(), wav)
    ref_codes, ref_audio = hf_reference(hf_xcodec2, wav)
    assert torch.equal(codes, ref_codes) and len(torch.unique(codes)) > 20
    assert float((audio - ref_audio).abs().max()) < 1e-4
