"""Loop-iteration strategies over an :class:`~ap_erase_fast.engine.Eraser`.

All three consume the same randomness plan and compute AP's loss terms (ALGORITHM.md §5):

* :func:`reference_iteration` — the authors' cost structure, computed the slow way;
* :func:`fast_iteration` — the same faithful iteration without waste (batched, π-only backward);
* :func:`shared_outer_step` — the "shared" schedule: one sampled batch per outer step.

Each returns log records (without ``iter``/``step``, which the engine adds).
"""
from __future__ import annotations

import torch

from .objective import erasure_loss, preservation_loss
from .sampling import sample_until


def _losses(er, cfg, e_erased, e_null, e_concept, z, e_adv, e_ref, z_r, alpha):
    l_erase = None
    if e_erased is not None:
        l_erase = erasure_loss(e_erased, e_null, e_concept, z, alpha, cfg.negative_guidance,
                               cfg.loss_space)
    l_pres = preservation_loss(e_adv, e_ref, z_r, alpha, cfg.loss_space)
    return l_erase, l_pres


def reference_iteration(er) -> dict:
    """Everything the authors compute, in both kinds of iteration, with their call pattern."""
    cfg, tables = er.cfg, er.tables
    outer = er.iteration % cfg.pgd_steps == 0
    d = er.draw()
    emb_null, emb_e = er.prompt_embeddings(d.concept)
    c_a, adv_index = er.draw_adversarial(d.concept, d.gumbel)
    x_T = d.x_T.to(er.device)
    with torch.no_grad():
        sampler = er.unet_fn("trained", "sampling")
        z = sample_until(sampler, x_T, emb_e, emb_null, tables, d.t_enc, cfg.start_guidance)
        z_r = sample_until(sampler, x_T, c_a.detach(), emb_null, tables, d.t_enc,
                           cfg.start_guidance)
        e_null = er.query("frozen", "frozen", z, d.t_ddpm, emb_null)
        e_concept = er.query("frozen", "frozen", z, d.t_ddpm, emb_e)
        e_ref = er.query("frozen", "frozen", z_r, d.t_ddpm, c_a.detach())
    e_erased = er.query("trained", "grad", z, d.t_ddpm, emb_e)
    e_adv = er.query("trained", "grad", z_r, d.t_ddpm, c_a)
    l_erase, l_pres = _losses(er, cfg, e_erased, e_null, e_concept, z, e_adv, e_ref, z_r,
                              tables.x0_alpha(d.t_enc))
    loss = l_erase + cfg.preserve_weight * l_pres if outer else -l_pres
    rec = er.record(d, "outer" if outer else "inner", adv_index, loss, l_erase, l_pres)
    # every backward fills gradients for all of θ' (and π); only one optimizer steps
    er.optimizer.zero_grad(set_to_none=True)
    er.pi_optimizer.zero_grad(set_to_none=True)
    er.unet.zero_grad(set_to_none=True)
    loss.backward()
    (er.optimizer if outer else er.pi_optimizer).step()
    return rec


def fast_iteration(er) -> dict:
    """A faithful iteration computing only what its update needs.

    Outer: both trajectories in one batch-4 UNet call per DDIM step, the three frozen queries
    in one call, the two θ' queries in one call, a backward into the trained tensors only.
    Search: only the z_r trajectory, θ(z_r, c_a) and θ'(z_r, c_a), and a backward into π only.
    """
    cfg, tables = er.cfg, er.tables
    outer = er.iteration % cfg.pgd_steps == 0
    d = er.draw()
    emb_null, emb_e = er.prompt_embeddings(d.concept)
    x_T = d.x_T.to(er.device)
    alpha = tables.x0_alpha(d.t_enc)
    if outer:
        with torch.no_grad():
            c_a, adv_index = er.draw_adversarial(d.concept, d.gumbel)
            z, z_r = er.sample(x_T, torch.cat([emb_e, c_a]), d.t_enc).chunk(2)
            e_null, e_concept, e_ref = er.query(
                "frozen", "frozen", torch.cat([z, z, z_r]), d.t_ddpm,
                torch.cat([emb_null, emb_e, c_a])).chunk(3)
        e_erased, e_adv = er.query("trained", "grad", torch.cat([z, z_r]), d.t_ddpm,
                                   torch.cat([emb_e, c_a])).chunk(2)
        l_erase, l_pres = _losses(er, cfg, e_erased, e_null, e_concept, z, e_adv, e_ref, z_r,
                                  alpha)
        loss = l_erase + cfg.preserve_weight * l_pres
        rec = er.record(d, "outer", adv_index, loss, l_erase, l_pres)
        er.step_optimizer(loss)
        return rec

    c_a, adv_index = er.draw_adversarial(d.concept, d.gumbel)
    with torch.no_grad():
        z_r = er.sample(x_T, c_a.detach(), d.t_enc)
        e_ref = er.query("frozen", "frozen", z_r, d.t_ddpm, c_a.detach())
    loss, l_pres, grad = _search_gradient(er, z_r, d.t_ddpm, c_a, e_ref, alpha, d.concept)
    rec = er.record(d, "inner", adv_index, loss, None, l_pres)
    er.step_pi(d.concept, grad)
    return rec


