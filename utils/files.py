"""Files on disk: atomic writes through a locked hidden temporary (``.{name}.XXXXXXXX.tmp``), the temporaries killed
writers leave, output-tree locks, files of ours never opened through a link (docs/reliability.md)."""

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic
    fcntl = None

TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class LinkedFileError(OSError):
    """A symbolic link where the tool keeps a file of its own (a lock, a manifest, an index)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def open_own(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a file of ours written in place; LinkedFileError for a symbolic link (target untouched)."""
    try:
        return os.open(path, flags | NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)  # the umask applies
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise LinkedFileError(exc.errno, "a symbolic link where this tool keeps its own file; remove the link "
                                  "(its target is not touched)", str(path)) from None  # fmt: skip
        raise


def open_append(path: str | Path):
    """The one appender of JSON-lines files (created if missing), a torn last line cut off first."""
    drop_torn_line(path)
    return os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")


def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_paths(*paths: Path) -> None:
    """Make files and renames in directories durable (where the filesystem supports it)."""
    for path in paths:
        try:
            fd = os.open(str(path), os.O_RDONLY)
        except OSError:
            continue
        with contextlib.suppress(OSError):  # some filesystems do not fsync directories
            os.fsync(fd)
        os.close(fd)


def try_lock(fd: int) -> bool:
    """An exclusive advisory lock on ``fd`` without waiting; ``False`` if another holds it (no locks: ``True``)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass  # a filesystem without locks
    return True


@contextlib.contextmanager
def _locked(path: str, fd: int | None = None):
    """Hold a lock on the temporary ``path`` (``fd``: open read-write, as NFS locks only for writers)."""
    fd = os.open(path, os.O_RDWR if os.path.isfile(path) else os.O_RDONLY) if fd is None else fd
    try:
        try_lock(fd)
        yield
    finally:
        os.close(fd)


def temporary_name(target: str) -> str:
    return f"{TMP_PREFIX}{target}."


def temporary_target(name: str) -> str | None:
    """The name a temporary of :func:`atomic_write` / :func:`atomic_directory` stands for, else ``None``."""
    if not (name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[len(TMP_PREFIX) : -len(TMP_SUFFIX)].rsplit(".", 1)
    return parts[0] if len(parts) == 2 and parts[0] else None


def _claimed_temporary(target: Path, directory: bool = False) -> tuple[int, str]:
    """A new temporary beside ``target``, open and locked: ``(fd, path)``. Another rank's clean-up may remove
    it between its creation and its lock (it looks like a dead writer's): then it is made again."""
    while True:
        where = {"dir": target.parent, "prefix": temporary_name(target.name), "suffix": TMP_SUFFIX}
        if directory:
            tmp = tempfile.mkdtemp(**where)
            try:
                fd = os.open(tmp, os.O_RDONLY)
            except FileNotFoundError:
                continue
        else:
            fd, tmp = tempfile.mkstemp(**where)
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a filesystem without locks
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a cleaner that holds it while removing it
        if _same_file(fd, Path(tmp)):
            return fd, tmp
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], Any], durable: bool = False) -> Path:
    """``write(tmp_path)`` a temporary beside ``path``, renamed over it (``durable``: fsynced, for power cuts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _claimed_temporary(path)
    try:
        with _locked(tmp, fd):
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
            write(tmp)
            if durable:
                fsync_paths(Path(tmp))
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_paths(path.parent)
    return path


def atomic_directory(final: str | Path, write: Callable[[Path], Any], durable: bool = False) -> Path:
    """``write(tmp_dir)`` a temporary directory beside ``final``, put in its place once complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = _claimed_temporary(final, directory=True)
    tmp = Path(name)
    try:
        with _locked(name, fd):
            tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700 directories
            write(tmp)
            files = [p for p in tmp.rglob("*") if p.is_file()]
            for p in files:
                p.chmod(0o666 & ~umask())
            if durable:
                fsync_paths(*files)
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
        fsync_paths(final.parent)
    return final


def read_json_lines(path: str | Path) -> list[tuple[int, Any]]:
    """``[(line number, value)]`` of a JSON-lines file, blank and torn last lines skipped; else ValueError."""
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
            if i < len(lines) - 1:  # else torn: the writer died mid-line
                raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return out


def drop_torn_line(path: str | Path) -> None:
    """Cut a torn last line (no newline: a killed writer's) off a JSON-lines file before appending."""
    try:
        fd = open_own(path, os.O_RDWR)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "r+b") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def remove_stale_temporaries(directory: str | Path, targets: Iterable[str] | None = None) -> list[Path]:
    """Delete and return the unlocked temporaries in ``directory`` (of ``targets`` only, if given)."""
    wanted = None if targets is None else set(targets)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        target = temporary_target(entry.name)
        if target is not None and (wanted is None or target in wanted) and _remove_unlocked(entry):
            removed.append(Path(entry.path))
    return removed


def _remove_unlocked(entry: os.DirEntry) -> bool:
    """Remove a temporary no live writer holds, holding its lock meanwhile (a writer waits for it, then
    sees its temporary gone and makes another: see :func:`_claimed_temporary`)."""
    is_dir = entry.is_dir(follow_symlinks=False)
    try:
        fd = os.open(entry.path, (os.O_RDONLY if is_dir else os.O_RDWR) | getattr(os, "O_NONBLOCK", 0) | NOFOLLOW)
    except OSError:
        return False  # gone, or a link: no live writer of ours holds it
    try:
        if not try_lock(fd) or not _same_file(fd, Path(entry.path)):
            return False
        if is_dir:
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _in_use(path: str) -> bool:
    try:
        mode = os.O_RDWR if os.path.isfile(path) else os.O_RDONLY
        fd = os.open(path, mode | getattr(os, "O_NONBLOCK", 0) | NOFOLLOW)
    except OSError:
        return False  # gone, or a link: no live writer of ours holds it
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)  # closing releases the probe's own lock


