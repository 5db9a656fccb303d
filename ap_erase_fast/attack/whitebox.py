"""White-box attacks on an erased denoiser: both minimise its denoising loss on base-model images
of the erased concept, by changing only the text it is conditioned on.

* :func:`prefix_attack` (UnlearnDiffAtk-style): ``k`` prefix tokens in front of the concept's
  prompt, each a Gumbel-Softmax draw over a candidate vocabulary (:func:`~ap_erase_fast.ops.
  gumbel_mix`, hard straight-through, τ annealed geometrically); the prefix embeddings are the
  drawn rows of the token-embedding table, the gradient reaches the logits through the soft
  draw. The adversarial prompt is the logits' argmax, a sequence of real tokens, checked every
  few steps: by the attacker's judge when one is given (highest judged rate kept, early stop
  above a threshold), else by its loss on the whole pool.
* :func:`invert_concept` (concept inversion): one free token embedding in place of the concept's
  word, optimised directly (textual inversion on the erased model).

The loss pool is fixed up front: every target latent z0 gets ``probes`` (timestep, noise) pairs;
a step takes a minibatch of the pool, and the loss reported before and after an attack is the
mean over the whole pool, ε-MSE of ``x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import Cond
from ..errors import UserError


@dataclass
class LossPool:
    """Fixed (latent, timestep, noise) probes of the attack loss."""

    x_t: torch.Tensor  # [P, C, h, w] noised latents
    t: torch.Tensor  # [P] long
    noise: torch.Tensor  # [P, C, h, w]
    alpha: torch.Tensor  # [P] ᾱ_t, float32

    def __len__(self) -> int:
        return self.t.shape[0]


def make_pool(z0: torch.Tensor, alphas_cumprod: torch.Tensor, probes: int, seed: int,
              t_range: tuple[float, float] = (0.0, 1.0)) -> LossPool:
    """``probes`` (t, ε) pairs per latent of ``z0``, t uniform over the training timesteps in
    ``t_range`` (fractions of T)."""
    gen = torch.Generator().manual_seed(int(seed))
    z = z0.detach().cpu().float().repeat_interleave(probes, dim=0)
    n_t = alphas_cumprod.shape[0]
    lo, hi = int(t_range[0] * n_t), max(int(t_range[0] * n_t) + 1, int(t_range[1] * n_t))
    t = torch.randint(lo, hi, (z.shape[0],), generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    a = alphas_cumprod.to(torch.float64)[t].float()
    view = a.view(-1, *[1] * (z.dim() - 1))
    x_t = view.sqrt() * z + (1 - view).sqrt() * noise
    dev = z0.device
    return LossPool(x_t=x_t.to(dev), t=t.to(dev), noise=noise.to(dev), alpha=a.to(dev))


class PromptEncoder:
    """Text-encoder states of one prompt whose token positions ``[start, start + n)`` take given
    embeddings instead of the token table's rows (a forward hook on the input embeddings)."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.table = text_encoder.get_input_embeddings().weight

    def ids(self, words_ids: list[int]) -> torch.Tensor:
        """``[1, L]``: start token, ``words_ids``, end token, padding (``UserError`` if too long)."""
        tok = self.tokenizer
        limit = int(tok.model_max_length)
        if len(words_ids) + 2 > limit:
            raise UserError(f"the attacked prompt needs {len(words_ids) + 2} tokens but the text "
                            f"encoder reads {limit}; use fewer --prefix-tokens or a shorter --prompt")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        row = [tok.bos_token_id, *words_ids, tok.eos_token_id]
        row += [pad] * (limit - len(row))
        return torch.tensor([row], device=self.table.device)

    def word_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode(self, ids: torch.Tensor, start: int = 0, embeddings: torch.Tensor | None = None):
        """``[B, L, D]`` last hidden states; ``embeddings`` ``[n, D]`` replace positions
        ``start .. start + n - 1`` of every row (differentiably)."""
        if embeddings is None:
            return self.text_encoder(ids)[0].float()
        n = embeddings.shape[0]

        def inject(module, inputs, output):
            new = embeddings.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
            return torch.cat([output[:, :start], new, output[:, start + n:]], dim=1)

        handle = self.text_encoder.get_input_embeddings().register_forward_hook(inject)
        try:
            return self.text_encoder(ids)[0].float()
        finally:
            handle.remove()


def pool_loss(backbone, unet, pool: LossPool, states: torch.Tensor, index=None) -> torch.Tensor:
    """Mean ε-MSE of ``unet`` on the pool's probes (``index``: a subset) given text states
    ``[1, L, D]``."""
    sel = slice(None) if index is None else index
    x, t, noise, a = pool.x_t[sel], pool.t[sel], pool.noise[sel], pool.alpha[sel]
    cond = Cond((states.expand(x.shape[0], -1, -1),))
    out = backbone.predict(unet, x, t, cond)
    eps = backbone.eps(out, x, a)
    return ((eps.float() - noise) ** 2).mean()


@torch.no_grad()
def full_pool_loss(backbone, unet, pool: LossPool, states: torch.Tensor, batch: int) -> float:
    total = 0.0
    for lo in range(0, len(pool), batch):
        idx = torch.arange(lo, min(lo + batch, len(pool)), device=pool.t.device)
        total += float(pool_loss(backbone, unet, pool, states, idx)) * len(idx)
    return total / len(pool)


