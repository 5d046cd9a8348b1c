"""Evaluate X-Codec reconstructions: PESQ, STOI, mel and STFT distances, SI-SDR, codebook usage (docs/evaluation.md).

    python evaluate.py --checkpoint model.pth --input corpus/ --bandwidths 0.5 1 2 4 --output report.json
    python evaluate.py --reference corpus/ --estimate rec/ --output report.json   # made elsewhere, by relative path
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from corpus.inputs import collect_files, is_dataset, is_listing, pair_by_relative_path
from corpus.outputs import refuse_replacing
from losses import metrics
from models import CheckpointError, load_codec
from models.pipeline import Pipeline
from models.vocoder import Vocoder
from quantization import CodebookUsage
from utils.audio import AudioError, audio_extensions, load_audio, prepare_output, resample
from utils.cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, CliError, argument_parser, cli_main, resolve_device
from utils.files import atomic_write, overwritten_input
from utils.plotting import save_figure, spectrogram_figure

MAX_DELAY_MS = 1000.0  # a codec's delay is a few ms; longer searches only find false matches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser("Evaluate codec reconstructions (PESQ, STOI, mel/STFT distance, SI-SDR, codebook usage).")
    p.epilog = "Modes: --checkpoint + --input (encode and decode here), or --reference + --estimate."
    p.add_argument("--checkpoint", help="release name or checkpoint path: encode and decode --input with it")
    p.add_argument("--config", type=Path, help="YAML config for a .pth checkpoint (default: config.yaml beside it)")
    p.add_argument("--input", type=Path, nargs="+", help="audio files, directories (recursive) or list files (.txt: one path a line)")
    p.add_argument("--bandwidths", type=float, nargs="+", help="kbps to evaluate (default: every target bandwidth of the model)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--reference", type=Path, help="reference audio file or directory")
    p.add_argument("--estimate", type=Path, help="reconstruction file or directory (matched to --reference by relative path)")
    p.add_argument("--sample-rate", type=int, help="rate for --reference/--estimate metrics (default: the lower of the two)")
    p.add_argument("--output", type=Path, required=True, help="JSON report; the CSV goes beside it (same name, .csv)")
    p.add_argument("--csv", type=Path, help="CSV path (default: --output with .csv)")
    p.add_argument("--vocoder", help="with --checkpoint: reconstruct with a YuE vocoder (vocals, instrumentals or a "
                   ".pth) and score against each input at its own rate (e.g. 44.1 kHz)")
    p.add_argument("--plot", type=Path, help="write a spectrogram PNG per file into this directory")
    p.add_argument("--max-delay-ms", type=float, default=0.0,
                   help="compensate a delay of the estimate up to this many ms (cross-correlation; default 0: off)")
    p.add_argument("--speaker-model", type=Path, help="local speaker-verification model directory (transformers x-vector)")
    p.add_argument("--asr-model", type=Path, help="local ASR model directory (transformers) for WER")
    p.add_argument("--transcripts", type=Path, help="reference transcripts for WER: JSON {path: text} or TSV 'path<TAB>text'")
    p.add_argument("--utmos", type=Path, help="local clone of the SpeechMOS torch.hub repo (weights in the torch hub cache)")
    p.add_argument("--quiet", action="store_true", help="print only the mean rows")
    p.add_argument("--overwrite", action="store_true", help="replace a report, CSV or plots that already exist")
    args = p.parse_args(argv)
    by_checkpoint = args.checkpoint is not None or args.input is not None
    by_reference = args.reference is not None or args.estimate is not None
    refusals = (  # the first that applies is the error
        (by_checkpoint == by_reference, "use either --checkpoint with --input, or --reference with --estimate"),
        (by_checkpoint and (args.checkpoint is None or args.input is None), "--checkpoint and --input go together"),
        (by_reference and (args.reference is None or args.estimate is None), "--reference and --estimate go together"),
        (by_reference and (args.bandwidths or args.vocoder), "--bandwidths and --vocoder need --checkpoint"),
        (args.sample_rate is not None and args.sample_rate <= 0, "--sample-rate must be positive"),
        (not 0 <= args.max_delay_ms <= MAX_DELAY_MS,
         f"--max-delay-ms must be a number in [0, {MAX_DELAY_MS}], got {args.max_delay_ms}"),
    )
    if refused := next((message for applies, message in refusals if applies), None):
        p.error(refused)
    return args


def collect_inputs(inputs: list[Path]) -> tuple[list[tuple[Path, str]], bool]:
    """``([(file, name in the report)], single)``; single: one audio file was given."""
    items: list[tuple[Path, str]] = []
    several_dirs = sum(p.is_dir() for p in inputs) > 1
    suffixes = audio_extensions()
    listing = [is_listing(p) for p in inputs]
    for src, is_list in zip(inputs, listing):
        try:
            found = collect_files(src, suffixes)
        except (ValueError, OSError, ImportError) as exc:
            raise CliError(str(exc)) from None
        directory = src.is_dir() and not is_dataset(src)
        if (directory or is_list) and not found:
            raise CliError(f"{src}: no audio files found" if directory else f"{src}: the list names no files")
        if directory:
            prefix = Path(src.name) if several_dirs else Path()
            items += [(f, (prefix / name).as_posix()) for f, name in found]
        elif is_list:  # a list, a JSONL/CSV manifest or a dataset: named as it names them
            items += [(f, name.as_posix()) for f, name in found]
        else:
            items.append((src, src.as_posix() if len(inputs) > 1 else src.name))
    single = len(inputs) == 1 and len(items) == 1 and not inputs[0].is_dir() and not listing[0]
    return items, single


def pair_files(reference: Path, estimate: Path) -> tuple[list[tuple[str, Path, Path | None]], bool, list[str]]:
    """``([(name, reference, estimate or None)], single, notes)``: estimates matched to references by relative
    path (the audio extension may differ)."""
    for path in (reference, estimate):
        if not path.exists():
            raise CliError(f"{path}: no such file or directory")
    if reference.is_dir() != estimate.is_dir():
        raise CliError(f"--reference {reference} and --estimate {estimate} must both be files or both directories")
    if not reference.is_dir():
        return [(reference.name, reference, estimate)], True, []
    pairs, extra = pair_by_relative_path(reference, estimate, audio_extensions())
    if not pairs:
        raise CliError(f"{reference}: no audio files found")
    return pairs, False, [f"{extra} estimate file(s) without a reference were ignored"] if extra else []


def _fail(failed: list[dict], path: str, message: str) -> None:
    """A bad file: reported on stderr at once (one line) and listed in the report."""
    failed.append({"path": path, "error": message})
    tqdm.write(f"error: {message}", file=sys.stderr)


def _fmt(value, spec: str, missing: str = "") -> str:
    """``value`` in format ``spec``, or ``missing`` for a metric not computed (None, NaN, inf)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


