"""Input collection: the one collector of a run's inputs (directories, lists, JSONL/CSV
manifests, Hugging Face datasets) and the pairing of two trees by relative path."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from utils.audio import DatasetAudio, open_audio_dataset

LIST_SUFFIXES = {".txt", ".lst", ".list", ".scp", ".tsv"}
MANIFEST_SUFFIXES = {".jsonl", ".csv"}  # rows of path[, id, duration]


def scan_directory(root: str | Path, suffixes: set[str], exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Files under ``root`` whose lower-case extension is in ``suffixes``, sorted by path. Directory links are
    not followed (no loops); a dangling file link is listed (reading reports it); ``exclude`` (a run's
    own output directories) is not entered: a rerun never reads its outputs as inputs."""
    root = Path(root)
    skip = {Path(p).resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if skip:
            dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).resolve() not in skip]
        found += [Path(dirpath) / n for n in filenames if Path(n).suffix.lower() in suffixes]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def pair_by_relative_path(reference: Path, estimate: Path, suffixes: set[str]) -> tuple[list[tuple], int]:
    """``([(name, reference file, estimate file or None)], unmatched estimates)``: the files of two
    trees matched by relative path, the audio extension free to differ (same extension preferred)."""
    by_stem: dict[str, list[Path]] = {}
    for f in scan_directory(estimate, suffixes):
        by_stem.setdefault(f.relative_to(estimate).with_suffix("").as_posix(), []).append(f)
    pairs, used = [], set()
    for f in scan_directory(reference, suffixes):
        rel = f.relative_to(reference)
        candidates = by_stem.get(rel.with_suffix("").as_posix(), [])
        match = ([c for c in candidates if c.suffix == f.suffix] or candidates or [None])[0]
        if match is not None:
            used.add(match)
        pairs.append((rel.as_posix(), f, match))
    return pairs, sum(len(v) for v in by_stem.values()) - len(used)


def _listed(entry: str, listing: Path) -> Path:
    """A listed path: a relative one from the working directory when it exists there, else from the listing's."""
    p = Path(entry)
    return listing.parent / p if not p.is_absolute() and not p.exists() and (listing.parent / p).exists() else p


def read_file_list(path: str | Path) -> list[Path]:
    """A list file's paths (a line's first tab-separated field; blank lines and ``#`` comments skipped)."""
    lines = [line.split("\t")[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [_listed(entry, Path(path)) for entry in lines if entry and not entry.startswith("#")]


@dataclass(frozen=True)
class InputItem:
    """One input: the file (or dataset row), its relative name (outputs mirror it), its seconds if listed."""

    source: Path | DatasetAudio
    name: Path
    duration: float | None = None


def is_dataset(path: str | Path) -> bool:
    """A Hugging Face ``save_to_disk`` directory, or a parquet file (with an ``audio`` column)."""
    path = Path(path)
    saved = path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    return saved or path.is_file() and path.suffix == ".parquet"


def is_listing(path: str | Path) -> bool:
    """An input that lists other inputs: a list file, a JSONL/CSV manifest or a dataset (not a directory tree)."""
    path = Path(path)
    return path.suffix.lower() in LIST_SUFFIXES | MANIFEST_SUFFIXES and path.is_file() or is_dataset(path)


def read_input_manifest(path: str | Path) -> list[InputItem]:
    """A JSONL or CSV (a header row) listing ``path`` and optionally ``id`` (the name outputs get; default: the
    path as listed) and ``duration`` (seconds). ValueError (one line): no ``path``, a bad duration, not UTF-8."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".csv":
        try:
            rows = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as exc:
            raise ValueError(f"{path}: not a readable CSV manifest ({exc})") from None
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
        p = _listed(str(row["path"]), path)
        duration = row.get("duration")
        try:
            duration = float(duration) if duration not in (None, "") else None
        except (TypeError, ValueError):
            raise ValueError(f"{path}: row {i + 1}: duration {duration!r} is not a number") from None
        name = Path(str(row["id"]) + p.suffix) if row.get("id") not in (None, "") else Path(str(row["path"]))
        items.append(InputItem(p, name, duration))
    return items


def dataset_items(path: str | Path) -> list[InputItem]:
    """The rows of a dataset's ``audio`` column, named by an ``id`` column, else their file name, else the row."""
    ds = open_audio_dataset(path)
    ids = ds["id"] if "id" in ds.column_names else None
    audio = ds.data.table.column("audio")  # Arrow, memory-mapped: the names without reading any audio
    named = pa.types.is_struct(audio.type) and audio.type.get_field_index("path") >= 0
    names = audio.combine_chunks().field("path").to_pylist() if named else [None] * len(ds)
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
    if source.suffix.lower() in LIST_SUFFIXES and source.is_file():
        return [InputItem(f, f) for f in read_file_list(source)]
    return [InputItem(source, Path(source.name))]


def collect_files(source: str | Path, suffixes: set[str]) -> list[tuple[Path, Path]]:
    """:func:`collect_inputs` as ``[(file, name)]`` (a missing listed file is reported when read)."""
    return [(i.source, i.name) for i in collect_inputs(source, suffixes)]
