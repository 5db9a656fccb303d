"""ShapesWorld 2: the world (attributes, captions, vocabulary, held-out evaluation prompts), the
attribute classifier, the training script for ``--world 2`` and the shipped ``--model shapes2``."""
import json
import os

import numpy as np
import pytest
import torch

from ap_erase_fast.shapes import world2 as w

SHIPPED2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ap_erase_fast",
                        "models", "shapes2")


def test_world_has_the_look_alike_groups_and_attributes():
    assert len(w.SHAPES) >= 12 and len(set(w.SHAPES)) == len(w.SHAPES)
    for group in (("circle", "ring", "ellipse"), ("square", "rectangle", "diamond"), ("triangle", "arrow"),
                  ("star", "cross", "plus"), ("pentagon", "hexagon"), ("heart",), ("crescent",)):
        assert set(group) <= set(w.SHAPES)
    assert len(w.COLOURS) >= 8 and {"red", "orange", "pink", "blue", "cyan"} <= set(w.COLOURS)
    assert w.FILLS == ("solid", "outline", "striped") and w.SIZES == ("small", "large")
    assert w.BACKGROUNDS == ("light", "dark")
    assert list(w.ATTRIBUTES) == ["shape", "colour", "fill", "size", "background"]


def test_render_is_seeded_fixes_what_it_is_told_and_stays_inside():
    a, la = w.render(48, 7)
    b, lb = w.render(48, 7)
    assert np.array_equal(a, b) and all(np.array_equal(la[k], lb[k]) for k in w.ATTRIBUTES)
    assert not np.array_equal(a, w.render(48, 8)[0])
    assert a.shape == (48, 3, 32, 32) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    _, lab = w.render(30, 1, shape=np.arange(15).repeat(2), fill=2, background=1)
    assert list(lab["shape"]) == list(np.arange(15).repeat(2)) and set(lab["fill"]) == {2}
    assert set(lab["background"]) == {1}
    # objects are placed a margin of their radius + 1.5 px from the edge: the shapes that stay
    # within the radius never touch the border rows and columns (dark background: grey <= 0.33);
    # the corners of the rectangle, the square, the hexagon, the triangle, the star and the cross
    # (up to 1.12 radii) can graze them, in about 1 % of large objects
    big, lab = w.render(600, 3, size=1, background=1, fill=0)
    border = np.concatenate([big[:, :, 0, :], big[:, :, -1, :], big[:, :, :, 0], big[:, :, :, -1]], axis=-1)
    touch = border.reshape(len(big), -1).max(1) > 0.36
    inside = np.isin(lab["shape"], [w.SHAPES.index(n) for n in
                                    ("circle", "ring", "ellipse", "crescent", "diamond", "arrow", "plus", "pentagon", "heart")])
    assert inside.sum() > 300 and not touch[inside].any() and touch.mean() < 0.03
    with pytest.raises(ValueError, match="unknown attribute"):
        w.render(2, 0, colour_name=1)


def _silhouettes(radius=10.0):
    n = len(w.SHAPES)
    side = w.SIZE * w._SS
    g = (np.arange(side) + 0.5) / w._SS
    py, px = np.meshgrid(g, g, indexing="ij")
    return w._silhouettes(np.arange(n), np.full(n, 16.0), np.full(n, 16.0), np.full(n, radius), np.zeros(n),
                          px.ravel(), py.ravel())


