"""One configuration for every entry point: command-line flags, YAML/JSON files and Python.

Every field of :class:`EraseConfig` is a command-line flag (``train_method`` → ``--train-method``)
and a key of a ``--config`` file (``train_method`` or ``train-method``). Flags override the file;
an unknown key in a file is an error that names it. Validation happens up front, before any model
is loaded, so a typo costs a second, not a model load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .concept_args import parse_concepts, parse_prompt_list
from .errors import UserError
from .model_bounds import check_model_bounds

TRAIN_METHODS = ("xattn", "noxattn", "full", "selfattn", "xattn_kv")
SCHEDULES = ("faithful", "shared")
PROFILES = ("fast", "reference")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
ATTENTION = ("sdpa", "classic", "xformers")
OPTIMIZERS = ("adam", "adamw", "adamw8bit", "paged_adamw8bit")
BASE_QUANTIZATIONS = ("none", "int8", "nf4")
GUMBEL_MODES = ("hard", "soft", "topk")
LOSS_SPACES = ("x0", "eps")
SEARCHES = ("adversarial", "random")
SEARCH_SCORES = ("mse", "normalised")
SEARCH_ESTIMATORS = ("pathwise", "score")
TRAJECTORIES = ("student", "base", "bank")
POSITIVE_FLOATS = ("lr", "search_lr", "tau")
NON_NEGATIVE_FLOATS = ("negative_guidance", "preserve_weight", "weight_decay", "start_guidance",
                       "distilled_guidance")


def _opt(help: str, group: str, **kw: Any) -> Any:
    """A dataclass field with the metadata the argument parser is generated from."""
    default = kw.pop("default", None)
    meta = {"help": help, "group": group, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EraseConfig:
    # --- model -----------------------------------------------------------------------------
    model: str = _opt(
        "The model to erase from: 'tiny', 'tiny-sdxl', 'tiny-sd3' or 'tiny-flux' (built-in SD1-, "
        "SDXL-, SD3- and FLUX.1-dev-shaped demo models with random weights), 'shapes' / 'shapes2' / 'shapes2-flow' (the built-in trained ShapesWorld models; shapes2-flow is a flow-matching transformer), a diffusers "
        "pipeline folder (SD1.x, SD2.x, SDXL, SD3/SD3.5, FLUX.1), a Hugging Face hub id (needs network or a filled "
        "cache), or a single-file .safetensors/.ckpt checkpoint (CompVis layout for SD1/SD2, SGM "
        "layout for SDXL; an SD3.5 or FLUX.1 .safetensors file placed in its base model's diffusers "
        "folder, which supplies the tokenizers, scheduler and whatever the file lacks).", "model",
        default="tiny")
    single_file_weights: str = _opt(
        "Which UNet weights to take from a single-file checkpoint that holds both: 'non-ema' (the "
        "authors' choice) or 'ema'.", "model", default="non-ema", choices=("non-ema", "ema"))
    model_folder: str | None = _opt(
        "For an SD3.5 or FLUX.1 single-file --model: the base model's diffusers folder that supplies "
        "the tokenizers, scheduler and whatever the file lacks (text encoders, VAE); default: the "
        "folder the file lies in.", "model")
    resolution: int | None = _opt(
        "Image resolution in pixels of the sampled trajectories (a multiple of 64 for SD: VAE "
        "factor 8 times the UNet's downsampling 8); default: the model's native size (512 for "
        "SD1.x, 768 for SD2.x-v, 1024 for SDXL, SD3 and FLUX, 16 for tiny and tiny-sdxl (and tiny-sd3, tiny-flux), 32 for shapes and "
        "shapes2); at most 4 times that.", "model")
    device: str = _opt("Device: 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'.", "model",
                       default="auto")
    max_sequence_length: int | None = _opt(
        "SD3/FLUX: T5 tokens per prompt (1 to 512). Bounds the conditioning, hence the R tables "
        "(run.json: table_bytes); default: the pipeline's, 256 for SD3 and FLUX.1-schnell, 512 "
        "for FLUX.1-dev.", "model")
    distilled_guidance: float | None = _opt(
        "FLUX.1-dev: the guidance value fed to its guidance embedding in every call, θ and θ', "
        "conditional or not (default 3.5, FluxPipeline's).", "model")
    # --- what to erase -------------------------------------------------------------------------
    erase: list[str] = _opt(
        "Concept(s) to erase: one concept, a comma-separated list (\"a, b, c\"), or a text file with "
        "one concept per line.", "erase", default=[])
    train_method: str = _opt(
        "Which UNet parameters are fine-tuned: xattn (cross-attention; objects, artists), noxattn "
        "(all but cross-attention, time embedding and output layers; nudity), full, selfattn, "
        "xattn_kv.", "erase", default="xattn", choices=TRAIN_METHODS)
    lora_rank: int = _opt(
        "Erase with LoRA adapters of this rank on the layers --train-method selects (0: fine-tune "
        "the selected weights themselves). θ is the model with the adapters off: no frozen copy; "
        "the output is a LoRA (diffusers and kohya/A1111 formats).", "erase", default=0)
    lora_alpha: float | None = _opt("LoRA alpha (scale alpha/rank); default: the rank.", "erase")
    merge: bool = _opt("With --lora-rank: also write the denoiser with the adapters merged in "
                       "(unet/), as a full fine-tuning run does.", "erase", default=False)
    base_quantization: str = _opt(
        "With --lora-rank: store the frozen base denoiser's linear layers in 8 bits (int8) or "
        "4-bit NormalFloat (nf4) through bitsandbytes; θ (adapters off) and θ′ (adapters on) "
        "share the quantized weights (docs/memory_flow.md). Not with --merge.", "erase",
        default="none", choices=BASE_QUANTIZATIONS)
    negative_guidance: float = _opt(
        "η: strength of the negative-guidance target ε(\"\") − η·(ε(c_e) − ε(\"\")).", "erase",
        default=1.0)
    preserve_weight: float = _opt("λ: weight of the preservation term.", "erase", default=1.0)
    preserve_draws: int = _opt(
        "K: candidates c_a drawn from π per sample for the preservation term of θ′'s update, "
        "which averages their K errors (the authors: 1). Each further draw costs a trajectory "
        "of its own under --trajectories student/base and only two UNet evaluations (plus a "
        "backward) with a bank. The search steps keep one draw. A deviation, ALGORITHM.md §10.",
        "erase", default=1)
    loss_space: str = _opt(
        "Where the losses are measured: x0 (the authors' choice; weights noisy timesteps up) or "
        "eps (plain ε-space MSE, as ESD).", "erase", default="x0", choices=LOSS_SPACES)
    # --- adversarial search --------------------------------------------------------------------
    vocab: str | None = _opt(
        "Word list the preservation set R is chosen from: a .txt (one word or phrase per line), a "
        ".csv with a 'word' column, or a built-in list by name: 'en' (3000 common English words) "
        "'shapes' (ShapesWorld captions and distractor words) or 'shapes2' (ShapesWorld 2 training "
        "captions). Default: the model's own list for --model shapes / shapes2 / shapes2-flow, else 'en'.", "search")
    k_closest: int = _opt("Keep the k vocabulary words closest (L2 in text-embedding space) to "
                          "each erased concept.", "search", default=1000)
    num_centers: int = _opt("1-D k-means centres over those k scores: |R| ≤ num_centers "
                            "(with k ≤ num_centers, R is the k closest words, as the authors do).",
                            "search", default=100)
    exclude_erased: bool = _opt(
        "Drop the erased concept from R: its own words and every phrase containing it (\"a red "
        "circle\" for \"circle\"). The authors keep them.", "search", default=False)
    preserve_set: list[str] = _opt(
        "Use exactly these prompts as R instead of choosing R from the vocabulary: a comma-"
        "separated list or a file with one per line; \"\" stands for the empty prompt. With one "
        "prompt this is fixed preservation.", "search", default=[])
    search: str = _opt(
        "How the preserved concept c_a is chosen from R: adversarial (Gumbel-Softmax draw from π, "
        "which the inner maximisation learns; the paper) or random (a uniform draw for every "
        "sample, π never updated: the control for the search, at the same cost).", "search",
        default="adversarial", choices=SEARCHES)
    search_score: str = _opt(
        "What the search maximises for a drawn candidate c_a: mse (its preservation error "
        "‖θ′(z_r, c_a) − θ(z_r, c_a)‖², the paper) or normalised (that error divided by the "
        "candidate's own signal ‖θ(z_r, c_a) − θ(z_r, \"\")‖² at the same latents: damage relative "
        "to what the concept has to lose; a deviation, ALGORITHM.md §10). Only π's gradient "
        "changes: θ′'s loss and update are the same.", "search", default="mse",
        choices=SEARCH_SCORES)
    search_estimator: str = _opt(
        "How π's gradient is estimated: pathwise (through the Gumbel-Softmax relaxation of the "
        "drawn embedding, straight-through for the hard draw; the paper) or score (the "
        "score-function estimator of the expected preservation error over the hard draw, with "
        "the batch's other samples of the same concept as baseline: unbiased for E_k[ℓ(k)], "
        "needs no backward through the denoiser; a deviation, ALGORITHM.md §10). θ′'s loss and "
        "update are the same.", "search", default="pathwise", choices=SEARCH_ESTIMATORS)
    tau: float = _opt("Gumbel-Softmax temperature τ.", "search", default=2.0)
    gumbel_mode: str = _opt(
        "Draw of the adversarial concept: hard (one real word, straight-through gradient; the "
        "paper), soft (a mixture), topk (mixture of the --gumbel-topk most likely).", "search",
        default="hard", choices=GUMBEL_MODES)
    gumbel_topk: int = _opt("k for --gumbel-mode topk.", "search", default=5)
    search_lr: float = _opt("Adam learning rate of the search logits π.", "search", default=1e-2)
    embedding_cache: str | None = _opt(
        "Folder for cached vocabulary text embeddings (default: ~/.cache/ap_erase_fast/"
        "embeddings; 'none' disables the cache).", "search")
    # --- schedule ---------------------------------------------------------------------------
    steps: int = _opt("Outer steps (updates of the fine-tuned UNet; the authors' 'iterations').",
                      "schedule", default=1000)
    pgd_steps: int = _opt(
        "P: loop iterations per outer step; P − 1 of them are search (π) steps.", "schedule",
        default=2)
    schedule: str = _opt(
        "Loop schedule: faithful (the authors' alternation, fresh samples every iteration) or "
        "shared (one sampled batch and one frozen-output cache per outer step serve both the π "
        "and the θ' update: a deviation from the authors, about half the cost).",
        "schedule", default="faithful", choices=SCHEDULES)
    profile: str = _opt(
        "Execution profile: fast (the same computation without waste: batched UNet calls, "
        "mixed precision, SDPA attention, π-only backward in search steps) or reference (fp32, "
        "classic attention, separate calls, everything recomputed: the authors' cost structure; "
        "the oracle and baseline for the fast profile).", "schedule", default="fast",
        choices=PROFILES)
    batch_size: int = _opt(
        "Samples per outer step on each process (the authors: 1). Each sample draws its own "
        "concept, Gumbel noise and x_T; t_enc is shared. Set by DeepSpeed's "
        "train_micro_batch_size_per_gpu when --deepspeed is used.", "schedule", default=1)
    ddim_steps: int = _opt("DDIM steps of the sampling schedule the trajectories follow.",
                           "schedule", default=50)
    start_guidance: float | None = _opt(
        "Classifier-free guidance scale of the sampled trajectories; default: the model's, 3 (the "
        "authors' value; SD, SDXL, SD3) or 1 for FLUX.1 (guidance-distilled: plain conditional "
        "sampling; above 1 it is FluxPipeline's true_cfg_scale). The run records the value used.",
        "schedule")
    trajectories: str = _opt(
        "Where the latents z and z_r come from: student (sampled every iteration with the model "
        "being trained; the authors' algorithm), base (sampled every iteration with the frozen "
        "original model, as ESD's diffusers rewrite does) or bank (--bank-size trajectories per "
        "prompt sampled once with the frozen model before training, every intermediate state "
        "kept, each sample reading one trajectory at its t_enc: no sampling during training). "
        "base and bank are deviations, ALGORITHM.md §10.", "schedule", default="student",
        choices=TRAJECTORIES)
    bank_size: int = _opt(
        "M: trajectories per prompt in the bank (each erased concept and each member of R; "
        "all prompts share the same M starting noises).", "schedule", default=4)
    bank_seed: int | None = _opt(
        "Seed of the bank's starting noises (default: --seed). A fixed --bank-seed lets runs "
        "with different seeds share one --bank-file.", "schedule")
    bank_file: str | None = _opt(
        "A .safetensors file for the bank: loaded when it exists (refused when it was built for "
        "another model, R, seed or sampler), else built and saved there for later runs.",
        "schedule")
    bank_build_batch: int = _opt(
        "Trajectories per sampling call while the bank is built.", "schedule", default=16)
    bank_refresh: int = _opt(
        "Every N outer steps (0: never) re-sample a share of the bank's trajectories with θ′, "
        "the model being trained, from the same starting noises, so that the bank follows the "
        "erasure as the authors' trajectories do (a bank's states are then saved in checkpoints).",
        "schedule", default=0)
    bank_refresh_share: float = _opt(
        "Share of the bank's M·P trajectories each refresh re-samples, in a fixed cyclic order "
        "(every trajectory once per ⌈1 / share⌉ refreshes).", "schedule", default=0.25)
    bank_on_device: bool = _opt(
        "Keep the bank on the model's device (GPU) instead of in CPU memory.", "schedule",
        default=False)
    seed: int = _opt("Seed of every random draw; same seed and settings give bit-identical "
                     "results on the same machine with the same number of CPU threads "
                     "(--threads, OMP_NUM_THREADS): CPU kernels split their sums by thread.",
                     "schedule", default=0)
    # --- optimisation -----------------------------------------------------------------------
    lr: float = _opt("Adam learning rate of the fine-tuned UNet parameters.", "optim",
                     default=1e-5)
    optimizer: str = _opt(
        "Optimizer of the fine-tuned parameters: adam (the authors'), adamw, adamw8bit or "
        "paged_adamw8bit (bitsandbytes, 8-bit states; install ap_erase_fast[bnb]). The "
        "reference profile always uses adam.", "optim", default="adam", choices=OPTIMIZERS)
    weight_decay: float = _opt("Weight decay of adamw/adamw8bit (the authors use none).",
                               "optim", default=0.0)
    mixed_precision: str = _opt(
        "Fast profile compute precision: auto (bf16 on CUDA, fp32 on CPU), no (fp32), bf16, "
        "fp16 (with dynamic loss scaling). Trained parameters, norm layers and optimizer states "
        "stay fp32.", "optim", default="auto",
        choices=MIXED_PRECISION)
    allow_tf32: bool = _opt("Allow TF32 matmuls on Ampere+ GPUs (fast profile).", "optim",
                            default=False)
    attention: str = _opt(
        "Fast profile attention: sdpa (torch scaled_dot_product_attention: flash / "
        "memory-efficient kernels), xformers (GPU, install ap_erase_fast[xformers]) or classic "
        "(the reference's).", "optim", default="sdpa", choices=ATTENTION)
    gradient_checkpointing: bool = _opt(
        "Recompute UNet activations in the backward pass (less memory, ~30% more time).",
        "optim", default=False)
    compile: bool = _opt(
        "torch.compile the no-grad sampling step, the fixed-shape call that is ~90% of the work "
        "(CUDA graphs on GPU via mode reduce-overhead; one graph per batch shape, reused for "
        "every trajectory length). The first steps pay the compilation (tens of seconds).",
        "optim", default=False)
    # --- distributed ------------------------------------------------------------------------
    deepspeed: str | None = _opt(
        "DeepSpeed config (JSON) for data-parallel training: run under the deepspeed launcher "
        "or torchrun for several processes. An 'ap_erase' section in it may hold any of these "
        "settings. ZeRO stages 0-2, fp32 or bf16.", "distributed")
    # --- output -----------------------------------------------------------------------------
    output: str | None = _opt(
        "Output folder (must be empty or absent unless --overwrite; locked while the run is "
        "on, so a second run aimed at it stops at once). Default: "
        "outputs/<concepts>-<model>-seed<seed>-<date-time>.", "output")
    overwrite: bool = _opt(
        "Replace a non-empty output folder, only if ap_erase_fast wrote it (it holds this "
        "library's run.json); the old folder is removed only after the new one is in place.",
        "output", default=False)
    checkpoint_every: int = _opt(
        "Write a resumable checkpoint every N outer steps into <output>.checkpoints/ (0: never).",
        "output", default=0)
    resume: str | None = _opt(
        "Resume from a checkpoint: 'auto' (the newest intact checkpoint of this --output's run; "
        "none yet: start from step 0), a step-NNNNNN folder (used as it is), or a .checkpoints "
        "folder (its newest intact one). Checkpoints are verified against their manifest of "
        "sizes and sha256 hashes first.", "output")
    resume_fallback: bool = _opt(
        "When the newest checkpoint is damaged, say so and resume from the newest intact one "
        "(resumption is bit-exact from any of them; only time is lost). --no-resume-fallback "
        "stops instead.", "output", default=True)
    quiet: bool = _opt("No progress bar and no summary, only errors.", "output", default=False)

    # -------------------------------------------------------------------------------------------
    def validate(self) -> "EraseConfig":
        """Check every value that can be checked without loading a model."""
        if not self.erase or not any(c.strip() for c in self.erase):
            raise UserError("nothing to erase: pass --erase \"concept\" (or a comma-separated "
                            "list, or a file with one concept per line)")
        for name in ("steps", "pgd_steps", "k_closest", "num_centers", "ddim_steps",
                     "gumbel_topk", "batch_size", "bank_size", "bank_build_batch", "preserve_draws"):
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1 (got {getattr(self, name)})")
        if self.ddim_steps < 2:
            raise UserError(f"--ddim-steps must be at least 2 (got {self.ddim_steps})")
        if self.pgd_steps < 2:
            raise UserError(f"--pgd-steps must be at least 2 (one outer step plus at least one "
                            f"search step; got {self.pgd_steps})")
        if self.profile == "reference" and self.schedule != "faithful":
            raise UserError("--profile reference runs the authors' loop; it supports only "
                            "--schedule faithful (use --profile fast for --schedule shared)")
        if self.search_estimator == "score" and (self.gumbel_mode != "hard" or self.profile != "fast"
                                                 or self.search_score != "mse"):
            raise UserError("--search-estimator score estimates the gradient of a hard draw in the fast "
                            "profile with the mse score: use --gumbel-mode hard, --profile fast and "
                            "--search-score mse with it")
        if self.trajectories == "bank" and self.gumbel_mode != "hard":
            raise UserError(f"--trajectories bank holds trajectories of the prompts of R, and "
                            f"--gumbel-mode {self.gumbel_mode} preserves mixtures of them; use "
                            f"--gumbel-mode hard or --trajectories base")
        if self.trajectories != "bank" and (self.bank_file or self.bank_seed is not None):
            raise UserError("--bank-file and --bank-seed belong to --trajectories bank; add "
                            "--trajectories bank or drop them")
        if self.bank_refresh and self.trajectories != "bank":
            raise UserError("--bank-refresh re-samples a bank: add --trajectories bank or drop it")
        if self.bank_refresh < 0 or not 0 < self.bank_refresh_share <= 1:
            raise UserError(f"--bank-refresh must be 0 (never) or a number of outer steps, and "
                            f"--bank-refresh-share in (0, 1] (got {self.bank_refresh}, "
                            f"{self.bank_refresh_share})")
        if self.bank_seed is not None and not 0 <= self.bank_seed < 2 ** 63:
            raise UserError(f"--bank-seed must be between 0 and 2^63 - 1 (got {self.bank_seed})")
        if self.deepspeed and self.profile != "fast":
            raise UserError("--deepspeed runs the fast profile; drop --profile reference")
        if self.lora_rank < 0:
            raise UserError(f"--lora-rank must be 0 (no LoRA) or positive (got {self.lora_rank})")
        if self.lora_rank and self.profile == "reference":
            raise UserError("--lora-rank runs the fast profile; drop --profile reference")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UserError(f"--lora-alpha must be positive (got {self.lora_alpha})")
        if self.merge and not self.lora_rank:
            raise UserError("--merge merges LoRA adapters: it needs --lora-rank")
        if self.deepspeed and self.mixed_precision == "fp16":
            raise UserError("--mixed-precision fp16 is not supported with --deepspeed (its loss "
                            "scaling is single-process); use --mixed-precision bf16")
        if self.checkpoint_every < 0:
            raise UserError("--checkpoint-every must be 0 (off) or a positive number of steps")
        self._validate_numbers()
        if self.resolution is not None and self.resolution <= 0:
            raise UserError(f"--resolution must be positive (got {self.resolution})")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise UserError(f"--max-sequence-length must be between 1 and 512 T5 tokens "
                            f"(got {self.max_sequence_length})")
        if self.vocab is not None and not self.preserve_set:
            from .models.vocab import check_vocabulary_name

            check_vocabulary_name(self.vocab)
        if self.gumbel_mode == "topk":
            size, what = ((len(self.preserve_set), "the --preserve-set prompts")
                          if self.preserve_set else
                          (min(self.k_closest, self.num_centers),
                           "at most min(--k-closest, --num-centers) candidates"))
            if self.gumbel_topk > size:
                raise UserError(f"--gumbel-topk {self.gumbel_topk} is larger than R ({size}: "
                                f"{what}), so it would mix all of R; use --gumbel-topk {size} "
                                f"or less (or --gumbel-mode soft to mix all of R)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"unknown --{_flag(f.name)} {getattr(self, f.name)!r}; choose one "
                                f"of: {', '.join(choices)}")
        from .quantization import check_settings  # --base-quantization's companions

        check_settings(self)
        return self

    def _validate_numbers(self) -> None:
        """Every float option is a finite number; rates, temperatures and weights have the
        sign their meaning needs."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(EraseConfig.__dataclass_fields__[f.name].default, float)
                    or (isinstance(value, float) and not isinstance(value, bool))):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"--{_flag(f.name)} must be a number (got {value!r})")
            if not math.isfinite(value):
                raise UserError(f"--{_flag(f.name)} must be a finite number (got {value})")
            if f.name in POSITIVE_FLOATS and value <= 0:
                raise UserError(f"--{_flag(f.name)} must be positive (got {value})")
            if f.name in NON_NEGATIVE_FLOATS and value < 0:
                raise UserError(f"--{_flag(f.name)} must be 0 or more (got {value})")
        if not 0 <= self.seed < 2 ** 63:
            raise UserError(f"--seed must be between 0 and 2^63 - 1 (got {self.seed})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "EraseConfig":
        cfg = cls()
        apply_mapping(cfg, data, source)
        return cfg


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    name = f.name
    default = EraseConfig.__dataclass_fields__[name].default
    if name == "erase":
        return parse_concepts(value)
    if name == "preserve_set":
        return parse_prompt_list(value)
    if value is None:
        return None
    kind = type(default) if default is not None and default is not dataclasses.MISSING else None
    if name in ("resolution", "bank_seed", "max_sequence_length"):
        kind = int
    if name in ("lora_alpha", "start_guidance", "distilled_guidance"):
        kind = float
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: key '{name}' has value {value!r}, expected "
                        f"{kind.__name__ if kind else 'a string'}") from None


