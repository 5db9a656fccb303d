"""Rectified-flow transformers: SD3 / SD3.5 (MMDiT; CLIP-L + CLIP-G + T5; real classifier-free
guidance) and FLUX.1-dev / schnell (guidance-distilled dev: a guidance embedding instead of CFG;
CLIP-L pooled vector + T5 sequence; latents packed into 2×2 patches with img_ids/txt_ids).

The engine knows DDIM on ε; these models predict a velocity v on x_t = (1 − σ)·x0 + σ·ε. The
backbone bridges the two without any change above it (docs/models.md, "SD3 and FLUX"):

* the engine's latent is the variance-preserving x̃ = x_t / n(σ), n(σ) = √((1 − σ)² + σ²), so
  x̃ = √ᾱ·x0 + √(1 − ᾱ)·ε with ᾱ(σ) = (1 − σ)² / ((1 − σ)² + σ²) (:func:`alpha_bar`);
* :attr:`FlowBackbone.tables` are ``DDIMTables`` whose ᾱ[i] = ᾱ(σ_i), σ_i the model's training
  sigma of index i (u = i/1000 through the scheduler's shift: SD3's fixed shift 3, FLUX-dev's
  resolution-dependent exponential shift; :func:`flow_sigmas`), prediction type ``epsilon``;
* :meth:`FlowBackbone.predict` looks σ_i up, forms x_t = n·x̃, calls the transformer and returns
  ε = x_t + (1 − σ)·v (:func:`velocity_to_eps`). The engine's eta-0 DDIM step on x̃ with that ε
  is then exactly the flow's Euler step x_t' = x_t + (σ' − σ)·v, and CFG on ε is CFG on v.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..sampling import DDIMTables
from .base import Backbone, Cond

ALPHA_BAR_MIN = 1e-8  # σ = 1 gives ᾱ = 0, which the sampler divides by
T5_MAX_LENGTH = 512  # the diffusers pipelines refuse longer T5 sequences
FLUX_DEFAULT_DISTILLED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default (FLUX.1-dev)
PATCH = 2  # both families: 2×2 latent patches (SD3's patch embedding, FLUX's packing)


# --------------------------------------------------------------------------- the schedule


def time_shift(config, image_seq_len: int, u: torch.Tensor) -> torch.Tensor:
    """σ(u) for training fractions u ∈ [0, 1] as ``FlowMatchEulerDiscreteScheduler`` shifts
    them: dynamic (FLUX-dev: μ linear in the image's token count, exponential or linear
    ``time_shift_type``) or the fixed ``shift`` s (SD3: σ = s·u / (1 + (s − 1)·u))."""
    u = u.to(torch.float64)
    if config.get("use_dynamic_shifting", False):
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_len - base_len)
        mu = image_seq_len * slope + (base_shift - slope * base_len)
        scale = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
        with torch.no_grad():
            odds = torch.where(u > 0, 1.0 / u - 1.0, torch.full_like(u, math.inf))
        return scale / (scale + odds)
    s = float(config.get("shift", 1.0))
    return s * u / (1.0 + (s - 1.0) * u)


def flow_sigmas(config, image_seq_len: int) -> torch.Tensor:
    """[T] float64: σ_i = time_shift(i / T) for i = 0..T−1 (σ_0 = 0, x_t = x0)."""
    n = int(config.get("num_train_timesteps", 1000))
    return time_shift(config, image_seq_len, torch.arange(n, dtype=torch.float64) / n)


def alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ(σ) = (1 − σ)² / ((1 − σ)² + σ²), clamped to ≥ 1e−8: t/(1 − t) = √((1 − ᾱ)/ᾱ)."""
    return ((1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)).clamp_min(ALPHA_BAR_MIN)


def vp_scale(sigma):
    """n(σ) = √((1 − σ)² + σ²): x_t = n·x̃."""
    return ((1 - sigma) ** 2 + sigma ** 2) ** 0.5


def velocity_to_eps(v, x_t, sigma):
    """ε = x_t + (1 − σ)·v  (v = ε − x0, x_t = (1 − σ)·x0 + σ·ε)."""
    return x_t + (1 - sigma) * v


def velocity_to_x0(v, x_t, sigma):
    """x0 = x_t − σ·v."""
    return x_t - sigma * v


def eps_to_velocity(eps, x_t, sigma):
    """v = (ε − x_t) / (1 − σ)  (σ < 1)."""
    return (eps - x_t) / (1 - sigma)


