"""ShapesWorld 2 flow (``python -m ap_erase_fast.shapes.train_flow``): the rectified-flow loss and
SD3's σ draws against hand-written references, a training step against the pipeline's own
prompt encoding, and a seconds-long run of the script on a tiny transformer whose shipped folder
reloads as a ``StableDiffusion3Pipeline`` (sampling as the pipeline samples) and loads in the
library as an SD3 model."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from ap_erase_fast.shapes import flow_nets as fn
from ap_erase_fast.shapes import train_flow as tf
from ap_erase_fast.shapes import world2

TINY = dict(layers=1, heads=2, head_dim=8, patch=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED2 = os.path.join(ROOT, "ap_erase_fast", "models", "shapes2")


@pytest.fixture(scope="module")
def tiny_mods():
    mods = fn.build_modules(3, TINY)
    with torch.no_grad():  # move every weight off its initial value so no term is silently zero
        g = torch.Generator().manual_seed(11)
        for key, m in mods.items():
            if key != "text_encoder_3":  # its zeroed final norm stays zero
                for p in m.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    return mods


def _fake_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {"mean": torch.randn(n, 4, 8, 8, generator=g), "std": 0.1 + torch.rand(n, 4, 8, 8, generator=g)}
    for k, values in world2.ATTRIBUTES.items():
        data[k] = torch.randint(0, len(values), (n,), generator=g)
    return data


def test_flow_matching_loss_is_the_rectified_flow_loss(tiny_mods):
    """x_t = (1 − σ)·x0 + σ·ε, timestep 1000·σ, target ε − x0, written out sample by sample on fresh
    inputs. Mutations checked (each fails): target x0 − ε; x_t = σ·x0 + (1 − σ)·ε; timestep σ."""
    g = torch.Generator().manual_seed(1)
    tr = tiny_mods["transformer"]
    b = 5
    z0, noise = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    states, pooled = torch.randn(b, 32, 256, generator=g), torch.randn(b, 160, generator=g)
    got = fn.flow_matching_loss(tr, z0, noise, sigma, states, pooled)
    total = 0.0
    with torch.no_grad():
        for i in range(b):
            s = float(sigma[i])
            x_t = (1 - s) * z0[i] + s * noise[i]
            v = tr(hidden_states=x_t[None], encoder_hidden_states=states[i:i + 1], pooled_projections=pooled[i:i + 1],
                   timestep=torch.tensor([1000 * s])).sample[0]
            total += float(((v - (noise[i] - z0[i])) ** 2).sum())
    want = total / z0.numel()
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_batch_draws_are_sd3s_logit_normal_sigmas_through_the_shift():
    """BatchSampler against a hand replay of its generators: images, latent sample, captions, noise,
    u = sigmoid(N(0, 1)), σ = s·u / (1 + (s − 1)·u); and the σ distribution itself (median shift(½) =
    0.75 at s = 3). Mutations checked (each fails): no shift; u uniform; z0 without the scaling factor."""
    data, sf, seed, b, s = _fake_data(), 0.7, 4, 6, 3.0
    sampler = tf.BatchSampler(data, sf, seed, b, s)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng([seed, 5])
    for _ in range(2):
        z0, noise, sigma, caps = sampler.draw()
        idx = torch.from_numpy(rng.integers(0, 40, b))
        want_z0 = (data["mean"][idx] + data["std"][idx] * torch.randn(b, 4, 8, 8, generator=gen)) * sf
        want_caps = world2.draw_captions({k: data[k][idx].numpy() for k in world2.ATTRIBUTES}, rng)
        want_noise = torch.randn(b, 4, 8, 8, generator=gen)
        u = 1 / (1 + torch.exp(-torch.randn(b, generator=gen)))
        want_sigma = s * u / (1 + (s - 1) * u)
        assert torch.equal(z0, want_z0) and caps == want_caps and torch.equal(noise, want_noise)
        torch.testing.assert_close(sigma, want_sigma, rtol=1e-6, atol=1e-7)
    many = fn.sample_sigmas(20000, s, torch.Generator().manual_seed(0))
    assert float(many.median()) == pytest.approx(0.75, abs=0.01)
    u = many / (s - (s - 1) * many)  # undo the shift, then the logit is N(0, 1)
    logit = torch.log(u / (1 - u))
    assert float(logit.mean()) == pytest.approx(0.0, abs=0.03) and float(logit.std()) == pytest.approx(1.0, abs=0.03)


def test_a_training_step_is_the_loss_on_the_pipelines_conditioning(tiny_mods):
    """Step 0 of train_flow reports the rectified-flow loss of its first batch with the prompts encoded
    by StableDiffusion3Pipeline.encode_prompt itself; the update moves the transformer and both CLIP
    encoders but not their token embeddings nor the T5 (whose states are exactly zero). Mutations
    checked (each fails): CLIP's last instead of penultimate states; the two CLIP states in the
    wrong order; T5's final norm weight not zeroed; the token embeddings trained."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from ap_erase_fast.shapes.nets import VAE_CONFIG

    mods = copy.deepcopy(tiny_mods)
    start = copy.deepcopy(tiny_mods)
    toks = fn.build_tokenizers()
    data, sf = _fake_data(seed=2), 0.6
    losses = []
    tf.train_flow(7, data, sf, mods, toks, steps=2, batch=4, lr=1e-3, warmup=1,
                  on_step=lambda step, loss: losses.append(loss))
    z0, noise, sigma, caps = tf.BatchSampler(data, sf, 7, 4, fn.SHIFT).draw()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=fn.SHIFT),
                                    vae=AutoencoderKL(**VAE_CONFIG), **{k: start[k] for k in tf.PIPELINE_KEYS}, **toks)
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(caps, caps, caps, do_classifier_free_guidance=False,
                                                  max_sequence_length=fn.T5_LENGTH)
        assert states.shape == (4, 32, 256) and pooled.shape == (4, 160)
        assert torch.count_nonzero(states[:, 16:]) == 0  # T5's part
        ref = fn.flow_matching_loss(start["transformer"], z0, noise, sigma, states, pooled)
    assert losses[0] == pytest.approx(float(ref), rel=1e-5)
    for key in tf.PIPELINE_KEYS:
        for (name, p), q in zip(mods[key].named_parameters(), start[key].parameters()):
            moved = not torch.equal(p, q)
            frozen = key == "text_encoder_3" or "token_embedding" in name
            if frozen:
                assert not moved, (key, name)
    for key in ("transformer", "text_encoder", "text_encoder_2"):
        delta = [(p - q).abs().max() for p, q in zip(mods[key].parameters(), start[key].parameters())]
        assert max(delta) > 0, key


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    """One tiny run of the script: 64 encoded images, 3 steps, 2-step sampling, shipped."""
    root = tmp_path_factory.mktemp("flow")
    out, ship = root / "work", root / "ship"
    code = tf.main(["--out", str(out), "--images", "64", "--steps", "3", "--batch", "8", "--layers", "1",
                    "--heads", "2", "--head-dim", "8", "--eval-per-shape", "1", "--eval-steps", "2", "--threads", "1",
                    "--ship", str(ship)])
    assert code == 0
    return out, ship


