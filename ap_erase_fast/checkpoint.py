"""Checkpoints of a run and exact resume: written atomically into ``<output>.checkpoints/
step-NNNNNN`` with a manifest of sizes and sha256 hashes, verified before they are read back,
with every setting compared.

Single process: trained tensors, optimizer states, π, π's optimizer, loss scalers, generator
states, the log. Under DeepSpeed the θ' engine writes its own (ZeRO-partitioned) state into the
same folder and every rank adds its generator states.

A checkpoint is written into ``.step-NNNNNN.tmp``, its files are flushed to disk, then
``manifest.json`` (every file's size and sha256) is written last and the folder is renamed into
place. :func:`choose_checkpoint` verifies a checkpoint against its manifest before it is used
(every file a resume reads must be listed there and match it): a damaged newest checkpoint is
reported in one line and the newest intact one is used instead (``--resume-fallback``, the
default; resumption is bit-exact from any checkpoint, so falling back costs recomputation, never
correctness), or the run stops (``--no-resume-fallback``). Damage the manifest cannot see (a file
rewritten together with its manifest entry) is found when the checkpoint is read, before
anything of the run is changed, and takes the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

from ._version import __version__
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
# The files every resume reads; besides them rng-rank<r>.safetensors of every rank, and engine/
# (the DeepSpeed engine's own state) under DeepSpeed.
BANK_FILE = "bank.safetensors"  # a --bank-refresh run's bank, as it stood at the step
RESUME_FILES = ("checkpoint.json", "trained.safetensors", "state.pt", "pi.safetensors",
                "log.jsonl")


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
        save_file({f"pi.{k}": p.detach().cpu().contiguous() for k, p in enumerate(er.search.pi)},
                  str(tmp / "pi.safetensors"))
        state = {"pi_optimizer": er.search.optimizer.state_dict(),
                 "scaler": er.theta.scaler.state_dict(), "pi_scaler": er.search.scaler.state_dict(),
                 "score_baseline": er.search.baseline.clone(),
                 "skipped_steps": dict(er.skipped_steps)}
        if er.ds_engine is None:
            state["optimizer"] = er.theta.optimizer.state_dict()
        torch.save(state, tmp / "state.pt")
        meta = {"format": FORMAT, "iteration": er.iteration,
                "step": er.iteration // er.cfg.pgd_steps, "config": er.cfg.to_dict(),
                "calls": dict(er.models.calls), "timings": er.timings, "world_size": er.dist.world,
                "deepspeed_config": getattr(er, "ds_config", None),
                "library_version": __version__}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2))
        if er.cfg.bank_refresh:  # a refreshed bank holds θ′'s trajectories: not rebuilt from a seed
            save_file({"states": er.trajectories.states.cpu().contiguous()}, str(tmp / BANK_FILE))
        with open(tmp / "log.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in er.log)
    er.dist.barrier()
    if er.dist.is_main:
        from .outdir import follow_umask

        follow_umask(tmp)  # safetensors writes its files 0600; the others follow the umask
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
        if not isinstance(rec, dict):
            return "manifest.json is damaged"
        size = p.stat().st_size
        if size != rec.get("size"):
            return f"{rel} has {size} bytes, its manifest says {rec.get('size')}"
        if file_sha256(p) != rec.get("sha256"):
            return f"{rel} does not match its sha256"
    try:  # verified above: its content is the one the manifest vouches for
        meta = json.loads(meta_path.read_text())
        world = int(meta.get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return "checkpoint.json cannot be read"
    # a file a resume reads but the manifest does not list is not verified: not intact
    for rel in RESUME_FILES + tuple(f"rng-rank{r}.safetensors" for r in range(max(world, 1))):
        if rel not in files:
            return f"{rel} is not listed in its {MANIFEST}"
    if meta.get("deepspeed_config") and not any(rel.startswith("engine/") for rel in files):
        return f"engine/ is not listed in its {MANIFEST}"
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
    skipped: list[tuple[Path, str]] = []
    for step in reversed(steps):
        problem = verify_checkpoint(step)
        if problem is None:
            if skipped:
                notes.append(fallback_note(skipped, step))
            return step, notes
        if not fallback:
            raise UserError(f"the newest checkpoint {step} is damaged ({problem}); pass "
                            f"--resume-fallback to resume from the newest intact one, or name "
                            f"one with --resume {root}/step-NNNNNN")
        skipped.append((step, problem))
    raise UserError(f"no intact checkpoint in {root} "
                    f"({'; '.join(f'{q.name}: {why}' for q, why in skipped)}); start again "
                    f"without --resume")


def fallback_note(skipped: list[tuple[Path, str]], chosen: Path) -> str:
    """One sentence: which checkpoints are damaged and why, and the one resumed from."""
    damaged = (f"checkpoint {skipped[0][0]} is damaged ({skipped[0][1]})" if len(skipped) == 1
               else "checkpoints " + ", ".join(f"{q} ({why})" for q, why in skipped)
               + " are damaged")
    return f"{damaged}; resuming from {chosen}, the newest intact checkpoint"


class _Damage(Exception):
    """A checkpoint file that cannot be read, or does not hold what a resume needs; the text
    says which, as one whole clause."""


_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, TypeError, IndexError,
                AttributeError)


def _read(ckpt: Path, name: str, reader, kind: str):
    """``reader(ckpt / name)``; any failure to read it is :class:`_Damage` (no warnings)."""
    try:
        with warnings.catch_warnings():  # torch.load warns about what it is about to refuse
            warnings.simplefilter("ignore")
            return reader(ckpt / name)
    except OSError as exc:
        raise _Damage(f"{name} cannot be read ({exc.strerror or 'an I/O error'})") from None
    except _READ_ERRORS:
        raise _Damage(f"{name} cannot be read: it is not {kind}") from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError and unpickling errors
        if type(exc).__name__ in ("SafetensorError", "UnpicklingError"):
            raise _Damage(f"{name} cannot be read: it is not {kind}") from None
        raise


def _read_log(path: Path) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_checkpoint(er, ckpt: Path) -> dict:
    """Every file of ``ckpt`` this process resumes from, read and checked against this run;
    nothing of ``er`` is changed. Damage is :class:`_Damage`, other settings a UserError."""
    from safetensors.torch import load_file

    safetensors = "a complete safetensors file"
    meta = _read(ckpt, "checkpoint.json", lambda p: json.loads(p.read_text()), "valid JSON")
    if (not isinstance(meta, dict) or not isinstance(meta.get("config"), dict)
            or not all(k in meta for k in ("step", "iteration", "calls", "timings"))):
        raise _Damage("checkpoint.json lacks its settings")
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
    try:
        step, iteration = int(meta["step"]), int(meta["iteration"])
        calls, timings = Counter(meta["calls"]), dict(meta["timings"])
    except (TypeError, ValueError):
        raise _Damage("checkpoint.json lacks its settings") from None
    if step > er.cfg.steps:
        raise UserError(f"checkpoint {ckpt} is at step {step}, beyond --steps {er.cfg.steps}")

    state = _read(ckpt, "state.pt",
                  lambda p: torch.load(p, map_location="cpu", weights_only=True),
                  "a complete torch file")
    if (not isinstance(state, dict) or not isinstance(state.get("pi_optimizer"), dict)
            or (er.ds_engine is None and not isinstance(state.get("optimizer"), dict))):
        raise _Damage("state.pt lacks the optimizer states")
    trained = None
    if er.ds_engine is None:
        trained = _read(ckpt, "trained.safetensors", lambda p: load_file(str(p)), safetensors)
        params = dict(er.trained)
        if set(trained) != set(params):
            raise UserError(f"checkpoint {ckpt} holds other trained tensors than this run")
        if any(trained[n].shape != params[n].shape for n in trained):
            raise _Damage("trained.safetensors holds tensors of other shapes than this run's")
    pis = _read(ckpt, "pi.safetensors", lambda p: load_file(str(p)), safetensors)
    if (set(pis) != {f"pi.{k}" for k in range(len(er.search.pi))}
            or any(pis[f"pi.{k}"].shape != p.shape for k, p in enumerate(er.search.pi))):
        raise _Damage("pi.safetensors does not hold this run's search logits")
    rng_name = f"rng-rank{er.dist.rank}.safetensors"
    rng = _read(ckpt, rng_name, lambda p: load_file(str(p)), safetensors)
    if set(rng) != set(er.plan.state()):
        raise _Damage(f"{rng_name} does not hold this run's generator states")
    bank = None
    if er.cfg.bank_refresh:
        bank = _read(ckpt, BANK_FILE, lambda p: load_file(str(p)), safetensors)
        if set(bank) != {"states"} or bank["states"].shape != er.trajectories.states.shape:
            raise _Damage(f"{BANK_FILE} does not hold this run's trajectory bank")
    log = _read(ckpt, "log.jsonl", _read_log, "valid JSON lines")
    iters = [r.get("iter") if isinstance(r, dict) else None for r in log]
    if not all(isinstance(i, int) for i in iters) or any(
            a >= b for a, b in zip(iters, iters[1:])) or (iters and iters[-1] >= iteration):
        raise _Damage(f"log.jsonl does not end at the checkpoint's iteration {iteration}")
    return {"iteration": iteration, "calls": calls, "timings": timings, "state": state,
            "trained": trained, "pis": pis, "rng": rng, "log": log, "bank": bank}


def _restore(er, ckpt: Path, data: dict) -> None:
    """Put what :func:`_read_checkpoint` read into ``er``. A part that will not go in is
    :class:`_Damage`; loading another checkpoint afterwards replaces everything set here."""
    state = data["state"]

    def part(name: str, what: str, fn) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except _READ_ERRORS:
            raise _Damage(f"{name} cannot be restored: {what}") from None

    if er.ds_engine is not None:
        part("engine/", "the DeepSpeed engine cannot load it", lambda: er.ds_engine.load_checkpoint(
            str(ckpt), tag="engine", load_module_strict=False))
    else:
        params = dict(er.trained)

        def copy_trained():
            with torch.no_grad():
                for name, value in data["trained"].items():
                    params[name].copy_(value)

        copy_trained()
        part("state.pt", "its optimizer state does not fit this run",
             lambda: er.theta.optimizer.load_state_dict(state["optimizer"]))
    with torch.no_grad():
        for k, p in enumerate(er.search.pi):
            p.copy_(data["pis"][f"pi.{k}"])
    part("state.pt", "its search optimizer state does not fit this run",
         lambda: er.search.optimizer.load_state_dict(state["pi_optimizer"]))
    if "score_baseline" in state:  # the score estimator's running means (older ones lack them)
        part("state.pt", "its score baseline does not fit this run",
             lambda: er.search.baseline.copy_(state["score_baseline"]))
    for key, scaler in (("scaler", er.theta.scaler), ("pi_scaler", er.search.scaler)):
        if state.get(key):
            part("state.pt", "its loss scaler state does not fit this run",
                 lambda key=key, scaler=scaler: scaler.load_state_dict(state[key]))
    er.skipped_steps.clear()  # in place: the search and the θ′ update count into this Counter
    er.skipped_steps.update(state.get("skipped_steps", {}))
    part(f"rng-rank{er.dist.rank}.safetensors", "its generator states do not fit this run",
         lambda: er.plan.load_state(data["rng"]))
    er.iteration = data["iteration"]
    if data.get("bank") is not None:  # the refreshes done before the checkpoint's step
        er.trajectories.restore(data["bank"]["states"],
                                max(0, er.iteration // er.cfg.pgd_steps - 1) // er.cfg.bank_refresh,
                                er.cfg.bank_refresh_share)
    er.models.calls.clear()
    er.models.calls.update(data["calls"])
    er.timings.update({k: v for k, v in data["timings"].items() if k == "train_s"})
    er.log = data["log"]
    er.last_checkpoint = str(ckpt)


def _step_number(folder: Path) -> int:
    m = STEP_RE.match(folder.name)
    return int(m.group(1)) if m else -1


def _fall_back(er, ckpt: Path, problem: str, named: bool,
               skipped: list[tuple[Path, str]]) -> Path:
    """The checkpoint to load instead of ``ckpt``, found damaged when read (``problem``): the
    newest intact one before it, as :func:`choose_checkpoint` falls back; or a UserError where
    the user ``named`` ``ckpt`` or asked for no fallback."""
    root = ckpt.parent
    if named:
        intact = [q.name for q in step_folders(root) if q != ckpt and verify_checkpoint(q) is None]
        raise UserError(f"checkpoint {ckpt} is damaged ({problem}); resume from an intact one "
                        f"({', '.join(intact) if intact else 'there is none'}), or pass its "
                        f"parent folder to take the newest intact one")
    if not er.cfg.resume_fallback:
        raise UserError(f"the newest checkpoint {ckpt} is damaged ({problem}); pass "
                        f"--resume-fallback to resume from the newest intact one, or name one "
                        f"with --resume {root}/step-NNNNNN")
    skipped.append((ckpt, problem))
    for q in reversed(step_folders(root)):
        if _step_number(q) >= _step_number(ckpt):
            continue
        bad = verify_checkpoint(q)
        if bad is None:
            return q
        skipped.append((q, bad))
    raise UserError(f"no intact checkpoint in {root} "
                    f"({'; '.join(f'{q.name}: {why}' for q, why in skipped)}); start again "
                    f"without --resume")


def load_checkpoint(er, path: str) -> None:
    """Restore ``er`` from the checkpoint folder ``path`` (a ``step-NNNNNN`` folder, or the
    newest intact one under it), after checking that its settings, DeepSpeed config and world
    size are this run's. Every file is read and checked before anything of ``er`` changes; a
    damaged one (damage the manifest could not see) makes the run fall back to the newest
    intact checkpoint before it, with one note, unless the user named the damaged checkpoint
    or passed --no-resume-fallback: then, as for any other unusable checkpoint, a
    :class:`UserError`."""
    ckpt = Path(path)
    spec = er.cfg.resume
    # named: the user asked for exactly this checkpoint (--resume DIR/step-NNNNNN, or a direct
    # call without --resume); a damaged one is then refused, never replaced
    named = not spec or (spec != "auto" and os.path.realpath(spec) == os.path.realpath(ckpt))
    if not STEP_RE.match(ckpt.name) and not (ckpt / "checkpoint.json").is_file():
        ckpt, notes = choose_checkpoint(path, None, er.cfg.resume_fallback, er.dist.world)
        named = False
        if er.dist.is_main:
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
    skipped: list[tuple[Path, str]] = []
    while True:
        try:
            problem, data = None, _read_checkpoint(er, ckpt)
        except _Damage as exc:
            problem, data = str(exc), None
        problem = next((p for p in er.dist.gather(problem) if p), None)  # any rank's damage
        if problem is None:
            try:
                _restore(er, ckpt, data)
            except _Damage as exc:
                problem = str(exc)
            problem = next((p for p in er.dist.gather(problem) if p), None)
        if problem is None:
            break
        ckpt = _fall_back(er, ckpt, problem, named, skipped)
    if skipped and er.dist.is_main:
        print(f"note: {fallback_note(skipped, ckpt)}", file=sys.stderr)
