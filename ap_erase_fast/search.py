"""The adversarial search (ALGORITHM.md §3): one logits vector π per erased concept over its
preservation set R, the Gumbel-Softmax draw of c_a, and π's own Adam.

R is kept as one table of flattened conditionings per erased concept ([|R|, F]: every tensor of a
prompt's :class:`~ap_erase_fast.backbones.Cond` in one row), so one ``gumbel_mix`` call mixes
every conditioning tensor with the same weights.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from .backbones import Cond
from .errors import UserError

# decay of the score estimator's running-mean baseline per concept (the weight of the history)
BASELINE_DECAY = 0.9


class Search:
    def __init__(self, cfg, sets, tables: list[torch.Tensor], cond_shapes, device, dist,
                 compute_dtype: torch.dtype | None = None, skipped: Counter | None = None):
        """``sets``: the :class:`~ap_erase_fast.concepts.PreservationSet` per erased concept;
        ``tables``: their rows [|R|, F] on the device; ``cond_shapes``: per-prompt shapes of a
        Cond (to unflatten a mixed row)."""
        if cfg.gumbel_mode == "topk" and any(cfg.gumbel_topk > len(s.words) for s in sets):
            small = min(sets, key=lambda s: len(s.words))
            raise UserError(f"--gumbel-topk {cfg.gumbel_topk} is larger than the preservation set of "
                            f"{small.concept!r} ({len(small.words)} candidates); use --gumbel-topk "
                            f"{len(small.words)} or less")
        self.cfg = cfg
        self.sets = sets
        self.tables = tables
        self.cond_shapes = cond_shapes
        self.dist = dist
        self.backend = "torch" if cfg.profile == "reference" else "auto"
        # π: one logits vector per erased concept, uniform 1/|R|, one Adam for all of them.
        self.pi = [torch.nn.Parameter(torch.full((len(s.words),), 1.0 / len(s.words),
                                                 device=device)) for s in sets]
        self.optimizer = torch.optim.Adam(self.pi, lr=cfg.search_lr)
        # fp16: the π-only search backward has its own dynamic loss scale (π's gradients are
        # ~1e-8: an unscaled fp16 backward flushes them to zero)
        self.scaler = torch.amp.GradScaler(torch.device(device).type,
                                           enabled=compute_dtype == torch.float16)
        self.skipped = skipped if skipped is not None else Counter()
        # the score estimator's running mean of ℓ per concept (NaN: no history yet); saved in
        # checkpoints, so that a resumed run continues bit-identically
        self.baseline = torch.full((len(sets),), float("nan"), dtype=torch.float64)

    def draw(self, concept: int, gumbel: torch.Tensor, with_grad: bool = True) -> tuple[Cond, int]:
        """c_a from π[c_e] for the Gumbel noise ``gumbel`` [|R|]: a one-prompt Cond
        (differentiable in π when ``with_grad``) and the index of the drawn word."""
        from .ops import gumbel_mix

        cfg = self.cfg
        pi = self.pi[concept] if with_grad else self.pi[concept].detach()
        table = self.tables[concept]
        out, index = gumbel_mix(pi[None], table, tau=cfg.tau, hard=cfg.gumbel_mode == "hard",
                                topk=cfg.gumbel_topk if cfg.gumbel_mode == "topk" else None,
                                gumbel=gumbel[None].to(table.device), backend=self.backend,
                                return_index=True)
        return Cond.unflat(out, self.cond_shapes), int(index[0])

    def gradients(self, loss: torch.Tensor, concepts: list[int]) -> dict[int, torch.Tensor]:
        """Gradients of ``loss`` in the π's of ``concepts`` alone, loss-scaled in fp16 (hand
        them to :meth:`step` as they are)."""
        grads = torch.autograd.grad(self.scaler.scale(loss), [self.pi[c] for c in concepts])
        return dict(zip(concepts, grads))

    def score_gradients(self, concepts: list[int], indices: list[int], losses: torch.Tensor,
                        ) -> dict[int, torch.Tensor]:
        """π gradients (of the loss to minimise, −ℓ) by the score-function estimator of the
        expected preservation error of the hard draw: sample i drew candidate ``indices[i]`` of
        concept ``concepts[i]``, with probability softmax(π)[k] (the Gumbel-max draw; τ does not
        change which row wins), and scored ``losses[i]``. Then
        ∇_π E_k[ℓ(k)] = E_k[(ℓ(k) − b)(onehot(k) − softmax(π))] for any b that does not depend
        on the draw. b is the mean of the batch's other samples of the same concept; a sample
        alone in its concept takes the concept's running mean of ℓ over earlier steps
        (:attr:`baseline`, an exponential mean with decay :data:`BASELINE_DECAY`), and adds no
        gradient before the concept has any history. The sum over samples is divided by the
        batch size, as the pathwise gradient of the batch-mean loss is.

        Data-parallel: the ranks' (concept, draw, ℓ) are gathered first, so every rank computes
        the estimate of the global batch, exactly what one process computes with that batch
        (a per-rank baseline averaged over ranks is a different estimator)."""
        losses = losses.detach().float().reshape(-1).cpu()
        if self.dist.world > 1:
            parts = self.dist.gather((list(concepts), [int(i) for i in indices], losses.tolist()))
            concepts = [c for part in parts for c in part[0]]
            indices = [i for part in parts for i in part[1]]
            losses = torch.tensor([v for part in parts for v in part[2]], dtype=torch.float32)
        grads: dict[int, torch.Tensor] = {}
        n = len(indices)
        for c in sorted(set(concepts)):
            mine = [i for i in range(n) if concepts[i] == c]
            p = torch.softmax(self.pi[c].detach().float(), 0)
            g = torch.zeros_like(p)
            history = float(self.baseline[c])
            for i in mine:
                others = [losses[j] for j in mine if j != i]
                if others:
                    baseline = sum(others) / len(others)
                elif not math.isnan(history):  # the concept has a running mean
                    baseline = history
                else:
                    continue
                onehot = torch.zeros_like(p)
                onehot[indices[i]] = 1.0
                g += (losses[i] - baseline) * (onehot - p)
            grads[c] = (-g / n).to(self.pi[c].dtype)
            # the running mean moves after the estimate: b never depends on the draw it scores
            mean = float(losses[mine].mean())
            self.baseline[c] = mean if math.isnan(history) else (
                BASELINE_DECAY * history + (1 - BASELINE_DECAY) * mean)
        return grads

    def step(self, grads: dict[int, torch.Tensor], scaler=None) -> None:
        """Step the π's along ``grads`` (concept → gradient of the loss to minimise).

        ``scaler``: the loss scaler the gradients were scaled by (default: the search scaler;
        pass θ′'s for gradients of the θ′ backward, whose update then follows in
        :meth:`~ap_erase_fast.update.ThetaUpdate.step`; ``False`` for unscaled gradients). A
        step of non-finite fp16 gradients is skipped. Data-parallel: gradients are averaged over ranks (a π no rank drew keeps no
        gradient, as in a single process), so π and its Adam state stay identical everywhere.
        Under ``--search random`` π is never stepped: it stays uniform, every draw is uniform.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.search == "random":
            return
        if self.dist.world > 1:
            flat = torch.cat([grads[c].detach().float().reshape(-1) if c in grads
                              else torch.zeros(len(p), device=p.device)
                              for c, p in enumerate(self.pi)])
            used = torch.tensor([1.0 if c in grads else 0.0 for c in range(len(self.pi))])
            flat = self.dist.mean_(flat.cpu()).to(self.pi[0].device)
            used = self.dist.mean_(used)
            sizes = [len(p) for p in self.pi]
            grads = {c: g.view_as(self.pi[c]) for c, g in enumerate(flat.split(sizes))
                     if used[c] > 0}
        for c, g in grads.items():
            self.pi[c].grad = g
        if scaler is False:  # gradients that no loss scale touched (the score estimator)
            self.optimizer.step()
        elif scaler is None or scaler is self.scaler:
            scaled_step(self.scaler, self.optimizer, self.skipped, "pi")
        else:  # θ′'s scaler: its update follows in ThetaUpdate.step
            scaler.step(self.optimizer)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "baseline": self.baseline.clone()}