def _batches(n: int, batch: int, gen: torch.Generator):
    """Minibatch indices over ``n`` probes: shuffled epochs, forever."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch):
            yield perm[lo:lo + batch]


def anneal(step: int, steps: int, tau_start: float, tau_end: float) -> float:
    """Geometric τ schedule from ``tau_start`` (first step) to ``tau_end`` (last step)."""
    if steps <= 1:
        return float(tau_end)
    return float(tau_start * (tau_end / tau_start) ** (step / (steps - 1)))


@dataclass
class PrefixResult:
    token_ids: list[int]  # the adversarial prefix (tokenizer ids)
    ids: torch.Tensor  # [1, L] the whole adversarial prompt
    history: list[dict]  # per step: loss of the minibatch, τ, the drawn tokens
    checks: list[dict]  # the argmax prompts checked (pool loss; judged rate when a judge is given)
    best: dict  # the chosen check
    steps_run: int  # optimisation steps taken (fewer than asked after an early stop)
    stopped_early: bool


def better(a: dict, b: dict | None) -> bool:
    """Whether check ``a`` beats ``b``: the higher judged rate (ties: the lower pool loss) when
    both were judged, else the lower pool loss."""
    if b is None:
        return True
    ja, jb = a.get("judged"), b.get("judged")
    if ja is not None and jb is not None and ja["rate"] != jb["rate"]:
        return ja["rate"] > jb["rate"]
    return a["pool_loss"] < b["pool_loss"]


def prefix_attack(backbone, unet, encoder: PromptEncoder, prompt_ids: list[int], candidates: list[int],
                  pool: LossPool, *, k: int, steps: int, lr: float, tau_start: float, tau_end: float,
                  batch: int, seed: int, checks_per_run: int = 10, check_every: int | None = None,
                  judge=None, stop_rate: float | None = None, on_step=None) -> PrefixResult:
    """Optimise ``k`` prefix tokens over the ``candidates`` simplex so that ``unet``'s loss on
    the pool drops (see the module docstring). Every ``check_every`` steps (default: ``steps //
    checks_per_run``) and at the last step the logits' argmax prompt is scored on the whole
    pool and, when ``judge`` is given (a callable: prefix token ids -> ``{"hits", "images",
    "rate"}``, the attacker's success check), judged. The best check (:func:`better`) is
    returned; with a judge, a judged rate above ``stop_rate`` ends the run early."""
    from ..ops import gumbel_mix

    device = pool.t.device
    table = encoder.table.detach()[torch.tensor(candidates, device=device)].float()
    logits = torch.zeros(k, len(candidates), device=device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    draws = _batches(len(pool), batch, gen)
    ids = encoder.ids([candidates[0]] * k + list(prompt_ids))
    history, checks, best, stopped = [], [], None, False
    check_every = check_every or max(1, steps // checks_per_run)
    for step in range(steps):
        tau = anneal(step, steps, tau_start, tau_end)
        with torch.enable_grad():
            emb, index = gumbel_mix(logits, table, tau=tau, hard=True, return_index=True,
                                    seed=int(seed) * 1_000_003 + step)
            states = encoder.encode(ids, start=1, embeddings=emb)
            loss = pool_loss(backbone, unet, pool, states, next(draws).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        history.append({"step": step, "loss": round(float(loss.detach()), 6), "tau": round(tau, 5),
                        "tokens": [candidates[int(i)] for i in index]})
        if on_step is not None:
            on_step(loss=f"{float(loss.detach()):.4g}")
        if (step + 1) % check_every == 0 or step + 1 == steps:
            tokens = [candidates[int(i)] for i in logits.detach().argmax(-1)]
            if tokens not in [c["tokens"] for c in checks]:
                value = full_pool_loss(backbone, unet, pool, encoder.encode(encoder.ids(tokens + list(prompt_ids))),
                                       batch)
                check = {"step": step + 1, "tokens": tokens, "pool_loss": round(value, 6)}
                if judge is not None:
                    check["judged"] = judge(tokens)
                checks.append(check)
                if better(check, best):
                    best = check
                if judge is not None and stop_rate is not None and check["judged"]["rate"] > stop_rate:
                    stopped = True
                    break
    return PrefixResult(token_ids=best["tokens"], ids=encoder.ids(best["tokens"] + list(prompt_ids)),
                        history=history, checks=checks, best=best, steps_run=len(history),
                        stopped_early=stopped)


@dataclass
class InversionResult:
    embedding: torch.Tensor  # [1, D] the learned token embedding
    ids: torch.Tensor  # [1, L] the prompt with the placeholder
    position: int  # where the embedding goes in ids
    history: list[dict]


def invert_concept(backbone, unet, encoder: PromptEncoder, before_ids: list[int], after_ids: list[int],
                   init: torch.Tensor, pool: LossPool, *, steps: int, lr: float, batch: int, seed: int,
                   on_step=None) -> InversionResult:
    """One free embedding between ``before_ids`` and ``after_ids`` (the prompt's words around
    the concept), optimised with Adam to lower ``unet``'s loss on the pool."""
    device = pool.t.device
    placeholder = encoder.tokenizer.eos_token_id - 2  # any id; its row is replaced
    ids = encoder.ids(list(before_ids) + [placeholder] + list(after_ids))
    position = 1 + len(before_ids)
    vec = init.detach().clone().float().reshape(1, -1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([vec], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    draws = _batches(len(pool), batch, gen)
    history = []
    for step in range(steps):
        with torch.enable_grad():
            states = encoder.encode(ids, start=position, embeddings=vec)
            loss = pool_loss(backbone, unet, pool, states, next(draws).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        history.append({"step": step, "loss": round(float(loss.detach()), 6)})
        if on_step is not None:
            on_step(loss=f"{float(loss.detach()):.4g}")
    return InversionResult(embedding=vec.detach(), ids=ids, position=position, history=history)
