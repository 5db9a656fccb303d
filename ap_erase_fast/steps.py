"""Loop-iteration strategies over an :class:`~ap_erase_fast.engine.Eraser`.

All three consume the same randomness plan and compute AP's loss terms (ALGORITHM.md §5) for a
batch of B samples (B = 1 is the authors' setting; B > 1 comes from ``--batch-size`` or from
data-parallel ranks). Every sample has its own erased concept, Gumbel noise, t_ddpm and x_T; the
trajectory length t_enc is shared. Loss terms are means over samples of the per-sample MSEs.

* :func:`reference_iteration` — the authors' cost structure, computed the slow way;
* :func:`fast_iteration` — the same faithful iteration without waste (batched, π-only backward);
* :func:`shared_outer_step` — the "shared" schedule: one sampled batch per outer step.

Each returns the losses of the update; the engine turns them into log records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import erasure_loss, preservation_loss
from .sampling import sample_until


@dataclass
class StepResult:
    kind: str  # "outer", "inner" or "shared"
    loss: torch.Tensor
    loss_erase: torch.Tensor | None
    loss_preserve: torch.Tensor
    adv_indices: list[int]


class _Batch:
    """The tensors of one iteration's samples, on the device."""

    def __init__(self, er, d, pi_grad: bool):
        self.samples = d.samples
        self.t_enc = d.t_enc
        self.alpha = er.tables.x0_alpha(d.t_enc)
        draws = [er.draw_adversarial(s.concept, s.gumbel, with_grad=pi_grad) for s in d.samples]
        self.c_a = torch.cat([c for c, _ in draws])
        self.adv = [i for _, i in draws]
        self.emb_e = torch.cat([er.emb_concepts[s.concept] for s in d.samples])
        self.x_T = torch.cat([s.x_T for s in d.samples]).to(er.device)
        self.t = torch.tensor([s.t_ddpm for s in d.samples], dtype=torch.long, device=er.device)
        self.concepts = sorted({s.concept for s in d.samples})


def _erase_term(er, e_erased, e_null, e_concept, z, alpha):
    return erasure_loss(e_erased, e_null, e_concept, z, alpha, er.cfg.negative_guidance,
                        er.cfg.loss_space)


def _preserve_term(er, e_adv, e_ref, z_r, alpha):
    return preservation_loss(e_adv, e_ref, z_r, alpha, er.cfg.loss_space)


def reference_iteration(er, d) -> StepResult:
    """Everything the authors compute, in both kinds of iteration, with their call pattern:
    per sample two batch-2 trajectories, three frozen and two θ' batch-1 queries, prompts
    re-encoded; one backward that fills gradients for all of θ' (and π)."""
    cfg, tables = er.cfg, er.tables
    outer = er.iteration % cfg.pgd_steps == 0
    sampler = er.unet_fn("trained", "sampling")
    l_erase, l_pres, adv = [], [], []
    for s in d.samples:
        emb_null, emb_e = er.encode(""), er.encode(cfg.erase[s.concept])
        c_a, adv_index = er.draw_adversarial(s.concept, s.gumbel, with_grad=True)
        adv.append(adv_index)
        x_T = s.x_T.to(er.device)
        t = torch.tensor([s.t_ddpm], device=er.device)
        with torch.no_grad():
            z = sample_until(sampler, x_T, emb_e, emb_null, tables, d.t_enc, cfg.start_guidance)
            z_r = sample_until(sampler, x_T, c_a.detach(), emb_null, tables, d.t_enc,
                               cfg.start_guidance)
            e_null = er.query("frozen", "frozen", z, t, emb_null)
            e_concept = er.query("frozen", "frozen", z, t, emb_e)
            e_ref = er.query("frozen", "frozen", z_r, t, c_a.detach())
        e_erased = er.query("trained", "grad", z, t, emb_e)
        e_adv = er.query("trained", "grad", z_r, t, c_a)
        alpha = tables.x0_alpha(d.t_enc)
        l_erase.append(_erase_term(er, e_erased, e_null, e_concept, z, alpha))
        l_pres.append(_preserve_term(er, e_adv, e_ref, z_r, alpha))
    l_erase_m, l_pres_m = torch.stack(l_erase).mean(), torch.stack(l_pres).mean()
    loss = l_erase_m + cfg.preserve_weight * l_pres_m if outer else -l_pres_m
    er.check_finite(loss)
    er.optimizer.zero_grad(set_to_none=True)
    er.pi_optimizer.zero_grad(set_to_none=True)
    er.unet.zero_grad(set_to_none=True)
    loss.backward()
    if outer:
        er.step_theta()
    else:  # through step_pi, which leaves π alone under --search random
        concepts = sorted({s.concept for s in d.samples})
        er.step_pi({c: er.pi[c].grad for c in concepts if er.pi[c].grad is not None})
    return StepResult("outer" if outer else "inner", loss, l_erase_m, l_pres_m, adv)


