"""Corpus tokenization at scale: npy / parquet / webdataset from 2 ranks, read back by the real
datasets and webdataset libraries; a rank SIGKILLed mid-shard; token streams; input manifests
and Hugging Face datasets as inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import inference
from conftest import ASSETS, ROOT, make_tiny_codec, read_asset
from corpus.codes import CodesFileError, check_corpus, iter_corpus, load_codes, save_codes
from corpus.shards import ShardWriter, iter_shard, read_index
from corpus.tokens import TokenStream, export_stream
from models import XCodec

N_CLIPS = 40


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from models.export import save_export

    return save_export(make_tiny_codec(), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 clips of 1-12 s in a small tree: real speech (English, Mandarin) and music, tones,
    chirps and noise, at 16, 22.05 and 44.1 kHz."""
    root = tmp_path_factory.mktemp("corpus") / "audio"
    rng = np.random.default_rng(0)
    real = [read_asset(n) for n in ("speech_en.flac", "speech_cn_4s.flac", "music_4s.flac")]
    for i in range(N_CLIPS):
        seconds = [1.0, 1.3, 1.7, 2.2, 12.0][i % 5] if i % 10 else 3.0 + i / 10
        rate = (16000, 22050, 44100)[i % 3]
        t = np.arange(int(seconds * rate)) / rate
        kind = i % 4
        if kind == 0:  # real audio, looped to length
            src = real[i % 3]
            wav = np.resize(src, int(seconds * 16000))
            rate, t = 16000, np.arange(len(wav)) / 16000
        elif kind == 1:
            wav = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)
        elif kind == 2:
            wav = 0.3 * np.sin(2 * np.pi * (100 + 2000 * t / seconds) * t)
        else:
            wav = 0.1 * rng.standard_normal(len(t))
        path = root / f"spk{i % 3}" / f"clip{i:02d}.{('wav', 'flac')[i % 2]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wav.astype(np.float32), rate)
    return root


@pytest.fixture(scope="module")
def expected(corpus, export_dir) -> dict[str, torch.Tensor]:
    """The API's codes of every clip (what inference.py must write)."""
    from utils.audio import load_audio

    model = XCodec.from_pretrained(export_dir)
    out = {}
    for path in sorted(corpus.rglob("*.*")):
        wav, _ = load_audio(path, 16000)
        out[path.relative_to(corpus).as_posix()] = model.encode(torch.from_numpy(wav)[None, None] * model.audio_norm_scale)[0]
    return out


def _tokenize(src, out, export_dir, fmt: str, rank: int, world: int, monkeypatch, *extra: str) -> int:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["--input", str(src), "--codes-out", str(out), "--checkpoint", str(export_dir), "--format", fmt, "--batch-size", "4", *extra]
    return inference.main(argv)


def _assert_complete(out: Path, expected: dict[str, torch.Tensor]) -> None:
    seen = {}
    for entry, codes in iter_corpus(out):
        assert entry["path"] not in seen, f"{entry['path']} twice"
        seen[entry["path"]] = codes
        assert entry["n_q"] == codes.shape[0] == 8 and entry["frames"] == codes.shape[1] and entry["sample_rate"] == 16000
    assert sorted(seen) == sorted(expected)
    for path, codes in seen.items():
        assert torch.equal(codes, expected[path]), path
    n, problems = check_corpus(out)
    assert n == len(expected) and problems == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npy", "parquet", "webdataset"])
