"""Codes files and tokenized corpora: reading, writing, manifests, checking.

A tokenized corpus (``python inference.py --input corpus/ --codes-out codes/``) is a tree
of ``.npy`` files mirroring the input tree, one per audio file, int16, shape
``(n_q, frames)``, plus JSONL manifest(s) in the root of ``codes/``: ``manifest.jsonl``
for a single process, ``manifest.rank{R}.jsonl`` for rank R of a multi-process run (one
file per rank, never written concurrently). :func:`read_manifest` merges them all.

Each manifest line describes one finished file::

    {"path": "spk1/utt1.flac", "codes": "spk1/utt1.npy", "duration": 3.52, "samples": 56320,
     "sample_rate": 16000, "frames": 177, "n_q": 8, "bins": 1024, "bandwidth": 4.0,
     "checkpoint": "xcodec-3f2a..."}

(``checkpoint``: ``models.checkpoint_id`` of the model's files.)

A line is appended only after the codes file (and the audio, when asked for) is
completely written (atomically: temporary file + rename), so every manifest entry names
a complete file; a run killed at any point is finished by running the same command again.

Reading codes back::

    from corpus.codes import load_codes, iter_corpus
    codes = load_codes("codes/spk1/utt1.npy", bins=1024)    # LongTensor (n_q, frames)
    for entry, codes in iter_corpus("codes/"):               # checked against the manifest
        ...

Checking a corpus: ``python -m corpus.codes codes/`` (``--merge`` also writes one
``manifest.jsonl`` from the per-rank files).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from corpus.schema import MANIFEST_LINE, SIDECAR, check_record, read_json
from corpus.shards import (
    SHARD_RE,
    ShardError,
    index_files,
    iter_shard,
    lost_shards,
    merge_index,
    read_index,
    shard_format,
)
from utils.cli import DefaultsHelpFormatter, os_error_line
from utils.files import atomic_write, open_append, read_json_lines, temporary_target, tree_in_use

MANIFEST_NAME = "manifest.jsonl"
MANIFEST_GLOB = "manifest*.jsonl"


class CodesFileError(ValueError):
    """A codes file that cannot be used; the message names the file and the reason."""


# ---------------------------------------------------------------------------- files
def save_codes(path: str | Path, codes: np.ndarray, bins: int) -> None:
    """Save (n_q, frames) codes as .npy, atomically: int16 when the codebook fits, else int32."""
    dtype = np.int16 if bins <= 2**15 else np.int32
    codes = np.asarray(codes)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, codes.astype(dtype), allow_pickle=False)

    atomic_write(path, write)


def load_codes(
    path: str | Path,
    n_q_max: int | None = None,
    bins: int | None = 1024,
    *,
    n_q: int | None = None,
    frames: int | None = None,
) -> torch.Tensor:
    """Read a codes ``.npy`` file and check it; returns a ``LongTensor`` of shape (n_q, frames).

    Args:
        path: the ``.npy`` file (as written by ``inference.py --codes-out``).
        n_q_max: most codebooks allowed (a model's ``n_q``); ``None``: no limit.
        bins: codebook size; values must lie in ``[0, bins)`` (``None``: only ``>= 0``).
        n_q: exact number of codebooks required (e.g. from the manifest).
        frames: exact number of frames required (e.g. from the manifest).

    Raises:
        CodesFileError (a ``ValueError``) naming the file: unreadable, not integer, wrong
        shape, or values out of range.
    """
    try:
        codes = np.load(path, allow_pickle=False)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CodesFileError(f"{path}: not a readable .npy codes file ({reason})") from None
    return checked_codes(codes, str(path), n_q_max, bins, n_q=n_q, frames=frames)


def checked_codes(
    codes: np.ndarray, where: str, n_q_max: int | None = None, bins: int | None = 1024, *, n_q: int | None = None, frames: int | None = None
) -> torch.Tensor:
    """``codes`` as a ``LongTensor`` (n_q, frames) after the checks of :func:`load_codes` (``where`` names it)."""
    if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu":
        raise CodesFileError(f"{where}: codes must be integers (int16), got dtype {getattr(codes, 'dtype', type(codes))}")
    limit = n_q_max if n_q_max is not None else float("inf")
    if codes.ndim != 2 or not 1 <= codes.shape[0] <= limit or codes.shape[1] < 1:
        bound = f"1 <= n_q <= {n_q_max}" if n_q_max is not None else "n_q >= 1"
        raise CodesFileError(f"{where}: codes must have shape (n_q, frames) with {bound}, got {codes.shape}")
    if n_q is not None and codes.shape[0] != n_q:
        raise CodesFileError(f"{where}: expected {n_q} codebooks, found {codes.shape[0]}")
    if frames is not None and codes.shape[1] != frames:
        raise CodesFileError(f"{where}: expected {frames} frames, found {codes.shape[1]}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or (bins is not None and hi >= bins):
        raise CodesFileError(f"{where}: code values must lie in [0, {bins if bins is not None else 'inf'}), found [{lo}, {hi}]")
    return torch.from_numpy(codes.astype(np.int64))


# ---------------------------------------------------------------------------- manifests
def manifest_path(root: str | Path, rank: int = 0, world_size: int = 1) -> Path:
    """``manifest.jsonl`` for one process, ``manifest.rank{R}.jsonl`` for rank R of several."""
    root = Path(root)
    return root / MANIFEST_NAME if world_size == 1 else root / f"manifest.rank{rank}.jsonl"


def _read_lines(path: Path) -> list[dict]:
    try:
        rows = read_json_lines(path)
    except ValueError as exc:
        raise CodesFileError(str(exc)) from None
    return [check_record(entry, MANIFEST_LINE, f"{path}:{n}", CodesFileError) for n, entry in rows]


def read_manifest(root: str | Path) -> list[dict]:
    """Every entry of every manifest in ``root`` (all ranks), one per path, sorted by path.

    A path listed twice (its input changed and was tokenized again) keeps its latest entry
    (``written``, the time it was written; without one, the later line).
    """
    root = Path(root)
    by_path: dict[str, dict] = {}
    for path in sorted(root.glob(MANIFEST_GLOB)):
        for entry in _read_lines(path):
            old = by_path.get(entry["path"])
            if old is None or entry.get("written", 0) >= old.get("written", 0):
                by_path[entry["path"]] = entry
    return [by_path[k] for k in sorted(by_path)]


def has_manifest(root: str | Path) -> bool:
    """``root`` is a tokenized corpus (holds at least one manifest file)."""
    return Path(root).is_dir() and any(Path(root).glob(MANIFEST_GLOB))


def unchanged(entry: dict, source: tuple[int, int] | None) -> bool:
    """The input an entry describes is still the file ``source`` = (size, mtime_ns) describes.
    Entries written before sources were recorded count as unchanged."""
    if "source_size" not in entry:
        return True
    return source is not None and (entry["source_size"], entry.get("source_mtime_ns")) == tuple(source)


def sidecar_path(codes: str | Path) -> Path:
    """The metadata file of a single codes file: ``x.npy`` -> ``x.json``."""
    return Path(codes).with_suffix(".json")


def write_sidecar(codes_path: str | Path, fields: dict, codes: np.ndarray) -> Path:
    """Describe a single ``--codes-out x.npy`` in ``x.json`` (the fields of a manifest line:
    source name, samples, sample rate, n_q, frames, bins, bandwidth, checkpoint, precision)."""
    entry = {**fields, "codes": Path(codes_path).name, "n_q": int(codes.shape[0]), "frames": int(codes.shape[1])}
    entry["duration"] = round(entry["samples"] / entry["sample_rate"], 6)
    text = json.dumps(entry, ensure_ascii=False, indent=1) + "\n"
    return atomic_write(sidecar_path(codes_path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_sidecar(codes_path: str | Path) -> dict | None:
    """The ``x.json`` of ``x.npy`` (``None`` without one)."""
    path = sidecar_path(codes_path)
    return read_json(path, SIDECAR, CodesFileError) if path.is_file() else None


def source_lengths(codes: str | Path, sample_rate: int, hop_length: int) -> dict[Path, tuple[int, int] | CodesFileError]:
    """``{codes file (resolved): (samples of its source, frames)}`` from the sidecar of a single codes
    file or the manifest of the corpus that holds ``codes`` (a codes directory, or a file inside one,
    up to 4 levels deep), for entries made at ``sample_rate``; ``{}`` when neither exists.

    An entry whose ``samples`` is not ``frames * hop_length`` within one hop (it would stretch or
    cut the decoded audio) maps to a :class:`CodesFileError` naming the sidecar or corpus: that
    file's failure, not the run's.
    """
    codes = Path(codes)
    side = read_sidecar(codes) if codes.suffix == ".npy" else None
    if side is not None:
        found = {codes.resolve(): side} if side.get("sample_rate") == sample_rate else {}
        where = sidecar_path(codes)
    else:
        found, where = {}, None
        for root in [codes] if codes.is_dir() else list(codes.resolve().parents)[:4]:
            if has_manifest(root):
                entries = [e for e in read_manifest(root) if e.get("sample_rate") == sample_rate]
                found = {(root / e["codes"]).resolve(): e for e in entries}
                where = root
                break
    out = {}
    for path, entry in found.items():
        samples, frames = entry.get("samples"), entry.get("frames")
        if samples is None or frames is None:
            continue
        out[path] = (samples, frames)
        if abs(samples - frames * hop_length) > hop_length:
            out[path] = CodesFileError(
                f"{where}: samples {samples} disagrees with {frames} frames of {hop_length} samples "
                f"({entry.get('path', path.name)}); the description is corrupt"
            )
    return out


class ManifestWriter:
    """Appends entries to one manifest file, one JSON line each, flushed at once.

    A torn last line left by a killed run is removed before the first append.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open_append(self.path)

    def add(self, entry: dict) -> None:
        self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_manifests(root: str | Path) -> Path:
    """Write every rank's entries into one ``manifest.jsonl`` (the rank files are removed)."""
    root = Path(root)
    entries = read_manifest(root)
    target = root / MANIFEST_NAME

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            for entry in entries:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    atomic_write(target, write)
    for path in root.glob("manifest.rank*.jsonl"):
        path.unlink()
    return target


def iter_corpus(path: str | Path, bins: int | None = None) -> Iterator[tuple[dict, torch.Tensor]]:
    """The one reader of tokenized corpora: ``(entry, LongTensor (n_q, frames))`` for every file.

    Args:
        path: an npy corpus (``.npy`` files + manifests), a sharded one (parquet or webdataset
            shards + index, see ``corpus.shards``), one shard (``.parquet``/``.tar``) or one
            ``.npy`` (with its ``.json`` when there is one).
        bins: codebook size to check codes against (default: what each entry records).

    Every codes array is checked against its entry (``n_q``, ``frames``) and ``[0, bins)``;
    :class:`CodesFileError` names the file otherwise.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".npy":
        entry = read_sidecar(path) or {"path": path.name}
        yield entry, load_codes(path, None, bins or entry.get("bins"), n_q=entry.get("n_q"), frames=entry.get("frames"))
        return
    if path.is_file():
        shards = [path]
    elif shard_format(path) is not None:
        try:
            shards = [path / line["shard"] for line in read_index(path)]
        except ShardError as exc:
            raise CodesFileError(str(exc)) from None
    else:
        for entry in read_manifest(path):
            yield entry, load_codes(path / entry["codes"], None, bins or entry.get("bins"), n_q=entry["n_q"], frames=entry["frames"])
        return
    for shard in shards:
        try:
            for entry, codes in iter_shard(shard):
                where = f"{shard.name}: {entry.get('path')}"
                yield entry, checked_codes(codes, where, None, bins or entry.get("bins"), n_q=entry.get("n_q"), frames=entry.get("frames"))
        except ShardError as exc:
            raise CodesFileError(str(exc)) from None


# ---------------------------------------------------------------------------- checking
def check_shards(root: Path) -> tuple[int, list[str]]:
    """:func:`check_corpus` of a sharded corpus: every indexed shard readable with the rows its
    index line lists, each file once, no shard outside the index, no leftover temporary."""
    problems, seen, n = lost_shards(root), {}, 0
    lines = read_index(root, lost_ok=True)
    for line in lines:
        names = []
        try:
            for entry, codes in iter_shard(root / line["shard"]):
                names.append(entry["path"])
                checked_codes(codes, f"{line['shard']}: {entry['path']}", None, entry.get("bins"), n_q=entry["n_q"], frames=entry["frames"])
        except (ShardError, CodesFileError) as exc:
            problems.append(str(exc))
            continue  # its rows past the bad one are unknown: no count to compare
        if sorted(names) != sorted(f["path"] for f in line["files"]):
            problems.append(f"{line['shard']}: holds {len(names)} file(s), its index line lists {len(line['files'])}")
        for name in names:
            if name in seen:
                problems.append(f"{name}: in two shards, {seen[name]} and {line['shard']}")
            seen[name] = line["shard"]
        n += len(names)
    indexed = {line["shard"] for line in lines}
    for p in sorted(root.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in indexed:
            problems.append(f"{p.name}: shard not in any index")
        elif temporary_target(p.name) is not None:
            problems.append(f"{p.name}: leftover temporary file")
    return n, problems


def missing_ranks(root: Path) -> tuple[list[int], int]:
    """``(ranks without a per-rank file, world size)`` of the run(s) whose per-rank manifests or
    indexes ``root`` holds: ranks 0 .. W-1, W the largest world size their lines record (or the
    largest rank + 1). Every rank that ran leaves its file, even with nothing to write."""
    kind = "index" if shard_format(root) is not None else "manifest"
    named = [(re.fullmatch(rf"{kind}\.rank(\d+)\.jsonl", p.name), p) for p in root.glob(f"{kind}.rank*.jsonl")]
    files = {int(m.group(1)): p for m, p in named if m}
    if not files:
        return [], 0
    if kind == "index":  # a merged index.jsonl holds earlier runs, of other world sizes
        ranked = [entries for path, entries in index_files(root) if path in files.values()]
        lines = [e.get("settings") or {} for entries in ranked for e in entries]
    else:
        lines = [e for path in files.values() for e in _read_lines(path)]
    worlds = [w for e in lines if isinstance(w := e.get("world_size"), int) and not isinstance(w, bool)]
    world = max([max(files) + 1, *worlds])
    return sorted(set(range(world)) - set(files)), world


def check_corpus(root: str | Path) -> tuple[int, list[str]]:
    """Check a tokenized corpus: ``(entries, problems)`` where problems lists missing,
    unreadable or mis-shaped codes files (or shards), code files without a manifest entry,
    files listed twice and leftover temporaries."""
    root = Path(root)
    if shard_format(root) is not None:
        return check_shards(root)
    entries = read_manifest(root)
    problems = []
    listed: dict[str, str] = {}
    for entry in entries:
        if entry["codes"] in listed:
            problems.append(f"{entry['codes']}: written for two inputs, {listed[entry['codes']]} and {entry['path']}; one was lost")
        listed[entry["codes"]] = entry["path"]
        try:
            load_codes(root / entry["codes"], None, entry.get("bins"), n_q=entry["n_q"], frames=entry["frames"])
        except (CodesFileError, FileNotFoundError) as exc:
            problems.append(str(exc))
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".npy" and rel not in listed:
            problems.append(f"{rel}: codes file not in any manifest")
        elif temporary_target(path.name) is not None:
            problems.append(f"{rel}: leftover temporary file")
    return len(entries), problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check a tokenized corpus (npy + manifests, or parquet/webdataset shards + "
                                "index) and optionally merge the per-rank files.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("root", type=Path, help="the --codes-out directory of inference.py")
    p.add_argument("--check", action="store_true", help="check every file or shard (what the command always does)")
    p.add_argument("--merge", action="store_true", help="merge manifest.rank*.jsonl into manifest.jsonl (shards: "
                   "index.rank*.jsonl into index.jsonl); refused while a rank of the run has written nothing")
    p.add_argument("--allow-missing", action="store_true", help="--merge even though some ranks have written nothing "
                   "(their files are not in the corpus: tokenize them later with the same command)")
    args = p.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root}: not a directory", file=sys.stderr)
        return 2
    try:
        if args.merge:
            live = tree_in_use(args.root)
            if live is not None:
                print(f"error: {args.root}: a run is still writing into it ({live}); merge when it is done", file=sys.stderr)
                return 2
            missing, world = missing_ranks(args.root)
            if missing and not args.allow_missing:
                ranks = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
                print(f"error: {args.root}: rank(s) {ranks} of {world} have not run here (no per-rank file); run them "
                      "(the same command with their RANK) or pass --allow-missing", file=sys.stderr)  # fmt: skip
                return 2
            print(f"wrote {merge_index(args.root) if shard_format(args.root) else merge_manifests(args.root)}")
        n, problems = check_corpus(args.root)
    except (CodesFileError, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --merge into a read-only or full filesystem
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{n} file(s) in the corpus, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
