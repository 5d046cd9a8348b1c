"""Fault injection and state fingerprints for the crash, recovery and multi-rank tests."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from utils import distributed as du

from .checkpoint import state_hash


@dataclass
class FaultHooks:
    """Fault injection, read from environment variables (all unset in normal runs).

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
