"""Checkpoints of a run and exact resume: written atomically into ``<output>.checkpoints/
step-NNNNNN``, read back with every setting compared.

Single process: trained tensors, optimizer states, π, π's optimizer, loss scalers, generator
states, the log. Under DeepSpeed the θ' engine writes its own (ZeRO-partitioned) state into the
same folder and every rank adds its generator states.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from . import __version__
from .errors import UserError

# Keys that may differ between a checkpointed run and its resumption.
RUN_CONTROL_KEYS = ("steps", "output", "overwrite", "resume", "checkpoint_every", "quiet",
                    "device", "embedding_cache", "deepspeed")  # (DeepSpeed: compared by content)


def save_checkpoint(er, root: str) -> str:
    """Everything a bit-exact resume of ``er`` (an :class:`~ap_erase_fast.engine.Eraser`)
    needs, written to ``root/step-NNNNNN`` atomically; returns the folder."""
    from safetensors.torch import save_file

    step = er.iteration // er.cfg.pgd_steps
    tag = f"step-{step:06d}"
    final = Path(root) / tag
    tmp = Path(root) / f".{tag}.tmp"
    if er.dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    er.dist.barrier()
    if er.ds_engine is not None:
        er.ds_engine.save_checkpoint(str(tmp), tag="engine")
    save_file(er.plan.state(), str(tmp / f"rng-rank{er.dist.rank}.safetensors"))
    if er.dist.is_main:
        save_file(er.trained_state(), str(tmp / "trained.safetensors"))
        save_file({f"pi.{k}": p.detach().cpu().contiguous() for k, p in enumerate(er.pi)},
                  str(tmp / "pi.safetensors"))
        state = {"pi_optimizer": er.pi_optimizer.state_dict(),
                 "scaler": er.scaler.state_dict(), "pi_scaler": er.pi_scaler.state_dict(),
                 "skipped_steps": dict(er.skipped_steps)}
        if er.ds_engine is None:
            state["optimizer"] = er.optimizer.state_dict()
        torch.save(state, tmp / "state.pt")
        meta = {"format": "ap_erase_fast.checkpoint/v2", "iteration": er.iteration,
                "step": step, "config": er.cfg.to_dict(), "calls": dict(er.calls),
                "timings": er.timings, "world_size": er.dist.world,
                "deepspeed_config": getattr(er, "ds_config", None),
                "library_version": __version__}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2))
        with open(tmp / "log.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in er.log)
    er.dist.barrier()
    if er.dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    er.dist.barrier()
    return str(final)


def load_checkpoint(er, path: str) -> None:
    """Restore ``er`` from the checkpoint folder ``path`` (or the newest one under it), after
    checking that its settings, DeepSpeed config and world size are this run's."""
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    mine = {k: v for k, v in er.cfg.to_dict().items() if k not in RUN_CONTROL_KEYS}
    theirs = {k: v for k, v in meta["config"].items() if k not in RUN_CONTROL_KEYS}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise UserError(f"cannot resume from {ckpt}: settings differ from the checkpoint's "
                        f"({', '.join(diff)}); resume with the same settings")
    if meta.get("deepspeed_config") != getattr(er, "ds_config", None):
        raise UserError(f"cannot resume from {ckpt}: its DeepSpeed config differs from this "
                        f"run's; resume with the same one")
    if meta.get("world_size", 1) != er.dist.world:
        raise UserError(f"cannot resume from {ckpt}: it was written by {meta.get('world_size', 1)} "
                        f"process(es), this run has {er.dist.world}")
    if meta["step"] > er.cfg.steps:
        raise UserError(f"checkpoint {ckpt} is at step {meta['step']}, beyond --steps "
                        f"{er.cfg.steps}")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    if er.ds_engine is not None:
        er.ds_engine.load_checkpoint(str(ckpt), tag="engine", load_module_strict=False)
    else:
        trained = load_file(str(ckpt / "trained.safetensors"))
        params = dict(er.trained)
        if set(trained) != set(params):
            raise UserError(f"checkpoint {ckpt} holds other trained tensors than this run")
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
        er.optimizer.load_state_dict(state["optimizer"])
    with torch.no_grad():
        pis = load_file(str(ckpt / "pi.safetensors"))
        for k, p in enumerate(er.pi):
            p.copy_(pis[f"pi.{k}"])
    er.pi_optimizer.load_state_dict(state["pi_optimizer"])
    for key in ("scaler", "pi_scaler"):
        if state.get(key):
            getattr(er, key).load_state_dict(state[key])
    er.skipped_steps = Counter(state.get("skipped_steps", {}))
    er.plan.load_state(load_file(str(ckpt / f"rng-rank{er.dist.rank}.safetensors")))
    er.iteration = int(meta["iteration"])
    er.calls = Counter(meta["calls"])
    er.timings.update({k: v for k, v in meta["timings"].items() if k == "train_s"})
    with open(ckpt / "log.jsonl") as fh:
        er.log = [json.loads(line) for line in fh if line.strip()]
    er.last_checkpoint = str(ckpt)


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "checkpoint.json").is_file():
        return p
    if p.is_dir():
        steps = sorted(q for q in p.glob("step-*") if (q / "checkpoint.json").is_file())
        if steps:
            return steps[-1]
    raise UserError(f"--resume {path}: not a checkpoint folder (expected a step-NNNNNN folder "
                    f"with checkpoint.json, or a folder that holds them)")

