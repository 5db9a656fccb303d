"""ShapesWorld: the procedural world, the shipped model and classifier, the training script and
``ap-erase bench quality``."""
import json
import os

import numpy as np
import pytest
import torch

from ap_erase_fast.shapes import world

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ap_erase_fast",
                       "models", "shapes")


def test_render_is_seeded_and_covers_every_shape_and_colour():
    a, sa, ca = world.render(64, 7)
    b, sb, cb = world.render(64, 7)
    assert np.array_equal(a, b) and np.array_equal(sa, sb) and np.array_equal(ca, cb)
    c, _, _ = world.render(64, 8)
    assert not np.array_equal(a, c)
    assert a.shape == (64, 3, 32, 32) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    x, s, col = world.render(36, 1, shapes=np.repeat(np.arange(6), 6), colours=np.tile(np.arange(6), 6))
    assert list(s) == list(np.repeat(np.arange(6), 6)) and list(col) == list(np.tile(np.arange(6), 6))


def test_shape_masks_have_the_expected_areas():
    # one object of each shape, radius 10, centred, unrotated: areas in pixels
    n = len(world.SHAPES)
    cov = world.shape_masks(np.arange(n), np.full(n, 16.0), np.full(n, 16.0), np.full(n, 10.0), np.zeros(n))
    area = dict(zip(world.SHAPES, cov.sum(axis=(1, 2))))
    assert area["circle"] == pytest.approx(np.pi * 100, rel=0.03)
    assert area["ring"] == pytest.approx(np.pi * 100 * (1 - 0.58 ** 2), rel=0.05)
    assert area["square"] == pytest.approx(16 ** 2, rel=0.03)
    assert area["cross"] == pytest.approx(2 * 20 * 6.8 - 6.8 ** 2, rel=0.05)
    tri_r = 11.0  # circumradius of the equilateral triangle
    assert area["triangle"] == pytest.approx(3 * np.sqrt(3) / 4 * tri_r ** 2, rel=0.05)
    assert 0.25 * np.pi * 121 < area["star"] < 0.6 * np.pi * 121
    # every object stays inside the image
    assert cov[:, 0, :].sum() == 0 and cov[:, -1, :].sum() == 0


def test_captions_and_vocabulary():
    caps = world.all_captions()
    assert len(caps) == 6 * 5 + 36 * 5 + 1 and caps[-1] == "" and len(set(caps)) == len(caps)
    assert world.caption("star", "red", 0.0, 0) == "a star"
    assert world.caption("star", "red", 0.5, 3) == "a red star on a gray background"
    assert world.caption("star", "red", 0.95, 1) == ""
    from ap_erase_fast.concepts import is_candidate
    from ap_erase_fast.models.vocab import load_vocabulary

    vocab = load_vocabulary("shapes")
    assert len(vocab) == len(set(vocab)) == 210 + 150
    assert all(is_candidate(w) for w in vocab)
    assert not set(world.distractor_words()) & (set(world.SHAPES) | set(world.COLOURS))
    assert load_vocabulary("en") == load_vocabulary(None)


def test_exclude_erased_drops_phrases_that_contain_the_concept():
    from ap_erase_fast.concepts import mentions, select_preservation_set

    assert mentions("circle", "a red circle") and mentions("circle", "circle")
    assert not mentions("circle", "a ring") and not mentions("red", "reddish")
    assert mentions("garbage truck", "truck") and mentions("garbage truck", "a garbage truck here")
    words = ["a circle", "a red circle", "a ring", "a red ring", "a square", "tree", "house", "Bad!"]
    table = torch.randn(len(words), 4, 8)
    concept = torch.randn(4, 8)
    r = select_preservation_set("circle", concept, words, table, k_closest=5, num_centers=5,
                                exclude_erased=True)
    assert sorted(r.words) == ["a red ring", "a ring", "a square", "house", "tree"]
    kept = select_preservation_set("circle", concept, words, table, k_closest=7, num_centers=7)
    assert "a red circle" in kept.words and "Bad!" not in kept.words


@pytest.fixture(scope="module")
def shapes_model():
    from ap_erase_fast.models import load_components

    return load_components("shapes")


@pytest.fixture(scope="module")
def classifier():
    from ap_erase_fast.shapes.train import load_classifier

    return load_classifier(os.path.join(SHIPPED, "classifier.safetensors"))


def test_shipped_model_loads_as_sd(shapes_model):
    c = shapes_model
    assert c.default_resolution == 32 and c.tokenizer.model_max_length == 16
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size == 128
    assert not c.random_weights and c.source["format"] == "builtin"
    ids = c.tokenizer("a red circle").input_ids
    assert ids == [49406, 320, 736, 7117, 49407]
    report = json.load(open(os.path.join(SHIPPED, "train_report.json")))
    assert report["prompt_following"]["shape_min"] >= 0.9  # the recorded acceptance bar
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert size < 30e6


