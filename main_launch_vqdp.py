"""X-Codec training: one GPU, many GPUs or many nodes; resumable; logged to tensorboard.

Single process (CPU or one GPU)::

    python main_launch_vqdp.py --config configs/tiny.yaml log_dir=runs/tiny max_steps=4
    python main_launch_vqdp.py --config configs/xcodec_hubert_librispeech.yaml

One node, 8 GPUs (DDP over NCCL; gloo on CPU)::

    torchrun --nnodes=1 --nproc-per-node=8 main_launch_vqdp.py --config configs/xcodec_hubert_librispeech.yaml

Two nodes, 8 GPUs each (run on both; log_dir must be on a shared filesystem to resume)::

    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=0 --master-addr=10.0.0.1 --master-port=29500 \\
        main_launch_vqdp.py --config configs/xcodec_hubert_librispeech.yaml
    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=1 --master-addr=10.0.0.1 --master-port=29500 \\
        main_launch_vqdp.py --config configs/xcodec_hubert_librispeech.yaml

Overrides: ``key.sub=value`` arguments (YAML values) and an experiment file merged over
the base (``--exp_config``, the original's ``--exp_model_config``)::

    python main_launch_vqdp.py --config configs/xcodec_wavlm_mls.yaml batch_size=16 \\
        optimizer.g.lr=1e-4 d_list=[mfd,mpd] precision=bf16

Restarting the same command resumes from the newest ``<log_dir>/model_ckpts/ckpt_*.pth``.
Fine-tuning from released weights: ``init_from=xcodec_hubert_librispeech`` (or a .pth).
Tensorboard: ``tensorboard --logdir <log_dir>/logs``.

The step: one codec forward (one teacher pass); the discriminators are updated on the
detached reconstruction, then the generator on the same reconstruction against the
updated discriminators (the original ran the codec a second time for the D update).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data import AudioSegmentDataset, DataError, batches_per_epoch, build_loader, list_audio_files
from losses import (
    FeatureMatchingLoss,
    GANLoss,
    MelSpectrogramLoss,
    MultiResolutionSTFTLoss,
    SubbandMultiResolutionSTFTLoss,
    mel_spectrogram,
)
from models import XCodec, build_codec
from models.pretrained import (
    RELEASES,
    download_release,
    load_codec_state,
    load_pretrained,
    read_torch_file,
    save_export,
)
from modules.discriminators import build_discriminators
from quantization import CodebookUsage
from utils import distributed as du
from utils.checkpoint import (
    atomic_directory,
    atomic_torch_save,
    checkpoint_path,
    export_path,
    list_checkpoints,
    nonfinite_entries,
    remove_stale_temporaries,
    rng_state,
    rotate_checkpoints,
    set_random_state,
    set_rng_state,
    state_hash,
)
from utils.config import ConfigError
from utils.train_config import LoadedConfig, TrainConfig, load_train_config

CHECKPOINT_FORMAT = "xcodec-train-1"


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, a corrupt state); the message says why."""


# ---------------------------------------------------------------------------- test hooks
@dataclass
class FaultHooks:
    """Fault injection for the crash/recovery tests, read from environment variables.

    ``XCODEC_TEST_NAN_STEPS="3,4"``: make the generator loss NaN at these steps.
    ``XCODEC_TEST_KILL="1:3"``: rank 1 SIGKILLs itself after step 3 (first attempt only,
    i.e. while torchrun's TORCHELASTIC_RESTART_COUNT is 0).
    ``XCODEC_TEST_SAVE_PAUSE="4:60"``: pause 60 s in the middle of writing checkpoint 4.
    ``XCODEC_TEST_HASH_DIR=dir``: every rank writes ``hash_rank{r}.json`` of its final state.
    """

    nan_steps: set[int] = field(default_factory=set)
    kill: tuple[int, int] | None = None
    save_pause: tuple[int, float] | None = None
    hash_dir: str | None = None

    @classmethod
    def from_env(cls) -> FaultHooks:
        env = os.environ
        nan = {int(s) for s in env.get("XCODEC_TEST_NAN_STEPS", "").split(",") if s.strip()}
        kill = tuple(int(x) for x in env["XCODEC_TEST_KILL"].split(":")) if env.get("XCODEC_TEST_KILL") else None
        pause = None
        if env.get("XCODEC_TEST_SAVE_PAUSE"):
            s, sec = env["XCODEC_TEST_SAVE_PAUSE"].split(":")
            pause = (int(s), float(sec))
        return cls(nan, kill, pause, env.get("XCODEC_TEST_HASH_DIR") or None)


