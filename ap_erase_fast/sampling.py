"""DDIM tables and the truncated trajectories AP (and ESD before it) trains on.

The authors sample z with the CompVis DDIM sampler and a ``till_T`` stop (ALGORITHM.md §4):

* DDIM timesteps τ_k = k·c + 1 for k = 0..S−1 (c = 1000 // S; [1, 21, …, 981] for S = 50);
* the last one (981) is skipped: x_T is fed to the UNet as if it were at τ_{S−2} = 961;
* the loop runs DDIM indices k = S−2, S−3, …, down to and including max(t_enc − 1, 0), so a
  trajectory takes S − t_enc UNet calls for t_enc ≥ 1 and S − 1 for t_enc = 0;
* each step is a batch-2 classifier-free-guidance call (unconditional "" first, then the condition;
  at guidance 1 the conditional call alone, whose output the guided one equals) followed by a deterministic (eta = 0) DDIM update from ᾱ_{τ_k} to ᾱ_{τ_{k−1}} (ᾱ_0 for k = 0).

The UNet is then queried at a DDPM timestep t_ddpm ∈ [20·t_enc, 20·t_enc + 19] and x0 is formed
with ᾱ_{τ_{t_enc}}, while z's actual noise level is about that of τ_{t_enc−2}. That quirk is the
authors' and is kept: the faithful schedule reproduces their computation, not an idealised one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Predicts the model output for (latents [B,4,h,w], timesteps [B] long, conditioning of B
# prompts: a backbones.Cond).
UNetFn = Callable[[torch.Tensor, torch.Tensor, "object"], torch.Tensor]


def alphas_cumprod_from_scheduler(scheduler) -> torch.Tensor:
    """ᾱ_t for t = 0..T−1 in float64, computed the way the CompVis code does (float64 betas)."""
    cfg = scheduler.config
    n = int(cfg.num_train_timesteps)
    schedule = cfg.beta_schedule
    if schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n,
                               dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    else:  # any other schedule: trust the scheduler's own table
        return scheduler.alphas_cumprod.to(torch.float64).clone()
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class DDIMTables:
    """Everything the trajectories and the x0 conversion need, computed once per run."""

    alphas_cumprod: torch.Tensor  # [T] float64
    timesteps: list[int]  # DDIM timesteps τ_k, ascending
    num_train_timesteps: int
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler(cls, scheduler, ddim_steps: int = 50) -> "DDIMTables":
        n = int(scheduler.config.num_train_timesteps)
        if ddim_steps < 2 or ddim_steps > n:
            from .errors import UserError

            raise UserError(f"the number of DDIM steps must be between 2 and {n} (the model's "
                            f"training timesteps); got {ddim_steps}")
        c = n // ddim_steps
        timesteps = [k * c + 1 for k in range(ddim_steps)]
        return cls(
            alphas_cumprod=alphas_cumprod_from_scheduler(scheduler),
            timesteps=timesteps,
            num_train_timesteps=n,
            prediction_type=getattr(scheduler.config, "prediction_type", "epsilon"),
        )

    @property
    def ddim_steps(self) -> int:
        return len(self.timesteps)

    def trajectory_indices(self, t_enc: int) -> list[int]:
        """DDIM indices k visited when sampling until t_enc (descending)."""
        if not 0 <= t_enc < self.ddim_steps:
            raise ValueError(f"t_enc must be in [0, {self.ddim_steps}), got {t_enc}")
        return list(range(self.ddim_steps - 2, max(t_enc - 1, 0) - 1, -1))

    def num_trajectory_steps(self, t_enc: int) -> int:
        return len(self.trajectory_indices(t_enc))

    def alpha(self, k: int) -> float:
        return float(self.alphas_cumprod[self.timesteps[k]])

    def alpha_prev(self, k: int) -> float:
        return float(self.alphas_cumprod[self.timesteps[k - 1]] if k > 0 else self.alphas_cumprod[0])

    def t_ddpm_range(self, t_enc: int) -> tuple[int, int]:
        """Half-open range [lo, hi) of the DDPM timestep queried after sampling until t_enc."""
        n, s = self.num_train_timesteps, self.ddim_steps
        return round(t_enc / s * n), round((t_enc + 1) / s * n)

    def x0_alpha(self, t_enc: int) -> float:
        """ᾱ used to turn the model's ε into x0 for the losses (ᾱ_{τ_{t_enc}})."""
        return float(self.alphas_cumprod[self.timesteps[t_enc]])


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0), written as the CompVis sampler writes it."""
    pred_x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
    dir_xt = (1.0 - a_prev) ** 0.5 * eps
    return a_prev ** 0.5 * pred_x0 + dir_xt


def output_to_eps(output: torch.Tensor, x: torch.Tensor, alpha_cumprod: float,
                  prediction_type: str) -> torch.Tensor:
    """Convert a UNet output to ε for the latent x at a timestep with the given ᾱ."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_cumprod ** 0.5 * output + (1.0 - alpha_cumprod) ** 0.5 * x
    if prediction_type == "sample":
        return (x - alpha_cumprod ** 0.5 * output) / (1.0 - alpha_cumprod) ** 0.5
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def sample_until(
    unet_fn: UNetFn,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    tables: DDIMTables,
    t_enc: int,
    guidance: float,
) -> torch.Tensor:
    """Sample from x_T with classifier-free guidance until DDIM index t_enc (see module doc).

    ``x_T`` is [B, C, h, w]; ``cond`` and ``uncond`` are conditionings of B prompts
    (:class:`~ap_erase_fast.backbones.Cond`; B trajectories at once). Each step is one UNet call
    on the batch [uncond; cond] of size 2B.
    """
    x = x_T
    for x in trajectory_states(unet_fn, x_T, cond, uncond, tables, guidance, t_enc):
        pass
    return x


