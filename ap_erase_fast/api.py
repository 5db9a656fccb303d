"""The Python entry point: ``erase(EraseConfig(...))`` runs a whole erasure job."""
from __future__ import annotations

from pathlib import Path

from .config import EraseConfig, default_output_dir
from .engine import EraseResult, Eraser
from .export import OutputDir, write_outputs


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
    cfg.validate()
    out = None
    if write:
        cfg.output = cfg.output or default_output_dir(cfg)
        out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    try:
        eraser = Eraser(cfg).setup()
        if cfg.resume:
            eraser.load_checkpoint(cfg.resume)
        eraser.train(checkpoint_root=out.checkpoint_root if out else None)
        info = eraser.run_info()
        trained = eraser.trained_state()
        if out is None:
            return EraseResult(None, info, eraser.log, trained)
        write_outputs(Path(out.tmp), eraser.unet, trained, info, eraser.log)
        path = out.commit()
    except BaseException:
        if out is not None:
            out.abort()
        raise
    return EraseResult(path, info, eraser.log, trained)
