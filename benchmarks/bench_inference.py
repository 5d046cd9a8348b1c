"""Inference benchmark: XCodec against transformers' XcodecModel with the same weights.
Both run in this process on the same real speech, alternating call by call: time, real-time factor, peak memory,
codes agreement, audio error (usage: docs/performance.md). Also what every benchmark shares."""

from __future__ import annotations

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

import models.streaming as st  # noqa: E402
from models import XCodec, build_codec, init_codebooks, load_generator_config  # noqa: E402
from models.export import to_transformers  # noqa: E402
from models.precision import cpu_has_amx  # noqa: E402
from utils.cli import argument_parser  # noqa: E402


def read(name: str) -> torch.Tensor:
    """A bundled 16 kHz asset as a float32 (T,) tensor."""
    wav, rate = sf.read(str(ROOT / "tests" / "assets" / name), dtype="float32")
    assert rate == 16000, rate
    return torch.from_numpy(wav)


def speech(seconds: float) -> torch.Tensor:
    """Real English speech tiled (or cropped) to ``seconds``: (1, 1, T), scaled by 0.95."""
    w = read("speech_en.flac")
    n = int(round(seconds * 16000))
    return (w.repeat(-(-n // len(w)))[:n] * 0.95)[None, None].contiguous()


def random_codec(config: str | Path, seed: int = 0) -> XCodec:
    """The seeded random codec of an architecture config (codebooks still to initialise)."""
    gen, scale = load_generator_config(ROOT / config)
    torch.manual_seed(seed)
    return build_codec(gen, scale, weight_norm=False).eval()


def timed(fn, device: torch.device):
    """``(fn(), seconds)``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` over their common length."""
    n = min(a.shape[-1], b.shape[-1])
    a, b = a.float().cpu()[..., :n], b.float().cpu()[..., :n]
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def machine(device: torch.device | None = None) -> dict:
    """Versions, CPU (model, cores, bf16/AMX support, load) and GPU of this machine."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "amx": cpu_has_amx(), "load_avg_1m": os.getloadavg()[0]}
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        cpu = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        info["cpu"], info["avx512_bf16"] = cpu.get("model name", info["cpu"]), "avx512_bf16" in cpu.get("flags", "")
    except OSError:
        pass
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def no_mmap() -> bool:
    """mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, 1 GB): a new tensor mostly reuses touched heap pages."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn, device: torch.device) -> tuple[object, float, int]:
    """``(fn(), seconds, peak memory growth in bytes)``: CUDA's allocator peak, or the RSS sampled every 2 ms."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out, seconds = timed(fn, device)
        return out, seconds, torch.cuda.max_memory_allocated() - base
    base = top = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal top
        while not done.wait(0.002):
            top = max(top, _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, seconds = timed(fn, device)
    done.set()
    thread.join()
    return out, seconds, max(top, _rss()) - base


def build_models(args, device: torch.device):
    if args.checkpoint:
        model = XCodec.from_pretrained(args.checkpoint, config=args.config)
    else:
        model = random_codec(args.config, args.seed)
        # Realistic codebooks: k-means on latents of other real audio (several sub-hop shifts).
        clips = [read(name)[shift:] * 0.95 for name in ("speech_cn_4s.flac", "music_4s.flac")
                 for shift in range(0, model.hop_length, model.hop_length // 5)]  # fmt: skip
        init_codebooks(model, clips, "kmeans")
        model.eval().requires_grad_(False)
    hf = to_transformers(model).eval()
    return model.to(device), hf.to(device)


@torch.inference_mode()
def bench_duration(model, hf, seconds: float, args, device) -> list[dict]:
    x, bw = speech(seconds).to(device), args.bandwidth
    ref_codes = hf.encode(x, bw, return_dict=False)
    ref_audio = hf.decode(ref_codes, return_dict=False)
    exact = model.encode(x, bw)
    calls = {("transformers", "fp32"): (lambda: hf.encode(x, bw, return_dict=False),
                                        lambda: hf.decode(ref_codes, return_dict=False))}  # fmt: skip
    for p in ("fp32", "bf16"):  # every row decodes XcodecModel's codes
        calls["xcodec", p] = (lambda p=p: model.encode(x, bw, precision=p),
                              lambda p=p: model.decode(ref_codes, precision=p))  # fmt: skip
    times = {k: {"enc": [], "dec": [], "enc_mem": 0, "dec_mem": 0} for k in calls}
    outputs = {}
    for rep in range(args.repeats + 1):  # the first round warms up and is not timed
        for key, (enc, dec) in calls.items():
            codes, te, me = measured(enc, device)
            audio, td, md = measured(dec, device)
            t = times[key]
            if rep > 0:
                t["enc"].append(te)
                t["dec"].append(td)
            t["enc_mem"], t["dec_mem"] = max(t["enc_mem"], me), max(t["dec_mem"], md)
            outputs[key] = (codes.cpu(), audio)
    base = times[("transformers", "fp32")]
    base_enc, base_dec = statistics.median(base["enc"]), statistics.median(base["dec"])
    rows = []
    for (name, prec), t in times.items():
        codes, audio = outputs[(name, prec)]
        enc, dec = statistics.median(t["enc"]), statistics.median(t["dec"])
        rows.append({"model": name, "precision": prec, "seconds": seconds, "encode_s": enc, "decode_s": dec,
                     "encode_runs_s": t["enc"], "decode_runs_s": t["dec"], "rtf": (enc + dec) / seconds,
                     "encode_peak_mb": t["enc_mem"] / 2**20, "decode_peak_mb": t["dec_mem"] / 2**20,
                     "codes_agreement": float((codes == ref_codes.cpu()).float().mean()),
                     "codes_agreement_vs_exact": float((codes == exact.cpu()).float().mean()),
                     "codes_identical": bool(torch.equal(codes, ref_codes.cpu())),
                     "audio_rel_err": rel(audio, ref_audio),
                     "speedup_encode": base_enc / enc, "speedup_decode": base_dec / dec,
                     "speedup_total": (base_enc + base_dec) / (enc + dec)})  # fmt: skip
    return rows


@torch.inference_mode()
def bench_batch(model, args) -> dict:
    src = speech(60)[0, 0]
    g = torch.Generator().manual_seed(0)
    clips = []
    for _ in range(32):
        n = int(torch.randint(16000, 160001, (1,), generator=g))
        s = int(torch.randint(0, len(src) - n, (1,), generator=g))
        clips.append(src[s : s + n].clone().to(model.device))
    out, results, dev, bw = {"clips": 32, "audio_s": sum(map(len, clips)) / 16000}, {}, model.device, args.bandwidth
    for b in (1, 8):
        codes, out[f"bs{b}_encode_s"] = timed(lambda b=b: st.encode_many(model, clips, bw, batch_size=b), dev)
        audio, out[f"bs{b}_decode_s"] = timed(lambda b=b, c=codes: st.decode_many(model, c, batch_size=b), dev)
        results[b] = (codes, audio)
    out["codes_identical"] = all(torch.equal(a, b) for a, b in zip(results[1][0], results[8][0]))
    out["audio_max_rel_err"] = max(rel(a, b) for a, b in zip(results[8][1], results[1][1]))
    out["encode_throughput_ratio"] = out["bs1_encode_s"] / out["bs8_encode_s"]
    out["decode_throughput_ratio"] = out["bs1_decode_s"] / out["bs8_decode_s"]
    return out


@torch.inference_mode()
def bench_long(model, args) -> dict:
    x, dev = speech(60), model.device
    out = {"seconds": 60, "window_s": args.window, "context_s": args.context}

    def encode(x: torch.Tensor) -> torch.Tensor:
        return st.encode_long(model, x, args.bandwidth, window=args.window, context=args.context)

    ref, out["single_pass_s"] = timed(lambda: model.encode(x, args.bandwidth), dev)
    codes, out["windowed_s"], peak = measured(lambda: encode(x), dev)
    out["windowed_peak_mb"] = peak / 2**20
    out["codes_agreement"] = float((codes == ref).float().mean())
    out["codes_agreement_q0"] = float((codes[:, 0] == ref[:, 0]).float().mean())
    out["chunked_decode_rel_err"] = rel(st.decode_long(model, ref, window=args.decode_window), model.decode(ref))
    if args.long_minutes > 0:
        cl, t_long, peak = measured(lambda: encode(speech(args.long_minutes * 60)), dev)
        out.update(long_minutes=args.long_minutes, long_encode_s=t_long, long_encode_peak_mb=peak / 2**20)
        out["long_frames"] = cl.shape[-1]
        _, t_dec, peak = measured(lambda: st.decode_long(model, cl, window=args.decode_window), dev)
        out.update(long_decode_s=t_dec, long_decode_peak_mb=peak / 2**20)
    return out


@torch.inference_mode()
def bench_stream(model, args) -> list[dict]:
    codes = model.encode(speech(10), args.bandwidth)
    whole = model.decode(codes)[0, 0]
    rows = []
    for chunk, context, lookahead in ((10, 16, 0), (10, 16, 4), (10, 16, 8), (10, 16, 16), (25, 16, 16)):
        dec = st.StreamingDecoder(model, context=context, lookahead=lookahead)
        pieces, lat = zip(*[timed(lambda c=c, d=dec: d.push(c), model.device) for c in st.chunk_codes(codes, chunk)])
        rows.append({"chunk_frames": chunk, "chunk_ms": chunk * 1000 / model.frame_rate, "context_frames": context,
                     "lookahead_frames": lookahead, "rel_err": rel(torch.cat([*pieces, dec.flush()]), whole),
                     "latency_ms_median": statistics.median(lat) * 1000, "latency_ms_max": max(lat) * 1000,
                     "algorithmic_delay_ms": (chunk + lookahead) * 1000 / model.frame_rate})  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'audio':>6} {'model':<13} {'prec':<5} {'enc s':>7} {'dec s':>7} {'RTF':>6} {'enc MB':>7} {'dec MB':>7} "
            f"{'codes=':>7} {'vs fp32':>7} {'audio err':>9} {'x enc':>6} {'x dec':>6} {'x total':>7}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for r in rows:
        tag = r["model"] + (" +compile" if r.get("compiled") else "")
        print(f"{r['seconds']:>5.0f}s {tag:<13} {r['precision']:<5} {r['encode_s']:>7.3f} {r['decode_s']:>7.3f} "
              f"{r['rtf']:>6.3f} {r['encode_peak_mb']:>7.0f} {r['decode_peak_mb']:>7.0f} {r['codes_agreement']:>7.2%} "
              f"{r['codes_agreement_vs_exact']:>7.2%} {r['audio_rel_err']:>9.1e} {r['speedup_encode']:>6.2f} "
              f"{r['speedup_decode']:>6.2f} {r['speedup_total']:>7.2f}")  # fmt: skip


def main(argv=None) -> int:
    p = argument_parser(__doc__.split("\n")[0])
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
    p.add_argument("--no-mmap", action="store_true", help="glibc serves every block from the heap and keeps freed "
                   "memory (mallopt): how much of each model's CPU time is page faults of fresh tensors")
    args = p.parse_args(argv)
    if args.no_mmap and not no_mmap():
        p.error("--no-mmap needs Linux with glibc")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, hf = build_models(args, device)
    command = " ".join([Path(sys.executable).name] + sys.argv)
    result: dict = {"machine": machine(), "no_mmap": args.no_mmap, "command": command, "rows": []}
    print(f"models ready in {time.perf_counter() - t0:.0f} s; machine: {json.dumps(result['machine'])}", flush=True)
    for seconds in args.durations:
        rows = bench_duration(model, hf, seconds, args, device)
        result["rows"].extend(rows)
        print_table(rows)
        print(flush=True)
    if device.type == "cuda" and not args.no_compile:  # both models with torch.compile on their conv stacks
        for mod in (model.encoder, model.decoder_2, model.encoder_semantic, hf.acoustic_encoder, hf.acoustic_decoder,
                    hf.encoder_semantic):  # fmt: skip
            mod.compile(dynamic=True)
        rows = [{**r, "compiled": True} for r in bench_duration(model, hf, args.durations[0], args, device)]
        result["rows"].extend(rows)
        print_table(rows)
    for name, fn in (("batch", bench_batch), ("long", bench_long), ("stream", bench_stream)):
        if getattr(args, name):
            result[name] = fn(model, args)
            print(f"{name}:", json.dumps(result[name], indent=1), flush=True)
    result["machine_end"] = machine()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
