"""Token streams: Megatron-LM's own reader opens our export; silent wrong results refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import inference
from conftest import ASSETS, ROOT, make_tiny_codec
from corpus.codes import iter_corpus
from corpus.tokens import TokenStream, export_stream, flatten


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory) -> Path:
    """Real speech and music tokenized by inference.py with a tiny codec: an npy corpus of 3 files."""
    from models.export import save_export

    tmp = tmp_path_factory.mktemp("tokens")
    export = save_export(make_tiny_codec(), tmp / "export")
    audio = tmp / "audio"
    audio.mkdir()
    for name in ("speech_en.flac", "speech_cn_4s.flac", "music_4s.flac"):
        (audio / name).write_bytes((ASSETS / name).read_bytes())
    assert inference.main(["--input", str(audio), "--codes-out", str(tmp / "codes"), "--checkpoint", str(export)]) == 0
    return tmp / "codes"


def _cli(*args: str, module: str = "corpus.tokens") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _one_line_refusal(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.mark.parametrize("layout,offsets", [("frame-major", True), ("codebook-major", False)])
def test_megatron_indexed_dataset_reads_each_file_exactly(tmp_path, codes_dir, layout, offsets):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = tmp_path / "train"
    meta = export_stream(codes_dir, prefix, layout, offsets)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.idx", "train.json"]
    expected = {e["path"]: c.numpy() for e, c in iter_corpus(codes_dir)}
    ds = IndexedDataset(str(prefix))  # Megatron-LM's reader (NeMo's and YuE's fine-tuning read the same format)
    assert len(ds) == len(expected) == len(meta["files"]) == 3
    assert ds.index.dtype == np.int16 and ds.document_indices.tolist() == [0, 1, 2, 3]
    stream = TokenStream.open(prefix)
    for i, f in enumerate(meta["files"]):
        want = flatten(expected[f["path"]], layout, 1024, offsets)
        assert np.array_equal(ds[i].astype(np.int64), want) and np.array_equal(stream[i], want)
        assert np.array_equal(stream.codes(i).numpy(), expected[f["path"]])
    if offsets:  # codebook k of frame 0 is k * 1024 + code
        first = expected[meta["files"][0]["path"]]
        assert ds[0][:8].tolist() == [int(first[k, 0]) + 1024 * k for k in range(8)]


def test_streams_of_earlier_versions_still_open(tmp_path, codes_dir):
    prefix = tmp_path / "old"
    meta = export_stream(codes_dir, prefix)
    ends = np.cumsum([0] + [meta["n_q"] * f["frames"] for f in meta["files"]])
    (tmp_path / "old.idx").unlink()
    np.save(tmp_path / "old.idx.npy", ends.astype(np.int64))  # what export wrote before the Megatron index
    stream = TokenStream.open(prefix)
    assert stream.index.tolist() == ends.tolist()
    assert all(np.array_equal(stream.codes(i).numpy(), c.numpy()) for i, (_, c) in enumerate(iter_corpus(codes_dir)))
    np.save(tmp_path / "old.idx.npy", ends[[0, 2, 1, 3]].astype(np.int64))  # not monotonic
    _one_line_refusal(_cli("check", str(prefix)), "old.idx.npy", "increasing")
    # A new export over it replaces the old index: no stale .idx.npy left to mislead a reader.
    assert _cli("export", str(codes_dir), str(prefix)).returncode == 0
    assert not (tmp_path / "old.idx.npy").exists() and _cli("check", str(prefix)).returncode == 0


def test_codes_beyond_int16_need_their_bins_and_are_never_wrapped(tmp_path, codes_dir):
    entry, codes = next(iter_corpus(codes_dir))
    big = codes.numpy().astype(np.int32) * 40  # a 65536-entry codebook: codes up to ~41k, past int16
    assert big.max() >= 2**15
    np.save(tmp_path / "big.npy", big)  # no sidecar: nothing records the codebook size
    prefix = tmp_path / "out" / "big"
    _one_line_refusal(_cli("export", str(tmp_path / "big.npy"), str(prefix)), "big.npy", ">= bins 1024", "--bins")
    assert not prefix.parent.exists() or not list(prefix.parent.iterdir())  # nothing written
    proc = _cli("export", str(tmp_path / "big.npy"), str(prefix), "--bins", "65536")
    assert proc.returncode == 0, proc.stderr
    stream = TokenStream.open(prefix)
    assert stream.meta["dtype"] == "int32" and np.array_equal(stream.codes(0).numpy(), big)
    # --bins never overrides what a corpus records
    _one_line_refusal(
        _cli("export", str(codes_dir), str(tmp_path / "x"), "--bins", "65536"), "1024 bins", "--bins says 65536"
    )


@pytest.mark.parametrize("layout,offsets", [("frame-major", True), ("codebook-major", False)])
def test_xcodec2_corpus_streams_int32_tokens_within_its_65536_vocabulary(tmp_path, xcodec2_dir, layout, offsets):
    """An X-Codec 2 webdataset corpus (one codebook of 65,536, codes past int16) as a token stream that
    Megatron-LM and our reader give back exactly, every id in [0, 65536)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("speech_en.flac", "music_4s.flac"):
        (audio / name).write_bytes((ASSETS / name).read_bytes())
    codes_out = tmp_path / "codes"
    argv = ["--input", str(audio), "--codes-out", str(codes_out), "--checkpoint", str(xcodec2_dir)]
    assert inference.main([*argv, "--format", "webdataset"]) == 0
    expected = {e["path"]: c.numpy() for e, c in iter_corpus(codes_out)}
    assert max(int(c.max()) for c in expected.values()) >= 2**15
    meta = export_stream(codes_out, tmp_path / "train", layout, offsets)
    assert (meta["n_q"], meta["bins"], meta["dtype"]) == (1, 65536, "int32")
    ds, stream = IndexedDataset(str(tmp_path / "train")), TokenStream.open(tmp_path / "train")
    assert ds.index.dtype == np.int32 and len(ds) == len(stream) == len(expected) == 2
    for i, f in enumerate(meta["files"]):
        codes = expected[f["path"]]
        assert np.array_equal(ds[i].astype(np.int64), codes[0]) and np.array_equal(stream[i], codes[0])
        assert 0 <= ds[i].min() and ds[i].max() < meta["n_q"] * meta["bins"]
        assert np.array_equal(stream.codes(i).numpy(), codes)
    assert _cli("check", str(tmp_path / "train")).returncode == 0