COLUMNS = [("pesq_wb", "PESQ-WB", 8, 3), ("stoi", "STOI", 7, 3), ("mel_distance", "mel", 7, 3),  # key, header, width, digits
           ("stft_distance", "STFT", 7, 3), ("si_sdr", "SI-SDR", 8, 2), ("speaker_similarity", "spk-sim", 8, 3),
           ("wer", "WER", 7, 3), ("utmos", "UTMOS", 7, 3), ("delay_ms", "delay", 7, 2)]  # fmt: skip


def _cells(values: dict, cols: list) -> str:
    return "".join(" " + _fmt(values.get(k), f"{w}.{d}f", "-".rjust(w)) for k, _, w, d in cols)


def format_table(title: str, rows: list[dict], mean: dict, keys: list[str], quiet: bool = False) -> str:
    cols = [c for c in COLUMNS if c[0] in keys]
    names = [r["path"] for r in rows] if not quiet else []
    name_width = min(max([len(n) for n in names] + [len("mean"), 4]), 48)
    header = "file".ljust(name_width) + "".join(h.rjust(w + 1) for _, h, w, _ in cols)
    lines = [title, header, "-" * len(header)]
    for row in ([] if quiet else rows) + [{**mean, "path": "mean"}]:
        name = row["path"] if len(row["path"]) <= name_width else "..." + row["path"][-(name_width - 3) :]
        lines.append(name.ljust(name_width) + _cells(row, cols))
    return "\n".join(lines)


def format_codebooks(summary: dict) -> str:
    lines = [f"bitrate {summary['bitrate_kbps']:.3f} kbps ({summary['frames']} frames, {summary['seconds']:.1f} s); "
             f"entropy-coded bound {summary['entropy_bitrate_kbps']:.3f} kbps"]
    lines += [f"  codebook {book['index'] + 1}: usage {100 * book['usage']:5.1f}% ({book['used']} entries), "
              f"entropy {book['entropy_bits']:.2f} bits" for book in summary["codebooks"]]
    return "\n".join(lines)


def write_reports(report: dict, json_path: Path, csv_path: Path, keys: list[str]) -> None:
    # A metric not computed (NaN) and a rate over no audio are null; numpy scalars are numbers.
    clean = json.loads(json.dumps(report, default=lambda value: value.item()), parse_constant=lambda name: None)
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    with_bw = "bandwidths" in report
    sections = report["bandwidths"] if with_bw else [report]
    writer.writerow((["bandwidth"] if with_bw else []) + ["path"] + keys)
    for section in sections:
        lead = [section["bandwidth"]] if with_bw else []
        for row in section["files"] + [{**section["mean"], "path": "mean"}]:
            writer.writerow(lead + [row["path"]] + [_fmt(row.get(k), ".6g") for k in keys])
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def plot_path(plot_dir: Path, name: str) -> Path:
    out = plot_dir / Path(name).with_suffix(".png")
    return out if out.resolve().is_relative_to(plot_dir.resolve()) else plot_dir / out.name  # a list may name any file


