"""``ap-erase eval`` on the built-in tiny model: ε-space measures on constructed cases, the image
protocol end to end, and every detector's plumbing with randomly initialised networks saved to
local files (the numbers of those detectors mean nothing; the pipes are what is tested)."""
import json
import os

import pytest
import torch

from ap_erase_fast.cli import main
from ap_erase_fast.eval import EvalConfig, evaluate

CONCEPTS = ["dog", "castle", "Van Gogh", "garbage truck"]  # the erased one is dropped by eval


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("concepts") / "concepts.txt"
    path.write_text("# held-out\n" + "\n".join(CONCEPTS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_vocab):
    """A run whose UNet really moved: lr 1e-3, 20 outer steps of the ε-space loss (with random
    weights the x0 loss, dominated by its ~170x weight on noisy steps, overshoots at this lr)."""
    from ap_erase_fast import EraseConfig, erase

    out = tmp_path_factory.mktemp("runs") / "gt"
    erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=20, lr=1e-3, seed=0, vocab=small_vocab,
                      k_closest=60, num_centers=12, ddim_steps=10, quiet=True, device="cpu", output=str(out),
                      loss_space="eps"))
    return str(out)


def _small(**kw):
    base = dict(eps_seeds=1, eps_timesteps=3, steps=3, batch_size=4, quiet=True, device="cpu")
    base.update(kw)
    return EvalConfig(**base)


# ---- ε-space ------------------------------------------------------------------------------


def test_identical_models_zero_drift(trained_run, concepts_file, tmp_path):
    rep = evaluate(_small(run=trained_run, base_only=True, images=False, concepts=concepts_file,
                          output=str(tmp_path / "base")))
    eps = rep["eps_space"]
    assert set(eps["preservation"]["drift"]) == {"dog", "castle", "Van Gogh"}
    assert all(v == 0.0 for v in eps["preservation"]["drift"].values())
    e = eps["erasure"]["garbage truck"]
    assert e["shift"] == 0.0 and e["gap_erased"] == e["gap_base"] > 0
    assert rep["model"]["base_matches_run"] is True
    assert (tmp_path / "base" / "report.md").is_file()
    assert json.loads((tmp_path / "base" / "report.json").read_text())["base_only"] is True


def test_gap_base_scales_with_negative_guidance():
    """target = e0 − η(ec − e0)  ⇒  ec − target = (1+η)(ec − e0): the gap of θ at η=1 is 4× the
    gap at η=0 (up to fp32 rounding)."""
    from ap_erase_fast.concepts import encode_prompts
    from ap_erase_fast.eval.eps import EpsSettings, eps_measures
    from ap_erase_fast.models import load_components

    comps = load_components("tiny")
    cond = encode_prompts(comps.text_encoder, comps.tokenizer, ["garbage truck", "dog"])
    uncond = encode_prompts(comps.text_encoder, comps.tokenizer, [""])
    res = {eta: eps_measures(comps.unet, comps.unet, cond, uncond, comps.scheduler, (4, 8, 8),
                             EpsSettings(seeds=(0,), ddim_steps=10, num_timesteps=2, negative_guidance=eta))
           for eta in (0.0, 1.0)}
    assert res[0.0]["indices"] == [9, 0]
    for a, b in zip(res[0.0]["gap_base"], res[1.0]["gap_base"]):
        assert b == pytest.approx(4 * a, rel=1e-5)  # fp32 ε, fp64 sums
    assert res[1.0]["drift"] == [0.0, 0.0]


def test_training_shrinks_erasure_gap(trained_run, concepts_file, tmp_path):
    rep = evaluate(_small(run=trained_run, images=False, concepts=concepts_file, output=str(tmp_path / "ev")))
    e = rep["eps_space"]["erasure"]["garbage truck"]
    assert e["gap_erased"] < e["gap_base"]
    assert e["shift"] > 0
    assert all(v > 0 for v in rep["eps_space"]["preservation"]["drift"].values())
    assert rep["model"]["erased_unet_sha256"] != rep["model"]["base_unet_sha256"]
    assert (tmp_path / "ev" / "sensitivity_spectrum.png").stat().st_size > 0


# ---- detectors with random local weights ----------------------------------------------------

LABELS = ["tench", "garbage truck", "church", "parachute", "golf ball"]


def _random_weights(root):
    """resnet50/, clip/ and lpips/ with random weights, as a user would lay out real ones."""
    from transformers import CLIPConfig, CLIPModel, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    rcfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                        label2id={n: i for i, n in enumerate(LABELS)})
    ResNetForImageClassification(rcfg).save_pretrained(str(root / "resnet50"))
    ccfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=49407,
                         bos_token_id=49406, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(ccfg).save_pretrained(str(root / "clip"))
    lp = root / "lpips"
    lp.mkdir()
    feats = {}
    for idx, cin, cout, k in ((0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3)):
        feats[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5
        feats[f"features.{idx}.bias"] = torch.zeros(cout)
    torch.save(feats, lp / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))},
               lp / "alex.pth")
    return str(root)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return _random_weights(tmp_path_factory.mktemp("eval_weights"))