def test_silhouettes_have_the_expected_areas_and_every_pair_differs():
    m = _silhouettes()
    area = dict(zip(w.SHAPES, m.sum(1) / w._SS ** 2))
    assert area["circle"] == pytest.approx(np.pi * 9.5 ** 2, rel=0.03)
    assert area["ring"] == pytest.approx(np.pi * (100 - 36), rel=0.04)
    assert area["ellipse"] == pytest.approx(np.pi * 10 * 5.5, rel=0.04)
    assert area["square"] == pytest.approx(15.6 ** 2, rel=0.06)  # on a 0.5 px grid
    assert area["rectangle"] == pytest.approx(20 * 10, rel=0.03)
    assert area["diamond"] == pytest.approx(2 * 7.2 * 10, rel=0.04)
    assert area["hexagon"] == pytest.approx(2 * 0.7 * (1.1 + 0.6) * 100, rel=0.03)  # the wide hexagon
    assert area["pentagon"] == pytest.approx(5 / 2 * np.sin(2 * np.pi / 5) * 100, rel=0.03)
    assert area["plus"] == pytest.approx(area["cross"], rel=0.03)  # the same figure turned by 45°
    assert area["plus"] == pytest.approx(2 * 20 * 6 - 36, rel=0.04)
    # no two shapes are the same figure: intersection over union below 0.85 for every pair (the
    # closest: circle / square, circle / pentagon, ellipse / rectangle, 0.81)
    ious = {}
    for i in range(len(w.SHAPES)):
        for j in range(i + 1, len(w.SHAPES)):
            ious[w.SHAPES[i], w.SHAPES[j]] = (m[i] & m[j]).sum() / (m[i] | m[j]).sum()
    assert max(ious.values()) < 0.85, sorted(ious.items(), key=lambda kv: kv[1])[-3:]


def test_hexagon_is_unlike_every_other_shape_at_any_relative_scale():
    """Sizes vary, so a look-alike is judged at the other shape's best scale: the hexagon stays at
    or below 0.83 IoU with every shape over relative scales 0.75-1.35 (a regular hexagon is 0.93
    with the circle, the 1.3 r tall one 0.86 with the ellipse, the shapes the model mistook them
    for)."""
    hexagon = _silhouettes()[w.SHAPES.index("hexagon")]
    best = {}
    for s in np.linspace(0.75, 1.35, 13):
        m = _silhouettes(10.0 * s)
        for i, name in enumerate(w.SHAPES):
            if name != "hexagon":
                best[name] = max(best.get(name, 0.0), (m[i] & hexagon).sum() / (m[i] | hexagon).sum())
    worst = max(best, key=best.get)
    assert best[worst] <= 0.83, (worst, best[worst])
    assert best["ellipse"] <= 0.83 and best["circle"] <= 0.83


def test_fills_outline_and_stripes():
    kw = dict(shape=0, colour=4, size=1, background=0)
    solid, _ = w.render(8, 5, fill=0, **kw)
    outline, _ = w.render(8, 5, fill=1, **kw)
    striped, _ = w.render(8, 5, fill=2, **kw)
    bg = solid[:, :, 0, 0].mean()

    def painted(x):  # blue-dominant pixels: the object on a light grey background
        return ((x[:, 2] - x[:, 0]) > 0.3).sum(axis=(1, 2))

    assert (painted(outline) < 0.5 * painted(solid)).all() and (painted(outline) > 0.1 * painted(solid)).all()
    # stripes: the object is painted in two clearly different shades
    obj = striped.transpose(0, 2, 3, 1)[((striped[:, 2] - striped[:, 0]) > 0.15)]
    assert obj[:, 2].max() - obj[:, 2].min() > 0.35 and bg > 0.6


def test_captions_vocabulary_and_held_out_evaluation_prompts():
    from ap_erase_fast.concepts import is_candidate
    from ap_erase_fast.models.vocab import load_vocabulary

    assert w.describe("star") == "a star"
    assert (w.describe("star", "red", "striped", "large", "dark", prefix="a photo of a")
            == "a photo of a large red striped star on a dark background")
    row = {"shape": 9, "colour": 0, "fill": 2, "size": 1, "background": 1}
    assert w.caption(row, [0.5, 0.0, 0.0, 0.0, 0.0], 1) == "a photo of a large red striped star on a dark background"
    assert w.caption(row, [0.5, 0.9, 0.0, 0.9, 0.9], 4) == "an image of a red star"
    assert w.caption(row, [0.05, 0, 0, 0, 0], 0) == ""
    caps = w.all_captions()
    assert len(caps) == len(set(caps)) == 5 * 15 * 3 * 9 * 4 * 3 + 1 and caps[-1] == ""
    vocab = load_vocabulary("shapes2")
    assert vocab == w.shapes2_vocabulary() and len(vocab) == len(set(vocab)) == 645
    # every candidate is a training caption, a candidate by the authors' filter, and none is an
    # evaluation prompt; every evaluation prompt is a training caption too (trained, held out of R)
    cap_set = set(caps)
    assert all(v in cap_set and is_candidate(v) for v in vocab)
    ev = w.eval_prompts()
    assert len(ev) == 15 + 15 * 8 and set(ev) <= cap_set
    w.assert_held_out(ev, vocab)
    assert not any(v.startswith(w.EVAL_PREFIX) for v in vocab)
    with pytest.raises(AssertionError, match="1 evaluation prompt"):
        w.assert_held_out(ev, vocab + [ev[3]])


