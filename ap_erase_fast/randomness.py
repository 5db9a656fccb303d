"""One randomness plan: every random draw of the AP loop, from seeded generators, in a fixed order.

A step generator (seeded with ``seed`` on every rank) draws t_enc; sample slot j has its own
generator that draws its erased concept, Gumbel noise, t_ddpm and x_T. Whatever a profile,
schedule or process layout computes, it consumes these draws and nothing else.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .sampling import DDIMTables


@dataclass
class SampleDraw:
    """The random quantities of one sample of one loop iteration."""

    slot: int  # global sample slot (rank · batch_size + k)
    concept: int  # index of the erased concept c_e
    gumbel: torch.Tensor  # [|R|] Gumbel noise for the draw of c_a from π[c_e]
    t_ddpm: int  # DDPM timestep the UNet is queried at
    x_T: torch.Tensor  # [1, C, h, w] starting noise of both trajectories
    bank_index: int | None = None  # which of the bank's M trajectories (--trajectories bank)
    # --preserve-draws K > 1: the K − 1 further draws of c_a for θ′'s preservation term, each
    # (Gumbel noise [|R|], bank trajectory index or None)
    extra: list[tuple[torch.Tensor, int | None]] = field(default_factory=list)


@dataclass
class Draws:
    t_enc: int  # DDIM index the trajectories stop at (shared by all samples and ranks)
    samples: list[SampleDraw]


def _slot_seed(seed: int, slot: int, stream: str = "slot") -> int:
    digest = hashlib.sha256(f"ap_erase_fast/{stream}/{seed}/{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RandomnessPlan:
    """Draws every random quantity of an iteration, always in the same order.

    A step generator (seeded with ``seed`` on every rank) draws t_enc; sample slot j has its own
    generator that draws its erased concept, Gumbel noise, t_ddpm and x_T. Whatever a profile,
    schedule or process layout computes, it consumes these draws and nothing else: the same seed
    gives identical samples to the reference and the fast profile, and slot j's sample is the
    same whether it runs in a batch of one process or on rank j of a data-parallel run.
    """

    def __init__(self, seed: int, slots: list[int], bank_size: int | None = None,
                 extra_draws: int = 0):
        """``bank_size``: M of ``--trajectories bank``; each slot then also draws which of the
        bank's M trajectories its sample reads, from a generator of its own (the other draws
        are the same with or without a bank). ``extra_draws``: K − 1 of ``--preserve-draws K``;
        each slot then draws K − 1 further (Gumbel noise, bank index) pairs from a third
        generator of its own, so that every other draw is the same whatever K is."""
        self.step_generator = torch.Generator().manual_seed(int(seed))
        self.slot_generators = {j: torch.Generator().manual_seed(_slot_seed(seed, j))
                                for j in slots}
        self.bank_size = bank_size
        self.bank_generators = ({j: torch.Generator().manual_seed(_slot_seed(seed, j, "bank"))
                                 for j in slots} if bank_size else {})
        self.extra_draws = int(extra_draws)
        self.draw_generators = ({j: torch.Generator().manual_seed(_slot_seed(seed, j, "draws"))
                                 for j in slots} if extra_draws else {})

    def fix_t_enc(self, values) -> None:
        """Take t_enc from ``values`` (in order, one per :meth:`draw`) instead of the step
        generator: benchmarks give every configuration the same trajectory lengths."""
        self._t_enc_values = iter(values)

    def draw(self, set_sizes: list[int], tables: DDIMTables, latent_shape: tuple[int, ...]) -> Draws:
        fixed = getattr(self, "_t_enc_values", None)
        if fixed is not None:
            t_enc = int(next(fixed))
        else:
            t_enc = int(torch.randint(tables.ddim_steps, (1,), generator=self.step_generator))
        lo, hi = tables.t_ddpm_range(t_enc)
        samples = []
        for j, g in self.slot_generators.items():
            concept = int(torch.randint(len(set_sizes), (1,), generator=g))
            gumbel = self.draw_gumbel(j, set_sizes[concept])
            t_ddpm = int(torch.randint(lo, hi, (1,), generator=g))
            x_T = torch.randn(latent_shape, generator=g, dtype=torch.float32)
            bank_index = (int(torch.randint(self.bank_size, (1,), generator=self.bank_generators[j]))
                          if self.bank_size else None)
            extra = [self._extra_draw(j, set_sizes[concept]) for _ in range(self.extra_draws)]
            samples.append(SampleDraw(j, concept, gumbel, t_ddpm, x_T, bank_index, extra))
        return Draws(t_enc, samples)

    def draw_gumbel(self, slot: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """g = −log(−log(u + 1e−10) + 1e−10), u ~ U(0, 1)^size, from the slot's generator."""
        u = torch.rand(size, generator=generator or self.slot_generators[slot], dtype=torch.float32)
        return -torch.log(-torch.log(u + 1e-10) + 1e-10)

    def _extra_draw(self, slot: int, size: int) -> tuple[torch.Tensor, int | None]:
        g = self.draw_generators[slot]
        gumbel = self.draw_gumbel(slot, size, g)
        return gumbel, (int(torch.randint(self.bank_size, (1,), generator=g)) if self.bank_size else None)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"step": self.step_generator.get_state()}
        out.update({f"slot.{j}": g.get_state() for j, g in self.slot_generators.items()})
        out.update({f"bank.{j}": g.get_state() for j, g in self.bank_generators.items()})
        out.update({f"draws.{j}": g.get_state() for j, g in self.draw_generators.items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.step_generator.set_state(state["step"])
        for j, g in self.slot_generators.items():
            g.set_state(state[f"slot.{j}"])
        for j, g in self.bank_generators.items():
            g.set_state(state[f"bank.{j}"])
        for j, g in self.draw_generators.items():
            g.set_state(state[f"draws.{j}"])
