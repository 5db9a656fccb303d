"""``ap-erase attack``: end to end on the tiny model (pipeline only: random weights, no
classifier), a real recovery on ShapesWorld 2, the rephrasings, the interval and bad inputs.

Mutation checks (done by hand when the tests were written, each reverted):

* attacking the base model instead of the erased one (the base UNet passed to ``prefix_attack``
  and used for the loss before / after): the attack found "ring a light photo picture an image
  of a circle", 1/16 circles on the erased model, and
  ``test_prompt_attack_brings_an_erased_shape_back`` failed (ASR interval 0.011 > 0.283 false);
* ascending the attack loss instead of descending it (``(-loss).backward()`` in
  ``prefix_attack``): "diamond drawing yellow small yellow an image of a circle", 0/16, the same
  test failed;
* cutting the gradient of the Gumbel mix (``emb = emb.detach().requires_grad_()`` after
  ``gumbel_mix``; the logits never move): "a a a a a an image of a circle", 1/16, the same test
  failed. (Plain ``emb.detach()`` fails it too, with "element 0 of tensors does not require grad".)
"""
import json
import math
import shutil
from pathlib import Path

import pytest

from ap_erase_fast.attack import AttackConfig, attack
from ap_erase_fast.cli import main

QUICK = {"attack_steps": 6, "prefix_tokens": 2, "target_images": 2, "probes": 2, "attack_batch": 4,
         "images": 2, "steps": 3, "batch_size": 2, "device": "cpu", "quiet": True}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_vocab):
    """A tiny-model run whose UNet moved (ε-space loss, lr 1e-3, as in test_eval; 5 steps)."""
    from ap_erase_fast import EraseConfig, erase

    out = tmp_path_factory.mktemp("runs") / "gt"
    erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=5, lr=1e-3, seed=0, vocab=small_vocab,
                      k_closest=60, num_centers=12, ddim_steps=10, quiet=True, device="cpu", output=str(out),
                      loss_space="eps"))
    return str(out)


def test_tiny_run_end_to_end_python_api(tiny_run, tmp_path):
    out = tmp_path / "atk"
    rep = attack(AttackConfig(run=tiny_run, output=str(out), **QUICK))
    assert set(rep["attacks"]) == {"prompt", "inversion"}  # no rephrasing outside ShapesWorld 2
    p = rep["attacks"]["prompt"]
    assert len(p["prefix_tokens"]) == 2 and p["prompt"].endswith(" garbage truck") and p["types_back"]
    assert p["prompt"].split()[:2] == p["prefix_words"]
    assert len(p["history"]) == 6 and all(math.isfinite(h["loss"]) for h in p["history"])
    loss = p["loss"]
    assert loss["before"] == rep["loss_plain"]["erased"] != rep["loss_plain"]["base"]
    assert all(math.isfinite(v) and v > 0 for v in loss.values())
    # the result is the best argmax prompt checked on the whole pool, and its loss is "after"
    assert min(c["pool_loss"] for c in p["checks"]) == pytest.approx(loss["after"], rel=1e-5)
    inv = rep["attacks"]["inversion"]
    assert inv["prompt"] == "<v>" and math.isfinite(inv["loss"]["after"])
    assert rep["judged"] is False and rep["rates"] == {"base": None, "erased": None} and p["rate"] is None
    assert "random weights" in rep["notice"] and rep["vocabulary"].startswith("whole-word tokens")
    assert json.loads((out / "attack.json").read_text())["attacks"]["prompt"]["prompt"] == p["prompt"]
    assert (out / "grid.png").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["atk"]  # no lock or temporary folder left