def _codebooks(n: int) -> str:
    return f"{n} codebook{'s' if n != 1 else ''}"


def _label(title: str, scores: dict) -> str:
    """A panel title with the PESQ and STOI that could be computed."""
    values = [(name, scores.get(key)) for key, name in (("pesq_wb", "PESQ"), ("stoi", "STOI"))]
    return "   ".join([title] + [f"{name} {v:.2f}" for name, v in values if v is not None and math.isfinite(v)])


def _progress(items, enabled: bool, desc: str):
    return tqdm(items, desc=desc, unit="file", file=sys.stderr, dynamic_ncols=True, disable=not enabled)


def _model_metrics(args, device: str) -> tuple[metrics.ModelMetrics, list[str], list[str]]:
    """The optional model-based metrics, the report's metric keys, and notes on what is not computed."""
    transcripts = metrics.read_transcripts(args.transcripts)
    extra = metrics.ModelMetrics(args.speaker_model, args.asr_model, args.utmos, transcripts, device)
    for note in extra.notes:
        print(f"note: {note}", file=sys.stderr)
    keys = list(metrics.SIGNAL_METRICS) + extra.names + (["delay_ms"] if args.max_delay_ms > 0 else [])
    flags = (("speaker-model", "speaker similarity"), ("asr-model", "WER"), ("utmos", "UTMOS"))
    absent = [f"{name}: not computed (pass --{flag} with a local model)" for flag, name in flags
              if getattr(args, flag.replace("-", "_")) is None]  # fmt: skip
    return extra, keys, extra.notes + absent


def evaluate_checkpoint(args, items: list[tuple[Path, str]], failed: list) -> tuple[dict, list[str]]:
    model = load_codec(args.checkpoint, config=args.config, device=resolve_device(args.device))
    bandwidths = sorted(set(args.bandwidths or model.target_bandwidths))
    try:
        n_qs = {bw: model.quantizer.n_q_for_bandwidth(bw) for bw in bandwidths}
    except ValueError as exc:
        raise CliError(str(exc)) from None
    pipe = Pipeline(model, max(bandwidths))  # long files in windows, as inference.py
    extra, keys, notes = _model_metrics(args, str(model.device))
    rate = model.sample_rate
    rows: dict[float, list[dict]] = {bw: [] for bw in bandwidths}
    books = {bw: CodebookUsage(n_qs[bw], model.bins) for bw in bandwidths}
    if args.vocoder:
        pipe.vocoder = Vocoder.from_pretrained(args.vocoder, device=model.device, checkpoint=args.checkpoint)
        try:
            for n_q in n_qs.values():
                pipe.vocoder.check_codec(model, n_q)
        except ValueError as exc:
            raise CliError(f"--vocoder {args.vocoder}: {exc}") from None
    for path, name in _progress(items, len(items) > 1, "evaluating"):
        try:
            wav, _ = load_audio(path, rate)
            ref, ref_rate = load_audio(path) if args.vocoder else (wav, rate)  # scored at the file's own rate
            if pipe.too_short(len(wav)):
                raise AudioError(f"{path}: {pipe.too_short(len(wav))}")
        except AudioError as exc:
            _fail(failed, name, str(exc))
            continue
        # Residual VQ: the codes of a lower bandwidth are the first codebooks of a higher one.
        codes = pipe.encode([torch.from_numpy(wav)])[0]
        panels = [("original", ref)]
        for bw in bandwidths:
            rec = pipe.decode([codes[: n_qs[bw]]], [len(wav)])[0].float().cpu().numpy()
            rec = prepare_output(resample(rec, pipe.out_rate, ref_rate)[: len(ref)])  # as inference.py writes it
            scores, why = metrics.measure(ref, rec, ref_rate, extra, name, args.max_delay_ms)
            notes += [f"{name} at {bw:g} kbps: {w}" for w in why]
            rows[bw].append({"path": name, **scores})
            books[bw].update(codes[: n_qs[bw]], len(wav) / rate)
            panels.append((_label(f"{bw:g} kbps ({_codebooks(n_qs[bw])})", scores), rec))
        if args.plot is not None:
            save_figure(spectrogram_figure(panels, ref_rate, title=name), plot_path(args.plot, name))
    sections = [{"bandwidth": bw, "n_q": n_qs[bw], "files": rows[bw], "mean": metrics.mean_metrics(rows[bw], keys),
                 **books[bw].summary()} for bw in bandwidths]  # fmt: skip
    report = {"checkpoint": str(args.checkpoint), "checkpoint_id": model.checkpoint_id, "sample_rate": pipe.out_rate,
              "vocoder": args.vocoder, "metrics": keys, "bandwidths": sections, "failed": failed, "notes": notes}
    return report, keys


