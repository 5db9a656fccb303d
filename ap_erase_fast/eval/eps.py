"""Erasure and preservation measured in ε-space, on any model (the built-in tiny one included).

For every concept c (erased or held-out) and every seed s:

1. x_T ~ N(0, I) from ``torch.Generator().manual_seed(s)`` (one draw per seed, shared by all
   concepts), and a plain DDIM trajectory (eta 0, CFG ``guidance`` with "" as unconditional) of
   the **base** model θ for c, over the run's DDIM timesteps τ_{S−1} > … > τ_0;
2. at the query indices k (``num_timesteps`` of them, evenly spread over the trajectory), with
   z = z_k (the latent at noise level τ_k), the model outputs are turned into ε and

   * ε_θ(z, c), ε_θ(z, ""), ε_θ'(z, c);
   * target = ε_θ(z, "") − η·(ε_θ(z, c) − ε_θ(z, ""))   (ESD/AP negative guidance, η of the run);
   * drift(c)      = mean over elements of (ε_θ'(z, c) − ε_θ(z, c))²      (the paper's sensitivity);
   * gap_erased(c) = mean over elements of (ε_θ'(z, c) − target)²;
   * gap_base(c)   = mean over elements of (ε_θ(z, c) − target)² = (1+η)²·mean((ε_θ(z,c) − ε_θ(z,""))²).

Every number is then averaged over seeds and query indices (float64 accumulation). The same z
is used for θ and θ', so identical models give exactly zero drift and gap_erased = gap_base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import DDIMTables, ddim_step, output_to_eps


@dataclass
class EpsSettings:
    seeds: tuple[int, ...] = (0, 1)
    ddim_steps: int = 50
    num_timesteps: int = 5
    guidance: float = 3.0
    negative_guidance: float = 1.0
    batch_size: int = 8

    def as_dict(self) -> dict:
        return {"seeds": list(self.seeds), "ddim_steps": self.ddim_steps,
                "num_timesteps": self.num_timesteps, "trajectory_guidance": self.guidance,
                "negative_guidance": self.negative_guidance}


def eps_work(settings: EpsSettings, n_concepts: int) -> int:
    """UNet steps :func:`eps_measures` takes (its progress total): every seed and concept batch
    walks its trajectory from the noisiest index down to the lowest queried one."""
    lowest = min(query_indices(settings.ddim_steps, settings.num_timesteps))
    batches = -(-n_concepts // settings.batch_size)
    return len(settings.seeds) * batches * (settings.ddim_steps - lowest)


def query_indices(ddim_steps: int, n: int) -> list[int]:
    """``n`` DDIM indices evenly spread from the noisiest (S−1) to the cleanest (0), descending."""
    n = max(1, min(n, ddim_steps))
    if n == 1:
        return [ddim_steps - 1]
    return sorted({round((ddim_steps - 1) * (1 - i / (n - 1))) for i in range(n)}, reverse=True)


def _unet_eps(unet, x, t: int, cond, tables: DDIMTables, k: int, predict) -> torch.Tensor:
    ts = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = predict(unet, x.to(unet.dtype), ts, cond.to(dtype=unet.dtype)).float()
    return output_to_eps(out, x, tables.alpha(k), tables.prediction_type)


def _sd_predict(forward, x, t, cond):
    return forward(x, t, encoder_hidden_states=cond.parts[0], return_dict=False)[0]


@torch.no_grad()
def eps_measures(base_unet, erased_unet, cond, uncond, scheduler,
                 latent_shape: tuple[int, int, int], settings: EpsSettings,
                 progress=None, predict=None) -> dict:
    """Per-concept measures for the C prompts conditioned by ``cond`` (a
    :class:`~ap_erase_fast.backbones.Cond` of C prompts; a tensor [C, L, D] of SD text states is
    accepted too).

    ``uncond`` is the conditioning of "" (one prompt); ``predict`` the backbone's
    :meth:`~ap_erase_fast.backbones.Backbone.predict` (default: SD's UNet call);
    ``progress(1)`` is called after every UNet step (:func:`eps_work` of them). Returns
    numpy-free lists of floats: ``drift``, ``gap_erased``, ``gap_base`` (each [C]), their
    per-query-index breakdown ``*_by_index`` ([C][n_idx]), ``indices`` and ``timesteps``.
    """
    from ..backbones import Cond

    if isinstance(cond, torch.Tensor):
        cond, uncond = Cond((cond,)), Cond((uncond,))
    predict = predict or _sd_predict
    tables = DDIMTables.from_scheduler(scheduler, settings.ddim_steps)
    indices = query_indices(settings.ddim_steps, settings.num_timesteps)
    device = next(base_unet.parameters()).device
    same = erased_unet is base_unet
    eta = settings.negative_guidance
    n_c, n_i = len(cond), len(indices)
    sums = {name: torch.zeros(n_c, n_i, dtype=torch.float64) for name in ("drift", "gap_erased", "gap_base")}
    lowest = min(indices)
    for seed in settings.seeds:
        gen = torch.Generator().manual_seed(int(seed))
        x_T = torch.randn((1, *latent_shape), generator=gen, dtype=torch.float32)
        for start in range(0, n_c, settings.batch_size):
            c = cond[start:start + settings.batch_size].to(device)
            b = len(c)
            u = uncond.to(device).expand(b)
            x = x_T.to(device).expand(b, -1, -1, -1).clone()
            for k in range(settings.ddim_steps - 1, lowest - 1, -1):
                t = tables.timesteps[k]
                # one call on [c; ""] gives both the trajectory step and ε_θ(z,c), ε_θ(z,"")
                eps = _unet_eps(base_unet, torch.cat([x, x]), t, Cond.cat([c, u]), tables, k,
                                predict)
                e_c, e_0 = eps.chunk(2)
                if k in indices:
                    j = indices.index(k)
                    e_erased = e_c if same else _unet_eps(erased_unet, x, t, c, tables, k, predict)
                    target = e_0 - eta * (e_c - e_0)
                    dims = tuple(range(1, x.dim()))
                    sl = slice(start, start + b)
                    sums["drift"][sl, j] += ((e_erased - e_c) ** 2).double().mean(dims).cpu()
                    sums["gap_erased"][sl, j] += ((e_erased - target) ** 2).double().mean(dims).cpu()
                    sums["gap_base"][sl, j] += ((e_c - target) ** 2).double().mean(dims).cpu()
                if progress is not None:
                    progress(1)
                if k == lowest:
                    break
                guided = e_0 + settings.guidance * (e_c - e_0)
                x = ddim_step(x, guided, tables.alpha(k), tables.alpha_prev(k))
    n_s = len(settings.seeds)
    out = {"indices": indices, "timesteps": [tables.timesteps[k] for k in indices]}
    for name, s in sums.items():
        by_index = s / n_s
        out[name] = by_index.mean(1).tolist()
        out[name + "_by_index"] = by_index.tolist()
    return out
