"""X-Codec training: one GPU, many GPUs or many nodes; resumable; logged to tensorboard.
``python main_launch_vqdp.py --config configs/tiny.yaml log_dir=runs/tiny max_steps=4``, or under torchrun; the
same command resumes. docs/training.md: multi-node commands, overrides, resume, signals, fine-tuning.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.dataset import DataError
from models import CheckpointError
from models.pretrained import load_codec_state, read_state
from modules.teacher import fetch_teacher
from training import checkpoint
from training.batches import make_loaders, screen_batch, validate
from training.checkpoint import TrainingError, save_checkpoint, seed_everything
from training.config import load_train_config
from training.run_logger import RunLogger, RunningMeans
from training.state import FaultHooks, LossPlan, State, build_state, loss_plan, unwrap_ddp, wrap_ddp, write_state_hashes
from utils import distributed as du
from utils.cli import EXIT_ERROR, DefaultsHelpFormatter, report_error
from utils.config import ConfigError
from utils.hub import HubError


def _update(state: State, total: torch.Tensor, opt: torch.optim.Optimizer, params) -> tuple[torch.Tensor, bool]:
    """Backward, clip and step; a non-finite loss or gradient on any rank skips the step on every rank."""
    opt.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, state.cfg.grad_clip)
    skip = du.any_rank(not (bool(torch.isfinite(total)) and bool(torch.isfinite(grad_norm))), state.device)
    if not skip:  # a skipped step's gradients are dropped by the next update's zero_grad
        opt.step()
    return grad_norm.detach(), skip


def discriminator_step(state: State, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """One discriminator update on (B, 1, T) ``real`` audio and ``fake``, the detached reconstruction. Returns
    ``loss/discriminator``, ``loss/discriminator_<name>``, ``grad_norm/d`` and ``skipped/d`` (1.0: skipped)."""
    batch = real.shape[0]
    with state.autocast():
        # Real and fake in one call: one DDP forward per backward.
        outs = state.disc_ddp(torch.cat([real, fake.detach()]))
    gan = state.losses.gan
    logged = {f"loss/discriminator_{n}": gan.discriminator([lg[:batch] for lg in logits], [lg[batch:] for lg in logits])
              for n, (logits, _) in outs.items()}  # fmt: skip
    total = sum(logged.values(), real.new_zeros((), dtype=torch.float32))
    grad_norm, skip = _update(state, total, state.opt_d, state.discriminators.parameters())
    logged = {k: v.detach() for k, v in logged.items()}
    return {**logged, "loss/discriminator": total.detach(), "grad_norm/d": grad_norm, "skipped/d": float(skip)}


def generator_step(state: State, real: torch.Tensor, fake: torch.Tensor, out: Any, plan: LossPlan) -> dict[str, Any]:
    """One codec update on (B, 1, T) ``real`` and ``fake`` (attached to the codec graph): the weighted sum of the
    terms ``plan`` switches on, with ``out``'s (the ``CodecOutput``'s) semantic and commitment losses. Returns
    ``loss/<name>`` (unweighted) of every term, ``loss/generator`` (the total), ``grad_norm/g``, ``skipped/g``."""
    terms = {name: getattr(state.losses, name)(fake, real) for name in plan.spectral}
    if plan.adversarial:
        discs = state.discriminators
        # The plain modules, frozen: no D gradients, and DDP's hooks on D fire in the D step only.
        discs.requires_grad_(False)
        try:
            with state.autocast():
                with torch.no_grad():
                    real_out = {n: d(real) for n, d in discs.items()}
                fake_out = {n: d(fake) for n, d in discs.items()}
        finally:
            discs.requires_grad_(True)
        terms["adversarial"] = sum(state.losses.gan.generator(fake_out[n][0]) for n in discs)
        terms["feature_matching"] = sum(state.losses.feature_matching(real_out[n][1], fake_out[n][1]) for n in discs)
    terms["semantic"] = out.semantic_loss.float()
    terms["commit"] = out.commit_loss.float()
    w = state.weights
    total = state.hooks.corrupt_loss(state.step + 1, sum(w[k] * v for k, v in terms.items() if w[k] > 0))
    grad_norm, skip = _update(state, total, state.opt_g, state.g_params())
    logged: dict[str, torch.Tensor | float] = {f"loss/{k}": v.detach() for k, v in terms.items()}
    return {**logged, "loss/generator": total.detach(), "grad_norm/g": grad_norm, "skipped/g": float(skip)}


def train_step(state: State, wav: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """One training step on a (B, 1, T) batch: one codec forward, a D update, a G update. A non-finite loss or
    gradient skips that update on every rank; a skipped G update also rolls the EMA codebooks back."""
    plan = loss_plan(state.cfg, state.step)
    # Every rank holds the same bandwidth RNG (seeded and restored alike): no collective needed.
    bandwidth = state.codec.quantizer.sample_bandwidth(state.bandwidth_rng, sync=False)
    codebooks = state.codec.quantizer.save_state()
    with state.autocast():
        out = state.codec_ddp(wav, bandwidth, audio_grad=plan.audio_grad)
    real, fake = wav, out.audio.float()  # forward returns the input's length
    metrics: dict[str, torch.Tensor | float] = {"train/bandwidth": float(out.bandwidth)}
    if plan.discriminator:
        metrics.update(discriminator_step(state, real, fake.detach()))
    metrics.update(generator_step(state, real, fake, out, plan))
    if metrics["skipped/g"]:
        state.codec.quantizer.restore_state(codebooks)
    else:
        state.usage.update(out.codes)
    return metrics


class StopSignals:
    """A graceful stop on SIGTERM (schedulers, preemption) or SIGINT (Ctrl-C) in a ``with`` block (main thread only):
    every rank leaves after the same step and saves. ``received``: the signal's name. A second SIGINT interrupts."""

    def __init__(self) -> None:
        self.received = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        with contextlib.suppress(ValueError):  # not the main thread: leave the defaults
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(state: State, loaders: tuple, logger: RunLogger, ckpt_dir: Path, stop: StopSignals) -> None:
    """Epochs until ``max_steps``/``num_epoches`` or a stop signal; always ends with a checkpoint."""
    cfg, (_, sampler, _) = state.cfg, loaders
    means = RunningMeans()  # device-side sums: no host sync per step
    state.last_saved = state.step
    done = cfg.max_steps > 0 and state.step >= cfg.max_steps
    while not done and (cfg.max_steps > 0 or state.epoch < cfg.num_epoches):
        sampler.set_position(state.epoch, state.batch_in_epoch * cfg.batch_size)
        done = run_epoch(state, loaders, logger, ckpt_dir, stop, means)
        if not done:  # a whole epoch: the original steps the schedulers here
            if cfg.lr_scheduler.interval == "epoch":
                state.sched_g.step()
                state.sched_d.step()
            state.epoch += 1
            state.batch_in_epoch = 0
    if state.stopped_by:
        logger.info(f"stopping on {state.stopped_by} at step {state.step}; rerun the same command to resume")
    if state.step != state.last_saved:
        save_checkpoint(state, ckpt_dir, logger)
    logger.info(f"finished at step {state.step} (epoch {state.epoch})")


