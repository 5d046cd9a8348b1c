"""Tokenizing a corpus with inference.py: manifests, resuming, sharding, kills, symlinks."""

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
from corpus.codes import (
    CodesFileError,
    check_corpus,
    iter_corpus,
    load_codes,
    merge_manifests,
    read_manifest,
)
from models import XCodec
from utils.files import temporary_target


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """Our export (model.safetensors + config.yaml) of a random tiny codec."""
    from models.export import save_export

    return save_export(make_tiny_codec(), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def model(export_dir) -> XCodec:
    return XCodec.from_pretrained(export_dir)


def _corpus(root, n: int = 6, seconds: float = 0.6, broken: bool = False) -> list[str]:
    """n short clips of real speech in a small tree; returns their relative stems."""
    wav = read_asset("speech_en.flac")
    rels = []
    for i in range(n):
        rel = f"spk{i % 2}/utt{i}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        start = 2000 * i
        sf.write(root / f"{rel}.flac", wav[start : start + int(seconds * 16000) + 97 * i], 16000)
        rels.append(rel)
    if broken:
        (root / "spk0" / "broken.wav").write_bytes(b"RIFF....WAVEfmt not audio")
    return rels


def _expected_codes(model, root, rel, bandwidth=None) -> np.ndarray:
    wav = sf.read(root / f"{rel}.flac", dtype="float32")[0]
    return model.encode(torch.from_numpy(wav)[None, None] * model.audio_norm_scale, bandwidth)[0].numpy()


def _manifest_lines(root) -> list[dict]:
    lines = []
    for path in sorted(root.glob("manifest*.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


# ---------------------------------------------------------------------------- helper
def test_load_codes_returns_checked_long_tensor(tmp_path):
    np.save(tmp_path / "ok.npy", np.array([[1, 2, 3], [0, 1023, 5]], dtype=np.int16))
    codes = load_codes(tmp_path / "ok.npy", bins=1024)
    assert codes.dtype == torch.int64 and codes.shape == (2, 3) and codes[1, 1] == 1023
    assert load_codes(tmp_path / "ok.npy", 8, 1024, n_q=2, frames=3).shape == (2, 3)
    cases = {
        "float": (np.zeros((2, 3), np.float32), {}, "integers"),
        "shape": (np.zeros((2, 3, 4), np.int16), {}, "shape (n_q, frames)"),
        "range": (np.full((2, 3), 1024, np.int16), {}, "[0, 1024)"),
        "negative": (np.full((2, 3), -1, np.int16), {}, "[0, 1024)"),
        "n_q": (np.zeros((2, 3), np.int16), {"n_q": 4}, "expected 4 codebooks"),
        "frames": (np.zeros((2, 3), np.int16), {"frames": 7}, "expected 7 frames"),
    }
    for name, (array, kwargs, needle) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(CodesFileError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_codes(tmp_path / f"{name}.npy", bins=1024, **kwargs)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(CodesFileError, match="not a readable"):
        load_codes(tmp_path / "junk.npy")


# ---------------------------------------------------------------------------- in process
def test_corpus_manifest_resume_and_settings_clash(tmp_path, export_dir, model, capsys):
    src, out = tmp_path / "corpus", tmp_path / "codes"
    rels = _corpus(src, n=4, broken=True)
    argv = ["--input", str(src), "--codes-out", str(out), "--checkpoint", str(export_dir), "--batch-size", "3", "-b", "2"]
    assert inference.main(argv) == 1  # the broken file is reported and skipped
    err = capsys.readouterr().err
    assert "broken.wav" in err and "4 file(s) written, 1 failed/skipped" in err and "audio hours per hour" in err

    lines = _manifest_lines(out)
    assert [p.name for p in out.glob("manifest*")] == ["manifest.jsonl"]
    assert sorted(e["path"] for e in lines) == sorted(f"{r}.flac" for r in rels)
    for entry, codes in iter_corpus(out):
        rel = entry["path"][: -len(".flac")]
        assert entry["codes"] == f"{rel}.npy" and entry["n_q"] == 4 and entry["bandwidth"] == 2.0 and entry["bins"] == 1024
        assert entry["checkpoint"].startswith("xcodec-") and entry["sample_rate"] == 16000
        assert entry["precision"] == "fp32" and entry["device"] == "cpu"
        assert entry["duration"] == pytest.approx(sf.info(src / entry["path"]).duration)
        assert np.array_equal(codes.numpy(), _expected_codes(model, src, rel, 2.0))
        assert entry["frames"] == codes.shape[1] == int(model.num_frames(entry["samples"]))

    # Rerun: nothing to do. Remove one codes file: only that one is redone.
    assert inference.main(argv) == 1
    assert "0 file(s) written, 1 failed/skipped, 4 already done" in capsys.readouterr().err
    (out / f"{rels[2]}.npy").unlink()
    assert inference.main(argv) == 1
    assert "1 file(s) written, 1 failed/skipped, 3 already done" in capsys.readouterr().err
    assert len(read_manifest(out)) == 4 and check_corpus(out) == (4, [])

    # Another bandwidth into the same directory is refused with one line; nothing changes.
    before = (out / "manifest.jsonl").read_text()
    assert inference.main([*argv[:-2], "-b", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds codes" in err[0] and "2.0 kbps" in err[0]
    assert (out / "manifest.jsonl").read_text() == before
    # So is another precision: bf16 codes must not mix with fp32 ones.
    assert inference.main([*argv, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds codes" in err[0] and "in fp32" in err[0] and "in bf16" in err[0]
    assert (out / "manifest.jsonl").read_text() == before


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_llasa_format_writes_one_flat_codebook_as_llasa_reads_it(tmp_path, export_dir, model, capsys):
    """--format llasa: one 1-D <rel>.wav.npy per clip, the npy format's codes at one codebook (0.5 kbps)."""
    src, npy, out, fresh = tmp_path / "corpus", tmp_path / "npy", tmp_path / "llasa", tmp_path / "refused"
    rels = _corpus(src, n=4)
    argv = ["--input", str(src), "--checkpoint", str(export_dir), "--batch-size", "3", "-b", "0.5"]
    assert inference.main([*argv, "--codes-out", str(npy)]) == 0
    assert inference.main([*argv, "--codes-out", str(out), "--format", "llasa"]) == 0
    assert "4 file(s) written, 0 failed/skipped" in capsys.readouterr().err
    for rel in rels:
        codes = np.load(out / f"{rel}.wav.npy")
        assert codes.ndim == 1 and codes.dtype.kind == "i" and np.array_equal(codes, np.load(npy / f"{rel}.npy")[0])
        assert np.array_equal(codes, _expected_codes(model, src, rel, 0.5)[0])
        # What LLaSA_training reads (data_instruction/get_memmap_from_token.py, commit 263e14b0): code_root joined with
        # the clip id (metadata.csv's first column) + '.wav.npy', np.load(allow_pickle=True), skipped if ndim != 1,
        # then base_num + torch.tensor(codes, dtype=torch.long), base_num = len(tokenizer) (Llama 3.2 + 8 tokens).
        code_file = os.path.join(out, rel + ".wav.npy")
        assert os.path.exists(code_file) and np.load(code_file, allow_pickle=True).ndim == 1
        ids = 128264 + torch.tensor(np.load(code_file, allow_pickle=True), dtype=torch.long)
        assert torch.equal(ids - 128264, torch.from_numpy(codes.astype(np.int64)))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == sorted(f"{r}.wav.npy" for r in rels)
    # An npy corpus of its own: its reader, its check and its resume.
    assert all(e["format"] == "llasa" and e["n_q"] == 1 and e["codes"].endswith(".wav.npy") for e in read_manifest(out))
    assert check_corpus(out) == (4, [])
    for entry, codes in iter_corpus(out):
        assert np.array_equal(codes.numpy(), np.load(npy / entry["codes"].replace(".wav.npy", ".npy")))
    assert inference.main([*argv, "--codes-out", str(out), "--format", "llasa"]) == 0
    assert "0 file(s) written, 0 failed/skipped, 4 already done" in capsys.readouterr().err

    # Refused with one line, nothing written, no input changed: more than one codebook, or the other per-file format.
    inputs, tokenized = _files(src), _files(out)
    for codes_out, extra, needle in ((fresh, ["-b", "2"], "has 4 codebooks: pass --bandwidth 0.5 (one codebook)"),
                                     (out, ["-b", "4"], "has 8 codebooks: pass --bandwidth 0.5"),
                                     (out, ["--format", "npy"], "holds a llasa corpus; this run writes --format npy"),
                                     (npy, [], "holds a npy corpus; this run writes --format llasa")):  # fmt: skip
        fmt = [] if "--format" in extra else ["--format", "llasa"]
        assert inference.main([*argv, "--codes-out", str(codes_out), *fmt, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert _files(src) == inputs and _files(out) == tokenized and _files(fresh) == {}


def test_reader_workers_and_length_order_give_the_same_codes(tmp_path, export_dir, model, capsys):
    """Files read by DataLoader workers, longest first, in batches: the codes of each file alone."""
    src = tmp_path / "corpus"
    rels = _corpus(src, n=5, broken=True)
    out = tmp_path / "codes"
    argv = ["--input", str(src), "--codes-out", str(out), "--checkpoint", str(export_dir), "--batch-size", "3", "--workers", "2"]
    assert inference.main(argv) == 1
    err = capsys.readouterr().err
    assert "broken.wav" in err and "5 file(s) written, 1 failed/skipped" in err  # a worker's failure is reported, once
    for rel in rels:
        assert np.array_equal(np.load(out / f"{rel}.npy"), _expected_codes(model, src, rel).astype(np.int16)), rel
    assert check_corpus(out) == (5, [])


def test_symlinks_never_put_outputs_outside_the_output_root(tmp_path, export_dir, capsys):
    outside = tmp_path / "outside"
    _corpus(outside, n=2)
    src = tmp_path / "corpus"
    _corpus(src, n=1)
    (src / "linked.flac").symlink_to(outside / "spk1" / "utt1.flac")  # a file link: followed
    (src / "linked_dir").symlink_to(outside / "spk0")  # a directory link: not descended
    (src / "up").mkdir()
    (src / "up" / "escape.flac").symlink_to(outside / "spk0" / "utt0.flac")
    rec, codes = tmp_path / "rec", tmp_path / "codes"
    before = sorted(p.relative_to(tmp_path).as_posix() for p in outside.rglob("*"))
    argv = ["--input", str(src / ".." / "corpus"), "--output", str(rec), "--codes-out", str(codes), "--checkpoint", str(export_dir)]
    code = inference.main(argv)
    assert code == 0 and "3 file(s) written" in capsys.readouterr().err
    assert sorted(p.relative_to(rec).as_posix() for p in rec.rglob("*") if not p.name.startswith(".xcodec.")) == ["linked.wav", "spk0", "spk0/utt0.wav", "up", "up/escape.wav"]
    assert sorted(e["path"] for e in read_manifest(codes)) == ["linked.flac", "spk0/utt0.flac", "up/escape.flac"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in outside.rglob("*")) == before

    # An output tree whose subdirectory links outside: refused before anything is written.
    rec2 = tmp_path / "rec2"
    rec2.mkdir()
    (rec2 / "spk0").symlink_to(outside / "spk0", target_is_directory=True)
    code = inference.main(["--input", str(src), "--output", str(rec2), "--checkpoint", str(export_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "escape" in err[0]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in outside.rglob("*")) == before
    assert sorted(p.name for p in rec2.iterdir()) == ["spk0"]


# ---------------------------------------------------------------------------- processes
# Runs inference.main in a child process whose np.save sleeps inside the atomic write
# (before the rename), so that a SIGKILL lands while a codes file is being written.
SLOW_CHILD = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
real_save = np.save
def slow_save(*a, **k):
    real_save(*a, **k)
    time.sleep({delay})
np.save = slow_save
import inference
sys.exit(inference.main(sys.argv[1:]))
"""


def _child(argv, env_extra: dict, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    code = SLOW_CHILD.format(root=str(ROOT), delay=delay)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_ranks_shard_and_a_killed_rank_is_finished_by_a_rerun(tmp_path, export_dir, model, capsys):
    """RANK/WORLD_SIZE processes split the corpus; rank 0 is SIGKILLed mid-write; the same
    command run again (here as one process) finishes it: no missing, duplicated or partial files."""
    src, out = tmp_path / "corpus", tmp_path / "codes"
    rels = _corpus(src, n=8, seconds=0.4)
    argv = ["--input", src, "--codes-out", out, "--checkpoint", export_dir]
    rank0 = _child(argv, {"RANK": "0", "WORLD_SIZE": "2"}, delay=1.0)
    rank1 = _child(argv, {"RANK": "1", "WORLD_SIZE": "2"}, delay=0.0)
    mine = {Path(r).name + ".npy" for r in sorted(rels)[0::2]}  # rank 0's codes files

    def rank0_mid_write() -> bool:  # one file done and the next one inside its atomic write
        manifest = out / "manifest.rank0.jsonl"
        done = manifest.is_file() and manifest.read_text().strip()
        return bool(done) and any(temporary_target(t.name) in mine for t in out.rglob(".*.tmp"))

    try:
        deadline = time.time() + 120
        while not rank0_mid_write():
            assert time.time() < deadline and rank0.poll() is None, "rank 0 did not get there in time"
            time.sleep(0.02)
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(timeout=30)
        assert rank1.wait(timeout=120) == 0, rank1.stderr.read()
        assert "file(s) written" not in rank1.stderr.read()  # rank 0 summarises; its 4 files: the manifest below
    finally:
        for proc in (rank0, rank1):
            if proc.poll() is None:
                proc.kill()
    def paths(name):
        return [json.loads(x)["path"] for x in (out / name).read_text().splitlines() if x.strip()]

    assert sorted(paths("manifest.rank1.jsonl")) == [f"{r}.flac" for r in sorted(rels)[1::2]]
    done0 = paths("manifest.rank0.jsonl")
    assert 1 <= len(done0) < 4 and set(done0) <= {f"{r}.flac" for r in sorted(rels)[0::2]}, done0
    assert list(out.rglob(".*.tmp")), "the kill should have landed inside an atomic write"
    for path in out.rglob("*.npy"):  # whatever is visible is complete
        if not path.name.startswith("."):
            load_codes(path, bins=1024, n_q=8)

    # The rerun (one process now) finishes exactly the missing files.
    assert inference.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert f"{4 - len(done0)} file(s) written, 0 failed/skipped, {4 + len(done0)} already done" in err
    assert check_corpus(out) == (8, [])  # every file once, none partial, no temporaries
    paths = [e["path"] for e in _manifest_lines(out)]
    assert sorted(paths) == sorted(f"{r}.flac" for r in rels) and len(set(paths)) == len(paths)
    for entry, codes in iter_corpus(out):
        assert np.array_equal(codes.numpy(), _expected_codes(model, src, entry["path"][: -len(".flac")]))
    merge_manifests(out)
    assert [p.name for p in out.glob("manifest*")] == ["manifest.jsonl"] and len(read_manifest(out)) == 8


def test_codes_cli_reports_problems(tmp_path, capsys):
    from corpus.codes import main as codes_main

    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "x.npy", np.zeros((2, 5), np.int16))
    np.save(tmp_path / "stray.npy", np.zeros((2, 5), np.int16))
    entry = {"path": "a/x.flac", "codes": "a/x.npy", "n_q": 2, "frames": 6, "bins": 1024}
    (tmp_path / "manifest.rank0.jsonl").write_text(json.dumps(entry) + "\n" + '{"path": "torn')  # torn last line
    assert codes_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "expected 6 frames" in err and "stray.npy: codes file not in any manifest" in err
    assert ASSETS.is_dir()


def test_resume_is_keyed_on_input_root_size_and_mtime(tmp_path, export_dir, model, capsys):
    root_a, root_b, out = tmp_path / "rootA", tmp_path / "rootB", tmp_path / "codes"
    rels = _corpus(root_a, n=3)
    _corpus(root_b, n=3, seconds=0.9)  # the same relative names, other audio
    argv = ["--input", str(root_a), "--codes-out", str(out), "--checkpoint", str(export_dir)]
    assert inference.main(argv) == 0
    capsys.readouterr()
    tokenized = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    # Another input root into the same codes: refused, nothing changes.
    assert inference.main(["--input", str(root_b), *argv[2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds codes of files under" in err[0] and str(root_a) in err[0]
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == tokenized
    # An input edited after tokenizing is tokenized again; the others are skipped.
    edited = root_a / f"{rels[1]}.flac"
    sf.write(edited, read_asset("speech_en.flac")[5000:5000 + 12000], 16000)
    os.utime(edited, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert inference.main(argv) == 0
    assert "1 file(s) written, 0 failed/skipped, 2 already done (skipped), 1 changed since tokenized (redone)" in capsys.readouterr().err
    for entry, codes in iter_corpus(out):
        assert np.array_equal(codes.numpy(), _expected_codes(model, root_a, entry["path"][: -len(".flac")]))
    assert check_corpus(out) == (3, [])


def test_codes_in_restores_source_lengths_and_batches_exactly(tmp_path, export_dir, capsys):
    src, codes, rec1, rec4 = tmp_path / "corpus", tmp_path / "codes", tmp_path / "rec1", tmp_path / "rec4"
    rels = _corpus(src, n=5)
    assert inference.main(["--input", str(src), "--codes-out", str(codes), "--checkpoint", str(export_dir)]) == 0
    assert inference.main(["--codes-in", str(codes), "--output", str(rec1), "--checkpoint", str(export_dir)]) == 0
    assert inference.main(["--codes-in", str(codes), "--output", str(rec4), "--checkpoint", str(export_dir), "--batch-size", "4"]) == 0
    capsys.readouterr()
    for rel in rels:
        one = sf.read(rec1 / f"{rel}.wav", dtype="int16")[0]
        assert len(one) == sf.info(str(src / f"{rel}.flac")).frames  # trimmed to the source, not whole frames
        assert np.array_equal(one, sf.read(rec4 / f"{rel}.wav", dtype="int16")[0])  # a batch equals its items alone
    # A single codes file from the corpus finds its manifest too.
    single = tmp_path / "one.wav"
    assert inference.main(["--codes-in", str(codes / f"{rels[0]}.npy"), "--output", str(single), "--checkpoint", str(export_dir)]) == 0
    assert sf.info(str(single)).frames == sf.info(str(src / f"{rels[0]}.flac")).frames


def test_malformed_manifests_and_one_codes_file_for_two_inputs_are_reported(tmp_path, export_dir, capsys):
    out = tmp_path / "codes"
    out.mkdir()
    np.save(out / "a.npy", np.zeros((2, 5), dtype=np.int16))
    line = {"codes": "a.npy", "n_q": 2, "frames": 5, "bins": 1024, "samples": 1600, "sample_rate": 16000}
    (out / "manifest.jsonl").write_text("".join(json.dumps({**line, "path": p}) + "\n" for p in ("a.b.wav", "a.b.flac")))
    n, problems = check_corpus(out)
    assert n == 2 and any("written for two inputs" in p for p in problems)
    from corpus.codes import main as codes_main

    assert codes_main([str(out)]) == 1
    assert "written for two inputs" in capsys.readouterr().err
    (out / "manifest.jsonl").write_bytes(b'{"path": "a\xff.wav"}\n')
    before = (out / "manifest.jsonl").read_bytes()
    assert codes_main([str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8" in err[0]
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "x.wav", read_asset("speech_en.flac")[:8000], 16000)
    code = inference.main(["--input", str(tmp_path / "in"), "--codes-out", str(out), "--checkpoint", str(export_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not UTF-8" in err[0] and "Traceback" not in err[0]
    assert (out / "manifest.jsonl").read_bytes() == before
