"""Data parallelism through DeepSpeed: process group, θ' engine, and the few collectives AP needs.

Each rank processes its own samples (erased concept, Gumbel noise, t_ddpm, x_T from its own
sample slots of the randomness plan); t_enc comes from a generator every rank holds with the same
seed, so trajectories have equal length without communication. θ' is trained through the
DeepSpeed engine (gradients averaged over ranks, ZeRO 0/1/2). π and its Adam state stay identical
on every rank: π gradients are averaged with one all-reduce.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

# Top-level keys of a DeepSpeed config (enough to tell one from an ap_erase settings file).
DEEPSPEED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "zero_optimization", "optimizer", "scheduler", "bf16", "fp16", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
}


def is_deepspeed_config(data: dict) -> bool:
    return "ap_erase" in data or bool(DEEPSPEED_KEYS & set(data))


def load_deepspeed_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {exc.msg} (line "
                        f"{exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    return data


class Dist:
    """Rank, world size and collectives; a single process is world size 1 with no-op calls."""

    def __init__(self):
        self.world, self.rank, self.local_rank = 1, 0, 0
        self.active = False

    @classmethod
    def init_deepspeed(cls) -> "Dist":
        d = cls()
        try:
            import deepspeed
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package: pip install "
                            "'ap_erase_fast[deepspeed]'") from None
        import torch.distributed as dist

        if not dist.is_initialized():
            deepspeed.init_distributed(verbose=False)
        d.active = True
        d.world, d.rank = dist.get_world_size(), dist.get_rank()
        d.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return d

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        if torch.cuda.is_available() and requested in ("auto", "cuda"):
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu") if requested == "auto" else torch.device(requested)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active and self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        if not (self.active and self.world > 1):
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any_true(self, flag: bool) -> bool:
        if not (self.active and self.world > 1):
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.active and self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self, clean: bool = True) -> None:
        """Barrier (when every rank got here) and destroy the process group. After an error
        there is no barrier: the failing rank exits and the launcher ends the others."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    if clean:
                        dist.barrier()
                finally:
                    dist.destroy_process_group()
            self.active = False


def prepare_deepspeed_config(ds: dict, micro_batch: int, optimizer: str = "adam") -> dict:
    """Check a DeepSpeed config against what the engine supports and fill the batch keys.

    Tested combinations (2 CPU ranks): ZeRO 0/1/2 with torch Adam/AdamW as client optimizer,
    with bitsandbytes AdamW8bit as client optimizer, or with the config's own optimizer.
    """
    ds = {k: v for k, v in ds.items() if k != "ap_erase"}
    zero = ds.get("zero_optimization", {})
    if zero.get("offload_optimizer") and "optimizer" not in ds:
        raise UserError("ZeRO optimizer offload needs DeepSpeed's CPU Adam: put an \"optimizer\" "
                        "section ({\"type\": \"Adam\"}) in the DeepSpeed config (see "
                        "configs/ds_zero2_offload.json); --optimizer " + optimizer +
                        " cannot be offloaded")
    ga = int(ds.get("gradient_accumulation_steps", 1))
    if ga != 1:
        raise UserError("gradient_accumulation_steps must be 1: every AP outer step draws new "
                        "samples; raise train_micro_batch_size_per_gpu or the number of ranks")
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2):
        raise UserError(f"ZeRO stage {stage} is not supported: use stage 0, 1 or 2 (the trained "
                        f"UNet tensors are small enough; see docs/DISTRIBUTED.md)")
    if ds.get("fp16", {}).get("enabled"):
        raise UserError("DeepSpeed fp16 is not supported (π gradients would carry the loss "
                        "scale); use \"bf16\": {\"enabled\": true} or fp32")
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    ds.setdefault("steps_per_print", 1 << 30)
    return ds
