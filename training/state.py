"""The training state (built identically on every rank), its DDP wrappers, the loss plan of a step, and the
fault-injection hooks and state fingerprints of the crash, recovery and multi-rank tests."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from losses import adversarial, spectral
from models import XCodec, build_codec
from modules.discriminators import DiscriminatorBank, build_discriminators
from quantization import CodebookUsage
from utils import distributed as du

from .checkpoint import state_hash
from .config import TrainConfig


@dataclass
class FaultHooks:
    """Fault injection from the environment (unset in normal runs): ``XCODEC_TEST_NAN_STEPS="3,4"`` makes the
    generator loss NaN at these steps; ``XCODEC_TEST_KILL="1:3"``: rank 1 SIGKILLs itself after step 3 (while
    torchrun's TORCHELASTIC_RESTART_COUNT is 0); ``XCODEC_TEST_SAVE_PAUSE="4:60"``: a 60 s pause in the middle of
    writing checkpoint 4; ``XCODEC_TEST_HASH_DIR=dir``: every rank writes ``hash_rank{r}.json`` of its final state."""

    nan_steps: set[int] = field(default_factory=set)
    kill: tuple[int, int] | None = None
    save_pause: tuple[int, float] | None = None
    hash_dir: str | None = None

    @classmethod
    def from_env(cls) -> FaultHooks:
        env = os.environ
        nan = {int(s) for s in env.get("XCODEC_TEST_NAN_STEPS", "").split(",") if s.strip()}
        kill, pause = (env.get(f"XCODEC_TEST_{k}", "").partition(":") for k in ("KILL", "SAVE_PAUSE"))
        kill = (int(kill[0]), int(kill[2])) if kill[1] else None
        pause = (int(pause[0]), float(pause[2])) if pause[1] else None
        return cls(nan, kill, pause, env.get("XCODEC_TEST_HASH_DIR") or None)

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, made NaN when ``step`` is one of ``nan_steps``."""
        return loss * float("nan") if step in self.nan_steps else loss

    def maybe_kill(self, step: int, logger: Any) -> None:
        """SIGKILL this process after ``step`` when the kill hook names this rank and step."""
        if self.kill == (du.rank(), step) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            logger.info("test hook: killing this process")
            os.kill(os.getpid(), signal.SIGKILL)


def write_state_hashes(state: Any, directory: str) -> None:
    """Hashes of this rank's codec, codebooks, discriminators and optimizer (the script's ``State``)."""
    opt = state.opt_g.state_dict()["state"]
    opt = {f"{i}.{k}": v for i, s in opt.items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    hashes = {"step": state.step, "codec": state_hash(state.codec.state_dict()),
              "codebooks": state_hash(state.codec.quantizer.state_dict()),
              "discriminators": state_hash(state.discriminators.state_dict()),
              "optimizer_g": state_hash(opt)}  # fmt: skip
    if isinstance(state.codec_ddp, DDP):
        teacher = {id(p) for p in state.codec.semantic_model.parameters()}
        synced = state.codec_ddp._module_parameters
        hashes.update(ddp_synced_params=len(synced), ddp_syncs_teacher=any(id(p) in teacher for p in synced))
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"hash_rank{du.rank()}.json").write_text(json.dumps(hashes, indent=1))


SPECTRAL_TERMS = ("full_stft", "sub_stft", "mel")


@dataclass(frozen=True)
class LossPlan:
    """What one step computes, decided once (:func:`loss_plan`) and passed to every place that needs it."""

    spectral: tuple[str, ...]  # the spectral terms with a weight, in SPECTRAL_TERMS order
    adversarial: bool  # the generator's adversarial and feature-matching terms
    discriminator: bool  # the discriminators are updated (from step 0, even before `adversarial`)
    semantic: bool  # the semantic term has a weight (the semantic decoder is in the graph)

    @property
    def audio_grad(self) -> bool:  # some loss uses the reconstructed waveform: the decoder output needs a graph
        return self.adversarial or bool(self.spectral)


def loss_plan(cfg: TrainConfig, step: int) -> LossPlan:
    """The plan of the step after ``step`` completed steps (terms only switch on as steps pass)."""
    w = cfg.loss_weights
    discriminator = w.adversarial > 0 or w.feature_matching > 0
    spectral = tuple(k for k in SPECTRAL_TERMS if getattr(w, k) > 0)
    return LossPlan(spectral, discriminator and step >= cfg.discriminator_iter_start, discriminator, w.semantic > 0)


@dataclass
class State:
    """Everything the GAN loop mutates and a checkpoint restores. ``codec_ddp`` / ``disc_ddp``: what the training
    forwards go through (DDP wrappers, or the plain ``codec`` / ``discriminators`` without a process group)."""

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
    losses: nn.ModuleDict
    weights: dict[str, float]
    usage: CodebookUsage
    bandwidth_rng: random.Random
    hooks: FaultHooks = field(default_factory=FaultHooks)
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    bad_files: dict[str, str] = field(default_factory=dict)
    skipped_batches: int = 0
    last_saved: int = 0  # step of the newest checkpoint (of this run)
    originals_logged: bool = False  # validation audio logged once
    stopped_by: str = ""  # the signal that ended the run early

    def g_params(self) -> list[nn.Parameter]:
        return [p for p in self.codec.parameters() if p.requires_grad]

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")


def build_state(cfg: TrainConfig, raw: dict, device: torch.device, teacher: bool | str | None = None) -> State:
    """Models, optimizers, schedulers and losses, identical on every rank. ``teacher``: ``build_codec``'s
    ``pretrained_teacher`` (default ``cfg.teacher_source()``; ``False`` when the weights come from a checkpoint)."""
    teacher = cfg.teacher_source() if teacher is None else teacher
    codec = build_codec(cfg.codec, cfg.audio_norm_scale, weight_norm=True, pretrained_teacher=teacher)
    discs = build_discriminators(cfg.d_list, {name: dataclasses.asdict(getattr(cfg, name)) for name in cfg.d_list})
    codec.to(device).train()
    discs.to(device).train()
    if du.is_distributed() and teacher is False:
        # A randomly initialised teacher is excluded from DDP's start-up sync; make it rank 0's.
        du.broadcast_tensors(list(codec.semantic_model.parameters()) + list(codec.semantic_model.buffers()))
    g_params = [p for p in codec.parameters() if p.requires_grad]
    opt_g, opt_d = (
        torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        for params, o in ((g_params, cfg.optimizer.g), (discs.parameters(), cfg.optimizer.d))
    )
    losses = nn.ModuleDict({
        "full_stft": spectral.MultiResolutionSTFTLoss(**dataclasses.asdict(cfg.full_multi_scale_stft_loss)),
        "sub_stft": spectral.SubbandMultiResolutionSTFTLoss(**dataclasses.asdict(cfg.sub_multi_scale_stft_loss)),
        "mel": spectral.MelSpectrogramLoss(**dataclasses.asdict(cfg.mel_scale_loss)),
        "gan": adversarial.GANLoss(), "feature_matching": adversarial.FeatureMatchingLoss(),
    })  # fmt: skip
    return State(
        cfg=cfg, raw_config=raw, device=device,
        codec=codec, codec_ddp=codec, discriminators=discs, disc_ddp=DiscriminatorBank(discs),
        opt_g=opt_g, opt_d=opt_d,
        sched_g=torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=cfg.lr_scheduler.g.gamma),
        sched_d=torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=cfg.lr_scheduler.d.gamma),
        losses=losses.to(device), weights=dataclasses.asdict(cfg.loss_weights),
        usage=CodebookUsage(codec.n_q, codec.bins, device), bandwidth_rng=random.Random(cfg.seed),
    )  # fmt: skip


