"""Training data: file lists, crops, resampling, bad clips reported (never raised), resumable sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data import AudioSegmentDataset, DataError, ResumableSampler, build_loader, list_audio_files

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


def make_bad_files(directory: Path) -> dict[str, Path]:
    """One file of every kind of broken audio the loader must survive."""
    directory.mkdir(parents=True, exist_ok=True)
    good = sf.read(str(ASSETS / "speech_cn_4s.flac"), dtype="float32")[0]
    truncated = directory / "truncated.flac"
    sf.write(str(truncated), good, 16000)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 8])  # header intact, most frames gone
    not_audio = directory / "not_audio.wav"
    not_audio.write_text("this is a text file with a .wav extension\n" * 20)
    empty = directory / "empty.wav"
    empty.write_bytes(b"")
    nan = directory / "nan.wav"
    samples = np.zeros(16000, dtype=np.float32)
    samples[100:200] = np.nan
    sf.write(str(nan), samples, 16000, subtype="FLOAT")
    zero_frames = directory / "zero_frames.wav"
    sf.write(str(zero_frames), np.zeros(0, dtype=np.float32), 16000)
    return {"truncated": truncated, "not_audio": not_audio, "empty": empty, "nan": nan, "zero_frames": zero_frames, "missing": directory / "missing.wav"}


def test_file_list_and_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    sf.write(str(tmp_path / "sub" / "a.wav"), np.zeros(100, np.float32), 16000)
    sf.write(str(tmp_path / "b.flac"), np.zeros(100, np.float32), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    assert [Path(p).name for p in list_audio_files(tmp_path)] == ["b.flac", "a.wav"]
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n\nsub/a.wav\n/abs/x.wav\n")
    monkeypatch.chdir(ROOT)
    files = list_audio_files(lst)
    assert files == [str(tmp_path / "sub" / "a.wav"), "/abs/x.wav"]  # relative to the list when not in cwd
    assert list_audio_files(ASSETS / "train.txt")[0] == "tests/assets/speech_en.flac"  # relative to cwd
    with pytest.raises(DataError):
        list_audio_files(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(DataError):
        list_audio_files(tmp_path / "empty.txt")


def test_resample_mono_scale_and_pad(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1).astype(np.float32) * 0.5
    path = tmp_path / "stereo_8k.wav"
    sf.write(str(path), stereo, 8000, subtype="FLOAT")
    ds = AudioSegmentDataset([str(path)], segment_size=20000, sample_rate=16000, audio_norm_scale=0.95)
    item = ds[0]
    wav = item["wav"]
    assert item["ok"] and wav.shape == (1, 20000)
    assert torch.all(wav[0, 16100:] == 0)  # 1 s at 16 kHz, then zero padding
    assert abs(float(wav[0, 1000:15000].abs().max()) - 0.5 * 0.95) < 0.01  # mono mix, scaled


def test_random_crops_are_seeded_and_validation_crops_fixed():
    files = [str(ASSETS / "speech_en.flac")]
    train = AudioSegmentDataset(files, 6400, 16000, random_crop=True, seed=7)
    a, b = train[(0, 0)]["wav"], train[(0, 0)]["wav"]
    assert torch.equal(a, b)  # same (seed, epoch, index): same crop, whatever the worker
    starts = {train.crop_start(78480, 0, epoch) for epoch in range(10)}
    assert len(starts) > 5  # a new crop each epoch
    valid = AudioSegmentDataset(files, 6400, 16000, random_crop=False)
    assert valid.crop_start(78480, 0, 0) == valid.crop_start(78480, 0, 9) == (78480 - 6400) // 2


def test_bad_clips_come_back_flagged_not_raised(tmp_path):
    bad = make_bad_files(tmp_path)
    ds = AudioSegmentDataset([str(p) for p in bad.values()] + [str(ASSETS / "music_4s.flac")], 6400, 16000)
    for i, (kind, path) in enumerate(bad.items()):
        item = ds[i]
        assert not item["ok"], kind
        assert str(path) in item["error"], (kind, item["error"])
        assert item["wav"].shape == (1, 6400) and torch.all(item["wav"] == 0)
    assert ds[len(bad)]["ok"]


def test_sampler_resumes_mid_epoch_and_shards():
    ds = AudioSegmentDataset([f"f{i}.wav" for i in range(10)], 100, 16000)
    full = ResumableSampler(ds, num_replicas=1, rank=0, seed=3)
    full.set_position(4)
    order = list(full)
    assert all(epoch == 4 for _, epoch in order) and sorted(i for i, _ in order) == list(range(10))
    full.set_position(4, skip=6)
    assert list(full) == order[6:] and len(full) == 4
    full.set_position(5)
    assert [i for i, _ in full] != [i for i, _ in order]
    shards = [ResumableSampler(ds, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in shards:
        s.set_position(4)
    a, b = ([i for i, _ in s] for s in shards)
    assert not set(a) & set(b) and len(a) == len(b) == 5


def test_loader_batches_carry_flags(tmp_path):
    bad = make_bad_files(tmp_path)
    files = [str(ASSETS / "speech_en.flac"), str(bad["nan"]), str(ASSETS / "music_4s.flac")]
    ds = AudioSegmentDataset(files, 3200, 16000)
    loader, sampler = build_loader(ds, 3, 0, 0, 1, shuffle=False, seed=0, drop_last=True)
    sampler.set_position(0)
    (batch,) = list(loader)
    assert batch["wav"].shape == (3, 1, 3200)
    assert batch["ok"].tolist() == [True, False, True]
    assert "NaN" in batch["error"][1]
    with pytest.raises(DataError):
        build_loader(ds, 1, 0, 0, 4, shuffle=True, seed=0, drop_last=True)
