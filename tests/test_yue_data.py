"""yue_data.py: songs -> YuE's fine-tuning input, checked as YuE's own preprocessing checks it
(finetune/tools/codecmanipulator.py, finetune/core/preprocess_data_conditional_xcodec_segment.py),
with YuE's codec in its file layout (random weights, tests/test_yue.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import soxr
import test_yue
import torch

import yue_data
from conftest import read_asset
from models import XCodec

yue = test_yue.yue  # the stand-in YuE codec repository (module fixture)

XCODEC_OFFSET, XCODEC_RANGE = 45334, (45334, 57621)  # YuE's mm tokenizer: xcodec ids


def _npy2ids(codes: np.ndarray, quantizer_begin: int, n_quantizer: int) -> list[int]:
    """YuE's CodecManipulator("xcodec", quantizer_begin, n_quantizer).npy2ids, its checks as assertions."""
    assert codes.ndim == 2
    assert codes.max() < 1024 and codes.min() >= 0
    assert codes.shape[0] == 12 or codes.shape[0] == n_quantizer  # all of YuE's codebooks, or exactly the rows used
    x = codes.astype(np.uint32)
    for k in range(quantizer_begin, quantizer_begin + n_quantizer):
        x[k] += XCODEC_OFFSET + k * 1024
    ids = x[quantizer_begin : quantizer_begin + n_quantizer].T.reshape(-1)  # 'K T -> (T K)'
    assert XCODEC_RANGE[0] <= ids.min() and ids.max() <= XCODEC_RANGE[1]
    return ids.tolist()


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """Three songs of real speech (vocals) over real music: 'a' at 16 kHz with its text, 'b' at
    44.1 kHz with a mix and no text (in a subdirectory), 'c' with stems of different lengths."""
    root = tmp_path_factory.mktemp("songs")
    speech, music = read_asset("speech_en.flac")[:64000], read_asset("music_4s.flac")
    sf.write(root / "a.vocals.flac", speech, 16000)
    sf.write(root / "a.instrumental.flac", music, 16000)
    (root / "a.json").write_text(json.dumps({
        "genres": ["male", "pop"], "msa": [{"start": 0, "end": 1.5, "label": "verse"}, {"start": 1.5, "end": 4.0, "label": "chorus"}],
        "lyrics": [{"start": 0.0, "end": 1.53, "text": "[verse]\nhello"}, {"start": 1.53, "end": 3.99, "text": "[chorus]\nworld"}],
    }))  # fmt: skip
    (root / "album").mkdir()
    v44, i44 = soxr.resample(read_asset("speech_cn_4s.flac"), 16000, 44100), soxr.resample(music, 16000, 44100)
    sf.write(root / "album" / "b.Vocals.wav", v44, 44100)
    sf.write(root / "album" / "b.Instrumental.wav", i44, 44100)
    sf.write(root / "album" / "b.wav", 0.5 * (v44 + i44), 44100)
    sf.write(root / "c.vocals.wav", speech, 16000)
    sf.write(root / "c.instrumental.wav", music[:48000], 16000)
    return root


