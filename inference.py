"""Encode and decode audio with X-Codec: files, directory trees, codes in and out.

    python inference.py --input speech.flac --output rec.wav
    python inference.py --input corpus/ --output rec/ --codes-out codes/ --batch-size 8
    python inference.py --codes-in codes/ --output rec/ --checkpoint model.pth --config config.yaml

Bad input exits non-zero with one line on stderr; in a directory run a bad file is reported and skipped, the rest
written, exit code 1.

Tokenizing a corpus (``--input DIR --codes-out DIR``, docs/tokenization.md): under ``torchrun`` each rank takes
every WORLD_SIZE-th file and appends a manifest line per finished file; a rerun skips what a manifest holds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from corpus.codes import CodesFileError, has_manifest, load_codes, source_lengths, write_sidecar
from corpus.corpus import CODES_SUFFIX, FORMATS, RunStats, refuse_existing, resume
from corpus.outputs import BackgroundWriter, Job, lock_output_trees, plan, write_outputs
from corpus.shards import shard_format
from data import AudioFiles, duration_order, file_loader
from models import CheckpointError, load_codec
from models.pipeline import Pipeline
from models.vocoder import Vocoder
from utils import distributed as du
from utils.audio import audio_extensions
from utils.cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, CliError, argument_parser, cli_main, resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser("X-Codec: encode audio to codes and decode codes to audio.")
    p.add_argument("--input", type=Path, help="audio file or directory (searched recursively)")
    p.add_argument("--output", type=Path, help="output .wav/.flac file, or a directory (mirrors the input tree, .wav files)")
    p.add_argument("--checkpoint", default="xcodec_hubert_librispeech", help="release name or checkpoint path")
    p.add_argument("--config", type=Path, help="YAML config for a .pth checkpoint (default: config.yaml beside it)")
    p.add_argument("-b", "--bandwidth", type=float, help="target bandwidth in kbps (default: the largest)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per forward pass for directories")
    p.add_argument("--workers", type=int, help="processes reading and resampling files ahead of the model "
                   "(default: up to 4 on CUDA, 0 on CPU)")
    p.add_argument("-r", "--rescale", action="store_true", help="rescale the output peak to 0.99 instead of clamping")
    p.add_argument("--codes-out", type=Path, help="write codes (.npy, int16 or int32, (n_q, frames)) to this file or directory")
    p.add_argument("--codes-in", type=Path, help="decode codes from this .npy file or directory")
    p.add_argument("--format", choices=FORMATS, default="npy", help="tokenized corpus: one .npy per file + manifests, "
                   "llasa (one 1-D <id>.wav.npy per file, as Llasa's training reads them; one codebook) + manifests, "
                   "or parquet / webdataset shards (see corpus/shards.py)")
    p.add_argument("--shard-size", type=int, default=10000, help="files per parquet/webdataset shard")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: exact codes (default); bf16: fast mode, codes agree with fp32 for most frames")
    p.add_argument("--window", type=float, default=30.0,
                   help="files longer than window + 2 * context seconds are encoded in windows (0: never)")
    p.add_argument("--context", type=float, default=5.0, help="seconds of context on each side of a window")
    p.add_argument("--vocoder", help="write 44.1 kHz audio with one of YuE's vocoders: vocals, instrumentals, "
                   "or a decoder_*.pth (config.yaml beside it); use YuE's codec (yue_xcodec_mini) at -b 4")
    p.add_argument("--low-freq-merge", action="store_true", help="with --vocoder: YuE's post-processing, the codec's "
                   "own audio below 5.5 kHz (energy-matched) under the vocoder's highs")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist (a tokenization "
                   "resuming in its own --codes-out never needs it)")
    args = p.parse_args(argv)
    refusals = (  # the first that applies is the error
        (args.codes_in is None and args.input is None, "one of --input or --codes-in is required"),
        (args.codes_in is not None and args.input is not None, "--input and --codes-in cannot be combined"),
        (args.codes_in is not None and args.output is None, "--codes-in needs --output"),
        (args.input is not None and args.output is None and args.codes_out is None,
         "--input needs --output and/or --codes-out"),
        (args.low_freq_merge and not args.vocoder, "--low-freq-merge needs --vocoder"),
        (args.vocoder and args.output is None, "--vocoder needs --output"),
        (args.format != "npy" and args.codes_out is None, f"--format {args.format} needs --codes-out"),
        (args.shard_size < 1, "--shard-size must be at least 1"),
        (args.batch_size < 1, "--batch-size must be at least 1"),
        (args.workers is not None and args.workers < 0, "--workers must be >= 0"),
        (not (0 <= args.window < float("inf") and 0 <= args.context < float("inf")),
         "--window and --context must be finite numbers >= 0"),
        (0 < args.window < 1, f"--window {args.window}: a window must be at least 1 second (0: never window); "
         "tiny windows make long files take hours"),
    )
    if refused := next((message for applies, message in refusals if applies), None):
        p.error(refused)
    return args


# ---------------------------------------------------------------------------- running
def _progress(items, enabled: bool, desc: str):
    return tqdm(items, desc=desc, unit="file", file=sys.stderr, dynamic_ncols=True, disable=not enabled)


def _batches(items, size: int, key=None):
    """Lists of up to ``size`` consecutive items; a change of ``key(item)`` starts a new list."""
    for _, group in itertools.groupby(items, key or (lambda item: None)):
        while batch := list(itertools.islice(group, size)):
            yield batch


def encode_jobs(pipe: Pipeline, jobs: list[Job], args: argparse.Namespace, many: bool, stats: RunStats) -> None:
    """Encode (and decode) every job, ``--batch-size`` clips at a time: ``--workers`` processes read the files
    two batches ahead, longest first (little padding; pinned memory on CUDA); a thread writes the results."""
    model, rate, device = pipe.model, pipe.model.sample_rate, pipe.model.device
    order = duration_order([j.src for j in jobs], [j.duration for j in jobs]) if many else list(range(len(jobs)))
    workers = args.workers if args.workers is not None else (min(16, max(1, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0)
    loader = file_loader(AudioFiles([j.src for j in jobs], rate), order, workers, pin_memory=device.type == "cuda", ahead=2 * args.batch_size)

    def readable():
        for index, wav, error in _progress(loader, many and stats.rank == 0, "encoding"):
            if error is None and pipe.too_short(len(wav)):
                error = f"{jobs[index].src}: {pipe.too_short(len(wav))}"
            if error is not None:
                stats.fail(error)
            else:
                yield jobs[index], wav

    def finish(job: Job, samples: int, item: np.ndarray, wav: np.ndarray | None) -> None:
        saved = item[0] if args.format == "llasa" else item  # Llasa reads one 1-D array of codes per clip
        if write_outputs(job, stats.fail, saved, wav, pipe.out_rate, args.rescale, model.bins):
            stats.wrote(job, samples, rate, item)
            if not many and job.codes_out is not None:  # a single codes file describes itself
                write_sidecar(job.codes_out, {"path": job.src.name, "samples": samples, "sample_rate": rate, **codes_fields(model, args)}, item)

    with closing(BackgroundWriter(depth=2 * args.batch_size)) as writer:
        for batch in _batches(readable(), args.batch_size):
            wavs = [w.to(device, non_blocking=True) for _, w in batch]
            codes, audio = pipe.encode_decode(wavs, decode=any(job.audio_out is not None for job, _ in batch))
            for i, (job, w) in enumerate(batch):
                wav = audio[i].float().cpu().numpy() if audio else None
                writer.submit(finish, job, len(w), codes[i].cpu().numpy(), wav)


def decode_jobs(pipe: Pipeline, jobs: list[Job], args: argparse.Namespace, many: bool, stats: RunStats) -> None:
    """Decode every codes file, ``--batch-size`` at a time (one number of codebooks a batch); audio
    is trimmed to the source's length where a manifest records it (else whole frames)."""
    model = pipe.model
    try:
        lengths = source_lengths(args.codes_in, model.sample_rate, model.hop_length)
    except CodesFileError as exc:
        raise CliError(str(exc)) from None

    def readable():
        for job in _progress(jobs, many and stats.rank == 0, "decoding"):
            try:
                known = lengths.get(job.src.resolve(), (None, None))  # (source samples, frames), where recorded
                if isinstance(known, CodesFileError):
                    raise known
                # The frames its description records: a description of other codes would cut or stretch the audio.
                codes = load_codes(job.src, model.n_q, model.bins, frames=known[1])
                if pipe.vocoder is not None:
                    pipe.vocoder.check_codec(model, codes.shape[0])
                yield job, codes, known[0]
            except ValueError as exc:
                stats.fail(str(exc) if str(exc).startswith(str(job.src)) else f"{job.src}: {exc}")

    def finish(job: Job, wav: np.ndarray) -> None:
        if write_outputs(job, stats.fail, None, wav, pipe.out_rate, args.rescale, model.bins):
            stats.written += 1
            stats.audio_seconds += len(wav) / pipe.out_rate

    with closing(BackgroundWriter(depth=2 * args.batch_size)) as writer:
        for batch in _batches(readable(), args.batch_size, key=lambda item: item[1].shape[0]):
            for (job, _, _), wav in zip(batch, pipe.decode([c for _, c, _ in batch], [n for _, _, n in batch])):
                writer.submit(finish, job, wav.float().cpu().numpy())


