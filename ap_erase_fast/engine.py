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
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import __version__
from .concepts import (PreservationSet, check_concept_has_tokens, describe_sets, encode_prompts,
                       fixed_preservation_set, select_preservation_set, vocabulary_embeddings)
from .config import EraseConfig
from .errors import UserError
from .randomness import Draws, RandomnessPlan
from .sampling import DDIMTables, output_to_eps, sample_until

RANDOM_WEIGHTS_NOTICE = ("The built-in 'tiny' model has RANDOM weights: this run demonstrates the "
                         "pipeline, it erases nothing meaningful. Pass --model with a real Stable "
                         "Diffusion checkpoint for a real erasure.")


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
        from .distributed import Dist

        self.cfg = cfg.validate()
        self.components = components
        self.dist = Dist.init_deepspeed() if cfg.deepspeed else Dist()
        self.progress = ((not cfg.quiet) if progress is None else progress) and self.dist.is_main
        self.device = self.dist.device(cfg.device) if cfg.deepspeed else resolve_device(cfg.device)
        self.ds_engine = None
        self.compiled_sampler = None
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
        vocab_words = None if cfg.preserve_set else load_vocabulary(
            cfg.vocab or ("shapes" if cfg.model == "shapes" else None))
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

        if cfg.preserve_set:  # R given by the user: no vocabulary search
            vocab_emb = encode_prompts(text_encoder, comp.tokenizer, cfg.preserve_set).cpu()
            self.cache_hit = False
            self.sets: list[PreservationSet] = [
                fixed_preservation_set(c, e[0].cpu(), cfg.preserve_set, vocab_emb)
                for c, e in zip(cfg.erase, self.emb_concepts)]
        else:
            cache = None
            if (cfg.embedding_cache or "").lower() != "none":
                cache = cfg.embedding_cache or os.path.join(cache_root(), "embeddings")
            te_hash = module_content_hash(text_encoder)
            vocab_emb, self.cache_hit = vocabulary_embeddings(text_encoder, comp.tokenizer,
                                                              vocab_words, te_hash, cache)
            self.sets = [
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
            if cfg.deepspeed:  # a DeepSpeed bf16 config casts the module: compute in bf16
                from .distributed import load_deepspeed_config

                if load_deepspeed_config(cfg.deepspeed).get("bf16", {}).get("enabled"):
                    self.compute_dtype = torch.bfloat16
            if cfg.allow_tf32 and self.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            set_attention_backend(self.unet, cfg.attention)
            # Weights that autocast casts to the compute dtype anyway (linear and convolution
            # layers) are stored in it when they are not trained; everything else (norms) stays
            # fp32, so the model computed under autocast is the original one.
            self.autocast_cast = autocast_cast_parameters(self.unet)
            if self.compute_dtype is not None:
                trained_names = set(self.trained_names)
                for n, p in self.unet.named_parameters():
                    if n not in trained_names and n in self.autocast_cast:
                        p.data = p.data.to(self.compute_dtype)
            if cfg.gradient_checkpointing:
                self.unet.enable_gradient_checkpointing()
            if cfg.compile:  # the same module and parameters, traced for the sampling calls
                mode = "reduce-overhead" if self.device.type == "cuda" else "default"
                self.compiled_sampler = torch.compile(self.unet, mode=mode, dynamic=False)
            self.optimizer = self._make_fast_optimizer(params)
            # θ = θ' with the original values of the trained tensors: no second UNet. Each copy
            # has the dtype its forward reads: the compute dtype where autocast casts the tensor
            # anyway (bit-identical to what θ' computes with), else the live tensor's own dtype
            # (fp32 masters; bf16 when a DeepSpeed bf16 config cast the module). So θ'₀ = θ.
            self.frozen_tensors = {
                n: p.detach().to(self.compute_dtype if (self.compute_dtype is not None
                                                        and n in self.autocast_cast) else p.dtype,
                                 copy=True)
                for n, p in self.trained}
            # the text encoder's work is done once: "" and c_e embeddings are cached
            self.text_encoder = None
            comp.text_encoder = None

        # π: one logits vector per erased concept, uniform 1/|R|, one Adam for all of them.
        self.pi = [torch.nn.Parameter(torch.full((len(s.words),), 1.0 / len(s.words),
                                                 device=self.device)) for s in self.sets]
        self.pi_optimizer = torch.optim.Adam(self.pi, lr=cfg.search_lr)
        # fp16 compute: dynamic loss scaling, one scale for the θ' backward (which also carries
        # π's gradient in the shared schedule) and one for the π-only search backward. AP's
        # gradients are tiny (π's are ~1e-8): unscaled fp16 backwards would flush them to zero.
        fp16 = self.compute_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.pi_scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.skipped_steps = Counter()  # updates skipped for a non-finite fp16 gradient
        b, rank = cfg.batch_size, self.dist.rank
        self.plan = RandomnessPlan(cfg.seed, [rank * b + k for k in range(b)])
        self.timings["setup_s"] = time.perf_counter() - t0
        return self

    def _make_fast_optimizer(self, params):
        """The θ' optimizer; under --deepspeed, the DeepSpeed engine's (config or client one)."""
        if not self.cfg.deepspeed:
            return make_optimizer(self.cfg, params)
        import deepspeed

        from .distributed import load_deepspeed_config, prepare_deepspeed_config

        ds = prepare_deepspeed_config(load_deepspeed_config(self.cfg.deepspeed),
                                      self.cfg.batch_size, self.cfg.optimizer)
        client = None if "optimizer" in ds else make_optimizer(self.cfg, params)
        if client is not None and self.cfg.optimizer in ("adamw8bit", "paged_adamw8bit"):
            ds.setdefault("zero_allow_untested_optimizer", True)
        engine, optimizer, _, _ = deepspeed.initialize(model=self.unet, model_parameters=params,
                                                       optimizer=client, config=ds)
        self.ds_engine = engine
        self.ds_config = ds
        return optimizer

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

    # -- model calls --------------------------------------------------------------------------
    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def unet_fn(self, which: str, kind: str) -> Callable:
        """UNet output for (x, t, text) from θ' (``which="trained"``) or θ (``"frozen"``),
        counting sample-evaluations under ``kind``. Outputs are fp32."""
        unet = self.unet
        if which == "trained" and kind == "sampling" and self.compiled_sampler is not None:
            forward = self.compiled_sampler
        elif which == "trained":
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

    def query(self, which: str, kind: str, z: torch.Tensor, t: torch.Tensor,
              text: torch.Tensor) -> torch.Tensor:
        """ε-prediction of θ/θ' for latents z [N, ...] at DDPM timesteps t [N] (long)."""
        out = self.unet_fn(which, kind)(z, t, text)
        if self.tables.prediction_type == "epsilon":
            return out
        alpha = self.tables.alphas_cumprod.to(z.device)[t].float().view(-1, 1, 1, 1)
        return output_to_eps(out, z, alpha, self.tables.prediction_type)

    def sample(self, x_T: torch.Tensor, cond: torch.Tensor, t_enc: int) -> torch.Tensor:
        """Truncated trajectories with θ' for a batch of conditions (one UNet call per step)."""
        b = cond.shape[0]
        x = x_T.expand(b, *x_T.shape[1:]) if x_T.shape[0] != b else x_T
        uncond = self.emb_null.expand(b, *self.emb_null.shape[1:])
        return sample_until(self.unet_fn("trained", "sampling"), x, cond, uncond, self.tables,
                            t_enc, self.cfg.start_guidance)

    def draw_adversarial(self, concept: int, gumbel: torch.Tensor,
                         with_grad: bool = True) -> tuple[torch.Tensor, int]:
        """c_a from π[c_e]: [1, L, D] (differentiable in π when ``with_grad``) and the index of
        the drawn word."""
        from .ops import gumbel_mix

        cfg = self.cfg
        pi = self.pi[concept] if with_grad else self.pi[concept].detach()
        out, index = gumbel_mix(pi[None], self.r_tables[concept], tau=cfg.tau,
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
        d = self.draw()
        return self._log(d, [step(self, d)])[0]

    def run_outer_step(self) -> list[dict]:
        """One outer step: P faithful iterations, or the shared schedule's joint update."""
        from .steps import shared_outer_step

        if self.cfg.schedule == "shared":
            d = self.draw()
            records = self._log(d, shared_outer_step(self, d))
            # an outer step spans P iterations whatever the schedule computes inside it
            self.iteration += self.cfg.pgd_steps - len(records)
            return records
        return [self.run_iteration() for _ in range(self.cfg.pgd_steps)]

    def _log(self, d: Draws, results) -> list[dict]:
        """Log records (all ranks' samples, losses averaged over ranks) of one draw's updates."""
        records = []
        for res in results:
            samples = [{"slot": s.slot, "concept": self.cfg.erase[s.concept], "t_ddpm": s.t_ddpm,
                        "adv_index": i, "adv_word": self.sets[s.concept].words[i]}
                       for s, i in zip(d.samples, res.adv_indices)]
            terms = [res.loss, res.loss_preserve] + ([res.loss_erase] if res.loss_erase is not None
                                                      else [])
            values = self.dist.mean_(torch.stack([t.detach().float().cpu() for t in terms]))
            rec = {"iter": self.iteration, "step": self.iteration // self.cfg.pgd_steps,
                   "kind": res.kind, "t_enc": d.t_enc,
                   "samples": [x for part in self.dist.gather(samples) for x in part],
                   "loss": values[0].item(),
                   "loss_erase": values[2].item() if len(values) > 2 else None,
                   "loss_preserve": values[1].item()}
            self.log.append(rec)
            records.append(rec)
            self.iteration += 1
        return records

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

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` for θ' (and π where the graph reaches it), loss-scaled in fp16;
        through the DeepSpeed engine when there is one. Follow with :meth:`step_theta`."""
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step_theta(self) -> None:
        """Descent step of θ' on the gradients of the last :meth:`backward` (skipped, and the
        loss scale lowered, when an fp16 gradient overflowed)."""
        if self.ds_engine is not None:
            self.ds_engine.step()
            return
        self._scaled_step(self.scaler, self.optimizer, "theta")

    def step_optimizer(self, loss: torch.Tensor) -> None:
        """Descent step of θ' on ``loss``."""
        self.backward(loss)
        self.step_theta()

    def _scaled_step(self, scaler, optimizer, name: str) -> None:
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:
            self.skipped_steps[name] += 1

    def search_gradients(self, loss: torch.Tensor, pis: list[torch.Tensor]):
        """Gradients of ``loss`` in ``pis`` alone, scaled by the π loss scale in fp16 (pass them
        to :meth:`step_pi` as they are)."""
        return torch.autograd.grad(self.pi_scaler.scale(loss), pis)

    def step_pi(self, grads: dict[int, torch.Tensor], scaler=None) -> None:
        """Step the π's along ``grads`` (concept → gradient of the loss to minimise).

        ``scaler``: the loss scaler the gradients were scaled by (default: the π search
        scaler; pass :attr:`scaler` for gradients of the θ' backward, before
        :meth:`step_theta`). A step of non-finite fp16 gradients is skipped.
        Data-parallel: gradients are averaged over ranks (a π no rank drew keeps no gradient,
        as in a single process), so π and its Adam state stay identical everywhere.
        Under ``--search random`` π is never stepped: it stays uniform, every draw is uniform.
        """
        self.pi_optimizer.zero_grad(set_to_none=True)
        if self.cfg.search == "random":
            return
        if self.dist.world > 1:
            flat = torch.cat([grads[c].detach().float().reshape(-1) if c in grads
                              else torch.zeros(len(p), device=p.device)
                              for c, p in enumerate(self.pi)])
            used = torch.tensor([1.0 if c in grads else 0.0 for c in range(len(self.pi))])
            flat = self.dist.mean_(flat.cpu()).to(self.device)
            used = self.dist.mean_(used)
            sizes = [len(p) for p in self.pi]
            grads = {c: g.view_as(self.pi[c]) for c, g in enumerate(flat.split(sizes))
                     if used[c] > 0}
        for c, g in grads.items():
            self.pi[c].grad = g
        if scaler is None or scaler is self.pi_scaler:
            self._scaled_step(self.pi_scaler, self.pi_optimizer, "pi")
        else:  # the θ' scaler: its update follows in step_theta
            scaler.step(self.pi_optimizer)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop (on every rank) when a loss is NaN or infinite; the last checkpoint stays."""
        if not self.dist.any_true(not torch.isfinite(loss).item()):
            return
        i = self.iteration
        where = (f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else
                 "no checkpoint was written (use --checkpoint-every N)")
        value = loss.item() if not torch.isfinite(loss).item() else "non-finite on another rank"
        raise NonFiniteLoss(f"the loss became {value} at iteration {i} (outer step "
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
                bar.set_postfix(loss=f"{records[0]['loss']:.4g}", adv=records[-1]["samples"][0]["adv_word"],
                                refresh=False)
                bar.update(1)
                # the last step is always checkpointed: a finished training survives a
                # failure to write the outputs
                if checkpoint_root and cfg.checkpoint_every and (
                        step % cfg.checkpoint_every == 0 or step == cfg.steps):
                    self.timings["train_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint(checkpoint_root)
        finally:
            self.timings["train_s"] += time.perf_counter() - t0
            bar.close()

    # -- state -------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors of θ' (fp32 master values under DeepSpeed bf16)."""
        out = {}
        for name, p in self.trained:
            value = p.detach()
            if self.ds_engine is not None and p.dtype != torch.float32:
                from deepspeed.utils import safe_get_full_fp32_param

                value = safe_get_full_fp32_param(p)
            out[name] = value.to("cpu", copy=True).contiguous()
        return out

    def save_checkpoint(self, root: str) -> str:
        """Everything a bit-exact resume needs, in ``root/step-NNNNNN`` (see
        :mod:`ap_erase_fast.checkpoint`)."""
        from .checkpoint import save_checkpoint

        path = save_checkpoint(self, root)
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: str) -> None:
        from .checkpoint import load_checkpoint

        load_checkpoint(self, path)

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
            "world_size": self.dist.world, "batch_size_per_process": cfg.batch_size,
            "global_batch": self.dist.world * cfg.batch_size,
            "latent_shape": list(self.latent_shape),
            "preservation_sets": describe_sets(self.sets),
            "vocab_embedding_cache_hit": self.cache_hit,
            "final_pi_top": pi_summary,
            "trained_parameters": {"count": sum(p.numel() for _, p in self.trained),
                                   "tensors": len(self.trained)},
            "iterations": self.iteration, "outer_steps": self.iteration // cfg.pgd_steps,
            # sample-evaluations of this process (rank 0 under DeepSpeed)
            "unet_calls_per_outer_step": {k: v / outer_steps for k, v in sorted(self.calls.items())},
            "compute_dtype": str(getattr(self, "compute_dtype", None) or torch.float32).replace("torch.", ""),
            "timings": {**{k: round(v, 3) for k, v in self.timings.items()},
                        "outer_steps_per_s": round(outer_steps / self.timings["train_s"], 4)
                        if self.timings["train_s"] > 0 else None},
        }
        if self.dist.world > 1:  # a self-check every data-parallel run reports
            from .models import module_content_hash

            mine = (module_content_hash(self.trained_state()),
                    module_content_hash({f"pi.{k}": p.detach().cpu() for k, p in enumerate(self.pi)}))
            hashes = self.dist.gather(mine)
            info["ranks_agree"] = {"trained": len({h[0] for h in hashes}) == 1,
                                   "pi": len({h[1] for h in hashes}) == 1}
        if self.scaler.is_enabled():
            info["loss_scale"] = {"theta": self.scaler.get_scale(), "pi": self.pi_scaler.get_scale(),
                                  "skipped_steps": dict(self.skipped_steps)}
        if comp.random_weights:
            info["notice"] = RANDOM_WEIGHTS_NOTICE
        return info


def autocast_cast_parameters(module: torch.nn.Module) -> set[str]:
    """Names of the parameters that autocast casts to its lower-precision dtype before use:
    those of linear and convolution layers. Norm layers run in fp32 under autocast and read
    their parameters as stored."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {f"{prefix}.{n}" if prefix else n
            for prefix, m in module.named_modules() if isinstance(m, kinds)
            for n, _ in m.named_parameters(recurse=False)}


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