def flow_tables(sigmas: torch.Tensor, ddim_steps: int) -> DDIMTables:
    """DDIM tables on ᾱ(σ_i): the engine's DDIM timesteps [1, 1 + c, …] index the σ table."""
    n = sigmas.shape[0]
    if ddim_steps < 2 or ddim_steps > n:
        raise UserError(f"the number of DDIM steps must be between 2 and {n} (the model's "
                        f"training timesteps); got {ddim_steps}")
    c = n // ddim_steps
    return DDIMTables(alphas_cumprod=alpha_bar(sigmas), timesteps=[k * c + 1 for k in range(ddim_steps)],
                      num_train_timesteps=n, prediction_type="epsilon")


# --------------------------------------------------------------------------- the backbone


class FlowBackbone(Backbone):
    """What SD3 and FLUX share: the σ table, x̃ ↔ x_t, v → ε, T5 tokenisation, latent shapes."""

    family = "flow"
    t5_key = "text_encoder_3"

    def __init__(self, components, device, ddim_steps: int = 50, resolution: int | None = None,
                 max_sequence_length: int | None = None, distilled_guidance: float | None = None):
        from ..models.loading import vae_scale_factor

        self.components = components
        self.device = torch.device(device)
        self.denoiser = components.unet
        self.vae_factor = vae_scale_factor(components.vae)
        self.resolution = int(resolution or components.default_resolution)
        self.multiple = self.vae_factor * PATCH
        if self.resolution % self.multiple:
            raise UserError(f"--resolution {self.resolution} is not a multiple of {self.multiple} (VAE factor "
                            f"{self.vae_factor} times the transformer's 2×2 patches)")
        side = self.resolution // self.vae_factor
        self.image_seq_len = (side // PATCH) ** 2
        self.scheduler_config = dict(components.scheduler.config)
        self.sigmas = flow_sigmas(self.scheduler_config, self.image_seq_len)
        self.tables = flow_tables(self.sigmas, ddim_steps)
        t5_tok = getattr(components, self.t5_key.replace("text_encoder", "tokenizer"))
        limit = min(T5_MAX_LENGTH, int(getattr(t5_tok, "model_max_length", T5_MAX_LENGTH)))
        length = max_sequence_length or min(self.default_max_sequence_length(), limit)
        if not 1 <= length <= limit:
            raise UserError(f"--max-sequence-length {length} is out of range for {components.model_id!r}: "
                            f"1 to {limit} T5 tokens")
        self.max_sequence_length = int(length)
        self._check_guidance(distilled_guidance)
        self._te_hash = None
        self._sigma_cache: dict = {}

    # -- subclass hooks -----------------------------------------------------------------------
    default_guidance = 3.0  # --start-guidance when not given (the sampler's CFG scale)

    def default_max_sequence_length(self) -> int:
        raise NotImplementedError

    def _check_guidance(self, distilled_guidance) -> None:
        if distilled_guidance is not None:
            raise UserError(f"--distilled-guidance applies to guidance-distilled models (FLUX.1-dev); "
                            f"{self.components.model_id!r} has no guidance embedding")
        self.distilled_guidance = None

    def _encoders(self) -> list:
        raise NotImplementedError

    def _encoder_runs(self) -> list:
        """[(components key of an encoder, run(encoder, prompts) -> tuple of its outputs)]."""
        raise NotImplementedError

    def _combine(self, outputs: list[tuple]) -> tuple:
        """One batch's Cond parts from each encoder's outputs (in :meth:`_encoder_runs` order)."""
        raise NotImplementedError

    # -- conditioning -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> Cond:
        """Each encoder in turn runs every batch (after :meth:`hold_text_encoders`, it alone is on
        the device meanwhile, and the batches' outputs wait on the CPU); then each batch's parts
        are combined, concatenated and made fp32 on the device."""
        if self.components.text_encoder is None:
            raise RuntimeError("the text encoders were released; encode every prompt before")
        prompts = list(prompts)
        if not prompts:
            return Cond(tuple(torch.empty(0, *s, device=self.device) for s in self.cond_shapes()))
        chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        stage = self.offload_text_encoders
        outputs = []
        for key, run in self._encoder_runs():
            with self._encoder_on_device(key) as encoder:
                outputs.append([tuple(t.cpu() for t in run(encoder, chunk)) if stage else run(encoder, chunk)
                                for chunk in chunks])
        batches = [self._combine([out[i] for out in outputs]) for i in range(len(chunks))]
        return Cond(tuple(torch.cat(parts).float().to(self.device) for parts in zip(*batches)))

    def t5_states(self, prompts: list[str], encoder=None) -> torch.Tensor:
        if encoder is None:
            encoder = getattr(self.components, self.t5_key).to(self.device)
        tokenizer = getattr(self.components, self.t5_key.replace("text_encoder", "tokenizer"))
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return encoder(ids)[0]

    def _t5_run(self, encoder, prompts):
        return (self.t5_states(prompts, encoder),)

    # -- the text encoders in the set-up phase ------------------------------------------------
    def hold_text_encoders(self, dtype: torch.dtype | None) -> None:
        """Hold every text encoder in ``dtype`` (None: as loaded) on the CPU; :meth:`encode` then
        puts one at a time on the device (:attr:`offload_text_encoders`). The embedding-cache key
        (:meth:`text_encoder_hash`) hashes the encoders as held: their dtype is part of it."""
        from ..setup_memory import cast_text_encoder

        self.offload_text_encoders = True
        for key, _ in self._encoder_runs():
            encoder = getattr(self.components, key)
            if dtype is not None:
                cast_text_encoder(encoder, dtype)
            self._encoder_off_device(encoder)
        self._te_hash = None

    @contextlib.contextmanager
    def _encoder_on_device(self, key: str):
        encoder = self._encoder_to_device(getattr(self.components, key))
        try:
            yield encoder
        finally:
            if self.offload_text_encoders:
                self._encoder_off_device(encoder)

    def _encoder_to_device(self, encoder):  # every move of an encoder goes through these two
        return encoder.to(self.device)

    def _encoder_off_device(self, encoder):
        return encoder.to("cpu")

    def release_text_encoders(self) -> None:
        self.text_encoder_hash()
        for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.components, key, None)

    def text_encoder_hash(self) -> str:
        if self._te_hash is None:
            from ..models import module_content_hash

            parts = [self.family, f"t5_length={self.max_sequence_length}"]
            for encoder, tok in self._encoders():
                parts += [module_content_hash(encoder), str(tok.model_max_length), str(len(tok)),
                          str(tok.pad_token_id)]
            self._te_hash = ":".join(parts)
        return self._te_hash

    # -- the denoiser -------------------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ of DDPM-index timesteps ``t`` [B] (fp32, on t's device)."""
        table = self._sigma_cache.get(t.device)
        if table is None:
            table = self._sigma_cache[t.device] = self.sigmas.to(t.device, torch.float32)
        return table[t.long()]

    def predict(self, forward, x, t, cond: Cond):
        sigma = self.sigma(t).view(-1, *[1] * (x.dim() - 1))
        x_t = x * vp_scale(sigma)
        v = self.velocity(forward, x_t, sigma.flatten(), cond)
        return velocity_to_eps(v.float(), x_t, sigma)

    def velocity(self, forward, x_t, sigma, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int, int]:
        res = int(resolution or self.components.default_resolution)
        if res != self.resolution:
            raise UserError(f"this flow backbone's σ table was built for {self.resolution} px, not {res} px "
                            "(pass the resolution when the backbone is made)")
        side = res // self.vae_factor
        return (1, self.latent_channels, side, side)

    def is_trained(self, name: str, method: str) -> bool:
        from ..models.trainable import flow_parameter_is_trained

        return flow_parameter_is_trained(name, method)

    def info(self) -> dict:
        cfg = self.scheduler_config
        shift = ({"dynamic": cfg.get("time_shift_type", "exponential"), "image_seq_len": self.image_seq_len}
                 if cfg.get("use_dynamic_shifting") else float(cfg.get("shift", 1.0)))
        return {"family": self.family, "prediction_type": "flow (velocity, served as ε on x̃ = x_t / n(σ))",
                "shift": shift, "resolution": self.resolution, "max_sequence_length": self.max_sequence_length,
                "empty_prompt": "encoded", "distilled_guidance": self.distilled_guidance}


