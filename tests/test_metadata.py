"""Our own metadata (manifest lines, codes sidecars, shard rows and index lines, token-stream
descriptions) is checked by one schema wherever it is read: a corrupt file is one line naming it,
exit 2 for a check, a failed file where files are processed; --merge never hides missing ranks
or lost shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import inference
from conftest import make_tiny_codec, read_asset
from corpus.codes import main as codes_main
from corpus.codes import read_manifest
from corpus.shards import ShardWriter
from corpus.tokens import export_stream
from corpus.tokens import main as tokens_main

SETTINGS = {
    "checkpoint": "xcodec-test",
    "bandwidth": 4.0,
    "precision": "fp32",
    "input_root": "/in",
    "bins": 1024,
    "n_q": 2,
}


def _row(i: int) -> dict:
    return {"path": f"spk/u{i}.wav", "n_q": 2, "frames": 5, "samples": 1600, "sample_rate": 16000, "duration": 0.1,
            "bandwidth": 4.0, "bins": 1024, "checkpoint": "xcodec-test", "precision": "fp32"}  # fmt: skip


def _corpus(root, fmt: str, rank: int = 0, world_size: int = 1, files: int = 3) -> None:
    """A corpus written by the real shard writer (codes of 2 codebooks, 5 frames per file)."""
    writer = ShardWriter(root, fmt, rank, 10, {**SETTINGS, "world_size": world_size})
    for i in range(files):
        writer.add(
            _row(i), np.full((2, 5), i, np.int16), {"path": _row(i)["path"], "source_size": 10, "source_mtime_ns": 1}
        )
    writer.close()


def _rewrite_tar(path, edit) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name.endswith(".json"):
                data = json.dumps(edit(json.loads(data))).encode()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def _null_n_q(root) -> None:
    shard = next(root.glob("shard-*.parquet"))
    table = pq.read_table(shard)
    column = table.schema.get_field_index("n_q")
    pq.write_table(table.set_column(column, "n_q", [[None] * table.num_rows]).cast(table.schema), shard)


def _index_line(root, edit) -> None:
    index = root / "index.rank0.jsonl"
    index.write_text("".join(json.dumps(edit(json.loads(line))) + "\n" for line in index.read_text().splitlines()))


CORRUPT_INDEX = {
    "index line without files": lambda r: _index_line(r, lambda e: {k: v for k, v in e.items() if k != "files"}),
    "index file without path": lambda r: _index_line(r, lambda e: {**e, "files": [{}]}),
    "index line is a list": lambda r: _index_line(r, lambda e: [e]),
    "index line outside the corpus": lambda r: _index_line(r, lambda e: {**e, "shard": "../outside.parquet"}),
}
INDEX_NEEDLES = ["index.rank0.jsonl:1: files: missing", "index.rank0.jsonl:1: files[0]: path: missing",
                 "index.rank0.jsonl:1: expected a JSON object, got list", "'../outside.parquet' is not a shard file name"]  # fmt: skip


@pytest.mark.parametrize("case,needle", zip(CORRUPT_INDEX, INDEX_NEEDLES))
def test_a_corrupt_index_is_one_line_and_exit_2(tmp_path, capsys, case, needle):
    root = tmp_path / "codes"
    _corpus(root, "parquet")
    (tmp_path / "outside.parquet").write_bytes((root / "shard-r000-000001.parquet").read_bytes())  # never read
    CORRUPT_INDEX[case](root)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    for argv in ([str(root), "--check"], [str(root), "--merge"]):
        assert codes_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(root) in err[0] and "Traceback" not in err[0], err
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


CORRUPT_SHARD = {
    "parquet n_q null": ("parquet", _null_n_q, "shard-r000-000001.parquet: row 1: n_q: missing"),
    "tar json without path": ("webdataset", lambda r: _rewrite_tar(next(r.glob("*.tar")), lambda e: {k: v for k, v in e.items() if k != "path"}), ".json: path: missing"),
    "tar json is a list": ("webdataset", lambda r: _rewrite_tar(next(r.glob("*.tar")), lambda e: [e]), ".json: expected a JSON object, got list"),
}  # fmt: skip


@pytest.mark.parametrize("case", CORRUPT_SHARD)
def test_corrupt_shard_rows_are_a_problem_for_check_and_one_line_for_readers(tmp_path, capsys, case):
    fmt, corrupt, needle = CORRUPT_SHARD[case]
    root = tmp_path / "codes"
    _corpus(root, fmt)
    corrupt(root)
    assert codes_main([str(root), "--check"]) == 1  # a corpus with a problem, listed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert tokens_main(["export", str(root), str(tmp_path / "stream" / "P")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "stream" / "P.bin").exists()


def test_a_token_stream_description_without_files_is_one_line(tmp_path, capsys):
    root = tmp_path / "codes"
    _corpus(root, "parquet")
    export_stream(root, tmp_path / "P")
    meta = json.loads((tmp_path / "P.json").read_text())
    del meta["files"]
    (tmp_path / "P.json").write_text(json.dumps(meta))
    assert tokens_main(["check", str(tmp_path / "P")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'P.json'}: files: missing" in err[0], err


def test_merge_refuses_missing_ranks_and_keeps_lost_shards(tmp_path, capsys):
    root = tmp_path / "codes"
    _corpus(root, "parquet", rank=3, world_size=16)  # only rank 3 of 16 ran
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    assert codes_main([str(root), "--merge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank(s) 0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 of 16 have not run" in err[0], (
        err
    )
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert codes_main([str(root), "--merge", "--allow-missing"]) == 0 and (root / "index.jsonl").is_file()
    capsys.readouterr()
    # A shard deleted before the merge: the merge is refused and its index line stays.
    lost = tmp_path / "lost"
    _corpus(lost, "parquet", files=3)
    _corpus(lost, "parquet", files=1)  # a second shard: the first is no longer the rank's last line
    first = sorted(lost.glob("shard-*.parquet"))[0]
    first.unlink()
    index = (lost / "index.rank0.jsonl").read_bytes()
    assert codes_main([str(lost), "--check"]) == 1
    assert f"{first.name} (3 file(s)), which does not exist" in capsys.readouterr().err
    assert codes_main([str(lost), "--merge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{first.name} (3 file(s)), which does not exist" in err[0], err
    assert (lost / "index.rank0.jsonl").read_bytes() == index and not (lost / "index.jsonl").exists()


def test_npy_merge_refuses_missing_ranks(tmp_path, capsys):
    root = tmp_path / "codes"
    root.mkdir()
    np.save(root / "u0.npy", np.zeros((2, 5), np.int16))
    line = {**_row(0), "codes": "u0.npy", "world_size": 4}
    (root / "manifest.rank1.jsonl").write_text(json.dumps(line) + "\n")
    (root / "manifest.rank2.jsonl").write_text("")  # ran, with nothing to do
    assert codes_main([str(root), "--merge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank(s) 0, 3 of 4 have not run" in err[0], err
    assert not (root / "manifest.jsonl").exists() and (root / "manifest.rank1.jsonl").is_file()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from models.export import save_export

    return save_export(make_tiny_codec(), tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize(
    "edit,needle",
    [({"samples": 9_600_000}, "samples 9600000 disagrees with 50 frames"),
     ({"samples": 10**18}, "samples 1000000000000000000 disagrees with 50 frames"),
     ({"samples": -5}, "samples: must be >= 1"),
     ({"frames": "50"}, "frames: expected int")],
)  # fmt: skip
def test_a_corrupt_codes_sidecar_is_refused(tmp_path, export_dir, capsys, edit, needle):
    src = tmp_path / "a.wav"
    sf.write(src, read_asset("speech_en.flac")[:16000], 16000)
    codes = tmp_path / "a.npy"
    assert inference.main(["--checkpoint", str(export_dir), "--input", str(src), "--codes-out", str(codes)]) == 0
    side = codes.with_suffix(".json")
    assert json.loads(side.read_text())["samples"] == 16000
    side.write_text(json.dumps({**json.loads(side.read_text()), **edit}))
    capsys.readouterr()
    code = inference.main(
        ["--checkpoint", str(export_dir), "--codes-in", str(codes), "--output", str(tmp_path / "o.wav")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(side) in err[0] and needle in err[0], err
    assert not (tmp_path / "o.wav").exists()


def test_a_dataset_row_with_a_negative_rate_fails_that_row_only(tmp_path, export_dir, capsys, monkeypatch):
    import datasets

    wav = read_asset("speech_en.flac")[:16000]
    rows = {
        "id": ["good", "bad"],
        "audio": [{"array": wav, "sampling_rate": 16000}, {"array": wav, "sampling_rate": -16000}],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = [
        "--checkpoint",
        str(export_dir),
        "--input",
        str(tmp_path / "hf"),
        "--codes-out",
        str(tmp_path / "codes"),
        "--workers",
        "1",
    ]
    assert inference.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "bad" in err[0] and "sample rate must be a positive integer, got -16000" in err[0], err
    assert [e["path"] for e in read_manifest(tmp_path / "codes")] == ["good.wav"]


def test_a_corrupt_manifest_entry_fails_its_file_only(tmp_path, export_dir, capsys):
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        sf.write(tmp_path / "in" / f"{name}.wav", read_asset("speech_en.flac")[:16000], 16000)
    codes = tmp_path / "codes"
    assert (
        inference.main(["--checkpoint", str(export_dir), "--input", str(tmp_path / "in"), "--codes-out", str(codes)])
        == 0
    )
    lines = [json.loads(line) for line in (codes / "manifest.jsonl").read_text().splitlines()]
    lines = [{**e, "samples": 9_600_000} if e["path"] == "a.wav" else e for e in lines]
    (codes / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    capsys.readouterr()
    code = inference.main(
        ["--checkpoint", str(export_dir), "--codes-in", str(codes), "--output", str(tmp_path / "out")]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (
        code == 1 and len(err) == 1 and "samples 9600000 disagrees with 50 frames" in err[0] and "(a.wav)" in err[0]
    ), err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.wav")) == ["b.wav"]
    assert sf.info(str(tmp_path / "out" / "b.wav")).frames == 16000