def run_epoch(state: State, loaders: tuple, logger: RunLogger, ckpt_dir: Path, stop: StopSignals,
              means: RunningMeans) -> bool:  # fmt: skip
    """The rest of the current epoch; True when the run is done (``max_steps``, or a stop signal)."""
    cfg, (train_loader, _, valid_loader) = state.cfg, loaders
    batches = iter(train_loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return False
        except RuntimeError:  # a loader worker killed by the signal that stops us (not at a step's middle)
            if not stop.received or du.world_size() > 1:
                raise
            state.stopped_by = stop.received
            return True
        t0 = time.perf_counter()
        state.batch_in_epoch += 1
        wav = screen_batch(state, batch, logger)
        if wav is None:
            logger.warn(f"every clip of a rank's batch was unusable; batch skipped on all ranks "
                        f"({state.skipped_batches} so far)")  # fmt: skip
            continue
        metrics = train_step(state, wav)
        state.step += 1
        if cfg.lr_scheduler.interval == "step":
            state.sched_g.step()
            state.sched_d.step()
        if metrics.pop("skipped/g") + metrics.pop("skipped/d", 0.0):
            state.nonfinite_total += 1
            state.nonfinite_consecutive += 1
            logger.warn(f"step {state.step}: non-finite loss or gradient; update skipped "
                        f"({state.nonfinite_consecutive} in a row)")  # fmt: skip
            if state.nonfinite_consecutive >= cfg.max_nonfinite_steps:
                raise TrainingError(f"{state.nonfinite_consecutive} consecutive steps with NaN/Inf losses or gradients "
                                    f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); stopping. The last checkpoint "
                                    f"(step {state.last_saved}) holds no NaN: lower the learning rate, check the data, "
                                    "or resume from it.")
        else:
            state.nonfinite_consecutive = 0
        seconds = time.perf_counter() - t0
        means.add({**metrics, "perf/step_seconds": seconds})
        if state.step % cfg.print_freq == 0:
            logger.step(state.step, state.epoch, {k: float(v) for k, v in metrics.items()}, seconds)
        if state.step % cfg.summary_interval == 0:
            logger.summary(state, means.pop())  # a collective (codebook usage): same step on every rank
        if valid_loader is not None and state.step % cfg.validation_interval == 0:
            validate(state, valid_loader, logger)
        if state.step % cfg.checkpoint_interval == 0:
            save_checkpoint(state, ckpt_dir, logger)
            state.last_saved = state.step
        state.hooks.maybe_kill(state.step, logger)
        if du.any_rank(bool(stop.received), state.device):  # a collective: every rank stops after the same step
            state.stopped_by = stop.received or "a signal on another rank"
            return True
        if cfg.max_steps and state.step >= cfg.max_steps:
            return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: ``--config`` and friends, then ``key.sub=value`` overrides."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", "--basic_model_config", default="configs/xcodec_hubert_librispeech.yaml",
                        help="recipe YAML (may name a 'base:' file)")  # fmt: skip
    parser.add_argument("--exp_config", "--exp_model_config", help="experiment YAML merged over --config")
    for key in ("training_file", "validation_file", "log_dir"):
        parser.add_argument(f"--{key}", help=f"same as {key}=...")
    parser.add_argument("--restart", action="store_true", help="start again from step 0 even though log_dir holds "
                        "checkpoints (they are moved to model_ckpts/previous_<time>/, not deleted)")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> State:
    """Run training; returns the final state (tests inspect it). Raises on errors. Everything that can refuse the
    run (config, checkpoints, the teacher's download, ``init_from``) is checked before ``log_dir`` is written."""
    args = parse_args(argv)
    flags = [f"{k}={v}" for k in ("training_file", "validation_file", "log_dir") if (v := vars(args)[k]) is not None]
    loaded = load_train_config(args.config, args.exp_config, [*args.overrides, *flags])
    cfg, raw = loaded.cfg, loaded.raw
    device = du.init_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout_minutes)
    logger, state, finished = None, None, False
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)  # restored at the end
    try:
        log_dir = Path(cfg.log_dir)
        ckpt_dir = log_dir / "model_ckpts"
        resume = checkpoint.find_resume_checkpoint(ckpt_dir, RunLogger(), restart=args.restart)
        if resume is not None:
            checkpoint.check_resumable(resume[1], raw, str(resume[0]))
        # Resuming or fine-tuning: the teacher's weights come with the codec's (no download).
        teacher = False if resume is not None else cfg.teacher_source()
        init_state = read_state(cfg.init_from) if resume is None and cfg.init_from is not None else None
        teacher_dir = fetch_teacher(cfg.codec.semantic_techer, teacher)  # offline: one line in seconds
        checkpoint.prepare_log_dir(log_dir, raw)
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
            torch.backends.cudnn.benchmark = not cfg.cudnn_deterministic
        # The same seed everywhere while building: every rank starts from identical models.
        seed_everything(cfg.seed)
        state = build_state(cfg, raw, device, teacher_dir)
        state.hooks = FaultHooks.from_env()
        logger = RunLogger(str(log_dir), cfg.tensorboard, purge_step=(resume[1]["step"] + 1) if resume else None)
        logger.info(f"config: {' + '.join(loaded.sources)}")
        backend = dist.get_backend() if dist.is_initialized() else "none"
        logger.info(f"processes: {du.world_size()} (backend {backend}), device {device}, precision {cfg.precision}")
        logger.models(state, teacher)
        if resume is not None:
            checkpoint.restore(state, resume[1], str(resume[0]), logger)
            logger.info(f"resumed from {resume[0]} (step {state.step}, epoch {state.epoch}, "
                        f"batch {state.batch_in_epoch} of the epoch)")  # fmt: skip
        elif init_state is not None:
            load_codec_state(state.codec, init_state, f"init_from {cfg.init_from}")
            logger.info(f"codec initialised from {cfg.init_from}; discriminators and optimizers start fresh")
        del init_state
        wrap_ddp(state, loss_plan(cfg, 0))
        loaders = make_loaders(cfg, state.codec.sample_rate, device)
        n_valid, n_batches = len(loaders[2].dataset) if loaders[2] else 0, len(loaders[0])  # a whole epoch's
        logger.info(f"data: {len(loaders[0].dataset)} training clips, {n_valid} validation clips, "
                    f"{n_batches} batches of {cfg.batch_size} per epoch and process")
        logger.progress(cfg.max_steps or cfg.num_epoches * n_batches, state.step)
        # RNG last, right before the loop: nothing above may shift the restored streams.
        if resume is not None and resume[1].get("world_size") == du.world_size():
            checkpoint.set_rng_state(resume[1]["rng"][du.rank()])
        elif resume is None:
            seed_everything(cfg.seed + du.rank())
        del resume
        with StopSignals() as stop, warnings.catch_warnings():
            # Without adversarial terms the D optimizer never steps; its schedule still advances (the same lr later).
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            train(state, loaders, logger, ckpt_dir, stop)
        if state.hooks.hash_dir:
            write_state_hashes(state, state.hooks.hash_dir)
        finished = True
        return state
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
        if logger is not None:
            logger.close()
        # The process group ends here, on every path: left to the interpreter's exit, the
        # reducers' hold on it hung the process after "finished" (issue 19).
        if state is not None:
            unwrap_ddp(state)
        du.close_distributed(wait=finished)


def cli(argv: Sequence[str] | None = None) -> int:
    """Errors as one ``error:`` line and exit code 1 (the filesystem's: 2); a stop signal: 128 + its number."""
    try:
        state = main(argv)
    except (ConfigError, DataError, TrainingError, CheckpointError, du.DistributedError, HubError) as exc:
        report_error(exc)
        return 1
    except OSError as exc:  # log_dir unwritable (read-only, under a file), a full disk: refused in one line
        report_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C): no checkpoint saved since the last one", file=sys.stderr, flush=True)
        return 130
    return 128 + int(getattr(signal, state.stopped_by)) if state.stopped_by.startswith("SIG") else 0


if __name__ == "__main__":
    sys.exit(cli())