def test_shipped_classifier_on_fresh_ground_truth(classifier):
    x, s, c = world.render(600, 123456)
    ps, pc, _, _ = classifier.predict(torch.from_numpy(x))
    assert (ps.numpy() == s).mean() >= 0.98 and (pc.numpy() == c).mean() >= 0.98


def test_shipped_model_follows_shape_prompts(shapes_model, classifier):
    """Images generated from 'a <shape>' (fresh seeds, 8 per shape) are classified as that shape."""
    from ap_erase_fast.shapes.sample import generate

    c = shapes_model
    prompts = [f"a {s}" for s in world.SHAPES for _ in range(8)]
    seeds = [4242 + i for i in range(len(prompts))]
    images = generate(c.unet, c.text_encoder, c.tokenizer, c.vae, c.scheduler.config, prompts, seeds)
    assert images.shape == (48, 3, 32, 32)
    ps, _, _, _ = classifier.predict(images)
    acc = (ps.view(6, 8) == torch.arange(6)[:, None]).float().mean(1)
    assert acc.mean() >= 0.9 and acc.min() >= 0.75, dict(zip(world.SHAPES, acc.tolist()))
    # the same (prompt, seed) gives the same image whatever the batch
    again = generate(c.unet, c.text_encoder, c.tokenizer, c.vae, c.scheduler.config, prompts[8:10],
                     seeds[8:10], batch_size=1)
    assert torch.allclose(again, images[8:10], atol=1e-5)


