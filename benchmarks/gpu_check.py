"""The GPU check: everything that only a CUDA run can show, in one script and one JSON summary.

    python benchmarks/gpu_check.py                           # one GPU; under 10 minutes on an H200
    python benchmarks/gpu_check.py --device cpu --quick      # the script itself, on CPU (the test suite runs this)

Sections (each records ``ok`` and its numbers; one failing section does not stop the others):

- ``device``: the model on the device, every input on the CPU: encode, a ragged batch,
  decode, encode_many/decode_many, encode_long, streaming decode (its empty chunks included);
- ``exactness``: codes of CPU fp32, device fp32, a device batch of clips of different
  lengths and transformers' XcodecModel on the device, agreement per quantizer, and the
  TF32 flags left as they were;
- ``bf16``: device bf16 codes against device fp32, per quantizer, and the speed of both;
- ``compile``: torch.compile of the acoustic and semantic stacks: codes agreement and speed;
- ``train``: single-device training of the tiny recipe in fp32 and bf16, stopped at step 2
  and resumed to step 4; then two ranks on the one device (``dist_backend=gloo``: NCCL
  refuses two ranks on one GPU) with identical state on both ranks;
- ``cli_long``: a long file through ``inference.py`` (windowed encoding, chunked decoding);
- ``throughput``: tokenization of a directory through ``inference.py`` (DataLoader
  workers, length-sorted batches) in fp32 and bf16, in hours of audio per hour, against
  transformers' XcodecModel encoding the same clips in padded batches on the same device.

Weights are random (seeded), codebooks k-means-initialised on real audio; the teacher is
built from its config (``pretrained_teacher`` off) and ``HF_HUB_OFFLINE=1``: no network.
The full-size architecture is used except with ``--quick`` (configs/tiny.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_inference import read, rel, speech, timed  # noqa: E402
from models import XCodec, build_codec, init_codebooks, load_generator_config  # noqa: E402
from models.export import save_export, to_transformers  # noqa: E402
from models.streaming import StreamingDecoder, chunk_codes, decode_long, decode_many, encode_long, encode_many  # noqa: E402
from utils.cli import DefaultsHelpFormatter  # noqa: E402
from utils.precision import ieee_fp32  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------- helpers
def agreement(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Fraction of equal codes per quantizer of (B, n_q, F) or (n_q, F) codes."""
    a, b = a.cpu(), b.cpu()
    if a.dim() == 2:
        a, b = a[None], b[None]
    n = min(a.shape[-1], b.shape[-1])
    return [round(float((a[:, q, :n] == b[:, q, :n]).float().mean()), 6) for q in range(a.shape[1])]


