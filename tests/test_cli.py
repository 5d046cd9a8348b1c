"""inference.py on real audio: round trips, directory runs and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import inference
from conftest import ASSETS, ROOT
from models import XCodec


@pytest.fixture(scope="module")
def ckpt(release_dir):
    return ["--checkpoint", str(release_dir / "model.pth")]


@pytest.fixture(scope="module")
def model(release_dir) -> XCodec:
    return XCodec.from_pretrained(release_dir / "model.pth")


def _run(argv, capsys) -> tuple[int, str]:
    code = inference.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_error_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_file_round_trip_matches_the_api(tmp_path, ckpt, model, speech, capsys):
    out = tmp_path / "rec.wav"
    code, err = _run(["--input", ASSETS / "speech_en.flac", "--output", out, "--codes-out", tmp_path / "c.npy", *ckpt, "-b", "2"], capsys)
    assert code == 0, err
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", len(speech))
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.int16 and codes.shape == (4, int(model.num_frames(len(speech))))
    x = torch.from_numpy(speech)[None, None] * 0.95  # audio_norm_scale, as the original
    ref_codes = model.encode(x, 2.0)
    assert np.array_equal(codes, ref_codes[0].numpy())
    ref = np.clip(model.decode(ref_codes)[0, 0, : len(speech)].numpy(), -0.99, 0.99)
    got, _ = sf.read(out, dtype="float32")
    assert np.abs(got - ref).max() < 2 / 32768

    # The single codes file describes itself (c.json) ...
    side = json.loads((tmp_path / "c.json").read_text())
    assert side["samples"] == len(speech) and side["sample_rate"] == 16000 and side["n_q"] == 4 and side["bandwidth"] == 2.0
    assert side["frames"] == codes.shape[1] and side["path"] == "speech_en.flac" and side["checkpoint"].startswith("xcodec-")
    # ... so codes back to audio restore the exact original length (whole frames would be longer).
    out2 = tmp_path / "from_codes.wav"
    code, err = _run(["--codes-in", tmp_path / "c.npy", "--output", out2, *ckpt], capsys)
    assert code == 0, err
    back, _ = sf.read(out2, dtype="float32")
    assert len(back) == len(speech) != codes.shape[1] * 320
    assert np.abs(back - got).max() < 2 / 32768


def test_stereo_44k_input_is_downmixed_and_resampled(tmp_path, ckpt, speech, capsys):
    import soxr

    stereo = np.stack([speech, speech * 0.5], axis=1)
    src = tmp_path / "stereo.wav"
    sf.write(src, soxr.resample(stereo, 16000, 44100), 44100, subtype="PCM_24")
    code, err = _run(["--input", src, "--output", tmp_path / "out.wav", *ckpt], capsys)
    assert code == 0, err
    info = sf.info(tmp_path / "out.wav")
    assert info.samplerate == 16000 and info.channels == 1
    assert abs(info.frames - len(speech)) <= 2


def _make_tree(root):
    (root / "a" / "b").mkdir(parents=True)
    wav = sf.read(ASSETS / "speech_en.flac", dtype="float32")[0]
    sf.write(root / "one.flac", wav[:24000], 16000)
    sf.write(root / "a" / "two.wav", wav[8000:40000], 16000)
    sf.write(root / "a" / "b" / "three.wav", wav[:7777], 16000)
    sf.write(root / "a" / "b" / "four.ogg", wav[1000:21000], 16000)
    (root / "a" / "broken.wav").write_bytes(b"RIFF....WAVEfmt this is not audio")
    (root / "notes.txt").write_text("ignored: not an audio extension")


def test_directory_run_mirrors_tree_skips_bad_file_and_batches_exactly(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    _make_tree(src)
    code1, err1 = _run(["--input", src, "--codes-out", tmp_path / "c1", "--output", tmp_path / "rec", *ckpt], capsys)
    code3, err3 = _run(["--input", src, "--codes-out", tmp_path / "c3", *ckpt, "--batch-size", "3"], capsys)
    for code, err in ((code1, err1), (code3, err3)):
        assert code == 1, err  # some failed
        _one_error_line(err, "broken.wav", "cannot read audio")
        assert "4 file(s) written, 1 failed/skipped" in err
    rels = ["one", "a/two", "a/b/three", "a/b/four"]
    for rel in rels:
        c1, c3 = np.load(tmp_path / "c1" / f"{rel}.npy"), np.load(tmp_path / "c3" / f"{rel}.npy")
        assert c1.shape[0] == 8 and np.array_equal(c1, c3), rel
        src_file = next(src.glob(rel + ".*"))
        assert sf.info(tmp_path / "rec" / f"{rel}.wav").frames == sf.info(src_file).frames
    assert not (tmp_path / "rec" / "a" / "broken.wav").exists()
    assert not list((tmp_path / "rec").rglob("*.tmp"))

    code, err = _run(["--codes-in", tmp_path / "c1", "--output", tmp_path / "back", *ckpt], capsys)
    assert code == 0, err
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in (tmp_path / "back").rglob("*.wav")) == sorted(
        f"{r}.wav" for r in rels
    )


@pytest.mark.parametrize(
    "case,needles",
    [
        ("missing", ["no such file"]),
        ("empty", ["empty audio"]),
        ("garbage", ["cannot read audio"]),
        ("nan", ["NaN or Inf"]),
        ("bandwidth", ["unsupported bandwidth 3.0"]),
        ("mismatch", ["does not match", "shape mismatch"]),
        ("release", ["unknown release name 'no_such_release'"]),
    ],
)
def test_single_file_errors_are_one_line(tmp_path, ckpt, release_dir, case, needles, capsys):
    src = tmp_path / "x.wav"
    argv = ["--input", src, "--output", tmp_path / "o.wav", *ckpt]
    if case == "empty":
        sf.write(src, np.zeros(0, dtype="float32"), 16000)
    elif case == "garbage":
        src.write_bytes(b"\x00\x01not audio at all" * 10)
    elif case == "nan":
        sf.write(src, np.full(4000, np.nan, dtype="float32"), 16000, subtype="FLOAT")
    else:
        sf.write(src, np.zeros(4000, dtype="float32"), 16000)
    if case == "missing":
        src.unlink()
    if case == "bandwidth":
        argv += ["--bandwidth", "3"]
    if case == "mismatch":
        argv += ["--config", ROOT / "configs" / "xcodec_hubert_librispeech.yaml"]
    if case == "release":
        argv = ["--input", src, "--output", tmp_path / "o.wav", "--checkpoint", "no_such_release"]
    code, err = _run(argv, capsys)
    assert code == 2
    _one_error_line(err, *needles)
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize(
    "codes,needles",
    [
        (np.zeros((8, 10), dtype=np.float32), ["integers"]),
        (np.zeros((2, 3, 10), dtype=np.int16), ["shape (n_q, frames)"]),
        (np.zeros((9, 10), dtype=np.int16), ["1 <= n_q <= 8"]),
        (np.full((2, 10), 1024, dtype=np.int16), ["[0, 1024)", "1024]"]),
    ],
)
def test_bad_codes_files_are_refused(tmp_path, ckpt, codes, needles, capsys):
    np.save(tmp_path / "c.npy", codes)
    code, err = _run(["--codes-in", tmp_path / "c.npy", "--output", tmp_path / "o.wav", *ckpt], capsys)
    assert code == 2
    _one_error_line(err, *needles)
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.slow
def test_cli_entry_point_without_network(tmp_path):
    """The real command: the default release cannot be fetched offline -> one helpful line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), "--input", str(ASSETS / "speech_en.flac"), "--output", str(tmp_path / "o.wav")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "xcodec_hubert_librispeech", "--checkpoint", "--config")


