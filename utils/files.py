"""Files on disk: atomic writes of files and directories, their leftovers, input collection.

Every writer of the project goes through :func:`atomic_write` or :func:`atomic_directory`:
the content is written under a hidden temporary name beside the target
(``.{name}.XXXXXXXX.tmp``) and renamed over it when complete, so a reader never sees a
partial file and a process killed mid-write leaves the old file (or none) plus a
temporary that :func:`remove_stale_temporaries` deletes at the next start. A writer holds
an advisory lock (``flock``) on its temporary while it writes, and a temporary that is
locked belongs to a live writer: it is never deleted. :class:`TreeLock` keeps a second run
out of an output tree that a first one is still writing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from utils.audio import DatasetAudio, open_audio_dataset

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic
    fcntl = None

TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"
LIST_SUFFIXES = {".txt", ".lst", ".list", ".scp", ".tsv"}
MANIFEST_SUFFIXES = {".jsonl", ".csv"}  # rows of path[, id, duration]


# ---------------------------------------------------------------------------- atomic writes
def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (where the filesystem supports it)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; ``False`` if another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # a filesystem without locks: behave as before
    return True


@contextlib.contextmanager
def _locked(path: str):
    """Hold an advisory lock on ``path`` (a temporary being written) for the block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try_lock(fd)
        yield
    finally:
        os.close(fd)


def temporary_name(target: str) -> str:
    """The prefix of temporaries standing for ``target`` (``.{target}.``)."""
    return f"{TMP_PREFIX}{target}."