def test_training_captions_follow_the_mix():
    rng = np.random.default_rng(0)
    _, labels = w.render(2000, 1)
    caps = w.draw_captions(labels, rng)
    assert set(caps) <= set(w.all_captions())
    empty = sum(c == "" for c in caps) / len(caps)
    assert 0.07 < empty < 0.13
    named = [c for c in caps if c]
    for i, c in enumerate(caps):  # the caption names the image's own shape
        if c:
            assert c.split(" on a ")[0].endswith(w.SHAPES[labels["shape"][i]])
    eval_share = sum(c.startswith(w.EVAL_PREFIX + " ") for c in named) / len(named)
    assert 0.15 < eval_share < 0.25  # the evaluation prefix is trained as often as the others
    colour_share = sum(any(f" {col} " in f" {c} " for col in w.COLOURS) for c in named) / len(named)
    assert abs(colour_share - w.P_NAME["colour"]) < 0.05


def test_classifier_heads_and_loading_from_metadata(tmp_path):
    from ap_erase_fast.shapes import nets
    from ap_erase_fast.shapes.train import _save_classifier, load_classifier

    heads = nets.classifier_heads(2)
    assert heads == {"shape": 15, "colour": 8, "fill": 3, "size": 2, "background": 2}
    clf = nets.ShapeClassifier(heads=heads)
    x = torch.rand(5, 3, 32, 32)
    out = clf.eval()(x)
    assert [o.shape[-1] for o in out] == [15, 8, 3, 2, 2]
    path = str(tmp_path / "c.safetensors")
    _save_classifier(clf, path, {"heads": heads})
    back = load_classifier(path)
    probs = back.predict_all(x)
    assert list(probs) == list(heads) and torch.allclose(probs["fill"], out[2].softmax(-1), atol=1e-6)
    s, c, _, _ = back.predict(x)
    assert torch.equal(s, out[0].argmax(-1)) and torch.equal(c, out[1].argmax(-1))
    with pytest.raises(ValueError, match="shape and colour"):
        nets.ShapeClassifier(heads={"colour": 8, "shape": 15})


def test_training_script_world2_end_to_end(tmp_path, monkeypatch):
    """A few steps of every stage for --world 2; the shipped folder loads as --model shapes2."""
    from ap_erase_fast.models import load_components
    from ap_erase_fast.shapes.train import load_classifier, main

    ship = tmp_path / "ship"
    rc = main(["--world", "2", "--out", str(tmp_path / "work"), "--clf-steps", "2", "--vae-steps", "2",
               "--images", "64", "--unet-steps", "3", "--eval-per-shape", "1", "--heldout", "64",
               "--threads", "1", "--ship", str(ship)])
    assert rc == 0
    report = json.loads((ship / "train_report.json").read_text())
    assert report["world"] == 2
    assert set(report["classifier_heldout"]) == {"shape", "colour", "fill", "size", "background", "per_shape"}
    pf = report["prompt_following"]
    assert list(pf["shape_prompts"]) == list(w.SHAPES) and list(pf["colour_prompts"]) == list(w.COLOURS)
    assert pf["prompts"]["shape"] == "an image of a <shape>"
    assert "| colour | red |" in (tmp_path / "work" / "report.md").read_text()
    assert load_classifier(str(ship / "classifier.safetensors")).heads == tuple(w.ATTRIBUTES)
    # the shipped configs name no folder of the training machine
    configs = sorted(ship.rglob("config.json"))
    assert len(configs) == 3 and not any("_name_or_path" in json.loads(p.read_text()) for p in configs)
    monkeypatch.setenv("AP_ERASE_SHAPES2_DIR", str(ship))
    comps = load_components("shapes2")
    assert comps.unet.config.block_out_channels == (96, 192) or list(comps.unet.config.block_out_channels) == [96, 192]
    assert comps.source["sd_version"] == "shapes2" and comps.default_resolution == 32


