"""Codes files and npy corpora (manifests), the one corpus reader and ``python -m corpus.codes``
(docs/tokenization.md). A manifest line is appended only after its codes file is complete."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from corpus.schema import INDEX_LINE, MANIFEST_LINE, SIDECAR, codes_dtype, read_json, read_lines, write_json
from corpus.shards import SHARD_RE, ShardError, iter_shard, lost_shards, read_index, shard_format
from utils.cli import CliError, argument_parser, cli_main
from utils.files import atomic_write, temporary_target, tree_in_use

MANIFEST_GLOB = "manifest*.jsonl"


class CodesFileError(ValueError):
    """A codes file that cannot be used; the message names the file and the reason."""


def save_codes(path: str | Path, codes: np.ndarray, bins: int) -> None:
    """Save (n_q, frames) codes as .npy, atomically, in :func:`~corpus.schema.codes_dtype` (int16 or int32)."""
    codes = np.asarray(codes).astype(codes_dtype(bins))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, codes, allow_pickle=False)

    atomic_write(path, write)


def load_codes(path: str | Path | np.ndarray, n_q_max: int | None = None, bins: int | None = 1024, *,
               n_q: int | None = None, frames: int | None = None, where: str | None = None) -> torch.Tensor:
    """Read a codes ``.npy`` file (or take an array) and check it: a ``LongTensor`` (n_q, frames), or a
    CodesFileError (a ``ValueError``) naming ``where`` (default ``path``): unreadable, not integer, not 2-D,
    more than ``n_q_max`` codebooks, values outside ``[0, bins)`` (``bins`` None: only ``>= 0``), or other
    than ``n_q`` codebooks / ``frames`` frames when given (e.g. from the manifest)."""
    where, codes = where or str(path), path
    if not isinstance(path, np.ndarray):
        try:
            codes = np.load(path, allow_pickle=False)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise CodesFileError(f"{path}: not a readable .npy codes file ({reason})") from None
    if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu":
        got = getattr(codes, "dtype", type(codes))
        raise CodesFileError(f"{where}: codes must be integers (int16 or int32), got dtype {got}")
    if codes.ndim == 1 and n_q == 1:  # one codebook, stored flat (--format llasa)
        codes = codes[None]
    if codes.ndim != 2 or not 1 <= codes.shape[0] <= (n_q_max or float("inf")) or codes.shape[1] < 1:
        bound = f"1 <= n_q <= {n_q_max}" if n_q_max is not None else "n_q >= 1"
        raise CodesFileError(f"{where}: codes must have shape (n_q, frames) with {bound}, got {codes.shape}")
    if n_q is not None and codes.shape[0] != n_q:
        raise CodesFileError(f"{where}: expected {n_q} codebooks, found {codes.shape[0]}")
    if frames is not None and codes.shape[1] != frames:
        raise CodesFileError(f"{where}: expected {frames} frames, found {codes.shape[1]}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or (bins is not None and hi >= bins):
        top = bins if bins is not None else "inf"
        raise CodesFileError(f"{where}: code values must lie in [0, {top}), found [{lo}, {hi}]")
    return torch.from_numpy(codes.astype(np.int64))


def _entry_codes(codes: np.ndarray | Path, entry: dict, where: str | None = None) -> torch.Tensor:
    """Codes checked against what their entry records (``n_q``, ``frames``, ``bins``)."""
    return load_codes(codes, None, entry.get("bins"), n_q=entry.get("n_q"), frames=entry.get("frames"), where=where)


def read_manifest(root: str | Path) -> list[dict]:
    """Every entry of every manifest in ``root`` (all ranks), one per path, sorted by path; a path listed
    twice (its input changed and was tokenized again) keeps its latest ``written`` (else the later line)."""
    by_path: dict[str, dict] = {}
    for path in sorted(Path(root).glob(MANIFEST_GLOB)):
        for _, entry in read_lines(path, MANIFEST_LINE, CodesFileError):
            old = by_path.get(entry["path"])
            if old is None or entry.get("written", 0) >= old.get("written", 0):
                by_path[entry["path"]] = entry
    return [by_path[k] for k in sorted(by_path)]


def has_manifest(root: str | Path) -> bool:
    """``root`` is a tokenized corpus (holds at least one manifest file)."""
    return Path(root).is_dir() and any(Path(root).glob(MANIFEST_GLOB))


def write_sidecar(codes_path: str | Path, fields: dict, codes: np.ndarray) -> Path:
    """Describe a single ``--codes-out x.npy`` in ``x.json`` (the fields of a manifest line)."""
    entry = {**fields, "codes": Path(codes_path).name, "n_q": int(codes.shape[0]), "frames": int(codes.shape[1])}
    entry["duration"] = round(entry["samples"] / entry["sample_rate"], 6)
    return write_json(Path(codes_path).with_suffix(".json"), entry)


def read_sidecar(codes_path: str | Path) -> dict | None:
    """The ``x.json`` of ``x.npy`` (``None`` without one)."""
    path = Path(codes_path).with_suffix(".json")
    return read_json(path, SIDECAR, CodesFileError) if path.is_file() else None


def source_lengths(codes: str | Path, sample_rate: int, hop_length: int) -> dict[Path, tuple[int, int] | Exception]:
    """``{codes file (resolved): (source samples, frames)}`` of entries made at ``sample_rate``, from the
    sidecar of ``codes`` or the manifest of the corpus holding it (up to 4 levels up); ``{}`` without one.
    An entry whose samples are not ``frames * hop_length`` within a hop maps to a CodesFileError (that file fails)."""
    codes = Path(codes)
    side = read_sidecar(codes) if codes.suffix == ".npy" else None
    found, where = ({codes.resolve(): side}, codes.with_suffix(".json")) if side is not None else ({}, None)
    for root in [] if side is not None else [codes] if codes.is_dir() else list(codes.resolve().parents)[:4]:
        if has_manifest(root):
            found, where = {(root / e["codes"]).resolve(): e for e in read_manifest(root)}, root
            break
    out: dict[Path, tuple[int, int] | Exception] = {}
    for path, entry in found.items():
        samples, frames = entry.get("samples"), entry.get("frames")
        if samples is None or frames is None or entry.get("sample_rate") != sample_rate:
            continue
        out[path] = (samples, frames)
        if abs(samples - frames * hop_length) > hop_length:
            out[path] = CodesFileError(f"{where}: samples {samples} disagrees with {frames} frames of {hop_length} "
                                       f"samples ({entry.get('path', path.name)}); the description is corrupt")
    return out


def merge_manifests(root: str | Path) -> Path:
    """Every rank's lines into one ``manifest.jsonl`` (shards: ``index.jsonl``), rank files removed; ShardError
    when a line names a lost shard (its line is never dropped)."""
    root = Path(root)
    kind = "index" if shard_format(root) is not None else "manifest"
    lines = read_index(root) if kind == "index" else read_manifest(root)
    target = write_json(root / f"{kind}.jsonl", lines, durable=True)
    for path in root.glob(f"{kind}.rank*.jsonl"):
        path.unlink()
    return target


def iter_corpus(path: str | Path) -> Iterator[tuple[dict, torch.Tensor]]:
    """The one reader of tokenized corpora (npy or sharded, one shard, or one ``.npy`` + its ``.json``):
    ``(entry, LongTensor (n_q, frames))`` for every file, checked against its entry's ``n_q``, ``frames`` and
    ``bins``; CodesFileError names the file otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npy":
        entry = read_sidecar(path) or {"path": path.name}
        yield entry, _entry_codes(path, entry)
        return
    if not path.is_file() and shard_format(path) is None:
        for entry in read_manifest(path):
            yield entry, _entry_codes(path / entry["codes"], entry)
        return
    try:
        for shard in [path] if path.is_file() else [path / line["shard"] for line in read_index(path)]:
            for entry, codes in iter_shard(shard):
                yield entry, _entry_codes(codes, entry, f"{shard.name}: {entry.get('path')}")
    except ShardError as exc:
        raise CodesFileError(str(exc)) from None


def check_corpus(root: str | Path) -> tuple[int, list[str]]:
    """Check a tokenized corpus: ``(files, problems)``. Problems: missing, unreadable or mis-shaped
    codes files or shards, a shard holding other files than its index line lists, files listed
    twice, codes files or shards nothing lists, leftover temporaries."""
    root = Path(root)
    sharded = shard_format(root) is not None
    problems, seen, n = lost_shards(root) if sharded else [], {}, 0
    if sharded:
        lines = read_index(root, lost_ok=True)
        listed = {line["shard"] for line in lines}
        for line in lines:
            names = []
            try:
                for entry, codes in iter_shard(root / line["shard"]):
                    names.append(entry["path"])
                    _entry_codes(codes, entry, f"{line['shard']}: {entry['path']}")
            except (ShardError, CodesFileError) as exc:
                problems.append(str(exc))
                continue  # its rows past the bad one are unknown: no count to compare
            if sorted(names) != sorted(f["path"] for f in line["files"]):
                listed_here = len(line["files"])
                problems.append(f"{line['shard']}: holds {len(names)} file(s), its index line lists {listed_here}")
            problems += [f"{name}: in two shards, {seen[name]} and {line['shard']}" for name in names if name in seen]
            seen.update(dict.fromkeys(names, line["shard"]))
            n += len(names)
        files = [(p.name, SHARD_RE.match(p.name), "shard not in any index") for p in sorted(root.iterdir())]
    else:
        entries = read_manifest(root)
        for entry in entries:
            name = entry["codes"]
            if name in seen:
                problems.append(f"{name}: written for two inputs, {seen[name]} and {entry['path']}; one was lost")
            seen[name] = entry["path"]
            try:
                _entry_codes(root / entry["codes"], entry)
            except (CodesFileError, FileNotFoundError) as exc:
                problems.append(str(exc))
        listed, n = set(seen), len(entries)
        paths = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*"))]
        files = [(rel, rel.endswith(".npy"), "codes file not in any manifest") for rel in paths]
    for name, counted, why in files:
        if counted and name not in listed:
            problems.append(f"{name}: {why}")
        elif temporary_target(Path(name).name) is not None:
            problems.append(f"{name}: leftover temporary file")
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
    # Only the rank files (a merged file holds earlier runs, of other world sizes); index lines: their settings.
    schema, error = (INDEX_LINE, ShardError) if kind == "index" else (MANIFEST_LINE, CodesFileError)
    lines = [e.get("settings") or e for p in files.values() for _, e in read_lines(p, schema, error)]
    worlds = [w for e in lines if isinstance(w := e.get("world_size"), int) and not isinstance(w, bool)]
    world = max([max(files) + 1, *worlds])
    return sorted(set(range(world)) - set(files)), world


def parse_args(argv: list[str] | None = None):
    p = argument_parser("Check a tokenized corpus (npy, parquet or webdataset); optionally merge the per-rank files.")
    p.add_argument("root", type=Path, help="the --codes-out directory of inference.py")
    p.add_argument("--check", action="store_true", help="check every file or shard (what the command always does)")
    p.add_argument("--merge", action="store_true", help="merge manifest.rank*.jsonl into manifest.jsonl (shards: "
                   "index.rank*.jsonl into index.jsonl); refused while a rank of the run has written nothing")
    p.add_argument("--allow-missing", action="store_true", help="--merge even though some ranks have written nothing "
                   "(their files are not in the corpus: tokenize them later with the same command)")
    return p.parse_args(argv)


def run(args) -> int:
    if not args.root.is_dir():
        raise CliError(f"{args.root}: not a directory")
    if args.merge:
        if (live := tree_in_use(args.root)) is not None:
            raise CliError(f"{args.root}: a run is still writing into it ({live}); merge when it is done")
        missing, world = missing_ranks(args.root)
        if missing and not args.allow_missing:
            ranks = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise CliError(f"{args.root}: rank(s) {ranks} of {world} have not run here (no per-rank file); run them "
                           "(the same command with their RANK) or pass --allow-missing")  # fmt: skip
        print(f"wrote {merge_manifests(args.root)}")
    n, problems = check_corpus(args.root)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{n} file(s) in the corpus, {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_args, run, argv, one_line=(CodesFileError, ShardError))


if __name__ == "__main__":
    sys.exit(main())
