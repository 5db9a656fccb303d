"""Shared case builders and comparison helpers for the ops tests."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from ap_erase_fast.ops import gumbel_mix
from ap_erase_fast.ops.reference import gumbel_mix_reference, gumbel_noise

# (atol, rtol) for values stored in the table dtype (outputs, table gradients)
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
MODES = ("soft", "hard", "topk")


def make_table(N, E, dtype, layout, gen, device="cpu"):
    """[N, *E] table in ``dtype`` with the requested memory layout."""
    if layout == "contig":
        return torch.randn((N,) + E, generator=gen).to(dtype).to(device)
    if layout == "rows":  # every other row of a bigger table: strided rows, contiguous E
        return torch.randn((2 * N,) + E, generator=gen).to(dtype).to(device)[::2]
    if layout == "cols":  # strided last dim: cannot be viewed with unit column stride
        return torch.randn((N,) + E[:-1] + (2 * E[-1],), generator=gen).to(dtype).to(device)[..., ::2]
    if layout == "perm":  # E dims transposed in memory: not collapsible into one stride
        return torch.randn((N, E[1], E[0]), generator=gen).to(dtype).to(device).transpose(1, 2)
    raise ValueError(layout)


def run(backend, logits, table, go, *, tau, mode, gumbel=None, seed=None, k=3, table_grad=True):
    """Forward output, index, d logits, d table (None without ``table_grad``) for one backend."""
    logits = logits.detach().clone().requires_grad_(True)
    table = table.detach().requires_grad_(table_grad)  # keeps the layout under test
    kw = dict(tau=tau, hard=mode == "hard", topk=k if mode == "topk" else None, gumbel=gumbel, seed=seed)
    if backend == "reference":
        out, idx = gumbel_mix_reference(logits, table, return_index=True, **kw)
    else:
        out, idx = gumbel_mix(logits, table, backend=backend, return_index=True, **kw)
    if not table_grad:  # the engine's case (frozen table): the backends may split over D
        (dl,) = torch.autograd.grad(out, (logits,), go)
        return out.detach(), idx, dl, None
    dl, dt = torch.autograd.grad(out, (logits, table), go)
    return out.detach(), idx, dl, dt


def assert_matches_reference(backend, G, N, E, dtype, mode, layout="contig", noise="given", device="cpu", seed=0,
                             table_grad=True, k=3):
    gen = torch.Generator().manual_seed(1000 + 7 * N + G + len(E) + seed)
    table = make_table(N, E, dtype, layout, gen, device)
    logits = torch.randn(G, N, generator=gen).to(device)
    gumbel = gumbel_noise((G, N), 1234 + seed, device) if noise == "given" else None
    rng_seed = 99 + seed if noise == "seed" else None
    go = torch.randn((G,) + E, generator=gen).to(dtype).to(device)
    tau = 1.7
    kw = dict(tau=tau, mode=mode, gumbel=gumbel, seed=rng_seed, k=k, table_grad=table_grad)
    got = run(backend, logits, table, go, **kw)
    ref = run("reference", logits, table, go, **kw)
    out, idx, dl, dt = got
    r_out, r_idx, r_dl, r_dt = ref
    for name, t in (("out", out), ("d logits", dl), ("d table", dt)):
        assert t is None or not torch.isnan(t).any(), f"{name} has NaN (unwritten elements?)"
    assert out.dtype == dtype and out.shape == (G,) + E
    assert dt is None or (dt.dtype == dtype and dt.shape == table.shape)
    assert torch.equal(idx.cpu(), r_idx.cpu())
    atol, rtol = TOL[dtype]
    if mode == "hard":
        # forward is exactly the selected row, bit for bit
        assert torch.equal(out, table.detach()[r_idx]), "hard forward is not the selected row"
        assert dt is None or torch.equal(dt, r_dt), "hard d table must be the one-hot scatter of grad_out"
    else:
        torch.testing.assert_close(out, r_out, atol=atol, rtol=rtol)
        if dt is not None:
            torch.testing.assert_close(dt, r_dt, atol=atol, rtol=rtol)
    scale = float(r_dl.abs().max()) + 1e-6
    torch.testing.assert_close(dl, r_dl, atol=2e-5 * scale * max(1.0, (E[0] * (E[-1] if len(E) > 1 else 1)) ** 0.5 / 10),
                               rtol=1e-3)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def native_backend_for(device: str) -> str:
    return "cuda" if device == "cuda" else "cpp"


def require_backend(name: str, device: str = DEVICE):
    from ap_erase_fast.ops._backends import why_unavailable

    if name == "triton":
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("triton not installed")
    if name == "cpp" and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the cpp backend")
    if name == "cuda" and device == "cuda":
        from ap_erase_fast.ops import _native

        if _native.prebuilt_path("cuda") is None and not _native.compiler_available("cuda"):
            pytest.skip("the cuda backend is not built and there is no nvcc to JIT-build it")
    reason = why_unavailable(name, device, explicit=True)
    if reason is not None:
        # A compiler is present (or the library is built), so an unavailable backend is a failure.
        pytest.fail(f"backend {name!r} unavailable: {reason}")


