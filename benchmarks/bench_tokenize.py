"""Tokenization throughput and output size of ``--format npy`` vs ``parquet`` vs ``webdataset``.

The same 40-clip directory (1-12 s: real speech and music, tones, chirps, noise) is tokenized
by ``inference.py`` in this process into each format, in alternating rounds so that machine
load hits every format alike; throughput is audio hours per hour (best round), and the files
and bytes written are scaled to 1,000 clips.

    python benchmarks/bench_tokenize.py                                  # full-size architecture, random weights
    python benchmarks/bench_tokenize.py --config configs/tiny.yaml       # the tiny test codec (writing dominates)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inference  # noqa: E402
from models import build_codec, init_codebooks, load_generator_config  # noqa: E402
from models.export import save_export  # noqa: E402
from utils.audio import load_audio  # noqa: E402
from utils.cli import DefaultsHelpFormatter  # noqa: E402

FORMATS = ("npy", "parquet", "webdataset")


def make_corpus(root: Path, clips: int) -> float:
    """``clips`` files of 1-12 s under ``root``; returns their total seconds."""
    rng = np.random.default_rng(0)
    real = [load_audio(ROOT / "tests" / "assets" / n, 16000)[0] for n in ("speech_en.flac", "speech_cn_4s.flac", "music_4s.flac")]
    total = 0.0
    for i in range(clips):
        seconds = [1.0, 1.3, 1.7, 2.2, 12.0][i % 5] if i % 10 else 3.0 + i / 10
        t = np.arange(int(seconds * 16000)) / 16000
        wav = [np.resize(real[i % 3], len(t)), 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t),
               0.3 * np.sin(2 * np.pi * (100 + 2000 * t / seconds) * t), 0.1 * rng.standard_normal(len(t))][i % 4]  # fmt: skip
        path = root / f"spk{i % 3}" / f"clip{i:03d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wav.astype(np.float32), 16000)
        total += seconds
    return total


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".xcodec")]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "xcodec_hubert_librispeech.yaml", help="architecture (random weights)")
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output", type=Path, help="JSON results (default: benchmarks/results/tokenize_cpu_<threads>core_<config>.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen, scale = load_generator_config(args.config)
        model = build_codec(gen, scale, weight_norm=False).eval()
        init_codebooks(model, [torch.from_numpy(load_audio(ROOT / "tests" / "assets" / "speech_cn_4s.flac", 16000)[0]) * scale], "gaussian")
        export = save_export(model, tmp / "export")
        seconds = make_corpus(tmp / "corpus", args.clips)
        times: dict[str, list[float]] = {f: [] for f in FORMATS}
        sizes: dict[str, tuple[int, int]] = {}
        for r in range(args.rounds):
            for fmt in FORMATS:
                out = tmp / f"{fmt}_{r}"
                start = time.perf_counter()
                code = inference.main(["--input", str(tmp / "corpus"), "--codes-out", str(out), "--checkpoint", str(export),
                                       "--format", fmt, "--batch-size", str(args.batch_size)])  # fmt: skip
                times[fmt].append(time.perf_counter() - start)
                assert code == 0, f"{fmt}: exit {code}"
                sizes[fmt] = tree_size(out)
    scale_to = 1000 / args.clips
    results = {
        "command": " ".join(["python benchmarks/bench_tokenize.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "clips": args.clips,
        "audio_seconds": round(seconds, 1),
        "formats": {
            fmt: {
                "best_seconds": round(min(times[fmt]), 3),
                "audio_hours_per_hour": round(seconds / min(times[fmt]), 1),
                "files_written": sizes[fmt][0],
                # npy: a file per clip + the manifest; shards: ceil(1000 / 10,000) shard + the index
                "files_per_1000_clips": 1000 + 1 if fmt == "npy" else 1 + 1,
                "bytes_per_1000_clips": round(sizes[fmt][1] * scale_to),
            }
            for fmt in FORMATS
        },
    }
    npy = results["formats"]["npy"]["best_seconds"]
    for fmt in FORMATS:
        results["formats"][fmt]["time_vs_npy"] = round(results["formats"][fmt]["best_seconds"] / npy, 3)
    text = json.dumps(results, indent=2)
    print(text)
    out = args.output or ROOT / "benchmarks" / "results" / f"tokenize_cpu_{torch.get_num_threads()}core_{args.config.stem}.json"
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