def draw_distribution(pi: torch.Tensor, mode: str = "hard", tau: float = 2.0, topk: int | None = None,
                      samples: int = 4096, seed: int = 0) -> torch.Tensor:
    """What π makes the search preserve: the expected weight of each candidate in the drawn c_a.

    * ``hard``: the probability that the Gumbel-max draw picks candidate k, softmax(π)_k exactly.
      τ does not enter: argmax_k (π_k + g_k)/τ = argmax_k (π_k + g_k).
    * ``soft`` / ``topk``: E_g[w_k(g)], the mixture weight candidate k gets, averaged over
      ``samples`` Gumbel draws of a fixed generator (``seed``), so the same π always reports the
      same numbers. softmax(π/τ) is *not* this: it is the weight of a draw with no noise at all.
    """
    from .ops.reference import gumbel_from_uniform, gumbel_scores, mix_weights

    logits = pi.detach().double().reshape(-1)
    if mode == "hard":
        return torch.softmax(logits, 0)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand((samples, logits.numel()), generator=gen, dtype=torch.float64)
    z = gumbel_scores(logits[None], gumbel_from_uniform(u), tau)
    return mix_weights(z, topk if mode == "topk" else None).mean(0)


def scaled_step(scaler, optimizer, skipped: Counter, name: str) -> None:
    """``optimizer.step()`` through a (possibly disabled) GradScaler; counts skipped steps."""
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    if scale is not None and scaler.get_scale() < scale:
        skipped[name] += 1