def test_missing_shapes2_model_is_one_clear_error(tmp_path, monkeypatch):
    from ap_erase_fast.models import ModelLoadError, load_components

    monkeypatch.setenv("AP_ERASE_SHAPES2_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"ShapesWorld model is missing.*--model shapes2.*--world 2"):
        load_components("shapes2")


def test_near_sets_are_what_esd_damages_most_and_split_psr():
    """Near = the k kept concepts whose accuracy ESD (main lr) lowers most against base, averaged
    over seeds; PSR-near / PSR-far average the accuracy over the near set / the other kept
    concepts. Mutations checked: damage measured on the sweep lr's esd rows, the target counted
    in the far set, sorting by accuracy instead of damage."""
    from ap_erase_fast.quality.metrics import add_near_far, near_sets
    from ap_erase_fast.quality.statistics import matched_erasure
    from ap_erase_fast.quality.worlds import oracle_set

    names = list(w.SHAPES)

    def acc(**low):
        return {n: low.get(n, 1.0) for n in names}

    rows = [
        {"method": "base", "target": "circle", "seed": 0, "lr": 1e-3, "acc": acc(ellipse=0.9)},
        {"method": "base", "target": "circle", "seed": 1, "lr": 1e-3, "acc": acc(ellipse=0.9)},
        # ellipse starts lower but ESD damages hexagon and ring most
        {"method": "esd", "target": "circle", "seed": 0, "lr": 1e-3,
         "acc": acc(circle=0.0, hexagon=0.2, ring=0.5, ellipse=0.7, square=0.8)},
        {"method": "esd", "target": "circle", "seed": 1, "lr": 1e-3,
         "acc": acc(circle=0.1, hexagon=0.4, ring=0.5, ellipse=0.8, square=0.9)},
        # a stronger sweep run that damages squares most must not decide the near set
        {"method": "esd", "target": "circle", "seed": 0, "lr": 1e-2, "acc": acc(circle=0.0, square=0.0)},
        {"method": "esd", "target": "square", "seed": 0, "lr": 1e-3, "acc": acc(square=0.0)},
    ]
    sets = near_sets(rows, ["circle", "square", "heart"], 1e-3, "shapes2")
    assert set(sets) == {"circle"}  # square has no base row, heart no runs
    assert sets["circle"]["near"] == ["hexagon", "ring", "ellipse"]
    assert sets["circle"]["damage"]["hexagon"] == pytest.approx(0.7)
    assert sets["circle"]["damage"]["ellipse"] == pytest.approx(0.15)
    assert sets["circle"]["esd_seeds"] == [0, 1] and "circle" not in sets["circle"]["damage"]
    assert near_sets(rows, ["circle"], 1e-3, "shapes2", k=1)["circle"]["near"] == ["hexagon"]
    add_near_far(rows, sets)
    r = rows[2]
    assert r["psr_near"] == pytest.approx((0.2 + 0.5 + 0.7) / 3)
    assert r["psr_far"] == pytest.approx((0.8 + 10 * 1.0) / 11)  # 15 shapes - target - 3 near
    assert "psr_near" not in rows[5]
    # matched erasure on the split metric follows each seed's curve over the learning rates
    curve = [{"method": "esd", "target": "circle", "seed": 0, "lr": lr, "esr": e, "psr_near": p}
             for lr, e, p in ((1e-3, 0.5, 0.9), (1e-2, 1.0, 0.4))]
    vals, missed = matched_erasure(curve, "esd", ["circle"], [0], 0.8, "psr_near")
    assert vals == pytest.approx([0.9 - 0.5 * 0.3 / 0.5]) and missed == 0
    # the oracle preserves the near concepts through training captions that are not eval prompts
    r_shape = oracle_set("shapes2", "circle", ["hexagon", "ring"])
    assert r_shape == ["a hexagon", "a ring"]
    r_colour = oracle_set("shapes2", "red", ["orange"])
    assert len(r_colour) == 15 and r_colour[0] == "a orange circle"
    vocab = set(w.shapes2_vocabulary())
    assert set(r_shape + r_colour) <= vocab
    w.assert_held_out(w.eval_prompts(), r_shape + r_colour)


def test_bench_quality_oracle_needs_base_and_esd(tmp_path):
    from ap_erase_fast.cli import main

    assert main(["bench", "quality", "--model", "shapes2", "--methods", "oracle", "--out", str(tmp_path)]) == 2
    assert main(["bench", "quality", "--model", "shapes2", "--targets", "blob", "--out", str(tmp_path)]) == 2
    # a shard that holds the oracle but not the runs it preserves against (jobs: base, esd, oracle)
    shard = ["bench", "quality", "--model", "shapes2", "--targets", "circle", "--seeds", "0", "--methods",
             "base,esd,oracle", "--out", str(tmp_path)]
    assert main([*shard, "--shard", "2/3"]) == 2
    assert not list(tmp_path.iterdir())
    # the runs it needs, finished by other shards: then the same shard starts
    from ap_erase_fast.quality import cli as quality

    args = quality.build_parser().parse_args(shard[2:])
    rows = [{"target": "circle", "method": m, "seed": 0, "lr": args.lr, **{k: v for k, v in vars(args).items()
             if k not in ("seeds", "targets", "methods")}} for m in ("base", "esd")]
    (tmp_path / "quality_shapes2_cpu.shard0of3.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / ".quality_shapes2_cpu_grid").mkdir()  # and their sample grids: they are finished
    for m in ("base", "esd"):
        (tmp_path / ".quality_shapes2_cpu_grid" / f"{m}.pt").touch()
    # shards stride over the jobs still to run (esd, oracle): the second holds the oracle
    assert main([*shard, "--shard", "1/2"]) == 2  # esd still lacking
    (tmp_path / "quality_shapes2_cpu.shard1of3.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.MonkeyPatch.context() as mp:  # the run itself is not this test's business
        mp.setattr(quality, "near_sets", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("started")))
        with pytest.raises(RuntimeError, match="started"):
            quality.main([*shard[2:], "--shard", "0/2"])


@pytest.fixture(scope="module")
def shapes2_model():
    from ap_erase_fast.models import load_components

    return load_components("shapes2")


@pytest.fixture(scope="module")
def classifier2():
    from ap_erase_fast.shapes.train import load_classifier

    return load_classifier(os.path.join(SHIPPED2, "classifier.safetensors"))


def test_shipped_shapes2_loads_and_records_its_acceptance(shapes2_model):
    c = shapes2_model
    assert c.default_resolution == 32 and c.tokenizer.model_max_length == 16
    assert list(c.unet.config.block_out_channels) == [96, 192]
    assert not c.random_weights and c.source["format"] == "builtin" and c.source["sd_version"] == "shapes2"
    report = json.load(open(os.path.join(SHIPPED2, "train_report.json")))
    assert report["world"] == 2
    pf = report["prompt_following"]
    # the acceptance bar: every shape and every colour at >= 90 %, judged on 256 images per shape
    assert pf["images"]["per_shape"] >= 256 and len(pf["shape_prompts"]) == 15 and len(pf["colour_prompts"]) == 8
    assert pf["colour_min"] >= 0.9 and pf["shape_min"] >= 0.9 and pf["pair_both"] >= 0.9
    assert min(v for k, v in report["classifier_heldout"].items() if k != "per_shape") >= 0.98
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED2) for f in fs)
    assert size < 35e6


