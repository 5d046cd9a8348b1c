"""Inference benchmark: XCodec against transformers' XcodecModel with the same weights.

Both models run in this one process, on the same real speech (tests/assets/speech_en.flac
tiled to each duration), alternating call by call so that a busy machine slows both
alike. For each duration it reports encode and decode time (median of --repeats),
real-time factor, peak memory (RSS growth during the call, sampled every 2 ms; on CUDA
the allocator's peak), codes agreement with XcodecModel's codes and the relative error
of the decoded audio (both decoding XcodecModel's codes).

Rows: ``transformers`` (XcodecModel, fp32), ``xcodec fp32`` (exact mode), ``xcodec bf16``
(fast mode). Optional extras: ``--batch`` (32 clips of 1-10 s, batch 8 vs 1),
``--long`` (windowed vs single-pass encoding of 60 s, chunked decoding, and the peak
memory of encoding ``--long-minutes`` of audio), ``--stream`` (streaming decode error and
latency per chunk). On CUDA it also runs with torch.compile.

Weights: random (seeded) with codebooks k-means-initialised on latents of other real
audio (Mandarin speech and music from tests/assets), or ``--checkpoint``.

    python benchmarks/bench_inference.py --threads 2 --durations 10 60 --json bench.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import soundfile as sf
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(ROOT))

from models import XCodec, build_codec, init_codebooks, load_generator_config  # noqa: E402
from models.export import to_transformers  # noqa: E402
from models.precision import cpu_has_amx  # noqa: E402
from models.streaming import StreamingDecoder, chunk_codes, decode_long, decode_many, encode_long, encode_many  # noqa: E402
from utils.cli import DefaultsHelpFormatter  # noqa: E402

ASSETS = ROOT / "tests" / "assets"


# ---------------------------------------------------------------------------- helpers
def read(name: str) -> torch.Tensor:
    wav, rate = sf.read(str(ASSETS / name), dtype="float32")
    assert rate == 16000, rate
    return torch.from_numpy(wav)


def speech(seconds: float) -> torch.Tensor:
    """Real English speech tiled (or cropped) to ``seconds``: (1, 1, T), scaled by 0.95."""
    w = read("speech_en.flac")
    n = int(round(seconds * 16000))
    return (w.repeat(-(-n // len(w)))[:n] * 0.95)[None, None].contiguous()


def no_mmap() -> bool:
    """mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 1 GB): large tensors come from
    the heap and freed ones stay mapped, so a new tensor mostly reuses touched pages."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = _rss()
        self.top = self.base
        self.stop = False

        def sample():
            while not self.stop:
                self.top = max(self.top, _rss())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.peak = max(self.top, _rss()) - self.base


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    n = min(a.shape[-1], b.shape[-1])
    a, b = a[..., :n], b[..., :n]
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def build_models(args, device: torch.device):
    if args.checkpoint:
        model = XCodec.from_pretrained(args.checkpoint, config=args.config)
    else:
        gen, scale = load_generator_config(ROOT / args.config)
        torch.manual_seed(args.seed)
        model = build_codec(gen, scale, weight_norm=False).eval()
        # Realistic codebooks: k-means on latents of other real audio (several sub-hop shifts).
        clips = [read(name)[shift:] * 0.95 for name in ("speech_cn_4s.flac", "music_4s.flac")
                 for shift in range(0, model.hop_length, model.hop_length // 5)]  # fmt: skip
        init_codebooks(model, clips, "kmeans")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    hf = to_transformers(model).eval()
    return model.to(device), hf.to(device)


# ---------------------------------------------------------------------------- benchmark
def bench_duration(model, hf, seconds: float, args, device) -> list[dict]:
    x = speech(seconds).to(device)
    bw = args.bandwidth
    rows = []
    with torch.inference_mode():
        ref_codes = hf.encode(x, bw, return_dict=False)
        ref_audio = hf.decode(ref_codes, return_dict=False)
        ours = model.encode(x, bw)
    variants = [("transformers", "fp32", None), ("xcodec", "fp32", "fp32"), ("xcodec", "bf16", "bf16")]
    times = {v[:2]: {"enc": [], "dec": [], "enc_mem": 0, "dec_mem": 0} for v in variants}
    outputs = {}
    for rep in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, prec, p in variants:
            with torch.inference_mode():
                if name == "transformers":
                    enc = lambda: hf.encode(x, bw, return_dict=False)  # noqa: E731
                    dec = lambda: hf.decode(ref_codes, return_dict=False)  # noqa: E731
                else:
                    enc = lambda p=p: model.encode(x, bw, precision=p)  # noqa: E731
                    dec = lambda p=p: model.decode(ref_codes, precision=p)  # noqa: E731
                with PeakMemory(device) as me:
                    codes, te = timed(enc, device)
                with PeakMemory(device) as md:
                    audio, td = timed(dec, device)
            t = times[(name, prec)]
            if rep > 0:
                t["enc"].append(te)
                t["dec"].append(td)
            t["enc_mem"] = max(t["enc_mem"], me.peak)
            t["dec_mem"] = max(t["dec_mem"], md.peak)
            outputs[(name, prec)] = (codes, audio)
    base = times[("transformers", "fp32")]
    base_total = statistics.median(base["enc"]) + statistics.median(base["dec"])
    for name, prec, _ in variants:
        t = times[(name, prec)]
        codes, audio = outputs[(name, prec)]
        enc, dec = statistics.median(t["enc"]), statistics.median(t["dec"])
        rows.append(
            {
                "model": name,
                "precision": prec,
                "seconds": seconds,
                "encode_s": enc,
                "decode_s": dec,
                "encode_runs_s": t["enc"],
                "decode_runs_s": t["dec"],
                "rtf": (enc + dec) / seconds,
                "encode_peak_mb": t["enc_mem"] / 2**20,
                "decode_peak_mb": t["dec_mem"] / 2**20,
                "codes_agreement": float((codes.cpu() == ref_codes.cpu()).float().mean()),
                "codes_agreement_vs_exact": float((codes.cpu() == ours.cpu()).float().mean()),
                "codes_identical": bool(torch.equal(codes.cpu(), ref_codes.cpu())),
                "audio_rel_err": rel(audio, ref_audio),
                "speedup_encode": statistics.median(base["enc"]) / enc,
                "speedup_decode": statistics.median(base["dec"]) / dec,
                "speedup_total": base_total / (enc + dec),
            }
        )
    return rows


def bench_compile(model, hf, seconds, args, device) -> list[dict]:
    """CUDA: both models with torch.compile on their conv stacks (fp32 and bf16)."""
    for mod in (model.encoder, model.decoder_2, model.encoder_semantic):
        mod.compile(dynamic=True)
    for mod in (hf.acoustic_encoder, hf.acoustic_decoder, hf.encoder_semantic):
        mod.compile(dynamic=True)
    rows = bench_duration(model, hf, seconds, args, device)
    for r in rows:
        r["compiled"] = True
    return rows


def bench_batch(model, args) -> dict:
    src = speech(60)[0, 0]
    g = torch.Generator().manual_seed(0)
    clips = []
    for _ in range(32):
        n = int(torch.randint(16000, 160001, (1,), generator=g))
        s = int(torch.randint(0, len(src) - n, (1,), generator=g))
        clips.append(src[s : s + n].clone().to(model.device))
    out = {"clips": 32, "audio_s": sum(len(c) for c in clips) / 16000}
    results = {}
    with torch.inference_mode():
        for bs in (1, 8):
            codes, te = timed(lambda bs=bs: encode_many(model, clips, args.bandwidth, batch_size=bs), model.device)
            audio, td = timed(lambda bs=bs, codes=codes: decode_many(model, codes, batch_size=bs), model.device)
            results[bs] = (codes, audio)
            out[f"bs{bs}_encode_s"], out[f"bs{bs}_decode_s"] = te, td
    out["codes_identical"] = all(torch.equal(a, b) for a, b in zip(results[1][0], results[8][0]))
    out["audio_max_rel_err"] = max(rel(a, b) for a, b in zip(results[8][1], results[1][1]))
    out["encode_throughput_ratio"] = out["bs1_encode_s"] / out["bs8_encode_s"]
    out["decode_throughput_ratio"] = out["bs1_decode_s"] / out["bs8_decode_s"]
    return out


def bench_long(model, args) -> dict:
    x = speech(60)
    out = {"seconds": 60, "window_s": args.window, "context_s": args.context}
    with torch.inference_mode():
        ref, t_single = timed(lambda: model.encode(x, args.bandwidth), model.device)
        with PeakMemory(model.device) as m1:
            codes, t_win = timed(lambda: encode_long(model, x, args.bandwidth, window=args.window, context=args.context), model.device)
        out.update(single_pass_s=t_single, windowed_s=t_win, windowed_peak_mb=m1.peak / 2**20)
        out["codes_agreement"] = float((codes == ref).float().mean())
        out["codes_agreement_q0"] = float((codes[:, 0] == ref[:, 0]).float().mean())
        a = model.decode(ref)
        al = decode_long(model, ref, window=args.decode_window)
        out["chunked_decode_rel_err"] = rel(al, a)
        if args.long_minutes > 0:
            xl = speech(args.long_minutes * 60)
            with PeakMemory(model.device) as m2:
                cl, t_long = timed(lambda: encode_long(model, xl, args.bandwidth, window=args.window, context=args.context), model.device)
            out.update(long_minutes=args.long_minutes, long_encode_s=t_long, long_encode_peak_mb=m2.peak / 2**20, long_frames=cl.shape[-1])
            with PeakMemory(model.device) as m3:
                _, t_dec = timed(lambda: decode_long(model, cl, window=args.decode_window), model.device)
            out.update(long_decode_s=t_dec, long_decode_peak_mb=m3.peak / 2**20)
    return out


def bench_stream(model, args) -> list[dict]:
    x = speech(10)
    rows = []
    with torch.inference_mode():
        codes = model.encode(x, args.bandwidth)
        whole = model.decode(codes)[0, 0]
        for chunk, context, lookahead in ((10, 16, 0), (10, 16, 4), (10, 16, 8), (10, 16, 16), (25, 16, 16)):
            dec = StreamingDecoder(model, context=context, lookahead=lookahead)
            pieces, lat = [], []
            for c in chunk_codes(codes, chunk):
                y, t = timed(lambda c=c, dec=dec: dec.push(c), model.device)
                pieces.append(y)
                lat.append(t)
            pieces.append(dec.flush())
            y = torch.cat(pieces)
            rows.append(
                {
                    "chunk_frames": chunk,
                    "chunk_ms": chunk * 1000 / model.frame_rate,
                    "context_frames": context,
                    "lookahead_frames": lookahead,
                    "rel_err": rel(y, whole),
                    "latency_ms_median": statistics.median(lat) * 1000,
                    "latency_ms_max": max(lat) * 1000,
                    "algorithmic_delay_ms": (chunk + lookahead) * 1000 / model.frame_rate,
                }
            )
    return rows


# ---------------------------------------------------------------------------- output
def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    info["transformers"] = transformers.__version__
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
        info["cores"] = os.cpu_count()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        info["avx512_bf16"] = "avx512_bf16" in flags
    except OSError:
        pass
    info["amx"] = cpu_has_amx()
    info["load_avg_1m"] = os.getloadavg()[0]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict]) -> None:
    head = f"{'audio':>6} {'model':<13} {'prec':<5} {'enc s':>7} {'dec s':>7} {'RTF':>6} {'enc MB':>7} {'dec MB':>7} {'codes=':>7} {'vs fp32':>7} {'audio err':>9} {'x enc':>6} {'x dec':>6} {'x total':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tag = r["model"] + (" +compile" if r.get("compiled") else "")
        print(
            f"{r['seconds']:>5.0f}s {tag:<13} {r['precision']:<5} {r['encode_s']:>7.3f} {r['decode_s']:>7.3f} {r['rtf']:>6.3f} "
            f"{r['encode_peak_mb']:>7.0f} {r['decode_peak_mb']:>7.0f} {r['codes_agreement']:>7.2%} {r['codes_agreement_vs_exact']:>7.2%} "
            f"{r['audio_rel_err']:>9.1e} {r['speedup_encode']:>6.2f} {r['speedup_decode']:>6.2f} {r['speedup_total']:>7.2f}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--durations", type=float, nargs="+", default=[10.0, 60.0], help="seconds of speech")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; one more warms up)")
    p.add_argument("--bandwidth", type=float, default=4.0)
    p.add_argument("--config", default="configs/xcodec_hubert_librispeech.yaml")
    p.add_argument("--checkpoint", help="real weights instead of random ones (any format XCodec.from_pretrained reads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", action="store_true", help="32 clips of 1-10 s: batch 8 vs batch 1")
    p.add_argument("--long", action="store_true", help="windowed vs single-pass encoding of 60 s, chunked decoding")
    p.add_argument("--long-minutes", type=float, default=0, help="also encode/decode this many minutes (peak memory)")
    p.add_argument("--window", type=float, default=30.0, help="encoding window, seconds")
    p.add_argument("--context", type=float, default=5.0, help="encoding context on each side, seconds")
    p.add_argument("--decode-window", type=int, default=1500, help="decoding window, frames")
    p.add_argument("--stream", action="store_true", help="streaming decode error and latency")
    p.add_argument("--no-compile", action="store_true", help="on CUDA, skip the torch.compile rows")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--no-mmap", action="store_true",
                   help="glibc serves every block from the heap and keeps freed memory (mallopt), for both "
                        "models: shows how much of each model's CPU time is page faults of fresh tensors")
    args = p.parse_args(argv)
    if args.no_mmap and not no_mmap():
        p.error("--no-mmap needs Linux with glibc")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, hf = build_models(args, device)
    print(f"models ready in {time.perf_counter() - t0:.0f} s; machine: {json.dumps(machine())}", flush=True)
    result: dict = {"machine": machine(), "no_mmap": args.no_mmap, "command": " ".join([Path(sys.executable).name] + sys.argv), "rows": []}
    for seconds in args.durations:
        rows = bench_duration(model, hf, seconds, args, device)
        result["rows"].extend(rows)
        print_table(rows)
        print(flush=True)
    if device.type == "cuda" and not args.no_compile:
        rows = bench_compile(model, hf, args.durations[0], args, device)
        result["rows"].extend(rows)
        print_table(rows)
    if args.batch:
        result["batch"] = bench_batch(model, args)
        print("batch:", json.dumps(result["batch"], indent=1), flush=True)
    if args.long:
        result["long"] = bench_long(model, args)
        print("long:", json.dumps(result["long"], indent=1), flush=True)
    if args.stream:
        result["stream"] = bench_stream(model, args)
        for r in result["stream"]:
            print("stream:", json.dumps(r), flush=True)
    result["machine_end"] = machine()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
