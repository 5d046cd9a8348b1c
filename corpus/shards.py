"""Sharded tokenized corpora: parquet and webdataset shards, and the per-rank index of finished shards
(layout and rows: docs/tokenization.md). A shard's index line is appended before its rename, so a file
is done exactly when it is in a shard that exists; a rank's last line without its shard does not count."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.schema import INDEX_LINE, SHARD_ROW, check_record, codes_dtype, read_lines, write_json
from utils.files import atomic_write, drop_torn_line, open_append

SHARD_FORMATS = {"parquet": ".parquet", "webdataset": ".tar"}
SHARD_RE = re.compile(r"^shard-r(\d{3,})-(\d{6,})\.(parquet|tar)$")
CORPUS_FILE = "corpus.json"  # {"format": ...}, written before the first shard
# codes: n_q lists of codes_dtype(bins); int16 here, a shard of a larger codebook writes int32 (_write_parquet)
SCHEMA = pa.schema([("path", pa.string()), ("codes", pa.list_(pa.list_(pa.int16()))), ("n_q", pa.int32()),
                    ("frames", pa.int32()), ("samples", pa.int64()), ("sample_rate", pa.int32()),
                    ("duration", pa.float64()), ("bandwidth", pa.float64()), ("bins", pa.int32()),
                    ("checkpoint", pa.string()), ("precision", pa.string())])  # fmt: skip
ROW_FIELDS = [name for name in SCHEMA.names if name != "codes"]


class ShardError(ValueError):
    """A shard or index that cannot be used; the message names the file."""


def shard_format(root: str | Path) -> str | None:
    """``"parquet"``/``"webdataset"`` for a sharded corpus (even before its first shard is finished), else None."""
    root = Path(root)
    if not root.is_dir():
        return None
    try:
        fmt = json.loads((root / CORPUS_FILE).read_text(encoding="utf-8")).get("format")
        if fmt in SHARD_FORMATS:
            return fmt
    except (OSError, ValueError, AttributeError):
        pass
    names = [p.name for p in sorted(root.iterdir()) if SHARD_RE.match(p.name)]
    names = names or [line["shard"] for line in _index_lines(root)]
    return ("parquet" if names[0].endswith(".parquet") else "webdataset") if names else None


def index_files(root: Path) -> list[tuple[Path, list[dict]]]:
    """``[(index file, its lines)]``, every line checked (its shard a file name in ``root``, never outside)."""
    out = []
    for path in sorted(root.glob("index*.jsonl")):  # index.rank{R}.jsonl per rank; index.jsonl once merged
        rows = read_lines(path, INDEX_LINE, ShardError)
        for n, entry in rows:
            if not SHARD_RE.match(entry["shard"]):
                raise ShardError(f"{path}:{n}: shard {entry['shard']!r} is not a shard file name of this directory")
        out.append((path, [entry for _, entry in rows]))
    return out


def _index_lines(root: Path) -> list[dict]:
    return [entry for _, entries in index_files(root) for entry in entries]


def lost_shards(root: str | Path) -> list[str]:
    """One line per index line (not a rank's unfinished last one) naming a shard that is not there, whose
    files are not all in shards that are: missing from the corpus until a rerun writes them again."""
    root = Path(root)
    files = index_files(root)
    present = {f["path"] for _, entries in files for e in entries if (root / e["shard"]).is_file() for f in e["files"]}
    return [f"{path.name}: lists {e['shard']} ({len(e['files'])} file(s)), which does not exist: deleted or lost"
            for path, entries in files for i, e in enumerate(entries)
            if not (root / e["shard"]).is_file() and (path.name == "index.jsonl" or i < len(entries) - 1)
            and not all(f["path"] in present for f in e["files"])]  # fmt: skip


def read_index(root: str | Path, lost_ok: bool = False) -> list[dict]:
    """The index lines whose shard exists, by shard name; ShardError on a lost shard unless ``lost_ok``."""
    root = Path(root)
    if not lost_ok and (lost := lost_shards(root)):
        raise ShardError(f"{root}: {lost[0]}; restore it, or rerun the tokenization to write its files again")
    lines = {e["shard"]: e for e in _index_lines(root) if (root / e["shard"]).is_file()}  # once, even if merged twice
    return [lines[name] for name in sorted(lines)]


def _write_parquet(path: str, rows: list[tuple[dict, np.ndarray]]) -> None:
    columns = {name: [entry[name] for entry, _ in rows] for name in ROW_FIELDS}
    dtype = codes_dtype(max(entry["bins"] for entry, _ in rows))
    columns["codes"] = [codes.astype(dtype).tolist() for _, codes in rows]
    codes_type = pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))
    schema = SCHEMA.set(SCHEMA.get_field_index("codes"), pa.field("codes", codes_type))
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path, compression="zstd")


def _write_tar(path: str, rows: list[tuple[dict, np.ndarray]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry, codes in rows:
            key = hashlib.sha1(entry["path"].encode("utf-8")).hexdigest()[:20]  # webdataset keys hold no dots
            buf = io.BytesIO()
            np.save(buf, codes.astype(codes_dtype(entry["bins"])), allow_pickle=False)
            meta = json.dumps({k: entry[k] for k in ROW_FIELDS}, ensure_ascii=False).encode("utf-8")
            for name, data in ((f"{key}.codes.npy", buf.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(entry.get("written", time.time())), 0o644
                tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Collects (entry, codes) rows of rank ``rank`` and writes them into ``root`` as ``fmt`` shards of
    ``shard_size`` files; ``settings`` (what made the codes) goes into every index line."""

    def __init__(self, root: str | Path, fmt: str, rank: int, shard_size: int, settings: dict):
        self.root, self.fmt, self.rank, self.shard_size, self.settings = Path(root), fmt, rank, shard_size, settings
        self.root.mkdir(parents=True, exist_ok=True)
        self.rows: list[tuple[dict, np.ndarray, dict]] = []
        self.index = self.root / f"index.rank{rank}.jsonl"
        drop_torn_line(self.index)  # a link there is refused now, not after the first shard's work
        self._drop_unfinished_line()
        self.index.touch()  # this rank ran, even with no file to write: --merge checks that every rank did
        mine = [p.name for p in self.root.iterdir()] + [e["shard"] for e in _index_lines(self.root)]
        seqs = [int(m.group(2)) for name in mine if (m := SHARD_RE.match(name)) and int(m.group(1)) == rank]
        self.seq = max(seqs, default=0) + 1
        if not (self.root / CORPUS_FILE).is_file():
            write_json(self.root / CORPUS_FILE, {"format": fmt})

    def _drop_unfinished_line(self) -> None:
        """Cut this rank's unfinished last line before appending (followed by another, it reads as lost)."""
        if not self.index.is_file():
            return
        data = self.index.read_bytes()
        start = data.rstrip(b"\n").rfind(b"\n") + 1
        try:
            shard = json.loads(data[start:]).get("shard")
        except (ValueError, AttributeError, RecursionError):
            return  # not an index line: the readers report it
        if isinstance(shard, str) and SHARD_RE.match(shard) and not (self.root / shard).exists():
            with open(self.index, "r+b") as fh:
                fh.truncate(start)
                os.fsync(fh.fileno())

    def add(self, entry: dict, codes: np.ndarray, source: dict) -> None:
        """Queue one file (``source``: its path, size and mtime for the index); full shards are written."""
        self.rows.append((entry, codes, source))
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued rows as one shard: temporary file, index line, rename."""
        if not self.rows:
            return
        name = f"shard-r{self.rank:03d}-{self.seq:06d}{SHARD_FORMATS[self.fmt]}"
        line = {"shard": name, "rows": len(self.rows), "files": [s for _, _, s in self.rows], "settings": self.settings}

        def write(tmp: str) -> None:
            (_write_parquet if self.fmt == "parquet" else _write_tar)(tmp, [(e, c) for e, c, _ in self.rows])
            with open_append(self.index) as fh:  # before the rename: see the module docstring
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())  # durable before the shard's durable rename

        atomic_write(self.root / name, write, durable=True)
        self.seq += 1
        self.rows.clear()

    close = flush


def iter_shard(path: str | Path) -> Iterator[tuple[dict, np.ndarray]]:
    """``(entry, integer codes (n_q, frames))`` of every file in one shard (read as stored, never cast to a
    narrower type: the caller checks them against the entry)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=256) for row in batch.to_pylist())
            for n, row in enumerate(rows):
                check_record(row, SHARD_ROW, f"{path}: row {n + 1}", ShardError)
                yield row, np.asarray(row.pop("codes")).reshape(row["n_q"], row["frames"])
            return
        with tarfile.open(path, "r") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(n for n in members if n.endswith(".json")):
                entry = json.loads(tar.extractfile(members[name]).read().decode("utf-8"))
                check_record(entry, SHARD_ROW, f"{path}: {name}", ShardError)
                data = tar.extractfile(members[name.removesuffix(".json") + ".codes.npy"]).read()
                yield entry, np.load(io.BytesIO(data), allow_pickle=False)
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, pa.ArrowException, tarfile.TarError, RecursionError) as exc:
        raise ShardError(f"{path}: not a readable shard ({type(exc).__name__}: {str(exc)[:160]})") from None
