"""Files on disk: atomic writes of files and directories, their leftovers, locks (inputs: utils.inputs).

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
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic
    fcntl = None

TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"


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
def _locked(path: str, fd: int | None = None):
    """Hold an advisory lock on ``path`` (a temporary being written; ``fd`` its open descriptor,
    opened read-write: NFS grants exclusive locks only to writers) for the block."""
    fd = os.open(path, os.O_RDWR if os.path.isfile(path) else os.O_RDONLY) if fd is None else fd
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
    try:
        with _locked(tmp, fd):  # locked from its first instant: no cleaner can take it for a dead writer's
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
            old = None
            if final.exists():  # moved aside first: a kill now leaves the old copy, not nothing
                old = final.with_name(f"{temporary_name(final.name)}old{TMP_SUFFIX}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        fsync_dir(final.parent)
    return final


# ---------------------------------------------------------------------------- append-only JSON-lines files
def read_json_lines(path: str | Path) -> list[tuple[int, Any]]:
    """``[(line number, value)]`` of an append-only JSON-lines file (manifests, shard indexes);
    blank lines are skipped and a torn last line (a killed writer's) is not an entry.

    Raises:
        ValueError: naming the file (and line): unreadable, not UTF-8, or a line that is not JSON.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); expected JSON lines") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append((i + 1, json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn: the writer died mid-line
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return out


def drop_torn_line(path: str | Path) -> None:
    """Cut a torn last line (no newline: a killed writer's) off a JSON-lines file before appending."""
    path = Path(path)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)


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
        fd = os.open(path, (os.O_RDWR if os.path.isfile(path) else os.O_RDONLY) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)  # closing releases the probe's own lock


class TreeLock:
    """An advisory lock on an output tree, held until :meth:`release` or the process ends.

    Rank R holds ``{root}/.xcodec.rank{R}.lock`` exclusively and ``.xcodec.world{W}.lock``
    shared; a run whose world size differs from a live one's is refused (its ranks would
    take other shares of the same files), and so is a second run with the same ranks.

    Args:
        root: the output directory (created if needed).
        rank: this process's rank.
        world_size: the number of processes of the run.

    Raises:
        TreeLockedError: another live process holds it.
    """

    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f".xcodec.rank{rank}.lock"
        self._fds: list[int] = []
        try:
            self._take(self.path, fcntl.LOCK_EX if fcntl else 0, root)
            os.ftruncate(self._fds[0], 0)
            os.pwrite(self._fds[0], f"pid {os.getpid()} on {socket.gethostname()}, rank {rank} of {world_size}".encode(), 0)
            self._take(root / f".xcodec.world{world_size}.lock", fcntl.LOCK_SH if fcntl else 0, root)
            for other in root.glob(".xcodec.world*.lock"):
                if other.name != f".xcodec.world{world_size}.lock" and _in_use(str(other)):
                    raise TreeLockedError(f"{root}: a run with {other.name[len('.xcodec.world'):-len('.lock')]} process(es) is writing "
                                          f"into this directory; this one has {world_size}: wait for it or choose another output")  # fmt: skip
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path, mode: int, root: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        self._fds.append(fd)
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise TreeLockedError(f"{root}: another run is writing into this directory ({holder}); wait for it or choose another output") from None
        except OSError:
            pass  # a filesystem without locks: behave as before

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> TreeLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def tree_in_use(root: str | Path) -> str | None:
    """The lock file of a live run writing into ``root`` (its rank locks), else ``None``."""
    for lock in sorted(Path(root).glob(".xcodec.rank*.lock")):
        if _in_use(str(lock)):
            return lock.name
    return None


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