def evaluate_pairs(args, pairs: list, notes: list[str], failed: list) -> tuple[dict, list[str]]:
    extra, keys, model_notes = _model_metrics(args, args.device or "cpu")
    notes = notes + model_notes
    rows = []
    for name, ref_path, est_path in _progress(pairs, len(pairs) > 1, "evaluating"):
        if est_path is None:
            _fail(failed, name, f"{ref_path}: no estimate for it in {args.estimate}")
            continue
        try:
            ref, ref_rate = load_audio(ref_path)
            est, est_rate = load_audio(est_path)
        except AudioError as exc:
            _fail(failed, name, str(exc))
            continue
        rate = args.sample_rate or min(ref_rate, est_rate)
        try:  # --sample-rate 10^9 would allocate without bound
            ref, est = resample(ref, ref_rate, rate), resample(est, est_rate, rate)
        except AudioError as exc:
            _fail(failed, name, f"{name}: {exc}")
            continue
        if abs(len(ref) - len(est)) > 0.1 * rate:  # scored against the whole reference (losses.metrics)
            short = "shorter: the missing audio is scored as silence" if len(est) < len(ref) else "longer: cut to the reference"
            notes.append(f"{name}: the estimate is {abs(len(ref) - len(est)) / rate:.2f} s {short}")
        scores, why = metrics.measure(ref, est, rate, extra, name, args.max_delay_ms)
        notes += [f"{name}: {w}" for w in why]
        rows.append({"path": name, **scores})
        if args.plot is not None:
            panels = [("reference", ref), (_label(f"estimate  {est_path.name}", scores), est)]
            save_figure(spectrogram_figure(panels, rate, title=name), plot_path(args.plot, name))
    report = {"reference": str(args.reference), "estimate": str(args.estimate), "metrics": keys, "files": rows,
              "mean": metrics.mean_metrics(rows, keys), "failed": failed, "notes": notes}  # fmt: skip
    return report, keys


def run(args: argparse.Namespace) -> int:
    if missing := metrics.missing_packages():  # an extra of the package (README: Install), checked before any work
        raise CliError(missing)
    # The inputs, collected once: checked against the outputs before any work, then evaluated.
    if args.checkpoint is not None:
        items, single = collect_inputs(args.input)
        names, inputs = [name for _, name in items], [f for f, _ in items] + list(args.input)
    else:
        pairs, single, notes = pair_files(args.reference, args.estimate)
        names = [name for name, _, _ in pairs]
        inputs = [f for _, ref, est in pairs for f in (ref, est) if f is not None] + [args.reference, args.estimate]
    csv_path = args.csv or args.output.with_suffix(".csv")
    for flag, path in (("--output", args.output), ("--csv", csv_path)):
        if path.is_dir():
            raise CliError(f"{flag} {path}: is a directory; it names the report file (e.g. {path / 'report.json'})")
    if args.plot is not None and args.plot.exists() and not args.plot.is_dir():
        raise CliError(f"--plot {args.plot}: is a file; it names a directory for the spectrogram PNGs")
    if (clash := overwritten_input([args.output, csv_path], inputs)) is not None:  # the report must not replace its input
        raise CliError(f"{clash[0]}: the report would overwrite the input {clash[1]}; choose another --output")
    plots = [plot_path(args.plot, name) for name in names] if args.plot is not None else []
    refuse_replacing([args.output, csv_path, *plots], args.overwrite)  # as inference.py: before any work
    failed: list[dict] = []
    if args.checkpoint is not None:
        report, keys = evaluate_checkpoint(args, items, failed)
    else:
        report, keys = evaluate_pairs(args, pairs, notes, failed)
    if single and failed:
        return EXIT_ERROR  # the one line is already on stderr; nothing to report
    write_reports(report, args.output, csv_path, keys)
    if "bandwidths" in report:
        for section in report["bandwidths"]:
            title = f"\n== {section['bandwidth']:g} kbps ({_codebooks(section['n_q'])}), {len(section['files'])} file(s)"
            print(format_table(title, section["files"], section["mean"], keys, args.quiet))
            print(format_codebooks(section))
    else:
        print(format_table(f"\n== {len(report['files'])} file(s)", report["files"], report["mean"], keys, args.quiet))
    print(f"\nwrote {args.output} and {csv_path}" + (f"; {len(failed)} file(s) failed" if failed else ""))
    return EXIT_SOME_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_args, run, argv, one_line=(CheckpointError, metrics.TranscriptError))


if __name__ == "__main__":
    sys.exit(main())
