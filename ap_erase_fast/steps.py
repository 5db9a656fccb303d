"""Loop-iteration strategies.

All three consume the same randomness plan and compute AP's loss terms (ALGORITHM.md §5) for a
batch of B samples (B = 1 is the authors' setting; B > 1 comes from ``--batch-size`` or from
data-parallel ranks). Every sample has its own erased concept, Gumbel noise, t_ddpm and x_T; the
trajectory length t_enc is shared. Loss terms are means over samples of the per-sample MSEs.

* :func:`reference_iteration` — the authors' cost structure, computed the slow way;
* :func:`fast_iteration` — the same faithful iteration without waste (batched, π-only backward);
* :func:`shared_outer_step` — the "shared" schedule: one sampled batch per outer step.

Each receives a :class:`StepContext` (the model calls, the search, the θ′ update and the
settings: what an iteration uses, not the engine) and returns the losses of its updates; the
engine turns them into log records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .backbones import Cond
from .objective import erasure_loss, preservation_loss
from .sampling import sample_until


@dataclass
class StepContext:
    cfg: "object"  # EraseConfig
    models: "object"  # calls.ModelCalls
    search: "object"  # search.Search
    theta: "object"  # update.ThetaUpdate
    check_finite: Callable[[torch.Tensor], None]
    draw_gumbel: Callable[[int, int], torch.Tensor]  # (slot, |R|) → fresh Gumbel noise
    encode: Callable[[str], Cond] | None = None  # the reference profile re-encodes prompts
    trajectories: "object" = None  # trajectories.SampledTrajectories or TrajectoryBank


@dataclass
class StepResult:
    kind: str  # "outer", "inner" or "shared"
    loss: torch.Tensor
    loss_erase: torch.Tensor | None
    loss_preserve: torch.Tensor
    adv_indices: list[int]
    extra_indices: list[list[int]] | None = None  # --preserve-draws K > 1: the further draws


class _Batch:
    """The tensors of one iteration's samples, on the device.

    ``draws`` = K candidates c_a per sample (``--preserve-draws``; the outer update's): the
    adversarial rows (``c_a``, ``adv_all``, ``x_T_a``, ``t_a``, ``members_a``, ``prompts_a``) are
    draw-major, rows k·B … k·B + B − 1 holding the samples' k-th draws, so the first B rows are
    the one-draw batch."""

    def __init__(self, ctx: StepContext, d, pi_grad: bool, draws: int = 1):
        models = ctx.models
        self.samples = d.samples
        self.t_enc = d.t_enc
        self.alpha = models.tables.x0_alpha(d.t_enc)
        picks = [[(s.gumbel, s.bank_index)] + s.extra[:draws - 1] for s in d.samples]
        if any(len(p) < draws for p in picks):
            raise RuntimeError(f"{draws} draws per sample need a randomness plan with "
                               f"{draws - 1} extra draws")
        order = [(i, k) for k in range(draws) for i in range(len(d.samples))]
        drawn = [ctx.search.draw(d.samples[i].concept, picks[i][k][0], with_grad=pi_grad)
                 for i, k in order]
        self.c_a = Cond.cat([c for c, _ in drawn])
        self.adv_all = [j for _, j in drawn]
        self.adv = self.adv_all[:len(d.samples)]
        self.concept_rows = [d.samples[i].concept for i, _ in order]
        self.emb_e = Cond.cat([models.concepts[s.concept] for s in d.samples])
        device = models.backbone.device
        self.x_T = torch.cat([s.x_T for s in d.samples]).to(device)
        self.t = torch.tensor([s.t_ddpm for s in d.samples], dtype=torch.long, device=device)
        self.x_T_a = torch.cat([self.x_T] * draws) if draws > 1 else self.x_T
        self.t_a = torch.cat([self.t] * draws) if draws > 1 else self.t
        self.concepts = sorted({s.concept for s in d.samples})
        # what a trajectory bank reads: each sample's trajectory m and the prompts of c_e, c_a
        src = ctx.trajectories
        self.members = [s.bank_index for s in d.samples]
        self.members_a = [picks[i][k][1] for i, k in order]
        self.prompts_e = self.prompts_a = None
        if hasattr(src, "member_prompts"):
            self.prompts_e = [src.concept_prompts[s.concept] for s in d.samples]
            self.prompts_a = [src.member_prompts[c][j] for c, j in zip(self.concept_rows, self.adv_all)]

    def extra_indices(self) -> list[list[int]] | None:
        """Each sample's further draws (the indices in R), or None with one draw."""
        n = len(self.samples)
        if len(self.adv_all) == n:
            return None
        return [self.adv_all[i + n::n] for i in range(n)]

    def adversarial_latents(self, ctx: "StepContext") -> torch.Tensor:
        """z_r of every adversarial row: the trajectory of its c_a, until t_enc."""
        return ctx.trajectories.sample(self.x_T_a, self.c_a.detach(), self.t_enc, self.prompts_a,
                                       self.members_a)


def _erase_term(cfg, e_erased, e_null, e_concept, z, alpha):
    return erasure_loss(e_erased, e_null, e_concept, z, alpha, cfg.negative_guidance,
                        cfg.loss_space)


def _preserve_term(cfg, e_adv, e_ref, z_r, alpha):
    return preservation_loss(e_adv, e_ref, z_r, alpha, cfg.loss_space)


def reference_iteration(ctx: StepContext, d, outer: bool) -> StepResult:
    """Everything the authors compute, in both kinds of iteration, with their call pattern:
    per sample two batch-2 trajectories, three frozen and two θ' batch-1 queries, prompts
    re-encoded; one backward that fills gradients for all of θ' (and π). With --preserve-draws K
    an outer iteration draws K candidates per sample, each with its own z_r, θ(z_r, c_a) and
    θ'(z_r, c_a), and averages their K preservation errors."""
    cfg, models, search = ctx.cfg, ctx.models, ctx.search
    tables = models.tables
    src = ctx.trajectories
    sampler = models.model_fn("frozen" if cfg.trajectories == "base" else "trained", "sampling")
    device = models.backbone.device
    l_erase, l_pres, adv, extra = [], [], [], []
    alpha = tables.x0_alpha(d.t_enc)
    for s in d.samples:
        emb_null, emb_e = ctx.encode(""), ctx.encode(cfg.erase[s.concept])
        x_T = s.x_T.to(device)
        t = torch.tensor([s.t_ddpm], device=device)
        with torch.no_grad():
            if cfg.trajectories == "bank":  # read, not sampled
                z = src.sample(x_T, emb_e, d.t_enc, [src.concept_prompts[s.concept]], [s.bank_index])
            else:
                z = sample_until(sampler, x_T, emb_e, emb_null, tables, d.t_enc, cfg.start_guidance)
            e_null = models.query("frozen", "frozen", z, t, emb_null)
            e_concept = models.query("frozen", "frozen", z, t, emb_e)
        # the outer update averages the preservation errors of K draws (--preserve-draws)
        drawn, indices = [], []
        for gumbel, member in [(s.gumbel, s.bank_index)] + (s.extra if outer else []):
            c_a, adv_index = search.draw(s.concept, gumbel, with_grad=True)
            indices.append(adv_index)
            with torch.no_grad():
                if cfg.trajectories == "bank":
                    z_r = src.sample(x_T, c_a, d.t_enc, [src.member_prompts[s.concept][adv_index]],
                                     [member])
                else:
                    z_r = sample_until(sampler, x_T, c_a.detach(), emb_null, tables, d.t_enc,
                                       cfg.start_guidance)
                e_ref = models.query("frozen", "frozen", z_r, t, c_a.detach())
            if not outer and cfg.search_score == "normalised":
                with torch.no_grad():
                    e_null_r = models.query("frozen", "frozen", z_r, t, emb_null)
                c_a = normalised_score(cfg, c_a, e_ref, e_null_r, z_r, alpha)
            drawn.append((c_a, z_r, e_ref))
        e_erased = models.query("trained", "grad", z, t, emb_e)
        l_erase.append(_erase_term(cfg, e_erased, e_null, e_concept, z, alpha))
        terms = [_preserve_term(cfg, models.query("trained", "grad", z_r, t, c_a), e_ref, z_r, alpha)
                 for c_a, z_r, e_ref in drawn]
        adv.append(indices[0])
        extra.append(indices[1:])
        l_pres.append(torch.stack(terms).mean() if len(terms) > 1 else terms[0])
    l_erase_m, l_pres_m = torch.stack(l_erase).mean(), torch.stack(l_pres).mean()
    loss = l_erase_m + cfg.preserve_weight * l_pres_m if outer else -l_pres_m
    ctx.check_finite(loss)
    ctx.theta.optimizer.zero_grad(set_to_none=True)
    search.optimizer.zero_grad(set_to_none=True)
    models.backbone.denoiser.zero_grad(set_to_none=True)
    loss.backward()
    if outer:
        ctx.theta.step()
    else:  # through search.step, which leaves π alone under --search random
        concepts = sorted({s.concept for s in d.samples})
        search.step({c: search.pi[c].grad for c in concepts if search.pi[c].grad is not None})
    return StepResult("outer" if outer else "inner", loss, l_erase_m, l_pres_m, adv,
                      extra if any(extra) else None)


def fast_iteration(ctx: StepContext, d, outer: bool) -> StepResult:
    """A faithful iteration computing only what its update needs.

    Outer: both trajectories of every sample in one UNet call per DDIM step, the three frozen
    queries in one call, the two θ' queries in one call, a backward into the trained tensors.
    Search: only the z_r trajectories, θ(z_r, c_a) and θ'(z_r, c_a), a backward into π only.
    """
    if outer:
        with torch.no_grad():
            b = _Batch(ctx, d, pi_grad=False, draws=ctx.cfg.preserve_draws)
        l_erase, l_pres, _ = _joint_terms(ctx, b)
        loss = l_erase + ctx.cfg.preserve_weight * l_pres
        ctx.check_finite(loss)
        ctx.theta(loss)
        return StepResult("outer", loss, l_erase, l_pres, b.adv, b.extra_indices())

    if ctx.cfg.search_estimator == "score":
        with torch.no_grad():
            b = _Batch(ctx, d, pi_grad=False)
            z_r = b.adversarial_latents(ctx)
        loss, l_pres = _score_estimator_step(ctx, b, z_r)
        return StepResult("inner", loss, None, l_pres, b.adv)
    b = _Batch(ctx, d, pi_grad=True)
    with torch.no_grad():
        z_r = b.adversarial_latents(ctx)
    e_ref = _frozen_on_adversarial(ctx, b, z_r)
    loss, l_pres, grads = _search_gradient(ctx, b, z_r, e_ref)
    ctx.search.step(grads)
    return StepResult("inner", loss, None, l_pres, b.adv)


def _per_sample_preservation(cfg, e_adv, e_ref, z_r, alpha) -> torch.Tensor:
    """ℓ_i of every sample [B] (detached): the preservation error of its drawn candidate."""
    with torch.no_grad():
        return torch.stack([_preserve_term(cfg, e_adv[i:i + 1].detach(), e_ref[i:i + 1], z_r[i:i + 1], alpha)
                            for i in range(len(z_r))]).float()


def _score_estimator_step(ctx: StepContext, b: _Batch, z_r):
    """A search step under ``--search-estimator score``: θ(z_r, c_a) and θ'(z_r, c_a) without any
    graph, each sample's error ℓ_i, and π stepped along the score-function estimate of
    ∇_π E_k[ℓ(k)] (:meth:`~ap_erase_fast.search.Search.score_gradients`). Returns (−L_pres, L_pres)."""
    with torch.no_grad():
        e_ref = ctx.models.query("frozen", "frozen", z_r, b.t_a, b.c_a)
        e_adv = ctx.models.query("trained", "grad", z_r, b.t_a, b.c_a)
        each = _per_sample_preservation(ctx.cfg, e_adv, e_ref, z_r, b.alpha)
    l_pres = each.mean()
    ctx.check_finite(l_pres)
    ctx.search.step(ctx.search.score_gradients(b.concept_rows, b.adv_all, each), scaler=False)
    return -l_pres, l_pres


def _joint_terms(ctx: StepContext, b: _Batch):
    """Trajectories, frozen cache and θ' queries of the outer update for batch ``b`` (its B
    samples' z and every adversarial row's z_r; the preservation term is the mean over all of
    them, so K draws per sample average their K errors). Returns (L_erase, L_pres, z_r)."""
    models = ctx.models
    n, na = len(b.samples), len(b.adv_all)
    null = models.null.expand(n)
    with torch.no_grad():
        z_all = ctx.trajectories.sample(
            torch.cat([b.x_T, b.x_T_a]), Cond.cat([b.emb_e, b.c_a.detach()]), b.t_enc,
            b.prompts_e + b.prompts_a if b.prompts_e is not None else None, b.members + b.members_a)
        z, z_r = z_all[:n], z_all[n:]
        e_null, e_concept, e_ref = models.query(
            "frozen", "frozen", torch.cat([z, z, z_r]), torch.cat([b.t, b.t, b.t_a]),
            Cond.cat([null, b.emb_e, b.c_a.detach()])).split([n, n, na])
    if b.c_a.requires_grad:  # the shared schedule's π gradient comes out of this loss
        _score_search(ctx, b, z_r, e_ref)
    e_erased, e_adv = models.query("trained", "grad", torch.cat([z, z_r]), torch.cat([b.t, b.t_a]),
                                   Cond.cat([b.emb_e, b.c_a])).split([n, na])
    l_erase = _erase_term(ctx.cfg, e_erased, e_null, e_concept, z, b.alpha)
    l_pres = _preserve_term(ctx.cfg, e_adv, e_ref, z_r, b.alpha)
    if ctx.cfg.search_estimator == "score":  # the shared schedule's score-function π step reads them
        b.pres_each = _per_sample_preservation(ctx.cfg, e_adv, e_ref, z_r, b.alpha)
    return l_erase, l_pres, z_r


def _frozen_on_adversarial(ctx: StepContext, b: _Batch, z_r):
    """θ(z_r, c_a) for a search step, with c_a's π gradient scored as ``--search-score`` says."""
    with torch.no_grad():
        e_ref = ctx.models.query("frozen", "frozen", z_r, b.t_a, b.c_a.detach())
    _score_search(ctx, b, z_r, e_ref)
    return e_ref


def _score_search(ctx: StepContext, b: _Batch, z_r, e_ref):
    """Under ``--search-score normalised`` replace ``b.c_a`` by the same values whose gradient
    into π is divided, per sample, by the candidate's signal at z_r (one more frozen call, on
    its own so that the other frozen outputs, and with them θ′'s update, stay bit-identical)."""
    if ctx.cfg.search_score != "normalised":
        return
    with torch.no_grad():
        e_null_r = ctx.models.query("frozen", "frozen", z_r, b.t_a, ctx.models.null.expand(len(z_r)))
    b.c_a = normalised_score(ctx.cfg, b.c_a, e_ref, e_null_r, z_r, b.alpha)


def normalised_score(cfg, c_a: Cond, e_ref, e_null_r, z_r, alpha) -> Cond:
    """``c_a`` (B prompts) whose backward scales sample i's gradient by 1 / s_i, where
    s_i = ‖θ(z_r, c_a) − θ(z_r, "")‖² (mean over elements, in the loss space) is the drawn
    candidate's own signal: π then ascends Σ_i ℓ_i / s_i, the damage relative to what each
    concept has to lose, instead of Σ_i ℓ_i. The forward is untouched, and θ′'s gradient does not
    pass through c_a, so only the search changes."""
    signal = torch.stack([preservation_loss(e_ref[i:i + 1], e_null_r[i:i + 1], z_r[i:i + 1], alpha,
                                            cfg.loss_space).float() for i in range(len(z_r))])
    weight = 1.0 / signal.clamp_min(1e-12)
    return Cond(tuple(_ScaleGrad.apply(p, weight) for p in c_a.parts))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies row i of the gradient by ``weight[i]``."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * weight.view(-1, *[1] * (grad.dim() - 1)).to(grad.dtype), None


def _search_gradient(ctx: StepContext, b: _Batch, z_r, e_ref):
    """−L_pres and its gradient in the π's of the batch's concepts alone: θ' runs with its
    trained tensors marked as not requiring grad, so the graph (and its recomputation under
    gradient checkpointing) reaches π only, through c_a."""
    with trained_tensors_frozen(ctx.theta.params):
        e_adv = ctx.models.query("trained", "grad", z_r, b.t_a, b.c_a)
        l_pres = _preserve_term(ctx.cfg, e_adv, e_ref, z_r, b.alpha)
        loss = -l_pres
        ctx.check_finite(loss)
        grads = ctx.search.gradients(loss, b.concepts)
    return loss, l_pres, grads


class trained_tensors_frozen:
    """θ' forwards inside build no graph into the trained tensors (π-only backward)."""

    def __init__(self, params):
        self.params = params

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def shared_outer_step(ctx: StepContext, d) -> list[StepResult]:
    """The "shared" schedule (ALGORITHM.md §6): one draw, one trajectory pass and one
    frozen-output cache per outer step serve both the θ' update and the π update.

    With P = 2 a single forward/backward of L = L_erase + λ·L_pres gives θ' its descent gradient
    and π its ascent gradient (∂L/∂π = λ·∂L_pres/∂π; π steps along −∂L_pres/∂π, as the faithful
    search step does), evaluated at the same point: simultaneous gradient descent-ascent. Each
    further search step (P > 2) draws new Gumbel noise and reuses z and z_r, querying θ and θ' at
    the new c_a. With λ = 0 π gets no gradient and is left as it is.
    """
    cfg, search, theta = ctx.cfg, ctx.search, ctx.theta
    score = cfg.search_estimator == "score"
    b = _Batch(ctx, d, pi_grad=not score, draws=cfg.preserve_draws)
    l_erase, l_pres, z_r = _joint_terms(ctx, b)
    z_r = z_r[:len(b.samples)]  # the further search steps query the first draw's trajectories
    loss = l_erase + cfg.preserve_weight * l_pres
    ctx.check_finite(loss)
    results = [StepResult("shared", loss, l_erase, l_pres, b.adv, b.extra_indices())]
    pis = [search.pi[c] for c in b.concepts]
    for p in pis:
        p.grad = None
    theta.backward(loss)  # also fills the π gradients: λ·∂L_pres/∂π (loss-scaled in fp16)
    if cfg.preserve_weight != 0 and score:
        search.step(search.score_gradients(b.concept_rows, b.adv_all, b.pres_each), scaler=False)
    elif cfg.preserve_weight != 0:
        search.step({c: -search.pi[c].grad / cfg.preserve_weight
                     for c in b.concepts if search.pi[c].grad is not None}, scaler=theta.scaler)
    theta.step()

    for _ in range(cfg.pgd_steps - 2):
        for s in b.samples:
            s.gumbel = ctx.draw_gumbel(s.slot, len(search.sets[s.concept].words))
        b = _Batch(ctx, d, pi_grad=not score)
        if score:
            loss, l_pres = _score_estimator_step(ctx, b, z_r)
        else:
            e_ref = _frozen_on_adversarial(ctx, b, z_r)
            loss, l_pres, grads = _search_gradient(ctx, b, z_r, e_ref)
            search.step(grads)
        results.append(StepResult("inner", loss, None, l_pres, b.adv))
    return results
