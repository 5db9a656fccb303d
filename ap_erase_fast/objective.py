"""AP's loss terms (ALGORITHM.md §1), in x0 space (the authors') or ε space (ESD's).

All functions take model outputs already converted to ε. Frozen-model outputs must arrive
detached; the functions do not detach anything themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def predict_x0(eps: torch.Tensor, z: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """x0(ε, z) = (z − sqrt(1 − ᾱ)·ε) / sqrt(ᾱ)."""
    return (z - (1.0 - alpha_cumprod) ** 0.5 * eps) / alpha_cumprod ** 0.5


def x0_weight(alpha_cumprod: float) -> float:
    """The factor (1 − ᾱ)/ᾱ by which an x0-space MSE weights the ε-space MSE."""
    return (1.0 - alpha_cumprod) / alpha_cumprod


def erasure_loss(eps_erased: torch.Tensor, eps_null: torch.Tensor, eps_concept: torch.Tensor,
                 z: torch.Tensor, alpha_cumprod: float, negative_guidance: float,
                 space: str = "x0") -> torch.Tensor:
    """MSE between θ'(z, c_e) and the negative-guidance target.

    target = θ(z, "") − η·(θ(z, c_e) − θ(z, "")). In x0 space the target is formed from the x0
    predictions as the authors do: x0(e0) − η·(x0(en) − x0(e0)), which equals x0(ε_target).
    """
    if space == "x0":
        x0_null = predict_x0(eps_null, z, alpha_cumprod)
        x0_concept = predict_x0(eps_concept, z, alpha_cumprod)
        target = x0_null - negative_guidance * (x0_concept - x0_null)
        return F.mse_loss(predict_x0(eps_erased, z, alpha_cumprod), target)
    if space == "eps":
        return F.mse_loss(eps_erased, eps_null - negative_guidance * (eps_concept - eps_null))
    raise ValueError(f"unknown loss space {space!r}")


def preservation_loss(eps_trained: torch.Tensor, eps_frozen: torch.Tensor, z: torch.Tensor,
                      alpha_cumprod: float, space: str = "x0") -> torch.Tensor:
    """MSE between θ'(z_r, c_a) and θ(z_r, c_a)."""
    if space == "x0":
        return F.mse_loss(predict_x0(eps_trained, z, alpha_cumprod),
                          predict_x0(eps_frozen, z, alpha_cumprod))
    if space == "eps":
        return F.mse_loss(eps_trained, eps_frozen)
    raise ValueError(f"unknown loss space {space!r}")
