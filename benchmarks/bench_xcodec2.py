"""X-Codec 2 inference benchmark: XCodec2 against transformers' Xcodec2Model with the same weights (seeded random,
the released architecture unless --tiny), on real clips, alternating call by call: seconds per audio second to
encode and decode, peak memory, codes asserted identical, audio error; and a batch of clips of different lengths
through our Pipeline against Xcodec2Model one clip at a time (usage: docs/xcodec2.md)."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import SeamlessM4TFeatureExtractor, Xcodec2Config, Xcodec2Model

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_inference import machine, measured, rel  # noqa: E402
from models import XCodec2  # noqa: E402
from models.pipeline import Pipeline  # noqa: E402
from utils.audio import audio_extensions, load_audio  # noqa: E402
from utils.cli import argument_parser  # noqa: E402

# The released structure (BigCodec ratios 2,2,4,4,5; FSQ [4]*8; w2v-BERT on 160-dim stacked fbank) at small widths.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 16, "encoder_hidden_size": 8, "quantization_dim": 96,
        "semantic_model_config": {"model_type": "wav2vec2-bert", "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 64, "output_hidden_size": 32,
                                  "conv_depthwise_kernel_size": 5, "feature_projection_input_dim": 160}}  # fmt: skip


def random_hf_xcodec2(tiny: bool = False, seed: int = 0) -> Xcodec2Model:
    """transformers' ``Xcodec2Model`` with seeded random weights, eval mode, no gradients: ``Xcodec2Config()``
    (the released architecture, ~630M parameters) or :data:`TINY`, its weights scaled so that codes spread."""
    torch.manual_seed(seed)
    hf = Xcodec2Model(Xcodec2Config(**(TINY if tiny else {}))).eval().requires_grad_(False)
    if tiny:  # the default init of such narrow layers collapses the latents onto a few codes
        for name, p in hf.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.normal_(0, 0.3)
            elif name.endswith("weight") and p.dim() == 1:  # norms
                p.normal_(1, 0.1)
            elif p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
    return hf


def random_xcodec2(tiny: bool = False, seed: int = 0) -> tuple[XCodec2, Xcodec2Model]:
    """:func:`random_hf_xcodec2` and ours loaded from its ``save_pretrained`` directory (the transformers-format
    path), both in eval mode without gradients."""
    hf = random_hf_xcodec2(tiny, seed)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return XCodec2.from_pretrained(d), hf


FEATURES = SeamlessM4TFeatureExtractor(padding_value=1.0)  # facebook/w2v-bert-2.0's, as X-Codec 2 uses it


@torch.inference_mode()
def hf_encode(hf: Xcodec2Model, wav: torch.Tensor) -> torch.Tensor:
    """(1, 1, F) codes of one (T,) clip by ``Xcodec2Model``, fed as the released pipeline feeds it: the clip padded
    to the next multiple of the hop (a whole hop if it is one), its features with hop/2 zeros on each side."""
    hop = hf.config.hop_length
    wav = F.pad(wav.reshape(-1), (0, hop - wav.numel() % hop))
    feats = FEATURES(F.pad(wav, (hop // 2, hop // 2)).cpu().numpy(), sampling_rate=16000, return_tensors="pt")
    return hf.encode(wav[None, None], feats.input_features.to(wav.device)).audio_codes


def hf_decode(hf: Xcodec2Model, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf.decode(codes).audio_values


def read_clips(folder: Path) -> dict[str, torch.Tensor]:
    """Every audio file of ``folder`` (sorted), mono at 16 kHz, as (T,) float32 tensors."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in audio_extensions())
    return {p.name: torch.from_numpy(load_audio(p, 16000)[0]) for p in files}