def test_shipped_models_name_no_local_folder():
    for folder in (SHIPPED2, os.path.join(os.path.dirname(SHIPPED2), "shapes")):
        configs = [os.path.join(d, "config.json") for d, _, fs in os.walk(folder) if "config.json" in fs]
        assert len(configs) == 3, folder
        for path in configs:
            assert "_name_or_path" not in json.load(open(path)), path


def test_shipped_shapes2_classifier_on_fresh_ground_truth(classifier2):
    x, labels = w.render(600, 123456)
    probs = classifier2.predict_all(torch.from_numpy(x))
    for name in w.ATTRIBUTES:
        acc = (probs[name].argmax(-1).numpy() == labels[name]).mean()
        assert acc >= 0.98, (name, acc)


def test_shipped_shapes2_follows_held_out_prompts(shapes2_model, classifier2):
    """'an image of a <shape>' (the reserved prefix, fresh seeds, 4 per shape) gives that shape."""
    from ap_erase_fast.shapes.sample import generate

    c = shapes2_model
    prompts = [f"{w.EVAL_PREFIX} {s}" for s in w.SHAPES for _ in range(4)]
    seeds = [777_000 + i for i in range(len(prompts))]
    images = generate(c.unet, c.text_encoder, c.tokenizer, c.vae, c.scheduler.config, prompts, seeds)
    ps, _, _, _ = classifier2.predict(images)
    acc = (ps.view(15, 4) == torch.arange(15)[:, None]).float().mean(1)
    assert acc.mean() >= 0.85 and acc.min() >= 0.5, dict(zip(w.SHAPES, acc.tolist()))