def test_two_ranks_tokenize_into_each_format_with_the_api_codes(tmp_path, corpus, export_dir, expected, fmt, capsys, monkeypatch):
    """Two processes (RANK/WORLD_SIZE, as a scheduler starts them) write into one directory at once."""
    out = tmp_path / "codes"
    argv = [sys.executable, str(ROOT / "inference.py"), "--input", str(corpus), "--codes-out", str(out), "--checkpoint", str(export_dir),
            "--format", fmt, "--batch-size", "4", "--shard-size", "7"]  # fmt: skip
    procs = [subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    errs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errs
    # One progress bar and one summary per job, rank 0's; rank 1 has nothing to say.
    assert "rank 0/2: 20 file(s) written" in errs[0] and "encoding:" in errs[0], errs[0][-2000:]
    assert "encoding" not in errs[1] and "written" not in errs[1], errs[1][-2000:]
    _assert_complete(out, expected)
    if fmt == "parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in out.glob("*.parquet")), split="train")
        assert ds.num_rows == N_CLIPS and {"path", "codes", "n_q", "frames", "samples", "sample_rate", "duration",
                                           "bandwidth", "checkpoint", "precision"} <= set(ds.column_names)  # fmt: skip
        for row in ds:
            assert torch.equal(torch.tensor(row["codes"]), expected[row["path"]])
        assert len(read_index(out)) == 6  # 20 files per rank in shards of 7: 7 + 7 + 6
    if fmt == "webdataset":
        import webdataset as wds

        samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode())
        assert len(samples) == N_CLIPS
        for s in samples:
            assert torch.equal(torch.from_numpy(s["codes.npy"].astype(np.int64)), expected[s["json"]["path"]])
    # A rerun finds everything done.
    assert _tokenize(corpus, out, export_dir, fmt, 0, 1, monkeypatch) == 0
    assert f"0 file(s) written, 0 failed/skipped, {N_CLIPS} already done" in capsys.readouterr().err