def _search_gradient(er, z_r, t_ddpm, c_a, e_ref, alpha, concept):
    """−L_pres and its gradient in π alone: θ' runs with its trained tensors marked as not
    requiring grad, so the graph (and its recomputation under gradient checkpointing) reaches
    π only, through c_a."""
    with er.trained_tensors_frozen():
        e_adv = er.query("trained", "grad", z_r, t_ddpm, c_a)
        _, l_pres = _losses(er, er.cfg, None, None, None, None, e_adv, e_ref, z_r, alpha)
        loss = -l_pres
        er.check_finite(loss)
        (grad,) = torch.autograd.grad(loss, er.pi[concept])
    return loss, l_pres, grad


def shared_outer_step(er) -> list[dict]:
    """The "shared" schedule (ALGORITHM.md §6): one draw, one batch-4 trajectory pass and one
    frozen-output cache per outer step serve both the θ' update and the π update.

    With P = 2 a single forward/backward of L = L_erase + λ·L_pres gives θ' its descent gradient
    and π its ascent gradient (∂L/∂π = λ·∂L_pres/∂π; π steps along −∂L_pres/∂π, as the faithful
    search step does), evaluated at the same point: simultaneous gradient descent-ascent. Each
    further search step (P > 2) draws new Gumbel noise and reuses z and z_r, querying θ and θ' at
    the new c_a. With λ = 0 π gets no gradient and is left as it is.
    """
    cfg, tables = er.cfg, er.tables
    d = er.draw()
    emb_null, emb_e = er.prompt_embeddings(d.concept)
    x_T = d.x_T.to(er.device)
    alpha = tables.x0_alpha(d.t_enc)
    pi = er.pi[d.concept]

    c_a, adv_index = er.draw_adversarial(d.concept, d.gumbel)
    with torch.no_grad():
        z, z_r = er.sample(x_T, torch.cat([emb_e, c_a.detach()]), d.t_enc).chunk(2)
        e_null, e_concept, e_ref = er.query(
            "frozen", "frozen", torch.cat([z, z, z_r]), d.t_ddpm,
            torch.cat([emb_null, emb_e, c_a.detach()])).chunk(3)
    e_erased, e_adv = er.query("trained", "grad", torch.cat([z, z_r]), d.t_ddpm,
                               torch.cat([emb_e, c_a])).chunk(2)
    l_erase, l_pres = _losses(er, cfg, e_erased, e_null, e_concept, z, e_adv, e_ref, z_r, alpha)
    loss = l_erase + cfg.preserve_weight * l_pres
    records = [er.record(d, "shared", adv_index, loss, l_erase, l_pres)]
    er.optimizer.zero_grad(set_to_none=True)
    pi.grad = None
    loss.backward()
    pi_grad = pi.grad
    er.optimizer.step()
    if cfg.preserve_weight != 0 and pi_grad is not None:
        er.step_pi(d.concept, -pi_grad / cfg.preserve_weight)

    for _ in range(cfg.pgd_steps - 2):
        gumbel = er.plan.draw_gumbel(len(er.sets[d.concept].words))
        c_a, adv_index = er.draw_adversarial(d.concept, gumbel)
        with torch.no_grad():
            e_ref = er.query("frozen", "frozen", z_r, d.t_ddpm, c_a.detach())
        loss, l_pres, grad = _search_gradient(er, z_r, d.t_ddpm, c_a, e_ref, alpha, d.concept)
        records.append(er.record(d, "inner", adv_index, loss, None, l_pres))
        er.step_pi(d.concept, grad)
    return records
