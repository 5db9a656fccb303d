"""Image generation for the image-level protocol: diffusers ``StableDiffusionPipeline`` built
from the base model, once with the base UNet and once with the erased UNet swapped in.

Each prompt row gets its own ``torch.Generator("cpu").manual_seed(seed)``, so the initial latents
of the base and the erased image of a row are identical, and identical on every device. Prompts
are generated in batches of ``batch_size``; the negative prompt is "".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

SCHEDULERS = ("ddim", "lms")


@dataclass
class GenSettings:
    steps: int = 100
    guidance: float = 7.5
    scheduler: str = "ddim"
    resolution: int | None = None
    batch_size: int = 4

    def as_dict(self, resolution: int) -> dict:
        return {"library": "diffusers.StableDiffusionPipeline", "scheduler": self.scheduler,
                "steps": self.steps, "guidance_scale": self.guidance, "resolution": resolution,
                "batch_size": self.batch_size, "negative_prompt": "", "eta": 0.0,
                "seed": "per prompt row, torch.Generator('cpu').manual_seed(seed)",
                "safety_checker": None}


def make_scheduler(base_scheduler, name: str):
    from diffusers import DDIMScheduler, LMSDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(base_scheduler.config)
    if name == "lms":
        return LMSDiscreteScheduler.from_config(base_scheduler.config)
    raise UserError(f"unknown scheduler {name!r}; choose {', '.join(SCHEDULERS)}")


def build_pipelines(comps, erased_unet, scheduler_name: str):
    """The model's own diffusers pipeline (SD or SDXL), once with the base and once with the
    erased denoiser."""
    import dataclasses

    if comps.vae is None:
        raise UserError(f"model {comps.model_id!r} has no VAE, so no images can be generated; "
                        f"use --no-images for the epsilon-space measures only")
    pipes = {}
    for key, unet in (("base", comps.unet), ("erased", erased_unet)):
        parts = dataclasses.replace(comps, unet=unet,
                                    scheduler=make_scheduler(comps.scheduler, scheduler_name))
        pipe = parts.to_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipes[key] = pipe
    return pipes


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], settings: GenSettings, resolution: int,
             on_step=None) -> list[np.ndarray]:
    """RGB uint8 images [H, W, 3] for the prompts, one per (prompt, seed); ``on_step()`` is
    called after every denoising step (progress)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    extra = {}
    if on_step is not None:
        def callback(pipeline, step, timestep, tensors):  # noqa: ARG001 - diffusers' signature
            on_step()
            return tensors

        extra["callback_on_step_end"] = callback
    # "" as the negative prompt; SDXL pipelines that zero the empty prompt do so when it is None
    negative = None if getattr(pipe.config, "force_zeros_for_empty_prompt", False) else [""] * len(prompts)
    out = pipe(prompt=prompts, negative_prompt=negative, height=resolution, width=resolution,
               num_inference_steps=settings.steps, guidance_scale=settings.guidance, eta=0.0,
               generator=gens, output_type="np", **extra)
    images = np.asarray(out.images)
    return [np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8) for img in images]
