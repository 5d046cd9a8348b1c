"""evaluate.py: metrics against the reference packages, reports, plots, bad files, model metrics."""

from __future__ import annotations

import csv
import json
import math
import struct

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
from conftest import ASSETS, make_tiny_codec, read_asset
from losses.metrics import signal_metrics, word_error_rate
from quantization import CodebookUsage
from utils import plotting
from utils.audio import prepare_output

FILE_KEYS = {"path", "pesq_wb", "stoi", "mel_distance", "stft_distance", "si_sdr"}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from models.export import save_export

    return save_export(make_tiny_codec(), tmp_path_factory.mktemp("export"))


def _run(argv, capsys) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _figure_size(panels: int) -> tuple[int, int]:
    """The fixed figure size of utils.plotting for ``panels`` stacked spectrograms and a title."""
    return round(plotting.FIGURE_WIDTH * plotting.DPI), round((plotting.PANEL_HEIGHT * panels + 0.4) * plotting.DPI)


def test_released_reconstruction_pesq_and_stoi_equal_the_packages(tmp_path, capsys):
    """The released HuBERT model's own 0.5 kbps reconstruction against the original."""
    from pesq import pesq
    from pystoi import stoi

    ref_path, est_path = ASSETS / "speech_en.flac", ASSETS / "speech_en_xcodec_0.5kbps.wav"
    out = tmp_path / "report.json"
    code, stdout, err = _run(["--reference", ref_path, "--estimate", est_path, "--output", out, "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    (row,) = report["files"]
    assert set(row) == FILE_KEYS and row["path"] == "speech_en.flac"
    ref, deg = sf.read(ref_path, dtype="float32")[0], sf.read(est_path, dtype="float32")[0]
    n = min(len(ref), len(deg))  # lengths aligned: the reconstruction is 15 ms longer
    assert row["pesq_wb"] == pesq(16000, ref[:n], deg[:n], "wb")
    assert row["stoi"] == stoi(ref[:n], deg[:n], 16000, extended=False)
    assert 1.2 < row["pesq_wb"] < 3.0 and 0.6 < row["stoi"] < 1.0  # a real codec at 0.5 kbps
    assert report["mean"] == {k: v for k, v in row.items() if k != "path"}
    assert "PESQ-WB" in stdout and "speech_en.flac" in stdout
    rows = list(csv.reader((tmp_path / "report.csv").open()))
    assert rows[0] == ["path", "pesq_wb", "stoi", "mel_distance", "stft_distance", "si_sdr"]
    assert rows[1][0] == "speech_en.flac" and float(rows[1][1]) == pytest.approx(row["pesq_wb"], rel=1e-5)
    assert _png_size(tmp_path / "plots" / "speech_en.png") == _figure_size(2)


def test_sample_rates_are_reconciled_and_files_matched_by_relative_path(tmp_path, capsys):
    import soxr

    speech = read_asset("speech_en.flac")[:24000]
    ref_dir, est_dir = tmp_path / "ref", tmp_path / "est"
    (ref_dir / "a").mkdir(parents=True)
    (est_dir / "a").mkdir(parents=True)
    sf.write(ref_dir / "a" / "x.flac", soxr.resample(speech, 16000, 44100), 44100)  # 44.1 kHz reference
    sf.write(est_dir / "a" / "x.wav", speech[:-80], 16000)  # 16 kHz estimate, 5 ms shorter
    sf.write(ref_dir / "lonely.flac", speech, 16000)  # no estimate: reported, skipped
    sf.write(ref_dir / "late.wav", speech, 16000)
    sf.write(est_dir / "late.wav", np.concatenate([np.zeros(160, np.float32), speech]), 16000)  # 10 ms late
    argv = ["--reference", ref_dir, "--estimate", est_dir, "--output", tmp_path / "r.json"]
    code, _, err = _run(argv, capsys)
    assert code == 1
    (line,) = _error_lines(err)
    assert "lonely.flac" in line and "no estimate" in line
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["path"] for r in report["files"]] == ["a/x.flac", "late.wav"] and report["failed"][0]["path"] == "lonely.flac"
    row, late = report["files"]
    assert row["stoi"] > 0.99 and row["si_sdr"] > 20 and row["pesq_wb"] > 4.0  # the same speech, resampled; its missing 5 ms count as silence
    assert late["si_sdr"] < 0  # a 10 ms delay ruins waveform metrics...

    code, stdout, _ = _run([*argv, "--max-delay-ms", "20", "--overwrite"], capsys)
    row, late = json.loads((tmp_path / "r.json").read_text())["files"]
    assert row["delay_ms"] == 0 and late["delay_ms"] == 10.0 and late["si_sdr"] > 60  # ...unless compensated
    assert "delay" in stdout


def test_checkpoint_mode_report_tables_codebooks_and_plots(tmp_path, export_dir, capsys):
    from models import XCodec

    speech = read_asset("speech_en.flac")
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "one.flac", speech[:16000], 16000)
    sf.write(src / "sub" / "two.wav", speech[16000:36000], 16000)
    (src / "sub" / "bad.wav").write_bytes(b"RIFF....WAVEfmt not audio")
    out = tmp_path / "eval" / "report.json"
    argv = ["--checkpoint", export_dir, "--input", src, "--bandwidths", "0.5", "2", "--output", out, "--plot", tmp_path / "plots"]
    code, stdout, err = _run(argv, capsys)
    assert code == 1  # one bad file, reported and skipped; everything else written
    (line,) = _error_lines(err)
    assert "bad.wav" in line and "cannot read audio" in line
    report = json.loads(out.read_text())
    assert [s["bandwidth"] for s in report["bandwidths"]] == [0.5, 2.0] and [s["n_q"] for s in report["bandwidths"]] == [1, 4]
    assert report["failed"] == [{"path": "sub/bad.wav", "error": line[len("error: ") :]}]
    assert any("speaker similarity: not computed" in n for n in report["notes"])
    assert "== 0.5 kbps (1 codebook), 2 file(s)" in stdout and "codebook 4: usage" in stdout

    # The numbers are the metrics of what inference.py would write, computed directly.
    model = XCodec.from_pretrained(export_dir)
    wav = speech[16000:36000]
    codes = model.encode(torch.from_numpy(wav)[None, None] * 0.95, 2.0)
    rec = prepare_output(model.decode(codes)[0, 0, : len(wav)].numpy())
    expected, _ = signal_metrics(wav, rec, 16000)
    section = report["bandwidths"][1]
    row = next(r for r in section["files"] if r["path"] == "sub/two.wav")
    assert set(row) == FILE_KEYS
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    for key in expected:
        assert section["mean"][key] == pytest.approx(np.mean([r[key] for r in section["files"]]))

    # Codebooks over the whole set: usage, entropy and bitrate from the codes themselves.
    frames = sum(int(model.num_frames(n)) for n in (16000, 20000))
    assert section["frames"] == frames and section["seconds"] == pytest.approx(2.25)
    assert section["bitrate_kbps"] == pytest.approx(4 * 10 * frames / 2.25 / 1000)
    for book in section["codebooks"]:
        assert book["usage"] == book["used"] / 1024 and 0 < book["entropy_bits"] <= math.log2(book["used"]) + 1e-9
    assert report["bandwidths"][0]["codebooks"][0] == section["codebooks"][0]  # the same first codebook

    rows = list(csv.reader(out.with_suffix(".csv").open()))
    assert rows[0][:2] == ["bandwidth", "path"] and len(rows) == 1 + 2 * 3
    assert [r[1] for r in rows[1:4]] == ["one.flac", "sub/two.wav", "mean"]
    # One figure size whatever the file length (1 s and 1.25 s here).
    assert _png_size(tmp_path / "plots" / "sub" / "two.png") == _png_size(tmp_path / "plots" / "one.png") == _figure_size(3)