def test_the_offline_probe_defers_to_a_proxy(monkeypatch):
    from utils.hub import hub_reachable

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    assert "cannot reach" in hub_reachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_reachable() is None  # huggingface_hub, which uses the proxy, decides


@pytest.mark.slow
def test_without_network_the_release_name_fails_fast_in_one_line(tmp_path):
    """Quickstart 1 with the hub unreachable (not HF_HUB_OFFLINE): one short connection
    attempt (a hang fails on the subprocess timeout), no retry lines, one line with what to do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "empty_cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--input", str(ASSETS / "speech_en.flac"), "--output", str(tmp_path / "o.wav")],
                          env=env, capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Retrying" not in proc.stderr
    _one_error_line(proc.stderr, "xcodec_hubert_librispeech", "cannot reach http://127.0.0.1:9", "--checkpoint")
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize("case", ["same_file", "codes_onto_audio", "same_directory", "codes_in_onto_itself", "evaluate_report"])
def test_no_output_is_ever_written_onto_an_input(tmp_path, ckpt, case, capsys):
    """Refused before any work with one line; every input byte-identical afterwards."""
    import evaluate

    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "a.wav", sf.read(ASSETS / "speech_en.flac", dtype="float32")[0][:16000], 16000)
    np.save(data / "c.npy", np.zeros((1, 10), dtype=np.int16))
    files = sorted(data.iterdir())
    before = {p: p.read_bytes() for p in files}
    argv = {
        "same_file": ["--input", data / "a.wav", "--output", data / "a.wav"],
        "codes_onto_audio": ["--input", data / "a.wav", "--codes-out", data / "a.wav"],
        "same_directory": ["--input", data, "--output", data],
        "codes_in_onto_itself": ["--codes-in", data / "c.npy", "--output", data / "c.npy"],
    }.get(case)
    if argv is None:
        code = evaluate.main([str(a) for a in ["--reference", data / "a.wav", "--estimate", data / "a.wav", "--output", data / "a.wav"]])
        err = capsys.readouterr().err
    else:
        code, err = _run([*argv, *ckpt], capsys)
    assert code == 2
    _one_error_line(err, "would overwrite the input")
    assert sorted(data.iterdir()) == files and all(p.read_bytes() == before[p] for p in files)


def _tree_state(root) -> dict:
    """Every file under ``root`` and its bytes (inputs and earlier outputs must not change)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _clip(path, seconds: float = 0.5, offset: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = sf.read(ASSETS / "speech_en.flac", dtype="float32")[0]
    sf.write(path, wav[offset : offset + int(seconds * 16000)], 16000)


def test_two_inputs_with_one_stem_are_refused_before_any_work(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    _clip(src / "a.b.c.flac")
    _clip(src / "a.b.c.wav", offset=4000)
    before = _tree_state(tmp_path)
    code, err = _run(["--input", src, "--output", tmp_path / "rec", "--codes-out", tmp_path / "codes", *ckpt], capsys)
    assert code == 2
    _one_error_line(err, "a.b.c.flac", "a.b.c.wav", "would both be written")
    assert _tree_state(tmp_path) == before and not (tmp_path / "rec").exists() and not (tmp_path / "codes").exists()


def test_existing_outputs_need_overwrite_and_a_rerun_never_reads_its_outputs(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    _clip(src / "x.flac")
    _clip(src / "sub" / "y.flac", offset=8000)
    rec = src / "rec"  # the output tree inside the input tree
    argv = ["--input", src, "--output", rec, *ckpt]
    code, err = _run(argv, capsys)
    assert code == 0 and "2 file(s) written" in err
    first = _tree_state(tmp_path)
    code, err = _run(argv, capsys)  # a rerun: refused, nothing replaced
    assert code == 2
    _one_error_line(err, "exists", "--overwrite")
    assert _tree_state(tmp_path) == first
    code, err = _run([*argv, "--overwrite"], capsys)
    assert code == 0 and "2 file(s) written" in err  # rec/*.wav were not read back as inputs
    assert not (rec / "rec").exists() and _tree_state(tmp_path) == first  # same bytes again

    single = ["--input", src / "x.flac", "--output", tmp_path / "x.wav", *ckpt]
    assert _run(single, capsys)[0] == 0
    out = (tmp_path / "x.wav").read_bytes()
    code, err = _run(single, capsys)
    assert code == 2
    _one_error_line(err, "x.wav: exists")
    assert (tmp_path / "x.wav").read_bytes() == out


def test_an_output_that_cannot_be_written_skips_only_that_file(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    for i, name in enumerate("abc"):
        _clip(src / f"{name}.flac", offset=3000 * i)
    (tmp_path / "rec" / "b.wav").mkdir(parents=True)  # a directory where b's output belongs
    before = _tree_state(src)
    code, err = _run(["--input", src, "--output", tmp_path / "rec", *ckpt], capsys)
    assert code == 1 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "b.wav: cannot write" in lines[0], err
    assert (tmp_path / "rec" / "a.wav").is_file() and (tmp_path / "rec" / "c.wav").is_file() and (tmp_path / "rec" / "b.wav").is_dir()
    assert _tree_state(src) == before and not list((tmp_path / "rec").glob(".*.tmp"))


def test_output_format_follows_the_extension(tmp_path, ckpt, capsys):
    _clip(tmp_path / "in.flac")
    code, _ = _run(["--input", tmp_path / "in.flac", "--output", tmp_path / "o.flac", *ckpt], capsys)
    assert code == 0 and sf.info(str(tmp_path / "o.flac")).format == "FLAC"
    code, err = _run(["--input", tmp_path / "in.flac", "--output", tmp_path / "o.mp3", *ckpt], capsys)
    assert code == 2
    _one_error_line(err, "o.mp3", ".wav or .flac")
    # A directory input with a file name as output: refused, no directory of that name made.
    code, err = _run(["--input", tmp_path, "--output", tmp_path / "newname.wav", "--overwrite", *ckpt], capsys)
    assert code == 2
    _one_error_line(err, "newname.wav", "must be a directory")
    assert not (tmp_path / "newname.wav").exists() and not (tmp_path / "o.mp3").exists()


def test_a_second_run_on_a_locked_output_tree_stops_with_one_line(tmp_path, ckpt, capsys):
    from utils.files import TreeLock, atomic_write, remove_stale_temporaries

    src = tmp_path / "in"
    _clip(src / "a.flac")
    with TreeLock(tmp_path / "rec"):  # a live run holds the tree
        code, err = _run(["--input", src, "--output", tmp_path / "rec", *ckpt], capsys)
        assert code == 2
        _one_error_line(err, "another run is writing")
        # A run with another number of processes is refused too (its ranks would share files out differently).
        with pytest.raises(OSError, match="a run with 1 process"):
            TreeLock(tmp_path / "rec", rank=1, world_size=2)
    assert not (tmp_path / "rec" / "a.wav").exists()
    with TreeLock(tmp_path / "rec", rank=0, world_size=2), TreeLock(tmp_path / "rec", rank=1, world_size=2):
        pass  # the ranks of one run share the tree
    # A live writer's temporary is never deleted; a dead writer's is.
    seen = []

    def write(tmp):
        open(tmp, "w").write("partial")
        seen.append(remove_stale_temporaries(tmp_path / "rec"))

    atomic_write(tmp_path / "rec" / "x.txt", write)
    assert seen == [[]] and (tmp_path / "rec" / "x.txt").read_text() == "partial"
    (tmp_path / "rec" / ".a.wav.dead1234.tmp").write_text("left by a killed run")
    assert [p.name for p in remove_stale_temporaries(tmp_path / "rec")] == [".a.wav.dead1234.tmp"]


@pytest.mark.parametrize(
    "extra,env,needles",
    [
        (["--device", "meta"], {}, ["--device meta", "cpu or cuda"]),
        (["--device", "mps"], {}, ["--device mps", "cpu or cuda"]),
        (["--device", "xla"], {}, ["--device xla", "cpu or cuda"]),
        ([], {"WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "RANK is not"]),
        ([], {"WORLD_SIZE": "abc", "RANK": "0"}, ["WORLD_SIZE='abc'", "integers"]),
    ],
)
def test_device_and_process_layout_errors_are_one_line(tmp_path, ckpt, extra, env, needles, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _clip(tmp_path / "in" / "a.flac")
    code, err = _run(["--input", tmp_path / "in", "--output", tmp_path / "rec", *extra, *ckpt], capsys)
    assert code == 2
    _one_error_line(err, *needles)
    assert not list((tmp_path / "rec").glob("*.wav")) if (tmp_path / "rec").exists() else True


def test_help_shows_defaults_and_tiny_windows_are_refused(capsys):
    with pytest.raises(SystemExit):
        inference.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 30.0)" in out and "(default: None)" not in out and "(default: xcodec_hubert_librispeech)" in out
    with pytest.raises(SystemExit) as exc:
        inference.parse_args(["--input", "a.wav", "--output", "b.wav", "--window", "0.01", "--context", "0"])
    assert exc.value.code == 2 and "at least 1 second" in capsys.readouterr().err
