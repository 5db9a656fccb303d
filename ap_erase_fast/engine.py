"""The AP training loop (ALGORITHM.md §5), its randomness plan, checkpoints and exact resume.

Read top to bottom: :class:`RandomnessPlan` draws everything random; :class:`Eraser` sets up the
models, R and π, then runs ``steps`` outer steps of ``pgd_steps`` (P) loop iterations each; the
iteration strategies themselves live in :mod:`ap_erase_fast.steps`.

Profiles (how it is computed):

* "reference" computes what the authors' script computes, the way it computes it: fp32, the
  classic attention processor, separate batch-1/batch-2 UNet calls, both trajectories and all five
  UNet queries in every iteration, prompts re-encoded every iteration, gradients for every UNet
  parameter, and a second full UNet for θ. It is the oracle and the benchmark baseline.
* "fast" computes the same thing without the waste: one UNet serves θ' and θ (θ is θ' with the
  original values of the trained tensors swapped in through ``torch.func.functional_call``),
  trajectories and queries batched, mixed precision, SDPA attention, π-only backward in search
  steps, no gradients for untrained parameters.

Schedules (what is computed): "faithful" (the authors' loop) and "shared" (one sampled batch per
outer step serves both updates; see :func:`ap_erase_fast.steps.shared_outer_step`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .concepts import (PreservationSet, check_concept_has_tokens, describe_sets, encode_prompts,
                       select_preservation_set, vocabulary_embeddings)
from .config import EraseConfig
from .errors import UserError
from .objective import erasure_loss, preservation_loss
from .sampling import DDIMTables, output_to_eps, sample_until

# Keys that may differ between a checkpointed run and its resumption.
RUN_CONTROL_KEYS = ("steps", "output", "overwrite", "resume", "checkpoint_every", "quiet",
                    "device", "embedding_cache")
RANDOM_WEIGHTS_NOTICE = ("The built-in 'tiny' model has RANDOM weights: this run demonstrates the "
                         "pipeline, it erases nothing meaningful. Pass --model with a real Stable "
                         "Diffusion checkpoint for a real erasure.")


# ------------------------------------------------------------------------------------------------
# One randomness plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Draws:
    """Every random quantity of one loop iteration."""

    concept: int  # index of the erased concept c_e
    gumbel: torch.Tensor  # [|R|] Gumbel noise for the draw of c_a from π[c_e]
    t_enc: int  # DDIM index the trajectories stop at
    t_ddpm: int  # DDPM timestep the UNet is queried at
    x_T: torch.Tensor  # [1, C, h, w] starting noise of both trajectories


class RandomnessPlan:
    """Draws an iteration's randomness from one CPU generator, always in the same order.

    Whatever a profile or schedule computes, it consumes these draws and nothing else, so two
    execution strategies with the same seed see identical samples.
    """

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def draw(self, set_sizes: list[int], tables: DDIMTables, latent_shape: tuple[int, ...]) -> Draws:
        g = self.generator
        concept = int(torch.randint(len(set_sizes), (1,), generator=g))
        gumbel = self.draw_gumbel(set_sizes[concept])
        t_enc = int(torch.randint(tables.ddim_steps, (1,), generator=g))
        lo, hi = tables.t_ddpm_range(t_enc)
        t_ddpm = int(torch.randint(lo, hi, (1,), generator=g))
        x_T = torch.randn(latent_shape, generator=g, dtype=torch.float32)
        return Draws(concept, gumbel, t_enc, t_ddpm, x_T)

    def draw_gumbel(self, size: int) -> torch.Tensor:
        """Extra Gumbel noise (search steps of the shared schedule with P > 2)."""
        u = torch.rand(size, generator=self.generator, dtype=torch.float32)
        return -torch.log(-torch.log(u + 1e-10) + 1e-10)

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------
class NonFiniteLoss(UserError):
    pass


@dataclass
class EraseResult:
    output_dir: str | None
    run_info: dict
    log: list[dict] = field(default_factory=list)
    trained: dict[str, torch.Tensor] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; "
                        "use --device cpu")
    return dev


class Eraser:
    """Sets up one AP erasure and runs it. Use :func:`ap_erase_fast.erase` for the whole job."""

    def __init__(self, cfg: EraseConfig, progress: bool | None = None, components=None):
        """``components``: an already loaded :class:`~ap_erase_fast.models.SDComponents` to use
        instead of loading ``cfg.model`` (it is modified in place: its UNet becomes θ')."""
        self.cfg = cfg.validate()
        self.components = components
        self.progress = (not cfg.quiet) if progress is None else progress
        self.device = resolve_device(cfg.device)
        self.calls: Counter = Counter()  # UNet sample-evaluations (batch entries) by kind
        self.log: list[dict] = []
        self.iteration = 0
        self.timings: dict[str, float] = {"setup_s": 0.0, "train_s": 0.0}
        self.last_checkpoint: str | None = None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self) -> "Eraser":
        from .models import load_components, select_trainable, set_attention_backend
        from .models.vocab import load_vocabulary

        t0 = time.perf_counter()
        cfg = self.cfg
        vocab_words = load_vocabulary(cfg.vocab)
        comp = self.components or load_components(
            cfg.model, single_file_weights=cfg.single_file_weights, torch_dtype=torch.float32,
            device=self.device)
        self.components = comp
        for concept in cfg.erase:
            check_concept_has_tokens(comp.tokenizer, concept)

        self.tables = DDIMTables.from_scheduler(comp.scheduler, cfg.ddim_steps)
        self.latent_shape = self._latent_shape(comp, cfg.resolution)

        text_encoder = comp.text_encoder.to(self.device).eval().requires_grad_(False)
        self.text_encoder, self.tokenizer = text_encoder, comp.tokenizer
        self.emb_null = self.encode("")
        self.emb_concepts = [self.encode(c) for c in cfg.erase]

        # Preservation sets R, one per erased concept, as text-embedding tables on the device.
        from .models import cache_root, module_content_hash

        cache = None
        if (cfg.embedding_cache or "").lower() != "none":
            cache = cfg.embedding_cache or os.path.join(cache_root(), "embeddings")
        te_hash = module_content_hash(text_encoder)
        vocab_emb, self.cache_hit = vocabulary_embeddings(text_encoder, comp.tokenizer,
                                                          vocab_words, te_hash, cache)
        self.sets: list[PreservationSet] = [
            select_preservation_set(c, e[0].cpu(), vocab_words, vocab_emb, cfg.k_closest,
                                    cfg.num_centers, cfg.exclude_erased)
            for c, e in zip(cfg.erase, self.emb_concepts)]
        self.r_tables = [vocab_emb[s.indices].to(self.device) for s in self.sets]
        del vocab_emb

        # θ' (trained) and θ (the original weights).
        self.unet = comp.unet.to(self.device).train()
        self.trained = select_trainable(self.unet, cfg.train_method)
        self.trained_names = [n for n, _ in self.trained]
        params = [p for _, p in self.trained]
        if cfg.profile == "reference":
            # The authors' cost structure: a second full UNet for θ, classic attention, and a
            # gradient for every parameter of θ' (only the selected ones are optimised).
            self.frozen = copy.deepcopy(self.unet).eval().requires_grad_(False)
            for model in (self.unet, self.frozen):
                set_attention_backend(model, "classic")
            self.unet.requires_grad_(True)
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
            self.compute_dtype = None
        else:
            self.compute_dtype = _compute_dtype(cfg.mixed_precision, self.device)
            if cfg.allow_tf32 and self.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            set_attention_backend(self.unet, cfg.attention)
            if self.compute_dtype is not None:  # frozen weights are only ever read in it
                trained_ids = {id(p) for p in params}
                for p in self.unet.parameters():
                    if id(p) not in trained_ids:
                        p.data = p.data.to(self.compute_dtype)
            # θ = θ' with the original values of the trained tensors: no second UNet.
            keep = self.compute_dtype or torch.float32
            self.frozen_tensors = {n: p.detach().to(keep, copy=True) for n, p in self.trained}
            if cfg.gradient_checkpointing:
                self.unet.enable_gradient_checkpointing()
            self.optimizer = make_optimizer(cfg, params)
            # the text encoder's work is done once: "" and c_e embeddings are cached
            self.text_encoder = None
            comp.text_encoder = None

        # π: one logits vector per erased concept, uniform 1/|R|, one Adam for all of them.
        self.pi = [torch.nn.Parameter(torch.full((len(s.words),), 1.0 / len(s.words),
                                                 device=self.device)) for s in self.sets]
        self.pi_optimizer = torch.optim.Adam(self.pi, lr=cfg.search_lr)
        self.plan = RandomnessPlan(cfg.seed)
        self.timings["setup_s"] = time.perf_counter() - t0
        return self

    @staticmethod
    def _latent_shape(comp, resolution: int | None) -> tuple[int, int, int, int]:
        factor = (2 ** (len(comp.vae.config.block_out_channels) - 1)) if comp.vae is not None else 8
        res = resolution or comp.default_resolution
        multiple = factor * 2 ** (len(comp.unet.config.down_block_types) - 1)
        if res % multiple:
            raise UserError(f"--resolution {res} is not a multiple of {multiple} (VAE factor "
                            f"{factor} times the UNet's downsampling)")
        return (1, comp.unet.config.in_channels, res // factor, res // factor)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        return encode_prompts(self.text_encoder, self.tokenizer, [prompt], device=self.device)

    def prompt_embeddings(self, concept: int) -> tuple[torch.Tensor, torch.Tensor]:
        """("" , c_e) text embeddings; the reference re-encodes them every iteration as the
        authors do, the fast profile reuses the ones computed at set-up (same values)."""
        if self.cfg.profile == "reference":
            return self.encode(""), self.encode(self.cfg.erase[concept])
        return self.emb_null, self.emb_concepts[concept]

    # -- model calls --------------------------------------------------------------------------
    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def unet_fn(self, which: str, kind: str) -> Callable:
        """UNet output for (x, t, text) from θ' (``which="trained"``) or θ (``"frozen"``),
        counting sample-evaluations under ``kind``. Outputs are fp32."""
        unet = self.unet
        if which == "trained":
            forward = unet
        elif self.cfg.profile == "reference":
            forward = self.frozen
        else:
            def forward(x, t, encoder_hidden_states, return_dict):
                return torch.func.functional_call(
                    unet, self.frozen_tensors, (x, t),
                    {"encoder_hidden_states": encoder_hidden_states, "return_dict": return_dict},
                    strict=False)

        def call(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            self.calls[kind] += x.shape[0]
            with self.autocast():
                return forward(x, t, encoder_hidden_states=text, return_dict=False)[0].float()
        return call

    def query(self, which: str, kind: str, z: torch.Tensor, t_ddpm: int,
              text: torch.Tensor) -> torch.Tensor:
        """ε-prediction of θ/θ' for latents z at DDPM timestep t_ddpm."""
        t = torch.full((z.shape[0],), t_ddpm, dtype=torch.long, device=z.device)
        out = self.unet_fn(which, kind)(z, t, text)
        return output_to_eps(out, z, float(self.tables.alphas_cumprod[t_ddpm]),
                             self.tables.prediction_type)

    def sample(self, x_T: torch.Tensor, cond: torch.Tensor, t_enc: int) -> torch.Tensor:
        """Truncated trajectories with θ' for a batch of conditions (one UNet call per step)."""
        b = cond.shape[0]
        x = x_T.expand(b, *x_T.shape[1:]) if x_T.shape[0] != b else x_T
        uncond = self.emb_null.expand(b, *self.emb_null.shape[1:])
        return sample_until(self.unet_fn("trained", "sampling"), x, cond, uncond, self.tables,
                            t_enc, self.cfg.start_guidance)

    def draw_adversarial(self, concept: int, gumbel: torch.Tensor) -> tuple[torch.Tensor, int]:
        """c_a from π[c_e]: [1, L, D] (differentiable in π) and the index of the drawn word."""
        from .ops import gumbel_mix

        cfg = self.cfg
        out, index = gumbel_mix(self.pi[concept][None], self.r_tables[concept], tau=cfg.tau,
                                hard=cfg.gumbel_mode == "hard",
                                topk=cfg.gumbel_topk if cfg.gumbel_mode == "topk" else None,
                                gumbel=gumbel[None].to(self.device),
                                backend="torch" if cfg.profile == "reference" else "auto",
                                return_index=True)
        return out, int(index[0])

    # -- loop iterations ----------------------------------------------------------------------
    def draw(self) -> Draws:
        return self.plan.draw([len(s.words) for s in self.sets], self.tables, self.latent_shape)

    def run_iteration(self) -> dict:
        """One faithful loop iteration (outer when iteration % P == 0, else a search step)."""
        from .steps import fast_iteration, reference_iteration

        step = reference_iteration if self.cfg.profile == "reference" else fast_iteration
        records = [step(self)]
        self._finish_records(records)
        return records[0]

    def run_outer_step(self) -> list[dict]:
        """One outer step: P faithful iterations, or the shared schedule's joint update."""
        from .steps import shared_outer_step

        if self.cfg.schedule == "shared":
            records = shared_outer_step(self)
            self._finish_records(records)
            # an outer step spans P iterations whatever the schedule computes inside it
            self.iteration += self.cfg.pgd_steps - len(records)
            return records
        return [self.run_iteration() for _ in range(self.cfg.pgd_steps)]

    def _finish_records(self, records: list[dict]) -> None:
        for rec in records:
            rec["iter"] = self.iteration
            rec["step"] = self.iteration // self.cfg.pgd_steps
            self.log.append(rec)
            self.iteration += 1

    @contextlib.contextmanager
    def trained_tensors_frozen(self):
        """θ' forwards inside build no graph into the trained tensors (π-only backward)."""
        for _, p in self.trained:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for _, p in self.trained:
                p.requires_grad_(True)

    def step_optimizer(self, loss: torch.Tensor) -> None:
        """Descent step of θ' on ``loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def step_pi(self, concept: int, grad: torch.Tensor) -> None:
        """Step π[concept] along ``grad`` (the gradient of the loss to minimise)."""
        self.pi_optimizer.zero_grad(set_to_none=True)
        self.pi[concept].grad = grad
        self.pi_optimizer.step()

    def record(self, d: Draws, kind: str, adv_index: int, loss: torch.Tensor,
               l_erase: torch.Tensor | None, l_pres: torch.Tensor) -> dict:
        self.check_finite(loss)
        return {"kind": kind, "concept": self.cfg.erase[d.concept], "t_enc": d.t_enc,
                "t_ddpm": d.t_ddpm, "adv_index": adv_index,
                "adv_word": self.sets[d.concept].words[adv_index], "loss": loss.item(),
                "loss_erase": None if l_erase is None else l_erase.item(),
                "loss_preserve": l_pres.item()}

    def check_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss).item():
            return
        i = self.iteration
        where = (f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else
                 "no checkpoint was written (use --checkpoint-every N)")
        raise NonFiniteLoss(f"the loss became {loss.item()} at iteration {i} (outer step "
                            f"{i // self.cfg.pgd_steps}); stopped, {where}; try a lower --lr")

    # -- the loop -----------------------------------------------------------------------------
    def train(self, checkpoint_root: str | None = None) -> None:
        cfg = self.cfg
        total_iters = cfg.pgd_steps * cfg.steps
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.iteration // cfg.pgd_steps, unit="step",
                   disable=not self.progress, dynamic_ncols=True, desc="erasing")
        t0 = time.perf_counter()
        try:
            while self.iteration < total_iters:
                records = self.run_outer_step()
                step = self.iteration // cfg.pgd_steps
                bar.set_postfix(loss=f"{records[0]['loss']:.4g}", adv=records[-1]["adv_word"],
                                refresh=False)
                bar.update(1)
                if checkpoint_root and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.timings["train_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint(checkpoint_root)
        finally:
            self.timings["train_s"] += time.perf_counter() - t0
            bar.close()

    # -- state -------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.trained}

    def save_checkpoint(self, root: str) -> str:
        from safetensors.torch import save_file

        step = self.iteration // self.cfg.pgd_steps
        final = Path(root) / f"step-{step:06d}"
        tmp = Path(root) / f".step-{step:06d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self.trained_state(), str(tmp / "trained.safetensors"))
        save_file({f"pi.{k}": p.detach().cpu().contiguous() for k, p in enumerate(self.pi)},
                  str(tmp / "pi.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "pi_optimizer": self.pi_optimizer.state_dict(),
                    "rng": self.plan.get_state()}, tmp / "state.pt")
        meta = {"format": "ap_erase_fast.checkpoint/v1", "iteration": self.iteration,
                "step": step, "config": self.cfg.to_dict(), "calls": dict(self.calls),
                "timings": self.timings, "library_version": __version__}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2))
        with open(tmp / "log.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.log)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.last_checkpoint = str(final)
        return str(final)

    def load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_file

        ckpt = resolve_checkpoint(path)
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        mine = {k: v for k, v in self.cfg.to_dict().items() if k not in RUN_CONTROL_KEYS}
        theirs = {k: v for k, v in meta["config"].items() if k not in RUN_CONTROL_KEYS}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise UserError(f"cannot resume from {ckpt}: settings differ from the checkpoint's "
                            f"({', '.join(diff)}); resume with the same settings")
        if meta["step"] > self.cfg.steps:
            raise UserError(f"checkpoint {ckpt} is at step {meta['step']}, beyond --steps "
                            f"{self.cfg.steps}")
        trained = load_file(str(ckpt / "trained.safetensors"))
        params = dict(self.trained)
        if set(trained) != set(params):
            raise UserError(f"checkpoint {ckpt} holds other trained tensors than this run")
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
            pis = load_file(str(ckpt / "pi.safetensors"))
            for k, p in enumerate(self.pi):
                p.copy_(pis[f"pi.{k}"])
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.pi_optimizer.load_state_dict(state["pi_optimizer"])
        self.plan.set_state(state["rng"])
        self.iteration = int(meta["iteration"])
        self.calls = Counter(meta["calls"])
        self.timings.update({k: v for k, v in meta["timings"].items() if k == "train_s"})
        with open(ckpt / "log.jsonl") as fh:
            self.log = [json.loads(line) for line in fh if line.strip()]
        self.last_checkpoint = str(ckpt)

    # -- summary -----------------------------------------------------------------------------
    def run_info(self) -> dict[str, Any]:
        cfg, comp = self.cfg, self.components
        outer_steps = max(self.iteration // cfg.pgd_steps, 1)
        pi_summary = {}
        for s, p in zip(self.sets, self.pi):
            probs = torch.softmax(p.detach().float().cpu(), 0)
            top = torch.argsort(probs, descending=True, stable=True)[:10]
            pi_summary[s.concept] = [{"word": s.words[j], "prob": round(float(probs[j]), 6)}
                                     for j in top.tolist()]
        import diffusers
        import transformers

        info = {
            "library": "ap_erase_fast", "library_version": __version__,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
            "config": cfg.to_dict(),
            "model": {"id": comp.model_id, "sha256": comp.content_hash,
                      "random_weights": comp.random_weights, "source": comp.source,
                      "prediction_type": self.tables.prediction_type},
            "device": str(self.device),
            "latent_shape": list(self.latent_shape),
            "preservation_sets": describe_sets(self.sets),
            "vocab_embedding_cache_hit": self.cache_hit,
            "final_pi_top": pi_summary,
            "trained_parameters": {"count": sum(p.numel() for _, p in self.trained),
                                   "tensors": len(self.trained)},
            "iterations": self.iteration, "outer_steps": self.iteration // cfg.pgd_steps,
            "unet_calls_per_outer_step": {k: v / outer_steps for k, v in sorted(self.calls.items())},
            "timings": {**{k: round(v, 3) for k, v in self.timings.items()},
                        "outer_steps_per_s": round(outer_steps / self.timings["train_s"], 4)
                        if self.timings["train_s"] > 0 else None},
        }
        if comp.random_weights:
            info["notice"] = RANDOM_WEIGHTS_NOTICE
        return info


def _compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def make_optimizer(cfg: EraseConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - missing or broken install
        raise UserError(f"--optimizer {cfg.optimizer} needs bitsandbytes ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); install it with "
                        f"pip install 'ap_erase_fast[bnb]' or use --optimizer adam") from None
    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "checkpoint.json").is_file():
        return p
    if p.is_dir():
        steps = sorted(q for q in p.glob("step-*") if (q / "checkpoint.json").is_file())
        if steps:
            return steps[-1]
    raise UserError(f"--resume {path}: not a checkpoint folder (expected a step-NNNNNN folder "
                    f"with checkpoint.json, or a folder that holds them)")

