"""Time one training step of our loop against the original's, in alternating rounds (one process, state, batches).
Ours runs the codec forward once and detaches its output for the discriminators; the original runs it twice.

    python benchmarks/bench_train.py --config configs/xcodec_hubert_librispeech.yaml pretrained_teacher=false
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main_launch_vqdp as trainer  # noqa: E402
from benchmarks.bench_inference import timed  # noqa: E402
from data import AudioSegmentDataset, collate, list_audio_files  # noqa: E402
from training.config import load_train_config  # noqa: E402
from utils.cli import argument_parser  # noqa: E402


def original_style_step(state: trainer.State, wav: torch.Tensor) -> None:
    """The original's order: G forward + G update, then a second codec forward for D."""
    bandwidth = state.codec.quantizer.sample_bandwidth(state.bandwidth_rng)
    with state.autocast():
        out = state.codec_ddp(wav, bandwidth)
    real, fake = wav, out.audio.float()
    plan = trainer.loss_plan(state.cfg, state.step)
    trainer.generator_step(state, real, fake, out, plan)
    if plan.discriminator:
        with state.autocast():
            out2 = state.codec_ddp(wav, bandwidth)  # "update y_hat": a second full codec pass
        trainer.discriminator_step(state, real, out2.audio.float().detach())


def main() -> None:
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each: one step of each variant)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args()

    loaded = load_train_config(args.config, overrides=args.overrides)
    cfg, device = loaded.cfg, torch.device(args.device)
    trainer.seed_everything(cfg.seed)
    state = trainer.build_state(cfg, loaded.raw, device)
    files = list_audio_files(ROOT / cfg.training_file if not Path(cfg.training_file).exists() else cfg.training_file)
    dataset = AudioSegmentDataset(files, cfg.segment_size, state.codec.sample_rate, cfg.audio_norm_scale, seed=cfg.seed)
    # The same real batches for both variants, loaded once: data loading is not timed.
    n = cfg.batch_size
    batches = [collate([dataset[((i * n + j) % len(dataset), i)] for j in range(n)])["wav"].to(device)
               for i in range(4)]  # fmt: skip
    variants = {"ours (1 codec forward)": lambda w: trainer.train_step(state, w),
                "original (2 codec forwards)": lambda w: original_style_step(state, w)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        for name, fn in variants.items():
            seconds = timed(lambda fn=fn, wav=batches[r % len(batches)]: fn(wav), device)[1]
            if r >= args.warmup:
                times[name].append(seconds)
            state.step += 1
    ours, orig = (statistics.median(v) for v in times.values())
    n_g = sum(p.numel() for p in state.g_params()) / 1e6
    n_t = sum(p.numel() for p in state.codec.semantic_model.parameters()) / 1e6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"config: {' + '.join(loaded.sources)}")
    print(f"  device {device} ({where}), precision {cfg.precision}, batch {n} x {cfg.segment_size} samples, "
          f"d_list {cfg.d_list}, codec {n_g:.2f} M params, teacher {n_t:.2f} M, {args.rounds} rounds after "
          f"{args.warmup} warm-up")  # fmt: skip
    for name, v in times.items():
        ms = [1000 * statistics.median(v), 1000 * min(v), 1000 * max(v)]
        print(f"  {name:28s} median {ms[0]:8.1f} ms/step  (min {ms[1]:.1f}, max {ms[2]:.1f})")
    print(f"  speed-up: {orig / ours:.2f}x (original / ours)")


if __name__ == "__main__":
    main()