@pytest.mark.parametrize("case", ["garbage", "bandwidth", "missing_checkpoint", "list"])
def test_bad_input_is_one_line(tmp_path, export_dir, case, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00\x01 not audio" * 10)
    good = tmp_path / "good.flac"
    sf.write(good, read_asset("speech_en.flac")[:8000], 16000)
    out = tmp_path / "r.json"
    argv = ["--checkpoint", export_dir, "--input", bad, "--bandwidths", "0.5", "--output", out]
    if case == "bandwidth":
        argv = ["--checkpoint", export_dir, "--input", good, "--bandwidths", "3", "--output", out]
    elif case == "missing_checkpoint":
        argv = ["--checkpoint", tmp_path / "nope.pth", "--input", good, "--output", out]
    elif case == "list":  # a list with a missing and a bad file: both reported, the good one evaluated
        (tmp_path / "files.txt").write_text(f"# comment\n{good}\n{tmp_path / 'missing.wav'}\nbad.wav\n")
        argv = ["--checkpoint", export_dir, "--input", tmp_path / "files.txt", "--bandwidths", "0.5", "--output", out]
    code, _, err = _run(argv, capsys)
    lines = _error_lines(err)
    if case == "list":
        assert code == 1 and len(lines) == 2 and "no such file" in lines[0] and "cannot read audio" in lines[1]
        assert [r["path"] for r in json.loads(out.read_text())["bandwidths"][0]["files"]] == [good.as_posix()]
        return
    assert code == 2 and len(lines) == 1, err
    needle = {"garbage": "cannot read audio", "bandwidth": "unsupported bandwidth 3.0", "missing_checkpoint": "not found"}[case]
    assert needle in lines[0]
    assert not out.exists()


def test_model_based_metrics_with_local_models(tmp_path, capsys):
    """Tiny random local models prove the plumbing; absent models are skipped with a note."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
        WavLMConfig,
        WavLMForXVector,
    )

    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "conv_dim": (32,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}  # fmt: skip
    spk = tmp_path / "spk"
    WavLMForXVector(WavLMConfig(**small, tdnn_dim=(32, 32, 32, 32, 64), xvector_output_dim=16)).save_pretrained(spk)
    Wav2Vec2FeatureExtractor().save_pretrained(spk)
    asr = tmp_path / "asr"
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    processor = Wav2Vec2Processor(Wav2Vec2FeatureExtractor(), Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")))
    Wav2Vec2ForCTC(Wav2Vec2Config(**small, vocab_size=len(vocab), pad_token_id=0)).save_pretrained(asr)
    processor.save_pretrained(asr)

    ref = ASSETS / "speech_en.flac"
    argv = ["--reference", ref, "--estimate", ASSETS / "speech_en_xcodec_0.5kbps.wav", "--output", tmp_path / "r.json"]
    code, stdout, err = _run([*argv, "--speaker-model", spk, "--asr-model", asr, "--utmos", tmp_path / "no_utmos"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    row = report["files"][0]
    assert -1 <= row["speaker_similarity"] <= 1 and row["wer"] >= 0 and "utmos" not in row
    assert report["metrics"][-2:] == ["speaker_similarity", "wer"] and "spk-sim" in stdout
    assert any(n.startswith("utmos: skipped:") and "does not exist" in n for n in report["notes"])
    assert "note: utmos: skipped" in err


def test_word_error_rate_and_codebook_stats():
    assert word_error_rate("The cat sat.", "the cat sat") == 0
    assert word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    stats = CodebookUsage(n_q=2, bins=4)
    stats.update(torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]]), seconds=0.08)
    s = stats.summary()
    assert [b["used"] for b in s["codebooks"]] == [4, 1] and [b["entropy_bits"] for b in s["codebooks"]] == [2.0, 0.0]
    assert s["bitrate_kbps"] == pytest.approx(2 * 2 * 4 / 0.08 / 1000) and s["entropy_bitrate_kbps"] == pytest.approx(0.1)


def test_spectrogram_figure_axes_colour_bar_and_unicode_title():
    """The --plot figure: seconds and kHz axes, a dB colour bar, the file name as it is."""
    wav = read_asset("speech_en.flac")
    fig = plotting.spectrogram_figure([("original", wav), ("2 kbps   PESQ 2.10", wav[:8000])], 16000, title="語音/ŝpeech_ü.flac")
    spectrograms = [ax for ax in fig.axes if ax.get_images()]
    colorbars = [ax for ax in fig.axes if not ax.get_images()]
    assert len(spectrograms) == 2 and len(colorbars) == 1
    assert spectrograms[-1].get_xlabel() == "time (s)" and all(ax.get_ylabel() == "frequency (kHz)" for ax in spectrograms)
    assert colorbars[0].get_ylabel() == "magnitude (dB)"
    assert fig.get_suptitle() == "語音/ŝpeech_ü.flac"
    assert [ax.get_title(loc="left") for ax in spectrograms] == ["original", "2 kbps   PESQ 2.10"]
    x0, x1, y0, y1 = spectrograms[0].get_images()[0].get_extent()
    assert (x0, y0, y1) == (0.0, 0.0, 8.0) and x1 == pytest.approx(len(wav) / 16000, abs=0.01)  # seconds, kHz
    lo, hi = spectrograms[1].get_images()[0].get_clim()
    assert hi - lo == plotting.DB_RANGE  # both panels share the reference's dB scale
    assert spectrograms[0].get_images()[0].get_clim() == (lo, hi)


def test_a_crash_of_the_pesq_library_costs_one_value_not_the_report(tmp_path, capsys, monkeypatch):
    """The pesq C library can segfault; its worker process dies (here: by the real signal,
    sent from inside the worker) and the file gets a note while everything else is reported."""
    from losses.metrics import PESQ_CRASH_HOOK

    speech = read_asset("speech_en.flac")[:32000]
    sf.write(tmp_path / "ref.wav", speech, 16000)
    sf.write(tmp_path / "est.wav", speech * 0.9, 16000)
    monkeypatch.setenv(PESQ_CRASH_HOOK, "1")
    code, _, err = _run(["--reference", tmp_path / "ref.wav", "--estimate", tmp_path / "est.wav", "--output", tmp_path / "r.json"], capsys)
    assert code == 0 and not _error_lines(err)
    report = json.loads((tmp_path / "r.json").read_text())
    row = report["files"][0]
    assert row["pesq_wb"] is None and row["stoi"] > 0.99 and row["si_sdr"] > 15
    assert any("pesq" in n and "crashed" in n for n in report["notes"])
    monkeypatch.delenv(PESQ_CRASH_HOOK)
    code, _, _ = _run(["--reference", tmp_path / "ref.wav", "--estimate", tmp_path / "est.wav", "--output", tmp_path / "r2.json"], capsys)
    assert code == 0 and json.loads((tmp_path / "r2.json").read_text())["files"][0]["pesq_wb"] > 4.0  # a fresh worker


def test_a_truncated_estimate_is_scored_against_the_whole_reference(tmp_path, capsys):
    speech = read_asset("speech_en.flac")[:48000]
    sf.write(tmp_path / "ref.wav", speech, 16000)
    sf.write(tmp_path / "full.wav", speech, 16000)
    sf.write(tmp_path / "half.wav", speech[:24000], 16000)
    rows = {}
    for name in ("full", "half"):
        code, _, _ = _run(["--reference", tmp_path / "ref.wav", "--estimate", tmp_path / f"{name}.wav", "--output", tmp_path / f"{name}.json"], capsys)
        assert code == 0
        report = json.loads((tmp_path / f"{name}.json").read_text())
        rows[name] = report["files"][0]
    assert rows["full"]["pesq_wb"] > 4.5 and rows["half"]["pesq_wb"] < 3.0  # not a perfect score on what is left
    assert rows["half"]["stoi"] < 0.8
    assert any("shorter: the missing audio is scored as silence" in n for n in report["notes"])


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--max-delay-ms", "5000"], "--max-delay-ms must be a number in [0, 1000.0]"),
        (["--max-delay-ms", "inf"], "--max-delay-ms must be a number"),
        (["--max-delay-ms", "nan"], "--max-delay-ms must be a number"),
    ],
)
def test_bad_delay_search_is_refused(tmp_path, capsys, extra, needle):
    sf.write(tmp_path / "ref.wav", read_asset("speech_en.flac")[:16000], 16000)
    with pytest.raises(SystemExit) as exc:
        evaluate.parse_args(["--reference", str(tmp_path / "ref.wav"), "--estimate", str(tmp_path / "ref.wav"), "--output", str(tmp_path / "r.json"), *extra])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_a_delay_search_longer_than_the_clip_finds_the_true_delay(tmp_path, capsys):
    speech = read_asset("speech_en.flac")[:8000]
    sf.write(tmp_path / "ref.wav", speech, 16000)
    sf.write(tmp_path / "late.wav", np.concatenate([np.zeros(80, np.float32), speech]), 16000)  # 5 ms late
    code, _, _ = _run(["--reference", tmp_path / "ref.wav", "--estimate", tmp_path / "late.wav", "--output", tmp_path / "r.json",
                       "--max-delay-ms", "1000"], capsys)  # fmt: skip
    row = json.loads((tmp_path / "r.json").read_text())["files"][0]
    assert code == 0 and row["delay_ms"] == pytest.approx(5.0) and row["pesq_wb"] > 4.0


@pytest.mark.parametrize("case", ["output_dir", "plot_file", "transcripts_bytes"])
def test_report_targets_and_transcripts_errors_are_one_line(tmp_path, capsys, case):
    sf.write(tmp_path / "ref.wav", read_asset("speech_en.flac")[:16000], 16000)
    (tmp_path / "reports").mkdir()
    (tmp_path / "plots.png").write_bytes(b"not a directory")
    (tmp_path / "t.json").write_bytes(b'{"ref.wav": "\xff"}')
    argv = ["--reference", tmp_path / "ref.wav", "--estimate", tmp_path / "ref.wav"]
    argv += {"output_dir": ["--output", tmp_path / "reports"],
             "plot_file": ["--output", tmp_path / "r.json", "--plot", tmp_path / "plots.png"],
             "transcripts_bytes": ["--output", tmp_path / "r.json", "--transcripts", tmp_path / "t.json"]}[case]  # fmt: skip
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, _, err = _run(argv, capsys)
    (line,) = _error_lines(err)
    assert code == 2 and {"output_dir": "is a directory", "plot_file": "is a file", "transcripts_bytes": "not UTF-8"}[case] in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before and list((tmp_path / "reports").iterdir()) == []


def test_an_existing_report_is_replaced_only_with_overwrite(tmp_path, capsys):
    """As inference.py: existing outputs (report, CSV, plots) need --overwrite; refused before any work."""
    ref = ASSETS / "speech_en.flac"
    argv = ["--reference", ref, "--estimate", ASSETS / "speech_en_xcodec_0.5kbps.wav", "--output", tmp_path / "r.json"]
    code, _, _ = _run(argv, capsys)
    assert code == 0
    (tmp_path / "r.json").write_text("an earlier report\n")
    csv_before = (tmp_path / "r.csv").read_bytes()
    code, out, err = _run(argv, capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and f"{tmp_path / 'r.json'}: exists" in lines[0] and "--overwrite" in lines[0], err
    assert (tmp_path / "r.json").read_text() == "an earlier report\n" and (tmp_path / "r.csv").read_bytes() == csv_before
    code, _, _ = _run([*argv, "--overwrite"], capsys)
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["files"][0]["path"] == "speech_en.flac"


@pytest.mark.slow
def test_without_the_eval_extra_one_line_names_it(tmp_path):
    """pesq is an extra (it builds from source): without it evaluate.py says how to install it,
    in one line, exit 2, before writing anything. `sys.modules["pesq"] = None` makes the real
    import fail in a child process as it does where the package is not installed."""
    import subprocess
    import sys

    from conftest import ROOT

    wrapper = "import runpy, sys; sys.modules['pesq'] = None; runpy.run_path('evaluate.py', run_name='__main__')"
    ref = ASSETS / "speech_en.flac"
    argv = [sys.executable, "-c", wrapper, "--reference", ref, "--estimate", ref, "--output", tmp_path / "r.json"]
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: pesq is not installed: pip install -e .[eval]"]
    assert list(tmp_path.iterdir()) == []
