"""What a command-line run writes and where: jobs (input -> outputs), their checks (all before
any work, see :func:`plan`), writers, locks."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corpus.codes import save_codes
from corpus.inputs import InputItem, collect_inputs, is_listing
from utils import files
from utils.audio import OUTPUT_FORMATS, DatasetAudio, audio_extensions, save_audio
from utils.cli import CliError
from utils.files import atomic_write, missing, output_collision, overwritten_input


@dataclass
class Job:
    """One input file and where its results go."""

    src: Path | DatasetAudio
    rel: Path  # path relative to the input root (the file name for a single file)
    audio_out: Path | None
    codes_out: Path | None
    source: tuple[int, int] | None = None  # (size, mtime_ns) of src when planned (resume key)
    duration: float | None = None  # seconds, when the input listing gives it

    @property
    def outputs(self) -> list[Path]:
        return [p for p in (self.audio_out, self.codes_out) if p is not None]


def _target(root: Path | None, rel: Path, suffix: str, is_dir: bool) -> Path | None:
    if root is None or not is_dir:
        return root
    out = (root / rel).with_suffix(suffix)
    # Never write outside the output root, whatever the input names hold.
    if not out.resolve().is_relative_to(root.resolve()):
        raise CliError(f"{rel}: output path would escape {root}")
    return out


def plan(src: Path, suffixes: set[str], audio_root: Path | None, codes_root: Path | None,
         codes_suffix: str = ".npy") -> tuple[list[Job], bool]:  # fmt: skip
    """The jobs for a file or a directory: ``(jobs, is_directory_run)``; a directory's codes files are named
    ``<rel less its suffix><codes_suffix>``. Refused here, before any work: a file name
    as a directory run's output, an output onto an input, an unwritable format, two inputs onto one output."""
    if not src.exists():
        raise CliError(missing(src))
    many = src.is_dir() or is_listing(src)
    if many:
        for root, flag in ((audio_root, "--output"), (codes_root, "--codes-out")):
            if root is not None and not root.is_dir() and root.suffix.lower() in audio_extensions() | {".npy"}:
                raise CliError(f"{flag} {root}: the input is a directory or a list, so this must be a directory, "
                               "not a file name")  # fmt: skip
        outputs = [r for r in (audio_root, codes_root) if r is not None]
        try:
            items = collect_inputs(src, suffixes, exclude=outputs)  # a rerun never reads its own outputs
        except (ValueError, OSError, ImportError) as exc:
            raise CliError(str(exc)) from None
        if not items:
            raise CliError(f"{src}: no files with extensions {', '.join(sorted(suffixes))} found")
    else:
        items = [InputItem(src, Path(src.name))]
    audio_dir, codes_dir = (r is not None and (many or r.is_dir() or str(r).endswith(os.sep) or r.suffix == "")
                            for r in (audio_root, codes_root))  # fmt: skip
    jobs, names = [], {}
    try:
        for item in items:
            f, rel = item.source, item.name.relative_to(item.name.anchor) if item.name.is_absolute() else item.name
            name = rel.as_posix()
            if name in names:  # one name, two inputs: a corpus row would stand for either
                raise CliError(f"{names[name]} and {f} have the same name {name}: give them distinct ids")
            names[name] = f
            outs = _target(audio_root, rel, ".wav", audio_dir), _target(codes_root, rel, codes_suffix, codes_dir)
            jobs.append(Job(f, rel, *outs, duration=item.duration))
    except ValueError as exc:  # e.g. a NUL byte in a listed path
        raise CliError(f"{src}: unusable input name ({exc})") from None
    if (onto := overwritten_input([p for j in jobs for p in j.outputs], [j.src for j in jobs])) is not None:
        raise CliError(f"{onto[0]}: an output would overwrite the input {onto[1]}; choose another output path")
    if not audio_dir and jobs[0].audio_out is not None and jobs[0].audio_out.suffix.lower() not in OUTPUT_FORMATS:
        raise CliError(f"--output {jobs[0].audio_out}: audio is written as {' or '.join(OUTPUT_FORMATS)}")
    if (clash := output_collision((out, j.src) for j in jobs for out in j.outputs)) is not None:
        raise CliError(f"{clash[1]} and {clash[2]} would both be written to {clash[0]} (outputs are named by the "
                       "input's stem): rename one of them or run them separately")  # fmt: skip
    return jobs, many


def write_outputs(job: Job, fail: Callable[[str], None], codes: np.ndarray | None, audio: np.ndarray | None, rate: int,
                  rescale: bool, bins: int) -> bool:  # fmt: skip
    """Write a job's codes and/or audio (16-bit WAV, or FLAC by the extension), each atomically; a target that
    cannot be written fails this job with one line (what it wrote is removed) and the run goes on."""
    written: list[Path] = []
    for target in (t for t in (job.codes_out, job.audio_out) if t is not None):
        try:
            if target == job.codes_out:
                save_codes(target, codes, bins)
            else:
                fmt = OUTPUT_FORMATS.get(target.suffix.lower(), "WAV")
                atomic_write(target, lambda tmp, fmt=fmt: save_audio(tmp, audio, rate, rescale, format=fmt))
            written.append(target)
        except OSError as exc:
            fail(f"{target}: cannot write ({exc.strerror or exc})")
            for done in written:
                done.unlink(missing_ok=True)
            return False
    return True


def refuse_replacing(paths: list[Path], overwrite: bool) -> None:
    """Existing outputs are replaced only with ``--overwrite`` (every tool); else a CliError naming the first."""
    existing = [p for p in paths if p.is_file()]
    if existing and not overwrite:
        raise CliError(f"{existing[0]}: exists ({len(existing)} output file(s) would be replaced); "
                       "pass --overwrite to replace them")  # fmt: skip


def lock_output_trees(roots: list[Path | None], many: bool, rank: int, world: int) -> list[files.TreeLock]:
    """An advisory lock per output directory of a directory run: a second run there stops with one line."""
    if not many:
        return []
    locks: list[files.TreeLock] = []
    try:
        for root in dict.fromkeys(r for r in roots if r is not None):
            locks.append(files.TreeLock(root, rank, world))
    except OSError as exc:  # a TreeLockedError too
        for lock in locks:
            lock.release()
        known = isinstance(exc, (files.TreeLockedError, files.LinkedFileError))
        raise CliError(str(exc) if known else f"{exc.filename}: cannot write ({exc.strerror})") from None
    return locks


class BackgroundWriter:
    """Runs the writes of finished jobs in order on one thread behind the model (at most ``depth`` queued); a
    write that raises raises again in the caller's thread, at the next :meth:`submit` or at :meth:`close`."""

    def __init__(self, depth: int = 64) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="xcodec-writer")
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., object], *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while self._pending and (len(self._pending) > self.depth or self._pending[0].done()):
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for every queued write (also when the loop stopped on an error)."""
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
