"""Checks that follow from AP's definitions (ALGORITHM.md §5), in every profile × schedule ×
compute dtype the command line accepts.

The model is the tiny one with every UNet tensor perturbed by fp32 noise, so that no norm weight
or bias is exactly representable in bf16 or fp16: a θ that is not exactly θ′₀ (say, the frozen
copy of a norm weight rounded to the compute dtype) shows up as a non-zero first preservation
term.
"""
import pytest
import torch
import torch.nn.functional as F

from ap_erase_fast.backbones import Cond
from ap_erase_fast.engine import Eraser
from ap_erase_fast.objective import erasure_loss, preservation_loss
from ap_erase_fast.steps import fast_iteration, reference_iteration, shared_outer_step

# (profile, schedule, mixed precision): every combination validate() accepts
COMBOS = [("reference", "faithful", "no"),
          ("fast", "faithful", "no"), ("fast", "faithful", "bf16"), ("fast", "faithful", "fp16"),
          ("fast", "shared", "no"), ("fast", "shared", "bf16"), ("fast", "shared", "fp16")]
IDS = ["-".join(c) for c in COMBOS]


def _perturbed_tiny():
    from ap_erase_fast.models import load_components

    comp = load_components("tiny")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in comp.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return comp


def _eraser(tiny_cfg, combo, **kw):
    profile, schedule, mp = combo
    cfg = tiny_cfg(profile=profile, schedule=schedule, mixed_precision=mp,
                   train_method=kw.pop("train_method", "noxattn"), **kw)
    return Eraser(cfg, components=_perturbed_tiny()).setup()


def _spy_null_queries(er):
    """Record the (z, t) rows of every frozen query made with the empty prompt: the z of each
    sample, in sample order, whatever the batching of the profile."""
    seen = []
    original = er.models.query

    def spy(which, kind, z, t, text):
        if which == "frozen":
            null = er.models.null.flat()[0]
            rows = text.flat()
            for i in range(z.shape[0]):
                if torch.equal(rows[i], null):
                    seen.append((z[i:i + 1].detach().clone(), t[i:i + 1].clone()))
        return original(which, kind, z, t, text)

    er.models.query = spy
    return seen