def apply_mapping(cfg: EraseConfig, data: dict[str, Any], source: str) -> None:
    known = {f.name: f for f in fields(EraseConfig)}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == "config":
            continue
        if key not in known:
            raise UserError(f"{source}: unknown key '{raw_key}' (known keys: see "
                            f"'ap-erase train --help' or docs/CONFIG.md)")
        setattr(cfg, key, _coerce(known[key], value, source))


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML or "
                        f"JSON") from None
    if not text.strip():
        raise UserError(f"config file {path} is empty; put settings in it as keys (e.g. "
                        f"'steps: 200') or leave --config out")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"config file {path} does not parse: {first}") from None
    if data is None or data == {}:
        raise UserError(f"config file {path} holds no settings; put settings in it as keys "
                        f"(e.g. 'steps: 200') or leave --config out")
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


# ----------------------------------------------------------------------------------------------
# argparse generated from the dataclass
# ----------------------------------------------------------------------------------------------
_GROUP_TITLES = {
    "model": "model", "erase": "erasure", "search": "adversarial search (preservation set R, π)",
    "schedule": "schedule and sampling", "optim": "optimisation",
    "distributed": "distributed (DeepSpeed)", "output": "output and runs",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file with any of these options as keys "
                             "(train_method or train-method), or a DeepSpeed config; flags "
                             "override the file.")
    # set by the deepspeed launcher; the rank is read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    groups = {k: parser.add_argument_group(v) for k, v in _GROUP_TITLES.items()}
    for f in fields(EraseConfig):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + _flag(f.name)
        help_text = meta["help"].replace("%", "%%")  # argparse %-formats help strings
        group = groups[meta["group"]]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text
                               + f" (default: {default})", **kw)
            continue
        if default not in (None, []):
            help_text += f" (default: {default})"
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if isinstance(default, int):
            kw["type"] = int
        elif isinstance(default, float):
            kw["type"] = float
        elif f.name in ("resolution", "bank_seed", "max_sequence_length"):
            kw["type"] = int
        if f.name == "erase":
            kw["metavar"] = "CONCEPTS"
        if f.name == "preserve_set":
            kw["metavar"] = "PROMPTS"
        group.add_argument(flag, help=help_text, **kw)
    # a setting of the process, not of the erasure (results depend on it only in the last
    # bits), so it is not an EraseConfig field: the command line applies it
    groups["model"].add_argument(
        "--threads", metavar="N", type=int, default=argparse.SUPPRESS,
        help=THREADS_HELP.replace("%", "%%"))