@pytest.fixture(scope="module")
def prompts_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    path.write_text("case_number,prompt,evaluation_seed,class\n"
                    "0,a photo of a garbage truck,1,garbage truck\n"
                    "1,a photo of a garbage truck,2,garbage truck\n"
                    "2,a photo of a church,3,church\n"
                    "3,a photo of a parachute,4,3\n"
                    "4,a photo of a golf ball,5,golf ball\n")
    return str(path)


def test_cli_end_to_end_all_detectors(trained_run, concepts_file, weights_dir, prompts_csv, capsys):
    pytest.importorskip("nudenet")
    rc = main(["eval", "--run", trained_run, "--concepts", concepts_file, "--prompts", prompts_csv,
               "--detectors", "nudenet,resnet50,clip,lpips", "--weights", weights_dir,
               "--eps-seeds", "1", "--eps-timesteps", "2", "--steps", "3", "--batch-size", "3",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    folder = os.path.join(trained_run, "eval")
    rep = json.loads(open(os.path.join(folder, "report.json")).read())
    assert "report:" in out and "random weights" in out
    img = rep["images"]
    assert img["groups"] == {"erased": 2, "preserved": 3}
    assert img["protocol"]["steps"] == 3 and img["protocol"]["guidance_scale"] == 7.5
    assert img["prompts"]["sha256"] and img["prompts"]["rows"] == 5
    dets = img["detectors"]
    assert set(dets) == {"nudenet", "resnet50", "clip", "lpips"}
    for name in ("resnet50", "clip", "lpips"):
        assert dets[name]["files"] and all(len(h) == 64 for h in dets[name]["files"].values())
    ner = dets["nudenet"]["results"]["erased"]
    assert set(ner["ner"]) == {"0.3", "0.5", "0.7", "0.8"} and ner["images"] == 5
    cls = dets["resnet50"]["results"]["erased"]
    assert set(cls["erased"]) == {"images", "ESR-1", "ESR-5"} and cls["erased"]["images"] == 2
    assert set(cls["preserved"]) == {"images", "PSR-1", "PSR-5"} and cls["preserved"]["images"] == 3
    # 5 labels: the true class is always in the top 5
    assert cls["erased"]["ESR-5"] == 0.0 and cls["preserved"]["PSR-5"] == 1.0
    clip = dets["clip"]["results"]["base"]["erased"]["clip_score"]
    assert 0.0 <= clip <= 100.0
    assert dets["lpips"]["results"]["erased"]["lpips"] > 0  # the erased model's images differ
    for f in ("report.md", "per_image.jsonl", "grid_erased.png", "grid_preserved.png", "ner.png",
              "sensitivity_spectrum.png", "images/base/00000.png", "images/erased/00004.png"):
        assert os.path.isfile(os.path.join(folder, f)), f
    per = [json.loads(line) for line in open(os.path.join(folder, "per_image.jsonl"))]
    assert [p["row"]["seed"] for p in per] == [1, 2, 3, 4, 5]
    assert per[3]["base"]["resnet50"]["target"] == 3


def test_same_seed_same_image_and_zero_lpips(trained_run, concepts_file, weights_dir, prompts_csv, tmp_path):
    """--base-only: base and 'erased' images are generated with the same seeds → identical, so
    LPIPS is exactly 0; and the same prompt+seed gives the same image across runs."""
    import numpy as np
    from PIL import Image

    kw = dict(run=trained_run, base_only=True, concepts=concepts_file, prompts=prompts_csv,
              detectors=["lpips"], weights=weights_dir, eps_timesteps=1)
    rep = evaluate(_small(output=str(tmp_path / "a"), **kw))
    for group in ("erased", "preserved"):
        assert rep["images"]["detectors"]["lpips"]["results"][group]["lpips"] == pytest.approx(0.0, abs=1e-6)
    evaluate(_small(output=str(tmp_path / "b"), **kw))
    a = np.asarray(Image.open(tmp_path / "a" / "images" / "erased" / "00002.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "images" / "erased" / "00002.png"))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b)


def test_ner_counting():
    from ap_erase_fast.eval.detectors.nudenet import CLASS_SETS, ner, resolve_classes

    dets = [[{"class": "BUTTOCKS_EXPOSED", "score": 0.391}],
            [{"class": "FACE_FEMALE", "score": 0.9}, {"class": "ANUS_EXPOSED", "score": 0.9}],
            [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.75}],
            []]
    r = ner(dets, CLASS_SETS["ap"])  # ap: ANUS_EXPOSED is not counted (authors' notebook)
    assert r["ner"] == {"0.3": 0.5, "0.5": 0.25, "0.7": 0.25, "0.8": 0.0}
    r = ner(dets, CLASS_SETS["strict"])
    assert r["ner"]["0.8"] == 0.25 and r["images_with_class"]["0.3"]["BUTTOCKS_EXPOSED"] == 1
    assert resolve_classes("belly_exposed, feet_exposed")[1] == ("BELLY_EXPOSED", "FEET_EXPOSED")


def test_nudenet_bundled_detector_runs():
    pytest.importorskip("nudenet")
    import numpy as np

    from ap_erase_fast.eval.detectors.nudenet import NudeNetDetector

    det = NudeNetDetector()
    assert det.settings["model"] == "320n.onnx" and len(next(iter(det.files.values()))) == 64
    out = det.score([np.full((64, 64, 3), 128, np.uint8)], [None])
    assert isinstance(out[0]["detections"], list)


# ---- bad input ----------------------------------------------------------------------------


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs(trained_run, tmp_path, capsys, prompts_csv):
    assert "does not exist" in _err(capsys, ["eval", "--run", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "run.json" in _err(capsys, ["eval", "--run", str(tmp_path / "empty")])
    assert "unknown detector" in _err(capsys, ["eval", "--run", trained_run, "--detectors", "fid"])
    err = _err(capsys, ["eval", "--run", trained_run, "--detectors", "resnet50", "--prompts", prompts_csv,
                        "--weights", str(tmp_path / "w")])
    assert "resnet50" in err and "microsoft/resnet-50" in err
    (tmp_path / "w" / "lpips").mkdir(parents=True)
    assert "alexnet" in _err(capsys, ["eval", "--run", trained_run, "--detectors", "lpips",
                                      "--weights", str(tmp_path / "w")])
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    assert "'prompt' column" in _err(capsys, ["eval", "--run", trained_run, "--prompts", str(bad)])
    bad.write_text("prompt\nhello\n")
    assert "'seed' column" in _err(capsys, ["eval", "--run", trained_run, "--prompts", str(bad)])
    bad.write_text("prompt,seed\nhello,x\n")
    assert "line 2" in _err(capsys, ["eval", "--run", trained_run, "--prompts", str(bad)])
    assert "--run" in _err(capsys, ["eval"])


# ---- the model's own evaluation defaults --------------------------------------------------
class _Recorder:
    """Stands in for the progress bar: records its total and every update."""

    bars: list = []

    def __init__(self, total, desc, quiet, unit="step"):
        self.total, self.desc, self.updates = total, desc, []
        _Recorder.bars.append(self)

    def __call__(self, n=1, **postfix):
        self.updates.append(n)

    def close(self):
        pass


def test_shapes_model_is_evaluated_in_its_own_world(tmp_path, monkeypatch):
    """--model shapes: the held-out concepts and prompts are the world's (no 'dog'), the images
    are judged by the shipped classifier, the sampler runs the model's own settings; progress
    advances per UNet step (every denoising step of every image batch), not per batch.

    Mutations checked: the profile ignored (SD defaults: the drift table holds 'dog', steps
    100: fails), the classifier labels swapped between erased and preserved rows (the base
    model's ESR becomes high: fails), per-batch progress (the image bar's updates no longer
    sum to its total of steps: fails)."""
    import ap_erase_fast.eval.api as api
    from ap_erase_fast.eval.profiles import shapes_sampler_settings
    from ap_erase_fast.shapes import world

    _Recorder.bars = []
    monkeypatch.setattr(api, "_Progress", _Recorder)
    rep = evaluate(EvalConfig(base_only=True, model="shapes", erase=["circle"], device="cpu",
                              output=str(tmp_path / "ev"), eps_seeds=1, eps_timesteps=2,
                              eps_ddim_steps=10, images_per_prompt=2, quiet=True))
    drift = rep["eps_space"]["preservation"]["drift"]
    assert "dog" not in drift and "a square" in drift and "a red triangle" in drift
    assert not any("circle" in c for c in drift)
    assert len(drift) == 5 + 6 * 5  # the other shapes alone and with every colour
    steps, guidance = shapes_sampler_settings()
    protocol = rep["images"]["protocol"]
    assert (protocol["steps"], protocol["guidance_scale"]) == (steps, guidance) == (25, 5.0)
    assert rep["defaults"]["name"] == "shapes" and rep["images"]["groups"] == {"erased": 2, "preserved": 10}
    res = rep["images"]["detectors"]["shapes"]["results"]["base"]
    assert res["erased"]["images"] == 2 and res["erased"]["ESR"] <= 0.5  # the base draws circles
    assert res["preserved"]["images"] == 10 and res["preserved"]["PSR"] >= 0.8
    eps_bar, img_bar = _Recorder.bars
    assert sum(eps_bar.updates) == eps_bar.total == 1 * 5 * 10  # 1 seed, 5 batches of 8, 10 steps
    assert set(img_bar.updates) == {1} and len(img_bar.updates) == img_bar.total == 2 * 1 * steps
    assert set(world.SHAPES) >= set(res["erased"]["became"])


def test_user_models_keep_the_stable_diffusion_defaults():
    from ap_erase_fast.eval.profiles import profile_for

    for model in ("tiny", "/models/sd-v1-4", "CompVis/stable-diffusion-v1-4", None):
        p = profile_for(model)
        assert (p.steps, p.guidance, p.detectors, p.heldout, p.prompts) == (100, 7.5, (), None, None)
