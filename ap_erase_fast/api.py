"""The Python entry point: ``erase(EraseConfig(...))`` runs a whole erasure job."""
from __future__ import annotations

from pathlib import Path

from .config import EraseConfig, default_output_dir
from .engine import EraseResult, Eraser
from .export import OutputDir, checkpoint_root_for, write_outputs


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
    if write:
        cfg.output = cfg.output or default_output_dir(cfg)
    eraser = Eraser(cfg)  # under --deepspeed this joins the process group
    if write:  # every rank uses rank 0's (possibly time-stamped) output path
        cfg.output = eraser.dist.gather(cfg.output)[0]
    out = None
    ok = False
    try:
        if write and eraser.dist.is_main:
            out = OutputDir(cfg.output, overwrite=cfg.overwrite)
        eraser.setup()
        if cfg.resume:
            eraser.load_checkpoint(cfg.resume)
        eraser.train(checkpoint_root=checkpoint_root_for(cfg.output) if write else None)
        info = eraser.run_info()
        trained = eraser.trained_state()
        path = None
        if out is not None:
            write_outputs(Path(out.tmp), eraser.unet, trained, info, eraser.log,
                          eraser.backbone.pipeline_class())
            path = out.commit()
        ok = True
        return EraseResult(path if write else None, info, eraser.log, trained)
    finally:
        if out is not None and not ok:
            out.abort()
        eraser.dist.shutdown(clean=ok)