THREADS_HELP = (
    "CPU threads of torch's operations (intra-op). Default: torch's own choice (OMP_NUM_THREADS "
    "when set, else one per core). On a machine that other jobs keep busy, fewer threads than "
    "cores can be many times faster (--threads 1 for the tiny model); results are bit-identical "
    "only at the same thread count. Also a key of --config FILE.")


def threads_setting(value: Any, source: str) -> int:
    """The thread count of ``--threads`` (or a config file's ``threads``), checked."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        value = str(value)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: threads must be a whole number of CPU threads (got "
                        f"{value!r})") from None
    if n < 1:
        raise UserError(f"{source}: threads must be at least 1 (got {n}); leave it out for "
                        f"torch's default")
    return n


def config_from_args(args: argparse.Namespace) -> EraseConfig:
    """Settings file, then the DeepSpeed config's ``ap_erase`` section, then flags.

    ``--config`` takes an ap_erase settings file (YAML/JSON) or a DeepSpeed config (JSON with
    DeepSpeed keys or an ``ap_erase`` section), so that ``deepspeed train.py --config ds.json``
    works as DeepSpeed users expect.
    """
    from .distributed import is_deepspeed_config, load_deepspeed_config

    cfg = EraseConfig()
    flags = {k: v for k, v in vars(args).items() if k in EraseConfig.__dataclass_fields__}
    if getattr(args, "threads", None) is not None:
        args.threads = threads_setting(args.threads, "--threads")
    if getattr(args, "config", None):
        data = load_config_file(args.config)
        if "threads" in data:  # a process setting: for the command line, not the EraseConfig
            threads = threads_setting(data.pop("threads"), f"config file {args.config}")
            if getattr(args, "threads", None) is None:  # the flag overrides the file
                args.threads = threads
        if is_deepspeed_config(data):
            if flags.get("deepspeed") and flags["deepspeed"] != args.config:
                raise UserError("two DeepSpeed configs given (--config and --deepspeed); "
                                "pass one")
            cfg.deepspeed = args.config
        else:
            apply_mapping(cfg, data, f"config file {args.config}")
    ds_path = flags.get("deepspeed") or cfg.deepspeed
    if ds_path:
        section = load_deepspeed_config(ds_path).get("ap_erase", {})
        if not isinstance(section, dict):
            raise UserError(f"DeepSpeed config {ds_path}: 'ap_erase' must be an object")
        apply_mapping(cfg, section, f"DeepSpeed config {ds_path} (ap_erase section)")
    apply_mapping(cfg, flags, "command line")
    cfg.validate()
    check_model_bounds(cfg)
    if cfg.output:
        from .outdir import check_output_folder

        check_output_folder(cfg.output)
    return cfg
