"""Generated bad and unusual inputs through inference.py: nothing crashes, nothing is lost."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

import inference
from conftest import read_asset


def _write_corpus(root):
    speech = read_asset("speech_en.flac")[:16000]
    root.mkdir()
    good = {}

    def add(name, data, rate, **kw):
        sf.write(root / name, data, rate, **kw)
        good[name] = round(len(data) * 16000 / rate)

    add("silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    add("six_channel.wav", np.tile(speech[:, None], (1, 6)) * np.linspace(0.2, 1, 6), 16000)
    import soxr

    add("rate8k.wav", soxr.resample(speech, 16000, 8000), 8000)
    add("rate48k.flac", soxr.resample(speech, 16000, 48000), 48000)
    add("pcm24.wav", speech, 16000, subtype="PCM_24")
    add("float32.wav", speech, 16000, subtype="FLOAT")
    bad = {}
    (root / "not_audio.wav").write_text("this is a text file with an audio extension\n" * 20)
    bad["not_audio.wav"] = "cannot read audio"
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    bad["empty.wav"] = "empty audio"
    sf.write(root / "shorter_than_a_frame.wav", speech[:50], 16000)
    bad["shorter_than_a_frame.wav"] = "too short"
    nan = speech.copy()
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    bad["nan.wav"] = "NaN or Inf"
    inf = speech.copy()
    inf[5] = np.inf
    sf.write(root / "inf.wav", inf, 16000, subtype="FLOAT")
    bad["inf.wav"] = "NaN or Inf"
    # A FLAC cut in the middle of its frames: header fine, data missing.
    sf.write(root / "full.flac", speech, 16000)
    blob = (root / "full.flac").read_bytes()
    (root / "full.flac").unlink()
    (root / "truncated.flac").write_bytes(blob[: len(blob) // 3])
    # A FIFO named like audio: reading it would block forever.
    os.mkfifo(root / "pipe.wav")
    bad["pipe.wav"] = "not a regular file"
    return good, bad


@pytest.mark.parametrize("batch_size", [1, 4])
def test_directory_of_bad_and_unusual_files(tmp_path, release_dir, batch_size, capsys):
    good, bad = _write_corpus(tmp_path / "in")
    code = inference.main(
        ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--codes-out", str(tmp_path / "codes"),
         "--checkpoint", str(release_dir / "model.pth"), "--batch-size", str(batch_size)]
    )
    err = capsys.readouterr().err
    assert code == 1  # some files failed
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    for name, reason in bad.items():
        assert any(name in ln and reason in ln for ln in errors), (name, err)
        assert not (tmp_path / "out" / name).with_suffix(".wav").exists()
    for name, frames in good.items():
        out = (tmp_path / "out" / name).with_suffix(".wav")
        audio, rate = sf.read(out, dtype="float32")
        assert rate == 16000 and audio.ndim == 1
        assert abs(len(audio) - frames) <= 2, name
        assert np.isfinite(audio).all()
        assert np.load((tmp_path / "codes" / name).with_suffix(".npy")).shape[0] == 8
    # libsndfile may read the readable part of a truncated FLAC or refuse it; either way it
    # is reported or written, and never crashes the run.
    truncated_reported = any("truncated.flac" in ln for ln in errors)
    assert truncated_reported != (tmp_path / "out" / "truncated.wav").exists()
    assert len(errors) == len(bad) + truncated_reported


def test_decoding_random_codes_is_finite(release_dir):
    import torch

    from models import XCodec

    model = XCodec.from_pretrained(release_dir / "model.pth")
    codes = torch.randint(0, model.bins, (2, model.n_q, 40), generator=torch.Generator().manual_seed(0))
    audio = model.decode(codes)
    assert audio.shape == (2, 1, 40 * 320) and bool(torch.isfinite(audio).all())
    silence = model.decode(model.encode(torch.zeros(1, 1, 16000)))
    assert bool(torch.isfinite(silence).all())