def build_model(quick: bool, seed: int = 0) -> XCodec:
    config = ROOT / "configs" / ("tiny.yaml" if quick else "xcodec_hubert_librispeech.yaml")
    gen, scale = load_generator_config(config)
    torch.manual_seed(seed)
    model = build_codec(gen, scale, weight_norm=False).eval()
    clips = [read(name)[shift:] * 0.95 for name in ("speech_cn_4s.flac", "music_4s.flac") for shift in (0, 64, 128)]
    init_codebooks(model, clips, "kmeans")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def run(cmd: list[str], env_extra: dict | None = None, timeout: int = 600) -> tuple[int, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


class Check:
    """Runs the sections, each into ``results[name]``, never letting one stop the rest."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def section(self, name: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            out = {"ok": True, **fn()}
        except Exception as exc:  # recorded in the JSON: the next section still runs
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        self.results[name] = out
        print(f"[{'ok' if out['ok'] else 'FAILED'}] {name} ({out['seconds']} s)" + ("" if out["ok"] else f": {out['error'][:300]}"), flush=True)


# ---------------------------------------------------------------------------- sections
def check_device(model: XCodec) -> dict:
    x = speech(3.0)  # CPU input, model on the device
    codes = model.encode(x)
    ragged = model.encode(torch.cat([x, x]), lengths=[x.shape[-1], x.shape[-1] - 3200])
    audio = model.decode(codes.cpu())
    many = encode_many(model, [x[0, 0], x[0, 0, :16000]], batch_size=2)
    back = decode_many(model, [c.cpu() for c in many], batch_size=2)
    long = encode_long(model, speech(12.0), window=4, context=1)
    dec = StreamingDecoder(model, lookahead=4)
    pieces = [dec.push(c.cpu()) for c in chunk_codes(codes, 3)] + [dec.flush()]
    stream = torch.cat(pieces)
    devices = {t.device.type for t in (codes, ragged, audio, *many, *back, long, stream, *pieces)}
    assert devices == {model.device.type}, devices
    return {
        "devices": sorted(devices),
        "ragged_item0_equals_alone": bool(torch.equal(ragged[0], codes[0])),
        "chunked_decode_rel_err": rel(decode_long(model, codes, window=20), audio),
        "stream_rel_err": rel(stream, audio[0, 0]),
    }


def check_exactness(model: XCodec, cpu_model: XCodec, hf) -> dict:
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # a user's defaults on Ampere+
    try:
        lengths = [48000, 40000, 30400, 16123]
        clips = [speech(n / 16000) for n in lengths]
        batch = torch.zeros(len(clips), 1, max(lengths))
        for i, c in enumerate(clips):
            batch[i, :, : c.shape[-1]] = c[0]
        per_clip, vs_cpu, vs_hf, batch_vs_alone = [], [], [], []
        batched = model.encode(batch, lengths=lengths)
        frames = model.num_frames(torch.tensor(lengths))
        for i, c in enumerate(clips):
            dev = model.encode(c)
            per_clip.append(dev)
            vs_cpu.append(agreement(dev, cpu_model.encode(c)))
            with ieee_fp32(), torch.inference_mode():  # the reference in IEEE fp32 too
                vs_hf.append(agreement(dev, hf.encode(c.to(model.device), return_dict=False)))
            batch_vs_alone.append(agreement(batched[i : i + 1, :, : int(frames[i])], dev))
        audio_err = rel(model.decode(per_clip[0]), cpu_model.decode(per_clip[0].cpu()))
        restored = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return {
        "lengths": lengths,
        "device_vs_cpu_fp32": vs_cpu,
        "device_vs_xcodecmodel": vs_hf,
        "batch_vs_alone": batch_vs_alone,
        "all_identical": all(v == 1.0 for rows in (vs_cpu, vs_hf, batch_vs_alone) for r in rows for v in r),
        "decode_device_vs_cpu_rel_err": audio_err,
        "tf32_flags_restored": restored,
    }


def check_bf16(model: XCodec) -> dict:
    x = speech(10.0)
    model.encode(x, precision="bf16")  # warm-up
    fp32, t32 = timed(lambda: model.encode(x), model.device)
    bf16, t16 = timed(lambda: model.encode(x, precision="bf16"), model.device)
    audio, td16 = timed(lambda: model.decode(fp32, precision="bf16"), model.device)
    ref, td32 = timed(lambda: model.decode(fp32), model.device)
    return {"agreement_per_quantizer": agreement(bf16, fp32), "encode_s": {"fp32": t32, "bf16": t16},
            "decode_s": {"fp32": td32, "bf16": td16}, "decode_rel_err": rel(audio, ref)}  # fmt: skip


def check_compile(model: XCodec, quick: bool) -> dict:
    if model.device.type != "cuda":
        return {"skipped": "torch.compile is checked on CUDA only"}
    x = speech(10.0)
    eager, t_eager = timed(lambda: model.encode(x), model.device)
    for module in (model.encoder, model.decoder_2, model.encoder_semantic):
        module.compile(dynamic=False)
    try:
        _, t_first = timed(lambda: model.encode(x), model.device)  # compiles
        compiled, t_compiled = timed(lambda: model.encode(x), model.device)
    finally:
        for module in (model.encoder, model.decoder_2, model.encoder_semantic):
            module._compiled_call_impl = None  # back to eager for the sections after this one
    return {"agreement_per_quantizer": agreement(compiled, eager), "eager_s": t_eager, "compiled_s": t_compiled, "compile_s": t_first}


def check_train(device: str, work: Path) -> dict:
    tiny = str(ROOT / "configs" / "tiny.yaml")
    base = [sys.executable, str(ROOT / "main_launch_vqdp.py"), "--config", tiny, f"device={device}", "validation_file=null"]
    out: dict = {}
    for precision in ("fp32", "bf16"):
        log_dir = work / f"train_{precision}"
        rc1, log1, t1 = run([*base, f"log_dir={log_dir}", f"precision={precision}", "max_steps=2", "checkpoint_interval=2"])
        rc2, log2, t2 = run([*base, f"log_dir={log_dir}", f"precision={precision}", "max_steps=4", "checkpoint_interval=2"])
        out[precision] = {"rc": [rc1, rc2], "resumed": "resumed from" in log2 and "step 2" in log2,
                          "finished": "finished at step 4" in log2, "seconds": [round(t1, 1), round(t2, 1)]}  # fmt: skip
        if rc1 or rc2:
            out[precision]["log_tail"] = (log1 + log2)[-3000:]
    hashes = work / "hashes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "main_launch_vqdp.py"),
           "--config", tiny, f"device={device}", "dist_backend=gloo", f"log_dir={work / 'two_ranks'}", "max_steps=3", "validation_file=null"]  # fmt: skip
    rc, log, t = run(cmd, {"XCODEC_TEST_HASH_DIR": str(hashes), "OMP_NUM_THREADS": "1"})
    same = False
    if rc == 0:
        r0, r1 = (json.loads((hashes / f"hash_rank{r}.json").read_text()) for r in (0, 1))
        same = all(r0[k] == r1[k] for k in ("codec", "codebooks", "discriminators", "optimizer_g"))
    out["two_ranks_one_device"] = {"rc": rc, "identical_ranks": same, "seconds": round(t, 1), **({"log_tail": log[-3000:]} if rc else {})}
    assert all(v["rc"] in ([0, 0], 0) for v in out.values()), "a training run failed (see log_tail)"
    return out


def check_cli_long(export: Path, device: str, work: Path, quick: bool) -> dict:
    seconds = 50 if quick else 600
    long = work / "long.wav"
    sf.write(long, speech(seconds)[0, 0].numpy() / 0.95, 16000)
    cmd = [sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(export), "--input", str(long), "--output", str(work / "long_rec.wav"),
           "--codes-out", str(work / "long.npy"), "--device", device, "--window", "20", "--context", "5"]  # fmt: skip
    rc, log, t = run(cmd)
    assert rc == 0, log[-3000:]
    codes = np.load(work / "long.npy")
    return {"audio_s": seconds, "rc": rc, "seconds": round(t, 1), "codes_shape": list(codes.shape),
            "output_samples": sf.info(str(work / "long_rec.wav")).frames}  # fmt: skip


def check_throughput(model: XCodec, hf, export: Path, device: str, work: Path, quick: bool) -> dict:
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    g = np.random.default_rng(0)
    n_files = 12 if quick else 256
    src = speech(60)[0, 0].numpy() / 0.95
    lengths = []
    for i in range(n_files):
        n = int(g.integers(16000, 16000 * (4 if quick else 15)))
        s = int(g.integers(0, len(src) - n))
        sf.write(corpus / f"clip{i:04d}.flac", src[s : s + n], 16000)
        lengths.append(n)
    audio_hours = sum(lengths) / 16000 / 3600
    out: dict = {"files": n_files, "audio_hours": audio_hours}
    batch = 4 if quick else 32
    for precision in ("fp32", "bf16"):
        codes_dir = work / f"codes_{precision}"
        cmd = [sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(export), "--input", str(corpus), "--codes-out", str(codes_dir),
               "--device", device, "--batch-size", str(batch), "--precision", precision]  # fmt: skip
        rc, log, t = run(cmd)
        assert rc == 0, log[-3000:]
        # The CLI's own figure: reading, encoding and writing, after the model is loaded.
        speed = float(re.search(r"([\d.]+) audio hours per hour", log).group(1))
        out[f"xcodec_{precision}"] = {"process_seconds": round(t, 2), "hours_per_hour": speed, "batch_size": batch}
    # transformers' XcodecModel on the same clips, padded batches of similar length, in
    # process; its files are read before the clock starts (ours include reading).
    wavs = sorted((torch.from_numpy(sf.read(p, dtype="float32")[0]) * 0.95 for p in sorted(corpus.glob("*.flac"))), key=len, reverse=True)

    def hf_all() -> None:
        with torch.inference_mode():
            for i in range(0, len(wavs), batch):
                group = wavs[i : i + batch]
                x = torch.zeros(len(group), 1, len(group[0]))
                for j, w in enumerate(group):
                    x[j, 0, : len(w)] = w
                hf.encode(x.to(model.device), return_dict=False)

    _, t_hf = timed(hf_all, model.device)
    out["xcodecmodel_fp32_in_process"] = {"seconds": round(t_hf, 2), "hours_per_hour": audio_hours / (t_hf / 3600), "batch_size": batch}
    out["speedup_fp32"] = out["xcodec_fp32"]["hours_per_hour"] / out["xcodecmodel_fp32_in_process"]["hours_per_hour"]
    out["speedup_bf16"] = out["xcodec_bf16"]["hours_per_hour"] / out["xcodecmodel_fp32_in_process"]["hours_per_hour"]
    return out


# ---------------------------------------------------------------------------- main
def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "cores": os.cpu_count()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of the script)")
    p.add_argument("--quick", action="store_true", help="tiny model, few files: minutes on CPU")
    p.add_argument("--json", type=Path, help="summary file (default: benchmarks/results/gpu_check_<machine>.json)")
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here (use --device cpu for the smoke test)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="xcodec_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine(device), "device": str(device), "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"machine: {json.dumps(summary['machine'])}", flush=True)
    cpu_model = build_model(args.quick)
    model = build_model(args.quick).to(device)
    export = save_export(cpu_model, work / "export")
    hf = to_transformers(cpu_model).to(device).eval()
    check = Check()
    check.section("device", lambda: check_device(model))
    check.section("exactness", lambda: check_exactness(model, cpu_model, hf))
    check.section("bf16", lambda: check_bf16(model))
    check.section("compile", lambda: check_compile(model, args.quick))
    check.section("train", lambda: check_train(args.device, work))
    check.section("cli_long", lambda: check_cli_long(export, args.device, work, args.quick))
    check.section("throughput", lambda: check_throughput(model, hf, export, args.device, work, args.quick))
    summary["sections"] = check.results
    summary["all_ok"] = all(r["ok"] for r in check.results.values())
    name = summary["machine"].get("gpu", "cpu").lower().replace(" ", "_")
    path = args.json or RESULTS / f"gpu_check_{name}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {path}: {'all sections ok' if summary['all_ok'] else 'some sections FAILED'}")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