SLOW_SHARDS = """
import sys, time
import pyarrow.parquet as pq
sys.path.insert(0, {root!r})
real = pq.write_table
def slow(*a, **k):
    real(*a, **k)
    time.sleep(30)  # inside the shard's atomic write: before its index line and rename
pq.write_table = slow
import inference
sys.exit(inference.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_killed_mid_shard_is_finished_by_a_rerun_with_another_world_size(tmp_path, corpus, export_dir, expected, monkeypatch, capsys):
    out = tmp_path / "codes"
    argv = ["--input", str(corpus), "--codes-out", str(out), "--checkpoint", str(export_dir), "--format", "parquet", "--shard-size", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "2"}
    child = subprocess.Popen([sys.executable, "-c", SLOW_SHARDS.format(root=str(ROOT)), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not list(out.glob(".shard-r000-*.tmp")):  # the first shard is being written
            assert child.poll() is None and time.time() < deadline, child.stderr.read() if child.poll() is not None else "too slow"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    assert read_index(out) == [] and list(out.glob(".shard-*.tmp"))  # nothing finished, a partial shard left
    assert _tokenize(corpus, out, export_dir, "parquet", 1, 2, monkeypatch, "--shard-size", "5") == 0  # the other rank
    done = {e["shard"] for e in read_index(out)}
    # Rerun as 3 ranks: the killed rank's files are done exactly once, the temporary is gone.
    for rank in range(3):
        assert _tokenize(corpus, out, export_dir, "parquet", rank, 3, monkeypatch, "--shard-size", "5") == 0
    capsys.readouterr()
    shards = read_index(out)
    assert done <= {e["shard"] for e in shards} and sum(e["rows"] for e in shards if e["shard"] not in done) == 20
    assert not list(out.glob(".shard-*.tmp"))
    _assert_complete(out, expected)
    # A shard deleted after the run is a problem for --check and the readers (never files silently
    # missing), and a rerun writes its files again.
    lost = read_index(out)[0]
    (out / lost["shard"]).unlink()
    n, problems = check_corpus(out)
    assert n == len(expected) - lost["rows"] and len(problems) == 1 and f"{lost['shard']} ({lost['rows']} file(s)), which does not exist" in problems[0]
    with pytest.raises(CodesFileError, match="which does not exist"):
        next(iter_corpus(out))
    assert _tokenize(corpus, out, export_dir, "parquet", 0, 1, monkeypatch) == 0
    assert f"{lost['rows']} file(s) written" in capsys.readouterr().err
    _assert_complete(out, expected)


def test_token_streams_round_trip_to_the_same_codes(tmp_path, corpus, export_dir, expected, monkeypatch, capsys):
    out = tmp_path / "codes"
    assert _tokenize(corpus, out, export_dir, "webdataset", 0, 1, monkeypatch) == 0
    capsys.readouterr()
    for layout, offsets in (("frame-major", True), ("codebook-major", False)):
        prefix = tmp_path / "stream" / layout
        meta = export_stream(out, prefix, layout, offsets)
        stream = TokenStream.open(prefix)
        assert len(stream) == N_CLIPS and meta["dtype"] == "int16" and stream.tokens.dtype == np.int16
        for i, f in enumerate(meta["files"]):
            assert torch.equal(stream.codes(i), expected[f["path"]])
        first = expected[meta["files"][0]["path"]]
        if offsets:  # frame 0's codebooks first, codebook k shifted by k * bins
            assert stream[0][:8].tolist() == [int(first[k, 0]) + 1024 * k for k in range(8)]
        else:
            assert stream[0][:3].tolist() == first[0, :3].tolist()
    from corpus.tokens import main as tokens_main

    assert tokens_main(["check", str(tmp_path / "stream" / "frame-major")]) == 0


def test_manifests_and_hugging_face_datasets_as_inputs(tmp_path, corpus, export_dir, expected, monkeypatch, capsys):
    import datasets

    files = sorted(corpus.rglob("*.*"))[:6]
    rels = [f.relative_to(corpus).as_posix() for f in files]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": str(f), "id": f"u{i}", "duration": sf.info(str(f)).duration}) + "\n"
                                                 for i, f in enumerate(files)))  # fmt: skip
    (tmp_path / "list.csv").write_text("path,id\n" + "".join(f"{f},u{i}\n" for i, f in enumerate(files)))
    rows = {"id": [f"u{i}" for i in range(6)], "audio": [{"bytes": f.read_bytes(), "path": f.name} for f in files]}
    ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    from utils.audio import load_audio

    arrays = [{"array": load_audio(f, 16000)[0], "sampling_rate": 16000} for f in files]  # decoded samples, no files
    datasets.Dataset.from_dict({"id": rows["id"], "audio": arrays}).save_to_disk(str(tmp_path / "hf_arrays"))
    for source in ("list.jsonl", "list.csv", "hf", "hf.parquet", "hf_arrays"):
        out = tmp_path / f"codes_{source}"
        assert _tokenize(tmp_path / source, out, export_dir, "npy", 0, 1, monkeypatch) == 0, capsys.readouterr().err
        got = {e["path"]: c for e, c in iter_corpus(out)}
        suffix = [".wav"] * 6 if source == "hf_arrays" else [f.suffix for f in files]
        assert sorted(got) == sorted(f"u{i}{suffix[i]}" for i in range(6)), sorted(got)
        for i in range(6):
            assert torch.equal(got[f"u{i}{suffix[i]}"], expected[rels[i]]), (source, i)
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    code = _tokenize(tmp_path / "bad.jsonl", tmp_path / "bad", export_dir, "npy", 0, 1, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "row 1 has no 'path'" in err[0]


def test_duplicate_names_and_a_merge_during_a_run_are_refused(tmp_path, corpus, export_dir, monkeypatch, capsys):
    from corpus.codes import main as codes_main
    from utils.files import TreeLock

    files = sorted(corpus.rglob("*.wav"))[:2]
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps({"path": str(f), "id": "same"}) + "\n" for f in files))
    code = _tokenize(tmp_path / "dup.jsonl", tmp_path / "codes", export_dir, "parquet", 0, 1, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the same name same.wav" in err[0]
    assert not (tmp_path / "codes").exists() or not list((tmp_path / "codes").glob("shard-*"))
    out = tmp_path / "ok"
    assert _tokenize(corpus, out, export_dir, "webdataset", 0, 1, monkeypatch) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with TreeLock(out, rank=0, world_size=1):  # a run still writing
        assert codes_main([str(out), "--merge"]) == 2
    assert "still writing" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert codes_main([str(out), "--merge"]) == 0 and (out / "index.jsonl").is_file() and not list(out.glob("index.rank*.jsonl"))
    assert sum(1 for _ in iter_corpus(out)) == N_CLIPS


# ---------------------------------------------------------------------------- 65,536-entry codebooks (X-Codec 2)
XCODEC2_CLIPS = ("speech_en.flac", "speech_cn_4s.flac", "music_4s.flac")


@pytest.mark.parametrize("fmt", ["npy", "parquet", "webdataset"])
def test_codes_up_to_65535_round_trip_each_writer_and_reader(tmp_path, fmt):
    """Codes past int16 (a 65,536-entry codebook) come back exactly, never wrapped to negatives."""
    codes = np.array([[0, 1, 32767, 32768, 40000, 65534, 65535]])
    entry = {"path": "a.wav", "n_q": 1, "frames": 7, "samples": 7 * 320, "sample_rate": 16000, "duration": 0.14,
             "bandwidth": 0.8, "bins": 65536, "checkpoint": "x", "precision": "fp32"}  # fmt: skip
    if fmt == "npy":
        save_codes(tmp_path / "a.npy", codes, 65536)
        got = np.load(tmp_path / "a.npy")
        assert np.array_equal(load_codes(tmp_path / "a.npy", 1, 65536).numpy(), codes)
    else:
        writer = ShardWriter(tmp_path, fmt, 0, 10, {"bins": 65536})
        writer.add(entry, codes, {"path": "a.wav"})
        writer.close()
        [(row, got)] = list(iter_shard(next(tmp_path.glob("shard-*"))))
        assert row["path"] == "a.wav" and check_corpus(tmp_path) == (1, [])
        assert [c.tolist() for _, c in iter_corpus(tmp_path)] == [codes.tolist()]
    assert got.dtype.kind == "i" and got.tolist() == codes.tolist()


def test_xcodec2_corpora_in_each_format_hold_the_api_codes_past_int16(tmp_path, xcodec2_dir, xcodec2, monkeypatch, capsys):
    """Real audio tokenized by inference.py with the tiny X-Codec 2 (one codebook of 65,536): every format
    (and the datasets / webdataset libraries) reads back the codes of ``xcodec2.encode`` of each clip alone."""
    import datasets
    import webdataset as wds

    from utils.audio import load_audio

    src = tmp_path / "audio"
    src.mkdir()
    for name in XCODEC2_CLIPS:
        (src / name).write_bytes((ASSETS / name).read_bytes())
    expected = {name: xcodec2.encode(torch.from_numpy(load_audio(src / name, 16000)[0])[None, None])[0]
                for name in XCODEC2_CLIPS}  # fmt: skip
    assert max(int(c.max()) for c in expected.values()) >= 2**15  # the codes int16 would wrap
    for fmt in ("npy", "llasa", "parquet", "webdataset"):
        out = tmp_path / fmt
        assert _tokenize(src, out, xcodec2_dir, fmt, 0, 1, monkeypatch) == 0, capsys.readouterr().err
        got = {e["path"]: c for e, c in iter_corpus(out)}
        assert got.keys() == expected.keys(), fmt
        for path, codes in got.items():
            assert codes.shape[0] == 1 and torch.equal(codes, expected[path]), (fmt, path)
        assert check_corpus(out) == (len(XCODEC2_CLIPS), [])
    parquet = datasets.load_dataset("parquet", data_files=[str(p) for p in (tmp_path / "parquet").glob("*.parquet")],
                                    split="train")  # fmt: skip
    assert {row["path"]: torch.tensor(row["codes"]) for row in parquet}.keys() == expected.keys()
    assert all(torch.equal(torch.tensor(row["codes"]), expected[row["path"]]) for row in parquet)
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "webdataset").glob("*.tar")), shardshuffle=False).decode())
    assert len(samples) == len(XCODEC2_CLIPS)
    for s in samples:
        assert torch.equal(torch.from_numpy(s["codes.npy"].astype(np.int64)), expected[s["json"]["path"]])