# ---------------------------------------------------------------------------- logging
class RunLogger:
    """Console, ``log.txt`` and tensorboard, all on rank 0 only (other ranks stay quiet).

    Args:
        log_dir: run directory; text and events go to ``log_dir/logs``.
        tensorboard: write tensorboard events.
        purge_step: events at or after this step left by a crashed run are dropped.
    """

    def __init__(self, log_dir: str, tensorboard: bool = True, purge_step: int | None = None):
        self.main = du.is_main_process()
        self.writer = None
        self.text = None
        self.bar = None
        if not self.main:
            return
        logs = Path(log_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.text = open(logs / "log.txt", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logs), purge_step=purge_step)

    def info(self, msg: str) -> None:
        if not self.main:
            return
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.text.write(f"{stamp} {msg}\n")

    def warn(self, msg: str) -> None:
        self.info(f"WARNING: {msg}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def progress(self, total: int, initial: int) -> None:
        if self.main:
            from tqdm import tqdm

            # disable=None: a bar on terminals, nothing in redirected logs.
            self.bar = tqdm(total=total or None, initial=initial, unit="step", dynamic_ncols=True, disable=None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.text is not None:
            self.text.close()


# ---------------------------------------------------------------------------- models
class DiscriminatorBank(nn.Module):
    """The discriminators of ``d_list`` behind one forward (one DDP wrapper, one call per step).

    Args:
        discriminators: name -> discriminator (``modules.discriminators`` interface).

    Forward:
        x: (B, 1, T) waveforms.
        Returns ``{name: (logits, fmaps)}``; ``logits`` a list of (B, N_i), ``fmaps`` a
        list (per sub-discriminator) of lists of feature maps (B, C, ...).
    """

    def __init__(self, discriminators: nn.ModuleDict):
        super().__init__()
        self.discs = discriminators

    def forward(self, x: torch.Tensor) -> dict[str, tuple[list[torch.Tensor], list[list[torch.Tensor]]]]:
        return {name: disc(x) for name, disc in self.discs.items()}


class Losses(nn.Module):
    """Every loss of the recipe, configured from the TrainConfig.

    Args:
        cfg: the training config (STFT sizes, mel settings).

    Attributes (each ``(estimate (B, 1, T), target (B, 1, T)) -> ()`` unless noted):
        full_stft: full-band multi-resolution STFT.
        sub_stft: PQMF sub-band multi-resolution STFT.
        mel: HiFi-GAN log-mel L1.
        gan: LSGAN, ``.generator(fake_logits)`` / ``.discriminator(real_logits, fake_logits)``.
        feature_matching: ``(real_fmaps, fake_fmaps) -> ()``.
    """

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        full, sub, mel = cfg.full_multi_scale_stft_loss, cfg.sub_multi_scale_stft_loss, cfg.mel_scale_loss
        self.full_stft = MultiResolutionSTFTLoss(full.fft_sizes, full.hop_sizes, full.win_sizes)
        self.sub_stft = SubbandMultiResolutionSTFTLoss(sub.num_bands, sub.fft_sizes, sub.hop_sizes, sub.win_sizes)
        self.mel = MelSpectrogramLoss(**dataclasses.asdict(mel))
        self.gan = GANLoss()
        self.feature_matching = FeatureMatchingLoss()


@dataclass
class State:
    """Everything the GAN training loop mutates, and everything a checkpoint restores.

    ``codec`` / ``discriminators`` are the plain modules (checkpoints, validation, the
    generator step's discriminator pass); ``codec_ddp`` / ``disc_ddp`` are what the
    training forward passes go through (the same modules without a process group).
    """

    cfg: TrainConfig
    raw_config: dict
    device: torch.device
    codec: XCodec
    codec_ddp: nn.Module
    discriminators: nn.ModuleDict
    disc_ddp: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_d: torch.optim.lr_scheduler.LRScheduler
    losses: Losses
    weights: dict[str, float]
    usage: CodebookUsage
    bandwidth_rng: random.Random
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    bad_files: dict[str, str] = field(default_factory=dict)
    skipped_batches: int = 0

    @property
    def uses_discriminators(self) -> bool:
        return self.weights["adversarial"] > 0 or self.weights["feature_matching"] > 0

    def g_params(self) -> list[nn.Parameter]:
        return [p for p in self.codec.parameters() if p.requires_grad]

    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _keep_quantizer_fp32(codec: XCodec, device_type: str) -> None:
    """Run the residual VQ outside autocast: nearest-neighbour distances in bf16 pick wrong codes."""

    def pre(module, args, kwargs):
        ctx = torch.autocast(device_type, enabled=False)
        ctx.__enter__()
        module._fp32_ctx = ctx
        return (args[0].float(), *args[1:]), kwargs

    def post(module, args, kwargs, output):
        module._fp32_ctx.__exit__(None, None, None)
        return output

    codec.quantizer.register_forward_pre_hook(pre, with_kwargs=True)
    codec.quantizer.register_forward_hook(post, with_kwargs=True, always_call=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed() -> torch.device:
    """Join torchrun's process group when there is one (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(du.local_rank())
    device = torch.device("cuda", du.local_rank()) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if cuda else {}
        # torchrun's store can outlive a failed attempt; keys of this attempt get their own
        # prefix so a restarted group never reads the dead group's addresses.
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"xcodec/attempt_{attempt}/", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size, **kwargs)
    return device


def init_codec_from(codec: XCodec, source: str) -> str:
    """Load released or previously trained codec weights (fine-tuning); returns what was loaded.

    ``source``: a release name, a release ``.pth`` or one of our training checkpoints, an
    export directory / ``.safetensors``, or a transformers ``XcodecModel`` directory.
    """
    if source in RELEASES:
        path, _ = download_release(source)
        state = read_torch_file(path)
    else:
        p = Path(source)
        if p.is_file() and p.suffix != ".safetensors":
            obj = read_torch_file(p)
            state = obj["codec"] if isinstance(obj.get("codec"), dict) else obj
        else:  # any other format: let the inference loader read it, take its (folded) weights
            state = load_pretrained(source).state_dict()
    load_codec_state(codec, state, f"init_from {source}")
    return source


def build_state(cfg: TrainConfig, raw: dict, device: torch.device, teacher: bool | str | None = None) -> State:
    """Models, optimizers, schedulers and losses, identical on every rank.

    ``teacher``: what ``build_codec`` gets as ``pretrained_teacher`` (default
    ``cfg.teacher_source()``); ``False`` when the weights come from a checkpoint.
    """
    teacher = cfg.teacher_source() if teacher is None else teacher
    codec = build_codec(cfg.codec, cfg.audio_norm_scale, weight_norm=True, pretrained_teacher=teacher)
    discs = build_discriminators(cfg.d_list, {name: dataclasses.asdict(getattr(cfg, name)) for name in cfg.d_list})
    codec.to(device).train()
    discs.to(device).train()
    if du.is_distributed() and teacher is False:
        # A randomly initialised teacher is excluded from DDP's start-up sync; make it rank 0's.
        du.broadcast_tensors(list(codec.semantic_model.parameters()) + list(codec.semantic_model.buffers()))
    if cfg.precision == "bf16":
        _keep_quantizer_fp32(codec, device.type)
    g_params = [p for p in codec.parameters() if p.requires_grad]
    teacher_ids = {id(p) for p in codec.semantic_model.parameters()}
    assert not any(id(p) in teacher_ids for p in g_params), "the teacher must not be optimised"
    og, od = cfg.optimizer.g, cfg.optimizer.d
    opt_g = torch.optim.AdamW(g_params, lr=og.lr, betas=tuple(og.betas), eps=og.eps, weight_decay=og.weight_decay)
    opt_d = torch.optim.AdamW(discs.parameters(), lr=od.lr, betas=tuple(od.betas), eps=od.eps, weight_decay=od.weight_decay)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=cfg.lr_scheduler.g.gamma)
    sched_d = torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=cfg.lr_scheduler.d.gamma)
    weights = dataclasses.asdict(cfg.loss_weights)
    return State(
        cfg=cfg,
        raw_config=raw,
        device=device,
        codec=codec,
        codec_ddp=codec,
        discriminators=discs,
        disc_ddp=DiscriminatorBank(discs),
        opt_g=opt_g,
        opt_d=opt_d,
        sched_g=sched_g,
        sched_d=sched_d,
        losses=Losses(cfg).to(device),
        weights=weights,
        usage=CodebookUsage(codec.n_q, codec.bins, device),
        bandwidth_rng=random.Random(cfg.seed),
    )


def _no_buffer_sync() -> dict:
    """DDP kwargs that sync buffers once at start-up but not before every forward."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.12
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap_ddp(state: State) -> None:
    """Wrap codec and discriminators in DDP (no-op without a process group).

    The frozen teacher is listed in ``_ddp_params_and_buffers_to_ignore``: DDP neither
    broadcasts nor all-reduces it. Buffers are not re-broadcast every forward: the EMA
    codebooks keep themselves in sync (all-reduced statistics, broadcast re-inits) and
    every other buffer is a constant.
    """
    if not du.is_distributed():
        return
    codec = state.codec
    ignore = [f"semantic_model.{n}" for n, _ in codec.semantic_model.named_parameters()]
    ignore += [f"semantic_model.{n}" for n, _ in codec.semantic_model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(codec, ignore)
    ids = [state.device.index] if state.device.type == "cuda" else None
    # A zero semantic weight leaves the semantic decoder out of the graph, and no
    # waveform term at all leaves out the acoustic decoder.
    w = state.weights
    unused = w["semantic"] == 0 or not any(w[k] > 0 for k in ("full_stft", "sub_stft", "mel", "adversarial", "feature_matching"))
    state.codec_ddp = DDP(codec, device_ids=ids, find_unused_parameters=unused, **_no_buffer_sync())
    state.disc_ddp = DDP(state.disc_ddp, device_ids=ids, **_no_buffer_sync())


# ---------------------------------------------------------------------------- steps
def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not du.is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    du.all_reduce(t, dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def discriminator_step(state: State, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """One discriminator update on real audio and the detached reconstruction.

    Args:
        state: training state (updated in place).
        real: (B, 1, T) target audio.
        fake: (B, 1, T) reconstruction, detached from the codec graph.

    Returns:
        Logged values: ``loss/discriminator``, ``loss/discriminator_<name>``, ``grad_norm/d``
        and ``skipped/d`` (1.0 when the update was skipped for a NaN/Inf).
    """
    batch = real.shape[0]
    with state.autocast():
        # Real and fake in one call: one DDP forward per backward.
        outs = state.disc_ddp(torch.cat([real, fake.detach()]))
    total = real.new_zeros((), dtype=torch.float32)
    logged = {}
    for name, (logits, _) in outs.items():
        loss = state.losses.gan.discriminator([lg[:batch] for lg in logits], [lg[batch:] for lg in logits])
        logged[f"loss/discriminator_{name}"] = loss.detach()
        total = total + loss
    state.opt_d.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.discriminators.parameters(), state.cfg.grad_clip)
    skip = _any_rank(not (_finite(total) and _finite(grad_norm)), state.device)
    if skip:
        state.opt_d.zero_grad(set_to_none=True)
    else:
        state.opt_d.step()
    logged["loss/discriminator"] = total.detach()
    logged["grad_norm/d"] = grad_norm.detach()
    out = {k: float(v) for k, v in logged.items()}
    out["skipped/d"] = float(skip)
    return out


def generator_step(state: State, real: torch.Tensor, fake: torch.Tensor, out: Any, adversarial: bool, inject_nan: bool = False) -> dict[str, float]:
    """One codec update: weighted sum of the loss terms of ``state.weights``.

    Args:
        state: training state (updated in place).
        real: (B, 1, T) target audio.
        fake: (B, 1, T) reconstruction, attached to the codec graph.
        out: the ``CodecOutput`` of the step (semantic and commitment losses).
        adversarial: include the adversarial and feature-matching terms.
        inject_nan: test hook, makes the loss NaN.

    Returns:
        ``loss/<name>`` (unweighted) for every term used, ``loss/generator`` (weighted
        total), ``grad_norm/g`` and ``skipped/g``.
    """
    w = state.weights
    terms: dict[str, torch.Tensor] = {}
    if w["full_stft"] > 0:
        terms["full_stft"] = state.losses.full_stft(fake, real)
    if w["sub_stft"] > 0:
        terms["sub_stft"] = state.losses.sub_stft(fake, real)
    if w["mel"] > 0:
        terms["mel"] = state.losses.mel(fake, real)
    if adversarial:
        discs = state.discriminators
        # The plain modules, frozen: no D gradients are computed here and DDP's
        # gradient hooks on D never fire outside the discriminator step.
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
    total = sum(w[k] * v for k, v in terms.items() if w[k] > 0)
    if inject_nan:
        total = total * float("nan")
    state.opt_g.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.g_params(), state.cfg.grad_clip)
    skip = _any_rank(not (_finite(total) and _finite(grad_norm)), state.device)
    if skip:
        state.opt_g.zero_grad(set_to_none=True)
    else:
        state.opt_g.step()
    logged = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    logged["loss/generator"] = float(total.detach())
    logged["grad_norm/g"] = float(grad_norm)
    logged["skipped/g"] = float(skip)
    return logged


def train_step(state: State, wav: torch.Tensor, hooks: FaultHooks | None = None) -> dict[str, float]:
    """One training step on a (B, 1, T) batch: one codec forward, a D update, a G update.

    A non-finite loss or gradient skips that update on every rank; a skipped generator
    update also rolls the EMA codebooks back to their state before the step.
    """
    cfg = state.cfg
    step = state.step + 1
    bandwidth = state.codec.quantizer.sample_bandwidth(state.bandwidth_rng)
    codebooks = [b.detach().clone() for b in state.codec.quantizer.buffers()]
    with state.autocast():
        out = state.codec_ddp(wav, bandwidth)
    n = min(wav.shape[-1], out.audio.shape[-1])
    real, fake = wav[..., :n], out.audio[..., :n].float()
    metrics: dict[str, float] = {"train/bandwidth": float(out.bandwidth)}
    if state.uses_discriminators:
        metrics.update(discriminator_step(state, real, fake.detach()))
    adversarial = state.uses_discriminators and state.step >= cfg.discriminator_iter_start
    inject = hooks is not None and step in hooks.nan_steps
    metrics.update(generator_step(state, real, fake, out, adversarial, inject))
    if metrics["skipped/g"]:
        with torch.no_grad():
            for buf, saved in zip(state.codec.quantizer.buffers(), codebooks):
                buf.copy_(saved)
    else:
        state.usage.update(out.codes)
    return metrics


# ---------------------------------------------------------------------------- data
def gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not du.is_distributed():
        return [obj]
    out = [None] * du.world_size()
    dist.all_gather_object(out, obj)
    return out


def screen_batch(state: State, batch: dict, logger: RunLogger) -> torch.Tensor | None:
    """Drop unusable clips from a batch; returns the (B', 1, T) good audio or None to skip.

    Each bad file is logged once and counted. When more than ``max_bad_fraction`` of the
    batch (over all ranks) is bad, the run stops naming the files: that is a broken
    data list, not a few corrupt clips. Decisions are identical on every rank.
    """
    ok = batch["ok"]
    n_bad, n = int((~ok).sum()), ok.numel()
    counts = torch.tensor([n_bad, n, int(n_bad == n)], dtype=torch.float64, device=state.device)
    du.all_reduce(counts)
    bad_total, total, empty_ranks = (int(x) for x in counts.tolist())
    if bad_total:
        local = [(p, e) for p, e, good in zip(batch["path"], batch["error"], ok.tolist()) if not good]
        reports = [item for rank_items in gather_objects(local) for item in rank_items]
        for path, error in reports:
            if path not in state.bad_files:
                state.bad_files[path] = error
                logger.warn(f"skipping unusable clip: {error}")
        if bad_total / total > state.cfg.max_bad_fraction:
            listed = "\n  ".join(e for _, e in reports[:20])
            raise DataError(
                f"{bad_total} of {total} clips in the batch at step {state.step + 1} cannot be used "
                f"(more than max_bad_fraction={state.cfg.max_bad_fraction}); check the data list:\n  {listed}"
            )
    if empty_ranks:
        state.skipped_batches += 1
        return None
    wav = batch["wav"][ok] if n_bad else batch["wav"]
    return wav.to(state.device, non_blocking=True)


def make_loaders(cfg: TrainConfig, sample_rate: int, device: torch.device):
    train_files = list_audio_files(cfg.training_file)
    train_ds = AudioSegmentDataset(train_files, cfg.segment_size, sample_rate, cfg.audio_norm_scale, random_crop=True, seed=cfg.seed)
    pin = device.type == "cuda"
    train_loader, train_sampler = build_loader(
        train_ds, cfg.batch_size, cfg.num_workers, du.rank(), du.world_size(), shuffle=True, seed=cfg.seed, drop_last=True, pin_memory=pin
    )
    valid = None
    if cfg.validation_file:
        files = list_audio_files(cfg.validation_file)
        if cfg.validation_max_clips:
            files = files[: cfg.validation_max_clips]
        valid_ds = AudioSegmentDataset(files, cfg.segment_size, sample_rate, cfg.audio_norm_scale, random_crop=False, seed=cfg.seed)
        valid = build_loader(valid_ds, cfg.batch_size, min(cfg.num_workers, 2), du.rank(), du.world_size(), shuffle=False, seed=cfg.seed, drop_last=False, pin_memory=pin)[0]
    return train_loader, train_sampler, valid


# ---------------------------------------------------------------------------- validation
def mel_image(wav: torch.Tensor, cfg: TrainConfig) -> np.ndarray:
    """(T,) audio -> (num_mels, frames) uint8 log-mel image, low frequencies at the bottom."""
    mel = mel_spectrogram(wav.float().reshape(1, -1).cpu(), **dataclasses.asdict(cfg.mel_scale_loss))[0].numpy()
    lo, hi = float(mel.min()), float(mel.max())
    img = (mel - lo) / max(hi - lo, 1e-5) * 255.0
    return np.ascontiguousarray(img[::-1].round().clip(0, 255).astype(np.uint8))


@torch.no_grad()
def validate(state: State, loader, logger: RunLogger, log_originals: bool) -> dict[str, float]:
    """Mel and STFT distances (and the semantic loss) on fixed validation crops at the top bandwidth.

    Every rank evaluates its shard; sums are all-reduced. Rank 0 logs audio and mel
    images of its first ``num_plots`` clips.
    """
    cfg, codec = state.cfg, state.codec
    codec.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=state.device)
    plotted = 0
    rate = codec.sample_rate
    try:
        for batch in loader:
            ok = batch["ok"]
            if not bool(ok.any()):
                continue
            wav = batch["wav"][ok].to(state.device)
            with state.autocast():
                out = codec(wav, codec.target_bandwidths[-1])
            n = min(wav.shape[-1], out.audio.shape[-1])
            real, fake = wav[..., :n], out.audio[..., :n].float()
            b = real.shape[0]
            for i in range(b):
                sums[0] += float(state.losses.mel(fake[i : i + 1], real[i : i + 1]))
                sums[1] += float(state.losses.full_stft(fake[i : i + 1], real[i : i + 1]))
            sums[2] += float(out.semantic_loss) * b
            sums[3] += b
            if logger.writer is not None:
                for i in range(b):
                    if plotted >= cfg.num_plots:
                        break
                    tag = f"valid/clip{plotted}"
                    if log_originals:
                        logger.writer.add_audio(f"{tag}/original", real[i, 0].clamp(-1, 1).cpu(), state.step, rate)
                        logger.writer.add_image(f"{tag}/mel_original", mel_image(real[i, 0], cfg)[None], state.step, dataformats="CHW")
                    logger.writer.add_audio(f"{tag}/reconstruction", fake[i, 0].clamp(-1, 1).cpu(), state.step, rate)
                    logger.writer.add_image(f"{tag}/mel_reconstruction", mel_image(fake[i, 0], cfg)[None], state.step, dataformats="CHW")
                    plotted += 1
    finally:
        codec.train()
    du.all_reduce(sums)
    count = max(float(sums[3]), 1.0)
    return {
        "valid/mel_distance": float(sums[0]) / count,
        "valid/stft_distance": float(sums[1]) / count,
        "valid/semantic_loss": float(sums[2]) / count,
        "valid/clips": float(sums[3]),
    }


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: State, ckpt_dir: Path, logger: RunLogger, hooks: FaultHooks) -> Path | None:
    """Write ``ckpt_{step}.pth`` (+ ``export_{step}/``) on rank 0; a collective on every rank.

    Refuses, on every rank, to write a state holding NaN/Inf.
    """
    rngs = gather_objects(rng_state())  # every rank's RNG, so each resumes its own stream
    payload = {
        "format": CHECKPOINT_FORMAT,
        "codec": state.codec.state_dict(),
        "config": state.raw_config,
        "discriminators": {n: d.state_dict() for n, d in state.discriminators.items()},
        "optimizer_g": state.opt_g.state_dict(),
        "optimizer_d": state.opt_d.state_dict(),
        "scheduler_g": state.sched_g.state_dict(),
        "scheduler_d": state.sched_d.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "world_size": du.world_size(),
        "batch_size": state.cfg.batch_size,
        "rng": rngs,
        "bandwidth_rng": state.bandwidth_rng.getstate(),
        "counters": {
            "nonfinite_total": state.nonfinite_total,
            "nonfinite_consecutive": state.nonfinite_consecutive,
            "skipped_batches": state.skipped_batches,
            "bad_files": dict(state.bad_files),
        },
    }
    bad = nonfinite_entries({k: payload[k] for k in ("codec", "discriminators", "optimizer_g", "optimizer_d")})
    if bad:
        raise TrainingError(f"refusing to write a checkpoint at step {state.step}: NaN/Inf in {', '.join(bad[:5])}")
    if not du.is_main_process():
        return None
    path = checkpoint_path(ckpt_dir, state.step)
    pause, on_pause = 0.0, None
    if hooks.save_pause is not None and hooks.save_pause[0] == state.step:
        pause = hooks.save_pause[1]
        marker = ckpt_dir / f"paused_{state.step:08d}"

        def on_pause() -> None:
            marker.touch()
            logger.info(f"test hook: paused while writing {path}")

    atomic_torch_save(payload, path, pause, on_pause)
    atomic_directory(export_path(ckpt_dir, state.step), lambda d: save_export(state.codec, d))
    for old in rotate_checkpoints(ckpt_dir, state.cfg.num_ckpt_keep):
        logger.info(f"removed old {old.name}")
    logger.info(f"saved {path} and {export_path(ckpt_dir, state.step).name}/")
    return path


def find_resume_checkpoint(ckpt_dir: Path, logger: RunLogger) -> tuple[Path, dict] | None:
    """Newest readable checkpoint (rank 0 picks, every rank reads the same file)."""
    choice, obj = None, None
    if du.is_main_process():
        for _, path in reversed(list_checkpoints(ckpt_dir)):
            try:
                obj = read_torch_file(path)
                if obj.get("format") == CHECKPOINT_FORMAT:
                    choice = str(path)
                    break
                logger.warn(f"{path}: not a checkpoint of this training script; ignored")
            except Exception as exc:  # a corrupt file (e.g. copied partially): try the previous one
                logger.warn(f"{path}: unreadable ({exc}); trying an older checkpoint")
    choice = du.broadcast_object(choice)
    if choice is None:
        return None
    return Path(choice), obj if du.is_main_process() else read_torch_file(choice)


def restore(state: State, ckpt: dict, source: str, logger: RunLogger) -> None:
    """Load a training checkpoint into ``state`` (models, optimizers, schedulers, position, RNG)."""
    load_codec_state(state.codec, ckpt["codec"], source)
    saved_discs = ckpt["discriminators"]
    fresh = [n for n in state.discriminators if n not in saved_discs]
    for name, disc in state.discriminators.items():
        if name in saved_discs:
            disc.load_state_dict(saved_discs[name])
    state.opt_g.load_state_dict(ckpt["optimizer_g"])
    state.sched_g.load_state_dict(ckpt["scheduler_g"])
    if fresh or set(saved_discs) != set(state.discriminators):
        logger.warn(f"d_list changed since the checkpoint ({sorted(saved_discs)} -> {list(state.discriminators)}): discriminator optimizer restarts")
    else:
        state.opt_d.load_state_dict(ckpt["optimizer_d"])
        state.sched_d.load_state_dict(ckpt["scheduler_d"])
    state.step, state.epoch, state.batch_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
    counters = ckpt.get("counters", {})
    state.nonfinite_total = int(counters.get("nonfinite_total", 0))
    state.nonfinite_consecutive = int(counters.get("nonfinite_consecutive", 0))
    state.skipped_batches = int(counters.get("skipped_batches", 0))
    state.bad_files = dict(counters.get("bad_files", {}))
    set_random_state(state.bandwidth_rng, ckpt["bandwidth_rng"])
    same_layout = ckpt.get("world_size") == du.world_size() and ckpt.get("batch_size") == state.cfg.batch_size
    if not same_layout:
        logger.warn(
            f"the checkpoint was written by {ckpt.get('world_size')} process(es) with batch_size {ckpt.get('batch_size')}; "
            "the data order of the current epoch and the RNG streams are not those of an uninterrupted run"
        )
        state.batch_in_epoch = 0 if ckpt.get("batch_size") != state.cfg.batch_size else state.batch_in_epoch


def write_state_hashes(state: State, directory: str) -> None:
    """Test hook: hashes of this rank's codec, codebooks, discriminators and optimizer."""
    opt = {f"{i}.{k}": v for i, s in state.opt_g.state_dict()["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    hashes = {
        "step": state.step,
        "codec": state_hash(state.codec.state_dict()),
        "codebooks": state_hash(state.codec.quantizer.state_dict()),
        "discriminators": state_hash(state.discriminators.state_dict()),
        "optimizer_g": state_hash(opt),
    }
    if isinstance(state.codec_ddp, DDP):
        teacher = {id(p) for p in state.codec.semantic_model.parameters()}
        synced = state.codec_ddp._module_parameters
        hashes["ddp_synced_params"] = len(synced)
        hashes["ddp_syncs_teacher"] = any(id(p) in teacher for p in synced)
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"hash_rank{du.rank()}.json").write_text(json.dumps(hashes, indent=1))


# ---------------------------------------------------------------------------- loop
def _format_line(state: State, m: dict[str, float], seconds: float) -> str:
    short = {"loss/generator": "g", "loss/discriminator": "d", "loss/full_stft": "stft", "loss/sub_stft": "sub", "loss/mel": "mel",
             "loss/adversarial": "adv", "loss/feature_matching": "fm", "loss/semantic": "sem", "loss/commit": "commit"}
    parts = [f"{name} {m[key]:.4g}" for key, name in short.items() if key in m]
    return f"step {state.step} ep {state.epoch} | " + " ".join(parts) + f" | bw {m.get('train/bandwidth', 0):g} | {seconds:.3f} s/step"


def step_schedulers(state: State) -> None:
    with warnings.catch_warnings():
        # With the adversarial terms off the discriminator optimizer never steps; its
        # schedule still advances so that turning them on later finds the same lr.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        state.sched_g.step()
        state.sched_d.step()


def train(state: State, train_loader, train_sampler, valid_loader, logger: RunLogger, ckpt_dir: Path, hooks: FaultHooks) -> None:
    cfg = state.cfg
    per_epoch = batches_per_epoch(train_sampler, cfg.batch_size)
    total = cfg.max_steps or cfg.num_epoches * per_epoch
    logger.progress(total, state.step)
    accum: dict[str, list[float]] = {}
    last_saved = state.step
    originals_logged = False
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    done = cfg.max_steps > 0 and state.step >= cfg.max_steps
    while not done:
        if cfg.max_steps == 0 and state.epoch >= cfg.num_epoches:
            break
        train_sampler.set_position(state.epoch, state.batch_in_epoch * cfg.batch_size)
        for batch in train_loader:
            t0 = time.perf_counter()
            state.batch_in_epoch += 1
            wav = screen_batch(state, batch, logger)
            if wav is None:
                logger.warn(f"every clip of a rank's batch was unusable; batch skipped on all ranks ({state.skipped_batches} so far)")
                continue
            metrics = train_step(state, wav, hooks)
            state.step += 1
            if cfg.lr_scheduler.interval == "step":
                step_schedulers(state)
            skipped = metrics.pop("skipped/g") + metrics.pop("skipped/d", 0.0)
            if skipped:
                state.nonfinite_total += 1
                state.nonfinite_consecutive += 1
                logger.warn(f"step {state.step}: non-finite loss or gradient; update skipped ({state.nonfinite_consecutive} in a row)")
                if state.nonfinite_consecutive >= cfg.max_nonfinite_steps:
                    raise TrainingError(
                        f"{state.nonfinite_consecutive} consecutive steps with NaN/Inf losses or gradients (max_nonfinite_steps="
                        f"{cfg.max_nonfinite_steps}); stopping. The last checkpoint (step {last_saved}) holds no NaN: lower the "
                        "learning rate, check the data, or resume from it."
                    )
            else:
                state.nonfinite_consecutive = 0
            for k, v in metrics.items():
                if math.isfinite(v):
                    accum.setdefault(k, []).append(v)
            seconds = time.perf_counter() - t0
            accum.setdefault("perf/step_seconds", []).append(seconds)
            if logger.bar is not None:
                logger.bar.update(1)
                logger.bar.set_postfix(g=f"{metrics.get('loss/generator', float('nan')):.3g}", d=f"{metrics.get('loss/discriminator', float('nan')):.3g}", refresh=False)
            if state.step % cfg.print_freq == 0:
                logger.info(_format_line(state, metrics, seconds))
            if state.step % cfg.summary_interval == 0:
                codebook = state.usage.compute()  # collective: same step on every rank
                values = {k: sum(v) / len(v) for k, v in accum.items()}
                values.update({f"codebook/{k}": v for k, v in codebook.items()})
                values["lr/g"] = state.sched_g.get_last_lr()[0]
                values["lr/d"] = state.sched_d.get_last_lr()[0]
                values["data/bad_files"] = float(len(state.bad_files))
                values["data/skipped_batches"] = float(state.skipped_batches)
                values["train/nonfinite_skipped"] = float(state.nonfinite_total)
                values["train/epoch"] = float(state.epoch)
                logger.scalars(values, state.step)
                accum.clear()
            if valid_loader is not None and state.step % cfg.validation_interval == 0:
                result = validate(state, valid_loader, logger, not originals_logged)
                originals_logged = True
                logger.scalars(result, state.step)
                logger.info(f"validation at step {state.step}: " + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in result.items()))
            if state.step % cfg.checkpoint_interval == 0:
                save_checkpoint(state, ckpt_dir, logger, hooks)
                last_saved = state.step
            if hooks.kill is not None and hooks.kill == (du.rank(), state.step) and restart_count == 0:
                logger.info("test hook: killing this process")
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.max_steps and state.step >= cfg.max_steps:
                done = True
                break
        else:
            # A whole epoch: the original steps the schedulers here.
            if cfg.lr_scheduler.interval == "epoch":
                step_schedulers(state)
            state.epoch += 1
            state.batch_in_epoch = 0
    if state.step != last_saved:
        save_checkpoint(state, ckpt_dir, logger, hooks)
    logger.info(f"finished at step {state.step} (epoch {state.epoch})")


# ---------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--basic_model_config", dest="config", default="configs/xcodec_hubert_librispeech.yaml",
                        help="recipe YAML (may name a 'base:' file)")
    parser.add_argument("--exp_config", "--exp_model_config", dest="exp_config", default=None,
                        help="experiment YAML merged over --config")
    parser.add_argument("--training_file", default=None, help="same as training_file=...")
    parser.add_argument("--validation_file", default=None, help="same as validation_file=...")
    parser.add_argument("--log_dir", default=None, help="same as log_dir=...")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> LoadedConfig:
    overrides = list(args.overrides)
    for key in ("training_file", "validation_file", "log_dir"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    return load_train_config(args.config, args.exp_config, overrides)


def main(argv: Sequence[str] | None = None) -> State:
    """Run training; returns the final state (tests inspect it). Raises on errors."""
    args = parse_args(argv)
    loaded = load_config(args)
    cfg, raw = loaded.cfg, loaded.raw
    hooks = FaultHooks.from_env()
    device = init_distributed()
    logger = None
    try:
        log_dir = Path(cfg.log_dir)
        ckpt_dir = log_dir / "model_ckpts"
        if du.is_main_process():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for p in remove_stale_temporaries(ckpt_dir):
                print(f"removed {p.name} left by an interrupted save", flush=True)
            (log_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
            torch.backends.cudnn.benchmark = not cfg.cudnn_deterministic
        resume = find_resume_checkpoint(ckpt_dir, _Quiet())
        # The same seed everywhere while building: every rank starts from identical models.
        seed_everything(cfg.seed)
        # Resuming or fine-tuning: the teacher's weights come with the codec's (no download).
        teacher = False if resume is not None else cfg.teacher_source()
        state = build_state(cfg, raw, device, teacher)
        logger = RunLogger(str(log_dir), cfg.tensorboard, purge_step=(resume[1]["step"] + 1) if resume else None)
        logger.info(f"config: {' + '.join(loaded.sources)}")
        logger.info(f"processes: {du.world_size()} ({'nccl' if device.type == 'cuda' else 'gloo'} if > 1), device {device}, precision {cfg.precision}")
        n_g = sum(p.numel() for p in state.g_params())
        n_t = sum(p.numel() for p in state.codec.semantic_model.parameters())
        n_d = sum(p.numel() for p in state.discriminators.parameters())
        logger.info(f"codec {n_g / 1e6:.2f} M trainable parameters, discriminators {cfg.d_list} {n_d / 1e6:.2f} M")
        source = {True: f"pretrained {cfg.codec.semantic_techer}", False: "built from the config (weights from the checkpoint, init_from or random)"}.get(teacher, teacher)
        logger.info(f"frozen teacher {n_t / 1e6:.2f} M parameters: {source}")
        if resume is not None:
            path, ckpt = resume
            restore(state, ckpt, str(path), logger)
            logger.info(f"resumed from {path} (step {state.step}, epoch {state.epoch}, batch {state.batch_in_epoch} of the epoch)")
        elif cfg.init_from is not None:
            init_codec_from(state.codec, cfg.init_from)
            logger.info(f"codec initialised from {cfg.init_from}; discriminators and optimizers start fresh")
        wrap_ddp(state)
        train_loader, train_sampler, valid_loader = make_loaders(cfg, state.codec.sample_rate, device)
        logger.info(f"data: {len(train_loader.dataset)} training clips, {len(valid_loader.dataset) if valid_loader else 0} validation clips, "
                    f"{batches_per_epoch(train_sampler, cfg.batch_size)} batches of {cfg.batch_size} per epoch and process")
        # RNG last, right before the loop: nothing above may shift the restored streams.
        if resume is not None and resume[1].get("world_size") == du.world_size():
            set_rng_state(resume[1]["rng"][du.rank()])
        elif resume is None:
            seed_everything(cfg.seed + du.rank())
        del resume
        train(state, train_loader, train_sampler, valid_loader, logger, ckpt_dir, hooks)
        if hooks.hash_dir:
            write_state_hashes(state, hooks.hash_dir)
        return state
    finally:
        if logger is not None:
            logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class _Quiet:
    """Logger stand-in for messages emitted before the run logger exists."""

    def info(self, msg: str) -> None:
        if du.is_main_process():
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.info(f"WARNING: {msg}")


def cli(argv: Sequence[str] | None = None) -> int:
    try:
        main(argv)
    except (ConfigError, DataError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