class SD3Backbone(FlowBackbone):
    """SD3 / SD3.5: states = [CLIP-L ‖ CLIP-G penultimate states, zero-padded to T5's width]
    followed along the sequence by T5's states ([B, 77 + L, 4096]); pooled = CLIP-L ‖ CLIP-G
    projected pooled vectors ([B, 2048]); as ``StableDiffusion3Pipeline.encode_prompt``. The
    unconditional prompt "" is encoded as text, as the pipeline encodes its negative prompt."""

    family = "sd3"
    t5_key = "text_encoder_3"

    def __init__(self, components, device, ddim_steps: int = 50, **options):
        for key in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
            if getattr(components, key) is None:
                raise ValueError(f"an SD3 backbone needs {key}")
        super().__init__(components, device, ddim_steps, **options)
        self.latent_channels = int(components.unet.config.in_channels)

    def default_max_sequence_length(self) -> int:
        return 256  # StableDiffusion3Pipeline's default

    def _encoders(self):
        c = self.components
        return [(c.text_encoder, c.tokenizer), (c.text_encoder_2, c.tokenizer_2), (c.text_encoder_3, c.tokenizer_3)]

    def cond_shapes(self):
        c = self.components
        width = c.unet.config.joint_attention_dim
        return ((c.tokenizer.model_max_length + self.max_sequence_length, width), (c.unet.config.pooled_projection_dim,))

    def _encoder_runs(self):
        from ..concepts import tokenize

        def clip(tokenizer):
            def run(encoder, prompts):  # penultimate states, projected pooled vector
                out = encoder(tokenize(tokenizer, prompts).to(self.device), output_hidden_states=True)
                return out.hidden_states[-2], out[0]
            return run

        c = self.components
        return [("text_encoder", clip(c.tokenizer)), ("text_encoder_2", clip(c.tokenizer_2)),
                (self.t5_key, self._t5_run)]

    def _combine(self, outputs):
        (hidden_l, pooled_l), (hidden_g, pooled_g), (t5,) = outputs
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    def velocity(self, forward, x_t, sigma, cond: Cond):
        states, pooled = cond.parts
        return forward(hidden_states=x_t, encoder_hidden_states=states, pooled_projections=pooled,
                       timestep=sigma * 1000, return_dict=False)[0]

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline


class FluxBackbone(FlowBackbone):
    """FLUX.1: states = T5's states ([B, L, 4096]), pooled = CLIP-L's pooled output ([B, 768]),
    as ``FluxPipeline.encode_prompt``. Latents [B, 16, h, w] are packed into 2×2 patches
    ([B, hw/4, 64]) around the call, with the pipeline's img_ids (row, column per patch) and
    zero txt_ids, constant per run like SDXL's time ids.

    FLUX.1-dev is guidance-distilled: every call, θ and θ′, conditional or not, gets the same
    guidance embedding g (``--distilled-guidance``, default 3.5), and the sampler's own CFG
    defaults to 1 (plain conditional sampling; >1 is FluxPipeline's ``true_cfg_scale``). The
    "unconditional" ε_θ(z, "") is the empty prompt at that same g (docs/models.md says why)."""

    family = "flux"
    t5_key = "text_encoder_2"
    default_guidance = 1.0

    def __init__(self, components, device, ddim_steps: int = 50, **options):
        for key in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if getattr(components, key) is None:
                raise ValueError(f"a FLUX backbone needs {key}")
        super().__init__(components, device, ddim_steps, **options)
        self.latent_channels = int(components.unet.config.in_channels) // (PATCH * PATCH)
        self._ids: dict = {}

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.components.unet.config.guidance_embeds)

    def default_max_sequence_length(self) -> int:
        return 512 if self.guidance_distilled else 256  # dev: FluxPipeline's 512; schnell: 256

    def _check_guidance(self, distilled_guidance) -> None:
        if not self.guidance_distilled:
            return super()._check_guidance(distilled_guidance)
        g = FLUX_DEFAULT_DISTILLED_GUIDANCE if distilled_guidance is None else float(distilled_guidance)
        if not (g >= 0 and math.isfinite(g)):
            raise UserError(f"--distilled-guidance must be a finite number ≥ 0 (got {g})")
        self.distilled_guidance = g

    def _encoders(self):
        c = self.components
        return [(c.text_encoder, c.tokenizer), (c.text_encoder_2, c.tokenizer_2)]

    def cond_shapes(self):
        c = self.components
        return ((self.max_sequence_length, c.unet.config.joint_attention_dim), (c.unet.config.pooled_projection_dim,))

    def _encoder_runs(self):
        from ..concepts import tokenize

        def clip(encoder, prompts):  # CLIP-L's pooled output
            return (encoder(tokenize(self.components.tokenizer, prompts).to(self.device),
                            output_hidden_states=False).pooler_output,)

        return [("text_encoder", clip), (self.t5_key, self._t5_run)]

    def _combine(self, outputs):
        (pooled,), (t5,) = outputs
        return t5, pooled

    # packing, as FluxPipeline._pack_latents / _unpack_latents
    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c4 = x.shape
        x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, h, w)

    def ids(self, h: int, w: int, text_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids [hw/4, 3]: (0, row, column) of each patch; txt_ids [L, 3]: zeros)."""
        key = (h, w, text_len, device)
        if key not in self._ids:
            img = torch.zeros(h // 2, w // 2, 3)
            img[..., 1] += torch.arange(h // 2)[:, None]
            img[..., 2] += torch.arange(w // 2)[None, :]
            self._ids[key] = (img.reshape(-1, 3).to(device), torch.zeros(text_len, 3, device=device))
        return self._ids[key]

    def velocity(self, forward, x_t, sigma, cond: Cond):
        states, pooled = cond.parts
        b, _, h, w = x_t.shape
        img_ids, txt_ids = self.ids(h, w, states.shape[1], x_t.device)
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full((b,), self.distilled_guidance, dtype=torch.float32, device=x_t.device)
        out = forward(hidden_states=self.pack(x_t), timestep=sigma, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=states, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return self.unpack(out, h, w)

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline
