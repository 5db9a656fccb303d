"""The networks, the rectified-flow objective and the sampler of ShapesWorld 2 flow
(``shapes2-flow``): an SD3-shaped model (``SD3Transformer2DModel`` on the 8x8x4 latents of the
shipped ShapesWorld 2 VAE, two CLIP text encoders with projections, a T5 encoder) that loads as a
``StableDiffusion3Pipeline`` (docs/SHAPESWORLD_FLOW.md).

Text encoders, as ``StableDiffusion3Pipeline.encode_prompt`` uses them:

* ``text_encoder`` (the CLIP-L slot): ShapesWorld 2's trained 2-layer 128-wide CLIP text model
  with a new 128 -> 128 projection, fine-tuned with the transformer;
* ``text_encoder_2`` (the CLIP-G slot): a new 2-layer 32-wide CLIP text model with a projection,
  trained with the transformer (its tokenizer pads with "!" as SD3's CLIP-G tokenizer does);
* ``text_encoder_3`` (T5): one tiny layer whose final RMS-norm weight is zero, so its states are
  exactly zero: SD3's "without T5" conditioning (what the pipeline feeds when T5 is left out),
  kept as a module because the library's SD3 loader needs one. Its tokenizer's
  ``model_max_length`` (16) is the T5 length the model is trained with; the library reads it.

Both CLIP token embeddings stay frozen (the first keeps ShapesWorld 2's trained word vectors, the
second its random ones): about 8 M parameters the optimiser need not update every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nets import MAX_LENGTH, TEXT_CONFIG

T5_LENGTH = MAX_LENGTH  # T5 tokens per prompt (all zero states), as trained
SHIFT = 3.0  # SD3's FlowMatchEulerDiscreteScheduler shift, used for training and sampling

TEXT1_CONFIG = dict(TEXT_CONFIG, projection_dim=128)
TEXT2_CONFIG = dict(TEXT_CONFIG, hidden_size=32, intermediate_size=128, num_attention_heads=2, projection_dim=32,
                    pad_token_id=0)
T5_CONFIG = dict(d_model=256, d_kv=8, d_ff=8, num_layers=1, num_heads=1, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, feed_forward_proj="relu", layer_norm_epsilon=1e-6,
                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                 tie_word_embeddings=False)


def transformer_config(layers: int = 4, heads: int = 4, head_dim: int = 32, patch: int = 2, sample_size: int = 8):
    """``SD3Transformer2DModel`` config on ``sample_size``² x 4 latents with ``layers`` joint blocks
    of width ``heads * head_dim``; its text inputs fit :data:`TEXT1_CONFIG`, :data:`TEXT2_CONFIG`
    and :data:`T5_CONFIG`."""
    if sample_size % patch:
        raise ValueError(f"the latent side {sample_size} is not a multiple of the patch size {patch}")
    return dict(sample_size=sample_size, patch_size=patch, in_channels=4, out_channels=4, num_layers=layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=T5_CONFIG["d_model"],
                caption_projection_dim=heads * head_dim,
                pooled_projection_dim=TEXT1_CONFIG["projection_dim"] + TEXT2_CONFIG["projection_dim"],
                pos_embed_max_size=sample_size // patch, qk_norm="rms_norm")


def scheduler_config(shift: float = SHIFT) -> dict:
    return {"num_train_timesteps": 1000, "shift": float(shift)}


def build_tokenizers() -> dict:
    """``tokenizer`` (CLIP BPE, pads with <|endoftext|>), ``tokenizer_2`` (pads with "!"),
    ``tokenizer_3`` (the tiny T5-convention tokenizer), all of length :data:`MAX_LENGTH`."""
    from ..models.tiny_flow import build_tiny_t5_tokenizer
    from ..models.tokenizer import build_clip_tokenizer

    t5 = build_tiny_t5_tokenizer()
    t5.model_max_length = T5_LENGTH
    return {"tokenizer": build_clip_tokenizer(model_max_length=MAX_LENGTH),
            "tokenizer_2": build_clip_tokenizer("!", model_max_length=MAX_LENGTH), "tokenizer_3": t5}


def build_modules(seed: int, transformer_kwargs: dict, shapes2_text_encoder=None) -> dict:
    """Freshly initialised ``transformer``, ``text_encoder`` (from ``shapes2_text_encoder``, a
    ``CLIPTextModel``, when given), ``text_encoder_2`` and the zero-output ``text_encoder_3``."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..models.tiny_flow import build_tiny_t5_tokenizer

    t5_vocab = len(build_tiny_t5_tokenizer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods = {"transformer": SD3Transformer2DModel(**transformer_config(**transformer_kwargs)),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT1_CONFIG)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT2_CONFIG)),
                "text_encoder_3": T5EncoderModel(T5Config(vocab_size=t5_vocab, **T5_CONFIG))}
    if shapes2_text_encoder is not None:
        target = mods["text_encoder"]
        names = set(target.state_dict())
        # transformers 5: CLIPTextModel's keys lack the "text_model." of the projection model's
        state = {(k if k in names else f"text_model.{k}"): v for k, v in shapes2_text_encoder.state_dict().items()}
        missing, unexpected = target.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("text_projection") for k in missing):
            raise ValueError(f"ShapesWorld 2's text encoder does not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        mods["text_encoder_3"].encoder.final_layer_norm.weight.zero_()
    for m in mods.values():
        if m.dtype != torch.float32:
            m.to(torch.float32)
    return mods


def trained_parameters(mods: dict) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what training updates: the transformer, both CLIP encoders except
    their token embeddings. Everything else is frozen (``requires_grad`` off)."""
    out = []
    for key, m in mods.items():
        for name, p in m.named_parameters():
            train = key == "transformer" or (key in ("text_encoder", "text_encoder_2") and "token_embedding" not in name)
            p.requires_grad_(train)
            if train:
                out.append((f"{key}.{name}", p))
    return out


def caption_ids(tokenizers: dict, captions: list[str]) -> dict:
    """Token ids [n, MAX_LENGTH] of ``captions`` for each tokenizer (padded as the pipeline pads)."""
    out = {}
    for key in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = tokenizers[key]
        out[key] = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt").input_ids
    return out


def encode_ids(mods: dict, ids: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [B, 2·16, 256], pooled [B, 160]) as ``StableDiffusion3Pipeline.encode_prompt``
    makes them: each CLIP's penultimate hidden states side by side, zero-padded to T5's width,
    then T5's states along the sequence; the two projected pooled vectors side by side."""
    hidden, pooled = [], []
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        out = mods[enc](ids[tok], output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5 = mods["text_encoder_3"](ids["tokenizer_3"])[0]
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def sample_sigmas(n: int, shift: float, generator=None) -> torch.Tensor:
    """σ [n] as SD3 trains: u = sigmoid(N(0, 1)) (logit-normal, mean 0, std 1), then the
    scheduler's shift σ = s·u / (1 + (s − 1)·u)."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(transformer, z0, noise, sigma, states, pooled) -> torch.Tensor:
    """Rectified-flow loss: x_t = (1 − σ)·z0 + σ·ε, the transformer at timestep 1000·σ predicts
    v, the target is ε − z0; mean squared error (SD3's weighting 1 under logit-normal σ)."""
    s = sigma.view(-1, *[1] * (z0.dim() - 1))
    x_t = (1 - s) * z0 + s * noise
    v = transformer(hidden_states=x_t, encoder_hidden_states=states, pooled_projections=pooled,
                    timestep=sigma * 1000, return_dict=False)[0]
    return F.mse_loss(v.float(), (noise - z0).float())


@torch.no_grad()
def denoise(mods: dict, tokenizers: dict, scheduler_cfg: dict, prompts, seeds, *, steps: int = 25,
            guidance: float = 5.0, batch_size: int = 64) -> torch.Tensor:
    """Final latents [n, 4, 8, 8] of ``StableDiffusion3Pipeline``'s sampler (its scheduler's
    sigmas, Euler steps, CFG against the encoded empty prompt); latent ``i`` starts from noise
    seeded by ``seeds[i]``, so the same (prompt, seed) gives the same latent whatever the batch."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is needed")
    tr = mods["transformer"]
    dtype = tr.dtype
    sched = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_cfg))
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.float()
    u_states, u_pooled = encode_ids(mods, caption_ids(tokenizers, [""]))
    side, ch = tr.config.sample_size, tr.config.in_channels
    out = []
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i:i + batch_size])
        b = len(p)
        c_states, c_pooled = encode_ids(mods, caption_ids(tokenizers, p))
        states = torch.cat([u_states.expand(b, -1, -1), c_states]).to(dtype)
        pooled = torch.cat([u_pooled.expand(b, -1), c_pooled]).to(dtype)
        z = torch.stack([torch.randn(ch, side, side, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds[i:i + batch_size]])
        for k, t in enumerate(sched.timesteps):
            v_u, v_c = tr(hidden_states=torch.cat([z, z]).to(dtype), encoder_hidden_states=states,
                          pooled_projections=pooled, timestep=t.expand(2 * b), return_dict=False)[0].chunk(2)
            v = v_u + guidance * (v_c - v_u)
            z = (z.float() + (sigmas[k + 1] - sigmas[k]) * v.float()).to(z.dtype)
        out.append(z)
    return torch.cat(out)


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from latents, as the pipeline decodes (``z / scaling + shift``)."""
    shift = vae.config.shift_factor or 0.0
    x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((x.float() + 1) / 2).clamp(0, 1)
