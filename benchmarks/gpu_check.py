"""The GPU check: everything that only a CUDA run can show, in one script and one JSON summary.
Run it with ``bash benchmarks/gpu_check.sh`` on the GPU machine, ``--device cpu --quick`` on CPU (docs/performance.md).

Sections (each records ``ok``, its numbers and seconds; a failing one does not stop the others; the JSON is
rewritten after each; one whose budget no longer fits is skipped): ``device`` (every API, model on the device),
``exactness`` (device fp32 codes against CPU fp32 and XcodecModel in IEEE fp32, batches against each clip alone,
the margin at every mismatch, TF32 settings restored), ``bf16`` (against fp32, with margins), ``xcodec2`` (X-Codec 2
from transformers' format: device codes against CPU and Xcodec2Model, ragged batch, bf16, speed), ``throughput``
(an hour of 2-20 s clips: audio hours per GPU-hour of inference.py, the model and XcodecModel), ``cli_long``
(windowed encoding, chunked decoding), ``train`` (stop at 2, resume to 4; two ranks on one device), ``compile``.
Weights are random (seeded), codebooks k-means'd on >= 10x as many real frames as entries, the teacher built
offline; subprocesses are capped at ``--cap`` seconds; ``--quick`` uses the tiny architecture.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(ROOT))

import models.streaming as st  # noqa: E402
from benchmarks import gpu_helpers as gh  # noqa: E402
from benchmarks.bench_inference import machine, random_codec, rel, speech, timed  # noqa: E402
from benchmarks.bench_xcodec2 import hf_decode, hf_encode, random_xcodec2  # noqa: E402
from models import XCodec, init_codebooks  # noqa: E402
from models.export import save_export, to_transformers  # noqa: E402
from models.precision import autocast, ieee_fp32, tf32_switches  # noqa: E402
from modules.tiled import BF16_ONEDNN  # noqa: E402
from utils.cli import argument_parser  # noqa: E402


@dataclass
class Run:
    """What every section may use: the models, the export, the device, scratch space, the runner."""

    model: XCodec  # on the device
    cpu_model: XCodec
    hf: torch.nn.Module  # transformers' XcodecModel, on the device
    export: Path
    device: str
    work: Path
    quick: bool
    check: gh.Check

    @property
    def precisions(self) -> tuple[str, ...]:
        """bf16 only where it has kernels: on an AVX2-only CPU bf16 convs run ~100x slower (torch's own loop)."""
        return ("fp32", "bf16") if self.model.device.type != "cpu" or BF16_ONEDNN else ("fp32",)

    def inference(self, *args: str) -> tuple[int, str, float]:
        """``inference.py`` with the exported model on the device, capped (see :meth:`gh.Check.run`)."""
        rc, log, t = self.check.run([sys.executable, str(ROOT / "inference.py"), "--checkpoint", str(self.export),
                                     "--device", self.device, *args])  # fmt: skip
        assert rc == 0, log[-3000:]
        return rc, log, t


def check_device(run: Run) -> dict:
    model = run.model
    x = gh.clip(48000, 0)  # CPU input, model on the device
    codes = model.encode(x)
    audio = model.decode(codes.cpu())
    many = st.encode_many(model, [x[0, 0], x[0, 0, :16000]], batch_size=2)
    back = st.decode_many(model, [c.cpu() for c in many], batch_size=2)
    long = st.encode_long(model, speech(12.0), window=4, context=1)
    dec = st.StreamingDecoder(model, lookahead=4)
    pieces = [dec.push(c.cpu()) for c in st.chunk_codes(codes, 3)] + [dec.flush()]
    stream = torch.cat(pieces)
    devices = {t.device.type for t in (codes, audio, *many, *back, long, stream, *pieces)}
    assert devices == {model.device.type}, devices
    return {"devices": sorted(devices), "encode_many_equals_encode": bool(torch.equal(many[0], codes[0])),
            "chunked_decode_rel_err": rel(st.decode_long(model, codes, window=20), audio),
            "stream_rel_err": rel(stream, audio[0, 0])}  # fmt: skip


def check_exactness(run: Run) -> dict:
    model, cpu_model, device = run.model, run.cpu_model, run.model.device
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a user's usual TF32 opt-in (cuDNN convolutions default to TF32)
    flags = [getattr(obj, name) for obj, name in tf32_switches()]
    lengths = [48000, 40000, 30400, 16123]
    clips = [gh.clip(n, seed) for seed, n in enumerate(lengths)]
    ref = [cpu_model.encode(c) for c in clips]  # CPU fp32: the reference
    alone = [model.encode(c) for c in clips]
    vs_cpu = gh.agreement(torch.cat([a[..., : r.shape[-1]] for a, r in zip(alone, ref)], -1), torch.cat(ref, -1))
    found = gh.mismatches(cpu_model, clips, ref, alone)

    with ieee_fp32(device=device), torch.inference_mode():  # the reference model in IEEE fp32 as well
        hf_codes = [run.hf.encode(c.to(device), return_dict=False) for c in clips]
    vs_hf = gh.agreement(torch.cat(alone, -1), torch.cat(hf_codes, -1))
    hf_vs_cpu = gh.agreement(torch.cat(hf_codes, -1), torch.cat(ref, -1))

    # A batch of four different clips of one length (one batched pass everywhere) and a ragged
    # batch (zero-padded, with lengths), each against every clip alone on the same device.
    equal = [gh.clip(40000, 10 + i) for i in range(4)]
    batched = gh.agreement(model.encode(torch.cat(equal)), torch.cat([model.encode(c) for c in equal]))
    ragged = gh.ragged_vs_alone(model, clips, alone, "fp32")

    with ieee_fp32(device=device):  # as exact mode computes them (outside it, the user's TF32 defaults apply)
        latents_err = rel(model.latents(clips[0].to(device))[0], cpu_model.latents(clips[0])[0])
    audio_err = rel(model.decode(alone[0]), cpu_model.decode(alone[0].cpu()))
    # After exact mode: the flags as they were, and the getter (Inductor calls it) answers (raises if APIs mixed).
    flags_ok = torch.get_float32_matmul_precision() == "high" and [getattr(o, n) for o, n in tf32_switches()] == flags
    torch.set_float32_matmul_precision(precision)  # the process as it was, for the sections after
    used = [int(q.unique().numel()) for q in torch.cat(ref, -1)[0].cpu()]  # distinct codes per quantizer
    return {"lengths": lengths, "codes_used": used, "device_vs_cpu_fp32": vs_cpu, "device_vs_cpu_mismatches": found,
            "device_vs_xcodecmodel": vs_hf, "xcodecmodel_device_vs_cpu_fp32": hf_vs_cpu, "batch_equal_lengths": batched,
            "batch_ragged": ragged, "latents_device_vs_cpu_rel_err": latents_err, "tf32_flags_restored": flags_ok,
            "decode_device_vs_cpu_rel_err": audio_err,
            "all_identical": all(v == 1.0 for row in (vs_cpu, vs_hf, batched, ragged) for v in row)}  # fmt: skip


def check_bf16(run: Run) -> dict:
    if "bf16" not in run.precisions:
        return {"skipped": "no bf16 kernels on this CPU (oneDNN needs AVX512BW, AVX-NE-CONVERT or AMX)"}
    model, cpu_model = run.model, run.cpu_model
    clips = [gh.clip(160000, 20), gh.clip(97000, 21)]
    fp32 = [model.encode(c) for c in clips]
    bf16 = [model.encode(c, precision="bf16") for c in clips]
    found = gh.mismatches(cpu_model, clips, fp32, bf16)  # margins of the fp32 reference residual (CPU model)
    return {"agreement_per_quantizer": gh.agreement(torch.cat(bf16, -1), torch.cat(fp32, -1)),
            "mismatches_vs_fp32": found,
            "bf16_ragged_batch_vs_alone": gh.ragged_vs_alone(model, clips, bf16, "bf16"),
            "decode_rel_err": rel(model.decode(fp32[0], precision="bf16"), model.decode(fp32[0]))}  # fmt: skip


def check_xcodec2(run: Run) -> dict:
    """X-Codec 2 (seeded random weights, the released architecture or tiny with --quick, loaded from transformers'
    format): device fp32 codes against CPU fp32 and Xcodec2Model in IEEE fp32, a ragged batch against each clip
    alone, bf16 against fp32, decoding against the CPU; seconds per audio second of both models (10 s, 4 s quick)."""
    cpu_model, hf = random_xcodec2(run.quick)
    device = run.model.device
    model, hf = copy.deepcopy(cpu_model).to(device), hf.to(device)
    lengths = [48000, 40000, 30400, 16123]  # 30400: a whole number of hops (the released padding adds one)
    clips = [gh.clip(n, 30 + seed) for seed, n in enumerate(lengths)]
    ref = [cpu_model.encode(c) for c in clips]
    alone = [model.encode(c) for c in clips]
    with ieee_fp32(device=device):
        hf_codes = [hf_encode(hf, c.to(device)) for c in clips]
    out = {"lengths": lengths, "codes_used": int(torch.cat(ref, -1).unique().numel()),
           "frames": sum(r.shape[-1] for r in ref),
           "device_vs_cpu_fp32": gh.agreement(torch.cat(alone, -1), torch.cat(ref, -1)),
           "device_vs_xcodec2model": gh.agreement(torch.cat(alone, -1), torch.cat(hf_codes, -1)),
           "batch_ragged": gh.ragged_vs_alone(model, clips, alone, "fp32"),
           "decode_device_vs_cpu_rel_err": rel(model.decode(alone[0]), cpu_model.decode(alone[0].cpu()))}  # fmt: skip
    if "bf16" in run.precisions:
        bf16 = [model.encode(c, precision="bf16") for c in clips]
        out["bf16_vs_fp32"] = gh.agreement(torch.cat(bf16, -1), torch.cat(alone, -1))
        out["bf16_decode_rel_err"] = rel(model.decode(alone[0], precision="bf16"), model.decode(alone[0]))
    seconds = 4.0 if run.quick else 10.0
    x = speech(seconds).to(device)
    calls = {"xcodec2": (lambda: model.encode(x), lambda c: model.decode(c)),
             "xcodec2model_ieee": (lambda: hf_encode(hf, x), lambda c: hf_decode(hf, c))}  # fmt: skip
    for name, (enc, dec) in calls.items():
        with ieee_fp32(device=device):
            dec(enc())  # warm-up
            codes, t_enc = timed(enc, device)
            _, t_dec = timed(functools.partial(dec, codes), device)
        out[f"{name}_s_per_audio_s"] = {"encode": round(t_enc / seconds, 4), "decode": round(t_dec / seconds, 4)}
    out["all_identical"] = all(v == 1.0 for k in ("device_vs_cpu_fp32", "device_vs_xcodec2model", "batch_ragged")
                               for v in out[k])  # fmt: skip
    out["ok"] = out["all_identical"]
    return out


def check_throughput(run: Run) -> dict:
    until, model, hf, work, quick = time.monotonic() + SECTIONS["throughput"][1], run.model, run.hf, run.work, run.quick
    paths, hours = gh.make_corpus(work / "corpus", 0.01 if quick else 1.0, quick)
    out: dict = {"files": len(paths), "audio_hours": round(hours, 4)}
    batch, reps = (4, 1) if quick else (32, 3)  # reps: timed passes (median)
    wavs = sorted((torch.from_numpy(sf.read(p, dtype="float32")[0]) * 0.95 for p in paths), key=len, reverse=True)
    dev = model.device

    def ours(precision: str) -> None:
        for i in range(0, len(wavs), batch):
            group = wavs[i : i + batch]
            model.encode(gh.padded(group).to(dev), lengths=[len(w) for w in group], precision=precision)

    def theirs(precision: str, size: int) -> None:
        with torch.inference_mode(), ieee_fp32(precision == "fp32", dev), autocast(dev, precision):
            for i in range(0, len(wavs), size):
                hf.encode(gh.padded(wavs[i : i + size]).to(dev), return_dict=False)

    row = (until - time.monotonic()) / 8  # half the budget for the four in-process rows, half for the CLI
    for precision in run.precisions:
        result = gh.repeated(functools.partial(ours, precision), dev, hours, time.monotonic() + row, reps)
        out[f"xcodec_{precision}_model"] = {**result, "batch_size": batch}
        tried = {}
        for size in (8, 32) if quick else (16, 64):
            gh.reset_peak(dev)
            theirs(precision, size)  # warm-up at this batch size
            tried[size] = timed(functools.partial(theirs, precision, size), dev)[1]
        best = min(tried, key=tried.get)
        result = gh.repeated(functools.partial(theirs, precision, best), dev, hours, time.monotonic() + row, reps)
        out[f"xcodecmodel_{precision}" + ("_ieee" if precision == "fp32" else "")] = {**result, "batch_size": best}
    for precision in run.precisions:
        runs = []
        for i in range(reps):
            if runs and time.monotonic() + runs[-1]["process_seconds"] > until:
                break
            codes = str(work / f"codes_{precision}_{i}")
            _, log, t = run.inference("--input", str(work / "corpus"), "--codes-out", codes, "--batch-size", str(batch),
                                      "--precision", precision)  # fmt: skip
            speed = re.search(r"([\d.]+) audio hours per hour", log)
            memory = re.search(r"peak GPU memory ([\d.]+) GiB", log)
            runs.append({"hours_per_hour": float(speed.group(1)), "process_seconds": round(t, 1),
                         "peak_gpu_gb": float(memory.group(1)) if memory else None})  # fmt: skip
        out[f"xcodec_{precision}_cli"] = {
            "hours_per_hour": statistics.median(r["hours_per_hour"] for r in runs), "runs": runs, "batch_size": batch,
            "note": "inference.py's own figure: reading, encoding and writing, after the model is loaded"}  # fmt: skip
    base = out["xcodecmodel_fp32_ieee"]["hours_per_hour"]
    rows = {k: v["hours_per_hour"] for k, v in out.items() if isinstance(v, dict) and "hours_per_hour" in v}
    out["speedup_vs_xcodecmodel_fp32_ieee"] = {k: round(v / base, 3) for k, v in rows.items()}
    return out


def check_cli_long(run: Run) -> dict:
    seconds, work = 50 if run.quick else 600, run.work
    sf.write(work / "long.wav", speech(seconds)[0, 0].numpy() / 0.95, gh.RATE)
    rc, _, t = run.inference("--input", str(work / "long.wav"), "--output", str(work / "long_rec.wav"),
                             "--codes-out", str(work / "long.npy"), "--window", "20", "--context", "5")  # fmt: skip
    codes = np.load(work / "long.npy")
    return {"audio_s": seconds, "rc": rc, "seconds": round(t, 1), "codes_shape": list(codes.shape),
            "output_samples": sf.info(str(work / "long_rec.wav")).frames}  # fmt: skip


def check_train(run: Run) -> dict:
    check, device, work = run.check, run.device, run.work
    base = [str(ROOT / "main_launch_vqdp.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), f"device={device}",
            "validation_file=null"]  # fmt: skip
    out: dict = {}
    for precision in run.precisions:
        cmd = [*base, f"log_dir={work / f'train_{precision}'}", f"precision={precision}", "checkpoint_interval=2"]
        rc1, log1, t1 = check.run([sys.executable, *cmd, "max_steps=2"])
        rc2, log2, t2 = check.run([sys.executable, *cmd, "max_steps=4"])
        out[precision] = {"rc": [rc1, rc2], "resumed": "resumed from" in log2 and "step 2" in log2,
                          "finished": "finished at step 4" in log2,
                          "seconds": [round(t1, 1), round(t2, 1)]}  # fmt: skip
        if rc1 or rc2:
            out[precision]["log_tail"] = (log1 + log2)[-3000:]
    hashes = work / "hashes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *base,
           "dist_backend=gloo", f"log_dir={work / 'two_ranks'}", "max_steps=3"]  # fmt: skip
    rc, log, t = check.run(cmd, {"XCODEC_TEST_HASH_DIR": str(hashes), "OMP_NUM_THREADS": "1"})
    same = False
    if (hashes / "hash_rank1.json").exists():
        r0, r1 = (json.loads((hashes / f"hash_rank{r}.json").read_text()) for r in (0, 1))
        same = all(r0[k] == r1[k] for k in ("codec", "codebooks", "discriminators", "optimizer_g"))
    out["two_ranks_one_device"] = {"rc": rc, "identical_ranks": same, "seconds": round(t, 1),
                                   **({"log_tail": log[-3000:]} if rc else {})}  # fmt: skip
    out["ok"] = all(v["rc"] in ([0, 0], 0) for v in out.values())  # a failed run keeps its log_tail in the JSON
    return out


def check_compile(run: Run) -> dict:
    model = run.model
    if model.device.type != "cuda":
        return {"skipped": "torch.compile is checked on CUDA only"}
    x = speech(10.0)
    eager, t_eager = timed(lambda: model.encode(x), model.device)
    modules = (model.encoder, model.decoder_2, model.encoder_semantic)
    for module in modules:
        module.compile(dynamic=False)
    try:
        _, t_first = timed(lambda: model.encode(x), model.device)  # compiles
        compiled, t_compiled = timed(lambda: model.encode(x), model.device)
    finally:
        for module in modules:
            module._compiled_call_impl = None  # back to eager
    return {"agreement_per_quantizer": gh.agreement(compiled, eager), "eager_s": t_eager, "compiled_s": t_compiled,
            "compile_s": t_first}  # fmt: skip


# name: (the section, its budget in seconds on an H200); every one runs with --device cpu --quick too
SECTIONS = {"device": (check_device, 20), "exactness": (check_exactness, 40), "bf16": (check_bf16, 20),
            "xcodec2": (check_xcodec2, 60), "throughput": (check_throughput, 240), "cli_long": (check_cli_long, 45), "train": (check_train, 90),
            "compile": (check_compile, 90)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of the script)")
    p.add_argument("--quick", action="store_true", help="tiny model, few files: minutes on CPU")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="run only these (merged into the --json)")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check; a section that no longer "
                   "fits is skipped")  # fmt: skip
    p.add_argument("--cap", type=int, default=150, help="seconds any one subprocess may run")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder of the summary, gpu_check_<gpu>.json")
    p.add_argument("--json", type=Path, help="summary file (default: RESULTS/gpu_check_<gpu>.json)")
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    start = time.monotonic()
    os.environ["HF_HUB_OFFLINE"] = "1"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available here (--device cpu: the smoke test)")
    work = args.work or Path(tempfile.mkdtemp(prefix="xcodec_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine(device)
    name = re.sub(r"^nvidia_", "", info.get("gpu", "cpu").lower().replace(" ", "_"))
    path = args.json or args.results / f"gpu_check_{name}{'_quick' if args.quick else ''}.json"
    summary = json.loads(path.read_text()) if args.sections and path.exists() else {}
    command = " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    summary.update({"machine": info, "device": str(device), "quick": args.quick, "command": command,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip
    print(f"machine: {json.dumps(info)}", flush=True)
    # The seeded random codec on the CPU and a copy on the device, codebooks k-means'd there and copied back.
    cpu_model = random_codec(ROOT / "configs" / ("tiny.yaml" if args.quick else "xcodec_hubert_librispeech.yaml"))
    model = copy.deepcopy(cpu_model).to(device)
    clips = gh.kmeans_clips(model)
    init_codebooks(model, clips, "kmeans")
    cpu_model.load_state_dict(model.state_dict())
    cpu_model.requires_grad_(False)
    model.requires_grad_(False)
    export = save_export(cpu_model, work / "export")
    hf = to_transformers(cpu_model).to(device).eval()
    frames = int(sum(int(model.num_frames(len(c))) for c in clips))
    summary["setup"] = {"kmeans_frames": frames, "bins": model.bins, "frames_per_entry": round(frames / model.bins, 2),
                        "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
    print(f"setup: {json.dumps(summary['setup'])}", flush=True)
    check = gh.Check(summary, path, start + args.budget, args.cap)
    run = Run(model, cpu_model, hf, export, args.device, work, args.quick, check)
    for section, (fn, budget) in SECTIONS.items():
        if args.sections is None or section in args.sections:
            check.section(section, functools.partial(fn, run), budget)
    check.write()
    verdict = "all sections ok" if summary["all_ok"] else "some sections FAILED"
    print(f"wrote {path}: {verdict} in {time.monotonic() - start:.0f} s")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
