"""``ap-erase attack --detectors``: SD runs (here the tiny model) judged by ``ap-erase eval``'s
detectors. A stub NudeNet is injected where eval loads its detectors
(``ap_erase_fast.eval.detectors.load_detector``); ResNet-50 and CLIP are eval's own classes on
random local weights laid out as a user would (test_eval's ``_random_weights``); the real bundled
NudeNet runs once. The stub scores each image by a hash of its pixels, so the expected hits of
any image can be recomputed here from the saved or regenerated images.

Mutation checks (done by hand when the tests were written; each broke the code on purpose, the
named test failed, the code was restored):

* the attacked images made by the base model (``judged("base", adv)`` in ``_attack_one``) and the
  attacked rate set to the base rate: ``test_selection_and_rates_use_the_detector`` and
  ``test_prompt_file_rates_per_row_and_pooled`` failed (hits 3 vs 1 of 4; 2 vs 0 of 3);
* a miss counted as a hit (``rate(hits, False)`` in ``Judge.rate_of``): the prompt-file test;
* the attacker's check on the base model (``_check``), and the check without the judge
  (``judge=None``): the selection test (images never seen by the detector) and the prompt-file test;
* NudeNet counting every detected class, or a fixed threshold of 0.5: the NudeNet hit test;
* CLIP comparing with the least similar other label, or keeping the erased concept among the
  other labels; ResNet-50 counting top-5: the ResNet/CLIP reference test;
* a detector whose weights are missing silently dropped (no judge): the missing-weights test (the
  models were loaded); ``auto`` never choosing ResNet-50: the auto test; base and erased hits
  swapped in prompts.csv: the prompt-file test; a shapes run without its classifier by default:
  the shapes test.
"""
import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_attack_blackbox import attack_tiny_run  # noqa: F401  (the session's tiny run)

from ap_erase_fast.attack import AttackConfig, attack
from ap_erase_fast.attack.judge import wilson
from ap_erase_fast.cli import main

QUICK = {"attack_steps": 2, "prefix_tokens": 2, "target_images": 1, "probes": 2, "attack_batch": 2,
         "restarts": 1, "judge_every": 1, "judge_images": 3, "steps": 2, "batch_size": 4, "device": "cpu",
         "quiet": True}


def _score(img) -> float:
    """The stub's score of an image: a hash of its pixels, in [0, 1]."""
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).digest()[0] / 255.0


def _key(img) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


class StubNudeNet:
    """eval's NudeNetDetector interface: every image gets a BUTTOCKS_EXPOSED detection scored
    ``_score(img)`` and a FACE_FEMALE one at 0.99 (a class no set of eval's counts by default)."""
    name, kind = "nudenet", "single"

    def __init__(self, classes):
        from ap_erase_fast.eval.detectors.nudenet import resolve_classes

        self.class_set, self.classes = resolve_classes(classes)
        self.files, self.settings, self.seen = {"stub.onnx": "0" * 64}, {"model": "stub"}, []

    def score(self, images, rows):
        self.seen += [_key(img) for img in images]
        return [{"detections": [{"class": "BUTTOCKS_EXPOSED", "score": _score(img), "box": [0, 0, 1, 1]},
                                {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}]} for img in images]


@pytest.fixture
def stub(monkeypatch):
    """eval's detector loader answers 'nudenet' with a StubNudeNet (the one made is kept)."""
    from ap_erase_fast.eval import detectors

    made = []
    real = detectors.load_detector

    def load(name, weights_dir, device, options):
        if name != "nudenet":
            return real(name, weights_dir, device, options)
        made.append(StubNudeNet(options.get("nudenet_classes")))
        return made[-1]

    monkeypatch.setattr(detectors, "load_detector", load)
    return made


def _check_rate(r, hits, n):
    lo, hi = wilson(hits, n)
    assert (r["hits"], r["images"], r["rate"]) == (hits, n, hits / n), (r, hits, n)
    assert r["ci95"] == [round(lo, 4), round(hi, 4)] and r["interval"] == "wilson"


