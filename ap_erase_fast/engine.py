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

import copy
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from . import interrupts
from ._version import __version__
from .concepts import (check_concept_has_tokens, describe_sets, fixed_preservation_set,
                       select_preservation_set, vocabulary_embeddings)
from .config import EraseConfig
from .errors import UserError
from .randomness import Draws, RandomnessPlan
from .update import make_optimizer

RANDOM_WEIGHTS_NOTICE = ("The model {model!r} has RANDOM weights: this run demonstrates the "
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
    """Sets up one AP erasure and runs it. Use :func:`ap_erase_fast.erase` for the whole job.

    After :meth:`setup` the run is made of four parts, each in its own module: the backbone
    (:mod:`ap_erase_fast.backbones`, the model family), the model calls θ′/θ
    (:class:`~ap_erase_fast.calls.ModelCalls`), the search over R
    (:class:`~ap_erase_fast.search.Search`) and the θ′ update
    (:class:`~ap_erase_fast.update.ThetaUpdate`); the iteration strategies of
    :mod:`ap_erase_fast.steps` receive exactly these.
    """

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
        self.log: list[dict] = []
        self.iteration = 0
        self.timings: dict[str, float] = {"setup_s": 0.0, "train_s": 0.0}
        self.last_checkpoint: str | None = None
        self.skipped_steps: Counter = Counter()  # updates skipped for a non-finite fp16 gradient

    # -- set-up -----------------------------------------------------------------------------
    def setup(self) -> "Eraser":
        from .backbones import make_backbone
        from .calls import ModelCalls
        from .models import load_components, set_attention_backend
        from .search import Search
        from .steps import StepContext
        from .trajectories import make_source
        from .update import ThetaUpdate

        t0 = time.perf_counter()
        cfg = self.cfg
        # the fast profile in bf16/fp16 loads on the CPU: the text encoders are held in the
        # compute dtype and reach the device one at a time, the denoiser reaches it with its
        # untrained autocast weights in the compute dtype (setup_memory.py; docs/memory_flow.md)
        lowp = (None if cfg.profile == "reference" or cfg.deepspeed
                else _compute_dtype(cfg.mixed_precision, self.device))
        cast_on_move = lowp is not None and cfg.base_quantization == "none"
        comp = self.components or load_components(
            cfg.model, single_file_weights=cfg.single_file_weights, model_folder=cfg.model_folder,
            torch_dtype=torch.float32,
            # a base to quantize reaches the device layer by layer, quantized
            device=self.device if cfg.base_quantization == "none" and lowp is None else "cpu")
        self.components = comp
        for concept in cfg.erase:
            check_concept_has_tokens(comp.tokenizer, concept)
        backbone = make_backbone(comp, self.device, cfg.ddim_steps, resolution=cfg.resolution,
                                 max_sequence_length=cfg.max_sequence_length,
                                 distilled_guidance=cfg.distilled_guidance)
        if cfg.start_guidance is None:  # the model's default, recorded in run.json's config
            cfg.start_guidance = float(backbone.default_guidance)
        if lowp is not None:
            backbone.hold_text_encoders(lowp)
        self.backbone = backbone
        self.tables = backbone.tables
        self.latent_shape = backbone.latent_shape(cfg.resolution)

        null, concepts = backbone.encode([""]), [backbone.encode([c]) for c in cfg.erase]
        sets, tables = self._preservation_sets(backbone, concepts)

        # θ' (trained) and θ (the original weights).
        self.quantization = None
        if cfg.base_quantization != "none":  # θ and θ′ share the int8/NF4 base (quantization.py)
            from .quantization import quantize_base

            self.quantization = quantize_base(backbone.denoiser, cfg.base_quantization, self.device,
                                              _compute_dtype(cfg.mixed_precision, self.device))
        if not cast_on_move:
            backbone.denoiser.to(self.device)
        if cfg.lora_rank:  # θ' = adapters on the selected layers (B = 0: θ'₀ = θ)
            from .lora import attach

            self.trained = attach(backbone.denoiser, backbone.lora_targets(cfg.train_method),
                                  cfg.lora_rank, cfg.lora_alpha or float(cfg.lora_rank), cfg.seed)
        else:
            self.trained = select_trained(backbone, cfg.train_method)
        if cast_on_move:  # the rule of the cast below, applied as the fp32 model moves (adapters: fp32)
            from .setup_memory import move_denoiser

            move_denoiser(backbone.denoiser, self.device, lowp,
                          autocast_cast_parameters(backbone.denoiser) - {n for n, _ in self.trained})
        self.unet = backbone.denoiser.train()
        self.trained_names = [n for n, _ in self.trained]
        params = [p for _, p in self.trained]
        if cfg.profile == "reference":
            # The authors' cost structure: a second full UNet for θ, classic attention, and a
            # gradient for every parameter of θ' (only the selected ones are optimised).
            self.frozen = copy.deepcopy(self.unet).eval().requires_grad_(False)
            for model in (self.unet, self.frozen):
                set_attention_backend(model, "classic")
            self.unet.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=cfg.lr)
            self.compute_dtype = None
            frozen_forward = self.frozen
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
            optimizer = self._make_fast_optimizer(params)
        if cfg.lora_rank:  # θ = the same module with its adapters off: nothing is copied
            from .lora import AdapterSwitch

            self.frozen_tensors = {}
            frozen_forward = AdapterSwitch(self.unet, params).frozen_forward
            backbone.release_text_encoders()
        elif cfg.profile != "reference":
            # θ = θ' with the original values of the trained tensors: no second UNet. Each copy
            # has the dtype its forward reads: the compute dtype where autocast casts the tensor
            # anyway (bit-identical to what θ' computes with), else the live tensor's own dtype
            # (fp32 masters; bf16 when a DeepSpeed bf16 config cast the module). So θ'₀ = θ.
            self.frozen_tensors = {
                n: p.detach().to(self.compute_dtype if (self.compute_dtype is not None
                                                        and n in self.autocast_cast) else p.dtype,
                                 copy=True)
                for n, p in self.trained}
            frozen_forward = functional_forward(self.unet, self.frozen_tensors)
            # the text encoders' work is done once: "" and c_e embeddings are kept
            backbone.release_text_encoders()

        self.models = ModelCalls(backbone, frozen_forward, self.compute_dtype,
                                 self.compiled_sampler, cfg.start_guidance)
        self.models.null, self.models.concepts = null, concepts
        self.search = Search(cfg, sets, tables, null.shapes(), self.device, self.dist,
                             self.compute_dtype, self.skipped_steps)
        self.theta = ThetaUpdate(optimizer, params, self.device, self.compute_dtype,
                                 self.ds_engine, self.skipped_steps)
        b, rank = cfg.batch_size, self.dist.rank
        bank = cfg.trajectories == "bank"
        self.plan = RandomnessPlan(cfg.seed, [rank * b + k for k in range(b)],
                                   cfg.bank_size if bank else None, cfg.preserve_draws - 1)
        t_bank = time.perf_counter()
        self.trajectories = make_source(cfg, self.models, sets, tables, null.shapes(),
                                        self.latent_shape, self.dist, self.device,
                                        comp.content_hash, self.progress)
        if bank:
            self.timings["bank_s"] = time.perf_counter() - t_bank
        self.ctx = StepContext(cfg, self.models, self.search, self.theta, self.check_finite,
                               self.plan.draw_gumbel,
                               (lambda p: backbone.encode([p])) if cfg.profile == "reference"
                               else None, self.trajectories)
        self.timings["setup_s"] = time.perf_counter() - t0
        return self

    def _preservation_sets(self, backbone, concepts):
        """R per erased concept and its rows (flattened conditionings) on the device."""
        from .models import cache_root
        from .models.vocab import load_vocabulary

        cfg = self.cfg

        def rows(prompts, chunk: int = 256):  # a chunk at a time on the device (docs/memory_flow.md)
            prompts = list(prompts)
            return torch.cat([backbone.encode(prompts[i:i + chunk]).flat().cpu()
                              for i in range(0, len(prompts), chunk)]) if prompts else backbone.encode([]).flat().cpu()

        if cfg.preserve_set:  # R given by the user: no vocabulary search
            table = rows(cfg.preserve_set)
            self.cache_hit = False
            sets = [fixed_preservation_set(c, e.flat()[0].cpu(), cfg.preserve_set, table)
                    for c, e in zip(cfg.erase, concepts)]
        else:
            from .shapes.loading import VOCABULARIES

            name = cfg.vocab or VOCABULARIES.get(cfg.model)
            if name == "shapes":
                from .shapes import world  # noqa: F401  (registers the "shapes" vocabulary)
            elif name == "shapes2":
                from .shapes import world2  # noqa: F401  (registers the "shapes2" vocabulary)
            words = load_vocabulary(name)
            cache = None
            if (cfg.embedding_cache or "").lower() != "none":
                cache = cfg.embedding_cache or os.path.join(cache_root(), "embeddings")
            table, self.cache_hit = vocabulary_embeddings(
                rows, words, backbone.text_encoder_hash(), cache)
            sets = [select_preservation_set(c, e.flat()[0].cpu(), words, table, cfg.k_closest,
                                            cfg.num_centers, cfg.exclude_erased)
                    for c, e in zip(cfg.erase, concepts)]
        set_tables = [table[s.indices].to(self.device) for s in sets]
        # the memory the conditioning rows take (T5 sequences make them large: --max-sequence-length)
        self.table_bytes = {"row_floats": int(table.shape[1]), "vocabulary": table.numel() * table.element_size(),
                            "preservation_sets": sum(t.numel() * t.element_size() for t in set_tables)}
        return sets, set_tables

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

    # -- loop iterations ----------------------------------------------------------------------
    def draw(self) -> Draws:
        return self.plan.draw([len(s.words) for s in self.search.sets], self.tables,
                              self.latent_shape)

    def run_iteration(self) -> dict:
        """One faithful loop iteration (outer when iteration % P == 0, else a search step)."""
        from .steps import fast_iteration, reference_iteration

        step = reference_iteration if self.cfg.profile == "reference" else fast_iteration
        d = self.draw()
        outer = self.iteration % self.cfg.pgd_steps == 0
        return self._log(d, [step(self.ctx, d, outer)])[0]

    def run_outer_step(self) -> list[dict]:
        """One outer step: P faithful iterations, or the shared schedule's joint update."""
        from .steps import shared_outer_step

        self._refresh_bank()
        if self.cfg.schedule == "shared":
            d = self.draw()
            records = self._log(d, shared_outer_step(self.ctx, d))
            # an outer step spans P iterations whatever the schedule computes inside it
            self.iteration += self.cfg.pgd_steps - len(records)
            return records
        return [self.run_iteration() for _ in range(self.cfg.pgd_steps)]

    def _refresh_bank(self) -> None:
        """``--bank-refresh N``: before outer steps N, 2N, ... re-sample a share of the bank with
        θ′ (its time is counted apart, in ``bank_refresh_s``)."""
        n, step = self.cfg.bank_refresh, self.iteration // self.cfg.pgd_steps
        if n and step and step % n == 0:
            t0 = time.perf_counter()
            self.trajectories.refresh(self.models, self.cfg.bank_refresh_share,
                                      self.cfg.bank_build_batch, self.dist)
            self.timings["bank_refresh_s"] = self.timings.get("bank_refresh_s", 0.0) + time.perf_counter() - t0

    def _sample_record(self, s, adv_index: int, extra: list[int] | None) -> dict:
        """What a log record says of one sample: its draws, and the bank trajectories read."""
        rec = {"slot": s.slot, "concept": self.cfg.erase[s.concept], "t_ddpm": s.t_ddpm,
               "adv_index": adv_index, "adv_word": self.search.sets[s.concept].words[adv_index]}
        if s.bank_index is not None:
            rec["bank_index"] = s.bank_index
        if extra:  # --preserve-draws K > 1 (outer updates)
            rec["extra_adv_index"] = extra
            if s.bank_index is not None:
                rec["extra_bank_index"] = [m for _, m in s.extra[:len(extra)]]
        return rec

    def _log(self, d: Draws, results) -> list[dict]:
        """Log records (all ranks' samples, losses averaged over ranks) of one draw's updates."""
        records = []
        for res in results:
            extra = res.extra_indices or [None] * len(d.samples)
            samples = [self._sample_record(s, i, e) for s, i, e in zip(d.samples, res.adv_indices, extra)]
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
    def train(self, checkpoint_root: str | None = None, until: int | None = None) -> None:
        """Run the outer steps up to ``cfg.steps`` (or up to step ``until`` of them: a later call
        continues where this one stopped, exactly as one uninterrupted run)."""
        cfg = self.cfg
        total_iters = cfg.pgd_steps * (cfg.steps if until is None else min(until, cfg.steps))
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.iteration // cfg.pgd_steps, unit="step",
                   disable=not self.progress, dynamic_ncols=True, desc="erasing")
        t0 = time.perf_counter()
        try:
            while self.iteration < total_iters:
                interrupts.check()  # a Ctrl-C / SIGTERM that a __del__ swallowed
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
            interrupts.check()
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
        from .search import draw_distribution

        # what each candidate weighs in the drawn c_a
        for s, p in zip(self.search.sets, self.search.pi):
            probs = draw_distribution(p.cpu(), cfg.gumbel_mode, cfg.tau, cfg.gumbel_topk).float()
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
            "device": str(self.device), "torch_threads": torch.get_num_threads(),
            "world_size": self.dist.world, "batch_size_per_process": cfg.batch_size,
            "global_batch": self.dist.world * cfg.batch_size,
            "latent_shape": list(self.latent_shape),
            "preservation_sets": describe_sets(self.search.sets),
            "vocab_embedding_cache_hit": self.cache_hit,
            "table_bytes": getattr(self, "table_bytes", None),
            "final_pi_top": pi_summary,
            "trained_parameters": {"count": sum(p.numel() for _, p in self.trained),
                                   "tensors": len(self.trained)},
            "iterations": self.iteration, "outer_steps": self.iteration // cfg.pgd_steps,
            # sample-evaluations of this process (rank 0 under DeepSpeed); a bank's build is
            # counted apart, and amortised over the run's outer steps
            "unet_calls_per_outer_step": {k: v / outer_steps for k, v in sorted(self.models.calls.items())
                                          if k != "bank_build"},
            "unet_evals": unet_evals(self.models.calls, outer_steps),
            "trajectories": self.trajectories.info(),
            "compute_dtype": str(getattr(self, "compute_dtype", None) or torch.float32).replace("torch.", ""),
            "timings": {**{k: round(v, 3) for k, v in self.timings.items()},
                        "outer_steps_per_s": round(outer_steps / self.timings["train_s"], 4)
                        if self.timings["train_s"] > 0 else None},
        }
        if self.dist.world > 1:  # a self-check every data-parallel run reports
            from .models import module_content_hash

            mine = (module_content_hash(self.trained_state()),
                    module_content_hash({f"pi.{k}": p.detach().cpu() for k, p in enumerate(self.search.pi)}))
            hashes = self.dist.gather(mine)
            info["ranks_agree"] = {"trained": len({h[0] for h in hashes}) == 1,
                                   "pi": len({h[1] for h in hashes}) == 1}
        if self.theta.scaler.is_enabled():
            info["loss_scale"] = {"theta": self.theta.scaler.get_scale(),
                                  "pi": self.search.scaler.get_scale(),
                                  "skipped_steps": dict(self.skipped_steps)}
        info["backbone"] = self.backbone.info()
        if getattr(self, "quantization", None):
            info["base_quantization"] = self.quantization
        if comp.random_weights:
            info["notice"] = RANDOM_WEIGHTS_NOTICE.format(model=comp.model_id)
        return info