def bench(ours: XCodec2, hf: Xcodec2Model, clips: dict[str, torch.Tensor], repeats: int) -> dict:
    """``repeats`` rounds; each: per clip Xcodec2Model and ours encode, then decode Xcodec2Model's codes, then our
    Pipeline on all clips as one batch. Medians per clip; the batch against the round's one-at-a-time sum."""
    dev, pipe = ours.device, Pipeline(ours)
    names, wavs = list(clips), [w.to(dev) for w in clips.values()]
    times: dict = {}

    def timed_into(key, fn):
        out, seconds, peak = measured(fn, dev)
        t = times.setdefault(key, {"s": [], "peak": 0})
        t["s"].append(seconds)
        t["peak"] = max(t["peak"], peak)
        return out

    for _ in range(repeats):
        for name, wav in zip(names, wavs):
            ref = timed_into((name, "hf", "enc"), lambda w=wav: hf_encode(hf, w))
            codes = timed_into((name, "ours", "enc"), lambda w=wav: ours.encode(w[None, None]))
            if not torch.equal(codes, ref):  # the benchmark's claim: identical codes
                raise AssertionError(f"{name}: codes differ from Xcodec2Model's at {int((codes != ref).sum())} frames")
            audio_hf = timed_into((name, "hf", "dec"), lambda c=ref: hf_decode(hf, c))
            audio = timed_into((name, "ours", "dec"), lambda c=ref: ours.decode(c))
            times[name] = {"codes": ref, "audio": audio[0, 0], "audio_rel_err": rel(audio, audio_hf)}
        many = timed_into(("batch", "ours", "enc"), lambda: pipe.encode(wavs))
        if not all(torch.equal(c, times[n]["codes"][0]) for n, c in zip(names, many)):
            raise AssertionError("the batch's codes differ from each clip's alone")
        back = timed_into(("batch", "ours", "dec"), lambda m=many: pipe.decode(m))
        batch_err = max(rel(a, times[n]["audio"]) for n, a in zip(names, back))
    seconds = {n: w.numel() / 16000 for n, w in clips.items()}
    rows = []
    for name in names:
        t = {f"{m}_{p}": times[(name, m, p)] for m in ("hf", "ours") for p in ("enc", "dec")}
        med = {k: statistics.median(v["s"]) for k, v in t.items()}
        rows.append({"clip": name, "seconds": seconds[name], "frames": times[name]["codes"].shape[-1],
                     "distinct_codes": int(times[name]["codes"].unique().numel()), "codes_identical": True,
                     "audio_rel_err": times[name]["audio_rel_err"],
                     **{f"{k}_s": v for k, v in med.items()}, **{f"{k}_runs_s": t[k]["s"] for k in t},
                     **{f"{k}_peak_mb": t[k]["peak"] / 2**20 for k in t},
                     **{f"{k}_s_per_audio_s": v / seconds[name] for k, v in med.items()},
                     "speedup_encode": med["hf_enc"] / med["ours_enc"], "speedup_decode": med["hf_dec"] / med["ours_dec"],
                     "speedup_total": (med["hf_enc"] + med["hf_dec"]) / (med["ours_enc"] + med["ours_dec"])})  # fmt: skip
    total = sum(seconds.values())
    batch: dict = {"clips": len(names), "audio_s": total, "codes_identical_to_alone": True,
                   "audio_max_rel_err_vs_alone": batch_err}  # fmt: skip
    for p in ("enc", "dec"):  # Xcodec2Model one clip at a time: the round's sum over clips
        alone = [sum(times[(n, "hf", p)]["s"][r] for n in names) for r in range(repeats)]
        mine = times[("batch", "ours", p)]["s"]
        batch.update({f"hf_one_at_a_time_{p}_s": statistics.median(alone), f"ours_batch_{p}_s": statistics.median(mine),
                      f"hf_one_at_a_time_{p}_runs_s": alone, f"ours_batch_{p}_runs_s": mine,
                      f"ours_batch_{p}_peak_mb": times[("batch", "ours", p)]["peak"] / 2**20,
                      f"hf_{p}_s_per_audio_s": statistics.median(alone) / total,
                      f"ours_batch_{p}_s_per_audio_s": statistics.median(mine) / total,
                      f"speedup_{p}": statistics.median(alone) / statistics.median(mine)})  # fmt: skip
    return {"rows": rows, "batch": batch}


def print_table(result: dict) -> None:
    head = (f"{'clip':<30} {'audio s':>7} {'enc s/s hf':>10} {'ours':>6} {'dec s/s hf':>10} {'ours':>6} "
            f"{'x enc':>6} {'x dec':>6} {'x total':>7} {'audio err':>9}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for r in result["rows"]:
        print(f"{r['clip']:<30} {r['seconds']:>7.2f} {r['hf_enc_s_per_audio_s']:>10.3f} {r['ours_enc_s_per_audio_s']:>6.3f} "
              f"{r['hf_dec_s_per_audio_s']:>10.3f} {r['ours_dec_s_per_audio_s']:>6.3f} {r['speedup_encode']:>6.2f} "
              f"{r['speedup_decode']:>6.2f} {r['speedup_total']:>7.2f} {r['audio_rel_err']:>9.1e}")  # fmt: skip
    b = result["batch"]
    print(f"{'batch (ours) vs one at a time (hf)':<30} {b['audio_s']:>7.2f} {b['hf_enc_s_per_audio_s']:>10.3f} "
          f"{b['ours_batch_enc_s_per_audio_s']:>6.3f} {b['hf_dec_s_per_audio_s']:>10.3f} "
          f"{b['ours_batch_dec_s_per_audio_s']:>6.3f} {b['speedup_enc']:>6.2f} {b['speedup_dec']:>6.2f}", flush=True)  # fmt: skip


def main(argv=None) -> int:
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--audio", type=Path, default=ROOT / "tests" / "assets", help="folder of real clips")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (median); a short clip warms both up first")
    p.add_argument("--tiny", action="store_true", help="a tiny architecture instead of the released one (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ours, hf = random_xcodec2(args.tiny, args.seed)
    ours, hf = ours.to(args.device), hf.to(args.device)
    clips = read_clips(args.audio)
    setup = time.perf_counter() - t0
    command = " ".join(["python", "benchmarks/bench_xcodec2.py", *(argv if argv is not None else sys.argv[1:])])
    result: dict = {"machine": machine(torch.device(args.device)), "command": command, "setup_s": setup,
                    "parameters_m": sum(p.numel() for p in hf.parameters()) / 1e6, "tiny": args.tiny}  # fmt: skip
    print(f"models ready in {setup:.0f} s; machine: {json.dumps(result['machine'])}", flush=True)
    warm = next(iter(clips.values()))[:32000].to(args.device)
    hf_decode(hf, hf_encode(hf, warm))
    ours.decode(ours.encode(warm[None, None]))
    result.update(bench(ours, hf, clips, args.repeats))
    result["machine_end"] = machine(torch.device(args.device))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
