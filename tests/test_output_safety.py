"""What a run may do to the filesystem: never write through a link, leave no lock files, and
turn every OS or libsndfile error into one line (real runs of inference.py and training)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import soundfile as sf

import inference
from conftest import ASSETS, ROOT, TINY_CONFIG
from corpus.codes import check_corpus, read_manifest
from utils.files import TreeLock, atomic_directory, atomic_write, remove_stale_temporaries


@pytest.fixture(scope="module")
def ckpt(release_dir):
    return ["--checkpoint", str(release_dir / "model.pth")]


LOOP = "a symbolic link that leads nowhere (dangling, or a loop of links)"


def _run(argv, capsys) -> tuple[int, str]:
    code = inference.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def _clip(path, seconds: float = 0.5, offset: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = sf.read(ASSETS / "speech_en.flac", dtype="float32")[0]
    sf.write(path, wav[offset : offset + int(seconds * 16000)], 16000)


def _locks(*roots) -> list[str]:
    return sorted(p.name for root in roots for p in root.glob(".xcodec.*.lock"))


# ---------------------------------------------------------------------------- links
@pytest.mark.parametrize("name", [".xcodec.rank0.lock", "manifest.jsonl", "index.rank0.jsonl"])
def test_a_link_where_a_file_of_ours_belongs_is_refused_and_its_target_untouched(tmp_path, ckpt, name, capsys):
    """Each of these was written in place: the lock got the pid line, the torn-line trimmer
    truncated the manifest's or index's target and the appender wrote into it."""
    _clip(tmp_path / "in" / "a.flac")
    victim = tmp_path / "elsewhere" / "precious.txt"  # no final newline: a "torn line" to the trimmer
    victim.parent.mkdir()
    victim.write_bytes(b"someone else's bytes, no newline at the end")
    codes = tmp_path / "codes"
    codes.mkdir()
    (codes / name).symlink_to(victim)
    fmt = ["--format", "parquet"] if name.startswith("index") else []
    code, err = _run(["--input", tmp_path / "in", "--codes-out", codes, *fmt, *ckpt], capsys)
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and name in lines[0] and "symbolic link" in lines[0], err
    assert victim.read_bytes() == b"someone else's bytes, no newline at the end"
    assert (codes / name).is_symlink() and not list(codes.rglob("*.npy")) and not list(codes.glob("*.parquet"))
    assert _locks(codes) == ([name] if name.endswith(".lock") else [])  # the link only: no lock litter either


# ---------------------------------------------------------------------------- lock files
def test_no_lock_files_are_left_and_a_killed_runs_locks_are_taken_over(tmp_path, ckpt, capsys):
    src, rec, codes = tmp_path / "in", tmp_path / "rec", tmp_path / "codes"
    _clip(src / "a.flac")
    _clip(src / "b.flac", offset=5000)
    code, err = _run(["--input", src, "--output", rec, "--codes-out", codes, *ckpt], capsys)
    assert code == 0 and "2 file(s) written" in err, err
    assert _locks(rec, codes) == []
    # A killed run leaves its lock files (nobody holds them): the next run takes them over,
    # then deletes them, those of another process count included.
    for root in (rec, codes):
        (root / ".xcodec.rank0.lock").write_text("pid 1 on elsewhere, rank 0 of 1")
        (root / ".xcodec.world2.lock").write_text("")
        (root / ".xcodec.rank1.lock").write_text("pid 2 on elsewhere, rank 1 of 2")
    code, err = _run(["--input", src, "--output", rec, "--codes-out", codes, "--overwrite", *ckpt], capsys)
    assert code == 0 and "2 already done" in err, err
    assert _locks(rec, codes) == []
    # The ranks of one run share the world lock: the last one out deletes it.
    with TreeLock(rec, 0, 2):
        with TreeLock(rec, 1, 2):
            assert _locks(rec) == [".xcodec.rank0.lock", ".xcodec.rank1.lock", ".xcodec.world2.lock"]
        assert _locks(rec) == [".xcodec.rank0.lock", ".xcodec.world2.lock"]
    assert _locks(rec) == []


# ---------------------------------------------------------------------------- OS and libsndfile errors
def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000))  # a file that grows past 12 kB: EFBIG, as on a full disk


@pytest.mark.slow
def test_a_libsndfile_write_error_fails_that_file_only_and_leaves_no_orphan_codes(tmp_path, release_dir):
    """libsndfile reports a failed write as its own error type (LibsndfileError, not OSError)."""
    src, rec, codes = tmp_path / "in", tmp_path / "rec", tmp_path / "codes"
    _clip(src / "short.flac", seconds=0.2)  # 6.4 kB of WAV: fits
    _clip(src / "long.flac", seconds=1.0, offset=4000)  # 32 kB: cut off by the limit
    argv = [sys.executable, ROOT / "inference.py", "--input", src, "--output", rec, "--codes-out", codes, "--checkpoint", release_dir / "model.pth"]  # fmt: skip
    proc = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "long.wav: cannot write (libsndfile" in lines[0], proc.stderr
    assert "1 file(s) written, 1 failed" in proc.stderr
    assert (rec / "short.wav").is_file() and not (rec / "long.wav").exists()
    assert sorted(p.name for p in codes.rglob("*.npy")) == ["short.npy"]  # no codes file without its manifest line
    assert [e["path"] for e in read_manifest(codes)] == ["short.flac"] and check_corpus(codes) == (1, [])
    assert not list(rec.glob(".*.tmp")) and _locks(rec, codes) == []


def test_training_with_an_unwritable_log_dir_is_one_line(tmp_path, train_env, capsys):
    import main_launch_vqdp as trainer

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # as root no permission stops a write: a path under a file does
    code = trainer.cli(["--config", str(TINY_CONFIG), f"log_dir={blocker / 'run'}", "max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and str(blocker) in lines[0], err
    assert blocker.read_text() == "not a directory"


def test_training_never_writes_through_a_link_in_its_log_dir(tmp_path, train_env, capsys):
    import main_launch_vqdp as trainer

    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"someone else's log")
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "log.txt").symlink_to(victim)  # appended to in place
    code = trainer.cli(["--config", str(TINY_CONFIG), f"log_dir={tmp_path / 'run'}", "max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and "log.txt" in lines[0] and "symbolic link" in lines[0], err
    assert victim.read_bytes() == b"someone else's log"


def test_convert_into_an_unwritable_destination_is_one_line(tmp_path, release_dir, capsys):
    from models import convert

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = convert.main([str(release_dir / "model.pth"), str(blocker / "out"), "--to", "export", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and str(blocker) in lines[0], err
    assert blocker.read_text() == "not a directory"


def test_a_symlink_loop_in_the_input_tree_is_one_line_and_the_run_goes_on(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    _clip(src / "good.flac")
    (src / "a.wav").symlink_to(src / "b.wav")
    (src / "b.wav").symlink_to(src / "a.wav")
    code, err = _run(["--input", src, "--output", tmp_path / "rec", *ckpt], capsys)
    assert code == 1, err
    lines = _error_lines(err)
    assert len(lines) == 2 and all(("a.wav" in ln) != ("b.wav" in ln) and LOOP in ln for ln in lines), err
    assert (tmp_path / "rec" / "good.wav").is_file() and "1 file(s) written, 2 failed" in err
    code, err = _run(["--input", src / "a.wav", "--output", tmp_path / "a.wav", *ckpt], capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {src / 'a.wav'}: {LOOP}"]


def test_a_nul_byte_in_a_listed_path_is_one_line(tmp_path, ckpt, capsys):
    import evaluate

    _clip(tmp_path / "good.flac")
    listing = tmp_path / "files.txt"
    listing.write_text(f"{tmp_path / 'good.flac'}\n{tmp_path / 'bad'}\x00name.flac\n", encoding="utf-8")
    manifest = tmp_path / "files.jsonl"
    manifest.write_text("".join(json.dumps({"path": p}) + "\n" for p in (str(tmp_path / "good.flac"), "bad\x00.flac")))
    for src in (listing, manifest):  # inference refuses a name it cannot use as an output name
        code, err = _run(["--input", src, "--codes-out", tmp_path / f"codes_{src.suffix[1:]}", *ckpt], capsys)
        assert code == 2, err
        lines = _error_lines(err)
        assert len(lines) == 1 and str(src) in lines[0] and "null byte" in lines[0], err
    # evaluate reports that file and scores the others (its policy for a file it cannot read)
    code = evaluate.main(["--input", str(listing), *ckpt, "--bandwidths", "4", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 1 and len(lines) == 1 and "name.flac" in lines[0], err
    files = json.loads((tmp_path / "r.json").read_text())["bandwidths"][0]["files"]
    assert [f["path"] for f in files] == [str(tmp_path / "good.flac")]


# ---------------------------------------------------------------------------- the summary
def test_a_single_file_run_prints_the_summary_line(tmp_path, ckpt, capsys):
    _clip(tmp_path / "in.flac")
    code, err = _run(["--input", tmp_path / "in.flac", "--output", tmp_path / "out.wav", *ckpt], capsys)
    assert code == 0
    assert err.strip().splitlines() == [ln for ln in err.strip().splitlines() if "file(s) written" in ln]
    assert "1 file(s) written, 0 failed/skipped" in err and "real-time factor" in err



@pytest.mark.parametrize("make", ["mkstemp", "mkdtemp"])
def test_a_temporary_removed_before_its_writer_locks_it_is_made_again(tmp_path, monkeypatch, make):
    """Another rank's start-up clean-up removes unlocked temporaries, and a writer's new temporary is unlocked
    for an instant after it is made: the clean-up runs in that instant here. The write still lands, whole
    (it failed with FileNotFoundError: a webdataset run of two ranks lost its corpus.json)."""
    real, calls = getattr(tempfile, make), []

    def made_then_cleaned(*args, **kwargs):
        made = real(*args, **kwargs)
        calls.append(made)
        if len(calls) == 1:
            assert remove_stale_temporaries(tmp_path)  # the instant before the lock: it is taken for a dead writer's
        return made

    monkeypatch.setattr(tempfile, make, made_then_cleaned)
    if make == "mkstemp":
        atomic_write(tmp_path / "corpus.json", lambda tmp: Path(tmp).write_text(json.dumps({"ok": 1})))
        assert json.loads((tmp_path / "corpus.json").read_text()) == {"ok": 1}
    else:
        atomic_directory(tmp_path / "shard", lambda d: (d / "x.txt").write_text("ok"))
        assert (tmp_path / "shard" / "x.txt").read_text() == "ok"
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == [("corpus.json" if make == "mkstemp" else "shard")]