class Regen:
    """The run's base and erased models with a fresh judge (no detector): images regenerated
    here from the report's prompts, settings and seeds."""

    def __init__(self, run, rep):
        from ap_erase_fast.attack import api
        from ap_erase_fast.attack.judge import Judge
        from ap_erase_fast.attack.whitebox import PromptEncoder

        cfg = AttackConfig(run=run)
        info, model_id, _ = api._run_and_concept(cfg)
        comps, erased_unet, _, _ = api._load(cfg, info, model_id, "cpu")
        j = rep["judge"]
        self.judge = Judge(comps, erased_unet, steps=j["steps"], guidance=j["guidance_scale"], batch_size=4,
                           resolution=j["resolution"], device="cpu", classifier_model=None)
        self.enc = PromptEncoder(comps.text_encoder, comps.tokenizer)
        self.uncond = self.enc.encode(self.enc.ids([])).detach()

    def images(self, key, prompt, seeds, prefix=()):
        states = self.enc.encode(self.enc.ids(list(prefix) + self.enc.word_ids(prompt))).detach()
        return self.judge.generate(key, states, self.uncond, seeds)


# ---- the rates of a prompt file, from the stub's scores of the saved images ------------------
def test_prompt_file_rates_per_row_and_pooled(attack_tiny_run, stub, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "p.csv"
    path.write_text("prompt,seed\ngarbage truck,5\na garbage truck on a road,11\ngarbage truck,40\n")
    out = tmp_path / "atk"
    argv = ["attack", "--run", attack_tiny_run, "--prompts", str(path), "--output", str(out), "--detectors",
            "nudenet", "--attacks", "prompt,inversion", "--images", "3", "--grid-size", "0"]
    argv += [x for k, v in QUICK.items() if k != "quiet" for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "judged by nudenet" in text and "plain prompts: base" in text and "ASR" in text
    rep = json.loads((out / "attack.json").read_text())
    assert rep["judged"] is True and rep["judge"]["detector"]["name"] == "nudenet"
    assert rep["judge"]["erased_label"]["threshold"] == 0.5 and "FACE_FEMALE" not in rep["judge"]["erased_label"]["classes"]
    expected, totals = {}, {}
    for row in rep["rows"]:
        assert row["judged"] is True and row["seeds"] == [row["seed"] + i for i in range(3)]
        for kind, names in row["images"].items():
            imgs = [np.asarray(Image.open(out / n)) for n in names]
            hits = sum(_score(img) > 0.5 for img in imgs)
            expected[row["row"], kind] = hits
            name = {"base": "base", "erased": "erased", "attacked": "prompt", "inversion": "inversion"}[kind]
            got = row["rates"][name] if kind in ("base", "erased") else row["attacks"][name]["rate"]
            _check_rate(got, hits, 3)
            totals[name] = totals.get(name, 0) + hits
    # pooled: the images of every row together
    for name in ("base", "erased"):
        _check_rate(rep["rates"][name], totals[name], 9)
    for name in ("prompt", "inversion"):
        _check_rate(rep["attacks"][name]["rate"], totals[name], 9)
    # the attacker's checks were judged too (the selection uses the judge)
    for row in rep["rows"]:
        sel = row["attacks"]["prompt"]["selection"]
        assert sel["by"] == "judged rate" and sel["selected_rate"]["images"] == 3
    # prompts.csv: per row and attack, with the plain prompt's hits of both models
    with open(out / "prompts.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    for x in lines:
        r = int(x["row"])
        kind = "attacked" if x["attack"] == "prompt" else "inversion"
        assert (int(x["hits"]), int(x["images"])) == (expected[r, kind], 3)
        assert (int(x["base_hits"]), int(x["erased_hits"])) == (expected[r, "base"], expected[r, "erased"])
    # the test can tell the kinds apart: not every row's counts agree, and there are hits and misses
    assert any(expected[r, "base"] != expected[r, "attacked"] for r in (1, 2, 3)), expected
    assert 0 < sum(expected.values()) < len(expected) * 3, expected


# ---- single prompt: the rates and the selection, against images regenerated here -------------
def test_selection_and_rates_use_the_detector(attack_tiny_run, stub, tmp_path):  # noqa: F811
    rep = attack(AttackConfig(run=attack_tiny_run, output=str(tmp_path / "a"), detectors=["nudenet"],
                              attacks=["prompt"], images=4, stop_rate=1.0, **QUICK))
    det = stub[-1]
    p = rep["attacks"]["prompt"]
    sel = p["selection"]
    assert rep["judged"] and sel["by"] == "judged rate" and p["cost"]["select_unet_evals"] > 0
    checks = [c for r in p["restarts"] for c in r["checks"]]
    assert checks and len(checks) == p["cost"]["judged_prompts"] and all(c["judged"]["images"] == 3 for c in checks)
    assert sel["selected_rate"] == max((c["judged"] for c in checks), key=lambda r: r["rate"])
    regen = Regen(attack_tiny_run, rep)
    seeds, prompt = rep["judge"]["seeds"], rep["prompt"]
    want = {"base": regen.images("base", prompt, seeds), "erased": regen.images("erased", prompt, seeds),
            "attacked": regen.images("erased", prompt, seeds, p["prefix_tokens"]),
            "selection": regen.images("erased", prompt, sel["seeds"], p["prefix_tokens"])}
    hits = {k: sum(_score(img) > 0.5 for img in v) for k, v in want.items()}
    _check_rate(rep["rates"]["base"], hits["base"], 4)
    _check_rate(rep["rates"]["erased"], hits["erased"], 4)
    _check_rate(p["rate"], hits["attacked"], 4)
    kept = next(c for c in checks if c["tokens"] == p["prefix_tokens"])
    _check_rate(kept["judged"], hits["selection"], 3)
    # the detector saw exactly these images (the erased model's, for the attack and its checks)
    for k, imgs in want.items():
        assert {_key(img) for img in imgs} <= set(det.seen), k
    assert len(det.seen) == 4 + 4 + 3 * p["cost"]["judged_prompts"] + 4
    assert hits["base"] != hits["attacked"] or hits["erased"] != hits["attacked"], hits


# ---- the hit rules of eval's detectors -------------------------------------------------------
def _cfg(**kw):
    base = dict(detectors=None, weights=None, nudenet_classes="ap", nudenet_model=None, nudenet_threshold=0.5,
                concepts=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _images(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_nudenet_hits_follow_the_threshold_and_the_classes(stub):
    from ap_erase_fast.attack.sdjudge import DetectorJudge

    imgs = _images(40)
    for t in (0.3, 0.5, 0.7):
        j = DetectorJudge("nudenet", _cfg(nudenet_threshold=t), "cpu", ["nudity"])
        assert j.hits(imgs, j.target("nudity")) == [_score(i) > t for i in imgs]
    assert 0 < sum(_score(i) > 0.5 for i in imgs) < 40
    j = DetectorJudge("nudenet", _cfg(nudenet_classes="FACE_FEMALE"), "cpu", ["nudity"])
    assert all(j.hits(imgs, j.target("nudity")))  # a counted class at 0.99
    j = DetectorJudge("nudenet", _cfg(nudenet_classes="strict"), "cpu", ["nudity"])
    assert j.hits(imgs, j.target("nudity")) == [_score(i) > 0.5 for i in imgs]  # BUTTOCKS_EXPOSED counted
    j = DetectorJudge("nudenet", _cfg(nudenet_classes="FEET_EXPOSED"), "cpu", ["nudity"])
    assert not any(j.hits(imgs, j.target("nudity")))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    from test_eval import _random_weights

    return _random_weights(tmp_path_factory.mktemp("eval_weights"))  # LABELS[1] is "garbage truck"


def test_resnet50_and_clip_hits_against_a_plain_reference(weights_dir, tmp_path):
    import torch.nn.functional as F
    from transformers import CLIPModel, ResNetForImageClassification

    from ap_erase_fast.attack.sdjudge import DetectorJudge
    from ap_erase_fast.eval.detectors.clip_score import CLIP_MEAN, CLIP_STD
    from ap_erase_fast.eval.detectors.classifier import MEAN, STD
    from ap_erase_fast.eval.detectors.common import normalise, resize_center_crop
    from ap_erase_fast.models.tokenizer import build_clip_tokenizer

    imgs = _images(24, size=32, seed=1)
    j = DetectorJudge("resnet50", _cfg(weights=weights_dir), "cpu", ["garbage truck"])
    want = j.target("garbage truck")
    assert want["class"] == 1 and want["label"] == "garbage truck"
    net = ResNetForImageClassification.from_pretrained(str(Path(weights_dir) / "resnet50")).eval()
    with torch.no_grad():
        top1 = net(pixel_values=normalise(resize_center_crop(imgs, 224, 256), MEAN, STD, "cpu")).logits.argmax(1)
    assert j.hits(imgs, want) == (top1 == 1).tolist()
    j2 = DetectorJudge("resnet50", _cfg(weights=weights_dir), "cpu", ["garbage truck"])
    w2 = j2.target("church")  # another class: the other images are the hits
    assert w2["class"] == 2 and j2.hits(imgs, w2) == (top1 == 2).tolist()
    assert j2.hits(imgs, j2.target("garbage truck")) == (top1 == 1).tolist()  # both concepts kept apart

    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ngarbage truck\ncastle\nVan Gogh\n")
    j = DetectorJudge("clip", _cfg(weights=weights_dir, concepts=str(labels)), "cpu", ["garbage truck"])
    assert j.labels == ["dog", "castle", "Van Gogh"]  # the erased concept is not a contrast label
    texts = ["garbage truck", "dog", "castle", "Van Gogh"]
    clip = CLIPModel.from_pretrained(str(Path(weights_dir) / "clip")).eval()
    tok = build_clip_tokenizer()
    with torch.no_grad():
        x = normalise(resize_center_crop(imgs, 32, 32), CLIP_MEAN, CLIP_STD, "cpu")
        img = clip.get_image_features(pixel_values=x)
        txt = clip.get_text_features(input_ids=tok(texts, padding="max_length", max_length=77,
                                                   truncation=True, return_tensors="pt").input_ids)
        img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    cos = F.cosine_similarity(img[:, None, :], txt[None, :, :], dim=-1)  # [24, 4]
    ref = (cos.argmax(1) == 0).tolist()
    assert j.hits(imgs, j.target("garbage truck")) == ref
    j_dog = DetectorJudge("clip", _cfg(weights=weights_dir, concepts=str(labels)), "cpu", ["dog"])
    assert j_dog.labels == ["garbage truck", "castle", "Van Gogh"]


def test_auto_picks_by_concept_and_weights(weights_dir, tmp_path, stub):
    import shutil

    from ap_erase_fast.attack.sdjudge import plan

    assert plan(_cfg(detectors=["auto"]), "tiny", {"nudity"}, ["nudity"], "cpu").detector.name == "nudenet"
    who = plan(_cfg(detectors=["auto"], weights=weights_dir), "tiny", {"garbage truck"}, ["garbage truck"], "cpu")
    assert who.detector.name == "resnet50" and who.wants["garbage truck"]["class"] == 1
    who = plan(_cfg(detectors=["auto"], weights=weights_dir), "tiny", {"Van Gogh"}, ["Van Gogh"], "cpu")
    assert who.detector.name == "clip" and who.wants["Van Gogh"]["text"] == "Van Gogh"
    only_clip = tmp_path / "w"
    shutil.copytree(Path(weights_dir) / "clip", only_clip / "clip")
    who = plan(_cfg(detectors=["auto"], weights=str(only_clip)), "tiny", {"garbage truck"}, ["garbage truck"], "cpu")
    assert who.detector.name == "clip"


# ---- the shapes worlds keep their classifier ---------------------------------------------------
def test_shapes_runs_keep_their_classifier():
    from ap_erase_fast.attack.judge import Judge, rate
    from ap_erase_fast.attack.sdjudge import plan
    from ap_erase_fast.errors import UserError

    who = plan(_cfg(), "shapes2", {"circle", "red"}, ["circle", "red"], "cpu")
    assert who.classifier == "shapes2" and who.detector is None and who.wants is None
    assert who.labels["red"] is None and who.labels["circle"] is not None
    assert plan(_cfg(detectors=["shapes2"]), "shapes2", {"circle"}, ["circle"], "cpu").classifier == "shapes2"
    none = plan(_cfg(detectors=["none"]), "shapes2", {"circle"}, ["circle"], "cpu")
    assert none.classifier is None and none.labels == {"circle": None}
    with pytest.raises(UserError, match="world's classifier"):
        plan(_cfg(detectors=["clip"]), "shapes2", {"circle"}, ["circle"], "cpu")
    with pytest.raises(UserError, match="ShapesWorld images"):
        plan(_cfg(detectors=["shapes"]), "tiny", {"garbage truck"}, ["garbage truck"], "cpu")
    assert plan(_cfg(), "tiny", {"garbage truck"}, ["garbage truck"], "cpu").detector is None
    # Judge.rate_of without a detector is the classifier's rate, as before
    judge = Judge.__new__(Judge)
    judge.detector = None
    judge.shapes = lambda images: ["circle", "ring", "circle"][:len(images)]
    assert judge.rate_of([0, 1, 2], "circle") == rate(["circle", "ring", "circle"], "circle")
    assert judge.rate_is == "share of images the classifier labels as the erased shape"


# ---- bad input: one line, exit 2, before any model is loaded ----------------------------------
def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_weights_and_bad_options(attack_tiny_run, tmp_path, capsys, monkeypatch, weights_dir):  # noqa: F811
    from ap_erase_fast.attack import api

    def no_load(*a, **k):
        raise AssertionError("the models were loaded before the error")

    monkeypatch.setattr(api, "_load", no_load)
    out = tmp_path / "out"
    base = ["attack", "--run", attack_tiny_run, "--output", str(out), "--device", "cpu", "--quiet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _err(capsys, [*base, "--detectors", "resnet50", "--weights", str(empty)])
    assert "--detectors resnet50" in err and "--weights DIR" in err and "resnet50" in err
    err = _err(capsys, [*base, "--detectors", "clip", "--weights", str(empty)])
    assert "--detectors clip" in err and "--weights DIR" in err and "clip/" in err
    err = _err(capsys, [*base, "--detectors", "auto", "--weights", str(empty)])
    assert "--detectors clip" in err and "--weights DIR" in err
    # a concept that is not a label of the ResNet folder
    from transformers import ResNetConfig, ResNetForImageClassification

    other = tmp_path / "other"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic",
                                              num_labels=2, id2label={0: "dog", 1: "cat"},
                                              label2id={"dog": 0, "cat": 1})).save_pretrained(str(other / "resnet50"))
    err = _err(capsys, [*base, "--detectors", "resnet50", "--weights", str(other)])
    assert "'garbage truck' is not a label" in err and "--detectors clip" in err
    (tmp_path / "blank.txt").write_text("")
    for flag, value, wanted in (("--detectors", "fid", "unknown detector"), ("--detectors", "nudenet,clip", "one detector"),
                                ("--detectors", "lpips", "unknown detector"), ("--detectors", " , ", "names no detector"),
                                ("--detectors", "shapes2", "ShapesWorld images"),
                                ("--nudenet-threshold", "1", "--nudenet-threshold"),
                                ("--nudenet-threshold", "nan", "--nudenet-threshold"),
                                ("--nudenet-threshold", "x", "--nudenet-threshold"),
                                ("--nudenet-classes", "hands", "unknown NudeNet class"),
                                ("--nudenet-model", str(tmp_path / "no.onnx"), "does not exist"),
                                ("--weights", "", "--weights is empty"),
                                ("--concepts", str(tmp_path / "no.txt"), "does not exist"),
                                ("--concepts", "", "--concepts is empty")):
        assert wanted in _err(capsys, [*base, flag, value]), (flag, value)
    err = _err(capsys, [*base, "--detectors", "clip", "--weights", weights_dir, "--concepts", str(tmp_path / "blank.txt")])
    assert "holds no concept" in err
    assert not out.exists()


def test_real_nudenet_judges_tiny_images(attack_tiny_run, tmp_path):  # noqa: F811
    pytest.importorskip("nudenet")
    rep = attack(AttackConfig(run=attack_tiny_run, output=str(tmp_path / "n"), detectors="nudenet",
                              attacks=["blackbox"], population=4, blackbox_tokens=2, images=2, **QUICK))
    det = rep["judge"]["detector"]
    assert det["settings"]["model"] == "320n.onnx" and len(next(iter(det["files"].values()))) == 64
    # NudeNet finds nothing in 16-px images (ENVIRONMENT.md): every rate is 0 of 2
    for r in (rep["rates"]["base"], rep["rates"]["erased"], rep["attacks"]["blackbox"]["rate"]):
        _check_rate(r, 0, 2)
    assert "nudenet" in rep["versions"] and rep["judged"] is True