class TreeLock(contextlib.AbstractContextManager):
    """An advisory lock on output tree ``root`` until :meth:`release` or exit: rank R holds ``.xcodec.rank{R}.lock``
    exclusively and ``.xcodec.world{W}.lock`` shared, so a run with the same ranks or another world size is refused
    (TreeLockedError); a killed run's unlocked lock files are taken over."""

    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.path, self._root = root / f".xcodec.rank{rank}.lock", root
        self._held: list[tuple[int, Path]] = []
        try:
            fd = self._take(self.path, fcntl.LOCK_EX if fcntl else 0)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, rank {rank} of {world_size}".encode(), 0)
            self._take(root / f".xcodec.world{world_size}.lock", fcntl.LOCK_SH if fcntl else 0)
            for other in root.glob(".xcodec.world*.lock"):
                if other.name != f".xcodec.world{world_size}.lock" and _in_use(str(other)):
                    n = other.name[len(".xcodec.world") : -len(".lock")]
                    found = f"a run with {n} process(es) is writing into this directory; this one has {world_size}"
                    raise TreeLockedError(f"{root}: {found}: wait for it or choose another output")
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path, mode: int) -> int:
        for attempt in range(100):  # a releasing run may delete the file between our open and our lock: open it again
            fd = open_own(path, os.O_RDWR | os.O_CREAT)
            self._held.append((fd, path))
            try:
                if fcntl is not None:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not (mode & fcntl.LOCK_SH) or attempt == 99:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                    found = f"another run is writing into this directory ({holder})"
                    raise TreeLockedError(f"{self._root}: {found}; wait for it or choose another output") from None
                time.sleep(0.01)  # a world lock is held exclusively only for an instant (a probe, or a deleting holder)
            except OSError:
                return fd  # a filesystem without locks: behave as before
            else:
                if fcntl is None or _same_file(fd, path):
                    return fd
            self._held.pop()
            os.close(fd)
        raise TreeLockedError(f"{self._root}: lock files keep being replaced; is another run starting and stopping?")

    def release(self) -> None:
        """Unlock, deleting first (while locked) the lock files this process holds alone and a killed run's."""
        for fd, path in reversed(self._held):
            _unlink_if_unlocked(path, fd)
        if self._held:
            for left in self._root.glob(".xcodec.*.lock"):
                _unlink_if_unlocked(left)
        self._held = []

    def __exit__(self, *exc) -> None:
        self.release()


def _unlink_if_unlocked(path: Path, fd: int | None = None) -> None:
    """Delete a lock file that no other process holds (``fd``: ours, open; closed here)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | NOFOLLOW) if fd is None else fd
    except OSError:
        return
    try:
        if fcntl is not None and _same_file(fd, path):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a shared lock: only its last holder gets this
            path.unlink()
    except OSError:
        pass  # held by another process, or already gone
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """``path`` (not followed) still names the file open as ``fd``."""
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def tree_in_use(root: str | Path) -> str | None:
    """The lock file of a live run writing into ``root`` (its rank locks), else ``None``."""
    return next((lock.name for lock in sorted(Path(root).glob(".xcodec.rank*.lock")) if _in_use(str(lock))), None)


class TreeLockedError(OSError):
    """The output tree is locked by a live run."""


def remove_stale_temporaries_of(paths: Iterable[Path]) -> int:
    """:func:`remove_stale_temporaries` for target files in any directories; returns how many."""
    by_dir: dict[Path, set[str]] = {}
    for p in map(Path, paths):
        by_dir.setdefault(p.parent, set()).add(p.name)
    return sum(len(remove_stale_temporaries(d, names)) for d, names in by_dir.items())


def missing(path: str | Path) -> str:
    """Why listed ``path`` cannot be opened: no such file, or a link to nothing."""
    if Path(path).is_symlink():  # exists() follows the link
        return f"{path}: a symbolic link that leads nowhere (dangling, or a loop of links)"
    return f"{path}: no such file or directory"


def overwritten_input(outputs: Iterable[Path | None], inputs: Iterable[Path]) -> tuple[Path, Path] | None:
    """``(output, input)`` for the first output that resolves to an input file (links, ``..``), else ``None``."""

    def resolved(p) -> Path | None:  # a NUL byte, a link loop: its reader or writer reports it
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            return Path(p).resolve() if isinstance(p, (str, Path)) else None  # a dataset row is no file
        return None

    sources = {resolved(p): p for p in inputs}
    sources.pop(None, None)
    for out in outputs:
        if out is not None and resolved(out) in sources:
            return Path(out), Path(sources[resolved(out)])
    return None


def output_collision(pairs: Iterable[tuple[Path | None, Path]]) -> tuple[Path, Path, Path] | None:
    """``(output, first input, second input)`` when two inputs write one output (``a.wav``, ``a.flac``), else None."""
    seen: dict[Path, Path] = {}
    for out, src in pairs:
        first = src if out is None else seen.setdefault(Path(os.path.abspath(out)), src)
        if first != src:
            return Path(out), first, src
    return None
