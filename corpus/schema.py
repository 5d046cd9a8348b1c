"""One schema for the metadata this project writes and reads back (manifests, sidecars, shard rows, index
lines, token streams): a copy, an edit or a disk error can change them, so every reader checks a record
here first and a corrupt file is one line naming it, never a traceback or a wrong result."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from utils.files import atomic_write, read_json_lines


@dataclass(frozen=True)
class Field:
    """One key of a record: its ``kind`` (``float`` accepts an int), whether it is ``required``
    (``None`` counts as absent), the least value (``ge``/``gt``) and for a list the schema of its items."""

    kind: type
    required: bool = False
    ge: float | None = None
    gt: float | None = None
    items: dict[str, Field] | None = None


def problem(record: Any, schema: dict[str, Field]) -> str | None:
    """Why ``record`` does not follow ``schema`` (``"key: ..."``), or ``None``. Unknown keys are allowed."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key, field in schema.items():
        value = record.get(key)
        if value is None:
            if field.required:
                return f"{key}: missing"
            continue
        kinds = (int, float) if field.kind is float else field.kind  # a float field takes an int, never a bool
        bad = not isinstance(value, kinds) or field.kind in (int, float) and isinstance(value, bool)
        if bad or field.kind is float and not math.isfinite(value):
            kind = "a finite number" if field.kind is float else field.kind.__name__
            return f"{key}: expected {kind}, got {value!r}"[:200]
        if field.ge is not None and value < field.ge or field.gt is not None and value <= field.gt:
            bound = f">= {field.ge}" if field.ge is not None else f"> {field.gt}"
            return f"{key}: must be {bound}, got {value!r}"
        for i, item in enumerate(value if field.items is not None else []):
            if (inner := problem(item, field.items)) is not None:
                return f"{key}[{i}]: {inner}"
    return None


def check_record(record: Any, schema: dict[str, Field], where: str, error: type[Exception] = ValueError) -> dict:
    """``record``, after checking it against ``schema``; ``error("{where}: {key}: {problem}")`` otherwise."""
    if (why := problem(record, schema)) is not None:
        raise error(f"{where}: {why}")
    return record


def read_json(path: str | Path, schema: dict[str, Field], error: type[Exception] = ValueError) -> dict:
    """A UTF-8 JSON object file, checked against ``schema``; ``error`` names ``path`` in one line."""
    try:
        record = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not UTF-8 JSON ({str(exc)[:120]})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    return check_record(record, schema, str(path), error)


def read_lines(path: Path, schema: dict[str, Field], error: type[Exception]) -> list[tuple[int, dict]]:
    """``[(line number, record)]`` of an append-only JSON-lines file (a torn last line is none), each checked."""
    try:
        rows = read_json_lines(path)
    except ValueError as exc:
        raise error(str(exc)) from None
    return [(n, check_record(entry, schema, f"{path}:{n}", error)) for n, entry in rows]


def write_json(path: str | Path, records: dict | list[dict], durable: bool = False) -> Path:
    """Write one JSON object (indented), or a list of them as JSON lines, atomically."""
    if isinstance(records, dict):
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), durable=durable)


# What one tokenized file is: a manifest line, a sidecar, a parquet row, a tar member's .json.
CODES_ENTRY = {
    "path": Field(str), "codes": Field(str), "n_q": Field(int, ge=1), "frames": Field(int, ge=1),
    "samples": Field(int, ge=1), "sample_rate": Field(int, ge=1), "duration": Field(float, ge=0),
    "bandwidth": Field(float, gt=0), "bins": Field(int, ge=2), "checkpoint": Field(str), "precision": Field(str),
    "source_size": Field(int, ge=0), "source_mtime_ns": Field(int), "world_size": Field(int, ge=1),
}  # fmt: skip


def codes_dtype(bins: int) -> str:
    """The one integer type codes of a ``bins``-entry codebook are stored in, by every writer (npy, llasa,
    parquet, webdataset; a token stream passes its largest token + 1): int16 when they fit, else int32
    (X-Codec 2's 65,536 codes would wrap to negatives in int16)."""
    return "int16" if bins <= 2**15 else "int32"


def _requiring(schema: dict[str, Field], *keys: str) -> dict[str, Field]:
    return {k: replace(f, required=True) if k in keys else f for k, f in schema.items()}


MANIFEST_LINE = _requiring(CODES_ENTRY, "path", "codes", "n_q", "frames")
SIDECAR = CODES_ENTRY
# A shard row's codes are the array itself, not a file name.
SHARD_ROW = _requiring({k: f for k, f in CODES_ENTRY.items() if k != "codes"}, "path", "n_q", "frames")
INDEXED_FILE = _requiring({k: CODES_ENTRY[k] for k in ("path", "source_size", "source_mtime_ns")}, "path")
STREAM_FILE = _requiring({k: CODES_ENTRY[k] for k in ("path", "frames")}, "path", "frames")
INDEX_LINE = {"shard": Field(str, True), "rows": Field(int, ge=0), "files": Field(list, True, items=INDEXED_FILE),
              "settings": Field(dict)}  # fmt: skip
TOKEN_STREAM = {"layout": Field(str, True), "n_q": Field(int, True, ge=1), "bins": Field(int, True, ge=2),
                "offsets": Field(bool, True), "dtype": Field(str, True), "files": Field(list, True, items=STREAM_FILE),
                "tokens": Field(int, ge=0)}  # fmt: skip
