"""The θ′ update: backward (loss-scaled in fp16) and the optimizer step, through the DeepSpeed
engine when there is one; plus the optimizers a run can choose."""
from __future__ import annotations

from collections import Counter

import torch

from .errors import UserError
from .search import scaled_step


class ThetaUpdate:
    def __init__(self, optimizer, params: list[torch.nn.Parameter], device,
                 compute_dtype: torch.dtype | None = None, ds_engine=None,
                 skipped: Counter | None = None):
        self.optimizer = optimizer
        self.params = params  # the trained tensors
        self.ds_engine = ds_engine
        # fp16 compute: one dynamic loss scale for the θ′ backward (which also carries π's
        # gradient in the shared schedule)
        self.scaler = torch.amp.GradScaler(torch.device(device).type,
                                           enabled=compute_dtype == torch.float16)
        self.skipped = skipped if skipped is not None else Counter()

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` for θ′ (and π where the graph reaches it). Follow with
        :meth:`step`."""
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """Descent step on the gradients of the last :meth:`backward` (skipped, and the loss
        scale lowered, when an fp16 gradient overflowed)."""
        if self.ds_engine is not None:
            self.ds_engine.step()
            return
        scaled_step(self.scaler, self.optimizer, self.skipped, "theta")

    def __call__(self, loss: torch.Tensor) -> None:
        """Backward and step."""
        self.backward(loss)
        self.step()


def make_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - missing or broken install
        raise UserError(f"--optimizer {cfg.optimizer} needs bitsandbytes ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); install it with "
                        f"pip install 'ap_erase_fast[bnb]' or use --optimizer adam") from None
    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