# Buffers are synced once at start-up, not before every forward: the EMA codebooks keep
# themselves in sync (all-reduced statistics, broadcast re-inits), every other buffer is a constant.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}  # torch >= 2.12
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


def wrap_ddp(state: State, first: LossPlan) -> None:
    """Wrap the ``State``'s codec and discriminators in DDP (no-op without a process group), leaving out the
    frozen teacher. ``first``: the plan of the run's first step, its sparsest (terms only switch on later)."""
    if not du.is_distributed():
        return
    codec = state.codec
    teacher = [*codec.semantic_model.named_parameters(), *codec.semantic_model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(codec, [f"semantic_model.{n}" for n, _ in teacher])
    ids = [state.device.index] if state.device.type == "cuda" else None
    every_param = first.audio_grad and first.semantic  # else DDP has to look for parameters without a gradient
    state.codec_ddp = DDP(codec, device_ids=ids, find_unused_parameters=not every_param, **_NO_BUFFER_SYNC)
    state.disc_ddp = DDP(state.disc_ddp, device_ids=ids, **_NO_BUFFER_SYNC)


def unwrap_ddp(state: State) -> None:
    """Drop the DDP wrappers (their reducers hold the process group, which can then be destroyed cleanly)."""
    if isinstance(state.codec_ddp, DDP):
        state.codec_ddp = state.codec_ddp.module
    if isinstance(state.disc_ddp, DDP):
        state.disc_ddp = state.disc_ddp.module