def test_training_script_end_to_end(tmp_path, monkeypatch):
    """A few steps of every stage; the shipped folder loads as --model shapes and as a folder."""
    from ap_erase_fast.models import load_components
    from ap_erase_fast.shapes.train import main

    ship = tmp_path / "ship"
    rc = main(["--out", str(tmp_path / "work"), "--clf-steps", "2", "--vae-steps", "2", "--images", "64",
               "--unet-steps", "3", "--eval-per-shape", "1", "--heldout", "64", "--threads", "1",
               "--ship", str(ship)])
    assert rc == 0
    for name in ("model_index.json", "classifier.safetensors", "train_report.json", "curve.jsonl",
                 "unet/config.json", "text_encoder/config.json", "vae/config.json"):
        assert (ship / name).exists(), name
    report = json.loads((ship / "train_report.json").read_text())
    assert set(report["timings_s"]) >= {"classifier", "vae", "latents", "unet", "eval"}
    curve = [json.loads(x) for x in (ship / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [0, 2]
    folder = load_components(str(ship))
    monkeypatch.setenv("AP_ERASE_SHAPES_DIR", str(ship))
    builtin = load_components("shapes")
    assert folder.content_hash == builtin.content_hash
    assert builtin.unet.dtype == torch.float32 and builtin.tokenizer.model_max_length == 16


def test_missing_shapes_model_is_one_clear_error(tmp_path, monkeypatch):
    from ap_erase_fast.models import ModelLoadError, load_components

    monkeypatch.setenv("AP_ERASE_SHAPES_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="ShapesWorld model is missing"):
        load_components("shapes")


def test_bench_quality_quick(tmp_path, capsys):
    """The CI version of the benchmark: every method runs, the files are written, the base model
    recognises the target and erasure with the quick budget moves the erased concept's ε."""
    from ap_erase_fast.cli import main

    small = ["--steps", "3", "--images", "4", "--methods",
             "base,esd,preserve_null,preserve_random,ap_faithful,ap_shared"]
    for shard in ("0/2", "1/2"):  # two shards, then a plain run collects them and reports
        assert main(["bench", "quality", "--quick", *small, "--out", str(tmp_path), "--tag", "t",
                     "--shard", shard]) == 0
    assert len(list(tmp_path.glob("quality_t.shard*.jsonl"))) == 2 and not (tmp_path / "quality_t.md").exists()
    rc = main(["bench", "quality", "--quick", *small, "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    assert not list(tmp_path.glob("quality_t.shard*.jsonl"))
    rows = [json.loads(x) for x in (tmp_path / "quality_t.jsonl").read_text().splitlines()]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"base", "esd", "preserve_null", "preserve_random", "ap_faithful", "ap_shared"}
    assert by["base"]["esr"] <= 0.25 and by["base"]["psr"] >= 0.75
    assert by["base"]["drift_erased"] == 0.0
    for m in ("esd", "ap_shared", "ap_faithful"):
        assert by[m]["drift_erased"] > 0
    assert by["preserve_null"]["r_size"] == 1 and list(by["preserve_null"]["picks"]) == [""]
    assert by["esd"]["picks"] == {}
    assert by["ap_shared"]["r_size"] >= 50
    assert not any("circle" in w for w in by["ap_shared"]["picks"])  # exclude_erased
    md = (tmp_path / "quality_t.md").read_text()
    assert "| preserve_random |" in md and (tmp_path / "quality_t_grid.png").exists()
    # finished runs are read back, not recomputed
    rc = main(["bench", "quality", "--quick", *small[:4], "--out", str(tmp_path), "--tag", "t",
               "--methods", "base,esd"])
    assert rc == 0
    assert len((tmp_path / "quality_t.jsonl").read_text().splitlines()) == 6


def test_bench_quality_quick_erases_in_a_new_folder_and_reports_progress_first(tmp_path, monkeypatch,
                                                                                capsys):
    """--quick (here with two of its methods and 2 images per shape) shows a real erasure: the
    erased circle is no longer drawn while the base model draws it. By default the files go to
    a new folder under the current one, named for --quick (never the committed report's), and
    the benchmark says what it does before its first job ends."""
    import json

    from ap_erase_fast.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "quality", "--quick", "--methods", "base,esd", "--images", "2"]) == 0
    (folder,) = tmp_path.glob("bench-quality-*")
    assert sorted(p.name for p in folder.glob("quality_*.md")) == ["quality_shapes_quick.md"]
    rows = {r["method"]: r for r in map(json.loads, (folder / "quality_shapes_quick.jsonl").open())}
    assert rows["base"]["esr"] == 0.0 and rows["esd"]["esr"] >= 0.5, rows
    lines = capsys.readouterr().err.splitlines()
    assert "2 runs (0 already in quality_shapes_quick.jsonl)" in lines[0] and str(folder) in lines[0]
    assert "loading the ShapesWorld model" in lines[1] and "generating" in lines[2]


def test_bench_quality_lora_runs_are_their_own_rows_and_erase(tmp_path):
    """--lora-rank: an ESD erasure through LoRA adapters next to the full one in the same folder.
    Both are kept (the settings tell them apart on resume), both record what they trained, and
    the LoRA run moves the erased concept's ε (the adapters are on when images are generated).
    Mutations checked: lora_rank left out of the resume key (the LoRA run is skipped as done),
    adapters disabled after training (drift 0)."""
    pytest.importorskip("peft")
    from ap_erase_fast.cli import main

    small = ["--quick", "--methods", "esd", "--steps", "3", "--images", "2", "--out", str(tmp_path), "--tag", "l"]
    assert main(["bench", "quality", *small]) == 0
    assert main(["bench", "quality", *small, "--lora-rank", "4"]) == 0  # same lr: the settings tell them apart
    rows = [json.loads(x) for x in (tmp_path / "quality_l.jsonl").read_text().splitlines()]
    assert [(r["lora_rank"], r["train_method"]) for r in rows] == [(0, "xattn"), (4, "xattn")]
    assert rows[1]["drift_erased"] > 0 and rows[1]["drift_erased"] != rows[0]["drift_erased"]
    assert "LoRA rank 4 (alpha 4)" in (tmp_path / "quality_l.md").read_text()


def test_bench_quality_step_budgets_are_the_shorter_runs(tmp_path):
    """--budgets 2 with --steps 4: each erasure is judged after 2 steps and then continues; the
    step-2 rows are those of a 2-step run (images, the search's state; the ε measures are taken at
    the full length only), the step-4 rows those of a 4-step run, and the report draws one curve
    per method through both.
    Mutation checked: the budget judged one step early."""
    from ap_erase_fast.cli import main

    small = ["bench", "quality", "--quick", "--methods", "esd,ap_shared", "--images", "1", "--eval-steps", "4",
             "--out", str(tmp_path)]
    assert main([*small, "--steps", "4", "--budgets", "2", "--tag", "b"]) == 0
    assert main([*small, "--steps", "2", "--tag", "s"]) == 0
    assert main([*small, "--steps", "4", "--tag", "f"]) == 0
    read = lambda tag: [json.loads(x) for x in (tmp_path / f"quality_{tag}.jsonl").read_text().splitlines()]  # noqa: E731
    b, two, four = read("b"), read("s"), read("f")
    assert [(r["method"], r["steps"]) for r in b] == [("esd", 2), ("esd", 4), ("ap_shared", 2), ("ap_shared", 4)]
    same = ("esr", "psr", "acc", "became", "picks", "pi_top", "r_size")
    eps = ("drift_erased", "drift_kept", "gap_erased", "gap_base")  # measured at the full length only
    for mid, end, short, full in ((b[0], b[1], two[0], four[0]), (b[2], b[3], two[1], four[1])):
        assert {k: mid[k] for k in same} == {k: short[k] for k in same}
        assert {k: end[k] for k in same + eps} == {k: full[k] for k in same + eps}
        assert not set(eps) & set(mid)
    assert two[1]["drift_erased"] != b[3]["drift_erased"]
    assert main([*small, "--steps", "4", "--budgets", "2", "--tag", "b"]) == 0  # all read back
    assert len(read("b")) == 4
    md = (tmp_path / "quality_b.md").read_text()
    assert "4 steps (judged also after 2)" in md and "| 0.004 | 2 |" in md and "| 0.004 | 4 |" in md


def test_bench_quality_rejects_bad_input(tmp_path, capsys):
    from ap_erase_fast.cli import main

    assert main(["bench", "quality", "--targets", "hexagon", "--out", str(tmp_path)]) == 2
    assert "unknown target(s) hexagon" in capsys.readouterr().err
    assert main(["bench", "quality", "--methods", "magic", "--out", str(tmp_path)]) == 2
    assert main(["bench", "quality", "--shard", "2/2", "--out", str(tmp_path)]) == 2
    assert "--shard must look like I/N" in capsys.readouterr().err
    assert main(["bench", "quality", "--lora-rank", "-1", "--out", str(tmp_path)]) == 2
    assert "--lora-rank must be 0" in capsys.readouterr().err
    assert main(["bench", "quality", "--train-method", "attn", "--out", str(tmp_path)]) == 2
    assert main(["bench", "quality", "--steps", "4", "--budgets", "2,4", "--out", str(tmp_path)]) == 2
    assert "--budgets must lie between 1 and --steps - 1 (3)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_psr_at_matched_erasure_interpolates_and_never_extrapolates():
    """The curve is followed from the weakest erasure to the strongest and the first crossing
    counts, also when a stronger setting erases less. Mutations checked: interpolating in PSR
    instead of ESR, extrapolating past the last point, sorting the points by ESR, the rows not
    ordered by learning rate, the base point left out."""
    from ap_erase_fast.quality.statistics import matched_erasure, psr_at_esr

    curve = [(0.5, 0.9), (0.9, 0.6), (1.0, 0.4)]
    assert psr_at_esr(curve, 0.8) == pytest.approx(0.9 + (0.6 - 0.9) * (0.8 - 0.5) / (0.9 - 0.5))
    assert psr_at_esr(curve, 0.95) == pytest.approx(0.5)
    assert psr_at_esr(curve, 1.0) == pytest.approx(0.4)
    assert psr_at_esr([(0.5, 0.9), (0.7, 0.8)], 0.8) is None  # never reached
    assert psr_at_esr([(0.85, 0.9), (0.9, 0.8)], 0.8) is None  # above the level at its weakest
    # not monotone: 0 -> 0.9 crosses 0.8 first; sorting by ESR would cross between 0.6 and 0.9
    assert psr_at_esr([(0.0, 1.0), (0.9, 0.7), (0.6, 0.2), (1.0, 0.1)], 0.8) == pytest.approx(1.0 - 0.3 * 0.8 / 0.9)
    rows = [{"method": "esd", "target": t, "seed": s, "lr": lr, "esr": e, "psr": p}
            for t in ("circle", "square") for s in (0, 1)
            for lr, e, p in ((1e-2, 1.0 if t == "circle" else 0.7, 0.5), (1e-3, 0.5, 0.9))]
    vals, missed = matched_erasure(rows, "esd", ["circle", "square"], [0, 1], 0.8)
    assert vals == pytest.approx([0.66, 0.66]) and missed == 2
    # the base model is each curve's learning-rate-0 point: one learning rate makes a curve, and
    # a curve whose weakest run is already past the level crosses it from the base
    base = [{"method": "base", "target": "circle", "seed": s, "lr": 1e-3, "esr": 0.1, "psr": 1.0} for s in (0, 1)]
    one = [{"method": "esd", "target": "circle", "seed": 0, "lr": 1e-2, "esr": 0.9, "psr": 0.6}]
    vals, missed = matched_erasure(base + one, "esd", ["circle"], [0, 1], 0.8)
    assert vals == pytest.approx([1.0 - 0.4 * 0.7 / 0.8]) and missed == 0
    assert matched_erasure(one, "esd", ["circle"], [0], 0.8) == ([], 0)  # no base: no curve
    # a base point below the first run leaves a later crossing as it was
    assert matched_erasure(base + rows[:4], "esd", ["circle"], [0], 0.95) == (pytest.approx([0.9 - 0.4 * 0.45 / 0.5]), 0)