def test_shapes2_is_evaluated_on_its_held_out_prompts(tmp_path):
    """ap-erase eval --model shapes2: drift table and images use 'an image of a ...' prompts
    (never members of R) and the shapes2 classifier judges them."""
    from ap_erase_fast.eval import EvalConfig, evaluate

    rep = evaluate(EvalConfig(base_only=True, model="shapes2", erase=["circle"], device="cpu",
                              output=str(tmp_path / "ev"), eps_seeds=1, eps_timesteps=2,
                              eps_ddim_steps=10, images_per_prompt=2, quiet=True))
    drift = rep["eps_space"]["preservation"]["drift"]
    assert "an image of a square" in drift and "an image of a red heart" in drift
    assert not any("circle" in c for c in drift) and not any(c.startswith("a ") for c in drift)
    w.assert_held_out(list(drift), w.shapes2_vocabulary())
    assert rep["defaults"]["name"] == "shapes2"
    assert rep["images"]["groups"] == {"erased": 2, "preserved": 14 * 2}
    res = rep["images"]["detectors"]["shapes2"]["results"]["base"]
    assert res["erased"]["ESR"] <= 0.5 and res["preserved"]["PSR"] >= 0.8


def test_bench_quality_shapes2_near_far_and_oracle(tmp_path):
    """--model shapes2: base, esd, the oracle (R = the near set esd measured) and AP shared: the
    report has the near sets, PSR-near / PSR-far at matched erasure (each curve from the base model
    to the one learning rate) and the oracle row; every run asserted its evaluation prompts out of R."""
    from ap_erase_fast.cli import main

    args = ["bench", "quality", "--model", "shapes2", "--quick", "--methods", "base,esd,oracle,ap_shared",
            "--steps", "3", "--images", "2", "--out", str(tmp_path), "--tag", "t", "--tau", "1.5"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "quality_t.jsonl").read_text().splitlines()]
    # the ablation is recorded on the AP runs only
    assert {r["method"]: r.get("ablation") for r in rows} == {
        "base": {}, "esd": {}, "oracle": {}, "ap_shared": {"tau": 1.5}}
    assert [r["method"] for r in rows][-1] == "oracle"  # the oracle runs last
    md = (tmp_path / "quality_t.md").read_text()
    assert "tau=1.5 (ablation)" in md
    for m in ("esd", "oracle", "ap_shared"):  # one curve each, base to lr 4e-3, at both levels or "not reached"
        line = next(x for x in md.splitlines() if x.startswith(f"| {m} |") and ("(1)" in x or "not reached" in x))
        assert line.count("(1)") + line.count("1 not reached") == 2, line
    near = json.loads((tmp_path / "quality_t_near.json").read_text())
    assert list(near) == ["circle"] and len(near["circle"]["near"]) == 3
    oracle = [r for r in rows if r["method"] == "oracle"]
    assert all(r["near"] == near["circle"]["near"] for r in oracle)
    assert all(r["model"] == "shapes2" for r in rows)
    md = (tmp_path / "quality_t.md").read_text()
    assert "Erasure quality on ShapesWorld 2" in md and "PSR-near @ ESR 80 %" in md
    assert "## Near sets" in md and "| oracle |" in md and (tmp_path / "quality_t_near_far.png").exists()
    assert "an image of a <shape>" in md and "## Does the search find the near set?" in md
    ap = next(r for r in rows if r["method"] == "ap_shared")
    # every candidate names exactly one shape (never the erased one): the per-shape shares sum to 1
    assert "circle" not in ap["r_share"]
    assert sum(ap["r_share"].get(s, 0) for s in w.SHAPES) == pytest.approx(1, abs=1e-3)
    assert sum(ap["pi_mass"].get(s, 0) for s in w.SHAPES) == pytest.approx(1, abs=2e-3)


