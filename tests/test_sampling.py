"""Trajectory lengths, DDIM tables and updates, worked out by hand (ALGORITHM.md §4)."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from ap_erase_fast.backbones import Cond
from ap_erase_fast.sampling import DDIMTables, ddim_step, output_to_eps, sample_until


@pytest.fixture(scope="module")
def tables():
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    return DDIMTables.from_scheduler(sched, 50)


def _alpha_bar(t):
    """ᾱ_t of the scaled-linear schedule, in plain Python floats."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(t + 1):
        beta = (lo + (hi - lo) * i / 999) ** 2
        prod *= 1.0 - beta
    return prod


def test_ddim_timesteps(tables):
    assert tables.timesteps[:3] == [1, 21, 41]
    assert tables.timesteps[-1] == 981 and len(tables.timesteps) == 50


@pytest.mark.parametrize("t_enc,steps", [(0, 49), (1, 49), (2, 48), (25, 25), (48, 2), (49, 1)])
def test_trajectory_step_count(tables, t_enc, steps):
    assert tables.num_trajectory_steps(t_enc) == steps
    idx = tables.trajectory_indices(t_enc)
    assert tables.timesteps[idx[0]] == 961  # x_T is treated as t = 961; 981 is never visited
    assert idx[-1] == max(t_enc - 1, 0)


def test_mean_trajectory_length(tables):
    mean = sum(tables.num_trajectory_steps(t) for t in range(50)) / 50
    assert mean == pytest.approx(25.48)


@pytest.mark.parametrize("t_enc", [0, 7, 49])
def test_t_ddpm_range(tables, t_enc):
    assert tables.t_ddpm_range(t_enc) == (20 * t_enc, 20 * t_enc + 20)


def test_x0_weights_at_extremes(tables):
    a0, a49 = tables.x0_alpha(0), tables.x0_alpha(49)
    assert a0 == pytest.approx(_alpha_bar(1), rel=1e-12)
    assert a49 == pytest.approx(_alpha_bar(981), rel=1e-10)
    assert (1 - a0) / a0 == pytest.approx(0.001707, rel=1e-3)  # "≈ 0.002"
    assert (1 - a49) / a49 == pytest.approx(172, rel=0.02)    # noisy steps dominate


def test_ddim_step_moves_along_the_noise_direction():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    a_t, a_prev = 0.3, 0.7
    x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(ddim_step(x, eps, a_t, a_prev), expected)


def test_v_prediction_converts_to_eps():
    torch.manual_seed(1)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a = 0.42
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
    torch.testing.assert_close(output_to_eps(v, x, a, "v_prediction"), eps)
    torch.testing.assert_close(output_to_eps(eps, x, a, "epsilon"), eps)


def test_sample_until_calls_and_guidance(tables):
    calls = []

    def fake_unet(x, t, cond):
        calls.append((x.shape[0], int(t[0])))
        # "uncond" rows predict 0, "cond" rows predict 1: CFG gives s·1
        (text,) = cond.parts
        return text[:, :1, :1].expand(-1, x.shape[1], 1).unsqueeze(-1).expand_as(x).clone()

    x_T = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    cond = Cond((torch.ones(1, 3, 5, dtype=torch.float64),))
    uncond = Cond((torch.zeros(1, 3, 5, dtype=torch.float64),))
    z = sample_until(fake_unet, x_T, cond, uncond, tables, t_enc=47, guidance=3.0)
    assert [c[1] for c in calls] == [961, 941, 921]
    assert all(c[0] == 2 for c in calls)
    x = x_T
    for k in (48, 47, 46):
        x = ddim_step(x, torch.full_like(x, 3.0), tables.alpha(k), tables.alpha_prev(k))
    torch.testing.assert_close(z, x)


def test_guidance_one_evaluates_the_conditional_half_only(tables):
    """At guidance 1 the guided output is the conditional one: one call of batch B per step (not
    2B), the same trajectory as the CFG formula with a real unconditional prediction, and the
    cost model counts 1 evaluation per sample and step. Mutation checked: the shortcut taken at
    every guidance (the guidance-3 test above fails), the shortcut feeding the unconditional
    rows (the trajectory differs) and the cost model's factor left at 2 each fail."""
    from ap_erase_fast.bench import expected_evals_per_step

    calls = []

    def fake_unet(x, t, cond):
        calls.append(x.shape[0])
        (text,) = cond.parts  # a prediction that depends on x and on the text
        return 0.3 * x + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x_T = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    cond = Cond((torch.randn(2, 3, 5, dtype=torch.float64),))
    uncond = Cond((torch.randn(1, 3, 5, dtype=torch.float64).expand(2, 3, 5),))
    z = sample_until(fake_unet, x_T, cond, uncond, tables, t_enc=45, guidance=1.0)
    assert calls == [2] * 5
    x = x_T
    for k in (48, 47, 46, 45, 44):
        out_u, out_c = fake_unet(x, None, uncond), fake_unet(x, None, cond)
        x = ddim_step(x, out_u + 1.0 * (out_c - out_u), tables.alpha(k), tables.alpha_prev(k))
    torch.testing.assert_close(z, x)
    at_3 = expected_evals_per_step("fast", "faithful", 2, 50, guidance=3.0)
    at_1 = expected_evals_per_step("fast", "faithful", 2, 50, guidance=1.0)
    m = ((50 - 1) + sum(50 - t for t in range(1, 50))) / 50  # mean trajectory length
    # outer: 2 trajectories; faithful inner step: 1 trajectory; each m DDIM steps
    assert at_3 - at_1 == pytest.approx(3 * m)