def first_step_erasure_outputs(er, mp: str):
    """One outer step of a fresh run (θ = θ′₀): checks that its first preservation term is 0
    (exactly in fp32; in fp16/bf16 θ and θ′ run in batches of different make-up, and some CPUs'
    half-precision kernels round by batch: 6e-8 seen on an Intel Xeon) and its erasure term
    positive; returns the step's records and θ's ε(z, c_e), ε(z, "") at the first sample's
    (z, t), from which a caller writes the erasure identity with its backbone's ᾱ."""
    seen = _spy_null_queries(er)
    records = er.run_outer_step()
    first = records[0]
    assert first["loss_erase"] > 0, first
    assert first["loss_preserve"] <= (0.0 if mp == "no" else 1e-3 * first["loss_erase"]), first
    z, t = seen[0]
    cond = er.models.concepts[er.cfg.erase.index(first["samples"][0]["concept"])]
    with torch.no_grad():
        e_c = er.models.query("frozen", "check", z, t, cond)
        e_0 = er.models.query("frozen", "check", z, t, er.models.null)
    return records, e_c, e_0


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_first_step_theta_equals_theta_prime_and_the_erasure_identity(tiny_cfg, combo, batch):
    """At θ′ = θ₀ the preservation term is exactly 0 and the erasure term equals
    w(t)·(1+η)²·mse(ε_θ(z,c_e), ε_θ(z,"")), w = (1−ᾱ)/ᾱ with ᾱ at DDIM index t_enc (taken
    here from the scheduler's own table, not the library's). Every drawn word is a member of R
    and t_ddpm ∈ [20·t_enc, 20·t_enc + 19]. With one sample per step (the authors' setting) the
    preservation term is exactly 0; with two, θ and θ′ see the samples in batches of different
    sizes (3B frozen rows, 2B trained rows), whose CPU kernels may sum in another order, so the
    bound is rounding: ≤ 1e-9 of the erasure term.

    Mutations checked (each fails this test): frozen copies of the trained tensors kept in the
    compute dtype (the old behaviour: fails every bf16 and fp16 case), the target without its
    η term, ᾱ taken 20 DDPM steps later.
    """
    eta = 1.5
    er = _eraser(tiny_cfg, combo, ddim_steps=50, negative_guidance=eta,
                 erase=["garbage truck", "church"], batch_size=batch)
    seen = _spy_null_queries(er)
    records = er.run_outer_step()
    first = records[0]
    assert first["kind"] in ("outer", "shared")
    assert first["loss_erase"] > 0
    if batch == 1:
        assert first["loss_preserve"] == 0.0, first
    else:
        assert first["loss_preserve"] <= 1e-9 * first["loss_erase"], first

    # the erasure identity, with ε_θ recomputed outside the step at the step's own z
    n = len(first["samples"])
    z, t = torch.cat([x for x, _ in seen[:n]]), torch.cat([y for _, y in seen[:n]])
    cond = Cond.cat([er.models.concepts[er.cfg.erase.index(s["concept"])] for s in first["samples"]])
    null = er.models.null.expand(n)
    with torch.no_grad():
        e_c = er.models.query("frozen", "check", z, t, cond)
        e_0 = er.models.query("frozen", "check", z, t, null)
    a = float(er.components.scheduler.alphas_cumprod[(1000 // 50) * first["t_enc"] + 1])
    expected = ((1 - a) / a * (1 + eta) ** 2 * F.mse_loss(e_c, e_0, reduction="none")
                .mean(dim=(1, 2, 3))).mean().item()
    tol = 1e-5 if combo[2] == "no" else 2e-3
    assert first["loss_erase"] == pytest.approx(expected, rel=tol)

    for rec in records + er.run_outer_step():
        lo = 20 * rec["t_enc"]
        for s in rec["samples"]:
            assert s["adv_word"] in er.search.sets[er.cfg.erase.index(s["concept"])].words
            assert lo <= s["t_ddpm"] <= lo + 19


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_random_search_never_moves_pi(tiny_cfg, combo):
    """--search random: π is bit-identical to its initial value after any number of steps
    (the old reference profile stepped π anyway and fails this)."""
    er = _eraser(tiny_cfg, combo, search="random", pgd_steps=3, train_method="xattn")
    pi0 = [p.detach().clone() for p in er.search.pi]
    for p, s in zip(pi0, er.search.sets):  # the authors' initialisation: every logit 1/|R|
        assert torch.equal(p, torch.full((len(s.words),), 1.0 / len(s.words)))
    for _ in range(3):
        er.run_outer_step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(er.search.pi, pi0))
    assert any(not torch.equal(p, er.frozen_tensors[n] if hasattr(er, "frozen_tensors") else
                               dict(er.frozen.named_parameters())[n]) for n, p in er.trained)


def _terms(er, d, z, z_r, e_ref=None):
    """(L_erase, L_pres, θ(z_r, c_a)) of θ′ and π as they are now, at draw ``d`` and fixed
    latents. ``e_ref``: hold the frozen model's output on c_a fixed (the π step's objective: the
    authors detach θ(z_r, c_a), so π ascends mse(θ′(z_r, c_a(π)), θ(z_r, c_a) held))."""
    cfg = er.cfg
    with torch.no_grad():
        c_a = Cond.cat([er.search.draw(s.concept, s.gumbel, with_grad=False)[0]
                        for s in d.samples])
        emb_e = Cond.cat([er.models.concepts[s.concept] for s in d.samples])
        t = torch.tensor([s.t_ddpm for s in d.samples], device=er.device)
        null = er.models.null.expand(len(d.samples))
        alpha = er.tables.x0_alpha(d.t_enc)
        e0 = er.models.query("frozen", "check", z, t, null)
        en = er.models.query("frozen", "check", z, t, emb_e)
        if e_ref is None:
            e_ref = er.models.query("frozen", "check", z_r, t, c_a)
        le = erasure_loss(er.models.query("trained", "check", z, t, emb_e), e0, en, z, alpha,
                          cfg.negative_guidance, cfg.loss_space)
        lp = preservation_loss(er.models.query("trained", "check", z_r, t, c_a), e_ref, z_r, alpha,
                               cfg.loss_space)
    return le.item(), lp.item(), e_ref


def _latents(er, d):
    with torch.no_grad():
        c_a = Cond.cat([er.search.draw(s.concept, s.gumbel, with_grad=False)[0]
                        for s in d.samples])
        emb_e = Cond.cat([er.models.concepts[s.concept] for s in d.samples])
        x_T = torch.cat([s.x_T for s in d.samples])
        return er.models.sample(x_T, emb_e, d.t_enc), er.models.sample(x_T, c_a, d.t_enc)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_updates_move_the_losses_the_right_way(tiny_cfg, combo):
    """On a fixed draw and fixed latents: an outer step lowers L_erase + λ·L_pres (at the π it
    was taken with), a search step raises L_pres (at the θ′ it was taken with), where L_pres
    holds θ(z_r, c_a) at its value before the step, as the authors' π step does (it detaches
    the frozen output; the full L_pres may move either way). Soft draws, so that a π step
    changes c_a continuously (a hard draw has the same gradient, but its forward changes only
    when the argmax flips).

    Mutations checked (each fails it in every combination it reaches): the search gradient's
    sign flipped in fast_iteration's _search_gradient, in the shared schedule's π step and in
    reference_iteration's search loss; the θ′ backward of the negated loss.
    """
    profile, schedule, _ = combo
    # ε-space losses: no (1−ᾱ)/ᾱ weight, so every draw's terms stand at a similar scale; steps
    # large enough that their effect stands above bf16/fp16 rounding of the UNet outputs
    er = _eraser(tiny_cfg, combo, gumbel_mode="soft", lr=1e-2, search_lr=1.0, ddim_steps=10,
                 loss_space="eps", train_method="xattn")
    # θ′ ≠ θ from here on, so L_pres and its π gradient are not zero; far enough from θ that
    # L_pres stands well above bf16 rounding of the outputs
    er.run_outer_step()
    for group in er.theta.optimizer.param_groups:  # smaller checked θ′ steps: first order holds
        group["lr"] = 1e-3
    lam = er.cfg.preserve_weight
    for kind in (["shared"] if schedule == "shared" else ["outer", "inner"]):
        d = er.draw()
        z, z_r = _latents(er, d)
        theta_old = {n: p.detach().clone() for n, p in er.trained}
        pi_old = [p.detach().clone() for p in er.search.pi]
        le0, lp0, e_ref0 = _terms(er, d, z, z_r)
        if schedule == "shared":
            shared_outer_step(er.ctx, d)
        else:
            (reference_iteration if profile == "reference" else fast_iteration)(
                er.ctx, d, kind == "outer")
        er.iteration += er.cfg.pgd_steps if schedule == "shared" else 1
        theta_new = {n: p.detach().clone() for n, p in er.trained}
        pi_new = [p.detach().clone() for p in er.search.pi]
        if kind in ("outer", "shared"):  # new θ′, old π (the draw the θ′ step saw)
            _load(er, theta_new, pi_old)
            le1, lp1, _ = _terms(er, d, z, z_r, e_ref0)
            assert le1 + lam * lp1 < le0 + lam * lp0, (kind, le0, lp0, le1, lp1)
        if kind in ("inner", "shared"):  # old θ′, new π
            _load(er, theta_old, pi_new)
            _, lp1, _ = _terms(er, d, z, z_r, e_ref0)
            assert lp1 > lp0, (kind, lp0, lp1)
        _load(er, theta_new, pi_new)


def _load(er, theta, pi):
    with torch.no_grad():
        for n, p in er.trained:
            p.copy_(theta[n])
        for p, v in zip(er.search.pi, pi):
            p.copy_(v)


def test_draws_cover_exactly_the_authors_ranges():
    """t_enc ~ U{0..49} and t_ddpm ~ U{20·t_enc, …, 20·t_enc + 19} (the authors' og_num and
    og_num_lim), over enough draws that every bound is reached. Mutations checked: the upper
    bound of t_ddpm one higher; t_enc drawn from 0..48."""
    from ap_erase_fast.models import load_components
    from ap_erase_fast.randomness import RandomnessPlan
    from ap_erase_fast.sampling import DDIMTables

    tables = DDIMTables.from_scheduler(load_components("tiny").scheduler, 50)
    plan = RandomnessPlan(0, [0])
    seen_t, offsets = set(), set()
    for _ in range(3000):
        d = plan.draw([5], tables, (1, 1, 1, 1))
        seen_t.add(d.t_enc)
        offsets.add(d.samples[0].t_ddpm - 20 * d.t_enc)
    assert seen_t == set(range(50))
    assert offsets == set(range(20))