def test_script_writes_the_report_and_ships_fp16_sd3_pipeline(shipped_run):
    """report.json / report.md hold the scores; the shipped folder is a StableDiffusion3Pipeline
    with fp16 weights (mutation checked: shipping fp32 fails) and no local paths."""
    out, ship = shipped_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings_s"]) == {"latents", "transformer", "eval"}
    pf = report["prompt_following"]
    assert len(pf["shape_prompts"]) == 15 and len(pf["colour_prompts"]) == 8 and pf["images"]["per_pair"] == 1
    md = (out / "report.md").read_text()
    assert "| top-1 |" in md and "'an image of a <colour> <shape>', all 120 pairs" in md
    index = json.loads((ship / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    for sub in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        files = [f for f in os.listdir(ship / sub) if f.endswith(".safetensors")]
        header = open(ship / sub / files[0], "rb").read(200000)
        n = int.from_bytes(header[:8], "little")
        dtypes = {v["dtype"] for k, v in json.loads(header[8:8 + n]).items() if k != "__metadata__"}
        assert dtypes == {"F16"}, (sub, dtypes)
    assert (ship / "classifier.safetensors").exists() and (ship / "train_report.json").exists()
    for cfg in ship.rglob("config.json"):
        assert "_name_or_path" not in json.loads(cfg.read_text())


def test_shipped_folder_samples_as_the_sd3_pipeline_and_loads_as_sd3(shipped_run):
    """The pipeline (from_pretrained) and the script's sampler give the same latents from the same
    noise (mutations checked, each fails: CFG as v_c + g·(v_c − v_u); Euler step with σ_k − σ_{k+1}); the
    library loads the folder as family sd3 at 32 px with the T5 length 16 (mutation checked: a T5
    length of 77 fails) and encodes prompts as the script does."""
    from diffusers import StableDiffusion3Pipeline

    from ap_erase_fast.backbones import make_backbone
    from ap_erase_fast.models import load_components

    _, ship = shipped_run
    pipe = StableDiffusion3Pipeline.from_pretrained(ship, dtype=torch.float32, local_files_only=True)
    mods, toks, vae, cfg = tf.load_pipeline_parts(str(ship))
    prompts, seeds = ["an image of a red circle", "a small star"], [5, 6]
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        want = pipe(prompts, negative_prompt=["", ""], latents=noise, num_inference_steps=3, guidance_scale=4.0,
                    max_sequence_length=16, output_type="latent").images
    got = fn.denoise(mods, toks, cfg, prompts, seeds, steps=3, guidance=4.0, batch_size=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, noise, atol=1e-3)

    comps = load_components(str(ship))
    assert comps.family == "sd3" and comps.default_resolution == 32
    bb = make_backbone(comps, "cpu", 10)
    assert bb.max_sequence_length == 16 and bb.latent_shape(32) == (1, 4, 8, 8)
    cond = bb.encode(prompts)
    with torch.no_grad():
        states, pooled = fn.encode_ids(mods, fn.caption_ids(toks, prompts))
    torch.testing.assert_close(cond.parts[0], states, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.parts[1], pooled, rtol=1e-6, atol=1e-6)


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    """A missing or wrong --shapes2 folder and a bad step count: exit 2, one 'error:' line, no
    work folder made."""
    for argv, needle in ((["--shapes2", str(tmp_path / "none")], "is not a folder"),
                         (["--shapes2", str(tmp_path)], "lacks classifier.safetensors"),
                         (["--steps", "0"], "--steps must be at least 1"),
                         (["--shapes2", os.path.join(ROOT, "ap_erase_fast", "models", "shapes")], "not ShapesWorld 2's")):
        out = tmp_path / "out"
        assert tf.main(["--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert not out.exists()


def test_builtin_id_loads_the_folder_and_searches_shapes2s_vocabulary(shipped_run, monkeypatch):
    """``--model shapes2-flow`` reads the folder in AP_ERASE_SHAPES2_FLOW_DIR, searches over
    ShapesWorld 2's training captions by default (mutation checked: the vocabulary default left
    at 'en' fails), and a missing folder is one ModelLoadError naming how to rebuild it."""
    from ap_erase_fast.config import EraseConfig
    from ap_erase_fast.engine import Eraser
    from ap_erase_fast.models import load_components
    from ap_erase_fast.models.errors import ModelLoadError

    _, ship = shipped_run
    monkeypatch.setenv("AP_ERASE_SHAPES2_FLOW_DIR", str(ship))
    assert load_components("shapes2-flow").family == "sd3"
    er = Eraser(EraseConfig(model="shapes2-flow", erase=["circle"], steps=1, ddim_steps=2, k_closest=20,
                            num_centers=5, device="cpu", quiet=True, mixed_precision="no")).setup()
    captions = set(world2.shapes2_vocabulary())
    words = er.search.sets[0].words
    assert len(words) == 5 and set(words) <= captions
    monkeypatch.setenv("AP_ERASE_SHAPES2_FLOW_DIR", str(ship.parent / "missing"))
    with pytest.raises(ModelLoadError, match="train_flow"):
        load_components("shapes2-flow")


def test_quality_world_samples_the_flow_model_with_its_pipeline_sampler(shipped_run, monkeypatch):
    """The quality instrument's world generates shapes2-flow images with the SD3 pipeline's
    sampler at the evaluation guidance (the script's sampler, itself tested against the pipeline
    above; mutation checked: the UNet DDIM branch taken, guidance 1 fail), and the same (prompt,
    seed) gives the same image whatever else is in the batch."""
    from ap_erase_fast.quality.worlds import EVAL_GUIDANCE, World

    _, ship = shipped_run
    monkeypatch.setenv("AP_ERASE_SHAPES2_FLOW_DIR", str(ship))
    world = World("shapes2-flow")
    assert world.flow
    prompts, seeds = ["an image of a star", "an image of a blue circle"], [3, 4]
    got = world.generate(world.base_unet, prompts, seeds, steps=3)
    mods, toks, vae, cfg = tf.load_pipeline_parts(str(ship))
    want = fn.decode(vae, fn.denoise(mods, toks, cfg, prompts, seeds, steps=3, guidance=EVAL_GUIDANCE))
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(world.generate(world.base_unet, prompts[1:], seeds[1:], steps=3), got[1:],
                               rtol=1e-5, atol=1e-5)


def test_shipped_shapes2_flow_follows_its_held_out_prompts():
    """The packaged ``--model shapes2-flow`` loads as SD3 and, judged by its classifier on the
    held-out prompts ('an image of a <shape>', never members of R), draws the prompted shape far
    above chance (1/15) at the quality instrument's settings (10 Euler steps, CFG 5): its
    recorded scores are 60.9-100 % per shape at 25 steps."""
    from ap_erase_fast.quality.worlds import World, eval_prompts

    if not os.path.isfile(os.path.join(ROOT, "ap_erase_fast", "models", "shapes2_flow", "model_index.json")):
        pytest.fail("the shipped shapes2-flow model is missing")
    world = World("shapes2-flow")
    assert world.flow and world.comps.family == "sd3"
    prompts, seeds, want_s, _ = eval_prompts("circle", 2, 0, "shapes2-flow")
    assert all(p.startswith("an image of a ") for p in prompts) and len(prompts) == 30
    pred_s, _, _, _ = world.classifier.predict(world.generate(world.base_unet, prompts, seeds, steps=10))
    assert (pred_s == want_s).float().mean() >= 0.6
