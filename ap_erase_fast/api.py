"""The Python entry point: ``erase(EraseConfig(...))`` runs a whole erasure job."""
from __future__ import annotations

import sys
from pathlib import Path

from .config import EraseConfig
from .outdir import default_output_dir
from .engine import Eraser, EraseResult
from .errors import UserError
from .export import OutputDir, checkpoint_root_for, write_outputs
from .model_bounds import check_model_bounds


def erase(config: EraseConfig | None = None, write: bool = True, **overrides) -> EraseResult:
    """Erase ``config.erase`` from ``config.model`` with Adversarial Preservation.

    Keyword overrides are applied on top of ``config`` (``erase(erase=["garbage truck"],
    steps=20)``). With ``write=True`` the results go to ``config.output`` (or a default folder)
    and :attr:`EraseResult.output_dir` says where; with ``write=False`` nothing is written and
    the trained tensors are returned in :attr:`EraseResult.trained`.
    """
    cfg = EraseConfig(**{**(config.to_dict() if config else {}), **overrides})
    if isinstance(cfg.erase, str):
        from .config import parse_concepts

        cfg.erase = parse_concepts(cfg.erase)
    if isinstance(cfg.preserve_set, str):
        from .config import parse_prompt_list

        cfg.preserve_set = parse_prompt_list(cfg.preserve_set)
    cfg.validate()
    check_model_bounds(cfg)
    if write:
        cfg.output = cfg.output or default_output_dir(cfg)
    eraser = Eraser(cfg)  # under --deepspeed this joins the process group
    if write:  # every rank uses rank 0's (possibly time-stamped) output path
        cfg.output = eraser.dist.gather(cfg.output)[0]
    out = None
    ok = False
    try:
        if write and eraser.dist.is_main:
            out = OutputDir(cfg.output, overwrite=cfg.overwrite, resuming=cfg.resume == "auto")
        resume = _choose_resume(cfg, eraser) if cfg.resume else None
        eraser.setup()
        if resume:
            eraser.load_checkpoint(resume)
        eraser.train(checkpoint_root=checkpoint_root_for(cfg.output) if write else None)
        info = eraser.run_info()
        trained = eraser.trained_state()
        path = None
        if out is not None:
            _write(out, eraser, trained, info)
            path = out.commit()
        ok = True
        return EraseResult(path if write else None, info, eraser.log, trained)
    finally:
        if out is not None and not ok:
            out.abort()
        eraser.dist.shutdown(clean=ok)


def _choose_resume(cfg: EraseConfig, eraser: Eraser) -> str | None:
    """Rank 0 picks and verifies the checkpoint; every rank resumes from the same one."""
    from .checkpoint import choose_checkpoint

    chosen, notes, error = None, [], None
    if eraser.dist.is_main:
        try:
            path, notes = choose_checkpoint(cfg.resume, cfg.output, cfg.resume_fallback,
                                            eraser.dist.world)
            chosen = str(path) if path is not None else None
        except UserError as exc:
            error = str(exc)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    chosen, error = eraser.dist.gather((chosen, error))[0]
    if error:
        raise UserError(error)
    return chosen


def _write(out: OutputDir, eraser: Eraser, trained: dict, info: dict) -> None:
    """The outputs into the temporary folder; a failed write (a full disk) is one line that
    says where the finished training is kept."""
    from .checkpoint import write_error_reason

    try:
        write_outputs(Path(out.tmp), eraser.unet, trained, info, eraser.log,
                      eraser.backbone.pipeline_class())
    except Exception as exc:  # noqa: BLE001 - classified: write failures are the user's to fix
        reason = write_error_reason(exc, Path(out.tmp))
        if reason is None:
            raise
        out.abort()  # frees the space the partial output took
        kept = (f"the finished training is in the checkpoint {eraser.last_checkpoint}: free "
                f"space and rerun with --resume auto to write the outputs"
                if eraser.last_checkpoint else
                "no checkpoint holds the finished training (use --checkpoint-every N)")
        raise UserError(f"cannot write the output {out.path}: {reason}; {kept}") from None
