"""LoRA erasure on the flow transformers (tiny-sd3, tiny-flux): θ′ = adapters on the selected
transformer layers, θ = the same transformer with them off; the run's diffusers LoRA file loads
through ``StableDiffusion3Pipeline`` / ``FluxPipeline.load_lora_weights`` (the run folder and its
``lora/``), the merged ``unet/`` loads as the transformer, and all of them reproduce θ′; a
checkpointed and resumed LoRA flow run ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from ap_erase_fast.backbones import make_backbone
from ap_erase_fast.conditioning import Cond
from ap_erase_fast.engine import Eraser
from ap_erase_fast.export import write_outputs
from ap_erase_fast.models import load_components

pytest.importorskip("peft")
MODELS = ("tiny-sd3", "tiny-flux")
TRANSFORMERS = {"tiny-sd3": "SD3Transformer2DModel", "tiny-flux": "FluxTransformer2DModel"}
WEIGHTS = "pytorch_lora_weights.safetensors"


def _flow_cfg(tiny_cfg, model, **overrides):
    base = dict(model=model, steps=2, lora_rank=4, lora_alpha=8.0, lr=5e-2, mixed_precision="no",
                ddim_steps=6, k_closest=40, num_centers=8, max_sequence_length=8)
    base.update(overrides)
    return tiny_cfg(**base)


def _inputs(bb, seed=3, batch=2):
    """Fresh random inputs of the transformer (latents, σ, text states, pooled vector): none of
    them seen in training."""
    g = torch.Generator().manual_seed(seed)
    _, c, h, w = bb.latent_shape(None)
    x = torch.randn(batch, c, h, w, generator=g)
    sigma = torch.tensor([0.9, 0.3])[:batch]
    states, pooled = bb.cond_shapes()
    cond = Cond((torch.randn(batch, *states, generator=g), torch.randn(batch, *pooled, generator=g)))
    return x, sigma, cond


def _velocity(bb, transformer, inputs):
    """The transformer's output (v, unpacked for FLUX) through the backbone's own call."""
    x, sigma, cond = inputs
    with torch.no_grad():
        return bb.velocity(transformer, x, sigma, cond)


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
@pytest.mark.parametrize("model", MODELS)
def test_flow_lora_loads_in_the_pipeline_and_reproduces_theta_prime(tiny_cfg, tmp_path, model, method):
    """A few-step LoRA run on the transformer (alpha 8, rank 4), written with --merge: the run
    folder and lora/ through the pipeline's load_lora_weights, and the merged unet/ through the
    transformer class, give θ′'s output on fresh random inputs (fp32: 1e-5 relative), which
    differs from the base model's. The file holds every adapted layer under ``transformer.``
    and there is no kohya file. Mutations checked by hand (each fails here): the alpha/rank
    scale not folded into the up matrices (all four cases, relative error 1e-2 to 1.5e-1);
    only half of the adapted layers saved (all four: the key-set check, and with it removed the
    output check, 2e-2 to 2e-1); lora_A and lora_B swapped on saving (the load refuses the
    shapes); the keys written as ``unet.<module>`` inside the transformer's layers (peft finds
    no such module: the load fails); lora/'s file not copied to the top of the run folder (the
    file-list check, and without it the output check: load_lora_weights(folder) then takes
    trained.safetensors, whose keys have no prefix, and loads nothing)."""
    import diffusers

    cfg = _flow_cfg(tiny_cfg, model, train_method=method, merge=True)
    er = Eraser(cfg).setup()
    er.train()
    folder = tmp_path / "out"
    folder.mkdir()
    write_outputs(folder, er.unet, er.trained_state(), er.run_info(), er.log, er.backbone.pipeline_class())
    names = {p.name for p in folder.iterdir()}
    assert {"lora", WEIGHTS, "unet", "README.md", "trained.safetensors"} <= names
    assert "lora_kohya.safetensors" not in names

    bb = er.backbone
    inputs = _inputs(bb)
    want = _velocity(bb, er.unet, inputs)
    base = _velocity(bb, load_components(model).unet, inputs)
    assert _rel(base, want) > 1e-3  # the LoRA changes the output, so a loader that drops it fails

    state = load_file(str(folder / "lora" / WEIGHTS))
    assert all(k.startswith("transformer.") for k in state)
    adapted = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in state}
    assert adapted == set(make_backbone(load_components(model), "cpu", 6).lora_targets(method))
    assert (folder / WEIGHTS).read_bytes() == (folder / "lora" / WEIGHTS).read_bytes()

    for source in (folder, folder / "lora"):
        pipe = load_components(model).to_pipeline()
        assert type(pipe).__name__ == {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}[model]
        pipe.load_lora_weights(str(source))
        err = _rel(_velocity(bb, pipe.transformer, inputs), want)
        assert err < 1e-5, (source.name, err)
    merged = getattr(diffusers, TRANSFORMERS[model]).from_pretrained(str(folder / "unet"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert _rel(_velocity(bb, merged, inputs), want) < 1e-5


def _card_code(card: str) -> str:
    section = card.split("## How to use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("model", MODELS)
def test_flow_lora_resume_and_card(tiny_cfg, tmp_path, model):
    """A checkpointed and resumed LoRA flow run ends bit-identical to an uninterrupted one (log
    and adapters); without --merge there is no unet/; the model card's code loads the LoRA as
    it says (θ′'s output) and names the family's pipeline for a hub base. Mutation checked: the
    built-in model's card code without its load_lora_weights line (fails, both models)."""
    from ap_erase_fast import erase
    from ap_erase_fast.modelcard import model_card

    full = erase(_flow_cfg(tiny_cfg, model, steps=3, lr=1e-2, output=str(tmp_path / "full")))
    erase(_flow_cfg(tiny_cfg, model, steps=3, lr=1e-2, output=str(tmp_path / "part"), checkpoint_every=1))
    resumed = erase(_flow_cfg(tiny_cfg, model, steps=3, lr=1e-2, output=str(tmp_path / "res"),
                              resume=str(tmp_path / "part.checkpoints" / "step-000001")))
    assert full.log == resumed.log
    assert full.trained and all(".lora_" in n for n in full.trained)
    for n in full.trained:
        assert torch.equal(full.trained[n], resumed.trained[n]), n

    out = tmp_path / "res"
    names = {p.name for p in out.iterdir()}
    assert {"lora", WEIGHTS, "README.md"} <= names and "unet" not in names
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "lora_kohya" not in card
    scope: dict = {}
    exec(compile(_card_code(card).replace("<this folder>", str(out)), "card", "exec"), scope)  # noqa: S102
    pipe = scope["pipe"]
    er = Eraser(_flow_cfg(tiny_cfg, model)).setup()  # the backbone and a θ′ with the run's adapters
    with torch.no_grad():
        params = dict(er.unet.named_parameters())
        for n, v in resumed.trained.items():
            params[n].copy_(v)
    inputs = _inputs(er.backbone, seed=5)
    want = _velocity(er.backbone, er.unet, inputs)
    assert _rel(_velocity(er.backbone, load_components(model).unet, inputs), want) > 1e-4
    assert _rel(_velocity(er.backbone, pipe.transformer, inputs), want) < 1e-5

    info = json.loads((out / "run.json").read_text())
    info["model"]["source"] = {"format": "hub"}
    info["model"]["id"] = "org/base"
    hub = model_card(info)
    pipeline = {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}[model]
    assert f'{pipeline}.from_pretrained("org/base"' in hub and 'load_lora_weights("<this folder>/lora")' in hub
