"""Checkpoints of a run and exact resume: written atomically into ``<output>.checkpoints/
step-NNNNNN`` with a manifest of sizes and sha256 hashes, verified before they are read back,
with every setting compared.

Single process: trained tensors, optimizer states, π, π's optimizer, loss scalers, generator
states, the log. Under DeepSpeed the θ' engine writes its own (ZeRO-partitioned) state into the
same folder and every rank adds its generator states.

A checkpoint is written into ``.step-NNNNNN.tmp``, its files are flushed to disk, then
``manifest.json`` (every file's size and sha256) is written last and the folder is renamed into
place. :func:`choose_checkpoint` verifies a checkpoint against its manifest before it is used:
a damaged newest checkpoint is reported in one line and the newest intact one is used instead
(``--resume-fallback``, the default; resumption is bit-exact from any checkpoint, so falling
back costs recomputation, never correctness), or the run stops (``--no-resume-fallback``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .faults import fault_point

# Keys that may differ between a checkpointed run and its resumption.
RUN_CONTROL_KEYS = ("steps", "output", "overwrite", "resume", "resume_fallback",
                    "checkpoint_every", "quiet", "device", "embedding_cache",
                    "deepspeed")  # (DeepSpeed: compared by content)
FORMAT = "ap_erase_fast.checkpoint/v3"
LEGACY_FORMATS = ("ap_erase_fast.checkpoint/v2",)  # written before manifests: not verifiable
MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step-(\d{6,})$")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_error_reason(exc: BaseException, where: Path) -> str | None:
    """A short reason when ``exc`` is a failed write (disk full, permissions, I/O), else None.
    torch.save and safetensors report a full disk in their own words; the free space tells."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if type(exc).__name__ != "SafetensorError" and not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "No space left" in text:
        return "No space left on device"
    try:
        probe = where if where.exists() else where.parent
        if shutil.disk_usage(probe).free < (16 << 20):
            return "No space left on device"
    except OSError:
        pass
    if isinstance(exc, RuntimeError) and not any(w in text for w in ("write", "writ", "file")):
        return None  # not an I/O failure: a bug, reported as one
    return text[:200]


def _write_manifest(folder: Path) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as fh:  # flush to disk before the manifest vouches for it
                os.fsync(fh.fileno())
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size,
                                                       "sha256": file_sha256(p)}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"format": "ap_erase_fast.checkpoint-manifest/v1", "files": files}, fh,
                  indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(er, root: str) -> str:
    """Everything a bit-exact resume of ``er`` (an :class:`~ap_erase_fast.engine.Eraser`)
    needs, written to ``root/step-NNNNNN`` atomically; returns the folder. A write that fails
    (a full disk) removes the half-written folder and stops the run with a :class:`UserError`
    that names the last good checkpoint."""
    step = er.iteration // er.cfg.pgd_steps
    tag = f"step-{step:06d}"
    final = Path(root) / tag
    tmp = Path(root) / f".{tag}.tmp"
    try:
        _save_into(er, Path(root), tmp, final)
    except BaseException as exc:  # noqa: BLE001 - classified: write failures are the user's to fix
        if er.dist.is_main:  # never leave a half-written checkpoint (Ctrl-C included)
            shutil.rmtree(tmp, ignore_errors=True)
        reason = write_error_reason(exc, Path(root)) if isinstance(exc, Exception) else None
        if reason is None:
            raise
        last = (f"the last checkpoint is {er.last_checkpoint}" if er.last_checkpoint
                else "no earlier checkpoint")
        raise UserError(f"cannot write checkpoint {final}: {reason}; stopped, {last}; free "
                        f"space and continue with --resume auto") from None
    return str(final)


def _save_into(er, root: Path, tmp: Path, final: Path) -> None:
    from safetensors.torch import save_file

    if er.dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):  # left by a run killed while writing one
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    er.dist.barrier()
    if er.ds_engine is not None:
        er.ds_engine.save_checkpoint(str(tmp), tag="engine")
    save_file(er.plan.state(), str(tmp / f"rng-rank{er.dist.rank}.safetensors"))
    fault_point("checkpoint-write")
    if er.dist.is_main:
        save_file(er.trained_state(), str(tmp / "trained.safetensors"))
        save_file({f"pi.{k}": p.detach().cpu().contiguous() for k, p in enumerate(er.pi)},
                  str(tmp / "pi.safetensors"))
        state = {"pi_optimizer": er.pi_optimizer.state_dict(),
                 "scaler": er.scaler.state_dict(), "pi_scaler": er.pi_scaler.state_dict(),
                 "score_baseline": er.search.baseline.clone(),
                 "skipped_steps": dict(er.skipped_steps)}
        if er.ds_engine is None:
            state["optimizer"] = er.optimizer.state_dict()
        torch.save(state, tmp / "state.pt")
        meta = {"format": FORMAT, "iteration": er.iteration,
                "step": er.iteration // er.cfg.pgd_steps, "config": er.cfg.to_dict(),
                "calls": dict(er.calls), "timings": er.timings, "world_size": er.dist.world,
                "deepspeed_config": getattr(er, "ds_config", None),
                "library_version": __version__}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2))
        with open(tmp / "log.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in er.log)
    er.dist.barrier()
    if er.dist.is_main:
        _write_manifest(tmp)
        fault_point("checkpoint-publish")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    er.dist.barrier()


# ----------------------------------------------------------------------------------------------
# Finding and verifying checkpoints
# ----------------------------------------------------------------------------------------------
def step_folders(root: Path) -> list[Path]:
    """The ``step-NNNNNN`` folders under ``root``, oldest first (damaged ones included)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(folder: Path) -> str | None:
    """None when ``folder`` is an intact checkpoint, else what is wrong with it."""
    meta_path = folder / "checkpoint.json"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if not meta_path.is_file():
            return "checkpoint.json is missing"
        try:  # a checkpoint written before manifests existed is read as it is
            if json.loads(meta_path.read_text()).get("format") in LEGACY_FORMATS:
                return None
        except (OSError, ValueError, AttributeError):
            pass
        return "manifest.json is missing (the checkpoint was not finished)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
        assert isinstance(files, dict) and "checkpoint.json" in files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return "manifest.json is damaged"
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != rec.get("size"):
            return f"{rel} has {size} bytes, its manifest says {rec.get('size')}"
        if file_sha256(p) != rec.get("sha256"):
            return f"{rel} does not match its sha256"
    return None


def choose_checkpoint(spec: str, output: str | None, fallback: bool = True,
                      world_size: int = 1) -> tuple[Path | None, list[str]]:
    """The checkpoint ``--resume spec`` means, verified, and notes for the user.

    ``spec`` is a ``step-NNNNNN`` folder (used exactly, refused when damaged), a folder of
    them (its newest intact one), or ``auto`` (the newest intact one of ``output``'s
    checkpoints; none yet: ``(None, note)``, the run starts from step 0). A damaged newest
    checkpoint is skipped with a note when ``fallback``, else refused.
    """
    from .export import checkpoint_root_for

    notes: list[str] = []
    if spec == "auto":
        if not output:
            raise UserError("--resume auto continues the run of --output DIR from the newest "
                            "intact checkpoint in DIR.checkpoints; pass --output DIR")
        root = Path(checkpoint_root_for(output))
        steps = step_folders(root)
        if not steps:
            return None, [f"--resume auto: no checkpoint in {root} yet; starting from step 0"]
    else:
        p = Path(spec)
        if STEP_RE.match(p.name) or (p / "checkpoint.json").exists() or (p / MANIFEST).exists():
            if not p.is_dir():
                raise UserError(f"--resume {spec}: no such checkpoint folder")
            problem = verify_checkpoint(p)
            if problem:
                intact = [q.name for q in step_folders(p.parent) if verify_checkpoint(q) is None]
                raise UserError(f"checkpoint {p} is damaged ({problem}); resume from an intact "
                                f"one ({', '.join(intact) if intact else 'there is none'}), or "
                                f"pass its parent folder to take the newest intact one")
            return p, notes
        root = p
        steps = step_folders(p)
        if not steps:
            raise UserError(f"--resume {spec}: not a checkpoint folder (expected a step-NNNNNN "
                            f"folder, a folder that holds them, or 'auto')")
    problems = []
    for step in reversed(steps):
        problem = verify_checkpoint(step)
        if problem is None:
            if notes:
                notes.append(f"resuming from {step}, the newest intact checkpoint")
            return step, notes
        problems.append(f"{step.name}: {problem}")
        if not fallback:
            raise UserError(f"the newest checkpoint {step} is damaged ({problem}); pass "
                            f"--resume-fallback to resume from the newest intact one, or name "
                            f"one with --resume {root}/step-NNNNNN")
        notes.append(f"checkpoint {step} is damaged ({problem}); skipping it")
    raise UserError(f"no intact checkpoint in {root} ({'; '.join(problems)}); start again "
                    f"without --resume")


def _damaged(ckpt: Path, name: str, exc: BaseException) -> UserError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"checkpoint {ckpt} is damaged: {name} cannot be read ({text[:160]}); "
                     f"resume from an earlier checkpoint")


def _read(ckpt: Path, name: str, reader):
    try:
        return reader(ckpt / name)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as exc:
        raise _damaged(ckpt, name, exc) from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError and unpickling errors
        if type(exc).__name__ in ("SafetensorError", "UnpicklingError"):
            raise _damaged(ckpt, name, exc) from None
        raise


def load_checkpoint(er, path: str) -> None:
    """Restore ``er`` from the checkpoint folder ``path`` (a ``step-NNNNNN`` folder, or the
    newest intact one under it), after checking that its settings, DeepSpeed config and world
    size are this run's. Unreadable files are a :class:`UserError`."""
    from safetensors.torch import load_file

    ckpt = Path(path)
    if not STEP_RE.match(ckpt.name) and not (ckpt / "checkpoint.json").is_file():
        ckpt, _ = choose_checkpoint(path, None)
    meta = _read(ckpt, "checkpoint.json", lambda p: json.loads(p.read_text()))
    if not isinstance(meta, dict) or "config" not in meta or "step" not in meta:
        raise UserError(f"checkpoint {ckpt} is damaged: checkpoint.json lacks its settings")
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
    state = _read(ckpt, "state.pt",
                  lambda p: torch.load(p, map_location="cpu", weights_only=True))
    if er.ds_engine is not None:
        try:
            er.ds_engine.load_checkpoint(str(ckpt), tag="engine", load_module_strict=False)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise _damaged(ckpt, "engine/", exc) from None
    else:
        trained = _read(ckpt, "trained.safetensors", lambda p: load_file(str(p)))
        params = dict(er.trained)
        if set(trained) != set(params):
            raise UserError(f"checkpoint {ckpt} holds other trained tensors than this run")
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
        er.optimizer.load_state_dict(state["optimizer"])
    pis = _read(ckpt, "pi.safetensors", lambda p: load_file(str(p)))
    with torch.no_grad():
        for k, p in enumerate(er.pi):
            p.copy_(pis[f"pi.{k}"])
    er.pi_optimizer.load_state_dict(state["pi_optimizer"])
    if "score_baseline" in state:  # the score estimator's running means (older checkpoints lack them)
        er.search.baseline.copy_(state["score_baseline"])
    for key in ("scaler", "pi_scaler"):
        if state.get(key):
            getattr(er, key).load_state_dict(state[key])
    er.skipped_steps = Counter(state.get("skipped_steps", {}))
    er.plan.load_state(_read(ckpt, f"rng-rank{er.dist.rank}.safetensors",
                             lambda p: load_file(str(p))))
    er.iteration = int(meta["iteration"])
    er.calls = Counter(meta["calls"])
    er.timings.update({k: v for k, v in meta["timings"].items() if k == "train_s"})

    def read_log(p):
        with open(p) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    er.log = _read(ckpt, "log.jsonl", read_log)
    er.last_checkpoint = str(ckpt)