def guidance_is_one(guidance: float) -> bool:
    """Whether a CFG scale makes the guided output the conditional one (one UNet evaluation per
    sample and step instead of two)."""
    return float(guidance) == 1.0


def cfg_evals(guidance: float) -> int:
    """UNet evaluations per sample and DDIM step of a trajectory at this CFG scale."""
    return 1 if guidance_is_one(guidance) else 2


def trajectory_states(unet_fn: UNetFn, x_T: torch.Tensor, cond, uncond, tables: DDIMTables,
                      guidance: float, t_enc: int = 0):
    """Yield the latents after each DDIM step of :func:`sample_until`'s loop, in order: the
    state after DDIM index k (k = S−2, S−3, …, max(t_enc − 1, 0)). Run to t_enc = 0, the S − 1
    states are z for every t_enc at once (:func:`state_position` maps t_enc to its state)."""
    from .conditioning import Cond

    x = x_T
    b = x.shape[0]
    # at guidance 1, out_u + 1·(out_c − out_u) is out_c: the unconditional half is not computed
    # (FLUX's default: its pipeline runs no CFG either)
    conditional_only = guidance_is_one(guidance)
    text = cond if conditional_only else Cond.cat([uncond, cond])
    for k in tables.trajectory_indices(t_enc):
        t = torch.full(((1 if conditional_only else 2) * b,), tables.timesteps[k], dtype=torch.long, device=x.device)
        if conditional_only:
            out = unet_fn(x, t, text)
        else:
            out_u, out_c = unet_fn(torch.cat([x, x]), t, text).chunk(2)
            out = out_u + guidance * (out_c - out_u)
        a_t = tables.alpha(k)
        eps = output_to_eps(out, x, a_t, tables.prediction_type)
        x = ddim_step(x, eps, a_t, tables.alpha_prev(k))
        yield x


def state_position(tables: DDIMTables, t_enc: int) -> int:
    """Index, among the S − 1 states a full trajectory yields, of the z that sampling until
    ``t_enc`` returns: the state after DDIM index max(t_enc − 1, 0)."""
    if not 0 <= t_enc < tables.ddim_steps:
        raise ValueError(f"t_enc must be in [0, {tables.ddim_steps}), got {t_enc}")
    return tables.ddim_steps - 2 - max(t_enc - 1, 0)