def test_ablations_are_part_of_the_ap_runs_identity_only():
    """An ablation re-runs the AP methods and reuses the controls (base, esd, the preserving ones)."""
    from ap_erase_fast.quality.cli import build_parser
    from ap_erase_fast.quality.runs import _key

    plain = vars(build_parser().parse_args(["--model", "shapes2"]))
    tau = vars(build_parser().parse_args(["--model", "shapes2", "--tau", "1.5"]))
    for m in ("base", "esd", "preserve_random", "oracle"):
        assert _key("circle", m, 0, 1e-3, plain) == _key("circle", m, 0, 1e-3, tau)
    for m in ("ap_faithful", "ap_shared", "ap_normalised"):
        assert _key("circle", m, 0, 1e-3, plain) != _key("circle", m, 0, 1e-3, tau)
    assert _key("circle", "esd", 0, 1e-3, plain) != _key("circle", "esd", 0, 2e-3, plain)
    assert _key("circle", "base", 0, 1e-3, plain) == _key("circle", "base", 0, 2e-3, plain)
    # the evaluation's DDIM steps are part of every run's identity, the base model's too; rows
    # written before the flag existed (no eval_steps) are the default's
    fast = vars(build_parser().parse_args(["--model", "shapes2", "--eval-steps", "10"]))
    old = {k: v for k, v in plain.items() if k != "eval_steps"}
    for m in ("base", "esd", "ap_shared"):
        assert _key("circle", m, 0, 1e-3, fast) != _key("circle", m, 0, 1e-3, plain)
        assert _key("circle", m, 0, 1e-3, old) == _key("circle", m, 0, 1e-3, plain)


def test_quality_shapes2_script_quick(tmp_path):
    """benchmarks/quality_shapes2.sh --quick: the full table's phases (shards without the
    oracle, shards with it, the collecting report) on one target and tiny budgets."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "QUICK_OUT": str(tmp_path), "SHARDS": "2", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(root, "benchmarks", "quality_shapes2.sh"), "--quick"],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "quality_shapes2_quick.jsonl").read_text().splitlines()]
    got = sorted((r["method"], r["steps"]) for r in rows)  # --steps 2 --budgets 1
    assert got == sorted([("base", 2)] + [(m, st) for m in ("esd", "ap_shared", "oracle") for st in (1, 2)])
    assert not list(tmp_path.glob("*.shard*.jsonl"))  # collected into the one results file
    near = json.loads((tmp_path / "quality_shapes2_quick_near.json").read_text())["circle"]["near"]
    assert all(r["near"] == near for r in rows if r["method"] == "oracle")
    md = (tmp_path / "quality_shapes2_quick.md").read_text()
    assert "| oracle |" in md and "PSR-near @ ESR 80 %" in md and "--eval-steps 4" in md
    # then one ablation against this table's controls (it runs preserve_random and AP faithful,
    # borrows base, esd and the oracle) and the table over the ablations
    env = {**env, "OUT": str(tmp_path), "MAIN_TAG": "shapes2_quick", "TARGETS": "circle", "SEEDS": "0",
           "STEPS": "2", "BUDGETS": "1", "IMAGES": "1", "EVAL_STEPS": "4", "ONLY": "tau0.5"}
    proc = subprocess.run(["bash", os.path.join(root, "benchmarks", "quality_shapes2_ablations.sh")],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "quality_shapes2_abl_tau0.5.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["steps"]) for r in rows if r["method"] in ("preserve_random", "ap_faithful")) == [
        ("ap_faithful", 1), ("ap_faithful", 2), ("preserve_random", 1), ("preserve_random", 2)]
    assert all(r["ablation"] == {"tau": 0.5} for r in rows if r["method"] == "ap_faithful")
    assert "| tau0.5 (tau 0.5) | ap_faithful |" in (tmp_path / "quality_shapes2_ablations.md").read_text()


def test_quality_shapes2_ablations_script_needs_the_main_table(tmp_path):
    """benchmarks/quality_shapes2_ablations.sh borrows the main table's controls: without it, one
    clear line and exit 2, nothing written."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", os.path.join(root, "benchmarks", "quality_shapes2_ablations.sh")],
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "run benchmarks/quality_shapes2.sh first" in proc.stderr
    assert not list(tmp_path.iterdir())