def temporary_target(name: str) -> str | None:
    """The name a temporary of :func:`atomic_write` / :func:`atomic_directory` stands for, else ``None``."""
    if not (name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[len(TMP_PREFIX) : -len(TMP_SUFFIX)].rsplit(".", 1)
    return parts[0] if len(parts) == 2 and parts[0] else None


def atomic_write(path: str | Path, write: Callable[[str], Any], durable: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: the final file.
        write: fills the temporary file given its path.
        durable: fsync the file and its directory (checkpoints: survive a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_name(path.name), suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        with _locked(tmp):
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
            write(tmp)
            if durable:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_directory(final: str | Path, write: Callable[[Path], Any], durable: bool = False) -> Path:
    """Fill a temporary directory beside ``final`` with ``write(tmp_dir)``, then put it in
    place of ``final`` (an existing ``final`` is replaced only once the new one is complete)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temporary_name(final.name), suffix=TMP_SUFFIX))
    try:
        with _locked(str(tmp)):
            tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700 directories
            write(tmp)
            for p in tmp.rglob("*"):
                if p.is_file():
                    p.chmod(0o666 & ~umask())
                    if durable:
                        with open(p, "rb") as fh:
                            os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        fsync_dir(final.parent)
    return final


def remove_stale_temporaries(directory: str | Path, targets: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporaries left in ``directory`` by a killed writer; returns them.

    A temporary whose writer is alive (it holds the temporary's lock) is left alone.

    Args:
        directory: where to look (not recursive).
        targets: only temporaries of these file names (``None``: every temporary).
    """
    wanted = None if targets is None else set(targets)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        target = temporary_target(entry.name)
        if target is None or (wanted is not None and target not in wanted) or _in_use(entry.path):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


def _in_use(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)  # closing releases the probe's own lock


class TreeLock:
    """An advisory lock on an output tree: ``{root}/.xcodec.lock`` (``.xcodec.rank{R}.lock``
    for rank R of several processes), held until :meth:`release` or the process ends.

    Args:
        root: the output directory (created if needed).
        rank: this process's rank; ranks of one run lock different files.

    Raises:
        TreeLockedError: another live process holds it.
    """

    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / (".xcodec.lock" if world_size == 1 and rank == 0 else f".xcodec.rank{rank}.lock")
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        if not try_lock(self._fd):
            holder = os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise TreeLockedError(f"{root}: another run is writing into this directory ({holder}); wait for it or choose another output")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else 'this host'}".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TreeLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class TreeLockedError(OSError):
    """The output tree is locked by a live run."""


def remove_stale_temporaries_of(paths: Iterable[Path]) -> int:
    """:func:`remove_stale_temporaries` for a set of target files in any directories; returns how many."""
    by_dir: dict[Path, set[str]] = {}
    for p in paths:
        by_dir.setdefault(Path(p).parent, set()).add(Path(p).name)
    return sum(len(remove_stale_temporaries(d, names)) for d, names in by_dir.items())


def overwritten_input(outputs: Iterable[Path | None], inputs: Iterable[Path]) -> tuple[Path, Path] | None:
    """``(output, input)`` for the first output that would be written onto an input file (paths
    resolved: links and ``..`` included), else ``None``. Tools call it before any work."""
    sources = {}
    for p in inputs:
        if not isinstance(p, (str, Path)):
            continue  # a dataset row is no file
        try:
            sources[Path(p).resolve()] = Path(p)
        except OSError:
            continue
    for out in outputs:
        if out is not None and Path(out).resolve() in sources:
            return Path(out), sources[Path(out).resolve()]
    return None


def output_collision(pairs: Iterable[tuple[Path | None, Path]]) -> tuple[Path, Path, Path] | None:
    """``(output, first input, second input)`` when two inputs would write the same output
    (e.g. ``a.wav`` and ``a.flac`` both to ``a.npy``), else ``None``. Tools call it before any work."""
    seen: dict[Path, Path] = {}
    for out, src in pairs:
        if out is None:
            continue
        key = Path(os.path.abspath(out))
        if key in seen and seen[key] != src:
            return Path(out), seen[key], src
        seen[key] = src
    return None


# ---------------------------------------------------------------------------- input collection
def scan_directory(root: str | Path, suffixes: set[str], exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Files under ``root`` whose lower-case extension is in ``suffixes``, sorted by path.

    Directory symlinks are not followed (a link loop cannot recurse forever); a dangling
    file link is listed, so that reading it reports it instead of dropping it silently.
    Directories in ``exclude`` (a run's own output directories inside its input tree) are
    not entered: a rerun never reads its outputs as inputs.
    """
    root = Path(root)
    skip = {Path(p).resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if skip:
            dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).resolve() not in skip]
        found += [Path(dirpath) / n for n in filenames if Path(n).suffix.lower() in suffixes]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_file_list(path: str | Path) -> list[Path]:
    """Paths of a list file: one a line (its first tab-separated field), blank lines and
    ``#`` comments skipped. A relative path is taken from the working directory when it
    exists there, else from the list's own directory."""
    path = Path(path)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.split("\t")[0].strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry)
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        out.append(p)
    return out


def is_file_list(path: str | Path) -> bool:
    """A list file (``.txt``, ``.lst``, ``.list``, ``.scp``, ``.tsv``) rather than an audio file."""
    path = Path(path)
    return path.suffix.lower() in LIST_SUFFIXES and path.is_file()


@dataclass(frozen=True)
class InputItem:
    """One input of a run.

    Attributes:
        source: the file, or a :class:`utils.audio.DatasetAudio` row.
        name: its relative name (outputs mirror it: ``name`` with the output's extension).
        duration: seconds, when the input listing says (saves reading headers for the order).
    """

    source: Path | DatasetAudio
    name: Path
    duration: float | None = None


def is_dataset(path: str | Path) -> bool:
    """A Hugging Face ``save_to_disk`` directory, or a parquet file (with an ``audio`` column)."""
    path = Path(path)
    return (path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()) or (
        path.is_file() and path.suffix == ".parquet"
    )


def read_input_manifest(path: str | Path) -> list[InputItem]:
    """A JSONL (one object a line) or CSV (a header row) listing ``path`` and optionally ``id``
    (the name outputs get; default: the path as listed) and ``duration`` (seconds). Relative
    paths are taken as :func:`read_file_list` takes them.

    Raises:
        ValueError: a row without ``path``, a bad duration, a file that is not UTF-8 (one line).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("path"):
            raise ValueError(f"{path}: row {i + 1} has no 'path'")
        p = Path(str(row["path"]))
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        duration = row.get("duration")
        try:
            duration = float(duration) if duration not in (None, "") else None
        except (TypeError, ValueError):
            raise ValueError(f"{path}: row {i + 1}: duration {duration!r} is not a number") from None
        name = Path(str(row["id"]) + p.suffix) if row.get("id") not in (None, "") else Path(str(row["path"]))
        items.append(InputItem(p, name, duration))
    return items


def dataset_items(path: str | Path) -> list[InputItem]:
    """The rows of a dataset's ``audio`` column (see :func:`is_dataset`): named by an ``id``
    column when there is one, else by the audio's own file name, else by the row number."""
    ds = open_audio_dataset(path)
    ids = ds["id"] if "id" in ds.column_names else None
    audio = ds.data.table.column("audio")  # Arrow, memory-mapped: the names without reading any audio
    names = audio.combine_chunks().field("path").to_pylist() if pa.types.is_struct(audio.type) and audio.type.get_field_index("path") >= 0 else [None] * len(ds)
    items = []
    for row, own in enumerate(names):
        own = Path(own or "").name
        suffix = Path(own).suffix or ".wav"
        name = Path(f"{ids[row]}{suffix}") if ids is not None else Path(own) if own else Path(f"{row:08d}.wav")
        items.append(InputItem(DatasetAudio(str(path), row, name.as_posix()), name))
    return items


def collect_inputs(source: str | Path, suffixes: set[str], exclude: Iterable[str | Path] = ()) -> list[InputItem]:
    """The one input collector: a directory (scanned recursively, ``exclude`` not entered), a
    list file, a JSONL/CSV manifest, a Hugging Face dataset (``save_to_disk`` directory or
    parquet with an ``audio`` column; local files only), or a single file."""
    source = Path(source)
    if is_dataset(source):
        return dataset_items(source)
    if source.is_dir():
        return [InputItem(f, f.relative_to(source)) for f in scan_directory(source, suffixes, exclude)]
    if source.suffix.lower() in MANIFEST_SUFFIXES and source.is_file():
        return read_input_manifest(source)
    if is_file_list(source):
        return [InputItem(f, f) for f in read_file_list(source)]
    return [InputItem(source, Path(source.name))]


def collect_files(source: str | Path, suffixes: set[str]) -> list[tuple[Path, Path]]:
    """:func:`collect_inputs` as ``[(file, name)]`` for a directory (scanned recursively;
    ``name`` relative to it), a list file (``name`` as listed) or a single file (its name).

    Existence of listed files is not checked here: a missing file is reported when read.
    """
    return [(i.source, i.name) for i in collect_inputs(source, suffixes)]