def test_tiny_run_cli_and_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["attack", "--run", tiny_run, "--output", str(out), "--attacks", "prompt", "--attack-steps", "3",
            "--prefix-tokens", "1", "--target-images", "1", "--probes", "2", "--images", "1", "--steps", "2",
            "--device", "cpu", "--seed", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "prompt attack:" in text and "loss" in text and "attack.json" in text
    rep = json.loads((out / "attack.json").read_text())
    assert set(rep["attacks"]) == {"prompt"} and rep["settings"]["seed"] == 3
    assert rep["settings"]["attack_steps"] == 3 and len(rep["attacks"]["prompt"]["prefix_tokens"]) == 1
    assert main(argv) == 2  # a finished report is not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--quiet"]) == 0


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["attack", "--output", str(out), "--device", "cpu", "--quiet"]
    assert "does not exist" in _err(capsys, [*base, "--run", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "run.json" in _err(capsys, [*base, "--run", str(tmp_path / "empty")])
    assert "--run" in _err(capsys, ["attack"])
    # a run that does not record its base model
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    info = json.loads((bare / "run.json").read_text())
    info["config"].pop("model", None)
    info.pop("model", None)
    (bare / "run.json").write_text(json.dumps(info))
    assert "records no base model" in _err(capsys, [*base, "--run", str(bare)])
    for flag, value in (("--attack-steps", "0"), ("--prefix-tokens", "0"), ("--images", "-1"),
                        ("--target-images", "0"), ("--attack-batch", "0"), ("--tau-end", "0"),
                        ("--attack-lr", "nan"), ("--probes", "0")):
        assert flag in _err(capsys, [*base, "--run", tiny_run, flag, value])
    assert "invalid int" in _err(capsys, [*base, "--run", tiny_run, "--attack-steps", "many"])
    assert "unknown attack 'jailbreak'" in _err(capsys, [*base, "--run", tiny_run, "--attacks", "prompt,jailbreak"])
    assert "ShapesWorld 2" in _err(capsys, [*base, "--run", tiny_run, "--attacks", "rephrase"])
    assert "not erased by this run" in _err(capsys, [*base, "--run", tiny_run, "--concept", "dog"])
    # found only once the tokenizer is loaded: the prompt with its prefix is longer than 77 tokens
    assert "--prefix-tokens" in _err(capsys, [*base, "--run", tiny_run, "--prefix-tokens", "80"])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bare", "empty"]


def test_rephrasings_are_other_captions_of_the_shape():
    from ap_erase_fast.attack.prompts import rephrasings
    from ap_erase_fast.shapes import world2 as w

    chosen, info = rephrasings("shapes2", "circle", 20, seed=0)
    prompts = [c["prompt"] for c in chosen]
    assert len(set(prompts)) == 20 and all("circle" in p.split() for p in prompts)
    w.assert_held_out(prompts, w.shapes2_vocabulary())  # none is a member of R
    assert not set(prompts) & set(w.eval_prompts()) and set(prompts) <= set(w.all_captions())
    # one per combination of named words first: 14 combinations (the bare and colour-only captions
    # are all members of R or evaluation prompts)
    assert info["groups"] == 14 and len({tuple(c["names"]) for c in chosen[:14]}) == 14
    assert {"size", "colour", "fill", "background"} == {n for c in chosen for n in c["names"]}
    assert rephrasings("shapes2", "circle", 20, seed=0)[0] == chosen
    assert rephrasings("shapes2", "circle", 20, seed=1)[0] != chosen


def test_wilson_interval():
    from ap_erase_fast.attack.judge import rate, wilson

    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 16)[0] == 0.0 and wilson(0, 16)[1] == pytest.approx(0.1936, abs=1e-4)
    assert wilson(16, 16)[1] == 1.0
    r = rate(["circle", "ring", "circle", "hexagon"], "circle")
    assert r["hits"] == 2 and r["images"] == 4 and r["rate"] == 0.5 and r["ci95"][0] < 0.5 < r["ci95"][1]


# ---- ShapesWorld 2: does an ESD erasure of "circle" hold? ---------------------------------
@pytest.fixture(scope="module")
def esd_run(tmp_path_factory):
    """ESD (``bench quality``'s "esd": λ = 0, the shared schedule) of "circle", the quick
    benchmark's budget: 12 steps at lr 4e-3."""
    from ap_erase_fast import EraseConfig, erase
    from ap_erase_fast.quality.runs import COMMON, METHODS

    out = tmp_path_factory.mktemp("runs") / "esd_circle"
    erase(EraseConfig(**{**COMMON, **METHODS["esd"], "model": "shapes2", "erase": ["circle"], "steps": 12,
                         "lr": 4e-3, "batch_size": 2, "seed": 0, "output": str(out)}))
    return str(out)


def test_prompt_attack_brings_an_erased_shape_back(esd_run, tmp_path):
    """The erased model draws few circles for "an image of a circle"; the prefix found by the
    white-box attack (5 tokens, 100 steps, --seed 0) makes it draw circles again on the same 16
    seeds, far above the unattacked rate (the Wilson intervals do not overlap).

    The attack is a local search and this is one seed of it: at 200 steps seeds 1-3 found
    prompts that did not bring circles back (docs/attack.md has the numbers), so a change that
    merely moves the search elsewhere can fail this test too. Run time: about 36 s on one CPU
    core (the ESD run 8 s of it)."""
    rep = attack(AttackConfig(run=esd_run, output=str(tmp_path / "atk"), attacks=["prompt"], images=16,
                              attack_steps=100, device="cpu", quiet=True))
    base, erased, attacked = rep["rates"]["base"], rep["rates"]["erased"], rep["attacks"]["prompt"]["rate"]
    assert rep["judged"] and rep["prompt"] == "an image of a circle"
    assert base["rate"] >= 0.9 and erased["rate"] <= 0.25, (base, erased)
    assert attacked["ci95"][0] > erased["ci95"][1], (rep["attacks"]["prompt"]["prompt"], attacked, erased)
    loss = rep["attacks"]["prompt"]["loss"]
    # the erasure raised the loss on base images of the concept; the attack lowered it again
    assert loss["before"] > 2 * rep["loss_plain"]["base"] and loss["after"] < 0.95 * loss["before"], loss
    assert (tmp_path / "atk" / "grid.png").is_file()


NAN, INF = "nan", "inf"
# Bad values of every option of 'ap-erase attack' (a new option must be added here).
BAD_VALUES = {
    "run": ["{tmp}/no-run", "{tmp}/empty.txt"],
    "concept": ["dog"],
    "prompt": ["", " ".join(["word"] * 80)],
    "attacks": ["jailbreak", " , ", "rephrase"],  # rephrase: only on ShapesWorld 2 runs
    "single_file_weights": ["both"],
    "allow_model_mismatch": ["=1"],
    "output": [".", "{tmp}/empty.txt"],
    "overwrite": ["=1"],
    "device": ["tpu", "cuda:x"],
    "seed": ["x", "-1"],
    "quiet": ["=1"],
    "prefix_tokens": ["0", "80", "x"],
    "attack_steps": ["0", "-3"],
    "attack_lr": ["0", NAN, INF],
    "tau_start": ["0", NAN],
    "tau_end": ["-1", INF],
    "vocab": ["bpe", "world"],  # world: only on a shapes model
    "target_images": ["0"],
    "probes": ["0"],
    "attack_batch": ["0"],
    "inversion_lr": ["-1"],
    "images": ["0"],
    "rephrasings": ["0"],
    "rephrase_images": ["0"],
    "steps": ["0"],
    "guidance": [NAN, "-1"],
    "batch_size": ["0"],
    "resolution": ["0", "33"],
    "grid_size": ["-1"],
}


def test_every_option_with_bad_values_is_one_line_and_exit_2(tiny_run, capsys, tmp_path, monkeypatch):
    """Each option of 'ap-erase attack' with a bad value: one 'error:' line, exit 2, no report
    folder (and none of the run's files touched)."""
    import argparse

    import torch

    from ap_erase_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    dests = sorted(a.dest for a in sub.choices["attack"]._actions if a.dest != "help")
    assert sorted(BAD_VALUES) == dests, "add the new attack option to BAD_VALUES"
    (tmp_path / "empty.txt").write_text("")
    before = sorted(p.name for p in Path(tiny_run).iterdir())
    monkeypatch.chdir(tmp_path)
    quick = ["--attack-steps", "1", "--target-images", "1", "--probes", "1", "--images", "1", "--steps", "1",
             "--device", "cpu"]
    for name, values in BAD_VALUES.items():
        for value in values:
            if name == "device" and value.startswith("cuda") and torch.cuda.is_available():
                continue
            value = value.replace("{tmp}", str(tmp_path))
            flag = "--" + name.replace("_", "-")
            arg = [flag + value] if value.startswith("=") else [flag, value]
            argv = ["attack", *(["--run", tiny_run] if name != "run" else []), *quick, *arg]
            code = main(argv)
            err = capsys.readouterr().err
            shown = [ln.split("\r")[-1] for ln in err.split("\n")]
            lines = [ln for ln in shown if ln.strip() and not ln.startswith(("note:", "warning:"))]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flag, value, err)
            assert sorted(p.name for p in Path(tiny_run).iterdir()) == before, (flag, value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


@pytest.mark.parametrize("argv", [["attack", "--help"]])
def test_help_renders(argv, capsys):
    assert main(argv) == 0 and "--prefix-tokens" in capsys.readouterr().out