def shard_and_resume(pipe: Pipeline, jobs: list[Job], args: argparse.Namespace, many: bool, stats: RunStats) -> list:
    """This rank's share of ``jobs``, less the files an earlier run finished (see corpus.corpus). An existing
    output is replaced only with ``--overwrite``, or by a tokenization resuming in its own ``--codes-out``."""
    jobs = du.shard(jobs, stats.rank, stats.world_size)
    tokenizing = many and args.codes_in is None and args.codes_out is not None
    tracked = tokenizing and (has_manifest(args.codes_out) or shard_format(args.codes_out) is not None)
    if tokenizing:
        jobs = resume(jobs, args.codes_out, args.format, codes_fields(pipe.model, args), pipe.n_q, stats, args.shard_size)
    refuse_existing(jobs, args.overwrite, tracked)
    return jobs


def codes_fields(model, args: argparse.Namespace) -> dict:
    """What made the codes, recorded with every tokenized file (device: for the record; exact codes agree)."""
    bandwidth = float(args.bandwidth if args.bandwidth is not None else max(model.target_bandwidths))
    return {"bins": int(model.bins), "bandwidth": bandwidth, "checkpoint": model.checkpoint_id,
            "precision": args.precision, "device": model.device.type,
            "input_root": str(args.input.resolve()) if args.input is not None else None}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.codes_in is not None:
        jobs, many = plan(args.codes_in, {".npy"}, args.output, None)
    else:
        suffix = CODES_SUFFIX.get(args.format)  # None: shards (corpus.shards writes them)
        jobs, many = plan(args.input, audio_extensions(), args.output, suffix and args.codes_out, suffix or ".npy")
        if suffix is None and not many:
            raise CliError(f"--format {args.format} writes shards of a directory or list input; one file goes to --codes-out x.npy")
    stats = RunStats()
    try:
        stats.rank, stats.world_size = du.rank_and_world_size()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    locks = lock_output_trees([args.output, args.codes_out], many, stats.rank, stats.world_size)  # before the model load
    try:
        index = os.environ.get("LOCAL_RANK", os.environ.get("RANK"))  # several processes: each its own GPU
        if args.device is None and index is not None and index.isdigit() and torch.cuda.is_available():
            args.device = f"cuda:{int(index) % torch.cuda.device_count()}"
        model = load_codec(args.checkpoint, config=args.config, device=resolve_device(args.device))
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)  # the reader's pinning thread and every default allocation on this rank's GPU
        try:
            pipe = Pipeline(model, args.bandwidth, args.precision, args.window, args.context, low_freq_merge=args.low_freq_merge)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if args.format == "llasa" and pipe.n_q != 1:
            one = model.quantizer.n_q_for_bandwidth(low := min(model.target_bandwidths)) == 1
            fix = f"pass --bandwidth {low:g} (one codebook)" if one else "this model has no one-codebook bandwidth"
            raise CliError(f"--format llasa writes one codebook per clip (Llasa's 1-D codes); this run has {pipe.n_q} "
                           f"codebooks: {fix}")
        jobs = shard_and_resume(pipe, jobs, args, many, stats)
        if args.vocoder:
            pipe.vocoder = Vocoder.from_pretrained(args.vocoder, device=model.device, checkpoint=args.checkpoint)
            try:
                if args.codes_in is None:  # codes files are checked one by one
                    pipe.vocoder.check_codec(model, pipe.n_q)
            except ValueError as exc:
                raise CliError(f"--vocoder {args.vocoder}: {exc}") from None
        stats.start_clock()  # the speed reported leaves out start-up and loading
        if args.codes_in is not None:
            decode_jobs(pipe, jobs, args, many, stats)
        else:
            encode_jobs(pipe, jobs, args, many, stats)
    finally:
        stats.close()
        for lock in locks:
            lock.release()
    # One summary per job: rank 0's under torchrun; a failed single file's one error line is all.
    if (many and stats.rank == 0) or (not many and not stats.failed):
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(model.device) / 2**30:.2f} GiB" if model.device.type == "cuda" else ""
        print(stats.summary() + peak, file=sys.stderr)
    return (EXIT_SOME_FAILED if many else EXIT_ERROR) if stats.failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_args, run, argv, one_line=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
