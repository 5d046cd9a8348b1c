"""Tokenization throughput and output size of ``--format npy`` vs ``parquet`` vs ``webdataset``.
One 40-clip directory (1-12 s) through ``inference.py`` in alternating rounds: audio hours per hour (best round),
files and bytes per 1,000 clips; random weights (``--config configs/tiny.yaml``: the tiny codec, writing dominates).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inference  # noqa: E402
from benchmarks.bench_inference import machine, random_codec, read, timed  # noqa: E402
from corpus.corpus import FORMATS  # noqa: E402
from models import init_codebooks  # noqa: E402
from models.export import save_export  # noqa: E402
from utils.cli import argument_parser  # noqa: E402


def make_corpus(root: Path, clips: int) -> float:
    """``clips`` files of 1-12 s under ``root``; returns their total seconds."""
    rng = np.random.default_rng(0)
    real = [read(n).numpy() for n in ("speech_en.flac", "speech_cn_4s.flac", "music_4s.flac")]
    total = 0.0
    for i in range(clips):
        seconds = [1.0, 1.3, 1.7, 2.2, 12.0][i % 5] if i % 10 else 3.0 + i / 10
        t = np.arange(int(seconds * 16000)) / 16000
        noise = 0.1 * rng.standard_normal(len(t))  # drawn for every clip: the same corpus as ever
        wav = [np.resize(real[i % 3], len(t)), 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t),
               0.3 * np.sin(2 * np.pi * (100 + 2000 * t / seconds) * t), noise][i % 4]  # fmt: skip
        path = root / f"spk{i % 3}" / f"clip{i:03d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wav.astype(np.float32), 16000)
        total += seconds
    return total


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "xcodec_hubert_librispeech.yaml",
                   help="architecture (random weights)")
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output", type=Path,
                   help="JSON results (default: benchmarks/results/tokenize_cpu_<threads>core_<config>.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_codec(args.config)
        init_codebooks(model, [read("speech_cn_4s.flac") * model.audio_norm_scale], "gaussian")
        export = save_export(model, tmp / "export")
        seconds = make_corpus(tmp / "corpus", args.clips)
        times, sizes = {f: [] for f in FORMATS}, {}  # seconds per round, (files, bytes) written
        for r, fmt in ((r, fmt) for r in range(args.rounds) for fmt in FORMATS):
            out = tmp / f"{fmt}_{r}"
            cmd = ["--input", str(tmp / "corpus"), "--codes-out", str(out), "--checkpoint", str(export),
                   "--format", fmt, "--batch-size", str(args.batch_size)]  # fmt: skip
            code, t = timed(lambda cmd=cmd: inference.main(cmd), torch.device("cpu"))
            assert code == 0, f"{fmt}: exit {code}"
            times[fmt].append(t)
            files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".xcodec")]
            sizes[fmt] = len(files), sum(p.stat().st_size for p in files)
    best = {fmt: min(t) for fmt, t in times.items()}
    # files_per_1000_clips: npy, a file per clip + the manifest; shards, ceil(1000 / 10,000) shard + the index
    formats = {fmt: {"best_seconds": round(best[fmt], 3), "audio_hours_per_hour": round(seconds / best[fmt], 1),
                     "files_written": sizes[fmt][0], "files_per_1000_clips": 1000 + 1 if fmt == "npy" else 1 + 1,
                     "bytes_per_1000_clips": round(sizes[fmt][1] * 1000 / args.clips),
                     "time_vs_npy": round(round(best[fmt], 3) / round(best["npy"], 3), 3)}
               for fmt in FORMATS}  # fmt: skip
    config = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    command = " ".join(["python benchmarks/bench_tokenize.py", *(argv if argv is not None else sys.argv[1:])])
    text = json.dumps({"command": command, "machine": f"{machine()['cpu']}, {torch.get_num_threads()} threads",
                       "config": str(config), "clips": args.clips, "audio_seconds": round(seconds, 1),
                       "formats": formats}, indent=2)  # fmt: skip
    print(text)
    name = f"tokenize_cpu_{torch.get_num_threads()}core_{args.config.stem}.json"
    out = args.output or ROOT / "benchmarks" / "results" / name
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