def test_songs_become_yue_input_that_yues_checks_accept(yue, songs, tmp_path, capsys):
    root = yue[0]
    out = tmp_path / "yue"
    assert yue_data.main([str(songs), str(out), "--checkpoint", str(root), "--batch-size", "2"]) == 1  # 'c' left out
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "c:" in line or "/c" in line] == [
        "error: c: stems differ in sample rate or length (instrumental 48000 samples at 16000 Hz, vocals 64000 samples at 16000 Hz)"
    ]
    assert "2 song(s), 1 problem(s) above; without lyrics 1" in err and "without genres 1" in err
    lines = [json.loads(line) for line in (out / "jsonl" / "songs.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "album/b"]
    model = XCodec.from_pretrained(root)
    for line in lines:
        # the keys YuE's preprocessing reads (stage 1 CoT / ICL and stage 2)
        assert {
            "id",
            "codec",
            "vocals_codec",
            "instrumental_codec",
            "audio_length_in_sec",
            "msa",
            "genres",
            "splitted_lyrics",
        } <= set(line)
        arrays = {k: np.load(line[k]) for k in ("codec", "vocals_codec", "instrumental_codec")}
        frames = model.num_frames(
            round(line["audio_length_in_sec"] * 16000)
        ).item()  # our codec's frames for that length
        for key, codes in arrays.items():
            assert codes.dtype == np.int16 and codes.shape == (12, frames), key
            _npy2ids(codes, 0, 1)  # stage 1: CodecManipulator("xcodec", 0, 1)
            _npy2ids(codes[0:8], 0, 8)  # stage 2: rows 0-7
        assert 49 <= frames / line["audio_length_in_sec"] <= 51  # stage 1's fps check
        assert arrays["vocals_codec"].shape == arrays["instrumental_codec"].shape  # frame by frame
    a, b = lines
    assert math.isclose(a["audio_length_in_sec"], 4.0) and math.isclose(b["audio_length_in_sec"], 4.0, abs_tol=1e-4)
    assert a["genres"] == "male, pop" and a["msa"][1] == {"start": 1.5, "end": 4.0, "label": "chorus"}
    assert a["splitted_lyrics"]["segmented_lyrics"] == [
        {
            "offset": 0.0,
            "duration": 1.53,
            "codec_frame_start": 0,
            "codec_frame_end": 76,
            "line_content": "[verse]\nhello",
        },
        {
            "offset": 1.53,
            "duration": 2.46,
            "codec_frame_start": 76,
            "codec_frame_end": 199,
            "line_content": "[chorus]\nworld",
        },
    ]
    assert b["genres"] == "" and b["msa"] == [] and b["splitted_lyrics"] == {"segmented_lyrics": []}
    # Codes are the codec's: the mix of 'a' is the stems' sum, written once under out/mix.
    mix, _ = sf.read(out / "mix" / "a.wav", dtype="float32")
    assert np.allclose(mix, read_asset("speech_en.flac")[:64000] + read_asset("music_4s.flac"), atol=1e-6)
    want = model.encode(torch.from_numpy(read_asset("music_4s.flac"))[None, None] * model.audio_norm_scale, 6.0)[0]
    assert np.array_equal(np.load(a["instrumental_codec"]), want.numpy())
    # Resuming: nothing tokenized again; a text added later reaches the JSONL.
    (songs / "album" / "b.json").write_text(json.dumps({"genres": "female, ballad"}))
    before = {p: p.stat().st_mtime_ns for p in (out / "npy").rglob("*.npy")}
    assert yue_data.main([str(songs), str(out), "--checkpoint", str(root)]) == 1
    err = capsys.readouterr().err
    assert "0 file(s) written, 0 failed/skipped, 6 already done (skipped)" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "npy").rglob("*.npy")} == before
    assert [json.loads(x)["genres"] for x in (out / "jsonl" / "songs.jsonl").read_text().splitlines()] == [
        "male, pop",
        "female, ballad",
    ]


def test_bad_text_or_a_missing_stem_is_one_line_and_the_rest_goes_on(yue, tmp_path, capsys):
    songs = tmp_path / "songs"
    songs.mkdir()
    music = read_asset("music_4s.flac")
    for name in ("x.vocals.wav", "x.instrumental.wav", "y.vocals.wav", "z.vocals.wav", "z.instrumental.wav"):
        sf.write(songs / name, music, 16000)
    (songs / "z.json").write_text(json.dumps({"lyrics": [{"start": 3, "end": 1, "text": "backwards"}]}))
    assert yue_data.main([str(songs), str(tmp_path / "out"), "--checkpoint", str(yue[0])]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "y: no instrumental stem" in errors[0] and "z.json: lyrics must be a list" in errors[1]
    assert [json.loads(x)["id"] for x in (tmp_path / "out" / "jsonl" / "songs.jsonl").read_text().splitlines()] == ["x"]
    assert yue_data.main([str(tmp_path / "nowhere"), str(tmp_path / "out2"), "--checkpoint", str(yue[0])]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: not a directory of songs\n"
    assert not (tmp_path / "out2").exists()