def unet_evals(calls: dict, outer_steps: int) -> dict:
    """UNet sample-evaluations per outer step: in training, in the bank's build (this process's
    share), and the two together amortised over the run's outer steps."""
    build = calls.get("bank_build", 0)
    train = sum(v for k, v in calls.items() if k != "bank_build")
    return {"per_outer_step": round(train / outer_steps, 3), "bank_build": build,
            "amortised_per_outer_step": round((train + build) / outer_steps, 3),
            "outer_steps": outer_steps}


def autocast_cast_parameters(module: torch.nn.Module) -> set[str]:
    """Names of the parameters that autocast casts to its lower-precision dtype before use:
    those of linear and convolution layers. Norm layers run in fp32 under autocast and read
    their parameters as stored; quantized weights (int8/NF4 codes) are not floats, never cast."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {f"{prefix}.{n}" if prefix else n
            for prefix, m in module.named_modules() if isinstance(m, kinds)
            for n, p in m.named_parameters(recurse=False) if p.is_floating_point()}


def _compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def functional_forward(module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """``module``'s forward with ``tensors`` in place of its parameters of the same names."""
    def forward(*args, **kwargs):
        return torch.func.functional_call(module, tensors, args, kwargs, strict=False)
    return forward


def select_trained(backbone, method: str) -> list:
    """[(name, parameter)] of the denoiser that ``method`` trains (requires_grad set on them,
    cleared on all others), in module order."""
    from .models.trainable import select_trainable

    return select_trainable(backbone.denoiser, method, backbone.is_trained)