def fast_iteration(er, d) -> StepResult:
    """A faithful iteration computing only what its update needs.

    Outer: both trajectories of every sample in one UNet call per DDIM step, the three frozen
    queries in one call, the two θ' queries in one call, a backward into the trained tensors.
    Search: only the z_r trajectories, θ(z_r, c_a) and θ'(z_r, c_a), a backward into π only.
    """
    outer = er.iteration % er.cfg.pgd_steps == 0
    if outer:
        with torch.no_grad():
            b = _Batch(er, d, pi_grad=False)
        l_erase, l_pres, _ = _joint_terms(er, b)
        loss = l_erase + er.cfg.preserve_weight * l_pres
        er.check_finite(loss)
        er.step_optimizer(loss)
        return StepResult("outer", loss, l_erase, l_pres, b.adv)

    b = _Batch(er, d, pi_grad=True)
    with torch.no_grad():
        z_r = er.sample(b.x_T, b.c_a.detach(), b.t_enc)
        e_ref = er.query("frozen", "frozen", z_r, b.t, b.c_a.detach())
    loss, l_pres, grads = _search_gradient(er, b, z_r, e_ref)
    er.step_pi(grads)
    return StepResult("inner", loss, None, l_pres, b.adv)


def _joint_terms(er, b: _Batch):
    """Trajectories, frozen cache and θ' queries of the outer update for batch ``b``."""
    n = len(b.samples)
    null = er.emb_null.expand(n, *er.emb_null.shape[1:])
    with torch.no_grad():
        z_all = er.sample(torch.cat([b.x_T, b.x_T]), torch.cat([b.emb_e, b.c_a.detach()]),
                          b.t_enc)
        z, z_r = z_all[:n], z_all[n:]
        e_null, e_concept, e_ref = er.query(
            "frozen", "frozen", torch.cat([z, z, z_r]), torch.cat([b.t, b.t, b.t]),
            torch.cat([null, b.emb_e, b.c_a.detach()])).split(n)
    e_erased, e_adv = er.query("trained", "grad", torch.cat([z, z_r]), torch.cat([b.t, b.t]),
                               torch.cat([b.emb_e, b.c_a])).split(n)
    l_erase = _erase_term(er, e_erased, e_null, e_concept, z, b.alpha)
    l_pres = _preserve_term(er, e_adv, e_ref, z_r, b.alpha)
    return l_erase, l_pres, z_r


def _search_gradient(er, b: _Batch, z_r, e_ref):
    """−L_pres and its gradient in the π's of the batch's concepts alone: θ' runs with its
    trained tensors marked as not requiring grad, so the graph (and its recomputation under
    gradient checkpointing) reaches π only, through c_a."""
    with er.trained_tensors_frozen():
        e_adv = er.query("trained", "grad", z_r, b.t, b.c_a)
        l_pres = _preserve_term(er, e_adv, e_ref, z_r, b.alpha)
        loss = -l_pres
        er.check_finite(loss)
        grads = er.search_gradients(loss, [er.pi[c] for c in b.concepts])
    return loss, l_pres, dict(zip(b.concepts, grads))


def shared_outer_step(er, d) -> list[StepResult]:
    """The "shared" schedule (ALGORITHM.md §6): one draw, one trajectory pass and one
    frozen-output cache per outer step serve both the θ' update and the π update.

    With P = 2 a single forward/backward of L = L_erase + λ·L_pres gives θ' its descent gradient
    and π its ascent gradient (∂L/∂π = λ·∂L_pres/∂π; π steps along −∂L_pres/∂π, as the faithful
    search step does), evaluated at the same point: simultaneous gradient descent-ascent. Each
    further search step (P > 2) draws new Gumbel noise and reuses z and z_r, querying θ and θ' at
    the new c_a. With λ = 0 π gets no gradient and is left as it is.
    """
    cfg = er.cfg
    b = _Batch(er, d, pi_grad=True)
    l_erase, l_pres, z_r = _joint_terms(er, b)
    loss = l_erase + cfg.preserve_weight * l_pres
    er.check_finite(loss)
    results = [StepResult("shared", loss, l_erase, l_pres, b.adv)]
    pis = [er.pi[c] for c in b.concepts]
    for p in pis:
        p.grad = None
    er.backward(loss)  # also fills the π gradients: λ·∂L_pres/∂π (loss-scaled in fp16)
    if cfg.preserve_weight != 0:
        er.step_pi({c: -er.pi[c].grad / cfg.preserve_weight
                    for c in b.concepts if er.pi[c].grad is not None}, scaler=er.scaler)
    er.step_theta()

    for _ in range(cfg.pgd_steps - 2):
        for s in b.samples:
            s.gumbel = er.plan.draw_gumbel(s.slot, len(er.sets[s.concept].words))
        b = _Batch(er, d, pi_grad=True)
        with torch.no_grad():
            e_ref = er.query("frozen", "frozen", z_r, b.t, b.c_a.detach())
        loss, l_pres, grads = _search_gradient(er, b, z_r, e_ref)
        er.step_pi(grads)
        results.append(StepResult("inner", loss, None, l_pres, b.adv))
    return results
