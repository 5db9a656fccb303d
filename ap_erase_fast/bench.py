"""``ap-erase bench step`` (also ``benchmarks/bench_step.py``): outer steps per second and peak
memory of the AP loop, reference vs fast, faithful vs shared, per train method and option.

Presets:

* ``tiny`` — the built-in tiny model (CPU friendly);
* ``sd14`` — the SD1.4 UNet and CLIP ViT-L/14 text-encoder architectures with random weights
  (speed and memory do not depend on weight values), 512 px; meant for a GPU;
* ``tiny-sdxl`` — the built-in tiny SDXL-shaped model (CPU friendly);
* ``sdxl`` — the SDXL base 1.0 UNet and both text-encoder architectures (CLIP ViT-L, OpenCLIP
  ViT-bigG with projection) with random weights, 1024 px; meant for a GPU.
* ``shapes2`` — the built-in trained ShapesWorld 2 model, erasing "circle"; its default set
  compares the trajectory sources (student, base, bank).

Trajectory-bank rows (``--trajectories bank``) build the bank in the set-up, outside the timed
steps; the row reports the build's time and UNet evaluations, and the outer steps/s and UNet
evaluations per outer step with the build amortised over a 1000-step run.

Each configuration runs in its own process (clean peak-memory numbers): one warm-up outer step,
then ``--steps`` timed outer steps. Every configuration follows the same t_enc sequence (one
value per outer step, used by all its loop iterations; evenly spread over the DDIM indices and
shuffled), so all rows sample trajectories of the same lengths and their wall times compare
directly: ``speedup_vs_first`` is the raw ratio of outer steps/s to the first row of the same
train method. The table also gives UNet sample-evaluations per second and the outer steps/s
they imply at the mean trajectory length of the cost model (ALGORITHM.md §7). Results go to a
new folder ``bench-step-<date-time>/`` under the current one, or to ``--out DIR`` (the committed
reports are regenerated with ``--out benchmarks/results``), as CSV and markdown with machine,
versions and commit; ``--json`` prints the rows.
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from .runtime import environment as _environment
from .runtime import new_results_dir

# name: overrides of EraseConfig. The first entry of each preset is the baseline.
CONFIGS: dict[str, dict] = {
    "reference/faithful/xattn": dict(profile="reference", train_method="xattn"),
    "fast/faithful/xattn": dict(profile="fast", train_method="xattn"),
    "fast/shared/xattn": dict(profile="fast", schedule="shared", train_method="xattn"),
    "reference/faithful/noxattn": dict(profile="reference", train_method="noxattn"),
    "fast/faithful/noxattn": dict(profile="fast", train_method="noxattn"),
    "fast/shared/noxattn": dict(profile="fast", schedule="shared", train_method="noxattn"),
    "fast/faithful/noxattn+adamw8bit+ckpt": dict(
        profile="fast", train_method="noxattn", optimizer="adamw8bit",
        gradient_checkpointing=True),
    # the fast profile with the reference's attention: separates the gain from removing the
    # reference's waste (batching, no second UNet, π-only backward) from the gain of SDPA
    "fast/faithful/xattn+classic-attn": dict(profile="fast", train_method="xattn",
                                              attention="classic"),
    "fast/faithful/noxattn+classic-attn": dict(profile="fast", train_method="noxattn",
                                                attention="classic"),
    # LoRA erasure: one denoiser, no frozen copy; rank 8 on the selected layers
    "fast/faithful/xattn+lora8": dict(profile="fast", train_method="xattn", lora_rank=8),
    "fast/faithful/noxattn+lora8": dict(profile="fast", train_method="noxattn", lora_rank=8),
    "fast/faithful/xattn+lora8+ckpt": dict(profile="fast", train_method="xattn", lora_rank=8,
                                           gradient_checkpointing=True),
    "fast/faithful/noxattn+lora8+adamw8bit+ckpt": dict(
        profile="fast", train_method="noxattn", lora_rank=8, optimizer="adamw8bit",
        gradient_checkpointing=True),
    # where the trajectories come from (--trajectories): the frozen base model every iteration,
    # or a bank of M = 4 base-model trajectories per prompt built once before training
    "fast/faithful/xattn+base": dict(profile="fast", train_method="xattn", trajectories="base"),
    "fast/faithful/xattn+bank": dict(profile="fast", train_method="xattn", trajectories="bank"),
    "fast/shared/xattn+bank": dict(profile="fast", schedule="shared", train_method="xattn",
                                   trajectories="bank"),
    "fast/faithful/noxattn+bank": dict(profile="fast", train_method="noxattn", trajectories="bank"),
    # spending the bank's savings: θ′'s preservation term averaged over 8 draws per sample
    "fast/faithful/xattn+bank+draws8": dict(profile="fast", train_method="xattn", trajectories="bank",
                                            preserve_draws=8),
    "fast/faithful/xattn+lora8+bank": dict(profile="fast", train_method="xattn", lora_rank=8,
                                           trajectories="bank"),
}
# the rows of the trajectory-source comparison (--configs accepts them for every preset)
TRAJECTORY_SET = ["fast/faithful/xattn", "fast/shared/xattn", "fast/faithful/xattn+base",
                  "fast/faithful/xattn+bank", "fast/shared/xattn+bank"]
DEFAULT_SETS = {
    "tiny": ["reference/faithful/xattn", "fast/faithful/xattn+classic-attn",
             "fast/faithful/xattn", "fast/shared/xattn",
             "reference/faithful/noxattn", "fast/faithful/noxattn+classic-attn",
             "fast/faithful/noxattn", "fast/shared/noxattn"],
    "shapes2": TRAJECTORY_SET,
    "sd14": [n for n in CONFIGS if "lora" not in n] + ["fast/faithful/xattn+lora8",
                                                        "fast/faithful/noxattn+lora8"],
    "tiny-sdxl": ["reference/faithful/xattn", "fast/faithful/xattn", "fast/shared/xattn",
                  "reference/faithful/noxattn", "fast/faithful/noxattn", "fast/shared/noxattn"],
    # SDXL's 2.6 B UNet: full fine-tuning of noxattn does not fit a 24 GB card; LoRA does
    "sdxl": ["reference/faithful/xattn", "fast/faithful/xattn", "fast/shared/xattn",
             "fast/faithful/xattn+lora8", "fast/faithful/xattn+lora8+ckpt",
             "fast/faithful/noxattn+lora8+adamw8bit+ckpt"],
}
# presets whose model is a built-in one (the others build random-weight architectures)
BUILTIN_MODELS = {"tiny": "tiny", "tiny-sdxl": "tiny-sdxl", "shapes2": "shapes2"}
ERASED = {"shapes2": "circle"}  # the erased concept where it is not "garbage truck"
AMORTISED_OVER = 1000  # outer steps over which a bank's build is amortised (the paper's run)


def t_enc_sequence(steps: int, ddim_steps: int) -> list[int]:
    """``steps`` t_enc values evenly spread over 0..ddim_steps−1 (stratified, so their mean
    trajectory length is close to the cost model's mean even for a few steps), in a fixed
    shuffled order: the same for every configuration."""
    import random

    values = [min(ddim_steps - 1, int((k + 0.5) * ddim_steps / steps)) for k in range(steps)]
    random.Random(0).shuffle(values)
    return values


def expected_evals_per_step(profile: str, schedule: str, pgd_steps: int, ddim_steps: int,
                            trajectories: str = "student", preserve_draws: int = 1,
                            guidance: float = 3.0) -> float:
    """UNet sample-evaluations per outer step at the mean trajectory length (cost model; a bank
    samples nothing during training: its build is counted apart). The outer update samples z
    and K z_r (2 evaluations per DDIM step each) and queries θ at (z, ""), (z, c_e) and the K
    (z_r, c_a), θ′ at (z, c_e) and the K (z_r, c_a). At CFG ``guidance`` 1 a DDIM step costs 1."""
    from .sampling import cfg_evals

    m = ((ddim_steps - 1) + sum(ddim_steps - t for t in range(1, ddim_steps))) / ddim_steps
    m *= cfg_evals(guidance) / 2
    if trajectories == "bank":
        m = 0.0
    k = preserve_draws
    outer = 2 * m * (1 + k) + (2 + k) + (1 + k)
    if profile == "reference":
        return outer + (pgd_steps - 1) * (2 * 2 * m + 3 + 2)
    if schedule == "shared":
        return outer + (pgd_steps - 2) * 2
    return outer + (pgd_steps - 1) * (2 * m + 1 + 1)


def sd14_components(device):
    """SD1.4-shaped UNet + CLIP ViT-L/14 text encoder with random weights (no VAE: 512 px)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import SDComponents, build_clip_tokenizer, ddim_scheduler
    from .models import shipped

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(shipped.load_config("sd1", "unet"))
    text_cfg = CLIPTextConfig(**{k: v for k, v in shipped.load_config("sd1", "text_encoder").items()
                                 if not k.startswith("_")})
    text = CLIPTextModel(text_cfg)
    return SDComponents(unet=unet.to(device), text_encoder=text.to(device).eval(),
                        tokenizer=build_clip_tokenizer(), scheduler=ddim_scheduler(), vae=None,
                        model_id="sd14-architecture-random", content_hash="random",
                        random_weights=True, source={"format": "benchmark"},
                        default_resolution=512)


def sdxl_components(device):
    """SDXL-base-shaped UNet and both text encoders with random weights (no VAE: 1024 px)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models import SDComponents, build_clip_tokenizer, ddim_scheduler, shipped

    def text_config(component):
        return CLIPTextConfig(**shipped.model_kwargs(shipped.load_config("sdxl", component)))

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(shipped.load_config("sdxl", "unet"))
    text = CLIPTextModel(text_config("text_encoder"))
    text_2 = CLIPTextModelWithProjection(text_config("text_encoder_2"))
    return SDComponents(unet=unet.to(device), text_encoder=text.to(device).eval(),
                        tokenizer=build_clip_tokenizer(shipped.PAD_TOKENS["sdxl"]),
                        text_encoder_2=text_2.to(device).eval(),
                        tokenizer_2=build_clip_tokenizer(shipped.PAD_TOKENS_2["sdxl"]),
                        scheduler=ddim_scheduler(shipped.load_config("sdxl", "scheduler")),
                        vae=None, model_id="sdxl-architecture-random", content_hash="random",
                        random_weights=True, source={"format": "benchmark"},
                        default_resolution=8 * unet.config.sample_size, family="sdxl",
                        extra={"force_zeros_for_empty_prompt": True})


def _run_one(args) -> dict:
    """Child process: one configuration."""
    import torch

    from .runtime import quiet_libraries
    from .config import EraseConfig
    from .engine import Eraser

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = json.loads(args.overrides)
    device = torch.device(args.device)
    if device.type == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    cfg = EraseConfig(model=BUILTIN_MODELS.get(args.preset, "tiny"),
                      erase=[ERASED.get(args.preset, "garbage truck")],
                      steps=args.steps + 1, seed=0, quiet=True, device=args.device, **overrides)
    components = None
    if args.preset not in BUILTIN_MODELS:
        cfg.embedding_cache = "none"
        # random weights: choosing R by distance means nothing, and encoding the 3000-word
        # vocabulary through random text encoders is most of the set-up on a CPU (an hour for
        # SDXL's two): R is the vocabulary's first num_centers words, the size the search has
        from .models.vocab import load_vocabulary

        cfg.preserve_set = load_vocabulary()[:cfg.num_centers]
        components = (sdxl_components if args.preset == "sdxl" else sd14_components)(device)
    eraser = Eraser(cfg, progress=False, components=components).setup()
    # the same trajectory lengths in every row: the warm-up step at the middle index, then the
    # shared sequence; every loop iteration of an outer step uses its outer step's value
    per_step = [cfg.ddim_steps // 2] + t_enc_sequence(args.steps, cfg.ddim_steps)
    draws_per_step = 1 if cfg.schedule == "shared" else cfg.pgd_steps
    eraser.plan.fix_t_enc([t for t in per_step for _ in range(draws_per_step)])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    eraser.run_outer_step()  # warm-up (allocator, kernels selection, lazy inits)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type == "cpu" and _reset_peak_rss()
    calls0 = sum(eraser.models.calls.values())
    t0 = time.perf_counter()
    for _ in range(args.steps):
        eraser.run_outer_step()
    sync()
    elapsed = time.perf_counter() - t0
    evals = sum(eraser.models.calls.values()) - calls0
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # set-up included
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        peak_kind = "cuda max allocated"
    elif rss_reset:  # the timed steps' peak, as on the GPU (not the model's construction)
        peak = _peak_rss_kib() / 2**20
        peak_kind = "peak RSS of the timed steps"
    else:
        peak = process_peak
        peak_kind = "peak RSS of the process"
    expected = expected_evals_per_step(cfg.profile, cfg.schedule, cfg.pgd_steps, cfg.ddim_steps,
                                       cfg.trajectories, cfg.preserve_draws, eraser.models.guidance)
    bank = eraser.trajectories.info() if cfg.trajectories == "bank" else {}
    build_s = eraser.timings.get("bank_s", 0.0)
    build_evals = bank.get("unet_evals", 0)
    per_step_s = elapsed / args.steps
    return {
        "trajectories": cfg.trajectories,
        "bank_build_s": round(build_s, 3) if bank else "",
        "bank_build_evals": build_evals if bank else "",
        "bank_gib": round(bank["bytes"] / 2**30, 4) if bank else "",
        "bank_prompts": bank.get("prompts", ""),
        "bank_build_s_per_trajectory": round(build_s / bank["trajectories"], 5) if bank else "",
        f"outer_steps_per_s_incl_build_{AMORTISED_OVER}": round(
            AMORTISED_OVER / (AMORTISED_OVER * per_step_s + build_s), 4),
        f"evals_per_outer_step_amortised_{AMORTISED_OVER}": round(
            evals / args.steps + build_evals / AMORTISED_OVER, 1),
        "outer_steps": args.steps, "seconds": round(elapsed, 3),
        "outer_steps_per_s": round(args.steps / elapsed, 4),
        "evals_per_outer_step": round(evals / args.steps, 1),
        "evals_per_s": round(evals / elapsed, 2),
        "expected_evals_per_step": round(expected, 1),
        "outer_steps_per_s_at_mean_length": round(evals / elapsed / expected, 4),
        "peak_gib": round(peak, 3), "peak_kind": peak_kind,
        "process_peak_gib": round(process_peak, 3) if device.type == "cpu" else "",
        "trained_params": sum(p.numel() for _, p in eraser.trained),
        **memory_accounting(eraser),
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            eraser.compute_dtype],
    }


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux ≥ 4.0: ``clear_refs`` 5); False where
    that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _peak_rss_kib() > 0
    except OSError:
        return False


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _gib(tensors) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**30, 3)


def memory_accounting(eraser) -> dict:
    """Exact bytes of what the run keeps, device independent: the denoiser's parameters (θ′),
    the copy θ needs (frozen tensors, or the reference's second UNet), gradients and optimizer
    states of the trained tensors."""
    import torch

    frozen = (list(eraser.frozen.parameters()) if hasattr(eraser, "frozen")
              else list(getattr(eraser, "frozen_tensors", {}).values()))
    states = [v for st in eraser.theta.optimizer.state.values() for v in st.values()
              if isinstance(v, torch.Tensor)]
    return {"params_gib": _gib(eraser.unet.parameters()), "theta_copy_gib": _gib(frozen),
            "grads_gib": _gib(p.grad for _, p in eraser.trained if p.grad is not None),
            "optimizer_state_gib": _gib(states)}


def main(argv: list[str] | None = None) -> int:
    from .runtime import OneLineParser as _Parser  # a bad command line is one line and exit code 2

    ap = _Parser(prog="ap-erase bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(DEFAULT_SETS), default="tiny")
    ap.add_argument("--configs", default=None,
                    help=f"comma-separated names (default: the preset's set). Known: "
                         f"{', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed outer steps per config")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="emulate a smaller card: torch.cuda.set_per_process_memory_fraction")
    ap.add_argument("--out", default=None,
                    help="results folder (default: a new bench-step-<date-time> folder under "
                         "the current one; --out benchmarks/results regenerates the committed "
                         "reports)")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads per run (default: torch's own choice)")
    ap.add_argument("--ddim-steps", type=int, default=None,
                    help="override the DDIM steps (e.g. 2 for a memory proxy on CPU)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="override the resolution in pixels (default: the model's own)")
    ap.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                    help="override the fast profile's compute precision (default: auto)")
    ap.add_argument("--bank-size", type=int, default=None,
                    help="override M, the trajectories per prompt of the bank rows (default 4)")
    ap.add_argument("--num-centers", type=int, default=None,
                    help="override |R| (the preservation set's size; default 100): the bank's build "
                         "time grows with M·(|R| + 1), see bank_build_s_per_trajectory")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    problem = _check_args(args)
    if problem:
        ap.error(problem)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps is None:
        args.steps = 4 if args.preset in BUILTIN_MODELS else 2
    if args._child:
        print("RESULT " + json.dumps(_run_one(args)), flush=True)
        return 0

    names = args.configs.split(",") if args.configs else DEFAULT_SETS[args.preset]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    args.out = str(args.out or new_results_dir("step"))
    print(f"bench step: {len(names)} configurations, results in {args.out}", file=sys.stderr,
          flush=True)
    rows = []
    env = _environment(args.device)
    for name in names:
        overrides = dict(CONFIGS[name])
        for key in ("ddim_steps", "resolution", "mixed_precision", "bank_size", "num_centers"):
            if getattr(args, key) is not None and not (key == "mixed_precision"
                                                       and overrides.get("profile") == "reference"):
                overrides[key] = getattr(args, key)
        cmd = [sys.executable, "-m", "ap_erase_fast.bench", "--_child", "--preset", args.preset,
               "--steps", str(args.steps), "--device", args.device,
               "--overrides", json.dumps(overrides)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.memory_cap_gib:
            cmd += ["--memory-cap-gib", str(args.memory_cap_gib)]
        row = {"preset": args.preset, "config": name, "memory_cap_gib": args.memory_cap_gib or ""}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and result:
                row.update(json.loads(result[-1][7:]), status="ok")
            else:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row.update(status=f"failed: {tail[:200]}")
        except subprocess.TimeoutExpired:
            row.update(status=f"timeout after {args.timeout:.0f} s")
        rows.append(row)
        print(f"{name:<42} {row.get('outer_steps_per_s_at_mean_length', 'nan')!s:>10} steps/s "
              f"(mean length)  peak {row.get('peak_gib', 'nan')} GiB  {row['status']}",
              file=sys.stderr, flush=True)
        add_speedups(rows)
        # after every row, so that a long benchmark cut short keeps its rows; said once, below
        stem = write_results(rows, env, args)
    print(f"wrote {stem}.csv and {stem}.md", file=sys.stderr)
    if args.json:
        print(json.dumps({"environment": env, "rows": rows}, indent=2))
    return 0


def _check_args(args) -> str | None:
    """What is wrong with the numbers of the command line, or None (checked before anything
    runs or is written)."""
    import math

    for name, low in (("steps", 1), ("threads", 1), ("ddim_steps", 2), ("resolution", 1),
                      ("bank_size", 1), ("num_centers", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            return f"--{name.replace('_', '-')} must be at least {low} (got {value})"
    for name in ("timeout", "memory_cap_gib"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"--{name.replace('_', '-')} must be a positive number of " \
                   f"{'seconds' if name == 'timeout' else 'GiB'} (got {value})"
    return None


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_first``: raw outer steps/s over those of the first successful row of the
    same train method (same t_enc sequence, so raw wall times compare);
    ``speedup_at_mean_length``: the same ratio of the cost-model-normalised numbers."""
    for r in rows:
        method = CONFIGS[r["config"]].get("train_method", "xattn")
        base = next((b for b in rows if b.get("status") == "ok"
                     and CONFIGS[b["config"]].get("train_method", "xattn") == method), None)
        ok = base is not None and r.get("status") == "ok"
        r["speedup_vs_first"] = (round(r["outer_steps_per_s"] / base["outer_steps_per_s"], 2)
                                 if ok else "nan")
        r["speedup_at_mean_length"] = (round(r["outer_steps_per_s_at_mean_length"]
                                             / base["outer_steps_per_s_at_mean_length"], 2)
                                       if ok else "nan")
        key = f"outer_steps_per_s_incl_build_{AMORTISED_OVER}"
        r[f"speedup_incl_build_{AMORTISED_OVER}"] = (round(r[key] / base[key], 2)
                                                     if ok and key in base and key in r else "nan")


COLUMNS = ["config", "status", "trajectories", "outer_steps_per_s", "speedup_vs_first",
           f"outer_steps_per_s_incl_build_{AMORTISED_OVER}", f"speedup_incl_build_{AMORTISED_OVER}",
           f"evals_per_outer_step_amortised_{AMORTISED_OVER}", "bank_build_s", "bank_build_evals",
           "bank_gib", "bank_prompts", "bank_build_s_per_trajectory",
           "outer_steps_per_s_at_mean_length", "speedup_at_mean_length", "evals_per_outer_step", "expected_evals_per_step", "evals_per_s",
           "peak_gib", "peak_kind", "process_peak_gib", "params_gib", "theta_copy_gib", "grads_gib",
           "optimizer_state_gib", "mixed_precision", "trained_params", "torch_threads",
           "memory_cap_gib", "outer_steps", "seconds"]


def write_results(rows: list[dict], env: dict, args) -> Path:
    """Write the rows as CSV and markdown; returns the common path stem of the two files."""
    out = Path(args.out or new_results_dir("step"))
    out.mkdir(parents=True, exist_ok=True)
    device = env["device"] if env["device"] == "cpu" else env.get("cuda devices", "cuda")
    slug = "".join(c if c.isalnum() else "_" for c in device.lower()).strip("_")
    stem = out / f"step_{args.preset}_{slug}{('_' + args.tag) if args.tag else ''}"
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"# {k}: {v}" for k, v in env.items()])
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.get(c, "") for c in COLUMNS])
    lines = [f"# AP outer-step benchmark: preset {args.preset}, {device}", ""]
    lines += [f"* {k}: {v}" for k, v in env.items()]
    lines += ["", f"{args.steps} timed outer steps after one warm-up step, seed 0, one process per "
              "row, every row on the same t_enc sequence (same trajectory lengths). "
              "`speedup_vs_first`: raw outer steps/s relative to the first row of the same train "
              "method. `outer_steps_per_s_at_mean_length` = UNet sample-evaluations per second ÷ "
              "the cost model's evaluations per outer step at the mean trajectory length, and "
              "`speedup_at_mean_length` its ratio. Bank rows: the bank is built in the set-up; "
              f"`outer_steps_per_s_incl_build_{AMORTISED_OVER}` = {AMORTISED_OVER} ÷ ({AMORTISED_OVER} × "
              "the timed seconds per outer step + the build's seconds), its `speedup_incl_build_…` "
              "against the first row likewise, and the evaluations per outer step with the build's "
              f"spread over {AMORTISED_OVER} steps.", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


if __name__ == "__main__":
    sys.exit(main())
