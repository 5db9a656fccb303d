"""The loss terms against values derived from their definitions (ALGORITHM.md §1)."""
import pytest
import torch

from ap_erase_fast.objective import erasure_loss, predict_x0, preservation_loss, x0_weight


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("eta", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.9983, 0.3, 0.0058])
def test_first_step_erasure_loss_is_weighted_eps_gap(tensors, eta, alpha):
    """With θ' = θ the erasure term is w(t)·(1+η)²·mse(ε(z,c_e), ε(z,""))."""
    z, e_null, e_concept, _ = tensors
    got = erasure_loss(e_concept, e_null, e_concept, z, alpha, eta, "x0")
    expected = (1 - alpha) / alpha * (1 + eta) ** 2 * torch.mean((e_concept - e_null) ** 2)
    torch.testing.assert_close(got, expected)
    got_eps = erasure_loss(e_concept, e_null, e_concept, z, alpha, eta, "eps")
    torch.testing.assert_close(got_eps, (1 + eta) ** 2 * torch.mean((e_concept - e_null) ** 2))


def test_negative_guidance_target_is_a_minimum(tensors):
    z, e_null, e_concept, _ = tensors
    target = e_null - 1.0 * (e_concept - e_null)
    assert erasure_loss(target, e_null, e_concept, z, 0.5, 1.0, "x0") < 1e-20
    assert erasure_loss(target, e_null, e_concept, z, 0.5, 1.0, "eps") < 1e-20


def test_preservation_loss(tensors):
    z, a, b, _ = tensors
    alpha = 0.25
    torch.testing.assert_close(preservation_loss(a, b, z, alpha, "x0"),
                               x0_weight(alpha) * torch.mean((a - b) ** 2))
    assert preservation_loss(a, a, z, alpha) == 0


def test_predict_x0_inverts_forward_noising(tensors):
    x0, eps, _, _ = tensors
    alpha = 0.37
    z = alpha ** 0.5 * x0 + (1 - alpha) ** 0.5 * eps
    torch.testing.assert_close(predict_x0(eps, z, alpha), x0)
