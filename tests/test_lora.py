"""LoRA erasure: θ′ = adapters on the selected layers, θ = the same denoiser with them off; the
outputs load back through diffusers (folder and kohya single file) and as a merged UNet, and
reproduce the engine's θ′."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ap_erase_fast.engine import Eraser
from ap_erase_fast.export import write_outputs

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


def _perturbed(comp):
    """Every UNet tensor moved by fp32 noise: no norm weight is exact in bf16."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in comp.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return comp


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
@pytest.mark.parametrize("mp", ["no", "bf16"])
@pytest.mark.parametrize("schedule", ["faithful", "shared"])
def test_theta_is_the_base_and_only_adapters_move(tiny_cfg, method, mp, schedule):
    """B = 0 at the start, so θ′₀ = θ: the first preservation term is exactly 0 (on a model whose
    norms are not exact in bf16). Only adapter tensors are trained; the base weights never move;
    there is no frozen copy; θ (adapters off) stays the base model. Mutations checked: B drawn
    non-zero at attach (every case fails); θ computed with the adapters left on (every case
    fails)."""
    from ap_erase_fast.models import load_components

    cfg = tiny_cfg(steps=2, lora_rank=4, train_method=method, mixed_precision=mp,
                   schedule=schedule, lr=1e-3)
    er = Eraser(cfg, components=_perturbed(load_components("tiny"))).setup()
    assert er.frozen_tensors == {} and not hasattr(er, "frozen")
    assert er.trained and all(".lora_A." in n or ".lora_B." in n for n in er.trained_names)
    base = {n: p.detach().clone() for n, p in er.unet.named_parameters()
            if n not in er.trained_names}
    first = er.run_outer_step()[0]
    assert first["loss_preserve"] == 0.0 and first["loss_erase"] > 0
    er.run_outer_step()
    after = dict(er.unet.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    b = [p for n, p in er.trained if ".lora_B." in n]
    assert any(p.abs().max() > 0 for p in b)
    # θ (adapters off) is still the base model after training
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    with torch.no_grad():
        on = er.models.query("trained", "check", x, t, er.models.concepts[0])
        off = er.models.query("frozen", "check", x, t, er.models.concepts[0])
    assert not torch.equal(on, off)
    assert all(p.requires_grad for _, p in er.trained)  # the adapter switch restores the flags


def _train_and_write(tiny_cfg, tmp_path, method):
    cfg = tiny_cfg(steps=2, lora_rank=4, lora_alpha=8.0, train_method=method, lr=5e-2,
                   merge=True, mixed_precision="no")
    er = Eraser(cfg).setup()
    er.train()
    folder = tmp_path / f"out-{method}"
    folder.mkdir()
    trained = er.trained_state()
    write_outputs(folder, er.unet, trained, er.run_info(), er.log, er.backbone.pipeline_class())
    return er, folder


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
def test_outputs_load_in_diffusers_and_reproduce_theta_prime(tiny_cfg, tmp_path, method):
    """The run folder itself and lora/ through pipe.load_lora_weights(folder),
    lora_kohya.safetensors through diffusers' single-file LoRA loader (kohya conversion), and the
    merged unet/ all give θ′'s outputs. noxattn puts adapters on convolutions and self-attention
    too. Mutations checked (each fails): the kohya alpha left at the rank (diffusers' default;
    the run's alpha is 8, rank 4); the alpha/rank scale not folded into the diffusers file;
    zeros saved as the adapters; no pytorch_lora_weights.safetensors at the top of the run folder
    (diffusers then takes trained.safetensors and loads nothing). (With diffusers' own format
    conversion the noxattn case fails: it drops self-attention adapters on loading.)"""
    from diffusers import UNet2DConditionModel

    from ap_erase_fast.models import load_components

    er, folder = _train_and_write(tiny_cfg, tmp_path, method)
    assert {"lora", "lora_kohya.safetensors", "unet", "README.md", "trained.safetensors"} <= \
        {p.name for p in folder.iterdir()}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([900, 300])
    cond = er.models.concepts[0].expand(2)
    (states,) = cond.parts
    with torch.no_grad():
        want = er.unet(x, t, encoder_hidden_states=states).sample
        base_out = er.models.query("frozen", "check", x, t, cond)
    assert (want - base_out).abs().max() > 1e-4  # the LoRA changes the output

    def check(unet, what):
        with torch.no_grad():
            got = unet(x, t, encoder_hidden_states=states).sample
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-5, (what, err)

    for source in (folder, folder / "lora", folder / "lora_kohya.safetensors"):
        pipe = load_components("tiny").to_pipeline()
        pipe.load_lora_weights(str(source))
        check(pipe.unet, source.name)
    check(UNet2DConditionModel.from_pretrained(str(folder / "unet")), "merged")
    weights = "pytorch_lora_weights.safetensors"  # the run folder's copy of lora/'s file
    assert (folder / weights).read_bytes() == (folder / "lora" / weights).read_bytes()
    kohya = load_file(str(folder / "lora_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}


def test_cli_lora_run_resume_and_card(tiny_cfg, small_vocab, tmp_path):
    """`ap-erase train --lora-rank` end to end: LoRA outputs, no unet/ without --merge, a model
    card; a checkpointed and resumed LoRA run ends bit-identical to an uninterrupted one."""
    from ap_erase_fast import erase

    common = ["--erase", "garbage truck", "--vocab", small_vocab, "--k-closest", "60",
              "--num-centers", "12", "--ddim-steps", "10", "--quiet", "--lora-rank", "4"]
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "ap_erase_fast", "train", *common, "--steps", "1",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert {"lora", "lora_kohya.safetensors", "README.md"} <= names and "unet" not in names
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "garbage truck" in card
    assert "lora" in card and "load_lora_weights" in card
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["lora_rank"] == 4

    full = erase(tiny_cfg(steps=3, lora_rank=4, output=str(tmp_path / "full")))
    erase(tiny_cfg(steps=3, lora_rank=4, output=str(tmp_path / "part"), checkpoint_every=1))
    resumed = erase(tiny_cfg(steps=3, lora_rank=4, output=str(tmp_path / "res"),
                             resume=str(tmp_path / "part.checkpoints" / "step-000001")))
    assert full.log == resumed.log
    for n in full.trained:
        assert torch.equal(full.trained[n], resumed.trained[n]), n


def test_lora_refusals(tiny_cfg):
    from ap_erase_fast import erase
    from ap_erase_fast.errors import UserError

    with pytest.raises(UserError, match="fast profile"):
        erase(tiny_cfg(lora_rank=4, profile="reference"), write=False)
    with pytest.raises(UserError, match="--merge"):
        erase(tiny_cfg(merge=True), write=False)
    with pytest.raises(UserError, match="lora-rank"):
        erase(tiny_cfg(lora_rank=-1), write=False)


def test_eval_reads_a_lora_run_and_updates_the_card(tiny_cfg, tmp_path):
    """`ap-erase eval` on a LoRA run without unet/ evaluates the base with the run's LoRA merged:
    the same numbers as the merged unet/ of the same run (--merge); images are generated; the
    run's model card gains the evaluation summary. Mutation checked: evaluating the base UNet
    instead of the LoRA one (shift 0) fails."""
    import shutil

    from ap_erase_fast import erase
    from ap_erase_fast.eval import EvalConfig, evaluate

    out = tmp_path / "run"
    erase(tiny_cfg(steps=4, lora_rank=4, lr=1e-2, loss_space="eps", merge=True, output=str(out)))

    def run_eval(name):
        return evaluate(EvalConfig(run=str(out), eps_seeds=1, eps_timesteps=3, steps=3,
                                   batch_size=4, quiet=True, device="cpu",
                                   output=str(out / name)))

    merged = run_eval("eval-merged")["eps_space"]["erasure"]["garbage truck"]
    shutil.rmtree(out / "unet")
    lora = run_eval("eval")
    e = lora["eps_space"]["erasure"]["garbage truck"]
    assert e["shift"] > 0
    for key in ("shift", "gap_erased", "gap_base"):
        assert e[key] == pytest.approx(merged[key], rel=1e-4), key
    assert lora["images"] is not None
    card = (out / "README.md").read_text()
    assert "Not evaluated yet" not in card and "gap (erased)" in card
