"""A tokenization run's bookkeeping: what is done, what to resume, where finished files are recorded
(``inference.py --input DIR --codes-out OUT [--format F]``; sharding and resuming: docs/tokenization.md)."""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from corpus.codes import CodesFileError, has_manifest, read_manifest
from corpus.outputs import Job, refuse_replacing
from corpus.shards import ShardError, ShardWriter, read_index, shard_format
from utils.audio import DatasetAudio, open_audio_dataset
from utils.cli import CliError
from utils.files import open_append, remove_stale_temporaries, remove_stale_temporaries_of

FORMATS = ("npy", "llasa", "parquet", "webdataset")
# Formats of one codes file per input (+ manifests) and its suffix; llasa: Llasa's input, a 1-D array of one
# codebook as <id>.wav.npy (LLaSA_training data_instruction/get_memmap_from_token.py reads that name).
CODES_SUFFIX = {"npy": ".npy", "llasa": ".wav.npy"}
ANOTHER = "choose another --codes-out directory"


class RunStats:
    """What a run did (written, failed, skipped, seconds of audio) and, tokenizing, where finished files go."""

    def __init__(self) -> None:
        self.written, self.audio_seconds, self.failed = 0, 0.0, []
        self.already_done = 0  # skipped: finished by an earlier run
        self.changed = 0  # finished earlier, but the input changed since: done again
        self.rank, self.world_size = 0, 1
        self.manifest = None  # npy corpus: the rank's manifest, appended one flushed line per file
        self.shards: ShardWriter | None = None  # parquet / webdataset corpus
        self.fields: dict = {}
        self.codes_root: Path | None = None
        self.start_clock()

    def wrote(self, job: Job, samples: int, rate: int, codes: np.ndarray | None = None) -> None:
        """Count a finished job; in a tokenization, record it (manifest line or shard row)."""
        self.written += 1
        self.audio_seconds += samples / rate
        if codes is None or (self.manifest is None and self.shards is None):
            return
        entry = {"path": job.rel.as_posix(), "duration": round(samples / rate, 6), "samples": int(samples),
                 "sample_rate": int(rate), "n_q": int(codes.shape[0]), "frames": int(codes.shape[1]),
                 **({"source_size": job.source[0], "source_mtime_ns": job.source[1]} if job.source else {}),
                 **self.fields, "written": round(time.time(), 3)}  # fmt: skip
        if self.manifest is not None and job.codes_out is not None:
            codes_name = job.codes_out.relative_to(self.codes_root).as_posix()
            self.manifest.write(json.dumps({"codes": codes_name, **entry}, ensure_ascii=False) + "\n")
            self.manifest.flush()
        elif self.shards is not None:
            source = {k: entry[k] for k in ("path", "source_size", "source_mtime_ns") if k in entry}
            self.shards.add(entry, codes, source)

    def start_clock(self) -> None:
        """Time from here: the speed in :meth:`summary` leaves out start-up and model loading."""
        self.start = time.perf_counter()

    def fail(self, message: str) -> None:
        self.failed.append(message)
        tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line, even under a progress bar

    def close(self) -> None:
        """Write what is queued (the last partial shard) and close the manifest."""
        for writer in (self.shards, self.manifest):
            if writer is not None:
                writer.close()

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        rtf = elapsed / self.audio_seconds if self.audio_seconds else 0.0
        speed = self.audio_seconds / elapsed if elapsed > 0 else 0.0
        prefix = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        done = f", {self.already_done} already done (skipped)" if self.already_done else ""
        done += f", {self.changed} changed since tokenized (redone)" if self.changed else ""
        return (f"{prefix}{self.written} file(s) written, {len(self.failed)} failed/skipped{done}, "
                f"{self.audio_seconds:.1f} s of audio in {elapsed:.1f} s (real-time factor {rtf:.3f}, "
                f"{speed:.1f} audio hours per hour)")  # fmt: skip


def _earlier(root: Path, fmt: str) -> tuple[list[dict], dict[str, dict]]:
    """``(settings of every earlier entry, {path: entry})`` of what OUT already holds."""
    try:
        if has_manifest(root):  # codes files; a line names their format (lines without one: npy)
            entries = read_manifest(root) if fmt in CODES_SUFFIX else []
            default = fmt if fmt in CODES_SUFFIX else "npy"
            found = next((f for e in entries if (f := e.get("format", "npy")) != fmt), default)
        else:
            entries, found = [], shard_format(root)
        if found is not None and found != fmt:
            raise CliError(f"{root}: holds a {found} corpus; this run writes --format {fmt}: {ANOTHER}")
        if fmt in CODES_SUFFIX:
            return entries, {e["path"]: e for e in entries}
        lines = read_index(root, lost_ok=True) if root.is_dir() else []  # a lost shard's files are not done
        files = {f["path"]: {**f, "shard": e["shard"]} for e in lines for f in e["files"]}
        return [e.get("settings", {}) for e in lines], files
    except (CodesFileError, ShardError, OSError) as exc:
        raise CliError(str(exc)) from None


def resume(jobs: list[Job], root: Path, fmt: str, fields: dict, n_q: int, stats: RunStats,
           shard_size: int) -> list[Job]:  # fmt: skip
    """This rank's jobs less the finished ones (``root``: ``--codes-out``); sets up the writer of ``fmt``.
    ``fields`` (what made the codes: ``bins``, ``bandwidth``, ``checkpoint``, ``precision``, ``device``,
    ``input_root``) are recorded with every file."""
    earlier, done = _earlier(root, fmt)
    fields = {**fields, "world_size": stats.world_size}  # --merge checks that every rank of the run ran
    if fmt in CODES_SUFFIX:
        fields["format"] = fmt
    mine = (fields["checkpoint"], n_q, fields["precision"])
    # Entries written before precisions were recorded were all fp32.
    clash = [e for e in earlier if (e.get("checkpoint"), e.get("n_q"), e.get("precision", "fp32")) != mine]
    if clash:
        e = clash[0]
        raise CliError(f"{root}: already holds codes of {len(clash)} file(s) made by checkpoint {e.get('checkpoint')} "
                       f"at {e.get('bandwidth')} kbps in {e.get('precision', 'fp32')}; this run uses "
                       f"{fields['checkpoint']} at {fields['bandwidth']} kbps in {fields['precision']}: {ANOTHER}")
    other = next((e for e in earlier if e.get("input_root", fields["input_root"]) != fields["input_root"]), None)
    if other is not None:
        raise CliError(f"{root}: holds codes of files under {other['input_root']}, not {fields['input_root']}: "
                       f"{ANOTHER}")  # fmt: skip
    todo = []
    for j in jobs:
        j.source = source_key(j.src)
        entry = done.get(j.rel.as_posix())
        # Shards: the index alone says done (audio of a done file is not redone: that would add a row).
        if entry is not None and (fmt not in CODES_SUFFIX or all(p.is_file() for p in j.outputs)):
            # Entries written before sources were recorded count as unchanged.
            if "source_size" not in entry or (entry["source_size"], entry.get("source_mtime_ns")) == j.source:
                continue
            if fmt not in CODES_SUFFIX:
                raise CliError(f"{j.src}: changed since it was tokenized into {root} ({entry['shard']}); shards are "
                               "append-only: tokenize into a new directory")  # fmt: skip
            stats.changed += 1
        todo.append(j)
    stats.already_done = len(jobs) - len(todo)
    stats.codes_root, stats.fields = root, fields
    if fmt in CODES_SUFFIX:
        root.mkdir(parents=True, exist_ok=True)
        name = "manifest.jsonl" if stats.world_size == 1 else f"manifest.rank{stats.rank}.jsonl"
        stats.manifest = open_append(root / name)  # a killed run's torn last line is cut first
    else:
        kept = ("checkpoint", "bandwidth", "precision", "input_root", "bins", "world_size")
        remove_stale_temporaries(root)  # shards of a killed writer (a live one's are locked)
        stats.shards = ShardWriter(root, fmt, stats.rank, shard_size, {**{k: fields[k] for k in kept}, "n_q": n_q})
    return todo


def source_key(src: Path | DatasetAudio) -> tuple[int, int] | None:
    """An input's resume key: (size, mtime_ns) of a file; (row, the dataset's fingerprint) of a dataset row."""
    if isinstance(src, DatasetAudio):
        fingerprint = getattr(open_audio_dataset(src.dataset), "_fingerprint", "") or "0"
        return src.row, int(zlib.crc32(fingerprint.encode()))
    try:
        st = src.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None  # the reader reports it


def refuse_existing(jobs: list[Job], overwrite: bool, tracked: bool) -> None:
    """Existing outputs are replaced only with ``--overwrite`` or by a tokenization resuming in
    its own output (``tracked``); then the temporaries of dead writers are removed."""
    refuse_replacing([p for j in jobs for p in j.outputs], overwrite or tracked)
    remove_stale_temporaries_of([p for j in jobs for p in j.outputs])  # only a dead writer's (see utils.files)