def test_codes_at_or_above_bins_with_offsets_are_refused_naming_the_file(tmp_path, codes_dir):
    _, codes = next(iter_corpus(codes_dir))
    bad = codes.numpy().copy()
    bad[0, 5] = 1500  # with --offsets this would read as codebook 1's code 476
    np.save(tmp_path / "bad.npy", bad)
    (tmp_path / "stream.bin").write_bytes(b"earlier output")
    _one_line_refusal(
        _cli("export", str(tmp_path / "bad.npy"), str(tmp_path / "stream"), "--offsets"), "bad.npy", "1500"
    )
    assert (tmp_path / "stream.bin").read_bytes() == b"earlier output"
    assert not (tmp_path / "stream.idx").exists() and not (tmp_path / "stream.json").exists()


def test_inconsistent_index_or_description_is_refused_in_one_line(tmp_path, codes_dir):
    prefix = tmp_path / "s"
    export_stream(codes_dir, prefix)
    idx, meta_text = (tmp_path / "s.idx").read_bytes(), (tmp_path / "s.json").read_text()
    n = 3
    pointers_at = 34 + 4 * n  # header, then int32 lengths, then int64 byte pointers
    swapped = bytearray(idx)
    swapped[pointers_at + 8 : pointers_at + 16], swapped[pointers_at + 16 : pointers_at + 24] = (
        idx[pointers_at + 16 : pointers_at + 24],
        idx[pointers_at + 8 : pointers_at + 16],
    )
    (tmp_path / "s.idx").write_bytes(bytes(swapped))
    _one_line_refusal(_cli("check", str(prefix)), "s.idx", "pointers")
    (tmp_path / "s.idx").write_bytes(idx)
    for change, words in (
        ({"dtype": "object"}, ("s.json", "'object'")),  # np.memmap would read raw pointers
        ({"dtype": "int32"}, ("s.idx", "int16")),
        ({"n_q": 4}, ("s.idx", "files")),
    ):
        (tmp_path / "s.json").write_text(json.dumps({**json.loads(meta_text), **change}))
        _one_line_refusal(_cli("check", str(prefix)), *words)
    (tmp_path / "s.json").write_text(meta_text)
    with open(tmp_path / "s.bin", "ab") as fh:
        fh.write(b"\0\0")
    _one_line_refusal(_cli("check", str(prefix)), "s.bin", "bytes")


def test_old_module_paths_run_the_moved_commands_for_one_release(tmp_path, codes_dir):
    """``python -m utils.tokens`` / ``utils.codes`` (aliases of corpus.tokens / corpus.codes) give the same
    files, output and exit status, bad input included."""
    for module in ("corpus.tokens", "utils.tokens"):
        proc = _cli("export", str(codes_dir), str(tmp_path / module), "--offsets", module=module)
        assert proc.returncode == 0 and "3 file(s)" in proc.stdout, proc.stderr
    for ext in (".bin", ".idx", ".json"):
        assert (tmp_path / f"corpus.tokens{ext}").read_bytes() == (tmp_path / f"utils.tokens{ext}").read_bytes()
    _one_line_refusal(_cli("check", str(tmp_path / "absent"), module="utils.tokens"), "absent")
    new, old = (_cli(str(codes_dir), module=m) for m in ("corpus.codes", "utils.codes"))
    assert new.returncode == old.returncode == 0, old.stderr
    assert new.stdout == old.stdout == "3 file(s) in the corpus, 0 problem(s)\n"
    _one_line_refusal(_cli(str(tmp_path / "absent"), module="utils.codes"), "not a directory")
